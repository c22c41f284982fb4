//! Requests of known CPU time, each bracketed by libsci_marker on the main
//! thread: `sci-requests <scenario code>` reads one CPU time in ns per line
//! on stdin, spins each on its thread's CPU clock between
//! sci_scenario_begin and sci_scenario_end, and at exit prints per request
//! "<inner> <outer>": the thread CPU ns of the work alone and of the work
//! with both marker calls (the kernel's figure lies between the two).
use std::io::{BufRead, Write};

use sci_marker::{sci_scenario_begin, sci_scenario_end};
use sci_tests::spin::{spin_thread_cpu_ns, thread_cpu_ns};

fn main() {
    let scenario: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: sci-requests <scenario code> < cpu_ns per line");
            std::process::exit(2)
        });
    let mut work = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap_or_default();
        match line.trim().parse::<u64>() {
            Ok(ns) => work.push(ns),
            Err(_) if line.trim().is_empty() => {}
            Err(e) => {
                eprintln!("sci-requests: {line:?} is not a CPU time in ns: {e}");
                std::process::exit(2)
            }
        }
    }
    let mut truth = Vec::with_capacity(work.len());
    for ns in work {
        let t0 = thread_cpu_ns();
        sci_scenario_begin(scenario);
        let t1 = thread_cpu_ns();
        spin_thread_cpu_ns(ns, 50);
        let t2 = thread_cpu_ns();
        sci_scenario_end(scenario, 1);
        let t3 = thread_cpu_ns();
        truth.push((t2 - t1, t3 - t0));
    }
    let mut out = std::io::stdout().lock();
    for (inner, outer) in truth {
        let _ = writeln!(out, "{inner} {outer}");
    }
}
