//! The SQLite store read back with plain SQL (#24): retention removes raw
//! windows and dedupe keys (and nothing newer), and a window straddling an
//! hour and a day boundary is split into the hourly and daily host rollups
//! in proportion to its time there, against a hand computation.
#![allow(clippy::unwrap_used)]
use std::path::Path;
use std::time::Duration;

use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{Retention, RollupLayout, Store};
use sci_proto::v1;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// 2026-01-01T00:00:00Z.
const DAY0: u64 = 1_767_225_600;
const NS: u64 = 1_000_000_000;

fn window(seq: u64, start_s: u64, end_s: u64, energy_j: f64) -> v1::WindowReport {
    v1::WindowReport {
        host: "h1".into(),
        agent_instance: "a".into(),
        seq,
        datacenter: "dc1".into(),
        start_unix_ns: start_s * NS,
        end_unix_ns: end_s * NS,
        cpus: 2,
        host_energy_j: energy_j,
        host_carbon_g: energy_j / 1000.0,
        busy_cpu_ns: 4 * (end_s - start_s) * 100_000_000,
        carbon_intensity_g_per_kwh: 400.0,
        pue: 1.2,
        intensity_source: "config".into(),
        energy_source: "rapl".into(),
        ..Default::default()
    }
}

fn count(db: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn retention_removes_raw_windows_and_keys_older_than_the_cutoff_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
    // Three windows on day 0, two on day 10.
    let mut windows: Vec<_> = (0..3)
        .map(|i| window(i, DAY0 + 600 * i, DAY0 + 600 * (i + 1), 10.0))
        .collect();
    windows.extend((3..5).map(|i| {
        window(
            i,
            DAY0 + 10 * 86_400 + 600 * i,
            DAY0 + 10 * 86_400 + 600 * (i + 1),
            10.0,
        )
    }));
    store.commit(&windows).unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM windows_raw"), 5);
    assert_eq!(count(&db, "SELECT count(*) FROM window_keys"), 5);
    let retention = Retention {
        raw: Duration::from_secs(7 * 86_400),
        keys: Duration::from_secs(8 * 86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    // On day 12: raw cutoff day 5, keys cutoff day 4; the day-0 windows go.
    let expired = store.expire(DAY0 + 12 * 86_400, &retention).unwrap();
    assert_eq!(expired.raw_windows, 3);
    assert_eq!(expired.keys, 3);
    assert_eq!(expired.rollup_rows, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM windows_raw"), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM window_keys"), 2);
    let oldest_ns = count(&db, "SELECT min(end_ns) FROM windows_raw") as u64;
    assert_eq!(oldest_ns, (DAY0 + 10 * 86_400 + 600 * 4) * NS);
    // The rollups of day 0 stay (400 days): energy of the three windows.
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT CAST(round(sum(energy_j)) AS INTEGER) FROM host_rollup WHERE bucket_s < {}",
                DAY0 + 86_400
            )
        ),
        30
    );
    // Again at the same instant: nothing more to remove.
    let again = store.expire(DAY0 + 12 * 86_400, &retention).unwrap();
    assert_eq!((again.raw_windows, again.keys), (0, 0));
}

#[test]
fn a_window_straddling_an_hour_and_a_day_is_split_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
    // 23:45 on day 0 to 00:45 on day 1: 900 s before midnight, 2700 s after.
    let start = DAY0 + 86_400 - 900;
    store
        .commit(&[window(0, start, start + 3600, 100.0)])
        .unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows = |table: &str| -> Vec<(i64, f64, f64, f64)> {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT bucket_s, host_s, energy_j, busy_cpu_ns FROM {table} ORDER BY bucket_s"
            ))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // By hand: 900/3600 = 1/4 of the energy (25 J) and CPU (0.4 s/s x 900 s
    // = 360e9 ns) in 23:00, 3/4 (75 J, 1080e9 ns) in 00:00; the same split
    // between day 0 and day 1.
    let hour23 = (DAY0 + 23 * 3600) as i64;
    let hour0 = (DAY0 + 86_400) as i64;
    let want = [(hour23, 900.0, 25.0, 360e9), (hour0, 2700.0, 75.0, 1080e9)];
    let want_daily = [
        (DAY0 as i64, 900.0, 25.0, 360e9),
        ((DAY0 + 86_400) as i64, 2700.0, 75.0, 1080e9),
    ];
    for (table, want) in [("host_rollup", want), ("host_rollup_d", want_daily)] {
        let got = rows(table);
        assert_eq!(got.len(), 2, "{table}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{table} bucket");
            for (a, b) in [(g.1, w.1), (g.2, w.2), (g.3, w.3)] {
                assert!((a - b).abs() <= 1e-9 * b, "{table}: {g:?} vs {w:?}");
            }
        }
    }
}

/// The supply rollups' daily copy (#27): a window 23:45-00:45 on a supply
/// splits 1/4 : 3/4 into the hour and day rows alike (hand computation),
/// and a query of whole days reads the daily rows: with the host-step rows
/// of the inner days removed, it still answers the same figures.
#[test]
fn supply_rollups_have_a_daily_copy_split_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
    let on_supply = |seq: u64, start: u64, energy_j: f64| {
        let mut w = window(seq, start, start + 3600, energy_j);
        w.supply = Some(v1::ResourceSupply {
            cpu_model: "EPYC".into(),
            cpu_vendor: "AuthenticAMD".into(),
            arch: "x86_64".into(),
            logical_cpus: 2,
            memory_bytes: 8 << 30,
            machine_kind: "metal".into(),
            physical_host_cpus: 0,
            labels: [("pool".to_string(), "batch".to_string())].into(),
        });
        w.scenarios = vec![v1::ScenarioRecord {
            scenario: "credit".into(),
            transactions: 40,
            ..Default::default()
        }];
        w
    };
    // 23:45 on day 0 to 00:45 on day 1; then one hour a day on days 1..=4 at noon.
    let start = DAY0 + 86_400 - 900;
    let mut windows = vec![on_supply(0, start, 100.0)];
    windows.extend((1..=4).map(|d| on_supply(d, DAY0 + d * 86_400 + 12 * 3600, 10.0)));
    store.commit(&windows).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows = |sql: &str| -> Vec<(i64, f64, f64, f64, f64)> {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    let cols = "bucket_s, host_s, energy_j, capacity_cpu_ns, transactions";
    // By hand: 900 s of 3600 before midnight: 1/4 of 100 J, of 40
    // transactions, of 2 CPUs x 3600 s of capacity; 3/4 after.
    let first = |table: &str, want: [(i64, f64, f64, f64, f64); 2]| {
        let got = rows(&format!(
            "SELECT {cols} FROM {table} WHERE bucket_s < {} ORDER BY bucket_s",
            DAY0 + 86_400 + 3600
        ));
        assert_eq!(got.len(), 2, "{table}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{table} bucket");
            for (a, b) in [(g.1, w.1), (g.2, w.2), (g.3, w.3), (g.4, w.4)] {
                assert!((a - b).abs() <= 1e-9 * b, "{table}: {g:?} vs {w:?}");
            }
        }
    };
    let cap = |s: f64| 2.0 * s * 1e9;
    first(
        "supply_rollup",
        [
            ((DAY0 + 23 * 3600) as i64, 900.0, 25.0, cap(900.0), 10.0),
            ((DAY0 + 86_400) as i64, 2700.0, 75.0, cap(2700.0), 30.0),
        ],
    );
    // Day 1 also holds the noon window (3600 s, 10 J, 40 transactions).
    first(
        "supply_rollup_d",
        [
            (DAY0 as i64, 900.0, 25.0, cap(900.0), 10.0),
            (
                (DAY0 + 86_400) as i64,
                2700.0 + 3600.0,
                75.0 + 10.0,
                cap(2700.0 + 3600.0),
                30.0 + 40.0,
            ),
        ],
    );
    // The service copy: one row per day (all of "credit" is "(none)"'s).
    let service_days = rows(
        "SELECT bucket_s, transactions, cpu_ns, energy_j, carbon_g FROM supply_service_rollup_d ORDER BY bucket_s",
    );
    assert_eq!(service_days.len(), 5, "{service_days:?}");
    assert!((service_days[0].1 - 10.0).abs() < 1e-9 && (service_days[1].1 - 70.0).abs() < 1e-9);

    // Days 0..5 in daily periods, then with the inner days' hour rows gone.
    let range =
        sci_aggregator::store::Range::new(DAY0, DAY0 + 5 * 86_400, 86_400, &LAYOUT).unwrap();
    let energy = |store: &SqliteStore| -> Vec<(u64, f64, f64)> {
        store
            .supply_periods(&range)
            .unwrap()
            .iter()
            .map(|r| (r.period_start_s, r.energy_j, r.transactions))
            .collect()
    };
    let before = energy(&store);
    let want: Vec<(u64, f64, f64)> = vec![
        (DAY0, 25.0, 10.0),
        (DAY0 + 86_400, 75.0 + 10.0, 30.0 + 40.0),
        (DAY0 + 2 * 86_400, 10.0, 40.0),
        (DAY0 + 3 * 86_400, 10.0, 40.0),
        (DAY0 + 4 * 86_400, 10.0, 40.0),
    ];
    assert_eq!(before.len(), want.len(), "{before:?}");
    for (g, w) in before.iter().zip(&want) {
        assert!(
            g.0 == w.0 && (g.1 - w.1).abs() < 1e-9 && (g.2 - w.2).abs() < 1e-9,
            "{g:?} vs {w:?}"
        );
    }
    let removed = conn
        .execute(
            "DELETE FROM supply_rollup WHERE bucket_s >= ?1",
            [DAY0 as i64],
        )
        .unwrap();
    assert_eq!(removed, 6);
    assert_eq!(
        energy(&store),
        before,
        "a whole-day query reads the daily rows"
    );
    let groups = store.supply_groups(&range, "label.pool").unwrap();
    assert_eq!(groups.len(), 1);
    assert!((groups[0].energy_j - 140.0).abs() < 1e-9, "{groups:?}");
    // A range that is not whole days reads the hour rows (now gone).
    let part =
        sci_aggregator::store::Range::new(DAY0 + 3600, DAY0 + 2 * 86_400, 3600, &LAYOUT).unwrap();
    assert!(store.supply_periods(&part).unwrap().is_empty());
}

/// Migration 28 on a store that already holds service rollups (issue 24):
/// the per-minute service table starts after their last host step, and a
/// service review with shorter periods from before that is refused; the
/// hourly service figures keep answering. Simulated by undoing migration 28
/// on a store with data (dropping its table and meta key) and reopening.
#[test]
fn the_per_minute_service_rollups_start_after_the_hours_stored_before_them() {
    use sci_aggregator::store::Range;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    let with_service = |seq: u64, start_s: u64, end_s: u64| {
        let mut w = window(seq, start_s, end_s, 10.0);
        w.processes.push(v1::ProcessRecord {
            service: "svc".into(),
            scenario: "credit".into(),
            cpu_ns: 1_000_000,
            energy_j: 5.0,
            carbon_g: 0.005,
            ..Default::default()
        });
        w
    };
    {
        let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
        // 10:20-10:40: the last service hour is 10:00.
        store
            .commit(&[with_service(
                0,
                DAY0 + 10 * 3600 + 1200,
                DAY0 + 10 * 3600 + 2400,
            )])
            .unwrap();
        assert_eq!(count(&db, "SELECT count(*) FROM service_rollup_m"), 20);
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP TABLE service_rollup_m; DELETE FROM schema_migrations WHERE version = 28;",
        )
        .unwrap();
    }
    let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
    let from_s = DAY0 + 11 * 3600;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let kept_from: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'service_rollup_m_from_s'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept_from, from_s.to_string());
    assert_eq!(count(&db, "SELECT count(*) FROM service_rollup_m"), 0);
    let before = Range::new(DAY0 + 10 * 3600, DAY0 + 11 * 3600, 600, &LAYOUT).unwrap();
    let reason = store.service_periods(&before).unwrap_err().to_string();
    assert!(reason.contains(&format!("before {from_s}")), "{reason}");
    let hourly = Range::new(DAY0 + 10 * 3600, DAY0 + 11 * 3600, 3600, &LAYOUT).unwrap();
    let rows = store.service_periods(&hourly).unwrap();
    assert_eq!(rows.len(), 1);
    assert!((rows[0].row.energy_j - 5.0).abs() < 1e-9);
    // Windows after it land in the new table: 11:00-11:10 in 10-minute periods.
    store
        .commit(&[with_service(1, from_s, from_s + 600)])
        .unwrap();
    let after = Range::new(from_s, from_s + 600, 600, &LAYOUT).unwrap();
    let rows = store.service_periods(&after).unwrap();
    assert_eq!(rows.len(), 1);
    assert!((rows[0].row.energy_j - 5.0).abs() < 1e-9);
}
