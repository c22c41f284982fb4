use std::fmt;
use std::str::FromStr;

use crate::error::WorkloadError;

/// One business scenario of the standard (table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    Credit,
    Drawdown,
    Repayment,
    Query,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Credit,
        Scenario::Drawdown,
        Scenario::Repayment,
        Scenario::Query,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Credit => "credit",
            Scenario::Drawdown => "drawdown",
            Scenario::Repayment => "repayment",
            Scenario::Query => "query",
        }
    }

    /// Position in [`Scenario::ALL`], for per-scenario arrays.
    pub fn index(self) -> usize {
        match self {
            Scenario::Credit => 0,
            Scenario::Drawdown => 1,
            Scenario::Repayment => 2,
            Scenario::Query => 3,
        }
    }

    /// The marker library's scenario.
    pub fn marker(self) -> sci_marker::Scenario {
        match self {
            Scenario::Credit => sci_marker::Scenario::Credit,
            Scenario::Drawdown => sci_marker::Scenario::Drawdown,
            Scenario::Repayment => sci_marker::Scenario::Repayment,
            Scenario::Query => sci_marker::Scenario::Query,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| {
                WorkloadError::invalid(
                    "scenario",
                    format!("`{s}` (expected credit, drawdown, repayment or query)"),
                )
            })
    }
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
        assert_eq!(Scenario::Query.marker().code(), 4);
    }
}
