//! `sci-aggregator migrate-store` moves a SQLite store into a new
//! PostgreSQL database (a real scratch PostgreSQL 15): afterwards a
//! sci-aggregator on each store answers /api/v1/sci, /api/v1/services and
//! /api/v1/hotspots alike, the copied dedupe keys still recognise a
//! replayed window, and a second copy into the same database is refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sci_aggregator::store::postgres::PostgresStore;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{CommitOutcome, RollupLayout, Store};
use sci_proto::v1;
use sci_tests::fleet::{http_get, window, Aggregator};
use sci_tests::postgres::ScratchPostgres;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// An hour boundary well in the past.
const T: u64 = 1_764_000_000 / 3600 * 3600;

/// Two hosts in two data centres, 30 s windows over six minutes, each
/// with one process per scenario (services) so every rollup has rows.
fn windows() -> Vec<v1::WindowReport> {
    let mut out = Vec::new();
    for (h, (host, dc)) in [("host-a", "dc-east"), ("host-b", "dc-west")]
        .into_iter()
        .enumerate()
    {
        for seq in 0..12u64 {
            let energy_j = 300.0 + 40.0 * seq as f64 + 100.0 * h as f64;
            let txns = [seq % 3, 1 + h as u64, seq % 2, 4 + seq];
            let mut w = window(
                host,
                &format!("{host}-inst"),
                seq,
                T + 30 * seq,
                30,
                energy_j,
                0.1,
                txns,
            );
            w.datacenter = dc.into();
            w.processes = w
                .scenarios
                .iter()
                .enumerate()
                .map(|(i, s)| v1::ProcessRecord {
                    pid: 100 + i as u32,
                    comm: format!("{}-svc", s.scenario),
                    cpu_ns: s.cpu_ns + 1_000_000,
                    scenario: s.scenario.clone(),
                    service: format!("{}-svc", s.scenario),
                    energy_j: s.energy_j,
                    carbon_g: s.carbon_g,
                    embodied_g: s.embodied_g,
                    ..Default::default()
                })
                .collect();
            out.push(w);
        }
    }
    out
}

/// Equal JSON, numbers to 1e-12 relative (PostgreSQL and SQLite may add a
/// column's rows in another order).
fn same(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value as J;
    match (a, b) {
        (J::Number(x), J::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1e-12),
                "{at}: {x} vs {y}"
            );
        }
        (J::Array(x), J::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                same(x, y, &format!("{at}[{i}]"));
            }
        }
        (J::Object(x), J::Object(y)) => {
            let (kx, ky): (Vec<_>, Vec<_>) = (x.keys().collect(), y.keys().collect());
            assert_eq!(kx, ky, "{at}: keys");
            for (k, v) in x {
                same(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

fn json(agg: &Aggregator, path: &str) -> serde_json::Value {
    let (status, body) = http_get(agg.http_port, path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn migrate_store_copies_sqlite_into_postgres_and_both_answer_alike() {
    let Some(pg) = ScratchPostgres::start_or_skip(
        "migrate_store_copies_sqlite_into_postgres_and_both_answer_alike",
    ) else {
        return;
    };
    let url = pg.create_database("sci_migrated").unwrap();
    let sqlite_dir = tempfile::tempdir().unwrap();
    let db = sqlite_dir.path().join("sci.db");
    let windows = windows();
    {
        let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
        let outcomes = store.commit(&windows).unwrap();
        assert!(
            outcomes.iter().all(|o| *o == CommitOutcome::Stored),
            "{outcomes:?}"
        );
    }
    // A store upgraded from before the per-minute service table holds it
    // only from a marker on: the marker must travel with the data.
    let fine_from_s = T + 120;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('service_rollup_m_from_s', ?1)",
            [fine_from_s.to_string()],
        )
        .unwrap();

    let migrate = || {
        std::process::Command::new(sci_tests::cargo_bin("sci-aggregator", "sci-aggregator"))
            .args(["migrate-store", "--from"])
            .arg(format!("sqlite:{}", db.display()))
            .args(["--to", &url])
            .output()
            .unwrap()
    };
    let out = migrate();
    assert!(
        out.status.success(),
        "migrate-store: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rows"]["windows_raw"], 24, "{report}");
    assert_eq!(report["rows"]["window_keys"], 24, "{report}");
    assert_eq!(report["rows"]["hosts"], 2, "{report}");
    assert!(
        report["rows"]["service_rollup"].as_u64().unwrap() > 0,
        "{report}"
    );

    let marker = pg
        .psql_in(
            "sci_migrated",
            "SELECT value FROM meta WHERE key = 'service_rollup_m_from_s'",
        )
        .unwrap();
    assert_eq!(
        marker.trim(),
        fine_from_s.to_string(),
        "the data marker in PostgreSQL"
    );

    // The copied dedupe keys: a window replayed to the PostgreSQL store is
    // recognised, not counted again (checked before an aggregator's
    // retention pass can expire keys this old).
    {
        let store = PostgresStore::open(&url, LAYOUT, 2, Duration::from_secs(30)).unwrap();
        let outcomes = store.commit(&windows[..1]).unwrap();
        assert_eq!(outcomes, vec![CommitOutcome::Duplicate]);
    }

    // A second copy would add every rollup twice: refused, naming why.
    let again = migrate();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds rows"), "{err}");

    // Both stores served by a real sci-aggregator answer alike.
    let on_sqlite = Aggregator::start(sqlite_dir.path(), 60, "", true);
    let pg_dir = tempfile::tempdir().unwrap();
    let on_postgres = Aggregator::start(
        pg_dir.path(),
        60,
        &format!("postgres_url = \"{url}\"\n"),
        true,
    );
    let (from, to) = (T, T + 360);
    for path in [
        format!("/api/v1/sci?from={from}&to={to}&period=60"),
        format!("/api/v1/sci?from={from}&to={to}&period=120&datacenter=dc-west"),
        format!("/api/v1/services?from={from}&to={to}"),
        format!("/api/v1/hotspots?from={from}&to={to}&period=60"),
    ] {
        let (a, b) = (json(&on_sqlite, &path), json(&on_postgres, &path));
        same(&a, &b, &path);
        if path.starts_with("/api/v1/sci?") {
            assert!(a["sci_cf_mean"].as_f64().unwrap() > 0.0, "{path}: {a}");
            assert!(!a["periods"].as_array().unwrap().is_empty(), "{path}");
        }
    }
}
