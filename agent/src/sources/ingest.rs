//! Transaction counts reported by services, for those that do not link the
//! marker library.
//!
//! Line protocol, one report per line: `<scenario> <count>[ <service>]\n`,
//! e.g. `credit 1` or `query 12 account-svc`, received on a Unix stream
//! socket and on a UDP socket bound to loopback. A UDP datagram may carry
//! several lines and is taken whole or refused whole; on the Unix socket each
//! line stands alone. Nothing is answered: refusals are counted per reason
//! (and in the window document through [`IngestCounters::take_window`]) and
//! logged at debug level. Each source (UDP peer address, Unix connection) has
//! a token bucket of `max_per_second` transactions (burst: one second's worth),
//! so one runaway client cannot inflate the business figures; lines longer
//! than `max_line_bytes` are refused and skipped up to the next newline. The
//! endpoint keeps serving whatever arrives. A Unix connection that sends
//! nothing for `idle_timeout` is closed (counted as `idle_timeout`), so idle
//! clients cannot hold every slot; datagrams the kernel dropped because the
//! socket's receive queue was full are read from the socket's `drops`
//! column in /proc/net/udp (udp6) every second and counted as `udp_dropped`.
//!
//! `[[ingest.prometheus]]` targets are scraped on their own interval: the
//! increase of a counter between two scrapes is that many transactions (a
//! decrease is a reset, the new value counts in full; the first scrape only
//! sets the baseline). Their counts land in the same [`IngestCounters`].
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use agent_common::scenario::{Scenario, TransactionCounts};

/// `[ingest]` section of agent.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Unix stream socket to listen on (e.g. `/run/sci-agent/ingest.sock`); none to disable.
    pub unix_socket: Option<PathBuf>,
    /// UDP address to listen on; must be a loopback address (e.g. `127.0.0.1:9465`).
    pub udp_listen: Option<String>,
    /// Largest count one line may carry.
    pub max_count_per_line: u64,
    /// Transactions per second one source may report (token bucket, 1 s burst).
    pub max_per_second: u64,
    /// Longest accepted line, newline excluded.
    pub max_line_bytes: usize,
    /// Unix connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// A Unix connection silent this long is closed.
    #[serde(with = "duration_text")]
    pub idle_timeout: std::time::Duration,
    /// Prometheus counters of services turned into transactions.
    pub prometheus: Vec<PrometheusScrapeConfig>,
}

/// `[[ingest.prometheus]]`: a counter a service exposes, e.g.
/// `loan_flows_completed_total{scenario="credit"} 1234`; each increase between
/// two scrapes is that many transactions (a decrease is a counter reset: the
/// new value counts in full). The first scrape only sets the baseline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusScrapeConfig {
    /// `http://host:port/path` (plain HTTP).
    pub url: String,
    /// Counter name; only series of exactly this name are read. A selector
    /// with equality matchers, `name{label="value",...}`, reads only the
    /// series whose labels have those values.
    pub metric: String,
    /// Label holding the scenario name (default `scenario`).
    #[serde(default = "default_scenario_label")]
    pub scenario_label: String,
    /// Scenario of every series when the metric has no scenario label.
    pub scenario: Option<Scenario>,
    /// Service to report the transactions under.
    pub service: Option<String>,
    /// Time between scrapes, e.g. "5s" (default 5 s).
    #[serde(default = "default_scrape_interval", with = "duration_text")]
    pub interval: std::time::Duration,
}

fn default_scenario_label() -> String {
    "scenario".into()
}

fn default_scrape_interval() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

mod duration_text {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        match agent_common::time_text::parse_duration(&text) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(serde::de::Error::custom("interval must be > 0")),
            Err(e) => Err(serde::de::Error::custom(e)),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            unix_socket: None,
            udp_listen: None,
            max_count_per_line: 100_000,
            max_per_second: 1_000_000,
            max_line_bytes: 256,
            max_connections: 64,
            idle_timeout: std::time::Duration::from_secs(30),
            prometheus: Vec::new(),
        }
    }
}

/// Errors of the ingest endpoint (setup only: bad input is refused and counted).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest.udp_listen {addr:?}: {reason}")]
    BadUdpAddress { addr: String, reason: String },
    #[error("ingest: {value} must be > 0 for {field}")]
    BadLimit { field: &'static str, value: u64 },
    #[error("ingest.prometheus url {url:?}: {reason}")]
    BadScrapeUrl { url: String, reason: String },
    #[error("ingest: cannot bind {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a line (or a datagram) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// Not `<scenario> <count>[ <service>]`, or not UTF-8.
    Malformed,
    UnknownScenario,
    NotAnInteger,
    Negative,
    Zero,
    /// Above `max_count_per_line` (or beyond u64).
    TooLarge,
    /// Service name longer than 128 bytes or with characters outside `[A-Za-z0-9._:/-]`.
    BadService,
    /// The source exceeded `max_per_second`.
    RateLimited,
    /// Longer than `max_line_bytes`.
    Overlong,
    /// A Unix connection beyond `max_connections`.
    TooManyConnections,
    /// A Prometheus scrape failed (connection, HTTP status, body).
    ScrapeFailed,
    /// A Unix connection closed after `idle_timeout` without a byte.
    IdleTimeout,
    /// Datagrams the kernel dropped (receive queue full), as counted by the kernel.
    UdpDropped,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Malformed => "malformed",
            RefusalReason::UnknownScenario => "unknown_scenario",
            RefusalReason::NotAnInteger => "not_an_integer",
            RefusalReason::Negative => "negative",
            RefusalReason::Zero => "zero",
            RefusalReason::TooLarge => "too_large",
            RefusalReason::BadService => "bad_service",
            RefusalReason::RateLimited => "rate_limited",
            RefusalReason::Overlong => "overlong",
            RefusalReason::TooManyConnections => "too_many_connections",
            RefusalReason::ScrapeFailed => "scrape_failed",
            RefusalReason::IdleTimeout => "idle_timeout",
            RefusalReason::UdpDropped => "udp_dropped",
        }
    }
}

/// One valid report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestLine {
    pub scenario: Scenario,
    pub count: u64,
    pub service: Option<String>,
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str, max_count_per_line: u64) -> Result<IngestLine, RefusalReason> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let (scenario, count, service) = match fields.as_slice() {
        [s, c] => (*s, *c, None),
        [s, c, svc] => (*s, *c, Some(*svc)),
        _ => return Err(RefusalReason::Malformed),
    };
    let scenario: Scenario = scenario
        .parse()
        .map_err(|_| RefusalReason::UnknownScenario)?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let count = if let Some(rest) = count.strip_prefix('-') {
        return Err(if digits(rest) {
            RefusalReason::Negative
        } else {
            RefusalReason::NotAnInteger
        });
    } else if digits(count.strip_prefix('+').unwrap_or(count)) {
        count.parse::<u64>().map_err(|_| RefusalReason::TooLarge)?
    } else {
        return Err(RefusalReason::NotAnInteger);
    };
    if count == 0 {
        return Err(RefusalReason::Zero);
    }
    if count > max_count_per_line {
        return Err(RefusalReason::TooLarge);
    }
    if let Some(svc) = service {
        let ok = svc.len() <= 128
            && svc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b));
        if !ok {
            return Err(RefusalReason::BadService);
        }
    }
    Ok(IngestLine {
        scenario,
        count,
        service: service.map(str::to_string),
    })
}

/// What the endpoint received in one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestWindow {
    pub transactions: TransactionCounts,
    /// Transactions per (scenario, service) for lines that named a service.
    pub by_service: BTreeMap<(Scenario, String), u64>,
    /// Lines accepted.
    pub accepted_lines: u64,
    /// Refused lines (Unix) or datagrams (UDP), per reason.
    pub refused: BTreeMap<RefusalReason, u64>,
}

impl IngestWindow {
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

/// Shared between the endpoint's tasks and the pipeline, drained per window.
#[derive(Debug, Default)]
pub struct IngestCounters {
    window: Mutex<IngestWindow>,
    /// Reasons already logged at warn (each is logged once per run).
    warned: Mutex<std::collections::BTreeSet<RefusalReason>>,
}

impl IngestCounters {
    pub fn new() -> Arc<Self> {
        Arc::new(IngestCounters::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IngestWindow> {
        // A panic while holding the lock cannot leave the counters half-updated
        // (each update is one block), so a poisoned lock is still usable.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies all lines together (one lock: never half-applied).
    pub fn record(&self, lines: &[IngestLine]) {
        let mut w = self.lock();
        for line in lines {
            w.transactions.add(line.scenario, line.count);
            if let Some(svc) = &line.service {
                *w.by_service
                    .entry((line.scenario, svc.clone()))
                    .or_default() += line.count;
            }
            w.accepted_lines += 1;
        }
    }

    pub fn refuse(&self, reason: RefusalReason) {
        self.refuse_n(reason, 1);
    }

    /// Counts `n` refusals of one reason at once.
    pub fn refuse_n(&self, reason: RefusalReason, n: u64) {
        if n == 0 {
            return;
        }
        *self.lock().refused.entry(reason).or_default() += n;
        let first = self
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(reason);
        if first {
            tracing::warn!(
                target: "sci_agent::ingest",
                "transaction report refused: {} (logged once per reason; every refusal is counted in sci_transactions_refused_total)",
                reason.as_str()
            );
        } else {
            tracing::debug!(target: "sci_agent::ingest", "refused: {}", reason.as_str());
        }
    }

    /// What was received since the last [`take_window`](Self::take_window), without draining it.
    pub fn peek(&self) -> IngestWindow {
        self.lock().clone()
    }

    /// Everything since the previous call; the counters start again from zero.
    pub fn take_window(&self) -> IngestWindow {
        std::mem::take(&mut *self.lock())
    }
}

/// Transactions per second a source may report, with one second of burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: u64, now: Instant) -> Self {
        TokenBucket {
            rate_per_s: rate_per_s as f64,
            tokens: rate_per_s as f64,
            last: now,
        }
    }

    /// Takes `n` tokens if all are there; otherwise takes none.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.rate_per_s);
        if n as f64 <= self.tokens {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate_per_s
            >= self.rate_per_s
    }
}

/// UDP sources remembered at most (idle ones are forgotten first).
const MAX_UDP_SOURCES: usize = 4096;

/// Checks one unit (a datagram's lines, or one Unix line) and records it or refuses it.
fn admit(
    text: &[u8],
    cfg: &IngestConfig,
    bucket: &mut TokenBucket,
    counters: &IngestCounters,
) -> Result<(), RefusalReason> {
    let text = std::str::from_utf8(text).map_err(|_| RefusalReason::Malformed)?;
    let mut lines = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        if raw.len() > cfg.max_line_bytes {
            return Err(RefusalReason::Overlong);
        }
        lines.push(parse_line(raw, cfg.max_count_per_line)?);
    }
    if lines.is_empty() {
        return Ok(());
    }
    let total = lines.iter().fold(0u64, |a, l| a.saturating_add(l.count));
    if !bucket.try_take(total, Instant::now()) {
        return Err(RefusalReason::RateLimited);
    }
    counters.record(&lines);
    Ok(())
}

/// The running endpoint; dropping it stops the tasks and removes the socket file.
#[derive(Debug)]
pub struct IngestEndpoint {
    unix_socket: Option<PathBuf>,
    udp_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl IngestEndpoint {
    /// Binds the configured sockets and serves them on the current tokio runtime.
    pub async fn start(
        cfg: &IngestConfig,
        counters: Arc<IngestCounters>,
    ) -> Result<Self, IngestError> {
        for (field, value) in [
            ("max_count_per_line", cfg.max_count_per_line),
            ("max_per_second", cfg.max_per_second),
            ("max_line_bytes", cfg.max_line_bytes as u64),
            ("max_connections", cfg.max_connections as u64),
            ("idle_timeout", cfg.idle_timeout.as_millis() as u64),
        ] {
            if value == 0 {
                return Err(IngestError::BadLimit { field, value });
            }
        }
        let cfg = Arc::new(cfg.clone());
        let mut endpoint = IngestEndpoint {
            unix_socket: None,
            udp_addr: None,
            tasks: Vec::new(),
        };
        if let Some(addr) = &cfg.udp_listen {
            let parsed: SocketAddr = addr.parse().map_err(|e| IngestError::BadUdpAddress {
                addr: addr.clone(),
                reason: format!("not an ip:port ({e})"),
            })?;
            if !parsed.ip().is_loopback() {
                return Err(IngestError::BadUdpAddress {
                    addr: addr.clone(),
                    reason: "must be a loopback address: the ingest protocol is not authenticated"
                        .into(),
                });
            }
            let socket = UdpSocket::bind(parsed)
                .await
                .map_err(|source| IngestError::Bind {
                    what: format!("UDP {addr}"),
                    source,
                })?;
            endpoint.udp_addr = socket.local_addr().ok();
            endpoint.tasks.push(tokio::spawn(serve_udp(
                socket,
                cfg.clone(),
                counters.clone(),
            )));
        }
        for scrape in &cfg.prometheus {
            let mut scraper = PrometheusScraper::new(scrape, cfg.max_per_second)?;
            let counters = counters.clone();
            let interval = scrape.interval;
            endpoint.tasks.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    scraper.scrape_once(&counters).await;
                }
            }));
        }
        if let Some(path) = &cfg.unix_socket {
            remove_stale_socket(path);
            let listener = UnixListener::bind(path).map_err(|source| IngestError::Bind {
                what: format!("Unix socket {}", path.display()),
                source,
            })?;
            endpoint.unix_socket = Some(path.clone());
            endpoint
                .tasks
                .push(tokio::spawn(serve_unix(listener, cfg.clone(), counters)));
        }
        Ok(endpoint)
    }

    /// The bound UDP address (with the port chosen when the config said `:0`).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix_socket.as_deref()
    }
}

impl Drop for IngestEndpoint {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(path) = &self.unix_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A socket file left by a previous run would make bind fail; other files are left alone.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The kernel's count of datagrams dropped on the socket with inode `inode`
/// (last column of /proc/net/udp and udp6).
pub fn udp_socket_drops(inode: u64) -> Option<u64> {
    let wanted = inode.to_string();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) == Some(&wanted.as_str()) {
                return fields.last().and_then(|d| d.parse().ok());
            }
        }
    }
    None
}

/// Inode of a socket, which names it in /proc/net/*.
fn socket_inode(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
        .ok()
        .map(|m| m.ino())
}

async fn serve_udp(socket: UdpSocket, cfg: Arc<IngestConfig>, counters: Arc<IngestCounters>) {
    let mut buckets: HashMap<SocketAddr, TokenBucket> = HashMap::new();
    // One byte more than the largest datagram we accept, to tell overlong ones apart.
    let mut buf = vec![0u8; 65_536];
    let inode = socket_inode(&socket);
    // The socket is new: every drop the kernel counts on it is ours to report.
    let mut drops_seen = 0;
    if inode.is_none() {
        tracing::warn!(
            "ingest: the UDP socket's inode is unknown; kernel drops will not be counted"
        );
    }
    let mut drop_check = tokio::time::interval(std::time::Duration::from_secs(1));
    drop_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = drop_check.tick() => {
                if let Some(now) = inode.and_then(udp_socket_drops) {
                    counters.refuse_n(RefusalReason::UdpDropped, now.saturating_sub(drops_seen));
                    drops_seen = now.max(drops_seen);
                }
                continue;
            }
        };
        let (len, peer) = match received {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(target: "sci_agent::ingest", "UDP receive: {e}");
                continue;
            }
        };
        let now = Instant::now();
        if buckets.len() >= MAX_UDP_SOURCES && !buckets.contains_key(&peer) {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_UDP_SOURCES {
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(cfg.max_per_second, now));
        if let Err(reason) = admit(&buf[..len], &cfg, bucket, &counters) {
            counters.refuse(reason);
        }
    }
}

async fn serve_unix(listener: UnixListener, cfg: Arc<IngestConfig>, counters: Arc<IngestCounters>) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(target: "sci_agent::ingest", "Unix accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counters.refuse(RefusalReason::TooManyConnections);
            drop(stream);
            continue;
        };
        let cfg = cfg.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            serve_unix_connection(stream, &cfg, &counters).await;
            drop(permit);
        });
    }
}

async fn serve_unix_connection(
    mut stream: UnixStream,
    cfg: &IngestConfig,
    counters: &IngestCounters,
) {
    let mut bucket = TokenBucket::new(cfg.max_per_second, Instant::now());
    let mut pending: Vec<u8> = Vec::with_capacity(cfg.max_line_bytes + 1);
    // True while skipping the rest of an overlong line.
    let mut skipping = false;
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = match tokio::time::timeout(cfg.idle_timeout, stream.read(&mut chunk)).await {
            Err(_) => {
                counters.refuse(RefusalReason::IdleTimeout);
                break;
            }
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    if skipping {
                        skipping = false;
                    } else {
                        pending.extend_from_slice(&rest[..at]);
                        if let Err(reason) = admit(&pending, cfg, &mut bucket, counters) {
                            counters.refuse(reason);
                        }
                    }
                    pending.clear();
                    rest = &rest[at + 1..];
                }
                None => {
                    if !skipping {
                        pending.extend_from_slice(rest);
                        if pending.len() > cfg.max_line_bytes {
                            counters.refuse(RefusalReason::Overlong);
                            pending.clear();
                            skipping = true;
                        }
                    }
                    rest = &[];
                }
            }
        }
    }
    // A last line without its newline is taken as complete.
    if !skipping && !pending.is_empty() {
        if let Err(reason) = admit(&pending, cfg, &mut bucket, counters) {
            counters.refuse(reason);
        }
    }
}

/// Largest /metrics body read.
const MAX_SCRAPE_BYTES: usize = 16 << 20;

/// One `[[ingest.prometheus]]` target with the counter values it last saw.
#[derive(Debug)]
pub struct PrometheusScraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    uri: hyper::Uri,
    host_port: String,
    path: String,
    metric: String,
    /// Labels a series must carry with these values (`metric`'s selector).
    matchers: BTreeMap<String, String>,
    scenario_label: String,
    scenario: Option<Scenario>,
    service: Option<String>,
    bucket: TokenBucket,
    /// Last value per series (its label set), from the previous scrape.
    last: HashMap<String, f64>,
    /// Errors already logged (each distinct one is logged once).
    logged: std::collections::HashSet<String>,
}

impl PrometheusScraper {
    pub fn new(cfg: &PrometheusScrapeConfig, max_per_second: u64) -> Result<Self, IngestError> {
        let bad = |reason: &str| IngestError::BadScrapeUrl {
            url: cfg.url.clone(),
            reason: reason.into(),
        };
        let rest = cfg
            .url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (host_port, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/metrics"),
        };
        if host_port.is_empty() || !host_port.contains(':') {
            return Err(bad("needs host:port"));
        }
        let uri: hyper::Uri = format!("http://{host_port}{path}")
            .parse()
            .map_err(|e| bad(&format!("{e}")))?;
        let (metric, matchers) = parse_selector(&cfg.metric).map_err(|why| bad(&why))?;
        Ok(PrometheusScraper {
            // One request per scrape, every few seconds: no idle connections kept.
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
            uri,
            host_port: host_port.to_string(),
            path: path.to_string(),
            metric,
            matchers,
            scenario_label: cfg.scenario_label.clone(),
            scenario: cfg.scenario,
            service: cfg.service.clone(),
            bucket: TokenBucket::new(max_per_second.max(1), Instant::now()),
            last: HashMap::new(),
            logged: Default::default(),
        })
    }

    /// Scrapes once and records the counters' increases as transactions.
    pub async fn scrape_once(&mut self, counters: &IngestCounters) {
        let body = match tokio::time::timeout(std::time::Duration::from_secs(5), self.fetch()).await
        {
            Ok(Ok(body)) => body,
            Ok(Err(reason)) => return self.failed(counters, reason),
            Err(_) => return self.failed(counters, "timed out after 5 s".into()),
        };
        let mut increases = TransactionCounts::default();
        let mut seen = HashMap::new();
        for (labels, value) in parse_exposition(&body, &self.metric) {
            if self.matchers.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                continue;
            }
            let scenario = match labels.get(&self.scenario_label) {
                Some(name) => match name.parse::<Scenario>() {
                    Ok(s) => s,
                    Err(_) => {
                        counters.refuse(RefusalReason::UnknownScenario);
                        continue;
                    }
                },
                None => match self.scenario {
                    Some(s) => s,
                    None => continue,
                },
            };
            let key = format!("{labels:?}");
            if let Some(previous) = self.last.get(&key) {
                // A counter that went down was reset: its new value is all new.
                let delta = if value >= *previous {
                    value - previous
                } else {
                    value
                };
                increases.add(scenario, delta.round() as u64);
            }
            seen.insert(key, value);
        }
        self.last = seen;
        let lines: Vec<IngestLine> = Scenario::ALL
            .into_iter()
            .filter(|s| increases.get(*s) > 0)
            .map(|s| IngestLine {
                scenario: s,
                count: increases.get(s),
                service: self.service.clone(),
            })
            .collect();
        if lines.is_empty() {
            return;
        }
        if self.bucket.try_take(increases.total(), Instant::now()) {
            counters.record(&lines);
        } else {
            counters.refuse(RefusalReason::RateLimited);
        }
    }

    fn failed(&mut self, counters: &IngestCounters, reason: String) {
        counters.refuse(RefusalReason::ScrapeFailed);
        if self.logged.insert(reason.clone()) {
            tracing::warn!(target: "sci_agent::ingest", "scrape of http://{}{} failed: {reason}", self.host_port, self.path);
        }
    }

    async fn fetch(&self) -> Result<String, String> {
        let response = self
            .client
            .get(self.uri.clone())
            .await
            .map_err(|e| format!("request: {e}"))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_SCRAPE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// Series of `metric` in a Prometheus text exposition: (labels, value).
/// `name` or `name{label="value",...}` (equality matchers only): the name
/// and the matchers, or why not.
pub fn parse_selector(text: &str) -> Result<(String, BTreeMap<String, String>), String> {
    let text = text.trim();
    let (name, matchers) = match text.split_once('{') {
        None => (text, BTreeMap::new()),
        Some((name, inner)) => match parse_labels(inner) {
            Some((labels, rest)) if rest.trim().is_empty() => (name, labels),
            _ => {
                return Err(format!(
                    "metric {text:?}: write name{{label=\"value\",...}} (equality matchers only)"
                ))
            }
        },
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!("metric {text:?}: {name:?} is not a metric name"));
    }
    Ok((name.to_string(), matchers))
}

pub fn parse_exposition(body: &str, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut series = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels, rest) = if let Some(inner) = rest.strip_prefix('{') {
            match parse_labels(inner) {
                Some(found) => found,
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            (BTreeMap::new(), rest)
        } else {
            continue; // another metric whose name starts with this one
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if value.is_finite() && value >= 0.0 {
            series.push((labels, value));
        }
    }
    series
}

/// `a="x",b="y"} rest` -> labels and the text after `}`.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (name, rest) = text.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.trim().to_string(), value);
        text = &rest[end + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_line_accepts_good_lines_and_names_what_is_wrong() {
        let ok = |scenario, count, service: Option<&str>| {
            Ok(IngestLine {
                scenario,
                count,
                service: service.map(str::to_string),
            })
        };
        assert_eq!(parse_line("credit 1", 100), ok(Scenario::Credit, 1, None));
        assert_eq!(
            parse_line("  query\t12  account-svc ", 100),
            ok(Scenario::Query, 12, Some("account-svc"))
        );
        assert_eq!(parse_line("还款 3", 100), ok(Scenario::Repayment, 3, None));
        assert_eq!(
            parse_line("drawdown +100", 100),
            ok(Scenario::Drawdown, 100, None)
        );
        for (line, reason) in [
            ("", RefusalReason::Malformed),
            ("credit", RefusalReason::Malformed),
            ("credit 1 svc extra", RefusalReason::Malformed),
            ("loan 1", RefusalReason::UnknownScenario),
            ("Credit 1", RefusalReason::UnknownScenario),
            ("credit -3", RefusalReason::Negative),
            ("credit -", RefusalReason::NotAnInteger),
            ("credit 1.5", RefusalReason::NotAnInteger),
            ("credit 1e3", RefusalReason::NotAnInteger),
            ("credit 0x10", RefusalReason::NotAnInteger),
            ("credit 0", RefusalReason::Zero),
            ("credit 101", RefusalReason::TooLarge),
            ("credit 99999999999999999999999", RefusalReason::TooLarge),
            ("credit 1 bad\u{7f}svc", RefusalReason::BadService),
        ] {
            assert_eq!(parse_line(line, 100), Err(reason), "{line:?}");
        }
    }

    #[test]
    fn token_bucket_allows_one_second_of_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        assert!(b.try_take(60, t0));
        assert!(!b.try_take(41, t0), "only 40 left");
        assert!(b.try_take(40, t0));
        let later = t0 + std::time::Duration::from_millis(250);
        assert!(!b.try_take(26, later), "25 refilled in 250 ms");
        assert!(b.try_take(25, later));
        let much_later = later + std::time::Duration::from_secs(10);
        assert!(
            !b.try_take(101, much_later),
            "burst is capped at one second"
        );
    }

    #[test]
    fn exposition_parser_reads_labels_escapes_and_skips_other_metrics() {
        let body = "# TYPE flows_total counter\n\
            flows_total{scenario=\"credit\",path=\"a\\\"b\\\\c\"} 12 1700000000000\n\
            flows_total 3\n\
            flows_total_created 5\n\
            flows_total{scenario=\"query\"} NaN\n\
            flows_total{scenario=\"query\"} -1\n\
            flows_total{broken 4\n";
        let series = parse_exposition(body, "flows_total");
        assert_eq!(series.len(), 2, "{series:?}");
        assert_eq!(
            series[0].0.get("scenario").map(String::as_str),
            Some("credit")
        );
        assert_eq!(series[0].0.get("path").map(String::as_str), Some("a\"b\\c"));
        assert_eq!(series[0].1, 12.0);
        assert!(series[1].0.is_empty());
        assert_eq!(series[1].1, 3.0);
    }
}
