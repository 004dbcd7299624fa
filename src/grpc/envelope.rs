//! What the gateway stores for a handover: who it is about and the document
//! as received. The store treats it as opaque bytes.
//!
//! Layout: header length (u32 BE), header JSON, document bytes. The encoding
//! is deterministic, so the same submit gives the same bytes (idempotency).

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

impl Envelope {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(self).expect("envelope header serialises");
        let mut out = Vec::with_capacity(4 + header.len() + self.document.len());
        out.extend_from_slice(
            &u32::try_from(header.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.document);
        out
    }

    /// Reads the stored form.
    ///
    /// # Errors
    /// A description of what does not decode.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
        let (len, rest) = bytes
            .split_at_checked(4)
            .ok_or("envelope shorter than its header length")?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| "header length")?) as usize;
        let (header, document) = rest
            .split_at_checked(len)
            .ok_or("envelope shorter than its header")?;
        let mut envelope: Envelope =
            serde_json::from_slice(header).map_err(|e| format!("envelope header: {e}"))?;
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
    }
}
