//! Crash test: the real binary is killed with SIGKILL at random moments while
//! clients submit and a practice pulls and acks; it is restarted each time on
//! the same data directory. Afterwards every submit that got OK has been
//! delivered, nothing was delivered that was never submitted, and a delivery
//! was repeated only if its ack had not returned OK.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use throughcare::grpc::pb;

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

struct Server {
    child: Option<Child>,
    /// The server's stderr, kept so a refusal to start says why.
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, &[])
    }

    /// Started with extra arguments (e.g. `--config FILE`).
    fn start_with(dir: &Path, port: u16, extra: &[&std::ffi::OsStr]) -> Self {
        let log = dir.join("gateway-stderr.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("stderr log opens");
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // Never the default metrics port: other tests run real binaries too.
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("gateway starts");
        Self {
            child: Some(child),
            log,
        }
    }

    /// Waits until it answers a call; panics if it exits instead (refused
    /// to open its store) or takes longer than 30 s.
    async fn wait_serving(&mut self, endpoint: &str, certs: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                panic!(
                    "the gateway refused to start after a kill -9: {status}; its last words: {tail:?}"
                );
            }
            assert!(Instant::now() < deadline, "the gateway did not start");
            if let Ok(mut c) = throughcare::cli::client::handover(endpoint, certs, "YP001").await
                && c.track(pb::TrackRequest {
                    handover: Some(pb::track_request::Handover::HandoverId(u64::MAX)),
                })
                .await
                .is_err_and(|e| e.code() == tonic::Code::NotFound)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(c.wait().unwrap().success(), "graceful stop");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[derive(Default)]
struct Ledger {
    attempted: BTreeSet<String>,
    ok: BTreeSet<String>,
    /// The consumer's history, in order: (message, acked OK?).
    pulls: Vec<(String, bool)>,
}

async fn connect(
    endpoint: &str,
    certs: &Path,
    name: &str,
) -> pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel> {
    loop {
        if let Ok(c) = throughcare::cli::client::handover(endpoint, certs, name).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submitter(
    id: usize,
    endpoint: String,
    certs: PathBuf,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut client = connect(&endpoint, &certs, "YP001").await;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let message = format!("c{id}-m{n}");
        n += 1;
        ledger.lock().unwrap().attempted.insert(message.clone());
        // Retry with the same message id until it is acknowledged.
        loop {
            // One patient per message: this test is about durability, and a
            // newer release for the same patient would supersede an older one.
            let patient = (id * 10_000 + n) as u32;
            let request = support::release(&message, patient, &["YG001"], &message);
            match client.submit(request).await {
                Ok(_) => {
                    ledger.lock().unwrap().ok.insert(message.clone());
                    break;
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    client = connect(&endpoint, &certs, "YP001").await;
                }
            }
        }
    }
}

async fn consume_once(
    client: &mut pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    ledger: &Mutex<Ledger>,
) -> Result<usize, tonic::Status> {
    let pulled = client
        .pull(pb::PullRequest {
            max_deliveries: 20,
            lease: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200000000,
            }),
            format: pb::DocumentFormat::Native.into(),
        })
        .await?
        .into_inner()
        .deliveries;
    let n = pulled.len();
    for d in pulled {
        let message = support::text_of(&d);
        let acked = client
            .ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .is_ok();
        ledger.lock().unwrap().pulls.push((message, acked));
    }
    Ok(n)
}

async fn consumer(
    endpoint: String,
    certs: PathBuf,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut client = connect(&endpoint, &certs, "YG001").await;
    while !stop.load(Ordering::SeqCst) {
        if consume_once(&mut client, &ledger).await.is_err() {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client = connect(&endpoint, &certs, "YG001").await;
        }
    }
}

/// Lets the consumer drain everything, including leases cut off by kills,
/// stops it, then pulls until nothing is left behind.
async fn drain(
    ledger: &Arc<Mutex<Ledger>>,
    consumer: tokio::task::JoinHandle<()>,
    stop_consuming: &AtomicBool,
    endpoint: &str,
    certs: &Path,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: BTreeSet<String> = {
            let l = ledger.lock().unwrap();
            l.pulls.iter().map(|(m, _)| m.clone()).collect()
        };
        let ok = ledger.lock().unwrap().ok.clone();
        if ok.is_subset(&delivered) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_consuming.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("consumer stops")
        .unwrap();
    // Nothing left behind.
    let mut client = connect(endpoint, certs, "YG001").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    while consume_once(&mut client, ledger).await.unwrap() > 0 {}
}

/// Before stopping: explains (prints what the gateway says of) any
/// acknowledged submit that was not delivered.
async fn explain_undelivered(ledger: &Arc<Mutex<Ledger>>, endpoint: &str, certs: &Path) {
    let missing: Vec<String> = {
        let l = ledger.lock().unwrap();
        let received: BTreeSet<&String> = l.pulls.iter().map(|(m, _)| m).collect();
        l.ok.iter()
            .filter(|m| !received.contains(m))
            .cloned()
            .collect()
    };
    if !missing.is_empty() {
        let mut prison = connect(endpoint, certs, "YP001").await;
        for m in missing.iter().take(5) {
            let t = prison
                .track(pb::TrackRequest {
                    handover: Some(pb::track_request::Handover::MessageId(m.clone())),
                })
                .await;
            println!("undelivered {m}: {t:?}");
        }
    }
}

/// An ack can commit and the process die before its answer leaves: the
/// consumer saw a failure, yet the delivery is rightly not offered again.
/// Asks the gateway which of the never-acked-OK deliveries it holds as
/// delivered.
async fn delivered_without_answer(
    ledger: &Arc<Mutex<Ledger>>,
    endpoint: &str,
    certs: &Path,
) -> BTreeSet<String> {
    let unconfirmed: Vec<String> = {
        let l = ledger.lock().unwrap();
        let acked_ok: BTreeSet<&String> = l
            .pulls
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(m, _)| m)
            .collect();
        let pulled: BTreeSet<&String> = l.pulls.iter().map(|(m, _)| m).collect();
        l.ok.iter()
            .filter(|m| pulled.contains(m) && !acked_ok.contains(m))
            .cloned()
            .collect()
    };
    let mut delivered_without_answer = BTreeSet::new();
    let mut prison = connect(endpoint, certs, "YP001").await;
    for m in unconfirmed {
        let t = prison
            .track(pb::TrackRequest {
                handover: Some(pb::track_request::Handover::MessageId(m.clone())),
            })
            .await
            .unwrap()
            .into_inner();
        // Only the practice's copy: the probation region's copy of each
        // release is never pulled in this test.
        if t.deliveries
            .iter()
            .filter(|d| d.destination == "YG001")
            .all(|d| d.state == i32::from(pb::DeliveryState::Delivered))
        {
            delivered_without_answer.insert(m);
        }
    }
    delivered_without_answer
}

/// The ledger's verdict: nothing delivered again after its ack returned OK,
/// every acknowledged submit delivered, nothing delivered that was never
/// submitted, and enough work done to mean something.
fn no_submit_lost_none_after_its_ack(l: &Ledger, delivered_without_answer: &BTreeSet<String>) {
    let mut times_pulled: BTreeMap<&str, usize> = BTreeMap::new();
    let mut acked: BTreeSet<&str> = BTreeSet::new();
    for (m, ok) in &l.pulls {
        assert!(
            !acked.contains(m.as_str()),
            "{m} was delivered again after its ack returned OK"
        );
        *times_pulled.entry(m).or_default() += 1;
        if *ok {
            acked.insert(m);
        }
    }
    for m in &l.ok {
        assert!(
            acked.contains(m.as_str()) || delivered_without_answer.contains(m),
            "acknowledged submit {m} was never delivered"
        );
    }
    for m in times_pulled.keys() {
        assert!(
            l.attempted.contains(*m),
            "{m} was delivered but never submitted"
        );
    }
    let repeats = times_pulled.values().filter(|n| **n > 1).count();
    println!(
        "{} submits acknowledged, {} attempted, {} deliveries, {} redelivered after a crash or lost ack",
        l.ok.len(),
        l.attempted.len(),
        l.pulls.len(),
        repeats
    );
    assert!(
        l.ok.len() > 50,
        "the test did too little work to mean anything"
    );
}

/// The kill -9 tests run one at a time: each drives a real binary through
/// restarts with bounded waits, and two at once on two cores starve both.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_submits_survive_kill_9() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    throughcare::certs::init_dev_pki(&dir.path().join("certs")).unwrap();
    let certs = dir.path().join("certs");
    let port = support::free_port();
    let endpoint = format!("https://localhost:{port}");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}");
    let mut rng = Rng(seed);

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop_submitting = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let mut server = Server::start(dir.path(), port);
    let mut tasks = Vec::new();
    for id in 0..12 {
        tasks.push(tokio::spawn(submitter(
            id,
            endpoint.clone(),
            certs.clone(),
            stop_submitting.clone(),
            ledger.clone(),
        )));
    }
    let consumer = tokio::spawn(consumer(
        endpoint.clone(),
        certs.clone(),
        stop_consuming.clone(),
        ledger.clone(),
    ));

    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(400 + rng.next(1_200))).await;
        server.kill9();
        let ok = ledger.lock().unwrap().ok.len();
        println!("round {round}: killed with {ok} submits acknowledged so far");
        server = Server::start(dir.path(), port);
        server.wait_serving(&endpoint, &certs).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_submitting.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("submitters finish")
            .unwrap();
    }
    drain(&ledger, consumer, &stop_consuming, &endpoint, &certs).await;
    explain_undelivered(&ledger, &endpoint, &certs).await;
    let delivered_without_answer = delivered_without_answer(&ledger, &endpoint, &certs).await;
    server.stop();

    println!(
        "{} deliveries acked by the gateway whose answer the crash cut off",
        delivered_without_answer.len()
    );
    no_submit_lost_none_after_its_ack(&ledger.lock().unwrap(), &delivered_without_answer);

    let out = support::audit_verify(&dir.path().join("data"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Audit entries removed under a 2 s audit period while the binary is killed
/// with SIGKILL at random moments: every restart opens (the entry the
/// witness anchors was never removed, and the signed cut agrees with the
/// trail on disk), and at the end the trail verifies from its cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_cut_survives_kill_9() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    throughcare::certs::init_dev_pki(&certs).unwrap();
    let config = dir.path().join("short.toml");
    std::fs::write(
        &config,
        "[retention]\npayload_grace_seconds = 1\nmetadata_seconds = 2\ntombstone_seconds = 2\naudit_seconds = 2\nkey_epoch_seconds = 1\ninterval_ms = 100\n",
    )
    .unwrap();
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    let port = support::free_port();
    let endpoint = format!("https://localhost:{port}");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("retention crash test seed {seed}");
    let mut rng = Rng(seed);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut server = Server::start_with(dir.path(), port, &args);
    server.wait_serving(&endpoint, &certs).await;
    let mut tasks = Vec::new();
    for id in 0..4 {
        tasks.push(tokio::spawn(submitter(
            id,
            endpoint.clone(),
            certs.clone(),
            stop.clone(),
            ledger.clone(),
        )));
    }
    tasks.push(tokio::spawn(consumer(
        endpoint.clone(),
        certs.clone(),
        stop.clone(),
        ledger.clone(),
    )));
    // Past the audit period first, so that every kill can land in a pass
    // that removes entries.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300 + rng.next(1_200))).await;
        server.kill9();
        server = Server::start_with(dir.path(), port, &args);
        server.wait_serving(&endpoint, &certs).await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("clients finish")
            .unwrap();
    }
    server.stop();
    let out = support::audit_verify(&dir.path().join("data"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("from entry"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ledger.lock().unwrap().ok.len() > 20, "too little work");
}

/// The snapshots sled keeps in `sled_dir` (`snap.<lsn in hex>`), by lsn.
fn sled_snapshots(sled_dir: &Path) -> Vec<u64> {
    let mut lsns: Vec<u64> = std::fs::read_dir(sled_dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .collect();
    lsns.sort_unstable();
    lsns
}

/// A clean stop has sled write the snapshot its next start reads (sled 0.34
/// writes one only while it opens, so without it the next start reads every
/// segment written since the last), and the store opened after it holds
/// everything stored before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_sled_a_snapshot_of_what_it_stored() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    throughcare::certs::init_dev_pki(&certs).unwrap();
    let sled_dir = dir.path().join("data").join("sled");
    let port = support::free_port();
    let endpoint = format!("https://localhost:{port}");
    let mut server = Server::start(dir.path(), port);
    server.wait_serving(&endpoint, &certs).await;
    let mut prison = connect(&endpoint, &certs, "YP001").await;
    for i in 0..20u32 {
        let message = format!("snapshot-{i}");
        prison
            .submit(support::release(&message, 700 + i, &["YG001"], &message))
            .await
            .unwrap();
    }
    let before = sled_snapshots(&sled_dir);
    server.stop();
    let after = sled_snapshots(&sled_dir);
    assert!(
        after.last() > before.last(),
        "a clean stop leaves a snapshot newer than the start's: before {before:x?}, after {after:x?}"
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        !log.contains("could not write a snapshot"),
        "the snapshot at close failed: {log}"
    );

    let mut server = Server::start(dir.path(), port);
    server.wait_serving(&endpoint, &certs).await;
    let mut practice = connect(&endpoint, &certs, "YG001").await;
    let mut markers: Vec<String> = support::pull_and_ack(&mut practice)
        .await
        .iter()
        .map(support::text_of)
        .collect();
    markers.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("snapshot-{i}")).collect();
    expected.sort();
    assert_eq!(
        markers, expected,
        "every release is there after the restart"
    );
    server.stop();
}
