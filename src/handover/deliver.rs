//! Pull, ack, nack and track: a mailbox's deliveries, leased, rendered in
//! the format the consumer wants, and acknowledged per attempt.

use std::time::Duration;

use tracing::Instrument;

use super::envelope::{Envelope, PatientRef};
use super::{Caller, Decoded, Error, Gateway};
use crate::clinical::translate::{self, TextFormat};
use crate::clinical::{ClinicalSummary, ValidationErrors, View};
use crate::journey::{Format, JourneyEvent};
use crate::store::{
    AckOutcome, DeliveryRecord, DeliveryState, HandoverRecord, LeasedDelivery, StoreError, TrackKey,
};

/// Who gives back or quarantines a leased delivery the gateway itself
/// could not read: the audit trail must not say the recipient refused it.
pub const DELIVERY_ACTOR: &str = "service:delivery";

/// The most attempts one batch acknowledgement may name.
pub const MAX_ACK_BATCH: usize = 500;

/// A pull, as asked.
#[derive(Debug, Clone, Default)]
pub struct PullCommand {
    /// Most deliveries to lease (0: one).
    pub max_deliveries: u32,
    /// How long the lease lasts (`None`: the configured default).
    pub lease: Option<Duration>,
    /// How long to wait for work when the mailbox is empty.
    pub wait: Duration,
    /// The format wanted (`None`: the mailbox's registered format).
    pub format: Option<Format>,
    /// Most stored payload bytes to lease for one answer (`None`: no
    /// limit; always at least one delivery). What would go over stays
    /// queued, untouched; the gRPC edge then trims the answer to its
    /// encoded size (see [`Gateway::return_unsent`]).
    pub max_bytes: Option<usize>,
}

/// A delivery's document in the consumer's format.
#[derive(Debug, Clone)]
pub enum RenderedDocument {
    /// The native summary (the delivery's view applied).
    Native(Box<ClinicalSummary>),
    /// FHIR R4 JSON.
    FhirJson(String),
    /// HL7 v2 text.
    Hl7v2(String),
}

/// One leased delivery, rendered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The delivery.
    pub delivery_id: u64,
    /// Which attempt this lease is (an ack names it).
    pub attempt: u32,
    /// The handover it carries.
    pub handover_id: u64,
    /// Who sent it.
    pub sender: String,
    /// The journey event.
    pub event: JourneyEvent,
    /// Who it is about.
    pub patient: PatientRef,
    /// When it was submitted, ms since the epoch.
    pub submitted_at_ms: i64,
    /// When the lease ends, ms since the epoch.
    pub lease_expires_at_ms: Option<i64>,
    /// Served first.
    pub urgent: bool,
    /// What the format or view does not carry (paths, never values).
    pub not_carried: Vec<String>,
    /// When it is due, ms since the epoch.
    pub due_ms: Option<i64>,
    /// The handover this one supersedes, if any.
    pub supersedes_handover_id: Option<u64>,
    /// The view it was rendered in.
    pub view: View,
    /// The document.
    pub document: RenderedDocument,
}

/// A nack, as asked.
#[derive(Debug, Clone)]
pub struct NackCommand {
    /// The delivery.
    pub delivery_id: u64,
    /// The attempt the caller was given.
    pub attempt: u32,
    /// Quarantine now instead of offering it again.
    pub permanent: bool,
    /// Why, in words (no patient data).
    pub reason: String,
}

/// A handover's status as its sender sees it.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The handover.
    pub handover: HandoverRecord,
    /// Its deliveries.
    pub deliveries: Vec<DeliveryRecord>,
    /// What the MESH edge did with those pushed through MESH, by delivery id.
    pub mesh: std::collections::BTreeMap<u64, crate::store::MeshRecord>,
    /// When this was read, ms since the epoch (for `overdue`).
    pub now_ms: i64,
}

/// How many times one pull leases again after everything it leased was
/// quarantined for a payload that failed its check.
const MAX_PULL_ROUNDS: usize = 8;

/// Attempts a pull leased but has not answered yet. Dropped with some left
/// (the caller's deadline passed or it went away while the pull read and
/// rendered them), they are given back at once, as unsent: otherwise each
/// would wait out its lease unseen, spend an attempt, and hold its
/// patient's later deliveries (urgent ones too) until the lease ran out.
struct GiveBack {
    store: crate::store::Store,
    actor: String,
    mailbox: String,
    attempts: Vec<(u64, u32)>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        if self.attempts.is_empty() {
            return;
        }
        let attempts = std::mem::take(&mut self.attempts);
        let (store, actor, mailbox) =
            (self.store.clone(), self.actor.clone(), self.mailbox.clone());
        tracing::info!(
            deliveries = attempts.len(),
            "pull abandoned before its answer; its deliveries are given back"
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.return_unsent(&actor, &mailbox, attempts).await {
                    tracing::warn!(error = %e, "giving back an abandoned pull's deliveries failed; they wait out their leases");
                }
            });
        }
    }
}

impl Gateway {
    /// Leases up to `max_deliveries` of the caller's mailbox, waiting up to
    /// `wait` for work.
    ///
    /// # Errors
    /// Refusals (authorisation, a lease over the limit) and store failures.
    pub async fn pull(
        &self,
        caller: &Caller,
        cmd: Decoded<PullCommand>,
    ) -> Result<Vec<Delivery>, Error> {
        let (org, actor) = self.organisation(caller, "pull deliveries")?;
        let cmd = cmd?;
        let q = &self.queue;
        let max_lease = Duration::from_secs(u64::from(q.max_lease_seconds));
        let lease = match cmd.lease {
            Some(l) if l > max_lease => {
                return Err(Error::invalid(
                    "lease",
                    format!("at most {} seconds", q.max_lease_seconds),
                ));
            }
            Some(l) if !l.is_zero() => l,
            _ => Duration::from_secs(u64::from(q.default_lease_seconds)),
        };
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let max = cmd.max_deliveries.clamp(1, q.max_pull) as usize;
        let wait = cmd
            .wait
            .min(Duration::from_millis(u64::from(q.max_wait_ms)));
        let mailbox = org.ods.as_str();
        let max_bytes = cmd.max_bytes.map(|b| b as u64);
        let format = cmd.format.unwrap_or(org.format);
        let deadline = tokio::time::Instant::now() + wait;
        // A lease whose every payload failed its check was quarantined
        // whole: lease again rather than answer empty while others wait.
        // Each round quarantines at least one, and the rounds are bounded.
        let mut deliveries = Vec::new();
        let mut unanswered = GiveBack {
            store: self.store.clone(),
            actor: actor.clone(),
            mailbox: mailbox.to_owned(),
            attempts: Vec::new(),
        };
        for _ in 0..MAX_PULL_ROUNDS {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let leased = self
                .lease_waiting(&actor, mailbox, (max, max_bytes), lease_ms, wait)
                .await?;
            if leased.is_empty() {
                break;
            }
            // This round's only: a round follows only when every delivery
            // of the last was quarantined or given back as a failed attempt.
            unanswered.attempts = crate::store::attempts_of(&leased);
            let (delivered, failure) = self.deliver_leased(mailbox, &leased, format).await;
            deliveries.extend(delivered);
            if let Some(e) = failure
                && deliveries.is_empty()
            {
                // Each was quarantined or given back as a failed attempt.
                unanswered.attempts.clear();
                return Err(e);
            }
            if !deliveries.is_empty() {
                break;
            }
        }
        unanswered.attempts.clear();
        let handover_ids: Vec<u64> = deliveries.iter().map(|d| d.handover_id).collect();
        tracing::info!(
            deliveries = deliveries.len(),
            ?handover_ids,
            "pull answered"
        );
        Ok(deliveries)
    }

    /// Leases what waits, or waits up to `wait` for work to arrive.
    async fn lease_waiting(
        &self,
        actor: &str,
        mailbox: &str,
        limits: (usize, Option<u64>),
        lease_ms: i64,
        wait: Duration,
    ) -> Result<Vec<LeasedDelivery>, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        let signal = self.store.mailbox_signal(mailbox);
        let mut shutting_down = self.shutting_down.clone();
        loop {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let leased = self
                .store
                .pull_within(actor, mailbox, limits, lease_ms)
                .await?;
            let now = tokio::time::Instant::now();
            if !leased.is_empty() || now >= deadline || *shutting_down.borrow() {
                return Ok(leased);
            }
            // Wake on new work, on shutdown, or every second for expiring leases.
            let nap = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {}
                _ = shutting_down.changed() => {}
            }
        }
    }

    /// Renders what a pull leased, each delivery on its own:
    /// - one whose stored payload fails its integrity check is quarantined;
    /// - one that could not be read for any other reason (the store
    ///   unavailable for a moment) is given back as a failed attempt: offered
    ///   again after the retry backoff, and quarantined only once its
    ///   attempts run out, like any other.
    ///
    /// Both are the gateway's doing, audited as [`DELIVERY_ACTOR`].
    /// Returns what was rendered and the first failure of the second kind.
    async fn deliver_leased(
        &self,
        mailbox: &str,
        leased: &[LeasedDelivery],
        format: Format,
    ) -> (Vec<Delivery>, Option<Error>) {
        let handovers = leased.iter().map(|l| l.handover.clone()).collect();
        let mut delivered = Vec::with_capacity(leased.len());
        let mut unread = Vec::new();
        let mut failure = None;
        match self.store.payloads(handovers).await {
            Ok(payloads) => {
                for (l, payload) in leased.iter().zip(payloads) {
                    match self
                        .deliver_or_quarantine(mailbox, l, payload, format)
                        .await
                    {
                        Ok(Some(d)) => delivered.push(d),
                        Ok(None) => {}
                        Err(e) => {
                            unread.push(l);
                            failure.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => {
                unread.extend(leased);
                failure = Some(e.into());
            }
        }
        if let Some(e) = &failure {
            tracing::warn!(error = %e, deliveries = unread.len(), "leased deliveries could not be read; offered again after the retry backoff");
        }
        for l in unread {
            if let Err(e) = self
                .store
                .nack(
                    DELIVERY_ACTOR,
                    mailbox,
                    l.delivery.id,
                    l.delivery.attempt,
                    false,
                    "the gateway could not read the stored payload",
                )
                .await
            {
                tracing::error!(error = %e, delivery_id = l.delivery.id, "could not give back a leased delivery; offered again when its lease ends");
            }
        }
        (delivered, failure)
    }

    /// The leased delivery rendered, or quarantined (and `None`) when its
    /// stored payload (as read, `payload`) fails its integrity check. Any
    /// other failure is returned, the delivery left to the caller.
    async fn deliver_or_quarantine(
        &self,
        mailbox: &str,
        l: &LeasedDelivery,
        payload: Result<Vec<u8>, StoreError>,
        format: Format,
    ) -> Result<Option<Delivery>, Error> {
        let span = tracing::info_span!(
            "deliver",
            handover_id = l.handover.id,
            delivery_id = l.delivery.id,
            attempt = l.delivery.attempt
        );
        // In the submitter's trace, linked to this pull.
        crate::telemetry::continue_stored(&span, l.handover.trace_parent.as_deref());
        match span.in_scope(|| self.deliver(l, payload, format)) {
            Ok(d) => {
                span.in_scope(|| tracing::info!(urgent = d.urgent, "delivery leased"));
                Ok(Some(d))
            }
            Err(e @ Error::Store(StoreError::Corrupt(_))) => {
                span.in_scope(|| {
                    tracing::error!(error = %e, "stored payload unreadable; quarantining");
                });
                self.store
                    .nack(
                        DELIVERY_ACTOR,
                        mailbox,
                        l.delivery.id,
                        l.delivery.attempt,
                        true,
                        "stored payload failed its integrity check",
                    )
                    .instrument(span)
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A stored handover's patient and summary, checked on the way out of the store.
    pub(crate) async fn read_stored(
        &self,
        handover: &HandoverRecord,
    ) -> Result<(PatientRef, ClinicalSummary), Error> {
        let bytes = self.store.payload(handover).await?;
        decode_stored(&bytes)
    }

    fn deliver(
        &self,
        l: &LeasedDelivery,
        payload: Result<Vec<u8>, StoreError>,
        format: Format,
    ) -> Result<Delivery, Error> {
        let (patient, mut summary) = decode_stored(&payload?)?;
        let d = &l.delivery;
        let view = view_from_name(&d.view);
        // Probation's "GP registration in place" says what is known when the
        // view is rendered: a practice PDS found since counts.
        if view == View::Probation && summary.registered_gp.is_none() {
            summary.registered_gp =
                crate::pds::registration::registration_found(&self.store, &l.handover)?;
        }
        let (document, not_carried) = render(&summary, format, view, l.handover.event);
        Ok(Delivery {
            delivery_id: d.id,
            attempt: d.attempt,
            handover_id: l.handover.id,
            sender: l.handover.sender.clone(),
            event: l.handover.event,
            patient,
            submitted_at_ms: l.handover.submitted_at_ms,
            lease_expires_at_ms: d.lease_until_ms,
            urgent: d.urgent,
            not_carried,
            due_ms: d.due_ms,
            supersedes_handover_id: self.supersedes_for(&d.mailbox, &l.handover),
            view,
            document,
        })
    }

    /// The earlier handover a delivery to `mailbox` replaces: the nearest in
    /// the sender's lineage that this mailbox was given (leased at least
    /// once), so that a recipient holding it is told, even when the ones in
    /// between were retired before reaching it; none when it was given none
    /// (it holds nothing to replace). A lineage whose records cannot be read
    /// to its end (a store failure, tracking data removed under retention,
    /// a chain longer than the walk) gives the immediate predecessor: it
    /// may be held.
    fn supersedes_for(&self, mailbox: &str, handover: &HandoverRecord) -> Option<u64> {
        const MAX_WALK: usize = 32;
        let first = handover.supersedes?;
        let mut next = Some(first);
        for _ in 0..MAX_WALK {
            let id = next?;
            let Ok(Some(older)) = self.store.handover(id) else {
                break;
            };
            let given = older.deliveries.iter().any(|d| {
                matches!(
                    self.store.delivery(*d),
                    Ok(Some(r)) if r.mailbox == mailbox
                        && (r.state == DeliveryState::Delivered || r.attempt > 0)
                )
            });
            if given {
                return Some(id);
            }
            next = older.supersedes;
        }
        Some(first)
    }

    /// Gives back attempts the caller's pull leased but could not send (its
    /// answer was full): each is queued again at once, first in line, and
    /// its attempt is not counted. Audited per delivery.
    ///
    /// # Errors
    /// Refusals (authorisation) and store failures.
    pub async fn return_unsent(
        &self,
        caller: &Caller,
        attempts: Vec<(u64, u32)>,
    ) -> Result<(), Error> {
        let (org, actor) = self.organisation(caller, "pull deliveries")?;
        self.store
            .return_unsent(&actor, org.ods.as_str(), attempts)
            .await?;
        Ok(())
    }

    /// Acknowledges one attempt of a delivery in the caller's mailbox:
    /// `true` when this ack delivered it, `false` for a repeat (which
    /// succeeds again).
    ///
    /// # Errors
    /// Refusals (authorisation, a stale attempt, an expired lease, an unknown
    /// delivery) and store failures.
    pub async fn ack(
        &self,
        caller: &Caller,
        delivery_id: u64,
        attempt: u32,
    ) -> Result<bool, Error> {
        let (org, actor) = self.organisation(caller, "acknowledge deliveries")?;
        check_delivery_ref(delivery_id, attempt)?;
        let fresh = self
            .store
            .ack(&actor, org.ods.as_str(), delivery_id, attempt)
            .await?;
        record_delivery(delivery_id, attempt);
        if fresh {
            self.trace_outcome("delivery.acked", delivery_id, attempt);
        }
        Ok(fresh)
    }

    /// Acknowledges several attempts in the caller's mailbox in one durable
    /// change: each is judged and audited as by [`Gateway::ack`], and gets
    /// its own outcome, in the order given.
    ///
    /// # Errors
    /// Refusals of the whole call, before anything is acknowledged: the
    /// caller is not an organisation; no attempts, more than
    /// [`MAX_ACK_BATCH`], or an item with a zero delivery id or attempt
    /// (field-level, `attempts[i].…`). Store failures (nothing acknowledged).
    pub async fn ack_batch(
        &self,
        caller: &Caller,
        attempts: Vec<(u64, u32)>,
    ) -> Result<Vec<AckOutcome>, Error> {
        let (org, actor) = self.organisation(caller, "acknowledge deliveries")?;
        check_ack_batch(&attempts)?;
        tracing::Span::current().record("attempts", attempts.len());
        let outcomes = self
            .store
            .ack_batch(&actor, org.ods.as_str(), attempts.clone())
            .await?;
        for (&(delivery_id, attempt), outcome) in attempts.iter().zip(&outcomes) {
            if matches!(outcome, AckOutcome::Acknowledged) {
                self.trace_outcome("delivery.acked", delivery_id, attempt);
            }
        }
        Ok(outcomes)
    }

    /// Marks what became of a delivery with a span in its submitter's trace
    /// (linked to this call) when traces are on; ids only.
    fn trace_outcome(&self, name: &'static str, delivery_id: u64, attempt: u32) {
        if !crate::telemetry::tracing_now() {
            return;
        }
        let handover = self
            .store
            .delivery(delivery_id)
            .ok()
            .flatten()
            .and_then(|d| self.store.handover(d.handover_id).ok().flatten());
        let Some(handover) = handover else {
            return;
        };
        let span = tracing::info_span!(
            "delivery",
            otel.name = name,
            handover_id = handover.id,
            delivery_id,
            attempt
        );
        crate::telemetry::continue_stored(&span, handover.trace_parent.as_deref());
        span.in_scope(|| {});
    }

    /// Gives a delivery back (to be offered again, or quarantined).
    ///
    /// # Errors
    /// As for [`Gateway::ack`], and a reason that is missing or looks like
    /// patient data.
    pub async fn nack(&self, caller: &Caller, cmd: NackCommand) -> Result<DeliveryState, Error> {
        let (org, actor) = self.organisation(caller, "nack deliveries")?;
        let NackCommand {
            delivery_id,
            attempt,
            permanent,
            reason,
        } = cmd;
        check_delivery_ref(delivery_id, attempt)?;
        let mut v = ValidationErrors::default();
        super::free_text::check_reason("reason", &reason, 1, &mut v);
        v.into_result()?;
        let state = self
            .store
            .nack(
                &actor,
                org.ods.as_str(),
                delivery_id,
                attempt,
                permanent,
                &reason,
            )
            .await?;
        record_delivery(delivery_id, attempt);
        self.trace_outcome("delivery.nacked", delivery_id, attempt);
        if state == DeliveryState::Quarantined {
            // Ids only: the recipient's reason is free text.
            tracing::warn!(
                alert = "delivery_quarantined",
                delivery_id,
                mailbox = %org.ods,
                permanent,
                "ALERT: a delivery was quarantined by its recipient's nack (permanent, or on its \
                 last attempt): it waits for an operator (ListQuarantine, Redrive once the cause \
                 is fixed); its sender sees it in Track"
            );
        }
        Ok(state)
    }

    /// A handover the caller sent, with its deliveries.
    ///
    /// # Errors
    /// Refusals (authorisation, a handover that is not the caller's) and
    /// store failures.
    pub async fn track(&self, caller: &Caller, key: Decoded<TrackKey>) -> Result<Tracked, Error> {
        let (org, actor) = self.organisation(caller, "track handovers")?;
        let key = key?;
        let status = self.store.track(&actor, org.ods.as_str(), key).await?;
        tracing::Span::current().record("handover_id", status.handover.id);
        let mut mesh = std::collections::BTreeMap::new();
        for d in &status.deliveries {
            if let Some(r) = self.store.mesh_record(d.id)? {
                mesh.insert(d.id, r);
            }
        }
        Ok(Tracked {
            handover: status.handover,
            deliveries: status.deliveries,
            mesh,
            now_ms: self.clock.now_ms(),
        })
    }
}

/// A view's stored name.
#[must_use]
pub fn view_name(view: View) -> &'static str {
    match view {
        View::Full => "full",
        View::AdmissionNotice => "admission_notice",
        View::Probation => "probation",
        View::SubstanceMisuseService => "substance_misuse_service",
        View::MentalHealthTeam => "mental_health_team",
        View::Withdrawn => "withdrawn",
    }
}

/// The stored view; anything unknown is the narrowest.
#[must_use]
pub fn view_from_name(name: &str) -> View {
    match name {
        "full" | "" => View::Full,
        "admission_notice" => View::AdmissionNotice,
        "substance_misuse_service" => View::SubstanceMisuseService,
        "mental_health_team" => View::MentalHealthTeam,
        "withdrawn" => View::Withdrawn,
        _ => View::Probation,
    }
}

/// The `view` of `summary` rendered in `format`, with what it does not carry.
#[must_use]
pub fn render(
    summary: &ClinicalSummary,
    format: Format,
    view: View,
    event: JourneyEvent,
) -> (RenderedDocument, Vec<String>) {
    let text = |f| {
        let r = translate::write(f, summary, view, event);
        (
            String::from_utf8_lossy(&r.bytes).into_owned(),
            r.not_carried,
        )
    };
    match format {
        Format::Native => {
            let shown = crate::clinical::views::apply(summary, view);
            (
                RenderedDocument::Native(Box::new(shown)),
                translate::notes(summary, view),
            )
        }
        Format::Fhir => {
            let (t, n) = text(TextFormat::Fhir);
            (RenderedDocument::FhirJson(t), n)
        }
        Format::Hl7v2 => {
            let (t, n) = text(TextFormat::Hl7v2);
            (RenderedDocument::Hl7v2(t), n)
        }
    }
}

/// What the `view` of `summary` in `format` does not carry, decided
/// without rendering it (the same list [`render`] gives; `clinical::carried`).
pub(super) fn not_carried(
    summary: &ClinicalSummary,
    format: Format,
    view: View,
    event: JourneyEvent,
) -> Vec<String> {
    use crate::clinical::carried;
    match format {
        Format::Native => translate::notes(summary, view),
        Format::Fhir => carried::not_carried(TextFormat::Fhir, summary, view, event),
        Format::Hl7v2 => carried::not_carried(TextFormat::Hl7v2, summary, view, event),
    }
}

/// Names the delivery in the call's span once the store found it in the
/// caller's mailbox: an id the caller made up is never logged.
fn record_delivery(delivery_id: u64, attempt: u32) {
    let span = tracing::Span::current();
    span.record("delivery_id", delivery_id);
    span.record("attempt", attempt);
}

fn check_ack_batch(attempts: &[(u64, u32)]) -> Result<(), Error> {
    if attempts.is_empty() {
        return Err(ValidationErrors::one(
            "attempts",
            format!("required: 1 to {MAX_ACK_BATCH} delivery attempts"),
        )
        .into());
    }
    if attempts.len() > MAX_ACK_BATCH {
        return Err(ValidationErrors::one(
            "attempts",
            format!(
                "{} attempts is over the maximum of {MAX_ACK_BATCH} per call; split the batch",
                attempts.len()
            ),
        )
        .into());
    }
    let mut v = ValidationErrors::default();
    for (i, &(delivery_id, attempt)) in attempts.iter().enumerate() {
        if delivery_id == 0 {
            v.add(format!("attempts[{i}].delivery_id"), "required");
        }
        if attempt == 0 {
            v.add(
                format!("attempts[{i}].attempt"),
                "required: the attempt number from the pulled delivery",
            );
        }
    }
    Ok(v.into_result()?)
}

fn check_delivery_ref(delivery_id: u64, attempt: u32) -> Result<(), Error> {
    let mut v = ValidationErrors::default();
    if delivery_id == 0 {
        v.add("delivery_id", "required");
    }
    if attempt == 0 {
        v.add(
            "attempt",
            "required: the attempt number from the pulled delivery",
        );
    }
    Ok(v.into_result()?)
}

/// A stored payload's patient and summary (its envelope decoded).
fn decode_stored(bytes: &[u8]) -> Result<(PatientRef, ClinicalSummary), Error> {
    let corrupt = |e: String| Error::Store(StoreError::Corrupt(e));
    let envelope = Envelope::decode(bytes).map_err(corrupt)?;
    let summary: ClinicalSummary = serde_json::from_slice(&envelope.document)
        .map_err(|e| corrupt(super::envelope::unreadable("stored summary", &e)))?;
    Ok((envelope.patient, summary))
}
