//! Fallback CPU sampler: polls `/proc/<pid>/stat` (utime + stime) and
//! `/proc/stat` (per-CPU idle) once per window, the method of Scaphandre and
//! Kepler 0.10. A process that starts and ends between two polls is never
//! seen; a process that exits between polls loses its last partial window.
//! Resolution is one clock tick (10 ms at CLK_TCK = 100) per process.
//!
//! The poller owns its blind spot: the host's busy time comes from
//! `/proc/stat`, and whatever part of it the processes seen do not explain is
//! reported as unowned busy time (window `unattributed_cpu_ns`, its energy in
//! `unattributed_energy_j`), never spread over the processes it did see.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::proc_info::{clock_ticks_per_second, online_cpus, read_proc_info, read_stat};
use std::sync::Arc;

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
    host: HostCpuTimes,
    last_steal_cpu_ns: u64,
    window_start_unix_ns: u64,
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Cumulative per-CPU times of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StatTicks {
    busy: Vec<u64>,
    idle: Vec<u64>,
    steal: Vec<u64>,
}

/// Reads the per-CPU lines of `/proc/stat`: `cpuN user nice system idle iowait
/// irq softirq steal guest guest_nice`. Busy is user + nice + system + irq +
/// softirq (guest time is already inside user), idle is idle + iowait, steal
/// is time the hypervisor ran someone else while this vCPU wanted to run.
fn read_stat_ticks(proc_root: &Path, cpus: &[u32]) -> Result<StatTicks, AgentError> {
    use std::io::Read;
    let path = proc_root.join("stat");
    let slots = cpus.iter().copied().max().unwrap_or(0) as usize + 1;
    // Only the leading cpu lines are needed (at most ~230 bytes each); the
    // rest of the file (the interrupt counts: tens of kilobytes on a busy
    // host) is left unread.
    let mut buffer = vec![0u8; 256 * (slots + 1) + 1024];
    let read = std::fs::File::open(&path)
        .and_then(|mut file| file.read(&mut buffer))
        .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
    let text = String::from_utf8_lossy(&buffer[..read]);
    // A line cut off by the end of the buffer is left out.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut ticks = StatTicks {
        busy: vec![0; slots],
        idle: vec![0; slots],
        steal: vec![0; slots],
    };
    for line in complete.lines() {
        let mut parts = line.split_whitespace();
        let Some(label) = parts.next() else { continue };
        let Some(cpu) = label
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if cpu >= slots {
            continue;
        }
        let mut values = [0u64; 10];
        for (slot, value) in values.iter_mut().zip(parts) {
            *slot = value.parse().unwrap_or(0);
        }
        let field = |i: usize| values[i];
        ticks.busy[cpu] = field(0) + field(1) + field(2) + field(5) + field(6);
        ticks.idle[cpu] = field(3) + field(4);
        ticks.steal[cpu] = field(7);
    }
    Ok(ticks)
}

/// One window of host CPU time from `/proc/stat`, in ns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCpuWindow {
    pub busy_ns_per_cpu: Vec<u64>,
    pub idle_ns_per_cpu: Vec<u64>,
    /// Steal time summed over CPUs.
    pub steal_ns: u64,
}

/// Host busy, idle and steal time per window, from `/proc/stat` (the kernel's
/// tick-based accounting: resolution one tick per CPU).
#[derive(Debug, Clone)]
pub struct HostCpuTimes {
    proc_root: PathBuf,
    cpus: Vec<u32>,
    ns_per_tick: u64,
    previous: Option<StatTicks>,
}

impl HostCpuTimes {
    pub fn new(proc_root: &Path, cpus: &[u32]) -> Self {
        let mut times = HostCpuTimes {
            proc_root: proc_root.to_path_buf(),
            cpus: cpus.to_vec(),
            ns_per_tick: 1_000_000_000 / clock_ticks_per_second(),
            previous: None,
        };
        times.previous = read_stat_ticks(&times.proc_root, &times.cpus).ok();
        times
    }

    /// Times since the previous call (or construction).
    pub fn next_window(&mut self) -> Result<HostCpuWindow, AgentError> {
        let now = read_stat_ticks(&self.proc_root, &self.cpus)?;
        let previous = self
            .previous
            .replace(now.clone())
            .unwrap_or_else(|| now.clone());
        let delta = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter()
                .enumerate()
                .map(|(i, v)| v.saturating_sub(b.get(i).copied().unwrap_or(*v)) * self.ns_per_tick)
                .collect()
        };
        Ok(HostCpuWindow {
            busy_ns_per_cpu: delta(&now.busy, &previous.busy),
            idle_ns_per_cpu: delta(&now.idle, &previous.idle),
            steal_ns: delta(&now.steal, &previous.steal).iter().sum(),
        })
    }
}

impl ProcfsSampler {
    pub fn new(proc_root: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let proc_root = proc_root.into();
        let ns_per_tick = 1_000_000_000 / clock_ticks_per_second();
        let cpus = online_cpus();
        let host = HostCpuTimes::new(&proc_root, &cpus);
        let mut sampler = ProcfsSampler {
            proc_root,
            ns_per_tick,
            host,
            cpus,
            previous_ticks: HashMap::new(),
            last_steal_cpu_ns: 0,
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

    fn poll(&mut self) -> Result<(TicksByProcess, HostCpuWindow), AgentError> {
        let ticks = self.read_all()?;
        let host = self.host.next_window()?;
        let previous_ticks = std::mem::replace(&mut self.previous_ticks, ticks.clone());
        let mut deltas = HashMap::new();
        for (key, now) in &ticks {
            let before = previous_ticks.get(key).copied().unwrap_or(0);
            deltas.insert(*key, now.saturating_sub(before));
        }
        Ok((deltas, host))
    }
}

/// The host's busy time that the processes seen do not explain (processes
/// that lived between two polls, the last partial window of those that
/// exited), spread over the CPUs in proportion to their busy time. It is
/// charged to no process: attribution gives its energy to `unattributed`.
pub fn unexplained_busy_per_cpu(busy_ns_per_cpu: &[u64], seen_ns: u64) -> Vec<u64> {
    let busy_ns: u64 = busy_ns_per_cpu.iter().sum();
    let unexplained_ns = busy_ns.saturating_sub(seen_ns);
    if busy_ns == 0 || unexplained_ns == 0 {
        return vec![0; busy_ns_per_cpu.len()];
    }
    let mut shares: Vec<u64> = busy_ns_per_cpu
        .iter()
        .map(|b| (u128::from(unexplained_ns) * u128::from(*b) / u128::from(busy_ns)) as u64)
        .collect();
    // Rounding remainder on the busiest CPU, so the shares add up exactly.
    let rest = unexplained_ns - shares.iter().sum::<u64>();
    if let Some(busiest) = (0..shares.len()).max_by_key(|i| busy_ns_per_cpu[*i]) {
        shares[busiest] += rest;
    }
    shares
}

impl CpuSampler for ProcfsSampler {
    fn source(&self) -> CpuSource {
        CpuSource::Procfs
    }

    fn steal_cpu_ns(&self) -> u64 {
        self.last_steal_cpu_ns
    }

    fn sample(&mut self) -> Result<CpuSample, AgentError> {
        let (deltas, host) = self.poll()?;
        self.last_steal_cpu_ns = host.steal_ns;
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
                info: Arc::new(info),
                start_ticks: Some(start_ticks),
                exited: !alive,
                cpu_ns,
                cpu_ns_per_cpu: Vec::new(),
                threads: Vec::new(),
                scenario_cpu_ns,
                scenario_transactions: [0; agent_common::SCENARIO_SLOTS as usize],
                request_cpu: Vec::new(),
            });
        }
        processes.sort_by_key(|p| p.pid);
        let seen_ns: u64 = processes.iter().map(|p| p.cpu_ns).sum();
        Ok(CpuSample {
            source: CpuSource::Procfs,
            start_unix_ns,
            end_unix_ns,
            cpus: self.cpus.len() as u32,
            unowned_busy_ns_per_cpu: unexplained_busy_per_cpu(&host.busy_ns_per_cpu, seen_ns),
            idle_ns_per_cpu: host.idle_ns_per_cpu,
            processes,
            lost: LossCounters::default(),
        })
    }
}
