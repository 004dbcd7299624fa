//! Identity records expire: a patient's identity links (`identities`,
//! `patients`, aliases included) and lineage go once nothing of theirs has
//! been tracked for the metadata period.
//!
//! "Tracked" means a handover record the lineage points at (every accepted
//! submit advances its (patient, sender, event) lineage to itself) or a
//! live, parked or quarantined delivery in the writer's index. When the
//! tracking metadata of a handover is removed and its patient is left with
//! neither, an [`RetentionKind::Identity`] entry is scheduled a metadata
//! period later; at that time the check is made again (a new submit for the
//! patient keeps everything, and its own removal schedules the next check),
//! and a patient merged into another in between is left to that one.
//!
//! Refused identity links (`conflicts`) name no patient: they go a metadata
//! period after the refusal, oldest first (the tree is keyed by the audit
//! sequence of the refusal, so in time order).
//!
//! A store whose handovers were removed before identities expired has
//! lineage pointing at nothing and no check scheduled: a one-off look
//! through the lineage (a batch a pass, [`META_IDENTITY_BACKFILL`]) schedules
//! one for each such patient.

use super::super::StoreError;
use super::super::records::{
    self, HandoverRecord, IdentityConflict, PatientRecord, RetentionKind, TreeId,
};
use super::retention::RetentionOutcome;
use super::{Staged, Writer};
use crate::audit::AuditEvent;

const ACTOR: &str = "urn:gateway:retention";

/// Meta key of the one-off look through the lineage: `0` ++ the last
/// lineage key looked at while under way, `1` once done.
pub(in crate::store) const META_IDENTITY_BACKFILL: &[u8] = b"identity_backfill";

/// Longest chain of merges followed to find where a patient key went.
const MAX_MERGES: usize = 16;

impl Writer {
    /// Called when `h`'s tracking metadata has been removed: schedules its
    /// patient's identity to expire when nothing of theirs is tracked now.
    pub(super) fn handover_forgotten(
        &mut self,
        staged: &mut Staged<'_>,
        h: &HandoverRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        let patient = current_key(staged, &h.patient_key)?;
        if self.tracks_anything(staged, &patient)? {
            return Ok(());
        }
        let due = now.saturating_add(self.options.retention.metadata_ms);
        self.schedule_retention_of(
            staged,
            due,
            RetentionKind::Identity,
            h.id,
            patient.into_bytes(),
        );
        Ok(())
    }

    /// Whether a handover the patient's lineage points at is still held, or
    /// a delivery of theirs is live, parked or quarantined.
    fn tracks_anything(&self, staged: &Staged<'_>, patient: &str) -> Result<bool, StoreError> {
        if !self.deliveries_of(patient).is_empty() {
            return Ok(true);
        }
        for (_, value) in staged.scan_prefix(TreeId::Lineage, &lineage_prefix(patient))? {
            let id = records::from_be(&value).unwrap_or(0);
            if staged.get(TreeId::Handovers, &records::be(id))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes the identity links and lineage of `patient` and of every key
    /// merged into it, if nothing of theirs is tracked; whether it did.
    pub(super) fn expire_identity(
        &mut self,
        staged: &mut Staged<'_>,
        patient: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        // A check scheduled under a key merged since is the patient's now.
        let patient = &current_key(staged, patient)?;
        let record: PatientRecord = staged
            .get_json(TreeId::Patients, patient.as_bytes())?
            .unwrap_or_default();
        if record.merged_into.is_some() || self.tracks_anything(staged, patient)? {
            return Ok(false);
        }
        let mut removed = 0u64;
        for key in std::iter::once(patient.to_owned()).chain(record.aliases) {
            removed += forget_patient(staged, &key, patient)?;
        }
        if removed == 0 {
            return Ok(false);
        }
        self.retention.identity_removed += removed;
        self.audit(
            staged,
            AuditEvent {
                actor: ACTOR.into(),
                action: "identity_expire",
                patient_key: Some(patient.to_owned()),
                outcome: "ok: identity links and lineage removed under the retention policy (nothing tracked for the metadata period)".into(),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(true)
    }

    /// Removes (a batch of) refused identity links older than the metadata
    /// period.
    pub(super) fn expire_conflicts(
        &mut self,
        staged: &mut Staged<'_>,
        now: i64,
        out: &mut RetentionOutcome,
    ) -> Result<(), StoreError> {
        let before = now.saturating_sub(self.options.retention.metadata_ms);
        let batch = self.options.retention.batch.max(1);
        for kv in self.trees[TreeId::Conflicts as usize].iter() {
            let (key, value) = kv?;
            let conflict: IdentityConflict = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Corrupt(format!("identity conflict: {e}")))?;
            if conflict.at_ms > before {
                break;
            }
            if out.conflicts_removed == batch {
                out.backlog = true;
                break;
            }
            staged.del(TreeId::Conflicts, key.to_vec());
            out.conflicts_removed += 1;
        }
        self.retention.identity_removed += out.conflicts_removed as u64;
        Ok(())
    }
}

impl Writer {
    /// Looks at (a batch of) the lineage once: a patient whose lineage
    /// points only at removed handovers, with nothing live, gets an identity
    /// check a metadata period from now.
    pub(super) fn backfill_identities(
        &mut self,
        staged: &mut Staged<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let cursor = staged.get(TreeId::Meta, META_IDENTITY_BACKFILL)?;
        let after = match cursor.as_deref() {
            Some([1]) => return Ok(()),
            Some([0, last @ ..]) => std::ops::Bound::Excluded(last.to_vec()),
            _ => std::ops::Bound::Unbounded,
        };
        let batch = self.options.retention.batch.max(1);
        let mut seen = std::collections::BTreeSet::new();
        let mut last = None;
        for kv in self.trees[TreeId::Lineage as usize]
            .range::<Vec<u8>, _>((after, std::ops::Bound::Unbounded))
            .take(batch)
        {
            let (key, value) = kv?;
            let id = records::from_be(&value).unwrap_or(0);
            let patient = key.split(|b| *b == 0).next().unwrap_or_default();
            let patient = String::from_utf8_lossy(patient).into_owned();
            if staged.get(TreeId::Handovers, &records::be(id))?.is_none()
                && seen.insert(patient.clone())
                && !self.tracks_anything(staged, &patient)?
            {
                let due = now.saturating_add(self.options.retention.metadata_ms);
                self.schedule_retention_of(
                    staged,
                    due,
                    RetentionKind::Identity,
                    id,
                    patient.into_bytes(),
                );
            }
            last = Some(key.to_vec());
        }
        let cursor = match last {
            Some(key) => [vec![0], key].concat(),
            None => vec![1],
        };
        staged.put(TreeId::Meta, META_IDENTITY_BACKFILL.to_vec(), cursor);
        Ok(())
    }
}

/// Lineage keys of a patient start with its key and a 0 byte.
fn lineage_prefix(patient: &str) -> Vec<u8> {
    let mut prefix = patient.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

/// The patient key `key` stands for now (the patient it was merged into).
fn current_key(staged: &Staged<'_>, key: &str) -> Result<String, StoreError> {
    let mut key = key.to_owned();
    for _ in 0..MAX_MERGES {
        let record: Option<PatientRecord> = staged.get_json(TreeId::Patients, key.as_bytes())?;
        match record.and_then(|r| r.merged_into) {
            Some(next) => key = next,
            None => break,
        }
    }
    Ok(key)
}

/// Removes `key`'s patient record, the identifier links pointing at it (or
/// at `patient`, which it was merged into) and its lineage; entries removed.
fn forget_patient(staged: &mut Staged<'_>, key: &str, patient: &str) -> Result<u64, StoreError> {
    let mut removed = 0;
    if let Some(record) = staged.get_json::<PatientRecord>(TreeId::Patients, key.as_bytes())? {
        for identifier in record.nhs.iter().chain(&record.prison) {
            let linked = staged.get(TreeId::Identities, identifier.as_bytes())?;
            if linked.as_deref() == Some(key.as_bytes())
                || linked.as_deref() == Some(patient.as_bytes())
            {
                staged.del(TreeId::Identities, identifier.as_bytes().to_vec());
                removed += 1;
            }
        }
        staged.del(TreeId::Patients, key.as_bytes().to_vec());
        removed += 1;
    }
    for (lineage, _) in staged.scan_prefix(TreeId::Lineage, &lineage_prefix(key))? {
        staged.del(TreeId::Lineage, lineage);
        removed += 1;
    }
    Ok(removed)
}
