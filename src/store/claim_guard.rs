//! What the claim guard (`handover::claim_guard`) reads back from the store at
//! start: the recent failed claims, from the audit trail. The failures are
//! written as ordinary audit entries (durable before the caller is answered),
//! so the counters survive a restart without a tree or a writer job of their
//! own, and a deploy cannot reset them.

use super::records::TreeId;
use super::{SledStore, StoreError};
use crate::audit::AuditEntry;

impl SledStore {
    /// Audit entries with `action` written at or after `since_ms`, newest
    /// first. Reads the trail backwards and stops at the first older entry,
    /// so the cost follows the window, not the trail's length.
    ///
    /// # Errors
    /// Store failures or an undecodable entry.
    pub fn audit_since(&self, action: &str, since_ms: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for value in self.inner.trees[TreeId::Audit as usize]
            .iter()
            .values()
            .rev()
        {
            let entry: AuditEntry =
                serde_json::from_slice(&value?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if entry.at_ms < since_ms {
                break;
            }
            if entry.action == action {
                out.push(entry);
            }
        }
        Ok(out)
    }
}
