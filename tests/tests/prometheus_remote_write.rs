//! Equivalence against a real engine: a real Prometheus (Debian's 2.42,
//! `--web.enable-remote-write-receiver`, the shipped rules of
//! deploy/prometheus loaded) receives a real `sci-aggregator`'s
//! remote-write of a recorded two-data-centre fleet (a baseline day a week
//! ago, six recent hours with dc-east's carbon up by half). For every
//! period, the rules' PromQL (O_j, M_j, R_j, SCI_j, coverage) per data
//! centre and for the fleet equals `/api/v1/sci` to 1e-9 relative; the
//! mean of periods too; and the week-over-week alert becomes active for
//! dc-east alone.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::Spool;
use sci_tests::fleet::{metric_value, now_s, window, Agent, Aggregator};
use sci_tests::prometheus::{Prometheus, PROMETHEUS};
use sci_tests::{provisioned_tool, workspace_root};

const HOUR: u64 = 3600;
const HOSTS: [(&str, &str); 4] = [
    ("east-1", "dc-east"),
    ("east-2", "dc-east"),
    ("west-1", "dc-west"),
    ("west-2", "dc-west"),
];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// Pushes `hours` hours from `base` for every host: 5-minute windows with
/// figures that vary by host, hour and window; dc-east's carbon times
/// `east_factor`.
fn push_fleet(agents: &[Agent], seqs: &mut [u64], base: u64, hours: u64, east_factor: f64) {
    for (h, (host, dc)) in HOSTS.iter().enumerate() {
        for j in 0..hours {
            for k in 0..12u64 {
                let start = base + j * HOUR + k * 300;
                let factor = if *dc == "dc-east" { east_factor } else { 1.0 };
                // Carbon follows the energy (the fixture's intensity), so the
                // variation and the regression are in the energy.
                let energy_j = 100.0
                    * (50.0 + 10.0 * h as f64)
                    * (1 + (j * 7 + k * 3 + h as u64) % 5) as f64
                    * factor;
                let txns = [(j + k) % 3, k % 2, 2, 5 + (j * k) % 4];
                let mut w = window(
                    host,
                    &format!("inst-{host}"),
                    seqs[h],
                    start,
                    300,
                    energy_j,
                    0.002 * (1 + h) as f64,
                    txns,
                );
                w.datacenter = dc.to_string();
                agents[h].push(&w);
                seqs[h] += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_sci_per_period_equals_the_aggregator() {
    let test = "promql_sci_per_period_equals_the_aggregator";
    let Some(binary) = provisioned_tool(std::path::Path::new(PROMETHEUS), test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = workspace_root().join("deploy/prometheus/sci-cf-rules.yml");
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = Prometheus::start(&binary, &prom_dir, &[rules]);

    // The recorded fleet: six recent full hours, and the same six hours a week before.
    let recent = (now_s() / HOUR - 7) * HOUR;
    let recent_end = recent + 6 * HOUR;
    let baseline = recent - 7 * 86_400;
    let mut agg = Aggregator::start(dir.path(), HOUR, "", true);
    let agents: Vec<Agent> = HOSTS
        .iter()
        .map(|(host, _)| {
            let spool = Spool::open(
                &dir.path().join(format!("spool-{host}")),
                64 * 1024 * 1024,
                &format!("inst-{host}"),
            )
            .unwrap();
            Agent::with_spool(
                spool,
                AggregatorConfig {
                    url: Some(agg.url()),
                    max_backoff: Duration::from_millis(500),
                    batch_windows: 64,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut seqs = [0u64; 4];
    push_fleet(&agents, &mut seqs, baseline, 6, 1.0);
    push_fleet(&agents, &mut seqs, recent, 6, 1.5);
    for a in &agents {
        a.drained(Duration::from_secs(60)).await;
    }

    // Restart with remote-write from the baseline's start: the exporter
    // backfills the week from the store, then follows the clock.
    let mut text = std::fs::read_to_string(&agg.config).unwrap();
    text.push_str(&format!(
        "[remote_write]\nurl = \"{}\"\nstart = \"{}\"\ndelay = \"30s\"\nmax_steps_per_request = 120\n",
        prom.write_url(),
        agent_common::time_text::format_unix_s(baseline as i64)
    ));
    std::fs::write(&agg.config, text).unwrap();
    agg.restart(true);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let m = agg.metrics();
        let position = metric_value(&m, "sci_remote_write_position_seconds").unwrap_or(0);
        if position >= recent_end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remote-write at {position}, not yet at {recent_end}:\n{m}\n{}",
            std::fs::read_to_string(dir.path().join("aggregator.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = agg.metrics();
    assert_eq!(
        metric_value(&m, "sci_remote_write_samples_total{result=\"dropped\"}"),
        Some(0),
        "{m}"
    );

    // The rules as Prometheus loaded them.
    let loaded = prom.rules();
    let rule = |name: &str| {
        loaded
            .iter()
            .find(|r| r.0 == name)
            .unwrap_or_else(|| panic!("rule {name} not loaded: {loaded:?}"))
            .1
            .clone()
    };
    let value_of = |results: &[(serde_json::Value, f64)], dc: Option<&str>| -> Option<f64> {
        results
            .iter()
            .find(|(labels, _)| dc.is_none_or(|d| labels["datacenter"] == d))
            .map(|r| r.1)
    };
    let mut compared = 0;
    for dc in [None, Some("dc-east"), Some("dc-west")] {
        let (prefix, filter) = match dc {
            None => ("", String::new()),
            Some(d) => ("datacenter", format!("&datacenter={d}")),
        };
        for (from, to) in [(baseline, baseline + 6 * HOUR), (recent, recent_end)] {
            let e = agg_sci(&agg, &format!("from={from}&to={to}&period={HOUR}{filter}"));
            let periods = e["periods"].as_array().unwrap();
            assert_eq!(periods.len(), 6, "{e}");
            for p in periods {
                let end = p["end_unix_s"].as_u64().unwrap();
                assert!(p["in_mean"].as_bool().unwrap(), "{p}");
                let om = p["operational_g"].as_f64().unwrap() + p["embodied_g"].as_f64().unwrap();
                let mut checks = vec![
                    (
                        "sci_cf_g_per_unit:period_1h",
                        p["sci_g_per_unit"].as_f64().unwrap(),
                    ),
                    (
                        "sci_fleet_coverage:period_1h",
                        p["coverage"].as_f64().unwrap(),
                    ),
                ];
                if dc.is_some() {
                    checks.push((
                        "sci_fleet_operational_carbon_grams:period_1h",
                        p["operational_g"].as_f64().unwrap(),
                    ));
                    checks.push((
                        "sci_fleet_embodied_carbon_grams:period_1h",
                        p["embodied_g"].as_f64().unwrap(),
                    ));
                    checks.push((
                        "sci_fleet_business_units:period_1h",
                        p["business_units"].as_f64().unwrap(),
                    ));
                }
                assert!(om > 0.0);
                for (name, expected) in checks {
                    let name = format!("{prefix}:{name}");
                    let got = value_of(&prom.query(&rule(&name), end), dc)
                        .unwrap_or_else(|| panic!("{name} at {end}: no value"));
                    assert!(
                        close(got, expected),
                        "{name} {dc:?} at {end}: PromQL {got}, /api/v1/sci {expected}"
                    );
                    compared += 1;
                }
            }
        }
        // SCI_CF, the mean of periods, over the day before recent_end.
        let e = agg_sci(
            &agg,
            &format!(
                "from={}&to={recent_end}&period={HOUR}{filter}",
                recent_end - 86_400
            ),
        );
        let expected = e["sci_cf_mean"].as_f64().unwrap();
        let name = format!("{prefix}:sci_cf_g_per_unit:mean_1d");
        let got = value_of(&prom.query(&rule(&name), recent_end), dc).unwrap();
        assert!(
            close(got, expected),
            "{name} {dc:?}: PromQL {got}, /api/v1/sci {expected}"
        );
        println!("SCI_CF {dc:?}: PromQL {got}, /api/v1/sci {expected}");
    }
    println!("{compared} per-period figures equal to 1e-9");

    // dc-east's carbon went up by half for the same business: its alert
    // becomes active (pending for its 1 h, then firing); dc-west's does not.
    let deadline = Instant::now() + Duration::from_secs(200);
    loop {
        let alerts = prom.api("/api/v1/alerts");
        let active: Vec<String> = alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == "SciCfUpWeekOverWeek")
            .map(|a| a["labels"]["datacenter"].as_str().unwrap_or("").to_string())
            .collect();
        if !active.is_empty() {
            assert_eq!(active, ["dc-east"], "{alerts}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SciCfUpWeekOverWeek alert: {alerts}\n{:?}",
            prom.rules()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for (name, _, _, health) in prom.rules() {
        assert_ne!(health, "err", "rule {name} failed to evaluate");
    }
}

fn agg_sci(agg: &Aggregator, query: &str) -> serde_json::Value {
    let (status, body) =
        sci_tests::fleet::http_get(agg.http_port, &format!("/api/v1/sci?{query}")).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}
