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
            dosage: super::dosage::instructions(
                index,
                &m.dosage_instruction,
                &format!("{at}dosageInstruction"),
            ),
            quantity,
            days_supplied,
        });
    }
    out
}

fn quantity(q: &Quantity, at: &str, errors: &mut ValidationErrors) -> Option<ModelQuantity> {
    let value = q.value.as_ref()?.to_string();
    if !ModelQuantity::is_decimal(&value) {
        errors.add(format!("{at}.value"), "must be a decimal without exponent");
        return None;
    }
    // As for a dose: the unit in words, or a UCUM code; a code from another
    // system (SNOMED CT's "spray" as a number) is no unit to print.
    match super::dosage::unit_of(q) {
        Some(unit) => Some(ModelQuantity {
            value,
            unit: unit.to_owned(),
        }),
        None => {
            errors.add(
                format!("{at}.unit"),
                "required: the unit supplied, in words (unit) or as a UCUM code (a code from \
                 another system is not a unit a reader can print)",
            );
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
    match q.value.as_ref().and_then(whole_number) {
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

/// A FHIR decimal that is a whole number: `28`, or `28.0` (a decimal with a
/// zero fraction is the same number). Read from its digits, never through a
/// float, so no large value rounds to a whole one.
fn whole_number(n: &serde_json::Number) -> Option<u64> {
    if let Some(n) = n.as_u64() {
        return Some(n);
    }
    let text = n.to_string();
    let (int, fraction) = text.split_once('.')?;
    let zero = !fraction.is_empty() && fraction.bytes().all(|b| b == b'0');
    (zero && !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()))
        .then(|| int.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_doc::{entry_of, read_after, refused};

    /// The MedicationRequest's `dispenseRequest` set to `dispense`, read.
    fn with_dispense(
        dispense: Value,
    ) -> Result<crate::clinical::ClinicalSummary, crate::clinical::ValidationErrors> {
        read_after(|doc| {
            let (_, r) = entry_of(doc, "MedicationRequest");
            r["dispenseRequest"] = dispense;
        })
    }

    /// A supply's unit is one a reader can print: its words, or a UCUM
    /// code, as for a dose. A SNOMED CT code is a number, not a unit.
    #[test]
    fn a_supply_quantity_needs_a_unit_a_reader_can_print() {
        let fields = refused(with_dispense(json!({"quantity": {
            "value": 2, "system": "http://snomed.info/sct", "code": "3318611000001103"
        }})));
        assert!(
            fields
                .iter()
                .any(|f| f.ends_with("dispenseRequest.quantity.unit")),
            "{fields:?}"
        );
        let s = with_dispense(json!({"quantity": {
            "value": 10, "system": "http://unitsofmeasure.org", "code": "mL"
        }}))
        .expect("read");
        let q = s.prescriptions[0].quantity.as_ref().expect("quantity");
        assert_eq!((q.value.as_str(), q.unit.as_str()), ("10", "mL"));
        let s = with_dispense(json!({"quantity": {
            "value": 2, "unit": "spray", "system": "http://snomed.info/sct", "code": "3318611000001103"
        }}))
        .expect("read");
        assert_eq!(s.prescriptions[0].quantity.as_ref().unwrap().unit, "spray");
    }

    /// `28.0` is a FHIR decimal for 28 days; a fraction of a day is not a
    /// whole number of days.
    #[test]
    fn a_supply_duration_with_a_zero_fraction_is_whole_days() {
        let duration = |value: Value, code: &str| {
            with_dispense(json!({"expectedSupplyDuration": {
                "value": value, "unit": code, "system": "http://unitsofmeasure.org", "code": code
            }}))
        };
        for (value, code, days) in [
            (json!(28.0), "d", 28),
            (json!(28), "d", 28),
            (json!(2.0), "wk", 14),
        ] {
            let s = duration(value.clone(), code).expect("read");
            assert_eq!(s.prescriptions[0].days_supplied, Some(days), "{value}");
        }
        for value in [json!(28.5), json!(-1.0), json!(1e30)] {
            let fields = refused(duration(value.clone(), "d"));
            assert!(
                fields
                    .iter()
                    .any(|f| f.ends_with("expectedSupplyDuration.value")),
                "{value}: {fields:?}"
            );
        }
    }
}
