//! An invented patient's summary, for the built-in client, the bench and
//! tests. Never a real person: the name is made up and callers pass NHS
//! numbers from the 999 test range.

use super::identifiers::{NhsNumber, OdsCode, PrisonNumber};
use super::model::{
    Address, Author, ClinicalSummary, Code, Consent, ConsentDecision, Custody, DMD, FollowUp,
    FollowUpKind, Medication, Patient, Sex,
};

/// A release summary of an invented patient from `establishment`, with
/// `note` as the service of its one follow-up (tests use it as a marker).
pub fn release_summary(
    nhs_number: Option<NhsNumber>,
    prison_number: Option<PrisonNumber>,
    establishment: OdsCode,
    registered_gp: Option<OdsCode>,
    note: &str,
) -> ClinicalSummary {
    ClinicalSummary {
        patient: Patient {
            nhs_number,
            prison_number,
            crn: None,
            family_name: "Example (invented)".into(),
            given_names: vec!["Alex".into()],
            date_of_birth: "1985-06-15".parse().expect("valid date"),
            sex: Sex::Unknown,
        },
        custody: Custody {
            establishment: establishment.clone(),
            reception_date: Some("2026-09-01".parse().expect("valid date")),
            transfer_at: None,
            transfer_to: None,
            release_date: Some("2026-11-24".parse().expect("valid date")),
            release_address: Some(Address {
                lines: vec!["1 Invented Street".into()],
                city: "Northam".into(),
                postcode: "ZZ1 1ZZ".into(),
            }),
            no_fixed_abode: false,
        },
        registered_gp,
        diagnoses: Vec::new(),
        medications: vec![Medication {
            code: Code {
                system: DMD.into(),
                code: "39695411000001103".into(),
                display: "Paracetamol 500mg tablets".into(),
            },
            dose: "1 g".into(),
            route: "oral".into(),
            frequency: "four times daily when required".into(),
            supervised: false,
            as_needed: true,
            opioid_substitution: false,
            last_dose_given: None,
            days_supplied: Some(7),
        }],
        prescriptions: Vec::new(),
        allergies: Vec::new(),
        risks: Vec::new(),
        mental_health: None,
        substance_misuse: None,
        infections: Vec::new(),
        vaccinations: Vec::new(),
        follow_ups: vec![FollowUp {
            kind: FollowUpKind::Appointment,
            service: note.into(),
            date: None,
        }],
        consent: Consent {
            probation_sharing: ConsentDecision::Given,
            legal_basis: None,
            treatment_sharing: ConsentDecision::NotRecorded,
        },
        author: Author {
            name: "Dr Invented".into(),
            role: "Prison GP".into(),
            organisation: establishment,
        },
        authored_at: "2026-11-24T08:00:00Z".parse().expect("valid time"),
        not_read: Vec::new(),
    }
}
