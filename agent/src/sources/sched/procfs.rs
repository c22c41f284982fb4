//! Fallback CPU sampler: polls `/proc/<pid>/stat` (utime + stime) and
//! `/proc/stat` (per-CPU idle) once per window, the method of Scaphandre and
//! Kepler 0.10. A process that starts and ends between two polls is never
//! seen; a process that exits between polls loses its last partial window.
//! Resolution is one clock tick (10 ms at CLK_TCK = 100) per process.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use super::proc_info::{clock_ticks_per_second, online_cpus, read_proc_info, read_stat};
use super::{CpuSample, CpuSampler, ProcessCpu};
use crate::error::AgentError;
use crate::window::{CpuSource, LossCounters};

/// CPU ticks per process, keyed by (pid, start_ticks) so a reused PID is a new key.
type TicksByProcess = HashMap<(u32, u64), u64>;

pub struct ProcfsSampler {
    proc_root: PathBuf,
    ns_per_tick: u64,
    cpus: Vec<u32>,
    /// (pid, start_ticks) -> cumulative utime+stime ticks at the last poll.
    previous_ticks: TicksByProcess,
    previous_idle_ticks: Vec<u64>,
    window_start_unix_ns: u64,
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Per-CPU idle + iowait ticks from /proc/stat, indexed by CPU number.
fn read_idle_ticks(proc_root: &std::path::Path, cpus: &[u32]) -> Result<Vec<u64>, AgentError> {
    let path = proc_root.join("stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
    let max_cpu = cpus.iter().copied().max().unwrap_or(0) as usize;
    let mut idle = vec![0u64; max_cpu + 1];
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(label) = parts.next() else { continue };
        let Some(cpu) = label
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let values: Vec<u64> = parts.filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait ...
        if let (Some(i), Some(w)) = (values.get(3), values.get(4)) {
            if cpu < idle.len() {
                idle[cpu] = i + w;
            }
        }
    }
    Ok(idle)
}

impl ProcfsSampler {
    pub fn new(proc_root: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let proc_root = proc_root.into();
        let ns_per_tick = 1_000_000_000 / clock_ticks_per_second();
        let cpus = online_cpus();
        let mut sampler = ProcfsSampler {
            proc_root,
            ns_per_tick,
            cpus,
            previous_ticks: HashMap::new(),
            previous_idle_ticks: Vec::new(),
            window_start_unix_ns: 0,
        };
        sampler.poll()?;
        sampler.window_start_unix_ns = unix_now_ns();
        Ok(sampler)
    }

    /// Reads every process's cumulative ticks: (pid, start) -> ticks.
    fn read_all(&self) -> Result<TicksByProcess, AgentError> {
        let entries = std::fs::read_dir(&self.proc_root)
            .map_err(|e| AgentError::io(format!("listing {}", self.proc_root.display()), e))?;
        let mut ticks = HashMap::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, stat)) = read_stat(&self.proc_root, pid) {
                ticks.insert((pid, stat.start_ticks), stat.utime_ticks + stat.stime_ticks);
            }
        }
        Ok(ticks)
    }

    fn poll(&mut self) -> Result<(TicksByProcess, Vec<u64>), AgentError> {
        let ticks = self.read_all()?;
        let idle = read_idle_ticks(&self.proc_root, &self.cpus)?;
        let previous_ticks = std::mem::replace(&mut self.previous_ticks, ticks.clone());
        let previous_idle = std::mem::replace(&mut self.previous_idle_ticks, idle.clone());
        let mut deltas = HashMap::new();
        for (key, now) in &ticks {
            let before = previous_ticks.get(key).copied().unwrap_or(0);
            deltas.insert(*key, now.saturating_sub(before));
        }
        let idle_delta = idle
            .iter()
            .enumerate()
            .map(|(i, now)| now.saturating_sub(previous_idle.get(i).copied().unwrap_or(*now)))
            .collect();
        Ok((deltas, idle_delta))
    }
}

impl CpuSampler for ProcfsSampler {
    fn source(&self) -> CpuSource {
        CpuSource::Procfs
    }

    fn sample(&mut self) -> Result<CpuSample, AgentError> {
        let (deltas, idle_ticks) = self.poll()?;
        let end_unix_ns = unix_now_ns();
        let start_unix_ns = std::mem::replace(&mut self.window_start_unix_ns, end_unix_ns);
        let mut processes = Vec::new();
        for ((pid, start_ticks), delta_ticks) in deltas {
            if delta_ticks == 0 {
                continue;
            }
            let info = read_proc_info(&self.proc_root, pid);
            let alive = info.as_ref().is_some_and(|i| i.start_ticks == start_ticks);
            let info = info.filter(|_| alive).unwrap_or_default();
            let cpu_ns = delta_ticks * self.ns_per_tick;
            let mut scenario_cpu_ns = [0u64; agent_common::SCENARIO_SLOTS as usize];
            scenario_cpu_ns[0] = cpu_ns;
            processes.push(ProcessCpu {
                pid,
                ppid: info.ppid,
                comm: info.comm,
                exe: info.exe,
                cmdline: info.cmdline,
                cgroup: info.cgroup,
                container_id: info.container_id,
                env: info.env,
                start_ticks: Some(start_ticks),
                exited: !alive,
                cpu_ns,
                cpu_ns_per_cpu: Vec::new(),
                threads: Vec::new(),
                scenario_cpu_ns,
                scenario_transactions: [0; agent_common::SCENARIO_SLOTS as usize],
            });
        }
        processes.sort_by_key(|p| p.pid);
        Ok(CpuSample {
            source: CpuSource::Procfs,
            start_unix_ns,
            end_unix_ns,
            cpus: self.cpus.len() as u32,
            idle_ns_per_cpu: idle_ticks.iter().map(|t| t * self.ns_per_tick).collect(),
            unowned_busy_ns_per_cpu: Vec::new(),
            processes,
            lost: LossCounters::default(),
        })
    }
}
