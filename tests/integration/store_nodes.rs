//! Several gateway nodes on one PostgreSQL database (docs/store-engines.md):
//! two stores opened on the same database, as two nodes would, with the
//! same key files. Pulls racing from both never lease one delivery twice
//! and keep each patient's order; sweeps racing from both quarantine and
//! report each delivery once; a submit on one node wakes a long poll on the
//! other (LISTEN/NOTIFY); and the audit trail is one chain that verifies.
//! Skipped (loudly) without the test cluster `tests/run` starts.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use throughcare::journey::JourneyEvent;
use throughcare::store::{
    Clock, DeliveryState, ManualClock, NewDelivery, NewHandover, PatientIds, Store, StoreOptions,
    TrackKey,
};

use crate::support;

/// A node: a store on database `url` with the key files in `dir`.
fn node(url: &str, dir: &Path, clock: Arc<dyn Clock>, max_attempts: u32) -> Store {
    open(url, dir, clock, max_attempts, false).unwrap()
}

/// A node on a manual clock that has taken three handovers for YG001.
async fn node_with_three_handovers(url: &str, dir: &Path) -> Store {
    let a = node(url, dir, Arc::new(ManualClock::new(1_000_000)), 5);
    for m in 0..3 {
        a.submit(handover(m, m, "YG001", None)).await.unwrap();
    }
    a
}

/// Opens a node, asking for a synchronous standby when `require_standby`.
fn open(
    url: &str,
    dir: &Path,
    clock: Arc<dyn Clock>,
    max_attempts: u32,
    require_standby: bool,
) -> Result<Store, throughcare::store::StoreError> {
    let options = StoreOptions {
        max_attempts,
        ..support::key_files(dir)
    };
    support::pg_node(url, dir, clock, options, require_standby)
}

fn handover(message: u32, patient: u32, mailbox: &str, due_ms: Option<i64>) -> NewHandover {
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: format!("m{message}"),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(format!("p{patient}")),
            prison: None,
            dob: None,
        },
        claim_keys: Vec::new(),
        requested_destinations: vec![mailbox.into()],
        destinations: vec![NewDelivery {
            mailbox: mailbox.into(),
            due_ms,
            ..NewDelivery::default()
        }],
        payload: format!("document {message}").into_bytes(),
        supersede: false,
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
    }
}

/// Pulls from `store` until `total` deliveries were acknowledged by all
/// pullers together; records (delivery id, attempt, patient) of each lease.
async fn puller(store: Store, leases: Arc<Mutex<Vec<(u64, u32, String)>>>, total: usize) -> usize {
    let mut acked = 0;
    for _ in 0..2_000 {
        if leases.lock().unwrap().len() >= total {
            break;
        }
        let got = store
            .pull("urn:ods:YG001", "YG001", 3, 60_000)
            .await
            .unwrap();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        for l in &got {
            leases.lock().unwrap().push((
                l.delivery.id,
                l.delivery.attempt,
                l.delivery.patient_key.clone(),
            ));
        }
        for l in got {
            store
                .ack("urn:ods:YG001", "YG001", l.delivery.id, l.delivery.attempt)
                .await
                .unwrap();
            acked += 1;
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_never_lease_one_delivery_twice_and_keep_each_patients_order() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = node(&url, dir.path(), clock.clone(), 5);
    let b = node(&url, dir.path(), clock.clone(), 5);
    const TOTAL: u32 = 60;
    for m in 0..TOTAL {
        let on = if m % 2 == 0 { &a } else { &b };
        on.submit(handover(m, m % 12, "YG001", None)).await.unwrap();
    }
    let leases = Arc::new(Mutex::new(Vec::new()));
    let pullers: Vec<_> = [&a, &a, &b, &b]
        .into_iter()
        .map(|s| tokio::spawn(puller(s.clone(), leases.clone(), TOTAL as usize)))
        .collect();
    let mut acked = 0;
    for p in pullers {
        acked += p.await.unwrap();
    }
    let leases = leases.lock().unwrap().clone();
    assert_eq!(acked, TOTAL as usize, "every delivery acknowledged once");
    let ids: HashSet<u64> = leases.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        ids.len(),
        leases.len(),
        "no delivery leased twice: {leases:?}"
    );
    assert!(leases.iter().all(|(_, attempt, _)| *attempt == 1));
    // Each patient's deliveries were leased in the order they were sent.
    let mut by_patient: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, _, patient) in &leases {
        by_patient.entry(patient).or_default().push(*id);
    }
    for (patient, order) in by_patient {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "patient {patient} out of order");
    }
    // One chain across both nodes, verified from either.
    let entries = a.verify_audit().unwrap();
    assert_eq!(b.verify_audit().unwrap(), entries);
    assert_eq!(
        entries,
        u64::from(TOTAL) * 3,
        "submit, pull and ack of each"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_sweeps_on_two_nodes_act_on_each_delivery_once() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let manual = ManualClock::new(1_000_000);
    let clock: Arc<dyn Clock> = Arc::new(manual.clone());
    let a = node(&url, dir.path(), clock.clone(), 1);
    let b = node(&url, dir.path(), clock.clone(), 1);
    for m in 0..20 {
        a.submit(handover(m, m, "YG001", None)).await.unwrap();
    }
    for m in 20..40 {
        b.submit(handover(m, m, "YG002", Some(1_000_050)))
            .await
            .unwrap();
    }
    // Leased on their only allowed attempt, and left to expire.
    assert_eq!(
        a.pull("urn:ods:YG001", "YG001", 50, 10)
            .await
            .unwrap()
            .len(),
        20
    );
    manual.advance(100);
    let (sa, sb) = tokio::join!(a.sweep(), b.sweep());
    let (sa, sb) = (sa.unwrap(), sb.unwrap());
    assert_eq!(sa.quarantined + sb.quarantined, 20);
    assert_eq!(sa.newly_overdue.len() + sb.newly_overdue.len(), 20);
    let again = a.sweep().await.unwrap();
    assert_eq!((again.quarantined, again.newly_overdue.len()), (0, 0));
    let quarantines = a
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "quarantine")
        .count();
    assert_eq!(quarantines, 20, "each quarantine audited once");
    assert_eq!(a.quarantined(Some("YG001"), 100).unwrap().len(), 20);
    b.verify_audit().unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_on_one_node_wakes_a_long_poll_on_the_other() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = node(&url, dir.path(), clock.clone(), 5);
    let b = node(&url, dir.path(), clock.clone(), 5);
    let signal = b.mailbox_signal("YG003");
    // Give b's listener time to have subscribed (it wakes everyone when it does).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let woken = signal.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    a.submit(handover(1, 1, "YG003", None)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("node b's poll is woken by node a's submit");
    assert_eq!(
        b.pull("urn:ods:YG003", "YG003", 5, 1_000)
            .await
            .unwrap()
            .len(),
        1
    );
    // A node wakes only the mailbox named: another stays asleep.
    let other = b.mailbox_signal("YG004");
    let quiet = other.notified();
    tokio::pin!(quiet);
    quiet.as_mut().enable();
    a.submit(handover(2, 2, "YG005", None)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), quiet)
            .await
            .is_err()
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// `throughcare admin audit verify` for a gateway configured for PostgreSQL.
fn admin_audit(url: &str, dir: &Path, verb: &str) -> std::process::Output {
    admin_audit_with(url, dir, &[verb])
}

/// `admin audit ARGS` on database `url` with the key files in `dir`.
fn admin_audit_with(url: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(support::BIN)
        .args(["admin", "audit"])
        .args(args)
        .env("THROUGHCARE_STORE_ENGINE", "postgres")
        .env("THROUGHCARE_STORE_POSTGRES_URL", url)
        .env("THROUGHCARE_DATA_DIR", dir.join("data"))
        .env("THROUGHCARE_MASTER_KEY_FILE", dir.join("master-key"))
        .env(
            "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
            dir.join("audit-key"),
        )
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_audit_verify_reads_the_database_chain_and_finds_a_rewrite() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = node_with_three_handovers(&url, dir.path()).await;
    a.close().await.unwrap();
    let out = admin_audit(&url, dir.path(), "verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verifies: 3 entries"), "{text}");
    // Rewrite one entry's outcome in the database: the chain breaks there.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE audit SET entry = convert_to(replace(convert_from(entry, 'UTF8'), '\"ok\"', '\"ok!\"'), 'UTF8') WHERE seq = 2",
            &[],
        )
        .await
        .unwrap();
    let out = admin_audit(&url, dir.path(), "verify");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does NOT verify"), "{err}");
}

/// `admin audit verify --checkpoint FILE` on PostgreSQL.
fn verify_against(url: &str, dir: &Path, checkpoint: &Path) -> std::process::Output {
    let checkpoint = checkpoint.to_str().unwrap();
    admin_audit_with(url, dir, &["verify", "--checkpoint", checkpoint])
}

/// The database's own backups can bring back an older chain, or someone
/// with access can cut its end: a checkpoint recorded outside finds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_recorded_outside_finds_a_database_set_back() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = node_with_three_handovers(&url, dir.path()).await;
    let out = admin_audit(&url, dir.path(), "anchor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let signed: throughcare::audit::SignedCheckpoint = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(signed.checkpoint.audit_seq, 3);
    let recorded = dir.path().join("checkpoint.json");
    std::fs::write(&recorded, &line).unwrap();
    a.submit(handover(3, 3, "YG001", None)).await.unwrap();
    a.close().await.unwrap();
    let out = verify_against(&url, dir.path(), &recorded);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Set back to before the checkpoint (as a restore of an older backup
    // would): the chain alone still verifies, the checkpoint says no.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("DELETE FROM audit WHERE seq >= 3", &[])
        .await
        .unwrap();
    assert!(admin_audit(&url, dir.path(), "verify").status.success());
    let out = verify_against(&url, dir.path(), &recorded);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does NOT verify") && err.contains("checkpoint"),
        "{err}"
    );
    // A checkpoint another key signed proves nothing and is refused.
    let forged = line.replace(&signed.signature, &"0".repeat(signed.signature.len()));
    std::fs::write(&recorded, forged).unwrap();
    let out = verify_against(&url, dir.path(), &recorded);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed"));
}

/// The one lock-order exception (docs/store-engines.md): an ack locks the
/// older copy its delivery superseded after its own row. Another session
/// holding the older copy and then asking for the newer one deadlocks with
/// it; PostgreSQL rolls the ack back (it waited first), and the engine runs
/// it again instead of failing the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_chosen_as_a_deadlock_victim_is_run_again() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = node(&url, dir.path(), clock, 5);
    let older = a.submit(handover(1, 7, "YG001", None)).await.unwrap();
    let mut correction = handover(2, 7, "YG001", None);
    correction.supersede = true;
    let newer = a.submit(correction).await.unwrap();
    let (old_id, new_id) = (older.deliveries[0].1, newer.deliveries[0].1);
    let leased = a.pull("urn:ods:YG001", "YG001", 5, 60_000).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].delivery.id, new_id);

    let (mut other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let held = other.transaction().await.unwrap();
    held.execute(
        "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
        &[&i64::try_from(old_id).unwrap()],
    )
    .await
    .unwrap();
    let acking = {
        let a = a.clone();
        tokio::spawn(async move { a.ack("urn:ods:YG001", "YG001", new_id, 1).await })
    };
    // Let the ack lock its row and wait for the older one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = held
        .execute(
            "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
            &[&i64::try_from(new_id).unwrap()],
        )
        .await;
    held.rollback().await.unwrap();
    acking
        .await
        .unwrap()
        .expect("the ack is run again after PostgreSQL rolled it back");
    let status = a
        .track("urn:ods:YP001", "YP001", TrackKey::MessageId("m2".into()))
        .await
        .unwrap();
    assert_eq!(status.deliveries[0].state, DeliveryState::Delivered);
    a.verify_audit().unwrap();
    a.close().await.unwrap();
}

/// Sealed at rest on PostgreSQL as on sled: the database holds neither the
/// document nor its data key in clear, and a payload whose sealed bytes
/// were changed in the database is refused, not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_holds_payloads_sealed_and_a_changed_one_is_refused() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = node(&url, dir.path(), clock, 5);
    let receipt = a.submit(handover(1, 1, "YG001", None)).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT data_key, sealed FROM payloads", &[])
        .await
        .unwrap();
    let (data_key, sealed): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
    let clear = b"document 1";
    assert!(!sealed.windows(clear.len()).any(|w| w == clear));
    assert!(data_key.len() > 32, "the data key is stored wrapped");
    let leased = a.pull("urn:ods:YG001", "YG001", 1, 60_000).await.unwrap();
    assert_eq!(a.payload(&leased[0].handover).await.unwrap(), clear);
    client
        .execute(
            "UPDATE payloads SET sealed = set_byte(sealed, 30, get_byte(sealed, 30) # 255) \
             WHERE handover_id = $1",
            &[&i64::try_from(receipt.handover_id).unwrap()],
        )
        .await
        .unwrap();
    let err = a.payload(&leased[0].handover).await.unwrap_err();
    assert!(err.to_string().contains("fails authentication"), "{err}");
    a.close().await.unwrap();
}

/// An OK on PostgreSQL means two machines only when the primary waits for a
/// synchronous standby: a primary that names none is refused at open unless
/// the operator accepted one machine's durability (the test cluster is one
/// server; `store_failover.rs` opens with a standby and the check on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_a_synchronous_standby_is_refused_unless_accepted() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(throughcare::store::SystemClock);
    let refused = open(&url, dir.path(), clock.clone(), 3, true);
    let why = refused
        .err()
        .expect("refused without a synchronous standby")
        .to_string();
    assert!(
        why.contains("store.postgres_require_synchronous_standby"),
        "{why}"
    );
    assert!(why.contains("synchronous_standby_names"), "{why}");
    let accepted = node(&url, dir.path(), clock, 3);
    accepted.close().await.unwrap();
}

/// A node whose witness is `dir/witness` (as a gateway's is).
fn open_witnessed(
    url: &str,
    dir: &Path,
    clock: Arc<dyn Clock>,
) -> Result<Store, throughcare::store::StoreError> {
    let options = StoreOptions {
        witness_dir: Some(dir.join("witness")),
        ..support::key_files(dir)
    };
    support::pg_node(url, dir, clock, options, false)
}

/// A database restored from an older backup behind a node's back: the
/// node's witness (outside the database) refuses it until an operator
/// decides, audited, to go on from what the database holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_database_set_back_behind_its_witness_until_accepted() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = open_witnessed(&url, dir.path(), clock.clone()).unwrap();
    for m in 0..3 {
        a.submit(handover(m, m, "YG001", None)).await.unwrap();
    }
    a.postgres().unwrap().record_witness().await.unwrap();
    a.submit(handover(3, 3, "YG001", None)).await.unwrap();
    // Recorded once more as it closes: the witness has seen entry 4.
    a.close().await.unwrap();
    let a = open_witnessed(&url, dir.path(), clock.clone()).unwrap();
    a.close().await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("DELETE FROM audit WHERE seq >= 4", &[])
        .await
        .unwrap();
    let err = open_witnessed(&url, dir.path(), clock.clone())
        .err()
        .expect("a node refuses a database behind its witness");
    assert!(
        matches!(err, throughcare::store::StoreError::Witness(_))
            && err.to_string().contains("older backup"),
        "{err}"
    );
    accept_rollback(&url, dir.path(), "restored from backup, ticket 123");
    let a = open_witnessed(&url, dir.path(), clock).unwrap();
    let decision = a
        .audit_entries()
        .unwrap()
        .into_iter()
        .find(|e| e.action == "accept_rollback")
        .expect("the decision is audited");
    assert!(
        decision.outcome.contains("ticket 123"),
        "{}",
        decision.outcome
    );
    // Ids go on from a new range: none handed out before the restore (a
    // recipient may hold its delivery id, a sender its receipt) again.
    let next = a.submit(handover(4, 4, "YG001", None)).await.unwrap();
    assert_eq!(next.handover_id, (1 << 40) + 1);
    assert!(next.deliveries.iter().all(|(_, d)| *d > 1 << 40));
    a.close().await.unwrap();
    a_second_older_restore_goes_on_from_the_range_after(&url, dir.path()).await;
}

/// `admin store accept-rollback` on the PostgreSQL engine, as the node in
/// `dir` would run it.
fn accept_rollback(url: &str, dir: &Path, reason: &str) {
    let out = std::process::Command::new(support::BIN)
        .args(["admin", "store", "accept-rollback", "--reason", reason])
        .env("THROUGHCARE_STORE_ENGINE", "postgres")
        .env("THROUGHCARE_STORE_POSTGRES_URL", url)
        .env("THROUGHCARE_DATA_DIR", dir.join("data"))
        .env("THROUGHCARE_MASTER_KEY_FILE", dir.join("master-key"))
        .env(
            "THROUGHCARE_INTEGRITY_AUDIT_KEY_FILE",
            dir.join("audit-key"),
        )
        .env("THROUGHCARE_INTEGRITY_WITNESS_DIR", dir.join("witness"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The backup from before the first rollback restored again (its counters
/// below the new range): ids go on from the range after the one the
/// witness saw handed out, not from the same range again.
async fn a_second_older_restore_goes_on_from_the_range_after(url: &str, dir: &Path) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let accepted: i64 = client
        .query_one(
            "SELECT min(seq) FROM audit WHERE action = 'accept_rollback'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute("DELETE FROM audit WHERE seq >= $1", &[&accepted])
        .await
        .unwrap();
    client
        .execute(
            "UPDATE counters SET last_handover = 3, last_delivery = 3",
            &[],
        )
        .await
        .unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(2_000_000));
    assert!(open_witnessed(url, dir, clock.clone()).is_err());
    accept_rollback(url, dir, "restored the older backup again, ticket 124");
    let a = open_witnessed(url, dir, clock).unwrap();
    let next = a.submit(handover(5, 5, "YG001", None)).await.unwrap();
    assert_eq!(next.handover_id, (2 << 40) + 1);
    a.close().await.unwrap();
}

/// The entry a node's witness saw may be missing only behind a retention
/// cut signed by the audit key: one written by anyone with database access
/// but without the key (its signature forged) is no reason, and the node
/// refuses to open, as it refuses a database set back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_an_entry_it_saw_removed_behind_a_forged_cut() {
    let Some(url) = support::postgres_database("store_nodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
    let a = open_witnessed(&url, dir.path(), clock.clone()).unwrap();
    for m in 0..3 {
        a.submit(handover(m, m, "YG001", None)).await.unwrap();
    }
    // The witness has seen the last entry.
    a.postgres().unwrap().record_witness().await.unwrap();
    a.close().await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let seen: i64 = client
        .query_one("SELECT max(seq) FROM audit", &[])
        .await
        .unwrap()
        .get(0);
    // A later row stays (the trail still reaches past what was seen); the
    // entry seen goes, behind a cut whose signature is not the key's.
    client
        .execute(
            "INSERT INTO audit (seq, at_ms, action, entry) SELECT seq + 1, at_ms, action, entry FROM audit WHERE seq = $1",
            &[&seen],
        )
        .await
        .unwrap();
    client
        .execute("DELETE FROM audit WHERE seq <= $1", &[&seen])
        .await
        .unwrap();
    let cut = serde_json::json!({
        "first_kept": seen + 1,
        "prev_hash": "0".repeat(64),
        "before_ms": 2_000_000,
        "at_ms": 2_000_000,
        "keyed_from": 1,
        "signature": "0".repeat(128),
    });
    client
        .execute(
            "UPDATE retention_state SET audit_cut = $1",
            &[&tokio_postgres::types::Json(cut)],
        )
        .await
        .unwrap();
    let err = open_witnessed(&url, dir.path(), clock)
        .err()
        .expect("a node refuses an entry it saw removed behind a forged cut");
    assert!(
        matches!(err, throughcare::store::StoreError::Witness(_))
            && err.to_string().contains("missing from the database"),
        "{err}"
    );
}
