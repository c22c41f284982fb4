//! Prometheus text exposition of the agent's figures, served on `GET /metrics`.
//!
//! Totals are accumulated from each [`WindowReport`] (counters never go
//! down). Label cardinality is bounded: a running process gets its own series
//! (`pid`, `comm`, `cgroup`) while there are fewer than `max_process_series`
//! of them; a process that exits, is not seen for [`STALE_WINDOWS`] windows,
//! or arrives when the limit is reached is folded into its `comm` (+`cgroup`)
//! series (no `pid` label), so the sum over a comm's series never decreases.
//! Beyond `max_comm_series` comm series, the rest go to `comm="_other"`.
//!
//! The same figures per (service, scenario) of the process rules
//! (`sci_service_*`, `unassigned` where a process has none) are bounded by
//! `[agent] max_service_series`: a pair that arrives when the limit is
//! reached goes to `service="_other",scenario="_other"`, and each process
//! record folded there is counted in `sci_service_series_folded_total`.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State as Shared;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use agent_common::prometheus_text::{self, Family, Labels};

use crate::error::AgentError;
use crate::window::{Text, WindowReport};

/// A process series not seen for this many windows is folded into its comm series.
pub const STALE_WINDOWS: u64 = 60;
pub const DEFAULT_MAX_PROCESS_SERIES: usize = 200;
pub const DEFAULT_MAX_COMM_SERIES: usize = 500;
/// Comm label of the series that takes everything beyond the comm limit.
pub const OTHER_COMM: &str = "_other";
pub const DEFAULT_MAX_SERVICE_SERIES: usize = 200;
/// Service and scenario labels of the series beyond `max_service_series`.
pub const OTHER_SERVICE: &str = "_other";

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    cpu_ns: u64,
    energy_j: f64,
    idle_share_j: f64,
    carbon_g: f64,
    embodied_g: f64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.cpu_ns = self.cpu_ns.saturating_add(other.cpu_ns);
        self.energy_j += other.energy_j;
        self.idle_share_j += other.idle_share_j;
        self.carbon_g += other.carbon_g;
        self.embodied_g += other.embodied_g;
    }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

#[derive(Debug)]
struct ProcessSeries {
    cgroup: Text,
    totals: Totals,
    last_window: u64,
}

#[derive(Debug, Default)]
struct State {
    windows: u64,
    host_energy_j: f64,
    host_idle_energy_j: f64,
    host_unattributed_energy_j: f64,
    host_carbon_g: f64,
    host_embodied_g: f64,
    busy_cpu_ns: u64,
    idle_cpu_ns: u64,
    conservation_violations: u64,
    energy_warnings: u64,
    /// Seconds between a previous run's last window and this run's first.
    unmeasured_s: f64,
    energy_source: Option<(String, bool)>,
    cpu_source: Option<String>,
    intensity_g_per_kwh: f64,
    pue: f64,
    lost_events: BTreeMap<&'static str, u64>,
    /// Transaction reports the ingest endpoint refused, per reason.
    ingest_refused: BTreeMap<String, u64>,
    lost_cpu_ns: BTreeMap<&'static str, u64>,
    /// (source, fault) -> windows' fault counts.
    energy_faults: BTreeMap<(String, String), u64>,
    /// The node labels poller's last status (`[host.kubernetes]`).
    node_labels: Option<crate::sources::node_labels::NodeLabelsStatus>,
    /// (pid, comm) -> series.
    processes: HashMap<(u32, Text), ProcessSeries>,
    /// (comm, cgroup) -> folded totals.
    comms: BTreeMap<(Text, Text), Totals>,
    /// (service, scenario) -> totals; at most `max_service_series` keys.
    services: BTreeMap<(Text, Text), Totals>,
    /// Process records folded into the `_other` service series.
    services_folded: u64,
    /// Per business scenario (credit, drawdown, repayment, query, unassigned).
    scenarios: BTreeMap<String, ScenarioTotals>,
    business_units: f64,
}

/// (metric name, help, value of a scenario's totals).
type ScenarioSeries = (&'static str, &'static str, fn(&ScenarioTotals) -> f64);

/// Running totals of one business scenario.
#[derive(Debug, Default, Clone)]
struct ScenarioTotals {
    weight: f64,
    transactions: u64,
    cpu_ns: u64,
    energy_j: f64,
    carbon_g: f64,
    embodied_g: f64,
}

/// Accumulates window reports and renders them as Prometheus text.
#[derive(Debug)]
pub struct MetricsRegistry {
    state: Mutex<State>,
    /// The spool's delivery counters and the age past which delivery is "behind".
    delivery: Mutex<Option<(Arc<crate::sinks::spool::DeliveryStats>, Duration)>>,
    /// The OTLP exporter's figures, when `[otlp]` is configured.
    otlp: Mutex<Option<Arc<crate::sinks::otlp::OtlpSinkStats>>>,
    max_process_series: usize,
    max_comm_series: usize,
    max_service_series: usize,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        MetricsRegistry::new()
    }
}

impl MetricsRegistry {
    pub fn new() -> MetricsRegistry {
        MetricsRegistry::with_limits(DEFAULT_MAX_PROCESS_SERIES, DEFAULT_MAX_COMM_SERIES)
    }

    pub fn with_limits(max_process_series: usize, max_comm_series: usize) -> MetricsRegistry {
        MetricsRegistry {
            state: Mutex::new(State::default()),
            delivery: Mutex::new(None),
            otlp: Mutex::new(None),
            max_process_series,
            max_comm_series: max_comm_series.max(1),
            max_service_series: DEFAULT_MAX_SERVICE_SERIES,
        }
    }

    /// At most `max` (service, scenario) series, `_other` included (at least 1).
    pub fn with_service_series(mut self, max: usize) -> MetricsRegistry {
        self.max_service_series = max.max(1);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the totals half-updated in a way
        // worse than losing one window; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shows the spool's delivery figures, and reports delivery as behind on
    /// /healthz when the oldest unacknowledged window ended more than
    /// `behind_after` ago.
    pub fn set_delivery(
        &self,
        stats: Arc<crate::sinks::spool::DeliveryStats>,
        behind_after: Duration,
    ) {
        *self.delivery.lock().unwrap_or_else(|p| p.into_inner()) = Some((stats, behind_after));
    }

    /// Shows the OTLP exporter's figures.
    pub fn set_otlp(&self, stats: Arc<crate::sinks::otlp::OtlpSinkStats>) {
        *self.otlp.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// `Ok(text)` when healthy, `Err(text)` saying how far behind delivery is.
    pub fn health(&self) -> Result<String, String> {
        use std::sync::atomic::Ordering;
        let delivery = self.delivery.lock().unwrap_or_else(|p| p.into_inner());
        let Some((d, behind_after)) = delivery.as_ref() else {
            return Ok("ok\n".into());
        };
        let pending = d.pending_windows.load(Ordering::Relaxed);
        let oldest_ns = d.oldest_pending_end_ns.load(Ordering::Relaxed);
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_nanos() as u64)
            .unwrap_or(0);
        let age = Duration::from_nanos(now_ns.saturating_sub(oldest_ns));
        let held = d.held_windows.load(Ordering::Relaxed);
        if held > 0 {
            return Err(format!(
                "delivery stuck: {held} windows refused as ahead of the aggregator's clock (this host's clock is ahead, or the aggregator's behind); {pending} windows unacknowledged\n"
            ));
        }
        let clock_refused_s = d.last_clock_refusal_unix_s.load(Ordering::Relaxed);
        let since_s = (now_ns / 1_000_000_000).saturating_sub(clock_refused_s);
        if clock_refused_s > 0 && since_s <= behind_after.as_secs() {
            return Err(format!(
                "delivery stuck: the aggregator refused windows for this host's clock {since_s} s ago ({} quarantined as misdated so far)\n",
                d.clock_behind.load(Ordering::Relaxed)
            ));
        }
        if pending > 0 && oldest_ns > 0 && age > *behind_after {
            return Err(format!(
                "delivery behind: {pending} windows unacknowledged, the oldest ended {} s ago (behind_after {} s)\n",
                age.as_secs(),
                behind_after.as_secs()
            ));
        }
        Ok(format!(
            "ok: {pending} windows waiting for an acknowledgement\n"
        ))
    }

    fn delivery_families(&self, out: &mut Vec<Family>) {
        use std::sync::atomic::Ordering;
        let delivery = self.delivery.lock().unwrap_or_else(|p| p.into_inner());
        let Some((d, _)) = delivery.as_ref() else {
            return;
        };
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.push(
            Family::gauge(
                "sci_agent_spool_windows",
                "Windows in the spool waiting for an acknowledgement.",
            )
            .single(load(&d.pending_windows)),
        );
        out.push(
            Family::gauge(
                "sci_agent_spool_bytes",
                "Bytes of window records in the spool.",
            )
            .single(load(&d.pending_bytes)),
        );
        out.push(
            Family::gauge(
                "sci_agent_delivery_oldest_pending_end_seconds",
                "End of the oldest unacknowledged window (unix seconds; 0: none).",
            )
            .single((d.oldest_pending_end_ns.load(Ordering::Relaxed) / 1_000_000_000) as f64),
        );
        out.push(
            Family::gauge(
                "sci_agent_delivery_last_ack_seconds",
                "Time of the last acknowledgement (unix seconds; 0: none yet).",
            )
            .single(load(&d.last_ack_unix_s)),
        );
        out.push(
            Family::counter(
                "sci_agent_windows_acked_total",
                "Windows the aggregator acknowledged as stored.",
            )
            .single(load(&d.acked)),
        );
        let mut lost = Family::counter(
            "sci_agent_windows_lost_total",
            "Windows that will not reach the aggregator, per reason (quarantined ones are kept on disk).",
        );
        for (reason, a) in [
            ("quarantined_refused", &d.quarantined_refused),
            ("quarantined_damaged", &d.corrupt),
            ("dropped_write_failed", &d.dropped_write_failed),
            ("dropped_spool_full", &d.dropped_spool_full),
            ("quarantined_oversized", &d.oversized),
            ("vanished", &d.vanished),
            ("quarantined_clock_behind", &d.clock_behind),
        ] {
            lost.push(&[("reason", reason)], load(a));
        }
        out.push(lost);
        let mut events = Family::counter(
            "sci_agent_spool_events_total",
            "What the spool did to keep every window: merges, renumbering, new instances, state rebuilt, refusals deferred, write failures.",
        );
        for (event, a) in [
            ("merged", &d.merges),
            ("renumbered", &d.renumbered),
            ("new_instance", &d.new_instances),
            ("state_recovered", &d.state_recovered),
            ("deferred_clock_ahead", &d.deferred),
            ("write_failed", &d.write_failures),
        ] {
            events.push(&[("event", event)], load(a));
        }
        out.push(events);
        out.push(
            Family::counter(
                "sci_agent_profile_stacks_trimmed_total",
                "Profile stacks left out so a window fits the batch limit.",
            )
            .single(load(&d.trimmed_stacks)),
        );
    }

    /// Count energy-source warnings (unreadable or rejected domains) of a window.
    pub fn observe_energy_warnings(&self, count: usize) {
        self.lock().energy_warnings += count as u64;
    }

    /// The node labels poller's status after a window (its counts are totals).
    pub fn observe_node_labels(&self, status: crate::sources::node_labels::NodeLabelsStatus) {
        self.lock().node_labels = Some(status);
    }

    /// Time no window covers: between an earlier run's last window and this run's first.
    pub fn observe_unmeasured(&self, seconds: f64) {
        self.lock().unmeasured_s += seconds.max(0.0);
    }

    /// Add one window to the totals.
    pub fn observe(&self, report: &WindowReport) {
        let mut s = self.lock();
        let s = &mut *s;
        s.windows += 1;
        let window = s.windows;
        s.host_energy_j += finite(report.host_energy_j);
        s.host_idle_energy_j += finite(report.idle_energy_j);
        s.host_unattributed_energy_j += finite(report.unattributed_energy_j);
        s.business_units += finite(report.business_units);
        for line in &report.scenarios {
            let totals = s.scenarios.entry(line.scenario.clone()).or_default();
            totals.weight = line.weight;
            totals.transactions += line.transactions;
            totals.cpu_ns += line.cpu_ns;
            totals.energy_j += finite(line.energy_j);
            totals.carbon_g += finite(line.carbon_g);
            totals.embodied_g += finite(line.embodied_g);
        }
        s.host_carbon_g += finite(report.host_carbon_g);
        s.host_embodied_g += finite(report.host_embodied_g);
        s.busy_cpu_ns = s.busy_cpu_ns.saturating_add(report.busy_cpu_ns);
        s.idle_cpu_ns = s.idle_cpu_ns.saturating_add(report.idle_cpu_ns);
        s.conservation_violations = s
            .conservation_violations
            .max(report.conservation_violations);
        if !report.energy_source.is_empty() {
            s.energy_source = Some((report.energy_source.clone(), report.estimated));
        }
        s.cpu_source = Some(report.cpu_source.as_str().to_string());
        for (name, n) in &report.energy_faults {
            let (source, fault) = name.split_once('/').unwrap_or((name.as_str(), "failed"));
            *s.energy_faults
                .entry((source.to_string(), fault.to_string()))
                .or_default() += n;
        }
        s.intensity_g_per_kwh = report.carbon_intensity_g_per_kwh;
        s.pue = report.pue;
        for (reason, n) in &report.ingest_refused {
            *s.ingest_refused.entry(reason.clone()).or_default() += n;
        }
        let l = &report.lost;
        for (kind, n) in [
            ("proc_map_full", l.proc_map_full_events),
            ("ringbuf_drop", l.ringbuf_drops),
            ("thread_map_full", l.thread_map_full),
            ("txn_map_full", l.txn_map_full),
            ("scenario_map_full", l.scenario_map_full),
            ("request_histogram_full", l.request_histogram_full),
            ("profile_samples_lost", l.profile_samples_lost),
            ("profile_stacks_lost", l.profile_stacks_lost),
        ] {
            *s.lost_events.entry(kind).or_default() += n;
        }
        for (kind, ns) in [
            ("proc_map_full", l.proc_map_full_cpu_ns),
            ("late", l.late_cpu_ns),
        ] {
            *s.lost_cpu_ns.entry(kind).or_default() += ns;
        }

        let no_cgroup = Text::from("");
        let unassigned = Text::from(agent_common::UNASSIGNED);
        for p in &report.processes {
            let delta = Totals {
                cpu_ns: p.cpu_ns,
                energy_j: finite(p.energy_j),
                idle_share_j: finite(p.idle_share_j),
                carbon_g: finite(p.carbon_g),
                embodied_g: finite(p.embodied_g),
            };
            let pair = (
                p.service.clone().unwrap_or_else(|| unassigned.clone()),
                p.scenario.clone().unwrap_or_else(|| unassigned.clone()),
            );
            let pair = if s.services.contains_key(&pair)
                || s.services.len() + 1 < self.max_service_series
            {
                pair
            } else {
                s.services_folded += 1;
                (Text::from(OTHER_SERVICE), Text::from(OTHER_SERVICE))
            };
            s.services.entry(pair).or_default().add(&delta);
            let cgroup = p.cgroup.clone().unwrap_or_else(|| no_cgroup.clone());
            let key = (p.pid, p.comm.clone());
            if let Some(series) = s.processes.get_mut(&key) {
                series.totals.add(&delta);
                series.last_window = window;
                if p.exited {
                    if let Some(series) = s.processes.remove(&key) {
                        fold(
                            &mut s.comms,
                            self.max_comm_series,
                            key.1,
                            series.cgroup,
                            &series.totals,
                        );
                    }
                }
            } else if !p.exited && s.processes.len() < self.max_process_series {
                s.processes.insert(
                    key,
                    ProcessSeries {
                        cgroup,
                        totals: delta,
                        last_window: window,
                    },
                );
            } else {
                fold(&mut s.comms, self.max_comm_series, key.1, cgroup, &delta);
            }
        }
        let stale: Vec<(u32, Text)> = s
            .processes
            .iter()
            .filter(|(_, series)| series.last_window + STALE_WINDOWS <= window)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(series) = s.processes.remove(&key) {
                fold(
                    &mut s.comms,
                    self.max_comm_series,
                    key.1,
                    series.cgroup,
                    &series.totals,
                );
            }
        }
    }

    /// Number of process-level label sets currently exposed (pid series + comm series).
    pub fn process_series_count(&self) -> usize {
        let s = self.lock();
        s.processes.len() + s.comms.len()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut out: Vec<Family> = Vec::new();
        for (name, help, value) in [
            (
                "sci_host_energy_joules_total",
                "Host energy (packages + dram, or psys, or model).",
                s.host_energy_j,
            ),
            (
                "sci_host_idle_energy_joules_total",
                "Part of the host energy that is idle baseline.",
                s.host_idle_energy_j,
            ),
            (
                "sci_host_unattributed_energy_joules_total",
                "Dynamic energy no process could be charged with.",
                s.host_unattributed_energy_j,
            ),
            (
                "sci_host_carbon_grams_total",
                "Operational carbon of the host, gCO2e (E x I x PUE).",
                s.host_carbon_g,
            ),
            (
                "sci_host_embodied_grams_total",
                "Embodied carbon of the host apportioned to the time measured, gCO2e.",
                s.host_embodied_g,
            ),
            ("sci_windows_total", "Windows observed.", s.windows as f64),
            (
                "sci_conservation_violations_total",
                "Windows whose attribution did not add up to the host energy.",
                s.conservation_violations as f64,
            ),
            (
                "sci_energy_warnings_total",
                "Energy domains left out of a window (unreadable or rejected).",
                s.energy_warnings as f64,
            ),
            (
                "sci_agent_unmeasured_seconds_total",
                "Seconds between the previous run's last window and this run's first (the agent was not running).",
                s.unmeasured_s,
            ),
            (
                "sci_business_units_total",
                "R: completed transactions weighted by the scenario weights.",
                s.business_units,
            ),
        ] {
            out.push(Family::counter(name, help).single(value));
        }
        let scenario_series: [ScenarioSeries; 5] = [
            (
                "sci_scenario_transactions_total",
                "Completed transactions (TA) per business scenario.",
                |t| t.transactions as f64,
            ),
            (
                "sci_scenario_cpu_seconds_total",
                "CPU time spent serving each business scenario.",
                |t| t.cpu_ns as f64 / 1e9,
            ),
            (
                "sci_scenario_energy_joules_total",
                "Energy attributed to each business scenario.",
                |t| t.energy_j,
            ),
            (
                "sci_scenario_carbon_grams_total",
                "Operational carbon attributed to each business scenario, gCO2e.",
                |t| t.carbon_g,
            ),
            (
                "sci_scenario_embodied_grams_total",
                "Embodied carbon attributed to each business scenario, gCO2e.",
                |t| t.embodied_g,
            ),
        ];
        for (name, help, value) in scenario_series {
            let mut family = Family::counter(name, help);
            for (scenario, totals) in &s.scenarios {
                family.push(&[("scenario", scenario)], value(totals));
            }
            out.push(family);
        }
        let mut weights = Family::gauge(
            "sci_scenario_weight",
            "Weight alpha of each scenario in R (disclosed as SCI requires).",
        );
        for (scenario, totals) in &s.scenarios {
            weights.push(&[("scenario", scenario)], totals.weight);
        }
        out.push(weights);
        out.push(
            Family::counter(
                "sci_host_cpu_seconds_total",
                "CPU time of the host summed over CPUs.",
            )
            .with(&[("mode", "busy")], s.busy_cpu_ns as f64 / 1e9)
            .with(&[("mode", "idle")], s.idle_cpu_ns as f64 / 1e9),
        );
        out.push(
            Family::gauge(
                "sci_carbon_intensity_g_per_kwh",
                "Grid carbon intensity used in the last window.",
            )
            .single(s.intensity_g_per_kwh),
        );
        out.push(
            Family::gauge(
                "sci_pue",
                "Power usage effectiveness used in the last window.",
            )
            .single(s.pue),
        );
        let mut energy_source = Family::gauge("sci_energy_source_info", "Energy source in use.");
        if let Some((source, estimated)) = &s.energy_source {
            energy_source.push(
                &[("source", source), ("estimated", &estimated.to_string())],
                1.0,
            );
        }
        out.push(energy_source);
        let mut cpu_source = Family::gauge("sci_cpu_source_info", "CPU accounting source in use.");
        if let Some(source) = &s.cpu_source {
            cpu_source.push(&[("source", source)], 1.0);
        }
        out.push(cpu_source);
        let mut energy_faults = Family::counter(
            "sci_energy_faults_total",
            "What an energy source could not measure, per source and fault (failed, stuck, timeout, stale, ...).",
        );
        for ((source, fault), n) in &s.energy_faults {
            energy_faults.push(&[("source", source), ("fault", fault)], *n as f64);
        }
        out.push(energy_faults);
        if let Some(node) = &s.node_labels {
            out.extend(node_label_families(node));
        }
        let mut lost_events = Family::counter(
            "sci_lost_events_total",
            "Events the CPU accounting could not record.",
        );
        for (kind, n) in &s.lost_events {
            lost_events.push(&[("kind", kind)], *n as f64);
        }
        out.push(lost_events);
        let mut refused = Family::counter(
            "sci_transactions_refused_total",
            "Transaction reports the ingest endpoint refused (lines, datagrams, scrapes), per reason.",
        );
        for (reason, n) in &s.ingest_refused {
            refused.push(&[("reason", reason)], *n as f64);
        }
        out.push(refused);
        let mut lost_cpu = Family::counter(
            "sci_lost_cpu_seconds_total",
            "CPU time charged to no process (map full) or late.",
        );
        for (kind, ns) in &s.lost_cpu_ns {
            lost_cpu.push(&[("kind", kind)], *ns as f64 / 1e9);
        }
        out.push(lost_cpu);

        let mut series: Vec<(Labels, &Totals)> = Vec::new();
        let mut pids: Vec<_> = s.processes.iter().collect();
        pids.sort_by(|a, b| a.0.cmp(b.0));
        for ((pid, comm), p) in pids {
            series.push((process_labels(Some(*pid), comm, &p.cgroup), &p.totals));
        }
        for ((comm, cgroup), totals) in &s.comms {
            series.push((process_labels(None, comm, cgroup), totals));
        }
        let families: [(&str, &str, TotalsField); 5] = [
            (
                "sci_process_energy_joules_total",
                "Dynamic energy attributed to the process.",
                |t| t.energy_j,
            ),
            (
                "sci_process_idle_energy_joules_total",
                "The process's share of idle energy (by busy CPU time).",
                |t| t.idle_share_j,
            ),
            (
                "sci_process_carbon_grams_total",
                "Operational carbon of the process (dynamic + idle share), gCO2e.",
                |t| t.carbon_g,
            ),
            (
                "sci_process_embodied_grams_total",
                "Embodied carbon apportioned to the process, gCO2e.",
                |t| t.embodied_g,
            ),
            (
                "sci_process_cpu_seconds_total",
                "CPU time of the process.",
                |t| t.cpu_ns as f64 / 1e9,
            ),
        ];
        for (name, help, get) in families {
            let mut family = Family::counter(
                name,
                &format!("{help} Exited processes are folded into comm-level series."),
            );
            family.series = series
                .iter()
                .map(|(labels, totals)| (labels.clone(), get(totals)))
                .collect();
            out.push(family);
            let name = name.replacen("sci_process_", "sci_service_", 1);
            let mut family = Family::counter(
                &name,
                &format!(
                    "{} Per service and scenario of the process rules; beyond the series limit, _other.",
                    help.replace("The process's", "Its processes'")
                        .replace("the process", "the service's processes")
                ),
            );
            for ((service, scenario), totals) in &s.services {
                family.push(
                    &[("service", &**service), ("scenario", &**scenario)],
                    get(totals),
                );
            }
            out.push(family);
        }
        let mut folded = Family::counter(
            "sci_service_series_folded_total",
            "Process records added to the _other service series because the (service, scenario) series limit was reached.",
        );
        folded.push(&[], s.services_folded as f64);
        out.push(folded);
        drop(s);
        self.delivery_families(&mut out);
        if let Some(otlp) = &*self.otlp.lock().unwrap_or_else(|p| p.into_inner()) {
            otlp.families(&mut out);
        }
        prometheus_text::render(out)
    }
}

/// Reads one figure out of a series' totals.
type TotalsField = fn(&Totals) -> f64;

fn fold(
    comms: &mut BTreeMap<(Text, Text), Totals>,
    max: usize,
    comm: Text,
    cgroup: Text,
    totals: &Totals,
) {
    let key = (comm, cgroup);
    let key = if comms.contains_key(&key) || comms.len() + 1 < max {
        key
    } else {
        (Text::from(OTHER_COMM), Text::from(""))
    };
    comms.entry(key).or_default().add(totals);
}

fn node_label_families(node: &crate::sources::node_labels::NodeLabelsStatus) -> Vec<Family> {
    let mut faults = Family::counter(
        "sci_agent_node_label_faults_total",
        "Failed reads of the node's labels from the Kubernetes API server, per fault (the last good labels are kept).",
    );
    for (fault, n) in &node.faults {
        faults.push(&[("fault", fault)], *n as f64);
    }
    let mut dropped = Family::counter(
        "sci_agent_node_labels_dropped_total",
        "Node labels the allow-list admitted but not kept, per reason (invalid, too_many, merge_full).",
    );
    for (reason, n) in &node.dropped {
        dropped.push(&[("reason", reason)], *n as f64);
    }
    let mut reads = Family::counter(
        "sci_agent_node_label_reads_total",
        "Good reads of the node's labels from the Kubernetes API server.",
    );
    reads.push(&[], node.reads as f64);
    let mut kept = Family::gauge(
        "sci_agent_node_labels",
        "Node labels in use (the last good read's).",
    );
    kept.push(&[], node.labels.len() as f64);
    let mut read_at = Family::gauge(
        "sci_agent_node_labels_read_seconds",
        "Unix time of the last good read of the node's labels (0: none yet).",
    );
    read_at.push(&[], node.read_unix_s.unwrap_or(0) as f64);
    vec![faults, dropped, reads, kept, read_at]
}

fn process_labels(pid: Option<u32>, comm: &str, cgroup: &str) -> Labels {
    let mut labels = Labels::new();
    if let Some(pid) = pid {
        labels.push(("pid".into(), pid.to_string()));
    }
    labels.push(("comm".into(), comm.into()));
    if !cgroup.is_empty() {
        labels.push(("cgroup".into(), cgroup.into()));
    }
    labels
}

/// Connections served at once; further ones are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A connection that has not sent a complete request head in this time is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint's routes: `GET /metrics` (Prometheus text) and `GET /healthz`.
pub fn metrics_router(registry: Arc<MetricsRegistry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(health_page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "see /metrics\n") })
        .with_state(registry)
}

async fn metrics_page(Shared(registry): Shared<Arc<MetricsRegistry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        registry.render(),
    )
}

async fn health_page(Shared(registry): Shared<Arc<MetricsRegistry>>) -> impl IntoResponse {
    match registry.health() {
        Ok(text) => (StatusCode::OK, text),
        Err(text) => (StatusCode::SERVICE_UNAVAILABLE, text),
    }
}

/// Serve `GET /metrics` on `addr` until the task is dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<MetricsRegistry>,
) -> Result<(), AgentError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::io(format!("metrics endpoint: binding {addr}"), e))?;
    serve_metrics_on(listener, registry).await
}

/// Serve `GET /metrics` on an already bound listener (tests bind port 0).
///
/// HTTP/1.1 by hyper, routes by axum. At most [`MAX_CONNECTIONS`] at once (a
/// further one is closed at once), and a connection that sends no complete
/// request head within [`HEADER_READ_TIMEOUT`] is closed, so idle clients
/// cannot hold the endpoint.
pub async fn serve_metrics_on(
    listener: TcpListener,
    registry: Arc<MetricsRegistry>,
) -> Result<(), AgentError> {
    let router = metrics_router(registry);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(
                "metrics endpoint: {MAX_CONNECTIONS} connections open, closing a new one"
            );
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("metrics connection: {e}");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::sinks::spool::DeliveryStats;

    #[test]
    fn health_says_when_delivery_is_behind_and_losses_are_exported() {
        let registry = MetricsRegistry::new();
        assert!(registry.health().is_ok(), "no spool: healthy");
        let stats = Arc::new(DeliveryStats::default());
        registry.set_delivery(Arc::clone(&stats), Duration::from_secs(60));
        assert!(registry.health().is_ok(), "nothing pending");
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        stats.pending_windows.store(7, Ordering::Relaxed);
        stats
            .oldest_pending_end_ns
            .store(now_ns - 10_000_000_000, Ordering::Relaxed);
        assert!(registry.health().is_ok(), "10 s behind is within 60 s");
        stats
            .oldest_pending_end_ns
            .store(now_ns - 125_000_000_000, Ordering::Relaxed);
        let behind = registry.health().unwrap_err();
        assert!(
            behind.contains("delivery behind: 7 windows") && behind.contains("125 s ago"),
            "{behind}"
        );
        stats.dropped_write_failed.store(3, Ordering::Relaxed);
        stats.trimmed_stacks.store(11, Ordering::Relaxed);
        let text = registry.render();
        assert!(
            text.contains("sci_agent_windows_lost_total{reason=\"dropped_write_failed\"} 3"),
            "{text}"
        );
        assert!(text.contains("sci_agent_profile_stacks_trimmed_total 11"));
        assert!(text.contains("sci_agent_spool_windows 7"));
    }

    #[test]
    fn health_says_when_delivery_is_stuck_on_a_clock() {
        let registry = MetricsRegistry::new();
        let stats = Arc::new(crate::sinks::spool::DeliveryStats::default());
        registry.set_delivery(Arc::clone(&stats), Duration::from_secs(60));
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(registry.health().is_ok());
        // A clock a day ahead: every window held, none old by this clock.
        stats.pending_windows.store(4, Ordering::Relaxed);
        stats.held_windows.store(4, Ordering::Relaxed);
        let stuck = registry.health().unwrap_err();
        assert!(
            stuck.contains("delivery stuck: 4 windows refused as ahead"),
            "{stuck}"
        );
        // A clock behind: windows quarantined as misdated, within behind_after.
        stats.held_windows.store(0, Ordering::Relaxed);
        stats.pending_windows.store(0, Ordering::Relaxed);
        stats.clock_behind.store(2, Ordering::Relaxed);
        stats
            .last_clock_refusal_unix_s
            .store(now_s - 5, Ordering::Relaxed);
        let stuck = registry.health().unwrap_err();
        assert!(stuck.contains("2 quarantined as misdated"), "{stuck}");
        stats
            .last_clock_refusal_unix_s
            .store(now_s - 600, Ordering::Relaxed);
        assert!(registry.health().is_ok(), "an old refusal is forgotten");
    }
}

#[cfg(test)]
mod refused_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refused_transaction_reports_are_counted_by_reason_across_windows() {
        let registry = MetricsRegistry::new();
        for n in [2u64, 3] {
            let mut report = WindowReport::new(
                "h".into(),
                "i".into(),
                0,
                1_000_000_000,
                crate::window::CpuSource::Ebpf,
                1,
            );
            report.ingest_refused.insert("unknown_scenario".into(), n);
            report.ingest_refused.insert("negative".into(), 1);
            registry.observe(&report);
        }
        let text = registry.render();
        assert!(
            text.contains("sci_transactions_refused_total{reason=\"unknown_scenario\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("sci_transactions_refused_total{reason=\"negative\"} 2"),
            "{text}"
        );
    }
}
