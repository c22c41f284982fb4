//! Every HTML page escapes what the data names: a host, a data centre and a
//! service called `<script>…</script>` (stored in a real SQLite store,
//! served over real HTTP) show on the dashboard, the HTML report and the
//! review page as text, never as markup.
#![allow(clippy::unwrap_used)]
mod common;
use std::time::Duration;

use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{RollupLayout, Store};
use sci_proto::v1;
use sci_test_harness::http::http_get;

/// 2026-01-01T00:00:00Z.
const DAY0: u64 = 1_767_225_600;
const NS: u64 = 1_000_000_000;
const HOST: &str = "<script>alert('host')</script>";
const DATACENTER: &str = "<script>alert('dc')</script>";
const SERVICE: &str = "<img src=x onerror=alert(1)><script>alert('svc')</script>";

/// `text` as the template engine writes it (element content and attributes).
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Hour `h` of the two days: 100 credit transactions of the hostile service.
fn window(h: u64) -> v1::WindowReport {
    let busy_cpu_ns = 600 * NS;
    v1::WindowReport {
        host: HOST.into(),
        agent_instance: "a".into(),
        seq: h,
        datacenter: DATACENTER.into(),
        start_unix_ns: (DAY0 + h * 3600) * NS,
        end_unix_ns: (DAY0 + (h + 1) * 3600) * NS,
        cpus: 2,
        busy_cpu_ns,
        idle_cpu_ns: 2 * 3600 * NS - busy_cpu_ns,
        host_energy_j: 100.0,
        host_carbon_g: 10.0,
        carbon_intensity_g_per_kwh: 500.0,
        pue: 1.2,
        intensity_source: "config".into(),
        energy_source: "rapl".into(),
        scenarios: vec![v1::ScenarioRecord {
            scenario: "credit".into(),
            transactions: 100,
            cpu_ns: busy_cpu_ns,
            energy_j: 100.0,
            carbon_g: 10.0,
            ..Default::default()
        }],
        processes: vec![v1::ProcessRecord {
            service: SERVICE.into(),
            scenario: "credit".into(),
            cpu_ns: busy_cpu_ns,
            energy_j: 100.0,
            carbon_g: 10.0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn hostile_names_are_text_on_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let layout = RollupLayout {
        step_s: 60,
        host_step_s: 3600,
    };
    let store = SqliteStore::open_with(&dir.path().join("sci.db"), layout, Duration::from_secs(60))
        .unwrap();
    store
        .commit(&(0..48).map(window).collect::<Vec<_>>())
        .unwrap();
    let (_runtime, addr) = common::serve(store, Default::default());
    let (day1, day2, end) = (DAY0, DAY0 + 86_400, DAY0 + 2 * 86_400);
    let compare =
        format!("baseline_from={day1}&baseline_to={day2}&candidate_from={day2}&candidate_to={end}");
    // (page, the hostile names it shows)
    let pages: [(String, &[&str]); 4] = [
        (
            format!("/dashboard?from={day1}&to={end}"),
            &[HOST, DATACENTER],
        ),
        (
            format!("/report?format=html&from={day1}&to={end}"),
            &[DATACENTER],
        ),
        (
            format!("/dashboard/compare?{compare}"),
            &[DATACENTER, SERVICE],
        ),
        (
            format!("/api/v1/compare?{compare}&format=html"),
            &[DATACENTER, SERVICE],
        ),
    ];
    for (path, names) in pages {
        let (status, page) = http_get(addr.port(), &path).unwrap();
        assert_eq!(status, 200, "{path}: {page}");
        assert!(page.starts_with("<!DOCTYPE html>"), "{path}");
        for name in names {
            assert!(
                page.contains(&escaped(name)),
                "{path} does not show {name:?} as text"
            );
        }
        for name in [HOST, DATACENTER, SERVICE] {
            assert!(!page.contains(name), "{path} carries {name:?} as markup");
        }
        assert!(!page.contains("<img"), "{path}");
        assert!(!page.contains("<script>alert"), "{path}");
    }
}
