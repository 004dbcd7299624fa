//! The patient's journey: the registry of organisations, and routing (who
//! must receive what, by when, for each event).
//!
//! The events themselves and the kinds of organisation are domain facts
//! that the clinical formats need too, so they live in `clinical::event`;
//! they are re-exported here so `journey::JourneyEvent` keeps working.
//!
//! This module is pure domain: it knows nothing of gRPC or the store. It
//! imports `clinical`; `clinical` imports nothing from here.

mod registry;
pub mod routing;

pub use crate::clinical::{JourneyEvent, OrgKind};
pub use registry::{
    Format, Organisation, Registry, RegistryError, SharedRegistry, is_mesh_mailbox_id,
};
pub use routing::{Deadlines, Recipient, Route, area_service, deliveries, route};
