//! OTLP/gRPC export into a real receiver: a tonic `MetricsService` server
//! built from the official OpenTelemetry protos (`opentelemetry-proto`),
//! on loopback, that decodes every request and answers as told.
//!
//! - The aggregator (`[otlp]`): the receiver is down for the first
//!   requests, then refuses one with INVALID_ARGUMENT, then takes the rest.
//!   Nothing is lost: every rollup step is either received or in the
//!   refused request, whose points are exactly those counted as refused.
//!   Per period and data centre, the received cumulative sums give O_j,
//!   M_j, R_j and SCI_j equal to `/api/v1/sci` to 1e-9.
//! - The agent (`[otlp]`, procfs, no aggregator: windows on stdout): the
//!   receiver is down for the first windows, then up. Every window the
//!   agent printed reaches the receiver, and each point (host, scenario and
//!   per-service workload figures, DELTA over exactly the window) equals
//!   the window's figures to 1e-9.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use agent_common::otlp::opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use agent_common::otlp::opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, NumberDataPoint,
};
use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::Spool;
use sci_tests::fleet::{
    free_port, metric_value, now_s, read_http_request, window, Agent, Aggregator,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    InvalidOnce,
}

/// One received data point, flattened.
#[derive(Debug, Clone)]
struct Point {
    resource: BTreeMap<String, String>,
    metric: String,
    unit: String,
    temporality: Option<i32>,
    attributes: BTreeMap<String, String>,
    start_ns: u64,
    end_ns: u64,
    value: f64,
}

#[derive(Default)]
struct Got {
    accepted: Vec<Point>,
    refused: Vec<Point>,
}

#[derive(Clone)]
struct Receiver {
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Got>>,
}

fn strings(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn flatten(request: &ExportMetricsServiceRequest) -> Vec<Point> {
    let mut out = Vec::new();
    for rm in &request.resource_metrics {
        let resource = strings(&rm.resource.as_ref().unwrap().attributes);
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let (points, temporality): (&[NumberDataPoint], Option<i32>) = match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        assert!(s.is_monotonic, "{} not monotonic", m.name);
                        (&s.data_points, Some(s.aggregation_temporality))
                    }
                    Some(metric::Data::Gauge(g)) => (&g.data_points, None),
                    other => panic!("{}: unexpected {other:?}", m.name),
                };
                for p in points {
                    let Some(number_data_point::Value::AsDouble(value)) = p.value else {
                        panic!("{}: not a double", m.name)
                    };
                    out.push(Point {
                        resource: resource.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        temporality,
                        attributes: strings(&p.attributes),
                        start_ns: p.start_time_unix_nano,
                        end_ns: p.time_unix_nano,
                        value,
                    });
                }
            }
        }
    }
    out
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let points = flatten(request.get_ref());
        let mode = *self.mode.lock().unwrap();
        let mut got = self.got.lock().unwrap();
        if mode == Mode::InvalidOnce {
            *self.mode.lock().unwrap() = Mode::Ok;
            got.refused.extend(points);
            return Err(tonic::Status::invalid_argument("metric name refused"));
        }
        got.accepted.extend(points);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    fn new(mode: Mode) -> Receiver {
        Receiver {
            mode: Arc::new(Mutex::new(mode)),
            got: Arc::new(Mutex::new(Got::default())),
        }
    }

    /// Serves on `port` until the task is aborted.
    fn serve(&self, port: u16) -> tokio::task::JoinHandle<()> {
        let service = MetricsServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve(([127, 0, 0, 1], port).into())
                .await
                .unwrap();
        })
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

const DCS: [(&str, &str); 2] = [("host-a", "dc-a"), ("host-b", "dc-b")];

/// 30 minutes of two hosts' 60 s windows in two data centres, stored in a
/// fresh aggregator (period 60 s) before any export; and their origin.
async fn stored_fleet(dir: &std::path::Path) -> (Aggregator, u64) {
    let agg = Aggregator::start(dir, 60, "", true);
    // 30 minutes of two hosts' 60 s windows in two data centres, stored first.
    let origin = (now_s() / 60 - 31) * 60;
    for (h, (host, dc)) in DCS.iter().enumerate() {
        let instance = format!("inst-{host}");
        let spool = Spool::open(&dir.join(format!("spool-{h}")), 64 << 20, &instance).unwrap();
        let agent = Agent::with_spool(
            spool,
            AggregatorConfig {
                url: Some(agg.url()),
                max_backoff: Duration::from_millis(500),
                ..Default::default()
            },
        );
        for k in 0..30u64 {
            let mut w = window(
                host,
                &instance,
                k,
                origin + 60 * k,
                60,
                100.0 * (1 + (k + 3 * h as u64) % 7) as f64,
                0.001 * (1 + h) as f64,
                [k % 2, 1, h as u64, 3 + k % 4],
            );
            w.datacenter = dc.to_string();
            agent.push(&w);
        }
        agent.drained(Duration::from_secs(30)).await;
    }
    (agg, origin)
}

/// Restarts the aggregator with `[otlp]` to `port` from `origin` (`extra`: more keys).
fn export_to(agg: &mut Aggregator, origin: u64, port: u16, extra: &str) {
    let mut text = std::fs::read_to_string(&agg.config).unwrap();
    text.push_str(&format!(
        "[otlp]\nendpoint = \"http://127.0.0.1:{port}\"\nstart = \"{origin}\"\ndelay = \"5s\"\nmax_steps_per_request = 4\ntimeout = \"1s\"\nmin_backoff = \"200ms\"\nmax_backoff = \"1s\"\nresource_attributes = {{ \"deployment.environment.name\" = \"test\" }}\n{extra}"
    ));
    std::fs::write(&agg.config, text).unwrap();
    agg.restart(true);
}

fn position(agg: &Aggregator) -> u64 {
    metric_value(&agg.metrics(), "sci_otlp_position_seconds").unwrap_or(0)
}

/// What the receiver got against the aggregator, from the origin to the
/// position `end`: counts, resource, every step received or refused (not
/// both), and per period and data centre O_j, M_j, R_j and SCI_j from the
/// received cumulative sums against `/api/v1/sci`. Returns the figures compared.
fn check_export(agg: &Aggregator, got: &Got, origin: u64, end: u64) -> usize {
    let metrics = agg.metrics();
    let refused = metric_value(&metrics, "sci_otlp_points_total{result=\"refused\"}").unwrap();
    assert!(!got.refused.is_empty(), "the receiver refused one request");
    assert_eq!(
        refused,
        got.refused.len() as u64,
        "refused = the points of the refused request"
    );
    assert_eq!(
        metric_value(&metrics, "sci_otlp_points_total{result=\"sent\"}").unwrap(),
        got.accepted.len() as u64
    );
    assert_eq!(
        metric_value(&metrics, "sci_otlp_points_total{result=\"queue_full\"}"),
        Some(0)
    );
    // The resource and the temporality.
    let p = &got.accepted[0];
    assert_eq!(p.resource["service.name"], "sci-aggregator");
    assert_eq!(p.resource["deployment.environment.name"], "test");
    assert!(p.resource.contains_key("host.name"));
    // Every step from the origin to the position: received or refused, not both.
    let ends = |points: &[Point], dc: &str| -> BTreeMap<u64, f64> {
        points
            .iter()
            .filter(|p| {
                p.metric == "sci.fleet.operational_carbon" && p.attributes["datacenter"] == dc
            })
            .map(|p| {
                assert_eq!(
                    p.start_ns,
                    origin * 1_000_000_000,
                    "cumulative from the origin"
                );
                assert_eq!(
                    p.temporality,
                    Some(AggregationTemporality::Cumulative as i32)
                );
                assert_eq!(p.unit, "g");
                (p.end_ns / 1_000_000_000, p.value)
            })
            .collect()
    };
    for (_, dc) in DCS {
        let (received, lost) = (ends(&got.accepted, dc), ends(&got.refused, dc));
        assert!(!lost.is_empty());
        for t in (origin + 60..=end).step_by(60) {
            assert!(
                received.contains_key(&t) != lost.contains_key(&t),
                "{dc} step ending {t}: received {} refused {}",
                received.contains_key(&t),
                lost.contains_key(&t)
            );
        }
    }
    // Per period and data centre: the differences of the cumulative sums.
    let value = |metric: &str, dc: &str, t: u64| -> Option<f64> {
        if t == origin {
            return Some(0.0);
        }
        let sum: Vec<f64> = got
            .accepted
            .iter()
            .filter(|p| {
                p.metric == metric
                    && p.attributes["datacenter"] == dc
                    && p.end_ns == t * 1_000_000_000
            })
            .map(|p| p.value)
            .collect();
        (!sum.is_empty()).then(|| sum.iter().sum())
    };
    let mut compared = 0;
    for (_, dc) in DCS {
        let (status, body) = sci_tests::fleet::http_get(
            agg.http_port,
            &format!("/api/v1/sci?from={origin}&to={end}&period=60&datacenter={dc}"),
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        for period in e["periods"].as_array().unwrap() {
            let b = period["end_unix_s"].as_u64().unwrap();
            if b > origin + 30 * 60 {
                continue; // after the fleet's data: no R
            }
            let a = b - 60;
            let delta = |metric: &str| Some(value(metric, dc, b)? - value(metric, dc, a)?);
            let (Some(o), Some(em), Some(r)) = (
                delta("sci.fleet.operational_carbon"),
                delta("sci.fleet.embodied_carbon"),
                delta("sci.fleet.scenario.business_units"),
            ) else {
                continue; // a boundary in the refused request
            };
            for (name, got, want) in [
                ("O", o, period["operational_g"].as_f64().unwrap()),
                ("M", em, period["embodied_g"].as_f64().unwrap()),
                ("R", r, period["business_units"].as_f64().unwrap()),
                (
                    "SCI",
                    (o + em) / r,
                    period["sci_g_per_unit"].as_f64().unwrap(),
                ),
            ] {
                assert!(
                    close(got, want),
                    "{dc} period ending {b}: {name} OTLP {got}, /api/v1/sci {want}"
                );
                compared += 1;
            }
        }
    }
    println!("{compared} per-period figures equal to 1e-9; {refused} points refused and counted");
    assert!(compared >= 2 * 4 * 20, "compared only {compared}");
    compared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sums_equal_the_api_per_period_and_only_refused_points_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut agg, origin) = stored_fleet(dir.path()).await;
    let port = free_port();
    let receiver = Receiver::new(Mode::InvalidOnce);
    export_to(&mut agg, origin, port, "");
    let m = |agg: &Aggregator, series: &str| metric_value(&agg.metrics(), series).unwrap_or(0);
    // Down: nothing listens; retried, no progress.
    wait_for("refused connections", 30, || {
        m(&agg, "sci_otlp_requests_total{outcome=\"unavailable\"}") >= 3
    })
    .await;
    assert_eq!(position(&agg), origin, "no progress while down");
    // Up: the first request is refused for good, the rest taken.
    let server = receiver.serve(port);
    let target = (now_s() - 5) / 60 * 60;
    wait_for("the export to catch up", 90, || position(&agg) >= target).await;
    server.abort();
    assert_eq!(
        m(
            &agg,
            "sci_otlp_requests_total{outcome=\"invalid_argument\"}"
        ),
        1
    );
    let got = receiver.got.lock().unwrap();
    check_export(&agg, &got, origin, position(&agg));
}

/// OTLP/HTTP (`protocol = "http/protobuf"`) to a receiver on loopback that
/// decodes each `POST /v1/metrics` body with the official protos and
/// answers 503, then 429 with Retry-After, then 400, then 200 for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_503_and_429_are_retried_and_a_400_is_dropped_counted() {
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut agg, origin) = stored_fleet(dir.path()).await;
    let port = free_port();
    let got: Arc<Mutex<Got>> = Arc::default();
    let answers: Arc<Mutex<std::collections::VecDeque<u16>>> =
        Arc::new(Mutex::new([503, 429, 400].into_iter().collect()));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let (g, a) = (Arc::clone(&got), Arc::clone(&answers));
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let (g, a) = (Arc::clone(&g), Arc::clone(&a));
            tokio::spawn(async move {
                while let Some((head, body)) = read_http_request(&mut s).await {
                    assert!(head.starts_with("post /v1/metrics "), "{head}");
                    assert!(
                        head.contains("content-type: application/x-protobuf"),
                        "{head}"
                    );
                    let points =
                        flatten(&ExportMetricsServiceRequest::decode(body.as_slice()).unwrap());
                    let code = a.lock().unwrap().pop_front().unwrap_or(200);
                    let answer = match code {
                        200 => {
                            g.lock().unwrap().accepted.extend(points);
                            let body = ExportMetricsServiceResponse::default().encode_to_vec();
                            let mut a = format!("HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
                            a.extend(body);
                            a
                        }
                        400 => {
                            g.lock().unwrap().refused.extend(points);
                            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\nbad metrics!".to_vec()
                        }
                        429 => b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n".to_vec(),
                        _ => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    export_to(&mut agg, origin, port, "protocol = \"http/protobuf\"\n");
    let target = (now_s() - 5) / 60 * 60;
    wait_for("the export to catch up", 90, || position(&agg) >= target).await;
    server.abort();
    assert!(answers.lock().unwrap().is_empty());
    let metrics = agg.metrics();
    for outcome in ["http_503", "http_429", "http_400"] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!("sci_otlp_requests_total{{outcome=\"{outcome}\"}}")
            ),
            Some(1),
            "{outcome}"
        );
    }
    let got = got.lock().unwrap();
    check_export(&agg, &got, origin, position(&agg));
}

/// The agent's figures a window should carry, by (resource service, metric,
/// scenario attribute).
fn expected_points(w: &serde_json::Value) -> BTreeMap<(String, String, String), f64> {
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let mut out = BTreeMap::new();
    let host = |metric: &str, v: f64| {
        (
            ("sci-agent".to_string(), metric.to_string(), String::new()),
            v,
        )
    };
    out.extend([
        host("sci.host.energy", f(&w["host_energy_j"])),
        host("sci.host.idle_energy", f(&w["idle_energy_j"])),
        host(
            "sci.host.unattributed_energy",
            f(&w["unattributed_energy_j"]),
        ),
        host("sci.host.operational_carbon", f(&w["host_carbon_g"])),
        host("sci.host.embodied_carbon", f(&w["host_embodied_g"])),
        host("sci.host.cpu.time", f(&w["busy_cpu_ns"]) / 1e9),
        host(
            "sci.host.carbon_intensity",
            f(&w["carbon_intensity_g_per_kwh"]),
        ),
        host("sci.host.pue", f(&w["pue"])),
    ]);
    for s in w["scenarios"].as_array().unwrap() {
        let name = s["scenario"].as_str().unwrap().to_string();
        for (metric, v) in [
            ("sci.scenario.transactions", f(&s["transactions"])),
            ("sci.scenario.energy", f(&s["energy_j"])),
            ("sci.scenario.operational_carbon", f(&s["carbon_g"])),
            ("sci.scenario.embodied_carbon", f(&s["embodied_g"])),
            ("sci.scenario.cpu.time", f(&s["cpu_ns"]) / 1e9),
        ] {
            out.insert(("sci-agent".into(), metric.into(), name.clone()), v);
        }
    }
    for p in w["processes"].as_array().unwrap() {
        let service = p["service"]
            .as_str()
            .unwrap_or("unknown_service")
            .to_string();
        let scenario = p["scenario"].as_str().unwrap_or("unassigned").to_string();
        for (metric, v) in [
            (
                "sci.workload.energy",
                f(&p["energy_j"]) + f(&p["idle_share_j"]),
            ),
            ("sci.workload.operational_carbon", f(&p["carbon_g"])),
            ("sci.workload.embodied_carbon", f(&p["embodied_g"])),
            ("sci.workload.cpu.time", f(&p["cpu_ns"]) / 1e9),
        ] {
            *out.entry((service.clone(), metric.into(), scenario.clone()))
                .or_default() += v;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_windows_arrive_as_otlp_points_equal_to_the_windows() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nhost = \"otlp-host\"\ndatacenter = \"dc-otlp\"\ninterval = \"1s\"\nspool_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [carbon]\nintensity_g_per_kwh = 581.0\npue = 1.3\n\
             [[scenarios.rules]]\nservice = \"burner\"\nscenario = \"credit\"\ncomm = \"sci-burn\"\n\
             [otlp]\nendpoint = \"http://127.0.0.1:{port}\"\ntimeout = \"1s\"\nmin_backoff = \"100ms\"\nmax_backoff = \"500ms\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut burner = Command::new(env!("CARGO_BIN_EXE_sci-burn"))
        .args(["--duty", "30", "--seconds", "30"])
        .spawn()
        .unwrap();
    let mut agent = Command::new(sci_tests::cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--procfs", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let windows: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let stdout = agent.stdout.take().unwrap();
    let lines = Arc::clone(&windows);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines
                .lock()
                .unwrap()
                .push(serde_json::from_str(&line).unwrap());
        }
    });
    let stderr = agent.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let metric = |series: &str| {
        sci_tests::fleet::http_get(metrics_port, "/metrics")
            .and_then(|(_, body)| metric_value(&body, series))
            .unwrap_or(0)
    };
    // Down for the first windows: retried, queued.
    wait_for("three windows and refused connections", 60, || {
        windows.lock().unwrap().len() >= 3
            && metric("sci_otlp_requests_total{outcome=\"unavailable\"}") >= 2
    })
    .await;
    let receiver = Receiver::new(Mode::Ok);
    let server = receiver.serve(port);
    // Back: the queued windows and the next ones arrive.
    wait_for("six windows received", 60, || {
        let starts: std::collections::BTreeSet<u64> = receiver
            .got
            .lock()
            .unwrap()
            .accepted
            .iter()
            .map(|p| p.start_ns)
            .collect();
        starts.len() >= 6
    })
    .await;
    assert_eq!(metric("sci_otlp_points_total{result=\"refused\"}"), 0);
    assert_eq!(metric("sci_otlp_points_total{result=\"queue_full\"}"), 0);
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    reader.join().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "{log}");
    let _ = burner.kill();
    let _ = burner.wait();
    server.abort();

    let got = receiver.got.lock().unwrap();
    let windows = windows.lock().unwrap();
    let mut by_window: BTreeMap<u64, Vec<&Point>> = BTreeMap::new();
    for p in &got.accepted {
        // Gauges carry the window's end only.
        let key = if p.temporality.is_some() {
            p.start_ns
        } else {
            0
        };
        by_window.entry(key).or_default().push(p);
    }
    let mut compared = 0;
    let mut windows_seen = 0;
    let mut burner_cpu_s = 0.0;
    for w in windows.iter() {
        let (start, end) = (
            w["start_unix_ns"].as_u64().unwrap(),
            w["end_unix_ns"].as_u64().unwrap(),
        );
        let points = by_window
            .get(&start)
            .unwrap_or_else(|| panic!("window {} never reached the receiver", w["seq"]));
        windows_seen += 1;
        let mut received: BTreeMap<(String, String, String), f64> = BTreeMap::new();
        for p in points {
            assert_eq!(p.end_ns, end, "{}: DELTA over exactly the window", p.metric);
            assert_eq!(
                p.temporality,
                Some(AggregationTemporality::Delta as i32),
                "{}",
                p.metric
            );
            assert_eq!(p.resource["host.name"], "otlp-host");
            assert_eq!(p.resource["sci.datacenter"], "dc-otlp");
            let key = (
                p.resource["service.name"].clone(),
                p.metric.clone(),
                p.attributes.get("scenario").cloned().unwrap_or_default(),
            );
            assert!(received.insert(key, p.value).is_none(), "{p:?} twice");
        }
        for p in got
            .accepted
            .iter()
            .filter(|p| p.temporality.is_none() && p.end_ns == end)
        {
            received.insert(
                ("sci-agent".into(), p.metric.clone(), String::new()),
                p.value,
            );
        }
        let expected = expected_points(w);
        assert_eq!(
            received.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "window {}",
            w["seq"]
        );
        for (key, want) in &expected {
            let got = received[key];
            assert!(
                close(got, *want),
                "window {} {key:?}: OTLP {got}, window {want}",
                w["seq"]
            );
            compared += 1;
        }
        burner_cpu_s += received
            .get(&(
                "burner".into(),
                "sci.workload.cpu.time".into(),
                "credit".into(),
            ))
            .copied()
            .unwrap_or(0.0);
    }
    assert!(windows_seen >= 6, "{windows_seen} windows compared");
    assert!(burner_cpu_s > 0.0, "the burner's service was exported");
    // Nothing dropped, and the sent count is what arrived.
    let sent = got.accepted.len() as u64;
    drop(got);
    println!("{windows_seen} windows, {compared} points equal to 1e-9; {sent} points sent");
}
