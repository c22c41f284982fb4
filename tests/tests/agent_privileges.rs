//! The capability set deploy/ grants (CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
//! as an unprivileged user) is what this test runs the agent with, under
//! `setpriv`: eBPF loads and the window is measured by it. With no
//! capability the agent falls back to procfs and says the problem is
//! permission, naming the capabilities it lacks.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use sci_tests::{cargo_bin, skip_privileged};

/// `sci-agent`, to be given its arguments, run under `setpriv` as user nobody
/// with exactly `caps` (setpriv names, e.g. "+bpf,+perfmon").
fn agent_as_nobody(caps: &str) -> Command {
    let set = format!("-all{caps}");
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps={set}"),
            &format!("--ambient-caps={set}"),
            &format!("--bounding-set={set}"),
            "--",
        ])
        .arg(cargo_bin("sci-agent", "sci-agent"));
    command
}

/// `sci-agent sample` for 1 s as user nobody with exactly `caps` (setpriv
/// names, e.g. "+bpf,+perfmon"); (JSON document, stderr).
fn sample_as_nobody(caps: &str) -> (serde_json::Value, String) {
    let out = agent_as_nobody(caps)
        .args(["sample", "--duration", "1s", "--json"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sci-agent sample failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn the_deployed_capabilities_suffice_for_ebpf() {
    if skip_privileged("the_deployed_capabilities_suffice_for_ebpf") {
        return;
    }
    // Exactly AmbientCapabilities= of deploy/systemd/sci-agent.service.
    let unit = std::fs::read_to_string(
        sci_tests::workspace_root().join("deploy/systemd/sci-agent.service"),
    )
    .unwrap();
    let granted: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .unwrap()
        .split_whitespace()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(granted, [",+bpf", ",+perfmon", ",+sys_ptrace"]);
    let (doc, stderr) = sample_as_nobody(&granted.concat());
    assert_eq!(doc["cpu_source"], "ebpf", "{stderr}");
    assert!(!stderr.contains("permission"), "{stderr}");
}

#[test]
fn without_capabilities_the_agent_says_permission() {
    if skip_privileged("without_capabilities_the_agent_says_permission") {
        return;
    }
    let (doc, stderr) = sample_as_nobody("");
    assert_eq!(doc["cpu_source"], "procfs", "{stderr}");
    assert!(
        stderr.contains("permission: this process lacks CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
}

#[test]
fn markers_need_cap_sys_admin_and_say_so() {
    if skip_privileged("markers_need_cap_sys_admin_and_say_so") {
        return;
    }
    let run = |caps: &str| {
        agent_as_nobody(caps)
            .args(["sample", "--duration", "1s", "--json", "--markers"])
            .arg(env!("CARGO_BIN_EXE_sci-shared-service"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    // What deploy/ grants: the uprobes are refused, and the error says why.
    let out = run(",+bpf,+perfmon,+sys_ptrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("permission: attaching the marker uprobes needs CAP_SYS_ADMIN"),
        "{stderr}"
    );
    // With CAP_SYS_ADMIN as well they attach (README says which feature needs it).
    let out = run(",+bpf,+perfmon,+sys_ptrace,+sys_admin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
