//! What the aggregator accepts. A window is taken whole or refused whole,
//! with a reason; nothing of a refused window reaches the store.
use sci_proto::v1;

use crate::config::AggregatorConfig;

const KNOWN_SCENARIOS: [&str; 5] = ["credit", "drawdown", "repayment", "query", "unassigned"];
const MAX_PROCESSES: usize = 200_000;
const MAX_PROFILE_STACKS: usize = 200_000;

/// Why a window is refused: a short machine-readable kind and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: &'static str,
    pub reason: String,
}

fn refuse(kind: &'static str, reason: String) -> Refusal {
    Refusal { kind, reason }
}

fn check_amount(name: &str, value: f64) -> Result<(), Refusal> {
    if !value.is_finite() {
        return Err(refuse("not_finite", format!("{name} is {value}")));
    }
    if value < 0.0 {
        return Err(refuse("negative", format!("{name} is negative ({value})")));
    }
    Ok(())
}

/// Checks one window from the agent authenticated as `host`.
pub fn validate_window(
    w: &v1::WindowReport,
    host: &str,
    agent_instance: &str,
    config: &AggregatorConfig,
    now_unix_ns: u64,
) -> Result<(), Refusal> {
    if w.host != host {
        return Err(refuse(
            "wrong_host",
            format!("window names host {:?}, the agent is {host:?}", w.host),
        ));
    }
    if w.agent_instance != agent_instance || agent_instance.is_empty() {
        return Err(refuse(
            "wrong_instance",
            format!(
                "window of agent instance {:?} in a batch of {agent_instance:?}",
                w.agent_instance
            ),
        ));
    }
    if w.end_unix_ns <= w.start_unix_ns {
        return Err(refuse(
            "bad_time_range",
            format!(
                "window ends ({}) before it starts ({})",
                w.end_unix_ns, w.start_unix_ns
            ),
        ));
    }
    let skew_ns = config.max_clock_skew.as_nanos() as u64;
    if w.end_unix_ns > now_unix_ns.saturating_add(skew_ns) {
        return Err(refuse(
            "future",
            format!(
                "window ends {:.0} s in the future (allowed skew {} s)",
                (w.end_unix_ns - now_unix_ns) as f64 / 1e9,
                config.max_clock_skew.as_secs()
            ),
        ));
    }
    let max_age_ns = config.max_window_age.as_nanos() as u64;
    if w.end_unix_ns < now_unix_ns.saturating_sub(max_age_ns) {
        return Err(refuse(
            "too_old",
            format!(
                "window ended more than {} s ago",
                config.max_window_age.as_secs()
            ),
        ));
    }
    for (name, value) in [
        ("host_energy_j", w.host_energy_j),
        ("idle_energy_j", w.idle_energy_j),
        ("unattributed_energy_j", w.unattributed_energy_j),
        ("host_carbon_g", w.host_carbon_g),
        ("host_embodied_g", w.host_embodied_g),
        ("carbon_intensity_g_per_kwh", w.carbon_intensity_g_per_kwh),
        ("pue", w.pue),
        ("business_units", w.business_units),
    ] {
        check_amount(name, value)?;
    }
    let seconds = (w.end_unix_ns - w.start_unix_ns) as f64 / 1e9;
    let ceiling_j = config.max_host_power_w * seconds;
    if w.host_energy_j > ceiling_j {
        return Err(refuse(
            "impossible_energy",
            format!(
                "{:.1} J in {seconds:.3} s is {:.0} W, above the {} W a host can draw (max_host_power_w)",
                w.host_energy_j,
                w.host_energy_j / seconds,
                config.max_host_power_w
            ),
        ));
    }
    if w.processes.len() > MAX_PROCESSES || w.profile.len() > MAX_PROFILE_STACKS {
        return Err(refuse(
            "too_large",
            format!(
                "{} processes, {} profile stacks",
                w.processes.len(),
                w.profile.len()
            ),
        ));
    }
    let mut seen = Vec::new();
    for s in &w.scenarios {
        if !KNOWN_SCENARIOS.contains(&s.scenario.as_str()) {
            return Err(refuse(
                "unknown_scenario",
                format!(
                    "scenario {:?} is not credit, drawdown, repayment, query or unassigned",
                    s.scenario
                ),
            ));
        }
        if seen.contains(&s.scenario.as_str()) {
            return Err(refuse(
                "duplicate_scenario",
                format!("scenario {:?} twice", s.scenario),
            ));
        }
        seen.push(s.scenario.as_str());
        for (name, value) in [
            ("energy_j", s.energy_j),
            ("carbon_g", s.carbon_g),
            ("embodied_g", s.embodied_g),
            ("weight", s.weight),
        ] {
            check_amount(&format!("scenarios[{}].{name}", s.scenario), value)?;
        }
    }
    for p in &w.processes {
        for (name, value) in [
            ("energy_j", p.energy_j),
            ("idle_share_j", p.idle_share_j),
            ("carbon_g", p.carbon_g),
            ("embodied_g", p.embodied_g),
        ] {
            check_amount(&format!("processes[pid {}].{name}", p.pid), value)?;
        }
        if !p.scenario.is_empty() && !KNOWN_SCENARIOS.contains(&p.scenario.as_str()) {
            return Err(refuse(
                "unknown_scenario",
                format!("process {} has scenario {:?}", p.pid, p.scenario),
            ));
        }
    }
    for s in &w.profile {
        check_amount("profile.energy_j", s.energy_j)?;
    }
    Ok(())
}
