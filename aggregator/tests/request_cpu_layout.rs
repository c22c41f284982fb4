//! Per-request CPU histograms across the layout change (issue 24): a store
//! written with log2 bins (schema 4) is converted by migration 5 to the
//! log-linear bins (agent_common::request_cpu) and reads the same
//! percentiles as before, worked out by hand with the old interpolation
//! (its rows had no data centre: they are kept as '(unknown)').
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use sci_aggregator::review::distribution::Distribution;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{Range, RollupLayout, Store};

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// 2026-01-01T00:00:00Z.
const DAY0: u64 = 1_767_225_600;

#[test]
fn a_store_with_log2_bins_reads_the_same_percentiles_after_migration_5() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sci.db");
    drop(SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap());
    // Back to schema 4 with log2 rows: 60 requests in [2^22, 2^23), 30 in
    // [2^23, 2^24), 10 in [2^25, 2^26) for svc; 8 in [4, 8) for tiny.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(&format!(
            "DELETE FROM schema_migrations WHERE version = 5;
             DROP TABLE request_cpu_rollup;
             DROP TABLE request_cpu_total_rollup;
             CREATE TABLE request_cpu_rollup (
                 bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
                 bin BIGINT NOT NULL, requests DOUBLE PRECISION NOT NULL,
                 PRIMARY KEY (bucket_s, service, scenario, bin)) WITHOUT ROWID;
             CREATE TABLE request_cpu_total_rollup (
                 bucket_s BIGINT NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
                 requests DOUBLE PRECISION NOT NULL, cpu_ns DOUBLE PRECISION NOT NULL,
                 energy_j DOUBLE PRECISION NOT NULL,
                 PRIMARY KEY (bucket_s, service, scenario)) WITHOUT ROWID;
             INSERT INTO request_cpu_rollup VALUES
                 ({b}, 'svc', 'credit', 23, 60.0), ({b}, 'svc', 'credit', 24, 30.0),
                 ({b}, 'svc', 'credit', 26, 10.0), ({b}, 'tiny', 'query', 3, 8.0);
             INSERT INTO request_cpu_total_rollup VALUES
                 ({b}, 'svc', 'credit', 100.0, 1.0e9, 2.0), ({b}, 'tiny', 'query', 8.0, 48.0, 1.0e-6);",
            b = DAY0 + 3600
        ))
        .unwrap();
    }
    let store = SqliteStore::open_with(&db, LAYOUT, Duration::from_secs(30)).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM request_cpu_rollup", [], |r| r.get(0))
        .unwrap();
    // 16 fine bins per log2 bin from 2^4 on; [4, 8) is 4 one-ns bins.
    assert_eq!(rows, 3 * 16 + 4);
    let bins: Vec<(i64, f64)> = conn
        .prepare("SELECT bin, requests FROM request_cpu_rollup WHERE service = 'tiny' ORDER BY bin")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(bins, vec![(4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0)]);
    let (first, last): (i64, i64) = conn
        .query_row(
            "SELECT min(bin), max(bin) FROM request_cpu_rollup WHERE service = 'svc'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // log2 bin 23 = [2^22, 2^23) starts at fine bin (23 - 4) x 16 = 304;
    // bin 26 ends at (26 - 4) x 16 + 15 = 367.
    assert_eq!((first, last), (304, 367));

    let range = Range::new(DAY0, DAY0 + 86_400, 3600, &LAYOUT).unwrap();
    let found = store.request_cpu(&range, None).unwrap();
    // Their data centre was never recorded: a review of one leaves them out.
    assert!(store.request_cpu(&range, Some("dc1")).unwrap().is_empty());
    let unknown: i64 = conn
        .query_row(
            "SELECT count(*) FROM request_cpu_total_rollup WHERE datacenter = '(unknown)'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unknown, 2);
    let svc = Distribution::of(found.iter().find(|r| r.service == "svc").unwrap());
    let two = |e: i32| 2f64.powi(e);
    // By hand, linear inside the log2 bins: p50 rank 50 is 50/60 into
    // [2^22, 2^23); p90 rank 90 ends [2^23, 2^24); p99 rank 99 is 9/10 into
    // [2^25, 2^26).
    for (got, want) in [
        (svc.p50_cpu_ns.unwrap(), two(22) * (1.0 + 50.0 / 60.0)),
        (svc.p90_cpu_ns.unwrap(), two(24)),
        (svc.p99_cpu_ns.unwrap(), two(25) * 1.9),
    ] {
        assert!((got / want - 1.0).abs() < 1e-12, "{got} for {want}");
    }
    assert_eq!(svc.mean_cpu_ns, Some(1e7));
    let tiny = Distribution::of(found.iter().find(|r| r.service == "tiny").unwrap());
    // Rank 4 of 8 in [4, 8): 6 ns.
    assert_eq!(tiny.p50_cpu_ns, Some(6.0));
}
