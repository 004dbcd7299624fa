//! What the Personal Demographics Service (PDS) found for a parked release,
//! and the automatic claim it allows (see `crate::pds` and docs/journey.md).
//!
//! # Invariants
//! - A finding is written only onto a delivery that is still parked: a
//!   release claimed, superseded or redriven meanwhile is left alone.
//! - An automatic claim moves one parked delivery (the one looked up) to
//!   the practice's mailbox in the writer's transaction, with its audit
//!   entry (`claim`, actor [`PDS_ACTOR`], source PDS): the same group commit
//!   and durability barrier as every other claim.
//! - A restricted record's practice is never stored ([`PdsFinding::practice`]
//!   is `None` whatever the caller passes).

use serde::{Deserialize, Serialize};

use super::records::{self, DeliveryState, HandoverRecord, PARKED_MAILBOX, TreeId};
use super::writer::{Staged, Writer, live_of};
use super::{DeliveryRecord, NewDelivery, SledStore, StoreError};
use crate::audit::AuditEvent;
use crate::journey::JourneyEvent;

/// The identity the PDS lookups act as in the audit trail.
pub const PDS_ACTOR: &str = "service:pds";

/// What PDS said about a parked release's patient, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PdsStatus {
    /// Registered at a practice on the network: routed there.
    Routed,
    /// Registered at a practice that is not on the network (or disabled).
    NotConnected,
    /// PDS names no registered practice (yet).
    NoPractice,
    /// PDS has no patient with this NHS number (or it was invalidated).
    NotFound,
    /// PDS's date of birth differs from the summary's.
    DobMismatch,
    /// The NHS number was superseded by another.
    Superseded,
    /// PDS records the patient as deceased.
    Deceased,
    /// A restricted (sensitive) record: the practice is never revealed.
    Restricted,
    /// PDS records the patient's removal from registration: the practice it
    /// lists may no longer hold them.
    Removed,
    /// The summary carries no NHS number: PDS cannot be asked.
    NoNhsNumber,
}

impl PdsStatus {
    /// Every status, in declaration order.
    pub const ALL: [PdsStatus; 10] = [
        PdsStatus::Routed,
        PdsStatus::NotConnected,
        PdsStatus::NoPractice,
        PdsStatus::NotFound,
        PdsStatus::DobMismatch,
        PdsStatus::Superseded,
        PdsStatus::Deceased,
        PdsStatus::Restricted,
        PdsStatus::Removed,
        PdsStatus::NoNhsNumber,
    ];

    /// Upper-case name for the wire and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            PdsStatus::Routed => "ROUTED",
            PdsStatus::NotConnected => "NOT_CONNECTED",
            PdsStatus::NoPractice => "NO_PRACTICE",
            PdsStatus::NotFound => "NOT_FOUND",
            PdsStatus::DobMismatch => "DOB_MISMATCH",
            PdsStatus::Superseded => "SUPERSEDED_NHS_NUMBER",
            PdsStatus::Deceased => "DECEASED",
            PdsStatus::Restricted => "RESTRICTED",
            PdsStatus::Removed => "REMOVED_FROM_REGISTRATION",
            PdsStatus::NoNhsNumber => "NO_NHS_NUMBER",
        }
    }

    /// Lower-case word for a metric label.
    pub fn label(self) -> &'static str {
        match self {
            PdsStatus::Routed => "routed",
            PdsStatus::NotConnected => "not_connected",
            PdsStatus::NoPractice => "no_practice",
            PdsStatus::NotFound => "not_found",
            PdsStatus::DobMismatch => "dob_mismatch",
            PdsStatus::Superseded => "superseded",
            PdsStatus::Deceased => "deceased",
            PdsStatus::Restricted => "restricted",
            PdsStatus::Removed => "removed",
            PdsStatus::NoNhsNumber => "no_nhs_number",
        }
    }

    /// Why it stays parked, for operators (no patient data).
    pub fn reason(self, practice: Option<&str>) -> String {
        match self {
            PdsStatus::Routed => format!("routed to {}", practice.unwrap_or("?")),
            PdsStatus::NotConnected => format!(
                "registered at {}, not connected",
                practice.unwrap_or("a practice")
            ),
            PdsStatus::NoPractice => "PDS names no registered GP practice".into(),
            PdsStatus::NotFound => "PDS has no patient with this NHS number".into(),
            PdsStatus::DobMismatch => {
                "date of birth differs from PDS: identity to be checked by an operator".into()
            }
            PdsStatus::Superseded => {
                "NHS number superseded in PDS: identity to be checked by an operator".into()
            }
            PdsStatus::Deceased => "PDS records the patient as deceased".into(),
            PdsStatus::Restricted => {
                "restricted record in PDS: never routed automatically, practice not revealed".into()
            }
            PdsStatus::Removed => {
                "PDS records a removal from registration (moved away?): the practice it lists may not hold the patient; to be checked by an operator".into()
            }
            PdsStatus::NoNhsNumber => "no NHS number in the summary: PDS cannot be asked".into(),
        }
    }

    /// Whether a later lookup may change the answer (a stale DOB or a
    /// superseded number needs a person, not another lookup).
    pub fn worth_rechecking(self) -> bool {
        matches!(
            self,
            PdsStatus::NotConnected
                | PdsStatus::NoPractice
                | PdsStatus::NotFound
                | PdsStatus::Removed
        )
    }
}

/// The last PDS lookup of a parked release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PdsFinding {
    /// What PDS said.
    pub status: PdsStatus,
    /// The registered practice's ODS code; never for a restricted record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub practice: Option<String>,
    /// When PDS was asked, ms since the epoch.
    pub checked_at_ms: i64,
    /// When to ask again; `None`: no automatic lookup any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_check_ms: Option<i64>,
    /// Lookups so far (the back-off doubles with each).
    pub lookups: u32,
}

impl PdsFinding {
    /// The reason shown to operators.
    pub fn reason(&self) -> String {
        self.status.reason(self.practice.as_deref())
    }
}

/// A PDS answer for one parked delivery, for the writer.
#[derive(Debug, Clone)]
pub struct PdsResult {
    /// The parked delivery looked up.
    pub delivery_id: u64,
    /// What PDS said.
    pub finding: PdsFinding,
    /// The practice mailbox to move it to (an automatic claim), if any.
    pub route_to: Option<String>,
}

/// An admission notice PDS found a practice for: the admission went to
/// nobody (its summary named no GP on the network).
#[derive(Debug, Clone)]
pub struct PdsNotice {
    /// The admission.
    pub handover_id: u64,
    /// The practice to notify, its view, urgency and deadline, as routing
    /// would have chosen had the summary named it.
    pub delivery: NewDelivery,
}

impl SledStore {
    /// Admissions submitted at or after `since_ms` that went to nobody,
    /// newest first, at most `limit`.
    ///
    /// # Errors
    /// Store failures.
    pub fn unrouted_admissions(
        &self,
        since_ms: i64,
        skip: &std::collections::HashSet<u64>,
        limit: usize,
    ) -> Result<Vec<HandoverRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in self.inner.trees[TreeId::Handovers as usize].iter().rev() {
            let (_, raw) = entry?;
            let h: HandoverRecord = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::Corrupt(format!("handover: {e}")))?;
            if h.submitted_at_ms < since_ms || out.len() >= limit {
                break;
            }
            if h.event == JourneyEvent::Admission
                && h.deliveries.is_empty()
                && h.shredded_at_ms.is_none()
                && !skip.contains(&h.id)
            {
                out.push(h);
            }
        }
        Ok(out)
    }

    /// Sends an unrouted admission's notice to the practice PDS names
    /// (audited as [`PDS_ACTOR`]); returns the new delivery's id, or `None`
    /// when the admission already went somewhere or a newer one replaced it.
    ///
    /// # Errors
    /// Only store failures.
    pub async fn pds_notify(&self, notice: PdsNotice) -> Result<Option<u64>, StoreError> {
        self.ask(|reply| super::Job::PdsNotify(notice, reply)).await
    }
}

impl Writer {
    /// Adds the notice's delivery to its admission (see [`Store::pds_notify`]).
    pub(super) fn pds_notify(
        &mut self,
        staged: &mut Staged<'_>,
        notice: &PdsNotice,
        now: i64,
    ) -> Result<Option<u64>, StoreError> {
        let key = records::be(notice.handover_id);
        let Some(mut h) = staged.get_json::<HandoverRecord>(TreeId::Handovers, &key)? else {
            return Ok(None);
        };
        let lineage = records::lineage_key(&h.patient_key, &h.sender, h.event);
        let latest = staged
            .get(TreeId::Lineage, &lineage)?
            .and_then(|v| records::from_be(&v));
        // Its payload gone under the retention policy: no notice to send.
        if !h.deliveries.is_empty()
            || h.shredded_at_ms.is_some()
            || latest.is_some_and(|l| l != h.id)
            || super::identity::left_custody_since(staged, &h)?
        {
            return Ok(None);
        }
        Self::reopen(&mut h);
        self.last_delivery += 1;
        let d = notice_delivery(&h, &notice.delivery, self.last_delivery, now);
        staged.put_json(TreeId::Deliveries, records::be(d.id).to_vec(), &d);
        staged.put(
            TreeId::Pending,
            records::mailbox_key(&d.mailbox, d.id),
            Vec::new(),
        );
        self.schedule.insert(d.id, live_of(&d));
        h.deliveries.push(d.id);
        staged.put_json(TreeId::Handovers, key.to_vec(), &h);
        self.audit(
            staged,
            AuditEvent {
                actor: PDS_ACTOR.to_owned(),
                action: "route",
                handover_id: Some(h.id),
                delivery_id: Some(d.id),
                patient_key: Some(h.patient_key.clone()),
                outcome: format!(
                    "ok: admission notice sent to {} (source: PDS, registered practice)",
                    d.mailbox
                ),
            },
            now,
        );
        Ok(Some(d.id))
    }

    /// Records `result` on its parked delivery, and moves it to
    /// `result.route_to` when set. Returns the delivery as it now stands, or
    /// `None` when it is no longer parked (claimed, superseded: left alone).
    pub(super) fn pds_result(
        &mut self,
        staged: &mut Staged<'_>,
        result: PdsResult,
        now: i64,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let id = result.delivery_id;
        let Some(mut d) =
            staged.get_json::<DeliveryRecord>(TreeId::Deliveries, &records::be(id))?
        else {
            return Ok(None);
        };
        if d.state != DeliveryState::Parked || d.mailbox != PARKED_MAILBOX {
            return Ok(None);
        }
        let mut finding = result.finding;
        if finding.status == PdsStatus::Restricted {
            finding.practice = None;
        }
        let outcome = match &result.route_to {
            Some(to) => {
                self.move_parked(staged, &mut d, to, now);
                format!("ok: parked release claimed for {to} (source: PDS, registered practice)")
            }
            None => format!("ok: kept parked: {}", finding.reason()),
        };
        d.pds = Some(finding);
        staged.put_json(TreeId::Deliveries, records::be(id).to_vec(), &d);
        self.audit(
            staged,
            AuditEvent {
                actor: PDS_ACTOR.to_owned(),
                action: if result.route_to.is_some() {
                    "claim"
                } else {
                    "pds_lookup"
                },
                handover_id: Some(d.handover_id),
                delivery_id: Some(id),
                patient_key: Some(d.patient_key.clone()),
                outcome,
            },
            now,
        );
        // Its pullers are woken as the release's (the same mailbox).
        self.take_on_claimed(staged, &d, now, &mut std::collections::BTreeSet::new())?;
        Ok(Some(d))
    }

    /// The claim's move: out of the parked index into `to`'s, queued.
    fn move_parked(&mut self, staged: &mut Staged<'_>, d: &mut DeliveryRecord, to: &str, now: i64) {
        staged.del(TreeId::Pending, records::mailbox_key(&d.mailbox, d.id));
        self.schedule.remove(d.id);
        d.mailbox = to.to_owned();
        d.state = DeliveryState::Queued;
        d.claimed_by = Some(PDS_ACTOR.to_owned());
        d.claimed_at_ms = Some(now);
        staged.put(TreeId::Pending, records::mailbox_key(to, d.id), Vec::new());
        self.schedule.insert(d.id, live_of(d));
    }
}

/// The delivery record of an admission notice found through PDS.
pub(super) fn notice_delivery(
    h: &HandoverRecord,
    dest: &NewDelivery,
    id: u64,
    now: i64,
) -> DeliveryRecord {
    let owner = super::writer::Owner {
        handover_id: h.id,
        sender: &h.sender,
        event: h.event,
        patient_key: &h.patient_key,
    };
    super::writer::new_delivery(&owner, dest, id, &[], now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_reason_names_no_practice() {
        let r = PdsStatus::Restricted.reason(Some("YG001"));
        assert!(!r.contains("YG001"), "{r}");
        assert_eq!(
            PdsStatus::NotConnected.reason(Some("Y12345")),
            "registered at Y12345, not connected"
        );
        assert!(!PdsStatus::DobMismatch.worth_rechecking());
        assert!(PdsStatus::NoPractice.worth_rechecking());
    }
}
