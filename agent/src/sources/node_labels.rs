//! Kubernetes node labels read from the API server when the agent runs as
//! a DaemonSet (`[host.kubernetes] enabled = true`).
//!
//! In-cluster configuration: the API server at
//! `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` (or
//! `api_url`), the pod's service-account token as a Bearer header and the
//! cluster CA, both under `/var/run/secrets/kubernetes.io/serviceaccount/`
//! (`token_file`, `ca_file`), the node from `$NODE_NAME` (the downward
//! API's `spec.nodeName`) or `node_name`. A poller thread GETs
//! `/api/v1/nodes/<node>` every `refresh_s` (the token file is read again
//! each time: kubelet rotates projected tokens) and keeps only
//! `metadata.labels` that the allow-list admits (an entry is a key, or a
//! prefix when it ends in `*`), at most `max_labels` of them, each a valid
//! label of at most 63 bytes; the others are dropped and counted.
//!
//! A failed refresh (fault `unreachable`, `tls`, `timeout`, `unauthorized`,
//! `http_status`, `too_large`, `garbage`, `token`) is counted and logged;
//! the last good labels are kept, and the log says since when. Until a
//! first read succeeds there are none.
//!
//! Merge: `[host] labels` win over `labels_file`, which wins over the
//! node's labels; the total stays at most [`MAX_LABELS`].
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::error::AgentError;
use crate::sources::https_get::{failure, Failure, HttpsGet, Names, Trust};
use crate::sources::labels::{check_label, MAX_LABELS};

/// Longest Node object read (a node's status lists its images: tens of kB).
pub const MAX_NODE_BYTES: usize = 4 << 20;

/// `[host.kubernetes]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLabelsConfig {
    pub enabled: bool,
    /// The node's name; else `$NODE_NAME`.
    pub node_name: Option<String>,
    /// The API server; else `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_url: Option<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// Label keys kept: a key, or a prefix ending in `*`.
    pub allow: Vec<String>,
    /// Most node labels kept.
    pub max_labels: usize,
    /// Time between two reads of the node.
    pub refresh_s: u64,
    /// Time one read may take, connection included.
    pub timeout_ms: u64,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Default for NodeLabelsConfig {
    fn default() -> Self {
        NodeLabelsConfig {
            enabled: false,
            node_name: None,
            api_url: None,
            token_file: PathBuf::from(format!("{SERVICE_ACCOUNT}/token")),
            ca_file: PathBuf::from(format!("{SERVICE_ACCOUNT}/ca.crt")),
            allow: [
                "topology.kubernetes.io/*",
                "node.kubernetes.io/instance-type",
                "kubernetes.io/arch",
                "cloud.google.com/gke-nodepool",
                "eks.amazonaws.com/nodegroup",
                "kubernetes.azure.com/agentpool",
                "pool",
                "sci-cf/*",
            ]
            .map(String::from)
            .to_vec(),
            max_labels: 16,
            refresh_s: 300,
            timeout_ms: 5_000,
        }
    }
}

fn config_error(key: &str, message: impl Into<String>) -> AgentError {
    AgentError::Config {
        path: format!("host.kubernetes.{key}").into(),
        message: message.into(),
    }
}

impl NodeLabelsConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        if !self.enabled {
            return Ok(());
        }
        if self.max_labels == 0 || self.max_labels > MAX_LABELS {
            return Err(config_error(
                "max_labels",
                format!("{} must be 1 to {MAX_LABELS}", self.max_labels),
            ));
        }
        if self.refresh_s == 0 {
            return Err(config_error("refresh_s", "0 must be at least 1 second"));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.refresh_s.saturating_mul(1000) {
            return Err(config_error(
                "timeout_ms",
                format!(
                    "{} must be at least 1 and at most refresh_s ({} s)",
                    self.timeout_ms, self.refresh_s
                ),
            ));
        }
        if self.allow.is_empty() {
            return Err(config_error("allow", "an empty allow-list keeps no label"));
        }
        if let Some(bad) = self
            .allow
            .iter()
            .find(|a| a.is_empty() || a.len() > 253 || a.chars().any(char::is_whitespace))
        {
            return Err(config_error(
                "allow",
                format!("{bad:?} is not a label key or a prefix ending in '*'"),
            ));
        }
        if let Some(name) = &self.node_name {
            if name.is_empty() || name.contains('/') {
                return Err(config_error(
                    "node_name",
                    format!("{name:?} is not a node name"),
                ));
            }
        }
        Ok(())
    }

    fn allows(&self, key: &str) -> bool {
        self.allow.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == a,
        })
    }
}

/// What the API server's Node object says that is read here.
#[derive(Deserialize)]
struct Node {
    kind: String,
    metadata: NodeMetadata,
}

#[derive(Deserialize)]
struct NodeMetadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Labels kept, and the number dropped by reason.
pub type KeptLabels = (BTreeMap<String, String>, BTreeMap<&'static str, u64>);

/// The labels a Node object gives under `cfg`, and those dropped by reason
/// (`invalid`, `too_many`). Labels the allow-list does not admit are not
/// dropped: they were never asked for.
pub fn node_labels(body: &[u8], node: &str, cfg: &NodeLabelsConfig) -> Result<KeptLabels, String> {
    let parsed: Node =
        serde_json::from_slice(body).map_err(|e| format!("not a Node object: {e}"))?;
    if parsed.kind != "Node" || parsed.metadata.name != node {
        return Err(format!(
            "the answer is {} {:?}, not Node {node:?}",
            parsed.kind, parsed.metadata.name
        ));
    }
    let mut kept = BTreeMap::new();
    let mut dropped = BTreeMap::new();
    for (key, value) in parsed.metadata.labels {
        if !cfg.allows(&key) {
            continue;
        }
        if check_label(&key, &value, "node label").is_err() {
            *dropped.entry("invalid").or_default() += 1;
        } else if kept.len() >= cfg.max_labels {
            *dropped.entry("too_many").or_default() += 1;
        } else {
            kept.insert(key, value);
        }
    }
    Ok((kept, dropped))
}

/// The node's labels under the static ones: `statics` win, the total stays
/// at most [`MAX_LABELS`]. Returns how many node labels did not fit.
pub fn merge_labels(
    node: &BTreeMap<String, String>,
    statics: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, u64) {
    let mut merged = statics.clone();
    let mut dropped = 0;
    for (key, value) in node {
        if merged.contains_key(key) {
            continue;
        }
        if merged.len() >= MAX_LABELS {
            dropped += 1;
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    (merged, dropped)
}

/// What the poller has seen, for the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLabelsStatus {
    /// The last good labels (none before a first good read).
    pub labels: BTreeMap<String, String>,
    /// Unix seconds of the last good read.
    pub read_unix_s: Option<u64>,
    /// Good reads.
    pub reads: u64,
    /// Failed reads, by fault.
    pub faults: BTreeMap<&'static str, u64>,
    /// Node labels dropped, by reason (`invalid`, `too_many`, `merge_full`).
    pub dropped: BTreeMap<&'static str, u64>,
    /// The last error, while reads fail.
    pub failing: Option<String>,
}

/// The poller thread and what it read; stops with the last handle.
pub struct NodeLabels {
    shared: Arc<Mutex<NodeLabelsStatus>>,
    stop: Arc<AtomicBool>,
}

impl Drop for NodeLabels {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Reader {
    http: HttpsGet,
    token_file: PathBuf,
    node: String,
    cfg: NodeLabelsConfig,
}

impl Reader {
    fn read(&mut self) -> Result<KeptLabels, Failure> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            failure(
                "token",
                format!(
                    "host.kubernetes.token_file {}: {e}",
                    self.token_file.display()
                ),
            )
        })?;
        self.http
            .set_authorization(Some(format!("Bearer {}", token.trim())));
        let body = self.http.get()?;
        node_labels(&body, &self.node, &self.cfg).map_err(|reason| failure("garbage", reason))
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_once(reader: &mut Reader, shared: &Mutex<NodeLabelsStatus>) {
    let result = reader.read();
    let mut s = match shared.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    match result {
        Ok((labels, dropped)) => {
            if s.failing.take().is_some() {
                tracing::info!("node labels: reading {} again", reader.node);
            }
            if s.labels != labels {
                tracing::info!("node labels of {}: {labels:?}", reader.node);
            }
            s.labels = labels;
            s.read_unix_s = Some(unix_s());
            s.reads += 1;
            for (reason, n) in dropped {
                *s.dropped.entry(reason).or_default() += n;
            }
        }
        Err(f) => {
            *s.faults.entry(f.fault).or_default() += 1;
            let kept = match s.read_unix_s {
                Some(t) => format!("keeping the {} labels read at unix {t} s", s.labels.len()),
                None => "no node labels yet".to_string(),
            };
            tracing::warn!(
                "node labels of {}: {}: {} ({kept}; counted in sci_agent_node_label_faults_total)",
                reader.node,
                f.fault,
                f.message
            );
            s.failing = Some(format!("{}: {}", f.fault, f.message));
        }
    }
}

impl NodeLabels {
    /// Reads the node once (so the first window has its labels when the
    /// API server answers), then every `refresh_s` on a thread.
    pub fn start(cfg: &NodeLabelsConfig) -> Result<NodeLabels, AgentError> {
        cfg.validate()?;
        let node = match &cfg.node_name {
            Some(n) => n.clone(),
            None => std::env::var("NODE_NAME").map_err(|_| {
                config_error(
                    "node_name",
                    "unset and $NODE_NAME is not set (give the pod spec.nodeName through the downward API)",
                )
            })?,
        };
        let base = match &cfg.api_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    config_error(
                        "api_url",
                        "unset and $KUBERNETES_SERVICE_HOST is not set (not in a pod?)",
                    )
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                // An IPv6 service address goes in brackets.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let uri: hyper::Uri = format!("{base}/api/v1/nodes/{node}")
            .parse()
            .map_err(|e| config_error("api_url", format!("{base:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(config_error(
                "api_url",
                format!("{base:?} must be https:// (the token is a credential)"),
            ));
        }
        let http = HttpsGet::new(
            uri,
            None,
            Some(Trust::CaFile(&cfg.ca_file)),
            Duration::from_millis(cfg.timeout_ms),
            MAX_NODE_BYTES,
            Names {
                section: "host.kubernetes",
                credentials: "the service account's token, and RBAC: get nodes",
            },
        )
        .map_err(|e| config_error(e.key, e.reason))?;
        let mut reader = Reader {
            http,
            token_file: cfg.token_file.clone(),
            node,
            cfg: cfg.clone(),
        };
        let shared = Arc::new(Mutex::new(NodeLabelsStatus::default()));
        let stop = Arc::new(AtomicBool::new(false));
        read_once(&mut reader, &shared);
        let (thread_shared, thread_stop) = (Arc::clone(&shared), Arc::clone(&stop));
        let refresh = Duration::from_secs(cfg.refresh_s);
        std::thread::Builder::new()
            .name("sci-node-labels".into())
            .spawn(move || loop {
                let mut wait = refresh;
                while wait > Duration::ZERO {
                    if thread_stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let step = wait.min(Duration::from_millis(200));
                    std::thread::sleep(step);
                    wait = wait.saturating_sub(step);
                }
                read_once(&mut reader, &thread_shared);
            })
            .map_err(|e| AgentError::io("spawning the node labels thread", e))?;
        Ok(NodeLabels { shared, stop })
    }

    /// What has been read so far.
    pub fn status(&self) -> NodeLabelsStatus {
        match self.shared.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The node's labels merged under `statics` ([`merge_labels`]); node
    /// labels that did not fit are counted (`merge_full`).
    pub fn merged(&self, statics: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut s = match self.shared.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (merged, dropped) = merge_labels(&s.labels, statics);
        if dropped > 0 {
            *s.dropped.entry("merge_full").or_default() += dropped;
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(labels: &str) -> Vec<u8> {
        format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"n1","labels":{{{labels}}}}}}}"#)
            .into_bytes()
    }

    #[test]
    fn only_allowed_valid_labels_are_kept_and_the_rest_counted() {
        let cfg = NodeLabelsConfig {
            allow: vec!["topology.kubernetes.io/*".into(), "pool".into()],
            max_labels: 2,
            ..Default::default()
        };
        let long = "x".repeat(64);
        let body = node(&format!(
            r#""topology.kubernetes.io/zone":"sh-2","topology.kubernetes.io/region":"sh","topology.kubernetes.io/rack":"r9","pool":"{long}","kubernetes.io/hostname":"n1""#
        ));
        let (kept, dropped) = node_labels(&body, "n1", &cfg).unwrap();
        assert_eq!(
            kept,
            BTreeMap::from([
                ("topology.kubernetes.io/rack".into(), "r9".into()),
                ("topology.kubernetes.io/region".into(), "sh".into()),
            ])
        );
        assert_eq!(dropped, BTreeMap::from([("invalid", 1), ("too_many", 1)]));
        let e = node_labels(&body, "n2", &cfg).unwrap_err();
        assert!(e.contains("not Node \"n2\""), "{e}");
    }

    #[test]
    fn static_labels_win_and_the_total_is_bounded() {
        let node: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("k{i:02}"), "node".to_string()))
            .collect();
        let statics = BTreeMap::from([("k00".to_string(), "config".to_string())]);
        let (merged, dropped) = merge_labels(&node, &statics);
        assert_eq!(merged.len(), MAX_LABELS);
        assert_eq!(merged["k00"], "config");
        assert_eq!(dropped, 40 - MAX_LABELS as u64);
    }

    #[test]
    fn bad_settings_are_refused_by_key() {
        let cfg = NodeLabelsConfig {
            enabled: true,
            max_labels: 99,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("host.kubernetes.max_labels"), "{e}");
    }
}
