//! The window document: everything the agent measured in one interval.
//!
//! `sci-agent sample --json` prints exactly one of these; `sci-agent run`
//! spools each one and streams it to the aggregator. Each pipeline stage
//! fills its own fields: the sched source the CPU figures, the energy
//! sources and attribution the joules, the carbon transform grams, the
//! scenario transform the business figures. Units are in the field names.
use serde::{Deserialize, Serialize};

/// Where per-process CPU time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuSource {
    /// sched_switch accounting in the kernel (exact, catches short-lived processes).
    Ebpf,
    /// Polling `/proc/<pid>/stat` (misses processes that live between two polls).
    Procfs,
}

impl CpuSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuSource::Ebpf => "ebpf",
            CpuSource::Procfs => "procfs",
        }
    }
}

/// What the kernel side (or the poller) could not record in this window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossCounters {
    /// sched_switch events whose process could not be inserted (map full).
    pub proc_map_full_events: u64,
    /// CPU time of those events: busy, but charged to no process.
    pub proc_map_full_cpu_ns: u64,
    /// Process lifecycle events dropped because the ring buffer was full.
    pub ringbuf_drops: u64,
    /// Thread-map, transaction-map or scenario-map insert failures.
    pub thread_map_full: u64,
    pub txn_map_full: u64,
    pub scenario_map_full: u64,
    /// Completed requests left out of the per-request CPU histograms (map full).
    #[serde(default)]
    pub request_histogram_full: u64,
    /// CPU time charged to processes that had already exited and whose
    /// record was closed (charged in the window after their exit).
    pub late_cpu_ns: u64,
}

/// One process (thread group) in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// 0 when the process vanished before its parent could be read.
    pub ppid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// cgroup v2 path (`/system.slice/foo.service`), when known.
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    /// CPU time spent in this window, all threads, all CPUs.
    pub cpu_ns: u64,
    /// The process exited during this window.
    pub exited: bool,
    /// Scenario given by the first matching rule (null when none).
    pub scenario: Option<String>,
    /// Service name given by the matching rule.
    pub service: Option<String>,
    /// CPU time per thread in this window (only with `per_thread = true`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadRecord>,
    pub energy_j: f64,
    /// This process's share of the host's idle energy (by CPU share).
    pub idle_share_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// One thread of a process in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub tid: u32,
    pub cpu_ns: u64,
}

/// Business figures of one scenario in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRecord {
    /// `credit`, `drawdown`, `repayment`, `query`, or `unassigned`.
    pub scenario: String,
    /// alpha_i used (0 for `unassigned`).
    pub weight: f64,
    /// Completed transactions TA_i in the window.
    pub transactions: u64,
    pub cpu_ns: u64,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// One folded stack of the CPU profile in this window: `frame;frame;frame`
/// (root first), how many samples hit it, and the energy those samples stand
/// for (samples x sampling period x the process's joules per CPU-ns).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileStack {
    pub pid: u32,
    pub comm: String,
    /// Service of the process (from the scenario rules), when known.
    pub service: Option<String>,
    /// Scenario the sampled thread was serving (marker) or its process's rule scenario.
    pub scenario: Option<String>,
    pub stack: String,
    pub samples: u64,
    pub energy_j: f64,
}

/// Energy of one RAPL domain (or model domain) in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainEnergy {
    /// e.g. `package-0`, `package-0/dram`, `psys`, `model`.
    pub domain: String,
    pub energy_j: f64,
}

/// Embodied carbon factors of the host: M = TE x TiR/EL x RR/ToR.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbodiedFactors {
    /// TE: total embodied emissions of the physical machine.
    pub total_embodied_g: f64,
    /// EL: expected lifespan.
    pub lifespan_s: f64,
    /// RR/ToR: share of the physical machine this host reserves (1 for bare metal).
    pub resource_share: f64,
    /// How the share was chosen (`config`, or the VM default and its source).
    pub share_source: String,
}

/// The whole window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowReport {
    pub host: String,
    /// Random id of this agent run (boot), so (host, agent_instance, seq) is unique.
    pub agent_instance: String,
    pub seq: u64,
    /// Data centre / region label from config (for fleet breakdowns).
    pub datacenter: Option<String>,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub cpu_source: CpuSource,
    pub cpus: u32,
    /// Idle time summed over all CPUs.
    pub idle_cpu_ns: u64,
    /// Busy time summed over all CPUs (all processes plus time lost to a full map).
    pub busy_cpu_ns: u64,
    pub lost: LossCounters,

    pub energy_source: String,
    pub estimated: bool,
    pub host_energy_j: f64,
    pub idle_energy_j: f64,
    pub unattributed_energy_j: f64,
    /// `config` or `learned`: where the idle baseline came from.
    pub idle_baseline_source: String,
    pub domains: Vec<DomainEnergy>,
    pub carbon_intensity_g_per_kwh: f64,
    pub pue: f64,
    pub host_carbon_g: f64,
    pub host_embodied_g: f64,
    /// Number of attribution-invariant violations seen since the agent started.
    pub conservation_violations: u64,
    /// Time the hypervisor gave other guests while this host's CPUs wanted
    /// to run (`/proc/stat` steal), summed over CPUs; neither busy nor idle.
    #[serde(default)]
    pub steal_cpu_ns: u64,
    /// Busy CPU time that no process record explains (the procfs poller's
    /// blind spot); its energy is in `unattributed_energy_j`.
    #[serde(default)]
    pub unattributed_cpu_ns: u64,
    /// Where `carbon_intensity_g_per_kwh` came from.
    #[serde(default)]
    pub intensity_source: String,
    /// The power model when `estimated` (name and parameters); empty when measured.
    #[serde(default)]
    pub energy_model: String,
    /// The factors of `host_embodied_g`.
    #[serde(default)]
    pub embodied: EmbodiedFactors,

    /// Weights alpha_i used for `business_units` (disclosed as SCI requires).
    pub weights: std::collections::BTreeMap<String, f64>,
    pub scenarios: Vec<ScenarioRecord>,
    /// R of the window: sum of alpha_i * TA_i.
    pub business_units: f64,
    /// Transaction reports the ingest endpoint refused in this window, per reason.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ingest_refused: std::collections::BTreeMap<String, u64>,
    pub processes: Vec<ProcessRecord>,
    /// Folded CPU stacks with their energy (empty when profiling is off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileStack>,
    /// Per-request CPU time of marker-bracketed requests, per (service, scenario).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_cpu: Vec<RequestCpuHistogram>,
}

/// The requests of one scenario in one service completed in the window, in
/// log2 buckets of their CPU time (the bucket rule of `agent_common::request_cpu_bucket`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestCpuHistogram {
    pub scenario: String,
    /// Empty when no rule names the process's service.
    pub service: String,
    /// counts[i]: requests whose CPU ns t has i significant bits (2^(i-1) <= t < 2^i).
    pub counts: Vec<u64>,
    pub sum_cpu_ns: u64,
    /// Joules per CPU-ns of this service's time in this scenario in the window.
    pub energy_j_per_cpu_ns: f64,
}

impl WindowReport {
    /// An empty window over `[start_unix_ns, end_unix_ns)`; the stages fill the rest.
    pub fn new(
        host: String,
        agent_instance: String,
        start_unix_ns: u64,
        end_unix_ns: u64,
        cpu_source: CpuSource,
        cpus: u32,
    ) -> Self {
        WindowReport {
            host,
            agent_instance,
            seq: 0,
            datacenter: None,
            start_unix_ns,
            end_unix_ns,
            cpu_source,
            cpus,
            idle_cpu_ns: 0,
            busy_cpu_ns: 0,
            lost: LossCounters::default(),
            energy_source: String::new(),
            estimated: false,
            host_energy_j: 0.0,
            idle_energy_j: 0.0,
            unattributed_energy_j: 0.0,
            idle_baseline_source: String::new(),
            domains: Vec::new(),
            carbon_intensity_g_per_kwh: 0.0,
            pue: 1.0,
            host_carbon_g: 0.0,
            host_embodied_g: 0.0,
            conservation_violations: 0,
            steal_cpu_ns: 0,
            unattributed_cpu_ns: 0,
            intensity_source: String::new(),
            energy_model: String::new(),
            embodied: EmbodiedFactors::default(),
            weights: Default::default(),
            scenarios: Vec::new(),
            business_units: 0.0,
            ingest_refused: Default::default(),
            processes: Vec::new(),
            profile: Vec::new(),
            request_cpu: Vec::new(),
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }
}
