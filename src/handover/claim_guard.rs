//! Failed claims are limited, so a practice that knows an NHS number cannot
//! try dates of birth until one opens a parked release.
//!
//! Three counters of failed claims (nothing matched) over a sliding window
//! (`[limits] claim_failure_window_hours`, 24 h by default): per practice and
//! patient (5), per practice (20) and per patient across practices (10). A
//! claim is refused with `RESOURCE_EXHAUSTED` *before* the store is asked
//! once any counter that concerns it is at its limit, so a locked pair stays
//! locked even for the right date of birth. Claims in flight count against
//! the limit too, so a burst of parallel guesses gets no more tries than a
//! sequence.
//!
//! Every failure is an audit entry (`claim_failure`, the practice as actor,
//! the patient as keyed hash, the evidence as keyed hash), durable before the
//! caller hears `NOT_FOUND`; at start the counters are rebuilt from those
//! entries ([`Store::audit_since`]), so a restart does not reset them.
//! Operators are not limited: `OperatorService.ClaimParked` with a reason is the way
//! out for a practice that really registered the patient
//! (`docs/edge-limits.md`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::operator::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The audit action of one failed claim.
pub const FAILURE_ACTION: &str = "claim_failure";

/// Limits on failed claims (from `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Failures one practice may have for one patient in the window.
    pub per_pair: u32,
    /// Failures one practice may have in the window, all patients.
    pub per_practice: u32,
    /// Failures one patient may suffer in the window, all practices.
    pub per_patient: u32,
    /// The window, ms.
    pub window_ms: i64,
}

impl Default for ClaimLimits {
    fn default() -> Self {
        Self {
            per_pair: 5,
            per_practice: 20,
            per_patient: 10,
            window_ms: 24 * 3_600_000,
        }
    }
}

/// What a counter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Pair(String, String),
    Practice(String),
    Patient(String),
}

impl Scope {
    /// The label of this kind of counter (metrics, logs, errors).
    fn name(&self) -> &'static str {
        match self {
            Scope::Pair(..) => "practice_and_patient",
            Scope::Practice(_) => "practice",
            Scope::Patient(_) => "patient",
        }
    }
}

fn scopes(practice: &str, patient: &str) -> [Scope; 3] {
    [
        Scope::Pair(practice.to_owned(), patient.to_owned()),
        Scope::Practice(practice.to_owned()),
        Scope::Patient(patient.to_owned()),
    ]
}

#[derive(Default)]
struct Counters {
    failures: HashMap<Scope, VecDeque<i64>>,
    in_flight: HashMap<Scope, u32>,
    /// Summaries counted as failed claims (practice, message id), and
    /// when: a sender repeating one (a MESH message polled again, a retry)
    /// tries nothing new.
    counted: HashMap<(String, String), i64>,
}

/// Claims refused for now: which counter is full and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    /// `practice_and_patient`, `practice` or `patient`.
    pub scope: &'static str,
    /// When a claim may be tried again, ms since the epoch.
    pub until_ms: i64,
}

/// The failed-claim counters of the running gateway.
pub struct ClaimGuard {
    limits: ClaimLimits,
    counters: Mutex<Counters>,
    metrics: Option<Arc<Metrics>>,
    /// Whether the counters hold the audit trail's failures yet.
    restored: AtomicBool,
    /// Held while they are rebuilt ([`Self::restore`]).
    restoring: Mutex<()>,
}

impl ClaimGuard {
    /// Counters rebuilt from the failures the audit trail holds for the
    /// window ending at `now_ms`.
    ///
    /// # Errors
    /// Store failures.
    pub fn load(
        store: &Store,
        limits: ClaimLimits,
        metrics: Option<Arc<Metrics>>,
        now_ms: i64,
    ) -> Result<Self, StoreError> {
        let guard = Self::deferred(limits, metrics);
        guard.restore(store, now_ms)?;
        Ok(guard)
    }

    /// Counters not yet rebuilt: the gateway starts serving at once and
    /// rebuilds them beside ([`Self::restore`]). Reading a day of audit
    /// trail takes time in proportion to the day's traffic (about 150 ms
    /// after 100,000 submits here), and only claims need it. A claim
    /// that arrives first rebuilds them itself before it is admitted
    /// ([`Self::admit_shared`]), so no claim is ever judged on empty
    /// counters.
    pub fn deferred(limits: ClaimLimits, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            limits,
            counters: Mutex::default(),
            metrics,
            restored: AtomicBool::new(false),
            restoring: Mutex::new(()),
        }
    }

    /// Rebuilds the counters from the failures the audit trail holds for
    /// the window ending at `now_ms`, unless done already. Done once: a
    /// caller that comes while it runs waits for it. (Two rebuilds at once
    /// could let the later one, read before a failure was counted, replace
    /// that failure's counter with a longer list that lacks it.)
    ///
    /// # Errors
    /// Store failures (the counters stay marked as not rebuilt).
    pub fn restore(&self, store: &Store, now_ms: i64) -> Result<(), StoreError> {
        if self.restored.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.restoring.lock().unwrap_or_else(|e| e.into_inner());
        if self.restored.load(Ordering::Acquire) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let restored = self.read_failures(store, now_ms)?;
        self.restored.store(true, Ordering::Release);
        tracing::info!(
            failures = restored,
            took_ms = started.elapsed().as_millis(),
            "failed claims of the last window restored from the audit trail"
        );
        Ok(())
    }

    /// Takes the failures the audit trail holds for the window ending at
    /// `now_ms` into the counters, each counter keeping the longer of its
    /// own and the trail's (claims in flight are kept); returns how many
    /// failures the trail holds.
    ///
    /// On PostgreSQL every node's failures are in the one audit trail, and
    /// the claim path calls this before each admission
    /// ([`Self::admit_shared`]), so a practice cannot multiply its tries by
    /// spreading them over nodes.
    ///
    /// # Errors
    /// Store failures.
    fn read_failures(&self, store: &Store, now_ms: i64) -> Result<usize, StoreError> {
        let recent =
            store.audit_since(FAILURE_ACTION, now_ms.saturating_sub(self.limits.window_ms))?;
        let mut failures: HashMap<Scope, VecDeque<i64>> = HashMap::new();
        // Newest first from the store; counters keep oldest first.
        for entry in recent.iter().rev() {
            let Some(patient) = &entry.patient_key else {
                continue;
            };
            for scope in scopes(&entry.actor, patient) {
                failures.entry(scope).or_default().push_back(entry.at_ms);
            }
        }
        // Per counter, the longer of the two: this node's newest failure
        // may not be in the trail yet (it is written just after counting).
        let mut c = self.lock();
        for (scope, from_trail) in failures {
            let mine = c.failures.entry(scope).or_default();
            if from_trail.len() > mine.len() {
                *mine = from_trail;
            }
        }
        Ok(recent.len())
    }

    /// [`Self::admit`], after reading every node's failures from `store`
    /// when it is shared by several nodes (PostgreSQL); on sled this node
    /// is the only one, and its counters are whole once rebuilt at start
    /// (here, first, if [`Self::restore`] has not finished yet).
    ///
    /// # Errors
    /// [`Locked`] as [`Self::admit`]; store failures (the claim is then
    /// refused: the limit cannot be checked).
    pub fn admit_shared(
        &self,
        store: &Store,
        practice: &str,
        patient: &str,
        now_ms: i64,
    ) -> Result<Result<Ticket<'_>, Locked>, StoreError> {
        if store.engine() == crate::store::EngineKind::Postgres {
            self.read_failures(store, now_ms)?;
        } else {
            self.restore(store, now_ms)?;
        }
        Ok(self.admit(practice, patient, now_ms))
    }

    /// The window the counters span, whole hours.
    pub fn window_hours(&self) -> i64 {
        self.limits.window_ms / 3_600_000
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limit(&self, scope: &Scope) -> u32 {
        match scope {
            Scope::Pair(..) => self.limits.per_pair,
            Scope::Practice(_) => self.limits.per_practice,
            Scope::Patient(_) => self.limits.per_patient,
        }
    }

    /// Lets one claim by `practice` (its certificate identity) for `patient`
    /// (keyed hash) go ahead, or says which counter is full. The ticket must
    /// be told how the claim ended; dropped untold, the claim did not count.
    ///
    /// # Errors
    /// [`Locked`] when a counter of this claim is at its limit.
    pub fn admit(&self, practice: &str, patient: &str, now_ms: i64) -> Result<Ticket<'_>, Locked> {
        let mut c = self.lock();
        let since = now_ms.saturating_sub(self.limits.window_ms);
        // Forget what left the window, everywhere: claims are a few hundred
        // a day, so this stays cheap and the counters stay bounded.
        for f in c.failures.values_mut() {
            while f.front().is_some_and(|t| *t < since) {
                f.pop_front();
            }
        }
        c.failures.retain(|_, f| !f.is_empty());
        c.counted.retain(|_, at| *at >= since);
        let scopes = scopes(practice, patient);
        for scope in &scopes {
            let limit = self.limit(scope) as usize;
            let failed = c.failures.get(scope).map_or(0, VecDeque::len);
            let in_flight = c.in_flight.get(scope).copied().unwrap_or(0) as usize;
            if failed + in_flight >= limit {
                // The failure that must age out first, or a moment for those in flight.
                let until_ms = match failed.checked_sub(limit) {
                    Some(i) => c.failures[scope][i].saturating_add(self.limits.window_ms + 1),
                    None => now_ms.saturating_add(1_000),
                };
                if let Some(m) = &self.metrics {
                    m.claim_refused_while_locked(scope.name());
                }
                return Err(Locked {
                    scope: scope.name(),
                    until_ms,
                });
            }
        }
        for scope in &scopes {
            *c.in_flight.entry(scope.clone()).or_default() += 1;
        }
        Ok(Ticket {
            guard: self,
            scopes: Some(scopes),
        })
    }
}

/// One admitted claim; see [`ClaimGuard::admit`].
pub struct Ticket<'a> {
    guard: &'a ClaimGuard,
    scopes: Option<[Scope; 3]>,
}

/// A failed claim, as counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Failures of this practice for this patient in the window, this one included.
    pub pair_failures: u32,
    /// The limit those count against.
    pub pair_limit: u32,
    /// Counters this failure filled (now locked).
    pub now_locked: Vec<&'static str>,
}

impl Ticket<'_> {
    fn release(&mut self) -> Option<([Scope; 3], std::sync::MutexGuard<'_, Counters>)> {
        let scopes = self.scopes.take()?;
        let mut c = self.guard.lock();
        for scope in &scopes {
            if let Some(n) = c.in_flight.get_mut(scope) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.in_flight.remove(scope);
                }
            }
        }
        Some((scopes, c))
    }

    /// Whether the practice's summary `message_id` was counted as a failed
    /// claim already in the window (its repeat is not counted again); marks
    /// it counted now if not.
    pub fn counted_before(&self, practice: &str, message_id: &str, now_ms: i64) -> bool {
        let key = (practice.to_owned(), message_id.to_owned());
        self.guard.lock().counted.insert(key, now_ms).is_some()
    }

    /// The claim matched nothing: counts it.
    pub fn failed(mut self, now_ms: i64) -> Failure {
        let guard = self.guard;
        let mut out = Failure {
            pair_failures: 0,
            pair_limit: guard.limits.per_pair,
            now_locked: Vec::new(),
        };
        let Some((scopes, mut c)) = self.release() else {
            return out;
        };
        for scope in scopes {
            let limit = guard.limit(&scope) as usize;
            let name = scope.name();
            let f = c.failures.entry(scope).or_default();
            f.push_back(now_ms);
            if name == "practice_and_patient" {
                out.pair_failures = u32::try_from(f.len()).unwrap_or(u32::MAX);
            }
            if f.len() == limit {
                out.now_locked.push(name);
            }
        }
        drop(c);
        if let Some(m) = &guard.metrics {
            m.claim_failed(&out.now_locked);
        }
        out
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limits: ClaimLimits) -> ClaimGuard {
        ClaimGuard::deferred(limits, None)
    }

    const H: i64 = 3_600_000;

    #[test]
    fn a_pair_locks_after_its_limit_and_opens_when_the_window_passes() {
        let g = guard(ClaimLimits::default());
        for i in 0..4 {
            let f = g.admit("urn:ods:YG001", "p1", i).unwrap().failed(i);
            assert_eq!(f.pair_failures, u32::try_from(i + 1).unwrap());
            assert!(f.now_locked.is_empty());
        }
        let last = g.admit("urn:ods:YG001", "p1", 10).unwrap().failed(10);
        assert_eq!(last.now_locked, ["practice_and_patient"]);
        let locked = g.admit("urn:ods:YG001", "p1", 20).err().unwrap();
        assert_eq!(locked.scope, "practice_and_patient");
        assert_eq!(locked.until_ms, 24 * H + 1);
        // Another practice, another patient: still open.
        assert!(g.admit("urn:ods:YG002", "p1", 20).is_ok());
        assert!(g.admit("urn:ods:YG001", "p2", 20).is_ok());
        // The first failure ages out: one more try.
        assert!(g.admit("urn:ods:YG001", "p1", 24 * H).is_err());
        let t = g.admit("urn:ods:YG001", "p1", 24 * H + 1).unwrap();
        drop(t);
        assert!(g.admit("urn:ods:YG001", "p1", 24 * H + 1).is_ok());
    }

    #[test]
    fn claims_in_flight_count_against_the_limit() {
        let g = guard(ClaimLimits {
            per_pair: 2,
            ..ClaimLimits::default()
        });
        let a = g.admit("urn:ods:YG001", "p1", 0).unwrap();
        let b = g.admit("urn:ods:YG001", "p1", 0).unwrap();
        assert!(g.admit("urn:ods:YG001", "p1", 0).is_err());
        drop(a); // succeeded or failed without counting (store error)
        b.failed(0);
        assert!(g.admit("urn:ods:YG001", "p1", 0).is_ok());
    }

    #[test]
    fn practice_and_patient_limits_span_pairs() {
        let g = guard(ClaimLimits {
            per_pair: 5,
            per_practice: 3,
            per_patient: 4,
            window_ms: H,
        });
        for p in ["a", "b", "c"] {
            g.admit("urn:ods:YG001", p, 0).unwrap().failed(0);
        }
        assert_eq!(
            g.admit("urn:ods:YG001", "d", 0).err().unwrap().scope,
            "practice"
        );
        for practice in ["urn:ods:YG002", "urn:ods:YG003", "urn:ods:YG004"] {
            g.admit(practice, "a", 0).unwrap().failed(0);
        }
        assert_eq!(
            g.admit("urn:ods:YG005", "a", 0).err().unwrap().scope,
            "patient"
        );
    }

    /// The gateway serves before its counters are rebuilt; a claim that
    /// comes first rebuilds them, so a pair locked before a restart stays
    /// locked for the first claim after it.
    #[tokio::test]
    async fn a_claim_before_the_counters_are_rebuilt_is_judged_on_the_trail() {
        use crate::store::{Clock, ManualClock, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(10 * H);
        let store = Store::open(
            &dir.path().join("data"),
            StoreOptions::default(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        for _ in 0..5 {
            clock.advance(1);
            store
                .record(crate::audit::AuditEvent {
                    actor: "urn:ods:YG001".into(),
                    action: FAILURE_ACTION,
                    patient_key: Some("patient-a".into()),
                    outcome: "refused".into(),
                    ..crate::audit::AuditEvent::default()
                })
                .await
                .unwrap();
        }
        let now = clock.now_ms();
        let g = ClaimGuard::deferred(ClaimLimits::default(), None);
        let locked = g
            .admit_shared(&store, "urn:ods:YG001", "patient-a", now)
            .unwrap()
            .err()
            .expect("the pair's five failures before the restart lock it");
        assert_eq!(locked.scope, "practice_and_patient");
        // Rebuilt once: the background rebuild after it adds nothing.
        g.restore(&store, now).unwrap();
        assert!(g.admit("urn:ods:YG001", "patient-a", now).is_err());
        assert!(g.admit("urn:ods:YG001", "patient-b", now).is_ok());
        store.close().await.unwrap();
    }
}
