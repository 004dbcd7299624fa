//! Outbound: for each MESH-reached organisation, the gateway pulls its
//! deliveries through the application layer as that organisation (a lease
//! of `mesh.lease_seconds`), sends each from the gateway's mailbox, and
//! tracks it: the recipient's acknowledgement acks the delivery
//! (DELIVERED), an error or non-delivery report quarantines it with MESH's
//! reason.
//!
//! # Why no delivery is lost or sent twice without asking
//! - A `sending` record (with the local id `throughcare-<delivery id>`) is
//!   durable before the first byte goes to MESH, and a `sent` record with
//!   MESH's message id once MESH accepted the last chunk.
//! - A delivery met again (a lease that ran out, a restart) whose record
//!   is `sending` is looked up in MESH by its local id; it is sent again
//!   (same local id) only when MESH has no complete copy.
//! - MESH down ([`MeshError::is_outage`]): the round stops and waits
//!   (doubling back-off); a delivery already leased is retried within its
//!   lease, and once the lease runs out the queue offers it again. Only a
//!   lease's worth of attempts (`queue.max_attempts` leases of
//!   `mesh.lease_seconds`) without MESH quarantines it, for an operator.
//!   A failure that is one message's is logged and the round goes on.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::client::Outgoing;
use super::{MeshClient, MeshConfig, MeshError};
use crate::clinical::hl7v2;
use crate::handover::{Caller, Delivery, Gateway, NackCommand, PullCommand, RenderedDocument};
use crate::journey::{Format, Organisation};
use crate::operator::metrics::Metrics;
use crate::store::{DeliveryState, MeshRecord, MeshState};

/// When the MESH task works.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// Between rounds when all is well.
    pub poll: Duration,
    /// The lease taken on each delivery.
    pub lease: Duration,
    /// First back-off after a failed round.
    pub backoff: Duration,
    /// Longest back-off.
    pub max_backoff: Duration,
    /// Most deliveries per organisation, and inbox messages, per round.
    pub batch: u32,
}

impl Pacing {
    /// From the config.
    pub fn of(c: &MeshConfig) -> Self {
        Self {
            poll: Duration::from_millis(c.poll_interval_ms),
            lease: Duration::from_secs(c.lease_seconds.into()),
            backoff: Duration::from_millis(c.retry_backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
            batch: c.batch,
        }
    }
}

/// How often the mailbox is validated (MESH's handshake): MESH asks for
/// once every 24 hours; it is also the first call after a failed round.
pub const HANDSHAKE_EVERY: Duration = Duration::from_secs(24 * 3_600);

/// A wait on each of `signals`, armed now (a notification from here on is
/// not missed).
fn armed(
    signals: &[Arc<tokio::sync::Notify>],
) -> Vec<Pin<Box<tokio::sync::futures::Notified<'_>>>> {
    let mut woken: Vec<_> = signals.iter().map(|n| Box::pin(n.notified())).collect();
    for n in &mut woken {
        n.as_mut().enable();
    }
    woken
}

/// Most inbox pages read in one round (each up to `batch` messages).
const MAX_INBOX_PAGES: usize = 50;

/// A leased delivery MESH could not take yet, retried within its lease.
struct Held {
    org: Organisation,
    delivery: Delivery,
}

/// The MESH task: outbound sends and tracking, then the inbox.
pub struct MeshEdge {
    pub(super) client: Arc<MeshClient>,
    pub(super) gateway: Arc<Gateway>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) pacing: Pacing,
    held: Vec<Held>,
    /// When the last handshake succeeded (none yet, or since a failure).
    handshake_at: Option<tokio::time::Instant>,
    /// Inbox messages refused whose refusal report MESH would not take:
    /// left in the inbox (MESH tells their sender they were not
    /// delivered when they expire), and not read again by this process.
    pub(super) unreportable: std::collections::HashSet<String>,
    /// When the inbox was last read and sent messages tracked (none yet,
    /// or since a failure).
    inbox_at: Option<tokio::time::Instant>,
}

fn gateway_error(e: &crate::handover::Error) -> MeshError {
    MeshError::Gateway(e.to_string())
}

/// The document as MESH carries it: bytes, content type, file extension.
/// A FHIR document or an HL7 v2 message says itself what the gRPC contract
/// says beside it ([`annotated_fhir`], [`hl7v2::annotated`]).
fn payload(d: &Delivery) -> (Vec<u8>, &'static str, &'static str) {
    match &d.document {
        RenderedDocument::FhirJson(t) => (annotated_fhir(t, d), "application/fhir+json", "json"),
        RenderedDocument::Hl7v2(t) => {
            let notes = hl7v2::Annotations {
                replaces: d.supersedes_handover_id,
                withdrawn: d.view == crate::clinical::View::Withdrawn,
                not_carried: &d.not_carried,
            };
            let message = hl7v2::annotated(t, &notes);
            (message.into_bytes(), "x-application/hl7-v2+er7", "hl7")
        }
        // Never asked for (a MESH pull names a text format); JSON if it were.
        RenderedDocument::Native(s) => (
            serde_json::to_vec(s).unwrap_or_default(),
            "application/json",
            "json",
        ),
    }
}

/// The MESH subject: the event and ids, and what a reader must know before
/// opening it (urgent; a withdrawal notice; the handover it replaces), as
/// the gRPC contract says it beside the document.
fn subject_of(d: &Delivery) -> String {
    let mut subject = if d.view == crate::clinical::View::Withdrawn {
        format!("Throughcare withdrawal notice ({})", d.event)
    } else {
        format!("Throughcare {}", d.event)
    };
    subject.push_str(&format!(
        " handover {} delivery {}",
        d.handover_id, d.delivery_id
    ));
    if let Some(earlier) = d.supersedes_handover_id {
        subject.push_str(&format!(", replaces handover {earlier}"));
    }
    if d.urgent {
        subject.push_str(", URGENT");
    }
    subject
}

/// The system of a handover id in a Composition's `relatesTo`.
pub const HANDOVER_ID_SYSTEM: &str = "urn:throughcare:handover-id";

/// `text`, a FHIR document for `d`, carrying in its Composition what a
/// gRPC recipient reads beside the document and a MESH recipient would
/// otherwise never see: the handover it replaces (`relatesTo` `replaces`),
/// a withdrawal notice named as one in its title (else, with no clinical
/// sections, it reads as a summary with nothing in it), and a section
/// listing what the format or view does not carry (paths and reasons,
/// never values). A document that cannot be read as one is sent as it is.
fn annotated_fhir(text: &str, d: &Delivery) -> Vec<u8> {
    use serde_json::{Value, json};
    let Ok(mut doc) = serde_json::from_str::<Value>(text) else {
        return text.as_bytes().to_vec();
    };
    let Some(composition) = doc
        .pointer_mut("/entry/0/resource")
        .filter(|r| r["resourceType"] == "Composition")
    else {
        return text.as_bytes().to_vec();
    };
    if let Some(earlier) = d.supersedes_handover_id {
        composition["relatesTo"] = json!([{
            "code": "replaces",
            "targetIdentifier": {"system": HANDOVER_ID_SYSTEM, "value": earlier.to_string()}
        }]);
        if d.view == crate::clinical::View::Withdrawn {
            composition["title"] = json!(format!(
                "Withdrawal notice: the summary of handover {earlier} no longer applies to your \
                 service; do not act on it"
            ));
        }
    }
    if !d.not_carried.is_empty() {
        // maud escapes each entry, as the dashboard's text is.
        let div = maud::html! {
            div xmlns="http://www.w3.org/1999/xhtml" {
                ul { @for n in &d.not_carried { li { (n) } } }
            }
        };
        let section = json!({
            "title": "Not carried by this format or view",
            "text": {"status": "generated", "div": div.into_string()}
        });
        match composition["section"].as_array_mut() {
            Some(sections) => sections.push(section),
            None => composition["section"] = json!([section]),
        }
    }
    serde_json::to_vec(&doc).unwrap_or_else(|_| text.as_bytes().to_vec())
}

/// Logs a failure that is one message's, not MESH's: the round goes on.
pub(super) fn message_failed(e: &MeshError, what: &str) {
    tracing::warn!(error = %e, "MESH failed {what}; the round goes on with the others");
}

/// The local id of a delivery's MESH message: the same on every send.
#[must_use]
pub fn local_id(delivery_id: u64) -> String {
    format!("throughcare-{delivery_id}")
}

impl MeshEdge {
    /// The task's state.
    pub fn new(
        client: Arc<MeshClient>,
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
        pacing: Pacing,
    ) -> Self {
        Self {
            client,
            gateway,
            metrics,
            pacing,
            held: Vec::new(),
            handshake_at: None,
            unreportable: std::collections::HashSet::new(),
            inbox_at: None,
        }
    }

    /// Rounds until `stop`: each reads the inbox when it is due, tracks,
    /// and sends; a new delivery for a MESH-reached organisation starts a
    /// round at once (to send it; the inbox keeps its own pace). A failed
    /// round backs off (doubling, up to the maximum).
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = self.pacing.backoff;
        tracing::info!(mailbox = self.client.mailbox(), "MESH edge started");
        loop {
            if *stop.borrow() {
                break;
            }
            // Listening before the round, so a delivery queued during it
            // still wakes the next one.
            let registry = self.gateway.store.registry_signal();
            let mut signals = self.delivery_signals();
            let mut changed = Box::pin(registry.notified());
            changed.as_mut().enable();
            let mut woken = armed(&signals);
            let (wait, wake) = match self.round().await {
                Ok(()) => {
                    self.metrics.set_mesh_reachable(true);
                    backoff = self.pacing.backoff;
                    let since = self.inbox_at.map_or(Duration::ZERO, |at| at.elapsed());
                    (self.pacing.poll.saturating_sub(since), true)
                }
                Err(e) => {
                    self.metrics.set_mesh_reachable(false);
                    self.handshake_at = None;
                    // The inbox read when it was due is not read again
                    // sooner for a failure after it (MESH asks for at most
                    // one poll every five minutes); one that failed is
                    // still due.
                    let wait = e.wait_after(backoff);
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "MESH round failed; retrying");
                    backoff = (backoff * 2).min(self.pacing.max_backoff);
                    (wait, false)
                }
            };
            let until = tokio::time::Instant::now() + wait;
            loop {
                let any_delivery = async move {
                    if woken.is_empty() {
                        std::future::pending::<()>().await;
                    } else {
                        futures_util::future::select_all(woken).await;
                    }
                };
                let registry_changed = tokio::select! {
                    () = tokio::time::sleep_until(until) => false,
                    () = any_delivery, if wake => false,
                    () = &mut changed => true,
                    _ = stop.changed() => false,
                };
                if !registry_changed {
                    break;
                }
                // An organisation reached through MESH now, or no more:
                // listen to its mailbox from here on.
                changed = Box::pin(registry.notified());
                changed.as_mut().enable();
                signals = self.delivery_signals();
                woken = armed(&signals);
            }
        }
        tracing::info!("MESH edge stopped");
    }

    /// The signals of the mailboxes of the organisations reached through
    /// MESH: a new delivery to one wakes the sender.
    fn delivery_signals(&self) -> Vec<Arc<tokio::sync::Notify>> {
        self.gateway
            .registry
            .read()
            .iter()
            .filter(|o| o.active && o.mesh_mailbox.is_some())
            .map(|o| self.gateway.store.mailbox_signal(o.ods.as_str()))
            .collect()
    }

    /// One round: validate the mailbox when due; list the inbox (which also
    /// shows MESH is there) and read it until empty; track what was sent;
    /// then retry what MESH could not take and send what waits. Reading
    /// comes first so that no send, however stuck, keeps the prisons'
    /// messages and MESH's reports waiting (MESH asks that the inbox be
    /// emptied each time it is polled).
    async fn round(&mut self) -> Result<(), MeshError> {
        if self
            .handshake_at
            .is_none_or(|at| at.elapsed() >= HANDSHAKE_EVERY)
        {
            self.client.handshake().await?;
            self.handshake_at = Some(tokio::time::Instant::now());
            tracing::info!(
                mailbox = self.client.mailbox(),
                "MESH mailbox validated (handshake)"
            );
        }
        // Several nodes on PostgreSQL: one at a time reads the inbox and
        // tracks what was sent (held until the round ends).
        let Some(_turn) = self
            .gateway
            .store
            .mesh_turn()
            .await
            .map_err(|e| MeshError::Gateway(e.to_string()))?
        else {
            return Ok(());
        };
        // MESH asks that its inbox be polled at most every five minutes
        // (`poll_interval_ms`); a round a new delivery started only sends.
        if self
            .inbox_at
            .is_none_or(|at| at.elapsed() >= self.pacing.poll)
        {
            self.read_and_track().await?;
            self.inbox_at = Some(tokio::time::Instant::now());
        } else {
            // Nothing is leased while MESH does not answer.
            self.client.handshake().await?;
        }
        self.retry_held().await?;
        let orgs: Vec<Organisation> = self
            .gateway
            .registry
            .read()
            .iter()
            .filter(|o| o.active && o.mesh_mailbox.is_some())
            .cloned()
            .collect();
        for org in orgs {
            self.send_waiting(&org).await?;
        }
        Ok(())
    }

    /// Tracks what was sent, lists the inbox (which also shows MESH
    /// answers: nothing is leased while it does not) and reads it page by
    /// page to its end, then applies the acknowledgements tracked.
    ///
    /// A peer gateway sends its refusal report before it acknowledges the
    /// message refused, so a message tracked as acknowledged has its
    /// refusal, if any, in the inbox read after: it quarantines the
    /// delivery first, and the acknowledgement then finds it no longer in
    /// flight. Read the other way round, a refusal arriving after the
    /// inbox was listed lost to an acknowledgement tracked just after, and
    /// the refused summary showed DELIVERED.
    async fn read_and_track(&mut self) -> Result<(), MeshError> {
        let acknowledged = self.track_sent().await?;
        // MESH lists 10 to 5,000 ids at a time.
        let page = self.pacing.batch.clamp(10, 5_000);
        // Page forward by MESH's own token (`links.next`), so messages
        // that cannot be taken yet at the head never hide those behind.
        let mut after: Option<String> = None;
        for _ in 0..MAX_INBOX_PAGES {
            let (ids, next) = self.client.inbox_page(page, after.as_deref()).await?;
            self.read_inbox(ids).await?;
            match next {
                Some(token) if after.as_ref() != Some(&token) => after = Some(token),
                _ => break,
            }
        }
        for tracked in acknowledged {
            let now = self
                .gateway
                .store
                .mesh_record(tracked.delivery_id)
                .map_err(|e| MeshError::Gateway(e.to_string()))?;
            if let Some(record) = now.filter(|r| {
                r.state == MeshState::Sent
                    && r.local_id == tracked.local_id
                    && r.message_id == tracked.message_id
            }) {
                self.acknowledged(record).await?;
            }
        }
        Ok(())
    }

    /// Whether a send's failure that looks like MESH's own (a time-out, a
    /// 403, a 5xx) is MESH's (a refusal report's too): MESH is asked (the handshake) whether it
    /// answers. When it does, the failure was this message's (a large
    /// upload timing out, a recipient this mailbox may not send to), and
    /// the round goes on with the others.
    pub(super) async fn mesh_failing(&self, e: &MeshError) -> bool {
        e.is_rate_limit() || (e.is_outage() && self.client.handshake().await.is_err())
    }

    async fn retry_held(&mut self) -> Result<(), MeshError> {
        let now = self.gateway.clock.now_ms();
        let held = std::mem::take(&mut self.held);
        let mut pending = held.into_iter();
        while let Some(h) = pending.next() {
            // A lease that ran out: the queue offers the delivery again.
            if h.delivery.lease_expires_at_ms.is_some_and(|t| t <= now) {
                continue;
            }
            if !self.still_owed(&h, now)? {
                tracing::info!(
                    delivery_id = h.delivery.delivery_id,
                    "a held delivery changed in the store while MESH could not take it \
                     (superseded, moved on or given back): not sent"
                );
                continue;
            }
            if let Err(e) = self.send_one(&h.org, &h.delivery).await {
                let outage = self.mesh_failing(&e).await;
                self.held.push(h);
                if outage {
                    self.held.extend(pending);
                    return Err(e);
                }
                message_failed(&e, "a held delivery");
            }
        }
        Ok(())
    }

    /// Whether the store still leases `h`'s delivery to its organisation,
    /// under the attempt it was pulled with, and has not superseded it. A
    /// correction, a withdrawal or the patient's transfer may have changed
    /// it while MESH could not take it: the copy held here is then out of
    /// date, and the queue decides what the organisation is owed.
    fn still_owed(&self, h: &Held, now: i64) -> Result<bool, MeshError> {
        let found = self
            .gateway
            .store
            .delivery(h.delivery.delivery_id)
            .map_err(|e| MeshError::Gateway(e.to_string()))?;
        Ok(found.is_some_and(|d| {
            !d.is_superseded()
                && crate::store::records::lease_verdict(
                    Some(d),
                    h.org.ods.as_str(),
                    h.delivery.attempt,
                    now,
                )
                .is_ok()
        }))
    }

    /// Pulls the organisation's deliveries (for it, with its rights) and sends each.
    async fn send_waiting(&mut self, org: &Organisation) -> Result<(), MeshError> {
        let caller = Caller::Relayed {
            org: org.ods.clone(),
            by: super::MESH_ACTOR,
        };
        let format = match org.format {
            Format::Native => Format::Fhir,
            f => f,
        };
        let cmd = PullCommand {
            max_deliveries: self.pacing.batch,
            lease: Some(self.pacing.lease),
            wait: Duration::ZERO,
            format: Some(format),
            max_bytes: None,
        };
        let deliveries = self
            .gateway
            .pull(&caller, Ok(cmd))
            .await
            .map_err(|e| gateway_error(&e))?;
        let mut pending = deliveries.into_iter();
        while let Some(delivery) = pending.next() {
            if let Err(e) = self.send_one(org, &delivery).await {
                self.held.push(Held {
                    org: org.clone(),
                    delivery,
                });
                if self.mesh_failing(&e).await {
                    self.held.extend(pending.map(|delivery| Held {
                        org: org.clone(),
                        delivery,
                    }));
                    return Err(e);
                }
                message_failed(&e, "a delivery");
            }
        }
        Ok(())
    }

    /// Sends one leased delivery unless MESH already has it.
    async fn send_one(&self, org: &Organisation, d: &Delivery) -> Result<(), MeshError> {
        let store = &self.gateway.store;
        let previous = store
            .mesh_record(d.delivery_id)
            .map_err(|e| MeshError::Gateway(e.to_string()))?;
        let now = self.gateway.clock.now_ms();
        let mesh_mailbox = org.mesh_mailbox.clone().unwrap_or_default();
        // Sent on to another organisation since (its patient moved before
        // the first acknowledged it): what was sent to the first says
        // nothing of this one, which gets its own message and local id.
        let moved = previous
            .as_ref()
            .is_some_and(|r| r.mailbox != org.ods.as_str());
        let previous = previous.filter(|_| !moved);
        let mut record = match previous {
            Some(mut r) if r.state == MeshState::Acknowledged => {
                // The recipient acknowledged it in MESH already (it was
                // quarantined meanwhile, then redriven): acked, not sent twice.
                r.attempt = d.attempt;
                return self.acknowledged(r).await;
            }
            Some(mut r) if r.state == MeshState::Sent => {
                // Leased again while waiting: hold the new attempt, and
                // apply a failure MESH reported while no lease was held.
                r.attempt = d.attempt;
                r.updated_ms = now;
                return match r.reason.clone() {
                    Some(reason) => self.fail_delivery(r, &reason).await,
                    None => self.put(r).await,
                };
            }
            Some(mut r) if r.state == MeshState::Sending => {
                if let Some(id) = self.client.sent_with_local_id(&r.local_id).await? {
                    tracing::info!(
                        delivery_id = d.delivery_id,
                        "MESH already had this delivery; not sent again"
                    );
                    r.message_id = Some(id);
                    r.state = MeshState::Sent;
                    r.attempt = d.attempt;
                    r.updated_ms = now;
                    return self.put(r).await;
                }
                r
            }
            Some(r) => r,
            None => MeshRecord {
                delivery_id: d.delivery_id,
                handover_id: d.handover_id,
                mailbox: org.ods.as_str().to_owned(),
                mesh_mailbox: mesh_mailbox.clone(),
                local_id: if moved {
                    format!("{}-{}", local_id(d.delivery_id), org.ods.as_str())
                } else {
                    local_id(d.delivery_id)
                },
                message_id: None,
                state: MeshState::Sending,
                attempt: d.attempt,
                sends: 0,
                reason: None,
                updated_ms: now,
            },
        };
        record.state = MeshState::Sending;
        record.message_id = None;
        record.reason = None;
        record.attempt = d.attempt;
        record.sends += 1;
        record.mesh_mailbox = mesh_mailbox;
        record.updated_ms = now;
        self.put(record.clone()).await?;
        self.transmit(d, record).await
    }

    /// The MESH exchange proper, and what it leaves recorded.
    async fn transmit(&self, d: &Delivery, mut record: MeshRecord) -> Result<(), MeshError> {
        let (body, content_type, ext) = payload(d);
        let subject = subject_of(d);
        let file_name = format!("{}.{ext}", record.local_id);
        let msg = Outgoing {
            to: &record.mesh_mailbox,
            workflow_id: super::workflow_id(d.event),
            subject: &subject,
            local_id: &record.local_id,
            file_name: &file_name,
            content_type,
            body: &body,
        };
        match self.client.send(&msg).await {
            Ok(id) => {
                tracing::info!(
                    delivery_id = d.delivery_id,
                    handover_id = d.handover_id,
                    bytes = body.len(),
                    "sent through MESH"
                );
                record.message_id = Some(id);
                record.state = MeshState::Sent;
                record.updated_ms = self.gateway.clock.now_ms();
                self.put(record).await?;
                self.metrics.mesh_message("out", "sent");
                Ok(())
            }
            Err(e) if !e.is_transient() => {
                let reason = format!("MESH refused the message: {e}");
                self.fail_delivery(record, &reason).await
            }
            Err(e) => {
                self.metrics.mesh_message("out", "error");
                Err(e)
            }
        }
    }

    /// Quarantines the delivery with `reason` and records the failure.
    pub(super) async fn fail_delivery(
        &self,
        mut record: MeshRecord,
        reason: &str,
    ) -> Result<(), MeshError> {
        let reason = crate::handover::withhold_numbers(reason);
        let mut reason: String = reason.chars().take(400).collect();
        // MESH's words go into a nack reason, which refuses anything that
        // looks like patient data (a date, say): then say less.
        let mut v = crate::clinical::ValidationErrors::default();
        crate::handover::free_text::check_reason("reason", &reason, 1, &mut v);
        if !v.0.is_empty() {
            reason = "MESH reported a failure in words withheld here (they looked like patient data); see MESH's tracking of the message".into();
        }
        tracing::warn!(delivery_id = record.delivery_id, reason = %reason, "MESH delivery failed; quarantining");
        let caller = Caller::Relayed {
            org: record
                .mailbox
                .parse()
                .map_err(|_| MeshError::Gateway("a MESH record names no ODS code".into()))?,
            by: super::MESH_ACTOR,
        };
        let nack = NackCommand {
            delivery_id: record.delivery_id,
            attempt: record.attempt,
            permanent: true,
            reason: reason.clone(),
        };
        if let Err(e) = self.gateway.nack(&caller, nack).await
            && !self.finished_elsewhere(record.delivery_id)?
        {
            // Its lease ran out: the failure is kept on the record and
            // applied when the queue offers the delivery again (`send_one`).
            tracing::info!(delivery_id = record.delivery_id, error = %e, "MESH failure waits for the delivery's next lease");
            record.reason = Some(reason);
            return self.put(record).await;
        }
        record.state = MeshState::Failed;
        record.reason = Some(reason);
        record.updated_ms = self.gateway.clock.now_ms();
        self.put(record).await?;
        self.metrics.mesh_message("out", "failed");
        Ok(())
    }

    /// Whether the delivery is no longer in flight (delivered, quarantined,
    /// superseded): nothing more for MESH to do.
    fn finished_elsewhere(&self, delivery_id: u64) -> Result<bool, MeshError> {
        let d = self
            .gateway
            .store
            .delivery(delivery_id)
            .map_err(|e| MeshError::Gateway(e.to_string()))?;
        Ok(d.is_none_or(|d| !matches!(d.state, DeliveryState::Queued | DeliveryState::Leased)))
    }

    fn quarantined(&self, delivery_id: u64) -> Result<bool, MeshError> {
        let d = self
            .gateway
            .store
            .delivery(delivery_id)
            .map_err(|e| MeshError::Gateway(e.to_string()))?;
        Ok(d.is_some_and(|d| d.state == DeliveryState::Quarantined))
    }

    async fn put(&self, record: MeshRecord) -> Result<(), MeshError> {
        self.gateway
            .store
            .mesh_put(super::MESH_ACTOR, record)
            .await
            .map_err(|e| MeshError::Gateway(e.to_string()))
    }

    /// Asks MESH about every sent message; acks or quarantines its delivery.
    async fn track_sent(&self) -> Result<Vec<MeshRecord>, MeshError> {
        let mut acknowledged = Vec::new();
        let sent: Vec<MeshRecord> = self
            .gateway
            .store
            .mesh_records()
            .map_err(|e| MeshError::Gateway(e.to_string()))?
            .into_iter()
            .filter(|r| r.state == MeshState::Sent)
            .collect();
        for record in sent {
            let Some(id) = record.message_id.clone() else {
                continue;
            };
            let t = match self.client.track(&id).await {
                Ok(t) => t,
                Err(e) if e.is_outage() => return Err(e),
                Err(MeshError::Status(404, ..)) => {
                    let reason = "MESH no longer knows the message it accepted (tracking answered 404): redrive to send it again";
                    self.fail_delivery(record, reason).await?;
                    continue;
                }
                Err(e) => {
                    message_failed(&e, "tracking a sent message");
                    continue;
                }
            };
            let status = t.status.unwrap_or_default().to_ascii_lowercase();
            match status.as_str() {
                "acknowledged" => acknowledged.push(record),
                "undeliverable" | "error" => {
                    let code = t.status_code.unwrap_or_default();
                    let words = t.status_description.unwrap_or_default();
                    let reason = if code.is_empty() && words.is_empty() {
                        format!("MESH reported the message {status} (no reason given)")
                    } else {
                        format!("MESH reported the message {status} (code {code}: {words})")
                    };
                    self.fail_delivery(record, &reason).await?;
                }
                _ => {}
            }
        }
        Ok(acknowledged)
    }

    /// The recipient acknowledged: the delivery is delivered.
    pub(super) async fn acknowledged(&self, mut record: MeshRecord) -> Result<(), MeshError> {
        let caller = Caller::Relayed {
            org: record
                .mailbox
                .parse()
                .map_err(|_| MeshError::Gateway("a MESH record names no ODS code".into()))?,
            by: super::MESH_ACTOR,
        };
        match self
            .gateway
            .ack(&caller, record.delivery_id, record.attempt)
            .await
        {
            Ok(_) => {}
            Err(_) if self.quarantined(record.delivery_id)? => {
                // The recipient has it: put it back in the queue, and the
                // next lease of it is acknowledged without sending again.
                self.gateway
                    .store
                    .redrive(super::MESH_ACTOR, vec![record.delivery_id])
                    .await
                    .map_err(|e| MeshError::Gateway(e.to_string()))?;
                tracing::info!(
                    delivery_id = record.delivery_id,
                    "acknowledged in MESH after it was quarantined; requeued to be marked delivered"
                );
                record.state = MeshState::Acknowledged;
                record.reason = Some("acknowledged in MESH after it was quarantined".into());
                record.updated_ms = self.gateway.clock.now_ms();
                return self.put(record).await;
            }
            Err(e) if self.finished_elsewhere(record.delivery_id)? => {
                record.reason = Some(format!(
                    "acknowledged in MESH; the delivery had already finished ({})",
                    e.reason()
                ));
            }
            Err(e) => {
                // Its lease ran out: acked once the queue offers it again.
                tracing::info!(delivery_id = record.delivery_id, error = %e, "MESH acknowledgement waits for the delivery's next lease");
                return Ok(());
            }
        }
        tracing::info!(
            delivery_id = record.delivery_id,
            "acknowledged by the recipient in MESH"
        );
        record.state = MeshState::Acknowledged;
        record.updated_ms = self.gateway.clock.now_ms();
        self.put(record).await?;
        self.metrics.mesh_message("out", "acknowledged");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clinical::{JourneyEvent, View};
    use crate::handover::PatientRef;

    fn delivery(view: View, not_carried: Vec<String>, supersedes: Option<u64>) -> Delivery {
        let summary = crate::clinical::synthetic::release_summary(
            "9990001014".parse().ok(),
            None,
            "YP001".parse().unwrap(),
            "YG001".parse().ok(),
            "marker",
        );
        let shown = crate::clinical::views::apply(&summary, view);
        let text =
            String::from_utf8(crate::clinical::fhir::render(&shown, JourneyEvent::Release).bytes)
                .unwrap();
        Delivery {
            delivery_id: 7,
            attempt: 1,
            handover_id: 12,
            sender: "YP001".into(),
            event: JourneyEvent::Release,
            patient: PatientRef {
                nhs_number: None,
                prison_number: None,
                date_of_birth: None,
            },
            submitted_at_ms: 0,
            lease_expires_at_ms: None,
            urgent: true,
            not_carried,
            due_ms: None,
            supersedes_handover_id: supersedes,
            view,
            document: RenderedDocument::FhirJson(text),
        }
    }

    fn composition(d: &Delivery) -> serde_json::Value {
        let (bytes, _, _) = payload(d);
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        doc["entry"][0]["resource"].clone()
    }

    /// A MESH recipient reads in the document what a gRPC one reads beside
    /// it: what it replaces, that it is a withdrawal notice, what is not
    /// carried (escaped, as text).
    #[test]
    fn a_fhir_document_over_mesh_says_what_it_replaces_and_does_not_carry() {
        let notice = delivery(
            View::Withdrawn,
            vec!["everything clinical: <do not act> & more".into()],
            Some(9),
        );
        let c = composition(&notice);
        assert_eq!(c["relatesTo"][0]["code"], "replaces");
        assert_eq!(c["relatesTo"][0]["targetIdentifier"]["value"], "9");
        assert!(
            c["title"]
                .as_str()
                .unwrap()
                .starts_with("Withdrawal notice")
        );
        let last = c["section"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["title"], "Not carried by this format or view");
        let div = last["text"]["div"].as_str().unwrap();
        assert!(div.contains("&lt;do not act&gt; &amp; more"), "{div}");
        assert!(subject_of(&notice).contains("withdrawal notice"));
        assert!(subject_of(&notice).contains("replaces handover 9"));
        assert!(subject_of(&notice).ends_with("URGENT"));
        // A first summary with nothing left out is sent as written.
        let plain = delivery(View::Full, Vec::new(), None);
        let RenderedDocument::FhirJson(text) = &plain.document else {
            unreachable!()
        };
        let written: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(composition(&plain), written["entry"][0]["resource"]);
    }
}
