//! Retention end to end, over real mutual TLS with a manual clock: a
//! delivered payload is shredded a grace period after its ack (its key epoch
//! destroyed, so nothing in the data directory opens it), Track and
//! break-glass say so; tracking data goes after the metadata period and Track
//! says why; the audit chain still verifies; parked releases, quarantined
//! deliveries and superseded ones whose replacement is undelivered are kept;
//! identity links, lineage and refused links expire once nothing of the
//! patient's is tracked (the audit period itself: `audit_tamper.rs`).

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use support::*;
use throughcare::grpc::pb;
use throughcare::store::crypt::PayloadCipher;
use throughcare::store::{Clock, ManualClock, PatientIds};
use tonic::Code;
use tonic_types::StatusExt;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

type Client = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

async fn track(client: &mut Client, message_id: &str) -> Result<pb::TrackResponse, tonic::Status> {
    client
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId(message_id.into())),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn deliver_all(client: &mut Client) -> Vec<pb::Delivery> {
    let got = client.pull(pull(50)).await.unwrap().into_inner().deliveries;
    for d in &got {
        client
            .ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
    }
    got
}

/// Pulls and acks everything waiting for the GP `gp` and for probation (a
/// release from YP001 also goes to its region's probation service).
async fn deliver_release(gw: &TestGateway, gp: &str) -> usize {
    let mut n = 0;
    for who in [gp, "YPR01"] {
        n += deliver_all(&mut gw.client(who).await).await.len();
    }
    n
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Files of `dir` that hold `needle` anywhere.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        })
        .collect()
}

/// What sled holds for handover `id`, read with sled directly (gateway stopped):
/// (wrapped data key, sealed payload).
fn stored_secrets(data: &Path, id: u64) -> (Vec<u8>, Vec<u8>) {
    let db = support::open_sled(&data.join("sled"));
    let key = db
        .open_tree("data_keys")
        .unwrap()
        .get(id.to_be_bytes())
        .unwrap()
        .expect("a held payload has its data key")
        .to_vec();
    let mut sealed = Vec::new();
    for chunk in db
        .open_tree("payloads")
        .unwrap()
        .scan_prefix(id.to_be_bytes())
    {
        sealed.extend_from_slice(&chunk.unwrap().1[4..]);
    }
    (key, sealed)
}

fn epoch_files(data: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(&data.join("key-epochs"))
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

#[tokio::test]
async fn a_delivered_payload_is_shredded_after_the_grace_and_nothing_left_opens_it() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("keep-3-days", 1, &["YG001"], "retention marker"))
        .await
        .unwrap()
        .into_inner();
    let t = track(&mut prison, "keep-3-days").await.unwrap();
    assert_eq!(t.finished_at, None, "not finished while queued");
    assert_eq!(deliver_release(&gw, "YG001").await, 2);
    let t = track(&mut prison, "keep-3-days").await.unwrap();
    assert!(t.finished_at.is_some() && t.content_removed_at.is_none());

    // What would let anyone read it: its wrapped key, sealed chunks, epoch key.
    let (dir, config) = gw.stop().await;
    let data = config.data_dir.clone();
    let (wrapped, sealed) = stored_secrets(&data, receipt.handover_id);
    let epochs_before = epoch_files(&data);
    assert_eq!(epochs_before.len(), 1, "one key epoch so far");
    let gw = TestGateway::start_in(dir, config, Arc::new(clock.clone())).await;
    let mut prison = gw.client("YP001").await;

    clock.advance(3 * DAY_MS - 1_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 0, "still within the grace period");
    assert_eq!(pass.stats.payloads_in_grace, 1);
    clock.advance(2_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 1);
    assert_eq!(pass.stats.payloads_held, 0);
    assert_eq!(pass.stats.payloads_shredded, 1);
    let record = gw.store.handover(receipt.handover_id).unwrap().unwrap();
    assert!(
        record.payload_hash.is_empty(),
        "no digest of removed content"
    );

    // Track still answers, and says the content went and when.
    let t = track(&mut prison, "keep-3-days").await.unwrap();
    assert_eq!(t.deliveries[0].state(), pb::DeliveryState::Delivered);
    let removed = t.content_removed_at.expect("content removal is reported");
    assert_eq!(
        removed.seconds * 1_000,
        T0 + 3 * DAY_MS + 1_000,
        "removed at the pass after the grace"
    );
    // A break-glass read finds no content, says why, and is audited.
    let mut op = gw.operator().await;
    let err = op
        .break_glass_read(pb::BreakGlassReadRequest {
            handover_id: receipt.handover_id,
            reason: "checking what the practice received last week".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "CONTENT_REMOVED_UNDER_RETENTION");
    assert!(err.message().contains("retention policy"), "{err:?}");

    // The next pass destroys the epoch that wrapped its key.
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.epochs_destroyed, 1);
    let audit = gw.store.audit_entries().unwrap();
    assert!(audit.iter().any(|e| e.action == "shred"
        && e.handover_id == Some(receipt.handover_id)
        && e.actor == "urn:gateway:retention"));
    gw.store.verify_audit().unwrap();
    let (_dir, config) = gw.stop().await;

    // Raw scan: the epoch key is nowhere in the data directory, and
    // everything left there (master key, remaining epochs) opens nothing.
    for (path, bytes) in &epochs_before {
        assert!(!path.exists(), "{} was destroyed", path.display());
        assert!(holding(&data, bytes).is_empty(), "epoch key bytes remain");
    }
    let cipher = PayloadCipher::load_or_create(&data.join("master-key")).unwrap();
    cipher
        .open_epochs(&data.join("key-epochs"), T0 + 4 * DAY_MS)
        .unwrap();
    let err = cipher
        .open(receipt.handover_id, Some(&wrapped), &sealed)
        .unwrap_err();
    assert!(err.to_string().contains("destroyed key epoch"), "{err}");
    assert!(holding(&data, b"retention marker").is_empty());
    drop(config);
}

/// A handover is finished (its retention clock starts) only when its last
/// copy is: acknowledging the GP's copy, alone or in a batch with other
/// handovers' copies, leaves the one probation still holds waiting.
#[tokio::test]
async fn a_handover_is_finished_only_when_its_last_copy_is_acknowledged() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    for m in ["two-copies-a", "two-copies-b"] {
        let patient = if m.ends_with('a') { 1 } else { 2 };
        prison
            .submit(release(m, patient, &["YG001"], "finished marker"))
            .await
            .unwrap();
    }
    let mut gp = gw.client("YG001").await;
    let got = gp.pull(pull(50)).await.unwrap().into_inner().deliveries;
    assert_eq!(got.len(), 2, "one copy of each handover for the GP");
    // One by Ack, one inside an AckBatch.
    gp.ack(pb::AckRequest {
        delivery_id: got[0].delivery_id,
        attempt: got[0].attempt,
    })
    .await
    .unwrap();
    gp.ack_batch(pb::AckBatchRequest {
        attempts: vec![pb::DeliveryAttempt {
            delivery_id: got[1].delivery_id,
            attempt: got[1].attempt,
        }],
    })
    .await
    .unwrap();
    for m in ["two-copies-a", "two-copies-b"] {
        let t = track(&mut prison, m).await.unwrap();
        assert_eq!(t.deliveries.len(), 2, "{m}: the GP's copy and probation's");
        assert_eq!(t.finished_at, None, "{m}: probation's copy still waits");
    }
    assert_eq!(deliver_all(&mut gw.client("YPR01").await).await.len(), 2);
    for m in ["two-copies-a", "two-copies-b"] {
        let t = track(&mut prison, m).await.unwrap();
        assert!(t.finished_at.is_some(), "{m}: every copy delivered");
    }
}

#[tokio::test]
async fn tracking_data_goes_after_the_metadata_period_and_track_says_why() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    let receipt = prison
        .submit(release("keep-84-days", 2, &["YG001"], "metadata marker"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deliver_release(&gw, "YG001").await, 2);
    // Had the GP copy gone through MESH, the edge's record of it (ids and
    // states) is tracking data too.
    let gp_copy = receipt.deliveries[0].delivery_id;
    record_a_mesh_send(&gw.store, receipt.handover_id, gp_copy, clock.now_ms()).await;
    clock.advance(84 * DAY_MS - 1_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!((pass.shredded, pass.metadata_removed), (1, 0));
    assert!(track(&mut prison, "keep-84-days").await.is_ok());
    clock.advance(2_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.metadata_removed, 1);
    assert_eq!(pass.stats.tombstones, 1);
    assert!(gw.store.handover(receipt.handover_id).unwrap().is_none());
    assert!(gw.store.mesh_record(gp_copy).unwrap().is_none());

    // By message id and by handover id: NOT_FOUND, removed under the policy.
    let by_message = track(&mut prison, "keep-84-days").await.unwrap_err();
    let by_id = prison
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::HandoverId(receipt.handover_id)),
        })
        .await
        .unwrap_err();
    for err in [&by_message, &by_id] {
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(reason(err), "REMOVED_UNDER_RETENTION");
        assert!(err.message().contains("retention policy"), "{err:?}");
    }
    replaying_the_message_id_is_refused(&mut prison).await;
    // Another sender learns nothing about it: the answer is the one for an
    // id that never existed.
    let mut other = gw.client("YP002").await;
    let err = other
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::HandoverId(receipt.handover_id)),
        })
        .await
        .unwrap_err();
    let never = other
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::HandoverId(u64::MAX / 2)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "UNKNOWN_HANDOVER");
    assert_eq!((never.code(), reason(&never)), (err.code(), reason(&err)));
    assert_eq!(never.message(), err.message());
    // Operators see the counts.
    let status = gw
        .operator()
        .await
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
    assert_eq!(status.metadata_period.unwrap().seconds, 84 * 86_400);
    // The audit trail keeps every entry about it and still verifies.
    let audit = gw.store.audit_entries().unwrap();
    for action in ["submit", "pull", "ack", "shred", "expire"] {
        assert!(
            audit
                .iter()
                .any(|e| e.action == action && e.handover_id == Some(receipt.handover_id)),
            "{action} is still audited"
        );
    }
    gw.store.verify_audit().unwrap();
    a_query_by_handover_id_is_on_the_patients_trail(&gw, receipt.handover_id).await;
    // After the tombstone period Track answers as for an unknown handover.
    clock.advance(365 * DAY_MS);
    assert_eq!(gw.store.retention().await.unwrap().tombstones_removed, 1);
    let err = track(&mut prison, "keep-84-days").await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::NotFound, "UNKNOWN_HANDOVER".to_owned())
    );
    // With the tombstone gone, the message id is a new one.
    let again = prison
        .submit(release("keep-84-days", 2, &["YG001"], "metadata marker"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.handover_id, receipt.handover_id);
    gw.stop().await;
}

/// An operator's query of a trail by handover id is on the patient's
/// trail, though the handover record that named the patient is gone.
async fn a_query_by_handover_id_is_on_the_patients_trail(gw: &TestGateway, handover_id: u64) {
    let mut op = gw.operator().await;
    op.audit_trail(pb::AuditTrailRequest {
        subject: Some(pb::audit_trail_request::Subject::HandoverId(handover_id)),
        reason: "a complaint about one handover".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::NhsNumber(nhs(2))),
            reason: "who looked".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        trail
            .iter()
            .any(|e| e.action == "audit_query"
                && e.outcome.contains("a complaint about one handover")),
        "{trail:?}"
    );
}

/// While the tombstone is held, the message id is not accepted again: its
/// content cannot be compared, and an old summary replayed as new would
/// supersede a newer one not yet delivered.
async fn replaying_the_message_id_is_refused(prison: &mut Client) {
    let err = prison
        .submit(release("keep-84-days", 2, &["YG001"], "metadata marker"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::AlreadyExists, "MESSAGE_ID_RETIRED".to_owned())
    );
    assert!(err.message().contains("retention policy"), "{err:?}");
}

#[tokio::test]
async fn parked_and_quarantined_payloads_are_kept_until_resolved() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    let mut gp = gw.client("YG002").await;
    // A release with no known GP is parked.
    let parked = prison
        .submit(throughcare::cli::client::native_submit(
            "no-gp",
            pb::JourneyEvent::Release,
            &[],
            &throughcare::clinical::synthetic::release_summary(
                nhs(3).parse().ok(),
                None,
                "YP001".parse().unwrap(),
                None,
                "parked marker",
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parked.deliveries[0].destination, "@parked");
    // A delivery the practice cannot take is quarantined.
    let bad = prison
        .submit(release("unreadable", 4, &["YG002"], "quarantine marker"))
        .await
        .unwrap()
        .into_inner();
    let d = gp.pull(pull(5)).await.unwrap().into_inner().deliveries;
    gp.nack(pb::NackRequest {
        delivery_id: d[0].delivery_id,
        attempt: d[0].attempt,
        permanent: true,
        reason: "cannot file it".into(),
    })
    .await
    .unwrap();

    clock.advance(400 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!((pass.shredded, pass.metadata_removed), (0, 0));
    assert_eq!(pass.parked_past_period, 1, "a parked release escalates");
    assert_eq!(pass.stats.payloads_held, 2, "{pass:?} {parked:?} {bad:?}");
    let mut op = gw.operator().await;
    for id in [parked.handover_id, bad.handover_id] {
        op.break_glass_read(pb::BreakGlassReadRequest {
            handover_id: id,
            reason: "checking content is still held for the claim".into(),
        })
        .await
        .expect("content is still held");
    }
    assert_eq!(
        op.list_parked(pb::ListParkedRequest::default())
            .await
            .unwrap()
            .into_inner()
            .deliveries
            .len(),
        1
    );

    // Redriven and delivered, the quarantined one then follows the policy.
    op.redrive(pb::RedriveRequest {
        target: Some(pb::redrive_request::Target::Deliveries(pb::DeliveryIds {
            ids: vec![d[0].delivery_id],
        })),
    })
    .await
    .unwrap();
    // The practice's redriven delivery, and probation's copies of both
    // releases: the parked one is still not finished (its GP copy waits).
    assert_eq!(deliver_release(&gw, "YG002").await, 3);
    clock.advance(3 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 1);
    let t = track(&mut prison, "unreadable").await.unwrap();
    assert!(t.content_removed_at.is_some());
    assert!(
        gw.store
            .handover(parked.handover_id)
            .unwrap()
            .unwrap()
            .shredded_at_ms
            .is_none(),
        "the parked release is never removed"
    );
    // Rotated epochs rewrapped the held keys: the parked one still reads.
    gw.store.retention().await.unwrap();
    op.break_glass_read(pb::BreakGlassReadRequest {
        handover_id: parked.handover_id,
        reason: "checking content is still held after rotation".into(),
    })
    .await
    .expect("rewrapped under the newest epoch");
    gw.store.verify_audit().unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn a_superseded_payload_waits_for_its_replacement_to_be_delivered() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    let mut gp = gw.client("YG001").await;
    let old = prison
        .submit(release("first", 5, &["YG001"], "first version"))
        .await
        .unwrap()
        .into_inner();
    let new = prison
        .submit(release("second", 5, &["YG001"], "second version"))
        .await
        .unwrap()
        .into_inner();
    let t = track(&mut prison, "first").await.unwrap();
    assert_eq!(t.deliveries[0].state(), pb::DeliveryState::Superseded);
    clock.advance(10 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 0, "the replacement is not delivered yet");
    let got = deliver_all(&mut gp).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].handover_id, new.handover_id);
    assert!(
        track(&mut prison, "first")
            .await
            .unwrap()
            .finished_at
            .is_none(),
        "probation has not had the replacement yet"
    );
    assert_eq!(deliver_release(&gw, "YG001").await, 1);
    assert!(
        track(&mut prison, "first")
            .await
            .unwrap()
            .finished_at
            .is_some()
    );
    clock.advance(3 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 2);
    for id in [old.handover_id, new.handover_id] {
        assert!(
            gw.store
                .handover(id)
                .unwrap()
                .unwrap()
                .shredded_at_ms
                .is_some()
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn retention_config_is_checked_before_serving() {
    let err = throughcare::config::Config::from_toml(
        "[retention]\npayload_grace_seconds = 864000\nmetadata_seconds = 86400\n",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert_eq!(err.field, "retention.metadata_seconds");
    let clock = ManualClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let mut config = throughcare::config::Config {
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        ..throughcare::config::Config::default()
    };
    config.retention.batch = 0;
    let err = throughcare::app::Prepared::new(config, Arc::new(clock))
        .err()
        .expect("refused");
    assert_eq!(err.exit_code(), 64);
    assert!(!dir.path().join("data").exists(), "no store was opened");
}

/// A store written before retention existed: no index entries, no
/// `finished_at_ms`, no superseded links. The first passes find its
/// finished handovers and schedule them from when they finished.
#[tokio::test]
async fn handovers_stored_before_retention_are_found_and_scheduled() {
    use throughcare::journey::JourneyEvent;
    use throughcare::store::{NewDelivery, NewHandover, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let open =
        || Store::open(dir.path(), StoreOptions::default(), Arc::new(clock.clone())).unwrap();
    let store = open();
    let new = |message_id: &str| NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: message_id.into(),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some("p1".into()),
            prison: None,
            dob: None,
        },
        claim_keys: Vec::new(),
        requested_destinations: vec!["YG001".into()],
        destinations: vec![NewDelivery {
            mailbox: "YG001".into(),
            ..NewDelivery::default()
        }],
        payload: message_id.as_bytes().to_vec(),
        supersede: true,
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
    };
    store.submit(new("old-1")).await.unwrap();
    let leased = store
        .pull("urn:ods:YG001", "YG001", 1, 60_000)
        .await
        .unwrap();
    store
        .ack("urn:ods:YG001", "YG001", leased[0].delivery.id, 1)
        .await
        .unwrap();
    store.submit(new("old-2")).await.unwrap();
    store.submit(new("old-3")).await.unwrap(); // supersedes old-2
    store.close().await.unwrap();
    drop(store);
    // Make it look like a store from before retention.
    {
        let db = support::open_sled(&dir.path().join("sled"));
        db.open_tree("retention").unwrap().clear().unwrap();
        db.open_tree("superseded").unwrap().clear().unwrap();
        db.open_tree("meta")
            .unwrap()
            .remove("retention_backfill")
            .unwrap();
        let handovers = db.open_tree("handovers").unwrap();
        for entry in handovers.iter() {
            let (k, v) = entry.unwrap();
            let mut h: serde_json::Value = serde_json::from_slice(&v).unwrap();
            h.as_object_mut().unwrap().remove("finished_at_ms");
            handovers
                .insert(k, serde_json::to_vec(&h).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let store = open();
    let pass = store.retention().await.unwrap();
    assert_eq!(pass.stats.payloads_in_grace, 1, "old-1 was found finished");
    clock.advance(3 * DAY_MS);
    assert_eq!(store.retention().await.unwrap().shredded, 1);
    // old-2 waits for old-3, which is linked now and then delivered.
    let leased = store
        .pull("urn:ods:YG001", "YG001", 1, 60_000)
        .await
        .unwrap();
    assert_eq!(leased[0].handover.message_id, "old-3");
    store
        .ack("urn:ods:YG001", "YG001", leased[0].delivery.id, 1)
        .await
        .unwrap();
    clock.advance(3 * DAY_MS);
    assert_eq!(store.retention().await.unwrap().shredded, 2);
    store.verify_audit().unwrap();
    store.close().await.unwrap();
}

/// A patient's identity links, lineage and refused links go once nothing of
/// theirs has been tracked for the metadata period; a patient with a parked
/// release keeps everything, and a patient who comes back before then
/// keeps their links.
#[tokio::test]
async fn identity_records_expire_when_nothing_is_tracked_for_the_metadata_period() {
    use throughcare::store::{PARKED_MAILBOX, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = Store::open(
        &dir.path().join("data"),
        StoreOptions::default(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    // Delivered and forgotten; parked and waiting; delivered, then back.
    store
        .submit(identity_handover("a", "nhs-a", "prison-a", "YG001"))
        .await
        .unwrap();
    store
        .submit(identity_handover("b", "nhs-b", "prison-b", PARKED_MAILBOX))
        .await
        .unwrap();
    store
        .submit(identity_handover("c", "nhs-c", "prison-c", "YG001"))
        .await
        .unwrap();
    deliver_to_yg001(&store).await;
    // A refused link: prison-b already belongs to nhs-b.
    let refused = store
        .submit(identity_handover("x", "nhs-x", "prison-b", "YG001"))
        .await;
    assert!(refused.is_err());
    assert_eq!(store.identity_conflicts(10).unwrap().len(), 1);
    let held = store.retention().await.unwrap().stats.identity_records_held;
    // identities (2 each), patients and lineage (1 each) for a, b, c; the refusal.
    assert_eq!(held, 3 * 4 + 1);
    for id in ["prison-a", "prison-b", "prison-c"] {
        assert_eq!(
            store.patient_keys(id).unwrap()[0],
            id.replace("prison", "nhs")
        );
    }

    clock.advance(84 * DAY_MS + 1);
    let pass = store.retention().await.unwrap();
    assert_eq!(pass.metadata_removed, 2, "a and c are forgotten");
    assert_eq!(
        pass.conflicts_removed, 1,
        "the refusal is a metadata period old"
    );
    assert_eq!(
        pass.identities_removed, 0,
        "links stay a metadata period longer"
    );
    assert_eq!(pass.stats.identities_expiring, 2);
    // c comes back before its links expire.
    clock.advance(80 * DAY_MS);
    store
        .submit(identity_handover("c2", "nhs-c", "prison-c", "YG001"))
        .await
        .unwrap();
    clock.advance(5 * DAY_MS);
    let pass = store.retention().await.unwrap();
    assert_eq!(
        pass.identities_removed, 1,
        "only a: b is parked, c is tracked"
    );
    assert_eq!(store.patient_keys("prison-a").unwrap(), ["prison-a"]);
    assert_eq!(store.patient_keys("prison-b").unwrap()[0], "nhs-b");
    assert_eq!(store.patient_keys("prison-c").unwrap()[0], "nhs-c");
    assert!(store.identity_conflicts(10).unwrap().is_empty());
    let stats = pass.stats;
    assert_eq!(stats.identity_records_held, 2 * 4, "b and c");
    assert_eq!(stats.identity_records_removed, 4 + 1);
    // c's second handover delivered and forgotten: c goes too; b never does.
    deliver_to_yg001(&store).await;
    clock.advance(84 * DAY_MS + 1);
    assert_eq!(store.retention().await.unwrap().metadata_removed, 1);
    clock.advance(84 * DAY_MS + 1);
    let pass = store.retention().await.unwrap();
    assert_eq!(store.patient_keys("prison-c").unwrap(), ["prison-c"]);
    assert_eq!(pass.stats.identity_records_held, 4, "b's links, parked");
    assert_eq!(store.patient_keys("prison-b").unwrap()[0], "nhs-b");
    assert!(
        store
            .audit_entries()
            .unwrap()
            .iter()
            .filter(|e| e.action == "identity_expire")
            .count()
            == 2
    );
    store.verify_audit().unwrap();
    store.close().await.unwrap();
    // Nothing of a or c is left in the identity trees.
    drop(store);
    nothing_of_a_or_c_in_the_identity_trees(&dir.path().join("data").join("sled"));
}

/// A release from YP001 naming both identifiers, to `to`.
fn identity_handover(
    message_id: &str,
    nhs: &str,
    prison: &str,
    to: &str,
) -> throughcare::store::NewHandover {
    use throughcare::journey::JourneyEvent;
    use throughcare::store::{NewDelivery, NewHandover};
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: message_id.into(),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(nhs.into()),
            prison: Some(prison.into()),
            dob: None,
        },
        claim_keys: vec![format!("claim-{nhs}")],
        requested_destinations: vec![to.into()],
        destinations: vec![NewDelivery {
            mailbox: to.into(),
            ..NewDelivery::default()
        }],
        payload: message_id.as_bytes().to_vec(),
        supersede: true,
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
    }
}

/// YG001 pulls and acks what waits for it.
async fn deliver_to_yg001(store: &throughcare::store::Store) {
    for d in store
        .pull("urn:ods:YG001", "YG001", 10, 60_000)
        .await
        .unwrap()
    {
        store
            .ack("urn:ods:YG001", "YG001", d.delivery.id, d.delivery.attempt)
            .await
            .unwrap();
    }
}

/// No key or value of the identity trees names patient a or c.
fn nothing_of_a_or_c_in_the_identity_trees(sled_dir: &std::path::Path) {
    let db = crate::support::open_sled(sled_dir);
    for tree in ["identities", "patients", "lineage"] {
        for kv in db.open_tree(tree).unwrap().iter() {
            let (k, v) = kv.unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&k),
                String::from_utf8_lossy(&v)
            );
            assert!(
                !text.contains("-a") && !text.contains("-c"),
                "{tree}: {text}"
            );
        }
    }
}

/// A store whose tracking metadata was removed before identity records
/// expired: its lineage points at nothing and no check is scheduled. The
/// one-off look through the lineage finds the patient and schedules one.
#[tokio::test]
async fn identity_records_left_by_an_older_retention_are_found_and_expire() {
    use throughcare::journey::JourneyEvent;
    use throughcare::store::{NewDelivery, NewHandover, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let clock = ManualClock::new(T0);
    let open = || Store::open(&data, StoreOptions::default(), Arc::new(clock.clone())).unwrap();
    let store = open();
    store
        .submit(NewHandover {
            actor: "urn:ods:YP001".into(),
            sender: "YP001".into(),
            message_id: "old".into(),
            event: JourneyEvent::Release,
            patient: PatientIds {
                nhs: Some("nhs-old".into()),
                prison: Some("prison-old".into()),
                dob: None,
            },
            claim_keys: Vec::new(),
            requested_destinations: vec!["YG001".into()],
            destinations: vec![NewDelivery {
                mailbox: "YG001".into(),
                ..NewDelivery::default()
            }],
            payload: b"old".to_vec(),
            supersede: true,
            trace_parent: None,
            authored_at_ms: None,
            withdrawal: None,
            episode: None,
            movement: None,
            movement_as_written: None,
        })
        .await
        .unwrap();
    let d = store
        .pull("urn:ods:YG001", "YG001", 1, 60_000)
        .await
        .unwrap();
    store
        .ack("urn:ods:YG001", "YG001", d[0].delivery.id, 1)
        .await
        .unwrap();
    clock.advance(84 * DAY_MS + 1);
    assert_eq!(store.retention().await.unwrap().metadata_removed, 1);
    store.close().await.unwrap();
    drop(store);
    // As an older gateway would have left it: no identity check scheduled.
    {
        let db = support::open_sled(&data.join("sled"));
        let index = db.open_tree("retention").unwrap();
        for key in index.iter().keys() {
            let key = key.unwrap();
            if key[8] == b'i' {
                index.remove(key).unwrap();
            }
        }
        db.open_tree("meta")
            .unwrap()
            .remove("identity_backfill")
            .unwrap();
        db.flush().unwrap();
    }
    let store = open();
    let pass = store.retention().await.unwrap();
    assert_eq!(pass.stats.identities_expiring, 1, "found by the backfill");
    assert_eq!(store.patient_keys("prison-old").unwrap()[0], "nhs-old");
    clock.advance(84 * DAY_MS + 1);
    assert_eq!(store.retention().await.unwrap().identities_removed, 1);
    assert_eq!(store.patient_keys("prison-old").unwrap(), ["prison-old"]);
    assert_eq!(
        store.retention().await.unwrap().stats.identity_records_held,
        0
    );
    store.verify_audit().unwrap();
    store.close().await.unwrap();
}

/// A crash may leave the witness at the head before the newest (its slot
/// torn): the entry that head anchors must still be there, so a pass never
/// removes the entry the durable head anchors, however old, and the store
/// opens again and verifies from its cut.
#[tokio::test]
async fn an_audit_cut_keeps_the_entry_a_torn_witness_falls_back_to() {
    use std::os::unix::fs::FileExt;
    use throughcare::audit::AuditEvent;
    use throughcare::store::{RetentionPolicy, Store, StoreOptions, WitnessPaths};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let clock = ManualClock::new(T0);
    let options = || StoreOptions {
        retention: RetentionPolicy {
            audit_ms: 1_000,
            ..RetentionPolicy::default()
        },
        ..StoreOptions::default()
    };
    let store = Store::open(&data, options(), Arc::new(clock.clone())).unwrap();
    for _ in 0..3 {
        store
            .record(AuditEvent {
                actor: "urn:ods:YP001".into(),
                action: "connect",
                outcome: "ok".into(),
                ..AuditEvent::default()
            })
            .await
            .unwrap();
    }
    clock.advance(2_000);
    let pass = store.retention().await.unwrap();
    assert!(pass.audit_removed >= 1, "{pass:?}");
    // Crash: no final barrier, and the newest witness head torn.
    drop(store);
    let file = WitnessPaths::of(&data, &options()).file;
    let witness = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let commit_seq_at = |slot: u64| {
        let mut b = [0u8; 8];
        witness.read_exact_at(&mut b, slot + 8).unwrap();
        u64::from_be_bytes(b)
    };
    let newest = if commit_seq_at(0) > commit_seq_at(512) {
        0
    } else {
        512
    };
    witness.write_all_at(b"torn", newest + 20).unwrap();
    // The dropped writer thread lets go of sled's lock when it ends.
    let mut reopened = Store::open(&data, options(), Arc::new(clock.clone()));
    for _ in 0..100 {
        match &reopened {
            Err(e) if e.to_string().contains("could not acquire lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                reopened = Store::open(&data, options(), Arc::new(clock.clone()));
            }
            _ => break,
        }
    }
    let store = reopened.expect("the entry the older head anchors is still there");
    let v = store.verify_audit_from().unwrap();
    assert_eq!(v.from, pass.audit_removed as u64 + 1);
    store.close().await.unwrap();
}

/// An admission whose patient has no GP on the network goes to nobody: it
/// waits for no delivery, so its payload is shredded after the grace and
/// its tracking data goes after the metadata period, like a delivered one.
#[tokio::test]
async fn an_admission_that_went_to_nobody_is_forgotten_like_a_delivered_one() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    let mut summary = throughcare::clinical::synthetic::release_summary(
        nhs(41).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        None,
        "unrouted admission",
    );
    summary.custody.release_date = None;
    summary.custody.release_address = None;
    let receipt = prison
        .submit(pb::SubmitRequest {
            message_id: "admitted-no-gp".into(),
            event: pb::JourneyEvent::Admission.into(),
            patient: None,
            destinations: Vec::new(),
            document: Some(pb::submit_request::Document::Native(
                throughcare::grpc::summary::to_wire(&summary),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(receipt.deliveries.is_empty(), "{receipt:?}");
    let t = track(&mut prison, "admitted-no-gp").await.unwrap();
    assert!(t.finished_at.is_some(), "nothing to wait for");

    clock.advance(3 * DAY_MS + 1_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 1);
    let t = track(&mut prison, "admitted-no-gp").await.unwrap();
    assert!(t.content_removed_at.is_some());

    clock.advance(90 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.metadata_removed, 1);
    let err = track(&mut prison, "admitted-no-gp").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    gw.store.verify_audit().unwrap();
    gw.stop().await;
}

/// A grace period lengthened across a restart applies to payloads already
/// waiting for it: the work scheduled under the shorter one moves, it is
/// neither done early nor dropped.
#[tokio::test]
async fn a_lengthened_grace_applies_to_payloads_already_waiting() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("grace-grows", 2, &["YG001"], "grace marker"))
        .await
        .unwrap();
    assert_eq!(deliver_release(&gw, "YG001").await, 2);
    let (dir, mut config) = gw.stop().await;
    config.retention.payload_grace_seconds = 7 * 24 * 3_600;
    let gw = TestGateway::start_in(dir, config, Arc::new(clock.clone())).await;

    clock.advance(3 * DAY_MS + 1_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 0, "the longer grace holds");
    assert_eq!(pass.stats.payloads_in_grace, 1, "moved, not dropped");
    clock.advance(4 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 1, "shredded when the longer grace ends");
    gw.stop().await;
}

/// A clock set back (it had run ahead) leaves the current key epoch
/// "opened in the future": a new one opens at the next pass, so shredded
/// keys still fall out of reach on schedule. Before, no epoch opened for as
/// long as the clock had been ahead.
#[tokio::test]
async fn a_clock_set_back_still_opens_a_new_key_epoch() {
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let first = gw.store.retention().await.unwrap();
    assert_eq!(first.stats.key_epochs, 1);
    clock.advance(-10 * DAY_MS);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.stats.key_epochs, 2, "a new epoch, opened now");
    gw.stop().await;
}

/// A wall clock stepped forward while the gateway runs (a wrong time source,
/// a mistyped date) does not bring retention forward with it: nine years on
/// by the wall clock, one minute on by the time that passed, nothing is
/// shredded or removed, audit entries included, and the pass reports how far
/// the wall clock is ahead. Time that really passes is still followed. Before,
/// the pass shredded the payload, removed the tracking data and cut the audit
/// trail at once.
#[tokio::test]
async fn a_clock_stepped_forward_removes_nothing_before_its_time() {
    a_clock_stepped_forward_removes_nothing_before_its_time_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_clock_stepped_forward_removes_nothing_before_its_time_on_postgres() {
    a_clock_stepped_forward_removes_nothing_before_its_time_on(Engine::Postgres).await;
}

async fn a_clock_stepped_forward_removes_nothing_before_its_time_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    prison
        .submit(release("stepped", 2, &["YG001"], "step marker"))
        .await
        .unwrap();
    assert_eq!(deliver_release(&gw, "YG001").await, 2);
    let first = gw.store.retention().await.unwrap();
    assert_eq!(first.shredded, 0);
    let audit_before = gw.store.audit_entries().unwrap().len();

    clock.step(9 * 366 * DAY_MS);
    clock.advance(60_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(
        (pass.shredded, pass.metadata_removed, pass.audit_removed),
        (0, 0, 0),
        "{pass:?}"
    );
    assert!(
        pass.clock_behind_ms > 9 * 365 * DAY_MS,
        "the pass says how far the wall clock is ahead: {pass:?}"
    );
    assert!(gw.store.audit_entries().unwrap().len() >= audit_before);
    let tracked = track(&mut prison, "stepped").await.unwrap();
    assert!(
        tracked
            .deliveries
            .iter()
            .all(|d| d.state == pb::DeliveryState::Delivered as i32),
        "{tracked:?}"
    );

    // The grace period really passing is followed as before.
    clock.advance(3 * DAY_MS + 1_000);
    let pass = gw.store.retention().await.unwrap();
    assert_eq!(pass.shredded, 1, "{pass:?}");
    assert_eq!(pass.audit_removed, 0, "{pass:?}");
    gw.stop().await;
}
