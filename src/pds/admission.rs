//! Admissions whose summary names no GP on the network: PDS may know the
//! patient's practice, and the admission notice goes there, as routing
//! would have sent it had the prison named it (same view, urgency and
//! deadline from the submission). Each such admission is looked up once
//! while its notice could still be on time (the admission deadline), and
//! again after a restart; a lookup that failed is tried again next round.
//! The identity checks are those of a parked release ([`super::decision`]).

use std::collections::{HashMap, HashSet};

use crate::clinical::translate::{self, TextFormat};
use crate::clinical::{ClinicalSummary, View};
use crate::handover::Envelope;
use crate::journey::{Format, JourneyEvent, Recipient};
use crate::store::{HandoverRecord, NewDelivery, PDS_ACTOR, PdsNotice, StoreError};

use super::decision::decide;
use super::lookup::PdsLookups;

impl PdsLookups {
    /// Looks up the admissions that went to nobody; `done` holds those
    /// already answered by PDS in this process.
    pub(super) async fn admissions(&self, done: &mut HashMap<u64, i64>) -> Result<(), StoreError> {
        let now = self.gateway.clock.now_ms();
        let since = now.saturating_sub(self.gateway.deadlines.admission_ms);
        // Those out of the window are never read again: forgotten.
        done.retain(|_, submitted| *submitted >= since);
        let store = self.gateway.store.clone();
        let batch = self.pacing.batch;
        // Those answered are passed over before the limit, or a window
        // holding more answered admissions than the limit would hide the
        // older ones still waiting.
        let answered: HashSet<u64> = done.keys().copied().collect();
        let due: Vec<HandoverRecord> =
            tokio::task::spawn_blocking(move || store.unrouted_admissions(since, &answered, batch))
                .await
                .map_err(|e| StoreError::Unavailable(format!("admissions read: {e}")))??;
        for h in due {
            if !self.allowed() {
                break;
            }
            match self.admission(&h).await {
                Ok(answered) => {
                    if answered {
                        done.insert(h.id, h.submitted_at_ms);
                    }
                }
                Err(e @ StoreError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::error!(handover_id = h.id, error = %e, "PDS lookup of an admission skipped");
                    done.insert(h.id, h.submitted_at_ms);
                }
            }
        }
        Ok(())
    }

    /// One admission; true once PDS answered (or cannot be asked).
    async fn admission(&self, h: &HandoverRecord) -> Result<bool, StoreError> {
        let bytes = self.gateway.store.payload(h).await?;
        let envelope = Envelope::decode(&bytes).map_err(StoreError::Corrupt)?;
        let summary: ClinicalSummary = serde_json::from_slice(&envelope.document).map_err(|e| {
            StoreError::Corrupt(crate::handover::envelope::unreadable("stored summary", &e))
        })?;
        let Some(nhs) = envelope.patient.nhs_number.map(|n| n.as_str().to_owned()) else {
            return Ok(true);
        };
        let dob = summary.patient.date_of_birth.to_string();
        let today = super::lookup::today(self.gateway.clock.now_ms());
        let sender = h.sender.parse().ok();
        self.requesting(h.id, None, &h.patient_key).await?;
        let found = match self.client.patient(&nhs, &today, sender.as_ref()).await {
            Ok(found) => found,
            Err(e) => {
                self.lookup_failed(h.id, None, &h.patient_key, &e).await?;
                return Ok(false);
            }
        };
        self.succeeded();
        let decision = decide(&nhs, &dob, found.as_ref(), &self.gateway.registry.read());
        self.metrics.pds_looked_up(decision.status.label());
        let Some(to) = decision.route_to else {
            let outcome = format!(
                "ok: admission notice not sent: {}",
                decision.status.reason(decision.practice.as_deref())
            );
            self.gateway
                .store
                .record(crate::audit::AuditEvent {
                    actor: PDS_ACTOR.to_owned(),
                    action: "pds_lookup",
                    handover_id: Some(h.id),
                    delivery_id: None,
                    patient_key: Some(h.patient_key.clone()),
                    outcome,
                })
                .await?;
            return Ok(true);
        };
        let Some(delivery) = self.notice(h, summary, &to) else {
            return Ok(true);
        };
        let sent = self
            .gateway
            .store
            .pds_notify(PdsNotice {
                handover_id: h.id,
                delivery,
            })
            .await?;
        if let Some(delivery_id) = sent {
            tracing::info!(handover_id = h.id, delivery_id, to = %to, "admission notice sent to the practice PDS names");
        }
        Ok(true)
    }

    /// The delivery routing would have made had the summary named `to`.
    fn notice(
        &self,
        h: &HandoverRecord,
        mut summary: ClinicalSummary,
        to: &str,
    ) -> Option<NewDelivery> {
        summary.registered_gp = Some(to.parse().ok()?);
        let registry = self.gateway.registry.read();
        let sender = registry.get(&h.sender.parse().ok()?)?.clone();
        let routes = crate::journey::route(
            JourneyEvent::Admission,
            &summary,
            &sender,
            &[],
            &registry,
            &self.gateway.deadlines,
            h.submitted_at_ms,
        )
        .ok()?;
        let route = routes
            .into_iter()
            .find(|r| matches!(&r.recipient, Recipient::Org(code) if code.as_str() == to))?;
        let view = View::AdmissionNotice;
        let format = registry
            .get(&to.parse().ok()?)
            .map_or(Format::Native, |o| o.format);
        let not_carried = match format {
            Format::Native => translate::notes(&summary, view),
            Format::Fhir => {
                translate::write(TextFormat::Fhir, &summary, view, JourneyEvent::Admission)
                    .not_carried
            }
            Format::Hl7v2 => {
                translate::write(TextFormat::Hl7v2, &summary, view, JourneyEvent::Admission)
                    .not_carried
            }
        };
        Some(NewDelivery {
            mailbox: to.to_owned(),
            urgent: route.urgent,
            view: "admission_notice".into(),
            not_carried,
            due_ms: Some(route.due_ms).filter(|d| *d != i64::MAX),
            may_follow: Vec::new(),
        })
    }
}
