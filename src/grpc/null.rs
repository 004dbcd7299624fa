//! A Handover service that does no work: it answers every submit with an
//! empty receipt. `throughcare bench --baseline` serves it on the same
//! listener, TLS stack and limit layers as the real one, so the bench can
//! print the real gateway's throughput as a share of what the RPC stack
//! alone carries on the same machine in the same run. Never served unless
//! `serve --null-handover` (hidden) asks for it.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

use super::pb;

/// The do-nothing service.
#[derive(Debug, Default)]
pub struct NullHandover {
    next: AtomicU64,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the null handover only answers Submit",
    ))
}

#[tonic::async_trait]
impl pb::handover_service_server::HandoverService for NullHandover {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        // Decoded like a real submit; nothing stored.
        let _ = request.into_inner();
        Ok(Response::new(pb::SubmitResponse {
            handover_id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            deliveries: Vec::new(),
            duplicate: false,
            superseded_by_handover_id: 0,
        }))
    }

    async fn pull(
        &self,
        _: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        unimplemented()
    }

    async fn ack(&self, _: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        unimplemented()
    }

    async fn ack_batch(
        &self,
        _: Request<pb::AckBatchRequest>,
    ) -> Result<Response<pb::AckBatchResponse>, Status> {
        unimplemented()
    }

    async fn nack(
        &self,
        _: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        unimplemented()
    }

    async fn track(
        &self,
        _: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        unimplemented()
    }

    async fn claim(
        &self,
        _: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        unimplemented()
    }
}
