//! The shipped example agent.toml is valid, and a bad one is refused with the
//! line and key named.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use sci_agent::config::AgentConfig;

#[test]
fn example_agent_toml_parses_with_the_documented_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    let config = AgentConfig::load(&path).unwrap();
    assert_eq!(config.agent.interval, Duration::from_secs(10));
    assert_eq!(config.energy.power_model, "ccf");
    assert_eq!(config.carbon.pue, 1.0);
    assert_eq!(config.carbon.embodied_kg_per_host, 1000.0);
    config.energy.validate().unwrap();
    // The file shows the defaults: the profiler is off unless turned on.
    let defaults = AgentConfig::default();
    assert_eq!(config.profile.enabled, defaults.profile.enabled);
    assert_eq!(config.profile.frequency_hz, defaults.profile.frequency_hz);
}

#[test]
fn unknown_key_and_bad_duration_name_the_line() {
    let err = AgentConfig::from_toml_str(
        "[agent]\ninterval = \"1s\"\nintervall = \"2s\"\n",
        Path::new("a.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("a.toml") && err.contains("line 3") && err.contains("intervall"),
        "{err}"
    );
    let err = AgentConfig::from_toml_str("[agent]\ninterval = \"soon\"\n", Path::new("b.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2") && err.contains("soon"), "{err}");
}

#[test]
fn a_shutdown_grace_past_the_service_managers_stop_timeout_is_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    let shipped = AgentConfig::load(&path).unwrap();
    assert_eq!(shipped.aggregator.shutdown_grace, Duration::from_secs(10));
    let err = AgentConfig::from_toml_str(
        "[aggregator]\nurl = \"http://127.0.0.1:1\"\nshutdown_grace = \"2m\"\n",
        Path::new("c.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("c.toml")
            && err.contains("aggregator.shutdown_grace")
            && err.contains("at most 1m 20s"),
        "{err}"
    );
}
