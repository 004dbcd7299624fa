//! Writing an HL7 v2.5.1 ADT message from the summary: MSH, EVN, PID, PD1,
//! PV1, AL1/DG1 where the structure has them, and OBX groups for the rest.

use super::LOCAL;
use super::escape::{push_escaped, push_formatted};
use crate::clinical::JourneyEvent;
use crate::clinical::Rendered;
use crate::clinical::model::{
    ClinicalSummary, Code, ConsentDecision, Custody, DMD, Date, DateTime, FollowUpKind, SNOMED,
    Severity, Sex, When,
};

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

pub(super) fn ts(t: &DateTime) -> String {
    let mut out = String::with_capacity(19);
    push_ts(&mut out, t);
    out
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
    // Words only: CE.2 alone (HL7 allows the text without an identifier).
    if c.is_words_only() {
        out.push('^');
        push_escaped(out, &c.display);
        return;
    }
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

/// The longest text written as ST (HL7 v2.5.1 §2.A.74: "less than 200").
pub(super) const ST_MAX_CHARS: usize = 199;

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
        // ST holds a short string on one line (HL7 v2 §2.A.74: under 200
        // characters; line breaks are FT's): a longer or multi-line text,
        // a risk note say, goes as FT, which receivers neither cut short
        // nor show with its breaks as escapes.
        let formatted = matches!(value, Value::Text(v)
            if value_type == "ST" && (v.contains('\n') || v.chars().count() > ST_MAX_CHARS));
        let value_type = if formatted { "FT" } else { value_type };
        let out = &mut *self.out;
        let _ = write!(
            out,
            "OBX|{}|{value_type}|{item}-{field}^{display}^{LOCAL}|{sub}|",
            self.count
        );
        match value {
            Value::Raw(v) => out.push_str(v),
            Value::Text(v) if formatted => push_formatted(out, v),
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
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    let mut not_carried = Vec::new();
    let (_, structure) = trigger(event);
    let has_al1_dg1 = structure != "ADT_A02";
    let items = s.medications.len() * 8
        + s.allergies.len()
        + s.diagnoses.len()
        + s.risks.len() * 4
        + s.infections.len() * 3
        + s.vaccinations.len() * 2
        + s.follow_ups.len() * 3;
    let mut out = String::with_capacity(1024 + 96 * items);
    push_msh_evn(&mut out, s, event, &mut not_carried);
    push_pid(&mut out, s, &mut not_carried);
    if let Some(gp) = &s.registered_gp {
        out.push_str("PD1|||^^^^^^^^^");
        out.push_str(gp.as_str());
        out.push('\r');
    }
    push_pv1(&mut out, &s.custody, event, &mut not_carried);
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
    if crate::clinical::carried::has_local_code(s) {
        not_carried.push(crate::clinical::carried::LOCAL_CODE_NOT_CARRIED.into());
    }
    if s.consent.treatment_sharing != ConsentDecision::NotRecorded {
        not_carried.push(crate::clinical::model::TREATMENT_SHARING_NOT_CARRIED.into());
    }
    Rendered {
        bytes: out.into_bytes(),
        not_carried,
    }
}

/// MSH (a fresh control ID) and EVN; EVN-6 carries the transfer time on an A02.
fn push_msh_evn(
    out: &mut String,
    s: &ClinicalSummary,
    event: JourneyEvent,
    not_carried: &mut Vec<String>,
) {
    use std::fmt::Write;
    let (code, structure) = trigger(event);
    let mut control = uuid::Uuid::encode_buffer();
    let control = &uuid::Uuid::new_v4().simple().encode_lower(&mut control)[..20];
    out.push_str("MSH|^~\\&|THROUGHCARE|");
    push_escaped(out, s.author.organisation.as_str());
    out.push_str("|||");
    push_ts(out, &s.authored_at);
    // MSH-18: the text is UTF-8 (HL7 table 0211; without it, ASCII is meant).
    let _ = write!(
        out,
        "||ADT^{code}^{structure}|{control}|P|2.5.1||||||UNICODE UTF-8\r"
    );
    let _ = write!(out, "EVN|{code}|");
    push_ts(out, &s.authored_at);
    out.push_str("||||");
    match &s.custody.transfer_at {
        Some(t) if event == JourneyEvent::Transfer => push_ts(out, t),
        Some(_) => not_carried.push("custody.transfer_at: carried only by an A02 transfer".into()),
        None => {}
    }
    out.push('\r');
}

/// PID: identifiers, name, date of birth, sex and the release address.
fn push_pid(out: &mut String, s: &ClinicalSummary, not_carried: &mut Vec<String>) {
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
    push_escaped(out, &p.family_name);
    if let Some(first) = p.given_names.first() {
        out.push('^');
        push_escaped(out, first);
    }
    if p.given_names.len() > 1 {
        out.push('^');
        push_escaped(out, &p.given_names[1..].join(" "));
    }
    out.push_str("||");
    push_dt(out, &p.date_of_birth);
    out.push('|');
    out.push_str(match p.sex {
        Sex::Male => "M",
        Sex::Female => "F",
        Sex::Other => "O",
        Sex::Unknown => "U",
    });
    out.push_str("|||");
    if let Some(a) = &s.custody.release_address {
        if a.lines.len() > 2 {
            not_carried
                .push("custody.release_address.lines: PID-11 carries two street lines".into());
        }
        push_escaped(out, a.lines.first().map_or("", String::as_str));
        out.push('^');
        push_escaped(out, a.lines.get(1).map_or("", String::as_str));
        out.push('^');
        push_escaped(out, &a.city);
        out.push_str("^^");
        push_escaped(out, &a.postcode);
        out.push_str("^^H");
    }
    out.push('\r');
}

/// PV1 up to its last non-empty field: 3 (location), 6 (prior location),
/// 44 (admit date), 45 (discharge date).
fn push_pv1(out: &mut String, c: &Custody, event: JourneyEvent, not_carried: &mut Vec<String>) {
    use std::fmt::Write;
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
            push_dt(out, d);
        }
    }
    if let Some(d) = release_date {
        out.push('|');
        push_dt(out, d);
    }
    out.push('\r');
}

/// Allergies as AL1 and diagnoses as DG1 segments.
fn push_al1_dg1(out: &mut String, s: &ClinicalSummary) {
    use std::fmt::Write;
    for (i, a) in s.allergies.iter().enumerate() {
        // AL1-2 (allergen type, optional) is left empty: the model does not
        // keep it, and `DA` (drug) would be wrong for a food or an insect.
        let _ = write!(out, "AL1|{}||", i + 1);
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
fn push_obx(out: &mut String, s: &ClinicalSummary, has_al1_dg1: bool) {
    let mut obx = Obx { out, count: 0 };
    if has_al1_dg1 {
        push_resolved_diagnoses(&mut obx, s);
    } else {
        push_allergies_diagnoses(&mut obx, s);
    }
    push_medications(&mut obx, s);
    push_risks(&mut obx, s);
    push_mental_health_substance_misuse(&mut obx, s);
    push_infections_vaccinations(&mut obx, s);
    push_follow_ups(&mut obx, s);
    push_prescriptions(&mut obx, s);
    push_custody_consent_author(&mut obx, s);
}

/// Allergies and diagnoses as `ALG` and `DX` groups (for a structure without AL1/DG1).
fn push_allergies_diagnoses(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
}

/// A resolved diagnosis: its DG1 (set ID n) says final, a `DX-ACTIVE` OBX says resolved.
fn push_resolved_diagnoses(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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

/// Medicines as `MED` groups.
fn push_medications(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
        if m.as_needed {
            obx.add("ST", "MED", "PRN", "As needed", n, Value::Raw(yn(true)));
        }
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
}

/// Risk flags as `RISK` groups.
fn push_risks(obx: &mut Obx<'_>, s: &ClinicalSummary) {
    for (i, r) in s.risks.iter().enumerate() {
        let n = i + 1;
        obx.add("ST", "RISK", "KIND", "Risk", n, Value::Raw(r.kind.code()));
        if let Some(code) = &r.code {
            obx.add("CE", "RISK", "CODE", "Risk code", n, Value::Code(code));
        }
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
}

/// Mental health (`MH`) and substance misuse (`SM`).
fn push_mental_health_substance_misuse(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
}

/// Infections (`INF`) and vaccinations (`VAC`).
fn push_infections_vaccinations(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
}

/// Follow-ups as `FU` groups.
fn push_follow_ups(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
}

/// No fixed abode, consent and the author.
fn push_custody_consent_author(obx: &mut Obx<'_>, s: &ClinicalSummary) {
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
