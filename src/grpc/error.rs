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
