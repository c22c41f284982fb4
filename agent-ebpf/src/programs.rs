use agent_common::{
    request_cpu_bucket, CgroupEvent, CgroupOffsets, CpuClock, ExecEvent, ExecOffsets, ProcEvent,
    ProcScenarioKey, RequestCpuBuckets, StealClockOffsets, ThreadState, CGROUP_PATH_BYTES,
    EXEC_ARGS_BYTES, EXEC_NAME_BYTES, EXEC_PATH_BYTES, EXEC_PATH_DEPTH, LOSS_PROC_MAP_FULL_EVENTS,
    LOSS_PROC_MAP_FULL_NS, LOSS_REQUEST_HISTOGRAM_FULL, LOSS_RINGBUF_FULL, LOSS_SCENARIO_MAP_FULL,
    LOSS_SLOTS, LOSS_THREAD_MAP_FULL, LOSS_THREAD_STATE_FULL, LOSS_TXN_MAP_FULL, MAX_PROCESSES,
    MAX_REQUEST_HISTOGRAMS, MAX_THREADS, OFFSET_EXEC_START, OFFSET_PID, OFFSET_REAL_PARENT,
    OFFSET_RUNTIME, OFFSET_SLOTS, OFFSET_START_TIME, OFFSET_TGID, PROC_EVENT_CGROUP,
    PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_RENAME, REQUEST_CPU_BUCKETS,
    RETIRED_NONE, SCENARIO_NONE, SCENARIO_SLOTS,
};
use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{
            bpf_probe_read_kernel_str as probe_read_kernel_str,
            bpf_probe_read_user as probe_read_user,
        },
    },
    macros::{btf_tracepoint, map, uprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, Stack},
    programs::{BtfTracePointContext, ProbeContext},
};

/// Set to 1 by userspace (at load time) to keep CPU time per thread as well.
#[unsafe(no_mangle)]
static TRACK_THREADS: u8 = 0;

/// Set to 0 by userspace (at load time) to keep no per-request CPU histogram
/// (the benchmark measures the marker uprobes with and without it).
#[unsafe(no_mangle)]
static REQUEST_HISTOGRAM: u8 = 1;

/// Byte offsets into `struct task_struct` (`agent_common::OFFSET_*`), resolved
/// by userspace from the running kernel's BTF and patched in at load time.
/// The verifier sees them as constants (read-only, frozen), so the programs
/// read task fields with direct loads from the tracepoints' BTF pointers.
#[unsafe(no_mangle)]
static TASK_OFFSETS: [u32; OFFSET_SLOTS] = [0; OFFSET_SLOTS];

/// Where each CPU's paravirtual steal clock is, from the running kernel's
/// BTF (read-only; `enabled` 0 where the kernel has none).
#[unsafe(no_mangle)]
static STEAL_CLOCK: StealClockOffsets = StealClockOffsets {
    enabled: 0,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    _pad: 0,
    rq_to_steal: 0,
};

/// Where the exec program finds the new program's path and arguments, from
/// the running kernel's BTF (read-only; `enabled` 0 where it has none).
#[unsafe(no_mangle)]
static EXEC_OFFSETS: ExecOffsets = ExecOffsets {
    enabled: 0,
    task_mm: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    mm_exe_file: 0,
    file_path_mnt: 0,
    file_path_dentry: 0,
    dentry_parent: 0,
    dentry_name: 0,
    vfsmount_root: 0,
    mount_mnt: 0,
    mount_parent: 0,
    mount_mountpoint: 0,
    _pad: 0,
};

/// Where a task's cgroup v2 id is, from the running kernel's BTF
/// (read-only; `enabled` 0 where it has none).
#[unsafe(no_mangle)]
static CGROUP_OFFSETS: CgroupOffsets = CgroupOffsets {
    enabled: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    _pad: 0,
};

/// CLOCK_MONOTONIC at load time: a thread that started later has all of its
/// runtime in the accounted period; an older one only what it runs from the
/// first time it is seen.
#[unsafe(no_mangle)]
static LOAD_KTIME_NS: u64 = 0;

/// `TASK_DEAD` in `prev_state`: the task's final switch.
const TASK_DEAD: u64 = 0x80;

/// Per CPU: idle time and the marks it and the marker estimates run from
/// (one entry, one lookup).
#[map]
static CPU_CLOCK: PerCpuArray<CpuClock> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0 set to 1 by userspace once marker uprobes are attached: from then
/// on every switch takes a clock reading for the markers' slice estimates.
#[map]
static MARKERS_FOLLOWED: Array<u32> = Array::with_max_entries(1, 0);

/// The per-process CPU table (see `agent::sources::sched::proc_cpu_table`):
/// each (process, scenario) key owns a row, handed out here from
/// `PROC_CPU_FREE_ROWS` on the key's first charge and given back by
/// userspace once the process has exited and its last figures are read.
#[map]
static PROC_CPU_ROW: HashMap<ProcScenarioKey, u32> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Rows not owned by any key (filled by userspace before the programs attach).
#[map]
static PROC_CPU_FREE_ROWS: Stack<u32> = Stack::with_max_entries(MAX_PROCESSES, 0);

/// The key owning each row (tgid 0: free); userspace maps it.
#[map]
static PROC_CPU_ROW_KEYS: Array<ProcScenarioKey> =
    Array::with_max_entries(MAX_PROCESSES, BPF_F_MMAPABLE);

/// Cumulative CPU ns of each row on each CPU, at `cpu * MAX_PROCESSES + row`:
/// every CPU adds to its own region only. Sized by userspace at load for the
/// possible CPUs, and mapped by it, so a window reads it without a syscall.
#[map]
static PROC_CPU_NS: Array<u64> = Array::with_max_entries(MAX_PROCESSES, BPF_F_MMAPABLE);

/// CPU time per thread, keyed by pid_tgid (tgid << 32 | tid); only with TRACK_THREADS.
#[map]
static THREAD_CPU_NS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(MAX_THREADS, 0);

/// Runtime baseline and scenario of each thread seen, keyed by tid; removed
/// at the thread's final switch.
#[map]
pub(crate) static THREAD_STATE: HashMap<u32, ThreadState> =
    HashMap::with_max_entries(MAX_THREADS, 0);

/// Completed transactions (`sci_scenario_end(s, ok != 0)`) per process and scenario.
#[map]
static TXN_COMPLETED: PerCpuHashMap<ProcScenarioKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

/// CPU time of each marker-bracketed request, per process and scenario, in
/// log-linear buckets (agent_common::request_cpu; allocated on first use:
/// few processes use markers).
#[map]
static REQUEST_CPU: PerCpuHashMap<ProcScenarioKey, RequestCpuBuckets> =
    PerCpuHashMap::with_max_entries(MAX_REQUEST_HISTOGRAMS, BPF_F_NO_PREALLOC);

/// One all-zero histogram, never written: the initial value of new entries.
#[map]
static REQUEST_CPU_EMPTY: Array<RequestCpuBuckets> = Array::with_max_entries(1, 0);

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(PROC_EVENTS_BYTES, 0);
const PROC_EVENTS_BYTES: u32 = 1 << 21;
/// Past this much unread data an event wakes the reader whatever its kind,
/// so a burst of execs never fills the ring before the reader's next poll.
const PROC_EVENTS_WAKE_BYTES: u64 = (PROC_EVENTS_BYTES / 4) as u64;

/// Slot 0 set to 1 by userspace while exec'd programs must be read from
/// procfs even when the kernel described them (the `SCI_*` environment,
/// read only when a scenario rule uses it): each exec then wakes the reader.
#[map]
static EXEC_READS_PROCFS: Array<u32> = Array::with_max_entries(1, 0);

/// Slot 0 set to 1 by userspace while a `cmdline` rule exists: each
/// process's exit then carries its argument area (its title, see
/// `agent_common::ExecEvent`).
#[map]
static EXIT_READS_TITLE: Array<u32> = Array::with_max_entries(1, 0);

const EEXIST: i32 = -17;

#[inline(always)]
fn offset(slot: usize) -> usize {
    // SAFETY: a read-only global patched by the loader; volatile so the
    // compiled-in zero is not folded.
    unsafe { core::ptr::read_volatile(&TASK_OFFSETS[slot]) as usize }
}

/// Direct load of a task field from a BTF task pointer (checked by the
/// verifier against the kernel's BTF; faults are caught by the JIT).
#[inline(always)]
unsafe fn task_field<T: Copy>(task: *const u8, slot: usize) -> T {
    unsafe { core::ptr::read_volatile(task.add(offset(slot)) as *const T) }
}

/// The same through bpf_probe_read_kernel, for a task address that is a plain
/// number (bpf_get_current_task in a uprobe).
#[inline(always)]
fn current_task_field<T: Copy + Default>(slot: usize) -> T {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel(task.wrapping_add(offset(slot)) as *const T) }
        .unwrap_or_default()
}

/// This CPU's paravirtual steal clock (ns the hypervisor kept the CPU from
/// running), read live: the hypervisor updates it before the CPU runs again.
/// 0 where there is none. The address is found once per CPU from the running
/// task's runqueue and kept in `clock`.
#[inline(always)]
fn steal_now_ns(clock: &mut CpuClock) -> u64 {
    // SAFETY: a read-only global patched by the loader.
    let steal = unsafe { core::ptr::read_volatile(&STEAL_CLOCK) };
    if steal.enabled == 0 {
        return 0;
    }
    if clock.steal_addr == 0 {
        let task = unsafe { bpf_get_current_task() } as *const u8;
        // SAFETY: the helper checks each address.
        let cfs_rq: u64 = unsafe {
            bpf_probe_read_kernel(task.wrapping_add(steal.task_cfs_rq as usize) as *const u64)
        }
        .unwrap_or(0);
        if cfs_rq == 0 {
            return 0;
        }
        let rq: u64 = unsafe {
            bpf_probe_read_kernel(
                (cfs_rq as *const u8).wrapping_add(steal.cfs_rq_rq as usize) as *const u64
            )
        }
        .unwrap_or(0);
        if rq == 0 {
            return 0;
        }
        clock.steal_addr = rq.wrapping_add(steal.rq_to_steal as u64);
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(clock.steal_addr as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn count_loss(slot: u32, amount: u64) {
    if let Some(counter) = LOSSES.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe { *counter += amount };
    }
}

#[inline(always)]
pub(crate) fn add_to<K>(map: &PerCpuHashMap<K, u64>, key: &K, amount: u64) -> Result<(), ()> {
    if let Some(value) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; no other writer while we run.
        unsafe { *value += amount };
        return Ok(());
    }
    match map.insert(key, &amount, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        // Another CPU inserted the key between our lookup and insert.
        Err(e) if e == EEXIST => match map.get_ptr_mut(key) {
            Some(value) => {
                // SAFETY: as above.
                unsafe { *value += amount };
                Ok(())
            }
            None => Err(()),
        },
        Err(_) => Err(()),
    }
}

/// The row of `key` in the per-process CPU table, taken from the free rows
/// on its first charge; None when no row is free.
#[inline(always)]
fn proc_cpu_row(key: &ProcScenarioKey) -> Option<u32> {
    // SAFETY: a plain u32 value, copied out at once.
    if let Some(row) = unsafe { PROC_CPU_ROW.get(key) } {
        return Some(*row);
    }
    let row = PROC_CPU_FREE_ROWS.pop().ok().flatten()?;
    match PROC_CPU_ROW.insert(key, &row, BPF_NOEXIST as u64) {
        Ok(()) => {
            if let Some(owner) = PROC_CPU_ROW_KEYS.get_ptr_mut(row) {
                // SAFETY: a row just taken from the free rows: ours alone.
                unsafe { core::ptr::write_volatile(owner, *key) };
            }
            Some(row)
        }
        Err(e) => {
            let _ = PROC_CPU_FREE_ROWS.push(row, 0);
            // Another CPU gave the key a row between our lookup and insert.
            if e == EEXIST {
                // SAFETY: as above.
                unsafe { PROC_CPU_ROW.get(key) }.copied()
            } else {
                None
            }
        }
    }
}

/// Charge `cpu_ns` of thread `tid` of process `tgid` to `scenario`.
#[inline(always)]
fn charge(tgid: u32, tid: u32, scenario: u32, cpu_ns: u64) {
    if cpu_ns == 0 {
        return;
    }
    let key = ProcScenarioKey { tgid, scenario };
    let cell = proc_cpu_row(&key).and_then(|row| {
        // SAFETY: a helper with no arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        PROC_CPU_NS.get_ptr_mut(cpu.wrapping_mul(MAX_PROCESSES).wrapping_add(row))
    });
    match cell {
        // SAFETY: this CPU's cell; no other writer while we run.
        Some(cell) => unsafe { *cell += cpu_ns },
        None => {
            count_loss(LOSS_PROC_MAP_FULL_EVENTS, 1);
            count_loss(LOSS_PROC_MAP_FULL_NS, cpu_ns);
        }
    }
    // SAFETY: a read-only global patched by the loader.
    if unsafe { core::ptr::read_volatile(&TRACK_THREADS) } != 0 {
        let pid_tgid = (u64::from(tgid) << 32) | u64::from(tid);
        if add_to(&THREAD_CPU_NS, &pid_tgid, cpu_ns).is_err() {
            count_loss(LOSS_THREAD_MAP_FULL, 1);
        }
    }
}

/// The runtime baseline of a thread seen for the first time.
#[inline(always)]
fn first_baseline(runtime_ns: u64, start_time_ns: u64) -> u64 {
    // SAFETY: a read-only global patched by the loader.
    let load_ns = unsafe { core::ptr::read_volatile(&LOAD_KTIME_NS) };
    if start_time_ns >= load_ns {
        0
    } else {
        runtime_ns
    }
}

#[inline(always)]
fn markers_followed() -> bool {
    MARKERS_FOLLOWED.get(0).is_some_and(|v| *v != 0)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// sched_switch(preempt, prev, next, prev_state): the scheduler has just
/// brought `prev`'s `se.sum_exec_runtime` up to date (update_curr on
/// put_prev/dequeue), so its growth since the last charge is exactly the
/// runtime the kernel accounts (schedstat, cgroup cpu.stat): it excludes
/// steal time, unlike the wall clock between two switches.
fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    // Argument positions are checked against the kernel's BTF at load time.
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    // SAFETY: BTF task pointers given by the tracepoint.
    let tid: i32 = unsafe { task_field(prev, OFFSET_PID) };
    let next_tid: i32 = unsafe { task_field(next, OFFSET_PID) };
    let followed = markers_followed();
    if tid == 0 || next_tid == 0 || followed {
        if let Some(clock) = CPU_CLOCK.get_ptr_mut(0) {
            // SAFETY: per-CPU slot of this CPU; no other writer while we run.
            let clock = unsafe { &mut *clock };
            // Idle time on the scheduler's task clock, without a clock
            // helper: the task going to sleep had its runtime (and
            // exec_start) brought up to now on its way out, the task leaving
            // idle had exec_start set to now on its way in.
            if next_tid == 0 {
                clock.idle_since_ns = unsafe { task_field(prev, OFFSET_EXEC_START) };
            } else if tid == 0 {
                let now_ns: u64 = unsafe { task_field(next, OFFSET_EXEC_START) };
                if clock.idle_since_ns != 0 && now_ns > clock.idle_since_ns {
                    clock.idle_ns += now_ns - clock.idle_since_ns;
                }
                clock.idle_since_ns = 0;
            }
            if followed {
                clock.mark_ns = unsafe { bpf_ktime_get_ns() };
                clock.mark_steal_ns = steal_now_ns(clock);
            }
        }
    }
    if tid == 0 {
        return Ok(0);
    }
    let tid = tid as u32;
    // SAFETY: as above.
    let tgid: i32 = unsafe { task_field(prev, OFFSET_TGID) };
    let runtime_ns: u64 = unsafe { task_field(prev, OFFSET_RUNTIME) };
    let dead = prev_state & TASK_DEAD != 0;
    settle(prev, tgid as u32, tid, runtime_ns, !dead);
    if dead {
        let _ = THREAD_STATE.remove(&tid);
    }
    Ok(0)
}

/// Charges thread `tid` (at BTF pointer `task`) the growth of its runtime
/// (`runtime_ns`, its `se.sum_exec_runtime` now) since its last charge, and
/// makes that its baseline; a thread never seen gets a state (when `keep`)
/// from [`first_baseline`]. Runs as the thread itself (its switch-out, or a
/// cgroup move it makes of itself): only such code writes its entry.
#[inline(always)]
fn settle(task: *const u8, tgid: u32, tid: u32, runtime_ns: u64, keep: bool) {
    let (cpu_ns, scenario) = match THREAD_STATE.get_ptr_mut(&tid) {
        Some(state) => {
            // SAFETY: this thread's entry (see above).
            let state = unsafe { &mut *state };
            let grown = runtime_ns.saturating_sub(state.runtime_ns);
            let rest = grown.saturating_sub(state.precharged_ns);
            state.runtime_ns = runtime_ns;
            state.precharged_ns = 0;
            state.charged_ns += rest;
            (rest, state.scenario)
        }
        None => {
            // SAFETY: a BTF task pointer.
            let start_ns: u64 = unsafe { task_field(task, OFFSET_START_TIME) };
            let baseline = first_baseline(runtime_ns, start_ns);
            if keep {
                let state = ThreadState {
                    runtime_ns,
                    precharged_ns: 0,
                    scenario: SCENARIO_NONE,
                    _pad: 0,
                    charged_ns: runtime_ns - baseline,
                    request_start_ns: 0,
                };
                if THREAD_STATE.insert(&tid, &state, 0).is_err() {
                    count_loss(LOSS_THREAD_STATE_FULL, 1);
                }
            }
            (runtime_ns - baseline, SCENARIO_NONE)
        }
    };
    charge(tgid, tid, scenario, cpu_ns);
}

/// The cgroup v2 id of the task at `task` (0 when it cannot be read).
#[inline(always)]
fn task_cgroup_id(task: u64) -> u64 {
    // SAFETY: a read-only global patched by the loader.
    let offsets = unsafe { core::ptr::read_volatile(&CGROUP_OFFSETS) };
    if offsets.enabled == 0 {
        return 0;
    }
    let group = task_cgroup(task, &offsets);
    if group == 0 {
        return 0;
    }
    let kn = kernel_pointer(group, offsets.cgroup_kn);
    if kn == 0 {
        return 0;
    }
    kernel_pointer(kn, offsets.kernfs_node_id)
}

/// The task's group in the v2 hierarchy (`task->cgroups->dfl_cgrp`), 0 when unknown.
#[inline(always)]
fn task_cgroup(task: u64, offsets: &CgroupOffsets) -> u64 {
    let css_set = kernel_pointer(task, offsets.task_cgroups);
    if css_set == 0 {
        return 0;
    }
    kernel_pointer(css_set, offsets.css_set_dfl_cgrp)
}

/// Sends a fork, rename or exit event without waking the reader: they wait
/// for its next wake-up (an exec that needs procfs, the reader's 1 s poll,
/// or the window's close), which spares a context switch per event; past
/// `PROC_EVENTS_WAKE_BYTES` of unread data the event wakes it.
#[inline(always)]
fn send_event(event: &ProcEvent) {
    let flags = if PROC_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > PROC_EVENTS_WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    if PROC_EVENTS.output::<ProcEvent>(event, flags).is_err() {
        count_loss(LOSS_RINGBUF_FULL, 1);
    }
}

#[inline(always)]
fn emit_proc_event(kind: u32) -> Result<u32, u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    // Only the group leader's exit ends the process (a thread's state goes at
    // its final switch).
    if kind == PROC_EVENT_EXIT && tid != tgid {
        return Ok(0);
    }
    send_event(&ProcEvent {
        kind,
        tgid,
        tid,
        ppid: 0,
        origin_tgid: 0,
        _pad: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    });
    Ok(0)
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    match try_sched_process_exec() {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// The exec event, with the new program's path and arguments read here
/// (see `agent_common::ExecEvent`). The reader is woken only when it must
/// still read procfs while the process lives (something was not carried,
/// or the environment is wanted) or when the ring is filling up.
fn try_sched_process_exec() -> Result<u32, u32> {
    let Some(mut entry) = PROC_EVENTS.reserve::<ExecEvent>(0) else {
        count_loss(LOSS_RINGBUF_FULL, 1);
        return Ok(0);
    };
    let event = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `event` points to the reserved record, written field by field
    // before it is submitted.
    let described = unsafe {
        (*event).header = ProcEvent {
            kind: PROC_EVENT_EXEC,
            tgid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            ppid: 0,
            origin_tgid: 0,
            _pad: 0,
            ktime_ns: bpf_ktime_get_ns(),
            cgroup_id: bpf_get_current_cgroup_id(),
            comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        };
        (*event).exe_len = 0;
        (*event).args_len = 0;
        (*event).args_total = 0;
        describe_exec(&mut *event)
    };
    let procfs_wanted = EXEC_READS_PROCFS.get(0).is_some_and(|on| *on != 0);
    let wake = !described
        || procfs_wanted
        || PROC_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > PROC_EVENTS_WAKE_BYTES;
    entry.submit(if wake {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    });
    Ok(0)
}

/// A kernel pointer at `addr + offset` (0 when it cannot be read).
#[inline(always)]
fn kernel_pointer(addr: u64, offset: u32) -> u64 {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel((addr + offset as u64) as *const u64) }.unwrap_or(0)
}

/// Fills the event's path and arguments from the current task (the new
/// program); true when both are complete.
#[inline(always)]
unsafe fn describe_exec(event: &mut ExecEvent) -> bool {
    // SAFETY: a read-only global patched by the loader.
    let offsets = unsafe { core::ptr::read_volatile(&EXEC_OFFSETS) };
    if offsets.enabled == 0 {
        return false;
    }
    let task = unsafe { bpf_get_current_task() };
    let mm = kernel_pointer(task, offsets.task_mm);
    if mm == 0 {
        return false;
    }
    let args_complete = read_args(event, &offsets, mm);
    let exe_file = kernel_pointer(mm, offsets.mm_exe_file);
    if exe_file == 0 {
        return false;
    }
    let exe_len = exe_path(event, &offsets, exe_file);
    event.exe_len = exe_len;
    args_complete && exe_len != 0
}

/// The argument vector (`mm->arg_start..arg_end`, NUL-separated, as
/// /proc/PID/cmdline has it), whole or its first `EXEC_ARGS_BYTES`.
#[inline(always)]
fn read_args(event: &mut ExecEvent, offsets: &ExecOffsets, mm: u64) -> bool {
    let start = kernel_pointer(mm, offsets.mm_arg_start);
    let end = kernel_pointer(mm, offsets.mm_arg_end);
    if end <= start {
        return false;
    }
    let total = end - start;
    event.args_total = total;
    let len = if total > EXEC_ARGS_BYTES as u64 {
        EXEC_ARGS_BYTES as u32
    } else {
        total as u32
    };
    // Masked again so the verifier sees the bound it checks the buffer against.
    let len = len & (2 * EXEC_ARGS_BYTES as u32 - 1);
    if len == 0 || len > EXEC_ARGS_BYTES as u32 {
        return false;
    }
    // SAFETY: the helper checks the user address; the buffer holds `len` bytes.
    let read = unsafe {
        probe_read_user(
            event.args.as_mut_ptr().cast(),
            len,
            start as *const core::ffi::c_void,
        )
    };
    if read != 0 {
        return false;
    }
    event.args_len = len;
    total <= EXEC_ARGS_BYTES as u64
}

/// Scratch for the exec program's path walk: per step, the name of the
/// directory entry climbed (0 for a step that crossed a mount).
#[map]
static EXEC_PATH_STEPS: PerCpuArray<[u64; EXEC_PATH_DEPTH]> = PerCpuArray::with_max_entries(1, 0);

/// The path of `file` from the root, rebuilt as `d_path` does (see
/// `agent_common::ExecOffsets`); its length, or 0 when it does not fit.
///
/// Two loops, so that the verifier's states converge: the walk records one
/// entry per step whatever the step did (the step index is the loop's own),
/// then the names are written root first.
#[inline(always)]
fn exe_path(event: &mut ExecEvent, offsets: &ExecOffsets, file: u64) -> u32 {
    let Some(steps) = EXEC_PATH_STEPS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch entry; nothing else runs on this CPU meanwhile.
    let steps = unsafe { &mut *steps };
    let mut dentry = kernel_pointer(file, offsets.file_path_dentry);
    let mut vfsmount = kernel_pointer(file, offsets.file_path_mnt);
    let mut mount = vfsmount.wrapping_sub(offsets.mount_mnt as u64);
    let mut reached_root = false;
    for step in steps.iter_mut() {
        let mut name = 0;
        if !reached_root {
            if dentry == 0 || vfsmount == 0 {
                return 0;
            }
            let mount_root = kernel_pointer(vfsmount, offsets.vfsmount_root);
            let parent = kernel_pointer(dentry, offsets.dentry_parent);
            if dentry == mount_root || dentry == parent {
                let mount_parent = kernel_pointer(mount, offsets.mount_parent);
                if mount_parent == mount || mount_parent == 0 {
                    reached_root = true;
                } else {
                    dentry = kernel_pointer(mount, offsets.mount_mountpoint);
                    mount = mount_parent;
                    vfsmount = mount + offsets.mount_mnt as u64;
                }
            } else {
                name = kernel_pointer(dentry, offsets.dentry_name);
                dentry = parent;
            }
        }
        *step = name;
    }
    if !reached_root {
        return 0;
    }
    let mut len = 0u32;
    // Every step, last (nearest the root) first; steps past the root hold 0.
    for i in 0..EXEC_PATH_DEPTH {
        let Some(name) = steps.get(EXEC_PATH_DEPTH - 1 - i).copied() else {
            return 0;
        };
        if name == 0 {
            continue;
        }
        if len >= EXEC_PATH_BYTES as u32 - 1 {
            return 0;
        }
        let at = (len & (EXEC_PATH_BYTES as u32 - 1)) as usize;
        // SAFETY: `at` < EXEC_PATH_BYTES, inside the buffer.
        unsafe { *event.exe.as_mut_ptr().add(at) = b'/' };
        let at = ((len + 1) & (EXEC_PATH_BYTES as u32 - 1)) as usize;
        // SAFETY: `at` < EXEC_PATH_BYTES and the buffer has EXEC_NAME_BYTES
        // more; the helper checks the kernel address and stops at the NUL.
        let copied = unsafe {
            probe_read_kernel_str(
                event.exe.as_mut_ptr().add(at).cast(),
                EXEC_NAME_BYTES as u32,
                name as *const core::ffi::c_void,
            )
        };
        if copied <= 1 {
            return 0;
        }
        // `copied` counts the NUL, which the next '/' overwrites.
        len += copied as u32;
    }
    if len == 0 || len >= EXEC_PATH_BYTES as u32 {
        return 0;
    }
    len
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> u32 {
    if EXIT_READS_TITLE.get(0).is_some_and(|on| *on != 0) {
        return exit_with_title();
    }
    match emit_proc_event(PROC_EVENT_EXIT) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

/// A process's exit with its argument area as it left it (its title): the
/// tracepoint runs before the exiting task lets its memory go.
fn exit_with_title() -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tid != tgid {
        return 0;
    }
    let Some(mut entry) = PROC_EVENTS.reserve::<ExecEvent>(0) else {
        count_loss(LOSS_RINGBUF_FULL, 1);
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to the reserved record, written field by field
    // before it is submitted.
    unsafe {
        (*event).header = ProcEvent {
            kind: PROC_EVENT_EXIT,
            tgid,
            tid,
            ppid: 0,
            origin_tgid: 0,
            _pad: 0,
            ktime_ns: bpf_ktime_get_ns(),
            cgroup_id: bpf_get_current_cgroup_id(),
            comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        };
        (*event).exe_len = 0;
        (*event).args_len = 0;
        (*event).args_total = 0;
        let offsets = core::ptr::read_volatile(&EXEC_OFFSETS);
        if offsets.enabled != 0 {
            let mm = kernel_pointer(bpf_get_current_task(), offsets.task_mm);
            if mm != 0 {
                read_args(&mut *event, &offsets, mm);
            }
        }
    }
    let flags = if PROC_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > PROC_EVENTS_WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    entry.submit(flags);
    0
}

/// sched_process_fork(parent, child), in the forking task's context: a new
/// process (not a thread) is announced with its true parent and the process
/// it is a copy of, so userspace describes it without reading procfs.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> u32 {
    match try_sched_process_fork(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_sched_process_fork(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    let child: *const u8 = ctx.arg(1);
    // SAFETY: BTF task pointers.
    let tid: i32 = unsafe { task_field(child, OFFSET_PID) };
    let tgid: i32 = unsafe { task_field(child, OFFSET_TGID) };
    if tid != tgid {
        return Ok(0);
    }
    let parent: *const u8 = unsafe { task_field(child, OFFSET_REAL_PARENT) };
    let ppid: i32 = unsafe { task_field(parent, OFFSET_TGID) };
    send_event(&ProcEvent {
        kind: PROC_EVENT_FORK,
        tgid: tgid as u32,
        tid: tid as u32,
        ppid: ppid as u32,
        origin_tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: match task_cgroup_id(child as u64) {
            0 => unsafe { bpf_get_current_cgroup_id() },
            id => id,
        },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    });
    Ok(0)
}

/// cgroup_attach_task(dst_cgrp, path, task, threadgroup), in the mover's
/// context once the move is done. A move in the v2 hierarchy (the task's
/// `dfl_cgrp` is now `dst_cgrp`; moves in v1 hierarchies are left alone):
/// the process's rows are retired, so what it ran before the move stays
/// there and its next charge opens fresh rows; the event names them and the
/// destination. A task moving itself (`echo 0 > cgroup.procs`, cgexec) is
/// first charged what the kernel accounted to it so far, which the kernel
/// gave the group it left.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: BtfTracePointContext) -> u32 {
    match try_cgroup_attach_task(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_cgroup_attach_task(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    // SAFETY: a read-only global patched by the loader.
    let offsets = unsafe { core::ptr::read_volatile(&CGROUP_OFFSETS) };
    if offsets.enabled == 0 {
        return Ok(0);
    }
    let dst: u64 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let task: *const u8 = ctx.arg(2);
    if task_cgroup(task as u64, &offsets) != dst {
        return Ok(0);
    }
    // SAFETY: a BTF task pointer.
    let tid: i32 = unsafe { task_field(task, OFFSET_PID) };
    let tgid: i32 = unsafe { task_field(task, OFFSET_TGID) };
    let (tid, tgid) = (tid as u32, tgid as u32);
    if task as u64 == unsafe { bpf_get_current_task() } {
        let runtime_ns: u64 = unsafe { task_field(task, OFFSET_RUNTIME) };
        settle(task, tgid, tid, runtime_ns, true);
    }
    let Some(mut entry) = PROC_EVENTS.reserve::<CgroupEvent>(0) else {
        count_loss(LOSS_RINGBUF_FULL, 1);
        return Ok(0);
    };
    let event = entry.as_mut_ptr();
    let kn = kernel_pointer(dst, offsets.cgroup_kn);
    // SAFETY: `event` points to the reserved record, written field by field
    // before it is submitted.
    unsafe {
        (*event).header = ProcEvent {
            kind: PROC_EVENT_CGROUP,
            tgid,
            tid,
            ppid: 0,
            origin_tgid: 0,
            _pad: 0,
            ktime_ns: bpf_ktime_get_ns(),
            cgroup_id: if kn == 0 {
                0
            } else {
                kernel_pointer(kn, offsets.kernfs_node_id)
            },
            comm: [0u8; 16],
        };
        let mut slot = 0u32;
        for retired in (*event).retired_rows.iter_mut() {
            *retired = retire_row(tgid, slot);
            slot += 1;
        }
        let copied = probe_read_kernel_str(
            (*event).path.as_mut_ptr().cast(),
            CGROUP_PATH_BYTES as u32,
            path as *const core::ffi::c_void,
        );
        (*event).path_len = if copied > 1 { copied as u32 - 1 } else { 0 };
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    Ok(0)
}

/// Takes the row of (`tgid`, `scenario`) from the key (its next charge
/// opens a fresh row); the row, or `RETIRED_NONE`.
#[inline(always)]
fn retire_row(tgid: u32, scenario: u32) -> u32 {
    let key = ProcScenarioKey { tgid, scenario };
    // SAFETY: a plain u32 value, copied out at once.
    match unsafe { PROC_CPU_ROW.get(&key) }.copied() {
        Some(row) => {
            if PROC_CPU_ROW.remove(&key).is_ok() {
                row
            } else {
                RETIRED_NONE
            }
        }
        None => RETIRED_NONE,
    }
}

/// task_rename(task, comm): a process's main thread takes a new name
/// (`prctl(PR_SET_NAME)`, exec), which `comm` rules must see.
#[btf_tracepoint(function = "task_rename")]
pub fn task_rename(ctx: BtfTracePointContext) -> u32 {
    match try_task_rename(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_task_rename(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    let task: *const u8 = ctx.arg(0);
    let name: *const u8 = ctx.arg(1);
    // SAFETY: a BTF task pointer.
    let tid: i32 = unsafe { task_field(task, OFFSET_PID) };
    let tgid: i32 = unsafe { task_field(task, OFFSET_TGID) };
    if tid != tgid {
        return Ok(0);
    }
    let mut comm = [0u8; 16];
    // SAFETY: the helper checks the address and stops at 16 bytes.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(name, &mut comm) };
    send_event(&ProcEvent {
        kind: PROC_EVENT_RENAME,
        tgid: tgid as u32,
        tid: tid as u32,
        ppid: 0,
        origin_tgid: 0,
        _pad: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: 0,
        comm,
    });
    Ok(0)
}

/// At a marker call: charge the calling thread's time since the start of its
/// slice (or its previous marker call) to the scenario it was serving, and
/// return its state so the caller can change the scenario. The charge is the
/// wall clock minus the steal clock over the interval, which is how the
/// scheduler's task clock advances (the kernel updates `sum_exec_runtime`
/// only at ticks and switches); the switch-out charges the rest of the
/// runtime growth, so the thread's total stays the kernel's runtime.
#[inline(always)]
fn charge_at_marker(pid_tgid: u64) -> Option<*mut ThreadState> {
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut elapsed_ns = 0;
    if let Some(clock) = CPU_CLOCK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU.
        let clock = unsafe { &mut *clock };
        let steal_ns = steal_now_ns(clock);
        let (previous, previous_steal) = (clock.mark_ns, clock.mark_steal_ns);
        clock.mark_ns = now;
        clock.mark_steal_ns = steal_ns;
        if previous != 0 && now > previous {
            elapsed_ns = now - previous;
            if previous_steal != 0 && steal_ns > previous_steal {
                elapsed_ns = elapsed_ns.saturating_sub(steal_ns - previous_steal);
            }
        }
    }
    if THREAD_STATE.get_ptr_mut(&tid).is_none() {
        let runtime_ns: u64 = current_task_field(OFFSET_RUNTIME);
        let start_ns: u64 = current_task_field(OFFSET_START_TIME);
        let state = ThreadState {
            runtime_ns: first_baseline(runtime_ns, start_ns),
            precharged_ns: 0,
            scenario: SCENARIO_NONE,
            _pad: 0,
            charged_ns: 0,
            request_start_ns: 0,
        };
        if THREAD_STATE
            .insert(&tid, &state, BPF_NOEXIST as u64)
            .is_err()
        {
            count_loss(LOSS_SCENARIO_MAP_FULL, 1);
        }
    }
    let state = THREAD_STATE.get_ptr_mut(&tid)?;
    // SAFETY: this thread's own entry (see try_sched_switch).
    let scenario = unsafe { (*state).scenario };
    unsafe { (*state).precharged_ns += elapsed_ns };
    unsafe { (*state).charged_ns += elapsed_ns };
    charge(tgid, tid, scenario, elapsed_ns);
    Some(state)
}

/// Adds one request of `cpu_ns` to the histogram of `key` (this CPU's copy).
#[inline(always)]
fn add_request(key: &ProcScenarioKey, cpu_ns: u64) -> Result<(), ()> {
    let bucket = request_cpu_bucket(cpu_ns);
    if REQUEST_CPU.get_ptr_mut(key).is_none() {
        // The empty histogram is larger than a BPF stack frame may hold: it
        // is inserted from a map value.
        let empty = REQUEST_CPU_EMPTY.get(0).ok_or(())?;
        match REQUEST_CPU.insert(key, empty, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == EEXIST => {}
            Err(_) => return Err(()),
        }
    }
    let buckets = REQUEST_CPU.get_ptr_mut(key).ok_or(())?;
    if bucket < REQUEST_CPU_BUCKETS {
        // SAFETY: this CPU's value of a live entry; no other writer while we run.
        unsafe {
            (*buckets).counts[bucket] += 1;
            (*buckets).sum_cpu_ns += cpu_ns;
        }
    }
    Ok(())
}

/// uprobe on `sci_scenario_begin(uint32_t scenario)` of libsci_marker.
#[uprobe]
pub fn scenario_begin(ctx: ProbeContext) -> u32 {
    match try_scenario_begin(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_scenario_begin(ctx: &ProbeContext) -> Result<u32, u32> {
    let scenario: u32 = ctx.arg(0).ok_or(1u32)?;
    if scenario == SCENARIO_NONE || scenario >= SCENARIO_SLOTS {
        return Ok(0);
    }
    if let Some(state) = charge_at_marker(bpf_get_current_pid_tgid()) {
        // SAFETY: this thread's own entry.
        unsafe {
            (*state).scenario = scenario;
            (*state).request_start_ns = (*state).charged_ns;
        }
    }
    Ok(0)
}

/// uprobe on `sci_scenario_end(uint32_t scenario, int ok)` of libsci_marker.
#[uprobe]
pub fn scenario_end(ctx: ProbeContext) -> u32 {
    match try_scenario_end(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_scenario_end(ctx: &ProbeContext) -> Result<u32, u32> {
    let scenario: u32 = ctx.arg(0).ok_or(1u32)?;
    let ok: u32 = ctx.arg(1).ok_or(1u32)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    // The request's CPU time, when its begin was seen on this thread.
    let mut request_cpu_ns = None;
    if let Some(state) = charge_at_marker(pid_tgid) {
        // SAFETY: this thread's own entry.
        let state = unsafe { &mut *state };
        if state.scenario == scenario {
            request_cpu_ns = Some(state.charged_ns.saturating_sub(state.request_start_ns));
        }
        state.scenario = SCENARIO_NONE;
    }
    if ok != 0 && scenario != SCENARIO_NONE && scenario < SCENARIO_SLOTS {
        let key = ProcScenarioKey {
            tgid: (pid_tgid >> 32) as u32,
            scenario,
        };
        if add_to(&TXN_COMPLETED, &key, 1).is_err() {
            count_loss(LOSS_TXN_MAP_FULL, 1);
        }
        // SAFETY: a read-only global patched by the loader.
        let histogram_on = unsafe { core::ptr::read_volatile(&REQUEST_HISTOGRAM) } != 0;
        if let (true, Some(cpu_ns)) = (histogram_on, request_cpu_ns) {
            if add_request(&key, cpu_ns).is_err() {
                count_loss(LOSS_REQUEST_HISTOGRAM_FULL, 1);
            }
        }
    }
    Ok(0)
}
