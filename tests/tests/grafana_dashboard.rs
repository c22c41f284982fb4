//! The Grafana dashboard only queries series a real agent exports: every
//! metric name (and the labels it groups by) is checked against the /metrics
//! of a running `sci-agent run` (eBPF as root, procfs otherwise).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sci_tests::{cargo_bin, workspace_root};

fn scrape(addr: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn dashboard_queries_only_series_the_agent_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/grafana/sci-cf-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    // The variables' queries, label_values(metric{...}, label), are checked as the panels'.
    let mut variable_labels = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"].as_str().unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {query:?} is not label_values(..)"));
        let (metric, label) = inner.rsplit_once(',').unwrap();
        let metric = metric.split('{').next().unwrap().trim().to_string();
        variable_labels.push((
            variable["name"].as_str().unwrap().to_string(),
            metric.clone(),
            label.trim().to_string(),
        ));
        exprs.push(metric);
    }
    let names_of_variables: BTreeSet<&str> = variable_labels
        .iter()
        .map(|(name, _, _)| name.as_str())
        .collect();
    assert!(
        names_of_variables.contains("service") && names_of_variables.contains("instance"),
        "{names_of_variables:?}"
    );
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    let names: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("sci_"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(names.len() >= 10, "{names:?}");

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ninterval = \"1s\"\nmetrics_listen = \"{addr}\"\nspool_dir = \"{}\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut agent = Command::new(cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(body) = scrape(&addr) {
            if body.contains("sci_windows_total 3") {
                text = body;
                break;
            }
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        !text.is_empty(),
        "the agent served no /metrics with 3 windows"
    );
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for name in &names {
        assert!(
            exported.contains(name.as_str()),
            "dashboard queries {name}, which the agent does not export"
        );
    }
    // Labels the dashboard groups by exist on those series.
    for (series, label) in [
        ("sci_scenario_transactions_total{", "scenario="),
        ("sci_host_cpu_seconds_total{", "mode="),
        ("sci_process_energy_joules_total{", "comm="),
        ("sci_service_energy_joules_total{", "scenario="),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(series) && l.contains(label)),
            "{series} has no {label} label"
        );
    }
    // Each variable's label is on its metric's series (instance is added by
    // Prometheus at scrape time, not by the agent).
    for (name, metric, label) in &variable_labels {
        if label == "instance" {
            continue;
        }
        assert!(
            text.lines().any(
                |l| l.starts_with(&format!("{metric}{{")) && l.contains(&format!("{label}=\""))
            ),
            "variable {name}: {metric} has no {label} label in the agent's /metrics"
        );
    }
    // Panels filtered by $service use it on a series that has the label.
    let by_service: Vec<&String> = exprs.iter().filter(|e| e.contains("$service")).collect();
    assert!(by_service.len() >= 2, "{exprs:?}");
    for e in by_service {
        assert!(
            e.contains("sci_service_"),
            "{e} filters by service on a series without it"
        );
    }
}
