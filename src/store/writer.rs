//! The single store writer: applies batches of changes in one transaction,
//! runs one durability barrier per batch, then answers every caller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::mpsc;

use super::barrier::{BarrierStats, DurabilityBarrier};
use super::high_water::{Acknowledged, HighWater};
use super::identity::Newer;
use super::index_checkpoint::{self, Index};
use super::records::{self, TreeId};
use super::schedule::{Live, Schedule, Slot};
use super::syncer::{self, Applied, Committed, Failure, Syncer, ToSyncer};
use super::{
    AckOutcome, Clock, DeliveryRecord, DeliveryState, HandoverRecord, HandoverStatus,
    IdentityConflict, Job, LeasedDelivery, MailboxStats, NewHandover, RedriveOutcome, Signals,
    StoreError, StoreOptions, SubmitOutcome, SweepOutcome, TrackKey,
};
use crate::audit::{AuditChain, AuditEntry, AuditEvent, hex};

/// A key and its value.
pub(super) type KeyValue = (Vec<u8>, Vec<u8>);
#[path = "audit_prune.rs"]
mod audit_prune;
#[path = "identity_expiry.rs"]
pub(super) mod identity_expiry;
#[path = "retention.rs"]
pub(super) mod retention;

/// Writes staged on top of the committed trees; read-your-writes inside a batch.
pub(super) struct Staged<'a> {
    trees: &'a [sled::Tree],
    writes: Vec<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<'a> Staged<'a> {
    fn new(trees: &'a [sled::Tree]) -> Self {
        Self {
            trees,
            writes: vec![BTreeMap::new(); trees.len()],
        }
    }

    pub(super) fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes[tree as usize].get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.trees[tree as usize].get(key)?.map(|v| v.to_vec())),
        }
    }

    pub(super) fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        tree: TreeId,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(tree, key)?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("{} record: {e}", tree.name())))
            })
            .transpose()
    }

    pub(super) fn put(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.writes[tree as usize].insert(key.into(), Some(value));
    }

    pub(super) fn put_json<T: serde::Serialize>(
        &mut self,
        tree: TreeId,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) {
        let bytes = serde_json::to_vec(value).expect("records always serialise");
        self.put(tree, key, bytes);
    }

    pub(super) fn del(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.writes[tree as usize].insert(key.into(), None);
    }

    /// Every (key, value) of `tree` under `prefix`, staged writes included.
    pub(super) fn scan_prefix(
        &self,
        tree: TreeId,
        prefix: &[u8],
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut found = BTreeMap::new();
        for entry in self.trees[tree as usize].scan_prefix(prefix) {
            let (k, v) = entry?;
            found.insert(k.to_vec(), Some(v.to_vec()));
        }
        for (k, v) in self.writes[tree as usize].range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            found.insert(k.clone(), v.clone());
        }
        Ok(found
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    /// This batch's writes to `tree` so far (`None`: removed).
    fn pending(&self, tree: TreeId) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.writes[tree as usize]
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    fn is_empty(&self) -> bool {
        self.writes.iter().all(BTreeMap::is_empty)
    }

    fn commit(self) -> Result<(), StoreError> {
        let writes = &self.writes;
        self.trees
            .transaction(|txs| {
                for (tx, w) in txs.iter().zip(writes) {
                    for (k, v) in w {
                        match v {
                            Some(v) => tx.insert(k.as_slice(), v.as_slice())?,
                            None => tx.remove(k.as_slice())?,
                        };
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => {
                    StoreError::Unavailable("transaction aborted".into())
                }
            })
    }
}

/// The handovers a batch adds (ids after `after`), for the witness's journal.
fn acknowledged(
    staged: &Staged<'_>,
    after: u64,
    commit_seq: u64,
) -> Result<Vec<Acknowledged>, StoreError> {
    let Some(first) = after.checked_add(1) else {
        return Ok(Vec::new());
    };
    staged.writes[TreeId::Handovers as usize]
        .range(records::be(first).to_vec()..)
        .filter_map(|(_, v)| v.as_deref())
        .map(|raw| {
            let h: HandoverRecord = serde_json::from_slice(raw)
                .map_err(|e| StoreError::Corrupt(format!("handover record: {e}")))?;
            Ok(Acknowledged {
                commit_seq,
                handover_id: h.id,
                sender: h.sender,
                message_id: h.message_id,
                at_ms: h.submitted_at_ms,
            })
        })
        .collect()
}

type Sender = syncer::Sender;

/// An answer waiting for its batch to become durable.
struct Answer {
    /// A failure after which memory may not match the disk.
    fatal: Option<String>,
    /// A new (not duplicate) submit that succeeded.
    submit_ok: bool,
    /// Sends the result, or `Unavailable(why)` if the batch failed.
    send: Sender,
}

impl Answer {
    fn new<T: Send + 'static>(tx: super::Reply<T>, r: Result<T, StoreError>) -> Self {
        Self {
            fatal: r
                .as_ref()
                .err()
                .filter(|e| e.is_fatal())
                .map(ToString::to_string),
            submit_ok: false,
            send: Box::new(move |failure| {
                let r = match failure {
                    Some(why) => Err(StoreError::Unavailable(why.to_owned())),
                    None => r,
                };
                let _ = tx.send(r);
            }),
        }
    }

    fn submit(tx: super::Reply<SubmitOutcome>, r: Result<SubmitOutcome, StoreError>) -> Self {
        let submit_ok = matches!(&r, Ok(o) if !o.duplicate);
        Self {
            submit_ok,
            ..Self::new(tx, r)
        }
    }
}

pub(super) struct Writer {
    trees: Vec<sled::Tree>,
    /// Hands applied batches to the syncer (see `syncer`).
    to_syncer: std::sync::mpsc::SyncSender<ToSyncer>,
    /// Set by the syncer when a barrier fails.
    sync_failed: Failure,
    /// The last handover id handed to the witness's journal.
    journaled: u64,
    /// The audit sequence number the witness's newest durable head anchors
    /// (set by the syncer after each barrier).
    pub(super) anchored_audit_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The witness's audit key and the entry its keyed chain starts from.
    pub(super) audit_key: Arc<crate::audit::AuditKey>,
    pub(super) keyed_from: u64,
    commit_seq: u64,
    last_handover: u64,
    pub(super) last_delivery: u64,
    pub(super) schedule: Schedule,
    /// Quarantined deliveries per mailbox.
    quarantined: std::collections::HashMap<String, u64>,
    /// Quarantined deliveries per patient (a correction retires them too).
    pub(super) quarantined_of: std::collections::HashMap<String, BTreeSet<u64>>,
    chain: AuditChain,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    cipher: Arc<super::crypt::PayloadCipher>,
    /// Retention counters.
    retention: retention::Ledger,
    /// The time retention passes act on.
    retention_clock: super::clock::RetentionClock,
    /// Why the store stopped taking changes, once it has.
    failed: Option<String>,
    /// Shared counters; `halted` tells health checks the store stopped.
    stats: Arc<BarrierStats>,
    /// The data directory (for the queue index a clean close leaves).
    dir: std::path::PathBuf,
}

fn meta(trees: &[sled::Tree], key: &[u8]) -> Result<u64, StoreError> {
    match trees[TreeId::Meta as usize].get(key)? {
        None => Ok(0),
        Some(v) => records::from_be(&v)
            .ok_or_else(|| StoreError::Corrupt("meta counter is not 8 bytes".into())),
    }
}

impl Writer {
    /// The writer, its syncer and the syncer's end of the pipeline.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load(
        trees: Vec<sled::Tree>,
        barrier: DurabilityBarrier,
        high_water: HighWater,
        promised: u64,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        signals: Arc<Signals>,
        stats: Arc<BarrierStats>,
        cipher: Arc<super::crypt::PayloadCipher>,
        (dir, restored): (std::path::PathBuf, Option<Index>),
    ) -> Result<(Self, Syncer, std::sync::mpsc::Receiver<ToSyncer>), StoreError> {
        let commit_seq = meta(&trees, records::META_COMMIT_SEQ)?;
        if commit_seq < promised {
            return Err(StoreError::Behind {
                promised,
                found: commit_seq,
                missing_handovers: 0,
            });
        }
        let index = match restored {
            Some(index) => index,
            None => rebuild_index(&trees)?,
        };
        let last_audit = match trees[TreeId::Audit as usize].last()? {
            Some((_, v)) => Some(
                serde_json::from_slice::<AuditEntry>(&v)
                    .map_err(|e| StoreError::Corrupt(format!("last audit entry: {e}")))?,
            ),
            None => None,
        };
        let ledger = retention::Ledger::load(&trees)?;
        let chain = AuditChain::resume(last_audit.as_ref(), Some(high_water.key()));
        if let Some(observer) = &options.observer {
            observer.anchored(high_water.written());
        }
        let sync_failed = Failure::default();
        let (to_syncer, settled) = std::sync::mpsc::sync_channel(options.pipeline_depth);
        let journaled = high_water.last_handover();
        let anchored_audit_seq = Arc::new(std::sync::atomic::AtomicU64::new(
            high_water.durable().audit_seq,
        ));
        let audit_key = high_water.key();
        let keyed_from = high_water.keyed_from();
        let syncer = Syncer {
            anchored_audit_seq: anchored_audit_seq.clone(),
            barrier,
            high_water,
            trees: trees.clone(),
            clock: clock.clone(),
            observer: options.observer.clone(),
            stats: stats.clone(),
            signals: signals.clone(),
            failed: sync_failed.clone(),
            durable_seq: commit_seq,
            max_group: options.pipeline_depth + 1,
        };
        let writer = Self {
            retention: ledger,
            retention_clock: super::clock::RetentionClock::default(),
            last_handover: meta(&trees, records::META_LAST_HANDOVER)?,
            last_delivery: meta(&trees, records::META_LAST_DELIVERY)?,
            trees,
            to_syncer,
            sync_failed,
            journaled,
            anchored_audit_seq,
            audit_key,
            keyed_from,
            commit_seq,
            schedule: index.schedule,
            quarantined: index.quarantined,
            quarantined_of: index.quarantined_of,
            dir,
            chain,
            options,
            clock,
            cipher,
            failed: None,
            stats,
        };
        Ok((writer, syncer, settled))
    }

    pub(super) fn run(
        mut self,
        mut jobs: mpsc::Receiver<Job>,
        syncer: std::thread::JoinHandle<()>,
    ) {
        while let Some(first) = jobs.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if self.process(batch) {
                break;
            }
        }
        jobs.close();
        // Refuse anything still queued rather than leave callers hanging.
        while let Ok(job) = jobs.try_recv() {
            drop(job);
        }
        // The syncer settles what it holds, then stops with its sender gone.
        drop(self);
        let _ = syncer.join();
    }

    /// Applies one batch and hands it to the syncer; returns true when the
    /// writer should stop.
    fn process(&mut self, batch: Vec<Job>) -> bool {
        if let Some(why) = syncer::failure_of(&self.sync_failed) {
            self.fail(why);
        }
        // A retention pass may destroy a key epoch once the committed store
        // holds no key under it: every earlier batch must be durable first.
        if self.failed.is_none() && batch.iter().any(|j| matches!(j, Job::Retention(_))) {
            self.settle_all();
        }
        let trees = self.trees.clone();
        let mut staged = Staged::new(&trees);
        let mut answers = Vec::with_capacity(batch.len());
        let mut shutdown = Vec::new();
        let mut woken = BTreeSet::new();
        let now = self.clock.now_ms();
        for job in batch {
            if self.failed.is_some() {
                match job {
                    Job::Shutdown(reply) => shutdown.push(reply),
                    other => answers.push(refuse(other)),
                }
                continue;
            }
            let Some(answer) = self.apply(&mut staged, job, now, &mut woken, &mut shutdown) else {
                continue;
            };
            if let Some(why) = &answer.fatal {
                self.fail(format!("store failed while applying a change: {why}"));
            }
            answers.push(answer);
        }

        let submits = answers.iter().filter(|a| a.submit_ok).count() as u64;
        let (committed, failure) = match (&self.failed, staged.is_empty()) {
            (Some(why), _) => (None, Some(why.clone())),
            (None, true) => (None, None),
            (None, false) => match self.commit(staged) {
                Ok(c) => (Some(c), None),
                Err(why) => (None, Some(why)),
            },
        };
        let stop = !shutdown.is_empty();
        let index_nonce = (stop && failure.is_none() && self.failed.is_none())
            .then(|| self.checkpoint_index())
            .flatten();
        let applied = Applied {
            committed,
            failure,
            answers: answers.into_iter().map(|a| a.send).collect(),
            submits,
            woken,
            close: shutdown,
            index_nonce,
        };
        if self.to_syncer.send(ToSyncer::Batch(applied)).is_err() {
            self.fail("the store's syncer stopped".into());
        } else if self.options.pipeline_depth == 0 {
            self.settle_all();
        }
        stop
    }

    /// Leaves the queue index for the next open (see [`index_checkpoint`]);
    /// its nonce, for the clean-close mark. A failure only costs the next
    /// open a rebuild.
    fn checkpoint_index(&self) -> Option<u64> {
        index_checkpoint::write(
            &self.dir,
            self.commit_seq,
            &self.schedule,
            &self.quarantined,
            &self.quarantined_of,
        )
        .inspect_err(|e| {
            tracing::warn!(error = %e, "could not write the queue index at close; the next open rebuilds it");
        })
        .ok()
    }

    /// Applies one job to the batch; `None` for a close request (answered
    /// once the batch is durable). Submits are applied here, on the hot
    /// path; every other job goes to the step for its kind.
    fn apply(
        &mut self,
        staged: &mut Staged<'_>,
        job: Job,
        now: i64,
        woken: &mut BTreeSet<String>,
        shutdown: &mut Vec<super::Reply<()>>,
    ) -> Option<Answer> {
        Some(match job {
            Job::Submit(h, digests, reply) => {
                let r = self.submit(staged, *h, digests, now, woken);
                Answer::submit(reply, r)
            }
            Job::Shutdown(reply) => {
                shutdown.push(reply);
                return None;
            }
            Job::Pull { .. }
            | Job::Ack { .. }
            | Job::AckBatch { .. }
            | Job::Nack { .. }
            | Job::ReturnUnsent { .. }
            | Job::Track { .. } => self.apply_delivery_job(staged, job, now, woken),
            Job::Claim { .. } | Job::RouteHeld { .. } | Job::Pds(..) | Job::PdsNotify(..) => {
                self.apply_parked_job(staged, job, now, woken)
            }
            Job::Sweep(_)
            | Job::Retention(_)
            | Job::RetentionStats(_)
            | Job::Record(..)
            | Job::Redrive { .. }
            | Job::Stats(_)
            | Job::Probe(_)
            | Job::RegistryPut { .. }
            | Job::MeshPut { .. } => self.apply_operator_job(staged, job, now, woken),
        })
    }

    /// A consumer's or sender's call on one delivery or handover: pull, ack,
    /// nack (a retry wakes the mailbox's pullers), track.
    fn apply_delivery_job(
        &mut self,
        staged: &mut Staged<'_>,
        job: Job,
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Answer {
        match job {
            Job::Pull {
                actor,
                mailbox,
                max,
                max_bytes,
                lease_ms,
                reply,
            } => {
                // A caller gone whose answer no one took over (the store's
                // pending pull hands its answer to a task that gives the
                // leases back) is leased nothing.
                let r = if reply.is_closed() {
                    Err(StoreError::Unavailable(
                        "the caller left before its pull was served".into(),
                    ))
                } else {
                    self.pull(staged, &actor, &mailbox, (max, max_bytes), lease_ms, now)
                };
                Answer::new(reply, r)
            }
            Job::Ack {
                actor,
                mailbox,
                delivery_id,
                attempt,
                reply,
            } => {
                let r = self
                    .ack(staged, (&actor, &mailbox), delivery_id, attempt, now)
                    .and_then(AckOutcome::into_fresh);
                // The patient's next delivery may now go (one at a time
                // per patient): a puller waiting on the mailbox is woken.
                if r.is_ok() {
                    woken.insert(mailbox);
                }
                Answer::new(reply, r)
            }
            Job::AckBatch {
                actor,
                mailbox,
                attempts,
                reply,
            } => {
                let r = self.ack_batch(staged, (&actor, &mailbox), &attempts, now);
                if r.is_ok() {
                    woken.insert(mailbox);
                }
                Answer::new(reply, r)
            }
            Job::Nack {
                actor,
                mailbox,
                delivery_id,
                attempt,
                permanent,
                reason,
                reply,
            } => {
                let r = self.nack(
                    staged,
                    (&actor, &mailbox),
                    delivery_id,
                    attempt,
                    permanent,
                    &reason,
                    now,
                );
                // Requeued, or quarantined (the patient's next may go).
                if r.is_ok() {
                    woken.insert(mailbox);
                }
                Answer::new(reply, r)
            }
            Job::ReturnUnsent {
                actor,
                mailbox,
                attempts,
                reply,
            } => {
                let r = self.return_unsent(staged, (&actor, &mailbox), &attempts, now);
                woken.insert(mailbox);
                Answer::new(reply, r)
            }
            Job::Track {
                actor,
                sender,
                key,
                reply,
            } => Answer::new(reply, self.track(staged, &actor, &sender, key, now)),
            _ => unreachable!("apply routes only delivery jobs here"),
        }
    }

    /// A parked release finding its practice: an operator's or practice's
    /// claim, PDS's answer, PDS's change notice. A move wakes the practice's
    /// pullers.
    fn apply_parked_job(
        &mut self,
        staged: &mut Staged<'_>,
        job: Job,
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Answer {
        match job {
            Job::Claim {
                actor,
                claim_keys,
                to,
                evidence,
                reply,
            } => {
                let r = self.claim(staged, &actor, &claim_keys, (&to, &evidence), now, woken);
                Answer::new(reply, r)
            }
            Job::RouteHeld {
                actor,
                moves,
                reply,
            } => {
                let r = self.route_held(staged, &actor, &moves, now);
                if let Ok(routed) = &r {
                    woken.extend(routed.iter().map(|d| d.mailbox.clone()));
                }
                Answer::new(reply, r)
            }
            Job::Pds(result, reply) => {
                let r = self.pds_result(staged, result, now);
                // Moved to a practice: wake its pullers (a finding alone wakes nobody).
                if let Ok(Some(d)) = &r
                    && d.mailbox != records::PARKED_MAILBOX
                {
                    woken.insert(d.mailbox.clone());
                }
                Answer::new(reply, r)
            }
            Job::PdsNotify(notice, reply) => {
                let r = self.pds_notify(staged, &notice, now);
                if matches!(r, Ok(Some(_))) {
                    woken.insert(notice.delivery.mailbox);
                }
                Answer::new(reply, r)
            }
            _ => unreachable!("apply routes only parked-release jobs here"),
        }
    }

    /// Housekeeping and the operator's calls: sweep, retention, audit
    /// records, redrive, statistics, registry changes.
    fn apply_operator_job(
        &mut self,
        staged: &mut Staged<'_>,
        job: Job,
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Answer {
        match job {
            Job::Sweep(reply) => Answer::new(reply, self.sweep(staged, now)),
            Job::Retention(reply) => Answer::new(reply, self.retention_pass(staged)),
            Job::RetentionStats(reply) => Answer::new(reply, self.retention_stats()),
            Job::Record(event, reply) => {
                self.audit(staged, event, now);
                Answer::new(reply, Ok(()))
            }
            Job::Redrive { actor, ids, reply } => {
                let r = self.redrive(staged, &actor, &ids, now, woken);
                Answer::new(reply, r)
            }
            Job::Stats(reply) => Answer::new(reply, Ok(self.stats(now))),
            Job::Probe(reply) => Answer::new(reply, Ok(())),
            Job::RegistryPut {
                actor,
                code,
                record,
                reply,
            } => {
                self.registry_put(staged, actor, &code, record, now);
                Answer::new(reply, Ok(()))
            }
            Job::MeshPut {
                actor,
                record,
                reply,
            } => {
                let put = self.mesh_put(staged, actor, &record, now);
                Answer::new(reply, put)
            }
            _ => unreachable!("apply routes only operator jobs here"),
        }
    }

    /// Stores an organisation's registry record, audited.
    fn registry_put(
        &mut self,
        staged: &mut Staged<'_>,
        actor: String,
        code: &str,
        record: Vec<u8>,
        now: i64,
    ) {
        staged.put(TreeId::Registry, code.as_bytes().to_vec(), record);
        self.audit(
            staged,
            AuditEvent {
                actor,
                action: "registry_change",
                outcome: format!("ok: {code}"),
                ..AuditEvent::default()
            },
            now,
        );
    }

    /// Waits until every batch handed to the syncer is durable (or failed).
    fn settle_all(&mut self) {
        let (done, settled) = std::sync::mpsc::sync_channel(1);
        if self.to_syncer.send(ToSyncer::Fence(done)).is_err() || settled.recv().is_err() {
            self.fail("the store's syncer stopped".into());
        }
        if let Some(why) = syncer::failure_of(&self.sync_failed) {
            self.fail(why);
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(reason = %why, "store refuses further changes until restarted");
            self.stats
                .halted
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.failed = Some(why);
        }
    }

    /// Commits the batch to sled (not yet durable: the syncer's barrier
    /// makes it so before anyone is answered); on failure the store stops.
    fn commit(&mut self, mut staged: Staged<'_>) -> Result<Committed, String> {
        let seq = self.commit_seq + 1;
        staged.put(
            TreeId::Meta,
            records::META_COMMIT_SEQ,
            records::be(seq).to_vec(),
        );
        staged.put(
            TreeId::Meta,
            records::META_LAST_HANDOVER,
            records::be(self.last_handover).to_vec(),
        );
        staged.put(
            TreeId::Meta,
            records::META_LAST_DELIVERY,
            records::be(self.last_delivery).to_vec(),
        );
        let result = acknowledged(&staged, self.journaled, seq).and_then(|acked| {
            staged.commit()?;
            Ok(acked)
        });
        match result {
            Ok(acked) => {
                self.commit_seq = seq;
                if let Some(newest) = acked.iter().map(|a| a.handover_id).max() {
                    self.journaled = self.journaled.max(newest);
                }
                let (audit_seq, audit_hash) = self.chain.head();
                Ok(Committed {
                    seq,
                    acked,
                    audit_head: (audit_seq, audit_hash.to_owned()),
                })
            }
            Err(e) => {
                let why = format!("commit or durability barrier failed: {e}");
                self.fail(why.clone());
                Err(why)
            }
        }
    }

    /// Appends an audit entry to the batch; returns its sequence number.
    pub(super) fn audit(&mut self, staged: &mut Staged<'_>, event: AuditEvent, now: i64) -> u64 {
        let entry = self.chain.link(event, now);
        staged.put_json(TreeId::Audit, records::be(entry.seq).to_vec(), &entry);
        entry.seq
    }

    fn submit(
        &mut self,
        staged: &mut Staged<'_>,
        h: NewHandover,
        digests: Digests,
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<SubmitOutcome, StoreError> {
        let dedupe = records::dedupe_key(&h.sender, &h.message_id);
        if let Some(raw) = staged.get(TreeId::Dedupe, &dedupe)? {
            return self.repeat(staged, &h, &raw, &digests.content_hash, now);
        }
        self.refuse_retired(staged, &h, now)?;
        let patient_key = self.resolve_patient_of(staged, &h, now)?;
        self.last_handover += 1;
        let id = self.last_handover;
        let super::identity::Routed {
            destinations,
            followed,
        } = super::identity::with_withdrawals(staged, &patient_key, &h)?;
        let deliveries: Vec<(String, u64)> = destinations
            .iter()
            .map(|dest| {
                self.last_delivery += 1;
                (dest.mailbox.clone(), self.last_delivery)
            })
            .collect();
        let newer = Newer {
            actor: &h.actor,
            sender: &h.sender,
            event: h.event,
            patient_key: &patient_key,
            handover_id: id,
            authored_at_ms: h.authored_at_ms,
            deliveries: &deliveries,
            episode: h.episode.as_ref(),
        };
        let (written_later, supersedes) = self.join_lineage(staged, &newer, h.supersede, now)?;
        self.extend_claim_keys(staged, &patient_key, &h.claim_keys)?;
        let owner = Owner {
            handover_id: id,
            sender: &h.sender,
            event: h.event,
            patient_key: &patient_key,
        };
        for (i, (dest, (_, did))) in destinations.iter().zip(&deliveries).enumerate() {
            let mut record = new_delivery(&owner, dest, *did, &h.claim_keys, now);
            if let Some(f) = followed.as_ref().filter(|f| f.index == i) {
                let event = f.apply(&mut record, now);
                self.audit(staged, event, now);
            }
            self.enqueue(staged, &record);
            woken.insert(dest.mailbox.clone());
        }
        if let Some(moving) = records::moving_on(&h.sender, h.event, &destinations) {
            let corrected = supersedes.filter(|_| h.supersede);
            let handover = (id, patient_key.as_str());
            self.take_on(staged, moving, corrected, handover, now, woken)?;
        }
        self.store_payload(staged, id, &h.payload)?;
        let mut record = HandoverRecord {
            id,
            sender: h.sender,
            message_id: h.message_id,
            event: h.event,
            content_hash: digests.content_hash,
            payload_hash: digests.payload_hash,
            payload_len: h.payload.len() as u64,
            patient_key: patient_key.clone(),
            submitted_at_ms: now,
            deliveries: deliveries.iter().map(|(_, d)| *d).collect(),
            supersedes,
            finished_at_ms: None,
            shredded_at_ms: None,
            trace_parent: h.trace_parent,
            authored_at_ms: h.authored_at_ms,
            superseded_on_arrival_by: written_later.as_ref().map(|w| w.id),
            episode: h.episode,
            movement: h.movement,
            movement_as_written: h.movement_as_written,
        };
        if record.deliveries.is_empty() {
            self.finish_unrouted(staged, &mut record, now);
        }
        staged.put_json(TreeId::Handovers, records::be(id).to_vec(), &record);
        if let Some(latest) = &written_later {
            self.superseded_on_arrival(staged, (&h.actor, &deliveries), latest, now)?;
        }
        staged.put(TreeId::Dedupe, dedupe, records::be(id).to_vec());
        self.audit(
            staged,
            AuditEvent {
                actor: h.actor,
                action: "submit",
                handover_id: Some(id),
                patient_key: Some(patient_key),
                outcome: "ok".into(),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(SubmitOutcome {
            handover_id: id,
            deliveries,
            duplicate: false,
            superseded_on_arrival_by: written_later.map(|w| w.id),
        })
    }

    /// Writes live delivery `d` and puts it in its mailbox's order and in
    /// the schedule.
    fn enqueue(&mut self, staged: &mut Staged<'_>, d: &DeliveryRecord) {
        staged.put_json(TreeId::Deliveries, records::be(d.id).to_vec(), d);
        staged.put(
            TreeId::Pending,
            records::mailbox_key(&d.mailbox, d.id),
            Vec::new(),
        );
        self.schedule.insert(d.id, live_of(d));
    }

    /// Sends on the summaries `m.from` has not acknowledged, whose patient
    /// transfer or release `handover` sends to `m.to`
    /// ([`records::forwards_to`]).
    fn forward(
        &mut self,
        staged: &mut Staged<'_>,
        m: &records::MovingOn<'_>,
        (handover, patient_key): (u64, &str),
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        for did in self.schedule.of_patient(m.from, patient_key) {
            let key = records::be(did);
            let Some(mut d) = staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &key)? else {
                continue;
            };
            if !records::forwards_to(&d, m) {
                continue;
            }
            if let Some(held) = self.held_by(staged, &d, m.to)? {
                let event = records::held_event(&d, (m.from, m.to), held, handover);
                d.superseded_by = Some(held);
                self.retire(staged, &mut d, now)?;
                self.audit(staged, event, now);
                continue;
            }
            staged.del(TreeId::Pending, records::mailbox_key(m.from, did));
            self.schedule.remove(did);
            records::send_on(&mut d, m, handover, self.options.max_attempts);
            self.enqueue(staged, &d);
            self.audit(staged, records::forward_event(&d, m.from, handover), now);
            woken.insert(m.to.to_owned());
        }
        Ok(())
    }

    /// The copy of `d`'s summary that `to` holds already ([`records::held_by`]).
    fn held_by(
        &self,
        staged: &Staged<'_>,
        d: &DeliveryRecord,
        to: &str,
    ) -> Result<Option<u64>, StoreError> {
        let key = records::be(d.handover_id);
        let Some(h) = staged.get_json::<HandoverRecord>(TreeId::Handovers, &key)? else {
            return Ok(None);
        };
        let mut copies = Vec::with_capacity(h.deliveries.len());
        for id in &h.deliveries {
            copies
                .extend(staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(*id))?);
        }
        Ok(records::held_by(&copies, d, to).map(|c| c.id))
    }

    /// What `m.to` takes on with transfer or release `handover`: what
    /// `m.from` has not acknowledged, and, for one correcting `corrected`,
    /// what waits at the carer `corrected` named (the patient never went
    /// there).
    fn take_on(
        &mut self,
        staged: &mut Staged<'_>,
        m: records::MovingOn<'_>,
        corrected: Option<u64>,
        handover: (u64, &str),
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        // Nothing waits for the patient at the sender, and no transfer is
        // corrected (nearly every submit): nothing to look up.
        if corrected.is_none() && self.schedule.of_patient(m.from, handover.1).is_empty() {
            return Ok(());
        }
        // Only the movement reported last moves anything: a summary
        // superseded on arrival, or a late correction of an earlier custody
        // episode, does not say where the patient is now.
        let key = records::lineage_key(handover.1, m.from, m.event);
        let head = staged
            .get(TreeId::Lineage, &key)?
            .and_then(|v| records::from_be(&v));
        if head != Some(handover.0) {
            return Ok(());
        }
        self.forward(staged, &m, handover, now, woken)?;
        if let Some(named) = self.mistaken_carer(staged, corrected, m.event, handover.0)?
            && named.carer != m.to
            && named.carer != m.from
        {
            let from_named = records::MovingOn {
                from: &named.carer,
                ..m
            };
            self.forward(staged, &from_named, handover, now, woken)?;
            self.resend(staged, &from_named, &named.mistaken, handover, now, woken)?;
        }
        Ok(())
    }

    /// Sends `m.to` a new copy of each summary `m.from` acknowledged for the
    /// patient because transfer or release `mistaken` named it by mistake
    /// ([`records::resends_to`]), the latest of each lineage, unless `m.to`
    /// has a copy already. Its handover waits for the copy again.
    fn resend(
        &mut self,
        staged: &mut Staged<'_>,
        m: &records::MovingOn<'_>,
        mistaken: &records::Mistaken,
        (handover, patient_key): (u64, &str),
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let mut prefix = patient_key.as_bytes().to_vec();
        prefix.push(0);
        let mut latest: Vec<u64> = staged
            .scan_prefix(TreeId::Lineage, &prefix)?
            .iter()
            .filter_map(|(_, v)| records::from_be(v))
            .filter(|id| *id != handover)
            .collect();
        // Oldest first, as the PostgreSQL engine: the new copies queue in
        // the order the summaries were submitted.
        latest.sort_unstable();
        latest.dedup();
        for id in latest {
            let key = records::be(id);
            let Some(mut h) = staged.get_json::<HandoverRecord>(TreeId::Handovers, &key)? else {
                continue;
            };
            let mut copies = Vec::with_capacity(h.deliveries.len());
            for did in &h.deliveries {
                copies.extend(
                    staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(*did))?,
                );
            }
            let Some(acked) = records::copy_to_resend(&copies, m, mistaken) else {
                continue;
            };
            if h.shredded_at_ms.is_some() {
                tracing::warn!(
                    alert = "resend_payload_removed",
                    handover = h.id,
                    to = m.to,
                    "a summary the wrongly named carer acknowledged cannot be sent again: its payload was removed under the retention policy"
                );
                continue;
            }
            self.last_delivery += 1;
            let ids = (self.last_delivery, handover);
            let copy = records::resent_copy(acked, m, ids, patient_key, now);
            Self::reopen(&mut h);
            h.deliveries.push(copy.id);
            staged.put_json(TreeId::Handovers, key.to_vec(), &h);
            self.enqueue(staged, &copy);
            self.audit(staged, records::resend_event(&copy, m.from, handover), now);
            woken.insert(m.to.to_owned());
        }
        Ok(())
    }

    /// What the practice that claimed parked release `d` takes on from the
    /// prison that released the patient ([`records::claimed_moving_on`]):
    /// nothing once a custody movement of the patient was reported since
    /// the release (a recall brought them back: the prison holding them
    /// keeps what waits for them).
    pub(super) fn take_on_claimed(
        &mut self,
        staged: &mut Staged<'_>,
        d: &DeliveryRecord,
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let Some(m) = records::claimed_moving_on(d) else {
            return Ok(());
        };
        let release =
            staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(d.handover_id))?;
        let Some(release) = release else {
            return Ok(());
        };
        if super::identity::moved_since(staged, &release, &records::CUSTODY_EVENTS, None)? {
            return Ok(());
        }
        self.take_on(staged, m, None, (d.handover_id, &d.patient_key), now, woken)
    }

    /// What `correction` takes from: who the `event` it supersedes
    /// (`corrected`) sent the patient to ([`records::first_carer`]), with that
    /// handover and the earlier ones it corrects that named the same carer
    /// ([`records::Mistaken`]). `None` once a custody movement of the
    /// patient was reported since the first of them (other than
    /// `correction`): the patient's place is then that movement's, and what
    /// waits at that carer, or was sent there since, is left where it is.
    fn mistaken_carer(
        &self,
        staged: &Staged<'_>,
        corrected: Option<u64>,
        event: crate::journey::JourneyEvent,
        correction: u64,
    ) -> Result<Option<records::FirstNamed>, StoreError> {
        let load = |id: u64| staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(id));
        let carer_of = |h: &HandoverRecord| -> Result<Option<String>, StoreError> {
            let mut copies = Vec::with_capacity(h.deliveries.len());
            for id in &h.deliveries {
                copies.extend(
                    staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(*id))?,
                );
            }
            Ok(records::first_carer(&copies, event))
        };
        let Some(corrected) = corrected else {
            return Ok(None);
        };
        let Some(mut first) = load(corrected)? else {
            records::corrected_handover_removed(corrected, correction);
            return Ok(None);
        };
        let Some(carer) = carer_of(&first)? else {
            return Ok(None);
        };
        let mut ids = vec![first.id];
        for _ in 0..super::identity::GIVEN_WALK {
            let Some(older) = first.supersedes.map(load).transpose()?.flatten() else {
                break;
            };
            if !records::kept_carer(&first, &older, carer_of(&older)?.as_deref(), &carer) {
                break;
            }
            ids.push(older.id);
            first = older;
        }
        let events = &records::CUSTODY_EVENTS;
        if super::identity::moved_since(staged, &first, events, Some(correction))? {
            return Ok(None);
        }
        ids.reverse();
        let mistaken = records::Mistaken {
            ids,
            at_ms: first.submitted_at_ms,
        };
        Ok(Some(records::FirstNamed { carer, mistaken }))
    }

    /// The patient key `h` is filed under; an identity conflict is recorded
    /// for operators and refused.
    fn resolve_patient_of(
        &mut self,
        staged: &mut Staged<'_>,
        h: &NewHandover,
        now: i64,
    ) -> Result<String, StoreError> {
        match self.resolve_patient(staged, &h.patient, records::may_link(h.event), now)? {
            Ok(key) => Ok(key),
            Err((field, key)) => {
                let conflict = IdentityConflict {
                    at_ms: now,
                    sender: h.sender.clone(),
                    message_id: h.message_id.clone(),
                    field: field.to_owned(),
                };
                self.record_conflict(staged, conflict, &h.actor, (None, Some(key)));
                Err(StoreError::IdentityConflict { field })
            }
        }
    }

    /// Answers a submit whose (sender, message id) was accepted before: the
    /// original receipt for the same content, a conflict for other content.
    /// Refuses (and audits) a submit whose message id names a handover
    /// removed under the retention policy while its tombstone is held.
    fn refuse_retired(
        &mut self,
        staged: &mut Staged<'_>,
        h: &NewHandover,
        now: i64,
    ) -> Result<(), StoreError> {
        let key = super::TrackKey::MessageId(h.message_id.clone());
        match self.tombstone_for(staged, &h.sender, &key)? {
            Some(t) => {
                self.audit(staged, records::retired_event(&h.actor, &t), now);
                Err(StoreError::Retired {
                    removed_at_ms: t.removed_at_ms,
                })
            }
            None => Ok(()),
        }
    }

    fn repeat(
        &mut self,
        staged: &mut Staged<'_>,
        h: &NewHandover,
        dedupe_value: &[u8],
        content_hash: &str,
        now: i64,
    ) -> Result<SubmitOutcome, StoreError> {
        let id = records::from_be(dedupe_value)
            .ok_or_else(|| StoreError::Corrupt("dedupe value is not 8 bytes".into()))?;
        let original: HandoverRecord = staged
            .get_json(TreeId::Handovers, &records::be(id))?
            .ok_or_else(|| StoreError::Corrupt(format!("dedupe names missing handover {id}")))?;
        let mut event = AuditEvent {
            actor: h.actor.clone(),
            action: "submit",
            handover_id: Some(id),
            patient_key: Some(original.patient_key.clone()),
            outcome: "ok: duplicate of an accepted submit".into(),
            ..AuditEvent::default()
        };
        if original.content_hash != content_hash {
            event.outcome = "refused: message id reused for different content".into();
            self.audit(staged, event, now);
            return Err(StoreError::Conflict);
        }
        let mut deliveries = Vec::with_capacity(original.deliveries.len());
        for d in &original.deliveries {
            let rec: DeliveryRecord = staged
                .get_json(TreeId::Deliveries, &records::be(*d))?
                .ok_or_else(|| StoreError::Corrupt(format!("delivery {d} missing")))?;
            deliveries.push((rec.mailbox, rec.id));
        }
        self.audit(staged, event, now);
        Ok(SubmitOutcome {
            handover_id: id,
            deliveries,
            duplicate: true,
            superseded_on_arrival_by: original.superseded_on_arrival_by,
        })
    }

    /// Seals the payload under a fresh data key and stores it in chunks
    /// (encryption at rest, see `crypt`).
    fn store_payload(
        &self,
        staged: &mut Staged<'_>,
        id: u64,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let (data_key, sealed) = self.cipher.seal(id, payload)?;
        staged.put(TreeId::DataKeys, records::be(id).to_vec(), data_key);
        for (i, chunk) in sealed.chunks(records::CHUNK_BYTES).enumerate() {
            let i =
                u32::try_from(i).map_err(|_| StoreError::Corrupt("payload too large".into()))?;
            staged.put(
                TreeId::Payloads,
                records::payload_key(id, i).to_vec(),
                records::encode_chunk(chunk),
            );
        }
        Ok(())
    }

    fn pull(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        mailbox: &str,
        (max, max_bytes): (usize, Option<u64>),
        lease_ms: i64,
        now: i64,
    ) -> Result<Vec<LeasedDelivery>, StoreError> {
        let max_attempts = self.options.max_attempts;
        let mut bytes = records::StoredBytes::new(max_bytes);
        self.retire_expired_stale(staged, actor, Some(mailbox), now)?;
        for id in self.schedule.exhausted(now, max_attempts, Some(mailbox)) {
            self.quarantine_expired(staged, actor, id, now)?;
        }
        let ready = self.schedule.ready(mailbox, now, max, max_attempts);
        let mut leased = Vec::with_capacity(ready.len());
        for id in ready {
            let mut d: DeliveryRecord = staged
                .get_json(TreeId::Deliveries, &records::be(id))?
                .ok_or_else(|| StoreError::Corrupt(format!("live delivery {id} has no record")))?;
            let Some(handover) = staged
                .get_json::<HandoverRecord>(TreeId::Handovers, &records::be(d.handover_id))?
            else {
                // The store is damaged under us (a corrupt log segment can
                // drop a record): this delivery cannot be sent, but the
                // others can, and the store must go on taking changes.
                self.quarantine_damaged(staged, actor, &mut d, now);
                continue;
            };
            if !bytes.take(&handover) {
                break;
            }
            d.attempt += 1;
            d.state = DeliveryState::Leased;
            d.lease_until_ms = Some(now.saturating_add(lease_ms));
            d.not_before_ms = None;
            d.last_leased_at_ms = Some(now);
            staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            self.schedule
                .lease(id, d.attempt, now.saturating_add(lease_ms));
            self.audit(
                staged,
                AuditEvent {
                    actor: actor.to_owned(),
                    action: "pull",
                    handover_id: Some(d.handover_id),
                    delivery_id: Some(id),
                    patient_key: Some(d.patient_key.clone()),
                    outcome: format!("ok: leased, attempt {}", d.attempt),
                },
                now,
            );
            leased.push(LeasedDelivery {
                delivery: d,
                handover,
            });
        }
        Ok(leased)
    }

    /// Loads a delivery for an ack or nack from `mailbox`, checking the attempt
    /// and lease; refusals are audited.
    #[allow(clippy::too_many_arguments)]
    fn leased_for(
        &mut self,
        staged: &mut Staged<'_>,
        action: &'static str,
        (actor, mailbox): (&str, &str),
        delivery_id: u64,
        attempt: u32,
        now: i64,
    ) -> Result<records::LeaseVerdict, StoreError> {
        let found: Option<DeliveryRecord> =
            staged.get_json(TreeId::Deliveries, &records::be(delivery_id))?;
        let foreign = records::foreign(found.as_ref(), mailbox);
        let verdict = records::lease_verdict(found, mailbox, attempt, now);
        if let Err((e, d)) = &verdict {
            let event = records::refused_lease_audit(action, actor, attempt, (e, d), foreign);
            self.audit(staged, event, now);
        }
        Ok(verdict)
    }

    fn ack(
        &mut self,
        staged: &mut Staged<'_>,
        (actor, mailbox): (&str, &str),
        delivery_id: u64,
        attempt: u32,
        now: i64,
    ) -> Result<AckOutcome, StoreError> {
        let mut d =
            match self.leased_for(staged, "ack", (actor, mailbox), delivery_id, attempt, now)? {
                Ok(d) => d,
                Err(refused) => return Ok(AckOutcome::refused(attempt, refused)),
            };
        d.state = DeliveryState::Delivered;
        d.delivered_at_ms = Some(now);
        d.lease_until_ms = None;
        let (handover_id, patient_key) = (d.handover_id, d.patient_key.clone());
        staged.del(TreeId::Pending, records::mailbox_key(mailbox, delivery_id));
        self.schedule.remove(delivery_id);
        // Writes `d` (finished now) once.
        self.delivery_finished(staged, d, now)?;
        self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "ack",
                handover_id: Some(handover_id),
                delivery_id: Some(delivery_id),
                patient_key: Some(patient_key),
                outcome: "ok: delivered".into(),
            },
            now,
        );
        Ok(AckOutcome::Acknowledged)
    }

    /// Every attempt of a batch acknowledgement, in order, in this one
    /// change (see [`super::SledStore::ack_batch`]).
    fn ack_batch(
        &mut self,
        staged: &mut Staged<'_>,
        who: (&str, &str),
        attempts: &[(u64, u32)],
        now: i64,
    ) -> Result<Vec<AckOutcome>, StoreError> {
        attempts
            .iter()
            .map(|&(delivery_id, attempt)| self.ack(staged, who, delivery_id, attempt, now))
            .collect()
    }

    /// See [`super::SledStore::return_unsent`].
    fn return_unsent(
        &mut self,
        staged: &mut Staged<'_>,
        who: (&str, &str),
        attempts: &[(u64, u32)],
        now: i64,
    ) -> Result<(), StoreError> {
        for &(delivery_id, attempt) in attempts {
            let Ok(mut d) = self.leased_for(staged, "pull", who, delivery_id, attempt, now)? else {
                continue;
            };
            if d.is_superseded() {
                // A newer summary came meanwhile: this one is never sent.
                self.retire(staged, &mut d, now)?;
            } else {
                d.attempt = attempt.saturating_sub(1);
                d.state = DeliveryState::Queued;
                d.lease_until_ms = None;
                d.not_before_ms = None;
                self.schedule.unlease(delivery_id, d.attempt, now);
                staged.put_json(TreeId::Deliveries, records::be(delivery_id).to_vec(), &d);
            }
            self.audit(
                staged,
                records::returned_unsent_event(who.0, &d, attempt),
                now,
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn nack(
        &mut self,
        staged: &mut Staged<'_>,
        who: (&str, &str),
        delivery_id: u64,
        attempt: u32,
        permanent: bool,
        reason: &str,
        now: i64,
    ) -> Result<DeliveryState, StoreError> {
        // The same nack again (its answer lost): answered as it was.
        if let Some(d) =
            staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(delivery_id))?
            && d.mailbox == who.1
            && records::repeated_nack(&d, attempt, permanent)
        {
            self.audit(staged, records::repeated_nack_event(who.0, &d), now);
            return Ok(d.state);
        }
        let mut d = match self.leased_for(staged, "nack", who, delivery_id, attempt, now)? {
            Ok(d) => d,
            Err((e, _)) => return Err(e),
        };
        d.nacked_attempt = Some(attempt);
        let (actor, _) = who;
        let max_attempts = d.max_attempts.unwrap_or(self.options.max_attempts);
        let state = if d.is_superseded() {
            // A newer summary exists: never offered again, nor quarantined.
            self.retire(staged, &mut d, now)?;
            DeliveryState::Superseded
        } else if permanent || d.attempt >= max_attempts {
            let why = if permanent {
                format!("permanent nack: {reason}")
            } else {
                format!("nack on the last allowed attempt ({}): {reason}", d.attempt)
            };
            self.quarantine(staged, &mut d, why, now);
            DeliveryState::Quarantined
        } else {
            let backoff = records::nack_backoff_ms(self.options.retry_backoff_ms, d.attempt);
            let not_before = now.saturating_add(backoff);
            d.state = DeliveryState::Queued;
            d.lease_until_ms = None;
            d.not_before_ms = Some(not_before);
            d.reason = Some(format!("retryable nack: {reason}"));
            self.schedule.requeue(delivery_id, not_before);
            staged.put_json(TreeId::Deliveries, records::be(delivery_id).to_vec(), &d);
            DeliveryState::Queued
        };
        self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "nack",
                handover_id: Some(d.handover_id),
                delivery_id: Some(delivery_id),
                patient_key: Some(d.patient_key.clone()),
                outcome: format!("ok: {}", records::state_name(state)),
            },
            now,
        );
        Ok(state)
    }

    fn quarantine(
        &mut self,
        staged: &mut Staged<'_>,
        d: &mut DeliveryRecord,
        why: String,
        now: i64,
    ) {
        d.state = DeliveryState::Quarantined;
        d.quarantined_at_ms = Some(now);
        d.lease_until_ms = None;
        d.reason = Some(why);
        staged.put_json(TreeId::Deliveries, records::be(d.id).to_vec(), &*d);
        staged.del(TreeId::Pending, records::mailbox_key(&d.mailbox, d.id));
        staged.put(
            TreeId::Quarantine,
            records::mailbox_key(&d.mailbox, d.id),
            Vec::new(),
        );
        *self.quarantined.entry(d.mailbox.clone()).or_default() += 1;
        self.quarantined_of
            .entry(d.patient_key.clone())
            .or_default()
            .insert(d.id);
        self.schedule.remove(d.id);
    }

    /// Takes a delivery out of the quarantine counts (redriven or retired).
    pub(super) fn forget_quarantined(&mut self, d: &DeliveryRecord) {
        if let Some(n) = self.quarantined.get_mut(&d.mailbox) {
            *n = n.saturating_sub(1);
        }
        if let Some(ids) = self.quarantined_of.get_mut(&d.patient_key) {
            ids.remove(&d.id);
            if ids.is_empty() {
                self.quarantined_of.remove(&d.patient_key);
            }
        }
    }

    fn claim(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        claim_keys: &[String],
        (to, evidence): (&str, &str),
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let mut claimed = Vec::new();
        for id in self.schedule.of_mailbox(records::PARKED_MAILBOX) {
            let mut d: DeliveryRecord = staged
                .get_json(TreeId::Deliveries, &records::be(id))?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("parked delivery {id} has no record"))
                })?;
            match d.claim_match(claim_keys) {
                records::ClaimMatch::Matches => {}
                records::ClaimMatch::Unmatched => continue,
                records::ClaimMatch::Contradicted => {
                    let event = records::contradicted_claim_event(actor, to, &d);
                    self.audit(staged, event, now);
                    continue;
                }
            }
            staged.del(TreeId::Pending, records::mailbox_key(&d.mailbox, id));
            self.schedule.remove(id);
            d.mailbox = to.to_owned();
            d.state = DeliveryState::Queued;
            d.claimed_by = Some(actor.to_owned());
            d.claimed_at_ms = Some(now);
            staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            staged.put(TreeId::Pending, records::mailbox_key(to, id), Vec::new());
            self.schedule.insert(id, live_of(&d));
            self.audit(
                staged,
                AuditEvent {
                    actor: actor.to_owned(),
                    action: "claim",
                    handover_id: Some(d.handover_id),
                    delivery_id: Some(id),
                    patient_key: Some(d.patient_key.clone()),
                    outcome: format!("ok: parked release claimed for {to}; {evidence}"),
                },
                now,
            );
            woken.insert(to.to_owned());
            self.take_on_claimed(staged, &d, now, woken)?;
            claimed.push(d);
        }
        if claimed.is_empty() {
            self.audit(
                staged,
                AuditEvent {
                    actor: actor.to_owned(),
                    action: "claim",
                    outcome: "refused: no parked release matches".into(),
                    ..AuditEvent::default()
                },
                now,
            );
        }
        Ok(claimed)
    }

    /// See [`super::SledStore::route_held`].
    fn route_held(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        moves: &[(u64, String)],
        now: i64,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let mut routed = Vec::new();
        for (id, to) in moves {
            let id = *id;
            let Some(mut d) =
                staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(id))?
            else {
                continue;
            };
            let Some(state) = records::held_move(&d, to) else {
                continue;
            };
            staged.del(TreeId::Pending, records::mailbox_key(&d.mailbox, id));
            self.schedule.remove(id);
            let event = records::route_held_event(actor, &d, to);
            d.mailbox.clone_from(to);
            d.state = state;
            staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            staged.put(TreeId::Pending, records::mailbox_key(to, id), Vec::new());
            self.schedule.insert(id, live_of(&d));
            self.audit(staged, event, now);
            routed.push(d);
        }
        Ok(routed)
    }

    fn redrive(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        ids: &[u64],
        now: i64,
        woken: &mut BTreeSet<String>,
    ) -> Result<Vec<(u64, RedriveOutcome)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let found: Option<DeliveryRecord> =
                staged.get_json(TreeId::Deliveries, &records::be(id))?;
            let event = |outcome: &RedriveOutcome| {
                records::redrive_event(actor, id, found.as_ref(), outcome)
            };
            let outcome = match found.clone() {
                None => RedriveOutcome::Unknown,
                Some(d) if d.state != DeliveryState::Quarantined => {
                    RedriveOutcome::NotQuarantined(d.state)
                }
                Some(d) if self.outdated_notice(staged, &d)? => RedriveOutcome::Outdated,
                Some(mut d) => {
                    staged.del(TreeId::Quarantine, records::mailbox_key(&d.mailbox, id));
                    staged.put(
                        TreeId::Pending,
                        records::mailbox_key(&d.mailbox, id),
                        Vec::new(),
                    );
                    self.forget_quarantined(&d);
                    d.state = DeliveryState::Queued;
                    d.not_before_ms = None;
                    d.lease_until_ms = None;
                    d.max_attempts = Some(d.attempt.saturating_add(self.options.max_attempts));
                    d.reason = d.reason.map(|r| format!("redriven after: {r}"));
                    staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
                    self.schedule.insert(id, live_of(&d));
                    woken.insert(d.mailbox.clone());
                    RedriveOutcome::Requeued
                }
            };
            self.audit(staged, event(&outcome), now);
            out.push((id, outcome));
        }
        Ok(out)
    }

    /// Whether `d` is an admission notice whose patient has been released,
    /// or admitted again, since its admission
    /// ([`super::identity::left_custody_since`]).
    fn outdated_notice(&self, staged: &Staged<'_>, d: &DeliveryRecord) -> Result<bool, StoreError> {
        if d.view != records::ADMISSION_NOTICE_VIEW {
            return Ok(false);
        }
        let Some(h) = staged.get_json(TreeId::Handovers, &records::be(d.handover_id))? else {
            return Ok(false);
        };
        super::identity::left_custody_since(staged, &h)
    }

    fn stats(&self, now: i64) -> Vec<MailboxStats> {
        let counts = self.schedule.counts(now);
        let mut names: BTreeSet<&String> = counts.keys().collect();
        names.extend(
            self.quarantined
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(m, _)| m),
        );
        names
            .into_iter()
            .map(|m| {
                let c = counts.get(m).cloned().unwrap_or_default();
                MailboxStats {
                    mailbox: m.clone(),
                    depth: c.depth,
                    leased: c.leased,
                    urgent: c.urgent,
                    overdue: c.overdue,
                    quarantined: self.quarantined.get(m).copied().unwrap_or(0),
                    oldest_age_ms: c.oldest_queued_at_ms.map(|t| now.saturating_sub(t)),
                }
            })
            .collect()
    }

    /// Quarantines `d`, whose handover record is missing from the store,
    /// audited and raised as an alert.
    fn quarantine_damaged(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        d: &mut DeliveryRecord,
        now: i64,
    ) {
        tracing::error!(
            alert = "store_damaged",
            delivery_id = d.id,
            handover_id = d.handover_id,
            "ALERT: a queued delivery's handover record is missing: the store is damaged; quarantined (restore the handover from a backup, or ask its sender to send it again)"
        );
        self.quarantine(
            staged,
            d,
            "the store is damaged: its handover record is missing (restore from a backup, or ask the sender to send it again)".into(),
            now,
        );
        self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "quarantine",
                handover_id: Some(d.handover_id),
                delivery_id: Some(d.id),
                patient_key: Some(d.patient_key.clone()),
                outcome: "ok: its handover record is missing (store damaged)".into(),
            },
            now,
        );
    }

    fn quarantine_expired(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        id: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut d: DeliveryRecord = staged
            .get_json(TreeId::Deliveries, &records::be(id))?
            .ok_or_else(|| StoreError::Corrupt(format!("live delivery {id} has no record")))?;
        let why = format!(
            "lease expired without an ack on attempt {} of {}",
            d.attempt,
            d.max_attempts.unwrap_or(self.options.max_attempts)
        );
        self.quarantine(staged, &mut d, why, now);
        self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "quarantine",
                handover_id: Some(d.handover_id),
                delivery_id: Some(id),
                patient_key: Some(d.patient_key.clone()),
                outcome: "ok: maximum attempts reached".into(),
            },
            now,
        );
        Ok(())
    }

    fn sweep(&mut self, staged: &mut Staged<'_>, now: i64) -> Result<SweepOutcome, StoreError> {
        self.retire_expired_stale(staged, "urn:gateway:sweeper", None, now)?;
        let ids = self
            .schedule
            .exhausted(now, self.options.max_attempts, None);
        for &id in &ids {
            self.quarantine_expired(staged, "urn:gateway:sweeper", id, now)?;
        }
        let mut newly_overdue = Vec::new();
        // Bounded, so a backlog of missed deadlines cannot make one huge batch.
        for id in self.schedule.take_overdue(now, 1_000) {
            let Some(mut d) =
                staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(id))?
            else {
                continue;
            };
            d.overdue_at_ms = Some(now);
            staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            newly_overdue.push(d);
        }
        Ok(SweepOutcome {
            quarantined: ids.len(),
            newly_overdue,
        })
    }

    fn track(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        sender: &str,
        key: TrackKey,
        now: i64,
    ) -> Result<HandoverStatus, StoreError> {
        let id = match &key {
            TrackKey::HandoverId(id) => Some(*id),
            TrackKey::MessageId(m) => staged
                .get(TreeId::Dedupe, &records::dedupe_key(sender, m))?
                .and_then(|v| records::from_be(&v)),
        };
        let handover: Option<HandoverRecord> = match id {
            Some(id) => staged.get_json(TreeId::Handovers, &records::be(id))?,
            None => None,
        };
        let (handover, foreign) = match handover {
            Some(h) if h.sender == sender => (Some(h), None),
            Some(h) => (None, Some((h.id, h.patient_key))),
            None => (None, None),
        };
        let Some(handover) = handover else {
            let error = match self.tombstone_for(staged, sender, &key)? {
                Some(t) => StoreError::Removed {
                    removed_at_ms: t.removed_at_ms,
                },
                None => StoreError::UnknownHandover,
            };
            let event = records::refused_track_event(actor, id, &error, foreign);
            self.audit(staged, event, now);
            return Err(error);
        };
        let mut deliveries = Vec::with_capacity(handover.deliveries.len());
        for d in &handover.deliveries {
            deliveries.push(
                staged
                    .get_json(TreeId::Deliveries, &records::be(*d))?
                    .ok_or_else(|| StoreError::Corrupt(format!("delivery {d} missing")))?,
            );
        }
        self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "track",
                handover_id: Some(handover.id),
                patient_key: Some(handover.patient_key.clone()),
                outcome: "ok".into(),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(HandoverStatus {
            handover,
            deliveries,
        })
    }
}

fn refuse(job: Job) -> Answer {
    let e = || StoreError::Unavailable("store refuses changes after a failure".into());
    match job {
        Job::Submit(_, _, r) => Answer::submit(r, Err(e())),
        Job::Pull { reply, .. } => Answer::new(reply, Err(e())),
        Job::Ack { reply, .. } => Answer::new(reply, Err(e())),
        Job::RegistryPut { reply, .. } | Job::MeshPut { reply, .. } | Job::Record(_, reply) => {
            Answer::new(reply, Err(e()))
        }
        Job::AckBatch { reply, .. } => Answer::new(reply, Err(e())),
        Job::Nack { reply, .. } => Answer::new(reply, Err(e())),
        Job::ReturnUnsent { reply, .. } => Answer::new(reply, Err(e())),
        Job::Track { reply, .. } => Answer::new(reply, Err(e())),
        Job::Sweep(reply) => Answer::new(reply, Err(e())),
        Job::Retention(reply) => Answer::new(reply, Err(e())),
        Job::RetentionStats(reply) => Answer::new(reply, Err(e())),
        Job::Claim { reply, .. } | Job::RouteHeld { reply, .. } => Answer::new(reply, Err(e())),
        Job::Pds(_, reply) => Answer::new(reply, Err(e())),
        Job::PdsNotify(_, reply) => Answer::new(reply, Err(e())),
        Job::Redrive { reply, .. } => Answer::new(reply, Err(e())),
        Job::Stats(reply) => Answer::new(reply, Err(e())),
        Job::Probe(reply) => Answer::new(reply, Err(e())),
        Job::Shutdown(reply) => Answer::new(reply, Ok(())),
    }
}

/// A new handover's delivery record for destination `dest`.
/// Who a new delivery belongs to: its handover's id, sender, event and
/// patient.
pub(super) struct Owner<'a> {
    pub handover_id: u64,
    pub sender: &'a str,
    pub event: crate::journey::JourneyEvent,
    pub patient_key: &'a str,
}

/// A new delivery's record: queued (parked in a parked mailbox, the only
/// place `claim_keys` are kept, since only a parked release is claimed).
pub(super) fn new_delivery(
    owner: &Owner<'_>,
    dest: &super::NewDelivery,
    id: u64,
    claim_keys: &[String],
    now: i64,
) -> DeliveryRecord {
    let parked = records::is_parked_mailbox(&dest.mailbox);
    DeliveryRecord {
        id,
        handover_id: owner.handover_id,
        mailbox: dest.mailbox.clone(),
        patient_key: owner.patient_key.to_owned(),
        urgent: dest.urgent,
        state: if parked {
            DeliveryState::Parked
        } else {
            DeliveryState::Queued
        },
        attempt: 0,
        lease_until_ms: None,
        not_before_ms: None,
        queued_at_ms: now,
        last_leased_at_ms: None,
        delivered_at_ms: None,
        quarantined_at_ms: None,
        reason: None,
        view: dest.view.clone(),
        not_carried: dest.not_carried.clone(),
        event: Some(owner.event),
        due_ms: dest.due_ms,
        overdue_at_ms: None,
        superseded_by: None,
        superseded_by_handover: None,
        sender: Some(owner.sender.to_owned()),
        superseded_at_ms: None,
        // A release's copy for its practice keeps them too: it is parked if
        // the practice is disabled before it pulls (`records::held_move`).
        claim_keys: if parked
            || (owner.event == crate::journey::JourneyEvent::Release
                && dest.view == records::FULL_VIEW)
        {
            claim_keys.to_vec()
        } else {
            Vec::new()
        },
        claimed_by: None,
        claimed_at_ms: None,
        max_attempts: None,
        finished_at_ms: None,
        pds: None,
        nacked_attempt: None,
        forwarded_from: None,
        forwarded_by: None,
    }
}

/// A committed delivery record.
fn delivery_at(trees: &[sled::Tree], id: u64) -> Result<DeliveryRecord, StoreError> {
    let raw = trees[TreeId::Deliveries as usize]
        .get(records::be(id))?
        .ok_or_else(|| StoreError::Corrupt(format!("indexed delivery {id} has no record")))?;
    serde_json::from_slice(&raw).map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))
}

/// The live and quarantined deliveries, rebuilt from the trees.
pub(super) fn rebuild_index(trees: &[sled::Tree]) -> Result<Index, StoreError> {
    let mut index = Index {
        schedule: load_schedule(trees)?,
        ..Index::default()
    };
    for entry in trees[TreeId::Quarantine as usize].iter() {
        let (key, _) = entry?;
        let (mailbox, id) = records::split_mailbox_key(&key)
            .ok_or_else(|| StoreError::Corrupt("quarantine key layout".into()))?;
        *index.quarantined.entry(mailbox).or_default() += 1;
        let d = delivery_at(trees, id)?;
        index
            .quarantined_of
            .entry(d.patient_key)
            .or_default()
            .insert(id);
    }
    Ok(index)
}

/// The queue index, rebuilt from the `pending` tree. Records are read in
/// delivery id order, so each page of the `deliveries` tree is read once
/// (in mailbox order, two mailboxes' interleaved ids read every page twice
/// and, with a cache smaller than the tree, from disk twice), and only the
/// fields the index needs are decoded.
fn load_schedule(trees: &[sled::Tree]) -> Result<Schedule, StoreError> {
    let mut ids = Vec::new();
    for entry in trees[TreeId::Pending as usize].iter().keys() {
        let (_, id) = records::split_mailbox_key(&entry?)
            .ok_or_else(|| StoreError::Corrupt("pending key layout".into()))?;
        ids.push(id);
    }
    ids.sort_unstable();
    let deliveries = &trees[TreeId::Deliveries as usize];
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        let raw = deliveries
            .get(records::be(id))?
            .ok_or_else(|| StoreError::Corrupt(format!("indexed delivery {id} has no record")))?;
        let facts: records::ScheduleFacts<'_> = serde_json::from_slice(&raw)
            .map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))?;
        rows.push((id, live_of_facts(&facts)));
    }
    Ok(Schedule::from_rows(rows))
}

fn live_of_facts(d: &records::ScheduleFacts<'_>) -> Live {
    Live {
        mailbox: (*d.mailbox).into(),
        patient_key: (*d.patient_key).into(),
        urgent: d.urgent,
        attempt: d.attempt,
        lease: match (d.state, d.lease_until_ms) {
            (DeliveryState::Leased, Some(until_ms)) => Slot::Leased { until_ms },
            _ => Slot::Queued {
                not_before_ms: d.not_before_ms.unwrap_or(i64::MIN),
            },
        },
        queued_at_ms: d.queued_at_ms,
        due_ms: d.due_ms,
        due_reported: d.overdue_at_ms.is_some(),
        max_attempts: d.max_attempts,
        stale: d.state == DeliveryState::Leased && d.is_superseded(),
    }
}

pub(super) fn live_of(d: &DeliveryRecord) -> Live {
    Live {
        mailbox: d.mailbox.as_str().into(),
        patient_key: d.patient_key.as_str().into(),
        urgent: d.urgent,
        attempt: d.attempt,
        lease: match (d.state, d.lease_until_ms) {
            (DeliveryState::Leased, Some(until_ms)) => Slot::Leased { until_ms },
            _ => Slot::Queued {
                not_before_ms: d.not_before_ms.unwrap_or(i64::MIN),
            },
        },
        queued_at_ms: d.queued_at_ms,
        due_ms: d.due_ms,
        due_reported: d.overdue_at_ms.is_some(),
        max_attempts: d.max_attempts,
        stale: d.state == DeliveryState::Leased && d.is_superseded(),
    }
}

/// A submit's two SHA-256 digests, worked out before it reaches the writer.
pub(super) struct Digests {
    /// [`content_hash`].
    content_hash: String,
    /// The payload's, checked on every read.
    payload_hash: String,
}

impl Digests {
    pub(super) fn of(h: &NewHandover) -> Self {
        Self {
            content_hash: content_hash(h),
            payload_hash: hex(&Sha256::digest(&h.payload)),
        }
    }
}

/// SHA-256 over what makes two submits the same: what the sender sent (event,
/// patient, the destinations it named, payload), not where routing sent it,
/// which may change with the registry between a submit and its retry.
/// Length-prefixed so fields cannot run together.
pub(super) fn content_hash(h: &NewHandover) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(h.event.to_string().as_bytes());
    // The key a patient had before identity links: a repeat of an older
    // submit still hashes the same.
    field(h.patient.first_key().unwrap_or("unidentified").as_bytes());
    for d in &h.requested_destinations {
        field(d.as_bytes());
    }
    field(&h.payload);
    hex(&hasher.finalize())
}

/// Reads and checks a payload (see [`super::Store::payload`]).
pub(super) fn read_payload(
    trees: &[sled::Tree],
    cipher: &super::crypt::PayloadCipher,
    handover: &HandoverRecord,
) -> Result<Vec<u8>, StoreError> {
    let tree = &trees[TreeId::Payloads as usize];
    let mut payload = Vec::with_capacity(usize::try_from(handover.payload_len).unwrap_or(0));
    for entry in tree.scan_prefix(records::be(handover.id)) {
        let (_, value) = entry?;
        let chunk = records::decode_chunk(&value).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "payload chunk of handover {} fails its CRC",
                handover.id
            ))
        })?;
        payload.extend_from_slice(chunk);
    }
    let keys = &trees[TreeId::DataKeys as usize];
    let data_key = keys.get(records::be(handover.id))?;
    let payload = match cipher.open(handover.id, data_key.as_deref(), &payload) {
        Ok(payload) => payload,
        // A retention pass may have rewrapped the key under a new epoch and
        // destroyed the old one between the read and the open: a key that
        // changed meanwhile is read again, once, before the payload is
        // called damaged (which quarantines a healthy delivery).
        Err(e) => match keys.get(records::be(handover.id))? {
            Some(again) if data_key.as_ref() != Some(&again) => {
                cipher.open(handover.id, Some(&again), &payload)?
            }
            _ => return Err(e),
        },
    };
    if hex(&Sha256::digest(&payload)) != handover.payload_hash {
        return Err(StoreError::Corrupt(format!(
            "payload of handover {} does not match its SHA-256",
            handover.id
        )));
    }
    Ok(payload)
}
