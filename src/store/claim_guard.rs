//! What the claim guard (`handover::claim_guard`) reads back from the store at
//! start: the recent failed claims, from the audit trail. The failures are
//! written as ordinary audit entries (durable before the caller is answered),
//! so the counters survive a restart without a tree or a writer job of their
//! own, and a deploy cannot reset them.

use super::records::{self, TreeId};
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
        let tree = &self.inner.trees[TreeId::Audit as usize];
        let mut out = Vec::new();
        let (Some((first, _)), Some((last, _))) = (tree.first()?, tree.last()?) else {
            return Ok(out);
        };
        let first = records::from_be(&first).unwrap_or(0);
        let mut end = records::from_be(&last).unwrap_or(0).saturating_add(1);
        // Backwards a run at a time, each run read forwards: sled walks a
        // range forwards leaf to leaf, but each step backwards from the root.
        while end > first {
            let start = end.saturating_sub(RUN).max(first);
            let run = tree
                .range(records::be(start)..records::be(end))
                .values()
                .collect::<Result<Vec<_>, _>>()?;
            for value in run.iter().rev() {
                // Most entries are not the action sought: read only when and
                // what (borrowed, nothing allocated) before decoding one whole.
                let stamp: Stamp<'_> = serde_json::from_slice(value)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if stamp.at_ms < since_ms {
                    return Ok(out);
                }
                if stamp.action == action {
                    out.push(
                        serde_json::from_slice(value)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                }
            }
            end = start;
        }
        Ok(out)
    }
}

/// Audit entries read forwards at a time.
const RUN: u64 = 1_024;

/// When an audit entry was written and its action.
#[derive(serde::Deserialize)]
struct Stamp<'a> {
    at_ms: i64,
    #[serde(borrow)]
    action: std::borrow::Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::audit::AuditEvent;
    use crate::store::{ManualClock, Store, StoreOptions};

    /// Across runs of the backwards read: every entry of the action in the
    /// window, newest first, and nothing from before the first older entry.
    #[tokio::test]
    async fn the_window_is_read_back_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let store = Store::open(
            &dir.path().join("data"),
            StoreOptions::default(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        for i in 0..2_600u32 {
            clock.advance(1);
            let action = if i % 7 == 0 {
                "claim_failure"
            } else {
                "connect"
            };
            store
                .record(AuditEvent {
                    actor: format!("urn:ods:P{i}"),
                    action,
                    outcome: "ok".into(),
                    ..AuditEvent::default()
                })
                .await
                .unwrap();
        }
        // Entries at 1,001 ..= 3,600; the window starts at 1,101.
        let found = store.audit_since("claim_failure", 1_101).unwrap();
        let actors: Vec<u32> = found
            .iter()
            .map(|e| e.actor.trim_start_matches("urn:ods:P").parse().unwrap())
            .collect();
        let expected: Vec<u32> = (100..2_600).rev().filter(|i| i % 7 == 0).collect();
        assert_eq!(actors, expected);
        assert!(
            store
                .audit_since("claim_failure", 9_999)
                .unwrap()
                .is_empty()
        );
        store.close().await.unwrap();
    }
}
