//! OpenTelemetry traces over OTLP (off by default; docs/operations.md, Traces).
//!
//! `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry`
//! and leave in batches to an OTLP collector over gRPC (the exporter shares
//! our tonic). A call's W3C Trace Context (`traceparent`, `tracestate`) is
//! read from its gRPC metadata ([`crate::grpc::trace_context`]); a submit
//! stores its span's `traceparent` with the handover, so each delivery's pull,
//! ack and nack is a span in the submitter's trace, linked to the consumer's
//! call. One handover can be followed from the prison's submit to the GP's ack.
//!
//! # Invariants
//! - Off unless `telemetry.enabled`: no exporter, no layer, no span context
//!   stored, no `traceparent` answered.
//! - A malformed or absent `traceparent` is ignored: the call starts a new
//!   trace. Tracing never refuses or slows a call (a full export queue drops
//!   spans, never blocks).
//! - Span names and attributes are ids, ODS codes, method names and counts:
//!   never patient data (the same rule as the logs).
//! - Only the `traceparent` (ids and flags, checked by the W3C grammar) is
//!   stored, never the caller's free-form `tracestate`.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::ConfigError;

/// The `[telemetry]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export traces (off by default).
    pub enabled: bool,
    /// The OTLP/gRPC collector, `http://host:port` (plaintext: a collector
    /// on this host or in this pod, which forwards over TLS).
    pub otlp_endpoint: String,
    /// `service.name` of every span.
    pub service_name: String,
    /// Share of new traces recorded, 0.0 to 1.0; a call that continues a
    /// caller's trace follows the caller's sampled flag.
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            service_name: "throughcare".into(),
            sampling_ratio: 1.0,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("telemetry.{field}"),
        reason: reason.into(),
    }
}

impl TelemetryConfig {
    /// Checks every field (also when off, so a typo waits for no one).
    ///
    /// # Errors
    /// The first field that is wrong, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let uri: http::Uri = self
            .otlp_endpoint
            .parse()
            .map_err(|_| bad("otlp_endpoint", "is not a URL like http://127.0.0.1:4317"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "otlp_endpoint",
                "must be http://host:port: the collector is spoken to in plaintext, so run it on this host or in this pod",
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("otlp_endpoint", "names no host"));
        }
        let name = &self.service_name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(
                "service_name",
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(bad("sampling_ratio", "must be between 0.0 and 1.0"));
        }
        Ok(())
    }
}

/// The running trace pipeline: a batch exporter to the collector.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Traces {
    /// Starts the pipeline `config` describes, or `None` when it is off.
    /// Must run inside a Tokio runtime (the exporter's channel lives there).
    ///
    /// # Errors
    /// A field the exporter cannot use, named.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Self>, ConfigError> {
        if !config.enabled {
            return Ok(None);
        }
        config.validate()?;
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()
            .map_err(|e| bad("otlp_endpoint", e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("throughcare");
        Ok(Some(Self { provider, tracer }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_threads(false)
    }

    /// Exports what is still queued and stops. Blocks: call it from
    /// `spawn_blocking` while the runtime still runs.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces: the last export failed");
        }
    }
}

/// Reads W3C Trace Context headers from an HTTP (gRPC) header map.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` continue the trace a caller's `traceparent` header names; a
/// missing or malformed one leaves `span` the root of a new trace. Call it
/// before `span` is first entered.
pub fn continue_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of a stored `traceparent` (the submit's span) and
/// links it to the span current now (the consumer's call). Nothing happens
/// without a valid `traceparent`. Call it before `span` is first entered.
pub fn continue_stored(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return;
    }
    let current = tracing::Span::current().context();
    let _ = span.set_parent(cx);
    let linked = current.span().span_context().clone();
    span.add_link(linked);
}

/// The W3C trace context of `span` as headers (`traceparent`, and
/// `tracestate` when there is one); empty when traces are off.
pub fn headers_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
    }
    headers
}

/// The `traceparent` of the span current now, to store with a handover;
/// `None` when traces are off.
pub fn current_traceparent() -> Option<String> {
    headers_of(&tracing::Span::current()).remove("traceparent")
}

/// Whether the span current now is traced (traces are on): work done only
/// for a span (reading a stored context) is skipped otherwise.
pub fn tracing_now() -> bool {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .is_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_valid() {
        let c = TelemetryConfig::default();
        assert!(!c.enabled);
        c.validate().unwrap();
        assert!(Traces::start(&c).unwrap().is_none());
    }

    #[test]
    fn fields_are_checked_and_named() {
        for (change, field) in [
            (
                (|c: &mut TelemetryConfig| c.otlp_endpoint = "collector:4317".into())
                    as fn(&mut TelemetryConfig),
                "telemetry.otlp_endpoint",
            ),
            (
                |c| c.otlp_endpoint = "https://collector:4317".into(),
                "telemetry.otlp_endpoint",
            ),
            (
                |c| c.otlp_endpoint = "not a url".into(),
                "telemetry.otlp_endpoint",
            ),
            (|c| c.service_name = String::new(), "telemetry.service_name"),
            (|c| c.service_name = "a b".into(), "telemetry.service_name"),
            (|c| c.sampling_ratio = 1.5, "telemetry.sampling_ratio"),
            (|c| c.sampling_ratio = -0.1, "telemetry.sampling_ratio"),
            (|c| c.sampling_ratio = f64::NAN, "telemetry.sampling_ratio"),
        ] {
            let mut c = TelemetryConfig::default();
            change(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field, "{c:?}");
        }
    }

    #[test]
    fn without_a_layer_nothing_is_propagated() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let span = tracing::info_span!("call");
        continue_from_headers(&span, &headers);
        assert!(headers_of(&span).is_empty());
        assert_eq!(span.in_scope(current_traceparent), None);
        assert!(!span.in_scope(tracing_now));
    }

    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    /// Keeps every finished span.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    impl Recorder {
        fn named(&self, name: &str) -> SpanData {
            let spans = self.0.lock().unwrap();
            let found = spans.iter().find(|s| s.name == name);
            found.unwrap_or_else(|| panic!("no span {name}")).clone()
        }
    }

    /// Runs `f` with a subscriber whose spans end in the returned recorder.
    fn recorded(f: impl FnOnce()) -> Recorder {
        let recorder = Recorder::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(recorder.clone())
            .build();
        let traces = Traces {
            tracer: provider.tracer("test"),
            provider,
        };
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        tracing::subscriber::with_default(subscriber, f);
        traces.shutdown();
        recorder
    }

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn headers(traceparent: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().unwrap());
        headers
    }

    #[test]
    fn a_call_continues_its_callers_trace_and_answers_its_own_span() {
        let mut answered = HashMap::new();
        let recorder = recorded(|| {
            let span = tracing::info_span!("call");
            continue_from_headers(&span, &headers(PARENT));
            answered = span.in_scope(|| headers_of(&tracing::Span::current()));
        });
        let call = recorder.named("call");
        let trace = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
        assert_eq!(call.span_context.trace_id(), trace);
        assert_eq!(
            call.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert_eq!(
            answered["traceparent"],
            format!(
                "00-0af7651916cd43dd8448eb211c80319c-{}-01",
                call.span_context.span_id()
            )
        );
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "9990000018",
        ] {
            let recorder = recorded(|| {
                let span = tracing::info_span!("call");
                continue_from_headers(&span, &headers(bad));
                span.in_scope(|| assert!(tracing_now()));
            });
            let call = recorder.named("call");
            assert!(call.span_context.is_valid(), "{bad}");
            assert_eq!(call.parent_span_id, SpanId::INVALID, "{bad}");
            assert_ne!(
                call.span_context.trace_id().to_string(),
                "0af7651916cd43dd8448eb211c80319c",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_delivery_joins_the_submit_trace_linked_to_the_consumer_call() {
        let mut stored = None;
        let recorder = recorded(|| {
            let submit = tracing::info_span!("submit");
            continue_from_headers(&submit, &headers(PARENT));
            stored = submit.in_scope(current_traceparent);
            drop(submit);
            let pull = tracing::info_span!("pull");
            pull.in_scope(|| {
                let deliver = tracing::info_span!("deliver");
                continue_stored(&deliver, stored.as_deref());
                deliver.in_scope(|| {});
                let untraced = tracing::info_span!("untraced");
                continue_stored(&untraced, Some("garbage"));
                untraced.in_scope(|| {});
            });
        });
        let (submit, pull) = (recorder.named("submit"), recorder.named("pull"));
        let deliver = recorder.named("deliver");
        assert_eq!(
            deliver.span_context.trace_id(),
            submit.span_context.trace_id()
        );
        assert_eq!(deliver.parent_span_id, submit.span_context.span_id());
        assert_ne!(pull.span_context.trace_id(), submit.span_context.trace_id());
        let links: Vec<_> = deliver
            .links
            .iter()
            .map(|l| l.span_context.clone())
            .collect();
        assert_eq!(links, vec![pull.span_context.clone()]);
        // A stored context that does not parse leaves the span in the call's trace.
        let untraced = recorder.named("untraced");
        assert_eq!(
            untraced.span_context.trace_id(),
            pull.span_context.trace_id()
        );
    }
}
