//! eBPF programs of the sci-cf agent.
//!
//! CPU-time accounting invariant: on every CPU, `LAST_ACCOUNTED_NS` holds the
//! last instant up to which that CPU's time has been charged. Every program
//! that runs in a task's context on a CPU (sched_switch for the outgoing
//! task, the marker uprobes for the calling thread) first charges
//! `now - LAST_ACCOUNTED_NS` to the current task and its current scenario,
//! then moves the mark to `now`. Hence a CPU's time is charged exactly once,
//! to whoever was running, and a thread that switches scenario without being
//! switched out is still split exactly at the marker call. Idle (pid 0) time
//! goes to `IDLE_NS`. Userspace closes a window by making every CPU switch
//! (it runs a thread on each CPU in turn), so nothing is left in flight.
//!
//! Nothing is read from kernel structs: only `bpf_get_current_*` helpers.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod profile;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
