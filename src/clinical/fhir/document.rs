//! Reading a document Bundle's resources into the summary: the Composition,
//! the Patient, the custody Encounter, then each heading's resources.

use super::index::{At, Index};
use super::read::{
    Parsed, day_of, owned, parse_code, parse_code_or_words, parse_with, required, typed,
};
use super::types::Address as FhirAddress;
use super::types::*;
use super::{
    CLINICAL_STATUS, EXT_DAYS_SUPPLIED, EXT_LAST_DOSE, EXT_NOTE, EXT_TREATMENT_STARTED, SYS_CRN,
    SYS_DISCHARGE_DESTINATION_ENGLAND, SYS_DISCHARGE_DISPOSITION, SYS_EVENT, SYS_LOCAL, SYS_NHS,
    SYS_ODS, SYS_PRISON_NUMBER, SYS_RISK, event_code, prescription,
};
use crate::clinical::JourneyEvent;
use crate::clinical::OdsCode;
use crate::clinical::identifiers::{Crn, NhsNumber, PrisonNumber};
use crate::clinical::model::{
    Address, Allergy, Author, ClinicalSummary, Code, ConsentDecision, Custody, Date, DateTime,
    Diagnosis, FollowUp, FollowUpKind, Infection, Medication, MentalHealth, RiskFlag, RiskKind,
    SNOMED, Severity, Sex, SubstanceMisuse, Vaccination,
};
use crate::clinical::violation::ValidationErrors;

/// Reads the document Bundle's resources into the summary: the Composition,
/// the Patient and custody Encounter it rests on, then each heading.
pub(super) fn parse_document(
    bundle: &BundleShape<'_>,
    tree: &super::tree::Value<'_>,
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<Parsed> {
    let index = Index::new(&bundle.entry, tree, prefix);
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
    let comp: Composition = typed(index.tree(0), p0, errors)?;
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

    unique_full_urls(bundle, prefix, errors);
    composition_status(&index, &comp.status, p0, errors);
    sections_resolve(&index, &comp.section, &format!("{p0}section"));
    let (pi, pv) = the_patient(&index, &comp, errors)?;
    about_the_patient(&index, pi, errors);
    let from_patient = read_patient(&index, pi, pv, errors)?;
    let custody = read_custody(&index, (&comp, p0), prefix, errors).map(|mut custody| {
        let day = custody.release_date;
        custody.release_address = release_address(&index, &from_patient.addresses, pi, day);
        custody
    });
    let medications = read_medications(&index, comp.date.parse().ok(), errors);
    let allergies = read_allergies(&index, errors);
    let risks = read_risks(&index, errors);
    let diagnoses = read_conditions(&index, errors);
    let vaccinations = read_immunizations(&index, errors);
    let (infections, mental_health, substance_misuse) = read_observations(&index, errors);
    let follow_ups = read_service_requests(&index, errors);
    let consent = read_consent(&index, errors);
    let author = read_author(&comp, &index, errors);
    let author_org = comp
        .custodian
        .as_ref()
        .and_then(|r| index.ods(r, format_args!("{p0}custodian"), errors));
    let prescriptions = prescription::read(&index, errors);
    let author_org = required(
        author_org,
        format_args!("{p0}custodian"),
        errors,
        "the authoring organisation (an Organization with an ODS code)",
    );
    let authored_at: Option<DateTime> =
        parse_with(Some(&*comp.date), format_args!("{p0}date"), errors);

    let (Some(patient), Some(custody), Some(consent), Some(author_org), Some(authored_at)) = (
        from_patient.patient,
        custody,
        consent,
        author_org,
        authored_at,
    ) else {
        return None;
    };
    let (author_name, author_role) = author.unwrap_or_default();
    let not_read = index.finish(errors);
    Some(Parsed {
        summary: ClinicalSummary {
            patient,
            custody,
            registered_gp: from_patient.registered_gp,
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

/// The Patient entry the Composition is about (its index and JSON), or a
/// violation at its subject.
fn the_patient<'a>(
    index: &Index<'a>,
    comp: &Composition<'_>,
    errors: &mut ValidationErrors,
) -> Option<(usize, &'a super::tree::Value<'a>)> {
    let found = index
        .resolve(&comp.subject)
        .filter(|(pi, _)| index.kind(*pi) == Some("Patient"));
    if found.is_none() {
        errors.add(
            format!("{}subject.reference", index.path(0)),
            "must refer to a Patient entry in the Bundle",
        );
    }
    found
}

/// Refuses a Bundle whose entries share a `fullUrl` (FHIR R4 `bdl-7`): a
/// reference to it could resolve to either, and the wrong one would be read.
fn unique_full_urls(bundle: &BundleShape<'_>, prefix: &str, errors: &mut ValidationErrors) {
    let mut seen = std::collections::HashSet::new();
    for (j, e) in bundle.entry.iter().enumerate() {
        if let Some(url) = e.full_url.as_deref().filter(|u| !u.is_empty())
            && !seen.insert(url)
        {
            errors.add(
                format!("{prefix}entry[{j}].fullUrl"),
                "must be unique in the Bundle (FHIR bdl-7): a reference to it would be ambiguous",
            );
        }
    }
}

/// Lists the qualifiers of entry `i` the model has no place for, so a
/// recipient is told: a suspected (unconfirmed, provisional, differential)
/// allergy or diagnosis is carried as recorded, and a Condition in
/// remission as inactive.
fn qualifier_notes(index: &Index<'_>, i: usize) {
    let v = index.tree(i);
    let codes = |element: &str| super::unread::codes_of(v, element);
    let p = index.path(i);
    if let Some(q) = codes("verificationStatus")
        .into_iter()
        .find(|c| matches!(c.as_str(), "unconfirmed" | "provisional" | "differential"))
    {
        index.note(
            format_args!("{p}verificationStatus"),
            &format!("not carried: {q} (carried as recorded, without the qualifier)"),
        );
    }
    if codes("clinicalStatus").iter().any(|c| c == "remission") {
        index.note(
            format_args!("{p}clinicalStatus"),
            "not carried: remission (carried as inactive)",
        );
    }
}

/// The resource types whose `subject` or `patient` says whose record they are.
const ABOUT_A_PATIENT: [&str; 11] = [
    "Encounter",
    "Condition",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationRequest",
    "AllergyIntolerance",
    "Flag",
    "Immunization",
    "Observation",
    "ServiceRequest",
    "Consent",
];

/// The subject (or patient) of a clinical resource, as written.
#[derive(serde::Deserialize)]
struct Subject<'a> {
    #[serde(default, borrow)]
    subject: Option<Reference<'a>>,
    #[serde(default, borrow)]
    patient: Option<Reference<'a>>,
}

/// Refuses a clinical resource about someone else: a document is one
/// patient's record, so each resource that names its subject must name the
/// Composition's Patient (entry `patient`). A reference to another Patient,
/// or to nothing in the Bundle, would file that content under this patient.
fn about_the_patient(index: &Index<'_>, patient: usize, errors: &mut ValidationErrors) {
    for i in 0..index.len() {
        let Some(kind) = index.kind(i).filter(|k| ABOUT_A_PATIENT.contains(k)) else {
            continue;
        };
        let Ok(about) = <Subject<'_> as serde::Deserialize>::deserialize(index.tree(i)) else {
            continue; // refused with its own path when it is read
        };
        let element = if kind == "AllergyIntolerance" || kind == "Immunization" || kind == "Consent"
        {
            ("patient", about.patient)
        } else {
            ("subject", about.subject)
        };
        let optional = matches!(kind, "Encounter" | "Observation" | "Consent");
        let reference = match &element.1 {
            None if optional => continue,
            None => {
                errors.add(
                    format!("{}{}", index.path(i), element.0),
                    "required (FHIR R4): a reference to the document's Patient",
                );
                continue;
            }
            Some(r) => r.reference.as_deref(),
        };
        // An identifier or a display alone cannot be checked against the
        // document's patient: it could name anyone.
        let Some(reference) = reference else {
            errors.add(
                format!("{}{}.reference", index.path(i), element.0),
                "required: a reference to the document's Patient (an identifier or display \
                 alone cannot be checked against it)",
            );
            continue;
        };
        if index.position(reference) != Some(patient) {
            errors.add(
                format!("{}{}.reference", index.path(i), element.0),
                "must refer to the document's Patient (the Composition's subject): a summary \
                 carries one patient's record",
            );
        }
    }
}

/// What the Patient resource says.
struct PatientRead<'a> {
    /// None without a family name or a date of birth.
    patient: Option<crate::clinical::model::Patient>,
    registered_gp: Option<OdsCode>,
    /// Every address as written, each period checked: which one the
    /// patient will live at depends on the release day.
    addresses: Vec<FhirAddress<'a>>,
}

/// Keeps `found` as the patient's identifier of one kind; a second,
/// different one (not marked `use: old`) is refused: which of the two is
/// this patient's cannot be told, and the wrong one files the record under
/// someone else.
fn one_identifier<T: PartialEq>(
    kept: &mut Option<T>,
    found: Option<T>,
    at: String,
    errors: &mut ValidationErrors,
) {
    let Some(found) = found else { return };
    match kept {
        Some(k) if *k != found => errors.add(
            at,
            "a second, different identifier of this kind: which is the patient's cannot be \
             told (mark a retired one use old)",
        ),
        Some(_) => {}
        None => *kept = Some(found),
    }
}

/// Where the patient will live on `day` (the release day, when known): a
/// `temp` address whose period covers that day (approved premises, a
/// hostel arranged for release), else the first `home` address, else the
/// first with no use or `temp`. An address whose period has ended before
/// that day, or begins after it, is not where the patient will live, and
/// `old`, `work` and `billing` addresses never are (a patient may have only
/// those: then none is); each address not taken is listed.
fn release_address(
    index: &Index<'_>,
    addresses: &[FhirAddress<'_>],
    pi: usize,
    day: Option<Date>,
) -> Option<Address> {
    let pp = index.path(pi);
    let day = day.map(|d| d.to_string());
    let in_use = |a: &FhirAddress<'_>| match (&day, &a.period) {
        (Some(day), Some(p)) => period_covers(p, day),
        _ => true,
    };
    let usable = |a: &FhirAddress<'_>| {
        matches!(a.use_.as_deref(), None | Some("home" | "temp")) && in_use(a)
    };
    let arranged = |a: &FhirAddress<'_>| {
        a.use_.as_deref() == Some("temp") && day.is_some() && a.period.is_some() && in_use(a)
    };
    let chosen = addresses
        .iter()
        .position(arranged)
        .or_else(|| {
            addresses
                .iter()
                .position(|a| a.use_.as_deref() == Some("home") && in_use(a))
        })
        .or_else(|| addresses.iter().position(usable));
    for k in (0..addresses.len()).filter(|k| Some(*k) != chosen) {
        index.note(
            format_args!("{pp}address[{k}]"),
            "not carried: only the address the patient will live at is read",
        );
    }
    let (k, a) = chosen.map(|k| (k, &addresses[k]))?;
    let mut lines: Vec<String> = a.line.iter().map(|l| l.to_string()).collect();
    // The text is the address when no street line is given (a postcode
    // beside it does not make the street).
    let parts = !lines.is_empty();
    match (&a.text, parts) {
        (Some(text), false) => lines.push(text.to_string()),
        (Some(_), true) => index.note(
            format_args!("{pp}address[{k}].text"),
            "not carried: the address as text beside its parts",
        ),
        (None, _) => {}
    }
    Some(Address {
        lines,
        city: owned(a.city.as_ref()),
        postcode: owned(a.postal_code.as_ref()),
    })
}

/// Whether `period` (checked already) includes `day` (`YYYY-MM-DD`), at
/// each bound's own precision: a period ending `2026-12` covers any day of
/// December 2026. A time is taken as England's day.
fn period_covers(period: &Period<'_>, day: &str) -> bool {
    let bound = |v: Option<&str>| v?.parse().ok().and_then(|w| day_text(&w));
    let starts = bound(period.start.as_deref()).is_none_or(|s| !later(&s, day));
    let ends = bound(period.end.as_deref()).is_none_or(|e| !later(day, &e));
    starts && ends
}

/// A dateTime as its day (England's, for a time), or its year or month
/// when it gives no more.
fn day_text(when: &crate::clinical::model::When) -> Option<String> {
    let text = when.to_string();
    if text.contains('T') {
        when.day_in_england().map(|d| d.to_string())
    } else {
        Some(text)
    }
}

/// Whether day-text `a` falls after `b`, compared at the coarser of their
/// precisions (`2026-12` is not after `2026-12-05`, nor before it).
fn later(a: &str, b: &str) -> bool {
    let n = a.len().min(b.len());
    a.get(..n) > b.get(..n)
}

/// Each address's period must read as dateTimes, start not after end.
fn check_address_periods(addresses: &[FhirAddress<'_>], pp: At<'_>, errors: &mut ValidationErrors) {
    for (k, a) in addresses.iter().enumerate() {
        if let Some(p) = &a.period {
            check_period(p, &format!("{pp}address[{k}].period"), errors);
        }
    }
}

/// A period (at `at`) must read as dateTimes, start not after end.
fn check_period(p: &Period<'_>, at: &str, errors: &mut ValidationErrors) {
    type When = crate::clinical::model::When;
    let start: Option<When> = parse_with(p.start.as_deref(), format_args!("{at}.start"), errors);
    let end: Option<When> = parse_with(p.end.as_deref(), format_args!("{at}.end"), errors);
    let (Some(start), Some(end)) = (start, end) else {
        return;
    };
    if let (Some(s), Some(e)) = (day_text(&start), day_text(&end))
        && later(&s, &e)
    {
        errors.add(at, "the period must not end before it starts (per-1)");
    }
}

/// The uses of a name that never make it the patient's: HumanName.use is a
/// modifier (R4), and a nickname, a temporary or anonymous name, an old or
/// a maiden name is not the name a record is kept under.
const NOT_THE_NAME: [&str; 5] = ["nickname", "temp", "anonymous", "old", "maiden"];

/// The patient's name as NHS systems mean it: the first `official` name in
/// use today, else the first `usual`, else the first with no `use`; never
/// one marked as in [`NOT_THE_NAME`] or whose period has ended (or not
/// begun). Every other name is listed. With names but none of these, each
/// is refused at the element that rules it out: read as the patient's, a
/// nickname or a former name would file the record under a name no other
/// record has.
fn name_in_use<'n, 'a>(
    index: &Index<'_>,
    names: &'n [HumanName<'a>],
    pp: At<'_>,
    errors: &mut ValidationErrors,
) -> Option<(usize, &'n HumanName<'a>)> {
    let today = Date(crate::clinical::model::date_in_england(
        time::OffsetDateTime::now_utc(),
    ))
    .to_string();
    let mut ruled_out: Vec<Option<(&str, String)>> = Vec::with_capacity(names.len());
    for (k, n) in names.iter().enumerate() {
        if let Some(p) = &n.period {
            check_period(p, &format!("{pp}name[{k}].period"), errors);
        }
        ruled_out.push(match (n.use_.as_deref(), &n.period) {
            (Some(u), _) if NOT_THE_NAME.contains(&u) => Some((
                "use",
                format!("a name marked {u} is not the patient's name in use"),
            )),
            (Some(u), _) if !matches!(u, "official" | "usual") => Some((
                "use",
                "not a name use R4 defines (usual, official, temp, nickname, anonymous, old, \
                 maiden)"
                    .to_owned(),
            )),
            (_, Some(p)) if !period_covers(p, &today) => Some((
                "period",
                "this name is not in use today (its period has ended, or not begun)".to_owned(),
            )),
            _ => None,
        });
    }
    let rank = |n: &HumanName<'_>| match n.use_.as_deref() {
        Some("official") => 0,
        Some("usual") => 1,
        _ => 2,
    };
    let chosen = (0..names.len())
        .filter(|k| ruled_out[*k].is_none())
        .min_by_key(|k| (rank(&names[*k]), *k));
    let Some(chosen) = chosen else {
        for (k, why) in ruled_out.into_iter().enumerate() {
            if let Some((element, why)) = why {
                errors.add(
                    format!("{pp}name[{k}].{element}"),
                    format!(
                        "{why}, and the Patient has no other: send the patient's official (or \
                         usual) name"
                    ),
                );
            }
        }
        return None;
    };
    for k in (0..names.len()).filter(|k| *k != chosen) {
        let why = if chosen == 0 {
            "only the first repetition is read"
        } else {
            "not carried: only the patient's name in use is read (official, else usual, else \
             one with no use)"
        };
        index.note(format_args!("{pp}name[{k}]"), why);
    }
    Some((chosen, &names[chosen]))
}

/// The registered practice: the first `generalPractitioner` that is an
/// Organization (an entry, or an ODS identifier alone). A Practitioner or
/// PractitionerRole names a person, not the practice, and is listed, as is
/// any further practice.
fn registered_practice(
    index: &Index<'_>,
    refs: &[Reference<'_>],
    pp: At<'_>,
    errors: &mut ValidationErrors,
) -> Option<OdsCode> {
    let mut practice = None;
    for (k, r) in refs.iter().enumerate() {
        let kind = r
            .reference
            .as_deref()
            .and_then(|u| index.position(u))
            .and_then(|i| index.kind(i))
            .or(r.type_.as_deref());
        // A logical reference to a person: an identifier not an ODS code
        // (an SDS user id), with no entry to follow.
        let person_by_id = r.reference.is_none()
            && r.identifier
                .as_ref()
                .is_some_and(|id| id.system.as_deref() != Some(SYS_ODS));
        if practice.is_some()
            || person_by_id
            || matches!(kind, Some("Practitioner" | "PractitionerRole"))
        {
            index.note(
                format_args!("{pp}generalPractitioner[{k}]"),
                "not carried: only the registered practice (an Organization) is read",
            );
            continue;
        }
        practice = index.ods(r, format_args!("{pp}generalPractitioner[{k}]"), errors);
    }
    practice
}

/// The patient's NHS number, prison number and CRN.
fn read_identifiers(
    index: &Index<'_>,
    identifiers: &[Identifier<'_>],
    pp: At<'_>,
    errors: &mut ValidationErrors,
) -> (Option<NhsNumber>, Option<PrisonNumber>, Option<Crn>) {
    let mut nhs = None;
    let mut prison = None;
    let mut crn = None;
    for (k, id) in identifiers.iter().enumerate() {
        let field = format_args!("{pp}identifier[{k}].value");
        let value = id.value.as_deref();
        let known = matches!(
            id.system.as_deref(),
            Some(SYS_NHS | SYS_PRISON_NUMBER | SYS_CRN)
        );
        if !known {
            index.note(
                format_args!("{pp}identifier[{k}]"),
                "an identifier system the gateway does not read",
            );
            continue;
        }
        if id.use_.as_deref() == Some("old") {
            index.note(
                format_args!("{pp}identifier[{k}]"),
                "not carried: an identifier no longer in use (use old)",
            );
            continue;
        }
        let at = format!("{pp}identifier[{k}]");
        match id.system.as_deref() {
            Some(SYS_NHS) => one_identifier(&mut nhs, parse_with(value, field, errors), at, errors),
            Some(SYS_PRISON_NUMBER) => {
                one_identifier(&mut prison, parse_with(value, field, errors), at, errors);
            }
            _ => one_identifier(&mut crn, parse_with(value, field, errors), at, errors),
        }
    }
    (nhs, prison, crn)
}

/// The Patient the Composition is about; none when it is not a Patient.
fn read_patient<'a>(
    index: &Index<'_>,
    pi: usize,
    pv: &'a super::tree::Value<'a>,
    errors: &mut ValidationErrors,
) -> Option<PatientRead<'a>> {
    let pp = index.path(pi);
    let fp: Patient = typed(pv, pp, errors)?;
    if fp.active == Some(false) {
        // Patient.active is a modifier (R4): false says the record should
        // not be treated as valid, a merged or retired duplicate.
        errors.add(
            format!("{pp}active"),
            "the patient's record is marked inactive (it may be a merged or retired \
             duplicate): send the summary from the record in use",
        );
    }
    // deceased[x] and link are modifiers too (R4): a summary that says the
    // patient has died, or that this record was replaced by another, must
    // not be routed as if it did not.
    if fp.deceased_boolean == Some(true) {
        errors.add(
            format!("{pp}deceasedBoolean"),
            "the patient is recorded as deceased: a summary is not routed to the carers of a \
             person who has died",
        );
    }
    if fp.deceased_date_time.is_some() {
        errors.add(
            format!("{pp}deceasedDateTime"),
            "the patient is recorded as deceased: a summary is not routed to the carers of a \
             person who has died",
        );
    }
    for (k, link) in fp.link.iter().enumerate() {
        // `refer` says this record is the one in use; only `replaced-by`
        // retires it.
        if link.type_.as_deref() == Some("replaced-by") {
            errors.add(
                format!("{pp}link[{k}].type"),
                "this patient record is replaced by another: send the summary from the record \
                 in use",
            );
        }
    }
    let (nhs, prison, crn) = read_identifiers(index, &fp.identifier, pp, errors);
    check_address_periods(&fp.address, pp, errors);
    let name = name_in_use(index, &fp.name, pp, errors);
    // With names but none in use, each was refused at what rules it out.
    let family_name = match name {
        None if !fp.name.is_empty() => None,
        _ => required(
            name.and_then(|(_, n)| n.family.as_ref())
                .map(|f| f.to_string()),
            format_args!("{pp}name[{}].family", name.map_or(0, |(k, _)| k)),
            errors,
            "the patient's family name",
        ),
    };
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
    let registered_gp = registered_practice(index, &fp.general_practitioner, pp, errors);
    let patient = match (family_name, dob) {
        (Some(family_name), Some(date_of_birth)) => Some(crate::clinical::model::Patient {
            nhs_number: nhs,
            prison_number: prison,
            crn,
            family_name,
            given_names: name
                .map(|(_, n)| n.given.iter().map(|g| g.to_string()).collect())
                .unwrap_or_default(),
            date_of_birth,
            sex,
        }),
        _ => None,
    };
    Some(PatientRead {
        patient,
        registered_gp,
        addresses: fp.address,
    })
}

/// The custody episode from the (first) Encounter, which is required.
fn read_custody(
    index: &Index<'_>,
    (comp, p0): (&Composition<'_>, At<'_>),
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<Custody> {
    let (ei, ev) = custody_encounter(index, (comp, p0), prefix, errors)?;
    let ep = index.path(ei);
    let enc = typed::<Encounter>(ev, ep, errors)?;
    let establishment = enc
        .service_provider
        .as_ref()
        .and_then(|r| index.ods(r, format_args!("{ep}serviceProvider"), errors));
    let establishment = required(
        establishment,
        format_args!("{ep}serviceProvider"),
        errors,
        "the establishment (an Organization with an ODS code)",
    );
    let hosp = enc.hospitalization.as_ref();
    let transfer_to = hosp
        .and_then(|h| h.destination.as_ref())
        .and_then(|r| index.ods(r, format_args!("{ep}hospitalization.destination"), errors));
    let period = enc.period.as_ref();
    let start = period.and_then(|p| p.start.as_deref());
    let end = period.and_then(|p| p.end.as_deref());
    let reception_date = day_of(start, format_args!("{ep}period.start"), index, errors);
    let (transfer_at, release_date) = if transfer_to.is_some() {
        (
            parse_with(end, format_args!("{ep}period.end"), errors),
            None,
        )
    } else {
        (
            None,
            day_of(end, format_args!("{ep}period.end"), index, errors),
        )
    };
    let disposition = hosp.and_then(|h| h.discharge_disposition.as_ref());
    let no_fixed_abode = disposition
        .and_then(|d| d.code_in(SYS_LOCAL))
        .and_then(|c| c.code.as_deref())
        == Some("no-fixed-abode");
    if let Some(d) = disposition
        && !no_fixed_abode
    {
        discharge_disposition(index, d, ep, errors);
    }
    establishment.map(|establishment| Custody {
        establishment,
        reception_date,
        transfer_at,
        transfer_to,
        release_date,
        release_address: None,
        no_fixed_abode,
    })
}

/// A discharge disposition other than the gateway's own no-fixed-abode: home
/// is a release as any other; a death is refused, since it is not a release
/// to anyone's care; any other (a psychiatric or other hospital, a hospice)
/// is listed as not carried, so the recipient sees that the patient went
/// somewhere other than home, never silently dropped.
fn discharge_disposition(
    index: &Index<'_>,
    d: &super::types::CodeableConcept<'_>,
    ep: At<'_>,
    errors: &mut ValidationErrors,
) {
    let at = format_args!("{ep}hospitalization.dischargeDisposition");
    let hl7 = d
        .code_in(SYS_DISCHARGE_DISPOSITION)
        .and_then(|c| c.code.as_deref());
    // UK Core's 79 is a death; its 19, the usual place of residence, also
    // covers no fixed abode, so it is listed like any other, never read as
    // home (which would lose that the patient may have none).
    let uk_core = d
        .code_in(SYS_DISCHARGE_DESTINATION_ENGLAND)
        .and_then(|c| c.code.as_deref())
        .map(|code| if code == "79" { "exp" } else { code });
    match hl7.or(uk_core) {
        Some("home") => {}
        Some("exp") => errors.add(
            at.to_string(),
            "the patient died (exp): a death in custody is not a release, and its summary is \
             not routed to community carers",
        ),
        Some(code) if code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => index.note(
            at,
            &format!("not carried: a discharge disposition of {code}"),
        ),
        _ => index.note(at, "not carried: a discharge disposition other than home"),
    }
}

/// A withdrawn document, or a status composition-status does not define,
/// is refused; a preliminary one is carried as final, and says so.
fn composition_status(index: &Index<'_>, status: &str, p0: At<'_>, errors: &mut ValidationErrors) {
    match status {
        "final" | "amended" => {}
        "preliminary" => index.note(
            format_args!("{p0}status"),
            "not carried: preliminary (carried as final)",
        ),
        "entered-in-error" => errors.add(
            format!("{p0}status"),
            "a document entered in error is withdrawn, not sent: send the corrected \
             summary instead (it supersedes the earlier one)",
        ),
        _ => errors.add(
            format!("{p0}status"),
            "must be preliminary, final or amended (FHIR composition-status)",
        ),
    }
}

/// The custody episode's Encounter: the one `Composition.encounter` names,
/// else the Bundle's only Encounter. Several without that reference is
/// refused: the wrong one would give the wrong dates and deadlines.
fn custody_encounter<'a>(
    index: &Index<'a>,
    (comp, p0): (&Composition<'_>, At<'_>),
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Option<(usize, &'a super::tree::Value<'a>)> {
    if let Some(r) = comp.encounter.as_ref().filter(|r| r.reference.is_some()) {
        let before = errors.0.len();
        return match index.resolve_current(r, || format!("{p0}encounter"), errors) {
            Some((ei, ev)) if index.kind(ei) == Some("Encounter") => Some((ei, ev)),
            _ if errors.0.len() > before => None,
            _ => {
                errors.add(
                    format!("{p0}encounter"),
                    "must refer to the custody episode's Encounter in the Bundle",
                );
                None
            }
        };
    }
    let mut encounters = index.of_type("Encounter");
    let Some(first) = encounters.next() else {
        errors.add(
            format!("{prefix}entry"),
            "an Encounter for the custody episode is required",
        );
        return None;
    };
    if encounters.next().is_some() {
        errors.add(
            format!("{p0}encounter"),
            "required when the Bundle holds several Encounters: which one is the custody \
             episode",
        );
        return None;
    }
    Some(first)
}

/// Every section entry the Bundle does not hold is listed: the document
/// lost part of itself on the way (a medicine, an allergy) and the
/// recipient must know; refusing would lose the rest (the published NHS
/// examples, assembled, refer beyond their Bundle).
fn sections_resolve(index: &Index<'_>, sections: &[Section<'_>], at: &str) {
    for (i, section) in sections.iter().enumerate() {
        for (j, r) in section.entry.iter().enumerate() {
            let found = r.reference.as_deref().and_then(|url| index.position(url));
            if found.is_none() {
                index.note(
                    format_args!("{at}[{i}].entry[{j}]"),
                    "not carried: a section entry the Bundle does not hold (the document \
                     arrived without it)",
                );
            }
        }
    }
}

/// Medicines from MedicationStatements.
fn read_medications(
    index: &Index<'_>,
    written: Option<DateTime>,
    errors: &mut ValidationErrors,
) -> Vec<Medication> {
    let mut doses = doses_given(index, written);
    let mut s_medications = Vec::new();
    for (i, v) in index.of_type("MedicationStatement") {
        let p = index.path(i);
        let Some(m) = typed::<MedicationStatement>(v, p, errors) else {
            continue;
        };
        let coded = super::read::medication_codes(
            index,
            (
                m.medication_codeable_concept.as_ref(),
                m.medication_reference.as_ref(),
            ),
            v,
            p,
            errors,
        );
        let mut last_dose_given = None;
        let mut days_supplied = None;
        for (k, e) in m.extension.iter().enumerate() {
            if matches!(&*e.url, EXT_LAST_DOSE | EXT_DAYS_SUPPLIED)
                && m.extension[..k].iter().any(|earlier| earlier.url == e.url)
            {
                // Two last doses: which one is right cannot be told, and the
                // wrong one risks a double dose on release.
                errors.add(
                    format!("{p}extension[{k}]"),
                    "given more than once: the medicine's last dose and days supplied are each \
                     stated once",
                );
                continue;
            }
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
        if let Some(coded) = coded {
            let regimen = super::dosage::regimen(index, &m.dosage, &format!("{p}dosage"));
            last_dose_given = last_dose(
                &mut doses,
                (&coded, &regimen.route),
                last_dose_given,
                (index, errors),
            );
            let code = coded.code;
            // Our category, or the medicine itself with its last dose given:
            // a UK Core sender has no national code for OST, and methadone
            // read as an ordinary medicine reached no substance misuse
            // service and no urgency. Without a last dose it stays an
            // ordinary medicine: OST without one is refused (its next dose
            // cannot be timed), and a summary refused reaches no one.
            let opioid_substitution = m
                .category
                .as_ref()
                .and_then(|c| c.code_in(SYS_LOCAL))
                .and_then(|c| c.code.as_deref())
                == Some("opioid-substitution")
                || (last_dose_given.is_some()
                    && crate::clinical::treatment::is_opioid_substitution_medicine(
                        &code,
                        Some(regimen.route.as_str()),
                    ));
            s_medications.push(Medication {
                code,
                dose: regimen.dose,
                route: regimen.route,
                frequency: regimen.frequency,
                supervised: regimen.supervised,
                as_needed: regimen.as_needed,
                opioid_substitution,
                last_dose_given,
                days_supplied,
            });
        }
    }
    for dose in doses.iter().filter(|d| !d.carried) {
        index.note(
            format_args!(
                "{}entry[{}].resource (MedicationAdministration)",
                index.prefix(),
                dose.entry
            ),
            "not carried: a dose given; only the last dose of an opioid substitution medicine is \
             carried, as its last dose given",
        );
    }
    s_medications
}

/// A dose the Bundle records as given (a completed MedicationAdministration).
struct DoseGiven {
    entry: usize,
    medicine: super::read::Coded,
    /// The route it was given by, in words, when stated.
    route: Option<String>,
    at: DateTime,
    /// The element `at` was read from.
    element: &'static str,
    /// Carried as an opioid substitution medicine's last dose given.
    carried: bool,
}

impl DoseGiven {
    /// A dose of opioid substitution medicine `medicine` (matched by the
    /// codings both write: [`super::read::Coded::same_medicine`]), by a
    /// route that is one.
    fn of_substitution(&self, medicine: &super::read::Coded) -> bool {
        medicine.same_medicine(&self.medicine)
            && crate::clinical::treatment::is_opioid_substitution_medicine(
                &self.medicine.code,
                self.route.as_deref(),
            )
    }
}

/// Without our extension, the last dose of an opioid substitution medicine
/// is the latest administration of it the Bundle records (as a UK Core
/// sender records a dose given); that administration is then carried. With
/// the extension, an administration after the last dose it states refuses
/// the document: which dose was the last cannot be told, and the wrong one
/// risks a double dose.
fn last_dose(
    doses: &mut [DoseGiven],
    (medicine, route): (&super::read::Coded, &str),
    stated: Option<DateTime>,
    (index, errors): (&Index<'_>, &mut ValidationErrors),
) -> Option<DateTime> {
    if !crate::clinical::treatment::is_opioid_substitution_medicine(&medicine.code, Some(route)) {
        return stated;
    }
    if let Some(stated) = stated {
        for later in doses
            .iter()
            .filter(|d| d.of_substitution(medicine) && d.at > stated)
        {
            errors.add(
                format!("{}{}", index.path(later.entry), later.element),
                "a dose given after the last dose the medicine states (its last-dose-given \
                 extension): which was the last cannot be told",
            );
        }
        return Some(stated);
    }
    let latest = doses
        .iter_mut()
        .filter(|d| d.of_substitution(medicine))
        .max_by_key(|d| d.at)?;
    latest.carried = true;
    Some(latest.at)
}

/// The doses the Bundle records as given before the summary was `written`.
/// An administration that is not a completed dose with its medicine and
/// time is listed, never read, and never refuses the document: it is read
/// only to time the next dose.
fn doses_given(index: &Index<'_>, written: Option<DateTime>) -> Vec<DoseGiven> {
    let mut doses = Vec::new();
    for (i, v) in index.of_type("MedicationAdministration") {
        let p = index.path(i);
        let at = format_args!(
            "{}entry[{i}].resource (MedicationAdministration)",
            index.prefix()
        );
        // Read apart: a fault here is listed, not a reason to refuse.
        let mut faults = ValidationErrors::default();
        let Some(a) = typed::<MedicationAdministration>(v, p, &mut faults) else {
            index.note(at, "not carried: not readable as a dose given");
            continue;
        };
        if a.status != "completed" {
            index.note(
                at,
                &format!(
                    "not carried: not a dose given (status {})",
                    super::unread::safe_word(&a.status)
                ),
            );
            continue;
        }
        let coded = super::read::medication_codes(
            index,
            (
                a.medication_codeable_concept.as_ref(),
                a.medication_reference.as_ref(),
            ),
            v,
            p,
            &mut faults,
        );
        let (text, element) = match (a.effective_date_time.as_deref(), &a.effective_period) {
            (Some(t), _) => (Some(t), "effectiveDateTime"),
            (None, Some(period)) => (period.end.as_deref(), "effectivePeriod.end"),
            (None, None) => (None, "effectiveDateTime"),
        };
        let when = text.and_then(|t| t.parse::<DateTime>().ok());
        let route = a.dosage.and_then(|d| d.route).and_then(|r| {
            r.text
                .or_else(|| r.coding.into_iter().find_map(|c| c.display))
                .map(std::borrow::Cow::into_owned)
        });
        match (coded, when) {
            (Some(_), Some(when)) if written.is_some_and(|w| when > w) => {
                index.note(at, "not carried: given after the summary was written")
            }
            (Some(medicine), Some(when)) if faults.0.is_empty() => doses.push(DoseGiven {
                entry: i,
                medicine,
                route,
                at: when,
                element,
                carried: false,
            }),
            _ => index.note(
                at,
                "not carried: a dose given needs its medicine and the date and time it was \
                 given (effectiveDateTime or effectivePeriod.end, with seconds and offset)",
            ),
        }
    }
    doses
}

/// Allergies from AllergyIntolerances.
fn read_allergies(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<Allergy> {
    let mut s_allergies = Vec::new();
    for (i, v) in index.of_type("AllergyIntolerance") {
        let p = index.path(i);
        qualifier_notes(index, i);
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
        let in_reaction = reaction.and_then(|r| r.substance.as_ref());
        let substance = match (&a.code, in_reaction) {
            // The allergy in words beside a coded substance: the code is
            // carried, the words listed (a code routes and matches).
            (Some(code), Some(substance))
                if !code.coding.iter().any(|c| c.code.is_some())
                    && substance.coding.iter().any(|c| c.code.is_some()) =>
            {
                index.note(
                    format_args!("{p}code"),
                    "not carried: the allergy in words beside its reaction's coded substance",
                );
                parse_code(substance, format_args!("{p}reaction[0].substance"), errors)
            }
            (Some(code), other) => {
                if other.is_some() {
                    index.note(
                        format_args!("{p}reaction[0].substance"),
                        "not carried: the reaction's substance beside the allergy's code",
                    );
                }
                parse_code_or_words(code, format_args!("{p}code"), errors)
            }
            (None, Some(substance)) => {
                parse_code_or_words(substance, format_args!("{p}reaction[0].substance"), errors)
            }
            (None, None) => {
                errors.add(
                    format!("{p}code"),
                    "required: the substance (code, or reaction[0].substance)",
                );
                None
            }
        };
        if let Some(substance) = substance {
            s_allergies.push(Allergy {
                substance,
                reaction: {
                    let manifestation = reaction.and_then(|r| r.manifestation.first());
                    let text = manifestation.and_then(|m| {
                        m.text
                            .as_ref()
                            .or_else(|| m.coding.first().and_then(|c| c.display.as_ref()))
                    });
                    if text.is_none() && manifestation.is_some_and(|m| !m.coding.is_empty()) {
                        index.note(
                            format_args!("{p}reaction[0].manifestation[0]"),
                            "not carried: a coded reaction without text or display (the model \
                             holds the reaction as text)",
                        );
                    }
                    text.map(|t| t.to_string())
                },
                severity,
            });
        }
    }
    s_allergies
}

/// Risks from Flags.
fn read_risks(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<RiskFlag> {
    let mut s_risks = Vec::new();
    for (i, v) in index.of_type("Flag") {
        let p = index.path(i);
        let Some(f) = typed::<Flag>(v, p, errors) else {
            continue;
        };
        let Some((kind, code)) = risk_kind(&f.code, p, errors) else {
            continue;
        };
        for (j, c) in f.code.coding.iter().enumerate() {
            let used = c.system.as_deref() == Some(SYS_RISK)
                || code.as_ref().is_some_and(|k| {
                    c.system.as_deref() == Some(k.system.as_str())
                        && c.code.as_deref() == Some(k.code.as_str())
                });
            if !used {
                index.note(
                    format_args!("{p}code.coding[{j}]"),
                    "not carried: a further coding of the risk (its SNOMED CT coding, or \
                     else its first, is carried)",
                );
            }
        }
        let note = f
            .extension
            .iter()
            .find(|e| e.url == EXT_NOTE)
            .and_then(|e| e.value_string.as_ref())
            .map(|n| n.to_string());
        // The Flag's own words (`code.text`) are its note when it has none;
        // beside a note they are listed, never dropped.
        let code_text = f.code.text.as_ref().map(|t| t.to_string());
        let note = match (note, code_text) {
            (None, text) => text,
            (Some(note), Some(_)) => {
                index.note(
                    format_args!("{p}code.text"),
                    "not carried: the Flag's text beside its note extension",
                );
                Some(note)
            }
            (note, None) => note,
        };
        if kind == RiskKind::Other && code.is_none() && note.is_none() {
            errors.add(
                format!("{p}code"),
                "a risk needs a coding (SNOMED CT, say) or text saying what it is",
            );
            continue;
        }
        s_risks.push(RiskFlag {
            kind,
            active: f.status == "active",
            note,
            code,
        });
    }
    s_risks
}

/// A Flag's kind and its code as recorded. The gateway's own risk code
/// names the kind when present; otherwise a SNOMED CT concept whose meaning
/// is unambiguous does ([`RiskKind::from_snomed`]), and any other risk is
/// [`RiskKind::Other`], carried with its coding (SNOMED CT first) so the
/// next carer still sees it. None (an error recorded) for a code of the
/// gateway's own system that is not one of its kinds.
fn risk_kind(
    cc: &CodeableConcept<'_>,
    p: impl std::fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<(RiskKind, Option<Code>)> {
    let recorded =
        |c: &&Coding<'_>| c.system.as_deref().is_some_and(|s| s != SYS_RISK) && c.code.is_some();
    let code = cc
        .coding
        .iter()
        .filter(recorded)
        .find(|c| c.system.as_deref() == Some(SNOMED))
        .or_else(|| cc.coding.iter().find(recorded))
        .map(|c| Code {
            system: owned(c.system.as_ref()),
            code: owned(c.code.as_ref()),
            display: owned(c.display.as_ref()),
        });
    let kind = match cc
        .coding
        .iter()
        .position(|c| c.system.as_deref() == Some(SYS_RISK))
    {
        Some(j) => {
            let local = cc.coding[j].code.as_deref().unwrap_or_default();
            let Some(kind) = RiskKind::from_code(local) else {
                errors.add(
                    format!("{p}code.coding[{j}].code"),
                    "must be suicide, self-harm, violence, vulnerability or other",
                );
                return None;
            };
            kind
        }
        None => code
            .as_ref()
            .filter(|c| c.system == SNOMED)
            .and_then(|c| RiskKind::from_snomed(&c.code))
            .unwrap_or(RiskKind::Other),
    };
    Some((kind, code))
}

/// Diagnoses from Conditions.
fn read_conditions(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<Diagnosis> {
    let mut s_diagnoses = Vec::new();
    for (i, v) in index.of_type("Condition") {
        let p = index.path(i);
        qualifier_notes(index, i);
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
        if let Some(code) = parse_code_or_words(&c.code, format_args!("{p}code"), errors) {
            s_diagnoses.push(Diagnosis {
                code,
                active,
                onset,
            });
        }
    }
    s_diagnoses
}

/// Vaccinations from Immunizations.
fn read_immunizations(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<Vaccination> {
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
    s_vaccinations
}

/// Infections, mental health and substance misuse from Observations, by
/// category and code; any other observation is listed as not carried.
/// The observations a document gives once: the care programme approach,
/// its care coordinator, substance misuse treatment and its service.
const ONE_PER_DOCUMENT: [&str; 4] = [
    "care-programme-approach",
    "care-coordinator",
    "substance-misuse-treatment",
    "substance-misuse-service",
];

/// One of each of [`ONE_PER_DOCUMENT`] per document: a second saying
/// otherwise would silently win (a CPA of true undone by a later false, and
/// the community mental health team never told), so it is refused. `given`
/// holds where each was first seen and its value.
fn once_per_document(
    given: &mut std::collections::HashMap<&'static str, (String, String)>,
    local_code: Option<&str>,
    o: &Observation<'_>,
    p: At<'_>,
    errors: &mut ValidationErrors,
) {
    let Some(kind) = ONE_PER_DOCUMENT
        .into_iter()
        .find(|k| Some(*k) == local_code)
    else {
        return;
    };
    let value = o
        .value_boolean
        .map(|b| b.to_string())
        .or_else(|| o.value_string.as_ref().map(|v| v.to_string()))
        .unwrap_or_default();
    match given.get(kind) {
        Some((first, v)) if *v != value => errors.add(
            format!("{p}code"),
            format!(
                "a second {kind} observation saying otherwise (the first is {first}): which is \
                 in force cannot be told"
            ),
        ),
        Some(_) => {}
        None => {
            given.insert(kind, (p.to_string(), value));
        }
    }
}

fn read_observations(
    index: &Index<'_>,
    errors: &mut ValidationErrors,
) -> (
    Vec<Infection>,
    Option<MentalHealth>,
    Option<SubstanceMisuse>,
) {
    let mut s_infections = Vec::new();
    let mut mental_health: Option<MentalHealth> = None;
    let mut substance_misuse: Option<SubstanceMisuse> = None;
    // Each of [`ONE_PER_DOCUMENT`] seen: where first, and its value.
    let mut given: std::collections::HashMap<&'static str, (String, String)> =
        std::collections::HashMap::new();
    for (i, v) in index.of_type("Observation") {
        let p = index.path(i);
        let Some(o) = typed::<Observation>(v, p, errors) else {
            continue;
        };
        // Not yet final: carried (the gateway writes final), and said so, as
        // a preliminary Composition is.
        if let status @ ("registered" | "preliminary" | "unknown") = &*o.status {
            index.note(
                format_args!("{p}status"),
                &format!("not carried: {status} (carried as final)"),
            );
        }
        let category = o
            .category
            .iter()
            .find_map(|c| c.code_in(SYS_LOCAL))
            .and_then(|c| c.code.as_deref());
        let local_code = o.code.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref());
        let value_string = || o.value_string.as_ref().map(|v| v.to_string());
        // A yes-or-no observation without its boolean (a coded value, a
        // dataAbsentReason) is refused: read as "no" it would say the
        // patient is not on CPA or not in treatment.
        let yes_or_no = |errors: &mut ValidationErrors| {
            if o.value_boolean.is_none() {
                errors.add(
                    format!("{p}valueBoolean"),
                    "required for this observation: true or false (any other value could be \
                     read as no)",
                );
            }
            o.value_boolean.unwrap_or(false)
        };
        once_per_document(&mut given, local_code, &o, p, errors);
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
                    .care_programme_approach = yes_or_no(errors)
            }
            (_, Some("care-coordinator")) => {
                mental_health
                    .get_or_insert_with(MentalHealth::default)
                    .care_coordinator = value_string()
            }
            (_, Some("substance-misuse-treatment")) => {
                substance_misuse
                    .get_or_insert_with(SubstanceMisuse::default)
                    .in_treatment = yes_or_no(errors)
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
    (s_infections, mental_health, substance_misuse)
}

/// Follow-ups from ServiceRequests.
fn read_service_requests(index: &Index<'_>, errors: &mut ValidationErrors) -> Vec<FollowUp> {
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
    s_follow_ups
}

/// The probation-sharing decision from the (first) Consent; none recorded
/// without one.
fn read_consent(
    index: &Index<'_>,
    errors: &mut ValidationErrors,
) -> Option<crate::clinical::model::Consent> {
    let mut consent = crate::clinical::model::Consent {
        probation_sharing: ConsentDecision::NotRecorded,
        legal_basis: None,
        treatment_sharing: ConsentDecision::NotRecorded,
    };
    let mut found: Option<usize> = None;
    for (i, v) in index.of_type("Consent") {
        let p = index.path(i);
        let c = typed::<Consent>(v, p, errors)?;
        // Only a Consent about sharing with probation decides it: another
        // (consent to treatment, say) must never be read as that.
        let about_probation = c.category.iter().any(|cat| {
            cat.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("probation-sharing")
        });
        if !about_probation {
            index.note(
                format_args!("{p}category"),
                "not read: a Consent about something other than sharing with probation",
            );
            continue;
        }
        if found.replace(i).is_some() {
            errors.add(
                format!("{p}category"),
                "one Consent about sharing with probation: two could disagree",
            );
            continue;
        }
        let legal_basis = c
            .policy_rule
            .as_ref()
            .filter(|r| r.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("legal-basis"))
            .and_then(|r| r.text.as_ref())
            .map(|t| t.to_string());
        // A legal basis shares without the patient's consent, so only one in
        // force counts: an active Consent, or a proposed one (no decision
        // yet, as the gateway writes it). One on an inactive, rejected or
        // draft Consent has ended or never started.
        consent.legal_basis = match &*c.status {
            "active" | "proposed" => legal_basis,
            _ => {
                if legal_basis.is_some() {
                    index.note(
                        format_args!("{p}policyRule"),
                        "not read: a legal basis on a Consent that is not in force (its status)",
                    );
                }
                None
            }
        };
        consent.probation_sharing = match c.provision.as_ref().and_then(|p| p.type_.as_deref()) {
            Some("deny") => ConsentDecision::Refused,
            // A permission with conditions (a period, nested provisions,
            // limits by data, actor or class) cannot be honoured as given:
            // the gateway shares whole headings. It is not read as given.
            Some("permit") if c.status == "active" && !conditional(index, i) => {
                ConsentDecision::Given
            }
            Some("permit") if c.status == "active" => {
                index.note(
                    format_args!("{p}provision"),
                    "not read as given: a permission with conditions (period, nested provisions \
                     or limits) is not one the gateway can honour, so nothing is shared on it",
                );
                ConsentDecision::NotRecorded
            }
            _ => ConsentDecision::NotRecorded,
        };
    }
    Some(consent)
}

/// Whether a Consent's `provision` holds anything beyond its `type`.
fn conditional(index: &Index<'_>, i: usize) -> bool {
    index
        .tree(i)
        .get("provision")
        .and_then(|p| p.as_object())
        .is_some_and(|p| {
            p.keys()
                .any(|k| !matches!(k, "type" | "id" | "fhir_comments"))
        })
}

/// The author's name and role, when the Composition's author is a
/// Practitioner.
fn read_author(
    comp: &Composition<'_>,
    index: &Index<'_>,
    errors: &mut ValidationErrors,
) -> Option<(String, String)> {
    comp.author
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
        })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_doc::{entry_of, read_after, refused};

    /// The Patient's names set to `names`, read.
    fn with_names(
        names: Value,
    ) -> Result<crate::clinical::ClinicalSummary, crate::clinical::ValidationErrors> {
        read_after(|doc| {
            let (_, p) = entry_of(doc, "Patient");
            p["name"] = names;
        })
    }

    /// Every MedicationStatement of the document without its category,
    /// the first one named `display`, with a last dose given when
    /// `last_dose`, read.
    fn medicines_uncategorised(
        display: Option<&str>,
        last_dose: bool,
    ) -> Vec<crate::clinical::model::Medication> {
        read_after(|doc| {
            let mut first = true;
            for e in doc["entry"].as_array_mut().unwrap() {
                let r = &mut e["resource"];
                if r["resourceType"] == "MedicationStatement" {
                    r.as_object_mut().unwrap().remove("category");
                    if let Some(d) = display.filter(|_| first) {
                        r["medicationCodeableConcept"]["coding"][0]["display"] = json!(d);
                        r["medicationCodeableConcept"]["text"] = json!(d);
                        if last_dose {
                            r["extension"] = json!([{
                                "url": super::EXT_LAST_DOSE,
                                "valueDateTime": "2026-11-24T08:10:00Z"
                            }]);
                        }
                    }
                    first = false;
                }
            }
        })
        .unwrap()
        .medications
    }

    /// A UK Core sender has no code for opioid substitution: methadone or
    /// buprenorphine with its last dose given is read as it by name, never a
    /// pain patch; without a last dose it stays an ordinary medicine, and
    /// the summary is not refused.
    #[test]
    fn opioid_substitution_is_read_from_the_medicine_without_our_category() {
        let read = medicines_uncategorised(None, false);
        assert!(!read.is_empty() && read.iter().all(|m| !m.opioid_substitution));
        let first_is_ost =
            |display, dose| medicines_uncategorised(Some(display), dose)[0].opioid_substitution;
        assert!(first_is_ost(
            "Methadone 1mg/ml oral solution sugar free",
            true
        ));
        assert!(first_is_ost("Espranor 8mg oral lyophilisates", true));
        assert!(!first_is_ost(
            "BuTrans 10micrograms/hour transdermal patches",
            true
        ));
        assert!(!first_is_ost(
            "Methadone 1mg/ml oral solution sugar free",
            false
        ));
    }

    /// A name with `use` and `family` (given "Daniel"), in use over `period`.
    fn name(u: Option<&str>, family: Option<&str>, period: Option<Value>) -> Value {
        let mut n = json!({"given": ["Daniel"]});
        if let Some(u) = u {
            n["use"] = json!(u);
        }
        if let Some(f) = family {
            n["family"] = json!(f);
        }
        if let Some(p) = period {
            n["period"] = p;
        }
        n
    }

    /// The patient's name is the one NHS systems keep the record under:
    /// official, else usual, else one with no use, in use today. A nickname,
    /// a temporary, anonymous, old or maiden name, or one whose period has
    /// ended, is never read as it (HumanName.use is a modifier), wherever it
    /// stands in the list.
    #[test]
    fn the_patients_name_is_the_official_one_in_use() {
        let ended = json!({"end": "2010-01-01"});
        let not_begun = json!({"start": "2999-01-01"});
        let current = json!({"start": "2001-05", "end": "2999-12"});
        for (names, family) in [
            (
                vec![
                    name(Some("nickname"), Some("Smithy"), None),
                    name(Some("official"), Some("Okonkwo-Pryce"), None),
                ],
                "Okonkwo-Pryce",
            ),
            (
                vec![
                    name(Some("temp"), Some("Temp"), None),
                    name(Some("anonymous"), Some("Patient"), None),
                    name(Some("maiden"), Some("Maiden"), None),
                    name(None, Some("Okonkwo-Pryce"), None),
                ],
                "Okonkwo-Pryce",
            ),
            (
                vec![
                    name(Some("official"), Some("Old"), Some(ended.clone())),
                    name(Some("official"), Some("Later"), Some(not_begun.clone())),
                    name(Some("official"), Some("Okonkwo-Pryce"), Some(current)),
                ],
                "Okonkwo-Pryce",
            ),
            (
                vec![
                    name(Some("usual"), None, None),
                    name(None, Some("Plain"), None),
                    name(Some("official"), Some("Okonkwo-Pryce"), None),
                ],
                "Okonkwo-Pryce",
            ),
            (
                vec![
                    name(None, Some("Plain"), None),
                    name(Some("usual"), Some("Usual"), None),
                ],
                "Usual",
            ),
        ] {
            let s = with_names(json!(names)).expect("read");
            assert_eq!(s.patient.family_name, family, "{names:?}");
            assert!(
                s.not_read
                    .iter()
                    .any(|n| n.contains("name[0]: not carried: only the patient's name in use")),
                "{:?}",
                s.not_read
            );
        }
        // The first in use: the others are listed as before.
        let s = with_names(json!([
            name(Some("official"), Some("Okonkwo-Pryce"), None),
            name(Some("nickname"), Some("Smithy"), None),
        ]))
        .expect("read");
        assert_eq!(s.patient.family_name, "Okonkwo-Pryce");
        assert!(
            s.not_read
                .iter()
                .any(|n| n.ends_with("name[1]: only the first repetition is read")),
            "{:?}",
            s.not_read
        );
    }

    /// With names but none in use, each is refused at what rules it out:
    /// read as the patient's, a nickname or a former name would file the
    /// record under a name no other record has.
    #[test]
    fn with_no_name_in_use_each_is_refused_where_it_is_ruled_out() {
        let ended = json!({"end": "2010-01-01"});
        let not_begun = json!({"start": "2999-01-01"});
        // None in use: each refused at what rules it out.
        for (names, fields) in [
            (
                json!([name(Some("nickname"), Some("Smithy"), None)]),
                vec!["name[0].use"],
            ),
            (
                json!([
                    name(Some("official"), Some("Old"), Some(ended)),
                    name(Some("old"), Some("Older"), None),
                    name(Some("usual"), Some("Later"), Some(not_begun)),
                ]),
                vec!["name[0].period", "name[1].use", "name[2].period"],
            ),
            (
                json!([name(Some("official"), None, None)]),
                vec!["name[0].family"],
            ),
        ] {
            let got = refused(with_names(names.clone()));
            for field in fields {
                assert!(
                    got.iter()
                        .any(|f| f.ends_with(&format!("resource.{field}"))),
                    "{names}: {got:?}"
                );
            }
        }
        // A period that cannot be read is refused where it is.
        let got = refused(with_names(json!([name(
            Some("official"),
            Some("Okonkwo-Pryce"),
            Some(json!({"end": "someday"}))
        )])));
        assert!(
            got.iter().any(|f| f.ends_with("name[0].period.end")),
            "{got:?}"
        );
    }
}
