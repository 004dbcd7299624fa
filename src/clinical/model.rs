//! The canonical clinical summary, after the PRSB headings. Every format we
//! read or write converts to and from this model; nothing else is shared
//! between formats.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::identifiers::{Crn, NhsNumber, OdsCode, PrisonNumber};

/// A calendar date (`YYYY-MM-DD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(pub time::Date);

/// A moment with its UTC offset (RFC 3339), to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateTime(pub time::OffsetDateTime);

const DATE: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

impl FromStr for Date {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Exactly YYYY-MM-DD, as FHIR's `date` and ISO 8601 write it: the
        // parser alone would take a signed year (`+1980-05-14`).
        let b = s.as_bytes();
        let shape = b.len() == 10
            && b.iter().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    *c == b'-'
                } else {
                    c.is_ascii_digit()
                }
            });
        // FHIR's date has no year 0000 (nor has the calendar: 1 BC is
        // followed by AD 1).
        if !shape || s.starts_with("0000") {
            return Err("must be a calendar date written YYYY-MM-DD");
        }
        time::Date::parse(s, DATE)
            .map(Date)
            .map_err(|_| "must be a calendar date written YYYY-MM-DD")
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.format(DATE).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for DateTime {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // FHIR's dateTime: `T` between date and time and an upper-case `Z`;
        // RFC 3339 parsers also take a space or a lower-case `t`/`z`.
        if s.len() < 11 || s.as_bytes()[10] != b'T' || s.contains(['t', 'z']) {
            return Err("must be a date and time with offset (RFC 3339)");
        }
        s[..10]
            .parse::<Date>()
            .map_err(|_| "must be a date and time with offset (RFC 3339)")?;
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|_| "must be a date and time with offset (RFC 3339)")?;
        // FHIR's dateTime (and every real zone): offsets from -14:00 to +14:00.
        if t.offset().whole_seconds().unsigned_abs() > 14 * 3600 {
            return Err("must have an offset between -14:00 and +14:00");
        }
        Ok(DateTime(t))
    }
}

impl fmt::Display for DateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self
            .0
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        f.write_str(&s)
    }
}

impl Date {
    /// The one rule for a date of birth, wherever it is written (the
    /// document, or a `PatientRef`): not before 1900 and not in the future
    /// (UTC, with a day's grace for time zones east of it).
    pub fn is_plausible_birth_date(self) -> bool {
        let tomorrow = time::OffsetDateTime::now_utc().date().next_day();
        self.0.year() >= 1900 && tomorrow.is_none_or(|t| self.0 <= t)
    }

    /// The last millisecond of this day in UTC, ms since the epoch.
    pub fn end_of_day_ms(self) -> i64 {
        let end = self
            .0
            .with_hms_milli(23, 59, 59, 999)
            .unwrap_or(self.0.midnight());
        i64::try_from(end.assume_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }
}

impl DateTime {
    /// This moment, ms since the epoch.
    pub fn unix_ms(self) -> i64 {
        i64::try_from(self.0.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }
}

/// A FHIR `dateTime` at whatever precision it was written: `2026`,
/// `2026-09`, `2026-09-01`, or a time to the second (with optional
/// fraction) and its offset. Kept as written, so no precision is invented
/// or lost; HL7 v2 `DTM` carries every one of these precisions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct When(String);

impl When {
    /// As HL7 v2 `DTM`: `YYYY[MM[DD[HHMMSS[.SSSS]+ZZZZ]]]`. A fraction
    /// longer than HL7's four digits is cut; the caller says so.
    pub fn to_hl7(&self) -> (String, bool) {
        let s = &self.0;
        let Some((date, time)) = s.split_once('T') else {
            return (s.replace('-', ""), false);
        };
        let split = time.find(['Z', '+', '-']).unwrap_or(time.len());
        let (clock, zone) = time.split_at(split);
        let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
        let mut out = date.replace('-', "");
        out.push_str(&hms.replace(':', ""));
        if !fraction.is_empty() {
            out.push('.');
            out.push_str(&fraction[..fraction.len().min(4)]);
        }
        out.push_str(if zone == "Z" { "+0000" } else { "" });
        out.push_str(&zone.replace([':', 'Z'], ""));
        (out, fraction.len() > 4)
    }

    /// The day this names in England and Wales: the date as written, or for
    /// a time with its offset the calendar day in England at that instant
    /// (`2026-06-30T23:30:00Z` is 1 July, 00:30 BST). None for a year or a
    /// month alone.
    pub fn day_in_england(&self) -> Option<Date> {
        let s = &self.0;
        if s.contains('T') {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()?;
            return Some(Date(date_in_england(t)));
        }
        s.parse().ok().filter(|_| s.len() == 10)
    }

    /// From HL7 v2 `DTM`/`TS`/`DT` at any precision. A time without an
    /// offset is the sender's local time (HL7 v2.5.1 §2A.3.22), here UK
    /// time: 08:10 on a summer day is `08:10:00+01:00` (FHIR needs an offset
    /// with a time); a time to the hour or minute gains zero seconds.
    pub fn from_hl7(v: &str) -> Option<Self> {
        let split = v.find(['+', '-']).unwrap_or(v.len());
        let (stamp, zone) = v.split_at(split);
        let (digits, fraction) = stamp.split_once('.').unwrap_or((stamp, ""));
        if !digits.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
            || (!fraction.is_empty() && digits.len() != 14)
            || fraction.len() > 4
            || stamp.ends_with('.')
        {
            return None;
        }
        // An offset is `+HHMM` or `-HHMM`, ASCII digits (HL7 v2.5.1
        // §2A.3.22); anything else, a decoded escape included, is refused.
        let zone_ok = zone.is_empty()
            || (zone.len() == 5 && zone.bytes().skip(1).all(|b| b.is_ascii_digit()));
        if !zone_ok {
            return None;
        }
        let d = |r: std::ops::Range<usize>| digits.get(r).unwrap_or("");
        let text = match digits.len() {
            // A date keeps no offset: the day is the day the sender wrote.
            4 | 6 | 8 => [d(0..4), d(4..6), d(6..8)]
                .iter()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("-"),
            10 | 12 | 14 => {
                let secs = if digits.len() == 14 { d(12..14) } else { "00" };
                let mins = if digits.len() >= 12 { d(10..12) } else { "00" };
                let num = |r: std::ops::Range<usize>| d(r).parse::<i8>().ok();
                let zone = match zone.len() {
                    0 => offset_in_england(
                        d(0..4).parse().ok()?,
                        num(4..6)?,
                        num(6..8)?,
                        num(8..10)?,
                        mins.parse().ok()?,
                        secs.parse().ok()?,
                    )?,
                    5 => format!("{}:{}", &zone[..3], &zone[3..]),
                    _ => return None,
                };
                let fraction = if fraction.is_empty() {
                    String::new()
                } else {
                    format!(".{fraction}")
                };
                format!(
                    "{}-{}-{}T{}:{mins}:{secs}{fraction}{zone}",
                    d(0..4),
                    d(4..6),
                    d(6..8),
                    d(8..10)
                )
            }
            _ => return None,
        };
        text.parse().ok()
    }
}

/// The calendar day in England and Wales at instant `t` (23:30 UTC on a
/// summer evening is already the next day in BST).
pub(crate) fn date_in_england(t: time::OffsetDateTime) -> time::Date {
    let fallback = t.to_offset(time::UtcOffset::UTC).date();
    let (Ok(ts), Ok(zone)) = (
        jiff::Timestamp::from_nanosecond(t.unix_timestamp_nanos()),
        jiff::tz::TimeZone::get("Europe/London"),
    ) else {
        return fallback;
    };
    let civil = ts.to_zoned(zone).date();
    time::Month::try_from(u8::try_from(civil.month()).unwrap_or(1))
        .ok()
        .and_then(|m| {
            time::Date::from_calendar_date(
                i32::from(civil.year()),
                m,
                u8::try_from(civil.day()).unwrap_or(1),
            )
            .ok()
        })
        .unwrap_or(fallback)
}

/// The UTC offset England and Wales keep at a wall-clock time, as `+01:00`
/// or `+00:00` (Europe/London, as the gateway shows times; read here from the
/// same bundled tz database itself). A time the spring change skips reads as
/// after it, one the autumn change repeats as the first (BST); `None` for a
/// time that is not one.
fn offset_in_england(y: i16, mo: i8, d: i8, h: i8, mi: i8, s: i8) -> Option<String> {
    use jiff::tz::AmbiguousOffset;
    let zone = jiff::tz::TimeZone::get("Europe/London").ok()?;
    let civil = jiff::civil::DateTime::new(y, mo, d, h, mi, s, 0).ok()?;
    // The offset in force before a change, with the clock time as written:
    // in a gap (01:30 on the spring day) that is the instant an hour after
    // the change began (01:30Z, 02:30 BST), in a fold the first (BST).
    let offset = match zone.to_ambiguous_zoned(civil).offset() {
        AmbiguousOffset::Unambiguous { offset }
        | AmbiguousOffset::Gap { before: offset, .. }
        | AmbiguousOffset::Fold { before: offset, .. } => offset,
    };
    let secs = offset.seconds();
    let sign = if secs < 0 { '-' } else { '+' };
    let secs = secs.unsigned_abs();
    Some(format!("{sign}{:02}:{:02}", secs / 3600, secs % 3600 / 60))
}

impl From<Date> for When {
    fn from(d: Date) -> Self {
        When(d.to_string())
    }
}

impl FromStr for When {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHY: &str = "must be a FHIR dateTime: YYYY, YYYY-MM, YYYY-MM-DD, or a time \
                           with seconds and offset";
        let ok = match s.len() {
            4 => s.bytes().all(|b| b.is_ascii_digit()) && s != "0000",
            7 => format!("{s}-01").parse::<Date>().is_ok(),
            10 => s.parse::<Date>().is_ok(),
            _ => {
                s.as_bytes().get(10) == Some(&b'T')
                    && !s.ends_with('z')
                    && s.parse::<DateTime>().is_ok()
            }
        };
        if !ok {
            return Err(WHY);
        }
        // One spelling of UTC, so HL7's +0000 and FHIR's Z compare equal.
        Ok(When(match s.strip_suffix("+00:00") {
            Some(rest) => format!("{rest}Z"),
            None => s.to_owned(),
        }))
    }
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! serde_via_display {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse()
                    .or_else(|e| <$t>::stored_in_year_zero(&s).ok_or(e))
                    .map_err(serde::de::Error::custom)
            }
        }
    )*};
}

/// Year 0000 is refused on the way in (FHIR's date has none), but a
/// summary stored before that rule still reads back, as it was written:
/// only the store's own JSON is read with serde (what a sender writes is
/// read with [`FromStr`]).
trait YearZero: Sized {
    fn stored_in_year_zero(s: &str) -> Option<Self>;
}

/// `s` with year 0000 written 0001, for the shape check alone.
fn year_one(s: &str) -> Option<String> {
    s.strip_prefix("0000").map(|rest| format!("0001{rest}"))
}

impl YearZero for Date {
    fn stored_in_year_zero(s: &str) -> Option<Self> {
        year_one(s)?.parse::<Date>().ok()?;
        time::Date::parse(s, DATE).ok().map(Date)
    }
}

impl YearZero for DateTime {
    fn stored_in_year_zero(s: &str) -> Option<Self> {
        year_one(s)?.parse::<DateTime>().ok()?;
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(DateTime)
    }
}

impl YearZero for When {
    fn stored_in_year_zero(s: &str) -> Option<Self> {
        year_one(s)?.parse::<When>().ok()?;
        Some(When(s.to_owned()))
    }
}
serde_via_display!(Date, DateTime, When);

/// A code from a terminology (SNOMED CT, dm+d) with its display text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    /// The code system (see [`SNOMED`], [`DMD`]).
    pub system: String,
    /// The code.
    pub code: String,
    /// Human-readable text.
    pub display: String,
}

impl Code {
    /// A diagnosis or allergy the sender recorded in words only, with no
    /// code: system and code empty, the words in `display`.
    pub fn words(text: impl Into<String>) -> Self {
        Self {
            system: String::new(),
            code: String::new(),
            display: text.into(),
        }
    }

    /// Whether this is words only (see [`Code::words`]).
    pub fn is_words_only(&self) -> bool {
        self.system.is_empty() && self.code.is_empty() && !self.display.trim().is_empty()
    }
}

/// SNOMED CT.
pub const SNOMED: &str = "http://snomed.info/sct";
/// NHS Dictionary of medicines and devices.
pub const DMD: &str = "https://dmd.nhs.uk";

/// Administrative sex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    /// Male.
    Male,
    /// Female.
    Female,
    /// Other.
    Other,
    /// Not known.
    Unknown,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Street lines.
    pub lines: Vec<String>,
    /// Town or city.
    pub city: String,
    /// Postcode.
    pub postcode: String,
}

/// Who the summary is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patient {
    /// NHS number; absent is allowed (and flagged), invalid never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nhs_number: Option<NhsNumber>,
    /// Prison number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prison_number: Option<PrisonNumber>,
    /// Probation case reference number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crn: Option<Crn>,
    /// Family name.
    pub family_name: String,
    /// Given names.
    pub given_names: Vec<String>,
    /// Date of birth.
    pub date_of_birth: Date,
    /// Administrative sex.
    pub sex: Sex,
}

/// The custody episode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Custody {
    /// The establishment (prison) holding or releasing the patient.
    pub establishment: OdsCode,
    /// Reception into custody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reception_date: Option<Date>,
    /// Transfer time, when transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_at: Option<DateTime>,
    /// The receiving establishment of a transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_to: Option<OdsCode>,
    /// Release date, when released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_date: Option<Date>,
    /// Where the patient goes on release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_address: Option<Address>,
    /// Released with no fixed abode.
    #[serde(default)]
    pub no_fixed_abode: bool,
}

/// A diagnosis or problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Diagnosis {
    /// SNOMED CT code.
    pub code: Code,
    /// Still active.
    pub active: bool,
    /// When it started, at the precision recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset: Option<When>,
}

/// A medicine the patient takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Medication {
    /// dm+d (or SNOMED) code.
    pub code: Code,
    /// Dose, e.g. `60 mg`.
    pub dose: String,
    /// Route, e.g. `oral`.
    pub route: String,
    /// Frequency, e.g. `once daily`.
    pub frequency: String,
    /// Taken under supervision (as opioid substitution often is).
    #[serde(default)]
    pub supervised: bool,
    /// Taken only when needed (PRN), not on a schedule: a regular dose of
    /// what the patient takes as needed is a different prescription.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub as_needed: bool,
    /// Opioid substitution therapy (methadone, buprenorphine).
    #[serde(default)]
    pub opioid_substitution: bool,
    /// When the last dose was given: what the next prescriber must know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dose_given: Option<DateTime>,
    /// Days supplied on release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_supplied: Option<u32>,
}

/// A quantity to supply: a decimal value and its unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantity {
    /// The amount, a decimal written as FHIR and HL7 NM allow (`1`, `0.5`).
    pub value: String,
    /// The unit, in words (`kit`, `tablet`).
    pub unit: String,
}

impl Quantity {
    /// Whether `v` is a decimal both FHIR (`decimal`, no exponent) and HL7
    /// (`NM`) read: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    pub fn is_decimal(v: &str) -> bool {
        let digits = v.strip_prefix('-').unwrap_or(v);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        v.len() <= 32
            && all_digits(int)
            && (int == "0" || !int.starts_with('0'))
            && frac.is_none_or(all_digits)
    }
}

/// A prescription issued for the patient to take away, on release or
/// transfer (FHIR `MedicationRequest`): naloxone, take-out supplies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prescription {
    /// dm+d (or SNOMED) code.
    pub code: Code,
    /// FHIR `MedicationRequest.status` (`active`, `completed`, ...).
    pub status: String,
    /// FHIR `MedicationRequest.intent` (`order`, `plan`, ...).
    pub intent: String,
    /// When it was written, at the precision recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authored_on: Option<When>,
    /// Dosage instructions, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dosage: Option<String>,
    /// How much is supplied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Quantity>,
    /// For how many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_supplied: Option<u32>,
}

/// `MedicationRequest.status` values (R4).
pub const PRESCRIPTION_STATUSES: [&str; 8] = [
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "entered-in-error",
    "stopped",
    "draft",
    "unknown",
];

/// `MedicationRequest.intent` values (R4).
pub const PRESCRIPTION_INTENTS: [&str; 8] = [
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];

/// An allergy or adverse reaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allergy {
    /// The substance.
    pub substance: Code,
    /// The reaction, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaction: Option<String>,
    /// Severity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
}

/// Severity of a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Mild.
    Mild,
    /// Moderate.
    Moderate,
    /// Severe.
    Severe,
}

/// Kinds of risk flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RiskKind {
    /// Risk of suicide.
    Suicide,
    /// Risk of self-harm.
    SelfHarm,
    /// Risk of violence to others.
    Violence,
    /// Vulnerable to harm from others.
    Vulnerability,
    /// A risk recorded under a code none of the above names (the flag's
    /// `code` says which); carried as recorded, never dropped.
    Other,
}

impl RiskKind {
    /// Every kind.
    pub const ALL: [RiskKind; 5] = [
        RiskKind::Suicide,
        RiskKind::SelfHarm,
        RiskKind::Violence,
        RiskKind::Vulnerability,
        RiskKind::Other,
    ];

    /// The stable code used in every format.
    pub fn code(self) -> &'static str {
        match self {
            RiskKind::Suicide => "suicide",
            RiskKind::SelfHarm => "self-harm",
            RiskKind::Violence => "violence",
            RiskKind::Vulnerability => "vulnerability",
            RiskKind::Other => "other",
        }
    }

    /// The kind a SNOMED CT concept names, for the few concepts whose meaning
    /// as a risk is unambiguous (docs/clinical-formats.md, "Risk flags"); any
    /// other concept is [`RiskKind::Other`], carried with its code.
    pub fn from_snomed(concept: &str) -> Option<Self> {
        match concept {
            // At risk for suicide (finding); Suicidal thoughts (finding).
            "225444004" | "6471006" => Some(RiskKind::Suicide),
            // Self-injurious behaviour (finding).
            "248062006" => Some(RiskKind::SelfHarm),
            _ => None,
        }
    }

    /// The kind with this code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// A risk flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskFlag {
    /// Which risk.
    pub kind: RiskKind,
    /// Currently active.
    pub active: bool,
    /// Clinician's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The risk's code as the sender recorded it (SNOMED CT, say), when it
    /// had one beside or instead of the kind; required for
    /// [`RiskKind::Other`], which says nothing on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
}

/// Mental health care.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MentalHealth {
    /// Under the care programme approach.
    #[serde(default)]
    pub care_programme_approach: bool,
    /// Name of the care coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub care_coordinator: Option<String>,
}

/// Substance-misuse treatment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstanceMisuse {
    /// In structured treatment.
    #[serde(default)]
    pub in_treatment: bool,
    /// The community service that continues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_service: Option<String>,
}

/// An infectious disease and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Infection {
    /// SNOMED CT code of the disease.
    pub code: Code,
    /// Status in words (e.g. `RNA positive`).
    pub status: String,
    /// Treatment start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub treatment_started: Option<Date>,
}

/// A vaccination given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vaccination {
    /// The vaccine.
    pub code: Code,
    /// When given, at the precision recorded.
    pub date: When,
}

/// Whether a follow-up is an appointment or a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowUpKind {
    /// A booked appointment.
    Appointment,
    /// A referral to a service.
    Referral,
}

/// A follow-up appointment or referral.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUp {
    /// Appointment or referral.
    pub kind: FollowUpKind,
    /// The service.
    pub service: String,
    /// When (appointments) or by when, at the precision recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<When>,
}

/// The patient's decision on sharing with probation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDecision {
    /// Consented.
    Given,
    /// Refused.
    Refused,
    /// Not asked or not recorded.
    NotRecorded,
}

impl ConsentDecision {
    /// [`ConsentDecision::NotRecorded`], the decision a summary written
    /// before a question was asked carries.
    pub fn not_recorded() -> Self {
        ConsentDecision::NotRecorded
    }

    fn is_not_recorded(&self) -> bool {
        *self == ConsentDecision::NotRecorded
    }
}

/// What FHIR and HL7 v2 say of a recorded treatment-sharing decision,
/// which only the native forms carry (the legal basis travels in all).
pub const TREATMENT_SHARING_NOT_CARRIED: &str = "consent.treatment_sharing: carried by the \
     native forms only; a FHIR or HL7 v2 recipient sees the legal basis, not this decision";

/// Consent and legal basis for sharing with probation and with community
/// treatment services (substance misuse service, mental health team).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// The patient's decision.
    pub probation_sharing: ConsentDecision,
    /// A recorded legal basis for sharing risk without consent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legal_basis: Option<String>,
    /// The patient's decision on sharing with the community substance
    /// misuse service and mental health team. Carried by the native forms
    /// only (FHIR and HL7 v2 list it as not carried; `docs/journey.md`).
    #[serde(
        default = "ConsentDecision::not_recorded",
        skip_serializing_if = "ConsentDecision::is_not_recorded"
    )]
    pub treatment_sharing: ConsentDecision,
}

/// Who wrote the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Author {
    /// The clinician's name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Their organisation.
    pub organisation: OdsCode,
}

/// The canonical clinical summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClinicalSummary {
    /// Demographics and identifiers.
    pub patient: Patient,
    /// The custody episode.
    pub custody: Custody,
    /// Registered (or nominated) GP practice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_gp: Option<OdsCode>,
    /// Diagnoses and problems.
    #[serde(default)]
    pub diagnoses: Vec<Diagnosis>,
    /// Medicines.
    #[serde(default)]
    pub medications: Vec<Medication>,
    /// Prescriptions to take away (FHIR `MedicationRequest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prescriptions: Vec<Prescription>,
    /// Allergies and adverse reactions.
    #[serde(default)]
    pub allergies: Vec<Allergy>,
    /// Risk flags.
    #[serde(default)]
    pub risks: Vec<RiskFlag>,
    /// Mental health care.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mental_health: Option<MentalHealth>,
    /// Substance-misuse treatment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substance_misuse: Option<SubstanceMisuse>,
    /// Infectious diseases.
    #[serde(default)]
    pub infections: Vec<Infection>,
    /// Vaccinations.
    #[serde(default)]
    pub vaccinations: Vec<Vaccination>,
    /// Follow-up appointments and referrals.
    #[serde(default)]
    pub follow_ups: Vec<FollowUp>,
    /// Consent to share with probation.
    pub consent: Consent,
    /// Author.
    pub author: Author,
    /// When written.
    pub authored_at: DateTime,
    /// What the document held that the gateway does not read, by path in
    /// the document as received (never values). Every delivery lists it in
    /// `not_carried`: nothing is dropped in silence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_read: Vec<String>,
}

impl ClinicalSummary {
    /// Opioid substitution therapy, or an active suicide or self-harm risk.
    pub fn is_urgent(&self) -> bool {
        self.on_opioid_substitution() || self.has_active_suicide_or_self_harm_risk()
    }

    /// Whether risk information may go to probation: consent given, or a
    /// recorded legal basis.
    pub fn may_share_risk_with_probation(&self) -> bool {
        self.consent.probation_sharing == ConsentDecision::Given || self.has_legal_basis()
    }

    /// Whether the treatment views may go to a community substance misuse
    /// service or mental health team: consent given, or a recorded legal
    /// basis. A refusal without a legal basis sends them nothing.
    pub fn may_share_with_treatment_services(&self) -> bool {
        self.consent.treatment_sharing == ConsentDecision::Given || self.has_legal_basis()
    }

    fn has_legal_basis(&self) -> bool {
        self.consent
            .legal_basis
            .as_deref()
            .is_some_and(|b| !b.trim().is_empty())
    }

    /// On opioid substitution therapy.
    pub fn on_opioid_substitution(&self) -> bool {
        self.medications.iter().any(|m| m.opioid_substitution)
    }

    /// An active mental health care plan (care programme approach), or an
    /// active suicide or self-harm risk: the community mental health team
    /// must pick the patient up.
    pub fn needs_mental_health_team(&self) -> bool {
        self.mental_health
            .as_ref()
            .is_some_and(|m| m.care_programme_approach)
            || self.has_active_suicide_or_self_harm_risk()
    }

    /// Whether an active suicide or self-harm risk is recorded.
    pub fn has_active_suicide_or_self_harm_risk(&self) -> bool {
        self.risks
            .iter()
            .any(|r| r.active && matches!(r.kind, RiskKind::Suicide | RiskKind::SelfHarm))
    }

    /// When the next opioid substitution dose is due, ms since the epoch:
    /// the earliest last dose given of an OST medicine plus its dosing
    /// interval ([`dosing_interval_ms`]: read from its frequency, the
    /// shortest when the words cannot be read). None when no OST medicine
    /// records its last dose.
    pub fn next_ost_dose_due_ms(&self) -> Option<i64> {
        self.medications
            .iter()
            .filter(|m| m.opioid_substitution)
            .filter_map(|m| {
                m.last_dose_given
                    .map(|t| t.unix_ms().saturating_add(dosing_interval_ms(&m.frequency)))
            })
            .min()
    }
}

/// The time between doses a medicine's frequency states, read from the
/// words and abbreviations UK prescriptions use; when several readings
/// match, the shortest:
/// - a number of hours ("every 4 hours", `12-hourly`, `8h`, `q6h`): that,
///   at most a day; a range ("every 4 to 6 hours", `q4-6h`): its shortest;
/// - a number of times ("6 times a day", "1 to 5 times"): a day shared
///   between them, whole hours rounded down;
/// - four times, `QDS`, `QID` or `4x`: 6 hours;
/// - three times, `TDS`, `TID` or `3x`: 8;
/// - twice, `BD`, `BID`, `2x`, a split dose, or morning and night
///   together: 12;
/// - once daily, `OD`, daily, `mane`, `nocte`, in the morning or at night
///   alone: 24;
/// - anything else (empty, unread words): 6, the shortest, so that a
///   frequency the gateway cannot read brings the deadline forward and
///   never puts it after the next dose.
#[must_use]
pub fn dosing_interval_ms(frequency: &str) -> i64 {
    const HOUR_MS: i64 = 3_600_000;
    let text = frequency.to_ascii_lowercase();
    // Abbreviations lose their dots (`b.d.` is `bd`); numbers keep theirs
    // (`1.5 hourly` is not 15).
    let words: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .map(|w| w.trim_matches('.'))
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w.bytes().any(|b| b.is_ascii_digit()) {
                w.to_owned()
            } else {
                w.replace('.', "")
            }
        })
        .collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    // Whole hours, rounded down (a shorter interval, never a longer one).
    let number = |w: &str| {
        w.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 1.0)
            .map(|n| n.floor() as i64)
    };
    // "every 4 hours", "12-hourly", "8h", "q6h": that many hours, at most a day.
    let hours = |w: &str| {
        let w = w.strip_prefix('q').unwrap_or(w);
        let digits = w.trim_end_matches(|c: char| !c.is_ascii_digit());
        matches!(&w[digits.len()..], "h" | "hourly")
            .then(|| number(digits))
            .flatten()
    };
    // Every reading that matches counts, and the shortest wins: "twice
    // daily, review in 72 hours" is 12, never a day.
    let mut candidates: Vec<i64> = words.iter().filter_map(|w| hours(w)).collect();
    // The numbers just before an hour, a range's every one: "every 4 to 6
    // hours", "4-6 hourly" and "q4-6h" are 4, never 6.
    let hour_word = |w: &str| matches!(w, "hourly" | "hours" | "hour" | "hrs" | "h");
    for (j, w) in words.iter().enumerate() {
        if !hour_word(w) && hours(w).is_none() {
            continue;
        }
        for before in words[..j].iter().rev() {
            let before = before.strip_prefix('q').unwrap_or(before);
            if matches!(before, "to" | "or") {
                continue;
            }
            match number(before) {
                Some(n) => candidates.push(n),
                None => break,
            }
        }
    }
    // Any count of doses: "6 times a day" is every 4 hours, "5 times" 4.
    candidates.extend(
        words
            .windows(2)
            .filter(|p| p[1] == "times")
            .filter_map(|p| p[0].parse::<i64>().ok())
            .filter(|n| *n >= 1)
            .map(|n| (24 / n).max(1)),
    );
    candidates.retain(|n| *n > 0);
    for n in &mut candidates {
        *n = (*n).min(24);
    }
    // "four times", "4 times", "4x", "x4".
    let times = |word: &str, digit: &str| {
        (has(word) || has(digit)) && has("times")
            || has(&format!("{digit}x"))
            || has(&format!("x{digit}"))
    };
    // Not `om`/`on` (omni mane, omni nocte): "on waking" is no frequency.
    let morning = has("mane") || has("morning");
    let night = has("nocte") || has("night") || has("evening");
    let readings = [
        (times("four", "4") || has("qds") || has("qid"), 6),
        (times("three", "3") || has("tds") || has("tid"), 8),
        (
            has("twice")
                || times("two", "2")
                || has("bd")
                || has("bid")
                || has("split")
                || morning && night,
            12,
        ),
        (
            has("once") || has("od") || has("daily") || has("qd") || morning || night,
            24,
        ),
    ];
    candidates.extend(readings.iter().filter(|(read, _)| *read).map(|(_, h)| *h));
    candidates.into_iter().min().unwrap_or(6) * HOUR_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FHIR R4's `date` and `dateTime` shapes: no signed year, `T` and an
    /// upper-case `Z`; what RFC 3339 parsers also take is refused.
    #[test]
    fn dates_and_times_take_fhirs_shape_only() {
        for bad in [
            "+1980-05-14",
            "-2020-01-01",
            "1980-5-14",
            "19800514",
            "1980-05-14 ",
            "0000-01-01",
        ] {
            assert!(bad.parse::<Date>().is_err(), "{bad}");
            assert!(bad.parse::<When>().is_err(), "{bad}");
        }
        for bad in ["0000", "0000-01"] {
            assert!(bad.parse::<When>().is_err(), "{bad}");
        }
        // Stored before year 0000 was refused, it still reads back as it was.
        let stored: Date = serde_json::from_str("\"0000-01-01\"").unwrap();
        assert_eq!(stored.to_string(), "0000-01-01");
        let stored: When = serde_json::from_str("\"0000-05\"").unwrap();
        assert_eq!(stored.to_string(), "0000-05");
        let stored: DateTime = serde_json::from_str("\"0000-07-24T08:10:00Z\"").unwrap();
        assert_eq!(stored.0.year(), 0);
        assert!(serde_json::from_str::<Date>("\"0000-13-01\"").is_err());
        assert!("1980-05-14".parse::<Date>().is_ok());
        for bad in [
            "2026-07-24 08:10:00Z",
            "2026-07-24t08:10:00Z",
            "2026-07-24T08:10:00z",
            "+2026-07-24T08:10:00Z",
            "2026-07-24",
            "0000-07-24T08:10:00Z",
        ] {
            assert!(bad.parse::<DateTime>().is_err(), "{bad}");
        }
        assert!("2026-07-24T08:10:00Z".parse::<DateTime>().is_ok());
        assert!("2026-07-24T08:10:00.123+01:00".parse::<DateTime>().is_ok());
    }

    #[test]
    fn a_split_or_more_frequent_dose_is_due_sooner_than_a_day() {
        let h = |f: &str| dosing_interval_ms(f) / 3_600_000;
        for once in [
            "once daily",
            "OD",
            "daily",
            "in the morning",
            "mane",
            "nocte",
            "at night",
            "every 24 hours",
        ] {
            assert_eq!(h(once), 24, "{once}");
        }
        for twice in [
            "twice daily (split dose)",
            "BD",
            "b.d.",
            "Split dose",
            "every 12 hours",
            "12-hourly",
            "12 hrs",
        ] {
            assert_eq!(h(twice), 12, "{twice}");
        }
        for twice in [
            "q12h",
            "2 times a day",
            "2x daily",
            "mane and nocte",
            "morning and evening",
        ] {
            assert_eq!(h(twice), 12, "{twice}");
        }
        for three in ["three times a day", "TDS", "3 times daily", "q8h"] {
            assert_eq!(h(three), 8, "{three}");
        }
        assert_eq!(h("QDS"), 6);
        assert_eq!(h("every 6 hours"), 6);
        // Structured FHIR timing in words: the hours win over "once".
        assert_eq!(h("once every 4 hours"), 4);
        assert_eq!(h("once every 48 hours"), 24);
        // Every reading counts and the shortest wins: hours said for
        // something else never lengthen a stated frequency.
        assert_eq!(h("twice daily, review in 72 hours"), 12);
        assert_eq!(h("review in 72 hours, QDS"), 6);
        // A decimal is rounded down, never read without its point.
        assert_eq!(h("1.5 hourly"), 1);
        assert_eq!(h("b.d."), 12);
        assert_eq!(h("on waking"), 6);
        assert_eq!(h("4 times a day"), 6);
        // What cannot be read is taken as the shortest interval: the copy
        // is then due early, never after the next dose.
        for unread in [
            "",
            "as directed",
            "supervised consumption",
            "alternate days",
        ] {
            assert_eq!(h(unread), 6, "{unread}");
        }
    }

    /// A range of hours is due at its shortest, and any number of doses a
    /// day shares the day between them: FHIR's `periodMax` and
    /// `frequencyMax` in words, and the total of concurrent doses, never
    /// read as the longer interval.
    #[test]
    fn a_range_or_any_count_a_day_is_due_at_its_shortest() {
        let h = |f: &str| dosing_interval_ms(f) / 3_600_000;
        for (words, hours) in [
            ("once every 4 to 6 hours", 4),
            ("every 4-6 hours", 4),
            ("4-6 hourly", 4),
            ("q4-6h", 4),
            ("every 6 or 8 hours", 6),
            ("1 to 4 times a day", 6),
            ("5 times a day", 4),
            ("6 times a day", 4),
            ("12 times a day", 2),
            ("twice a day in all", 12),
            ("up to 3 times a day in all", 8),
            ("once a day in the morning", 24),
            ("up to 6 hours apart", 6),
            ("twice daily, review in 72 hours", 12),
        ] {
            assert_eq!(h(words), hours, "{words}");
        }
    }

    /// HL7 v2.5.1 §2A.3.22: a time without an offset is the sender's local
    /// time. An 08:10 dose in summer is 07:10 UTC, not 08:10.
    #[test]
    fn an_hl7_time_without_an_offset_is_uk_local_time() {
        let read = |v: &str| When::from_hl7(v).map(|w| w.to_string());
        assert_eq!(
            read("202607240810").as_deref(),
            Some("2026-07-24T08:10:00+01:00")
        );
        assert_eq!(
            read("202601150810").as_deref(),
            Some("2026-01-15T08:10:00Z")
        );
        assert_eq!(
            read("2026072408").as_deref(),
            Some("2026-07-24T08:00:00+01:00")
        );
        // The autumn change repeats 01:00-02:00: the first (BST) is taken.
        assert_eq!(
            read("20261025013000").as_deref(),
            Some("2026-10-25T01:30:00+01:00")
        );
        // The spring change skips 01:00-02:00: 01:30 reads as after it
        // (02:30 BST, 01:30 UTC), not as half an hour before the change.
        assert_eq!(
            read("20260329013000").as_deref(),
            Some("2026-03-29T01:30:00Z")
        );
        // An offset given is kept; a date stays a date.
        assert_eq!(
            read("202607240810+0000").as_deref(),
            Some("2026-07-24T08:10:00Z")
        );
        assert_eq!(read("20260724").as_deref(), Some("2026-07-24"));
        assert_eq!(read("202613240810"), None);
        // A date with an offset is a date (HL7 v2.5.1 §2A.3.22 allows it).
        assert_eq!(read("19880314+0000").as_deref(), Some("1988-03-14"));
        // An offset is sign and four ASCII digits; a decoded escape or any
        // other character there is refused, never cut inside a character.
        for bad in [
            "202611240810+1é1",
            "202611240810+1\u{e9}",
            "202611240810+01:0",
            "202611240810+01000",
            "19880314+1é1",
            "202611240810+2400",
        ] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }
}
