//! What a resource holds beyond what the parser reads.
//!
//! Each resource type we read has a schema: the element paths the parser
//! turns into the model (or re-derives on the way out, like `status`). A
//! walk over the resource as received lists every other element by its
//! path, so a delivery can say what it does not carry. FHIR's rule for
//! modifiers is enforced here too: an element that changes the meaning of
//! what holds it (`modifierExtension`, `implicitRules`) and that we do not
//! understand refuses the document.
//!
//! Schema entries are dotted paths below the resource. A suffix names a
//! datatype whose usual parts are all read: `code{cc}` a CodeableConcept
//! (`coding.system|code|display`, `text`), `subject{ref}` a Reference
//! (`reference`), `class{coding}` a Coding; `code{cc*}` a CodeableConcept
//! whose codings the parser weighs one by one and lists itself;
//! `custodian{org}` a Reference to an Organization, by entry or ODS code.

use std::fmt;
use std::sync::OnceLock;

use super::tree::{Map, Value};

use super::{EXT_DAYS_SUPPLIED, EXT_DOSE, EXT_LAST_DOSE, EXT_NOTE, EXT_TREATMENT_STARTED};

/// Extension URLs read on an element below the resource, by its path.
const ELEMENT_EXTENSIONS: [(&str, &str); 1] = [("dosage", EXT_DOSE)];
use crate::clinical::violation::ValidationErrors;

/// The elements of one resource type the parser reads.
pub(super) struct Schema {
    known: &'static [&'static str],
    /// Repeating elements of which only the first is read.
    first_only: &'static [&'static str],
    /// Extension URLs read (on the resource itself).
    extensions: &'static [&'static str],
    /// `known` and `first_only` spelt out path by path, sorted, on first use.
    expanded: OnceLock<Expanded>,
}

/// A schema's paths, each as the walk compares it.
struct Expanded {
    known: Vec<String>,
    first_only: Vec<String>,
}

/// Every resource: its type, its id (references are resolved and re-minted)
/// and the profiles it claims (ours are declared afresh on the way out).
const COMMON: [&str; 4] = ["resourceType", "id", "meta", "meta.profile"];

/// The resource types the gateway reads, each with its schema.
static SCHEMAS: [(&str, Schema); 16] = [
    (
        "Medication",
        Schema {
            known: &["code{cc}"],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Composition",
        Schema {
            known: &[
                "status",
                "type{cc}",
                "subject{ref}",
                "date",
                "author{ref}",
                "title",
                "custodian{org}",
                "encounter{ref}",
                "event",
                "event.code{cc}",
                "section",
                "section.title",
                "section.code{cc}",
                "section.entry{ref}",
            ],
            first_only: &["author"],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Patient",
        Schema {
            known: &[
                "identifier",
                "identifier.use",
                "identifier.system",
                "identifier.value",
                "name",
                "name.use",
                "name.family",
                "name.given",
                "name.period",
                "name.period.start",
                "name.period.end",
                "gender",
                "birthDate",
                "active",
                "deceasedBoolean",
                "deceasedDateTime",
                "address",
                "address.use",
                "address.text",
                "address.line",
                "address.city",
                "address.postalCode",
                "address.period",
                "address.period.start",
                "address.period.end",
                "generalPractitioner{org}",
            ],
            // Names are weighed one by one; the parser lists those not read.
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Organization",
        Schema {
            known: &["identifier", "identifier.system", "identifier.value"],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Practitioner",
        Schema {
            known: &[
                "name",
                "name.text",
                "name.family",
                "qualification",
                "qualification.code{cc}",
            ],
            first_only: &["name", "qualification"],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Encounter",
        Schema {
            known: &[
                "status",
                "class{coding}",
                "subject{ref}",
                "period",
                "period.start",
                "period.end",
                "serviceProvider{org}",
                "hospitalization",
                "hospitalization.destination{org}",
                "hospitalization.dischargeDisposition{cc}",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Condition",
        Schema {
            known: &[
                "clinicalStatus{cc}",
                "verificationStatus{cc}",
                "code{cc}",
                "subject{ref}",
                "onsetDateTime",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "MedicationStatement",
        Schema {
            known: &[
                "status",
                "category{cc}",
                "medicationCodeableConcept{cc}",
                "medicationReference{ref}",
                "contained",
                "contained.resourceType",
                "contained.id",
                "contained.code{cc}",
                "subject{ref}",
                "dosage",
                "dosage.sequence",
                "dosage.text",
                "dosage.additionalInstruction{cc}",
                "dosage.timing",
                "dosage.timing.code{cc}",
                "dosage.timing.repeat",
                "dosage.timing.repeat.frequency",
                "dosage.timing.repeat.period",
                "dosage.timing.repeat.periodUnit",
                "dosage.timing.repeat.frequencyMax",
                "dosage.timing.repeat.periodMax",
                "dosage.timing.repeat.when",
                "dosage.timing.repeat.timeOfDay",
                "dosage.route{cc}",
                "dosage.asNeededBoolean",
                "dosage.asNeededCodeableConcept",
                "dosage.doseAndRate",
                "dosage.doseAndRate.doseQuantity",
                "dosage.doseAndRate.doseQuantity.value",
                "dosage.doseAndRate.doseQuantity.unit",
                "dosage.doseAndRate.doseQuantity.system",
                "dosage.doseAndRate.doseQuantity.code",
            ],
            first_only: &["dosage.doseAndRate"],
            extensions: &[EXT_LAST_DOSE, EXT_DAYS_SUPPLIED],
            expanded: OnceLock::new(),
        },
    ),
    (
        "MedicationAdministration",
        Schema {
            known: &[
                "status",
                "medicationCodeableConcept{cc}",
                "medicationReference{ref}",
                "contained",
                "contained.resourceType",
                "contained.id",
                "contained.code{cc}",
                "subject{ref}",
                "effectiveDateTime",
                "effectivePeriod",
                "effectivePeriod.end",
                "dosage",
                "dosage.route{cc}",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "MedicationRequest",
        Schema {
            known: &[
                "status",
                "intent",
                "medicationCodeableConcept{cc}",
                "medicationReference{ref}",
                "contained",
                "contained.resourceType",
                "contained.id",
                "contained.code{cc}",
                "subject{ref}",
                "authoredOn",
                "dosageInstruction",
                "dosageInstruction.sequence",
                "dosageInstruction.text",
                "dosageInstruction.asNeededBoolean",
                "dosageInstruction.asNeededCodeableConcept",
                "dosageInstruction.doseAndRate",
                "dosageInstruction.doseAndRate.doseQuantity",
                "dosageInstruction.doseAndRate.doseQuantity.value",
                "dosageInstruction.doseAndRate.doseQuantity.unit",
                "dosageInstruction.doseAndRate.doseQuantity.system",
                "dosageInstruction.doseAndRate.doseQuantity.code",
                "dosageInstruction.timing",
                "dosageInstruction.timing.code{cc}",
                "dosageInstruction.timing.repeat",
                "dosageInstruction.timing.repeat.frequency",
                "dosageInstruction.timing.repeat.period",
                "dosageInstruction.timing.repeat.periodUnit",
                "dosageInstruction.timing.repeat.frequencyMax",
                "dosageInstruction.timing.repeat.periodMax",
                "dosageInstruction.timing.repeat.when",
                "dosageInstruction.timing.repeat.timeOfDay",
                "dispenseRequest",
                "dispenseRequest.quantity",
                "dispenseRequest.quantity.value",
                "dispenseRequest.quantity.unit",
                "dispenseRequest.expectedSupplyDuration",
                "dispenseRequest.expectedSupplyDuration.value",
                "dispenseRequest.expectedSupplyDuration.unit",
                "dispenseRequest.expectedSupplyDuration.system",
                "dispenseRequest.expectedSupplyDuration.code",
            ],
            first_only: &["dosageInstruction.doseAndRate"],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "AllergyIntolerance",
        Schema {
            known: &[
                "clinicalStatus{cc}",
                "verificationStatus{cc}",
                "code{cc}",
                "patient{ref}",
                "reaction",
                "reaction.substance{cc}",
                "reaction.manifestation{cc}",
                "reaction.severity",
            ],
            first_only: &["reaction", "reaction.manifestation"],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Flag",
        Schema {
            known: &["status", "code{cc*}", "subject{ref}"],
            first_only: &[],
            extensions: &[EXT_NOTE],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Immunization",
        Schema {
            known: &[
                "status",
                "vaccineCode{cc}",
                "patient{ref}",
                "occurrenceDateTime",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Observation",
        Schema {
            known: &[
                "status",
                "category{cc}",
                "code{cc}",
                "subject{ref}",
                "valueString",
                "valueBoolean",
            ],
            first_only: &[],
            extensions: &[EXT_TREATMENT_STARTED],
            expanded: OnceLock::new(),
        },
    ),
    (
        "ServiceRequest",
        Schema {
            known: &[
                "status",
                "intent",
                "category{cc}",
                "code{cc}",
                "subject{ref}",
                "occurrenceDateTime",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
    (
        "Consent",
        Schema {
            known: &[
                "status",
                "scope{cc}",
                "category{cc}",
                "patient{ref}",
                "policyRule{cc}",
                "provision",
                "provision.type",
            ],
            first_only: &[],
            extensions: &[],
            expanded: OnceLock::new(),
        },
    ),
];

/// The schema of `kind`, if the gateway reads that resource type.
pub(super) fn schema(kind: &str) -> Option<&'static Schema> {
    SCHEMAS.iter().find(|(k, _)| *k == kind).map(|(_, s)| s)
}

/// The parts of each datatype a suffix names.
fn datatype_parts(suffix: &str) -> &'static [&'static str] {
    match suffix {
        // `cc*`: a CodeableConcept whose every coding the parser weighs
        // (it lists what it leaves itself).
        "cc" | "cc*" => &[
            "",
            "coding",
            "coding.system",
            "coding.code",
            "coding.display",
            "text",
        ],
        "ref" => &["", "reference"],
        // A reference to an Organization: to an entry, or by its ODS code.
        "org" => &[
            "",
            "reference",
            "identifier",
            "identifier.system",
            "identifier.value",
        ],
        "coding" => &["", "system", "code", "display"],
        _ => &[],
    }
}

impl Schema {
    /// The paths the walk asks about, spelt out once: a walk asks for every
    /// member of every resource, so each question is one binary search.
    fn expanded(&self) -> &Expanded {
        self.expanded.get_or_init(|| {
            let mut known: Vec<String> = COMMON.iter().map(|&k| k.to_owned()).collect();
            let mut first_only: Vec<String> =
                self.first_only.iter().map(|&k| k.to_owned()).collect();
            for k in self.known {
                match k.split_once('{') {
                    None => known.push((*k).to_owned()),
                    Some((base, suffix)) => {
                        let suffix = suffix.trim_end_matches('}');
                        known.push(base.to_owned());
                        known.extend(
                            datatype_parts(suffix)
                                .iter()
                                .map(|part| format!("{base}.{part}")),
                        );
                        if suffix == "cc" {
                            first_only.push(format!("{base}.coding"));
                        }
                    }
                }
            }
            known.sort_unstable();
            known.dedup();
            first_only.sort_unstable();
            first_only.dedup();
            Expanded { known, first_only }
        })
    }

    fn knows(&self, path: &str) -> bool {
        let known = &self.expanded().known;
        known.binary_search_by(|k| k.as_str().cmp(path)).is_ok()
    }

    /// Only the first repetition is read: the first of every
    /// `first_only` element and of every CodeableConcept's `coding`.
    fn first_only(&self, path: &str) -> bool {
        let first_only = &self.expanded().first_only;
        first_only
            .binary_search_by(|k| k.as_str().cmp(path))
            .is_ok()
    }
}

/// Which of a CodeableConcept's codings the parser reads: the first in
/// SNOMED CT or dm+d (as `parse_code` chooses), else the first in the
/// gateway's own systems (as `code_in` finds them), else the first with a
/// system and a code.
fn coding_read(codings: &[Value<'_>]) -> usize {
    fn system<'v>(c: &'v Value<'_>) -> &'v str {
        c.get("system").and_then(Value::as_str).unwrap_or("")
    }
    let usable = |c: &&Value| !system(c).is_empty() && c.get("code").is_some();
    let national = |c: &&Value| {
        let s = system(c);
        s == crate::clinical::model::SNOMED || s == crate::clinical::model::DMD
    };
    let ours = |c: &&Value| system(c).starts_with("https://throughcare.invalid/");
    codings
        .iter()
        .position(|c| usable(&c) && national(&c))
        .or_else(|| codings.iter().position(|c| usable(&c) && ours(&c)))
        .or_else(|| codings.iter().position(|c| usable(&c)))
        .unwrap_or(0)
}

/// `name` when it could be a FHIR element or type name, or a placeholder:
/// a path must never echo text a sender put in a key, which could be
/// patient data.
pub(super) fn safe_name(name: &str) -> &str {
    let body = name.strip_prefix('_').unwrap_or(name);
    let ok = (1..=64).contains(&body.len())
        && body.as_bytes()[0].is_ascii_alphabetic()
        && body.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
        name
    } else {
        "(a name FHIR does not define)"
    }
}

/// An extension's URL when it looks like one, for the note.
fn safe_url(url: &str) -> &str {
    let ok = (1..=256).contains(&url.len())
        && url.contains(':')
        && url.bytes().all(|b| b.is_ascii_graphic());
    if ok { url } else { "(no readable url)" }
}

/// Whether `v` can hold elements to walk (an object, or an array of them).
fn holds_elements(v: &Value<'_>) -> bool {
    matches!(v, Value::Object(_) | Value::Array(_))
}

/// An object that holds nothing but comments (`"_status": {"fhir_comments": …}`).
fn only_comments(v: &Value<'_>) -> bool {
    v.as_object()
        .is_some_and(|o| !o.is_empty() && o.keys().all(|k| k == "fhir_comments"))
}

/// Where the walk is, as a path for a note or an error (`entry[3].resource.
/// code.coding[1]`): kept as a chain of steps and formatted only for what is
/// reported, nearly nothing of a resource.
#[derive(Clone, Copy)]
enum Here<'s> {
    /// The resource itself: its own path, ending in `.`.
    Resource(&'s dyn fmt::Display),
    /// A member of the object at the parent.
    Member(&'s Here<'s>, &'s str),
    /// An item of the array at the parent.
    Item(&'s Here<'s>, usize),
}

impl fmt::Display for Here<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resource(at) => at.fmt(f),
            Self::Member(parent, key) => {
                parent.fmt(f)?;
                if !matches!(parent, Self::Resource(_)) {
                    f.write_str(".")?;
                }
                f.write_str(safe_name(key))
            }
            Self::Item(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// One walk over one resource: notes for what is not read, violations for
/// modifiers we do not understand.
struct Walk<'w> {
    schema: &'w Schema,
    notes: &'w mut Vec<String>,
    errors: &'w mut ValidationErrors,
}

impl Walk<'_> {
    fn object(&mut self, map: &Map<'_>, schema_path: &str, at: &Here<'_>) {
        let mut path = String::with_capacity(schema_path.len() + 32);
        for (key, value) in map.iter() {
            let here = Here::Member(at, key);
            path.clear();
            if !schema_path.is_empty() {
                path.push_str(schema_path);
                path.push('.');
            }
            path.push_str(key);
            match key {
                // Comments, as FHIR JSON writes XML comments: not content.
                "fhir_comments" => {}
                _ if only_comments(value) => {}
                "modifierExtension" => self.errors.add(
                    here.to_string(),
                    "a modifier extension the gateway does not understand: FHIR requires \
                     refusing the resource",
                ),
                "implicitRules" => self.errors.add(
                    here.to_string(),
                    "implicit rules the gateway does not understand: FHIR requires refusing \
                     the resource",
                ),
                "extension" => self.extensions(value, schema_path, &here),
                _ if self.schema.knows(&path) => {
                    if holds_elements(value) {
                        self.value(value, &path, &here);
                    }
                }
                _ => self.notes.push(format!("{here}: not read by the gateway")),
            }
        }
    }

    fn value(&mut self, value: &Value<'_>, path: &str, here: &Here<'_>) {
        match value {
            Value::Object(map) => self.object(map, path, here),
            Value::Array(items) => {
                let read = if path.ends_with(".coding") {
                    coding_read(items)
                } else {
                    0
                };
                for (i, item) in items.iter().enumerate() {
                    let at = Here::Item(here, i);
                    if i != read && self.schema.first_only(path) {
                        self.notes
                            .push(format!("{at}: only the first repetition is read"));
                    } else if holds_elements(item) {
                        self.value(item, path, &at);
                    }
                }
            }
            _ => {}
        }
    }

    fn extensions(&mut self, value: &Value<'_>, on: &str, here: &Here<'_>) {
        let Value::Array(items) = value else {
            self.notes.push(format!("{here}: not read by the gateway"));
            return;
        };
        for (i, ext) in items.iter().enumerate() {
            let at = Here::Item(here, i);
            let url = ext.get("url").and_then(Value::as_str).unwrap_or("");
            let read = if on.is_empty() {
                self.schema.extensions.contains(&url)
            } else {
                ELEMENT_EXTENSIONS.contains(&(on, url))
            };
            if let Some(Value::Array(inner)) = ext.get("modifierExtension")
                && !inner.is_empty()
            {
                self.errors.add(
                    format!("{at}.modifierExtension"),
                    "a modifier extension the gateway does not understand",
                );
            }
            if !read {
                // The URL names a definition, never patient data.
                self.notes.push(format!(
                    "{at} ({}): an extension not read by the gateway",
                    safe_url(url)
                ));
                continue;
            }
            // An extension the gateway reads is read once, from its one
            // value type: a second one, or its value given as another type
            // (a note as valueMarkdown, a last dose as valueInstant), would
            // otherwise be passed over unsaid.
            if let Some(wanted) = value_type_of(url)
                && ext.get(wanted).is_none_or(Value::is_null)
            {
                self.errors.add(
                    at.to_string(),
                    format!("this extension's value is read from {wanted}, which it does not have"),
                );
            }
            // Last dose and days supplied are checked where they are read.
            if !matches!(url, EXT_LAST_DOSE | EXT_DAYS_SUPPLIED)
                && items[..i]
                    .iter()
                    .any(|earlier| earlier.get("url").and_then(Value::as_str) == Some(url))
            {
                self.errors.add(
                    at.to_string(),
                    "given more than once: this extension is stated once",
                );
            }
        }
    }
}

/// The value element each extension the gateway reads carries its value in
/// (days supplied is checked where it is read: a whole number of days).
fn value_type_of(url: &str) -> Option<&'static str> {
    match url {
        EXT_LAST_DOSE => Some("valueDateTime"),
        EXT_NOTE | EXT_DOSE => Some("valueString"),
        EXT_TREATMENT_STARTED => Some("valueDate"),
        _ => None,
    }
}

/// Lists under `at` what `json`, a resource of a type with `schema`, holds
/// beyond what the parser reads.
#[cfg(test)]
pub(super) fn walk(
    json: &str,
    schema: &Schema,
    at: impl fmt::Display,
    notes: &mut Vec<String>,
    errors: &mut ValidationErrors,
) {
    if let Some(resource) = Value::parse(json) {
        walk_tree(&resource, schema, at, notes, errors);
    }
}

/// [`walk`] over a resource already read.
pub(super) fn walk_tree(
    resource: &Value<'_>,
    schema: &Schema,
    at: impl fmt::Display,
    notes: &mut Vec<String>,
    errors: &mut ValidationErrors,
) {
    let Some(map) = resource.as_object() else {
        return;
    };
    Walk {
        schema,
        notes,
        errors,
    }
    .object(map, "", &Here::Resource(&at));
}

/// What a Bundle (`json`, under `prefix`) holds around its entries' resources
/// beyond its structure: `signature`, `link`, `entry.search`,
/// `entry.request`, `meta` other than profiles. Its identifier and
/// timestamp are the document's own and re-minted for every delivery.
pub(super) fn bundle(
    whole: &Value<'_>,
    prefix: &str,
    errors: &mut ValidationErrors,
) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(top) = whole.as_object() else {
        return notes;
    };
    if top.get("type").and_then(Value::as_str) == Some("document") {
        document_identity(top, prefix, errors);
    }
    // Listed in the order of their names, wherever the sender put them.
    let mut keys: Vec<(&str, &Value<'_>)> = top.iter().collect();
    keys.sort_unstable_by_key(|(k, _)| *k);
    for (key, value) in keys {
        match key {
            "resourceType" | "id" | "identifier" | "type" | "timestamp" | "fhir_comments" => {}
            "implicitRules" => errors.add(
                format!("{prefix}implicitRules"),
                "implicit rules the gateway does not understand: FHIR requires refusing the \
                 resource",
            ),
            "meta" => {
                if let Some(meta) = value.as_object() {
                    // Within `meta`, in the order written.
                    for k in meta
                        .keys()
                        .filter(|k| !matches!(*k, "profile" | "fhir_comments"))
                    {
                        notes.push(format!(
                            "{prefix}meta.{}: not read by the gateway",
                            safe_name(k)
                        ));
                    }
                }
            }
            "entry" => {
                let entries = value.as_array().unwrap_or_default();
                for (i, e) in entries.iter().enumerate() {
                    let mut keys: Vec<&str> = e
                        .as_object()
                        .map(|e| e.keys().collect())
                        .unwrap_or_default();
                    keys.sort_unstable();
                    for k in keys
                        .into_iter()
                        .filter(|k| !matches!(*k, "fullUrl" | "resource" | "fhir_comments"))
                    {
                        if k == "modifierExtension" {
                            errors.add(
                                format!("{prefix}entry[{i}].modifierExtension"),
                                "a modifier extension the gateway does not understand: FHIR \
                                 requires refusing the resource",
                            );
                            continue;
                        }
                        notes.push(format!(
                            "{prefix}entry[{i}].{}: not read by the gateway",
                            safe_name(k)
                        ));
                    }
                }
            }
            other => notes.push(format!(
                "{prefix}{}: not read by the gateway",
                safe_name(other)
            )),
        }
    }
    notes
}

/// Why a resource of `kind` is not current clinical content, when its own
/// status says so (FHIR modifier elements): entered in error, refuted, not
/// taken, not done, a request not to do something, a medicine that is not
/// being taken now (stopped, completed, on hold, intended, unknown), an
/// allergy no longer active (resolved, inactive) or a referral that is not
/// in place (revoked, completed, draft, on hold, unknown). The model has no
/// status for these, so they are set aside and listed rather than carried as
/// current; a methadone prescription stopped in custody must not reach the
/// GP as an active one.
fn withdrawn_value(kind: &str, v: &Value<'_>) -> Option<String> {
    let status = v.get("status").and_then(Value::as_str);
    if status == Some("entered-in-error") {
        return Some("entered in error".into());
    }
    let codes = |element: &str| codes_of(v, element);
    let verification = codes("verificationStatus")
        .into_iter()
        .find(|c| matches!(c.as_str(), "refuted" | "entered-in-error"));
    let clinical = codes("clinicalStatus");
    match (kind, status, verification.as_deref()) {
        (_, _, Some("refuted")) => Some("refuted (verificationStatus)".into()),
        (_, _, Some(_)) => Some("entered in error (verificationStatus)".into()),
        ("MedicationStatement", Some("not-taken"), _) => Some("not taken".into()),
        ("MedicationStatement", Some(s), _) if s != "active" => {
            Some(format!("not a current medicine (status {})", safe_word(s)))
        }
        ("ServiceRequest", Some(s), _) if s != "active" => Some(format!(
            "not a referral or appointment in place (status {})",
            safe_word(s)
        )),
        ("AllergyIntolerance", _, _)
            if clinical
                .iter()
                .any(|c| matches!(c.as_str(), "inactive" | "resolved")) =>
        {
            Some("no longer active (clinicalStatus)".into())
        }
        ("Immunization", Some("not-done"), _) => Some("not done".into()),
        ("Observation" | "Encounter", Some("cancelled"), _) => Some("cancelled".into()),
        // occurrence[x] as text ("childhood, date unknown") is valid FHIR,
        // but the model dates every vaccination: listed, not refused.
        ("Immunization", _, _)
            if v.get("occurrenceString").is_some() && v.get("occurrenceDateTime").is_none() =>
        {
            Some("its date is recorded as text, not a date (occurrenceString)".into())
        }
        ("MedicationRequest", _, _) if v.get("doNotPerform") == Some(&Value::Bool(true)) => {
            Some("a request not to give this medicine (doNotPerform)".into())
        }
        ("ServiceRequest", _, _) if v.get("doNotPerform") == Some(&Value::Bool(true)) => {
            Some("a request not to do this (doNotPerform)".into())
        }
        // A proposal, plan or option authorises no one to act: not a
        // referral or appointment in place (intent is a modifier).
        ("ServiceRequest", _, _) => match v.get("intent").and_then(Value::as_str) {
            Some(i @ ("proposal" | "plan" | "option")) => Some(format!(
                "not a referral or appointment in place (intent {i})"
            )),
            _ => None,
        },
        ("Immunization", _, _) if v.get("isSubpotent") == Some(&Value::Bool(true)) => {
            Some("a dose that did not count (isSubpotent)".into())
        }
        _ => None,
    }
}

/// `ServiceRequest.intent` (request-intent, a required binding).
const SERVICE_REQUEST_INTENTS: &[&str] = &[
    "proposal",
    "plan",
    "directive",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];

/// A document Bundle's own identity (R4 invariants bdl-9 and bdl-10): an
/// `identifier` with a system and a value, and a `timestamp`, an instant.
/// Without them a document cannot be told from another or dated.
fn document_identity(top: &Map<'_>, prefix: &str, errors: &mut ValidationErrors) {
    let identified = top.get("identifier").is_some_and(|i| {
        i.get("system").and_then(Value::as_str).is_some()
            && i.get("value").and_then(Value::as_str).is_some()
    });
    if !identified {
        errors.add(
            format!("{prefix}identifier"),
            "required for a document: a system and a value (bdl-9)",
        );
    }
    let dated = top
        .get("timestamp")
        .and_then(Value::as_str)
        .is_some_and(|t| t.parse::<crate::clinical::model::DateTime>().is_ok());
    if !dated {
        errors.add(
            format!("{prefix}timestamp"),
            "required for a document: an instant, date and time with seconds and offset \
             (bdl-10)",
        );
    }
}

/// A ServiceRequest's `intent` outside its required binding (it is 1..1).
fn intent_fault(v: &Value<'_>) -> Option<(&'static str, String)> {
    match v.get("intent") {
        Some(Value::String(i)) if SERVICE_REQUEST_INTENTS.contains(&i.as_ref()) => None,
        _ => Some((
            "intent",
            format!(
                "must be one of {} (FHIR R4, a required binding)",
                SERVICE_REQUEST_INTENTS.join(", ")
            ),
        )),
    }
}

/// The codes of each status the reader acts on: every one a required
/// binding in FHIR R4 (`Medication.status` is optional; the others must be
/// there).
const REQUIRED_STATUS: &[(&str, &[&str])] = &[
    ("Flag", &["active", "inactive", "entered-in-error"]),
    (
        "Immunization",
        &["completed", "entered-in-error", "not-done"],
    ),
    (
        "Observation",
        &[
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        ],
    ),
    (
        "ServiceRequest",
        &[
            "draft",
            "active",
            "on-hold",
            "revoked",
            "completed",
            "entered-in-error",
            "unknown",
        ],
    ),
    (
        "MedicationStatement",
        &[
            "active",
            "completed",
            "entered-in-error",
            "intended",
            "stopped",
            "on-hold",
            "unknown",
            "not-taken",
        ],
    ),
    (
        "MedicationRequest",
        &crate::clinical::model::PRESCRIPTION_STATUSES,
    ),
    ("Medication", &["active", "inactive", "entered-in-error"]),
    (
        "Consent",
        &[
            "draft",
            "proposed",
            "active",
            "rejected",
            "inactive",
            "entered-in-error",
        ],
    ),
    (
        "Encounter",
        &[
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ],
    ),
];

/// A status element (a required binding) that holds no code FHIR defines
/// for it, with why: the element's path below the resource and the reason.
/// Read as anything, it could turn a resolved problem into an active one
/// or an entered-in-error risk into a live one, so the document is refused.
fn status_fault(kind: &str, v: &Value<'_>) -> Option<(&'static str, String)> {
    const CONDITION_VERIFICATION: &str =
        "http://terminology.hl7.org/CodeSystem/condition-ver-status";
    const ALLERGY_VERIFICATION: &str =
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
    let coded = |element: &'static str, system: &str, allowed: &[&str]| {
        let cc = v.get(element)?;
        let ok = cc
            .get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| c.get("system").and_then(Value::as_str) == Some(system))
            .filter_map(|c| c.get("code").and_then(Value::as_str))
            .any(|c| allowed.contains(&c));
        (!ok).then(|| {
            (
                element,
                format!(
                    "needs a coding in {system} ({}): the binding is required, and read as \
                     anything else the status could be the opposite",
                    allowed.join(", ")
                ),
            )
        })
    };
    let status = || {
        let (_, allowed) = REQUIRED_STATUS.iter().find(|(k, _)| *k == kind)?;
        match v.get("status") {
            Some(Value::String(s)) if allowed.contains(&s.as_ref()) => None,
            _ => Some((
                "status",
                format!("must be one of {} (FHIR R4)", allowed.join(", ")),
            )),
        }
    };
    match kind {
        "Condition" => coded(
            "clinicalStatus",
            super::CLINICAL_STATUS,
            &[
                "active",
                "recurrence",
                "relapse",
                "inactive",
                "remission",
                "resolved",
            ],
        )
        .or_else(|| {
            coded(
                "verificationStatus",
                CONDITION_VERIFICATION,
                &[
                    "unconfirmed",
                    "provisional",
                    "differential",
                    "confirmed",
                    "refuted",
                    "entered-in-error",
                ],
            )
        })
        .or_else(|| {
            let abated = v
                .as_object()
                .is_some_and(|o| o.keys().any(|k| k.starts_with("abatement")));
            let ended = codes_of(v, "clinicalStatus")
                .iter()
                .any(|c| matches!(c.as_str(), "inactive" | "remission" | "resolved"));
            (abated && !ended).then(|| {
                (
                    "clinicalStatus",
                    "an abated condition must be inactive, resolved or in remission (con-4)".into(),
                )
            })
        }),
        "AllergyIntolerance" => coded(
            "clinicalStatus",
            super::ALLERGY_STATUS,
            &["active", "inactive", "resolved"],
        )
        .or_else(|| {
            coded(
                "verificationStatus",
                ALLERGY_VERIFICATION,
                &["unconfirmed", "confirmed", "refuted", "entered-in-error"],
            )
        }),
        "ServiceRequest" => status().or_else(|| intent_fault(v)),
        "Medication" if v.get("status").is_none() => None,
        _ => status(),
    }
}

/// What a resource's own status says: `Err` a status outside its binding
/// (the element and why: the document is refused), `Ok(Some(why))` a
/// resource that is not current clinical content (set aside and listed),
/// `Ok(None)` a current one.
pub(super) fn standing_of(
    kind: &str,
    v: &Value<'_>,
) -> Result<Option<String>, (&'static str, String)> {
    match status_fault(kind, v) {
        Some(fault) => Err(fault),
        None => Ok(withdrawn_value(kind, v)),
    }
}

/// The codes of a resource's CodeableConcept `element` (every coding).
pub(super) fn codes_of(resource: &Value<'_>, element: &str) -> Vec<String> {
    resource
        .get(element)
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// A status code for a note: FHIR codes are short lower-case words; anything
/// else (never patient data, but never quoted either) is named generically.
pub(super) fn safe_word(code: &str) -> &str {
    if !code.is_empty()
        && code.len() <= 32
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        code
    } else {
        "not a FHIR status code"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn withdrawn(kind: &str, json: &str) -> Option<String> {
        withdrawn_value(kind, &Value::parse(json).unwrap())
    }

    fn unread(kind: &str, json: &str) -> (Vec<String>, ValidationErrors) {
        let mut notes = Vec::new();
        let mut errors = ValidationErrors::default();
        walk(json, schema(kind).unwrap(), "r.", &mut notes, &mut errors);
        notes.sort();
        (notes, errors)
    }

    #[test]
    fn known_elements_pass_and_others_are_listed_by_path() {
        let (notes, errors) = unread(
            "Condition",
            r#"{"resourceType":"Condition","id":"x","meta":{"profile":["p"],"lastUpdated":"2020"},
               "code":{"coding":[{"system":"s","code":"c","display":"d","version":"1"},{"system":"t","code":"e"}],"text":"t"},
               "subject":{"reference":"Patient/1","display":"n"},"severity":{"text":"bad"},
               "_onsetDateTime":{"extension":[]},"onsetDateTime":"2020"}"#,
        );
        assert!(errors.0.is_empty());
        assert_eq!(
            notes,
            [
                "r._onsetDateTime: not read by the gateway",
                "r.code.coding[0].version: not read by the gateway",
                "r.code.coding[1]: only the first repetition is read",
                "r.meta.lastUpdated: not read by the gateway",
                "r.severity: not read by the gateway",
                "r.subject.display: not read by the gateway",
            ]
        );
    }

    #[test]
    fn a_modifier_extension_refuses_and_an_unknown_extension_is_listed() {
        let (notes, errors) = unread(
            "Flag",
            r#"{"resourceType":"Flag","status":"active","code":{"text":"x"},
               "extension":[{"url":"https://throughcare.invalid/fhir/StructureDefinition/note","valueString":"n"},
                            {"url":"https://example.org/other","valueString":"v"}],
               "modifierExtension":[{"url":"https://example.org/m","valueBoolean":true}]}"#,
        );
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].field, "r.modifierExtension");
        assert_eq!(
            notes,
            ["r.extension[1] (https://example.org/other): an extension not read by the gateway"]
        );
    }

    /// The Bundle's own elements: its top level and entries by name, `meta`
    /// in the order written.
    #[test]
    fn a_bundles_own_unread_elements_are_listed() {
        let doc = r#"{"signature":{"type":[{"code":"x"}]},"resourceType":"Bundle","type":"collection",
            "meta":{"versionId":"1","profile":["p"],"lastUpdated":"2024-01-01T00:00:00Z"},
            "entry":[{"search":{"mode":"match"},"resource":{"resourceType":"Patient"},"request":{"method":"GET"}}],
            "link":[{"relation":"self"}]}"#;
        let mut errors = ValidationErrors::default();
        let notes = bundle(&Value::parse(doc).unwrap(), "", &mut errors);
        assert!(errors.0.is_empty(), "{errors}");
        assert_eq!(
            notes,
            [
                "entry[0].request: not read by the gateway",
                "entry[0].search: not read by the gateway",
                "link: not read by the gateway",
                "meta.versionId: not read by the gateway",
                "meta.lastUpdated: not read by the gateway",
                "signature: not read by the gateway",
            ]
        );
    }

    #[test]
    fn withdrawn_resources_are_recognised() {
        assert_eq!(
            withdrawn(
                "Condition",
                r#"{"verificationStatus":{"coding":[{"code":"refuted"}]}}"#
            )
            .as_deref(),
            Some("refuted (verificationStatus)")
        );
        assert_eq!(
            withdrawn("Immunization", r#"{"status":"not-done"}"#).as_deref(),
            Some("not done")
        );
        assert_eq!(withdrawn("Immunization", r#"{"status":"completed"}"#), None);
        assert_eq!(
            withdrawn(
                "Immunization",
                r#"{"status":"completed","occurrenceString":"in childhood"}"#
            )
            .as_deref(),
            Some("its date is recorded as text, not a date (occurrenceString)")
        );
        assert_eq!(
            withdrawn("MedicationStatement", r#"{"status":"stopped"}"#).as_deref(),
            Some("not a current medicine (status stopped)")
        );
        assert_eq!(
            withdrawn("MedicationStatement", r#"{"status":"active"}"#),
            None
        );
        assert_eq!(
            withdrawn("ServiceRequest", r#"{"status":"revoked"}"#).as_deref(),
            Some("not a referral or appointment in place (status revoked)")
        );
        assert!(
            withdrawn(
                "AllergyIntolerance",
                r#"{"clinicalStatus":{"coding":[{"code":"resolved"}]}}"#
            )
            .is_some()
        );
    }
}
