//! Per-request CPU histograms of the window, per (service, scenario).
//!
//! The kernel keeps one log-linear histogram per (process, marker scenario,
//! `agent_common::request_cpu`); here
//! the processes of one service are added bucket by bucket, and each
//! histogram gets the joules per CPU-ns of that service's time in that
//! scenario in this window (the processes' attributed energy over their CPU
//! time, weighted by the time each spent in the scenario), which turns the
//! CPU distribution into energy per transaction. Run after attribution and
//! the scenario stage (it reads each process record's energy and service).
use std::collections::BTreeMap;

use crate::sources::sched::CpuSample;
use crate::transforms::scenario::Scenario;
use crate::window::{RequestCpuHistogram, WindowReport};

#[derive(Default)]
struct Totals {
    histogram: RequestCpuHistogram,
    energy_j: f64,
    cpu_ns: u64,
}

/// The window's histograms, sorted by (service, scenario).
/// `report.processes[i]` must describe `sample.processes[i]`.
pub fn histograms(sample: &CpuSample, report: &WindowReport) -> Vec<RequestCpuHistogram> {
    let mut merged: BTreeMap<(String, &'static str), Totals> = BTreeMap::new();
    for (process, record) in sample.processes.iter().zip(&report.processes) {
        if process.request_cpu.is_empty() {
            continue;
        }
        let service = record.service.as_deref().unwrap_or_default().to_string();
        let energy_j_per_cpu_ns = if process.cpu_ns > 0 {
            record.energy_j / process.cpu_ns as f64
        } else {
            0.0
        };
        for requests in &process.request_cpu {
            let Some(scenario) = Scenario::from_slot(requests.scenario) else {
                continue;
            };
            let totals = merged
                .entry((service.clone(), scenario.name()))
                .or_insert_with(|| Totals {
                    histogram: RequestCpuHistogram {
                        scenario: scenario.name().to_string(),
                        service: service.clone(),
                        sub_bucket_bits: agent_common::REQUEST_CPU_SUB_BUCKET_BITS,
                        ..Default::default()
                    },
                    ..Default::default()
                });
            let h = &mut totals.histogram;
            if h.counts.len() < requests.counts.len() {
                h.counts.resize(requests.counts.len(), 0);
            }
            for (sum, count) in h.counts.iter_mut().zip(&requests.counts) {
                *sum += count;
            }
            h.sum_cpu_ns += requests.sum_cpu_ns;
            let scenario_cpu_ns = process
                .scenario_cpu_ns
                .get(requests.scenario as usize)
                .copied()
                .unwrap_or(0);
            totals.energy_j += energy_j_per_cpu_ns * scenario_cpu_ns as f64;
            totals.cpu_ns += scenario_cpu_ns;
        }
    }
    merged
        .into_values()
        .map(|mut t| {
            if t.cpu_ns > 0 {
                t.histogram.energy_j_per_cpu_ns = t.energy_j / t.cpu_ns as f64;
            }
            t.histogram
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::sched::{ProcessCpu, RequestCpu};
    use crate::window::{CpuSource, ProcessRecord};

    fn process(pid: u32, cpu_ns: u64, credit_ns: u64, counts: Vec<u64>, sum: u64) -> ProcessCpu {
        let mut p = ProcessCpu {
            pid,
            cpu_ns,
            ..Default::default()
        };
        p.scenario_cpu_ns[agent_common::SCENARIO_CREDIT as usize] = credit_ns;
        p.scenario_cpu_ns[0] = cpu_ns - credit_ns;
        p.request_cpu = vec![RequestCpu {
            scenario: agent_common::SCENARIO_CREDIT,
            counts,
            sum_cpu_ns: sum,
        }];
        p
    }

    #[test]
    fn processes_of_a_service_add_up_and_carry_their_energy_rate() {
        let sample = CpuSample {
            source: CpuSource::Ebpf,
            start_unix_ns: 0,
            end_unix_ns: 1_000_000_000,
            cpus: 2,
            idle_ns_per_cpu: vec![],
            unowned_busy_ns_per_cpu: vec![],
            processes: vec![
                // 2 J over 1 s of CPU, 0.5 s of it credit.
                process(10, 1_000_000_000, 500_000_000, vec![0, 0, 3], 9),
                // 3 J over 0.5 s, all credit.
                process(11, 500_000_000, 500_000_000, vec![0, 1, 0, 2], 13),
                // Another service.
                process(12, 100, 100, vec![1], 0),
            ],
            lost: Default::default(),
        };
        let mut report = WindowReport::new("h".into(), "a".into(), 0, 1, CpuSource::Ebpf, 2);
        for (pid, energy_j, service) in [(10, 2.0, "loans"), (11, 3.0, "loans"), (12, 1.0, "web")] {
            report.processes.push(ProcessRecord {
                pid,
                energy_j,
                service: Some(service.into()),
                ..Default::default()
            });
        }
        let h = histograms(&sample, &report);
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].service.as_str(), h[0].scenario.as_str()),
            ("loans", "credit")
        );
        assert_eq!(h[0].counts, vec![0, 1, 3, 2]);
        assert_eq!(h[0].sum_cpu_ns, 22);
        // Credit time: 0.5 s at 2 nJ/ns and 0.5 s at 6 nJ/ns: 4 J over 1e9 ns.
        assert!((h[0].energy_j_per_cpu_ns - 4.0e-9).abs() < 1e-18);
        assert_eq!(h[1].service, "web");
        assert_eq!(h[1].counts, vec![1]);
        assert!((h[1].energy_j_per_cpu_ns - 0.01).abs() < 1e-12);
    }
}
