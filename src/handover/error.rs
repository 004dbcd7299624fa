//! The one error type of the use cases, with a stable machine reason per
//! condition. Each edge maps it to its own errors in exactly one place
//! (`grpc::error` for gRPC status codes and `google.rpc.ErrorInfo`).

use std::time::Duration;

use crate::clinical::{ValidationErrors, Violation};
use crate::store::StoreError;

/// Why a use case refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; each violation names a field and a reason.
    #[error("{}", describe(.0))]
    Invalid(Vec<Violation>),
    /// The caller's certificate names no registered organisation.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
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
        retry_after: Duration,
        /// The patient the claim was for (a keyed hash, for the audit
        /// entry; never shown).
        patient_key: String,
    },
    /// The organisation a call acts on is not in the registry.
    #[error("ods_code: no registered organisation has this ODS code")]
    UnknownOrganisation,
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A refusal could not be audited, so it is not given (fail closed).
    #[error("the gateway cannot record this call; retry later")]
    Unrecorded,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ValidationErrors> for Error {
    fn from(e: ValidationErrors) -> Self {
        Error::Invalid(e.0)
    }
}

/// The kind of answer an error is, for any edge: gRPC maps it to a status
/// code, another edge to its own refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The caller must change its request.
    InvalidArgument,
    /// Who the caller is is unknown.
    Unauthenticated,
    /// The caller may not do this.
    PermissionDenied,
    /// The thing named does not exist (or is not the caller's).
    NotFound,
    /// The message id was used for other content.
    AlreadyExists,
    /// The call does not apply in the current state (a stale attempt).
    FailedPrecondition,
    /// A limit is reached for a while.
    ResourceExhausted,
    /// Try again later.
    Unavailable,
    /// Stored data does not check out.
    DataLoss,
    /// A fault of the gateway.
    Internal,
}

impl Error {
    /// One violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::Invalid(vec![Violation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// The kind of answer this is.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Error::Invalid(_) => Kind::InvalidArgument,
            Error::Unauthenticated(_) => Kind::Unauthenticated,
            Error::PermissionDenied(_) => Kind::PermissionDenied,
            Error::ClaimsLocked { .. } => Kind::ResourceExhausted,
            Error::UnknownOrganisation => Kind::NotFound,
            Error::ShuttingDown | Error::Unrecorded => Kind::Unavailable,
            Error::Store(e) => match e {
                StoreError::Conflict | StoreError::Retired { .. } => Kind::AlreadyExists,
                StoreError::IdentityConflict { .. } => Kind::FailedPrecondition,
                StoreError::UnknownDelivery
                | StoreError::UnknownHandover
                | StoreError::Removed { .. }
                | StoreError::Shredded { .. }
                | StoreError::NothingToClaim => Kind::NotFound,
                StoreError::StaleAttempt { .. }
                | StoreError::LeaseExpired
                | StoreError::NotLeased(_) => Kind::FailedPrecondition,
                StoreError::Unavailable(_) => Kind::Unavailable,
                StoreError::Corrupt(_)
                | StoreError::Behind { .. }
                | StoreError::Witness(_)
                | StoreError::AuditKey(_) => Kind::DataLoss,
                StoreError::Sled(_) | StoreError::Io(_) => Kind::Internal,
            },
        }
    }

    /// The stable machine reason (`google.rpc.ErrorInfo.reason` on gRPC):
    /// UPPER_SNAKE_CASE, never renamed once published (docs/integrating.md
    /// lists them). A client branches on this, not on the message.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "INVALID_ARGUMENT",
            Error::Unauthenticated(_) => "UNREGISTERED_CALLER",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::ClaimsLocked { .. } => "CLAIMS_LOCKED",
            Error::UnknownOrganisation => "UNKNOWN_ORGANISATION",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::Unrecorded => "AUDIT_UNAVAILABLE",
            Error::Store(e) => match e {
                StoreError::Conflict => "ALREADY_EXISTS",
                StoreError::Retired { .. } => "MESSAGE_ID_RETIRED",
                StoreError::IdentityConflict { .. } => "IDENTITY_CONFLICT",
                StoreError::UnknownDelivery => "UNKNOWN_DELIVERY",
                StoreError::UnknownHandover => "UNKNOWN_HANDOVER",
                StoreError::Removed { .. } => "REMOVED_UNDER_RETENTION",
                StoreError::Shredded { .. } => "CONTENT_REMOVED_UNDER_RETENTION",
                StoreError::NothingToClaim => "NOTHING_TO_CLAIM",
                StoreError::StaleAttempt { .. } => "STALE_ATTEMPT",
                StoreError::LeaseExpired => "LEASE_EXPIRED",
                StoreError::NotLeased(_) => "NOT_LEASED",
                StoreError::Unavailable(_) => "UNAVAILABLE",
                StoreError::Corrupt(_) => "CORRUPT",
                StoreError::Behind { .. } | StoreError::Witness(_) => "STORE_BEHIND",
                StoreError::AuditKey(_) => "AUDIT_KEY",
                StoreError::Sled(_) | StoreError::Io(_) => "INTERNAL",
            },
        }
    }

    /// How long to wait before trying again, where that is known.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::ClaimsLocked { retry_after, .. } => Some(*retry_after),
            _ if self.kind() == Kind::Unavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

fn scope_words(scope: &str) -> &'static str {
    match scope {
        "practice_and_patient" => "for this patient from this practice",
        "practice" => "from this practice",
        _ => "for this patient",
    }
}

/// At most this many violations are described (the first found), each
/// field path and description cut to the lengths below: a refusal's
/// description goes into the log and the audit trail, and a document can
/// hold as many faults as the message limit allows.
pub const MAX_DESCRIBED: usize = 10;
/// The longest field path and description described, in characters.
pub const MAX_FIELD_CHARS: usize = 100;
/// See [`MAX_FIELD_CHARS`].
pub const MAX_DESCRIPTION_CHARS: usize = 160;

/// `s` cut to `max` characters, an ellipsis marking the cut.
#[must_use]
pub fn cut(s: String, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s,
    }
}

/// `invalid request: field: why; ...`, each violation scrubbed and cut, the
/// first [`MAX_DESCRIBED`] named and the rest counted.
#[must_use]
pub fn describe(violations: &[Violation]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .take(MAX_DESCRIBED)
        .map(|v| {
            let v = scrubbed(v.clone());
            format!(
                "{}: {}",
                cut(v.field, MAX_FIELD_CHARS),
                cut(v.description, MAX_DESCRIPTION_CHARS)
            )
        })
        .collect();
    let mut text = format!("invalid request: {}", parts.join("; "));
    if violations.len() > MAX_DESCRIBED {
        text.push_str(&format!("; and {} more", violations.len() - MAX_DESCRIBED));
    }
    text
}

/// A safety net under every message that leaves the gateway (errors, and so
/// the log lines and audit entries made from them): no message quotes a
/// caller's value on purpose, but a path can carry a caller's JSON key or
/// HL7 segment id, so a run of ten or more digits (an NHS number, grouped
/// or not) is withheld wherever it appears. Ours never have one: the largest
/// number we print is a byte limit.
#[must_use]
pub fn withhold_numbers(text: &str) -> String {
    static NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\d{10,}|\b\d{3}[ \-]\d{3}[ \-]\d{4}\b").expect("a valid pattern")
    });
    NUMBER.replace_all(text, "[number withheld]").into_owned()
}

/// A violation as it leaves: its path made only of path characters (at most
/// 120) and both parts without NHS-number-shaped digits.
#[must_use]
pub fn scrubbed(v: Violation) -> Violation {
    let field: String = v
        .field
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
    Violation {
        field: withhold_numbers(&field),
        description: withhold_numbers(&v.description),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_describes_its_first_violations_cut_and_counts_the_rest() {
        let mut v = ValidationErrors::default();
        for i in 0..100_000 {
            v.add(format!("document.native.medications[{i}].code"), "required");
        }
        v.add("x".repeat(500), "y".repeat(500));
        let text = Error::Invalid(v.0).to_string();
        assert!(text.len() < 2_000, "{} bytes", text.len());
        assert!(
            text.starts_with("invalid request: document.native.medications[0].code: required;")
        );
        assert!(text.ends_with("; and 99991 more"), "{text}");
        let one = describe(&[Violation {
            field: "f".repeat(500),
            description: "d".repeat(500),
        }]);
        assert_eq!(
            one,
            format!(
                "invalid request: {}…: {}…",
                "f".repeat(100),
                "d".repeat(160)
            )
        );
    }

    #[test]
    fn reasons_are_upper_snake_case_and_distinct_per_condition() {
        let errors = [
            Error::invalid("a", "b"),
            Error::Unauthenticated(String::new()),
            Error::PermissionDenied(String::new()),
            Error::ShuttingDown,
            Error::Unrecorded,
            Error::Store(StoreError::Conflict),
            Error::Store(StoreError::LeaseExpired),
            Error::Store(StoreError::StaleAttempt {
                given: 1,
                current: 2,
            }),
            Error::Store(StoreError::UnknownDelivery),
            Error::Store(StoreError::NothingToClaim),
        ];
        let reasons: std::collections::HashSet<&str> = errors.iter().map(Error::reason).collect();
        assert_eq!(reasons.len(), errors.len());
        assert!(
            reasons
                .iter()
                .all(|r| r.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        );
        assert_eq!(
            Error::Store(StoreError::StaleAttempt {
                given: 1,
                current: 2
            })
            .reason(),
            "STALE_ATTEMPT"
        );
    }

    #[test]
    fn unavailable_says_when_to_retry() {
        assert!(Error::ShuttingDown.retry_after().is_some());
        assert!(
            Error::PermissionDenied(String::new())
                .retry_after()
                .is_none()
        );
    }
}
