//! Limits on calls, applied to every service before any handler runs: a
//! token bucket per certificate identity (`RESOURCE_EXHAUSTED` with a
//! `RetryInfo` delay) and a gateway-wide in-flight limit that sheds load
//! (`UNAVAILABLE`). The HTTP/2 limits (streams per connection, header list
//! size, message size) are set on the server in `app`; connections per
//! identity in `tls`.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::{BoxError, Layer, Service};

use crate::tls::{ConnInfo, PeerIdentity};

/// Calls refused before any handler (rate limit, load shed), counted per
/// actor and reason and written to the audit trail as one summary entry per
/// actor and reason a second: every refusal is recorded, and a flood cannot
/// turn into a flood of audit writes.
#[derive(Clone, Default)]
pub struct RefusalTally {
    counts: Arc<std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>>>,
}

impl RefusalTally {
    fn add(&self, actor: String, reason: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((actor, reason))
            .or_default() += 1;
    }

    /// Writes what was counted since the last call to the audit trail.
    pub async fn flush(&self, store: &crate::store::Store) {
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|e| e.into_inner()));
        for ((actor, reason), n) in counts {
            let event = crate::audit::AuditEvent {
                actor,
                action: "call",
                outcome: format!("refused: {n} calls: {reason}"),
                ..crate::audit::AuditEvent::default()
            };
            if let Err(e) = store.record(event).await {
                tracing::error!(error = %e, "refused calls could not be audited");
            }
        }
    }
}

/// Calls in flight per identity, and how many one identity may have.
#[derive(Clone)]
struct InFlight {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<PeerIdentity, usize>>>,
    per_identity: usize,
}

/// One call's place in [`InFlight`], given back when its answer ends.
struct InFlightCall {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<PeerIdentity, usize>>>,
    identity: PeerIdentity,
}

impl InFlight {
    /// A place for one more call of `identity`, if it has one left.
    fn enter(&self, identity: &PeerIdentity) -> Option<InFlightCall> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(identity.clone()).or_default();
        if *n >= self.per_identity {
            return None;
        }
        *n += 1;
        Some(InFlightCall {
            counts: self.counts.clone(),
            identity: identity.clone(),
        })
    }
}

impl Drop for InFlightCall {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

/// A token bucket per identity, and a share of the gateway's in-flight
/// limit per identity: one certificate holding long polls open (each holds
/// its place while it waits) cannot take every place and shed everyone
/// else's calls.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DefaultKeyedRateLimiter<PeerIdentity>>,
    in_flight: InFlight,
    tally: RefusalTally,
}

impl RateLimitLayer {
    /// `per_second` sustained calls per identity, `burst` at once, and at
    /// most `in_flight_per_identity` in flight at once.
    pub fn new(
        per_second: u32,
        burst: u32,
        in_flight_per_identity: usize,
        tally: RefusalTally,
    ) -> Self {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(one));
        Self {
            limiter: Arc::new(RateLimiter::keyed(quota)),
            in_flight: InFlight {
                counts: Arc::default(),
                per_identity: in_flight_per_identity.max(1),
            },
            tally,
        }
    }

    /// As `limits` says: its rate and burst, and a quarter of the
    /// gateway's in-flight limit per certificate (docs/edge-limits.md).
    pub fn of(limits: &crate::config::LimitsConfig, tally: RefusalTally) -> Self {
        Self::new(
            limits.requests_per_second,
            limits.request_burst,
            limits.max_in_flight / 4,
            tally,
        )
    }

    /// Forgets identities whose buckets are full again (bounded memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            in_flight: self.in_flight.clone(),
            tally: self.tally.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<DefaultKeyedRateLimiter<PeerIdentity>>,
    in_flight: InFlight,
    tally: RefusalTally,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for RateLimit<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(info) = req.extensions().get::<ConnInfo>()
            && let Err(not_until) = self.limiter.check_key(&info.identity)
        {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            self.tally.add(
                info.identity.to_string(),
                "over the per-identity rate limit",
            );
            tracing::warn!(
                caller = %info.identity,
                retry_after_ms = wait.as_millis() as u64,
                "call refused: rate limit"
            );
            let status = super::error::status(
                Code::ResourceExhausted,
                "rate limit for this certificate exceeded; retry after the RetryInfo delay".into(),
                "RATE_LIMITED",
                Some(wait),
                Vec::new(),
            );
            return Box::pin(async move { Err(BoxError::from(status)) });
        }
        let place = match req.extensions().get::<ConnInfo>() {
            Some(info) => match self.in_flight.enter(&info.identity) {
                Some(place) => Some(place),
                None => {
                    self.tally.add(
                        info.identity.to_string(),
                        "over the per-identity share of calls in flight",
                    );
                    tracing::warn!(
                        caller = %info.identity,
                        limit = self.in_flight.per_identity,
                        "call refused: too many calls in flight for this certificate"
                    );
                    let status = super::error::status(
                        Code::ResourceExhausted,
                        format!(
                            "this certificate has {} calls in flight, its share of the gateway's; \
                             retry after one ends",
                            self.in_flight.per_identity
                        ),
                        "TOO_MANY_IN_FLIGHT",
                        Some(std::time::Duration::from_secs(1)),
                        Vec::new(),
                    );
                    return Box::pin(async move { Err(BoxError::from(status)) });
                }
            },
            None => None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let answer = fut.await.map_err(Into::into);
            drop(place);
            answer
        })
    }
}

/// Turns tower's load-shed error into `UNAVAILABLE` (tonic would say
/// `RESOURCE_EXHAUSTED`, which tells a client its own usage is at fault).
pub fn shed_to_unavailable(tally: RefusalTally) -> impl Fn(BoxError) -> BoxError + Clone {
    move |e| shed(e, &tally)
}

fn shed(e: BoxError, tally: &RefusalTally) -> BoxError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        tracing::warn!("call shed: the gateway is at its in-flight limit");
        tally.add("peer:many".into(), "shed at the gateway's in-flight limit");
        BoxError::from(super::error::status(
            Code::Unavailable,
            "the gateway is overloaded; retry with back-off".into(),
            "OVERLOADED",
            Some(std::time::Duration::from_secs(1)),
            Vec::new(),
        ))
    } else {
        e
    }
}

/// Health checks (`grpc.health.v1.Health`) go around `L`, the gateway-wide
/// in-flight limit and its load shedding: a gateway at its limit is busy, not
/// unhealthy, and a probe that fails then gets a working gateway restarted at
/// its busiest. Every other call passes through `L`. The per-identity rate
/// limit and the decode refusals stay in front of both.
#[derive(Clone)]
pub struct AroundForHealthLayer<L> {
    limits: L,
}

impl<L> AroundForHealthLayer<L> {
    /// Health checks bypass `limits`.
    pub fn new(limits: L) -> Self {
        Self { limits }
    }
}

impl<L: Layer<S>, S: Clone> Layer<S> for AroundForHealthLayer<L> {
    type Service = AroundForHealth<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AroundForHealth {
            limited: self.limits.layer(inner.clone()),
            direct: inner,
        }
    }
}

/// See [`AroundForHealthLayer`].
#[derive(Clone)]
pub struct AroundForHealth<L, S> {
    limited: L,
    direct: S,
}

const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

impl<L, S, B, R> Service<http::Request<B>> for AroundForHealth<L, S>
where
    L: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    L::Error: Into<BoxError>,
    L::Future: Send + 'static,
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = BoxFuture<Result<http::Response<R>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the limited path is asked per call (`oneshot`), so a
        // health check never holds an in-flight permit it does not use.
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with(HEALTH_PATH) {
            let fut = self.direct.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        }
        let limited = self.limited.clone();
        Box::pin(async move {
            tower::ServiceExt::oneshot(limited, req)
                .await
                .map_err(Into::into)
        })
    }
}

/// Turns tonic's answer to an undecodable request (`INTERNAL`, "failed to
/// decode Protobuf message", e.g. invalid UTF-8 in a string field) into
/// `INVALID_ARGUMENT` with a field violation, and a message over the size
/// limit (tonic's `OUT_OF_RANGE`) into `RESOURCE_EXHAUSTED`; each is audited
/// like every other refusal (fail closed: `UNAVAILABLE` when the audit write
/// fails). Decoding happens before any handler, so `traced!` never sees these.
#[derive(Clone)]
pub struct DecodeRefusalLayer {
    store: crate::store::Store,
}

impl DecodeRefusalLayer {
    /// Audits into `store`.
    pub fn new(store: crate::store::Store) -> Self {
        Self { store }
    }
}

impl<S> Layer<S> for DecodeRefusalLayer {
    type Service = DecodeRefusal<S>;

    fn layer(&self, inner: S) -> DecodeRefusal<S> {
        DecodeRefusal {
            inner,
            store: self.store.clone(),
        }
    }
}

/// See [`DecodeRefusalLayer`].
#[derive(Clone)]
pub struct DecodeRefusal<S> {
    inner: S,
    store: crate::store::Store,
}

const DECODE_FAILURE: &str = "failed to decode Protobuf message";

impl<S, B, R> Service<http::Request<B>> for DecodeRefusal<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = BoxFuture<Result<http::Response<R>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let actor = req
            .extensions()
            .get::<ConnInfo>()
            .map_or_else(|| "unknown".to_owned(), |i| i.identity.to_string());
        let action = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(32)
            .collect::<String>()
            .to_ascii_lowercase();
        let store = self.store.clone();
        if !is_grpc(&req) {
            // Not a gRPC request (gRPC over HTTP/2: `application/grpc`,
            // optionally `+proto` or `;…`): never executed as one, and
            // answered in plain HTTP, 415, as the protocol asks, so that an
            // HTTP client cannot read a gRPC error's 200 as success. A
            // refusal that cannot be audited is 503.
            let outcome = "refused: 415: not a gRPC content-type".to_owned();
            return Box::pin(async move {
                let status = match record(&store, (actor, &action), outcome).await {
                    Ok(()) => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Err(()) => http::StatusCode::SERVICE_UNAVAILABLE,
                };
                tracing::info!(%status, "refused before any handler: not gRPC");
                let mut response = http::Response::new(R::default());
                *response.status_mut() = status;
                response.headers_mut().insert(
                    http::header::ACCEPT,
                    http::HeaderValue::from_static("application/grpc"),
                );
                Ok(response)
            });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await.map_err(Into::into)?;
            let Some(status) = Status::from_header_map(response.headers()) else {
                return Ok(response);
            };
            let Some((outcome, answer)) = undecodable(&status)
                .or_else(|| incomplete(&status))
                .or_else(|| undecompressable(&status))
                .or_else(|| over_limit(&status))
                .or_else(|| unknown_method(&status))
            else {
                return Ok(response);
            };
            Err(audited(&store, (actor, &action), outcome, answer).await)
        })
    }
}

/// Audits a refusal made before any handler and returns the answer: the
/// refusal itself, or `UNAVAILABLE` when the audit write fails (fail
/// closed).
async fn audited(
    store: &crate::store::Store,
    call: (String, &str),
    outcome: String,
    answer: Status,
) -> BoxError {
    if record(store, call, outcome).await.is_err() {
        return BoxError::from(Status::from(crate::handover::Error::Unrecorded));
    }
    tracing::info!(code = ?answer.code(), "refused before any handler");
    BoxError::from(answer)
}

/// Audits a refusal made before any handler; `Err` when the audit write
/// failed (logged), so the caller answers "unavailable" (fail closed).
async fn record(
    store: &crate::store::Store,
    (actor, action): (String, &str),
    outcome: String,
) -> Result<(), ()> {
    let event = crate::audit::AuditEvent {
        actor,
        action: static_action(action),
        outcome,
        ..crate::audit::AuditEvent::default()
    };
    store.record(event).await.map_err(|e| {
        tracing::error!(error = %e, "a refusal could not be audited; answering unavailable");
    })
}

/// Whether `req` says it is gRPC: `application/grpc`, `application/grpc+…`
/// or `application/grpc;…` (gRPC over HTTP/2, "Content-Type").
fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// tonic's `INTERNAL` for a request prost cannot decode, as the audit
/// outcome and the `INVALID_ARGUMENT` answer with a field violation.
fn undecodable(status: &Status) -> Option<(String, Status)> {
    if status.code() != Code::Internal || !status.message().starts_with(DECODE_FAILURE) {
        return None;
    }
    // prost names the field path and the fault, never the value.
    let detail = status.message()[DECODE_FAILURE.len()..]
        .trim_start_matches(':')
        .trim()
        .chars()
        .take(200)
        .collect::<String>();
    let field = detail
        .split(": ")
        .next()
        .filter(|f| f.contains('.'))
        .unwrap_or("request")
        .to_owned();
    Some((
        format!("refused: InvalidArgument: undecodable request: {detail}"),
        super::error::status(
            Code::InvalidArgument,
            format!("invalid request: not a valid protobuf message: {detail}"),
            "INVALID_ARGUMENT",
            None,
            vec![tonic_types::FieldViolation::new(
                field,
                format!("not a valid protobuf message: {detail}"),
            )],
        ),
    ))
}

/// tonic's `INTERNAL` for a request body that ends inside a message or
/// holds none: the caller's fault, so `INVALID_ARGUMENT` (an `INTERNAL`
/// would tell the integrator to retry and page our operators).
fn incomplete(status: &Status) -> Option<(String, Status)> {
    let why = match status.message() {
        "Unexpected EOF decoding stream." => "the request body ends inside a gRPC message",
        "Missing request message." => "the request body holds no gRPC message",
        _ => return None,
    };
    (status.code() == Code::Internal).then(|| invalid_request(why))
}

/// The audit outcome and the `INVALID_ARGUMENT` answer for a request that
/// is wrong as a whole (`request` is the field named).
fn invalid_request(why: &str) -> (String, Status) {
    (
        format!("refused: InvalidArgument: {why}"),
        super::error::status(
            Code::InvalidArgument,
            format!("invalid request: {why}"),
            "INVALID_ARGUMENT",
            None,
            vec![tonic_types::FieldViolation::new("request", why)],
        ),
    )
}

/// tonic's `INTERNAL` for a compressed request (gzip, deflate) that does
/// not decompress, as the audit outcome and the `INVALID_ARGUMENT` answer.
fn undecompressable(status: &Status) -> Option<(String, Status)> {
    if status.code() != Code::Internal || !status.message().starts_with(DECOMPRESS_FAILURE) {
        return None;
    }
    Some(invalid_request(
        "the compressed message does not decompress",
    ))
}

/// tonic's bare `UNIMPLEMENTED` (no message, no details) for a method no
/// service here has, as the audit outcome and the contract's answer with
/// its `ErrorInfo`. The path is not echoed: the caller chose it.
fn unknown_method(status: &Status) -> Option<(String, Status)> {
    if status.code() != Code::Unimplemented || !status.message().is_empty() {
        return None;
    }
    let why = "no such method here: see the throughcare.v1 services (gRPC reflection lists them)";
    Some((
        format!("refused: Unimplemented: {why}"),
        super::error::status(
            Code::Unimplemented,
            why.to_owned(),
            "UNIMPLEMENTED",
            None,
            vec![],
        ),
    ))
}

/// What tonic says of a compressed message it cannot decompress.
const DECOMPRESS_FAILURE: &str = "Error decompressing:";

/// What tonic says of a message over `max_decoding_message_size`.
const OVER_LIMIT: &str = "decoded message length too large";

/// What tonic says of a compressed message that is over the limit once
/// decompressed (it stops decompressing there: no bomb gets through).
const OVER_LIMIT_DECOMPRESSED: &str = "exceeded while decompressing";

/// tonic's `OUT_OF_RANGE` for a message over the size limit, as the audit
/// outcome and the `RESOURCE_EXHAUSTED` answer gRPC's status guide names
/// for it, with the sizes (never content) in a field violation.
fn over_limit(status: &Status) -> Option<(String, Status)> {
    let plain = status.code() == Code::OutOfRange && status.message().contains(OVER_LIMIT);
    let decompressed = status.code() == Code::ResourceExhausted
        && status.message().contains(OVER_LIMIT_DECOMPRESSED);
    if !plain && !decompressed {
        return None;
    }
    let numbers: Vec<&str> = status
        .message()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    let why = match numbers[..] {
        [found, limit] => format!("{found} bytes is over the {limit}-byte message limit"),
        [limit] if decompressed => {
            format!("over the {limit}-byte message limit once decompressed")
        }
        _ => "over the message size limit".to_owned(),
    };
    Some((
        format!("refused: ResourceExhausted: {why}"),
        // No RetryInfo: the same message is as large next time.
        super::error::status(
            Code::ResourceExhausted,
            format!("the request message is too large: {why}"),
            "MESSAGE_TOO_LARGE",
            None,
            vec![tonic_types::FieldViolation::new("request", why)],
        ),
    ))
}

/// Audit actions are `&'static str`; the gRPC method names we serve.
fn static_action(method: &str) -> &'static str {
    match method {
        "submit" => "submit",
        "pull" => "pull",
        "ack" => "ack",
        "ackbatch" => "ack_batch",
        "nack" => "nack",
        "track" => "track",
        _ => "call",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_decompression_refusals_become_the_contracts_codes() {
        // As tonic words them (tonic 0.14, codec/decode.rs).
        let bomb = Status::resource_exhausted(
            "Error decompressing: size limit, of 4259840 bytes, exceeded while decompressing message",
        );
        let (outcome, answer) = over_limit(&bomb).expect("over the limit");
        assert_eq!(answer.code(), Code::ResourceExhausted);
        assert!(
            outcome.contains("4259840-byte message limit once decompressed"),
            "{outcome}"
        );
        let corrupt =
            Status::internal("Error decompressing: invalid gzip header, while sending request");
        let (outcome, answer) = undecompressable(&corrupt).expect("not decompressible");
        assert_eq!(answer.code(), Code::InvalidArgument);
        assert!(outcome.starts_with("refused: InvalidArgument"), "{outcome}");
        let (outcome, answer) = unknown_method(&Status::unimplemented("")).expect("unknown");
        assert_eq!(answer.code(), Code::Unimplemented);
        assert!(outcome.starts_with("refused: Unimplemented"), "{outcome}");
        assert!(unknown_method(&Status::unimplemented("a handler's own words")).is_none());
        // Other refusals are left as they are.
        assert!(undecompressable(&Status::internal("something else")).is_none());
        assert!(over_limit(&Status::resource_exhausted("rate limited")).is_none());
    }
}
