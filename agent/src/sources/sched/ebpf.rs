//! eBPF CPU sampler: reads what the `agent-ebpf` programs accumulated.
//!
//! The kernel holds cumulative per-CPU nanoseconds per (process, scenario)
//! key, in a table this process maps (see `proc_cpu_table`); each window is
//! the difference between two reads. To end a window exactly,
//! [`flush_all_cpus`] makes every CPU switch (this thread runs once on each
//! CPU), so each CPU's in-flight slice is charged before the table is read.
//! A key's row is only given back once its process has exited (exit event
//! before the flush, or /proc entry gone), so a reused PID starts from a
//! fresh row and reading never races with the kernel's additions.
//!
//! Process lifecycle events arrive through a ring buffer, consumed by a
//! background thread. A fork carries what the child inherits; an exec
//! carries the new program's path and arguments, read by the kernel at the
//! exec itself, so a process that lives a millisecond is still described
//! and the thread is not woken for it. Only what the kernel did not carry
//! (a path too deep, arguments too long, the `SCI_*` environment when a rule
//! wants it) is read from procfs, and then the exec wakes the thread so the
//! read happens while the process lives.
// foldhash: these maps are keyed by pids and map keys, hashed thousands of times a window.
use foldhash::{HashMap, HashMapExt, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::{
    CgroupEvent, CgroupOffsets, CpuClock, ExecEvent, ExecOffsets, ProcEvent, ProcScenarioKey,
    RequestCpuBuckets, StealClockOffsets, ThreadState, CGROUP_PATH_BYTES, EXEC_ARGS_BYTES,
    EXEC_PATH_BYTES, LOSS_PROC_MAP_FULL_EVENTS, LOSS_PROC_MAP_FULL_NS, LOSS_REQUEST_HISTOGRAM_FULL,
    LOSS_RINGBUF_FULL, LOSS_SCENARIO_MAP_FULL, LOSS_SLOTS, LOSS_THREAD_MAP_FULL,
    LOSS_THREAD_STATE_FULL, LOSS_TXN_MAP_FULL, OFFSET_EXEC_START, OFFSET_PID, OFFSET_REAL_PARENT,
    OFFSET_RUNTIME, OFFSET_SLOTS, OFFSET_START_TIME, OFFSET_TGID, PROC_EVENT_CGROUP,
    PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_RENAME, REQUEST_CPU_BUCKETS,
    RETIRED_NONE, SCENARIO_SLOTS,
};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{BtfTracePoint, UProbe};
use aya::{Btf, Ebpf, EbpfLoader};

use super::btf::KernelBtf;
use super::proc_cpu_table::{self, ProcCpuTable, TableRead};
use super::proc_info::{
    clock_ticks_per_second, cmdline_from_args, online_cpus, read_proc_info_with, read_title,
    refresh_after_exec, CgroupPaths, ProcInfo,
};
use super::procfs::HostCpuTimes;
use super::{CpuSample, CpuSampler, ProcessCpu, RequestCpu};
use crate::error::AgentError;
use crate::prefetch::prefetch_description;
use crate::window::{CpuSource, LossCounters, Text};

/// The compiled `agent-ebpf` object (built by agent/build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// The compiled object, for other sources that load their own programs from
/// it (and, built with the `bench` feature, for sci-bench's baseline).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

/// Where the running kernel describes its types.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The tracepoints the accounting needs.
const TRACEPOINT_PROGRAMS: [(&str, &str); 6] = [
    ("sched_switch", "sched_switch"),
    ("sched_process_exec", "sched_process_exec"),
    ("sched_process_exit", "sched_process_exit"),
    ("sched_process_fork", "sched_process_fork"),
    ("task_rename", "task_rename"),
    ("cgroup_attach_task", "cgroup_attach_task"),
];

/// Tracepoint arguments the programs read by position (compiled in, as the
/// verifier needs constant context offsets), checked by name against the
/// running kernel's BTF before loading (by the event's class, whose
/// `__bpf_trace_<class>` function the BTF describes).
const TRACEPOINT_ARGUMENTS: [(&str, &str, usize); 9] = [
    ("sched_switch", "prev", 1),
    ("sched_switch", "next", 2),
    ("sched_switch", "prev_state", 3),
    ("sched_process_fork", "child", 1),
    ("task_rename", "task", 0),
    ("task_rename", "comm", 1),
    // cgroup_attach_task is an event of the class cgroup_migrate.
    ("cgroup_migrate", "dst_cgrp", 0),
    ("cgroup_migrate", "path", 1),
    ("cgroup_migrate", "task", 2),
];

/// The `task_struct` offsets the programs read (see `agent_common::OFFSET_*`),
/// from the running kernel's BTF; and a check that the tracepoints' arguments
/// are where the programs read them.
pub fn task_offsets(btf: &KernelBtf) -> Result<[u32; OFFSET_SLOTS], AgentError> {
    for (tracepoint, argument, position) in TRACEPOINT_ARGUMENTS {
        let found = btf.tracepoint_arg(tracepoint, argument)?;
        if found != position {
            return Err(AgentError::Ebpf(format!(
                "tracepoint {tracepoint}: argument {argument} is at position {found} in this kernel, the programs read position {position}"
            )));
        }
    }
    let mut offsets = [0u32; OFFSET_SLOTS];
    offsets[OFFSET_RUNTIME] = btf.field_of_size("task_struct", "se.sum_exec_runtime", 8)?;
    offsets[OFFSET_PID] = btf.field_of_size("task_struct", "pid", 4)?;
    offsets[OFFSET_TGID] = btf.field_of_size("task_struct", "tgid", 4)?;
    offsets[OFFSET_START_TIME] = btf.field_of_size("task_struct", "start_time", 8)?;
    offsets[OFFSET_REAL_PARENT] = btf.field_of_size("task_struct", "real_parent", 8)?;
    offsets[OFFSET_EXEC_START] = btf.field_of_size("task_struct", "se.exec_start", 8)?;
    Ok(offsets)
}

/// Where each CPU's paravirtual steal clock is (see
/// `agent_common::StealClockOffsets`), or why the marker estimates run
/// without it: a kernel that is no KVM guest, or lacks these fields.
pub fn steal_clock_offsets(btf: &KernelBtf) -> Result<StealClockOffsets, String> {
    let (rq, rq_type) = btf
        .section_var(".data..percpu", "runqueues")
        .ok_or("no per-CPU runqueues in the kernel's BTF")?;
    let (steal, steal_type) = btf
        .section_var(".data..percpu", "steal_time")
        .ok_or("no per-CPU steal_time (not a KVM guest kernel)")?;
    if rq_type != "rq" || steal_type != "kvm_steal_time" {
        return Err(format!(
            "runqueues is a {rq_type}, steal_time a {steal_type}: not the layout this reader knows"
        ));
    }
    let field = |outer: &str, path: &str| {
        btf.field_of_size(outer, path, 8)
            .map_err(|e| format!("{e} (CONFIG_FAIR_GROUP_SCHED off?)"))
    };
    let steal_in_struct = field("kvm_steal_time", "steal")?;
    Ok(StealClockOffsets {
        enabled: 1,
        task_cfs_rq: field("task_struct", "se.cfs_rq")?,
        cfs_rq_rq: field("cfs_rq", "rq")?,
        _pad: 0,
        rq_to_steal: i64::from(steal) + i64::from(steal_in_struct) - i64::from(rq),
    })
}

/// Where the exec program finds the new program's path and arguments (see
/// `agent_common::ExecOffsets`), or why execs are read from procfs instead.
pub fn exec_offsets(btf: &KernelBtf) -> Result<ExecOffsets, String> {
    let pointer =
        |outer: &str, path: &str| btf.field_of_size(outer, path, 8).map_err(|e| e.to_string());
    Ok(ExecOffsets {
        enabled: 1,
        task_mm: pointer("task_struct", "mm")?,
        mm_arg_start: pointer("mm_struct", "arg_start")?,
        mm_arg_end: pointer("mm_struct", "arg_end")?,
        mm_exe_file: pointer("mm_struct", "exe_file")?,
        file_path_mnt: pointer("file", "f_path.mnt")?,
        file_path_dentry: pointer("file", "f_path.dentry")?,
        dentry_parent: pointer("dentry", "d_parent")?,
        dentry_name: pointer("dentry", "d_name.name")?,
        vfsmount_root: pointer("vfsmount", "mnt_root")?,
        mount_mnt: btf.field("mount", "mnt").map_err(|e| e.to_string())?.offset,
        mount_parent: pointer("mount", "mnt_parent")?,
        mount_mountpoint: pointer("mount", "mnt_mountpoint")?,
        _pad: 0,
    })
}

/// Where a task's cgroup v2 id is (see `agent_common::CgroupOffsets`), or
/// why forks carry their parent's group and moves are not followed.
pub fn cgroup_offsets(btf: &KernelBtf) -> Result<CgroupOffsets, String> {
    let field =
        |outer: &str, path: &str| btf.field_of_size(outer, path, 8).map_err(|e| e.to_string());
    Ok(CgroupOffsets {
        enabled: 1,
        task_cgroups: field("task_struct", "cgroups")?,
        css_set_dfl_cgrp: field("css_set", "dfl_cgrp")?,
        cgroup_kn: field("cgroup", "kn")?,
        kernfs_node_id: field("kernfs_node", "id")?,
        _pad: 0,
    })
}

/// Stands in the previous read for a key that was closed: no map key has
/// this scenario.
const CLOSED_KEY: ProcScenarioKey = ProcScenarioKey {
    tgid: u32::MAX,
    scenario: u32::MAX,
};

#[derive(Debug, Clone, Default)]
pub struct EbpfOptions {
    /// Also account CPU time per thread in the kernel.
    pub track_threads: bool,
    /// Where procfs is (tests may point elsewhere; default /proc).
    pub proc_root: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct ExitRecord {
    ktime_ns: u64,
    comm: String,
    cgroup_id: u64,
    /// The command line as the process left it (carried while titles are read).
    title: Option<Text>,
}

#[derive(Default)]
struct LifecycleState {
    /// Processes read from procfs at exec time (or first sight), by tgid.
    info: HashMap<u32, Arc<ProcInfo>>,
    /// Group leaders that exited and whose keys are still in the maps.
    exited: HashMap<u32, ExitRecord>,
    /// Rows of the CPU table retired at a cgroup move (see
    /// `agent_common::CgroupEvent`), with their process's description
    /// before the move; given back once read.
    retired: HashMap<u32, Arc<ProcInfo>>,
    cgroups: CgroupPaths,
}

struct Lifecycle {
    ring: RingBuf<MapData>,
    state: LifecycleState,
    proc_root: PathBuf,
    /// Whether to read `SCI_*` environments (only when a scenario rule uses them).
    read_environ: bool,
    /// Whether forked processes' own command lines (titles) are read (only
    /// when a `cmdline` rule exists).
    read_titles: bool,
}

impl Lifecycle {
    fn drain(&mut self) {
        loop {
            let (event, exec, moved): (
                ProcEvent,
                Option<Box<ExecEvent>>,
                Option<Box<CgroupEvent>>,
            ) = {
                let Some(item) = self.ring.next() else {
                    break;
                };
                if item.len() < std::mem::size_of::<ProcEvent>() {
                    continue;
                }
                // SAFETY: the kernel wrote a ProcEvent (repr(C)), or an
                // ExecEvent or CgroupEvent that starts with one;
                // read_unaligned copes with alignment.
                let event: ProcEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let exec = (matches!(event.kind, PROC_EVENT_EXEC | PROC_EVENT_EXIT)
                    && item.len() >= std::mem::size_of::<ExecEvent>())
                .then(|| {
                    // SAFETY: as above, an ExecEvent of the size checked.
                    Box::new(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ExecEvent>()) })
                });
                let moved = (event.kind == PROC_EVENT_CGROUP
                    && item.len() >= std::mem::size_of::<CgroupEvent>())
                .then(|| {
                    // SAFETY: as above, a CgroupEvent of the size checked.
                    Box::new(unsafe {
                        std::ptr::read_unaligned(item.as_ptr().cast::<CgroupEvent>())
                    })
                });
                (event, exec, moved)
            };
            match event.kind {
                PROC_EVENT_FORK => self.inherit(&event),
                PROC_EVENT_CGROUP => {
                    if let Some(moved) = moved {
                        self.moved(&moved);
                    }
                }
                PROC_EVENT_RENAME => {
                    if let Some(info) = self.state.info.get_mut(&event.tgid) {
                        Arc::make_mut(info).comm = comm_to_string(&event.comm).into();
                    }
                }
                PROC_EVENT_EXEC => {
                    let carried = exec.as_deref().map(carried_by_exec).unwrap_or_default();
                    // A process described at its fork keeps its parent, start
                    // and cgroup: only what exec changes is taken, from the
                    // event where the kernel carried it, else from procfs.
                    let cgroup = self.state.cgroups.path_of(event.cgroup_id);
                    match self.state.info.get_mut(&event.tgid) {
                        Some(info) => {
                            let info = Arc::make_mut(info);
                            info.comm = comm_to_string(&event.comm).into();
                            info.forked_ktime_ns = 0;
                            if let Some(path) = cgroup.filter(|p| info.cgroup.as_ref() != Some(p)) {
                                info.set_cgroup(path);
                            }
                            if carried.is_complete() && !self.read_environ {
                                info.exe = carried.exe;
                                info.cmdline = carried.cmdline;
                                info.env.clear();
                            } else {
                                refresh_after_exec(&self.proc_root, info, self.read_environ);
                                carried.fill(info);
                            }
                        }
                        None => {
                            if let Some(mut info) =
                                read_proc_info_with(&self.proc_root, event.tgid, self.read_environ)
                            {
                                carried.fill(&mut info);
                                self.state.info.insert(event.tgid, Arc::new(info));
                            }
                        }
                    }
                    self.state.exited.remove(&event.tgid);
                }
                PROC_EVENT_EXIT => {
                    let title = exec.as_deref().and_then(|e| carried_by_exec(e).cmdline);
                    self.state.exited.insert(
                        event.tgid,
                        ExitRecord {
                            ktime_ns: event.ktime_ns,
                            comm: comm_to_string(&event.comm),
                            cgroup_id: event.cgroup_id,
                            title,
                        },
                    );
                }
                _ => {}
            }
        }
    }
}

impl Lifecycle {
    /// A forked child is its origin's copy: same exe, cmdline, cgroup,
    /// environment (hence the same rule match), with its own pid, true parent
    /// and start. The origin is read from procfs once if it was never seen
    /// (it started before the agent); the child itself is not read.
    fn inherit(&mut self, event: &ProcEvent) {
        if !self.state.info.contains_key(&event.origin_tgid) {
            match read_proc_info_with(&self.proc_root, event.origin_tgid, self.read_environ) {
                Some(info) => {
                    self.state.info.insert(event.origin_tgid, Arc::new(info));
                }
                None => {
                    // The origin is gone already: the child is read like any unknown process.
                    return;
                }
            }
        }
        let Some(origin) = self.state.info.get(&event.origin_tgid) else {
            return;
        };
        let mut child = ProcInfo::clone(origin);
        child.pid = event.tgid;
        child.ppid = event.ppid;
        child.comm = comm_to_string(&event.comm).into();
        child.start_ticks = event.ktime_ns / (1_000_000_000 / clock_ticks_per_second()).max(1);
        child.forked_ktime_ns = event.ktime_ns.max(1);
        // Born in another group than its origin's (clone3(CLONE_INTO_CGROUP)).
        if let Some(path) = self
            .state
            .cgroups
            .path_of(event.cgroup_id)
            .filter(|p| child.cgroup.as_ref() != Some(p))
        {
            child.set_cgroup(path);
        }
        self.state.info.insert(event.tgid, Arc::new(child));
        self.state.exited.remove(&event.tgid);
    }

    /// A process moved to another cgroup: its retired rows keep its
    /// description so far; from now on it is described in the new group.
    fn moved(&mut self, event: &CgroupEvent) {
        let header = &event.header;
        let path_len = (event.path_len as usize).min(CGROUP_PATH_BYTES);
        let path = if path_len > 0 {
            let path = String::from_utf8_lossy(&event.path[..path_len]);
            self.state.cgroups.learn(header.cgroup_id, &path);
            Some(Text::from(path))
        } else {
            self.state.cgroups.path_of(header.cgroup_id)
        };
        if !self.state.info.contains_key(&header.tgid) {
            // Never seen: procfs describes it as it is now, in its new group.
            if let Some(info) = read_proc_info_with(&self.proc_root, header.tgid, self.read_environ)
            {
                self.state.info.insert(header.tgid, Arc::new(info));
            }
        }
        let Some(info) = self.state.info.get_mut(&header.tgid) else {
            return;
        };
        for row in event.retired_rows.iter().filter(|r| **r != RETIRED_NONE) {
            self.state.retired.insert(*row, Arc::clone(info));
        }
        if let Some(path) = path {
            Arc::make_mut(info).set_cgroup(path);
        }
    }
}

/// What the kernel carried in an exec event: the program's path and its
/// command line (None where it did not: too long, or no offsets).
#[derive(Debug, Default)]
struct CarriedByExec {
    exe: Option<Text>,
    cmdline: Option<Text>,
}

impl CarriedByExec {
    fn is_complete(&self) -> bool {
        self.exe.is_some() && self.cmdline.is_some()
    }

    /// Puts what was carried into a description just read from procfs: the
    /// kernel's reading at the exec itself stands where procfs had nothing
    /// (the process was gone, or its entry was unreadable).
    fn fill(self, info: &mut ProcInfo) {
        if info.exe.is_none() {
            info.exe = self.exe;
        }
        if info.cmdline.is_none() {
            info.cmdline = self.cmdline;
        }
    }
}

fn carried_by_exec(event: &ExecEvent) -> CarriedByExec {
    let exe_len = (event.exe_len as usize).min(EXEC_PATH_BYTES);
    let exe = (exe_len > 0).then(|| Text::from(String::from_utf8_lossy(&event.exe[..exe_len])));
    let args_len = (event.args_len as usize).min(EXEC_ARGS_BYTES);
    let cmdline = if args_len > 0 && event.args_total == args_len as u64 {
        cmdline_from_args(&event.args[..args_len]).map(Text::from)
    } else {
        None
    };
    CarriedByExec { exe, cmdline }
}

fn comm_to_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the calling thread once on each CPU in `cpus`, so that every CPU goes
/// through sched_switch (charging whatever ran there up to now), then restores
/// the thread's affinity.
pub fn flush_all_cpus(cpus: &[u32]) {
    // SAFETY: cpu_set_t is plain data; the sched_* calls get valid pointers and sizes.
    unsafe {
        let mut original: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let have_original = libc::sched_getaffinity(0, size, &mut original) == 0;
        for &cpu in cpus {
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) == 0 {
                libc::sched_yield();
            }
        }
        if have_original {
            libc::sched_setaffinity(0, size, &original);
        }
    }
}

pub struct EbpfSampler {
    // Programs stay attached as long as this lives.
    _ebpf: Ebpf,
    marker_links: Vec<PathBuf>,
    proc_cpu: ProcCpuTable,
    txn_completed: PerCpuHashMap<MapData, ProcScenarioKey, u64>,
    thread_cpu: Option<PerCpuHashMap<MapData, u64, u64>>,
    previous_thread_ns: HashMap<u64, u64>,
    idle: PerCpuArray<MapData, CpuClock>,
    request_cpu: PerCpuHashMap<MapData, ProcScenarioKey, RequestCpuBuckets>,
    previous_request_cpu: HashMap<ProcScenarioKey, RequestCpuBuckets>,
    losses: PerCpuArray<MapData, u64>,
    lifecycle: Arc<Mutex<Lifecycle>>,
    stop: Arc<AtomicBool>,
    stop_fd: OwnedFd,
    events_thread: Option<JoinHandle<()>>,
    proc_root: PathBuf,
    cpus: Vec<u32>,
    host_times: HostCpuTimes,
    last_steal_cpu_ns: u64,
    /// This window's read of the per-process CPU table, and the previous
    /// window's (keys released since are overwritten with [`CLOSED_KEY`]);
    /// their buffers are swapped each window, not reallocated.
    cpu_read: TableRead,
    previous_cpu_read: TableRead,
    /// Processes in the last window (the next one's table is sized for them).
    last_active_processes: usize,
    /// Per-CPU vectors of recycled samples (see `CpuSampler::recycle`).
    spare_per_cpu: Vec<Vec<u64>>,
    previous_txn: HashMap<ProcScenarioKey, u64>,
    previous_idle_ns: Vec<u64>,
    previous_losses: Vec<u64>,
    previous_unowned_ns: Vec<u64>,
    window_start_unix_ns: u64,
}

/// Whether every exec wakes the event thread to read procfs (see
/// `EXEC_READS_PROCFS` in the kernel program).
fn exec_reads_procfs(ebpf: &mut Ebpf, on: bool) -> Result<(), AgentError> {
    set_flag(ebpf, "EXEC_READS_PROCFS", on)
}

/// A tracepoint program of the loaded object.
fn tracepoint_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut BtfTracePoint, AgentError> {
    ebpf.program_mut(name)
        .ok_or_else(|| AgentError::Ebpf(format!("program {name} missing")))?
        .try_into()
        .map_err(|e| AgentError::ebpf(name, e))
}

/// Slot 0 of a one-entry `Array<u32>` switch of the kernel programs.
fn set_flag(ebpf: &mut Ebpf, name: &str, on: bool) -> Result<(), AgentError> {
    let mut flag: Array<_, u32> = Array::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| AgentError::Ebpf(format!("map {name} missing")))?,
    )
    .map_err(|e| AgentError::ebpf(name, e))?;
    flag.set(0, u32::from(on), 0)
        .map_err(|e| AgentError::ebpf(&format!("setting {name}"), e))
}

/// Before the programs attach: each live thread's runtime now (the first
/// field of its schedstat, `se.sum_exec_runtime` brought up to now) as
/// its baseline in `THREAD_STATE`, so the first slice it runs after load is
/// charged in full; and each live process described from procfs. Threads
/// that do not fit in the map are left to the programs' first sight.
fn baseline_existing(
    ebpf: &mut Ebpf,
    proc_root: &Path,
) -> Result<HashMap<u32, Arc<ProcInfo>>, AgentError> {
    let mut states: aya::maps::HashMap<_, u32, ThreadState> = aya::maps::HashMap::try_from(
        ebpf.map_mut("THREAD_STATE")
            .ok_or_else(|| AgentError::Ebpf("map THREAD_STATE missing".into()))?,
    )
    .map_err(|e| AgentError::ebpf("THREAD_STATE", e))?;
    let mut described = HashMap::new();
    let mut not_kept = 0usize;
    let entries = std::fs::read_dir(proc_root)
        .map_err(|e| AgentError::io(format!("listing {}", proc_root.display()), e))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(runtime_ns) = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            else {
                continue;
            };
            let state = ThreadState {
                runtime_ns,
                ..Default::default()
            };
            if states.insert(tid, state, BPF_NOEXIST).is_err() {
                not_kept += 1;
            }
        }
        if let Some(info) = read_proc_info_with(proc_root, pid, true) {
            described.insert(pid, Arc::new(info));
        }
    }
    if not_kept > 0 {
        tracing::warn!(
            "{not_kept} threads alive at load have no baseline (THREAD_STATE full): their first slice after load is not charged"
        );
    }
    Ok(described)
}

/// `BPF_NOEXIST`: insert only a key not there yet.
const BPF_NOEXIST: u64 = 1;

fn per_cpu_sum(values: &[u64]) -> u64 {
    values.iter().sum()
}

impl EbpfSampler {
    /// Loads and attaches the accounting programs. Fails (and the caller falls
    /// back to procfs) without root/CAP_BPF+CAP_PERFMON or on a kernel without BTF.
    pub fn load(options: &EbpfOptions) -> Result<Self, AgentError> {
        Self::load_with_request_histogram(options, true)
    }

    /// [`EbpfSampler::load`], with or without the per-request CPU histogram
    /// at the marker uprobes (the benchmark measures their cost both ways).
    pub fn load_with_request_histogram(
        options: &EbpfOptions,
        request_histogram: bool,
    ) -> Result<Self, AgentError> {
        if EBPF_OBJECT.is_empty() {
            return Err(AgentError::Ebpf(
                "this build has no eBPF object (built with AYA_BUILD_SKIP)".into(),
            ));
        }
        let track_threads = u8::from(options.track_threads);
        let request_histogram = u8::from(request_histogram);
        // The kernel's BTF is read once: our reader takes the offsets from it,
        // aya's relocates and attaches with it.
        let vmlinux = std::fs::read(VMLINUX_BTF)
            .map_err(|e| AgentError::ebpf(&format!("reading {VMLINUX_BTF}"), e))?;
        let kernel_btf = KernelBtf::parse(&vmlinux)?;
        let offsets = task_offsets(&kernel_btf)?;
        let steal_clock = steal_clock_offsets(&kernel_btf).unwrap_or_else(|reason| {
            tracing::info!(
                "marker estimates cannot subtract steal time: {reason}; they count it as running time until the next switch corrects the thread's total"
            );
            StealClockOffsets::default()
        });
        let exec = exec_offsets(&kernel_btf).unwrap_or_else(|reason| {
            tracing::info!(
                "execs are described from procfs, as the kernel cannot rebuild the program's path here: {reason}"
            );
            ExecOffsets::default()
        });
        let cgroup = cgroup_offsets(&kernel_btf).unwrap_or_else(|reason| {
            tracing::warn!(
                "cgroup moves are not followed and forks carry their parent's group: {reason}"
            );
            CgroupOffsets::default()
        });
        drop(kernel_btf);
        let btf = Btf::parse(&vmlinux, aya::Endianness::default())
            .map_err(|e| AgentError::ebpf("parsing kernel BTF", e))?;
        drop(vmlinux);
        let load_ktime_ns = monotonic_now_ns();
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global("TRACK_THREADS", &track_threads, true)
            .override_global("REQUEST_HISTOGRAM", &request_histogram, true)
            .override_global("TASK_OFFSETS", &offsets, true)
            .override_global("LOAD_KTIME_NS", &load_ktime_ns, true)
            .override_global("STEAL_CLOCK", &steal_clock, true)
            .override_global("EXEC_OFFSETS", &exec, true)
            .override_global("CGROUP_OFFSETS", &cgroup, true);
        if !options.track_threads {
            // Unused: no need to preallocate 64k per-CPU entries.
            loader.map_max_entries("THREAD_CPU_NS", 1);
        }
        let possible_cpus = aya::util::nr_cpus().unwrap_or_else(|_| online_cpus().len());
        loader.map_max_entries(
            "PROC_CPU_NS",
            proc_cpu_table::cpu_ns_entries(possible_cpus)?,
        );
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| AgentError::ebpf("loading the object", e))?;
        // Its free rows are filled before the programs attach.
        let proc_cpu = ProcCpuTable::open(&mut ebpf, possible_cpus)?;
        for (program_name, tracepoint) in TRACEPOINT_PROGRAMS {
            tracepoint_program(&mut ebpf, program_name)?
                .load(tracepoint, &btf)
                .map_err(|e| AgentError::ebpf(&format!("verifying {program_name}"), e))?;
        }
        let proc_root = options
            .proc_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc"));
        // Before the programs run: every thread alive now is charged from
        // its runtime now (its first slice after load counts in full), and
        // every process is described (even one that exits before the first
        // window closes).
        let described = baseline_existing(&mut ebpf, &proc_root)?;
        for (program_name, _) in TRACEPOINT_PROGRAMS {
            tracepoint_program(&mut ebpf, program_name)?
                .attach()
                .map_err(|e| AgentError::ebpf(&format!("attaching {program_name}"), e))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| AgentError::Ebpf(format!("map {name} missing")))
        };
        let txn_completed = PerCpuHashMap::try_from(take(&mut ebpf, "TXN_COMPLETED")?)
            .map_err(|e| AgentError::ebpf("TXN_COMPLETED", e))?;
        let thread_cpu = if options.track_threads {
            Some(
                PerCpuHashMap::try_from(take(&mut ebpf, "THREAD_CPU_NS")?)
                    .map_err(|e| AgentError::ebpf("THREAD_CPU_NS", e))?,
            )
        } else {
            None
        };
        let idle = PerCpuArray::try_from(take(&mut ebpf, "CPU_CLOCK")?)
            .map_err(|e| AgentError::ebpf("CPU_CLOCK", e))?;
        let request_cpu = PerCpuHashMap::try_from(take(&mut ebpf, "REQUEST_CPU")?)
            .map_err(|e| AgentError::ebpf("REQUEST_CPU", e))?;
        let losses = PerCpuArray::try_from(take(&mut ebpf, "LOSSES")?)
            .map_err(|e| AgentError::ebpf("LOSSES", e))?;
        let ring = RingBuf::try_from(take(&mut ebpf, "PROC_EVENTS")?)
            .map_err(|e| AgentError::ebpf("PROC_EVENTS", e))?;
        let ring_fd = ring.as_raw_fd();
        // Descriptions include the environment and forked processes' own
        // command lines until told otherwise.
        exec_reads_procfs(&mut ebpf, true)?;
        set_flag(&mut ebpf, "EXIT_READS_TITLE", true)?;
        let lifecycle = Arc::new(Mutex::new(Lifecycle {
            ring,
            state: LifecycleState {
                info: described,
                cgroups: CgroupPaths::discover(),
                ..Default::default()
            },
            proc_root: proc_root.clone(),
            read_environ: true,
            read_titles: true,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        // Wakes the event thread when the sampler is dropped.
        // SAFETY: plain eventfd(2); the descriptor is owned below.
        let stop_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop_fd < 0 {
            return Err(AgentError::io(
                "creating the event thread's stop eventfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor just returned by eventfd, owned by nothing else.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(stop_fd) };
        let events_thread = {
            let lifecycle = Arc::clone(&lifecycle);
            let stop = Arc::clone(&stop);
            let stop_raw_fd = stop_fd.as_raw_fd();
            std::thread::Builder::new()
                .name("sci-proc-events".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut pollfds = [
                            libc::pollfd {
                                fd: ring_fd,
                                events: libc::POLLIN,
                                revents: 0,
                            },
                            libc::pollfd {
                                fd: stop_raw_fd,
                                events: libc::POLLIN,
                                revents: 0,
                            },
                        ];
                        // An exec wakes this thread only when procfs must be
                        // read while the process lives; every other event
                        // waits for this 1 s poll or the window's own drain,
                        // unless a quarter of the ring (2 MiB) is unread.
                        // What does not fit is counted (`ringbuf_drops`).
                        // SAFETY: valid pollfds; the ring buffer and the
                        // eventfd outlive this thread (joined on drop).
                        unsafe { libc::poll(pollfds.as_mut_ptr(), 2, 1000) };
                        if let Ok(mut lifecycle) = lifecycle.lock() {
                            lifecycle.drain();
                        }
                    }
                })
                .map_err(|e| AgentError::io("spawning the event thread", e))?
        };
        let cpus = online_cpus();
        let host_times = HostCpuTimes::new(&proc_root, &cpus);
        let mut sampler = EbpfSampler {
            _ebpf: ebpf,
            marker_links: Vec::new(),
            proc_cpu,
            txn_completed,
            thread_cpu,
            previous_thread_ns: HashMap::new(),
            idle,
            request_cpu,
            previous_request_cpu: HashMap::new(),
            losses,
            lifecycle,
            stop,
            stop_fd,
            events_thread: Some(events_thread),
            proc_root,
            cpus,
            host_times,
            last_steal_cpu_ns: 0,
            cpu_read: TableRead::default(),
            previous_cpu_read: TableRead::default(),
            last_active_processes: 0,
            spare_per_cpu: Vec::new(),
            previous_txn: HashMap::new(),
            previous_idle_ns: Vec::new(),
            previous_losses: Vec::new(),
            previous_unowned_ns: Vec::new(),
            window_start_unix_ns: 0,
        };
        // Open the first window: everything before now is not ours to report.
        sampler.sample()?;
        Ok(sampler)
    }

    /// Attaches the marker uprobes to `sci_scenario_begin`/`sci_scenario_end`
    /// in `library` (libsci_marker.so or a binary that links it statically);
    /// every process that maps that file is followed.
    pub fn attach_markers(&mut self, library: &Path) -> Result<(), AgentError> {
        for (program_name, symbol) in [
            ("scenario_begin", "sci_scenario_begin"),
            ("scenario_end", "sci_scenario_end"),
        ] {
            let program: &mut UProbe = self
                ._ebpf
                .program_mut(program_name)
                .ok_or_else(|| AgentError::Ebpf(format!("program {program_name} missing")))?
                .try_into()
                .map_err(|e| AgentError::ebpf(program_name, e))?;
            if program.fd().is_err() {
                program
                    .load()
                    .map_err(|e| AgentError::ebpf(&format!("verifying {program_name}"), e))?;
            }
            program
                .attach(
                    symbol,
                    library,
                    aya::programs::uprobe::UProbeScope::AllProcesses,
                )
                .map_err(|e| {
                    AgentError::ebpf(&format!("attaching {symbol} in {}", library.display()), e)
                })?;
        }
        let mut followed: Array<_, u32> = Array::try_from(
            self._ebpf
                .map_mut("MARKERS_FOLLOWED")
                .ok_or_else(|| AgentError::Ebpf("map MARKERS_FOLLOWED missing".into()))?,
        )
        .map_err(|e| AgentError::ebpf("MARKERS_FOLLOWED", e))?;
        followed
            .set(0, 1, 0)
            .map_err(|e| AgentError::ebpf("switching marker slices on", e))?;
        self.marker_links.push(library.to_path_buf());
        Ok(())
    }

    /// Per CPU, the paravirtual steal clock as the programs last read it (at
    /// a switch or marker call while markers are followed; 0 where it was
    /// never read or the kernel has none).
    pub fn last_steal_clock_ns_per_cpu(&self) -> Result<Vec<u64>, AgentError> {
        let clocks = self
            .idle
            .get(&0, 0)
            .map_err(|e| AgentError::ebpf("reading CPU_CLOCK", e))?;
        Ok(clocks.iter().map(|clock| clock.mark_steal_ns).collect())
    }

    /// Whether forked processes' own command lines are read (default yes):
    /// the title a server gives a forked worker (`postgres: ...`, `nginx:
    /// worker process`) is read once it has run (at the first window close
    /// after its fork, again at the next if it was younger than
    /// `TITLE_SETTLED_NS`), or carried by its exit. Only `cmdline` rules
    /// look at it: without one, leaving it out saves those reads.
    pub fn set_read_titles(&mut self, read_titles: bool) -> Result<(), AgentError> {
        self.lifecycle().read_titles = read_titles;
        set_flag(&mut self._ebpf, "EXIT_READS_TITLE", read_titles)
    }

    /// Whether process descriptions include the `SCI_*` environment (default
    /// yes). Without a scenario rule that reads it, leaving it out saves one
    /// procfs read per new program (exec).
    pub fn set_read_environ(&mut self, read_environ: bool) -> Result<(), AgentError> {
        self.lifecycle().read_environ = read_environ;
        exec_reads_procfs(&mut self._ebpf, read_environ)
    }

    /// Cumulative (run_time_ns, run_count) of each loaded program, from the
    /// kernel's bpf_stats (zero unless `kernel.bpf_stats_enabled` is on).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        program_stats(&self._ebpf)
    }

    /// The loaded object, to attach more programs that share its maps (the
    /// CPU profiler reads THREAD_STATE, whose scenarios the marker uprobes set).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self._ebpf
    }

    /// The (process, scenario) keys that own a row of the per-process CPU
    /// table now (rows of exited processes are given back at the window
    /// that reports their exit).
    pub fn cpu_table_keys(&self) -> Vec<ProcScenarioKey> {
        self.proc_cpu.keys()
    }

    pub fn marker_libraries(&self) -> &[PathBuf] {
        &self.marker_links
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        // A panic in the event thread must not stop accounting.
        self.lifecycle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn per_cpu_array_delta(
        array: &PerCpuArray<MapData, u64>,
        index: u32,
        slots: usize,
    ) -> Result<Vec<u64>, AgentError> {
        let values = array
            .get(&index, 0)
            .map_err(|e| AgentError::ebpf("reading a per-CPU counter", e))?;
        let mut out = vec![0u64; slots];
        for (cpu, value) in values.iter().enumerate().take(slots) {
            out[cpu] = *value;
        }
        Ok(out)
    }
}

/// Run-time statistics of one eBPF program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

fn program_stats(ebpf: &Ebpf) -> Vec<ProgramStats> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(ProgramStats {
                name: name.to_string(),
                run_time_ns: info.run_time().as_nanos() as u64,
                run_count: info.run_count(),
            })
        })
        .collect()
}

/// The processes of one window as they are read from the maps: in the
/// order they are met (a sequential write, not a scatter through a table of
/// large entries), found by tgid through a small index, and put in pid order
/// once at the end.
struct WindowProcesses {
    /// By (tgid, placement): 0 for the process as it is now, else the
    /// address of its description before a cgroup move (one record per
    /// group it was in during the window).
    index: HashMap<(u32, usize), usize>,
    list: Vec<ProcessCpu>,
    slots: usize,
    /// Per-CPU vectors of an earlier window, reused.
    spare_per_cpu: Vec<Vec<u64>>,
}

impl WindowProcesses {
    fn new(capacity: usize, slots: usize, spare_per_cpu: Vec<Vec<u64>>) -> Self {
        WindowProcesses {
            index: HashMap::with_capacity(capacity),
            list: Vec::with_capacity(capacity),
            slots,
            spare_per_cpu,
        }
    }

    /// The process `tgid`, added (with no CPU time yet) if not met before.
    fn entry(&mut self, tgid: u32) -> &mut ProcessCpu {
        self.entry_at(tgid, 0)
    }

    /// The record of what process `tgid` ran in the group it left (its
    /// description then: `before_move`).
    fn entry_before_move(&mut self, tgid: u32, before_move: &Arc<ProcInfo>) -> &mut ProcessCpu {
        let process = self.entry_at(tgid, Arc::as_ptr(before_move) as usize);
        if process.start_ticks.is_none() {
            before_move.describe(process);
        }
        process
    }

    fn entry_at(&mut self, tgid: u32, placement: usize) -> &mut ProcessCpu {
        let (list, slots, spare) = (&mut self.list, self.slots, &mut self.spare_per_cpu);
        let at = *self.index.entry((tgid, placement)).or_insert_with(|| {
            let mut cpu_ns_per_cpu = spare.pop().unwrap_or_default();
            cpu_ns_per_cpu.clear();
            cpu_ns_per_cpu.resize(slots, 0);
            list.push(ProcessCpu {
                pid: tgid,
                cpu_ns_per_cpu,
                ..Default::default()
            });
            list.len() - 1
        });
        &mut self.list[at]
    }

    fn get_mut(&mut self, tgid: u32) -> Option<&mut ProcessCpu> {
        let at = *self.index.get(&(tgid, 0))?;
        self.list.get_mut(at)
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    /// In pid order; the records are large, so their indexes are sorted and
    /// each record is moved once. Also gives back the spares not used.
    fn into_sorted(mut self) -> (Vec<ProcessCpu>, Vec<Vec<u64>>) {
        let spare = std::mem::take(&mut self.spare_per_cpu);
        (self.sorted(), spare)
    }

    fn sorted(mut self) -> Vec<ProcessCpu> {
        // A process met twice (before and after a cgroup move) keeps the
        // order its records were made in.
        let mut order: Vec<(u32, usize)> = self
            .list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.pid, i))
            .collect();
        order.sort_unstable();
        if order.iter().enumerate().all(|(at, (_, i))| at == *i) {
            return self.list;
        }
        order
            .iter()
            .map(|(_, i)| std::mem::take(&mut self.list[*i]))
            .collect()
    }
}

/// A forked process's title read again at the next window if it was
/// younger than this at the first read (a server sets its workers' titles
/// right after the fork).
pub const TITLE_SETTLED_NS: u64 = 100_000_000;

impl EbpfSampler {
    /// Gives each process of the window that forked without exec and whose
    /// own command line is still unread its title: from procfs while it
    /// lives, from its exit event once it has exited; and keeps it in its
    /// description. A process younger than `TITLE_SETTLED_NS` is read again
    /// at the next window; otherwise once.
    fn read_titles(&mut self, by_tgid: &mut WindowProcesses, closed: &HashMap<u32, ExitRecord>) {
        let now_ns = monotonic_now_ns();
        let mut titles = Vec::new();
        for process in by_tgid.list.iter() {
            let forked_ns = process.info.forked_ktime_ns;
            if forked_ns == 0 || process.info.pid != process.pid {
                continue;
            }
            let (title, settled) = match closed.get(&process.pid) {
                Some(exit) => (exit.title.clone(), true),
                None => (
                    read_title(&self.proc_root, process.pid).map(Text::from),
                    now_ns.saturating_sub(forked_ns) >= TITLE_SETTLED_NS || process.exited,
                ),
            };
            titles.push((process.pid, title, settled));
        }
        if titles.is_empty() {
            return;
        }
        let mut lifecycle = self.lifecycle();
        for (pid, title, settled) in titles {
            let Some(process) = by_tgid.get_mut(pid) else {
                continue;
            };
            let retitle = |info: &mut ProcInfo| {
                if title.is_some() {
                    info.cmdline.clone_from(&title);
                }
                if settled {
                    info.forked_ktime_ns = 0;
                }
            };
            match lifecycle.state.info.get_mut(&pid) {
                // Still the description this record has (not re-forked since).
                Some(info) if info.start_ticks == process.info.start_ticks => {
                    retitle(Arc::make_mut(info));
                    process.info = Arc::clone(info);
                }
                _ => retitle(Arc::make_mut(&mut process.info)),
            }
        }
    }

    /// Adds this window's per-request CPU histograms (growth of the kernel's
    /// cumulative per-CPU buckets since the last read) to `by_tgid`; returns
    /// every key read (the dead ones are removed after enrichment).
    fn read_request_cpu(
        &mut self,
        by_tgid: &mut WindowProcesses,
    ) -> Result<Vec<ProcScenarioKey>, AgentError> {
        let mut keys = Vec::new();
        if self.marker_links.is_empty() {
            return Ok(keys);
        }
        for entry in self.request_cpu.iter() {
            let (key, values) = entry.map_err(|e| AgentError::ebpf("reading REQUEST_CPU", e))?;
            let mut total = RequestCpuBuckets::default();
            for cpu_value in values.iter() {
                for (sum, count) in total.counts.iter_mut().zip(cpu_value.counts.iter()) {
                    *sum += count;
                }
                total.sum_cpu_ns += cpu_value.sum_cpu_ns;
            }
            keys.push(key);
            let before = self.previous_request_cpu.insert(key, total);
            let mut delta = RequestCpu {
                scenario: key.scenario,
                counts: vec![0; REQUEST_CPU_BUCKETS],
                sum_cpu_ns: total
                    .sum_cpu_ns
                    .saturating_sub(before.map_or(0, |b| b.sum_cpu_ns)),
            };
            for (i, count) in total.counts.iter().enumerate() {
                delta.counts[i] = count.saturating_sub(before.map_or(0, |b| b.counts[i]));
            }
            if delta.counts.iter().all(|c| *c == 0) || key.scenario >= SCENARIO_SLOTS {
                continue;
            }
            while delta.counts.last() == Some(&0) {
                delta.counts.pop();
            }
            by_tgid.entry(key.tgid).request_cpu.push(delta);
        }
        Ok(keys)
    }

    /// Adds this window's per-thread CPU time to `by_tgid`; returns the keys
    /// that had nothing new (candidates for removal if their thread is gone).
    fn read_threads(&mut self, by_tgid: &mut WindowProcesses) -> Result<Vec<u64>, AgentError> {
        let Some(thread_cpu) = self.thread_cpu.as_ref() else {
            return Ok(Vec::new());
        };
        let mut idle_keys = Vec::new();
        for entry in thread_cpu.iter() {
            let (key, values) = entry.map_err(|e| AgentError::ebpf("reading THREAD_CPU_NS", e))?;
            let total = per_cpu_sum(&values);
            let before = self.previous_thread_ns.insert(key, total).unwrap_or(0);
            let delta = total.saturating_sub(before);
            if delta == 0 {
                idle_keys.push(key);
                continue;
            }
            if let Some(process) = by_tgid.get_mut((key >> 32) as u32) {
                process.threads.push((key as u32, delta));
            }
        }
        for process in by_tgid.list.iter_mut() {
            process.threads.sort_unstable();
        }
        Ok(idle_keys)
    }
}

impl Drop for EbpfSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our own eventfd.
        let _ = unsafe {
            libc::write(
                self.stop_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if let Some(handle) = self.events_thread.take() {
            let _ = handle.join();
        }
    }
}

impl CpuSampler for EbpfSampler {
    fn source(&self) -> CpuSource {
        CpuSource::Ebpf
    }

    fn steal_cpu_ns(&self) -> u64 {
        self.last_steal_cpu_ns
    }

    fn recycle(&mut self, sample: CpuSample) {
        let bound = self.last_active_processes.max(1024);
        for process in sample.processes {
            if self.spare_per_cpu.len() < bound && process.cpu_ns_per_cpu.capacity() > 0 {
                self.spare_per_cpu.push(process.cpu_ns_per_cpu);
            }
        }
    }

    fn sample(&mut self) -> Result<CpuSample, AgentError> {
        let flush_start_ktime_ns = monotonic_now_ns();
        flush_all_cpus(&self.cpus);
        let end_unix_ns = unix_now_ns();
        self.last_steal_cpu_ns = self
            .host_times
            .next_window()
            .map(|w| w.steal_ns)
            .unwrap_or(0);
        let slots = self.cpus.iter().copied().max().unwrap_or(0) as usize + 1;

        // Exit events emitted before the flush are complete: their final
        // switch happened before this thread ran on that CPU.
        // Rows retired at a cgroup move before the flush hold what their
        // process ran before it (their description is the one it had then).
        let (closed, retired): (HashMap<u32, ExitRecord>, HashMap<u32, Arc<ProcInfo>>) = {
            let mut lifecycle = self.lifecycle();
            lifecycle.drain();
            let closed = lifecycle
                .state
                .exited
                .iter()
                .filter(|(_, exit)| exit.ktime_ns < flush_start_ktime_ns)
                .map(|(tgid, exit)| (*tgid, exit.clone()))
                .collect();
            (closed, lifecycle.state.retired.clone())
        };

        // CPU time per key, as deltas since the last window: both reads are
        // in row order, so the previous figures of a row are met by a cursor,
        // and count only if the row still has the same key.
        let mut by_tgid = WindowProcesses::new(
            self.last_active_processes,
            slots,
            std::mem::take(&mut self.spare_per_cpu),
        );
        self.proc_cpu.read(slots, &mut self.cpu_read);
        let read = &self.cpu_read;
        let previous_read = &self.previous_cpu_read;
        let mut cursor = 0usize;
        for (at, (row, key)) in read.rows.iter().zip(&read.keys).enumerate() {
            let now = read.values_of(at);
            while previous_read.rows.get(cursor).is_some_and(|r| r < row) {
                cursor += 1;
            }
            let previous: &[u64] = if previous_read.rows.get(cursor) == Some(row)
                && previous_read.keys.get(cursor) == Some(key)
            {
                previous_read.values_of(cursor)
            } else {
                &[]
            };
            let before = |cpu: usize| previous.get(cpu).copied().unwrap_or(0);
            let delta: u64 = now
                .iter()
                .enumerate()
                .map(|(cpu, n)| n.saturating_sub(before(cpu)))
                .sum();
            if delta == 0 && !closed.contains_key(&key.tgid) {
                continue;
            }
            let process = match retired.get(row) {
                Some(before_move) => by_tgid.entry_before_move(key.tgid, before_move),
                None => by_tgid.entry(key.tgid),
            };
            process.cpu_ns += delta;
            for (cpu, (sum, n)) in process.cpu_ns_per_cpu.iter_mut().zip(now).enumerate() {
                *sum += n.saturating_sub(before(cpu));
            }
            if (key.scenario as usize) < SCENARIO_SLOTS as usize {
                process.scenario_cpu_ns[key.scenario as usize] += delta;
            }
        }
        let mut txn_keys = Vec::new();
        // Only the marker uprobes fill the transaction and request maps; an
        // empty hash map still costs a walk of every bucket to find that out.
        let txn_entries = (!self.marker_links.is_empty()).then(|| self.txn_completed.iter());
        for entry in txn_entries.into_iter().flatten() {
            let (key, values) = entry.map_err(|e| AgentError::ebpf("reading TXN_COMPLETED", e))?;
            let total = per_cpu_sum(&values);
            let before = self.previous_txn.insert(key, total).unwrap_or(0);
            txn_keys.push(key);
            let delta = total.saturating_sub(before);
            if delta == 0 || key.scenario >= SCENARIO_SLOTS {
                continue;
            }
            by_tgid.entry(key.tgid).scenario_transactions[key.scenario as usize] += delta;
        }

        let histogram_keys = self.read_request_cpu(&mut by_tgid)?;
        let thread_keys = self.read_threads(&mut by_tgid)?;

        // Enrich; a process whose /proc entry is gone has exited too.
        // Known processes are described under the lock (one copy of their
        // description); unknown ones are read from procfs outside it.
        let mut newly_read = Vec::new();
        let mut dead: HashSet<u32> = closed.keys().copied().collect();
        let mut unknown = Vec::new();
        let read_environ = {
            let lifecycle = self.lifecycle();
            // Found first, described after: the descriptions' lines are
            // asked for on the way, so their misses overlap (crate::prefetch).
            let mut known = Vec::with_capacity(by_tgid.len());
            // (Records of the time before a cgroup move are described already.)
            for process in by_tgid.list.iter_mut().filter(|p| p.start_ticks.is_none()) {
                match lifecycle.state.info.get(&process.pid) {
                    Some(info) => {
                        prefetch_description(info);
                        known.push((process, info));
                    }
                    None => unknown.push(process.pid),
                }
            }
            for (process, info) in known {
                info.describe(process);
            }
            (lifecycle.read_environ, lifecycle.read_titles)
        };
        let (read_environ, read_titles) = read_environ;
        for tgid in unknown {
            if let (Some(info), Some(process)) = (
                read_proc_info_with(&self.proc_root, tgid, read_environ),
                by_tgid.get_mut(tgid),
            ) {
                let info = Arc::new(info);
                info.describe(process);
                newly_read.push(info);
            }
        }
        for process in by_tgid.list.iter_mut() {
            let tgid = &process.pid;
            let described = process.start_ticks.is_some();
            if let Some(exit) = closed.get(tgid) {
                process.exited = true;
                if !described {
                    let mut info = ProcInfo {
                        pid: *tgid,
                        comm: exit.comm.as_str().into(),
                        cmdline: exit.title.clone(),
                        ..Default::default()
                    };
                    if let Some(path) = self.lifecycle().state.cgroups.path_of(exit.cgroup_id) {
                        info.set_cgroup(path);
                    }
                    process.info = Arc::new(info);
                }
            } else if !described {
                process.exited = true;
                dead.insert(*tgid);
            }
        }
        if read_titles {
            self.read_titles(&mut by_tgid, &closed);
        }

        // Release the rows of dead processes: a later process with the same
        // PID starts afresh in a new row (and a released row's next key never
        // matches the closed one's figures).
        // This read becomes the previous one; its buffers are swapped, not copied.
        let read = &mut self.cpu_read;
        for (row, key) in read.rows.iter().zip(read.keys.iter_mut()) {
            if dead.contains(&key.tgid) || retired.contains_key(row) {
                if let Err(e) = self.proc_cpu.release(*row, key) {
                    tracing::warn!("releasing a row of the CPU table: {e}");
                }
                *key = CLOSED_KEY;
            }
        }
        std::mem::swap(&mut self.cpu_read, &mut self.previous_cpu_read);
        if let Some(thread_cpu) = self.thread_cpu.as_mut() {
            for key in thread_keys {
                let (tgid, tid) = ((key >> 32) as u32, key as u32);
                let thread_gone = dead.contains(&tgid)
                    || !self.proc_root.join(format!("{tgid}/task/{tid}")).exists();
                if thread_gone {
                    let _ = thread_cpu.remove(&key);
                    self.previous_thread_ns.remove(&key);
                }
            }
        }
        for key in txn_keys.iter().filter(|k| dead.contains(&k.tgid)) {
            let _ = self.txn_completed.remove(key);
            self.previous_txn.remove(key);
        }
        for key in histogram_keys.iter().filter(|k| dead.contains(&k.tgid)) {
            let _ = self.request_cpu.remove(key);
            self.previous_request_cpu.remove(key);
        }
        {
            let mut lifecycle = self.lifecycle();
            for info in newly_read {
                lifecycle.state.info.entry(info.pid).or_insert(info);
            }
            for tgid in &dead {
                lifecycle.state.exited.remove(tgid);
                lifecycle.state.info.remove(tgid);
            }
            for row in retired.keys() {
                lifecycle.state.retired.remove(row);
            }
        }

        let idle_now: Vec<u64> = {
            let clocks = self
                .idle
                .get(&0, 0)
                .map_err(|e| AgentError::ebpf("reading CPU_CLOCK", e))?;
            let mut out = vec![0u64; slots];
            for (cpu, clock) in clocks.iter().enumerate().take(slots) {
                out[cpu] = clock.idle_ns;
            }
            out
        };
        let idle_ns_per_cpu: Vec<u64> = idle_now
            .iter()
            .enumerate()
            .map(|(cpu, now)| {
                now.saturating_sub(self.previous_idle_ns.get(cpu).copied().unwrap_or(0))
            })
            .collect();
        self.previous_idle_ns = idle_now;

        let mut losses_now = Vec::with_capacity(LOSS_SLOTS as usize);
        let mut unowned_now = vec![0u64; slots];
        for slot in 0..LOSS_SLOTS {
            let per_cpu = Self::per_cpu_array_delta(&self.losses, slot, slots)?;
            if slot == LOSS_PROC_MAP_FULL_NS {
                unowned_now.clone_from(&per_cpu);
            }
            losses_now.push(per_cpu_sum(&per_cpu));
        }
        let previous_losses = std::mem::replace(&mut self.previous_losses, losses_now.clone());
        let loss = |slot: u32| {
            losses_now[slot as usize]
                .saturating_sub(previous_losses.get(slot as usize).copied().unwrap_or(0))
        };
        let lost = LossCounters {
            proc_map_full_events: loss(LOSS_PROC_MAP_FULL_EVENTS),
            proc_map_full_cpu_ns: loss(LOSS_PROC_MAP_FULL_NS),
            ringbuf_drops: loss(LOSS_RINGBUF_FULL),
            thread_map_full: loss(LOSS_THREAD_MAP_FULL),
            txn_map_full: loss(LOSS_TXN_MAP_FULL),
            scenario_map_full: loss(LOSS_SCENARIO_MAP_FULL) + loss(LOSS_THREAD_STATE_FULL),
            request_histogram_full: loss(LOSS_REQUEST_HISTOGRAM_FULL),
            late_cpu_ns: 0,
            // The profiler's own, added by the pipeline when it drains.
            profile_samples_lost: 0,
            profile_stacks_lost: 0,
        };
        // Per-CPU busy time no process could be charged with, this window only.
        let unowned_busy_ns_per_cpu: Vec<u64> = unowned_now
            .iter()
            .enumerate()
            .map(|(cpu, now)| {
                now.saturating_sub(self.previous_unowned_ns.get(cpu).copied().unwrap_or(0))
            })
            .collect();
        self.previous_unowned_ns = unowned_now;

        let start_unix_ns = std::mem::replace(&mut self.window_start_unix_ns, end_unix_ns);
        self.last_active_processes = by_tgid.len();
        let processes;
        (processes, self.spare_per_cpu) = by_tgid.into_sorted();
        Ok(CpuSample {
            source: CpuSource::Ebpf,
            start_unix_ns,
            end_unix_ns,
            cpus: self.cpus.len() as u32,
            idle_ns_per_cpu,
            unowned_busy_ns_per_cpu,
            processes,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn exec_event(exe: &[u8], args: &[u8], args_total: u64) -> ExecEvent {
        let mut event = ExecEvent {
            header: ProcEvent {
                kind: PROC_EVENT_EXEC,
                tgid: 7,
                tid: 7,
                ppid: 0,
                origin_tgid: 0,
                _pad: 0,
                ktime_ns: 0,
                cgroup_id: 0,
                comm: [0; 16],
            },
            exe_len: exe.len() as u32,
            args_len: args.len() as u32,
            args_total,
            exe: [0; EXEC_PATH_BYTES + agent_common::EXEC_NAME_BYTES],
            args: [0; EXEC_ARGS_BYTES],
        };
        event.exe[..exe.len()].copy_from_slice(exe);
        event.args[..args.len()].copy_from_slice(args);
        event
    }

    #[test]
    fn an_exec_event_gives_the_path_and_the_command_line_procfs_would() {
        let args = b"/usr/bin/sleep\x001\x00two words\x00";
        let carried = carried_by_exec(&exec_event(b"/usr/bin/sleep", args, args.len() as u64));
        assert!(carried.is_complete());
        assert_eq!(carried.exe.as_deref(), Some("/usr/bin/sleep"));
        assert_eq!(
            carried.cmdline.as_deref(),
            Some("/usr/bin/sleep 1 two words")
        );
    }

    #[test]
    fn cut_arguments_or_a_missing_path_are_left_to_procfs() {
        let args = [b'x'; EXEC_ARGS_BYTES];
        let cut = carried_by_exec(&exec_event(b"/bin/java", &args, 5000));
        assert_eq!(cut.exe.as_deref(), Some("/bin/java"));
        assert_eq!(cut.cmdline, None, "5000 bytes of arguments, 1024 carried");
        assert!(!cut.is_complete());
        let no_path = carried_by_exec(&exec_event(b"", b"a\0", 2));
        assert_eq!(no_path.exe, None);
        assert!(!no_path.is_complete());
        // What procfs found stands; what it could not find is taken from the event.
        let mut info = ProcInfo {
            exe: Some(Text::from("/from/procfs")),
            ..ProcInfo::default()
        };
        carried_by_exec(&exec_event(b"/from/kernel", b"k\0", 2)).fill(&mut info);
        assert_eq!(info.exe.as_deref(), Some("/from/procfs"));
        assert_eq!(info.cmdline.as_deref(), Some("k"));
    }
}
