//! The engine seam: [`Store`] is what the application layer holds; behind
//! it, the sled engine ([`SledStore`], unchanged) or the PostgreSQL engine
//! ([`PgStore`]). Each call goes to the engine the store was opened with.
//!
//! Both engines take every call (docs/store-engines.md). Work that must
//! not run on two nodes at once (MESH rounds, PDS lookups) asks for a
//! [`Turn`] first: always granted on sled, one node at a time on PostgreSQL.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

use super::pg::{PgOptions, PgStore};
use super::{
    AckOutcome, BarrierStats, Clock, DeliveryRecord, DeliveryState, HandoverRecord, HandoverStatus,
    IdentityConflict, LeasedDelivery, MailboxStats, MeshRecord, NewHandover, PdsNotice, PdsResult,
    RedriveOutcome, RetentionOutcome, RetentionPolicy, RetentionStats, Rollback, SledStore,
    StoreError, StoreOptions, SubmitOutcome, SweepOutcome, Tombstone, TrackKey,
};
use crate::audit::{AuditEntry, AuditEvent};
use crate::journey::JourneyEvent;

/// Which engine holds the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Embedded, one machine (the default).
    #[default]
    Sled,
    /// PostgreSQL, shared by several gateway nodes.
    Postgres,
}

/// A node's turn at a MESH round or a round of PDS lookups, held until
/// dropped (see [`Store::mesh_turn`]).
pub struct Turn(#[allow(dead_code)] Option<super::pg::Turn>);

/// The durable store the application uses; cheap to clone.
#[derive(Clone)]
pub struct Store(Engine);

#[derive(Clone)]
enum Engine {
    Sled(SledStore),
    Postgres(PgStore),
}

/// Calls `$method` on whichever engine, awaiting when `await` is given.
macro_rules! either {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.0 {
            Engine::Sled(s) => s.$method($($arg),*),
            Engine::Postgres(p) => p.$method($($arg),*),
        }
    };
    ($self:ident . $method:ident ( $($arg:expr),* ) . await) => {
        match &$self.0 {
            Engine::Sled(s) => s.$method($($arg),*).await,
            Engine::Postgres(p) => p.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens (or creates) the sled store in `dir` (see [`SledStore::open`]).
    ///
    /// # Errors
    /// As for [`SledStore::open`].
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Store, StoreError> {
        SledStore::open(dir, options, clock).map(|s| Store(Engine::Sled(s)))
    }

    /// Connects to PostgreSQL and migrates its schema (see [`PgStore::open`]);
    /// key files default to places under `dir`, as on sled.
    ///
    /// # Errors
    /// As for [`PgStore::open`].
    pub fn open_postgres(
        pg: &PgOptions,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        dir: &Path,
    ) -> Result<Store, StoreError> {
        PgStore::open(pg, options, clock, dir).map(|p| Store(Engine::Postgres(p)))
    }

    /// The sled engine's decision after a restore ([`SledStore::accept_rollback`]).
    ///
    /// # Errors
    /// As for [`SledStore::accept_rollback`].
    pub async fn accept_rollback(
        dir: &Path,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        actor: &str,
        reason: &str,
    ) -> Result<Rollback, StoreError> {
        SledStore::accept_rollback(dir, options, clock, actor, reason).await
    }

    /// Which engine this is.
    pub fn engine(&self) -> super::EngineKind {
        match &self.0 {
            Engine::Sled(_) => EngineKind::Sled,
            Engine::Postgres(_) => EngineKind::Postgres,
        }
    }

    /// The PostgreSQL engine, for what only it does (its audit checkpoints);
    /// `None` on sled.
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.0 {
            Engine::Sled(_) => None,
            Engine::Postgres(p) => Some(p),
        }
    }

    /// See [`SledStore::probe`] and [`PgStore::probe`].
    ///
    /// # Errors
    /// As for the engine's `probe`.
    pub async fn probe(&self) -> Result<(), StoreError> {
        either!(self.probe().await)
    }

    /// See [`SledStore::submit`].
    ///
    /// # Errors
    /// As for [`SledStore::submit`].
    pub async fn submit(&self, handover: NewHandover) -> Result<SubmitOutcome, StoreError> {
        either!(self.submit(handover).await)
    }

    /// See [`SledStore::pull`].
    ///
    /// # Errors
    /// As for [`SledStore::pull`].
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

    /// See [`SledStore::pull_within`].
    ///
    /// # Errors
    /// As for [`SledStore::pull`].
    pub async fn pull_within(
        &self,
        actor: &str,
        mailbox: &str,
        limits: (usize, Option<u64>),
        lease_ms: i64,
    ) -> Result<Vec<LeasedDelivery>, StoreError> {
        either!(self.pull_within(actor, mailbox, limits, lease_ms).await)
    }

    /// See [`SledStore::ack`].
    ///
    /// # Errors
    /// As for [`SledStore::ack`].
    pub async fn ack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
    ) -> Result<bool, StoreError> {
        either!(self.ack(actor, mailbox, delivery_id, attempt).await)
    }

    /// See [`SledStore::ack_batch`].
    ///
    /// # Errors
    /// As for [`SledStore::ack_batch`].
    pub async fn ack_batch(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<Vec<AckOutcome>, StoreError> {
        either!(self.ack_batch(actor, mailbox, attempts).await)
    }

    /// See [`SledStore::nack`].
    ///
    /// # Errors
    /// As for [`SledStore::nack`].
    pub async fn nack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
        permanent: bool,
        reason: &str,
    ) -> Result<DeliveryState, StoreError> {
        either!(
            self.nack(actor, mailbox, delivery_id, attempt, permanent, reason)
                .await
        )
    }

    /// See [`SledStore::track`].
    ///
    /// # Errors
    /// As for [`SledStore::track`].
    pub async fn track(
        &self,
        actor: &str,
        sender: &str,
        key: TrackKey,
    ) -> Result<HandoverStatus, StoreError> {
        either!(self.track(actor, sender, key).await)
    }

    /// See [`SledStore::sweep`].
    ///
    /// # Errors
    /// As for [`SledStore::sweep`].
    pub async fn sweep(&self) -> Result<SweepOutcome, StoreError> {
        either!(self.sweep().await)
    }

    /// See [`SledStore::retention`] and [`PgStore::retention`].
    ///
    /// # Errors
    /// As for [`SledStore::retention`].
    pub async fn retention(&self) -> Result<RetentionOutcome, StoreError> {
        either!(self.retention().await)
    }

    /// See [`SledStore::retention_stats`].
    ///
    /// # Errors
    /// As for [`SledStore::retention_stats`].
    pub async fn retention_stats(&self) -> Result<RetentionStats, StoreError> {
        either!(self.retention_stats().await)
    }

    /// The retention policy configured.
    pub fn retention_policy(&self) -> &RetentionPolicy {
        either!(self.retention_policy())
    }

    /// See [`SledStore::tombstone`].
    ///
    /// # Errors
    /// Store failures.
    pub fn tombstone(&self, handover_id: u64) -> Result<Option<Tombstone>, StoreError> {
        either!(self.tombstone(handover_id))
    }

    /// See [`SledStore::claim`].
    ///
    /// # Errors
    /// As for [`SledStore::claim`].
    pub async fn claim(
        &self,
        actor: &str,
        claim_keys: Vec<String>,
        to: (&str, &str),
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        either!(self.claim(actor, claim_keys, to).await)
    }

    /// See [`SledStore::route_held`].
    ///
    /// # Errors
    /// As for [`SledStore::route_held`].
    pub async fn route_held(
        &self,
        actor: &str,
        moves: Vec<(u64, String)>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        either!(self.route_held(actor, moves).await)
    }

    /// See [`SledStore::pds_result`].
    ///
    /// # Errors
    /// As for [`SledStore::pds_result`].
    pub async fn pds_result(
        &self,
        result: PdsResult,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        either!(self.pds_result(result).await)
    }

    /// See [`SledStore::pds_notify`].
    ///
    /// # Errors
    /// As for [`SledStore::pds_notify`].
    pub async fn pds_notify(&self, notice: PdsNotice) -> Result<Option<u64>, StoreError> {
        either!(self.pds_notify(notice).await)
    }

    /// See [`SledStore::unrouted_admissions`].
    ///
    /// # Errors
    /// As for [`SledStore::unrouted_admissions`].
    pub fn unrouted_admissions(
        &self,
        since_ms: i64,
        skip: &std::collections::HashSet<u64>,
        limit: usize,
    ) -> Result<Vec<HandoverRecord>, StoreError> {
        either!(self.unrouted_admissions(since_ms, skip, limit))
    }

    /// See [`SledStore::redrive`].
    ///
    /// # Errors
    /// As for [`SledStore::redrive`].
    pub async fn redrive(
        &self,
        actor: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<(u64, RedriveOutcome)>, StoreError> {
        either!(self.redrive(actor, ids).await)
    }

    /// See [`SledStore::mailbox_stats`].
    ///
    /// # Errors
    /// As for [`SledStore::mailbox_stats`].
    pub async fn mailbox_stats(&self) -> Result<Vec<MailboxStats>, StoreError> {
        either!(self.mailbox_stats().await)
    }

    /// See [`SledStore::put_registry_record`].
    ///
    /// # Errors
    /// As for [`SledStore::put_registry_record`].
    pub async fn put_registry_record(
        &self,
        actor: &str,
        code: &str,
        record: Vec<u8>,
    ) -> Result<(), StoreError> {
        either!(self.put_registry_record(actor, code, record).await)
    }

    /// See [`SledStore::registry_records`].
    ///
    /// # Errors
    /// Store failures.
    pub fn registry_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        either!(self.registry_records())
    }

    /// See [`SledStore::quarantined_page`].
    ///
    /// # Errors
    /// Store failures.
    pub fn quarantined_page(
        &self,
        mailbox: Option<&str>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        either!(self.quarantined_page(mailbox, after, limit))
    }

    /// See [`SledStore::live_page`].
    ///
    /// # Errors
    /// Store failures.
    pub fn live_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        either!(self.live_page(mailbox, after, limit))
    }

    /// See [`SledStore::parked_page`].
    ///
    /// # Errors
    /// Store failures.
    pub fn parked_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        either!(self.parked_page(mailbox, after, limit))
    }

    /// Quarantined deliveries (of `mailbox`, or all), with their reasons.
    ///
    /// # Errors
    /// Store failures.
    pub fn quarantined(
        &self,
        mailbox: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(self
            .quarantined_page(mailbox, None, limit)?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    /// Parked releases waiting to be claimed, oldest first.
    ///
    /// # Errors
    /// Store failures.
    pub fn parked(&self, limit: usize) -> Result<Vec<DeliveryRecord>, StoreError> {
        Ok(self
            .parked_page(super::PARKED_MAILBOX, None, limit)?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    /// See [`SledStore::accepted_before`].
    ///
    /// # Errors
    /// Store failures.
    pub fn accepted_before(&self, sender: &str, message_id: &str) -> Result<bool, StoreError> {
        either!(self.accepted_before(sender, message_id))
    }

    /// See [`SledStore::delivery`].
    ///
    /// # Errors
    /// Store failures.
    pub fn delivery(&self, id: u64) -> Result<Option<DeliveryRecord>, StoreError> {
        either!(self.delivery(id))
    }

    /// See [`SledStore::patient_keys`].
    ///
    /// # Errors
    /// Store failures.
    pub fn patient_keys(&self, identifier: &str) -> Result<Vec<String>, StoreError> {
        either!(self.patient_keys(identifier))
    }

    /// See [`SledStore::latest_custody`].
    ///
    /// # Errors
    /// Store failures.
    pub fn latest_custody(&self, identifier: &str) -> Result<Option<HandoverRecord>, StoreError> {
        either!(self.latest_custody(identifier))
    }

    /// Submits refused for an identity conflict, newest first, at most `limit`.
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

    /// See [`SledStore::identity_conflicts_page`].
    ///
    /// # Errors
    /// Store failures.
    pub fn identity_conflicts_page(
        &self,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, IdentityConflict)>, StoreError> {
        either!(self.identity_conflicts_page(before, limit))
    }

    /// See [`SledStore::handover`].
    ///
    /// # Errors
    /// Store failures.
    pub fn handover(&self, id: u64) -> Result<Option<HandoverRecord>, StoreError> {
        either!(self.handover(id))
    }

    /// See [`SledStore::for_each_handover_submitted_between`].
    ///
    /// # Errors
    /// Store failures.
    pub fn for_each_handover_submitted_between(
        &self,
        event: JourneyEvent,
        from_ms: i64,
        to_ms: i64,
        visit: impl FnMut(&super::ReleaseFacts, &[super::CopyFacts]),
    ) -> Result<(), StoreError> {
        either!(self.for_each_handover_submitted_between(event, from_ms, to_ms, visit))
    }

    /// See [`SledStore::record`].
    ///
    /// # Errors
    /// Store failures: the caller must then refuse the action (fail closed).
    pub async fn record(&self, event: AuditEvent) -> Result<(), StoreError> {
        either!(self.record(event).await)
    }

    /// See [`SledStore::payload`].
    ///
    /// # Errors
    /// As for [`SledStore::payload`].
    pub async fn payload(&self, handover: &HandoverRecord) -> Result<Vec<u8>, StoreError> {
        either!(self.payload(handover).await)
    }

    /// See [`SledStore::return_unsent`].
    ///
    /// # Errors
    /// Store failures.
    pub async fn return_unsent(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<(), StoreError> {
        either!(self.return_unsent(actor, mailbox, attempts).await)
    }

    /// See [`SledStore::payloads`].
    ///
    /// # Errors
    /// As for [`SledStore::payloads`].
    pub async fn payloads(
        &self,
        handovers: Vec<HandoverRecord>,
    ) -> Result<Vec<Result<Vec<u8>, StoreError>>, StoreError> {
        either!(self.payloads(handovers).await)
    }

    /// A notifier woken when `mailbox` may have new deliveries.
    pub fn mailbox_signal(&self, mailbox: &str) -> Arc<Notify> {
        either!(self.mailbox_signal(mailbox))
    }

    /// A notifier woken when an operator changed the registry: on this
    /// node once the change is visible (`handover`), and on another node
    /// (PostgreSQL's NOTIFY).
    pub fn registry_signal(&self) -> Arc<Notify> {
        self.mailbox_signal(super::pg::REGISTRY_CHANGED)
    }

    /// Barrier counters (zero on PostgreSQL: its commit is the barrier).
    pub fn stats(&self) -> &Arc<BarrierStats> {
        either!(self.stats())
    }

    /// Verifies the audit chain; returns how many entries it holds.
    ///
    /// # Errors
    /// The first broken link, or a store failure.
    pub fn verify_audit(&self) -> Result<u64, StoreError> {
        self.verify_audit_from().map(|v| v.entries)
    }

    /// See [`SledStore::verify_audit_from`].
    ///
    /// # Errors
    /// The first broken link, or a store failure.
    pub fn verify_audit_from(&self) -> Result<crate::audit::Verified, StoreError> {
        either!(self.verify_audit_from())
    }

    /// See [`SledStore::content_digest`].
    ///
    /// # Errors
    /// Store failures.
    pub fn content_digest(&self) -> Result<String, StoreError> {
        either!(self.content_digest())
    }

    /// Every audit entry, in order.
    ///
    /// # Errors
    /// Store failures or undecodable entries.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        either!(self.audit_entries())
    }

    /// See [`SledStore::audit_since`].
    ///
    /// # Errors
    /// Store failures or an undecodable entry.
    pub fn audit_since(&self, action: &str, since_ms: i64) -> Result<Vec<AuditEntry>, StoreError> {
        either!(self.audit_since(action, since_ms))
    }

    /// See [`SledStore::mesh_put`].
    ///
    /// # Errors
    /// As for [`SledStore::mesh_put`].
    pub async fn mesh_put(&self, actor: &str, record: MeshRecord) -> Result<(), StoreError> {
        either!(self.mesh_put(actor, record).await)
    }

    /// See [`SledStore::mesh_record`].
    ///
    /// # Errors
    /// Store failures.
    pub fn mesh_record(&self, delivery_id: u64) -> Result<Option<MeshRecord>, StoreError> {
        either!(self.mesh_record(delivery_id))
    }

    /// See [`SledStore::mesh_records`].
    ///
    /// # Errors
    /// Store failures.
    pub fn mesh_records(&self) -> Result<Vec<MeshRecord>, StoreError> {
        either!(self.mesh_records())
    }

    /// This node's turn at a MESH round, held until dropped; `None` while
    /// another node's round holds it (PostgreSQL: `store/pg/mesh.rs`). On
    /// sled, the one node always has it.
    ///
    /// # Errors
    /// Store failures.
    pub async fn mesh_turn(&self) -> Result<Option<Turn>, StoreError> {
        match &self.0 {
            Engine::Sled(_) => Ok(Some(Turn(None))),
            Engine::Postgres(p) => Ok(p.mesh_turn().await?.map(|t| Turn(Some(t)))),
        }
    }

    /// This node's turn at a round of PDS lookups, as for MESH.
    ///
    /// # Errors
    /// Store failures.
    pub async fn pds_turn(&self) -> Result<Option<Turn>, StoreError> {
        match &self.0 {
            Engine::Sled(_) => Ok(Some(Turn(None))),
            Engine::Postgres(p) => Ok(p.pds_turn().await?.map(|t| Turn(Some(t)))),
        }
    }

    /// See [`SledStore::close`].
    ///
    /// # Errors
    /// The final barrier failed.
    pub async fn close(&self) -> Result<(), StoreError> {
        either!(self.close().await)
    }
}
