//! Key epochs: the keys that wrap payload data keys, one small file each,
//! outside sled, so that destroying one really destroys it.
//!
//! Why not rely on removing a wrapped data key from sled: sled 0.34 appends
//! every change to a log of 512 KiB segments and rewrites a segment only
//! once at most half of it is live (see `docs/store.md`), so the bytes of a
//! removed key can stay in the file for as long as long-lived neighbours
//! (audit entries, parked releases) keep their segment half full. A wrapped
//! key found there is worthless once the epoch key that wrapped it is gone,
//! and an epoch key lives only in its own file, which is overwritten with
//! zeros, synced and unlinked when the epoch is destroyed.
//!
//! | file                      | bytes                                                  |
//! |---------------------------|--------------------------------------------------------|
//! | `key-epochs/epoch-<n>`    | version `1` ++ created ms (i64 BE) ++ epoch key sealed under the master key (nonce ++ ciphertext ++ tag) |
//!
//! The retention pass opens a new epoch every `retention.key_epoch_seconds`,
//! rewraps the keys of unfinished handovers into it, and destroys an older
//! epoch once no stored key refers to it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{KeyInit, OsRng};
use zeroize::Zeroizing;

use super::StoreError;

const VERSION: u8 = 1;
const AAD: &[u8] = b"throughcare key epoch v1:";

/// One epoch's key.
pub(super) struct Epoch {
    /// When it was opened, ms since the epoch.
    pub created_ms: i64,
    /// Wraps data keys.
    pub cipher: XChaCha20Poly1305,
}

/// Every epoch key on disk, by epoch number.
pub(super) struct KeyEpochs {
    dir: PathBuf,
    keys: BTreeMap<u32, Epoch>,
}

fn aad(n: u32) -> Vec<u8> {
    let mut aad = AAD.to_vec();
    aad.extend_from_slice(&n.to_be_bytes());
    aad
}

fn file_name(n: u32) -> String {
    format!("epoch-{n:010}")
}

fn invalid(path: &Path, why: &str) -> StoreError {
    StoreError::Corrupt(format!("key epoch file {}: {why}", path.display()))
}

impl KeyEpochs {
    /// Reads every epoch key in `dir` (created when absent), unwrapping each
    /// with `master`.
    ///
    /// # Errors
    /// I/O, or a file that does not unwrap under the master key.
    pub fn open(dir: &Path, master: &XChaCha20Poly1305) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let mut keys = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(n) = path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_prefix("epoch-"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let raw = Zeroizing::new(std::fs::read(&path)?);
            if raw.iter().all(|b| *b == 0) {
                // A destroy interrupted between overwriting and unlinking.
                std::fs::remove_file(&path)?;
                continue;
            }
            let (&version, rest) = raw.split_first().ok_or_else(|| invalid(&path, "empty"))?;
            let (created, sealed) = rest
                .split_at_checked(8)
                .filter(|_| version == VERSION)
                .ok_or_else(|| invalid(&path, "unknown layout"))?;
            let created_ms = i64::from_be_bytes(created.try_into().expect("8 bytes"));
            let key = Zeroizing::new(
                super::crypt::open_with(master, sealed, &aad(n))
                    .ok_or_else(|| invalid(&path, "does not open under the master key"))?,
            );
            let cipher = XChaCha20Poly1305::new_from_slice(&key)
                .map_err(|_| invalid(&path, "wrong key length"))?;
            keys.insert(n, Epoch { created_ms, cipher });
        }
        Ok(Self {
            dir: dir.to_owned(),
            keys,
        })
    }

    /// The newest epoch: new data keys are wrapped under it.
    pub fn current(&self) -> Option<(u32, &Epoch)> {
        self.keys.last_key_value().map(|(n, e)| (*n, e))
    }

    /// Epoch `n`'s key, unless destroyed.
    pub fn get(&self, n: u32) -> Option<&Epoch> {
        self.keys.get(&n)
    }

    /// Every epoch still on disk, oldest first.
    pub fn numbers(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Opens a new epoch, durable (file and directory synced) before it is
    /// used; returns its number.
    ///
    /// # Errors
    /// I/O.
    pub fn create(&mut self, master: &XChaCha20Poly1305, now_ms: i64) -> Result<u32, StoreError> {
        let n = self.current().map_or(1, |(n, _)| n + 1);
        let key = Zeroizing::new(XChaCha20Poly1305::generate_key(&mut OsRng).to_vec());
        let sealed = super::crypt::seal_with(master, &key, &aad(n))?;
        let mut bytes = vec![VERSION];
        bytes.extend_from_slice(&now_ms.to_be_bytes());
        bytes.extend_from_slice(&sealed);
        let path = self.dir.join(file_name(n));
        let mut opts = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.write(true).create_new(true).open(&path)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let cipher = XChaCha20Poly1305::new_from_slice(&key).expect("32-byte key");
        self.keys.insert(
            n,
            Epoch {
                created_ms: now_ms,
                cipher,
            },
        );
        Ok(n)
    }

    /// Destroys epoch `n`: its file is overwritten with zeros and synced,
    /// then unlinked and the directory synced. Every data key it wrapped
    /// is then unreadable, wherever copies of it remain.
    ///
    /// # Errors
    /// I/O.
    pub fn destroy(&mut self, n: u32) -> Result<(), StoreError> {
        let path = self.dir.join(file_name(n));
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(mut f) => {
                let len = usize::try_from(f.metadata()?.len()).unwrap_or(0);
                f.write_all(&vec![0u8; len])?;
                f.sync_data()?;
                drop(f);
                std::fs::remove_file(&path)?;
                std::fs::File::open(&self.dir)?.sync_all()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.keys.remove(&n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_survive_a_reopen_and_are_destroyed_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let master = XChaCha20Poly1305::new_from_slice(&[9; 32]).unwrap();
        let mut epochs = KeyEpochs::open(dir.path(), &master).unwrap();
        assert!(epochs.current().is_none());
        assert_eq!(epochs.create(&master, 5).unwrap(), 1);
        assert_eq!(epochs.create(&master, 7).unwrap(), 2);
        let raw = std::fs::read(dir.path().join(file_name(1))).unwrap();
        let reopened = KeyEpochs::open(dir.path(), &master).unwrap();
        assert_eq!(reopened.numbers(), vec![1, 2]);
        assert_eq!(reopened.current().unwrap().1.created_ms, 7);
        epochs.destroy(1).unwrap();
        assert!(!dir.path().join(file_name(1)).exists());
        assert_eq!(epochs.numbers(), vec![2]);
        assert_eq!(
            KeyEpochs::open(dir.path(), &master).unwrap().numbers(),
            vec![2]
        );
        assert!(!raw.is_empty());
        // A destroy cut short after the overwrite is finished at the next open.
        let len = std::fs::metadata(dir.path().join(file_name(2)))
            .unwrap()
            .len();
        std::fs::write(dir.path().join(file_name(2)), vec![0u8; len as usize]).unwrap();
        assert!(
            KeyEpochs::open(dir.path(), &master)
                .unwrap()
                .numbers()
                .is_empty()
        );
        assert!(!dir.path().join(file_name(2)).exists());
        epochs.create(&master, 9).unwrap();
        // Another master key cannot open them.
        let other = XChaCha20Poly1305::new_from_slice(&[8; 32]).unwrap();
        assert!(KeyEpochs::open(dir.path(), &other).is_err());
    }
}
