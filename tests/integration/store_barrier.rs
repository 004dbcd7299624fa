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
            dob: None,
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
        trace_parent: None,
        authored_at_ms: None,
        withdrawal: None,
        episode: None,
        movement: None,
        movement_as_written: None,
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
    // Health checks are told (the gateway then answers NOT_SERVING).
    assert!(store.stats().halted.load(Ordering::SeqCst));
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

/// Holds every barrier after the first `open` ones until released, so the
/// writer runs ahead of the witness as far as the pipeline lets it.
struct Gate {
    open: u64,
    released: std::sync::atomic::AtomicBool,
}

impl BarrierObserver for Gate {
    fn synced(&self, barrier: u64) -> io::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while barrier > self.open
            && !self.released.load(Ordering::SeqCst)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// The health check's probe waits behind a barrier that does not return (a
/// hung `fdatasync`), as every call does, and passes once it returns: it is
/// how health tells a stuck store from a busy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_waits_for_a_stuck_barrier_and_passes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate {
        open: 1,
        released: std::sync::atomic::AtomicBool::new(false),
    });
    let store = open(dir.path(), Some(gate.clone()));
    store.submit(handover(0)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), store.probe())
        .await
        .expect("an idle store passes the probe")
        .unwrap();
    let held = {
        let store = store.clone();
        tokio::spawn(async move { store.submit(handover(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), store.probe())
            .await
            .is_err(),
        "the probe passed while a barrier before it had not returned"
    );
    gate.released.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), store.probe())
        .await
        .expect("the probe passes once the barrier returns")
        .unwrap();
    held.await.unwrap().unwrap();
    store.close().await.unwrap();
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A kill -9 while the syncer is in a barrier and the writer has filled the
/// pipeline leaves sled ahead of the witness by as many batches as the
/// pipeline holds: the next open must accept that (and still refuse a
/// store behind its witness). The copy of the directories taken at that
/// moment is what a kill -9 leaves: what the process had written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_the_pipeline_full_reopens_with_every_ok() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let gate = Arc::new(Gate {
        open: 2,
        released: std::sync::atomic::AtomicBool::new(false),
    });
    let store = open(&live, Some(gate.clone()));
    let mut ok = Vec::new();
    for i in 0..2 {
        ok.push((i, store.submit(handover(i)).await.unwrap().handover_id));
    }
    // One submit at a time, so each is its own batch and commit.
    let mut waiting = Vec::new();
    for i in 2..40 {
        let store = store.clone();
        waiting.push(tokio::spawn(async move { store.submit(handover(i)).await }));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // sled writes its buffers in the background (every 500 ms by default).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let crashed = dir.path().join("crashed");
    copy_tree(&live, &crashed);
    gate.released.store(true, Ordering::SeqCst);
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    store.close().await.unwrap();
    drop(store);

    let store = Store::open(
        &crashed.join("data"),
        StoreOptions::default(),
        Arc::new(SystemClock),
    )
    .expect("a store a crash left ahead of its witness within the pipeline opens");
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
