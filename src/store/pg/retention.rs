//! Retention on PostgreSQL: the sled engine's policy (`store/retention.rs`,
//! `docs/store.md` "Retention"), worked out in SQL.
//!
//! Due work is found from the records themselves, not from a schedule: a
//! handover whose `finished_at_ms` is at least `payload_grace` old and not
//! shredded is shredded; one at least `metadata` old is removed, leaving a
//! tombstone; a tombstone `tombstone` old goes; a patient left with nothing
//! tracked gets an `identity_expiry` row a metadata period on; refused
//! identity links go a metadata period after the refusal; audit entries
//! older than the audit period go from the head behind a signed cut.
//!
//! # Several nodes
//! Every node runs the pass. Each step is one transaction that first takes
//! a transaction-level advisory lock ([`PASS_LOCK`]) with
//! `pg_try_advisory_xact_lock`: a node that finds it held stops its pass
//! (another node is doing the work). Inside a step, rows are selected
//! `FOR UPDATE SKIP LOCKED` and the condition checked again, and the audit
//! entries are appended to the one chain in the same transaction, so work
//! is done and audited once even if two steps ever met.
//!
//! # What shredding means here
//! The sealed payload and its wrapped data key are one row of `payloads`,
//! deleted together. The sled engine adds key epochs because sled's log
//! keeps removed values; PostgreSQL keeps a deleted row's bytes too (a dead
//! tuple until vacuumed, WAL until recycled, base backups and WAL archives
//! for as long as they are kept), and an epoch key kept in the database
//! would be kept the same way, so epochs would add nothing here. The
//! database's own backups and archives must therefore be kept no longer
//! than the payload grace (docs/store-engines.md).

use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::queue::{Step, in_tx};
use super::sql::{self, db, id};
use super::{PgStore, Shared};
use crate::audit::{AuditCut, AuditEntry, AuditEvent, KEYED, SignedAuditCut};
use crate::store::records::{PARKED_MAILBOX, PatientRecord};
use crate::store::writer::retention::AUDIT_PER_HANDOVER;
use crate::store::{
    HandoverRecord, RetentionOutcome, RetentionStats, StoreError, Tombstone, TrackKey,
};

const ACTOR: &str = "urn:gateway:retention";

/// The advisory-lock key of a retention step ("tcretent" in ASCII): one
/// node at a time does retention work.
pub const PASS_LOCK: i64 = 0x7463_7265_7465_6e74;

/// Handovers finished at or before a bound, by when they finished.
const FINISHED: &str = "record->>'finished_at_ms' IS NOT NULL \
     AND (record->>'finished_at_ms')::bigint <= $1";

impl PgStore {
    /// One retention pass (bounded by the policy's batch per step): shreds
    /// payloads and removes tracking metadata that are due, expires
    /// tombstones, identity records and audit entries, and reports what the
    /// database holds. A node that finds another node's pass under way
    /// leaves the work to it.
    ///
    /// # Errors
    /// Database failures (a step that failed is rolled back whole).
    pub async fn retention(&self) -> Result<RetentionOutcome, StoreError> {
        self.run(move |s| async move {
            // Every step, its audit entries included, is as of this node's
            // retention clock: a wall clock stepped forward does not bring
            // removals forward.
            let time = s.retention_time();
            let mut out = RetentionOutcome {
                clock_behind_ms: time.behind_wall_ms,
                ..RetentionOutcome::default()
            };
            pass(&s, time.now_ms, &mut out).await?;
            out.parked_past_period = parked_past_period(&s, time.now_ms).await?;
            out.stats = stats(&s).await?;
            Ok(out)
        })
        .await
    }

    /// What the database holds under the retention policy, without doing
    /// any work.
    ///
    /// # Errors
    /// Database failures.
    pub async fn retention_stats(&self) -> Result<RetentionStats, StoreError> {
        self.run(move |s| async move { stats(&s).await }).await
    }

    /// What is left of a handover whose tracking metadata was removed.
    ///
    /// # Errors
    /// Database failures.
    pub fn tombstone(&self, handover_id: u64) -> Result<Option<Tombstone>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let row = client
                .query_opt(
                    "SELECT handover_id, sender, message_id, removed_at_ms FROM tombstones \
                     WHERE handover_id = $1",
                    &[&id(handover_id)],
                )
                .await
                .map_err(db)?;
            Ok(row.as_ref().map(tombstone))
        })
    }
}

fn tombstone(r: &tokio_postgres::Row) -> Tombstone {
    Tombstone {
        handover_id: sql::un_id(r.get(0)),
        sender: r.get(1),
        message_id: r.get(2),
        removed_at_ms: r.get(3),
    }
}

/// The tombstone of a handover `sender` tracks, if its metadata was removed.
pub(super) async fn tombstone_for(
    tx: &Transaction<'_>,
    sender: &str,
    key: &TrackKey,
) -> Result<Option<Tombstone>, StoreError> {
    let row = match key {
        TrackKey::HandoverId(hid) => tx
            .query_opt(
                "SELECT handover_id, sender, message_id, removed_at_ms FROM tombstones \
                 WHERE handover_id = $1 AND sender = $2",
                &[&id(*hid), &sender],
            )
            .await
            .map_err(db)?,
        // The message id may have been used again and removed again: the latest.
        TrackKey::MessageId(m) => tx
            .query_opt(
                "SELECT handover_id, sender, message_id, removed_at_ms FROM tombstones \
                 WHERE sender = $1 AND message_id = $2 ORDER BY removed_at_ms DESC LIMIT 1",
                &[&sender, m],
            )
            .await
            .map_err(db)?,
    };
    Ok(row.as_ref().map(tombstone))
}

/// Runs one step of the pass in its own transaction: `None` when another
/// node holds the pass.
macro_rules! step {
    ($s:ident, $at:ident, $f:ident) => {
        in_tx!($s, at $at, |tx, now, audit| {
            if pass_lock(&tx).await? {
                $f(&tx, &$s, now, &mut audit).await.map(|r| r.map(Some))
            } else {
                Ok::<_, StoreError>(Ok(None))
            }
        })
    };
}

/// The steps, in the order sled does them; stops when another node holds
/// the pass.
async fn pass(s: &Shared, at: i64, out: &mut RetentionOutcome) -> Result<(), StoreError> {
    let batch = s.options.retention.batch.max(1);
    let Some(n) = step!(s, at, shred_due)? else {
        return Ok(());
    };
    out.shredded = n;
    out.backlog |= n == batch;
    let Some((removed, shredded)) = step!(s, at, remove_due)? else {
        return Ok(());
    };
    out.metadata_removed = removed;
    out.shredded += shredded;
    out.backlog |= removed == batch;
    let Some(n) = step!(s, at, expire_tombstones)? else {
        return Ok(());
    };
    out.tombstones_removed = n;
    out.backlog |= n == batch;
    let Some((patients, conflicts)) = step!(s, at, expire_identities)? else {
        return Ok(());
    };
    out.identities_removed = patients;
    out.conflicts_removed = conflicts;
    out.backlog |= conflicts == batch;
    let Some(n) = step!(s, at, prune_audit)? else {
        return Ok(());
    };
    out.audit_removed = n;
    out.backlog |= n == batch.saturating_mul(AUDIT_PER_HANDOVER);
    Ok(())
}

/// Takes the pass's advisory lock for this transaction, unless another
/// node holds it.
async fn pass_lock(tx: &Transaction<'_>) -> Result<bool, StoreError> {
    let row = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PASS_LOCK])
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

fn limit(s: &Shared) -> i64 {
    i64::try_from(s.options.retention.batch.max(1)).unwrap_or(i64::MAX)
}

/// Adds to the counters operators see.
async fn count(tx: &Transaction<'_>, column: &'static str, n: usize) -> Result<(), StoreError> {
    if n > 0 {
        tx.execute(
            &format!("UPDATE retention_state SET {column} = {column} + $1"),
            &[&i64::try_from(n).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Shreds the payloads of handovers finished a grace period ago.
async fn shred_due(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<usize> {
    let before = now.saturating_sub(s.options.retention.payload_grace_ms);
    let rows = tx
        .query(
            &format!(
                "SELECT record FROM handovers WHERE {FINISHED} \
                 AND record->>'shredded_at_ms' IS NULL \
                 ORDER BY (record->>'finished_at_ms')::bigint, id LIMIT $2 \
                 FOR UPDATE SKIP LOCKED"
            ),
            &[&before, &limit(s)],
        )
        .await
        .map_err(db)?;
    let mut n = 0;
    for row in rows {
        let mut h: HandoverRecord = row.get::<_, Json<HandoverRecord>>(0).0;
        shred(tx, &mut h, now, audit).await?;
        n += 1;
    }
    count(tx, "payloads_shredded", n).await?;
    Ok(Ok(n))
}

/// Deletes the sealed payload with its wrapped data key, and records when.
async fn shred(
    tx: &Transaction<'_>,
    h: &mut HandoverRecord,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    tx.execute("DELETE FROM payloads WHERE handover_id = $1", &[&id(h.id)])
        .await
        .map_err(db)?;
    h.shredded_at_ms = Some(now);
    // Nothing left to check it against; a digest could confirm a guess.
    h.payload_hash = String::new();
    sql::put_handover(tx, h).await?;
    audit.push(AuditEvent {
        actor: ACTOR.into(),
        action: "shred",
        handover_id: Some(h.id),
        patient_key: Some(h.patient_key.clone()),
        outcome: "ok: payload and data key removed under the retention policy".into(),
        ..AuditEvent::default()
    });
    Ok(())
}

/// Removes the tracking metadata of handovers finished a metadata period
/// ago, leaving tombstones; returns (removed, shredded on the way).
async fn remove_due(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<(usize, usize)> {
    let before = now.saturating_sub(s.options.retention.metadata_ms);
    let rows = tx
        .query(
            &format!(
                "SELECT record FROM handovers WHERE {FINISHED} \
                 ORDER BY (record->>'finished_at_ms')::bigint, id LIMIT $2 \
                 FOR UPDATE SKIP LOCKED"
            ),
            &[&before, &limit(s)],
        )
        .await
        .map_err(db)?;
    let (mut removed, mut shredded) = (0, 0);
    for row in rows {
        let mut h: HandoverRecord = row.get::<_, Json<HandoverRecord>>(0).0;
        if h.shredded_at_ms.is_none() {
            shred(tx, &mut h, now, audit).await?;
            shredded += 1;
        }
        remove(tx, s, &h, now, audit).await?;
        removed += 1;
    }
    count(tx, "payloads_shredded", shredded).await?;
    count(tx, "metadata_removed", removed).await?;
    Ok(Ok((removed, shredded)))
}

/// Removes a (shredded) handover and its deliveries, leaving a tombstone.
async fn remove(
    tx: &Transaction<'_>,
    s: &Shared,
    h: &HandoverRecord,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    // What the MESH edge did with them goes with them (ids and states).
    tx.execute(
        "DELETE FROM mesh WHERE delivery_id IN \
         (SELECT id FROM deliveries WHERE handover_id = $1)",
        &[&id(h.id)],
    )
    .await
    .map_err(db)?;
    tx.execute(
        "DELETE FROM deliveries WHERE handover_id = $1",
        &[&id(h.id)],
    )
    .await
    .map_err(db)?;
    tx.execute("DELETE FROM handovers WHERE id = $1", &[&id(h.id)])
        .await
        .map_err(db)?;
    tx.execute(
        "INSERT INTO tombstones (handover_id, sender, message_id, removed_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (handover_id) DO NOTHING",
        &[&id(h.id), &h.sender, &h.message_id, &now],
    )
    .await
    .map_err(db)?;
    // The patient the handover's key stands for now: handovers keep the key
    // they were filed under, which a later merge may have made an alias.
    let patient = current_key(tx, &h.patient_key).await?;
    if !tracks_anything(tx, &patient).await? {
        let due = now.saturating_add(s.options.retention.metadata_ms);
        tx.execute(
            "INSERT INTO identity_expiry (patient_key, due_ms) VALUES ($1, $2) \
             ON CONFLICT (patient_key) DO UPDATE \
             SET due_ms = GREATEST(identity_expiry.due_ms, EXCLUDED.due_ms)",
            &[&patient, &due],
        )
        .await
        .map_err(db)?;
    }
    audit.push(AuditEvent {
        actor: ACTOR.into(),
        action: "expire",
        handover_id: Some(h.id),
        patient_key: Some(h.patient_key.clone()),
        outcome: "ok: tracking metadata removed under the retention policy".into(),
        ..AuditEvent::default()
    });
    Ok(())
}

/// Whether a delivery of the patient is live, parked or quarantined, or a
/// handover their lineage points at is still held.
/// Whether anything of `patient` (or of a key merged into them, whose
/// deliveries keep that key) is still tracked.
async fn tracks_anything(tx: &Transaction<'_>, patient: &str) -> Result<bool, StoreError> {
    let keys = keys_of(tx, patient).await?;
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE patient_key = ANY($1) \
                            AND state IN ('queued', 'leased', 'parked', 'quarantined')) \
             OR EXISTS (SELECT 1 FROM lineage l JOIN handovers h ON h.id = l.handover_id \
                        WHERE l.patient_key = ANY($1))",
            &[&keys],
        )
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// `patient`'s record, when it has one.
async fn patient_record(
    tx: &Transaction<'_>,
    patient: &str,
) -> Result<Option<PatientRecord>, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT record FROM patients WHERE patient_key = $1",
            &[&patient],
        )
        .await
        .map_err(db)?
        .map(|r| r.get::<_, Json<PatientRecord>>(0).0))
}

/// `patient` and the keys merged into them.
async fn keys_of(tx: &Transaction<'_>, patient: &str) -> Result<Vec<String>, StoreError> {
    let aliases = patient_record(tx, patient)
        .await?
        .map(|r| r.aliases)
        .unwrap_or_default();
    Ok(std::iter::once(patient.to_owned()).chain(aliases).collect())
}

/// The patient key `key` stands for now (the patient it was merged into).
async fn current_key(tx: &Transaction<'_>, key: &str) -> Result<String, StoreError> {
    let mut key = key.to_owned();
    for _ in 0..16 {
        match patient_record(tx, &key).await?.and_then(|r| r.merged_into) {
            Some(next) => key = next,
            None => break,
        }
    }
    Ok(key)
}

/// Removes tombstones past their period.
async fn expire_tombstones(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    _audit: &mut Vec<AuditEvent>,
) -> Step<usize> {
    let before = now.saturating_sub(s.options.retention.tombstone_ms);
    let n = tx
        .execute(
            "DELETE FROM tombstones WHERE handover_id IN (SELECT handover_id FROM tombstones \
             WHERE removed_at_ms <= $1 ORDER BY removed_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&before, &limit(s)],
        )
        .await
        .map_err(db)?;
    Ok(Ok(usize::try_from(n).unwrap_or(usize::MAX)))
}

/// Removes the identity links and lineage of patients whose check is due
/// and who still have nothing tracked, and refused links past the metadata
/// period; returns (patients, refused links).
async fn expire_identities(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<(usize, usize)> {
    let rows = tx
        .query(
            "DELETE FROM identity_expiry WHERE patient_key IN (SELECT patient_key \
             FROM identity_expiry WHERE due_ms <= $1 ORDER BY due_ms, patient_key LIMIT $2 \
             FOR UPDATE SKIP LOCKED) RETURNING patient_key",
            &[&now, &limit(s)],
        )
        .await
        .map_err(db)?;
    let mut patients = 0;
    let mut records = 0u64;
    for row in rows {
        // A check scheduled under a key merged since is the patient's now.
        let patient = current_key(tx, &row.get::<_, String>(0)).await?;
        let removed = forget_patient(tx, &patient).await?;
        if removed > 0 {
            patients += 1;
            records += removed;
            audit.push(AuditEvent {
                actor: ACTOR.into(),
                action: "identity_expire",
                patient_key: Some(patient),
                outcome: "ok: identity links and lineage removed under the retention policy (nothing tracked for the metadata period)".into(),
                ..AuditEvent::default()
            });
        }
    }
    let before = now.saturating_sub(s.options.retention.metadata_ms);
    let conflicts = tx
        .execute(
            "DELETE FROM identity_conflicts WHERE id IN (SELECT id FROM identity_conflicts \
             WHERE (record->>'at_ms')::bigint <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&before, &limit(s)],
        )
        .await
        .map_err(db)?;
    let conflicts = usize::try_from(conflicts).unwrap_or(usize::MAX);
    let total = usize::try_from(records).unwrap_or(usize::MAX) + conflicts;
    count(tx, "identity_removed", total).await?;
    Ok(Ok((patients, conflicts)))
}

/// Removes `patient`'s links, record and lineage if nothing of theirs is
/// tracked (a new submit since keeps them); how many rows went.
async fn forget_patient(tx: &Transaction<'_>, patient: &str) -> Result<u64, StoreError> {
    let merged = tx
        .query_opt(
            "SELECT record FROM patients WHERE patient_key = $1 FOR UPDATE",
            &[&patient],
        )
        .await
        .map_err(db)?
        .is_some_and(|r| r.get::<_, Json<PatientRecord>>(0).0.merged_into.is_some());
    if merged || tracks_anything(tx, patient).await? {
        return Ok(0);
    }
    // The keys merged into them go too: their records hold identifier
    // hashes that would otherwise stay for ever.
    let keys = keys_of(tx, patient).await?;
    let mut removed = 0;
    for query in [
        "DELETE FROM identities WHERE patient_key = ANY($1)",
        "DELETE FROM patients WHERE patient_key = ANY($1)",
        "DELETE FROM lineage WHERE patient_key = ANY($1)",
    ] {
        removed += tx.execute(query, &[&keys]).await.map_err(db)?;
    }
    Ok(removed)
}

/// Removes the oldest audit entries written before the audit period (a
/// bounded number), moves the signed cut after them and audits that.
async fn prune_audit(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<usize> {
    let before = now.saturating_sub(s.options.retention.audit_ms);
    let most = s
        .options
        .retention
        .batch
        .max(1)
        .saturating_mul(AUDIT_PER_HANDOVER);
    // The chain's head first: no entry is appended while the cut moves.
    tx.execute("SELECT 1 FROM audit_head FOR UPDATE", &[])
        .await
        .map_err(db)?;
    // Never the chain's last entry: the next one links to it, and with the
    // table empty the chain would start again at entry 1 (sled likewise
    // keeps the entry its witness anchors).
    let rows = tx
        .query(
            "SELECT entry FROM audit WHERE seq < (SELECT max(seq) FROM audit) \
             ORDER BY seq LIMIT $1",
            &[&i64::try_from(most).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(db)?;
    let mut removed: Vec<AuditEntry> = Vec::new();
    for row in rows {
        let raw: Vec<u8> = row.get(0);
        let entry: AuditEntry = serde_json::from_slice(&raw)
            .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
        // Stop at the first younger entry, even behind an older one (a
        // clock stepped back).
        if entry.at_ms >= before {
            break;
        }
        removed.push(entry);
    }
    let (Some(first), Some(last)) = (removed.first(), removed.last()) else {
        return Ok(Ok(0));
    };
    let previous = audit_cut(tx).await?;
    let keyed_from = match previous.as_ref() {
        Some(c) => c.cut.keyed_from,
        None => keyed_from(tx, &removed).await?,
    };
    tx.execute(
        "DELETE FROM audit WHERE seq BETWEEN $1 AND $2",
        &[&id(first.seq), &id(last.seq)],
    )
    .await
    .map_err(db)?;
    let cut = AuditCut {
        first_kept: last.seq + 1,
        prev_hash: last.hash.clone(),
        before_ms: before,
        at_ms: now,
        keyed_from,
    };
    tx.execute(
        "UPDATE retention_state SET audit_cut = $1",
        &[&Json(cut.sign(&s.audit_key))],
    )
    .await
    .map_err(db)?;
    audit.push(AuditEvent {
        actor: ACTOR.into(),
        action: "audit_prune",
        outcome: format!(
            "ok: audit entries {} to {} (all written before {}) removed under the retention policy; the trail verifies from entry {} against the signed cut",
            first.seq,
            last.seq,
            crate::store::rfc3339(before),
            cut.first_kept
        ),
        ..AuditEvent::default()
    });
    Ok(Ok(removed.len()))
}

/// The first keyed entry of the chain: among `removed` (the oldest), else
/// the first kept one that is, else the next appended (every entry this
/// engine writes is keyed).
async fn keyed_from(tx: &Transaction<'_>, removed: &[AuditEntry]) -> Result<u64, StoreError> {
    if let Some(e) = removed.iter().find(|e| e.chain == Some(KEYED)) {
        return Ok(e.seq);
    }
    let last = removed.last().map_or(0, |e| e.seq);
    let rows = tx
        .query(
            "SELECT entry FROM audit WHERE seq > $1 ORDER BY seq",
            &[&id(last)],
        )
        .await
        .map_err(db)?;
    let mut next = last + 1;
    for row in rows {
        let raw: Vec<u8> = row.get(0);
        let entry: AuditEntry = serde_json::from_slice(&raw)
            .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
        if entry.chain == Some(KEYED) {
            return Ok(entry.seq);
        }
        next = entry.seq + 1;
    }
    Ok(next)
}

/// The signed cut the chain verifies from, once entries were removed.
pub(super) async fn audit_cut(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<SignedAuditCut>, StoreError> {
    let row = client
        .query_one("SELECT audit_cut FROM retention_state", &[])
        .await
        .map_err(db)?;
    Ok(row.get::<_, Option<Json<SignedAuditCut>>>(0).map(|j| j.0))
}

/// Parked releases waiting longer than the metadata period (never removed).
async fn parked_past_period(s: &Shared, now: i64) -> Result<usize, StoreError> {
    let held_since = now.saturating_sub(s.options.retention.metadata_ms);
    let client = s.client().await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM deliveries WHERE mailbox = $1 AND state = 'parked' \
             AND (record->>'queued_at_ms')::bigint <= $2",
            &[&PARKED_MAILBOX, &held_since],
        )
        .await
        .map_err(db)?;
    Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
}

/// The counts operators see, from one snapshot of the database.
async fn stats(s: &Shared) -> Result<RetentionStats, StoreError> {
    let p = &s.options.retention;
    let mut client = s.client().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM payloads), \
             (SELECT count(*) FROM handovers WHERE record->>'finished_at_ms' IS NOT NULL \
              AND record->>'shredded_at_ms' IS NULL), \
             r.payloads_shredded, \
             (SELECT count(*) FROM handovers WHERE record->>'finished_at_ms' IS NOT NULL), \
             r.metadata_removed, \
             (SELECT count(*) FROM tombstones), \
             LEAST((SELECT min((record->>'finished_at_ms')::bigint) + $1 FROM handovers \
                    WHERE record->>'finished_at_ms' IS NOT NULL AND record->>'shredded_at_ms' IS NULL), \
                   (SELECT min((record->>'finished_at_ms')::bigint) + $2 FROM handovers \
                    WHERE record->>'finished_at_ms' IS NOT NULL), \
                   (SELECT min(removed_at_ms) + $3 FROM tombstones), \
                   (SELECT min(due_ms) FROM identity_expiry)), \
             (SELECT count(*) FROM audit), \
             (SELECT count(*) FROM identities) + (SELECT count(*) FROM patients) \
              + (SELECT count(*) FROM lineage) + (SELECT count(*) FROM identity_conflicts), \
             r.identity_removed, \
             (SELECT count(*) FROM identity_expiry) \
             FROM retention_state r",
            &[&p.payload_grace_ms, &p.metadata_ms, &p.tombstone_ms],
        )
        .await
        .map_err(db)?;
    let audit_cut = audit_cut(&*tx).await?;
    tx.commit().await.map_err(db)?;
    let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    Ok(RetentionStats {
        payloads_held: n(0),
        payloads_in_grace: n(1),
        payloads_shredded: n(2),
        metadata_expiring: n(3),
        metadata_removed: n(4),
        tombstones: n(5),
        key_epochs: 0,
        next_due_ms: row.get(6),
        audit_entries_held: n(7),
        audit_entries_removed: audit_cut.as_ref().map_or(0, |c| c.cut.first_kept - 1),
        audit_cut: audit_cut.map(|c| c.cut),
        identity_records_held: n(8),
        identity_records_removed: n(9),
        identities_expiring: n(10),
    })
}
