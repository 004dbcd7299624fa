//! The gRPC edge: the only module that knows `pb::*` and `tonic::Status`.
//! Wire types are converted to domain commands on the way in (field by
//! field, with field-level violations), handed to the use cases in
//! `crate::handover`, and their answers converted back on the way out.

pub mod call_metrics;
pub mod error;
mod handover;
pub mod limits;
mod metered;
pub mod null;
mod operator;
pub mod summary;
pub mod trace_context;
pub mod wire;

pub use crate::handover::Gateway;
pub use error::ApiError;
pub use handover::HandoverGrpc;
pub use operator::OperatorGrpc;

/// Generated protobuf and gRPC types.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("throughcare.v1");

    /// The encoded file descriptor set, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("throughcare_descriptor");
}

/// A proto enum value's name without its type prefix, for people to read:
/// `JOURNEY_EVENT_RELEASE` reads as `RELEASE`. The wire and JSON keep the
/// full name.
#[must_use]
pub fn enum_label(name: &'static str) -> &'static str {
    const PREFIXES: [&str; 4] = [
        "JOURNEY_EVENT_",
        "DELIVERY_STATE_",
        "ORGANISATION_KIND_",
        "REDRIVE_OUTCOME_",
    ];
    PREFIXES
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}
