//! The HL7 `ACK` answering an inbound message (original acknowledgement
//! mode): MSH with the inbound sender and receiver swapped and its version
//! echoed, MSA with the code and the inbound control id, one ERR per error.
//!
//! An ERR names where (ERR-2, an ERL such as `PID^1^3^1^1`), what (ERR-3, a
//! code from HL7 table 0357), how bad (ERR-4, table 0516), the gateway's
//! stable reason (ERR-5, the same word gRPC's `ErrorInfo` carries) and a
//! message for a person (ERR-8) that never quotes the offending value.
//! A message of v2.4 or earlier is answered in its version's shape: ERR-1
//! (ELD: segment, sequence, field, code) only, and the first error's text
//! in MSA-3.

use super::escape::escape;
use super::header::MessageHeader;
use super::write::ts;
use crate::clinical::model::DateTime;
use crate::clinical::violation::Violation;

/// The acknowledgement code of an [`ack`] (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// AA: accepted, and durable.
    Accept,
    /// AE: the message was understood but refused; do not resend it as is.
    Error,
    /// AR: rejected for a reason unrelated to its content (unsupported
    /// type or version, or the gateway cannot store it now: resend later).
    Reject,
}

impl AckCode {
    /// `AA`, `AE` or `AR`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::Accept => "AA",
            AckCode::Error => "AE",
            AckCode::Reject => "AR",
        }
    }
}

/// HL7 table 0357, message error condition codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 100: a segment is missing or out of order.
    SegmentSequence,
    /// 101: a required field is missing.
    RequiredFieldMissing,
    /// 102: a field's value does not read as its type.
    DataType,
    /// 103: a coded value is not in its table.
    TableValueNotFound,
    /// 200: the message type is not supported.
    UnsupportedMessageType,
    /// 201: the trigger event is not supported.
    UnsupportedEventCode,
    /// 202: the processing id is not supported.
    UnsupportedProcessingId,
    /// 203: the version is not supported.
    UnsupportedVersionId,
    /// 205: the key (here the control id) was used for other content.
    DuplicateKeyIdentifier,
    /// 207: the gateway could not process the message (retry later).
    ApplicationInternalError,
}

impl ErrorCode {
    /// The code and its name in table 0357.
    #[must_use]
    pub fn code_and_text(self) -> (u16, &'static str) {
        match self {
            ErrorCode::SegmentSequence => (100, "Segment sequence error"),
            ErrorCode::RequiredFieldMissing => (101, "Required field missing"),
            ErrorCode::DataType => (102, "Data type error"),
            ErrorCode::TableValueNotFound => (103, "Table value not found"),
            ErrorCode::UnsupportedMessageType => (200, "Unsupported message type"),
            ErrorCode::UnsupportedEventCode => (201, "Unsupported event code"),
            ErrorCode::UnsupportedProcessingId => (202, "Unsupported processing id"),
            ErrorCode::UnsupportedVersionId => (203, "Unsupported version id"),
            ErrorCode::DuplicateKeyIdentifier => (205, "Duplicate key identifier"),
            ErrorCode::ApplicationInternalError => (207, "Application internal error"),
        }
    }

    /// The code a violation at `field` with `description` is.
    #[must_use]
    pub fn of_violation(field: &str, description: &str) -> Self {
        let (segment, field_no) = field.split_once('-').unwrap_or((field, ""));
        let segment = segment.split('(').next().unwrap_or_default();
        let field_no = field_no.split(['.', '[']).next().unwrap_or_default();
        match (segment, field_no) {
            ("MSH", "9") if description.contains("trigger") => ErrorCode::UnsupportedEventCode,
            ("MSH", "9") => ErrorCode::UnsupportedMessageType,
            ("MSH", "11") => ErrorCode::UnsupportedProcessingId,
            ("MSH", "12") => ErrorCode::UnsupportedVersionId,
            // A whole segment missing (`PID`: required) is a sequence error.
            (_, "") if super::segment::is_segment_id(segment) => ErrorCode::SegmentSequence,
            _ if description.starts_with("required") || description.contains(" needs ") => {
                ErrorCode::RequiredFieldMissing
            }
            _ if field.starts_with("segment") || field == "MSH" => ErrorCode::SegmentSequence,
            _ if description.contains("HL7 table") || description.starts_with("must be one of") => {
                ErrorCode::TableValueNotFound
            }
            _ => ErrorCode::DataType,
        }
    }
}

/// One ERR segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// ERR-2, an ERL (`PID^1^3^1^1`); empty when the error has no place in
    /// the message (a routing rule, the store).
    pub location: String,
    /// ERR-3.
    pub code: ErrorCode,
    /// ERR-5: the gateway's stable machine reason (`INVALID_ARGUMENT`, ...).
    pub reason: &'static str,
    /// ERR-8: for a person; never the offending value.
    pub message: String,
}

impl AckError {
    /// The ERR of a field violation (`PID-3[1].1` becomes `PID^1^3^1^1`).
    #[must_use]
    pub fn of_violation(v: &Violation, reason: &'static str) -> Self {
        AckError {
            location: error_location(&v.field),
            code: ErrorCode::of_violation(&v.field, &v.description),
            reason,
            message: format!("{}: {}", v.field, v.description),
        }
    }
}

/// Whether `version` is before v2.5, whose ERR has only ERR-1.
fn before_2_5(version: &str) -> bool {
    matches!(version, "2.1" | "2.2" | "2.3" | "2.3.1" | "2.4")
}

/// Text echoed into an ACK with every control character (C0, DEL, C1) as
/// an HL7 hexadecimal escape of its UTF-8 bytes, so that nothing from the
/// inbound message can drive the sender's log or terminal. An escape
/// sequence the cut left open is dropped.
fn printable(text: &str) -> String {
    let text = match text.matches('\\').count() % 2 {
        0 => text,
        _ => &text[..text.rfind('\\').unwrap_or(text.len())],
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str("\\X");
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("{b:02X}"));
            }
            out.push('\\');
        } else {
            out.push(c);
        }
    }
    out
}

/// Builds the ACK answering `inbound` (its MSH as read; `None` when the
/// message had no readable MSH): MSH, MSA, one ERR per error, each segment
/// ended by a carriage return, ready for an MLLP frame. In enhanced mode it
/// is the commit acknowledgement (CA, CE, CR).
#[must_use]
pub fn ack(
    inbound: Option<&MessageHeader>,
    code: AckCode,
    errors: &[AckError],
    at: &DateTime,
) -> String {
    ack_as(
        inbound,
        code,
        errors,
        at,
        inbound.is_some_and(MessageHeader::enhanced),
    )
}

/// [`ack`], as a commit acknowledgement (CA, CE, CR) or, with `commit`
/// false, an application acknowledgement (AA, AE, AR): what enhanced mode
/// sends as MSH-16 asks when MSH-15 asks for no commit acknowledgement.
#[must_use]
pub fn ack_as(
    inbound: Option<&MessageHeader>,
    code: AckCode,
    errors: &[AckError],
    at: &DateTime,
    commit: bool,
) -> String {
    let blank = MessageHeader::default();
    let h = inbound.unwrap_or(&blank);
    let or = |v: &str, default: &'static str| {
        if v.is_empty() {
            default.to_owned()
        } else {
            v.to_owned()
        }
    };
    let token = |v: &str, max: usize| {
        !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    };
    let version = if super::header::VERSIONS.contains(&h.version.as_str()) {
        h.version.as_str()
    } else {
        "2.5.1"
    };
    // MSH-9's third component (the message structure) arrived with v2.3.1.
    // With no readable trigger, the structure is still named (`ACK^^ACK`).
    let message_type = match (token(&h.trigger, 3), version) {
        (_, "2.1" | "2.2" | "2.3") if !token(&h.trigger, 3) => "ACK".to_owned(),
        (_, "2.1" | "2.2" | "2.3") => format!("ACK^{}", h.trigger),
        (false, _) => "ACK^^ACK".to_owned(),
        (true, _) => format!("ACK^{}^ACK", h.trigger),
    };
    let processing = if matches!(&*h.processing_id, "P" | "T" | "D") {
        h.processing_id.as_str()
    } else {
        "P"
    };
    let reply_id = uuid::Uuid::new_v4().simple().to_string()[..20].to_owned();
    let mut segs = vec![
        format!(
            "MSH|^~\\&|{}|{}|{}|{}|{}||{message_type}|{reply_id}|{processing}|{version}",
            printable(&or(&h.receiving_application, "THROUGHCARE")),
            printable(&or(&h.receiving_facility, "THROUGHCARE")),
            printable(&h.sending_application),
            printable(&h.sending_facility),
            ts(at),
        ),
        msa(code, commit, &h.control_id, errors, before_2_5(version)),
    ];
    if before_2_5(version) {
        // Those versions' ACK holds at most one ERR: its ERR-1 repeats.
        if !errors.is_empty() {
            let elds: Vec<String> = errors.iter().map(old_eld).collect();
            segs.push(format!("ERR|{}", elds.join("~")));
        }
    } else {
        for e in errors {
            segs.push(err_segment(e));
        }
    }
    // MSH-18 exists from v2.3.
    if !matches!(version, "2.1" | "2.2") && segs.iter().any(|s| !s.is_ascii()) {
        // What it echoes (a sending application's name, say) is written
        // in UTF-8, and an empty MSH-18 would declare ASCII: MSH-13 to
        // MSH-17 stay empty, MSH-18 says so (HL7 table 0211).
        segs[0].push_str("||||||UNICODE UTF-8");
    }
    let mut text = segs.join("\r");
    text.push('\r');
    text
}

/// `text` cut to at most `max` characters (before escaping, so an escape
/// sequence is never cut).
fn cut(text: &str, max: usize) -> &str {
    text.char_indices()
        .nth(max)
        .map_or(text, |(i, _)| &text[..i])
}

/// MSA: the code and the inbound control id; before v2.5, the first
/// error's text in MSA-3 (the only place those versions have for it).
fn msa(code: AckCode, commit: bool, control_id: &str, errors: &[AckError], old: bool) -> String {
    // Enhanced mode: this is the commit (accept) acknowledgement. An AA here
    // already means durable, so the codes are the same decision.
    let code = match (commit, code) {
        (false, c) => c.as_str(),
        (true, AckCode::Accept) => "CA",
        (true, AckCode::Error) => "CE",
        (true, AckCode::Reject) => "CR",
    };
    let mut msa = format!("MSA|{code}|{}", printable(&escape(control_id)));
    if let Some(first) = errors.first().filter(|_| old) {
        msa.push('|');
        msa.push_str(&printable(&escape(cut(&first.message, 60))));
    }
    msa
}

/// ERR-1 (ELD) of an error, for v2.4 and earlier:
/// segment^sequence^field^code, the code's parts as subcomponents.
fn old_eld(e: &AckError) -> String {
    let (number, name) = e.code.code_and_text();
    let mut parts = e.location.split('^');
    let (seg, seq, field) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    format!("{seg}^{seq}^{field}^{number}&{name}&HL70357")
}

fn err_segment(e: &AckError) -> String {
    let (number, name) = e.code.code_and_text();
    format!(
        "ERR||{}|{number}^{name}^HL70357|E|{}^^THROUGHCARE|||{}",
        e.location,
        e.reason,
        printable(&escape(cut(&e.message, 200)))
    )
}

/// `PID-3[1].1` or `OBX(4)-5` as an ERL: segment^sequence^field, then the
/// repetition and component when the path names a component; empty for a
/// path that is not a place in an HL7 message.
pub(super) fn error_location(field: &str) -> String {
    let (seg, rest) = field.split_once('-').unwrap_or((field, ""));
    let (id, seq) = match seg.split_once('(') {
        Some((id, n)) => (id, n.trim_end_matches(')')),
        None => (seg, "1"),
    };
    let number = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    // A whole segment (missing, or one too many) is placed by its id and
    // sequence alone.
    if rest.is_empty() {
        return if super::segment::is_segment_id(id) && number(seq) {
            format!("{id}^{seq}")
        } else {
            String::new()
        };
    }
    let (field_no, comp) = rest.split_once('.').unwrap_or((rest, ""));
    let (field_no, rep) = match field_no.split_once('[') {
        Some((f, r)) => (f, Some(r.trim_end_matches(']'))),
        None => (field_no, None),
    };
    let segment_id = super::segment::is_segment_id(id) && number(seq) && number(field_no);
    if !segment_id || !(comp.is_empty() || number(comp)) || !rep.is_none_or(number) {
        return String::new();
    }
    match (rep, comp) {
        (None, "") => format!("{id}^{seq}^{field_no}"),
        (Some(rep), "") => format!("{id}^{seq}^{field_no}^{rep}"),
        (rep, comp) => format!("{id}^{seq}^{field_no}^{}^{comp}", rep.unwrap_or("1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime {
        "2026-11-24T08:10:00Z".parse().unwrap()
    }

    fn inbound(version: &str) -> MessageHeader {
        super::super::header(
            format!("MSH|^~\\&|PAS|YP001|TC|GW|20261124080000||ADT^A03^ADT_A03|c-9|P|{version}")
                .as_bytes(),
        )
        .unwrap()
    }

    fn fields(ack: &str, seg: &str) -> Vec<String> {
        let line = ack.split('\r').find(|l| l.starts_with(seg)).unwrap();
        line.split('|').map(str::to_owned).collect()
    }

    #[test]
    fn the_ack_answers_its_message() {
        let error = AckError::of_violation(
            &Violation {
                field: "PID-7".into(),
                description: "required: date of birth YYYYMMDD".into(),
            },
            "INVALID_ARGUMENT",
        );
        let text = ack(
            Some(&inbound("2.5.1")),
            AckCode::Error,
            std::slice::from_ref(&error),
            &at(),
        );
        assert!(text.ends_with('\r') && !text.contains('\n'));
        let msh = fields(&text, "MSH");
        assert_eq!(&msh[2..6], ["TC", "GW", "PAS", "YP001"]);
        assert_eq!(msh[8], "ACK^A03^ACK");
        assert_eq!((msh[10].as_str(), msh[11].as_str()), ("P", "2.5.1"));
        assert_eq!(msh[9].len(), 20);
        assert_eq!(fields(&text, "MSA")[1..], ["AE", "c-9"]);
        let err = fields(&text, "ERR");
        assert_eq!(err[1], "");
        assert_eq!(err[2], "PID^1^7");
        assert_eq!(err[3], "101^Required field missing^HL70357");
        assert_eq!(err[4], "E");
        assert_eq!(err[5], "INVALID_ARGUMENT^^THROUGHCARE");
        assert!(err[8].starts_with("PID-7: required"), "{err:?}");
        // v2.3: its own shape, ERR-1 and MSA-3.
        let old = ack_v(&error, "2.3");
        assert_eq!(fields(&old, "MSH")[11], "2.3");
        assert_eq!(
            fields(&old, "ERR"),
            ["ERR", "PID^1^7^101&Required field missing&HL70357"]
        );
        assert!(fields(&old, "MSA")[3].starts_with("PID-7"));
        // Nothing readable: still an answer, in 2.5.1, from the gateway.
        let bare = ack(None, AckCode::Reject, &[], &at());
        assert_eq!(&fields(&bare, "MSH")[2..4], ["THROUGHCARE", "THROUGHCARE"]);
        assert_eq!(fields(&bare, "MSH")[8], "ACK^^ACK");
        assert_eq!(fields(&bare, "MSA")[1..], ["AR", ""]);
        // A version that is not one is not echoed.
        assert_eq!(fields(&ack_v(&error, "2.5 beta"), "MSH")[11], "2.5.1");
    }

    fn ack_v(error: &AckError, version: &str) -> String {
        ack(
            Some(&inbound(version)),
            AckCode::Error,
            std::slice::from_ref(error),
            &at(),
        )
    }

    #[test]
    fn old_versions_get_their_own_shape_and_nothing_echoed_raw() {
        let errors = [
            AckError::of_violation(
                &Violation {
                    field: "PID-7".into(),
                    description: "required: date of birth".into(),
                },
                "INVALID_ARGUMENT",
            ),
            AckError::of_violation(
                &Violation {
                    field: "PID-8".into(),
                    description: "must be M, F, O or U (HL7 table 0001)".into(),
                },
                "INVALID_ARGUMENT",
            ),
        ];
        let v24 = ack(Some(&inbound("2.4")), AckCode::Error, &errors, &at());
        let errs: Vec<&str> = v24.split('\r').filter(|l| l.starts_with("ERR")).collect();
        assert_eq!(
            errs,
            [
                "ERR|PID^1^7^101&Required field missing&HL70357~PID^1^8^103&Table value not found&HL70357"
            ],
            "v2.4 and earlier: one ERR, its ERR-1 repeated"
        );
        let v23 = ack(Some(&inbound("2.3")), AckCode::Accept, &[], &at());
        assert_eq!(
            fields(&v23, "MSH")[8],
            "ACK^A03",
            "no structure before 2.3.1"
        );
        let v231 = ack(Some(&inbound("2.3.1")), AckCode::Accept, &[], &at());
        assert_eq!(fields(&v231, "MSH")[8], "ACK^A03^ACK");
        assert_eq!(fields(&ack_v(&errors[0], "2.abc"), "MSH")[11], "2.5.1");

        let hostile = super::super::header(
            "MSH|^~\\&|PAS\u{7}\u{1b}[2J|YP001|TC|GW|20261124080000||ADT^A03^ADT_A03|c\u{0}9|P|2.5.1"
                .as_bytes(),
        )
        .unwrap();
        let text = ack(Some(&hostile), AckCode::Accept, &[], &at());
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\r'),
            "{text:?}"
        );
        assert_eq!(fields(&text, "MSH")[4], "PAS\\X07\\\\X1B\\[2J");
        assert_eq!(fields(&text, "MSA")[2], "c\\X00\\9");
        // An escape the echo limit cut open is dropped, not echoed half.
        assert_eq!(printable("ABC\\T"), "ABC");
        assert_eq!(printable("A\\T\\B"), "A\\T\\B");
    }

    #[test]
    fn codes_come_from_table_0357() {
        let code = |f: &str, d: &str| ErrorCode::of_violation(f, d).code_and_text().0;
        assert_eq!(code("PID-7", "required: date of birth"), 101);
        assert_eq!(code("PID-8", "must be M, F (HL7 table 0001)"), 103);
        assert_eq!(code("DG1(2)-5", "must be a date"), 102);
        assert_eq!(code("MSH-9.1", "the message type must be ADT"), 200);
        assert_eq!(code("MSH-9.2", "the trigger event must be A01"), 201);
        assert_eq!(code("MSH-11", "only production"), 202);
        assert_eq!(code("MSH-12", "must be an HL7 v2 version"), 203);
        assert_eq!(code("MSH", "must start with MSH"), 100);
        assert_eq!(code("PID", "required"), 100, "a missing segment");
        assert_eq!(code("PID(2)", "given more than once"), 100, "a second PID");
        assert_eq!(code("PV1-45", "a release needs the release date"), 101);
        assert_eq!(
            code("MSH-10", "must be at most 128 printable ASCII characters"),
            102,
            "\"printable\" holds \"table\" but names no table"
        );
        assert_eq!(code("OBX(3)-5", "must be Y or N (HL7 table 0136)"), 103);
        assert_eq!(code("OBX(3)-5", "must be one of given, refused"), 103);
    }
}
