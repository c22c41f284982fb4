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
//! under (pid, start_ticks) so a reused PID is evaluated afresh, and judged
//! again when its cgroup (a move: `cgroup`, `systemd_unit`, `container` and
//! `pod_label` rules) or its command line (a title a forked server process
//! gave itself) is no longer the one it was judged on.
//!
//! The cache is a vector sorted by (pid, start_ticks), rebuilt every window
//! from the processes the window holds (so it forgets the others): windows
//! come in pid order, so the previous window's verdicts are met by a cursor
//! moving forward, a sequential read instead of one hash probe per process
//! (at 5,000 processes the probes missed the CPU caches, about a tenth of
//! the window's cost). A process out of order is found by binary search.
//!
//! Transactions TA_i of a window = marker completions + lines received by the
//! ingest endpoint (and scraped Prometheus counters), passed in as
//! [`TransactionCounts`].
use std::collections::BTreeMap;

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use crate::sources::sched::{CpuSample, ProcessCpu};
use crate::window::{ScenarioRecord, Text, WindowReport};

mod rules;

pub use rules::{pod_uid_from_cgroup, read_pod_labels, systemd_unit_from_cgroup, ScenarioRule};

pub use crate::error::ScenarioError;
pub use agent_common::scenario::{PerScenario, Scenario, TransactionCounts, UNASSIGNED};

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
    pub service: Option<Text>,
    /// Index of the rule that matched.
    pub rule_index: Option<usize>,
}

/// The scenario stage: compiled rules, weights and the per-process cache.
#[derive(Debug)]
pub struct ScenarioStage {
    weights: Weights,
    rules: Vec<ScenarioRule>,
    pod_labels_dir: Option<PathBuf>,
    /// Verdicts sorted by (pid, start_ticks), with the comm they were given
    /// for (an unclaimed process that renames itself is evaluated again):
    /// the processes of the latest window, and those asked about since.
    cache: Vec<CachedVerdict>,
    evaluations: u64,
    /// Each scenario's name, shared by every process record that carries it.
    scenario_names: [Text; 4],
}

impl ScenarioStage {
    pub fn new(config: &ScenarioConfig) -> Result<Self, ScenarioError> {
        Ok(ScenarioStage {
            weights: config.weights.resolve()?,
            rules: config.rules.clone(),
            pod_labels_dir: config.pod_labels_dir.clone(),
            cache: Vec::new(),
            evaluations: 0,
            scenario_names: Scenario::ALL.map(|s| Text::from(s.name())),
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
        let at = self.cache.binary_search_by_key(&key, |v| v.key);
        if let Ok(at) = at {
            if self.cache[at].still_holds(process) {
                return self.cache[at].assignment.clone();
            }
        }
        let verdict = self.judge(key, process);
        let assignment = verdict.assignment.clone();
        match at {
            Ok(at) => self.cache[at] = verdict,
            Err(at) => self.cache.insert(at, verdict),
        }
        assignment
    }

    /// The rules run on `process` (a cache miss).
    fn judge(&mut self, key: (u32, u64), process: &ProcessCpu) -> CachedVerdict {
        self.evaluations += 1;
        CachedVerdict {
            key,
            comm: Some(process.info.comm.clone()),
            cgroup: process.info.cgroup.clone(),
            cmdline: process.info.cmdline.clone(),
            assignment: rules::evaluate(&self.rules, process, self.pod_labels_dir.as_deref()),
        }
    }

    /// The verdict on one process of a window, taken out of the previous
    /// window's verdicts (`previous`, sorted; `cursor` moves forward through
    /// it) or given by the rules. Kept in the cache unless the process exited.
    fn window_verdict(
        &mut self,
        previous: &mut [CachedVerdict],
        cursor: &mut usize,
        process: &ProcessCpu,
    ) -> (Option<Scenario>, Option<Text>) {
        let Some(start_ticks) = process.start_ticks else {
            self.evaluations += 1;
            let assignment = self.evaluate(process);
            return (assignment.scenario, assignment.service);
        };
        let key = (process.pid, start_ticks);
        while previous.get(*cursor).is_some_and(|v| v.key < key) {
            *cursor += 1;
        }
        let at = match previous.get(*cursor) {
            Some(v) if v.key == key => {
                *cursor += 1;
                Some(*cursor - 1)
            }
            _ => previous.binary_search_by_key(&key, |v| v.key).ok(),
        };
        let verdict = match at {
            Some(at) if previous[at].still_holds(process) => CachedVerdict {
                key,
                comm: previous[at].comm.take(),
                cgroup: previous[at].cgroup.take(),
                cmdline: previous[at].cmdline.take(),
                assignment: std::mem::take(&mut previous[at].assignment),
            },
            _ => self.judge(key, process),
        };
        let figures = (
            verdict.assignment.scenario,
            verdict.assignment.service.clone(),
        );
        if !process.exited {
            self.cache.push(verdict);
        }
        figures
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
        let mut previous =
            std::mem::replace(&mut self.cache, Vec::with_capacity(sample.processes.len()));
        let mut cursor = 0;

        for (process, record) in sample.processes.iter().zip(report.processes.iter_mut()) {
            let (rule_scenario, service) = self.window_verdict(&mut previous, &mut cursor, process);
            record.service = service;
            record.scenario = rule_scenario.map(|s| self.scenario_names[s.index()].clone());

            for s in Scenario::ALL {
                transactions.add(s, process.scenario_transactions[s.slot() as usize]);
            }
            let shares = split_process(process, rule_scenario);
            let energy_j = record.energy_j;
            let carbon_g = record.carbon_g;
            let embodied_g = record.embodied_g;
            let mut given = (0.0, 0.0, 0.0);
            for &(line, cpu_ns, fraction) in &shares.marked[..shares.marked_len] {
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
        if !self.cache.is_sorted_by_key(|v| v.key) {
            self.cache.sort_unstable_by_key(|v| v.key);
        }
        report.weights = self.weights.to_map();
        report.business_units = self.weights.business_units(&transactions);
        report.scenarios = lines;
        Ok(())
    }
}

/// A cached verdict of the rules on one process.
#[derive(Debug)]
struct CachedVerdict {
    /// (pid, start_ticks).
    key: (u32, u64),
    /// None once taken into the next window's cache.
    comm: Option<Text>,
    /// The cgroup and command line the verdict was given on.
    cgroup: Option<Text>,
    cmdline: Option<Text>,
    assignment: Assignment,
}

fn same_text(a: &Text, b: &Text) -> bool {
    Text::ptr_eq(a, b) || **a == **b
}

fn same_label(a: &Option<Text>, b: &Option<Text>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same_text(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl CachedVerdict {
    /// A verdict holds while the process stays in its cgroup with its
    /// command line; a verdict a rule gave survives a rename, while a
    /// process no rule claimed is looked at again once it renames itself
    /// (workers that take their role's name after start).
    fn still_holds(&self, process: &ProcessCpu) -> bool {
        let Some(comm) = &self.comm else {
            return false;
        };
        let info = &process.info;
        same_label(&self.cgroup, &info.cgroup)
            && same_label(&self.cmdline, &info.cmdline)
            && (self.assignment.rule_index.is_some() || same_text(comm, &info.comm))
    }
}

struct ProcessSplit {
    /// (line index, cpu_ns, fraction of the process) for marker slots 1..4;
    /// the first `marked_len` are used.
    marked: [(usize, u64, f64); 4],
    marked_len: usize,
    rest_line: usize,
    rest_cpu_ns: u64,
}

/// Marker slots 1..4 go to their scenario in proportion of their CPU time;
/// the rest (slot 0) to the rule's scenario or `unassigned`.
fn split_process(process: &ProcessCpu, rule_scenario: Option<Scenario>) -> ProcessSplit {
    let slots = &process.scenario_cpu_ns;
    let slot_total: u64 = slots.iter().sum();
    let denominator = slot_total.max(process.cpu_ns);
    let mut marked = [(0, 0, 0.0); 4];
    let mut marked_len = 0;
    let mut marked_cpu_ns = 0u64;
    if denominator > 0 {
        for s in Scenario::ALL {
            let cpu_ns = slots[s.slot() as usize];
            if cpu_ns > 0 {
                marked[marked_len] = (s.index(), cpu_ns, cpu_ns as f64 / denominator as f64);
                marked_len += 1;
                marked_cpu_ns += cpu_ns;
            }
        }
    }
    ProcessSplit {
        marked,
        marked_len,
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
