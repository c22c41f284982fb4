//! OTLP export, shared by the agent's and the aggregator's exporters:
//! settings checks, a client over OTLP/gRPC (the `MetricsService` of the
//! official OpenTelemetry protos, `opentelemetry-proto`) or OTLP/HTTP
//! (`POST <endpoint>/v1/metrics`, binary protobuf), delivery with retries
//! and counted drops, and the exporter's `/metrics` families.
//!
//! Retried with backoff (doubling from `min_backoff` to `max_backoff`):
//! over gRPC, the codes the OTLP specification calls retryable
//! (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ABORTED, OUT_OF_RANGE,
//! DATA_LOSS) and RESOURCE_EXHAUSTED (a collector's memory limiter: back off
//! rather than drop); over HTTP, 429, 502, 503, 504 (at least a
//! `Retry-After`) and no answer. Anything else is a permanent refusal: the
//! request's points are dropped, counted
//! (`sci_otlp_points_total{result="refused"}`) and logged; points a
//! receiver rejects in a `partial_success` are counted the same way.
use std::boxed::Box;
use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use std::vec::Vec;
use std::{format, vec};

pub use opentelemetry_proto;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{number_data_point, NumberDataPoint};
use tonic::metadata::{Ascii, MetadataKey, MetadataValue};
use tonic::transport::Channel;

use crate::prometheus_text::Family;

/// Resource attributes the exporters set themselves.
pub const OWN_RESOURCE_KEYS: [&str; 3] = ["service.name", "service.version", "host.name"];

/// `protocol`: OTLP/gRPC (`grpc`) or OTLP/HTTP with binary protobuf
/// (`http/protobuf`), as OpenTelemetry's `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
pub const PROTOCOLS: [&str; 2] = ["grpc", "http/protobuf"];

/// The settings every OTLP exporter has, checked (`section` names them in errors).
pub struct ClientSettings<'a> {
    pub section: &'a str,
    pub protocol: &'a str,
    pub endpoint: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub resource_attributes: &'a BTreeMap<String, String>,
}

impl ClientSettings<'_> {
    /// The key and the reason of the first bad value.
    pub fn check(&self) -> Result<(), String> {
        let section = self.section;
        let endpoint = self.endpoint;
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
            format!(
                "{section}.endpoint {endpoint:?}: give an http://host:port endpoint (for TLS, run the collector next to the exporter)"
            )
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("{section}.endpoint {endpoint:?}: no host"));
        }
        if !PROTOCOLS.contains(&self.protocol) {
            return Err(format!(
                "{section}.protocol {:?}: give \"grpc\" or \"http/protobuf\"",
                self.protocol
            ));
        }
        if self.protocol == "http/protobuf" {
            http_uri(endpoint).map_err(|e| format!("{section}.endpoint {endpoint:?}: {e}"))?;
        }
        Channel::from_shared(endpoint.to_string())
            .map_err(|e| format!("{section}.endpoint {endpoint:?}: {e}"))?;
        if self.timeout.is_zero() {
            return Err(format!("{section}.timeout must be > 0"));
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            return Err(format!(
                "{section}.min_backoff must be > 0 and max_backoff at least min_backoff"
            ));
        }
        if self.headers.len() > 16 {
            return Err(format!("{section}.headers: at most 16 headers"));
        }
        for (name, value) in self.headers {
            name.parse::<MetadataKey<Ascii>>()
                .ok()
                .filter(|_| !name.starts_with("grpc-") && *name == name.to_ascii_lowercase())
                .ok_or_else(|| {
                    format!(
                        "{section}.headers.{name}: not a gRPC metadata name (lowercase, not grpc-*)"
                    )
                })?;
            value
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| format!("{section}.headers.{name}: value is not printable ASCII"))?;
        }
        if self.resource_attributes.len() > 16 {
            return Err(format!(
                "{section}.resource_attributes: at most 16 attributes"
            ));
        }
        for (key, value) in self.resource_attributes {
            if key.is_empty() || value.is_empty() || OWN_RESOURCE_KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "{section}.resource_attributes.{key:?}: empty, or one the exporter sets ({})",
                    OWN_RESOURCE_KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// What an OTLP exporter did, for /metrics.
#[derive(Debug, Default)]
pub struct OtlpStats {
    pub configured: AtomicU64,
    pub points_sent: AtomicU64,
    /// Refused for good: a non-retryable code, or a `partial_success` rejection.
    pub points_refused: AtomicU64,
    /// Dropped because the exporter's queue was full (agent only; the
    /// aggregator's queue is its store).
    pub points_queue_full: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Requests per outcome: `ok`, or the gRPC code (`unavailable`, ...).
    pub requests: Mutex<BTreeMap<&'static str, u64>>,
}

impl OtlpStats {
    fn request(&self, outcome: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn requests(&self, outcome: &str) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }

    pub fn families(&self, out: &mut Vec<Family>) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        out.push(
            Family::gauge("sci_otlp_configured", "1 when [otlp] is configured.")
                .single(load(&self.configured)),
        );
        out.push(
            Family::counter(
                "sci_otlp_points_total",
                "OTLP data points the receiver accepted (sent), refused for good (refused: a non-retryable code or a partial_success rejection), or dropped because the queue was full (queue_full).",
            )
            .with(&[("result", "sent")], load(&self.points_sent))
            .with(&[("result", "refused")], load(&self.points_refused))
            .with(&[("result", "queue_full")], load(&self.points_queue_full)),
        );
        let mut requests = Family::counter(
            "sci_otlp_requests_total",
            "OTLP export requests per outcome (ok, or the gRPC status code in snake case).",
        );
        for (outcome, n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            requests.push(&[("outcome", outcome)], *n as f64);
        }
        out.push(requests);
        out.push(
            Family::counter(
                "sci_otlp_bytes_total",
                "Encoded protobuf bytes of the OTLP requests the receiver accepted.",
            )
            .single(load(&self.bytes_sent)),
        );
    }
}

/// A gRPC code as a bounded metric label.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The OTLP specification's retryable codes, and RESOURCE_EXHAUSTED.
pub fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | ResourceExhausted
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
    )
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Taken (some points may have been rejected in a `partial_success`).
    Accepted,
    /// Refused for good: its points are counted as refused.
    Refused,
}

/// `<endpoint>/v1/metrics`, the OTLP/HTTP path of metrics.
fn http_uri(endpoint: &str) -> Result<hyper::Uri, String> {
    format!("{}/v1/metrics", endpoint.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("{e}"))
}

/// The HTTP/1 client of the OTLP/HTTP exporter (and of remote-write).
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

#[derive(Clone)]
enum Transport {
    Grpc(MetricsServiceClient<Channel>),
    Http(Box<(HttpClient, hyper::Uri)>),
}

/// One attempt's answer.
enum Answer {
    Accepted(ExportMetricsServiceResponse),
    /// Outcome label, message, and whether a retry can help (after at least this long).
    Failed(&'static str, String, Option<Duration>),
}

/// An OTLP `MetricsService` client with headers, a time limit and a backoff.
#[derive(Clone)]
pub struct OtlpClient {
    transport: Transport,
    endpoint: String,
    headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
    timeout: Duration,
    backoff: (Duration, Duration),
}

impl OtlpClient {
    /// A lazy channel: connects on the first request, reconnects after a
    /// failure. `settings` must have passed [`ClientSettings::check`].
    pub fn new(settings: &ClientSettings<'_>) -> Result<Self, String> {
        settings.check()?;
        let transport = if settings.protocol == "http/protobuf" {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            Transport::Http(Box::new((client, http_uri(settings.endpoint)?)))
        } else {
            let channel = Channel::from_shared(settings.endpoint.to_string())
                .map_err(|e| format!("{}: {e}", settings.endpoint))?
                .connect_timeout(settings.timeout)
                .timeout(settings.timeout)
                .connect_lazy();
            Transport::Grpc(MetricsServiceClient::new(channel))
        };
        let mut headers = Vec::new();
        for (k, v) in settings.headers {
            headers.push((
                k.parse()
                    .map_err(|_| format!("header {k}: not a metadata name"))?,
                v.parse()
                    .map_err(|_| format!("header {k}: not a metadata value"))?,
            ));
        }
        Ok(OtlpClient {
            transport,
            endpoint: settings.endpoint.to_string(),
            headers,
            timeout: settings.timeout,
            backoff: (settings.min_backoff, settings.max_backoff),
        })
    }

    /// Sends `request` (of `points` data points) until the receiver takes
    /// or refuses it, backing off on retryable answers; counts everything
    /// in `stats`. `what` names the data in the log.
    pub async fn deliver(
        &self,
        request: &ExportMetricsServiceRequest,
        points: u64,
        stats: &OtlpStats,
        what: &str,
    ) -> Delivered {
        use prost::Message;
        let bytes = request.encoded_len() as u64;
        let (mut backoff, max_backoff) = self.backoff;
        loop {
            let (outcome, message, retry_after) = match self.attempt(request).await {
                Answer::Accepted(response) => {
                    stats.request("ok");
                    let partial = response.partial_success.unwrap_or_default();
                    let rejected = u64::try_from(partial.rejected_data_points)
                        .unwrap_or(0)
                        .min(points);
                    stats
                        .points_sent
                        .fetch_add(points - rejected, Ordering::Relaxed);
                    stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                    if rejected > 0 {
                        stats.points_refused.fetch_add(rejected, Ordering::Relaxed);
                        tracing::error!(
                            "otlp: {} rejected {rejected} of {points} points of {what}: {}; they are dropped (sci_otlp_points_total{{result=\"refused\"}})",
                            self.endpoint,
                            partial.error_message
                        );
                    }
                    return Delivered::Accepted;
                }
                Answer::Failed(outcome, message, retry_after) => (outcome, message, retry_after),
            };
            stats.request(outcome);
            let Some(at_least) = retry_after else {
                stats.points_refused.fetch_add(points, Ordering::Relaxed);
                tracing::error!(
                    "otlp: {} refused {points} points of {what} ({outcome}): {message}; they are dropped (sci_otlp_points_total{{result=\"refused\"}})",
                    self.endpoint
                );
                return Delivered::Refused;
            };
            let wait = backoff.max(at_least).min(max_backoff.max(at_least));
            tracing::warn!("otlp: {outcome} {message}; retrying {what} in {wait:?}");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    /// One request, over the configured transport.
    async fn attempt(&self, request: &ExportMetricsServiceRequest) -> Answer {
        match &self.transport {
            Transport::Grpc(client) => {
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(self.timeout);
                for (k, v) in &self.headers {
                    call.metadata_mut().insert(k.clone(), v.clone());
                }
                let mut client = client.clone();
                let status = match tokio::time::timeout(self.timeout, client.export(call)).await {
                    Ok(Ok(response)) => return Answer::Accepted(response.into_inner()),
                    Ok(Err(status)) => status,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "no answer within {:?}",
                        self.timeout
                    )),
                };
                let retry = retryable(status.code()).then_some(Duration::ZERO);
                Answer::Failed(
                    code_label(status.code()),
                    status.message().to_string(),
                    retry,
                )
            }
            Transport::Http(http) => self.attempt_http(&http.0, &http.1, request).await,
        }
    }

    async fn attempt_http(
        &self,
        client: &HttpClient,
        uri: &hyper::Uri,
        request: &ExportMetricsServiceRequest,
    ) -> Answer {
        use prost::Message;
        let mut builder = hyper::Request::post(uri.clone())
            .header("content-type", "application/x-protobuf")
            .header("user-agent", concat!("sci-cf/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_encoded_bytes());
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(request.encode_to_vec()));
        let call = match builder.body(body) {
            Ok(call) => call,
            Err(e) => return Answer::Failed("error", e.to_string(), None),
        };
        let answer = tokio::time::timeout(self.timeout, http_exchange(client, call)).await;
        match answer {
            Err(_) => Answer::Failed(
                "deadline_exceeded",
                format!("no answer within {:?}", self.timeout),
                Some(Duration::ZERO),
            ),
            Ok(Err(e)) => Answer::Failed("unavailable", e, Some(Duration::ZERO)),
            Ok(Ok((200..=299, _, body))) => Answer::Accepted(
                ExportMetricsServiceResponse::decode(body.as_ref()).unwrap_or_default(),
            ),
            Ok(Ok((status, retry_after, body))) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(512)])
                    .trim()
                    .to_string();
                let retry = matches!(status, 429 | 502 | 503 | 504)
                    .then(|| retry_after.unwrap_or(Duration::ZERO));
                Answer::Failed(http_label(status), format!("{status} {text}"), retry)
            }
        }
    }
}

/// Sends `call` and reads the whole answer: status, `Retry-After` (in
/// seconds), body; Err with the reason when no answer came.
pub async fn http_exchange(
    client: &HttpClient,
    call: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, Option<Duration>, bytes::Bytes), String> {
    use http_body_util::BodyExt;
    let response = client.request(call).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, retry_after, body))
}

/// An HTTP status as a bounded metric label (`http_429`, `http_4xx`, ...).
fn http_label(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        401 => "http_401",
        403 => "http_403",
        404 => "http_404",
        413 => "http_413",
        429 => "http_429",
        502 => "http_502",
        503 => "http_503",
        504 => "http_504",
        405..=499 => "http_4xx",
        _ => "http_5xx",
    }
}

pub fn string_attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
    }
}

/// A double data point with string attributes.
pub fn double_point(
    attributes: &[(&str, &str)],
    start_unix_ns: u64,
    end_unix_ns: u64,
    value: f64,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes.iter().map(|(k, v)| string_attr(k, v)).collect(),
        start_time_unix_nano: start_unix_ns,
        time_unix_nano: end_unix_ns,
        value: Some(number_data_point::Value::AsDouble(value)),
        exemplars: vec![],
        flags: 0,
    }
}

/// The instrumentation scope: `name` and the sci-cf version.
pub fn scope(name: &str) -> InstrumentationScope {
    InstrumentationScope {
        name: name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        attributes: vec![],
        dropped_attributes_count: 0,
    }
}

/// The resource attributes of an exporter: `service.name`,
/// `service.version`, `host.name`, then the configured ones.
pub fn resource_attributes(
    service: &str,
    host: &str,
    configured: &BTreeMap<String, String>,
) -> Vec<KeyValue> {
    let mut out = vec![
        string_attr("service.name", service),
        string_attr("service.version", env!("CARGO_PKG_VERSION")),
        string_attr("host.name", host),
    ];
    out.extend(configured.iter().map(|(k, v)| string_attr(k, v)));
    out
}

/// This machine's name (the kernel's).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named() {
        let (headers, attrs) = (BTreeMap::new(), BTreeMap::new());
        let base = ClientSettings {
            section: "otlp",
            protocol: "grpc",
            endpoint: "http://127.0.0.1:4317",
            headers: &headers,
            timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            resource_attributes: &attrs,
        };
        assert!(base.check().is_ok());
        let e = ClientSettings {
            endpoint: "127.0.0.1:4317",
            ..base
        };
        assert!(e.check().unwrap_err().contains("otlp.endpoint"));
        let bad_headers: BTreeMap<String, String> =
            [("Bad Name".to_string(), "x".to_string())].into();
        let e = ClientSettings {
            headers: &bad_headers,
            ..base
        };
        assert!(e.check().unwrap_err().contains("otlp.headers.Bad Name"));
        let own: BTreeMap<String, String> = [("service.name".to_string(), "x".to_string())].into();
        let e = ClientSettings {
            resource_attributes: &own,
            ..base
        };
        assert!(e.check().unwrap_err().contains("service.name"));
        let e = ClientSettings {
            max_backoff: Duration::from_millis(10),
            ..base
        };
        assert!(e.check().unwrap_err().contains("otlp.min_backoff"));
        let e = ClientSettings {
            protocol: "http/json",
            ..base
        };
        assert!(e.check().unwrap_err().contains("otlp.protocol"));
        assert!(retryable(tonic::Code::Unavailable));
        assert!(!retryable(tonic::Code::InvalidArgument));
    }
}
