//! What the aggregator accepts. A window is taken whole or refused whole,
//! with a reason and a code that tells the agent what to do with it; nothing
//! of a refused window reaches the store. Sums are checked (a total that
//! would wrap is refused), and no reason echoes more than [`ECHO_MAX`] bytes
//! of what the client sent.
use sci_proto::v1;
use sci_proto::v1::RefusalCode;

use crate::config::AggregatorConfig;

/// The scenario codes a window may carry: the four of the standard and the unassigned line.
fn known_scenario(name: &str) -> bool {
    agent_common::SCENARIO_NAMES.contains(&name) || name == agent_common::UNASSIGNED
}
const MAX_PROCESSES: usize = 200_000;
const MAX_PROFILE_STACKS: usize = 200_000;

/// Longest piece of client input quoted back in a refusal or an error.
pub const ECHO_MAX: usize = 64;
/// Longest host name (DNS limit) and agent instance accepted.
pub const MAX_HOST_BYTES: usize = 253;
pub const MAX_INSTANCE_BYTES: usize = 128;

/// `text` cut to [`ECHO_MAX`] bytes (on a character boundary), quoted, with
/// the full length when cut: safe to put in a refusal.
pub fn clip(text: &str) -> String {
    if text.len() <= ECHO_MAX {
        return format!("{text:?}");
    }
    let mut end = ECHO_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

/// Why a window is refused: a short machine-readable kind, a sentence, and
/// the code that tells the agent what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: &'static str,
    pub reason: String,
}

impl Refusal {
    pub fn code(&self) -> RefusalCode {
        code_of(self.kind)
    }
}

/// The refusal code of a refusal kind.
pub fn code_of(kind: &str) -> RefusalCode {
    match kind {
        "seq_conflict" => RefusalCode::SeqConflict,
        "wrong_instance" => RefusalCode::WrongInstance,
        "future" => RefusalCode::ClockAhead,
        "too_old" => RefusalCode::TooOld,
        "too_large" => RefusalCode::TooLarge,
        _ => RefusalCode::Invalid,
    }
}

fn refuse(kind: &'static str, reason: String) -> Refusal {
    Refusal { kind, reason }
}

/// Host and instance names a batch may carry, checked before either is used or echoed.
pub fn check_names(host: &str, agent_instance: &str) -> Result<(), Refusal> {
    if host.is_empty() || host.len() > MAX_HOST_BYTES {
        return Err(refuse(
            "bad_name",
            format!(
                "host name of {} bytes (1 to {MAX_HOST_BYTES} allowed): {}",
                host.len(),
                clip(host)
            ),
        ));
    }
    if agent_instance.len() > MAX_INSTANCE_BYTES {
        return Err(refuse(
            "bad_name",
            format!(
                "agent instance of {} bytes (at most {MAX_INSTANCE_BYTES}): {}",
                agent_instance.len(),
                clip(agent_instance)
            ),
        ));
    }
    Ok(())
}

/// A count stored as a signed 64-bit integer must fit in one.
fn check_count(name: &str, value: u64) -> Result<(), Refusal> {
    if value > i64::MAX as u64 {
        return Err(refuse(
            "overflow",
            format!("{name} = {value} does not fit a signed 64-bit total"),
        ));
    }
    Ok(())
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
            format!(
                "window names host {}, the agent is {}",
                clip(&w.host),
                clip(host)
            ),
        ));
    }
    if w.agent_instance != agent_instance || agent_instance.is_empty() {
        return Err(refuse(
            "wrong_instance",
            format!(
                "window of agent instance {} in a batch of {}",
                clip(&w.agent_instance),
                clip(agent_instance)
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
    let length_ns = w.end_unix_ns - w.start_unix_ns;
    let max_length_ns = u64::try_from(config.max_window_length.as_nanos()).unwrap_or(u64::MAX);
    if length_ns > max_length_ns {
        return Err(refuse(
            "too_long",
            format!(
                "window of {:.0} s, longer than max_window_length ({} s)",
                length_ns as f64 / 1e9,
                config.max_window_length.as_secs()
            ),
        ));
    }
    for (name, value) in [
        ("seq", w.seq),
        ("busy_cpu_ns", w.busy_cpu_ns),
        ("idle_cpu_ns", w.idle_cpu_ns),
        ("steal_cpu_ns", w.steal_cpu_ns),
        ("unattributed_cpu_ns", w.unattributed_cpu_ns),
    ] {
        check_count(name, value)?;
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
    let mut transactions: u64 = 0;
    for s in &w.scenarios {
        check_count(
            &format!("scenarios[{}].transactions", clip(&s.scenario)),
            s.transactions,
        )?;
        check_count(
            &format!("scenarios[{}].cpu_ns", clip(&s.scenario)),
            s.cpu_ns,
        )?;
        transactions = transactions.checked_add(s.transactions).ok_or_else(|| {
            refuse(
                "overflow",
                "the scenarios' transactions sum past 2^64".to_string(),
            )
        })?;
        if !known_scenario(&s.scenario) {
            return Err(refuse(
                "unknown_scenario",
                format!(
                    "scenario {} is not credit, drawdown, repayment, query or unassigned",
                    clip(&s.scenario)
                ),
            ));
        }
        if seen.contains(&s.scenario.as_str()) {
            return Err(refuse(
                "duplicate_scenario",
                format!("scenario {} twice", clip(&s.scenario)),
            ));
        }
        seen.push(s.scenario.as_str());
        for (name, value) in [
            ("energy_j", s.energy_j),
            ("carbon_g", s.carbon_g),
            ("embodied_g", s.embodied_g),
            ("weight", s.weight),
        ] {
            check_amount(&format!("scenarios[{}].{name}", clip(&s.scenario)), value)?;
        }
    }
    let max_transactions = config.max_transactions_per_s * seconds;
    if transactions as f64 > max_transactions {
        return Err(refuse(
            "impossible_transactions",
            format!(
                "{transactions} transactions in {seconds:.3} s, above max_transactions_per_s ({})",
                config.max_transactions_per_s
            ),
        ));
    }
    let mut process_cpu_ns: u64 = 0;
    for p in &w.processes {
        process_cpu_ns = process_cpu_ns.checked_add(p.cpu_ns).ok_or_else(|| {
            refuse(
                "overflow",
                "the processes' cpu_ns sum past 2^64".to_string(),
            )
        })?;
        check_count("processes.cpu_ns", process_cpu_ns)?;
        for (name, value) in [
            ("energy_j", p.energy_j),
            ("idle_share_j", p.idle_share_j),
            ("carbon_g", p.carbon_g),
            ("embodied_g", p.embodied_g),
        ] {
            check_amount(&format!("processes[pid {}].{name}", p.pid), value)?;
        }
        if !p.scenario.is_empty() && !known_scenario(&p.scenario) {
            return Err(refuse(
                "unknown_scenario",
                format!("process {} has scenario {}", p.pid, clip(&p.scenario)),
            ));
        }
    }
    let mut samples: u64 = 0;
    for s in &w.profile {
        check_amount("profile.energy_j", s.energy_j)?;
        samples = samples.checked_add(s.samples).ok_or_else(|| {
            refuse(
                "overflow",
                "the profile's samples sum past 2^64".to_string(),
            )
        })?;
        check_count("profile.samples", samples)?;
    }
    check_amount("profile_trimmed_energy_j", w.profile_trimmed_energy_j)?;
    check_request_cpu(&w.request_cpu)?;
    match &w.supply {
        Some(supply) => check_supply(supply),
        None => Ok(()),
    }
}

/// Longest supply text (CPU model, vendor, arch) and label key or value.
pub const MAX_SUPPLY_TEXT_BYTES: usize = 128;
pub const MAX_LABEL_BYTES: usize = 63;
pub const MAX_SUPPLY_LABELS: usize = 32;
/// Most logical CPUs a host (or the physical machine under it) may report.
pub const MAX_SUPPLY_CPUS: u32 = 1 << 16;

/// The resource supply (#27): short printable texts, a known machine kind,
/// label keys of letters, digits, `.`, `_`, `-`, `/`, bounded counts.
fn check_supply(s: &v1::ResourceSupply) -> Result<(), Refusal> {
    let bad = |reason: String| refuse("bad_supply", reason);
    for (name, text, max) in [
        ("cpu_model", &s.cpu_model, MAX_SUPPLY_TEXT_BYTES),
        ("cpu_vendor", &s.cpu_vendor, MAX_SUPPLY_TEXT_BYTES),
        ("arch", &s.arch, MAX_SUPPLY_TEXT_BYTES),
    ] {
        if text.len() > max || text.chars().any(char::is_control) {
            return Err(bad(format!(
                "supply.{name} must be at most {max} bytes without control characters: {}",
                clip(text)
            )));
        }
    }
    if !matches!(s.machine_kind.as_str(), "" | "vm" | "bare_metal") {
        return Err(bad(format!(
            "supply.machine_kind {} is not vm, bare_metal or empty",
            clip(&s.machine_kind)
        )));
    }
    for (name, cpus) in [
        ("logical_cpus", s.logical_cpus),
        ("physical_host_cpus", s.physical_host_cpus),
    ] {
        if cpus > MAX_SUPPLY_CPUS {
            return Err(bad(format!(
                "supply.{name} = {cpus} (at most {MAX_SUPPLY_CPUS})"
            )));
        }
    }
    check_count("supply.memory_bytes", s.memory_bytes)?;
    if s.labels.len() > MAX_SUPPLY_LABELS {
        return Err(bad(format!(
            "{} supply labels (at most {MAX_SUPPLY_LABELS})",
            s.labels.len()
        )));
    }
    for (key, value) in &s.labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_BYTES
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(bad(format!(
                "supply label key {} must be 1 to {MAX_LABEL_BYTES} letters, digits, '.', '_', '-' or '/'",
                clip(key)
            )));
        }
        if value.len() > MAX_LABEL_BYTES || value.chars().any(char::is_control) {
            return Err(bad(format!(
                "supply label {}: value must be at most {MAX_LABEL_BYTES} bytes without control characters: {}",
                clip(key),
                clip(value)
            )));
        }
    }
    Ok(())
}

/// Per-request CPU histograms: known scenarios, at most 65 log2 buckets,
/// finite non-negative energy rates, totals that fit the store.
fn check_request_cpu(histograms: &[v1::RequestCpuHistogram]) -> Result<(), Refusal> {
    for h in histograms {
        let at = |name: &str| format!("request_cpu[{}].{name}", clip(&h.scenario));
        if !known_scenario(&h.scenario) {
            return Err(refuse(
                "unknown_scenario",
                format!("request_cpu has scenario {}", clip(&h.scenario)),
            ));
        }
        // Bucket i holds CPU times of i significant bits: at most 65 buckets.
        if h.counts.len() > 65 {
            return Err(refuse(
                "too_large",
                format!(
                    "{} has {} buckets (at most 65)",
                    at("counts"),
                    h.counts.len()
                ),
            ));
        }
        check_amount(&at("energy_j_per_cpu_ns"), h.energy_j_per_cpu_ns)?;
        check_count(&at("sum_cpu_ns"), h.sum_cpu_ns)?;
        let requests = h
            .counts
            .iter()
            .try_fold(0u64, |sum, n| sum.checked_add(*n))
            .ok_or_else(|| refuse("overflow", format!("{} sum past 2^64", at("counts"))))?;
        check_count(&at("counts"), requests)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn histogram(scenario: &str, counts: Vec<u64>, rate: f64) -> v1::RequestCpuHistogram {
        v1::RequestCpuHistogram {
            scenario: scenario.into(),
            service: "loan".into(),
            counts,
            sum_cpu_ns: 1_000,
            energy_j_per_cpu_ns: rate,
        }
    }

    #[test]
    fn supplies_are_checked_with_a_reason() {
        let good = v1::ResourceSupply {
            cpu_model: "Intel Xeon".into(),
            machine_kind: "vm".into(),
            logical_cpus: 2,
            labels: [("pool".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(check_supply(&good), Ok(()));
        for (bad, says) in [
            (
                v1::ResourceSupply {
                    cpu_model: "x\0y".into(),
                    ..good.clone()
                },
                "supply.cpu_model",
            ),
            (
                v1::ResourceSupply {
                    machine_kind: "container".into(),
                    ..good.clone()
                },
                "machine_kind",
            ),
            (
                v1::ResourceSupply {
                    labels: [("a b".to_string(), "1".to_string())].into(),
                    ..good.clone()
                },
                "label key",
            ),
            (
                v1::ResourceSupply {
                    logical_cpus: MAX_SUPPLY_CPUS + 1,
                    ..good.clone()
                },
                "logical_cpus",
            ),
        ] {
            let r = check_supply(&bad).unwrap_err();
            assert_eq!(r.kind, "bad_supply");
            assert!(r.reason.contains(says), "{}", r.reason);
        }
    }

    #[test]
    fn request_histograms_are_checked_with_a_reason() {
        assert!(check_request_cpu(&[histogram("credit", vec![0, 1, 2], 1e-9)]).is_ok());
        let reason = |h| check_request_cpu(&[h]).unwrap_err().kind;
        assert!(reason(histogram("credit", vec![1], f64::NAN)).starts_with("not_finite"));
        assert!(reason(histogram("credit", vec![1], -1e-9)).starts_with("negative"));
        assert!(reason(histogram("loan", vec![1], 1e-9)).starts_with("unknown_scenario"));
        assert!(reason(histogram("credit", vec![1; 66], 1e-9)).starts_with("too_large"));
        assert!(reason(histogram("credit", vec![u64::MAX, 1], 1e-9)).starts_with("overflow"));
    }
}
