//! OTLP metrics export of the aggregator's rollups (`[otlp]` in
//! aggregator.toml; OTLP/gRPC or OTLP/HTTP with binary protobuf), built on
//! the official OpenTelemetry protos (`opentelemetry-proto`).
//!
//! The series are remote-write's ([`super::series`]), so the exporter works
//! like [`super::remote_write`]: the store is the queue, a state file keeps
//! the position (end of the last step the receiver took) and the counters'
//! totals, written after each accepted request; each round reads the next
//! steps (at most `max_steps_per_request`, `delay` behind the clock) and
//! sends one `ExportMetricsServiceRequest`, retried with backoff while the
//! receiver is down or busy ([`agent_common::otlp`] says which codes), the
//! position unmoved. A permanent refusal drops that request's points,
//! counted (`sci_otlp_points_total{result="refused"}`) and logged, and the
//! position moves on. Those are the only drops.
//!
//! Temporality: every counter is a monotonic Sum with CUMULATIVE
//! temporality from the state's origin (`start_time_unix_nano`), sampled at
//! each rollup step's end, so `x(b) - x(a)` is exactly the store's sum over
//! `[a, b)`; the hosts are a Gauge. Names follow the OpenTelemetry naming
//! rules (dotted namespace, the unit in `unit` as UCUM: `g`, `J`, `s`,
//! `{transaction}`), chosen so that the specification's translation to
//! Prometheus names (unit suffix, `_total` for monotonic sums), as a
//! Collector's Prometheus exporters apply it, gives remote-write's names
//! (`sci.fleet.energy` in `J` is `sci_fleet_energy_joules_total`); no
//! Collector runs in the tests here, so that path is not tested.
//! `datacenter` and `scenario` are point attributes (a Prometheus exporter
//! keeps those as labels; resource attributes go to `target_info`); the
//! resource is the aggregator: `service.name = sci-aggregator`,
//! `service.version`, `host.name`, and `resource_attributes`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use agent_common::otlp::opentelemetry_proto::tonic::common::v1::KeyValue;
use agent_common::otlp::opentelemetry_proto::tonic::metrics::v1::{
    metric, AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum,
};
use agent_common::otlp::opentelemetry_proto::tonic::resource::v1::Resource;
use agent_common::otlp::{
    double_point, host_name, resource_attributes, scope, ClientSettings, OtlpClient, OtlpStats,
};
use agent_common::prometheus_text::Family;
use serde::Deserialize;

use super::remote_write::{check_pacing, run_rounds, RollupExport, State};
use super::series::{names, read_steps_blocking, SeriesKey, Step};
use crate::error::AggregatorError;
use crate::store::SharedStore;

/// `[otlp]` in aggregator.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// `grpc` (OTLP/gRPC) or `http/protobuf` (OTLP/HTTP, binary protobuf).
    pub protocol: String,
    /// The receiver: `http://collector:4317` (gRPC) or `http://collector:4318` (HTTP, `/v1/metrics` is appended).
    pub endpoint: String,
    /// gRPC metadata sent with every request (e.g. `authorization`).
    pub headers: BTreeMap<String, String>,
    /// Position and totals (default: the SQLite database's path with
    /// `.otlp.json`; required with PostgreSQL).
    pub state_file: Option<PathBuf>,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub delay: Duration,
    pub start: Option<String>,
    pub max_steps_per_request: usize,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub timeout: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub min_backoff: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_backoff: Duration,
    /// Added to the resource (e.g. `deployment.environment.name`).
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            protocol: "grpc".into(),
            endpoint: String::new(),
            headers: BTreeMap::new(),
            state_file: None,
            delay: Duration::from_secs(120),
            start: None,
            max_steps_per_request: 60,
            timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            resource_attributes: BTreeMap::new(),
        }
    }
}

impl OtlpConfig {
    /// The key and the reason of the first bad value.
    pub fn validate(&self) -> Result<(), String> {
        self.client_settings().check()?;
        check_pacing(
            "otlp",
            self.max_steps_per_request,
            self.timeout,
            (self.min_backoff, self.max_backoff),
            self.start.as_deref(),
        )
    }

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
}

/// The exporter's figures for /metrics: the client's, and the position.
#[derive(Debug, Default)]
pub struct OtlpExportStats {
    pub client: OtlpStats,
    pub position_s: AtomicU64,
}

impl OtlpExportStats {
    pub fn families(&self, out: &mut Vec<Family>) {
        self.client.families(out);
        out.push(
            Family::gauge(
                "sci_otlp_position_seconds",
                "End of the last rollup step the OTLP receiver accepted (unix seconds).",
            )
            .single(self.position_s.load(Ordering::Relaxed) as f64),
        );
    }
}

/// OTLP name, UCUM unit and description of an exported series (by its
/// remote-write name).
pub fn otel_metric(prometheus_name: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match prometheus_name {
        names::OPERATIONAL_G => (
            "sci.fleet.operational_carbon",
            "g",
            "Operational carbon O (energy x PUE x intensity), cumulative from the export's origin.",
        ),
        names::EMBODIED_G => (
            "sci.fleet.embodied_carbon",
            "g",
            "Embodied carbon M (time-share of the hosts' embodied emissions), cumulative.",
        ),
        names::ENERGY_J => (
            "sci.fleet.energy",
            "J",
            "Energy measured or estimated, cumulative.",
        ),
        names::ESTIMATED_J => (
            "sci.fleet.estimated_energy",
            "J",
            "Part of the energy that was estimated (no power meter), cumulative.",
        ),
        names::UNATTRIBUTED_J => (
            "sci.fleet.unattributed_energy",
            "J",
            "Energy no workload was attributed, cumulative.",
        ),
        names::HOST_S => (
            "sci.fleet.host",
            "s",
            "Host time covered by windows, cumulative.",
        ),
        names::HOSTS => (
            "sci.fleet.hosts",
            "{host}",
            "Hosts whose data spans the step.",
        ),
        names::SCENARIO_TRANSACTIONS => (
            "sci.fleet.scenario.transactions",
            "{transaction}",
            "Completed transactions, cumulative.",
        ),
        names::SCENARIO_UNITS => (
            "sci.fleet.scenario.business_units",
            "{unit}",
            "Weighted business units R (transactions x the scenario's weight), cumulative.",
        ),
        names::SCENARIO_ENERGY_J => (
            "sci.fleet.scenario.energy",
            "J",
            "Energy attributed to the scenario (idle share included), cumulative.",
        ),
        names::SCENARIO_OPERATIONAL_G => (
            "sci.fleet.scenario.operational_carbon",
            "g",
            "Operational carbon of the scenario, cumulative.",
        ),
        names::SCENARIO_EMBODIED_G => (
            "sci.fleet.scenario.embodied_carbon",
            "g",
            "Embodied carbon of the scenario, cumulative.",
        ),
        _ => return None,
    })
}

fn attributes(labels: &[(String, String)]) -> Vec<(&str, &str)> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The export request for `steps` (adding to `totals`, counters from
/// `origin_s`), and its data point count.
pub fn build_request(
    steps: &[Step],
    totals: &mut BTreeMap<SeriesKey, f64>,
    origin_s: u64,
    resource: &[KeyValue],
) -> (ExportMetricsServiceRequest, u64) {
    const NS: u64 = 1_000_000_000;
    let mut counters: BTreeMap<String, Vec<NumberDataPoint>> = BTreeMap::new();
    let mut gauges: BTreeMap<String, Vec<NumberDataPoint>> = BTreeMap::new();
    for s in steps {
        for (key, add) in &s.additions {
            *totals.entry(key.clone()).or_default() += add;
        }
        for ((name, labels), value) in totals.iter() {
            counters.entry(name.clone()).or_default().push(double_point(
                &attributes(labels),
                origin_s * NS,
                s.end_s * NS,
                *value,
            ));
        }
        for ((name, labels), value) in &s.gauges {
            gauges.entry(name.clone()).or_default().push(double_point(
                &attributes(labels),
                0,
                s.end_s * NS,
                *value,
            ));
        }
    }
    let mut points = 0;
    let mut metrics = Vec::new();
    for (name, data_points, sum) in counters
        .into_iter()
        .map(|(n, p)| (n, p, true))
        .chain(gauges.into_iter().map(|(n, p)| (n, p, false)))
    {
        let Some((otel_name, unit, description)) = otel_metric(&name) else {
            continue;
        };
        points += data_points.len() as u64;
        let data = if sum {
            metric::Data::Sum(Sum {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })
        } else {
            metric::Data::Gauge(Gauge { data_points })
        };
        metrics.push(Metric {
            name: otel_name.to_string(),
            description: description.to_string(),
            unit: unit.to_string(),
            metadata: Vec::new(),
            data: Some(data),
        });
    }
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.to_vec(),
                dropped_attributes_count: 0,
                entity_refs: Vec::new(),
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope("sci-cf/aggregator")),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    (request, points)
}

/// The state file of a configuration: `state_file`, else next to the SQLite database.
pub fn state_path(cfg: &OtlpConfig, database: &Path, postgres: bool) -> Result<PathBuf, String> {
    match (&cfg.state_file, postgres) {
        (Some(p), _) => Ok(p.clone()),
        (None, false) => Ok(database.with_extension("otlp.json")),
        (None, true) => Err(
            "otlp.state_file: required with postgres_url (each exporting aggregator keeps its own)"
                .into(),
        ),
    }
}

pub struct OtlpExporter {
    cfg: OtlpConfig,
    store: SharedStore,
    weights: BTreeMap<String, f64>,
    stats: Arc<OtlpExportStats>,
    client: OtlpClient,
    resource: Vec<KeyValue>,
    state_path: PathBuf,
    state: State,
    totals: BTreeMap<SeriesKey, f64>,
}

impl OtlpExporter {
    /// Opens the state file (or starts at `from_s`, else `start`, else now).
    pub fn open(
        cfg: OtlpConfig,
        state_path: PathBuf,
        store: SharedStore,
        weights: BTreeMap<String, f64>,
        stats: Arc<OtlpExportStats>,
        from_s: Option<u64>,
    ) -> Result<Self, AggregatorError> {
        cfg.validate().map_err(AggregatorError::Invalid)?;
        let (state, totals) = State::open(
            &state_path,
            "otlp",
            store.layout().step_s,
            from_s,
            cfg.start.as_deref(),
            cfg.delay,
        )?;
        let client = OtlpClient::new(&cfg.client_settings()).map_err(AggregatorError::Invalid)?;
        let resource =
            resource_attributes("sci-aggregator", &host_name(), &cfg.resource_attributes);
        stats.client.configured.store(1, Ordering::Relaxed);
        stats.position_s.store(state.position_s, Ordering::Relaxed);
        Ok(OtlpExporter {
            cfg,
            store,
            weights,
            stats,
            client,
            resource,
            state_path,
            state,
            totals,
        })
    }

    pub fn position_s(&self) -> u64 {
        self.state.position_s
    }

    /// Exports until the position reaches `until_s` (a backfill), or for
    /// ever (`None`), following the clock less `delay`.
    pub async fn run(&mut self, until_s: Option<u64>) -> Result<(), AggregatorError> {
        run_rounds(self, until_s).await
    }
    /// Sends `[position, end)` until the receiver takes or refuses it.
    async fn export(&mut self, end_s: u64) -> Result<(), AggregatorError> {
        let from = self.state.position_s;
        let steps =
            read_steps_blocking(Arc::clone(&self.store), from, end_s, self.weights.clone()).await?;
        let mut totals = self.totals.clone();
        let (request, points) =
            build_request(&steps, &mut totals, self.state.origin_s, &self.resource);
        self.client
            .deliver(
                &request,
                points,
                &self.stats.client,
                &format!("{from}..{end_s}"),
            )
            .await;
        self.state.advance(&self.state_path, end_s, &totals)?;
        self.totals = totals;
        self.stats.position_s.store(end_s, Ordering::Relaxed);
        Ok(())
    }
}

impl RollupExport for OtlpExporter {
    const NAME: &'static str = "otlp";
    fn position_s(&self) -> u64 {
        self.state.position_s
    }
    fn step_s(&self) -> u64 {
        self.store.layout().step_s
    }
    fn pacing(&self) -> (Duration, usize, Duration) {
        (
            self.cfg.delay,
            self.cfg.max_steps_per_request,
            self.cfg.max_backoff,
        )
    }
    async fn export(&mut self, end_s: u64) -> Result<(), AggregatorError> {
        OtlpExporter::export(self, end_s).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agent_common::otlp::opentelemetry_proto::tonic::metrics::v1::number_data_point;

    #[test]
    fn every_series_has_an_otel_name_and_counters_are_cumulative_from_the_origin() {
        for name in names::ALL {
            assert!(otel_metric(name).is_some(), "{name}");
        }
        let k = |dc: &str| {
            (
                names::ENERGY_J.to_string(),
                vec![("datacenter".to_string(), dc.to_string())],
            )
        };
        let steps = vec![
            Step {
                end_s: 120,
                additions: [(k("a"), 1.5)].into_iter().collect(),
                gauges: [(
                    (
                        names::HOSTS.to_string(),
                        vec![("datacenter".to_string(), "a".to_string())],
                    ),
                    2.0,
                )]
                .into_iter()
                .collect(),
            },
            Step {
                end_s: 180,
                additions: [(k("a"), 2.0)].into_iter().collect(),
                gauges: BTreeMap::new(),
            },
        ];
        let mut totals = BTreeMap::new();
        let (r, n) = build_request(&steps, &mut totals, 60, &[]);
        assert_eq!(n, 3);
        let metrics = &r.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(metrics[0].name, "sci.fleet.energy");
        assert_eq!(metrics[0].unit, "J");
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("not a sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let got: Vec<(u64, u64, Option<number_data_point::Value>)> = sum
            .data_points
            .iter()
            .map(|p| (p.start_time_unix_nano, p.time_unix_nano, p.value))
            .collect();
        use number_data_point::Value::AsDouble;
        assert_eq!(
            got,
            [
                (60_000_000_000, 120_000_000_000, Some(AsDouble(1.5))),
                (60_000_000_000, 180_000_000_000, Some(AsDouble(3.5)))
            ]
        );
        assert!(matches!(metrics[1].data, Some(metric::Data::Gauge(_))));
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |f: &dyn Fn(&mut OtlpConfig)| {
            let mut c = OtlpConfig {
                endpoint: "http://127.0.0.1:4317".into(),
                ..Default::default()
            };
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(&|c| c.endpoint = "127.0.0.1:4317".into()).contains("otlp.endpoint"));
        assert!(bad(&|c| c.max_steps_per_request = 0).contains("otlp.max_steps_per_request"));
        assert!(bad(&|c| c.start = Some("soon".into())).contains("otlp.start"));
    }
}
