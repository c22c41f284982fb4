//! Processes the privileged tests start, and the kernel's own accounting of
//! them (schedstat, /proc/<pid>/stat) that the eBPF figures are checked against.
use std::process::Child;

use sci_agent::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use sci_agent::sources::sched::CpuSample;

/// The kernel's on-CPU time of `pid` (first field of /proc/<pid>/schedstat).
pub fn schedstat_ns(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no run time in {text:?}"))
}

/// The eBPF sampler with default options; panics when it cannot load (the
/// caller has already decided, through `skip_privileged`, that it must).
pub fn load_sampler() -> EbpfSampler {
    EbpfSampler::load(&EbpfOptions::default())
        .unwrap_or_else(|e| panic!("eBPF must load here (root/CI): {e}"))
}

/// CPU time the sample attributes to `pid`, summed over its records.
pub fn cpu_of(sample: &CpuSample, pid: u32) -> u64 {
    sample
        .processes
        .iter()
        .filter(|p| p.pid == pid)
        .map(|p| p.cpu_ns)
        .sum()
}

/// Children of `parent`, from each process's /proc/<pid>/stat.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        panic!("cannot list /proc");
    };
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let ppid = text[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Waits for `pid` (a child) and returns its CPU time from the kernel's rusage.
pub fn wait_rusage_ns(pid: u32) -> u64 {
    let mut status = 0;
    // SAFETY: rusage is plain data written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, pid as i32, "wait4({pid})");
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(usage.ru_utime) + us(usage.ru_stime)) * 1000
}

/// [`wait_rusage_ns`] of a child started with `Command::spawn`.
pub fn wait_child_rusage_ns(child: Child) -> u64 {
    wait_rusage_ns(child.id())
}

/// Child processes killed and reaped when this goes out of scope.
pub struct Reaped(pub Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (by condition, 20 s at most) until every thread of `pid` is
/// stopped (state `T` in /proc/<pid>/task/*/stat), e.g. after SIGSTOP:
/// its runtime no longer grows.
pub fn wait_stopped(pid: u32) {
    crate::wait_until(&format!("every thread of pid {pid} stopped"), || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                    Some(state == 'T')
                })
                .unwrap_or(false)
        })
    });
}
