//! Bad input, one row per case, over real mutual TLS: each gets its exact
//! gRPC status (and BadRequest field violation where one applies), nothing
//! is stored (`Store::content_digest` unchanged), the refusal is audited,
//! and the gateway keeps serving.

use crate::support;

use std::sync::Arc;

use support::*;
use throughcare::clinical::translate::{self, TextFormat};
use throughcare::clinical::{ClinicalSummary, View};
use throughcare::grpc::pb;
use throughcare::journey::JourneyEvent;
use throughcare::store::SystemClock;
use tonic::Code;

const LIMIT: usize = 65_536;

type Handover = pb::handover_service_client::HandoverServiceClient<tonic::transport::Channel>;

fn fixture() -> ClinicalSummary {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/patients/01-ost-released-today.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn request(id: &str, document: pb::submit_request::Document) -> pb::SubmitRequest {
    pb::SubmitRequest {
        message_id: id.into(),
        event: pb::JourneyEvent::Release.into(),
        patient: None,
        destinations: vec!["YG001".into()],
        document: Some(document),
    }
}

fn hl7(s: &ClinicalSummary) -> String {
    String::from_utf8(
        translate::write(TextFormat::Hl7v2, s, View::Full, JourneyEvent::Release).bytes,
    )
    .unwrap()
}

fn with_nhs(id: &str, nhs: &str) -> pb::SubmitRequest {
    let s = fixture();
    pb::SubmitRequest {
        patient: Some(pb::PatientRef {
            nhs_number: nhs.into(),
            prison_number: String::new(),
            date_of_birth: s.patient.date_of_birth.to_string(),
        }),
        ..request(
            id,
            pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&s)),
        )
    }
}

/// A codec that sends bytes as they are, to put invalid UTF-8 on the wire.
#[derive(Default, Clone)]
struct RawCodec;

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

impl tonic::codec::Codec for RawCodec {
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

async fn submit_raw(gw: &TestGateway, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let channel = throughcare::cli::client::channel(&gw.endpoint, &gw.certs(), "YP001")
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/throughcare.v1.HandoverService/Submit",
    );
    grpc.unary(tonic::Request::new(bytes), path, RawCodec)
        .await
        .map(|_| ())
}

/// The expected answer: a code, and the field of the first violation when
/// the case has one.
struct Expect {
    code: Code,
    field: Option<&'static str>,
}

/// A case's input: a typed request, or bytes put on the wire as they are.
enum Input {
    Typed(Box<pb::SubmitRequest>),
    Raw(Vec<u8>),
}

/// One case: its name, its input, the answer it expects.
type Case = (&'static str, Input, Expect);

#[tokio::test]
async fn every_bad_input_gets_its_status_changes_nothing_and_is_audited() {
    let gw = TestGateway::start_with(
        |c| c.limits.max_document_bytes = LIMIT,
        Arc::new(SystemClock),
    )
    .await;
    let mut prison = gw.client("YP001").await;
    // One good submit first, so "the same id with other content" has something to conflict with.
    let s = fixture();
    let native = pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&s));
    prison
        .submit(request("good-1", native.clone()))
        .await
        .unwrap();

    let mut cases = document_cases(&s, &native);
    cases.extend(identifier_and_routing_cases(&s, &native));
    let mut report = Vec::new();
    for case in cases {
        report.push(refused_and_audited(&gw, &mut prison, case, &s.patient.family_name).await);
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(
        gw.store.verify_audit().unwrap() as usize,
        gw.store.audit_entries().unwrap().len()
    );
    gw.stop().await;
}

/// Documents that break a limit or their format: one byte over the size
/// limit, nested too deep, invalid UTF-8, a carriage return inside an HL7 field.
fn document_cases(s: &ClinicalSummary, native: &pb::submit_request::Document) -> Vec<Case> {
    let over = {
        let mut t = String::from("{\"resourceType\":\"Bundle\",\"pad\":\"");
        t.push_str(&"x".repeat(LIMIT + 1 - t.len() - 2));
        t.push_str("\"}");
        assert_eq!(t.len(), LIMIT + 1);
        t
    };
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    // Each reference is resolved by a scan of the entries, and every array
    // walked: both are bounded before any entry is read.
    let many_entries = format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"document\",\"entry\":[{}]}}",
        vec!["{\"resource\":{\"id\":\"x\"}}"; 2_001].join(",")
    );
    let long_array = format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"document\",\"x\":[{}]}}",
        vec!["1"; 10_001].join(",")
    );
    let hl7_cr = hl7(s).replacen(&s.patient.family_name, "Okonkwo\rPryce", 1);
    assert_ne!(hl7_cr, hl7(s), "the family name is in the PID segment");
    let invalid_utf8 = {
        use prost::Message;
        let mut bytes = request("IDXX", native.clone()).encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"IDXX").unwrap();
        bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
        bytes
    };
    vec![
        (
            "document 1 byte over the limit",
            Input::Typed(Box::new(request(
                "big",
                pb::submit_request::Document::FhirJson(over),
            ))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("document.fhir_json"),
            },
        ),
        (
            "deeply nested JSON",
            Input::Typed(Box::new(request(
                "deep",
                pb::submit_request::Document::FhirJson(nested),
            ))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("document"),
            },
        ),
        (
            "a Bundle of 2,001 entries",
            Input::Typed(Box::new(request(
                "many",
                pb::submit_request::Document::FhirJson(many_entries),
            ))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("entry"),
            },
        ),
        (
            "an array of 10,001 items",
            Input::Typed(Box::new(request(
                "long",
                pb::submit_request::Document::FhirJson(long_array),
            ))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("document"),
            },
        ),
        (
            "invalid UTF-8 in a string field",
            Input::Raw(invalid_utf8),
            Expect {
                code: Code::InvalidArgument,
                field: Some("SubmitRequest.message_id"),
            },
        ),
        (
            "carriage return inside an HL7 field",
            Input::Typed(Box::new(request(
                "cr",
                pb::submit_request::Document::Hl7v2(hl7_cr),
            ))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("segment 4"),
            },
        ),
    ]
}

/// A bad NHS number (check digit, all zeros), a reused message id with other
/// content, a destination the caller may not send to.
fn identifier_and_routing_cases(
    s: &ClinicalSummary,
    native: &pb::submit_request::Document,
) -> Vec<Case> {
    let nhs = s.patient.nhs_number.as_ref().unwrap().as_str().to_owned();
    let mut bad_digit = nhs.clone().into_bytes();
    bad_digit[9] = if bad_digit[9] == b'9' {
        b'0'
    } else {
        bad_digit[9] + 1
    };
    let bad_digit = String::from_utf8(bad_digit).unwrap();
    let other = throughcare::clinical::synthetic::release_summary(
        nhs.parse().ok(),
        None,
        "YP001".parse().unwrap(),
        None,
        "other content",
    );
    vec![
        (
            "NHS number with a bad check digit",
            Input::Typed(Box::new(with_nhs("digit", &bad_digit))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("patient.nhs_number"),
            },
        ),
        (
            "NHS number 0000000000",
            Input::Typed(Box::new(with_nhs("zeros", "0000000000"))),
            Expect {
                code: Code::InvalidArgument,
                field: Some("patient.nhs_number"),
            },
        ),
        (
            "same message id, different content",
            Input::Typed(Box::new(request(
                "good-1",
                pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&other)),
            ))),
            Expect {
                code: Code::AlreadyExists,
                field: None,
            },
        ),
        (
            "a destination the caller may not send to",
            Input::Typed(Box::new(pb::SubmitRequest {
                destinations: vec!["YP002".into()],
                ..request("wrong-dest", native.clone())
            })),
            Expect {
                code: Code::InvalidArgument,
                field: Some("destinations[0]"),
            },
        ),
    ]
}

/// Submits one case and checks its answer: the expected status and field,
/// no patient name in the message, nothing stored, one audit entry of the
/// refusal, and the gateway still serving. Returns the report line.
async fn refused_and_audited(
    gw: &TestGateway,
    prison: &mut Handover,
    (name, input, expect): Case,
    family: &str,
) -> String {
    let digest = gw.store.content_digest().unwrap();
    let audited = gw.store.audit_entries().unwrap().len();
    let status = match input {
        Input::Typed(req) => prison.submit(*req).await.map(|_| ()),
        Input::Raw(bytes) => submit_raw(gw, bytes).await,
    }
    .expect_err(name);
    let fields = violations(&status);
    let report = format!(
        "{name}: {:?} {fields:?} {}",
        status.code(),
        status.message()
    );
    assert_eq!(status.code(), expect.code, "{name}: {status:?}");
    match expect.field {
        Some(field) => assert!(
            fields.iter().any(|f| f.starts_with(field)),
            "{name}: violations {fields:?} name {field}"
        ),
        None if expect.code == Code::InvalidArgument => {
            assert!(!fields.is_empty(), "{name}: a field violation")
        }
        None => {}
    }
    assert!(
        !status.message().contains(family) && !status.message().contains("Pryce"),
        "{name}: the error names the patient: {}",
        status.message()
    );
    assert_eq!(
        gw.store.content_digest().unwrap(),
        digest,
        "{name}: nothing stored"
    );
    let entries = gw.store.audit_entries().unwrap();
    assert_eq!(entries.len(), audited + 1, "{name}: one audit entry");
    let last = entries.last().unwrap();
    assert_eq!(last.actor, "urn:ods:YP001", "{name}");
    assert_eq!(last.action, "submit", "{name}");
    assert!(
        last.outcome.starts_with("refused"),
        "{name}: {}",
        last.outcome
    );
    // The gateway still serves.
    gw.client("YG001").await.pull(pull(1)).await.unwrap();
    report
}

#[tokio::test]
async fn a_refusal_that_cannot_be_audited_is_answered_unavailable() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    // Close the store under the running server: audit writes now fail.
    gw.store.close().await.unwrap();
    let status = prison
        .submit(with_nhs("zeros", "0000000000"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let _ = gw.stop().await;
}

/// One HTTP/2 request over mutual TLS as YP001, as no gRPC client would
/// send it: its `grpc-status` (trailers-only answer, or trailers) and
/// `grpc-message`.
async fn raw_http2(
    gw: &TestGateway,
    (content_type, encoding): (&str, Option<&str>),
    body: Vec<u8>,
) -> (String, String) {
    let (http, status, message) = raw_http2_answer(gw, (content_type, encoding), body).await;
    assert_eq!(http, 200, "a gRPC answer is HTTP 200");
    (status, message)
}

/// As [`raw_http2`], with the HTTP status: (HTTP status, `grpc-status`,
/// `grpc-message`), the last two empty when the answer is not gRPC.
async fn raw_http2_answer(
    gw: &TestGateway,
    (content_type, encoding): (&str, Option<&str>),
    body: Vec<u8>,
) -> (u16, String, String) {
    let config = tls_client_config(&gw.certs(), "YP001");
    let addr = gw.endpoint.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "{}/throughcare.v1.HandoverService/Track",
        gw.endpoint
    ))
    .header("content-type", content_type)
    .header("te", "trailers")
    .header("grpc-encoding", encoding.unwrap_or("identity"))
    .body(())
    .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(body.into(), true).unwrap();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
        .await
        .unwrap()
        .unwrap();
    // grpc-message is percent-encoded (gRPC over HTTP/2).
    let header = |m: &http::HeaderMap, k: &str| {
        m.get(k).map(|v| {
            let raw = v.as_bytes();
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match (raw[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
                    (b'%', Some(b)) => {
                        out.push(b);
                        i += 3;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let http = response.status().as_u16();
    if let Some(status) = header(response.headers(), "grpc-status") {
        let message = header(response.headers(), "grpc-message").unwrap_or_default();
        return (http, status, message);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    (
        http,
        header(&trailers, "grpc-status").unwrap_or_default(),
        header(&trailers, "grpc-message").unwrap_or_default(),
    )
}

/// A gRPC frame holding `message`.
fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// What is not a well-formed gRPC request is the caller's fault, never run
/// as a call, and never INTERNAL (which tells an integrator to retry and
/// pages operators): a content-type that is not gRPC is HTTP 415 (gRPC over
/// HTTP/2: an HTTP client must not read a gRPC error's 200 as success), a
/// broken gRPC body INVALID_ARGUMENT.
#[tokio::test]
async fn a_request_that_is_not_well_formed_grpc_is_invalid_argument_and_never_run() {
    use prost::Message;
    let gw = TestGateway::start().await;
    let track = pb::TrackRequest {
        handover: Some(pb::track_request::Handover::MessageId(
            "nothing-sent".into(),
        )),
    }
    .encode_to_vec();
    // As gRPC it runs: Track of an unknown message id is NOT_FOUND.
    let (status, _) = raw_http2(&gw, ("application/grpc", None), framed(&track)).await;
    assert_eq!(status, "5");
    let audited = gw.store.audit_entries().unwrap().len();
    for content_type in ["application/json", "text/plain", "application/grpcx"] {
        let (http, status, _) = raw_http2_answer(&gw, (content_type, None), framed(&track)).await;
        assert_eq!((http, &*status), (415, ""), "{content_type}");
    }
    let refusals = gw.store.audit_entries().unwrap();
    assert_eq!(refusals.len(), audited + 3, "each refusal is audited");
    assert!(refusals.last().unwrap().outcome.contains("415"));
    // A frame that declares more than it holds; a body with no frame at all.
    let mut cut = framed(&track);
    cut.truncate(cut.len() - 3);
    for (body, words) in [(cut, "ends inside"), (Vec::new(), "no gRPC message")] {
        let (status, message) = raw_http2(&gw, ("application/grpc", None), body).await;
        assert_eq!(status, "3", "{words}: {message}");
        assert!(message.contains(words), "{message}");
    }
    // A message flagged gzip that is not gzip.
    let mut garbled = framed(b"not gzip at all");
    garbled[0] = 1;
    let (status, message) = raw_http2(&gw, ("application/grpc", Some("gzip")), garbled).await;
    assert_eq!(status, "3", "{message}");
    assert!(message.contains("does not decompress"), "{message}");
    gw.stop().await;
}
