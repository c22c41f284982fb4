use std::fmt;
use std::str::FromStr;

use crate::error::WorkloadError;

pub use sci_marker::{Scenario, ScenarioCounters};

/// The scenario named `name` (English code or the standard's Chinese name).
pub fn parse_scenario(name: &str) -> Result<Scenario, WorkloadError> {
    Scenario::from_name(name).ok_or_else(|| {
        WorkloadError::invalid(
            "scenario",
            format!("`{name}` (expected credit, drawdown, repayment or query)"),
        )
    })
}

/// What one `sci-finance-service` process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// One scenario per process; completions are reported over UDP ingest.
    Dedicated(Scenario),
    /// All four scenarios in one process; each flow is marked with sci-marker.
    Shared,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Dedicated(Scenario::Credit),
        Role::Dedicated(Scenario::Drawdown),
        Role::Dedicated(Scenario::Repayment),
        Role::Dedicated(Scenario::Query),
        Role::Shared,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Dedicated(s) => s.name(),
            Role::Shared => "shared",
        }
    }

    /// Process and thread name (`comm`, at most 15 bytes) the agent's
    /// scenario rules match on.
    pub fn comm(self) -> &'static str {
        match self {
            Role::Dedicated(Scenario::Credit) => "cf-credit",
            Role::Dedicated(Scenario::Drawdown) => "cf-drawdown",
            Role::Dedicated(Scenario::Repayment) => "cf-repayment",
            Role::Dedicated(Scenario::Query) => "cf-query",
            Role::Shared => "cf-shared",
        }
    }

    pub fn serves(self, scenario: Scenario) -> bool {
        match self {
            Role::Dedicated(s) => s == scenario,
            Role::Shared => true,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                WorkloadError::invalid(
                    "role",
                    format!("`{s}` (expected credit, drawdown, repayment, query or shared)"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_names_fit_the_kernel_limit_and_differ() {
        let comms: std::collections::HashSet<_> = Role::ALL.iter().map(|r| r.comm()).collect();
        assert_eq!(comms.len(), 5);
        assert!(comms.iter().all(|c| c.len() <= 15));
        assert_eq!("shared".parse::<Role>().ok(), Some(Role::Shared));
        assert!("loan".parse::<Role>().is_err());
        assert_eq!(Scenario::Query.code(), 4);
        assert_eq!(parse_scenario("还款").ok(), Some(Scenario::Repayment));
        assert!(parse_scenario("loan").is_err());
    }
}
