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
//! fullUrl), `prescription`, `uk_core` (profiles and headings), `unread`
//! (what a Bundle holds that is not read).

mod document;
mod index;
mod prescription;
mod read;
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
