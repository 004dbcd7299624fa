//! What each handover call tells the metrics: labels read from the wire
//! request and the result, never from the document's content.

use std::time::Instant;

use tonic::{Code, Response, Status};

use super::{pb, wire};
use crate::journey::{Format, JourneyEvent};
use crate::operator::metrics::{Metrics, Outcome};

/// The outcome label of a refusal.
fn refused(code: Code) -> Outcome {
    Outcome::refused(match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    })
}

fn outcome<T>(result: &Result<Response<T>, Status>) -> Outcome {
    match result {
        Ok(_) => Outcome::OK,
        Err(status) => refused(status.code()),
    }
}

/// The event and format a submit request names, taken before it is consumed.
pub(super) fn submit_labels(req: &pb::SubmitRequest) -> (Option<JourneyEvent>, Option<Format>) {
    use pb::submit_request::Document;
    let format = req.document.as_ref().map(|d| match d {
        Document::Native(_) => Format::Native,
        Document::FhirJson(_) => Format::Fhir,
        Document::Hl7v2(_) => Format::Hl7v2,
    });
    (wire::event_from_wire(req.event), format)
}

pub(super) fn submit(
    metrics: &Metrics,
    (event, format): (Option<JourneyEvent>, Option<Format>),
    started: Instant,
    result: &Result<Response<pb::SubmitResponse>, Status>,
) {
    let outcome = match result {
        Ok(receipt) if receipt.get_ref().duplicate => Outcome::DUPLICATE,
        other => outcome(other),
    };
    metrics.submitted(event, format, outcome, started.elapsed());
}

pub(super) fn pull(metrics: &Metrics, result: &Result<Response<pb::PullResponse>, Status>) {
    use pb::delivery::Document;
    let deliveries = result.iter().flat_map(|r| &r.get_ref().deliveries);
    metrics.pulled(
        outcome(result),
        deliveries.map(|d| {
            let format = d.document.as_ref().map(|doc| match doc {
                Document::Native(_) => Format::Native,
                Document::FhirJson(_) => Format::Fhir,
                Document::Hl7v2(_) => Format::Hl7v2,
            });
            (wire::event_from_wire(d.event), format)
        }),
    );
}

/// A repeated ack of a delivered attempt counts as a duplicate, as in a batch.
pub(super) fn ack(
    metrics: &Metrics,
    repeat: bool,
    result: &Result<Response<pb::AckResponse>, Status>,
) {
    metrics.acked(if repeat && result.is_ok() {
        Outcome::DUPLICATE
    } else {
        outcome(result)
    });
}

/// Each item of a batch counts as one ack; a refused call as one refusal.
pub(super) fn ack_batch(
    metrics: &Metrics,
    result: &Result<Response<pb::AckBatchResponse>, Status>,
) {
    let results = match result {
        Ok(r) => &r.get_ref().results,
        Err(status) => return metrics.acked(refused(status.code())),
    };
    for r in results {
        metrics.acked(match r.outcome() {
            pb::AckOutcome::Acknowledged => Outcome::OK,
            pb::AckOutcome::AlreadyAcknowledged => Outcome::DUPLICATE,
            pb::AckOutcome::StaleAttempt
            | pb::AckOutcome::LeaseExpired
            | pb::AckOutcome::NotLeased => refused(Code::FailedPrecondition),
            pb::AckOutcome::UnknownDelivery | pb::AckOutcome::Unspecified => {
                refused(Code::NotFound)
            }
        });
    }
}

pub(super) fn nack(
    metrics: &Metrics,
    permanent: bool,
    result: &Result<Response<pb::NackResponse>, Status>,
) {
    let outcome = match result {
        Ok(r) => match r.get_ref().state() {
            pb::DeliveryState::Quarantined => Outcome::QUARANTINED,
            pb::DeliveryState::Queued => Outcome::REQUEUED,
            _ => Outcome::OK,
        },
        Err(status) => refused(status.code()),
    };
    metrics.nacked(permanent, outcome);
}
