//! The rules shipped in deploy/prometheus/ as the real Prometheus tools
//! judge them: `promtool check rules` (syntax, PromQL) and `promtool test
//! rules` with the unit tests beside them, which feed known series to every
//! recording and alerting rule and assert the values recorded and the
//! alerts that fire, each against a hand computation in the test file.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use sci_tests::{provisioned_tool, workspace_root};

fn promtool(args: &[&str], test: &str) -> Option<String> {
    let tool = provisioned_tool(std::path::Path::new("/usr/bin/promtool"), test)?;
    let out = Command::new(tool)
        .args(args)
        .current_dir(workspace_root().join("deploy/prometheus"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn rules_pass_promtool_check() {
    let Some(text) = promtool(
        &["check", "rules", "sci-cf-rules.yml"],
        "rules_pass_promtool_check",
    ) else {
        return;
    };
    // 12 recording rules and 6 alerts.
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
}

#[test]
fn every_rule_passes_its_promtool_unit_tests() {
    let rules =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/sci-cf-rules.yml"))
            .unwrap();
    let tests: String = ["sci-cf-rules.test.yml", "sci-cf-rules-weekly.test.yml"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(workspace_root().join("deploy/prometheus").join(f)).unwrap()
        })
        .collect();
    // Every rule has a case: recorded series by `expr:`, alerts by `alertname:`.
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- record: ") {
            assert!(
                tests.contains(&format!("- expr: {name}\n")),
                "no promtool test for the recording rule {name}"
            );
        }
        if let Some(name) = line.strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("- alertname: {name}\n")),
                "no promtool test for the alert {name}"
            );
        }
    }
    let Some(text) = promtool(
        &[
            "test",
            "rules",
            "sci-cf-rules.test.yml",
            "sci-cf-rules-weekly.test.yml",
        ],
        "every_rule_passes_its_promtool_unit_tests",
    ) else {
        return;
    };
    assert_eq!(text.matches("SUCCESS").count(), 2, "{text}");
}
