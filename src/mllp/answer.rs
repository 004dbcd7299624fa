//! One inbound message: read its MSH, submit it through the application
//! layer (the control id is the idempotency key), and build the ACK from
//! what the submit answered, which is only once it is durable.
//!
//! | submit answered | ACK | ERR |
//! |---|---|---|
//! | a receipt (new, or a repeat of the same control id and content) | AA | none |
//! | field violations | AE | one per violation: its place, 101/102/103 |
//! | an unsupported message type, trigger, processing id or version, or no MSH | AR | 200/201/202/203/100 |
//! | the control id used before for other content | AE | `MSH^1^10`, 205 |
//! | a caller that may not send this | AE | 207, ERR-5 `PERMISSION_DENIED` / `UNREGISTERED_CALLER` |
//! | the store cannot take it now (nothing stored) | AR | 207, ERR-5 `UNAVAILABLE` and the like: resend later |

use crate::clinical::hl7v2::{self, AckCode, AckError, ErrorCode, MessageHeader};
use crate::clinical::{JourneyEvent, ValidationErrors};
use crate::handover::{
    Caller, Decoded, Error, Gateway, IncomingDocument, Kind, SubmitCommand, scrubbed,
    withhold_numbers,
};
use crate::operator::metrics::Outcome;

/// What one message was answered.
#[derive(Debug)]
pub struct Answer {
    /// The ACK's text; `None` when the message asks for none (enhanced
    /// mode: neither MSH-15 nor MSH-16 asks for one of this outcome).
    pub ack: Option<String>,
    /// Its MSA-1.
    pub code: AckCode,
    /// The event MSH-9 named, when one we carry.
    pub event: Option<JourneyEvent>,
    /// For the submit metrics.
    pub outcome: Outcome,
}

/// Submits `message` as `caller` and answers it.
pub async fn answer(gateway: &Gateway, caller: &Caller, message: &[u8]) -> Answer {
    // Decoded by MSH-18's character set (Latin-1 to UTF-8) before anything
    // reads it; a set the gateway does not read is refused at MSH-18.
    let decoded = hl7v2::decoded(message);
    let text: &[u8] = decoded.as_deref().unwrap_or(message);
    let header = hl7v2::header(text);
    let event = header.as_ref().and_then(MessageHeader::event);
    let cmd = match &decoded {
        Ok(_) => command(header.as_ref(), text),
        Err(e) => Err(e.clone()),
    };
    let result = gateway.submit(caller, cmd).await;
    let (code, errors, outcome) = match result {
        Ok(receipt) => {
            tracing::info!(
                handover_id = receipt.handover_id,
                duplicate = receipt.duplicate,
                "MLLP message accepted and durable"
            );
            let outcome = if receipt.duplicate {
                Outcome::DUPLICATE
            } else {
                Outcome::OK
            };
            (AckCode::Accept, Vec::new(), outcome)
        }
        Err(e) => {
            tracing::info!(code = ?e.kind(), error = %e, "MLLP message refused");
            // Fail closed: a refusal that cannot be audited is not given.
            let e = match gateway.audit_refusal(caller, "submit", &e).await {
                Ok(()) => e,
                Err(unrecorded) => unrecorded,
            };
            (
                ack_code(&e),
                ack_errors(&e, hl7v2::authored_at_field(text)),
                refused(e.kind()),
            )
        }
    };
    let now = gateway.clock.now_ms();
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    // No readable MSH: an original-mode answer.
    let kind = header
        .as_ref()
        .map_or(Some(false), |h| h.acknowledgement(code == AckCode::Accept));
    let ack = kind.map(|commit| {
        hl7v2::ack_as(
            header.as_ref(),
            code,
            &errors,
            &crate::clinical::model::DateTime(at),
            commit,
        )
    });
    Answer {
        ack,
        code,
        event,
        outcome,
    }
}

/// The ACK for a frame over the size limit (nothing was read or stored):
/// AE (resending the same message can never succeed) naming the message's
/// control id when its head holds a readable MSH.
#[must_use]
pub fn too_large(head: &[u8], max: usize, now: time::OffsetDateTime) -> String {
    let error = AckError {
        location: String::new(),
        code: ErrorCode::ApplicationInternalError,
        reason: "MESSAGE_TOO_LARGE",
        message: format!("the message is over the {max}-byte limit; nothing was stored"),
    };
    hl7v2::ack(
        hl7v2::header(head).as_ref(),
        AckCode::Error,
        &[error],
        &crate::clinical::model::DateTime(now),
    )
}

/// The submit command of a message, or what its MSH gets wrong.
fn command(header: Option<&MessageHeader>, message: &[u8]) -> Decoded<SubmitCommand> {
    let Some(h) = header else {
        return Err(ValidationErrors::one(
            "MSH",
            hl7v2::batch_refusal(message).unwrap_or(
                "the message must start with an MSH segment using the delimiters |^~\\&",
            ),
        ));
    };
    let mut v = ValidationErrors::default();
    if !h.standard_delimiters {
        v.add(
            "MSH-2",
            "only the standard delimiters |^~\\& are read (MSH-1 and MSH-2)",
        );
    }
    let event = h.event();
    if event.is_none() {
        if h.message_type == "ADT" {
            v.add("MSH-9.2", "the trigger event must be A01, A02, A03 or A08");
        } else {
            v.add(
                "MSH-9.1",
                "the message type must be ADT (ADT^A01, ADT^A02, ADT^A03 or ADT^A08)",
            );
        }
    }
    let id = &h.control_id;
    if id.is_empty() {
        v.add(
            "MSH-10",
            "required: the message control id (the key that makes a resend safe)",
        );
    } else if h.control_id_has_components {
        v.add(
            "MSH-10",
            "a single string (ST): a component or repetition separator in it would make \
             different messages one (escape it: \\S\\, \\R\\)",
        );
    } else if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add(
            "MSH-10",
            "must be at most 128 printable ASCII characters without spaces",
        );
    } else if scoped_message_id(h).len() > 128 {
        v.add(
            "MSH-3",
            "too long to scope the control id by: the sending application and MSH-10 together \
             must fit the 128-character message id (MSH-3 written percent-encoded, then `:`)",
        );
    }
    let text = match std::str::from_utf8(message) {
        Ok(text) => Some(text),
        Err(e) => {
            v.add(
                "message",
                format!("not valid UTF-8 (at byte {})", e.valid_up_to()),
            );
            None
        }
    };
    // Both are present exactly when nothing was recorded above.
    let (Some(event), Some(text)) = (event, text) else {
        return Err(v);
    };
    v.into_result()?;
    Ok(SubmitCommand {
        message_id: scoped_message_id(h),
        event,
        patient: None,
        destinations: Vec::new(),
        document: IncomingDocument::Hl7v2(text.to_owned()),
    })
}

/// The submit's message id: MSH-10 is unique only within the sending
/// application that chose it (MSH-3), and one organisation may run several
/// (two engines numbering from 1 would otherwise refuse each other's
/// messages as reused ids). So MSH-3 as written (all its components,
/// percent-encoded) scopes it: `PAS%5E1.2.3%5EISO:<MSH-10>`; MSH-10 alone
/// when MSH-3 is empty.
fn scoped_message_id(h: &MessageHeader) -> String {
    /// Bytes written as themselves: letters, digits, `-`, `.`, `_`.
    const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    if h.sending_application.is_empty() {
        // Never shaped like a scoped key: a `:` (or the `%` that encodes
        // one) in MSH-10 is encoded, so `PAS:7` alone is not MSH-3 `PAS`
        // with MSH-10 `7`.
        return h.control_id.replace('%', "%25").replace(':', "%3A");
    }
    let application = percent_encoding::utf8_percent_encode(&h.sending_application, ENCODED);
    format!("{application}:{}", h.control_id)
}

/// Whether a violation is about the message as a whole (its type,
/// processing id or version), which HL7 rejects (AR) rather than errs (AE).
fn message_level(field: &str) -> bool {
    field == "MSH"
        || ["MSH-9", "MSH-11", "MSH-12"]
            .iter()
            .any(|f| field == *f || field.strip_prefix(f).is_some_and(|r| r.starts_with('.')))
}

/// AA is only for a receipt; AR where resending later (or another
/// message type) is the answer; AE where the message itself must change.
fn ack_code(e: &Error) -> AckCode {
    match e {
        Error::Invalid(vs) if vs.iter().any(|v| message_level(&v.field)) => AckCode::Reject,
        _ => match e.kind() {
            Kind::Unavailable | Kind::Internal | Kind::DataLoss | Kind::ResourceExhausted => {
                AckCode::Reject
            }
            _ => AckCode::Error,
        },
    }
}

/// Where in an ADT message the summary's fields are read from (for the
/// rules checked on the summary, whose paths are the model's); its time
/// from `authored_at` ([`hl7v2::authored_at_field`]).
fn hl7_place(model_path: &str, authored_at: &'static str) -> Option<&'static str> {
    Some(match model_path {
        "summary.authored_at" => authored_at,
        "summary.patient.family_name" => "PID-5.1",
        "summary.patient.date_of_birth" => "PID-7",
        "summary.custody.reception_date" => "PV1-44",
        "summary.custody.transfer_at" => "EVN-6",
        "summary.custody.transfer_to" => "PV1-3.4",
        "summary.custody.release_date" => "PV1-45",
        "summary.custody.release_address" => "PID-11",
        _ => return None,
    })
}

/// The ERR segments of a refusal: never a value from the message. The
/// summary's time was read from `authored_at` (EVN-2 or MSH-7).
fn ack_errors(e: &Error, authored_at: &'static str) -> Vec<AckError> {
    let reason = e.reason();
    let one = |location: &str, code, message: String| {
        vec![AckError {
            location: location.to_owned(),
            code,
            reason,
            message: withhold_numbers(&message),
        }]
    };
    // The edge knows the store's conditions only by their stable reasons.
    match (e, reason) {
        (Error::Invalid(vs), _) => vs
            .iter()
            .map(|v| {
                let mut v = scrubbed(v.clone());
                // A rule on the summary as read names the HL7 field it came from.
                if let Some(place) = hl7_place(&v.field, authored_at) {
                    v.field = place.to_owned();
                }
                AckError::of_violation(&v, reason)
            })
            .collect(),
        (_, "ALREADY_EXISTS") => one(
            "MSH^1^10",
            ErrorCode::DuplicateKeyIdentifier,
            "this message control id was used before for a different message; nothing was stored (send it with a new control id)".into(),
        ),
        (Error::Store(crate::store::StoreError::IdentityConflict { field }), _) => one(
            // The identifiers are in PID-3; a date of birth that does not
            // match the one a prison number came with, in PID-7.
            if field.ends_with("date_of_birth") {
                "PID^1^7"
            } else {
                "PID^1^3"
            },
            ErrorCode::DataType,
            e.to_string(),
        ),
        _ if ack_code(e) == AckCode::Reject => one(
            "",
            ErrorCode::ApplicationInternalError,
            format!("{e}; nothing was stored: resend the message later"),
        ),
        _ => one("", ErrorCode::ApplicationInternalError, e.to_string()),
    }
}

/// The submit metrics' outcome word of a refusal (as gRPC names its codes).
fn refused(kind: Kind) -> Outcome {
    Outcome::refused(match kind {
        Kind::InvalidArgument => "invalid_argument",
        Kind::Unauthenticated => "unauthenticated",
        Kind::PermissionDenied => "permission_denied",
        Kind::NotFound => "not_found",
        Kind::AlreadyExists => "already_exists",
        Kind::FailedPrecondition => "failed_precondition",
        Kind::ResourceExhausted => "resource_exhausted",
        Kind::Unavailable => "unavailable",
        Kind::DataLoss => "data_loss",
        Kind::Internal => "internal",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn a_rule_on_the_summary_names_its_hl7_field() {
        let e = Error::invalid(
            "summary.custody.release_date",
            "a release needs the release date",
        );
        let errs = ack_errors(&e, "EVN-2");
        assert_eq!(errs[0].location, "PV1^1^45");
        assert_eq!(errs[0].code, ErrorCode::RequiredFieldMissing);
        let e = Error::invalid(
            "summary.custody.transfer_to",
            "a transfer needs the receiving prison",
        );
        assert_eq!(ack_errors(&e, "EVN-2")[0].location, "PV1^1^3^1^4");
    }

    #[test]
    fn codes_follow_what_the_sender_must_do() {
        let unavailable = Error::Store(StoreError::Unavailable("closed".into()));
        assert_eq!(ack_code(&unavailable), AckCode::Reject);
        let errs = ack_errors(&unavailable, "EVN-2");
        assert_eq!(errs[0].code, ErrorCode::ApplicationInternalError);
        assert_eq!(errs[0].reason, "UNAVAILABLE");
        assert!(errs[0].message.contains("resend"), "{}", errs[0].message);
        assert_eq!(ack_code(&Error::ShuttingDown), AckCode::Reject);
        assert_eq!(ack_code(&Error::Unrecorded), AckCode::Reject);
        let conflict = Error::Store(StoreError::Conflict);
        assert_eq!(ack_code(&conflict), AckCode::Error);
        assert_eq!(ack_errors(&conflict, "EVN-2")[0].location, "MSH^1^10");
        assert_eq!(
            ack_errors(&conflict, "EVN-2")[0].code,
            ErrorCode::DuplicateKeyIdentifier
        );
        assert_eq!(
            ack_code(&Error::PermissionDenied("x".into())),
            AckCode::Error
        );
        assert_eq!(
            ack_code(&Error::invalid("PID-7", "required: date of birth")),
            AckCode::Error
        );
        let version = Error::invalid("MSH-12", "must be an HL7 v2 version");
        assert_eq!(ack_code(&version), AckCode::Reject);
        assert_eq!(
            ack_errors(&version, "EVN-2")[0].code,
            ErrorCode::UnsupportedVersionId
        );
        assert_eq!(
            ack_code(&Error::invalid("MSH-4", "required")),
            AckCode::Error
        );
        assert!(!message_level("MSH-10"));
        assert!(message_level("MSH-9.2"));
    }

    #[test]
    fn the_header_decides_the_command() {
        let h = |m: &[u8]| hl7v2::header(m);
        let field = |m: &[u8]| command(h(m).as_ref(), m).unwrap_err().0[0].field.clone();
        assert_eq!(field(b"PID|1"), "MSH");
        assert_eq!(
            field(b"MSH|^~\\&|A|B|C|D|20261124080000||ORU^R01|c1|P|2.5.1"),
            "MSH-9.1"
        );
        assert_eq!(
            field(b"MSH|^~\\&|A|B|C|D|20261124080000||ADT^A40|c1|P|2.5.1"),
            "MSH-9.2"
        );
        assert_eq!(
            field(b"MSH|^~\\&|A|B|C|D|20261124080000||ADT^A01|||2.5.1"),
            "MSH-10"
        );
        let ok = b"MSH|^~\\&|A|B|C|D|20261124080000||ADT^A03|c1|P|2.5.1";
        let cmd = command(h(ok).as_ref(), ok).unwrap();
        assert_eq!(
            (cmd.message_id.as_str(), cmd.event),
            ("A:c1", JourneyEvent::Release)
        );
    }

    #[test]
    fn the_control_id_is_scoped_by_the_sending_application_as_written() {
        let id = |msh3: &str| {
            let m = format!("MSH|^~\\&|{msh3}|YP001|C|D|20261124080000||ADT^A03|7|P|2.5.1");
            let h = hl7v2::header(m.as_bytes());
            command(h.as_ref(), m.as_bytes()).map(|c| c.message_id)
        };
        assert_eq!(id("").unwrap(), "7");
        assert_eq!(id("PAS").unwrap(), "PAS:7");
        // Every component counts, and no two applications share a scope:
        // the separators and `:` are encoded, so `A:B` is not `A` + `B:`.
        assert_eq!(id("PAS^1.2.3^ISO").unwrap(), "PAS%5E1.2.3%5EISO:7");
        assert_ne!(id("A:B").unwrap(), id("A").unwrap());
        assert_eq!(id("A:B").unwrap(), "A%3AB:7");
        assert_eq!(id("ZOË PAS").unwrap(), "ZO%C3%8B%20PAS:7");
        // Without MSH-3, a control id never looks like a scoped one.
        let bare = |control: &str| {
            let m = format!("MSH|^~\\&||YP001|C|D|20261124080000||ADT^A03|{control}|P|2.5.1");
            let h = hl7v2::header(m.as_bytes());
            command(h.as_ref(), m.as_bytes()).unwrap().message_id
        };
        assert_eq!(bare("PAS:7"), "PAS%3A7");
        assert_ne!(bare("PAS:7"), id("PAS").unwrap());
        assert_ne!(bare("a%3Ab"), bare("a:b"));
        let long = "P".repeat(127);
        assert_eq!(id(&long).unwrap_err().0[0].field, "MSH-3");
    }
}
