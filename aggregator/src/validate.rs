//! What the aggregator accepts. A window is taken whole or refused whole,
//! with a reason and a code that tells the agent what to do with it; nothing
//! of a refused window reaches the store. Sums are checked (a total that
//! would wrap is refused), and no reason echoes more than [`ECHO_MAX`] bytes
//! of what the client sent.
use agent_common::request_cpu::request_cpu_buckets_of;
use agent_common::REQUEST_CPU_SUB_BUCKET_BITS;
use sci_proto::v1;
use sci_proto::v1::RefusalCode;

use crate::config::AggregatorConfig;

/// The scenario codes a window may carry: the four of the standard and the unassigned line.
fn known_scenario(name: &str) -> bool {
    agent_common::SCENARIO_NAMES.contains(&name) || name == agent_common::UNASSIGNED
}
const MAX_PROCESSES: usize = 200_000;
/// Most logical CPUs a host may report.
const MAX_CPUS: u32 = 65_536;
const J_PER_KWH: f64 = 3.6e6;
/// Relative difference allowed between a window's carbon and its energy x
/// intensity x PUE: rounding, not a second opinion.
const CARBON_TOLERANCE: f64 = 1e-6;
/// Shortest machine life the embodied ceiling assumes.
const YEAR_S: f64 = 365.0 * 86_400.0;
pub use crate::config::MAX_PROFILE_STACKS;

/// Longest piece of client input quoted back in a refusal or an error.
pub const ECHO_MAX: usize = 64;
/// Longest host name (DNS limit) and agent instance accepted.
pub const MAX_HOST_BYTES: usize = 253;
pub const MAX_INSTANCE_BYTES: usize = 128;
/// Longest data centre or service name, and longest disclosure label
/// (intensity, energy and share sources, energy model). With these bounds
/// the widest rollup key (data centre and four labels) stays below
/// PostgreSQL's btree limit of 2,704 bytes, so both stores take the same windows.
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_LABEL_BYTES: usize = 400;
/// Longest frame of a folded stack, and longest stack, as stored: longer
/// ones are shortened (see [`shorten_stacks`]), never refused.
pub const MAX_FRAME_BYTES: usize = 256;
pub const MAX_STACK_BYTES: usize = 2048;

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
        "future" | "clock_ahead" => RefusalCode::ClockAhead,
        "clock_behind" => RefusalCode::ClockBehind,
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

/// The agent's clock against the aggregator's, from the time the agent
/// says it sent the batch (0: an agent that does not say; only its windows'
/// ends are checked). A clock behind by more than `max_clock_skew` dates its
/// windows in the past (an agent a day behind stored a day of windows into
/// yesterday): refused as `clock_behind`. A clock ahead: `clock_ahead`, kept
/// by the agent and sent again later. The offset says how far.
pub fn check_clock(
    sent_unix_ns: u64,
    config: &AggregatorConfig,
    now_unix_ns: u64,
) -> Result<(), Refusal> {
    if sent_unix_ns == 0 {
        return Ok(());
    }
    let skew_ns = config.max_clock_skew.as_nanos() as u64;
    let offset_s = (sent_unix_ns as f64 - now_unix_ns as f64) / 1e9;
    if sent_unix_ns < now_unix_ns.saturating_sub(skew_ns) {
        return Err(refuse(
            "clock_behind",
            format!(
                "the agent's clock is {:.0} s behind the aggregator's (max_clock_skew {} s): its windows are misdated",
                -offset_s,
                config.max_clock_skew.as_secs()
            ),
        ));
    }
    if sent_unix_ns > now_unix_ns.saturating_add(skew_ns) {
        return Err(refuse(
            "clock_ahead",
            format!(
                "the agent's clock is {offset_s:.0} s ahead of the aggregator's (max_clock_skew {} s)",
                config.max_clock_skew.as_secs()
            ),
        ));
    }
    Ok(())
}

/// A name that becomes part of a store key: bounded, and without NUL
/// (PostgreSQL text cannot hold one).
fn check_key_text(what: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.len() > max {
        return Err(refuse(
            "bad_name",
            format!(
                "{what} of {} bytes (at most {max}): {}",
                value.len(),
                clip(value)
            ),
        ));
    }
    if value.contains('\0') {
        return Err(refuse(
            "bad_name",
            format!("{what} contains a NUL byte: {}", clip(value)),
        ));
    }
    Ok(())
}

/// Every name of a window that reaches a key or an index of the store.
fn check_keys(w: &v1::WindowReport) -> Result<(), Refusal> {
    check_key_text("host", &w.host, MAX_HOST_BYTES)?;
    check_key_text("agent_instance", &w.agent_instance, MAX_INSTANCE_BYTES)?;
    check_key_text("datacenter", &w.datacenter, MAX_NAME_BYTES)?;
    check_key_text("intensity_source", &w.intensity_source, MAX_LABEL_BYTES)?;
    check_key_text("energy_source", &w.energy_source, MAX_LABEL_BYTES)?;
    check_key_text("energy_model", &w.energy_model, MAX_LABEL_BYTES)?;
    if let Some(e) = &w.embodied {
        check_key_text("embodied.share_source", &e.share_source, MAX_LABEL_BYTES)?;
    }
    for p in &w.processes {
        check_key_text(
            &format!("processes[pid {}].service", p.pid),
            &p.service,
            MAX_NAME_BYTES,
        )?;
        check_key_text(
            &format!("processes[pid {}].scenario", p.pid),
            &p.scenario,
            MAX_NAME_BYTES,
        )?;
    }
    for s in &w.profile {
        check_key_text("profile.service", &s.service, MAX_NAME_BYTES)?;
        check_key_text("profile.scenario", &s.scenario, MAX_NAME_BYTES)?;
        if s.stack.contains('\0') {
            return Err(refuse(
                "bad_name",
                format!("a profile stack of pid {} contains a NUL byte", s.pid),
            ));
        }
    }
    for h in &w.request_cpu {
        check_key_text("request_cpu.service", &h.service, MAX_NAME_BYTES)?;
    }
    Ok(())
}

/// The distinct services a window names (processes, profile, request
/// histograms) at most `max`: each becomes rows of the service, profile and
/// request rollups, so one window of 40,000 services multiplied what every
/// later query reads. Refused, not trimmed: a service carries carbon, and
/// folding services together would state figures for a service that does
/// not exist; so many services means the agent's service rules name
/// something unbounded (a pid, a request id), which the agent must fix.
fn check_services(w: &v1::WindowReport, max: usize) -> Result<(), Refusal> {
    let mut services: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let names = w
        .processes
        .iter()
        .map(|p| p.service.as_str())
        .chain(w.profile.iter().map(|s| s.service.as_str()))
        .chain(w.request_cpu.iter().map(|h| h.service.as_str()));
    for name in names {
        if services.insert(name) && services.len() > max {
            return Err(refuse(
                "too_many_services",
                format!(
                    "the window names more than {max} distinct services (max_services_per_window); the agent's service rules must not name services after something unbounded"
                ),
            ));
        }
    }
    Ok(())
}

/// Keeps the window's `max` profile stacks with the most energy; the others
/// are trimmed, their energy added to `profile_trimmed_energy_j` and their
/// count to `profile_stacks_trimmed` (as the agent trims an oversized
/// window). Returns how many were trimmed. Trimmed, not refused: a stack is
/// a sample of where the energy went, the window's figures do not depend
/// on it, and the trimmed energy stays disclosed.
pub fn trim_stacks(w: &mut v1::WindowReport, max: usize) -> u64 {
    if w.profile.len() <= max {
        return 0;
    }
    w.profile.sort_by(|a, b| b.energy_j.total_cmp(&a.energy_j));
    let trimmed = w.profile.split_off(max);
    w.profile_trimmed_energy_j += trimmed.iter().map(|s| s.energy_j).sum::<f64>();
    w.profile_stacks_trimmed += trimmed.len() as u64;
    trimmed.len() as u64
}

/// Hex of the first 8 bytes of the SHA-256 of `text`.
fn short_hash(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A folded stack bounded for the store's keys: a frame over
/// [`MAX_FRAME_BYTES`] keeps its start and a hash of the whole frame; a
/// stack still over [`MAX_STACK_BYTES`] keeps its leaf-most frames behind
/// one `[N frames elided #hash]` frame (the hash of the whole stack, so
/// distinct stacks stay distinct). None when it already fits.
pub fn shorten_stack(stack: &str) -> Option<String> {
    let frame_cut = stack.split(';').any(|f| f.len() > MAX_FRAME_BYTES);
    if !frame_cut && stack.len() <= MAX_STACK_BYTES {
        return None;
    }
    let frames: Vec<String> = stack
        .split(';')
        .map(|f| {
            if f.len() > MAX_FRAME_BYTES {
                format!("{}..#{}", cut(f, MAX_FRAME_BYTES - 20), short_hash(f))
            } else {
                f.to_string()
            }
        })
        .collect();
    let joined = frames.join(";");
    if joined.len() <= MAX_STACK_BYTES {
        return Some(joined);
    }
    // Leaf-most frames that fit after the marker (at most ~40 bytes).
    let budget = MAX_STACK_BYTES - 48;
    let mut kept = 0;
    let mut bytes = 0;
    for f in frames.iter().rev() {
        if bytes + f.len() + 1 > budget {
            break;
        }
        bytes += f.len() + 1;
        kept += 1;
    }
    let elided = frames.len() - kept;
    let mut out = format!("[{elided} frames elided #{}]", short_hash(stack));
    for f in &frames[elided..] {
        out.push(';');
        out.push_str(f);
    }
    Some(out)
}

/// Shortens the window's profile stacks that exceed the store's bounds
/// (see [`shorten_stack`]); returns how many were shortened.
pub fn shorten_stacks(w: &mut v1::WindowReport) -> u64 {
    let mut shortened = 0;
    for s in &mut w.profile {
        if let Some(short) = shorten_stack(&s.stack) {
            s.stack = short;
            shortened += 1;
        }
    }
    shortened
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
    check_keys(w)?;
    check_services(w, config.max_services_per_window)?;
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
    check_plausible(w, config, seconds)?;
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
    let requests: f64 = w
        .request_cpu
        .iter()
        .flat_map(|h| h.counts.iter())
        .map(|n| *n as f64)
        .sum();
    let max_requests = config.max_requests_per_cpu_s * f64::from(w.cpus) * seconds;
    if requests > max_requests {
        return Err(refuse(
            "implausible_requests",
            format!(
                "{requests:.0} requests in the histograms, above {} per CPU-second x {} CPUs x {seconds:.3} s (max_requests_per_cpu_s)",
                config.max_requests_per_cpu_s, w.cpus
            ),
        ));
    }
    match &w.supply {
        Some(supply) => check_supply(supply),
        None => Ok(()),
    }
}

/// The host's factors and figures against physical bounds: CPUs, intensity,
/// PUE, energy per CPU-second, idle within host energy, carbon and embodied
/// carbon below what the bounds allow. Each bound keeps every later sum finite.
fn check_plausible(
    w: &v1::WindowReport,
    config: &AggregatorConfig,
    seconds: f64,
) -> Result<(), Refusal> {
    if w.cpus == 0 || w.cpus > MAX_CPUS {
        return Err(refuse(
            "implausible_cpus",
            format!("cpus = {} (1 to {MAX_CPUS})", w.cpus),
        ));
    }
    if w.carbon_intensity_g_per_kwh > config.max_intensity_g_per_kwh {
        return Err(refuse(
            "implausible_intensity",
            format!(
                "carbon_intensity_g_per_kwh = {} above max_intensity_g_per_kwh ({})",
                w.carbon_intensity_g_per_kwh, config.max_intensity_g_per_kwh
            ),
        ));
    }
    if w.pue < 1.0 || w.pue > config.max_pue {
        return Err(refuse(
            "implausible_pue",
            format!("pue = {} (1 to max_pue {})", w.pue, config.max_pue),
        ));
    }
    let cpu_ceiling_j = config.max_cpu_power_w * f64::from(w.cpus) * seconds;
    if w.host_energy_j > cpu_ceiling_j {
        return Err(refuse(
            "implausible_energy",
            format!(
                "{:.1} J in {seconds:.3} s on {} CPUs is {:.0} W per CPU, above max_cpu_power_w ({})",
                w.host_energy_j,
                w.cpus,
                w.host_energy_j / seconds / f64::from(w.cpus),
                config.max_cpu_power_w
            ),
        ));
    }
    if w.idle_energy_j > w.host_energy_j * (1.0 + 1e-9) {
        return Err(refuse(
            "implausible_energy",
            format!(
                "idle_energy_j ({}) above host_energy_j ({})",
                w.idle_energy_j, w.host_energy_j
            ),
        ));
    }
    // The most carbon the host could emit in the window: its power ceiling
    // at the highest intensity and PUE allowed.
    let ceiling_j = config.max_host_power_w.min(cpu_ceiling_j / seconds) * seconds;
    let carbon_ceiling_g = ceiling_j / J_PER_KWH * config.max_intensity_g_per_kwh * config.max_pue;
    let scenario_carbon_g: f64 = w.scenarios.iter().map(|s| s.carbon_g).sum();
    for (name, value) in [
        ("host_carbon_g", w.host_carbon_g),
        ("the scenarios' carbon_g", scenario_carbon_g),
    ] {
        if value > carbon_ceiling_g {
            return Err(refuse(
                "implausible_carbon",
                format!(
                    "{name} = {value} g above the {carbon_ceiling_g:.3} g the host could emit in {seconds:.3} s (max power x max_intensity_g_per_kwh x max_pue)"
                ),
            ));
        }
    }
    // Carbon is energy x intensity x PUE (the agent computes it so, and its
    // merge keeps it so): a window whose carbon does not follow from its
    // own factors states a figure nothing supports.
    let expected_g = w.host_energy_j / J_PER_KWH * w.carbon_intensity_g_per_kwh * w.pue;
    if (w.host_carbon_g - expected_g).abs() > CARBON_TOLERANCE * expected_g.abs() + 1e-12 {
        return Err(refuse(
            "inconsistent_carbon",
            format!(
                "host_carbon_g = {} g, but host_energy_j x intensity x pue = {} J x {} g/kWh x {} = {expected_g} g",
                w.host_carbon_g, w.host_energy_j, w.carbon_intensity_g_per_kwh, w.pue
            ),
        ));
    }
    let embodied_ceiling_g = config.max_embodied_g * seconds / YEAR_S;
    let scenario_embodied_g: f64 = w.scenarios.iter().map(|s| s.embodied_g).sum();
    if let Some(e) = &w.embodied {
        check_amount("embodied.total_embodied_g", e.total_embodied_g)?;
        check_amount("embodied.lifespan_s", e.lifespan_s)?;
        check_amount("embodied.resource_share", e.resource_share)?;
        if e.total_embodied_g > config.max_embodied_g || e.resource_share > 1.0 {
            return Err(refuse(
                "implausible_embodied",
                format!(
                    "embodied factors TE = {} g (at most max_embodied_g {}), share {} (at most 1)",
                    e.total_embodied_g, config.max_embodied_g, e.resource_share
                ),
            ));
        }
    }
    for (name, value) in [
        ("host_embodied_g", w.host_embodied_g),
        ("the scenarios' embodied_g", scenario_embodied_g),
    ] {
        if value > embodied_ceiling_g {
            return Err(refuse(
                "implausible_embodied",
                format!(
                    "{name} = {value} g above {embodied_ceiling_g:.3} g (max_embodied_g over a one-year life)"
                ),
            ));
        }
    }
    Ok(())
}

/// Longest supply text (CPU model, vendor, arch) and label key or value.
pub const MAX_SUPPLY_TEXT_BYTES: usize = 128;
pub const MAX_SUPPLY_LABEL_BYTES: usize = 63;
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
            && key.len() <= MAX_SUPPLY_LABEL_BYTES
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(bad(format!(
                "supply label key {} must be 1 to {MAX_SUPPLY_LABEL_BYTES} letters, digits, '.', '_', '-' or '/'",
                clip(key)
            )));
        }
        if value.len() > MAX_SUPPLY_LABEL_BYTES || value.chars().any(char::is_control) {
            return Err(bad(format!(
                "supply label {}: value must be at most {MAX_SUPPLY_LABEL_BYTES} bytes without control characters: {}",
                clip(key),
                clip(value)
            )));
        }
    }
    Ok(())
}

/// Per-request CPU histograms: known scenarios, a known bucket layout (the
/// current log-linear one or the log2 one of older agents) and no more
/// buckets than it has, finite non-negative energy rates, totals that fit
/// the store.
fn check_request_cpu(histograms: &[v1::RequestCpuHistogram]) -> Result<(), Refusal> {
    for h in histograms {
        let at = |name: &str| format!("request_cpu[{}].{name}", clip(&h.scenario));
        if !known_scenario(&h.scenario) {
            return Err(refuse(
                "unknown_scenario",
                format!("request_cpu has scenario {}", clip(&h.scenario)),
            ));
        }
        if h.sub_bucket_bits != 0 && h.sub_bucket_bits != REQUEST_CPU_SUB_BUCKET_BITS {
            return Err(refuse(
                "unknown_layout",
                format!(
                    "{} is {} (known: 0, log2 buckets, or {REQUEST_CPU_SUB_BUCKET_BITS})",
                    at("sub_bucket_bits"),
                    h.sub_bucket_bits
                ),
            ));
        }
        let most = request_cpu_buckets_of(h.sub_bucket_bits);
        if h.counts.len() > most {
            return Err(refuse(
                "too_large",
                format!(
                    "{} has {} buckets (at most {most} with sub_bucket_bits {})",
                    at("counts"),
                    h.counts.len(),
                    h.sub_bucket_bits
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
            sub_bucket_bits: 4,
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
        assert!(reason(histogram("credit", vec![1; 977], 1e-9)).starts_with("too_large"));
        assert!(check_request_cpu(&[histogram("credit", vec![1; 976], 1e-9)]).is_ok());
        let log2 = |counts| v1::RequestCpuHistogram {
            sub_bucket_bits: 0,
            ..histogram("credit", counts, 1e-9)
        };
        assert!(check_request_cpu(&[log2(vec![1; 64])]).is_ok());
        assert!(reason(log2(vec![1; 65])).starts_with("too_large"));
        let other = v1::RequestCpuHistogram {
            sub_bucket_bits: 3,
            ..histogram("credit", vec![1], 1e-9)
        };
        assert!(reason(other).starts_with("unknown_layout"));
        assert!(reason(histogram("credit", vec![u64::MAX, 1], 1e-9)).starts_with("overflow"));
    }

    #[test]
    fn long_stacks_are_shortened_within_the_bounds_and_stay_distinct() {
        assert_eq!(shorten_stack("main;work;leaf"), None);
        let frame = "f".repeat(1000);
        let one = shorten_stack(&format!("main;{frame};leaf")).unwrap();
        assert!(
            one.starts_with("main;ffff") && one.ends_with(";leaf"),
            "{one}"
        );
        assert!(one.split(';').all(|f| f.len() <= MAX_FRAME_BYTES));
        let deep = |leaf: &str| {
            let mut frames: Vec<String> = (0..500).map(|i| format!("frame_{i:04}")).collect();
            frames.push(leaf.to_string());
            frames.join(";")
        };
        let (a, b) = (
            shorten_stack(&deep("a")).unwrap(),
            shorten_stack(&deep("b")).unwrap(),
        );
        assert!(a.len() <= MAX_STACK_BYTES && b.len() <= MAX_STACK_BYTES);
        assert!(a.starts_with('[') && a.contains("frames elided #"), "{a}");
        assert!(a.ends_with(";frame_0499;a"), "{a}");
        assert_ne!(
            a.split(';').next(),
            b.split(';').next(),
            "distinct stacks, distinct hashes"
        );
        // Multi-byte characters are cut on a boundary.
        let wide = shorten_stack(&"\u{00e9}".repeat(3000)).unwrap();
        assert!(wide.len() <= MAX_STACK_BYTES);
    }
}
