//! A request message over the gateway's size limit: `RESOURCE_EXHAUSTED`
//! (gRPC's code for it, not tonic's `OUT_OF_RANGE`), audited, nothing stored.

use crate::support;

use std::sync::Arc;

use support::*;
use throughcare::store::SystemClock;
use tonic::Code;

struct Raw;
struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[tokio::test]
async fn an_over_limit_message_is_resource_exhausted_and_audited() {
    const LIMIT: usize = 65_536;
    let gw = TestGateway::start_with(
        |c| c.limits.max_document_bytes = LIMIT,
        Arc::new(SystemClock),
    )
    .await;
    let digest = gw.store.content_digest().unwrap();
    let audited = gw.store.audit_entries().unwrap().len();
    let channel = throughcare::cli::client::channel(&gw.endpoint, &gw.certs(), "YP001")
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/throughcare.v1.HandoverService/Submit",
    );
    // Field 2 (bytes/string) of 3 × the document limit: over the message limit.
    let mut message = vec![0x12];
    let len = 3 * LIMIT;
    let mut n = len;
    while n >= 0x80 {
        message.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    message.push(n as u8);
    message.resize(message.len() + len, b'x');
    let status = grpc
        .unary(tonic::Request::new(message), path, Raw)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    let entries = gw.store.audit_entries().unwrap();
    assert_eq!(entries.len(), audited + 1);
    let last = entries.last().unwrap();
    assert_eq!(last.actor, "urn:ods:YP001");
    assert_eq!(last.action, "submit");
    assert!(
        last.outcome.starts_with("refused: ResourceExhausted"),
        "{}",
        last.outcome
    );
    assert_eq!(gw.store.content_digest().unwrap(), digest, "nothing stored");
    gw.client("YG001")
        .await
        .pull(throughcare::grpc::pb::PullRequest {
            max_deliveries: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    gw.stop().await;
}
