//! Writing the summary as a FHIR R4 document Bundle: one resource per item,
//! serialised straight into one buffer, the Composition first.

use serde::Serialize;

use super::types::*;
use super::{
    ALLERGY_STATUS, CLINICAL_STATUS, EXT_DAYS_SUPPLIED, EXT_DOSE, EXT_LAST_DOSE, EXT_NOTE,
    EXT_TREATMENT_STARTED, SYS_CRN, SYS_EVENT, SYS_LOCAL, SYS_NHS, SYS_ODS, SYS_PRISON_NUMBER,
    SYS_RISK, dosage, event_code, prescription, uk_core,
};
use crate::clinical::JourneyEvent;
use crate::clinical::Rendered;
use crate::clinical::model::{
    ClinicalSummary, Code, ConsentDecision, Custody, FollowUpKind, Medication, RiskFlag, Severity,
    Sex,
};

/// A document Bundle under construction: each resource is serialised into
/// one buffer as soon as it is added. The Composition, which refers to all
/// of them, is written last and placed first.
struct Doc {
    entries: Vec<u8>,
}

impl Doc {
    fn add(&mut self, resource: &impl Serialize) -> String {
        let url = new_urn();
        self.entries.push(b',');
        write_entry(&mut self.entries, &url, resource);
        url
    }
}

/// A fresh `urn:uuid:` fullUrl.
fn new_urn() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let mut url = String::with_capacity(9 + id.len());
    url.push_str("urn:uuid:");
    url.push_str(id);
    url
}

fn write_entry(out: &mut Vec<u8>, full_url: &str, resource: &impl Serialize) {
    serde_json::to_writer(out, &EntryOut { full_url, resource }).expect("FHIR structs serialise");
}

/// A medicine's dosage: only the parts that hold a value, and none at all
/// when none does (FHIR forbids an empty element).
fn dosage(m: &Medication) -> Option<Dosage<'_>> {
    fn text(t: &str) -> Option<CodeableConcept<'_>> {
        (!is_blank(t)).then(|| CodeableConcept::text(t))
    }
    // The whole instruction in `text`, as R4 means it (a receiver may show
    // nothing else), the dose alone in our extension; with no dose, the
    // parts alone (a text would be read back as the dose).
    let words =
        dosage::instruction_in_words(&m.dose, &m.frequency, &m.route, m.supervised, m.as_needed);
    let instruction = (!is_blank(&m.dose)).then_some(words);
    let dose_alone = instruction.as_deref().is_some_and(|t| t != m.dose.trim());
    let d = Dosage {
        extension: if dose_alone {
            vec![Extension {
                url: EXT_DOSE.into(),
                value_string: Some(m.dose.as_str().into()),
                ..Extension::default()
            }]
        } else {
            Vec::new()
        },
        sequence: None,
        text: instruction.map(Into::into),
        additional_instruction: if m.supervised {
            vec![local("supervised", "Supervised consumption")]
        } else {
            Vec::new()
        },
        timing: text(&m.frequency).map(|code| Timing {
            code: Some(code),
            repeat: None,
        }),
        route: text(&m.route),
        as_needed_boolean: m.as_needed.then_some(true),
        as_needed_codeable_concept: None,
        dose_and_rate: Vec::new(),
    };
    let empty = is_blank(&m.dose)
        && d.additional_instruction.is_empty()
        && d.timing.is_none()
        && d.route.is_none()
        && !m.as_needed;
    (!empty).then_some(d)
}

pub(super) fn code_cc(c: &Code) -> CodeableConcept<'_> {
    if c.is_words_only() {
        return CodeableConcept::text(&c.display);
    }
    CodeableConcept::coded(&c.system, &c.code, &c.display)
}

fn local<'a>(code: &'a str, display: &'a str) -> CodeableConcept<'a> {
    CodeableConcept::coded(SYS_LOCAL, code, display)
}

fn org(ods: &str) -> Organization<'_> {
    Organization {
        resource_type: "Organization".into(),
        meta: Meta::profile(uk_core::ORGANIZATION),
        identifier: vec![Identifier {
            use_: None,
            system: Some(SYS_ODS.into()),
            value: Some(ods.into()),
        }],
        name: None,
    }
}

fn observation<'a>(
    code: CodeableConcept<'a>,
    category: &'a str,
    subject: &Reference<'a>,
) -> Observation<'a> {
    Observation {
        resource_type: "Observation".into(),
        meta: Meta::profile(uk_core::OBSERVATION),
        extension: Vec::new(),
        status: "final".into(),
        category: vec![local(category, category)],
        code,
        subject: Some(subject.clone()),
        value_string: None,
        value_boolean: None,
    }
}

/// Renders `s` as a FHIR R4 document Bundle for `event`.
///
/// Resources borrow their text from `s` and are serialised straight into
/// one buffer; nothing goes through `serde_json::Value`.
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    let mut not_carried = Vec::new();
    let mut doc = Doc {
        entries: Vec::with_capacity(8 * 1024),
    };
    let patient_url = add_patient(&mut doc, s);
    let subject = Reference::to(patient_url.as_str());
    let encounter_url = add_encounter(&mut doc, &s.custody, &subject, &mut not_carried);
    let encounter = Reference::to(encounter_url.as_str());
    let sections = add_sections(
        &mut doc,
        s,
        &subject,
        encounter_url.clone(),
        &mut not_carried,
    );
    let (author_org, author_url) = add_author(&mut doc, s);
    let authored_at = s.authored_at.to_string();
    let event_display = event.to_string();
    let composition = Composition {
        resource_type: "Composition".into(),
        meta: Meta::profile(uk_core::COMPOSITION),
        status: "final".into(),
        type_: CodeableConcept::coded("http://snomed.info/sct", "373942005", "Discharge summary"),
        subject,
        date: authored_at.as_str().into(),
        author: vec![Reference::to(author_url.as_str())],
        title: format!("Throughcare {} summary", event_code(event)).into(),
        custodian: Some(Reference::to(author_org.as_str())),
        encounter: Some(encounter),
        event: vec![CompositionEvent {
            code: vec![CodeableConcept::coded(
                SYS_EVENT,
                event_code(event),
                &event_display,
            )],
        }],
        section: sections,
    };
    let bundle_id = new_urn();
    let mut bytes = Vec::with_capacity(doc.entries.len() + 4 * 1024);
    serde_json::to_writer(
        &mut bytes,
        &BundleHead {
            resource_type: "Bundle",
            identifier: Identifier {
                use_: None,
                system: Some("urn:ietf:rfc:3986".into()),
                value: Some(bundle_id.as_str().into()),
            },
            type_: "document",
            timestamp: &authored_at,
        },
    )
    .expect("bundle serialises");
    // Reopen the head's object to append the entries, Composition first.
    bytes.pop();
    bytes.extend_from_slice(b",\"entry\":[");
    write_entry(&mut bytes, &new_urn(), &composition);
    bytes.extend_from_slice(&doc.entries);
    bytes.extend_from_slice(b"]}");
    if s.consent.treatment_sharing != ConsentDecision::NotRecorded {
        not_carried.push(crate::clinical::model::TREATMENT_SHARING_NOT_CARRIED.into());
    }
    Rendered { bytes, not_carried }
}

/// Every heading's resources, and the sections that list them (a heading
/// with nothing to list has no section).
fn add_sections(
    doc: &mut Doc,
    s: &ClinicalSummary,
    subject: &Reference<'_>,
    encounter_url: String,
    not_carried: &mut Vec<String>,
) -> Vec<Section<'static>> {
    // Medicines first: they matter most on transfer and release.
    let mut meds = add_medications(doc, s, subject);
    for p in &s.prescriptions {
        meds.push(doc.add(&prescription::to_fhir(p, subject)));
    }
    let headings = [
        ("medications", "Medications and medical devices", meds),
        (
            "allergies",
            "Allergies and adverse reactions",
            add_allergies(doc, s, subject, not_carried),
        ),
        (
            "risks",
            "Risks to the person or others",
            add_risks(doc, s, subject),
        ),
        (
            "problems",
            "Problems and issues",
            add_problems(doc, s, subject),
        ),
        (
            "infections",
            "Infectious diseases",
            add_infections(doc, s, subject),
        ),
        (
            "vaccinations",
            "Vaccinations",
            add_vaccinations(doc, s, subject),
        ),
        (
            "mental-health",
            "Mental health",
            add_mental_health(doc, s, subject),
        ),
        (
            "substance-misuse",
            "Substance misuse",
            add_substance_misuse(doc, s, subject),
        ),
        (
            "plan",
            "Plan and requested actions",
            add_plan(doc, s, subject),
        ),
        ("consent", "Consent", vec![add_consent(doc, s, subject)]),
        ("custody", "Custody episode", vec![encounter_url]),
    ];
    headings
        .into_iter()
        .filter(|(_, _, entries)| !entries.is_empty())
        .map(|(code, title, entries)| {
            let (system, code, display) = uk_core::heading(code, title);
            Section {
                title: Some(title.into()),
                code: Some(CodeableConcept::coded(system, code, display)),
                entry: entries.into_iter().map(Reference::to).collect(),
            }
        })
        .collect()
}

/// The Patient (after the registered GP's Organization, which it refers to).
fn add_patient(doc: &mut Doc, s: &ClinicalSummary) -> String {
    let p = &s.patient;
    let identifier = [
        (SYS_NHS, p.nhs_number.as_ref().map(|n| n.as_str())),
        (
            SYS_PRISON_NUMBER,
            p.prison_number.as_ref().map(|n| n.as_str()),
        ),
        (SYS_CRN, p.crn.as_ref().map(|n| n.as_str())),
    ]
    .into_iter()
    .filter_map(|(system, value)| {
        value.map(|v| Identifier {
            use_: None,
            system: Some(system.into()),
            value: Some(v.into()),
        })
    })
    .collect();
    let gp_url = s
        .registered_gp
        .as_ref()
        .map(|gp| doc.add(&org(gp.as_str())));
    let c = &s.custody;
    doc.add(&Patient {
        resource_type: "Patient".into(),
        meta: Meta::profile(uk_core::PATIENT),
        identifier,
        name: Some(HumanName {
            use_: None,
            text: None,
            family: Some(p.family_name.as_str().into()),
            given: p.given_names.iter().map(|g| g.as_str().into()).collect(),
            period: None,
        })
        .filter(|n| {
            !n.family.as_deref().is_none_or(is_blank) || !n.given.iter().all(|g| is_blank(g))
        })
        .into_iter()
        .collect(),
        gender: Some(
            match p.sex {
                Sex::Male => "male",
                Sex::Female => "female",
                Sex::Other => "other",
                Sex::Unknown => "unknown",
            }
            .into(),
        ),
        birth_date: Some(p.date_of_birth.to_string().into()),
        address: c
            .release_address
            .iter()
            .map(|a| Address {
                text: None,
                use_: Some("home".into()),
                line: a.lines.iter().map(|l| l.as_str().into()).collect(),
                city: Some(a.city.as_str().into()),
                postal_code: Some(a.postcode.as_str().into()),
                period: None,
            })
            .collect(),
        general_practitioner: gp_url.iter().map(|u| Reference::to(u.as_str())).collect(),
        active: None,
        deceased_boolean: None,
        deceased_date_time: None,
        link: Vec::new(),
    })
}

/// The custody episode as an Encounter, after the Organizations it names.
fn add_encounter(
    doc: &mut Doc,
    c: &Custody,
    subject: &Reference<'_>,
    not_carried: &mut Vec<String>,
) -> String {
    let establishment_url = doc.add(&org(c.establishment.as_str()));
    let destination = c
        .transfer_to
        .as_ref()
        .map(|t| Reference::to(doc.add(&org(t.as_str()))));
    let end = match (c.transfer_at, c.release_date) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(d)) => Some(d.to_string()),
        (None, None) => None,
    };
    if c.transfer_at.is_some() && c.release_date.is_some() {
        not_carried.push("custody.release_date: a transfer's episode ends at the transfer".into());
    }
    let disposition = c
        .no_fixed_abode
        .then(|| local("no-fixed-abode", "No fixed abode"));
    doc.add(&Encounter {
        resource_type: "Encounter".into(),
        meta: Meta::profile(uk_core::ENCOUNTER),
        status: if end.is_some() {
            "finished"
        } else {
            "in-progress"
        }
        .into(),
        class: Coding {
            system: Some("http://terminology.hl7.org/CodeSystem/v3-ActCode".into()),
            code: Some("IMP".into()),
            display: Some("inpatient encounter".into()),
        },
        subject: Some(subject.clone()),
        period: Some(Period {
            start: c.reception_date.map(|d| d.to_string().into()),
            end: end.map(Into::into),
        })
        .filter(|p| p.start.is_some() || p.end.is_some()),
        service_provider: Some(Reference::to(establishment_url.as_str())),
        hospitalization: (destination.is_some() || disposition.is_some()).then_some(
            Hospitalization {
                destination,
                discharge_disposition: disposition,
            },
        ),
    })
}

/// Medicines as MedicationStatements.
fn add_medications(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.medications
        .iter()
        .map(|m| {
            let mut extension = Vec::new();
            if let Some(t) = m.last_dose_given {
                extension.push(Extension {
                    url: EXT_LAST_DOSE.into(),
                    value_date_time: Some(t.to_string().into()),
                    ..Extension::default()
                });
            }
            if let Some(d) = m.days_supplied {
                extension.push(Extension {
                    url: EXT_DAYS_SUPPLIED.into(),
                    value_integer: Some(i64::from(d)),
                    ..Extension::default()
                });
            }
            doc.add(&MedicationStatement {
                resource_type: "MedicationStatement".into(),
                meta: Meta::profile(uk_core::MEDICATION_STATEMENT),
                extension,
                status: "active".into(),
                category: m
                    .opioid_substitution
                    .then(|| local("opioid-substitution", "Opioid substitution therapy")),
                medication_codeable_concept: Some(code_cc(&m.code)),
                medication_reference: None,
                subject: subject.clone(),
                dosage: dosage(m).into_iter().collect(),
            })
        })
        .collect()
}

/// Allergies as AllergyIntolerances.
fn add_allergies(
    doc: &mut Doc,
    s: &ClinicalSummary,
    subject: &Reference<'_>,
    not_carried: &mut Vec<String>,
) -> Vec<String> {
    s.allergies
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if a.reaction.as_deref().is_none_or(is_blank) && a.severity.is_some() {
                not_carried.push(format!(
                    "allergies[{i}].severity: FHIR carries severity only with a reaction"
                ));
            }
            doc.add(&AllergyIntolerance {
                resource_type: "AllergyIntolerance".into(),
                meta: Meta::profile(uk_core::ALLERGY_INTOLERANCE),
                clinical_status: Some(CodeableConcept::coded(ALLERGY_STATUS, "active", "Active")),
                code: Some(code_cc(&a.substance)),
                patient: subject.clone(),
                reaction: a
                    .reaction
                    .iter()
                    .filter(|r| !is_blank(r))
                    .map(|r| Reaction {
                        substance: None,
                        manifestation: vec![CodeableConcept::text(r)],
                        severity: a.severity.map(|s| {
                            match s {
                                Severity::Mild => "mild",
                                Severity::Moderate => "moderate",
                                Severity::Severe => "severe",
                            }
                            .into()
                        }),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// Risks as Flags.
fn add_risks(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.risks
        .iter()
        .map(|r| {
            doc.add(&Flag {
                resource_type: "Flag".into(),
                meta: Meta::profile(uk_core::FLAG),
                extension: r
                    .note
                    .iter()
                    .filter(|n| !is_blank(n))
                    .map(|n| Extension {
                        url: EXT_NOTE.into(),
                        value_string: Some(n.as_str().into()),
                        ..Extension::default()
                    })
                    .collect(),
                status: if r.active { "active" } else { "inactive" }.into(),
                code: risk_code(r),
                subject: subject.clone(),
            })
        })
        .collect()
}

/// A risk's code: the gateway's own kind, then the code the sender recorded
/// (a receiver that knows SNOMED CT reads that one).
fn risk_code(r: &RiskFlag) -> CodeableConcept<'_> {
    let mut cc = CodeableConcept::coded(SYS_RISK, r.kind.code(), r.kind.code());
    cc.coding.extend(
        r.code
            .as_ref()
            .and_then(|c| code_cc(c).coding.into_iter().next()),
    );
    cc
}

/// Diagnoses as Conditions.
fn add_problems(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.diagnoses
        .iter()
        .map(|d| {
            doc.add(&Condition {
                resource_type: "Condition".into(),
                meta: Meta::profile(uk_core::CONDITION),
                clinical_status: Some(if d.active {
                    CodeableConcept::coded(CLINICAL_STATUS, "active", "Active")
                } else {
                    CodeableConcept::coded(CLINICAL_STATUS, "inactive", "Inactive")
                }),
                code: code_cc(&d.code),
                subject: subject.clone(),
                onset_date_time: d.onset.as_ref().map(|o| o.to_string().into()),
            })
        })
        .collect()
}

/// Infections as Observations.
fn add_infections(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.infections
        .iter()
        .map(|i| {
            let mut o = observation(code_cc(&i.code), "infectious-disease", subject);
            o.value_string = Some(i.status.as_str().into());
            o.extension = i
                .treatment_started
                .iter()
                .map(|d| Extension {
                    url: EXT_TREATMENT_STARTED.into(),
                    value_date: Some(d.to_string().into()),
                    ..Extension::default()
                })
                .collect();
            doc.add(&o)
        })
        .collect()
}

/// Vaccinations as Immunizations.
fn add_vaccinations(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.vaccinations
        .iter()
        .map(|v| {
            doc.add(&Immunization {
                resource_type: "Immunization".into(),
                meta: Meta::profile(uk_core::IMMUNIZATION),
                status: "completed".into(),
                vaccine_code: code_cc(&v.code),
                patient: subject.clone(),
                occurrence_date_time: v.date.to_string().into(),
            })
        })
        .collect()
}

/// Mental health as Observations (care programme approach, coordinator).
fn add_mental_health(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    let mut mh = Vec::new();
    if let Some(m) = &s.mental_health {
        let mut o = observation(
            local("care-programme-approach", "Care programme approach"),
            "mental-health",
            subject,
        );
        o.value_boolean = Some(m.care_programme_approach);
        mh.push(doc.add(&o));
        if let Some(cc) = m.care_coordinator.as_ref().filter(|c| !is_blank(c)) {
            let mut o = observation(
                local("care-coordinator", "Care coordinator"),
                "mental-health",
                subject,
            );
            o.value_string = Some(cc.as_str().into());
            mh.push(doc.add(&o));
        }
    }
    mh
}

/// Substance misuse as Observations (in treatment, community service).
fn add_substance_misuse(
    doc: &mut Doc,
    s: &ClinicalSummary,
    subject: &Reference<'_>,
) -> Vec<String> {
    let mut sm = Vec::new();
    if let Some(t) = &s.substance_misuse {
        let mut o = observation(
            local("substance-misuse-treatment", "Substance misuse treatment"),
            "substance-misuse",
            subject,
        );
        o.value_boolean = Some(t.in_treatment);
        sm.push(doc.add(&o));
        if let Some(svc) = t.community_service.as_ref().filter(|c| !is_blank(c)) {
            let mut o = observation(
                local(
                    "substance-misuse-service",
                    "Community substance misuse service",
                ),
                "substance-misuse",
                subject,
            );
            o.value_string = Some(svc.as_str().into());
            sm.push(doc.add(&o));
        }
    }
    sm
}

/// Follow-ups as ServiceRequests.
fn add_plan(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> Vec<String> {
    s.follow_ups
        .iter()
        .map(|f| {
            let (code, display) = match f.kind {
                FollowUpKind::Appointment => ("appointment", "Appointment"),
                FollowUpKind::Referral => ("referral", "Referral"),
            };
            doc.add(&ServiceRequest {
                resource_type: "ServiceRequest".into(),
                meta: Meta::profile(uk_core::SERVICE_REQUEST),
                status: "active".into(),
                intent: "order".into(),
                category: vec![local(code, display)],
                code: (!is_blank(&f.service)).then(|| CodeableConcept::text(&f.service)),
                subject: subject.clone(),
                occurrence_date_time: f.date.as_ref().map(|d| d.to_string().into()),
            })
        })
        .collect()
}

/// The probation-sharing decision as a Consent.
fn add_consent(doc: &mut Doc, s: &ClinicalSummary, subject: &Reference<'_>) -> String {
    let consent = &s.consent;
    doc.add(&Consent {
        resource_type: "Consent".into(),
        meta: Meta::profile(uk_core::CONSENT),
        status: match consent.probation_sharing {
            ConsentDecision::NotRecorded => "proposed",
            _ => "active",
        }
        .into(),
        scope: CodeableConcept::coded(
            "http://terminology.hl7.org/CodeSystem/consentscope",
            "patient-privacy",
            "Privacy Consent",
        ),
        category: vec![local("probation-sharing", "Sharing with probation")],
        patient: Some(subject.clone()),
        policy_rule: Some(match &consent.legal_basis {
            Some(basis) => CodeableConcept {
                coding: vec![Coding {
                    system: Some(SYS_LOCAL.into()),
                    code: Some("legal-basis".into()),
                    display: Some("Recorded legal basis".into()),
                }],
                text: Some(basis.as_str().into()),
            },
            None => local("patient-decision", "Patient decision"),
        }),
        provision: match consent.probation_sharing {
            ConsentDecision::Given => Some(Provision {
                type_: Some("permit".into()),
            }),
            ConsentDecision::Refused => Some(Provision {
                type_: Some("deny".into()),
            }),
            ConsentDecision::NotRecorded => None,
        },
    })
}

/// The authoring Organization, and the Practitioner when a name or role is
/// given (else the organisation is the author): their fullUrls.
fn add_author(doc: &mut Doc, s: &ClinicalSummary) -> (String, String) {
    let author_org = doc.add(&org(s.author.organisation.as_str()));
    // With neither name nor role, the organisation is the author.
    let (name, role) = (&s.author.name, &s.author.role);
    let author_url = if is_blank(name) && is_blank(role) {
        author_org.clone()
    } else {
        doc.add(&Practitioner {
            resource_type: "Practitioner".into(),
            meta: Meta::profile(uk_core::PRACTITIONER),
            name: (!is_blank(name))
                .then(|| HumanName {
                    use_: None,
                    text: Some(name.as_str().into()),
                    family: None,
                    given: Vec::new(),
                    period: None,
                })
                .into_iter()
                .collect(),
            qualification: (!is_blank(role))
                .then(|| Qualification {
                    code: CodeableConcept::text(role),
                })
                .into_iter()
                .collect(),
        })
    };

    (author_org, author_url)
}
