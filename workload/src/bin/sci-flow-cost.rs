//! `sci-flow-cost`: CPU time per flow of each scenario, for `cargo xtask
//! bench` (one JSON line). Each flow runs on this thread against a fresh
//! database in a temporary directory; its cost is the thread's CPU time
//! (CLOCK_THREAD_CPUTIME_ID) over the flows (after ten warm-up flows),
//! divided by their number. The
//! flows are designed so that credit costs more than a drawdown and a
//! drawdown more than a query; the ratios say by how much.
use anyhow::Context;
use clap::Parser;
use sci_workload::flows::{thread_cpu_ns_of_flows, DataSizes, FinanceDb};
use sci_workload::Scenario;

#[derive(Parser, Debug)]
#[command(name = "sci-flow-cost", version)]
struct Args {
    /// Credit flows measured (the other scenarios run ten times as many).
    #[arg(long, default_value_t = 100)]
    credit_flows: u32,
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("sci-flow-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let measured = measure(&dir, args.credit_flows);
    let _ = std::fs::remove_dir_all(&dir);
    let us_per_flow = measured?;
    let [credit, drawdown, repayment, query] = us_per_flow;
    println!(
        "{}",
        serde_json::json!({
            "credit_us_per_flow": credit,
            "drawdown_us_per_flow": drawdown,
            "repayment_us_per_flow": repayment,
            "query_us_per_flow": query,
            "credit_over_drawdown": credit / drawdown,
            "drawdown_over_query": drawdown / query,
        })
    );
    Ok(())
}

/// Microseconds of CPU per flow, in credit, drawdown, repayment, query order.
fn measure(dir: &std::path::Path, credit_flows: u32) -> anyhow::Result<[f64; 4]> {
    let (mut db, _) = FinanceDb::create_or_reuse(&dir.join("cost.sqlite"), DataSizes::default())?;
    let mut us_per_flow = [0.0; 4];
    for scenario in Scenario::ALL {
        let flows = if scenario == Scenario::Credit {
            credit_flows
        } else {
            10 * credit_flows
        };
        thread_cpu_ns_of_flows(&mut db, scenario, 10, "warm-up")?;
        let spent_ns = thread_cpu_ns_of_flows(&mut db, scenario, flows, "cost")?;
        anyhow::ensure!(spent_ns > 0, "the thread CPU clock did not advance");
        us_per_flow[scenario.index()] = spent_ns as f64 / 1000.0 / f64::from(flows);
    }
    Ok(us_per_flow)
}
