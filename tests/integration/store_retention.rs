//! Retention on PostgreSQL (docs/store-engines.md, "Retention"): through the
//! real server, with short periods from the configuration and a manual
//! clock, the gateway's own pass shreds a delivered payload (its row gone
//! from the database), removes the tracking data leaving a tombstone that
//! Track answers from, expires the patient's identity records, and removes
//! old audit entries behind a signed cut that `admin audit verify` checks;
//! and two nodes racing their passes do each piece of work once. Skipped
//! (loudly) without the test cluster `tests/run` starts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use throughcare::grpc::pb;
use throughcare::journey::JourneyEvent;
use throughcare::store::{Clock, ManualClock, NewDelivery, NewHandover, PatientIds, Store};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{self, Engine, T0, TestGateway, release};

const GRACE_S: u64 = 60;
const METADATA_S: u64 = 120;
const TOMBSTONE_S: u64 = 600;

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Waits (real time, at most 20 s) until `check` holds: the gateway's own
/// retention pass runs every 100 ms.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 20 s");
}

async fn db(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn count(client: &tokio_postgres::Client, query: &str) -> i64 {
    client.query_one(query, &[]).await.unwrap().get(0)
}

async fn track(
    client: &mut pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>,
    handover: pb::track_request::Handover,
) -> Result<pb::TrackResponse, tonic::Status> {
    client
        .track(pb::TrackRequest {
            handover: Some(handover),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `throughcare admin audit verify` against the gateway's database and keys.
fn admin_audit_verify(url: &str, data_dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(support::BIN)
        .args(["admin", "audit", "verify"])
        .env("THROUGHCARE_STORE_ENGINE", "postgres")
        .env("THROUGHCARE_STORE_POSTGRES_URL", url)
        .env("THROUGHCARE_DATA_DIR", data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Periods of seconds, and a pass every 100 ms.
fn short_retention(c: &mut throughcare::config::Config) {
    c.retention.payload_grace_seconds = GRACE_S;
    c.retention.metadata_seconds = METADATA_S;
    c.retention.tombstone_seconds = TOMBSTONE_S;
    c.retention.audit_seconds = Some(METADATA_S);
    c.retention.interval_ms = 100;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_on_postgres_through_the_real_server() {
    let Some((gw, clock)) = TestGateway::manual_on(Engine::Postgres, short_retention).await else {
        return;
    };
    let url = gw.config.store.postgres_url.clone().unwrap();
    let sql = db(&url).await;
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("kept-briefly", 1, &["YG001"], "retention marker"))
        .await
        .unwrap()
        .into_inner();
    let hid = receipt.handover_id;
    for who in ["YG001", "YPR01"] {
        support::pull_and_ack(&mut gw.client(who).await).await;
    }
    let by_message = || pb::track_request::Handover::MessageId("kept-briefly".into());
    let t = track(&mut prison, by_message()).await.unwrap();
    assert!(t.finished_at.is_some() && t.content_removed_at.is_none());
    let payload_rows = format!("SELECT count(*) FROM payloads WHERE handover_id = {hid}");
    assert_eq!(count(&sql, &payload_rows).await, 1);

    // Past the grace: the gateway's pass deletes the sealed payload and its
    // wrapped key; Track and break-glass say so.
    clock.advance(i64::try_from(GRACE_S).unwrap() * 1_000 + 1_000);
    eventually("the payload is shredded", || async {
        count(&sql, &payload_rows).await == 0
    })
    .await;
    let t = track(&mut prison, by_message()).await.unwrap();
    assert!(t.content_removed_at.is_some(), "{t:?}");
    let mut op = gw.operator().await;
    let err = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: hid,
            reason: "checking what the practice received last week".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::NotFound, "CONTENT_REMOVED_UNDER_RETENTION".to_owned())
    );

    let status = removed_after_the_metadata_period(&gw, &clock, &sql, hid).await;

    // Entries older than the audit period went behind a signed cut; what
    // is left verifies, in the gateway and with the admin command.
    assert!(status.audit_entries_removed > 0, "{status:?}");
    let verified = gw.store.verify_audit_from().unwrap();
    assert_eq!(verified.from, status.audit_entries_removed + 1);
    let entries = gw.store.audit_entries().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.action == "expire" && e.handover_id == Some(hid))
    );
    assert!(entries.iter().any(|e| e.action == "audit_prune"));
    let (ok, text) = admin_audit_verify(&url, &gw.config.data_dir);
    assert!(ok && text.contains("from entry"), "{text}");

    // A metadata period later, nothing of the patient is held.
    clock.advance(i64::try_from(METADATA_S).unwrap() * 1_000 + 1_000);
    eventually("the patient's lineage is removed", || async {
        count(&sql, "SELECT count(*) FROM lineage").await == 0
    })
    .await;
    assert!(
        gw.store
            .audit_entries()
            .unwrap()
            .iter()
            .any(|e| e.action == "identity_expire")
    );
    // Removing the oldest entry kept, without moving the cut, is found. A
    // prune pass still finishing can move the cut past the deleted entry
    // after the delete (the trail then rightly verifies from beyond it, as
    // the verify says): only then is the next oldest removed and the check
    // repeated. A failure must name the gap: the entry after the one removed.
    let mut found = None;
    for _ in 0..50 {
        let removed = sql
            .query_opt(
                "DELETE FROM audit WHERE seq = (SELECT min(seq) FROM audit) RETURNING seq",
                &[],
            )
            .await
            .unwrap()
            .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap());
        let Some(seq) = removed else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (ok, text) = admin_audit_verify(&url, &gw.config.data_dir);
        if !ok {
            assert!(
                text.contains(&format!("broken at entry {}", seq + 1)),
                "entry {seq} removed: {text}"
            );
            found = Some(text);
            break;
        }
        let first_kept: u64 = text
            .split(" from entry ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            first_kept > seq,
            "entry {seq} removed before the cut and not found: {text}"
        );
    }
    assert!(found.is_some(), "no entry kept could be removed");
    gw.stop().await;
}

/// Past the metadata period: the records go, a tombstone stays, and Track
/// answers the sender from it by message id and by handover id; returns
/// what operators then see.
async fn removed_after_the_metadata_period(
    gw: &TestGateway,
    clock: &ManualClock,
    sql: &tokio_postgres::Client,
    hid: u64,
) -> pb::RetentionStatusResponse {
    let mut prison = gw.client("YP001").await;
    let by_message = || pb::track_request::Handover::MessageId("kept-briefly".into());
    let mut op = gw.operator().await;
    // Had a copy gone through MESH, the edge's record of it (ids and
    // states) is tracking data too, and goes with it.
    let delivery = gw.store.handover(hid).unwrap().unwrap().deliveries[0];
    support::record_a_mesh_send(&gw.store, hid, delivery, clock.now_ms()).await;
    clock.advance(i64::try_from(METADATA_S - GRACE_S).unwrap() * 1_000);
    eventually("the tracking data is removed", || async {
        count(
            sql,
            &format!("SELECT count(*) FROM handovers WHERE id = {hid}"),
        )
        .await
            == 0
    })
    .await;
    assert_eq!(
        count(
            sql,
            &format!("SELECT count(*) FROM deliveries WHERE handover_id = {hid}")
        )
        .await,
        0
    );
    assert!(gw.store.mesh_record(delivery).unwrap().is_none());
    // Its message id is not accepted again while the tombstone is held.
    let err = prison
        .submit(release("kept-briefly", 1, &["YG001"], "retention marker"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::AlreadyExists, "MESSAGE_ID_RETIRED".to_owned())
    );
    for key in [by_message(), pb::track_request::Handover::HandoverId(hid)] {
        let err = track(&mut prison, key).await.unwrap_err();
        assert_eq!(
            (err.code(), reason(&err)),
            (Code::NotFound, "REMOVED_UNDER_RETENTION".to_owned())
        );
    }
    // Another sender learns nothing: the answer for an id never issued.
    let err = track(
        &mut gw.client("YP002").await,
        pb::track_request::Handover::HandoverId(hid),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&err), "UNKNOWN_HANDOVER");
    let status = op
        .retention_status(pb::RetentionStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            status.payloads_shredded,
            status.metadata_removed,
            status.tombstones
        ),
        (1, 1, 1)
    );
    status
}

/// A node on database `url` with the key files in `dir`, on `clock`.
fn node(url: &str, dir: &Path, clock: Arc<dyn Clock>) -> Store {
    support::pg_node(url, dir, clock, support::key_files(dir), false).unwrap()
}

fn handover(message: u32) -> NewHandover {
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: format!("m{message}"),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(format!("p{message}")),
            prison: Some(format!("q{message}")),
            dob: None,
        },
        claim_keys: Vec::new(),
        destinations: vec![NewDelivery {
            mailbox: "YG001".into(),
            ..NewDelivery::default()
        }],
        payload: format!("document {message}").into_bytes(),
        requested_destinations: vec!["YG001".into()],
        supersede: false,
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_retention_passes_act_once() {
    let Some(url) = support::postgres_database("store_retention") else {
        return;
    };
    const N: u32 = 40;
    const DAY_MS: i64 = 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let a = node(&url, dir.path(), Arc::new(clock.clone()));
    let b = node(&url, dir.path(), Arc::new(clock.clone()));
    let mut shredded = 0;
    let mut removed = 0;
    let mut identities = 0;
    for round in 0..3 {
        for m in 0..N {
            a.submit(handover(round * N + m)).await.unwrap();
        }
        for l in b.pull("urn:ods:YG001", "YG001", 500, 60_000).await.unwrap() {
            let d = l.delivery;
            a.ack("urn:ods:YG001", "YG001", d.id, d.attempt)
                .await
                .unwrap();
        }
        // Past the grace in round 0 (shred only), past the metadata period
        // after that (removal; the identity checks come due a period later).
        clock.advance(if round == 0 { 4 * DAY_MS } else { 85 * DAY_MS });
        let (x, y) = tokio::join!(a.retention(), b.retention());
        let (x, y) = (x.unwrap(), y.unwrap());
        shredded += x.shredded + y.shredded;
        removed += x.metadata_removed + y.metadata_removed;
        identities += x.identities_removed + y.identities_removed;
    }
    let entries = a.audit_entries().unwrap();
    let acted = |action: &str| entries.iter().filter(|e| e.action == action).count();
    // Every handover shredded and removed once, and the first two rounds'
    // patients forgotten once (a metadata period after their removal): by
    // either node, never both.
    let n = N as usize;
    assert_eq!((shredded, acted("shred")), (3 * n, 3 * n));
    assert_eq!((removed, acted("expire")), (3 * n, 3 * n));
    assert_eq!((identities, acted("identity_expire")), (2 * n, 2 * n));
    let stats = b.retention_stats().await.unwrap();
    let n = u64::from(N);
    assert_eq!(
        (
            stats.payloads_shredded,
            stats.metadata_removed,
            stats.tombstones,
            stats.identities_expiring
        ),
        (3 * n, 3 * n, 3 * n, n)
    );
    a.verify_audit().unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// An idle gateway whose whole trail is past the audit period: the cut
/// keeps the newest entry, so the chain goes on from it and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_entirely_past_the_audit_period_still_verifies_after_the_cut() {
    let Some(url) = support::postgres_database("store_retention") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let a = node(&url, dir.path(), Arc::new(clock.clone()));
    for m in 0..3 {
        a.submit(handover(m)).await.unwrap();
    }
    clock.advance(9 * 366 * 86_400_000);
    let pass = a.retention().await.unwrap();
    assert_eq!(pass.audit_removed, 2, "all but the newest entry");
    let verified = a.verify_audit_from().unwrap();
    assert_eq!((verified.from, verified.entries), (3, 2));
    a.submit(handover(9)).await.unwrap();
    assert_eq!(a.verify_audit_from().unwrap().entries, 3);
    a.close().await.unwrap();
}

/// A patient known first by NHS number, then by prison number, then by both
/// (the two keys merged into one): once nothing of theirs is tracked, every
/// identity record goes, the merged key's included. Before, PostgreSQL
/// checked the key each handover was filed under (an alias after the
/// merge, never checked again) and never deleted alias records, so the
/// identifier hashes stayed for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_patients_identity_records_all_expire_on_postgres() {
    let Some((gw, clock)) = TestGateway::manual_on(Engine::Postgres, short_retention).await else {
        return;
    };
    let url = gw.config.store.postgres_url.clone().unwrap();
    let sql = db(&url).await;
    let mut prison = gw.client("YP001").await;
    for (id, by_nhs, by_prison) in [
        ("m-1", true, false),
        ("m-2", false, true),
        ("m-3", true, true),
    ] {
        let s = throughcare::clinical::synthetic::release_summary(
            by_nhs.then(|| support::nhs(51).parse().unwrap()),
            by_prison.then(|| "A5151AA".parse().unwrap()),
            "YP001".parse().unwrap(),
            Some("YG001".parse().unwrap()),
            "merge",
        );
        prison
            .submit(throughcare::cli::client::native_submit(
                id,
                pb::JourneyEvent::Release,
                &[],
                &s,
            ))
            .await
            .unwrap();
    }
    let merged = "SELECT count(*) FROM patients WHERE record ? 'merged_into'";
    assert_eq!(count(&sql, merged).await, 1, "two keys, one patient");
    for who in ["YG001", "YPR01"] {
        support::pull_and_ack(&mut gw.client(who).await).await;
    }
    clock.advance(i64::try_from(METADATA_S * 3).unwrap() * 1_000);
    eventually("the tracking data is removed", || async {
        count(&sql, "SELECT count(*) FROM handovers").await == 0
    })
    .await;
    // A metadata period after the last of it, the patient's identity.
    clock.advance(i64::try_from(METADATA_S).unwrap() * 1_000 + 1_000);
    eventually(
        "every identity record of the patient is removed",
        || async {
            count(&sql, "SELECT count(*) FROM patients").await == 0
                && count(&sql, "SELECT count(*) FROM identities").await == 0
        },
    )
    .await;
    gw.stop().await;
}
