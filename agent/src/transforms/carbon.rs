//! Carbon: operational O = E x I and embodied M (owned by the energy work).
use serde::Deserialize;

/// `[carbon]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonConfig {}
