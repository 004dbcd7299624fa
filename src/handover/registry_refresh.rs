//! Several gateway nodes on one PostgreSQL database share one registry:
//! an operator's change is made through one node and kept in the store, so
//! every other node reads the store's registry records again at an interval
//! and takes what changed (docs/store-engines.md, Several nodes). Until it
//! does (at most [`REFRESH`]), another node still routes and authorises
//! by what it had.

use std::time::Duration;

use crate::journey::Organisation;
use crate::store::StoreError;

use super::{Gateway, ROUTING_ACTOR};

/// How often a node on PostgreSQL reads the registry again.
pub const REFRESH: Duration = Duration::from_secs(5);

impl Gateway {
    /// Takes the store's registry records that differ from this node's
    /// registry (changed through another node); routes held treatment
    /// copies on when anything changed. Returns how many changed.
    ///
    /// # Errors
    /// Store failures, and a record that does not read.
    pub async fn refresh_registry(&self) -> Result<usize, StoreError> {
        let changed = {
            // Read under the lock: a change this node makes meanwhile is
            // never overwritten by an older copy from the store.
            let _one_at_a_time = self.registry_changes.lock().await;
            let mut changed = 0;
            for raw in self.store.registry_records()? {
                let org: Organisation = serde_json::from_slice(&raw)
                    .map_err(|e| StoreError::Corrupt(format!("registry record: {e}")))?;
                if self.registry.get(&org.ods).as_ref() != Some(&org) {
                    tracing::info!(ods = %org.ods, kind = org.kind.as_str(), active = org.active, "registry changed on another node");
                    self.registry.put(org);
                    changed += 1;
                }
            }
            changed
        };
        if changed > 0 {
            self.route_held_copies(ROUTING_ACTOR).await?;
        }
        Ok(changed)
    }
}
