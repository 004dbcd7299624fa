//! What the MESH edge (`src/mesh/`, docs/mesh.md) did with each delivery
//! it pushes, kept so that a restart never sends a second copy
//! without first asking MESH.
//!
//! # Invariants
//! - A record is written, durably, *before* a delivery is sent (state
//!   `sending`, with its local id) and again once MESH accepted it (`sent`,
//!   with MESH's message id), so after a crash the edge knows whether a
//!   send may have happened and asks MESH by local id before sending again.
//! - Each write is one writer job with its audit entry (`mesh_sending`,
//!   `mesh_sent`, `mesh_acknowledged`, `mesh_failed`): the same group commit
//!   and durability barrier as every other change.
//! - A record holds ids, states and MESH's words only: no patient data.
//!
//! Key: the delivery id, big-endian (tree `mesh`).

use serde::{Deserialize, Serialize};

use super::records::{self, TreeId};
use super::writer::{Staged, Writer};
use super::{SledStore, StoreError};
use crate::audit::AuditEvent;

/// Where a delivery pushed through MESH is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshState {
    /// Being sent: MESH may or may not have it.
    Sending,
    /// MESH accepted it; waiting for the recipient's acknowledgement.
    Sent,
    /// The recipient acknowledged it; the delivery is delivered.
    Acknowledged,
    /// MESH refused it or reported it undeliverable; quarantined.
    Failed,
}

impl MeshState {
    /// Upper-case name for the wire and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshState::Sending => "SENDING",
            MeshState::Sent => "SENT",
            MeshState::Acknowledged => "ACKNOWLEDGED",
            MeshState::Failed => "FAILED",
        }
    }

    fn action(self) -> &'static str {
        match self {
            MeshState::Sending => "mesh_sending",
            MeshState::Sent => "mesh_sent",
            MeshState::Acknowledged => "mesh_acknowledged",
            MeshState::Failed => "mesh_failed",
        }
    }
}

/// One delivery's MESH record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshRecord {
    /// The delivery.
    pub delivery_id: u64,
    /// Its handover.
    pub handover_id: u64,
    /// The recipient organisation (its gateway mailbox).
    pub mailbox: String,
    /// The recipient's MESH mailbox.
    pub mesh_mailbox: String,
    /// `mex-LocalID`: the same on every send of this delivery.
    pub local_id: String,
    /// MESH's message id, once it accepted the message.
    pub message_id: Option<String>,
    /// Where it is.
    pub state: MeshState,
    /// The lease attempt the gateway holds for it.
    pub attempt: u32,
    /// Sends started (1 normally; more after a failure or a restart).
    pub sends: u32,
    /// MESH's words for a failure (no patient data).
    pub reason: Option<String>,
    /// When it last changed, ms since the epoch.
    pub updated_ms: i64,
}

impl SledStore {
    /// Records `record` (replacing the delivery's previous one), audited as
    /// `actor`. Durable when it returns.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn mesh_put(&self, actor: &str, record: MeshRecord) -> Result<(), StoreError> {
        self.ask(|reply| super::Job::MeshPut {
            actor: actor.to_owned(),
            record: Box::new(record),
            reply,
        })
        .await
    }

    /// The MESH record of a delivery, if it was pushed through MESH.
    ///
    /// # Errors
    /// Store failures, and a record that does not read.
    pub fn mesh_record(&self, delivery_id: u64) -> Result<Option<MeshRecord>, StoreError> {
        let tree = &self.inner.trees[TreeId::Mesh as usize];
        tree.get(records::be(delivery_id))?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("mesh record: {e}")))
            })
            .transpose()
    }

    /// Every MESH record, by delivery id.
    ///
    /// # Errors
    /// Store failures, and a record that does not read.
    pub fn mesh_records(&self) -> Result<Vec<MeshRecord>, StoreError> {
        self.inner.trees[TreeId::Mesh as usize]
            .iter()
            .values()
            .map(|v| {
                serde_json::from_slice(&v?)
                    .map_err(|e| StoreError::Corrupt(format!("mesh record: {e}")))
            })
            .collect()
    }
}

impl Writer {
    /// Stores a MESH record with its audit entry.
    pub(super) fn mesh_put(
        &mut self,
        staged: &mut Staged<'_>,
        actor: String,
        record: &MeshRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        // The patient, so a trail queried by patient shows the MESH send
        // (an unreadable delivery fails the write, as on PostgreSQL).
        let patient_key = staged
            .get_json::<records::DeliveryRecord>(
                TreeId::Deliveries,
                &records::be(record.delivery_id),
            )?
            .map(|d| d.patient_key);
        staged.put_json(
            TreeId::Mesh,
            records::be(record.delivery_id).to_vec(),
            record,
        );
        self.audit(staged, mesh_event(actor, record, patient_key), now);
        Ok(())
    }
}

/// The audit entry of a MESH record's change (both engines), with the
/// delivery's patient when it is known.
pub(super) fn mesh_event(
    actor: String,
    record: &MeshRecord,
    patient_key: Option<String>,
) -> AuditEvent {
    let outcome = match (&record.message_id, &record.reason) {
        (_, Some(reason)) => format!("ok: {}", reason),
        (Some(id), None) => format!("ok: MESH message {id}, local id {}", record.local_id),
        (None, None) => format!("ok: local id {}", record.local_id),
    };
    AuditEvent {
        actor,
        action: record.state.action(),
        handover_id: Some(record.handover_id),
        delivery_id: Some(record.delivery_id),
        patient_key,
        outcome,
    }
}
