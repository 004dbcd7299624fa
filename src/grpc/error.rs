//! The one mapping of the use cases' [`Error`] to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::handover::{
    Error, Kind, MAX_DESCRIPTION_CHARS, MAX_FIELD_CHARS, cut, describe, scrubbed, withhold_numbers,
};
use crate::store::StoreError;

/// The refusals of the gRPC edge are the use cases' refusals.
pub type ApiError = Error;

/// The gRPC code for an error kind.
#[must_use]
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::InvalidArgument => Code::InvalidArgument,
        Kind::Unauthenticated => Code::Unauthenticated,
        Kind::PermissionDenied => Code::PermissionDenied,
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::FailedPrecondition => Code::FailedPrecondition,
        Kind::ResourceExhausted => Code::ResourceExhausted,
        Kind::Unavailable => Code::Unavailable,
        Kind::DataLoss => Code::DataLoss,
        Kind::Internal => Code::Internal,
    }
}

/// `google.rpc.ErrorInfo.domain` of every error the gateway gives.
pub const ERROR_DOMAIN: &str = "throughcare.v1";

/// The `ErrorInfo` every refusal carries: the stable reason, in our domain.
fn details(reason: &str) -> ErrorDetails {
    ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    )
}

/// A status with `ErrorInfo` (the reason), `RetryInfo` when the error says
/// when to try again, and `BadRequest` when there are violations.
#[must_use]
pub fn status(
    code: Code,
    message: String,
    reason: &str,
    retry: Option<std::time::Duration>,
    violations: Vec<FieldViolation>,
) -> Status {
    let mut d = details(reason);
    if let Some(after) = retry {
        d.set_retry_info(Some(after));
    }
    if !violations.is_empty() {
        d.set_bad_request(violations);
    }
    Status::with_error_details(code, message, d)
}

/// `status` with one more `ErrorInfo.metadata` entry.
fn with_metadata(status: Status, (key, value): (&str, String)) -> Status {
    let mut details = status.get_error_details();
    if let Some(info) = details.error_info() {
        let mut info = info.clone();
        info.metadata.insert(key.to_owned(), value);
        details.set_error_info(info.reason, info.domain, info.metadata);
    }
    Status::with_error_details(status.code(), status.message(), details)
}

/// At most this many field violations are answered (the first found), each
/// field path and description cut to the lengths below, and the message
/// names the first few: grpc-core clients refuse trailers over 8 to 16 KiB
/// (the message travels twice, in `grpc-message` and in the details), and
/// would see `RESOURCE_EXHAUSTED` instead of the refusal. The total is in
/// `ErrorInfo.metadata["violations"]`.
const MAX_VIOLATIONS: usize = crate::handover::MAX_DESCRIBED;
const MAX_IN_MESSAGE: usize = 3;

/// `INVALID_ARGUMENT` with the first [`MAX_VIOLATIONS`] violations, bounded.
fn invalid(code: Code, reason: &str, violations: Vec<crate::clinical::Violation>) -> Status {
    let total = violations.len();
    let shown: Vec<_> = violations
        .into_iter()
        .take(MAX_VIOLATIONS)
        .map(|v| {
            let v = scrubbed(v);
            crate::clinical::Violation {
                field: cut(v.field, MAX_FIELD_CHARS),
                description: cut(v.description, MAX_DESCRIPTION_CHARS),
            }
        })
        .collect();
    let in_message = &shown[..shown.len().min(MAX_IN_MESSAGE)];
    let mut message = describe(in_message);
    if total > in_message.len() {
        message.push_str(&format!(
            "; and {} more (the first {} are in BadRequest)",
            total - in_message.len(),
            shown.len()
        ));
    }
    let mut d = ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        std::collections::HashMap::from([("violations".to_owned(), total.to_string())]),
    );
    d.set_bad_request(
        shown
            .into_iter()
            .map(|v| FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(code, message, d)
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(e.kind());
        let reason = e.reason();
        let retry = e.retry_after();
        match e {
            Error::Invalid(violations) => invalid(code, reason, violations),
            Error::Store(StoreError::IdentityConflict { field }) => {
                let violation = crate::clinical::Violation {
                    field: field.into(),
                    description: "already linked to a different patient; not merged: an operator must resolve the identity (admin conflicts)".into(),
                };
                let message = describe(std::slice::from_ref(&violation));
                // FAILED_PRECONDITION's own detail (google.rpc.PreconditionFailure,
                // AIP-193), and the field violation clients read since v1.
                let failed = tonic_types::PreconditionViolation::new(
                    reason,
                    violation.field.clone(),
                    violation.description.clone(),
                );
                let wire = FieldViolation::new(violation.field, violation.description);
                let mut d =
                    status(code, message.clone(), reason, retry, vec![wire]).get_error_details();
                d.set_precondition_failure(vec![failed]);
                Status::with_error_details(code, message, d)
            }
            // What a client needs to decide, in a field, not only in words:
            // the attempt it should ack now, or the state the delivery is in
            // (as AckBatch's results give them).
            Error::Store(ref inner @ StoreError::StaleAttempt { current, .. }) => {
                let meta = ("current_attempt", current.to_string());
                let message = withhold_numbers(&inner.to_string());
                with_metadata(status(code, message, reason, retry, Vec::new()), meta)
            }
            Error::Store(ref inner @ StoreError::NotLeased(state)) => {
                let name = super::wire::state_to_wire(state).as_str_name().to_owned();
                let message = withhold_numbers(&inner.to_string());
                with_metadata(
                    status(code, message, reason, retry, Vec::new()),
                    ("state", name),
                )
            }
            Error::Store(ref inner @ (StoreError::Sled(_) | StoreError::Io(_))) => {
                // Internal detail stays in the log.
                tracing::error!(error = %inner, "store failure");
                status(
                    code,
                    "internal store failure".into(),
                    reason,
                    retry,
                    Vec::new(),
                )
            }
            other => status(
                code,
                withhold_numbers(&other.to_string()),
                reason,
                retry,
                Vec::new(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single Ack or Nack refused for its attempt says, in fields, what
    /// AckBatch's results say: the attempt to use now, or the state.
    #[test]
    fn a_refused_ack_names_the_current_attempt_or_the_state_in_error_info() {
        let stale = Status::from(Error::Store(StoreError::StaleAttempt {
            given: 1,
            current: 2,
        }));
        let info = stale.get_details_error_info().unwrap();
        assert_eq!(info.reason, "STALE_ATTEMPT");
        assert_eq!(info.metadata["current_attempt"], "2");
        let done = Status::from(Error::Store(StoreError::NotLeased(
            crate::store::DeliveryState::Quarantined,
        )));
        let info = done.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.metadata["state"].as_str()),
            ("NOT_LEASED", "DELIVERY_STATE_QUARANTINED")
        );
        assert_eq!(done.code(), Code::FailedPrecondition);
    }

    /// However many violations a request has, the answer stays well under
    /// grpc-core's 8 KiB soft limit on trailers, lists the first ones and
    /// counts them all.
    #[test]
    fn a_refusal_with_thousands_of_violations_stays_small() {
        let mut v = crate::clinical::ValidationErrors::default();
        for i in 0..5_000 {
            v.add(
                format!("destinations[{i}]{}", ".x".repeat(200)),
                "d".repeat(1_000),
            );
        }
        let s = Status::from(Error::Invalid(v.0));
        assert_eq!(s.code(), Code::InvalidArgument);
        let bad = s.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS);
        assert!(bad.field_violations[0].field.starts_with("destinations[0]"));
        assert_eq!(
            s.get_details_error_info().unwrap().metadata["violations"],
            "5000"
        );
        let size = s.message().len() + s.details().len() * 4 / 3;
        assert!(size < 6 * 1024, "{size} bytes of trailers");
        assert!(s.message().contains("and 4997 more"), "{}", s.message());
    }

    fn info(s: &Status) -> (String, String) {
        let i = s.get_details_error_info().expect("ErrorInfo");
        (i.reason, i.domain)
    }

    #[test]
    fn every_status_carries_its_reason_and_retry_where_a_wait_helps() {
        let invalid = Status::from(Error::invalid("a.b", "why"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(
            info(&invalid),
            ("INVALID_ARGUMENT".into(), ERROR_DOMAIN.into())
        );
        let bad = invalid.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "a.b");
        assert_eq!(
            invalid.get_details_error_info().unwrap().metadata["violations"],
            "1"
        );
        assert!(invalid.get_details_retry_info().is_none());

        let stale = Status::from(Error::Store(StoreError::StaleAttempt {
            given: 1,
            current: 2,
        }));
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert_eq!(info(&stale).0, "STALE_ATTEMPT");
        let expired = Status::from(Error::Store(StoreError::LeaseExpired));
        assert_eq!(info(&expired).0, "LEASE_EXPIRED");

        for unavailable in [Error::ShuttingDown, Error::Unrecorded] {
            let s = Status::from(unavailable);
            assert_eq!(s.code(), Code::Unavailable);
            assert!(s.get_details_retry_info().is_some(), "{s:?}");
        }
        let locked = Status::from(Error::ClaimsLocked {
            scope: "practice",
            window_hours: 24,
            retry_after: std::time::Duration::from_secs(600),
            patient_key: "p".into(),
        });
        assert_eq!(locked.code(), Code::ResourceExhausted);
        assert_eq!(info(&locked).0, "CLAIMS_LOCKED");
        let retry = locked.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(std::time::Duration::from_secs(600)));

        let conflict = Status::from(Error::Store(StoreError::IdentityConflict {
            field: "patient.nhs_number",
        }));
        assert_eq!(info(&conflict).0, "IDENTITY_CONFLICT");
        assert_eq!(
            conflict.get_details_bad_request().unwrap().field_violations[0].field,
            "patient.nhs_number"
        );
    }
}
