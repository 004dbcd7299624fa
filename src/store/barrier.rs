//! The durability barrier: after it returns, everything the store wrote
//! before it is on stable storage.
//!
//! sled's `flush()` on Linux ends in `sync_file_range`, which flushes neither
//! the device cache nor the file's metadata. An acknowledgement must rest on a
//! real `fdatasync`, so the barrier is `flush()` then `fdatasync` of sled's
//! log file. The witness file rides on the same barrier (see `high_water`).
//!
//! sled writes a page larger than a quarter of a segment (about 128 KiB: a
//! leaf of a few 64 KiB payload chunks, or of seventeen 8 KiB payloads) to
//! a file of its own under `blobs/`, and never syncs it; its log holds only
//! a pointer. So the barrier also syncs every blob file it has not synced
//! before, and the `blobs` directory when one is new.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters describing the barrier's work, shared with metrics and benches.
#[derive(Debug, Default)]
pub struct BarrierStats {
    /// Completed barriers (each ends in at least one `fdatasync`).
    pub barriers: AtomicU64,
    /// `fdatasync` calls made by barriers.
    pub fdatasyncs: AtomicU64,
    /// Commands answered after a barrier (group-commit batch sizes add up here).
    pub commands: AtomicU64,
    /// Submits accepted after a barrier.
    pub submits: AtomicU64,
    /// Time spent in barriers, microseconds.
    pub barrier_micros: AtomicU64,
    /// sled blob files synced by barriers.
    pub blobs_synced: AtomicU64,
    /// The store stopped taking changes (a failed barrier or commit) and
    /// will until restarted: health checks answer `NOT_SERVING`.
    pub halted: std::sync::atomic::AtomicBool,
}

impl BarrierStats {
    /// A snapshot: (barriers, fdatasyncs, commands, submits).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.barriers.load(Ordering::Relaxed),
            self.fdatasyncs.load(Ordering::Relaxed),
            self.commands.load(Ordering::Relaxed),
            self.submits.load(Ordering::Relaxed),
        )
    }
}

/// One group commit that passed its barrier, as told to a [`BarrierObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierReport {
    /// Time in the barrier (`flush` and the `fdatasync`s).
    pub elapsed: std::time::Duration,
    /// Commands answered after this barrier (the batch size).
    pub commands: u64,
    /// Submits among them that were accepted.
    pub submits: u64,
}

/// Something told about each barrier before any caller is answered; tests use
/// it to count barriers and to make one fail, metrics to time them.
pub trait BarrierObserver: Send + Sync {
    /// Called after the `fdatasync` calls returned; an error fails the barrier.
    ///
    /// # Errors
    /// Whatever the observer decides; the store treats it as a failed sync.
    fn synced(&self, barrier: u64) -> io::Result<()>;

    /// Called after a group commit's barrier succeeded, before its callers
    /// are answered. Must be quick: the store writer waits for it.
    fn committed(&self, _report: &BarrierReport) {}

    /// Called at open and after each barrier with the witness's newest
    /// durable checkpoint (the anchored head of the audit chain).
    fn anchored(&self, _checkpoint: &crate::audit::Checkpoint) {}
}

/// Makes sled's writes durable.
pub struct DurabilityBarrier {
    db: sled::Db,
    log: File,
    blobs: Blobs,
    stats: Arc<BarrierStats>,
    observer: Option<Arc<dyn BarrierObserver>>,
}

/// sled's blob files, and which of them a barrier has synced.
struct Blobs {
    dir: std::path::PathBuf,
    synced: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl Blobs {
    /// The blob files not synced whole before; `None` when there are none
    /// (the usual case: a page over the threshold is rare with small
    /// documents). Names sled has removed are forgotten.
    fn unsynced(&self) -> io::Result<Option<Vec<std::path::PathBuf>>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = std::collections::HashSet::with_capacity(synced.len());
        let mut new = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                new.push(self.dir.join(&name));
            }
            present.insert(name);
        }
        synced.retain(|name| present.contains(name));
        Ok((!new.is_empty()).then_some(new))
    }

    /// Syncs `new` and the directory, all at once (each `fdatasync` waits
    /// on the disk, not the CPU); returns how many files were whole.
    ///
    /// The writer may be writing a later batch's blob file while this
    /// barrier runs, so a file counts as synced only when it was whole
    /// (sled's own CRC over it matched) before its `fdatasync`; one that
    /// was not is synced again at the next barrier. A file sled removed
    /// meanwhile (its page rewritten) needs nothing.
    fn sync(&self, new: &[std::path::PathBuf]) -> io::Result<u64> {
        let sync_file = |path: &std::path::PathBuf| -> io::Result<Option<std::ffi::OsString>> {
            let mut file = match File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut file, &mut bytes)?;
            file.sync_data()?;
            Ok(whole_blob(&bytes)
                .then(|| path.file_name().map(ToOwned::to_owned))
                .flatten())
        };
        // At most 16 threads, however many files a large batch made.
        let per_thread = new.len().div_ceil(16);
        let whole = std::thread::scope(|scope| {
            let files: Vec<_> = new
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().map(sync_file).collect::<io::Result<Vec<_>>>())
                })
                .collect();
            let dir = File::open(&self.dir).and_then(|d| d.sync_all());
            let mut whole = Vec::new();
            for handle in files {
                let synced = handle
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a blob sync panicked")))?;
                whole.extend(synced.into_iter().flatten());
            }
            dir.map(|()| whole)
        })?;
        let n = whole.len() as u64;
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(whole);
        Ok(n)
    }
}

/// Whether `bytes` is a whole sled blob: a CRC-32 (little-endian) over the
/// rest, which sled writes first and fills in last.
fn whole_blob(bytes: &[u8]) -> bool {
    bytes.len() > 4 && bytes[..4] == crc32fast::hash(&bytes[4..]).to_le_bytes()
}

impl DurabilityBarrier {
    /// A barrier over the sled database in `dir`.
    ///
    /// # Errors
    /// sled's log file cannot be opened.
    pub fn new(
        db: sled::Db,
        dir: &Path,
        stats: Arc<BarrierStats>,
        observer: Option<Arc<dyn BarrierObserver>>,
    ) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        // The directory entry of a new store must be durable too.
        File::open(dir)?.sync_all()?;
        Ok(Self {
            db,
            log,
            blobs: Blobs {
                dir: dir.join("blobs"),
                synced: std::sync::Mutex::default(),
            },
            stats,
            observer,
        })
    }

    /// Flushes sled and `fdatasync`s its log, outside the group-commit
    /// accounting (for the clean-close mark after the final barrier).
    ///
    /// # Errors
    /// Any flush or sync failure.
    pub fn seal(&self) -> io::Result<()> {
        self.db
            .flush()
            .map_err(|e| io::Error::other(format!("sled flush: {e}")))?;
        if let Some(new) = self.blobs.unsynced()? {
            self.sync_blobs(&new)?;
        }
        self.log.sync_data()
    }

    /// Syncs the blob files sled wrote since the last barrier.
    fn sync_blobs(&self, new: &[std::path::PathBuf]) -> io::Result<()> {
        let n = self.blobs.sync(new)?;
        self.stats.blobs_synced.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Flushes sled and `fdatasync`s its log, plus `extra` files.
    ///
    /// # Errors
    /// Any flush or sync failure. After one, nothing written since the last
    /// successful barrier may be assumed durable.
    pub fn sync(&self, extra: &[&File]) -> io::Result<()> {
        let started = std::time::Instant::now();
        // The extra files (the witness) hold everything they need already,
        // so their `fdatasync` runs beside sled's flush and sync, not after:
        // the barrier waits for the slower, not for the sum. Both must
        // succeed before anything covered is answered.
        std::thread::scope(|scope| {
            let extras = (!extra.is_empty())
                .then(|| scope.spawn(|| extra.iter().try_for_each(|file| file.sync_data())));
            // After the flush, sled's blob files are synced beside its log:
            // each holds what it needs once written, like the witness.
            let sled = self
                .db
                .flush()
                .map_err(|e| io::Error::other(format!("sled flush: {e}")))
                .and_then(|_| self.blobs.unsynced())
                .and_then(|unsynced| {
                    let Some(new) = unsynced else {
                        return self.log.sync_data();
                    };
                    let blobs = scope.spawn(move || self.sync_blobs(&new));
                    let log = self.log.sync_data();
                    let blobs = blobs
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a blob sync panicked")));
                    log.and(blobs)
                });
            let extras = extras.map_or(Ok(()), |handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a witness fdatasync panicked")))
            });
            sled.and(extras)
        })?;
        let syncs = 1 + extra.len() as u64;
        self.stats.fdatasyncs.fetch_add(syncs, Ordering::Relaxed);
        let n = self.stats.barriers.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(observer) = &self.observer {
            observer.synced(n)?;
        }
        self.stats.barrier_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page over sled's blob threshold lives in a file of its own, which
    /// sled never syncs: the barrier does, once.
    #[test]
    fn a_barrier_syncs_the_blob_files_sled_wrote_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let stats = Arc::new(BarrierStats::default());
        let barrier = DurabilityBarrier::new(db.clone(), dir.path(), stats.clone(), None).unwrap();
        db.insert(b"small", vec![1u8; 100]).unwrap();
        barrier.sync(&[]).unwrap();
        assert_eq!(stats.blobs_synced.load(Ordering::Relaxed), 0);
        db.insert(b"large", vec![7u8; 300 * 1024]).unwrap();
        barrier.sync(&[]).unwrap();
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert!(blobs >= 1, "sled wrote no blob file");
        let synced = stats.blobs_synced.load(Ordering::Relaxed);
        assert!(synced >= 1, "{synced} blob files synced, {blobs} present");
        // Nothing new: nothing synced again.
        barrier.sync(&[]).unwrap();
        assert_eq!(stats.blobs_synced.load(Ordering::Relaxed), synced);

        // A file still being written (the writer runs ahead of the syncer)
        // is synced but not counted, so the next barrier syncs it again.
        let half = dir.path().join("blobs").join("99999999999");
        let body = b"\x01a blob's kind and data";
        std::fs::write(&half, &body[..5]).unwrap();
        barrier.sync(&[]).unwrap();
        assert_eq!(stats.blobs_synced.load(Ordering::Relaxed), synced);
        let mut whole = crc32fast::hash(body).to_le_bytes().to_vec();
        whole.extend_from_slice(body);
        std::fs::write(&half, &whole).unwrap();
        barrier.sync(&[]).unwrap();
        assert_eq!(stats.blobs_synced.load(Ordering::Relaxed), synced + 1);
        barrier.sync(&[]).unwrap();
        assert_eq!(stats.blobs_synced.load(Ordering::Relaxed), synced + 1);
    }
}
