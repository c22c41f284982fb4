//! aggregator.toml.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::AggregatorError;

/// The standard's weights (T/CQJR 032.2, formula 2).
pub fn standard_weights() -> BTreeMap<String, f64> {
    [
        ("credit", 24.0),
        ("drawdown", 7.0),
        ("repayment", 3.0),
        ("query", 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

pub const SCENARIOS: [&str; 4] = ["credit", "drawdown", "repayment", "query"];

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
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// Largest gRPC message (one batch), bytes.
    pub max_message_bytes: usize,
    /// Largest request metadata (headers), bytes, on both listeners.
    pub max_metadata_bytes: usize,
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
    /// SQLite database file.
    pub database: PathBuf,
    /// Measurement period length, aligned to the wall clock (e.g. "1h").
    #[serde(with = "duration_text")]
    pub period: Duration,
    /// alpha_i of formula (2); stated in every result.
    pub weights: BTreeMap<String, f64>,
    /// Agents allowed with a bearer token.
    pub agents: Vec<AgentAuth>,
    pub tls: Option<TlsConfig>,
    /// Power a host can physically draw, watts: a window implying more is refused.
    pub max_host_power_w: f64,
    /// A window ending further in the future than this is refused.
    #[serde(with = "duration_text")]
    pub max_clock_skew: Duration,
    /// A window older than this is refused.
    #[serde(with = "duration_text")]
    pub max_window_age: Duration,
    /// A window longer than this is refused (its energy ceiling would be meaningless).
    #[serde(with = "duration_text")]
    pub max_window_length: Duration,
    /// Completed transactions a host can report per second of window, all scenarios.
    pub max_transactions_per_s: f64,
    /// Readers of the HTTP side; none: it only serves on a loopback address.
    pub http_tokens: Vec<HttpToken>,
    pub limits: LimitsConfig,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            grpc_listen: "127.0.0.1:7443".into(),
            http_listen: "127.0.0.1:8080".into(),
            database: PathBuf::from("/var/lib/sci-aggregator/sci.db"),
            period: Duration::from_secs(3600),
            weights: standard_weights(),
            agents: Vec::new(),
            tls: None,
            max_host_power_w: 10_000.0,
            max_clock_skew: Duration::from_secs(300),
            max_window_age: Duration::from_secs(30 * 86_400),
            max_window_length: Duration::from_secs(3600),
            max_transactions_per_s: 1_000_000.0,
            http_tokens: Vec::new(),
            limits: LimitsConfig::default(),
        }
    }
}

mod duration_text {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl AggregatorConfig {
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, AggregatorError> {
        let config: AggregatorConfig =
            toml::from_str(text).map_err(|e| AggregatorError::Config {
                path: origin.to_path_buf(),
                message: e.to_string(),
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
        if !self.max_host_power_w.is_finite() || self.max_host_power_w <= 0.0 {
            return Err(err("max_host_power_w must be > 0".into()));
        }
        if !self.max_transactions_per_s.is_finite() || self.max_transactions_per_s <= 0.0 {
            return Err(err("max_transactions_per_s must be > 0".into()));
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
            if t.token.len() < 16 {
                return Err(err(format!(
                    "http_tokens {:?}: token shorter than 16 characters",
                    t.name
                )));
            }
        }
        let l = &self.limits;
        if l.max_connections == 0 || l.max_connections_per_address == 0 {
            return Err(err("limits.max_connections* must be > 0".into()));
        }
        if l.max_message_bytes < 1024 || l.max_metadata_bytes < 1024 {
            return Err(err("limits.max_*_bytes must be at least 1024".into()));
        }
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
}
