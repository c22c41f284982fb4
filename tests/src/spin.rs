//! CPU demand for the test workloads, measured on the kernel's own clocks so
//! that it is exact whatever else runs.
use std::hint::black_box;

/// The time of `clock` (a CPU-time clock such as CLOCK_THREAD_CPUTIME_ID), in ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread (ns).
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Spins until the calling thread has used `ns` more CPU time, reading the
/// clock after every `step` multiply-adds.
pub fn spin_thread_cpu_ns(ns: u64, step: u64) {
    let until = thread_cpu_ns() + ns;
    let mut x = 0u64;
    while thread_cpu_ns() < until {
        for i in 0..step {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    black_box(x);
}
