//! HTTP query parameters as the API reads them: a time is unix seconds or
//! RFC 3339 (`2026-12-01T00:00:00Z`, `...+08:00`; a date-time without
//! offset is taken as UTC, as on the command line), a period is seconds or
//! a duration (`600`, `10m`, `1h`). The query structs refuse unknown
//! parameters (`deny_unknown_fields`), so a misspelt `datacentre=` is a
//! 400 naming it, never a silent fleet-wide answer.
use serde::{Deserialize, Deserializer};

/// Unix seconds from a query parameter's text.
pub fn parse_time_s(text: &str) -> Result<u64, String> {
    if let Ok(s) = text.trim().parse::<u64>() {
        return Ok(s);
    }
    let t = agent_common::time_text::parse_time_utc_default(text)
        .map_err(|e| format!("{e}; or give unix seconds"))?;
    u64::try_from(t.as_second()).map_err(|_| format!("{text:?} is before 1970"))
}

/// Seconds from a period parameter's text: whole seconds or a duration.
pub fn parse_period_s(text: &str) -> Result<u64, String> {
    if let Ok(s) = text.trim().parse::<u64>() {
        return Ok(s);
    }
    let d = agent_common::time_text::parse_duration(text)
        .map_err(|e| format!("{e}; or give whole seconds"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("period {text:?} is not a whole number of seconds"));
    }
    Ok(d.as_secs())
}

/// `#[serde(default, deserialize_with = "crate::params::time")]`.
pub fn time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_time_s(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `#[serde(default, deserialize_with = "crate::params::period")]`.
pub fn period<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    parse_period_s(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_are_unix_seconds_or_rfc3339() {
        assert_eq!(parse_time_s("1764547200").unwrap(), 1_764_547_200);
        assert_eq!(parse_time_s("2025-12-01T00:00:00Z").unwrap(), 1_764_547_200);
        assert_eq!(
            parse_time_s("2025-12-01T08:00:00+08:00").unwrap(),
            1_764_547_200
        );
        assert_eq!(parse_time_s("2025-12-01").unwrap(), 1_764_547_200);
        let e = parse_time_s("yesterday").unwrap_err();
        assert!(e.contains("yesterday") && e.contains("unix seconds"), "{e}");
        assert!(parse_time_s("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn periods_are_seconds_or_durations() {
        assert_eq!(parse_period_s("600").unwrap(), 600);
        assert_eq!(parse_period_s("10m").unwrap(), 600);
        assert_eq!(parse_period_s("1h").unwrap(), 3600);
        assert!(parse_period_s("1500ms").is_err());
        assert!(parse_period_s("ten").is_err());
    }
}
