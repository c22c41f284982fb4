//! Benchmark-only programs (cargo feature `bench`, never in the agent's
//! production object): the baseline that `sci-bench kernel` compares the
//! sched_switch accounting program with.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};

use agent_common::MAX_PROCESSES;

use crate::programs::add_to;

/// The benchmark's baseline: the least a sched_switch accounting program can do.
#[map]
static BARE_LAST_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static BARE_CPU_NS: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

/// The least a sched_switch accounting program can do: the clock, the
/// CPU's previous mark, the pid, one per-CPU hash update.
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
