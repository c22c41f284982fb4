//! agent.toml: one section per pipeline stage; each stage owns its section's type.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::AgentError;

/// Longest host name (DNS), as the aggregator bounds it.
pub const MAX_HOST_BYTES: usize = 253;
/// Ceiling of `agent.max_service_series`: each pair is 6 series in /metrics.
pub const MAX_SERVICE_SERIES: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Host name reported in every window (default: the kernel's hostname).
    pub host: Option<String>,
    /// Data centre / region label for fleet breakdowns.
    pub datacenter: Option<String>,
    /// Window length, e.g. "1s", "10s".
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub interval: Duration,
    /// Also keep CPU time per thread in the kernel (costs one more map update per switch).
    pub per_thread: bool,
    /// Directory of the on-disk spool.
    pub spool_dir: PathBuf,
    /// Address of the agent's HTTP endpoint (/metrics), e.g. "127.0.0.1:9464"; none to disable.
    pub metrics_listen: Option<String>,
    /// Most (service, scenario) series in /metrics, the `_other` one included.
    pub max_service_series: usize,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            host: None,
            datacenter: None,
            interval: Duration::from_secs(1),
            per_thread: false,
            spool_dir: PathBuf::from("/var/lib/sci-agent/spool"),
            metrics_listen: None,
            max_service_series: crate::sinks::metrics::DEFAULT_MAX_SERVICE_SERIES,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub host: crate::sources::host::HostConfig,
    pub energy: crate::sources::energy::EnergyConfig,
    pub carbon: crate::transforms::carbon::CarbonConfig,
    pub scenarios: crate::transforms::scenario::ScenarioConfig,
    pub ingest: crate::sources::ingest::IngestConfig,
    pub aggregator: crate::sinks::grpc::AggregatorConfig,
    pub profile: crate::sources::profile::ProfileConfig,
    /// Host role: VMs whose energy this agent publishes to their guests.
    pub vms: crate::sources::energy::hypervisor::VmsConfig,
    /// OTLP/gRPC export of every window (off when absent).
    pub otlp: Option<crate::sinks::otlp::OtlpConfig>,
}

/// A source forced in `[energy] source` (perf or powercap) that the host does
/// not have is an error, not a silent fall back to the model. `chosen` is
/// the selected source's name, `reasons` what the selection said.
pub fn require_forced_energy_source(
    energy: &crate::sources::energy::EnergyConfig,
    chosen: &str,
    reasons: &[String],
) -> Result<(), AgentError> {
    if energy.source == "hypervisor" && chosen != "hypervisor" {
        return Err(AgentError::Config {
            path: if energy.hypervisor_transport == "vsock" {
                "energy.hypervisor_transport".into()
            } else {
                "energy.hypervisor_dir".into()
            },
            message: format!(
                "the hypervisor's published energy cannot be read ({})",
                reasons.join("; ")
            ),
        });
    }
    let platform = [
        ("energy.redfish", "redfish", energy.redfish.is_some()),
        ("energy.ipmi", "ipmi", energy.ipmi.is_some()),
    ];
    for (key, kind, wanted) in platform {
        if !wanted || chosen.starts_with(kind) {
            continue;
        }
        return Err(AgentError::Config {
            path: key.into(),
            message: format!(
                "platform power from the BMC was asked for but cannot be read ({})",
                reasons.join("; ")
            ),
        });
    }
    let forced = energy.source.as_str();
    if matches!(forced, "perf" | "powercap") && chosen.starts_with("model") {
        return Err(AgentError::Config {
            path: "energy.source".into(),
            message: format!(
                "{forced:?} was asked for but is not available on this host ({}); use \"auto\" to fall back to the power model",
                reasons.join("; ")
            ),
        });
    }
    Ok(())
}

/// The capabilities the agent's eBPF side needs (name, bit), as deploy/ grants them.
pub const EBPF_CAPABILITIES: [(&str, u32); 2] = [("CAP_BPF", 39), ("CAP_PERFMON", 38)];

pub use crate::capabilities::missing_capabilities;

/// A sentence saying a failure is a permission problem, when the process
/// lacks the eBPF capabilities or the error says so; None otherwise.
pub fn permission_hint(error: &str) -> Option<String> {
    let missing = missing_capabilities(&EBPF_CAPABILITIES);
    let denied = [
        "Operation not permitted",
        "Permission denied",
        "EPERM",
        "EACCES",
    ]
    .iter()
    .any(|w| error.contains(w));
    if missing.is_empty() && !denied {
        return None;
    }
    Some(if missing.is_empty() {
        "permission denied by the kernel (capabilities, perf_event_paranoid or an LSM)".to_string()
    } else {
        format!(
            "permission: this process lacks {} (deploy/systemd/sci-agent.service grants CAP_BPF CAP_PERFMON CAP_SYS_PTRACE)",
            missing.join(" and ")
        )
    })
}

/// Shortest window: below it the agent would spend its time closing windows.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

impl AgentConfig {
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, AgentError> {
        let config: AgentConfig =
            agent_common::config_text::parse(text).map_err(|message| AgentError::Config {
                path: origin.to_path_buf(),
                message,
            })?;
        config.validate().map_err(|e| match e {
            AgentError::Config { path, message } => AgentError::Config {
                path: origin.to_path_buf(),
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Settings that parse but cannot work, named by key.
    pub fn validate(&self) -> Result<(), AgentError> {
        self.host.kubernetes.validate()?;
        if self.agent.interval < MIN_INTERVAL {
            return Err(AgentError::Config {
                path: "agent.interval".into(),
                message: format!(
                    "{} is shorter than the minimum {}",
                    agent_common::time_text::format_duration(self.agent.interval),
                    agent_common::time_text::format_duration(MIN_INTERVAL)
                ),
            });
        }
        if !(2..=MAX_SERVICE_SERIES).contains(&self.agent.max_service_series) {
            return Err(AgentError::Config {
                path: "agent.max_service_series".into(),
                message: format!(
                    "{}: give 2 to {MAX_SERVICE_SERIES} (one series is `_other`, which takes the pairs beyond the limit)",
                    self.agent.max_service_series
                ),
            });
        }
        if let Some(host) = &self.agent.host {
            if host.is_empty() || host.len() > MAX_HOST_BYTES {
                return Err(AgentError::Config {
                    path: "agent.host".into(),
                    message: format!(
                        "{} bytes: a host name has 1 to {MAX_HOST_BYTES} bytes (DNS; the aggregator refuses longer ones)",
                        host.len()
                    ),
                });
            }
        }
        if let Some(otlp) = &self.otlp {
            otlp.validate()?;
        }
        self.aggregator.validate()
    }

    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Config {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml_str(&text, path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_interval_below_the_minimum_is_an_error_naming_the_key() {
        for text in [
            "[agent]\ninterval = \"0s\"\n",
            "[agent]\ninterval = \"99ms\"\n",
        ] {
            let err = AgentConfig::from_toml_str(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("agent.interval") && err.contains("100ms"),
                "{err}"
            );
        }
        let ok = AgentConfig::from_toml_str("[agent]\ninterval = \"100ms\"\n", Path::new("a.toml"))
            .unwrap();
        assert_eq!(ok.agent.interval, MIN_INTERVAL);
    }

    #[test]
    fn a_service_series_limit_out_of_range_is_an_error_naming_the_key() {
        for bad in [0usize, 1, MAX_SERVICE_SERIES + 1] {
            let text = format!("[agent]\nmax_service_series = {bad}\n");
            let err = AgentConfig::from_toml_str(&text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("agent.max_service_series"), "{err}");
            assert!(err.contains(&format!("{bad}: give 2 to")), "{err}");
        }
        let ok =
            AgentConfig::from_toml_str("[agent]\nmax_service_series = 2\n", Path::new("a.toml"))
                .unwrap();
        assert_eq!(ok.agent.max_service_series, 2);
    }

    #[test]
    fn short_tokens_and_long_host_names_are_errors_naming_the_key() {
        let err = |text: &str| {
            AgentConfig::from_toml_str(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = err("[aggregator]\nurl = \"https://a:7443\"\ntoken = \"token-a\"\n");
        assert!(
            e.contains("aggregator.token") && e.contains("16 characters"),
            "{e}"
        );
        let e = err(&format!("[agent]\nhost = \"{}\"\n", "h".repeat(300)));
        assert!(e.contains("agent.host") && e.contains("300 bytes"), "{e}");
        for ok in [
            format!("[agent]\nhost = \"{}\"\n", "h".repeat(253)),
            "[aggregator]\nurl = \"https://a:7443\"\ntoken = \"token-a-0123456789\"\n".into(),
        ] {
            AgentConfig::from_toml_str(&ok, Path::new("a.toml")).unwrap();
        }
    }

    #[test]
    fn a_forced_energy_source_that_is_absent_is_an_error() {
        let empty = tempfile::tempdir().unwrap();
        for (source, fails) in [
            ("powercap", true),
            ("perf", true),
            ("auto", false),
            ("model", false),
        ] {
            let cfg = crate::sources::energy::EnergyConfig {
                sysfs_root: empty.path().to_path_buf(),
                source: source.into(),
                ..Default::default()
            };
            let (chosen, reasons) = crate::sources::energy::select_energy_source(&cfg, 2);
            let result = require_forced_energy_source(&cfg, chosen.name(), &reasons);
            assert_eq!(result.is_err(), fails, "{source}: {result:?}");
            if let Err(e) = result {
                let e = e.to_string();
                assert!(e.contains("energy.source") && e.contains(source), "{e}");
            }
        }
    }

    #[test]
    fn batches_must_fit_the_aggregator_and_the_spool() {
        let err = AgentConfig::from_toml_str(
            "[aggregator]\nurl = \"https://a:7443\"\nbatch_max_bytes = 40000000\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("aggregator.batch_max_bytes"), "{err}");
        let err = AgentConfig::from_toml_str(
            "[aggregator]\nurl = \"https://a:7443\"\nspool_max_bytes = 1000000\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("aggregator.spool_max_bytes"), "{err}");
        let ok = AgentConfig::from_toml_str(
            "[aggregator]\nurl = \"https://a:7443\"\nurls = [\"https://b:7443\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            ok.aggregator.all_urls(),
            ["https://a:7443", "https://b:7443"]
        );
    }
}
