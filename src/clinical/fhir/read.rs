//! Reading a FHIR R4 Bundle: limits, JSON, the Bundle (a document, or a
//! message wrapping one), and the typed reads every resource goes through.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use super::document::parse_document;
use super::index::{Index, TypeAndId};
use super::tree::{self, Value};
use super::types::*;
use super::{SYS_ODS, unread};
use crate::clinical::JourneyEvent;
use crate::clinical::Limits;
use crate::clinical::model::{ClinicalSummary, Code, DMD, Date, SNOMED};
use crate::clinical::violation::ValidationErrors;

/// Deepest JSON nesting in `bytes`, counting only brackets outside strings.
/// Strings are skipped with `memchr`: most of a document is inside them.
pub(super) fn json_depth(bytes: &[u8]) -> usize {
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

/// What a typed read reads: a document's text, or its tree (which reads
/// the same, see [`tree`]).
pub(super) trait Source<'a>: Copy {
    fn read<T: Deserialize<'a>>(self) -> Option<T>;
    fn report<T: Deserialize<'a>>(self, prefix: &str, errors: &mut ValidationErrors);
}

impl<'a> Source<'a> for &'a str {
    fn read<T: Deserialize<'a>>(self) -> Option<T> {
        serde_json::from_str(self).ok()
    }
    fn report<T: Deserialize<'a>>(self, prefix: &str, errors: &mut ValidationErrors) {
        report_typed::<T, _>(
            &mut serde_json::Deserializer::from_str(self),
            prefix,
            errors,
        );
    }
}

impl<'a> Source<'a> for &'a Value<'a> {
    fn read<T: Deserialize<'a>>(self) -> Option<T> {
        T::deserialize(self).ok()
    }
    fn report<T: Deserialize<'a>>(self, prefix: &str, errors: &mut ValidationErrors) {
        report_typed::<T, _>(self, prefix, errors);
    }
}

/// Parses into `T`, reporting the failing path under `prefix`.
///
/// Plain serde first: a valid resource costs one pass and borrows its
/// strings from the input. Only a resource that fails is read again with
/// path tracking, which yields the same result and names the failing field.
pub(super) fn typed<'a, T: Deserialize<'a>>(
    from: impl Source<'a>,
    prefix: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<T> {
    let read = from.read();
    if read.is_none() {
        from.report::<T>(&prefix.to_string(), errors);
    }
    read
}

/// Reads `T` again, tracking the path, and records why it fails.
#[cold]
fn report_typed<'a, T: Deserialize<'a>, D: serde::Deserializer<'a>>(
    de: D,
    prefix: &str,
    errors: &mut ValidationErrors,
) {
    let e = match serde_path_to_error::deserialize::<_, T>(de) {
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
        // "invalid type: {what was found}, expected {what}": what was found
        // quotes the input, which may itself say ", expected ".
        let expected = inner
            .rsplit_once(", expected ")
            .map_or("another type", |(_, expected)| expected);
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

/// The most items one JSON array may hold. The longest list a summary
/// carries is 200 items; anything far beyond is refused before its values
/// are walked.
const MAX_ARRAY_ITEMS: usize = 10_000;

/// A JSON value as FHIR JSON allows it (R4 json.html):
/// - no object names a key twice: JSON parsers differ on which of two values
///   wins (ours keeps the last, another the first), so
///   `"status":"active","status":"entered-in-error"` would mean one thing
///   here and another to the sender;
/// - nothing is empty: no `""`, `{}` or `[]`, which a reader would take as
///   absent and the sender may have meant otherwise;
/// - `null` only inside an array, where it lines a value up with its
///   `_name` extension.
///
/// A document that breaks these is refused whole. What passes is kept as a
/// tree borrowing from the document, which the unread walk and the status
/// checks look at (the typed reader reads each resource's text).
#[derive(Clone, Copy)]
struct FhirJson {
    in_array: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for FhirJson {
    type Value = Value<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

fn not_empty<'de, E: serde::de::Error>(v: Cow<'de, str>) -> Result<Value<'de>, E> {
    if v.is_empty() {
        return Err(E::custom(
            "an empty string (FHIR JSON leaves out a value it has not)",
        ));
    }
    Ok(Value::String(v))
}

impl<'de> serde::de::Visitor<'de> for FhirJson {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Number(tree::Number::int(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(Value::Number(tree::Number::PosInt(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value<'de>, E> {
        Ok(Value::Number(tree::Number::Float(v)))
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Value<'de>, E> {
        not_empty(Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value<'de>, E> {
        not_empty(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value<'de>, E> {
        not_empty(Cow::Owned(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value<'de>, E> {
        if self.in_array {
            return Ok(Value::Null);
        }
        Err(E::custom("null (FHIR JSON leaves out a value it has not)"))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(FhirJson { in_array: true })? {
            if items.len() == MAX_ARRAY_ITEMS {
                return Err(serde::de::Error::custom(format!(
                    "an array of more than {MAX_ARRAY_ITEMS} items (no element of a summary \
                     repeats so often)"
                )));
            }
            items.push(item);
        }
        if items.is_empty() {
            return Err(serde::de::Error::custom(
                "an empty array (FHIR JSON leaves out a value it has not)",
            ));
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        // Keys borrowed from the document; a FHIR object has a handful, so
        // they are compared in a list, and hashed only past a few dozen.
        let mut members: Vec<(Cow<'de, str>, Value<'de>)> = Vec::new();
        let mut many: Option<std::collections::HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(tree::Key)? {
            let twice = match &many {
                Some(set) => set.contains(&key),
                None => members.iter().any(|(k, _)| *k == key),
            };
            if twice {
                return Err(serde::de::Error::custom(format!(
                    "an object names `{}` twice (FHIR JSON names each property once)",
                    unread::safe_name(&key)
                )));
            }
            let value = map.next_value_seed(FhirJson { in_array: false })?;
            match &mut many {
                Some(set) => {
                    set.insert(key.clone());
                }
                None if members.len() >= 32 => {
                    let mut set: std::collections::HashSet<_> =
                        members.iter().map(|(k, _)| k.clone()).collect();
                    set.insert(key.clone());
                    many = Some(set);
                }
                None => {}
            }
            members.push((key, value));
        }
        if members.is_empty() {
            return Err(serde::de::Error::custom(
                "an empty object (FHIR JSON leaves out a value it has not)",
            ));
        }
        if let Some(base) = choice_twice(members.iter().map(|(k, _)| k.as_ref())) {
            return Err(serde::de::Error::custom(format!(
                "an object gives `{base}[x]` twice, as two types (FHIR JSON gives a choice \
                 element once)"
            )));
        }
        if let Some(name) = null_without_extension(&members) {
            return Err(serde::de::Error::custom(format!(
                "`{}` holds a null with no extension beside it in `_{0}` (FHIR JSON writes \
                 null in an array only to line a value up with its extension)",
                unread::safe_name(name)
            )));
        }
        Ok(Value::Object(tree::Map(members)))
    }
}

/// The first member of an object whose array holds a `null` that its
/// `_name` array does not fill with an extension at the same place
/// (R4 json.html, "Repeating Primitives").
fn null_without_extension<'m>(members: &'m [(Cow<'_, str>, Value<'_>)]) -> Option<&'m str> {
    let has_null = |(name, value): &&(Cow<'_, str>, Value<'_>)| {
        !name.starts_with('_')
            && value
                .as_array()
                .is_some_and(|a| a.iter().any(Value::is_null))
    };
    if !members.iter().any(|m| has_null(&m)) {
        return None;
    }
    // The `_name` arrays once, by name: an object may hold many members.
    let extensions: std::collections::HashMap<&str, &[Value<'_>]> = members
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix('_')?, v.as_array()?)))
        .collect();
    members.iter().filter(has_null).find_map(|(name, value)| {
        let items = value.as_array()?;
        let lined_up = extensions.get(name.as_ref()).is_some_and(|ext| {
            ext.len() == items.len()
                && items
                    .iter()
                    .zip(ext.iter())
                    .all(|(item, ext)| !item.is_null() || !ext.is_null())
        });
        (!lined_up).then_some(name.as_ref())
    })
}

/// The choice elements (`[x]`) of the resources the gateway reads, and the
/// types of FHIR R4 a choice may take, as their JSON names end.
const CHOICES: &[&str] = &[
    "value",
    "onset",
    "abatement",
    "effective",
    "occurrence",
    "deceased",
    "multipleBirth",
    "medication",
    "asNeeded",
    "bounds",
    "dose",
    "rate",
    "reported",
    "performed",
    "timing",
    "target",
    "allowed",
    "serviced",
    "source",
    "quantity",
    "item",
    "doseNumber",
    "seriesDoses",
];
const CHOICE_TYPES: &[&str] = &[
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "Date",
    "DateTime",
    "Decimal",
    "Id",
    "Instant",
    "Integer",
    "Markdown",
    "Oid",
    "PositiveInt",
    "String",
    "Time",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "CodeableConcept",
    "Coding",
    "ContactPoint",
    "Count",
    "Distance",
    "Duration",
    "HumanName",
    "Identifier",
    "Money",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "Signature",
    "Timing",
    "Dosage",
];

/// The choice element an object's `keys` give twice (`onsetString` beside
/// `onsetDateTime`): FHIR JSON names a choice once, with its one type, and
/// a reader would take either.
fn choice_twice<'k>(keys: impl Iterator<Item = &'k str>) -> Option<&'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    for key in keys {
        let Some(base) = CHOICES.iter().copied().find(|b| {
            key.strip_prefix(b)
                .is_some_and(|t| CHOICE_TYPES.contains(&t))
        }) else {
            continue;
        };
        if seen.contains(&base) {
            return Some(base);
        }
        seen.push(base);
    }
    None
}

/// Where the document has something other than a JSON object in place of
/// a resource or a Bundle entry (the Bundle itself, each entry, each entry's
/// resource, each contained resource, and so on in a Bundle it holds). A
/// typed read would take an array there field by field, in order, while the
/// checks that look for elements by name (the unread walk, the status
/// checks) would find none, and a modifier would pass unseen.
fn not_an_object(resource: &Value<'_>, at: &str) -> Option<(String, &'static str)> {
    const RESOURCE: &str = "must be a JSON object: a FHIR resource is one";
    let Some(r) = resource.as_object() else {
        let field = at.strip_suffix('.').unwrap_or("document");
        return Some((field.to_owned(), RESOURCE));
    };
    if let Some(contained) = r.get("contained").and_then(Value::as_array) {
        for (i, c) in contained.iter().enumerate() {
            if let Some(fault) = not_an_object(c, &format!("{at}contained[{i}].")) {
                return Some(fault);
            }
        }
    }
    if r.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return None;
    }
    let entries = r.get("entry").and_then(Value::as_array).unwrap_or_default();
    for (i, e) in entries.iter().enumerate() {
        if e.as_object().is_none() {
            return Some((
                format!("{at}entry[{i}]"),
                "must be a JSON object: a Bundle entry is one",
            ));
        }
        if let Some(resource) = e.get("resource")
            && let Some(fault) = not_an_object(resource, &format!("{at}entry[{i}].resource."))
        {
            return Some(fault);
        }
    }
    None
}

/// The document as text, once within the size, encoding and depth limits.
fn within_limits<'a>(bytes: &'a [u8], limits: &Limits) -> Result<&'a str, ValidationErrors> {
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
    Ok(text)
}

/// Parses a FHIR R4 document Bundle (or a message Bundle wrapping one).
///
/// # Errors
/// Every field violation found, with its path.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Parsed, ValidationErrors> {
    let text = within_limits(bytes, limits)?;
    // One pass reads the whole document into a tree, checking the FHIR JSON
    // rules; only when it fails do we ask which way (syntax, then the
    // Bundle's shape, then the rule broken).
    let mut json = serde_json::Deserializer::from_str(text);
    let whole =
        match serde::de::DeserializeSeed::deserialize(FhirJson { in_array: false }, &mut json)
            .and_then(|whole| json.end().map(|()| whole))
        {
            Ok(whole) => whole,
            Err(rule) => {
                if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    return Err(ValidationErrors::one(
                        "document",
                        format!("not valid JSON (line {}, column {})", e.line(), e.column()),
                    ));
                }
                let mut errors = ValidationErrors::default();
                if typed::<BundleShape>(text, "", &mut errors).is_none() {
                    return Err(errors);
                }
                return Err(ValidationErrors::one("document", rule.to_string()));
            }
        };
    let mut errors = ValidationErrors::default();
    let Some(bundle) = typed::<BundleShape>(&whole, "", &mut errors) else {
        return Err(errors);
    };
    if let Some((field, why)) = not_an_object(&whole, "") {
        return Err(ValidationErrors::one(field, why));
    }
    if bundle.resource_type != "Bundle" {
        return Err(ValidationErrors::one("resourceType", "must be Bundle"));
    }
    // Each reference is resolved by a scan of the entries: their number is
    // bounded as an HL7 message's segments are, and far above a summary's.
    if bundle.entry.len() > limits.max_fhir_entries {
        return Err(ValidationErrors::one(
            "entry",
            format!("more than {} entries", limits.max_fhir_entries),
        ));
    }
    match &*bundle.type_ {
        "document" => parse_document(&bundle, &whole, "", &mut errors).map(|mut p| {
            let mut notes = unread::bundle(&whole, "", &mut errors);
            notes.append(&mut p.summary.not_read);
            p.summary.not_read = notes;
            p
        }),
        "message" => {
            message_envelope(&whole, &mut errors);
            let inner = tree::resources(&whole)
                .enumerate()
                .find_map(|(i, r)| r.filter(|r| kind_of(r) == Some("Bundle")).map(|r| (i, r)));
            match inner {
                Some((i, inner)) => {
                    let prefix = format!("entry[{i}].resource.");
                    match typed::<BundleShape>(inner, &prefix, &mut errors) {
                        Some(doc) if doc.entry.len() > limits.max_fhir_entries => {
                            errors.add(
                                format!("{prefix}entry"),
                                format!("more than {} entries", limits.max_fhir_entries),
                            );
                            None
                        }
                        Some(doc) if doc.type_ == "document" => {
                            parse_document(&doc, inner, &prefix, &mut errors).map(|mut p| {
                                let mut notes = unread::bundle(&whole, "", &mut errors);
                                notes.extend(unread::bundle(inner, &prefix, &mut errors));
                                notes.extend(message_entries(&whole, i));
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

/// A message Bundle's envelope: its first resource is its MessageHeader
/// (FHIR R4 bdl-12), and it wraps one document, since a second (perhaps
/// another person's) would be passed over unread.
fn message_envelope(bundle: &Value<'_>, errors: &mut ValidationErrors) {
    let kinds = || tree::resources(bundle).map(|r| r.and_then(kind_of));
    if let Some(first) = kinds().next()
        && first != Some("MessageHeader")
    {
        errors.add(
            "entry[0].resource.resourceType",
            "a message Bundle's first resource must be its MessageHeader (FHIR bdl-12)",
        );
    }
    let documents = kinds()
        .enumerate()
        .filter(|(_, kind)| *kind == Some("Bundle"));
    for (i, _) in documents.skip(1) {
        errors.add(
            format!("entry[{i}].resource"),
            "a message Bundle wraps one document: this second one would not be read",
        );
    }
}

/// The entries of a message Bundle around the document it wraps (the
/// MessageHeader and the like): transport, listed as not read.
fn message_entries(bundle: &Value<'_>, document: usize) -> Vec<String> {
    tree::resources(bundle)
        .enumerate()
        .filter(|(k, _)| *k != document)
        .map(|(k, r)| {
            format!(
                "entry[{k}].resource ({}): not read: the message around the document",
                unread::safe_name(r.and_then(kind_of).unwrap_or(""))
            )
        })
        .collect()
}

/// A resource's type: its `resourceType`, when that is a string.
pub(super) fn kind_of<'t>(resource: &'t Value<'_>) -> Option<&'t str> {
    resource.get("resourceType").and_then(Value::as_str)
}

pub(super) fn ods_of<'o>(o: &'o Organization<'_>) -> Option<&'o str> {
    o.identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(SYS_ODS))
        .and_then(|i| i.value.as_deref())
}

pub(super) fn owned(v: Option<&Cow<'_, str>>) -> String {
    v.map(|s| s.to_string()).unwrap_or_default()
}

pub(super) fn parse_code(
    cc: &CodeableConcept,
    field: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Code> {
    let usable = |c: &&Coding<'_>| c.system.is_some() && c.code.is_some();
    // The national terminologies first: a CTV3 or local coding listed
    // before the SNOMED CT one must not displace it.
    let national = |c: &&Coding<'_>| matches!(c.system.as_deref(), Some(SNOMED | DMD));
    match cc
        .coding
        .iter()
        .filter(usable)
        .find(national)
        .or_else(|| cc.coding.iter().find(usable))
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

/// As [`parse_code`], for a diagnosis or an allergy, which may be recorded
/// in words only: with no coding that has a code, the concept's `text` (or
/// a coding's `display`) is carried as words. A coding with a code but no
/// system is still refused: its meaning cannot be told.
pub(super) fn parse_code_or_words(
    cc: &CodeableConcept,
    field: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Code> {
    if cc.coding.iter().any(|c| c.code.is_some()) {
        return parse_code(cc, field, errors);
    }
    let words = cc
        .text
        .as_deref()
        .or_else(|| cc.coding.iter().find_map(|c| c.display.as_deref()))
        .filter(|t| !t.trim().is_empty());
    match words {
        Some(words) => Some(Code::words(words)),
        None => {
            errors.add(
                format!("{field}.coding"),
                "a coding with system and code, or the words (text), is required",
            );
            None
        }
    }
}

pub(super) fn parse_with<T: std::str::FromStr<Err = E>, E: fmt::Display>(
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

pub(super) fn required<T>(
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
pub(super) fn day_of(
    v: Option<&str>,
    field: impl fmt::Display,
    index: &Index<'_>,
    errors: &mut ValidationErrors,
) -> Option<Date> {
    let when: crate::clinical::model::When = parse_with(v, &field, errors)?;
    let day = when.day_in_england();
    match day {
        None => errors.add(field.to_string(), "must give at least the day (YYYY-MM-DD)"),
        Some(_) if when.to_string().len() > 10 => {
            index.note(&field, "the time of day is not carried")
        }
        Some(_) => {}
    }
    day
}

/// A medicine's code: `medicationCodeableConcept`, or the `code` of the
/// Medication `medicationReference` names: in the Bundle (GP Connect's
/// way), or contained in the resource itself (`#med1`).
pub(super) fn medication_code(
    index: &Index<'_>,
    medicine: (Option<&CodeableConcept<'_>>, Option<&Reference<'_>>),
    resource: &Value<'_>,
    at: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Code> {
    medication_codes(index, medicine, resource, at, errors).map(|m| m.code)
}

/// A medicine as coded: the code carried ([`parse_code`]'s choice) and
/// every coding written (system and code), by which two resources about
/// the same medicine are matched whichever coding each lists first
/// ([`Coded::same_medicine`]).
pub(super) struct Coded {
    pub(super) code: Code,
    codings: Vec<(String, String)>,
}

impl Coded {
    fn of(
        cc: &CodeableConcept,
        field: impl fmt::Display,
        errors: &mut ValidationErrors,
    ) -> Option<Self> {
        let code = parse_code(cc, field, errors)?;
        let codings = cc
            .coding
            .iter()
            .filter_map(|c| Some((c.system.as_deref()?, c.code.as_deref()?)))
            .filter(|(system, code)| !is_blank(system) && !is_blank(code))
            .map(|(system, code)| (system.trim().to_owned(), code.trim().to_owned()))
            .collect();
        Some(Self { code, codings })
    }

    /// Whether `other` names this medicine. A dm+d code names one product:
    /// when both write one, they must share one (two buprenorphine products,
    /// a daily tablet and a monthly depot, share the substance's SNOMED CT
    /// code, and one's dose is not the other's). Otherwise every system both
    /// write must hold a code they share, and they must share one.
    pub(super) fn same_medicine(&self, other: &Self) -> bool {
        let other = other.codings.as_slice();
        let writes =
            |codings: &[(String, String)], system: &str| codings.iter().any(|(s, _)| s == system);
        let shares = |system: &str| {
            self.codings
                .iter()
                .any(|c| c.0 == system && other.contains(c))
        };
        if writes(&self.codings, DMD) && writes(other, DMD) {
            return shares(DMD);
        }
        let mut both = self
            .codings
            .iter()
            .map(|(s, _)| s.as_str())
            .filter(|s| writes(other, s))
            .peekable();
        both.peek().is_some() && both.all(shares)
    }
}

/// [`medication_code`], with every coding written.
pub(super) fn medication_codes(
    index: &Index<'_>,
    (concept, reference): (Option<&CodeableConcept<'_>>, Option<&Reference<'_>>),
    resource: &Value<'_>,
    at: impl fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Coded> {
    if let Some(cc) = concept {
        return Coded::of(cc, format_args!("{at}medicationCodeableConcept"), errors);
    }
    let Some(reference) = reference else {
        errors.add(
            format!("{at}medicationCodeableConcept"),
            "required: the medicine (medicationCodeableConcept or medicationReference)",
        );
        return None;
    };
    if let Some(id) = reference
        .reference
        .as_deref()
        .and_then(|r| r.strip_prefix('#'))
    {
        return contained_medication(resource, id, &at, errors);
    }
    let before = errors.0.len();
    let Some((mi, mv)) = index
        .resolve_current(
            reference,
            || format!("{at}medicationReference.reference"),
            errors,
        )
        .filter(|(mi, _)| index.kind(*mi) == Some("Medication"))
    else {
        if errors.0.len() > before {
            return None;
        }
        errors.add(
            format!("{at}medicationReference.reference"),
            "must refer to a Medication entry in the Bundle",
        );
        return None;
    };
    let mp = index.path(mi);
    let medication: Medication<'_> = typed(mv, mp, errors)?;
    match medication.code.as_ref() {
        Some(cc) => Coded::of(cc, format_args!("{mp}code"), errors),
        None => {
            errors.add(format!("{mp}code"), "required: the medicine's code");
            None
        }
    }
}

/// The code of the Medication with `id` contained in `resource`.
fn contained_medication(
    resource: &Value<'_>,
    id: &str,
    at: &dyn fmt::Display,
    errors: &mut ValidationErrors,
) -> Option<Coded> {
    let contained = match resource.get("contained") {
        None => &[][..],
        Some(Value::Array(items)) => items.as_slice(),
        Some(_) => {
            errors.add(
                format!("{at}contained"),
                "must be a list of resources (the medicine named #id is read from it)",
            );
            return None;
        }
    };
    let found = contained.iter().enumerate().find(|(_, c)| {
        TypeAndId::deserialize(*c).is_ok_and(|r| {
            r.resource_type.as_deref() == Some("Medication") && r.id.as_deref() == Some(id)
        })
    });
    let Some((k, c)) = found else {
        errors.add(
            format!("{at}medicationReference.reference"),
            "must name a Medication contained in the resource (#id) or an entry in the Bundle",
        );
        return None;
    };
    let cp = format!("{at}contained[{k}].");
    // As for a Medication entry in the Bundle (`Index::resolve_current`): a
    // medicine its own record withdraws is not read as the patient's.
    match unread::standing_of("Medication", c) {
        Ok(None) => {}
        Ok(Some(why)) => {
            errors.add(
                format!("{at}medicationReference.reference"),
                format!("refers to a Medication that is not current ({why})"),
            );
            return None;
        }
        Err((element, why)) => {
            errors.add(format!("{cp}{element}"), why);
            return None;
        }
    }
    let medication: Medication<'_> = typed(c, &cp, errors)?;
    match medication.code.as_ref() {
        Some(cc) => Coded::of(cc, format_args!("{cp}code"), errors),
        None => {
            errors.add(format!("{cp}code"), "required: the medicine's code");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resource, an entry or the Bundle itself written as a JSON array
    /// is refused: serde reads a struct from an array field by field, so the
    /// typed read took it while the checks that look for elements by name
    /// saw nothing (a Condition with a modifier extension was carried).
    #[test]
    fn an_array_in_place_of_a_resource_or_entry_is_refused_where_it_is() {
        let limits = Limits::default();
        let composition = r#"{"resourceType":"Composition","status":"final"}"#;
        for (json, field) in [
            (
                format!(r#"["Bundle","document",[{{"resource":{composition}}}]]"#),
                "document".to_owned(),
            ),
            (
                format!(
                    r#"{{"resourceType":"Bundle","type":"document","entry":[{{"resource":{composition}}},["urn:uuid:x",{composition}]]}}"#
                ),
                "entry[1]".to_owned(),
            ),
            (
                r#"{"resourceType":"Bundle","type":"document","entry":[{"resource":["Composition","final"]}]}"#
                    .to_owned(),
                "entry[0].resource".to_owned(),
            ),
            (
                format!(
                    r#"{{"resourceType":"Bundle","type":"document","entry":[{{"resource":{composition}}},{{"resource":{{"resourceType":"MedicationStatement","contained":[["Medication","m"]]}}}}]}}"#
                ),
                "entry[1].resource.contained[0]".to_owned(),
            ),
            (
                format!(
                    r#"{{"resourceType":"Bundle","type":"message","entry":[{{"resource":{{"resourceType":"Bundle","type":"document","entry":[["urn:uuid:x",{composition}]]}}}}]}}"#
                ),
                "entry[0].resource.entry[0]".to_owned(),
            ),
        ] {
            let err = parse(json.as_bytes(), &limits).unwrap_err();
            assert_eq!(err.0.len(), 1, "{json}: {err}");
            assert_eq!(err.0[0].field, field, "{json}: {err}");
            assert!(
                err.0[0].description.starts_with("must be a JSON object"),
                "{err}"
            );
        }
    }

    /// The duplicate check compares keys in a list up to 32 and hashes
    /// them beyond: both find a repeat, written plainly or escaped.
    #[test]
    fn a_key_named_twice_is_refused_however_many_keys_and_however_written() {
        let limits = Limits::default();
        let doc = |keys: usize, repeat: &str| {
            let mut json = String::from(
                r#"{"resourceType":"Bundle","type":"document","entry":[{"resource":{"resourceType":"Composition"}}]"#,
            );
            for k in 0..keys {
                json.push_str(&format!(r#","k{k}":"v""#));
            }
            json.push_str(repeat);
            json.push('}');
            json
        };
        for keys in [3, 31, 32, 33, 40] {
            for repeat in [r#","k1":"w""#, r#","\u006b1":"w""#] {
                let err = parse(doc(keys, repeat).as_bytes(), &limits).unwrap_err();
                assert_eq!(err.0.len(), 1, "{keys}: {err}");
                assert_eq!(err.0[0].field, "document");
                assert!(err.0[0].description.contains("`k1` twice"), "{keys}: {err}");
            }
            // Distinct keys alone are no reason to refuse the JSON.
            let err = parse(doc(keys, "").as_bytes(), &limits).unwrap_err();
            assert!(err.0.iter().all(|v| v.field != "document"), "{keys}: {err}");
        }
    }

    #[test]
    fn entries_and_arrays_are_bounded_before_any_entry_is_read() {
        let bundle = |entries: usize| {
            let entry = r#"{"fullUrl":"urn:uuid:x","resource":{"resourceType":"Flag"}}"#;
            format!(
                r#"{{"resourceType":"Bundle","type":"document","entry":[{}]}}"#,
                vec![entry; entries].join(",")
            )
        };
        let limits = Limits::default();
        let e = parse(bundle(2_001).as_bytes(), &limits).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e:?}");
        assert_eq!(
            (e.0[0].field.as_str(), e.0[0].description.as_str()),
            ("entry", "more than 2000 entries")
        );
        let e = parse(bundle(2_000).as_bytes(), &limits).unwrap_err();
        assert_ne!(e.0[0].field, "entry", "{e:?}");
        let long = format!(
            r#"{{"resourceType":"Bundle","type":"document","x":[{}]}}"#,
            vec!["1"; 10_001].join(",")
        );
        let e = parse(long.as_bytes(), &limits).unwrap_err();
        assert_eq!(e.0[0].field, "document");
        assert!(
            e.0[0].description.contains("more than 10000 items"),
            "{e:?}"
        );
    }

    /// A Medication contained in the statement that its own record
    /// withdraws (entered in error) is refused, as one in the Bundle is:
    /// read, it would carry a medicine the prescriber struck out.
    #[test]
    fn a_contained_medication_entered_in_error_is_refused_as_an_entry_is() {
        use super::super::test_doc::{entry_of, read_after, refused};
        use serde_json::json;
        let contained = |status: &'static str| {
            move |doc: &mut serde_json::Value| {
                let (_, m) = entry_of(doc, "MedicationStatement");
                let code = m["medicationCodeableConcept"].clone();
                let m = m.as_object_mut().expect("a resource");
                m.remove("medicationCodeableConcept");
                m.insert(
                    "contained".into(),
                    json!([{"resourceType": "Medication", "id": "med1", "status": status,
                            "code": code}]),
                );
                m.insert("medicationReference".into(), json!({"reference": "#med1"}));
            }
        };
        let read = read_after(contained("active")).expect("read");
        assert_eq!(read.medications[0].code.code, "39695411000001103");
        let fields = refused(read_after(contained("entered-in-error")));
        assert_eq!(fields.len(), 1, "{fields:?}");
        assert!(
            fields[0].ends_with("resource.medicationReference.reference"),
            "{fields:?}"
        );
        // The same medicine as an entry in the Bundle: refused at the same place.
        let fields = refused(read_after(|doc| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            let code = m["medicationCodeableConcept"].clone();
            m.as_object_mut()
                .expect("a resource")
                .remove("medicationCodeableConcept");
            m["medicationReference"] = json!({"reference": "urn:uuid:med-1"});
            doc["entry"].as_array_mut().expect("entries").push(json!({
                "fullUrl": "urn:uuid:med-1",
                "resource": {"resourceType": "Medication", "status": "entered-in-error",
                             "code": code}
            }));
        }));
        assert!(
            fields
                .iter()
                .any(|f| f.ends_with("resource.medicationReference.reference")),
            "{fields:?}"
        );
    }

    /// Reads `text` (one resource, or the Bundle) as `T` from the text and
    /// from its tree: the same value, or the same refusal.
    fn reads_alike<'a, T: Deserialize<'a> + fmt::Debug>(text: &'a str, tree: &'a Value<'a>) {
        let (mut by_text, mut by_tree) = (ValidationErrors::default(), ValidationErrors::default());
        let a = typed::<T>(text, "r.", &mut by_text);
        let b = typed::<T>(tree, "r.", &mut by_tree);
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{text}");
        assert_eq!(by_text, by_tree, "{text}");
    }

    fn reads_alike_as(kind: &str, text: &str) {
        let mut de = serde_json::Deserializer::from_str(text);
        let Ok(tree) =
            serde::de::DeserializeSeed::deserialize(FhirJson { in_array: false }, &mut de)
        else {
            return; // not FHIR JSON: refused before any typed read
        };
        match kind {
            "Bundle" => reads_alike::<BundleShape>(text, &tree),
            "Composition" => reads_alike::<Composition>(text, &tree),
            "Patient" => reads_alike::<Patient>(text, &tree),
            "Encounter" => reads_alike::<Encounter>(text, &tree),
            "Organization" => reads_alike::<Organization>(text, &tree),
            "Practitioner" => reads_alike::<Practitioner>(text, &tree),
            "Medication" => reads_alike::<Medication>(text, &tree),
            "MedicationStatement" => reads_alike::<MedicationStatement>(text, &tree),
            "MedicationAdministration" => reads_alike::<MedicationAdministration>(text, &tree),
            "MedicationRequest" => reads_alike::<MedicationRequest>(text, &tree),
            "AllergyIntolerance" => reads_alike::<AllergyIntolerance>(text, &tree),
            "Flag" => reads_alike::<Flag>(text, &tree),
            "Condition" => reads_alike::<Condition>(text, &tree),
            "Immunization" => reads_alike::<Immunization>(text, &tree),
            "Observation" => reads_alike::<Observation>(text, &tree),
            "ServiceRequest" => reads_alike::<ServiceRequest>(text, &tree),
            "Consent" => reads_alike::<Consent>(text, &tree),
            other => panic!("no typed read listed for {other}"),
        }
    }

    /// Every place in `v` a value sits (object members and array items).
    fn places(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let here = format!("{at}/{k}");
                    out.push(here.clone());
                    places(v, &here, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let here = format!("{at}/{i}");
                    out.push(here.clone());
                    places(v, &here, out);
                }
            }
            _ => {}
        }
    }

    /// The test document and the patient fixtures as FHIR, one entry of
    /// each resource type each holds, and a dose given.
    fn every_kind_of_resource() -> Vec<serde_json::Value> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patients");
        let mut summaries = vec![super::super::test_doc::summary()];
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                summaries.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for s in &summaries {
            let rendered = super::super::render(s, JourneyEvent::Release);
            let doc: serde_json::Value = serde_json::from_slice(&rendered.bytes).unwrap();
            if out.is_empty() {
                out.push(doc.clone());
            }
            for entry in doc["entry"].as_array().unwrap() {
                let kind = entry["resource"]["resourceType"].as_str().unwrap();
                if seen.insert(kind.to_owned()) {
                    out.push(entry["resource"].clone());
                }
            }
        }
        out.push(serde_json::json!({
            "resourceType": "MedicationAdministration", "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": "https://dmd.nhs.uk", "code": "1"}]},
            "subject": {"reference": "urn:uuid:p"},
            "effectivePeriod": {"start": "2026-11-24T08:00:00Z"},
            "dosage": {"route": {"text": "oral"}, "dose": {"value": 60.5, "unit": "mg"}}
        }));
        out
    }

    /// The typed reads take each resource from the document's tree: a
    /// Bundle and every kind of resource the renderer writes (and a dose
    /// given), as written and with each of its values replaced by one of
    /// every JSON kind, read the same from the tree as from the text,
    /// refusals and paths included.
    #[test]
    fn a_typed_read_of_the_tree_is_a_typed_read_of_the_text() {
        use serde_json::json;
        let resources = every_kind_of_resource();
        let replacements = [
            json!(5),
            json!(-3),
            json!(1.5),
            json!(1e2),
            json!(4_294_967_296_u64),
            json!(i64::MIN),
            json!("x"),
            json!("with \"escapes\""),
            json!(true),
            json!(null),
            json!(["x"]),
            json!(["x", {"a": "b"}, 7]),
            json!({"a": "b"}),
            json!({"a\"b": "c", "resourceType": "Medication"}),
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for resource in &resources {
            let kind = resource["resourceType"].as_str().unwrap();
            kinds.insert(kind.to_owned());
            reads_alike_as(kind, &resource.to_string());
            let mut at = Vec::new();
            places(resource, "", &mut at);
            for place in at.iter().filter(|p| *p != "/resourceType") {
                for r in &replacements {
                    let mut changed = resource.clone();
                    *changed.pointer_mut(place).unwrap() = r.clone();
                    reads_alike_as(kind, &changed.to_string());
                }
                // Left out, where it is an object's member.
                let (parent, name) = place.rsplit_once('/').unwrap();
                let mut changed = resource.clone();
                if let Some(members) = changed.pointer_mut(parent).and_then(|p| p.as_object_mut()) {
                    members.remove(name);
                    reads_alike_as(kind, &changed.to_string());
                }
            }
        }
        assert!(kinds.len() >= 16, "{kinds:?}");
    }

    /// A refusal names the type expected, never what was written: a value
    /// holding serde's own words (", expected ") is not echoed back.
    #[test]
    fn a_wrong_type_is_reported_without_the_value_written() {
        let mut errors = ValidationErrors::default();
        let text = r#"{"frequency":"x, expected 9990001014"}"#;
        assert!(typed::<TimingRepeat>(text, "r.", &mut errors).is_none());
        assert_eq!(errors.0.len(), 1, "{errors:?}");
        assert_eq!(errors.0[0].field, "r.frequency");
        assert!(!errors.0[0].description.contains("999"), "{errors:?}");
        assert!(
            errors.0[0].description.starts_with("wrong type: expected"),
            "{errors:?}"
        );
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a":[{"b":"[[[["}]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"\"[[","b":[[]]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"x\\"}"#), 1);
        assert_eq!(json_depth(br#"[["unterminated \"#), 2);
        assert_eq!(json_depth(br#"[["unterminated [[["#), 2);
    }
}
