//! Prometheus remote-write 1.0 from the aggregator's rollups
//! (`[remote_write]` in aggregator.toml, `sci-aggregator remote-write` for
//! a backfill).
//!
//! The store is the queue. The exporter keeps a position (the end of the
//! last step the endpoint accepted) and the counters' totals at it in a
//! state file, written atomically after each accepted request. Each round
//! it reads the rollups of the next steps (at most `max_steps_per_request`,
//! up to `delay` before now, so late windows have arrived), turns them into
//! samples ([`super::series`]), and POSTs one snappy-compressed
//! `WriteRequest` with the protocol's headers. Nothing is held in memory
//! but that one request: an endpoint that is down, slow or answering 5xx
//! or 429 gets the same request again after a backoff (doubling from
//! `min_backoff` to `max_backoff`, at least a 429's `Retry-After`), while
//! pending steps wait in the store; after a restart the exporter resumes
//! from its position. A 4xx other than 429 says the request itself is
//! refused: retrying cannot help, so its samples are counted as dropped
//! (`sci_remote_write_samples_total{result="dropped"}`), the answer is
//! logged, and the position moves on. Those are the only drops.
//!
//! Samples are counters at each rollup step's end (see [`super::series`]);
//! the counters restart from 0 at the state's origin (the first export's
//! start). A window arriving more than `delay` after its step is in the
//! store and `/api/v1/sci` but not in the exported series (counted in the
//! log at the next restart's backfill, not here).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::prometheus_text::Family;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::prompb;
use super::series::{read_steps_blocking, SeriesKey, Step};
use crate::error::AggregatorError;
use crate::store::SharedStore;

/// `[remote_write]` in aggregator.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// The receiver, e.g. `http://prometheus:9090/api/v1/write`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Position and totals (default: the SQLite database's path with
    /// `.remote-write.json`; required with PostgreSQL).
    pub state_file: Option<PathBuf>,
    /// Steps are sent once they are this far in the past.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub delay: Duration,
    /// Where a first export begins (unix seconds or RFC 3339): a backfill
    /// from there. Default: now (no history).
    pub start: Option<String>,
    /// Rollup steps per request.
    pub max_steps_per_request: usize,
    /// One request's time limit.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub timeout: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub min_backoff: Duration,
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_backoff: Duration,
    /// Labels added to every series (e.g. `region`), bounded by the config.
    pub external_labels: BTreeMap<String, String>,
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        RemoteWriteConfig {
            url: String::new(),
            bearer_token: None,
            state_file: None,
            delay: Duration::from_secs(120),
            start: None,
            max_steps_per_request: 60,
            timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            external_labels: BTreeMap::new(),
        }
    }
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

impl RemoteWriteConfig {
    /// The key and the reason of the first bad value.
    pub fn validate(&self) -> Result<(), String> {
        let rest = self.url.strip_prefix("http://").ok_or_else(|| {
            format!(
                "remote_write.url {:?}: give an http:// URL (for https, put a TLS proxy or the collector next to the aggregator)",
                self.url
            )
        })?;
        self.url
            .parse::<hyper::Uri>()
            .map_err(|e| format!("remote_write.url {:?}: {e}", self.url))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("remote_write.url {:?}: no host", self.url));
        }
        check_pacing(
            "remote_write",
            self.max_steps_per_request,
            self.timeout,
            (self.min_backoff, self.max_backoff),
            self.start.as_deref(),
        )?;
        if self.external_labels.len() > 16 {
            return Err("remote_write.external_labels: at most 16 labels".into());
        }
        for (name, value) in &self.external_labels {
            if !valid_label_name(name) || ["datacenter", "scenario"].contains(&name.as_str()) {
                return Err(format!(
                    "remote_write.external_labels.{name}: not a Prometheus label name of our own ([a-zA-Z_][a-zA-Z0-9_]*, not __*, datacenter or scenario)"
                ));
            }
            if value.is_empty() {
                return Err(format!("remote_write.external_labels.{name}: empty value"));
            }
        }
        Ok(())
    }
}

/// The settings both exporters share, checked; `section` names them.
pub(super) fn check_pacing(
    section: &str,
    max_steps_per_request: usize,
    timeout: Duration,
    (min_backoff, max_backoff): (Duration, Duration),
    start: Option<&str>,
) -> Result<(), String> {
    if max_steps_per_request == 0 {
        return Err(format!(
            "{section}.max_steps_per_request must be at least 1"
        ));
    }
    if timeout.is_zero() {
        return Err(format!("{section}.timeout must be > 0"));
    }
    if min_backoff.is_zero() || max_backoff < min_backoff {
        return Err(format!(
            "{section}.min_backoff must be > 0 and max_backoff at least min_backoff"
        ));
    }
    if let Some(start) = start {
        crate::params::parse_time_s(start).map_err(|e| format!("{section}.start: {e}"))?;
    }
    Ok(())
}

/// What the exporter did, for /metrics.
#[derive(Debug, Default)]
pub struct RemoteWriteStats {
    pub configured: AtomicU64,
    pub samples_sent: AtomicU64,
    pub samples_dropped: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub position_s: AtomicU64,
    /// Requests per outcome: `2xx`, `429`, `4xx`, `5xx`, `error` (no answer).
    pub requests: Mutex<BTreeMap<&'static str, u64>>,
}

impl RemoteWriteStats {
    fn request(&self, outcome: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn families(&self, out: &mut Vec<Family>) {
        out.push(
            Family::gauge(
                "sci_remote_write_configured",
                "1 when [remote_write] is configured.",
            )
            .single(self.configured.load(Ordering::Relaxed) as f64),
        );
        out.push(
            Family::counter(
                "sci_remote_write_samples_total",
                "Samples accepted by the remote-write endpoint (sent), and refused with a 4xx other than 429 (dropped).",
            )
            .with(&[("result", "sent")], self.samples_sent.load(Ordering::Relaxed) as f64)
            .with(
                &[("result", "dropped")],
                self.samples_dropped.load(Ordering::Relaxed) as f64,
            ),
        );
        let mut requests = Family::counter(
            "sci_remote_write_requests_total",
            "Remote-write requests per outcome (2xx, 429, 4xx, 5xx, error: no answer or timed out).",
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
                "sci_remote_write_bytes_total",
                "Compressed bytes of the requests the endpoint accepted.",
            )
            .single(self.bytes_sent.load(Ordering::Relaxed) as f64),
        );
        out.push(
            Family::gauge(
                "sci_remote_write_position_seconds",
                "End of the last rollup step the endpoint accepted (unix seconds).",
            )
            .single(self.position_s.load(Ordering::Relaxed) as f64),
        );
    }
}

/// Position and totals, as kept in the state file.
/// (The OTLP exporter keeps the same state in its own file.)
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(super) struct State {
    /// Where the counters start from 0.
    pub(super) origin_s: u64,
    /// End of the last step accepted.
    pub(super) position_s: u64,
    /// Each counter's total over `[origin_s, position_s)`.
    pub(super) totals: Vec<(String, Labels, f64)>,
}

type Labels = Vec<(String, String)>;

impl State {
    fn load(path: &Path) -> Result<Option<State>, AggregatorError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                AggregatorError::Invalid(format!("export state {}: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AggregatorError::io(
                format!("reading {}", path.display()),
                e,
            )),
        }
    }

    /// The state file's position, or a new one at `from_s`, else `start`
    /// (unix seconds or RFC 3339), else now less `delay` (`what` names the
    /// exporter in errors). Also the counters' totals, by series.
    pub(super) fn open(
        path: &Path,
        what: &str,
        step: u64,
        from_s: Option<u64>,
        start: Option<&str>,
        delay: Duration,
    ) -> Result<(State, BTreeMap<SeriesKey, f64>), AggregatorError> {
        let state = match State::load(path)? {
            Some(state) => {
                if let Some(from) = from_s {
                    if from / step * step != state.origin_s {
                        return Err(AggregatorError::Invalid(format!(
                            "{what} state {} began at {} and is at {}: a backfill from {from} would repeat or skip samples (remove the state file to start over, into an empty remote)",
                            path.display(),
                            state.origin_s,
                            state.position_s
                        )));
                    }
                }
                state
            }
            None => {
                let start = match (from_s, start) {
                    (Some(from), _) => from,
                    (None, Some(text)) => {
                        crate::params::parse_time_s(text).map_err(AggregatorError::Invalid)?
                    }
                    (None, None) => now_s().saturating_sub(delay.as_secs()),
                };
                let origin_s = start / step * step;
                State {
                    origin_s,
                    position_s: origin_s,
                    totals: Vec::new(),
                }
            }
        };
        let totals = state
            .totals
            .iter()
            .map(|(n, l, v)| ((n.clone(), l.clone()), *v))
            .collect();
        Ok((state, totals))
    }

    /// Moves the position to `end_s` with these totals, and saves.
    pub(super) fn advance(
        &mut self,
        path: &Path,
        end_s: u64,
        totals: &BTreeMap<SeriesKey, f64>,
    ) -> Result<(), AggregatorError> {
        self.position_s = end_s;
        self.totals = totals
            .iter()
            .map(|((n, l), v)| (n.clone(), l.clone(), *v))
            .collect();
        self.save(path)
    }

    /// Written to a temporary file, synced, renamed over the old one.
    fn save(&self, path: &Path) -> Result<(), AggregatorError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let io = |e| AggregatorError::io(format!("writing {}", tmp.display()), e);
        let bytes = serde_json::to_vec(self)
            .map_err(|e| AggregatorError::Invalid(format!("encoding the state: {e}")))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| AggregatorError::io(format!("renaming to {}", path.display()), e))
    }
}

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What an exporter at `position_s` does next.
pub(super) enum Round {
    /// The backfill reached its end.
    Done,
    /// The next step is not `delay` old yet.
    Wait(Duration),
    /// Send `[position_s, end)`.
    Export(u64),
}

/// The next round of an exporter following the clock less `delay` (to
/// `until_s` for a backfill), at most `max_steps` steps at a time.
pub(super) fn next_round(
    position_s: u64,
    step: u64,
    delay: Duration,
    max_steps: usize,
    until_s: Option<u64>,
) -> Round {
    if until_s.is_some_and(|u| position_s >= u) {
        return Round::Done;
    }
    let ready = now_s().saturating_sub(delay.as_secs()) / step * step;
    let target = until_s
        .map_or(ready, |u| u.div_ceil(step) * step)
        .min(ready);
    if position_s >= target {
        let next = (position_s + step + delay.as_secs())
            .saturating_sub(now_s())
            .max(1);
        return Round::Wait(Duration::from_secs(next));
    }
    Round::Export(target.min(position_s + step * max_steps as u64))
}

/// One exporter of the rollups (remote-write, OTLP): its position, its
/// pacing, and one round's export of `[position, end)`.
pub(super) trait RollupExport {
    /// How its log lines begin.
    const NAME: &'static str;
    fn position_s(&self) -> u64;
    fn step_s(&self) -> u64;
    /// `delay`, `max_steps_per_request` and `max_backoff` of its config.
    fn pacing(&self) -> (Duration, usize, Duration);
    async fn export(&mut self, end_s: u64) -> Result<(), AggregatorError>;
}

/// Exports until the position reaches `until_s` (a backfill), or for ever
/// (`None`), following the clock less `delay`; a failed round is logged
/// and retried after `max_backoff`.
pub(super) async fn run_rounds<E: RollupExport>(
    exporter: &mut E,
    until_s: Option<u64>,
) -> Result<(), AggregatorError> {
    let step = exporter.step_s();
    let (delay, max_steps, max_backoff) = exporter.pacing();
    loop {
        let end = match next_round(exporter.position_s(), step, delay, max_steps, until_s) {
            Round::Done => return Ok(()),
            Round::Wait(wait) => {
                tokio::time::sleep(wait).await;
                continue;
            }
            Round::Export(end) => end,
        };
        if let Err(e) = exporter.export(end).await {
            tracing::warn!("{}: {e}; retrying", E::NAME);
            tokio::time::sleep(max_backoff).await;
        }
    }
}

/// How a request ended.
enum Sent {
    Accepted,
    /// 4xx other than 429: the request will never be accepted.
    Refused(u16, String),
    /// Worth retrying (5xx, 429, no answer), after at least this long.
    Retry(String, Duration),
}

pub struct RemoteWriter {
    cfg: RemoteWriteConfig,
    store: SharedStore,
    weights: BTreeMap<String, f64>,
    stats: Arc<RemoteWriteStats>,
    client: Client<HttpConnector, Full<Bytes>>,
    uri: hyper::Uri,
    state_path: PathBuf,
    state: State,
    totals: BTreeMap<SeriesKey, f64>,
}

impl RemoteWriter {
    /// Opens the state file (or starts at `from_s`, else `start`, else now).
    pub fn open(
        cfg: RemoteWriteConfig,
        state_path: PathBuf,
        store: SharedStore,
        weights: BTreeMap<String, f64>,
        stats: Arc<RemoteWriteStats>,
        from_s: Option<u64>,
    ) -> Result<Self, AggregatorError> {
        cfg.validate().map_err(AggregatorError::Invalid)?;
        let (state, totals) = State::open(
            &state_path,
            "remote-write",
            store.layout().step_s,
            from_s,
            cfg.start.as_deref(),
            cfg.delay,
        )?;
        let uri = cfg
            .url
            .parse()
            .map_err(|e| AggregatorError::Invalid(format!("remote_write.url: {e}")))?;
        stats.configured.store(1, Ordering::Relaxed);
        stats.position_s.store(state.position_s, Ordering::Relaxed);
        Ok(RemoteWriter {
            client: Client::builder(TokioExecutor::new()).build_http(),
            uri,
            cfg,
            store,
            weights,
            stats,
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
    /// Sends `[position, end)` until the endpoint takes or refuses it.
    async fn export(&mut self, end_s: u64) -> Result<(), AggregatorError> {
        let from = self.state.position_s;
        let steps =
            read_steps_blocking(Arc::clone(&self.store), from, end_s, self.weights.clone()).await?;
        let mut totals = self.totals.clone();
        let (request, samples) = build_request(&steps, &mut totals, &self.cfg.external_labels);
        let body = Bytes::from(compress(&request)?);
        let mut backoff = self.cfg.min_backoff;
        loop {
            match self.send(body.clone()).await {
                Sent::Accepted => {
                    self.stats
                        .samples_sent
                        .fetch_add(samples, Ordering::Relaxed);
                    self.stats
                        .bytes_sent
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                    break;
                }
                Sent::Refused(code, message) => {
                    self.stats
                        .samples_dropped
                        .fetch_add(samples, Ordering::Relaxed);
                    tracing::error!(
                        "remote-write: {} refused {samples} samples of {from}..{end_s} with {code}: {message}; they are dropped (sci_remote_write_samples_total{{result=\"dropped\"}})",
                        self.cfg.url
                    );
                    break;
                }
                Sent::Retry(why, at_least) => {
                    let wait = backoff
                        .max(at_least)
                        .min(self.cfg.max_backoff.max(at_least));
                    tracing::warn!("remote-write: {why}; retrying {from}..{end_s} in {wait:?}");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                }
            }
        }
        self.state.advance(&self.state_path, end_s, &totals)?;
        self.totals = totals;
        self.stats.position_s.store(end_s, Ordering::Relaxed);
        Ok(())
    }

    async fn send(&self, body: Bytes) -> Sent {
        let mut request = hyper::Request::post(self.uri.clone())
            .header("content-encoding", "snappy")
            .header("content-type", "application/x-protobuf")
            .header(
                "user-agent",
                concat!("sci-aggregator/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-prometheus-remote-write-version", "0.1.0");
        if let Some(token) = &self.cfg.bearer_token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = match request.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return Sent::Refused(0, e.to_string()),
        };
        let answer = tokio::time::timeout(
            self.cfg.timeout,
            agent_common::otlp::http_exchange(&self.client, request),
        )
        .await
        .map(|r| {
            r.map(|(status, retry_after, body)| {
                let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
                (status, retry_after, text)
            })
        });
        match answer {
            Err(_) => {
                self.stats.request("error");
                Sent::Retry(
                    format!("no answer within {:?}", self.cfg.timeout),
                    Duration::ZERO,
                )
            }
            Ok(Err(e)) => {
                self.stats.request("error");
                Sent::Retry(e, Duration::ZERO)
            }
            Ok(Ok((code, retry_after, text))) => match code {
                200..=299 => {
                    self.stats.request("2xx");
                    Sent::Accepted
                }
                429 => {
                    self.stats.request("429");
                    Sent::Retry(
                        format!("429 {}", text.trim()),
                        retry_after.unwrap_or(Duration::ZERO),
                    )
                }
                400..=499 => {
                    self.stats.request("4xx");
                    Sent::Refused(code, text.trim().to_string())
                }
                _ => {
                    self.stats.request("5xx");
                    Sent::Retry(format!("{code} {}", text.trim()), Duration::ZERO)
                }
            },
        }
    }
}

/// The `WriteRequest` for `steps` (adding to `totals`), and its sample count.
pub fn build_request(
    steps: &[Step],
    totals: &mut BTreeMap<SeriesKey, f64>,
    external_labels: &BTreeMap<String, String>,
) -> (prompb::WriteRequest, u64) {
    let mut series: BTreeMap<SeriesKey, Vec<prompb::Sample>> = BTreeMap::new();
    for s in steps {
        for (key, add) in &s.additions {
            *totals.entry(key.clone()).or_default() += add;
        }
        let timestamp = (s.end_s * 1000) as i64;
        for (key, value) in totals.iter().chain(s.gauges.iter()) {
            series.entry(key.clone()).or_default().push(prompb::Sample {
                value: *value,
                timestamp,
            });
        }
    }
    let mut samples = 0;
    let timeseries = series
        .into_iter()
        .map(|((name, labels), points)| {
            samples += points.len() as u64;
            let mut all: Vec<prompb::Label> = labels
                .into_iter()
                .chain(external_labels.iter().map(|(k, v)| (k.clone(), v.clone())))
                .map(|(name, value)| prompb::Label { name, value })
                .collect();
            all.push(prompb::Label {
                name: "__name__".into(),
                value: name,
            });
            all.sort_by(|a, b| a.name.cmp(&b.name));
            prompb::TimeSeries {
                labels: all,
                samples: points,
            }
        })
        .collect();
    (prompb::WriteRequest { timeseries }, samples)
}

/// Encoded and snappy-compressed (block format, as the protocol asks).
pub fn compress(request: &prompb::WriteRequest) -> Result<Vec<u8>, AggregatorError> {
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .map_err(|e| AggregatorError::Invalid(format!("snappy: {e}")))
}

/// The state file of a configuration: `state_file`, else next to the SQLite database.
pub fn state_path(
    cfg: &RemoteWriteConfig,
    database: &Path,
    postgres: bool,
) -> Result<PathBuf, String> {
    match (&cfg.state_file, postgres) {
        (Some(p), _) => Ok(p.clone()),
        (None, false) => Ok(database.with_extension("remote-write.json")),
        (None, true) => Err(
            "remote_write.state_file: required with postgres_url (each exporting aggregator keeps its own)"
                .into(),
        ),
    }
}

impl RollupExport for RemoteWriter {
    const NAME: &'static str = "remote-write";
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
        RemoteWriter::export(self, end_s).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counters_carry_totals_across_requests_and_labels_are_sorted() {
        let k = |dc: &str| {
            (
                "sci_fleet_energy_joules_total".to_string(),
                vec![("datacenter".to_string(), dc.to_string())],
            )
        };
        let steps = vec![
            Step {
                end_s: 60,
                additions: [(k("a"), 1.5)].into_iter().collect(),
                gauges: BTreeMap::new(),
            },
            Step {
                end_s: 120,
                additions: [(k("a"), 2.0), (k("b"), 4.0)].into_iter().collect(),
                gauges: BTreeMap::new(),
            },
        ];
        let mut totals = BTreeMap::new();
        let labels = [("region".to_string(), "cn".to_string())]
            .into_iter()
            .collect();
        let (r, n) = build_request(&steps, &mut totals, &labels);
        assert_eq!(n, 3);
        let a = &r.timeseries[0];
        let names: Vec<&str> = a.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "datacenter", "region"]);
        let points: Vec<(i64, f64)> = a.samples.iter().map(|s| (s.timestamp, s.value)).collect();
        assert_eq!(points, [(60_000, 1.5), (120_000, 3.5)]);
        let b: Vec<(i64, f64)> = r.timeseries[1]
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect();
        assert_eq!(b, [(120_000, 4.0)]);
        // The next request goes on from the totals.
        let (r, _) = build_request(
            &[Step {
                end_s: 180,
                ..Default::default()
            }],
            &mut totals,
            &BTreeMap::new(),
        );
        assert_eq!(r.timeseries[0].samples[0].value, 3.5);
        let decoded = prompb::WriteRequest::decode(
            snap::raw::Decoder::new()
                .decompress_vec(&compress(&r).unwrap())
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(decoded, r);
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |f: &dyn Fn(&mut RemoteWriteConfig)| {
            let mut c = RemoteWriteConfig {
                url: "http://127.0.0.1:9090/api/v1/write".into(),
                ..Default::default()
            };
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(&|c| c.url = "https://x/api/v1/write".into()).contains("remote_write.url"));
        assert!(bad(&|c| c.max_steps_per_request = 0).contains("max_steps_per_request"));
        assert!(bad(&|c| c.start = Some("soon".into())).contains("remote_write.start"));
        assert!(bad(&|c| {
            c.external_labels.insert("__x".into(), "y".into());
        })
        .contains("external_labels.__x"));
    }
}
