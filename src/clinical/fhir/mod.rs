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

mod index;
mod prescription;
mod types;
mod uk_core;
mod unread;

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::model::{
    Allergy, Author, ClinicalSummary, Code, ConsentDecision, Custody, Date, DateTime, Diagnosis,
    FollowUp, FollowUpKind, Infection, Medication, MentalHealth, RiskFlag, RiskKind, Severity, Sex,
    SubstanceMisuse, Vaccination,
};
use super::violation::ValidationErrors;
use super::{Limits, Rendered};
use crate::journey::JourneyEvent;
use index::Index;
use types::*;

/// UK Core NHS number system.
pub const SYS_NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// UK Core ODS organisation code system.
pub const SYS_ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const LOCAL: &str = "https://throughcare.invalid/fhir";
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
const ALLERGY_STATUS: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";

fn event_code(e: JourneyEvent) -> &'static str {
    match e {
        JourneyEvent::Admission => "admission",
        JourneyEvent::Transfer => "transfer",
        JourneyEvent::Release => "release",
        JourneyEvent::CommunitySummary => "community-summary",
    }
}

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
    let d = Dosage {
        text: Some(m.dose.as_str().into()),
        additional_instruction: if m.supervised {
            vec![local("supervised", "Supervised consumption")]
        } else {
            Vec::new()
        },
        timing: text(&m.frequency).map(|code| Timing { code: Some(code) }),
        route: text(&m.route),
    };
    let empty = is_blank(&m.dose)
        && d.additional_instruction.is_empty()
        && d.timing.is_none()
        && d.route.is_none();
    (!empty).then_some(d)
}

fn code_cc(c: &Code) -> CodeableConcept<'_> {
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
        subject: subject.clone(),
        value_string: None,
        value_boolean: None,
    }
}

/// Renders `s` as a FHIR R4 document Bundle for `event`.
///
/// Resources borrow their text from `s` and are serialised straight into
/// one buffer; nothing goes through `serde_json::Value`.
#[allow(clippy::too_many_lines)]
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    let mut not_carried = Vec::new();
    let mut doc = Doc {
        entries: Vec::with_capacity(8 * 1024),
    };

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
    let patient_url = doc.add(&Patient {
        resource_type: "Patient".into(),
        meta: Meta::profile(uk_core::PATIENT),
        identifier,
        name: Some(HumanName {
            text: None,
            family: Some(p.family_name.as_str().into()),
            given: p.given_names.iter().map(|g| g.as_str().into()).collect(),
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
                use_: Some("home".into()),
                line: a.lines.iter().map(|l| l.as_str().into()).collect(),
                city: Some(a.city.as_str().into()),
                postal_code: Some(a.postcode.as_str().into()),
            })
            .collect(),
        general_practitioner: gp_url.iter().map(|u| Reference::to(u.as_str())).collect(),
    });
    let subject = Reference::to(patient_url.as_str());

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
    let encounter_url = doc.add(&Encounter {
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
    });

    let mut sections: Vec<Section<'static>> = Vec::new();
    let mut section = |code: &'static str, title: &'static str, entries: Vec<String>| {
        if !entries.is_empty() {
            let (system, code, display) = uk_core::heading(code, title);
            sections.push(Section {
                title: Some(title.into()),
                code: Some(CodeableConcept::coded(system, code, display)),
                entry: entries.into_iter().map(Reference::to).collect(),
            });
        }
    };

    // Medicines first: they matter most on transfer and release.
    let meds: Vec<String> = s
        .medications
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
                medication_codeable_concept: code_cc(&m.code),
                subject: subject.clone(),
                dosage: dosage(m).into_iter().collect(),
            })
        })
        .collect();
    let mut meds = meds;
    for p in &s.prescriptions {
        meds.push(doc.add(&prescription::to_fhir(p, &subject)));
    }
    section("medications", "Medications and medical devices", meds);

    let allergies: Vec<String> = s
        .allergies
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
                code: code_cc(&a.substance),
                patient: subject.clone(),
                reaction: a
                    .reaction
                    .iter()
                    .filter(|r| !is_blank(r))
                    .map(|r| Reaction {
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
        .collect();
    section("allergies", "Allergies and adverse reactions", allergies);

    let risks: Vec<String> = s
        .risks
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
                code: CodeableConcept::coded(SYS_RISK, r.kind.code(), r.kind.code()),
                subject: subject.clone(),
            })
        })
        .collect();
    section("risks", "Risks to the person or others", risks);

    let problems: Vec<String> = s
        .diagnoses
        .iter()
        .map(|d| {
            doc.add(&Condition {
                resource_type: "Condition".into(),
                meta: Meta::profile(uk_core::CONDITION),
                clinical_status: Some(if d.active {
                    CodeableConcept::coded(CLINICAL_STATUS, "active", "Active")
                } else {
                    CodeableConcept::coded(CLINICAL_STATUS, "resolved", "Resolved")
                }),
                code: code_cc(&d.code),
                subject: subject.clone(),
                onset_date_time: d.onset.as_ref().map(|o| o.to_string().into()),
            })
        })
        .collect();
    section("problems", "Problems and issues", problems);

    let infections: Vec<String> = s
        .infections
        .iter()
        .map(|i| {
            let mut o = observation(code_cc(&i.code), "infectious-disease", &subject);
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
        .collect();
    section("infections", "Infectious diseases", infections);

    let vaccinations: Vec<String> = s
        .vaccinations
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
        .collect();
    section("vaccinations", "Vaccinations", vaccinations);

    let mut mh = Vec::new();
    if let Some(m) = &s.mental_health {
        let mut o = observation(
            local("care-programme-approach", "Care programme approach"),
            "mental-health",
            &subject,
        );
        o.value_boolean = Some(m.care_programme_approach);
        mh.push(doc.add(&o));
        if let Some(cc) = m.care_coordinator.as_ref().filter(|c| !is_blank(c)) {
            let mut o = observation(
                local("care-coordinator", "Care coordinator"),
                "mental-health",
                &subject,
            );
            o.value_string = Some(cc.as_str().into());
            mh.push(doc.add(&o));
        }
    }
    section("mental-health", "Mental health", mh);

    let mut sm = Vec::new();
    if let Some(t) = &s.substance_misuse {
        let mut o = observation(
            local("substance-misuse-treatment", "Substance misuse treatment"),
            "substance-misuse",
            &subject,
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
                &subject,
            );
            o.value_string = Some(svc.as_str().into());
            sm.push(doc.add(&o));
        }
    }
    section("substance-misuse", "Substance misuse", sm);

    let plan: Vec<String> = s
        .follow_ups
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
        .collect();
    section("plan", "Plan and requested actions", plan);

    let consent = &s.consent;
    let consent_url = doc.add(&Consent {
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
        patient: subject.clone(),
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
                type_: "permit".into(),
            }),
            ConsentDecision::Refused => Some(Provision {
                type_: "deny".into(),
            }),
            ConsentDecision::NotRecorded => None,
        },
    });
    section("consent", "Consent", vec![consent_url]);
    section("custody", "Custody episode", vec![encounter_url]);

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
                    text: Some(name.as_str().into()),
                    family: None,
                    given: Vec::new(),
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
    let _ = LOCAL;
    Rendered { bytes, not_carried }
}

/// Deepest JSON nesting in `bytes`, counting only brackets outside strings.
/// Strings are skipped with `memchr`: most of a document is inside them.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                i += 1;
                loop {
                    match bytes
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        // An escape: skip the escaped byte too.
                        Some(k) if bytes[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k + 1;
                            break;
                        }
                        // Unterminated: the rest is inside the string.
                        None => return max,
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

/// Parses into `T`, reporting the failing path under `prefix`.
///
/// Plain serde_json first: a valid resource costs one pass and borrows its
/// strings from the input. Only a resource that fails is read again with
/// path tracking, which yields the same result and names the failing field.
fn typed<'a, T: Deserialize<'a>>(
    json: &'a str,
    prefix: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<T> {
    match serde_json::from_str(json) {
        Ok(t) => Some(t),
        Err(_) => {
            report_typed::<T>(json, &prefix.to_string(), errors);
            None
        }
    }
}

/// Reads `json` as `T` again, tracking the path, and records why it fails.
#[cold]
fn report_typed<'a, T: Deserialize<'a>>(
    json: &'a str,
    prefix: &str,
    errors: &mut ValidationErrors,
) {
    let mut de = serde_json::Deserializer::from_str(json);
    let e = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => {
            // Only trailing characters after a valid value get here.
            errors.add(prefix.trim_end_matches('.'), "unreadable value");
            return;
        }
        Err(e) => e,
    };
    let path = e.path().to_string();
    let field = if path == "." {
        prefix.trim_end_matches('.').to_owned()
    } else {
        format!("{prefix}{path}")
    };
    // serde's messages can quote input values; keep only the kind of problem.
    let inner = e.into_inner().to_string();
    let description = if inner.starts_with("missing field") {
        inner.split(" at line").next().unwrap_or(&inner).to_owned()
    } else if inner.starts_with("invalid type") {
        let expected = inner.split("expected ").nth(1).unwrap_or("another type");
        format!(
            "wrong type: expected {}",
            expected.split(" at line").next().unwrap_or(expected)
        )
    } else {
        "unreadable value".to_owned()
    };
    errors.add(field, description);
}

/// What a parsed Bundle said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The summary.
    pub summary: ClinicalSummary,
    /// The journey event from `Composition.event`, if given.
    pub event: Option<JourneyEvent>,
}

/// Parses a FHIR R4 document Bundle (or a message Bundle wrapping one).
///
/// # Errors
/// Every field violation found, with its path.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Parsed, ValidationErrors> {
    if bytes.len() > limits.max_document_bytes {
        return Err(ValidationErrors::one(
            "document",
            format!(
                "{} bytes is over the {}-byte limit",
                bytes.len(),
                limits.max_document_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ValidationErrors::one(
            "document",
            format!("not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    if json_depth(bytes) > limits.max_json_depth {
        return Err(ValidationErrors::one(
            "document",
            format!("JSON nested deeper than {} levels", limits.max_json_depth),
        ));
    }
    // One pass reads the Bundle and checks the whole document is JSON; only
    // when it fails do we ask which way (syntax first, then shape).
    let bundle: RawBundle = match serde_json::from_str(text) {
        Ok(bundle) => bundle,
        Err(_) => {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
                return Err(ValidationErrors::one(
                    "document",
                    format!("not valid JSON (line {}, column {})", e.line(), e.column()),
                ));
            }
            let mut errors = ValidationErrors::default();
            report_typed::<RawBundle>(text, "", &mut errors);
            return Err(errors);
        }
    };
    if bundle.resource_type != "Bundle" {
        return Err(ValidationErrors::one("resourceType", "must be Bundle"));
    }
    let mut errors = ValidationErrors::default();
    match &*bundle.type_ {
        "document" => parse_document(&bundle, "", &mut errors).map(|mut p| {
            let mut notes = unread::bundle(text, "");
            notes.append(&mut p.summary.not_read);
            p.summary.not_read = notes;
            p
        }),
        "message" => {
            let inner = bundle
                .entry
                .iter()
                .enumerate()
                .find(|(_, e)| kind_of(e.resource).as_deref() == Some("Bundle"));
            match inner {
                Some((i, e)) => {
                    let prefix = format!("entry[{i}].resource.");
                    match typed::<RawBundle>(e.resource.get(), &prefix, &mut errors) {
                        Some(doc) if doc.type_ == "document" => {
                            parse_document(&doc, &prefix, &mut errors).map(|mut p| {
                                let mut notes = unread::bundle(text, "");
                                notes.extend(unread::bundle(e.resource.get(), &prefix));
                                notes.extend(message_entries(&bundle, i));
                                notes.append(&mut p.summary.not_read);
                                p.summary.not_read = notes;
                                p
                            })
                        }
                        Some(_) => {
                            errors.add(
                                format!("{prefix}type"),
                                "the wrapped Bundle must be a document",
                            );
                            None
                        }
                        None => None,
                    }
                }
                None => {
                    errors.add("entry", "a message Bundle must wrap a document Bundle");
                    None
                }
            }
        }
        _ => {
            errors.add("type", "must be document (or message wrapping a document)");
            None
        }
    }
    .filter(|_| errors.0.is_empty())
    .ok_or(errors)
}

/// The entries of a message Bundle around the document it wraps (the
/// MessageHeader and the like): transport, listed as not read.
fn message_entries(bundle: &RawBundle<'_>, document: usize) -> Vec<String> {
    bundle
        .entry
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != document)
        .map(|(k, e)| {
            let kind = kind_of(e.resource);
            format!(
                "entry[{k}].resource ({}): not read: the message around the document",
                unread::safe_name(kind.as_deref().unwrap_or(""))
            )
        })
        .collect()
}

/// A resource's type. Looks first where every Bundle we write (and most
/// senders) put it, `{"resourceType":"…"`, and reads the resource only when
/// it is elsewhere or escaped.
fn kind_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    if let Some(rest) = json.strip_prefix("{\"resourceType\":\"")
        && let Some(end) = rest.find(['"', '\\'])
        && rest.as_bytes()[end] == b'"'
    {
        return Some(Cow::Borrowed(&rest[..end]));
    }
    serde_json::from_str::<Kind>(json).ok()?.resource_type
}

fn ods_of<'o>(o: &'o Organization<'_>) -> Option<&'o str> {
    o.identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(SYS_ODS))
        .and_then(|i| i.value.as_deref())
}

fn owned(v: Option<&Cow<'_, str>>) -> String {
    v.map(|s| s.to_string()).unwrap_or_default()
}

fn parse_code(
    cc: &CodeableConcept,
    field: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Code> {
    match cc
        .coding
        .iter()
        .find(|c| c.system.is_some() && c.code.is_some())
    {
        Some(c) => Some(Code {
            system: owned(c.system.as_ref()),
            code: owned(c.code.as_ref()),
            display: owned(c.display.as_ref().or(cc.text.as_ref())),
        }),
        None => {
            errors.add(
                format!("{field}.coding"),
                "a coding with system and code is required",
            );
            None
        }
    }
}

fn parse_with<T: std::str::FromStr<Err = E>, E: fmt::Display>(
    v: Option<&str>,
    field: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<T> {
    let v = v?;
    match v.parse() {
        Ok(t) => Some(t),
        Err(e) => {
            errors.add(field.to_string(), e.to_string());
            None
        }
    }
}

fn required<T>(
    v: Option<T>,
    field: impl fmt::Display,
    errors: &mut ValidationErrors,
    what: &str,
) -> Option<T> {
    if v.is_none() {
        errors.add(field.to_string(), format!("required: {what}"));
    }
    v
}

/// The calendar day of a FHIR `dateTime` (as the sender wrote it, in its
/// own offset): a custody date is a day. A time of day is listed as not
/// carried; a year or month alone is too vague to route on and refused.
fn day_of(
    v: Option<&str>,
    field: impl fmt::Display,
    index: &Index<'_>,
    errors: &mut ValidationErrors,
) -> Option<Date> {
    let when: super::model::When = parse_with(v, &field, errors)?;
    let text = when.to_string();
    let day = text.get(..10).and_then(|d| d.parse().ok());
    match day {
        None => errors.add(field.to_string(), "must give at least the day (YYYY-MM-DD)"),
        Some(_) if text.len() > 10 => index.note(&field, "the time of day is not carried"),
        Some(_) => {}
    }
    day
}

#[allow(clippy::too_many_lines)]
fn parse_document(
    bundle: &RawBundle<'_>,
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<Parsed> {
    let index = Index::new(
        &bundle.entry,
        bundle.entry.iter().map(|e| kind_of(e.resource)).collect(),
        prefix,
    );
    let first_type = index.kind(0);
    if first_type != Some("Composition") {
        errors.add(
            format!("{prefix}entry[0].resource"),
            "a document Bundle starts with its Composition",
        );
        return None;
    }
    let p0 = index.path(0);
    index.touch(0);
    let comp: Composition = typed(bundle.entry[0].resource.get(), p0, errors)?;
    let event = comp
        .event
        .iter()
        .flat_map(|e| &e.code)
        .find_map(|c| c.code_in(SYS_EVENT))
        .and_then(|c| c.code.as_deref())
        .and_then(|code| {
            JourneyEvent::ALL
                .into_iter()
                .find(|e| event_code(*e) == code)
        });

    // Patient.
    let Some((pi, pv)) = index.resolve(&comp.subject) else {
        errors.add(
            format!("{p0}subject.reference"),
            "must refer to a Patient entry in the Bundle",
        );
        return None;
    };
    let pp = index.path(pi);
    let fp: Patient = typed(pv, pp, errors)?;
    let mut nhs = None;
    let mut prison = None;
    let mut crn = None;
    for (k, id) in fp.identifier.iter().enumerate() {
        let field = format_args!("{pp}identifier[{k}].value");
        let value = id.value.as_deref();
        match id.system.as_deref() {
            Some(SYS_NHS) => nhs = parse_with(value, field, errors),
            Some(SYS_PRISON_NUMBER) => prison = parse_with(value, field, errors),
            Some(SYS_CRN) => crn = parse_with(value, field, errors),
            _ => index.note(
                format_args!("{pp}identifier[{k}]"),
                "an identifier system the gateway does not read",
            ),
        }
    }
    let name = fp.name.first();
    let family_name = required(
        name.and_then(|n| n.family.as_ref()).map(|f| f.to_string()),
        format_args!("{pp}name[0].family"),
        errors,
        "the patient's family name",
    );
    let dob: Option<Date> = required(
        parse_with(
            fp.birth_date.as_deref(),
            format_args!("{pp}birthDate"),
            errors,
        ),
        format_args!("{pp}birthDate"),
        errors,
        "the patient's date of birth",
    );
    let sex = match fp.gender.as_deref() {
        Some("male") => Sex::Male,
        Some("female") => Sex::Female,
        Some("other") => Sex::Other,
        Some("unknown") | None => Sex::Unknown,
        Some(_) => {
            errors.add(
                format!("{pp}gender"),
                "must be male, female, other or unknown",
            );
            Sex::Unknown
        }
    };
    let registered_gp = fp
        .general_practitioner
        .first()
        .and_then(|r| index.ods(r, errors));
    let release_address = fp.address.first().map(|a| super::model::Address {
        lines: a.line.iter().map(|l| l.to_string()).collect(),
        city: owned(a.city.as_ref()),
        postcode: owned(a.postal_code.as_ref()),
    });

    // Custody episode.
    let mut custody = None;
    if let Some((ei, ev)) = index.of_type("Encounter").next() {
        let ep = index.path(ei);
        if let Some(enc) = typed::<Encounter>(ev, ep, errors) {
            let establishment = enc
                .service_provider
                .as_ref()
                .and_then(|r| index.ods(r, errors));
            let establishment = required(
                establishment,
                format_args!("{ep}serviceProvider"),
                errors,
                "the establishment (an Organization with an ODS code)",
            );
            let hosp = enc.hospitalization.as_ref();
            let transfer_to = hosp
                .and_then(|h| h.destination.as_ref())
                .and_then(|r| index.ods(r, errors));
            let period = enc.period.as_ref();
            let start = period.and_then(|p| p.start.as_deref());
            let end = period.and_then(|p| p.end.as_deref());
            let reception_date = day_of(start, format_args!("{ep}period.start"), &index, errors);
            let (transfer_at, release_date) = if transfer_to.is_some() {
                (
                    parse_with(end, format_args!("{ep}period.end"), errors),
                    None,
                )
            } else {
                (
                    None,
                    day_of(end, format_args!("{ep}period.end"), &index, errors),
                )
            };
            let no_fixed_abode = hosp
                .and_then(|h| h.discharge_disposition.as_ref())
                .and_then(|d| d.code_in(SYS_LOCAL))
                .and_then(|c| c.code.as_deref())
                == Some("no-fixed-abode");
            custody = establishment.map(|establishment| Custody {
                establishment,
                reception_date,
                transfer_at,
                transfer_to,
                release_date,
                release_address: release_address.clone(),
                no_fixed_abode,
            });
        }
    } else {
        errors.add(
            format!("{prefix}entry"),
            "an Encounter for the custody episode is required",
        );
    }

    let mut s_medications = Vec::new();
    for (i, v) in index.of_type("MedicationStatement") {
        let p = index.path(i);
        let Some(m) = typed::<MedicationStatement>(v, p, errors) else {
            continue;
        };
        let code = parse_code(
            &m.medication_codeable_concept,
            format_args!("{p}medicationCodeableConcept"),
            errors,
        );
        let dosage = m.dosage.first();
        let mut last_dose_given = None;
        let mut days_supplied = None;
        for (k, e) in m.extension.iter().enumerate() {
            match &*e.url {
                EXT_LAST_DOSE => {
                    last_dose_given = parse_with(
                        e.value_date_time.as_deref(),
                        format_args!("{p}extension[{k}].valueDateTime"),
                        errors,
                    )
                }
                EXT_DAYS_SUPPLIED => match e.value_integer.map(u32::try_from) {
                    Some(Ok(d)) => days_supplied = Some(d),
                    _ => errors.add(
                        format!("{p}extension[{k}].valueInteger"),
                        "must be a whole number of days",
                    ),
                },
                _ => {}
            }
        }
        if let Some(code) = code {
            s_medications.push(Medication {
                code,
                dose: owned(dosage.and_then(|d| d.text.as_ref())),
                route: owned(
                    dosage
                        .and_then(|d| d.route.as_ref())
                        .and_then(|r| r.text.as_ref()),
                ),
                frequency: owned(
                    dosage
                        .and_then(|d| d.timing.as_ref())
                        .and_then(|t| t.code.as_ref())
                        .and_then(|c| c.text.as_ref()),
                ),
                supervised: dosage.is_some_and(|d| {
                    d.additional_instruction.iter().any(|c| {
                        c.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("supervised")
                    })
                }),
                opioid_substitution: m
                    .category
                    .as_ref()
                    .and_then(|c| c.code_in(SYS_LOCAL))
                    .and_then(|c| c.code.as_deref())
                    == Some("opioid-substitution"),
                last_dose_given,
                days_supplied,
            });
        }
    }

    let mut s_allergies = Vec::new();
    for (i, v) in index.of_type("AllergyIntolerance") {
        let p = index.path(i);
        let Some(a) = typed::<AllergyIntolerance>(v, p, errors) else {
            continue;
        };
        let reaction = a.reaction.first();
        let severity = match reaction.and_then(|r| r.severity.as_deref()) {
            None => None,
            Some("mild") => Some(Severity::Mild),
            Some("moderate") => Some(Severity::Moderate),
            Some("severe") => Some(Severity::Severe),
            Some(_) => {
                errors.add(
                    format!("{p}reaction[0].severity"),
                    "must be mild, moderate or severe",
                );
                None
            }
        };
        if let Some(substance) = parse_code(&a.code, format_args!("{p}code"), errors) {
            s_allergies.push(Allergy {
                substance,
                reaction: reaction
                    .and_then(|r| r.manifestation.first())
                    .and_then(|m| {
                        m.text
                            .as_ref()
                            .or_else(|| m.coding.first().and_then(|c| c.display.as_ref()))
                    })
                    .map(|t| t.to_string()),
                severity,
            });
        }
    }

    let mut s_risks = Vec::new();
    for (i, v) in index.of_type("Flag") {
        let p = index.path(i);
        let Some(f) = typed::<Flag>(v, p, errors) else {
            continue;
        };
        let kind = f
            .code
            .code_in(SYS_RISK)
            .and_then(|c| c.code.as_deref())
            .and_then(RiskKind::from_code);
        match kind {
            Some(kind) => s_risks.push(RiskFlag {
                kind,
                active: f.status == "active",
                note: f
                    .extension
                    .iter()
                    .find(|e| e.url == EXT_NOTE)
                    .and_then(|e| e.value_string.as_ref())
                    .map(|n| n.to_string()),
            }),
            None => errors.add(
                format!("{p}code.coding"),
                "a risk code (suicide, self-harm, violence, vulnerability) is required",
            ),
        }
    }

    let mut s_diagnoses = Vec::new();
    for (i, v) in index.of_type("Condition") {
        let p = index.path(i);
        let Some(c) = typed::<Condition>(v, p, errors) else {
            continue;
        };
        let active = c
            .clinical_status
            .as_ref()
            .and_then(|s| s.code_in(CLINICAL_STATUS))
            .and_then(|c| c.code.as_deref())
            .is_none_or(|c| matches!(c, "active" | "recurrence" | "relapse"));
        let onset = parse_with(
            c.onset_date_time.as_deref(),
            format_args!("{p}onsetDateTime"),
            errors,
        );
        if let Some(code) = parse_code(&c.code, format_args!("{p}code"), errors) {
            s_diagnoses.push(Diagnosis {
                code,
                active,
                onset,
            });
        }
    }

    let mut s_vaccinations = Vec::new();
    for (i, v) in index.of_type("Immunization") {
        let p = index.path(i);
        let Some(im) = typed::<Immunization>(v, p, errors) else {
            continue;
        };
        let date = parse_with(
            Some(&im.occurrence_date_time),
            format_args!("{p}occurrenceDateTime"),
            errors,
        );
        if let (Some(code), Some(date)) = (
            parse_code(&im.vaccine_code, format_args!("{p}vaccineCode"), errors),
            date,
        ) {
            s_vaccinations.push(Vaccination { code, date });
        }
    }

    let mut s_infections = Vec::new();
    let mut mental_health: Option<MentalHealth> = None;
    let mut substance_misuse: Option<SubstanceMisuse> = None;
    for (i, v) in index.of_type("Observation") {
        let p = index.path(i);
        let Some(o) = typed::<Observation>(v, p, errors) else {
            continue;
        };
        let category = o
            .category
            .iter()
            .find_map(|c| c.code_in(SYS_LOCAL))
            .and_then(|c| c.code.as_deref());
        let local_code = o.code.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref());
        let value_string = || o.value_string.as_ref().map(|v| v.to_string());
        match (category, local_code) {
            (Some("infectious-disease"), _) => {
                let treatment_started = o
                    .extension
                    .iter()
                    .enumerate()
                    .find(|(_, e)| e.url == EXT_TREATMENT_STARTED)
                    .and_then(|(k, e)| {
                        parse_with(
                            e.value_date.as_deref(),
                            format_args!("{p}extension[{k}].valueDate"),
                            errors,
                        )
                    });
                if let Some(code) = parse_code(&o.code, format_args!("{p}code"), errors) {
                    s_infections.push(Infection {
                        code,
                        status: value_string().unwrap_or_default(),
                        treatment_started,
                    });
                }
            }
            (_, Some("care-programme-approach")) => {
                mental_health
                    .get_or_insert_with(MentalHealth::default)
                    .care_programme_approach = o.value_boolean.unwrap_or(false)
            }
            (_, Some("care-coordinator")) => {
                mental_health
                    .get_or_insert_with(MentalHealth::default)
                    .care_coordinator = value_string()
            }
            (_, Some("substance-misuse-treatment")) => {
                substance_misuse
                    .get_or_insert_with(SubstanceMisuse::default)
                    .in_treatment = o.value_boolean.unwrap_or(false)
            }
            (_, Some("substance-misuse-service")) => {
                substance_misuse
                    .get_or_insert_with(SubstanceMisuse::default)
                    .community_service = value_string()
            }
            _ => index.note(
                format_args!("{}entry[{i}].resource (Observation)", index.prefix()),
                "not carried: an observation of a kind the gateway does not read",
            ),
        }
    }

    let mut s_follow_ups = Vec::new();
    for (i, v) in index.of_type("ServiceRequest") {
        let p = index.path(i);
        let Some(r) = typed::<ServiceRequest>(v, p, errors) else {
            continue;
        };
        let kind = match r
            .category
            .iter()
            .find_map(|c| c.code_in(SYS_LOCAL))
            .and_then(|c| c.code.as_deref())
        {
            Some("appointment") => FollowUpKind::Appointment,
            _ => FollowUpKind::Referral,
        };
        let date = parse_with(
            r.occurrence_date_time.as_deref(),
            format_args!("{p}occurrenceDateTime"),
            errors,
        );
        s_follow_ups.push(FollowUp {
            kind,
            service: owned(r.code.as_ref().and_then(|c| {
                c.text
                    .as_ref()
                    .or_else(|| c.coding.first().and_then(|c| c.display.as_ref()))
            })),
            date,
        });
    }

    let consent = match index.of_type("Consent").next() {
        Some((i, v)) => typed::<Consent>(v, index.path(i), errors).map(|c| {
            let legal_basis = c
                .policy_rule
                .as_ref()
                .filter(|r| {
                    r.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("legal-basis")
                })
                .and_then(|r| r.text.as_ref())
                .map(|t| t.to_string());
            super::model::Consent {
                probation_sharing: match c.provision.as_ref().map(|p| &*p.type_) {
                    Some("permit") if c.status == "active" => ConsentDecision::Given,
                    Some("deny") => ConsentDecision::Refused,
                    _ => ConsentDecision::NotRecorded,
                },
                legal_basis,
            }
        }),
        None => Some(super::model::Consent {
            probation_sharing: ConsentDecision::NotRecorded,
            legal_basis: None,
        }),
    };

    let author = comp
        .author
        .first()
        .and_then(|r| index.resolve(r))
        .filter(|(ai, _)| index.kind(*ai) == Some("Practitioner"))
        .and_then(|(ai, av)| {
            let pr: Practitioner = typed(av, index.path(ai), errors)?;
            Some((
                owned(
                    pr.name
                        .first()
                        .and_then(|n| n.text.as_ref().or(n.family.as_ref())),
                ),
                owned(pr.qualification.first().and_then(|q| q.code.text.as_ref())),
            ))
        });
    let author_org = comp.custodian.as_ref().and_then(|r| index.ods(r, errors));
    let prescriptions = prescription::read(&index, errors);
    let author_org = required(
        author_org,
        format_args!("{p0}custodian"),
        errors,
        "the authoring organisation (an Organization with an ODS code)",
    );
    let authored_at: Option<DateTime> =
        parse_with(Some(&*comp.date), format_args!("{p0}date"), errors);

    let (
        Some(family_name),
        Some(date_of_birth),
        Some(custody),
        Some(consent),
        Some(author_org),
        Some(authored_at),
    ) = (family_name, dob, custody, consent, author_org, authored_at)
    else {
        return None;
    };
    let (author_name, author_role) = author.unwrap_or_default();
    let not_read = index.finish(errors);
    Some(Parsed {
        summary: ClinicalSummary {
            patient: super::model::Patient {
                nhs_number: nhs,
                prison_number: prison,
                crn,
                family_name,
                given_names: name
                    .map(|n| n.given.iter().map(|g| g.to_string()).collect())
                    .unwrap_or_default(),
                date_of_birth,
                sex,
            },
            custody,
            registered_gp,
            diagnoses: s_diagnoses,
            medications: s_medications,
            prescriptions,
            allergies: s_allergies,
            risks: s_risks,
            mental_health,
            substance_misuse,
            infections: s_infections,
            vaccinations: s_vaccinations,
            follow_ups: s_follow_ups,
            consent,
            author: Author {
                name: author_name,
                role: author_role,
                organisation: author_org,
            },
            authored_at,
            not_read,
        },
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a":[{"b":"[[[["}]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"\"[[","b":[[]]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"x\\"}"#), 1);
        assert_eq!(json_depth(br#"[["unterminated \"#), 2);
        assert_eq!(json_depth(br#"[["unterminated [[["#), 2);
    }
}
