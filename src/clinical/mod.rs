//! Clinical content: identifiers that can only be built valid, the canonical
//! [`ClinicalSummary`] (PRSB headings), FHIR R4 and HL7 v2 in and out, the
//! views each recipient may see, and clinical validation.
//!
//! Pure domain: imports no tonic, prost or sled.

pub mod carried;
pub mod fhir;
pub mod hl7v2;
mod identifiers;
pub mod model;
pub mod synthetic;
pub mod translate;
mod validate;
pub mod views;
mod violation;

pub use identifiers::{Crn, IdentifierError, NhsNumber, OdsCode, PrisonNumber};
pub use model::ClinicalSummary;
pub use validate::validate;
pub use views::View;
pub use violation::{ValidationErrors, Violation};

/// Limits on what a parser accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest document, bytes.
    pub max_document_bytes: usize,
    /// Deepest JSON nesting.
    pub max_json_depth: usize,
    /// Most HL7 segments.
    pub max_hl7_segments: usize,
    /// Most fields in one segment, and repetitions in one field.
    pub max_hl7_repetitions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_document_bytes: 4 * 1024 * 1024,
            max_json_depth: 32,
            max_hl7_segments: 2_000,
            max_hl7_repetitions: 100,
        }
    }
}

/// A document rendered for a recipient, with what its format could not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The document.
    pub bytes: Vec<u8>,
    /// What was left out and why (paths in the model; never patient data).
    pub not_carried: Vec<String>,
}
