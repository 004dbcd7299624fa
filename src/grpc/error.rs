//! The one mapping of the use cases' [`Error`] to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::handover::{Error, Kind, describe, scrubbed, withhold_numbers};
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

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(e.kind());
        let reason = e.reason();
        let retry = e.retry_after();
        match e {
            Error::Invalid(violations) => {
                let violations: Vec<_> = violations.into_iter().map(scrubbed).collect();
                let message = describe(&violations);
                let wire = violations
                    .into_iter()
                    .map(|v| FieldViolation::new(v.field, v.description))
                    .collect();
                status(code, message, reason, retry, wire)
            }
            Error::Store(StoreError::IdentityConflict { field }) => {
                let violation = crate::clinical::Violation {
                    field: field.into(),
                    description: "already linked to a different patient; not merged: an operator must resolve the identity (admin conflicts)".into(),
                };
                let message = describe(std::slice::from_ref(&violation));
                let wire = FieldViolation::new(violation.field, violation.description);
                status(code, message, reason, retry, vec![wire])
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
