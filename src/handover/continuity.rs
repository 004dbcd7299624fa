//! Continuity of care measured: per sending prison and period, what share
//! of releases reached their carers in time. Computed from tracking
//! metadata only (handover and delivery records: times, states, mailboxes,
//! views), never from a payload, so it holds for as long as the metadata
//! does (the retention policy's metadata period, 84 days by default).
//!
//! Aggregates only. A count from 1 to 4 could point at a person, so it is
//! **suppressed**: a release count under 5 is withheld, and a share is
//! withheld when its denominator, its numerator or the rest (denominator
//! minus numerator) is from 1 to 4; a median needs 5 values.
//!
//! The indicators, for the releases a prison submitted in a period (a
//! release corrected by a later one counts once, as the correction):
//! - `gp_within_deadline`: a GP practice acknowledged a full copy by its deadline;
//! - `parked_over_three_days` / `_seven_days`: the GP copy waited in `@parked`
//!   longer (until claimed, or until now while still parked);
//! - `median_to_gp`: submission to the first GP acknowledgement, over the
//!   releases a GP has acknowledged;
//! - `ost_before_next_dose`: of the releases with a substance misuse service
//!   copy (OST with consent or a legal basis), acknowledged by its deadline,
//!   which is the next dose;
//! - `mental_health_within_72h`: of the releases with a mental health team
//!   copy, acknowledged within 72 hours of submission.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use super::deliver::view_name;
use super::{Caller, Decoded, Error, Gateway};
use crate::clinical::{ValidationErrors, View};
use crate::journey::JourneyEvent;
use crate::store::{CopyFacts, DeliveryState, PARKED_MAILBOX, ReleaseFacts, StoreError};

/// Counts from 1 to this minus one are suppressed.
pub const SMALL_NUMBER: u64 = 5;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Most periods one request may ask for.
pub const MAX_PERIODS: i64 = 400;

/// A share, or nothing when it would disclose a small number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Numerator and denominator (both 0 when nothing was measured).
    Of(u64, u64),
    /// Withheld: a small number.
    Suppressed,
}

impl Share {
    /// `numerator` out of `denominator`, suppressed where a count is small.
    #[must_use]
    pub fn of(numerator: u64, denominator: u64) -> Self {
        let small = |n: u64| n > 0 && n < SMALL_NUMBER;
        let rest = denominator.saturating_sub(numerator);
        if small(denominator) || small(numerator) || small(rest) {
            Share::Suppressed
        } else {
            Share::Of(numerator, denominator)
        }
    }
}

/// One prison's period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuityRow {
    /// The sending prison's ODS code.
    pub prison: String,
    /// The period, ms since the epoch, start inclusive.
    pub period_start_ms: i64,
    /// End exclusive.
    pub period_end_ms: i64,
    /// Releases submitted; `None` when suppressed.
    pub releases: Option<u64>,
    /// Acknowledged by a GP practice by the deadline.
    pub gp_within_deadline: Share,
    /// Parked longer than 3 days.
    pub parked_over_three_days: Share,
    /// Parked longer than 7 days.
    pub parked_over_seven_days: Share,
    /// Median ms from submission to the first GP acknowledgement; `None`
    /// with fewer than 5 values.
    pub median_to_gp_ms: Option<i64>,
    /// OST releases the substance misuse service had before the next dose.
    pub ost_before_next_dose: Share,
    /// Mental health releases the team had within 72 hours.
    pub mental_health_within_72h: Share,
}

/// The indicators asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuity {
    /// One row per prison and period with releases, by prison then period.
    pub rows: Vec<ContinuityRow>,
    /// When computed.
    pub now_ms: i64,
    /// Metadata of releases finished before this may have been removed
    /// under the retention policy: earlier periods can be incomplete.
    pub covered_from_ms: i64,
}

/// The periods asked for: `[from_ms, to_ms)` cut into `period_ms` steps
/// (the last one may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContinuityWindow {
    /// Start, inclusive.
    pub from_ms: Option<i64>,
    /// End, exclusive.
    pub to_ms: Option<i64>,
    /// Length of a period.
    pub period_ms: Option<i64>,
}

/// The longest period asked for: 100 years (so a period's end never
/// overflows).
const MAX_PERIOD_MS: i64 = 100 * 366 * DAY_MS;

/// A window with its defaults applied: the last 28 days to now, in weeks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    from_ms: i64,
    to_ms: i64,
    period_ms: i64,
}

impl ContinuityWindow {
    fn resolve(self, now_ms: i64) -> Result<Window, ValidationErrors> {
        let to_ms = self.to_ms.unwrap_or(now_ms);
        let from_ms = self
            .from_ms
            .unwrap_or_else(|| to_ms.saturating_sub(28 * DAY_MS));
        let period_ms = self.period_ms.unwrap_or(7 * DAY_MS);
        let mut v = ValidationErrors::default();
        if from_ms >= to_ms {
            v.add("from", "must be before `to`");
        }
        if period_ms < HOUR_MS {
            v.add("period", "at least one hour");
        } else if period_ms > MAX_PERIOD_MS {
            v.add("period", "at most 100 years");
        } else if to_ms.saturating_sub(from_ms) / period_ms >= MAX_PERIODS {
            v.add(
                "period",
                format!("at most {MAX_PERIODS} periods between `from` and `to`"),
            );
        }
        v.into_result().map(|()| Window {
            from_ms,
            to_ms,
            period_ms,
        })
    }
}

/// What one release's deliveries say.
#[derive(Debug, Default)]
struct Outcome {
    gp_acked_ms: Option<i64>,
    gp_on_time: bool,
    parked_ms: i64,
    ost_on_time: Option<bool>,
    mental_health_on_time: Option<bool>,
}

fn acked(d: &CopyFacts) -> Option<i64> {
    (d.state == DeliveryState::Delivered)
        .then_some(d.delivered_at_ms)
        .flatten()
}

fn on_time(d: &CopyFacts) -> bool {
    acked(d).is_some_and(|at| d.due_ms.is_none_or(|due| at <= due))
}

fn outcome(h: &ReleaseFacts, deliveries: &[CopyFacts], now_ms: i64) -> Outcome {
    let of_view = |view: View| deliveries.iter().filter(move |d| d.view == view_name(view));
    let gp = || of_view(View::Full);
    let parked_ms = |d: &CopyFacts| match d.claimed_at_ms {
        Some(claimed) => claimed - d.queued_at_ms,
        None if d.mailbox == PARKED_MAILBOX && d.state == DeliveryState::Parked => {
            now_ms - d.queued_at_ms
        }
        None => 0,
    };
    let within_72h =
        |d: &CopyFacts| acked(d).is_some_and(|at| at - h.submitted_at_ms <= 72 * HOUR_MS);
    Outcome {
        gp_acked_ms: gp().filter_map(acked).min(),
        gp_on_time: gp().any(on_time),
        parked_ms: gp().map(parked_ms).max().unwrap_or(0),
        ost_on_time: any_of(of_view(View::SubstanceMisuseService), on_time),
        mental_health_on_time: any_of(of_view(View::MentalHealthTeam), within_72h),
    }
}

impl Outcome {
    /// The outcome of a release and its corrections together: the release
    /// reached the GP when any summary of it did (the earliest, on time if
    /// any was), parked as long as the longest, and a service in time if any
    /// copy was. A correction sent after release day has a GP deadline
    /// already passed; scored alone, it turned an on-time release late.
    fn merge(&mut self, other: Outcome) {
        self.gp_acked_ms = match (self.gp_acked_ms, other.gp_acked_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.gp_on_time |= other.gp_on_time;
        self.parked_ms = self.parked_ms.max(other.parked_ms);
        for (mine, theirs) in [
            (&mut self.ost_on_time, other.ost_on_time),
            (&mut self.mental_health_on_time, other.mental_health_on_time),
        ] {
            *mine = match (*mine, theirs) {
                (Some(a), Some(b)) => Some(a || b),
                (a, b) => a.or(b),
            };
        }
    }
}

/// Whether any of `deliveries` is `ok`; `None` when there are none.
fn any_of<'d>(
    deliveries: impl Iterator<Item = &'d CopyFacts>,
    ok: impl Fn(&CopyFacts) -> bool,
) -> Option<bool> {
    let mut seen = None;
    for d in deliveries {
        seen = Some(seen.unwrap_or(false) || ok(d));
    }
    seen
}

/// One prison's period being counted.
#[derive(Debug, Default)]
struct Tally {
    releases: u64,
    gp_on_time: u64,
    parked_3: u64,
    parked_7: u64,
    to_gp_ms: Vec<i64>,
    ost: (u64, u64),
    mental_health: (u64, u64),
}

impl Tally {
    fn add(&mut self, o: &Outcome, submitted_ms: i64) {
        self.releases += 1;
        self.gp_on_time += u64::from(o.gp_on_time);
        self.parked_3 += u64::from(o.parked_ms > 3 * DAY_MS);
        self.parked_7 += u64::from(o.parked_ms > 7 * DAY_MS);
        self.to_gp_ms
            .extend(o.gp_acked_ms.map(|at| at - submitted_ms));
        for (count, seen) in [
            (&mut self.ost, o.ost_on_time),
            (&mut self.mental_health, o.mental_health_on_time),
        ] {
            if let Some(hit) = seen {
                count.0 += u64::from(hit);
                count.1 += 1;
            }
        }
    }

    fn row(mut self, prison: String, start_ms: i64, end_ms: i64) -> ContinuityRow {
        let small = self.releases < SMALL_NUMBER;
        ContinuityRow {
            prison,
            period_start_ms: start_ms,
            period_end_ms: end_ms,
            releases: (!small).then_some(self.releases),
            gp_within_deadline: Share::of(self.gp_on_time, self.releases),
            parked_over_three_days: Share::of(self.parked_3, self.releases),
            parked_over_seven_days: Share::of(self.parked_7, self.releases),
            median_to_gp_ms: median(&mut self.to_gp_ms),
            ost_before_next_dose: Share::of(self.ost.0, self.ost.1),
            mental_health_within_72h: Share::of(self.mental_health.0, self.mental_health.1),
        }
    }
}

/// The median of at least [`SMALL_NUMBER`] values (the mean of the middle
/// two of an even count, rounded down).
fn median(values: &mut [i64]) -> Option<i64> {
    if (values.len() as u64) < SMALL_NUMBER {
        return None;
    }
    values.sort_unstable();
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]).div_euclid(2)
    })
}

/// A release and the corrections of it seen so far, counted once.
struct Chain {
    sender: String,
    /// The earliest submission of the chain in the window: the release.
    submitted_ms: i64,
    outcome: Outcome,
}

/// The tallies of one scan, newest release first (so a correction is seen
/// before the release it corrects, which joins its chain: one release).
struct Scan {
    window: Window,
    now_ms: i64,
    /// A corrected release's id → the newest correction of it.
    head_of: HashMap<u64, u64>,
    chains: HashMap<u64, Chain>,
    tallies: BTreeMap<(String, i64), Tally>,
}

impl Scan {
    fn new(window: Window, now_ms: i64) -> Self {
        Self {
            window,
            now_ms,
            head_of: HashMap::new(),
            chains: HashMap::new(),
            tallies: BTreeMap::new(),
        }
    }

    /// Counts one release (called newest first).
    fn add(&mut self, h: &ReleaseFacts, deliveries: &[CopyFacts]) {
        // A summary that arrived after its correction (superseded on
        // arrival) is that correction's release, already counted once.
        if h.superseded_on_arrival_by.is_some() || h.submitted_at_ms < self.window.from_ms {
            return;
        }
        let head = self.head_of.remove(&h.id).unwrap_or(h.id);
        if let Some(old) = h.supersedes {
            self.head_of.insert(old, head);
        }
        let found = outcome(h, deliveries, self.now_ms);
        match self.chains.entry(head) {
            Entry::Occupied(mut chain) => {
                let chain = chain.get_mut();
                chain.outcome.merge(found);
                chain.submitted_ms = chain.submitted_ms.min(h.submitted_at_ms);
            }
            Entry::Vacant(slot) => {
                slot.insert(Chain {
                    sender: h.sender.clone(),
                    submitted_ms: h.submitted_at_ms,
                    outcome: found,
                });
            }
        }
    }

    /// Sets aside each chain whose first release came before the window
    /// (`before` says so of an earlier summary the scan never reached: it
    /// was submitted before the window, or its record is gone with age).
    /// That release is counted in the period it began, with its own
    /// outcome; counted here too, as its correction, it was counted twice
    /// across consecutive reports.
    fn set_aside_begun_before(
        &mut self,
        mut before: impl FnMut(u64) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for (earlier, head) in std::mem::take(&mut self.head_of) {
            if before(earlier)? {
                self.chains.remove(&head);
            }
        }
        Ok(())
    }

    fn rows(mut self) -> Vec<ContinuityRow> {
        let window = self.window;
        for chain in std::mem::take(&mut self.chains).into_values() {
            let period = (chain.submitted_ms - window.from_ms) / window.period_ms;
            self.tallies
                .entry((chain.sender, period))
                .or_default()
                .add(&chain.outcome, chain.submitted_ms);
        }
        self.tallies
            .into_iter()
            .map(|((prison, period), tally)| {
                let start = window
                    .from_ms
                    .saturating_add(period.saturating_mul(window.period_ms));
                let end = start.saturating_add(window.period_ms).min(window.to_ms);
                tally.row(prison, start, end)
            })
            .collect()
    }
}

impl Gateway {
    /// The continuity indicators per sending prison and period.
    ///
    /// # Errors
    /// Refusals for non-operators, a window that is empty or cut too fine
    /// (field violations on `from`, `period`), and store failures.
    pub async fn continuity(
        &self,
        caller: &Caller,
        window: Decoded<ContinuityWindow>,
    ) -> Result<Continuity, Error> {
        self.operator(caller)?;
        self.continuity_report(window?).await
    }

    /// [`Gateway::continuity`] for the gateway's own surfaces (the metrics
    /// and the dashboard, aggregates only): no caller to check.
    ///
    /// # Errors
    /// As [`Gateway::continuity`], but for the caller.
    pub async fn continuity_report(&self, window: ContinuityWindow) -> Result<Continuity, Error> {
        let now_ms = self.clock.now_ms();
        let window = window.resolve(now_ms)?;
        let store = self.store.clone();
        let rows = tokio::task::spawn_blocking(move || {
            let mut scan = Scan::new(window, now_ms);
            store.for_each_handover_submitted_between(
                JourneyEvent::Release,
                window.from_ms,
                window.to_ms,
                |h, deliveries| scan.add(h, deliveries),
            )?;
            scan.set_aside_begun_before(|id| {
                Ok(store
                    .handover(id)?
                    .is_none_or(|h| h.submitted_at_ms < window.from_ms))
            })?;
            Ok::<_, StoreError>(scan.rows())
        })
        .await
        .map_err(|e| {
            Error::Store(StoreError::Unavailable(format!(
                "continuity scan failed: {e}"
            )))
        })??;
        Ok(Continuity {
            rows,
            now_ms,
            covered_from_ms: now_ms - self.store.retention_policy().metadata_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_numbers_and_their_complements_are_suppressed() {
        assert_eq!(Share::of(0, 0), Share::Of(0, 0));
        assert_eq!(Share::of(0, 4), Share::Suppressed);
        assert_eq!(Share::of(4, 10), Share::Suppressed);
        assert_eq!(Share::of(6, 10), Share::Suppressed, "4 missed is small");
        assert_eq!(Share::of(5, 10), Share::Of(5, 10));
        assert_eq!(Share::of(10, 10), Share::Of(10, 10));
        assert_eq!(Share::of(0, 10), Share::Of(0, 10));
    }

    /// Five releases, one corrected by a later summary and one whose retry
    /// arrived after its correction (superseded on arrival): five count.
    #[test]
    fn a_correction_counts_once_whichever_came_first() {
        let release = |id: u64, extra: serde_json::Value| -> ReleaseFacts {
            let mut v = serde_json::json!({
                "id": id, "sender": "YP001", "message_id": format!("m-{id}"),
                "event": "RELEASE", "content_hash": "", "payload_hash": "",
                "payload_len": 0, "patient_key": format!("p-{id}"),
                "submitted_at_ms": 1_000 + i64::try_from(id).unwrap(), "deliveries": []
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value(v).unwrap()
        };
        let window = ContinuityWindow {
            from_ms: Some(0),
            to_ms: Some(DAY_MS),
            period_ms: Some(DAY_MS),
        }
        .resolve(DAY_MS)
        .unwrap();
        let mut scan = Scan::new(window, DAY_MS);
        let newest_first = [
            release(7, serde_json::json!({ "superseded_on_arrival_by": 6 })),
            release(6, serde_json::json!({})),
            release(5, serde_json::json!({ "supersedes": 4 })),
            release(4, serde_json::json!({})),
            release(3, serde_json::json!({})),
            release(2, serde_json::json!({})),
            release(1, serde_json::json!({})),
        ];
        for h in &newest_first {
            scan.add(h, &[]);
        }
        assert_eq!(scan.rows()[0].releases, Some(5));
    }

    /// A correction in the window of a release submitted before it: that
    /// release is counted in its own period; this window counts neither.
    /// A correction of one in the window counts once, as before.
    #[test]
    fn a_correction_of_a_release_from_before_the_window_is_not_counted_again() {
        let release = |id: u64, at: i64, supersedes: Option<u64>| -> ReleaseFacts {
            serde_json::from_value(serde_json::json!({
                "id": id, "sender": "YP001", "message_id": format!("m-{id}"),
                "event": "RELEASE", "content_hash": "", "payload_hash": "",
                "payload_len": 0, "patient_key": format!("p-{id}"),
                "submitted_at_ms": at, "deliveries": [], "supersedes": supersedes
            }))
            .unwrap()
        };
        let window = ContinuityWindow {
            from_ms: Some(DAY_MS),
            to_ms: Some(2 * DAY_MS),
            period_ms: Some(DAY_MS),
        }
        .resolve(2 * DAY_MS)
        .unwrap();
        let mut scan = Scan::new(window, 2 * DAY_MS);
        // Newest first: 12 corrects 3 (the day before); 11 corrects 10;
        // 9 to 5 stand alone.
        let mut newest_first = vec![
            release(12, DAY_MS + 1_200, Some(3)),
            release(11, DAY_MS + 1_100, Some(10)),
        ];
        newest_first.extend(
            (5..=10)
                .rev()
                .map(|id| release(id, DAY_MS + 100 * id as i64, None)),
        );
        for h in &newest_first {
            scan.add(h, &[]);
        }
        let before = |id: u64| Ok::<_, StoreError>(id == 3);
        scan.set_aside_begun_before(before).unwrap();
        assert_eq!(scan.rows()[0].releases, Some(6), "10 (with 11), and 9 to 5");
    }

    /// A release the practice acknowledged on time, then corrected after
    /// release day (whose copy is due at once and acknowledged late): one
    /// release, on time, reached the GP when the first summary did.
    #[test]
    fn a_release_corrected_later_keeps_the_outcome_of_its_first_summary() {
        let at = |h: i64| 1_000 + h * HOUR_MS;
        let release = |id: u64, submitted: i64, extra: serde_json::Value| -> ReleaseFacts {
            let mut v = serde_json::json!({
                "id": id, "sender": "YP001", "message_id": format!("m-{id}"),
                "event": "RELEASE", "content_hash": "", "payload_hash": "",
                "payload_len": 0, "patient_key": "p", "submitted_at_ms": submitted,
                "deliveries": [id * 10]
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value(v).unwrap()
        };
        let gp_copy = |id: u64, handover: u64, queued: i64, due: i64, acked: i64| {
            serde_json::from_value::<CopyFacts>(serde_json::json!({
                "id": id, "handover_id": handover, "mailbox": "YG001", "patient_key": "p",
                "urgent": false, "state": "delivered", "attempt": 1,
                "queued_at_ms": queued, "delivered_at_ms": acked, "due_ms": due,
                "view": view_name(View::Full)
            }))
            .unwrap()
        };
        let window = ContinuityWindow {
            from_ms: Some(0),
            to_ms: Some(7 * DAY_MS),
            period_ms: Some(7 * DAY_MS),
        }
        .resolve(7 * DAY_MS)
        .unwrap();
        let mut scan = Scan::new(window, 7 * DAY_MS);
        // Newest first: the correction two days on, then the original.
        scan.add(
            &release(2, at(48), serde_json::json!({ "supersedes": 1 })),
            &[gp_copy(20, 2, at(48), at(48), at(60))],
        );
        scan.add(
            &release(1, at(0), serde_json::json!({})),
            &[gp_copy(10, 1, at(0), at(12), at(3))],
        );
        let chain = scan
            .chains
            .remove(&2)
            .expect("one chain, headed by the correction");
        assert!(scan.chains.is_empty());
        assert!(chain.outcome.gp_on_time);
        assert_eq!(chain.outcome.gp_acked_ms, Some(at(3)));
        assert_eq!(chain.submitted_ms, at(0));
    }

    #[test]
    fn a_median_needs_five_values() {
        assert_eq!(median(&mut [4, 1, 3, 2]), None);
        assert_eq!(median(&mut [5, 1, 4, 2, 3]), Some(3));
        assert_eq!(median(&mut [6, 1, 5, 2, 4, 3]), Some(3));
    }

    #[test]
    fn a_window_is_checked() {
        let w = ContinuityWindow {
            from_ms: Some(10),
            to_ms: Some(10),
            period_ms: Some(1),
        };
        let err = w.resolve(0).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["from", "period"]);
        let fine = ContinuityWindow {
            from_ms: None,
            to_ms: None,
            period_ms: None,
        };
        let w = fine.resolve(100 * DAY_MS).unwrap();
        assert_eq!(
            (w.from_ms, w.to_ms, w.period_ms),
            (72 * DAY_MS, 100 * DAY_MS, 7 * DAY_MS)
        );
    }

    #[test]
    fn a_window_at_the_edges_of_time_is_refused_or_reckoned_without_overflow() {
        let huge = ContinuityWindow {
            from_ms: Some(0),
            to_ms: Some(DAY_MS),
            period_ms: Some(i64::MAX),
        };
        let err = huge.resolve(0).unwrap_err();
        assert_eq!(err.0[0].field, "period");
        // The widest window Timestamps allow, in 100-year periods.
        let widest = ContinuityWindow {
            from_ms: Some(-62_135_596_800_000),
            to_ms: Some(253_402_300_799_999),
            period_ms: Some(MAX_PERIOD_MS),
        }
        .resolve(0)
        .unwrap();
        let mut scan = Scan::new(widest, 0);
        scan.tallies.insert(("YP001".into(), 99), Tally::default());
        let rows = scan.rows();
        assert_eq!(rows[0].period_end_ms, 253_402_300_799_999);
        let early = ContinuityWindow {
            from_ms: None,
            to_ms: Some(-62_135_596_800_000 + 1),
            period_ms: None,
        };
        assert!(early.resolve(0).is_ok());
    }
}
