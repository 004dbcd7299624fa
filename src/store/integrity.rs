//! The store against its witness and its audit key: the checks made before a
//! store is served, the operator's re-basing after a restore, and the offline
//! verification of the audit chain.
//!
//! | found at open | what happens |
//! |---------------|--------------|
//! | no witness, empty store | a witness (and an audit key, if absent) is made |
//! | no witness, store with data | refused: [`StoreError::Witness`] (exit 65) |
//! | store behind the witness | refused: [`StoreError::Behind`] (exit 65), naming the gap |
//! | witness behind the store: by more than the crashed run's pipeline allows ([`super::syncer::witness_lag`]), by any after a clean close | refused: the witness was rolled back or replaced |
//! | head signature or anchored audit entry does not hold | refused: [`StoreError::Witness`] |
//! | audit key missing for a keyed chain or an existing witness | refused: [`StoreError::AuditKey`] |
//! | the oldest audit entries gone without a retention cut signed by the audit key, or not where the cut says the trail starts | refused: [`StoreError::Witness`] |
//!
//! Only `throughcare admin store accept-rollback` (offline, audited) re-bases
//! the witness to what the store holds, after listing the acknowledged
//! handovers the store lacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::high_water::{self, Acknowledged, HighWater, Record};
use super::records::{self, TreeId};
use super::{StoreError, StoreOptions};
use crate::audit::{
    AuditCut, AuditEntry, AuditKey, Checkpoint, GENESIS, KEYED, SignedAuditCut, SignedCheckpoint,
};

/// Meta key (u64 BE): how many batches the witness may trail the store after
/// a crash of the run that wrote it ([`super::syncer::witness_lag`] of its
/// pipeline depth). Written and made durable at each open, before any batch,
/// so the check after a crash uses the depth the crashed run had, whatever
/// the configuration says now. After a clean close the witness must match
/// exactly.
const META_WITNESS_LAG: &[u8] = b"witness_lag";

/// Meta key (u64 BE): the committed batches at a clean close, whose final
/// barrier made the witness exact; removed at open.
pub(super) const META_CLEAN_CLOSE: &[u8] = b"clean_close_seq";

/// Marks a clean close at `commit_seq`, after the final barrier, with the
/// nonce of the queue index the writer left ([`super::index_checkpoint`]).
pub(super) fn mark_clean_close(
    trees: &[sled::Tree],
    barrier: &super::DurabilityBarrier,
    commit_seq: u64,
    index_nonce: Option<u64>,
) -> Result<(), StoreError> {
    let meta = &trees[TreeId::Meta as usize];
    if let Some(nonce) = index_nonce {
        meta.insert(
            super::index_checkpoint::META_INDEX_NONCE,
            &records::be(nonce),
        )?;
    }
    meta.insert(META_CLEAN_CLOSE, &records::be(commit_seq))?;
    barrier.seal().map_err(StoreError::Io)
}

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

/// The signed retention cut of the audit trail, if entries were removed.
///
/// # Errors
/// Sled errors; an undecodable cut.
pub(super) fn audit_cut(meta: &sled::Tree) -> Result<Option<SignedAuditCut>, StoreError> {
    meta.get(records::META_AUDIT_CUT)?
        .map(|v| {
            serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("audit retention cut: {e}")))
        })
        .transpose()
}

/// "verified from entry N (entries before N removed under the retention
/// policy on DATE)", or nothing when no entry was removed.
pub fn cut_note(cut: Option<&AuditCut>) -> String {
    cut.map_or_else(String::new, |c| {
        format!(
            " from entry {} (entries before {} removed under the retention policy on {}, all older than {})",
            c.first_kept,
            c.first_kept,
            super::rfc3339(c.at_ms),
            super::rfc3339(c.before_ms)
        )
    })
}

/// The oldest entry held must be entry 1, or the first entry a retention
/// cut signed by `key` keeps, linking to the hash the cut records. Cheap
/// (one entry read): the whole chain is `admin audit verify`'s work.
fn check_audit_start(trees: &[sled::Tree], key: &AuditKey) -> Result<Option<AuditCut>, String> {
    let cut = audit_cut(&trees[TreeId::Meta as usize]).map_err(|e| e.to_string())?;
    let oldest = trees[TreeId::Audit as usize]
        .first()
        .map_err(|e| e.to_string())?;
    let Some((seq, raw)) = oldest else {
        return match cut {
            Some(c) => Err(format!(
                "the audit retention cut keeps entries from {} but the trail is empty",
                c.cut.first_kept
            )),
            None => Ok(None),
        };
    };
    crate::audit::verify_from([raw.as_ref()], Some(key), None, cut.as_ref())
        .map(|_| cut.map(|c| c.cut))
        .map_err(|e| {
            format!(
                "the oldest audit entry held is {}: {e}",
                records::from_be(&seq).unwrap_or(0)
            )
        })
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
        // Keyed entries follow unkeyed ones: find the boundary by bisection
        // (from the first entry kept, when older ones were removed).
        let first = match trees[TreeId::Audit as usize].first()? {
            Some((k, _)) => records::from_be(&k).unwrap_or(1),
            None => 1,
        };
        let (mut lo, mut hi) = (first, audit_seq + 1);
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
    barrier: &super::DurabilityBarrier,
    pipeline_depth: usize,
) -> Result<(HighWater, u64), StoreError> {
    let found = Found::read(trees)?;
    let witness = high_water::read_tail(&paths.file)?;
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
        // The handovers lost may be anywhere in the journal.
        let whole = high_water::read(&paths.file)?.unwrap_or_default();
        let lost = missing(trees, &whole.journal, found.commit_seq)?;
        return Err(StoreError::Behind {
            promised,
            found: found.commit_seq,
            missing_handovers: lost.len(),
        });
    }
    let clean = meta(trees, META_CLEAN_CLOSE)?;
    let allowed = if clean > 0 && clean == found.commit_seq {
        0
    } else {
        match meta(trees, META_WITNESS_LAG)? {
            // A store from before the lag was recorded: the deepest pipeline.
            0 => super::syncer::witness_lag(super::syncer::MAX_PIPELINE_DEPTH),
            lag => lag,
        }
    };
    if found.commit_seq > promised + allowed {
        return Err(refuse(format!(
            "it promises {promised} committed batches but the store holds {}{}: the witness was rolled back or belongs to another store",
            found.commit_seq,
            if allowed == 0 {
                " and was closed cleanly"
            } else {
                ""
            }
        )));
    }
    check_anchored_entry(trees, &head.checkpoint, &found).map_err(refuse)?;
    let cut = check_audit_start(trees, &key).map_err(refuse)?;
    if cut.is_some() {
        tracing::info!("audit trail start checked{}", cut_note(cut.as_ref()));
    }
    let mut witness = HighWater::open(
        &paths.file,
        key,
        &record,
        found.commit_seq,
        found.last_handover,
    )?;
    if promised < found.commit_seq {
        // Caught up now, and durably: the lag never adds up across
        // restarts, and a smaller pipeline's lag below holds from here.
        witness.record(found.checkpoint(now_ms()))?;
        witness.file().sync_data()?;
    }
    let meta_tree = &trees[TreeId::Meta as usize];
    meta_tree.remove(META_CLEAN_CLOSE)?;
    meta_tree.insert(
        META_WITNESS_LAG,
        &records::be(super::syncer::witness_lag(pipeline_depth)),
    )?;
    barrier.seal()?;
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
    /// The first handover and delivery id from here on, when the counters
    /// moved to a new range (ids the lost batches handed out are not
    /// handed out again).
    pub ids_from: Option<u64>,
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
    let behind = record
        .head
        .as_ref()
        .is_none_or(|h| h.checkpoint.commit_seq > found.commit_seq);
    let ids_from = if behind || !lost.is_empty() {
        let journaled = record.journal.iter().map(|(_, a)| a.handover_id).max();
        Some(ids_beyond_the_lost(trees, journaled.unwrap_or(0))? + 1)
    } else {
        None
    };
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
        ids_from,
    })
}

/// Ids go on after a rollback from the next of these ranges above every id
/// the store or the witness knows (docs/store.md, "Restoring a backup").
pub const ID_RANGE: u64 = 1 << 40;

/// The first id of the range after `highest`'s.
#[must_use]
pub fn next_id_range(highest: u64) -> u64 {
    (highest / ID_RANGE)
        .saturating_add(1)
        .saturating_mul(ID_RANGE)
}

/// Moves the handover and delivery counters past every id the lost batches
/// may have handed out: a recipient may hold a delivery id from them (a
/// pull, an ack to retry), a sender a receipt, MESH a local id; handing the
/// same id to another patient's summary would let that ack or receipt act
/// on it.
fn ids_beyond_the_lost(trees: &[sled::Tree], journaled: u64) -> Result<u64, StoreError> {
    let handover = meta(trees, records::META_LAST_HANDOVER)?;
    let delivery = meta(trees, records::META_LAST_DELIVERY)?;
    let from = next_id_range(handover.max(delivery).max(journaled));
    let tree = &trees[TreeId::Meta as usize];
    // Counted as skipped (the payloads-held figure counts ids), and a store
    // from before retention keeps its backfill to the ids it handed out.
    let skipped = meta(trees, super::writer::retention::META_IDS_SKIPPED)?;
    let skipped = skipped.saturating_add(from - handover);
    tree.insert(
        super::writer::retention::META_IDS_SKIPPED,
        records::be(skipped).to_vec(),
    )?;
    if tree.get(super::writer::retention::META_BACKFILL)?.is_none() {
        let mut cursor = records::be(1).to_vec();
        cursor.extend_from_slice(&records::be(handover));
        tree.insert(super::writer::retention::META_BACKFILL, cursor)?;
    }
    tree.insert(records::META_LAST_HANDOVER, records::be(from).to_vec())?;
    tree.insert(records::META_LAST_DELIVERY, records::be(from).to_vec())?;
    tree.flush()?;
    Ok(from)
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
    /// The first entry verified: 1, or the first kept by the retention cut.
    pub from: u64,
    /// The signed retention cut verification started from, if entries
    /// older than the audit period were removed.
    pub cut: Option<AuditCut>,
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
    let db = super::open_sled_offline(&dir.join("sled"))?;
    let tree = db.open_tree(TreeId::Audit.name())?;
    let cut = audit_cut(&db.open_tree(TreeId::Meta.name())?)?;
    let values = tree.iter().values().collect::<Result<Vec<_>, _>>()?;
    let mut verified = None;
    for (from, signed) in &anchors {
        let v = crate::audit::verify_from(
            values.iter().map(|v| v.as_ref()),
            key.as_ref(),
            Some(&signed.checkpoint),
            cut.as_ref(),
        )
        .map_err(|e| StoreError::Corrupt(format!("{e} (anchor: {from})")))?;
        verified = Some(v);
    }
    let v = verified.expect("at least the witness's anchor");
    Ok(AuditVerification {
        entries: v.entries,
        from: v.from,
        cut: v.cut,
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
    let db = super::open_sled_offline(&dir.join("sled"))?;
    db.open_tree(TreeId::Audit.name())?
        .iter()
        .values()
        .map(|v| serde_json::from_slice(&v?).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;
    use crate::store::{Store, SystemClock};

    /// Opens the store; a store just closed or refused in this process may
    /// hold sled's lock a moment longer (its threads end on their own).
    fn open_deep(data: &Path, pipeline_depth: usize) -> Result<Store, StoreError> {
        let mut tries = 0;
        loop {
            let options = StoreOptions {
                pipeline_depth,
                ..StoreOptions::default()
            };
            match Store::open(data, options, Arc::new(SystemClock)) {
                Err(e) if tries < 250 && held_lock(&e.to_string()) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn held_lock(error: &str) -> bool {
        error.contains("could not acquire lock")
    }

    async fn batches(store: &Store, n: usize) {
        for _ in 0..n {
            store
                .record(AuditEvent {
                    actor: "urn:ods:YP001".into(),
                    action: "connect",
                    outcome: "ok".into(),
                    ..AuditEvent::default()
                })
                .await
                .unwrap();
        }
    }

    fn refusal(data: &Path, pipeline_depth: usize) -> String {
        match open_deep(data, pipeline_depth) {
            Ok(_) => panic!("opened a store its witness contradicts"),
            Err(e) => e.to_string(),
        }
    }

    fn forget_clean_close(data: &Path) {
        // A refused open's sled threads may still hold the lock a moment.
        let mut tries = 0;
        let db = loop {
            match sled::open(data.join("sled")) {
                Ok(db) => break db,
                Err(e) if tries < 250 && held_lock(&e.to_string()) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let meta = db.open_tree(TreeId::Meta.name()).unwrap();
        assert!(meta.remove(META_CLEAN_CLOSE).unwrap().is_some());
        db.flush().unwrap();
    }

    /// A crash may leave the witness behind by what the crashed run's
    /// pipeline allows, whatever the depth configured at the next open; a
    /// clean close leaves it exact.
    async fn the_witness_may_trail_by_the_crash_lag_only(written: usize, reopened: usize) {
        let lag = crate::store::witness_lag(written) as usize;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let file = WitnessPaths::of(&data, &StoreOptions::default()).file;
        let store = open_deep(&data, written).unwrap();
        batches(&store, 1).await;
        let at1 = std::fs::read(&file).unwrap();
        batches(&store, 1).await;
        let at2 = std::fs::read(&file).unwrap();
        batches(&store, lag).await;
        store.close().await.unwrap();
        drop(store);

        std::fs::write(&file, &at2).unwrap();
        let refused = refusal(&data, reopened);
        assert!(refused.contains("closed cleanly"), "{refused}");

        forget_clean_close(&data);
        std::fs::write(&file, &at1).unwrap();
        let refused = refusal(&data, reopened);
        assert!(refused.contains("rolled back"), "{refused}");
        std::fs::write(&file, &at2).unwrap();
        let store = open_deep(&data, reopened).unwrap();
        store.close().await.unwrap();
        drop(store);
        // Caught up at open: the lag does not add up.
        let head = high_water::read(&file).unwrap().unwrap().head.unwrap();
        assert_eq!(head.checkpoint.commit_seq, 2 + lag as u64);
    }

    #[tokio::test]
    async fn without_a_pipeline_the_witness_trails_by_two_batches_at_most() {
        assert_eq!(crate::store::witness_lag(0), 2);
        the_witness_may_trail_by_the_crash_lag_only(0, 0).await;
    }

    #[tokio::test]
    async fn the_crashed_runs_pipeline_sets_the_lag_not_the_next_config() {
        the_witness_may_trail_by_the_crash_lag_only(crate::store::PIPELINE_DEPTH, 0).await;
    }
}
