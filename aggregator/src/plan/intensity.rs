//! Hourly grid intensity of a data centre for planning, read from a file in
//! one of three formats:
//! - `csv`: the agents' hourly file (`timestamp,g_per_kwh` rows, unix
//!   seconds or RFC 3339, an optional header, `#` comments);
//! - `carbon_aware`: the Green Software Foundation Carbon Aware SDK's
//!   forecast JSON (`/emissions/forecasts/current`): an array of forecasts,
//!   each with `forecastData: [{location, timestamp, duration, value}]`
//!   (value in g/kWh, duration in minutes), or one such forecast;
//! - `electricity_maps`: Electricity Maps' history or forecast JSON
//!   (`{"zone", "history" | "forecast": [{"carbonIntensity", "datetime"}]}`).
//!
//! Points inside one hour are averaged (weighted by their duration where
//! the format has one), so a 5-minute forecast plans by the hour.
use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::AggregatorError;

/// A data centre's hourly intensity file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityFile {
    pub datacenter: String,
    pub path: PathBuf,
    /// `csv`, `carbon_aware` or `electricity_maps` (see [`FORMATS`]).
    pub format: String,
}

/// Hour start (unix s) -> g CO2e per kWh.
pub type HourlyIntensity = BTreeMap<u64, f64>;

/// The formats a series can come in.
pub const FORMATS: [&str; 3] = ["csv", "carbon_aware", "electricity_maps"];

fn bad(path: &Path, message: String) -> AggregatorError {
    AggregatorError::Invalid(format!("{}: {message}", path.display()))
}

fn timestamp(text: &str) -> Option<u64> {
    if let Ok(s) = text.trim().parse::<u64>() {
        return Some(s);
    }
    agent_common::time_text::parse_rfc3339(text.trim())
        .ok()
        .and_then(|t| u64::try_from(t.as_second()).ok())
}

/// Averages (time, value, weight) points into hours.
fn hourly(points: impl IntoIterator<Item = (u64, f64, f64)>) -> HourlyIntensity {
    let mut sums: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (t, v, w) in points {
        let e = sums.entry(t / 3600 * 3600).or_default();
        e.0 += v * w;
        e.1 += w;
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(h, (s, w))| (h, s / w))
        .collect()
}

fn check_value(path: &Path, at: &str, v: f64) -> Result<f64, AggregatorError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(bad(
            path,
            format!("{at}: intensity {v} is not a non-negative number"),
        ))
    }
}

/// Parses the agents' CSV.
pub fn parse_csv(text: &str, path: &Path) -> Result<HourlyIntensity, AggregatorError> {
    let mut points = Vec::new();
    let mut first = true;
    for (n, raw) in text.lines().enumerate() {
        let row = raw.trim();
        if row.is_empty() || row.starts_with('#') {
            continue;
        }
        let at = format!("line {}", n + 1);
        let fields: Vec<&str> = row.split(',').map(str::trim).collect();
        if fields.len() != 2 {
            return Err(bad(
                path,
                format!("{at}: expected `timestamp,g_per_kwh`: {row:?}"),
            ));
        }
        let was_first = first;
        first = false;
        let Some(t) = timestamp(fields[0]) else {
            if was_first && fields[1].parse::<f64>().is_err() {
                continue; // header
            }
            return Err(bad(
                path,
                format!(
                    "{at}: timestamp {:?} is neither unix seconds nor RFC 3339",
                    fields[0]
                ),
            ));
        };
        let v: f64 = fields[1]
            .parse()
            .map_err(|_| bad(path, format!("{at}: {:?} is not a number", fields[1])))?;
        points.push((t, check_value(path, &at, v)?, 1.0));
    }
    Ok(hourly(points))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CasPoint {
    timestamp: String,
    /// Minutes.
    #[serde(default)]
    duration: Option<f64>,
    value: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CasForecast {
    forecast_data: Vec<CasPoint>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CasDocument {
    Many(Vec<CasForecast>),
    One(CasForecast),
}

/// Parses the Carbon Aware SDK's forecast JSON.
pub fn parse_carbon_aware(text: &str, path: &Path) -> Result<HourlyIntensity, AggregatorError> {
    let doc: CasDocument = serde_json::from_str(text)
        .map_err(|e| bad(path, format!("not Carbon Aware SDK forecast JSON: {e}")))?;
    let forecasts = match doc {
        CasDocument::Many(v) => v,
        CasDocument::One(f) => vec![f],
    };
    let mut points = Vec::new();
    for (i, p) in forecasts.iter().flat_map(|f| &f.forecast_data).enumerate() {
        let at = format!("forecastData[{i}]");
        let t = timestamp(&p.timestamp).ok_or_else(|| {
            bad(
                path,
                format!("{at}: timestamp {:?} is not RFC 3339", p.timestamp),
            )
        })?;
        points.push((
            t,
            check_value(path, &at, p.value)?,
            p.duration.unwrap_or(60.0).max(0.0),
        ));
    }
    Ok(hourly(points))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmPoint {
    carbon_intensity: Option<f64>,
    datetime: String,
}

#[derive(Deserialize)]
struct EmDocument {
    #[serde(default)]
    history: Vec<EmPoint>,
    #[serde(default)]
    forecast: Vec<EmPoint>,
}

/// Parses Electricity Maps' history or forecast JSON.
pub fn parse_electricity_maps(text: &str, path: &Path) -> Result<HourlyIntensity, AggregatorError> {
    let doc: EmDocument = serde_json::from_str(text)
        .map_err(|e| bad(path, format!("not Electricity Maps JSON: {e}")))?;
    let mut points = Vec::new();
    for (i, p) in doc.history.iter().chain(&doc.forecast).enumerate() {
        let at = format!("point {i}");
        let t = timestamp(&p.datetime).ok_or_else(|| {
            bad(
                path,
                format!("{at}: datetime {:?} is not RFC 3339", p.datetime),
            )
        })?;
        // Electricity Maps leaves carbonIntensity null where it has no estimate.
        if let Some(v) = p.carbon_intensity {
            points.push((t, check_value(path, &at, v)?, 1.0));
        }
    }
    Ok(hourly(points))
}

/// Reads `path` in `format`.
pub fn read(path: &Path, format: &str) -> Result<HourlyIntensity, AggregatorError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AggregatorError::io(format!("reading intensity file {}", path.display()), e)
    })?;
    match format {
        "csv" => parse_csv(&text, path),
        "carbon_aware" => parse_carbon_aware(&text, path),
        "electricity_maps" => parse_electricity_maps(&text, path),
        other => Err(bad(
            path,
            format!("format {other:?}: use {}", FORMATS.join(", ")),
        )),
    }
}

/// A data centre's intensity for the hours in `[start, end)`: its file
/// (`[[scheduling.intensity]]`), else the mean measured intensity of the
/// same hour of the day over `history` (a persistence forecast); and where
/// it came from.
pub fn for_hours(
    store: &dyn crate::store::Store,
    files: &[IntensityFile],
    datacenter: &str,
    history: &crate::store::Range,
    start: u64,
    end: u64,
) -> Result<(HourlyIntensity, String), AggregatorError> {
    if let Some(f) = files.iter().find(|f| f.datacenter == datacenter) {
        return Ok((
            read(&f.path, &f.format)?,
            format!("{} ({})", f.path.display(), f.format),
        ));
    }
    let mut by_hod: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for r in store.intensity_hours(&crate::store::Range {
        period_s: store.layout().step_s,
        ..*history
    })? {
        if r.datacenter == datacenter {
            let e = by_hod.entry(r.hour_unix_s % 86_400 / 3600).or_default();
            e.0 += r.intensity_x_s;
            e.1 += r.host_s;
        }
    }
    let series = (start / 3600 * 3600..end)
        .step_by(3600)
        .filter_map(|h| {
            by_hod
                .get(&(h % 86_400 / 3600))
                .filter(|(_, s)| *s > 0.0)
                .map(|(x, s)| (h, x / s))
        })
        .collect();
    Ok((
        series,
        "measured: mean intensity of the same hour of the day over the history (persistence forecast)"
            .to_string(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_three_formats_give_the_same_hours() {
        let p = Path::new("x");
        let csv = parse_csv(
            "timestamp,g_per_kwh\n2025-12-01T00:00:00Z,500\n1764550800,300\n",
            p,
        )
        .unwrap();
        // Two 30-minute points in hour 0 (400 and 600) average to 500.
        let cas = parse_carbon_aware(
            r#"[{"location":"eastus","forecastData":[
                {"location":"eastus","timestamp":"2025-12-01T00:00:00Z","duration":30,"value":400},
                {"location":"eastus","timestamp":"2025-12-01T00:30:00Z","duration":30,"value":600},
                {"location":"eastus","timestamp":"2025-12-01T01:00:00Z","duration":60,"value":300}]}]"#,
            p,
        )
        .unwrap();
        let em = parse_electricity_maps(
            r#"{"zone":"CN","history":[{"carbonIntensity":500,"datetime":"2025-12-01T00:00:00.000Z"},
                {"carbonIntensity":null,"datetime":"2025-12-01T02:00:00.000Z"}],
                "forecast":[{"carbonIntensity":300,"datetime":"2025-12-01T01:00:00.000Z"}]}"#,
            p,
        )
        .unwrap();
        let expected = BTreeMap::from([(1_764_547_200, 500.0), (1_764_550_800, 300.0)]);
        assert_eq!(csv, expected);
        assert_eq!(cas, expected);
        assert_eq!(em, expected);
        let e = parse_csv("1764547200,-3\n", p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("-3"), "{e}");
    }
}
