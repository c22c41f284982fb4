//! Time shifting (#27, standard 7.2) and the signal schedulers consume,
//! over the real ingest: a real `sci-aggregator` (SQLite), the agent's
//! real spool and forwarder over gRPC on loopback, two days of hourly
//! windows of host r1 (dc-1, 4 CPUs, PUE 1.2, 0.2 cores of background):
//! repayment-batch runs 18:00-21:00 UTC (2 cores, 360 kJ per hour),
//! night-etl at 23:00 (1 core).
//!
//! The plan of job `repay` (release 18:00, deadline 06:00, 3 hours) is
//! checked against a hand computation from a known hourly CSV: the three
//! lowest-intensity hours with room for 2 cores under 60% utilisation
//! (23:00 has none: night-etl), and its saving. A job needing every hour
//! of the window is infeasible (capacity). Then KEDA's external scaler is
//! called by a real tonic client speaking KEDA's protocol: jobs in data
//! centres whose intensity (Carbon Aware SDK and Electricity Maps JSON) is
//! lowest now, or next hour, are active with their replicas, or not.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_proto::keda::external_scaler_client::ExternalScalerClient;
use sci_proto::keda::{GetMetricsRequest, ScaledObjectRef};
use sci_tests::fleet::{
    http_get, now_s, service_window, Agent, Aggregator, HostShape, ServiceLoad,
};
use tokio_stream::StreamExt;

const DAY: u64 = 86_400;
/// The dc-1 intensity file's hours 18:00..06:00 (g/kWh).
const INTENSITY: [f64; 12] = [
    500.0, 520.0, 510.0, 480.0, 300.0, 250.0, 260.0, 400.0, 450.0, 470.0, 490.0, 505.0,
];

fn r1() -> HostShape {
    HostShape {
        host: "r1".into(),
        datacenter: "dc-1".into(),
        cpus: 4,
        intensity_g_per_kwh: 500.0,
        pue: 1.2,
        background_cpu_ns_per_s: 200_000_000,
        idle_power_w: 40.0,
        supply: None,
    }
}

fn loads(hour_of_day: u64) -> Vec<ServiceLoad<'static>> {
    let mut out = Vec::new();
    if (18..21).contains(&hour_of_day) {
        out.push(ServiceLoad {
            service: "repayment-batch",
            scenario: "repayment",
            transactions: 1000,
            cpu_ns: 2 * 3_600_000_000_000,
            energy_j: 360_000.0,
            embodied_g: 1.0,
        });
    }
    if hour_of_day == 23 {
        out.push(ServiceLoad {
            service: "night-etl",
            scenario: "query",
            transactions: 10,
            cpu_ns: 3_600_000_000_000,
            energy_j: 50_000.0,
            embodied_g: 0.5,
        });
    }
    out
}

fn hhmm(hour: u64) -> String {
    format!("{:02}:00", hour % 24)
}

fn rfc3339(unix_s: u64) -> String {
    agent_common::time_text::format_unix_s(unix_s as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrable_jobs_are_planned_and_keda_follows_the_plan() {
    // Not across an hour boundary: the scaler answers for the hour it is called in.
    while now_s() % 3600 > 3540 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = (now_s() / DAY - 2) * DAY;
    let release = base + DAY + 18 * 3600;
    // dc-1: the agents' CSV for yesterday 18:00 to today 06:00.
    let csv = dir.path().join("dc1.csv");
    let mut text = String::from("timestamp,g_per_kwh\n");
    for (i, v) in INTENSITY.iter().enumerate() {
        text.push_str(&format!("{},{v}\n", rfc3339(release + i as u64 * 3600)));
    }
    std::fs::write(&csv, text).unwrap();
    // dc-k: Carbon Aware SDK forecast, lowest this hour; dc-k2: Electricity
    // Maps forecast, lowest next hour (both 5 hours from the last).
    let now_hour = now_s() / 3600 * 3600;
    let hours: Vec<u64> = (0..5).map(|i| now_hour - 3600 + i * 3600).collect();
    let cas: Vec<String> = hours
        .iter()
        .map(|&h| {
            let v = if h == now_hour { 100.0 } else { 500.0 };
            format!(
                r#"{{"location":"k","timestamp":"{}","duration":60,"value":{v}}}"#,
                rfc3339(h)
            )
        })
        .collect();
    let cas_path = dir.path().join("dck.json");
    std::fs::write(
        &cas_path,
        format!(
            r#"[{{"location":"k","generatedAt":"{}","forecastData":[{}]}}]"#,
            rfc3339(now_hour),
            cas.join(",")
        ),
    )
    .unwrap();
    let em: Vec<String> = hours
        .iter()
        .map(|&h| {
            let v = if h == now_hour + 3600 { 100.0 } else { 900.0 };
            format!(r#"{{"carbonIntensity":{v},"datetime":"{}"}}"#, rfc3339(h))
        })
        .collect();
    let em_path = dir.path().join("dck2.json");
    std::fs::write(
        &em_path,
        format!(r#"{{"zone":"K2","forecast":[{}]}}"#, em.join(",")),
    )
    .unwrap();
    let (open, close) = (hhmm(now_hour / 3600 + 23), hhmm(now_hour / 3600 + 3));
    let scheduling = format!(
        r#"
[scheduling]
target_utilisation = 0.6
[[scheduling.deferrable]]
name = "repay"
service = "repayment-batch"
datacenter = "dc-1"
release = "18:00"
deadline = "06:00"
hours = 3
[[scheduling.deferrable]]
name = "everything"
service = "repayment-batch"
datacenter = "dc-1"
release = "18:00"
deadline = "06:00"
hours = 12
[[scheduling.deferrable]]
name = "keda-on"
service = "statements"
datacenter = "dc-k"
release = "{open}"
deadline = "{close}"
hours = 1
replicas = 3
cores = 0.5
energy_j_per_hour = 1000.0
[[scheduling.deferrable]]
name = "keda-off"
service = "risk-scoring"
datacenter = "dc-k2"
release = "{open}"
deadline = "{close}"
hours = 1
replicas = 2
cores = 0.5
energy_j_per_hour = 1000.0
[[scheduling.intensity]]
datacenter = "dc-1"
path = "{}"
format = "csv"
[[scheduling.intensity]]
datacenter = "dc-k"
path = "{}"
format = "carbon_aware"
[[scheduling.intensity]]
datacenter = "dc-k2"
path = "{}"
format = "electricity_maps"
"#,
        csv.display(),
        cas_path.display(),
        em_path.display()
    );
    let agg = Aggregator::start(dir.path(), 3600, &scheduling, true);
    let cfg = AggregatorConfig {
        url: Some(agg.url()),
        max_backoff: Duration::from_millis(500),
        batch_windows: 64,
        ..Default::default()
    };
    let agent = Agent::start(&dir.path().join("r1"), cfg, "inst-r1");
    for h in 0..48 {
        agent.push(&service_window(
            &r1(),
            "inst-r1",
            h,
            base + h * 3600,
            3600,
            &loads(h % 24),
        ));
    }
    agent.drained(Duration::from_secs(60)).await;

    // The plan against the hand computation.
    let (status, body) = http_get(
        agg.http_port,
        &format!("/api/v1/plans/shift?job=repay&at={}", release + 60),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let plan = &answer["plans"][0]["plan"];
    let at = |i: u64| release + i * 3600;
    // Hours 0..12 of the window are 18:00..05:00; 23:00 (index 5, 250 g/kWh)
    // has 2.4 - 0.2 - 1 = 1.2 free cores < 2: excluded.
    let planned: Vec<u64> = plan["planned_hours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(planned, vec![at(4), at(6), at(7)], "{plan}");
    assert_eq!(
        plan["baseline_hours"],
        serde_json::json!([at(0), at(1), at(2)])
    );
    let hours = plan["hours"].as_array().unwrap();
    assert!(
        (hours[5]["free_cores"].as_f64().unwrap() - 1.2).abs() < 1e-9,
        "{}",
        hours[5]
    );
    assert!(
        (hours[0]["free_cores"].as_f64().unwrap() - 2.2).abs() < 1e-9,
        "{}",
        hours[0]
    );
    assert!((plan["energy_j_per_hour"].as_f64().unwrap() - 360_000.0).abs() < 1e-6);
    assert!((plan["cores"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    let baseline: f64 = INTENSITY[0] + INTENSITY[1] + INTENSITY[2];
    let chosen: f64 = INTENSITY[4] + INTENSITY[6] + INTENSITY[7];
    let saving = 360_000.0 * 1.2 * (baseline - chosen) / 3.6e6;
    assert!((saving - 68.4).abs() < 1e-9);
    assert!(
        (plan["predicted_saving_g"].as_f64().unwrap() - saving).abs() < 1e-9,
        "{plan}"
    );
    for h in &planned {
        assert!(
            *h >= release && *h + 3600 <= release + 12 * 3600,
            "deadline"
        );
    }
    // Every hour of the window is not possible: 23:00 lacks the room.
    let (_, body) = http_get(
        agg.http_port,
        &format!("/api/v1/plans/shift?job=everything&at={}", release + 60),
    )
    .unwrap();
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["plans"][0]["plan"]["feasible"], false, "{all}");
    assert!(all["plans"][0]["plan"]["planned_hours"]
        .as_array()
        .unwrap()
        .is_empty());

    // KEDA's protocol, from a real gRPC client.
    let mut client = ExternalScalerClient::connect(agg.url()).await.unwrap();
    let object = |job: &str| ScaledObjectRef {
        name: "worker".into(),
        namespace: "batch".into(),
        scaler_metadata: BTreeMap::from([("job".to_string(), job.to_string())]),
    };
    let active = |job: &'static str| {
        let mut client = client.clone();
        let o = object(job);
        async move { client.is_active(o).await.unwrap().into_inner().result }
    };
    assert!(active("keda-on").await);
    assert!(!active("keda-off").await);
    let spec = client
        .get_metric_spec(object("keda-on"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "sci_plan_keda-on");
    assert_eq!(spec.metric_specs[0].target_size, 1);
    for (job, replicas) in [("keda-on", 3), ("keda-off", 0)] {
        let metrics = client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object(job)),
                metric_name: format!("sci_plan_{job}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(metrics.metric_values[0].metric_value, replicas, "{job}");
        assert_eq!(metrics.metric_values[0].metric_value_float, replicas as f64);
    }
    let mut stream = client
        .stream_is_active(object("keda-on"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.result);
    let missing = client
        .is_active(ScaledObjectRef::default())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(missing.message().contains("scalerMetadata.job"));
    let unknown = client.is_active(object("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let push = client
        .stream_metric_spec(object("keda-on"))
        .await
        .unwrap_err();
    assert_eq!(push.code(), tonic::Code::Unimplemented);
    assert!(agg
        .metrics()
        .contains("sci_plan_requests_refused_total{endpoint=\"keda\"} 2"));
}
