//! `sci-aggregator change-rollup-steps` on a SQLite file and on a real
//! scratch PostgreSQL 15: a store of known windows at 1 min changed to
//! 5 min (raw windows expired first, so only the re-bucketing can do it)
//! holds exactly the rollups of a store built at 5 min from the same
//! windows (every row of every rollup table, 1e-9) and gives the
//! hand-computed O, M, R and SCI per 5-min and 1-hour period; a change to
//! finer steps with the raw windows held equals a store built at them; a
//! step that is not a multiple, without the raw windows, is refused naming
//! why, and with `--drop-older` drops exactly the rows it reports; a store
//! an aggregator has open is refused.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sci_aggregator::config::standard_weights;
use sci_aggregator::sci::{evaluate_store, Evaluation};
use sci_aggregator::store::postgres::PostgresStore;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{Backend, CommitOutcome, Range, Retention, RollupLayout, Store, Value};
use sci_proto::v1;
use sci_tests::fleet::{service_window, Aggregator, HostShape, ServiceLoad};
use sci_tests::postgres::ScratchPostgres;

/// A day boundary well in the past.
const T: u64 = 1_764_000_000 / 86_400 * 86_400;
/// Three hours of windows.
const SPAN_S: u64 = 3 * 3600;

const AT_1M: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
const AT_5M: RollupLayout = RollupLayout {
    step_s: 300,
    host_step_s: 3600,
};

/// Every rollup table (aggregator/src/store/tables.rs).
const TABLES: [&str; 18] = [
    "fleet_rollup",
    "scenario_rollup",
    "host_rollup",
    "service_rollup",
    "profile_rollup",
    "fleet_rollup_h",
    "scenario_rollup_h",
    "host_rollup_d",
    "service_rollup_d",
    "profile_rollup_d",
    "request_cpu_rollup",
    "request_cpu_total_rollup",
    "host_service_rollup",
    "supply_rollup",
    "supply_service_rollup",
    "service_rollup_m",
    "supply_rollup_d",
    "supply_service_rollup_d",
];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// Two hosts over three hours: host-a (a supply) in 90 s windows, host-b
/// in 210 s windows, so windows straddle minutes, 5-min buckets and hours;
/// two services, profile stacks and request histograms in each.
fn windows() -> Vec<v1::WindowReport> {
    let mut out = Vec::new();
    for (host, length_s, supply) in [("host-a", 90u64, true), ("host-b", 210, false)] {
        let shape = HostShape {
            host: host.into(),
            datacenter: "dc-east".into(),
            cpus: 4,
            intensity_g_per_kwh: 530.6,
            pue: 1.25,
            background_cpu_ns_per_s: 20_000_000,
            idle_power_w: 12.0,
            supply: supply.then(|| v1::ResourceSupply {
                cpu_model: "EPYC test".into(),
                logical_cpus: 4,
                machine_kind: "vm".into(),
                ..Default::default()
            }),
        };
        for seq in 0..SPAN_S / length_s {
            let k = seq as f64;
            let loads = [
                ServiceLoad {
                    service: "loans-api",
                    scenario: "credit",
                    transactions: 1 + seq % 4,
                    cpu_ns: 40_000_000 + seq * 1_000_000,
                    energy_j: 30.0 + 0.5 * k,
                    embodied_g: 0.02 + 0.001 * k,
                },
                ServiceLoad {
                    service: "ledger",
                    scenario: "query",
                    transactions: 3 + seq % 5,
                    cpu_ns: 10_000_000,
                    energy_j: 8.0 + 0.25 * k,
                    embodied_g: 0.01,
                },
            ];
            let mut w = service_window(
                &shape,
                &format!("{host}-inst"),
                seq,
                T + seq * length_s,
                length_s,
                &loads,
            );
            w.profile = vec![v1::ProfileStack {
                service: "loans-api".into(),
                scenario: "credit".into(),
                stack: format!("main;score;{}", seq % 3),
                samples: 10 + seq,
                energy_j: 1.5,
                ..Default::default()
            }];
            let mut counts = vec![0u64; 40];
            counts[(seq % 40) as usize] = 2 + seq % 3;
            w.request_cpu = vec![v1::RequestCpuHistogram {
                service: "loans-api".into(),
                scenario: "credit".into(),
                counts,
                sum_cpu_ns: 7_000_000 + seq,
                energy_j_per_cpu_ns: 2e-9,
                sub_bucket_bits: agent_common::REQUEST_CPU_SUB_BUCKET_BITS,
            }];
            out.push(w);
        }
    }
    out
}

/// O, M and R of each period of `period_s` from T by hand: each window's
/// figures in proportion to its time in the period, R with the standard
/// weights (credit 24, query 1).
fn by_hand(period_s: u64) -> Vec<(f64, f64, f64)> {
    let mut out = vec![(0.0, 0.0, 0.0); (SPAN_S / period_s) as usize];
    for w in windows() {
        let (start, end) = (
            w.start_unix_ns / 1_000_000_000,
            w.end_unix_ns / 1_000_000_000,
        );
        for (j, p) in out.iter_mut().enumerate() {
            let (a, b) = (T + j as u64 * period_s, T + (j as u64 + 1) * period_s);
            let overlap = end.min(b).saturating_sub(start.max(a)) as f64;
            let share = overlap / (end - start) as f64;
            let r: f64 = w
                .scenarios
                .iter()
                .map(|s| s.transactions as f64 * if s.scenario == "credit" { 24.0 } else { 1.0 })
                .sum();
            p.0 += share * w.host_carbon_g;
            p.1 += share * w.host_embodied_g;
            p.2 += share * r;
        }
    }
    out
}

/// Host-seconds of data in each period of `period_s` from T.
fn covered_s(period_s: u64) -> Vec<f64> {
    let mut out = vec![0.0; (SPAN_S / period_s) as usize];
    for w in windows() {
        let (start, end) = (
            w.start_unix_ns / 1_000_000_000,
            w.end_unix_ns / 1_000_000_000,
        );
        for (j, c) in out.iter_mut().enumerate() {
            let (a, b) = (T + j as u64 * period_s, T + (j as u64 + 1) * period_s);
            *c += end.min(b).saturating_sub(start.max(a)) as f64;
        }
    }
    out
}

enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Db {
    fn arg(&self) -> String {
        match self {
            Db::Sqlite(p) => format!("sqlite:{}", p.display()),
            Db::Postgres(url) => url.clone(),
        }
    }
    /// Runs `f` on the store opened at `layout` (closed afterwards).
    fn with<R>(&self, layout: RollupLayout, f: impl FnOnce(&dyn Store, &dyn Backend) -> R) -> R {
        match self {
            Db::Sqlite(p) => {
                let s = SqliteStore::open_with(p, layout, Duration::from_secs(60)).unwrap();
                f(&s, &s)
            }
            Db::Postgres(url) => {
                let s = PostgresStore::open(url, layout, 2, Duration::from_secs(60)).unwrap();
                f(&s, &s)
            }
        }
    }
    fn build(&self, layout: RollupLayout) {
        self.with(layout, |store, _| {
            let outcomes = store.commit(&windows()).unwrap();
            assert!(outcomes.iter().all(|o| *o == CommitOutcome::Stored));
        });
    }
}

fn change(db: &Db, args: &[&str]) -> std::process::Output {
    std::process::Command::new(sci_tests::cargo_bin("sci-aggregator", "sci-aggregator"))
        .args(["change-rollup-steps", "--db", &db.arg()])
        .args(args)
        .output()
        .unwrap()
}

fn changed(db: &Db, args: &[&str]) -> serde_json::Value {
    let out = change(db, args);
    assert!(
        out.status.success(),
        "change-rollup-steps {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every row of every rollup table: keys (integers and texts) to sums.
type Rows = BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<f64>>>;

fn rollups(backend: &dyn Backend) -> Rows {
    let mut out = Rows::new();
    for table in TABLES {
        let mut rows = BTreeMap::new();
        for row in backend
            .read(&format!("SELECT * FROM {table}"), &[])
            .unwrap()
        {
            let (mut keys, mut sums) = (Vec::new(), Vec::new());
            for v in row {
                match v {
                    Value::Real(r) => sums.push(r),
                    Value::Int(i) => keys.push(i.to_string()),
                    Value::Text(t) => keys.push(t),
                    other => panic!("{table}: {other:?}"),
                }
            }
            assert!(rows.insert(keys, sums).is_none(), "{table}: a key twice");
        }
        out.insert(table, rows);
    }
    out
}

fn assert_same_rollups(got: &Rows, want: &Rows, what: &str) {
    for table in TABLES {
        let (g, w) = (&got[table], &want[table]);
        assert!(!w.is_empty(), "{what}: the reference has no {table} rows");
        assert_eq!(
            g.keys().collect::<Vec<_>>(),
            w.keys().collect::<Vec<_>>(),
            "{what}: {table} keys"
        );
        for (key, sums) in w {
            for (i, (a, b)) in g[key].iter().zip(sums).enumerate() {
                assert!(close(*a, *b), "{what}: {table} {key:?} sum {i}: {a} vs {b}");
            }
        }
    }
}

fn evaluate(store: &dyn Store, period_s: u64) -> Evaluation {
    let range = Range::new(T, T + SPAN_S, period_s, &store.layout()).unwrap();
    evaluate_store(store, &range, &standard_weights(), 0.0).unwrap()
}

fn check_by_hand(e: &Evaluation, period_s: u64, what: &str) {
    let hand = by_hand(period_s);
    assert_eq!(
        e.periods.len(),
        hand.len(),
        "{what}: periods of {period_s} s"
    );
    for (j, (p, (o, m, r))) in e.periods.iter().zip(&hand).enumerate() {
        assert_eq!(p.start_unix_s, T + j as u64 * period_s);
        assert!(
            close(p.operational_g, *o),
            "{what} O_{j}: {} vs {o}",
            p.operational_g
        );
        assert!(
            close(p.embodied_g, *m),
            "{what} M_{j}: {} vs {m}",
            p.embodied_g
        );
        assert!(
            close(p.business_units, *r),
            "{what} R_{j}: {} vs {r}",
            p.business_units
        );
        assert!(
            close(p.sci_g_per_unit.unwrap(), (o + m) / r),
            "{what} SCI_{j}"
        );
    }
}

fn assert_same_evaluation(a: &Evaluation, b: &Evaluation, what: &str) {
    assert_eq!(a.periods.len(), b.periods.len(), "{what}");
    for (x, y) in a.periods.iter().zip(&b.periods) {
        assert_eq!(
            x.windows, y.windows,
            "{what}: windows ending in {}",
            x.start_unix_s
        );
        assert_eq!(x.hosts, y.hosts, "{what}");
        for (u, v) in [
            (x.operational_g, y.operational_g),
            (x.embodied_g, y.embodied_g),
            (x.business_units, y.business_units),
            (x.energy_j, y.energy_j),
            (x.host_seconds, y.host_seconds),
        ] {
            assert!(close(u, v), "{what} at {}: {u} vs {v}", x.start_unix_s);
        }
    }
    assert!(
        close(a.sci_cf_mean.unwrap(), b.sci_cf_mean.unwrap()),
        "{what}: mean"
    );
}

/// 1 min to 5 min with the raw windows expired: re-bucketed, exact.
fn coarser(db: &Db, reference: &Db) {
    db.build(AT_1M);
    reference.build(AT_5M);
    // Eight days on with a week of raw windows: none is left to rebuild from.
    let retention = Retention {
        raw: Duration::from_secs(7 * 86_400),
        keys: Duration::from_secs(7 * 86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    db.with(AT_1M, |store, backend| {
        // 90 s past a day: the marker of the per-minute service table is not
        // on a 5-min boundary.
        store.expire(T + 8 * 86_400 + 90, &retention).unwrap();
        let raw = backend
            .read("SELECT COUNT(*) FROM windows_raw", &[])
            .unwrap();
        assert_eq!(raw[0][0], Value::Int(0), "raw windows left");
    });
    let report = changed(db, &["--rollup-step", "5m"]);
    assert_eq!(report["raw_windows_replayed"], 0, "{report}");
    for (table, how) in [
        ("fleet_rollup", "rebucketed"),
        ("scenario_rollup", "rebucketed"),
    ] {
        assert_eq!(report["tables"][table]["how"], how, "{report}");
    }
    // Only base-step tables changed: the host step stayed 1 h.
    assert!(report["tables"].get("host_rollup").is_none(), "{report}");
    let want = reference.with(AT_5M, |store, backend| {
        (
            rollups(backend),
            evaluate(store, 300),
            evaluate(store, 3600),
        )
    });
    db.with(AT_5M, |store, backend| {
        // service_rollup_m holds whole 5-min buckets from the next boundary on.
        let marker = backend
            .read(
                "SELECT value FROM meta WHERE key = 'service_rollup_m_from_s'",
                &[],
            )
            .unwrap();
        assert_eq!(marker[0][0], Value::Text((T + 86_400 + 300).to_string()));
        let mut got = rollups(backend);
        // service_rollup_m was emptied by the raw retention (as in any store past it).
        assert!(got["service_rollup_m"].is_empty());
        got.insert("service_rollup_m", want.0["service_rollup_m"].clone());
        assert_same_rollups(&got, &want.0, "1 min -> 5 min");
        for (period_s, reference) in [(300, &want.1), (3600, &want.2)] {
            let e = evaluate(store, period_s);
            check_by_hand(&e, period_s, "changed store");
            assert_same_evaluation(&e, reference, "changed vs built at 5 min");
        }
        check_by_hand(&want.1, 300, "built at 5 min");
        // A period that is not a multiple of the new step: refused as always.
        let err = Range::new(T, T + SPAN_S, 120, &store.layout()).unwrap_err();
        assert!(
            err.contains("not a multiple of the rollup step 300 s"),
            "{err}"
        );
    });
    // A real sci-aggregator on the changed store, configured at 5 min:
    // /api/v1/sci gives the hand figures per 5-min and 1-hour period.
    let dir = tempfile::tempdir().unwrap();
    let (agg_dir, database) = match db {
        Db::Sqlite(p) => (p.parent().unwrap(), String::new()),
        Db::Postgres(url) => (dir.path(), format!("postgres_url = \"{url}\"\n")),
    };
    let agg = Aggregator::start(
        agg_dir,
        300,
        &format!("{database}rollup_step = \"5m\"\n"),
        true,
    );
    for period_s in [300, 3600] {
        let sci = agg.sci(T, T + SPAN_S, period_s);
        let periods = sci["periods"].as_array().unwrap();
        let hand = by_hand(period_s);
        assert_eq!(
            periods.len(),
            hand.len(),
            "/api/v1/sci periods of {period_s} s"
        );
        for (j, (p, (o, m, r))) in periods.iter().zip(&hand).enumerate() {
            let got = |k: &str| p[k].as_f64().unwrap();
            assert!(
                close(got("operational_g"), *o),
                "/api/v1/sci O_{j} at {period_s} s"
            );
            assert!(
                close(got("embodied_g"), *m),
                "/api/v1/sci M_{j} at {period_s} s"
            );
            assert!(
                close(got("business_units"), *r),
                "/api/v1/sci R_{j} at {period_s} s"
            );
        }
        // The mean leaves out periods below 90% coverage (of 2 hosts).
        let in_mean: Vec<f64> = hand
            .iter()
            .zip(covered_s(period_s))
            .filter(|(_, c)| *c >= 0.9 * 2.0 * period_s as f64)
            .map(|((o, m, r), _)| (o + m) / r)
            .collect();
        assert!(in_mean.len() < hand.len() || period_s == 3600);
        let mean = in_mean.iter().sum::<f64>() / in_mean.len() as f64;
        let got = sci["sci_cf_mean"].as_f64().unwrap();
        assert!(
            close(got, mean),
            "/api/v1/sci SCI_CF at {period_s} s: {got} vs {mean}"
        );
    }
    drop(agg);
    // The old steps are refused from now on, naming both.
    let err = match db {
        Db::Sqlite(p) => SqliteStore::open_with(p, AT_1M, Duration::from_secs(5)).err(),
        Db::Postgres(url) => PostgresStore::open(url, AT_1M, 1, Duration::from_secs(5)).err(),
    }
    .unwrap()
    .to_string();
    assert!(err.contains("rollup_step 300 s"), "{err}");
}

/// `db` built at `from` and changed by `args`, `reference` built at `to`:
/// every rollup row alike; the report.
fn changed_like_built(
    db: &Db,
    reference: &Db,
    from: RollupLayout,
    to: RollupLayout,
    args: &[&str],
) -> serde_json::Value {
    db.build(from);
    reference.build(to);
    let report = changed(db, args);
    let want = reference.with(to, |_, backend| rollups(backend));
    db.with(to, |_, backend| {
        assert_same_rollups(&rollups(backend), &want, &format!("{args:?}"))
    });
    report
}

/// 5 min / 1 h to 1 min / 30 min with the raw windows held: rebuilt.
fn finer(db: &Db, reference: &Db) {
    let to = RollupLayout {
        step_s: 60,
        host_step_s: 1800,
    };
    let args = ["--rollup-step", "1m", "--host-rollup-step", "30m"];
    let report = changed_like_built(db, reference, AT_5M, to, &args);
    let replayed = report["raw_windows_replayed"].as_u64().unwrap();
    assert_eq!(replayed as usize, windows().len());
    assert_eq!(report["rebuilt_from_s"], 0, "{report}");
    assert_eq!(report["tables"]["host_rollup"]["how"], "rebuilt");
    assert!(report["tables"].get("host_rollup_d").is_none(), "{report}");
    let want = reference.with(to, |store, _| evaluate(store, 60));
    db.with(to, |store, _| {
        let e = evaluate(store, 60);
        check_by_hand(&e, 60, "rebuilt at 1 min");
        assert_same_evaluation(&e, &want, "rebuilt vs built at 1 min");
    });
}

/// Both at once: 1 min to 5 min (re-bucketed) and 1 h to 30 min (rebuilt).
fn mixed(db: &Db, reference: &Db) {
    let to = RollupLayout {
        step_s: 300,
        host_step_s: 1800,
    };
    let args = ["--rollup-step", "5m", "--host-rollup-step", "30m"];
    let report = changed_like_built(db, reference, AT_1M, to, &args);
    assert_eq!(report["tables"]["fleet_rollup"]["how"], "rebucketed");
    assert_eq!(report["tables"]["fleet_rollup_h"]["how"], "rebuilt");
    db.with(to, |store, _| {
        check_by_hand(&evaluate(store, 1800), 1800, "mixed change")
    });
}

/// 1 min to 90 s without raw windows: refused; with --drop-older, the
/// rows it reports are gone and the hourly figures stay.
fn not_a_multiple(db: &Db) {
    db.build(AT_1M);
    let retention = Retention {
        raw: Duration::from_secs(86_400),
        keys: Duration::from_secs(86_400),
        rollups: Duration::from_secs(400 * 86_400),
    };
    let base_rows = db.with(AT_1M, |store, backend| {
        store.expire(T + 3 * 86_400, &retention).unwrap();
        let r = rollups(backend);
        r["fleet_rollup"].len() + r["scenario_rollup"].len() + r["service_rollup_m"].len()
    });
    let out = change(db, &["--rollup-step", "90s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let raw_from = T + 2 * 86_400;
    for needle in [
        format!("raw windows are held only from unix second {raw_from}"),
        format!("{base_rows} rows of fleet_rollup, scenario_rollup"),
        "whole multiple".to_string(),
        "--drop-older".to_string(),
    ] {
        assert!(err.contains(&needle), "{needle}: {err}");
    }
    // Nothing changed.
    db.with(AT_1M, |store, _| {
        check_by_hand(&evaluate(store, 300), 300, "after the refusal")
    });

    let report = changed(db, &["--rollup-step", "90s", "--drop-older"]);
    let dropped: u64 = report["tables"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["rows_dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped as usize, base_rows, "{report}");
    assert_eq!(report["dropped_buckets_s"][0], T, "{report}");
    let to = RollupLayout {
        step_s: 90,
        host_step_s: 3600,
    };
    db.with(to, |store, backend| {
        let r = rollups(backend);
        assert!(r["fleet_rollup"].is_empty() && r["scenario_rollup"].is_empty());
        // Periods of whole hours read the hourly tables, which kept their step.
        check_by_hand(&evaluate(store, 3600), 3600, "hourly after the drop");
    });
}

/// Refused while an aggregator (SQLite: a real one; PostgreSQL: a store's
/// sessions) has the store open; nothing changed.
fn refused_while_open(db: &Db) {
    db.build(AT_1M);
    let err = match db {
        Db::Sqlite(p) => {
            let _agg = Aggregator::start(p.parent().unwrap(), 60, "", true);
            let out = change(db, &["--rollup-step", "5m"]);
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
        Db::Postgres(_) => db.with(AT_1M, |_, _| {
            let out = change(db, &["--rollup-step", "5m"]);
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }),
    };
    let needle = match db {
        Db::Sqlite(_) => "has the database open (an aggregator?): stop it first",
        Db::Postgres(_) => "session(s) are connected to the database",
    };
    assert!(err.contains(needle), "{err}");
    db.with(AT_1M, |store, _| {
        check_by_hand(&evaluate(store, 60), 60, "after the refusal")
    });
}

#[test]
fn change_rollup_steps_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = |name: &str| Db::Sqlite(dir.path().join(name).join("sci.db"));
    coarser(&db("coarser"), &db("at-5m"));
    finer(&db("finer"), &db("at-1m-30m"));
    mixed(&db("mixed"), &db("at_5m_30m"));
    not_a_multiple(&db("odd"));
    refused_while_open(&db("held"));
}

#[test]
fn change_rollup_steps_on_postgres() {
    let Some(pg) = ScratchPostgres::start_or_skip("change_rollup_steps_on_postgres") else {
        return;
    };
    let db = |name: &str| Db::Postgres(pg.create_database(name).unwrap());
    coarser(&db("coarser"), &db("at_5m"));
    finer(&db("finer"), &db("at_1m_30m"));
    mixed(&db("mixed"), &db("at_5m_30m"));
    not_a_multiple(&db("odd"));
    refused_while_open(&db("held"));
}
