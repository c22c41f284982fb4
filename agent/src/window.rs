//! The window document: everything the agent measured in one interval.
//!
//! `sci-agent sample --json` prints exactly one of these; `sci-agent run`
//! spools each one and streams it to the aggregator. Each pipeline stage
//! fills its own fields: the sched source the CPU figures, the energy
//! sources and attribution the joules, the carbon transform grams, the
//! scenario transform the business figures. Units are in the field names.
//!
//! This is the one schema of the window: `crate::wire` is its one
//! conversion to and from `sci.v1.WindowReport` (tested field by field), and
//! [`WindowReport::absorb`] its one arithmetic (adding two windows' figures),
//! which the spool's merge uses.
use std::collections::{BTreeMap, HashMap};

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
    /// CPU profile samples the kernel could not count (count map full).
    #[serde(default)]
    pub profile_samples_lost: u64,
    /// Profile stacks whose frames could not be kept (stack map full or
    /// bucket taken): their samples show as `[unknown]`.
    #[serde(default)]
    pub profile_stacks_lost: u64,
    /// CPU time charged to processes that had already exited and whose
    /// record was closed (charged in the window after their exit).
    pub late_cpu_ns: u64,
}

/// Text a process's description shares with every window it appears in:
/// cloning it is a reference count, not a copy (a window of 5,000 processes
/// would otherwise copy 25,000 strings it already holds).
pub type Text = std::sync::Arc<str>;

/// One process (thread group) in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// 0 when the process vanished before its parent could be read.
    pub ppid: u32,
    pub comm: Text,
    pub exe: Option<Text>,
    pub cmdline: Option<Text>,
    /// cgroup v2 path (`/system.slice/foo.service`), when known.
    pub cgroup: Option<Text>,
    pub container_id: Option<Text>,
    /// CPU time spent in this window, all threads, all CPUs.
    pub cpu_ns: u64,
    /// The process exited during this window.
    pub exited: bool,
    /// Scenario given by the first matching rule (null when none).
    pub scenario: Option<Text>,
    /// Service name given by the matching rule.
    pub service: Option<Text>,
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

/// What the host is, as a resource supply (standard 7.4): hardware read
/// once at start ([`crate::sources::host`]) and the operator's labels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceSupply {
    /// `/proc/cpuinfo` "model name" (empty when unknown).
    pub cpu_model: String,
    /// `/proc/cpuinfo` "vendor_id", e.g. GenuineIntel, AuthenticAMD.
    pub cpu_vendor: String,
    /// The kernel's machine name, e.g. x86_64.
    pub arch: String,
    pub logical_cpus: u32,
    /// MemTotal of `/proc/meminfo`.
    pub memory_bytes: u64,
    /// `bare_metal`, `vm`, or empty when unknown.
    pub machine_kind: String,
    /// Logical CPUs of the physical machine (0 when not known).
    pub physical_host_cpus: u32,
    /// Operator labels (`[host] labels`, `labels_file`).
    pub labels: BTreeMap<String, String>,
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

/// A random id for this agent run: (host, agent_instance, seq) names a window uniquely.
pub fn new_agent_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
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
    /// What the energy sources could not measure in this window, per
    /// `<source>/<fault>` (`sci_energy_faults_total`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub energy_faults: std::collections::BTreeMap<String, u64>,
    /// Longest gap between two readings the window's energy integrates
    /// (power samples of a BMC, or the counter reads at the window's ends).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub energy_sample_interval_ns: u64,
    pub processes: Vec<ProcessRecord>,
    /// Folded CPU stacks with their energy (empty when profiling is off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileStack>,
    /// Profile stacks left out so the window fits the batch limit (lowest
    /// energy first), and their energy: a trim is never silent.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub profile_stacks_trimmed: u64,
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub profile_trimmed_energy_j: f64,
    /// Per-request CPU time of marker-bracketed requests, per scenario and service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_cpu: Vec<RequestCpuHistogram>,
    /// How many measured windows this one stands for (more than 1 after the
    /// spool merged old windows to stay within its bound).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub merged_windows: u32,
    /// What the window ran on (the host's resource supply).
    #[serde(default)]
    pub supply: ResourceSupply,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

/// The distribution of per-request CPU time of one scenario in one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestCpuHistogram {
    pub scenario: String,
    pub service: String,
    /// counts[i]: requests whose CPU time falls in bucket i of the
    /// log-linear layout with `sub_bucket_bits` (`agent_common::request_cpu`).
    pub counts: Vec<u64>,
    /// Exact sum of those requests' CPU time.
    pub sum_cpu_ns: u64,
    /// Joules per CPU-ns of this service's time in this scenario in the window.
    pub energy_j_per_cpu_ns: f64,
    /// Layout of `counts`: 2^sub_bucket_bits buckets per power of two (0:
    /// log2, windows spooled by agents before issue 24).
    #[serde(default)]
    pub sub_bucket_bits: u32,
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
            energy_faults: Default::default(),
            energy_sample_interval_ns: 0,
            processes: Vec::new(),
            profile: Vec::new(),
            profile_stacks_trimmed: 0,
            profile_trimmed_energy_j: 0.0,
            request_cpu: Vec::new(),
            merged_windows: 1,
            supply: ResourceSupply::default(),
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    /// Window arithmetic: this window becomes one coarser window standing for
    /// `earlier` then itself (it keeps its own identity, seq and factors).
    /// Host figures, losses and business figures add up; domains, scenario
    /// lines and profile stacks add up by name; processes add up by (comm,
    /// service, scenario) without pid, exe or threads, which no longer name
    /// one process.
    pub fn absorb(&mut self, earlier: &WindowReport) {
        let (a, b) = (earlier, &*self);
        let mut m = b.clone();
        m.start_unix_ns = a.start_unix_ns.min(b.start_unix_ns);
        m.end_unix_ns = a.end_unix_ns.max(b.end_unix_ns);
        m.idle_cpu_ns = a.idle_cpu_ns + b.idle_cpu_ns;
        m.busy_cpu_ns = a.busy_cpu_ns + b.busy_cpu_ns;
        m.steal_cpu_ns = a.steal_cpu_ns + b.steal_cpu_ns;
        m.unattributed_cpu_ns = a.unattributed_cpu_ns + b.unattributed_cpu_ns;
        m.host_energy_j = a.host_energy_j + b.host_energy_j;
        m.idle_energy_j = a.idle_energy_j + b.idle_energy_j;
        m.unattributed_energy_j = a.unattributed_energy_j + b.unattributed_energy_j;
        m.host_carbon_g = a.host_carbon_g + b.host_carbon_g;
        // The intensity that makes the merged carbon: energy-weighted, so
        // carbon = energy x intensity x PUE still holds (the aggregator
        // refuses a window where it does not). PUE is the later window's.
        if m.host_energy_j > 0.0 && m.pue > 0.0 {
            m.carbon_intensity_g_per_kwh = m.host_carbon_g / (m.host_energy_j / 3.6e6 * m.pue);
        }
        m.host_embodied_g = a.host_embodied_g + b.host_embodied_g;
        m.business_units = a.business_units + b.business_units;
        m.estimated = a.estimated || b.estimated;
        m.conservation_violations = a.conservation_violations.max(b.conservation_violations);
        m.merged_windows = a.merged_windows.max(1) + b.merged_windows.max(1);
        m.lost = a.lost.plus(&b.lost);
        m.profile_stacks_trimmed = a.profile_stacks_trimmed + b.profile_stacks_trimmed;
        m.profile_trimmed_energy_j = a.profile_trimmed_energy_j + b.profile_trimmed_energy_j;
        for (reason, n) in &a.ingest_refused {
            *m.ingest_refused.entry(reason.clone()).or_default() += n;
        }
        for (fault, n) in &a.energy_faults {
            *m.energy_faults.entry(fault.clone()).or_default() += n;
        }
        m.energy_sample_interval_ns = a.energy_sample_interval_ns.max(b.energy_sample_interval_ns);

        let mut domains: BTreeMap<&str, f64> = BTreeMap::new();
        for d in a.domains.iter().chain(&b.domains) {
            *domains.entry(&d.domain).or_default() += d.energy_j;
        }
        m.domains = domains
            .into_iter()
            .map(|(domain, energy_j)| DomainEnergy {
                domain: domain.to_string(),
                energy_j,
            })
            .collect();

        let mut scenarios: BTreeMap<&str, ScenarioRecord> = BTreeMap::new();
        for s in a.scenarios.iter().chain(&b.scenarios) {
            let e = scenarios
                .entry(&s.scenario)
                .or_insert_with(|| ScenarioRecord {
                    scenario: s.scenario.clone(),
                    weight: s.weight,
                    ..Default::default()
                });
            e.transactions += s.transactions;
            e.cpu_ns += s.cpu_ns;
            e.energy_j += s.energy_j;
            e.carbon_g += s.carbon_g;
            e.embodied_g += s.embodied_g;
        }
        m.scenarios = scenarios.into_values().collect();

        type ProcessKey<'a> = (&'a str, Option<&'a str>, Option<&'a str>);
        let mut processes: HashMap<ProcessKey, ProcessRecord> = HashMap::new();
        for p in a.processes.iter().chain(&b.processes) {
            let key = (&*p.comm, p.service.as_deref(), p.scenario.as_deref());
            let e = processes.entry(key).or_insert_with(|| ProcessRecord {
                comm: p.comm.clone(),
                service: p.service.clone(),
                scenario: p.scenario.clone(),
                cgroup: p.cgroup.clone(),
                ..Default::default()
            });
            e.cpu_ns += p.cpu_ns;
            e.energy_j += p.energy_j;
            e.idle_share_j += p.idle_share_j;
            e.carbon_g += p.carbon_g;
            e.embodied_g += p.embodied_g;
        }
        let mut processes: Vec<ProcessRecord> = processes.into_values().collect();
        processes.sort_by(|x, y| (&x.comm, &x.service).cmp(&(&y.comm, &y.service)));
        m.processes = processes;

        type StackKey<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str);
        let mut stacks: BTreeMap<StackKey, ProfileStack> = BTreeMap::new();
        for s in a.profile.iter().chain(&b.profile) {
            let key = (
                s.comm.as_str(),
                s.service.as_deref(),
                s.scenario.as_deref(),
                s.stack.as_str(),
            );
            let e = stacks.entry(key).or_insert_with(|| ProfileStack {
                samples: 0,
                energy_j: 0.0,
                ..s.clone()
            });
            e.samples += s.samples;
            e.energy_j += s.energy_j;
        }
        m.profile = stacks.into_values().collect();

        // Histograms of different layouts (a window spooled by an older
        // agent) stay apart: the aggregator converts the coarser one.
        let mut requests: BTreeMap<(&str, &str, u32), RequestCpuHistogram> = BTreeMap::new();
        for h in a.request_cpu.iter().chain(&b.request_cpu) {
            let e = requests
                .entry((&h.scenario, &h.service, h.sub_bucket_bits))
                .or_insert_with(|| RequestCpuHistogram {
                    scenario: h.scenario.clone(),
                    service: h.service.clone(),
                    sub_bucket_bits: h.sub_bucket_bits,
                    ..Default::default()
                });
            // Joules per CPU-ns of the two, weighted by their CPU time.
            let cpu_ns = e.sum_cpu_ns + h.sum_cpu_ns;
            if cpu_ns > 0 {
                e.energy_j_per_cpu_ns = (e.energy_j_per_cpu_ns * e.sum_cpu_ns as f64
                    + h.energy_j_per_cpu_ns * h.sum_cpu_ns as f64)
                    / cpu_ns as f64;
            }
            e.sum_cpu_ns = cpu_ns;
            if e.counts.len() < h.counts.len() {
                e.counts.resize(h.counts.len(), 0);
            }
            for (sum, n) in e.counts.iter_mut().zip(&h.counts) {
                *sum += n;
            }
        }
        m.request_cpu = requests.into_values().collect();
        *self = m;
    }
}

impl LossCounters {
    /// Both windows' losses.
    pub fn plus(&self, other: &LossCounters) -> LossCounters {
        LossCounters {
            proc_map_full_events: self.proc_map_full_events + other.proc_map_full_events,
            proc_map_full_cpu_ns: self.proc_map_full_cpu_ns + other.proc_map_full_cpu_ns,
            ringbuf_drops: self.ringbuf_drops + other.ringbuf_drops,
            thread_map_full: self.thread_map_full + other.thread_map_full,
            txn_map_full: self.txn_map_full + other.txn_map_full,
            scenario_map_full: self.scenario_map_full + other.scenario_map_full,
            late_cpu_ns: self.late_cpu_ns + other.late_cpu_ns,
            request_histogram_full: self.request_histogram_full + other.request_histogram_full,
            profile_samples_lost: self.profile_samples_lost + other.profile_samples_lost,
            profile_stacks_lost: self.profile_stacks_lost + other.profile_stacks_lost,
        }
    }
}
