//! Removing audit entries older than the audit period, from the head of the
//! chain, so that what is left still verifies (see `crate::audit`, "Removing
//! old entries").
//!
//! Each retention pass removes, in its own transaction, the oldest committed
//! entries written before `now - audit_ms` (at most
//! [`super::retention::AUDIT_PER_HANDOVER`] × batch), stopping at the first
//! younger one. With them it writes a new [`SignedAuditCut`] (first entry
//! kept, hash of the last removed) to `meta` and an `audit_prune` entry that
//! says what went. Two entries are never removed: anything at or after the
//! one the witness durably anchors (a restart checks that entry), and
//! anything younger than the period, even behind an older one (a clock
//! stepped back).

use super::super::StoreError;
use super::super::integrity;
use super::super::records::{self, TreeId};
use super::retention::{AUDIT_PER_HANDOVER, RetentionOutcome};
use super::{Staged, Writer};
use crate::audit::{AuditCut, AuditEntry, AuditEvent, SignedAuditCut};

const ACTOR: &str = "urn:gateway:retention";

impl Writer {
    /// The retention cut as `staged` leaves it.
    pub(super) fn audit_cut(
        &self,
        staged: &Staged<'_>,
    ) -> Result<Option<SignedAuditCut>, StoreError> {
        match staged.get(TreeId::Meta, records::META_AUDIT_CUT)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("audit retention cut: {e}"))),
            None => integrity::audit_cut(&self.trees[TreeId::Meta as usize]),
        }
    }

    /// Removes (a batch of) the audit entries past the audit period and
    /// moves the signed cut after them.
    pub(super) fn prune_audit(
        &mut self,
        staged: &mut Staged<'_>,
        now: i64,
        out: &mut RetentionOutcome,
    ) -> Result<(), StoreError> {
        let before = now.saturating_sub(self.options.retention.audit_ms);
        // A restart checks the entry the witness anchors: it stays.
        let anchored = self
            .anchored_audit_seq
            .load(std::sync::atomic::Ordering::Acquire);
        let limit = self
            .options
            .retention
            .batch
            .max(1)
            .saturating_mul(AUDIT_PER_HANDOVER);
        let mut removed: Option<(u64, AuditEntry)> = None;
        for kv in self.trees[TreeId::Audit as usize].iter() {
            let (key, value) = kv?;
            let entry: AuditEntry = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
            if entry.at_ms >= before || entry.seq >= anchored {
                break;
            }
            if out.audit_removed == limit {
                out.backlog = true;
                break;
            }
            staged.del(TreeId::Audit, key.to_vec());
            out.audit_removed += 1;
            let first = removed.as_ref().map_or(entry.seq, |(first, _)| *first);
            removed = Some((first, entry));
        }
        let Some((first, last)) = removed else {
            return Ok(());
        };
        self.write_cut(staged, first, &last, before, now);
        Ok(())
    }

    /// Records the cut after `last` (signed, in `meta`) and audits it.
    fn write_cut(
        &mut self,
        staged: &mut Staged<'_>,
        first: u64,
        last: &AuditEntry,
        before: i64,
        now: i64,
    ) {
        let cut = AuditCut {
            first_kept: last.seq + 1,
            prev_hash: last.hash.clone(),
            before_ms: before,
            at_ms: now,
            keyed_from: self.keyed_from,
        };
        let signed = cut.sign(&self.audit_key);
        staged.put_json(TreeId::Meta, records::META_AUDIT_CUT.to_vec(), &signed);
        self.audit(
            staged,
            AuditEvent {
                actor: ACTOR.into(),
                action: "audit_prune",
                outcome: format!(
                    "ok: audit entries {first} to {} (all written before {}) removed under the retention policy; the trail verifies from entry {} against the signed cut",
                    last.seq,
                    super::super::rfc3339(before),
                    cut.first_kept
                ),
                ..AuditEvent::default()
            },
            now,
        );
    }
}
