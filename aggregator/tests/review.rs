//! Optimisation reviews (#15) against known answers: recorded windows built
//! so that the right verdict, interval, percentile and consolidation figure
//! are known by hand, stored in a real SQLite store and read back through
//! the rollups.
#![allow(clippy::unwrap_used)]
mod common;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;

use sci_aggregator::review::compare::{compare_ranges, CompareOptions, Filters, Scope};
use sci_aggregator::review::consolidation::{plan_store, ConsolidationOptions};
use sci_aggregator::review::stats::{Bootstrap, Verdict};
use sci_aggregator::review::{review, ReviewRequest};
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{Range, RollupLayout, Store};
use sci_proto::v1;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// 2026-01-01T00:00:00Z.
const DAY0: u64 = 1_767_225_600;
const NS: u64 = 1_000_000_000;

/// The tests' generator: rand's SmallRng, seeded.
struct Rng(SmallRng);
impl Rng {
    fn seeded(seed: u64) -> Rng {
        Rng(SmallRng::seed_from_u64(seed))
    }
    fn unit(&mut self) -> f64 {
        self.0.random::<f64>()
    }
    /// 1 +- spread, uniform.
    fn around(&mut self, spread: f64) -> f64 {
        1.0 + spread * (2.0 * self.unit() - 1.0)
    }
}

fn weights() -> BTreeMap<String, f64> {
    [
        ("credit", 24.0),
        ("drawdown", 7.0),
        ("repayment", 3.0),
        ("query", 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(60))
        .unwrap();
    (dir, store)
}

/// One scenario's figures in a window.
struct Txn {
    scenario: &'static str,
    transactions: u64,
    carbon_g: f64,
    energy_j: f64,
    cpu_ns: u64,
}

/// An hour-long window of `host` starting at `start_s` whose host figures
/// are the sum of its scenarios' (one process per scenario, service `svc`).
fn hour_window(host: &str, seq: u64, start_s: u64, txns: &[Txn]) -> v1::WindowReport {
    let mut w = v1::WindowReport {
        host: host.into(),
        agent_instance: "a".into(),
        seq,
        datacenter: "dc1".into(),
        start_unix_ns: start_s * NS,
        end_unix_ns: (start_s + 3600) * NS,
        cpus: 4,
        carbon_intensity_g_per_kwh: 500.0,
        pue: 1.5,
        intensity_source: "config".into(),
        energy_source: "rapl".into(),
        ..Default::default()
    };
    for t in txns {
        w.scenarios.push(v1::ScenarioRecord {
            scenario: t.scenario.into(),
            transactions: t.transactions,
            cpu_ns: t.cpu_ns,
            energy_j: t.energy_j,
            carbon_g: t.carbon_g,
            ..Default::default()
        });
        w.processes.push(v1::ProcessRecord {
            service: "svc".into(),
            scenario: t.scenario.into(),
            cpu_ns: t.cpu_ns,
            energy_j: t.energy_j,
            carbon_g: t.carbon_g,
            ..Default::default()
        });
        w.host_carbon_g += t.carbon_g;
        w.host_energy_j += t.energy_j;
        w.busy_cpu_ns += t.cpu_ns;
    }
    w.idle_cpu_ns = (4 * 3600 * NS).saturating_sub(w.busy_cpu_ns);
    w
}

/// A day of hourly windows: credit at `credit_g` per transaction and query
/// at 0.05 g, volumes `volume` x ~1000 / ~3000, each figure with +-10% noise.
fn day(
    host: &str,
    seq0: u64,
    day_start_s: u64,
    credit_g: f64,
    volume: f64,
    rng: &mut Rng,
) -> Vec<v1::WindowReport> {
    (0..24)
        .map(|h| {
            let credit = (1000.0 * volume * rng.around(0.1)).round() as u64;
            let query = (3000.0 * volume * rng.around(0.1)).round() as u64;
            let credit_carbon = credit as f64 * credit_g * rng.around(0.1);
            let query_carbon = query as f64 * 0.05 * rng.around(0.1);
            hour_window(
                host,
                seq0 + h,
                day_start_s + h * 3600,
                &[
                    Txn {
                        scenario: "credit",
                        transactions: credit,
                        carbon_g: credit_carbon,
                        energy_j: credit_carbon / 500.0 / 1.5 * 3.6e6,
                        cpu_ns: (credit_carbon * 1e9) as u64,
                    },
                    Txn {
                        scenario: "query",
                        transactions: query,
                        carbon_g: query_carbon,
                        energy_j: query_carbon / 500.0 / 1.5 * 3.6e6,
                        cpu_ns: (query_carbon * 1e9) as u64,
                    },
                ],
            )
        })
        .collect()
}

fn options(scope: Scope) -> CompareOptions {
    CompareOptions {
        scope,
        filters: Filters::default(),
        bootstrap: Bootstrap::default(),
        weights: weights(),
        min_coverage: 0.9,
    }
}

fn day_range(d: u64) -> Range {
    Range::new(DAY0 + d * 86_400, DAY0 + (d + 1) * 86_400, 3600, &LAYOUT).unwrap()
}

#[test]
fn credit_twenty_percent_lower_is_reported_lower_with_an_interval_excluding_zero() {
    let (_dir, store) = open();
    let mut rng = Rng::seeded(7);
    store
        .commit(&day("h1", 0, DAY0, 0.5, 1.0, &mut rng))
        .unwrap();
    store
        .commit(&day("h1", 100, DAY0 + 86_400, 0.4, 1.0, &mut rng))
        .unwrap();
    for scope in [Scope::Datacenter, Scope::Service] {
        let c = compare_ranges(&store, &day_range(0), &day_range(1), &options(scope)).unwrap();
        let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
        let g = &credit.g_per_transaction;
        assert_eq!(g.verdict, Verdict::Lower, "{scope:?}: {g:?}");
        assert!(g.ci_high.unwrap() < 0.0 && g.ci_low.unwrap() < g.ci_high.unwrap());
        let rel = g.relative_difference.unwrap();
        assert!((rel + 0.2).abs() < 0.03, "relative difference {rel}");
        // The interval holds the true difference, -0.1 g.
        assert!(
            g.ci_low.unwrap() < -0.1 && g.ci_high.unwrap() > -0.1,
            "{g:?}"
        );
        // Energy and CPU per transaction were built proportional to carbon.
        assert_eq!(credit.energy_j_per_transaction.verdict, Verdict::Lower);
        assert_eq!(credit.cpu_ns_per_transaction.verdict, Verdict::Lower);
        // Query was not changed.
        let query = c.scenarios.iter().find(|s| s.scenario == "query").unwrap();
        assert_eq!(
            query.g_per_transaction.verdict,
            Verdict::NoDetectableDifference,
            "{scope:?}"
        );
        assert!(credit.baseline.transactions > 20_000.0);
    }
    // SCI_CF: credit (24 x 1000 per hour) weighs most of R; the mean falls.
    let c = compare_ranges(
        &store,
        &day_range(0),
        &day_range(1),
        &options(Scope::Datacenter),
    )
    .unwrap();
    assert_eq!(c.sci_cf_mean.verdict, Verdict::Lower, "{:?}", c.sci_cf_mean);
    assert_eq!(c.sci_cf_pooled.verdict, Verdict::Lower);
    assert_eq!(c.sci_cf_mean.baseline_periods, 24);
    // Same answer twice (fixed seed).
    let again = compare_ranges(
        &store,
        &day_range(0),
        &day_range(1),
        &options(Scope::Datacenter),
    )
    .unwrap();
    assert_eq!(c, again);
    // Host scope: all the host's transactions, unweighted.
    let mut host = options(Scope::Host);
    host.filters.host = Some("h1".into());
    let h = compare_ranges(&store, &day_range(0), &day_range(1), &host).unwrap();
    assert_eq!(h.scenarios.len(), 1);
    assert_eq!(h.scenarios[0].g_per_transaction.verdict, Verdict::Lower);
}

/// A known +20% regression (credit 0.5 -> 0.6 g per transaction) through
/// the store: found "higher" in every scope, the interval holding the true
/// change (+0.1 g), and the SCI_CF up. The same generator seed as the -20%
/// test; how often the interval holds the truth is measured over many
/// trials in `review_calibration.rs` (seed 11 misses it: 1 in 20 should).
#[test]
fn credit_twenty_percent_higher_is_reported_higher_with_the_true_change_inside() {
    let (_dir, store) = open();
    let mut rng = Rng::seeded(7);
    store
        .commit(&day("h1", 0, DAY0, 0.5, 1.0, &mut rng))
        .unwrap();
    store
        .commit(&day("h1", 100, DAY0 + 86_400, 0.6, 1.0, &mut rng))
        .unwrap();
    for scope in [Scope::Datacenter, Scope::Service] {
        let c = compare_ranges(&store, &day_range(0), &day_range(1), &options(scope)).unwrap();
        let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
        let g = &credit.g_per_transaction;
        assert_eq!(g.verdict, Verdict::Higher, "{scope:?}: {g:?}");
        assert!(
            g.ci_low.unwrap() < 0.1 && g.ci_high.unwrap() > 0.1 && g.ci_low.unwrap() > 0.0,
            "{scope:?}: the interval holds +0.1 g: {g:?}"
        );
        let rel = g.relative_difference.unwrap();
        assert!((rel - 0.2).abs() < 0.03, "relative difference {rel}");
        assert_eq!(credit.energy_j_per_transaction.verdict, Verdict::Higher);
        assert_eq!(credit.cpu_ns_per_transaction.verdict, Verdict::Higher);
    }
    let c = compare_ranges(
        &store,
        &day_range(0),
        &day_range(1),
        &options(Scope::Datacenter),
    )
    .unwrap();
    assert_eq!(
        c.sci_cf_mean.verdict,
        Verdict::Higher,
        "{:?}",
        c.sci_cf_mean
    );
    assert_eq!(c.sci_cf_pooled.verdict, Verdict::Higher);
}

/// A day in which credit's own (dynamic) energy per transaction is
/// `dynamic_j` and the idle share its process is charged is 20x that, moving
/// +-60% with whatever else runs on the host (as under pgbench, where 95% of
/// the host's energy was idle). Carbon follows the total.
fn idle_heavy_day(
    seq0: u64,
    day_start_s: u64,
    dynamic_j: f64,
    rng: &mut Rng,
) -> Vec<v1::WindowReport> {
    (0..24)
        .map(|h| {
            let credit = (1000.0 * rng.around(0.1)).round() as u64;
            let dynamic = credit as f64 * dynamic_j * rng.around(0.05);
            let idle = credit as f64 * 20.0 * 0.01 * rng.around(0.6);
            let carbon = (dynamic + idle) / 3.6e6 * 500.0 * 1.5;
            let mut w = hour_window(
                "h1",
                seq0 + h,
                day_start_s + h * 3600,
                &[Txn {
                    scenario: "credit",
                    transactions: credit,
                    carbon_g: carbon,
                    energy_j: dynamic,
                    cpu_ns: (dynamic * 1e8) as u64,
                }],
            );
            w.processes[0].idle_share_j = idle;
            w.idle_energy_j = idle;
            w.host_energy_j += idle;
            w
        })
        .collect()
}

/// Dynamic energy per transaction 30% lower while the idle share (95% of
/// the energy) moves with the neighbours: the dynamic row finds it, and
/// the summary names the figures that decided.
#[test]
fn the_dynamic_energy_row_finds_the_change_the_idle_share_hides() {
    let (_dir, store) = open();
    let mut rng = Rng::seeded(21);
    store
        .commit(&idle_heavy_day(0, DAY0, 0.01, &mut rng))
        .unwrap();
    store
        .commit(&idle_heavy_day(100, DAY0 + 86_400, 0.007, &mut rng))
        .unwrap();
    let c = compare_ranges(
        &store,
        &day_range(0),
        &day_range(1),
        &options(Scope::Datacenter),
    )
    .unwrap();
    let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
    let dynamic = &credit.dynamic_energy_j_per_transaction;
    assert_eq!(dynamic.verdict, Verdict::Lower, "{dynamic:?}");
    let rel = dynamic.relative_difference.unwrap();
    assert!((rel + 0.3).abs() < 0.03, "dynamic J/txn {rel}");
    assert!(
        dynamic.ci_low.unwrap() < -0.003 && dynamic.ci_high.unwrap() > -0.003,
        "holds the true change, -0.003 J: {dynamic:?}"
    );
    // Totals: dynamic is the scenario's own energy, without the idle share.
    assert!(credit.baseline.dynamic_energy_j < 0.1 * credit.baseline.energy_j);
    assert_eq!(
        credit.g_per_transaction.verdict,
        Verdict::NoDetectableDifference,
        "{:?}",
        credit.g_per_transaction
    );
    assert!(
        credit
            .summary
            .contains("carbon per transaction: no detectable difference")
            && credit
                .summary
                .contains("dynamic energy per transaction lower (-30.")
            && credit.summary.contains("decided"),
        "{}",
        credit.summary
    );
}

/// 100 same-distribution trials through the store and the rollups. A
/// calibrated 95% interval says "no detectable difference" 95 times in 100
/// on average (binomial sd 2.2): fewer than 89 has a chance of 0.4%. The
/// level itself is checked over 1000 in-memory trials in
/// `review_calibration.rs`; this test checks the store path keeps it.
#[test]
fn same_distribution_ranges_show_no_detectable_difference_within_the_binomial_bound() {
    let (_dir, store) = open();
    for trial in 0..100u64 {
        let mut rng = Rng::seeded(10_000 + trial);
        let mut windows = day(
            "h1",
            trial * 1000,
            DAY0 + 2 * trial * 86_400,
            0.5,
            1.0,
            &mut rng,
        );
        windows.extend(day(
            "h1",
            trial * 1000 + 500,
            DAY0 + (2 * trial + 1) * 86_400,
            0.5,
            1.0,
            &mut rng,
        ));
        store.commit(&windows).unwrap();
    }
    let mut none = 0;
    let mut sci_none = 0;
    for trial in 0..100u64 {
        let c = compare_ranges(
            &store,
            &day_range(2 * trial),
            &day_range(2 * trial + 1),
            &options(Scope::Datacenter),
        )
        .unwrap();
        let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
        assert_eq!(credit.g_per_transaction.baseline_periods, 24);
        if credit.g_per_transaction.verdict == Verdict::NoDetectableDifference {
            none += 1;
        }
        if c.sci_cf_mean.verdict == Verdict::NoDetectableDifference {
            sci_none += 1;
        }
    }
    eprintln!("no detectable difference: credit g/txn {none}/100, SCI_CF mean {sci_none}/100");
    assert!(none >= 89, "credit g/txn: {none} of 100");
    assert!(sci_none >= 89, "SCI_CF mean: {sci_none} of 100");
}

#[test]
fn a_volume_change_alone_is_not_an_improvement() {
    let (_dir, store) = open();
    let mut rng = Rng::seeded(99);
    store
        .commit(&day("h1", 0, DAY0, 0.5, 1.0, &mut rng))
        .unwrap();
    // A quiet day: 40% of the volume, the same carbon per transaction.
    store
        .commit(&day("h1", 100, DAY0 + 86_400, 0.5, 0.4, &mut rng))
        .unwrap();
    let c = compare_ranges(
        &store,
        &day_range(0),
        &day_range(1),
        &options(Scope::Datacenter),
    )
    .unwrap();
    let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
    // Total carbon fell by 60% ...
    assert!(credit.candidate.carbon_g < 0.5 * credit.baseline.carbon_g);
    // ... but not per transaction.
    assert_ne!(credit.g_per_transaction.verdict, Verdict::Lower);
    assert_eq!(
        credit.g_per_transaction.verdict,
        Verdict::NoDetectableDifference
    );
    assert!(credit.g_per_transaction.relative_difference.unwrap().abs() < 0.05);
    assert_ne!(c.sci_cf_mean.verdict, Verdict::Lower);
}

/// The demo's daily load shape (workload/src/shape.rs) at whole hours.
fn load_fraction(hour: f64) -> f64 {
    sci_workload::shape::daily_load_fraction(hour)
}

#[test]
fn consolidation_on_the_demo_daily_shape_matches_the_hand_computation() {
    let (_dir, store) = open();
    // A pool of 10 hosts of 4 CPUs (service risk-api) carrying 24 busy cores
    // at the peak: 24 x f(h) cores in hour h, spread evenly; idle power 50 W;
    // TE 1 t over 4 years, whole machine. One zombie: 1% busy, no transactions.
    let embodied_g_per_h = 1e6 * 3600.0 / (4.0 * 365.0 * 86_400.0);
    let mut windows = Vec::new();
    let host_window = |host: &str, seq: u64, h: u64, busy_cores: f64, service: &str, txns: u64| {
        let busy_ns = (busy_cores * 3600.0 * 1e9) as u64;
        let mut w = hour_window(host, seq, DAY0 + h * 3600, &[]);
        w.busy_cpu_ns = busy_ns;
        w.idle_cpu_ns = 4 * 3600 * NS - busy_ns;
        w.idle_energy_j = 50.0 * 3600.0;
        w.host_energy_j = w.idle_energy_j + busy_cores * 10.0 * 3600.0;
        w.host_embodied_g = embodied_g_per_h;
        w.embodied = Some(v1::EmbodiedFactors {
            total_embodied_g: 1e6,
            lifespan_s: 4.0 * 365.0 * 86_400.0,
            resource_share: 1.0,
            share_source: "config".into(),
        });
        w.processes.push(v1::ProcessRecord {
            service: service.into(),
            scenario: "credit".into(),
            cpu_ns: busy_ns,
            ..Default::default()
        });
        w.scenarios.push(v1::ScenarioRecord {
            scenario: "credit".into(),
            transactions: txns,
            ..Default::default()
        });
        w
    };
    for h in 0..24u64 {
        let busy = 24.0 * load_fraction(h as f64);
        for i in 0..10 {
            windows.push(host_window(
                &format!("risk-{i}"),
                h,
                h,
                busy / 10.0,
                "risk-api",
                100,
            ));
        }
        windows.push(host_window("zombie-1", h, h, 0.04, "legacy-batch", 0));
    }
    store.commit(&windows).unwrap();
    let plan = plan_store(&store, &day_range(0), &ConsolidationOptions::default()).unwrap();
    assert_eq!(plan.datacenters.len(), 1);
    let dc = &plan.datacenters[0];
    assert!((dc.intensity_g_per_kwh - 500.0).abs() < 1e-9 && (dc.pue - 1.5).abs() < 1e-9);

    // Hand computation: hosts needed = ceil(24 f(h) / (0.6 x 4)) = ceil(10 f(h)):
    // f at 0..23 h = .2 .1667 .1333 .1 .1 .1 .1 .3 .5 .7 .7667 .85 .95 .9167
    // .75 .7333 .7167 .7 .7857 .8714 .9571 .9333 .8 .5
    let needed = [
        2, 2, 2, 1, 1, 1, 1, 3, 5, 7, 8, 9, 10, 10, 8, 8, 8, 7, 8, 9, 10, 10, 8, 5,
    ];
    let freed: usize = needed.iter().map(|n| 10 - n).sum();
    assert_eq!(freed, 97);
    let pool = &dc.pools.iter().find(|p| p.service == "risk-api").unwrap();
    assert_eq!(pool.hosts.len(), 10);
    assert!((pool.cores_per_host - 4.0).abs() < 1e-9);
    assert!((pool.idle_power_w - 50.0).abs() < 1e-9);
    let got: Vec<usize> = pool.curve.iter().map(|h| h.hosts_needed).collect();
    assert_eq!(got, needed);
    // Peak at 20 h: f = 0.7 + 0.3 x 3/3.5; valley 3-6 h: f = 0.1.
    let peak = 24.0 * (0.7 + 0.3 * 3.0 / 3.5);
    assert!((pool.peak_busy_cores - peak).abs() < 1e-6);
    assert!((pool.valley_busy_cores - 2.4).abs() < 1e-6);
    assert!((pool.peak_to_valley.unwrap() - peak / 2.4).abs() < 1e-6);
    assert_eq!(pool.valley_hours.len(), 20);
    assert!((pool.freed_host_hours_per_day - 97.0).abs() < 1e-9);
    // 97 h x 50 W = 17.46 MJ = 4.85 kWh; x 500 g/kWh x PUE 1.5 = 3637.5 g;
    // M = 97 x 1e6 g x 1 h / 4 years = 2768.26 g.
    assert!((pool.energy_saved_j_per_day - 17_460_000.0).abs() < 1e-3);
    assert!((pool.operational_saved_g_per_day - 3637.5).abs() < 1e-6);
    assert!((pool.embodied_saved_g_per_day - 97.0 * embodied_g_per_h).abs() < 1e-6);
    // The zombie first, whole day: 24 h x 50 W = 4.32 MJ = 1.2 kWh -> 900 g.
    assert_eq!(dc.zombies.len(), 1);
    let z = &dc.zombies[0];
    assert_eq!(z.host, "zombie-1");
    assert!((z.utilisation - 0.01).abs() < 1e-9);
    assert!((z.energy_saved_j_per_day - 4_320_000.0).abs() < 1e-3);
    assert!((z.operational_saved_g_per_day - 900.0).abs() < 1e-6);
    assert!((z.embodied_saved_g_per_day - 24.0 * embodied_g_per_h).abs() < 1e-6);
    assert!((dc.operational_saved_g_per_day - 4537.5).abs() < 1e-6);
    // A 50% target needs more hosts: ceil(24 f / 2): fewer freed.
    let strict = plan_store(
        &store,
        &day_range(0),
        &ConsolidationOptions {
            target_utilisation: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(strict.datacenters[0].pools[0].freed_host_hours_per_day < 97.0);
    assert!(plan.assumptions.iter().any(|a| a.contains("60.00%")));
}

/// Windows with a profile and per-request histograms: credit's `score`
/// function costs `score_j` per transaction, `price` 0.2 J; requests' CPU
/// sits in bin `bin` (2^(bin-1) ..= 2^bin ns).
fn profiled_day(seq0: u64, day_start_s: u64, score_j: f64, bin: usize) -> Vec<v1::WindowReport> {
    (0..24)
        .map(|h| {
            let txns = 1000;
            let mut w = hour_window(
                "h1",
                seq0 + h,
                day_start_s + h * 3600,
                &[Txn {
                    scenario: "credit",
                    transactions: txns,
                    carbon_g: (score_j + 0.2) * txns as f64 * 1e-3,
                    energy_j: (score_j + 0.2) * txns as f64,
                    cpu_ns: 1_000_000 * txns,
                }],
            );
            for (stack, j) in [("main;handle;score", score_j), ("main;handle;price", 0.2)] {
                w.profile.push(v1::ProfileStack {
                    service: "svc".into(),
                    scenario: "credit".into(),
                    stack: stack.into(),
                    samples: (j * 1000.0) as u64,
                    energy_j: j * txns as f64,
                    ..Default::default()
                });
            }
            let mut counts = vec![0u64; bin + 2];
            counts[bin] = 900;
            counts[bin + 1] = 100;
            w.request_cpu.push(v1::RequestCpuHistogram {
                scenario: "credit".into(),
                service: "svc".into(),
                counts,
                sum_cpu_ns: 1000 * (1u64 << bin),
                energy_j_per_cpu_ns: 1e-9,
                // log2 bins, as agents before issue 24 sent them: the
                // aggregator converts them and reads the same percentiles.
                sub_bucket_bits: 0,
            });
            w
        })
        .collect()
}

#[test]
fn the_review_finds_the_cheaper_function_and_the_lower_p50() {
    let (_dir, store) = open();
    store.commit(&profiled_day(0, DAY0, 0.8, 21)).unwrap();
    store
        .commit(&profiled_day(100, DAY0 + 86_400, 0.4, 20))
        .unwrap();
    let request = ReviewRequest {
        baseline: day_range(0),
        candidate: day_range(1),
        compare: options(Scope::Datacenter),
        profile_service: None,
        profile_scenario: None,
        min_profile_samples: 50,
        consolidation: ConsolidationOptions::default(),
    };
    let r = review(&store, &request).unwrap();
    let credit = r
        .comparison
        .scenarios
        .iter()
        .find(|s| s.scenario == "credit")
        .unwrap();
    // 1.0 J/txn -> 0.6 J/txn exactly (no noise: a zero-width interval).
    assert!((credit.energy_j_per_transaction.baseline.unwrap() - 1.0).abs() < 1e-9);
    assert!((credit.energy_j_per_transaction.candidate.unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(credit.energy_j_per_transaction.verdict, Verdict::Lower);
    let p = r.diff_profile.as_ref().unwrap();
    assert_eq!(p.service, "svc");
    assert!(p.withheld_reason.is_none());
    let top = &p.functions[0];
    assert_eq!(top.function, "score");
    assert!((top.baseline_j_per_transaction - 0.8).abs() < 1e-9);
    assert!((top.candidate_j_per_transaction - 0.4).abs() < 1e-9);
    assert_eq!(top.baseline_samples, 24 * 800);
    assert_eq!(top.candidate_samples, 24 * 400);
    assert!(p.flamegraph_svg().unwrap().contains("score"));
    // p50 of 900 in log2 bin b and 100 in bin b+1: rank 500 of 900 into
    // bin b [2^(b-1), 2^b): 2^(b-1) (1 + 5/9), as before the conversion.
    let d = r
        .distributions
        .iter()
        .find(|d| d.scenario == "credit" && d.service == "svc")
        .unwrap();
    let expect = |b: i32| 2f64.powi(b - 1) * (1.0 + 500.0 / 900.0);
    assert!((d.baseline.p50_cpu_ns.unwrap() - expect(21)).abs() < 1e-6);
    assert!((d.candidate.p50_cpu_ns.unwrap() - expect(20)).abs() < 1e-6);
    assert!(d.candidate.p50_cpu_ns < d.baseline.p50_cpu_ns);
    assert_eq!(d.baseline.requests, 24_000.0);
    // 1e-9 J per CPU-ns: energy p50 = CPU p50 x 1e-9.
    assert!((d.baseline.p50_energy_j.unwrap() - expect(21) * 1e-9).abs() < 1e-15);
    let md = sci_aggregator::review::report::markdown(&r);
    assert!(md.contains("| credit carbon / transaction |") && md.contains("| lower |"));
    assert!(md.contains("Disclosure: candidate"));
    let html = sci_aggregator::review::report::html(&r, "now");
    // Both graphs, each in its own full-width frame (the SVG escaped in srcdoc).
    assert_eq!(html.matches("<iframe class=\"flame\"").count(), 2);
    assert!(html.contains("&lt;svg") && html.contains("score"));
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["diff_profile"]["functions"][0]["function"], "score");
}

/// GET over a real socket; (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[test]
fn the_review_over_http_json_page_and_errors() {
    let (_dir, store) = open();
    store.commit(&profiled_day(0, DAY0, 0.8, 21)).unwrap();
    store
        .commit(&profiled_day(100, DAY0 + 86_400, 0.4, 20))
        .unwrap();
    let (_runtime, addr) = common::serve(
        store,
        sci_aggregator::config::AggregatorConfig {
            min_profile_samples: 50,
            ..Default::default()
        },
    );
    let q = format!(
        "baseline_from={}&baseline_to={}&candidate_from={}&candidate_to={}",
        DAY0,
        DAY0 + 86_400,
        DAY0 + 86_400,
        DAY0 + 2 * 86_400
    );
    let (status, body) = http_get(addr, &format!("/api/v1/compare?{q}"));
    assert_eq!(status, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let credit = r["comparison"]["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "credit")
        .unwrap();
    assert_eq!(credit["energy_j_per_transaction"]["verdict"], "lower");
    assert_eq!(r["diff_profile"]["functions"][0]["function"], "score");
    let (status, page) = http_get(addr, &format!("/dashboard/compare?{q}"));
    assert_eq!(status, 200);
    assert!(page.contains("Optimisation review") && page.contains("&lt;svg"));
    let (status, svg) = http_get(addr, &format!("/api/v1/compare?{q}&format=svg"));
    assert_eq!(status, 200);
    assert!(svg.starts_with("<?xml") || svg.contains("<svg"));
    let (status, body) = http_get(
        addr,
        &format!("/api/v1/distributions?from={DAY0}&to={}", DAY0 + 86_400),
    );
    assert_eq!(status, 200);
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d[0]["scenario"], "credit");
    assert_eq!(d[0]["requests"], 24_000.0);
    // Bad input is named.
    let (status, body) = http_get(addr, &format!("/api/v1/compare?{q}&scope=rack"));
    assert_eq!(status, 400);
    assert!(body.contains("rack"), "{body}");
    let (status, body) = http_get(addr, &format!("/api/v1/compare?{q}&target_utilisation=1.5"));
    assert_eq!(status, 400);
    assert!(body.contains("target_utilisation"), "{body}");
    // A host scope needs periods of whole host steps (a service scope reads
    // the per-minute service rollups for shorter ones).
    let (status, body) = http_get(addr, &format!("/api/v1/compare?{q}&scope=host&period=60"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("host_rollup_step"), "{body}");
}

/// `--datacenter dc1` (issue 24 item 5): the distributions and the
/// consolidation plan hold dc1 only, not dc2's hosts and requests.
#[test]
fn a_datacenter_review_plans_and_lists_distributions_for_that_datacenter_only() {
    let (_dir, store) = open();
    let elsewhere = |windows: Vec<v1::WindowReport>| {
        windows
            .into_iter()
            .map(|mut w| {
                w.host = "h2".into();
                w.datacenter = "dc2".into();
                w
            })
            .collect::<Vec<_>>()
    };
    store.commit(&profiled_day(0, DAY0, 0.8, 21)).unwrap();
    store
        .commit(&profiled_day(100, DAY0 + 86_400, 0.4, 20))
        .unwrap();
    store
        .commit(&elsewhere(profiled_day(200, DAY0, 0.8, 12)))
        .unwrap();
    store
        .commit(&elsewhere(profiled_day(300, DAY0 + 86_400, 0.4, 12)))
        .unwrap();
    let mut compare = options(Scope::Datacenter);
    compare.filters.datacenter = Some("dc1".into());
    let request = ReviewRequest {
        baseline: day_range(0),
        candidate: day_range(1),
        compare,
        profile_service: None,
        profile_scenario: None,
        min_profile_samples: 50,
        consolidation: ConsolidationOptions::default(),
    };
    let r = review(&store, &request).unwrap();
    let plans: Vec<&str> = r
        .consolidation
        .datacenters
        .iter()
        .map(|d| d.datacenter.as_str())
        .collect();
    assert_eq!(plans, vec!["dc1"]);
    let d = r
        .distributions
        .iter()
        .find(|d| d.scenario == "credit" && d.service == "svc")
        .unwrap();
    // dc1's 24 x 1000 requests only, in log2 bins 21 and 22 (dc2's in 12, 13).
    assert_eq!(d.baseline.requests, 24_000.0);
    let expect = |b: i32| 2f64.powi(b - 1) * (1.0 + 500.0 / 900.0);
    assert!((d.baseline.p50_cpu_ns.unwrap() - expect(21)).abs() < 1e-6);
    assert!((d.candidate.p50_cpu_ns.unwrap() - expect(20)).abs() < 1e-6);
}

/// `/api/v1/distributions?datacenter=`: dc1's requests sit in log2 bins 21
/// and 22 (900 + 100 per hour), dc2's in 12 and 13; each data centre's
/// answer holds its own 24,000 requests and p50, the fleet's both; an
/// unknown data centre is a 404 naming the known ones.
#[test]
fn distributions_of_one_datacenter_hold_its_requests_only() {
    let (_dir, store) = open();
    store.commit(&profiled_day(0, DAY0, 0.8, 21)).unwrap();
    let dc2: Vec<v1::WindowReport> = profiled_day(200, DAY0, 0.8, 12)
        .into_iter()
        .map(|mut w| {
            w.host = "h2".into();
            w.datacenter = "dc2".into();
            w
        })
        .collect();
    store.commit(&dc2).unwrap();
    let (_runtime, addr) = common::serve(store, Default::default());
    let get = |extra: &str| {
        let (status, body) = http_get(
            addr,
            &format!(
                "/api/v1/distributions?from={DAY0}&to={}{extra}",
                DAY0 + 86_400
            ),
        );
        assert_eq!(status, 200, "{extra}: {body}");
        let d: serde_json::Value = serde_json::from_str(&body).unwrap();
        let credit: Vec<serde_json::Value> = d
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["scenario"] == "credit")
            .cloned()
            .collect();
        assert_eq!(credit.len(), 1, "{extra}: {body}");
        (
            credit[0]["requests"].as_f64().unwrap(),
            credit[0]["p50_cpu_ns"].as_f64().unwrap(),
        )
    };
    // p50 of 900 in log2 bin b and 100 in b+1: 2^(b-1) (1 + 5/9).
    let p50 = |b: i32| 2f64.powi(b - 1) * (1.0 + 500.0 / 900.0);
    let (requests, dc1_p50) = get("&datacenter=dc1");
    assert_eq!(requests, 24_000.0);
    assert!((dc1_p50 - p50(21)).abs() < 1e-6, "dc1 p50 {dc1_p50}");
    let (requests, dc2_p50) = get("&datacenter=dc2");
    assert_eq!(requests, 24_000.0);
    assert!((dc2_p50 - p50(12)).abs() < 1e-6, "dc2 p50 {dc2_p50}");
    // The fleet: both data centres' 48,000 requests, half in each.
    let (requests, fleet_p50) = get("");
    assert_eq!(requests, 48_000.0);
    assert!(fleet_p50 > dc2_p50 && fleet_p50 < dc1_p50);
    let (status, body) = http_get(
        addr,
        &format!(
            "/api/v1/distributions?from={DAY0}&to={}&datacenter=dc9",
            DAY0 + 86_400
        ),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("\"dc9\"") && body.contains("known: dc1, dc2"),
        "{body}"
    );
}

/// Minute windows of h1 over `[from_s, from_s + minutes x 60)`: credit at
/// ~100 transactions a minute and `credit_g` per transaction, each figure
/// with +-10% noise (as [`day`], per minute).
fn minutes(
    seq0: u64,
    from_s: u64,
    count: u64,
    credit_g: f64,
    rng: &mut Rng,
) -> Vec<v1::WindowReport> {
    (0..count)
        .map(|m| {
            let credit = (100.0 * rng.around(0.1)).round() as u64;
            let carbon = credit as f64 * credit_g * rng.around(0.1);
            let mut w = hour_window(
                "h1",
                seq0 + m,
                from_s + 60 * m,
                &[Txn {
                    scenario: "credit",
                    transactions: credit,
                    carbon_g: carbon,
                    energy_j: carbon / 500.0 / 1.5 * 3.6e6,
                    cpu_ns: (carbon * 1e9) as u64,
                }],
            );
            w.end_unix_ns = (from_s + 60 * (m + 1)) * NS;
            w.idle_cpu_ns = (4 * 60 * NS).saturating_sub(w.busy_cpu_ns);
            w
        })
        .collect()
}

/// Two 30-minute ranges inside one host step (an hour), periods of 5
/// minutes (6 per range): credit 0.5 -> 0.6 g per transaction (+20%) is
/// found "higher" in the service scope with the true change (+0.1 g) inside
/// the interval, from the per-minute service rollups. Once retention has
/// removed those, the same review is refused with the reason, while
/// whole-hour service figures remain.
#[test]
fn a_thirty_minute_service_review_finds_a_twenty_percent_regression() {
    let (_dir, store) = open();
    let mut rng = Rng::seeded(7);
    let t0 = DAY0 + 10 * 3600;
    store.commit(&minutes(0, t0, 30, 0.5, &mut rng)).unwrap();
    store
        .commit(&minutes(100, t0 + 1800, 30, 0.6, &mut rng))
        .unwrap();
    let baseline = Range::new(t0, t0 + 1800, 300, &LAYOUT).unwrap();
    let candidate = Range::new(t0 + 1800, t0 + 3600, 300, &LAYOUT).unwrap();
    let mut service = options(Scope::Service);
    service.filters.service = Some("svc".into());
    let c = compare_ranges(&store, &baseline, &candidate, &service).unwrap();
    let credit = c.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
    let g = &credit.g_per_transaction;
    assert_eq!(g.verdict, Verdict::Higher, "{g:?}");
    assert_eq!((g.baseline_periods, g.candidate_periods), (6, 6), "{g:?}");
    assert!(
        g.ci_low.unwrap() > 0.0 && g.ci_low.unwrap() < 0.1 && g.ci_high.unwrap() > 0.1,
        "the interval holds +0.1 g: {g:?}"
    );
    let rel = g.relative_difference.unwrap();
    println!(
        "30-min service review: {:?} -> {:?} g/txn, {rel:+.4}, 95% interval [{:?}, {:?}]",
        g.baseline, g.candidate, g.ci_low, g.ci_high
    );
    assert!((rel - 0.2).abs() < 0.05, "relative difference {rel}");
    // The service's figures are the scenario's (one service ran it): the
    // same per-transaction carbon as the data-centre scope.
    let dc = compare_ranges(&store, &baseline, &candidate, &options(Scope::Datacenter)).unwrap();
    let dc_credit = dc
        .scenarios
        .iter()
        .find(|s| s.scenario == "credit")
        .unwrap();
    for (a, b) in [
        (g.baseline, dc_credit.g_per_transaction.baseline),
        (g.candidate, dc_credit.g_per_transaction.candidate),
    ] {
        assert!(
            (a.unwrap() - b.unwrap()).abs() < 1e-9 * b.unwrap(),
            "{a:?} {b:?}"
        );
    }
    // Retention of raw windows (and the per-minute rollups) reaches past
    // the hour: the 30-minute service review is refused with the reason.
    let retention = sci_aggregator::store::Retention {
        raw: Duration::from_secs(86_400),
        keys: Duration::from_secs(86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    let expired = store.expire(t0 + 3600 + 86_400, &retention).unwrap();
    assert!(expired.rollup_rows >= 60, "{expired:?}");
    let refused = compare_ranges(&store, &baseline, &candidate, &service).unwrap_err();
    let reason = refused.to_string();
    assert!(
        reason.contains("already rolled up into host steps of 3600 s")
            && reason.contains(&format!("{}", t0 + 3600)),
        "{reason}"
    );
    // Whole hours still answer from the hourly service rollups.
    let hour = Range::new(t0, t0 + 3600, 3600, &LAYOUT).unwrap();
    let h = compare_ranges(&store, &hour, &hour, &service).unwrap();
    let credit = h.scenarios.iter().find(|s| s.scenario == "credit").unwrap();
    assert!(
        (credit.baseline.transactions
            - dc_credit.baseline.transactions
            - dc_credit.candidate.transactions)
            .abs()
            < 1e-6
    );
}
