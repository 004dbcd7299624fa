//! Clinical completeness: what each journey event needs before it can help
//! the next carer. Paths are in the canonical model.

use super::model::ClinicalSummary;
use super::violation::ValidationErrors;
use crate::clinical::JourneyEvent;

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
    if !p.date_of_birth.is_plausible_birth_date() {
        e.add(
            "summary.patient.date_of_birth",
            "must not be before 1900 or in the future",
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
    }
    check_text(s, &mut e);
    e.into_result()
}

/// Text every format can carry: no control characters but tab and line
/// breaks (FHIR `string` forbids them, HL7 has no escape for most), and
/// codes FHIR reads as a `code` token and a `uri` system.
fn check_text(s: &ClinicalSummary, e: &mut ValidationErrors) {
    fn walk(v: &serde_json::Value, path: &str, e: &mut ValidationErrors) {
        match v {
            serde_json::Value::String(t)
                if t.chars()
                    .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n')) =>
            {
                e.add(path, "must not contain control characters");
            }
            serde_json::Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), e);
                }
            }
            serde_json::Value::Object(map) => {
                for (k, x) in map {
                    walk(x, &format!("{path}.{k}"), e);
                }
            }
            _ => {}
        }
    }
    walk(
        &serde_json::to_value(s).expect("the model serialises"),
        "summary",
        e,
    );
    let codes = s
        .diagnoses
        .iter()
        .map(|d| ("diagnoses", "code", &d.code))
        .chain(
            s.medications
                .iter()
                .map(|m| ("medications", "code", &m.code)),
        )
        .chain(
            s.prescriptions
                .iter()
                .map(|m| ("prescriptions", "code", &m.code)),
        )
        .chain(
            s.allergies
                .iter()
                .map(|a| ("allergies", "substance", &a.substance)),
        )
        .chain(s.infections.iter().map(|i| ("infections", "code", &i.code)))
        .chain(
            s.vaccinations
                .iter()
                .map(|v| ("vaccinations", "code", &v.code)),
        );
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for (heading, field, code) in codes {
        let i = match seen.iter_mut().find(|(h, _)| *h == heading) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen.push((heading, 0));
                0
            }
        };
        let token = |t: &str| {
            !t.is_empty()
                && t.split(' ')
                    .all(|w| !w.is_empty() && !w.contains(char::is_whitespace))
        };
        if !token(&code.code) {
            e.add(
                format!("summary.{heading}[{i}].{field}.code"),
                "required: a code without leading, trailing or repeated spaces",
            );
        }
        if code.system.is_empty() || code.system.contains(char::is_whitespace) {
            e.add(
                format!("summary.{heading}[{i}].{field}.system"),
                "required: a code system URI",
            );
        }
    }
}
