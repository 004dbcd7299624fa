//! Limits against abuse, over real mutual TLS on 127.0.0.1: the rate limit
//! per identity, load shedding, connections per identity, the header list
//! size, and a bounded flood against the real binary that must keep serving
//! a well-behaved client in bounded memory.

use crate::support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use throughcare::grpc::pb;
use throughcare::store::SystemClock;
use tonic::Code;
use tonic_types::StatusExt;

/// Waits (bounded) for an audit entry from `actor` whose outcome contains `text`.
async fn audited(gw: &TestGateway, actor: &str, text: &str) {
    for _ in 0..100 {
        if gw
            .store
            .audit_entries()
            .unwrap()
            .iter()
            .any(|e| e.actor == actor && e.outcome.contains(text))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit entry from {actor} with `{text}`");
}

#[tokio::test]
async fn one_identity_over_its_rate_gets_resource_exhausted_with_a_retry_delay() {
    let gw = TestGateway::start_with(
        |c| {
            c.limits.requests_per_second = 2;
            c.limits.request_burst = 5;
        },
        Arc::new(SystemClock),
    )
    .await;
    let mut greedy = gw.client("YG001").await;
    let mut refused = None;
    for _ in 0..20 {
        if let Err(s) = greedy.pull(pull(1)).await {
            refused = Some(s);
            break;
        }
    }
    let status = refused.expect("20 calls at once exceed a burst of 5");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    // Refused calls are summarised in the audit trail once a second.
    audited(&gw, "urn:ods:YG001", "over the per-identity rate limit").await;
    // Another identity is not affected.
    let mut other = gw.client("YG002").await;
    other.pull(pull(1)).await.unwrap();
    // After the delay the greedy one may call again.
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    greedy.pull(pull(1)).await.unwrap();
    gw.stop().await;
}

/// Two long polls of `wait_ms` each, from two identities, in flight once
/// this returns: a gateway whose `max_in_flight` is 2 is then full.
async fn fill_in_flight(
    gw: &TestGateway,
    wait_ms: i32,
) -> Vec<tokio::task::JoinHandle<Result<tonic::Response<pb::PullResponse>, tonic::Status>>> {
    let long_poll = pb::PullRequest {
        wait: Some(prost_types::Duration {
            seconds: i64::from(wait_ms / 1_000),
            nanos: (wait_ms % 1_000) * 1_000_000,
        }),
        ..pull(1)
    };
    let mut waiting = Vec::new();
    for who in ["YG001", "YG002"] {
        let mut c = gw.client(who).await;
        let req = long_poll;
        waiting.push(tokio::spawn(async move { c.pull(req).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    waiting
}

#[tokio::test]
async fn beyond_the_in_flight_limit_calls_are_shed_with_unavailable() {
    let gw = TestGateway::start_with(|c| c.limits.max_in_flight = 2, Arc::new(SystemClock)).await;
    let waiting = fill_in_flight(&gw, 1_500).await;
    let mut third = gw.client("YPR01").await;
    let err = third.pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    audited(
        &gw,
        "peer:many",
        "1 calls: shed at the gateway's in-flight limit",
    )
    .await;
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    // Capacity is back once the long polls finished.
    third.pull(pull(1)).await.unwrap();
    gw.stop().await;
}

/// One certificate may hold a quarter of the gateway's in-flight limit: its
/// long polls (each holding its place while it waits) beyond that are
/// refused as its own excess (RESOURCE_EXHAUSTED, retry after one ends),
/// and another organisation's calls are still served. One certificate
/// holding every place shed everyone else's calls (found by an API review).
#[tokio::test]
async fn one_certificate_holds_at_most_its_share_of_the_calls_in_flight() {
    let gw = TestGateway::start_with(|c| c.limits.max_in_flight = 8, Arc::new(SystemClock)).await;
    let long_poll = pb::PullRequest {
        wait: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..pull(1)
    };
    let greedy = gw.client("YG001").await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut c = greedy.clone();
        let req = long_poll;
        waiting.push(tokio::spawn(async move { c.pull(req).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = greedy.clone().pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.get_details_error_info().map(|i| i.reason),
        Some("TOO_MANY_IN_FLIGHT".to_owned())
    );
    let mut other = gw.client("YG002").await;
    other.pull(pull(1)).await.unwrap();
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    // Its places are back once the long polls ended.
    greedy.clone().pull(pull(1)).await.unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn a_health_check_is_answered_while_calls_are_shed_at_the_in_flight_limit() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let gw = TestGateway::start_with(|c| c.limits.max_in_flight = 2, Arc::new(SystemClock)).await;
    let waiting = fill_in_flight(&gw, 2_000).await;
    // The gateway is full: an ordinary call is shed...
    let mut third = gw.client("YPR01").await;
    let err = third.pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // ...and a probe, over the same mutual TLS, still hears SERVING.
    let channel = throughcare::cli::client::channel(&gw.endpoint, &gw.certs(), "operator-oncall")
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "throughcare.v1.HandoverService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    // The probe took no permit: the long polls still hold both.
    let err = third.pull(pull(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    gw.stop().await;
}

#[tokio::test]
async fn an_identity_cannot_hold_more_connections_than_its_limit() {
    let gw = TestGateway::start_with(
        |c| c.limits.max_connections_per_identity = 2,
        Arc::new(SystemClock),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = gw.client("YG001").await;
        c.pull(pull(1)).await.unwrap();
        held.push(c);
    }
    let third = throughcare::cli::client::handover(&gw.endpoint, &gw.certs(), "YG001").await;
    let refused = match third {
        Err(_) => true,
        Ok(mut c) => c.pull(pull(1)).await.is_err(),
    };
    assert!(refused, "a third connection is refused");
    audited(&gw, "urn:ods:YG001", "more than 2 open connections").await;
    // Others are unaffected; and when one closes, the identity may reconnect.
    gw.client("YG002").await.pull(pull(1)).await.unwrap();
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(mut c) =
            throughcare::cli::client::handover(&gw.endpoint, &gw.certs(), "YG001").await
            && c.pull(pull(1)).await.is_ok()
        {
            again = Some(c);
            break;
        }
    }
    assert!(again.is_some(), "a freed slot can be used again");
    gw.stop().await;
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_and_the_gateway_keeps_serving() {
    let gw = TestGateway::start_with(
        |c| c.limits.max_header_list_bytes = 4_096,
        Arc::new(SystemClock),
    )
    .await;
    let mut c = gw.client("YG001").await;
    let mut req = tonic::Request::new(pull(1));
    let big = "x".repeat(16 * 1024);
    req.metadata_mut().insert("x-padding", big.parse().unwrap());
    assert!(c.pull(req).await.is_err(), "a 16 KiB header is refused");
    gw.client("YG001").await.pull(pull(1)).await.unwrap();
    gw.stop().await;
}

// ---- flood against the real binary ----------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_identity_neither_starves_others_nor_grows_memory() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (gateway, port) = start_limited_gateway(dir.path(), &certs).await;
    let pid = gateway.0.id();
    let endpoint = format!("https://127.0.0.1:{port}");
    let addr = format!("127.0.0.1:{port}");

    // The well-behaved pair: a prison sends, a practice pulls and acks.
    let mut prison = throughcare::cli::client::handover(&endpoint, &certs, "YP002")
        .await
        .unwrap();
    for n in 0..5 {
        prison.submit(well_behaved(n)).await.unwrap();
    }
    let baseline = rss_kib(pid);

    let idle_tcp = idle_tcp_connections(&addr).await;
    let idle_tls = idle_tls_connections(&addr, &certs).await;
    let (floods, outcomes) = flood_one_connection_with_streams(&endpoint, &certs).await;

    // Meanwhile the well-behaved pair keeps working, each call answered, and
    // can even open a new connection.
    let started = Instant::now();
    let (served, mut peak) = well_behaved_rounds(&mut prison, &endpoint, &certs, pid).await;
    peak = peak.max(baseline);
    for f in floods {
        let _ = f.await;
    }
    peak = peak.max(rss_kib(pid));
    let elapsed = started.elapsed();
    let outcomes = outcomes.lock().unwrap().clone();
    eprintln!(
        "flood: {served} well-behaved rounds in {elapsed:?}; RSS baseline {baseline} KiB, peak {peak} KiB; {} idle TCP, {} idle TLS opened; flood streams: {outcomes:?}",
        idle_tcp.len(),
        idle_tls.len()
    );
    // At most 32 streams run at once on the flooding connection (the server's
    // SETTINGS_MAX_CONCURRENT_STREAMS); each long poll lasts a second, so
    // within the 4 s the flood is given, at most about 4 x 32 are answered.
    let answered = outcomes.get("ok").copied().unwrap_or(0);
    assert!(
        answered > 0 && answered <= 5 * 32,
        "streams on one connection are limited: {outcomes:?}"
    );
    assert_eq!(served, 20);
    assert!(
        peak < baseline + 64 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    drop(idle_tcp);
    drop(idle_tls);
    drop(gateway);
}

/// The real binary with tight limits (32 streams a connection, 8
/// connections an identity, 64 handshakes), listening; returns it and its port.
async fn start_limited_gateway(dir: &Path, certs: &Path) -> (Binary, u16) {
    throughcare::certs::init_dev_pki(certs).unwrap();
    let port = support::free_port();
    let config = dir.join("throughcare.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_concurrent_streams = 32\nmax_connections_per_identity = 8\nmax_handshakes = 64\nmax_handshakes_per_network = 32\nrequests_per_second = 100\nrequest_burst = 200\nmax_in_flight = 256\n",
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--certs-dir")
        .arg(certs)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gateway = Binary(child);
    let addr = format!("127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "gateway listens");
    (gateway, port)
}

/// The well-behaved prison's `n`th release to YG002.
fn well_behaved(n: u32) -> pb::SubmitRequest {
    crate::support::sent_by(
        release(&format!("good-{n}"), n, &["YG002"], "well behaved"),
        "YP002",
    )
}

/// 1. Many idle raw TCP connections that never start a handshake, from
///    another loopback address (127.0.0.2).
async fn idle_tcp_connections(addr: &str) -> Vec<tokio::net::TcpStream> {
    let mut idle_tcp = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(s) = socket.connect(addr.parse().unwrap()).await {
            idle_tcp.push(s);
        }
    }
    idle_tcp
}

/// 2. Many idle TLS connections from one identity (beyond its limit).
async fn idle_tls_connections(
    addr: &str,
    certs: &Path,
) -> Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(certs, "YG001"));
    let mut idle_tls = Vec::new();
    for _ in 0..40 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        if let Ok(s) = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
        {
            idle_tls.push(s);
        }
    }
    idle_tls
}

/// How the flood's streams ended, counted by outcome.
type Outcomes = Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>;

/// 3. Many streams on one connection: long polls from another identity
///    (YG001 has used up its connections above).
async fn flood_one_connection_with_streams(
    endpoint: &str,
    certs: &Path,
) -> (Vec<tokio::task::JoinHandle<()>>, Outcomes) {
    let flooder = throughcare::cli::client::handover(endpoint, certs, "YPR01").await;
    let mut floods = Vec::new();
    let outcomes = Outcomes::default();
    if let Ok(flooder) = flooder {
        for _ in 0..400 {
            let mut f = flooder.clone();
            let outcomes = outcomes.clone();
            floods.push(tokio::spawn(async move {
                let req = pb::PullRequest {
                    wait: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..pull(1)
                };
                let r = tokio::time::timeout(Duration::from_secs(4), f.pull(req)).await;
                let key = match r {
                    Err(_) => "timeout".to_owned(),
                    Ok(Ok(_)) => "ok".to_owned(),
                    Ok(Err(s)) => format!("{:?}", s.code()),
                };
                *outcomes.lock().unwrap().entry(key).or_default() += 1;
            }));
        }
    }
    (floods, outcomes)
}

/// During the flood: a new connection for the practice, then twenty rounds
/// of submit, pull and ack, each answered within 10 s. Returns the rounds
/// served and the peak RSS seen.
async fn well_behaved_rounds(
    prison: &mut pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    endpoint: &str,
    certs: &Path,
    pid: u32,
) -> (u32, u64) {
    let mut practice = tokio::time::timeout(
        Duration::from_secs(10),
        throughcare::cli::client::handover(endpoint, certs, "YG002"),
    )
    .await
    .expect("a new connection during the flood")
    .unwrap();
    let mut peak = 0;
    let mut served = 0;
    for n in 5..25 {
        let call = async {
            prison.submit(well_behaved(n)).await?;
            let got = practice.pull(pull(10)).await?.into_inner();
            for d in got.deliveries {
                practice
                    .ack(pb::AckRequest {
                        delivery_id: d.delivery_id,
                        attempt: d.attempt,
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a well-behaved call is answered during the flood")
            .expect("and succeeds");
        served += 1;
        peak = peak.max(rss_kib(pid));
    }
    (served, peak)
}
