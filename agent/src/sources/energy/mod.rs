//! Energy sources (owned by the energy work: RAPL perf PMU, powercap, model).
use serde::Deserialize;

/// `[energy]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyConfig {}
