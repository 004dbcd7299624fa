//! One patient across identifiers, and corrections that retire every stale copy.
//!
//! # Identity
//! A submit names its patient by an NHS number, a prison number or both (as
//! keyed hashes, [`PatientIds`]). The `identities` tree maps each identifier
//! to a patient key; an identifier never seen resolves to its own hash (so
//! records written before identity links existed keep their keys). When a
//! submit carries both and they resolve to two patients, the two are merged
//! into the NHS number's patient, in the submit's own transaction: the
//! absorbed patient's live and quarantined deliveries are re-keyed (so
//! per-patient order and supersession see one patient), its lineage moves,
//! and its key is kept as an alias (the audit trail by patient finds both).
//!
//! A link is refused, never merged silently, when it would give a patient two
//! NHS numbers or two prison numbers: the submit is refused with
//! [`StoreError::IdentityConflict`], recorded in the `conflicts` tree for
//! operators, and audited. Nothing else changes.
//!
//! # Supersession
//! A newer handover from the same sender for the same patient and event
//! retires every undelivered copy of the older ones, in every mailbox
//! (`@parked` included) and whatever the newer one's own routing: queued,
//! parked and quarantined copies become `Superseded`; a leased copy stays
//! with its recipient (it may be acknowledged) but is marked, so a nack or an
//! expired lease retires it instead of offering it again. The `lineage` tree
//! keeps the latest handover per (patient, sender, event), and each handover
//! records the one it supersedes so a recipient can tell.

use std::collections::BTreeSet;

use super::records::{self, IdentityConflict, PatientRecord, Recency, TreeId, newer_than};
use super::writer::{Staged, Writer};
use super::{DeliveryRecord, DeliveryState, PatientIds, StoreError};
use crate::audit::AuditEvent;
use crate::journey::JourneyEvent;

/// The handover a submit is creating, as supersession needs it.
pub(super) struct Newer<'a> {
    pub actor: &'a str,
    pub sender: &'a str,
    pub event: JourneyEvent,
    pub patient_key: &'a str,
    pub handover_id: u64,
    /// When its document was written, ms since the epoch.
    pub authored_at_ms: Option<i64>,
    /// (mailbox, delivery id) of the new handover's deliveries.
    pub deliveries: &'a [(String, u64)],
    /// Its custody episode, when known.
    pub episode: Option<&'a String>,
}

impl Newer<'_> {
    fn recency(&self) -> Recency {
        Recency {
            authored_at_ms: self.authored_at_ms,
            handover_id: self.handover_id,
        }
    }
}

impl Writer {
    /// Resolves `ids` to one patient key, linking and merging identities in
    /// `staged` when `links` (a prison's submit, [`records::may_link`]).
    /// `Ok(Err((field, key)))` when the identifiers contradict what is linked
    /// (`key`: the patient they resolved to, whose trail the refusal is on)
    /// ([`records::identity_conflict`], [`records::merge_conflict`]).
    pub(super) fn resolve_patient(
        &mut self,
        staged: &mut Staged<'_>,
        ids: &PatientIds,
        links: bool,
        now: i64,
    ) -> Result<Result<String, (&'static str, String)>, StoreError> {
        let Some(first) = ids.first_key() else {
            return Ok(Ok("unidentified".to_owned()));
        };
        let by_nhs = ids.nhs.as_deref().map(|h| resolve(staged, h)).transpose()?;
        let by_prison = ids
            .prison
            .as_deref()
            .map(|h| resolve(staged, h))
            .transpose()?;
        let key = by_nhs
            .clone()
            .or_else(|| by_prison.clone())
            .unwrap_or_else(|| first.to_owned());
        let mut record = patient(staged, &key)?;
        if let Some(field) = records::identity_conflict(&record, ids) {
            return Ok(Err((field, key)));
        }
        if let (Some(a), Some(b)) = (&by_nhs, &by_prison)
            && a != b
            && self.is_known(staged, b)?
        {
            let absorbed = patient(staged, b)?;
            if let Some(field) = records::merge_conflict(&absorbed, ids) {
                return Ok(Err((field, key)));
            }
            if links {
                self.merge(staged, &mut record, a, b, absorbed, now)?;
                staged.put_json(TreeId::Patients, key.as_bytes().to_vec(), &record);
            }
        }
        if !links {
            return Ok(Ok(key));
        }
        // A patient found by a prison number alone keeps the date of birth
        // it came with, which the next one is compared with; with both
        // numbers the link records it. An NHS number alone writes nothing.
        let born = record.dob.is_none() && ids.dob.is_some() && ids.prison.is_some();
        if born {
            record.dob.clone_from(&ids.dob);
        }
        let linked =
            ids.nhs.is_some() && ids.prison.is_some() && link(staged, &mut record, &key, ids)?;
        if born || linked {
            staged.put_json(TreeId::Patients, key.as_bytes().to_vec(), &record);
        }
        Ok(Ok(key))
    }

    /// Whether anything is held under patient key `key`: a record, live or
    /// quarantined deliveries, or lineage. A patient known so far by one
    /// identifier has no record, and once its handovers are delivered no
    /// deliveries either; its lineage still says what a later link must
    /// compare (a newer handover of theirs supersedes an older one of the
    /// patient it turns out to be).
    fn is_known(&self, staged: &Staged<'_>, key: &str) -> Result<bool, StoreError> {
        let mut lineage = key.as_bytes().to_vec();
        lineage.push(0);
        Ok(staged.get(TreeId::Patients, key.as_bytes())?.is_some()
            || !self.deliveries_of(key).is_empty()
            || !staged.scan_prefix(TreeId::Lineage, &lineage)?.is_empty())
    }

    /// Merges patient `b` into `a`: identifiers, live and quarantined
    /// deliveries, lineage; `b` stays as an alias of `a`.
    fn merge(
        &mut self,
        staged: &mut Staged<'_>,
        into: &mut PatientRecord,
        a: &str,
        b: &str,
        absorbed: PatientRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        for identifier in absorbed.nhs.iter().chain(&absorbed.prison) {
            staged.put(
                TreeId::Identities,
                identifier.as_bytes().to_vec(),
                a.as_bytes().to_vec(),
            );
        }
        into.nhs = into.nhs.take().or(absorbed.nhs.clone());
        into.prison = into.prison.take().or(absorbed.prison.clone());
        into.dob = into.dob.take().or(absorbed.dob.clone());
        into.aliases.push(b.to_owned());
        into.aliases.extend(absorbed.aliases.iter().cloned());
        let retired = PatientRecord {
            merged_into: Some(a.to_owned()),
            ..absorbed
        };
        staged.put_json(TreeId::Patients, b.as_bytes().to_vec(), &retired);
        for id in self.deliveries_of(b) {
            let mut d = load(staged, id)?;
            d.patient_key = a.to_owned();
            staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            self.rekey_delivery(&d, b);
        }
        self.move_lineage(staged, a, b, now)?;
        self.audit(
            staged,
            AuditEvent {
                actor: "urn:gateway:identity".into(),
                action: "identity_link",
                patient_key: Some(a.to_owned()),
                outcome: format!("ok: patient {b} is the same person"),
                ..AuditEvent::default()
            },
            now,
        );
        Ok(())
    }

    /// Moves `b`'s lineage records to `a`. Where both have a handover from
    /// the same sender for the same event, the newer one (written later, or
    /// received later) now supersedes the other's undelivered copies, as if
    /// it had come after it.
    fn move_lineage(
        &mut self,
        staged: &mut Staged<'_>,
        a: &str,
        b: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut prefix = b.as_bytes().to_vec();
        prefix.push(0);
        for (key, value) in staged.scan_prefix(TreeId::Lineage, &prefix)? {
            let mut target = a.as_bytes().to_vec();
            target.extend_from_slice(&key[b.len()..]);
            let theirs = records::from_be(&value).unwrap_or(0);
            let ours = staged
                .get(TreeId::Lineage, &target)?
                .and_then(|v| records::from_be(&v));
            let (latest, earlier) = match ours {
                Some(o) if newer_than(recency_of(staged, o)?, recency_of(staged, theirs)?) => {
                    (o, Some(theirs))
                }
                Some(o) => (theirs, Some(o)),
                None => (theirs, None),
            };
            staged.put(TreeId::Lineage, target, records::be(latest).to_vec());
            staged.del(TreeId::Lineage, key);
            if let Some(earlier) = earlier {
                self.supersede_before(staged, a, (latest, earlier), now)?;
            }
        }
        Ok(())
    }

    /// Retires the undelivered copies of everything handover `latest`
    /// supersedes within patient `patient_key`; `earlier` is the other
    /// lineage's latest, which `latest` now names as the handover it
    /// supersedes when it named none (so its deliveries say so).
    fn supersede_before(
        &mut self,
        staged: &mut Staged<'_>,
        patient_key: &str,
        (latest, earlier): (u64, u64),
        now: i64,
    ) -> Result<(), StoreError> {
        join_chains(staged, latest, earlier)?;
        // Its tracking data may be gone under the retention policy: then it
        // finished long ago, and there is nothing to compare with.
        let Some(handover) =
            staged.get_json::<super::HandoverRecord>(TreeId::Handovers, &records::be(latest))?
        else {
            return Ok(());
        };
        let mut deliveries = Vec::with_capacity(handover.deliveries.len());
        for id in &handover.deliveries {
            deliveries.push((load(staged, *id)?.mailbox, *id));
        }
        let newer = Newer {
            actor: "urn:gateway:identity",
            sender: &handover.sender,
            event: handover.event,
            patient_key,
            handover_id: latest,
            authored_at_ms: handover.authored_at_ms,
            deliveries: &deliveries,
            episode: handover.episode.as_ref(),
        };
        self.supersede_older(staged, &newer, false, now)
    }

    /// Records a refused link for operators and audits it.
    pub(super) fn record_conflict(
        &mut self,
        staged: &mut Staged<'_>,
        conflict: IdentityConflict,
        actor: &str,
        (handover_id, patient_key): (Option<u64>, Option<String>),
    ) {
        let entry = self.audit(
            staged,
            AuditEvent {
                actor: actor.to_owned(),
                action: "submit",
                handover_id,
                patient_key,
                outcome: format!(
                    "refused: identity conflict on {}: linked to a different patient",
                    conflict.field
                ),
                ..AuditEvent::default()
            },
            conflict.at_ms,
        );
        staged.put_json(TreeId::Conflicts, records::be(entry).to_vec(), &conflict);
    }

    /// The previous handover from this sender for this patient and event,
    /// now replaced by `newer` in the lineage.
    pub(super) fn advance_lineage(
        staged: &mut Staged<'_>,
        newer: &Newer<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let key = records::lineage_key(newer.patient_key, newer.sender, newer.event);
        let previous = staged
            .get(TreeId::Lineage, &key)?
            .and_then(|v| records::from_be(&v));
        staged.put(
            TreeId::Lineage,
            key,
            records::be(newer.handover_id).to_vec(),
        );
        Ok(previous)
    }

    /// Retires every undelivered copy of older handovers from the same sender
    /// for the same patient and event (see the module docs); only those of
    /// its own custody episode when `own_episode` (a late correction of an
    /// earlier episode corrects that episode, never a later one's summaries).
    pub(super) fn supersede_older(
        &mut self,
        staged: &mut Staged<'_>,
        newer: &Newer<'_>,
        own_episode: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        for id in self.deliveries_of(newer.patient_key) {
            let mut d = load(staged, id)?;
            if d.event != Some(newer.event)
                || d.handover_id == newer.handover_id
                || d.is_superseded()
                || sender_of(staged, &d)? != newer.sender
                || !newer_than(newer.recency(), recency_of(staged, d.handover_id)?)
                || (own_episode && !in_episode_of(staged, d.handover_id, newer.episode)?)
            {
                continue;
            }
            d.superseded_by = records::replacement_in(newer.deliveries, &d.mailbox);
            d.superseded_by_handover = Some(newer.handover_id);
            let outcome = if d.state == DeliveryState::Leased {
                self.schedule.mark_stale(id);
                staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
                "ok: leased copy marked stale; it will not be offered again".to_owned()
            } else {
                self.retire(staged, &mut d, now)?;
                format!("ok: superseded by handover {}", newer.handover_id)
            };
            self.audit(
                staged,
                records::supersede_event(newer.actor, &d, outcome),
                now,
            );
        }
        Ok(())
    }

    /// Places `newer` in its lineage. Written before the lineage's latest of
    /// its custody episode (a retry that lost the race with its own
    /// correction), it is superseded on arrival: that latest is returned
    /// first, and nothing else changes. Otherwise it becomes the latest of
    /// its episode (retiring older copies when `supersede`), and the handover
    /// it supersedes is returned second. A late correction of an earlier
    /// episode than the lineage's latest is spliced in below the later
    /// episode's summaries: it corrects its own episode only, and the later
    /// episode stays the lineage's latest.
    pub(super) fn join_lineage(
        &mut self,
        staged: &mut Staged<'_>,
        newer: &Newer<'_>,
        supersede: bool,
        now: i64,
    ) -> Result<(Option<super::HandoverRecord>, Option<u64>), StoreError> {
        let Place { at, after } = Self::place(staged, newer)?;
        if let Some(at) = at
            .as_ref()
            .filter(|at| newer_than((*at).into(), newer.recency()))
        {
            return Ok((Some(at.clone()), None));
        }
        if supersede {
            self.supersede_older(staged, newer, after.is_some(), now)?;
        }
        match (after, at) {
            (Some(mut after), Some(at)) => {
                after.supersedes = Some(newer.handover_id);
                staged.put_json(TreeId::Handovers, records::be(after.id).to_vec(), &after);
                Ok((None, Some(at.id)))
            }
            _ => Ok((None, Self::advance_lineage(staged, newer)?)),
        }
    }

    /// Where `newer` joins its lineage ([`Place`]), walked from the latest.
    fn place(staged: &Staged<'_>, newer: &Newer<'_>) -> Result<Place, StoreError> {
        let key = records::lineage_key(newer.patient_key, newer.sender, newer.event);
        let mut next = staged
            .get(TreeId::Lineage, &key)?
            .and_then(|v| records::from_be(&v));
        let mut after = None;
        for _ in 0..GIVEN_WALK {
            let Some(id) = next else { break };
            let Some(record) =
                staged.get_json::<super::HandoverRecord>(TreeId::Handovers, &records::be(id))?
            else {
                break;
            };
            match Place::step(&mut after, record, newer.episode) {
                Ok(place) => return Ok(place),
                Err(older) => next = older,
            }
        }
        Ok(Place::default())
    }

    /// Retires the deliveries `(actor, deliveries)` of a submit written
    /// before `latest`, each as superseded by `latest`'s copy in the same
    /// mailbox (or its first), and audits each.
    pub(super) fn superseded_on_arrival(
        &mut self,
        staged: &mut Staged<'_>,
        (actor, deliveries): (&str, &[(String, u64)]),
        latest: &super::HandoverRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut theirs = Vec::with_capacity(latest.deliveries.len());
        for id in &latest.deliveries {
            theirs.push((load(staged, *id)?.mailbox, *id));
        }
        for (mailbox, id) in deliveries {
            let mut d = load(staged, *id)?;
            d.superseded_by = records::replacement_in(&theirs, mailbox);
            d.superseded_by_handover = Some(latest.id);
            self.retire(staged, &mut d, now)?;
            let outcome = records::superseded_on_arrival_outcome(latest.id);
            self.audit(staged, records::supersede_event(actor, &d, outcome), now);
        }
        Ok(())
    }

    /// Marks `d` superseded and takes it out of every index it is in.
    pub(super) fn retire(
        &mut self,
        staged: &mut Staged<'_>,
        d: &mut DeliveryRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        let key = records::mailbox_key(&d.mailbox, d.id);
        if d.state == DeliveryState::Quarantined {
            staged.del(TreeId::Quarantine, key);
            self.forget_quarantined(d);
        } else {
            staged.del(TreeId::Pending, key);
            self.schedule.remove(d.id);
        }
        d.state = DeliveryState::Superseded;
        d.superseded_at_ms = Some(now);
        d.not_before_ms = None;
        d.lease_until_ms = None;
        staged.put_json(TreeId::Deliveries, records::be(d.id).to_vec(), &*d);
        // Finished, for retention, once its replacement is (now, if it is,
        // or if the newer handover goes to no one: nothing will replace it).
        match d.superseded_by {
            Some(by) => {
                let replacement: Option<DeliveryRecord> =
                    staged.get_json(TreeId::Deliveries, &records::be(by))?;
                if replacement.is_some_and(|r| {
                    r.state == DeliveryState::Delivered || r.finished_at_ms.is_some()
                }) {
                    self.delivery_finished(staged, d.clone(), now)?;
                } else {
                    staged.put(
                        TreeId::Superseded,
                        records::superseded_key(by, d.id),
                        Vec::new(),
                    );
                }
            }
            None if d.superseded_by_handover.is_some() => {
                self.delivery_finished(staged, d.clone(), now)?;
            }
            None => {}
        }
        Ok(())
    }

    /// Stale leased deliveries (of `mailbox`, or all) whose lease has expired:
    /// retired instead of offered again.
    pub(super) fn retire_expired_stale(
        &mut self,
        staged: &mut Staged<'_>,
        actor: &str,
        mailbox: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        for id in self.schedule.expired_stale(now, mailbox) {
            let mut d = load(staged, id)?;
            self.retire(staged, &mut d, now)?;
            let outcome = "ok: lease of a superseded copy ended without an ack".into();
            self.audit(staged, records::supersede_event(actor, &d, outcome), now);
        }
        Ok(())
    }

    /// Lets the parked deliveries of `patient_key` that share one of
    /// `claim_keys` (same identifier and date of birth) be claimed with the
    /// others too, so a claim by either identifier finds them.
    pub(super) fn extend_claim_keys(
        &mut self,
        staged: &mut Staged<'_>,
        patient_key: &str,
        claim_keys: &[String],
    ) -> Result<(), StoreError> {
        if claim_keys.len() < 2 {
            return Ok(());
        }
        for id in self
            .schedule
            .of_patient(records::PARKED_MAILBOX, patient_key)
        {
            let mut d = load(staged, id)?;
            if !d.shares_claim_key(claim_keys) {
                continue;
            }
            if d.widen_claim_keys(claim_keys) {
                staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
            }
        }
        Ok(())
    }

    /// Live and quarantined deliveries of a patient, by id.
    pub(super) fn deliveries_of(&self, patient_key: &str) -> BTreeSet<u64> {
        let mut ids: BTreeSet<u64> = self.schedule.of_patient_anywhere(patient_key);
        if let Some(q) = self.quarantined_of.get(patient_key) {
            ids.extend(q);
        }
        ids
    }

    /// Re-indexes a delivery whose patient key changed from `old`.
    fn rekey_delivery(&mut self, d: &DeliveryRecord, old: &str) {
        if d.state == DeliveryState::Quarantined {
            if let Some(set) = self.quarantined_of.get_mut(old) {
                set.remove(&d.id);
                if set.is_empty() {
                    self.quarantined_of.remove(old);
                }
            }
            self.quarantined_of
                .entry(d.patient_key.clone())
                .or_default()
                .insert(d.id);
        } else if let Some(mut live) = self.schedule.remove(d.id) {
            live.patient_key = d.patient_key.as_str().into();
            self.schedule.insert(d.id, live);
        }
    }
}

/// Whether admission `h`'s patient was released, or admitted again, after
/// it (a release or admission first reported after it, whoever sent it;
/// [`records::HandoverRecord::movement_start`]):
/// its notice, sent now, would tell the practice the patient is in that
/// prison when they are not, and reach it after the release summary.
pub(super) fn left_custody_since(
    staged: &Staged<'_>,
    h: &records::HandoverRecord,
) -> Result<bool, StoreError> {
    moved_since(
        staged,
        h,
        &[JourneyEvent::Release, JourneyEvent::Admission],
        None,
    )
}

/// Whether `h`'s patient had a movement of one of `events` first reported
/// after `h`, whoever sent it (a correction of an earlier movement is no
/// movement since), other than handover `besides` (a correction being
/// submitted, which may move the movement it corrects).
pub(super) fn moved_since(
    staged: &Staged<'_>,
    h: &records::HandoverRecord,
    events: &[JourneyEvent],
    besides: Option<u64>,
) -> Result<bool, StoreError> {
    let mut prefix = resolve(staged, &h.patient_key)?.into_bytes();
    prefix.push(0);
    let load =
        |id: u64| staged.get_json::<records::HandoverRecord>(TreeId::Handovers, &records::be(id));
    for (key, latest) in staged.scan_prefix(TreeId::Lineage, &prefix)? {
        let moved = records::lineage_event(&key).is_some_and(|e| events.contains(&e));
        let Some(id) =
            records::from_be(&latest).filter(|id| moved && *id > h.id && Some(*id) != besides)
        else {
            continue;
        };
        // A correction of a movement reported before `h` is no movement since.
        let Some(head) = load(id)? else { continue };
        if head.movement_start(load)? > h.id {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The patient an identifier resolves to (itself when never linked).
fn resolve(staged: &Staged<'_>, identifier: &str) -> Result<String, StoreError> {
    Ok(staged
        .get(TreeId::Identities, identifier.as_bytes())?
        .map_or_else(
            || identifier.to_owned(),
            |k| String::from_utf8_lossy(&k).into_owned(),
        ))
}

fn patient(staged: &Staged<'_>, key: &str) -> Result<PatientRecord, StoreError> {
    Ok(staged
        .get_json(TreeId::Patients, key.as_bytes())?
        .unwrap_or_default())
}

/// Links every identifier in `ids` to `key`; whether `record` changed.
fn link(
    staged: &mut Staged<'_>,
    record: &mut PatientRecord,
    key: &str,
    ids: &PatientIds,
) -> Result<bool, StoreError> {
    let mut changed = false;
    for (slot, given) in [
        (&mut record.nhs, &ids.nhs),
        (&mut record.prison, &ids.prison),
    ] {
        let Some(identifier) = given else { continue };
        if slot.is_none() {
            *slot = Some(identifier.clone());
            changed = true;
        }
        let linked = staged.get(TreeId::Identities, identifier.as_bytes())?;
        if linked.as_deref() != Some(key.as_bytes()) {
            staged.put(
                TreeId::Identities,
                identifier.as_bytes().to_vec(),
                key.as_bytes().to_vec(),
            );
        }
    }
    Ok(changed)
}

fn load(staged: &Staged<'_>, id: u64) -> Result<DeliveryRecord, StoreError> {
    staged
        .get_json(TreeId::Deliveries, &records::be(id))?
        .ok_or_else(|| StoreError::Corrupt(format!("delivery {id} has no record")))
}

/// Where a new handover joins its lineage (both engines): the latest
/// handover of its own custody episode, and the handover of a later episode
/// directly above it in the chain, when the new one is a late correction of
/// an earlier episode. Both `None`: a new episode (or a new lineage), which
/// becomes the latest.
#[derive(Default)]
pub(crate) struct Place {
    pub at: Option<super::HandoverRecord>,
    pub after: Option<super::HandoverRecord>,
}

impl Place {
    /// One step of the walk from the lineage's latest (both engines):
    /// `record` is the place when it is of `episode`; otherwise it goes in
    /// `after` and the walk goes on to the handover it supersedes.
    pub(crate) fn step(
        after: &mut Option<super::HandoverRecord>,
        record: super::HandoverRecord,
        episode: Option<&String>,
    ) -> Result<Place, Option<u64>> {
        if record.in_episode(episode) {
            return Ok(Place {
                at: Some(record),
                after: after.take(),
            });
        }
        let older = record.supersedes;
        *after = Some(record);
        Err(older)
    }
}

/// How far back a lineage is walked for the recipients it was given (and
/// for its end, when two chains join); both engines.
pub(crate) const GIVEN_WALK: usize = 32;

/// A new handover's destinations once its lineage is consulted.
pub(super) struct Routed {
    /// Where its copies go, withdrawal notices last.
    pub destinations: Vec<super::NewDelivery>,
    /// The destination sent where an earlier claim put the summary it
    /// corrects ([`records::follows_claim`]), or where it was sent on with
    /// the patient ([`records::follows_forward`]).
    pub followed: Option<Followed>,
}

/// See [`Routed::followed`].
pub(crate) struct Followed {
    pub index: usize,
    pub earlier: u64,
    pub why: Follow,
}

/// Why a correction's copy goes where the copy it corrects went.
pub(crate) enum Follow {
    /// A practice claimed the earlier copy out of the holding mailbox
    /// ([`records::follows_claim`]); the claimant.
    Claim(String),
    /// The earlier copy was sent on with the patient
    /// ([`records::follows_forward`]); the prison it was first queued for,
    /// and the handover that sent it on.
    Forward(String, Option<u64>),
}

impl Followed {
    /// Marks `record` (the followed destination's new delivery) as claimed,
    /// or sent on, where the earlier one was; the audit entry that says so.
    pub(crate) fn apply(&self, record: &mut DeliveryRecord, now: i64) -> AuditEvent {
        match &self.why {
            Follow::Claim(by) => {
                record.claimed_by = Some(by.clone());
                record.claimed_at_ms = Some(now);
                records::followed_claim_event(records::ROUTING_ACTOR, record, self.earlier)
            }
            Follow::Forward(from, by) => {
                record.forwarded_from = Some(from.clone());
                record.forwarded_by = *by;
                records::followed_forward_event(record, self.earlier)
            }
        }
    }
}

/// `h`'s destinations ([`Routed`]): a practice copy that would wait parked
/// goes to the practice that claimed the summary it corrects; and a
/// withdrawal notice goes to each organisation (not `@parked`) that was
/// given a copy of an earlier handover of its lineage (leased at least
/// once, or delivered) and is not among them.
pub(super) fn with_withdrawals(
    staged: &Staged<'_>,
    patient_key: &str,
    h: &super::NewHandover,
) -> Result<Routed, StoreError> {
    let lineage = records::lineage_key(patient_key, &h.sender, h.event);
    let mut next = staged
        .get(TreeId::Lineage, &lineage)?
        .and_then(|v| records::from_be(&v));
    let mut earlier = EarlierCopies::new(h);
    for _ in 0..GIVEN_WALK {
        let Some(id) = next else { break };
        let Some(older) =
            staged.get_json::<super::HandoverRecord>(TreeId::Handovers, &records::be(id))?
        else {
            break;
        };
        // Another custody episode's summaries are not corrected by this one
        // (a late correction of an earlier episode walks past a later one's).
        if older.in_episode(h.episode.as_ref()) {
            for d in &older.deliveries {
                earlier.visit(load(staged, *d)?);
            }
        }
        next = older.supersedes;
    }
    Ok(earlier.routed())
}

/// What the earlier summaries of a new handover's lineage tell it, their
/// deliveries visited newest handover first (both engines): a practice copy
/// that would wait parked goes to the practice that claimed the latest
/// earlier practice copy, a prison's copy goes where the latest earlier
/// one was sent on with the patient, and each organisation (not a holding mailbox)
/// given an earlier copy (leased at least once, or delivered) that the new
/// one does not go to is sent a withdrawal notice.
pub(crate) struct EarlierCopies<'a> {
    h: &'a super::NewHandover,
    routed: Routed,
    /// Only the latest earlier full copy says where its recipient went (a
    /// practice's claim, a prison's transfer onward): a copy of the newest
    /// handover that has one, the newest of its copies that was claimed or
    /// sent on (a copy sent again to the carer a correction named comes
    /// after the one the mistaken carer kept).
    full_of: Option<u64>,
    given: Vec<String>,
    /// Per view, the service given its newest earlier copy (see
    /// [`super::NewDelivery::may_follow`]).
    cared_by: Vec<(String, String)>,
    /// Recipients whose newest copy given was visited.
    decided: Vec<String>,
}

impl<'a> EarlierCopies<'a> {
    /// Nothing visited yet: `h`'s own destinations.
    pub(crate) fn new(h: &'a super::NewHandover) -> Self {
        Self {
            h,
            routed: Routed {
                destinations: h.destinations.clone(),
                followed: None,
            },
            full_of: None,
            given: Vec::new(),
            cared_by: Vec::new(),
            decided: Vec::new(),
        }
    }

    /// One delivery of an earlier handover.
    pub(crate) fn visit(&mut self, d: DeliveryRecord) {
        let (h, routed) = (self.h, &mut self.routed);
        if d.view == records::FULL_VIEW && self.full_of.is_none_or(|of| of == d.handover_id) {
            self.full_of = Some(d.handover_id);
            // Judged against the new handover's own destinations: a later
            // copy of the same handover that was claimed or sent on decides
            // instead of an earlier one; one that was neither changes nothing.
            let destinations = &h.destinations;
            let claim =
                records::follows_claim(h.event, destinations, &d, &h.claim_keys).map(|index| {
                    (
                        index,
                        Follow::Claim(d.claimed_by.clone().unwrap_or_default()),
                    )
                });
            let forward = || {
                records::follows_forward(h.event, destinations, &d).map(|index| {
                    let from = d.forwarded_from.clone().unwrap_or_default();
                    (index, Follow::Forward(from, d.forwarded_by))
                })
            };
            if let Some((index, why)) = claim.or_else(forward) {
                routed.destinations.clone_from(destinations);
                routed.destinations[index].mailbox.clone_from(&d.mailbox);
                routed.followed = Some(Followed {
                    index,
                    earlier: d.id,
                    why,
                });
            }
        }
        if d.state == DeliveryState::Delivered || d.attempt > 0 {
            if d.view != records::FULL_VIEW && !self.cared_by.iter().any(|(v, _)| *v == d.view) {
                self.cared_by.push((d.view.clone(), d.mailbox.clone()));
            }
            // The newest copy a recipient was given decides: a withdrawal
            // notice it acknowledged means it was told already, and needs
            // no other for each later correction (each one carried the
            // newer custody details). A notice only leased (its ack lost,
            // MESH down, then superseded) or quarantined told nothing: an
            // older copy decides, and a new notice goes.
            let notice = d.view == records::WITHDRAWN_VIEW;
            let told = notice && d.state == DeliveryState::Delivered;
            if (told || !notice) && !self.decided.contains(&d.mailbox) {
                self.decided.push(d.mailbox.clone());
                if !told {
                    self.given.push(d.mailbox);
                }
            }
        }
    }

    /// The destinations, withdrawal notices last. A treatment copy the area
    /// rule routed goes to the service of its kind given the newest earlier
    /// copy, while that service is active in the area: the area rule (the
    /// first service by ODS code) may pick another since (one disabled and
    /// enabled again, one registered), which never had the patient, while
    /// the service caring for them was sent a withdrawal notice.
    pub(crate) fn routed(self) -> Routed {
        let mut routed = self.routed;
        for (view, mailbox) in &self.cared_by {
            for dest in &mut routed.destinations {
                if dest.view != *view || dest.mailbox == *mailbox {
                    continue;
                }
                if let Some((_, not_carried)) = dest.may_follow.iter().find(|(m, _)| m == mailbox) {
                    dest.mailbox.clone_from(mailbox);
                    dest.not_carried.clone_from(not_carried);
                }
            }
        }
        if let Some(notice) = &self.h.withdrawal {
            for mailbox in self.given {
                if !mailbox.starts_with('@')
                    && !routed.destinations.iter().any(|x| x.mailbox == mailbox)
                {
                    routed.destinations.push(super::NewDelivery {
                        mailbox,
                        ..(**notice).clone()
                    });
                }
            }
        }
        routed
    }
}

/// Two lineages merged: the other's latest summary (`earlier`) and its
/// chain join the end of `latest`'s chain (`supersedes`), unless already in
/// it, so that a later correction's walk ([`EarlierCopies`]) reaches the
/// recipients of both and sends each a withdrawal notice it needs. Only
/// the latest of the two was linked when it named none: the recipients of
/// the other patient's summaries were never told (PostgreSQL: the same in
/// `pg::identity`).
fn join_chains(staged: &mut Staged<'_>, latest: u64, earlier: u64) -> Result<(), StoreError> {
    let mut at = latest;
    for _ in 0..GIVEN_WALK {
        if at == earlier {
            return Ok(());
        }
        let key = records::be(at);
        let Some(mut h) = staged.get_json::<super::HandoverRecord>(TreeId::Handovers, &key)? else {
            return Ok(());
        };
        match h.supersedes {
            Some(next) => at = next,
            None => {
                h.supersedes = Some(earlier);
                staged.put_json(TreeId::Handovers, key.to_vec(), &h);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Whether handover `id` may be of custody episode `episode` (one removed
/// under the retention policy is taken as not).
fn in_episode_of(
    staged: &Staged<'_>,
    id: u64,
    episode: Option<&String>,
) -> Result<bool, StoreError> {
    let record: Option<super::HandoverRecord> =
        staged.get_json(TreeId::Handovers, &records::be(id))?;
    Ok(record.is_some_and(|r| r.in_episode(episode)))
}

/// Handover `id`'s place in its lineage (arrival order alone when its
/// record went under the retention policy).
fn recency_of(staged: &Staged<'_>, id: u64) -> Result<Recency, StoreError> {
    let record: Option<super::HandoverRecord> =
        staged.get_json(TreeId::Handovers, &records::be(id))?;
    Ok(record.as_ref().map_or(
        Recency {
            authored_at_ms: None,
            handover_id: id,
        },
        Recency::from,
    ))
}

/// The sending organisation of a delivery (older records name it only on
/// their handover).
fn sender_of(staged: &Staged<'_>, d: &DeliveryRecord) -> Result<String, StoreError> {
    if let Some(sender) = &d.sender {
        return Ok(sender.clone());
    }
    let handover: Option<super::HandoverRecord> =
        staged.get_json(TreeId::Handovers, &records::be(d.handover_id))?;
    Ok(handover.map(|h| h.sender).unwrap_or_default())
}
