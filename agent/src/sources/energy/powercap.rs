//! RAPL through powercap sysfs: `<sysfs_root>/class/powercap/intel-rapl:P[:S]`.
//!
//! Each zone has `name` (`package-0`, `dram`, `core`, `uncore`, `psys`),
//! `energy_uj` (a counter in microjoules) and `max_energy_range_uj` (the
//! counter's largest value, after which it restarts at 0). AMD hosts expose
//! the same layout (the zones are still named `intel-rapl`; `amd-rapl` is
//! accepted as well). `intel-rapl-mmio` zones duplicate the MSR package
//! counters and are skipped. A zone that cannot be read in a window is left
//! out of that window with a warning (never counted as 0 J) and re-based
//! when it can be read again.
use std::path::{Path, PathBuf};

use super::topology::CpuTopology;
use super::{
    check_power_ceiling, count_fault, fault_name, measured_window, DomainKind, DomainReading,
    EnergyConfig, EnergyError, EnergySource, HostDomains, WindowEnergy,
};
use crate::sources::sched::CpuSample;

#[derive(Debug)]
struct Zone {
    /// e.g. `intel-rapl:0:1`.
    id: String,
    path: PathBuf,
    domain: String,
    kind: DomainKind,
    package: Option<u32>,
    cpus: Vec<u32>,
    max_energy_range_uj: u64,
    previous_uj: Option<u64>,
}

/// Energy from powercap RAPL zones.
#[derive(Debug)]
pub struct PowercapSource {
    zones: Vec<Zone>,
    max_domain_power_w: f64,
    host_domains: HostDomains,
    pending_warnings: Vec<String>,
}

/// Zone directory name to (package index, sub-zone index); None when not a RAPL zone.
fn parse_zone_id(dir_name: &str) -> Option<(u32, Option<u32>)> {
    let mut parts = dir_name.split(':');
    let prefix = parts.next()?;
    if !prefix.contains("rapl") || prefix.contains("mmio") {
        return None;
    }
    let top = parts.next()?.parse().ok()?;
    let sub = match parts.next() {
        Some(s) => Some(s.parse().ok()?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((top, sub))
}

fn read_trimmed(path: &Path) -> Result<String, EnergyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| EnergyError::io(path, e))
}

/// Read a counter file holding one unsigned integer.
pub(crate) fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = read_trimmed(path)?;
    text.parse::<u64>().map_err(|_| EnergyError::Parse {
        path: path.to_path_buf(),
        reason: format!("expected an unsigned integer, found {text:?}"),
    })
}

/// Energy between two readings of a counter that takes the values
/// `0..=max_uj` and restarts at 0 after `max_uj` (so it counts modulo
/// `max_uj + 1`: the step from `max_uj` to 0 is one microjoule).
pub fn counter_delta_uj(previous_uj: u64, now_uj: u64, max_uj: u64) -> u64 {
    if now_uj >= previous_uj {
        now_uj - previous_uj
    } else {
        // Wrapped once between the readings (more than once is caught by the power ceiling).
        max_uj.saturating_sub(previous_uj) + 1 + now_uj
    }
}

impl PowercapSource {
    /// Find every RAPL zone under `<sysfs_root>/class/powercap` and take a first reading.
    pub fn discover(
        sysfs_root: &Path,
        topology: &CpuTopology,
        cfg: &EnergyConfig,
    ) -> Result<Self, EnergyError> {
        let base = sysfs_root.join("class/powercap");
        let entries = std::fs::read_dir(&base).map_err(|e| EnergyError::io(&base, e))?;
        let mut ids: Vec<(u32, Option<u32>, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                parse_zone_id(&name).map(|(top, sub)| (top, sub, name))
            })
            .collect();
        ids.sort();
        let mut warnings = Vec::new();
        let mut zones: Vec<Zone> = Vec::new();
        for (top, sub, id) in ids {
            let path = base.join(&id);
            let rapl_name = match read_trimmed(&path.join("name")) {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!("powercap zone {id} skipped: {e}"));
                    continue;
                }
            };
            let kind = DomainKind::from_rapl_name(&rapl_name);
            let (domain, package) = match sub {
                None => {
                    let package = match kind {
                        DomainKind::Package => Some(
                            rapl_name
                                .trim_start_matches("package-")
                                .parse()
                                .unwrap_or(top),
                        ),
                        DomainKind::Psys => None,
                        _ => Some(top),
                    };
                    let domain = match kind {
                        DomainKind::Package | DomainKind::Psys => rapl_name.clone(),
                        _ => format!("{rapl_name}-{top}"),
                    };
                    (domain, package)
                }
                Some(_) => {
                    let parent_id = format!("{}:{top}", id.split(':').next().unwrap_or_default());
                    let parent = zones.iter().find(|z| z.id == parent_id);
                    match parent {
                        Some(p) => (format!("{}/{rapl_name}", p.domain), p.package),
                        None => (format!("package-{top}/{rapl_name}"), Some(top)),
                    }
                }
            };
            let cpus = match package {
                Some(p) => {
                    let cpus = topology.cpus_of_package(p);
                    if cpus.is_empty() {
                        warnings.push(format!(
                            "powercap zone {id} ({domain}) is on package {p}, but no CPU reports that package; its energy is spread over all CPUs"
                        ));
                        topology.all_cpus()
                    } else {
                        cpus
                    }
                }
                None => topology.all_cpus(),
            };
            let max_energy_range_uj = match read_u64(&path.join("max_energy_range_uj")) {
                Ok(0) => {
                    warnings.push(format!(
                        "powercap zone {id} ({domain}) skipped: max_energy_range_uj is 0"
                    ));
                    continue;
                }
                Ok(v) => v,
                Err(e) => {
                    warnings.push(format!("powercap zone {id} ({domain}) skipped: {e}"));
                    continue;
                }
            };
            let previous_uj = match read_u64(&path.join("energy_uj")) {
                Ok(v) => Some(v),
                Err(e) => {
                    warnings.push(format!("powercap zone {id} ({domain}) unreadable: {e}"));
                    None
                }
            };
            zones.push(Zone {
                id,
                path,
                domain,
                kind,
                package,
                cpus,
                max_energy_range_uj,
                previous_uj,
            });
        }
        if zones.iter().all(|z| z.previous_uj.is_none()) {
            return Err(if warnings.is_empty() {
                EnergyError::NoDomains(base)
            } else {
                EnergyError::AllDomainsFailed(warnings.join("; "))
            });
        }
        Ok(PowercapSource {
            zones,
            max_domain_power_w: cfg.max_domain_power_w,
            host_domains: cfg.host_domains,
            pending_warnings: warnings,
        })
    }
}

impl EnergySource for PowercapSource {
    fn name(&self) -> &str {
        "rapl-powercap"
    }

    fn estimated(&self) -> bool {
        false
    }

    /// Domain names found, in order.
    fn domain_names(&self) -> Vec<String> {
        self.zones.iter().map(|z| z.domain.clone()).collect()
    }

    fn disable_domain(&mut self, name: &str) -> bool {
        let before = self.zones.len();
        self.zones.retain(|z| z.domain != name);
        self.zones.len() < before
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        let duration_ns = sample.end_unix_ns.saturating_sub(sample.start_unix_ns);
        let duration_s = duration_ns as f64 / 1e9;
        let mut warnings = std::mem::take(&mut self.pending_warnings);
        let mut faults = std::collections::BTreeMap::new();
        let mut domains = Vec::new();
        for zone in &mut self.zones {
            let now_uj = match read_u64(&zone.path.join("energy_uj")) {
                Ok(v) => v,
                Err(e) => {
                    count_fault(&mut faults, "rapl-powercap", fault_name(&e));
                    warnings.push(format!(
                        "powercap zone {} ({}) left out of this window: {e}",
                        zone.id, zone.domain
                    ));
                    zone.previous_uj = None;
                    continue;
                }
            };
            let Some(previous_uj) = zone.previous_uj.replace(now_uj) else {
                warnings.push(format!(
                    "powercap zone {} ({}) readable again: re-based, left out of this window",
                    zone.id, zone.domain
                ));
                continue;
            };
            if now_uj > zone.max_energy_range_uj {
                let e = EnergyError::Absurd {
                    domain: zone.domain.clone(),
                    reason: format!(
                        "energy_uj {now_uj} above max_energy_range_uj {}",
                        zone.max_energy_range_uj
                    ),
                };
                count_fault(&mut faults, "rapl-powercap", fault_name(&e));
                warnings.push(e.to_string());
                zone.previous_uj = None;
                continue;
            }
            let energy_j =
                counter_delta_uj(previous_uj, now_uj, zone.max_energy_range_uj) as f64 / 1e6;
            if let Err(e) =
                check_power_ceiling(&zone.domain, energy_j, duration_s, self.max_domain_power_w)
            {
                count_fault(&mut faults, "rapl-powercap", fault_name(&e));
                warnings.push(e.to_string());
                continue;
            }
            domains.push(DomainReading {
                name: zone.domain.clone(),
                kind: zone.kind,
                package: zone.package,
                cpus: zone.cpus.clone(),
                energy_j,
                counts_toward_host: false,
                idle_power_w: None,
                known_idle_j: None,
            });
        }
        measured_window(
            "rapl-powercap",
            sample,
            domains,
            warnings,
            faults,
            self.host_domains,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_ids() {
        assert_eq!(parse_zone_id("intel-rapl:0"), Some((0, None)));
        assert_eq!(parse_zone_id("intel-rapl:1:2"), Some((1, Some(2))));
        assert_eq!(parse_zone_id("amd-rapl:0"), Some((0, None)));
        assert_eq!(parse_zone_id("intel-rapl-mmio:0"), None);
        assert_eq!(parse_zone_id("intel-rapl"), None);
        assert_eq!(parse_zone_id("dtpm:0"), None);
    }

    #[test]
    fn wrap_around_delta() {
        // A counter with max_energy_range_uj = 1000 reads 0, 1, ..., 1000, 0, 1, ...
        assert_eq!(counter_delta_uj(100, 250, 1000), 150);
        assert_eq!(counter_delta_uj(999, 1000, 1000), 1);
        assert_eq!(counter_delta_uj(1000, 1000, 1000), 0);
        assert_eq!(counter_delta_uj(1000, 0, 1000), 1);
        assert_eq!(counter_delta_uj(1000, 1, 1000), 2);
        assert_eq!(counter_delta_uj(999, 0, 1000), 2);
        // 900 -> 1000 is 100, 1000 -> 0 is 1, 0 -> 50 is 50.
        assert_eq!(counter_delta_uj(900, 50, 1000), 151);
    }
}
