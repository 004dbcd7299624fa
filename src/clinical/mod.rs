//! Clinical content: identifiers and (later) the canonical summary model.
//!
//! Pure domain: imports no tonic, prost or sled.

mod identifiers;

pub use identifiers::{IdentifierError, NhsNumber, OdsCode, PrisonNumber};
