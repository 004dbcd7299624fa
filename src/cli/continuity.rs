//! `throughcare admin continuity`: the continuity indicators as a table, as
//! JSON, or as CSV for commissioners. Aggregates only: the gateway has
//! already suppressed small numbers; a suppressed cell is `*` in CSV and a
//! table, `null` with `"suppressed": true` in JSON.

use anyhow::Context;
use serde_json::{Value, json};

use crate::grpc::pb;

const DAY_SECONDS: i64 = 86_400;

/// The request for `from`/`to` (`YYYY-MM-DD`, midnight UTC, or RFC 3339)
/// in periods of `period_days`.
///
/// # Errors
/// A date that does not parse, or no days in a period.
pub fn request(
    from: Option<&str>,
    to: Option<&str>,
    period_days: u32,
) -> anyhow::Result<pb::GetContinuityRequest> {
    anyhow::ensure!(period_days > 0, "--period-days must be at least 1");
    let at = |what: &str, v: &str| -> anyhow::Result<prost_types::Timestamp> {
        let t = match v.parse::<jiff::civil::Date>() {
            // A day is a day in England and Wales (BST in summer).
            Ok(d) => d
                .to_zoned(jiff::tz::TimeZone::get("Europe/London")?)?
                .timestamp(),
            Err(_) => v
                .parse::<jiff::Timestamp>()
                .with_context(|| format!("{what}: a date (YYYY-MM-DD) or an RFC 3339 time"))?,
        };
        Ok(prost_types::Timestamp {
            seconds: t.as_second(),
            nanos: 0,
        })
    };
    Ok(pb::GetContinuityRequest {
        from: from.map(|v| at("--from", v)).transpose()?,
        to: to.map(|v| at("--to", v)).transpose()?,
        period: Some(prost_types::Duration {
            seconds: i64::from(period_days) * DAY_SECONDS,
            nanos: 0,
        }),
    })
}

/// The shares of a row, by column name.
fn shares(r: &pb::ContinuityRow) -> [(&'static str, Option<&pb::ContinuityShare>); 5] {
    [
        ("gp_within_deadline", r.gp_within_deadline.as_ref()),
        ("parked_over_3_days", r.parked_over_three_days.as_ref()),
        ("parked_over_7_days", r.parked_over_seven_days.as_ref()),
        ("ost_before_next_dose", r.ost_before_next_dose.as_ref()),
        (
            "mental_health_within_72h",
            r.mental_health_within_72h.as_ref(),
        ),
    ]
}

fn day(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| jiff::Timestamp::from_second(t.seconds).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// A time for the table, as every table shows it: UK time.
fn uk(t: Option<&prost_types::Timestamp>) -> String {
    t.map(crate::uk_time::display_timestamp).unwrap_or_default()
}

fn median_hours(r: &pb::ContinuityRow) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    r.median_to_gp
        .as_ref()
        .map(|d| (d.seconds as f64 / 3_600.0 * 10.0).round() / 10.0)
}

/// The indicators as CSV: one line per prison and period; each share as
/// its numerator and denominator (`*` when suppressed).
#[must_use]
pub fn csv(r: &pb::GetContinuityResponse) -> String {
    let mut header = vec!["prison", "period_start", "period_end", "releases"];
    let mut names = Vec::new();
    if let Some(first) = r.rows.first() {
        names = shares(first).iter().map(|(n, _)| *n).collect();
    }
    let mut out = String::new();
    let share_columns: Vec<String> = names
        .iter()
        .flat_map(|n| [format!("{n}_numerator"), format!("{n}_denominator")])
        .collect();
    header.extend(share_columns.iter().map(String::as_str));
    header.push("median_hours_to_gp");
    out.push_str(&header.join(","));
    out.push('\n');
    let star = || "*".to_owned();
    for row in &r.rows {
        let mut cells = vec![
            row.prison.clone(),
            day(row.period_start.as_ref()),
            day(row.period_end.as_ref()),
            row.releases.map_or_else(star, |n| n.to_string()),
        ];
        for (_, s) in shares(row) {
            match s {
                Some(s) if !s.suppressed => {
                    cells.push(s.numerator.to_string());
                    cells.push(s.denominator.to_string());
                }
                _ => cells.extend([star(), star()]),
            }
        }
        cells.push(median_hours(row).map_or_else(star, |h| h.to_string()));
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn share_json(s: Option<&pb::ContinuityShare>) -> Value {
    match s {
        Some(s) if !s.suppressed => json!({
            "numerator": s.numerator,
            "denominator": s.denominator,
            "suppressed": false,
        }),
        _ => json!({"numerator": null, "denominator": null, "suppressed": true}),
    }
}

/// The indicators as JSON: an object with `rows`, `at` and `covered_from`.
#[must_use]
pub fn json(r: &pb::GetContinuityResponse) -> Value {
    let rows: Vec<Value> = r
        .rows
        .iter()
        .map(|row| {
            let mut o = serde_json::Map::new();
            o.insert("prison".into(), json!(row.prison));
            o.insert("period_start".into(), json!(day(row.period_start.as_ref())));
            o.insert("period_end".into(), json!(day(row.period_end.as_ref())));
            o.insert("releases".into(), json!(row.releases));
            for (name, s) in shares(row) {
                o.insert(name.into(), share_json(s));
            }
            o.insert("median_hours_to_gp".into(), json!(median_hours(row)));
            Value::Object(o)
        })
        .collect();
    json!({
        "rows": rows,
        "at": day(r.at.as_ref()),
        "covered_from": day(r.covered_from.as_ref()),
    })
}

fn share_text(s: Option<&pb::ContinuityShare>) -> String {
    match s {
        Some(s) if s.suppressed => "*".into(),
        Some(s) if s.denominator > 0 => {
            #[allow(clippy::cast_precision_loss)]
            let pct = s.numerator as f64 * 100.0 / s.denominator as f64;
            format!("{}/{} ({pct:.0}%)", s.numerator, s.denominator)
        }
        _ => "-".into(),
    }
}

/// Prints the indicators as CSV, JSON or a table.
///
/// # Errors
/// `--csv` with `--json`.
pub fn print(r: &pb::GetContinuityResponse, as_json: bool, as_csv: bool) -> anyhow::Result<()> {
    anyhow::ensure!(!(as_json && as_csv), "choose one of --json and --csv");
    if as_csv {
        crate::out!("{}", csv(r))?;
        return Ok(());
    }
    if as_json {
        crate::outln!("{}", serde_json::to_string_pretty(&json(r))?)?;
        return Ok(());
    }
    if r.rows.is_empty() {
        crate::outln!("no releases in these periods")?;
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header([
            "PRISON",
            "FROM",
            "RELEASES",
            "GP ON TIME",
            "PARKED >3D",
            "PARKED >7D",
            "MEDIAN TO GP",
            "OST BY NEXT DOSE",
            "MH TEAM <72H",
        ]);
    for row in &r.rows {
        let [gp, p3, p7, ost, mh] = shares(row).map(|(_, s)| share_text(s));
        table.add_row([
            row.prison.clone(),
            uk(row.period_start.as_ref()),
            row.releases.map_or_else(|| "*".into(), |n| n.to_string()),
            gp,
            p3,
            p7,
            median_hours(row).map_or_else(|| "*".into(), |h| format!("{h} h")),
            ost,
            mh,
        ]);
    }
    crate::outln!("{table}")?;
    crate::outln!(
        "* = suppressed (a count from 1 to 4). Tracking data reaches back to {}.",
        uk(r.covered_from.as_ref())
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(n: u64, d: u64) -> Option<pb::ContinuityShare> {
        Some(pb::ContinuityShare {
            suppressed: false,
            numerator: n,
            denominator: d,
        })
    }

    fn response() -> pb::GetContinuityResponse {
        let suppressed = Some(pb::ContinuityShare {
            suppressed: true,
            numerator: 0,
            denominator: 0,
        });
        pb::GetContinuityResponse {
            rows: vec![pb::ContinuityRow {
                prison: "YP001".into(),
                period_start: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 0,
                }),
                period_end: Some(prost_types::Timestamp {
                    seconds: 1_800_086_400,
                    nanos: 0,
                }),
                releases: Some(21),
                gp_within_deadline: share(15, 21),
                parked_over_three_days: share(6, 21),
                parked_over_seven_days: suppressed,
                median_to_gp: Some(prost_types::Duration {
                    seconds: 5_400,
                    nanos: 0,
                }),
                ost_before_next_dose: share(5, 10),
                mental_health_within_72h: share(5, 5),
            }],
            at: None,
            covered_from: None,
        }
    }

    #[test]
    fn csv_has_one_line_per_row_with_suppressed_cells_starred() {
        let text = csv(&response());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("prison,period_start,period_end,releases,"));
        assert_eq!(
            lines[1],
            "YP001,2027-01-15T08:00:00Z,2027-01-16T08:00:00Z,21,15,21,6,21,*,*,5,10,5,5,1.5"
        );
        assert_eq!(
            lines[0].split(',').count(),
            lines[1].split(',').count(),
            "a header for every cell"
        );
    }

    #[test]
    fn json_marks_suppressed_shares_and_carries_no_count_for_them() {
        let v = json(&response());
        let row = &v["rows"][0];
        assert_eq!(row["releases"], 21);
        assert_eq!(row["gp_within_deadline"]["numerator"], 15);
        assert_eq!(row["parked_over_7_days"]["suppressed"], true);
        assert!(row["parked_over_7_days"]["numerator"].is_null());
        assert_eq!(row["median_hours_to_gp"], 1.5);
    }

    #[test]
    fn dates_are_midnight_in_england() {
        let r = request(Some("2027-01-15"), Some("2027-01-16T00:00:00Z"), 1).unwrap();
        assert_eq!(r.from.unwrap().seconds, 1_800_000_000 - 8 * 3_600);
        // In summer a day starts at 23:00 UTC the evening before.
        let summer = request(Some("2027-07-01"), None, 1).unwrap();
        assert_eq!(summer.from.unwrap().seconds, 1_814_396_400);
        assert_eq!(r.to.unwrap().seconds, 1_800_000_000 + 16 * 3_600);
        assert!(request(Some("yesterday"), None, 1).is_err());
        assert!(request(None, None, 0).is_err());
    }
}
