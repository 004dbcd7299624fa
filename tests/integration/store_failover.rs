//! Failover of the PostgreSQL engine (docs/store-engines.md): a primary
//! and a synchronous standby of its own (initdb, pg_basebackup, pg_ctl on
//! 127.0.0.1 ports, as the `postgres` user), and two gateway nodes: the
//! real binary, started twice (`serve` on two ports, one connection string
//! naming both hosts with `target_session_attrs=read-write`, the same key
//! files). Submitters and pullers call both nodes over gRPC with mutual
//! TLS. The primary is killed with SIGKILL mid-load and the standby
//! promoted; both nodes must serve again without a restart. Then: no
//! acknowledged handover is lost, no acknowledged delivery is handed out
//! again, no handover is stored twice, and `admin audit verify` passes.
//! Every loop and call is bounded, and the nodes and the cluster are
//! stopped on every path (on drop). Needs the PostgreSQL that `tests/run`
//! makes available.
//!
//! The negative check: with [`SYNC_OFF_ENV`] set, the standby replicates
//! asynchronously and the nodes accept one machine's durability; the same
//! assertions then fail (acknowledged work is lost with the primary).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use throughcare::grpc::pb;
use tonic::transport::Channel;

use crate::support;

/// Set (to anything) to run the test against an asynchronous standby: it
/// must then fail, which shows that its assertions can.
pub const SYNC_OFF_ENV: &str = "THROUGHCARE_FAILOVER_ASYNC_STANDBY";

type Client = pb::handover_service_client::HandoverServiceClient<Channel>;

const CLUSTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg-cluster");

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a PostgreSQL program as the server's user; panics on failure.
fn as_server(program: &Path, args: &[&str]) -> String {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster(args: &[&str]) -> String {
    let out = Command::new(CLUSTER).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pg-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A primary with a synchronous standby; both stopped when dropped.
struct Pair {
    bin: PathBuf,
    primary: PathBuf,
    standby: PathBuf,
    ports: (u16, u16),
}

impl Pair {
    /// With `synchronous` false, the standby replicates asynchronously:
    /// the negative check (see [`SYNC_OFF_ENV`]).
    fn start(dir: &Path, synchronous: bool) -> Self {
        let bin = PathBuf::from(cluster(&["bindir"]));
        let (p1, p2) = (support::free_port(), support::free_port());
        let (primary, standby) = (dir.join("primary"), dir.join("standby"));
        if is_root() {
            Command::new("chown")
                .args(["postgres:", dir.to_str().unwrap()])
                .status()
                .unwrap();
        }
        cluster(&["start", primary.to_str().unwrap(), &p1.to_string()]);
        as_server(
            &bin.join("pg_basebackup"),
            &[
                "-D",
                standby.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "-d",
                &format!("host=127.0.0.1 port={p1} user=postgres application_name=standby"),
            ],
        );
        let conf = standby.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "port = {p2}\nunix_socket_directories = '{}'\n",
            standby.display()
        ));
        std::fs::write(&conf, text).unwrap();
        cluster(&["start", standby.to_str().unwrap(), &p2.to_string()]);
        let pair = Pair {
            bin,
            primary,
            standby,
            ports: (p1, p2),
        };
        // Only now, so the standby's copy of the settings does not wait for
        // a standby of its own once promoted.
        let wanted = if synchronous {
            pair.sql(p1, "ALTER SYSTEM SET synchronous_standby_names = 'standby'");
            pair.sql(p1, "SELECT pg_reload_conf()");
            "sync"
        } else {
            "async"
        };
        for _ in 0..100 {
            let state = pair.sql(
                p1,
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'",
            );
            if state.trim() == wanted {
                return pair;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the standby never became {wanted}");
    }

    /// Runs SQL on the node at `port` through a client of its own thread.
    fn sql(&self, port: u16, sql: &str) -> String {
        let sql = sql.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut out = String::new();
                for m in client.simple_query(&sql).await.unwrap() {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        out.push_str(r.get(0).unwrap_or(""));
                        out.push('\n');
                    }
                }
                out
            })
        })
        .join()
        .unwrap()
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write connect_timeout=2",
            self.ports.0, self.ports.1
        )
    }

    /// SIGKILL to the primary's postmaster: no shutdown, no checkpoint.
    fn kill_primary(&self) {
        let pid = std::fs::read_to_string(self.primary.join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_owned();
        assert!(
            Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Stops the standby (fast shutdown): with it named synchronous, the
    /// primary then holds every commit until it is back.
    fn stop_standby(&self) {
        cluster(&["stop", self.standby.to_str().unwrap()]);
    }

    fn start_standby(&self) {
        cluster(&[
            "start",
            self.standby.to_str().unwrap(),
            &self.ports.1.to_string(),
        ]);
    }

    fn promote_standby(&self) {
        as_server(
            &self.bin.join("pg_ctl"),
            &["-D", self.standby.to_str().unwrap(), "-w", "promote"],
        );
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = Command::new(CLUSTER)
            .args(["stop", self.standby.to_str().unwrap()])
            .output();
        let _ = Command::new(CLUSTER)
            .args(["stop", self.primary.to_str().unwrap()])
            .output();
    }
}

/// A gateway process (`throughcare serve`) on the pair, killed on drop.
struct Node {
    server: support::Server,
    endpoint: String,
    log: PathBuf,
}

/// What every node shares: the database, the key files and the dev PKI.
struct Cluster {
    url: String,
    dir: PathBuf,
    synchronous: bool,
}

impl Cluster {
    fn node(&self, name: &str) -> Node {
        self.node_with(name, &[])
    }

    /// A node with some settings of its own (`THROUGHCARE_*` variables).
    fn node_with(&self, name: &str, settings: &[(&str, &str)]) -> Node {
        let port = support::free_port();
        let keys = self.dir.join("keys");
        let log = self.dir.join(format!("{name}.log"));
        let child = Command::new(support::BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.join(name))
            .arg("--certs-dir")
            .arg(self.dir.join("certs"))
            .env("THROUGHCARE_STORE_ENGINE", "postgres")
            .env("THROUGHCARE_STORE_POSTGRES_URL", &self.url)
            .env("THROUGHCARE_STORE_POSTGRES_KEEPS_EVERYTHING", "true")
            .env(
                "THROUGHCARE_STORE_POSTGRES_REQUIRE_SYNCHRONOUS_STANDBY",
                self.synchronous.to_string(),
            )
            .env("THROUGHCARE_MASTER_KEY_FILE", keys.join("master-key"))
            .env(
                "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
                keys.join("audit-key"),
            )
            .env("THROUGHCARE_PATIENT_KEY_FILE", keys.join("patient-key"))
            .env("RUST_LOG", "warn")
            .envs(settings.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the gateway starts");
        Node {
            server: support::Server(child),
            endpoint: format!("https://127.0.0.1:{port}"),
            log,
        }
    }

    fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `throughcare admin audit verify` for these nodes' configuration.
    fn audit_verify(&self) -> std::process::Output {
        let keys = self.dir.join("keys");
        Command::new(support::BIN)
            .args(["admin", "audit", "verify"])
            .env("THROUGHCARE_STORE_ENGINE", "postgres")
            .env("THROUGHCARE_STORE_POSTGRES_URL", &self.url)
            .env("THROUGHCARE_STORE_POSTGRES_KEEPS_EVERYTHING", "true")
            .env("THROUGHCARE_DATA_DIR", self.dir.join("admin"))
            .env("THROUGHCARE_MASTER_KEY_FILE", keys.join("master-key"))
            .env(
                "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
                keys.join("audit-key"),
            )
            .output()
            .unwrap()
    }
}

impl Node {
    /// Panics with its last words if it exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.server.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            panic!(
                "gateway {} exited: {status}; its last words: {tail:?}",
                self.endpoint
            );
        }
    }

    /// Waits (at most 60 s) until it answers a call.
    async fn wait_serving(&mut self, certs: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            assert!(Instant::now() < deadline, "{} did not start", self.endpoint);
            if let Ok(mut c) =
                throughcare::cli::client::handover(&self.endpoint, certs, "YP002").await
                && c.track(pb::TrackRequest {
                    handover: Some(pb::track_request::Handover::HandoverId(u64::MAX)),
                })
                .await
                .is_err_and(|e| e.code() == tonic::Code::NotFound)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn client(endpoint: &str, certs: &Path, name: &str) -> Client {
    for _ in 0..100 {
        if let Ok(c) = throughcare::cli::client::handover(endpoint, certs, name).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no connection to {endpoint}");
}

/// Release `n` from YP002 (a prison with no probation region, so one
/// delivery per handover) to YG001; the same content every time it is sent.
fn release(n: u32) -> pb::SubmitRequest {
    let summary = throughcare::clinical::synthetic::release_summary(
        support::nhs(n).parse().ok(),
        None,
        "YP002".parse().unwrap(),
        None,
        &format!("m{n}"),
    );
    throughcare::cli::client::native_submit(
        &format!("m{n}"),
        pb::JourneyEvent::Release,
        &["YG001"],
        &summary,
    )
}

/// Bounds every call: a node whose database is away answers late or not.
async fn within<T>(call: impl std::future::Future<Output = Result<T, tonic::Status>>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .ok()
        .and_then(Result::ok)
}

/// What the workload was told.
#[derive(Default)]
struct Ledger {
    /// message number → handover id, for every submit answered OK.
    submitted: BTreeMap<u32, u64>,
    /// Submits that failed (outcome unknown): retried after the failover.
    unsure: Vec<u32>,
    /// Deliveries whose ack was answered OK.
    acked: HashSet<u64>,
    /// Acks that failed (outcome unknown): repeated after the failover.
    unsure_acks: Vec<(u64, u32)>,
    /// Acknowledged deliveries handed out again (must stay empty).
    returned: Vec<u64>,
    /// Per node: submits and acks answered OK after the promotion.
    served_after: BTreeMap<(usize, &'static str), u64>,
    /// Set once the standby is promoted.
    promoted: bool,
}

impl Ledger {
    /// Whether each node has answered a submit and an ack since the promotion.
    fn both_served(&self) -> bool {
        [(0, "submit"), (0, "ack"), (1, "submit"), (1, "ack")]
            .iter()
            .all(|k| self.served_after.get(k).copied().unwrap_or(0) > 0)
    }

    fn served(&mut self, node: usize, what: &'static str) {
        if self.promoted {
            *self.served_after.entry((node, what)).or_default() += 1;
        }
    }
}

async fn submitter(
    mut c: Client,
    node: usize,
    ledger: Arc<Mutex<Ledger>>,
    first: u32,
    stop: Arc<AtomicBool>,
) {
    let mut n = first;
    while !stop.load(Ordering::Relaxed) {
        match within(c.submit(release(n))).await {
            Some(r) => {
                let mut l = ledger.lock().unwrap();
                l.submitted.insert(n, r.into_inner().handover_id);
                l.served(node, "submit");
            }
            None => {
                ledger.lock().unwrap().unsure.push(n);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        n += 4;
    }
}

fn pull_request() -> pb::PullRequest {
    pb::PullRequest {
        lease: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..support::pull(5)
    }
}

async fn puller(mut c: Client, node: usize, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(got) = within(c.pull(pull_request())).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let got = got.into_inner().deliveries;
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for d in got {
            if ledger.lock().unwrap().acked.contains(&d.delivery_id) {
                ledger.lock().unwrap().returned.push(d.delivery_id);
            }
            let ack = pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            };
            let acked = within(c.ack(ack)).await;
            let mut l = ledger.lock().unwrap();
            if acked.is_some() {
                l.acked.insert(d.delivery_id);
                l.served(node, "ack");
            } else {
                l.unsure_acks.push((d.delivery_id, d.attempt));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_primary_mid_load_loses_nothing_acknowledged() {
    if support::postgres_database("store_failover").is_none() {
        return;
    }
    let synchronous = std::env::var_os(SYNC_OFF_ENV).is_none();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(dir.path(), synchronous);
    let cluster = Cluster {
        url: pair.url(),
        dir: dir.path().to_path_buf(),
        synchronous,
    };
    // The first node makes the dev PKI and the key files; the second uses them.
    let mut a = cluster.node("node-a");
    a.wait_serving(&cluster.certs()).await;
    let mut b = cluster.node("node-b");
    b.wait_serving(&cluster.certs()).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, node) in [&a, &b].into_iter().enumerate() {
        for first in [i as u32, i as u32 + 2] {
            let c = client(&node.endpoint, &cluster.certs(), "YP002").await;
            load.push(tokio::spawn(submitter(
                c,
                i,
                ledger.clone(),
                first,
                stop.clone(),
            )));
        }
        let c = client(&node.endpoint, &cluster.certs(), "YG001").await;
        load.push(tokio::spawn(puller(c, i, ledger.clone(), stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let before = ledger.lock().unwrap().submitted.len();
    pair.kill_primary();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.promote_standby();
    ledger.lock().unwrap().promoted = true;
    // The load runs on for 4 s, and on (30 s at most) until each node has
    // answered a submit and an ack since the promotion.
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ledger.lock().unwrap().both_served() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("the workload stops")
            .unwrap();
    }
    report(&ledger, before);
    for node in [&mut a, &mut b] {
        node.assert_running();
    }
    assert!(before > 10, "load ran before the kill: {before}");
    {
        let l = ledger.lock().unwrap();
        assert!(
            l.both_served(),
            "each node answers submits and acks after the promotion, without a restart: {:?}",
            l.served_after
        );
    }
    settle(&a, &b, &cluster.certs(), &ledger).await;
    check(&a, &cluster.certs(), &ledger).await;
    let verify = cluster.audit_verify();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A node whose database cannot commit (its synchronous standby is gone, so
/// the primary holds every commit) cannot serve. Health answers
/// `NOT_SERVING` once nothing has passed the store for
/// `store.stall_seconds`, so a load balancer sends callers elsewhere, while
/// the submit in flight waits and is not acknowledged. With the standby
/// back, that submit is acknowledged and health answers `SERVING` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_not_serving_while_the_database_cannot_commit() {
    use tonic_health::pb::health_check_response::ServingStatus;
    if support::postgres_database("store_failover").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(dir.path(), true);
    let cluster = Cluster {
        url: pair.url(),
        dir: dir.path().to_path_buf(),
        synchronous: true,
    };
    let mut node = cluster.node_with("node-a", &[("THROUGHCARE_STORE_STALL_SECONDS", "2")]);
    node.wait_serving(&cluster.certs()).await;
    let channel = throughcare::cli::client::channel(&node.endpoint, &cluster.certs(), "YG001")
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut status = async || {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status()
    };
    assert_eq!(status().await, ServingStatus::Serving);

    pair.stop_standby();
    let mut c = client(&node.endpoint, &cluster.certs(), "YP002").await;
    let submit = tokio::spawn(async move { c.submit(release(9_001)).await });
    let stopped = Instant::now();
    while status().await != ServingStatus::NotServing {
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "health still answers SERVING while nothing can commit; replication: {:?}; node log:\n{}",
            pair.sql(
                pair.ports.0,
                "SELECT application_name, state, sync_state FROM pg_stat_replication"
            ),
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!submit.is_finished(), "no answer while the commit waits");

    pair.start_standby();
    let answered = tokio::time::timeout(Duration::from_secs(60), submit)
        .await
        .expect("the submit is answered once the standby is back")
        .unwrap();
    assert!(answered.is_ok(), "{answered:?}");
    let back = Instant::now();
    while status().await != ServingStatus::Serving {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "health never answered SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.assert_running();
}

fn report(ledger: &Arc<Mutex<Ledger>>, before: usize) {
    let l = ledger.lock().unwrap();
    eprintln!(
        "failover: {before} handovers acknowledged before the kill, {} by the end of the load; {} submits and {} acks with an unknown outcome, {} deliveries acknowledged; answered after the promotion: {:?}",
        l.submitted.len(),
        l.unsure.len(),
        l.unsure_acks.len(),
        l.acked.len(),
        l.served_after
    );
}

/// Retries every unsure submit (idempotent on the message id), repeats
/// every unsure ack, then pulls and acknowledges on both nodes until every
/// handover is delivered (bounded).
async fn settle(a: &Node, b: &Node, certs: &Path, ledger: &Arc<Mutex<Ledger>>) {
    let mut prison = client(&a.endpoint, certs, "YP002").await;
    let unsure = std::mem::take(&mut ledger.lock().unwrap().unsure);
    for n in unsure {
        let r = within(prison.submit(release(n)))
            .await
            .unwrap_or_else(|| panic!("m{n} is accepted after the failover"))
            .into_inner();
        let mut l = ledger.lock().unwrap();
        if let Some(id) = l.submitted.get(&n) {
            assert_eq!(*id, r.handover_id, "a retry is the same handover");
        }
        l.submitted.insert(n, r.handover_id);
    }
    // An ack whose reply was lost may have committed: repeating it says so
    // (a repeated ack of a delivered attempt succeeds); otherwise the
    // delivery is still due and is pulled again below.
    let mut gp = client(&b.endpoint, certs, "YG001").await;
    let unsure_acks = std::mem::take(&mut ledger.lock().unwrap().unsure_acks);
    for (delivery_id, attempt) in unsure_acks {
        let ack = pb::AckRequest {
            delivery_id,
            attempt,
        };
        if within(gp.ack(ack)).await.is_some() {
            ledger.lock().unwrap().acked.insert(delivery_id);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drains = [
        tokio::spawn(puller(
            client(&a.endpoint, certs, "YG001").await,
            0,
            ledger.clone(),
            stop.clone(),
        )),
        tokio::spawn(puller(gp, 1, ledger.clone(), stop.clone())),
    ];
    let total = ledger.lock().unwrap().submitted.len();
    for _ in 0..400 {
        if ledger.lock().unwrap().acked.len() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for d in drains {
        tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .expect("the drain stops")
            .unwrap();
    }
}

async fn check(a: &Node, certs: &Path, ledger: &Arc<Mutex<Ledger>>) {
    let (submitted, acked, returned) = {
        let l = ledger.lock().unwrap();
        (l.submitted.clone(), l.acked.clone(), l.returned.clone())
    };
    assert!(
        returned.is_empty(),
        "acknowledged deliveries came back: {returned:?}"
    );
    let mut prison = client(&a.endpoint, certs, "YP002").await;
    for (n, id) in &submitted {
        let track = pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId(format!("m{n}"))),
        };
        let status = within(prison.track(track))
            .await
            .unwrap_or_else(|| panic!("acknowledged handover m{n} lost"))
            .into_inner();
        assert_eq!(status.handover_id, *id);
        assert_eq!(status.deliveries.len(), 1);
        assert_eq!(status.deliveries[0].state(), pb::DeliveryState::Delivered);
    }
    // No handover stored twice: one per message id, ids without gaps.
    let ids: HashSet<u64> = submitted.values().copied().collect();
    assert_eq!(ids.len(), submitted.len());
    let max = ids.iter().max().copied().unwrap_or(0);
    assert_eq!(
        max as usize,
        ids.len(),
        "every handover is one the workload submitted"
    );
    assert_eq!(
        acked.len(),
        submitted.len(),
        "every handover delivered once"
    );
}
