//! The dashboard's trends: queue depth, submits and deliveries per minute,
//! and the age of the oldest undelivered delivery over the last
//! [`WINDOW_MS`], drawn on the server as small SVG line charts (no scripts:
//! the page's Content-Security-Policy forbids them).
//!
//! The sweeper (`src/app.rs`) records a [`Sample`] after each sweep; one
//! sample a minute is kept (the minute's last), at most [`KEEP`] of them, in
//! memory only: a restart starts the charts afresh, and Prometheus (with
//! `docs/grafana-dashboard.json`) keeps the long history.

use std::collections::VecDeque;
use std::sync::Mutex;

use maud::{Markup, html};

/// One sample a minute.
pub const SAMPLE_MS: i64 = 60_000;
/// The charts' span: the last six hours.
pub const WINDOW_MS: i64 = 6 * 3_600_000;
/// Samples kept: the window's minutes, and one before it for the first rate.
pub const KEEP: usize = (WINDOW_MS / SAMPLE_MS) as usize + 1;

/// The gateway at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The gateway's time, ms since the epoch.
    pub at_ms: i64,
    /// Deliveries waiting or on lease, every mailbox but `@parked`.
    pub depth: u64,
    /// Age of the oldest of them, seconds (0 when there are none).
    pub oldest_age_seconds: f64,
    /// Submits accepted since start-up (a counter).
    pub submits: u64,
    /// Deliveries acknowledged since start-up (a counter).
    pub delivered: u64,
}

/// The samples of the last hours.
#[derive(Debug, Default)]
pub struct Trends {
    samples: Mutex<VecDeque<Sample>>,
}

impl Trends {
    /// Records `sample`: it replaces the last one in the same minute.
    pub fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let minute = sample.at_ms.div_euclid(SAMPLE_MS);
        match samples.back_mut() {
            Some(last) if last.at_ms.div_euclid(SAMPLE_MS) == minute => *last = sample,
            // A clock that went back: start again rather than draw backwards.
            Some(last) if last.at_ms > sample.at_ms => {
                samples.clear();
                samples.push_back(sample);
            }
            _ => samples.push_back(sample),
        }
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().copied().collect()
    }
}

/// A series to draw: (ms since the epoch, value).
pub type Points = Vec<(i64, f64)>;

/// A counter's increase per minute between consecutive samples, at the later
/// one. A counter that went down (a restart) gives no point.
pub fn per_minute(samples: &[Sample], counter: impl Fn(&Sample) -> u64) -> Points {
    samples
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let increase = counter(b).checked_sub(counter(a))?;
            let minutes = (b.at_ms - a.at_ms) as f64 / SAMPLE_MS as f64;
            (minutes > 0.0).then(|| (b.at_ms, increase as f64 / minutes))
        })
        .collect()
}

/// A gauge's values.
pub fn gauge(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Points {
    samples.iter().map(|s| (s.at_ms, value(s))).collect()
}

const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 80.0;

/// The `points` attribute of a polyline over the window ending at `now_ms`,
/// scaled so the largest value reaches the top (a flat zero line sits at
/// the bottom).
pub fn polyline(points: &[(i64, f64)], now_ms: i64) -> String {
    let start = now_ms - WINDOW_MS;
    let top = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    points
        .iter()
        .filter(|(at, _)| *at >= start && *at <= now_ms)
        .map(|&(at, v)| {
            let x = (at - start) as f64 / WINDOW_MS as f64 * WIDTH;
            let y = if top > 0.0 {
                HEIGHT - v / top * HEIGHT
            } else {
                HEIGHT
            };
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One chart: a title, the latest value, the window's highest, and the line.
pub fn chart(id: &str, title: &str, unit: &str, points: &[(i64, f64)], now_ms: i64) -> Markup {
    let start = now_ms - WINDOW_MS;
    let shown: Vec<(i64, f64)> = points
        .iter()
        .copied()
        .filter(|(at, _)| *at >= start && *at <= now_ms)
        .collect();
    let latest = shown.last().map(|p| p.1);
    let top = shown.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let line = polyline(&shown, now_ms);
    html! {
        figure.trend #(id) {
            figcaption {
                b { (title) }
                " "
                span.latest { @if let Some(v) = latest { (number(v)) " " (unit) } @else { "no data yet" } }
                span.muted { " · highest " (number(top)) " · last 6 h" }
            }
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}"))
                width=(WIDTH) height=(HEIGHT) role="img"
                aria-label=(format!("{title} over the last 6 hours")) {
                line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#d9dce1" stroke-width="1" {}
                @if shown.len() >= 2 {
                    polyline fill="none" stroke="#1f3347" stroke-width="1.5" points=(line) {}
                } @else {
                    text x="8" y="44" fill="#5f6670" font-size="12" { "collecting: one sample a minute" }
                }
            }
        }
    }
}

/// A value as people read it: whole numbers plainly, others to one place.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The four charts of the dashboard's Trends section.
pub fn section(samples: &[Sample], now_ms: i64) -> Markup {
    let minutes = |s: &Sample| s.oldest_age_seconds / 60.0;
    html! {
        section #trends {
            h2 { "Trends" }
            div.trends {
                (chart("trend-depth", "Queue depth", "deliveries", &gauge(samples, |s| s.depth as f64), now_ms))
                (chart("trend-submits", "Submits per minute", "/min", &per_minute(samples, |s| s.submits), now_ms))
                (chart("trend-delivered", "Deliveries per minute", "/min", &per_minute(samples, |s| s.delivered), now_ms))
                (chart("trend-oldest", "Oldest delivery age", "min", &gauge(samples, minutes), now_ms))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(minute: i64, depth: u64, submits: u64) -> Sample {
        Sample {
            at_ms: minute * SAMPLE_MS,
            depth,
            oldest_age_seconds: 0.0,
            submits,
            delivered: 0,
        }
    }

    #[test]
    fn one_sample_a_minute_and_only_the_window_is_kept() {
        let trends = Trends::default();
        trends.record(sample(10, 1, 0));
        trends.record(Sample {
            at_ms: 10 * SAMPLE_MS + 59_000,
            ..sample(10, 5, 3)
        });
        trends.record(sample(11, 2, 9));
        let kept = trends.samples();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].depth, 5, "the minute's last sample");
        for minute in 12..1_000 {
            trends.record(sample(minute, 0, 9));
        }
        assert_eq!(trends.samples().len(), KEEP);
        assert_eq!(trends.samples()[0].at_ms, (1_000 - KEEP as i64) * SAMPLE_MS);
    }

    #[test]
    fn counters_become_rates_per_minute_and_restarts_are_skipped() {
        let samples = [
            sample(0, 0, 0),
            sample(1, 0, 30),
            sample(3, 0, 50),
            sample(4, 0, 2),
        ];
        assert_eq!(
            per_minute(&samples, |s| s.submits),
            vec![(SAMPLE_MS, 30.0), (3 * SAMPLE_MS, 10.0)]
        );
    }

    #[test]
    fn the_chart_spans_the_window_and_scales_to_the_highest_value() {
        let now = 1_000 * SAMPLE_MS;
        let points = [
            (now - WINDOW_MS, 0.0),
            (now - WINDOW_MS / 2, 5.0),
            (now, 10.0),
            (now - 2 * WINDOW_MS, 99.0),
        ];
        // Outside the window: not drawn, and not the scale either.
        let shown: Vec<_> = points
            .iter()
            .copied()
            .filter(|p| p.0 >= now - WINDOW_MS)
            .collect();
        assert_eq!(polyline(&shown, now), "0.0,80.0 160.0,40.0 320.0,0.0");
        let svg = chart("t", "Queue <depth>", "x", &points, now).into_string();
        assert!(
            svg.contains("points=\"0.0,80.0 160.0,40.0 320.0,0.0\""),
            "{svg}"
        );
        assert!(svg.contains("Queue &lt;depth&gt;"), "escaped: {svg}");
        assert!(svg.contains("highest 10"), "{svg}");
        let empty = chart("t", "Queue", "x", &[], now).into_string();
        assert!(
            empty.contains("collecting") && !empty.contains("<polyline"),
            "{empty}"
        );
    }

    #[test]
    fn the_section_has_four_charts_and_no_script() {
        let samples: Vec<Sample> = (0..30)
            .map(|m| sample(m, m as u64, (m * 2) as u64))
            .collect();
        let html = section(&samples, 30 * SAMPLE_MS).into_string();
        for id in [
            "trend-depth",
            "trend-submits",
            "trend-delivered",
            "trend-oldest",
        ] {
            assert!(html.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert_eq!(html.matches("<svg").count(), 4);
        assert!(!html.to_ascii_lowercase().contains("<script"));
        assert!(html.contains("2 /min"), "{html}");
    }
}
