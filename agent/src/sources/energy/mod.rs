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
//!
//! Honesty of the selection: a RAPL source that exists is not one that
//! measures (some Intel VMs expose a perf `power` PMU whose only event,
//! `energy-psys`, reads 0). [`select_energy_source_with`] therefore probes
//! each candidate against a short window of real load (every CPU busy, see
//! [`probe`]): a domain whose counter does not move is disabled with the
//! reason, once, and a source left without a domain that counts toward the
//! host is refused, so the next one is tried. After start-up, a counted
//! domain that reads 0 J while its CPUs were busy is left out of that window
//! (a stuck counter is not a 0 W domain), and [`WithModelFallback`] reports a
//! source that stops reading once, when it stops, and once when it recovers;
//! the windows in between are counted in [`WindowEnergy::faults`].
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::sources::sched::CpuSample;

pub mod hypervisor;
pub mod ipmi;
pub mod model;
pub mod perf_pmu;
pub mod powercap;
pub mod probe;
pub mod redfish;
pub mod topology;
pub mod vsock;

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
    /// Length of the start-up probe (every CPU busy) in milliseconds during
    /// which a RAPL counter must move to be used; 0 skips the probe.
    pub probe_ms: u64,
    /// Platform power from the BMC over Redfish, on top of the source chosen.
    pub redfish: Option<redfish::RedfishConfig>,
    /// Platform power from the BMC over IPMI DCMI (ipmitool), on top of the source chosen.
    pub ipmi: Option<ipmi::IpmiConfig>,
    /// With `source = "hypervisor"`: the VM's folder published by the host
    /// agent (`<vms.publish_dir>/<vm>` on the host, shared into the guest).
    pub hypervisor_dir: Option<PathBuf>,
    /// With `source = "hypervisor"`: `folder` (`hypervisor_dir`) or `vsock`.
    pub hypervisor_transport: String,
    /// vsock: the host's CID (2 from inside a VM).
    pub hypervisor_vsock_cid: u32,
    /// vsock: the port the host agent listens on (`vms.vsock_port`).
    pub hypervisor_vsock_port: Option<u32>,
    /// vsock: a Unix socket instead of `AF_VSOCK` (the host's
    /// `<uds_path>_<port>` when this agent reaches it directly; tests).
    pub hypervisor_uds: Option<PathBuf>,
    /// vsock: the VM's name to ask for; empty: the one the host gives this peer.
    pub hypervisor_vm: String,
    /// vsock: connect, send and receive timeout.
    pub hypervisor_timeout_ms: u64,
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
            probe_ms: DEFAULT_PROBE_MS,
            redfish: None,
            ipmi: None,
            hypervisor_dir: None,
            hypervisor_transport: "folder".to_string(),
            hypervisor_vsock_cid: vsock::HOST_CID,
            hypervisor_vsock_port: None,
            hypervisor_uds: None,
            hypervisor_vm: String::new(),
            hypervisor_timeout_ms: 1000,
        }
    }
}

/// Default length of the start-up probe: RAPL counters update every
/// millisecond or so, so 300 ms of every CPU busy is plenty for a real one to move.
pub const DEFAULT_PROBE_MS: u64 = 300;
/// Longest start-up probe accepted (the agent waits for it before its first window).
pub const MAX_PROBE_MS: u64 = 10_000;

impl EnergyConfig {
    /// Check the section; the message names the key.
    pub fn validate(&self) -> Result<(), EnergyError> {
        if !matches!(
            self.source.as_str(),
            "auto" | "perf" | "powercap" | "model" | "hypervisor"
        ) {
            return Err(EnergyError::Config(format!(
                "energy.source = {:?} is not one of auto, perf, powercap, model, hypervisor",
                self.source
            )));
        }
        self.validate_hypervisor()?;
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
        if self.probe_ms > MAX_PROBE_MS {
            return Err(EnergyError::Config(format!(
                "energy.probe_ms = {} is longer than {MAX_PROBE_MS} ms (the first window waits for it)",
                self.probe_ms
            )));
        }
        if let Some(r) = &self.redfish {
            r.validate()?;
        }
        if let Some(i) = &self.ipmi {
            if self.redfish.is_some() {
                return Err(EnergyError::Config(
                    "energy.ipmi: set [energy.redfish] or [energy.ipmi], not both (one BMC reading per host)".to_string(),
                ));
            }
            i.validate()?;
        }
        Ok(())
    }
}

impl EnergyConfig {
    fn validate_hypervisor(&self) -> Result<(), EnergyError> {
        let bad =
            |key: &str, reason: &str| Err(EnergyError::Config(format!("energy.{key}: {reason}")));
        let hypervisor = self.source == "hypervisor";
        let vsock = match self.hypervisor_transport.as_str() {
            "folder" => false,
            "vsock" => true,
            other => {
                return bad(
                    "hypervisor_transport",
                    &format!("{other:?} is not one of folder, vsock"),
                )
            }
        };
        let wants_dir = hypervisor && !vsock;
        if wants_dir != self.hypervisor_dir.is_some() {
            return bad("hypervisor_dir", "set it exactly when energy.source = \"hypervisor\" with hypervisor_transport = \"folder\" (the VM's folder published by the host agent)");
        }
        let wants_socket = hypervisor && vsock;
        if !wants_socket {
            if self.hypervisor_vsock_port.is_some() || self.hypervisor_uds.is_some() {
                return bad(
                    if self.hypervisor_uds.is_some() {
                        "hypervisor_uds"
                    } else {
                        "hypervisor_vsock_port"
                    },
                    "only with energy.source = \"hypervisor\" and hypervisor_transport = \"vsock\"",
                );
            }
            return Ok(());
        }
        match (self.hypervisor_vsock_port, &self.hypervisor_uds) {
            (None, None) => {
                return bad(
                    "hypervisor_vsock_port",
                    "required with hypervisor_transport = \"vsock\" (the host agent's vms.vsock_port), or hypervisor_uds",
                )
            }
            (Some(_), Some(_)) => {
                return bad(
                    "hypervisor_uds",
                    "a Unix socket instead of AF_VSOCK: set it or hypervisor_vsock_port, not both",
                )
            }
            (Some(port), None) if port == 0 || port == libc::VMADDR_PORT_ANY => {
                return bad("hypervisor_vsock_port", &format!("{port} is not a port"))
            }
            _ => {}
        }
        if self.hypervisor_vsock_cid == libc::VMADDR_CID_ANY {
            return bad("hypervisor_vsock_cid", "VMADDR_CID_ANY is not a peer");
        }
        if self.hypervisor_vm.len() > vsock::MAX_NAME_BYTES {
            return bad(
                "hypervisor_vm",
                &format!("longer than {} bytes", vsock::MAX_NAME_BYTES),
            );
        }
        if !(1..=10_000).contains(&self.hypervisor_timeout_ms) {
            return bad(
                "hypervisor_timeout_ms",
                &format!("{} must be 1 to 10000 ms", self.hypervisor_timeout_ms),
            );
        }
        Ok(())
    }

    /// Where a guest reads its host's document (`source = "hypervisor"`).
    fn hypervisor_feed(&self) -> Option<hypervisor::Feed> {
        if self.source != "hypervisor" {
            return None;
        }
        if self.hypervisor_transport != "vsock" {
            return self
                .hypervisor_dir
                .as_ref()
                .map(|dir| hypervisor::Feed::Folder(dir.join("sci-host.json")));
        }
        let target = match (&self.hypervisor_uds, self.hypervisor_vsock_port) {
            (Some(path), _) => vsock::Target::Unix(path.clone()),
            (None, Some(port)) => vsock::Target::Vsock {
                cid: self.hypervisor_vsock_cid,
                port,
            },
            (None, None) => return None,
        };
        Some(hypervisor::Feed::Socket(vsock::Client::new(
            target,
            &self.hypervisor_vm,
            std::time::Duration::from_millis(self.hypervisor_timeout_ms),
        )))
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
    /// Platform power from the BMC (Redfish, IPMI DCMI), or its part beyond RAPL.
    Platform,
    /// A VM's energy as its hypervisor's agent attributed it.
    Hypervisor,
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
    /// The idle part of this window's energy, when the source knows it exactly
    /// (a hypervisor's idle share for its VM, or platform power attributed as
    /// idle); attribution then takes it instead of a baseline.
    pub known_idle_j: Option<f64>,
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
    /// Faults of this window by name (`rapl-perf/failed`, `redfish/timeout`, ...):
    /// what the sources could not measure, counted (`sci_energy_faults_total`).
    pub faults: BTreeMap<String, u64>,
    /// Longest gap between two readings this energy integrates (the window
    /// for a counter read at its ends; a BMC's sample spacing).
    pub sample_interval_ns: u64,
    /// Intensity, PUE and embodied share given by a hypervisor's agent (a
    /// guest's window takes them instead of its own configuration).
    pub host_factors: Option<crate::transforms::carbon::HostFactors>,
}

impl WindowEnergy {
    /// Count one fault of `source` named `fault` in this window.
    pub fn fault(&mut self, source: &str, fault: &str) {
        *self.faults.entry(format!("{source}/{fault}")).or_default() += 1;
    }

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
    /// Names of the domains the source reads (for the start-up probe).
    fn domain_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Stop reading a domain (the probe found it does not measure); false
    /// when the source has no such domain.
    fn disable_domain(&mut self, _name: &str) -> bool {
        false
    }
    /// Whether the source measures: the default probes a window of real
    /// load (see [`probe::probe_counters`]); a source whose readings do not
    /// follow this host's load (a hypervisor's published counter) checks
    /// its own way. Returns the domains disabled and why, or the reason the
    /// source is refused.
    fn probe(&mut self, load: &probe::ProbeLoad) -> Result<Vec<String>, EnergyError>
    where
        Self: Sized,
    {
        probe::probe_counters(self, load)
    }
}

/// Count one fault `fault` of `source` in a window's fault map.
pub(crate) fn count_fault(faults: &mut BTreeMap<String, u64>, source: &str, fault: &str) {
    *faults.entry(format!("{source}/{fault}")).or_default() += 1;
}

/// What a fault of a source is called in [`WindowEnergy::faults`]: a short name for the kind of error.
pub fn fault_name(e: &EnergyError) -> &'static str {
    match e {
        EnergyError::Io { .. } => "unreadable",
        EnergyError::Parse { .. } => "unparsable",
        EnergyError::Absurd { .. } => "rejected",
        EnergyError::NoDomains(_) => "no_domain",
        EnergyError::AllDomainsFailed(_) => "no_domain_read",
        EnergyError::PerfOpen { .. } => "perf_open",
        EnergyError::PowerModel { .. } | EnergyError::Config(_) => "config",
        EnergyError::Refused { .. } => "refused",
        EnergyError::Transport { fault, .. } => fault,
    }
}

/// A RAPL source that falls back to the power model for a window in which no
/// counted domain could be read, so a broken counter never shows as a 0 W host.
/// Such a window says so: its `source` is the model's, `estimated` is true,
/// and its faults count `<source>/failed`. The failure is reported once, with
/// its reason, when the source stops reading, and once when it reads again;
/// the windows in between only count.
pub struct WithModelFallback {
    primary: Box<dyn EnergySource>,
    fallback: ModelSource,
    /// Failed windows in the current outage (0 while the source reads).
    failing_windows: u64,
}

impl WithModelFallback {
    pub fn new(primary: Box<dyn EnergySource>, fallback: ModelSource) -> WithModelFallback {
        WithModelFallback {
            primary,
            fallback,
            failing_windows: 0,
        }
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

    fn domain_names(&self) -> Vec<String> {
        self.primary.domain_names()
    }

    fn disable_domain(&mut self, name: &str) -> bool {
        self.primary.disable_domain(name)
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        match self.primary.window_energy(sample) {
            Ok(mut energy) => {
                if self.failing_windows > 0 {
                    energy.warnings.push(format!(
                        "{} reads again after {} window(s) estimated with the {} power model",
                        self.primary.name(),
                        self.failing_windows,
                        self.fallback.name()
                    ));
                    self.failing_windows = 0;
                }
                Ok(energy)
            }
            Err(e) => {
                let mut energy = self.fallback.window_energy(sample)?;
                if self.failing_windows == 0 {
                    energy.warnings.push(format!(
                        "{} stopped reading ({e}); windows are estimated with the {} power model until it reads again (counted in sci_energy_faults_total{{source=\"{}\"}})",
                        self.primary.name(),
                        self.fallback.name(),
                        self.primary.name()
                    ));
                }
                self.failing_windows += 1;
                energy.fault(self.primary.name(), "failed");
                energy.fault(self.primary.name(), fault_name(&e));
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

/// A window shorter than this is too short to call a counter that did not move stuck.
const STUCK_MIN_WINDOW_NS: u64 = 50_000_000;
/// Busy share of a domain's CPUs above which its counter must move.
const STUCK_MIN_BUSY_SHARE: f64 = 0.01;

/// Busy CPU time of `sample` on `cpus` (the host's busy time in proportion
/// to the number of CPUs: a procfs sample has no per-CPU split).
fn busy_ns_on(sample: &CpuSample, cpus: &[u32]) -> f64 {
    let all = sample.cpus.max(sample.idle_ns_per_cpu.len() as u32).max(1);
    sample.busy_cpu_ns() as f64 * cpus.len().min(all as usize) as f64 / f64::from(all)
}

/// A RAPL window from the domains read: marks the host's domains, leaves
/// out a counted domain that did not move while its CPUs were busy, and
/// fails (naming why) when no counted domain is left.
pub(crate) fn measured_window(
    source: &str,
    sample: &CpuSample,
    mut domains: Vec<DomainReading>,
    mut warnings: Vec<String>,
    mut faults: BTreeMap<String, u64>,
    host_domains: HostDomains,
) -> Result<WindowEnergy, EnergyError> {
    let duration_ns = sample.end_unix_ns.saturating_sub(sample.start_unix_ns);
    loop {
        mark_host_domains(&mut domains, host_domains);
        let stuck = domains.iter().position(|d| {
            let capacity_ns = duration_ns as f64 * d.cpus.len() as f64;
            let busy_ns = busy_ns_on(sample, &d.cpus);
            d.counts_toward_host
                && d.energy_j == 0.0
                && duration_ns >= STUCK_MIN_WINDOW_NS
                && capacity_ns > 0.0
                && busy_ns >= STUCK_MIN_BUSY_SHARE * capacity_ns
        });
        let Some(i) = stuck else { break };
        let d = domains.remove(i);
        // One text for every such window, so the agent logs it once.
        warnings.push(format!(
            "{source}: domain {} left out: its counter did not move while its CPUs were busy (a stuck counter is not a 0 W domain; counted in sci_energy_faults_total{{fault=\"stuck\"}})",
            d.name,
        ));
        *faults.entry(format!("{source}/stuck")).or_default() += 1;
    }
    if !domains.iter().any(|d| d.counts_toward_host) {
        let reason = if warnings.is_empty() {
            let read: Vec<&str> = domains.iter().map(|d| d.name.as_str()).collect();
            format!(
                "no domain counts toward the host (read: {}; energy.host_domains = {})",
                if read.is_empty() {
                    "none".to_string()
                } else {
                    read.join(", ")
                },
                host_domains.as_str()
            )
        } else {
            warnings.join("; ")
        };
        return Err(EnergyError::AllDomainsFailed(reason));
    }
    Ok(WindowEnergy {
        source: source.to_string(),
        estimated: false,
        duration_ns,
        domains,
        warnings,
        faults,
        sample_interval_ns: duration_ns,
        host_factors: None,
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
                DomainKind::Package
                    | DomainKind::Dram
                    | DomainKind::Model
                    | DomainKind::Platform
                    | DomainKind::Hypervisor
            )
        };
    }
}

impl HostDomains {
    pub fn as_str(self) -> &'static str {
        match self {
            HostDomains::Packages => "packages",
            HostDomains::Psys => "psys",
        }
    }
}

/// A discovered RAPL source that passed the start-up probe, or why not.
fn probed<S: EnergySource + 'static>(
    what: &str,
    discovered: Result<S, EnergyError>,
    load: Option<&probe::ProbeLoad>,
    warnings: &mut Vec<String>,
) -> Option<Box<dyn EnergySource>> {
    let mut source = match discovered {
        Ok(source) => source,
        Err(e) => {
            warnings.push(format!("{what} not used: {e}"));
            return None;
        }
    };
    let Some(load) = load else {
        warnings.push(format!(
            "{} not probed (energy.probe_ms = 0): a counter that does not move is only caught window by window",
            source.name()
        ));
        return Some(Box::new(source));
    };
    match source.probe(load) {
        Ok(disabled) => {
            warnings.extend(disabled);
            Some(Box::new(source))
        }
        Err(e) => {
            warnings.push(format!("{what} refused by the start-up probe: {e}"));
            None
        }
    }
}

/// Pick the best energy source this host offers: perf PMU > powercap > model.
///
/// Returns the source and the reasons the better ones were not taken. `cpus`
/// is the number of CPUs (the model's vCPU count). Each RAPL candidate is
/// probed under load first (see the module note), unless `energy.probe_ms = 0`.
pub fn select_energy_source(cfg: &EnergyConfig, cpus: u32) -> (Box<dyn EnergySource>, Vec<String>) {
    select_energy_source_with(cfg, cpus, Box::new(SyscallPerfOpener))
}

/// [`select_energy_source`] with the perf counter opener given (tests drive
/// counters with it). With `[energy.redfish]`, the BMC's platform power
/// goes on top of the source chosen.
pub fn select_energy_source_with(
    cfg: &EnergyConfig,
    cpus: u32,
    opener: Box<dyn PerfCounterOpener>,
) -> (Box<dyn EnergySource>, Vec<String>) {
    let poller = match (&cfg.redfish, &cfg.ipmi) {
        (Some(r), _) => Some(redfish::PlatformPoller::start(r)),
        (None, Some(i)) => Some(
            ipmi::IpmitoolReader::new(i)
                .and_then(|reader| redfish::PlatformPoller::spawn(Box::new(reader), i.settings())),
        ),
        (None, None) => None,
    };
    let (base, mut warnings) = select_cpu_energy_source(cfg, cpus, opener);
    match poller {
        None => (base, warnings),
        Some(Ok(poller)) => (
            Box::new(redfish::RedfishSource::new(poller, base)),
            warnings,
        ),
        Some(Err(e)) => {
            warnings.push(format!("platform power from the BMC not used: {e}"));
            (base, warnings)
        }
    }
}

fn select_cpu_energy_source(
    cfg: &EnergyConfig,
    cpus: u32,
    opener: Box<dyn PerfCounterOpener>,
) -> (Box<dyn EnergySource>, Vec<String>) {
    let mut warnings = Vec::new();
    let wanted = cfg.source.as_str();
    if !matches!(
        wanted,
        "auto" | "perf" | "powercap" | "model" | "hypervisor"
    ) {
        warnings.push(format!(
            "energy.source = {wanted:?} is not one of auto, perf, powercap, model; using auto"
        ));
    }
    let known = matches!(
        wanted,
        "auto" | "perf" | "powercap" | "model" | "hypervisor"
    );
    let auto = wanted == "auto" || !known;
    let model = match parse_power_model(&cfg.power_model) {
        Ok(model) => model,
        Err(e) => {
            warnings.push(format!("{e}; using the CCF default model"));
            PowerModel::ccf()
        }
    };
    let fallback = ModelSource::new(model.clone(), cpus);
    if let Some(feed) = cfg.hypervisor_feed() {
        match hypervisor::HypervisorSource::with_feed(feed, cpus) {
            Ok(source) => {
                return (
                    Box::new(WithModelFallback::new(Box::new(source), fallback)),
                    warnings,
                )
            }
            Err(e) => {
                warnings.push(format!("hypervisor energy not used: {e}"));
                return (Box::new(fallback), warnings);
            }
        }
    }
    let topology = CpuTopology::read(&cfg.sysfs_root, cpus);
    let load = (cfg.probe_ms > 0).then(|| {
        probe::ProbeLoad::new(
            topology.all_cpus(),
            std::time::Duration::from_millis(cfg.probe_ms),
        )
    });
    if auto || wanted == "perf" {
        let discovered = PerfPmuSource::discover(&cfg.sysfs_root, &topology, cfg, opener);
        if let Some(source) = probed("RAPL perf PMU", discovered, load.as_ref(), &mut warnings) {
            return (Box::new(WithModelFallback::new(source, fallback)), warnings);
        }
    }
    if auto || wanted == "powercap" {
        let discovered = PowercapSource::discover(&cfg.sysfs_root, &topology, cfg);
        if let Some(source) = probed("RAPL powercap", discovered, load.as_ref(), &mut warnings) {
            return (Box::new(WithModelFallback::new(source, fallback)), warnings);
        }
    }
    if wanted != "model" {
        warnings.push(format!(
            "no RAPL counter that measures on this host: energy is estimated with the {} power model",
            model.name()
        ));
    }
    (Box::new(fallback), warnings)
}
