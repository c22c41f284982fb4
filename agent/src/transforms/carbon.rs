//! Carbon: operational `O = E x I x PUE` and embodied `M = TE x (TiR / EL) x (RR / ToR)`.
//!
//! `I` (gCO2e/kWh) is a static value, a named Chinese grid (2023 factors of
//! the Ministry of Ecology and Environment and the National Bureau of
//! Statistics; they count CO2 only and are used as CO2e), or an hourly time
//! series file whose value in force at the window's midpoint is used. `M`
//! follows the SCI specification: `TE` is the host's total embodied carbon,
//! `TiR` the window length, `EL` the expected lifetime, and `RR / ToR` the
//! share of the host used: 1 for the host's own figure, the process's share
//! of busy CPU time for a process.
//!
//! A process's `carbon_g` covers its dynamic energy plus its idle share
//! (`energy_j + idle_share_j`).
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::window::WindowReport;

/// China national grid average, 2023 (g CO2 per kWh).
pub const CHINA_GRID_2023_G_PER_KWH: f64 = 530.6;
/// Hours in a year of the embodied-carbon lifetime (365 days).
pub const HOURS_PER_YEAR: f64 = 8760.0;
const J_PER_KWH: f64 = 3.6e6;

/// Grids of China, 2023 factors (g CO2 per kWh) from the announcement of the Ministry of
/// Ecology and Environment and the National Bureau of Statistics on the 2023 electricity
/// CO2 emission factors: the national and regional averages, the national average
/// without market-traded non-fossil electricity (`residual`, for buyers of green power
/// who account for it separately) and the national fossil-fuel factor (`fossil`).
pub const CHINA_REGIONAL_GRIDS_2023: [(&str, f64); 10] = [
    ("china", 530.6),
    ("north", 636.1),
    ("northeast", 512.2),
    ("east", 550.0),
    ("central", 527.1),
    ("northwest", 554.3),
    ("south", 404.2),
    ("southwest", 247.2),
    ("residual", 609.6),
    ("fossil", 827.3),
];

/// `[carbon]` section of agent.toml. At most one of `intensity_g_per_kwh`,
/// `grid`, `intensity_file`; none means the China national average.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarbonConfig {
    /// Static grid intensity in gCO2e/kWh.
    pub intensity_g_per_kwh: Option<f64>,
    /// Named grid: `china`, `north`, `northeast`, `east`, `central`, `northwest`, `south`,
    /// `southwest`, `residual`, `fossil` (see [`CHINA_REGIONAL_GRIDS_2023`]).
    pub grid: Option<String>,
    /// CSV file of `timestamp,g_per_kwh` rows (unix seconds or RFC 3339), hourly.
    pub intensity_file: Option<PathBuf>,
    /// Power usage effectiveness of the data centre (>= 1).
    pub pue: f64,
    /// Total embodied carbon of the host TE, kgCO2e.
    pub embodied_kg_per_host: f64,
    /// Expected lifetime of the host EL, years.
    pub lifetime_years: f64,
}

impl Default for CarbonConfig {
    fn default() -> Self {
        CarbonConfig {
            intensity_g_per_kwh: None,
            grid: None,
            intensity_file: None,
            pue: 1.0,
            embodied_kg_per_host: 1000.0,
            lifetime_years: 4.0,
        }
    }
}

/// Errors of the carbon transform.
#[derive(Debug, thiserror::Error)]
pub enum CarbonError {
    #[error("invalid carbon config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    BadRow {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no intensity in force at unix time {at_unix_s:.0} ({reason})")]
    NoIntensity {
        path: PathBuf,
        at_unix_s: f64,
        reason: String,
    },
}

/// Where the grid intensity comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum IntensitySource {
    Static(f64),
    /// Rows sorted by time: (unix seconds, g/kWh), each in force until the next one.
    Series {
        path: PathBuf,
        rows: Vec<(f64, f64)>,
    },
}

/// Length of time the last row of a series stays in force.
pub const SERIES_LAST_ROW_VALID_S: f64 = 3600.0;

impl IntensitySource {
    /// Intensity in force at `unix_s`.
    pub fn at(&self, unix_s: f64) -> Result<f64, CarbonError> {
        match self {
            IntensitySource::Static(v) => Ok(*v),
            IntensitySource::Series { path, rows } => {
                let idx = rows.partition_point(|r| r.0 <= unix_s);
                if idx == 0 {
                    return Err(CarbonError::NoIntensity {
                        path: path.clone(),
                        at_unix_s: unix_s,
                        reason: format!(
                            "the file starts at {}",
                            rows.first().map(|r| r.0).unwrap_or(0.0)
                        ),
                    });
                }
                let (start, value) = rows[idx - 1];
                if idx == rows.len() && unix_s >= start + SERIES_LAST_ROW_VALID_S {
                    return Err(CarbonError::NoIntensity {
                        path: path.clone(),
                        at_unix_s: unix_s,
                        reason: format!("the last row ({start:.0}) is more than an hour old"),
                    });
                }
                Ok(value)
            }
        }
    }

    /// Read an intensity CSV: `timestamp,g_per_kwh` per line, timestamps in unix
    /// seconds or RFC 3339, strictly increasing; `#` comments, blank lines and a
    /// header line are allowed.
    pub fn load_csv(path: &Path) -> Result<IntensitySource, CarbonError> {
        let text = std::fs::read_to_string(path).map_err(|source| CarbonError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_csv(&text, path)
    }

    pub fn parse_csv(text: &str, path: &Path) -> Result<IntensitySource, CarbonError> {
        let mut rows: Vec<(f64, f64)> = Vec::new();
        let mut seen_content = false;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let row = raw.trim();
            if row.is_empty() || row.starts_with('#') {
                continue;
            }
            let bad = |reason: String| CarbonError::BadRow {
                path: path.to_path_buf(),
                line,
                reason,
            };
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            if fields.len() != 2 {
                return Err(bad(format!(
                    "expected 2 fields `timestamp,g_per_kwh`, found {}: {row:?}",
                    fields.len()
                )));
            }
            let first = !seen_content;
            seen_content = true;
            let time = match parse_timestamp(fields[0]) {
                Some(t) => t,
                None if first && fields[1].parse::<f64>().is_err() => continue, // header
                None => {
                    return Err(bad(format!(
                        "timestamp {:?} is neither unix seconds nor RFC 3339",
                        fields[0]
                    )))
                }
            };
            let value = fields[1]
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    bad(format!(
                        "intensity {:?} is not a non-negative number of g/kWh",
                        fields[1]
                    ))
                })?;
            if let Some(&(previous, _)) = rows.last() {
                if time <= previous {
                    return Err(bad(format!(
                        "timestamp {:?} is not after the previous row",
                        fields[0]
                    )));
                }
            }
            rows.push((time, value));
        }
        if rows.is_empty() {
            return Err(CarbonError::BadRow {
                path: path.to_path_buf(),
                line: 0,
                reason: "no data rows".to_string(),
            });
        }
        Ok(IntensitySource::Series {
            path: path.to_path_buf(),
            rows,
        })
    }
}

/// Unix seconds from `1700000000` or an RFC 3339 time (`2024-01-01T08:00:00+08:00`, `...Z`).
pub fn parse_timestamp(text: &str) -> Option<f64> {
    if let Ok(secs) = text.parse::<i64>() {
        return Some(secs as f64);
    }
    parse_rfc3339(text)
}

fn parse_rfc3339(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut fraction = 0.0;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let digits = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        fraction = format!("0.{}", &after_dot[..digits]).parse().ok()?;
        rest = &after_dot[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let (oh, om) = (
                rest[1..3].parse::<i64>().ok()?,
                rest[4..6].parse::<i64>().ok()?,
            );
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset_s) as f64 + fraction)
}

/// Intensity of a named grid (`china`, `north`, ... see [`CHINA_REGIONAL_GRIDS_2023`]);
/// a `china-` prefix is accepted (`china-east`).
pub fn grid_intensity_g_per_kwh(name: &str) -> Option<f64> {
    let key = name.trim().to_ascii_lowercase();
    let key = key.strip_prefix("china-").unwrap_or(&key);
    CHINA_REGIONAL_GRIDS_2023
        .iter()
        .find(|(n, _)| *n == key)
        .map(|(_, v)| *v)
}

/// Operational carbon in grams of `energy_j` joules: `E[kWh] x I x PUE`.
pub fn operational_carbon_g(energy_j: f64, intensity_g_per_kwh: f64, pue: f64) -> f64 {
    energy_j / J_PER_KWH * intensity_g_per_kwh * pue
}

/// Embodied carbon in grams: `TE x (TiR / EL) x (RR / ToR)`.
pub fn embodied_carbon_g(
    total_embodied_kg: f64,
    window_s: f64,
    lifetime_years: f64,
    resource_share: f64,
) -> f64 {
    total_embodied_kg * 1000.0 * window_s / (lifetime_years * HOURS_PER_YEAR * 3600.0)
        * resource_share
}

/// Fills the carbon fields of a window.
#[derive(Debug, Clone)]
pub struct CarbonTransform {
    intensity: IntensitySource,
    pue: f64,
    embodied_kg_per_host: f64,
    lifetime_years: f64,
}

impl CarbonTransform {
    pub fn from_config(cfg: &CarbonConfig) -> Result<CarbonTransform, CarbonError> {
        let chosen = [
            cfg.intensity_g_per_kwh.is_some(),
            cfg.grid.is_some(),
            cfg.intensity_file.is_some(),
        ];
        if chosen.iter().filter(|c| **c).count() > 1 {
            return Err(CarbonError::Config(
                "set only one of carbon.intensity_g_per_kwh, carbon.grid, carbon.intensity_file"
                    .to_string(),
            ));
        }
        let intensity = if let Some(v) = cfg.intensity_g_per_kwh {
            if !v.is_finite() || v < 0.0 {
                return Err(CarbonError::Config(format!(
                    "carbon.intensity_g_per_kwh = {v} must be a non-negative number"
                )));
            }
            IntensitySource::Static(v)
        } else if let Some(name) = &cfg.grid {
            let names: Vec<&str> = CHINA_REGIONAL_GRIDS_2023.iter().map(|g| g.0).collect();
            IntensitySource::Static(grid_intensity_g_per_kwh(name).ok_or_else(|| {
                CarbonError::Config(format!(
                    "carbon.grid = {name:?} is not one of {}",
                    names.join(", ")
                ))
            })?)
        } else if let Some(path) = &cfg.intensity_file {
            IntensitySource::load_csv(path)?
        } else {
            IntensitySource::Static(CHINA_GRID_2023_G_PER_KWH)
        };
        if !cfg.pue.is_finite() || cfg.pue < 1.0 {
            return Err(CarbonError::Config(format!(
                "carbon.pue = {} must be at least 1.0",
                cfg.pue
            )));
        }
        if !cfg.embodied_kg_per_host.is_finite() || cfg.embodied_kg_per_host < 0.0 {
            return Err(CarbonError::Config(format!(
                "carbon.embodied_kg_per_host = {} must be a non-negative number",
                cfg.embodied_kg_per_host
            )));
        }
        if !cfg.lifetime_years.is_finite() || cfg.lifetime_years <= 0.0 {
            return Err(CarbonError::Config(format!(
                "carbon.lifetime_years = {} must be above 0",
                cfg.lifetime_years
            )));
        }
        Ok(CarbonTransform {
            intensity,
            pue: cfg.pue,
            embodied_kg_per_host: cfg.embodied_kg_per_host,
            lifetime_years: cfg.lifetime_years,
        })
    }

    pub fn intensity(&self) -> &IntensitySource {
        &self.intensity
    }

    /// Fill intensity, PUE, host and per-process carbon of a report whose energy
    /// is attributed. On error (no intensity for the window) nothing is changed.
    pub fn apply(&self, report: &mut WindowReport) -> Result<(), CarbonError> {
        let midpoint_s = (report.start_unix_ns as f64 + report.end_unix_ns as f64) / 2.0 / 1e9;
        let intensity = self.intensity.at(midpoint_s)?;
        let window_s = report.duration_ns() as f64 / 1e9;
        report.carbon_intensity_g_per_kwh = intensity;
        report.pue = self.pue;
        report.host_carbon_g = operational_carbon_g(report.host_energy_j, intensity, self.pue);
        report.host_embodied_g = embodied_carbon_g(
            self.embodied_kg_per_host,
            window_s,
            self.lifetime_years,
            1.0,
        );
        let busy_ns: u64 = report
            .processes
            .iter()
            .map(|p| p.cpu_ns)
            .sum::<u64>()
            .max(report.busy_cpu_ns);
        for p in &mut report.processes {
            p.carbon_g = operational_carbon_g(p.energy_j + p.idle_share_j, intensity, self.pue);
            p.embodied_g = if busy_ns > 0 {
                report.host_embodied_g * p.cpu_ns as f64 / busy_ns as f64
            } else {
                0.0
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_timestamp("2024-01-01T00:00:00Z"),
            Some(1_704_067_200.0)
        );
        assert_eq!(
            parse_timestamp("2024-01-01T08:00:00+08:00"),
            Some(1_704_067_200.0)
        );
        assert_eq!(
            parse_timestamp("2024-02-29T12:30:00.5-01:00"),
            Some(1_709_213_400.5)
        );
        assert_eq!(parse_timestamp("1704067200"), Some(1_704_067_200.0));
        for bad in [
            "2024-13-01T00:00:00Z",
            "2024-01-01",
            "yesterday",
            "2024-01-01T00:00:00+8",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn grids() {
        assert_eq!(grid_intensity_g_per_kwh("South"), Some(404.2));
        assert_eq!(grid_intensity_g_per_kwh("china-southwest"), Some(247.2));
        assert_eq!(grid_intensity_g_per_kwh("china-fossil"), Some(827.3));
        assert_eq!(grid_intensity_g_per_kwh("mars"), None);
    }
}
