//! eBPF programs of the sci-cf agent.
//!
//! CPU time is the kernel's own runtime: at sched_switch the outgoing thread
//! is charged the growth of its `se.sum_exec_runtime` since its last charge
//! (its baseline lives in `THREAD_STATE`, one lookup per switch). Marker
//! uprobes split a running slice by scenario with an estimate of the task
//! clock: wall clock minus the CPU's paravirtual steal clock since
//! `CpuClock::mark_ns` (taken at every switch only while markers are
//! followed), so time the hypervisor took is charged to no scenario; the
//! switch-out charges the rest of the runtime growth, so a thread's total
//! stays the kernel's figure. Idle time is the scheduler's
//! task clock between the switch into idle and the switch out of it, read
//! from the switching tasks' `se.exec_start` (no clock helper). Each thread's
//! state also keeps its cumulative charged time, so a marker-bracketed
//! request's CPU time is the growth between its begin and its end, added to
//! a per-(process, scenario) log-linear histogram (`REQUEST_CPU`) in the kernel.
//!
//! Task fields are read at offsets resolved from the running kernel's BTF at
//! load time (`TASK_OFFSETS`, read-only). Programs used only by the
//! benchmark live in `bench` (cargo feature `bench`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(all(target_arch = "bpf", feature = "bench"))]
mod bench;
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
