//! CPU cost per transaction of each flow, measured as the running thread's
//! CPU time (CLOCK_THREAD_CPUTIME_ID) around the flows: the clock the
//! service uses for its per-scenario `cpu_ns`. Checked against the kernel's
//! own accounting of that thread (/proc/thread-self/schedstat) while another
//! thread of the process burns a core, so a process-wide or wall clock would
//! fail. The costs are printed, not asserted: how the flows compare (credit
//! over drawdown over query) is measured by `cargo xtask bench`
//! (`sci-flow-cost`).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sci_workload::flows::{thread_cpu_ns_of_flows, DataSizes, FinanceDb};
use sci_workload::Scenario;

/// This thread's CPU time as the scheduler accounts it.
fn schedstat_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn cpu_cost_per_transaction_is_the_thread_cpu_time_the_kernel_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) =
        FinanceDb::create_or_reuse(&dir.path().join("cost.sqlite"), DataSizes::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            x
        })
    };
    let mut mean_ns = [0.0f64; 4];
    for scenario in Scenario::ALL {
        let n = if scenario == Scenario::Credit {
            40
        } else {
            300
        };
        thread_cpu_ns_of_flows(&mut db, scenario, 10, "warm-up").unwrap();
        let before_ns = schedstat_ns();
        let spent_ns = thread_cpu_ns_of_flows(&mut db, scenario, n, "cost").unwrap();
        let truth_ns = schedstat_ns() - before_ns;
        assert!(spent_ns > 0, "thread CPU clock did not advance");
        println!("{scenario:>9}: thread clock {spent_ns} ns, schedstat {truth_ns} ns");
        // schedstat lags a running thread by up to a scheduler tick at each
        // read; the reads themselves cost microseconds.
        let allowed_ns = 0.02 * truth_ns as f64 + 10e6;
        assert!(
            (spent_ns as f64 - truth_ns as f64).abs() <= allowed_ns,
            "{scenario}: the clock says {spent_ns} ns, the kernel accounted {truth_ns} ns to the thread"
        );
        mean_ns[scenario.index()] = spent_ns as f64 / f64::from(n);
    }
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    let query = mean_ns[Scenario::Query.index()];
    for scenario in Scenario::ALL {
        let ns = mean_ns[scenario.index()];
        println!(
            "{scenario:>9}: {:>9.1} us CPU per flow ({:.1} x query) [{} build]",
            ns / 1000.0,
            ns / query,
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
}

/// `--identity-rounds`: the same credit flows (same request ids, same
/// decisions) with the hot identity check cut from 1000 to 100 SHA-256
/// rounds cost less CPU, as the kernel accounts it (schedstat).
#[test]
fn fewer_identity_rounds_make_credit_cheaper_with_the_same_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let run = |rounds: Option<u32>, name: &str| {
        let (mut db, _) =
            FinanceDb::create_or_reuse(&dir.path().join(name), DataSizes::default()).unwrap();
        if let Some(rounds) = rounds {
            db.set_identity_rounds(rounds);
        }
        let mut outcomes = Vec::new();
        thread_cpu_ns_of_flows(&mut db, Scenario::Credit, 5, "warm-up").unwrap();
        let before_ns = schedstat_ns();
        for i in 0..40 {
            outcomes.push(format!("{:?}", db.credit(&format!("same-{i}")).unwrap()));
        }
        (schedstat_ns() - before_ns, outcomes)
    };
    let (default_ns, default_outcomes) = run(None, "default.sqlite");
    let (cheaper_ns, cheaper_outcomes) = run(Some(100), "cheaper.sqlite");
    println!("credit x40: 1000 rounds {default_ns} ns, 100 rounds {cheaper_ns} ns");
    assert_eq!(default_outcomes, cheaper_outcomes);
    assert!(
        (cheaper_ns as f64) < 0.95 * default_ns as f64,
        "100 rounds: {cheaper_ns} ns, 1000 rounds: {default_ns} ns"
    );
}
