//! Stream to the aggregator (owned by the transport work).
use serde::Deserialize;

/// `[aggregator]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {}
