//! The store against its witness and its audit key: the checks made before a
//! store is served, the operator's re-basing after a restore, and the offline
//! verification of the audit chain.
//!
//! | found at open | what happens |
//! |---------------|--------------|
//! | no witness, empty store | a witness (and an audit key, if absent) is made |
//! | no witness, store with data | refused: [`StoreError::Witness`] (exit 65) |
//! | store behind the witness | refused: [`StoreError::Behind`] (exit 65), naming the gap |
//! | witness behind the store by more than [`LAG`] batches | refused: the witness was rolled back or replaced |
//! | head signature or anchored audit entry does not hold | refused: [`StoreError::Witness`] |
//! | audit key missing for a keyed chain or an existing witness | refused: [`StoreError::AuditKey`] |
//!
//! Only `throughcare admin store accept-rollback` (offline, audited) re-bases
//! the witness to what the store holds, after listing the acknowledged
//! handovers the store lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::high_water::{self, Acknowledged, HighWater, Record};
use super::records::{self, TreeId};
use super::{StoreError, StoreOptions};
use crate::audit::{AuditEntry, AuditKey, Checkpoint, GENESIS, KEYED, SignedCheckpoint};

/// How far the durable witness may trail the store after a crash: its head
/// is written after a barrier and made durable by the next one.
pub const LAG: u64 = 3;

/// Where a store's witness and audit key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessPaths {
    /// The witness file.
    pub file: PathBuf,
    /// The audit key file.
    pub key: PathBuf,
}

impl WitnessPaths {
    /// The paths `options` name, or the defaults for data directory `dir`
    /// (`<dir>.witness/witness` and `<dir>.witness/audit-key`).
    pub fn of(dir: &Path, options: &StoreOptions) -> Self {
        let witness_dir = options
            .witness_dir
            .clone()
            .unwrap_or_else(|| high_water::default_dir(dir));
        Self {
            file: witness_dir.join(high_water::FILE_NAME),
            key: options
                .audit_key_file
                .clone()
                .unwrap_or_else(|| witness_dir.join("audit-key")),
        }
    }
}

/// What the store holds, read before the writer starts.
struct Found {
    commit_seq: u64,
    last_handover: u64,
    audit_seq: u64,
    audit_hash: String,
    /// The first keyed entry, or the next entry when none is keyed yet.
    keyed_from: u64,
    /// Whether any entry is keyed.
    keyed: bool,
}

fn meta(trees: &[sled::Tree], key: &[u8]) -> Result<u64, StoreError> {
    match trees[TreeId::Meta as usize].get(key)? {
        None => Ok(0),
        Some(v) => records::from_be(&v)
            .ok_or_else(|| StoreError::Corrupt("meta counter is not 8 bytes".into())),
    }
}

fn entry(trees: &[sled::Tree], seq: u64) -> Result<Option<AuditEntry>, StoreError> {
    trees[TreeId::Audit as usize]
        .get(records::be(seq))?
        .map(|v| {
            serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("audit entry {seq}: {e}")))
        })
        .transpose()
}

impl Found {
    fn read(trees: &[sled::Tree]) -> Result<Self, StoreError> {
        let last = match trees[TreeId::Audit as usize].last()? {
            Some((_, v)) => Some(
                serde_json::from_slice::<AuditEntry>(&v)
                    .map_err(|e| StoreError::Corrupt(format!("last audit entry: {e}")))?,
            ),
            None => None,
        };
        let (audit_seq, audit_hash, keyed) = match &last {
            Some(e) => (e.seq, e.hash.clone(), e.chain == Some(KEYED)),
            None => (0, GENESIS.to_owned(), false),
        };
        // Keyed entries follow unkeyed ones: find the boundary by bisection.
        let (mut lo, mut hi) = (1, audit_seq + 1);
        while keyed && lo < hi {
            let mid = lo + (hi - lo) / 2;
            match entry(trees, mid)? {
                Some(e) if e.chain == Some(KEYED) => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok(Self {
            commit_seq: meta(trees, records::META_COMMIT_SEQ)?,
            last_handover: meta(trees, records::META_LAST_HANDOVER)?,
            audit_seq,
            audit_hash,
            keyed_from: if keyed { lo } else { audit_seq + 1 },
            keyed,
        })
    }

    fn is_empty(&self) -> bool {
        self.commit_seq == 0 && self.audit_seq == 0
    }

    fn checkpoint(&self, at_ms: i64) -> Checkpoint {
        Checkpoint {
            commit_seq: self.commit_seq,
            audit_seq: self.audit_seq,
            audit_hash: self.audit_hash.clone(),
            keyed_from: self.keyed_from,
            at_ms,
        }
    }
}

fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// Loads the audit key, creating it only where nothing can have used another.
fn audit_key(
    paths: &WitnessPaths,
    found: &Found,
    witness: Option<&Record>,
) -> Result<Arc<AuditKey>, StoreError> {
    if let Some(key) = AuditKey::load(&paths.key)? {
        return Ok(Arc::new(key));
    }
    if found.keyed || witness.is_some_and(|w| w.head.is_some()) {
        return Err(StoreError::AuditKey(format!(
            "the audit key {} is missing, but this store's audit chain or witness was made with one: restore the key from its backup",
            paths.key.display()
        )));
    }
    tracing::info!(path = %paths.key.display(), "creating the audit key");
    Ok(Arc::new(AuditKey::create(&paths.key)?))
}

/// Acknowledged handovers in `journal` that the store does not hold.
///
/// Only records of batches after the store's last count: a handover of an
/// earlier batch that is gone was removed by retention, not lost.
fn missing(
    trees: &[sled::Tree],
    journal: &[(u64, Acknowledged)],
    store_commit_seq: u64,
) -> Result<Vec<Acknowledged>, StoreError> {
    let dedupe = &trees[TreeId::Dedupe as usize];
    let mut out = Vec::new();
    for (_, a) in journal {
        if a.commit_seq > store_commit_seq
            && !dedupe.contains_key(records::dedupe_key(&a.sender, &a.message_id))?
        {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// Checks the store against its witness and opens the witness for writing.
/// Returns it with the commit sequence it promises.
pub(super) fn open_checked(
    paths: &WitnessPaths,
    trees: &[sled::Tree],
) -> Result<(HighWater, u64), StoreError> {
    let found = Found::read(trees)?;
    let witness = high_water::read(&paths.file)?;
    let key = audit_key(paths, &found, witness.as_ref())?;
    let path = paths.file.display().to_string();
    let refuse = |why: String| StoreError::Witness(format!("witness {path}: {why}"));
    let record = match witness {
        None if found.is_empty() => {
            high_water::create(&paths.file, &key, found.checkpoint(now_ms()), &[])?;
            high_water::read(&paths.file)?
                .ok_or_else(|| refuse("vanished after it was made".into()))?
        }
        None => {
            return Err(refuse(format!(
                "missing, but the store holds {} committed batches and {} audit entries: the witness was deleted, or this data directory was restored or moved without it",
                found.commit_seq, found.audit_seq
            )));
        }
        Some(record) => record,
    };
    let Some(head) = &record.head else {
        return Err(refuse("no readable head (damaged or not a witness)".into()));
    };
    if !head.signed().verifies(&key) {
        return Err(refuse(
            "its head is not signed by this store's audit key (forged, or another store's)".into(),
        ));
    }
    let promised = head.checkpoint.commit_seq;
    if found.commit_seq < promised {
        let lost = missing(trees, &record.journal, found.commit_seq)?;
        return Err(StoreError::Behind {
            promised,
            found: found.commit_seq,
            missing_handovers: lost.len(),
        });
    }
    if found.commit_seq > promised + LAG {
        return Err(refuse(format!(
            "it promises {promised} committed batches but the store holds {}: the witness was rolled back or belongs to another store",
            found.commit_seq
        )));
    }
    check_anchored_entry(trees, &head.checkpoint, &found).map_err(refuse)?;
    let witness = HighWater::open(
        &paths.file,
        key,
        &record,
        found.commit_seq,
        found.last_handover,
    )?;
    Ok((witness, promised))
}

/// The entry the witness anchored must be there, unchanged.
fn check_anchored_entry(
    trees: &[sled::Tree],
    anchor: &Checkpoint,
    found: &Found,
) -> Result<(), String> {
    if found.audit_seq < anchor.audit_seq {
        return Err(format!(
            "it anchored {} audit entries but the store holds {} ({} missing)",
            anchor.audit_seq,
            found.audit_seq,
            anchor.audit_seq - found.audit_seq
        ));
    }
    let hash = match anchor.audit_seq {
        0 => GENESIS.to_owned(),
        seq => entry(trees, seq)
            .map_err(|e| e.to_string())?
            .map(|e| e.hash)
            .unwrap_or_default(),
    };
    if hash != anchor.audit_hash {
        return Err(format!(
            "audit entry {} differs from the anchored one (rewritten)",
            anchor.audit_seq
        ));
    }
    Ok(())
}

/// What `accept-rollback` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The witness's head before (none when it was missing or unreadable).
    pub witness: Option<Checkpoint>,
    /// Whether that head was signed by this store's audit key.
    pub witness_signed: bool,
    /// Committed batches the store holds.
    pub store_commit_seq: u64,
    /// Audit entries the store holds.
    pub store_audit_seq: u64,
    /// Acknowledged handovers the witness knew of and the store lacks.
    pub missing: Vec<Acknowledged>,
    /// The oldest journal record (how far back the list can reach), ms.
    pub journal_from_ms: Option<i64>,
}

impl Rollback {
    /// Batches the store lacks.
    pub fn missing_batches(&self) -> u64 {
        self.witness
            .as_ref()
            .map_or(0, |w| w.commit_seq.saturating_sub(self.store_commit_seq))
    }

    /// Audit entries the store lacks.
    pub fn missing_audit_entries(&self) -> u64 {
        self.witness
            .as_ref()
            .map_or(0, |w| w.audit_seq.saturating_sub(self.store_audit_seq))
    }
}

/// Re-bases the witness to what the store holds (offline, before the writer
/// starts); returns what was lost. The caller audits it.
pub(super) fn rebase(paths: &WitnessPaths, trees: &[sled::Tree]) -> Result<Rollback, StoreError> {
    let found = Found::read(trees)?;
    let witness = high_water::read(&paths.file)?;
    let key = audit_key(paths, &found, witness.as_ref())?;
    let record = witness.unwrap_or_default();
    let lost = missing(trees, &record.journal, found.commit_seq)?;
    let lost_ids: std::collections::HashSet<u64> = lost.iter().map(|a| a.handover_id).collect();
    // What the store still holds stays in the journal, for a later, older restore.
    let kept: Vec<Acknowledged> = record
        .journal
        .iter()
        .map(|(_, a)| a)
        .filter(|a| a.commit_seq <= found.commit_seq || !lost_ids.contains(&a.handover_id))
        .map(|a| Acknowledged {
            commit_seq: a.commit_seq.min(found.commit_seq),
            ..a.clone()
        })
        .collect();
    high_water::create(&paths.file, &key, found.checkpoint(now_ms()), &kept)?;
    Ok(Rollback {
        witness_signed: record
            .head
            .as_ref()
            .is_some_and(|h| h.signed().verifies(&key)),
        witness: record.head.map(|h| h.checkpoint),
        store_commit_seq: found.commit_seq,
        store_audit_seq: found.audit_seq,
        missing: lost,
        journal_from_ms: record.journal.first().map(|(_, a)| a.at_ms),
    })
}

/// The latest signed checkpoint in the witness (readable while the gateway
/// runs), and whether it verifies under the audit key (`None`: no key).
///
/// # Errors
/// No witness or no valid head; I/O errors.
pub fn latest_checkpoint(
    paths: &WitnessPaths,
) -> Result<(SignedCheckpoint, Option<bool>), StoreError> {
    let record = high_water::read(&paths.file)?.ok_or_else(|| {
        StoreError::Witness(format!("witness {} is missing", paths.file.display()))
    })?;
    let head = record.head.ok_or_else(|| {
        StoreError::Witness(format!(
            "witness {} has no readable head",
            paths.file.display()
        ))
    })?;
    let signed = head.signed();
    let verifies = AuditKey::load(&paths.key)?.map(|k| signed.verifies(&k));
    Ok((signed, verifies))
}

/// What an offline audit verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// Entries that verify.
    pub entries: u64,
    /// The first keyed entry.
    pub keyed_from: Option<u64>,
    /// The anchors checked: (where from, entries they promise).
    pub anchors: Vec<(String, u64)>,
}

/// Verifies the audit chain of the stopped store in `dir` against its key,
/// its witness and any `extra` checkpoints recorded elsewhere.
///
/// # Errors
/// [`StoreError::Corrupt`] naming the first break, the truncation (with how
/// many entries are missing), a checkpoint that is not signed by the key, a
/// missing witness; sled errors (e.g. the gateway still runs).
pub fn verify_audit(
    dir: &Path,
    options: &StoreOptions,
    extra: &[(String, SignedCheckpoint)],
) -> Result<AuditVerification, StoreError> {
    let paths = WitnessPaths::of(dir, options);
    let key = AuditKey::load(&paths.key)?;
    let mut anchors = Vec::new();
    match high_water::read(&paths.file)?.and_then(|r| r.head) {
        Some(head) => anchors.push((paths.file.display().to_string(), head.signed())),
        None => {
            return Err(StoreError::Corrupt(format!(
                "witness {} is missing or unreadable: truncation cannot be ruled out",
                paths.file.display()
            )));
        }
    }
    anchors.extend(extra.iter().cloned());
    for (from, signed) in &anchors {
        if !key.as_ref().is_some_and(|k| signed.verifies(k)) {
            return Err(StoreError::Corrupt(format!(
                "the checkpoint in {from} is not signed by the audit key {}",
                paths.key.display()
            )));
        }
    }
    let db = sled::Config::new().path(dir.join("sled")).open()?;
    let tree = db.open_tree(TreeId::Audit.name())?;
    let values = tree.iter().values().collect::<Result<Vec<_>, _>>()?;
    let mut verified = None;
    for (from, signed) in &anchors {
        let v = crate::audit::verify(
            values.iter().map(|v| v.as_ref()),
            key.as_ref(),
            Some(&signed.checkpoint),
        )
        .map_err(|e| StoreError::Corrupt(format!("{e} (anchor: {from})")))?;
        verified = Some(v);
    }
    let v = verified.expect("at least the witness's anchor");
    Ok(AuditVerification {
        entries: v.entries,
        keyed_from: v.keyed_from,
        anchors: anchors
            .into_iter()
            .map(|(from, s)| (from, s.checkpoint.audit_seq))
            .collect(),
    })
}

/// Every audit entry of the stopped store in `dir`, in order, read without
/// the witness checks (to look at a store that is refused).
///
/// # Errors
/// Sled errors (e.g. the gateway still runs); undecodable entries.
pub fn audit_entries(dir: &Path) -> Result<Vec<AuditEntry>, StoreError> {
    let db = sled::Config::new().path(dir.join("sled")).open()?;
    db.open_tree(TreeId::Audit.name())?
        .iter()
        .values()
        .map(|v| serde_json::from_slice(&v?).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect()
}
