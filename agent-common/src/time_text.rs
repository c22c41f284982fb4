//! Durations and timestamps written as text (config files, command lines,
//! CSV files, reports): one rule for the whole workspace, by `jiff`.
//!
//! - A duration is jiff's friendly format (`500ms`, `5s`, `1h 30m`, `7d`,
//!   `2 weeks`) or ISO 8601 (`PT5S`); a day is 24 hours. Negative durations
//!   and calendar units (months, years) are refused.
//! - A timestamp is RFC 3339 with its offset (`2024-01-01T08:00:00+08:00`,
//!   `...Z`). On command lines a date-time without offset, or a date, is also
//!   taken, as UTC.
use std::string::{String, ToString};
use std::time::Duration;

use jiff::civil::DateTime;
use jiff::tz::Offset;
use jiff::{Span, SpanRelativeTo, Timestamp};

/// A duration from text (`5s`, `1h 30m`, `7d`, `PT5S`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &dyn core::fmt::Display| alloc_format(text, why);
    let span: Span = text.trim().parse().map_err(|e| invalid(&e))?;
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|_| invalid(&"months and years have no fixed length: use days"))?;
    Duration::try_from(signed).map_err(|_| invalid(&"a duration cannot be negative"))
}

fn alloc_format(text: &str, why: &dyn core::fmt::Display) -> String {
    std::format!("invalid duration {text:?}: {why}")
}

/// A duration as friendly text (`1h 30m`, `500ms`), which [`parse_duration`] reads back.
pub fn format_duration(duration: Duration) -> String {
    match jiff::SignedDuration::try_from(duration) {
        Ok(d) => std::format!("{d:#}"),
        Err(_) => std::format!("{}s", duration.as_secs()),
    }
}

/// An RFC 3339 timestamp with its offset (`2024-01-01T08:00:00+08:00`, `...Z`).
pub fn parse_rfc3339(text: &str) -> Result<Timestamp, String> {
    text.trim()
        .parse::<Timestamp>()
        .map_err(|e| std::format!("invalid RFC 3339 time {text:?}: {e}"))
}

/// A time on a command line: RFC 3339 with offset, or a date-time without
/// offset or a date (`2024-01-01`, `2024-01-01 08:00`), taken as UTC.
pub fn parse_time_utc_default(text: &str) -> Result<Timestamp, String> {
    if let Ok(t) = parse_rfc3339(text) {
        return Ok(t);
    }
    let civil: DateTime = text.trim().parse().map_err(|e| {
        std::format!("invalid time {text:?} (RFC 3339, or a date-time taken as UTC): {e}")
    })?;
    Offset::UTC
        .to_timestamp(civil)
        .map_err(|e| std::format!("invalid time {text:?}: {e}"))
}

/// Unix seconds as RFC 3339 in UTC (`2024-01-01T00:00:00Z`).
pub fn format_unix_s(unix_s: i64) -> String {
    match Timestamp::from_second(unix_s) {
        Ok(t) => t.to_string(),
        Err(_) => std::format!("@{unix_s}"),
    }
}

/// Now as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    format_unix_s(Timestamp::now().as_second())
}

/// `#[serde(with = "agent_common::time_text::serde_duration")]` for a
/// `Duration` written as text in a config file.
pub mod serde_duration {
    use std::string::String;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*duration))
    }
}

/// The same for an `Option<Duration>` (absent key: `None`; use with `#[serde(default)]`).
pub mod serde_opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::serde_duration::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(duration: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match duration {
            Some(d) => super::serde_duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_read_friendly_and_iso_text_with_24_hour_days() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(
            parse_duration("400d"),
            Ok(Duration::from_secs(400 * 86_400))
        );
        assert_eq!(parse_duration("PT5S"), Ok(Duration::from_secs(5)));
        for bad in ["5", "-5s", "1y", "soon", ""] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
        for d in [
            Duration::from_millis(20),
            Duration::from_secs(5400),
            Duration::from_secs(86_400 * 7),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn timestamps_keep_their_offset() {
        let s = |t: &str| parse_rfc3339(t).map(|t| t.as_second());
        assert_eq!(s("2024-01-01T00:00:00Z"), Ok(1_704_067_200));
        assert_eq!(s("2024-01-01T08:00:00+08:00"), Ok(1_704_067_200));
        assert!(s("2024-01-01").is_err());
        assert!(s("2024-01-01T00:00:00+8").is_err());
        let u = |t: &str| parse_time_utc_default(t).map(|t| t.as_second());
        assert_eq!(u("2024-01-01T08:00:00+08:00"), Ok(1_704_067_200));
        assert_eq!(u("2024-01-01T00:00:00"), Ok(1_704_067_200));
        assert_eq!(u("2024-01-01"), Ok(1_704_067_200));
        assert!(u("yesterday").is_err());
        assert_eq!(format_unix_s(1_704_067_200), "2024-01-01T00:00:00Z");
    }
}
