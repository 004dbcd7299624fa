//! The HL7 `ACK` answering a submitted message: MSA with the code, one ERR
//! (with its error location) per violation.

use super::escape::escape;
use super::write::ts;
use crate::clinical::model::DateTime;
use crate::clinical::violation::Violation;

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
pub(super) fn error_location(field: &str) -> String {
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
