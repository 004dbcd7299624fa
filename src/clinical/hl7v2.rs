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

use std::collections::BTreeMap;

use super::identifiers::OdsCode;
use super::model::{
    Address, Allergy, Author, ClinicalSummary, Code, Consent, ConsentDecision, Custody, DMD, Date,
    DateTime, Diagnosis, FollowUp, FollowUpKind, Infection, Medication, MentalHealth, Patient,
    RiskFlag, RiskKind, SNOMED, Severity, Sex, SubstanceMisuse, Vaccination,
};
use super::violation::{ValidationErrors, Violation};
use super::{Limits, Rendered};
use crate::journey::JourneyEvent;

const LOCAL: &str = "THROUGHCARE";

/// Escapes text for a field: delimiters, the escape character, and line breaks.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
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
    out
}

/// Reverses [`escape`]; an unknown escape is kept as written.
pub fn unescape(text: &str) -> String {
    if !text.contains('\\') {
        return text.to_owned();
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
    out
}

fn ts(t: &DateTime) -> String {
    let o = t.0;
    let (h, m, _) = o.offset().as_hms();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}{}{:02}{:02}",
        o.year(),
        u8::from(o.month()),
        o.day(),
        o.hour(),
        o.minute(),
        o.second(),
        if h < 0 || m < 0 { '-' } else { '+' },
        h.unsigned_abs(),
        m.unsigned_abs()
    )
}

fn dt(d: &Date) -> String {
    format!(
        "{:04}{:02}{:02}",
        d.0.year(),
        u8::from(d.0.month()),
        d.0.day()
    )
}

fn parse_dt(s: &str) -> Option<Date> {
    if s.len() < 8 || !s.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..8])
        .parse()
        .ok()
}

fn parse_ts(s: &str) -> Option<DateTime> {
    let b = s.as_bytes();
    if b.len() < 12 || !b[..12].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = if b.len() >= 14 && b[12..14].iter().all(u8::is_ascii_digit) {
        &s[12..14]
    } else {
        "00"
    };
    let rest = s
        .get(if secs == "00" && b.len() < 14 { 12 } else { 14 }..)
        .unwrap_or("");
    let offset = match rest.as_bytes().first() {
        Some(b'+' | b'-') if rest.len() == 5 => format!("{}:{}", &rest[..3], &rest[3..5]),
        None => "+00:00".into(),
        _ => return None,
    };
    format!(
        "{}-{}-{}T{}:{}:{}{}",
        &s[..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        secs,
        offset
    )
    .parse()
    .ok()
}

fn coding_system(system: &str) -> Option<&'static str> {
    match system {
        SNOMED => Some("SCT"),
        DMD => Some("DMD"),
        _ => None,
    }
}

fn ce(c: &Code) -> String {
    format!(
        "{}^{}^{}",
        escape(&c.code),
        escape(&c.display),
        coding_system(&c.system).unwrap_or("L")
    )
}

fn yn(b: bool) -> &'static str {
    if b { "Y" } else { "N" }
}

/// OBX segments under construction.
struct Obx {
    segments: Vec<String>,
}

impl Obx {
    fn add(
        &mut self,
        value_type: &str,
        item: &str,
        field: &str,
        display: &str,
        sub: usize,
        value: String,
    ) {
        self.segments.push(format!(
            "OBX|{}|{value_type}|{item}-{field}^{display}^{LOCAL}|{sub}|{value}||||||F",
            self.segments.len() + 1
        ));
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

/// Renders `s` as an HL7 v2.5.1 ADT message for `event`, segments separated
/// by carriage returns (wrap in MLLP framing to send).
#[allow(clippy::too_many_lines)]
pub fn render(s: &ClinicalSummary, event: JourneyEvent) -> Rendered {
    let mut not_carried = Vec::new();
    let (code, structure) = trigger(event);
    let has_al1_dg1 = structure != "ADT_A02";
    let control = uuid::Uuid::new_v4().simple().to_string()[..20].to_owned();
    let mut segs = vec![
        format!(
            "MSH|^~\\&|THROUGHCARE|{}|||{}||ADT^{code}^{structure}|{control}|P|2.5.1",
            escape(s.author.organisation.as_str()),
            ts(&s.authored_at)
        ),
        format!(
            "EVN|{code}|{}||||{}",
            ts(&s.authored_at),
            s.custody.transfer_at.as_ref().map(ts).unwrap_or_default()
        ),
    ];
    let p = &s.patient;
    let mut ids = Vec::new();
    if let Some(n) = &p.nhs_number {
        ids.push(format!("{}^^^NHS^NH", n.as_str()));
    }
    if let Some(n) = &p.prison_number {
        ids.push(format!("{}^^^HMPPS^PI", n.as_str()));
    }
    if let Some(n) = &p.crn {
        ids.push(format!("{}^^^NDELIUS^PI", n.as_str()));
    }
    let name = std::iter::once(escape(&p.family_name))
        .chain(p.given_names.first().map(|g| escape(g)))
        .chain((p.given_names.len() > 1).then(|| escape(&p.given_names[1..].join(" "))))
        .collect::<Vec<_>>()
        .join("^");
    let sex = match p.sex {
        Sex::Male => "M",
        Sex::Female => "F",
        Sex::Other => "O",
        Sex::Unknown => "U",
    };
    let c = &s.custody;
    let address = c
        .release_address
        .as_ref()
        .map(|a| {
            if a.lines.len() > 2 {
                not_carried
                    .push("custody.release_address.lines: PID-11 carries two street lines".into());
            }
            format!(
                "{}^{}^{}^^{}^^H",
                escape(a.lines.first().map_or("", String::as_str)),
                escape(a.lines.get(1).map_or("", String::as_str)),
                escape(&a.city),
                escape(&a.postcode)
            )
        })
        .unwrap_or_default();
    segs.push(format!(
        "PID|1||{}||{name}||{}|{sex}|||{address}",
        ids.join("~"),
        dt(&p.date_of_birth)
    ));
    if let Some(gp) = &s.registered_gp {
        segs.push(format!("PD1|||^^^^^^^^^{}", gp.as_str()));
    }
    let (location, prior) = match (&c.transfer_to, event) {
        (Some(to), JourneyEvent::Transfer) => (to.as_str(), c.establishment.as_str()),
        _ => (c.establishment.as_str(), ""),
    };
    let mut pv1 = vec![String::new(); 46];
    pv1[0] = "PV1".into();
    pv1[1] = "1".into();
    pv1[2] = "N".into();
    pv1[3] = format!("^^^{location}");
    if !prior.is_empty() {
        pv1[6] = format!("^^^{prior}");
    }
    pv1[44] = c.reception_date.as_ref().map(dt).unwrap_or_default();
    pv1[45] = c.release_date.as_ref().map(dt).unwrap_or_default();
    if c.transfer_to.is_some() && event != JourneyEvent::Transfer {
        not_carried.push("custody.transfer_to: carried only by an A02 transfer".into());
    }
    if c.transfer_at.is_some() && c.release_date.is_some() {
        not_carried.push("custody.release_date: a transfer's episode ends at the transfer".into());
        pv1[45].clear();
    }
    while pv1.last().is_some_and(String::is_empty) {
        pv1.pop();
    }
    segs.push(pv1.join("|"));

    let mut al1_dg1 = Vec::new();
    let mut obx = Obx {
        segments: Vec::new(),
    };
    if has_al1_dg1 {
        for (i, a) in s.allergies.iter().enumerate() {
            let sev = match a.severity {
                Some(Severity::Mild) => "MI",
                Some(Severity::Moderate) => "MO",
                Some(Severity::Severe) => "SV",
                None => "",
            };
            al1_dg1.push(format!(
                "AL1|{}|DA|{}|{sev}|{}",
                i + 1,
                ce(&a.substance),
                a.reaction.as_deref().map(escape).unwrap_or_default()
            ));
        }
        for (i, d) in s.diagnoses.iter().enumerate() {
            al1_dg1.push(format!(
                "DG1|{}||{}||{}|{}",
                i + 1,
                ce(&d.code),
                d.onset.as_ref().map(dt).unwrap_or_default(),
                if d.active { "W" } else { "F" }
            ));
        }
    } else {
        for (i, a) in s.allergies.iter().enumerate() {
            let n = i + 1;
            obx.add("CE", "ALG", "CODE", "Allergy", n, ce(&a.substance));
            if let Some(r) = &a.reaction {
                obx.add("ST", "ALG", "REACTION", "Reaction", n, escape(r));
            }
            if let Some(sv) = a.severity {
                let v = match sv {
                    Severity::Mild => "MI",
                    Severity::Moderate => "MO",
                    Severity::Severe => "SV",
                };
                obx.add("ST", "ALG", "SEV", "Severity", n, v.into());
            }
        }
        for (i, d) in s.diagnoses.iter().enumerate() {
            let n = i + 1;
            obx.add("CE", "DX", "CODE", "Diagnosis", n, ce(&d.code));
            obx.add("ST", "DX", "ACTIVE", "Active", n, yn(d.active).into());
            if let Some(o) = &d.onset {
                obx.add("DT", "DX", "ONSET", "Onset", n, dt(o));
            }
        }
    }
    for (i, m) in s.medications.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "MED", "CODE", "Medication", n, ce(&m.code));
        obx.add("ST", "MED", "DOSE", "Dose", n, escape(&m.dose));
        obx.add("ST", "MED", "ROUTE", "Route", n, escape(&m.route));
        obx.add("ST", "MED", "FREQ", "Frequency", n, escape(&m.frequency));
        obx.add(
            "ST",
            "MED",
            "SUPERVISED",
            "Supervised",
            n,
            yn(m.supervised).into(),
        );
        obx.add(
            "ST",
            "MED",
            "OST",
            "Opioid substitution",
            n,
            yn(m.opioid_substitution).into(),
        );
        if let Some(t) = &m.last_dose_given {
            obx.add("TS", "MED", "LASTDOSE", "Last dose given", n, ts(t));
        }
        if let Some(d) = m.days_supplied {
            obx.add("NM", "MED", "DAYS", "Days supplied", n, d.to_string());
        }
    }
    for (i, r) in s.risks.iter().enumerate() {
        let n = i + 1;
        obx.add("ST", "RISK", "KIND", "Risk", n, r.kind.code().into());
        obx.add("ST", "RISK", "ACTIVE", "Active", n, yn(r.active).into());
        if let Some(note) = &r.note {
            obx.add("ST", "RISK", "NOTE", "Note", n, escape(note));
        }
    }
    if let Some(m) = &s.mental_health {
        obx.add(
            "ST",
            "MH",
            "CPA",
            "Care programme approach",
            1,
            yn(m.care_programme_approach).into(),
        );
        if let Some(c) = &m.care_coordinator {
            obx.add("ST", "MH", "COORD", "Care coordinator", 1, escape(c));
        }
    }
    if let Some(t) = &s.substance_misuse {
        obx.add(
            "ST",
            "SM",
            "TREAT",
            "In treatment",
            1,
            yn(t.in_treatment).into(),
        );
        if let Some(svc) = &t.community_service {
            obx.add("ST", "SM", "SERVICE", "Community service", 1, escape(svc));
        }
    }
    for (i, inf) in s.infections.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "INF", "CODE", "Infection", n, ce(&inf.code));
        obx.add("ST", "INF", "STATUS", "Status", n, escape(&inf.status));
        if let Some(d) = &inf.treatment_started {
            obx.add("DT", "INF", "TREATED", "Treatment started", n, dt(d));
        }
    }
    for (i, v) in s.vaccinations.iter().enumerate() {
        let n = i + 1;
        obx.add("CE", "VAC", "CODE", "Vaccination", n, ce(&v.code));
        obx.add("DT", "VAC", "DATE", "Date given", n, dt(&v.date));
    }
    for (i, f) in s.follow_ups.iter().enumerate() {
        let n = i + 1;
        let kind = match f.kind {
            FollowUpKind::Appointment => "appointment",
            FollowUpKind::Referral => "referral",
        };
        obx.add("ST", "FU", "KIND", "Follow-up", n, kind.into());
        obx.add("ST", "FU", "SERVICE", "Service", n, escape(&f.service));
        if let Some(d) = &f.date {
            obx.add("DT", "FU", "DATE", "Date", n, dt(d));
        }
    }
    if c.no_fixed_abode {
        obx.add("ST", "CUSTODY", "NFA", "No fixed abode", 1, "Y".into());
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
        decision.into(),
    );
    if let Some(b) = &s.consent.legal_basis {
        obx.add("ST", "CONSENT", "BASIS", "Legal basis", 1, escape(b));
    }
    obx.add("ST", "AUTHOR", "NAME", "Author", 1, escape(&s.author.name));
    obx.add("ST", "AUTHOR", "ROLE", "Role", 1, escape(&s.author.role));
    for code in [&s.medications.iter().map(|m| &m.code).collect::<Vec<_>>()[..]]
        .concat()
        .into_iter()
        .chain(s.allergies.iter().map(|a| &a.substance))
        .chain(s.diagnoses.iter().map(|d| &d.code))
    {
        if coding_system(&code.system).is_none() {
            not_carried
                .push("a code system other than SNOMED CT or dm+d (sent as local, L)".into());
            break;
        }
    }
    // Segment order follows each message structure: OBX before AL1/DG1 in
    // ADT_A01, after them in ADT_A03.
    if structure == "ADT_A03" {
        segs.extend(al1_dg1);
        segs.extend(obx.segments);
    } else {
        segs.extend(obx.segments);
        segs.extend(al1_dg1);
    }
    let mut text = segs.join("\r");
    text.push('\r');
    Rendered {
        bytes: text.into_bytes(),
        not_carried,
    }
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

    /// Field `n` (HL7 numbering; MSH-1 is the field separator).
    fn field(&self, n: usize) -> &'a str {
        let i = if self.id == "MSH" { n - 1 } else { n };
        self.fields.get(i).copied().unwrap_or("")
    }

    fn reps(&self, n: usize) -> impl Iterator<Item = &'a str> {
        self.field(n).split('~').filter(|r| !r.is_empty())
    }

    fn comp(&self, n: usize, c: usize) -> String {
        component(self.field(n), c)
    }
}

fn component(field: &str, c: usize) -> String {
    unescape(field.split('^').nth(c - 1).unwrap_or(""))
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
    let mut segments = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
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
        let fields: Vec<&str> = raw.split('|').collect();
        if fields.len() > limits.max_hl7_repetitions + 1 {
            errors.add(
                id.to_string(),
                format!("more than {} fields", limits.max_hl7_repetitions),
            );
            continue;
        }
        if fields
            .iter()
            .any(|f| f.matches('~').count() >= limits.max_hl7_repetitions)
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
        let nth = counts.entry(id).or_default();
        *nth += 1;
        segments.push(Segment {
            id,
            nth: *nth,
            fields,
        });
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
    let system = match component(field, 3).as_str() {
        "SCT" | "SNM" | "SNOMEDCT" => SNOMED.to_owned(),
        "DMD" => DMD.to_owned(),
        other => other.to_owned(),
    };
    Some(Code {
        system,
        code,
        display: component(field, 2),
    })
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
    let event = match (msh.comp(9, 1).as_str(), msh.comp(9, 2).as_str()) {
        ("ADT", "A01") => Some(JourneyEvent::Admission),
        ("ADT", "A02") => Some(JourneyEvent::Transfer),
        ("ADT", "A03") => Some(JourneyEvent::Release),
        ("ADT", "A08") => Some(JourneyEvent::CommunitySummary),
        _ => {
            e.add("MSH-9", "must be ADT^A01, ADT^A02, ADT^A03 or ADT^A08");
            None
        }
    };
    let version = msh.comp(12, 1);
    if !version.starts_with("2.") {
        e.add("MSH-12", "must be an HL7 v2 version (2.5.1 expected)");
    }
    let control_id = msh.comp(10, 1);
    let authored_at = parse_ts(&find("EVN").map(|s| s.comp(2, 1)).unwrap_or_default())
        .or_else(|| parse_ts(&msh.comp(7, 1)));
    if authored_at.is_none() {
        e.add(
            "EVN-2",
            "required: when the summary was recorded (YYYYMMDDHHMMSS+ZZZZ)",
        );
    }
    let transfer_at = find("EVN").and_then(|s| {
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
    for (r, rep) in pid.reps(3).enumerate() {
        let value = component(rep, 1);
        let field = format!("PID-3[{}].1", r + 1);
        match (component(rep, 4).as_str(), component(rep, 5).as_str()) {
            (_, "NH") => match value.parse::<super::NhsNumber>() {
                Ok(n) => nhs = Some(n),
                Err(err) => e.add(field, err.to_string()),
            },
            ("HMPPS", _) => match value.parse::<super::PrisonNumber>() {
                Ok(n) => prison = Some(n),
                Err(err) => e.add(field, err.to_string()),
            },
            ("NDELIUS", _) => match value.parse::<super::Crn>() {
                Ok(n) => crn = Some(n),
                Err(err) => e.add(field, err.to_string()),
            },
            _ => {}
        }
    }
    let family_name = pid.comp(5, 1);
    if family_name.is_empty() {
        e.add("PID-5.1", "required: the patient's family name");
    }
    let given_names: Vec<String> = [pid.comp(5, 2), pid.comp(5, 3)]
        .into_iter()
        .filter(|g| !g.is_empty())
        .collect();
    let dob = parse_dt(&pid.comp(7, 1));
    if dob.is_none() {
        e.add("PID-7", "required: date of birth YYYYMMDD");
    }
    let sex = match pid.comp(8, 1).as_str() {
        "M" => Sex::Male,
        "F" => Sex::Female,
        "O" => Sex::Other,
        _ => Sex::Unknown,
    };
    let release_address = (!pid.field(11).is_empty()).then(|| Address {
        lines: [pid.comp(11, 1), pid.comp(11, 2)]
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect(),
        city: pid.comp(11, 3),
        postcode: pid.comp(11, 5),
    });
    let ods = |v: String, field: &str, e: &mut ValidationErrors| -> Option<OdsCode> {
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
    let prior = pv1.and_then(|s| ods(s.comp(6, 4), "PV1-6.4", &mut e));
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
        match code_from_ce(s.field(3)) {
            Some(substance) => allergies.push(Allergy {
                substance,
                reaction: Some(s.comp(5, 1)).filter(|r| !r.is_empty()),
                severity: severity(&s.comp(4, 1)),
            }),
            None => e.add(format!("{}.1", s.name(3)), "required: the allergen code"),
        }
    }
    for s in segments.iter().filter(|s| s.id == "DG1") {
        match code_from_ce(s.field(3)) {
            Some(code) => diagnoses.push(Diagnosis {
                code,
                active: s.comp(6, 1) != "F",
                onset: parse_dt(&s.comp(5, 1)),
            }),
            None => e.add(format!("{}.1", s.name(3)), "required: the diagnosis code"),
        }
    }

    // OBX groups: (item, sub-id) → field → (value, segment path).
    let mut groups: BTreeMap<(String, u32), BTreeMap<String, (String, String)>> = BTreeMap::new();
    for s in segments.iter().filter(|s| s.id == "OBX") {
        let id = s.comp(3, 1);
        if s.comp(3, 3) != LOCAL {
            continue;
        }
        let Some((item, field)) = id.split_once('-') else {
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
        let raw = s.field(5).to_owned();
        groups
            .entry((item.to_owned(), sub))
            .or_default()
            .insert(field.to_owned(), (raw, s.name(5)));
    }
    let text_of =
        |g: &BTreeMap<String, (String, String)>, f: &str| g.get(f).map(|(v, _)| unescape(v));
    let mut medications = Vec::new();
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
    for ((item, _), g) in &groups {
        let path = |f: &str| {
            g.get(f)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| format!("OBX {item}-{f}"))
        };
        match item.as_str() {
            "MED" => {
                let Some(code) = g.get("CODE").and_then(|(v, _)| code_from_ce(v)) else {
                    e.add(path("CODE"), "required: the medicine code");
                    continue;
                };
                let last_dose_given = match text_of(g, "LASTDOSE") {
                    Some(v) => {
                        let t = parse_ts(&v);
                        if t.is_none() {
                            e.add(path("LASTDOSE"), "must be a time YYYYMMDDHHMMSS+ZZZZ");
                        }
                        t
                    }
                    None => None,
                };
                let days_supplied = match text_of(g, "DAYS") {
                    Some(v) => match v.parse() {
                        Ok(d) => Some(d),
                        Err(_) => {
                            e.add(path("DAYS"), "must be a whole number of days");
                            None
                        }
                    },
                    None => None,
                };
                medications.push(Medication {
                    code,
                    dose: text_of(g, "DOSE").unwrap_or_default(),
                    route: text_of(g, "ROUTE").unwrap_or_default(),
                    frequency: text_of(g, "FREQ").unwrap_or_default(),
                    supervised: text_of(g, "SUPERVISED").is_some_and(|v| yes(&v)),
                    opioid_substitution: text_of(g, "OST").is_some_and(|v| yes(&v)),
                    last_dose_given,
                    days_supplied,
                });
            }
            "ALG" => match g.get("CODE").and_then(|(v, _)| code_from_ce(v)) {
                Some(substance) => allergies.push(Allergy {
                    substance,
                    reaction: text_of(g, "REACTION"),
                    severity: text_of(g, "SEV").and_then(|v| severity(&v)),
                }),
                None => e.add(path("CODE"), "required: the allergen code"),
            },
            "DX" => match g.get("CODE").and_then(|(v, _)| code_from_ce(v)) {
                Some(code) => diagnoses.push(Diagnosis {
                    code,
                    active: text_of(g, "ACTIVE").is_none_or(|v| yes(&v)),
                    onset: text_of(g, "ONSET").and_then(|v| parse_dt(&v)),
                }),
                None => e.add(path("CODE"), "required: the diagnosis code"),
            },
            "RISK" => match text_of(g, "KIND").as_deref().and_then(RiskKind::from_code) {
                Some(kind) => risks.push(RiskFlag {
                    kind,
                    active: text_of(g, "ACTIVE").is_none_or(|v| yes(&v)),
                    note: text_of(g, "NOTE"),
                }),
                None => e.add(
                    path("KIND"),
                    "must be suicide, self-harm, violence or vulnerability",
                ),
            },
            "MH" => {
                mental_health = Some(MentalHealth {
                    care_programme_approach: text_of(g, "CPA").is_some_and(|v| yes(&v)),
                    care_coordinator: text_of(g, "COORD"),
                });
            }
            "SM" => {
                substance_misuse = Some(SubstanceMisuse {
                    in_treatment: text_of(g, "TREAT").is_some_and(|v| yes(&v)),
                    community_service: text_of(g, "SERVICE"),
                });
            }
            "INF" => match g.get("CODE").and_then(|(v, _)| code_from_ce(v)) {
                Some(code) => infections.push(Infection {
                    code,
                    status: text_of(g, "STATUS").unwrap_or_default(),
                    treatment_started: text_of(g, "TREATED").and_then(|v| parse_dt(&v)),
                }),
                None => e.add(path("CODE"), "required: the infection code"),
            },
            "VAC" => match (
                g.get("CODE").and_then(|(v, _)| code_from_ce(v)),
                text_of(g, "DATE").and_then(|v| parse_dt(&v)),
            ) {
                (Some(code), Some(date)) => vaccinations.push(Vaccination { code, date }),
                _ => e.add(path("CODE"), "a vaccination needs a code and a date"),
            },
            "FU" => follow_ups.push(FollowUp {
                kind: if text_of(g, "KIND").as_deref() == Some("appointment") {
                    FollowUpKind::Appointment
                } else {
                    FollowUpKind::Referral
                },
                service: text_of(g, "SERVICE").unwrap_or_default(),
                date: text_of(g, "DATE").and_then(|v| parse_dt(&v)),
            }),
            "CUSTODY" => no_fixed_abode = text_of(g, "NFA").is_some_and(|v| yes(&v)),
            "CONSENT" => {
                consent.probation_sharing = match text_of(g, "PROBATION").as_deref() {
                    Some("given") => ConsentDecision::Given,
                    Some("refused") => ConsentDecision::Refused,
                    _ => ConsentDecision::NotRecorded,
                };
                consent.legal_basis = text_of(g, "BASIS");
            }
            "AUTHOR" => {
                author_name = text_of(g, "NAME").unwrap_or_default();
                author_role = text_of(g, "ROLE").unwrap_or_default();
            }
            _ => {}
        }
    }
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
    e.clone().into_result()?;
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
        assert_eq!(parse_ts("2026112408"), None);
        assert_eq!(error_location("PID-3[1].1"), "PID^1^3^1^1");
        assert_eq!(error_location("OBX(4)-5"), "OBX^4^5^1^");
    }

    #[test]
    fn non_standard_delimiters_are_refused() {
        let err = parse(b"MSH#^~\\&#X", &Limits::default()).unwrap_err();
        assert_eq!(err.0[0].field, "MSH-2");
    }
}
