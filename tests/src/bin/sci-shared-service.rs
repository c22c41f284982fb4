//! A shared service that serves all four scenarios in one process, marking
//! each transaction with libsci_marker, with a known CPU cost per scenario.
//!
//! `sci-shared-service <threads> <rounds>`: each thread runs `rounds` rounds
//! of (credit, drawdown, repayment, query, query) transactions, plus some
//! work outside any transaction; every 4th query fails (ended with ok = 0).
//! At exit it prints its own ground truth as one JSON line: per scenario the
//! thread CPU time spent between begin and end (CLOCK_THREAD_CPUTIME_ID),
//! and the same including the two marker calls (`marked_cpu_ns`), the
//! transactions completed and failed.
use std::sync::atomic::{AtomicU64, Ordering};

use sci_marker::{sci_scenario_begin, sci_scenario_end};
use sci_tests::spin::{spin_thread_cpu_ns, thread_cpu_ns};

const SCENARIOS: [(&str, u32, u64); 4] = [
    // (name, marker code, CPU cost per transaction in microseconds)
    ("credit", 1, 9_000),
    ("drawdown", 2, 3_500),
    ("repayment", 3, 2_000),
    ("query", 4, 1_200),
];
const OUTSIDE_US: u64 = 700;

static CPU_NS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
/// CPU time including the two marker calls (each a uprobe trap when followed).
static MARKED_CPU_NS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static COMPLETED: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static FAILED: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// Spins for `us` of this thread's CPU time.
fn spin_us(us: u64) {
    spin_thread_cpu_ns(us * 1000, 100);
}

fn transaction(code: u32, cost_us: u64, ok: bool) {
    let before_marker = thread_cpu_ns();
    sci_scenario_begin(code);
    let start = thread_cpu_ns();
    spin_us(cost_us);
    let end = thread_cpu_ns();
    sci_scenario_end(code, i32::from(ok));
    let after_marker = thread_cpu_ns();
    CPU_NS[code as usize].fetch_add(end - start, Ordering::Relaxed);
    MARKED_CPU_NS[code as usize].fetch_add(after_marker - before_marker, Ordering::Relaxed);
    if ok {
        COMPLETED[code as usize].fetch_add(1, Ordering::Relaxed);
    } else {
        FAILED[code as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(clap::Parser)]
struct Args {
    #[arg(default_value_t = 2)]
    threads: u64,
    #[arg(default_value_t = 20)]
    rounds: u64,
}

fn main() {
    let Args { threads, rounds } = clap::Parser::parse();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut queries = 0u64;
                for _ in 0..rounds {
                    for (name, code, cost_us) in SCENARIOS {
                        let repeats = if name == "query" { 2 } else { 1 };
                        for _ in 0..repeats {
                            let ok = if name == "query" {
                                queries += 1;
                                !queries.is_multiple_of(4)
                            } else {
                                true
                            };
                            transaction(code, cost_us, ok);
                        }
                    }
                    spin_us(OUTSIDE_US);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let mut fields = Vec::new();
    for (name, code, _) in SCENARIOS {
        let i = code as usize;
        fields.push(format!(
            "\"{name}\":{{\"cpu_ns\":{},\"marked_cpu_ns\":{},\"completed\":{},\"failed\":{}}}",
            CPU_NS[i].load(Ordering::Relaxed),
            MARKED_CPU_NS[i].load(Ordering::Relaxed),
            COMPLETED[i].load(Ordering::Relaxed),
            FAILED[i].load(Ordering::Relaxed)
        ));
    }
    println!("{{{}}}", fields.join(","));
}
