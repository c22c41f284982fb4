//! The deployment files are checked by the tools that would reject them:
//! systemd-analyze for the units, kubernetes-validate (the Kubernetes 1.37
//! JSON schemas, strict) for the manifests.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use sci_tests::{provisioned_tool, sci_home, workspace_root};

#[test]
fn systemd_units_verify() {
    let Some(analyze) = provisioned_tool(
        std::path::Path::new("/usr/bin/systemd-analyze"),
        "systemd_units_verify",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // systemd-analyze checks that ExecStart exists: point it at a binary that does.
    let stand_in = std::env::current_exe().unwrap();
    for unit in ["sci-agent.service", "sci-aggregator.service"] {
        let text =
            std::fs::read_to_string(workspace_root().join("deploy/systemd").join(unit)).unwrap();
        let binary = unit.trim_end_matches(".service");
        let text = text.replace(
            &format!("/usr/local/bin/{binary}"),
            stand_in.to_str().unwrap(),
        );
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Warnings about the host's own units are not ours; anything naming our unit is.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(out.status.success() && ours.is_empty(), "{unit}: {stderr}");
    }
}

#[test]
fn agent_unit_grants_only_the_capabilities_it_uses() {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/sci-agent.service")).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .map(|l| {
                l.trim_start_matches(key)
                    .split_whitespace()
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    let expected = vec!["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"];
    assert_eq!(line("AmbientCapabilities="), expected);
    assert_eq!(line("CapabilityBoundingSet="), expected);
    assert!(!text.contains("\nUser=root"));
}

#[test]
fn kubernetes_manifests_validate() {
    let Some(validate) = provisioned_tool(
        &sci_home().join("venv/bin/kubernetes-validate"),
        "kubernetes_manifests_validate",
    ) else {
        return;
    };
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "manifests missing in {}", dir.display());
    let out = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.37"])
        .args(&files)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    for kind in [
        "daemonset/sci-agent",
        "deployment/sci-aggregator",
        "service/sci-aggregator",
    ] {
        assert!(
            all.contains(&format!("passed for resource {kind}")),
            "{kind}: {all}"
        );
    }
}
