//! aggregator.toml.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_common::Scenario;
use serde::Deserialize;

use crate::error::AggregatorError;

/// The standard's weights (T/CQJR 032.2, formula 2).
pub fn standard_weights() -> BTreeMap<String, f64> {
    Scenario::ALL
        .into_iter()
        .map(|s| (s.name().to_string(), s.standard_weight()))
        .collect()
}

/// The scenarios' English codes, in the standard's order (agent-common owns them).
pub const SCENARIOS: [&str; 4] = agent_common::SCENARIO_NAMES;

/// Most profile stacks a window may carry at all (`max_stacks_per_window` at most this).
pub const MAX_PROFILE_STACKS: usize = 200_000;

/// One agent allowed to send: its host name and its bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAuth {
    pub host: String,
    pub token: String,
}

/// TLS of the gRPC listener; with `client_ca`, agents must present a
/// certificate signed by it, whose common name is their host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Certificate common names no longer allowed (revoked agents).
    #[serde(default)]
    pub revoked: Vec<String>,
}

/// A reader of the HTTP API, dashboard and /metrics (`Authorization: Bearer <token>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToken {
    /// Who holds it (logged when refused or used; never the token).
    pub name: String,
    pub token: String,
    /// `read`: every HTTP endpoint (they all only read). The only role today.
    #[serde(default = "read_role")]
    pub role: String,
}

fn read_role() -> String {
    "read".into()
}

/// What one client may cost the aggregator, per listener (gRPC and HTTP each).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections in total; beyond it a new connection is closed at once.
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_connections_per_address: usize,
    /// Time a connection has to finish the TLS handshake.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub idle_timeout: Duration,
    /// Largest gRPC message (one batch), bytes.
    pub max_message_bytes: usize,
    /// Largest request metadata (headers), bytes, on both listeners.
    pub max_metadata_bytes: usize,
    /// A connection that has not presented valid credentials (an agent's
    /// token or certificate, a reader's token) this long after it was
    /// accepted is closed, whatever it sends.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub auth_timeout: Duration,
    /// Connections not yet authenticated, in total: the rest of
    /// `max_connections` is kept for authenticated clients. A new one
    /// beyond it evicts the oldest unauthenticated connection.
    pub max_unauthenticated_connections: usize,
    /// Connections not yet authenticated from one source address (beyond
    /// it, that address's oldest is evicted).
    pub max_unauthenticated_per_address: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 512,
            max_connections_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_message_bytes: 32 * 1024 * 1024,
            max_metadata_bytes: 16 * 1024,
            auth_timeout: Duration::from_secs(10),
            max_unauthenticated_connections: 128,
            max_unauthenticated_per_address: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// gRPC ingest listener.
    pub grpc_listen: String,
    /// HTTP listener: /api/v1/sci, /metrics, /dashboard.
    pub http_listen: String,
    /// SQLite database file (the embedded store; unused with `postgres_url`).
    pub database: PathBuf,
    /// PostgreSQL connection (`postgres://user@host/db` or libpq key=value):
    /// the production store, shared by several aggregators. Unset: SQLite.
    pub postgres_url: Option<String>,
    /// Base step of the fleet and scenario rollups: every period is a
    /// multiple of it. Default: the largest divisor of one minute that
    /// divides `period` (1 min for hourly periods). Recorded at database creation (`change-rollup-steps` changes it).
    #[serde(with = "agent_common::time_text::serde_opt_duration")]
    pub rollup_step: Option<Duration>,
    /// Step of the per-host, per-service and profile rollups (a multiple of
    /// `rollup_step`). Recorded at database creation (`change-rollup-steps` changes it).
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub host_rollup_step: Duration,
    /// Raw windows (and their profile stacks) are kept this long.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub raw_retention: Duration,
    /// Rollups (and hourly merged profiles) are kept this long.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub rollup_retention: Duration,
    /// A period whose coverage (host-seconds of data against hosts x
    /// period length) is below this is shown but left out of SCI_CF.
    pub min_coverage: f64,
    /// Hot-function claims and flame graphs need at least this many samples.
    pub min_profile_samples: u64,
    /// Expensive queries (sci, dashboard, hotspots, profile) at once; more get 503.
    pub max_concurrent_queries: usize,
    /// A query running longer is cancelled (503).
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub query_timeout: Duration,
    /// Measurement period length, aligned to the wall clock (e.g. "1h").
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub period: Duration,
    /// alpha_i of formula (2); stated in every result.
    pub weights: BTreeMap<String, f64>,
    /// Agents allowed with a bearer token.
    pub agents: Vec<AgentAuth>,
    pub tls: Option<TlsConfig>,
    /// Power a host can physically draw, watts: a window implying more is refused.
    pub max_host_power_w: f64,
    /// A window ending further in the future than this is refused.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_clock_skew: Duration,
    /// A window older than this is refused.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_window_age: Duration,
    /// A window longer than this is refused (its energy ceiling would be meaningless).
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub max_window_length: Duration,
    /// Completed transactions a host can report per second of window, all scenarios.
    pub max_transactions_per_s: f64,
    /// Highest grid carbon intensity a window may use, g/kWh (the dirtiest
    /// grids are near 1,100; diesel generators near 900).
    pub max_intensity_g_per_kwh: f64,
    /// Highest PUE a window may use (the lowest is 1).
    pub max_pue: f64,
    /// Power one CPU (and its share of the host) can draw, watts: a window's
    /// energy above this x cpus x seconds is refused.
    pub max_cpu_power_w: f64,
    /// Requests a CPU can complete per second (per-request histograms).
    pub max_requests_per_cpu_s: f64,
    /// Embodied emissions of one physical machine at most, grams (TE);
    /// embodied carbon of a window is at most this over a one-year life.
    pub max_embodied_g: f64,
    /// Most profile stacks a window may carry: beyond it the window's
    /// lowest-energy stacks are trimmed (their energy kept as
    /// `profile_trimmed_energy_j`), counted.
    pub max_stacks_per_window: usize,
    /// Most distinct services a window may name: beyond it the window is refused.
    pub max_services_per_window: usize,
    /// On SIGTERM: time to commit and acknowledge what is in hand before
    /// the process exits, whatever is still connected.
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub shutdown_grace: Duration,
    /// Readers of the HTTP side; none: it only serves on a loopback address.
    pub http_tokens: Vec<HttpToken>,
    pub limits: LimitsConfig,
    /// Deferrable jobs and intensity files for time shifting (#27).
    pub scheduling: crate::plan::shifting::SchedulingConfig,
    /// Prometheus remote-write of the rollups (off when absent).
    pub remote_write: Option<crate::export::remote_write::RemoteWriteConfig>,
    /// OTLP/gRPC export of the rollups (off when absent).
    pub otlp: Option<crate::export::otlp::OtlpConfig>,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            grpc_listen: "127.0.0.1:7443".into(),
            http_listen: "127.0.0.1:8080".into(),
            database: PathBuf::from("/var/lib/sci-aggregator/sci.db"),
            postgres_url: None,
            rollup_step: None,
            host_rollup_step: Duration::from_secs(3600),
            raw_retention: Duration::from_secs(7 * 86_400),
            rollup_retention: Duration::from_secs(400 * 86_400),
            min_coverage: 0.9,
            min_profile_samples: 50,
            max_concurrent_queries: 4,
            query_timeout: Duration::from_secs(30),
            period: Duration::from_secs(3600),
            weights: standard_weights(),
            agents: Vec::new(),
            tls: None,
            max_host_power_w: 10_000.0,
            max_clock_skew: Duration::from_secs(300),
            max_window_age: Duration::from_secs(30 * 86_400),
            max_window_length: Duration::from_secs(3600),
            max_transactions_per_s: 1_000_000.0,
            max_intensity_g_per_kwh: 2_000.0,
            max_pue: 5.0,
            max_cpu_power_w: 250.0,
            max_requests_per_cpu_s: 1_000_000.0,
            max_embodied_g: 100_000_000.0,
            max_stacks_per_window: 20_000,
            max_services_per_window: 1_000,
            shutdown_grace: Duration::from_secs(10),
            http_tokens: Vec::new(),
            limits: LimitsConfig::default(),
            scheduling: Default::default(),
            remote_write: None,
            otlp: None,
        }
    }
}

/// Shortest bearer token accepted, for agents and HTTP readers alike.
pub const MIN_TOKEN_CHARS: usize = 16;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl AggregatorConfig {
    /// Opens the store this configuration names: PostgreSQL when
    /// `postgres_url` is set, else the SQLite file `database`.
    pub fn open_store(&self) -> Result<Box<dyn crate::store::Store>, AggregatorError> {
        let layout = self.rollup_layout();
        layout.validate().map_err(AggregatorError::Invalid)?;
        match &self.postgres_url {
            Some(url) => Ok(Box::new(crate::store::postgres::PostgresStore::open(
                url,
                layout,
                self.max_concurrent_queries as u32 + 1,
                self.query_timeout,
            )?)),
            None => Ok(Box::new(crate::store::sqlite::SqliteStore::open_with(
                &self.database,
                layout,
                self.query_timeout,
            )?)),
        }
    }

    /// The rollup steps this configuration asks for.
    pub fn rollup_layout(&self) -> crate::store::layout::RollupLayout {
        let step_s = self
            .rollup_step
            .map(|d| d.as_secs())
            .unwrap_or_else(|| gcd(self.period.as_secs().max(1), 60));
        crate::store::layout::RollupLayout {
            step_s,
            host_step_s: self.host_rollup_step.as_secs(),
        }
    }

    /// How long raw windows, dedupe keys and rollups are kept. Keys live at
    /// least as long as a window may arrive (`max_window_age`), so a late
    /// replay is still recognised.
    pub fn retention(&self) -> crate::store::layout::Retention {
        crate::store::layout::Retention {
            raw: self.raw_retention,
            keys: self.raw_retention.max(self.max_window_age),
            rollups: self.rollup_retention,
        }
    }

    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, AggregatorError> {
        let config: AggregatorConfig =
            agent_common::config_text::parse(text).map_err(|message| AggregatorError::Config {
                path: origin.to_path_buf(),
                message,
            })?;
        config.validate(origin)?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, AggregatorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AggregatorError::io(format!("reading {}", path.display()), e))?;
        Self::from_toml_str(&text, path)
    }

    fn validate(&self, origin: &Path) -> Result<(), AggregatorError> {
        let err = |message: String| AggregatorError::Config {
            path: origin.to_path_buf(),
            message,
        };
        for (name, weight) in &self.weights {
            if !SCENARIOS.contains(&name.as_str()) {
                return Err(err(format!(
                    "weights.{name}: unknown scenario (credit, drawdown, repayment, query)"
                )));
            }
            if !weight.is_finite() || *weight <= 0.0 {
                return Err(err(format!("weights.{name} = {weight} must be > 0")));
            }
        }
        for name in SCENARIOS {
            if !self.weights.contains_key(name) {
                return Err(err(format!("weights.{name} is missing")));
            }
        }
        if self.period < Duration::from_secs(1) {
            return Err(err("period must be at least 1s".into()));
        }
        let layout = self.rollup_layout();
        layout.validate().map_err(err)?;
        if !self.period.as_secs().is_multiple_of(layout.step_s) {
            return Err(err(format!(
                "period ({} s) must be a multiple of rollup_step ({} s)",
                self.period.as_secs(),
                layout.step_s
            )));
        }
        if !(0.0..=1.0).contains(&self.min_coverage) {
            return Err(err(format!(
                "min_coverage = {} must be between 0 and 1",
                self.min_coverage
            )));
        }
        if self.max_concurrent_queries == 0 {
            return Err(err("max_concurrent_queries must be at least 1".into()));
        }
        if self.rollup_retention < self.raw_retention {
            return Err(err(
                "rollup_retention must not be shorter than raw_retention".into(),
            ));
        }
        if !self.max_host_power_w.is_finite() || self.max_host_power_w <= 0.0 {
            return Err(err("max_host_power_w must be > 0".into()));
        }
        if !self.max_transactions_per_s.is_finite() || self.max_transactions_per_s <= 0.0 {
            return Err(err("max_transactions_per_s must be > 0".into()));
        }
        for (key, value) in [
            ("max_intensity_g_per_kwh", self.max_intensity_g_per_kwh),
            ("max_cpu_power_w", self.max_cpu_power_w),
            ("max_requests_per_cpu_s", self.max_requests_per_cpu_s),
            ("max_embodied_g", self.max_embodied_g),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return Err(err(format!("{key} = {value} must be a finite number > 0")));
            }
        }
        if self.max_stacks_per_window == 0 || self.max_stacks_per_window > MAX_PROFILE_STACKS {
            return Err(err(format!(
                "max_stacks_per_window = {} must be between 1 and {} (the most a window may carry)",
                self.max_stacks_per_window, MAX_PROFILE_STACKS
            )));
        }
        if self.max_services_per_window == 0 {
            return Err(err(
                "max_services_per_window = 0 would refuse every window that names a service".into(),
            ));
        }
        if !self.max_pue.is_finite() || self.max_pue < 1.0 {
            return Err(err(format!(
                "max_pue = {} must be at least 1 (no data centre uses less than its IT energy)",
                self.max_pue
            )));
        }
        if self.query_timeout < Duration::from_millis(100) {
            return Err(err(format!(
                "query_timeout = {:?} must be at least 100ms (every query would be cancelled)",
                self.query_timeout
            )));
        }
        if self.max_window_age < Duration::from_secs(3600)
            || self.max_window_age < self.max_window_length
        {
            return Err(err(format!(
                "max_window_age = {:?} must be at least 1h and at least max_window_length ({:?}): every window would be refused as too old, then quarantined",
                self.max_window_age, self.max_window_length
            )));
        }
        let mut agent_tokens: BTreeMap<&str, &str> = BTreeMap::new();
        for a in &self.agents {
            if a.token.is_empty() || a.host.is_empty() {
                return Err(err(format!(
                    "agents: host {:?} needs a host name and a token",
                    a.host
                )));
            }
            if a.token.chars().count() < MIN_TOKEN_CHARS {
                return Err(err(format!(
                    "agents: host {:?}: token shorter than {MIN_TOKEN_CHARS} characters (a short token can be guessed)",
                    a.host
                )));
            }
            if let Some(other) = agent_tokens.insert(a.token.as_str(), a.host.as_str()) {
                return Err(err(format!(
                    "agents: hosts {other:?} and {:?} have the same token (a token names one host)",
                    a.host
                )));
            }
        }
        if let Some(t) = self
            .http_tokens
            .iter()
            .find(|t| agent_tokens.contains_key(t.token.as_str()))
        {
            return Err(err(format!(
                "http_tokens {:?}: the token is also an agent's token (a reader could send windows, an agent read the fleet)",
                t.name
            )));
        }
        if self.max_window_length < Duration::from_secs(1) {
            return Err(err("max_window_length must be at least 1s".into()));
        }
        for t in &self.http_tokens {
            if t.role != "read" {
                return Err(err(format!(
                    "http_tokens {:?}: role {:?} (only \"read\" exists)",
                    t.name, t.role
                )));
            }
            if t.token.chars().count() < MIN_TOKEN_CHARS {
                return Err(err(format!(
                    "http_tokens {:?}: token shorter than {MIN_TOKEN_CHARS} characters",
                    t.name
                )));
            }
        }
        if let Some(rw) = &self.remote_write {
            rw.validate().map_err(err)?;
            crate::export::remote_write::state_path(
                rw,
                &self.database,
                self.postgres_url.is_some(),
            )
            .map_err(err)?;
        }
        if let Some(o) = &self.otlp {
            o.validate().map_err(err)?;
            crate::export::otlp::state_path(o, &self.database, self.postgres_url.is_some())
                .map_err(err)?;
        }
        let l = &self.limits;
        if l.max_connections == 0 || l.max_connections_per_address == 0 {
            return Err(err("limits.max_connections* must be > 0".into()));
        }
        if l.max_unauthenticated_connections == 0 || l.max_unauthenticated_per_address == 0 {
            return Err(err(
                "limits.max_unauthenticated_* must be > 0 (no client could ever authenticate)"
                    .into(),
            ));
        }
        if l.max_unauthenticated_connections >= l.max_connections {
            return Err(err(format!(
                "limits.max_unauthenticated_connections ({}) must be below limits.max_connections ({}): the difference is kept for authenticated agents",
                l.max_unauthenticated_connections, l.max_connections
            )));
        }
        if l.auth_timeout < Duration::from_millis(100) {
            return Err(err(format!(
                "limits.auth_timeout = {:?} must be at least 100ms (no agent could authenticate in time)",
                l.auth_timeout
            )));
        }
        if l.max_message_bytes < 1024 || l.max_metadata_bytes < 1024 {
            return Err(err("limits.max_*_bytes must be at least 1024".into()));
        }
        self.scheduling.validate().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn example_aggregator_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aggregator.toml");
        let config = AggregatorConfig::load(&path).unwrap();
        assert_eq!(config.period, Duration::from_secs(3600));
        assert_eq!(config.weights, standard_weights());
        assert!(config.tls.is_some());
    }

    #[test]
    fn bad_weights_and_unknown_keys_are_named() {
        let err = AggregatorConfig::from_toml_str(
            "[weights]\ncredit = 24\ndrawdown = 7\nrepayment = 3\nquery = 1\nlending = 2\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("weights.lending"), "{err}");
        let err = AggregatorConfig::from_toml_str("periodd = \"1h\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("periodd"), "{err}");
        let err = AggregatorConfig::from_toml_str(
            "[weights]\ncredit = -1\ndrawdown = 7\nrepayment = 3\nquery = 1\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("weights.credit"), "{err}");
    }

    #[test]
    fn foot_guns_are_refused_with_the_key_and_the_reason() {
        let refused = |text: &str| {
            AggregatorConfig::from_toml_str(text, Path::new("x.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = refused("max_window_age = \"0s\"\n");
        assert!(e.contains("max_window_age") && e.contains("too old"), "{e}");
        let e = refused("query_timeout = \"0s\"\n");
        assert!(
            e.contains("query_timeout") && e.contains("cancelled"),
            "{e}"
        );
        let e = refused(
            "[[agents]]\nhost = \"a\"\ntoken = \"same-token-0123456789\"\n\
             [[http_tokens]]\nname = \"grafana\"\ntoken = \"same-token-0123456789\"\n",
        );
        assert!(
            e.contains("http_tokens \"grafana\"") && e.contains("agent's token"),
            "{e}"
        );
        let e = refused(
            "[[agents]]\nhost = \"a\"\ntoken = \"token-0123456789\"\n[[agents]]\nhost = \"b\"\ntoken = \"token-0123456789\"\n",
        );
        assert!(e.contains("same token"), "{e}");
        let e = refused("[[agents]]\nhost = \"a\"\ntoken = \"token-a\"\n");
        assert!(
            e.contains("agents: host \"a\"") && e.contains("shorter than 16"),
            "{e}"
        );
        let e = refused("[[http_tokens]]\nname = \"g\"\ntoken = \"x\"\n");
        assert!(e.contains("shorter than 16"), "{e}");
        let e = refused("max_pue = 0.5\n");
        assert!(e.contains("max_pue"), "{e}");
        let e = refused("[limits]\nmax_unauthenticated_connections = 600\n");
        assert!(e.contains("max_unauthenticated_connections"), "{e}");
    }
}
