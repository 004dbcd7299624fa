//! The high-water mark: a promise, kept outside sled, of how many batches the
//! store had made durable. A store that opens with fewer than it promised has
//! lost acknowledged data (a restored old copy, a truncated log) and refuses
//! to start rather than serve a silent loss.
//!
//! The file holds the commit sequence (u64 BE) and its CRC-32. It is rewritten
//! in place after each barrier and made durable by the *next* barrier, so its
//! durable value never exceeds what sled has made durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The high-water file of a store.
pub struct HighWater {
    file: File,
}

impl HighWater {
    /// Opens (creating if absent) the file and returns it with the promised value.
    ///
    /// # Errors
    /// I/O errors, or a file whose checksum does not hold.
    pub fn open(path: &Path) -> io::Result<(Self, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut buf = [0u8; 12];
        let promised = match file.read_exact_at(&mut buf, 0) {
            Ok(()) => {
                let (value, crc) = buf.split_at(8);
                if crc32fast::hash(value).to_be_bytes() != crc {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} is corrupt", path.display()),
                    ));
                }
                u64::from_be_bytes(value.try_into().unwrap_or_default())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        Ok((Self { file }, promised))
    }

    /// Records `seq`; durable after the next barrier that syncs [`HighWater::file`].
    ///
    /// # Errors
    /// I/O errors.
    pub fn record(&self, seq: u64) -> io::Result<()> {
        let mut buf = [0u8; 12];
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        let crc = crc32fast::hash(&buf[..8]);
        buf[8..].copy_from_slice(&crc.to_be_bytes());
        self.file.write_all_at(&buf, 0)
    }

    /// The file, for the barrier to sync.
    pub fn file(&self) -> &File {
        &self.file
    }
}
