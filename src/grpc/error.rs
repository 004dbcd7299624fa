//! Errors of the gRPC layer and their one mapping to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::clinical::Violation;
use crate::store::StoreError;

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; each violation names a field and a reason
    /// (scrubbed on the way out, see `scrubbed`).
    #[error("{}", describe(pairs(.0)))]
    Invalid(Vec<Violation>),
    /// The caller's certificate names no registered organisation.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not available in this version.
    #[error("{0}")]
    Unimplemented(String),
    /// Too many failed claims: claims of this practice, patient or pair are
    /// refused until `retry_after` has passed (see `claim_guard`).
    #[error(
        "too many failed claims {} in the last {window_hours} h: claims are locked for about {} min; a practice that registered this patient asks the gateway's operators to claim it (OperatorService.ClaimParked, with a reason)",
        scope_words(.scope),
        .retry_after.as_secs().div_ceil(60)
    )]
    ClaimsLocked {
        /// Which counter is full: `practice_and_patient`, `practice` or `patient`.
        scope: &'static str,
        /// The window the counters span, hours.
        window_hours: i64,
        /// When a claim may be tried again.
        retry_after: std::time::Duration,
    },
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn scope_words(scope: &str) -> &'static str {
    match scope {
        "practice_and_patient" => "for this patient from this practice",
        "practice" => "from this practice",
        _ => "for this patient",
    }
}

/// Each violation as (field, description).
fn pairs(violations: &[Violation]) -> impl Iterator<Item = (&str, &str)> {
    violations
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
}

/// The message of an invalid request: every violation, scrubbed.
fn describe<'v>(violations: impl Iterator<Item = (&'v str, &'v str)>) -> String {
    let parts: Vec<String> = violations
        .map(|(field, description)| {
            let v = scrubbed(field, description);
            format!("{}: {}", v.field, v.description)
        })
        .collect();
    format!("invalid request: {}", parts.join("; "))
}

/// A safety net under every message that leaves the gateway (errors, and so
/// the log lines and audit entries made from them): no message quotes a
/// caller's value on purpose, but a path can carry a caller's JSON key or
/// HL7 segment id, so a run of ten or more digits (an NHS number, grouped
/// or not) is withheld wherever it appears. Ours never have one: the largest
/// number we print is a byte limit.
fn withhold_numbers(text: &str) -> String {
    static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\d{10,}|\b\d{3}[ \-]\d{3}[ \-]\d{4}\b").expect("a valid pattern")
    });
    NUMBER.replace_all(text, "[number withheld]").into_owned()
}

/// A violation as it leaves: its path made only of path characters (at most
/// 120) and both parts without NHS-number-shaped digits.
fn scrubbed(field: &str, description: &str) -> FieldViolation {
    let field: String = field
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-[]() ^:/#".contains(c) {
                c
            } else {
                '?'
            }
        })
        .take(120)
        .collect();
    FieldViolation::new(withhold_numbers(&field), withhold_numbers(description))
}

impl ApiError {
    /// One violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::Invalid(vec![Violation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::ClaimsLocked { .. } => Code::ResourceExhausted,
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
                // The domain's violations become a BadRequest here, and only here.
                let violations: Vec<FieldViolation> = pairs(&violations)
                    .map(|(field, description)| scrubbed(field, description))
                    .collect();
                let message = describe(
                    violations
                        .iter()
                        .map(|v| (v.field.as_str(), v.description.as_str())),
                );
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
                    describe(std::iter::once((
                        violation.field.as_str(),
                        violation.description.as_str(),
                    ))),
                    ErrorDetails::with_bad_request(vec![violation]),
                )
            }
            ApiError::ClaimsLocked { retry_after, .. } => Status::with_error_details(
                code,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
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
            other => Status::new(code, withhold_numbers(&other.to_string())),
        }
    }
}
