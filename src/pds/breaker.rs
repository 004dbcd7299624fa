//! The circuit breaker: after `threshold` consecutive failed lookups PDS is
//! left alone for `open_ms`; then one trial lookup decides (success closes
//! it, failure opens it again). Lookups run in the background, so an open
//! breaker delays routing, never a submit.

use std::sync::Mutex;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Lookups go ahead.
    Closed,
    /// Lookups are refused until this time (ms).
    Open {
        /// When a trial is allowed.
        until_ms: i64,
    },
    /// One trial lookup is allowed.
    HalfOpen,
}

/// Counts consecutive failures; shared by the lookup task and its observers.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_ms: i64,
    inner: Mutex<(u32, BreakerState)>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_ms: i64) -> Self {
        Self {
            threshold: threshold.max(1),
            open_ms,
            inner: Mutex::new((0, BreakerState::Closed)),
        }
    }

    /// Whether a lookup may go ahead at `now_ms` (an open breaker whose time
    /// is up lets one trial through).
    pub fn allow(&self, now_ms: i64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.1 {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                inner.1 = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } => false,
        }
    }

    /// A lookup got an answer from PDS.
    pub fn success(&self) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = (0, BreakerState::Closed);
    }

    /// A lookup failed (unreachable, time-out, 429 or 5xx after retries).
    /// Returns true when this failure opened a closed breaker (the alert;
    /// a failed trial opens it again quietly).
    pub fn failure(&self, now_ms: i64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 = inner.0.saturating_add(1);
        let opens = inner.1 == BreakerState::HalfOpen || inner.0 >= self.threshold;
        let was_closed = inner.1 == BreakerState::Closed;
        if opens {
            inner.1 = BreakerState::Open {
                until_ms: now_ms.saturating_add(self.open_ms),
            };
        }
        opens && was_closed
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_one_trial_decides() {
        let b = CircuitBreaker::new(3, 1_000);
        assert!(!b.failure(0));
        assert!(!b.failure(0));
        assert!(b.allow(0));
        assert!(b.failure(0), "the third failure opens it");
        assert!(!b.allow(999));
        assert!(b.allow(1_000), "one trial after the open period");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.failure(1_000), "a failed trial opens it again, quietly");
        assert!(!b.allow(1_500));
        assert!(b.allow(2_000));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
