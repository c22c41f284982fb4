//! `sci-agent sample` as a user runs it: the JSON document, processes that
//! start and end inside the window, and the procfs fallback without privileges.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use sci_tests::{cargo_bin, is_root, skip_privileged};

const BURN: &str = env!("CARGO_BIN_EXE_sci-burn");

fn sample_json(extra: &[&str], uid: Option<u32>) -> (serde_json::Value, String) {
    let agent = cargo_bin("sci-agent", "sci-agent");
    let mut cmd = Command::new(agent);
    cmd.args(["sample", "--duration", "2s", "--json"])
        .args(extra);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Short-lived processes inside the window.
    std::thread::sleep(Duration::from_millis(700));
    let mut burners = Vec::new();
    for _ in 0..5 {
        burners.push(Command::new(BURN).arg("30").spawn().unwrap());
    }
    for mut b in burners {
        b.wait().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sample failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn sample_json_has_the_documented_fields_and_short_lived_processes() {
    if skip_privileged("sample_json_has_the_documented_fields_and_short_lived_processes") {
        return;
    }
    let (doc, _) = sample_json(&[], None);
    for field in [
        "host",
        "start_unix_ns",
        "end_unix_ns",
        "cpu_source",
        "cpus",
        "idle_cpu_ns",
        "processes",
    ] {
        assert!(doc.get(field).is_some(), "missing {field}");
    }
    assert_eq!(doc["cpu_source"], "ebpf");
    let window_ns = doc["end_unix_ns"].as_u64().unwrap() - doc["start_unix_ns"].as_u64().unwrap();
    assert!(
        (1_900_000_000..2_500_000_000).contains(&window_ns),
        "window {window_ns} ns"
    );
    let burners: Vec<&serde_json::Value> = doc["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["comm"] == "sci-burn")
        .collect();
    assert_eq!(
        burners.len(),
        5,
        "the 5 short-lived processes are in the window"
    );
    for p in burners {
        assert_eq!(p["exited"], true);
        // Each burned 30 ms of CPU (plus exec and start-up).
        let cpu_ns = p["cpu_ns"].as_u64().unwrap();
        assert!(
            (30_000_000..60_000_000).contains(&cpu_ns),
            "cpu_ns {cpu_ns}"
        );
        for field in ["pid", "ppid", "comm", "exe", "cgroup"] {
            assert!(p.get(field).is_some(), "missing {field}");
        }
        assert!(p["exe"].as_str().unwrap().ends_with("sci-burn"));
    }
}

#[test]
fn without_privileges_the_agent_falls_back_to_procfs_and_says_so() {
    if !is_root() {
        println!("skipping without_privileges_the_agent_falls_back_to_procfs_and_says_so: needs root to switch to an unprivileged user");
        return;
    }
    // uid 65534 (nobody) cannot load eBPF; the binary must be reachable by it.
    let (doc, stderr) = sample_json(&[], Some(65534));
    assert_eq!(doc["cpu_source"], "procfs");
    let warnings = stderr.matches("falling back to procfs").count();
    assert_eq!(warnings, 1, "said once, clearly: {stderr}");
    // Polling still measures the long-lived: at least the agent itself... and the
    // short-lived burners (30 ms each, within one 2 s window) are missed by design.
    let seen_burners = doc["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["comm"] == "sci-burn")
        .count();
    println!("procfs polling saw {seen_burners} of 5 short-lived processes");
    assert!(doc["idle_cpu_ns"].as_u64().unwrap() > 0);
}
