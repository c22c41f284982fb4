//! Per-scenario series on the agent's /metrics: sums over windows, weights disclosed.
#![allow(clippy::unwrap_used)]

use sci_agent::sinks::metrics::MetricsRegistry;
use sci_agent::window::{CpuSource, ScenarioRecord, WindowReport};

fn window(seq: u64, credit_txn: u64, credit_energy_j: f64) -> WindowReport {
    let mut w = WindowReport::new(
        "h".into(),
        "i".into(),
        seq * 1_000,
        seq * 1_000 + 1_000,
        CpuSource::Ebpf,
        2,
    );
    w.seq = seq;
    w.scenarios = vec![
        ScenarioRecord {
            scenario: "credit".into(),
            weight: 24.0,
            transactions: credit_txn,
            cpu_ns: 2_000_000_000,
            energy_j: credit_energy_j,
            carbon_g: 0.5,
            embodied_g: 0.25,
        },
        ScenarioRecord {
            scenario: "query".into(),
            weight: 1.0,
            transactions: 10,
            cpu_ns: 500_000_000,
            energy_j: 1.0,
            carbon_g: 0.125,
            embodied_g: 0.0625,
        },
    ];
    w.business_units = 24.0 * credit_txn as f64 + 10.0;
    w
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
}

#[test]
fn scenario_series_add_up_over_windows() {
    let registry = MetricsRegistry::new();
    registry.observe(&window(1, 3, 4.0));
    registry.observe(&window(2, 5, 6.5));
    let text = registry.render();
    assert_eq!(
        value(
            &text,
            "sci_scenario_transactions_total{scenario=\"credit\"}"
        ),
        8.0
    );
    assert_eq!(
        value(
            &text,
            "sci_scenario_energy_joules_total{scenario=\"credit\"}"
        ),
        10.5
    );
    assert_eq!(
        value(&text, "sci_scenario_cpu_seconds_total{scenario=\"query\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "sci_scenario_carbon_grams_total{scenario=\"query\"}"),
        0.25
    );
    assert_eq!(
        value(
            &text,
            "sci_scenario_embodied_grams_total{scenario=\"credit\"}"
        ),
        0.5
    );
    assert_eq!(
        value(&text, "sci_scenario_weight{scenario=\"credit\"}"),
        24.0
    );
    // R = 24 x 8 + 1 x 20
    assert_eq!(value(&text, "sci_business_units_total"), 212.0);
}
