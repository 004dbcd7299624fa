//! The audit trail: append-only and hash-chained, written in the same
//! transaction as the change it records (see `store`).
//!
//! Each entry carries the hash of the one before it, so changing, removing
//! or reordering any entry breaks every later link. Patients appear only as
//! a keyed hash ([`PatientKeyer`]), never in clear.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clinical::{NhsNumber, PrisonNumber};

/// The hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// Hash of this entry (over every other field).
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry should carry.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex(&Sha256::digest(bytes))
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

/// The head of the chain: the next sequence number and the last hash.
#[derive(Debug, Clone)]
pub struct AuditChain {
    next_seq: u64,
    last_hash: String,
}

impl AuditChain {
    /// A chain whose last entry is `last` (or empty).
    pub fn resume(last: Option<&AuditEntry>) -> Self {
        match last {
            Some(e) => Self {
                next_seq: e.seq + 1,
                last_hash: e.hash.clone(),
            },
            None => Self {
                next_seq: 1,
                last_hash: GENESIS.to_owned(),
            },
        }
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
            prev_hash: self.last_hash.clone(),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
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
}

/// Verifies entries given in trail order; returns how many were checked.
///
/// # Errors
/// The first entry that is unreadable or breaks the chain.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Result<u64, ChainError> {
    let mut expected_prev = GENESIS.to_owned();
    let mut count = 0u64;
    for raw in entries {
        let position = count + 1;
        let entry: AuditEntry =
            serde_json::from_slice(raw).map_err(|_| ChainError::Unreadable { position })?;
        let broken = |what| ChainError::Broken {
            seq: entry.seq,
            what,
        };
        if entry.seq != position {
            return Err(broken("sequence number out of order"));
        }
        if entry.prev_hash != expected_prev {
            return Err(broken("does not link to the previous entry"));
        }
        if entry.compute_hash() != entry.hash {
            return Err(broken("content does not match its hash"));
        }
        expected_prev = entry.hash;
        count = position;
    }
    Ok(count)
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
    /// The keyed hash of each identifier on its own, as the store's identity
    /// links use them (each equals [`PatientKeyer::key`] of that identifier alone).
    pub fn identifier_keys(
        &self,
        nhs: Option<&NhsNumber>,
        prison: Option<&PrisonNumber>,
    ) -> crate::store::PatientIds {
        crate::store::PatientIds {
            nhs: nhs.map(|n| self.key(Some(n), None)),
            prison: prison.map(|p| self.key(None, Some(p))),
        }
    }

    /// Keys that may claim a parked release: each identifier with the date
    /// of birth, so a claimant must know both.
    pub fn claim_keys(
        &self,
        nhs: Option<&NhsNumber>,
        prison: Option<&PrisonNumber>,
        date_of_birth: &str,
    ) -> Vec<String> {
        let subjects = [
            nhs.map(|n| format!("claim:nhs:{}:{date_of_birth}", n.as_str())),
            prison.map(|p| format!("claim:prison:{}:{date_of_birth}", p.as_str())),
        ];
        subjects
            .into_iter()
            .flatten()
            .map(|subject| {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
                mac.update(subject.as_bytes());
                hex(&mac.finalize().into_bytes()[..16])
            })
            .collect()
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
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
    fn a_chain_verifies_and_any_change_is_found() {
        let mut chain = AuditChain::resume(None);
        let entries: Vec<Vec<u8>> = (0..5)
            .map(|i| serde_json::to_vec(&chain.link(event("submit"), i)).unwrap())
            .collect();
        assert_eq!(verify(entries.iter().map(Vec::as_slice)), Ok(5));

        let mut tampered = entries.clone();
        let mut e: AuditEntry = serde_json::from_slice(&tampered[2]).unwrap();
        e.outcome = "refused".into();
        tampered[2] = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            verify(tampered.iter().map(Vec::as_slice)),
            Err(ChainError::Broken {
                seq: 3,
                what: "content does not match its hash"
            })
        );

        let mut dropped = entries.clone();
        dropped.remove(1);
        assert!(verify(dropped.iter().map(Vec::as_slice)).is_err());

        let resumed = AuditChain::resume(Some(&serde_json::from_slice(&entries[4]).unwrap()));
        assert_eq!(resumed.next_seq, 6);
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
