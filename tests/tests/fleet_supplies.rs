//! Resource supplies and selection (#27, standard 7.4) over the real
//! ingest: a real `sci-aggregator` (SQLite), the agent's real spool and
//! forwarder over gRPC on loopback, synthetic hourly windows of two days
//! from three hosts on two supplies:
//! - supply A (dc-1: 500 g/kWh, PUE 1.2): hosts a1, a2, Intel, 4 CPUs,
//!   pool=old; credit-svc at 2.0 J and 4 s of CPU per credit transaction;
//! - supply B (dc-2: 400 g/kWh, PUE 1.3): host b1, AMD, 8 CPUs, pool=new,
//!   4 cores of background load; credit-svc at 1.4 J and 3 s per transaction;
//! - query-svc on both at the same carbon per transaction up to +-5% noise.
//!
//! The figures are checked against hand computations from the windows sent:
//! the grouping by attribute, the ranking with the hardware/grid split, the
//! migration plan's predicted saving and its capacity check (fits at 90%
//! utilisation of B, refused at 60%), and no recommendation for query-svc.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_proto::v1;
use sci_tests::fleet::{
    http_get, http_post, now_s, service_window, Agent, Aggregator, HostShape, ServiceLoad,
};

pub const DAY: u64 = 86_400;

fn supply(vendor: &str, model: &str, cpus: u32, pool: &str) -> v1::ResourceSupply {
    v1::ResourceSupply {
        cpu_model: model.into(),
        cpu_vendor: vendor.into(),
        arch: "x86_64".into(),
        logical_cpus: cpus,
        memory_bytes: 16 << 30,
        machine_kind: "bare_metal".into(),
        physical_host_cpus: cpus,
        labels: [("pool".to_string(), pool.to_string())].into(),
    }
}

fn shape(host: &str, dc: &str, b: bool) -> HostShape {
    HostShape {
        host: host.into(),
        datacenter: dc.into(),
        cpus: if b { 8 } else { 4 },
        intensity_g_per_kwh: if b { 400.0 } else { 500.0 },
        pue: if b { 1.3 } else { 1.2 },
        background_cpu_ns_per_s: if b { 4_000_000_000 } else { 0 },
        idle_power_w: 50.0,
        supply: Some(if b {
            supply("AuthenticAMD", "AMD EPYC 9654", 8, "new")
        } else {
            supply("GenuineIntel", "Intel Xeon Gold 6148", 4, "old")
        }),
    }
}

const KEY_A: &str = "x86_64 Intel Xeon Gold 6148, 4 CPUs, 16 GiB, bare_metal | pool=old";
const KEY_B: &str = "x86_64 AMD EPYC 9654, 8 CPUs, 16 GiB, bare_metal | pool=new";

/// One hour's loads of a host.
struct Hour {
    credit: ServiceLoad<'static>,
    query: ServiceLoad<'static>,
}

/// The fleet's windows, hour h of 48, per host.
fn hour(host: &str, h: u64) -> Hour {
    let b = host == "b1";
    let noise = 1.0 + 0.02 * ((h % 5) as f64 - 2.0);
    let credit_txn = if b {
        300 + 30 * (h % 3)
    } else {
        600 + 60 * (h % 4)
    };
    let (e_per_txn, cpu_per_txn) = if b { (1.4, 3e9) } else { (2.0, 4e9) };
    // query: the same grams per transaction everywhere (0.001 g at the
    // plug + 0.0001 g embodied), +-5% noise with a pattern per host.
    let k = if b { 400.0 * 1.3 } else { 500.0 * 1.2 } / 3.6e6;
    let phase = if b { 1 } else { 0 };
    let qnoise = 1.0
        + 0.05
            * if (h + phase).is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
    let query_txn = 1000 + 10 * (h % 7);
    Hour {
        credit: ServiceLoad {
            service: "credit-svc",
            scenario: "credit",
            transactions: credit_txn,
            cpu_ns: (credit_txn as f64 * cpu_per_txn) as u64,
            energy_j: credit_txn as f64 * e_per_txn * noise,
            embodied_g: credit_txn as f64 * 0.0002,
        },
        query: ServiceLoad {
            service: "query-svc",
            scenario: "query",
            transactions: query_txn,
            cpu_ns: query_txn * 1_000_000,
            energy_j: query_txn as f64 * 0.001 * qnoise / k,
            embodied_g: query_txn as f64 * 0.0001,
        },
    }
}

struct Fleet {
    agg: Aggregator,
    base: u64,
    _dir: tempfile::TempDir,
}

/// Starts the aggregator and sends two days of hourly windows from the three hosts.
async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, "", true);
    let base = (now_s() / DAY - 2) * DAY;
    let cfg = AggregatorConfig {
        url: Some(agg.url()),
        max_backoff: Duration::from_millis(500),
        batch_windows: 64,
        ..Default::default()
    };
    for (host, dc, b) in [
        ("a1", "dc-1", false),
        ("a2", "dc-1", false),
        ("b1", "dc-2", true),
    ] {
        let agent = Agent::start(&dir.path().join(host), cfg.clone(), &format!("inst-{host}"));
        let s = shape(host, dc, b);
        for h in 0..48 {
            let hr = hour(host, h);
            agent.push(&service_window(
                &s,
                &format!("inst-{host}"),
                h,
                base + h * 3600,
                3600,
                &[hr.credit, hr.query],
            ));
        }
        agent.drained(Duration::from_secs(60)).await;
    }
    assert_eq!(agg.windows_ingested("accepted"), 144);
    Fleet {
        agg,
        base,
        _dir: dir,
    }
}

fn get_json(agg: &Aggregator, path: &str) -> serde_json::Value {
    let (status, body) = http_get(agg.http_port, path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
}

/// (sum of g, sum of J, sum of CPU ns, sum of transactions) of credit-svc on `hosts`.
fn credit_sums(hosts: &[&str]) -> (f64, f64, f64, f64) {
    let mut out = (0.0, 0.0, 0.0, 0.0);
    for host in hosts {
        let b = *host == "b1";
        let k = if b { 400.0 * 1.3 } else { 500.0 * 1.2 } / 3.6e6;
        for h in 0..48 {
            let c = hour(host, h).credit;
            out.0 += c.energy_j * k + c.embodied_g;
            out.1 += c.energy_j;
            out.2 += c.cpu_ns as f64;
            out.3 += c.transactions as f64;
        }
    }
    out
}

fn f(v: &serde_json::Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(|x| x.as_f64())
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplies_are_grouped_ranked_and_planned_against_hand_computations() {
    let fl = fleet().await;
    let (agg, base) = (&fl.agg, fl.base);
    let range = format!("from={base}&to={}", base + 2 * DAY);

    // 1. Grouping by any attribute, from the rollups.
    let by_vendor = get_json(
        agg,
        &format!("/api/v1/supplies?{range}&group_by=cpu_vendor"),
    );
    let groups: BTreeMap<String, &serde_json::Value> = by_vendor["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["value"].as_str().unwrap().to_string(), g))
        .collect();
    assert_eq!(groups.len(), 2, "{by_vendor}");
    assert!(close(f(groups["GenuineIntel"], "/host_hours"), 96.0, 1e-9));
    assert!(close(f(groups["AuthenticAMD"], "/host_hours"), 48.0, 1e-9));
    let (_, _, cpu_b, _) = credit_sums(&["b1"]);
    let busy_b = cpu_b + 48.0 * 3600.0 * 4e9;
    let query_cpu_b: f64 = (0..48).map(|h| hour("b1", h).query.cpu_ns as f64).sum();
    assert!(close(
        f(groups["AuthenticAMD"], "/utilisation"),
        (busy_b + query_cpu_b) / (48.0 * 3600.0 * 8e9),
        1e-9
    ));
    let by_pool = get_json(
        agg,
        &format!("/api/v1/supplies?{range}&group_by=label.pool"),
    );
    let pools: Vec<&str> = by_pool["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["value"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["new", "old"]);
    let (status, body) = http_get(
        agg.http_port,
        &format!("/api/v1/supplies?{range}&group_by=colour"),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("group_by \"colour\""), "{body}");
    assert!(agg
        .metrics()
        .contains("sci_plan_requests_refused_total{endpoint=\"supplies\"} 1"));

    // 2. The ranking: B first, A second, with the hardware/grid split.
    let sel = get_json(
        agg,
        &format!("/api/v1/supplies/select?{range}&service=credit-svc"),
    );
    let ranking = &sel["rankings"][0];
    assert_eq!(ranking["scenario"], "credit");
    let (g_a, e_a, _, t_a) = credit_sums(&["a1", "a2"]);
    let (g_b, e_b, _, t_b) = credit_sums(&["b1"]);
    let first = &ranking["supplies"][0];
    let second = &ranking["supplies"][1];
    assert_eq!(first["supply"]["supply"], KEY_B);
    assert_eq!(second["supply"]["supply"], KEY_A);
    assert!(close(
        f(first, "/g_per_transaction/candidate"),
        g_b / t_b,
        1e-9
    ));
    assert!(close(
        f(second, "/g_per_transaction/candidate"),
        g_a / t_a,
        1e-9
    ));
    assert_eq!(second["vs_cheapest"]["verdict"], "higher");
    assert!(close(f(first, "/factors/intensity_g_per_kwh"), 400.0, 1e-9));
    assert!(close(f(second, "/factors/pue"), 1.2, 1e-9));
    // Hardware: (E_A - E_B) k_B; grid: E_A (k_A - k_B) (the cheapest, B, is the reference).
    let (k_a, k_b) = (500.0 * 1.2 / 3.6e6, 400.0 * 1.3 / 3.6e6);
    let (ea, eb) = (e_a / t_a, e_b / t_b);
    assert!(close(
        f(second, "/hardware_g_per_transaction"),
        (ea - eb) * k_b,
        1e-9
    ));
    assert!(close(
        f(second, "/grid_g_per_transaction"),
        ea * (k_a - k_b),
        1e-9
    ));

    // 3. The migration plan A -> B: saving against the hand computation.
    let plan_path = |t: f64| {
        format!(
            "/api/v1/plans/migration?{range}&service=credit-svc&from_datacenter=dc-1&from_supply={}&to_datacenter=dc-2&to_supply={}&target_utilisation={t}",
            encode(KEY_A),
            encode(KEY_B)
        )
    };
    let plan = get_json(agg, &plan_path(0.9));
    let per_day = t_a / 2.0;
    let saving = per_day * (g_a / t_a - g_b / t_b);
    assert!(close(f(&plan, "/transactions_per_day"), per_day, 1e-9));
    assert!(close(f(&plan, "/predicted_saving_g_per_day"), saving, 1e-9));
    let (lo, hi) = (
        f(&plan, "/saving_ci_low_g_per_day"),
        f(&plan, "/saving_ci_high_g_per_day"),
    );
    assert!(0.0 < lo && lo < saving && saving < hi, "{lo} {saving} {hi}");
    assert_eq!(plan["recommended"], true, "{plan}");
    // Capacity by hand: hour of day h needs the most over both days of
    // A's credit CPU x (3 s / 4 s); B has 90% of 8 cores less its busy CPU, the least.
    let hours = plan["capacity"]["hours"].as_array().unwrap();
    assert_eq!(hours.len(), 24);
    for hc in hours {
        let hod = hc["hour"].as_u64().unwrap();
        let mut need: f64 = 0.0;
        let mut free = f64::INFINITY;
        for day in 0..2 {
            let h = day * 24 + hod;
            let cpu_a: f64 = ["a1", "a2"]
                .iter()
                .map(|host| hour(host, h).credit.cpu_ns as f64)
                .sum();
            need = need.max(cpu_a * 0.75 / 3.6e12);
            let b = hour("b1", h);
            let busy = 4e9 * 3600.0 + b.credit.cpu_ns as f64 + b.query.cpu_ns as f64;
            free = free.min((0.9 * 8.0 * 3.6e12 - busy) / 3.6e12);
        }
        assert!(close(f(hc, "/needed_cores"), need, 1e-9), "{hc} {need}");
        assert!(close(f(hc, "/free_cores"), free, 1e-9), "{hc} {free}");
    }
    // At 60% B lacks the room (4.8 cores less 4 of background and its own credit).
    let tight = get_json(agg, &plan_path(0.6));
    assert_eq!(tight["capacity"]["fits"], false);
    assert_eq!(tight["recommended"], false);
    assert!(tight["verdict"]
        .as_str()
        .unwrap()
        .contains("lacks the capacity"));

    // 4. Within noise: query-svc costs the same per transaction on both.
    let query = get_json(
        agg,
        &format!(
            "/api/v1/plans/migration?{range}&service=query-svc&from_datacenter=dc-1&from_supply={}&to_datacenter=dc-2&to_supply={}&target_utilisation=0.9",
            encode(KEY_A),
            encode(KEY_B)
        ),
    );
    assert_eq!(
        query["difference_g_per_transaction"]["verdict"],
        "no_detectable_difference"
    );
    assert_eq!(query["recommended"], false);
    assert!(
        f(&query, "/saving_ci_low_g_per_day") < 0.0 && f(&query, "/saving_ci_high_g_per_day") > 0.0
    );

    // 5. A stored plan keeps its prediction.
    let (status, body) = http_post(agg.http_port, &plan_path(0.9), "").unwrap();
    assert_eq!(status, 201, "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    let plans = get_json(agg, "/api/v1/plans");
    assert_eq!(plans["plans"][0]["id"], stored["id"]);
    assert!(close(
        f(&plans["plans"][0], "/plan/predicted_saving_g_per_day"),
        saving,
        1e-9
    ));
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
