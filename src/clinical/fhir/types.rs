//! Hand-written serde structs for the parts of the FHIR R4 resources we use.
//! Unknown elements are ignored on input; we never emit what we do not set.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A string that borrows from the input unless it holds escapes.
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// Deserialises an optional string, borrowing from the input when it can
/// (serde borrows a bare `Cow<str>` field, never one inside an `Option`).
fn opt_str<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    Ok(Option::<Str<'a>>::deserialize(d)?.map(|s| s.0))
}

/// Deserialises a repeating string, leaving out the `null`s FHIR JSON
/// writes where an item has only its `_name` extension (R4 json.html,
/// "Repeating Primitives"); the reader checks each one has it.
fn lined_up<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Cow<'a, str>>, D::Error> {
    Ok(Vec::<Option<Str<'a>>>::deserialize(d)?
        .into_iter()
        .flatten()
        .map(|s| s.0)
        .collect())
}

/// Skip empty vectors when serialising.
fn empty<T>(v: &[T]) -> bool {
    v.is_empty()
}

/// Skip absent and blank strings when serialising: FHIR forbids an
/// element without a value, `""` included.
fn blank(v: &Option<Cow<'_, str>>) -> bool {
    v.as_deref().is_none_or(is_blank)
}

/// Whether `s` holds nothing FHIR would count as a value.
pub fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// Skip a list of strings that are all blank.
fn all_blank(v: &[Cow<'_, str>]) -> bool {
    v.iter().all(|s| is_blank(s))
}

/// Writes only the strings that hold a value.
fn non_blank<S: serde::Serializer>(v: &[Cow<'_, str>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().filter(|x| !is_blank(x)))
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Coding<'a> {
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub system: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub code: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub display: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeableConcept<'a> {
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub coding: Vec<Coding<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
}

impl<'a> CodeableConcept<'a> {
    pub fn coded(system: &'a str, code: &'a str, display: &'a str) -> Self {
        Self {
            coding: vec![Coding {
                system: Some(system.into()),
                code: Some(code.into()),
                display: Some(display.into()),
            }],
            text: None,
        }
    }

    pub fn text(text: &'a str) -> Self {
        Self {
            coding: Vec::new(),
            text: Some(text.into()),
        }
    }

    /// The first coding in `system`.
    pub fn code_in(&self, system: &str) -> Option<&Coding<'a>> {
        self.coding
            .iter()
            .find(|c| c.system.as_deref() == Some(system))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identifier<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "use")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub use_: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub system: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub value: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference<'a> {
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub reference: Option<Cow<'a, str>>,
    /// The type the reference is to (`Practitioner`), for a logical one.
    #[serde(default, skip_serializing_if = "blank", rename = "type")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub type_: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub identifier: Option<Identifier<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub display: Option<Cow<'a, str>>,
}

impl<'a> Reference<'a> {
    pub fn to(full_url: impl Into<Cow<'a, str>>) -> Self {
        Self {
            reference: Some(full_url.into()),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Extension<'a> {
    #[serde(borrow)]
    pub url: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub value_date_time: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub value_date: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_integer: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_boolean: Option<bool>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub value_string: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Period<'a> {
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub start: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub end: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HumanName<'a> {
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub use_: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub family: Option<Cow<'a, str>>,
    #[serde(
        default,
        skip_serializing_if = "all_blank",
        serialize_with = "non_blank"
    )]
    #[serde(borrow, deserialize_with = "lined_up")]
    pub given: Vec<Cow<'a, str>>,
    /// When the name was (or is) in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub period: Option<Period<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "use")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub use_: Option<Cow<'a, str>>,
    /// The address as one text, when the sender has no parts.
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
    #[serde(
        default,
        skip_serializing_if = "all_blank",
        serialize_with = "non_blank"
    )]
    #[serde(borrow, deserialize_with = "lined_up")]
    pub line: Vec<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub city: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub postal_code: Option<Cow<'a, str>>,
    /// When the patient lives (or lived) there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub period: Option<Period<'a>>,
}

/// A document Bundle as written, up to its entries: `render` serialises
/// this, then appends `"entry":[...]` from resources it has already written.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleHead<'a> {
    pub resource_type: &'a str,
    pub identifier: Identifier<'a>,
    #[serde(rename = "type")]
    pub type_: &'a str,
    pub timestamp: &'a str,
}

/// One Bundle entry as written.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryOut<'a, R> {
    pub full_url: &'a str,
    pub resource: &'a R,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Composition<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(rename = "type")]
    #[serde(borrow)]
    pub type_: CodeableConcept<'a>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(borrow)]
    pub date: Cow<'a, str>,
    #[serde(borrow)]
    pub author: Vec<Reference<'a>>,
    #[serde(borrow)]
    pub title: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub custodian: Option<Reference<'a>>,
    /// The custody episode the document is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub encounter: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub event: Vec<CompositionEvent<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub section: Vec<Section<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompositionEvent<'a> {
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub code: Vec<CodeableConcept<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Section<'a> {
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub title: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub code: Option<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub entry: Vec<Reference<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub identifier: Vec<Identifier<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub name: Vec<HumanName<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub gender: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub birth_date: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub address: Vec<Address<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub general_practitioner: Vec<Reference<'a>>,
    /// A modifier: `false` says the record may not be valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// A modifier: the patient has died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deceased_boolean: Option<bool>,
    /// A modifier: when the patient died.
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub deceased_date_time: Option<Cow<'a, str>>,
    /// A modifier: other records of the same person.
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub link: Vec<PatientLink<'a>>,
}

/// `Patient.link`: only its type is read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientLink<'a> {
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(rename = "type")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub type_: Option<Cow<'a, str>>,
}

/// A Medication a MedicationStatement or MedicationRequest refers to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Medication<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub code: Option<CodeableConcept<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Organization<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub identifier: Vec<Identifier<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub name: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Practitioner<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub name: Vec<HumanName<'a>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub qualification: Vec<Qualification<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Qualification<'a> {
    #[serde(borrow)]
    pub code: CodeableConcept<'a>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Encounter<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub class: Coding<'a>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub subject: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub period: Option<Period<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub service_provider: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub hospitalization: Option<Hospitalization<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hospitalization<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub destination: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub discharge_disposition: Option<CodeableConcept<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub clinical_status: Option<CodeableConcept<'a>>,
    #[serde(borrow)]
    pub code: CodeableConcept<'a>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub onset_date_time: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationStatement<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub extension: Vec<Extension<'a>>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub category: Option<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub medication_codeable_concept: Option<CodeableConcept<'a>>,
    /// A Medication in the Bundle instead (as GP Connect sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub medication_reference: Option<Reference<'a>>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub dosage: Vec<Dosage<'a>>,
}

/// A dose given (read only, for the last dose of an opioid substitution
/// medicine when the sender has not our extension for it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationAdministration<'a> {
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(default, borrow)]
    pub medication_codeable_concept: Option<CodeableConcept<'a>>,
    #[serde(default, borrow)]
    pub medication_reference: Option<Reference<'a>>,
    /// Read so that a dose whose subject cannot be read is never taken for
    /// this patient's (whose it is, is checked with every resource's).
    #[expect(
        dead_code,
        reason = "read for its shape; about_the_patient checks whose it is"
    )]
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub effective_date_time: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub effective_period: Option<Period<'a>>,
    #[serde(default, borrow)]
    pub dosage: Option<AdministrationDosage<'a>>,
}

/// Of a dose given, only its route is read: a patch is not a dose of
/// substitution therapy.
#[derive(Debug, Deserialize)]
pub struct AdministrationDosage<'a> {
    #[serde(default, borrow)]
    pub route: Option<CodeableConcept<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dosage<'a> {
    /// Ours: the dose alone in words, when `text` holds the whole
    /// instruction (dose, how often, route, flags), as R4 means `text`.
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub extension: Vec<Extension<'a>>,
    /// The order dosages apply in: the same number is taken together
    /// (concurrent), a higher one after (R4 Dosage.sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub additional_instruction: Vec<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub timing: Option<Timing<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub route: Option<CodeableConcept<'a>>,
    /// Taken as needed (PRN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_needed_boolean: Option<bool>,
    /// Taken as needed, for this reason (which implies `as needed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub as_needed_codeable_concept: Option<CodeableConcept<'a>>,
    /// The dose as a quantity (read when there is no `text`).
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub dose_and_rate: Vec<DoseAndRate<'a>>,
}

/// `Dosage.doseAndRate`: the dose as a quantity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoseAndRate<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub dose_quantity: Option<Quantity<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub code: Option<CodeableConcept<'a>>,
    /// How often as numbers (read when there is no `code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub repeat: Option<TimingRepeat<'a>>,
}

/// `Timing.repeat`: `frequency` times every `period` `periodUnit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimingRepeat<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    /// Up to this many times (`frequency` is then the fewest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<serde_json::Number>,
    /// Up to this long between (`period` is then the shortest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_max: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub period_unit: Option<Cow<'a, str>>,
    /// Events of the day the dose goes with (`MORN`, `HS`, `ACM`).
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow, deserialize_with = "lined_up")]
    pub when: Vec<Cow<'a, str>>,
    /// Times of day (`08:00:00`).
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow, deserialize_with = "lined_up")]
    pub time_of_day: Vec<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationRequest<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub intent: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub medication_codeable_concept: Option<CodeableConcept<'a>>,
    /// A Medication in the Bundle instead (as GP Connect sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub medication_reference: Option<Reference<'a>>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub authored_on: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub dosage_instruction: Vec<Dosage<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub dispense_request: Option<DispenseRequest<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DispenseRequest<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub quantity: Option<Quantity<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub expected_supply_duration: Option<Quantity<'a>>,
}

/// `Quantity`, `SimpleQuantity` and `Duration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quantity<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Number>,
    /// `<`, `<=`, `>=`, `>`: a modifier (a SimpleQuantity has none).
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub comparator: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub unit: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub system: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub code: Option<Cow<'a, str>>,
}

/// `Resource.meta` as written: the profiles a resource conforms to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default, skip_serializing_if = "empty")]
    pub profile: Vec<String>,
}

impl Meta {
    pub fn profile(url: &str) -> Option<Self> {
        Some(Self {
            profile: vec![url.to_owned()],
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllergyIntolerance<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub clinical_status: Option<CodeableConcept<'a>>,
    /// Optional in R4: a sender may name the substance in the reaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub code: Option<CodeableConcept<'a>>,
    #[serde(borrow)]
    pub patient: Reference<'a>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub reaction: Vec<Reaction<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reaction<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub substance: Option<CodeableConcept<'a>>,
    #[serde(borrow)]
    pub manifestation: Vec<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub severity: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flag<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub extension: Vec<Extension<'a>>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub code: CodeableConcept<'a>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Immunization<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub vaccine_code: CodeableConcept<'a>,
    #[serde(borrow)]
    pub patient: Reference<'a>,
    #[serde(borrow)]
    pub occurrence_date_time: Cow<'a, str>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub extension: Vec<Extension<'a>>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub category: Vec<CodeableConcept<'a>>,
    #[serde(borrow)]
    pub code: CodeableConcept<'a>,
    /// 0..1 in R4: without one, the document's patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub subject: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub value_string: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_boolean: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRequest<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub intent: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "empty")]
    #[serde(borrow)]
    pub category: Vec<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub code: Option<CodeableConcept<'a>>,
    #[serde(borrow)]
    pub subject: Reference<'a>,
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub occurrence_date_time: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Consent<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(borrow)]
    pub scope: CodeableConcept<'a>,
    #[serde(borrow)]
    pub category: Vec<CodeableConcept<'a>>,
    /// 0..1 in R4: without one, the document's patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub patient: Option<Reference<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub policy_rule: Option<CodeableConcept<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(borrow)]
    pub provision: Option<Provision<'a>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provision<'a> {
    /// 0..1 in R4: without one, neither a permission nor a refusal.
    #[serde(rename = "type")]
    #[serde(default, skip_serializing_if = "blank")]
    #[serde(borrow, deserialize_with = "opt_str")]
    pub type_: Option<Cow<'a, str>>,
}

/// A Bundle's shape as read: its type, and each entry's `fullUrl` and
/// that it has a resource (each resource is read from the document's tree
/// where it is used).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", expecting = "a Bundle (a JSON object)")]
pub struct BundleShape<'a> {
    #[serde(borrow)]
    pub resource_type: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    pub type_: Cow<'a, str>,
    #[serde(default, borrow)]
    pub entry: Vec<EntryShape<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", expecting = "a Bundle entry (a JSON object)")]
pub struct EntryShape<'a> {
    #[serde(default, borrow, deserialize_with = "opt_str")]
    pub full_url: Option<Cow<'a, str>>,
    /// Required: an entry without a resource is refused.
    #[serde(rename = "resource")]
    pub _resource: serde::de::IgnoredAny,
}
