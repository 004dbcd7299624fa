//! FHIR R4 (UK Core) document Bundles, in and out.
//!
//! Rendering: a `document` Bundle with the Composition first, a Bundle
//! identifier and timestamp, unique `urn:uuid` fullUrls, UK Core identifier
//! systems, Composition type SNOMED 373942005, `Flag` for risks and
//! `MedicationStatement` with dosage. Project-local systems (prison number,
//! CRN, journey events, PRSB headings) are listed in
//! `docs/clinical-formats.md`.
//!
//! Parsing: a document Bundle, or a message Bundle wrapping one. Resources are
//! found by type (not only through sections), references by fullUrl. Every
//! problem is reported with its path (`entry[3].resource.identifier[0].value`).
//!
//! Files: `write` (summary to Bundle), `read` (limits, JSON, the Bundle and
//! the typed reads), `document` (a document's resources to summary), `types`
//! (the FHIR structures both sides use), `index` (entries by type and
//! fullUrl), `prescription`, `dosage` (a medicine's dosages in words,
//! several in their order), `uk_core` (profiles and headings), `unread`
//! (what a Bundle holds that is not read).

mod document;
mod dosage;
mod index;
mod prescription;
mod read;
mod tree;
mod types;
mod uk_core;
mod unread;
mod write;

pub use read::{Parsed, parse};
pub use write::render;

use crate::clinical::JourneyEvent;

/// UK Core NHS number system.
pub const SYS_NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// UK Core ODS organisation code system.
pub const SYS_ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// Project-local: prison number.
pub const SYS_PRISON_NUMBER: &str = "https://throughcare.invalid/fhir/Id/prison-number";
/// Project-local: probation case reference number.
pub const SYS_CRN: &str = "https://throughcare.invalid/fhir/Id/crn";
/// Project-local: journey events.
pub const SYS_EVENT: &str = "https://throughcare.invalid/fhir/CodeSystem/journey-event";
/// Project-local: PRSB headings used as section codes.
pub const SYS_HEADING: &str = "https://throughcare.invalid/fhir/CodeSystem/prsb-heading";
/// Project-local: risk flags.
pub const SYS_RISK: &str = "https://throughcare.invalid/fhir/CodeSystem/risk";
/// Project-local: categories and observation codes.
pub const SYS_LOCAL: &str = "https://throughcare.invalid/fhir/CodeSystem/throughcare";
const EXT_LAST_DOSE: &str = "https://throughcare.invalid/fhir/StructureDefinition/last-dose-given";
const EXT_DAYS_SUPPLIED: &str =
    "https://throughcare.invalid/fhir/StructureDefinition/days-supplied";
/// On a `Dosage`: the dose alone in words, beside a `text` that holds the
/// whole instruction (docs/clinical-formats.md).
const EXT_DOSE: &str = "https://throughcare.invalid/fhir/StructureDefinition/dose";
const EXT_NOTE: &str = "https://throughcare.invalid/fhir/StructureDefinition/note";
const EXT_TREATMENT_STARTED: &str =
    "https://throughcare.invalid/fhir/StructureDefinition/treatment-started";
const CLINICAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
/// Where a patient went at the end of an encounter (R4).
const SYS_DISCHARGE_DISPOSITION: &str =
    "http://terminology.hl7.org/CodeSystem/discharge-disposition";
/// The same in UK Core (NHS Data Dictionary discharge destination).
const SYS_DISCHARGE_DESTINATION_ENGLAND: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-DischargeDestinationEngland";
const ALLERGY_STATUS: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";

fn event_code(e: JourneyEvent) -> &'static str {
    match e {
        JourneyEvent::Admission => "admission",
        JourneyEvent::Transfer => "transfer",
        JourneyEvent::Release => "release",
        JourneyEvent::CommunitySummary => "community-summary",
    }
}

/// Reading tests' documents: an invented patient's release summary (with a
/// take-out prescription) as a FHIR document, changed, then read.
#[cfg(test)]
mod test_doc {
    use serde_json::Value;

    use crate::clinical::model::{Code, DMD, Prescription};
    use crate::clinical::{ClinicalSummary, JourneyEvent, Limits, ValidationErrors};

    /// The summary the document is written from.
    pub(super) fn summary() -> ClinicalSummary {
        let mut s = crate::clinical::synthetic::release_summary(
            "9990001014".parse().ok(),
            "A1234BC".parse().ok(),
            "YP001".parse().expect("ODS code"),
            "YG001".parse().ok(),
            "Community GP",
        );
        s.prescriptions.push(Prescription {
            code: Code {
                system: DMD.into(),
                code: "3378311000001103".into(),
                display: "Naloxone 1.8mg/0.1ml nasal spray".into(),
            },
            status: "active".into(),
            intent: "order".into(),
            authored_on: None,
            dosage: Some("1 spray".into()),
            quantity: None,
            days_supplied: None,
        });
        s
    }

    /// The first resource of type `kind` in `doc`, and its entry's index.
    pub(super) fn entry_of<'v>(doc: &'v mut Value, kind: &str) -> (usize, &'v mut Value) {
        let entries = doc["entry"].as_array_mut().expect("entries");
        let i = entries
            .iter()
            .position(|e| e["resource"]["resourceType"] == kind)
            .expect("an entry of that type");
        (i, &mut entries[i]["resource"])
    }

    /// [`summary`] as a FHIR document, changed by `edit`, then read.
    pub(super) fn read_after(
        edit: impl FnOnce(&mut Value),
    ) -> Result<ClinicalSummary, ValidationErrors> {
        let rendered = super::render(&summary(), JourneyEvent::Release);
        let mut doc: Value = serde_json::from_slice(&rendered.bytes).expect("JSON");
        edit(&mut doc);
        let bytes = serde_json::to_vec(&doc).expect("JSON");
        super::parse(&bytes, &Limits::default()).map(|p| p.summary)
    }

    /// The fields of the violations `read` refused with.
    pub(super) fn refused(read: Result<ClinicalSummary, ValidationErrors>) -> Vec<String> {
        match read {
            Ok(s) => panic!("read, not refused: {s:?}"),
            Err(e) => e.0.into_iter().map(|v| v.field).collect(),
        }
    }
}
