//! PDS on PostgreSQL (`store/pds.rs` says what a finding and an automatic
//! claim are): a finding is written onto a delivery only while it is still
//! parked, an automatic claim moves it in the same transaction with its
//! audit entry, and an admission notice reopens its handover with a new
//! delivery under the `counters` lock, as a submit takes its ids.
//!
//! Every node runs the PDS lookups; one at a time does a round
//! ([`PgStore::pds_turn`], the same kind of turn as MESH's, `pg/mesh.rs`),
//! so a parked release is looked up, and its lookup audited, once.

use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::queue::{Step, in_tx};
use super::sql::{self, db, id};
use super::{PgStore, Turn};
use crate::audit::AuditEvent;
use crate::journey::JourneyEvent;
use crate::store::pds::notice_delivery;
use crate::store::records::PARKED_MAILBOX;
use crate::store::{
    DeliveryRecord, DeliveryState, HandoverRecord, PDS_ACTOR, PdsNotice, PdsResult, PdsStatus,
    StoreError,
};

/// The advisory-lock key of the PDS lookups' turn ("tcpdsloo" in ASCII).
pub const PDS_LOCK: i64 = 0x7463_7064_736c_6f6f;

impl PgStore {
    /// Records `result` on its parked delivery, moving it to
    /// `result.route_to` when set; `None` when it is no longer parked.
    ///
    /// # Errors
    /// Database failures.
    pub async fn pds_result(
        &self,
        result: PdsResult,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| pds_result(
                &tx, &s, &result, now, &mut audit
            )
            .await)
        })
        .await
    }

    /// Sends an unrouted admission's notice to the practice PDS names;
    /// the new delivery's id, or `None` when the admission already went
    /// somewhere, was shredded or a newer one replaced it.
    ///
    /// # Errors
    /// Database failures.
    pub async fn pds_notify(&self, notice: PdsNotice) -> Result<Option<u64>, StoreError> {
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| pds_notify(
                &tx, &notice, now, &mut audit
            )
            .await)
        })
        .await
    }

    /// Admissions submitted at or after `since_ms` that went to nobody,
    /// newest first, at most `limit`.
    ///
    /// # Errors
    /// Database failures.
    pub fn unrouted_admissions(
        &self,
        since_ms: i64,
        skip: &std::collections::HashSet<u64>,
        limit: usize,
    ) -> Result<Vec<HandoverRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let skip: Vec<i64> = skip
            .iter()
            .filter_map(|id| i64::try_from(*id).ok())
            .collect();
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query(
                    "SELECT record FROM handovers WHERE event = $1 AND submitted_at_ms >= $2 \
                     AND jsonb_array_length(record->'deliveries') = 0 \
                     AND record->>'shredded_at_ms' IS NULL AND NOT (id = ANY($4)) \
                     ORDER BY id DESC LIMIT $3",
                    &[
                        &JourneyEvent::Admission.to_string(),
                        &since_ms,
                        &limit,
                        &skip,
                    ],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, Json<HandoverRecord>>(0).0)
                .collect())
        })
    }

    /// This node's turn at a round of PDS lookups, or `None` while another
    /// node's round holds it.
    ///
    /// # Errors
    /// Database failures.
    pub async fn pds_turn(&self) -> Result<Option<Turn>, StoreError> {
        self.turn(PDS_LOCK).await
    }
}

async fn pds_result(
    tx: &Transaction<'_>,
    s: &super::Shared,
    result: &PdsResult,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<Option<DeliveryRecord>> {
    // The first lock, as for a submit and a claim: a release routed to a
    // practice may send on older copies (`submit::take_on_claimed`).
    if result.route_to.is_some() {
        sql::lock_counters(tx).await?;
    }
    let Some(mut d) = sql::delivery_for_update(tx, result.delivery_id).await? else {
        return Ok(Ok(None));
    };
    if d.state != DeliveryState::Parked || d.mailbox != PARKED_MAILBOX {
        return Ok(Ok(None));
    }
    let mut finding = result.finding.clone();
    if finding.status == PdsStatus::Restricted {
        finding.practice = None;
    }
    let outcome = match &result.route_to {
        Some(to) => {
            d.mailbox.clone_from(to);
            d.state = DeliveryState::Queued;
            d.claimed_by = Some(PDS_ACTOR.to_owned());
            d.claimed_at_ms = Some(now);
            sql::notify(tx, std::slice::from_ref(to)).await?;
            format!("ok: parked release claimed for {to} (source: PDS, registered practice)")
        }
        None => format!("ok: kept parked: {}", finding.reason()),
    };
    d.pds = Some(finding);
    sql::put_delivery(tx, &d).await?;
    audit.push(AuditEvent {
        actor: PDS_ACTOR.to_owned(),
        action: if result.route_to.is_some() {
            "claim"
        } else {
            "pds_lookup"
        },
        handover_id: Some(d.handover_id),
        delivery_id: Some(d.id),
        patient_key: Some(d.patient_key.clone()),
        outcome,
    });
    super::submit::take_on_claimed(tx, s, &d, now, audit).await?;
    Ok(Ok(Some(d)))
}

async fn pds_notify(
    tx: &Transaction<'_>,
    notice: &PdsNotice,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<Option<u64>> {
    // The first lock, as for a submit: the new delivery's id comes from it.
    let last_delivery: i64 = tx
        .query_one("SELECT last_delivery FROM counters FOR UPDATE", &[])
        .await
        .map_err(db)?
        .get(0);
    // Locked against a retention pass shredding or removing it meanwhile.
    let Some(mut h) = tx
        .query_opt(
            "SELECT record FROM handovers WHERE id = $1 FOR NO KEY UPDATE",
            &[&id(notice.handover_id)],
        )
        .await
        .map_err(db)?
        .map(|r| r.get::<_, Json<HandoverRecord>>(0).0)
    else {
        return Ok(Ok(None));
    };
    let latest = tx
        .query_opt(
            "SELECT handover_id FROM lineage WHERE patient_key = $1 AND sender = $2 AND event = $3",
            &[&h.patient_key, &h.sender, &h.event.to_string()],
        )
        .await
        .map_err(db)?
        .map(|r| sql::un_id(r.get(0)));
    if !h.deliveries.is_empty() || h.shredded_at_ms.is_some() || latest.is_some_and(|l| l != h.id) {
        return Ok(Ok(None));
    }
    // Released, or admitted again, since (`identity::left_custody_since`).
    if super::identity::left_custody_since(tx, &h).await? {
        return Ok(Ok(None));
    }
    // Waits for this delivery again (retention skips it until it finishes).
    h.finished_at_ms = None;
    let d = notice_delivery(&h, &notice.delivery, sql::un_id(last_delivery) + 1, now);
    tx.execute("UPDATE counters SET last_delivery = $1", &[&id(d.id)])
        .await
        .map_err(db)?;
    h.deliveries.push(d.id);
    sql::put_handover(tx, &h).await?;
    sql::put_delivery(tx, &d).await?;
    sql::notify(tx, std::slice::from_ref(&d.mailbox)).await?;
    audit.push(AuditEvent {
        actor: PDS_ACTOR.to_owned(),
        action: "route",
        handover_id: Some(h.id),
        delivery_id: Some(d.id),
        patient_key: Some(h.patient_key.clone()),
        outcome: format!(
            "ok: admission notice sent to {} (source: PDS, registered practice)",
            d.mailbox
        ),
    });
    Ok(Ok(Some(d.id)))
}
