//! The stream to the aggregator: at-least-once delivery with an exactly-once
//! effect.
//!
//! Every window is first in the spool (see `spool`). The forwarder keeps one
//! bidirectional `sci.v1.Ingest/Stream` open, sends the spooled windows in
//! seq order in batches, and deletes them when the aggregator's cumulative
//! ack (sent only after it committed them) covers them. On any error it
//! reconnects with jittered exponential backoff and replays everything not
//! acknowledged; the aggregator de-duplicates by (host, agent_instance, seq),
//! so a replay never counts twice. The agent keeps measuring and spooling
//! meanwhile.
//!
//! Batches are bounded in windows and in bytes (`batch_max_bytes`, below the
//! aggregator's message limit), and hold windows of one agent instance. A
//! refused window is never taken as delivered: the spool quarantines it,
//! renumbers it under a new instance, or keeps it for later, by the
//! refusal's code (see `spool`). With several aggregator URLs the forwarder
//! moves to the next one when a stream fails, and resumes from the spool:
//! whatever was not acknowledged is sent again (aggregators sharing a store
//! de-duplicate it).
//!
//! A batch the aggregator refuses as larger than its message limit
//! (RESOURCE_EXHAUSTED) halves the batch bound (down to 64 KiB) and makes the
//! next stream send one batch at a time, so the next refusal names its batch:
//! a window refused alone can never be taken and is quarantined (counted as
//! `oversized`), and the windows after it go on.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::spool::Spool;
use crate::error::AgentError;

/// `[aggregator]` section of agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// `https://host:port` (TLS) or `http://host:port` (plaintext: needs `--insecure`).
    /// None: no aggregator, windows are printed as JSON lines.
    pub url: Option<String>,
    /// Further aggregators (same store) to fail over to, in order after `url`.
    pub urls: Vec<String>,
    /// Bearer token identifying this agent (per-agent tokens in aggregator.toml).
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the aggregator's certificate.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; the certificate's CN is the agent's identity.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Windows per batch.
    pub batch_windows: usize,
    /// Bytes of window records per batch; also the largest window (bigger
    /// ones have profile stacks trimmed, counted). Keep it below the
    /// aggregator's `limits.max_message_bytes` (32 MiB by default).
    pub batch_max_bytes: u64,
    /// The agent's /healthz reports delivery behind when the oldest unacknowledged
    /// window ended longer ago than this.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub behind_after: Duration,
    /// Spool bound in bytes; beyond it the oldest unsent windows are merged.
    pub spool_max_bytes: u64,
    /// Longest wait between reconnection attempts.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_backoff: Duration,
    /// On SIGTERM/SIGINT, how long the agent keeps delivering (its last,
    /// partial window included) before it exits; what is left stays spooled.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub shutdown_grace: Duration,
}

/// Longest `shutdown_grace`: below systemd's default `TimeoutStopSec` (90 s),
/// so the service manager does not kill the agent while it delivers.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(80);

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            url: None,
            urls: Vec::new(),
            token: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            batch_windows: 64,
            batch_max_bytes: super::spool::DEFAULT_MAX_WINDOW_BYTES,
            behind_after: Duration::from_secs(300),
            spool_max_bytes: 256 * 1024 * 1024,
            max_backoff: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl AggregatorConfig {
    /// `url` then `urls`.
    pub fn all_urls(&self) -> Vec<String> {
        self.url.iter().chain(&self.urls).cloned().collect()
    }

    /// Refuses settings that would stall delivery.
    pub fn validate(&self) -> Result<(), AgentError> {
        /// As the aggregator's shortest token.
        const MIN_TOKEN_CHARS: usize = 16;
        let err = |path: &str, message: String| AgentError::Config {
            path: format!("aggregator.{path}").into(),
            message,
        };
        if self.url.is_none() && !self.urls.is_empty() {
            return Err(err("urls", "give the first aggregator as `url`".into()));
        }
        for (i, url) in self.all_urls().iter().enumerate() {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                let key = if i == 0 { "url" } else { "urls" };
                return Err(err(
                    key,
                    format!("{url:?} must start with https:// (or http:// with --insecure)"),
                ));
            }
        }
        if let Some(token) = &self.token {
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(err(
                    "token",
                    format!(
                        "shorter than {MIN_TOKEN_CHARS} characters (the aggregator refuses such tokens: a short token can be guessed)"
                    ),
                ));
            }
        }
        if self.batch_windows == 0 {
            return Err(err("batch_windows", "must be at least 1".into()));
        }
        if self.batch_max_bytes < 64 * 1024 || self.batch_max_bytes > 30 * 1024 * 1024 {
            return Err(err(
                "batch_max_bytes",
                format!(
                    "{} bytes: must be between 64 KiB and 30 MiB (below the aggregator's 32 MiB message limit)",
                    self.batch_max_bytes
                ),
            ));
        }
        if self.shutdown_grace > MAX_SHUTDOWN_GRACE {
            return Err(err(
                "shutdown_grace",
                format!(
                    "{}: must be at most {} (systemd kills a service that takes 90 s to stop; what is not delivered stays in the spool anyway)",
                    agent_common::time_text::format_duration(self.shutdown_grace),
                    agent_common::time_text::format_duration(MAX_SHUTDOWN_GRACE)
                ),
            ));
        }
        if self.spool_max_bytes < 2 * self.batch_max_bytes {
            return Err(err(
                "spool_max_bytes",
                format!(
                    "{} bytes: must hold at least two batches (2 x batch_max_bytes = {})",
                    self.spool_max_bytes,
                    2 * self.batch_max_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Builds the channel to the first aggregator; refuses plaintext unless `insecure`.
pub async fn connect(cfg: &AggregatorConfig, insecure: bool) -> Result<Channel, AgentError> {
    let url = cfg.url.clone().ok_or_else(|| AgentError::Config {
        path: "aggregator.url".into(),
        message: "no aggregator url".into(),
    })?;
    connect_url(cfg, &url, insecure).await
}

/// Builds the channel to the aggregator at `url`; refuses plaintext unless `insecure`.
pub async fn connect_url(
    cfg: &AggregatorConfig,
    url: &str,
    insecure: bool,
) -> Result<Channel, AgentError> {
    let url = url.to_string();
    let config_err = |message: String| AgentError::Config {
        path: "aggregator".into(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| config_err(format!("url {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cfg.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| AgentError::io(format!("reading ca_cert {}", ca.display()), e))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        match (&cfg.client_cert, &cfg.client_key) {
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert).map_err(|e| {
                    AgentError::io(format!("reading client_cert {}", cert.display()), e)
                })?;
                let key = std::fs::read(key).map_err(|e| {
                    AgentError::io(format!("reading client_key {}", key.display()), e)
                })?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => return Err(config_err("client_cert and client_key go together".into())),
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| config_err(format!("TLS: {e}")))?;
    } else if !insecure {
        return Err(config_err(format!(
            "{url} is plaintext: use https://, or pass --insecure to send windows unencrypted"
        )));
    }
    Ok(endpoint.connect_lazy())
}

/// Counters of the forwarder, for logs and tests.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    pub connects: std::sync::atomic::AtomicU64,
    pub batches_sent: std::sync::atomic::AtomicU64,
    pub windows_refused: std::sync::atomic::AtomicU64,
    /// Moves to the next aggregator URL after a failed stream.
    pub failovers: std::sync::atomic::AtomicU64,
    /// Index in `all_urls()` of the aggregator in use.
    pub current_url: std::sync::atomic::AtomicUsize,
    /// Batch byte bound in use when the aggregator said a batch was too large
    /// (halved each time, down to 64 KiB); 0: `batch_max_bytes`.
    pub batch_bytes_override: std::sync::atomic::AtomicU64,
    /// After a batch refused as too large: one batch in flight at a time, so
    /// a refusal names its batch, and a window refused alone is quarantined.
    pub probing: std::sync::atomic::AtomicBool,
}

/// How a stream ended without a transport error.
enum StreamEnd {
    /// Windows ahead of the aggregator's clock are kept: try again after a pause.
    Deferred(usize),
}

/// Sends spooled windows until `shutdown` is notified. `new_window` is
/// notified whenever a window is appended to the spool.
pub async fn run_forwarder(
    cfg: AggregatorConfig,
    insecure: bool,
    spool: Arc<Mutex<Spool>>,
    new_window: Arc<Notify>,
    stats: Arc<ForwarderStats>,
) -> Result<(), AgentError> {
    use std::sync::atomic::Ordering;
    cfg.validate()?;
    let urls = cfg.all_urls();
    let mut channels = Vec::with_capacity(urls.len());
    for url in &urls {
        channels.push(connect_url(&cfg, url, insecure).await?);
    }
    if channels.is_empty() {
        return Err(AgentError::Config {
            path: "aggregator.url".into(),
            message: "no aggregator url".into(),
        });
    }
    let mut current = 0usize;
    let mut backoff = Duration::from_millis(250);
    loop {
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.current_url.store(current, Ordering::Relaxed);
        let mut pause = backoff;
        match stream_once(&cfg, channels[current].clone(), &spool, &new_window, &stats).await {
            Ok(StreamEnd::Deferred(held)) => {
                backoff = Duration::from_millis(250);
                pause = cfg.max_backoff.min(Duration::from_secs(5));
                tracing::warn!(
                    "{held} windows are ahead of the aggregator's clock; sending again in {pause:?}"
                );
            }
            Err(e) => {
                let pending = lock(&spool).len();
                if channels.len() > 1 {
                    current = (current + 1) % channels.len();
                    stats.failovers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "aggregator stream: {e}; {pending} windows kept in the spool, trying {}",
                        urls[current]
                    );
                } else {
                    tracing::warn!(
                        "aggregator stream: {e}; {pending} windows kept in the spool, retrying"
                    );
                }
                backoff = (backoff * 2).min(cfg.max_backoff);
            }
        }
        let jitter = 0.75 + 0.5 * rand::random::<f64>();
        tokio::time::sleep(pause.mul_f64(jitter)).await;
    }
}

fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    spool.lock().unwrap_or_else(|p| p.into_inner())
}

async fn stream_once(
    cfg: &AggregatorConfig,
    channel: Channel,
    spool: &Arc<Mutex<Spool>>,
    new_window: &Notify,
    stats: &ForwarderStats,
) -> Result<StreamEnd, AgentError> {
    use std::sync::atomic::Ordering;
    let token = cfg.token.clone();
    let mut client =
        IngestClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(token) = &token {
                let value = format!("Bearer {token}").parse().map_err(|_| {
                    tonic::Status::invalid_argument("token is not a valid header value")
                })?;
                request.metadata_mut().insert("authorization", value);
            }
            Ok(request)
        })
        .max_decoding_message_size(16 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<v1::AgentBatch>(4);
    let mut acks = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| {
            AgentError::Transport(format!("{}: {}", status.code(), status.message()))
        })?
        .into_inner();
    lock(spool).release_held();
    let batch_bytes = match stats
        .batch_bytes_override
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => cfg.batch_max_bytes,
        n => n.min(cfg.batch_max_bytes),
    };
    // Everything not acknowledged is (re)sent, oldest first.
    let mut sent_through: Option<u64> = None;
    let mut in_flight = 0usize;
    // (first seq, windows) of each batch in flight, oldest first.
    let mut batches: std::collections::VecDeque<(u64, usize)> = Default::default();
    let max_in_flight = if stats.probing.load(Ordering::Relaxed) {
        1
    } else {
        2
    };
    let mut deferred = 0usize;
    loop {
        if in_flight == 0 && deferred > 0 {
            return Ok(StreamEnd::Deferred(deferred));
        }
        if in_flight < max_in_flight && deferred == 0 {
            let batch = {
                let mut s = lock(spool);
                s.next_batch(sent_through, cfg.batch_windows.max(1), batch_bytes)?
            };
            if let Some(last) = batch.last().map(|w| w.seq) {
                batches.push_back((batch[0].seq, batch.len()));
                let host = batch[0].host.clone();
                let agent_instance = batch[0].agent_instance.clone();
                tx.send(v1::AgentBatch {
                    host,
                    agent_instance,
                    windows: batch,
                    sent_unix_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                })
                .await
                .map_err(|_| AgentError::Transport("stream closed".into()))?;
                sent_through = Some(last);
                in_flight += 1;
                stats
                    .batches_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
        }
        tokio::select! {
            ack = acks.message() => {
                let ack = match ack {
                    Ok(ack) => ack,
                    Err(status) => {
                        if status.code() == tonic::Code::ResourceExhausted {
                            too_large(spool, stats, &batches, max_in_flight, batch_bytes, status.message())?;
                        }
                        return Err(AgentError::Transport(format!("{}: {}", status.code(), status.message())));
                    }
                }
                .ok_or_else(|| AgentError::Transport("the aggregator closed the stream".into()))?;
                batches.pop_front();
                stats.probing.store(false, Ordering::Relaxed);
                for refusal in &ack.refused {
                    stats.windows_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Windows ahead of its clock are kept: the spool says so, rate-limited.
                    if refusal.code != v1::RefusalCode::ClockAhead as i32 {
                        tracing::error!("aggregator refused window {}: {}", refusal.seq, refusal.reason);
                    }
                }
                let settled = lock(spool).settle(&ack)?;
                deferred += settled.deferred;
                in_flight = in_flight.saturating_sub(1);
            }
            _ = new_window.notified(), if in_flight < max_in_flight && deferred == 0 => {}
        }
    }
}

/// The aggregator refused a batch as larger than its message limit. With
/// one batch in flight the refused batch is known: a single window is
/// quarantined (it can never be taken), a larger batch halves the bound.
/// With more in flight, the next stream probes one batch at a time.
fn too_large(
    spool: &Mutex<Spool>,
    stats: &ForwarderStats,
    batches: &std::collections::VecDeque<(u64, usize)>,
    max_in_flight: usize,
    batch_bytes: u64,
    message: &str,
) -> Result<(), AgentError> {
    use std::sync::atomic::Ordering;
    match batches.front() {
        Some(&(seq, 1)) if max_in_flight == 1 => {
            tracing::error!(
                "the aggregator refused window {seq} alone as larger than its message limit ({message}); quarantined"
            );
            lock(spool).quarantine_oversized(
                seq,
                &format!(
                    "the aggregator refused it alone as larger than its message limit: {message}"
                ),
            )?;
        }
        _ => {
            let now = batch_bytes.max(128 * 1024) / 2;
            stats.batch_bytes_override.store(now, Ordering::Relaxed);
            tracing::warn!(
                "the aggregator refused a batch as too large; batches now at most {now} bytes, one at a time"
            );
        }
    }
    stats.probing.store(true, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aggregator_url_must_be_http_or_https() {
        let cfg = |url: &str| AggregatorConfig {
            url: Some(url.into()),
            ..Default::default()
        };
        let e = cfg("ftp://aggregator:7443")
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("aggregator.url") && e.contains("https://"),
            "{e}"
        );
        assert!(cfg("https://aggregator:7443").validate().is_ok());
    }
}
