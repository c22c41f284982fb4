//! The aggregator's two stores, SQLite (embedded) and a real PostgreSQL 15
//! server (scratch, started here), on the same windows: the hand-computed
//! SCI_CF of Appendix A per period and its mean, with windows straddling
//! period boundaries (split in proportion to time) and a period below the
//! minimum coverage (shown, left out of the mean, and said); both stores
//! agree to 1e-9; duplicates and conflicts; disclosure in the report;
//! retention; two aggregators on one PostgreSQL storing each window once.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sci_aggregator::config::standard_weights;
use sci_aggregator::sci::{evaluate_store, Evaluation};
use sci_aggregator::store::postgres::PostgresStore;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{CommitOutcome, Range, Retention, RollupLayout, Store};
use sci_proto::v1;
use sci_tests::postgres::ScratchPostgres;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// A minute boundary well in the past (periods of 60 s from here).
const T: u64 = 1_764_000_000 / 3600 * 3600 + 600;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// A window of `host` over [T + from, T + to) with O, M and transactions
/// (credit, drawdown, repayment, query); factors disclosed as an agent does.
fn window(
    host: &str,
    seq: u64,
    from: u64,
    to: u64,
    o: f64,
    m: f64,
    txns: [u64; 4],
) -> v1::WindowReport {
    let names = ["credit", "drawdown", "repayment", "query"];
    v1::WindowReport {
        host: host.into(),
        agent_instance: format!("{host}-inst"),
        seq,
        datacenter: "dc-east".into(),
        start_unix_ns: (T + from) * 1_000_000_000,
        end_unix_ns: (T + to) * 1_000_000_000,
        cpu_source: "ebpf".into(),
        cpus: 2,
        busy_cpu_ns: (to - from) * 500_000_000,
        idle_cpu_ns: (to - from) * 1_500_000_000,
        steal_cpu_ns: (to - from) * 10_000_000,
        energy_source: "model-linear".into(),
        energy_model: "linear 10-35 W per vCPU".into(),
        estimated: true,
        host_energy_j: 10.0 * (to - from) as f64,
        idle_energy_j: 4.0 * (to - from) as f64,
        unattributed_energy_j: 0.5 * (to - from) as f64,
        carbon_intensity_g_per_kwh: 530.6,
        intensity_source: "region:CN-East (test grid factor)".into(),
        pue: 1.25,
        host_carbon_g: o,
        host_embodied_g: m,
        embodied: Some(v1::EmbodiedFactors {
            total_embodied_g: 1_000_000.0,
            lifespan_s: 4.0 * 365.0 * 86_400.0,
            resource_share: 2.0 / 64.0,
            share_source: "vm: 2 of 64 vCPUs".into(),
        }),
        scenarios: names
            .iter()
            .zip(txns)
            .map(|(name, n)| v1::ScenarioRecord {
                scenario: name.to_string(),
                transactions: n,
                energy_j: 1.0,
                carbon_g: o / 8.0,
                embodied_g: m / 8.0,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Host a: [0,30) [30,90) straddles 60, [90,180) straddles 120.
/// Host b: [0,60) [60,120) [120,150): period 2 has 90 of 120 host-seconds.
fn windows() -> Vec<v1::WindowReport> {
    vec![
        window("host-a", 0, 0, 30, 1.0, 0.2, [1, 0, 0, 10]),
        window("host-a", 1, 30, 90, 3.0, 0.6, [2, 0, 0, 4]),
        window("host-a", 2, 90, 180, 1.8, 0.9, [0, 3, 0, 6]),
        window("host-b", 0, 0, 60, 2.0, 0.4, [0, 0, 2, 5]),
        window("host-b", 1, 60, 120, 2.5, 0.4, [1, 0, 0, 1]),
        window("host-b", 2, 120, 150, 0.7, 0.2, [0, 0, 0, 3]),
    ]
}

fn evaluate(store: &dyn Store) -> Evaluation {
    let range = Range::new(T, T + 180, 60, &store.layout()).unwrap();
    evaluate_store(store, &range, &standard_weights(), 0.9).unwrap()
}

/// Appendix A by hand (see `windows`):
/// p0: O = 1.0 + 3.0/2 + 2.0 = 4.5, M = 0.2 + 0.3 + 0.4 = 0.9,
///     TA credit 1 + 1, repayment 2, query 10 + 2 + 5: R = 48 + 6 + 17 = 71.
/// p1: O = 1.5 + 1.8/3 + 2.5 = 4.6, M = 0.3 + 0.3 + 0.4 = 1.0,
///     TA credit 1 + 1, drawdown 1, query 2 + 2 + 1: R = 48 + 7 + 5 = 60.
/// p2: O = 1.2 + 0.7 = 1.9, M = 0.6 + 0.2 = 0.8, drawdown 2, query 4 + 3:
///     R = 14 + 7 = 21; coverage (60 + 30) / (2 x 60) = 75% < 90%: left out.
/// SCI_CF = mean(5.4/71, 5.6/60); pooled = (5.4 + 5.6) / (71 + 60).
fn check_hand_computation(e: &Evaluation) {
    let expected = [
        (4.5, 0.9, [2.0, 0.0, 2.0, 17.0], 71.0, 1.0, true),
        (4.6, 1.0, [2.0, 1.0, 0.0, 5.0], 60.0, 1.0, true),
        (1.9, 0.8, [0.0, 2.0, 0.0, 7.0], 21.0, 0.75, false),
    ];
    assert_eq!(e.periods.len(), 3, "{e:#?}");
    for (j, (o, m, ta, r, coverage, in_mean)) in expected.iter().enumerate() {
        let p = &e.periods[j];
        assert_eq!(p.start_unix_s, T + 60 * j as u64);
        assert!(close(p.operational_g, *o), "O_{j}: {p:?}");
        assert!(close(p.embodied_g, *m), "M_{j}: {p:?}");
        for (i, name) in ["credit", "drawdown", "repayment", "query"]
            .iter()
            .enumerate()
        {
            assert!(close(p.transactions[*name], ta[i]), "TA_{name}^{j}: {p:?}");
        }
        assert!(close(p.business_units, *r), "R_{j}: {p:?}");
        assert!(
            close(p.sci_g_per_unit.unwrap(), (o + m) / r),
            "SCI_{j}: {p:?}"
        );
        assert!(close(p.coverage, *coverage), "coverage_{j}: {p:?}");
        assert_eq!(p.hosts, 2);
        assert_eq!(p.windows, 2, "windows ending in period {j}");
        assert_eq!(p.in_mean, *in_mean);
    }
    assert!(e.periods[2]
        .excluded_reason
        .as_deref()
        .unwrap()
        .contains("coverage 75.00% is below the minimum 90.00%"));
    let mean = (5.4 / 71.0 + 5.6 / 60.0) / 2.0;
    let pooled = (5.4 + 5.6) / (71.0 + 60.0);
    println!(
        "hand computation: SCI_j = {:?}, mean {mean}, pooled {pooled}",
        [5.4 / 71.0, 5.6 / 60.0, 2.7 / 21.0]
    );
    assert!(close(e.sci_cf_mean.unwrap(), mean));
    assert!(close(e.sci_cf_pooled.unwrap(), pooled));
    assert_eq!(e.periods_in_mean, 2);
    assert_eq!(e.periods_below_coverage, 1);
    assert!(e
        .coverage_note
        .as_deref()
        .unwrap()
        .contains("1 of 3 periods with transactions are below the minimum coverage of 90.00%"));
    // Disclosure per data centre: factors as sent, shares by energy.
    let d = &e.disclosure[0];
    assert_eq!(d.datacenter, "dc-east");
    assert!(close(d.intensity_g_per_kwh, 530.6));
    assert!(close(d.pue, 1.25));
    assert!(close(d.total_embodied_g, 1_000_000.0));
    assert!(close(d.resource_share, 2.0 / 64.0));
    assert_eq!(
        d.intensity_sources,
        vec!["region:CN-East (test grid factor)"]
    );
    assert_eq!(d.energy_models, vec!["linear 10-35 W per vCPU"]);
    assert!(close(d.estimated_energy_share, 1.0));
    assert!(close(d.unattributed_energy_share, 0.05));
    // host-seconds 180 + 150; steal 10 ms per second.
    assert!(close(d.host_seconds, 330.0));
    assert!(close(d.steal_cpu_s, 3.3));
}

/// Every number of two evaluations' JSON equal to 1e-9 (relative).
fn assert_same(a: &serde_json::Value, b: &serde_json::Value, path: &str) {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(close(x, y), "{path}: {x} vs {y}");
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_same(x, y, &format!("{path}[{i}]"));
            }
        }
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}"
            );
            for (k, v) in x {
                assert_same(v, &y[k], &format!("{path}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

fn postgres_store(server: &ScratchPostgres, database: &str) -> PostgresStore {
    let url = server.create_database(database).unwrap();
    PostgresStore::open(&url, LAYOUT, 4, Duration::from_secs(30)).unwrap()
}

fn check_outcomes(store: &dyn Store) {
    let first = windows();
    let outcomes = store.commit(&first).unwrap();
    assert!(outcomes.iter().all(|o| *o == CommitOutcome::Stored));
    // A replay: duplicates; the same key with other content: a conflict,
    // also inside one batch; nothing changes the figures.
    let mut changed = first[1].clone();
    changed.host_carbon_g += 1.0;
    let outcomes = store
        .commit(&[first[0].clone(), changed, first[0].clone()])
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            CommitOutcome::Duplicate,
            CommitOutcome::Conflict,
            CommitOutcome::Duplicate
        ]
    );
    let fresh = window("host-c", 0, 0, 60, 1.0, 0.0, [0, 0, 0, 1]);
    let mut clash = fresh.clone();
    clash.host_carbon_g = 2.0;
    let outcomes = store.commit(&[fresh, clash]).unwrap();
    assert_eq!(
        outcomes,
        vec![CommitOutcome::Stored, CommitOutcome::Conflict]
    );
}

#[test]
fn both_stores_give_the_hand_computed_sci_cf() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    sqlite.commit(&windows()).unwrap();
    let from_sqlite = evaluate(&sqlite);
    check_hand_computation(&from_sqlite);

    let Some(server) = ScratchPostgres::start_or_skip("both_stores_give_the_hand_computed_sci_cf")
    else {
        return;
    };
    let pg = postgres_store(&server, "parity");
    // In another batching, another order: sums must not depend on it.
    let mut w = windows();
    w.reverse();
    pg.commit(&w[..2]).unwrap();
    pg.commit(&w[2..]).unwrap();
    let from_pg = evaluate(&pg);
    check_hand_computation(&from_pg);
    assert_same(
        &serde_json::to_value(&from_sqlite).unwrap(),
        &serde_json::to_value(&from_pg).unwrap(),
        "evaluation",
    );
    // The report discloses the factors (from either store: same text).
    let md = sci_aggregator::report::markdown(&from_pg);
    assert_eq!(md, sci_aggregator::report::markdown(&from_sqlite));
    for needle in [
        "| dc-east | 530.6 | region:CN-East (test grid factor) | 1.250 | 1.000 t | 1460 | 0.03125 | vm: 2 of 64 vCPUs | model-linear | linear 10-35 W per vCPU | 3.300 kJ | 100.0% | 5.000% | 0% |",
        "**Coverage:** 1 of 3 periods with transactions are below the minimum coverage of 90.00%",
        "no: coverage 75.00% is below the minimum 90.00%",
    ] {
        assert!(md.contains(needle), "{needle}\n{md}");
    }
    let html = sci_aggregator::dashboard::render_evaluation_report_html(&from_pg, "now");
    assert!(
        html.contains("region:CN-East (test grid factor)") && html.contains("vm: 2 of 64 vCPUs")
    );
}

#[test]
fn duplicates_and_conflicts_in_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    check_outcomes(&sqlite);
    let Some(server) = ScratchPostgres::start_or_skip("duplicates_and_conflicts_in_both_stores")
    else {
        return;
    };
    let pg = postgres_store(&server, "outcomes");
    check_outcomes(&pg);
    // Replays and conflicts changed nothing: host-c's window counted once.
    for store in [&sqlite as &dyn Store, &pg] {
        let range = Range::new(T, T + 180, 60, &store.layout()).unwrap();
        let e = evaluate_store(store, &range, &standard_weights(), 0.0).unwrap();
        assert!(close(
            e.operational_g,
            1.0 + 3.0 + 1.8 + 2.0 + 2.5 + 0.7 + 1.0
        ));
    }
}

#[test]
fn retention_drops_raw_partitions_and_old_rollups() {
    let Some(server) =
        ScratchPostgres::start_or_skip("retention_drops_raw_partitions_and_old_rollups")
    else {
        return;
    };
    let pg = postgres_store(&server, "retention");
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    let retention = Retention {
        raw: Duration::from_secs(7 * 86_400),
        keys: Duration::from_secs(7 * 86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    for store in [&sqlite as &dyn Store, &pg] {
        store.commit(&windows()).unwrap();
        // Eight days later: raw windows gone, rollups kept.
        let expired = store.expire(T + 8 * 86_400, &retention).unwrap();
        assert_eq!(expired.rollup_rows, 0);
        assert!(close(
            evaluate(store).sci_cf_mean.unwrap(),
            (5.4 / 71.0 + 5.6 / 60.0) / 2.0
        ));
        // A year and more later: rollups gone too.
        let expired = store.expire(T + 401 * 86_400, &retention).unwrap();
        assert!(expired.rollup_rows > 0);
        assert!(evaluate(store).periods.is_empty());
    }
    let raw = server
        .psql("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'windows_raw'")
        .unwrap();
    assert_eq!(raw.trim(), "0", "every day partition dropped");
    let usage = sqlite.disk_usage().unwrap();
    assert!(usage["total"] > 0);
}

#[test]
fn two_aggregators_on_one_postgres_store_each_window_once() {
    let Some(server) =
        ScratchPostgres::start_or_skip("two_aggregators_on_one_postgres_store_each_window_once")
    else {
        return;
    };
    let url = server.create_database("shared").unwrap();
    let a = PostgresStore::open(&url, LAYOUT, 2, Duration::from_secs(30)).unwrap();
    let b = PostgresStore::open(&url, LAYOUT, 2, Duration::from_secs(30)).unwrap();
    // Both receive every window (an agent failing over and replaying), at once.
    let outcomes: Vec<Vec<CommitOutcome>> = std::thread::scope(|s| {
        let ha = s.spawn(|| {
            windows()
                .iter()
                .map(|w| a.commit(std::slice::from_ref(w)).unwrap()[0])
                .collect::<Vec<_>>()
        });
        let hb = s.spawn(|| {
            windows()
                .iter()
                .rev()
                .map(|w| b.commit(std::slice::from_ref(w)).unwrap()[0])
                .collect::<Vec<_>>()
        });
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    let stored = outcomes
        .iter()
        .flatten()
        .filter(|o| **o == CommitOutcome::Stored)
        .count();
    assert_eq!(stored, 6, "{outcomes:?}");
    check_hand_computation(&evaluate(&a));
    check_hand_computation(&evaluate(&b));
}

/// Long ranges read whole hours and days from the coarse rollups and only
/// their edges finely: the figures must be those of the fine rollups and of
/// the windows themselves, in both stores. 10-minute windows offset by 7
/// minutes (so they straddle hours and the day boundary) over 27 hours.
#[test]
fn coarse_and_fine_rollups_agree() {
    let day = T / 86_400 * 86_400;
    let start = day - 3600 + 420;
    let mut sent = Vec::new();
    for host in ["host-a", "host-b"] {
        for i in 0..(27 * 6) {
            let from = start + 600 * i;
            let mut w = window(
                host,
                i,
                0,
                600,
                0.01 * (i % 7 + 1) as f64,
                0.002,
                [1, 0, 1, 3],
            );
            w.start_unix_ns = from * 1_000_000_000;
            w.end_unix_ns = (from + 600) * 1_000_000_000;
            w.profile.push(v1::ProfileStack {
                service: "loan".into(),
                scenario: "credit".into(),
                stack: format!("main;f{}", i % 3),
                samples: 10,
                energy_j: 0.1,
                ..Default::default()
            });
            sent.push(w);
        }
    }
    let carbon: f64 = sent.iter().map(|w| w.host_carbon_g).sum();
    let energy: f64 = sent.iter().map(|w| w.host_energy_j).sum();
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    let server = ScratchPostgres::start_or_skip("coarse_and_fine_rollups_agree");
    let pg = server.as_ref().map(|s| postgres_store(s, "coarse"));
    let mut stores: Vec<&dyn Store> = vec![&sqlite];
    if let Some(pg) = &pg {
        stores.push(pg);
    }
    let mut answers = Vec::new();
    for store in stores {
        for chunk in sent.chunks(40) {
            store.commit(chunk).unwrap();
        }
        // Hourly periods: the coarse path; minute periods: the fine one.
        let hourly = Range::new(day - 7200, day + 86_400 + 10_800, 3600, &store.layout()).unwrap();
        let minutes = Range::new(day - 7200, day + 86_400 + 10_800, 60, &store.layout()).unwrap();
        let coarse = evaluate_store(store, &hourly, &standard_weights(), 0.0).unwrap();
        let fine = evaluate_store(store, &minutes, &standard_weights(), 0.0).unwrap();
        for e in [&coarse, &fine] {
            assert!(
                close(e.operational_g, carbon),
                "{} vs {carbon}",
                e.operational_g
            );
            assert!(close(e.energy_j, energy));
            let hosts_energy: f64 = e.hosts.iter().map(|h| h.energy_j).sum();
            assert!(close(hosts_energy, energy));
            let txns: f64 = e.scenarios.iter().map(|s| s.transactions).sum();
            assert!(close(txns, 5.0 * sent.len() as f64));
        }
        // Per hour, the hourly period equals the sum of its 60 minute periods.
        for p in &coarse.periods {
            let minutes_o: f64 = fine
                .periods
                .iter()
                .filter(|m| m.start_unix_s >= p.start_unix_s && m.start_unix_s < p.end_unix_s)
                .map(|m| m.operational_g)
                .sum();
            assert!(
                close(p.operational_g, minutes_o),
                "{}: {} vs {minutes_o}",
                p.start_unix_s,
                p.operational_g
            );
        }
        let stacks = store.stacks(&hourly, Some("loan"), None).unwrap();
        let samples: u64 = stacks.iter().map(|s| s.samples).sum();
        assert_eq!(samples, 10 * sent.len() as u64);
        answers.push(serde_json::to_value(&coarse).unwrap());
    }
    if answers.len() == 2 {
        assert_same(&answers[0], &answers[1], "evaluation");
    }
}

/// One aggregator's streams committing at once (PostgreSQL merges them in
/// one transaction, `store/group.rs`): four threads each commit every
/// window one by one, in different orders; each window is stored by
/// exactly one of them, the others get `Duplicate`, and the figures are
/// the hand computation's (each window counted once in the rollups).
#[test]
fn concurrent_commits_into_one_postgres_store_each_window_once() {
    let Some(server) = ScratchPostgres::start_or_skip(
        "concurrent_commits_into_one_postgres_store_each_window_once",
    ) else {
        return;
    };
    let store = postgres_store(&server, "grouped");
    let all = windows();
    type Key = (String, u64);
    let outcomes: Vec<Vec<(Key, CommitOutcome)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (store, all) = (&store, &all);
                s.spawn(move || {
                    let mut order: Vec<&v1::WindowReport> = all.iter().collect();
                    order.rotate_left(t % all.len());
                    if t % 2 == 1 {
                        order.reverse();
                    }
                    order
                        .into_iter()
                        .map(|w| {
                            let outcome = store.commit(std::slice::from_ref(w)).unwrap()[0];
                            ((w.host.clone(), w.seq), outcome)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for w in &all {
        let of_this: Vec<CommitOutcome> = outcomes
            .iter()
            .flatten()
            .filter(|(key, _)| key.0 == w.host && key.1 == w.seq)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(of_this.len(), 4);
        assert_eq!(
            of_this
                .iter()
                .filter(|o| **o == CommitOutcome::Stored)
                .count(),
            1,
            "{} seq {}: {of_this:?}",
            w.host,
            w.seq
        );
        assert!(of_this
            .iter()
            .all(|o| matches!(o, CommitOutcome::Stored | CommitOutcome::Duplicate)));
    }
    check_hand_computation(&evaluate(&store));
}

/// The raw windows PostgreSQL keeps (written by a binary COPY) are the
/// canonical encodings, byte for byte, under their keys; one large enough
/// to be compressed is compressed with lz4, which this server offers.
#[test]
fn postgres_keeps_each_raw_window_byte_for_byte() {
    let Some(server) =
        ScratchPostgres::start_or_skip("postgres_keeps_each_raw_window_byte_for_byte")
    else {
        return;
    };
    let pg = postgres_store(&server, "raw");
    let mut stored = windows();
    let mut large = window("host-large", 0, 0, 60, 1.0, 0.0, [1, 0, 0, 0]);
    for i in 0..100 {
        large.processes.push(v1::ProcessRecord {
            pid: i,
            comm: format!("worker-{i}"),
            service: "loan-origination-service".into(),
            cpu_ns: 1_000_000 + u64::from(i),
            ..Default::default()
        });
    }
    stored.push(large);
    let outcomes = pg.commit(&stored).unwrap();
    assert!(outcomes.iter().all(|o| *o == CommitOutcome::Stored));
    let rows = server
        .psql_in(
            "raw",
            "SELECT host, agent_instance, seq, end_ns, encode(payload, 'hex'), coalesce(pg_column_compression(payload), 'none') FROM windows_raw",
        )
        .unwrap();
    let rows: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), stored.len());
    for w in &stored {
        let row = rows
            .iter()
            .find(|r| r[0] == w.host && r[1] == w.agent_instance && r[2] == w.seq.to_string())
            .unwrap_or_else(|| panic!("{} seq {} not stored", w.host, w.seq));
        assert_eq!(row[3], w.end_unix_ns.to_string());
        let hex: String = sci_aggregator::store::canonical_encoding(w)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(row[4], hex, "payload of {} seq {}", w.host, w.seq);
        if w.host == "host-large" {
            assert!(hex.len() / 2 > 2048, "{} bytes", hex.len() / 2);
            assert_eq!(row[5], "lz4");
        }
    }
}

/// A window of `host` on a supply (#27): one service per scenario, the
/// query transactions shared by two services in proportion to CPU.
fn supply_window(host: &str, seq: u64, vendor: &str, pool: &str) -> v1::WindowReport {
    let mut w = window(host, seq, 0, 3600, 2.0, 0.5, [1, 0, 0, 30]);
    w.supply = Some(v1::ResourceSupply {
        cpu_model: format!("{vendor} model"),
        cpu_vendor: vendor.into(),
        arch: "x86_64".into(),
        logical_cpus: 2,
        memory_bytes: 8 << 30,
        machine_kind: "vm".into(),
        physical_host_cpus: 64,
        labels: [("pool".to_string(), pool.to_string())].into(),
    });
    w.processes = vec![
        v1::ProcessRecord {
            pid: 1,
            comm: "a".into(),
            service: "query-a".into(),
            scenario: "query".into(),
            cpu_ns: 3_000_000_000,
            energy_j: 3.0,
            carbon_g: 0.3,
            ..Default::default()
        },
        v1::ProcessRecord {
            pid: 2,
            comm: "b".into(),
            service: "query-b".into(),
            scenario: "query".into(),
            cpu_ns: 1_000_000_000,
            energy_j: 1.0,
            carbon_g: 0.1,
            ..Default::default()
        },
    ];
    w
}

#[test]
fn supply_rollups_and_plans_agree_in_both_stores() {
    let windows = [
        supply_window("s1", 0, "GenuineIntel", "old"),
        supply_window("s2", 0, "GenuineIntel", "old"),
        supply_window("s3", 0, "AuthenticAMD", "new"),
    ];
    let range = Range {
        from_s: T / 3600 * 3600,
        to_s: (T + 3600).div_ceil(3600) * 3600,
        period_s: 3600,
    };
    let plan = sci_aggregator::store::StoredPlan {
        id: "migration-1".into(),
        created_unix_s: 100,
        kind: "migration".into(),
        service: "query-a".into(),
        carried_out_unix_s: None,
        body: "{\"x\":1}".into(),
    };
    let read = |store: &dyn Store| {
        store.commit(&windows).unwrap();
        store.save_plan(&plan).unwrap();
        store
            .save_plan(&sci_aggregator::store::StoredPlan {
                carried_out_unix_s: Some(200),
                ..plan.clone()
            })
            .unwrap();
        serde_json::json!({
            "periods": store.supply_periods(&range).unwrap(),
            "services": store.supply_service_periods(&range, Some("query-a")).unwrap(),
            "by_pool": store.supply_groups(&range, "label.pool").unwrap(),
            "by_vendor": store.supply_groups(&range, "cpu_vendor").unwrap(),
            "attrs": store.supply_attrs().unwrap(),
            "plans": store.plans().unwrap(),
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    let a = read(&sqlite);
    // By hand: the Intel pool has two hosts of 2 CPUs for its share of the
    // hour; query-a served 3/4 of each host's 30 query transactions.
    let old = &a["by_pool"].as_array().unwrap()[1];
    assert_eq!(old["supply"], "old");
    let seconds = (range.to_s.min(T + 3600) - T) as f64;
    assert!(close(old["host_s"].as_f64().unwrap(), 2.0 * seconds));
    assert!(close(
        old["capacity_cpu_ns"].as_f64().unwrap(),
        2.0 * 2.0 * seconds * 1e9
    ));
    let served: f64 = a["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["transactions"].as_f64().unwrap())
        .sum();
    assert!(
        close(served, 3.0 * 30.0 * 0.75 * seconds / 3600.0),
        "{served}"
    );
    assert_eq!(a["plans"][0]["carried_out_unix_s"], 200);
    assert!(a["attrs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["attr"] == "label.pool" && r["value"] == "new"));

    let Some(server) =
        ScratchPostgres::start_or_skip("supply_rollups_and_plans_agree_in_both_stores")
    else {
        return;
    };
    let pg = postgres_store(&server, "supplies");
    let b = read(&pg);
    assert_same(&a, &b, "supplies");
}

/// Retention of `supply_attrs` and `plans` (#27), on both stores: a
/// supply's attributes go when its last rollup row does, a plan when its
/// creation and its carrying out are both before the rollup cutoff.
#[test]
fn retention_removes_old_supplies_and_plans() {
    const DAY: u64 = 86_400;
    let retention = Retention {
        raw: Duration::from_secs(7 * DAY),
        keys: Duration::from_secs(7 * DAY),
        rollups: Duration::from_secs(400 * DAY),
    };
    // Supply "old" (host s1) ran at T only; supply "new" (host s2) at T and
    // again 300 days later, so it keeps rows past the first cutoff.
    let mut late = supply_window("s2", 1, "AuthenticAMD", "new");
    late.start_unix_ns += 300 * DAY * 1_000_000_000;
    late.end_unix_ns += 300 * DAY * 1_000_000_000;
    let windows = [
        supply_window("s1", 0, "GenuineIntel", "old"),
        supply_window("s2", 0, "AuthenticAMD", "new"),
        late,
    ];
    let plan = |id: &str, created: u64, carried: Option<u64>| sci_aggregator::store::StoredPlan {
        id: id.into(),
        created_unix_s: created,
        kind: "migration".into(),
        service: "query-a".into(),
        carried_out_unix_s: carried,
        body: "{}".into(),
    };
    let check = |store: &dyn Store| {
        store.commit(&windows).unwrap();
        for p in [
            plan("old", T, None),
            plan("carried-late", T, Some(T + 300 * DAY)),
            plan("new", T + 300 * DAY, None),
        ] {
            store.save_plan(&p).unwrap();
        }
        // 7 attributes and one label each.
        assert_eq!(store.supply_attrs().unwrap().len(), 2 * 8);
        // Cutoff T + 1 day: supply "old" has no rollup row left; "new" has.
        let expired = store.expire(T + 401 * DAY, &retention).unwrap();
        assert_eq!(expired.supply_attrs, 8, "{expired:?}");
        assert_eq!(expired.plans, 1, "{expired:?}");
        let attrs = store.supply_attrs().unwrap();
        assert_eq!(attrs.len(), 8);
        assert!(
            attrs.iter().all(|a| a.supply.ends_with("pool=new")),
            "{attrs:?}"
        );
        let kept: Vec<String> = store.plans().unwrap().into_iter().map(|p| p.id).collect();
        assert_eq!(kept, vec!["new".to_string(), "carried-late".to_string()]);
        // Again at the same time: nothing more.
        let again = store.expire(T + 401 * DAY, &retention).unwrap();
        assert_eq!((again.supply_attrs, again.plans), (0, 0), "{again:?}");
        // Past the late rows' and plans' cutoff: everything goes.
        let last = store.expire(T + 702 * DAY, &retention).unwrap();
        assert_eq!((last.supply_attrs, last.plans), (8, 2), "{last:?}");
        assert!(store.supply_attrs().unwrap().is_empty());
        assert!(store.plans().unwrap().is_empty());
        assert_eq!(
            last.kinds().iter().find(|k| k.0 == "plans").map(|k| k.1),
            Some(2)
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
            .unwrap();
    check(&sqlite);
    let Some(server) = ScratchPostgres::start_or_skip("retention_removes_old_supplies_and_plans")
    else {
        return;
    };
    check(&postgres_store(&server, "supply_retention"));
}
