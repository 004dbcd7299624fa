//! Rows in and out: each record is written whole (JSON) together with the
//! columns the queries use, by one function per table, so the two never
//! disagree; and the audit append, which takes the `audit_head` lock.

use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::{Shared, db_error};
use crate::audit::{AuditChain, AuditEntry, AuditEvent};
use crate::store::{DeliveryRecord, DeliveryState, HandoverRecord, StoreError};

/// Live states, as stored.
pub const LIVE: &str = "('queued', 'leased', 'parked')";

/// A delivery id or a handover id as the database holds it.
pub fn id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored id as ours.
pub fn un_id(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A state as stored (the serde name).
pub fn state(s: DeliveryState) -> &'static str {
    match s {
        DeliveryState::Queued => "queued",
        DeliveryState::Leased => "leased",
        DeliveryState::Delivered => "delivered",
        DeliveryState::Quarantined => "quarantined",
        DeliveryState::Superseded => "superseded",
        DeliveryState::Parked => "parked",
    }
}

/// Maps a database error for `?`.
pub fn db(e: tokio_postgres::Error) -> StoreError {
    db_error(&e)
}

/// The delivery records of `handover`, in id order.
pub async fn deliveries_of(
    tx: &Transaction<'_>,
    handover: u64,
) -> Result<Vec<DeliveryRecord>, StoreError> {
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE handover_id = $1 ORDER BY id",
            &[&id(handover)],
        )
        .await
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, Json<DeliveryRecord>>(0).0)
        .collect())
}

/// Writes a delivery record and its columns (insert or replace).
pub async fn put_delivery(tx: &Transaction<'_>, d: &DeliveryRecord) -> Result<(), StoreError> {
    let stale = d.state == DeliveryState::Leased && d.is_superseded();
    let event = d.event.map(|e| e.to_string()).unwrap_or_default();
    tx.execute(
        "INSERT INTO deliveries (id, handover_id, mailbox, patient_key, sender, event, state, \
         urgent, attempt, max_attempts, lease_until_ms, not_before_ms, stale, superseded_by, \
         due_ms, overdue_reported, record) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT (id) DO UPDATE SET mailbox = EXCLUDED.mailbox, \
         patient_key = EXCLUDED.patient_key, state = EXCLUDED.state, attempt = EXCLUDED.attempt, \
         max_attempts = EXCLUDED.max_attempts, lease_until_ms = EXCLUDED.lease_until_ms, \
         not_before_ms = EXCLUDED.not_before_ms, stale = EXCLUDED.stale, \
         superseded_by = EXCLUDED.superseded_by, due_ms = EXCLUDED.due_ms, \
         overdue_reported = EXCLUDED.overdue_reported, \
         record = EXCLUDED.record",
        &[
            &id(d.id),
            &id(d.handover_id),
            &d.mailbox,
            &d.patient_key,
            &d.sender.clone().unwrap_or_default(),
            &event,
            &state(d.state),
            &d.urgent,
            &i32::try_from(d.attempt).unwrap_or(i32::MAX),
            &d.max_attempts.map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
            &d.lease_until_ms,
            &d.not_before_ms,
            &stale,
            &d.superseded_by.map(id),
            &d.due_ms,
            &d.overdue_at_ms.is_some(),
            &Json(d),
        ],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Writes a handover record and its columns (insert or replace).
pub async fn put_handover(tx: &Transaction<'_>, h: &HandoverRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO handovers (id, sender, message_id, event, patient_key, submitted_at_ms, record) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
        &[
            &id(h.id),
            &h.sender,
            &h.message_id,
            &h.event.to_string(),
            &h.patient_key,
            &h.submitted_at_ms,
            &Json(h),
        ],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Delivery records from rows whose first column is `record`.
pub fn deliveries(rows: &[tokio_postgres::Row]) -> Vec<DeliveryRecord> {
    rows.iter()
        .map(|r| r.get::<_, Json<DeliveryRecord>>(0).0)
        .collect()
}

/// One delivery, locked for this transaction.
pub async fn delivery_for_update(
    tx: &Transaction<'_>,
    delivery_id: u64,
) -> Result<Option<DeliveryRecord>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT record FROM deliveries WHERE id = $1 FOR UPDATE",
            &[&id(delivery_id)],
        )
        .await
        .map_err(db)?;
    Ok(row.map(|r| r.get::<_, Json<DeliveryRecord>>(0).0))
}

/// One handover.
pub async fn handover(
    client: &impl tokio_postgres::GenericClient,
    handover_id: u64,
) -> Result<Option<HandoverRecord>, StoreError> {
    let row = client
        .query_opt(
            "SELECT record FROM handovers WHERE id = $1",
            &[&id(handover_id)],
        )
        .await
        .map_err(db)?;
    Ok(row.map(|r| r.get::<_, Json<HandoverRecord>>(0).0))
}

/// (mailbox, delivery id) of handover `handover`'s deliveries, in id order.
///
/// # Errors
/// Database failures.
pub async fn deliveries_of_handover(
    tx: &Transaction<'_>,
    handover: u64,
) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = tx
        .query(
            "SELECT mailbox, id FROM deliveries WHERE handover_id = $1 ORDER BY id",
            &[&id(handover)],
        )
        .await
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), un_id(r.get(1))))
        .collect())
}

/// Takes the `counters` row lock, every submit's first lock: a
/// transaction that may lock older delivery rows after newer ones (a claim
/// sending on what a prison never acknowledged) takes it first, so it
/// cannot deadlock with a submit.
pub async fn lock_counters(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT 1 FROM counters FOR UPDATE", &[])
        .await
        .map_err(db)?;
    Ok(())
}

/// Tells every node's listener that `mailboxes` may have something new
/// (delivered on commit, and only then).
pub async fn notify(tx: &Transaction<'_>, mailboxes: &[String]) -> Result<(), StoreError> {
    let mut seen = std::collections::BTreeSet::new();
    for m in mailboxes {
        if seen.insert(m) {
            tx.execute("SELECT pg_notify($1, $2)", &[&super::CHANNEL, m])
                .await
                .map_err(db)?;
        }
    }
    Ok(())
}

/// Appends `events` to the audit chain, taking the `audit_head` lock (the
/// last lock of every transaction: it is held only until the commit).
pub async fn append_audit(
    tx: &Transaction<'_>,
    shared: &Shared,
    events: Vec<AuditEvent>,
    now: i64,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    tx.execute("SELECT 1 FROM audit_head FOR UPDATE", &[])
        .await
        .map_err(db)?;
    let last = tx
        .query_opt("SELECT entry FROM audit ORDER BY seq DESC LIMIT 1", &[])
        .await
        .map_err(db)?
        .map(|r| {
            let raw: Vec<u8> = r.get(0);
            serde_json::from_slice::<AuditEntry>(&raw)
                .map_err(|e| StoreError::Corrupt(format!("audit head: {e}")))
        })
        .transpose()?;
    let mut chain = AuditChain::resume(last.as_ref(), Some(shared.audit_key.clone()));
    for event in events {
        let entry = chain.link(event, now);
        let raw = serde_json::to_vec(&entry)
            .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
        tx.execute(
            "INSERT INTO audit (seq, at_ms, action, entry) VALUES ($1, $2, $3, $4)",
            &[&id(entry.seq), &entry.at_ms, &entry.action, &raw],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}
