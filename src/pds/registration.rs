//! What PDS found of a patient's GP registration, for a view rendered now
//! (the probation view's "GP registration in place"): a summary sent
//! without a GP may since have been routed to the practice PDS names, or
//! PDS may name a practice that is not on the network (registered all the
//! same). A restricted record yields nothing: its practice is never stored.

use crate::clinical::OdsCode;
use crate::store::{HandoverRecord, PDS_ACTOR, PdsStatus, Store, StoreError};

/// The practice PDS found for `handover`'s patient, if any.
///
/// # Errors
/// Store failures.
pub fn registration_found(
    store: &Store,
    handover: &HandoverRecord,
) -> Result<Option<OdsCode>, StoreError> {
    for id in &handover.deliveries {
        let Some(d) = store.delivery(*id)? else {
            continue;
        };
        if d.claimed_by.as_deref() == Some(PDS_ACTOR) {
            return Ok(d.mailbox.parse().ok());
        }
        let found = d
            .pds
            .filter(|f| matches!(f.status, PdsStatus::Routed | PdsStatus::NotConnected))
            .and_then(|f| f.practice);
        if let Some(code) = found.and_then(|c| c.parse().ok()) {
            return Ok(Some(code));
        }
    }
    Ok(None)
}
