//! Types shared by the eBPF programs (`agent-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into maps
//! and ring buffers, userspace reads it back byte for byte. With the `user`
//! feature each type implements `aya::Pod` so aya can read it from a map.
#![cfg_attr(not(test), no_std)]

#[cfg(any(
    feature = "test-support",
    feature = "time-text",
    feature = "exposition",
    feature = "cli",
    feature = "stop-signal",
    feature = "otlp"
))]
extern crate std;

#[cfg(feature = "cli")]
pub mod cli_exit;

#[cfg(feature = "stop-signal")]
pub mod stop_signal;

#[cfg(feature = "config-text")]
pub mod config_text;

#[cfg(feature = "exposition")]
pub mod prometheus_text;

#[cfg(feature = "time-text")]
pub mod time_text;

#[cfg(feature = "otlp")]
pub mod otlp;

#[cfg(feature = "test-support")]
pub mod privileged;

pub mod request_cpu;
pub use request_cpu::{
    request_cpu_bucket, RequestCpuBuckets, REQUEST_CPU_BUCKETS, REQUEST_CPU_SUB_BUCKET_BITS,
};

pub mod scenario;
pub use scenario::{
    PerScenario, Scenario, TransactionCounts, UnknownScenario, SCENARIO_CREDIT, SCENARIO_DRAWDOWN,
    SCENARIO_NAMES, SCENARIO_NONE, SCENARIO_QUERY, SCENARIO_REPAYMENT, SCENARIO_SLOTS, UNASSIGNED,
};

/// Key of the per-CPU process accounting maps: a thread group and the
/// scenario its thread was serving (from the marker uprobes) when the time
/// was spent or the transaction completed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProcScenarioKey {
    pub tgid: u32,
    pub scenario: u32,
}

/// A process lifecycle event, sent through the `PROC_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    /// `PROC_EVENT_EXEC`, `PROC_EVENT_EXIT`, `PROC_EVENT_FORK` or `PROC_EVENT_RENAME`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Fork: the child's true parent (`real_parent->tgid`); 0 otherwise.
    pub ppid: u32,
    /// Fork: the process the child is a copy of (the forking process); 0 otherwise.
    pub origin_tgid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the event.
    pub ktime_ns: u64,
    /// cgroup v2 id of the task (inode number of its cgroup directory); at a
    /// fork, the child's own (`clone3(CLONE_INTO_CGROUP)` places it in
    /// another group than its parent's).
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

pub const PROC_EVENT_EXEC: u32 = 1;
pub const PROC_EVENT_EXIT: u32 = 2;
/// A new process (not a thread) was forked; it inherits its origin's description.
pub const PROC_EVENT_FORK: u32 = 3;
/// A process's main thread changed its name (`prctl(PR_SET_NAME)`, exec); `comm` is the new one.
pub const PROC_EVENT_RENAME: u32 = 4;
/// A process was moved to another cgroup v2 group (`cgroup_attach_task`); a [`CgroupEvent`].
pub const PROC_EVENT_CGROUP: u32 = 5;

/// Bytes of a cgroup path a cgroup event carries (a longer path is
/// resolved from the group's id instead).
pub const CGROUP_PATH_BYTES: usize = 512;

/// A move to another cgroup v2 group (`PROC_EVENT_CGROUP`). `header.cgroup_id`
/// is the destination's id, `path` its path from the hierarchy's root (as
/// `/proc/PID/cgroup` has it). The CPU the process ran before the move stays
/// in the table rows it owned then: the kernel takes them from the process
/// (`retired_rows`, `RETIRED_NONE` where a scenario had none), its next charge
/// opens fresh rows, and userspace gives the retired rows the process's
/// description before the move.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupEvent {
    pub header: ProcEvent,
    pub retired_rows: [u32; SCENARIO_SLOTS as usize],
    /// Bytes of `path` (0: not carried).
    pub path_len: u32,
    pub path: [u8; CGROUP_PATH_BYTES],
}

/// A `retired_rows` entry for a scenario the process had no row for.
pub const RETIRED_NONE: u32 = u32::MAX;

/// Where a task's cgroup v2 id is (`CGROUP_OFFSETS`, read-only, from the
/// running kernel's BTF): `task_struct.cgroups` (a `css_set`), its
/// `dfl_cgrp` (the task's group in the v2 hierarchy), the group's `kn` and
/// the kernfs node's `id` (the directory's inode number). `enabled` 0 on a
/// kernel without them: forks then carry the forking task's group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub enabled: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    pub _pad: u32,
}

/// Bytes of the new program's path an exec event carries (the path is
/// rebuilt in the kernel from `mm->exe_file`; longer paths are not carried).
pub const EXEC_PATH_BYTES: usize = 512;
/// Room for one path component read at the end of the path buffer (a name
/// is at most 255 bytes plus its NUL).
pub const EXEC_NAME_BYTES: usize = 256;
/// Directory levels the path walk follows (deeper paths are not carried).
pub const EXEC_PATH_DEPTH: usize = 24;
/// Bytes of the argument vector an exec event carries; a longer one is
/// read from procfs instead.
pub const EXEC_ARGS_BYTES: usize = 1024;

/// An exec (`PROC_EVENT_EXEC`), described by the kernel at the exec itself:
/// the new program's path (`readlink /proc/PID/exe`) and its argument
/// vector (`/proc/PID/cmdline`), so that even a process that lives a
/// millisecond is described, and the reader needs neither a wake-up nor a
/// procfs read for it. `exe_len` 0 means the path could not be rebuilt
/// (too deep, too long, or no offsets on this kernel), `args_len <
/// args_total` that the arguments were cut: the reader then reads procfs.
/// While `cmdline` rules want titles, an exit (`PROC_EVENT_EXIT`) of a
/// process comes in the same record, `exe_len` 0 and `args` the argument
/// area as the process left it: the title a server gave a forked child
/// (`postgres: user db [local] idle`), read while its memory still exists.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: ProcEvent,
    pub exe_len: u32,
    pub args_len: u32,
    /// `mm->arg_end - mm->arg_start`: the whole argument vector's size.
    pub args_total: u64,
    /// The path, '/'-separated from the root, plus room for the last
    /// component read past `EXEC_PATH_BYTES` (never counted in `exe_len`).
    pub exe: [u8; EXEC_PATH_BYTES + EXEC_NAME_BYTES],
    pub args: [u8; EXEC_ARGS_BYTES],
}

/// Where the exec program finds the new program's path and arguments
/// (`EXEC_OFFSETS`, read-only, from the running kernel's BTF). The path is
/// rebuilt the way the kernel's `d_path` does: up the dentries to the
/// mount's root (`vfsmount.mnt_root`), then across to the mount point in
/// the parent mount (`struct mount`, which embeds the `vfsmount` at
/// `mount_mnt`), until a mount that is its own parent. `enabled` 0: the
/// kernel lacks one of these, and execs are read from procfs as before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecOffsets {
    pub enabled: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub mm_exe_file: u32,
    pub file_path_mnt: u32,
    pub file_path_dentry: u32,
    pub dentry_parent: u32,
    pub dentry_name: u32,
    pub vfsmount_root: u32,
    pub mount_mnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    pub _pad: u32,
}

/// Per-thread accounting state (`THREAD_STATE`, keyed by tid): everything the
/// sched_switch program needs about a thread in one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// The thread's `se.sum_exec_runtime` when it was last charged (0 for a
    /// thread born after the programs were loaded, so its first charge is its
    /// whole runtime).
    pub runtime_ns: u64,
    /// Time charged at marker calls since `runtime_ns` was read (estimated
    /// inside the running slice as wall clock minus the CPU's steal clock);
    /// the next switch charges the rest of the runtime growth.
    pub precharged_ns: u64,
    /// Scenario the thread is serving (`SCENARIO_*`), between marker begin and end.
    pub scenario: u32,
    pub _pad: u32,
    /// Everything charged to this thread since it was first seen (switches
    /// and marker calls): the thread's CPU clock as the accounting sees it.
    pub charged_ns: u64,
    /// `charged_ns` at the thread's last `sci_scenario_begin`: the request's
    /// CPU time at its end is the growth since.
    pub request_start_ns: u64,
}

/// Per-CPU clock state of the sched_switch program (`CPU_CLOCK`), one
/// lookup for everything it needs about the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuClock {
    /// `bpf_ktime_get_ns` at the last switch or marker call, kept only while
    /// marker uprobes are attached: a marker's estimate of the running slice
    /// runs from there.
    pub mark_ns: u64,
    /// The scheduler's task clock (`rq_clock_task`, read from the switching
    /// tasks' `se.exec_start`) when this CPU went idle; 0 while busy.
    pub idle_since_ns: u64,
    /// Cumulative idle time of this CPU on the task clock (steal excluded, as
    /// in task runtime).
    pub idle_ns: u64,
    /// The CPU's paravirtual steal clock when `mark_ns` was taken (0: not
    /// read): a marker's estimate subtracts the steal since, as the
    /// scheduler's task clock does.
    pub mark_steal_ns: u64,
    /// Address of this CPU's steal counter (`steal_time.steal` of its
    /// per-CPU area), found once from the running task's runqueue; 0 until then.
    pub steal_addr: u64,
}

/// Where a CPU's paravirtual steal clock is (`STEAL_CLOCK`, read-only, from
/// the running kernel's BTF): `task_struct.se.cfs_rq`, then `cfs_rq.rq` give
/// the CPU's runqueue (`runqueues`, a per-CPU variable); the KVM guest's
/// per-CPU `steal_time` lies `rq_to_steal` bytes from it in the same per-CPU
/// area. `enabled` is 0 on kernels without these (no correction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StealClockOffsets {
    pub enabled: u32,
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub _pad: u32,
    pub rq_to_steal: i64,
}

/// Capacity of the request histogram map (processes x scenarios using markers).
pub const MAX_REQUEST_HISTOGRAMS: u32 = 4096;

/// Indexes of the read-only offsets global `TASK_OFFSETS` (bytes into `struct
/// task_struct`, resolved from the running kernel's BTF at load time).
pub const OFFSET_RUNTIME: usize = 0;
pub const OFFSET_PID: usize = 1;
pub const OFFSET_TGID: usize = 2;
pub const OFFSET_START_TIME: usize = 3;
pub const OFFSET_REAL_PARENT: usize = 4;
/// `se.exec_start`: the task clock at the task's last runtime update.
pub const OFFSET_EXEC_START: usize = 5;
pub const OFFSET_SLOTS: usize = 8;

/// Indexes of the `LOSSES` per-CPU counter array: whatever the kernel side
/// could not record is counted here, never dropped silently.
pub const LOSS_PROC_MAP_FULL_EVENTS: u32 = 0;
/// Nanoseconds that could not be charged to a process because the process
/// map was full (they are still part of the host's busy time).
pub const LOSS_PROC_MAP_FULL_NS: u32 = 1;
pub const LOSS_RINGBUF_FULL: u32 = 2;
pub const LOSS_THREAD_MAP_FULL: u32 = 3;
pub const LOSS_TXN_MAP_FULL: u32 = 4;
pub const LOSS_SCENARIO_MAP_FULL: u32 = 5;
/// Thread-state inserts that failed (map full): such a thread is charged its
/// whole runtime at each switch-out from a fresh baseline, and its scenario is lost.
pub const LOSS_THREAD_STATE_FULL: u32 = 6;
/// Requests whose CPU time could not be added to a histogram (map full).
pub const LOSS_REQUEST_HISTOGRAM_FULL: u32 = 7;
pub const LOSS_SLOTS: u32 = 8;

/// Rows of the per-process CPU table (one per process and scenario), and
/// capacity of the other per-process maps.
pub const MAX_PROCESSES: u32 = 32768;
/// Capacity of the per-thread maps.
pub const MAX_THREADS: u32 = 65536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C) plain integers with no padding holes that
    // matter for reading (the explicit `_pad` field covers alignment).
    unsafe impl aya::Pod for super::ProcScenarioKey {}
    unsafe impl aya::Pod for super::ProcEvent {}
    unsafe impl aya::Pod for super::ThreadState {}
    unsafe impl aya::Pod for super::CpuClock {}
    unsafe impl aya::Pod for super::StealClockOffsets {}
    unsafe impl aya::Pod for super::ExecOffsets {}
    unsafe impl aya::Pod for super::RequestCpuBuckets {}
    unsafe impl aya::Pod for super::CgroupOffsets {}
}

/// Key of the CPU profile's sample counts (`PROFILE_COUNTS`): the sampled
/// thread group, the scenario its thread was serving (0 when none), and the
/// ids of its user and kernel stacks in `PROFILE_STACKS` (negative when the
/// stack could not be taken: a kernel thread has no user stack, a sample in
/// user mode has no kernel stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProfileKey {
    pub tgid: u32,
    pub scenario: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
}

/// Capacity of the profile's stack-trace and count maps.
pub const PROFILE_MAX_STACKS: u32 = 16384;
/// Indexes of the `PROFILE_LOSSES` per-CPU counter array.
pub const PROFILE_LOSS_COUNTS_FULL: u32 = 0;
/// A stack could not be stored (stack map full or hash bucket taken).
pub const PROFILE_LOSS_USER_STACK: u32 = 1;
pub const PROFILE_LOSS_KERNEL_STACK: u32 = 2;
pub const PROFILE_LOSS_SLOTS: u32 = 4;

#[cfg(feature = "user")]
mod profile_pod {
    // SAFETY: repr(C), four 4-byte integers, no padding.
    unsafe impl aya::Pod for super::ProfileKey {}
}
