//! HL7 v2.5.1 ADT: `A01` admission, `A02` transfer, `A03` release (and `A08`,
//! with the `ADT_A01` structure, for a GP's community summary), in and out,
//! plus the `ACK` for a submission.
//!
//! Demographics and the episode use PID, PD1, PV1 and EVN; allergies and
//! diagnoses use AL1 and DG1 where the message structure has them (A01, A03,
//! A08). Everything ADT has no segment for is carried in OBX groups: OBX-3
//! names the item and field (`MED-DOSE^Dose^THROUGHCARE`), OBX-4 numbers the
//! item, so one medicine is the OBX segments that share a sub-ID. The full
//! table is in `docs/clinical-formats.md`.
//!
//! Parsing splits segments, then fields, then components, and unescapes
//! last, so an escaped delimiter can never split anything. Only the standard
//! delimiters `|^~\&` are accepted, and segment, field and repetition counts
//! are capped.

use std::borrow::Cow;

mod unread;

use super::identifiers::OdsCode;
use super::model::{
    Address, Allergy, Author, ClinicalSummary, Code, Consent, ConsentDecision, Custody, DMD, Date,
    DateTime, Diagnosis, FollowUp, FollowUpKind, Infection, Medication, MentalHealth,
    PRESCRIPTION_INTENTS, PRESCRIPTION_STATUSES, Patient, Prescription, Quantity, RiskFlag,
    RiskKind, SNOMED, Severity, Sex, SubstanceMisuse, Vaccination, When,
};
use super::violation::{ValidationErrors, Violation};
use super::{Limits, Rendered};
use crate::journey::JourneyEvent;

const LOCAL: &str = "THROUGHCARE";

/// Escapes text for a field: delimiters, the escape character, and line breaks.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_escaped(&mut out, text);
    out
}

fn needs_escape(b: u8) -> bool {
    matches!(b, b'|' | b'^' | b'&' | b'~' | b'\\' | b'\r' | b'\n')
}

/// Appends `text` to `out`, escaped as [`escape`] does.
fn push_escaped(out: &mut String, text: &str) {
    if !text.bytes().any(needs_escape) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\\' => out.push_str("\\E\\"),
            '\r' => out.push_str("\\X0D\\"),
            '\n' => out.push_str("\\X0A\\"),
            c => out.push(c),
        }
    }
}

/// Reverses [`escape`]; an unknown escape is kept as written.
pub fn unescape(text: &str) -> String {
    unescaped(text).into_owned()
}

/// [`unescape`], borrowing `text` when it holds no escape.
fn unescaped(text: &str) -> Cow<'_, str> {
    if !text.as_bytes().contains(&b'\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.find('\\') {
            Some(j) => {
                let seq = &after[..j];
                match seq {
                    "F" => out.push('|'),
                    "S" => out.push('^'),
                    "T" => out.push('&'),
                    "R" => out.push('~'),
                    "E" => out.push('\\'),
                    "X0D" => out.push('\r'),
                    "X0A" => out.push('\n'),
                    other => {
                        out.push('\\');
                        out.push_str(other);
                        out.push('\\');
                    }
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Appends `n` as exactly `width` decimal digits (callers pass values that fit).
fn push_digits(out: &mut String, n: u32, width: u32) {
    for k in (0..width).rev() {
        out.push(char::from(b'0' + (n / 10u32.pow(k) % 10) as u8));
    }
}

fn push_dt(out: &mut String, d: &Date) {
    // Years outside 0..=9999 cannot be written as HL7 DT; `{:04}` would have
    // widened them, which no HL7 parser (ours included) reads back.
    let year = d.0.year();
    if (0..=9999).contains(&year) {
        push_digits(out, year.unsigned_abs(), 4);
    } else {
        out.push_str(&format!("{year:04}"));
    }
    push_digits(out, u32::from(u8::from(d.0.month())), 2);
    push_digits(out, u32::from(d.0.day()), 2);
}

fn push_ts(out: &mut String, t: &DateTime) {
    let o = t.0;
    push_dt(out, &Date(o.date()));
    push_digits(out, u32::from(o.hour()), 2);
    push_digits(out, u32::from(o.minute()), 2);
    push_digits(out, u32::from(o.second()), 2);
    // HL7 DTM carries four fractional digits.
    let tenths_of_ms = o.nanosecond() / 100_000;
    if o.nanosecond() != 0 {
        out.push('.');
        push_digits(out, tenths_of_ms, 4);
    }
    let (h, m, _) = o.offset().as_hms();
    out.push(if h < 0 || m < 0 { '-' } else { '+' });
    push_digits(out, u32::from(h.unsigned_abs()), 2);
    push_digits(out, u32::from(m.unsigned_abs()), 2);
}

fn ts(t: &DateTime) -> String {
    let mut out = String::with_capacity(19);
    push_ts(&mut out, t);
    out
}

fn parse_dt(s: &str) -> Option<Date> {
    if s.len() < 8 || !s.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..8])
        .parse()
        .ok()
}

/// An optional date field: absent is fine, present but unreadable is a
/// violation at `path` (never a silent drop).
fn optional_date(
    text: Option<&str>,
    path: impl FnOnce() -> String,
    e: &mut ValidationErrors,
) -> Option<Date> {
    let text = text.filter(|t| !t.is_empty())?;
    let date = parse_dt(text);
    if date.is_none() {
        e.add(path(), "must be a date written YYYYMMDD");
    }
    date
}

/// An optional date or time at any HL7 precision: absent is fine, present
/// but unreadable is a violation at `path`.
fn optional_when(
    text: Option<&str>,
    path: impl FnOnce() -> String,
    e: &mut ValidationErrors,
) -> Option<When> {
    let text = text.filter(|t| !t.is_empty())?;
    let when = When::from_hl7(text);
    if when.is_none() {
        e.add(
            path(),
            "must be a date written YYYYMMDD (or YYYY, YYYYMM), or a time YYYYMMDDHHMM[SS[.SSSS]][+/-ZZZZ]",
        );
    }
    when
}

/// An HL7 `TS`/`DTM` to at least the minute, fractional seconds kept (a
/// time without an offset is read as UTC).
fn parse_ts(s: &str) -> Option<DateTime> {
    let when = When::from_hl7(s)?.to_string();
    if when.len() <= 10 {
        return None;
    }
    when.parse().ok()
}

fn coding_system(system: &str) -> Option<&'static str> {
    match system {
        SNOMED => Some("SCT"),
        DMD => Some("DMD"),
        _ => None,
    }
}

/// Appends a coded element: `code^display^system`.
fn push_ce(out: &mut String, c: &Code) {
    push_escaped(out, &c.code);
    out.push('^');
    push_escaped(out, &c.display);
    out.push('^');
    out.push_str(coding_system(&c.system).unwrap_or("L"));
}

fn yn(b: bool) -> &'static str {
    if b { "Y" } else { "N" }
}

/// An OBX value, written straight into the message.
enum Value<'a> {
    /// Already valid HL7 text (codes, flags).
    Raw(&'a str),
    /// Free text, escaped on the way out.
    Text(&'a str),
    Code(&'a Code),
    Date(&'a Date),
    Time(&'a DateTime),
    /// A date or time at its own precision.
    When(&'a When),
    Number(u32),
}

/// OBX segments, appended to the message as they are added.
struct Obx<'o> {
    out: &'o mut String,
    count: usize,
}

impl Obx<'_> {
    fn add(
        &mut self,
        value_type: &str,
        item: &str,
        field: &str,
        display: &str,
        sub: usize,
        value: Value<'_>,
    ) {
        use std::fmt::Write;
        self.count += 1;
        let out = &mut *self.out;
        let _ = write!(
            out,
            "OBX|{}|{value_type}|{item}-{field}^{display}^{LOCAL}|{sub}|",
            self.count
        );
        match value {
            Value::Raw(v) => out.push_str(v),
            Value::Text(v) => push_escaped(out, v),
            Value::Code(c) => push_ce(out, c),
            Value::Date(d) => push_dt(out, d),
            Value::Time(t) => push_ts(out, t),
            Value::When(w) => out.push_str(&w.to_hl7().0),
            Value::Number(n) => {
                let _ = write!(out, "{n}");
            }
        }
        out.push_str("||||||F\r");
    }
}

fn trigger(event: JourneyEvent) -> (&'static str, &'static str) {
    match event {
        JourneyEvent::Admission => ("A01", "ADT_A01"),
        JourneyEvent::Transfer => ("A02", "ADT_A02"),
        JourneyEvent::Release => ("A03", "ADT_A03"),
        JourneyEvent::CommunitySummary => ("A08", "ADT_A01"),
    }
}

fn severity_code(s: Severity) -> &'static str {
    match s {
        Severity::Mild => "MI",
        Severity::Moderate => "MO",
        Severity::Severe => "SV",
    }
}

/// Renders `s` as an HL7 v2.5.1 ADT message for `event`, segments separated
/// by carriage returns (wrap in MLLP framing to send).
///
/// Every segment is written straight into one buffer; free text is escaped
/// on the way in.
#[allow(clippy::too_many_lines)]
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    use std::fmt::Write;
    let mut not_carried = Vec::new();
    let (code, structure) = trigger(event);
    let has_al1_dg1 = structure != "ADT_A02";
    let items = s.medications.len() * 8
        + s.allergies.len()
        + s.diagnoses.len()
        + s.risks.len() * 3
        + s.infections.len() * 3
        + s.vaccinations.len() * 2
        + s.follow_ups.len() * 3;
    let mut out = String::with_capacity(1024 + 96 * items);

    let mut control = uuid::Uuid::encode_buffer();
    let control = &uuid::Uuid::new_v4().simple().encode_lower(&mut control)[..20];
    out.push_str("MSH|^~\\&|THROUGHCARE|");
    push_escaped(&mut out, s.author.organisation.as_str());
    out.push_str("|||");
    push_ts(&mut out, &s.authored_at);
    let _ = write!(out, "||ADT^{code}^{structure}|{control}|P|2.5.1\r");
    let _ = write!(out, "EVN|{code}|");
    push_ts(&mut out, &s.authored_at);
    out.push_str("||||");
    match &s.custody.transfer_at {
        Some(t) if event == JourneyEvent::Transfer => push_ts(&mut out, t),
        Some(_) => not_carried.push("custody.transfer_at: carried only by an A02 transfer".into()),
        None => {}
    }
    out.push('\r');

    let p = &s.patient;
    out.push_str("PID|1||");
    let ids = [
        (p.nhs_number.as_ref().map(|n| n.as_str()), "^^^NHS^NH"),
        (p.prison_number.as_ref().map(|n| n.as_str()), "^^^HMPPS^PI"),
        (p.crn.as_ref().map(|n| n.as_str()), "^^^NDELIUS^PI"),
    ];
    for (k, (id, suffix)) in ids
        .iter()
        .filter_map(|(id, suffix)| id.map(|id| (id, suffix)))
        .enumerate()
    {
        if k > 0 {
            out.push('~');
        }
        out.push_str(id);
        out.push_str(suffix);
    }
    out.push_str("||");
    push_escaped(&mut out, &p.family_name);
    if let Some(first) = p.given_names.first() {
        out.push('^');
        push_escaped(&mut out, first);
    }
    if p.given_names.len() > 1 {
        out.push('^');
        push_escaped(&mut out, &p.given_names[1..].join(" "));
    }
    out.push_str("||");
    push_dt(&mut out, &p.date_of_birth);
    out.push('|');
    out.push_str(match p.sex {
        Sex::Male => "M",
        Sex::Female => "F",
        Sex::Other => "O",
        Sex::Unknown => "U",
    });
    out.push_str("|||");
    let c = &s.custody;
    if let Some(a) = &c.release_address {
        if a.lines.len() > 2 {
            not_carried
                .push("custody.release_address.lines: PID-11 carries two street lines".into());
        }
        push_escaped(&mut out, a.lines.first().map_or("", String::as_str));
        out.push('^');
        push_escaped(&mut out, a.lines.get(1).map_or("", String::as_str));
        out.push('^');
        push_escaped(&mut out, &a.city);
        out.push_str("^^");
        push_escaped(&mut out, &a.postcode);
        out.push_str("^^H");
    }
    out.push('\r');
    if let Some(gp) = &s.registered_gp {
        let _ = write!(out, "PD1|||^^^^^^^^^{}\r", gp.as_str());
    }

    // PV1 up to its last non-empty field: 3 (location), 6 (prior location),
    // 44 (admit date), 45 (discharge date).
    let (location, prior) = match (&c.transfer_to, event) {
        (Some(to), JourneyEvent::Transfer) => (to.as_str(), c.establishment.as_str()),
        _ => (c.establishment.as_str(), ""),
    };
    if c.transfer_to.is_some() && event != JourneyEvent::Transfer {
        not_carried.push("custody.transfer_to: carried only by an A02 transfer".into());
    }
    let release_date = if c.transfer_at.is_some() && c.release_date.is_some() {
        not_carried.push("custody.release_date: a transfer's episode ends at the transfer".into());
        None
    } else {
        c.release_date.as_ref()
    };
    let _ = write!(out, "PV1|1|N|^^^{location}");
    let last = if release_date.is_some() {
        45
    } else if c.reception_date.is_some() {
        44
    } else if !prior.is_empty() {
        6
    } else {
        3
    };
    if last >= 6 {
        out.push_str("|||");
        if !prior.is_empty() {
            let _ = write!(out, "^^^{prior}");
        }
    }
    if last >= 44 {
        out.extend(std::iter::repeat_n('|', 44 - 6));
        if let Some(d) = &c.reception_date {
            push_dt(&mut out, d);
        }
    }
    if let Some(d) = release_date {
        out.push('|');
        push_dt(&mut out, d);
    }
    out.push('\r');

    // Segment order follows each message structure: OBX before AL1/DG1 in
    // ADT_A01, after them in ADT_A03.
    if structure == "ADT_A03" {
        push_al1_dg1(&mut out, s);
        push_obx(&mut out, s, has_al1_dg1);
    } else {
        push_obx(&mut out, s, has_al1_dg1);
        if has_al1_dg1 {
            push_al1_dg1(&mut out, s);
        }
    }

    let codes = s
        .medications
        .iter()
        .map(|m| &m.code)
        .chain(s.allergies.iter().map(|a| &a.substance))
        .chain(s.diagnoses.iter().map(|d| &d.code));
    for code in codes {
        if coding_system(&code.system).is_none() {
            not_carried
                .push("a code system other than SNOMED CT or dm+d (sent as local, L)".into());
            break;
        }
    }
    Rendered {
        bytes: out.into_bytes(),
        not_carried,
    }
}

/// Allergies as AL1 and diagnoses as DG1 segments.
fn push_al1_dg1(out: &mut String, s: &ClinicalSummary) {
    use std::fmt::Write;
    for (i, a) in s.allergies.iter().enumerate() {
        let _ = write!(out, "AL1|{}|DA|", i + 1);
        push_ce(out, &a.substance);
        out.push('|');
        out.push_str(a.severity.map_or("", severity_code));
        out.push('|');
        if let Some(r) = &a.reaction {
            push_escaped(out, r);
        }
        out.push('\r');
    }
    for (i, d) in s.diagnoses.iter().enumerate() {
        let _ = write!(out, "DG1|{}||", i + 1);
        push_ce(out, &d.code);
        out.push_str("||");
        if let Some(o) = &d.onset {
            out.push_str(&o.to_hl7().0);
        }
        // HL7 table 0052: a recorded diagnosis is final; whether it is
        // resolved travels in a DX-ACTIVE OBX (table 0052 has no such code).
        out.push_str("|F\r");
    }
}

/// Everything ADT has no segment for, as OBX groups (allergies and
/// diagnoses too when the structure has no AL1/DG1).
#[allow(clippy::too_many_lines)]
fn push_obx(out: &mut String, s: &ClinicalSummary, has_al1_dg1: bool) {
    let mut obx = Obx { out, count: 0 };
    if !has_al1_dg1 {
        for (i, a) in s.allergies.iter().enumerate() {
            let n = i + 1;
            obx.add("CE", "ALG", "CODE", "Allergy", n, Value::Code(&a.substance));
            if let Some(r) = &a.reaction {
                obx.add("ST", "ALG", "REACTION", "Reaction", n, Value::Text(r));
            }
            if let Some(sv) = a.severity {
                obx.add(
                    "ST",
                    "ALG",
                    "SEV",
                    "Severity",
                    n,
                    Value::Raw(severity_code(sv)),
                );
            }
        }
        for (i, d) in s.diagnoses.iter().enumerate() {
            let n = i + 1;
            obx.add("CE", "DX", "CODE", "Diagnosis", n, Value::Code(&d.code));
            obx.add("ST", "DX", "ACTIVE", "Active", n, Value::Raw(yn(d.active)));
            if let Some(o) = &d.onset {
                obx.add("DTM", "DX", "ONSET", "Onset", n, Value::When(o));
            }
        }
    } else {
        // A resolved diagnosis: its DG1 (set ID n) says final, this says resolved.
        for (i, d) in s.diagnoses.iter().enumerate().filter(|(_, d)| !d.active) {
            obx.add(
                "ST",
                "DX",
                "ACTIVE",
                "Active",
                i + 1,
                Value::Raw(yn(d.active)),
            );
        }
    }
    for (i, m) in s.medications.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "MED", "CODE", "Medication", n, Value::Code(&m.code));
        obx.add("ST", "MED", "DOSE", "Dose", n, Value::Text(&m.dose));
        obx.add("ST", "MED", "ROUTE", "Route", n, Value::Text(&m.route));
        obx.add(
            "ST",
            "MED",
            "FREQ",
            "Frequency",
            n,
            Value::Text(&m.frequency),
        );
        obx.add(
            "ST",
            "MED",
            "SUPERVISED",
            "Supervised",
            n,
            Value::Raw(yn(m.supervised)),
        );
        obx.add(
            "ST",
            "MED",
            "OST",
            "Opioid substitution",
            n,
            Value::Raw(yn(m.opioid_substitution)),
        );
        if let Some(t) = &m.last_dose_given {
            obx.add(
                "TS",
                "MED",
                "LASTDOSE",
                "Last dose given",
                n,
                Value::Time(t),
            );
        }
        if let Some(d) = m.days_supplied {
            obx.add("NM", "MED", "DAYS", "Days supplied", n, Value::Number(d));
        }
    }
    for (i, r) in s.risks.iter().enumerate() {
        let n = i + 1;
        obx.add("ST", "RISK", "KIND", "Risk", n, Value::Raw(r.kind.code()));
        obx.add(
            "ST",
            "RISK",
            "ACTIVE",
            "Active",
            n,
            Value::Raw(yn(r.active)),
        );
        if let Some(note) = &r.note {
            obx.add("ST", "RISK", "NOTE", "Note", n, Value::Text(note));
        }
    }
    if let Some(m) = &s.mental_health {
        obx.add(
            "ST",
            "MH",
            "CPA",
            "Care programme approach",
            1,
            Value::Raw(yn(m.care_programme_approach)),
        );
        if let Some(c) = &m.care_coordinator {
            obx.add("ST", "MH", "COORD", "Care coordinator", 1, Value::Text(c));
        }
    }
    if let Some(t) = &s.substance_misuse {
        obx.add(
            "ST",
            "SM",
            "TREAT",
            "In treatment",
            1,
            Value::Raw(yn(t.in_treatment)),
        );
        if let Some(svc) = &t.community_service {
            obx.add(
                "ST",
                "SM",
                "SERVICE",
                "Community service",
                1,
                Value::Text(svc),
            );
        }
    }
    for (i, inf) in s.infections.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "INF", "CODE", "Infection", n, Value::Code(&inf.code));
        obx.add("ST", "INF", "STATUS", "Status", n, Value::Text(&inf.status));
        if let Some(d) = &inf.treatment_started {
            obx.add(
                "DT",
                "INF",
                "TREATED",
                "Treatment started",
                n,
                Value::Date(d),
            );
        }
    }
    for (i, v) in s.vaccinations.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "VAC", "CODE", "Vaccination", n, Value::Code(&v.code));
        obx.add("DTM", "VAC", "DATE", "Date given", n, Value::When(&v.date));
    }
    for (i, f) in s.follow_ups.iter().enumerate() {
        let n = i + 1;
        let kind = match f.kind {
            FollowUpKind::Appointment => "appointment",
            FollowUpKind::Referral => "referral",
        };
        obx.add("ST", "FU", "KIND", "Follow-up", n, Value::Raw(kind));
        obx.add("ST", "FU", "SERVICE", "Service", n, Value::Text(&f.service));
        if let Some(d) = &f.date {
            obx.add("DTM", "FU", "DATE", "Date", n, Value::When(d));
        }
    }
    push_prescriptions(&mut obx, s);
    if s.custody.no_fixed_abode {
        obx.add("ST", "CUSTODY", "NFA", "No fixed abode", 1, Value::Raw("Y"));
    }
    let decision = match s.consent.probation_sharing {
        ConsentDecision::Given => "given",
        ConsentDecision::Refused => "refused",
        ConsentDecision::NotRecorded => "not_recorded",
    };
    obx.add(
        "ST",
        "CONSENT",
        "PROBATION",
        "Sharing with probation",
        1,
        Value::Raw(decision),
    );
    if let Some(b) = &s.consent.legal_basis {
        obx.add("ST", "CONSENT", "BASIS", "Legal basis", 1, Value::Text(b));
    }
    obx.add(
        "ST",
        "AUTHOR",
        "NAME",
        "Author",
        1,
        Value::Text(&s.author.name),
    );
    obx.add(
        "ST",
        "AUTHOR",
        "ROLE",
        "Role",
        1,
        Value::Text(&s.author.role),
    );
}

/// Prescriptions to take away as `RX` OBX groups.
fn push_prescriptions(obx: &mut Obx<'_>, s: &ClinicalSummary) {
    for (i, p) in s.prescriptions.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "RX", "CODE", "Prescription", n, Value::Code(&p.code));
        obx.add("ST", "RX", "STATUS", "Status", n, Value::Text(&p.status));
        obx.add("ST", "RX", "INTENT", "Intent", n, Value::Text(&p.intent));
        if let Some(t) = &p.authored_on {
            obx.add("DTM", "RX", "AUTHORED", "Written", n, Value::When(t));
        }
        if let Some(d) = &p.dosage {
            obx.add("ST", "RX", "DOSAGE", "Dosage", n, Value::Text(d));
        }
        if let Some(q) = &p.quantity {
            obx.add("NM", "RX", "QTY", "Quantity", n, Value::Raw(&q.value));
            obx.add("ST", "RX", "UNIT", "Unit", n, Value::Text(&q.unit));
        }
        if let Some(d) = p.days_supplied {
            obx.add("NM", "RX", "DAYS", "Days supplied", n, Value::Number(d));
        }
    }
}

/// One prescription from its `RX` OBX group.
fn read_prescription(g: &Group<'_, '_, '_>, e: &mut ValidationErrors) -> Option<Prescription> {
    let Some(code) = g.code() else {
        e.add(g.path("CODE"), "required: the medicine code");
        return None;
    };
    let mut coded = |field: &str, allowed: &[&str], default: &str| {
        let v = g.string(field).unwrap_or_else(|| default.to_owned());
        if !allowed.contains(&v.as_str()) {
            e.add(
                g.path(field),
                format!("must be one of {}", allowed.join(", ")),
            );
        }
        v
    };
    let status = coded("STATUS", &PRESCRIPTION_STATUSES, "active");
    let intent = coded("INTENT", &PRESCRIPTION_INTENTS, "order");
    let authored_on = optional_when(g.text("AUTHORED").as_deref(), || g.path("AUTHORED"), e);
    let quantity = match (g.string("QTY"), g.string("UNIT")) {
        (None, None) => None,
        (Some(value), Some(unit)) if Quantity::is_decimal(&value) && !unit.is_empty() => {
            Some(Quantity { value, unit })
        }
        _ => {
            e.add(
                g.path("QTY"),
                "a decimal quantity and its unit are required",
            );
            None
        }
    };
    let days_supplied = g.text("DAYS").and_then(|v| {
        v.parse()
            .map_err(|_| e.add(g.path("DAYS"), "must be a whole number of days"))
            .ok()
    });
    Some(Prescription {
        code,
        status,
        intent,
        authored_on,
        dosage: g.string("DOSAGE"),
        quantity,
        days_supplied,
    })
}

/// One parsed segment: fields, each a list of repetitions, each a list of
/// components, all still escaped.
struct Segment<'a> {
    id: &'a str,
    /// The segment's position among segments of its type, from 1.
    nth: usize,
    fields: Vec<&'a str>,
}

impl<'a> Segment<'a> {
    fn name(&self, field: usize) -> String {
        if self.nth > 1 {
            format!("{}({})-{field}", self.id, self.nth)
        } else {
            format!("{}-{field}", self.id)
        }
    }

    /// Field `n` (HL7 numbering; MSH-1 is the field separator). The
    /// explicit null `""` reads as absent: nothing we carry is a deletion.
    fn field(&self, n: usize) -> &'a str {
        let i = if self.id == "MSH" { n - 1 } else { n };
        match self.fields.get(i).copied() {
            Some("\"\"") | None => "",
            Some(f) => f,
        }
    }

    fn reps(&self, n: usize) -> impl Iterator<Item = &'a str> {
        self.field(n).split('~').filter(|r| !r.is_empty())
    }

    fn comp(&self, n: usize, c: usize) -> Cow<'a, str> {
        component(self.field(n), c)
    }
}

/// Component `c` (from 1) of `field`, unescaped (borrowed when it holds no
/// escape); the explicit null `""` reads as absent.
fn component(field: &str, c: usize) -> Cow<'_, str> {
    match field.split('^').nth(c - 1) {
        Some("\"\"") | None => Cow::Borrowed(""),
        Some(v) => unescaped(v),
    }
}

const KNOWN: [&str; 25] = [
    "MSH", "SFT", "EVN", "PID", "PD1", "ROL", "NK1", "PV1", "PV2", "DB1", "OBX", "AL1", "DG1",
    "DRG", "PR1", "GT1", "IN1", "IN2", "IN3", "ACC", "UB1", "UB2", "PDA", "NTE", "MRG",
];

/// What a parsed message said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The summary.
    pub summary: ClinicalSummary,
    /// The journey event from MSH-9.
    pub event: JourneyEvent,
    /// MSH-10, for the ACK.
    pub control_id: String,
}

fn count(text: &str, b: u8) -> usize {
    memchr::memchr_iter(b, text.as_bytes()).count()
}

fn split<'a>(text: &'a str, limits: &Limits) -> Result<Vec<Segment<'a>>, ValidationErrors> {
    if !text.starts_with("MSH") {
        return Err(ValidationErrors::one(
            "MSH",
            "the message must start with an MSH segment",
        ));
    }
    if text.get(3..8) != Some("|^~\\&") {
        return Err(ValidationErrors::one(
            "MSH-2",
            "only the standard delimiters |^~\\& are accepted",
        ));
    }
    let mut errors = ValidationErrors::default();
    let mut segments = Vec::with_capacity(count(text, b'\r') + 1);
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (i, raw) in text
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i >= limits.max_hl7_segments {
            return Err(ValidationErrors::one(
                "message",
                format!("more than {} segments", limits.max_hl7_segments),
            ));
        }
        let id = raw.get(..3).unwrap_or("");
        let well_formed = raw.len() == 3 || raw.as_bytes().get(3) == Some(&b'|');
        if !well_formed
            || !(KNOWN.contains(&id)
                || id.starts_with('Z') && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            errors.add(
                format!("segment {}", i + 1),
                "not a segment this gateway knows (a line break inside a field splits it)",
            );
            continue;
        }
        let field_count = count(raw, b'|') + 1;
        if field_count > limits.max_hl7_repetitions + 1 {
            errors.add(
                id.to_string(),
                format!("more than {} fields", limits.max_hl7_repetitions),
            );
            continue;
        }
        let mut fields = Vec::with_capacity(field_count);
        let mut start = 0;
        for bar in memchr::memchr_iter(b'|', raw.as_bytes()) {
            fields.push(&raw[start..bar]);
            start = bar + 1;
        }
        fields.push(&raw[start..]);
        // No field can reach the limit unless the whole segment does.
        if count(raw, b'~') >= limits.max_hl7_repetitions
            && fields
                .iter()
                .any(|f| count(f, b'~') >= limits.max_hl7_repetitions)
        {
            errors.add(
                id.to_string(),
                format!(
                    "more than {} repetitions in a field",
                    limits.max_hl7_repetitions
                ),
            );
            continue;
        }
        let nth = match counts.iter_mut().find(|(seen, _)| *seen == id) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                counts.push((id, 1));
                1
            }
        };
        segments.push(Segment { id, nth, fields });
    }
    errors.into_result().map(|()| segments)
}

fn yes(v: &str) -> bool {
    v == "Y"
}

fn code_from_ce(field: &str) -> Option<Code> {
    let code = component(field, 1);
    if code.is_empty() {
        return None;
    }
    let system = match &*component(field, 3) {
        "SCT" | "SNM" | "SNOMEDCT" => SNOMED.to_owned(),
        "DMD" => DMD.to_owned(),
        other => other.to_owned(),
    };
    Some(Code {
        system,
        code: code.into_owned(),
        display: component(field, 2).into_owned(),
    })
}

/// [`str::split_once`] on a string that may be borrowed.
fn split_once(text: Cow<'_, str>, sep: char) -> Option<(Cow<'_, str>, Cow<'_, str>)> {
    match text {
        Cow::Borrowed(t) => t
            .split_once(sep)
            .map(|(a, b)| (Cow::Borrowed(a), Cow::Borrowed(b))),
        Cow::Owned(t) => t
            .split_once(sep)
            .map(|(a, b)| (Cow::Owned(a.to_owned()), Cow::Owned(b.to_owned()))),
    }
}

/// One OBX segment of a group: which item (`MED`) and sub-ID, which field
/// (`DOSE`), its raw OBX-5, and the segment (for error paths).
struct ObxField<'a, 's> {
    item: Cow<'a, str>,
    sub: u32,
    field: Cow<'a, str>,
    value: &'a str,
    segment: &'s Segment<'a>,
}

/// The OBX segments of one item, in message order.
struct Group<'g, 'a, 's> {
    item: &'g str,
    fields: &'g [ObxField<'a, 's>],
}

impl<'a> Group<'_, 'a, '_> {
    /// The raw value of `field` (the last, if repeated).
    fn raw(&self, field: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .rev()
            .find(|f| f.field == field)
            .map(|f| f.value)
    }

    fn text(&self, field: &str) -> Option<Cow<'a, str>> {
        self.raw(field).map(unescaped)
    }

    fn string(&self, field: &str) -> Option<String> {
        self.text(field).map(Cow::into_owned)
    }

    fn code(&self) -> Option<Code> {
        self.raw("CODE").and_then(code_from_ce)
    }

    /// Where `field` is, for an error: its OBX-5, or the item if absent.
    fn path(&self, field: &str) -> String {
        match self.fields.iter().rev().find(|f| f.field == field) {
            Some(f) => f.segment.name(5),
            None => format!("OBX {}-{field}", self.item),
        }
    }
}

/// Parses an HL7 v2 ADT A01/A02/A03/A08 message.
///
/// # Errors
/// Every field violation, with HL7 paths (`PID-3.1`, `OBX(4)-5`).
#[allow(clippy::too_many_lines)]
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Parsed, ValidationErrors> {
    if bytes.len() > limits.max_document_bytes {
        return Err(ValidationErrors::one(
            "message",
            format!(
                "{} bytes is over the {}-byte limit",
                bytes.len(),
                limits.max_document_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ValidationErrors::one(
            "message",
            format!("not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    let segments = split(text.trim_start_matches('\u{feff}'), limits)?;
    let mut e = ValidationErrors::default();
    let find = |id: &str| segments.iter().find(|s| s.id == id);
    let msh = find("MSH").expect("split checked MSH");
    let event = match (&*msh.comp(9, 1), &*msh.comp(9, 2)) {
        ("ADT", "A01") => Some(JourneyEvent::Admission),
        ("ADT", "A02") => Some(JourneyEvent::Transfer),
        ("ADT", "A03") => Some(JourneyEvent::Release),
        ("ADT", "A08") => Some(JourneyEvent::CommunitySummary),
        _ => {
            e.add("MSH-9", "must be ADT^A01, ADT^A02, ADT^A03 or ADT^A08");
            None
        }
    };
    // HL7 table 0103: a training (T) or debugging (D) message must never
    // reach a clinician as a real patient's record.
    if !matches!(&*msh.comp(11, 1), "P" | "") {
        e.add(
            "MSH-11",
            "only production messages (P, HL7 table 0103) are carried",
        );
    }
    let version = msh.comp(12, 1);
    if !version.starts_with("2.") {
        e.add("MSH-12", "must be an HL7 v2 version (2.5.1 expected)");
    }
    let control_id = msh.comp(10, 1).into_owned();
    let evn = find("EVN");
    let authored_at = parse_ts(&evn.map(|s| s.comp(2, 1)).unwrap_or_default())
        .or_else(|| parse_ts(&msh.comp(7, 1)));
    if authored_at.is_none() {
        e.add(
            "EVN-2",
            "required: when the summary was recorded (YYYYMMDDHHMMSS+ZZZZ)",
        );
    }
    // EVN-6 is the transfer time only on an A02; elsewhere it is listed.
    let transfer_at = evn
        .filter(|_| event == Some(JourneyEvent::Transfer))
        .and_then(|s| {
            let v = s.comp(6, 1);
            if v.is_empty() {
                return None;
            }
            let t = parse_ts(&v);
            if t.is_none() {
                e.add("EVN-6", "must be a time YYYYMMDDHHMMSS+ZZZZ");
            }
            t
        });

    let Some(pid) = find("PID") else {
        e.add("PID", "required");
        return Err(e);
    };
    let (mut nhs, mut prison, mut crn) = (None, None, None);
    let mut notes = Vec::new();
    for (r, rep) in pid.reps(3).enumerate() {
        let value = component(rep, 1);
        let field = || format!("PID-3[{}].1", r + 1);
        match (&*component(rep, 4), &*component(rep, 5)) {
            (_, "NH") => match value.parse::<super::NhsNumber>() {
                Ok(n) => nhs = Some(n),
                Err(err) => e.add(field(), err.to_string()),
            },
            ("HMPPS", _) => match value.parse::<super::PrisonNumber>() {
                Ok(n) => prison = Some(n),
                Err(err) => e.add(field(), err.to_string()),
            },
            ("NDELIUS", _) => match value.parse::<super::Crn>() {
                Ok(n) => crn = Some(n),
                Err(err) => e.add(field(), err.to_string()),
            },
            _ => notes.push(format!(
                "PID-3[{}]: an identifier the gateway does not read",
                r + 1
            )),
        }
    }
    let family_name = pid.comp(5, 1).into_owned();
    if family_name.is_empty() {
        e.add("PID-5.1", "required: the patient's family name");
    }
    let given_names: Vec<String> = [pid.comp(5, 2), pid.comp(5, 3)]
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(Cow::into_owned)
        .collect();
    let dob = parse_dt(&pid.comp(7, 1));
    if dob.is_none() {
        e.add("PID-7", "required: date of birth YYYYMMDD");
    }
    // HL7 table 0001 (administrative sex).
    let sex = match &*pid.comp(8, 1) {
        "M" => Sex::Male,
        "F" => Sex::Female,
        "O" | "A" => Sex::Other,
        "U" | "N" | "" => Sex::Unknown,
        _ => {
            e.add("PID-8", "must be M, F, O, A, U or N (HL7 table 0001)");
            Sex::Unknown
        }
    };
    let release_address = (!pid.field(11).is_empty()).then(|| Address {
        lines: [pid.comp(11, 1), pid.comp(11, 2)]
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(Cow::into_owned)
            .collect(),
        city: pid.comp(11, 3).into_owned(),
        postcode: pid.comp(11, 5).into_owned(),
    });
    let ods = |v: Cow<'_, str>, field: &str, e: &mut ValidationErrors| -> Option<OdsCode> {
        if v.is_empty() {
            return None;
        }
        v.parse()
            .map_err(|err: super::IdentifierError| e.add(field, err.to_string()))
            .ok()
    };
    let registered_gp = find("PD1").and_then(|s| ods(s.comp(3, 10), "PD1-3.10", &mut e));
    let pv1 = find("PV1");
    let location = pv1.and_then(|s| ods(s.comp(3, 4), "PV1-3.4", &mut e));
    // PV1-6 is the sending location only on a transfer (A02); elsewhere it
    // is listed as not read, never taken for an establishment.
    let prior = pv1
        .filter(|_| event == Some(JourneyEvent::Transfer))
        .and_then(|s| ods(s.comp(6, 4), "PV1-6.4", &mut e));
    let (establishment, transfer_to) = match (event, prior) {
        (Some(JourneyEvent::Transfer), Some(prior)) => (Some(prior), location),
        _ => (location, None),
    };
    if establishment.is_none() {
        e.add("PV1-3.4", "required: the establishment's ODS code");
    }
    let date_at = |field: usize, name: &str, e: &mut ValidationErrors| {
        let v = pv1.map(|s| s.comp(field, 1)).unwrap_or_default();
        if v.is_empty() {
            return None;
        }
        let d = parse_dt(&v);
        if d.is_none() {
            e.add(name, "must be a date YYYYMMDD");
        }
        d
    };
    let reception_date = date_at(44, "PV1-44", &mut e);
    let release_date = date_at(45, "PV1-45", &mut e);

    let mut allergies = Vec::new();
    let mut diagnoses = Vec::new();
    for s in segments.iter().filter(|s| s.id == "AL1") {
        allergies.extend(read_al1(s, &mut notes, &mut e));
    }
    for s in segments.iter().filter(|s| s.id == "DG1") {
        diagnoses.extend(read_dg1(s, &mut e));
    }
    let from_dg1 = diagnoses.len();

    // OBX groups: the segments that share (item, sub-ID), in item order,
    // then sub-ID, then message order (a repeated field: the last wins).
    let mut obx: Vec<ObxField<'_, '_>> = Vec::new();
    for s in segments.iter().filter(|s| s.id == "OBX") {
        let id = s.comp(3, 1);
        if s.comp(3, 3) != LOCAL {
            continue;
        }
        // HL7 table 0085: a result withdrawn (W), deleted (D) or that could
        // not be obtained (X) is not a fact to carry.
        if let status @ ("W" | "D" | "X") = &*s.comp(11, 1) {
            notes.push(format!(
                "{}: not carried: OBX-11 result status {status} (HL7 table 0085)",
                s.name(5)
            ));
            continue;
        }
        let Some((item, field)) = split_once(id, '-') else {
            e.add(format!("{}.1", s.name(3)), "must be ITEM-FIELD");
            continue;
        };
        let sub: u32 = match s.comp(4, 1).parse() {
            Ok(n) if n >= 1 => n,
            _ => {
                e.add(s.name(4), "must number the item from 1");
                continue;
            }
        };
        obx.push(ObxField {
            item,
            sub,
            field,
            value: s.field(5),
            segment: s,
        });
    }
    obx.sort_by(|a, b| (&a.item, a.sub).cmp(&(&b.item, b.sub)));
    // A field given twice in one item: the last is read, the others listed.
    for (k, f) in obx.iter().enumerate() {
        if obx[k + 1..]
            .iter()
            .take_while(|g| g.item == f.item && g.sub == f.sub)
            .any(|g| g.field == f.field)
        {
            notes.push(format!(
                "{}: not read: the item gives this field again later",
                f.segment.name(5)
            ));
        }
    }

    let mut medications = Vec::new();
    let mut prescriptions = Vec::new();
    let mut risks = Vec::new();
    let mut infections = Vec::new();
    let mut vaccinations = Vec::new();
    let mut follow_ups = Vec::new();
    let mut mental_health = None;
    let mut substance_misuse = None;
    let mut no_fixed_abode = false;
    let mut consent = Consent {
        probation_sharing: ConsentDecision::NotRecorded,
        legal_basis: None,
    };
    let (mut author_name, mut author_role) = (String::new(), String::new());
    for fields in obx.chunk_by(|a, b| a.item == b.item && a.sub == b.sub) {
        let g = Group {
            item: &fields[0].item,
            fields,
        };
        let flag = |f: &str| g.text(f).is_some_and(|v| yes(&v));
        match g.item {
            "MED" => {
                let Some(code) = g.code() else {
                    e.add(g.path("CODE"), "required: the medicine code");
                    continue;
                };
                let last_dose_given = match g.text("LASTDOSE") {
                    Some(v) => {
                        let t = parse_ts(&v);
                        if t.is_none() {
                            e.add(g.path("LASTDOSE"), "must be a time YYYYMMDDHHMMSS+ZZZZ");
                        }
                        t
                    }
                    None => None,
                };
                let days_supplied = match g.text("DAYS") {
                    Some(v) => match v.parse() {
                        Ok(d) => Some(d),
                        Err(_) => {
                            e.add(g.path("DAYS"), "must be a whole number of days");
                            None
                        }
                    },
                    None => None,
                };
                medications.push(Medication {
                    code,
                    dose: g.string("DOSE").unwrap_or_default(),
                    route: g.string("ROUTE").unwrap_or_default(),
                    frequency: g.string("FREQ").unwrap_or_default(),
                    supervised: flag("SUPERVISED"),
                    opioid_substitution: flag("OST"),
                    last_dose_given,
                    days_supplied,
                });
            }
            "RX" => prescriptions.extend(read_prescription(&g, &mut e)),
            "ALG" => match g.code() {
                Some(substance) => allergies.push(Allergy {
                    substance,
                    reaction: g.string("REACTION"),
                    severity: g.text("SEV").and_then(|v| severity(&v)),
                }),
                None => e.add(g.path("CODE"), "required: the allergen code"),
            },
            "DX" => match g.code() {
                Some(code) => diagnoses.push(Diagnosis {
                    code,
                    active: g.text("ACTIVE").is_none_or(|v| yes(&v)),
                    onset: optional_when(g.text("ONSET").as_deref(), || g.path("ONSET"), &mut e),
                }),
                // Without a code, the status of the DG1 with this set ID.
                None => match diagnoses[..from_dg1].get_mut(fields[0].sub as usize - 1) {
                    Some(d) => d.active = g.text("ACTIVE").is_none_or(|v| yes(&v)),
                    None => e.add(g.path("CODE"), "required: the diagnosis code"),
                },
            },
            "RISK" => match g.text("KIND").as_deref().and_then(RiskKind::from_code) {
                Some(kind) => risks.push(RiskFlag {
                    kind,
                    active: g.text("ACTIVE").is_none_or(|v| yes(&v)),
                    note: g.string("NOTE"),
                }),
                None => e.add(
                    g.path("KIND"),
                    "must be suicide, self-harm, violence or vulnerability",
                ),
            },
            "MH" => {
                mental_health = Some(MentalHealth {
                    care_programme_approach: flag("CPA"),
                    care_coordinator: g.string("COORD"),
                });
            }
            "SM" => {
                substance_misuse = Some(SubstanceMisuse {
                    in_treatment: flag("TREAT"),
                    community_service: g.string("SERVICE"),
                });
            }
            "INF" => match g.code() {
                Some(code) => infections.push(Infection {
                    code,
                    status: g.string("STATUS").unwrap_or_default(),
                    treatment_started: optional_date(
                        g.text("TREATED").as_deref(),
                        || g.path("TREATED"),
                        &mut e,
                    ),
                }),
                None => e.add(g.path("CODE"), "required: the infection code"),
            },
            "VAC" => match (g.code(), g.text("DATE").and_then(|v| When::from_hl7(&v))) {
                (Some(code), Some(date)) => vaccinations.push(Vaccination { code, date }),
                _ => e.add(g.path("CODE"), "a vaccination needs a code and a date"),
            },
            "FU" => follow_ups.push(FollowUp {
                kind: if g.text("KIND").as_deref() == Some("appointment") {
                    FollowUpKind::Appointment
                } else {
                    FollowUpKind::Referral
                },
                service: g.string("SERVICE").unwrap_or_default(),
                date: optional_when(g.text("DATE").as_deref(), || g.path("DATE"), &mut e),
            }),
            "CUSTODY" => no_fixed_abode = flag("NFA"),
            "CONSENT" => {
                consent.probation_sharing = match g.text("PROBATION").as_deref() {
                    Some("given") => ConsentDecision::Given,
                    Some("refused") => ConsentDecision::Refused,
                    _ => ConsentDecision::NotRecorded,
                };
                consent.legal_basis = g.string("BASIS");
            }
            "AUTHOR" => {
                author_name = g.string("NAME").unwrap_or_default();
                author_role = g.string("ROLE").unwrap_or_default();
            }
            _ => {}
        }
    }
    notes.extend(unread::unread(&segments, event));
    let not_read = notes;
    let author_org = ods(msh.comp(4, 1), "MSH-4", &mut e);
    if author_org.is_none() {
        e.add("MSH-4", "required: the sending organisation's ODS code");
    }
    let (
        Some(event),
        Some(authored_at),
        Some(date_of_birth),
        Some(establishment),
        Some(author_org),
    ) = (event, authored_at, dob, establishment, author_org)
    else {
        return Err(e);
    };
    e.into_result()?;
    Ok(Parsed {
        summary: ClinicalSummary {
            patient: Patient {
                nhs_number: nhs,
                prison_number: prison,
                crn,
                family_name,
                given_names,
                date_of_birth,
                sex,
            },
            custody: Custody {
                establishment,
                reception_date,
                transfer_at,
                transfer_to,
                release_date,
                release_address,
                no_fixed_abode,
            },
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
            author: Author {
                name: author_name,
                role: author_role,
                organisation: author_org,
            },
            authored_at,
            not_read,
        },
        event,
        control_id,
    })
}

fn severity(v: &str) -> Option<Severity> {
    match v {
        "MI" => Some(Severity::Mild),
        "MO" => Some(Severity::Moderate),
        "SV" => Some(Severity::Severe),
        _ => None,
    }
}

/// An AL1 segment. AL1-2 follows HL7 table 0127 (allergen type) and AL1-4
/// table 0128 (severity: `U` unknown reads as no severity).
fn read_al1(s: &Segment<'_>, notes: &mut Vec<String>, e: &mut ValidationErrors) -> Option<Allergy> {
    match &*s.comp(2, 1) {
        "" | "DA" => {}
        "FA" | "MA" | "MC" | "EA" | "AA" | "PA" | "LA" => notes.push(format!(
            "{}: the allergen type is not carried (the substance code names the substance)",
            s.name(2)
        )),
        _ => e.add(s.name(2), "must be an allergen type from HL7 table 0127"),
    }
    let severity_code = s.comp(4, 1);
    let severity = severity(&severity_code);
    if severity.is_none() && !matches!(&*severity_code, "" | "U") {
        e.add(s.name(4), "must be SV, MO, MI or U (HL7 table 0128)");
    }
    let Some(substance) = code_from_ce(s.field(3)) else {
        e.add(format!("{}.1", s.name(3)), "required: the allergen code");
        return None;
    };
    Some(Allergy {
        substance,
        reaction: Some(s.comp(5, 1))
            .filter(|r| !r.is_empty())
            .map(Cow::into_owned),
        severity,
    })
}

/// A DG1 segment. DG1-6 follows HL7 table 0052: `A` admitting, `W` working,
/// `F` final. None of them says a diagnosis is resolved, so every DG1 is an
/// active diagnosis; a resolved one is marked by a `DX-ACTIVE` OBX whose
/// sub-ID is the DG1's set ID.
fn read_dg1(s: &Segment<'_>, e: &mut ValidationErrors) -> Option<Diagnosis> {
    if !matches!(&*s.comp(6, 1), "" | "A" | "W" | "F") {
        e.add(s.name(6), "must be A, W or F (HL7 table 0052)");
    }
    let onset = optional_when(Some(&s.comp(5, 1)), || format!("{}.1", s.name(5)), e);
    let Some(code) = code_from_ce(s.field(3)) else {
        e.add(format!("{}.1", s.name(3)), "required: the diagnosis code");
        return None;
    };
    Some(Diagnosis {
        code,
        active: true,
        onset,
    })
}

/// The acknowledgement code of an [`ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Application accept.
    Accept,
    /// Application error: the message was understood but refused.
    Error,
    /// Application reject: the message could not be processed.
    Reject,
}

/// Builds the HL7 ACK (MSH, MSA, one ERR per violation) answering a message
/// whose MSH-10 was `control_id`, ready for an MLLP listener.
pub fn ack(control_id: &str, code: AckCode, violations: &[Violation], at: &DateTime) -> String {
    let msa = match code {
        AckCode::Accept => "AA",
        AckCode::Error => "AE",
        AckCode::Reject => "AR",
    };
    let reply_id = uuid::Uuid::new_v4().simple().to_string()[..20].to_owned();
    let mut segs = vec![
        format!(
            "MSH|^~\\&|THROUGHCARE|THROUGHCARE|||{}||ACK^A01^ACK|{reply_id}|P|2.5.1",
            ts(at)
        ),
        format!("MSA|{msa}|{}", escape(control_id)),
    ];
    for v in violations {
        let location = error_location(&v.field);
        segs.push(format!(
            "ERR||{location}|{}^{}^HL70357|E||||{}",
            if location.is_empty() { "207" } else { "102" },
            if location.is_empty() {
                "Application internal error"
            } else {
                "Data type error"
            },
            escape(&format!("{}: {}", v.field, v.description))
        ));
    }
    let mut text = segs.join("\r");
    text.push('\r');
    text
}

/// `PID-3[1].1` or `OBX(4)-5` as an ERL: segment^sequence^field^repetition^component.
fn error_location(field: &str) -> String {
    let Some((seg, rest)) = field.split_once('-') else {
        return String::new();
    };
    let (id, seq) = match seg.split_once('(') {
        Some((id, n)) => (id, n.trim_end_matches(')')),
        None => (seg, "1"),
    };
    if id.len() != 3 {
        return String::new();
    }
    let (field_no, comp) = rest.split_once('.').unwrap_or((rest, ""));
    let (field_no, rep) = match field_no.split_once('[') {
        Some((f, r)) => (f, r.trim_end_matches(']')),
        None => (field_no, "1"),
    };
    format!("{id}^{seq}^{field_no}^{rep}^{comp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_covers_every_delimiter() {
        let text = "a|b^c&d~e\\f\rg\nh";
        let escaped = escape(text);
        assert!(!escaped.contains(['|', '^', '&', '~', '\r', '\n']));
        assert_eq!(unescape(&escaped), text);
        assert_eq!(unescape("x\\Q\\y"), "x\\Q\\y");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn timestamps() {
        let t: DateTime = "2026-11-24T08:10:00+01:00".parse().unwrap();
        assert_eq!(ts(&t), "20261124081000+0100");
        assert_eq!(parse_ts("20261124081000+0100"), Some(t));
        assert_eq!(
            parse_ts("202611240810"),
            "2026-11-24T08:10:00Z".parse().ok()
        );
        // TS allows every precision down to the hour, and four fraction digits.
        assert_eq!(parse_ts("2026112408"), "2026-11-24T08:00:00Z".parse().ok());
        assert_eq!(
            parse_ts("20261124081000.1234-0500"),
            "2026-11-24T08:10:00.1234-05:00".parse().ok()
        );
        assert_eq!(parse_ts("20261124"), None);
        assert_eq!(parse_ts("20261124081000.12345"), None);
        assert_eq!(error_location("PID-3[1].1"), "PID^1^3^1^1");
        assert_eq!(error_location("OBX(4)-5"), "OBX^4^5^1^");
    }

    #[test]
    fn an_unreadable_date_is_a_violation_not_a_silent_drop() {
        use crate::clinical::model::{Code, Diagnosis, SNOMED};
        let mut s = crate::clinical::synthetic::release_summary(
            "9990000018".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            None,
            "x",
        );
        s.diagnoses.push(Diagnosis {
            code: Code {
                system: SNOMED.into(),
                code: "235856003".into(),
                display: "Hepatitis C (invented case)".into(),
            },
            active: true,
            onset: "2014-06-01".parse().ok(),
        });
        let text = String::from_utf8(render(&s, JourneyEvent::Release).bytes).unwrap();
        assert!(parse(text.as_bytes(), &Limits::default()).is_ok());
        let broken = text.replace("20140601", "2014XX01");
        let err = parse(broken.as_bytes(), &Limits::default()).unwrap_err();
        let dates: Vec<&str> = err
            .0
            .iter()
            .filter(|v| v.description.starts_with("must be a date written YYYYMMDD"))
            .map(|v| v.field.as_str())
            .collect();
        assert!(!dates.is_empty(), "{err:?}");
        assert!(
            dates
                .iter()
                .all(|f| f.starts_with("DG1") || f.starts_with("OBX")),
            "{dates:?}"
        );
    }

    #[test]
    fn non_standard_delimiters_are_refused() {
        let err = parse(b"MSH#^~\\&#X", &Limits::default()).unwrap_err();
        assert_eq!(err.0[0].field, "MSH-2");
    }
}
