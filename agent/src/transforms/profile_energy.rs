//! The CPU profile's energy: each folded stack of a window's profile is
//! charged at its process's joules per CPU-ns (a transform: it needs the
//! attributed window).
use std::collections::HashMap;

use agent_common::Scenario;

use crate::sources::profile::WindowProfile;
use crate::window::{ProcessRecord, ProfileStack, WindowReport};

/// Scenario code of a marker slot (`None` for slot 0 or an unknown slot).
pub fn scenario_of_slot(slot: u32) -> Option<&'static str> {
    Scenario::from_slot(slot).map(Scenario::name)
}

/// The window's profile with energy: each stack gets `samples x period x
/// (energy_j / cpu_ns)` of its process in `report`; service and scenario come
/// from the process record, the marker scenario of the sampled thread
/// overriding the process's rule scenario. Stacks of a process absent from
/// the report (or with no CPU time) keep their samples with zero energy.
pub fn weigh(profile: &WindowProfile, report: &WindowReport) -> Vec<ProfileStack> {
    let period_ns = if profile.frequency_hz == 0 {
        0.0
    } else {
        1e9 / profile.frequency_hz as f64
    };
    let processes: HashMap<u32, &ProcessRecord> =
        report.processes.iter().map(|p| (p.pid, p)).collect();
    profile
        .stacks
        .iter()
        .map(|stack| {
            let process = processes.get(&stack.pid);
            let joules_per_cpu_ns = match process {
                Some(p) if p.cpu_ns > 0 => p.energy_j / p.cpu_ns as f64,
                _ => 0.0,
            };
            let comm = process
                .map(|p| p.comm.to_string())
                .or_else(|| profile.comms.get(&stack.pid).cloned())
                .unwrap_or_default();
            let scenario = scenario_of_slot(stack.scenario_slot)
                .map(str::to_string)
                .or_else(|| process.and_then(|p| p.scenario.as_deref().map(str::to_string)));
            ProfileStack {
                pid: stack.pid,
                comm,
                service: process.and_then(|p| p.service.as_deref().map(str::to_string)),
                scenario,
                stack: stack.stack.clone(),
                samples: stack.samples,
                energy_j: stack.samples as f64 * period_ns * joules_per_cpu_ns,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::profile::FoldedStack;
    use crate::window::CpuSource;
    use std::collections::BTreeMap;

    fn report() -> WindowReport {
        let mut report = WindowReport::new(
            "h".into(),
            "i".into(),
            0,
            10_000_000_000,
            CpuSource::Ebpf,
            2,
        );
        report.processes = vec![
            ProcessRecord {
                pid: 10,
                comm: "loan-api".into(),
                cpu_ns: 2_000_000_000,
                energy_j: 30.0,
                scenario: Some("query".into()),
                service: Some("loan-api".into()),
                ..Default::default()
            },
            ProcessRecord {
                pid: 11,
                comm: "idle-daemon".into(),
                cpu_ns: 0,
                energy_j: 0.0,
                ..Default::default()
            },
        ];
        report
    }

    #[test]
    fn weigh_charges_samples_at_the_process_joules_per_cpu_ns() {
        let profile = WindowProfile {
            frequency_hz: 20,
            stacks: vec![
                FoldedStack {
                    pid: 10,
                    scenario_slot: agent_common::SCENARIO_CREDIT,
                    stack: "main;score;hot_path".into(),
                    samples: 30,
                },
                FoldedStack {
                    pid: 10,
                    scenario_slot: 0,
                    stack: "main;idle".into(),
                    samples: 10,
                },
                FoldedStack {
                    pid: 11,
                    scenario_slot: 0,
                    stack: "main".into(),
                    samples: 2,
                },
                FoldedStack {
                    pid: 99,
                    scenario_slot: 0,
                    stack: "gone".into(),
                    samples: 1,
                },
            ],
            samples: 43,
            comms: BTreeMap::from([(99, "short".to_string())]),
            ..Default::default()
        };
        let weighed = weigh(&profile, &report());
        // Period 50 ms; 30 J / 2 s CPU = 15 J per CPU-second.
        // 30 samples = 1.5 s -> 22.5 J; 10 samples = 0.5 s -> 7.5 J.
        assert_eq!(weighed.len(), 4);
        assert!((weighed[0].energy_j - 22.5).abs() < 1e-9);
        assert_eq!(weighed[0].scenario.as_deref(), Some("credit"));
        assert_eq!(weighed[0].service.as_deref(), Some("loan-api"));
        assert!((weighed[1].energy_j - 7.5).abs() < 1e-9);
        assert_eq!(weighed[1].scenario.as_deref(), Some("query"));
        assert_eq!(weighed[2].energy_j, 0.0);
        assert_eq!(weighed[2].comm, "idle-daemon");
        assert_eq!(weighed[3].energy_j, 0.0);
        assert_eq!(weighed[3].comm, "short");
        assert_eq!(weighed[3].samples, 1);
    }

    #[test]
    fn slots_map_to_the_standard_scenarios() {
        assert_eq!(scenario_of_slot(1), Some("credit"));
        assert_eq!(scenario_of_slot(2), Some("drawdown"));
        assert_eq!(scenario_of_slot(3), Some("repayment"));
        assert_eq!(scenario_of_slot(4), Some("query"));
        assert_eq!(scenario_of_slot(0), None);
        assert_eq!(scenario_of_slot(5), None);
    }
}
