//! `sci-aggregator report --db` on a store whose rollup layout is not the
//! default (issue 24 item 5): the layout is read from the store, so a
//! 10-second-period report of a 10 s store works, against a hand count.
#![allow(clippy::unwrap_used)]
use std::process::Command;
use std::time::Duration;

use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{RollupLayout, Store};
use sci_proto::v1;

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600;
const NS: u64 = 1_000_000_000;

fn window(seq: u64, start_s: u64) -> v1::WindowReport {
    let mut w = v1::WindowReport {
        host: "h1".into(),
        agent_instance: "a".into(),
        seq,
        datacenter: "dc1".into(),
        start_unix_ns: start_s * NS,
        end_unix_ns: (start_s + 10) * NS,
        cpus: 2,
        host_energy_j: 100.0,
        host_carbon_g: 0.01,
        busy_cpu_ns: 4_000_000_000,
        carbon_intensity_g_per_kwh: 360.0,
        pue: 1.0,
        intensity_source: "config".into(),
        energy_source: "rapl".into(),
        ..Default::default()
    };
    w.scenarios.push(v1::ScenarioRecord {
        scenario: "query".into(),
        transactions: 50,
        energy_j: 100.0,
        carbon_g: 0.01,
        ..Default::default()
    });
    w
}

#[test]
fn report_with_db_reads_the_stores_own_rollup_layout() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    let layout = RollupLayout {
        step_s: 10,
        host_step_s: 10,
    };
    let store = SqliteStore::open_with(&db, layout, Duration::from_secs(30)).unwrap();
    store
        .commit(&(0..6).map(|i| window(i, T0 + 10 * i)).collect::<Vec<_>>())
        .unwrap();
    drop(store);
    let out = Command::new(env!("CARGO_BIN_EXE_sci-aggregator"))
        .args(["report", "--db"])
        .arg(&db)
        .args(["--period", "10s", "--format", "json"])
        .args(["--from", &T0.to_string(), "--to", &(T0 + 60).to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Six 10 s periods, one window and 50 query transactions each.
    let periods = r["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 6, "{r}");
    for p in periods {
        assert_eq!(p["windows"], 1, "{p}");
    }
    // A period that is not a multiple of the store's 10 s step is refused
    // with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_sci-aggregator"))
        .args(["report", "--db"])
        .arg(&db)
        .args(["--period", "15s", "--format", "json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10"), "{err}");
}
