//! The background task that looks parked releases up in PDS: when one is
//! parked (the parked mailbox's signal wakes it) and then at intervals
//! that double up to a ceiling while PDS's answer may still change. It
//! runs beside the gRPC server and never on a submit's path: a slow or
//! absent PDS delays routing, never an acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::PdsError;
use super::breaker::{BreakerState, CircuitBreaker};
use super::client::PdsClient;
use super::decision::{Decision, decide};
use crate::audit::AuditEvent;
use crate::handover::{Envelope, Gateway};
use crate::store::{
    DeliveryRecord, PARKED_MAILBOX, PDS_ACTOR, PdsFinding, PdsResult, PdsStatus, StoreError,
};

/// Most parked releases read per round to find those due a lookup.
const SCAN_LIMIT: usize = 100_000;

/// When lookups happen.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Between rounds.
    pub poll: Duration,
    /// First wait before a parked release is looked up again, ms.
    pub recheck_ms: i64,
    /// Longest wait between lookups of one release, ms.
    pub max_recheck_ms: i64,
    /// Most lookups per round.
    pub batch: usize,
}

/// Everything the task needs.
pub struct PdsLookups {
    /// The client.
    pub client: Arc<PdsClient>,
    /// Shared with whoever reports on PDS's health.
    pub breaker: Arc<CircuitBreaker>,
    /// The store, the registry (which practices are on the network) and the clock.
    pub gateway: Arc<Gateway>,
    /// When lookups happen.
    pub pacing: Pacing,
    /// Lookups by outcome, and the breaker's state.
    pub metrics: Arc<crate::operator::metrics::Metrics>,
    /// Releases whose lookup failed: (failures in a row, not before, ms).
    /// A release that keeps failing waits longer each time (as a finding
    /// does), so it cannot take every round's lookups or the breaker's
    /// trial while the others wait. Kept in memory: a restart tries anew.
    pub failing: std::sync::Mutex<std::collections::HashMap<u64, (u32, i64)>>,
}

/// What one parked release's handover says about who it is for.
struct Asked {
    nhs: Option<String>,
    dob: String,
    /// The organisation that sent the summary (the lookup's end user).
    sender: Option<crate::clinical::OdsCode>,
}

impl PdsLookups {
    /// Runs rounds until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let parked = self.gateway.store.mailbox_signal(PARKED_MAILBOX);
        let mut admissions_done = std::collections::HashMap::new();
        loop {
            let notified = parked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Several nodes on PostgreSQL: one at a time looks up (held
            // until both kinds of lookup are done).
            match self.gateway.store.pds_turn().await {
                Ok(Some(_turn)) => {
                    if let Err(e) = self.round().await {
                        tracing::error!(error = %e, "PDS lookup round failed");
                    }
                    if let Err(e) = self.admissions(&mut admissions_done).await {
                        tracing::error!(error = %e, "PDS admission lookups failed");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "PDS lookups could not take their turn"),
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(self.pacing.poll) => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
    }

    /// Looks up the parked releases that are due, oldest first.
    async fn round(&self) -> Result<(), StoreError> {
        let now = self.gateway.clock.now_ms();
        let store = self.gateway.store.clone();
        let parked = tokio::task::spawn_blocking(move || store.parked(SCAN_LIMIT))
            .await
            .map_err(|e| StoreError::Unavailable(format!("parked read: {e}")))??;
        let waiting = {
            let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
            let still: std::collections::HashSet<u64> = parked.iter().map(|d| d.id).collect();
            failing.retain(|id, _| still.contains(id));
            failing.clone()
        };
        let due = parked
            .into_iter()
            .filter(|d| is_due(d, now) && waiting.get(&d.id).is_none_or(|(_, at)| *at <= now));
        for d in due.take(self.pacing.batch) {
            if !self.allowed() {
                tracing::info!("PDS circuit breaker open: lookups wait");
                break;
            }
            let id = d.id;
            if let Err(e) = self.look_up(d).await {
                // One unreadable release must not hold up the others.
                if matches!(e, StoreError::Unavailable(_)) {
                    return Err(e);
                }
                tracing::error!(delivery_id = id, error = %e, "PDS lookup of a parked release skipped");
            }
        }
        Ok(())
    }

    /// One lookup and what follows from it.
    async fn look_up(&self, d: DeliveryRecord) -> Result<(), StoreError> {
        let asked = self.asked(&d).await?;
        let Some(nhs) = asked.nhs else {
            return self.record(&d, decided(PdsStatus::NoNhsNumber)).await;
        };
        let now = self.gateway.clock.now_ms();
        self.requesting(d.handover_id, Some(d.id), &d.patient_key)
            .await?;
        match self
            .client
            .patient(&nhs, &today(now), asked.sender.as_ref())
            .await
        {
            Ok(found) => {
                self.succeeded();
                self.failing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&d.id);
                let decision = decide(
                    &nhs,
                    &asked.dob,
                    found.as_ref(),
                    &self.gateway.registry.read(),
                );
                self.record(&d, decision).await
            }
            Err(e) => {
                self.back_off(d.id, now);
                self.lookup_failed(d.handover_id, Some(d.id), &d.patient_key, &e)
                    .await
            }
        }
    }

    /// The NHS number and date of birth the release was submitted with.
    async fn asked(&self, d: &DeliveryRecord) -> Result<Asked, StoreError> {
        let handover = self
            .gateway
            .store
            .handover(d.handover_id)?
            .ok_or(StoreError::UnknownHandover)?;
        let bytes = self.gateway.store.payload(&handover).await?;
        let envelope = Envelope::decode(&bytes).map_err(StoreError::Corrupt)?;
        Ok(Asked {
            nhs: envelope.patient.nhs_number.map(|n| n.as_str().to_owned()),
            dob: envelope.patient.date_of_birth.unwrap_or_default(),
            sender: handover.sender.parse().ok(),
        })
    }

    /// Writes the finding (and the automatic claim) durably.
    async fn record(&self, d: &DeliveryRecord, decision: Decision) -> Result<(), StoreError> {
        let now = self.gateway.clock.now_ms();
        let lookups = d.pds.as_ref().map_or(0, |f| f.lookups).saturating_add(1);
        let next_check_ms = (decision.route_to.is_none() && decision.status.worth_rechecking())
            .then(|| now.saturating_add(self.backoff_ms(lookups)));
        let was = d.pds.as_ref().map(|f| f.status);
        let finding = PdsFinding {
            status: decision.status,
            practice: decision.practice.clone(),
            checked_at_ms: now,
            next_check_ms,
            lookups,
        };
        self.metrics.pds_looked_up(decision.status.label());
        let moved = self
            .gateway
            .store
            .pds_result(PdsResult {
                delivery_id: d.id,
                finding,
                route_to: decision.route_to.clone(),
            })
            .await?;
        report(d.id, &decision, was, moved.is_some());
        Ok(())
    }

    /// The NHS number is about to leave for PDS: that disclosure is audited
    /// durably first, or the lookup is not made (whatever follows, or if
    /// the gateway stops before the answer, the trail holds it).
    pub(super) async fn requesting(
        &self,
        handover_id: u64,
        delivery_id: Option<u64>,
        patient_key: &str,
    ) -> Result<(), StoreError> {
        self.gateway
            .store
            .record(AuditEvent {
                actor: PDS_ACTOR.to_owned(),
                action: "pds_request",
                handover_id: Some(handover_id),
                delivery_id,
                patient_key: Some(patient_key.to_owned()),
                outcome: "sent: NHS number asked of PDS".to_owned(),
            })
            .await
    }

    /// A failed lookup: audited (the record was read), counted by the breaker.
    pub(super) async fn lookup_failed(
        &self,
        handover_id: u64,
        delivery_id: Option<u64>,
        patient_key: &str,
        e: &PdsError,
    ) -> Result<(), StoreError> {
        let now = self.gateway.clock.now_ms();
        self.metrics.pds_looked_up("failed");
        // PDS answered, about this record: not a reason to stop the rest.
        let opened = e.is_outage() && self.breaker.failure(now);
        self.metrics
            .set_pds_breaker_open(self.breaker.state() != BreakerState::Closed);
        if opened {
            tracing::warn!(
                alert = "pds_unavailable",
                error = %e,
                "ALERT: PDS lookups keep failing; circuit breaker open (parked releases wait, nothing is lost)"
            );
        } else {
            tracing::warn!(handover_id, error = %e, "PDS lookup failed; tried again later");
        }
        self.gateway
            .store
            .record(AuditEvent {
                actor: PDS_ACTOR.to_owned(),
                action: "pds_lookup",
                handover_id: Some(handover_id),
                delivery_id,
                patient_key: Some(patient_key.to_owned()),
                outcome: format!("failed: {e}"),
            })
            .await
    }

    /// Whether the breaker lets a lookup through now.
    pub(super) fn allowed(&self) -> bool {
        let allowed = self.breaker.allow(self.gateway.clock.now_ms());
        self.metrics.set_pds_breaker_open(!allowed);
        allowed
    }

    /// PDS answered: the breaker closes.
    pub(super) fn succeeded(&self) {
        self.breaker.success();
        self.metrics.set_pds_breaker_open(false);
    }

    /// The wait after `lookups` lookups: doubling from the first, capped.
    /// Delays the next lookup of release `id`, whose lookup just failed.
    fn back_off(&self, id: u64, now: i64) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let failures = failing.get(&id).map_or(0, |(n, _)| *n).saturating_add(1);
        let at = now.saturating_add(self.backoff_ms(failures));
        failing.insert(id, (failures, at));
    }

    fn backoff_ms(&self, lookups: u32) -> i64 {
        let doubled = self
            .pacing
            .recheck_ms
            .saturating_mul(1i64 << lookups.saturating_sub(1).min(30));
        doubled.min(self.pacing.max_recheck_ms)
    }
}

fn decided(status: PdsStatus) -> Decision {
    Decision {
        status,
        practice: None,
        route_to: None,
    }
}

/// Never looked up, or its next lookup is due.
fn is_due(d: &DeliveryRecord, now: i64) -> bool {
    d.pds
        .as_ref()
        .is_none_or(|f| f.next_check_ms.is_some_and(|at| at <= now))
}

/// The date in England at `now_ms`, `YYYY-MM-DD` (PDS dates a GP
/// registration by England's calendar: at 00:30 BST it is already the next
/// day, though not yet in UTC).
pub(super) fn today(now_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1_000))
        .map(|t| crate::clinical::model::date_in_england(t).to_string())
        .unwrap_or_default()
}

/// Logs the outcome (ids, status, a practice code; never patient data).
fn report(delivery_id: u64, decision: &Decision, was: Option<PdsStatus>, applied: bool) {
    let status = decision.status.as_str();
    if !applied {
        tracing::info!(
            delivery_id,
            status,
            "PDS answer not applied: no longer parked"
        );
    } else if let Some(to) = &decision.route_to {
        tracing::info!(delivery_id, to = %to, "parked release routed to the practice PDS names");
    } else if decision.status == PdsStatus::NotConnected && was != Some(PdsStatus::NotConnected) {
        tracing::warn!(
            alert = "pds_practice_not_connected",
            delivery_id,
            practice = decision.practice.as_deref().unwrap_or_default(),
            "ALERT: PDS names a practice that is not on the network; the release stays parked"
        );
    } else {
        tracing::info!(
            delivery_id,
            status,
            "parked release kept parked after PDS lookup"
        );
    }
}
