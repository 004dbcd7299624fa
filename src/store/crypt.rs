//! Encryption at rest with crypto-shredding.
//!
//! Every handover's payload is sealed with its own random 256-bit data key
//! (XChaCha20-Poly1305, random 192-bit nonce, the handover id as associated
//! data). The data key is stored *wrapped* (sealed the same way under the
//! current key epoch's key, see [`super::key_epochs`]) in the `data_keys`
//! tree, in the same transaction as the chunks. Removing a handover's wrapped
//! key makes its payload unreadable; destroying the epoch key that wrapped it
//! makes every copy sled may still hold of it worthless. Epoch keys are
//! wrapped by the master key, which lives in a file outside sled
//! (`<data_dir>/master-key` unless configured).
//!
//! | what            | bytes                                              |
//! |-----------------|----------------------------------------------------|
//! | sealed payload  | version `1` ++ nonce (24) ++ ciphertext ++ tag (16) |
//! | wrapped data key| version `2` ++ epoch (u32 BE) ++ nonce (24) ++ key ciphertext (32) ++ tag (16) |
//! | ... before epochs | version `1` ++ nonce (24) ++ key ciphertext (32) ++ tag (16), under the master key |

use std::path::Path;
use std::sync::RwLock;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use super::StoreError;
use super::key_epochs::KeyEpochs;

const VERSION: u8 = 1;
/// A wrapped data key under a key epoch.
const EPOCH_VERSION: u8 = 2;
const NONCE: usize = 24;
const PAYLOAD_AAD: &[u8] = b"throughcare payload v1:";
const KEY_AAD: &[u8] = b"throughcare data key v1:";

/// Seals payloads under per-handover data keys wrapped by the master key.
pub struct PayloadCipher {
    master: XChaCha20Poly1305,
    /// Empty until [`PayloadCipher::open_epochs`]: keys are then wrapped
    /// under the master key (version 1).
    epochs: RwLock<Option<KeyEpochs>>,
}

impl std::fmt::Debug for PayloadCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadCipher(..)")
    }
}

fn epoch_aad(handover_id: u64, epoch: u32) -> Vec<u8> {
    let mut aad = aad(KEY_AAD, handover_id);
    aad.extend_from_slice(&epoch.to_be_bytes());
    aad
}

fn aad(label: &[u8], handover_id: u64) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.extend_from_slice(&handover_id.to_be_bytes());
    aad
}

/// Seals `plaintext`: version ++ nonce ++ ciphertext ++ tag.
pub(super) fn seal_with(
    cipher: &XChaCha20Poly1305,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| StoreError::Corrupt("payload encryption failed".into()))?;
    let mut out = Vec::with_capacity(1 + NONCE + ciphertext.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Opens what [`seal_with`] sealed.
pub(super) fn open_with(cipher: &XChaCha20Poly1305, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let (&version, rest) = sealed.split_first()?;
    if version != VERSION || rest.len() < NONCE {
        return None;
    }
    let (nonce, ciphertext) = rest.split_at(NONCE);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
}

impl PayloadCipher {
    /// A cipher under this 32-byte master key.
    pub fn new(master_key: &[u8; 32]) -> Self {
        Self {
            master: XChaCha20Poly1305::new(Key::from_slice(master_key)),
            epochs: RwLock::new(None),
        }
    }

    /// Loads the key epochs kept in `dir`, opening the first when there is
    /// none; new data keys are wrapped under the newest.
    ///
    /// # Errors
    /// I/O, or an epoch file the master key does not open.
    pub fn open_epochs(&self, dir: &Path, now_ms: i64) -> Result<(), StoreError> {
        let mut epochs = KeyEpochs::open(dir, &self.master)?;
        if epochs.current().is_none() {
            epochs.create(&self.master, now_ms)?;
        }
        *self.epochs.write().unwrap_or_else(|e| e.into_inner()) = Some(epochs);
        Ok(())
    }

    /// The newest epoch and when it was opened, if epochs are in use.
    pub fn current_epoch(&self) -> Option<(u32, i64)> {
        let epochs = self.epochs.read().unwrap_or_else(|e| e.into_inner());
        epochs.as_ref()?.current().map(|(n, e)| (n, e.created_ms))
    }

    /// Every epoch still held, oldest first.
    pub fn epochs(&self) -> Vec<u32> {
        let epochs = self.epochs.read().unwrap_or_else(|e| e.into_inner());
        epochs.as_ref().map(KeyEpochs::numbers).unwrap_or_default()
    }

    /// Opens a new epoch (durable before it returns); returns its number.
    ///
    /// # Errors
    /// I/O; [`StoreError::Unavailable`] when epochs are not in use.
    pub fn open_new_epoch(&self, now_ms: i64) -> Result<u32, StoreError> {
        let mut epochs = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        epochs
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("key epochs are not loaded".into()))?
            .create(&self.master, now_ms)
    }

    /// Destroys epoch `n` for good (see [`KeyEpochs::destroy`]).
    ///
    /// # Errors
    /// I/O.
    pub fn destroy_epoch(&self, n: u32) -> Result<(), StoreError> {
        let mut epochs = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        match epochs.as_mut() {
            Some(epochs) => epochs.destroy(n),
            None => Ok(()),
        }
    }

    /// The epoch a wrapped data key was wrapped under; 0 for a key wrapped
    /// directly by the master key (before epochs).
    pub fn epoch_of(wrapped: &[u8]) -> Option<u32> {
        match wrapped.split_first()? {
            (&VERSION, _) => Some(0),
            (&EPOCH_VERSION, rest) => Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
            _ => None,
        }
    }

    fn wrap(&self, handover_id: u64, data_key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let epochs = self.epochs.read().unwrap_or_else(|e| e.into_inner());
        let Some((n, epoch)) = epochs.as_ref().and_then(KeyEpochs::current) else {
            return seal_with(&self.master, data_key, &aad(KEY_AAD, handover_id));
        };
        let sealed = seal_with(&epoch.cipher, data_key, &epoch_aad(handover_id, n))?;
        let mut out = Vec::with_capacity(5 + sealed.len());
        out.push(EPOCH_VERSION);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&sealed[1..]);
        Ok(out)
    }

    fn unwrap_key(
        &self,
        handover_id: u64,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let unreadable =
            |why: &str| StoreError::Corrupt(format!("data key of handover {handover_id} {why}"));
        let key = match Self::epoch_of(wrapped) {
            Some(0) => open_with(&self.master, wrapped, &aad(KEY_AAD, handover_id))
                .ok_or_else(|| unreadable("does not open under the master key"))?,
            Some(n) => {
                let epochs = self.epochs.read().unwrap_or_else(|e| e.into_inner());
                let epoch = epochs
                    .as_ref()
                    .and_then(|e| e.get(n))
                    .ok_or_else(|| unreadable("belongs to a destroyed key epoch (shredded)"))?;
                let mut sealed = vec![VERSION];
                sealed.extend_from_slice(&wrapped[5..]);
                open_with(&epoch.cipher, &sealed, &epoch_aad(handover_id, n))
                    .ok_or_else(|| unreadable("does not open under its key epoch"))?
            }
            None => return Err(unreadable("has an unknown layout")),
        };
        let key = Zeroizing::new(key);
        if key.len() != 32 {
            return Err(unreadable("has the wrong length"));
        }
        Ok(key)
    }

    /// Wraps a stored data key again under the newest epoch, so that the
    /// epoch it was wrapped under can be destroyed.
    ///
    /// # Errors
    /// As for [`PayloadCipher::open`].
    pub fn rewrap(&self, handover_id: u64, wrapped: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = self.unwrap_key(handover_id, wrapped)?;
        self.wrap(handover_id, &key)
    }

    /// A stored data key wrapped again directly under the master key (the
    /// layout before epochs, which the PostgreSQL engine uses): what a store
    /// export carries, so the data key never leaves unwrapped and no key
    /// epoch file has to travel with it.
    ///
    /// # Errors
    /// As for [`PayloadCipher::open`].
    pub fn rewrap_under_master(
        &self,
        handover_id: u64,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let key = self.unwrap_key(handover_id, wrapped)?;
        seal_with(&self.master, &key, &aad(KEY_AAD, handover_id))
    }

    /// Reads the master key from `path`, creating it (32 random bytes, mode
    /// 0600) when absent.
    ///
    /// # Errors
    /// The file cannot be read or created, or does not hold exactly 32 bytes.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        let key = match std::fs::read(path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Zeroizing::new(XChaCha20Poly1305::generate_key(&mut OsRng).to_vec());
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut opts = std::fs::OpenOptions::new();
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.write(true).create_new(true).open(path)?;
                std::io::Write::write_all(&mut f, &key)?;
                f.sync_all()?;
                key
            }
            Err(e) => return Err(e.into()),
        };
        let key: &[u8; 32] = key.as_slice().try_into().map_err(|_| {
            StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} must hold exactly 32 bytes", path.display()),
            ))
        })?;
        Ok(Self::new(key))
    }

    /// Seals `payload` of handover `handover_id` under a fresh data key;
    /// returns (wrapped data key, sealed payload).
    ///
    /// # Errors
    /// Only if the cipher fails (it does not for in-memory input).
    pub fn seal(&self, handover_id: u64, payload: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        let data_key = Zeroizing::new(XChaCha20Poly1305::generate_key(&mut OsRng).to_vec());
        let sealed = seal_with(
            &XChaCha20Poly1305::new(Key::from_slice(&data_key)),
            payload,
            &aad(PAYLOAD_AAD, handover_id),
        )?;
        let wrapped = self.wrap(handover_id, &data_key)?;
        Ok((wrapped, sealed))
    }

    /// Opens a sealed payload with its wrapped data key.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the key is missing (shredded), was not
    /// wrapped by this master key, or either part fails authentication.
    pub fn open(
        &self,
        handover_id: u64,
        wrapped: Option<&[u8]>,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let wrapped = wrapped.ok_or_else(|| {
            StoreError::Corrupt(format!("handover {handover_id} has no data key (shredded)"))
        })?;
        let data_key = self.unwrap_key(handover_id, wrapped)?;
        open_with(
            &XChaCha20Poly1305::new(Key::from_slice(&data_key)),
            sealed,
            &aad(PAYLOAD_AAD, handover_id),
        )
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "payload of handover {handover_id} fails authentication"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payloads_open_only_with_their_key_and_id() {
        let c = PayloadCipher::new(&[7; 32]);
        let (wrapped, sealed) = c.seal(1, b"Family name: Testpatient").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"Testpatient"));
        assert_eq!(
            c.open(1, Some(&wrapped), &sealed).unwrap(),
            b"Family name: Testpatient"
        );
        // Shredded: no key, no content.
        assert!(c.open(1, None, &sealed).is_err());
        // Bound to its handover: moving chunks or keys elsewhere fails.
        assert!(c.open(2, Some(&wrapped), &sealed).is_err());
        // Another master key cannot unwrap.
        assert!(
            PayloadCipher::new(&[8; 32])
                .open(1, Some(&wrapped), &sealed)
                .is_err()
        );
        // Any flipped bit is found.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(c.open(1, Some(&wrapped), &bad).is_err());
        // Each seal uses a fresh data key and nonce.
        let (w2, s2) = c.seal(1, b"Family name: Testpatient").unwrap();
        assert_ne!(w2, wrapped);
        assert_ne!(s2, sealed);
    }

    #[test]
    fn keys_move_between_epochs_and_die_with_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let c = PayloadCipher::new(&[7; 32]);
        // Before epochs: wrapped by the master key (version 1), still readable.
        let (legacy, legacy_sealed) = c.seal(9, b"old").unwrap();
        assert_eq!(PayloadCipher::epoch_of(&legacy), Some(0));
        c.open_epochs(dir.path(), 1_000).unwrap();
        assert_eq!(c.current_epoch(), Some((1, 1_000)));
        let (wrapped, sealed) = c.seal(1, b"summary").unwrap();
        assert_eq!(PayloadCipher::epoch_of(&wrapped), Some(1));
        assert_eq!(c.open(9, Some(&legacy), &legacy_sealed).unwrap(), b"old");
        assert_eq!(c.open_new_epoch(2_000).unwrap(), 2);
        let moved = c.rewrap(1, &wrapped).unwrap();
        assert_eq!(PayloadCipher::epoch_of(&moved), Some(2));
        assert!(c.rewrap(2, &wrapped).is_err(), "bound to its handover");
        c.destroy_epoch(1).unwrap();
        assert_eq!(c.epochs(), vec![2]);
        let err = c.open(1, Some(&wrapped), &sealed).unwrap_err();
        assert!(err.to_string().contains("destroyed key epoch"), "{err}");
        assert_eq!(c.open(1, Some(&moved), &sealed).unwrap(), b"summary");
        // A restart finds the surviving epoch.
        let again = PayloadCipher::new(&[7; 32]);
        again.open_epochs(dir.path(), 3_000).unwrap();
        assert_eq!(again.open(1, Some(&moved), &sealed).unwrap(), b"summary");
    }

    #[test]
    fn the_master_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master-key");
        let a = PayloadCipher::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (w, s) = a.seal(3, b"x").unwrap();
        let b = PayloadCipher::load_or_create(&path).unwrap();
        assert_eq!(b.open(3, Some(&w), &s).unwrap(), b"x");
        std::fs::write(&path, b"short").unwrap();
        assert!(PayloadCipher::load_or_create(&path).is_err());
    }
}
