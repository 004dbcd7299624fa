//! The queue's changes on PostgreSQL: pull, ack, nack, sweep, claim,
//! redrive, track, and the audit-only records (a submit's steps are in
//! `submit.rs`). Each is one transaction; its audit entries are appended
//! last and committed with it.
//! A refusal that is audited (a conflict, a stale ack) commits its audit
//! entry and then returns the error: the inner `Result` of each step.

use std::collections::BTreeSet;

use tokio_postgres::Transaction;
use tokio_postgres::types::Json;

use super::sql::{self, LIVE, db, id};
use super::{PgStore, Shared};
use crate::audit::AuditEvent;
use crate::store::records::{self, PARKED_MAILBOX};
use crate::store::{
    AckOutcome, DeliveryRecord, DeliveryState, HandoverRecord, HandoverStatus, LeasedDelivery,
    NewHandover, RedriveOutcome, StoreError, SubmitOutcome, SweepOutcome, TrackKey,
};

/// A step's answer: `Err` outside rolls back; `Err` inside is a refusal
/// whose audit entry is committed.
pub(super) type Step<T> = Result<Result<T, StoreError>, StoreError>;

/// One transaction: `$body` (which may use `$tx`, `$now` and push to
/// `$audit`) evaluates to a [`Step`]; the audit entries are appended, the
/// transaction committed, and only then the answer returned. A transaction
/// PostgreSQL rolled back as a deadlock victim (or a serialisation
/// failure) is run again from the start, at most three times in all:
/// nothing of it was committed. `$body` must therefore only borrow.
macro_rules! in_tx {
    ($shared:ident, |$tx:ident, $now:ident, $audit:ident| $body:expr) => {
        in_tx!($shared, at $shared.now(), |$tx, $now, $audit| $body)
    };
    ($shared:ident, at $at:expr, |$tx:ident, $now:ident, $audit:ident| $body:expr) => {{
        let mut tries = 0;
        loop {
            tries += 1;
            let outcome: Result<_, StoreError> = async {
                let mut client = $shared.client().await?;
                let $tx = client.transaction().await.map_err(sql::db)?;
                let $now = $at;
                let mut $audit: Vec<AuditEvent> = Vec::new();
                let answer = $body?;
                sql::append_audit(&$tx, &$shared, $audit, $now).await?;
                $tx.commit().await.map_err(sql::db)?;
                Ok(answer)
            }
            .await;
            match outcome {
                Err(e) if tries < 3 && super::is_rolled_back_to_retry(&e) => continue,
                Err(e) => break Err(e),
                Ok(answer) => break answer,
            }
        }
    }};
}
pub(super) use in_tx;

impl PgStore {
    /// Stores a handover and queues its deliveries; returns once committed.
    ///
    /// # Errors
    /// [`StoreError::Conflict`], [`StoreError::IdentityConflict`]; database failures.
    pub async fn submit(&self, h: NewHandover) -> Result<SubmitOutcome, StoreError> {
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| super::submit::submit(
                &tx, &s, &h, now, &mut audit
            )
            .await)
        })
        .await
    }

    /// See [`crate::store::SledStore::pull_within`].
    ///
    /// # Errors
    /// Database failures.
    pub async fn pull_within(
        &self,
        actor: &str,
        mailbox: &str,
        (max, max_bytes): (usize, Option<u64>),
        lease_ms: i64,
    ) -> Result<Vec<LeasedDelivery>, StoreError> {
        let (actor, mailbox) = (actor.to_owned(), mailbox.to_owned());
        // Held while the caller waits: dropped with it (its deadline passed,
        // its connection closed), it tells the task, which runs on.
        let (_waiting, mut caller) = tokio::sync::oneshot::channel::<()>();
        self.run(move |s| async move {
            let leased: Vec<LeasedDelivery> = in_tx!(s, |tx, now, audit| {
                let lease = Lease {
                    actor: &actor,
                    mailbox: &mailbox,
                    max,
                    max_bytes,
                    lease_ms,
                };
                pull(&tx, &s, &lease, now, &mut audit).await.map(Ok)
            })?;
            // Leased for a caller already gone: given back at once, unsent,
            // rather than left to wait out leases no one saw.
            let gone = matches!(
                caller.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed)
            );
            if gone && !leased.is_empty() {
                let attempts = crate::store::attempts_of(&leased);
                tracing::info!(
                    deliveries = attempts.len(),
                    "pull abandoned before its answer; its deliveries are given back"
                );
                in_tx!(s, |tx, now, audit| {
                    return_unsent(&tx, (&actor, &mailbox), &attempts, now, &mut audit)
                        .await
                        .map(Ok)
                })?;
                return Ok(Vec::new());
            }
            Ok(leased)
        })
        .await
    }

    /// Acknowledges attempt `attempt` of a leased delivery in `mailbox`.
    ///
    /// # Errors
    /// As for [`crate::store::Store::ack`].
    pub async fn ack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
    ) -> Result<bool, StoreError> {
        let (actor, mailbox) = (actor.to_owned(), mailbox.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                ack(
                    &tx,
                    (&actor, &mailbox),
                    delivery_id,
                    attempt,
                    now,
                    &mut audit,
                )
                .await
            })
        })
        .await
    }

    /// Acknowledges several attempts of `mailbox` in one transaction (see
    /// [`crate::store::Store::ack_batch`]).
    ///
    /// # Errors
    /// Database failures (then nothing in it was acknowledged).
    pub async fn ack_batch(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<Vec<AckOutcome>, StoreError> {
        let (actor, mailbox) = (actor.to_owned(), mailbox.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                ack_batch(&tx, (&actor, &mailbox), &attempts, now, &mut audit).await
            })
        })
        .await
    }

    /// Gives a leased attempt back (see [`crate::store::Store::nack`]).
    ///
    /// # Errors
    /// As for [`crate::store::Store::ack`].
    pub async fn nack(
        &self,
        actor: &str,
        mailbox: &str,
        delivery_id: u64,
        attempt: u32,
        permanent: bool,
        reason: &str,
    ) -> Result<DeliveryState, StoreError> {
        let (actor, mailbox, reason) = (actor.to_owned(), mailbox.to_owned(), reason.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                let giveback = GiveBack {
                    who: (&actor, &mailbox),
                    delivery_id,
                    attempt,
                    permanent,
                    reason: &reason,
                };
                nack(&tx, &s, &giveback, now, &mut audit).await
            })
        })
        .await
    }

    /// See [`crate::store::SledStore::return_unsent`].
    ///
    /// # Errors
    /// Database failures.
    pub async fn return_unsent(
        &self,
        actor: &str,
        mailbox: &str,
        attempts: Vec<(u64, u32)>,
    ) -> Result<(), StoreError> {
        let (actor, mailbox) = (actor.to_owned(), mailbox.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                return_unsent(&tx, (&actor, &mailbox), &attempts, now, &mut audit)
                    .await
                    .map(Ok)
            })
        })
        .await
    }

    /// Quarantines exhausted leases, retires stale ones, reports missed
    /// deadlines once each, across every node.
    ///
    /// # Errors
    /// Database failures.
    pub async fn sweep(&self) -> Result<SweepOutcome, StoreError> {
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| sweep(&tx, &s, now, &mut audit)
                .await
                .map(Ok))
        })
        .await
    }

    /// The state of a handover `sender` submitted (audited).
    ///
    /// # Errors
    /// [`StoreError::UnknownHandover`].
    pub async fn track(
        &self,
        actor: &str,
        sender: &str,
        key: TrackKey,
    ) -> Result<HandoverStatus, StoreError> {
        let (actor, sender) = (actor.to_owned(), sender.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| track(
                &tx,
                (&actor, &sender),
                &key,
                &mut audit
            )
            .await)
        })
        .await
    }

    /// Moves parked releases matching one of `claim_keys` to `to`.
    ///
    /// # Errors
    /// Database failures.
    pub async fn claim(
        &self,
        actor: &str,
        claim_keys: Vec<String>,
        (to, evidence): (&str, &str),
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let (actor, to, evidence) = (actor.to_owned(), to.to_owned(), evidence.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| claim(
                &tx,
                &s,
                (&actor, &to, &evidence),
                &claim_keys,
                now,
                &mut audit
            )
            .await
            .map(Ok))
        })
        .await
    }

    /// Routes held treatment copies on (see `SledStore::route_held`).
    ///
    /// # Errors
    /// Database failures.
    pub async fn route_held(
        &self,
        actor: &str,
        moves: Vec<(u64, String)>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let actor = actor.to_owned();
        self.run(move |s| async move {
            in_tx!(s, |tx, _now, audit| route_held(
                &tx, &actor, &moves, &mut audit
            )
            .await
            .map(Ok))
        })
        .await
    }

    /// Puts quarantined deliveries back in their place.
    ///
    /// # Errors
    /// Database failures.
    pub async fn redrive(
        &self,
        actor: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<(u64, RedriveOutcome)>, StoreError> {
        let actor = actor.to_owned();
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| redrive(
                &tx, &s, &actor, &ids, &mut audit
            )
            .await
            .map(Ok))
        })
        .await
    }

    /// Appends an audit entry that records no change of state.
    ///
    /// # Errors
    /// Database failures: the caller must refuse the action.
    pub async fn record(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                audit.push(event.clone());
                Ok::<_, StoreError>(Ok(()))
            })
        })
        .await
    }

    /// Records an operator's registry change, audited with it.
    ///
    /// # Errors
    /// Database failures.
    pub async fn put_registry_record(
        &self,
        actor: &str,
        code: &str,
        record: Vec<u8>,
    ) -> Result<(), StoreError> {
        let (actor, code) = (actor.to_owned(), code.to_owned());
        self.run(move |s| async move {
            in_tx!(s, |tx, now, audit| {
                tx.execute(
                    "INSERT INTO registry (code, record) VALUES ($1, $2) \
                     ON CONFLICT (code) DO UPDATE SET record = EXCLUDED.record",
                    &[&code, &record],
                )
                .await
                .map_err(db)?;
                // Every node reads the registry again (app.rs).
                sql::notify(&tx, &[super::REGISTRY_CHANGED.to_owned()]).await?;
                audit.push(AuditEvent {
                    actor: actor.clone(),
                    action: "registry_change",
                    outcome: format!("ok: {code}"),
                    ..AuditEvent::default()
                });
                Ok::<_, StoreError>(Ok(()))
            })
        })
        .await
    }
}

/// Marks `d` superseded; finished once its replacement is.
pub(super) async fn retire(
    tx: &Transaction<'_>,
    d: &mut DeliveryRecord,
    now: i64,
) -> Result<(), StoreError> {
    d.state = DeliveryState::Superseded;
    d.superseded_at_ms = Some(now);
    d.not_before_ms = None;
    d.lease_until_ms = None;
    // Finished once its replacement is (now, if it is, or if the newer
    // handover goes to no one: nothing will replace it).
    // The replacement's row is locked: an ack finishing it at the same
    // time either commits first (and is read here) or waits for this one
    // (and then finds this copy among those it replaced).
    let finished = match d.superseded_by {
        Some(by) => sql::delivery_for_update(tx, by)
            .await?
            .is_some_and(|r| r.finished_at().is_some()),
        None => d.superseded_by_handover.is_some(),
    };
    sql::put_delivery(tx, d).await?;
    if finished {
        return delivery_finished(tx, d.id, now).await;
    }
    Ok(())
}

/// What a pull asks for.
struct Lease<'a> {
    actor: &'a str,
    mailbox: &'a str,
    max: usize,
    max_bytes: Option<u64>,
    lease_ms: i64,
}

async fn pull(
    tx: &Transaction<'_>,
    s: &Shared,
    lease: &Lease<'_>,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<Vec<LeasedDelivery>, StoreError> {
    let max_attempts = i32::try_from(s.options.max_attempts).unwrap_or(i32::MAX);
    retire_expired_stale(tx, lease.actor, Some(lease.mailbox), now, audit).await?;
    quarantine_exhausted(tx, s, lease.actor, Some(lease.mailbox), now, audit).await?;
    // Each patient's oldest live delivery of the mailbox is the only one
    // that may go; rows another node holds are skipped, never waited for.
    let rows = tx
        .query(
            &format!(
                "WITH heads AS (SELECT DISTINCT ON (patient_key) id FROM deliveries \
                   WHERE mailbox = $1 AND state IN {LIVE} ORDER BY patient_key, id) \
                 SELECT d.record FROM deliveries d JOIN heads ON heads.id = d.id \
                 WHERE NOT d.stale AND ( \
                   (d.state = 'queued' AND COALESCE(d.not_before_ms, $2) <= $2) \
                   OR (d.state = 'leased' AND d.lease_until_ms <= $2 \
                       AND d.attempt < COALESCE(d.max_attempts, $3))) \
                 ORDER BY d.urgent DESC, d.id LIMIT $4 \
                 FOR UPDATE OF d SKIP LOCKED"
            ),
            &[
                &lease.mailbox,
                &now,
                &max_attempts,
                &i64::try_from(lease.max).unwrap_or(i64::MAX),
            ],
        )
        .await
        .map_err(db)?;
    let mut leased = Vec::with_capacity(rows.len());
    let mut bytes = records::StoredBytes::new(lease.max_bytes);
    for mut d in sql::deliveries(&rows) {
        let handover = sql::handover(tx, d.handover_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("delivery {} has no handover", d.id)))?;
        if !bytes.take(&handover) {
            break;
        }
        d.attempt += 1;
        d.state = DeliveryState::Leased;
        d.lease_until_ms = Some(now.saturating_add(lease.lease_ms));
        d.not_before_ms = None;
        d.last_leased_at_ms = Some(now);
        sql::put_delivery(tx, &d).await?;
        audit.push(AuditEvent {
            actor: lease.actor.to_owned(),
            action: "pull",
            handover_id: Some(d.handover_id),
            delivery_id: Some(d.id),
            patient_key: Some(d.patient_key.clone()),
            outcome: format!("ok: leased, attempt {}", d.attempt),
        });
        leased.push(LeasedDelivery {
            delivery: d,
            handover,
        });
    }
    Ok(leased)
}

/// Leased deliveries (of `mailbox`, or all) whose lease expired on their
/// last allowed attempt: quarantined. Returns how many.
async fn quarantine_exhausted(
    tx: &Transaction<'_>,
    s: &Shared,
    actor: &str,
    mailbox: Option<&str>,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<usize, StoreError> {
    let max_attempts = i32::try_from(s.options.max_attempts).unwrap_or(i32::MAX);
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE state = 'leased' AND NOT stale \
             AND lease_until_ms <= $1 AND attempt >= COALESCE(max_attempts, $2) \
             AND ($3::text IS NULL OR mailbox = $3) ORDER BY id FOR UPDATE SKIP LOCKED",
            &[&now, &max_attempts, &mailbox],
        )
        .await
        .map_err(db)?;
    let found = sql::deliveries(&rows);
    for mut d in found.iter().cloned() {
        let why = format!(
            "lease expired without an ack on attempt {} of {}",
            d.attempt,
            d.max_attempts.unwrap_or(s.options.max_attempts)
        );
        quarantine(&mut d, why, now);
        sql::put_delivery(tx, &d).await?;
        audit.push(AuditEvent {
            actor: actor.to_owned(),
            action: "quarantine",
            handover_id: Some(d.handover_id),
            delivery_id: Some(d.id),
            patient_key: Some(d.patient_key.clone()),
            outcome: "ok: maximum attempts reached".into(),
        });
    }
    Ok(found.len())
}

/// Superseded copies whose lease ended without an ack: retired.
async fn retire_expired_stale(
    tx: &Transaction<'_>,
    actor: &str,
    mailbox: Option<&str>,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE state = 'leased' AND stale \
             AND lease_until_ms <= $1 AND ($2::text IS NULL OR mailbox = $2) \
             ORDER BY id FOR UPDATE SKIP LOCKED",
            &[&now, &mailbox],
        )
        .await
        .map_err(db)?;
    for mut d in sql::deliveries(&rows) {
        retire(tx, &mut d, now).await?;
        let outcome = "ok: lease of a superseded copy ended without an ack".into();
        audit.push(crate::store::records::supersede_event(actor, &d, outcome));
    }
    Ok(())
}

fn quarantine(d: &mut DeliveryRecord, why: String, now: i64) {
    d.state = DeliveryState::Quarantined;
    d.quarantined_at_ms = Some(now);
    d.lease_until_ms = None;
    d.reason = Some(why);
}

/// Loads a delivery for an ack or nack from `mailbox` (locked), checking
/// the attempt and lease; refusals are audited.
async fn leased_for(
    tx: &Transaction<'_>,
    action: &'static str,
    (actor, mailbox): (&str, &str),
    delivery_id: u64,
    attempt: u32,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<records::LeaseVerdict, StoreError> {
    let found = sql::delivery_for_update(tx, delivery_id).await?;
    let foreign = records::foreign(found.as_ref(), mailbox);
    let verdict = records::lease_verdict(found, mailbox, attempt, now);
    if let Err((e, d)) = &verdict {
        audit.push(records::refused_lease_audit(
            action,
            actor,
            attempt,
            (e, d),
            foreign,
        ));
    }
    Ok(verdict)
}

async fn ack(
    tx: &Transaction<'_>,
    who: (&str, &str),
    delivery_id: u64,
    attempt: u32,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<bool> {
    Ok(ack_one(tx, who, delivery_id, attempt, now, audit)
        .await?
        .into_fresh())
}

async fn ack_one(
    tx: &Transaction<'_>,
    who: (&str, &str),
    delivery_id: u64,
    attempt: u32,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<AckOutcome, StoreError> {
    let mut d = match leased_for(tx, "ack", who, delivery_id, attempt, now, audit).await? {
        Ok(d) => d,
        Err(refused) => return Ok(AckOutcome::refused(attempt, refused)),
    };
    d.state = DeliveryState::Delivered;
    d.delivered_at_ms = Some(now);
    d.lease_until_ms = None;
    sql::put_delivery(tx, &d).await?;
    delivery_finished(tx, delivery_id, now).await?;
    audit.push(AuditEvent {
        actor: who.0.to_owned(),
        action: "ack",
        handover_id: Some(d.handover_id),
        delivery_id: Some(delivery_id),
        patient_key: Some(d.patient_key.clone()),
        outcome: "ok: delivered".into(),
    });
    Ok(AckOutcome::Acknowledged)
}

/// Every attempt of a batch, each as one ack. Rows are locked in delivery
/// id order (so two batches over the same deliveries cannot deadlock);
/// the outcomes come back in request order.
async fn ack_batch(
    tx: &Transaction<'_>,
    who: (&str, &str),
    attempts: &[(u64, u32)],
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<Vec<AckOutcome>> {
    let mut order: Vec<usize> = (0..attempts.len()).collect();
    order.sort_by_key(|&i| attempts[i].0);
    let mut outcomes: Vec<Option<AckOutcome>> = attempts.iter().map(|_| None).collect();
    for i in order {
        let (delivery_id, attempt) = attempts[i];
        outcomes[i] = Some(ack_one(tx, who, delivery_id, attempt, now, audit).await?);
    }
    Ok(Ok(outcomes.into_iter().flatten().collect()))
}

/// What a nack gives back.
struct GiveBack<'a> {
    who: (&'a str, &'a str),
    delivery_id: u64,
    attempt: u32,
    permanent: bool,
    reason: &'a str,
}

async fn nack(
    tx: &Transaction<'_>,
    s: &Shared,
    g: &GiveBack<'_>,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Step<DeliveryState> {
    // The same nack again (its answer lost): answered as it was.
    if let Some(d) = sql::delivery_for_update(tx, g.delivery_id).await?
        && d.mailbox == g.who.1
        && records::repeated_nack(&d, g.attempt, g.permanent)
    {
        audit.push(records::repeated_nack_event(g.who.0, &d));
        return Ok(Ok(d.state));
    }
    let mut d = match leased_for(tx, "nack", g.who, g.delivery_id, g.attempt, now, audit).await? {
        Ok(d) => d,
        Err((e, _)) => return Ok(Err(e)),
    };
    d.nacked_attempt = Some(g.attempt);
    let max_attempts = d.max_attempts.unwrap_or(s.options.max_attempts);
    let state = if d.is_superseded() {
        retire(tx, &mut d, now).await?;
        DeliveryState::Superseded
    } else if g.permanent || d.attempt >= max_attempts {
        let why = if g.permanent {
            format!("permanent nack: {}", g.reason)
        } else {
            format!(
                "nack on the last allowed attempt ({}): {}",
                d.attempt, g.reason
            )
        };
        quarantine(&mut d, why, now);
        sql::put_delivery(tx, &d).await?;
        DeliveryState::Quarantined
    } else {
        let backoff = crate::store::records::nack_backoff_ms(s.options.retry_backoff_ms, d.attempt);
        d.state = DeliveryState::Queued;
        d.lease_until_ms = None;
        d.not_before_ms = Some(now.saturating_add(backoff));
        d.reason = Some(format!("retryable nack: {}", g.reason));
        sql::put_delivery(tx, &d).await?;
        DeliveryState::Queued
    };
    audit.push(AuditEvent {
        actor: g.who.0.to_owned(),
        action: "nack",
        handover_id: Some(d.handover_id),
        delivery_id: Some(g.delivery_id),
        patient_key: Some(d.patient_key.clone()),
        outcome: format!("ok: {}", records::state_name(state)),
    });
    Ok(Ok(state))
}

/// Each attempt still leased to the mailbox queued again at once, at the
/// attempt it had before (see [`PgStore::return_unsent`]).
async fn return_unsent(
    tx: &Transaction<'_>,
    who: (&str, &str),
    attempts: &[(u64, u32)],
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<(), StoreError> {
    for &(delivery_id, attempt) in attempts {
        let Ok(mut d) = leased_for(tx, "pull", who, delivery_id, attempt, now, audit).await? else {
            continue;
        };
        if d.is_superseded() {
            // A newer summary came meanwhile: this one is never sent.
            retire(tx, &mut d, now).await?;
        } else {
            d.attempt = attempt.saturating_sub(1);
            d.state = DeliveryState::Queued;
            d.lease_until_ms = None;
            d.not_before_ms = None;
            sql::put_delivery(tx, &d).await?;
        }
        audit.push(records::returned_unsent_event(who.0, &d, attempt));
    }
    // Long polls on every node may take them at once.
    sql::notify(tx, &[who.1.to_owned()]).await
}

/// Finishes a delivered delivery, the copies it superseded, and each
/// handover all of whose deliveries are now finished.
async fn delivery_finished(
    tx: &Transaction<'_>,
    delivery_id: u64,
    now: i64,
) -> Result<(), StoreError> {
    let mut work = vec![delivery_id];
    while let Some(did) = work.pop() {
        let Some(mut d) = sql::delivery_for_update(tx, did).await? else {
            continue;
        };
        if d.finished_at_ms.is_none() {
            d.finished_at_ms = Some(now);
            sql::put_delivery(tx, &d).await?;
        }
        handover_maybe_finished(tx, d.handover_id, now).await?;
        let older = tx
            .query(
                "SELECT id FROM deliveries WHERE superseded_by = $1 AND state = 'superseded' \
                 AND record->'finished_at_ms' IS NULL ORDER BY id",
                &[&id(did)],
            )
            .await
            .map_err(db)?;
        work.extend(older.iter().map(|r| sql::un_id(r.get(0))));
    }
    Ok(())
}

/// Finishes handover `handover_id` when all its deliveries are. Its row is
/// locked first: two transactions finishing its last two copies at once
/// then take turns, and the second reads its siblings after the first has
/// committed (READ COMMITTED reads anew per statement). Without the lock
/// each saw the other's copy unfinished, and the handover never finished.
/// `NO KEY UPDATE`, not `UPDATE`: writing a delivery takes `KEY SHARE` on
/// its handover (the foreign key), which `UPDATE` would wait for, and two
/// such waits deadlock.
async fn handover_maybe_finished(
    tx: &Transaction<'_>,
    handover_id: u64,
    now: i64,
) -> Result<(), StoreError> {
    let Some(mut h) = tx
        .query_opt(
            "SELECT record FROM handovers WHERE id = $1 FOR NO KEY UPDATE",
            &[&id(handover_id)],
        )
        .await
        .map_err(db)?
        .map(|r| r.get::<_, Json<HandoverRecord>>(0).0)
    else {
        return Ok(());
    };
    if h.finished_at_ms.is_some() {
        return Ok(());
    }
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE handover_id = $1",
            &[&id(handover_id)],
        )
        .await
        .map_err(db)?;
    let all = sql::deliveries(&rows);
    if all.len() < h.deliveries.len() || all.iter().any(|d| d.finished_at().is_none()) {
        return Ok(());
    }
    h.finished_at_ms = Some(now);
    sql::put_handover(tx, &h).await
}

async fn sweep(
    tx: &Transaction<'_>,
    s: &Shared,
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<SweepOutcome, StoreError> {
    const SWEEPER: &str = "urn:gateway:sweeper";
    retire_expired_stale(tx, SWEEPER, None, now, audit).await?;
    let quarantined = quarantine_exhausted(tx, s, SWEEPER, None, now, audit).await?;
    // Bounded, and each reported once: the row is marked in this
    // transaction, and another node's sweep skips what this one holds.
    let rows = tx
        .query(
            &format!(
                "SELECT record FROM deliveries WHERE state IN {LIVE} AND NOT overdue_reported \
                 AND due_ms <= $1 ORDER BY due_ms, id LIMIT 1000 FOR UPDATE SKIP LOCKED"
            ),
            &[&now],
        )
        .await
        .map_err(db)?;
    let mut newly_overdue = Vec::with_capacity(rows.len());
    for mut d in sql::deliveries(&rows) {
        d.overdue_at_ms = Some(now);
        sql::put_delivery(tx, &d).await?;
        newly_overdue.push(d);
    }
    Ok(SweepOutcome {
        quarantined,
        newly_overdue,
    })
}

async fn track(
    tx: &Transaction<'_>,
    (actor, sender): (&str, &str),
    key: &TrackKey,
    audit: &mut Vec<AuditEvent>,
) -> Step<HandoverStatus> {
    let row = match key {
        TrackKey::HandoverId(hid) => tx
            .query_opt(
                "SELECT record FROM handovers WHERE id = $1 AND sender = $2",
                &[&id(*hid), &sender],
            )
            .await
            .map_err(db)?,
        TrackKey::MessageId(m) => tx
            .query_opt(
                "SELECT record FROM handovers WHERE sender = $1 AND message_id = $2",
                &[&sender, m],
            )
            .await
            .map_err(db)?,
    };
    let Some(handover) = row.map(|r| r.get::<_, Json<HandoverRecord>>(0).0) else {
        // Removed under the retention policy: only its sender learns so.
        let error = match super::retention::tombstone_for(tx, sender, key).await? {
            Some(t) => StoreError::Removed {
                removed_at_ms: t.removed_at_ms,
            },
            None => StoreError::UnknownHandover,
        };
        let (named, foreign) = match key {
            TrackKey::HandoverId(hid) => {
                let foreign = tx
                    .query_opt(
                        "SELECT patient_key FROM handovers WHERE id = $1",
                        &[&id(*hid)],
                    )
                    .await
                    .map_err(db)?
                    .map(|r| (*hid, r.get::<_, String>(0)));
                (Some(*hid), foreign)
            }
            TrackKey::MessageId(_) => (None, None),
        };
        audit.push(records::refused_track_event(actor, named, &error, foreign));
        return Ok(Err(error));
    };
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE handover_id = $1 ORDER BY id",
            &[&id(handover.id)],
        )
        .await
        .map_err(db)?;
    let deliveries = sql::deliveries(&rows);
    audit.push(AuditEvent {
        actor: actor.to_owned(),
        action: "track",
        handover_id: Some(handover.id),
        patient_key: Some(handover.patient_key.clone()),
        outcome: "ok".into(),
        ..AuditEvent::default()
    });
    Ok(Ok(HandoverStatus {
        handover,
        deliveries,
    }))
}

async fn claim(
    tx: &Transaction<'_>,
    s: &Shared,
    (actor, to, evidence): (&str, &str, &str),
    claim_keys: &[String],
    now: i64,
    audit: &mut Vec<AuditEvent>,
) -> Result<Vec<DeliveryRecord>, StoreError> {
    // The first lock, as for a submit: a claim may send on older copies
    // (`submit::take_on_claimed`), locked after the parked ones.
    sql::lock_counters(tx).await?;
    // Locked in id order; a racing claim waits here and then finds them gone.
    let rows = tx
        .query(
            "SELECT record FROM deliveries WHERE mailbox = $1 AND state = 'parked' \
             AND record->'claim_keys' ?| $2 ORDER BY id FOR UPDATE",
            &[&PARKED_MAILBOX, &records::claim_lookup_keys(claim_keys)],
        )
        .await
        .map_err(db)?;
    let mut found = sql::deliveries(&rows);
    found.sort_by_key(|d| (!d.urgent, d.id));
    let mut claimed = Vec::with_capacity(found.len());
    for mut d in found {
        match d.claim_match(claim_keys) {
            records::ClaimMatch::Matches => {}
            records::ClaimMatch::Unmatched => continue,
            records::ClaimMatch::Contradicted => {
                audit.push(records::contradicted_claim_event(actor, to, &d));
                continue;
            }
        }
        d.mailbox = to.to_owned();
        d.state = DeliveryState::Queued;
        d.claimed_by = Some(actor.to_owned());
        d.claimed_at_ms = Some(now);
        sql::put_delivery(tx, &d).await?;
        audit.push(AuditEvent {
            actor: actor.to_owned(),
            action: "claim",
            handover_id: Some(d.handover_id),
            delivery_id: Some(d.id),
            patient_key: Some(d.patient_key.clone()),
            outcome: format!("ok: parked release claimed for {to}; {evidence}"),
        });
        super::submit::take_on_claimed(tx, s, &d, now, audit).await?;
        claimed.push(d);
    }
    if claimed.is_empty() {
        audit.push(AuditEvent {
            actor: actor.to_owned(),
            action: "claim",
            outcome: "refused: no parked release matches".into(),
            ..AuditEvent::default()
        });
    } else {
        sql::notify(tx, &[to.to_owned()]).await?;
    }
    Ok(claimed)
}

async fn route_held(
    tx: &Transaction<'_>,
    actor: &str,
    moves: &[(u64, String)],
    audit: &mut Vec<AuditEvent>,
) -> Result<Vec<DeliveryRecord>, StoreError> {
    // Locked in ascending id order, as every multi-row lock here.
    let mut order: Vec<&(u64, String)> = moves.iter().collect();
    order.sort_unstable_by_key(|(did, _)| *did);
    order.dedup_by_key(|(did, _)| *did);
    let mut routed = Vec::new();
    for (did, to) in order {
        let Some(mut d) = sql::delivery_for_update(tx, *did).await? else {
            continue;
        };
        let Some(state) = records::held_move(&d, to) else {
            continue;
        };
        audit.push(records::route_held_event(actor, &d, to));
        d.mailbox.clone_from(to);
        d.state = state;
        sql::put_delivery(tx, &d).await?;
        routed.push(d);
    }
    let woken: Vec<String> = routed.iter().map(|d| d.mailbox.clone()).collect();
    sql::notify(tx, &woken).await?;
    Ok(routed)
}

/// Whether `d` is an admission notice whose patient has been released, or
/// admitted again, since (as the sled engine's `Writer::outdated_notice`).
async fn outdated_notice(tx: &Transaction<'_>, d: &DeliveryRecord) -> Result<bool, StoreError> {
    if d.view != records::ADMISSION_NOTICE_VIEW {
        return Ok(false);
    }
    match sql::handover(tx, d.handover_id).await? {
        Some(h) => super::identity::left_custody_since(tx, &h).await,
        None => Ok(false),
    }
}

async fn redrive(
    tx: &Transaction<'_>,
    s: &Shared,
    actor: &str,
    ids: &[u64],
    audit: &mut Vec<AuditEvent>,
) -> Result<Vec<(u64, RedriveOutcome)>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    let mut woken = BTreeSet::new();
    // Locked in ascending id order, as every multi-row lock here.
    let mut order: Vec<u64> = ids.to_vec();
    order.sort_unstable();
    order.dedup();
    let mut found = std::collections::HashMap::new();
    for did in order {
        found.insert(did, sql::delivery_for_update(tx, did).await?);
    }
    for &did in ids {
        let outcome = match found.get_mut(&did).and_then(Option::take) {
            None => RedriveOutcome::Unknown,
            Some(d) if d.state != DeliveryState::Quarantined => {
                found.insert(did, Some(d.clone()));
                RedriveOutcome::NotQuarantined(d.state)
            }
            Some(d) if outdated_notice(tx, &d).await? => {
                found.insert(did, Some(d));
                RedriveOutcome::Outdated
            }
            Some(mut d) => {
                d.state = DeliveryState::Queued;
                d.not_before_ms = None;
                d.lease_until_ms = None;
                d.max_attempts = Some(d.attempt.saturating_add(s.options.max_attempts));
                d.reason = d.reason.map(|r| format!("redriven after: {r}"));
                sql::put_delivery(tx, &d).await?;
                woken.insert(d.mailbox.clone());
                found.insert(did, Some(d));
                RedriveOutcome::Requeued
            }
        };
        let subject = found.get(&did).and_then(Option::as_ref);
        audit.push(records::redrive_event(actor, did, subject, &outcome));
        out.push((did, outcome));
    }
    let woken: Vec<String> = woken.into_iter().collect();
    sql::notify(tx, &woken).await?;
    Ok(out)
}
