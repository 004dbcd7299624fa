//! What the store keeps, one record type per tree, and the key layout.
//!
//! Keys are big-endian so range scans come back in sequence order.
//!
//! | tree         | key                                   | value                         |
//! |--------------|---------------------------------------|-------------------------------|
//! | `handovers`  | handover id (u64 BE)                  | [`HandoverRecord`] JSON       |
//! | `payloads`   | handover id (u64 BE) ++ chunk (u32 BE)| crc32 (u32 BE) ++ chunk of the sealed payload ([`super::crypt`]) |
//! | `deliveries` | delivery id (u64 BE)                  | [`DeliveryRecord`] JSON       |
//! | `pending`    | mailbox key ++ delivery id (u64 BE)   | empty: live (queued/leased)   |
//! | `quarantine` | mailbox key ++ delivery id (u64 BE)   | empty                         |
//! | `dedupe`     | sender ++ 0x00 ++ message id          | handover id (u64 BE)          |
//! | `audit`      | sequence (u64 BE)                     | [`crate::audit`] entry JSON   |
//! | `meta`       | name                                  | u64 BE (`audit_cut`: [`crate::audit::SignedAuditCut`] JSON) |
//! | `registry`   | ODS code                              | organisation JSON (operator changes over the file) |
//! | `data_keys`  | handover id (u64 BE)                  | wrapped data key ([`super::crypt`]) |
//! | `identities` | identifier hash (`nhs:`/`prison:` keyed hash) | patient key it resolves to |
//! | `patients`   | patient key                           | [`PatientRecord`] JSON        |
//! | `lineage`    | patient key ++ 0x00 ++ sender ++ 0x00 ++ event | latest handover id (u64 BE) |
//! | `conflicts`  | audit sequence of the refusal (u64 BE) | [`IdentityConflict`] JSON    |
//! | `retention`  | due ms (u64 BE) ++ [`RetentionKind`] byte ++ handover id (u64 BE) | empty: work due then ([`super::retention`]); for [`RetentionKind::Identity`] the patient key |
//! | `superseded` | replacement delivery id (u64 BE) ++ superseded delivery id (u64 BE) | empty: waits for the replacement to finish |
//! | `tombstones` | `h` ++ handover id (u64 BE), or `m` ++ dedupe key | [`Tombstone`] JSON: removed under the retention policy |
//!
//! A mailbox key is the ODS code's length (one byte) then its bytes, so one
//! mailbox's keys form a contiguous range that no other mailbox's can prefix.
//! Releases with no known GP wait in the mailbox [`PARKED_MAILBOX`], which no
//! ODS code can name, until claimed.

use serde::{Deserialize, Serialize};

use crate::journey::JourneyEvent;

/// Largest payload chunk. A leaf of several still goes to a sled blob file,
/// which the durability barrier syncs (`barrier.rs`).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The trees, in the order the store opens them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TreeId {
    /// Handover records.
    Handovers = 0,
    /// Payload chunks.
    Payloads,
    /// Delivery records.
    Deliveries,
    /// Index of live deliveries per mailbox.
    Pending,
    /// Index of quarantined deliveries per mailbox.
    Quarantine,
    /// Idempotency keys.
    Dedupe,
    /// Hash-chained audit trail.
    Audit,
    /// Counters.
    Meta,
    /// Registry changes made by operators.
    Registry,
    /// Each handover's payload key, wrapped by a key epoch's key.
    DataKeys,
    /// Identifier hash → patient key.
    Identities,
    /// Patient key → the identifiers linked to it and the keys merged into it.
    Patients,
    /// (patient, sender, event) → the latest handover, for supersession.
    Lineage,
    /// Refused identity links, for operators.
    Conflicts,
    /// Retention work by due time.
    Retention,
    /// Superseded deliveries waiting for their replacement to finish.
    Superseded,
    /// What the retention policy removed, for Track's answer.
    Tombstones,
    /// What the MESH edge did with each delivery it pushes.
    Mesh,
}

impl TreeId {
    /// Every tree, indexed by discriminant.
    pub const ALL: [TreeId; 18] = [
        TreeId::Handovers,
        TreeId::Payloads,
        TreeId::Deliveries,
        TreeId::Pending,
        TreeId::Quarantine,
        TreeId::Dedupe,
        TreeId::Audit,
        TreeId::Meta,
        TreeId::Registry,
        TreeId::DataKeys,
        TreeId::Identities,
        TreeId::Patients,
        TreeId::Lineage,
        TreeId::Conflicts,
        TreeId::Retention,
        TreeId::Superseded,
        TreeId::Tombstones,
        TreeId::Mesh,
    ];

    /// The sled tree name.
    pub fn name(self) -> &'static str {
        match self {
            TreeId::Handovers => "handovers",
            TreeId::Payloads => "payloads",
            TreeId::Deliveries => "deliveries",
            TreeId::Pending => "pending",
            TreeId::Quarantine => "quarantine",
            TreeId::Dedupe => "dedupe",
            TreeId::Audit => "audit",
            TreeId::Meta => "meta",
            TreeId::Registry => "registry",
            TreeId::DataKeys => "data_keys",
            TreeId::Identities => "identities",
            TreeId::Patients => "patients",
            TreeId::Lineage => "lineage",
            TreeId::Conflicts => "conflicts",
            TreeId::Retention => "retention",
            TreeId::Superseded => "superseded",
            TreeId::Tombstones => "tombstones",
            TreeId::Mesh => "mesh",
        }
    }
}

/// The holding mailbox of parked releases (no ODS code can name it).
pub const PARKED_MAILBOX: &str = "@parked";

/// The view of a summary given whole (a practice's or a prison's copy).
pub(crate) const FULL_VIEW: &str = "full";

/// The view of a withdrawal notice ([`crate::clinical::views::View::Withdrawn`]).
pub(crate) const WITHDRAWN_VIEW: &str = "withdrawn";

/// The view of an admission notice (`View::AdmissionNotice`).
pub(crate) const ADMISSION_NOTICE_VIEW: &str = "admission_notice";

/// The holding mailbox of substance misuse service copies with no service
/// for the release area. Its deliveries are parked, but no claim or PDS
/// lookup touches them: only a corrected release supersedes them.
pub const PARKED_SUBSTANCE_MISUSE_MAILBOX: &str = "@parked-substance-misuse";

/// The holding mailbox of mental health team copies with no team for the
/// release area (as [`PARKED_SUBSTANCE_MISUSE_MAILBOX`]).
pub const PARKED_MENTAL_HEALTH_MAILBOX: &str = "@parked-mental-health";

/// The audit entry of a submit refused because its message id names a
/// handover removed under the retention policy (tombstone `t`).
pub fn retired_event(actor: &str, t: &Tombstone) -> crate::audit::AuditEvent {
    crate::audit::AuditEvent {
        actor: actor.to_owned(),
        action: "submit",
        handover_id: Some(t.handover_id),
        outcome: "refused: message id of a handover removed under the retention policy".into(),
        ..crate::audit::AuditEvent::default()
    }
}

/// An audit entry by `actor` about delivery `d` (its handover and patient).
pub(crate) fn delivery_event(
    actor: &str,
    action: &'static str,
    d: &DeliveryRecord,
    outcome: impl Into<String>,
) -> crate::audit::AuditEvent {
    crate::audit::AuditEvent {
        actor: actor.to_owned(),
        action,
        handover_id: Some(d.handover_id),
        delivery_id: Some(d.id),
        patient_key: Some(d.patient_key.clone()),
        outcome: outcome.into(),
    }
}

/// The patient moving on from prison `from` by `event` (with its routed
/// `destinations`) to who takes them on: the receiving prison of a
/// transfer, the GP of a release (its full copy, when not parked or held).
/// `None` for other events.
pub(crate) fn moving_on<'a>(
    from: &'a str,
    event: JourneyEvent,
    destinations: &'a [super::NewDelivery],
) -> Option<MovingOn<'a>> {
    matches!(event, JourneyEvent::Transfer | JourneyEvent::Release).then_some(())?;
    destinations
        .iter()
        .find(|d| d.view == FULL_VIEW && !d.mailbox.starts_with('@'))
        .map(|next| MovingOn {
            from,
            to: &next.mailbox,
            event,
            due_ms: next.due_ms,
            before: None,
        })
}

/// The patient of parked release `d`, just claimed for a practice (by the
/// practice, an operator or PDS), moving on from the prison that released
/// them to that practice, as an unparked release does ([`moving_on`]):
/// what the prison never acknowledged waited for the GP as long as the
/// release did. Only what reached the prison before the release moves (a
/// claim may come weeks later, after a recall brought the patient back:
/// what the new custody sent there is the prison's). `None` for anything
/// but a release's full copy now queued outside a holding mailbox.
pub(crate) fn claimed_moving_on(d: &DeliveryRecord) -> Option<MovingOn<'_>> {
    let claimed = d.event == Some(JourneyEvent::Release)
        && d.view == FULL_VIEW
        && d.state == DeliveryState::Queued
        && !d.mailbox.starts_with('@');
    claimed.then_some(())?;
    d.sender.as_deref().map(|from| MovingOn {
        from,
        to: &d.mailbox,
        event: JourneyEvent::Release,
        due_ms: d.due_ms,
        before: Some(d.handover_id),
    })
}

/// A prison's patient moving on: from its mailbox `from` to `to`'s, by an
/// `event` (a transfer or a release) whose copy for `to` is due `due_ms`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MovingOn<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub event: JourneyEvent,
    pub due_ms: Option<i64>,
    /// Only copies of handovers submitted before this one move (a claimed
    /// release's: [`claimed_moving_on`]).
    pub before: Option<u64>,
}

/// Whether `d`, waiting in the mailbox of a prison whose patient now moves
/// on (`m`), goes with them: a summary meant for the prison that holds the
/// patient, not acknowledged (queued, or leased and not yet acked), not
/// superseded, and not written by `m.to` itself. The prison never confirmed
/// it had it, so its own summary may not carry it. A transfer takes on the
/// previous prison's transfer summary and the GP's community summary; a
/// release gives the GP the previous prison's transfer summary (the GP's
/// own record is theirs already). A copy the prison acknowledged stays: it
/// has it (docs/journey.md).
pub(crate) fn forwards_to(d: &DeliveryRecord, m: &MovingOn<'_>) -> bool {
    m.before.is_none_or(|b| d.handover_id < b)
        && matches!(d.state, DeliveryState::Queued | DeliveryState::Leased)
        && goes_with(d, m)
}

/// Whether `d` is a summary that goes with the patient moving on (`m`)
/// from the carer it was queued for, whatever its state: the kind the
/// movement carries ([`forwards_to`]), a full copy, not superseded, not
/// written by `m.to`.
fn goes_with(d: &DeliveryRecord, m: &MovingOn<'_>) -> bool {
    let carried = match m.event {
        JourneyEvent::Transfer => matches!(
            d.event,
            Some(JourneyEvent::Transfer | JourneyEvent::CommunitySummary)
        ),
        JourneyEvent::Release => d.event == Some(JourneyEvent::Transfer),
        _ => false,
    };
    carried
        && d.view == FULL_VIEW
        && !d.is_superseded()
        && d.mailbox == m.from
        && m.from != m.to
        && d.sender.as_deref() != Some(m.to)
}

/// Whether `d`, acknowledged by the carer (`m.from`) a transfer or release
/// first named ([`Mistaken`]: it and its corrections that kept that
/// carer), is sent again to `m.to`, where the correction of that transfer or release says
/// the patient went: the patient never arrived at `m.from`, so the carer
/// that has them never had it. Only what reached `m.from` because of the
/// mistake: a summary submitted after it, or one sent on with it. What
/// `m.from` had of an earlier stay is its own. A copy sent on before
/// [`DeliveryRecord::forwarded_by`] was recorded counts as sent on with the
/// mistake when it was acknowledged after it was submitted.
pub(crate) fn resends_to(d: &DeliveryRecord, m: &MovingOn<'_>, mistaken: &Mistaken) -> bool {
    let Some(first) = mistaken.ids.first() else {
        return false;
    };
    let sent_with_it = match d.forwarded_by {
        Some(by) => mistaken.ids.contains(&by),
        None => {
            d.forwarded_from.is_some() && d.delivered_at_ms.is_some_and(|at| at >= mistaken.at_ms)
        }
    };
    d.state == DeliveryState::Delivered
        && (d.handover_id > *first || sent_with_it)
        && goes_with(d, m)
}

/// Which of `copies` (one handover's deliveries) goes again to `m.to`
/// ([`resends_to`]): none when `m.to` has a copy already.
pub(crate) fn copy_to_resend<'a>(
    copies: &'a [DeliveryRecord],
    m: &MovingOn<'_>,
    mistaken: &Mistaken,
) -> Option<&'a DeliveryRecord> {
    if copies.iter().any(|c| holds(c, m.to)) {
        return None;
    }
    copies.iter().find(|d| resends_to(d, m, mistaken))
}

/// A new copy, delivery `id`, of `d` ([`resends_to`]) for `m.to`, sent by
/// correction `by` of patient `patient_key` (the key the patient is filed
/// under now: an acknowledged copy keeps the key of its day, which a merge
/// since may have retired), queued afresh as a copy sent on is
/// ([`send_on`]): its attempts from nought, due no sooner than the copy
/// that moved it.
pub(crate) fn resent_copy(
    d: &DeliveryRecord,
    m: &MovingOn<'_>,
    (id, by): (u64, u64),
    patient_key: &str,
    now: i64,
) -> DeliveryRecord {
    let mut copy = DeliveryRecord {
        id,
        handover_id: d.handover_id,
        mailbox: d.mailbox.clone(),
        patient_key: patient_key.to_owned(),
        urgent: d.urgent,
        state: DeliveryState::Queued,
        attempt: 0,
        lease_until_ms: None,
        not_before_ms: None,
        queued_at_ms: now,
        last_leased_at_ms: None,
        delivered_at_ms: None,
        quarantined_at_ms: None,
        reason: None,
        view: d.view.clone(),
        not_carried: d.not_carried.clone(),
        event: d.event,
        due_ms: d.due_ms,
        overdue_at_ms: None,
        superseded_by: None,
        superseded_by_handover: None,
        sender: d.sender.clone(),
        superseded_at_ms: None,
        claim_keys: d.claim_keys.clone(),
        claimed_by: None,
        claimed_at_ms: None,
        max_attempts: None,
        finished_at_ms: None,
        pds: None,
        nacked_attempt: None,
        forwarded_from: d.forwarded_from.clone(),
        forwarded_by: None,
    };
    send_on(&mut copy, m, by, 0);
    copy
}

/// The audit entry of `copy` ([`resent_copy`]) sent again to the carer
/// correction `handover` names, from `from`, which acknowledged it.
pub(crate) fn resend_event(
    copy: &DeliveryRecord,
    from: &str,
    handover: u64,
) -> crate::audit::AuditEvent {
    delivery_event(
        ROUTING_ACTOR,
        "forward",
        copy,
        format!(
            "ok: sent again to {}, to whom correction {handover} sent the patient: {from}, named by mistake, acknowledged it",
            copy.mailbox
        ),
    )
}

/// Who the `event` (a transfer or a release) whose `copies` these are
/// sent the patient to: the mailbox its full copy was first queued for (a
/// copy parked or held names none).
pub(crate) fn first_carer<'a>(
    copies: impl IntoIterator<Item = &'a DeliveryRecord>,
    event: JourneyEvent,
) -> Option<String> {
    copies
        .into_iter()
        .find(|d| d.event == Some(event) && d.view == FULL_VIEW)
        .map(|d| {
            d.forwarded_from
                .clone()
                .unwrap_or_else(|| d.mailbox.clone())
        })
        .filter(|m| !m.starts_with('@'))
}

/// The carer a transfer or release first sent its patient to
/// ([`first_carer`]), and the handovers that named it: what a correction
/// to another carer takes from ([`resends_to`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FirstNamed {
    pub carer: String,
    pub mistaken: Mistaken,
}

/// Logs that correction `correction` found no record of the transfer or
/// release it corrects (`corrected`: retention removed its metadata), so
/// nothing acknowledged at the carer that one named can be sent on: an
/// operator must ask whether the carer corrected to needs it.
pub(crate) fn corrected_handover_removed(corrected: u64, correction: u64) {
    tracing::warn!(
        alert = "corrected_handover_removed",
        corrected,
        correction,
        "a correction cannot tell which carer the transfer or release it corrects named, nor send on what that carer acknowledged: its record was removed under the retention policy"
    );
}

/// Whether `older`, which `newer` corrects, reports the same custody
/// movement to the same carer (`older_carer`, `carer`): a correction of
/// content only, still to the carer named by mistake. An earlier, real
/// movement to that carer (another transfer time or release date, or
/// another custody episode, where both are known) is not part of the
/// mistake.
pub(crate) fn kept_carer(
    newer: &HandoverRecord,
    older: &HandoverRecord,
    older_carer: Option<&str>,
    carer: &str,
) -> bool {
    let same_or_unknown =
        |a: Option<&String>, b: Option<&String>| a.is_none() || b.is_none() || a == b;
    older.sender == newer.sender
        && older.event == newer.event
        && same_or_unknown(older.episode.as_ref(), newer.episode.as_ref())
        && (older.movement.is_none()
            || newer.movement.is_none()
            || newer.reports_movement_of(older))
        && older_carer == Some(carer)
}

/// A transfer or release that named a carer by mistake, and the
/// corrections of it that kept that carer (a content-only correction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mistaken {
    /// Their ids, oldest first (never empty).
    pub ids: Vec<u64>,
    /// When the first was submitted.
    pub at_ms: i64,
}

/// Moves `d` ([`forwards_to`]) to `m.to`'s mailbox with transfer or release
/// `by`, queued there afresh: a
/// lease the prison it leaves holds is revoked (its late ack or nack is
/// answered as for an id not its own), `m.to` has a full `max_attempts`
/// after the attempts already used, and it is due no sooner than the copy
/// that moved it (a deadline passed at the prison is not the new carer's).
pub(crate) fn send_on(d: &mut DeliveryRecord, m: &MovingOn<'_>, by: u64, max_attempts: u32) {
    let from = std::mem::replace(&mut d.mailbox, m.to.to_owned());
    d.forwarded_from.get_or_insert(from);
    d.forwarded_by = Some(by);
    d.state = DeliveryState::Queued;
    d.lease_until_ms = None;
    d.not_before_ms = None;
    if d.attempt > 0 {
        d.max_attempts = Some(d.attempt.saturating_add(max_attempts));
    }
    // An urgent copy keeps its own: a routine move must not hide that it is
    // late (an opioid substitution summary due at the next dose).
    if let Some(due) = m.due_ms.filter(|_| !d.urgent)
        && d.due_ms.is_none_or(|before| before < due)
    {
        d.due_ms = Some(due);
        d.overdue_at_ms = None;
    }
}

/// The audit entry of `d` sent on from `from` by transfer or release
/// `handover` (`d` already names its new mailbox).
pub(crate) fn forward_event(
    d: &DeliveryRecord,
    from: &str,
    handover: u64,
) -> crate::audit::AuditEvent {
    delivery_event(
        ROUTING_ACTOR,
        "forward",
        d,
        format!(
            "ok: sent on from {from}, which never acknowledged it, to {}, to whom handover {handover} sent the patient",
            d.mailbox
        ),
    )
}

/// The copy of `d`'s summary (one of its handover's `copies`) that `to`
/// holds already or will: another full copy there, acknowledged or on its
/// way (queued or leased), not superseded. `d`, moving on to `to`, is
/// retired in its favour, not sent there again. A copy sent again to the
/// carer a correction named ([`resent_copy`]) and moved back by a later
/// correction to the carer that kept the first reached it twice. A
/// withdrawal notice, or a copy quarantined there, holds no summary.
pub(crate) fn held_by<'a>(
    copies: &'a [DeliveryRecord],
    d: &DeliveryRecord,
    to: &str,
) -> Option<&'a DeliveryRecord> {
    copies.iter().find(|c| c.id != d.id && holds(c, to))
}

/// Whether copy `c` gives carer `to` its summary: a full copy there,
/// acknowledged or on its way (queued or leased), not superseded. A
/// withdrawal notice, or a copy quarantined there, does not.
fn holds(c: &DeliveryRecord, to: &str) -> bool {
    c.mailbox == to
        && c.view == FULL_VIEW
        && !c.is_superseded()
        && matches!(
            c.state,
            DeliveryState::Delivered | DeliveryState::Queued | DeliveryState::Leased
        )
}

/// The audit entry of `d`, not sent on from `from` to `to`, which holds
/// copy `held` of it ([`held_by`]), by transfer or release `handover`.
pub(crate) fn held_event(
    d: &DeliveryRecord,
    (from, to): (&str, &str),
    held: u64,
    handover: u64,
) -> crate::audit::AuditEvent {
    delivery_event(
        ROUTING_ACTOR,
        "forward",
        d,
        format!(
            "ok: not sent on from {from} to {to}, to whom handover {handover} sent the patient: it holds this summary already (delivery {held}); retired"
        ),
    )
}

/// Which of a correction's `destinations` goes where the summary it
/// corrects was sent on ([`forwards_to`]): the copy for the prison the
/// earlier copy was first queued for. The correction names the prison its
/// author sent the patient to; the patient, and the earlier copy, are
/// elsewhere now.
pub(crate) fn follows_forward(
    event: JourneyEvent,
    destinations: &[super::NewDelivery],
    earlier: &DeliveryRecord,
) -> Option<usize> {
    let from = earlier.forwarded_from.as_deref()?;
    if !matches!(
        event,
        JourneyEvent::Transfer | JourneyEvent::CommunitySummary
    ) || earlier.mailbox == from
    {
        return None;
    }
    destinations
        .iter()
        .position(|d| d.view == FULL_VIEW && d.mailbox == from)
}

/// The audit entry of a correction's copy sent where the copy it corrects
/// was sent on ([`follows_forward`]).
pub(crate) fn followed_forward_event(d: &DeliveryRecord, earlier: u64) -> crate::audit::AuditEvent {
    delivery_event(
        ROUTING_ACTOR,
        "forward",
        d,
        format!(
            "ok: sent to {}, where delivery {earlier} of the summary this one corrects was sent on",
            d.mailbox
        ),
    )
}

/// The actor of what routing decides on its own (the audit trail's word).
pub(crate) const ROUTING_ACTOR: &str = "urn:gateway:routing";

/// Whether `mailbox` holds treatment service copies waiting for a service
/// in the release area (routed on when one is registered, never claimed).
pub fn is_held_treatment_mailbox(mailbox: &str) -> bool {
    [
        PARKED_SUBSTANCE_MISUSE_MAILBOX,
        PARKED_MENTAL_HEALTH_MAILBOX,
    ]
    .contains(&mailbox)
}

/// The audit entry of held treatment copy `d` routed on to `to`.
pub fn route_held_event(actor: &str, d: &DeliveryRecord, to: &str) -> crate::audit::AuditEvent {
    let outcome = if is_held_treatment_mailbox(to) || to == PARKED_MAILBOX {
        format!(
            "ok: held in {to}: {} no longer serves (disabled) and it was not yet pulled",
            d.mailbox
        )
    } else {
        format!(
            "ok: held in {} until {to} served the release area",
            d.mailbox
        )
    };
    delivery_event(actor, "route_held", d, outcome)
}

/// The state a copy takes when moved to `to`, if the move is one
/// `route_held` makes: a held treatment copy (parked in a holding mailbox)
/// goes to a service (queued); a copy queued for an organisation that was
/// disabled before it pulled goes back to wait (parked): a treatment copy
/// to its holding mailbox, to be routed on to a service of its area, and a
/// release to `@parked`, to be claimed by the practice that registers the
/// patient. Only the summary itself moves: a withdrawal notice (which
/// tells that recipient not to act on what it was given) means nothing to
/// whoever would take it from a holding mailbox, so it stays where it is.
/// Anything else (leased, superseded, already moved) is left alone.
pub fn held_move(d: &DeliveryRecord, to: &str) -> Option<DeliveryState> {
    let release = d.event == Some(crate::journey::JourneyEvent::Release);
    let summary = d.view != WITHDRAWN_VIEW;
    let waits_in = |m: &str| {
        summary
            && (is_held_treatment_mailbox(m)
                || (m == PARKED_MAILBOX && release && d.view == FULL_VIEW))
    };
    match d.state {
        DeliveryState::Parked if is_held_treatment_mailbox(&d.mailbox) && !waits_in(to) => {
            Some(DeliveryState::Queued)
        }
        DeliveryState::Queued if !d.mailbox.starts_with('@') && waits_in(to) => {
            Some(DeliveryState::Parked)
        }
        _ => None,
    }
}

/// Whether `mailbox` is a holding mailbox (its deliveries are parked).
pub fn is_parked_mailbox(mailbox: &str) -> bool {
    [
        PARKED_MAILBOX,
        PARKED_SUBSTANCE_MISUSE_MAILBOX,
        PARKED_MENTAL_HEALTH_MAILBOX,
    ]
    .contains(&mailbox)
}

/// Meta key of the count of committed batches (the high-water mark).
pub const META_COMMIT_SEQ: &[u8] = b"commit_seq";
/// Meta key of the last handover id handed out.
pub const META_LAST_HANDOVER: &[u8] = b"last_handover_id";
/// Meta key of the last delivery id handed out.
pub const META_LAST_DELIVERY: &[u8] = b"last_delivery_id";
/// Meta key of the signed retention cut of the audit trail
/// ([`crate::audit::SignedAuditCut`] JSON; absent until entries are removed).
pub const META_AUDIT_CUT: &[u8] = b"audit_cut";

/// The document format as stored with a handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentFormat {
    /// Native protobuf `ClinicalSummary` bytes.
    Native,
    /// FHIR R4 JSON.
    FhirJson,
    /// HL7 v2 text.
    Hl7v2,
}

/// A submitted handover, without its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRecord {
    /// Handover id.
    pub id: u64,
    /// Sending organisation's ODS code.
    pub sender: String,
    /// Sender's idempotency key.
    pub message_id: String,
    /// The journey event.
    pub event: JourneyEvent,
    /// SHA-256 of the canonical content, hex; decides duplicate vs conflict.
    pub content_hash: String,
    /// SHA-256 of the stored payload, hex; checked on every read.
    pub payload_hash: String,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Keyed hash of the patient (never the identifier in clear).
    pub patient_key: String,
    /// When it was accepted, ms since the epoch.
    pub submitted_at_ms: i64,
    /// Its deliveries, in destination order.
    pub deliveries: Vec<u64>,
    /// The previous handover from the same sender for the same patient and
    /// event, which this one supersedes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<u64>,
    /// When its last delivery finished (delivered, or superseded and the
    /// replacement finished): the retention clock starts here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// When its payload and data key were removed under the retention policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shredded_at_ms: Option<i64>,
    /// The W3C `traceparent` of the submit's span, when traces were on
    /// (ids and flags only): each delivery's spans join its trace. Absent in
    /// records written before traces, and not part of the content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// When the sender's document says it was written, ms since the epoch:
    /// of two summaries in one lineage the later written is the newer
    /// ([`newer_than`]). Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authored_at_ms: Option<i64>,
    /// The handover that had already replaced this one when it arrived
    /// (written later, received earlier): its deliveries were superseded
    /// on arrival and never offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_on_arrival_by: Option<u64>,
    /// Its custody episode (see `NewHandover::episode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub episode: Option<String>,
    /// The custody movement it reports (see `NewHandover::movement`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement: Option<String>,
    /// See `NewHandover::movement_as_written`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub movement_as_written: Option<String>,
}

impl HandoverRecord {
    /// The first handover of the custody movement this one reports (as the
    /// latest of its lineage): walked back through the corrections of the
    /// same movement (same sender, event, episode and movement), so that
    /// movements are ordered by when each was first reported, not by their
    /// latest correction (a corrected admission is no new admission). Both
    /// engines; `load` reads a handover.
    pub(crate) fn movement_start(
        &self,
        mut load: impl FnMut(u64) -> Result<Option<HandoverRecord>, super::StoreError>,
    ) -> Result<u64, super::StoreError> {
        let mut start = self.id;
        let mut next = self.supersedes;
        for _ in 0..super::identity::GIVEN_WALK {
            let Some(id) = next else { break };
            let Some(older) = load(id)? else { break };
            if !self.same_movement(&older) {
                break;
            }
            start = older.id;
            next = older.supersedes;
        }
        Ok(start)
    }

    /// Whether `other`'s movement key is this one's: the same key, or, for
    /// a handover stored before keys were taken of the instant in UTC, the
    /// key of the time as the other wrote it.
    pub(crate) fn reports_movement_of(&self, other: &HandoverRecord) -> bool {
        let written = |h: &HandoverRecord| h.movement_as_written.clone().or(h.movement.clone());
        self.movement == other.movement
            || (self.movement_as_written.is_some() && self.movement_as_written == other.movement)
            || (other.movement_as_written.is_some() && written(other) == self.movement)
    }

    /// Whether `older` reports the same custody movement as this one.
    pub(crate) fn same_movement(&self, older: &HandoverRecord) -> bool {
        older.sender == self.sender
            && older.event == self.event
            && older.episode == self.episode
            && self.reports_movement_of(older)
    }

    /// Whether this handover may belong to the custody episode `episode`:
    /// unless both are known and differ.
    pub(crate) fn in_episode(&self, episode: Option<&String>) -> bool {
        !matches!((&self.episode, episode), (Some(a), Some(b)) if a != b)
    }
}

/// A summary's place in its lineage: when it was written and in which order
/// it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recency {
    /// The document's authored time, ms since the epoch, when known.
    pub authored_at_ms: Option<i64>,
    /// The handover id: arrival order.
    pub handover_id: u64,
}

impl From<&HandoverRecord> for Recency {
    fn from(h: &HandoverRecord) -> Self {
        Self {
            authored_at_ms: h.authored_at_ms,
            handover_id: h.id,
        }
    }
}

/// The copy among `deliveries` ((mailbox, delivery id) of the newer
/// handover) that replaces a delivery to `mailbox`: the one to the same
/// mailbox, or else its first (an operator can follow it).
pub(crate) fn replacement_in(deliveries: &[(String, u64)], mailbox: &str) -> Option<u64> {
    deliveries
        .iter()
        .find(|(m, _)| m == mailbox)
        .or(deliveries.first())
        .map(|(_, id)| *id)
}

/// The audit entry of delivery `d` superseded (retired or marked stale).
pub(crate) fn supersede_event(
    actor: &str,
    d: &DeliveryRecord,
    outcome: String,
) -> crate::audit::AuditEvent {
    delivery_event(actor, "supersede", d, outcome)
}

/// The audit outcome of a copy superseded on arrival by handover `latest`.
pub(crate) fn superseded_on_arrival_outcome(latest: u64) -> String {
    format!("ok: superseded on arrival by handover {latest}, written later")
}

/// Whether `a` is newer than `b`: written later when both authored times
/// are known and differ, otherwise received later. So a summary retried
/// after its correction was answered does not replace the correction.
#[must_use]
pub fn newer_than(a: Recency, b: Recency) -> bool {
    match (a.authored_at_ms, b.authored_at_ms) {
        (Some(x), Some(y)) if x != y => x > y,
        _ => a.handover_id > b.handover_id,
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting to be pulled (possibly not before a retry time).
    Queued,
    /// Pulled and leased to the recipient until the lease expires.
    Leased,
    /// Acknowledged by the recipient.
    Delivered,
    /// Taken out of the queue after a permanent failure or too many attempts.
    Quarantined,
    /// Replaced, before delivery, by a newer summary for the same patient and
    /// event from the same sender (in whatever mailbox it waited).
    Superseded,
    /// A release with no known GP, waiting in the holding mailbox to be claimed.
    Parked,
}

impl DeliveryState {
    /// Whether the delivery is still on its way (not delivered, quarantined or superseded).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            DeliveryState::Queued | DeliveryState::Leased | DeliveryState::Parked
        )
    }
}

/// One handover's journey to one mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Delivery id; also its place in the mailbox (FIFO).
    pub id: u64,
    /// The handover it carries.
    pub handover_id: u64,
    /// Receiving organisation's ODS code.
    pub mailbox: String,
    /// Keyed hash of the patient, for per-patient order.
    pub patient_key: String,
    /// Served before routine deliveries.
    pub urgent: bool,
    /// Current state.
    pub state: DeliveryState,
    /// Attempts so far (leases handed out).
    pub attempt: u32,
    /// Lease expiry while leased.
    pub lease_until_ms: Option<i64>,
    /// Not to be leased before this time (retry back-off).
    pub not_before_ms: Option<i64>,
    /// When queued.
    pub queued_at_ms: i64,
    /// When last leased.
    pub last_leased_at_ms: Option<i64>,
    /// When acknowledged.
    pub delivered_at_ms: Option<i64>,
    /// When quarantined.
    pub quarantined_at_ms: Option<i64>,
    /// Why quarantined, or the last retryable nack's reason.
    pub reason: Option<String>,
    /// What the recipient sees (`full`, `admission_notice`, `probation`).
    #[serde(default)]
    pub view: String,
    /// What the recipient's format or view does not carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_carried: Vec<String>,
    /// The handover's event (for supersession).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<JourneyEvent>,
    /// When it must have been delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_ms: Option<i64>,
    /// When the missed deadline was first reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overdue_at_ms: Option<i64>,
    /// The newer delivery that replaced this one (the newer handover's
    /// delivery to the same mailbox, else its first). Set on a leased delivery
    /// too: it stays with the recipient, but is never offered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<u64>,
    /// The newer handover that replaced this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by_handover: Option<u64>,
    /// The sending organisation (for supersession; absent in old records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,

    /// When it was superseded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_at_ms: Option<i64>,
    /// Keyed hashes of (identifier, date of birth) that may claim a parked release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claim_keys: Vec<String>,
    /// Who claimed it out of the holding mailbox (certificate identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// When it was claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at_ms: Option<i64>,
    /// Attempts allowed before quarantine, when an operator redrive raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// When it stopped needing its payload: delivered, or superseded and
    /// its replacement finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// What the Personal Demographics Service last said about a parked
    /// release's patient (`store::pds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pds: Option<super::pds::PdsFinding>,
    /// The attempt last given back by a nack, so that the same nack retried
    /// (its answer lost) is answered as it was, not refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nacked_attempt: Option<u32>,
    /// The prison it was first queued for, when it was sent on to the
    /// prison the patient was transferred to before that one pulled it
    /// ([`forwards_to`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_from: Option<String>,
    /// The transfer or release that last sent it on ([`send_on`]): what a
    /// correction of that handover to another carer sends again
    /// ([`resends_to`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_by: Option<u64>,
}

impl DeliveryRecord {
    /// Whether its deadline has passed before it reached its recipient: on
    /// its way, or stuck in quarantine (a missed deadline all the same; the
    /// SLA sweep reports both). Delivered and superseded copies are not.
    pub fn is_overdue(&self, now_ms: i64) -> bool {
        (self.state.is_live() || self.state == DeliveryState::Quarantined)
            && self.due_ms.is_some_and(|due| due <= now_ms)
    }
}

/// What the continuity indicators read of a handover
/// (`for_each_handover_submitted_between`), decoded from a stored
/// [`HandoverRecord`] without the rest (hashes, keys, trace context): the
/// pass reads every handover held, most of them to skip.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReleaseFacts {
    /// Handover id.
    pub id: u64,
    /// Sending organisation.
    pub sender: String,
    /// Journey event.
    pub event: JourneyEvent,
    /// When accepted.
    pub submitted_at_ms: i64,
    /// Its deliveries.
    pub deliveries: Vec<u64>,
    /// The handover it supersedes.
    #[serde(default)]
    pub supersedes: Option<u64>,
    /// The newer handover already held when this one arrived.
    #[serde(default)]
    pub superseded_on_arrival_by: Option<u64>,
}

impl From<&HandoverRecord> for ReleaseFacts {
    fn from(h: &HandoverRecord) -> Self {
        Self {
            id: h.id,
            sender: h.sender.clone(),
            event: h.event,
            submitted_at_ms: h.submitted_at_ms,
            deliveries: h.deliveries.clone(),
            supersedes: h.supersedes,
            superseded_on_arrival_by: h.superseded_on_arrival_by,
        }
    }
}

/// What the continuity indicators read of a delivery, decoded from a
/// stored [`DeliveryRecord`] without the rest (claim keys, reasons, PDS
/// findings).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CopyFacts {
    /// Receiving mailbox.
    pub mailbox: String,
    /// Current state.
    pub state: DeliveryState,
    /// When queued.
    pub queued_at_ms: i64,
    /// When acknowledged.
    pub delivered_at_ms: Option<i64>,
    /// The view it carries.
    #[serde(default)]
    pub view: String,
    /// Deadline.
    #[serde(default)]
    pub due_ms: Option<i64>,
    /// When claimed out of a holding mailbox.
    #[serde(default)]
    pub claimed_at_ms: Option<i64>,
}

impl From<&DeliveryRecord> for CopyFacts {
    fn from(d: &DeliveryRecord) -> Self {
        Self {
            mailbox: d.mailbox.clone(),
            state: d.state,
            queued_at_ms: d.queued_at_ms,
            delivered_at_ms: d.delivered_at_ms,
            view: d.view.clone(),
            due_ms: d.due_ms,
            claimed_at_ms: d.claimed_at_ms,
        }
    }
}

/// What the queue index ([`super::schedule`]) needs of a live delivery,
/// read from a stored [`DeliveryRecord`] at start-up without decoding (or
/// allocating) the rest: the record's other fields are skipped.
#[derive(Debug, Deserialize)]
pub struct ScheduleFacts<'a> {
    /// Receiving mailbox.
    #[serde(borrow)]
    pub mailbox: std::borrow::Cow<'a, str>,
    /// Keyed hash of the patient.
    #[serde(borrow)]
    pub patient_key: std::borrow::Cow<'a, str>,
    /// Served first.
    pub urgent: bool,
    /// Current state.
    pub state: DeliveryState,
    /// Attempts so far.
    pub attempt: u32,
    /// Lease expiry while leased.
    pub lease_until_ms: Option<i64>,
    /// Not to be leased before this time.
    pub not_before_ms: Option<i64>,
    /// When queued.
    pub queued_at_ms: i64,
    /// Deadline.
    #[serde(default)]
    pub due_ms: Option<i64>,
    /// When the missed deadline was first reported.
    #[serde(default)]
    pub overdue_at_ms: Option<i64>,
    /// Attempts allowed, when an operator redrive raised it.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The newer delivery that replaced this one.
    #[serde(default)]
    pub superseded_by: Option<u64>,
    /// The newer handover that replaced this one.
    #[serde(default)]
    pub superseded_by_handover: Option<u64>,
}

impl ScheduleFacts<'_> {
    /// See [`DeliveryRecord::is_superseded`].
    #[must_use]
    pub fn is_superseded(&self) -> bool {
        self.superseded_by.is_some() || self.superseded_by_handover.is_some()
    }
}

/// Who a patient key stands for: the keyed hashes of its identifiers, and
/// the keys of patients found later to be the same person.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRecord {
    /// Keyed hash of the NHS number linked to this patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nhs: Option<String>,
    /// Keyed hash of the prison number linked to this patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prison: Option<String>,
    /// Keyed hash of the date of birth first given with these identifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dob: Option<String>,
    /// Patient keys merged into this one (their audit entries are this patient's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Set when this key was merged into another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

/// The field a submit's identifiers contradict in `record`, the patient
/// they resolve to: another NHS number or prison number linked to it; or,
/// when the patient is found through a prison number alone, another date of
/// birth. A prison number has no check digit: one mistyped is another
/// prisoner's, and taking it for the same person would file one patient's
/// summary under another, retire that one's copies and send its recipients
/// a withdrawal. An NHS number (checked, and the gateway's key) is taken
/// as it is.
pub(crate) fn identity_conflict(
    record: &PatientRecord,
    ids: &super::PatientIds,
) -> Option<&'static str> {
    let differs = |linked: &Option<String>, given: &Option<String>| matches!((linked, given), (Some(l), Some(g)) if l != g);
    if differs(&record.nhs, &ids.nhs) {
        Some("patient.nhs_number")
    } else if differs(&record.prison, &ids.prison) {
        Some("patient.prison_number")
    } else if ids.nhs.is_none() && differs(&record.dob, &ids.dob) {
        Some("patient.date_of_birth")
    } else {
        None
    }
}

/// The field that forbids merging `absorbed` (the patient a submit's prison
/// number resolves to) into the patient of its NHS number: another NHS
/// number, or another date of birth (see [`identity_conflict`]).
pub(crate) fn merge_conflict(
    absorbed: &PatientRecord,
    ids: &super::PatientIds,
) -> Option<&'static str> {
    if absorbed.nhs.is_some() && absorbed.nhs != ids.nhs {
        Some("patient.prison_number")
    } else if matches!((&absorbed.dob, &ids.dob), (Some(a), Some(g)) if a != g) {
        Some("patient.date_of_birth")
    } else {
        None
    }
}

/// Whether a submit of `event` may link its identifiers (and merge the
/// patients they name): only a prison's, the authority for prison numbers.
/// Another sender's identifiers are checked against the links, never
/// stored: a practice naming an invented prison number would otherwise
/// bind it to the patient, and refuse the prison's own summaries after.
pub(crate) fn may_link(event: crate::journey::JourneyEvent) -> bool {
    event.sender_kind() == crate::journey::OrgKind::Prison
}

/// A submit refused because its identifiers are linked to different people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityConflict {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The sending organisation.
    pub sender: String,
    /// The sender's message id.
    pub message_id: String,
    /// Which identifier is already linked elsewhere (`patient.nhs_number`,
    /// `patient.prison_number`); never the value.
    pub field: String,
}

/// Key of a lineage record.
pub fn lineage_key(patient_key: &str, sender: &str, event: JourneyEvent) -> Vec<u8> {
    let event = event.to_string();
    let mut key = Vec::with_capacity(patient_key.len() + sender.len() + event.len() + 2);
    key.extend_from_slice(patient_key.as_bytes());
    key.push(0);
    key.extend_from_slice(sender.as_bytes());
    key.push(0);
    key.extend_from_slice(event.as_bytes());
    key
}

/// The event of a [`lineage_key`] (after its last separator).
pub fn lineage_event(key: &[u8]) -> Option<JourneyEvent> {
    let event = key.rsplit(|b| *b == 0).next()?;
    JourneyEvent::ALL
        .into_iter()
        .find(|e| e.to_string().as_bytes() == event)
}

/// The prison events that say where a patient is: in custody at the
/// sender (an admission), at the receiving prison (a transfer), or out
/// (a release).
pub const CUSTODY_EVENTS: [JourneyEvent; 3] = [
    JourneyEvent::Admission,
    JourneyEvent::Transfer,
    JourneyEvent::Release,
];

/// What a `retention` index entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RetentionKind {
    /// Shred the payload (data key, then chunks).
    Payload = b'p' as isize,
    /// Remove the tracking metadata, leaving a tombstone.
    Metadata = b'q' as isize,
    /// Remove the tombstone.
    Tombstone = b't' as isize,
    /// Remove a patient's identity links and lineage if nothing of theirs is
    /// tracked (the value is the patient key; the id the handover whose
    /// removal left them with nothing).
    Identity = b'i' as isize,
}

/// Key of a `retention` index entry.
pub fn retention_key(due_ms: i64, kind: RetentionKind, handover_id: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[..8].copy_from_slice(&u64::try_from(due_ms.max(0)).unwrap_or(0).to_be_bytes());
    key[8] = kind as u8;
    key[9..].copy_from_slice(&handover_id.to_be_bytes());
    key
}

/// A `retention` index key back into (due ms, kind, handover id).
pub fn split_retention_key(key: &[u8]) -> Option<(i64, RetentionKind, u64)> {
    if key.len() != 17 {
        return None;
    }
    let due = i64::try_from(from_be(&key[..8])?).ok()?;
    let kind = match key[8] {
        b'p' => RetentionKind::Payload,
        b'q' => RetentionKind::Metadata,
        b't' => RetentionKind::Tombstone,
        b'i' => RetentionKind::Identity,
        _ => return None,
    };
    Some((due, kind, from_be(&key[9..])?))
}

/// What remains of a handover whose tracking metadata was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The handover id.
    pub handover_id: u64,
    /// Its sender's ODS code (Track answers only the sender).
    pub sender: String,
    /// The sender's message id.
    pub message_id: String,
    /// When the metadata was removed, ms.
    pub removed_at_ms: i64,
}

/// Tombstone key of a handover id.
pub fn tombstone_by_id(handover_id: u64) -> Vec<u8> {
    let mut key = vec![b'h'];
    key.extend_from_slice(&handover_id.to_be_bytes());
    key
}

/// Tombstone key of a sender's message id.
pub fn tombstone_by_message(sender: &str, message_id: &str) -> Vec<u8> {
    let mut key = vec![b'm'];
    key.extend_from_slice(&dedupe_key(sender, message_id));
    key
}

/// Key of a superseded delivery waiting for its replacement.
pub fn superseded_key(replacement: u64, superseded: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&replacement.to_be_bytes());
    key[8..].copy_from_slice(&superseded.to_be_bytes());
    key
}

/// A mailbox's key prefix: length byte then the code.
pub fn mailbox_prefix(mailbox: &str) -> Vec<u8> {
    let bytes = mailbox.as_bytes();
    let mut key = Vec::with_capacity(1 + bytes.len() + 8);
    key.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    key.extend_from_slice(bytes);
    key
}

/// Key of a delivery in a per-mailbox index.
pub fn mailbox_key(mailbox: &str, delivery_id: u64) -> Vec<u8> {
    let mut key = mailbox_prefix(mailbox);
    key.extend_from_slice(&delivery_id.to_be_bytes());
    key
}

/// Splits a per-mailbox index key back into mailbox and delivery id.
pub fn split_mailbox_key(key: &[u8]) -> Option<(String, u64)> {
    let (&len, rest) = key.split_first()?;
    let len = usize::from(len);
    if rest.len() != len + 8 {
        return None;
    }
    let mailbox = std::str::from_utf8(&rest[..len]).ok()?.to_owned();
    let id = u64::from_be_bytes(rest[len..].try_into().ok()?);
    Some((mailbox, id))
}

/// Key of an idempotency record.
pub fn dedupe_key(sender: &str, message_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(sender.len() + 1 + message_id.len());
    key.extend_from_slice(sender.as_bytes());
    key.push(0);
    key.extend_from_slice(message_id.as_bytes());
    key
}

/// Key of one payload chunk.
pub fn payload_key(handover_id: u64, chunk: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&handover_id.to_be_bytes());
    key[8..].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// A chunk as stored: CRC-32 then the bytes.
pub fn encode_chunk(bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(4 + bytes.len());
    value.extend_from_slice(&crc32fast::hash(bytes).to_be_bytes());
    value.extend_from_slice(bytes);
    value
}

/// A stored chunk's bytes, if its checksum holds.
pub fn decode_chunk(value: &[u8]) -> Option<&[u8]> {
    let (crc, bytes) = value.split_at_checked(4)?;
    (u32::from_be_bytes(crc.try_into().ok()?) == crc32fast::hash(bytes)).then_some(bytes)
}

/// A u64 as a big-endian key or value.
pub fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// A big-endian u64 value, if it is eight bytes.
pub fn from_be(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// What an ack or nack of `attempt` from `mailbox` may act on, the same on
/// every engine: the delivery when it is that mailbox's, that attempt's,
/// leased and in its lease; otherwise why not (with the delivery when it is
/// the caller's, so a repeated ack can be recognised).
pub(crate) type LeaseVerdict = Result<DeliveryRecord, (super::StoreError, Option<DeliveryRecord>)>;

/// Judges `found` for an ack or nack (see [`LeaseVerdict`]).
// The refusal carries the record on purpose (a repeated ack is recognised by
// it), and every caller takes it apart at once.
#[allow(clippy::result_large_err)]
pub(crate) fn lease_verdict(
    found: Option<DeliveryRecord>,
    mailbox: &str,
    attempt: u32,
    now: i64,
) -> LeaseVerdict {
    use super::StoreError;
    match found {
        Some(d) if d.mailbox == mailbox => {
            // A delivery never leased has no attempt to be stale against.
            let err = if d.attempt == 0 {
                Some(StoreError::NotLeased(d.state))
            } else if d.attempt != attempt {
                Some(StoreError::StaleAttempt {
                    given: attempt,
                    current: d.attempt,
                })
            } else if d.state != DeliveryState::Leased {
                Some(StoreError::NotLeased(d.state))
            } else if d.lease_until_ms.is_none_or(|t| t <= now) {
                Some(StoreError::LeaseExpired)
            } else {
                None
            };
            match err {
                None => Ok(d),
                Some(e) => Err((e, Some(d))),
            }
        }
        _ => Err((StoreError::UnknownDelivery, None)),
    }
}

/// Whether a nack of `attempt` refused by [`lease_verdict`] repeats one
/// that succeeded: that attempt was given back by a nack and nothing has
/// leased the delivery since. It is answered with the delivery's state and
/// changes nothing, as a repeated ack is: a caller whose answer was lost
/// may retry it safely.
pub(crate) fn repeated_nack(d: &DeliveryRecord, attempt: u32, permanent: bool) -> bool {
    d.nacked_attempt == Some(attempt)
        && d.attempt == attempt
        && d.state != DeliveryState::Leased
        // A permanent nack after a retryable one is no repeat: it asks for
        // more than was done, and is refused as before.
        && !(permanent && d.state == DeliveryState::Queued)
}

/// The audit entry of a repeated nack (see [`repeated_nack`]).
pub(crate) fn repeated_nack_event(actor: &str, d: &DeliveryRecord) -> crate::audit::AuditEvent {
    delivery_event(
        actor,
        "nack",
        d,
        "ok: repeated nack of an attempt already given back",
    )
}

/// The audit entry of a refused ack or nack (a repeated ack of a delivered
/// attempt is recorded as such, not as a refusal).
pub(crate) fn refused_lease_event(
    action: &'static str,
    actor: &str,
    attempt: u32,
    (e, d): (&super::StoreError, &Option<DeliveryRecord>),
) -> crate::audit::AuditEvent {
    let repeat_ack = action == "ack"
        && matches!(d, Some(d) if d.state == DeliveryState::Delivered && d.attempt == attempt);
    crate::audit::AuditEvent {
        actor: actor.to_owned(),
        action,
        handover_id: d.as_ref().map(|d| d.handover_id),
        // Only an id found in the caller's mailbox: never one it made up.
        delivery_id: d.as_ref().map(|d| d.id),
        patient_key: d.as_ref().map(|d| d.patient_key.clone()),
        outcome: if repeat_ack {
            "ok: repeated ack of a delivered attempt".into()
        } else {
            format!("refused: {e}")
        },
    }
}

/// What an ack or nack found under its id in another organisation's
/// mailbox: the caller is answered as for an id that does not exist, but
/// the trail records the attempt against that delivery and its patient, so
/// an organisation reaching for another's records is seen.
pub(crate) fn foreign(found: Option<&DeliveryRecord>, mailbox: &str) -> Option<DeliveryRecord> {
    found.filter(|d| d.mailbox != mailbox).cloned()
}

/// The refusal entry of an ack or nack, naming `foreign` when the id was
/// another organisation's delivery (see [`foreign`]).
pub(crate) fn refused_lease_audit(
    action: &'static str,
    actor: &str,
    attempt: u32,
    refusal: (&super::StoreError, &Option<DeliveryRecord>),
    foreign: Option<DeliveryRecord>,
) -> crate::audit::AuditEvent {
    let mut event = refused_lease_event(action, actor, attempt, refusal);
    if let (None, Some(f)) = (refusal.1, foreign) {
        event.handover_id = Some(f.handover_id);
        event.delivery_id = Some(f.id);
        event.patient_key = Some(f.patient_key);
        event.outcome = format!("{} (another organisation's delivery)", event.outcome);
    }
    event
}

/// The audit entry of a refused Track: `foreign` is the handover the id
/// named when it is another sender's, so that an organisation reaching for
/// another's records shows on that patient's trail (as a refused ack or
/// nack of another's delivery does).
pub(crate) fn refused_track_event(
    actor: &str,
    handover_id: Option<u64>,
    error: &super::StoreError,
    foreign: Option<(u64, String)>,
) -> crate::audit::AuditEvent {
    let mut event = crate::audit::AuditEvent {
        actor: actor.to_owned(),
        action: "track",
        handover_id,
        outcome: format!("refused: {error}"),
        ..crate::audit::AuditEvent::default()
    };
    if let Some((id, patient_key)) = foreign {
        event.handover_id = Some(id);
        event.patient_key = Some(patient_key);
        event.outcome = format!("{} (another sender's handover)", event.outcome);
    }
    event
}

/// The audit entry of a leased attempt given back unsent (the pull's
/// answer was full); `d` is the delivery as given back.
pub(crate) fn returned_unsent_event(
    actor: &str,
    d: &DeliveryRecord,
    attempt: u32,
) -> crate::audit::AuditEvent {
    delivery_event(
        actor,
        "pull",
        d,
        if d.state == DeliveryState::Superseded {
            format!(
                "ok: attempt {attempt} returned unsent (the answer was full); superseded meanwhile, retired"
            )
        } else {
            format!(
                "ok: attempt {attempt} returned unsent (the answer was full); queued, not counted"
            )
        },
    )
}

/// The stored payload bytes one pull may lease (always one delivery).
pub(crate) struct StoredBytes {
    left: Option<u64>,
    taken: usize,
}

impl StoredBytes {
    /// A budget of `max` bytes (`None`: no limit).
    pub(crate) fn new(max: Option<u64>) -> Self {
        Self {
            left: max,
            taken: 0,
        }
    }

    /// Whether `handover`'s payload may be leased too; counts it if so.
    pub(crate) fn take(&mut self, handover: &HandoverRecord) -> bool {
        let fits = match &mut self.left {
            None => true,
            Some(left) if self.taken == 0 || handover.payload_len <= *left => {
                *left = left.saturating_sub(handover.payload_len);
                true
            }
            Some(_) => false,
        };
        self.taken += usize::from(fits);
        fits
    }
}

/// How a delivery's state reads in an audit outcome.
pub(crate) fn state_name(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Queued => "queued for retry",
        DeliveryState::Leased => "leased",
        DeliveryState::Delivered => "delivered",
        DeliveryState::Quarantined => "quarantined",
        DeliveryState::Superseded => "superseded",
        DeliveryState::Parked => "parked",
    }
}

/// The audit entry of one delivery's redrive, on every engine.
pub(crate) fn redrive_event(
    actor: &str,
    delivery_id: u64,
    found: Option<&DeliveryRecord>,
    outcome: &super::RedriveOutcome,
) -> crate::audit::AuditEvent {
    use super::RedriveOutcome;
    crate::audit::AuditEvent {
        actor: actor.to_owned(),
        action: "redrive",
        delivery_id: Some(delivery_id),
        // Its handover and patient, so either trail shows the redrive.
        handover_id: found.map(|d| d.handover_id),
        patient_key: found.map(|d| d.patient_key.clone()),
        outcome: match outcome {
            RedriveOutcome::Requeued => "ok: requeued".into(),
            RedriveOutcome::NotQuarantined(state) => {
                format!("ok: nothing to do, it is {}", state_name(*state))
            }
            RedriveOutcome::Unknown => "refused: no such delivery".into(),
            RedriveOutcome::Outdated => "refused: an admission notice whose patient has been \
                released or admitted again since; left quarantined"
                .into(),
        },
    }
}

impl DeliveryRecord {
    /// When it stopped needing its payload, if it has.
    /// Whether a newer handover replaced this copy: by one of its own
    /// deliveries (`superseded_by`), or by one that goes to no one (a
    /// correction routed nowhere), which replaces it all the same.
    #[must_use]
    pub fn is_superseded(&self) -> bool {
        self.superseded_by.is_some() || self.superseded_by_handover.is_some()
    }

    pub(crate) fn finished_at(&self) -> Option<i64> {
        self.finished_at_ms.or(match self.state {
            DeliveryState::Delivered => self.delivered_at_ms,
            _ => None,
        })
    }

    /// Adds each of `keys` it lacks to its claim keys; whether any was added.
    pub(crate) fn widen_claim_keys(&mut self, keys: &[String]) -> bool {
        let before = self.claim_keys.len();
        for k in keys {
            if !self.claim_keys.iter().any(|held| same_claim_key(held, k)) {
                self.claim_keys.push(k.clone());
            }
        }
        self.claim_keys.len() != before
    }

    /// Whether it shares a claim key (identifier and date of birth) with `keys`.
    pub(crate) fn shares_claim_key(&self, keys: &[String]) -> bool {
        self.claim_keys
            .iter()
            .any(|held| keys.iter().any(|k| same_claim_key(held, k)))
    }

    /// How a claim by `claimant` (`PatientKeyer::claim_keys`) answers to it.
    pub(crate) fn claim_match(&self, claimant: &[String]) -> ClaimMatch {
        claim_match(&self.claim_keys, claimant)
    }
}

/// The audit entry of a claim refused at one parked release because another
/// identifier given contradicts it; also logged as an alert, since the
/// claimant may hold the wrong patient.
pub(crate) fn contradicted_claim_event(
    actor: &str,
    to: &str,
    d: &DeliveryRecord,
) -> crate::audit::AuditEvent {
    tracing::warn!(
        alert = "claim_contradicted",
        caller = actor,
        delivery_id = d.id,
        "claim refused at a parked release: one identifier and the date of birth match, another identifier given does not"
    );
    delivery_event(
        actor,
        "claim",
        d,
        format!(
            "refused: one identifier and the date of birth match this parked release, but another identifier given for {to} contradicts it (possible wrong patient)"
        ),
    )
}

/// The destination of a new release that follows an earlier claim: its
/// copy for the practice would wait in [`PARKED_MAILBOX`] (the prison still
/// names no practice), while `earlier`, the practice copy of the latest
/// earlier summary in its lineage, was claimed out of it by a practice and
/// the new release's claim keys match it as a claim would (identifier and
/// date of birth). A correction of a claimed release goes to the practice
/// that claimed it: parking it again would undo the claim, and the
/// practice would be told the summary it holds no longer applies.
pub(crate) fn follows_claim(
    event: crate::journey::JourneyEvent,
    destinations: &[super::NewDelivery],
    earlier: &DeliveryRecord,
    claim_keys: &[String],
) -> Option<usize> {
    if event != crate::journey::JourneyEvent::Release
        || earlier.claimed_by.is_none()
        || earlier.mailbox.starts_with('@')
        || claim_match(&earlier.claim_keys, claim_keys) != ClaimMatch::Matches
    {
        return None;
    }
    destinations
        .iter()
        .position(|d| d.mailbox == PARKED_MAILBOX && d.view == FULL_VIEW)
}

/// The audit entry of a new release's practice copy sent where an earlier
/// claim put the summary it corrects ([`follows_claim`]).
pub(crate) fn followed_claim_event(
    actor: &str,
    d: &DeliveryRecord,
    earlier: u64,
) -> crate::audit::AuditEvent {
    delivery_event(
        actor,
        "claim",
        d,
        format!(
            "ok: sent to {}, which claimed delivery {earlier} of the summary this one corrects",
            d.mailbox
        ),
    )
}

/// How a claim answers to a parked release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimMatch {
    /// One identifier and the date of birth match, and no other identifier
    /// given contradicts the release.
    Matches,
    /// Nothing in common.
    Unmatched,
    /// One identifier and the date of birth match, but another identifier
    /// the claimant gave is not the one the release carries (a wrong-patient
    /// risk: refused like no match, audited as a contradiction).
    Contradicted,
}

/// A claim key's kind (`nhs`, `prison`) and digest. Keys stored before the
/// kind was written are a bare digest: they match on the digest and
/// contradict nothing.
fn claim_key_parts(key: &str) -> (Option<&str>, &str) {
    match key.split_once(':') {
        Some((kind, digest)) => (Some(kind), digest),
        None => (None, key),
    }
}

/// Whether two claim keys were made from the same identifier and date of birth.
pub(crate) fn same_claim_key(a: &str, b: &str) -> bool {
    claim_key_parts(a).1 == claim_key_parts(b).1
}

/// The claim keys to look a claimant's up by in a store that may hold keys
/// written before kinds were: each key, and its bare digest.
pub(crate) fn claim_lookup_keys(claimant: &[String]) -> Vec<String> {
    let mut keys = claimant.to_vec();
    for k in claimant {
        let digest = claim_key_parts(k).1;
        if digest != k {
            keys.push(digest.to_owned());
        }
    }
    keys
}

/// See [`ClaimMatch`]: a release answers a claim when they share a key, and
/// for every kind of identifier the claimant gave and the release holds, the
/// claimant's is among the release's (a linked patient may hold two).
pub(crate) fn claim_match(held: &[String], claimant: &[String]) -> ClaimMatch {
    let shared = held
        .iter()
        .any(|h| claimant.iter().any(|c| same_claim_key(h, c)));
    if !shared {
        return ClaimMatch::Unmatched;
    }
    let contradicted = claimant.iter().any(|c| {
        let (Some(kind), digest) = claim_key_parts(c) else {
            return false;
        };
        let mut of_kind = held
            .iter()
            .map(|h| claim_key_parts(h))
            .filter(|(k, _)| *k == Some(kind))
            .peekable();
        of_kind.peek().is_some() && !of_kind.any(|(_, d)| d == digest)
    });
    if contradicted {
        ClaimMatch::Contradicted
    } else {
        ClaimMatch::Matches
    }
}

/// Longest wait before a delivery nacked as retryable is offered again.
pub const MAX_NACK_BACKOFF_MS: i64 = 5 * 60 * 1_000;

/// The wait before a delivery nacked as retryable on `attempt` is offered
/// again: `base_ms` doubling with each attempt, at most
/// [`MAX_NACK_BACKOFF_MS`]. Attempts count over the delivery's life (a
/// redrive keeps them), so without the cap one passing nack after a
/// redrive or two held a patient's queue, an OST copy's included, for hours.
#[must_use]
pub fn nack_backoff_ms(base_ms: i64, attempt: u32) -> i64 {
    base_ms
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_NACK_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_retryable_nack_waits_doubling_but_never_past_five_minutes() {
        use super::nack_backoff_ms;
        assert_eq!(nack_backoff_ms(1_000, 1), 1_000);
        assert_eq!(nack_backoff_ms(1_000, 2), 2_000);
        assert_eq!(nack_backoff_ms(1_000, 5), 16_000);
        assert_eq!(nack_backoff_ms(1_000, 12), 300_000);
        assert_eq!(nack_backoff_ms(1_000, u32::MAX), 300_000);
        assert_eq!(nack_backoff_ms(i64::MAX, 3), 300_000);
    }

    use super::*;

    #[test]
    fn a_claim_matches_by_one_identifier_unless_another_contradicts_the_release() {
        let held = ["nhs:aa".to_owned(), "prison:bb".to_owned()];
        let claim = |keys: &[&str]| {
            claim_match(
                &held,
                &keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(claim(&["nhs:aa"]), ClaimMatch::Matches);
        assert_eq!(claim(&["prison:bb"]), ClaimMatch::Matches);
        assert_eq!(claim(&["nhs:aa", "prison:bb"]), ClaimMatch::Matches);
        assert_eq!(claim(&["nhs:aa", "prison:cc"]), ClaimMatch::Contradicted);
        assert_eq!(claim(&["nhs:dd", "prison:bb"]), ClaimMatch::Contradicted);
        assert_eq!(claim(&["nhs:dd", "prison:cc"]), ClaimMatch::Unmatched);
        // A release that never carried a prison number is not contradicted by one.
        let nhs_only = ["nhs:aa".to_owned()];
        let keys = ["nhs:aa".to_owned(), "prison:cc".to_owned()];
        assert_eq!(claim_match(&nhs_only, &keys), ClaimMatch::Matches);
        // A linked patient's release may hold two prison numbers: either claims.
        let linked = [
            "nhs:aa".to_owned(),
            "prison:bb".to_owned(),
            "prison:ee".to_owned(),
        ];
        let keys = ["nhs:aa".to_owned(), "prison:ee".to_owned()];
        assert_eq!(claim_match(&linked, &keys), ClaimMatch::Matches);
        // Keys stored before kinds were written match on the digest alone.
        let old = ["aa".to_owned(), "bb".to_owned()];
        assert_eq!(
            claim_match(&old, &["nhs:aa".to_owned(), "prison:cc".to_owned()]),
            ClaimMatch::Matches
        );
        assert_eq!(claim_lookup_keys(&["nhs:aa".to_owned()]), ["nhs:aa", "aa"]);
    }

    #[test]
    fn only_a_summary_waits_in_a_holding_mailbox_never_a_withdrawal_notice() {
        let queued = |mailbox: &str, view: &str, event: &str| -> DeliveryRecord {
            serde_json::from_value(serde_json::json!({
                "id": 7, "handover_id": 3, "mailbox": mailbox, "patient_key": "p",
                "urgent": false, "state": "queued", "attempt": 0, "queued_at_ms": 0,
                "view": view, "event": event,
            }))
            .unwrap()
        };
        let parked = Some(DeliveryState::Parked);
        // A practice's release, and a service's copy, wait to go elsewhere.
        let release = queued("YG001", FULL_VIEW, "RELEASE");
        assert_eq!(held_move(&release, PARKED_MAILBOX), parked);
        let copy = queued("YS001", "substance_misuse_service", "RELEASE");
        assert_eq!(held_move(&copy, PARKED_SUBSTANCE_MISUSE_MAILBOX), parked);
        // Withdrawal notices are for the recipient of the earlier summary only.
        for (mailbox, to) in [
            ("YG001", PARKED_MAILBOX),
            ("YS001", PARKED_SUBSTANCE_MISUSE_MAILBOX),
            ("YM001", PARKED_MENTAL_HEALTH_MAILBOX),
        ] {
            assert_eq!(
                held_move(&queued(mailbox, WITHDRAWN_VIEW, "RELEASE"), to),
                None
            );
        }
        // Nor does an admission notice wait to be claimed.
        let notice = queued("YG001", "admission_notice", "ADMISSION");
        assert_eq!(held_move(&notice, PARKED_MAILBOX), None);
    }

    #[test]
    fn only_a_prisons_unacknowledged_summary_goes_on_with_its_patient() {
        let at_second = |view: &str, event: &str, sender: &str| -> DeliveryRecord {
            serde_json::from_value(serde_json::json!({
                "id": 7, "handover_id": 3, "mailbox": "YP002", "patient_key": "p",
                "urgent": false, "state": "queued", "attempt": 0, "queued_at_ms": 0,
                "view": view, "event": event, "sender": sender,
            }))
            .unwrap()
        };
        let moving = |from, to, event| MovingOn {
            from,
            to,
            event,
            due_ms: None,
            before: None,
        };
        let on = moving("YP002", "YP003", JourneyEvent::Transfer);
        let transfer = at_second(FULL_VIEW, "TRANSFER", "YP001");
        let community = at_second(FULL_VIEW, "COMMUNITY_SUMMARY", "YG001");
        assert!(forwards_to(&transfer, &on));
        assert!(forwards_to(&community, &on));
        // Not back to the prison that wrote it, nor from another mailbox.
        let back = moving("YP002", "YP001", JourneyEvent::Transfer);
        assert!(!forwards_to(&transfer, &back));
        assert!(!forwards_to(
            &transfer,
            &moving("YP004", "YP003", JourneyEvent::Transfer)
        ));
        // Released: the GP gets the previous prison's transfer summary, not
        // its own record back; an admission moves nothing.
        let released = moving("YP002", "YG002", JourneyEvent::Release);
        assert!(forwards_to(&transfer, &released));
        assert!(!forwards_to(&community, &released));
        let admitted = moving("YP002", "YG002", JourneyEvent::Admission);
        assert!(!forwards_to(&transfer, &admitted));
        // Handed out and not acknowledged (leased now, or given back): the
        // prison may never have read it.
        for state in [DeliveryState::Leased, DeliveryState::Queued] {
            let handed_out = DeliveryRecord {
                attempt: 2,
                state,
                ..transfer.clone()
            };
            assert!(forwards_to(&handed_out, &on));
        }
        // Acknowledged, or put aside for an operator: it stays.
        for state in [DeliveryState::Delivered, DeliveryState::Quarantined] {
            let kept = DeliveryRecord {
                attempt: 1,
                state,
                ..transfer.clone()
            };
            assert!(!forwards_to(&kept, &on));
        }
        let superseded = DeliveryRecord {
            superseded_by: Some(9),
            ..transfer.clone()
        };
        assert!(!forwards_to(&superseded, &on));
        // A notice is for whoever had the earlier summary; a release is not
        // a prison's.
        let notice = at_second(WITHDRAWN_VIEW, "TRANSFER", "YP001");
        assert!(!forwards_to(&notice, &on));
        let release = at_second(FULL_VIEW, "RELEASE", "YP001");
        assert!(!forwards_to(&release, &on));
    }

    /// What a wrongly named carer acknowledged goes again to the one the
    /// correction names: what reached it because of the mistake (sent after
    /// it, or sent on with it), never what it had of an earlier stay.
    #[test]
    fn a_copy_moving_on_is_held_only_by_a_summary_the_carer_has_or_will_have() {
        let copy = |id: u64, mailbox: &str, state: &str, view: &str| -> DeliveryRecord {
            serde_json::from_value(serde_json::json!({
                "id": id, "handover_id": 5, "mailbox": mailbox, "patient_key": "p",
                "urgent": false, "state": state, "attempt": 1, "queued_at_ms": 0,
                "view": view, "event": "TRANSFER", "sender": "YP001",
            }))
            .unwrap()
        };
        let moving = copy(1, "YP003", "queued", FULL_VIEW);
        let held = |other: DeliveryRecord| {
            held_by(&[moving.clone(), other], &moving, "YP002").map(|c| c.id)
        };
        assert_eq!(held(copy(2, "YP002", "delivered", FULL_VIEW)), Some(2));
        assert_eq!(held(copy(2, "YP002", "leased", FULL_VIEW)), Some(2));
        // A withdrawal notice, a copy quarantined there, one elsewhere: none.
        assert_eq!(held(copy(2, "YP002", "queued", WITHDRAWN_VIEW)), None);
        assert_eq!(held(copy(2, "YP002", "quarantined", FULL_VIEW)), None);
        assert_eq!(held(copy(2, "YP004", "delivered", FULL_VIEW)), None);
    }

    /// Delivery 7 of `handover` (`event`), acknowledged by YP002, with
    /// `extra` fields set.
    fn acked_copy(handover: u64, event: &str, extra: serde_json::Value) -> DeliveryRecord {
        let mut v = serde_json::json!({
            "id": 7, "handover_id": handover, "mailbox": "YP002", "patient_key": "p",
            "urgent": false, "state": "delivered", "attempt": 1, "queued_at_ms": 0,
            "delivered_at_ms": 500, "view": FULL_VIEW, "event": event, "sender": "YG001",
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    /// Transfer 10, submitted at 400, named YP002 by mistake; its
    /// correction sends the patient on to YP003.
    fn mistaken_transfer() -> (MovingOn<'static>, Mistaken) {
        let to_third = MovingOn {
            from: "YP002",
            to: "YP003",
            event: JourneyEvent::Transfer,
            due_ms: Some(9_000),
            before: None,
        };
        let mistaken = Mistaken {
            ids: vec![10],
            at_ms: 400,
        };
        (to_third, mistaken)
    }

    #[test]
    fn a_withdrawal_notice_or_a_quarantined_copy_is_no_summary_held() {
        let (to_third, mistaken) = mistaken_transfer();
        let since = acked_copy(11, "COMMUNITY_SUMMARY", serde_json::json!({}));
        // The carer corrected to holds only a withdrawal notice of it, or a
        // copy quarantined there: that is no summary, so it is sent.
        for (view, state) in [(WITHDRAWN_VIEW, "delivered"), (FULL_VIEW, "quarantined")] {
            let there = acked_copy(
                11,
                "COMMUNITY_SUMMARY",
                serde_json::json!({ "id": 8, "mailbox": "YP003", "view": view, "state": state }),
            );
            let copies = [since.clone(), there];
            let chosen = copy_to_resend(&copies, &to_third, &mistaken).map(|c| c.id);
            assert_eq!(chosen, Some(7), "{view} {state}");
        }
        let there = acked_copy(
            11,
            "COMMUNITY_SUMMARY",
            serde_json::json!({ "id": 8, "mailbox": "YP003" }),
        );
        assert!(copy_to_resend(&[since.clone(), there], &to_third, &mistaken).is_none());
    }

    #[test]
    fn only_what_a_mistake_brought_is_sent_again_to_the_carer_corrected_to() {
        let (to_third, mistaken) = mistaken_transfer();
        let since = acked_copy(11, "COMMUNITY_SUMMARY", serde_json::json!({}));
        assert!(resends_to(&since, &to_third, &mistaken));
        let copy = resent_copy(&since, &to_third, (99, 13), "p-now", 1_000);
        assert_eq!(
            (copy.id, copy.handover_id, copy.mailbox.as_str()),
            (99, 11, "YP003")
        );
        assert_eq!(
            (copy.state, copy.attempt, copy.delivered_at_ms),
            (DeliveryState::Queued, 0, None)
        );
        assert_eq!(copy.forwarded_from.as_deref(), Some("YP002"));
        assert_eq!(
            (copy.forwarded_by, copy.patient_key.as_str()),
            (Some(13), "p-now")
        );
        assert_eq!((copy.queued_at_ms, copy.due_ms), (1_000, Some(9_000)));
        // Sent on to YP002 with the mistaken transfer, acknowledged there.
        let carried = serde_json::json!({ "forwarded_from": "YP001" });
        assert!(resends_to(
            &acked_copy(5, "TRANSFER", carried.clone()),
            &to_third,
            &mistaken
        ));
        // Recorded as sent on by the mistaken transfer, or by another one.
        let by = |id: u64| serde_json::json!({ "forwarded_from": "YP001", "forwarded_by": id });
        assert!(resends_to(
            &acked_copy(5, "TRANSFER", by(10)),
            &to_third,
            &mistaken
        ));
        assert!(!resends_to(
            &acked_copy(5, "TRANSFER", by(4)),
            &to_third,
            &mistaken
        ));
        // Or by a correction of it that kept YP002 (a content-only one).
        let kept = Mistaken {
            ids: vec![10, 12],
            at_ms: 400,
        };
        assert!(resends_to(
            &acked_copy(5, "TRANSFER", by(12)),
            &to_third,
            &kept
        ));
        // An earlier stay's record, whether sent on then or not: its own.
        let mut before = carried;
        before["delivered_at_ms"] = serde_json::json!(300);
        assert!(!resends_to(
            &acked_copy(5, "TRANSFER", before),
            &to_third,
            &mistaken
        ));
        assert!(!resends_to(
            &acked_copy(5, "COMMUNITY_SUMMARY", serde_json::json!({})),
            &to_third,
            &mistaken
        ));
        // Not acknowledged (it moves instead), superseded, written by the
        // carer it would go to, or not a summary a transfer carries.
        for extra in [
            serde_json::json!({ "state": "queued", "delivered_at_ms": null }),
            serde_json::json!({ "superseded_by": 12 }),
            serde_json::json!({ "sender": "YP003" }),
            serde_json::json!({ "view": "probation" }),
        ] {
            assert!(
                !resends_to(
                    &acked_copy(11, "COMMUNITY_SUMMARY", extra.clone()),
                    &to_third,
                    &mistaken
                ),
                "{extra}"
            );
        }
        assert!(!resends_to(
            &acked_copy(11, "ADMISSION", serde_json::json!({})),
            &to_third,
            &mistaken
        ));
    }

    /// A release corrected to another GP: the previous prison's transfer
    /// summary the first GP acknowledged goes again, the GP's own record not.
    #[test]
    fn a_release_corrected_to_another_gp_sends_again_only_a_transfer_summary() {
        let mistaken = Mistaken {
            ids: vec![10],
            at_ms: 400,
        };
        let mut at_gp: DeliveryRecord = serde_json::from_value(serde_json::json!({
            "id": 7, "handover_id": 11, "mailbox": "YG009", "patient_key": "p",
            "urgent": false, "state": "delivered", "attempt": 1, "queued_at_ms": 0,
            "delivered_at_ms": 500, "view": FULL_VIEW, "event": "TRANSFER", "sender": "YP001",
        }))
        .unwrap();
        let from_gp = MovingOn {
            from: "YG009",
            to: "YG002",
            event: JourneyEvent::Release,
            due_ms: None,
            before: None,
        };
        assert!(resends_to(&at_gp, &from_gp, &mistaken));
        at_gp.event = Some(JourneyEvent::CommunitySummary);
        assert!(!resends_to(&at_gp, &from_gp, &mistaken));
    }

    #[test]
    fn a_claimed_release_moves_its_patient_on_to_the_practice_that_claimed_it() {
        let release = |mailbox: &str, state: &str, view: &str, event: &str| -> DeliveryRecord {
            serde_json::from_value(serde_json::json!({
                "id": 9, "handover_id": 4, "mailbox": mailbox, "patient_key": "p",
                "urgent": false, "state": state, "attempt": 0, "queued_at_ms": 0,
                "due_ms": 500, "view": view, "event": event, "sender": "YP002",
            }))
            .unwrap()
        };
        let claimed = release("YG002", "queued", FULL_VIEW, "RELEASE");
        let m = claimed_moving_on(&claimed).expect("a claimed release moves its patient on");
        assert_eq!((m.from, m.to, m.due_ms), ("YP002", "YG002", Some(500)));
        assert_eq!(m.event, JourneyEvent::Release);
        // Only what reached the prison before the release (handover 4):
        // what a later custody sent there stays with the prison.
        let waiting = |handover_id: u64| -> DeliveryRecord {
            serde_json::from_value(serde_json::json!({
                "id": 12, "handover_id": handover_id, "mailbox": "YP002", "patient_key": "p",
                "urgent": false, "state": "queued", "attempt": 0, "queued_at_ms": 0,
                "view": FULL_VIEW, "event": "TRANSFER", "sender": "YP001",
            }))
            .unwrap()
        };
        assert!(forwards_to(&waiting(3), &m));
        assert!(!forwards_to(&waiting(5), &m));
        // Still parked, another view, another event, or no sender: nothing.
        for d in [
            release(PARKED_MAILBOX, "parked", FULL_VIEW, "RELEASE"),
            release("YG002", "queued", WITHDRAWN_VIEW, "RELEASE"),
            release("YG002", "queued", FULL_VIEW, "TRANSFER"),
            DeliveryRecord {
                sender: None,
                ..claimed.clone()
            },
        ] {
            assert!(claimed_moving_on(&d).is_none(), "{d:?}");
        }
    }

    #[test]
    fn a_summary_sent_on_is_queued_afresh_with_its_attempts_and_deadline_renewed() {
        let mut d: DeliveryRecord = serde_json::from_value(serde_json::json!({
            "id": 7, "handover_id": 3, "mailbox": "YP002", "patient_key": "p",
            "urgent": false, "state": "leased", "attempt": 3, "queued_at_ms": 0,
            "lease_until_ms": 50, "not_before_ms": 40, "due_ms": 100, "overdue_at_ms": 120,
            "view": FULL_VIEW, "event": "TRANSFER", "sender": "YP001",
        }))
        .unwrap();
        let mut m = MovingOn {
            from: "YP002",
            to: "YP003",
            event: JourneyEvent::Transfer,
            due_ms: Some(500),
            before: None,
        };
        send_on(&mut d, &m, 20, 5);
        assert_eq!(d.mailbox, "YP003");
        assert_eq!(d.forwarded_from.as_deref(), Some("YP002"));
        assert_eq!(d.state, DeliveryState::Queued);
        assert_eq!((d.lease_until_ms, d.not_before_ms), (None, None));
        assert_eq!(d.max_attempts, Some(8));
        // Due when the copy that moved it is, and reported again if missed.
        assert_eq!((d.due_ms, d.overdue_at_ms), (Some(500), None));
        // Sent on again: it names the prison it was first queued for, and a
        // sooner deadline never brings its own forward.
        (m.from, m.to, m.due_ms) = ("YP003", "YP004", Some(200));
        send_on(&mut d, &m, 20, 5);
        assert_eq!(d.forwarded_from.as_deref(), Some("YP002"));
        assert_eq!(d.due_ms, Some(500));
        // An urgent copy keeps its deadline, passed or not.
        let mut urgent = DeliveryRecord {
            urgent: true,
            due_ms: Some(100),
            ..d.clone()
        };
        (m.from, m.to, m.due_ms) = ("YP004", "YP005", Some(900));
        send_on(&mut urgent, &m, 20, 5);
        assert_eq!(urgent.due_ms, Some(100));
    }

    /// A transfer's movement is keyed by its instant in UTC; one stored
    /// before that was keyed by its time as written, which a correction
    /// written with the same offset still matches.
    #[test]
    fn a_movement_stored_before_utc_keys_is_still_the_same_movement() {
        let transfer = |id: u64, movement: &str, written: Option<&str>| -> HandoverRecord {
            let mut v = serde_json::json!({
                "id": id, "sender": "YP001", "message_id": format!("m-{id}"),
                "event": "TRANSFER", "content_hash": "c", "payload_hash": "p",
                "payload_len": 9, "patient_key": "k", "submitted_at_ms": 1_000,
                "deliveries": [], "movement": movement,
            });
            if let Some(w) = written {
                v["movement_as_written"] = serde_json::json!(w);
            }
            serde_json::from_value(v).unwrap()
        };
        // Stored before: the key of 10:00+01:00 as written.
        let old = transfer(1, "k-written", None);
        // Its correction now: the key of 09:00Z, and of 10:00+01:00 as written.
        let correction = transfer(2, "k-utc", Some("k-written"));
        assert!(correction.same_movement(&old));
        assert!(kept_carer(&correction, &old, Some("YP002"), "YP002"));
        // Now both keyed by the instant: the offset written does not matter.
        let z = transfer(3, "k-utc", None);
        assert!(z.same_movement(&correction) && correction.same_movement(&z));
        // Another time is another movement.
        let other = transfer(4, "k-other", Some("k-other-written"));
        assert!(!other.same_movement(&old) && !other.same_movement(&correction));
    }

    /// The continuity pass decodes only some fields of the stored records:
    /// from a record with every field set, it reads what the full record says.
    #[test]
    fn the_continuity_facts_read_from_a_stored_record_are_the_records_own() {
        let handover: HandoverRecord = serde_json::from_value(serde_json::json!({
            "id": 12, "sender": "YP001", "message_id": "m-12", "event": "RELEASE",
            "content_hash": "c", "payload_hash": "p", "payload_len": 9,
            "patient_key": "k", "submitted_at_ms": 1_000, "deliveries": [30, 31],
            "supersedes": 11, "finished_at_ms": 2_000, "shredded_at_ms": 3_000,
            "trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "authored_at_ms": 900, "superseded_on_arrival_by": 13,
            "episode": "e", "movement": "mv",
        }))
        .unwrap();
        let stored = serde_json::to_vec(&handover).unwrap();
        let read: ReleaseFacts = serde_json::from_slice(&stored).unwrap();
        assert_eq!(read, ReleaseFacts::from(&handover));
        assert_eq!(
            (read.supersedes, read.superseded_on_arrival_by),
            (Some(11), Some(13))
        );
        let delivery: DeliveryRecord = serde_json::from_value(serde_json::json!({
            "id": 30, "handover_id": 12, "mailbox": "YG001", "patient_key": "k",
            "urgent": true, "state": "delivered", "attempt": 2,
            "lease_until_ms": 1_500, "not_before_ms": 1_100, "queued_at_ms": 1_000,
            "last_leased_at_ms": 1_400, "delivered_at_ms": 1_600,
            "quarantined_at_ms": null, "reason": "r", "view": FULL_VIEW,
            "not_carried": ["x"], "event": "RELEASE", "due_ms": 5_000,
            "overdue_at_ms": 5_001, "superseded_by": 40, "superseded_by_handover": 14,
            "sender": "YP001", "superseded_at_ms": 1_700, "claim_keys": ["ck"],
            "claimed_by": "YG001", "claimed_at_ms": 1_200, "max_attempts": 9,
            "finished_at_ms": 1_800, "nacked_attempt": 1, "forwarded_from": "YP002",
        }))
        .unwrap();
        let stored = serde_json::to_vec(&delivery).unwrap();
        let read: CopyFacts = serde_json::from_slice(&stored).unwrap();
        assert_eq!(read, CopyFacts::from(&delivery));
        assert_eq!(
            (read.delivered_at_ms, read.due_ms, read.claimed_at_ms),
            (Some(1_600), Some(5_000), Some(1_200))
        );
    }

    #[test]
    fn mailbox_keys_sort_by_delivery_and_do_not_prefix_each_other() {
        let a = mailbox_key("AB1", 2);
        let b = mailbox_key("AB1", 256);
        assert!(a < b);
        assert_eq!(split_mailbox_key(&b), Some(("AB1".to_owned(), 256)));
        assert!(!mailbox_key("AB12", 1).starts_with(&mailbox_prefix("AB1")));
    }

    #[test]
    fn the_later_written_summary_is_newer_whatever_the_arrival_order() {
        let at = |authored_at_ms, handover_id| Recency {
            authored_at_ms,
            handover_id,
        };
        // Written later, received earlier: still newer.
        assert!(newer_than(at(Some(20), 1), at(Some(10), 2)));
        assert!(!newer_than(at(Some(10), 2), at(Some(20), 1)));
        // Written at the same moment, or one time unknown: arrival decides.
        assert!(newer_than(at(Some(10), 2), at(Some(10), 1)));
        assert!(newer_than(at(None, 2), at(Some(20), 1)));
        assert!(!newer_than(at(Some(20), 1), at(None, 2)));
        assert!(!newer_than(at(Some(10), 1), at(Some(10), 1)));
    }

    #[test]
    fn chunks_detect_corruption() {
        let mut value = encode_chunk(b"hello");
        assert_eq!(decode_chunk(&value), Some(&b"hello"[..]));
        value[5] ^= 1;
        assert_eq!(decode_chunk(&value), None);
        assert_eq!(decode_chunk(&[1, 2]), None);
    }

    /// A handover record written before traces reads, and one written
    /// with traces off is byte for byte what an older gateway wrote.
    #[test]
    fn handover_records_without_a_trace_context_read_as_before() {
        let old = r#"{"id":7,"sender":"YP001","message_id":"m","event":"RELEASE","content_hash":"c","payload_hash":"p","payload_len":3,"patient_key":"k","submitted_at_ms":1,"deliveries":[8]}"#;
        let record: HandoverRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.trace_parent, None);
        assert_eq!(serde_json::to_string(&record).unwrap(), old);
        let traced = HandoverRecord {
            trace_parent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            ..record
        };
        let text = serde_json::to_string(&traced).unwrap();
        assert_eq!(
            serde_json::from_str::<HandoverRecord>(&text).unwrap(),
            traced
        );
    }
}
