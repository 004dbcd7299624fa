//! What the gateway stores for a handover: who it is about and the document
//! as received. The store treats it as opaque bytes.
//!
//! # Layout
//! | bytes | version 1 (written now) | version 0 (before versions) |
//! |---|---|---|
//! | 0 | `0xFF` marker | header length (u32 BE) ... |
//! | 1 | format version (`1`) | |
//! | then | header length (u32 BE), header JSON, document bytes | header JSON, document bytes |
//!
//! A version-0 envelope never starts with `0xFF` (that would be a header of
//! 4 GiB), so the marker tells the layouts apart and old records still read.
//! A version this gateway does not know is refused by name (a newer
//! gateway's record), never read as corrupt bytes. The encoding is
//! deterministic, so the same submit gives the same bytes (idempotency).

use serde::{Deserialize, Serialize};

use crate::clinical::{NhsNumber, PrisonNumber};
use crate::store::records::DocumentFormat;

/// Who a handover is about, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRef {
    /// NHS number, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nhs_number: Option<NhsNumber>,
    /// Prison number, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prison_number: Option<PrisonNumber>,
    /// Date of birth, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<String>,
}

/// A stored handover document with its patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The patient.
    pub patient: PatientRef,
    /// The format the document arrived in.
    pub source_format: DocumentFormat,
    /// The canonical summary, JSON.
    #[serde(skip)]
    pub document: Vec<u8>,
}

/// Marks a versioned envelope (see the layout above).
const VERSIONED: u8 = 0xFF;

/// The format version [`Envelope::encode`] writes.
pub const FORMAT_VERSION: u8 = 1;

impl Envelope {
    /// The stored form (format version [`FORMAT_VERSION`]).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(self).expect("envelope header serialises");
        let mut out = Vec::with_capacity(6 + header.len() + self.document.len());
        out.extend_from_slice(&[VERSIONED, FORMAT_VERSION]);
        out.extend_from_slice(
            &u32::try_from(header.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.document);
        out
    }

    /// Reads the stored form, of any version this gateway knows.
    ///
    /// # Errors
    /// A description of what does not decode, or the unknown version.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        match bytes {
            [VERSIONED, 1, rest @ ..] => Self::decode_v1(rest),
            [VERSIONED, version, ..] => Err(format!(
                "envelope format version {version} is not one this gateway reads (it reads 0 and 1); a newer gateway wrote it"
            )),
            [VERSIONED] => Err("envelope shorter than its version".into()),
            // Version 0 has the same body without the version prefix.
            legacy => Self::decode_v1(legacy),
        }
    }

    /// Header length, header JSON, document.
    fn decode_v1(bytes: &[u8]) -> Result<Envelope, String> {
        let (len, rest) = bytes
            .split_at_checked(4)
            .ok_or("envelope shorter than its header length")?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| "header length")?) as usize;
        let (header, document) = rest
            .split_at_checked(len)
            .ok_or("envelope shorter than its header")?;
        let mut envelope: Envelope =
            serde_json::from_slice(header).map_err(|e| unreadable("envelope header", &e))?;
        envelope.document = document.to_vec();
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_deterministic() {
        let e = Envelope {
            patient: PatientRef {
                nhs_number: Some("9990000018".parse().unwrap()),
                prison_number: None,
                date_of_birth: Some("1980-02-29".into()),
            },
            source_format: DocumentFormat::Native,
            document: vec![1, 2, 3],
        };
        assert_eq!(e.encode(), e.clone().encode());
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        assert!(Envelope::decode(&[0, 0, 0, 9, b'{']).is_err());
        assert!(Envelope::decode(&[]).is_err());
        assert_eq!(e.encode()[..2], [0xFF, FORMAT_VERSION]);
    }

    /// A record written before envelopes had a version (header length first).
    #[test]
    fn unversioned_records_still_read() {
        let header = br#"{"patient":{"nhs_number":"9990000018","date_of_birth":"1980-02-29"},"source_format":"native"}"#;
        let mut old = u32::try_from(header.len()).unwrap().to_be_bytes().to_vec();
        old.extend_from_slice(header);
        old.extend_from_slice(b"{}");
        let e = Envelope::decode(&old).unwrap();
        assert_eq!(e.patient.nhs_number.unwrap().as_str(), "9990000018");
        assert_eq!(e.source_format, DocumentFormat::Native);
        assert_eq!(e.document, b"{}");
    }

    #[test]
    fn an_unknown_version_is_named_not_corrupt() {
        let err = Envelope::decode(&[0xFF, 9, 0, 0, 0, 2, b'{', b'}']).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
    }
}

/// Why stored JSON could not be read, by kind and place only: serde's own
/// message may quote the value it choked on, and a stored summary's values
/// are patient data (this text is logged and may reach an operator).
pub fn unreadable(what: &str, e: &serde_json::Error) -> String {
    format!(
        "{what} unreadable: {:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    )
}

#[cfg(test)]
mod unreadable_tests {
    #[test]
    fn the_reason_never_quotes_the_value() {
        let e = serde_json::from_str::<u32>("\"Smith\"").unwrap_err();
        assert!(e.to_string().contains("Smith"), "serde quotes it: {e}");
        let text = super::unreadable("stored summary", &e);
        assert!(!text.contains("Smith"), "{text}");
        assert!(text.contains("Data error at line 1"), "{text}");
    }
}
