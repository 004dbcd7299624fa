//! Failover of the PostgreSQL engine (docs/store-engines.md): a primary
//! and a synchronous standby of its own (initdb, pg_basebackup, pg_ctl on
//! 127.0.0.1 ports, as the `postgres` user), two nodes (stores) on both
//! hosts with `target_session_attrs=read-write`, a submit/pull/ack workload
//! on each; the primary is killed with SIGKILL mid-load and the standby
//! promoted. Then: no acknowledged handover is lost, no acknowledged
//! delivery is handed out again, no handover is stored twice, and the audit
//! chain verifies. Needs the PostgreSQL that `tests/run` makes available.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use throughcare::journey::JourneyEvent;
use throughcare::store::pg::PgOptions;
use throughcare::store::{
    NewDelivery, NewHandover, PatientIds, Store, StoreOptions, SystemClock, TrackKey,
};

use crate::support;

const CLUSTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg-cluster");
const LEASE_MS: i64 = 1_500;

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
    fn start(dir: &Path) -> Self {
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
        pair.sql(p1, "ALTER SYSTEM SET synchronous_standby_names = 'standby'");
        pair.sql(p1, "SELECT pg_reload_conf()");
        for _ in 0..100 {
            let state = pair.sql(
                p1,
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'",
            );
            if state.trim() == "sync" {
                return pair;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the standby never became synchronous");
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

fn handover(n: u32) -> NewHandover {
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: format!("m{n}"),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(format!("p{n}")),
            prison: None,
        },
        claim_keys: Vec::new(),
        requested_destinations: vec!["YG001".into()],
        destinations: vec![NewDelivery {
            mailbox: "YG001".into(),
            ..NewDelivery::default()
        }],
        payload: format!("document {n}").into_bytes(),
        supersede: false,
        trace_parent: None,
    }
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
}

async fn submitter(store: Store, ledger: Arc<Mutex<Ledger>>, first: u32, stop: Arc<AtomicBool>) {
    let mut n = first;
    while !stop.load(Ordering::Relaxed) {
        match store.submit(handover(n)).await {
            Ok(r) => {
                ledger.lock().unwrap().submitted.insert(n, r.handover_id);
            }
            Err(_) => {
                ledger.lock().unwrap().unsure.push(n);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        n += 2;
    }
}

async fn consumer(store: Store, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(got) = store.pull("urn:ods:YG001", "YG001", 5, LEASE_MS).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for leased in got {
            let (id, attempt) = (leased.delivery.id, leased.delivery.attempt);
            if ledger.lock().unwrap().acked.contains(&id) {
                ledger.lock().unwrap().returned.push(id);
            }
            let acked = store.ack("urn:ods:YG001", "YG001", id, attempt).await;
            let mut l = ledger.lock().unwrap();
            match acked {
                Ok(()) => {
                    l.acked.insert(id);
                }
                Err(_) => l.unsure_acks.push((id, attempt)),
            }
        }
    }
}

fn node(url: &str, dir: &Path) -> Store {
    let options = StoreOptions {
        master_key_file: Some(dir.join("master-key")),
        audit_key_file: Some(dir.join("audit-key")),
        ..StoreOptions::default()
    };
    let pg = PgOptions {
        url: url.to_owned(),
        ca_file: None,
        pool_size: 4,
        require_synchronous_standby: true,
    };
    Store::open_postgres(&pg, options, Arc::new(SystemClock), dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_primary_mid_load_loses_nothing_acknowledged() {
    if support::postgres_database("store_failover").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(dir.path());
    let keys = dir.path().join("keys");
    let (a, b) = (node(&pair.url(), &keys), node(&pair.url(), &keys));
    // A whole gateway (gRPC, mutual TLS) on the same database too: it must
    // serve again after the failover without a restart.
    let gateway = {
        let (url, keys) = (pair.url(), keys.clone());
        support::TestGateway::start_with(
            move |c| {
                support::use_postgres(c, &url);
                c.master_key_file = Some(keys.join("master-key"));
                c.integrity.audit_key_file = Some(keys.join("audit-key"));
            },
            Arc::new(SystemClock),
        )
        .await
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = vec![
        tokio::spawn(submitter(a.clone(), ledger.clone(), 0, stop.clone())),
        tokio::spawn(submitter(b.clone(), ledger.clone(), 1, stop.clone())),
    ];
    for s in [&a, &b] {
        load.push(tokio::spawn(consumer(
            s.clone(),
            ledger.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before = ledger.lock().unwrap().submitted.len();
    pair.kill_primary();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.promote_standby();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let after = ledger.lock().unwrap().submitted.len();
    {
        let l = ledger.lock().unwrap();
        eprintln!(
            "failover: {before} handovers acknowledged before the kill, {after} by the end of the load; {} submits and {} acks with an unknown outcome, {} deliveries acknowledged",
            l.unsure.len(),
            l.unsure_acks.len(),
            l.acked.len()
        );
    }
    assert!(before > 10, "load ran before the kill: {before}");
    assert!(
        after > before,
        "the nodes reconnected to the promoted standby"
    );
    settle(&a, &ledger).await;
    check(&a, &b, &ledger).await;
    through_the_gateway(&gateway).await;
    a.verify_audit().unwrap();
    gateway.stop().await;
}

/// A submit, pull and ack over gRPC on the gateway that was serving when
/// the primary died (a few tries while its pool replaces dead connections).
async fn through_the_gateway(gw: &support::TestGateway) {
    use throughcare::grpc::pb;
    let mut prison = gw.client("YP001").await;
    let submit = support::release("after-failover", 1, &["YG002"], "after failover");
    let mut receipt = None;
    for _ in 0..50 {
        match prison.submit(submit.clone()).await {
            Ok(r) => {
                receipt = Some(r.into_inner());
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let receipt = receipt.expect("the gateway serves again after the failover");
    let mut gp = gw.client("YG002").await;
    let got = support::pull_and_ack(&mut gp).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].handover_id, receipt.handover_id);
    let t = support::track_message(&mut prison, "after-failover").await;
    assert_eq!(t.deliveries[0].state(), pb::DeliveryState::Delivered);
}

/// Retries every unsure submit (idempotent on the message id), then pulls
/// and acknowledges until every handover is delivered.
async fn settle(store: &Store, ledger: &Arc<Mutex<Ledger>>) {
    let unsure = std::mem::take(&mut ledger.lock().unwrap().unsure);
    for n in unsure {
        let r = store.submit(handover(n)).await.unwrap();
        let mut l = ledger.lock().unwrap();
        if let Some(id) = l.submitted.get(&n) {
            assert_eq!(*id, r.handover_id, "a retry is the same handover");
        }
        l.submitted.insert(n, r.handover_id);
    }
    // An ack whose reply was lost may have committed: repeating it says so
    // (a repeated ack of a delivered attempt succeeds); otherwise the
    // delivery is still due and is pulled again below.
    let unsure_acks = std::mem::take(&mut ledger.lock().unwrap().unsure_acks);
    for (id, attempt) in unsure_acks {
        if store
            .ack("urn:ods:YG001", "YG001", id, attempt)
            .await
            .is_ok()
        {
            ledger.lock().unwrap().acked.insert(id);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drain = tokio::spawn(consumer(store.clone(), ledger.clone(), stop.clone()));
    let total = ledger.lock().unwrap().submitted.len();
    for _ in 0..300 {
        if ledger.lock().unwrap().acked.len() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    drain.await.unwrap();
}

async fn check(a: &Store, b: &Store, ledger: &Arc<Mutex<Ledger>>) {
    let (submitted, acked, returned) = {
        let l = ledger.lock().unwrap();
        (l.submitted.clone(), l.acked.clone(), l.returned.clone())
    };
    assert!(
        returned.is_empty(),
        "acknowledged deliveries came back: {returned:?}"
    );
    for (n, id) in &submitted {
        let status = a
            .track(
                "urn:ods:YP001",
                "YP001",
                TrackKey::MessageId(format!("m{n}")),
            )
            .await
            .unwrap_or_else(|e| panic!("acknowledged handover m{n} lost: {e}"));
        assert_eq!(status.handover.id, *id);
        assert_eq!(status.deliveries.len(), 1);
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
    let entries = a.verify_audit().unwrap();
    assert_eq!(b.verify_audit().unwrap(), entries);
}
