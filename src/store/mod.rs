//! The durable store: per-recipient queues in one embedded sled database.
//!
//! # Invariants
//! - Every state change (submit, lease, ack, nack, quarantine, and the audit
//!   entry that records it) is part of one multi-tree sled transaction.
//! - No caller is answered before the transaction holding its change has
//!   passed the [`DurabilityBarrier`] (`flush` + `fdatasync`). One writer
//!   thread takes every pending change from a channel, applies them in one
//!   transaction, runs one barrier and answers them all (group commit): one
//!   change when idle, many under load.
//! - Payload chunks carry a CRC-32 and the whole payload a SHA-256, both
//!   checked on every read.
//! - The witness (outside the data directory, [`high_water`]) promises how
//!   many batches were durable and anchors the audit chain's head; a store
//!   that opens with fewer batches refuses with [`StoreError::Behind`], one
//!   without its witness or at odds with it with [`StoreError::Witness`]
//!   (see [`integrity`]).
//! - After a failed commit or barrier the store refuses all further changes
//!   ([`StoreError::Unavailable`]): after a failed `fsync` nothing since the
//!   last good one can be trusted, so the process must restart and reload.
//!
//! The on-disk layout is in [`records`].

mod barrier;
mod claim_guard;
pub mod clock;
pub mod crypt;
mod engine;
pub mod export;
pub mod export_file;
pub mod high_water;
mod identity;
mod index_checkpoint;
pub mod integrity;
mod key_epochs;
pub mod mesh;
pub mod pds;
pub mod pg;
pub mod records;
mod schedule;
mod syncer;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

pub use barrier::{BarrierObserver, BarrierReport, BarrierStats, DurabilityBarrier};
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{EngineKind, Store, Turn};
pub use integrity::{AuditVerification, Rollback, WitnessPaths};
pub use mesh::{MeshRecord, MeshState};
pub use pds::{PDS_ACTOR, PdsFinding, PdsNotice, PdsResult, PdsStatus};
pub use records::{
    CopyFacts, DeliveryRecord, DeliveryState, HandoverRecord, IdentityConflict, PARKED_MAILBOX,
    PARKED_MENTAL_HEALTH_MAILBOX, PARKED_SUBSTANCE_MISUSE_MAILBOX, ReleaseFacts, Tombstone,
    is_parked_mailbox,
};
pub use syncer::{MAX_PIPELINE_DEPTH, PIPELINE_DEPTH, witness_lag};
pub use writer::retention::{RetentionOutcome, RetentionPolicy, RetentionStats};

use crate::journey::JourneyEvent;
use records::TreeId;

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The message id was used before for different content.
    #[error("message id was already used for a different submission")]
    Conflict,
    /// The message id named a handover whose tracking data was removed
    /// under the retention policy (its tombstone is held): the content
    /// cannot be compared, so it is not accepted again. A replay of an old
    /// summary would otherwise supersede a newer one not yet delivered.
    #[error(
        "message id was used for a handover whose tracking data was removed under the retention policy at {}; it is not accepted again (send a new message id for a new summary)",
        rfc3339(*removed_at_ms)
    )]
    Retired {
        /// When its handover's tracking data was removed, ms since the epoch.
        removed_at_ms: i64,
    },
    /// No delivery with this id in the caller's mailbox.
    #[error("no such delivery in this mailbox")]
    UnknownDelivery,
    /// No handover with this id or message id sent by the caller.
    #[error("no such handover from this sender")]
    UnknownHandover,
    /// The handover's tracking metadata was removed under the retention policy.
    #[error(
        "the handover's tracking data was removed under the retention policy at {}",
        rfc3339(*removed_at_ms)
    )]
    Removed {
        /// When, ms since the epoch.
        removed_at_ms: i64,
    },
    /// The handover's clinical content was shredded under the retention policy.
    #[error(
        "the handover's clinical content was removed under the retention policy at {}",
        rfc3339(*shredded_at_ms)
    )]
    Shredded {
        /// When, ms since the epoch.
        shredded_at_ms: i64,
    },
    /// No parked release matches the patient and date of birth given.
    #[error("no parked release matches this patient and date of birth")]
    NothingToClaim,
    /// An identifier of the submit is already linked to a different patient
    /// (e.g. the prison number to another NHS number). Never merged silently:
    /// refused, and listed for operators.
    #[error(
        "this identifier is already linked to a different patient; an operator must resolve the identity before this summary can be accepted"
    )]
    IdentityConflict {
        /// The request field whose identifier is linked elsewhere.
        field: &'static str,
    },
    /// The ack or nack names an attempt that is not the delivery's latest.
    #[error("attempt {given} is not the current attempt ({current}) of this delivery")]
    StaleAttempt {
        /// The attempt named.
        given: u32,
        /// The delivery's latest attempt.
        current: u32,
    },
    /// The lease on this attempt has expired; the delivery will be offered again.
    #[error("the lease on this attempt has expired")]
    LeaseExpired,
    /// The delivery is not out on lease.
    #[error("the delivery is not leased (it is {0:?})")]
    NotLeased(DeliveryState),
    /// The store cannot take changes (a commit or sync failed, or it is closed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed a checksum or could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store holds fewer committed batches than its witness promised.
    #[error(
        "store has lost acknowledged data: the witness promises {promised} committed batches but the store holds {found} ({} batches missing, {missing_handovers} acknowledged handovers the witness knew of are gone; a restored backup?). Nothing is served until an operator lists them and decides: `throughcare admin store accept-rollback --reason ...`",
        promised - found
    )]
    Behind {
        /// Batches promised by the witness.
        promised: u64,
        /// Batches found in the store.
        found: u64,
        /// Acknowledged handovers in the witness's journal the store lacks.
        missing_handovers: usize,
    },
    /// The witness is missing for a store with data, or contradicts it.
    #[error(
        "{0}. Nothing is served until an operator decides: `throughcare admin store accept-rollback --reason ...` (docs/store.md)"
    )]
    Witness(String),
    /// The audit key cannot be used.
    #[error("{0}")]
    AuditKey(String),
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// The file system failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A time for people: RFC 3339, UTC.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms after the Unix epoch"))
}

impl StoreError {
    /// Errors after which the writer's memory may not match the disk.
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::Sled(_) | StoreError::Io(_) | StoreError::Corrupt(_)
        )
    }
}

/// Tunables of the queues.
#[derive(Clone)]
pub struct StoreOptions {
    /// Leases handed out before an unacknowledged delivery is quarantined.
    pub max_attempts: u32,
    /// Back-off after a retryable nack: this many ms, doubled each attempt.
    pub retry_backoff_ms: i64,
    /// Most changes in one group commit.
    pub max_batch: usize,
    /// sled page-cache size.
    pub cache_bytes: u64,
    /// Batches the writer may apply ahead of the syncer's barrier; 0 makes
    /// the writer wait for each batch's barrier (see `syncer`).
    pub pipeline_depth: usize,
    /// When payloads and tracking metadata are removed.
    pub retention: RetentionPolicy,
    /// Told of every barrier (tests).
    pub observer: Option<Arc<dyn BarrierObserver>>,
    /// The master key wrapping payload data keys; default
    /// `<dir>/master-key`, created when absent (see [`crypt`]).
    pub master_key_file: Option<std::path::PathBuf>,
    /// Where the witness lives; default `<dir>.witness` ([`high_water`]).
    pub witness_dir: Option<std::path::PathBuf>,
    /// The audit key; default `<witness_dir>/audit-key`, created for a new store.
    pub audit_key_file: Option<std::path::PathBuf>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            retry_backoff_ms: 1_000,
            max_batch: 1_024,
            cache_bytes: 16 * 1024 * 1024,
            pipeline_depth: syncer::PIPELINE_DEPTH,
            retention: RetentionPolicy::default(),
            observer: None,
            master_key_file: None,
            witness_dir: None,
            audit_key_file: None,
        }
    }
}

/// A new handover to store, already validated and routed.
#[derive(Debug, Clone)]
pub struct NewHandover {
    /// Certificate identity of the caller, for the audit trail.
    pub actor: String,
    /// Sending organisation's ODS code.
    pub sender: String,
    /// Sender's idempotency key.
    pub message_id: String,
    /// The journey event.
    pub event: JourneyEvent,
    /// Who the handover is about, as the sender identified them.
    pub patient: PatientIds,
    /// Keyed hashes of (identifier, date of birth) of this submit: a parked
    /// delivery may be claimed with them, and a parked delivery of the same
    /// patient that shares one gains the others (its date of birth checked).
    pub claim_keys: Vec<String>,
    /// The destinations the sender named (part of what makes a repeat the same).
    pub requested_destinations: Vec<String>,
    /// Where it goes.
    pub destinations: Vec<NewDelivery>,
    /// The stored document (opaque to the store; identical bytes for identical content).
    pub payload: Vec<u8>,
    /// Retire every undelivered copy of the previous handovers from the same
    /// sender for the same patient and event, in whatever mailbox it waits
    /// (queued, parked or quarantined: superseded; leased: left with the
    /// recipient but never offered again).
    pub supersede: bool,
    /// The submit's W3C `traceparent` when traces are on (not part of what
    /// makes a repeat the same: a retry may come in another trace).
    pub trace_parent: Option<String>,
    /// When the document says it was written, ms since the epoch: a summary
    /// written before the latest one of its lineage arrives already
    /// superseded (docs/journey.md, supersession).
    pub authored_at_ms: Option<i64>,
    /// Sent, its mailbox filled in, to each recipient that was given an
    /// earlier summary of this lineage and is not among `destinations` (a
    /// correction that stops opioid substitution no longer goes to the
    /// substance misuse service, which must not go on dosing from the old
    /// one). `None`: no such notice.
    pub withdrawal: Option<Box<NewDelivery>>,
    /// The custody episode it belongs to (a keyed hash of the reception
    /// date, [`crate::audit::PatientKeyer::episode_key`]): a summary of a
    /// later episode (a recall, a new reception) is no correction of an
    /// earlier one, so the earlier one's recipients get no withdrawal
    /// notice and no claim of it is followed. `None`: not known.
    pub episode: Option<String>,
    /// The custody movement it reports, as a keyed hash of its event and
    /// date (an admission's reception date, a transfer's time, a release
    /// date): a correction of the same movement keeps it, a new movement of
    /// the same kind (a second transfer) has another. `None`: not known.
    pub movement: Option<String>,
    /// The key of a transfer's time as written, when its offset was not
    /// UTC: keys stored before they were taken of the instant in UTC
    /// (2026-12-03) were taken of this, so a correction of such a transfer
    /// still finds it the same movement. `None` otherwise.
    pub movement_as_written: Option<String>,
}

/// A patient as a sender identified them: the keyed hash of each identifier
/// given ([`crate::audit::PatientKeyer::key`] of each alone). The store
/// resolves them to one patient key through the identity links it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientIds {
    /// Keyed hash of the NHS number.
    pub nhs: Option<String>,
    /// Keyed hash of the prison number.
    pub prison: Option<String>,
    /// Keyed hash of the date of birth ([`crate::audit::PatientKeyer::birth_key`]).
    pub dob: Option<String>,
}

impl PatientIds {
    /// The key a patient first seen with these identifiers gets: the NHS
    /// number's, else the prison number's (as before identity links existed,
    /// so older records keep their keys).
    pub fn first_key(&self) -> Option<&str> {
        self.nhs.as_deref().or(self.prison.as_deref())
    }
}

/// One destination of a new handover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewDelivery {
    /// Receiving organisation's ODS code.
    pub mailbox: String,
    /// Served before routine deliveries.
    pub urgent: bool,
    /// What the recipient sees (opaque to the store).
    pub view: String,
    /// What the recipient's format or view does not carry.
    pub not_carried: Vec<String>,
    /// When it must have been delivered, ms since the epoch.
    pub due_ms: Option<i64>,
    /// A treatment copy the area rule routed (not one the sender named):
    /// the other active services of its kind in the release area, each
    /// with what its format does not carry. A correction's copy goes to
    /// the one of them given the earlier copy (`identity::EarlierCopies`).
    pub may_follow: Vec<(String, Vec<String>)>,
}

/// What a sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Deliveries quarantined because their last allowed lease expired.
    pub quarantined: usize,
    /// Deliveries whose deadline passed since the last sweep (reported once each).
    pub newly_overdue: Vec<DeliveryRecord>,
}

/// One mailbox at a glance (payload-free).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxStats {
    /// The mailbox: an ODS code, or [`PARKED_MAILBOX`].
    pub mailbox: String,
    /// Live deliveries (queued, leased or parked).
    pub depth: u64,
    /// Out on lease now.
    pub leased: u64,
    /// Urgent live deliveries.
    pub urgent: u64,
    /// Live deliveries past their deadline.
    pub overdue: u64,
    /// Quarantined deliveries.
    pub quarantined: u64,
    /// Age of the oldest live delivery, ms.
    pub oldest_age_ms: Option<i64>,
}

/// What a redrive did to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveOutcome {
    /// Back in its mailbox, queued, with a fresh allowance of attempts.
    Requeued,
    /// It was not quarantined (already redriven, delivered, or live): nothing done.
    NotQuarantined(DeliveryState),
    /// No such delivery.
    Unknown,
    /// An admission notice whose patient has been released, or admitted
    /// again, since: sent now it would tell the practice they are in that
    /// prison after their release summary. Left quarantined.
    Outdated,
}

/// What became of one attempt of a batch acknowledgement, judged as a
/// single ack would be (on either engine).
#[derive(Debug)]
pub enum AckOutcome {
    /// Acknowledged now.
    Acknowledged,
    /// That attempt was acknowledged before: nothing changed.
    AlreadyAcknowledged,
    /// Refused: [`StoreError::UnknownDelivery`], [`StoreError::StaleAttempt`],
    /// [`StoreError::LeaseExpired`] or [`StoreError::NotLeased`], with the
    /// delivery's state when it is in the caller's mailbox.
    Refused(StoreError, Option<DeliveryState>),
}

impl AckOutcome {
    /// The answer of a single ack: a repeat succeeds again.
    ///
    /// # Errors
    /// The refusal.
    pub fn into_result(self) -> Result<(), StoreError> {
        self.into_fresh().map(|_| ())
    }

    /// The answer of a single ack: `true` when this ack delivered it,
    /// `false` for a repeat (which succeeds again).
    ///
    /// # Errors
    /// The refusal.
    pub fn into_fresh(self) -> Result<bool, StoreError> {
        match self {
            AckOutcome::Acknowledged => Ok(true),
            AckOutcome::AlreadyAcknowledged => Ok(false),
            AckOutcome::Refused(e, _) => Err(e),
        }
    }

    /// The outcome for a lease verdict that refused `attempt`.
    pub(crate) fn refused(attempt: u32, (e, d): (StoreError, Option<DeliveryRecord>)) -> Self {
        match d {
            Some(d) if d.state == DeliveryState::Delivered && d.attempt == attempt => {
                AckOutcome::AlreadyAcknowledged
            }
            d => AckOutcome::Refused(e, d.map(|d| d.state)),
        }
    }
}

/// What a submit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// The handover id.
    pub handover_id: u64,
    /// (mailbox, delivery id) for each destination.
    pub deliveries: Vec<(String, u64)>,
    /// This answers a repeat of an accepted submit.
    pub duplicate: bool,
    /// The handover that had already replaced this one when it arrived
    /// (written later, received earlier): its deliveries are superseded.
    pub superseded_on_arrival_by: Option<u64>,
}

/// A delivery handed out on lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedDelivery {
    /// The delivery record, now leased.
    pub delivery: DeliveryRecord,
    /// Its handover.
    pub handover: HandoverRecord,
}

/// The (delivery id, attempt) of each of `leased`: what a give-back names.
#[must_use]
pub fn attempts_of(leased: &[LeasedDelivery]) -> Vec<(u64, u32)> {
    leased
        .iter()
        .map(|l| (l.delivery.id, l.delivery.attempt))
        .collect()
}

/// Which handover to track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackKey {
    /// By handover id.
    HandoverId(u64),
    /// By the sender's message id.
    MessageId(String),
}

/// A handover and every one of its deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverStatus {
    /// The handover.
    pub handover: HandoverRecord,
    /// Its deliveries, in destination order.
    pub deliveries: Vec<DeliveryRecord>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    Submit(Box<NewHandover>, writer::Digests, Reply<SubmitOutcome>),
    Pull {
        actor: String,
        mailbox: String,
        max: usize,
        max_bytes: Option<u64>,
        lease_ms: i64,
        reply: Reply<Vec<LeasedDelivery>>,
    },
    Ack {
        actor: String,
        mailbox: String,
        delivery_id: u64,
        attempt: u32,
        reply: Reply<bool>,
    },
    AckBatch {
        actor: String,
        mailbox: String,
        attempts: Vec<(u64, u32)>,
        reply: Reply<Vec<AckOutcome>>,
    },
    Nack {
        actor: String,
        mailbox: String,
        delivery_id: u64,
        attempt: u32,
        permanent: bool,
        reason: String,
        reply: Reply<DeliveryState>,
    },
    ReturnUnsent {
        actor: String,
        mailbox: String,
        attempts: Vec<(u64, u32)>,
        reply: Reply<()>,
    },
    Track {
        actor: String,
        sender: String,
        key: TrackKey,
        reply: Reply<HandoverStatus>,
    },
    Sweep(Reply<SweepOutcome>),
    Retention(Reply<RetentionOutcome>),
    RetentionStats(Reply<RetentionStats>),
    Record(crate::audit::AuditEvent, Reply<()>),
    Claim {
        actor: String,
        claim_keys: Vec<String>,
        to: String,
        evidence: String,
        reply: Reply<Vec<DeliveryRecord>>,
    },
    RouteHeld {
        actor: String,
        moves: Vec<(u64, String)>,
        reply: Reply<Vec<DeliveryRecord>>,
    },
    Pds(PdsResult, Reply<Option<DeliveryRecord>>),
    PdsNotify(PdsNotice, Reply<Option<u64>>),
    Redrive {
        actor: String,
        ids: Vec<u64>,
        reply: Reply<Vec<(u64, RedriveOutcome)>>,
    },
    Stats(Reply<Vec<MailboxStats>>),
    /// Nothing: answered, like any call, once every change before it is
    /// durable (the health check's probe of the whole write path).
    Probe(Reply<()>),
    RegistryPut {
        actor: String,
        code: String,
        record: Vec<u8>,
        reply: Reply<()>,
    },
    MeshPut {
        actor: String,
        record: Box<mesh::MeshRecord>,
        reply: Reply<()>,
    },
    Shutdown(Reply<()>),
}

/// Wakes long-polling pullers when their mailbox may have something new.
#[derive(Default)]
pub(crate) struct Signals {
    by_mailbox: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Signals {
    fn get(&self, mailbox: &str) -> Arc<Notify> {
        let mut map = self.by_mailbox.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(mailbox.to_owned()).or_default().clone()
    }

    fn wake(&self, mailbox: &str) {
        let map = self.by_mailbox.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get(mailbox) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiting poll (a notification may have been missed).
    fn wake_all(&self) {
        let map = self.by_mailbox.lock().unwrap_or_else(|e| e.into_inner());
        for n in map.values() {
            n.notify_waiters();
        }
    }
}

struct Inner {
    jobs: mpsc::Sender<Job>,
    trees: Vec<sled::Tree>,
    signals: Arc<Signals>,
    stats: Arc<BarrierStats>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    cipher: Arc<crypt::PayloadCipher>,
    retention: RetentionPolicy,
    audit_key: Arc<crate::audit::AuditKey>,
}

/// The sled engine: the durable store in one data directory; cheap to
/// clone, all clones share one writer. The application reaches it through
/// [`Store`] (the engine seam, `engine.rs`).
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

/// A pull the writer is serving. Dropped before its answer came (the
/// caller's deadline passed or it went away), it still takes the answer,
/// and gives back at once whatever was leased: otherwise each delivery
/// would wait out its lease unseen, spend an attempt, and hold its
/// patient's later deliveries (urgent ones too) until the lease ran out.
struct PendingPull {
    rx: Option<oneshot::Receiver<Result<Vec<LeasedDelivery>, StoreError>>>,
    store: SledStore,
    actor: String,
    mailbox: String,
}

impl PendingPull {
    async fn answer(mut self) -> Result<Vec<LeasedDelivery>, StoreError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(StoreError::Unavailable("the pull was answered".into()));
        };
        let answer = rx.await;
        self.rx = None;
        answer.map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }
}

impl Drop for PendingPull {
    fn drop(&mut self) {
        let Some(rx) = self.rx.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let (actor, mailbox) = (
            std::mem::take(&mut self.actor),
            std::mem::take(&mut self.mailbox),
        );
        runtime.spawn(async move {
            let Ok(Ok(leased)) = rx.await else {
                return;
            };
            if leased.is_empty() {
                return;
            }
            tracing::info!(
                deliveries = leased.len(),
                "pull abandoned before its answer; its deliveries are given back"
            );
            let attempts = attempts_of(&leased);
            if let Err(e) = store.return_unsent(&actor, &mailbox, attempts).await {
                tracing::warn!(error = %e, "giving back an abandoned pull's deliveries failed; they wait out their leases");
            }
        });
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checks it against its witness
    /// and rebuilds the queue index.
    ///
    /// # Errors
    /// [`StoreError::Behind`] when acknowledged data is missing,
    /// [`StoreError::Witness`] when the witness is missing or contradicts the
    /// store, [`StoreError::AuditKey`]; I/O or sled errors;
    /// [`StoreError::Corrupt`] for undecodable records.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<SledStore, StoreError> {
        Self::open_with(dir, options, clock, false).map(|(store, _)| store)
    }

    /// The operator's decision after a restore: lists the acknowledged
    /// handovers the witness knew of and the store lacks, re-bases the
    /// witness to what the store holds, and records that in the store's audit
    /// trail as `actor` with `reason`. For a stopped store only.
    ///
    /// # Errors
    /// As for [`SledStore::open`], bar the witness checks.
    pub async fn accept_rollback(
        dir: &Path,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        actor: &str,
        reason: &str,
    ) -> Result<Rollback, StoreError> {
        let (store, rollback) = Self::open_with(dir, options, clock, true)?;
        let rollback = rollback.expect("re-based on request");
        let ids: Vec<String> = rollback
            .missing
            .iter()
            .take(100)
            .map(|a| a.handover_id.to_string())
            .collect();
        let outcome = format!(
            "ok: witness re-based from {} to {} committed batches; {} acknowledged handovers missing{}{}{}; reason: {reason}",
            rollback
                .witness
                .as_ref()
                .map_or_else(|| "none".into(), |w| w.commit_seq.to_string()),
            rollback.store_commit_seq,
            rollback.missing.len(),
            if ids.is_empty() {
                String::new()
            } else {
                format!(" (ids {})", ids.join(" "))
            },
            if rollback.missing.len() > ids.len() {
                " ..."
            } else {
                ""
            },
            rollback
                .ids_from
                .map_or_else(String::new, |from| format!("; new ids from {from}")),
        );
        let recorded = store
            .record(crate::audit::AuditEvent {
                actor: actor.to_owned(),
                action: "accept_rollback",
                outcome,
                ..crate::audit::AuditEvent::default()
            })
            .await;
        let closed = store.close().await;
        recorded.and(closed)?;
        Ok(rollback)
    }

    fn open_with(
        dir: &Path,
        mut options: StoreOptions,
        clock: Arc<dyn Clock>,
        rebase: bool,
    ) -> Result<(SledStore, Option<Rollback>), StoreError> {
        options.pipeline_depth = options.pipeline_depth.min(syncer::MAX_PIPELINE_DEPTH);
        private_dir(dir)?;
        let cipher = Arc::new(crypt::PayloadCipher::load_or_create(
            &options
                .master_key_file
                .clone()
                .unwrap_or_else(|| dir.join("master-key")),
        )?);
        cipher.open_epochs(&dir.join("key-epochs"), clock.now_ms())?;
        let sled_dir = dir.join("sled");
        let t0 = std::time::Instant::now();
        let db = open_sled(&sled_dir, options.cache_bytes).map_err(|e| damaged(&sled_dir, e))?;
        let sled_ms = t0.elapsed().as_millis();
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| damaged(&sled_dir, e))?;
        let stats = Arc::new(BarrierStats::default());
        let barrier = DurabilityBarrier::new(
            db.clone(),
            &sled_dir,
            stats.clone(),
            options.observer.clone(),
        )?;
        // Before the witness checks, which consume the clean-close mark.
        let t0 = std::time::Instant::now();
        let restored = index_checkpoint::take(dir, &trees)?;
        let index_ms = t0.elapsed();
        let index = if restored.is_some() {
            "restored from the last close"
        } else {
            "rebuilt from the deliveries"
        };
        let paths = WitnessPaths::of(dir, &options);
        let rollback = rebase
            .then(|| integrity::rebase(&paths, &trees))
            .transpose()?;
        let t0 = std::time::Instant::now();
        let (high_water, promised) =
            integrity::open_checked(&paths, &trees, &barrier, options.pipeline_depth)?;
        let checks_ms = t0.elapsed().as_millis();
        let t0 = std::time::Instant::now();
        let signals = Arc::new(Signals::default());
        let audit_key = high_water.key();
        let (writer, syncer, settled) = writer::Writer::load(
            trees.clone(),
            barrier,
            high_water,
            promised,
            options.clone(),
            clock,
            signals.clone(),
            stats.clone(),
            cipher.clone(),
            (dir.to_path_buf(), restored),
        )?;
        tracing::info!(
            sled_ms,
            checks_ms,
            index_ms = (index_ms + t0.elapsed()).as_millis(),
            index,
            "store opened"
        );
        // The writer joins the syncer when it stops, so a closed store's
        // files are free once the writer thread is joined.
        let syncer = std::thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || syncer.run(&settled))?;
        let (tx, rx) = mpsc::channel(options.max_batch * 4);
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx, syncer))?;
        let store = SledStore {
            inner: Arc::new(Inner {
                jobs: tx,
                trees,
                signals,
                stats,
                writer: Mutex::new(Some(handle)),
                cipher,
                retention: options.retention.clone(),
                audit_key,
            }),
        };
        Ok((store, rollback))
    }

    async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(job(tx))
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    /// Stores a handover and queues its deliveries; returns once durable.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the message id was used for other content.
    pub async fn submit(&self, handover: NewHandover) -> Result<SubmitOutcome, StoreError> {
        // Hashed here, on the caller's task, not on the one writer thread.
        let digests = writer::Digests::of(&handover);
        self.ask(|reply| Job::Submit(Box::new(handover), digests, reply))
            .await
    }

    /// Leases up to `max` deliveries from `mailbox` for `lease_ms`; returns
    /// once the leases are durable. Empty when nothing is ready.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn pull(
        &self,
        actor: &str,
        mailbox: &str,
        max: usize,
        lease_ms: i64,
    ) -> Result<Vec<LeasedDelivery>, StoreError> {
        self.pull_within(actor, mailbox, (max, None), lease_ms)
            .await
    }

    /// As [`SledStore::pull`], leasing no more than `max_bytes` of stored
    /// payloads (always at least one delivery): what would go over stays
    /// queued, untouched.
    ///
    /// # Errors
    /// As for [`SledStore::pull`].
    pub async fn pull_within(
        &self,
        actor: &str,
        mailbox: &str,
        (max, max_bytes): (usize, Option<u64>),
        lease_ms: i64,
    ) -> Result<Vec<LeasedDelivery>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .jobs
            .send(Job::Pull {
                actor: actor.to_owned(),
                mailbox: mailbox.to_owned(),
                max,
                max_bytes,
                lease_ms,
                reply,
            })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        PendingPull {
            rx: Some(rx),
            store: self.clone(),
            actor: actor.to_owned(),
            mailbox: mailbox.to_owned(),
        }
        .answer()
        .await
    }

    /// Acknowledges attempt `attempt` of a leased delivery in `mailbox`:
    /// `true` when this ack delivered it. Repeating the ack of a delivered
    /// attempt succeeds again, with `false`.
    ///
    /// # Errors
    /// [`StoreError::UnknownDelivery`], [`StoreError::StaleAttempt`],
    /// [`StoreError::LeaseExpired`], [`StoreError::NotLeased`].
    pub async fn ack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
    ) -> Result<bool, StoreError> {
        self.ask(|reply| Job::Ack {
            actor: actor.to_owned(),
            mailbox: mailbox.to_owned(),
            delivery_id,
            attempt,
            reply,
        })
        .await
    }

    /// Acknowledges several (delivery id, attempt) pairs of `mailbox` in one
    /// change and one barrier; each is judged and audited as by
    /// [`SledStore::ack`], in order, and gets its own outcome. Returns once
    /// durable.
    ///
    /// # Errors
    /// Only store failures (then nothing in it was acknowledged).
    pub async fn ack_batch(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<Vec<AckOutcome>, StoreError> {
        self.ask(|reply| Job::AckBatch {
            actor: actor.to_owned(),
            mailbox: mailbox.to_owned(),
            attempts,
            reply,
        })
        .await
    }

    /// Gives a leased attempt back: queued again after a back-off, or
    /// quarantined when `permanent` or on the last attempt. Returns the new state.
    ///
    /// # Errors
    /// As for [`SledStore::ack`].
    pub async fn nack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
        permanent: bool,
        reason: &str,
    ) -> Result<DeliveryState, StoreError> {
        self.ask(|reply| Job::Nack {
            actor: actor.to_owned(),
            mailbox: mailbox.to_owned(),
            delivery_id,
            attempt,
            permanent,
            reason: reason.to_owned(),
            reply,
        })
        .await
    }

    /// Gives back attempts leased by a pull but never sent (its answer was
    /// full): each is queued again at once and its attempt is not counted,
    /// so the next lease has the same attempt number. Each is audited. An
    /// attempt no longer leased to `mailbox` is left as it is (the refusal
    /// is audited).
    ///
    /// # Errors
    /// Store failures.
    pub async fn return_unsent(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Job::ReturnUnsent {
            actor: actor.to_owned(),
            mailbox: mailbox.to_owned(),
            attempts,
            reply,
        })
        .await
    }

    /// The state of a handover `sender` submitted (audited).
    ///
    /// # Errors
    /// [`StoreError::UnknownHandover`] when there is none from `sender`.
    pub async fn track(
        &self,
        actor: &str,
        sender: &str,
        key: TrackKey,
    ) -> Result<HandoverStatus, StoreError> {
        self.ask(|reply| Job::Track {
            actor: actor.to_owned(),
            sender: sender.to_owned(),
            key,
            reply,
        })
        .await
    }

    /// Quarantines deliveries whose last allowed lease expired, and reports
    /// (once each) live deliveries whose deadline has passed.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn sweep(&self) -> Result<SweepOutcome, StoreError> {
        self.ask(Job::Sweep).await
    }

    /// One retention pass (bounded by the policy's batch): shreds payloads
    /// and removes tracking metadata that are due, turns the key epochs
    /// over, and reports what the store holds.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn retention(&self) -> Result<RetentionOutcome, StoreError> {
        let mut outcome = self.ask(Job::Retention).await?;
        outcome.stats.identity_records_held = self.identity_records_held().await?;
        Ok(outcome)
    }

    /// What the store holds under the retention policy, without doing any work.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn retention_stats(&self) -> Result<RetentionStats, StoreError> {
        let mut stats = self.ask(Job::RetentionStats).await?;
        stats.identity_records_held = self.identity_records_held().await?;
        Ok(stats)
    }

    /// Entries of the identity trees, counted from committed state on a
    /// blocking thread (a scan: kept off the writer).
    async fn identity_records_held(&self) -> Result<u64, StoreError> {
        let trees = self.inner.trees.clone();
        tokio::task::spawn_blocking(move || {
            [
                TreeId::Identities,
                TreeId::Patients,
                TreeId::Lineage,
                TreeId::Conflicts,
            ]
            .iter()
            .map(|t| trees[*t as usize].len() as u64)
            .sum()
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("identity count failed: {e}")))
    }

    /// The retention policy in force.
    pub fn retention_policy(&self) -> &RetentionPolicy {
        &self.inner.retention
    }

    /// What is left of a handover whose tracking metadata was removed.
    ///
    /// # Errors
    /// Store failures.
    pub fn tombstone(&self, handover_id: u64) -> Result<Option<Tombstone>, StoreError> {
        self.inner.trees[TreeId::Tombstones as usize]
            .get(records::tombstone_by_id(handover_id))?
            .map(|raw| {
                serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("tombstone {handover_id}: {e}")))
            })
            .transpose()
    }

    /// Moves every parked release matching one of `claim_keys` to mailbox
    /// `to`, queued; returns what moved (empty when nothing matched, which is
    /// audited as a refusal). Two racing claims cannot both win: the writer
    /// applies them one after the other. `evidence` (what the claimant gave,
    /// keyed, never in clear) goes into each claim's audit entry.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn claim(
        &self,
        actor: &str,
        claim_keys: Vec<String>,
        (to, evidence): (&str, &str),
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.ask(|reply| Job::Claim {
            actor: actor.to_owned(),
            claim_keys,
            to: to.to_owned(),
            evidence: evidence.to_owned(),
            reply,
        })
        .await
    }

    /// Routes held treatment copies on: each `(delivery id, mailbox)` moves
    /// a copy still held in `@parked-substance-misuse` or
    /// `@parked-mental-health` to the service now registered for its release
    /// area, queued with its deadline unchanged (audited as `route_held`).
    /// A copy no longer held (superseded, already routed) is left alone.
    /// Returns the copies moved; durable when it returns.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn route_held(
        &self,
        actor: &str,
        moves: Vec<(u64, String)>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.ask(|reply| Job::RouteHeld {
            actor: actor.to_owned(),
            moves,
            reply,
        })
        .await
    }

    /// Records what PDS found for a parked release and, when
    /// `result.route_to` is set, claims it for that practice (audited as
    /// [`PDS_ACTOR`]); returns the delivery, or `None` when it is no longer
    /// parked. Durable when it returns.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn pds_result(
        &self,
        result: PdsResult,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        self.ask(|reply| Job::Pds(result, reply)).await
    }

    /// Puts quarantined deliveries back in their mailbox, in their original
    /// place, with a fresh allowance of attempts. Idempotent: a delivery that
    /// is not quarantined is left alone and reported as such.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn redrive(
        &self,
        actor: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<(u64, RedriveOutcome)>, StoreError> {
        self.ask(|reply| Job::Redrive {
            actor: actor.to_owned(),
            ids,
            reply,
        })
        .await
    }

    /// Every mailbox with live or quarantined deliveries, at a glance.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn mailbox_stats(&self) -> Result<Vec<MailboxStats>, StoreError> {
        self.ask(Job::Stats).await
    }

    /// Returns once the writer and the durability barrier have passed every
    /// change handed to the store before it: what a health check waits on
    /// to tell a store that is stuck (a hung `fdatasync`) from a busy one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] after a failure (the store is halted).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.ask(Job::Probe).await
    }

    /// Records an operator's registry change (`record` is the organisation as
    /// JSON), audited in the same transaction.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn put_registry_record(
        &self,
        actor: &str,
        code: &str,
        record: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.ask(|reply| Job::RegistryPut {
            actor: actor.to_owned(),
            code: code.to_owned(),
            record,
            reply,
        })
        .await
    }

    /// Operators' registry changes, as stored (organisation JSON each).
    ///
    /// # Errors
    /// Store failures.
    pub fn registry_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.trees[TreeId::Registry as usize]
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// Delivery records of one per-mailbox index (`quarantine` or `pending`),
    /// of `mailbox` or of all, oldest first, at most `limit`, each with its
    /// index key; with `after`, only those whose key sorts after it (a page
    /// cursor: index keys are unique and their order is stable).
    fn indexed(
        &self,
        index: TreeId,
        mailbox: Option<&str>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        use std::ops::Bound;
        let tree = &self.inner.trees[index as usize];
        let deliveries = &self.inner.trees[TreeId::Deliveries as usize];
        let prefix = mailbox.map(records::mailbox_prefix).unwrap_or_default();
        let start = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Included(prefix.clone()),
        };
        let mut out = Vec::new();
        for entry in tree.range((start, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (_, id) = records::split_mailbox_key(&key)
                .ok_or_else(|| StoreError::Corrupt("index key layout".into()))?;
            if let Some(raw) = deliveries.get(records::be(id))? {
                let record = serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))?;
                out.push((key.to_vec(), record));
            }
        }
        Ok(out)
    }

    /// A page of quarantined deliveries (of `mailbox`, or all), each with
    /// its cursor: a page starts after the `after` cursor given.
    ///
    /// # Errors
    /// Store failures.
    pub fn quarantined_page(
        &self,
        mailbox: Option<&str>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.indexed(TreeId::Quarantine, mailbox, after, limit)
    }

    /// A page of the deliveries parked in holding mailbox `mailbox`
    /// ([`PARKED_MAILBOX`] or a held treatment mailbox), oldest first, each
    /// with its cursor. A holding mailbox holds parked deliveries only, so
    /// this is its [`Self::live_page`].
    ///
    /// # Errors
    /// Store failures.
    pub fn parked_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.live_page(mailbox, after, limit)
    }

    /// A page of `mailbox`'s live deliveries (queued, leased or parked),
    /// in id order after the cursor `after`.
    ///
    /// # Errors
    /// Store failures.
    pub fn live_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.indexed(TreeId::Pending, Some(mailbox), after, limit)
    }

    /// Whether a submit from `sender` under `message_id` was accepted and
    /// is still held (its idempotency key kept): a retry of it is answered
    /// by the store, whatever has changed in routing since.
    ///
    /// # Errors
    /// Store failures.
    pub fn accepted_before(&self, sender: &str, message_id: &str) -> Result<bool, StoreError> {
        Ok(self.inner.trees[TreeId::Dedupe as usize]
            .contains_key(records::dedupe_key(sender, message_id))?)
    }

    /// One delivery's record.
    ///
    /// # Errors
    /// Store failures.
    pub fn delivery(&self, id: u64) -> Result<Option<DeliveryRecord>, StoreError> {
        self.inner.trees[TreeId::Deliveries as usize]
            .get(records::be(id))?
            .map(|raw| {
                serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))
            })
            .transpose()
    }

    /// Every patient key an identifier stands for: the patient it resolves to
    /// and the keys merged into that patient (older audit entries and records
    /// carry those). `identifier` is a keyed hash from
    /// [`crate::audit::PatientKeyer::key`] of one identifier alone.
    ///
    /// # Errors
    /// Store failures.
    pub fn patient_keys(&self, identifier: &str) -> Result<Vec<String>, StoreError> {
        let resolved = self.inner.trees[TreeId::Identities as usize]
            .get(identifier.as_bytes())?
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_else(|| identifier.to_owned());
        let record: records::PatientRecord = self.inner.trees[TreeId::Patients as usize]
            .get(resolved.as_bytes())?
            .map(|raw| {
                serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("patient record: {e}")))
            })
            .transpose()?
            .unwrap_or_default();
        let mut keys = vec![resolved];
        keys.extend(record.aliases);
        Ok(keys)
    }

    /// The newest custody event ([`records::CUSTODY_EVENTS`]) of the
    /// patient `identifier` resolves to (a keyed hash of one identifier, as
    /// for [`Self::patient_keys`]): of each prison's latest admission,
    /// transfer and release, the one whose movement was first reported last
    /// ([`HandoverRecord::movement_start`]: a correction of an earlier
    /// movement is not a move). `None` for a patient no prison has sent.
    ///
    /// # Errors
    /// Store failures.
    pub fn latest_custody(&self, identifier: &str) -> Result<Option<HandoverRecord>, StoreError> {
        let mut prefix = self.inner.trees[TreeId::Identities as usize]
            .get(identifier.as_bytes())?
            .map_or_else(|| identifier.as_bytes().to_vec(), |k| k.to_vec());
        prefix.push(0);
        let mut latest: Option<(u64, HandoverRecord)> = None;
        for entry in self.inner.trees[TreeId::Lineage as usize].scan_prefix(&prefix) {
            let (key, id) = entry?;
            if !records::lineage_event(&key).is_some_and(|e| records::CUSTODY_EVENTS.contains(&e)) {
                continue;
            }
            let Some(head) = records::from_be(&id)
                .map(|id| self.handover(id))
                .transpose()?
            else {
                continue;
            };
            let Some(head) = head else { continue };
            let start = head.movement_start(|id| self.handover(id))?;
            if latest
                .as_ref()
                .is_none_or(|(s, h)| (start, head.id) > (*s, h.id))
            {
                latest = Some((start, head));
            }
        }
        Ok(latest.map(|(_, h)| h))
    }

    /// Submits refused because an identifier was linked to another patient,
    /// newest first, at most `limit`.
    ///
    /// # Errors
    /// Store failures.
    pub fn identity_conflicts(&self, limit: usize) -> Result<Vec<IdentityConflict>, StoreError> {
        Ok(self
            .identity_conflicts_page(None, limit)?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// A page of identity conflicts, newest first, each with its cursor: a
    /// page starts at the conflict older than the `before` cursor given.
    ///
    /// # Errors
    /// Store failures.
    pub fn identity_conflicts_page(
        &self,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, IdentityConflict)>, StoreError> {
        let tree = &self.inner.trees[TreeId::Conflicts as usize];
        let entries = match before {
            Some(key) => tree.range(..key.to_vec()),
            None => tree.range::<Vec<u8>, _>(..),
        };
        entries
            .rev()
            .take(limit)
            .map(|entry| {
                let (k, v) = entry?;
                let conflict = serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("identity conflict: {e}")))?;
                Ok((k.to_vec(), conflict))
            })
            .collect()
    }

    /// One handover's record.
    ///
    /// # Errors
    /// Store failures.
    pub fn handover(&self, id: u64) -> Result<Option<HandoverRecord>, StoreError> {
        self.inner.trees[TreeId::Handovers as usize]
            .get(records::be(id))?
            .map(|raw| {
                serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("handover {id}: {e}")))
            })
            .transpose()
    }

    /// Calls `visit` with what the continuity indicators read of each
    /// handover of `event` submitted in `[from_ms, to_ms)` whose tracking
    /// metadata is still held, and of its deliveries (metadata only, never a
    /// payload), newest first, one at a time: memory does not grow with the
    /// window. A scan of the handovers tree, so call it off the runtime.
    ///
    /// # Errors
    /// Store failures; an undecodable record.
    pub fn for_each_handover_submitted_between(
        &self,
        event: JourneyEvent,
        from_ms: i64,
        to_ms: i64,
        mut visit: impl FnMut(&ReleaseFacts, &[CopyFacts]),
    ) -> Result<(), StoreError> {
        let deliveries = &self.inner.trees[TreeId::Deliveries as usize];
        let mut copies = Vec::new();
        for entry in self.inner.trees[TreeId::Handovers as usize].iter().rev() {
            let (_, raw) = entry?;
            let h: ReleaseFacts = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::Corrupt(format!("handover record: {e}")))?;
            if h.event != event || h.submitted_at_ms < from_ms || h.submitted_at_ms >= to_ms {
                continue;
            }
            copies.clear();
            for id in &h.deliveries {
                if let Some(raw) = deliveries.get(records::be(*id))? {
                    copies.push(
                        serde_json::from_slice(&raw)
                            .map_err(|e| StoreError::Corrupt(format!("delivery {id}: {e}")))?,
                    );
                }
            }
            visit(&h, &copies);
        }
        Ok(())
    }

    /// Appends an audit entry that records no change of state (a refused
    /// handshake, a refused call); returns once it is durable.
    ///
    /// # Errors
    /// Only store failures: the caller must then refuse the action (fail closed).
    pub async fn record(&self, event: crate::audit::AuditEvent) -> Result<(), StoreError> {
        self.ask(|reply| Job::Record(event, reply)).await
    }

    /// Reads a handover's payload, checking every chunk's CRC, opening it
    /// with its data key, and checking its SHA-256 against its handover record.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] on any mismatch; [`StoreError::UnknownHandover`].
    pub async fn payload(&self, handover: &HandoverRecord) -> Result<Vec<u8>, StoreError> {
        let trees = self.inner.trees.clone();
        let cipher = self.inner.cipher.clone();
        let handover = handover.clone();
        tokio::task::spawn_blocking(move || writer::read_payload(&trees, &cipher, &handover))
            .await
            .map_err(|e| StoreError::Unavailable(format!("payload reader failed: {e}")))?
    }

    /// The payloads of several handovers, read on one blocking thread (a
    /// pull's worth: one hand-off instead of one per delivery). Each comes
    /// with its own result, as from [`SledStore::payload`].
    ///
    /// # Errors
    /// Only when the reader itself fails; a payload that fails its checks
    /// is that item's error.
    pub async fn payloads(
        &self,
        handovers: Vec<HandoverRecord>,
    ) -> Result<Vec<Result<Vec<u8>, StoreError>>, StoreError> {
        let trees = self.inner.trees.clone();
        let cipher = self.inner.cipher.clone();
        tokio::task::spawn_blocking(move || {
            handovers
                .iter()
                .map(|h| {
                    // One payload that panics the reader fails alone.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        writer::read_payload(&trees, &cipher, h)
                    }))
                    .unwrap_or_else(|_| {
                        Err(StoreError::Corrupt(format!(
                            "reading the payload of handover {} failed",
                            h.id
                        )))
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("payload reader failed: {e}")))
    }

    /// A notifier woken when `mailbox` may have new deliveries.
    pub fn mailbox_signal(&self, mailbox: &str) -> Arc<Notify> {
        self.inner.signals.get(mailbox)
    }

    /// Barrier counters.
    pub fn stats(&self) -> &Arc<BarrierStats> {
        &self.inner.stats
    }

    /// Verifies the audit chain (from the signed retention cut, when old
    /// entries were removed); returns how many entries it holds.
    ///
    /// # Errors
    /// The first broken link, or a store failure.
    pub fn verify_audit(&self) -> Result<u64, StoreError> {
        self.verify_audit_from().map(|v| v.entries)
    }

    /// Verifies the audit chain and says from where (see [`SledStore::verify_audit`]).
    ///
    /// # Errors
    /// The first broken link, or a store failure.
    pub fn verify_audit_from(&self) -> Result<crate::audit::Verified, StoreError> {
        let tree = &self.inner.trees[TreeId::Audit as usize];
        // The cut first: a pass removing entries between the two reads
        // leaves a newer cut, and the entries read after it agree with it.
        let cut = integrity::audit_cut(&self.inner.trees[TreeId::Meta as usize])?;
        let values = tree.iter().values().collect::<Result<Vec<_>, _>>()?;
        let cut_now = integrity::audit_cut(&self.inner.trees[TreeId::Meta as usize])?;
        if cut_now != cut {
            return self.verify_audit_from();
        }
        crate::audit::verify_from(
            values.iter().map(|v| v.as_ref()),
            Some(&self.inner.audit_key),
            None,
            cut.as_ref(),
        )
        .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// SHA-256 over every key and value of every tree but the audit trail,
    /// the counters and the record of refused identity links: equal digests mean no handover, delivery or queue state
    /// changed (a refusal may still have been audited).
    ///
    /// # Errors
    /// Store failures.
    pub fn content_digest(&self) -> Result<String, StoreError> {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for (tree, id) in self.inner.trees.iter().zip(TreeId::ALL) {
            if matches!(id, TreeId::Audit | TreeId::Meta | TreeId::Conflicts) {
                continue;
            }
            hasher.update(id.name());
            for entry in tree.iter() {
                let (k, v) = entry?;
                hasher.update((k.len() as u64).to_be_bytes());
                hasher.update(&k);
                hasher.update((v.len() as u64).to_be_bytes());
                hasher.update(&v);
            }
        }
        Ok(crate::audit::hex(&hasher.finalize()))
    }

    /// Every audit entry, in order (for tests and operator queries).
    ///
    /// # Errors
    /// Store failures or undecodable entries.
    pub fn audit_entries(&self) -> Result<Vec<crate::audit::AuditEntry>, StoreError> {
        self.inner.trees[TreeId::Audit as usize]
            .iter()
            .values()
            .map(|v| {
                let v = v?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Stops the writer after a final barrier. Later calls fail with
    /// [`StoreError::Unavailable`]. Idempotent.
    ///
    /// # Errors
    /// The final barrier failed.
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = match self.ask(Job::Shutdown).await {
            Err(StoreError::Unavailable(_)) => Ok(()),
            other => other,
        };
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }
}

/// Creates `dir` (with its parents) if absent, and makes it its owner's
/// alone (0700). What sled writes inside follows the umask, and the store's
/// metadata (ODS codes, message ids, keyed patient hashes, audit outcomes)
/// is an asset (docs/security.md), so no other user may reach it.
///
/// # Errors
/// I/O.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// A sled failure at open: corruption says where and what to do (a person
/// must restore the store: the gateway exits 65); anything else as it is.
fn damaged(sled_dir: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(format!(
            "the sled store in {} is damaged and cannot be opened (sled: {e}); restore the data directory from a backup and start again (docs/store.md, \"A damaged store\")",
            sled_dir.display()
        )),
        other => StoreError::Sled(other),
    }
}

/// sled opened by an offline tool (its default cache, no wait for a lock):
/// a store whose last snapshot was cut short opens, as for the gateway.
///
/// # Errors
/// As [`sled::Config::open`] (the lock held: the gateway runs).
pub(crate) fn open_sled_offline(sled_dir: &Path) -> Result<sled::Db, sled::Error> {
    clear_torn_snapshot(sled_dir)?;
    sled::Config::new().path(sled_dir).open()
}

/// Removes the file a sled snapshot write left when it was cut short
/// (`snap.<lsn>.generating`), when no process holds the store.
///
/// sled 0.34 takes the newest `snap.*` file as its snapshot, this one
/// included, so a torn one made the store look damaged (exit 65: restore
/// from a backup) when nothing was lost: the snapshot before it and the
/// log are whole (sled issue 1527). sled writes a snapshot at every open,
/// and [`leave_sled_snapshot`] at every clean stop, so a kill or a full
/// disk at either moment leaves one. Only done under sled's own lock (an
/// exclusive `flock` of `db`), so the file of a process opening the store
/// at this moment is never taken from it.
fn clear_torn_snapshot(sled_dir: &Path) -> std::io::Result<()> {
    let db = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(sled_dir.join("db"))
    {
        Ok(db) => db,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if db.try_lock().is_err() {
        // Held: sled's open says so, or waits for it.
        return Ok(());
    }
    for entry in std::fs::read_dir(sled_dir)? {
        let path = entry?.path();
        let torn = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"));
        if torn {
            tracing::warn!(
                file = %path.display(),
                "removing a sled snapshot whose writing was cut short (the one before it and the log are whole)"
            );
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Opens the sled store of a gateway that has just closed it, and closes it
/// again, so that sled writes a snapshot of its page table: the next start
/// then reads the log from this point only, instead of every segment written
/// since the last start (with 200,000 queued, 93–148 ms against 592–1,067 ms
/// here; docs/benchmarks.md). sled 0.34 writes its snapshot only while it
/// opens, so this is the one way to leave it one. Killed half way, the store
/// is as the close left it: sled writes its snapshot aside and renames it,
/// and a file left aside is removed at the next open
/// ([`clear_torn_snapshot`]).
///
/// Returns how long it took.
///
/// # Errors
/// sled could not be opened, or its lock was not let go within `wait`.
pub fn leave_sled_snapshot(
    data_dir: &Path,
    cache_bytes: u64,
    wait: std::time::Duration,
) -> Result<std::time::Duration, StoreError> {
    let t0 = std::time::Instant::now();
    let db = open_sled_within(&data_dir.join("sled"), cache_bytes, wait)?;
    drop(db);
    Ok(t0.elapsed())
}

/// Opens sled. A store closed moments ago in this process may still hold
/// sled's file lock: its last io thread lets go shortly after the close.
/// Such an open is retried for up to 5 s. Any other error, or a lock
/// held by another process for longer, is returned.
fn open_sled(dir: &std::path::Path, cache_bytes: u64) -> Result<sled::Db, sled::Error> {
    open_sled_within(dir, cache_bytes, std::time::Duration::from_secs(5))
}

/// [`open_sled`], retrying a held lock for up to `wait`.
fn open_sled_within(
    dir: &std::path::Path,
    cache_bytes: u64,
    wait: std::time::Duration,
) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        clear_torn_snapshot(dir)?;
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
