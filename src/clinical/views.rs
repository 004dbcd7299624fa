//! Views: what each kind of recipient may receive of a summary.
//!
//! - `Full`: everything (GP practices, receiving prisons).
//! - `AdmissionNotice`: who, where, since when; nothing clinical.
//! - `Probation`: identity, release date and place, whether GP
//!   registration and treatment referrals are in place, and risk flags only
//!   where consent or a recorded legal basis allows. Nothing else leaves.

use super::model::{
    ClinicalSummary, Consent, FollowUp, FollowUpKind, MentalHealth, SubstanceMisuse,
};

/// What a recipient may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The whole summary.
    Full,
    /// An admission notice.
    AdmissionNotice,
    /// The probation view.
    Probation,
}

/// What `view` leaves out, one note per heading (the same whatever the
/// summary holds, so the list itself reveals nothing about the patient).
pub fn excluded(view: View) -> &'static [&'static str] {
    match view {
        View::Full => &[],
        View::AdmissionNotice => &[
            "diagnoses, medications, prescriptions, allergies, risks, mental_health, \
             substance_misuse, infections, vaccinations, follow_ups: \
             an admission notice carries no clinical content",
        ],
        View::Probation => &[
            "diagnoses, medications, prescriptions, allergies, mental_health, infections, \
             vaccinations: the probation view excludes clinical content",
            "custody.reception_date: the probation view excludes it",
            "risks: the probation view carries active risks only, without notes, \
             and only where consent or a recorded legal basis allows",
            "substance_misuse, follow_ups: the probation view carries only whether treatment \
             and onward care are in place",
        ],
    }
}

/// The summary cut down to `view`.
pub fn apply(summary: &ClinicalSummary, view: View) -> ClinicalSummary {
    match view {
        View::Full => summary.clone(),
        View::AdmissionNotice => ClinicalSummary {
            patient: summary.patient.clone(),
            custody: summary.custody.clone(),
            registered_gp: summary.registered_gp.clone(),
            diagnoses: Vec::new(),
            medications: Vec::new(),
            prescriptions: Vec::new(),
            allergies: Vec::new(),
            risks: Vec::new(),
            mental_health: None,
            substance_misuse: None,
            infections: Vec::new(),
            vaccinations: Vec::new(),
            follow_ups: Vec::new(),
            consent: summary.consent.clone(),
            author: summary.author.clone(),
            authored_at: summary.authored_at,
            not_read: summary.not_read.clone(),
        },
        View::Probation => {
            let referrals_in_place = summary
                .follow_ups
                .iter()
                .any(|f| f.kind == FollowUpKind::Referral);
            let in_treatment = summary
                .substance_misuse
                .as_ref()
                .is_some_and(|s| s.in_treatment);
            let mut custody = summary.custody.clone();
            custody.reception_date = None;
            ClinicalSummary {
                patient: summary.patient.clone(),
                custody,
                // Whether a GP registration is in place, not the clinical record.
                registered_gp: summary.registered_gp.clone(),
                diagnoses: Vec::new(),
                medications: Vec::new(),
                prescriptions: Vec::new(),
                allergies: Vec::new(),
                risks: if summary.may_share_risk_with_probation() {
                    summary
                        .risks
                        .iter()
                        .filter(|r| r.active)
                        .cloned()
                        .map(|mut r| {
                            r.note = None;
                            r
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                mental_health: None::<MentalHealth>,
                substance_misuse: in_treatment.then_some(SubstanceMisuse {
                    in_treatment: true,
                    community_service: None,
                }),
                infections: Vec::new(),
                vaccinations: Vec::new(),
                // That referrals are in place, not to which clinical services.
                follow_ups: if referrals_in_place {
                    vec![FollowUp {
                        kind: FollowUpKind::Referral,
                        service: "treatment referral in place".into(),
                        date: None,
                    }]
                } else {
                    Vec::new()
                },
                consent: Consent {
                    probation_sharing: summary.consent.probation_sharing,
                    legal_basis: summary.consent.legal_basis.clone(),
                },
                author: summary.author.clone(),
                authored_at: summary.authored_at,
                not_read: summary.not_read.clone(),
            }
        }
    }
}
