//! CPU time per process, per CPU, per window.
//!
//! Two implementations of [`CpuSampler`]: `ebpf` (sched_switch accounting in
//! the kernel, exact, sees processes that live for a few milliseconds) and
//! `procfs` (polls `/proc/<pid>/stat`, the method of Scaphandre and Kepler
//! 0.10, used when eBPF cannot be loaded).
use crate::error::AgentError;
use std::sync::Arc;

use crate::window::{CpuSource, LossCounters};
use proc_info::ProcInfo;

pub mod btf;
pub mod ebpf;
mod proc_cpu_table;
pub mod proc_info;
pub mod procfs;

/// CPU figures of one process (thread group) over one window.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessCpu {
    pub pid: u32,
    /// What the process is (parent, names, cgroup, `SCI_*` environment):
    /// the description the sampler keeps for the process's life, shared by
    /// every window it appears in (one reference count, not a copy).
    pub info: Arc<ProcInfo>,
    /// Start time of the process (clock ticks since boot, /proc/<pid>/stat
    /// field 22) when it was described; distinguishes a reused PID from the
    /// process that had it before. None: never described (gone before it
    /// could be read).
    pub start_ticks: Option<u64>,
    pub exited: bool,
    /// CPU time in the window, summed over CPUs.
    pub cpu_ns: u64,
    /// CPU time per CPU (index = CPU number); empty when the source cannot tell
    /// (procfs), in which case attribution spreads it over all CPUs.
    pub cpu_ns_per_cpu: Vec<u64>,
    /// CPU time per marker scenario slot (`agent_common::SCENARIO_*`); slot 0 is
    /// time no marker claimed. Sums to `cpu_ns`.
    pub scenario_cpu_ns: [u64; agent_common::SCENARIO_SLOTS as usize],
    /// CPU time per thread (tid, cpu_ns) in the window; only with per-thread tracking.
    pub threads: Vec<(u32, u64)>,
    /// Transactions completed (marker `end(ok=true)`) per scenario slot.
    pub scenario_transactions: [u64; agent_common::SCENARIO_SLOTS as usize],
    /// CPU-time distribution of the requests completed in the window, per
    /// marker scenario slot (eBPF with marker uprobes only).
    pub request_cpu: Vec<RequestCpu>,
}

impl Default for ProcessCpu {
    fn default() -> Self {
        ProcessCpu {
            pid: 0,
            info: ProcInfo::undescribed(),
            start_ticks: None,
            exited: false,
            cpu_ns: 0,
            cpu_ns_per_cpu: Vec::new(),
            scenario_cpu_ns: [0; agent_common::SCENARIO_SLOTS as usize],
            threads: Vec::new(),
            scenario_transactions: [0; agent_common::SCENARIO_SLOTS as usize],
            request_cpu: Vec::new(),
        }
    }
}

/// The requests of one process and scenario completed in a window, in
/// log-linear buckets of their CPU time (`agent_common::request_cpu_bucket`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCpu {
    /// Marker scenario slot (`agent_common::SCENARIO_*`).
    pub scenario: u32,
    /// counts[i]: requests in bucket i of CPU ns; trailing zeros left out.
    pub counts: Vec<u64>,
    pub sum_cpu_ns: u64,
}

/// One window of CPU accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSample {
    pub source: CpuSource,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub cpus: u32,
    /// Idle time per CPU in the window.
    pub idle_ns_per_cpu: Vec<u64>,
    /// Busy time that no process could be charged with (map full), per CPU.
    pub unowned_busy_ns_per_cpu: Vec<u64>,
    pub processes: Vec<ProcessCpu>,
    pub lost: LossCounters,
}

impl CpuSample {
    pub fn idle_cpu_ns(&self) -> u64 {
        self.idle_ns_per_cpu.iter().sum()
    }

    pub fn busy_cpu_ns(&self) -> u64 {
        self.processes.iter().map(|p| p.cpu_ns).sum::<u64>()
            + self.unowned_busy_ns_per_cpu.iter().sum::<u64>()
    }
}

/// A source of per-window CPU accounting.
pub trait CpuSampler: Send {
    fn source(&self) -> CpuSource;
    /// Steal time (`/proc/stat`) summed over CPUs in the last window sampled.
    fn steal_cpu_ns(&self) -> u64 {
        0
    }
    /// Close the current window and open the next; returns the closed one.
    fn sample(&mut self) -> Result<CpuSample, AgentError>;
    /// Takes back a sample the pipeline is done with, so its buffers serve
    /// the next window instead of being freed and allocated again.
    fn recycle(&mut self, sample: CpuSample) {
        drop(sample);
    }
}
