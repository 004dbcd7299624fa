//! Free-text reasons from callers (a nack's reason, an operator's reason)
//! are refused when they look like patient data: they are stored in clear in
//! delivery records and the audit trail, returned by Track and operator
//! calls, and written to logs only by their length. The error says what the
//! text looks like, never the text (`docs/edge-limits.md` says why refusing
//! rather than sealing).
//!
//! What counts as looking like patient data: a run of six or more digits
//! (NHS numbers, hospital numbers, phone numbers, compact dates, CRNs),
//! dates in any common notation, the words "date of birth" / "DOB" / "born",
//! a prison number, a postcode, an e-mail address, and control characters.
//! A name or a drug cannot be told from ordinary words; that residual risk is
//! why the dashboard never shows these texts at all.

use std::sync::LazyLock;

use regex::Regex;

use crate::clinical::ValidationErrors as Violations;

const MONTHS: &str = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?";
/// Without "may", which is mostly the verb: a day next to it is not enough.
const MONTHS_BUT_MAY: &str = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?";

/// (what it looks like, pattern), checked in order.
static SHAPES: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let numeric_date =
        r"\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b|\b\d{1,2}\s+\d{1,2}\s+(?:19|20)\d{2}\b";
    let day_month = format!(r"(?i)\b\d{{1,2}}(?:st|nd|rd|th)?\s*(?:{MONTHS_BUT_MAY})\b");
    let month_day = format!(r"(?i)\b(?:{MONTHS_BUT_MAY})\.?\s*\d{{1,2}}(?:st|nd|rd|th)?\b");
    let month_year = format!(r"(?i)\b(?:{MONTHS})\.?,?\s*(?:19|20)\d{{2}}\b");
    [
        ("a control character", r"[\p{Cc}\p{Cf}]".to_owned()),
        (
            "a date of birth",
            r"(?i)\b(?:d\.?\s?o\.?\s?b\b\.?|date\s+of\s+birth|born)".to_owned(),
        ),
        ("a date", numeric_date.to_owned()),
        ("a date", day_month),
        ("a date", month_day),
        ("a date", month_year),
        // Six digits in a row, or an NHS number or phone number in groups;
        // a case reference such as `SAR 2026-117` is fine.
        (
            "a long number",
            r"\d{6}|\b\d(?:[ .\-]?\d){9}\b|\b\d{4,5}[ \-]\d{6}\b".to_owned(),
        ),
        (
            "a prison number",
            r"\b[A-Za-z]\d{4}[A-Za-z]{2}\b".to_owned(),
        ),
        (
            "a postcode",
            r"(?i)\b[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}\b".to_owned(),
        ),
        (
            "an e-mail address",
            r"[^\s@]+@[^\s@]+\.[A-Za-z]{2,}".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(what, pattern)| (what, Regex::new(&pattern).expect("a valid pattern")))
    .collect()
});

/// What in `text` looks like patient data, if anything.
pub fn looks_like_patient_data(text: &str) -> Option<&'static str> {
    SHAPES
        .iter()
        .find(|(_, pattern)| pattern.is_match(text))
        .map(|(what, _)| *what)
}

/// Checks a free-text reason: `min_chars` characters to 500 bytes, and nothing that
/// looks like patient data. Violations say what is wrong, never the text.
pub fn check_reason(field: &str, reason: &str, min_chars: usize, v: &mut Violations) {
    if reason.trim().chars().count() < min_chars.max(1) || reason.len() > 500 {
        v.add(
            field,
            format!(
                "required: {} characters to 500 bytes saying why (no patient data)",
                min_chars.max(1)
            ),
        );
    } else if let Some(what) = looks_like_patient_data(reason) {
        v.add(
            field,
            format!(
                "must not contain patient data, and this has what looks like {what}: say what is wrong, not who it is about"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_shaped_text_is_named_by_kind() {
        for (text, what) in [
            ("patient 943 476 5919 not ours", "a long number"),
            ("nhs 9434765919", "a long number"),
            ("John Smith 15/06/1985 methadone 60mg", "a date"),
            ("born 1985, not registered here", "a date of birth"),
            ("DOB wrong", "a date of birth"),
            ("d.o.b. mismatch", "a date of birth"),
            ("seen on 3rd March", "a date"),
            ("June 15, 1985", "a date"),
            ("since March 2019", "a date"),
            ("2024-02-29 release", "a date"),
            ("prisoner A1234BC", "a prison number"),
            ("lives at LS1 4AP", "a postcode"),
            ("mail j.smith@example.org", "an e-mail address"),
            ("line\nbreak", "a control character"),
            ("phone 07700900123", "a long number"),
            ("phone 07700 900123", "a long number"),
            ("nhs 943-476-5919", "a long number"),
            ("nhs 943.476.5919", "a long number"),
            ("9434 765 919 not ours", "a long number"),
            ("15 06 1985 mismatch", "a date"),
            ("lives ls1 4ap", "a postcode"),
        ] {
            assert_eq!(looks_like_patient_data(text), Some(what), "{text}");
        }
    }

    #[test]
    fn ordinary_reasons_pass() {
        for text in [
            "unsupported FHIR profile",
            "HL7 v2 segment PID missing",
            "not registered at this practice; attempt 3 of 5",
            "mailbox format mismatch: expected FHIR R4",
            "may retry later",
            "attempt 3 of 5 may be retried",
            "subject access request 2026-117",
            "payload failed schema validation (error 42)",
        ] {
            assert_eq!(looks_like_patient_data(text), None, "{text}");
        }
    }

    #[test]
    fn the_violation_never_quotes_the_text() {
        let mut v = Violations::default();
        check_reason("reason", "John Smith 9434765919", 1, &mut v);
        assert_eq!(v.0.len(), 1);
        assert!(!v.0[0].description.contains("9434765919"));
        assert!(v.0[0].description.contains("a long number"));
    }
}
