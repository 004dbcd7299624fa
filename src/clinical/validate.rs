//! Clinical completeness: what each journey event needs before it can help
//! the next carer. Paths are in the canonical model.

use super::model::{Address, ClinicalSummary, RiskKind};
use super::violation::ValidationErrors;
use crate::clinical::JourneyEvent;

/// Checks that `s` carries what `event` needs.
///
/// # Errors
/// Every missing or inconsistent field.
pub fn validate(s: &ClinicalSummary, event: JourneyEvent) -> Result<(), ValidationErrors> {
    validate_serialised(
        s,
        event,
        &serde_json::to_vec(s).expect("the model serialises"),
    )
}

/// Most entries in one list of a summary (medicines, allergies, ...). A
/// person's record holds tens; a list beyond this is not a clinical summary,
/// and rendered for every recipient it would outgrow what a pull can carry
/// and what an HL7 v2 receiver reads (2,000 segments).
pub const MAX_ITEMS: usize = 200;

/// Largest summary as stored (its JSON), bytes: twice the largest document.
/// A compact native document can expand far more than a FHIR one.
pub const MAX_SUMMARY_JSON: usize = 8 * 1024 * 1024;

/// The lists of a summary over [`MAX_ITEMS`], by name and length.
#[must_use]
pub fn over_long_lists(lengths: &[(&'static str, usize)]) -> Vec<(&'static str, usize)> {
    lengths
        .iter()
        .copied()
        .filter(|(_, n)| *n > MAX_ITEMS)
        .collect()
}

fn list_lengths(s: &ClinicalSummary) -> [(&'static str, usize); 10] {
    [
        ("diagnoses", s.diagnoses.len()),
        ("medications", s.medications.len()),
        ("prescriptions", s.prescriptions.len()),
        ("allergies", s.allergies.len()),
        ("risks", s.risks.len()),
        ("infections", s.infections.len()),
        ("vaccinations", s.vaccinations.len()),
        ("follow_ups", s.follow_ups.len()),
        ("patient.given_names", s.patient.given_names.len()),
        (
            "custody.release_address.lines",
            s.custody
                .release_address
                .as_ref()
                .map_or(0, |a| a.lines.len()),
        ),
    ]
}

/// [`validate`], given `json`: `s` as `serde_json::to_vec` writes it (the
/// caller stores those bytes, so they are written once).
///
/// # Errors
/// As for [`validate`].
pub fn validate_serialised(
    s: &ClinicalSummary,
    event: JourneyEvent,
    json: &[u8],
) -> Result<(), ValidationErrors> {
    let mut e = ValidationErrors::default();
    for (list, n) in over_long_lists(&list_lengths(s)) {
        e.add(
            format!("summary.{list}"),
            format!("{n} entries; at most {MAX_ITEMS}"),
        );
    }
    if json.len() > MAX_SUMMARY_JSON {
        e.add(
            "summary",
            format!("{} bytes as stored; at most {MAX_SUMMARY_JSON}", json.len()),
        );
    }
    if !e.0.is_empty() {
        return Err(e);
    }
    let p = &s.patient;
    if p.nhs_number.is_none() && p.prison_number.is_none() {
        e.add(
            "summary.patient",
            "an NHS number or a prison number is required",
        );
    }
    if !p.date_of_birth.is_plausible_birth_date() {
        e.add(
            "summary.patient.date_of_birth",
            "must not be before 1900 or in the future",
        );
    }
    if p.family_name.trim().is_empty() {
        e.add("summary.patient.family_name", "required");
    }
    let c = &s.custody;
    match event {
        JourneyEvent::Admission if c.reception_date.is_none() => {
            e.add(
                "summary.custody.reception_date",
                "an admission needs the reception date",
            );
        }
        JourneyEvent::Transfer => {
            if c.transfer_at.is_none() {
                e.add(
                    "summary.custody.transfer_at",
                    "a transfer needs the transfer time",
                );
            }
            if c.transfer_to.is_none() {
                e.add(
                    "summary.custody.transfer_to",
                    "a transfer needs the receiving prison",
                );
            }
        }
        JourneyEvent::Release => {
            if c.release_date.is_none() {
                e.add(
                    "summary.custody.release_date",
                    "a release needs the release date",
                );
            }
            match &c.release_address {
                None if !c.no_fixed_abode => e.add(
                    "summary.custody.release_address",
                    "a release needs the release address, or no_fixed_abode",
                ),
                Some(a) if !says_where(a) && !c.no_fixed_abode => e.add(
                    "summary.custody.release_address",
                    "has no street line and no postcode, so it does not say where the patient \
                     will live: a release needs a street line or a postcode, or no_fixed_abode",
                ),
                _ => {}
            }
        }
        _ => {}
    }
    check_custody_dates(s, &mut e);
    for (i, m) in s.medications.iter().enumerate() {
        if m.opioid_substitution && m.last_dose_given.is_none() {
            e.add(
                format!("summary.medications[{i}].last_dose_given"),
                "opioid substitution therapy needs the time of the last dose given",
            );
        }
    }
    for (i, r) in s.risks.iter().enumerate() {
        if r.kind == RiskKind::Other && r.code.is_none() && r.note.is_none() {
            e.add(
                format!("summary.risks[{i}].code"),
                "a risk of kind other needs its code or a note saying what the risk is",
            );
        }
    }
    check_text(s, json, &mut e);
    check_days_supplied(s, &mut e);
    e.into_result()
}

/// Whether an address says where someone lives: a street line or a
/// postcode that is not blank. A town or a country alone (FHIR
/// `{"use":"home","country":"GB"}`, an HL7 PID-11 with an empty first
/// repetition) names no door a carer could knock on.
fn says_where(a: &Address) -> bool {
    a.lines.iter().any(|l| !l.trim().is_empty()) || !a.postcode.trim().is_empty()
}

/// The last year a custody date may fall in: deadlines are computed from
/// them, and a date beyond the calendar the gateway computes in would leave
/// a release with no deadline at all.
const LAST_CUSTODY_YEAR: i32 = 2099;

/// Custody dates within the patient's life: not before the date of birth,
/// not after [`LAST_CUSTODY_YEAR`], and a reception not after the release.
fn check_custody_dates(s: &ClinicalSummary, e: &mut ValidationErrors) {
    let born = s.patient.date_of_birth.0;
    let c = &s.custody;
    let days = [
        (
            "summary.custody.reception_date",
            c.reception_date.map(|d| d.0),
        ),
        ("summary.custody.release_date", c.release_date.map(|d| d.0)),
        (
            "summary.custody.transfer_at",
            c.transfer_at.map(|t| t.0.date()),
        ),
    ];
    for (field, day) in days {
        match day {
            Some(d) if d < born => e.add(field, "must not be before the date of birth"),
            Some(d) if d.year() > LAST_CUSTODY_YEAR => {
                e.add(field, format!("must not be after {LAST_CUSTODY_YEAR}"));
            }
            _ => {}
        }
    }
    if let (Some(reception), Some(release)) = (c.reception_date, c.release_date)
        && release.0 < reception.0
    {
        e.add(
            "summary.custody.release_date",
            "must not be before the reception date",
        );
    }
    // The transfer's date as its sender wrote it (in its own offset), as
    // the reception date is written.
    if let (Some(reception), Some(transfer)) = (c.reception_date, c.transfer_at)
        && transfer.0.date() < reception.0
    {
        e.add(
            "summary.custody.transfer_at",
            "must not be before the reception date",
        );
    }
}

/// Days supplied fit FHIR's `integer`, which is 32-bit: a longer supply
/// could not be written.
fn check_days_supplied(s: &ClinicalSummary, e: &mut ValidationErrors) {
    let days = s
        .medications
        .iter()
        .map(|m| m.days_supplied)
        .enumerate()
        .map(|(i, d)| (format!("summary.medications[{i}].days_supplied"), d))
        .chain(s.prescriptions.iter().enumerate().map(|(i, p)| {
            (
                format!("summary.prescriptions[{i}].days_supplied"),
                p.days_supplied,
            )
        }));
    for (field, d) in days {
        if d.is_some_and(|d| d > i32::MAX as u32) {
            e.add(field, format!("at most {} days", i32::MAX));
        }
    }
}

/// Whether serialised JSON may hold a control character other than tab and
/// line breaks in a string. `serde_json` writes U+0000–U+001F as an escape
/// (`\n`, `\r` and `\t` are allowed; `\b`, `\f` and `\u00XX` are not) and
/// U+007F–U+009F as they are: 0x7F, or 0xC2 then 0x80–0x9F in UTF-8. A false
/// positive (a map key) only costs the tree walk, which decides.
fn may_hold_control(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'\\' => match json.get(i + 1) {
                Some(b'"' | b'\\' | b'/' | b'n' | b'r' | b't') => i += 2,
                _ => return true,
            },
            0x7F => return true,
            0xC2 if json.get(i + 1).is_some_and(|b| (0x80..=0x9F).contains(b)) => return true,
            // U+2028-U+202E and U+2066-U+2069 (see `hidden_format`).
            0xE2 if matches!(
                (json.get(i + 1), json.get(i + 2)),
                (Some(0x80), Some(0xA8..=0xAE)) | (Some(0x81), Some(0xA6..=0xA9))
            ) =>
            {
                return true;
            }
            _ => i += 1,
        }
    }
    false
}

/// Characters that change how text reads without showing: the
/// bidirectional embeddings, overrides and isolates (U+202A-U+202E,
/// U+2066-U+2069), which can make a dose or a name display as something
/// other than what is stored, and the line and paragraph separators
/// (U+2028, U+2029), a line break HL7 and many displays do not treat as
/// one. The marks a right-to-left name needs (U+200E, U+200F) stay.
fn hidden_format(c: char) -> bool {
    matches!(c, '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Text every format can carry: no control characters but tab and line
/// breaks (FHIR `string` forbids them, HL7 has no escape for most), and
/// codes FHIR reads as a `code` token and a `uri` system. The tree walk
/// that names each offending field runs only when `json` (the summary
/// serialised) holds a control character at all.
fn check_text(s: &ClinicalSummary, json: &[u8], e: &mut ValidationErrors) {
    fn walk(v: &serde_json::Value, path: &str, e: &mut ValidationErrors) {
        match v {
            serde_json::Value::String(t)
                if t.chars().any(|c| {
                    (c.is_control() && !matches!(c, '\t' | '\r' | '\n')) || hidden_format(c)
                }) =>
            {
                e.add(
                    path,
                    "must not contain control characters, bidirectional overrides or line \
                     separators",
                );
            }
            serde_json::Value::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), e);
                }
            }
            serde_json::Value::Object(map) => {
                for (k, x) in map {
                    walk(x, &format!("{path}.{k}"), e);
                }
            }
            _ => {}
        }
    }
    if may_hold_control(json) {
        walk(
            &serde_json::to_value(s).expect("the model serialises"),
            "summary",
            e,
        );
    }
    let codes = s
        .diagnoses
        .iter()
        .map(|d| ("diagnoses", "code", &d.code))
        .chain(
            s.medications
                .iter()
                .map(|m| ("medications", "code", &m.code)),
        )
        .chain(
            s.prescriptions
                .iter()
                .map(|m| ("prescriptions", "code", &m.code)),
        )
        .chain(
            s.allergies
                .iter()
                .map(|a| ("allergies", "substance", &a.substance)),
        )
        .chain(s.infections.iter().map(|i| ("infections", "code", &i.code)))
        .chain(
            s.vaccinations
                .iter()
                .map(|v| ("vaccinations", "code", &v.code)),
        );
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for (heading, field, code) in codes {
        let i = match seen.iter_mut().find(|(h, _)| *h == heading) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen.push((heading, 0));
                0
            }
        };
        // A diagnosis or an allergy may be recorded in words only (a
        // clinician's "allergic to sticking plasters"): carried as words,
        // where refusing it would hold up the whole summary. A medicine,
        // prescription, infection or vaccination needs its code.
        if WORDS_ALLOWED.contains(&heading) && code.is_words_only() {
            continue;
        }
        let token = |t: &str| {
            !t.is_empty()
                && t.split(' ')
                    .all(|w| !w.is_empty() && !w.contains(char::is_whitespace))
        };
        if !token(&code.code) {
            e.add(
                format!("summary.{heading}[{i}].{field}.code"),
                "required: a code without leading, trailing or repeated spaces",
            );
        }
        if code.system.is_empty() || code.system.contains(char::is_whitespace) {
            e.add(
                format!("summary.{heading}[{i}].{field}.system"),
                "required: a code system URI",
            );
        }
    }
}

/// The headings whose entries may be recorded in words only.
pub const WORDS_ALLOWED: [&str; 2] = ["diagnoses", "allergies"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_with_a_list_over_the_limit_or_too_large_is_refused() {
        let mut s = crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            None,
            "m",
        );
        let allergy =
            s.allergies
                .first()
                .cloned()
                .unwrap_or_else(|| crate::clinical::model::Allergy {
                    substance: crate::clinical::model::Code::words("Peanut"),
                    reaction: None,
                    severity: None,
                });
        s.allergies = vec![allergy; MAX_ITEMS + 1];
        let e = validate(&s, JourneyEvent::Release).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e:?}");
        assert_eq!(e.0[0].field, "summary.allergies");
        s.allergies.truncate(1);
        s.medications[0].days_supplied = Some(3_000_000_000);
        let e = validate(&s, JourneyEvent::Release).unwrap_err();
        assert_eq!(e.0[0].field, "summary.medications[0].days_supplied");
        s.medications[0].days_supplied = Some(28);
        s.patient.family_name = "x".repeat(MAX_SUMMARY_JSON);
        let e = validate(&s, JourneyEvent::Release).unwrap_err();
        assert_eq!(e.0[0].field, "summary");
    }

    /// An address counts only when it says where: a street line or a
    /// postcode. An empty one (FHIR `{"use":"home","country":"GB"}`, HL7
    /// PID-11 with an empty first repetition) is no release address, in
    /// every format.
    #[test]
    fn a_release_address_without_a_line_or_a_postcode_is_refused() {
        use crate::clinical::model::Address;
        let mut s = summary_with("a");
        let fields = |s: &ClinicalSummary| match validate(s, JourneyEvent::Release) {
            Ok(()) => Vec::new(),
            Err(e) => e.0.into_iter().map(|v| v.field).collect::<Vec<_>>(),
        };
        for empty in [
            Address {
                lines: Vec::new(),
                city: String::new(),
                postcode: String::new(),
            },
            Address {
                lines: vec![" ".into(), String::new()],
                city: "Northam".into(),
                postcode: "  ".into(),
            },
        ] {
            s.custody.release_address = Some(empty);
            assert_eq!(fields(&s), ["summary.custody.release_address"]);
            // No fixed abode says where the patient will be: nowhere known.
            s.custody.no_fixed_abode = true;
            assert_eq!(fields(&s), Vec::<String>::new());
            s.custody.no_fixed_abode = false;
        }
        for enough in [
            Address {
                lines: vec!["1 Invented Street".into()],
                city: String::new(),
                postcode: String::new(),
            },
            Address {
                lines: Vec::new(),
                city: String::new(),
                postcode: "ZZ1 1ZZ".into(),
            },
        ] {
            s.custody.release_address = Some(enough);
            assert_eq!(fields(&s), Vec::<String>::new());
        }
        // Only a release needs one: an admission's empty address is not
        // where anyone is sent.
        s.custody.release_address = Some(Address {
            lines: Vec::new(),
            city: String::new(),
            postcode: String::new(),
        });
        s.custody.release_date = None;
        assert_eq!(
            validate(&s, JourneyEvent::Admission).map_err(|e| e.to_string()),
            Ok(())
        );
    }

    #[test]
    fn a_transfer_before_the_reception_is_refused() {
        let mut s = summary_with("t");
        s.custody.reception_date = "2026-03-10".parse().ok();
        s.custody.release_date = None;
        s.custody.transfer_to = "YP002".parse().ok();
        s.custody.transfer_at = "2026-03-01T10:00:00+00:00".parse().ok();
        let mut e = ValidationErrors::default();
        check_custody_dates(&s, &mut e);
        let fields: Vec<&str> = e.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["summary.custody.transfer_at"]);
        s.custody.transfer_at = "2026-03-10T10:00:00+00:00".parse().ok();
        let mut e = ValidationErrors::default();
        check_custody_dates(&s, &mut e);
        assert!(e.0.is_empty(), "{e:?}");
        // The date as written: 00:30 BST on the reception day is that day.
        s.custody.reception_date = "2026-07-10".parse().ok();
        s.custody.transfer_at = "2026-07-10T00:30:00+01:00".parse().ok();
        let mut e = ValidationErrors::default();
        check_custody_dates(&s, &mut e);
        assert!(e.0.is_empty(), "{e:?}");
    }

    use proptest::prelude::*;

    fn summary_with(text: &str) -> ClinicalSummary {
        crate::clinical::synthetic::release_summary(
            Some("9990000018".parse().expect("test NHS number")),
            None,
            "YP001".parse().expect("ODS code"),
            Some("YG001".parse().expect("ODS code")),
            text,
        )
    }

    fn text_violations(s: &ClinicalSummary) -> Vec<String> {
        let mut e = ValidationErrors::default();
        check_text(s, &serde_json::to_vec(s).expect("serialises"), &mut e);
        e.0.into_iter()
            .filter(|v| v.description.contains("control"))
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn a_control_character_is_named_by_its_field_and_allowed_breaks_pass() {
        for bad in [
            "\u{0}", "\u{8}", "\u{c}", "\u{1b}", "\u{7f}", "\u{85}", "\u{9f}", "\u{202e}",
            "\u{202a}", "\u{2066}", "\u{2069}", "\u{2028}", "\u{2029}",
        ] {
            let s = summary_with(&format!("before{bad}after"));
            let fields = text_violations(&s);
            assert_eq!(fields.len(), 1, "{bad:?}: {fields:?}");
            assert!(fields[0].starts_with("summary."), "{fields:?}");
        }
        for fine in [
            "tab\there",
            "line\nbreak\r\n",
            "quote \" and \\ back\\n",
            "\u{a0}é€",
            // The marks a right-to-left name needs, and a zero-width joiner.
            "\u{200f}שרה\u{200e}",
            "\u{200d}",
        ] {
            assert!(text_violations(&summary_with(fine)).is_empty(), "{fine:?}");
        }
    }

    proptest! {
        /// The byte scan never calls clean what the field walk would refuse.
        #[test]
        fn the_byte_scan_misses_no_control_character(text in "\\PC*|[\\x00-\\x{a0}\\\\\"\\x{2020}-\\x{2070}]{0,12}") {
            let s = summary_with(&text);
            let json = serde_json::to_vec(&s).expect("serialises");
            let refused = text
                .chars()
                .any(|c| (c.is_control() && !matches!(c, '\t' | '\r' | '\n')) || hidden_format(c));
            prop_assert_eq!(!text_violations(&s).is_empty(), refused);
            if refused {
                prop_assert!(may_hold_control(&json));
            }
        }
    }
}
