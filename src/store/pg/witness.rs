//! A node's own record of how far the one audit chain reached, kept outside
//! the database (in the witness directory, `postgres-witness`), as sled's
//! witness is kept outside its data directory (docs/store-engines.md).
//!
//! A gateway node writes the chain's head (sequence and hash, signed with
//! the audit key) every [`EVERY`] and when it closes. At open, a node that
//! has such a file refuses to serve when the database's chain no longer
//! reaches that entry, or holds it changed: a database restored from an
//! older backup, or a trail cut or rewritten, would otherwise lose
//! acknowledged handovers silently. An entry removed behind a signed
//! retention cut is not missing. `admin store accept-rollback` is the
//! operator's audited decision to go on from what the database holds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sql::db;
use crate::audit::{AuditEntry, AuditKey, GENESIS};
use crate::store::{StoreError, StoreOptions};

/// The file's name in the witness directory.
pub const FILE: &str = "postgres-witness";

/// How often a gateway node records the head.
pub const EVERY: Duration = Duration::from_secs(30);

/// What the signature covers is labelled, so no other signature of the
/// audit key can stand for it.
const LABEL: &str = "throughcare postgres witness v1";

/// The head a node saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    audit_seq: u64,
    audit_hash: String,
    at_ms: i64,
    signature: String,
    /// The highest handover or delivery id handed out when recorded (not
    /// signed: it only moves ids further on after a rollback, so that a
    /// second restore of an older backup does not hand out ids again).
    #[serde(default)]
    last_id: u64,
}

fn signed_bytes(seq: u64, hash: &str, at_ms: i64) -> Vec<u8> {
    format!("{seq} {hash} {at_ms}").into_bytes()
}

/// The witness file `options` name: none when no witness directory is
/// configured (tests, tools that only read).
pub(super) fn path(options: &StoreOptions) -> Option<PathBuf> {
    options.witness_dir.as_ref().map(|d| d.join(FILE))
}

fn refused(what: String) -> StoreError {
    StoreError::Witness(what)
}

/// Refuses a database whose chain falls short of, or differs from, the
/// head recorded in `path` (nothing to check when there is no file).
pub(super) async fn check(
    client: &impl tokio_postgres::GenericClient,
    key: &AuditKey,
    path: &Path,
) -> Result<(), StoreError> {
    let raw = match std::fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(refused(format!(
                "cannot read {}: {}",
                path.display(),
                e.kind()
            )));
        }
    };
    let head: Head = serde_json::from_slice(&raw)
        .map_err(|_| refused(format!("the witness {} does not read", path.display())))?;
    let bytes = signed_bytes(head.audit_seq, &head.audit_hash, head.at_ms);
    if !key.verifies_labelled(LABEL, &bytes, &head.signature) {
        return Err(refused(format!(
            "the witness {} is not signed by this audit key",
            path.display()
        )));
    }
    let last: Option<i64> = client
        .query_one("SELECT max(seq) FROM audit", &[])
        .await
        .map_err(db)?
        .get(0);
    let last = last.map_or(0, |s| u64::try_from(s).unwrap_or(0));
    if last < head.audit_seq {
        return Err(refused(format!(
            "the database's audit trail ends at entry {last}, but this node saw it reach entry {} \
             (witness {}): restored from an older backup, or cut",
            head.audit_seq,
            path.display()
        )));
    }
    if head.audit_seq == 0 {
        return Ok(());
    }
    let seq = i64::try_from(head.audit_seq).unwrap_or(i64::MAX);
    let row = client
        .query_opt("SELECT entry FROM audit WHERE seq = $1", &[&seq])
        .await
        .map_err(db)?;
    match row {
        Some(row) => {
            let entry: AuditEntry = serde_json::from_slice(&row.get::<_, Vec<u8>>(0))
                .map_err(|e| StoreError::Corrupt(format!("audit entry {seq}: {e}")))?;
            if entry.hash == head.audit_hash {
                Ok(())
            } else {
                Err(refused(format!(
                    "audit entry {seq} differs from the one this node saw (witness {}): rewritten",
                    path.display()
                )))
            }
        }
        // Removed behind a retention cut signed by the audit key: gone on
        // purpose (an unsigned or forged cut is no reason).
        None => match super::retention::audit_cut(client).await? {
            Some(cut) if cut.cut.first_kept > head.audit_seq && cut.verifies(key) => Ok(()),
            _ => Err(refused(format!(
                "audit entry {seq} this node saw is missing from the database (witness {})",
                path.display()
            ))),
        },
    }
}

/// Records the chain's head in `path`: written whole, synced, renamed.
pub(super) async fn record(
    client: &impl tokio_postgres::GenericClient,
    key: &AuditKey,
    path: &Path,
    now_ms: i64,
) -> Result<(), StoreError> {
    let row = client
        .query_opt(
            "SELECT seq, entry FROM audit ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(db)?;
    let (audit_seq, audit_hash) = match row {
        Some(row) => {
            let entry: AuditEntry = serde_json::from_slice(&row.get::<_, Vec<u8>>(1))
                .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
            (entry.seq, entry.hash)
        }
        None => (0, GENESIS.to_owned()),
    };
    let signature = key.sign_labelled(LABEL, &signed_bytes(audit_seq, &audit_hash, now_ms));
    let counters = client
        .query_one("SELECT last_handover, last_delivery FROM counters", &[])
        .await
        .map_err(db)?;
    let head = Head {
        audit_seq,
        audit_hash,
        at_ms: now_ms,
        signature,
        last_id: super::sql::un_id(counters.get(0)).max(super::sql::un_id(counters.get(1))),
    };
    let bytes = serde_json::to_vec(&head).expect("the witness serialises");
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || write_whole(&path, &bytes))
        .await
        .map_err(|e| StoreError::Witness(format!("witness writer: {e}")))?
        .map_err(StoreError::Io)
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        crate::store::private_dir(dir)?;
    }
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
