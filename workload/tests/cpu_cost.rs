//! CPU cost per transaction of each flow, measured as the running thread's
//! CPU time (CLOCK_THREAD_CPUTIME_ID) around the flow. Printed, not asserted
//! as performance; only the ordering credit > drawdown > query is asserted,
//! since the flows are designed that way.
#![allow(clippy::unwrap_used)]

use sci_workload::flows::{DataSizes, FinanceDb};
use sci_workload::sys::thread_cpu_ns;
use sci_workload::Scenario;

#[test]
fn cpu_cost_per_transaction_orders_credit_over_drawdown_over_query() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) =
        FinanceDb::create_or_reuse(&dir.path().join("cost.sqlite"), DataSizes::default()).unwrap();
    let mut mean_ns = [0.0f64; 4];
    for scenario in Scenario::ALL {
        let n = if scenario == Scenario::Credit {
            40
        } else {
            300
        };
        for i in 0..10 {
            db.run(scenario, &format!("warm-{i}")).unwrap();
        }
        let start = thread_cpu_ns();
        for i in 0..n {
            db.run(scenario, &format!("cost-{i}")).unwrap();
        }
        let spent = thread_cpu_ns() - start;
        assert!(spent > 0, "thread CPU clock did not advance");
        mean_ns[scenario.index()] = spent as f64 / f64::from(n);
    }
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
    let [credit, drawdown, _, query] = mean_ns;
    assert!(
        credit > drawdown,
        "credit {credit} ns <= drawdown {drawdown} ns"
    );
    assert!(
        drawdown > query,
        "drawdown {drawdown} ns <= query {query} ns"
    );
}
