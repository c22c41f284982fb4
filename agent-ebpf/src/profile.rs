//! CPU profile sampler: a perf_event program attached to the software
//! `cpu-clock` event of every CPU. Each sample stores the interrupted
//! thread's user and kernel stacks in `PROFILE_STACKS` and counts one sample
//! for (process, scenario, user stack, kernel stack) in `PROFILE_COUNTS`.
//! Userspace drains both maps every window. Whatever cannot be recorded is
//! counted in `PROFILE_LOSSES`.
use agent_common::{
    ProfileKey, PROFILE_LOSS_COUNTS_FULL, PROFILE_LOSS_KERNEL_STACK, PROFILE_LOSS_SLOTS,
    PROFILE_LOSS_USER_STACK, PROFILE_MAX_STACKS, SCENARIO_NONE,
};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::{map, perf_event},
    maps::{PerCpuArray, PerCpuHashMap, StackTrace},
    programs::{tracing::StackIdContext, PerfEventContext},
};

use crate::programs::THREAD_STATE;

#[map]
static PROFILE_STACKS: StackTrace = StackTrace::with_max_entries(PROFILE_MAX_STACKS, 0);

/// Samples per key, per CPU (BPF has no atomic add in Rust's core for this
/// target; per-CPU values need none). Userspace sums the CPUs.
#[map]
static PROFILE_COUNTS: PerCpuHashMap<ProfileKey, u64> =
    PerCpuHashMap::with_max_entries(PROFILE_MAX_STACKS, 0);

#[map]
static PROFILE_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROFILE_LOSS_SLOTS, 0);

/// No stack to take: a kernel thread's user stack, or a user-mode sample's kernel stack.
const EFAULT: i32 = -14;
const EEXIST: i32 = -17;

#[inline(always)]
fn count_loss(slot: u32) {
    if let Some(counter) = PROFILE_LOSSES.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot; this program is the only writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn stack_id(ctx: &PerfEventContext, flags: u64, loss_slot: u32) -> i32 {
    match ctx.get_stackid(&PROFILE_STACKS, flags) {
        Ok(id) => id as i32,
        Err(e) => {
            if e != EFAULT {
                count_loss(loss_slot);
            }
            e
        }
    }
}

#[inline(always)]
fn add_one(counter: *mut u64) {
    // SAFETY: this CPU's value of a live map entry; no other writer while we run.
    unsafe { *counter += 1 };
}

#[perf_event]
pub fn cpu_profile(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    if tid == 0 {
        // The idle task: no process to profile.
        return 0;
    }
    // SAFETY: the value is copied out immediately.
    let scenario = unsafe { THREAD_STATE.get(&tid) }
        .map(|state| state.scenario)
        .unwrap_or(SCENARIO_NONE);
    let key = ProfileKey {
        tgid: (pid_tgid >> 32) as u32,
        scenario,
        user_stack_id: stack_id(&ctx, BPF_F_USER_STACK as u64, PROFILE_LOSS_USER_STACK),
        kernel_stack_id: stack_id(&ctx, 0, PROFILE_LOSS_KERNEL_STACK),
    };
    if let Some(count) = PROFILE_COUNTS.get_ptr_mut(&key) {
        add_one(count);
        return 0;
    }
    match PROFILE_COUNTS.insert(&key, 1u64, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU inserted the key between our lookup and insert (its
        // slot for this CPU is zero).
        Err(e) if e == EEXIST => match PROFILE_COUNTS.get_ptr_mut(&key) {
            Some(count) => add_one(count),
            None => count_loss(PROFILE_LOSS_COUNTS_FULL),
        },
        Err(_) => count_loss(PROFILE_LOSS_COUNTS_FULL),
    }
    0
}
