//! The store checked against a simple in-memory model over random sequences
//! of submit (including duplicates and conflicts), pull, ack (including stale
//! acks), nack, lease expiry (a manual clock), sweep, retention passes and
//! restart.
//!
//! Invariants: every accepted submit is in exactly one state, the one the
//! model predicts; dedupe holds (until the metadata period removes the key);
//! each pull returns exactly what the model serves (FIFO, one in flight per
//! patient, quarantine blocks nobody); a payload is shredded exactly when a
//! pass runs a grace period after its delivery, tracking data is removed
//! after the metadata period (Track: removed under the retention policy),
//! and the tombstone after its own period.
//!
//! The same model runs against both engines (a parameter, not a copy): sled,
//! and PostgreSQL when `tests/run` started a cluster, retention passes
//! included (docs/store-engines.md).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use throughcare::journey::JourneyEvent;
use throughcare::store::pg::PgOptions;
use throughcare::store::{
    DeliveryState, ManualClock, NewDelivery, NewHandover, PatientIds, RetentionPolicy, Store,
    StoreError, StoreOptions, TrackKey,
};

const MAILBOXES: [&str; 2] = ["MB0", "MB1"];
const MAX_ATTEMPTS: u32 = 3;
const LEASE_MS: i64 = 50;
const BACKOFF_MS: i64 = 10;
const GRACE_MS: i64 = 100;
const METADATA_MS: i64 = 250;
const TOMBSTONE_MS: i64 = 150;

#[derive(Debug, Clone)]
enum Op {
    /// Message `msg` (its content fixed by `msg`), or tampered content.
    Submit {
        msg: u8,
        tamper: bool,
    },
    Pull {
        mailbox: usize,
        max: usize,
    },
    Ack {
        mailbox: usize,
        pick: usize,
        stale: bool,
    },
    Nack {
        mailbox: usize,
        pick: usize,
        permanent: bool,
    },
    Advance {
        ms: i64,
    },
    Sweep,
    Retention,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, prop::bool::weighted(0.2)).prop_map(|(msg, tamper)| Op::Submit { msg, tamper }),
        4 => (0usize..2, 1usize..4).prop_map(|(mailbox, max)| Op::Pull { mailbox, max }),
        3 => (0usize..2, any::<usize>(), prop::bool::weighted(0.2))
            .prop_map(|(mailbox, pick, stale)| Op::Ack { mailbox, pick, stale }),
        1 => (0usize..2, any::<usize>(), any::<bool>())
            .prop_map(|(mailbox, pick, permanent)| Op::Nack { mailbox, pick, permanent }),
        2 => (0i64..80).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
        2 => Just(Op::Retention),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct MDelivery {
    mailbox: usize,
    patient: u8,
    state: DeliveryState,
    attempt: u32,
    lease_until: i64,
    not_before: i64,
    /// When acknowledged.
    finished: Option<i64>,
    /// When a pass shredded its payload.
    shredded: Option<i64>,
    /// The attempt a nack gave back last.
    nacked: Option<u32>,
}

#[derive(Default)]
struct Model {
    now: i64,
    /// msg → (tampered, handover id, delivery id)
    accepted: HashMap<u8, (bool, u64, u64)>,
    deliveries: BTreeMap<u64, MDelivery>,
    next_handover: u64,
    next_delivery: u64,
    /// (delivery id, attempt) handed out per mailbox, for acks to pick from.
    handed_out: [Vec<(u64, u32)>; 2],
    /// handover id → when its tracking data was removed (tombstone held).
    removed: BTreeMap<u64, i64>,
    /// Handovers whose tombstone is gone too.
    forgotten: Vec<u64>,
    /// msg → its removed handover, while the tombstone is held: a submit
    /// with that message id is refused (its content cannot be compared).
    retired: HashMap<u8, u64>,
}

fn content(msg: u8, tamper: bool) -> (u8, usize, Vec<u8>) {
    let patient = msg % 3;
    let mailbox = usize::from(msg % 2);
    (patient, mailbox, format!("doc {msg} {tamper}").into_bytes())
}

fn is_live(d: &MDelivery) -> bool {
    matches!(d.state, DeliveryState::Queued | DeliveryState::Leased)
}

impl Model {
    /// What a retention pass at `now` does.
    fn retention(&mut self) -> (usize, usize) {
        let now = self.now;
        let mut shredded = 0;
        let mut removed = Vec::new();
        for (msg, (_, hid, did)) in &self.accepted {
            let d = self.deliveries.get_mut(did).unwrap();
            let Some(f) = d.finished else { continue };
            if d.shredded.is_none() && f + GRACE_MS <= now {
                d.shredded = Some(now);
                shredded += 1;
            }
            if f + METADATA_MS <= now {
                removed.push((*msg, *hid, *did));
            }
        }
        let count = removed.len();
        for (msg, hid, did) in removed {
            self.accepted.remove(&msg);
            self.removed.insert(hid, now);
            self.retired.insert(msg, hid);
            let d = self.deliveries.remove(&did).unwrap();
            self.handed_out[d.mailbox].retain(|(id, _)| *id != did);
        }
        let gone: Vec<u64> = self
            .removed
            .iter()
            .filter(|(_, at)| **at + TOMBSTONE_MS <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            self.removed.remove(&h);
            self.forgotten.push(h);
            self.retired.retain(|_, hid| *hid != h);
        }
        (shredded, count)
    }

    fn quarantine_exhausted(&mut self, mailbox: Option<usize>) -> usize {
        let now = self.now;
        let mut n = 0;
        for d in self.deliveries.values_mut() {
            if d.state == DeliveryState::Leased
                && d.lease_until <= now
                && d.attempt >= MAX_ATTEMPTS
                && mailbox.is_none_or(|m| m == d.mailbox)
            {
                d.state = DeliveryState::Quarantined;
                n += 1;
            }
        }
        n
    }

    fn pull(&mut self, mailbox: usize, max: usize) -> Vec<(u64, u32)> {
        self.quarantine_exhausted(Some(mailbox));
        let now = self.now;
        let mut ready = Vec::new();
        for (&id, d) in &self.deliveries {
            if ready.len() >= max {
                break;
            }
            if d.mailbox != mailbox || !is_live(d) {
                continue;
            }
            let head = self
                .deliveries
                .iter()
                .find(|(_, o)| o.mailbox == mailbox && o.patient == d.patient && is_live(o))
                .map(|(id, _)| *id);
            if head != Some(id) {
                continue;
            }
            let leasable = match d.state {
                DeliveryState::Queued => d.not_before <= now,
                _ => d.lease_until <= now && d.attempt < MAX_ATTEMPTS,
            };
            if leasable {
                ready.push(id);
            }
        }
        ready
            .into_iter()
            .map(|id| {
                let d = self.deliveries.get_mut(&id).unwrap();
                d.attempt += 1;
                d.state = DeliveryState::Leased;
                d.lease_until = now + LEASE_MS;
                (id, d.attempt)
            })
            .collect()
    }

    /// The outcome an ack or nack of (id, attempt) must have, by error name.
    /// `permanent`: for a nack, whether it asks for quarantine.
    fn check(
        &self,
        id: u64,
        attempt: u32,
        is_ack: bool,
        permanent: bool,
    ) -> Result<(), &'static str> {
        let d = &self.deliveries[&id];
        if is_ack && d.state == DeliveryState::Delivered && d.attempt == attempt {
            return Err("repeat");
        }
        if !is_ack
            && d.nacked == Some(attempt)
            && d.attempt == attempt
            && d.state != DeliveryState::Leased
            && !(permanent && d.state == DeliveryState::Queued)
        {
            return Err("repeat");
        }
        if d.attempt != attempt {
            Err("stale")
        } else if d.state != DeliveryState::Leased {
            Err("not leased")
        } else if d.lease_until <= self.now {
            Err("expired")
        } else {
            Ok(())
        }
    }
}

fn error_name(e: &StoreError) -> &'static str {
    match e {
        StoreError::StaleAttempt { .. } => "stale",
        StoreError::NotLeased(_) => "not leased",
        StoreError::LeaseExpired => "expired",
        StoreError::UnknownDelivery => "unknown",
        StoreError::Conflict => "conflict",
        StoreError::Retired { .. } => "retired",
        other => panic!("unexpected store error {other}"),
    }
}

/// Where the store under test lives: its engine, and for PostgreSQL its database.
struct Target<'a> {
    dir: &'a Path,
    postgres: Option<&'a str>,
}

fn open(target: &Target<'_>, clock: &ManualClock) -> Store {
    // A subdirectory, so the witness beside it stays in the temporary directory.
    let dir = target.dir.join("data");
    let options = StoreOptions {
        max_attempts: MAX_ATTEMPTS,
        retry_backoff_ms: BACKOFF_MS,
        retention: RetentionPolicy {
            payload_grace_ms: GRACE_MS,
            metadata_ms: METADATA_MS,
            tombstone_ms: TOMBSTONE_MS,
            key_epoch_ms: 60,
            audit_ms: METADATA_MS,
            batch: 1_000,
        },
        ..StoreOptions::default()
    };
    let clock = Arc::new(clock.clone());
    match target.postgres {
        None => Store::open(&dir, options, clock).unwrap(),
        Some(url) => {
            let pg = PgOptions {
                url: url.to_owned(),
                ca_file: None,
                pool_size: 4,
                require_synchronous_standby: false,
            };
            Store::open_postgres(&pg, options, clock, &dir).unwrap()
        }
    }
}

async fn check_all(store: &Store, model: &Model) {
    for (msg, (_, hid, did)) in &model.accepted {
        let status = store
            .track("urn:ods:YP001", "YP001", TrackKey::HandoverId(*hid))
            .await
            .unwrap();
        assert_eq!(status.handover.message_id, format!("m{msg}"));
        assert_eq!(status.deliveries.len(), 1);
        let got = &status.deliveries[0];
        let want = &model.deliveries[did];
        assert_eq!(
            (got.id, got.state, got.attempt),
            (*did, want.state, want.attempt)
        );
        assert_eq!(status.handover.finished_at_ms, want.finished);
        assert_eq!(status.handover.shredded_at_ms, want.shredded);
        if want.shredded.is_some() {
            assert!(store.payload(&status.handover).await.is_err());
        }
    }
    for (hid, at) in &model.removed {
        let got = store
            .track("urn:ods:YP001", "YP001", TrackKey::HandoverId(*hid))
            .await
            .unwrap_err();
        assert!(
            matches!(got, StoreError::Removed { removed_at_ms } if removed_at_ms == *at),
            "{got}"
        );
    }
    for hid in &model.forgotten {
        let got = store
            .track("urn:ods:YP001", "YP001", TrackKey::HandoverId(*hid))
            .await
            .unwrap_err();
        assert!(matches!(got, StoreError::UnknownHandover), "{got}");
    }
}

/// A submit, new, repeated or conflicting, against the model's record of it.
async fn submit_step(store: &Store, model: &mut Model, msg: u8, tamper: bool) {
    let (patient, mailbox, payload) = content(msg, tamper);
    let result = store
        .submit(NewHandover {
            actor: "urn:ods:YP001".into(),
            sender: "YP001".into(),
            message_id: format!("m{msg}"),
            event: JourneyEvent::Release,
            patient: PatientIds {
                nhs: Some(format!("p{patient}")),
                prison: None,
                dob: None,
            },
            claim_keys: Vec::new(),
            destinations: vec![NewDelivery {
                mailbox: MAILBOXES[mailbox].into(),
                urgent: false,
                ..NewDelivery::default()
            }],
            payload,
            requested_destinations: vec![MAILBOXES[mailbox].into()],
            supersede: false,
            trace_parent: None,
            authored_at_ms: None,
            withdrawal: None,
            episode: None,
            movement: None,
            movement_as_written: None,
        })
        .await;
    match model.accepted.get(&msg) {
        Some(&(was_tampered, hid, did)) if was_tampered == tamper => {
            let o = result.unwrap();
            assert!(o.duplicate);
            assert_eq!((o.handover_id, o.deliveries[0].1), (hid, did));
        }
        Some(_) => assert_eq!(error_name(&result.unwrap_err()), "conflict"),
        None if model.retired.contains_key(&msg) => {
            assert_eq!(error_name(&result.unwrap_err()), "retired");
        }
        None => {
            let o = result.unwrap();
            model.next_handover += 1;
            model.next_delivery += 1;
            assert!(!o.duplicate);
            assert_eq!(o.handover_id, model.next_handover);
            assert_eq!(
                o.deliveries,
                vec![(MAILBOXES[mailbox].to_owned(), model.next_delivery)]
            );
            model
                .accepted
                .insert(msg, (tamper, o.handover_id, model.next_delivery));
            model.deliveries.insert(
                model.next_delivery,
                MDelivery {
                    mailbox,
                    patient,
                    state: DeliveryState::Queued,
                    attempt: 0,
                    lease_until: 0,
                    not_before: i64::MIN,
                    finished: None,
                    shredded: None,
                    nacked: None,
                },
            );
        }
    }
}

/// A pull: the model's deliveries in the model's order, each payload as submitted.
async fn pull_step(store: &Store, model: &mut Model, mailbox: usize, max: usize) {
    let got = store
        .pull("urn:ods:X", MAILBOXES[mailbox], max, LEASE_MS)
        .await
        .unwrap();
    let want = model.pull(mailbox, max);
    let got_ids: Vec<(u64, u32)> = got
        .iter()
        .map(|l| (l.delivery.id, l.delivery.attempt))
        .collect();
    assert_eq!(got_ids, want, "pull from {}", MAILBOXES[mailbox]);
    for l in &got {
        let payload = store.payload(&l.handover).await.unwrap();
        let (msg, (tampered, _, _)) = model
            .accepted
            .iter()
            .find(|(_, (_, h, _))| *h == l.handover.id)
            .unwrap();
        assert_eq!(payload, content(*msg, *tampered).2);
    }
    model.handed_out[mailbox].extend(want);
}

/// An ack of a delivery handed out (or of its previous attempt when `stale`).
async fn ack_step(store: &Store, model: &mut Model, mailbox: usize, pick: usize, stale: bool) {
    let list = &model.handed_out[mailbox];
    let (id, mut attempt) = list[pick % list.len()];
    if stale {
        attempt -= 1;
    }
    let result = store
        .ack("urn:ods:X", MAILBOXES[mailbox], id, attempt)
        .await;
    match model.check(id, attempt, true, false) {
        Ok(()) => {
            assert!(result.unwrap(), "a first ack says it delivered");
            let now = model.now;
            let d = model.deliveries.get_mut(&id).unwrap();
            d.state = DeliveryState::Delivered;
            d.finished = Some(now);
        }
        Err("repeat") => assert!(!result.unwrap(), "a repeated ack says it was a repeat"),
        Err(name) => assert_eq!(error_name(&result.unwrap_err()), name),
    }
}

/// A nack of a delivery handed out: back in the queue with backoff, or quarantined.
async fn nack_step(store: &Store, model: &mut Model, mailbox: usize, pick: usize, permanent: bool) {
    let list = &model.handed_out[mailbox];
    let (id, attempt) = list[pick % list.len()];
    let result = store
        .nack(
            "urn:ods:X",
            MAILBOXES[mailbox],
            id,
            attempt,
            permanent,
            "model",
        )
        .await;
    match model.check(id, attempt, false, permanent) {
        Ok(()) => {
            let now = model.now;
            let d = model.deliveries.get_mut(&id).unwrap();
            d.nacked = Some(attempt);
            if permanent || d.attempt >= MAX_ATTEMPTS {
                d.state = DeliveryState::Quarantined;
            } else {
                d.state = DeliveryState::Queued;
                d.not_before = now + (BACKOFF_MS * (1 << (d.attempt - 1))).min(5 * 60 * 1_000);
            }
            assert_eq!(result.unwrap(), d.state);
        }
        // The same nack retried: answered with the state it left, nothing changed.
        Err("repeat") => assert_eq!(result.unwrap(), model.deliveries[&id].state),
        Err(name) => assert_eq!(error_name(&result.unwrap_err()), name),
    }
}

async fn run(ops: Vec<Op>, postgres: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let target = Target {
        dir: dir.path(),
        postgres,
    };
    let clock = ManualClock::new(1_000_000);
    let mut store = open(&target, &clock);
    let mut model = Model {
        now: 1_000_000,
        ..Model::default()
    };
    for op in ops {
        match op {
            Op::Submit { msg, tamper } => submit_step(&store, &mut model, msg, tamper).await,
            Op::Pull { mailbox, max } => pull_step(&store, &mut model, mailbox, max).await,
            Op::Ack {
                mailbox,
                pick,
                stale,
            }
            | Op::Nack {
                mailbox,
                pick,
                permanent: stale,
            } if model.handed_out[mailbox].is_empty() => {
                let _ = (pick, stale);
            }
            Op::Ack {
                mailbox,
                pick,
                stale,
            } => ack_step(&store, &mut model, mailbox, pick, stale).await,
            Op::Nack {
                mailbox,
                pick,
                permanent,
            } => nack_step(&store, &mut model, mailbox, pick, permanent).await,
            Op::Advance { ms } => {
                clock.advance(ms);
                model.now += ms;
            }
            Op::Sweep => {
                assert_eq!(
                    store.sweep().await.unwrap().quarantined,
                    model.quarantine_exhausted(None)
                );
            }
            Op::Retention => {
                let got = store.retention().await.unwrap();
                let (shredded, removed) = model.retention();
                assert_eq!((got.shredded, got.metadata_removed), (shredded, removed));
                // Audit entries past the (short) audit period go behind a
                // signed cut: what is left verifies, here and after restarts.
                let verified = store.verify_audit_from().unwrap();
                assert_eq!(verified.from, got.stats.audit_entries_removed + 1);
                check_all(&store, &model).await;
            }
            Op::Restart => {
                store.close().await.unwrap();
                drop(store);
                store = open(&target, &clock);
                check_all(&store, &model).await;
            }
        }
    }
    check_all(&store, &model).await;
    store.verify_audit().unwrap();
    store.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops, None));
    }
}

proptest! {
    // Each case makes a database of its own: fewer cases than on sled.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn postgres_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let Some(url) = crate::support::postgres_database("store_model") else {
            return Ok(());
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops, Some(&url)));
    }
}
