//! Transaction counts reported by services (owned by the scenario work).
use serde::Deserialize;

/// `[ingest]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {}
