//! Business scenarios (owned by the scenario work).
use serde::Deserialize;

/// `[scenarios]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioConfig {}
