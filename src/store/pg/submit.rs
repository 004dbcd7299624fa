//! A submit on PostgreSQL: dedupe on (sender, message id) under the
//! `counters` lock, the patient resolved through the identity links,
//! supersession of older copies (docs/journey.md), and the handover, its
//! deliveries and its sealed payload written in the same transaction.

use sha2::{Digest, Sha256};
use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::Shared;
use super::queue::{Step, retire};
use super::sql::{self, db, id};
use crate::audit::{AuditEvent, hex};
use crate::store::identity::{EarlierCopies, GIVEN_WALK, Place, Routed};
use crate::store::records::{
    self, IdentityConflict, PARKED_MAILBOX, PatientRecord, Recency, newer_than, replacement_in,
    supersede_event, superseded_on_arrival_outcome,
};
use crate::store::writer::{Owner, content_hash, new_delivery};
use crate::store::{
    DeliveryRecord, DeliveryState, HandoverRecord, NewHandover, PatientIds, StoreError,
    SubmitOutcome,
};

pub(super) async fn submit(
    tx: &Transaction<'_>,
    s: &Shared,
    h: &NewHandover,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<SubmitOutcome> {
    let (last_handover, mut last_delivery) = lock_counters(tx).await?;
    let content = content_hash(h);
    let previous = tx
        .query_opt(
            "SELECT record FROM handovers WHERE sender = $1 AND message_id = $2",
            &[&h.sender, &h.message_id],
        )
        .await
        .map_err(db)?;
    if let Some(row) = previous {
        let original: HandoverRecord = row.get::<_, Json<HandoverRecord>>(0).0;
        return repeat(tx, h, original, &content, audit).await;
    }
    let key = crate::store::TrackKey::MessageId(h.message_id.clone());
    if let Some(t) = super::retention::tombstone_for(tx, &h.sender, &key).await? {
        audit.push(crate::store::records::retired_event(&h.actor, &t));
        return Ok(Err(StoreError::Retired {
            removed_at_ms: t.removed_at_ms,
        }));
    }
    let links = records::may_link(h.event);
    let patient_key = match resolve_patient(tx, (&h.patient, links), now, audit).await? {
        Ok(key) => key,
        Err((field, key)) => {
            record_conflict(tx, h, (field, key), now, audit).await?;
            return Ok(Err(StoreError::IdentityConflict { field }));
        }
    };
    let handover_id = last_handover + 1;
    let routed = with_withdrawals(tx, &patient_key, h).await?;
    let deliveries: Vec<(String, u64)> = routed
        .destinations
        .iter()
        .map(|d| {
            last_delivery += 1;
            (d.mailbox.clone(), last_delivery)
        })
        .collect();
    let newer = Newer {
        actor: &h.actor,
        sender: &h.sender,
        event: h.event,
        patient_key: &patient_key,
        handover_id,
        authored_at_ms: h.authored_at_ms,
        deliveries: &deliveries,
        episode: h.episode.as_ref(),
    };
    let (written_later, supersedes) = join_lineage(tx, &newer, h, now, audit).await?;
    extend_claim_keys(tx, &patient_key, &h.claim_keys).await?;
    let record = HandoverRecord {
        id: handover_id,
        content_hash: content,
        payload_hash: hex(&Sha256::digest(&h.payload)),
        payload_len: h.payload.len() as u64,
        patient_key: patient_key.clone(),
        submitted_at_ms: now,
        deliveries: deliveries.iter().map(|(_, d)| *d).collect(),
        supersedes,
        finished_at_ms: deliveries.is_empty().then_some(now),
        superseded_on_arrival_by: written_later.as_ref().map(|w| w.id),
        ..sent_as(h)
    };
    // The handover row first: deliveries and payload refer to it.
    sql::put_handover(tx, &record).await?;
    let owner = (handover_id, patient_key.as_str());
    put_deliveries(tx, h, owner, (&routed, &deliveries), now, audit).await?;
    if let Some(moving) = records::moving_on(&h.sender, h.event, &routed.destinations) {
        let corrected = supersedes.filter(|_| h.supersede);
        let next = (&mut last_delivery, now);
        take_on_and_resend(tx, s, (moving, corrected), owner, next, audit).await?;
    }
    if let Some(latest) = &written_later {
        superseded_on_arrival(tx, &newer, latest, now, audit).await?;
    }
    store_payload(tx, s, handover_id, &h.payload).await?;
    tx.execute(
        "UPDATE counters SET last_handover = $1, last_delivery = $2",
        &[&id(handover_id), &id(last_delivery)],
    )
    .await
    .map_err(db)?;
    let mailboxes: Vec<String> = deliveries.iter().map(|(m, _)| m.clone()).collect();
    sql::notify(tx, &mailboxes).await?;
    audit.push(AuditEvent {
        actor: h.actor.clone(),
        action: "submit",
        handover_id: Some(handover_id),
        patient_key: Some(patient_key),
        outcome: "ok".into(),
        ..AuditEvent::default()
    });
    Ok(Ok(SubmitOutcome {
        handover_id,
        deliveries,
        duplicate: false,
        superseded_on_arrival_by: written_later.map(|w| w.id),
    }))
}

/// Writes a new handover's delivery records.
async fn put_deliveries(
    tx: &Transaction<'_>,
    h: &NewHandover,
    (handover_id, patient_key): (u64, &str),
    (routed, deliveries): (&Routed, &[(String, u64)]),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let owner = Owner {
        handover_id,
        sender: &h.sender,
        event: h.event,
        patient_key,
    };
    for (i, (dest, (_, did))) in routed.destinations.iter().zip(deliveries).enumerate() {
        let mut record = new_delivery(&owner, dest, *did, &h.claim_keys, now);
        if let Some(f) = routed.followed.as_ref().filter(|f| f.index == i) {
            audit.push(f.apply(&mut record, now));
        }
        sql::put_delivery(tx, &record).await?;
    }
    Ok(())
}

/// Sends on the summaries `m.from` has not acknowledged, whose patient
/// transfer or release `handover` sends to `m.to`, as the sled engine does
/// (`Writer::forward`, [`records::forwards_to`]). The handover's own copy
/// wakes `m.to`'s pullers.
async fn forward(
    tx: &Transaction<'_>,
    s: &Shared,
    m: &records::MovingOn<'_>,
    (handover, patient_key): (u64, &str),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE mailbox = $1 AND patient_key = $2 \
             AND state IN ('queued', 'leased') AND superseded_by IS NULL \
             ORDER BY id FOR UPDATE",
            &[&m.from, &patient_key],
        )
        .await
        .map_err(db)?;
    for row in rows {
        let mut d = row.get::<_, Json<DeliveryRecord>>(0).0;
        if !records::forwards_to(&d, m) {
            continue;
        }
        let copies = sql::deliveries_of(tx, d.handover_id).await?;
        if let Some(held) = records::held_by(&copies, &d, m.to).map(|c| c.id) {
            audit.push(records::held_event(&d, (m.from, m.to), held, handover));
            d.superseded_by = Some(held);
            super::queue::retire(tx, &mut d, now).await?;
            continue;
        }
        records::send_on(&mut d, m, handover, s.options.max_attempts);
        sql::put_delivery(tx, &d).await?;
        audit.push(records::forward_event(&d, m.from, handover));
    }
    Ok(())
}

/// What the practice that claimed parked release `d` takes on from the
/// prison that released the patient, as the sled engine does
/// (`Writer::take_on_claimed`): nothing once a custody movement of the
/// patient was reported since the release. The caller holds the
/// `counters` lock, as a submit does, so that the rows locked here (older
/// than the release's) cannot wait on a submit that holds them and waits
/// for the release's.
pub(super) async fn take_on_claimed(
    tx: &Transaction<'_>,
    s: &Shared,
    d: &DeliveryRecord,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let Some(m) = records::claimed_moving_on(d) else {
        return Ok(());
    };
    let Some(release) = sql::handover(tx, d.handover_id).await? else {
        return Ok(());
    };
    if super::identity::moved_since(tx, &release, &records::CUSTODY_EVENTS, None).await? {
        return Ok(());
    }
    take_on(tx, s, m, None, (d.handover_id, &d.patient_key), now, audit).await?;
    Ok(())
}

/// [`take_on`], then, for a correction to another carer, [`resend`].
async fn take_on_and_resend(
    tx: &Transaction<'_>,
    s: &Shared,
    (m, corrected): (records::MovingOn<'_>, Option<u64>),
    handover: (u64, &str),
    next: (&mut u64, i64),
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    if let Some(named) = take_on(tx, s, m, corrected, handover, next.1, audit).await? {
        let from_named = records::MovingOn {
            from: &named.carer,
            ..m
        };
        resend(tx, &from_named, &named.mistaken, handover, next, audit).await?;
    }
    Ok(())
}

/// What `m.to` takes on with transfer or release `handover`, as the sled
/// engine does (`Writer::take_on`). For a correction that names another
/// carer than the handover it corrects: that carer and the handovers that
/// named it ([`records::FirstNamed`]), for [`resend`] (which needs the
/// submit's delivery counter).
async fn take_on(
    tx: &Transaction<'_>,
    s: &Shared,
    m: records::MovingOn<'_>,
    corrected: Option<u64>,
    handover: (u64, &str),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<Option<records::FirstNamed>, StoreError> {
    // Only the movement reported last moves anything (`Writer::take_on`).
    let head = tx
        .query_opt(
            "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 AND event = $3",
            &[&handover.1, &m.from, &m.event.to_string()],
        )
        .await
        .map_err(db)?
        .map(|r| sql::un_id(r.get(0)));
    if head != Some(handover.0) {
        return Ok(None);
    }
    forward(tx, s, &m, handover, now, audit).await?;
    if let Some(named) = mistaken_carer(tx, corrected, m.event, handover.0).await?
        && named.carer != m.to
        && named.carer != m.from
    {
        let from_named = records::MovingOn {
            from: &named.carer,
            ..m
        };
        forward(tx, s, &from_named, handover, now, audit).await?;
        return Ok(Some(named));
    }
    Ok(None)
}

/// What `correction` takes from, as the sled engine says
/// (`Writer::mistaken_carer`): who the `event` it corrects (`corrected`)
/// sent the patient to, with the earlier ones it corrects that named the
/// same carer, unless a custody movement was reported since the first.
async fn mistaken_carer(
    tx: &Transaction<'_>,
    corrected: Option<u64>,
    event: crate::journey::JourneyEvent,
    correction: u64,
) -> Result<Option<records::FirstNamed>, StoreError> {
    let Some(corrected) = corrected else {
        return Ok(None);
    };
    let Some(mut first) = sql::handover(tx, corrected).await? else {
        records::corrected_handover_removed(corrected, correction);
        return Ok(None);
    };
    let copies = sql::deliveries_of(tx, first.id).await?;
    let Some(carer) = records::first_carer(&copies, event) else {
        return Ok(None);
    };
    let mut ids = vec![first.id];
    for _ in 0..GIVEN_WALK {
        let Some(older_id) = first.supersedes else {
            break;
        };
        let Some(older) = sql::handover(tx, older_id).await? else {
            break;
        };
        let copies = sql::deliveries_of(tx, older.id).await?;
        let older_carer = records::first_carer(&copies, event);
        if !records::kept_carer(&first, &older, older_carer.as_deref(), &carer) {
            break;
        }
        ids.push(older.id);
        first = older;
    }
    let events = &records::CUSTODY_EVENTS;
    if super::identity::moved_since(tx, &first, events, Some(correction)).await? {
        return Ok(None);
    }
    ids.reverse();
    let mistaken = records::Mistaken {
        ids,
        at_ms: first.submitted_at_ms,
    };
    Ok(Some(records::FirstNamed { carer, mistaken }))
}

/// Sends `m.to` a new copy of each summary `m.from` acknowledged for the
/// patient because transfer or release `mistaken` named it by mistake, as
/// the sled engine does (`Writer::resend`, [`records::resends_to`]): the
/// latest of each lineage, oldest first, unless `m.to` has a copy already.
/// Its handover waits for the copy again. The submit holds the `counters`
/// lock; the new ids come from its `last_delivery`.
async fn resend(
    tx: &Transaction<'_>,
    m: &records::MovingOn<'_>,
    mistaken: &records::Mistaken,
    (handover, patient_key): (u64, &str),
    (last_delivery, now): (&mut u64, i64),
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let latest = tx
        .query(
            "SELECT DISTINCT handover_id FROM lineage WHERE patient_key = $1 \
             AND handover_id <> $2 ORDER BY handover_id",
            &[&patient_key, &id(handover)],
        )
        .await
        .map_err(db)?;
    for row in latest {
        let hid = sql::un_id(row.get(0));
        // Locked against a retention pass shredding or removing it meanwhile.
        let Some(mut h) = tx
            .query_opt(
                "SELECT record FROM handovers WHERE id = $1 FOR NO KEY UPDATE",
                &[&id(hid)],
            )
            .await
            .map_err(db)?
            .map(|r| r.get::<_, Json<HandoverRecord>>(0).0)
        else {
            continue;
        };
        let copies = sql::deliveries_of(tx, hid).await?;
        let Some(acked) = records::copy_to_resend(&copies, m, mistaken) else {
            continue;
        };
        if h.shredded_at_ms.is_some() {
            tracing::warn!(
                alert = "resend_payload_removed",
                handover = h.id,
                to = m.to,
                "a summary the wrongly named carer acknowledged cannot be sent again: its payload was removed under the retention policy"
            );
            continue;
        }
        *last_delivery += 1;
        let ids = (*last_delivery, handover);
        let copy = records::resent_copy(acked, m, ids, patient_key, now);
        // Waits for this copy again (retention skips it until it finishes).
        h.finished_at_ms = None;
        h.deliveries.push(copy.id);
        sql::put_handover(tx, &h).await?;
        sql::put_delivery(tx, &copy).await?;
        audit.push(records::resend_event(&copy, m.from, handover));
    }
    Ok(())
}

/// `h`'s destinations, as the sled engine routes them
/// (`identity::with_withdrawals`): a practice copy that would wait parked
/// goes to the practice that claimed the summary it corrects, and a
/// withdrawal notice goes to each organisation that was given a copy of an
/// earlier handover of its lineage (leased at least once, or delivered) and
/// is not among them.
async fn with_withdrawals(
    tx: &Transaction<'_>,
    patient_key: &str,
    h: &NewHandover,
) -> Result<Routed, StoreError> {
    let mut next = tx
        .query_opt(
            "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 AND event = $3",
            &[&patient_key, &h.sender, &h.event.to_string()],
        )
        .await
        .map_err(db)?
        .map(|r| sql::un_id(r.get(0)));
    let mut earlier = EarlierCopies::new(h);
    for _ in 0..GIVEN_WALK {
        let Some(handover) = next else { break };
        let Some(record) = sql::handover(tx, handover).await? else {
            break;
        };
        // Another custody episode's summaries are not corrected by this one
        // (a late correction of an earlier episode walks past a later one's).
        if !record.in_episode(h.episode.as_ref()) {
            next = record.supersedes;
            continue;
        }
        for d in sql::deliveries_of(tx, handover).await? {
            earlier.visit(d);
        }
        next = record.supersedes;
    }
    Ok(earlier.routed())
}

/// Takes the first lock of a submit: submits serialise here, so a dedupe
/// check after it sees every submit committed before, on any node. Returns
/// the last handover and delivery ids handed out.
async fn lock_counters(tx: &Transaction<'_>) -> Result<(u64, u64), StoreError> {
    let row = tx
        .query_one(
            "SELECT last_handover, last_delivery FROM counters FOR UPDATE",
            &[],
        )
        .await
        .map_err(db)?;
    Ok((
        sql::un_id(row.get::<_, i64>(0)),
        sql::un_id(row.get::<_, i64>(1)),
    ))
}

/// The parts of a handover record the sender gave (the rest is the store's).
fn sent_as(h: &NewHandover) -> HandoverRecord {
    HandoverRecord {
        id: 0,
        sender: h.sender.clone(),
        message_id: h.message_id.clone(),
        event: h.event,
        content_hash: String::new(),
        payload_hash: String::new(),
        payload_len: 0,
        patient_key: String::new(),
        submitted_at_ms: 0,
        deliveries: Vec::new(),
        supersedes: None,
        finished_at_ms: None,
        shredded_at_ms: None,
        trace_parent: h.trace_parent.clone(),
        authored_at_ms: h.authored_at_ms,
        superseded_on_arrival_by: None,
        episode: h.episode.clone(),
        movement: h.movement.clone(),
        movement_as_written: h.movement_as_written.clone(),
    }
}

/// A submit whose (sender, message id) was accepted before.
async fn repeat(
    tx: &Transaction<'_>,
    h: &NewHandover,
    original: HandoverRecord,
    content: &str,
    audit: &mut Vec<AuditEvent>,
) -> Step<SubmitOutcome> {
    let mut event = AuditEvent {
        actor: h.actor.clone(),
        action: "submit",
        handover_id: Some(original.id),
        patient_key: Some(original.patient_key.clone()),
        outcome: "ok: duplicate of an accepted submit".into(),
        ..AuditEvent::default()
    };
    if original.content_hash != content {
        event.outcome = "refused: message id reused for different content".into();
        audit.push(event);
        return Ok(Err(StoreError::Conflict));
    }
    let deliveries = sql::deliveries_of_handover(tx, original.id).await?;
    audit.push(event);
    Ok(Ok(SubmitOutcome {
        handover_id: original.id,
        deliveries,
        duplicate: true,
        superseded_on_arrival_by: original.superseded_on_arrival_by,
    }))
}

/// Seals the payload under a fresh data key wrapped by the master key.
async fn store_payload(
    tx: &Transaction<'_>,
    s: &Shared,
    handover_id: u64,
    payload: &[u8],
) -> Result<(), StoreError> {
    let (data_key, sealed) = s.cipher.seal(handover_id, payload)?;
    tx.execute(
        "INSERT INTO payloads (handover_id, data_key, sealed) VALUES ($1, $2, $3)",
        &[&id(handover_id), &data_key, &sealed],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// The patient identified by `ids`: an identifier resolves through the
/// links kept; a prison's submit with both numbers links them, and two
/// patients known apart (one by each number) are merged into the NHS
/// number's, as on sled (`store::identity`). A link that would give one
/// patient two NHS numbers or two prison numbers (or a prison number
/// found with another date of birth) is refused as a conflict.
async fn resolve_patient(
    tx: &Transaction<'_>,
    (ids, links): (&PatientIds, bool),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<Result<String, (&'static str, String)>, StoreError> {
    let Some(first) = ids.first_key() else {
        return Ok(Ok("unidentified".to_owned()));
    };
    let by_nhs = match &ids.nhs {
        Some(h) => Some(resolve(tx, h).await?),
        None => None,
    };
    let by_prison = match &ids.prison {
        Some(h) => Some(resolve(tx, h).await?),
        None => None,
    };
    let key = by_nhs
        .clone()
        .or_else(|| by_prison.clone())
        .unwrap_or_else(|| first.to_owned());
    let mut record = patient(tx, &key).await?;
    if let Some(field) = records::identity_conflict(&record, ids) {
        return Ok(Err((field, key)));
    }
    if let (Some(a), Some(b)) = (&by_nhs, &by_prison)
        && a != b
        && is_known(tx, b).await?
    {
        let absorbed = patient(tx, b).await?;
        if let Some(field) = records::merge_conflict(&absorbed, ids) {
            return Ok(Err((field, key)));
        }
        if links {
            super::identity::merge(tx, &mut record, (a, b), absorbed, now, audit).await?;
        }
    }
    if !links {
        return Ok(Ok(key));
    }
    // As on sled (`identity::resolve_patient`): a patient found by a prison
    // number alone keeps the date of birth it came with; a link records it.
    let born = record.dob.is_none() && ids.dob.is_some() && ids.prison.is_some();
    if born {
        record.dob.clone_from(&ids.dob);
    }
    if ids.nhs.is_some() && ids.prison.is_some() {
        record.nhs.clone_from(&ids.nhs);
        record.prison.clone_from(&ids.prison);
        for identifier in [&ids.nhs, &ids.prison].into_iter().flatten() {
            tx.execute(
                "INSERT INTO identities (identifier, patient_key) VALUES ($1, $2) \
                 ON CONFLICT (identifier) DO UPDATE SET patient_key = EXCLUDED.patient_key",
                &[identifier, &key],
            )
            .await
            .map_err(db)?;
        }
        super::identity::put_patient(tx, &key, &record).await?;
    } else if born {
        super::identity::put_patient(tx, &key, &record).await?;
    }
    Ok(Ok(key))
}

async fn resolve(tx: &Transaction<'_>, identifier: &str) -> Result<String, StoreError> {
    let row = tx
        .query_opt(
            "SELECT patient_key FROM identities WHERE identifier = $1",
            &[&identifier],
        )
        .await
        .map_err(db)?;
    Ok(row.map_or_else(|| identifier.to_owned(), |r| r.get(0)))
}

async fn patient(tx: &Transaction<'_>, key: &str) -> Result<PatientRecord, StoreError> {
    let row = tx
        .query_opt(
            "SELECT record FROM patients WHERE patient_key = $1",
            &[&key],
        )
        .await
        .map_err(db)?;
    Ok(row
        .map(|r| r.get::<_, Json<PatientRecord>>(0).0)
        .unwrap_or_default())
}

/// Whether anything is held under patient key `key`.
async fn is_known(tx: &Transaction<'_>, key: &str) -> Result<bool, StoreError> {
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM patients WHERE patient_key = $1) \
             OR EXISTS (SELECT 1 FROM deliveries WHERE patient_key = $1 \
                        AND state IN ('queued', 'leased', 'parked', 'quarantined')) \
             OR EXISTS (SELECT 1 FROM lineage WHERE patient_key = $1)",
            &[&key],
        )
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

async fn record_conflict(
    tx: &Transaction<'_>,
    h: &NewHandover,
    (field, patient_key): (&'static str, String),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let conflict = IdentityConflict {
        at_ms: now,
        sender: h.sender.clone(),
        message_id: h.message_id.clone(),
        field: field.to_owned(),
    };
    tx.execute(
        "INSERT INTO identity_conflicts (record) VALUES ($1)",
        &[&Json(&conflict)],
    )
    .await
    .map_err(db)?;
    audit.push(AuditEvent {
        actor: h.actor.clone(),
        action: "submit",
        patient_key: Some(patient_key),
        outcome: format!("refused: identity conflict on {field}: linked to a different patient"),
        ..AuditEvent::default()
    });
    Ok(())
}

/// The handover a submit is creating, as supersession needs it.
pub(super) struct Newer<'a> {
    pub actor: &'a str,
    pub sender: &'a str,
    pub event: crate::journey::JourneyEvent,
    pub patient_key: &'a str,
    pub handover_id: u64,
    pub authored_at_ms: Option<i64>,
    pub deliveries: &'a [(String, u64)],
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

/// Handover `handover`'s place in its lineage (arrival order alone when
/// its record went under the retention policy).
pub(super) async fn recency_of(tx: &Transaction<'_>, handover: u64) -> Result<Recency, StoreError> {
    let authored_at_ms = tx
        .query_opt(
            "SELECT (record->>'authored_at_ms')::bigint FROM handovers WHERE id = $1",
            &[&id(handover)],
        )
        .await
        .map_err(db)?
        .and_then(|r| r.get::<_, Option<i64>>(0));
    Ok(Recency {
        authored_at_ms,
        handover_id: handover,
    })
}

/// Places `newer` in its lineage, as the sled engine does
/// (`Writer::join_lineage`): superseded on arrival by the latest of its
/// custody episode written after it; else the latest of its episode, and a
/// late correction of an earlier episode spliced in below the later
/// episode's summaries, which it does not supersede.
async fn join_lineage(
    tx: &Transaction<'_>,
    newer: &Newer<'_>,
    h: &NewHandover,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(Option<HandoverRecord>, Option<u64>), StoreError> {
    let Place { at, after } = place(tx, newer).await?;
    if let Some(at) = at
        .as_ref()
        .filter(|at| newer_than((*at).into(), newer.recency()))
    {
        return Ok((Some(at.clone()), None));
    }
    if h.supersede {
        supersede_older(tx, newer, after.is_some(), now, audit).await?;
    }
    if let (Some(mut after), Some(at)) = (after, at) {
        after.supersedes = Some(newer.handover_id);
        sql::put_handover(tx, &after).await?;
        return Ok((None, Some(at.id)));
    }
    let supersedes = advance_lineage(tx, newer.patient_key, h, newer.handover_id).await?;
    Ok((None, supersedes))
}

/// Where `newer` joins its lineage ([`Place`]), walked from the latest.
async fn place(tx: &Transaction<'_>, newer: &Newer<'_>) -> Result<Place, StoreError> {
    let mut next = tx
        .query_opt(
            "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 AND event = $3",
            &[&newer.patient_key, &newer.sender, &newer.event.to_string()],
        )
        .await
        .map_err(db)?
        .map(|r| sql::un_id(r.get(0)));
    let mut after = None;
    for _ in 0..GIVEN_WALK {
        let Some(handover) = next else { break };
        let Some(record) = sql::handover(tx, handover).await? else {
            break;
        };
        match Place::step(&mut after, record, newer.episode) {
            Ok(place) => return Ok(place),
            Err(older) => next = older,
        }
    }
    Ok(Place::default())
}

/// Retires the deliveries of `newer`, a submit written before `latest`,
/// each as superseded by `latest`'s copy in the same mailbox (or its
/// first), and audits each.
async fn superseded_on_arrival(
    tx: &Transaction<'_>,
    newer: &Newer<'_>,
    latest: &HandoverRecord,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let theirs = sql::deliveries_of_handover(tx, latest.id).await?;
    for (mailbox, did) in newer.deliveries {
        let row = tx
            .query_one("SELECT record FROM deliveries WHERE id = $1", &[&id(*did)])
            .await
            .map_err(db)?;
        let mut d = row.get::<_, Json<DeliveryRecord>>(0).0;
        d.superseded_by = replacement_in(&theirs, mailbox);
        d.superseded_by_handover = Some(latest.id);
        retire(tx, &mut d, now).await?;
        let outcome = superseded_on_arrival_outcome(latest.id);
        audit.push(supersede_event(newer.actor, &d, outcome));
    }
    Ok(())
}

/// Retires every undelivered copy of older handovers from the same sender
/// for the same patient and event (docs/journey.md, supersession).
pub(super) async fn supersede_older(
    tx: &Transaction<'_>,
    newer: &Newer<'_>,
    own_episode: bool,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT d.record, (h.record->>'authored_at_ms')::bigint, h.record->>'episode', \
             h.id IS NOT NULL FROM deliveries d \
             LEFT JOIN handovers h ON h.id = d.handover_id \
             WHERE d.patient_key = $1 AND d.sender = $2 AND d.event = $3 \
             AND d.state IN ('queued', 'leased', 'parked', 'quarantined') \
             AND d.superseded_by IS NULL AND d.handover_id <> $4 ORDER BY d.id FOR UPDATE OF d",
            &[
                &newer.patient_key,
                &newer.sender,
                &newer.event.to_string(),
                &id(newer.handover_id),
            ],
        )
        .await
        .map_err(db)?;
    for row in rows {
        let mut d = row.get::<_, Json<DeliveryRecord>>(0).0;
        let theirs = Recency {
            authored_at_ms: row.get(1),
            handover_id: d.handover_id,
        };
        let episode: Option<String> = row.get(2);
        let in_episode = row.get::<_, bool>(3)
            && !matches!((&episode, newer.episode), (Some(a), Some(b)) if a != b);
        if !newer_than(newer.recency(), theirs) || (own_episode && !in_episode) {
            continue;
        }
        d.superseded_by = replacement_in(newer.deliveries, &d.mailbox);
        d.superseded_by_handover = Some(newer.handover_id);
        let outcome = if d.state == DeliveryState::Leased {
            sql::put_delivery(tx, &d).await?;
            "ok: leased copy marked stale; it will not be offered again".to_owned()
        } else {
            retire(tx, &mut d, now).await?;
            format!("ok: superseded by handover {}", newer.handover_id)
        };
        audit.push(supersede_event(newer.actor, &d, outcome));
    }
    Ok(())
}

/// The lineage's previous handover for this patient, sender and event,
/// now replaced by `handover_id`.
async fn advance_lineage(
    tx: &Transaction<'_>,
    patient_key: &str,
    h: &NewHandover,
    handover_id: u64,
) -> Result<Option<u64>, StoreError> {
    let event = h.event.to_string();
    let previous = tx
        .query_opt(
            "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 AND event = $3",
            &[&patient_key, &h.sender, &event],
        )
        .await
        .map_err(db)?
        .map(|r| sql::un_id(r.get(0)));
    tx.execute(
        "INSERT INTO lineage (patient_key, sender, event, handover_id) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (patient_key, sender, event) DO UPDATE SET handover_id = EXCLUDED.handover_id",
        &[&patient_key, &h.sender, &event, &id(handover_id)],
    )
    .await
    .map_err(db)?;
    Ok(previous)
}

/// Lets the parked releases of this patient that share one of `claim_keys`
/// be claimed with the others too.
async fn extend_claim_keys(
    tx: &Transaction<'_>,
    patient_key: &str,
    claim_keys: &[String],
) -> Result<(), StoreError> {
    if claim_keys.len() < 2 {
        return Ok(());
    }
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE mailbox = $1 AND patient_key = $2 \
             AND state = 'parked' ORDER BY id FOR UPDATE",
            &[&PARKED_MAILBOX, &patient_key],
        )
        .await
        .map_err(db)?;
    for mut d in sql::deliveries(&rows) {
        if !d.shares_claim_key(claim_keys) {
            continue;
        }
        if d.widen_claim_keys(claim_keys) {
            sql::put_delivery(tx, &d).await?;
        }
    }
    Ok(())
}
