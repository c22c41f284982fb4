use agent_common::{
    ProcEvent, ProcScenarioKey, LOSS_PROC_MAP_FULL_EVENTS, LOSS_PROC_MAP_FULL_NS,
    LOSS_RINGBUF_FULL, LOSS_SCENARIO_MAP_FULL, LOSS_SLOTS, LOSS_THREAD_MAP_FULL, LOSS_TXN_MAP_FULL,
    MAX_PROCESSES, MAX_THREADS, PROC_EVENT_EXEC, PROC_EVENT_EXIT, SCENARIO_NONE, SCENARIO_SLOTS,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, map, uprobe},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, ProbeContext},
};

/// Set to 1 by userspace (at load time) to keep CPU time per thread as well.
#[unsafe(no_mangle)]
static TRACK_THREADS: u8 = 0;

#[map]
static LAST_ACCOUNTED_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static IDLE_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PROC_CPU_NS: PerCpuHashMap<ProcScenarioKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

/// CPU time per thread, keyed by pid_tgid (tgid << 32 | tid); only with TRACK_THREADS.
#[map]
static THREAD_CPU_NS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(MAX_THREADS, 0);

/// Scenario a thread is serving, between `sci_scenario_begin` and `sci_scenario_end`.
#[map]
pub(crate) static THREAD_SCENARIO: HashMap<u32, u32> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Completed transactions (`sci_scenario_end(s, ok != 0)`) per process and scenario.
#[map]
static TXN_COMPLETED: PerCpuHashMap<ProcScenarioKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

#[map]
static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// The benchmark's baseline: the least a sched_switch accounting program can do.
#[map]
static BARE_LAST_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static BARE_CPU_NS: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

const EEXIST: i32 = -17;

#[inline(always)]
fn count_loss(slot: u32, amount: u64) {
    if let Some(counter) = LOSSES.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe { *counter += amount };
    }
}

#[inline(always)]
fn add_to<K>(map: &PerCpuHashMap<K, u64>, key: &K, amount: u64) -> Result<(), ()> {
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

/// Charge this CPU's time since its last accounting mark to the current task
/// (in `scenario`), and move the mark to now.
#[inline(always)]
fn charge_current(pid_tgid: u64, scenario: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_ACCOUNTED_NS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot of this CPU.
    let previous = unsafe { *last };
    unsafe { *last = now };
    if previous == 0 || now <= previous {
        return;
    }
    let elapsed_ns = now - previous;
    let tid = pid_tgid as u32;
    if tid == 0 {
        if let Some(idle) = IDLE_NS.get_ptr_mut(0) {
            // SAFETY: per-CPU slot of this CPU.
            unsafe { *idle += elapsed_ns };
        }
        return;
    }
    let key = ProcScenarioKey {
        tgid: (pid_tgid >> 32) as u32,
        scenario,
    };
    if add_to(&PROC_CPU_NS, &key, elapsed_ns).is_err() {
        count_loss(LOSS_PROC_MAP_FULL_EVENTS, 1);
        count_loss(LOSS_PROC_MAP_FULL_NS, elapsed_ns);
    }
    // SAFETY: a read-only global patched by the loader.
    if unsafe { core::ptr::read_volatile(&TRACK_THREADS) } != 0
        && add_to(&THREAD_CPU_NS, &pid_tgid, elapsed_ns).is_err()
    {
        count_loss(LOSS_THREAD_MAP_FULL, 1);
    }
}

#[inline(always)]
fn current_scenario(tid: u32) -> u32 {
    // SAFETY: the value is copied out immediately.
    unsafe { THREAD_SCENARIO.get(&tid) }
        .copied()
        .unwrap_or(SCENARIO_NONE)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_sched_switch(_ctx: &BtfTracePointContext) -> Result<u32, u32> {
    // The outgoing task is still "current" in sched_switch.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let scenario = if tid == 0 {
        SCENARIO_NONE
    } else {
        current_scenario(tid)
    };
    charge_current(pid_tgid, scenario);
    Ok(0)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_bare(ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch_bare(&ctx) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

fn try_sched_switch_bare(_ctx: &BtfTracePointContext) -> Result<u32, u32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let last = BARE_LAST_NS.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: per-CPU slot of this CPU.
    let previous = unsafe { *last };
    unsafe { *last = now };
    if previous == 0 {
        return Ok(0);
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = add_to(&BARE_CPU_NS, &tgid, now - previous);
    Ok(0)
}

#[inline(always)]
fn emit_proc_event(kind: u32) -> Result<u32, u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if kind == PROC_EVENT_EXIT {
        // A thread leaves: forget its scenario; only the group leader's exit ends the process.
        let _ = THREAD_SCENARIO.remove(&tid);
        if tid != tgid {
            return Ok(0);
        }
    }
    let event = ProcEvent {
        kind,
        tgid,
        tid,
        _pad: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    };
    if PROC_EVENTS.output::<ProcEvent>(&event, 0).is_err() {
        count_loss(LOSS_RINGBUF_FULL, 1);
    }
    Ok(0)
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    match emit_proc_event(PROC_EVENT_EXEC) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> u32 {
    match emit_proc_event(PROC_EVENT_EXIT) {
        Ok(ret) => ret,
        Err(ret) => ret,
    }
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
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    charge_current(pid_tgid, current_scenario(tid));
    if THREAD_SCENARIO.insert(&tid, &scenario, 0).is_err() {
        count_loss(LOSS_SCENARIO_MAP_FULL, 1);
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
    let tid = pid_tgid as u32;
    charge_current(pid_tgid, current_scenario(tid));
    let _ = THREAD_SCENARIO.remove(&tid);
    if ok != 0 && scenario != SCENARIO_NONE && scenario < SCENARIO_SLOTS {
        let key = ProcScenarioKey {
            tgid: (pid_tgid >> 32) as u32,
            scenario,
        };
        if add_to(&TXN_COMPLETED, &key, 1).is_err() {
            count_loss(LOSS_TXN_MAP_FULL, 1);
        }
    }
    Ok(0)
}
