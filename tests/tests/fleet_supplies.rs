//! Resource supplies and selection (#27, standard 7.4) over the real
//! ingest: a real `sci-aggregator` (SQLite), the agent's real spool and
//! forwarder over gRPC on loopback, synthetic hourly windows of two days
//! from three hosts on two supplies:
//! - supply A (dc-1: 380 g/kWh, PUE 1.2): hosts a1, a2, Intel, 4 CPUs,
//!   pool=old; credit-svc at 2.0 J and 4 s of CPU per credit transaction;
//! - supply B (dc-2: 400 g/kWh, PUE 1.3): host b1, AMD, 8 CPUs, pool=new,
//!   4 cores of background load; credit-svc at 1.4 J and 3 s per transaction;
//! - query-svc on both at the same carbon per transaction up to +-5% noise.
//!
//! The figures are checked against hand computations from the windows sent:
//! the grouping by attribute, the ranking with the hardware/grid split, the
//! migration plan's predicted saving and its capacity check (fits at 90%
//! utilisation of B, refused at 60%), and no recommendation for query-svc;
//! then the location plan (marginal g per credit transaction per site and
//! hour, the split by measured room) and the Carbon Aware SDK-compatible
//! endpoints read by a client written against the SDK's shapes: by the grid
//! alone dc-1 is best, per credit transaction dc-2.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_proto::v1;
use sci_tests::fleet::{
    http_get, http_post, now_s, service_window, Agent, Aggregator, HostShape, ServiceLoad,
};

pub const DAY: u64 = 86_400;
/// dc-1's grid: cleaner than dc-2's (400 g/kWh at PUE 1.3), its hardware dearer.
const INTENSITY_A: f64 = 380.0;

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
        intensity_g_per_kwh: if b { 400.0 } else { INTENSITY_A },
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
    let k = if b { 400.0 * 1.3 } else { INTENSITY_A * 1.2 } / 3.6e6;
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
    fleet_with(0).await
}

/// Credit moved to B in hour `h` (after the first two days): b1 serves its
/// own and a1's and a2's transactions at B's figures per transaction.
fn moved_credit(h: u64) -> ServiceLoad<'static> {
    let txn: u64 = ["a1", "a2", "b1"]
        .iter()
        .map(|host| hour(host, h).credit.transactions)
        .sum();
    let noise = 1.0 + 0.02 * ((h % 5) as f64 - 2.0);
    ServiceLoad {
        service: "credit-svc",
        scenario: "credit",
        transactions: txn,
        cpu_ns: txn * 3_000_000_000,
        energy_j: txn as f64 * 1.4 * noise,
        embodied_g: txn as f64 * 0.0002,
    }
}

/// As [`fleet`], then `moved_days` more days with credit-svc moved to B.
async fn fleet_with(moved_days: u64) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, "", true);
    let base = (now_s() / DAY - 2 - moved_days) * DAY;
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
        for h in 0..48 + 24 * moved_days {
            let hr = hour(host, h);
            let loads = match (h < 48, b) {
                (true, _) => vec![hr.credit, hr.query],
                (false, true) => vec![moved_credit(h), hr.query],
                (false, false) => vec![hr.query],
            };
            agent.push(&service_window(
                &s,
                &format!("inst-{host}"),
                h,
                base + h * 3600,
                3600,
                &loads,
            ));
        }
        agent.drained(Duration::from_secs(60)).await;
    }
    assert_eq!(agg.windows_ingested("accepted"), 3 * (48 + 24 * moved_days));
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
        let k = if b { 400.0 * 1.3 } else { INTENSITY_A * 1.2 } / 3.6e6;
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
    // The pools' week over the real HTTP API: two days are 48 hours of the
    // week; pool "old" (a1, a2 in dc-1) has 2 hosts, "new" (b1 in dc-2) 1.
    let week = get_json(agg, &format!("/api/v1/plans/consolidation?{range}"));
    let pool_hosts: Vec<(String, String, usize, f64)> = week["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let hours = p["hours"].as_array().unwrap();
            let most = hours.iter().map(|h| f(h, "/hosts")).fold(0.0, f64::max);
            (
                p["datacenter"].as_str().unwrap().to_string(),
                p["pool"].as_str().unwrap().to_string(),
                hours.len(),
                most,
            )
        })
        .collect();
    assert_eq!(
        pool_hosts,
        vec![
            ("dc-1".to_string(), "old".to_string(), 48, 2.0),
            ("dc-2".to_string(), "new".to_string(), 48, 1.0)
        ],
        "{week}"
    );
    let (status, body) = http_get(
        agg.http_port,
        &format!("/api/v1/plans/consolidation?{range}&target_utilisation=0"),
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("target_utilisation = 0"), "{body}");
    assert!(agg
        .metrics()
        .contains("sci_plan_requests_refused_total{endpoint=\"plans/consolidation\"} 1"));
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
    // A misspelt parameter is refused by name, never ignored.
    for path in [
        format!("/api/v1/supplies?{range}&groupby=pool"),
        format!("/api/v1/plans/migration?{range}&service=credit-svc&from_datacentre=dc-1"),
    ] {
        let (status, body) = http_get(agg.http_port, &path).unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains("unknown field `groupby`")
                || body.contains("unknown field `from_datacentre`"),
            "{path}: {body}"
        );
    }

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
    let (k_a, k_b) = (INTENSITY_A * 1.2 / 3.6e6, 400.0 * 1.3 / 3.6e6);
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

/// The Carbon Aware SDK's `EmissionsData` (Web API JSON), plus sci-cf's field.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmissionsData {
    location: String,
    time: String,
    rating: f64,
    duration: String,
    g_per_transaction: Option<f64>,
}

/// The SDK's forecast point and `EmissionsForecast`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ForecastPoint {
    location: String,
    timestamp: String,
    duration: u64,
    value: f64,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmissionsForecast {
    location: String,
    window_size: u64,
    data_start_at: String,
    data_end_at: String,
    optimal_data_points: Vec<ForecastPoint>,
    forecast_data: Vec<ForecastPoint>,
    #[allow(dead_code)]
    generated_at: String,
    #[allow(dead_code)]
    requested_at: String,
}

fn rfc3339(unix_s: u64) -> String {
    agent_common::time_text::format_unix_s(unix_s as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_plan_and_carbon_aware_endpoints_use_measured_per_transaction_figures() {
    let fl = fleet().await;
    let (agg, base) = (&fl.agg, fl.base);
    let from = base + 2 * DAY;
    let (g_a, e_a, _, t_a) = credit_sums(&["a1", "a2"]);
    let (_, e_b, cpu_b, t_b) = credit_sums(&["b1"]);
    let emb = 0.0002;
    let g_dc1 = e_a / t_a * INTENSITY_A * 1.2 / 3.6e6 + emb;
    let g_dc2 = e_b / t_b * 400.0 * 1.3 / 3.6e6 + emb;
    assert!((g_dc1 - g_a / t_a).abs() < 1e-12);
    assert!(g_dc2 < g_dc1);

    // The location plan: marginal g per transaction, and the split.
    let plan = get_json(
        agg,
        &format!(
            "/api/v1/plans/location?scenario=credit&from={from}&to={}",
            from + 2 * 3600
        ),
    );
    let sites: BTreeMap<String, &serde_json::Value> = plan["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["datacenter"].as_str().unwrap().to_string(), s))
        .collect();
    assert!(close(
        f(sites["dc-1"], "/hours/0/g_per_transaction"),
        g_dc1,
        1e-9
    ));
    assert!(close(
        f(sites["dc-2"], "/hours/0/g_per_transaction"),
        g_dc2,
        1e-9
    ));
    for (i, split) in plan["splits"].as_array().unwrap().iter().enumerate() {
        // Hour of day i: demand = mean over both days of all credit transactions;
        // dc-2's room = (0.6 x 8 cores - its busy CPU + its credit CPU), the least
        // of both days, over 3 s of CPU per transaction.
        let hod = i as u64;
        let demand: f64 = [hod, 24 + hod]
            .iter()
            .map(|&h| {
                ["a1", "a2", "b1"]
                    .iter()
                    .map(|host| hour(host, h).credit.transactions as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / 2.0;
        let room_b = [hod, 24 + hod]
            .iter()
            .map(|&h| {
                (0.6 * 8.0 * 3.6e12 - 4e9 * 3600.0 - hour("b1", h).query.cpu_ns as f64)
                    / (cpu_b / t_b)
            })
            .fold(f64::INFINITY, f64::min);
        assert!(
            close(f(split, "/demand_transactions"), demand, 1e-9),
            "{split}"
        );
        assert_eq!(split["split"][0][0], "dc-2");
        assert!(
            close(f(split, "/split/0/1"), room_b.min(demand), 1e-9),
            "{split} {room_b}"
        );
        assert_eq!(split["split"][1][0], "dc-1");
        assert!(close(f(split, "/split/1/1"), demand - room_b, 1e-9));
        assert!(f(split, "/unplaced_transactions").abs() < 1e-9);
    }

    // The Carbon Aware SDK's best location: by the grid, dc-1 (380 < 400).
    let time = rfc3339(from);
    let (status, body) = http_get(
        agg.http_port,
        &format!("/emissions/bylocations/best?location=dc-1&location=dc-2&time={time}"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let grid: Vec<EmissionsData> = serde_json::from_str(&body).unwrap();
    assert_eq!(grid.len(), 1);
    assert_eq!(
        (grid[0].location.as_str(), grid[0].rating),
        ("dc-1", INTENSITY_A)
    );
    assert_eq!(
        (grid[0].time.as_str(), grid[0].duration.as_str()),
        (time.as_str(), "01:00:00")
    );
    // ... per credit transaction, measured: dc-2.
    let (_, body) = http_get(
        agg.http_port,
        &format!("/emissions/bylocations/best?location=dc-1,dc-2&time={time}&scenario=credit"),
    )
    .unwrap();
    let per_txn: Vec<EmissionsData> = serde_json::from_str(&body).unwrap();
    assert_eq!(per_txn[0].location, "dc-2");
    assert!(close(per_txn[0].g_per_transaction.unwrap(), g_dc2, 1e-9));
    // The forecast: hourly points, the optimal window.
    let (status, body) = http_get(
        agg.http_port,
        &format!(
            "/emissions/forecasts/current?location=dc-2&dataStartAt={time}&dataEndAt={}&windowSize=120",
            rfc3339(from + 6 * 3600)
        ),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let forecasts: Vec<EmissionsForecast> = serde_json::from_str(&body).unwrap();
    let fc = &forecasts[0];
    assert_eq!((fc.location.as_str(), fc.window_size), ("dc-2", 120));
    assert_eq!(
        (fc.data_start_at.as_str(), fc.data_end_at.as_str()),
        (time.as_str(), rfc3339(from + 6 * 3600).as_str())
    );
    assert_eq!(fc.forecast_data.len(), 6);
    assert!(fc
        .forecast_data
        .iter()
        .all(|p| p.value == 400.0 && p.duration == 60 && p.location == "dc-2"));
    assert_eq!(fc.optimal_data_points.len(), 1);
    assert_eq!(fc.optimal_data_points[0].timestamp, time);
    assert_eq!(fc.optimal_data_points[0].duration, 120);
    let (status, body) = http_get(
        agg.http_port,
        "/emissions/forecasts/current?location=dc-2&windowSize=0",
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("windowSize"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_carried_out_is_checked_against_its_prediction() {
    let fl = fleet_with(2).await;
    let (agg, base) = (&fl.agg, fl.base);
    let path = format!(
        "/api/v1/plans/migration?from={base}&to={}&service=credit-svc&from_datacenter=dc-1&from_supply={}&to_datacenter=dc-2&to_supply={}&target_utilisation=0.9",
        base + 2 * DAY,
        encode(KEY_A),
        encode(KEY_B)
    );
    let (status, body) = http_post(agg.http_port, &path, "").unwrap();
    assert_eq!(status, 201, "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = stored["id"].as_str().unwrap().to_string();
    let predicted = f(&stored, "/plan/predicted_saving_g_per_day");

    // By hand: before (days 0-1) A and B together; after (days 2-3) all on B.
    let (g_a, _, _, t_a) = credit_sums(&["a1", "a2"]);
    let (g_b, _, _, t_b) = credit_sums(&["b1"]);
    let k_b = 400.0 * 1.3 / 3.6e6;
    let (mut g_after, mut t_after) = (0.0, 0.0);
    for h in 48..96 {
        let c = moved_credit(h);
        g_after += c.energy_j * k_b + c.embodied_g;
        t_after += c.transactions as f64;
    }
    let c_before = (g_a + g_b) / (t_a + t_b);
    let c_after = g_after / t_after;
    let realised_per_day = (c_before - c_after) * t_after / 2.0;
    let predicted_change = -predicted / ((t_a + t_b) / 2.0);
    assert!(close(predicted, t_a / 2.0 * (g_a / t_a - g_b / t_b), 1e-9));

    // Not marked: detected when credit's share on B jumps (day 2, 00:00).
    let check = get_json(
        agg,
        &format!("/api/v1/plans/{id}/check?to={}", base + 4 * DAY),
    );
    assert_eq!(
        check["carried_out_unix_s"].as_u64(),
        Some(base + 2 * DAY),
        "{check}"
    );
    assert!(check["carried_out_source"]
        .as_str()
        .unwrap()
        .starts_with("detected"));
    assert!(close(
        f(&check, "/realised_change_g_per_transaction/difference"),
        c_after - c_before,
        1e-9
    ));
    assert!(close(
        f(&check, "/realised_saving_g_per_day"),
        realised_per_day,
        1e-9
    ));
    assert!(close(
        f(&check, "/predicted_saving_g_per_day"),
        predicted,
        1e-12
    ));
    assert!(close(
        f(&check, "/predicted_change_g_per_transaction"),
        predicted_change,
        1e-9
    ));
    assert_eq!(
        check["realised_change_g_per_transaction"]["verdict"],
        "lower"
    );
    // Both with intervals, each holding its estimate.
    let (rl, rh) = (
        f(&check, "/realised_saving_ci_low_g_per_day"),
        f(&check, "/realised_saving_ci_high_g_per_day"),
    );
    assert!(rl < realised_per_day && realised_per_day < rh, "{rl} {rh}");
    let (pl, ph) = (
        f(&check, "/predicted_saving_ci_low_g_per_day"),
        f(&check, "/predicted_saving_ci_high_g_per_day"),
    );
    assert!(pl < predicted && predicted < ph, "{pl} {ph}");
    let (lo, hi) = (
        f(&check, "/realised_change_g_per_transaction/ci_low"),
        f(&check, "/realised_change_g_per_transaction/ci_high"),
    );
    assert_eq!(
        check["prediction_within_interval"].as_bool(),
        Some(lo <= predicted_change && predicted_change <= hi)
    );

    // The operator's time wins: after starts there.
    let at = base + 2 * DAY + 3600;
    let (status, body) = http_post(
        agg.http_port,
        &format!("/api/v1/plans/{id}/carried-out?at={at}"),
        "",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let check = get_json(
        agg,
        &format!("/api/v1/plans/{id}/check?to={}", base + 4 * DAY),
    );
    assert_eq!(check["carried_out_source"], "operator");
    assert_eq!(check["after_from_unix_s"].as_u64(), Some(at));
    let (status, _) = http_get(agg.http_port, "/api/v1/plans/nope/check").unwrap();
    assert_eq!(status, 404);

    // The dashboard page: ranking (B before A), the plan, its check.
    let (status, page) = http_get(
        agg.http_port,
        &format!("/dashboard/plan?from={base}&to={}", base + 2 * DAY),
    )
    .unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("credit-svc / credit"));
    let (b_at, a_at) = (
        page.find(&format!("dc-2 / {KEY_B}")).unwrap(),
        page.find(&format!("dc-1 / {KEY_A}")).unwrap(),
    );
    assert!(b_at < a_at);
    assert!(page.contains(&id));
    let realised = f(&check, "/realised_saving_g_per_day");
    assert!(
        page.contains(&sci_aggregator::figures::mass_g(realised)),
        "{page}"
    );
    assert!(page.contains(&sci_aggregator::figures::mass_g(predicted)));
    // The same as Markdown; a format it does not have is refused by name.
    let (status, md) = http_get(
        agg.http_port,
        &format!(
            "/dashboard/plan?from={base}&to={}&format=md",
            base + 2 * DAY
        ),
    )
    .unwrap();
    assert_eq!(status, 200);
    let row_b = format!("| 1 | dc-2 / {} |", KEY_B.replace('|', "\\|"));
    assert!(md.contains(&row_b), "{md}");
    assert!(
        md.contains(&format!("| {id} | migration | credit-svc |")),
        "{md}"
    );
    let (status, body) = http_get(agg.http_port, "/dashboard/plan?format=pdf").unwrap();
    assert_eq!((status, body.contains("format \"pdf\"")), (400, true));
}
