//! The witness: a promise, kept outside the data directory, of how much the
//! store had made durable. A store that opens with less than it promised has
//! lost acknowledged data (a restored backup, a truncated log) and refuses to
//! start rather than serve a silent loss; see `integrity` for the checks.
//!
//! It lives in its own directory (`integrity.witness_dir`, default
//! `<data_dir>.witness`), ideally on another volume: a witness inside the data
//! directory comes back with every restore of it.
//!
//! # Layout of `<witness_dir>/witness`
//! | bytes        | what |
//! |--------------|------|
//! | 0..512       | head slot A |
//! | 512..1024    | head slot B |
//! | 4096..       | journal: one record per acknowledged handover, appended |
//!
//! A head slot is `TCWITN01`, then the [`Checkpoint`] (commit_seq, audit_seq
//! u64 BE, the audit hash's 32 bytes, keyed_from u64 BE, at_ms i64 BE), the
//! Ed25519 public key (32) and signature (64), and a CRC-32 of all that. Heads
//! alternate between the slots, so a torn write leaves the other one whole;
//! the valid slot with the higher commit_seq wins.
//!
//! After a head, in the same slot, the journal's length when the head was
//! written (u64 BE) and a CRC-32 of the head and that length: every record
//! before it belongs to a batch the head covers, so an open that finds the
//! store not behind the head reads the journal from there, not from the
//! start (the journal grows ~110 bytes per handover for ever). A head
//! without it (written by an older gateway, which ignores it) means reading
//! the whole journal.
//!
//! A journal record is its length (u32 BE), a CRC-32 (u32 BE) and
//! [`Acknowledged`] as JSON: ids, sender and message id, never patient data.
//! A torn last record is dropped on open.
//!
//! # Why it lags one batch, and costs no extra fsync
//! After a batch passes its barrier, its head is written in place; the *next*
//! barrier syncs this file together with sled's log (one `fdatasync` each, as
//! the in-data-directory high-water file cost before). So the durable head
//! never exceeds what sled has made durable. A batch's journal records are
//! appended *before* its barrier, so they are durable exactly when the batch
//! is; records of a batch that never became durable are cut off on open.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::{AuditKey, Checkpoint, SignedCheckpoint, hex, unhex};

/// The witness file's name inside the witness directory.
pub const FILE_NAME: &str = "witness";

const MAGIC: &[u8; 8] = b"TCWITN01";
const SLOTS: [u64; 2] = [0, 512];
const JOURNAL_START: u64 = 4096;
const CHECKPOINT_LEN: usize = 8 + 8 + 32 + 8 + 8;
const HEAD_LEN: usize = 8 + CHECKPOINT_LEN + 32 + 64 + 4;
/// A head followed by the journal length it covers and their CRC-32.
const SLOT_LEN: usize = HEAD_LEN + 8 + 4;
/// Largest journal record accepted on read (a sender and message id are short).
const MAX_RECORD: u32 = 64 * 1024;

/// The default witness directory of a data directory: its sibling
/// `<data_dir>.witness` (absolute).
pub fn default_dir(data_dir: &Path) -> PathBuf {
    let abs = normalise(data_dir);
    let name = abs
        .file_name()
        .map(|n| format!("{}.witness", n.to_string_lossy()))
        .unwrap_or_else(|| "throughcare.witness".into());
    abs.with_file_name(name)
}

/// `path` made absolute and lexically normalised (`.` and `..` resolved),
/// with its longest existing prefix resolved through symlinks, so that
/// [`is_within`] compares where things really are.
pub fn normalise(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    let mut existing = out.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match existing.file_name() {
            Some(name) => rest.push(name.to_owned()),
            None => break,
        }
        existing.pop();
    }
    let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
    resolved.extend(rest.iter().rev());
    resolved
}

/// Whether two existing paths are on the same file system (device).
pub fn same_volume(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// Whether `inner` is `outer` or lies below it (both as [`normalise`]d).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    normalise(inner).starts_with(normalise(outer))
}

/// One acknowledged handover, as the witness remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledged {
    /// The batch that made it durable.
    pub commit_seq: u64,
    /// Its handover id.
    pub handover_id: u64,
    /// The sender's ODS code.
    pub sender: String,
    /// The sender's message id (its idempotency key).
    pub message_id: String,
    /// When it was accepted, ms since the epoch.
    pub at_ms: i64,
}

/// A head slot as read: the checkpoint and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// What it promises.
    pub checkpoint: Checkpoint,
    /// The public key written with it.
    pub public_key: [u8; 32],
    /// Ed25519 signature over [`Checkpoint::signed_bytes`].
    pub signature: [u8; 64],
}

impl Head {
    /// As exported to operators.
    pub fn signed(&self) -> SignedCheckpoint {
        SignedCheckpoint {
            checkpoint: self.checkpoint.clone(),
            signature: hex(&self.signature),
            public_key: hex(&self.public_key),
        }
    }

    fn encode(&self) -> [u8; HEAD_LEN] {
        let c = &self.checkpoint;
        let mut buf = [0u8; HEAD_LEN];
        let mut at = 0;
        for part in [
            MAGIC.as_slice(),
            &c.commit_seq.to_be_bytes(),
            &c.audit_seq.to_be_bytes(),
            &unhex(&c.audit_hash).unwrap_or_else(|| vec![0xff; 32]),
            &c.keyed_from.to_be_bytes(),
            &c.at_ms.to_be_bytes(),
            &self.public_key,
            &self.signature,
        ] {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let crc = crc32fast::hash(&buf[..at]);
        buf[at..].copy_from_slice(&crc.to_be_bytes());
        buf
    }

    /// The head and the journal length it covers, as a slot holds them.
    fn encode_with_journal(&self, journal_end: u64) -> [u8; SLOT_LEN] {
        let mut buf = [0u8; SLOT_LEN];
        buf[..HEAD_LEN].copy_from_slice(&self.encode());
        buf[HEAD_LEN..HEAD_LEN + 8].copy_from_slice(&journal_end.to_be_bytes());
        let crc = crc32fast::hash(&buf[..HEAD_LEN + 8]);
        buf[HEAD_LEN + 8..].copy_from_slice(&crc.to_be_bytes());
        buf
    }

    /// The journal length a slot's head covers, when recorded with it.
    fn journal_end_of(slot: &[u8; SLOT_LEN]) -> Option<u64> {
        let (covered, crc) = slot.split_at(HEAD_LEN + 8);
        (crc32fast::hash(covered).to_be_bytes() == crc)
            .then(|| u64::from_be_bytes(covered[HEAD_LEN..].try_into().unwrap_or_default()))
    }

    fn decode(buf: &[u8; HEAD_LEN]) -> Option<Self> {
        let (body, crc) = buf.split_at(HEAD_LEN - 4);
        if !body.starts_with(MAGIC) || crc32fast::hash(body).to_be_bytes() != crc {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or_default());
        let c = 8;
        Some(Self {
            checkpoint: Checkpoint {
                commit_seq: u64_at(c),
                audit_seq: u64_at(c + 8),
                audit_hash: hex(&body[c + 16..c + 48]),
                keyed_from: u64_at(c + 48),
                at_ms: i64::from_be_bytes(body[c + 56..c + 64].try_into().unwrap_or_default()),
            },
            public_key: body[c + CHECKPOINT_LEN..c + CHECKPOINT_LEN + 32]
                .try_into()
                .ok()?,
            signature: body[c + CHECKPOINT_LEN + 32..].try_into().ok()?,
        })
    }
}

/// What a witness file holds.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The newest valid head, if any slot is valid.
    pub head: Option<Head>,
    /// The slot the newest head is in.
    slot: usize,
    /// Journal records, in the order written, with the offset each starts at
    /// (from the start, or from where the head says its batches' records
    /// end: [`read_tail`]).
    pub journal: Vec<(u64, Acknowledged)>,
    /// Where the last whole journal record ends.
    pub journal_end: u64,
    /// The journal length the newest head covers, when recorded with it.
    covered: Option<u64>,
}

/// Reads the witness at `path`; `None` when there is no file.
///
/// # Errors
/// I/O errors. An unreadable head or torn journal tail is not an error: the
/// caller decides what a missing head means.
pub fn read(path: &Path) -> io::Result<Option<Record>> {
    read_from(path, false)
}

/// As [`read`], but the journal only from where the newest head says the
/// records of the batches it covers end (from the start when it does not
/// say, or the records there do not read). Enough for an open that finds
/// the store not behind the head: every record it may cut off or needs
/// is after that point.
///
/// # Errors
/// As [`read`].
pub fn read_tail(path: &Path) -> io::Result<Option<Record>> {
    read_from(path, true)
}

fn read_from(path: &Path, tail: bool) -> io::Result<Option<Record>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut record = Record {
        journal_end: JOURNAL_START,
        ..Record::default()
    };
    for (i, offset) in SLOTS.iter().enumerate() {
        let mut buf = [0u8; SLOT_LEN];
        if file.read_exact_at(&mut buf, *offset).is_err() {
            continue;
        }
        let Some(head) = Head::decode(buf[..HEAD_LEN].try_into().unwrap_or(&[0; HEAD_LEN])) else {
            continue;
        };
        let newer = record
            .head
            .as_ref()
            .is_none_or(|h| head.checkpoint.commit_seq > h.checkpoint.commit_seq);
        if newer {
            record.head = Some(head);
            record.slot = i;
            record.covered = Head::journal_end_of(&buf);
        }
    }
    let len = file.metadata()?.len();
    let start = match record.covered {
        Some(at) if tail && (JOURNAL_START..=len).contains(&at) => at,
        _ => JOURNAL_START,
    };
    let bytes = read_range(&file, start, len)?;
    let (journal, end) = parse_journal(&bytes, start);
    if journal.is_empty() && end < len && start > JOURNAL_START {
        // Nothing reads where the head points: read it all.
        return read_from(path, false);
    }
    record.journal = journal;
    record.journal_end = end;
    Ok(Some(record))
}

fn read_range(file: &File, from: u64, to: u64) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; usize::try_from(to.saturating_sub(from)).unwrap_or(0)];
    file.read_exact_at(&mut bytes, from)?;
    Ok(bytes)
}

/// The whole records in `bytes` (which start at file offset `base`), and
/// the offset where the last whole one ends; a torn or damaged record ends it.
fn parse_journal(bytes: &[u8], base: u64) -> (Vec<(u64, Acknowledged)>, u64) {
    let mut journal = Vec::new();
    let mut rest = bytes;
    let mut at = base;
    while let Some((prefix, after)) = rest.split_at_checked(8) {
        let size = u32::from_be_bytes(prefix[..4].try_into().unwrap_or_default());
        if size > MAX_RECORD {
            break;
        }
        let Some((body, after)) = after.split_at_checked(size as usize) else {
            break;
        };
        if crc32fast::hash(body).to_be_bytes() != prefix[4..] {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<Acknowledged>(body) else {
            break;
        };
        journal.push((at, entry));
        at += 8 + u64::from(size);
        rest = after;
    }
    (journal, at)
}

fn journal_bytes(entries: &[Acknowledged]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let body = serde_json::to_vec(e).expect("a journal record always serialises");
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

fn sign(key: &AuditKey, checkpoint: Checkpoint) -> Head {
    let signed = checkpoint.sign(key);
    Head {
        public_key: unhex(&signed.public_key)
            .and_then(|k| k.try_into().ok())
            .unwrap_or([0; 32]),
        signature: unhex(&signed.signature)
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; 64]),
        checkpoint,
    }
}

/// Writes a whole new witness (head in slot A, then `journal`) next to
/// `path` and renames it into place, durably: used when a witness is first
/// made and when an operator re-bases it.
///
/// # Errors
/// I/O errors.
pub fn create(
    path: &Path,
    key: &AuditKey,
    checkpoint: Checkpoint,
    journal: &[Acknowledged],
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::store::private_dir(dir)?;
    let tmp = path.with_extension("new");
    let mut opts = OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.write(true).create(true).truncate(true).open(&tmp)?;
    let journal = journal_bytes(journal);
    let covered = JOURNAL_START + journal.len() as u64;
    file.write_all_at(
        &sign(key, checkpoint).encode_with_journal(covered),
        SLOTS[0],
    )?;
    file.write_all_at(&journal, JOURNAL_START)?;
    file.set_len(JOURNAL_START.max(file.metadata()?.len()))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The witness of an open store, written by the store writer.
pub struct HighWater {
    file: File,
    key: Arc<AuditKey>,
    next_slot: usize,
    journal_end: u64,
    keyed_from: u64,
    /// The last handover id journaled (or present when opened).
    last_handover: u64,
    /// The head written last; durable after the next barrier.
    written: Checkpoint,
    /// The head before it: durable (the last barrier synced it).
    durable: Checkpoint,
}

impl HighWater {
    /// Opens the witness at `path` (as `record` describes it) for writing.
    /// Journal records of batches after `store_commit_seq` are cut off: those
    /// batches never became durable, so nobody was told they were.
    ///
    /// # Errors
    /// I/O errors; a record with no valid head.
    pub fn open(
        path: &Path,
        key: Arc<AuditKey>,
        record: &Record,
        store_commit_seq: u64,
        last_handover: u64,
    ) -> io::Result<Self> {
        let head = record.head.clone().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "witness has no valid head")
        })?;
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let cut = record
            .journal
            .iter()
            .find(|(_, e)| e.commit_seq > store_commit_seq)
            .map_or(record.journal_end, |(at, _)| *at);
        if cut != file.metadata()?.len() {
            file.set_len(cut.max(JOURNAL_START))?;
        }
        Ok(Self {
            file,
            key,
            next_slot: 1 - record.slot,
            journal_end: cut.max(JOURNAL_START),
            keyed_from: head.checkpoint.keyed_from,
            last_handover,
            durable: head.checkpoint.clone(),
            written: head.checkpoint,
        })
    }

    /// The audit key the chain and the checkpoints use.
    pub fn key(&self) -> Arc<AuditKey> {
        self.key.clone()
    }

    /// The last handover id the journal (or the store, at open) holds.
    pub fn last_handover(&self) -> u64 {
        self.last_handover
    }

    /// The first keyed audit entry.
    pub fn keyed_from(&self) -> u64 {
        self.keyed_from
    }

    /// The head written last (durable after the next barrier).
    pub fn written(&self) -> &Checkpoint {
        &self.written
    }

    /// The newest head known durable. After a crash the witness may hold
    /// this one (or, when the crash tore the next head, the one before):
    /// the audit entry it anchors must still be there at the next open.
    pub fn durable(&self) -> &Checkpoint {
        &self.durable
    }

    /// Appends `acked` to the journal; durable with the barrier that follows.
    ///
    /// # Errors
    /// I/O errors.
    pub fn journal(&mut self, acked: &[Acknowledged]) -> io::Result<()> {
        if acked.is_empty() {
            return Ok(());
        }
        let bytes = journal_bytes(acked);
        self.file.write_all_at(&bytes, self.journal_end)?;
        self.journal_end += bytes.len() as u64;
        self.last_handover = acked
            .iter()
            .map(|a| a.handover_id)
            .max()
            .unwrap_or(self.last_handover)
            .max(self.last_handover);
        Ok(())
    }

    /// Signs and writes the head for `checkpoint` (its `keyed_from` is the
    /// witness's); durable after the next barrier. Returns the head the
    /// barrier just passed made durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn record(&mut self, mut checkpoint: Checkpoint) -> io::Result<Checkpoint> {
        checkpoint.keyed_from = self.keyed_from;
        let head = sign(&self.key, checkpoint.clone());
        // The journal holds exactly the records of batches up to this one:
        // the syncer journals a group's batches before the barrier it signs.
        self.file.write_all_at(
            &head.encode_with_journal(self.journal_end),
            SLOTS[self.next_slot],
        )?;
        self.next_slot = 1 - self.next_slot;
        let durable = std::mem::replace(&mut self.written, checkpoint);
        self.durable.clone_from(&durable);
        Ok(durable)
    }

    /// The file, for the barrier to sync.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<AuditKey> {
        Arc::new(AuditKey::from_secret(b"0123456789abcdef0123456789abcdef"))
    }

    fn checkpoint(commit_seq: u64) -> Checkpoint {
        Checkpoint {
            commit_seq,
            audit_seq: commit_seq * 2,
            audit_hash: crate::audit::GENESIS.into(),
            keyed_from: 1,
            at_ms: 7,
        }
    }

    fn acked(commit_seq: u64, id: u64) -> Acknowledged {
        Acknowledged {
            commit_seq,
            handover_id: id,
            sender: "YP001".into(),
            message_id: format!("m-{id}"),
            at_ms: 1,
        }
    }

    #[test]
    fn heads_alternate_and_a_torn_one_leaves_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        create(&path, &key(), checkpoint(0), &[]).unwrap();
        let record = read(&path).unwrap().unwrap();
        let mut w = HighWater::open(&path, key(), &record, 0, 0).unwrap();
        w.journal(&[acked(1, 1), acked(1, 2)]).unwrap();
        assert_eq!(w.record(checkpoint(1)).unwrap().commit_seq, 0);
        w.journal(&[acked(2, 3)]).unwrap();
        w.record(checkpoint(2)).unwrap();
        let record = read(&path).unwrap().unwrap();
        let head = record.head.clone().unwrap();
        assert_eq!(head.checkpoint, checkpoint(2));
        assert!(head.signed().verifies(&key()));
        assert_eq!(record.journal.len(), 3);

        // Tear the newest head (slot A again after B): the older one stands.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"xx", 20)
            .unwrap();
        let torn = read(&path).unwrap().unwrap();
        assert_eq!(torn.head.unwrap().checkpoint.commit_seq, 1);

        // Journal records of a batch the store does not hold are cut off.
        let mut w = HighWater::open(&path, key(), &record, 1, 2).unwrap();
        w.journal(&[acked(2, 9)]).unwrap();
        let after = read(&path).unwrap().unwrap();
        let ids: Vec<u64> = after.journal.iter().map(|(_, a)| a.handover_id).collect();
        assert_eq!(ids, [1, 2, 9]);
    }

    /// An open reads the journal from where the newest head's batches end;
    /// a head from an older gateway (no length after it) or a length where
    /// no record starts means reading it all.
    #[test]
    fn the_tail_is_read_from_where_the_head_says() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        create(&path, &key(), checkpoint(0), &[acked(0, 1)]).unwrap();
        let record = read(&path).unwrap().unwrap();
        let mut w = HighWater::open(&path, key(), &record, 0, 1).unwrap();
        w.journal(&[acked(1, 2), acked(1, 3)]).unwrap();
        w.record(checkpoint(1)).unwrap();
        w.journal(&[acked(2, 4)]).unwrap();
        let ids =
            |r: &Record| -> Vec<u64> { r.journal.iter().map(|(_, a)| a.handover_id).collect() };
        let full = read(&path).unwrap().unwrap();
        assert_eq!(ids(&full), [1, 2, 3, 4]);
        let tail = read_tail(&path).unwrap().unwrap();
        assert_eq!(ids(&tail), [4]);
        assert_eq!(tail.journal_end, full.journal_end);
        assert_eq!(tail.head, full.head);

        // As an older gateway wrote the head: the head alone.
        let slot = SLOTS[tail.slot];
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; SLOT_LEN - HEAD_LEN], slot + HEAD_LEN as u64)
            .unwrap();
        assert_eq!(ids(&read_tail(&path).unwrap().unwrap()), [1, 2, 3, 4]);

        // A length (with a valid CRC) in the middle of a record.
        let head = tail.head.clone().unwrap();
        let inside = full.journal[1].0 + 3;
        f.write_all_at(&head.encode_with_journal(inside), slot)
            .unwrap();
        assert_eq!(ids(&read_tail(&path).unwrap().unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn a_torn_journal_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        create(&path, &key(), checkpoint(3), &[acked(1, 1), acked(2, 2)]).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let record = read(&path).unwrap().unwrap();
        assert_eq!(record.journal.len(), 1);
        assert!(read(&dir.path().join("absent")).unwrap().is_none());
    }

    #[test]
    fn the_default_witness_sits_beside_the_data_directory() {
        let d = default_dir(Path::new("/var/lib/throughcare/data/"));
        assert_eq!(d, Path::new("/var/lib/throughcare/data.witness"));
        assert!(!is_within(&d, Path::new("/var/lib/throughcare/data")));
        assert!(is_within(
            Path::new("/srv/data/../data/keys/k"),
            Path::new("/srv/data")
        ));
        assert!(!is_within(
            Path::new("/srv/database"),
            Path::new("/srv/data")
        ));
    }
}
