//! Field-level validation errors: the one violation type of the domain.
//!
//! A [`Violation`] says where (the field's path in what the caller sent) and
//! what is wrong and why (the description). Clinical parsing and validation,
//! routing (`journey::deliveries`) and the gRPC edge's request checks
//! (`grpc::wire::Violations` is this type) all collect [`ValidationErrors`];
//! the gRPC edge turns them into a `google.rpc.BadRequest` in one place
//! (`grpc/error.rs`), and the HL7 `ACK` into ERR segments.
//!
//! A description never quotes the offending value, which may be patient data.

use std::fmt;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path to the field in the document (`entry[3].resource.identifier[0].value`, `PID-3.1`).
    pub field: String,
    /// What is wrong and why, in words a sender can act on.
    pub description: String,
}

/// Every problem found in a document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationErrors(pub Vec<Violation>);

impl ValidationErrors {
    /// A single violation.
    pub fn one(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut e = Self::default();
        e.add(field, description);
        e
    }

    /// Records a violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Ok when nothing was recorded.
    ///
    /// # Errors
    /// Self, when anything was recorded.
    pub fn into_result(self) -> Result<(), Self> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}
