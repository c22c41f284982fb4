use std::path::PathBuf;

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// agent.toml (or a file it names) is wrong; `message` names the line and key.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("eBPF: {0}")]
    Ebpf(String),
    #[error("procfs: {0}")]
    Procfs(String),
    #[error("energy: {0}")]
    Energy(#[from] crate::sources::energy::EnergyError),
    #[error("carbon: {0}")]
    Carbon(#[from] crate::transforms::carbon::CarbonError),
    #[error("scenarios: {0}")]
    Scenario(#[from] crate::transforms::scenario::ScenarioError),
    #[error("{0}")]
    Ingest(#[from] crate::sources::ingest::IngestError),
    /// The aggregator stream failed (connection, refusal); windows stay spooled.
    #[error("aggregator: {0}")]
    Transport(String),
    /// The on-disk spool refused an operation (a damaged record, a duplicate).
    #[error("spool: {0}")]
    Spool(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}
