//! Scenario figures of a window against a hand computation: marker slots,
//! rule scenarios, unassigned time, transactions from markers and ingest,
//! R = sum alpha_i * TA_i, and energy conservation across the scenario lines.
#![allow(clippy::unwrap_used)]
use std::path::Path;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use sci_agent::config::AgentConfig;
use sci_agent::sources::sched::proc_info::ProcInfo;
use sci_agent::sources::sched::{CpuSample, ProcessCpu};
use sci_agent::transforms::scenario::{Scenario, ScenarioError, ScenarioStage, TransactionCounts};
use sci_agent::window::{CpuSource, ProcessRecord, ScenarioRecord, WindowReport};

const RULES: &str = r#"
[[scenarios.rules]]
service = "loan"
scenario = "credit"
comm = "loan-svc"

[[scenarios.rules]]
service = "acct"
scenario = "query"
comm = "query-api"

[[scenarios.rules]]
service = "gateway"
comm = "nginx"
"#;

fn stage(extra: &str) -> ScenarioStage {
    let text = format!("{extra}\n{RULES}");
    let config = AgentConfig::from_toml_str(&text, Path::new("test.toml")).unwrap();
    ScenarioStage::new(&config.scenarios).unwrap()
}

struct Proc {
    pid: u32,
    comm: &'static str,
    slots_cpu_ns: [u64; 5],
    transactions: [u64; 5],
    energy_j: f64,
    carbon_g: f64,
    embodied_g: f64,
}

fn window(procs: &[Proc]) -> (CpuSample, WindowReport) {
    let processes: Vec<ProcessCpu> = procs
        .iter()
        .map(|p| ProcessCpu {
            pid: p.pid,
            info: Arc::new(ProcInfo {
                comm: p.comm.into(),
                ..Default::default()
            }),
            start_ticks: Some(100 + p.pid as u64),
            cpu_ns: p.slots_cpu_ns.iter().sum(),
            scenario_cpu_ns: p.slots_cpu_ns,
            scenario_transactions: p.transactions,
            ..Default::default()
        })
        .collect();
    let mut report =
        WindowReport::new("h".into(), "i".into(), 0, 1_000_000_000, CpuSource::Ebpf, 2);
    report.processes = procs
        .iter()
        .zip(&processes)
        .map(|(p, cpu)| ProcessRecord {
            pid: p.pid,
            comm: p.comm.into(),
            cpu_ns: cpu.cpu_ns,
            energy_j: p.energy_j,
            carbon_g: p.carbon_g,
            embodied_g: p.embodied_g,
            ..Default::default()
        })
        .collect();
    let sample = CpuSample {
        source: CpuSource::Ebpf,
        start_unix_ns: 0,
        end_unix_ns: 1_000_000_000,
        cpus: 2,
        idle_ns_per_cpu: vec![0, 0],
        unowned_busy_ns_per_cpu: vec![0, 0],
        processes,
        lost: Default::default(),
    };
    (sample, report)
}

fn hand_window() -> (CpuSample, WindowReport) {
    window(&[
        // 20% unmarked (rule: credit), 50% credit marker, 30% drawdown marker.
        Proc {
            pid: 1,
            comm: "loan-svc",
            slots_cpu_ns: [200_000, 500_000, 300_000, 0, 0],
            transactions: [0, 3, 2, 0, 0],
            energy_j: 10.0,
            carbon_g: 2.0,
            embodied_g: 0.5,
        },
        Proc {
            pid: 2,
            comm: "query-api",
            slots_cpu_ns: [400_000, 0, 0, 0, 0],
            transactions: [0, 0, 0, 0, 7],
            energy_j: 4.0,
            carbon_g: 0.8,
            embodied_g: 0.1,
        },
        // No rule: unmarked half is unassigned, marked half repayment.
        Proc {
            pid: 3,
            comm: "cron",
            slots_cpu_ns: [50_000, 0, 0, 50_000, 0],
            transactions: [0, 0, 0, 1, 0],
            energy_j: 1.0,
            carbon_g: 0.2,
            embodied_g: 0.05,
        },
        // Service-only rule: named, but its time is unassigned.
        Proc {
            pid: 4,
            comm: "nginx",
            slots_cpu_ns: [500_000, 0, 0, 0, 0],
            transactions: [0; 5],
            energy_j: 2.0,
            carbon_g: 0.4,
            embodied_g: 0.1,
        },
    ])
}

fn line<'a>(report: &'a WindowReport, name: &str) -> &'a ScenarioRecord {
    report
        .scenarios
        .iter()
        .find(|s| s.scenario == name)
        .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn ingest_counts() -> TransactionCounts {
    let mut counts = TransactionCounts::default();
    counts.add(Scenario::Credit, 10);
    counts.add(Scenario::Query, 100);
    counts
}

#[test]
fn figures_match_a_hand_computation() {
    let mut stage = stage("");
    let (sample, mut report) = hand_window();
    stage.apply(&sample, &mut report, &ingest_counts()).unwrap();

    let names: Vec<&str> = report
        .scenarios
        .iter()
        .map(|s| s.scenario.as_str())
        .collect();
    assert_eq!(
        names,
        ["credit", "drawdown", "repayment", "query", "unassigned"]
    );
    // (scenario, weight, transactions, cpu_ns, energy_j, carbon_g, embodied_g), by hand.
    let expected = [
        ("credit", 24.0, 3 + 10, 700_000, 7.0, 1.4, 0.35),
        ("drawdown", 7.0, 2, 300_000, 3.0, 0.6, 0.15),
        ("repayment", 3.0, 1, 50_000, 0.5, 0.1, 0.025),
        ("query", 1.0, 7 + 100, 400_000, 4.0, 0.8, 0.1),
        ("unassigned", 0.0, 0, 550_000, 2.5, 0.5, 0.125),
    ];
    for (name, weight, tx, cpu_ns, energy_j, carbon_g, embodied_g) in expected {
        let l = line(&report, name);
        assert_eq!(
            (l.weight, l.transactions, l.cpu_ns),
            (weight, tx, cpu_ns),
            "{name}"
        );
        assert!(close(l.energy_j, energy_j), "{name} energy {}", l.energy_j);
        assert!(close(l.carbon_g, carbon_g), "{name} carbon {}", l.carbon_g);
        assert!(
            close(l.embodied_g, embodied_g),
            "{name} embodied {}",
            l.embodied_g
        );
    }
    // R = 24*13 + 7*2 + 3*1 + 1*107.
    assert_eq!(report.business_units, 436.0);
    assert_eq!(report.weights.get("credit"), Some(&24.0));
    assert_eq!(report.weights.len(), 4);

    let per_process: Vec<(Option<&str>, Option<&str>)> = report
        .processes
        .iter()
        .map(|p| (p.scenario.as_deref(), p.service.as_deref()))
        .collect();
    assert_eq!(
        per_process,
        [
            (Some("credit"), Some("loan")),
            (Some("query"), Some("acct")),
            (None, None),
            (None, Some("gateway")),
        ]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["weights"]["repayment"], 3.0);
    assert_eq!(json["scenarios"][4]["scenario"], "unassigned");
}

#[test]
fn overridden_weights_change_r_and_are_disclosed() {
    let mut stage = stage("[scenarios.weights]\ncredit = 30\nquery = 2\n");
    let (sample, mut report) = hand_window();
    stage.apply(&sample, &mut report, &ingest_counts()).unwrap();
    assert_eq!(
        report.business_units,
        30.0 * 13.0 + 14.0 + 3.0 + 2.0 * 107.0
    );
    assert_eq!(line(&report, "credit").weight, 30.0);
    assert_eq!(report.weights.get("query"), Some(&2.0));
    assert_eq!(report.weights.get("drawdown"), Some(&7.0));
}

#[test]
fn energy_is_conserved_across_scenarios_for_many_processes() {
    // Deterministic pseudo-random processes (seeded), odd splits included.
    let mut rng = SmallRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    let mut next = move || rng.next_u64();
    let comms = ["loan-svc", "query-api", "nginx", "cron", "java"];
    let procs: Vec<Proc> = (0..500)
        .map(|i| {
            let mut slots = [0u64; 5];
            for s in slots.iter_mut() {
                if next() % 3 != 0 {
                    *s = next() % 10_000_000;
                }
            }
            let e = (next() % 1_000_000) as f64 / 7_919.0;
            Proc {
                pid: i + 10,
                comm: comms[(next() % 5) as usize],
                slots_cpu_ns: slots,
                transactions: [0, next() % 5, next() % 5, next() % 5, next() % 5],
                energy_j: e,
                carbon_g: e * 0.000_15,
                embodied_g: e * 0.000_02,
            }
        })
        .collect();
    let mut stage = stage("");
    let (sample, mut report) = window(&procs);
    stage
        .apply(&sample, &mut report, &TransactionCounts::default())
        .unwrap();

    let sum = |f: fn(&ScenarioRecord) -> f64| report.scenarios.iter().map(f).sum::<f64>();
    let process_energy_j: f64 = report.processes.iter().map(|p| p.energy_j).sum();
    let process_carbon_g: f64 = report.processes.iter().map(|p| p.carbon_g).sum();
    let process_embodied_g: f64 = report.processes.iter().map(|p| p.embodied_g).sum();
    assert!(close(sum(|s| s.energy_j), process_energy_j));
    assert!(close(sum(|s| s.carbon_g), process_carbon_g));
    assert!(close(sum(|s| s.embodied_g), process_embodied_g));
    let cpu_ns: u64 = report.scenarios.iter().map(|s| s.cpu_ns).sum();
    assert_eq!(
        cpu_ns,
        sample.processes.iter().map(|p| p.cpu_ns).sum::<u64>()
    );
    assert!(report.scenarios.iter().all(|s| s.energy_j >= -1e-9));
    let tx: u64 = report.scenarios.iter().map(|s| s.transactions).sum();
    let marker_tx: u64 = procs
        .iter()
        .map(|p| p.transactions[1..].iter().sum::<u64>())
        .sum();
    assert_eq!(tx, marker_tx);
}

#[test]
fn a_new_process_with_a_reused_pid_gets_its_own_scenario_across_windows() {
    let mut stage = stage("");
    let (mut sample, mut report) = window(&[Proc {
        pid: 77,
        comm: "loan-svc",
        slots_cpu_ns: [1_000, 0, 0, 0, 0],
        transactions: [0; 5],
        energy_j: 1.0,
        carbon_g: 0.0,
        embodied_g: 0.0,
    }]);
    sample.processes[0].exited = true;
    stage
        .apply(&sample, &mut report, &TransactionCounts::default())
        .unwrap();
    assert_eq!(report.processes[0].scenario.as_deref(), Some("credit"));
    assert_eq!(line(&report, "credit").energy_j, 1.0);

    // Next window: PID 77 belongs to a new process (other start time).
    let (mut sample, mut report) = window(&[Proc {
        pid: 77,
        comm: "query-api",
        slots_cpu_ns: [1_000, 0, 0, 0, 0],
        transactions: [0; 5],
        energy_j: 1.0,
        carbon_g: 0.0,
        embodied_g: 0.0,
    }]);
    sample.processes[0].start_ticks = Some(99_999);
    stage
        .apply(&sample, &mut report, &TransactionCounts::default())
        .unwrap();
    assert_eq!(report.processes[0].scenario.as_deref(), Some("query"));
    assert_eq!(line(&report, "credit").energy_j, 0.0);
    assert_eq!(line(&report, "query").energy_j, 1.0);
}

#[test]
fn mismatched_report_is_an_error_not_a_wrong_figure() {
    let mut stage = stage("");
    let (sample, mut report) = hand_window();
    report.processes.pop();
    let e = stage
        .apply(&sample, &mut report, &TransactionCounts::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            ScenarioError::ProcessMismatch {
                report: 3,
                sample: 4
            }
        ),
        "{e}"
    );
}
