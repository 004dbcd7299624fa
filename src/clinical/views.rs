//! Views: what each kind of recipient may receive of a summary.
//!
//! - `Full`: everything (GP practices, receiving prisons).
//! - `AdmissionNotice`: who, where, since when; nothing clinical.
//! - `Probation`: identity, release date and place, whether GP
//!   registration and treatment referrals are in place, and risk flags only
//!   where consent or a recorded legal basis allows. Nothing else leaves.
//! - `SubstanceMisuseService`: identity, release date and place, the opioid
//!   substitution medicines (dose, last dose given; the delivery's deadline
//!   is the next dose), naloxone supplied, drug-related risks and diagnoses,
//!   the treatment section and follow-ups; nothing else clinical.
//! - `MentalHealthTeam`: identity, release date and place, mental health
//!   diagnoses and care plan, suicide and self-harm risks, psychotropic
//!   medicines, follow-ups.
//!
//! Routing sends the two treatment views only where consent or a recorded
//! legal basis allows (`ClinicalSummary::may_share_with_treatment_services`);
//! which items they recognise is in `treatment`.

use super::model::{
    ClinicalSummary, Consent, FollowUp, FollowUpKind, MentalHealth, RiskKind, SubstanceMisuse,
};
use super::treatment;

/// What a recipient may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The whole summary.
    Full,
    /// An admission notice.
    AdmissionNotice,
    /// The probation view.
    Probation,
    /// The community substance misuse service's view.
    SubstanceMisuseService,
    /// The community mental health team's view.
    MentalHealthTeam,
    /// A notice to a recipient that was given an earlier summary of this
    /// lineage which the correction no longer sends it: who it is about and
    /// that the earlier one no longer applies (`supersedes_handover_id`),
    /// nothing clinical (the correction may have withdrawn consent).
    Withdrawn,
}

/// Every view.
pub const ALL_VIEWS: [View; 6] = [
    View::Full,
    View::AdmissionNotice,
    View::Probation,
    View::SubstanceMisuseService,
    View::MentalHealthTeam,
    View::Withdrawn,
];

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
            "custody.reception_date, consent.treatment_sharing: the probation view excludes them",
            "risks: the probation view carries active risks of a named kind only, without \
             notes or codes, and only where consent or a recorded legal basis allows",
            "substance_misuse, follow_ups: the probation view carries only whether treatment \
             and onward care are in place",
        ],
        View::SubstanceMisuseService => &[
            "allergies, mental_health, infections, vaccinations: \
             the substance misuse service's view excludes them",
            "custody.reception_date: the substance misuse service's view excludes it",
            "consent.probation_sharing: a treatment service's view excludes probation's",
            "medications: only opioid substitution therapy",
            "prescriptions: only naloxone and opioid substitution supplies",
            "diagnoses: only substance-use disorders the gateway recognises by SNOMED CT code",
            "risks: only suicide, self-harm and vulnerability (overdose) risks, without notes",
            "follow_ups: not carried (free text that can name other services); \
             the patient's GP has them",
        ],
        View::MentalHealthTeam => &[
            "allergies, substance_misuse, infections, vaccinations: \
             the mental health team's view excludes them",
            "custody.reception_date: the mental health team's view excludes it",
            "consent.probation_sharing: a treatment service's view excludes probation's",
            "diagnoses: only mental disorders the gateway recognises by SNOMED CT code",
            "medications, prescriptions: only psychotropic medicines the gateway recognises by name",
            "risks: only suicide and self-harm, without notes",
            "follow_ups: not carried (free text that can name other services); \
             the patient's GP has them",
        ],
        View::Withdrawn => &[
            "everything clinical: this summary corrects one you were sent \
             (supersedes_handover_id), and nothing in it is for your service; \
             the earlier summary no longer applies: do not act on it",
            "custody.release_address, custody.no_fixed_abode, custody.reception_date: \
             a withdrawal notice says who and which custody event, not where the patient lives",
        ],
    }
}

/// Whether `view` gets the notes on what the sender's document held that
/// the gateway does not read. Those notes name elements by path, and a path
/// can say what was withheld (an HIV extension, a stopped medicine, a second
/// allergy), so only the patient's own clinicians (the full summary and the
/// GP's admission notice) get them; probation and the treatment services
/// get what their view carries and nothing about the rest.
#[must_use]
pub fn sees_document_notes(view: View) -> bool {
    matches!(view, View::Full | View::AdmissionNotice)
}

/// The summary cut down to `view`.
pub fn apply(summary: &ClinicalSummary, view: View) -> ClinicalSummary {
    match view {
        View::Full => summary.clone(),
        View::SubstanceMisuseService => substance_misuse_service(summary),
        View::MentalHealthTeam => mental_health_team(summary),
        View::Withdrawn => {
            // Who and which custody event, to find the earlier summary by:
            // not where the patient lives, which the correction may no
            // longer let this recipient know.
            let mut notice = identity_only(summary);
            notice.custody.release_address = None;
            notice.custody.no_fixed_abode = false;
            notice.custody.reception_date = None;
            notice
        }
        View::AdmissionNotice => ClinicalSummary {
            registered_gp: summary.registered_gp.clone(),
            consent: summary.consent.clone(),
            not_read: summary.not_read.clone(),
            ..identity_only(summary)
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
                    without_notes(kept(&summary.risks, |r| {
                        r.active && r.kind != RiskKind::Other
                    }))
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
                    // Probation's view says nothing of other services.
                    treatment_sharing: crate::clinical::model::ConsentDecision::NotRecorded,
                },
                author: summary.author.clone(),
                authored_at: summary.authored_at,
                not_read: Vec::new(),
            }
        }
    }
}

/// Who the summary is about, the custody episode and its author: nothing
/// clinical, no GP, no consent decision.
fn identity_only(summary: &ClinicalSummary) -> ClinicalSummary {
    ClinicalSummary {
        patient: summary.patient.clone(),
        custody: summary.custody.clone(),
        registered_gp: None,
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
        consent: Consent {
            probation_sharing: crate::clinical::model::ConsentDecision::NotRecorded,
            legal_basis: None,
            treatment_sharing: crate::clinical::model::ConsentDecision::NotRecorded,
        },
        author: summary.author.clone(),
        authored_at: summary.authored_at,
        not_read: Vec::new(),
    }
}

/// The substance misuse service's view.
fn substance_misuse_service(summary: &ClinicalSummary) -> ClinicalSummary {
    let mut custody = summary.custody.clone();
    custody.reception_date = None;
    ClinicalSummary {
        patient: summary.patient.clone(),
        custody,
        registered_gp: summary.registered_gp.clone(),
        diagnoses: kept(&summary.diagnoses, treatment::is_substance_use_diagnosis),
        medications: kept(&summary.medications, |m| m.opioid_substitution),
        prescriptions: kept(&summary.prescriptions, |p| {
            treatment::is_naloxone(p) || treatment::is_ost_prescription(p)
        }),
        allergies: Vec::new(),
        risks: without_notes(kept(&summary.risks, |r| {
            matches!(
                r.kind,
                RiskKind::Suicide | RiskKind::SelfHarm | RiskKind::Vulnerability
            )
        })),
        mental_health: None,
        substance_misuse: summary.substance_misuse.clone(),
        infections: Vec::new(),
        vaccinations: Vec::new(),
        follow_ups: Vec::new(),
        consent: treatment_consent(summary),
        author: summary.author.clone(),
        authored_at: summary.authored_at,
        not_read: Vec::new(),
    }
}

/// The community mental health team's view.
fn mental_health_team(summary: &ClinicalSummary) -> ClinicalSummary {
    let mut custody = summary.custody.clone();
    custody.reception_date = None;
    ClinicalSummary {
        patient: summary.patient.clone(),
        custody,
        registered_gp: summary.registered_gp.clone(),
        diagnoses: kept(&summary.diagnoses, treatment::is_mental_health_diagnosis),
        medications: kept(&summary.medications, treatment::is_psychotropic),
        prescriptions: kept(
            &summary.prescriptions,
            treatment::is_psychotropic_prescription,
        ),
        allergies: Vec::new(),
        risks: without_notes(kept(&summary.risks, |r| {
            matches!(r.kind, RiskKind::Suicide | RiskKind::SelfHarm)
        })),
        mental_health: summary.mental_health.clone(),
        substance_misuse: None,
        infections: Vec::new(),
        vaccinations: Vec::new(),
        follow_ups: Vec::new(),
        consent: treatment_consent(summary),
        author: summary.author.clone(),
        authored_at: summary.authored_at,
        not_read: Vec::new(),
    }
}

/// A treatment service's view of the consent: the decision on sharing with
/// treatment services and the legal basis (its copy may rest on it), never
/// what the patient decided for probation (as probation's view says
/// nothing of treatment services).
fn treatment_consent(summary: &ClinicalSummary) -> Consent {
    Consent {
        probation_sharing: crate::clinical::model::ConsentDecision::NotRecorded,
        legal_basis: summary.consent.legal_basis.clone(),
        treatment_sharing: summary.consent.treatment_sharing,
    }
}

/// Risk flags without their free-text notes or the sender's own coding: a
/// note (or a code's display) can name what the view withholds ("distress
/// at an HIV diagnosis"), and the kind and whether it is active are what
/// the service acts on.
fn without_notes(risks: Vec<super::model::RiskFlag>) -> Vec<super::model::RiskFlag> {
    risks
        .into_iter()
        .map(|mut r| {
            r.note = None;
            r.code = None;
            r
        })
        .collect()
}

fn kept<T: Clone>(items: &[T], keep: impl Fn(&T) -> bool) -> Vec<T> {
    items.iter().filter(|i| keep(i)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> ClinicalSummary {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/patients")
            .join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_substance_misuse_service_sees_ost_naloxone_and_drug_risks_only() {
        let mut s = fixture("06-many-medicines-and-allergies.json");
        let ost = fixture("01-ost-released-today.json");
        s.medications.extend(ost.medications.clone());
        s.diagnoses.extend(ost.diagnoses.clone());
        s.risks.extend(ost.risks.clone());
        s.substance_misuse.clone_from(&ost.substance_misuse);
        assert!(s.medications.len() > 1 && !s.allergies.is_empty());
        let v = apply(&s, View::SubstanceMisuseService);
        assert_eq!(
            v.medications, ost.medications,
            "OST only, dose and last dose kept"
        );
        assert_eq!(v.diagnoses, ost.diagnoses, "opioid dependence only");
        assert!(v.risks.iter().all(|r| r.kind != RiskKind::Violence));
        assert_eq!(
            v.risks.len(),
            s.risks
                .iter()
                .filter(|r| r.kind != RiskKind::Violence)
                .count()
        );
        assert!(v.allergies.is_empty() && v.infections.is_empty() && v.vaccinations.is_empty());
        assert!(v.mental_health.is_none() && v.custody.reception_date.is_none());
        assert_eq!(v.substance_misuse, ost.substance_misuse);
        assert_eq!(v.custody.release_date, s.custody.release_date);
        assert!(
            v.prescriptions
                .iter()
                .all(|p| treatment::is_naloxone(p) || treatment::is_ost_prescription(p))
        );
        // Free text can name what the view withholds (an HIV clinic, an
        // early-intervention-in-psychosis team): none of it travels.
        assert!(!s.follow_ups.is_empty() && v.follow_ups.is_empty());
        assert!(v.risks.iter().all(|r| r.note.is_none()));
    }

    #[test]
    fn the_mental_health_team_sees_mental_health_items_only() {
        let mut s = fixture("06-many-medicines-and-allergies.json");
        let sh = fixture("02-active-self-harm.json");
        s.medications.extend(sh.medications.clone());
        s.diagnoses.extend(sh.diagnoses.clone());
        let v = apply(&s, View::MentalHealthTeam);
        let names: Vec<&str> = v.medications.iter().map(|m| &*m.code.display).collect();
        assert_eq!(names, ["Sertraline 50mg tablets"]);
        let codes: Vec<&str> = v.diagnoses.iter().map(|d| &*d.code.code).collect();
        assert_eq!(codes, ["35489007"], "depressive disorder only");
        assert!(v.allergies.is_empty() && v.substance_misuse.is_none());
        let v = apply(&sh, View::MentalHealthTeam);
        assert_eq!(v.mental_health, sh.mental_health, "the care plan travels");
        assert!(!v.risks.is_empty());
        assert!(
            v.risks
                .iter()
                .all(|r| matches!(r.kind, RiskKind::Suicide | RiskKind::SelfHarm))
        );
    }

    #[test]
    fn a_withdrawal_notice_and_treatment_views_carry_no_more_than_theirs() {
        use crate::clinical::model::ConsentDecision;
        let mut s = fixture("01-ost-released-today.json");
        assert!(s.custody.release_address.is_some());
        s.custody.no_fixed_abode = true;
        s.consent.probation_sharing = ConsentDecision::Refused;
        s.consent.treatment_sharing = ConsentDecision::Given;
        s.consent.legal_basis = Some("safeguarding".into());
        let notice = apply(&s, View::Withdrawn);
        assert_eq!(notice.patient, s.patient);
        assert_eq!(notice.custody.establishment, s.custody.establishment);
        assert_eq!(notice.custody.release_date, s.custody.release_date);
        assert!(notice.custody.release_address.is_none());
        assert!(!notice.custody.no_fixed_abode && notice.custody.reception_date.is_none());
        for view in [View::SubstanceMisuseService, View::MentalHealthTeam] {
            let v = apply(&s, view);
            assert_eq!(
                v.consent.probation_sharing,
                ConsentDecision::NotRecorded,
                "{view:?}"
            );
            assert_eq!(v.consent.treatment_sharing, ConsentDecision::Given);
            assert_eq!(v.consent.legal_basis, s.consent.legal_basis, "{view:?}");
        }
    }

    #[test]
    fn the_substance_misuse_service_sees_take_out_opioid_substitution() {
        let mut s = fixture("01-ost-released-today.json");
        let supply = |display: &str| crate::clinical::model::Prescription {
            code: crate::clinical::model::Code {
                system: crate::clinical::model::DMD.into(),
                code: "1".into(),
                display: display.into(),
            },
            status: "active".into(),
            intent: "order".into(),
            authored_on: None,
            dosage: Some("60 mg once a day".into()),
            quantity: None,
            days_supplied: Some(3),
        };
        s.prescriptions = vec![
            supply("Methadone 1mg/ml oral solution sugar free"),
            supply("Paracetamol 500mg tablets"),
        ];
        let v = apply(&s, View::SubstanceMisuseService);
        let names: Vec<&str> = v.prescriptions.iter().map(|p| &*p.code.display).collect();
        assert_eq!(names, ["Methadone 1mg/ml oral solution sugar free"]);
    }

    #[test]
    fn every_view_lists_what_it_leaves_out() {
        for view in ALL_VIEWS {
            assert_eq!(excluded(view).is_empty(), view == View::Full, "{view:?}");
        }
    }
}
