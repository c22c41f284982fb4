//! `cargo xtask demo`, short: it must end with a fleet SCI_CF and the
//! per-scenario table, write the report, and leave no process behind, also
//! when interrupted with Ctrl-C (SIGINT).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sci_tests::workspace_root;

fn demo(out: &std::path::Path, duration: &str) -> Command {
    let mut cmd = sci_tests::cargo();
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "xtask",
        "--",
        "demo",
        "--duration",
        duration,
        "--period",
        "4s",
        "--out",
    ])
    .arg(out)
    .current_dir(workspace_root());
    cmd
}

/// Processes started from the demo's binaries that are still alive.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if [
            "target/release/sci-agent ",
            "target/release/sci-aggregator ",
            "target/release/sci-finance-service ",
            "target/release/sci-loadgen ",
        ]
        .iter()
        .any(|b| cmdline.contains(b))
        {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn short_demo_prints_the_fleet_sci_and_the_scenario_table() {
    let out = tempfile::tempdir().unwrap();
    let output = demo(out.path(), "12s").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The console says what the report says: the same mean and pooled
    // figures, 4 significant digits, unit-scaled.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let mean = report["sci_cf_mean"]
        .as_f64()
        .expect("the demo's report has a SCI_CF");
    assert!(mean > 0.0 && mean.is_finite());
    let mean_line = stdout
        .lines()
        .find(|l| l.contains("SCI_CF, mean of the SCI_j of"))
        .unwrap();
    assert!(
        mean_line.contains(&format!("{} period(s)", report["periods_in_mean"]))
            && mean_line.ends_with(&sci_aggregator::report::sci_text(Some(mean))),
        "{mean_line} against the report's {mean}"
    );
    let pooled_line = stdout
        .lines()
        .find(|l| l.contains("pooled sum(O+M)/sum(R)"))
        .unwrap();
    assert!(
        pooled_line.ends_with(&sci_aggregator::report::sci_text(
            report["sci_cf_pooled"].as_f64()
        )),
        "{pooled_line}"
    );
    let periods = report["periods"].as_array().unwrap();
    for p in periods.iter().filter(|p| p["in_mean"] == false) {
        let when = sci_aggregator::report::unix_to_text(p["start_unix_s"].as_u64().unwrap());
        assert!(
            stdout.contains(&format!("left out {when}")),
            "period {when} left out without a line"
        );
    }
    for scenario in ["credit", "drawdown", "repayment", "query"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(scenario))
            .unwrap_or_else(|| panic!("no {scenario} row"));
        let transactions: u64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(transactions > 0, "{row}");
    }
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(report.contains("SCI_CF (mean of the periods' SCI_j"));
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}

#[test]
fn ctrl_c_stops_everything() {
    let out = tempfile::tempdir().unwrap();
    // Build first, so the interrupt lands while the system runs.
    assert!(sci_tests::cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "sci-agent",
            "-p",
            "sci-aggregator",
            "-p",
            "sci-workload"
        ])
        .current_dir(workspace_root())
        .status()
        .unwrap()
        .success());
    let mut child = demo(out.path(), "60s")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.path().join("loadgen.json").exists() {
        assert!(Instant::now() < deadline, "the demo did not start its load");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit after Ctrl-C: {status}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}
