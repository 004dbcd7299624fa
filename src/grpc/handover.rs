//! The handover service on gRPC: Submit, Pull, Ack, Nack, Track, Claim.
//! Each handler decodes its request, calls the use case in `handover`, and
//! encodes the answer; refusals are logged, audited and mapped in one place.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::instrument;

use super::pb;
use super::wire::{self, Violations};
use crate::handover::{
    Caller, ClaimCommand, Claimed, Delivery, Error, Gateway, NackCommand, PullCommand,
    RenderedDocument, Subject, SubmitReceipt,
};
use crate::journey::Format;
use crate::operator::metrics::Metrics;
use crate::store::{AckOutcome, StoreError, TrackKey};
use crate::tls::{ConnInfo, PeerIdentity};

/// The caller a request's connection identified.
pub(super) fn caller_of<T>(req: &Request<T>) -> Caller {
    match req.extensions().get::<ConnInfo>().map(|i| &i.identity) {
        Some(PeerIdentity::Organisation(code)) => Caller::Organisation(code.clone()),
        Some(PeerIdentity::Operator(name)) => Caller::Operator(name.clone()),
        None => Caller::Unidentified,
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

    /// A pull's answer of at most `max_bytes` encoded (always the first
    /// delivery): the deliveries after the first that does not fit are
    /// given back unsent, first in line for the next pull.
    fn within_answer(
        &self,
        caller: &Caller,
        deliveries: Vec<Delivery>,
        max_bytes: usize,
    ) -> pb::PullResponse {
        let mut answer = pb::PullResponse::default();
        let mut size = 0usize;
        let mut unsent = Vec::new();
        for d in deliveries {
            if !unsent.is_empty() {
                unsent.push((d.delivery_id, d.attempt));
                continue;
            }
            let (id, attempt) = (d.delivery_id, d.attempt);
            let wire = delivery_to_wire(d);
            let len = prost::encoding::message::encoded_len(1, &wire);
            if !answer.deliveries.is_empty() && size.saturating_add(len) > max_bytes {
                unsent.push((id, attempt));
                continue;
            }
            size += len;
            answer.deliveries.push(wire);
        }
        if !unsent.is_empty() {
            tracing::info!(
                sent = answer.deliveries.len(),
                returned = unsent.len(),
                bytes = size,
                "pull answer full: the rest given back unsent"
            );
            // Given back on a task of its own, not awaited here: between
            // the pull's leases and its answer there is then no wait a
            // caller giving up could end, leaving the deliveries in the
            // answer leased, unsent, until their leases ran out. Not given
            // back, they wait out their lease and count, as an answer that
            // failed whole did before: still send what fits.
            let (gateway, caller) = (self.gateway.clone(), caller.clone());
            tokio::spawn(async move {
                if let Err(e) = gateway.return_unsent(&caller, unsent).await {
                    tracing::error!(error = %e, "giving back a pull's unsent deliveries failed");
                }
            });
        }
        answer
    }
}

fn caller_org_kind(gateway: &Gateway, caller: &Caller) -> &'static str {
    match caller {
        Caller::Organisation(code) | Caller::Relayed { org: code, .. } => gateway
            .registry
            .get(code)
            .map_or("unregistered", |o| o.kind.as_str()),
        Caller::Operator(_) => "operator",
        Caller::Unidentified => "unknown",
    }
}

/// Logs and audits a refusal (fail closed), then maps the answer to gRPC.
pub(super) async fn answer<T>(
    gateway: &Gateway,
    caller: &Caller,
    action: &'static str,
    result: Result<T, Error>,
) -> Result<Response<T>, Status> {
    answer_of(gateway, caller, (action, Subject::default()), result).await
}

/// [`answer`] for a call that named `subject`: its refusal is on that
/// record's patient's trail ([`Gateway::audit_refusal_of`]).
pub(super) async fn answer_of<T>(
    gateway: &Gateway,
    caller: &Caller,
    (action, subject): (&'static str, Subject),
    result: Result<T, Error>,
) -> Result<Response<T>, Status> {
    match result {
        Ok(r) => Ok(Response::new(r)),
        Err(e) => {
            let kind = caller_org_kind(gateway, caller);
            tracing::info!(caller_kind = kind, code = ?e.kind(), error = %e, "refused");
            if let Err(unrecorded) = gateway.audit_refusal_of(caller, action, &e, subject).await {
                return Err(unrecorded.into());
            }
            Err(e.into())
        }
    }
}

/// Names the caller in the call's span.
/// Runs `call` on a task of its own and waits for it: a caller that gives
/// up (its deadline passes, it resets the stream) drops this wait, not the
/// call. A claim that matched nothing, or a practice's date of birth the
/// store refused, is then counted as a failed claim whether or not anyone
/// waits for the answer; a cancelled call counted nothing, and with its
/// outcome read elsewhere (a Pull, a Track) dates of birth could be guessed
/// without limit.
async fn to_the_end<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    use tracing::Instrument;
    tokio::spawn(call.in_current_span())
        .await
        .unwrap_or_else(|e| {
            Err(Error::Store(StoreError::Unavailable(format!(
                "the call's task failed: {e}"
            ))))
        })
}

pub(super) fn traced<T>(req: &Request<T>) -> Caller {
    let caller = caller_of(req);
    if caller != Caller::Unidentified {
        tracing::Span::current().record("caller", tracing::field::display(caller.actor()));
    }
    caller
}

fn format_from_wire(format: i32) -> Result<Option<Format>, Violations> {
    match pb::DocumentFormat::try_from(format) {
        Ok(pb::DocumentFormat::Unspecified) => Ok(None),
        Ok(pb::DocumentFormat::Native) => Ok(Some(Format::Native)),
        Ok(pb::DocumentFormat::FhirJson) => Ok(Some(Format::Fhir)),
        Ok(pb::DocumentFormat::Hl7v2) => Ok(Some(Format::Hl7v2)),
        Err(_) => Err(Violations::one("format", "unknown document format")),
    }
}

fn pull_from_wire(req: pb::PullRequest) -> Result<PullCommand, Violations> {
    let pb::PullRequest {
        max_deliveries,
        format,
        lease,
        wait,
    } = req;
    let mut v = Violations::default();
    let format = format_from_wire(format).map_err(|e| v.0.extend(e.0)).ok();
    let lease = wire::duration_from_wire(lease, "lease", &mut v);
    if lease.is_some_and(|l| l.subsec_nanos() != 0) {
        // A fraction of a second would only burn attempts (an ack cannot
        // arrive in time), and the contract says whole seconds.
        v.add("lease", "must be whole seconds");
    }
    let wait = wire::duration_from_wire(wait, "wait", &mut v);
    v.into_result()?;
    Ok(PullCommand {
        max_deliveries,
        format: format.flatten(),
        lease,
        wait: wait.unwrap_or(Duration::ZERO),
        max_bytes: None,
    })
}

fn track_from_wire(req: pb::TrackRequest) -> Result<TrackKey, Violations> {
    let pb::TrackRequest { handover } = req;
    match handover {
        Some(pb::track_request::Handover::HandoverId(id)) if id > 0 => Ok(TrackKey::HandoverId(id)),
        Some(pb::track_request::Handover::MessageId(m)) if wire::is_message_id(&m) => {
            Ok(TrackKey::MessageId(m))
        }
        Some(pb::track_request::Handover::MessageId(m)) if !m.is_empty() => {
            Err(Violations::one("message_id", wire::MESSAGE_ID_RULE))
        }
        _ => Err(Violations::one(
            "handover",
            "required: a handover_id or the message_id it was submitted with",
        )),
    }
}

fn receipt_to_wire(r: SubmitReceipt) -> pb::SubmitResponse {
    pb::SubmitResponse {
        handover_id: r.handover_id,
        deliveries: r
            .deliveries
            .into_iter()
            .map(|d| pb::DeliveryReceipt {
                destination: d.destination,
                delivery_id: d.delivery_id,
                due_at: d.due_ms.map(wire::timestamp),
                urgent: d.urgent,
            })
            .collect(),
        duplicate: r.duplicate,
        superseded_by_handover_id: r.superseded_on_arrival_by.unwrap_or(0),
    }
}

fn delivery_to_wire(d: Delivery) -> pb::Delivery {
    let document = match d.document {
        RenderedDocument::Native(s) => pb::delivery::Document::Native(super::summary::to_wire(&s)),
        RenderedDocument::FhirJson(t) => pb::delivery::Document::FhirJson(t),
        RenderedDocument::Hl7v2(t) => pb::delivery::Document::Hl7v2(t),
    };
    pb::Delivery {
        delivery_id: d.delivery_id,
        attempt: d.attempt,
        handover_id: d.handover_id,
        sender: d.sender,
        event: wire::event_to_wire(d.event).into(),
        patient: Some(wire::patient_to_wire(&d.patient)),
        submitted_at: Some(wire::timestamp(d.submitted_at_ms)),
        lease_expires_at: d.lease_expires_at_ms.map(wire::timestamp),
        urgent: d.urgent,
        not_carried: d.not_carried,
        due_at: d.due_ms.map(wire::timestamp),
        supersedes_handover_id: d.supersedes_handover_id.unwrap_or(0),
        document: Some(document),
    }
}

/// One item's outcome of a batch acknowledgement for the wire.
fn ack_result_to_wire((delivery_id, attempt): (u64, u32), outcome: AckOutcome) -> pb::AckResult {
    use pb::AckOutcome as W;
    let mut r = pb::AckResult {
        delivery_id,
        attempt,
        ..pb::AckResult::default()
    };
    let (wire, state) = match outcome {
        AckOutcome::Acknowledged => (W::Acknowledged, None),
        AckOutcome::AlreadyAcknowledged => (W::AlreadyAcknowledged, None),
        AckOutcome::Refused(e, state) => {
            r.detail = e.to_string();
            let wire = match e {
                StoreError::StaleAttempt { current, .. } => {
                    r.current_attempt = current;
                    W::StaleAttempt
                }
                StoreError::LeaseExpired => W::LeaseExpired,
                StoreError::NotLeased(_) => W::NotLeased,
                // Only the four lease refusals reach here; anything else is
                // reported as not found rather than guessed at.
                _ => W::UnknownDelivery,
            };
            (wire, state)
        }
    };
    r.set_outcome(wire);
    let state = match wire {
        W::Acknowledged | W::AlreadyAcknowledged => Some(crate::store::DeliveryState::Delivered),
        _ => state,
    };
    r.state = state.map_or(0, |s| wire::state_to_wire(s).into());
    r
}

/// Claimed deliveries for the wire.
pub(super) fn claimed_to_wire(claimed: Vec<Claimed>) -> Vec<pb::ClaimedDelivery> {
    claimed
        .into_iter()
        .map(|d| pb::ClaimedDelivery {
            delivery_id: d.delivery_id,
            handover_id: d.handover_id,
            event: d.event.map_or(0, |e| wire::event_to_wire(e).into()),
        })
        .collect()
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
        let caller = traced(&request);
        let cmd =
            wire::submit_from_wire(request.into_inner(), self.gateway.limits.max_document_bytes);
        let (gateway, by) = (self.gateway.clone(), caller.clone());
        let result = to_the_end(async move { gateway.submit(&by, cmd).await })
            .await
            .map(receipt_to_wire);
        let result = answer(&self.gateway, &caller, "submit", result).await;
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
        let caller = traced(&request);
        let max_bytes = self.gateway.queue.max_pull_bytes;
        let deadline = wire::grpc_timeout(request.metadata());
        let cmd = pull_from_wire(request.into_inner()).map(|c| PullCommand {
            max_bytes: Some(max_bytes),
            // A long poll answers (empty) before the caller's deadline, not
            // after it with DEADLINE_EXCEEDED, and never leases as it ends.
            wait: deadline.map_or(c.wait, |d| c.wait.min(wire::before_deadline(d))),
            ..c
        });
        let result = match self.gateway.pull(&caller, cmd).await {
            Ok(d) => Ok(self.within_answer(&caller, d, max_bytes)),
            Err(e) => Err(e),
        };
        let result = answer(&self.gateway, &caller, "pull", result).await;
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
        let caller = traced(&request);
        let pb::AckRequest {
            delivery_id,
            attempt,
        } = request.into_inner();
        let result = self.gateway.ack(&caller, delivery_id, attempt).await;
        let repeat = matches!(result, Ok(false));
        let result = answer_of(
            &self.gateway,
            &caller,
            ("ack", Subject::delivery(delivery_id)),
            result.map(|_| pb::AckResponse {}),
        )
        .await;
        if let Some(m) = &self.metrics {
            super::metered::ack(m, repeat, &result);
        }
        result
    }

    #[instrument(name = "ack_batch", skip_all, fields(caller = Empty, attempts = Empty))]
    async fn ack_batch(
        &self,
        request: Request<pb::AckBatchRequest>,
    ) -> Result<Response<pb::AckBatchResponse>, Status> {
        let caller = traced(&request);
        let pb::AckBatchRequest { attempts } = request.into_inner();
        let attempts: Vec<(u64, u32)> = attempts
            .into_iter()
            .map(
                |pb::DeliveryAttempt {
                     delivery_id,
                     attempt,
                 }| (delivery_id, attempt),
            )
            .collect();
        let result = self
            .gateway
            .ack_batch(&caller, attempts.clone())
            .await
            .map(|outcomes| pb::AckBatchResponse {
                results: attempts
                    .into_iter()
                    .zip(outcomes)
                    .map(|(a, o)| ack_result_to_wire(a, o))
                    .collect(),
            });
        let result = answer(&self.gateway, &caller, "ack_batch", result).await;
        if let Some(m) = &self.metrics {
            super::metered::ack_batch(m, &result);
        }
        result
    }

    #[instrument(name = "nack", skip_all, fields(caller = Empty, delivery_id = Empty, attempt = Empty))]
    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let caller = traced(&request);
        let pb::NackRequest {
            delivery_id,
            attempt,
            permanent,
            reason,
        } = request.into_inner();
        let cmd = NackCommand {
            delivery_id,
            attempt,
            permanent,
            reason,
        };
        let result = self
            .gateway
            .nack(&caller, cmd)
            .await
            .map(|s| pb::NackResponse {
                state: wire::state_to_wire(s).into(),
            });
        let subject = Subject::delivery(delivery_id);
        let result = answer_of(&self.gateway, &caller, ("nack", subject), result).await;
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
        let caller = traced(&request);
        let key = track_from_wire(request.into_inner());
        let subject = match &key {
            Ok(TrackKey::HandoverId(id)) => Subject::handover(*id),
            _ => Subject::default(),
        };
        let result = self
            .gateway
            .track(&caller, key)
            .await
            .map(|t| wire::track_to_wire(&t.handover, &t.deliveries, &t.mesh, t.now_ms));
        answer_of(&self.gateway, &caller, ("track", subject), result).await
    }

    #[instrument(name = "claim", skip_all)]
    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let caller = traced(&request);
        let pb::ClaimRequest { patient, evidence } = request.into_inner();
        let cmd = ClaimCommand {
            patient: wire::patient_decoded(patient, "patient"),
            registration_date: evidence
                .map(|pb::ClaimEvidence { registration_date }| registration_date),
        };
        let (gateway, by) = (self.gateway.clone(), caller.clone());
        let result = to_the_end(async move { gateway.claim(&by, cmd).await })
            .await
            .map(|c| pb::ClaimResponse {
                claimed: claimed_to_wire(c),
            });
        answer(&self.gateway, &caller, "claim", result).await
    }
}
