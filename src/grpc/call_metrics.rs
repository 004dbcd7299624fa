//! Per-method call metrics for every service on the mutual-TLS listener: a
//! tower layer around the whole gRPC stack (outside the rate limit and load
//! shedding, so refused calls count too) that feeds
//! `throughcare_grpc_server_handled_total` and
//! `throughcare_grpc_server_handling_seconds` ([`Metrics::grpc_handled`]).
//!
//! The gRPC status of a call is in the response headers when the call ended
//! before any message (a "trailers-only" response, as every refusal is), and
//! otherwise in the trailers after the last message: the response body is
//! wrapped to read them. A body dropped before its trailers (the client went
//! away) counts as `Cancelled`.
//!
//! Labels come from [`served_methods`], a table built once from the services'
//! descriptors: a request path outside it is `unknown`/`unknown`, so a caller
//! cannot mint label values.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use prost::Message;

use crate::operator::metrics::Metrics;

/// A method's labels: (`grpc_service`, `grpc_method`).
pub type MethodLabels = (&'static str, &'static str);

const UNKNOWN: MethodLabels = ("unknown", "unknown");

fn table() -> &'static (Vec<MethodLabels>, HashMap<String, MethodLabels>) {
    static TABLE: OnceLock<(Vec<MethodLabels>, HashMap<String, MethodLabels>)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let sets: [&[u8]; 4] = [
            crate::grpc::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = Vec::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package().to_owned();
                for service in file.service {
                    let full = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    // Leaked once per process: a few dozen short names.
                    let full: &'static str = Box::leak(full.into_boxed_str());
                    for method in &service.method {
                        let name: &'static str =
                            Box::leak(method.name().to_owned().into_boxed_str());
                        methods.push((full, name));
                    }
                }
            }
        }
        methods.sort_unstable();
        methods.dedup();
        let by_path = methods
            .iter()
            .map(|&(s, m)| (format!("/{s}/{m}"), (s, m)))
            .collect();
        (methods, by_path)
    })
}

/// Every method the gateway serves (its own services, health, reflection).
pub fn served_methods() -> &'static [MethodLabels] {
    &table().0
}

/// The labels of a request path (`/package.Service/Method`).
pub(crate) fn labels_of(path: &str) -> MethodLabels {
    table().1.get(path).copied().unwrap_or(UNKNOWN)
}

/// The name of a gRPC status code as the labels carry it (`OK`,
/// `InvalidArgument`, ...: the names of grpc-go and go-grpc-prometheus).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The `grpc-status` in a header map, if there is one.
fn status_in(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

/// One call being timed: recorded exactly once.
struct Call {
    metrics: Arc<Metrics>,
    labels: MethodLabels,
    started: Instant,
}

impl Call {
    fn finish(self, code: tonic::Code) {
        let elapsed: Duration = self.started.elapsed();
        self.metrics
            .grpc_handled(self.labels, code_name(code), elapsed);
    }
}

/// Wraps the gRPC stack with [`CallMetrics`].
#[derive(Clone)]
pub struct CallMetricsLayer {
    metrics: Arc<Metrics>,
}

impl CallMetricsLayer {
    /// Calls are counted and timed into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Counts and times each call (see the module docs).
#[derive(Clone)]
pub struct CallMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CallMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            metrics: self.metrics.clone(),
            labels: labels_of(request.uri().path()),
            started: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    let call = match status_in(response.headers()) {
                        Some(code) => {
                            call.finish(code);
                            None
                        }
                        None => Some(call),
                    };
                    Ok(response.map(|inner| MeteredBody { inner, call }))
                }
                Err(e) => {
                    call.finish(tonic::Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's status from the trailers.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| status_in(t).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(_))) => Some(tonic::Code::Internal),
            // Ended without trailers: no status was ever sent.
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_served_methods_and_nothing_else() {
        assert_eq!(
            labels_of("/throughcare.v1.HandoverService/Submit"),
            ("throughcare.v1.HandoverService", "Submit")
        );
        assert_eq!(
            labels_of("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        for path in ["/throughcare.v1.HandoverService/9990000018", "/", "/x/y/z"] {
            assert_eq!(labels_of(path), UNKNOWN, "{path}");
        }
        let methods = served_methods();
        assert!(
            methods.contains(&("throughcare.v1.OperatorService", "ListMailboxes"))
                || methods
                    .iter()
                    .any(|m| m.0 == "throughcare.v1.OperatorService")
        );
        assert!(methods.contains(&(
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo"
        )));
    }
}
