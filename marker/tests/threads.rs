//! Several Rust threads mark flows through `ScenarioGuard`; the library's
//! counters equal what the threads did (one test per file: the counters are
//! process-wide).
#![allow(clippy::unwrap_used)]
use sci_marker::{Scenario, ScenarioCounters, ScenarioGuard};

#[test]
fn concurrent_guards_are_counted_exactly() {
    let all = [
        Scenario::Credit,
        Scenario::Drawdown,
        Scenario::Repayment,
        Scenario::Query,
    ];
    let threads = 8usize;
    let flows = 5_000usize;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..flows {
                    let guard = ScenarioGuard::begin(all[(t + i) % 4]);
                    match i % 3 {
                        0 => guard.finish(true),
                        1 => guard.finish(false),
                        _ => drop(guard), // dropped without finish: failed
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut begun = [0u64; 4];
    let mut ok = [0u64; 4];
    let mut failed = [0u64; 4];
    for t in 0..threads {
        for i in 0..flows {
            let s = (t + i) % 4;
            begun[s] += 1;
            if i % 3 == 0 {
                ok[s] += 1;
            } else {
                failed[s] += 1;
            }
        }
    }
    for (s, scenario) in all.into_iter().enumerate() {
        assert_eq!(scenario.begun(), begun[s], "{scenario:?} begun");
        assert_eq!(scenario.completed(), ok[s], "{scenario:?} completed");
        assert_eq!(scenario.failed(), failed[s], "{scenario:?} failed");
    }
    assert_eq!(ok.iter().sum::<u64>() + failed.iter().sum::<u64>(), 40_000);
}
