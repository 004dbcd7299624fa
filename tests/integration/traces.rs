//! Traces (docs/operations.md, Traces) through the real binary and an OTLP
//! receiver in this process: without `[telemetry]` nothing is exported, even
//! with the standard OTLP variables pointing at the receiver; a malformed
//! `traceparent` is ignored, never an error. `tests/python/test_traces.py`
//! follows one handover from submit to ack through an independent receiver.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use throughcare::grpc::pb;
use throughcare::grpc::pb::handover_service_client::HandoverServiceClient;
use tonic::transport::Channel;

use crate::support::{BIN, Server, TestGateway, pull, release};

/// An OTLP TraceService that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on 127.0.0.1; returns the receiver and its `http://` endpoint.
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-00f067aa0ba902b7-01")
}

/// A submit carrying `traceparent` in its metadata.
fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

/// The `traceparent` a call answered with, if any.
fn answered<T>(response: &tonic::Response<T>) -> Option<String> {
    response
        .metadata()
        .get("traceparent")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The real binary with `env`, and a client as `name` once it serves.
async fn start_gateway(dir: &Path, env: &[(&str, &str)]) -> (Server, String) {
    let port = crate::support::free_port();
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (server, format!("https://127.0.0.1:{port}"))
}

async fn client(endpoint: &str, dir: &Path, name: &str) -> HandoverServiceClient<Channel> {
    for _ in 0..300 {
        if let Ok(c) = throughcare::cli::client::handover(endpoint, &dir.join("certs"), name).await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not start");
}

/// SIGTERM (the gateway exports what is queued), then waits for the exit.
async fn stop(mut server: Server) {
    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for _ in 0..400 {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not stop");
}

/// A traced submit, pull and ack through a gateway started with `env`;
/// returns what the receiver got and the submit's answered `traceparent`.
async fn handover_with(env: &[(&str, &str)], receiver: &Receiver) -> (Vec<Span>, Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (server, endpoint) = start_gateway(dir.path(), env).await;
    let mut prison = client(&endpoint, dir.path(), "YP001").await;
    let mut gp = client(&endpoint, dir.path(), "YG001").await;
    let submitted = prison
        .submit(traced(
            release("trace-1", 1, &["YG001"], "traces"),
            &traceparent(TRACE_ID),
        ))
        .await
        .unwrap();
    let deliveries = gp.pull(pull(5)).await.unwrap().into_inner().deliveries;
    assert_eq!(deliveries.len(), 1);
    gp.ack(pb::AckRequest {
        delivery_id: deliveries[0].delivery_id,
        attempt: deliveries[0].attempt,
    })
    .await
    .unwrap();
    stop(server).await;
    // The exporter sends at shutdown; give a late batch a moment to land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (receiver.spans(), answered(&submitted))
}

#[tokio::test]
async fn without_telemetry_nothing_is_exported() {
    // The control: with `[telemetry]` on, the same calls reach the receiver.
    let (receiver, otlp) = Receiver::start().await;
    let (spans, answer) = handover_with(
        &[
            ("THROUGHCARE_TELEMETRY_ENABLED", "true"),
            ("THROUGHCARE_TELEMETRY_OTLP_ENDPOINT", &otlp),
        ],
        &receiver,
    )
    .await;
    let in_trace = |s: &&Span| hex(&s.trace_id) == TRACE_ID;
    assert!(spans.iter().filter(in_trace).count() >= 4, "{spans:?}");
    assert!(answer.unwrap().contains(TRACE_ID));

    // Off (the default), even with the standard variables naming a receiver.
    let (receiver, otlp) = Receiver::start().await;
    let (spans, answer) = handover_with(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &otlp),
        ],
        &receiver,
    )
    .await;
    assert!(spans.is_empty(), "{spans:?}");
    assert_eq!(
        answer, None,
        "no traceparent is answered when traces are off"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const MALFORMED: [&str; 6] = [
    "garbage",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
];

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_not_an_error() {
    // Traces on: each call starts a trace of its own.
    let (receiver, otlp) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("THROUGHCARE_TELEMETRY_ENABLED", "true"),
        ("THROUGHCARE_TELEMETRY_OTLP_ENDPOINT", otlp.as_str()),
    ];
    let (server, endpoint) = start_gateway(dir.path(), &env).await;
    let mut prison = client(&endpoint, dir.path(), "YP001").await;
    let mut traces = std::collections::BTreeSet::new();
    for (i, bad) in (1u32..).zip(MALFORMED) {
        let message = release(&format!("bad-trace-{i}"), i, &["YG001"], "traces");
        let response = prison.submit(traced(message, bad)).await.unwrap();
        let answer = answered(&response).expect("a traceparent is answered");
        let trace_id = answer.split('-').nth(1).unwrap().to_owned();
        assert_eq!(trace_id.len(), 32, "{answer}");
        assert_ne!(trace_id, TRACE_ID, "{bad} was followed");
        assert_ne!(trace_id, "0".repeat(32), "{answer}");
        traces.insert(trace_id);
    }
    assert_eq!(traces.len(), MALFORMED.len(), "each call is a new trace");
    stop(server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let roots: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "throughcare.v1.HandoverService/Submit")
        .collect();
    assert_eq!(roots.len(), MALFORMED.len());
    assert!(
        roots.iter().all(|s| s.parent_span_id.is_empty()),
        "{roots:?}"
    );

    // Traces off (in process): the same submits succeed and answer nothing.
    let gateway = TestGateway::start().await;
    let mut prison = gateway.client("YP001").await;
    for (i, bad) in (1u32..).zip(MALFORMED) {
        let message = release(&format!("off-trace-{i}"), i, &["YG001"], "traces");
        let response = prison.submit(traced(message, bad)).await.unwrap();
        assert_eq!(answered(&response), None);
    }
}

#[tokio::test]
async fn a_bad_telemetry_section_is_refused_before_a_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let out = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .env("THROUGHCARE_TELEMETRY_ENABLED", "true")
        .env(
            "THROUGHCARE_TELEMETRY_OTLP_ENDPOINT",
            "https://collector:4317",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("telemetry.otlp_endpoint"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing was opened: {stderr}"
    );
}
