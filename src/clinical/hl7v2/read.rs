//! Reading an HL7 v2 ADT message into the summary: MSH and EVN, the
//! patient (PID, PD1), the episode (PV1), AL1 and DG1, then the OBX groups.

use std::borrow::Cow;

use super::coded::{Terminology, code_from_ce, code_or_words_from_ce};
use super::escape::unescaped;
use super::segment::{Segment, component, first_subcomponent, split};
use super::{LOCAL, unread};
use crate::clinical::JourneyEvent;
use crate::clinical::identifiers::OdsCode;
use crate::clinical::model::{
    Address, Allergy, Author, ClinicalSummary, Code, Consent, ConsentDecision, Custody, Date,
    DateTime, Diagnosis, FollowUp, FollowUpKind, Infection, Medication, MentalHealth,
    PRESCRIPTION_INTENTS, PRESCRIPTION_STATUSES, Patient, Prescription, Quantity, RiskFlag,
    RiskKind, Severity, Sex, SubstanceMisuse, Vaccination, When,
};
use crate::clinical::violation::ValidationErrors;
use crate::clinical::{Crn, IdentifierError, Limits, NhsNumber, PrisonNumber};

fn parse_dt(s: &str) -> Option<Date> {
    if s.len() < 8 || !s.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        return None;
    }
    // A date, or a whole timestamp (PID-7 is a TS) whose day is taken:
    // never a date with anything else after it (`19880314XYZ`).
    if s.len() > 8 && When::from_hl7(s).is_none() {
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

/// An HL7 `TS`/`DTM` to at least the hour, fractional seconds kept (a time
/// without an offset is the sender's local time, read as UK time).
pub(super) fn parse_ts(s: &str) -> Option<DateTime> {
    let when = When::from_hl7(s)?.to_string();
    if when.len() <= 10 {
        return None;
    }
    when.parse().ok()
}

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

/// A yes/no value (HL7 table 0136: `Y` or `N`, exactly); `None` when
/// absent. Any other value is a violation at `path`, never read as
/// "no": a lower-case `y` must not switch off what it says.
fn yes_no(
    value: Option<&str>,
    path: impl FnOnce() -> String,
    e: &mut ValidationErrors,
) -> Option<bool> {
    match value {
        None => None,
        Some("Y") => Some(true),
        Some("N") => Some(false),
        Some(_) => {
            e.add(path(), "must be Y or N (HL7 table 0136)");
            None
        }
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

    /// The value of `field` (not a coded one): its first component, as
    /// ST, NM, DTM and TX have none (a `^` there is a separator).
    fn text(&self, field: &str) -> Option<Cow<'a, str>> {
        self.raw(field).map(|raw| component(raw, 1))
    }

    fn string(&self, field: &str) -> Option<String> {
        self.text(field).map(Cow::into_owned)
    }

    /// The group's code (`CODE`), in `wanted` when the CE has it.
    fn code(&self, wanted: Terminology, notes: &mut Vec<String>) -> Option<Code> {
        let raw = self.raw("CODE")?;
        code_from_ce(raw, wanted, &self.path("CODE"), notes)
    }

    /// The group's code, or its words (diagnoses and allergies).
    fn code_or_words(&self, wanted: Terminology, notes: &mut Vec<String>) -> Option<Code> {
        let raw = self.raw("CODE")?;
        code_or_words_from_ce(raw, wanted, &self.path("CODE"), notes)
    }

    /// A yes/no field (HL7 table 0136: `Y` or `N`); `None` when absent.
    /// Any other value is a violation, never read as "no": a lower-case `y`
    /// on opioid substitution or an active suicide risk must not switch it off.
    fn yes_no(&self, field: &str, e: &mut ValidationErrors) -> Option<bool> {
        yes_no(self.text(field).as_deref(), || self.path(field), e)
    }

    /// One of `allowed` (the model's word for each), or a violation.
    fn one_of<T: Copy>(
        &self,
        field: &str,
        allowed: &[(&str, T)],
        e: &mut ValidationErrors,
    ) -> Option<T> {
        let v = self.text(field)?;
        if let Some((_, t)) = allowed.iter().find(|(word, _)| *word == v) {
            return Some(*t);
        }
        let words: Vec<&str> = allowed.iter().map(|(w, _)| *w).collect();
        e.add(
            self.path(field),
            format!("must be one of {}", words.join(", ")),
        );
        None
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
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Parsed, ValidationErrors> {
    let text = message_text(bytes, limits)?.trim_start_matches('\u{feff}');
    let (untruncated, truncated) = untruncate(text);
    let text = untruncated.as_deref().unwrap_or(text);
    let segments = split(text, limits)?;
    let mut e = ValidationErrors::default();
    // One patient, one event, one visit per message: a second of these
    // would otherwise be ignored unsaid.
    for id in ["EVN", "PID", "PD1", "PV1"] {
        if let Some(again) = segments.iter().find(|s| s.id == id && s.nth > 1) {
            e.add(
                format!("{}({})", again.id, again.nth),
                "given more than once: a message carries one patient and one event",
            );
        }
    }
    let find = |id: &str| segments.iter().find(|s| s.id == id);
    let msh = find("MSH").expect("split checked MSH");
    let header = read_header(msh, find("EVN"), &mut e);
    let Some(pid) = find("PID") else {
        e.add("PID", "required");
        return Err(e);
    };
    let mut notes = truncated;
    let (patient, release_address) = read_pid(pid, &mut notes, &mut e);
    let registered_gp = find("PD1").and_then(|s| ods(&s.comp(3, 10), "PD1-3.10", &mut e));
    let episode = read_pv1(find("PV1"), header.event, &mut notes, &mut e);
    let mut items = Items::default();
    for s in segments.iter().filter(|s| s.id == "AL1") {
        items.allergies.extend(read_al1(s, &mut notes, &mut e));
    }
    // DG1-21 `D` (HL7 table 0206) deletes the diagnosis: it is read, so
    // that a `DX-ACTIVE` OBX still finds its DG1 by position, then left out.
    let mut deleted = Vec::new();
    for s in segments.iter().filter(|s| s.id == "DG1") {
        if let Some((diagnosis, delete)) = read_dg1(s, &mut notes, &mut e) {
            if delete {
                deleted.push(items.diagnoses.len());
                notes.push(format!(
                    "{}: a diagnosis the sender deleted is left out of the summary",
                    s.name(21)
                ));
            }
            items.diagnoses.push(diagnosis);
            let set_id: Option<u32> = s.comp(1, 1).parse().ok();
            if set_id.is_some() && items.dg1_set_ids.contains(&set_id) {
                // A DX-ACTIVE naming it could mean either diagnosis.
                e.add(
                    s.name(1),
                    "a second DG1 with this set ID: each DG1 has its own",
                );
            }
            items.dg1_set_ids.push(set_id);
        }
    }
    let from_dg1 = items.diagnoses.len();
    let obx = obx_fields(&segments, &mut notes, &mut e);
    for fields in obx.chunk_by(|a, b| a.item == b.item && a.sub == b.sub) {
        let group = Group {
            item: &fields[0].item,
            fields,
        };
        items.read_group(&group, from_dg1, &mut notes, &mut e);
    }
    for i in deleted.into_iter().rev() {
        items.diagnoses.remove(i);
    }
    notes.extend(unread::unread(&segments, header.event));
    let author_org = ods(&msh.comp(4, 1), "MSH-4", &mut e);
    if author_org.is_none() {
        e.add("MSH-4", "required: the sending organisation's ODS code");
    }
    let (Some(event), Some(authored_at), Some(patient), Some(establishment), Some(author_org)) = (
        header.event,
        header.authored_at,
        patient,
        episode.establishment,
        author_org,
    ) else {
        return Err(e);
    };
    e.into_result()?;
    let custody = Custody {
        establishment,
        reception_date: episode.reception_date,
        transfer_at: header.transfer_at,
        transfer_to: episode.transfer_to,
        release_date: episode.release_date,
        release_address,
        no_fixed_abode: items.no_fixed_abode,
    };
    Ok(Parsed {
        summary: items.into_summary(
            patient,
            custody,
            registered_gp,
            author_org,
            authored_at,
            notes,
        ),
        event,
        control_id: header.control_id,
    })
}

/// The message as text, within the size limit.
/// HL7 v2.7 §2.5.5.2: a message whose MSH-2 declares the truncation
/// character `#` ends a value cut short with it. Such a value is read as far
/// as it goes, without the `#` (before, `FITZWILLIA#` became a family name),
/// and listed, by field, as not carried in full; the escape `\P\` is a
/// literal `#`. `None` (and no notes) for a message without it.
fn untruncate(text: &str) -> (Option<String>, Vec<String>) {
    // MSH-2 exactly `^~\&#`: a longer one is refused by `split`, untouched.
    let Some(rest) = text
        .strip_prefix("MSH|^~\\&#")
        .filter(|r| r.is_empty() || r.starts_with(['|', '\r', '\n']))
    else {
        return (None, Vec::new());
    };
    let mut out = String::with_capacity(text.len());
    out.push_str("MSH|^~\\&#");
    let mut notes = Vec::new();
    let (mut segment, mut field) = ("MSH".to_owned(), 2usize);
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        let ends_value = chars
            .peek()
            .is_none_or(|n| matches!(n, '|' | '^' | '&' | '~' | '\r' | '\n'));
        if c == '#' && ends_value {
            let note = format!(
                "{segment}-{field}: cut short by the sender (truncation character), carried as far as it goes"
            );
            if notes.last() != Some(&note) {
                notes.push(note);
            }
            continue;
        }
        out.push(c);
        match c {
            '|' => field += 1,
            '\r' | '\n' => {
                let line: String = chars.clone().take(3).collect();
                segment = line;
                field = 0;
            }
            _ => {}
        }
    }
    (Some(literal_hashes(&out)), notes)
}

/// `text` with each escape sequence `\P\` (HL7 v2.7: the truncation
/// character as data) written as `#`. Only a whole escape is one: in
/// `\E\P\E\` (an escaped backslash, `P`, another) there is none. Every
/// other escape is kept as it is, for the unescaping of its value.
fn literal_hashes(text: &str) -> String {
    // An escape ends within its value: never past a field or segment.
    super::escape::rewrite_escapes(text, &['|', '\r', '\n'], |seq, out| match seq {
        "P" => out.push('#'),
        seq => super::escape::push_as_written(out, seq),
    })
}

fn message_text<'b>(bytes: &'b [u8], limits: &Limits) -> Result<&'b str, ValidationErrors> {
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
    std::str::from_utf8(bytes).map_err(|e| {
        ValidationErrors::one(
            "message",
            format!("not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })
}

/// What MSH and EVN say: the event, the control ID for the ACK, and when.
struct Header {
    event: Option<JourneyEvent>,
    control_id: String,
    authored_at: Option<DateTime>,
    transfer_at: Option<DateTime>,
}

fn read_header(msh: &Segment<'_>, evn: Option<&Segment<'_>>, e: &mut ValidationErrors) -> Header {
    let event = super::event_of(&msh.comp(9, 1), &msh.comp(9, 2));
    if event.is_none() {
        e.add("MSH-9", "must be ADT^A01, ADT^A02, ADT^A03 or ADT^A08");
    }
    // EVN-1 (kept for compatibility) must not name another event than MSH-9.
    let evn_type = evn.map(|s| s.comp(1, 1)).unwrap_or_default();
    if !evn_type.is_empty() && evn_type != msh.comp(9, 2) {
        e.add("EVN-1", "must be the trigger event MSH-9 names, or empty");
    }
    // HL7 table 0103: a training (T) or debugging (D) message must never
    // reach a clinician as a real patient's record.
    match &*msh.comp(11, 1) {
        "P" => {}
        "" => e.add("MSH-11", "required: the processing id (P, HL7 table 0103)"),
        _ => e.add(
            "MSH-11",
            "only production messages (P, HL7 table 0103) are carried",
        ),
    }
    // HL7 table 0207: an archived (A), restored (R) or initial-load (I)
    // message is not a current event, and would route an old release as new.
    if !matches!(&*msh.comp(11, 2), "" | "T") {
        e.add(
            "MSH-11.2",
            "only current processing (empty or T, HL7 table 0207) is carried",
        );
    }
    // HL7 table 0155: an acknowledgement type the sender misspelt would
    // leave it waiting for an answer it will never get, or not.
    for (n, name) in [(15, "MSH-15"), (16, "MSH-16")] {
        if !matches!(&*msh.comp(n, 1), "" | "AL" | "NE" | "ER" | "SU") {
            e.add(
                name,
                "must be one of AL, NE, ER or SU (HL7 table 0155), or empty",
            );
        }
    }
    let version = msh.comp(12, 1);
    if !super::header::VERSIONS.contains(&&*version) {
        e.add(
            "MSH-12",
            "must be an HL7 v2 version from HL7 table 0104 (2.5.1 expected)",
        );
    }
    let control_id = msh.comp(10, 1).into_owned();
    let authored_at = authored_at(msh, evn, e);
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
    Header {
        event,
        control_id,
        authored_at,
        transfer_at,
    }
}

/// The field the summary's `authored_at` is read from in `text` (see
/// [`authored_at`]): EVN-2, or MSH-7 when the message has no EVN-2. A rule
/// on the summary as read (a time in the future) is answered where the
/// sender wrote the time.
pub fn authored_at_field(text: &[u8]) -> &'static str {
    let Ok(text) = std::str::from_utf8(text) else {
        return "EVN-2";
    };
    // Whatever limits the message was refused under, it is read here.
    let wide = Limits {
        max_hl7_segments: 1 << 24,
        max_hl7_repetitions: 1 << 24,
        ..Limits::default()
    };
    let Ok(segments) = split(text.trim_start_matches('\u{feff}'), &wide) else {
        return "EVN-2";
    };
    match segments.iter().find(|s| s.id == "EVN") {
        Some(evn) if !evn.comp(2, 1).is_empty() => "EVN-2",
        _ => "MSH-7",
    }
}

/// When the summary was recorded: EVN-2, or MSH-7 only when EVN-2 is empty.
/// It decides which of two summaries supersedes the other, so a value that
/// is there but unreadable, or only a date (a valid TS, but one that cannot
/// order two summaries written that day), is a violation where it is
/// written, never replaced by the other field. Read as every TS is read
/// ([`parse_ts`]): any precision from the hour.
fn authored_at(
    msh: &Segment<'_>,
    evn: Option<&Segment<'_>>,
    e: &mut ValidationErrors,
) -> Option<DateTime> {
    let evn2 = evn.map(|s| s.comp(2, 1)).unwrap_or_default();
    let (text, at) = if evn2.is_empty() {
        (msh.comp(7, 1), "MSH-7")
    } else {
        (evn2, "EVN-2")
    };
    if text.is_empty() {
        e.add(
            "EVN-2",
            "required: when the summary was recorded (YYYYMMDDHHMMSS+ZZZZ)",
        );
        return None;
    }
    let time = parse_ts(&text);
    if time.is_none() {
        let why = if When::from_hl7(&text).is_some() {
            "must be a time to at least the hour (YYYYMMDDHH[MM[SS[.SSSS]]][+/-ZZZZ]): a date \
             alone cannot tell which of two summaries is newer"
        } else {
            "must be a time YYYYMMDDHH[MM[SS[.SSSS]]][+/-ZZZZ]: it decides which summary \
             supersedes which"
        };
        e.add(at, why);
    }
    time
}

/// The patient from PID (none without a readable date of birth), and the
/// release address PID-11 carries.
fn read_pid(
    pid: &Segment<'_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> (Option<Patient>, Option<Address>) {
    let (nhs, prison, crn) = read_identifiers(pid, notes, e);
    refuse_a_death(pid, e);
    let family_name = pid.sub1(5, 1).into_owned();
    if family_name.is_empty() {
        e.add("PID-5.1", "required: the patient's family name");
    }
    let given_names: Vec<String> = [pid.comp(5, 2), pid.comp(5, 3)]
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(Cow::into_owned)
        .collect();
    let written = pid.comp(7, 1);
    let dob = parse_dt(&written);
    if written.is_empty() {
        e.add("PID-7", "required: date of birth YYYYMMDD");
    } else if dob.is_none() {
        // Present but no date (HL7 table 0357: 102, a data type error).
        e.add(
            "PID-7",
            "must be a date of birth written YYYYMMDD, a day the calendar has",
        );
    }
    let sex = read_sex(pid, e);
    // PID-11.7 (HL7 table 0190): a bad address, or one of birth or origin,
    // is not where the patient goes on release.
    let address_type = pid.comp(11, 7);
    let not_a_home = matches!(&*address_type, "BA" | "BDL" | "BR" | "N" | "F");
    if not_a_home {
        notes.push(format!(
            "PID-11: not carried: the address is of type {} (table 0190), not a release address",
            address_type
        ));
    }
    let release_address = (!pid.field(11).is_empty() && !not_a_home).then(|| Address {
        lines: [pid.sub1(11, 1), pid.comp(11, 2)]
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(Cow::into_owned)
            .collect(),
        city: pid.comp(11, 3).into_owned(),
        postcode: pid.comp(11, 5).into_owned(),
    });
    let patient = dob.map(|date_of_birth| Patient {
        nhs_number: nhs,
        prison_number: prison,
        crn,
        family_name,
        given_names,
        date_of_birth,
        sex,
    });
    (patient, release_address)
}

/// PID-29 and PID-30: a patient recorded as dead is refused, as the FHIR
/// reader refuses `Patient.deceased[x]`: a summary is not routed to the
/// carers of a person who has died. PID-30 is HL7 table 0136; a value
/// outside it is refused, never read as "not dead".
fn refuse_a_death(pid: &Segment<'_>, e: &mut ValidationErrors) {
    const DECEASED: &str = "the patient is recorded as deceased: a summary is not routed to \
                            the carers of a person who has died";
    if !pid.field(29).is_empty() {
        e.add("PID-29", DECEASED);
    }
    let indicator = Some(pid.field(30)).filter(|v| !v.is_empty()).map(unescaped);
    if yes_no(indicator.as_deref(), || "PID-30".to_owned(), e) == Some(true) {
        e.add("PID-30", DECEASED);
    }
}

/// PID-3: the NHS number, prison number and CRN; other identifiers are
/// listed as not read.
fn read_identifiers(
    pid: &Segment<'_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> (Option<NhsNumber>, Option<PrisonNumber>, Option<Crn>) {
    let (mut nhs, mut prison, mut crn) = (None, None, None);
    let before = e.0.len();
    for (r, rep) in pid.reps(3) {
        let value = component(rep, 1);
        let field = || format!("PID-3[{}].1", r + 1);
        match (&*first_subcomponent(rep, 4), &*component(rep, 5)) {
            (_, "" | "NH") if nhs_authority(rep) => match value.parse::<NhsNumber>() {
                Ok(n) => one_of_a_kind(&mut nhs, n, field(), e),
                Err(err) => e.add(field(), err.to_string()),
            },
            // Another authority's national health number (Scotland's CHI,
            // Northern Ireland's H&C) is not an NHS number, though a CHI
            // number passes the same check digit: filing it as one could
            // file the record under someone else.
            (_, "NH") => notes.push(format!(
                "PID-3[{}]: a national health number of another authority (CX.4), not an NHS \
                 number: not read",
                r + 1
            )),
            ("HMPPS", _) => match value.parse::<PrisonNumber>() {
                Ok(n) => one_of_a_kind(&mut prison, n, field(), e),
                Err(err) => e.add(field(), err.to_string()),
            },
            ("NDELIUS", _) => match value.parse::<Crn>() {
                Ok(n) => one_of_a_kind(&mut crn, n, field(), e),
                Err(err) => e.add(field(), err.to_string()),
            },
            _ => notes.push(format!(
                "PID-3[{}]: an identifier the gateway does not read",
                r + 1
            )),
        }
    }
    if nhs.is_none() && prison.is_none() && e.0.len() == before {
        e.add(
            "PID-3",
            "required: an NHS number (…^^^NHS^NH) or a prison number (…^^^HMPPS^PI)",
        );
    }
    (nhs, prison, crn)
}

/// The NHS number's OID (NHS Data Dictionary), as CX.4's universal id.
const NHS_NUMBER_OID: &str = "2.16.840.1.113883.2.1.4.1";

/// Whether PID-3 repetition `rep` holds an NHS number: CX.4 names the NHS
/// (the namespace `NHS`, or the NHS number's OID as namespace or universal
/// id), with CX.5 `NH` or none; or CX.5 `NH` under any other authority but
/// the other UK health numbers, which pass the same check digit (Scotland's
/// CHI, Northern Ireland's H&C): a trust naming itself there still sends
/// the patient's NHS number.
fn nhs_authority(rep: &str) -> bool {
    let hd = rep.split('^').nth(3).unwrap_or_default();
    let mut parts = hd.split('&');
    let namespace = parts.next().unwrap_or_default();
    let universal = parts.next().unwrap_or_default();
    if namespace.eq_ignore_ascii_case("NHS") || [namespace, universal].contains(&NHS_NUMBER_OID) {
        return true;
    }
    let other_uk = ["CHI", "H\\T\\C", "HC", "HSC", "HSCNI"]
        .iter()
        .any(|n| namespace.eq_ignore_ascii_case(n));
    component(rep, 5) == "NH" && !other_uk
}

/// Keeps `found` as the patient's identifier of one kind; a second,
/// different one is refused at `field`: which is the patient's cannot be
/// told, and the wrong one files the record under someone else.
fn one_of_a_kind<T: PartialEq>(
    kept: &mut Option<T>,
    found: T,
    field: String,
    e: &mut ValidationErrors,
) {
    match kept {
        Some(k) if *k != found => e.add(
            field,
            "a second, different identifier of this kind: which is the patient's cannot be told",
        ),
        Some(_) => {}
        None => *kept = Some(found),
    }
}

/// PID-8 by HL7 table 0001 (administrative sex).
fn read_sex(pid: &Segment<'_>, e: &mut ValidationErrors) -> Sex {
    match &*pid.comp(8, 1) {
        "M" => Sex::Male,
        "F" => Sex::Female,
        "O" | "A" => Sex::Other,
        "U" | "N" | "" => Sex::Unknown,
        _ => {
            e.add("PID-8", "must be M, F, O, A, U or N (HL7 table 0001)");
            Sex::Unknown
        }
    }
}

/// An ODS code; empty is absent, unreadable is a violation at `field`.
fn ods(v: &str, field: &str, e: &mut ValidationErrors) -> Option<OdsCode> {
    if v.is_empty() {
        return None;
    }
    v.parse()
        .map_err(|err: IdentifierError| e.add(field, err.to_string()))
        .ok()
}

/// What PV1 says of the custody episode.
struct Episode {
    establishment: Option<OdsCode>,
    transfer_to: Option<OdsCode>,
    reception_date: Option<Date>,
    release_date: Option<Date>,
}

fn read_pv1(
    pv1: Option<&Segment<'_>>,
    event: Option<JourneyEvent>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Episode {
    if let Some(s) = pv1 {
        discharge_disposition(s, notes, e);
    }
    let location = pv1.and_then(|s| ods(&s.sub1(3, 4), "PV1-3.4", e));
    // PV1-6 is the sending location only on a transfer (A02); elsewhere it
    // is listed as not read, never taken for an establishment.
    let prior = pv1
        .filter(|_| event == Some(JourneyEvent::Transfer))
        .and_then(|s| ods(&s.sub1(6, 4), "PV1-6.4", e));
    let (establishment, transfer_to) = match (event, prior) {
        (Some(JourneyEvent::Transfer), Some(prior)) => (Some(prior), location),
        _ => (location, None),
    };
    if pv1.is_none() {
        // ADT A01, A02, A03 and A08 all require PV1: the segment is missing,
        // not a field of it.
        e.add("PV1", "required: the custody episode (PV1)");
    } else if establishment.is_none() {
        e.add("PV1-3.4", "required: the establishment's ODS code");
    }
    let date_at = |field: usize, name: &str, e: &mut ValidationErrors| {
        let v = pv1.map(|s| s.comp(field, 1)).unwrap_or_default();
        if v.is_empty() {
            return None;
        }
        // A custody day is England's: `202606302330+0000` is 1 July (BST).
        let d = if v.len() > 8 {
            parse_dt(&v)
                .and(When::from_hl7(&v))
                .and_then(|w| w.day_in_england())
        } else {
            parse_dt(&v)
        };
        if d.is_none() {
            e.add(name, "must be a date YYYYMMDD");
        }
        d
    };
    let reception_date = date_at(44, "PV1-44", e);
    let release_date = date_at(45, "PV1-45", e);
    Episode {
        establishment,
        transfer_to,
        reception_date,
        release_date,
    }
}

/// PV1-36 codes that say the patient died: HL7 table 0112's `20` expired,
/// `21`-`28` expired (as defined locally), `40`-`42` expired at home, in a
/// facility, place unknown; and the NHS Data Dictionary's discharge
/// destination `79` (died), which English senders write here, as the FHIR
/// reader refuses UK Core's `79`. Not `29`: in the NHS Data Dictionary it is
/// a temporary place of residence (a hostel, approved premises), a common
/// release destination.
const EXPIRED: [&str; 13] = [
    "20", "21", "22", "23", "24", "25", "26", "27", "28", "40", "41", "42", "79",
];

/// PV1-36, the discharge disposition (HL7 table 0112), as the FHIR reader
/// reads `dischargeDisposition`: home (`01`) is a release as any other; a
/// death is refused, since it is not a release to anyone's care; any other
/// is listed as not carried, so the recipient sees the patient went
/// somewhere other than home.
fn discharge_disposition(pv1: &Segment<'_>, notes: &mut Vec<String>, e: &mut ValidationErrors) {
    // Every repetition: a death must never hide behind a first one.
    let codes: Vec<Cow<'_, str>> = pv1.reps(36).map(|(_, rep)| component(rep, 1)).collect();
    if codes.iter().any(|c| EXPIRED.contains(&&**c)) {
        e.add(
            "PV1-36",
            "the patient died (a discharge disposition of expired, table 0112): a death in \
             custody is not a release, and its summary is not routed to community carers",
        );
        return;
    }
    match codes.first().map(|c| &**c) {
        None | Some("" | "01") => {}
        Some(code) if code.len() <= 8 && code.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            notes.push(format!(
                "PV1-36: not carried: a discharge disposition of {code}"
            ));
        }
        Some(_) => {
            notes.push("PV1-36: not carried: a discharge disposition other than home".into())
        }
    }
}

/// The OBX segments this gateway wrote (OBX-3.3 `THROUGHCARE`), sorted into
/// groups: the segments that share (item, sub-ID), in item order, then
/// sub-ID, then message order (a repeated field: the last wins).
fn obx_fields<'a, 's>(
    segments: &'s [Segment<'a>],
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Vec<ObxField<'a, 's>> {
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
            // The first repetition: the others are listed, not read.
            value: s.field(5).split('~').next().unwrap_or_default(),
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
    obx
}

/// The headings read from AL1, DG1 and the OBX groups.
struct Items {
    allergies: Vec<Allergy>,
    diagnoses: Vec<Diagnosis>,
    medications: Vec<Medication>,
    prescriptions: Vec<Prescription>,
    risks: Vec<RiskFlag>,
    infections: Vec<Infection>,
    vaccinations: Vec<Vaccination>,
    follow_ups: Vec<FollowUp>,
    mental_health: Option<MentalHealth>,
    substance_misuse: Option<SubstanceMisuse>,
    no_fixed_abode: bool,
    consent: Consent,
    author_name: String,
    author_role: String,
    /// DG1-1 (the set ID) of each diagnosis read from a DG1, in order.
    dg1_set_ids: Vec<Option<u32>>,
}

impl Default for Items {
    fn default() -> Self {
        Self {
            allergies: Vec::new(),
            diagnoses: Vec::new(),
            medications: Vec::new(),
            prescriptions: Vec::new(),
            risks: Vec::new(),
            infections: Vec::new(),
            vaccinations: Vec::new(),
            follow_ups: Vec::new(),
            mental_health: None,
            substance_misuse: None,
            no_fixed_abode: false,
            consent: Consent {
                probation_sharing: ConsentDecision::NotRecorded,
                legal_basis: None,
                treatment_sharing: ConsentDecision::NotRecorded,
            },
            author_name: String::new(),
            author_role: String::new(),
            dg1_set_ids: Vec::new(),
        }
    }
}

impl Items {
    /// The diagnosis read from the DG1 whose set ID (DG1-1) is `set_id`;
    /// by position only for a DG1 without one.
    fn dg1_of(&mut self, set_id: u32, from_dg1: usize) -> Option<&mut Diagnosis> {
        let ids = &self.dg1_set_ids[..from_dg1.min(self.dg1_set_ids.len())];
        let at = ids.iter().position(|id| *id == Some(set_id)).or_else(|| {
            let i = usize::try_from(set_id).ok()?.checked_sub(1)?;
            (ids.get(i) == Some(&None)).then_some(i)
        })?;
        self.diagnoses.get_mut(at)
    }

    /// One OBX group, by its item; `from_dg1` diagnoses came from DG1
    /// segments (a `DX` group without a code gives one of them its status).
    fn read_group(
        &mut self,
        g: &Group<'_, '_, '_>,
        from_dg1: usize,
        notes: &mut Vec<String>,
        e: &mut ValidationErrors,
    ) {
        let snomed = Terminology::SnomedCt;
        match g.item {
            "MED" => self.medications.extend(read_medication(g, notes, e)),
            "RX" => self.prescriptions.extend(read_prescription(g, notes, e)),
            "ALG" => self.allergies.extend(read_allergy(g, notes, e)),
            "DX" => {
                let active = g.yes_no("ACTIVE", e).unwrap_or(true);
                match g.code_or_words(snomed, notes) {
                    Some(code) => self.diagnoses.push(Diagnosis {
                        code,
                        active,
                        onset: optional_when(g.text("ONSET").as_deref(), || g.path("ONSET"), e),
                    }),
                    // Without a code, the status of the DG1 with this set ID.
                    None => match self.dg1_of(g.fields[0].sub, from_dg1) {
                        Some(d) => d.active = active,
                        None => e.add(g.path("CODE"), "required: the diagnosis code"),
                    },
                }
            }
            "RISK" => match g.text("KIND").as_deref().and_then(RiskKind::from_code) {
                Some(kind) => self.risks.push(RiskFlag {
                    kind,
                    active: g.yes_no("ACTIVE", e).unwrap_or(true),
                    note: g.string("NOTE"),
                    code: g.code(snomed, notes),
                }),
                None => e.add(
                    g.path("KIND"),
                    "must be suicide, self-harm, violence, vulnerability or other",
                ),
            },
            "MH" => {
                self.mental_health = Some(MentalHealth {
                    care_programme_approach: g.yes_no("CPA", e).unwrap_or(false),
                    care_coordinator: g.string("COORD"),
                });
            }
            "SM" => {
                self.substance_misuse = Some(SubstanceMisuse {
                    in_treatment: g.yes_no("TREAT", e).unwrap_or(false),
                    community_service: g.string("SERVICE"),
                });
            }
            "INF" => match g.code(snomed, notes) {
                Some(code) => self.infections.push(Infection {
                    code,
                    status: g.string("STATUS").unwrap_or_default(),
                    treatment_started: optional_date(
                        g.text("TREATED").as_deref(),
                        || g.path("TREATED"),
                        e,
                    ),
                }),
                None => e.add(g.path("CODE"), "required: the infection code"),
            },
            "VAC" => {
                let code = g.code(snomed, notes);
                if code.is_none() {
                    e.add(g.path("CODE"), "required: the vaccination's code");
                }
                let written = g.text("DATE").filter(|v| !v.is_empty());
                if written.is_none() {
                    e.add(
                        g.path("DATE"),
                        "required: the date the vaccination was given",
                    );
                }
                let date = optional_when(written.as_deref(), || g.path("DATE"), e);
                if let (Some(code), Some(date)) = (code, date) {
                    self.vaccinations.push(Vaccination { code, date });
                }
            }
            "FU" => self.follow_ups.push(read_follow_up(g, e)),
            "CUSTODY" => self.no_fixed_abode = g.yes_no("NFA", e).unwrap_or(false),
            "CONSENT" => {
                self.consent.probation_sharing = g
                    .one_of(
                        "PROBATION",
                        &[
                            ("given", ConsentDecision::Given),
                            ("refused", ConsentDecision::Refused),
                            ("not_recorded", ConsentDecision::NotRecorded),
                        ],
                        e,
                    )
                    .unwrap_or(ConsentDecision::NotRecorded);
                self.consent.legal_basis = g.string("BASIS");
            }
            "AUTHOR" => {
                self.author_name = g.string("NAME").unwrap_or_default();
                self.author_role = g.string("ROLE").unwrap_or_default();
            }
            _ => {}
        }
    }

    /// The summary these headings belong to.
    fn into_summary(
        self,
        patient: Patient,
        custody: Custody,
        registered_gp: Option<OdsCode>,
        author_org: OdsCode,
        authored_at: DateTime,
        not_read: Vec<String>,
    ) -> ClinicalSummary {
        ClinicalSummary {
            patient,
            custody,
            registered_gp,
            diagnoses: self.diagnoses,
            medications: self.medications,
            prescriptions: self.prescriptions,
            allergies: self.allergies,
            risks: self.risks,
            mental_health: self.mental_health,
            substance_misuse: self.substance_misuse,
            infections: self.infections,
            vaccinations: self.vaccinations,
            follow_ups: self.follow_ups,
            consent: self.consent,
            author: Author {
                name: self.author_name,
                role: self.author_role,
                organisation: author_org,
            },
            authored_at,
            not_read,
        }
    }
}

/// One medicine from its `MED` OBX group.
fn read_medication(
    g: &Group<'_, '_, '_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Option<Medication> {
    let Some(code) = g.code(Terminology::Dmd, notes) else {
        e.add(g.path("CODE"), "required: the medicine code");
        return None;
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
    Some(Medication {
        code,
        dose: g.string("DOSE").unwrap_or_default(),
        route: g.string("ROUTE").unwrap_or_default(),
        frequency: g.string("FREQ").unwrap_or_default(),
        supervised: g.yes_no("SUPERVISED", e).unwrap_or(false),
        as_needed: g.yes_no("PRN", e).unwrap_or(false),
        opioid_substitution: g.yes_no("OST", e).unwrap_or(false),
        last_dose_given,
        days_supplied,
    })
}

/// One allergy from its `ALG` OBX group.
fn read_allergy(
    g: &Group<'_, '_, '_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Option<Allergy> {
    let severity = g.one_of(
        "SEV",
        &[
            ("MI", Severity::Mild),
            ("MO", Severity::Moderate),
            ("SV", Severity::Severe),
        ],
        e,
    );
    let Some(substance) = g.code_or_words(Terminology::SnomedCt, notes) else {
        e.add(g.path("CODE"), "required: the allergen code");
        return None;
    };
    Some(Allergy {
        substance,
        reaction: g.string("REACTION"),
        severity,
    })
}

/// One follow-up from its `FU` OBX group.
fn read_follow_up(g: &Group<'_, '_, '_>, e: &mut ValidationErrors) -> FollowUp {
    FollowUp {
        kind: g
            .one_of(
                "KIND",
                &[
                    ("appointment", FollowUpKind::Appointment),
                    ("referral", FollowUpKind::Referral),
                ],
                e,
            )
            .unwrap_or(FollowUpKind::Referral),
        service: g.string("SERVICE").unwrap_or_default(),
        date: optional_when(g.text("DATE").as_deref(), || g.path("DATE"), e),
    }
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
    let substance = code_or_words_from_ce(s.field(3), Terminology::SnomedCt, &s.name(3), notes);
    let Some(substance) = substance else {
        e.add(
            format!("{}.1", s.name(3)),
            "required: the allergen code (or its words in .2)",
        );
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

/// A DG1 segment, and whether DG1-21 deletes it. DG1-6 follows HL7 table
/// 0052: `A` admitting, `W` working, `F` final. None of them says a
/// diagnosis is resolved, so every DG1 is an active diagnosis; a resolved
/// one is marked by a `DX-ACTIVE` OBX whose sub-ID is the DG1's set ID.
/// DG1-21 follows table 0206: `A` add, `U` update, `X` no change, `D`
/// delete.
fn read_dg1(
    s: &Segment<'_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Option<(Diagnosis, bool)> {
    if !matches!(&*s.comp(6, 1), "" | "A" | "W" | "F") {
        e.add(s.name(6), "must be A, W or F (HL7 table 0052)");
    }
    let delete = match &*s.comp(21, 1) {
        "" | "A" | "U" | "X" => false,
        "D" => true,
        _ => {
            e.add(s.name(21), "must be A, D, U or X (HL7 table 0206)");
            false
        }
    };
    let onset = optional_when(Some(&s.comp(5, 1)), || format!("{}.1", s.name(5)), e);
    let code = code_or_words_from_ce(s.field(3), Terminology::SnomedCt, &s.name(3), notes);
    let Some(code) = code else {
        e.add(
            format!("{}.1", s.name(3)),
            "required: the diagnosis code (or its words in .2)",
        );
        return None;
    };
    Some((
        Diagnosis {
            code,
            active: true,
            onset,
        },
        delete,
    ))
}

/// One prescription from its `RX` OBX group.
fn read_prescription(
    g: &Group<'_, '_, '_>,
    notes: &mut Vec<String>,
    e: &mut ValidationErrors,
) -> Option<Prescription> {
    let Some(code) = g.code(Terminology::Dmd, notes) else {
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
