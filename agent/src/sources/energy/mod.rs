//! Energy sources: how many joules each power domain of the host used in a window.
//!
//! Three implementations of [`EnergySource`], chosen by [`select_energy_source`]
//! in this order of preference:
//! 1. [`perf_pmu`]: RAPL counters through the perf_events `power` PMU (one
//!    counter per package, 64-bit, no wrap-around to handle);
//! 2. [`powercap`]: RAPL counters through `/sys/class/powercap/intel-rapl:*`
//!    (32-bit-ish counters that wrap at `max_energy_range_uj`);
//! 3. [`model`]: a power model driven by CPU utilisation, for hosts without
//!    RAPL (virtual machines); every figure it gives is marked estimated.
//!
//! A source reports [`DomainReading`]s. Which of them add up to the host's
//! energy is decided here, once, so attribution never double counts:
//! RAPL's `package` domain already contains its `core` and `uncore`
//! sub-domains, while `dram` is outside the package; so the host energy is
//! the sum of all packages plus all dram domains, or (with
//! `host_domains = "psys"`, when the platform has one) the `psys` domain
//! alone, which covers the whole SoC/platform. The other domains are
//! reported for information only (`counts_toward_host = false`).
use std::path::PathBuf;

use serde::Deserialize;

use crate::sources::sched::CpuSample;

pub mod model;
pub mod perf_pmu;
pub mod powercap;
pub mod topology;

pub use crate::error::EnergyError;
pub use model::{parse_power_model, ModelSource, PowerModel};
pub use perf_pmu::{EnergyCounter, PerfCounterOpener, PerfPmuSource, SyscallPerfOpener};
pub use powercap::PowercapSource;
pub use topology::CpuTopology;

/// `[energy]` section of agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnergyConfig {
    /// Root of sysfs (`/sys`); tests and containers point it elsewhere.
    pub sysfs_root: PathBuf,
    /// `auto` (perf PMU, then powercap, then model), `perf`, `powercap` or `model`.
    pub source: String,
    /// Power model for hosts without RAPL: `ccf`, `linear:IDLE_W:MAX_W` (per vCPU) or `tdp:WATTS`.
    pub power_model: String,
    /// Host idle power in watts; when absent it is learned from low-utilisation windows
    /// (RAPL) or taken from the power model.
    pub idle_power_w: Option<f64>,
    /// A domain reading implying more than this many watts is rejected as absurd.
    pub max_domain_power_w: f64,
    /// `packages` (sum of packages + dram) or `psys` (platform domain, when present).
    pub host_domains: HostDomains,
}

impl Default for EnergyConfig {
    fn default() -> Self {
        EnergyConfig {
            sysfs_root: PathBuf::from("/sys"),
            source: "auto".to_string(),
            power_model: "ccf".to_string(),
            idle_power_w: None,
            max_domain_power_w: 2000.0,
            host_domains: HostDomains::Packages,
        }
    }
}

impl EnergyConfig {
    /// Check the section; the message names the key.
    pub fn validate(&self) -> Result<(), EnergyError> {
        if !matches!(self.source.as_str(), "auto" | "perf" | "powercap" | "model") {
            return Err(EnergyError::Config(format!(
                "energy.source = {:?} is not one of auto, perf, powercap, model",
                self.source
            )));
        }
        parse_power_model(&self.power_model)?;
        if let Some(w) = self.idle_power_w {
            if !w.is_finite() || w < 0.0 {
                return Err(EnergyError::Config(format!(
                    "energy.idle_power_w = {w} must be a non-negative number of watts"
                )));
            }
        }
        if !self.max_domain_power_w.is_finite() || self.max_domain_power_w <= 0.0 {
            return Err(EnergyError::Config(format!(
                "energy.max_domain_power_w = {} must be a positive number of watts",
                self.max_domain_power_w
            )));
        }
        Ok(())
    }
}

/// Which RAPL domains make up the host's energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostDomains {
    /// Sum of every `package` domain plus every `dram` domain.
    #[default]
    Packages,
    /// The `psys` (platform) domain alone; falls back to packages when there is none.
    Psys,
}

/// Kind of a power domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    Package,
    Dram,
    Core,
    Uncore,
    Psys,
    /// Whole host, from a power model.
    Model,
    /// A RAPL zone with a name this code does not know.
    Other,
}

impl DomainKind {
    /// From a powercap `name` file (`package-0`, `dram`, `core`, `uncore`, `psys`).
    pub fn from_rapl_name(name: &str) -> DomainKind {
        match name {
            n if n.starts_with("package") => DomainKind::Package,
            "dram" => DomainKind::Dram,
            "core" => DomainKind::Core,
            "uncore" => DomainKind::Uncore,
            "psys" => DomainKind::Psys,
            _ => DomainKind::Other,
        }
    }
}

/// Energy of one domain over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainReading {
    /// `package-0`, `package-0/dram`, `package-0/core`, `psys`, `model`.
    pub name: String,
    pub kind: DomainKind,
    /// Package (socket) the domain belongs to, when it belongs to one.
    pub package: Option<u32>,
    /// CPUs whose activity this domain's energy pays for.
    pub cpus: Vec<u32>,
    pub energy_j: f64,
    /// Part of the host's energy (see the module note); others are informational.
    pub counts_toward_host: bool,
    /// The domain's power when the host is idle, when the source knows it (model).
    pub idle_power_w: Option<f64>,
}

/// What an energy source measured in one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowEnergy {
    /// Name of the source that measured it (`rapl-perf`, `rapl-powercap`, `model-linear`, `model-tdp`).
    pub source: String,
    /// True when the figures come from a model rather than a meter.
    pub estimated: bool,
    /// Window length the energy covers (the CPU sample's).
    pub duration_ns: u64,
    pub domains: Vec<DomainReading>,
    /// Domains that could not be read or were rejected this window, with the reason.
    pub warnings: Vec<String>,
}

impl WindowEnergy {
    /// Host energy: the sum of the domains that count toward the host.
    pub fn host_energy_j(&self) -> f64 {
        self.domains
            .iter()
            .filter(|d| d.counts_toward_host)
            .map(|d| d.energy_j)
            .sum()
    }
}

/// A way of measuring (or estimating) the host's energy per window.
pub trait EnergySource: Send {
    /// Name reported as `energy_source` (`rapl-perf`, `rapl-powercap`, `model-ccf`...).
    fn name(&self) -> &str;
    /// True when the figures are estimated rather than measured.
    fn estimated(&self) -> bool;
    /// Energy per domain since the previous call (or since construction).
    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError>;
    /// The power model (name, formula and parameters) behind estimated
    /// windows; None for a source that only measures.
    fn model_description(&self) -> Option<String> {
        None
    }
}

/// A RAPL source that falls back to the power model for a window in which no
/// counted domain could be read, so a broken counter never shows as a 0 W host.
/// Such a window says so: its `source` is the model's and `estimated` is true.
pub struct WithModelFallback {
    primary: Box<dyn EnergySource>,
    fallback: ModelSource,
}

impl WithModelFallback {
    pub fn new(primary: Box<dyn EnergySource>, fallback: ModelSource) -> WithModelFallback {
        WithModelFallback { primary, fallback }
    }
}

impl EnergySource for WithModelFallback {
    fn name(&self) -> &str {
        self.primary.name()
    }

    fn estimated(&self) -> bool {
        self.primary.estimated()
    }

    fn model_description(&self) -> Option<String> {
        self.fallback.model_description()
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        match self.primary.window_energy(sample) {
            Ok(energy) => Ok(energy),
            Err(e) => {
                let mut energy = self.fallback.window_energy(sample)?;
                energy.warnings.push(format!(
                    "{} failed this window ({e}); energy estimated with the {} power model",
                    self.primary.name(),
                    self.fallback.name()
                ));
                Ok(energy)
            }
        }
    }
}

/// Refuses a RAPL reading whose mean power over the window is above the
/// configured ceiling (a counter glitch, not a measurement).
pub(crate) fn check_power_ceiling(
    domain: &str,
    energy_j: f64,
    duration_s: f64,
    max_domain_power_w: f64,
) -> Result<(), EnergyError> {
    let power_w = if duration_s > 0.0 {
        energy_j / duration_s
    } else {
        f64::INFINITY
    };
    if energy_j > 0.0 && power_w > max_domain_power_w {
        return Err(EnergyError::Absurd {
            domain: domain.to_string(),
            reason: format!(
                "{energy_j:.3} J in {duration_s:.3} s is {power_w:.1} W, above the ceiling of {max_domain_power_w} W (energy.max_domain_power_w)"
            ),
        });
    }
    Ok(())
}

/// A RAPL window from the domains read: marks the host's domains and fails
/// when none of them could be read.
pub(crate) fn measured_window(
    source: &str,
    duration_ns: u64,
    mut domains: Vec<DomainReading>,
    warnings: Vec<String>,
    host_domains: HostDomains,
) -> Result<WindowEnergy, EnergyError> {
    mark_host_domains(&mut domains, host_domains);
    if !domains.iter().any(|d| d.counts_toward_host) {
        return Err(EnergyError::AllDomainsFailed(warnings.join("; ")));
    }
    Ok(WindowEnergy {
        source: source.to_string(),
        estimated: false,
        duration_ns,
        domains,
        warnings,
    })
}

/// Mark which domains count toward the host (see the module note).
pub(crate) fn mark_host_domains(domains: &mut [DomainReading], host_domains: HostDomains) {
    let use_psys =
        host_domains == HostDomains::Psys && domains.iter().any(|d| d.kind == DomainKind::Psys);
    for d in domains.iter_mut() {
        d.counts_toward_host = if use_psys {
            d.kind == DomainKind::Psys
        } else {
            matches!(
                d.kind,
                DomainKind::Package | DomainKind::Dram | DomainKind::Model
            )
        };
    }
}

/// Pick the best energy source this host offers: perf PMU > powercap > model.
///
/// Returns the source and the reasons the better ones were not taken. `cpus`
/// is the number of CPUs (the model's vCPU count).
pub fn select_energy_source(cfg: &EnergyConfig, cpus: u32) -> (Box<dyn EnergySource>, Vec<String>) {
    select_energy_source_with(cfg, cpus, Box::new(SyscallPerfOpener))
}

/// [`select_energy_source`] with the perf counter opener given (tests drive counters with it).
pub fn select_energy_source_with(
    cfg: &EnergyConfig,
    cpus: u32,
    opener: Box<dyn PerfCounterOpener>,
) -> (Box<dyn EnergySource>, Vec<String>) {
    let mut warnings = Vec::new();
    let wanted = cfg.source.as_str();
    if !matches!(wanted, "auto" | "perf" | "powercap" | "model") {
        warnings.push(format!(
            "energy.source = {wanted:?} is not one of auto, perf, powercap, model; using auto"
        ));
    }
    let known = matches!(wanted, "auto" | "perf" | "powercap" | "model");
    let auto = wanted == "auto" || !known;
    let model = match parse_power_model(&cfg.power_model) {
        Ok(model) => model,
        Err(e) => {
            warnings.push(format!("{e}; using the CCF default model"));
            PowerModel::ccf()
        }
    };
    let fallback = ModelSource::new(model.clone(), cpus);
    let topology = CpuTopology::read(&cfg.sysfs_root, cpus);
    if auto || wanted == "perf" {
        match PerfPmuSource::discover(&cfg.sysfs_root, &topology, cfg, opener) {
            Ok(source) => {
                return (
                    Box::new(WithModelFallback::new(Box::new(source), fallback)),
                    warnings,
                )
            }
            Err(e) => warnings.push(format!("RAPL perf PMU not used: {e}")),
        }
    }
    if auto || wanted == "powercap" {
        match PowercapSource::discover(&cfg.sysfs_root, &topology, cfg) {
            Ok(source) => {
                return (
                    Box::new(WithModelFallback::new(Box::new(source), fallback)),
                    warnings,
                )
            }
            Err(e) => warnings.push(format!("RAPL powercap not used: {e}")),
        }
    }
    if wanted != "model" {
        warnings.push(format!(
            "no RAPL counters on this host: energy is estimated with the {} power model",
            model.name()
        ));
    }
    (Box::new(fallback), warnings)
}
