//! Random journeys against the store: submits from two senders about three
//! people, each identified by NHS number, prison number or both (so
//! identities are learned late, in any order), to any mix of two mailboxes
//! and the parked one; pulls, acks, nacks, claims by either identifier,
//! lease expiry and restarts.
//!
//! The properties, with "patient" meaning the people the store has been
//! told are one (identifiers seen together on a submit, at any time):
//! - no delivery is handed over after a newer summary for the same patient
//!   and event from the same sender was delivered to that recipient;
//! - every undelivered copy of a summary that has a newer one is
//!   SUPERSEDED (a leased one may stay with its recipient, marked);
//! - per patient and mailbox, a delivery is handed over only when every
//!   older one of that patient in that mailbox is finished.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use throughcare::journey::JourneyEvent;
use throughcare::store::{
    DeliveryRecord, DeliveryState, ManualClock, NewDelivery, NewHandover, PARKED_MAILBOX,
    PatientIds, Store, StoreOptions,
};

const MAILBOXES: [&str; 2] = ["M0", "M1"];
const SENDERS: [&str; 2] = ["S0", "S1"];
const EVENTS: [JourneyEvent; 2] = [JourneyEvent::Release, JourneyEvent::Transfer];
const LEASE_MS: i64 = 50;

#[derive(Debug, Clone, Copy)]
enum Ids {
    Nhs,
    Prison,
    Both,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        person: u8,
        ids: Ids,
        sender: usize,
        event: usize,
        /// Bit 0: M0, bit 1: M1, bit 2: parked (none set: parked).
        to: u8,
    },
    Pull {
        mailbox: usize,
    },
    Ack {
        mailbox: usize,
        pick: usize,
    },
    Nack {
        mailbox: usize,
        pick: usize,
        permanent: bool,
    },
    Claim {
        person: u8,
        by_nhs: bool,
        to: usize,
    },
    Advance {
        ms: i64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let ids = prop_oneof![Just(Ids::Nhs), Just(Ids::Prison), Just(Ids::Both)];
    prop_oneof![
        5 => (0u8..3, ids, 0usize..2, 0usize..2, 0u8..8).prop_map(|(person, ids, sender, event, to)| {
            Op::Submit { person, ids, sender, event, to }
        }),
        4 => (0usize..2).prop_map(|mailbox| Op::Pull { mailbox }),
        3 => (0usize..2, any::<usize>()).prop_map(|(mailbox, pick)| Op::Ack { mailbox, pick }),
        1 => (0usize..2, any::<usize>(), any::<bool>())
            .prop_map(|(mailbox, pick, permanent)| Op::Nack { mailbox, pick, permanent }),
        2 => (0u8..3, any::<bool>(), 0usize..2).prop_map(|(person, by_nhs, to)| Op::Claim { person, by_nhs, to }),
        1 => (0i64..80).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Restart),
    ]
}

/// A handover the test submitted.
struct Sent {
    id: u64,
    /// The identifiers it carried (`n0`, `q0`, ...).
    identifiers: Vec<String>,
    sender: usize,
    event: usize,
    deliveries: Vec<u64>,
}

#[derive(Default)]
struct World {
    sent: Vec<Sent>,
    /// Union-find over identifiers seen together.
    parent: HashMap<String, String>,
    /// (mailbox, handover id) of every acknowledged delivery.
    delivered: Vec<(usize, u64)>,
    /// (delivery id, attempt) handed out per mailbox.
    handed_out: [Vec<(u64, u32)>; 2],
    next_message: u32,
}

impl World {
    fn find(&self, id: &str) -> String {
        let mut at = id.to_owned();
        while let Some(p) = self.parent.get(&at).filter(|p| **p != at) {
            at.clone_from(p);
        }
        at
    }

    fn link(&mut self, ids: &[String]) {
        if let [a, b] = ids {
            let (ra, rb) = (self.find(a), self.find(b));
            if ra != rb {
                self.parent.insert(rb, ra);
            }
        }
    }

    fn class_of(&self, handover: u64) -> String {
        let sent = self.sent.iter().find(|s| s.id == handover).unwrap();
        self.find(&sent.identifiers[0])
    }

    fn sent(&self, handover: u64) -> &Sent {
        self.sent.iter().find(|s| s.id == handover).unwrap()
    }

    /// Whether `a` and `b` are the same sender, event and patient.
    fn same_line(&self, a: u64, b: u64) -> bool {
        let (x, y) = (self.sent(a), self.sent(b));
        x.sender == y.sender && x.event == y.event && self.class_of(a) == self.class_of(b)
    }
}

fn identifiers(person: u8, ids: Ids) -> Vec<String> {
    match ids {
        Ids::Nhs => vec![format!("n{person}")],
        Ids::Prison => vec![format!("q{person}")],
        Ids::Both => vec![format!("n{person}"), format!("q{person}")],
    }
}

/// The store under test: sled in `dir`, or PostgreSQL database `postgres`
/// (key files in `dir`).
fn open(dir: &Path, clock: &ManualClock, postgres: Option<&str>) -> Store {
    let options = StoreOptions {
        max_attempts: 3,
        retry_backoff_ms: 10,
        ..StoreOptions::default()
    };
    let clock = Arc::new(clock.clone());
    match postgres {
        None => Store::open(dir, options, clock).unwrap(),
        Some(url) => {
            let pg = throughcare::store::pg::PgOptions {
                url: url.to_owned(),
                ca_file: None,
                pool_size: 4,
                require_synchronous_standby: false,
            };
            Store::open_postgres(&pg, options, clock, dir).unwrap()
        }
    }
}

async fn submit(store: &Store, world: &mut World, op: (u8, Ids, usize, usize, u8)) {
    let (person, ids, sender, event, to) = op;
    let identifiers = identifiers(person, ids);
    world.next_message += 1;
    let mut destinations: Vec<NewDelivery> = (0..3)
        .filter(|bit| to & (1 << bit) != 0)
        .map(|bit| NewDelivery {
            mailbox: MAILBOXES.get(bit).copied().unwrap_or(PARKED_MAILBOX).into(),
            ..NewDelivery::default()
        })
        .collect();
    if destinations.is_empty() {
        destinations.push(NewDelivery {
            mailbox: PARKED_MAILBOX.into(),
            ..NewDelivery::default()
        });
    }
    let o = store
        .submit(NewHandover {
            actor: format!("urn:ods:{}", SENDERS[sender]),
            sender: SENDERS[sender].into(),
            message_id: format!("m{}", world.next_message),
            event: EVENTS[event],
            patient: PatientIds {
                nhs: identifiers.iter().find(|i| i.starts_with('n')).cloned(),
                prison: identifiers.iter().find(|i| i.starts_with('q')).cloned(),
                dob: None,
            },
            claim_keys: identifiers.iter().map(|i| format!("claim:{i}")).collect(),
            requested_destinations: Vec::new(),
            destinations,
            payload: format!("summary {}", world.next_message).into_bytes(),
            supersede: true,
            trace_parent: None,
            authored_at_ms: None,
            withdrawal: None,
            episode: None,
            movement: None,
            movement_as_written: None,
        })
        .await
        .expect("consistent identifiers are never a conflict");
    world.link(&identifiers);
    world.sent.push(Sent {
        id: o.handover_id,
        identifiers,
        sender,
        event,
        deliveries: o.deliveries.iter().map(|(_, d)| *d).collect(),
    });
}

fn record(store: &Store, id: u64) -> DeliveryRecord {
    store.delivery(id).unwrap().unwrap()
}

/// No stale copy handed over after its replacement was delivered there, and
/// nothing older of the same patient still waiting in that mailbox.
fn check_pull(store: &Store, world: &World, mailbox: usize, got: &DeliveryRecord) {
    for (m, h) in &world.delivered {
        assert!(
            !(*m == mailbox && *h > got.handover_id && world.same_line(*h, got.handover_id)),
            "handover {} handed over in {} after the newer {h} was delivered there",
            got.handover_id,
            MAILBOXES[mailbox]
        );
    }
    let class = world.class_of(got.handover_id);
    for sent in &world.sent {
        for &d in &sent.deliveries {
            let other = record(store, d);
            if other.id < got.id
                && other.mailbox == MAILBOXES[mailbox]
                && world.class_of(sent.id) == class
            {
                assert!(
                    matches!(
                        other.state,
                        DeliveryState::Delivered
                            | DeliveryState::Superseded
                            | DeliveryState::Quarantined
                    ),
                    "delivery {} handed over while the older {} of the same patient is {:?}",
                    got.id,
                    other.id,
                    other.state
                );
            }
        }
    }
}

/// Every undelivered copy of a summary that has a newer one is superseded.
fn check_superseded(store: &Store, world: &World) {
    for old in &world.sent {
        let replaced = world
            .sent
            .iter()
            .any(|new| new.id > old.id && world.same_line(new.id, old.id));
        if !replaced {
            continue;
        }
        for &d in &old.deliveries {
            let r = record(store, d);
            let ok = match r.state {
                DeliveryState::Delivered | DeliveryState::Superseded => true,
                DeliveryState::Leased => r.superseded_by.is_some(),
                _ => false,
            };
            assert!(
                ok,
                "stale delivery {d} of handover {} is {:?}",
                old.id, r.state
            );
        }
    }
}

async fn run(ops: Vec<Op>, postgres: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let mut store = open(dir.path(), &clock, postgres);
    let mut world = World::default();
    for op in ops {
        match op {
            Op::Submit {
                person,
                ids,
                sender,
                event,
                to,
            } => submit(&store, &mut world, (person, ids, sender, event, to)).await,
            Op::Pull { mailbox } => {
                let got = store
                    .pull("urn:ods:X", MAILBOXES[mailbox], 10, LEASE_MS)
                    .await
                    .unwrap();
                for l in &got {
                    check_pull(&store, &world, mailbox, &l.delivery);
                    world.handed_out[mailbox].push((l.delivery.id, l.delivery.attempt));
                }
            }
            Op::Ack { mailbox, pick } | Op::Nack { mailbox, pick, .. }
                if world.handed_out[mailbox].is_empty() =>
            {
                let _ = pick;
            }
            Op::Ack { mailbox, pick } => {
                let list = &world.handed_out[mailbox];
                let (id, attempt) = list[pick % list.len()];
                if store
                    .ack("urn:ods:X", MAILBOXES[mailbox], id, attempt)
                    .await
                    .is_ok()
                {
                    let handover = record(&store, id).handover_id;
                    world.delivered.push((mailbox, handover));
                }
            }
            Op::Nack {
                mailbox,
                pick,
                permanent,
            } => {
                let list = &world.handed_out[mailbox];
                let (id, attempt) = list[pick % list.len()];
                let _ = store
                    .nack(
                        "urn:ods:X",
                        MAILBOXES[mailbox],
                        id,
                        attempt,
                        permanent,
                        "model",
                    )
                    .await;
            }
            Op::Claim { person, by_nhs, to } => {
                let key = format!("claim:{}{person}", if by_nhs { 'n' } else { 'q' });
                let claimed = store
                    .claim("urn:ods:X", vec![key], (MAILBOXES[to], "no evidence given"))
                    .await
                    .unwrap();
                for d in claimed {
                    assert_eq!(d.state, DeliveryState::Queued);
                }
            }
            Op::Advance { ms } => clock.advance(ms),
            Op::Restart => {
                store.close().await.unwrap();
                drop(store);
                store = open(dir.path(), &clock, postgres);
            }
        }
        check_superseded(&store, &world);
    }
    store.verify_audit().unwrap();
    store.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn journeys_never_hand_over_a_stale_summary(ops in prop::collection::vec(op(), 1..70)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops, None));
    }

    #[test]
    fn journeys_never_hand_over_a_stale_summary_on_postgres(ops in prop::collection::vec(op(), 1..70)) {
        let Some(url) = crate::support::postgres_database("journey_model") else {
            return Ok(());
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops, Some(&url)));
    }
}

#[test]
fn identifiers_learned_late_retire_what_the_link_reveals_as_stale() {
    identifiers_learned_late_on(None);
}

#[test]
fn identifiers_learned_late_retire_what_the_link_reveals_as_stale_on_postgres() {
    if let Some(url) = crate::support::postgres_database("journey_model") {
        identifiers_learned_late_on(Some(&url));
    }
}

fn identifiers_learned_late_on(postgres: Option<&str>) {
    // S0 sends a release by NHS number, then (the same person) by prison
    // number: two patients to the store, both queued. An admission with both
    // numbers links them: the older release is now stale and retired.
    let ops = vec![
        Op::Submit {
            person: 0,
            ids: Ids::Nhs,
            sender: 0,
            event: 0,
            to: 1,
        },
        Op::Submit {
            person: 0,
            ids: Ids::Prison,
            sender: 0,
            event: 0,
            to: 1,
        },
        Op::Submit {
            person: 0,
            ids: Ids::Both,
            sender: 1,
            event: 1,
            to: 2,
        },
        Op::Pull { mailbox: 0 },
        Op::Ack {
            mailbox: 0,
            pick: 0,
        },
        Op::Pull { mailbox: 0 },
    ];
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(ops, postgres));
}

#[test]
fn the_world_model_links_transitively() {
    let mut world = World::default();
    world.link(&["n0".into(), "q0".into()]);
    world.link(&["n1".into(), "q0".into()]);
    assert_eq!(world.find("n1"), world.find("n0"));
    assert_ne!(world.find("n2"), world.find("n0"));
}
