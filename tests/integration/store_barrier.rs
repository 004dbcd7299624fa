//! Every OK rests on a completed durability barrier: a barrier that fails
//! turns into errors for the callers waiting on it (never an OK), and the
//! store then refuses changes until restarted. Under load, one barrier
//! answers many submits (group commit).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use throughcare::journey::JourneyEvent;
use throughcare::store::{
    BarrierObserver, NewDelivery, NewHandover, PatientIds, Store, StoreError, StoreOptions,
    SystemClock, TrackKey,
};

fn handover(i: usize) -> NewHandover {
    NewHandover {
        actor: "urn:ods:YP001".into(),
        sender: "YP001".into(),
        message_id: format!("m-{i}"),
        event: JourneyEvent::Release,
        patient: PatientIds {
            nhs: Some(format!("p{}", i % 7)),
            prison: None,
        },
        claim_keys: Vec::new(),
        destinations: vec![NewDelivery {
            mailbox: "YG001".into(),
            urgent: false,
            ..NewDelivery::default()
        }],
        payload: vec![b'x'; 4096],
        requested_destinations: Vec::new(),
        supersede: false,
    }
}

/// Fails the barrier with this number; counts the rest.
struct FailAt {
    fail: u64,
    seen: AtomicU64,
}

impl BarrierObserver for FailAt {
    fn synced(&self, barrier: u64) -> io::Result<()> {
        self.seen.store(barrier, Ordering::SeqCst);
        if barrier == self.fail {
            Err(io::Error::other("injected fsync failure"))
        } else {
            Ok(())
        }
    }
}

fn open(dir: &std::path::Path, observer: Option<Arc<dyn BarrierObserver>>) -> Store {
    // A subdirectory, so the witness beside it stays in the temporary directory.
    Store::open(
        &dir.join("data"),
        StoreOptions {
            observer,
            ..StoreOptions::default()
        },
        Arc::new(SystemClock),
    )
    .unwrap()
}

#[tokio::test]
async fn a_failed_barrier_never_yields_an_ok_and_stops_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let observer = Arc::new(FailAt {
        fail: 5,
        seen: AtomicU64::new(0),
    });
    let store = open(dir.path(), Some(observer.clone()));
    let mut ok = Vec::new();
    for i in 0..10 {
        match store.submit(handover(i)).await {
            Ok(o) => ok.push((i, o.handover_id)),
            Err(e) => {
                assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
                assert!(i >= 4, "submit {i} failed before the injected failure");
            }
        }
    }
    // Sequential submits: one barrier each, so exactly the first four were OK.
    assert_eq!(ok.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(
        observer.seen.load(Ordering::SeqCst),
        5,
        "no barrier after the failure"
    );
    assert!(matches!(
        store.pull("urn:ods:YG001", "YG001", 1, 1_000).await,
        Err(StoreError::Unavailable(_))
    ));
    store.close().await.unwrap();
    drop(store);

    // After a restart every OK'd submit is there.
    let store = open(dir.path(), None);
    for (i, id) in ok {
        let s = store
            .track(
                "urn:ods:YP001",
                "YP001",
                TrackKey::MessageId(format!("m-{i}")),
            )
            .await
            .unwrap();
        assert_eq!(s.handover.id, id);
    }
    store.close().await.unwrap();
}

/// A slow disk: each barrier takes 20 ms.
struct Slow {
    barriers: Mutex<Vec<u64>>,
}

impl BarrierObserver for Slow {
    fn synced(&self, barrier: u64) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        self.barriers.lock().unwrap().push(barrier);
        Ok(())
    }
}

#[tokio::test]
async fn concurrent_submits_share_barriers() {
    let dir = tempfile::tempdir().unwrap();
    let observer = Arc::new(Slow {
        barriers: Mutex::new(Vec::new()),
    });
    let store = open(dir.path(), Some(observer.clone()));
    let mut tasks = Vec::new();
    for i in 0..256 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.submit(handover(i)).await }));
    }
    for t in tasks {
        assert!(!t.await.unwrap().unwrap().duplicate);
    }
    let (barriers, fdatasyncs, _, submits) = store.stats().snapshot();
    assert_eq!(submits, 256);
    assert!(fdatasyncs >= barriers);
    assert!(
        barriers < 64,
        "256 concurrent submits took {barriers} barriers: no group commit"
    );
    assert_eq!(observer.barriers.lock().unwrap().len() as u64, barriers);
    store.close().await.unwrap();
}
