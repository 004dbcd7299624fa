//! Time as the store sees it: milliseconds since the Unix epoch, injectable so
//! tests can expire leases without sleeping; and the time retention acts on,
//! which a clock stepped forward cannot drag ahead (`docs/store.md`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now_ms(&self) -> i64;

    /// Milliseconds on a clock that only counts time passing (never set
    /// forward or back), from an arbitrary origin: how a step of the wall
    /// clock is told from time that really passed.
    fn monotonic_ms(&self) -> i64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn monotonic_ms(&self) -> i64 {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let origin = ORIGIN.get_or_init(Instant::now);
        i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock {
    wall: Arc<AtomicI64>,
    passed: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        Self {
            wall: Arc::new(AtomicI64::new(start_ms)),
            passed: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Lets `ms` pass: the wall clock moves with it (a negative `ms` sets it
    /// back, and the time passed stays as it was).
    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.passed.fetch_add(ms.max(0), Ordering::SeqCst);
    }

    /// Steps the wall clock by `ms` while no time passes, as a wrong time
    /// source or an operator setting the clock does.
    pub fn step(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> i64 {
        self.passed.load(Ordering::SeqCst)
    }
}

/// The time retention acts on. It is the wall clock, except that between two
/// passes of one process it may not run ahead of the time that really passed
/// (by more than 1%, far beyond any clock's drift; passes run back to back
/// through a backlog, so the allowance is in proportion, never a fixed
/// amount per pass): a clock
/// stepped forward, by a wrong time source or by hand, would otherwise bring
/// every cut-off forward with it and destroy payloads, tracking data and
/// audit entries before their time, irreversibly. A clock set back is
/// followed at once (retention only waits longer). Across a restart nothing
/// can tell a step from time the gateway was stopped, so the first pass of a
/// process takes the wall clock as it finds it.
#[derive(Debug, Default)]
pub struct RetentionClock {
    /// The last pass's retention time and the monotonic time it was taken.
    last: Option<(i64, i64)>,
}

/// A pass's time, see [`RetentionClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionTime {
    /// The time the pass acts on, ms since the Unix epoch.
    pub now_ms: i64,
    /// How far the wall clock is ahead of it, ms (0 when it is not).
    pub behind_wall_ms: i64,
}

impl RetentionClock {
    /// The time a pass starting now acts on.
    pub fn time(&mut self, clock: &dyn Clock) -> RetentionTime {
        let (wall, monotonic) = (clock.now_ms(), clock.monotonic_ms());
        let now_ms = match self.last {
            None => wall,
            Some((then, at)) => {
                let passed = monotonic.saturating_sub(at).max(0);
                let allowed = passed.saturating_add(passed / 100);
                wall.min(then.saturating_add(allowed))
            }
        };
        self.last = Some((now_ms, monotonic));
        RetentionTime {
            now_ms,
            behind_wall_ms: wall.saturating_sub(now_ms).max(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn retention_time_follows_time_passing_not_a_step_forward() {
        let clock = ManualClock::new(1_000 * DAY_MS);
        let mut retention = RetentionClock::default();
        assert_eq!(retention.time(&clock).now_ms, 1_000 * DAY_MS);
        // Time passing is followed, however much.
        clock.advance(40 * DAY_MS);
        let t = retention.time(&clock);
        assert_eq!((t.now_ms, t.behind_wall_ms), (1_040 * DAY_MS, 0));
        // A step forward is not: a minute later retention is a minute on
        // (and its allowance), the wall clock a year on.
        clock.step(365 * DAY_MS);
        clock.advance(60_000);
        let t = retention.time(&clock);
        assert_eq!(t.now_ms, 1_040 * DAY_MS + 60_000 + 600);
        assert_eq!(t.behind_wall_ms, 365 * DAY_MS - 600);
        // Passes back to back (a backlog) gain nothing beyond their 1%
        // (under a millisecond for a 20 ms pass).
        for _ in 0..1_000 {
            clock.advance(20);
            retention.time(&clock);
        }
        let t = retention.time(&clock);
        assert_eq!(t.behind_wall_ms, 365 * DAY_MS - 600);
        // It stays behind as time passes, gaining at most 1% on it.
        clock.advance(DAY_MS);
        let t = retention.time(&clock);
        assert!(t.behind_wall_ms > 364 * DAY_MS, "{t:?}");
        // A clock set back right is followed at once.
        clock.step(-365 * DAY_MS);
        let t = retention.time(&clock);
        assert_eq!(t.behind_wall_ms, 0);
        assert_eq!(t.now_ms, clock.now_ms());
        // A new process takes the wall clock as it finds it.
        clock.step(30 * DAY_MS);
        let t = RetentionClock::default().time(&clock);
        assert_eq!((t.now_ms, t.behind_wall_ms), (clock.now_ms(), 0));
    }
}
