//! The CPU profiler finds a deliberate hot spot in a real process: a C
//! program (compiled here with frame pointers) that spends about 95% of its
//! time in `hot_path` and the rest in `cold_path`. Checked against ground
//! truth: `hot_path` tops the process's folded stacks with most of its
//! samples, the stacks are root first (`main` before `hot_path`), and the
//! number of samples matches the process's CPU time from
//! /proc/<pid>/schedstat times the sampling frequency.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use agent_common::privileged::skip_privileged;
use sci_agent::sources::profile::{CpuProfiler, ProfilerOptions};

/// Shared with tests/tests/ebpf_profile_scenario.rs.
const HOT_C: &str = include_str!("../../tests/fixtures/hot_path.c");

/// Polls /proc/<pid>/stat until the kernel shows the process stopped (`T`).
fn wait_until_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit_once(')').unwrap().1.trim_start().chars().next();
        if state == Some('T') {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn schedstat_cpu_ns(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn hot_path_tops_the_profile_of_its_process() {
    if skip_privileged("hot_path_tops_the_profile_of_its_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("hot.c");
    let binary = dir.path().join("hot");
    std::fs::write(&source, HOT_C).unwrap();
    let status = Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("running cc");
    assert!(status.success(), "cc failed");

    let frequency_hz = 99;
    let mut profiler = CpuProfiler::load(&ProfilerOptions {
        frequency_hz,
        cpus: None,
    })
    .unwrap();
    // Whatever ran before the child started is not this test's business.
    profiler.drain().unwrap();

    let mut child = Command::new(&binary)
        .arg("30")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(3));
    // Stop the child so its CPU time and its samples cover the same span,
    // while it still exists for symbolisation.
    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    wait_until_stopped(pid);
    let cpu_ns = schedstat_cpu_ns(pid);
    let profile = profiler.drain().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = child.wait();

    let mine: Vec<_> = profile.stacks.iter().filter(|s| s.pid == pid).collect();
    assert!(!mine.is_empty(), "no samples for pid {pid}: {profile:?}");
    let total: u64 = mine.iter().map(|s| s.samples).sum();
    let hot: u64 = mine
        .iter()
        .filter(|s| s.stack.split(';').any(|f| f == "hot_path"))
        .map(|s| s.samples)
        .sum();
    let top = &mine[0];
    println!(
        "pid {pid}: {total} samples, {hot} in hot_path, cpu {cpu_ns} ns, top {} ({})",
        top.stack, top.samples
    );
    let frames: Vec<&str> = top.stack.split(';').collect();
    let hot_at = frames.iter().position(|f| *f == "hot_path");
    let main_at = frames.iter().position(|f| *f == "main");
    assert!(hot_at.is_some(), "top stack lacks hot_path: {}", top.stack);
    assert!(main_at < hot_at, "stack is not root first: {}", top.stack);
    assert!(
        hot as f64 >= 0.8 * total as f64,
        "hot_path has {hot} of {total} samples"
    );
    assert_eq!(profile.comms.get(&pid).map(String::as_str), Some("hot"));

    // Samples = CPU seconds x frequency, within sampling noise.
    let expected = cpu_ns as f64 / 1e9 * frequency_hz as f64;
    assert!(
        (total as f64 - expected).abs() <= 0.2 * expected,
        "{total} samples for {cpu_ns} ns of CPU at {frequency_hz} Hz (expected {expected:.0})"
    );
}
