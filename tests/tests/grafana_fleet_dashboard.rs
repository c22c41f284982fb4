//! The fleet dashboard (deploy/grafana/sci-cf-fleet-dashboard.json) only
//! queries series that exist: each name in its queries and variables is a
//! series the aggregator's remote-write exports, a series the shipped rules
//! record, or a family of the aggregator's own /metrics; and every query
//! parses as PromQL in a real Prometheus (`promtool`'s engine through a
//! rule file checked by `promtool check rules`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use sci_tests::{provisioned_tool, workspace_root};

/// Words made of [a-zA-Z0-9_:] that start with `sci_` or contain `:sci_`.
fn series_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("sci_") || w.contains(":sci_"))
        .map(String::from)
        .collect()
}

#[test]
fn fleet_dashboard_queries_only_exported_recorded_or_served_series() {
    let path = workspace_root().join("deploy/grafana/sci-cf-fleet-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    // Variable queries are Grafana's (label_values), not PromQL: names only.
    let mut variable_queries = Vec::new();
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            variable_queries.push(v["query"].as_str().unwrap().to_string());
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains(&"datacenter"), "{variables:?}");

    // What exists: exported series, recorded series, the aggregator's /metrics.
    let mut known: BTreeSet<String> = sci_aggregator::export::series::names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rules =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/sci-cf-rules.yml"))
            .unwrap();
    known.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- record: "))
            .map(String::from),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = sci_aggregator::config::AggregatorConfig {
        database: dir.path().join("sci.db"),
        ..Default::default()
    };
    let store: Arc<dyn sci_aggregator::store::Store> = Arc::from(config.open_store().unwrap());
    let state = sci_aggregator::http::HttpState::new(store, Arc::new(config), Default::default());
    let served = sci_aggregator::http::render_metrics(&state);
    known.extend(
        served
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from),
    );
    let used: BTreeSet<String> = exprs
        .iter()
        .chain(&variable_queries)
        .flat_map(|e| series_names(e))
        .collect();
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<&String> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries unknown series: {unknown:?}"
    );

    // Every panel query parses: as alert expressions in a rule file promtool checks.
    let Some(promtool) = provisioned_tool(
        std::path::Path::new("/usr/bin/promtool"),
        "fleet_dashboard_queries_only_exported_recorded_or_served_series",
    ) else {
        return;
    };
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$datacenter", ".*")
            .replace("$__range", "1h")
            .replace('"', "\\\"");
        file.push_str(&format!("      - alert: Q{i}\n        expr: \"{e}\"\n"));
    }
    let rules_path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&rules_path, file).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
