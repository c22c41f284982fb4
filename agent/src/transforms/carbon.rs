//! Carbon: operational `O = E x I x PUE` and embodied `M = TE x (TiR / EL) x (RR / ToR)`.
//!
//! `I` (gCO2e/kWh) is a static value, a named Chinese grid (2023 factors of
//! the Ministry of Ecology and Environment and the National Bureau of
//! Statistics; they count CO2 only and are used as CO2e), or an hourly time
//! series file whose value in force at the window's midpoint is used. `M`
//! follows the SCI specification: `TE` is the host's total embodied carbon,
//! `TiR` the window length, `EL` the expected lifetime, and `RR / ToR` the
//! share of the physical machine this host reserves: 1 for bare metal; for a
//! virtual machine (the CPU's `hypervisor` flag or a hypervisor's DMI
//! product, or `carbon.host_kind = "vm"`; never the energy source that
//! happened to work) its vCPUs over the physical host's
//! (`carbon.physical_host_vcpus`, default [`DEFAULT_PHYSICAL_HOST_VCPUS`]),
//! the share the SCI specification and Cloud Carbon Footprint use; or
//! `carbon.resource_share` as configured. A process gets the host's M in
//! proportion to its share of busy CPU time. Every window carries TE, EL,
//! the share and where the share came from, and the intensity's source.
//!
//! A process's `carbon_g` covers its dynamic energy plus its idle share
//! (`energy_j + idle_share_j`).
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::window::{EmbodiedFactors, WindowReport};

/// vCPUs of the physical machine a VM is assumed to share when
/// `carbon.physical_host_vcpus` is not set: a two-socket, 24-core-per-socket
/// server with SMT, the whole host of the common general-purpose cloud
/// families (e.g. AWS m5.24xlarge = m5.metal = 96 vCPUs). Cloud Carbon
/// Footprint takes the largest size of an instance family as the physical
/// host in the same way. Set the real figure where it is known.
pub const DEFAULT_PHYSICAL_HOST_VCPUS: u32 = 96;

/// What kind of machine the agent runs on, for the embodied share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// Found from the CPU flags and DMI (see [`detect_host_kind`]), never
    /// from which energy source happened to work.
    #[default]
    Auto,
    Vm,
    BareMetal,
}

/// What [`detect_host_kind`] found, with the evidence (disclosed in the
/// window's `share_source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDetection {
    pub vm: bool,
    pub evidence: String,
}

/// DMI product names that only virtual machines report (a hypervisor that
/// hides the CPU's `hypervisor` flag still names itself here). Vendors alone
/// are not enough: a bare-metal cloud instance reports its cloud's vendor.
const VM_DMI_PRODUCTS: [&str; 9] = [
    "kvm",
    "qemu",
    "vmware",
    "virtualbox",
    "virtual machine",
    "hvm domu",
    "bochs",
    "parallels",
    "cloud hypervisor",
];

/// Bare metal or VM, from the `hypervisor` flag of `cpuinfo` (set by every
/// x86 hypervisor that follows the CPUID convention) and, without it, the
/// DMI product name and vendor under `dmi_dir` (`/sys/class/dmi/id`).
pub fn detect_host_kind(cpuinfo: &Path, dmi_dir: &Path) -> HostDetection {
    let flags = std::fs::read_to_string(cpuinfo).ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    });
    if flags == Some(true) {
        return HostDetection {
            vm: true,
            evidence: format!("CPU flag hypervisor ({})", cpuinfo.display()),
        };
    }
    let dmi = |file: &str| {
        std::fs::read_to_string(dmi_dir.join(file))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    let (product, vendor) = (dmi("product_name"), dmi("sys_vendor"));
    for text in [&product, &vendor].into_iter().flatten() {
        let lower = text.to_lowercase();
        if VM_DMI_PRODUCTS.iter().any(|p| lower.contains(p)) {
            return HostDetection {
                vm: true,
                evidence: format!("DMI names a hypervisor: {text:?}"),
            };
        }
    }
    let flags_text = match flags {
        Some(_) => "no CPU flag hypervisor".to_string(),
        None => format!("{} has no flags line", cpuinfo.display()),
    };
    let dmi_text = match (&product, &vendor) {
        (None, None) => format!("no DMI under {}", dmi_dir.display()),
        _ => format!(
            "DMI {:?} / {:?} names no hypervisor",
            vendor.as_deref().unwrap_or("-"),
            product.as_deref().unwrap_or("-")
        ),
    };
    HostDetection {
        vm: false,
        evidence: format!("{flags_text}, {dmi_text}"),
    }
}

/// What the host says about the carbon of its electricity and of the VM's share of it
/// (a hypervisor's agent gives them to its guests).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct HostFactors {
    pub host: String,
    pub intensity_g_per_kwh: f64,
    pub intensity_source: String,
    pub pue: f64,
    /// RR/ToR of the VM: its vCPUs over the physical host's.
    pub resource_share: f64,
    pub share_source: String,
}

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
    /// RR/ToR: the share of the physical machine this host reserves (0 < x <= 1);
    /// overrides the default below.
    pub resource_share: Option<f64>,
    /// `auto` (default), `vm` or `bare_metal`: a VM's default share is its
    /// vCPUs over `physical_host_vcpus`, bare metal's is 1.
    pub host_kind: HostKind,
    /// vCPUs of the physical machine under a VM (default 96, see
    /// [`DEFAULT_PHYSICAL_HOST_VCPUS`]).
    pub physical_host_vcpus: Option<u32>,
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
            resource_share: None,
            host_kind: HostKind::Auto,
            physical_host_vcpus: None,
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
    let t = agent_common::time_text::parse_rfc3339(text).ok()?;
    Some(t.as_second() as f64 + f64::from(t.subsec_nanosecond()) / 1e9)
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
/// Highest intensity and PUE the agent accepts in its configuration (the
/// aggregator's defaults for `max_intensity_g_per_kwh` and `max_pue`).
pub const MAX_INTENSITY_G_PER_KWH: f64 = 2_000.0;
pub const MAX_PUE: f64 = 5.0;

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
    total_embodied_kg * 1000.0 * window_s / lifespan_s(lifetime_years) * resource_share
}

/// Fills the carbon fields of a window.
#[derive(Debug, Clone)]
pub struct CarbonTransform {
    intensity: IntensitySource,
    /// Where the intensity comes from, as disclosed in each window.
    intensity_source: String,
    pue: f64,
    embodied_kg_per_host: f64,
    lifetime_years: f64,
    resource_share: Option<f64>,
    host_kind: HostKind,
    /// What `host_kind = auto` found at start-up.
    detected: HostDetection,
    physical_host_vcpus: u32,
}

/// Seconds in the expected lifetime `EL`.
fn lifespan_s(lifetime_years: f64) -> f64 {
    lifetime_years * HOURS_PER_YEAR * 3600.0
}

impl CarbonTransform {
    /// From the `[carbon]` section; `host_kind = auto` is resolved from this
    /// machine's `/proc/cpuinfo` and `/sys/class/dmi/id`.
    pub fn from_config(cfg: &CarbonConfig) -> Result<CarbonTransform, CarbonError> {
        let detected = match cfg.host_kind {
            HostKind::Auto => {
                detect_host_kind(Path::new("/proc/cpuinfo"), Path::new("/sys/class/dmi/id"))
            }
            HostKind::Vm | HostKind::BareMetal => HostDetection {
                vm: false,
                evidence: String::new(),
            },
        };
        Self::with_detection(cfg, detected)
    }

    /// [`Self::from_config`] with what detection found (tests); a
    /// `host_kind` other than `auto` overrides it.
    pub fn with_detection(
        cfg: &CarbonConfig,
        detected: HostDetection,
    ) -> Result<CarbonTransform, CarbonError> {
        let detected = match cfg.host_kind {
            HostKind::Auto => detected,
            kind => HostDetection {
                vm: kind == HostKind::Vm,
                evidence: "carbon.host_kind".to_string(),
            },
        };
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
        const MEE_NBS_2023: &str =
            "2023 electricity CO2 emission factors of the Ministry of Ecology and Environment and the National Bureau of Statistics";
        let (intensity, intensity_source) = if let Some(v) = cfg.intensity_g_per_kwh {
            if !v.is_finite() || !(0.0..=MAX_INTENSITY_G_PER_KWH).contains(&v) {
                return Err(CarbonError::Config(format!(
                    "carbon.intensity_g_per_kwh = {v} must be between 0 and {MAX_INTENSITY_G_PER_KWH} (the aggregator refuses windows above its max_intensity_g_per_kwh)"
                )));
            }
            (
                IntensitySource::Static(v),
                "config: carbon.intensity_g_per_kwh".to_string(),
            )
        } else if let Some(name) = &cfg.grid {
            let names: Vec<&str> = CHINA_REGIONAL_GRIDS_2023.iter().map(|g| g.0).collect();
            let value = grid_intensity_g_per_kwh(name).ok_or_else(|| {
                CarbonError::Config(format!(
                    "carbon.grid = {name:?} is not one of {}",
                    names.join(", ")
                ))
            })?;
            (
                IntensitySource::Static(value),
                format!("grid {name}: {MEE_NBS_2023}"),
            )
        } else if let Some(path) = &cfg.intensity_file {
            (
                IntensitySource::load_csv(path)?,
                format!(
                    "file {}: hourly series, value in force at the window's midpoint",
                    path.display()
                ),
            )
        } else {
            (
                IntensitySource::Static(CHINA_GRID_2023_G_PER_KWH),
                format!("default: China national average, {MEE_NBS_2023}"),
            )
        };
        if !cfg.pue.is_finite() || !(1.0..=MAX_PUE).contains(&cfg.pue) {
            return Err(CarbonError::Config(format!(
                "carbon.pue = {} must be between 1.0 and {MAX_PUE}",
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
        if let Some(share) = cfg.resource_share {
            if !share.is_finite() || share <= 0.0 || share > 1.0 {
                return Err(CarbonError::Config(format!(
                    "carbon.resource_share = {share} must be above 0 and at most 1"
                )));
            }
        }
        if cfg.physical_host_vcpus == Some(0) {
            return Err(CarbonError::Config(
                "carbon.physical_host_vcpus must be at least 1".to_string(),
            ));
        }
        Ok(CarbonTransform {
            intensity,
            intensity_source,
            pue: cfg.pue,
            embodied_kg_per_host: cfg.embodied_kg_per_host,
            lifetime_years: cfg.lifetime_years,
            resource_share: cfg.resource_share,
            host_kind: cfg.host_kind,
            detected,
            physical_host_vcpus: cfg
                .physical_host_vcpus
                .unwrap_or(DEFAULT_PHYSICAL_HOST_VCPUS),
        })
    }

    /// RR/ToR of this host for a window, and where it came from.
    pub fn resource_share(&self, report: &WindowReport) -> (f64, String) {
        if let Some(share) = self.resource_share {
            return (share, "config: carbon.resource_share".to_string());
        }
        let why = match self.host_kind {
            HostKind::Vm => "carbon.host_kind = vm".to_string(),
            HostKind::BareMetal => "carbon.host_kind = bare_metal".to_string(),
            HostKind::Auto => self.detected.evidence.clone(),
        };
        match self.detected.vm {
            false => (1.0, format!("bare metal ({why}): the whole machine")),
            true => {
                let vcpus = report.cpus.max(1);
                let share = (f64::from(vcpus) / f64::from(self.physical_host_vcpus)).min(1.0);
                let host = if self.physical_host_vcpus == DEFAULT_PHYSICAL_HOST_VCPUS {
                    format!(
                        "{} vCPUs of the physical host (default: carbon.physical_host_vcpus not set)",
                        self.physical_host_vcpus
                    )
                } else {
                    format!(
                        "{} vCPUs of the physical host (carbon.physical_host_vcpus)",
                        self.physical_host_vcpus
                    )
                };
                (share, format!("vm ({why}): {vcpus} vCPUs / {host}"))
            }
        }
    }

    /// Where the intensity comes from (disclosed in each window).
    pub fn intensity_source(&self) -> &str {
        &self.intensity_source
    }

    pub fn intensity(&self) -> &IntensitySource {
        &self.intensity
    }

    /// Fill intensity, PUE, host and per-process carbon of a report whose energy
    /// is attributed. On error (no intensity for the window) nothing is changed.
    pub fn apply(&self, report: &mut WindowReport) -> Result<(), CarbonError> {
        self.apply_with_host(report, None)
    }

    /// [`Self::apply`], with the intensity, PUE and embodied share a
    /// hypervisor's agent gave (a guest measured through its host) in place
    /// of this agent's own.
    pub fn apply_with_host(
        &self,
        report: &mut WindowReport,
        host: Option<&HostFactors>,
    ) -> Result<(), CarbonError> {
        let window_s = report.duration_ns() as f64 / 1e9;
        let (intensity, pue, share, share_source, intensity_source) = match host {
            Some(h) => (
                h.intensity_g_per_kwh,
                h.pue,
                h.resource_share,
                h.share_source.clone(),
                format!("hypervisor {}: {}", h.host, h.intensity_source),
            ),
            None => {
                let midpoint_s =
                    (report.start_unix_ns as f64 + report.end_unix_ns as f64) / 2.0 / 1e9;
                let (share, share_source) = self.resource_share(report);
                (
                    self.intensity.at(midpoint_s)?,
                    self.pue,
                    share,
                    share_source,
                    self.intensity_source.clone(),
                )
            }
        };
        report.carbon_intensity_g_per_kwh = intensity;
        report.pue = pue;
        report.host_carbon_g = operational_carbon_g(report.host_energy_j, intensity, pue);
        report.intensity_source = intensity_source;
        report.embodied = EmbodiedFactors {
            total_embodied_g: self.embodied_kg_per_host * 1000.0,
            lifespan_s: lifespan_s(self.lifetime_years),
            resource_share: share,
            share_source,
        };
        report.host_embodied_g = embodied_carbon_g(
            self.embodied_kg_per_host,
            window_s,
            self.lifetime_years,
            share,
        );
        let busy_ns: u64 = report
            .processes
            .iter()
            .map(|p| p.cpu_ns)
            .sum::<u64>()
            .max(report.busy_cpu_ns);
        for p in &mut report.processes {
            p.carbon_g = operational_carbon_g(p.energy_j + p.idle_share_j, intensity, pue);
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
    #![allow(clippy::unwrap_used)]
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

    fn window(cpus: u32, estimated: bool) -> WindowReport {
        let mut report = WindowReport::new(
            "h".into(),
            "i".into(),
            1_704_067_200_000_000_000,
            1_704_070_800_000_000_000,
            crate::window::CpuSource::Ebpf,
            cpus,
        );
        report.estimated = estimated;
        report
    }

    fn detected(vm: bool) -> HostDetection {
        HostDetection {
            vm,
            evidence: if vm {
                "CPU flag hypervisor"
            } else {
                "no CPU flag hypervisor"
            }
            .into(),
        }
    }

    #[test]
    fn a_vm_reserves_its_vcpus_share_of_the_physical_host() {
        let t = CarbonTransform::with_detection(&CarbonConfig::default(), detected(true))
            .expect("config");
        // A VM. 2 vCPUs of the default 96: M = 1e6 g / 35040 h x 1 h x 2/96.
        let mut vm = window(2, true);
        t.apply(&mut vm).expect("apply");
        assert_eq!(vm.embodied.resource_share, 2.0 / 96.0);
        assert!((vm.host_embodied_g - 1.0e6 / 35_040.0 * 2.0 / 96.0).abs() < 1e-9);
        assert_eq!(vm.embodied.total_embodied_g, 1.0e6);
        assert_eq!(vm.embodied.lifespan_s, 4.0 * 8760.0 * 3600.0);
        assert!(
            vm.embodied.share_source.contains("2 vCPUs / 96"),
            "{}",
            vm.embodied.share_source
        );
        assert!(vm.embodied.share_source.contains("default"));
        assert!(vm.intensity_source.contains("China national average"));
        assert!(vm.embodied.share_source.contains("CPU flag hypervisor"));
        // The energy source does not change what the host is: a VM whose
        // window is measured keeps its share.
        let mut measured = window(2, false);
        t.apply(&mut measured).expect("apply");
        assert_eq!(measured.embodied.resource_share, 2.0 / 96.0);
        // Bare metal keeps the whole machine, estimated or not.
        let t = CarbonTransform::with_detection(&CarbonConfig::default(), detected(false))
            .expect("config");
        for estimated in [false, true] {
            let mut metal = window(2, estimated);
            t.apply(&mut metal).expect("apply");
            assert_eq!(metal.embodied.resource_share, 1.0);
            assert!(metal.embodied.share_source.starts_with("bare metal"));
        }
    }

    #[test]
    fn host_kind_from_cpu_flags_and_dmi() {
        let dir = tempfile::tempdir().unwrap();
        let cpuinfo = dir.path().join("cpuinfo");
        let dmi = dir.path().join("dmi");
        std::fs::create_dir(&dmi).unwrap();
        let flags = |extra: &str| {
            std::fs::write(
                &cpuinfo,
                format!("processor\t: 0\nflags\t\t: fpu vme sse2 {extra} rdrand\n"),
            )
            .unwrap()
        };
        flags("hypervisor");
        let d = detect_host_kind(&cpuinfo, &dmi);
        assert!(d.vm && d.evidence.contains("CPU flag hypervisor"), "{d:?}");
        // A hypervisor that hides the flag still names itself in DMI.
        flags("");
        std::fs::write(dmi.join("sys_vendor"), "QEMU\n").unwrap();
        std::fs::write(dmi.join("product_name"), "Standard PC (Q35 + ICH9, 2009)\n").unwrap();
        let d = detect_host_kind(&cpuinfo, &dmi);
        assert!(d.vm && d.evidence.contains("QEMU"), "{d:?}");
        // A bare-metal cloud instance: the cloud's vendor is not a hypervisor.
        std::fs::write(dmi.join("sys_vendor"), "Amazon EC2\n").unwrap();
        std::fs::write(dmi.join("product_name"), "m5.metal\n").unwrap();
        let d = detect_host_kind(&cpuinfo, &dmi);
        assert!(!d.vm && d.evidence.contains("m5.metal"), "{d:?}");
        // This machine: a VM (TOOLCHAIN.md), whatever energy source it ends up with.
        let here = detect_host_kind(Path::new("/proc/cpuinfo"), Path::new("/sys/class/dmi/id"));
        let flag = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap()
            .split_whitespace()
            .any(|f| f == "hypervisor");
        assert_eq!(here.vm, flag, "{here:?}");
    }

    #[test]
    fn the_share_is_configurable() {
        let configured = |cfg: CarbonConfig, estimated: bool| {
            let mut r = window(8, estimated);
            CarbonTransform::with_detection(&cfg, detected(true))
                .expect("config")
                .apply(&mut r)
                .expect("apply");
            (r.embodied.resource_share, r.embodied.share_source)
        };
        let (share, source) = configured(
            CarbonConfig {
                host_kind: HostKind::Vm,
                physical_host_vcpus: Some(64),
                ..Default::default()
            },
            false,
        );
        assert_eq!(share, 8.0 / 64.0);
        assert!(source.contains("carbon.physical_host_vcpus"), "{source}");
        let (share, source) = configured(
            CarbonConfig {
                resource_share: Some(0.25),
                ..Default::default()
            },
            true,
        );
        assert_eq!(
            (share, source.as_str()),
            (0.25, "config: carbon.resource_share")
        );
        let (share, _) = configured(
            CarbonConfig {
                host_kind: HostKind::BareMetal,
                ..Default::default()
            },
            true,
        );
        assert_eq!(share, 1.0);
        for bad in [0.0, 1.5, f64::NAN] {
            let e = CarbonTransform::from_config(&CarbonConfig {
                resource_share: Some(bad),
                ..Default::default()
            })
            .expect_err("refused");
            assert!(e.to_string().contains("carbon.resource_share"), "{e}");
        }
    }

    #[test]
    fn absurd_intensity_and_pue_are_refused_by_key() {
        let intensity = CarbonTransform::from_config(&CarbonConfig {
            intensity_g_per_kwh: Some(1e308),
            ..Default::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            intensity.contains("carbon.intensity_g_per_kwh = ")
                && intensity.contains("between 0 and 2000"),
            "{intensity}"
        );
        let pue = CarbonTransform::from_config(&CarbonConfig {
            pue: 50.0,
            ..Default::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(pue.contains("carbon.pue = 50"), "{pue}");
    }

    #[test]
    fn grids() {
        assert_eq!(grid_intensity_g_per_kwh("South"), Some(404.2));
        assert_eq!(grid_intensity_g_per_kwh("china-southwest"), Some(247.2));
        assert_eq!(grid_intensity_g_per_kwh("china-fossil"), Some(827.3));
        assert_eq!(grid_intensity_g_per_kwh("mars"), None);
    }
}
