//! Clinical completeness: what each journey event needs before it can help
//! the next carer. Paths are in the canonical model.

use super::model::ClinicalSummary;
use super::violation::ValidationErrors;
use crate::journey::JourneyEvent;

/// Checks that `s` carries what `event` needs.
///
/// # Errors
/// Every missing or inconsistent field.
pub fn validate(s: &ClinicalSummary, event: JourneyEvent) -> Result<(), ValidationErrors> {
    let mut e = ValidationErrors::default();
    let p = &s.patient;
    if p.nhs_number.is_none() && p.prison_number.is_none() {
        e.add(
            "summary.patient",
            "an NHS number or a prison number is required",
        );
    }
    if p.family_name.trim().is_empty() {
        e.add("summary.patient.family_name", "required");
    }
    let c = &s.custody;
    match event {
        JourneyEvent::Admission if c.reception_date.is_none() => {
            e.add(
                "summary.custody.reception_date",
                "an admission needs the reception date",
            );
        }
        JourneyEvent::Transfer => {
            if c.transfer_at.is_none() {
                e.add(
                    "summary.custody.transfer_at",
                    "a transfer needs the transfer time",
                );
            }
            if c.transfer_to.is_none() {
                e.add(
                    "summary.custody.transfer_to",
                    "a transfer needs the receiving prison",
                );
            }
        }
        JourneyEvent::Release => {
            if c.release_date.is_none() {
                e.add(
                    "summary.custody.release_date",
                    "a release needs the release date",
                );
            }
            if c.release_address.is_none() && !c.no_fixed_abode {
                e.add(
                    "summary.custody.release_address",
                    "a release needs the release address, or no_fixed_abode",
                );
            }
        }
        _ => {}
    }
    for (i, m) in s.medications.iter().enumerate() {
        if m.opioid_substitution && m.last_dose_given.is_none() {
            e.add(
                format!("summary.medications[{i}].last_dose_given"),
                "opioid substitution therapy needs the time of the last dose given",
            );
        }
        if m.code.code.trim().is_empty() {
            e.add(format!("summary.medications[{i}].code"), "required");
        }
    }
    e.into_result()
}
