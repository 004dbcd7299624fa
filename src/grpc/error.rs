//! Errors of the gRPC layer and their one mapping to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::store::StoreError;

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; each violation names a field and a reason.
    #[error("{}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    /// The caller's certificate names no registered organisation.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not available in this version.
    #[error("{0}")]
    Unimplemented(String),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe(violations: &[FieldViolation]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    format!("invalid request: {}", parts.join("; "))
}

impl ApiError {
    /// One violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::Invalid(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Store(e) => match e {
                StoreError::Conflict => Code::AlreadyExists,
                StoreError::IdentityConflict { .. } => Code::InvalidArgument,
                StoreError::UnknownDelivery
                | StoreError::UnknownHandover
                | StoreError::Removed { .. }
                | StoreError::Shredded { .. }
                | StoreError::NothingToClaim => Code::NotFound,
                StoreError::StaleAttempt { .. }
                | StoreError::LeaseExpired
                | StoreError::NotLeased(_) => Code::FailedPrecondition,
                StoreError::Unavailable(_) => Code::Unavailable,
                StoreError::Corrupt(_)
                | StoreError::Behind { .. }
                | StoreError::Witness(_)
                | StoreError::AuditKey(_) => Code::DataLoss,
                StoreError::Sled(_) | StoreError::Io(_) => Code::Internal,
            },
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = e.code();
        match e {
            ApiError::Invalid(violations) => {
                let message = describe(&violations);
                Status::with_error_details(
                    code,
                    message,
                    ErrorDetails::with_bad_request(violations),
                )
            }
            ApiError::Store(StoreError::IdentityConflict { field }) => {
                let violation = FieldViolation::new(
                    field,
                    "already linked to a different patient; not merged: an operator must resolve the identity (admin conflicts)",
                );
                Status::with_error_details(
                    code,
                    describe(std::slice::from_ref(&violation)),
                    ErrorDetails::with_bad_request(vec![violation]),
                )
            }
            ApiError::Store(ref inner @ (StoreError::Sled(_) | StoreError::Io(_))) => {
                // Internal detail stays in the log.
                tracing::error!(error = %inner, "store failure");
                Status::new(code, "internal store failure")
            }
            ApiError::Store(
                ref inner @ (StoreError::Removed { .. } | StoreError::Shredded { .. }),
            ) => {
                let reason = match inner {
                    StoreError::Removed { .. } => "REMOVED_UNDER_RETENTION",
                    _ => "CONTENT_REMOVED_UNDER_RETENTION",
                };
                Status::with_error_details(
                    code,
                    inner.to_string(),
                    ErrorDetails::with_error_info(
                        reason,
                        "throughcare",
                        std::collections::HashMap::<String, String>::new(),
                    ),
                )
            }
            other => Status::new(code, other.to_string()),
        }
    }
}
