//! The queue index as it stood at a clean close, so the next open need not
//! rebuild it from every live delivery record.
//!
//! Rebuilding the index ([`super::schedule`]) reads the `pending` tree and
//! one `deliveries` record per live delivery: with 200,000 queued that is
//! most of a restart (about 1.6 s here), nearly all of it sled pulling pages
//! from its log. So a clean close writes the index to
//! `<data_dir>/queue-index` (columns of integers, mailbox and patient keys
//! once each), and the next open reads that instead (tens of ms).
//!
//! # When it is used
//! Only for the open right after the clean close that wrote it. The file
//! carries a random nonce and the committed batch count; the close's final
//! barrier records the same nonce in `meta` next to the clean-close mark
//! ([`super::integrity`]). An open uses the file only when the nonce, the
//! clean-close mark and the store's committed count all agree with it, then
//! removes both the file and the nonce before any batch is applied. Anything
//! else (a crash, a failed final barrier, a torn or foreign file, a restored
//! data directory, a file from an older close) rebuilds the index from the
//! trees, as every open did before: the file is a cache of committed state,
//! never a source of it.
//!
//! # Layout
//! `TCQIDX01`, then a protobuf [`Columns`], then a CRC-32 (u32 BE) of both.
//! The magic is the format's version: a file with any other is not used
//! (the index is rebuilt). The file holds mailbox and patient names, not
//! the schedule's in-memory ids, so the compact schedule of 2026-11-30 left
//! it unchanged.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StoreError;
use super::records::{self, TreeId};
use super::schedule::{Live, Schedule, Slot};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "queue-index";

const MAGIC: &[u8; 8] = b"TCQIDX01";

/// Meta key (u64 BE): the nonce of the index written at the last clean close.
pub(super) const META_INDEX_NONCE: &[u8] = b"queue_index_nonce";

/// The index in columns: row `i` of every per-delivery column is one live
/// delivery. Mailboxes and patient keys are stored once and referred to by
/// position.
#[derive(Clone, PartialEq, prost::Message)]
struct Columns {
    #[prost(uint64, tag = "1")]
    nonce: u64,
    #[prost(uint64, tag = "2")]
    commit_seq: u64,
    #[prost(string, repeated, tag = "3")]
    mailboxes: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    patients: Vec<String>,
    #[prost(uint64, repeated, tag = "5")]
    id: Vec<u64>,
    #[prost(uint32, repeated, tag = "6")]
    mailbox: Vec<u32>,
    #[prost(uint32, repeated, tag = "7")]
    patient: Vec<u32>,
    /// Bits: urgent, leased, has a deadline, deadline reported, has
    /// `max_attempts`, stale.
    #[prost(uint32, repeated, tag = "8")]
    flags: Vec<u32>,
    #[prost(uint32, repeated, tag = "9")]
    attempt: Vec<u32>,
    /// Not-before time when queued, lease expiry when leased.
    #[prost(sint64, repeated, tag = "10")]
    slot_ms: Vec<i64>,
    #[prost(sint64, repeated, tag = "11")]
    queued_at_ms: Vec<i64>,
    #[prost(sint64, repeated, tag = "12")]
    due_ms: Vec<i64>,
    #[prost(uint32, repeated, tag = "13")]
    max_attempts: Vec<u32>,
    /// Quarantined deliveries per mailbox (by position).
    #[prost(uint32, repeated, tag = "14")]
    quarantine_mailbox: Vec<u32>,
    #[prost(uint64, repeated, tag = "15")]
    quarantine_count: Vec<u64>,
    /// Each quarantined delivery with its patient (by position).
    #[prost(uint32, repeated, tag = "16")]
    quarantined_patient: Vec<u32>,
    #[prost(uint64, repeated, tag = "17")]
    quarantined_id: Vec<u64>,
}

const URGENT: u32 = 1;
const LEASED: u32 = 2;
const HAS_DUE: u32 = 4;
const DUE_REPORTED: u32 = 8;
const HAS_MAX_ATTEMPTS: u32 = 16;
const STALE: u32 = 32;

/// The writer's in-memory view of the live and quarantined deliveries.
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Live deliveries.
    pub schedule: Schedule,
    /// Quarantined deliveries per mailbox.
    pub quarantined: HashMap<String, u64>,
    /// Quarantined deliveries per patient.
    pub quarantined_of: HashMap<String, BTreeSet<u64>>,
}

/// Where the index file of data directory `dir` is.
pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Interns strings by position.
#[derive(Default)]
struct Table {
    names: Vec<String>,
    at: HashMap<String, u32>,
}

impl Table {
    fn of(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.at.get(name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.to_owned());
        self.at.insert(name.to_owned(), i);
        i
    }
}

/// Writes the index of a store at `commit_seq` (not synced: a file the
/// close's barrier does not vouch for is never used). Returns its nonce.
///
/// # Errors
/// I/O errors; the caller logs them and closes without a checkpoint.
pub(super) fn write(
    dir: &Path,
    commit_seq: u64,
    schedule: &Schedule,
    quarantined: &HashMap<String, u64>,
    quarantined_of: &HashMap<String, BTreeSet<u64>>,
) -> std::io::Result<u64> {
    let nonce = uuid::Uuid::new_v4().as_u64_pair().0;
    let mut c = Columns {
        nonce,
        commit_seq,
        ..Columns::default()
    };
    let (mut mailboxes, mut patients) = (Table::default(), Table::default());
    for (id, live) in schedule.iter() {
        let mut flags = 0;
        let slot_ms = match live.lease {
            Slot::Queued { not_before_ms } => not_before_ms,
            Slot::Leased { until_ms } => {
                flags |= LEASED;
                until_ms
            }
        };
        for (set, bit) in [
            (live.urgent, URGENT),
            (live.due_ms.is_some(), HAS_DUE),
            (live.due_reported, DUE_REPORTED),
            (live.max_attempts.is_some(), HAS_MAX_ATTEMPTS),
            (live.stale, STALE),
        ] {
            if set {
                flags |= bit;
            }
        }
        c.id.push(id);
        c.mailbox.push(mailboxes.of(&live.mailbox));
        c.patient.push(patients.of(&live.patient_key));
        c.flags.push(flags);
        c.attempt.push(live.attempt);
        c.slot_ms.push(slot_ms);
        c.queued_at_ms.push(live.queued_at_ms);
        c.due_ms.push(live.due_ms.unwrap_or(0));
        c.max_attempts.push(live.max_attempts.unwrap_or(0));
    }
    // A mailbox whose quarantine emptied is left out, as a rebuild leaves it.
    for (mailbox, count) in quarantined.iter().filter(|(_, n)| **n > 0) {
        c.quarantine_mailbox.push(mailboxes.of(mailbox));
        c.quarantine_count.push(*count);
    }
    for (patient, ids) in quarantined_of {
        let p = patients.of(patient);
        for id in ids {
            c.quarantined_patient.push(p);
            c.quarantined_id.push(*id);
        }
    }
    c.mailboxes = mailboxes.names;
    c.patients = patients.names;
    let mut bytes = MAGIC.to_vec();
    prost::Message::encode(&c, &mut bytes).map_err(std::io::Error::other)?;
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    let tmp = path(dir).with_extension("new");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    drop(file);
    std::fs::rename(&tmp, path(dir))?;
    Ok(nonce)
}

/// Takes the index a clean close left for this open: `Some` only when it is
/// whole and its nonce and batch count are what the store's `meta` says the
/// close recorded. The file and the nonce are removed either way (the nonce's
/// removal is made durable by the open's first seal), so no later open can
/// use them.
///
/// # Errors
/// Sled errors reading or writing `meta`; a file that cannot be removed.
pub(super) fn take(dir: &Path, trees: &[sled::Tree]) -> Result<Option<Index>, StoreError> {
    let meta = &trees[TreeId::Meta as usize];
    let counter = |key: &[u8]| -> Result<Option<u64>, StoreError> {
        Ok(meta.get(key)?.and_then(|v| records::from_be(&v)))
    };
    let nonce = counter(META_INDEX_NONCE)?;
    let clean = counter(super::integrity::META_CLEAN_CLOSE)?;
    let commit_seq = counter(records::META_COMMIT_SEQ)?.unwrap_or(0);
    let file = path(dir);
    let bytes = match std::fs::read(&file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    if nonce.is_some() {
        meta.remove(META_INDEX_NONCE)?;
    }
    if bytes.is_some() {
        std::fs::remove_file(&file)?;
    }
    let (Some(nonce), Some(bytes)) = (nonce, bytes) else {
        return Ok(None);
    };
    if clean != Some(commit_seq) {
        return Ok(None);
    }
    let index = decode(&bytes).filter(|(c, _)| c.nonce == nonce && c.commit_seq == commit_seq);
    if index.is_none() {
        tracing::warn!(
            file = %file.display(),
            "the queue index left by the last close does not match the store; rebuilding it from the deliveries"
        );
    }
    Ok(index.map(|(_, index)| index))
}

fn decode(bytes: &[u8]) -> Option<(Columns, Index)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_be_bytes() != crc {
        return None;
    }
    let c: Columns = prost::Message::decode(body.strip_prefix(MAGIC)?).ok()?;
    let n = c.id.len();
    let columns = [
        c.mailbox.len(),
        c.patient.len(),
        c.flags.len(),
        c.attempt.len(),
        c.slot_ms.len(),
        c.queued_at_ms.len(),
        c.due_ms.len(),
        c.max_attempts.len(),
    ];
    if columns.iter().any(|&len| len != n)
        || c.quarantine_count.len() != c.quarantine_mailbox.len()
        || c.quarantined_patient.len() != c.quarantined_id.len()
    {
        return None;
    }
    let mailboxes: Vec<Arc<str>> = c.mailboxes.iter().map(|m| m.as_str().into()).collect();
    let patients: Vec<Arc<str>> = c.patients.iter().map(|p| p.as_str().into()).collect();
    let at = |table: &[Arc<str>], i: u32| table.get(usize::try_from(i).ok()?).cloned();
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let flags = c.flags[i];
        let live = Live {
            mailbox: at(&mailboxes, c.mailbox[i])?,
            patient_key: at(&patients, c.patient[i])?,
            urgent: flags & URGENT != 0,
            attempt: c.attempt[i],
            lease: if flags & LEASED != 0 {
                Slot::Leased {
                    until_ms: c.slot_ms[i],
                }
            } else {
                Slot::Queued {
                    not_before_ms: c.slot_ms[i],
                }
            },
            queued_at_ms: c.queued_at_ms[i],
            due_ms: (flags & HAS_DUE != 0).then_some(c.due_ms[i]),
            due_reported: flags & DUE_REPORTED != 0,
            max_attempts: (flags & HAS_MAX_ATTEMPTS != 0).then_some(c.max_attempts[i]),
            stale: flags & STALE != 0,
        };
        rows.push((c.id[i], live));
    }
    let mut index = Index {
        schedule: Schedule::from_rows(rows),
        ..Index::default()
    };
    for (&m, &count) in c.quarantine_mailbox.iter().zip(&c.quarantine_count) {
        index
            .quarantined
            .insert(at(&mailboxes, m)?.to_string(), count);
    }
    for (&p, &id) in c.quarantined_patient.iter().zip(&c.quarantined_id) {
        index
            .quarantined_of
            .entry(at(&patients, p)?.to_string())
            .or_default()
            .insert(id);
    }
    Some((c, index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::JourneyEvent;
    use crate::store::{
        ManualClock, NewDelivery, NewHandover, PatientIds, Store, StoreOptions, writer,
    };

    type Rows = std::collections::BTreeMap<u64, Live>;

    fn rows(s: &Schedule) -> Rows {
        s.iter().map(|(id, live)| (id, live.clone())).collect()
    }

    fn handover(i: u64, patient: u64) -> NewHandover {
        NewHandover {
            actor: "urn:ods:YP001".into(),
            sender: "YP001".into(),
            message_id: format!("m{i}"),
            event: JourneyEvent::Release,
            patient: PatientIds {
                nhs: Some(format!("p{patient}")),
                prison: None,
                dob: None,
            },
            claim_keys: Vec::new(),
            requested_destinations: Vec::new(),
            destinations: vec![
                NewDelivery {
                    mailbox: "MB0".into(),
                    urgent: i.is_multiple_of(3),
                    due_ms: i.is_multiple_of(2).then_some(1_000_500),
                    ..NewDelivery::default()
                },
                NewDelivery {
                    mailbox: "MB1".into(),
                    ..NewDelivery::default()
                },
            ],
            payload: vec![u8::try_from(i).unwrap(); 10],
            supersede: false,
            trace_parent: None,
            authored_at_ms: None,
            withdrawal: None,
            episode: None,
            movement: None,
            movement_as_written: None,
        }
    }

    fn trees(data: &Path) -> (sled::Db, Vec<sled::Tree>) {
        let db = sled::open(data.join("sled")).unwrap();
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.name()).unwrap())
            .collect();
        (db, trees)
    }

    /// Queued, leased (some twice), urgent, overdue-reported and quarantined
    /// deliveries in two mailboxes, a patient with several: what a clean
    /// close leaves is exactly what the trees rebuild, and it serves once.
    #[tokio::test]
    async fn the_index_left_at_a_clean_close_is_the_one_rebuilt_from_the_trees() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let clock = ManualClock::new(1_000_000);
        let options = StoreOptions {
            max_attempts: 2,
            retry_backoff_ms: 0,
            ..StoreOptions::default()
        };
        let store = Store::open(&data, options, Arc::new(clock.clone())).unwrap();
        for i in 1..=12 {
            store.submit(handover(i, i % 5)).await.unwrap();
        }
        let leased = store.pull("urn:ods:MB0", "MB0", 4, 100).await.unwrap();
        let first = &leased[0].delivery;
        store
            .nack("urn:ods:MB0", "MB0", first.id, first.attempt, true, "bad")
            .await
            .unwrap();
        let second = &leased[1].delivery;
        store
            .nack(
                "urn:ods:MB0",
                "MB0",
                second.id,
                second.attempt,
                false,
                "later",
            )
            .await
            .unwrap();
        clock.advance(1_000);
        assert!(!store.sweep().await.unwrap().newly_overdue.is_empty());
        store.pull("urn:ods:MB0", "MB0", 2, 100).await.unwrap();
        store.close().await.unwrap();
        drop(store);

        let (_db, trees) = trees(&data);
        let restored = take(&data, &trees)
            .unwrap()
            .expect("left by the clean close");
        let rebuilt = writer::rebuild_index(&trees).unwrap();
        let restored_rows = rows(&restored.schedule);
        assert_eq!(restored_rows, rows(&rebuilt.schedule));
        assert_eq!(restored.quarantined, rebuilt.quarantined);
        assert_eq!(restored.quarantined_of, rebuilt.quarantined_of);
        // The case covers what it claims to.
        assert_eq!(restored_rows.len(), 23);
        assert!(restored_rows.values().any(|l| l.attempt == 2));
        assert!(restored_rows.values().any(|l| l.urgent && l.due_reported));
        assert!(
            restored_rows
                .values()
                .any(|l| matches!(l.lease, Slot::Leased { .. }))
        );
        assert_eq!(restored.quarantined.get("MB0"), Some(&1));
        // Used once: the file and the nonce are gone.
        assert!(!path(&data).exists());
        assert!(take(&data, &trees).unwrap().is_none());
    }

    /// A file that is torn, another close's, or of another batch count is
    /// never used, nor one without a clean-close mark.
    #[test]
    fn an_index_that_does_not_match_the_store_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, trees) = trees(dir.path());
        let meta = &trees[TreeId::Meta as usize];
        let mut schedule = Schedule::default();
        schedule.insert(
            7,
            Live {
                mailbox: "MB0".into(),
                patient_key: "p".into(),
                urgent: false,
                attempt: 0,
                lease: Slot::Queued { not_before_ms: 0 },
                queued_at_ms: 1,
                due_ms: None,
                due_reported: false,
                max_attempts: None,
                stale: false,
            },
        );
        let none = HashMap::new();
        let leave = |seq: u64, clean: Option<u64>, nonce_delta: u64| {
            let nonce = write(dir.path(), seq, &schedule, &none, &HashMap::new()).unwrap();
            meta.insert(META_INDEX_NONCE, &records::be(nonce + nonce_delta))
                .unwrap();
            meta.insert(records::META_COMMIT_SEQ, &records::be(5))
                .unwrap();
            match clean {
                Some(c) => meta
                    .insert(super::super::integrity::META_CLEAN_CLOSE, &records::be(c))
                    .map(|_| ()),
                None => meta
                    .remove(super::super::integrity::META_CLEAN_CLOSE)
                    .map(|_| ()),
            }
            .unwrap();
        };
        leave(5, Some(5), 0);
        assert!(take(dir.path(), &trees).unwrap().is_some(), "the control");
        leave(5, Some(5), 1);
        assert!(
            take(dir.path(), &trees).unwrap().is_none(),
            "another close's"
        );
        leave(4, Some(5), 0);
        assert!(take(dir.path(), &trees).unwrap().is_none(), "another count");
        leave(5, Some(4), 0);
        assert!(take(dir.path(), &trees).unwrap().is_none(), "not clean now");
        leave(5, None, 0);
        assert!(take(dir.path(), &trees).unwrap().is_none(), "a crash");
        leave(5, Some(5), 0);
        let mut bytes = std::fs::read(path(dir.path())).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        assert!(take(dir.path(), &trees).unwrap().is_none(), "torn");
        assert!(!path(dir.path()).exists());
        // Whole, but of another format version: not read as this one.
        leave(5, Some(5), 0);
        let bytes = std::fs::read(path(dir.path())).unwrap();
        let mut other = b"TCQIDX00".to_vec();
        other.extend_from_slice(&bytes[MAGIC.len()..bytes.len() - 4]);
        let crc = crc32fast::hash(&other);
        other.extend_from_slice(&crc.to_be_bytes());
        std::fs::write(path(dir.path()), &other).unwrap();
        assert!(
            take(dir.path(), &trees).unwrap().is_none(),
            "another version"
        );
    }
}
