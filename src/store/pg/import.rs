//! A sled store's export file written into an empty database, in one
//! transaction (docs/store-engines.md, "Moving a sled store to PostgreSQL").
//!
//! The file is checked whole first (digest, signature by the audit key,
//! format version: [`crate::store::export_file::check`]). Then, holding the
//! `counters` and `audit_head` locks so that no node can write meanwhile,
//! the database is checked empty and every record is written as the file
//! has it: ids, states, attempts and leases unchanged, payloads sealed
//! (each opened in memory with this node's master key and checked against
//! its SHA-256, so a node with another master key is refused now, not at
//! the first pull). The audit entries go in byte for byte; the import's own
//! entry is linked after the last of them by the same [`AuditChain`] every
//! node appends with, and the whole chain is verified before `COMMIT`.
//! Any failure rolls everything back.
//!
//! [`AuditChain`]: crate::audit::AuditChain

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::sql::{self, db, id};
use super::{PgStore, Shared};
use crate::audit::{AuditEntry, AuditEvent, hex};
use crate::store::StoreError;
use crate::store::export_file::{self, Checked, Line, MoveError, un_b64};

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The file's header.
    pub header: export_file::Header,
    /// Records written, by kind (as the file's summary counts them).
    pub imported: BTreeMap<String, u64>,
    /// The first audit entry held: 1, or the first the signed retention
    /// cut keeps.
    pub audit_from: u64,
    /// What the sled store held that the file does not carry.
    pub not_carried: BTreeMap<String, u64>,
    /// The import's own audit entry (it links to the file's last).
    pub import_entry: u64,
    /// The file's digest, hex.
    pub sha256: String,
}

/// Counts by kind.
type Counts = BTreeMap<String, u64>;

fn bump(counts: &mut Counts, kind: &str) {
    *counts.entry(kind.to_owned()).or_default() += 1;
}

impl PgStore {
    /// Imports the export file at `path` into this (empty) database, as
    /// `actor`. Refused as not empty, the refusal is audited in the
    /// database's chain. Any other refusal writes nothing: an audit entry
    /// would make the empty database non-empty, and the right file could
    /// then not be imported (the command prints why and exits non-zero).
    ///
    /// # Errors
    /// [`MoveError::NotEmpty`]; [`MoveError::File`] for a file that fails its
    /// checks or does not agree with itself; database failures.
    pub async fn import(&self, path: &Path, actor: &str) -> Result<ImportSummary, MoveError> {
        let outcome = self.import_checked(path, actor).await;
        if let Err(MoveError::NotEmpty(what)) = &outcome {
            self.record(AuditEvent {
                actor: actor.to_owned(),
                action: "store_import",
                outcome: format!("refused: the database is not empty ({what})"),
                ..AuditEvent::default()
            })
            .await?;
        }
        outcome
    }

    async fn import_checked(&self, path: &Path, actor: &str) -> Result<ImportSummary, MoveError> {
        // Before reading the file: a database in use is refused at once.
        self.run(|s| async move {
            let client = s.client().await?;
            Ok(refuse_unless_empty(&**client).await)
        })
        .await??;
        let key = self.shared.audit_key.clone();
        let file = path.to_path_buf();
        let checked = tokio::task::spawn_blocking(move || export_file::check(&file, &key))
            .await
            .map_err(|e| StoreError::Unavailable(format!("export file check failed: {e}")))??;
        let (file, actor) = (path.to_path_buf(), actor.to_owned());
        self.run(move |s| async move { Ok(import_all(&s, &file, checked, &actor).await) })
            .await?
    }
}

async fn import_all(
    s: &Shared,
    path: &Path,
    checked: Checked,
    actor: &str,
) -> Result<ImportSummary, MoveError> {
    let mut client = s.client().await?;
    let tx = client.transaction().await.map_err(db)?;
    // The locks every node's writes take: held until the commit.
    sql::lock_counters(&tx).await?;
    tx.execute("SELECT 1 FROM audit_head FOR UPDATE", &[])
        .await
        .map_err(db)?;
    refuse_unless_empty(&*tx).await?;
    let written = write_records(&tx, s, path, &checked.sha256).await?;
    let bad = |why: String| MoveError::File {
        path: path.to_path_buf(),
        why,
    };
    let imported = written;
    if imported != checked.carried {
        return Err(bad(format!(
            "it holds {imported:?} but its summary says {:?}",
            checked.carried
        )));
    }
    let audit_from = super::retention::audit_cut(&*tx)
        .await?
        .map_or(1, |c| c.cut.first_kept);
    let h = &checked.header;
    tx.execute(
        "UPDATE counters SET last_handover = $1, last_delivery = $2",
        &[&id(h.last_handover_id), &id(h.last_delivery_id)],
    )
    .await
    .map_err(db)?;
    let event = AuditEvent {
        actor: actor.to_owned(),
        action: "store_import",
        outcome: format!(
            "ok: sled store imported from an export file (sha256 {}): {} handovers, audit entries {} to {} (linked on here{})",
            checked.sha256,
            imported.get("handovers").copied().unwrap_or(0),
            audit_from,
            h.audit_seq,
            if audit_from > 1 {
                "; the earlier ones were removed under the retention policy on sled, behind the signed cut carried with them"
            } else {
                ""
            },
        ),
        ..AuditEvent::default()
    };
    let now = s.now();
    sql::append_audit(&tx, s, vec![event], now).await?;
    let import_entry = verify_chain(&tx, s, h).await.map_err(|e| match e {
        StoreError::Corrupt(why) => bad(format!("its audit chain does not verify here: {why}")),
        e => MoveError::Store(e),
    })?;
    // Nodes already waiting on this database wake to the imported queues.
    let mailboxes: Vec<String> = tx
        .query(
            &format!(
                "SELECT DISTINCT mailbox FROM deliveries WHERE state IN {}",
                sql::LIVE
            ),
            &[],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    sql::notify(&tx, &mailboxes).await?;
    tx.commit().await.map_err(db)?;
    Ok(ImportSummary {
        header: checked.header,
        imported,
        audit_from,
        not_carried: checked.not_carried,
        import_entry,
        sha256: checked.sha256,
    })
}

/// Refuses a database that holds anything: an import must not mix two
/// stores' ids, queues or chains.
async fn refuse_unless_empty(tx: &impl tokio_postgres::GenericClient) -> Result<(), MoveError> {
    let tables = [
        "handovers",
        "deliveries",
        "payloads",
        "audit",
        "identities",
        "patients",
        "lineage",
        "identity_conflicts",
        "registry",
        "tombstones",
        "identity_expiry",
        "mesh",
    ];
    let mut held = Vec::new();
    for table in tables {
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_err(db)?
            .get(0);
        if n > 0 {
            held.push(format!("{table}: {n} rows"));
        }
    }
    let row = tx
        .query_one("SELECT last_handover, last_delivery FROM counters", &[])
        .await
        .map_err(db)?;
    let (h, d): (i64, i64) = (row.get(0), row.get(1));
    if h > 0 || d > 0 {
        held.push(format!(
            "ids handed out up to handover {h} and delivery {d}"
        ));
    }
    let retention = tx
        .query_one(
            "SELECT payloads_shredded + metadata_removed + identity_removed, \
             audit_cut IS NOT NULL FROM retention_state",
            &[],
        )
        .await
        .map_err(db)?;
    if retention.get::<_, i64>(0) > 0 || retention.get::<_, bool>(1) {
        held.push("retention has already run (counters or an audit cut)".into());
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(MoveError::NotEmpty(held.join(", ")))
    }
}

/// Streams the file's records into the transaction (read on a thread of
/// its own); returns how many of each were written.
async fn write_records(
    tx: &Transaction<'_>,
    s: &Shared,
    path: &Path,
    sha256: &str,
) -> Result<Counts, MoveError> {
    let (send, mut lines) = tokio::sync::mpsc::channel::<Result<Line, StoreError>>(256);
    let (file, sha256): (PathBuf, String) = (path.to_path_buf(), sha256.to_owned());
    std::thread::Builder::new()
        .name("store-import-reader".into())
        .spawn(move || match export_file::records_checked(&file, &sha256) {
            Ok(records) => {
                for line in records {
                    if send.blocking_send(line).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = send.blocking_send(Err(e));
            }
        })
        .map_err(StoreError::Io)?;
    let mut counts = Counts::new();
    let mut batch = Vec::with_capacity(PIPELINE);
    loop {
        let next = lines.recv().await;
        let done = next.is_none();
        if let Some(line) = next {
            batch.push(line?);
        }
        if batch.len() >= PIPELINE || (done && !batch.is_empty()) {
            // Sent in order on one connection without waiting for each
            // answer (tokio-postgres pipelines concurrent queries); a
            // handover's row is always the first statement of its line and
            // comes before the lines that refer to it.
            let written = futures_util::future::try_join_all(
                batch.drain(..).map(|line| write_one(tx, s, line)),
            )
            .await?;
            for (kind, n) in written.into_iter().flatten() {
                *counts.entry(kind).or_default() += n;
            }
        }
        if done {
            return Ok(counts);
        }
    }
}

/// Lines written at once: their statements go to the database without a
/// round trip each.
const PIPELINE: usize = 256;

/// Writes one record; returns what it counts as.
async fn write_one(tx: &Transaction<'_>, s: &Shared, line: Line) -> Result<Counts, StoreError> {
    let mut counts = Counts::new();
    let counts = &mut counts;
    match line {
        Line::Registry { code, record } => {
            tx.execute(
                "INSERT INTO registry (code, record) VALUES ($1, $2)",
                &[&code, &un_b64(&record)?],
            )
            .await
            .map_err(db)?;
            bump(counts, "registry");
        }
        Line::Handover {
            record,
            data_key,
            sealed,
        } => {
            sql::put_handover(tx, &record).await?;
            if let (Some(key), Some(sealed)) = (data_key, sealed) {
                put_payload(tx, s, &record, &un_b64(&key)?, &un_b64(&sealed)?).await?;
                bump(counts, "payloads");
            } else {
                bump(counts, "payloads_shredded");
            }
            bump(counts, "handovers");
        }
        Line::Delivery { record } => {
            sql::put_delivery(tx, &record).await?;
            bump(counts, &crate::store::export::delivery_kind(record.state));
        }
        Line::Audit { entry } => {
            let parsed: AuditEntry = serde_json::from_str(&entry)
                .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
            tx.execute(
                "INSERT INTO audit (seq, at_ms, action, entry) VALUES ($1, $2, $3, $4)",
                &[
                    &id(parsed.seq),
                    &parsed.at_ms,
                    &parsed.action,
                    &entry.as_bytes(),
                ],
            )
            .await
            .map_err(db)?;
            bump(counts, "audit_entries");
        }
        Line::Mesh { record } => {
            tx.execute(
                "INSERT INTO mesh (delivery_id, record) VALUES ($1, $2)",
                &[&id(record.delivery_id), &Json(&record)],
            )
            .await
            .map_err(db)?;
            bump(counts, "mesh_records");
        }
        other @ (Line::Tombstone { .. }
        | Line::AuditCut { .. }
        | Line::IdentityExpiry { .. }
        | Line::RetentionCounters { .. }) => write_retention(tx, other, counts).await?,
        other => write_identity(tx, other, counts).await?,
    }
    Ok(std::mem::take(counts))
}

/// What retention left on sled: tombstones (Track answers from them), the
/// signed audit cut (the chain verifies from it), the identity checks due
/// (the latest per patient, as this engine keeps one) and the counters.
async fn write_retention(
    tx: &Transaction<'_>,
    line: Line,
    counts: &mut Counts,
) -> Result<(), StoreError> {
    let kind = match line {
        Line::Tombstone { record: t } => {
            tx.execute(
                "INSERT INTO tombstones (handover_id, sender, message_id, removed_at_ms) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &id(t.handover_id),
                    &t.sender,
                    &t.message_id,
                    &t.removed_at_ms,
                ],
            )
            .await
            .map_err(db)?;
            "tombstones"
        }
        Line::AuditCut { cut } => {
            tx.execute("UPDATE retention_state SET audit_cut = $1", &[&Json(&cut)])
                .await
                .map_err(db)?;
            "audit_cut"
        }
        Line::IdentityExpiry {
            patient_key,
            due_ms,
        } => {
            tx.execute(
                "INSERT INTO identity_expiry (patient_key, due_ms) VALUES ($1, $2) \
                 ON CONFLICT (patient_key) DO UPDATE \
                 SET due_ms = GREATEST(identity_expiry.due_ms, EXCLUDED.due_ms)",
                &[&patient_key, &due_ms],
            )
            .await
            .map_err(db)?;
            "identity_expiry"
        }
        Line::RetentionCounters {
            payloads_shredded,
            metadata_removed,
            identity_removed,
        } => {
            tx.execute(
                "UPDATE retention_state SET payloads_shredded = $1, metadata_removed = $2, \
                 identity_removed = $3",
                &[
                    &id(payloads_shredded),
                    &id(metadata_removed),
                    &id(identity_removed),
                ],
            )
            .await
            .map_err(db)?;
            "retention_counters"
        }
        _ => {
            return Err(StoreError::Corrupt(
                "export file: a record taken for retention state".into(),
            ));
        }
    };
    bump(counts, kind);
    Ok(())
}

/// The identity links: keyed hashes only.
async fn write_identity(
    tx: &Transaction<'_>,
    line: Line,
    counts: &mut Counts,
) -> Result<(), StoreError> {
    let kind = match line {
        Line::Identity {
            identifier,
            patient_key,
        } => {
            tx.execute(
                "INSERT INTO identities (identifier, patient_key) VALUES ($1, $2)",
                &[&identifier, &patient_key],
            )
            .await
            .map_err(db)?;
            "identities"
        }
        Line::Patient {
            patient_key,
            record,
        } => {
            tx.execute(
                "INSERT INTO patients (patient_key, record) VALUES ($1, $2)",
                &[&patient_key, &Json(&record)],
            )
            .await
            .map_err(db)?;
            "patients"
        }
        Line::Lineage {
            patient_key,
            sender,
            event,
            handover_id,
        } => {
            tx.execute(
                "INSERT INTO lineage (patient_key, sender, event, handover_id) VALUES ($1, $2, $3, $4)",
                &[&patient_key, &sender, &event, &id(handover_id)],
            )
            .await
            .map_err(db)?;
            "lineage"
        }
        Line::Conflict { record } => {
            tx.execute(
                "INSERT INTO identity_conflicts (record) VALUES ($1)",
                &[&Json(&record)],
            )
            .await
            .map_err(db)?;
            "identity_conflicts"
        }
        _ => {
            return Err(StoreError::Corrupt(
                "export file: a header, summary or end line among the records".into(),
            ));
        }
    };
    bump(counts, kind);
    Ok(())
}

/// Writes a sealed payload after opening it in memory with this node's
/// master key and checking it against its handover's SHA-256.
async fn put_payload(
    tx: &Transaction<'_>,
    s: &Shared,
    record: &crate::store::HandoverRecord,
    data_key: &[u8],
    sealed: &[u8],
) -> Result<(), StoreError> {
    let payload = zeroize::Zeroizing::new(
        s.cipher
            .open(record.id, Some(data_key), sealed)
            .map_err(|e| {
                StoreError::Corrupt(format!(
                    "{e}: this node's master key must be the sled gateway's"
                ))
            })?,
    );
    if hex(&Sha256::digest(payload.as_slice())) != record.payload_hash {
        return Err(StoreError::Corrupt(format!(
            "payload of handover {} does not match its SHA-256",
            record.id
        )));
    }
    tx.execute(
        "INSERT INTO payloads (handover_id, data_key, sealed) VALUES ($1, $2, $3)",
        &[&id(record.id), &data_key, &sealed],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Verifies the whole chain as this transaction sees it: the file's
/// entries, ending at the head its header names, then the import's entry.
/// Returns the import entry's sequence number.
async fn verify_chain(
    tx: &Transaction<'_>,
    s: &Shared,
    h: &export_file::Header,
) -> Result<u64, StoreError> {
    let rows = tx
        .query("SELECT entry FROM audit ORDER BY seq", &[])
        .await
        .map_err(db)?;
    let raw: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    // From the signed cut when sled removed entries under retention.
    let cut = super::retention::audit_cut(tx).await?;
    let verified = crate::audit::verify_from(
        raw.iter().map(Vec::as_slice),
        Some(&s.audit_key),
        None,
        cut.as_ref(),
    )
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let head_hash = match raw.len().checked_sub(2) {
        Some(i) => {
            serde_json::from_slice::<AuditEntry>(&raw[i])
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .hash
        }
        None => cut.map_or_else(|| crate::audit::GENESIS.to_owned(), |c| c.cut.prev_hash),
    };
    if verified.last != h.audit_seq + 1 || head_hash != h.audit_hash {
        return Err(StoreError::Corrupt(format!(
            "the chain does not end at the head the file's header names (entry {})",
            h.audit_seq
        )));
    }
    Ok(verified.last)
}
