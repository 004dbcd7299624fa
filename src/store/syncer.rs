//! The second stage of the store's group commit. The writer applies a batch
//! and commits it to sled (in memory), then hands it here and goes on with
//! the next batch; the syncer makes everything handed to it durable with one
//! barrier (sled flush + `fdatasync` of its log and of the witness), and only
//! then answers the batches' callers, in order. So the disk wait of one batch
//! overlaps the work of the next, and several applied batches share one
//! barrier. Nothing is answered before the barrier that covers it; a failed
//! barrier answers its batches and every later one with the failure, and the
//! writer refuses further changes (see `docs/store.md`, Group commit).

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};

use super::barrier::{BarrierReport, BarrierStats, DurabilityBarrier};
use super::high_water::{Acknowledged, HighWater};
use super::{BarrierObserver, Clock, Signals, StoreError};

/// How many applied batches may wait for the syncer before the writer
/// waits, by default (`[store] pipeline_depth`).
pub const PIPELINE_DEPTH: usize = 8;

/// The deepest pipeline the configuration accepts.
pub const MAX_PIPELINE_DEPTH: usize = 64;

/// How many committed batches sled may hold beyond the witness's head after
/// a crash, with `depth` batches allowed to wait for the syncer. The syncer
/// settles at most `depth + 1` items at a time. While it is in the barrier
/// of one group, the writer may have committed `depth` more that wait in the
/// channel and one in hand. The head of the group before may not be durable
/// yet (power loss), which is one more group. So the limit is
/// `2 (depth + 1) + (depth + 1)` batches, or 2 when each batch is settled
/// before the next (`depth` 0).
#[must_use]
pub fn witness_lag(depth: usize) -> u64 {
    let group = depth as u64 + 1;
    let ahead = if depth == 0 { 0 } else { depth as u64 + 1 };
    2 * group + ahead
}

/// Sends a result, or `Unavailable(why)` when its batch failed.
pub(super) type Sender = Box<dyn FnOnce(Option<&str>) + Send>;

/// A batch's sled commit, to be made durable.
pub(super) struct Committed {
    /// The batch's commit sequence number.
    pub seq: u64,
    /// The handovers it added, for the witness's journal.
    pub acked: Vec<Acknowledged>,
    /// The audit chain's head after it (sequence, hash).
    pub audit_head: (u64, String),
}

/// One applied batch: its answers wait for the barrier that covers it.
pub(super) struct Applied {
    /// The sled commit, when the batch changed anything.
    pub committed: Option<Committed>,
    /// Why the batch failed in the writer (nothing of it is on disk).
    pub failure: Option<String>,
    pub answers: Vec<Sender>,
    /// Submits that were new (for the statistics).
    pub submits: u64,
    /// Mailboxes to wake once the batch is durable.
    pub woken: BTreeSet<String>,
    /// Close requests: a final barrier, the clean-close mark, then replies.
    pub close: Vec<super::Reply<()>>,
    /// With a close: the nonce of the queue index the writer left, recorded
    /// with the clean-close mark.
    pub index_nonce: Option<u64>,
}

/// What the writer hands the syncer.
pub(super) enum ToSyncer {
    Batch(Applied),
    /// Answered once everything handed over before it is durable.
    Fence(SyncSender<()>),
}

/// Shared between writer and syncer: why the store stopped, once it has.
pub(super) type Failure = Arc<Mutex<Option<String>>>;

pub(super) fn failure_of(f: &Failure) -> Option<String> {
    f.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

pub(super) struct Syncer {
    pub barrier: DurabilityBarrier,
    pub high_water: HighWater,
    pub trees: Vec<sled::Tree>,
    pub clock: Arc<dyn Clock>,
    pub observer: Option<Arc<dyn BarrierObserver>>,
    pub stats: Arc<BarrierStats>,
    pub signals: Arc<Signals>,
    pub failed: Failure,
    /// The newest commit sequence made durable.
    pub durable_seq: u64,
    /// The audit sequence the newest durable witness head anchors.
    pub anchored_audit_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The most items settled under one barrier (`pipeline_depth + 1`),
    /// which bounds how far a crash can leave the witness behind sled.
    pub max_group: usize,
}

impl Syncer {
    /// Settles what the writer hands over until the writer stops.
    pub(super) fn run(mut self, rx: &Receiver<ToSyncer>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < self.max_group {
                match rx.try_recv() {
                    Ok(more) => group.push(more),
                    Err(_) => break,
                }
            }
            self.settle(group);
        }
    }

    /// One barrier for every commit in `group`, then the answers in order.
    fn settle(&mut self, group: Vec<ToSyncer>) {
        let commits: Vec<&Committed> = group
            .iter()
            .filter_map(|item| match item {
                ToSyncer::Batch(a) => a.committed.as_ref(),
                ToSyncer::Fence(_) => None,
            })
            .collect();
        let mut failure = failure_of(&self.failed);
        if failure.is_none() && !commits.is_empty() {
            let submits = group
                .iter()
                .map(|item| match item {
                    ToSyncer::Batch(a) if a.committed.is_some() => a.submits,
                    _ => 0,
                })
                .sum();
            let commands = group
                .iter()
                .map(|item| match item {
                    ToSyncer::Batch(a) if a.committed.is_some() => a.answers.len() as u64,
                    _ => 0,
                })
                .sum();
            if let Err(why) = self.make_durable(&commits, commands, submits) {
                failure = Some(why);
            }
        }
        for item in group {
            match item {
                ToSyncer::Batch(applied) => self.answer(applied, failure.as_deref()),
                ToSyncer::Fence(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Journals, syncs, then signs the newest head; on failure the store stops.
    fn make_durable(
        &mut self,
        commits: &[&Committed],
        commands: u64,
        submits: u64,
    ) -> Result<(), String> {
        let newest = commits.last().expect("called with commits");
        let mut elapsed = std::time::Duration::ZERO;
        let result = commits
            .iter()
            .try_for_each(|c| self.high_water.journal(&c.acked))
            .and_then(|()| {
                let started = std::time::Instant::now();
                let synced = self.barrier.sync(&[self.high_water.file()]);
                elapsed = started.elapsed();
                synced
            })
            .and_then(|()| {
                self.high_water.record(crate::audit::Checkpoint {
                    commit_seq: newest.seq,
                    audit_seq: newest.audit_head.0,
                    audit_hash: newest.audit_head.1.clone(),
                    keyed_from: 0,
                    at_ms: self.clock.now_ms(),
                })
            });
        match result {
            Ok(anchored) => {
                self.durable_seq = newest.seq;
                self.anchored_audit_seq
                    .store(anchored.audit_seq, std::sync::atomic::Ordering::Release);
                if let Some(observer) = &self.observer {
                    observer.anchored(&anchored);
                    observer.committed(&BarrierReport {
                        elapsed,
                        commands,
                        submits,
                    });
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("commit or durability barrier failed: {e}");
                self.fail(&why);
                Err(why)
            }
        }
    }

    fn fail(&self, why: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_none() {
            tracing::error!(reason = %why, "store refuses further changes until restarted");
            *failed = Some(why.to_owned());
        }
        // As the writer's own failure does: health, the close's log and
        // the stop's sled snapshot (skipped on a failed disk) read it. A
        // barrier that fails after the writer has stopped (the final one)
        // is only seen here.
        self.stats
            .halted
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn answer(&mut self, applied: Applied, failure: Option<&str>) {
        let failure = applied.failure.as_deref().or(failure);
        if failure.is_none() && applied.committed.is_some() {
            use std::sync::atomic::Ordering;
            self.stats
                .submits
                .fetch_add(applied.submits, Ordering::Relaxed);
            self.stats
                .commands
                .fetch_add(applied.answers.len() as u64, Ordering::Relaxed);
        }
        for send in applied.answers {
            send(failure);
        }
        if failure.is_none() {
            for mailbox in &applied.woken {
                self.signals.wake(mailbox);
            }
        }
        if !applied.close.is_empty() {
            let failed = failure_of(&self.failed);
            self.close(applied.close, failed.is_some(), applied.index_nonce);
        }
    }

    /// A final barrier so the witness is durable too; then the close is
    /// marked clean, so the next open expects the witness exactly.
    fn close(&self, replies: Vec<super::Reply<()>>, failed: bool, index_nonce: Option<u64>) {
        let result = if failed {
            Ok(())
        } else {
            self.barrier
                .sync(&[self.high_water.file()])
                .map_err(StoreError::Io)
                .and_then(|()| {
                    super::integrity::mark_clean_close(
                        &self.trees,
                        &self.barrier,
                        self.durable_seq,
                        index_nonce,
                    )
                })
        };
        let mut replies = replies.into_iter();
        if let Some(first) = replies.next() {
            let _ = first.send(result);
        }
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
    }
}
