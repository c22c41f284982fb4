//! OTLP export of every window (`[otlp]` in agent.toml; OTLP/gRPC or
//! OTLP/HTTP with binary protobuf), beside the stream to the aggregator and
//! independent of it.
//!
//! Each window becomes one `ExportMetricsServiceRequest` (official
//! OpenTelemetry protos): a resource for the host (`service.name =
//! sci-agent`) with the host's and each scenario's figures, and one
//! resource per workload service (`service.name` = the service its rule
//! gave, `unknown_service` for processes no rule named, as the semantic
//! conventions say) with its energy, carbon and CPU per scenario. Every
//! resource carries `host.name`, `sci.datacenter` (when set) and the
//! configured `resource_attributes`. Sums are monotonic with DELTA
//! temporality: each point covers exactly its window (`start_time_unix_nano`
//! to `time_unix_nano`), so a receiver adds them up without state. The
//! factors travel as gauges at the window's end (intensity, PUE) and as the
//! energy's attributes (`sci.energy.source`, `sci.energy.estimated`).
//!
//! Requests wait in a bounded in-memory queue (`max_queue_windows`); one
//! task sends them in order through [`agent_common::otlp::OtlpClient`],
//! which retries while the receiver is down or busy. When the queue is
//! full the oldest waiting window is dropped, its points counted
//! (`sci_otlp_points_total{result="queue_full"}`); a permanent refusal
//! drops the request, counted (`result="refused"`). The windows themselves
//! stay in the spool and reach the aggregator either way: OTLP is a copy.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use agent_common::otlp::opentelemetry_proto::tonic::common::v1::KeyValue;
use agent_common::otlp::opentelemetry_proto::tonic::metrics::v1::{
    metric, AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use agent_common::otlp::opentelemetry_proto::tonic::resource::v1::Resource;
use agent_common::otlp::{
    double_point, resource_attributes, scope, string_attr, ClientSettings, OtlpClient, OtlpStats,
};
use agent_common::prometheus_text::Family;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::error::AgentError;
use crate::window::WindowReport;

/// `[otlp]` in agent.toml (absent: no OTLP export).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// `grpc` (OTLP/gRPC) or `http/protobuf` (OTLP/HTTP, binary protobuf).
    pub protocol: String,
    /// The receiver: `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318` (HTTP, `/v1/metrics` is appended).
    pub endpoint: String,
    /// gRPC metadata sent with every request (e.g. `authorization`).
    pub headers: BTreeMap<String, String>,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub timeout: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub min_backoff: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_backoff: Duration,
    /// Windows waiting to be sent; beyond it the oldest is dropped, counted.
    pub max_queue_windows: usize,
    /// Added to every resource (e.g. `deployment.environment.name`).
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            protocol: "grpc".into(),
            endpoint: String::new(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_queue_windows: 1000,
            resource_attributes: BTreeMap::new(),
        }
    }
}

/// Largest `max_queue_windows`: a window's request is a few KB, so this
/// bounds the queue's memory to tens of MB.
pub const MAX_QUEUE_WINDOWS: usize = 100_000;

impl OtlpConfig {
    fn client_settings(&self) -> ClientSettings<'_> {
        ClientSettings {
            section: "otlp",
            protocol: &self.protocol,
            endpoint: &self.endpoint,
            headers: &self.headers,
            timeout: self.timeout,
            min_backoff: self.min_backoff,
            max_backoff: self.max_backoff,
            resource_attributes: &self.resource_attributes,
        }
    }

    pub fn validate(&self) -> Result<(), AgentError> {
        let err = |key: &str, message: String| AgentError::Config {
            path: key.into(),
            message,
        };
        self.client_settings().check().map_err(|m| err("otlp", m))?;
        if self.max_queue_windows == 0 || self.max_queue_windows > MAX_QUEUE_WINDOWS {
            return Err(err(
                "otlp.max_queue_windows",
                format!("{}: give 1 to {MAX_QUEUE_WINDOWS}", self.max_queue_windows),
            ));
        }
        Ok(())
    }
}

/// The exporter's figures for /metrics: the client's, and the queue's length.
#[derive(Debug, Default)]
pub struct OtlpSinkStats {
    pub client: OtlpStats,
    pub queued_windows: AtomicU64,
}

impl OtlpSinkStats {
    pub fn families(&self, out: &mut Vec<Family>) {
        self.client.families(out);
        out.push(
            Family::gauge(
                "sci_otlp_queue_windows",
                "Windows waiting in the OTLP exporter's queue.",
            )
            .single(self.queued_windows.load(Ordering::Relaxed) as f64),
        );
    }
}

struct Pending {
    seq: u64,
    request: ExportMetricsServiceRequest,
    points: u64,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Pending>,
    /// The window being sent (never dropped from under the sender).
    in_flight: Option<u64>,
}

/// The exporter: [`OtlpSink::offer`] queues a window, a task sends.
pub struct OtlpSink {
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
    stats: Arc<OtlpSinkStats>,
    max_queue: usize,
    resource: Vec<KeyValue>,
}

impl OtlpSink {
    /// Starts the sending task (on the current tokio runtime).
    pub fn start(cfg: &OtlpConfig) -> Result<(OtlpSink, Arc<OtlpSinkStats>), AgentError> {
        cfg.validate()?;
        let client =
            OtlpClient::new(&cfg.client_settings()).map_err(|message| AgentError::Config {
                path: "otlp".into(),
                message,
            })?;
        let stats = Arc::new(OtlpSinkStats::default());
        stats.client.configured.store(1, Ordering::Relaxed);
        let sink = OtlpSink {
            queue: Arc::new(Mutex::new(Queue::default())),
            notify: Arc::new(Notify::new()),
            stats: Arc::clone(&stats),
            max_queue: cfg.max_queue_windows,
            // service.name and host.name are set per resource and window.
            resource: resource_attributes("sci-agent", "", &cfg.resource_attributes),
        };
        tokio::spawn(send_loop(
            client,
            Arc::clone(&sink.queue),
            Arc::clone(&sink.notify),
            Arc::clone(&stats),
        ));
        Ok((sink, stats))
    }

    /// Queues the window's request; drops the oldest waiting one, counted, when full.
    pub fn offer(&self, window: &WindowReport) {
        let (request, points) = build_request(window, &self.resource);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.waiting.len() >= self.max_queue {
            let at = usize::from(q.in_flight.is_some() && q.waiting.len() > 1);
            let Some(dropped) = q.waiting.remove(at) else {
                break;
            };
            if q.in_flight == Some(dropped.seq) {
                // Only the window in flight is waiting: keep it, drop the new one.
                q.waiting.push_front(dropped);
                self.stats
                    .client
                    .points_queue_full
                    .fetch_add(points, Ordering::Relaxed);
                tracing::warn!(
                    "otlp: queue full ({} windows): window {} dropped (sci_otlp_points_total{{result=\"queue_full\"}})",
                    self.max_queue,
                    window.seq
                );
                return;
            }
            self.stats
                .client
                .points_queue_full
                .fetch_add(dropped.points, Ordering::Relaxed);
            tracing::warn!(
                "otlp: queue full ({} windows): window {} dropped (sci_otlp_points_total{{result=\"queue_full\"}})",
                self.max_queue,
                dropped.seq
            );
        }
        q.waiting.push_back(Pending {
            seq: window.seq,
            request,
            points,
        });
        self.stats
            .queued_windows
            .store(q.waiting.len() as u64, Ordering::Relaxed);
        drop(q);
        self.notify.notify_one();
    }
}

impl OtlpSink {
    /// Lets the sender deliver what is queued for at most `grace` (at
    /// shutdown); says how many windows were left.
    pub async fn drain(&self, grace: Duration) {
        let pending = || {
            let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.len()
        };
        let deadline = tokio::time::Instant::now() + grace;
        while pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match pending() {
            0 => {}
            n => tracing::warn!(
                "otlp: stopped with {n} windows not exported (the receiver did not take them within {grace:?}); they are in the spool or stdout, not in OTLP"
            ),
        }
    }
}

async fn send_loop(
    client: OtlpClient,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
    stats: Arc<OtlpSinkStats>,
) {
    loop {
        let next = {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            let next = q
                .waiting
                .front()
                .map(|p| (p.seq, p.request.clone(), p.points));
            q.in_flight = next.as_ref().map(|n| n.0);
            next
        };
        let Some((seq, request, points)) = next else {
            notify.notified().await;
            continue;
        };
        client
            .deliver(&request, points, &stats.client, &format!("window {seq}"))
            .await;
        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.waiting.front().is_some_and(|p| p.seq == seq) {
            q.waiting.pop_front();
        }
        q.in_flight = None;
        stats
            .queued_windows
            .store(q.waiting.len() as u64, Ordering::Relaxed);
    }
}

/// Name, UCUM unit, description.
type Spec = (&'static str, &'static str, &'static str);

const HOST_ENERGY: Spec = (
    "sci.host.energy",
    "J",
    "Host energy of the window (packages + dram, or psys, or the model).",
);
const HOST_IDLE_ENERGY: Spec = (
    "sci.host.idle_energy",
    "J",
    "Part of the host energy that is idle baseline.",
);
const HOST_UNATTRIBUTED_ENERGY: Spec = (
    "sci.host.unattributed_energy",
    "J",
    "Energy no process could be charged with.",
);
const HOST_CARBON: Spec = (
    "sci.host.operational_carbon",
    "g",
    "Operational carbon of the host, gCO2e (energy x PUE x intensity).",
);
const HOST_EMBODIED: Spec = (
    "sci.host.embodied_carbon",
    "g",
    "Embodied carbon of the host apportioned to the window, gCO2e.",
);
const HOST_CPU: Spec = (
    "sci.host.cpu.time",
    "s",
    "Busy CPU time of the host, summed over CPUs.",
);
const INTENSITY: Spec = (
    "sci.host.carbon_intensity",
    "g/kW.h",
    "Grid carbon intensity used for the window, gCO2e per kWh.",
);
const PUE: Spec = (
    "sci.host.pue",
    "1",
    "Power usage effectiveness used for the window.",
);
const SCENARIO_TRANSACTIONS: Spec = (
    "sci.scenario.transactions",
    "{transaction}",
    "Completed transactions of the scenario in the window.",
);
const SCENARIO_ENERGY: Spec = (
    "sci.scenario.energy",
    "J",
    "Energy attributed to the scenario in the window.",
);
const SCENARIO_CARBON: Spec = (
    "sci.scenario.operational_carbon",
    "g",
    "Operational carbon attributed to the scenario in the window.",
);
const SCENARIO_EMBODIED: Spec = (
    "sci.scenario.embodied_carbon",
    "g",
    "Embodied carbon attributed to the scenario in the window.",
);
const SCENARIO_CPU: Spec = (
    "sci.scenario.cpu.time",
    "s",
    "CPU time attributed to the scenario in the window.",
);
const WORKLOAD_ENERGY: Spec = (
    "sci.workload.energy",
    "J",
    "Energy of the service's processes in the window (dynamic + idle share).",
);
const WORKLOAD_CARBON: Spec = (
    "sci.workload.operational_carbon",
    "g",
    "Operational carbon of the service's processes in the window.",
);
const WORKLOAD_EMBODIED: Spec = (
    "sci.workload.embodied_carbon",
    "g",
    "Embodied carbon apportioned to the service's processes in the window.",
);
const WORKLOAD_CPU: Spec = (
    "sci.workload.cpu.time",
    "s",
    "CPU time of the service's processes in the window.",
);

/// Every metric the agent exports (name, unit), for the docs' check.
pub const METRICS: [Spec; 17] = [
    HOST_ENERGY,
    HOST_IDLE_ENERGY,
    HOST_UNATTRIBUTED_ENERGY,
    HOST_CARBON,
    HOST_EMBODIED,
    HOST_CPU,
    INTENSITY,
    PUE,
    SCENARIO_TRANSACTIONS,
    SCENARIO_ENERGY,
    SCENARIO_CARBON,
    SCENARIO_EMBODIED,
    SCENARIO_CPU,
    WORKLOAD_ENERGY,
    WORKLOAD_CARBON,
    WORKLOAD_EMBODIED,
    WORKLOAD_CPU,
];

/// The service name of processes no rule named (OpenTelemetry's default).
pub const UNKNOWN_SERVICE: &str = "unknown_service";

fn delta_sum((name, unit, description): Spec, data_points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: unit.to_string(),
        metadata: Vec::new(),
        data: Some(metric::Data::Sum(Sum {
            data_points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
    }
}

fn gauge((name, unit, description): Spec, data_points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.to_string(),
        description: description.to_string(),
        unit: unit.to_string(),
        metadata: Vec::new(),
        data: Some(metric::Data::Gauge(Gauge { data_points })),
    }
}

/// Per service and scenario: energy (dynamic + idle share), carbon, embodied, CPU ns.
pub fn workloads(window: &WindowReport) -> BTreeMap<(String, String), [f64; 4]> {
    let mut out: BTreeMap<(String, String), [f64; 4]> = BTreeMap::new();
    for p in &window.processes {
        let key = (
            p.service.as_deref().unwrap_or(UNKNOWN_SERVICE).to_string(),
            p.scenario
                .as_deref()
                .unwrap_or(agent_common::UNASSIGNED)
                .to_string(),
        );
        let t = out.entry(key).or_default();
        t[0] += p.energy_j + p.idle_share_j;
        t[1] += p.carbon_g;
        t[2] += p.embodied_g;
        t[3] += p.cpu_ns as f64;
    }
    out
}

/// The window's export request, and its data point count.
pub fn build_request(
    window: &WindowReport,
    resource: &[KeyValue],
) -> (ExportMetricsServiceRequest, u64) {
    let (start, end) = (window.start_unix_ns, window.end_unix_ns);
    let mut points = 0u64;
    let mut count = |metrics: &[Metric]| {
        for m in metrics {
            points += match &m.data {
                Some(metric::Data::Sum(s)) => s.data_points.len() as u64,
                Some(metric::Data::Gauge(g)) => g.data_points.len() as u64,
                _ => 0,
            };
        }
    };
    let estimated = if window.estimated { "true" } else { "false" };
    let energy_attrs = [
        ("sci.energy.source", window.energy_source.as_str()),
        ("sci.energy.estimated", estimated),
    ];
    let one = |attrs: &[(&str, &str)], v: f64| vec![double_point(attrs, start, end, v)];
    let at_end = |v: f64| vec![double_point(&[], 0, end, v)];
    let mut host_metrics = vec![
        delta_sum(HOST_ENERGY, one(&energy_attrs, window.host_energy_j)),
        delta_sum(HOST_IDLE_ENERGY, one(&energy_attrs, window.idle_energy_j)),
        delta_sum(
            HOST_UNATTRIBUTED_ENERGY,
            one(&energy_attrs, window.unattributed_energy_j),
        ),
        delta_sum(
            HOST_CARBON,
            one(
                &[("sci.intensity.source", window.intensity_source.as_str())],
                window.host_carbon_g,
            ),
        ),
        delta_sum(HOST_EMBODIED, one(&[], window.host_embodied_g)),
        delta_sum(HOST_CPU, one(&[], window.busy_cpu_ns as f64 / 1e9)),
        gauge(INTENSITY, at_end(window.carbon_intensity_g_per_kwh)),
        gauge(PUE, at_end(window.pue)),
    ];
    let per_scenario = |get: fn(&crate::window::ScenarioRecord) -> f64| {
        window
            .scenarios
            .iter()
            .map(|s| double_point(&[("scenario", s.scenario.as_str())], start, end, get(s)))
            .collect::<Vec<_>>()
    };
    if !window.scenarios.is_empty() {
        host_metrics.extend([
            delta_sum(
                SCENARIO_TRANSACTIONS,
                per_scenario(|s| s.transactions as f64),
            ),
            delta_sum(SCENARIO_ENERGY, per_scenario(|s| s.energy_j)),
            delta_sum(SCENARIO_CARBON, per_scenario(|s| s.carbon_g)),
            delta_sum(SCENARIO_EMBODIED, per_scenario(|s| s.embodied_g)),
            delta_sum(SCENARIO_CPU, per_scenario(|s| s.cpu_ns as f64 / 1e9)),
        ]);
    }
    count(&host_metrics);
    let with_resource = |service: &str, metrics: Vec<Metric>| {
        let mut attributes = vec![
            string_attr("service.name", service),
            string_attr("host.name", &window.host),
        ];
        attributes.extend(
            resource
                .iter()
                .filter(|kv| kv.key != "service.name" && kv.key != "host.name")
                .cloned(),
        );
        if let Some(dc) = &window.datacenter {
            attributes.push(string_attr("sci.datacenter", dc));
        }
        ResourceMetrics {
            resource: Some(Resource {
                attributes,
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope("sci-cf/agent")),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }
    };
    let mut resource_metrics = vec![with_resource("sci-agent", host_metrics)];
    let mut by_service: BTreeMap<String, Vec<(String, [f64; 4])>> = BTreeMap::new();
    for ((service, scenario), t) in workloads(window) {
        by_service.entry(service).or_default().push((scenario, t));
    }
    for (service, rows) in by_service {
        let series = |i: usize, scale: f64| {
            rows.iter()
                .map(|(scenario, t)| {
                    double_point(&[("scenario", scenario.as_str())], start, end, t[i] * scale)
                })
                .collect::<Vec<_>>()
        };
        let metrics = vec![
            delta_sum(WORKLOAD_ENERGY, series(0, 1.0)),
            delta_sum(WORKLOAD_CARBON, series(1, 1.0)),
            delta_sum(WORKLOAD_EMBODIED, series(2, 1.0)),
            delta_sum(WORKLOAD_CPU, series(3, 1e-9)),
        ];
        count(&metrics);
        resource_metrics.push(with_resource(&service, metrics));
    }
    (ExportMetricsServiceRequest { resource_metrics }, points)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn window(seq: u64) -> WindowReport {
        let mut w = WindowReport::new(
            "h".into(),
            "i".into(),
            seq * 1_000_000_000,
            (seq + 1) * 1_000_000_000,
            crate::window::CpuSource::Ebpf,
            2,
        );
        w.seq = seq;
        w.processes = vec![crate::window::ProcessRecord {
            pid: 10,
            comm: "loan-api".into(),
            cpu_ns: 2_000_000_000,
            energy_j: 30.0,
            idle_share_j: 1.5,
            scenario: Some("query".into()),
            service: Some("loan-api".into()),
            ..Default::default()
        }];
        w
    }

    /// Receiver down (nothing listens): the sender holds the first window;
    /// the queue keeps `max_queue_windows`, and every window beyond it is
    /// dropped whole, its points counted, the one in flight never.
    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_waiting_windows_counted() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = OtlpConfig {
            endpoint: format!("http://127.0.0.1:{port}"),
            max_queue_windows: 2,
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            ..Default::default()
        };
        let (sink, stats) = OtlpSink::start(&cfg).unwrap();
        let (_, points) = build_request(&window(0), &sink.resource);
        // 8 host sums and gauges, 4 workload sums (one service, one scenario).
        assert_eq!(points, 12);
        sink.offer(&window(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while stats.client.requests("unavailable") == 0 {
            assert!(std::time::Instant::now() < deadline, "no attempt");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for seq in 1..6 {
            sink.offer(&window(seq));
        }
        let q = sink.queue.lock().unwrap();
        let seqs: Vec<u64> = q.waiting.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [0, 5], "the one in flight and the newest");
        assert_eq!(
            stats.client.points_queue_full.load(Ordering::Relaxed),
            4 * points
        );
        assert_eq!(stats.queued_windows.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_bad_queue_bound_is_named() {
        let c = OtlpConfig {
            endpoint: "http://127.0.0.1:4317".into(),
            max_queue_windows: 0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("otlp.max_queue_windows"));
    }
}
