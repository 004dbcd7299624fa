//! W3C Trace Context on the gRPC listener (when traces are on): a tower
//! layer that opens one server span per call to our own services, continuing
//! the caller's `traceparent` (a malformed one starts a new trace), and
//! answers the span's `traceparent` in the response metadata. The handlers'
//! spans nest inside it; see [`crate::telemetry`].
//!
//! The span is named after the method from the table of served methods
//! ([`super::call_metrics`]), never the raw path: a caller cannot mint span
//! names. Health checks and reflection are not traced.

use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument;
use tracing::field::Empty;

use super::call_metrics::labels_of;

/// Wraps the gRPC stack with [`TraceContext`].
#[derive(Clone, Copy, Default)]
pub struct TraceContextLayer {
    enabled: bool,
}

impl TraceContextLayer {
    /// Calls are traced when `enabled` (`telemetry.enabled`); otherwise
    /// they pass through untouched.
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContext {
            inner,
            enabled: self.enabled,
        }
    }
}

/// One server span per call (see the module docs).
#[derive(Clone)]
pub struct TraceContext<S> {
    inner: S,
    enabled: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The server span of a call to `path`, or `None` for a path that is not
/// one of our own methods.
fn server_span(path: &str) -> Option<tracing::Span> {
    let (service, method) = labels_of(path);
    if !service.starts_with("throughcare.") {
        return None;
    }
    Some(tracing::info_span!(
        "grpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    ))
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TraceContext<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let span = self
            .enabled
            .then(|| server_span(request.uri().path()))
            .flatten();
        let Some(span) = span else {
            return Box::pin(self.inner.call(request));
        };
        crate::telemetry::continue_from_headers(&span, request.headers());
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let mut response = response.await?;
                let span = tracing::Span::current();
                // Refusals end before any message: their status is in the headers.
                if let Some(code) = response.headers().get("grpc-status") {
                    let code = tonic::Code::from_bytes(code.as_bytes());
                    span.record("rpc.grpc.status_code", code as i32);
                    if code != tonic::Code::Ok {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                for (name, value) in crate::telemetry::headers_of(&span) {
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(name.as_bytes()),
                        http::HeaderValue::from_str(&value),
                    ) {
                        response.headers_mut().insert(name, value);
                    }
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}
