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
