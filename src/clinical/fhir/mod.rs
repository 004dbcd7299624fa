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

mod types;

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::model::{
    Allergy, Author, ClinicalSummary, Code, ConsentDecision, Custody, Date, DateTime, Diagnosis,
    FollowUp, FollowUpKind, Infection, Medication, MentalHealth, RiskFlag, RiskKind, Severity, Sex,
    SubstanceMisuse, Vaccination,
};
use super::violation::ValidationErrors;
use super::{Limits, Rendered};
use crate::journey::JourneyEvent;
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

/// A rendered document Bundle under construction.
struct Doc {
    entries: Vec<Entry>,
}

impl Doc {
    fn add(&mut self, resource: impl Serialize) -> String {
        let url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        self.entries.push(Entry {
            full_url: Some(url.clone()),
            resource: serde_json::to_value(resource).expect("FHIR structs serialise"),
        });
        url
    }
}

fn code_cc(c: &Code) -> CodeableConcept {
    CodeableConcept::coded(&c.system, &c.code, &c.display)
}

fn local(code: &str, display: &str) -> CodeableConcept {
    CodeableConcept::coded(SYS_LOCAL, code, display)
}

fn ext_string(url: &str, v: &str) -> Extension {
    Extension {
        url: url.into(),
        value_string: Some(v.into()),
        ..Extension::default()
    }
}

fn org(ods: &str, name: Option<&str>) -> Organization {
    Organization {
        resource_type: "Organization".into(),
        identifier: vec![Identifier {
            system: Some(SYS_ODS.into()),
            value: Some(ods.into()),
        }],
        name: name.map(str::to_owned),
    }
}

/// Renders `s` as a FHIR R4 document Bundle for `event`.
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    let mut not_carried = Vec::new();
    let mut doc = Doc {
        entries: Vec::new(),
    };
    // Composition goes first; its content is filled in once references exist.
    doc.entries.push(Entry::default());

    let p = &s.patient;
    let mut identifier = Vec::new();
    let mut ident = |system: &str, value: Option<&str>| {
        if let Some(v) = value {
            identifier.push(Identifier {
                system: Some(system.into()),
                value: Some(v.into()),
            });
        }
    };
    ident(SYS_NHS, p.nhs_number.as_ref().map(|n| n.as_str()));
    ident(
        SYS_PRISON_NUMBER,
        p.prison_number.as_ref().map(|n| n.as_str()),
    );
    ident(SYS_CRN, p.crn.as_ref().map(|n| n.as_str()));
    let gp_url = s
        .registered_gp
        .as_ref()
        .map(|gp| doc.add(org(gp.as_str(), None)));
    let c = &s.custody;
    let patient_url = doc.add(Patient {
        resource_type: "Patient".into(),
        identifier,
        name: vec![HumanName {
            text: None,
            family: Some(p.family_name.clone()),
            given: p.given_names.clone(),
        }],
        gender: Some(
            match p.sex {
                Sex::Male => "male",
                Sex::Female => "female",
                Sex::Other => "other",
                Sex::Unknown => "unknown",
            }
            .into(),
        ),
        birth_date: Some(p.date_of_birth.to_string()),
        address: c
            .release_address
            .iter()
            .map(|a| Address {
                use_: Some("home".into()),
                line: a.lines.clone(),
                city: Some(a.city.clone()),
                postal_code: Some(a.postcode.clone()),
            })
            .collect(),
        general_practitioner: gp_url.iter().map(|u| Reference::to(u)).collect(),
    });
    let subject = Reference::to(&patient_url);

    let establishment_url = doc.add(org(c.establishment.as_str(), None));
    let destination = c
        .transfer_to
        .as_ref()
        .map(|t| Reference::to(&doc.add(org(t.as_str(), None))));
    let end = match (c.transfer_at, c.release_date) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(d)) => Some(d.to_string()),
        (None, None) => None,
    };
    if c.transfer_at.is_some() && c.release_date.is_some() {
        not_carried.push("custody.release_date: a transfer's episode ends at the transfer".into());
    }
    let disposition = if c.no_fixed_abode {
        Some(local("no-fixed-abode", "No fixed abode"))
    } else {
        None
    };
    let encounter_url = doc.add(Encounter {
        resource_type: "Encounter".into(),
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
            start: c.reception_date.map(|d| d.to_string()),
            end,
        }),
        service_provider: Some(Reference::to(&establishment_url)),
        hospitalization: (destination.is_some() || disposition.is_some()).then_some(
            Hospitalization {
                destination,
                discharge_disposition: disposition,
            },
        ),
    });

    let mut sections: Vec<Section> = Vec::new();
    let mut section = |code: &str, title: &str, entries: Vec<String>| {
        if !entries.is_empty() {
            sections.push(Section {
                title: title.into(),
                code: CodeableConcept::coded(SYS_HEADING, code, title),
                entry: entries.iter().map(|u| Reference::to(u)).collect(),
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
                    value_date_time: Some(t.to_string()),
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
            doc.add(MedicationStatement {
                resource_type: "MedicationStatement".into(),
                extension,
                status: "active".into(),
                category: m
                    .opioid_substitution
                    .then(|| local("opioid-substitution", "Opioid substitution therapy")),
                medication_codeable_concept: code_cc(&m.code),
                subject: subject.clone(),
                dosage: vec![Dosage {
                    text: Some(m.dose.clone()),
                    additional_instruction: if m.supervised {
                        vec![local("supervised", "Supervised consumption")]
                    } else {
                        Vec::new()
                    },
                    timing: Some(Timing {
                        code: Some(CodeableConcept::text(&m.frequency)),
                    }),
                    route: Some(CodeableConcept::text(&m.route)),
                }],
            })
        })
        .collect();
    section("medications", "Medications and medical devices", meds);

    let allergies: Vec<String> = s
        .allergies
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if a.reaction.is_none() && a.severity.is_some() {
                not_carried.push(format!(
                    "allergies[{i}].severity: FHIR carries severity only with a reaction"
                ));
            }
            doc.add(AllergyIntolerance {
                resource_type: "AllergyIntolerance".into(),
                clinical_status: Some(CodeableConcept::coded(ALLERGY_STATUS, "active", "Active")),
                code: code_cc(&a.substance),
                patient: subject.clone(),
                reaction: a
                    .reaction
                    .iter()
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
            doc.add(Flag {
                resource_type: "Flag".into(),
                extension: r.note.iter().map(|n| ext_string(EXT_NOTE, n)).collect(),
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
            doc.add(Condition {
                resource_type: "Condition".into(),
                clinical_status: Some(if d.active {
                    CodeableConcept::coded(CLINICAL_STATUS, "active", "Active")
                } else {
                    CodeableConcept::coded(CLINICAL_STATUS, "resolved", "Resolved")
                }),
                code: code_cc(&d.code),
                subject: subject.clone(),
                onset_date_time: d.onset.map(|o| o.to_string()),
            })
        })
        .collect();
    section("problems", "Problems and issues", problems);

    let observation = |code: CodeableConcept, category: &str| Observation {
        resource_type: "Observation".into(),
        extension: Vec::new(),
        status: "final".into(),
        category: vec![local(category, category)],
        code,
        subject: subject.clone(),
        value_string: None,
        value_boolean: None,
    };
    let infections: Vec<String> = s
        .infections
        .iter()
        .map(|i| {
            let mut o = observation(code_cc(&i.code), "infectious-disease");
            o.value_string = Some(i.status.clone());
            o.extension = i
                .treatment_started
                .iter()
                .map(|d| Extension {
                    url: EXT_TREATMENT_STARTED.into(),
                    value_date: Some(d.to_string()),
                    ..Extension::default()
                })
                .collect();
            doc.add(o)
        })
        .collect();
    section("infections", "Infectious diseases", infections);

    let vaccinations: Vec<String> = s
        .vaccinations
        .iter()
        .map(|v| {
            doc.add(Immunization {
                resource_type: "Immunization".into(),
                status: "completed".into(),
                vaccine_code: code_cc(&v.code),
                patient: subject.clone(),
                occurrence_date_time: v.date.to_string(),
            })
        })
        .collect();
    section("vaccinations", "Vaccinations", vaccinations);

    let mut mh = Vec::new();
    if let Some(m) = &s.mental_health {
        let mut o = observation(
            local("care-programme-approach", "Care programme approach"),
            "mental-health",
        );
        o.value_boolean = Some(m.care_programme_approach);
        mh.push(doc.add(o));
        if let Some(cc) = &m.care_coordinator {
            let mut o = observation(
                local("care-coordinator", "Care coordinator"),
                "mental-health",
            );
            o.value_string = Some(cc.clone());
            mh.push(doc.add(o));
        }
    }
    section("mental-health", "Mental health", mh);

    let mut sm = Vec::new();
    if let Some(t) = &s.substance_misuse {
        let mut o = observation(
            local("substance-misuse-treatment", "Substance misuse treatment"),
            "substance-misuse",
        );
        o.value_boolean = Some(t.in_treatment);
        sm.push(doc.add(o));
        if let Some(svc) = &t.community_service {
            let mut o = observation(
                local(
                    "substance-misuse-service",
                    "Community substance misuse service",
                ),
                "substance-misuse",
            );
            o.value_string = Some(svc.clone());
            sm.push(doc.add(o));
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
            doc.add(ServiceRequest {
                resource_type: "ServiceRequest".into(),
                status: "active".into(),
                intent: "order".into(),
                category: vec![local(code, display)],
                code: CodeableConcept::text(&f.service),
                subject: subject.clone(),
                occurrence_date_time: f.date.map(|d| d.to_string()),
            })
        })
        .collect();
    section("plan", "Plan and requested actions", plan);

    let consent = &s.consent;
    let consent_url = doc.add(Consent {
        resource_type: "Consent".into(),
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
                text: Some(basis.clone()),
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

    let author_org = doc.add(org(s.author.organisation.as_str(), None));
    let author_url = doc.add(Practitioner {
        resource_type: "Practitioner".into(),
        name: vec![HumanName {
            text: Some(s.author.name.clone()),
            family: None,
            given: Vec::new(),
        }],
        qualification: vec![Qualification {
            code: CodeableConcept::text(&s.author.role),
        }],
    });

    let composition = Composition {
        resource_type: "Composition".into(),
        status: "final".into(),
        type_: CodeableConcept::coded("http://snomed.info/sct", "373942005", "Discharge summary"),
        subject,
        date: s.authored_at.to_string(),
        author: vec![Reference::to(&author_url)],
        title: format!("Throughcare {} summary", event_code(event)),
        custodian: Some(Reference::to(&author_org)),
        event: vec![CompositionEvent {
            code: vec![CodeableConcept::coded(
                SYS_EVENT,
                event_code(event),
                &event.to_string(),
            )],
        }],
        section: sections,
    };
    doc.entries[0] = Entry {
        full_url: Some(format!("urn:uuid:{}", uuid::Uuid::new_v4())),
        resource: serde_json::to_value(composition).expect("composition serialises"),
    };
    let bundle = Bundle {
        resource_type: "Bundle".into(),
        identifier: Some(Identifier {
            system: Some("urn:ietf:rfc:3986".into()),
            value: Some(format!("urn:uuid:{}", uuid::Uuid::new_v4())),
        }),
        type_: "document".into(),
        timestamp: Some(s.authored_at.to_string()),
        entry: doc.entries,
    };
    let _ = LOCAL;
    Rendered {
        bytes: serde_json::to_vec(&bundle).expect("bundle serialises"),
        not_carried,
    }
}

/// Deepest JSON nesting in `bytes`, counting only brackets outside strings.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses into `T`, reporting the failing path under `prefix`.
fn typed<T: DeserializeOwned>(
    json: &str,
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<T> {
    let mut de = serde_json::Deserializer::from_str(json);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(t) => Some(t),
        Err(e) => {
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
            None
        }
    }
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
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(ValidationErrors::one(
            "document",
            format!("not valid JSON (line {}, column {})", e.line(), e.column()),
        ));
    }
    let mut errors = ValidationErrors::default();
    let Some(bundle) = typed::<RawBundle>(text, "", &mut errors) else {
        return Err(errors);
    };
    if bundle.resource_type != "Bundle" {
        return Err(ValidationErrors::one("resourceType", "must be Bundle"));
    }
    match bundle.type_.as_str() {
        "document" => parse_document(&bundle, "", &mut errors),
        "message" => {
            let inner = bundle
                .entry
                .iter()
                .enumerate()
                .find(|(_, e)| kind_of(&e.resource).as_deref() == Some("Bundle"));
            match inner {
                Some((i, e)) => {
                    let prefix = format!("entry[{i}].resource.");
                    match typed::<RawBundle>(e.resource.get(), &prefix, &mut errors) {
                        Some(doc) if doc.type_ == "document" => {
                            parse_document(&doc, &prefix, &mut errors)
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

fn kind_of(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<Kind>(raw.get()).ok()?.resource_type
}

struct Index<'a> {
    by_url: HashMap<&'a str, usize>,
    entries: &'a [RawEntry],
    kinds: Vec<Option<String>>,
    prefix: &'a str,
}

impl<'a> Index<'a> {
    fn of_type(&self, t: &'static str) -> impl Iterator<Item = (usize, &'a str)> + '_ {
        self.kinds
            .iter()
            .enumerate()
            .filter(move |(_, k)| k.as_deref() == Some(t))
            .map(|(i, _)| (i, self.entries[i].resource.get()))
    }

    fn kind(&self, i: usize) -> Option<&str> {
        self.kinds.get(i).and_then(|k| k.as_deref())
    }

    fn path(&self, i: usize) -> String {
        format!("{}entry[{i}].resource.", self.prefix)
    }

    fn resolve(&self, r: &Reference) -> Option<(usize, &'a str)> {
        let i = *self.by_url.get(r.reference.as_deref()?)?;
        Some((i, self.entries[i].resource.get()))
    }
}

fn ods_of(o: &Organization) -> Option<&str> {
    o.identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(SYS_ODS))
        .and_then(|i| i.value.as_deref())
}

fn parse_code(cc: &CodeableConcept, field: &str, errors: &mut ValidationErrors) -> Option<Code> {
    match cc
        .coding
        .iter()
        .find(|c| c.system.is_some() && c.code.is_some())
    {
        Some(c) => Some(Code {
            system: c.system.clone().unwrap_or_default(),
            code: c.code.clone().unwrap_or_default(),
            display: c
                .display
                .clone()
                .or_else(|| cc.text.clone())
                .unwrap_or_default(),
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

fn parse_with<T: std::str::FromStr<Err = E>, E: std::fmt::Display>(
    v: Option<&str>,
    field: String,
    errors: &mut ValidationErrors,
) -> Option<T> {
    let v = v?;
    match v.parse() {
        Ok(t) => Some(t),
        Err(e) => {
            errors.add(field, e.to_string());
            None
        }
    }
}

fn required<T>(
    v: Option<T>,
    field: String,
    errors: &mut ValidationErrors,
    what: &str,
) -> Option<T> {
    if v.is_none() {
        errors.add(field, format!("required: {what}"));
    }
    v
}

#[allow(clippy::too_many_lines)]
fn parse_document(
    bundle: &RawBundle,
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<Parsed> {
    let index = Index {
        by_url: bundle
            .entry
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.full_url.as_deref().map(|u| (u, i)))
            .collect(),
        entries: &bundle.entry,
        kinds: bundle.entry.iter().map(|e| kind_of(&e.resource)).collect(),
        prefix,
    };
    let first_type = index.kind(0);
    if first_type != Some("Composition") {
        errors.add(
            format!("{prefix}entry[0].resource"),
            "a document Bundle starts with its Composition",
        );
        return None;
    }
    let comp: Composition = typed(bundle.entry[0].resource.get(), &index.path(0), errors)?;
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
            format!("{}subject.reference", index.path(0)),
            "must refer to a Patient entry in the Bundle",
        );
        return None;
    };
    let pp = index.path(pi);
    let fp: Patient = typed(pv, &pp, errors)?;
    let mut nhs = None;
    let mut prison = None;
    let mut crn = None;
    for (k, id) in fp.identifier.iter().enumerate() {
        let field = format!("{pp}identifier[{k}].value");
        match id.system.as_deref() {
            Some(SYS_NHS) => nhs = parse_with(id.value.as_deref(), field, errors),
            Some(SYS_PRISON_NUMBER) => prison = parse_with(id.value.as_deref(), field, errors),
            Some(SYS_CRN) => crn = parse_with(id.value.as_deref(), field, errors),
            _ => {}
        }
    }
    let name = fp.name.first();
    let family_name = required(
        name.and_then(|n| n.family.clone()),
        format!("{pp}name[0].family"),
        errors,
        "the patient's family name",
    );
    let dob: Option<Date> = required(
        parse_with(fp.birth_date.as_deref(), format!("{pp}birthDate"), errors),
        format!("{pp}birthDate"),
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
    let registered_gp = fp.general_practitioner.first().and_then(|r| {
        let (gi, gv) = index.resolve(r)?;
        let o: Organization = typed(gv, &index.path(gi), errors)?;
        parse_with(
            ods_of(&o),
            format!("{}identifier[0].value", index.path(gi)),
            errors,
        )
    });
    let release_address = fp.address.first().map(|a| super::model::Address {
        lines: a.line.clone(),
        city: a.city.clone().unwrap_or_default(),
        postcode: a.postal_code.clone().unwrap_or_default(),
    });

    // Custody episode.
    let mut custody = None;
    if let Some((ei, ev)) = index.of_type("Encounter").next() {
        let ep = index.path(ei);
        if let Some(enc) = typed::<Encounter>(ev, &ep, errors) {
            let establishment = enc.service_provider.as_ref().and_then(|r| {
                let (oi, ov) = index.resolve(r)?;
                let o: Organization = typed(ov, &index.path(oi), errors)?;
                parse_with(
                    ods_of(&o),
                    format!("{}identifier[0].value", index.path(oi)),
                    errors,
                )
            });
            let establishment = required(
                establishment,
                format!("{ep}serviceProvider"),
                errors,
                "the establishment (an Organization with an ODS code)",
            );
            let hosp = enc.hospitalization.clone().unwrap_or_default();
            let transfer_to = hosp.destination.as_ref().and_then(|r| {
                let (oi, ov) = index.resolve(r)?;
                let o: Organization = typed(ov, &index.path(oi), errors)?;
                parse_with(
                    ods_of(&o),
                    format!("{}identifier[0].value", index.path(oi)),
                    errors,
                )
            });
            let period = enc.period.clone().unwrap_or_default();
            let reception_date =
                parse_with(period.start.as_deref(), format!("{ep}period.start"), errors);
            let (transfer_at, release_date) = if transfer_to.is_some() {
                (
                    parse_with(period.end.as_deref(), format!("{ep}period.end"), errors),
                    None,
                )
            } else {
                (
                    None,
                    parse_with(period.end.as_deref(), format!("{ep}period.end"), errors),
                )
            };
            let no_fixed_abode = hosp
                .discharge_disposition
                .as_ref()
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
        let Some(m) = typed::<MedicationStatement>(v, &p, errors) else {
            continue;
        };
        let code = parse_code(
            &m.medication_codeable_concept,
            &format!("{p}medicationCodeableConcept"),
            errors,
        );
        let dosage = m.dosage.first().cloned().unwrap_or_default();
        let mut last_dose_given = None;
        let mut days_supplied = None;
        for (k, e) in m.extension.iter().enumerate() {
            match e.url.as_str() {
                EXT_LAST_DOSE => {
                    last_dose_given = parse_with(
                        e.value_date_time.as_deref(),
                        format!("{p}extension[{k}].valueDateTime"),
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
                dose: dosage.text.clone().unwrap_or_default(),
                route: dosage.route.and_then(|r| r.text).unwrap_or_default(),
                frequency: dosage
                    .timing
                    .and_then(|t| t.code)
                    .and_then(|c| c.text)
                    .unwrap_or_default(),
                supervised: dosage.additional_instruction.iter().any(|c| {
                    c.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("supervised")
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
        let Some(a) = typed::<AllergyIntolerance>(v, &p, errors) else {
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
        if let Some(substance) = parse_code(&a.code, &format!("{p}code"), errors) {
            s_allergies.push(Allergy {
                substance,
                reaction: reaction
                    .and_then(|r| r.manifestation.first())
                    .and_then(|m| {
                        m.text
                            .clone()
                            .or_else(|| m.coding.first().and_then(|c| c.display.clone()))
                    }),
                severity,
            });
        }
    }

    let mut s_risks = Vec::new();
    for (i, v) in index.of_type("Flag") {
        let p = index.path(i);
        let Some(f) = typed::<Flag>(v, &p, errors) else {
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
                    .and_then(|e| e.value_string.clone()),
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
        let Some(c) = typed::<Condition>(v, &p, errors) else {
            continue;
        };
        let active = c
            .clinical_status
            .as_ref()
            .and_then(|s| s.code_in(CLINICAL_STATUS))
            .and_then(|c| c.code.as_deref())
            .is_none_or(|c| matches!(c, "active" | "recurrence" | "relapse"));
        let onset = parse_with(
            c.onset_date_time
                .as_deref()
                .map(|d| d.get(..10).unwrap_or(d)),
            format!("{p}onsetDateTime"),
            errors,
        );
        if let Some(code) = parse_code(&c.code, &format!("{p}code"), errors) {
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
        let Some(im) = typed::<Immunization>(v, &p, errors) else {
            continue;
        };
        let date = parse_with(
            Some(
                im.occurrence_date_time
                    .get(..10)
                    .unwrap_or(&im.occurrence_date_time),
            ),
            format!("{p}occurrenceDateTime"),
            errors,
        );
        if let (Some(code), Some(date)) = (
            parse_code(&im.vaccine_code, &format!("{p}vaccineCode"), errors),
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
        let Some(o) = typed::<Observation>(v, &p, errors) else {
            continue;
        };
        let category = o
            .category
            .iter()
            .find_map(|c| c.code_in(SYS_LOCAL))
            .and_then(|c| c.code.clone());
        let local_code = o.code.code_in(SYS_LOCAL).and_then(|c| c.code.clone());
        match (category.as_deref(), local_code.as_deref()) {
            (Some("infectious-disease"), _) => {
                let treatment_started = o
                    .extension
                    .iter()
                    .enumerate()
                    .find(|(_, e)| e.url == EXT_TREATMENT_STARTED)
                    .and_then(|(k, e)| {
                        parse_with(
                            e.value_date.as_deref(),
                            format!("{p}extension[{k}].valueDate"),
                            errors,
                        )
                    });
                if let Some(code) = parse_code(&o.code, &format!("{p}code"), errors) {
                    s_infections.push(Infection {
                        code,
                        status: o.value_string.clone().unwrap_or_default(),
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
                    .care_coordinator = o.value_string.clone()
            }
            (_, Some("substance-misuse-treatment")) => {
                substance_misuse
                    .get_or_insert_with(SubstanceMisuse::default)
                    .in_treatment = o.value_boolean.unwrap_or(false)
            }
            (_, Some("substance-misuse-service")) => {
                substance_misuse
                    .get_or_insert_with(SubstanceMisuse::default)
                    .community_service = o.value_string.clone()
            }
            _ => {}
        }
    }

    let mut s_follow_ups = Vec::new();
    for (i, v) in index.of_type("ServiceRequest") {
        let p = index.path(i);
        let Some(r) = typed::<ServiceRequest>(v, &p, errors) else {
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
            r.occurrence_date_time
                .as_deref()
                .map(|d| d.get(..10).unwrap_or(d)),
            format!("{p}occurrenceDateTime"),
            errors,
        );
        s_follow_ups.push(FollowUp {
            kind,
            service: r
                .code
                .text
                .clone()
                .or_else(|| r.code.coding.first().and_then(|c| c.display.clone()))
                .unwrap_or_default(),
            date,
        });
    }

    let consent = match index.of_type("Consent").next() {
        Some((i, v)) => typed::<Consent>(v, &index.path(i), errors).map(|c| {
            let legal_basis = c
                .policy_rule
                .as_ref()
                .filter(|r| {
                    r.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("legal-basis")
                })
                .and_then(|r| r.text.clone());
            super::model::Consent {
                probation_sharing: match c.provision.as_ref().map(|p| p.type_.as_str()) {
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
            let pr: Practitioner = typed(av, &index.path(ai), errors)?;
            Some((
                pr.name
                    .first()
                    .and_then(|n| n.text.clone().or_else(|| n.family.clone()))
                    .unwrap_or_default(),
                pr.qualification
                    .first()
                    .and_then(|q| q.code.text.clone())
                    .unwrap_or_default(),
            ))
        });
    let author_org = comp
        .custodian
        .as_ref()
        .and_then(|r| index.resolve(r))
        .and_then(|(oi, ov)| {
            let o: Organization = typed(ov, &index.path(oi), errors)?;
            parse_with(
                ods_of(&o),
                format!("{}identifier[0].value", index.path(oi)),
                errors,
            )
        });
    let author_org = required(
        author_org,
        format!("{}custodian", index.path(0)),
        errors,
        "the authoring organisation (an Organization with an ODS code)",
    );
    let authored_at: Option<DateTime> = parse_with(
        Some(comp.date.as_str()),
        format!("{}date", index.path(0)),
        errors,
    );

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
    Some(Parsed {
        summary: ClinicalSummary {
            patient: super::model::Patient {
                nhs_number: nhs,
                prison_number: prison,
                crn,
                family_name,
                given_names: name.map(|n| n.given.clone()).unwrap_or_default(),
                date_of_birth,
                sex,
            },
            custody,
            registered_gp,
            diagnoses: s_diagnoses,
            medications: s_medications,
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
    }
}
