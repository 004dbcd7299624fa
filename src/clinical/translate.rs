//! Translation between the formats a document can arrive or leave in.

use super::model::ClinicalSummary;
use super::views::{self, View};
use super::{Limits, Rendered, ValidationErrors, fhir, hl7v2};
use crate::clinical::JourneyEvent;

/// A clinical document format this module reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextFormat {
    /// The canonical model as JSON (fixtures, tools).
    ModelJson,
    /// FHIR R4 document Bundle.
    Fhir,
    /// HL7 v2.5.1 ADT.
    Hl7v2,
}

/// A parsed document and the journey event it states, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The summary.
    pub summary: ClinicalSummary,
    /// The event the document itself states (FHIR `Composition.event`, HL7 MSH-9).
    pub event: Option<JourneyEvent>,
}

/// Parses `bytes` in `format`.
///
/// # Errors
/// Field violations with paths in the document's own terms.
pub fn read(format: TextFormat, bytes: &[u8], limits: &Limits) -> Result<Read, ValidationErrors> {
    match format {
        TextFormat::Fhir => fhir::parse(bytes, limits).map(|p| Read {
            summary: p.summary,
            event: p.event,
        }),
        TextFormat::Hl7v2 => hl7v2::parse(bytes, limits).map(|p| Read {
            summary: p.summary,
            event: Some(p.event),
        }),
        TextFormat::ModelJson => {
            if bytes.len() > limits.max_document_bytes {
                return Err(ValidationErrors::one("document", "over the size limit"));
            }
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes))
                .map(|summary| Read {
                    summary,
                    event: None,
                })
                .map_err(|e| {
                    ValidationErrors::one(e.path().to_string(), "missing, mistyped or invalid")
                })
        }
    }
}

/// What no format carries to a recipient of `view`: the headings the view
/// leaves out, then, for the views that see them
/// ([`views::sees_document_notes`]), what the document held that the
/// gateway does not read (paths, never values). Every delivery lists these in `not_carried`,
/// whatever its format, native included.
pub fn notes(summary: &ClinicalSummary, view: View) -> Vec<String> {
    let document_notes = if views::sees_document_notes(view) {
        summary.not_read.as_slice()
    } else {
        &[]
    };
    views::excluded(view)
        .iter()
        .map(|s| (*s).to_owned())
        .chain(document_notes.iter().cloned())
        .collect()
}

/// Renders the `view` of `summary` in `format` for `event`; `not_carried`
/// holds what the format could not carry, then [`notes`].
pub fn write(
    format: TextFormat,
    summary: &ClinicalSummary,
    view: View,
    event: JourneyEvent,
) -> Rendered {
    let mut rendered = write_format(format, summary, view, event);
    rendered.not_carried.extend(notes(summary, view));
    rendered
}

fn write_format(
    format: TextFormat,
    summary: &ClinicalSummary,
    view: View,
    event: JourneyEvent,
) -> Rendered {
    let shown = views::apply(summary, view);
    match format {
        TextFormat::Fhir => fhir::render(&shown, event),
        TextFormat::Hl7v2 => hl7v2::render(&shown, event),
        TextFormat::ModelJson => Rendered {
            bytes: serde_json::to_vec_pretty(&shown).expect("model serialises"),
            not_carried: Vec::new(),
        },
    }
}
