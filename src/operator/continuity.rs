//! The continuity indicators (`handover::continuity`) of the last 28 days
//! for the metrics and the dashboard, recomputed every [`REFRESH`]: the
//! store scan is too dear for every scrape or page refresh. Aggregates
//! only, small numbers already suppressed.

use std::sync::Mutex;
use std::time::Duration;

use maud::{Markup, html};

use crate::handover::{Continuity, ContinuityWindow, Share};

/// How often the indicators are recomputed.
pub const REFRESH: Duration = Duration::from_secs(300);

/// The span the metrics and the dashboard show: one period of 28 days to now.
pub const SPAN_MS: i64 = 28 * 86_400_000;

/// The window of [`SPAN_MS`] to now, as one period.
#[must_use]
pub fn window() -> ContinuityWindow {
    ContinuityWindow {
        from_ms: None,
        to_ms: None,
        period_ms: Some(SPAN_MS),
    }
}

/// The last indicators computed (none before the first).
#[derive(Debug, Default)]
pub struct LatestContinuity(Mutex<Option<Continuity>>);

impl LatestContinuity {
    /// Keeps `c` as the latest.
    pub fn set(&self, c: Continuity) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// The latest, if any.
    pub fn get(&self) -> Option<Continuity> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A share as the dashboard shows it.
fn cell(s: Share) -> String {
    match s {
        Share::Suppressed => "*".into(),
        Share::Of(_, 0) => "–".into(),
        Share::Of(n, d) => {
            #[allow(clippy::cast_precision_loss)]
            let pct = n as f64 * 100.0 / d as f64;
            format!("{pct:.0}% ({n}/{d})")
        }
    }
}

/// The dashboard's section: one row per sending prison.
#[must_use]
pub fn section(c: Option<&Continuity>) -> Markup {
    html! {
        h2 #continuity { "Continuity of care, last 28 days" }
        @match c {
            None => p.empty { "not computed yet (every 5 minutes)" },
            Some(c) if c.rows.is_empty() => p.empty { "no releases in the last 28 days" },
            Some(c) => {
                table {
                    thead { tr {
                        th { "Prison" } th.num { "Releases" } th.num { "GP by deadline" }
                        th.num { "Parked > 3 d" } th.num { "Parked > 7 d" } th.num { "Median to GP" }
                        th.num { "OST by next dose" } th.num { "MH team < 72 h" }
                    } }
                    tbody {
                        @for r in &c.rows {
                            tr {
                                td { (r.prison) }
                                td.num { (r.releases.map_or_else(|| "*".to_owned(), |n| n.to_string())) }
                                td.num { (cell(r.gp_within_deadline)) }
                                td.num { (cell(r.parked_over_three_days)) }
                                td.num { (cell(r.parked_over_seven_days)) }
                                td.num { (r.median_to_gp_ms.map_or_else(|| "*".to_owned(), |ms| format!("{:.1} h", ms as f64 / 3_600_000.0))) }
                                td.num { (cell(r.ost_before_next_dose)) }
                                td.num { (cell(r.mental_health_within_72h)) }
                            }
                        }
                    }
                }
                p.note { "* suppressed: a count from 1 to 4. From tracking metadata (docs/continuity.md)." }
            }
        }
    }
}
