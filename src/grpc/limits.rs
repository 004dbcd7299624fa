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
use tonic_types::{ErrorDetails, StatusExt};
use tower::{BoxError, Layer, Service};

use crate::tls::{ConnInfo, PeerIdentity};

/// A token bucket per identity.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DefaultKeyedRateLimiter<PeerIdentity>>,
}

impl RateLimitLayer {
    /// `per_second` sustained calls per identity, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(one));
        Self {
            limiter: Arc::new(RateLimiter::keyed(quota)),
        }
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
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<DefaultKeyedRateLimiter<PeerIdentity>>,
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
            tracing::warn!(
                caller = %info.identity,
                retry_after_ms = wait.as_millis() as u64,
                "call refused: rate limit"
            );
            let status = Status::with_error_details(
                Code::ResourceExhausted,
                "rate limit for this certificate exceeded; retry after the RetryInfo delay",
                ErrorDetails::with_retry_info(Some(wait)),
            );
            return Box::pin(async move { Err(BoxError::from(status)) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// Turns tower's load-shed error into `UNAVAILABLE` (tonic would say
/// `RESOURCE_EXHAUSTED`, which tells a client its own usage is at fault).
pub fn shed_to_unavailable(e: BoxError) -> BoxError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        tracing::warn!("call shed: the gateway is at its in-flight limit");
        BoxError::from(Status::unavailable(
            "the gateway is overloaded; retry with back-off",
        ))
    } else {
        e
    }
}
