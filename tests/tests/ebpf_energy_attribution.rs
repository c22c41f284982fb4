//! Energy attribution end to end: real processes with known CPU demands, the
//! real eBPF sampler, and the real powercap reader pointed at a tree laid out
//! like /sys/class/powercap that this test drives (the VM has no RAPL).
//! Privileged: skipped (with one line) without root outside CI.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sci_agent::config::AgentConfig;
use sci_agent::pipeline::{Pipeline, PipelineOptions};
use sci_tests::procs::{schedstat_ns, Reaped};
use sci_tests::{skip_privileged, wait_for_exec};

const BURN: &str = env!("CARGO_BIN_EXE_sci-burn");
const MAX_UJ: u64 = 262_143_328_850;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn processes_get_their_cpu_share_of_dynamic_energy_and_energy_is_conserved() {
    if skip_privileged("processes_get_their_cpu_share_of_dynamic_energy_and_energy_is_conserved") {
        return;
    }
    let sysfs = tempfile::tempdir().unwrap();
    let root = sysfs.path();
    let cpus = sci_agent::sources::sched::proc_info::online_cpus();
    for cpu in &cpus {
        write(
            &root.join(format!(
                "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
            )),
            "0\n",
        );
    }
    let package = root.join("class/powercap/intel-rapl:0");
    let dram = root.join("class/powercap/intel-rapl:0:0");
    // Start near the top of the range so the counter wraps during the test.
    let mut package_uj: u64 = MAX_UJ - 50_000_000;
    let mut dram_uj: u64 = 1_000_000;
    for (dir, name, value) in [
        (&package, "package-0", package_uj),
        (&dram, "dram", dram_uj),
    ] {
        write(&dir.join("name"), &format!("{name}\n"));
        write(&dir.join("energy_uj"), &format!("{value}\n"));
        write(&dir.join("max_energy_range_uj"), &format!("{MAX_UJ}\n"));
    }

    let mut config = AgentConfig::default();
    config.energy.sysfs_root = root.to_path_buf();
    config.energy.source = "powercap".into();
    // This test moves the counters itself, window by window: no start-up probe.
    config.energy.probe_ms = 0;
    config.energy.idle_power_w = Some(6.0);
    // The profiler's first drain (cold symboliser, tens of ms) would sit
    // between the schedstat reads and the window's start; this test is about energy.
    config.profile.enabled = false;
    let (mut pipeline, fallback) = Pipeline::open(&config, &PipelineOptions::default()).unwrap();
    assert!(fallback.is_none(), "eBPF must load here: {fallback:?}");

    let mut children = Reaped(Vec::new());
    for duty in ["90", "55", "30"] {
        children.0.push(
            Command::new(BURN)
                .args(["--duty", duty, "--seconds", "60"])
                .spawn()
                .unwrap(),
        );
    }
    let pids: Vec<u32> = children.0.iter().map(|c| c.id()).collect();
    for pid in &pids {
        wait_for_exec(*pid, Path::new(BURN));
    }

    let mut before: HashMap<u32, u64> = pids.iter().map(|p| (*p, schedstat_ns(*p))).collect();
    pipeline.next_window().unwrap();
    for window in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        // 45 J on the package, 7 J on dram in this window. The package counter
        // takes the values 0..=MAX_UJ (the kernel's semantics: the value after
        // MAX_UJ is 0) and wraps in window 1: MAX_UJ - 5 J + 45 J reads 39,999,999.
        package_uj = (package_uj + 45_000_000) % (MAX_UJ + 1);
        if window == 1 {
            assert_eq!(package_uj, 39_999_999);
        }
        dram_uj += 7_000_000;
        std::fs::write(package.join("energy_uj"), format!("{package_uj}\n")).unwrap();
        std::fs::write(dram.join("energy_uj"), format!("{dram_uj}\n")).unwrap();
        let report = pipeline.next_window().unwrap();
        let after: HashMap<u32, u64> = pids.iter().map(|p| (*p, schedstat_ns(*p))).collect();

        assert_eq!(report.energy_source, "rapl-powercap");
        assert!(!report.estimated);
        // Exactly 52 J: the tolerance is floating-point rounding only (one
        // microjoule lost at the wrap would be 2e-8 of it).
        assert!(
            (report.host_energy_j - 52.0).abs() <= 1e-12 * 52.0,
            "window {window}: host {} J, 52 J spent",
            report.host_energy_j
        );
        let attributed: f64 = report.processes.iter().map(|p| p.energy_j).sum();
        let total = attributed + report.unattributed_energy_j + report.idle_energy_j;
        assert!(
            (total - report.host_energy_j).abs() <= 1e-9 * report.host_energy_j,
            "window {window}: {attributed} + {} + {} != {}",
            report.unattributed_energy_j,
            report.idle_energy_j,
            report.host_energy_j
        );
        assert_eq!(report.conservation_violations, 0);
        // Idle: 6 W over the window.
        let seconds = report.duration_ns() as f64 / 1e9;
        assert!((report.idle_energy_j - 6.0 * seconds).abs() < 1e-6 * report.host_energy_j);

        let dynamic_j = report.host_energy_j - report.idle_energy_j;
        for pid in &pids {
            let truth_ns = after[pid] - before[pid];
            let expected_j = dynamic_j * truth_ns as f64 / report.busy_cpu_ns as f64;
            let agent_j = report
                .processes
                .iter()
                .find(|p| p.pid == *pid)
                .unwrap()
                .energy_j;
            let error = (agent_j - expected_j).abs() / expected_j;
            println!(
                "window {window} pid {pid}: {agent_j:.4} J attributed, {expected_j:.4} J from schedstat share, error {:.3}%",
                error * 100.0
            );
            assert!(
                error < 0.01,
                "window {window} pid {pid}: {agent_j} J vs {expected_j} J"
            );
        }
        before = after;
    }
}
