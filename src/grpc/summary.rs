//! The native protobuf `ClinicalSummary` ⇄ the canonical model. Incoming
//! messages are destructured field by field (no `..`): a new proto field
//! fails the build until someone decides what it means.

use std::str::FromStr;

use super::pb;
use super::wire::Violations;
use crate::clinical::model::{self as m, ClinicalSummary};

fn opt<T: FromStr>(s: String, path: &str, v: &mut Violations) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    if s.is_empty() {
        return None;
    }
    s.parse()
        .map_err(|e: T::Err| v.add(path, e.to_string()))
        .ok()
}

fn req<T: FromStr>(s: String, path: &str, v: &mut Violations) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    if s.is_empty() {
        v.add(path, "required");
        return None;
    }
    opt(s, path, v)
}

fn text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn code(c: Option<pb::Code>, path: &str, v: &mut Violations) -> Option<m::Code> {
    let Some(pb::Code {
        system,
        code,
        display,
    }) = c
    else {
        v.add(path, "required");
        return None;
    };
    if system.is_empty() || code.is_empty() {
        v.add(path, "system and code are required");
        return None;
    }
    Some(m::Code {
        system,
        code,
        display,
    })
}

/// As [`code`], for a diagnosis or an allergy, which may be recorded in
/// words only: `display` with neither system nor code.
fn code_or_words(c: Option<pb::Code>, path: &str, v: &mut Violations) -> Option<m::Code> {
    match c {
        Some(pb::Code {
            system,
            code,
            display,
        }) if system.is_empty() && code.is_empty() && !display.trim().is_empty() => {
            Some(m::Code::words(display))
        }
        Some(pb::Code { system, code, .. }) if system.is_empty() && code.is_empty() => {
            v.add(
                path,
                "system and code, or the words (display), are required",
            );
            None
        }
        c => code(c, path, v),
    }
}

/// Reads a native summary; violations are reported under `prefix`.
pub fn from_wire(
    s: pb::ClinicalSummary,
    prefix: &str,
    v: &mut Violations,
) -> Option<ClinicalSummary> {
    let pb::ClinicalSummary {
        patient,
        custody,
        registered_gp,
        diagnoses,
        medications,
        allergies,
        risks,
        mental_health,
        substance_misuse,
        infections,
        vaccinations,
        follow_ups,
        consent,
        author,
        authored_at,
        prescriptions,
    } = s;
    let p = |f: &str| format!("{prefix}.{f}");
    // A list over the limit is refused before any entry is read: a compact
    // native document can hold hundreds of thousands of tiny entries.
    let over = crate::clinical::over_long_lists(&[
        ("diagnoses", diagnoses.len()),
        ("medications", medications.len()),
        ("prescriptions", prescriptions.len()),
        ("allergies", allergies.len()),
        ("risks", risks.len()),
        ("infections", infections.len()),
        ("vaccinations", vaccinations.len()),
        ("follow_ups", follow_ups.len()),
        (
            "patient.given_names",
            patient.as_ref().map_or(0, |p| p.given_names.len()),
        ),
        (
            "custody.release_address.lines",
            custody
                .as_ref()
                .and_then(|c| c.release_address.as_ref())
                .map_or(0, |a| a.lines.len()),
        ),
    ]);
    if !over.is_empty() {
        for (list, n) in over {
            v.add(
                p(list),
                format!("{n} entries; at most {}", crate::clinical::MAX_ITEMS),
            );
        }
        return None;
    }
    let patient = patient_from(patient, prefix, v);
    let custody = custody_from(custody, prefix, v);
    let registered_gp = opt(registered_gp, &p("registered_gp"), v);
    let diagnoses = diagnoses_from(diagnoses, prefix, v);
    let medications = medications_from(medications, prefix, v);
    let allergies = allergies_from(allergies, prefix, v);
    let risks = risks_from(risks, prefix, v);
    let mental_health = mental_health_from(mental_health);
    let substance_misuse = substance_misuse_from(substance_misuse);
    let infections = infections_from(infections, prefix, v);
    let vaccinations = vaccinations_from(vaccinations, prefix, v);
    let follow_ups = follow_ups_from(follow_ups, prefix, v);
    let consent = consent_from(consent, prefix, v);
    let author = author_from(author, prefix, v);
    let authored_at = req(authored_at, &p("authored_at"), v);
    let prescriptions = prescriptions
        .into_iter()
        .enumerate()
        .filter_map(|(i, x)| prescription_from(x, &p(&format!("prescriptions[{i}]")), v))
        .collect();
    Some(ClinicalSummary {
        patient: patient?,
        custody: custody?,
        registered_gp,
        diagnoses,
        medications,
        prescriptions,
        allergies,
        risks,
        mental_health,
        substance_misuse,
        infections,
        vaccinations,
        follow_ups,
        consent,
        author: author?,
        authored_at: authored_at?,
        not_read: Vec::new(),
    })
}

/// The patient: required, with a date of birth and a family name.
fn patient_from(
    patient: Option<pb::Patient>,
    prefix: &str,
    v: &mut Violations,
) -> Option<m::Patient> {
    let p = |f: &str| format!("{prefix}.{f}");
    match patient {
        None => {
            v.add(p("patient"), "required");
            None
        }
        Some(pb::Patient {
            nhs_number,
            prison_number,
            crn,
            family_name,
            given_names,
            date_of_birth,
            sex,
        }) => {
            let nhs_number = opt(nhs_number, &p("patient.nhs_number"), v);
            let prison_number = opt(prison_number, &p("patient.prison_number"), v);
            let crn = opt(crn, &p("patient.crn"), v);
            let dob = req(date_of_birth, &p("patient.date_of_birth"), v);
            if family_name.is_empty() {
                v.add(p("patient.family_name"), "required");
            }
            let sex = match known::<pb::Sex>(sex, &p("patient.sex"), v) {
                Some(pb::Sex::Male) => m::Sex::Male,
                Some(pb::Sex::Female) => m::Sex::Female,
                Some(pb::Sex::Other) => m::Sex::Other,
                _ => m::Sex::Unknown,
            };
            dob.map(|date_of_birth| m::Patient {
                nhs_number,
                prison_number,
                crn,
                family_name,
                given_names,
                date_of_birth,
                sex,
            })
        }
    }
}

/// The custody episode: required, with an establishment.
fn custody_from(
    custody: Option<pb::Custody>,
    prefix: &str,
    v: &mut Violations,
) -> Option<m::Custody> {
    let p = |f: &str| format!("{prefix}.{f}");
    match custody {
        None => {
            v.add(p("custody"), "required");
            None
        }
        Some(pb::Custody {
            establishment,
            reception_date,
            transfer_at,
            transfer_to,
            release_date,
            release_address,
            no_fixed_abode,
        }) => {
            let establishment = req(establishment, &p("custody.establishment"), v);
            let c = m::Custody {
                establishment: establishment
                    .clone()
                    .unwrap_or_else(|| "XXX".parse().expect("valid")),
                reception_date: opt(reception_date, &p("custody.reception_date"), v),
                transfer_at: opt(transfer_at, &p("custody.transfer_at"), v),
                transfer_to: opt(transfer_to, &p("custody.transfer_to"), v),
                release_date: opt(release_date, &p("custody.release_date"), v),
                release_address: release_address.map(
                    |pb::Address {
                         lines,
                         city,
                         postcode,
                     }| m::Address {
                        lines,
                        city,
                        postcode,
                    },
                ),
                no_fixed_abode,
            };
            establishment.map(|_| c)
        }
    }
}

/// Diagnoses, each with a code.
fn diagnoses_from(
    diagnoses: Vec<pb::Diagnosis>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::Diagnosis> {
    let p = |f: &str| format!("{prefix}.{f}");
    diagnoses
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::Diagnosis {
                    code: c,
                    active,
                    onset,
                },
            )| {
                let onset = opt(onset, &p(&format!("diagnoses[{i}].onset")), v);
                code_or_words(c, &p(&format!("diagnoses[{i}].code")), v).map(|code| m::Diagnosis {
                    code,
                    active,
                    onset,
                })
            },
        )
        .collect()
}

/// Medicines, each with a code.
fn medications_from(
    medications: Vec<pb::Medication>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::Medication> {
    let p = |f: &str| format!("{prefix}.{f}");
    medications
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::Medication {
                    code: c,
                    dose,
                    route,
                    frequency,
                    supervised,
                    opioid_substitution,
                    last_dose_given,
                    days_supplied,
                    as_needed,
                },
            )| {
                let last_dose_given = opt(
                    last_dose_given,
                    &p(&format!("medications[{i}].last_dose_given")),
                    v,
                );
                code(c, &p(&format!("medications[{i}].code")), v).map(|code| m::Medication {
                    code,
                    dose,
                    route,
                    frequency,
                    supervised,
                    as_needed,
                    opioid_substitution,
                    last_dose_given,
                    days_supplied,
                })
            },
        )
        .collect()
}

/// Allergies, each with a substance code.
fn allergies_from(
    allergies: Vec<pb::Allergy>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::Allergy> {
    let p = |f: &str| format!("{prefix}.{f}");
    allergies
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::Allergy {
                    substance,
                    reaction,
                    severity,
                },
            )| {
                let at = p(&format!("allergies[{i}].severity"));
                let severity = match known::<pb::Severity>(severity, &at, v) {
                    Some(pb::Severity::Mild) => Some(m::Severity::Mild),
                    Some(pb::Severity::Moderate) => Some(m::Severity::Moderate),
                    Some(pb::Severity::Severe) => Some(m::Severity::Severe),
                    _ => None,
                };
                code_or_words(substance, &p(&format!("allergies[{i}].substance")), v).map(
                    |substance| m::Allergy {
                        substance,
                        reaction: text(reaction),
                        severity,
                    },
                )
            },
        )
        .collect()
}

/// Risk flags, each of a known kind.
fn risks_from(risks: Vec<pb::RiskFlag>, prefix: &str, v: &mut Violations) -> Vec<m::RiskFlag> {
    let p = |f: &str| format!("{prefix}.{f}");
    risks
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::RiskFlag {
                    kind,
                    active,
                    note,
                    code: c,
                },
            )| {
                let at = p(&format!("risks[{i}].kind"));
                let code = match c {
                    Some(c) => Some(code(Some(c), &p(&format!("risks[{i}].code")), v)?),
                    None => None,
                };
                let kind = match known::<pb::RiskKind>(kind, &at, v)? {
                    pb::RiskKind::Suicide => m::RiskKind::Suicide,
                    pb::RiskKind::SelfHarm => m::RiskKind::SelfHarm,
                    pb::RiskKind::Violence => m::RiskKind::Violence,
                    pb::RiskKind::Vulnerability => m::RiskKind::Vulnerability,
                    pb::RiskKind::Other => m::RiskKind::Other,
                    pb::RiskKind::Unspecified => {
                        v.add(at, "required");
                        return None;
                    }
                };
                Some(m::RiskFlag {
                    kind,
                    active,
                    note: text(note),
                    code,
                })
            },
        )
        .collect()
}

/// Mental health.
fn mental_health_from(mental_health: Option<pb::MentalHealth>) -> Option<m::MentalHealth> {
    mental_health.map(
        |pb::MentalHealth {
             care_programme_approach,
             care_coordinator,
         }| m::MentalHealth {
            care_programme_approach,
            care_coordinator: text(care_coordinator),
        },
    )
}

/// Substance misuse.
fn substance_misuse_from(
    substance_misuse: Option<pb::SubstanceMisuse>,
) -> Option<m::SubstanceMisuse> {
    substance_misuse.map(
        |pb::SubstanceMisuse {
             in_treatment,
             community_service,
         }| m::SubstanceMisuse {
            in_treatment,
            community_service: text(community_service),
        },
    )
}

/// Infections, each with a code.
fn infections_from(
    infections: Vec<pb::Infection>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::Infection> {
    let p = |f: &str| format!("{prefix}.{f}");
    infections
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::Infection {
                    code: c,
                    status,
                    treatment_started,
                },
            )| {
                let treatment_started = opt(
                    treatment_started,
                    &p(&format!("infections[{i}].treatment_started")),
                    v,
                );
                code(c, &p(&format!("infections[{i}].code")), v).map(|code| m::Infection {
                    code,
                    status,
                    treatment_started,
                })
            },
        )
        .collect()
}

/// Vaccinations, each with a code and a date.
fn vaccinations_from(
    vaccinations: Vec<pb::Vaccination>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::Vaccination> {
    let p = |f: &str| format!("{prefix}.{f}");
    vaccinations
        .into_iter()
        .enumerate()
        .filter_map(|(i, pb::Vaccination { code: c, date })| {
            let date = req(date, &p(&format!("vaccinations[{i}].date")), v);
            let code = code(c, &p(&format!("vaccinations[{i}].code")), v);
            Some(m::Vaccination {
                code: code?,
                date: date?,
            })
        })
        .collect()
}

/// Follow-ups.
fn follow_ups_from(
    follow_ups: Vec<pb::FollowUp>,
    prefix: &str,
    v: &mut Violations,
) -> Vec<m::FollowUp> {
    let p = |f: &str| format!("{prefix}.{f}");
    follow_ups
        .into_iter()
        .enumerate()
        .filter_map(
            |(
                i,
                pb::FollowUp {
                    kind,
                    service,
                    date,
                },
            )| {
                let at = p(&format!("follow_ups[{i}].kind"));
                let date = opt(date, &p(&format!("follow_ups[{i}].date")), v);
                let kind = match known::<pb::FollowUpKind>(kind, &at, v)? {
                    pb::FollowUpKind::Appointment => m::FollowUpKind::Appointment,
                    pb::FollowUpKind::Referral => m::FollowUpKind::Referral,
                    pb::FollowUpKind::Unspecified => {
                        v.add(at, "required: APPOINTMENT or REFERRAL");
                        return None;
                    }
                };
                Some(m::FollowUp {
                    kind,
                    service,
                    date,
                })
            },
        )
        .collect()
}

/// `value` as enum `E`; an unknown number is refused at `at` (proto3 keeps
/// unknown enum values, so a newer or broken client could otherwise have
/// one read as some default).
fn known<E: TryFrom<i32>>(value: i32, at: &str, v: &mut Violations) -> Option<E> {
    E::try_from(value)
        .map_err(|_| {
            v.add(
                at.to_owned(),
                format!("unknown value {value}: not one this contract defines"),
            );
        })
        .ok()
}

/// Consent to share with probation; not recorded when absent.
fn consent_from(consent: Option<pb::Consent>, prefix: &str, v: &mut Violations) -> m::Consent {
    consent.map_or(
        m::Consent {
            probation_sharing: m::ConsentDecision::NotRecorded,
            legal_basis: None,
            treatment_sharing: m::ConsentDecision::NotRecorded,
        },
        |pb::Consent {
             probation_sharing,
             legal_basis,
             treatment_sharing,
         }| m::Consent {
            probation_sharing: decision_from(
                probation_sharing,
                &format!("{prefix}.consent.probation_sharing"),
                v,
            ),
            legal_basis: text(legal_basis),
            treatment_sharing: decision_from(
                treatment_sharing,
                &format!("{prefix}.consent.treatment_sharing"),
                v,
            ),
        },
    )
}

/// A consent decision; not recorded when unspecified or unknown.
fn decision_from(decision: i32, at: &str, v: &mut Violations) -> m::ConsentDecision {
    match known::<pb::ConsentDecision>(decision, at, v) {
        Some(pb::ConsentDecision::Given) => m::ConsentDecision::Given,
        Some(pb::ConsentDecision::Refused) => m::ConsentDecision::Refused,
        _ => m::ConsentDecision::NotRecorded,
    }
}

/// A consent decision on the wire.
fn decision_to(decision: m::ConsentDecision) -> i32 {
    match decision {
        m::ConsentDecision::Given => pb::ConsentDecision::Given,
        m::ConsentDecision::Refused => pb::ConsentDecision::Refused,
        m::ConsentDecision::NotRecorded => pb::ConsentDecision::Unspecified,
    }
    .into()
}

/// The author: required, with an organisation.
fn author_from(author: Option<pb::Author>, prefix: &str, v: &mut Violations) -> Option<m::Author> {
    let p = |f: &str| format!("{prefix}.{f}");
    match author {
        None => {
            v.add(p("author"), "required");
            None
        }
        Some(pb::Author {
            name,
            role,
            organisation,
        }) => req(organisation, &p("author.organisation"), v).map(|organisation| m::Author {
            name,
            role,
            organisation,
        }),
    }
}

fn prescription_from(x: pb::Prescription, at: &str, v: &mut Violations) -> Option<m::Prescription> {
    let pb::Prescription {
        code: c,
        status,
        intent,
        authored_on,
        dosage,
        quantity,
        days_supplied,
    } = x;
    let mut one_of = |value: String, field: &str, allowed: &[&str]| {
        if allowed.contains(&value.as_str()) {
            Some(value)
        } else {
            v.add(
                format!("{at}.{field}"),
                format!("must be one of {}", allowed.join(", ")),
            );
            None
        }
    };
    let status = one_of(status, "status", &m::PRESCRIPTION_STATUSES);
    let intent = one_of(intent, "intent", &m::PRESCRIPTION_INTENTS);
    let authored_on = opt(authored_on, &format!("{at}.authored_on"), v);
    let quantity = match quantity {
        None => None,
        Some(pb::Quantity { value, unit }) => {
            if !m::Quantity::is_decimal(&value) || unit.trim().is_empty() {
                v.add(
                    format!("{at}.quantity"),
                    "a decimal value and a unit are required",
                );
                None
            } else {
                Some(m::Quantity { value, unit })
            }
        }
    };
    let code = code(c, &format!("{at}.code"), v)?;
    Some(m::Prescription {
        code,
        status: status?,
        intent: intent?,
        authored_on,
        dosage: text(dosage),
        quantity,
        days_supplied,
    })
}

fn code_to(c: &m::Code) -> pb::Code {
    pb::Code {
        system: c.system.clone(),
        code: c.code.clone(),
        display: c.display.clone(),
    }
}

fn s<T: ToString>(o: Option<&T>) -> String {
    o.map(ToString::to_string).unwrap_or_default()
}

/// The native form of a summary.
pub fn to_wire(x: &ClinicalSummary) -> pb::ClinicalSummary {
    pb::ClinicalSummary {
        patient: Some(patient_to(&x.patient)),
        custody: Some(custody_to(&x.custody)),
        registered_gp: s(x.registered_gp.as_ref()),
        diagnoses: x
            .diagnoses
            .iter()
            .map(|d| pb::Diagnosis {
                code: Some(code_to(&d.code)),
                active: d.active,
                onset: s(d.onset.as_ref()),
            })
            .collect(),
        medications: x
            .medications
            .iter()
            .map(|md| pb::Medication {
                code: Some(code_to(&md.code)),
                dose: md.dose.clone(),
                route: md.route.clone(),
                frequency: md.frequency.clone(),
                supervised: md.supervised,
                as_needed: md.as_needed,
                opioid_substitution: md.opioid_substitution,
                last_dose_given: s(md.last_dose_given.as_ref()),
                days_supplied: md.days_supplied,
            })
            .collect(),
        allergies: allergies_to(x),
        risks: risks_to(x),
        mental_health: x.mental_health.as_ref().map(|mh| pb::MentalHealth {
            care_programme_approach: mh.care_programme_approach,
            care_coordinator: mh.care_coordinator.clone().unwrap_or_default(),
        }),
        substance_misuse: x.substance_misuse.as_ref().map(|sm| pb::SubstanceMisuse {
            in_treatment: sm.in_treatment,
            community_service: sm.community_service.clone().unwrap_or_default(),
        }),
        infections: x
            .infections
            .iter()
            .map(|i| pb::Infection {
                code: Some(code_to(&i.code)),
                status: i.status.clone(),
                treatment_started: s(i.treatment_started.as_ref()),
            })
            .collect(),
        vaccinations: x
            .vaccinations
            .iter()
            .map(|vc| pb::Vaccination {
                code: Some(code_to(&vc.code)),
                date: vc.date.to_string(),
            })
            .collect(),
        follow_ups: x
            .follow_ups
            .iter()
            .map(|f| pb::FollowUp {
                kind: match f.kind {
                    m::FollowUpKind::Appointment => pb::FollowUpKind::Appointment,
                    m::FollowUpKind::Referral => pb::FollowUpKind::Referral,
                }
                .into(),
                service: f.service.clone(),
                date: s(f.date.as_ref()),
            })
            .collect(),
        consent: Some(pb::Consent {
            probation_sharing: decision_to(x.consent.probation_sharing),
            legal_basis: x.consent.legal_basis.clone().unwrap_or_default(),
            treatment_sharing: decision_to(x.consent.treatment_sharing),
        }),
        author: Some(pb::Author {
            name: x.author.name.clone(),
            role: x.author.role.clone(),
            organisation: x.author.organisation.to_string(),
        }),
        authored_at: x.authored_at.to_string(),
        prescriptions: prescriptions_to(x),
    }
}

/// The native patient.
fn patient_to(p: &m::Patient) -> pb::Patient {
    pb::Patient {
        nhs_number: s(p.nhs_number.as_ref()),
        prison_number: p
            .prison_number
            .as_ref()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        crn: p
            .crn
            .as_ref()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        family_name: p.family_name.clone(),
        given_names: p.given_names.clone(),
        date_of_birth: p.date_of_birth.to_string(),
        sex: match p.sex {
            m::Sex::Male => pb::Sex::Male,
            m::Sex::Female => pb::Sex::Female,
            m::Sex::Other => pb::Sex::Other,
            m::Sex::Unknown => pb::Sex::Unknown,
        }
        .into(),
    }
}

/// The native custody episode.
fn custody_to(c: &m::Custody) -> pb::Custody {
    pb::Custody {
        establishment: c.establishment.to_string(),
        reception_date: s(c.reception_date.as_ref()),
        transfer_at: s(c.transfer_at.as_ref()),
        transfer_to: s(c.transfer_to.as_ref()),
        release_date: s(c.release_date.as_ref()),
        release_address: c.release_address.as_ref().map(|a| pb::Address {
            lines: a.lines.clone(),
            city: a.city.clone(),
            postcode: a.postcode.clone(),
        }),
        no_fixed_abode: c.no_fixed_abode,
    }
}

/// The native allergies.
fn allergies_to(x: &ClinicalSummary) -> Vec<pb::Allergy> {
    x.allergies
        .iter()
        .map(|a| pb::Allergy {
            substance: Some(code_to(&a.substance)),
            reaction: a.reaction.clone().unwrap_or_default(),
            severity: match a.severity {
                None => pb::Severity::Unspecified,
                Some(m::Severity::Mild) => pb::Severity::Mild,
                Some(m::Severity::Moderate) => pb::Severity::Moderate,
                Some(m::Severity::Severe) => pb::Severity::Severe,
            }
            .into(),
        })
        .collect()
}

/// The native risk flags.
fn risks_to(x: &ClinicalSummary) -> Vec<pb::RiskFlag> {
    x.risks
        .iter()
        .map(|r| pb::RiskFlag {
            kind: match r.kind {
                m::RiskKind::Suicide => pb::RiskKind::Suicide,
                m::RiskKind::SelfHarm => pb::RiskKind::SelfHarm,
                m::RiskKind::Violence => pb::RiskKind::Violence,
                m::RiskKind::Vulnerability => pb::RiskKind::Vulnerability,
                m::RiskKind::Other => pb::RiskKind::Other,
            }
            .into(),
            active: r.active,
            note: r.note.clone().unwrap_or_default(),
            code: r.code.as_ref().map(code_to),
        })
        .collect()
}

/// The native prescriptions.
fn prescriptions_to(x: &ClinicalSummary) -> Vec<pb::Prescription> {
    x.prescriptions
        .iter()
        .map(|rx| pb::Prescription {
            code: Some(code_to(&rx.code)),
            status: rx.status.clone(),
            intent: rx.intent.clone(),
            authored_on: s(rx.authored_on.as_ref()),
            dosage: rx.dosage.clone().unwrap_or_default(),
            quantity: rx.quantity.as_ref().map(|q| pb::Quantity {
                value: q.value.clone(),
                unit: q.unit.clone(),
            }),
            days_supplied: rx.days_supplied,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_round_trips_through_the_native_form() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patients");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let summary: ClinicalSummary =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let mut v = Violations::default();
            let back = from_wire(to_wire(&summary), "document.native", &mut v);
            assert!(v.0.is_empty(), "{}: {:?}", path.display(), v.0);
            assert_eq!(back.as_ref(), Some(&summary), "{}", path.display());
            n += 1;
        }
        assert!(n >= 6);
    }

    /// A compact native document can hold hundreds of thousands of tiny
    /// entries: a list over the limit is refused whole, before its entries
    /// are read, so the refusal costs nothing and names one field.
    #[test]
    fn a_list_over_the_limit_is_refused_before_its_entries_are_read() {
        let summary = crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            None,
            "m",
        );
        let mut wire = to_wire(&summary);
        let one = wire.medications[0].clone();
        wire.medications = vec![one.clone(); crate::clinical::MAX_ITEMS];
        let mut v = Violations::default();
        assert!(from_wire(wire.clone(), "document.native", &mut v).is_some());
        assert!(v.0.is_empty(), "{:?}", v.0);
        wire.medications = vec![Default::default(); 200_000];
        wire.allergies = vec![Default::default(); 300];
        let mut v = Violations::default();
        assert!(from_wire(wire, "document.native", &mut v).is_none());
        let fields: Vec<&str> = v.0.iter().map(|x| x.field.as_str()).collect();
        assert_eq!(
            fields,
            ["document.native.medications", "document.native.allergies"]
        );
    }

    #[test]
    fn bad_native_fields_are_named() {
        let wire = pb::ClinicalSummary {
            patient: Some(pb::Patient {
                nhs_number: "9990000017".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut v = Violations::default();
        assert!(from_wire(wire, "document.native", &mut v).is_none());
        let fields: Vec<_> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert!(
            fields.contains(&"document.native.patient.nhs_number"),
            "{fields:?}"
        );
        assert!(fields.contains(&"document.native.custody"), "{fields:?}");
        assert!(v.0.iter().all(|f| !f.description.contains("9990000017")));
    }
}
