//! The handover service: Submit, Pull, Ack, Nack, Track.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument, instrument};

use super::envelope::{Envelope, PatientRef};
use super::error::ApiError;
use super::pb;
use super::wire::{self, IncomingDocument, SubmitCommand, Violations};
use crate::audit::PatientKeyer;
use crate::clinical::translate::{self, TextFormat};
use crate::clinical::{ClinicalSummary, Limits, ValidationErrors, View, validate};
use crate::config::QueueConfig;
use crate::journey::{
    Deadlines, Format, JourneyEvent, OrgKind, Organisation, Recipient, SharedRegistry,
};
use crate::operator::metrics::Metrics;
use crate::store::records::DocumentFormat;
use crate::store::{
    Clock, LeasedDelivery, NewDelivery, NewHandover, PARKED_MAILBOX, Store, StoreError, TrackKey,
};
use crate::tls::{ConnInfo, PeerIdentity};

/// What every service shares.
pub struct Gateway {
    /// The store.
    pub store: Store,
    /// Registered organisations (operators change them while running).
    pub registry: SharedRegistry,
    /// How long each event may take to arrive.
    pub deadlines: Deadlines,
    /// The clock routing and deadlines use (the store's).
    pub clock: Arc<dyn Clock>,
    /// Keyed hash for patient identifiers.
    pub keyer: PatientKeyer,
    /// Queue settings.
    pub queue: QueueConfig,
    /// Limits on documents.
    pub limits: Limits,
    /// Flips to true when the gateway starts shutting down.
    pub shutting_down: watch::Receiver<bool>,
    /// Failed claims per practice and patient (brute-force lockout).
    pub claims: super::ClaimGuard,
}

/// A caller resolved from its certificate.
pub(super) enum Caller {
    Org(Organisation),
    Operator,
}

impl Gateway {
    pub(super) fn caller<T>(&self, req: &Request<T>) -> Result<(Caller, String), ApiError> {
        let info = req
            .extensions()
            .get::<ConnInfo>()
            .ok_or_else(|| ApiError::Unauthenticated("no client certificate".into()))?;
        let actor = info.identity.to_string();
        match &info.identity {
            PeerIdentity::Operator(_) => Ok((Caller::Operator, actor)),
            PeerIdentity::Organisation(code) => match self.registry.get(code) {
                Some(org) if !org.active => Err(ApiError::PermissionDenied(format!(
                    "organisation {code} is disabled in the registry"
                ))),
                Some(org) => Ok((Caller::Org(org), actor)),
                None => {
                    tracing::warn!(caller = %actor, "certificate for an unregistered organisation");
                    // The code is the CA's word (it issued the certificate), not the caller's.
                    Err(ApiError::Unauthenticated(format!(
                        "organisation {code} named by the client certificate is not registered"
                    )))
                }
            },
        }
    }

    fn organisation<T>(
        &self,
        req: &Request<T>,
        what: &str,
    ) -> Result<(Organisation, String), ApiError> {
        match self.caller(req)? {
            (Caller::Org(org), actor) => Ok((org, actor)),
            (Caller::Operator, _) => Err(ApiError::PermissionDenied(format!(
                "operators cannot {what}; use an organisation's certificate"
            ))),
        }
    }

    /// Reads the document into the canonical summary, with the event it states.
    fn read_document(
        &self,
        document: IncomingDocument,
    ) -> Result<(ClinicalSummary, Option<JourneyEvent>, DocumentFormat), ApiError> {
        let from_clinical = |e: ValidationErrors| {
            let mut v = Violations::default();
            for x in e.0 {
                v.add(x.field, x.description);
            }
            ApiError::Invalid(v.0)
        };
        match document {
            IncomingDocument::Native(summary) => {
                let mut v = Violations::default();
                match super::summary::from_wire(*summary, "document.native", &mut v) {
                    Some(s) if v.0.is_empty() => Ok((s, None, DocumentFormat::Native)),
                    _ => Err(ApiError::Invalid(v.0)),
                }
            }
            IncomingDocument::FhirJson(text) => {
                translate::read(TextFormat::Fhir, text.as_bytes(), &self.limits)
                    .map(|r| (r.summary, r.event, DocumentFormat::FhirJson))
                    .map_err(from_clinical)
            }
            IncomingDocument::Hl7v2(text) => {
                translate::read(TextFormat::Hl7v2, text.as_bytes(), &self.limits)
                    .map(|r| (r.summary, r.event, DocumentFormat::Hl7v2))
                    .map_err(from_clinical)
            }
        }
    }

    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<pb::SubmitResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "submit handovers")?;
        let cmd = SubmitCommand::from_wire(req.into_inner(), self.limits.max_document_bytes)
            .map_err(ApiError::Invalid)?;
        if org.kind != cmd.event.sender_kind() {
            return Err(ApiError::PermissionDenied(format!(
                "a {} cannot send {}",
                org.kind.as_str(),
                cmd.event
            )));
        }
        let (summary, stated, source_format) = self.read_document(cmd.document.clone())?;
        let mut v = Violations::default();
        if let Some(stated) = stated.filter(|e| *e != cmd.event) {
            v.add("event", format!("the document states {stated}"));
        }
        let from_document = PatientRef {
            nhs_number: summary.patient.nhs_number.clone(),
            prison_number: summary.patient.prison_number.clone(),
            date_of_birth: Some(summary.patient.date_of_birth.to_string()),
        };
        if let Some(given) = &cmd.patient {
            fn differs<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
                a.is_some() && a != b
            }
            if differs(&given.nhs_number, &from_document.nhs_number)
                || differs(&given.prison_number, &from_document.prison_number)
                || differs(&given.date_of_birth, &from_document.date_of_birth)
            {
                v.add("patient", "does not match the patient in the document");
            }
        }
        if let Err(e) = validate(&summary, cmd.event) {
            for x in e.0 {
                v.add(x.field, x.description);
            }
        }
        if !v.0.is_empty() {
            return Err(ApiError::Invalid(v.0));
        }
        let now = self.clock.now_ms();
        let routes = {
            let registry = self.registry.read();
            crate::journey::route(
                cmd.event,
                &summary,
                &org,
                &cmd.destinations,
                &registry,
                &self.deadlines,
                now,
            )
        }
        .map_err(|violations| {
            let mut v = Violations::default();
            for (field, reason) in violations {
                v.add(field, reason);
            }
            ApiError::Invalid(v.0)
        })?;
        let parked = routes.iter().any(|r| r.recipient == Recipient::Parked);
        let linking = from_document.nhs_number.is_some() && from_document.prison_number.is_some();
        // Claim keys serve a parked release, and a link of both identifiers
        // (which lets earlier parked releases be claimed by either).
        let claim_keys = if parked || linking {
            self.keyer.claim_keys(
                from_document.nhs_number.as_ref(),
                from_document.prison_number.as_ref(),
                &summary.patient.date_of_birth.to_string(),
            )
        } else {
            Vec::new()
        };
        let destinations = routes
            .iter()
            .map(|r| {
                let (mailbox, format) = match &r.recipient {
                    Recipient::Org(code) => (
                        code.as_str().to_owned(),
                        self.registry
                            .read()
                            .get(code)
                            .map_or(Format::Native, |o| o.format),
                    ),
                    Recipient::Parked => (PARKED_MAILBOX.to_owned(), Format::Native),
                };
                NewDelivery {
                    mailbox,
                    urgent: r.urgent,
                    view: view_name(r.view).to_owned(),
                    not_carried: render(&summary, format, r.view, cmd.event).1,
                    due_ms: Some(r.due_ms).filter(|d| *d != i64::MAX),
                }
            })
            .collect();
        // Each identifier's keyed hash on its own: the store links them.
        let patient = crate::store::PatientIds {
            nhs: (from_document.nhs_number.as_ref()).map(|n| self.keyer.key(Some(n), None)),
            prison: (from_document.prison_number.as_ref()).map(|p| self.keyer.key(None, Some(p))),
        };
        let payload = Envelope {
            patient: from_document,
            source_format,
            document: serde_json::to_vec(&summary).expect("the model serialises"),
        }
        .encode();
        let outcome = self
            .store
            .submit(NewHandover {
                actor,
                sender: org.ods.as_str().to_owned(),
                message_id: cmd.message_id,
                event: cmd.event,
                patient,
                claim_keys,
                requested_destinations: cmd
                    .destinations
                    .iter()
                    .map(|c| c.as_str().to_owned())
                    .collect(),
                destinations,
                payload,
                supersede: true,
            })
            .await?;
        tracing::Span::current().record("handover_id", outcome.handover_id);
        tracing::info!(
            deliveries = outcome.deliveries.len(),
            duplicate = outcome.duplicate,
            "submit accepted"
        );
        let mut deliveries = Vec::with_capacity(outcome.deliveries.len());
        for (i, (destination, delivery_id)) in outcome.deliveries.into_iter().enumerate() {
            // A repeat answers with the original deliveries, routed then.
            let (due_ms, urgent) = match routes.get(i) {
                Some(r) if !outcome.duplicate => (Some(r.due_ms), r.urgent),
                _ => self
                    .store
                    .delivery(delivery_id)?
                    .map_or((None, false), |d| (d.due_ms, d.urgent)),
            };
            deliveries.push(pb::DeliveryReceipt {
                destination,
                delivery_id,
                due_at: due_ms.filter(|d| *d != i64::MAX).map(wire::timestamp),
                urgent,
            });
        }
        Ok(pb::SubmitResponse {
            handover_id: outcome.handover_id,
            deliveries,
            duplicate: outcome.duplicate,
        })
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<pb::PullResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "pull deliveries")?;
        let pb::PullRequest {
            max_deliveries,
            lease_seconds,
            wait_millis,
            format,
        } = req.into_inner();
        let format = match pb::DocumentFormat::try_from(format) {
            Ok(pb::DocumentFormat::Unspecified) => org.format,
            Ok(pb::DocumentFormat::Native) => Format::Native,
            Ok(pb::DocumentFormat::FhirJson) => Format::Fhir,
            Ok(pb::DocumentFormat::Hl7v2) => Format::Hl7v2,
            Err(_) => return Err(ApiError::invalid("format", "unknown document format")),
        };
        let q = &self.queue;
        if lease_seconds > q.max_lease_seconds {
            return Err(ApiError::invalid(
                "lease_seconds",
                format!("at most {} seconds", q.max_lease_seconds),
            ));
        }
        let lease_ms = i64::from(if lease_seconds == 0 {
            q.default_lease_seconds
        } else {
            lease_seconds
        }) * 1_000;
        let max = max_deliveries.clamp(1, q.max_pull) as usize;
        let wait = Duration::from_millis(u64::from(wait_millis.min(q.max_wait_ms)));
        let mailbox = org.ods.as_str();
        let deadline = tokio::time::Instant::now() + wait;
        let signal = self.store.mailbox_signal(mailbox);
        let mut shutting_down = self.shutting_down.clone();
        let leased = loop {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let leased = self.store.pull(&actor, mailbox, max, lease_ms).await?;
            let now = tokio::time::Instant::now();
            if !leased.is_empty() || now >= deadline || *shutting_down.borrow() {
                break leased;
            }
            // Wake on new work, on shutdown, or every second for expiring leases.
            let nap = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {}
                _ = shutting_down.changed() => {}
            }
        };
        let mut deliveries = Vec::with_capacity(leased.len());
        for l in leased {
            let span = tracing::info_span!(
                "deliver",
                handover_id = l.handover.id,
                delivery_id = l.delivery.id,
                attempt = l.delivery.attempt
            );
            match self.deliver(&l, format).instrument(span.clone()).await {
                Ok(d) => {
                    span.in_scope(|| tracing::info!(urgent = d.urgent, "delivery leased"));
                    deliveries.push(d);
                }
                Err(e) => {
                    span.in_scope(|| {
                        tracing::error!(error = %e, "stored payload unreadable; quarantining");
                    });
                    self.store
                        .nack(
                            &actor,
                            mailbox,
                            l.delivery.id,
                            l.delivery.attempt,
                            true,
                            "stored payload failed its integrity check",
                        )
                        .instrument(span)
                        .await?;
                }
            }
        }
        let handover_ids: Vec<u64> = deliveries.iter().map(|d| d.handover_id).collect();
        tracing::info!(
            deliveries = deliveries.len(),
            ?handover_ids,
            "pull answered"
        );
        Ok(pb::PullResponse { deliveries })
    }

    /// A stored handover's patient and summary, checked on the way out of the store.
    pub(super) async fn read_stored(
        &self,
        handover: &crate::store::HandoverRecord,
    ) -> Result<(PatientRef, ClinicalSummary), ApiError> {
        let corrupt = |e: String| ApiError::Store(StoreError::Corrupt(e));
        let bytes = self.store.payload(handover).await?;
        let envelope = Envelope::decode(&bytes).map_err(corrupt)?;
        let summary: ClinicalSummary =
            serde_json::from_slice(&envelope.document).map_err(|e| corrupt(e.to_string()))?;
        Ok((envelope.patient, summary))
    }

    async fn deliver(&self, l: &LeasedDelivery, format: Format) -> Result<pb::Delivery, ApiError> {
        let (patient, summary) = self.read_stored(&l.handover).await?;
        let d = &l.delivery;
        let view = view_from_name(&d.view);
        let (document, not_carried) = render(&summary, format, view, l.handover.event);
        Ok(pb::Delivery {
            delivery_id: d.id,
            attempt: d.attempt,
            handover_id: l.handover.id,
            sender: l.handover.sender.clone(),
            event: wire::event_to_wire(l.handover.event).into(),
            patient: Some(wire::patient_to_wire(&patient)),
            submitted_at: Some(wire::timestamp(l.handover.submitted_at_ms)),
            lease_expires_at: d.lease_until_ms.map(wire::timestamp),
            urgent: d.urgent,
            not_carried,
            due_at: d.due_ms.map(wire::timestamp),
            supersedes_handover_id: l.handover.supersedes.unwrap_or(0),
            document: Some(document),
        })
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<pb::AckResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "acknowledge deliveries")?;
        let pb::AckRequest {
            delivery_id,
            attempt,
        } = req.into_inner();
        check_delivery_ref(delivery_id, attempt)?;
        self.store
            .ack(&actor, org.ods.as_str(), delivery_id, attempt)
            .await?;
        record_delivery(delivery_id, attempt);
        Ok(pb::AckResponse {})
    }

    async fn nack(&self, req: Request<pb::NackRequest>) -> Result<pb::NackResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "nack deliveries")?;
        let pb::NackRequest {
            delivery_id,
            attempt,
            permanent,
            reason,
        } = req.into_inner();
        check_delivery_ref(delivery_id, attempt)?;
        let mut v = Violations::default();
        super::free_text::check_reason("reason", &reason, 1, &mut v);
        if !v.0.is_empty() {
            return Err(ApiError::Invalid(v.0));
        }
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
        Ok(pb::NackResponse {
            state: wire::state_to_wire(state).into(),
        })
    }

    async fn track(&self, req: Request<pb::TrackRequest>) -> Result<pb::TrackResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "track handovers")?;
        let pb::TrackRequest { handover } = req.into_inner();
        let key = match handover {
            Some(pb::track_request::Handover::HandoverId(id)) if id > 0 => TrackKey::HandoverId(id),
            Some(pb::track_request::Handover::MessageId(m)) if !m.is_empty() => {
                TrackKey::MessageId(m)
            }
            _ => {
                return Err(ApiError::invalid(
                    "handover",
                    "required: a handover_id or the message_id it was submitted with",
                ));
            }
        };
        let status = self.store.track(&actor, org.ods.as_str(), key).await?;
        tracing::Span::current().record("handover_id", status.handover.id);
        Ok(wire::track_to_wire(
            &status.handover,
            &status.deliveries,
            self.clock.now_ms(),
        ))
    }

    async fn claim(&self, req: Request<pb::ClaimRequest>) -> Result<pb::ClaimResponse, ApiError> {
        let (org, actor) = self.organisation(&req, "claim parked releases")?;
        if org.kind != OrgKind::GpPractice {
            return Err(ApiError::PermissionDenied(format!(
                "only a GP practice claims parked releases; {} is a {}",
                org.ods,
                org.kind.as_str()
            )));
        }
        let pb::ClaimRequest { patient, evidence } = req.into_inner();
        let now = self.clock.now_ms();
        let mut v = Violations::default();
        let registered = wire::claim_evidence_from_wire(evidence, "evidence", now, &mut v);
        let (patient, dob) = claimant(patient, "patient", v)?;
        if registered.as_deref().is_some_and(|r| r < dob.as_str()) {
            return Err(ApiError::invalid(
                "evidence.registration_date",
                "must not be before the date of birth",
            ));
        }
        let patient_key = self
            .keyer
            .key(patient.nhs_number.as_ref(), patient.prison_number.as_ref());
        let ticket = self
            .claims
            .admit(&actor, &patient_key, now)
            .map_err(|locked| {
                tracing::warn!(
                    alert = "claims_locked",
                    scope = locked.scope,
                    "claim refused: the failed-claim limit is reached"
                );
                ApiError::ClaimsLocked {
                    scope: locked.scope,
                    window_hours: self.claims.window_hours(),
                    retry_after: Duration::from_millis(
                        u64::try_from(locked.until_ms.saturating_sub(now)).unwrap_or(0),
                    ),
                }
            })?;
        let result = self
            .claim_patient(&actor, &patient, &dob, org.ods.as_str())
            .await;
        if !matches!(result, Err(ApiError::Store(StoreError::NothingToClaim))) {
            return result; // claimed, or not decided: neither counts as a failure
        }
        let failure = ticket.failed(now);
        // Keyed like a claim key, but over the registration date instead of
        // the date of birth: checkable by whoever holds the key, and never
        // equal to a real claim key.
        let evidence = registered.and_then(|date| {
            self.keyer
                .claim_keys(
                    patient.nhs_number.as_ref(),
                    patient.prison_number.as_ref(),
                    &format!("registered:{date}"),
                )
                .into_iter()
                .next()
        });
        self.record_failed_claim(actor, patient_key, &failure, evidence)
            .await?;
        result
    }

    /// Audits one failed claim (fail closed) and raises the alert when it
    /// locked a counter.
    async fn record_failed_claim(
        &self,
        actor: String,
        patient_key: String,
        failure: &super::claim_guard::Failure,
        evidence: Option<String>,
    ) -> Result<(), ApiError> {
        tracing::info!(
            failures = failure.pair_failures,
            limit = failure.pair_limit,
            "claim matched no parked release"
        );
        if !failure.now_locked.is_empty() {
            tracing::warn!(
                alert = "repeated_failed_claims",
                caller = %actor,
                locked = ?failure.now_locked,
                "ALERT: repeated failed claims (a date of birth may be being guessed); claims locked"
            );
        }
        let evidence = evidence.map_or_else(
            || "no evidence given".to_owned(),
            |hash| format!("evidence: registration date (keyed {hash})"),
        );
        let locked = if failure.now_locked.is_empty() {
            String::new()
        } else {
            format!("; claims now locked: {}", failure.now_locked.join(", "))
        };
        self.store
            .record(crate::audit::AuditEvent {
                actor,
                action: super::claim_guard::FAILURE_ACTION,
                patient_key: Some(patient_key),
                outcome: format!(
                    "refused: no parked release matches; failed claim {} of {} for this patient from this practice within {} h; {evidence}{locked}",
                    failure.pair_failures,
                    failure.pair_limit,
                    self.claims.window_hours(),
                ),
                ..crate::audit::AuditEvent::default()
            })
            .await?;
        Ok(())
    }

    /// Claims the parked releases of `patient` (born `dob`) for `practice`.
    /// The failed-claim limit is the caller's business: operators are not
    /// limited (they claim with a reason), practices are (`claim`).
    pub(super) async fn claim_patient(
        &self,
        actor: &str,
        patient: &PatientRef,
        dob: &str,
        practice: &str,
    ) -> Result<pb::ClaimResponse, ApiError> {
        let keys = self.keyer.claim_keys(
            patient.nhs_number.as_ref(),
            patient.prison_number.as_ref(),
            dob,
        );
        let claimed = self.store.claim(actor, keys, practice).await?;
        if claimed.is_empty() {
            return Err(ApiError::Store(StoreError::NothingToClaim));
        }
        tracing::info!(
            claimed = claimed.len(),
            to = practice,
            "parked releases claimed"
        );
        Ok(pb::ClaimResponse {
            claimed: claimed
                .iter()
                .map(|d| pb::ClaimedDelivery {
                    delivery_id: d.id,
                    handover_id: d.handover_id,
                    event: d.event.map_or(0, |e| wire::event_to_wire(e).into()),
                })
                .collect(),
        })
    }
}

/// The patient a claim names, with the date of birth it must carry; `v`
/// holds violations found earlier in the request.
pub(super) fn claimant(
    patient: Option<pb::PatientRef>,
    field: &str,
    mut v: Violations,
) -> Result<(PatientRef, String), ApiError> {
    let patient = wire::patient_from_wire(patient, field, &mut v);
    let patient = match patient {
        None if v.0.is_empty() => {
            return Err(ApiError::invalid(
                field,
                "required: NHS number or prison number, and date of birth",
            ));
        }
        Some(p) if v.0.is_empty() => p,
        _ => return Err(ApiError::Invalid(v.0)),
    };
    let Some(dob) = patient.date_of_birth.clone() else {
        return Err(ApiError::invalid(
            format!("{field}.date_of_birth"),
            "required to claim: it must match the release",
        ));
    };
    Ok((patient, dob))
}

fn view_name(view: View) -> &'static str {
    match view {
        View::Full => "full",
        View::AdmissionNotice => "admission_notice",
        View::Probation => "probation",
    }
}

/// The stored view; anything unknown is the narrowest.
fn view_from_name(name: &str) -> View {
    match name {
        "full" | "" => View::Full,
        "admission_notice" => View::AdmissionNotice,
        _ => View::Probation,
    }
}

/// The `view` of `summary` rendered in `format`, with what it does not carry.
fn render(
    summary: &ClinicalSummary,
    format: Format,
    view: View,
    event: JourneyEvent,
) -> (pb::delivery::Document, Vec<String>) {
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
                pb::delivery::Document::Native(super::summary::to_wire(&shown)),
                translate::notes(summary, view),
            )
        }
        Format::Fhir => {
            let (t, n) = text(TextFormat::Fhir);
            (pb::delivery::Document::FhirJson(t), n)
        }
        Format::Hl7v2 => {
            let (t, n) = text(TextFormat::Hl7v2);
            (pb::delivery::Document::Hl7v2(t), n)
        }
    }
}

/// Names the delivery in the call's span once the store found it in the
/// caller's mailbox: an id the caller made up is never logged.
fn record_delivery(delivery_id: u64, attempt: u32) {
    let span = tracing::Span::current();
    span.record("delivery_id", delivery_id);
    span.record("attempt", attempt);
}

fn check_delivery_ref(delivery_id: u64, attempt: u32) -> Result<(), ApiError> {
    let mut v = Violations::default();
    if delivery_id == 0 {
        v.add("delivery_id", "required");
    }
    if attempt == 0 {
        v.add(
            "attempt",
            "required: the attempt number from the pulled delivery",
        );
    }
    if v.0.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(v.0))
    }
}

/// The tonic service over a shared [`Gateway`].
#[derive(Clone)]
pub struct HandoverGrpc {
    gateway: Arc<Gateway>,
    metrics: Option<Arc<Metrics>>,
}

impl HandoverGrpc {
    /// A service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self {
            gateway,
            metrics: None,
        }
    }

    /// Counts and times every call in `metrics`.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }
}

fn caller_org_kind(gateway: &Gateway, info: Option<&ConnInfo>) -> &'static str {
    match info.map(|i| &i.identity) {
        Some(PeerIdentity::Organisation(code)) => gateway
            .registry
            .get(code)
            .map_or(OrgKind::Operator, |o| o.kind)
            .as_str(),
        Some(PeerIdentity::Operator(_)) => "operator",
        None => "unknown",
    }
}

/// Audits a refusal decided before the store (the store audits its own);
/// fails closed: an unrecorded refusal is answered `UNAVAILABLE`.
pub(super) async fn audit_refusal(
    gateway: &Gateway,
    actor: String,
    action: &'static str,
    e: &ApiError,
) -> Option<Status> {
    if matches!(e, ApiError::Store(_)) {
        return None;
    }
    let event = crate::audit::AuditEvent {
        actor,
        action,
        outcome: format!("refused: {:?}: {e}", e.code()),
        ..crate::audit::AuditEvent::default()
    };
    match gateway.store.record(event).await {
        Ok(()) => None,
        Err(failure) => {
            tracing::error!(error = %failure, "a refusal could not be audited; answering UNAVAILABLE");
            Some(Status::unavailable(
                "the gateway cannot record this call; retry later",
            ))
        }
    }
}

macro_rules! traced {
    ($self:ident, $req:ident, $method:ident) => {{
        let info = $req.extensions().get::<ConnInfo>();
        if let Some(info) = info {
            tracing::Span::current().record("caller", tracing::field::display(&info.identity));
        }
        let kind = caller_org_kind(&$self.gateway, info);
        let actor = info.map_or_else(|| "unknown".to_owned(), |i| i.identity.to_string());
        let result = $self.gateway.$method($req).await;
        if let Err(e) = &result {
            tracing::info!(caller_kind = kind, code = ?e.code(), error = %e, "refused");
            if let Some(unrecorded) = audit_refusal(&$self.gateway, actor, stringify!($method), e).await {
                return Err(unrecorded);
            }
        }
        result.map(Response::new).map_err(Status::from)
    }};
}

#[tonic::async_trait]
impl pb::handover_service_server::HandoverService for HandoverGrpc {
    #[instrument(name = "submit", skip_all, fields(caller = Empty, handover_id = Empty))]
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let labels = super::metered::submit_labels(request.get_ref());
        let started = std::time::Instant::now();
        let result = traced!(self, request, submit);
        if let Some(m) = &self.metrics {
            super::metered::submit(m, labels, started, &result);
        }
        result
    }

    #[instrument(name = "pull", skip_all, fields(caller = Empty))]
    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let result = traced!(self, request, pull);
        if let Some(m) = &self.metrics {
            super::metered::pull(m, &result);
        }
        result
    }

    #[instrument(name = "ack", skip_all, fields(caller = Empty, delivery_id = Empty, attempt = Empty))]
    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let result = traced!(self, request, ack);
        if let Some(m) = &self.metrics {
            super::metered::ack(m, &result);
        }
        result
    }

    #[instrument(name = "nack", skip_all, fields(caller = Empty, delivery_id = Empty, attempt = Empty))]
    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let permanent = request.get_ref().permanent;
        let result = traced!(self, request, nack);
        if let Some(m) = &self.metrics {
            super::metered::nack(m, permanent, &result);
        }
        result
    }

    #[instrument(name = "track", skip_all, fields(caller = Empty, handover_id = Empty))]
    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        traced!(self, request, track)
    }

    #[instrument(name = "claim", skip_all)]
    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        traced!(self, request, claim)
    }
}
