//! `sci-loadgen --target ROLE=ADDR... --duration 60s --peak-rps 40 --day-seconds 60`
//! (see `sci_workload::loadgen`). Progress on stderr once a second, one JSON
//! line on stdout at the end; SIGINT/SIGTERM end the run early (the JSON is
//! still printed, with `"interrupted":true`).
use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sci_workload::loadgen::{parse_mix, parse_target, run_load, LoadConfig};

/// Daily-shaped load on the consumer-finance services.
#[derive(Parser, Debug)]
#[command(name = "sci-loadgen", version)]
struct Args {
    /// ROLE=ADDR with ROLE credit, drawdown, repayment, query or shared;
    /// repeat for each service. Loopback addresses only.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Length of the run, e.g. 60s, 5m.
    #[arg(long, default_value = "60s", value_parser = agent_common::time_text::parse_duration)]
    duration: Duration,
    /// Requests per second at the daily peak.
    #[arg(long, default_value_t = 40.0)]
    peak_rps: f64,
    /// Wall-clock seconds of one simulated day.
    #[arg(long, default_value_t = 60.0)]
    day_seconds: f64,
    /// Simulated hour of day at the start (0-24).
    #[arg(long, default_value_t = 0.0)]
    start_hour: f64,
    /// Relative weights of the scenarios.
    #[arg(long, default_value = "credit=1,drawdown=2,repayment=3,query=10")]
    mix: String,
    /// Share of each scenario's requests sent to the shared service (when
    /// both it and the dedicated service are targets).
    #[arg(long, default_value_t = 0.3)]
    shared_fraction: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Time allowed for one request (connect, send, answer).
    #[arg(long, default_value = "10s", value_parser = agent_common::time_text::parse_duration)]
    request_timeout: Duration,
    /// Seed of the scenario/target choices and of the request ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut targets = HashMap::new();
    for t in &args.targets {
        let (role, addr) = parse_target(t)?;
        if targets.insert(role, addr).is_some() {
            anyhow::bail!("--target {role} is given twice");
        }
    }
    let config = LoadConfig {
        targets,
        duration: args.duration,
        peak_rps: args.peak_rps,
        day_seconds: args.day_seconds,
        start_hour: args.start_hour,
        mix: parse_mix(&args.mix)?,
        shared_fraction: args.shared_fraction,
        concurrency: args.concurrency,
        request_timeout: args.request_timeout,
        seed: args.seed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let stop = {
        let _entered = runtime.enter();
        agent_common::stop_signal::stop_signal().context("catching SIGINT and SIGTERM")?
    };
    let report = runtime.block_on(run_load(config, stop))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
