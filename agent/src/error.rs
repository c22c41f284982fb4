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
    Energy(#[from] EnergyError),
    #[error("carbon: {0}")]
    Carbon(#[from] crate::transforms::carbon::CarbonError),
    #[error("scenarios: {0}")]
    Scenario(#[from] ScenarioError),
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
    /// An eBPF load, attach or map operation failed; `context` names which.
    pub(crate) fn ebpf(context: &str, e: impl std::fmt::Display) -> Self {
        AgentError::Ebpf(format!("{context}: {e}"))
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Errors of the energy sources.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what the kernel writes there.
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A counter delta that cannot be physical.
    #[error("domain {domain}: reading rejected: {reason}")]
    Absurd { domain: String, reason: String },
    #[error("no energy domain found under {0}")]
    NoDomains(PathBuf),
    /// No domain could be read in this window (never reported as 0 W).
    #[error("no energy domain could be read this window: {0}")]
    AllDomainsFailed(String),
    #[error("perf_event_open({event}, cpu {cpu}): {source}")]
    PerfOpen {
        event: String,
        cpu: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid power model {spec:?}: {reason}")]
    PowerModel { spec: String, reason: String },
    #[error("invalid energy config: {0}")]
    Config(String),
    /// A socket to the host agent (vsock or its Unix-socket form) failed;
    /// `fault` names how (`sci_energy_faults_total{fault}`).
    #[error("{endpoint}: {fault}: {reason}")]
    Transport {
        endpoint: String,
        fault: &'static str,
        reason: String,
    },
    /// The source exists but does not measure (found by the start-up probe).
    #[error("{source_name}: {reason}")]
    Refused { source_name: String, reason: String },
}

impl EnergyError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EnergyError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Errors of the scenario stage.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("unknown scenario {name:?}: expected one of credit, drawdown, repayment, query")]
    UnknownScenario { name: String },
    #[error("weight of {scenario} must be a finite number > 0, got {value}")]
    InvalidWeight { scenario: String, value: f64 },
    #[error("scenarios.rules[{index}]: {message}")]
    Rule { index: usize, message: String },
    #[error("window has {report} process records but the CPU sample has {sample} processes")]
    ProcessMismatch { report: usize, sample: usize },
}
