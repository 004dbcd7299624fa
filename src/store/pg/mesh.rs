//! MESH records on PostgreSQL (`store/mesh.rs` says what they are for), and
//! the MESH edge's turn: every node runs the edge, one at a time does a
//! round.
//!
//! Why a turn: each round reads the gateway's one MESH inbox and asks MESH
//! about every message sent. Two nodes doing that at once would submit each
//! inbox message twice (the second answered as a duplicate, but refused
//! messages would be refused back twice) and record each acknowledgement
//! twice. The turn is a session-level advisory lock ([`MESH_LOCK`],
//! `pg/turn.rs`) held for the round. Sends are still safe if two rounds ever met (a lost
//! connection): deliveries are leased `SKIP LOCKED`, and a `sending` record
//! makes the next sender ask MESH by local id first.

use tokio_postgres::types::Json;

use super::PgStore;
use super::queue::in_tx;
use super::sql::{self, db, id};
use crate::audit::AuditEvent;
use crate::store::mesh::mesh_event;
use crate::store::{MeshRecord, StoreError};

/// The advisory-lock key of the MESH edge's turn ("tcmeshed" in ASCII).
pub const MESH_LOCK: i64 = 0x7463_6d65_7368_6564;

impl PgStore {
    /// Records `record` (replacing the delivery's previous one), audited as
    /// `actor`, in one transaction.
    ///
    /// # Errors
    /// Database failures.
    pub async fn mesh_put(&self, actor: &str, record: MeshRecord) -> Result<(), StoreError> {
        let actor = actor.to_owned();
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                let _ = now;
                tx.execute(
                    "INSERT INTO mesh (delivery_id, record) VALUES ($1, $2) \
                     ON CONFLICT (delivery_id) DO UPDATE SET record = EXCLUDED.record",
                    &[&id(record.delivery_id), &Json(&record)],
                )
                .await
                .map_err(db)?;
                // The patient, so a trail queried by patient shows the MESH send.
                let patient_key: Option<String> = tx
                    .query_opt(
                        "SELECT patient_key FROM deliveries WHERE id = $1",
                        &[&id(record.delivery_id)],
                    )
                    .await
                    .map_err(db)?
                    .map(|row| row.get(0));
                audit.push(mesh_event(actor.clone(), &record, patient_key));
                Ok::<_, StoreError>(Ok(()))
            })
        })
        .await
    }

    /// The MESH record of a delivery, if it was pushed through MESH.
    ///
    /// # Errors
    /// Database failures.
    pub fn mesh_record(&self, delivery_id: u64) -> Result<Option<MeshRecord>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let row = client
                .query_opt(
                    "SELECT record FROM mesh WHERE delivery_id = $1",
                    &[&id(delivery_id)],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, Json<MeshRecord>>(0).0))
        })
    }

    /// Every MESH record, by delivery id.
    ///
    /// # Errors
    /// Database failures.
    pub fn mesh_records(&self) -> Result<Vec<MeshRecord>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query("SELECT record FROM mesh ORDER BY delivery_id", &[])
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, Json<MeshRecord>>(0).0)
                .collect())
        })
    }

    /// This node's turn at a MESH round, or `None` while another node's
    /// round holds it.
    ///
    /// # Errors
    /// Database failures.
    pub async fn mesh_turn(&self) -> Result<Option<super::Turn>, StoreError> {
        self.turn(MESH_LOCK).await
    }
}
