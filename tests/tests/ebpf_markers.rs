//! Request-level attribution inside one shared process: the marker uprobes
//! split its CPU time by scenario and count completed transactions in the
//! kernel. Ground truth: the service's own per-scenario thread CPU time and
//! counts. Each marker call is a uprobe trap (several microseconds here); the
//! kernel switches the thread's scenario in the middle of it, so the true
//! cost of a scenario lies between the work alone (`cpu_ns`) and the work
//! with both marker calls (`marked_cpu_ns`): the truth is their midpoint.
//! Privileged: skipped (with one line) without root outside CI.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use agent_common::{SCENARIO_CREDIT, SCENARIO_DRAWDOWN, SCENARIO_QUERY, SCENARIO_REPAYMENT};
use sci_agent::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use sci_agent::sources::sched::CpuSampler;
use sci_tests::procs::schedstat_ns;
use sci_tests::{skip_privileged, wait_for_exec, wait_until};

const SERVICE: &str = env!("CARGO_BIN_EXE_sci-shared-service");

fn scenario_truth_ns(truth: &serde_json::Value, name: &str) -> u64 {
    let work = truth[name]["cpu_ns"].as_u64().unwrap();
    let marked = truth[name]["marked_cpu_ns"].as_u64().unwrap();
    (work + marked) / 2
}

#[test]
fn shared_process_is_split_by_scenario() {
    if skip_privileged("shared_process_is_split_by_scenario") {
        return;
    }
    let mut sampler = EbpfSampler::load(&EbpfOptions::default()).unwrap();
    // The service links libsci_marker statically: follow the symbols in its own executable.
    sampler.attach_markers(Path::new(SERVICE)).unwrap();
    sampler.sample().unwrap();
    let out = Command::new(SERVICE).args(["2", "80"]).output().unwrap();
    assert!(out.status.success());
    let window = sampler.sample().unwrap();
    let truth: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();

    let service = window
        .processes
        .iter()
        .find(|p| p.comm.starts_with("sci-shared-ser"))
        .expect("the service appears in the window");
    for (name, slot) in [
        ("credit", SCENARIO_CREDIT),
        ("drawdown", SCENARIO_DRAWDOWN),
        ("repayment", SCENARIO_REPAYMENT),
        ("query", SCENARIO_QUERY),
    ] {
        let truth_ns = scenario_truth_ns(&truth, name);
        let agent_ns = service.scenario_cpu_ns[slot as usize];
        let error = (agent_ns as f64 - truth_ns as f64).abs() / truth_ns as f64;
        println!(
            "{name}: agent {agent_ns} ns, service {truth_ns} ns, error {:.3}%",
            error * 100.0
        );
        assert!(error < 0.02, "{name}: agent {agent_ns} vs truth {truth_ns}");
        let completed = truth[name]["completed"].as_u64().unwrap();
        assert_eq!(
            service.scenario_transactions[slot as usize], completed,
            "{name}: transactions"
        );
    }
    assert!(
        truth["query"]["failed"].as_u64().unwrap() > 0,
        "failed queries are not counted"
    );
    // Time outside any marker stays in slot 0; the slots add up to the process total.
    assert!(service.scenario_cpu_ns[0] > 0);
    assert_eq!(service.scenario_cpu_ns.iter().sum::<u64>(), service.cpu_ns);
}

/// The window document's business figures: two services mapped by rules (a
/// command-line rule and an environment rule) that report their transactions
/// through the ingest endpoint, and the shared service split by its markers.
#[test]
fn window_document_has_per_scenario_figures_from_rules_markers_and_ingest() {
    use sci_agent::config::AgentConfig;
    use sci_agent::pipeline::{Pipeline, PipelineOptions};
    use sci_agent::sources::ingest::{IngestCounters, IngestEndpoint};

    if skip_privileged("window_document_has_per_scenario_figures_from_rules_markers_and_ingest") {
        return;
    }
    let burn = env!("CARGO_BIN_EXE_sci-burn");
    let config_text = r#"
[scenarios]
[[scenarios.rules]]
service = "risk-batch"
scenario = "credit"
cmdline = 'sci-burn --duty 40 '

[[scenarios.rules]]
service = "statement-job"
scenario = "repayment"
env = "SCI_SERVICE=statement"

[[scenarios.rules]]
service = "shared"
comm = "sci-shared-ser*"

[ingest]
udp_listen = "127.0.0.1:0"

# The profiler's first drain would sit between the ground-truth reads and the window.
[profile]
enabled = false
"#;
    let config = AgentConfig::from_toml_str(config_text, Path::new("test.toml")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let counters = IngestCounters::new();
    let endpoint = runtime
        .block_on(IngestEndpoint::start(&config.ingest, counters.clone()))
        .unwrap();
    let ingest_addr = endpoint.udp_addr().unwrap();
    let (mut pipeline, fallback) = Pipeline::open(
        &config,
        &PipelineOptions {
            force_procfs: false,
            marker_libraries: vec![SERVICE.into()],
        },
    )
    .unwrap();
    assert!(fallback.is_none());
    pipeline.set_ingest(counters.clone());

    let mut risk = Command::new(burn)
        .args(["--duty", "40", "--seconds", "30"])
        .spawn()
        .unwrap();
    let mut statement = Command::new(burn)
        .args(["--duty", "20", "--seconds", "30"])
        .env("SCI_SERVICE", "statement")
        .spawn()
        .unwrap();
    let (risk_pid, statement_pid) = (risk.id(), statement.id());
    wait_for_exec(risk_pid, Path::new(burn));
    wait_for_exec(statement_pid, Path::new(burn));
    let before = (schedstat_ns(risk_pid), schedstat_ns(statement_pid));
    pipeline.next_window().unwrap();

    let out = Command::new(SERVICE).args(["2", "80"]).output().unwrap();
    assert!(out.status.success());
    let truth: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    // The rule-mapped services cannot link the marker library: they report counts.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(b"credit 7\n", ingest_addr).unwrap();
    socket.send_to(b"repayment 11\n", ingest_addr).unwrap();
    socket.send_to(b"lending 3\n", ingest_addr).unwrap(); // unknown scenario: refused
    wait_until("the endpoint to take the three datagrams", || {
        let received = counters.peek();
        received.accepted_lines == 2 && received.refused_total() == 1
    });

    let report = pipeline.next_window().unwrap();
    let after = (schedstat_ns(risk_pid), schedstat_ns(statement_pid));
    let _ = risk.kill();
    let _ = statement.kill();
    let _ = risk.wait();
    let _ = statement.wait();

    let process = |pid: u32| report.processes.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(process(risk_pid).service.as_deref(), Some("risk-batch"));
    assert_eq!(process(risk_pid).scenario.as_deref(), Some("credit"));
    assert_eq!(
        process(statement_pid).service.as_deref(),
        Some("statement-job")
    );
    assert_eq!(
        process(statement_pid).scenario.as_deref(),
        Some("repayment")
    );
    let shared = report
        .processes
        .iter()
        .find(|p| p.comm.starts_with("sci-shared-ser"))
        .unwrap();
    assert_eq!(shared.service.as_deref(), Some("shared"));

    let rule_truth = [
        ("credit", after.0 - before.0, 7u64),
        ("drawdown", 0, 0),
        ("repayment", after.1 - before.1, 11),
        ("query", 0, 0),
    ];
    let mut expected_units = 0.0;
    for (name, rule_ns, reported) in rule_truth {
        let line = report
            .scenarios
            .iter()
            .find(|s| s.scenario == name)
            .unwrap();
        let expected_ns = rule_ns + scenario_truth_ns(&truth, name);
        let error = (line.cpu_ns as f64 - expected_ns as f64).abs() / expected_ns as f64;
        println!(
            "{name}: window {} ns, truth {expected_ns} ns ({:.3}%), {} transactions",
            line.cpu_ns,
            error * 100.0,
            line.transactions
        );
        assert!(error < 0.02, "{name}: {} vs {expected_ns}", line.cpu_ns);
        let expected_txn = reported + truth[name]["completed"].as_u64().unwrap();
        assert_eq!(line.transactions, expected_txn, "{name} transactions");
        expected_units += line.weight * expected_txn as f64;
    }
    assert_eq!(report.weights["credit"], 24.0);
    assert!((report.business_units - expected_units).abs() < 1e-9);
    assert_eq!(report.ingest_refused.get("unknown_scenario"), Some(&1));
    // Every joule of the processes is on exactly one scenario line (or unassigned).
    let by_process: f64 = report.processes.iter().map(|p| p.energy_j).sum();
    let by_scenario: f64 = report.scenarios.iter().map(|s| s.energy_j).sum();
    assert!((by_process - by_scenario).abs() <= 1e-9 * by_process.max(1.0));
    drop(endpoint);
}
