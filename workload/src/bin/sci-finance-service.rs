//! `sci-finance-service --role credit|drawdown|repayment|query|shared --listen 127.0.0.1:PORT`
//! (see `sci_workload::service`). Prints `listening <addr>` as its first
//! stdout line once the database is ready; stops on SIGINT/SIGTERM.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sci_workload::flows::DataSizes;
use sci_workload::service::{Service, ServiceConfig};
use sci_workload::sys::set_thread_comm;
use sci_workload::Role;

/// A consumer-finance business service (one role) on loopback.
#[derive(Parser, Debug)]
#[command(name = "sci-finance-service", version)]
struct Args {
    /// credit, drawdown, repayment, query (one scenario, reported over UDP
    /// ingest) or shared (all four, marked with sci-marker).
    #[arg(long)]
    role: Role,
    /// Loopback address to listen on; port 0 picks a free port.
    #[arg(long)]
    listen: SocketAddr,
    /// The agent's UDP ingest endpoint; one `<scenario> <n>` datagram per
    /// scenario every 100 ms with the completed transactions (dedicated roles).
    #[arg(long)]
    ingest_udp: Option<SocketAddr>,
    /// SQLite database file (created and filled when absent or outdated);
    /// default: a file in the temp directory, removed at exit.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Worker threads running the flows.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Credit-bureau records generated in the database.
    #[arg(long, default_value_t = DataSizes::default().bureau_records)]
    bureau_records: u32,
    /// Customer accounts generated in the database.
    #[arg(long, default_value_t = DataSizes::default().accounts)]
    accounts: u32,
    /// SHA-256 rounds of the credit identity check, the credit flow's hot
    /// function `identity_digest` (default 1000): fewer make a cheaper
    /// release of the same flow, for optimisation reviews.
    #[arg(long)]
    identity_rounds: Option<u32>,
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let comm = args.role.comm();
    // The main thread's name is the process's comm; every other thread gets
    // the same name so per-thread matching sees the role too.
    set_thread_comm(comm).with_context(|| format!("setting the process name to {comm}"))?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(comm)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let mut config = ServiceConfig::new(args.role, args.listen);
        config.ingest_udp = args.ingest_udp;
        config.db_path = args.db;
        config.workers = args.workers;
        config.identity_rounds = args.identity_rounds;
        config.sizes = DataSizes {
            bureau_records: args.bureau_records.max(1),
            accounts: args.accounts.max(1),
        };
        let service = Service::start(config).await?;
        // Caught from before the `listening` line on: see agent_common::stop_signal.
        let stop =
            agent_common::stop_signal::stop_signal().context("catching SIGINT and SIGTERM")?;
        let addr = service.local_addr()?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening {addr}")?;
            out.flush()?;
        }
        tracing::info!(role = %args.role, %addr, comm, "serving");
        service.serve(stop).await?;
        Ok(())
    })
}
