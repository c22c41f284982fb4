//! The deployment files are checked by the tools that would reject them:
//! systemd-analyze for the units, kubernetes-validate (the Kubernetes 1.37
//! JSON schemas, strict) for the manifests, hadolint for the Dockerfiles,
//! promtool for the scrape configuration. What those tools cannot see is
//! checked against the files it must agree with: the Prometheus Operator
//! objects (no schema here) select the labels and ports the manifests
//! have, the PrometheusRule is the promtool-tested rules file, and the
//! images build the binaries and expose the ports the manifests use.
//! No container daemon runs here (nor can base images be fetched), so the
//! images are linted and checked, not built.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
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
    let mut files = yaml_files(&dir);
    files.extend(yaml_files(&dir.join("postgres")));
    assert!(files.len() >= 4, "manifests missing in {}", dir.display());
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
        "statefulset/sci-postgres",
        "deployment/sci-aggregator-export",
        "poddisruptionbudget/sci-aggregator",
    ] {
        assert!(
            all.contains(&format!("passed for resource {kind}")),
            "{kind}: {all}"
        );
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of a YAML file, read by PyYAML (kubernetes-validate's own
/// dependency, in the same venv) and handed over as JSON.
fn yaml_documents(python: &Path, path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Container port names of the pod template's first container.
fn port_names(workload: &serde_json::Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn monitoring_objects_select_what_the_manifests_deploy() {
    let Some(python) = provisioned_tool(
        &sci_home().join("venv/bin/python"),
        "monitoring_objects_select_what_the_manifests_deploy",
    ) else {
        return;
    };
    let deploy = workspace_root().join("deploy");
    let monitoring = yaml_documents(
        &python,
        &deploy.join("kubernetes/monitoring/sci-servicemonitor.yaml"),
    );
    let agents = yaml_documents(&python, &deploy.join("kubernetes/sci-agent-daemonset.yaml"));
    let daemonset = find(&agents, "DaemonSet", "sci-agent");

    // The ServiceMonitor: the aggregator Service of either variant, its
    // port by name, a bearer token from a secret (the API refuses without).
    let monitor = find(&monitoring, "ServiceMonitor", "sci-aggregator");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["authorization"]["type"], "Bearer");
    assert!(endpoint["authorization"]["credentials"]["name"].is_string());
    for variant in [
        "kubernetes/sci-aggregator-deployment.yaml",
        "kubernetes/postgres/sci-aggregator-postgres.yaml",
    ] {
        let docs = yaml_documents(&python, &deploy.join(variant));
        let service = find(&docs, "Service", "sci-aggregator");
        for (k, v) in monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(
                &service["metadata"]["labels"][k], v,
                "{variant}: Service label {k}"
            );
        }
        let ports: Vec<&str> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(
            ports.contains(&endpoint["port"].as_str().unwrap()),
            "{variant}: {ports:?}"
        );
        let deployment = find(&docs, "Deployment", "sci-aggregator");
        // Annotation-based scraping cannot carry the token.
        assert!(
            deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"]
                .is_null(),
            "{variant}"
        );
    }

    // The PodMonitor: the agents' pod labels and metrics port.
    let pods = find(&monitoring, "PodMonitor", "sci-agent");
    for (k, v) in pods["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&daemonset["spec"]["template"]["metadata"]["labels"][k], v);
    }
    let port = pods["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert!(port_names(daemonset).contains(&port.to_string()));

    // The PrometheusRule holds exactly the promtool-tested rules.
    let rule = yaml_documents(
        &python,
        &deploy.join("kubernetes/monitoring/sci-prometheusrule.yaml"),
    );
    let rules = yaml_documents(&python, &deploy.join("prometheus/sci-cf-rules.yml"));
    assert_eq!(rule[0]["kind"], "PrometheusRule");
    assert_eq!(
        rule[0]["spec"], rules[0],
        "PrometheusRule differs from sci-cf-rules.yml"
    );
}

#[test]
fn prometheus_scrape_config_checks_with_the_bearer_token() {
    let Some(promtool) = provisioned_tool(
        Path::new("/usr/bin/promtool"),
        "prometheus_scrape_config_checks_with_the_bearer_token",
    ) else {
        return;
    };
    let deploy = workspace_root().join("deploy/prometheus");
    let text = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    let token_path = "/etc/prometheus/secrets/sci-aggregator-token";
    assert!(
        text.contains(&format!("credentials_file: {token_path}")),
        "the aggregator job reads no bearer token"
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        text.replace(token_path, token.to_str().unwrap()),
    )
    .unwrap();
    std::fs::copy(
        deploy.join("sci-cf-rules.yml"),
        dir.path().join("sci-cf-rules.yml"),
    )
    .unwrap();
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("SUCCESS: 1 rule files found"), "{all}");
    // Without the token file the configuration is refused: the check reads it.
    std::fs::remove_file(&token).unwrap();
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn dockerfiles_lint_and_build_what_the_manifests_run() {
    let Some(hadolint) = provisioned_tool(
        &sci_home().join("venv/bin/hadolint"),
        "dockerfiles_lint_and_build_what_the_manifests_run",
    ) else {
        return;
    };
    let root = workspace_root();
    let manifests =
        std::fs::read_to_string(root.join("deploy/kubernetes/sci-agent-daemonset.yaml")).unwrap()
            + &std::fs::read_to_string(
                root.join("deploy/kubernetes/sci-aggregator-deployment.yaml"),
            )
            .unwrap();
    // (Dockerfile, package, binary, ports the manifests name, config the manifests mount)
    for (file, package, binary, ports, config) in [
        (
            "agent.Dockerfile",
            "sci-agent",
            "sci-agent",
            vec![9464],
            "/etc/sci-agent/agent.toml",
        ),
        (
            "aggregator.Dockerfile",
            "sci-aggregator",
            "sci-aggregator",
            vec![7443, 8080],
            "/etc/sci-aggregator/aggregator.toml",
        ),
    ] {
        let path = root.join("deploy/docker").join(file);
        let out = Command::new(&hadolint).arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let instructions: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect();
        // Multi-stage: the final image copies the binary from the build stage.
        let stages: Vec<&str> = instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .copied()
            .collect();
        assert_eq!(stages.len(), 2, "{file}: {stages:?}");
        let stage = stages[0].rsplit(" AS ").next().unwrap().trim();
        assert!(
            text.contains(&format!(
                "COPY --from={stage} /out/{binary} /usr/local/bin/{binary}"
            )),
            "{file}: the final stage does not copy {binary} from {stage}"
        );
        assert!(
            text.contains(&format!("-p {package} --bin {binary}")),
            "{file}: does not build {binary}"
        );
        let cargo_toml = std::fs::read_to_string(
            root.join(package.trim_start_matches("sci-"))
                .join("Cargo.toml"),
        )
        .unwrap();
        assert!(
            cargo_toml.contains(&format!("name = \"{package}\"")),
            "{package}"
        );
        // What the image copies from the build context exists.
        for line in instructions
            .iter()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        {
            let source = line.split_whitespace().nth(1).unwrap();
            assert!(
                root.join(source).exists(),
                "{file}: {source} is not in the repository"
            );
        }
        let exposed: Vec<u16> = instructions
            .iter()
            .filter_map(|l| l.strip_prefix("EXPOSE "))
            .flat_map(|l| l.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
            .collect();
        assert_eq!(exposed, ports, "{file}");
        for port in ports {
            assert!(
                manifests.contains(&format!("containerPort: {port}")),
                "{file}: {port}"
            );
        }
        assert!(
            text.contains(&format!("\"--config\", \"{config}\"")),
            "{file}: {config}"
        );
        assert!(
            manifests.contains(&format!("\"--config\", \"{config}\"")),
            "manifests: {config}"
        );
        assert!(
            manifests.contains(&format!("image: sci-cf/{binary}:")),
            "no manifest runs the {binary} image"
        );
    }
}
