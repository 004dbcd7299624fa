//! A store as the previous gateway left it opens and keeps every delivery:
//! no queue index file (the index is rebuilt from the delivery records) and
//! witness heads without the journal length after them (the journal is read
//! from its start). The same store opened from what this gateway leaves at a
//! clean close serves the same deliveries.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use throughcare::journey::JourneyEvent;
use throughcare::store::{
    ManualClock, NewDelivery, NewHandover, PatientIds, Store, StoreOptions, WitnessPaths,
};

const LEASE_MS: i64 = 1_000;

fn open(data: &Path, clock: &ManualClock) -> Store {
    Store::open(data, StoreOptions::default(), Arc::new(clock.clone())).unwrap()
}

fn handover(i: u32) -> NewHandover {
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: format!("m{i}"),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(format!("p{}", i % 9)),
            prison: None,
            dob: None,
        },
        claim_keys: Vec::new(),
        requested_destinations: Vec::new(),
        destinations: ["MB0", "MB1"]
            .iter()
            .map(|m| NewDelivery {
                mailbox: (*m).into(),
                urgent: i.is_multiple_of(4),
                due_ms: Some(5_000_000),
                ..NewDelivery::default()
            })
            .collect(),
        payload: format!("document {i}").into_bytes(),
        supersede: false,
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
    }
}

/// What the previous gateway left: no `queue-index`, no nonce in `meta`,
/// and in each witness head slot only the head (172 bytes: magic,
/// checkpoint, public key, signature, CRC), nothing after it.
fn as_the_previous_gateway_left_it(data: &Path) {
    let index = data.join("queue-index");
    assert!(
        index.exists(),
        "this gateway leaves the index at a clean close"
    );
    std::fs::remove_file(index).unwrap();
    {
        let db = crate::support::open_sled(&data.join("sled"));
        let meta = db.open_tree("meta").unwrap();
        assert!(meta.remove("queue_index_nonce").unwrap().is_some());
        db.flush().unwrap();
    }
    let witness = WitnessPaths::of(data, &StoreOptions::default()).file;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(witness)
        .unwrap();
    for slot in [0u64, 512] {
        file.write_all_at(&[0; 12], slot + 172).unwrap();
    }
}

/// Every delivery of both mailboxes, (mailbox, id, attempt), pulled after
/// every lease has run out.
async fn drain(store: &Store, clock: &ManualClock) -> Vec<(String, u64, u32)> {
    clock.advance(2 * LEASE_MS);
    let mut out = Vec::new();
    for mailbox in ["MB0", "MB1"] {
        loop {
            let pulled = store
                .pull("urn:ods:test", mailbox, 7, LEASE_MS)
                .await
                .unwrap();
            if pulled.is_empty() {
                break;
            }
            for p in pulled {
                let d = p.delivery;
                store
                    .ack("urn:ods:test", mailbox, d.id, d.attempt)
                    .await
                    .unwrap();
                out.push((mailbox.to_owned(), d.id, d.attempt));
            }
        }
    }
    out.sort();
    out
}

/// The queue as the previous gateway left it opens with every delivery,
/// leases and attempts kept, as does the queue this gateway leaves.
#[tokio::test]
async fn a_store_left_by_the_previous_gateway_keeps_every_delivery() {
    let mut served = Vec::new();
    for previous in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let clock = ManualClock::new(1_000_000);
        let store = open(&data, &clock);
        for i in 0..40 {
            store.submit(handover(i)).await.unwrap();
        }
        // Leased once (attempt 1), then served again with attempt 2.
        assert_eq!(
            store
                .pull("urn:ods:test", "MB0", 5, LEASE_MS)
                .await
                .unwrap()
                .len(),
            5
        );
        store.close().await.unwrap();
        drop(store);
        if previous {
            as_the_previous_gateway_left_it(&data);
        }
        let store = open(&data, &clock);
        let got = drain(&store, &clock).await;
        store.close().await.unwrap();
        assert_eq!(got.len(), 80, "previous: {previous}");
        assert_eq!(got.iter().filter(|(_, _, a)| *a == 2).count(), 5);
        served.push(got);
    }
    assert_eq!(served[0], served[1]);
}
