//! Prometheus metrics through the real server: a scripted workload over
//! mutual TLS, then `GET /metrics` over plain HTTP on the metrics listener,
//! parsed, and every series compared with what happened.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use support::{TestGateway, nhs, pull, release};
use throughcare::grpc::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET asking for OpenMetrics, as Prometheus does; returns
/// (status, content type, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(
        addr,
        path,
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    )
    .await
}

/// A GET with no `Accept`, as `curl` sends: the Prometheus text format.
async fn get_text(addr: SocketAddr, path: &str) -> (u16, String, String) {
    request(addr, path, "").await
}

async fn request(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let body = if header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, header("content-type"), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..10_000 {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    panic!("too many chunks");
}

/// One sample: metric name and label set.
type Series = (String, BTreeMap<String, String>);

/// Parses the text exposition's samples (comments skipped).
fn parse(text: &str) -> BTreeMap<Series, f64> {
    let mut samples = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let labels = inner
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').expect("label pair");
                        (k.to_owned(), v.trim_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        let value: f64 = value.parse().expect("a number");
        assert!(
            samples.insert((name, labels), value).is_none(),
            "duplicate series in {line}"
        );
    }
    samples
}

struct Scrape(BTreeMap<Series, f64>);

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.get(&(name.to_owned(), labels)).copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?}"))
    }

    /// Every series of `name`, summed.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

fn expiry(path: &std::path::Path) -> i64 {
    throughcare::tls::expiry_timestamp(&std::fs::read(path).unwrap()).unwrap()
}

/// N accepted submits, one repeat, one refused; pulls of 2 + 2 + 1 and an
/// empty one; 3 acks, a stale ack, a retryable and a permanent nack.
async fn workload(gw: &TestGateway) {
    let mut prison = gw.client("YP001").await;
    let mut gp = gw.client("YG001").await;

    // N accepted submits, one repeat (answered with the original receipt),
    // one refused (no such destination).
    for i in 0..SUBMITS {
        prison
            .submit(release(&format!("m-{i}"), i, &["YG001"], "metrics"))
            .await
            .unwrap();
    }
    let again = prison
        .submit(release("m-0", 0, &["YG001"], "metrics"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    let refused = prison
        .submit(release("m-refused", 99, &["ZZ999"], "metrics"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // M pulls: 2 + 2 + 1 deliveries, then an empty one.
    let mut pulled = Vec::new();
    for max in [2, 2, 10, 10] {
        pulled.extend(gp.pull(pull(max)).await.unwrap().into_inner().deliveries);
    }
    assert_eq!(pulled.len(), SUBMITS as usize);

    // K acks, a late ack naming a wrong attempt, a retryable and a permanent nack.
    for d in &pulled[..3] {
        gp.ack(pb::AckRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
        })
        .await
        .unwrap();
    }
    // The first ack again, as after a lost answer: a duplicate, not a delivery.
    gp.ack(pb::AckRequest {
        delivery_id: pulled[0].delivery_id,
        attempt: pulled[0].attempt,
    })
    .await
    .unwrap();
    let stale = gp
        .ack(pb::AckRequest {
            delivery_id: pulled[3].delivery_id,
            attempt: pulled[3].attempt + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    for (d, permanent) in [(&pulled[3], false), (&pulled[4], true)] {
        gp.nack(pb::NackRequest {
            delivery_id: d.delivery_id,
            attempt: d.attempt,
            permanent,
            reason: "cannot file it yet".into(),
        })
        .await
        .unwrap();
    }
}

/// The handover calls' own counters, by event, format and outcome.
fn submits_pulls_acks_and_nacks_are_counted(m: &Scrape) {
    let submits = "throughcare_submits_total";
    let release = [("event", "release"), ("format", "native")];
    let with = |outcome| [release[0], release[1], ("outcome", outcome)];
    assert_eq!(m.value(submits, &with("ok")), f64::from(SUBMITS));
    assert_eq!(m.value(submits, &with("duplicate")), 1.0);
    assert_eq!(m.value(submits, &with("invalid_argument")), 1.0);
    assert_eq!(m.sum(submits), f64::from(SUBMITS) + 2.0);
    // Only accepted submits (new or repeated) are timed.
    assert_eq!(
        m.value("throughcare_submit_duration_seconds_count", &[]),
        f64::from(SUBMITS) + 1.0
    );
    assert!(m.value("throughcare_submit_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(
        m.value(
            "throughcare_submit_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        f64::from(SUBMITS) + 1.0
    );

    assert_eq!(
        m.value("throughcare_pulls_total", &[("outcome", "ok")]),
        4.0
    );
    assert_eq!(m.sum("throughcare_pulls_total"), 4.0);
    assert_eq!(
        m.value("throughcare_pulled_deliveries_total", &release),
        f64::from(SUBMITS)
    );
    assert_eq!(m.value("throughcare_acks_total", &[("outcome", "ok")]), 3.0);
    assert_eq!(
        m.value("throughcare_acks_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(
        m.value(
            "throughcare_acks_total",
            &[("outcome", "failed_precondition")]
        ),
        1.0
    );
    let nacks = "throughcare_nacks_total";
    assert_eq!(
        m.value(nacks, &[("permanent", "false"), ("outcome", "requeued")]),
        1.0
    );
    assert_eq!(
        m.value(nacks, &[("permanent", "true"), ("outcome", "quarantined")]),
        1.0
    );
    assert_eq!(m.sum(nacks), 2.0);
}

/// Each group commit is observed once: as many as the store counted, and
/// together they made exactly the accepted new submits durable.
fn each_group_commit_is_observed_once(m: &Scrape, gw: &TestGateway) {
    let (barriers, _, _, durable_submits) = gw.store.stats().snapshot();
    let barrier_count = m.value("throughcare_barrier_duration_seconds_count", &[]);
    assert_eq!(barrier_count, barriers as f64);
    assert_eq!(
        m.value("throughcare_barrier_commands_count", &[]),
        barrier_count
    );
    assert_eq!(
        m.value("throughcare_barrier_submits_sum", &[]),
        f64::from(SUBMITS)
    );
    assert_eq!(durable_submits, u64::from(SUBMITS));
    // At least the submits, the 3 pulls that leased, 3 acks and 2 nacks rode
    // on some barrier (refusals that wrote an audit entry may add to it).
    let changes = f64::from(SUBMITS) + 3.0 + 3.0 + 2.0;
    assert!(m.value("throughcare_barrier_commands_sum", &[]) >= changes);
}

/// Per method and status code, every call on the listener.
fn every_call_is_counted_per_method_and_code(m: &Scrape) {
    let handled = "throughcare_grpc_server_handled_total";
    let call = |service: &'static str, method: &'static str, code: &'static str| {
        [
            ("grpc_service", service),
            ("grpc_method", method),
            ("grpc_code", code),
        ]
    };
    let handover = "throughcare.v1.HandoverService";
    assert_eq!(
        m.value(handled, &call(handover, "Submit", "OK")),
        f64::from(SUBMITS) + 1.0
    );
    assert_eq!(
        m.value(handled, &call(handover, "Submit", "InvalidArgument")),
        1.0
    );
    assert_eq!(m.value(handled, &call(handover, "Pull", "OK")), 4.0);
    // Every call, the repeated ack included.
    assert_eq!(m.value(handled, &call(handover, "Ack", "OK")), 4.0);
    assert_eq!(
        m.value(handled, &call(handover, "Ack", "FailedPrecondition")),
        1.0
    );
    assert_eq!(m.value(handled, &call(handover, "Nack", "OK")), 2.0);
    assert_eq!(
        m.value(
            "throughcare_grpc_server_handling_seconds_count",
            &[("grpc_service", handover), ("grpc_method", "Submit")]
        ),
        f64::from(SUBMITS) + 2.0
    );
    // Methods not called are there at zero.
    assert_eq!(m.value(handled, &call(handover, "Track", "OK")), 0.0);
}

const SUBMITS: u32 = 5;

#[tokio::test]
async fn metrics_count_what_the_gateway_did() {
    let gw = TestGateway::start().await;
    workload(&gw).await;
    let paths = gw.paths();
    let (status, content_type, text) = get(gw.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"));
    for i in [0, 1, 2, 3, 4, 99] {
        assert!(!text.contains(&nhs(i)), "an NHS number in the metrics");
    }
    let m = Scrape(parse(&text));

    submits_pulls_acks_and_nacks_are_counted(&m);
    each_group_commit_is_observed_once(&m, &gw);
    // notAfter as Unix seconds, exactly the files' (not days from now).
    let expiry_metric = "throughcare_certificate_expiry_timestamp_seconds";
    let server = m.value(expiry_metric, &[("certificate", "server")]);
    assert_eq!(server as i64, expiry(&paths.server_cert()));
    let ca = m.value(expiry_metric, &[("certificate", "ca")]);
    assert_eq!(ca as i64, expiry(&paths.ca_cert()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        server > now + 300.0 * 86_400.0 && ca >= server,
        "{server} {ca}"
    );

    every_call_is_counted_per_method_and_code(&m);

    let (status, _, _) = get(gw.metrics_addr, "/other").await;
    assert_eq!(status, 404);
    gw.stop().await;
}

#[tokio::test]
async fn mailbox_gauges_show_the_queues_after_a_sweep() {
    let gw = TestGateway::start_with(
        |c| c.queue.sweep_interval_ms = 50,
        std::sync::Arc::new(throughcare::store::SystemClock),
    )
    .await;
    let mut prison = gw.client("YP001").await;
    for i in 0..3 {
        prison
            .submit(release(&format!("g-{i}"), 60 + i, &["YG001"], "m"))
            .await
            .unwrap();
    }
    // No GP named and none registered: parked (and probation's copy).
    prison
        .submit(release("g-parked", 70, &[], "m"))
        .await
        .unwrap();
    let mut gp = gw.client("YG001").await;
    let got = gp.pull(pull(2)).await.unwrap().into_inner().deliveries;
    gp.nack(pb::NackRequest {
        delivery_id: got[0].delivery_id,
        attempt: got[0].attempt,
        permanent: true,
        reason: "rejected".into(),
    })
    .await
    .unwrap();
    let yg = [("mailbox", "YG001")];
    let parked = [("mailbox", "@parked")];
    let probation = [("mailbox", "YPR01")];
    let mut last = String::new();
    for _ in 0..100 {
        let (_, _, text) = get(gw.metrics_addr, "/metrics").await;
        let m = Scrape(parse(&text));
        let seen = (
            m.get("throughcare_mailbox_depth", &yg),
            m.get("throughcare_mailbox_leased", &yg),
            m.get("throughcare_mailbox_quarantined", &yg),
            m.get("throughcare_mailbox_parked", &parked),
            m.get("throughcare_mailbox_depth", &probation),
        );
        if seen == (Some(2.0), Some(1.0), Some(1.0), Some(1.0), Some(4.0)) {
            assert!(m.value("throughcare_mailbox_oldest_age_seconds", &yg) >= 0.0);
            // The synthetic releases are due on a past release date: overdue.
            assert_eq!(m.value("throughcare_mailbox_overdue", &yg), 2.0);
            assert_eq!(m.value("throughcare_mailbox_parked", &yg), 0.0);
            gw.stop().await;
            return;
        }
        last = format!("{seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("gauges never matched the queues: {last}");
}

#[test]
fn a_metrics_port_in_use_stops_the_binary_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc_addr = format!("127.0.0.1:{}", support::free_port());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_throughcare"))
        .args(["serve", "--listen", &grpc_addr, "--metrics-listen"])
        .arg(taken.local_addr().unwrap().to_string())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`metrics.listen`"), "{stderr}");
}

/// `promtool check metrics` (Prometheus's own linter: names, units, help,
/// counter suffixes) finds the real exposition clean, after calls that
/// refused as well as served. Debian's `prometheus` provides promtool;
/// `tests/run` installs it where it can and then requires this test to run.
#[tokio::test]
async fn promtool_finds_the_exposition_clean() {
    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    if promtool.is_err() {
        assert!(
            std::env::var_os("THROUGHCARE_REQUIRE_PROMTOOL").is_none(),
            "promtool is required here (tests/run could install it) but is missing"
        );
        eprintln!("SKIPPED: promtool not installed (Debian package `prometheus`)");
        return;
    }
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("p-1", 1, &["YG001"], "promtool"))
        .await
        .unwrap();
    prison
        .submit(release("p-2", 2, &["ZZ999"], "promtool"))
        .await
        .unwrap_err();
    let (status, content_type, text) = get_text(gw.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let mut check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = check.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = check.wait_with_output().await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    // The same families as the OpenMetrics form, counters with `_total`.
    assert!(text.contains("# TYPE throughcare_submits_total counter"));
    assert!(text.contains("throughcare_build_info{"));
    gw.stop().await;
}
