//! Retention: a transit gateway forgets what it has delivered.
//!
//! A handover is *finished* when every one of its deliveries is: delivered,
//! or superseded and its replacement finished. Its retention clock starts
//! then (`HandoverRecord::finished_at_ms`); a handover with a live, parked or
//! quarantined delivery never expires. On finishing, two entries go into the
//! `retention` index, keyed by due time so a pass reads only what is due:
//! - at `finished + payload_grace`: **shred** the payload: the wrapped data
//!   key first, then the chunks, in one transaction with the audit entry;
//!   the record keeps `shredded_at_ms`;
//! - at `finished + metadata`: **remove** the handover and delivery records
//!   and the dedupe key, leaving a tombstone (sender, handover id, when) so
//!   Track can say why it finds nothing; the tombstone goes at
//!   `removed + tombstone`.
//!
//! Each pass also turns the key epochs over ([`super::super::key_epochs`]):
//! every `key_epoch` a new epoch opens, the keys of unfinished handovers are
//! rewrapped into it (at most a batch per pass), and an older epoch is
//! destroyed once the committed store holds no key wrapped under it. A
//! shredded payload is therefore unreadable from any copy sled still holds
//! within one epoch plus one pass of its shredding.
//!
//! The audit trail holds no clinical content and keeps its own, longer
//! period (`audit_ms`): entries older than that are removed from its head
//! behind a signed cut, so what is left still verifies (`audit_prune.rs`).
//! A patient's identity links and lineage go once nothing of theirs has been
//! tracked for the metadata period, refused identity links (conflicts) a
//! metadata period after the refusal (`identity_expiry.rs`).

use std::collections::BTreeMap;

use super::super::crypt::PayloadCipher;
use super::super::records::{self, RetentionKind, Tombstone, TreeId};
use super::super::{DeliveryRecord, DeliveryState, HandoverRecord, StoreError, TrackKey};
use super::{Staged, Writer};
use crate::audit::AuditEvent;

const ACTOR: &str = "urn:gateway:retention";

/// How long things are kept (see `docs/store.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// A finished handover's payload is kept this long, ms.
    pub payload_grace_ms: i64,
    /// A finished handover's tracking metadata is kept this long, ms.
    pub metadata_ms: i64,
    /// A removed handover's tombstone is kept this long, ms.
    pub tombstone_ms: i64,
    /// A key epoch wraps new data keys for this long, ms.
    pub key_epoch_ms: i64,
    /// An audit entry is kept this long after it was written, ms.
    pub audit_ms: i64,
    /// Most handovers one pass shreds, removes or rewraps (each); audit
    /// entries removed per pass are at most [`AUDIT_PER_HANDOVER`] times this.
    pub batch: usize,
}

/// Audit entries a handover's journey writes, roughly (submit, pull, ack,
/// shred, expire): a pass may remove this many per handover of its batch.
pub const AUDIT_PER_HANDOVER: usize = 5;

const DAY_MS: i64 = 86_400_000;

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            payload_grace_ms: 3 * DAY_MS,
            metadata_ms: 84 * DAY_MS,
            tombstone_ms: 365 * DAY_MS,
            key_epoch_ms: 3_600_000,
            audit_ms: 8 * 366 * DAY_MS,
            batch: 500,
        }
    }
}

/// What the store holds under the retention policy (payload-free counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionStats {
    /// Payloads not yet shredded (in transit, parked, quarantined, or in their grace period).
    pub payloads_held: u64,
    /// Of those, finished and waiting out their grace period.
    pub payloads_in_grace: u64,
    /// Payloads shredded since the store was created.
    pub payloads_shredded: u64,
    /// Finished handovers whose tracking metadata will be removed.
    pub metadata_expiring: u64,
    /// Handovers whose tracking metadata was removed since the store was created.
    pub metadata_removed: u64,
    /// Tombstones held (Track answers "removed under the retention policy").
    pub tombstones: u64,
    /// Key epochs on disk.
    pub key_epochs: u64,
    /// Earliest retention work still scheduled, ms.
    pub next_due_ms: Option<i64>,
    /// Audit entries held.
    pub audit_entries_held: u64,
    /// Audit entries removed under the audit period since the store was created.
    pub audit_entries_removed: u64,
    /// The signed cut the trail verifies from, once entries were removed.
    pub audit_cut: Option<crate::audit::AuditCut>,
    /// Entries of the identity trees (`identities`, `patients`, `lineage`,
    /// `conflicts`) held; counted off the writer by [`super::super::Store`].
    pub identity_records_held: u64,
    /// Entries of the identity trees removed under the retention policy
    /// since the store was created.
    pub identity_records_removed: u64,
    /// Patients with nothing tracked whose identity links are due to go.
    pub identities_expiring: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Payloads shredded.
    pub shredded: usize,
    /// Handovers whose tracking metadata was removed.
    pub metadata_removed: usize,
    /// Tombstones removed.
    pub tombstones_removed: usize,
    /// Data keys rewrapped into the newest epoch.
    pub keys_rewrapped: usize,
    /// Audit entries removed (older than the audit period).
    pub audit_removed: usize,
    /// Patients whose identity links and lineage were removed.
    pub identities_removed: usize,
    /// Refused identity links removed.
    pub conflicts_removed: usize,
    /// Key epochs destroyed.
    pub epochs_destroyed: usize,
    /// Parked releases waiting longer than the metadata period: never
    /// removed, reported so that someone claims them.
    pub parked_past_period: usize,
    /// Work due but left for the next pass (the batch was full).
    pub backlog: bool,
    /// How far the wall clock was ahead of the time the pass acted on, ms:
    /// more than a little means the clock was stepped forward while the
    /// gateway ran (`store::clock::RetentionClock`).
    pub clock_behind_ms: i64,
    /// What is held after the pass.
    pub stats: RetentionStats,
}

/// The writer's retention counters, loaded at start-up.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    scheduled: BTreeMap<RetentionKind, u64>,
    shredded: u64,
    removed: u64,
    /// Identity-tree entries removed.
    pub(super) identity_removed: u64,
    /// Keys wrapped directly by the master key may still exist.
    legacy_keys: bool,
    /// Handovers from before retention still to look at: (next id, last id).
    backfill: (u64, u64),
    /// Handover ids never handed out: each rollback's jump to a new range.
    ids_skipped: u64,
}

/// Meta key of the handover ids a rollback skipped (`integrity::rebase`).
pub(in crate::store) const META_IDS_SKIPPED: &[u8] = b"ids_skipped";
/// Meta key of the count of payloads shredded.
pub(in crate::store) const META_SHREDDED: &[u8] = b"retention_shredded";
/// Meta key of the count of handovers whose tracking metadata was removed.
pub(in crate::store) const META_REMOVED: &[u8] = b"retention_removed";
/// Meta key of the count of identity records removed.
pub(in crate::store) const META_IDENTITY_REMOVED: &[u8] = b"retention_identity_removed";
/// Next handover id ++ last handover id of the one-off look at handovers
/// stored before retention existed.
pub(in crate::store) const META_BACKFILL: &[u8] = b"retention_backfill";
/// Present once no data key wrapped directly by the master key is left (none
/// is ever written again), so start-up need not read every data key to know.
const META_NO_LEGACY_KEYS: &[u8] = b"retention_no_legacy_keys";

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("retention: {what}"))
}

impl Ledger {
    /// Counts the scheduled work and reads the counters.
    pub(super) fn load(trees: &[sled::Tree]) -> Result<Self, StoreError> {
        let mut ledger = Ledger::default();
        for entry in trees[TreeId::Retention as usize].iter().keys() {
            let (_, kind, _) =
                records::split_retention_key(&entry?).ok_or_else(|| corrupt("index key layout"))?;
            *ledger.scheduled.entry(kind).or_default() += 1;
        }
        let meta = &trees[TreeId::Meta as usize];
        let counter = |key: &[u8]| -> Result<u64, StoreError> {
            Ok(meta
                .get(key)?
                .and_then(|v| records::from_be(&v))
                .unwrap_or(0))
        };
        ledger.shredded = counter(META_SHREDDED)?;
        ledger.removed = counter(META_REMOVED)?;
        ledger.identity_removed = counter(META_IDENTITY_REMOVED)?;
        ledger.ids_skipped = counter(META_IDS_SKIPPED)?;
        ledger.backfill = match meta.get(META_BACKFILL)? {
            Some(v) if v.len() == 16 => (
                records::from_be(&v[..8]).unwrap_or(1),
                records::from_be(&v[8..]).unwrap_or(0),
            ),
            Some(_) => return Err(corrupt("backfill cursor layout")),
            // First start with retention: every handover stored so far.
            None => (1, counter(records::META_LAST_HANDOVER)?),
        };
        if meta.get(META_NO_LEGACY_KEYS)?.is_none() {
            for value in trees[TreeId::DataKeys as usize].iter().values() {
                if PayloadCipher::epoch_of(&value?) == Some(0) {
                    ledger.legacy_keys = true;
                    break;
                }
            }
            if !ledger.legacy_keys {
                // Durable with the open's or the next batch's barrier; if
                // lost, the next start looks again.
                meta.insert(META_NO_LEGACY_KEYS, &[])?;
            }
        }
        Ok(ledger)
    }

    fn count(&self, kind: RetentionKind) -> u64 {
        self.scheduled.get(&kind).copied().unwrap_or(0)
    }

    fn add(&mut self, kind: RetentionKind) {
        *self.scheduled.entry(kind).or_default() += 1;
    }

    fn done(&mut self, kind: RetentionKind) {
        if let Some(n) = self.scheduled.get_mut(&kind) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Writer {
    fn schedule_retention(
        &mut self,
        staged: &mut Staged<'_>,
        due_ms: i64,
        kind: RetentionKind,
        handover_id: u64,
    ) {
        self.schedule_retention_of(staged, due_ms, kind, handover_id, Vec::new());
    }

    /// Schedules work with a value (an identity expiry names its patient).
    pub(super) fn schedule_retention_of(
        &mut self,
        staged: &mut Staged<'_>,
        due_ms: i64,
        kind: RetentionKind,
        id: u64,
        value: Vec<u8>,
    ) {
        let key = records::retention_key(due_ms, kind, id).to_vec();
        if staged.get(TreeId::Retention, &key).ok().flatten().is_none() {
            self.retention.add(kind);
        }
        staged.put(TreeId::Retention, key, value);
    }

    /// Called once delivery `d` has been delivered (and stored so): finishes
    /// it, the deliveries it superseded, and each handover all of whose
    /// deliveries are now finished.
    pub(in crate::store) fn delivery_finished(
        &mut self,
        staged: &mut Staged<'_>,
        first: DeliveryRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        // `first` comes decoded, with the caller's change, and is written
        // here once; copies it superseded are read by id.
        let mut next = Some(first);
        let mut work = Vec::new();
        loop {
            let (mut d, changed) = match (next.take(), work.pop()) {
                (Some(d), _) => (d, true),
                (None, Some(id)) => {
                    let d: DeliveryRecord = staged
                        .get_json(TreeId::Deliveries, &records::be(id))?
                        .ok_or_else(|| corrupt(&format!("finished delivery {id} has no record")))?;
                    (d, false)
                }
                (None, None) => return Ok(()),
            };
            let id = d.id;
            if changed || d.finished_at_ms.is_none() {
                d.finished_at_ms.get_or_insert(now);
                staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            }
            self.handover_maybe_finished(staged, d.handover_id, id, now)?;
            // Superseded by this one: finished with it (entries staged in this
            // batch included: a stale copy may be retired just before).
            for (key, _) in staged.scan_prefix(TreeId::Superseded, &records::be(id))? {
                let old = records::from_be(&key[8..]).ok_or_else(|| corrupt("superseded key"))?;
                staged.del(TreeId::Superseded, key);
                work.push(old);
            }
        }
    }

    /// A handover that went to nobody (an admission whose patient has no
    /// GP on the network) waits for no delivery: it is finished when
    /// submitted, so its payload and tracking metadata expire like any
    /// other's. PDS may still find a practice while the payload is kept;
    /// then [`Self::reopen`] makes it wait for that delivery.
    pub(in crate::store) fn finish_unrouted(
        &mut self,
        staged: &mut Staged<'_>,
        h: &mut HandoverRecord,
        now: i64,
    ) {
        h.finished_at_ms = Some(now);
        let policy = self.options.retention.clone();
        let payload_due = now.saturating_add(policy.payload_grace_ms);
        let metadata_due = now.saturating_add(policy.metadata_ms);
        self.schedule_retention(staged, payload_due, RetentionKind::Payload, h.id);
        self.schedule_retention(staged, metadata_due, RetentionKind::Metadata, h.id);
    }

    /// A finished handover that gets a new delivery waits for it again: the
    /// retention work scheduled for it is skipped when due (it checks that
    /// the handover is still finished), and new work is scheduled when the
    /// delivery finishes.
    pub(in crate::store) fn reopen(h: &mut HandoverRecord) {
        h.finished_at_ms = None;
    }

    /// Whether `h` finished at least `age_ms` before `now`, so that work of
    /// `kind` scheduled for it applies. A handover waiting for a delivery
    /// again (reopened) is not: its work is scheduled when it finishes. One
    /// that finished later than the work assumed (reopened and finished
    /// again, or a period lengthened since) has the work moved to when it
    /// is due.
    fn old_enough(
        &mut self,
        staged: &mut Staged<'_>,
        h: &HandoverRecord,
        now: i64,
        age_ms: i64,
        kind: RetentionKind,
    ) -> bool {
        let Some(due) = h.finished_at_ms.map(|at| at.saturating_add(age_ms)) else {
            return false;
        };
        if due > now {
            self.schedule_retention(staged, due, kind, h.id);
            return false;
        }
        true
    }

    /// Marks handover `handover_id` finished when every delivery of it is;
    /// `finished` is one that just finished (not read again).
    fn handover_maybe_finished(
        &mut self,
        staged: &mut Staged<'_>,
        handover_id: u64,
        finished: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        let Some(mut h) =
            staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(handover_id))?
        else {
            return Ok(());
        };
        if h.finished_at_ms.is_some() {
            return Ok(());
        }
        for d in h.deliveries.iter().filter(|d| **d != finished) {
            // A live copy is unfinished: no need to read it.
            if self.schedule.contains(*d) {
                return Ok(());
            }
            let d: Option<DeliveryRecord> =
                staged.get_json(TreeId::Deliveries, &records::be(*d))?;
            if d.as_ref().and_then(DeliveryRecord::finished_at).is_none() {
                return Ok(());
            }
        }
        h.finished_at_ms = Some(now);
        staged.put_json(TreeId::Handovers, records::be(h.id).to_vec(), &h);
        let policy = self.options.retention.clone();
        let payload_due = now.saturating_add(policy.payload_grace_ms);
        let metadata_due = now.saturating_add(policy.metadata_ms);
        self.schedule_retention(staged, payload_due, RetentionKind::Payload, h.id);
        self.schedule_retention(staged, metadata_due, RetentionKind::Metadata, h.id);
        Ok(())
    }

    /// One retention pass (see the module docs).
    pub(super) fn retention_pass(
        &mut self,
        staged: &mut Staged<'_>,
    ) -> Result<RetentionOutcome, StoreError> {
        // Everything the pass does, its audit entries included, is as of
        // the retention clock: a wall clock stepped forward does not bring
        // removals forward (`store::clock::RetentionClock`).
        let time = self.retention_clock.time(&*self.clock);
        let now = time.now_ms;
        let mut out = RetentionOutcome {
            clock_behind_ms: time.behind_wall_ms,
            ..RetentionOutcome::default()
        };
        self.turn_epochs_over(staged, now, &mut out)?;
        let batch = self.options.retention.batch.max(1);
        let mut due = Vec::new();
        for entry in self.trees[TreeId::Retention as usize].iter().keys() {
            let key = entry?;
            let (at, kind, id) =
                records::split_retention_key(&key).ok_or_else(|| corrupt("index key layout"))?;
            if at > now {
                break;
            }
            if due.len() == batch {
                out.backlog = true;
                break;
            }
            due.push((key, kind, id));
        }
        for (key, kind, id) in due {
            // A repeat (an earlier pass in this batch) finds it gone.
            let Some(value) = staged.get(TreeId::Retention, &key)? else {
                continue;
            };
            staged.del(TreeId::Retention, key.to_vec());
            self.retention.done(kind);
            match kind {
                RetentionKind::Payload => out.shredded += usize::from(self.shred(staged, id, now)?),
                RetentionKind::Metadata => {
                    out.metadata_removed += usize::from(self.remove_metadata(staged, id, now)?);
                }
                RetentionKind::Tombstone => {
                    out.tombstones_removed += usize::from(remove_tombstone(staged, id)?);
                }
                RetentionKind::Identity => {
                    let patient = String::from_utf8_lossy(&value).into_owned();
                    out.identities_removed +=
                        usize::from(self.expire_identity(staged, &patient, now)?);
                }
            }
        }
        self.expire_conflicts(staged, now, &mut out)?;
        self.prune_audit(staged, now, &mut out)?;
        self.backfill(staged)?;
        self.backfill_identities(staged, now)?;
        staged.put(
            TreeId::Meta,
            META_SHREDDED,
            records::be(self.retention.shredded).to_vec(),
        );
        staged.put(
            TreeId::Meta,
            META_REMOVED,
            records::be(self.retention.removed).to_vec(),
        );
        staged.put(
            TreeId::Meta,
            META_IDENTITY_REMOVED,
            records::be(self.retention.identity_removed).to_vec(),
        );
        let held_since = now.saturating_sub(self.options.retention.metadata_ms);
        for id in self.schedule.of_mailbox(records::PARKED_MAILBOX) {
            let d: Option<DeliveryRecord> =
                staged.get_json(TreeId::Deliveries, &records::be(id))?;
            out.parked_past_period += usize::from(d.is_some_and(|d| d.queued_at_ms <= held_since));
        }
        out.stats = self.retention_stats_staged(staged)?;
        Ok(out)
    }

    /// Looks at (a batch of) the handovers stored before retention existed:
    /// finished ones are scheduled from when they finished, and superseded
    /// deliveries are linked to their replacement.
    fn backfill(&mut self, staged: &mut Staged<'_>) -> Result<(), StoreError> {
        let (next, last) = self.retention.backfill;
        let mut cursor = records::be(next).to_vec();
        cursor.extend_from_slice(&records::be(last));
        // Written even when done, so that a restart does not start over.
        staged.put(TreeId::Meta, META_BACKFILL, cursor);
        if next > last {
            return Ok(());
        }
        let end = last.min(next.saturating_add(self.options.retention.batch as u64 - 1));
        for id in next..=end {
            let Some(mut h) =
                staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(id))?
            else {
                continue;
            };
            if h.finished_at_ms.is_some() {
                continue;
            }
            let mut finished = Some(i64::MIN);
            for did in &h.deliveries {
                let d: Option<DeliveryRecord> =
                    staged.get_json(TreeId::Deliveries, &records::be(*did))?;
                let at = match d {
                    // Superseded by a correction that went to no one: done.
                    Some(d) if d.is_superseded() && d.superseded_by.is_none() => d
                        .finished_at()
                        .or(d.superseded_at_ms)
                        .or(Some(d.queued_at_ms)),
                    Some(d) if d.state == DeliveryState::Superseded => {
                        let by = d.superseded_by.unwrap_or(0);
                        let replacement: Option<DeliveryRecord> =
                            staged.get_json(TreeId::Deliveries, &records::be(by))?;
                        let at = replacement.as_ref().and_then(DeliveryRecord::finished_at);
                        if at.is_none() {
                            staged.put(
                                TreeId::Superseded,
                                records::superseded_key(by, d.id),
                                Vec::new(),
                            );
                        }
                        at
                    }
                    Some(d) => d.finished_at(),
                    None => None,
                };
                finished = finished.zip(at).map(|(a, b)| a.max(b));
            }
            // Went to nobody: finished when submitted.
            let finished = if h.deliveries.is_empty() {
                Some(h.submitted_at_ms)
            } else {
                finished
            };
            let Some(at) = finished else {
                continue;
            };
            h.finished_at_ms = Some(at);
            staged.put_json(TreeId::Handovers, records::be(id).to_vec(), &h);
            let policy = self.options.retention.clone();
            self.schedule_retention(
                staged,
                at.saturating_add(policy.payload_grace_ms),
                RetentionKind::Payload,
                id,
            );
            self.schedule_retention(
                staged,
                at.saturating_add(policy.metadata_ms),
                RetentionKind::Metadata,
                id,
            );
        }
        self.retention.backfill = (end + 1, last);
        let mut cursor = records::be(end + 1).to_vec();
        cursor.extend_from_slice(&records::be(last));
        staged.put(TreeId::Meta, META_BACKFILL, cursor);
        Ok(())
    }

    /// Destroys the wrapped data key, then the payload chunks.
    fn shred(
        &mut self,
        staged: &mut Staged<'_>,
        handover_id: u64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let Some(mut h) =
            staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(handover_id))?
        else {
            return Ok(false);
        };
        let grace = self.options.retention.payload_grace_ms;
        if h.shredded_at_ms.is_some()
            || !self.old_enough(staged, &h, now, grace, RetentionKind::Payload)
        {
            return Ok(false);
        }
        staged.del(TreeId::DataKeys, records::be(h.id).to_vec());
        for entry in self.trees[TreeId::Payloads as usize]
            .scan_prefix(records::be(h.id))
            .keys()
        {
            staged.del(TreeId::Payloads, entry?.to_vec());
        }
        h.shredded_at_ms = Some(now);
        // Nothing left to check it against; a digest could confirm a guess.
        h.payload_hash = String::new();
        staged.put_json(TreeId::Handovers, records::be(h.id).to_vec(), &h);
        self.retention.shredded += 1;
        self.audit(
            staged,
            AuditEvent {
                actor: ACTOR.into(),
                action: "shred",
                handover_id: Some(h.id),
                patient_key: Some(h.patient_key.clone()),
                outcome: "ok: payload and data key removed under the retention policy".into(),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(true)
    }

    /// Removes a handover's tracking metadata, leaving a tombstone.
    fn remove_metadata(
        &mut self,
        staged: &mut Staged<'_>,
        handover_id: u64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let Some(h) =
            staged.get_json::<HandoverRecord>(TreeId::Handovers, &records::be(handover_id))?
        else {
            return Ok(false);
        };
        let period = self.options.retention.metadata_ms;
        if !self.old_enough(staged, &h, now, period, RetentionKind::Metadata) {
            return Ok(false);
        }
        self.shred(staged, handover_id, now)?;
        for d in &h.deliveries {
            staged.del(TreeId::Deliveries, records::be(*d).to_vec());
            // What the MESH edge did with it goes with it (ids and states).
            staged.del(TreeId::Mesh, records::be(*d).to_vec());
        }
        let dedupe = records::dedupe_key(&h.sender, &h.message_id);
        if staged
            .get(TreeId::Dedupe, &dedupe)?
            .and_then(|v| records::from_be(&v))
            == Some(h.id)
        {
            staged.del(TreeId::Dedupe, dedupe);
        }
        staged.del(TreeId::Handovers, records::be(h.id).to_vec());
        self.handover_forgotten(staged, &h, now)?;
        let tombstone = Tombstone {
            handover_id: h.id,
            sender: h.sender.clone(),
            message_id: h.message_id.clone(),
            removed_at_ms: now,
        };
        staged.put_json(
            TreeId::Tombstones,
            records::tombstone_by_id(h.id),
            &tombstone,
        );
        staged.put_json(
            TreeId::Tombstones,
            records::tombstone_by_message(&h.sender, &h.message_id),
            &tombstone,
        );
        let due = now.saturating_add(self.options.retention.tombstone_ms);
        self.schedule_retention(staged, due, RetentionKind::Tombstone, h.id);
        self.retention.removed += 1;
        self.audit(
            staged,
            AuditEvent {
                actor: ACTOR.into(),
                action: "expire",
                handover_id: Some(h.id),
                patient_key: Some(h.patient_key.clone()),
                outcome: "ok: tracking metadata removed under the retention policy".into(),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(true)
    }

    /// Opens a new key epoch when the newest is old enough, rewraps keys of
    /// older epochs into the newest (a batch at most), and destroys older
    /// epochs once the committed store holds no key of theirs.
    fn turn_epochs_over(
        &mut self,
        staged: &mut Staged<'_>,
        now: i64,
        out: &mut RetentionOutcome,
    ) -> Result<(), StoreError> {
        let Some((current, opened_ms)) = self.cipher.current_epoch() else {
            return Ok(());
        };
        let older: Vec<u32> = self
            .cipher
            .epochs()
            .into_iter()
            .filter(|n| *n < current)
            .collect();
        if !older.is_empty() || self.retention.legacy_keys {
            let (remaining, rewrapped) = self.rewrap_older(staged, current)?;
            out.keys_rewrapped = rewrapped;
            // Committed keys still under an older epoch (rewrapped ones
            // included until this batch commits): keep every older epoch.
            if remaining == 0 {
                for n in older {
                    self.cipher.destroy_epoch(n)?;
                    out.epochs_destroyed += 1;
                }
                if self.retention.legacy_keys {
                    staged.put(TreeId::Meta, META_NO_LEGACY_KEYS, Vec::new());
                }
                self.retention.legacy_keys = false;
            }
        }
        // An epoch that opened "later" than now (the clock was set back
        // since) is as good as old: otherwise no epoch would open, and no
        // shredded key fall out of reach, for as long as the clock was off.
        if now.saturating_sub(opened_ms) >= self.options.retention.key_epoch_ms || now < opened_ms {
            self.cipher.open_new_epoch(now)?;
        }
        Ok(())
    }

    /// Rewraps up to a batch of committed keys not under epoch `current`;
    /// returns (committed keys found under older epochs, keys rewrapped).
    fn rewrap_older(
        &mut self,
        staged: &mut Staged<'_>,
        current: u32,
    ) -> Result<(usize, usize), StoreError> {
        let batch = self.options.retention.batch.max(1);
        let held = self.cipher.epochs();
        let mut remaining = 0;
        let mut rewrapped = 0;
        for entry in self.trees[TreeId::DataKeys as usize].iter() {
            let (key, wrapped) = entry?;
            match PayloadCipher::epoch_of(&wrapped) {
                Some(n) if n == current => continue,
                // Its epoch is gone: nothing can read it, nothing to keep.
                Some(n) if n != 0 && !held.contains(&n) => continue,
                _ => {}
            }
            // Being shredded in this batch: gone whatever happens next.
            let Some(now_staged) = staged.get(TreeId::DataKeys, &key)? else {
                continue;
            };
            remaining += 1;
            if rewrapped == batch || PayloadCipher::epoch_of(&now_staged) == Some(current) {
                continue;
            }
            let id = records::from_be(&key).ok_or_else(|| corrupt("data key id"))?;
            match self.cipher.rewrap(id, &now_staged) {
                Ok(fresh) => {
                    staged.put(TreeId::DataKeys, key.to_vec(), fresh);
                    rewrapped += 1;
                }
                // Its epoch stays until someone looks: never fatal to the store.
                Err(e) => {
                    tracing::error!(handover_id = id, error = %e, "a data key cannot be rewrapped")
                }
            }
        }
        // Keys staged earlier in this batch under an older epoch.
        remaining += staged
            .pending(TreeId::DataKeys)
            .filter_map(|(_, v)| v)
            .filter(|v| PayloadCipher::epoch_of(v) != Some(current))
            .count();
        Ok((remaining, rewrapped))
    }

    /// The counts operators see, of the committed store.
    pub(super) fn retention_stats(&self) -> Result<RetentionStats, StoreError> {
        self.retention_stats_staged(&Staged::new(&self.trees))
    }

    /// The counts operators see, as `staged` leaves them.
    fn retention_stats_staged(&self, staged: &Staged<'_>) -> Result<RetentionStats, StoreError> {
        let next_due_ms = self.trees[TreeId::Retention as usize]
            .first()?
            .and_then(|(k, _)| records::split_retention_key(&k))
            .map(|(at, _, _)| at);
        let payloads_shredded = self.retention.shredded;
        let audit_cut = self.audit_cut(staged)?;
        let first_kept = audit_cut.as_ref().map_or(1, |c| c.cut.first_kept);
        let (audit_head, _) = self.chain.head();
        Ok(RetentionStats {
            payloads_held: self
                .last_handover
                .saturating_sub(self.retention.ids_skipped)
                .saturating_sub(payloads_shredded),
            payloads_in_grace: self.retention.count(RetentionKind::Payload),
            payloads_shredded,
            metadata_expiring: self.retention.count(RetentionKind::Metadata),
            metadata_removed: self.retention.removed,
            tombstones: self.retention.count(RetentionKind::Tombstone),
            key_epochs: self.cipher.epochs().len() as u64,
            next_due_ms,
            audit_entries_held: (audit_head + 1).saturating_sub(first_kept),
            audit_entries_removed: first_kept - 1,
            audit_cut: audit_cut.map(|c| c.cut),
            identity_records_held: 0,
            identity_records_removed: self.retention.identity_removed,
            identities_expiring: self.retention.count(RetentionKind::Identity),
        })
    }

    /// The tombstone of a handover `sender` tracks, if its metadata was removed.
    pub(super) fn tombstone_for(
        &self,
        staged: &Staged<'_>,
        sender: &str,
        key: &TrackKey,
    ) -> Result<Option<Tombstone>, StoreError> {
        let key = match key {
            TrackKey::HandoverId(id) => records::tombstone_by_id(*id),
            TrackKey::MessageId(m) => records::tombstone_by_message(sender, m),
        };
        Ok(staged
            .get_json::<Tombstone>(TreeId::Tombstones, &key)?
            .filter(|t| t.sender == sender))
    }
}

fn remove_tombstone(staged: &mut Staged<'_>, handover_id: u64) -> Result<bool, StoreError> {
    let by_id = records::tombstone_by_id(handover_id);
    let Some(t) = staged.get_json::<Tombstone>(TreeId::Tombstones, &by_id)? else {
        return Ok(false);
    };
    staged.del(TreeId::Tombstones, by_id);
    // The message id may since have been used again and removed again.
    let by_message = records::tombstone_by_message(&t.sender, &t.message_id);
    if staged
        .get_json::<Tombstone>(TreeId::Tombstones, &by_message)?
        .is_some_and(|m| m.handover_id == handover_id)
    {
        staged.del(TreeId::Tombstones, by_message);
    }
    Ok(true)
}
