//! RAPL through the perf_events `power` PMU (`<sysfs_root>/bus/event_source/devices/power`).
//!
//! Discovery reads the PMU's `type`, its `cpumask` (one CPU per package) and
//! the events `energy-pkg`, `energy-ram`, `energy-cores`, `energy-psys`
//! (`events/<name>` holds `event=0x02`, `events/<name>.scale` the joules per
//! count, `events/<name>.unit` `Joules`). Counting opens one system-wide
//! counter per package with `perf_event_open(type, config=event, cpu)`; the
//! kernel keeps it 64-bit, so there is no wrap-around to handle. The counter
//! is read behind [`EnergyCounter`] so that tests can drive its values.
use std::io::Read;
use std::path::{Path, PathBuf};

use super::powercap::read_u64;
use super::topology::{parse_cpu_list, CpuTopology};
use super::{
    check_power_ceiling, count_fault, fault_name, measured_window, DomainKind, DomainReading,
    EnergyConfig, EnergyError, EnergySource, HostDomains, WindowEnergy,
};
use crate::sources::sched::CpuSample;

/// One open energy counter.
pub trait EnergyCounter: Send {
    /// Current raw count (multiply by the event's scale for joules).
    fn read_count(&mut self) -> Result<u64, EnergyError>;
}

/// Opens energy counters; [`SyscallPerfOpener`] is the real one.
pub trait PerfCounterOpener: Send {
    fn open(
        &mut self,
        pmu_type: u32,
        config: u64,
        cpu: u32,
        event: &str,
    ) -> Result<Box<dyn EnergyCounter>, EnergyError>;
}

/// One event of the power PMU, as discovered.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerEvent {
    /// `energy-pkg`, `energy-ram`, ...
    pub name: String,
    /// Value for `perf_event_attr.config`.
    pub config: u64,
    /// Joules per count.
    pub scale_j: f64,
}

/// What `<sysfs_root>/bus/event_source/devices/power` says.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerPmu {
    pub pmu_type: u32,
    /// One CPU per package.
    pub cpumask: Vec<u32>,
    pub events: Vec<PowerEvent>,
}

const EVENTS: [&str; 4] = ["energy-pkg", "energy-ram", "energy-cores", "energy-psys"];

fn read_text(path: &Path) -> Result<String, EnergyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| EnergyError::io(path, e))
}

/// Parse an event description (`event=0x02`, perhaps with other `key=value` terms).
pub fn parse_event_config(text: &str) -> Option<u64> {
    text.trim().split(',').find_map(|term| {
        let (key, value) = term.split_once('=')?;
        if key.trim() != "event" {
            return None;
        }
        let value = value.trim();
        match value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))
        {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    })
}

impl PowerPmu {
    /// Read the PMU description; events absent from `events/` are skipped, a
    /// present event with a bad description is an error naming the file.
    pub fn discover(sysfs_root: &Path) -> Result<PowerPmu, EnergyError> {
        let dir = sysfs_root.join("bus/event_source/devices/power");
        let type_path = dir.join("type");
        let pmu_type = read_u64(&type_path)?;
        let pmu_type = u32::try_from(pmu_type).map_err(|_| EnergyError::Parse {
            path: type_path.clone(),
            reason: format!("PMU type {pmu_type} does not fit 32 bits"),
        })?;
        let mask_path = dir.join("cpumask");
        let mask_text = read_text(&mask_path)?;
        let cpumask = parse_cpu_list(&mask_text)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| EnergyError::Parse {
                path: mask_path.clone(),
                reason: format!("expected a CPU list such as `0,8`, found {mask_text:?}"),
            })?;
        let mut events = Vec::new();
        for name in EVENTS {
            let path = dir.join("events").join(name);
            if !path.exists() {
                continue;
            }
            let text = read_text(&path)?;
            let config = parse_event_config(&text).ok_or_else(|| EnergyError::Parse {
                path: path.clone(),
                reason: format!("expected `event=0x..`, found {text:?}"),
            })?;
            let scale_path = dir.join("events").join(format!("{name}.scale"));
            let scale_text = read_text(&scale_path)?;
            let scale_j = scale_text
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| EnergyError::Parse {
                    path: scale_path.clone(),
                    reason: format!(
                        "expected a positive number of joules per count, found {scale_text:?}"
                    ),
                })?;
            let unit_path = dir.join("events").join(format!("{name}.unit"));
            let unit = read_text(&unit_path)?;
            if unit != "Joules" {
                return Err(EnergyError::Parse {
                    path: unit_path,
                    reason: format!("expected unit `Joules`, found {unit:?}"),
                });
            }
            events.push(PowerEvent {
                name: name.to_string(),
                config,
                scale_j,
            });
        }
        if events.is_empty() {
            return Err(EnergyError::NoDomains(dir.join("events")));
        }
        Ok(PowerPmu {
            pmu_type,
            cpumask,
            events,
        })
    }
}

struct Counter {
    domain: String,
    kind: DomainKind,
    package: Option<u32>,
    cpus: Vec<u32>,
    scale_j: f64,
    counter: Box<dyn EnergyCounter>,
    previous: Option<u64>,
}

/// Energy from the perf `power` PMU.
pub struct PerfPmuSource {
    counters: Vec<Counter>,
    max_domain_power_w: f64,
    host_domains: HostDomains,
    pending_warnings: Vec<String>,
    /// Where the description was read (for messages).
    pub pmu_dir: PathBuf,
}

impl std::fmt::Debug for PerfPmuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfPmuSource")
            .field(
                "domains",
                &self
                    .counters
                    .iter()
                    .map(|c| c.domain.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PerfPmuSource {
    /// Discover the PMU and open its counters (one per package; one for psys).
    /// Fails when `energy-pkg` (or, without it, every event) cannot be opened.
    pub fn discover(
        sysfs_root: &Path,
        topology: &CpuTopology,
        cfg: &EnergyConfig,
        mut opener: Box<dyn PerfCounterOpener>,
    ) -> Result<Self, EnergyError> {
        let pmu = PowerPmu::discover(sysfs_root)?;
        let mut counters = Vec::new();
        let mut warnings = Vec::new();
        for event in &pmu.events {
            let (kind, per_package) = match event.name.as_str() {
                "energy-pkg" => (DomainKind::Package, true),
                "energy-ram" => (DomainKind::Dram, true),
                "energy-cores" => (DomainKind::Core, true),
                _ => (DomainKind::Psys, false),
            };
            let cpus_to_open: Vec<u32> = if per_package {
                pmu.cpumask.clone()
            } else {
                pmu.cpumask[..1].to_vec()
            };
            for cpu in cpus_to_open {
                let package = topology.package_of(cpu);
                let (domain, package, cpus) = match kind {
                    DomainKind::Package => (
                        format!("package-{package}"),
                        Some(package),
                        topology.cpus_of_package(package),
                    ),
                    DomainKind::Dram => (
                        format!("package-{package}/dram"),
                        Some(package),
                        topology.cpus_of_package(package),
                    ),
                    DomainKind::Core => (
                        format!("package-{package}/core"),
                        Some(package),
                        topology.cpus_of_package(package),
                    ),
                    _ => ("psys".to_string(), None, topology.all_cpus()),
                };
                match opener.open(pmu.pmu_type, event.config, cpu, &event.name) {
                    Ok(mut counter) => {
                        let previous = match counter.read_count() {
                            Ok(v) => Some(v),
                            Err(e) => {
                                warnings.push(format!("perf counter {domain} unreadable: {e}"));
                                None
                            }
                        };
                        counters.push(Counter {
                            domain,
                            kind,
                            package,
                            cpus,
                            scale_j: event.scale_j,
                            counter,
                            previous,
                        });
                    }
                    Err(e) if kind == DomainKind::Package => return Err(e),
                    Err(e) => warnings.push(format!("perf counter {domain} not used: {e}")),
                }
            }
        }
        if counters.is_empty() {
            return Err(EnergyError::AllDomainsFailed(warnings.join("; ")));
        }
        Ok(PerfPmuSource {
            counters,
            max_domain_power_w: cfg.max_domain_power_w,
            host_domains: cfg.host_domains,
            pending_warnings: warnings,
            pmu_dir: sysfs_root.join("bus/event_source/devices/power"),
        })
    }
}

impl EnergySource for PerfPmuSource {
    fn name(&self) -> &str {
        "rapl-perf"
    }

    fn estimated(&self) -> bool {
        false
    }

    fn domain_names(&self) -> Vec<String> {
        self.counters.iter().map(|c| c.domain.clone()).collect()
    }

    fn disable_domain(&mut self, name: &str) -> bool {
        let before = self.counters.len();
        self.counters.retain(|c| c.domain != name);
        self.counters.len() < before
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        let duration_ns = sample.end_unix_ns.saturating_sub(sample.start_unix_ns);
        let duration_s = duration_ns as f64 / 1e9;
        let mut warnings = std::mem::take(&mut self.pending_warnings);
        let mut faults = std::collections::BTreeMap::new();
        let mut domains = Vec::new();
        for c in &mut self.counters {
            let now = match c.counter.read_count() {
                Ok(v) => v,
                Err(e) => {
                    count_fault(&mut faults, "rapl-perf", fault_name(&e));
                    warnings.push(format!(
                        "perf counter {} left out of this window: {e}",
                        c.domain
                    ));
                    c.previous = None;
                    continue;
                }
            };
            let Some(previous) = c.previous.replace(now) else {
                warnings.push(format!(
                    "perf counter {} readable again: re-based, left out of this window",
                    c.domain
                ));
                continue;
            };
            if now < previous {
                let e = EnergyError::Absurd {
                    domain: c.domain.clone(),
                    reason: format!("64-bit counter went backwards from {previous} to {now}"),
                };
                count_fault(&mut faults, "rapl-perf", fault_name(&e));
                warnings.push(e.to_string());
                continue;
            }
            let energy_j = (now - previous) as f64 * c.scale_j;
            if let Err(e) =
                check_power_ceiling(&c.domain, energy_j, duration_s, self.max_domain_power_w)
            {
                count_fault(&mut faults, "rapl-perf", fault_name(&e));
                warnings.push(e.to_string());
                continue;
            }
            domains.push(DomainReading {
                name: c.domain.clone(),
                kind: c.kind,
                package: c.package,
                cpus: c.cpus.clone(),
                energy_j,
                counts_toward_host: false,
                idle_power_w: None,
                known_idle_j: None,
            });
        }
        measured_window(
            "rapl-perf",
            sample,
            domains,
            warnings,
            faults,
            self.host_domains,
        )
    }
}

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes),
/// which is all a counting system-wide event needs.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Opens real counters with the `perf_event_open` system call (needs root or
/// `perf_event_paranoid` <= 0, and a host with RAPL).
#[derive(Debug, Default, Clone, Copy)]
pub struct SyscallPerfOpener;

struct PerfFdCounter {
    file: std::fs::File,
    event: String,
    cpu: u32,
}

impl EnergyCounter for PerfFdCounter {
    fn read_count(&mut self) -> Result<u64, EnergyError> {
        let mut buf = [0u8; 8];
        self.file
            .read_exact(&mut buf)
            .map_err(|source| EnergyError::Io {
                path: PathBuf::from(format!("perf event {} on cpu {}", self.event, self.cpu)),
                source,
            })?;
        Ok(u64::from_ne_bytes(buf))
    }
}

impl PerfCounterOpener for SyscallPerfOpener {
    fn open(
        &mut self,
        pmu_type: u32,
        config: u64,
        cpu: u32,
        event: &str,
    ) -> Result<Box<dyn EnergyCounter>, EnergyError> {
        use std::os::fd::FromRawFd;
        let attr = PerfEventAttrV0 {
            type_: pmu_type,
            size: std::mem::size_of::<PerfEventAttrV0>() as u32,
            config,
            ..Default::default()
        };
        let cpu_arg = libc::c_int::try_from(cpu).map_err(|_| EnergyError::PerfOpen {
            event: event.to_string(),
            cpu,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `attr` is a valid, initialised perf_event_attr of the size it states,
        // alive for the duration of the call; the other arguments are plain integers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttrV0,
                -1 as libc::pid_t,
                cpu_arg,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(EnergyError::PerfOpen {
                event: event.to_string(),
                cpu,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd as libc::c_int) };
        Ok(Box::new(PerfFdCounter {
            file,
            event: event.to_string(),
            cpu,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_config() {
        assert_eq!(parse_event_config("event=0x02\n"), Some(2));
        assert_eq!(parse_event_config("event=0x3b,umask=0x1"), Some(0x3b));
        assert_eq!(parse_event_config("event=17"), Some(17));
        assert_eq!(parse_event_config("umask=0x1"), None);
        assert_eq!(parse_event_config("event=zz"), None);
    }

    #[test]
    fn attr_is_ver0_size() {
        assert_eq!(std::mem::size_of::<PerfEventAttrV0>(), 64);
    }

    #[test]
    fn real_opener_fails_cleanly_without_power_pmu() {
        // This VM has no power PMU: a made-up PMU type must be refused with an OS error, not crash.
        let mut opener = SyscallPerfOpener;
        let err = opener
            .open(0x7fff_fff0, 2, 0, "energy-pkg")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("perf_event_open(energy-pkg, cpu 0)"), "{err}");
    }
}
