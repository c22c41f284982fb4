//! Data centres and services as an operator reads them, from a real
//! `sci-aggregator` over loopback: `/api/v1/sci?datacenter=` against a hand
//! computation per data centre, RFC 3339 and unix seconds giving the same
//! answer, unknown parameters refused with their name, a scenario with
//! transactions but no energy shown as "no energy measured" (never 0 g),
//! `/api/v1/services` with each service's hosts, and the per-data-centre
//! SCI_CF in /metrics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::Spool;
use sci_proto::v1;
use sci_tests::fleet::{carbon_g, http_get, now_s, window, Agent, Aggregator};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

fn agent(dir: &std::path::Path, url: &str, instance: &str) -> Agent {
    let spool = Spool::open(dir, 64 * 1024 * 1024, instance).unwrap();
    Agent::with_spool(
        spool,
        AggregatorConfig {
            url: Some(url.into()),
            max_backoff: Duration::from_millis(500),
            batch_windows: 16,
            ..Default::default()
        },
    )
}

/// One process per scenario record, in service `<scenario>-svc`, with the
/// record's CPU, energy and carbon (a scenario without CPU has no process).
fn processes_of(w: &v1::WindowReport) -> Vec<v1::ProcessRecord> {
    w.scenarios
        .iter()
        .enumerate()
        .filter(|(_, s)| s.cpu_ns > 0)
        .map(|(i, s)| v1::ProcessRecord {
            pid: 100 + i as u32,
            comm: format!("{}-svc", s.scenario),
            cpu_ns: s.cpu_ns,
            scenario: s.scenario.clone(),
            service: format!("{}-svc", s.scenario),
            energy_j: s.energy_j,
            carbon_g: s.carbon_g,
            embodied_g: s.embodied_g,
            ..Default::default()
        })
        .collect()
}

fn get(agg: &Aggregator, path: &str) -> (u16, String) {
    http_get(agg.http_port, path).unwrap_or_else(|| panic!("no answer from {path}"))
}

fn json(agg: &Aggregator, path: &str) -> serde_json::Value {
    let (status, body) = get(agg, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn rfc3339(unix_s: u64) -> String {
    agent_common::time_text::format_unix_s(unix_s as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenters_services_times_and_unmeasured_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 10, "", true);
    let base = (now_s() / 10 - 4) * 10;
    let a = agent(&dir.path().join("spool-a"), &agg.url(), "inst-a");
    let b = agent(&dir.path().join("spool-b"), &agg.url(), "inst-b");
    // Two 10 s periods; host-a in dc-east, host-b in dc-west. host-b's
    // credit transactions come with no energy or carbon for credit.
    let plan = [
        // (energy a, embodied a, txns a, energy b, embodied b, txns b);
        // carbon follows the energy (the fixture's intensity, PUE 1).
        (2000.0, 0.5, [1u64, 2, 3, 10], 1000.0, 0.25, [4u64, 1, 0, 5]),
        (1500.0, 0.5, [2, 0, 1, 4], 500.0, 0.25, [1, 1, 1, 1]),
    ];
    for (j, (ca, ma, ta, cb, mb, tb)) in plan.iter().enumerate() {
        let start = base + 10 * j as u64;
        let mut wa = window("host-a", "inst-a", j as u64, start, 10, *ca, *ma, *ta);
        wa.datacenter = "dc-east".into();
        let mut wb = window("host-b", "inst-b", j as u64, start, 10, *cb, *mb, *tb);
        wb.datacenter = "dc-west".into();
        for s in &mut wb.scenarios {
            if s.scenario == "credit" {
                s.energy_j = 0.0;
                s.carbon_g = 0.0;
                s.embodied_g = 0.0;
            }
        }
        for w in [&mut wa, &mut wb] {
            w.processes = processes_of(w);
        }
        a.push(&wa);
        b.push(&wb);
    }
    a.drained(Duration::from_secs(20)).await;
    b.drained(Duration::from_secs(20)).await;
    let (from, to) = (base, base + 20);
    let weights = [24.0, 7.0, 3.0, 1.0];

    // Per data centre: SCI_j by hand from that data centre's windows alone.
    for (dc, pick) in [("dc-east", 0usize), ("dc-west", 1)] {
        let e = json(
            &agg,
            &format!("/api/v1/sci?from={from}&to={to}&period=10&datacenter={dc}"),
        );
        let periods = e["periods"].as_array().unwrap();
        assert_eq!(periods.len(), 2, "{dc}: {e}");
        for (j, p) in plan.iter().enumerate() {
            let (c, m, t) = if pick == 0 {
                (carbon_g(p.0, 1.0), p.1, p.2)
            } else {
                (carbon_g(p.3, 1.0), p.4, p.5)
            };
            let r: f64 = (0..4).map(|i| weights[i] * t[i] as f64).sum();
            let got = periods[j]["sci_g_per_unit"].as_f64().unwrap();
            assert!(
                close(got, (c + m) / r),
                "{dc} SCI_{j} {got} vs {}",
                (c + m) / r
            );
            assert_eq!(periods[j]["disclosure"].as_array().unwrap().len(), 1);
            assert_eq!(periods[j]["disclosure"][0]["datacenter"], dc);
        }
        assert_eq!(e["hosts"].as_array().unwrap().len(), 1, "{dc}");
    }
    // The fleet: both, and the same answer for RFC 3339 times and a duration period.
    let fleet = json(&agg, &format!("/api/v1/sci?from={from}&to={to}&period=10"));
    let by_text = json(
        &agg,
        &format!(
            "/api/v1/sci?from={}&to={}&period=10s",
            rfc3339(from),
            rfc3339(to)
        ),
    );
    assert_eq!(fleet, by_text);
    let p0 = &fleet["periods"][0];
    let r0: f64 = (0..4)
        .map(|i| weights[i] * (plan[0].2[i] + plan[0].5[i]) as f64)
        .sum();
    assert!(close(
        p0["sci_g_per_unit"].as_f64().unwrap(),
        (carbon_g(2000.0, 1.0) + 0.5 + carbon_g(1000.0, 1.0) + 0.25) / r0
    ));

    // Unknown parameters and data centres are refused by name.
    let (status, body) = get(&agg, &format!("/api/v1/sci?from={from}&datacentre=dc-east"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("datacentre"), "{body}");
    let (status, body) = get(&agg, "/api/v1/sci?from=yesterday");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("yesterday"), "{body}");
    let (status, body) = get(
        &agg,
        &format!("/api/v1/sci?from={from}&to={to}&period=10&datacenter=dc-north"),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("dc-north") && body.contains("dc-east"),
        "{body}"
    );

    // dc-west's credit: 5 transactions, no energy measured: null with the reason, not 0 g.
    let west = json(
        &agg,
        &format!("/api/v1/sci?from={from}&to={to}&period=10&datacenter=dc-west"),
    );
    let credit = west["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "credit")
        .unwrap();
    assert_eq!(credit["transactions"], 5);
    assert!(credit["g_per_transaction"].is_null(), "{credit}");
    assert!(
        credit["g_per_transaction_note"]
            .as_str()
            .unwrap()
            .contains("no energy measured"),
        "{credit}"
    );
    let (_, report) = get(
        &agg,
        &format!("/report?from={from}&to={to}&period=10&datacenter=dc-west"),
    );
    assert!(report.contains("no energy measured"), "{report}");

    // Services: per data centre, with their hosts; drawdown in dc-east has
    // one service, so its transactions and carbon per transaction are known.
    let services = json(&agg, &format!("/api/v1/services?from={from}&to={to}"));
    let find = |dc: &str, svc: &str| {
        services["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["datacenter"] == dc && s["service"] == svc)
            .cloned()
            .unwrap_or_else(|| panic!("no {dc}/{svc} in {services}"))
    };
    let drawdown = find("dc-east", "drawdown-svc");
    assert_eq!(drawdown["hosts"], serde_json::json!(["host-a"]));
    assert_eq!(drawdown["transactions"].as_f64().unwrap(), 2.0);
    // drawdown ran (and had transactions) in period 0 only: an eighth of host-a's carbon.
    let carbon = (carbon_g(2000.0, 1.0) + 0.5) / 8.0;
    assert!(close(
        drawdown["g_per_transaction"].as_f64().unwrap(),
        carbon / 2.0
    ));
    let west_credit = find("dc-west", "credit-svc");
    assert_eq!(west_credit["transactions"].as_f64().unwrap(), 5.0);
    assert!(west_credit["g_per_transaction"].is_null(), "{west_credit}");
    assert!(
        west_credit["note"]
            .as_str()
            .unwrap()
            .contains("no energy measured"),
        "{west_credit}"
    );
    let only_west = json(
        &agg,
        &format!("/api/v1/services?from={from}&to={to}&datacenter=dc-west"),
    );
    assert!(only_west["services"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["datacenter"] == "dc-west"));
}

/// The hotspots of one data centre (HTTP and the `report` command's
/// `--datacenter`) against a hand computation: dc-east's largest emitter is
/// credit, dc-west's is query and dc-west holds an idle host; each data
/// centre's answer has only its own, the fleet's has both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotspots_and_report_per_datacenter() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 10, "", true);
    let base = (now_s() / 10 - 3) * 10;
    // (host, dc, host energy J, embodied g, transactions, the scenario given half the energy)
    let hosts = [
        (
            "host-a",
            "dc-east",
            3600.0,
            0.8,
            [2u64, 1, 1, 1],
            Some("credit"),
        ),
        (
            "host-b",
            "dc-west",
            1800.0,
            0.4,
            [1, 1, 1, 3],
            Some("query"),
        ),
        ("host-c", "dc-west", 900.0, 0.2, [0, 0, 0, 0], None),
    ];
    let mut agents = Vec::new();
    for (host, dc, energy_j, embodied_g, txns, heavy) in hosts {
        let instance = format!("inst-{host}");
        let mut w = window(host, &instance, 0, base, 10, energy_j, embodied_g, txns);
        w.datacenter = dc.into();
        match heavy {
            Some(heavy) => {
                for s in &mut w.scenarios {
                    let share = if s.scenario == heavy { 0.5 } else { 0.1 };
                    s.energy_j = energy_j * share;
                    s.carbon_g = carbon_g(energy_j * share, 1.0);
                }
                w.processes = processes_of(&w);
            }
            None => {
                // Idle: 1% busy, no scenario work, no transaction.
                w.scenarios.clear();
                w.business_units = 0.0;
                w.busy_cpu_ns = 100_000_000;
                w.idle_cpu_ns = 9_900_000_000;
            }
        }
        let a = agent(&dir.path().join(&instance), &agg.url(), &instance);
        a.push(&w);
        agents.push(a);
    }
    for a in &agents {
        a.drained(Duration::from_secs(20)).await;
    }
    let (from, to) = (base, base + 10);
    let hotspots = |dc: Option<&str>| {
        let filter = dc.map(|d| format!("&datacenter={d}")).unwrap_or_default();
        json(
            &agg,
            &format!("/api/v1/hotspots?from={from}&to={to}&period=10{filter}"),
        )
        .as_array()
        .unwrap()
        .clone()
    };
    let find = |found: &[serde_json::Value], kind: &str| -> Vec<(String, f64)> {
        found
            .iter()
            .filter(|h| h["kind"] == kind)
            .map(|h| {
                (
                    h["subject"].as_str().unwrap().to_string(),
                    h["impact_carbon_g"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // A scenario's workload carbon: its operational share plus an eighth of the embodied.
    let workload_g = |energy_j: f64, embodied_g: f64| carbon_g(energy_j, 1.0) + embodied_g / 8.0;
    let east_credit_g = workload_g(3600.0 * 0.5, 0.8);
    let west_query_g = workload_g(1800.0 * 0.5, 0.4);
    let idle_g = carbon_g(900.0, 1.0) + 0.2;

    let east = hotspots(Some("dc-east"));
    assert!(find(&east, "idle-host").is_empty(), "{east:?}");
    let top = find(&east, "top-emitter");
    assert_eq!(top.len(), 1, "{east:?}");
    assert_eq!(top[0].0, "all services/credit");
    assert!(close(top[0].1, east_credit_g), "{top:?} vs {east_credit_g}");

    let west = hotspots(Some("dc-west"));
    let idle = find(&west, "idle-host");
    assert_eq!(idle.len(), 1, "{west:?}");
    assert_eq!(idle[0].0, "host-c");
    assert!(close(idle[0].1, idle_g), "{idle:?} vs {idle_g}");
    let top = find(&west, "top-emitter");
    assert_eq!(top[0].0, "all services/query");
    assert!(close(top[0].1, west_query_g), "{top:?} vs {west_query_g}");
    let west_top = west
        .iter()
        .find(|h| h["kind"] == "top-emitter")
        .unwrap()
        .clone();
    // Its share is of dc-west's workload carbon alone (query + three light scenarios).
    let west_workloads_g = west_query_g + 3.0 * workload_g(1800.0 * 0.1, 0.4);
    let share = west_top["evidence"]["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f[0] == "share_of_workload_carbon")
        .map(|f| f[1].as_f64().unwrap())
        .unwrap_or_else(|| panic!("no share in {west_top}"));
    assert!(
        close(share, west_query_g / west_workloads_g),
        "share {share} vs {}",
        west_query_g / west_workloads_g
    );

    // The fleet: both data centres' findings; its top emitter is dc-east's credit.
    let fleet = hotspots(None);
    assert_eq!(find(&fleet, "idle-host").len(), 1);
    assert_eq!(find(&fleet, "top-emitter")[0].0, "all services/credit");
    let (status, body) = get(
        &agg,
        &format!("/api/v1/hotspots?from={from}&to={to}&period=10&datacenter=dc-north"),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("dc-north"), "{body}");

    // The report command: --datacenter narrows SCI_CF and the hotspots.
    let report = |dc: &str, format: &str| {
        let out =
            std::process::Command::new(sci_tests::cargo_bin("sci-aggregator", "sci-aggregator"))
                .arg("report")
                .arg("--config")
                .arg(&agg.config)
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--period", "10s", "--datacenter", dc, "--format", format])
                .output()
                .unwrap();
        assert!(
            out.status.success(),
            "report --datacenter {dc}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let weights = [24.0, 7.0, 3.0, 1.0];
    let units = |t: [u64; 4]| -> f64 { (0..4).map(|i| weights[i] * t[i] as f64).sum() };
    let east_sci = (carbon_g(3600.0, 1.0) + 0.8) / units([2, 1, 1, 1]);
    let west_sci = (carbon_g(1800.0, 1.0) + 0.4 + idle_g) / units([1, 1, 1, 3]);
    for (dc, expected) in [("dc-east", east_sci), ("dc-west", west_sci)] {
        let e: serde_json::Value = serde_json::from_str(&report(dc, "json")).unwrap();
        let got = e["sci_cf_mean"].as_f64().unwrap();
        assert!(close(got, expected), "{dc}: SCI_CF {got} vs {expected}");
    }
    let west_md = report("dc-west", "md");
    assert!(west_md.contains("## Hotspots"), "{west_md}");
    assert!(west_md.contains("| idle-host | host-c |"), "{west_md}");
    let east_md = report("dc-east", "md");
    assert!(!east_md.contains("host-c"), "{east_md}");
    assert!(
        east_md.contains("| top-emitter | all services/credit | "),
        "{east_md}"
    );
    let out = std::process::Command::new(sci_tests::cargo_bin("sci-aggregator", "sci-aggregator"))
        .arg("report")
        .arg("--config")
        .arg(&agg.config)
        .args(["--datacenter", "dc-north"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dc-north"));
}
