//! Optimisation reviews (#15) on both stores: the same windows (with
//! processes, profile stacks and per-request CPU histograms, straddling host
//! steps) in SQLite and a real PostgreSQL server give the same review, and
//! the store's merged histogram equals the bin-wise sum by hand.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sci_aggregator::config::standard_weights;
use sci_aggregator::review::compare::{CompareOptions, Filters, Scope};
use sci_aggregator::review::consolidation::ConsolidationOptions;
use sci_aggregator::review::stats::Bootstrap;
use sci_aggregator::review::{review, ReviewRequest};
use sci_aggregator::store::postgres::PostgresStore;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{Range, RollupLayout, Store};
use sci_proto::v1;
use sci_tests::postgres::ScratchPostgres;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// An hour boundary in the past.
const T: u64 = 1_764_000_000 / 3600 * 3600;

/// 20-minute windows of `host` over six hours; hour h carries `credit` at
/// `g` gCO2e per transaction; histograms in bins 10 and 11.
fn windows(host: &str, g: f64) -> Vec<v1::WindowReport> {
    (0..18u64)
        .map(|i| {
            let from = T + i * 1200 + 600; // straddles hour boundaries
            let txns = 30 + (i % 5) * 7;
            let carbon = g * txns as f64 * (1.0 + 0.03 * ((i * 7) % 5) as f64);
            v1::WindowReport {
                host: host.into(),
                agent_instance: "i".into(),
                seq: i,
                datacenter: "dc-east".into(),
                start_unix_ns: from * 1_000_000_000,
                end_unix_ns: (from + 1200) * 1_000_000_000,
                cpus: 2,
                busy_cpu_ns: 600 * 1_000_000_000,
                idle_cpu_ns: 1800 * 1_000_000_000,
                host_energy_j: 30_000.0,
                idle_energy_j: 12_000.0,
                host_carbon_g: carbon,
                carbon_intensity_g_per_kwh: 530.6,
                pue: 1.25,
                scenarios: vec![v1::ScenarioRecord {
                    scenario: "credit".into(),
                    transactions: txns,
                    cpu_ns: 600 * 1_000_000_000,
                    energy_j: 18_000.0,
                    carbon_g: carbon,
                    ..Default::default()
                }],
                processes: vec![v1::ProcessRecord {
                    service: "loan-svc".into(),
                    scenario: "credit".into(),
                    cpu_ns: 600 * 1_000_000_000,
                    energy_j: 18_000.0,
                    carbon_g: carbon,
                    ..Default::default()
                }],
                profile: vec![v1::ProfileStack {
                    service: "loan-svc".into(),
                    scenario: "credit".into(),
                    stack: "main;score".into(),
                    samples: 40,
                    energy_j: 100.0 * g,
                    ..Default::default()
                }],
                request_cpu: vec![v1::RequestCpuHistogram {
                    scenario: "credit".into(),
                    service: "loan-svc".into(),
                    counts: vec![0; 10].into_iter().chain([txns, i + 1]).collect(),
                    sum_cpu_ns: txns * 700 + (i + 1) * 1500,
                    energy_j_per_cpu_ns: 2e-8,
                    // log2 bins of an older agent: both stores convert them alike.
                    sub_bucket_bits: 0,
                }],
                ..Default::default()
            }
        })
        .collect()
}

fn request(store: &dyn Store) -> ReviewRequest {
    let layout = store.layout();
    ReviewRequest {
        baseline: Range::new(T, T + 3 * 3600, 3600, &layout).unwrap(),
        candidate: Range::new(T + 3 * 3600, T + 6 * 3600, 3600, &layout).unwrap(),
        compare: CompareOptions {
            scope: Scope::Service,
            filters: Filters::default(),
            bootstrap: Bootstrap::default(),
            weights: standard_weights(),
            min_coverage: 0.0,
        },
        profile_service: None,
        profile_scenario: None,
        min_profile_samples: 10,
        consolidation: ConsolidationOptions::default(),
    }
}

#[test]
fn both_stores_give_the_same_review_and_the_hand_summed_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    sqlite.commit(&windows("host-a", 0.5)).unwrap();
    // Bin-wise sums by hand over the whole range: log2 bin 10 [512, 1024):
    // sum of txns, bin 11 [1024, 2048): 1 + ... + 18, each spread evenly
    // over its 16 log-linear bins, (10 - 4) x 16 = 96..111 and 112..127.
    let all = Range::new(T, T + 7 * 3600, 3600, &LAYOUT).unwrap();
    let merged = sqlite.request_cpu(&all, None).unwrap();
    assert_eq!(merged.len(), 1);
    let txns: u64 = (0..18u64).map(|i| 30 + (i % 5) * 7).sum();
    for bin in 96..112 {
        assert!(
            (merged[0].bins[bin] - txns as f64 / 16.0).abs() < 1e-9,
            "bin {bin}"
        );
        assert!(
            (merged[0].bins[bin + 16] - 171.0 / 16.0).abs() < 1e-9,
            "bin {}",
            bin + 16
        );
    }
    assert_eq!(merged[0].bins.len(), 128);
    assert_eq!(merged[0].requests, (txns + 171) as f64);
    assert_eq!(merged[0].cpu_ns, (txns * 700 + 171 * 1500) as f64);
    assert!((merged[0].energy_j - merged[0].cpu_ns * 2e-8).abs() < 1e-9);
    let from_sqlite = serde_json::to_value(review(&sqlite, &request(&sqlite)).unwrap()).unwrap();

    let Some(server) = ScratchPostgres::start_or_skip(
        "both_stores_give_the_same_review_and_the_hand_summed_histogram",
    ) else {
        return;
    };
    let url = server.create_database("review_parity").unwrap();
    let pg = PostgresStore::open(&url, LAYOUT, 4, Duration::from_secs(30)).unwrap();
    let mut w = windows("host-a", 0.5);
    w.reverse();
    pg.commit(&w[..7]).unwrap();
    pg.commit(&w[7..]).unwrap();
    let from_pg = serde_json::to_value(review(&pg, &request(&pg)).unwrap()).unwrap();
    same(&from_sqlite, &from_pg, "review");
}

/// Equal, numbers to 1e-9 relative (sums in another order).
fn same(a: &serde_json::Value, b: &serde_json::Value, path: &str) {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-12),
                "{path}: {x} vs {y}"
            );
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}: lengths");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                same(x, y, &format!("{path}[{i}]"));
            }
        }
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}: keys"
            );
            for (k, v) in x {
                same(v, &y[k], &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

/// Service reviews with periods shorter than a host step (20 minutes: the
/// per-minute service rollups) give the same answer on both stores, equal
/// to the data-centre scope's (one service runs credit, with the scenario's
/// own figures); after retention both refuse it with the same reason.
#[test]
fn both_stores_give_the_same_twenty_minute_service_review_and_refusal() {
    let twenty_minutes = |store: &dyn Store, scope: Scope| {
        let mut r = request(store);
        r.baseline = Range::new(T, T + 3 * 3600, 1200, &LAYOUT).unwrap();
        r.candidate = Range::new(T + 3 * 3600, T + 6 * 3600, 1200, &LAYOUT).unwrap();
        r.compare.scope = scope;
        r
    };
    let retention = sci_aggregator::store::Retention {
        raw: Duration::from_secs(86_400),
        keys: Duration::from_secs(86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    sqlite.commit(&windows("host-a", 0.5)).unwrap();
    let service = review(&sqlite, &twenty_minutes(&sqlite, Scope::Service)).unwrap();
    let dc = review(&sqlite, &twenty_minutes(&sqlite, Scope::Datacenter)).unwrap();
    let g = |r: &sci_aggregator::review::Review| {
        let c = &r.comparison.scenarios[0];
        assert_eq!(c.scenario, "credit");
        (
            c.g_per_transaction.baseline.unwrap(),
            c.g_per_transaction.candidate.unwrap(),
            c.g_per_transaction.baseline_periods,
        )
    };
    let (sb, sc, periods) = g(&service);
    let (db, dcand, _) = g(&dc);
    // 9 periods of 20 minutes in 3 hours, the first starting before any window (T + 600).
    assert!(periods >= 8, "{periods} periods");
    assert!(
        (sb - db).abs() < 1e-9 * db && (sc - dcand).abs() < 1e-9 * dcand,
        "{sb} {db} {sc} {dcand}"
    );
    let from_sqlite = serde_json::to_value(&service).unwrap();
    sqlite.expire(T + 6 * 3600 + 86_400, &retention).unwrap();
    let refused_sqlite = review(&sqlite, &twenty_minutes(&sqlite, Scope::Service))
        .unwrap_err()
        .to_string();
    assert!(
        refused_sqlite.contains("already rolled up"),
        "{refused_sqlite}"
    );

    let Some(server) = ScratchPostgres::start_or_skip(
        "both_stores_give_the_same_twenty_minute_service_review_and_refusal",
    ) else {
        return;
    };
    let url = server.create_database("review_parity_fine").unwrap();
    let pg = PostgresStore::open(&url, LAYOUT, 4, Duration::from_secs(30)).unwrap();
    pg.commit(&windows("host-a", 0.5)).unwrap();
    let from_pg =
        serde_json::to_value(review(&pg, &twenty_minutes(&pg, Scope::Service)).unwrap()).unwrap();
    same(&from_sqlite, &from_pg, "review");
    pg.expire(T + 6 * 3600 + 86_400, &retention).unwrap();
    let refused_pg = review(&pg, &twenty_minutes(&pg, Scope::Service))
        .unwrap_err()
        .to_string();
    assert_eq!(refused_sqlite, refused_pg);
}
