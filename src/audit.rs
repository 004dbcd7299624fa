//! The audit trail: append-only and chained, written in the same
//! transaction as the change it records (see `store`).
//!
//! Each entry carries the hash of the one before it, so changing, removing
//! or reordering any entry breaks every later link. Patients appear only as
//! a keyed hash ([`PatientKeyer`]), never in clear.
//!
//! # Keyed chain and anchor
//! A plain hash chain can be rewritten by anyone who can write the store:
//! change an entry, recompute every later hash. So each entry's `hash` is an
//! HMAC-SHA-256 under the *audit key* ([`AuditKey`]), a file that does not
//! live in the data directory. And a chain can be cut short without breaking
//! a link, so its head is *anchored*: after each group commit the store
//! writes a [`Checkpoint`] (entries, last hash, batches), signed with an
//! Ed25519 key derived from the audit key, to the witness outside the data
//! directory (`store::high_water`), and operators can copy it elsewhere.
//! [`verify`] checks the chain against the key and an anchor: fewer entries
//! than anchored is [`ChainError::Truncated`], a different hash at the
//! anchored position is a rewrite.
//!
//! # Chain versions
//! | `chain` field | `hash` is | written by |
//! |---------------|-----------|------------|
//! | absent (v1)   | SHA-256 of the entry without `hash` | stores before the audit key |
//! | `2`           | HMAC-SHA-256 under the audit key of the same bytes | every entry since |
//!
//! A store upgraded from v1 keeps its old entries; the first keyed entry
//! links to the last v1 hash, so the key protects the old entries too. The
//! boundary (`keyed_from`) is part of every checkpoint: an unkeyed entry at or
//! after it, or after any keyed entry, is a forgery.
//!
//! # Removing old entries (the retention cut)
//! Entries older than the audit period are removed from the head of the
//! chain (`store` retention). What is left still verifies because the
//! removal leaves a [`SignedAuditCut`]: the first entry kept, the hash of the
//! last entry removed (which the first kept links to), the age limit and when,
//! signed with the checkpoint key under its own label, so no checkpoint can
//! pass for a cut. [`verify_from`] starts from the cut instead of [`GENESIS`].
//! Without the key nobody can make a cut, so removing the oldest entries that
//! are not past the period, or the cut itself, breaks verification; removing
//! the middle breaks a link, and the tail the anchor.

use std::io;
use std::path::Path;

use hmac::{Hmac, Mac};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clinical::{NhsNumber, PrisonNumber};

/// The hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `chain` value of entries keyed with the audit key.
pub const KEYED: u8 = 2;

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the trail, from 1.
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Certificate identity of the caller (`urn:ods:…`, `urn:operator:…`).
    pub actor: String,
    /// What was attempted (`submit`, `pull`, `ack`, …).
    pub action: String,
    /// The handover concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_id: Option<u64>,
    /// The delivery concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<u64>,
    /// Keyed hash of the patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_key: Option<String>,
    /// `ok`, or the refusal's reason (never patient data).
    pub outcome: String,
    /// Chain version: absent for v1 (plain SHA-256), [`KEYED`] for HMAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<u8>,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// Hash of this entry (over every other field).
    pub hash: String,
}

impl AuditEntry {
    /// The bytes the hash covers: the entry as JSON with `hash` empty.
    fn hashed_bytes(&self) -> Vec<u8> {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        serde_json::to_vec(&unhashed).unwrap_or_default()
    }

    /// The plain SHA-256 a v1 entry carries.
    pub fn compute_hash(&self) -> String {
        hex(&Sha256::digest(self.hashed_bytes()))
    }

    /// Whether `hash` is right for this entry's version; `None` when the
    /// entry is keyed and no key is given.
    fn hash_holds(&self, key: Option<&AuditKey>) -> Option<bool> {
        match self.chain {
            None => Some(self.compute_hash() == self.hash),
            Some(_) => {
                let key = key?;
                let Some(tag) = unhex32(&self.hash) else {
                    return Some(false);
                };
                let mut mac = key.chain_mac();
                mac.update(&self.hashed_bytes());
                Some(mac.verify_slice(&tag).is_ok())
            }
        }
    }
}

/// What to record; the chain fields are filled in when appended.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// Certificate identity of the caller.
    pub actor: String,
    /// What was attempted.
    pub action: &'static str,
    /// The handover concerned.
    pub handover_id: Option<u64>,
    /// The delivery concerned.
    pub delivery_id: Option<u64>,
    /// Keyed hash of the patient.
    pub patient_key: Option<String>,
    /// `ok` or the reason for refusal.
    pub outcome: String,
}

/// The audit key: one 32-byte secret file, from which the chain's HMAC key
/// and the checkpoints' Ed25519 signing key are derived (so there is one
/// secret to keep, back up and rotate).
pub struct AuditKey {
    chain: Zeroizing<[u8; 32]>,
    signing: Ed25519KeyPair,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey(public {})", self.public_key_hex())
    }
}

fn derive(secret: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

impl AuditKey {
    /// The key derived from `secret` (at least 32 random bytes).
    pub fn from_secret(secret: &[u8]) -> Self {
        let chain = derive(secret, b"throughcare audit chain v2");
        let seed = derive(secret, b"throughcare checkpoint ed25519 v1");
        let signing = Ed25519KeyPair::from_seed_unchecked(seed.as_slice())
            .expect("any 32-byte seed is an Ed25519 key");
        Self { chain, signing }
    }

    /// Reads the key file; `None` when it does not exist.
    ///
    /// # Errors
    /// The file cannot be read or holds fewer than 32 bytes.
    pub fn load(path: &Path) -> io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(secret) if secret.len() >= 32 => {
                Ok(Some(Self::from_secret(&Zeroizing::new(secret))))
            }
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("audit key {} holds fewer than 32 bytes", path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a new key file (32 random bytes, mode 0600); fails if it exists.
    ///
    /// # Errors
    /// The file exists or cannot be written.
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut secret = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), secret.as_mut_slice())
            .map_err(|_| io::Error::other("no system randomness"))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.write(true).create_new(true).open(path)?;
        io::Write::write_all(&mut f, secret.as_slice())?;
        f.sync_all()?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(Self::from_secret(secret.as_slice()))
    }

    fn chain_mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(self.chain.as_slice()).expect("HMAC takes any key length")
    }

    /// Signs `bytes` under `label` with the checkpoint key (hex). Each use
    /// has a label of its own (a store export's is
    /// `throughcare store export v1`), so no signature can pass for another
    /// kind: checkpoints and cuts sign their own labelled bytes.
    pub fn sign_labelled(&self, label: &str, bytes: &[u8]) -> String {
        hex(self.signing.sign(&labelled(label, bytes)).as_ref())
    }

    /// Whether `signature` (hex) is this key's [`AuditKey::sign_labelled`]
    /// of `bytes` under `label`.
    pub fn verifies_labelled(&self, label: &str, bytes: &[u8], signature: &str) -> bool {
        unhex(signature).is_some_and(|sig| {
            UnparsedPublicKey::new(&ED25519, self.signing.public_key().as_ref())
                .verify(&labelled(label, bytes), &sig)
                .is_ok()
        })
    }

    /// The checkpoint-signing public key, hex: give it to whoever records
    /// checkpoints so they can check them without being able to forge one.
    pub fn public_key_hex(&self) -> String {
        hex(self.signing.public_key().as_ref())
    }
}

/// `label`, a NUL, then `bytes`.
fn labelled(label: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 1 + bytes.len());
    out.extend_from_slice(label.as_bytes());
    out.push(0);
    out.extend_from_slice(bytes);
    out
}

/// The head of the chain, and how many batches the store had made durable,
/// at one moment: what the witness and operators record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Committed batches of the store (the high-water mark).
    pub commit_seq: u64,
    /// Audit entries (the last entry's sequence number).
    pub audit_seq: u64,
    /// Hash of entry `audit_seq` ([`GENESIS`] when there is none).
    pub audit_hash: String,
    /// The first entry that is (or will be) keyed.
    pub keyed_from: u64,
    /// When it was written, ms since the epoch.
    pub at_ms: i64,
}

/// A checkpoint with its Ed25519 signature, as exported to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// What is promised.
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    /// Ed25519 signature (hex) over [`Checkpoint::signed_bytes`].
    pub signature: String,
    /// The public key it verifies under (hex).
    pub public_key: String,
}

impl Checkpoint {
    /// What the signature covers: `throughcare checkpoint v1\0`, then
    /// commit_seq, audit_seq (u64 BE), the 32 hash bytes, keyed_from (u64
    /// BE) and at_ms (i64 BE).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = b"throughcare checkpoint v1\0".to_vec();
        out.extend_from_slice(&self.commit_seq.to_be_bytes());
        out.extend_from_slice(&self.audit_seq.to_be_bytes());
        out.extend_from_slice(&unhex32(&self.audit_hash).unwrap_or([0xff; 32]));
        out.extend_from_slice(&self.keyed_from.to_be_bytes());
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out
    }

    /// Signs it.
    pub fn sign(&self, key: &AuditKey) -> SignedCheckpoint {
        SignedCheckpoint {
            checkpoint: self.clone(),
            signature: hex(key.signing.sign(&self.signed_bytes()).as_ref()),
            public_key: key.public_key_hex(),
        }
    }
}

impl SignedCheckpoint {
    /// Whether the signature holds under `key` (its public key, not the one
    /// the checkpoint names: a forger names their own).
    pub fn verifies(&self, key: &AuditKey) -> bool {
        let Some(signature) = unhex(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, key.signing.public_key().as_ref())
            .verify(&self.checkpoint.signed_bytes(), &signature)
            .is_ok()
    }
}

/// Where the chain starts after entries older than the audit period were
/// removed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCut {
    /// The first entry kept.
    pub first_kept: u64,
    /// Hash of the last entry removed: the first kept links to it.
    pub prev_hash: String,
    /// Only entries written before this were removed, ms since the epoch.
    pub before_ms: i64,
    /// When the entries were removed, ms since the epoch.
    pub at_ms: i64,
    /// The first keyed entry of the chain (as in every checkpoint).
    pub keyed_from: u64,
}

/// A cut with its Ed25519 signature (hex), as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAuditCut {
    /// What is stated.
    #[serde(flatten)]
    pub cut: AuditCut,
    /// Ed25519 signature over [`AuditCut::signed_bytes`].
    pub signature: String,
}

impl AuditCut {
    /// What the signature covers: `throughcare audit cut v1\0`, then
    /// first_kept (u64 BE), the 32 bytes of prev_hash, before_ms, at_ms (i64
    /// BE) and keyed_from (u64 BE). The label differs from a checkpoint's, so
    /// one can never be replayed as the other.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = b"throughcare audit cut v1\0".to_vec();
        out.extend_from_slice(&self.first_kept.to_be_bytes());
        out.extend_from_slice(&unhex32(&self.prev_hash).unwrap_or([0xff; 32]));
        out.extend_from_slice(&self.before_ms.to_be_bytes());
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.keyed_from.to_be_bytes());
        out
    }

    /// Signs it.
    pub fn sign(&self, key: &AuditKey) -> SignedAuditCut {
        SignedAuditCut {
            cut: self.clone(),
            signature: hex(key.signing.sign(&self.signed_bytes()).as_ref()),
        }
    }
}

impl SignedAuditCut {
    /// Whether the signature holds under `key`.
    pub fn verifies(&self, key: &AuditKey) -> bool {
        let Some(signature) = unhex(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, key.signing.public_key().as_ref())
            .verify(&self.cut.signed_bytes(), &signature)
            .is_ok()
    }
}

/// The head of the chain: the next sequence number and the last hash.
#[derive(Debug, Clone)]
pub struct AuditChain {
    next_seq: u64,
    last_hash: String,
    key: Option<std::sync::Arc<AuditKey>>,
}

impl AuditChain {
    /// A chain whose last entry is `last` (or empty), keyed with `key` from
    /// here on (unkeyed without one: tests of v1 stores only).
    pub fn resume(last: Option<&AuditEntry>, key: Option<std::sync::Arc<AuditKey>>) -> Self {
        match last {
            Some(e) => Self {
                next_seq: e.seq + 1,
                last_hash: e.hash.clone(),
                key,
            },
            None => Self {
                next_seq: 1,
                last_hash: GENESIS.to_owned(),
                key,
            },
        }
    }

    /// The last entry's sequence number (0 when empty) and hash.
    pub fn head(&self) -> (u64, &str) {
        (self.next_seq - 1, &self.last_hash)
    }

    /// Links `event` into the chain at `at_ms`.
    pub fn link(&mut self, event: AuditEvent, at_ms: i64) -> AuditEntry {
        let mut entry = AuditEntry {
            seq: self.next_seq,
            at_ms,
            actor: event.actor,
            action: event.action.to_owned(),
            handover_id: event.handover_id,
            delivery_id: event.delivery_id,
            patient_key: event.patient_key,
            outcome: event.outcome,
            chain: self.key.as_ref().map(|_| KEYED),
            prev_hash: self.last_hash.clone(),
            hash: String::new(),
        };
        entry.hash = match &self.key {
            Some(key) => {
                let mut mac = key.chain_mac();
                mac.update(&entry.hashed_bytes());
                hex(&mac.finalize().into_bytes())
            }
            None => entry.compute_hash(),
        };
        self.next_seq += 1;
        self.last_hash.clone_from(&entry.hash);
        entry
    }
}

/// Where a chain first fails to verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An entry could not be decoded.
    #[error("audit entry at position {position} is unreadable")]
    Unreadable {
        /// 1-based position in the trail.
        position: u64,
    },
    /// An entry's sequence number, back-link or own hash is wrong.
    #[error("audit chain broken at entry {seq}: {what}")]
    Broken {
        /// The entry's sequence number.
        seq: u64,
        /// What does not hold.
        what: &'static str,
    },
    /// The trail holds fewer entries than the anchor promised.
    #[error(
        "audit trail truncated: the anchored checkpoint promises {anchored} entries but the store holds {found} ({} entries missing)",
        anchored - found
    )]
    Truncated {
        /// Entries the anchor promised.
        anchored: u64,
        /// Entries found.
        found: u64,
    },
    /// The retention cut is not signed by the audit key.
    #[error(
        "the retention cut (entries kept from {first_kept}) is not signed by the audit key: entries were removed by someone other than the gateway"
    )]
    CutNotSigned {
        /// The first entry the cut claims is kept.
        first_kept: u64,
    },
    /// A keyed entry and no key to check it with.
    #[error("audit entry {seq} is keyed but no audit key was given")]
    NoKey {
        /// The first keyed entry.
        seq: u64,
    },
}

/// What a successful [`verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// The first entry checked: 1, or the first kept after a retention cut.
    pub from: u64,
    /// The last entry checked (0 when there is none).
    pub last: u64,
    /// The first keyed entry, if any is.
    pub keyed_from: Option<u64>,
    /// Entries covered by the anchor (all of them up to its `audit_seq`).
    pub anchored: Option<u64>,
    /// The signed cut the chain was verified from, when entries were removed.
    pub cut: Option<AuditCut>,
}

/// Verifies entries given in trail order against `key` and (when given) an
/// anchored checkpoint, from the start of the trail.
///
/// # Errors
/// As [`verify_from`].
pub fn verify<'a>(
    entries: impl IntoIterator<Item = &'a [u8]>,
    key: Option<&AuditKey>,
    anchor: Option<&Checkpoint>,
) -> Result<Verified, ChainError> {
    verify_from(entries, key, anchor, None)
}

/// Where verification starts: the first sequence number and the hash it
/// links to.
fn start_of(
    key: Option<&AuditKey>,
    cut: Option<&SignedAuditCut>,
) -> Result<(u64, String), ChainError> {
    let Some(c) = cut else {
        return Ok((1, GENESIS.to_owned()));
    };
    let key = key.ok_or(ChainError::NoKey {
        seq: c.cut.first_kept,
    })?;
    if !c.verifies(key) || c.cut.first_kept == 0 {
        return Err(ChainError::CutNotSigned {
            first_kept: c.cut.first_kept,
        });
    }
    Ok((c.cut.first_kept, c.cut.prev_hash.clone()))
}

/// Verifies entries given in trail order against `key`, an anchored
/// checkpoint (when given) and the signed retention cut (when entries were
/// removed): the trail must start exactly at the cut's first kept entry and
/// link to the hash the cut records; without a cut, at entry 1.
///
/// # Errors
/// The first entry that is unreadable or breaks the chain, a cut that is not
/// signed by the key, or a trail shorter than the anchor or the cut promise.
pub fn verify_from<'a>(
    entries: impl IntoIterator<Item = &'a [u8]>,
    key: Option<&AuditKey>,
    anchor: Option<&Checkpoint>,
    cut: Option<&SignedAuditCut>,
) -> Result<Verified, ChainError> {
    let (first, mut expected_prev) = start_of(key, cut)?;
    let mut count = 0u64;
    let mut keyed_from = None;
    for raw in entries {
        let position = first + count;
        let entry: AuditEntry =
            serde_json::from_slice(raw).map_err(|_| ChainError::Unreadable {
                position: count + 1,
            })?;
        let broken = |what| ChainError::Broken {
            seq: entry.seq,
            what,
        };
        if entry.seq != position {
            return Err(broken(misplaced(count, entry.seq, first, cut.is_some())));
        }
        if entry.prev_hash != expected_prev {
            return Err(broken(if count == 0 && cut.is_some() {
                "does not link to the last removed entry the signed cut records"
            } else {
                "does not link to the previous entry"
            }));
        }
        match (entry.chain, keyed_from) {
            (Some(KEYED), None) => keyed_from = Some(entry.seq),
            (Some(KEYED), Some(_)) => {}
            (Some(_), _) => return Err(broken("unknown chain version")),
            (None, Some(_)) => return Err(broken("unkeyed entry after the chain was keyed")),
            (None, None)
                if anchor.is_some_and(|a| entry.seq >= a.keyed_from)
                    || cut.is_some_and(|c| entry.seq >= c.cut.keyed_from) =>
            {
                return Err(broken(
                    "unkeyed entry at or after the key boundary the anchor records",
                ));
            }
            (None, None) => {}
        }
        match entry.hash_holds(key) {
            None => return Err(ChainError::NoKey { seq: entry.seq }),
            Some(false) => return Err(broken("content does not match its hash")),
            Some(true) => {}
        }
        if let Some(a) = anchor {
            if entry.seq == a.audit_seq && entry.hash != a.audit_hash {
                return Err(broken("differs from the anchored checkpoint"));
            }
            if entry.chain.is_some() && entry.seq < a.keyed_from {
                return Err(broken("keyed before the key boundary the anchor records"));
            }
        }
        expected_prev = entry.hash;
        count += 1;
    }
    let last = first + count - 1;
    check_ends(anchor, cut, first, last)?;
    Ok(Verified {
        entries: count,
        from: first,
        last,
        keyed_from,
        anchored: anchor.map(|a| a.audit_seq),
        cut: cut.map(|c| c.cut.clone()),
    })
}

/// Why the first (or a later) entry is not where it should be.
fn misplaced(count: u64, seq: u64, first: u64, cut: bool) -> &'static str {
    match (count, cut) {
        (0, false) => {
            "entries before it are missing, and no signed cut records their removal under the retention policy"
        }
        (0, true) if seq > first => {
            "entries after the signed retention cut are missing (removed before their period ended)"
        }
        (0, true) => "the trail holds entries the signed retention cut says were removed",
        _ => "sequence number out of order",
    }
}

/// The trail must reach the anchor, and a cut is never left with nothing
/// after it (removal always appends its own entry).
fn check_ends(
    anchor: Option<&Checkpoint>,
    cut: Option<&SignedAuditCut>,
    first: u64,
    last: u64,
) -> Result<(), ChainError> {
    if let Some(a) = anchor {
        if last < a.audit_seq {
            return Err(ChainError::Truncated {
                anchored: a.audit_seq,
                found: last,
            });
        }
        // The anchored entry was the last one removed: the cut must agree.
        if let Some(c) = cut
            && a.audit_seq + 1 == first
            && a.audit_hash != c.cut.prev_hash
        {
            return Err(ChainError::Broken {
                seq: a.audit_seq,
                what: "the signed retention cut differs from the anchored checkpoint",
            });
        }
    }
    if cut.is_some() && last < first {
        return Err(ChainError::Truncated {
            anchored: first,
            found: last,
        });
    }
    Ok(())
}

/// Turns patient identifiers into a keyed hash (HMAC-SHA-256), so audit,
/// ordering and logs can name a patient without revealing who it is.
#[derive(Clone)]
pub struct PatientKeyer {
    key: Vec<u8>,
}

impl std::fmt::Debug for PatientKeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientKeyer(..)")
    }
}

impl PatientKeyer {
    /// A keyer with this secret.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
        }
    }

    /// The patient's key: the NHS number when present, else the prison number.
    pub fn key(&self, nhs: Option<&NhsNumber>, prison: Option<&PrisonNumber>) -> String {
        let subject = match (nhs, prison) {
            (Some(n), _) => format!("nhs:{}", n.as_str()),
            (None, Some(p)) => format!("prison:{}", p.as_str()),
            (None, None) => "unidentified".to_owned(),
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(subject.as_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }
}

impl PatientKeyer {
    /// A patient's date of birth (`YYYY-MM-DD`) as a keyed hash, kept on
    /// the patient's identity record so that a prison number (which has no
    /// check digit) found again with another date of birth is not taken
    /// for the same person.
    pub fn birth_key(&self, date_of_birth: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("born:{date_of_birth}").as_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// A custody episode (its reception date, `YYYY-MM-DD`) as a keyed
    /// hash: summaries of one episode correct each other, a later
    /// episode's do not (`store::NewHandover::episode`).
    pub fn episode_key(&self, reception_date: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("episode:{reception_date}").as_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// A custody movement (its event and date, e.g. `TRANSFER:<time>`) as a
    /// keyed hash: a correction of the same movement keeps it
    /// (`store::NewHandover::movement`).
    pub fn movement_key(&self, movement: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("movement:{movement}").as_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// Keys that may claim a parked release: each identifier with the date
    /// of birth, so a claimant must know both. Each key names its kind in
    /// clear (`nhs:` or `prison:` before the digest), so a claim whose other
    /// identifier contradicts a release can be told apart from one that
    /// names an identifier the release never carried
    /// (`records::ClaimMatch`).
    pub fn claim_keys(
        &self,
        nhs: Option<&NhsNumber>,
        prison: Option<&PrisonNumber>,
        date_of_birth: &str,
    ) -> Vec<String> {
        let subjects = [
            nhs.map(|n| ("nhs", format!("claim:nhs:{}:{date_of_birth}", n.as_str()))),
            prison.map(|p| {
                (
                    "prison",
                    format!("claim:prison:{}:{date_of_birth}", p.as_str()),
                )
            }),
        ];
        subjects
            .into_iter()
            .flatten()
            .map(|(kind, subject)| {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
                mac.update(subject.as_bytes());
                format!("{kind}:{}", hex(&mac.finalize().into_bytes()[..16]))
            })
            .collect()
    }
}

/// The bytes of a hex string, if it is one.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    unhex(text)?.try_into().ok()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn event(action: &'static str) -> AuditEvent {
        AuditEvent {
            actor: "urn:ods:YP001".into(),
            action,
            outcome: "ok".into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn linked(chain: &mut AuditChain, n: i64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| serde_json::to_vec(&chain.link(event("submit"), i)).unwrap())
            .collect()
    }

    fn slices(v: &[Vec<u8>]) -> impl Iterator<Item = &[u8]> {
        v.iter().map(Vec::as_slice)
    }

    fn key(secret: &[u8]) -> Arc<AuditKey> {
        Arc::new(AuditKey::from_secret(secret))
    }

    fn anchor_of(raw: &[u8], keyed_from: u64) -> Checkpoint {
        let e: AuditEntry = serde_json::from_slice(raw).unwrap();
        Checkpoint {
            commit_seq: 9,
            audit_seq: e.seq,
            audit_hash: e.hash,
            keyed_from,
            at_ms: 0,
        }
    }

    #[test]
    fn a_chain_verifies_and_any_change_is_found() {
        let mut chain = AuditChain::resume(None, None);
        let entries = linked(&mut chain, 5);
        assert_eq!(verify(slices(&entries), None, None).unwrap().entries, 5);

        let mut tampered = entries.clone();
        let mut e: AuditEntry = serde_json::from_slice(&tampered[2]).unwrap();
        e.outcome = "refused".into();
        tampered[2] = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            verify(slices(&tampered), None, None),
            Err(ChainError::Broken {
                seq: 3,
                what: "content does not match its hash"
            })
        );

        let mut dropped = entries.clone();
        dropped.remove(1);
        assert!(verify(slices(&dropped), None, None).is_err());

        let resumed = AuditChain::resume(Some(&serde_json::from_slice(&entries[4]).unwrap()), None);
        assert_eq!(resumed.next_seq, 6);
    }

    /// The attack a plain chain cannot see: rewrite an entry and recompute
    /// every later hash. Without the key the recomputed hashes are wrong.
    #[test]
    fn a_rewrite_with_recomputed_hashes_needs_the_key() {
        let k = key(b"0123456789abcdef0123456789abcdef");
        let mut chain = AuditChain::resume(None, Some(k.clone()));
        let entries = linked(&mut chain, 6);
        let v = verify(slices(&entries), Some(&k), None).unwrap();
        assert_eq!((v.entries, v.keyed_from), (6, Some(1)));

        // The forger recomputes from entry 3 on, as a plain chain allows.
        let mut forged = entries[..2].to_vec();
        let last: AuditEntry = serde_json::from_slice(&entries[1]).unwrap();
        let mut forger =
            AuditChain::resume(Some(&last), Some(key(b"a guess at the key, 32 bytes!!!!")));
        forged.extend(linked(&mut forger, 4));
        assert_eq!(
            verify(slices(&forged), Some(&k), None),
            Err(ChainError::Broken {
                seq: 3,
                what: "content does not match its hash"
            })
        );
        // ... and relabelling them as v1 (plain SHA-256) is a downgrade.
        let mut downgraded = entries[..2].to_vec();
        let mut plain = AuditChain::resume(Some(&last), None);
        downgraded.extend(linked(&mut plain, 4));
        assert_eq!(
            verify(slices(&downgraded), Some(&k), None),
            Err(ChainError::Broken {
                seq: 3,
                what: "unkeyed entry after the chain was keyed"
            })
        );
        // A keyed entry cannot be checked without the key.
        assert_eq!(
            verify(slices(&entries), None, None),
            Err(ChainError::NoKey { seq: 1 })
        );
    }

    #[test]
    fn the_anchor_finds_truncation_and_a_rewritten_head() {
        let k = key(b"0123456789abcdef0123456789abcdef");
        let mut chain = AuditChain::resume(None, Some(k.clone()));
        let entries = linked(&mut chain, 8);
        let anchor = anchor_of(&entries[7], 1);
        assert_eq!(
            verify(slices(&entries), Some(&k), Some(&anchor))
                .unwrap()
                .anchored,
            Some(8)
        );
        // The newest three deleted: every remaining link holds.
        assert_eq!(
            verify(slices(&entries[..5]), Some(&k), Some(&anchor)),
            Err(ChainError::Truncated {
                anchored: 8,
                found: 5
            })
        );
        assert!(
            ChainError::Truncated {
                anchored: 8,
                found: 5
            }
            .to_string()
            .contains("3 entries missing")
        );
        // A different chain of the same length (made with the key) is not the anchored one.
        let mut other = AuditChain::resume(None, Some(k.clone()));
        let others: Vec<Vec<u8>> = (0..8)
            .map(|i| serde_json::to_vec(&other.link(event("pull"), i)).unwrap())
            .collect();
        assert!(matches!(
            verify(slices(&others), Some(&k), Some(&anchor)),
            Err(ChainError::Broken {
                seq: 1..,
                what: "differs from the anchored checkpoint"
            })
        ));
    }

    #[test]
    fn a_v1_store_continues_keyed_and_its_boundary_is_anchored() {
        let k = key(b"0123456789abcdef0123456789abcdef");
        let mut old = AuditChain::resume(None, None);
        let mut all = linked(&mut old, 3);
        let last: AuditEntry = serde_json::from_slice(&all[2]).unwrap();
        let mut keyed = AuditChain::resume(Some(&last), Some(k.clone()));
        all.extend(linked(&mut keyed, 3));
        let anchor = anchor_of(&all[5], 4);
        let v = verify(slices(&all), Some(&k), Some(&anchor)).unwrap();
        assert_eq!(v.keyed_from, Some(4));
        // Rewriting a v1 entry breaks the keyed entry's link to it.
        let mut rewritten = all.clone();
        let mut e: AuditEntry = serde_json::from_slice(&rewritten[1]).unwrap();
        e.outcome = "refused".into();
        e.hash = e.compute_hash();
        rewritten[1] = serde_json::to_vec(&e).unwrap();
        assert!(verify(slices(&rewritten), Some(&k), Some(&anchor)).is_err());
        // The anchor says entry 4 on are keyed: an all-v1 chain is refused.
        let mut plain = AuditChain::resume(None, None);
        let all_plain = linked(&mut plain, 6);
        assert_eq!(
            verify(
                slices(&all_plain),
                Some(&k),
                Some(&anchor_of(&all_plain[5], 4))
            ),
            Err(ChainError::Broken {
                seq: 4,
                what: "unkeyed entry at or after the key boundary the anchor records"
            })
        );
    }

    #[test]
    fn checkpoints_verify_only_under_their_key() {
        let k = AuditKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let other = AuditKey::from_secret(b"another secret of thirty-two byt");
        let c = Checkpoint {
            commit_seq: 3,
            audit_seq: 7,
            audit_hash: GENESIS.into(),
            keyed_from: 1,
            at_ms: 5,
        };
        let signed = c.sign(&k);
        assert!(signed.verifies(&k));
        assert!(!signed.verifies(&other));
        assert!(!c.sign(&other).verifies(&k));
        let mut moved = signed.clone();
        moved.checkpoint.audit_seq = 6;
        assert!(!moved.verifies(&k));
        let json = serde_json::to_string(&signed).unwrap();
        assert_eq!(
            serde_json::from_str::<SignedCheckpoint>(&json).unwrap(),
            signed
        );
    }

    /// The cut a retention pass leaves after removing entries before `first_kept`.
    fn cut_at(entries: &[Vec<u8>], first_kept: u64, key: &AuditKey) -> SignedAuditCut {
        let last: AuditEntry =
            serde_json::from_slice(&entries[usize::try_from(first_kept).unwrap() - 2]).unwrap();
        AuditCut {
            first_kept,
            prev_hash: last.hash,
            before_ms: 100,
            at_ms: 200,
            keyed_from: 1,
        }
        .sign(key)
    }

    #[test]
    fn a_trail_cut_under_the_retention_policy_verifies_from_the_cut() {
        let k = key(b"0123456789abcdef0123456789abcdef");
        let mut chain = AuditChain::resume(None, Some(k.clone()));
        let entries = linked(&mut chain, 10);
        let anchor = anchor_of(&entries[9], 1);
        let cut = cut_at(&entries, 5, &k);
        let kept = &entries[4..];
        let v = verify_from(slices(kept), Some(&k), Some(&anchor), Some(&cut)).unwrap();
        assert_eq!((v.entries, v.from, v.last), (6, 5, 10));
        assert_eq!(v.cut.unwrap().first_kept, 5);

        // Without the cut, the missing head is tampering.
        assert!(matches!(
            verify(slices(kept), Some(&k), Some(&anchor)),
            Err(ChainError::Broken { seq: 5, what }) if what.contains("no signed cut")
        ));
        // Entries after the cut removed too (not past the period): found.
        assert!(matches!(
            verify_from(slices(&entries[6..]), Some(&k), Some(&anchor), Some(&cut)),
            Err(ChainError::Broken { seq: 7, what }) if what.contains("after the signed retention cut")
        ));
        // A cut signed by another key, or moved, or a checkpoint passed off as one.
        let other = AuditKey::from_secret(b"another secret of thirty-two byt");
        let forged = cut_at(&entries, 7, &other);
        assert_eq!(
            verify_from(
                slices(&entries[6..]),
                Some(&k),
                Some(&anchor),
                Some(&forged)
            ),
            Err(ChainError::CutNotSigned { first_kept: 7 })
        );
        let mut moved = cut.clone();
        moved.cut.first_kept = 7;
        assert!(verify_from(slices(&entries[6..]), Some(&k), Some(&anchor), Some(&moved)).is_err());
        let checkpoint = anchor_of(&entries[5], 1).sign(&k);
        let replayed = SignedAuditCut {
            cut: AuditCut {
                first_kept: 7,
                prev_hash: checkpoint.checkpoint.audit_hash.clone(),
                before_ms: 0,
                at_ms: checkpoint.checkpoint.at_ms,
                keyed_from: 1,
            },
            signature: checkpoint.signature.clone(),
        };
        assert!(
            verify_from(
                slices(&entries[6..]),
                Some(&k),
                Some(&anchor),
                Some(&replayed)
            )
            .is_err()
        );
        // A retained entry rewritten, or the newest removed: still found.
        let mut tampered = kept.to_vec();
        let mut e: AuditEntry = serde_json::from_slice(&tampered[2]).unwrap();
        e.outcome = "refused".into();
        tampered[2] = serde_json::to_vec(&e).unwrap();
        assert!(verify_from(slices(&tampered), Some(&k), Some(&anchor), Some(&cut)).is_err());
        assert_eq!(
            verify_from(slices(&kept[..4]), Some(&k), Some(&anchor), Some(&cut)),
            Err(ChainError::Truncated {
                anchored: 10,
                found: 8
            })
        );
        // An anchor recorded before the cut no longer finds its entry: the
        // trail is checked from the cut, and the anchor only for its end.
        let early = anchor_of(&entries[2], 1);
        assert!(verify_from(slices(kept), Some(&k), Some(&early), Some(&cut)).is_ok());
    }

    #[test]
    fn patient_keys_are_keyed_and_stable() {
        let nhs: NhsNumber = "9990000018".parse().unwrap();
        let a = PatientKeyer::new(b"one").key(Some(&nhs), None);
        assert_eq!(a, PatientKeyer::new(b"one").key(Some(&nhs), None));
        assert_ne!(a, PatientKeyer::new(b"two").key(Some(&nhs), None));
        assert!(!a.contains("9990000018"));
        assert_eq!(a.len(), 32);
    }
}
