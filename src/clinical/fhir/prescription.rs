//! Prescriptions to take away (naloxone, take-out supplies) as FHIR
//! `MedicationRequest`, UK Core profile, both ways.

use super::index::Index;
use super::read::{parse_with, typed};
use super::types::{DispenseRequest, Dosage, MedicationRequest, Meta, Quantity, Reference};
use super::write::code_cc;
use crate::clinical::model::{
    PRESCRIPTION_INTENTS, PRESCRIPTION_STATUSES, Prescription, Quantity as ModelQuantity,
};
use crate::clinical::violation::ValidationErrors;

/// UK Core MedicationRequest.
pub(super) const PROFILE: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/UKCore-MedicationRequest";
const UCUM: &str = "http://unitsofmeasure.org";

/// The resource for `p`, about `subject`.
pub(super) fn to_fhir<'a>(p: &'a Prescription, subject: &Reference<'a>) -> MedicationRequest<'a> {
    MedicationRequest {
        resource_type: "MedicationRequest".into(),
        meta: Meta::profile(PROFILE),
        status: p.status.as_str().into(),
        intent: p.intent.as_str().into(),
        medication_codeable_concept: Some(code_cc(&p.code)),
        medication_reference: None,
        subject: subject.clone(),
        authored_on: p.authored_on.as_ref().map(|t| t.to_string().into()),
        dosage_instruction: p
            .dosage
            .iter()
            .map(|d| Dosage {
                text: Some(d.as_str().into()),
                ..Dosage::default()
            })
            .collect(),
        dispense_request: (p.quantity.is_some() || p.days_supplied.is_some()).then(|| {
            DispenseRequest {
                quantity: p.quantity.as_ref().map(|q| Quantity {
                    value: q.value.parse().ok(),
                    comparator: None,
                    unit: Some(q.unit.as_str().into()),
                    system: None,
                    code: None,
                }),
                expected_supply_duration: p.days_supplied.map(|d| Quantity {
                    value: Some(d.into()),
                    comparator: None,
                    unit: Some("days".into()),
                    system: Some(UCUM.into()),
                    code: Some("d".into()),
                }),
            }
        }),
    }
}

/// Every MedicationRequest in the Bundle.
pub(super) fn read(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<Prescription> {
    let mut out = Vec::new();
    for (i, v) in index.of_type("MedicationRequest") {
        let at = index.path(i);
        let Some(m) = typed::<MedicationRequest>(v, at, errors) else {
            continue;
        };
        if !PRESCRIPTION_STATUSES.contains(&&*m.status) {
            errors.add(format!("{at}status"), "not a MedicationRequest status (R4)");
        }
        if !PRESCRIPTION_INTENTS.contains(&&*m.intent) {
            errors.add(format!("{at}intent"), "not a MedicationRequest intent (R4)");
        }
        let code = super::read::medication_code(
            index,
            (
                m.medication_codeable_concept.as_ref(),
                m.medication_reference.as_ref(),
            ),
            v,
            at,
            errors,
        );
        let authored_on = parse_with(
            m.authored_on.as_deref(),
            format_args!("{at}authoredOn"),
            errors,
        );
        let dispense = m.dispense_request.as_ref();
        let quantity = dispense
            .and_then(|d| d.quantity.as_ref())
            .and_then(|q| quantity(q, &format!("{at}dispenseRequest.quantity"), errors));
        let days_supplied = dispense
            .and_then(|d| d.expected_supply_duration.as_ref())
            .and_then(|q| {
                days(
                    q,
                    &format!("{at}dispenseRequest.expectedSupplyDuration"),
                    errors,
                )
            });
        let Some(code) = code else { continue };
        out.push(Prescription {
            code,
            status: m.status.into_owned(),
            intent: m.intent.into_owned(),
            authored_on,
            dosage: m
                .dosage_instruction
                .first()
                .and_then(|d| instruction(index, d, &format!("{at}dosageInstruction[0]"))),
            quantity,
            days_supplied,
        });
    }
    out
}

/// The instruction in words: its `text`, else the dose and how often as
/// the sender gave them in numbers ("5 mg twice a day"). Beside a text, the
/// numbers are listed, not carried (the text is what a clinician wrote).
fn instruction(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> Option<String> {
    if let Some(text) = d.text.as_deref() {
        if !d.dose_and_rate.is_empty() {
            index.note(
                format_args!("{at}.doseAndRate"),
                "not carried: the dose as numbers beside the instruction in words (text)",
            );
        }
        if d.timing.is_some() {
            index.note(
                format_args!("{at}.timing"),
                "not carried: the timing beside the instruction in words (text)",
            );
        }
        return Some(text.to_owned());
    }
    let dose = super::document::dose(index, d, at);
    let often = super::document::frequency(index, Some(d), at);
    let words = format!("{dose} {often}").trim().to_owned();
    (!words.is_empty()).then_some(words)
}

fn quantity(q: &Quantity, at: &str, errors: &mut ValidationErrors) -> Option<ModelQuantity> {
    let value = q.value.as_ref()?.to_string();
    if !ModelQuantity::is_decimal(&value) {
        errors.add(format!("{at}.value"), "must be a decimal without exponent");
        return None;
    }
    let unit = q
        .unit
        .as_ref()
        .or(q.code.as_ref())
        .map(|u| u.to_string())
        .filter(|u| !u.trim().is_empty());
    match unit {
        Some(unit) => Some(ModelQuantity { value, unit }),
        None => {
            errors.add(format!("{at}.unit"), "required: the unit supplied");
            None
        }
    }
}

/// A supply duration in whole days (UCUM `d`, or `wk` counted as seven).
fn days(q: &Quantity, at: &str, errors: &mut ValidationErrors) -> Option<u32> {
    let per = match (q.code.as_deref(), q.unit.as_deref()) {
        (Some("d"), _) | (None, Some("d" | "day" | "days")) => 1,
        (Some("wk"), _) | (None, Some("wk" | "week" | "weeks")) => 7,
        _ => {
            errors.add(format!("{at}.code"), "must be a duration in d or wk (UCUM)");
            return None;
        }
    };
    match q.value.as_ref().and_then(serde_json::Number::as_u64) {
        Some(n) => u32::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(per))
            .or_else(|| {
                errors.add(format!("{at}.value"), "too many days");
                None
            }),
        None => {
            errors.add(format!("{at}.value"), "must be a whole number");
            None
        }
    }
}
