//! Business scenarios: which process serves which scenario, and the window's
//! business figures (T/CQJR 032.2 formula (2): R = sum of alpha_i * TA_i).
//!
//! Two sources decide where a process's CPU time (and so its energy and
//! carbon) goes:
//! - the marker library (`sci-marker`): the eBPF uprobes on
//!   `sci_scenario_begin`/`sci_scenario_end` split each process's time into
//!   slots 1..4 (`scenario_cpu_ns`) and count completed transactions;
//! - the `[[scenarios.rules]]` of agent.toml, first match wins, which name the
//!   service of a process and the scenario its unmarked time (slot 0) serves.
//!
//! Time no marker claimed in a process no rule matched is `unassigned`: it
//! still counts in the host total, so the scenario lines always sum to the
//! processes' energy. Rules are compiled once; a process's assignment is cached
//! under (pid, start_ticks) so a reused PID is evaluated afresh.
//!
//! Transactions TA_i of a window = marker completions + lines received by the
//! ingest endpoint (and scraped Prometheus counters), passed in as
//! [`TransactionCounts`].
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::sources::sched::{CpuSample, ProcessCpu};
use crate::window::{ScenarioRecord, WindowReport};

mod rules;

pub use rules::{pod_uid_from_cgroup, read_pod_labels, systemd_unit_from_cgroup, ScenarioRule};

/// Name of the line that collects what no scenario claimed.
pub const UNASSIGNED: &str = "unassigned";

/// Errors of the scenario stage.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("unknown scenario {name:?}: expected one of credit, drawdown, repayment, query")]
    UnknownScenario { name: String },
    #[error("weight of {scenario} must be a finite number > 0, got {value}")]
    InvalidWeight { scenario: String, value: f64 },
    #[error("scenarios.rules[{index}]: {message}")]
    Rule { index: usize, message: String },
    #[error("window has {report} process records but the CPU sample has {sample} processes")]
    ProcessMismatch { report: usize, sample: usize },
}

/// The four scenarios of T/CQJR 032.2 table 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// 授信: application, identity and credit-bureau check, risk pricing, approval.
    Credit,
    /// 支用: limit confirmation, drawdown request, fund routing and payout.
    Drawdown,
    /// 还款: schedule, reminder, auto-debit, overdue handling.
    Repayment,
    /// 查询: authenticated account lookup (the unit of business, alpha = 1).
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

    pub fn name_zh(self) -> &'static str {
        match self {
            Scenario::Credit => "授信",
            Scenario::Drawdown => "支用",
            Scenario::Repayment => "还款",
            Scenario::Query => "查询",
        }
    }

    /// Slot number shared with the eBPF side and the marker library.
    pub fn slot(self) -> u32 {
        match self {
            Scenario::Credit => agent_common::SCENARIO_CREDIT,
            Scenario::Drawdown => agent_common::SCENARIO_DRAWDOWN,
            Scenario::Repayment => agent_common::SCENARIO_REPAYMENT,
            Scenario::Query => agent_common::SCENARIO_QUERY,
        }
    }

    /// The scenario of a slot; None for `SCENARIO_NONE` and out-of-range slots.
    pub fn from_slot(slot: u32) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.slot() == slot)
    }

    /// alpha_i of the standard: 24, 7, 3, 1.
    pub fn standard_weight(self) -> f64 {
        match self {
            Scenario::Credit => 24.0,
            Scenario::Drawdown => 7.0,
            Scenario::Repayment => 3.0,
            Scenario::Query => 1.0,
        }
    }

    fn index(self) -> usize {
        self.slot() as usize - 1
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = ScenarioError;

    /// Accepts the English codes and the standard's Chinese names.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.name() == text || s.name_zh() == text)
            .ok_or_else(|| ScenarioError::UnknownScenario {
                name: text.to_string(),
            })
    }
}

impl<'de> Deserialize<'de> for Scenario {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A value per scenario (transactions, weights, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerScenario<T>(pub [T; 4]);

impl<T: Copy> PerScenario<T> {
    pub fn get(&self, scenario: Scenario) -> T {
        self.0[scenario.index()]
    }

    pub fn set(&mut self, scenario: Scenario, value: T) {
        self.0[scenario.index()] = value;
    }
}

/// Completed transactions per scenario reported outside the markers (ingest
/// endpoint, Prometheus scrapes).
pub type TransactionCounts = PerScenario<u64>;

impl TransactionCounts {
    pub fn add(&mut self, scenario: Scenario, count: u64) {
        let slot = &mut self.0[scenario.index()];
        *slot = slot.saturating_add(count);
    }

    pub fn merge(&mut self, other: &TransactionCounts) {
        for s in Scenario::ALL {
            self.add(s, other.get(s));
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// alpha_i in use: the standard's unless agent.toml overrides some.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights(PerScenario<f64>);

impl Default for Weights {
    fn default() -> Self {
        Weights(PerScenario(Scenario::ALL.map(Scenario::standard_weight)))
    }
}

impl Weights {
    pub fn get(&self, scenario: Scenario) -> f64 {
        self.0.get(scenario)
    }

    /// Overrides some weights; each must be finite and > 0.
    pub fn with(mut self, scenario: Scenario, weight: f64) -> Result<Self, ScenarioError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(ScenarioError::InvalidWeight {
                scenario: scenario.name().into(),
                value: weight,
            });
        }
        self.0.set(scenario, weight);
        Ok(self)
    }

    /// The weights as the window document discloses them.
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        Scenario::ALL
            .into_iter()
            .map(|s| (s.name().to_string(), self.get(s)))
            .collect()
    }

    /// R = sum of alpha_i * TA_i.
    pub fn business_units(&self, transactions: &TransactionCounts) -> f64 {
        Scenario::ALL
            .into_iter()
            .map(|s| self.get(s) * transactions.get(s) as f64)
            .sum()
    }
}

/// A weight from agent.toml: a finite number > 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weight(pub f64);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if value.is_finite() && value > 0.0 {
            Ok(Weight(value))
        } else {
            Err(serde::de::Error::custom(format!(
                "a scenario weight must be a finite number > 0, got {value}"
            )))
        }
    }
}

/// `[scenarios.weights]`: only the four scenario names are accepted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsConfig {
    pub credit: Option<Weight>,
    pub drawdown: Option<Weight>,
    pub repayment: Option<Weight>,
    pub query: Option<Weight>,
}

impl WeightsConfig {
    pub fn resolve(&self) -> Result<Weights, ScenarioError> {
        let mut weights = Weights::default();
        for (scenario, value) in [
            (Scenario::Credit, self.credit),
            (Scenario::Drawdown, self.drawdown),
            (Scenario::Repayment, self.repayment),
            (Scenario::Query, self.query),
        ] {
            if let Some(Weight(w)) = value {
                weights = weights.with(scenario, w)?;
            }
        }
        Ok(weights)
    }
}

/// `[scenarios]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioConfig {
    /// alpha_i overrides (`[scenarios.weights] credit = 24`).
    pub weights: WeightsConfig,
    /// `[[scenarios.rules]]`, compiled while the config is read; first match wins.
    #[serde(deserialize_with = "rules::deserialize_rules")]
    pub rules: Vec<ScenarioRule>,
    /// Directory of pod label files for `pod_label` rules: one file per pod,
    /// named by the pod UID, in the Kubernetes downward-API format
    /// (`key="value"` per line), at `<dir>/<uid>` or `<dir>/<uid>/labels`.
    pub pod_labels_dir: Option<PathBuf>,
}

/// What the rules say about one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Scenario of the process's unmarked time (slot 0); None = unassigned.
    pub scenario: Option<Scenario>,
    pub service: Option<String>,
    /// Index of the rule that matched.
    pub rule_index: Option<usize>,
}

/// The scenario stage: compiled rules, weights and the per-process cache.
#[derive(Debug)]
pub struct ScenarioStage {
    weights: Weights,
    rules: Vec<ScenarioRule>,
    pod_labels_dir: Option<PathBuf>,
    /// Verdicts by (pid, start_ticks), with the comm they were given for: an
    /// unclaimed process that renames itself is evaluated again.
    cache: HashMap<(u32, u64), (String, Assignment)>,
    evaluations: u64,
}

impl ScenarioStage {
    pub fn new(config: &ScenarioConfig) -> Result<Self, ScenarioError> {
        Ok(ScenarioStage {
            weights: config.weights.resolve()?,
            rules: config.rules.clone(),
            pod_labels_dir: config.pod_labels_dir.clone(),
            cache: HashMap::new(),
            evaluations: 0,
        })
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// How many times the rules were evaluated (cache misses) since start.
    pub fn rule_evaluations(&self) -> u64 {
        self.evaluations
    }

    /// The rules' verdict on one process, without the cache.
    pub fn evaluate(&self, process: &ProcessCpu) -> Assignment {
        rules::evaluate(&self.rules, process, self.pod_labels_dir.as_deref())
    }

    /// The rules' verdict on one process, cached under (pid, start_ticks).
    pub fn assign(&mut self, process: &ProcessCpu) -> Assignment {
        let Some(start_ticks) = process.start_ticks else {
            self.evaluations += 1;
            return self.evaluate(process);
        };
        let key = (process.pid, start_ticks);
        if let Some((comm, found)) = self.cache.get(&key) {
            // A verdict a rule gave stays for the process's life; a process no
            // rule claimed is looked at again once it renames itself (workers
            // that take their role's name after start).
            if *comm == process.comm || found.rule_index.is_some() {
                return found.clone();
            }
        }
        self.evaluations += 1;
        let assignment = self.evaluate(process);
        self.cache
            .insert(key, (process.comm.clone(), assignment.clone()));
        assignment
    }

    /// Fills each process's `scenario` and `service`, `report.weights`,
    /// `report.scenarios` (credit, drawdown, repayment, query, unassigned) and
    /// `report.business_units`. Energy and carbon must already be in the
    /// process records; `report.processes[i]` must be `sample.processes[i]`.
    pub fn apply(
        &mut self,
        sample: &CpuSample,
        report: &mut WindowReport,
        external: &TransactionCounts,
    ) -> Result<(), ScenarioError> {
        if report.processes.len() != sample.processes.len() {
            return Err(ScenarioError::ProcessMismatch {
                report: report.processes.len(),
                sample: sample.processes.len(),
            });
        }
        let mut lines: Vec<ScenarioRecord> = Scenario::ALL
            .into_iter()
            .map(|s| ScenarioRecord {
                scenario: s.name().into(),
                weight: self.weights.get(s),
                ..Default::default()
            })
            .collect();
        lines.push(ScenarioRecord {
            scenario: UNASSIGNED.into(),
            ..Default::default()
        });
        let mut transactions = *external;

        for (process, record) in sample.processes.iter().zip(report.processes.iter_mut()) {
            let assignment = self.assign(process);
            record.scenario = assignment.scenario.map(|s| s.name().to_string());
            record.service = assignment.service.clone();

            for s in Scenario::ALL {
                transactions.add(s, process.scenario_transactions[s.slot() as usize]);
            }
            let shares = split_process(process, assignment.scenario);
            let energy_j = record.energy_j;
            let carbon_g = record.carbon_g;
            let embodied_g = record.embodied_g;
            let mut given = (0.0, 0.0, 0.0);
            for (line, cpu_ns, fraction) in shares.marked {
                let target = &mut lines[line];
                target.cpu_ns += cpu_ns;
                target.energy_j += energy_j * fraction;
                target.carbon_g += carbon_g * fraction;
                target.embodied_g += embodied_g * fraction;
                given.0 += energy_j * fraction;
                given.1 += carbon_g * fraction;
                given.2 += embodied_g * fraction;
            }
            // The rest goes to the slot-0 line, so each process is conserved exactly.
            let target = &mut lines[shares.rest_line];
            target.cpu_ns += shares.rest_cpu_ns;
            target.energy_j += energy_j - given.0;
            target.carbon_g += carbon_g - given.1;
            target.embodied_g += embodied_g - given.2;
        }
        for s in Scenario::ALL {
            lines[s.index()].transactions = transactions.get(s);
        }
        self.retain_seen(sample);
        report.weights = self.weights.to_map();
        report.business_units = self.weights.business_units(&transactions);
        report.scenarios = lines;
        Ok(())
    }

    /// Forgets processes that exited or were not in this window.
    fn retain_seen(&mut self, sample: &CpuSample) {
        let live: std::collections::HashSet<(u32, u64)> = sample
            .processes
            .iter()
            .filter(|p| !p.exited)
            .filter_map(|p| p.start_ticks.map(|t| (p.pid, t)))
            .collect();
        self.cache.retain(|key, _| live.contains(key));
    }
}

/// `apply_scenarios(stage, sample, report, counts)`: see [`ScenarioStage::apply`].
pub fn apply_scenarios(
    stage: &mut ScenarioStage,
    sample: &CpuSample,
    report: &mut WindowReport,
    external: &TransactionCounts,
) -> Result<(), ScenarioError> {
    stage.apply(sample, report, external)
}

struct ProcessSplit {
    /// (line index, cpu_ns, fraction of the process) for marker slots 1..4.
    marked: Vec<(usize, u64, f64)>,
    rest_line: usize,
    rest_cpu_ns: u64,
}

/// Marker slots 1..4 go to their scenario in proportion of their CPU time;
/// the rest (slot 0) to the rule's scenario or `unassigned`.
fn split_process(process: &ProcessCpu, rule_scenario: Option<Scenario>) -> ProcessSplit {
    let slots = &process.scenario_cpu_ns;
    let slot_total: u64 = slots.iter().sum();
    let denominator = slot_total.max(process.cpu_ns);
    let mut marked = Vec::new();
    let mut marked_cpu_ns = 0u64;
    if denominator > 0 {
        for s in Scenario::ALL {
            let cpu_ns = slots[s.slot() as usize];
            if cpu_ns > 0 {
                marked.push((s.index(), cpu_ns, cpu_ns as f64 / denominator as f64));
                marked_cpu_ns += cpu_ns;
            }
        }
    }
    ProcessSplit {
        marked,
        rest_line: rule_scenario.map_or(Scenario::ALL.len(), Scenario::index),
        rest_cpu_ns: process.cpu_ns.saturating_sub(marked_cpu_ns),
    }
}

/// The `SCI_*` environment variables of a live process (`/proc/<pid>/environ`);
/// empty when the process is gone or not readable. The procfs enrichment fills
/// `ProcessCpu::env` with this.
pub fn read_sci_env(pid: u32) -> Vec<(String, String)> {
    read_sci_env_at(std::path::Path::new("/proc"), pid)
}

/// [`read_sci_env`] under another proc root.
pub fn read_sci_env_at(proc_root: &std::path::Path, pid: u32) -> Vec<(String, String)> {
    crate::sources::sched::proc_info::read_sci_environ(&proc_root.join(pid.to_string()))
}
