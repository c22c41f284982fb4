//! Attribution: a window's energy to processes, with conservation.
//!
//! For each power domain that counts toward the host (see
//! `sources::energy`), over a window of length `T`:
//! - idle energy `E_idle = min(E, P_idle * T)`; `P_idle` comes from config
//!   (`energy.idle_power_w`, the whole host's idle power, shared between the
//!   domains in proportion to their energy in the window), from the power
//!   model (its power at 0 % load), or is learned from this host's own
//!   windows (see [`IdleBaselineLearner`]);
//! - dynamic energy `E - E_idle`, given to processes in proportion to their
//!   CPU time on the domain's CPUs (`cpu_ns_per_cpu`; a process without a
//!   per-CPU split is spread evenly over all CPUs). The share of busy time
//!   nobody could be charged with (`unowned_busy_ns_per_cpu`), and all the
//!   dynamic energy of a domain whose CPUs ran no process, is `unattributed`.
//!
//! Idle energy stays in `idle_energy_j`; each process is told its share of it
//! (`idle_share_j`, by its share of the host's busy CPU time) without moving it.
//! So every window `sum(energy_j) + unattributed_energy_j + idle_energy_j ==
//! host_energy_j` (relative 1e-9); it is checked each window and violations
//! are counted.
//!
//! Limits: CPU time is the only driver (memory, disk, network and GPU power are
//! shared by CPU time too); RAPL does not see the rest of the platform (fans,
//! disks, power supply losses: use PUE or psys).
use std::collections::{BTreeMap, VecDeque};

use crate::sources::energy::{EnergyConfig, WindowEnergy};
use crate::sources::sched::CpuSample;
use crate::window::{DomainEnergy, WindowReport};

/// Relative tolerance of the conservation check.
pub const CONSERVATION_TOLERANCE: f64 = 1e-9;
/// Windows under this utilisation are "low-utilisation" for idle learning.
pub const LOW_UTILISATION: f64 = 0.10;
const LEARNER_WINDOWS: usize = 4096;

/// Learns a domain's idle power from its own windows.
///
/// Estimate: the lowest power seen in a window under 10 % utilisation; with
/// no such window yet, the intercept of a least-squares line of power over
/// utilisation (when at least 8 windows spread over 20 % of utilisation),
/// clamped to [0, lowest power seen]; otherwise the lowest power seen (an
/// upper bound: idle power is never above any window's power).
#[derive(Debug, Clone, Default)]
pub struct IdleBaselineLearner {
    /// (utilisation, power_w) of the last windows.
    windows: VecDeque<(f64, f64)>,
}

impl IdleBaselineLearner {
    pub fn observe(&mut self, utilisation: f64, power_w: f64) {
        if !utilisation.is_finite() || !power_w.is_finite() || power_w < 0.0 {
            return;
        }
        if self.windows.len() == LEARNER_WINDOWS {
            self.windows.pop_front();
        }
        self.windows
            .push_back((utilisation.clamp(0.0, 1.0), power_w));
    }

    pub fn estimate_w(&self) -> Option<f64> {
        let min_power = self.windows.iter().map(|w| w.1).reduce(f64::min)?;
        if let Some(low) = self
            .windows
            .iter()
            .filter(|w| w.0 < LOW_UTILISATION)
            .map(|w| w.1)
            .reduce(f64::min)
        {
            return Some(low);
        }
        let n = self.windows.len() as f64;
        let (u_min, u_max) = self
            .windows
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), w| {
                (lo.min(w.0), hi.max(w.0))
            });
        if self.windows.len() >= 8 && u_max - u_min >= 0.2 {
            let mean_u = self.windows.iter().map(|w| w.0).sum::<f64>() / n;
            let mean_p = self.windows.iter().map(|w| w.1).sum::<f64>() / n;
            let cov: f64 = self
                .windows
                .iter()
                .map(|w| (w.0 - mean_u) * (w.1 - mean_p))
                .sum();
            let var: f64 = self.windows.iter().map(|w| (w.0 - mean_u).powi(2)).sum();
            let intercept = mean_p - cov / var * mean_u;
            return Some(intercept.clamp(0.0, min_power));
        }
        Some(min_power)
    }
}

/// Splits each window's energy between idle, processes and unattributed.
#[derive(Debug, Clone, Default)]
pub struct Attributor {
    configured_idle_power_w: Option<f64>,
    learners: BTreeMap<String, IdleBaselineLearner>,
    conservation_violations: u64,
}

/// CPU time per CPU of a sample, as f64, and helpers over a domain's CPUs.
struct CpuView<'a> {
    sample: &'a CpuSample,
    cpus: usize,
}

impl CpuView<'_> {
    /// CPU time of process `i` on `domain_cpus`.
    fn process_ns_on(&self, i: usize, domain_cpus: &[u32]) -> f64 {
        let p = &self.sample.processes[i];
        if p.cpu_ns_per_cpu.is_empty() {
            if self.cpus == 0 {
                return 0.0;
            }
            p.cpu_ns as f64 * domain_cpus.len() as f64 / self.cpus as f64
        } else {
            domain_cpus
                .iter()
                .map(|&c| p.cpu_ns_per_cpu.get(c as usize).copied().unwrap_or(0) as f64)
                .sum()
        }
    }

    fn per_cpu_sum(values: &[u64], domain_cpus: &[u32]) -> f64 {
        domain_cpus
            .iter()
            .map(|&c| values.get(c as usize).copied().unwrap_or(0) as f64)
            .sum()
    }
}

impl Attributor {
    pub fn new(cfg: &EnergyConfig) -> Attributor {
        Attributor::with_idle_power(cfg.idle_power_w)
    }

    /// `idle_power_w`: the host's idle power from config, or None to use the model's or learn it.
    pub fn with_idle_power(idle_power_w: Option<f64>) -> Attributor {
        Attributor {
            configured_idle_power_w: idle_power_w.filter(|w| w.is_finite() && *w >= 0.0),
            ..Default::default()
        }
    }

    /// Violations of the conservation invariant seen so far.
    pub fn conservation_violations(&self) -> u64 {
        self.conservation_violations
    }

    /// Current learned idle power of a domain (None until it has been seen).
    pub fn learned_idle_power_w(&self, domain: &str) -> Option<f64> {
        self.learners.get(domain).and_then(|l| l.estimate_w())
    }

    /// Fill the energy fields of `report` (host, idle, unattributed, domains,
    /// source, baseline source, violations) and each process's `energy_j` and
    /// `idle_share_j`. `report.processes[i]` must be `sample.processes[i]`.
    pub fn attribute(
        &mut self,
        sample: &CpuSample,
        energy: &WindowEnergy,
        report: &mut WindowReport,
    ) {
        // The energy warnings are logged by the pipeline, each distinct one once.
        let duration_ns = if energy.duration_ns > 0 {
            energy.duration_ns
        } else {
            sample.end_unix_ns.saturating_sub(sample.start_unix_ns)
        };
        let duration_s = duration_ns as f64 / 1e9;
        let view = CpuView {
            sample,
            cpus: sample.cpus.max(sample.idle_ns_per_cpu.len() as u32) as usize,
        };
        let valid = |d: &&crate::sources::energy::DomainReading| {
            d.energy_j.is_finite() && d.energy_j >= 0.0
        };
        for d in energy.domains.iter().filter(|d| !valid(d)) {
            tracing::warn!(target: "sci_agent::energy", "domain {} left out: energy {} J is not a finite non-negative number", d.name, d.energy_j);
        }
        let counted: Vec<_> = energy
            .domains
            .iter()
            .filter(|d| d.counts_toward_host)
            .filter(valid)
            .collect();
        let host_energy_j: f64 = counted.iter().map(|d| d.energy_j).sum();

        let baseline_source = if self.configured_idle_power_w.is_some() {
            "config"
        } else if !counted.is_empty() && counted.iter().all(|d| d.idle_power_w.is_some()) {
            "model"
        } else {
            "learned"
        };

        let n = sample.processes.len();
        let mut process_energy_j = vec![0.0f64; n];
        let mut idle_energy_j = 0.0;
        let mut unattributed_energy_j = 0.0;
        for d in &counted {
            let energy_j = d.energy_j;
            let proc_ns: Vec<f64> = (0..n).map(|i| view.process_ns_on(i, &d.cpus)).collect();
            let unowned_ns = CpuView::per_cpu_sum(&sample.unowned_busy_ns_per_cpu, &d.cpus);
            let busy_ns = proc_ns.iter().sum::<f64>() + unowned_ns;
            let idle_ns = CpuView::per_cpu_sum(&sample.idle_ns_per_cpu, &d.cpus);

            let baseline_j = match (self.configured_idle_power_w, d.idle_power_w) {
                // The source knows this window's idle part (platform power
                // attributed as idle, a hypervisor's idle share).
                _ if d.known_idle_j.is_some() => d.known_idle_j.unwrap_or(0.0),
                (Some(host_idle_w), _) => {
                    if host_energy_j > 0.0 {
                        host_idle_w * duration_s * energy_j / host_energy_j
                    } else {
                        0.0
                    }
                }
                (None, Some(model_idle_w)) => model_idle_w * duration_s,
                (None, None) => {
                    let learner = self.learners.entry(d.name.clone()).or_default();
                    if duration_s > 0.0 {
                        let utilisation = if busy_ns + idle_ns > 0.0 {
                            busy_ns / (busy_ns + idle_ns)
                        } else {
                            0.0
                        };
                        learner.observe(utilisation, energy_j / duration_s);
                    }
                    learner.estimate_w().unwrap_or(0.0) * duration_s
                }
            };
            let idle_j = baseline_j.clamp(0.0, energy_j);
            let dynamic_j = energy_j - idle_j;
            idle_energy_j += idle_j;
            if busy_ns > 0.0 {
                for (i, ns) in proc_ns.iter().enumerate() {
                    process_energy_j[i] += dynamic_j * ns / busy_ns;
                }
                unattributed_energy_j += dynamic_j * unowned_ns / busy_ns;
            } else {
                unattributed_energy_j += dynamic_j;
            }
        }

        let busy_total_ns = sample.busy_cpu_ns() as f64;
        if report.processes.len() != n {
            tracing::warn!(
                target: "sci_agent::energy",
                "report has {} process records for {n} sampled processes; energy of the missing ones is unattributed",
                report.processes.len()
            );
        }
        for (i, energy_j) in process_energy_j.iter().enumerate() {
            match report.processes.get_mut(i) {
                Some(record) => {
                    record.energy_j = *energy_j;
                    record.idle_share_j = if busy_total_ns > 0.0 {
                        idle_energy_j * sample.processes[i].cpu_ns as f64 / busy_total_ns
                    } else {
                        0.0
                    };
                }
                None => unattributed_energy_j += energy_j,
            }
        }
        report.host_energy_j = host_energy_j;
        report.idle_energy_j = idle_energy_j;
        report.unattributed_energy_j = unattributed_energy_j;
        for extra in report.processes.iter_mut().skip(n) {
            // Records with no sampled process behind them get no energy.
            extra.energy_j = 0.0;
            extra.idle_share_j = 0.0;
        }
        self.check_conservation(report);

        report.energy_source = energy.source.clone();
        report.estimated = energy.estimated;
        report.idle_baseline_source = baseline_source.to_string();
        report.domains = counted
            .iter()
            .map(|d| DomainEnergy {
                domain: d.name.clone(),
                energy_j: d.energy_j,
            })
            .collect();
    }

    /// Check the invariant on a filled report; count and log a violation, and
    /// store the running count in `report.conservation_violations`.
    pub fn check_conservation(&mut self, report: &mut WindowReport) -> bool {
        let holds = conservation_holds(report);
        if !holds {
            self.conservation_violations += 1;
            let attributed_j: f64 = report.processes.iter().map(|p| p.energy_j).sum();
            tracing::warn!(
                target: "sci_agent::energy",
                "energy conservation violated: processes {attributed_j} J + unattributed {} J + idle {} J != host {} J",
                report.unattributed_energy_j,
                report.idle_energy_j,
                report.host_energy_j
            );
        }
        report.conservation_violations = self.conservation_violations;
        holds
    }
}

/// Check the conservation invariant of a filled report (for tests and audits).
pub fn conservation_holds(report: &WindowReport) -> bool {
    let total = report.processes.iter().map(|p| p.energy_j).sum::<f64>()
        + report.unattributed_energy_j
        + report.idle_energy_j;
    total.is_finite()
        && (total - report.host_energy_j).abs()
            <= CONSERVATION_TOLERANCE * report.host_energy_j.abs().max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learner_prefers_low_utilisation_windows() {
        let mut l = IdleBaselineLearner::default();
        assert_eq!(l.estimate_w(), None);
        l.observe(0.5, 60.0);
        assert_eq!(l.estimate_w(), Some(60.0));
        l.observe(0.05, 22.0);
        l.observe(0.08, 25.0);
        assert_eq!(l.estimate_w(), Some(22.0));
    }

    #[test]
    fn learner_regression_intercept() {
        // P = 20 + 80 u, utilisation between 20 % and 90 %: intercept 20 W.
        let mut l = IdleBaselineLearner::default();
        for k in 0..10 {
            let u = 0.2 + 0.07 * f64::from(k);
            l.observe(u, 20.0 + 80.0 * u);
        }
        let est = l.estimate_w().unwrap_or(f64::NAN);
        assert!((est - 20.0).abs() < 1e-9, "{est}");
    }
}
