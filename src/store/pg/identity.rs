//! Two patients found to be one, on PostgreSQL: the same merge as the sled
//! engine's (`src/store/identity.rs`). A submit carrying both an NHS number
//! and a prison number that resolve to two patients, the prison number's
//! already known (a record, live or quarantined deliveries, or lineage),
//! merges it into the NHS number's patient in the submit's transaction:
//! identifiers re-linked, live and quarantined deliveries re-keyed (per-
//! patient order and supersession then see one patient), lineage moved
//! (where both have a handover from the same sender for the same event,
//! the later supersedes the earlier's undelivered copies), the absorbed key
//! kept as an alias, audited as `identity_link`.

use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::sql::{self, db, id};
use super::submit::{Newer, recency_of, supersede_older};
use crate::audit::AuditEvent;
use crate::journey::JourneyEvent;
use crate::store::StoreError;
use crate::store::records::{PatientRecord, newer_than};

/// Who a merge acts as in the audit trail (as on sled).
const IDENTITY_ACTOR: &str = "urn:gateway:identity";

/// Merges patient `b` into `a` (`into` is `a`'s record, written by the
/// caller); `b` stays as an alias of `a`.
pub(super) async fn merge(
    tx: &Transaction<'_>,
    into: &mut PatientRecord,
    (a, b): (&str, &str),
    absorbed: PatientRecord,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    for identifier in absorbed.nhs.iter().chain(&absorbed.prison) {
        tx.execute(
            "INSERT INTO identities (identifier, patient_key) VALUES ($1, $2) \
             ON CONFLICT (identifier) DO UPDATE SET patient_key = EXCLUDED.patient_key",
            &[identifier, &a],
        )
        .await
        .map_err(db)?;
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
    put_patient(tx, b, &retired).await?;
    // Locked in ascending id order, as every multi-row lock here.
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE patient_key = $1 \
             AND state IN ('queued', 'leased', 'parked', 'quarantined') ORDER BY id FOR UPDATE",
            &[&b],
        )
        .await
        .map_err(db)?;
    for mut d in sql::deliveries(&rows) {
        d.patient_key = a.to_owned();
        sql::put_delivery(tx, &d).await?;
    }
    move_lineage(tx, a, b, now, audit).await?;
    audit.push(AuditEvent {
        actor: IDENTITY_ACTOR.into(),
        action: "identity_link",
        patient_key: Some(a.to_owned()),
        outcome: format!("ok: patient {b} is the same person"),
        ..AuditEvent::default()
    });
    Ok(())
}

/// Writes patient record `record` under `key`.
pub(super) async fn put_patient(
    tx: &Transaction<'_>,
    key: &str,
    record: &PatientRecord,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO patients (patient_key, record) VALUES ($1, $2) \
         ON CONFLICT (patient_key) DO UPDATE SET record = EXCLUDED.record",
        &[&key, &Json(record)],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Moves `b`'s lineage rows to `a`; where both had one, the newer handover
/// (written later, or received later) supersedes the other's undelivered
/// copies.
async fn move_lineage(
    tx: &Transaction<'_>,
    a: &str,
    b: &str,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let theirs = tx
        .query(
            "DELETE FROM lineage WHERE patient_key = $1 RETURNING sender, event, handover_id",
            &[&b],
        )
        .await
        .map_err(db)?;
    for row in theirs {
        let (sender, event): (String, String) = (row.get(0), row.get(1));
        let handover = sql::un_id(row.get(2));
        let ours = tx
            .query_opt(
                "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 \
                 AND event = $3",
                &[&a, &sender, &event],
            )
            .await
            .map_err(db)?
            .map(|r| sql::un_id(r.get(0)));
        let (latest, earlier) = match ours {
            Some(o) if newer_than(recency_of(tx, o).await?, recency_of(tx, handover).await?) => {
                (o, Some(handover))
            }
            Some(o) => (handover, Some(o)),
            None => (handover, None),
        };
        tx.execute(
            "INSERT INTO lineage (patient_key, sender, event, handover_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (patient_key, sender, event) DO UPDATE SET handover_id = EXCLUDED.handover_id",
            &[&a, &sender, &event, &id(latest)],
        )
        .await
        .map_err(db)?;
        if let Some(earlier) = earlier {
            supersede_before(tx, a, (latest, earlier), now, audit).await?;
        }
    }
    Ok(())
}

/// As the sled engine's `identity::join_chains`: `earlier` and its chain
/// join the end of `latest`'s chain, unless already in it.
async fn join_chains(tx: &Transaction<'_>, latest: u64, earlier: u64) -> Result<(), StoreError> {
    let mut at = latest;
    for _ in 0..crate::store::identity::GIVEN_WALK {
        if at == earlier {
            return Ok(());
        }
        let Some(mut h) = sql::handover(tx, at).await? else {
            return Ok(());
        };
        match h.supersedes {
            Some(next) => at = next,
            None => {
                h.supersedes = Some(earlier);
                return sql::put_handover(tx, &h).await;
            }
        }
    }
    Ok(())
}

/// Retires, within patient `patient_key`, the undelivered copies of
/// everything handover `latest` supersedes; `earlier` is the other
/// lineage's latest, which joins the end of `latest`'s chain.
async fn supersede_before(
    tx: &Transaction<'_>,
    patient_key: &str,
    (latest, earlier): (u64, u64),
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    join_chains(tx, latest, earlier).await?;
    // Removed under the retention policy: it finished long ago.
    let Some(handover) = sql::handover(tx, latest).await? else {
        return Ok(());
    };
    let deliveries = sql::deliveries_of_handover(tx, latest).await?;
    let event: JourneyEvent = handover.event;
    let newer = Newer {
        actor: IDENTITY_ACTOR,
        sender: &handover.sender,
        event,
        patient_key,
        handover_id: latest,
        authored_at_ms: handover.authored_at_ms,
        deliveries: &deliveries,
        episode: handover.episode.as_ref(),
    };
    supersede_older(tx, &newer, false, now, audit).await
}

/// [`HandoverRecord::movement_start`] on this engine: the first handover
/// of the custody movement `head` reports, walked back through its
/// corrections.
pub(super) async fn movement_start(
    client: &impl tokio_postgres::GenericClient,
    head: &crate::store::HandoverRecord,
) -> Result<u64, StoreError> {
    let mut start = head.id;
    let mut next = head.supersedes;
    for _ in 0..crate::store::identity::GIVEN_WALK {
        let Some(id) = next else { break };
        let Some(older) = sql::handover(client, id).await? else {
            break;
        };
        if !head.same_movement(&older) {
            break;
        }
        start = older.id;
        next = older.supersedes;
    }
    Ok(start)
}

/// Whether admission `h`'s patient was released, or admitted again, after
/// it: a movement first reported after it, not a correction of an earlier
/// one (the sled engine's `identity::left_custody_since`).
pub(super) async fn left_custody_since(
    tx: &Transaction<'_>,
    h: &crate::store::HandoverRecord,
) -> Result<bool, StoreError> {
    moved_since(
        tx,
        h,
        &[JourneyEvent::Release, JourneyEvent::Admission],
        None,
    )
    .await
}

/// Whether `h`'s patient had a movement of one of `events` first reported
/// after `h`, other than handover `besides` (the sled engine's
/// `identity::moved_since`).
pub(super) async fn moved_since(
    tx: &Transaction<'_>,
    h: &crate::store::HandoverRecord,
    events: &[JourneyEvent],
    besides: Option<u64>,
) -> Result<bool, StoreError> {
    let events: Vec<String> = events.iter().map(ToString::to_string).collect();
    let heads = tx
        .query(
            "SELECT h.record FROM lineage l JOIN handovers h ON h.id = l.handover_id \
             WHERE l.patient_key = COALESCE(\
             (SELECT patient_key FROM identities WHERE identifier = $1), $1) \
             AND l.event = ANY($2) AND l.handover_id > $3 AND l.handover_id <> $4",
            &[&h.patient_key, &events, &id(h.id), &besides.map_or(0, id)],
        )
        .await
        .map_err(db)?;
    for row in heads {
        let head = row.get::<_, Json<crate::store::HandoverRecord>>(0).0;
        if movement_start(tx, &head).await? > h.id {
            return Ok(true);
        }
    }
    Ok(false)
}
