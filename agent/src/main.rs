//! `sci-agent`: measure CPU time, energy and carbon per process and per
//! business scenario on this host.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sci_agent::config::AgentConfig;
use sci_agent::pipeline::{Pipeline, PipelineOptions};
use sci_agent::window::WindowReport;

#[derive(Parser)]
#[command(name = "sci-agent", version, about = "sci-cf host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SourceArgs {
    /// agent.toml (defaults apply to everything it leaves out).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use procfs polling even where eBPF would load.
    #[arg(long)]
    procfs: bool,
    /// Follow the marker library (libsci_marker.so or a binary linking it) with uprobes.
    #[arg(long = "markers")]
    marker_libraries: Vec<PathBuf>,
    /// Root of sysfs for the energy readers (a directory laid out like /sys).
    #[arg(long)]
    sysfs_root: Option<PathBuf>,
    /// Power model for hosts without RAPL: ccf, linear:IDLE_W:MAX_W (per vCPU), tdp:WATTS.
    #[arg(long)]
    power_model: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one window and print it (a table, or one JSON document with --json).
    Sample {
        #[command(flatten)]
        source: SourceArgs,
        /// Window length, e.g. 5s, 500ms.
        #[arg(long, default_value = "5s", value_parser = agent_common::time_text::parse_duration)]
        duration: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Measure every interval (agent.toml) and stream the windows to the
    /// aggregator, or print them as JSON lines when none is configured.
    Run {
        #[command(flatten)]
        source: SourceArgs,
        /// Allow a plaintext connection to the aggregator (not for production).
        #[arg(long)]
        insecure: bool,
    },
}

/// agent.toml (or defaults), with the command line's overrides applied.
fn load_config(source: &SourceArgs) -> Result<AgentConfig> {
    let mut config = match &source.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(root) = &source.sysfs_root {
        config.energy.sysfs_root = root.clone();
    }
    if let Some(model) = &source.power_model {
        config.energy.power_model = model.clone();
    }
    Ok(config)
}

fn open_pipeline(config: &AgentConfig, source: &SourceArgs) -> Result<Pipeline> {
    let options = PipelineOptions {
        force_procfs: source.procfs,
        marker_libraries: source.marker_libraries.clone(),
    };
    let (pipeline, fallback) = Pipeline::open(config, &options).context("opening the pipeline")?;
    if let Some(reason) = fallback {
        tracing::warn!("{reason}");
    }
    Ok(pipeline)
}

fn print_table(report: &WindowReport) {
    let seconds = report.duration_ns() as f64 / 1e9;
    println!(
        "host {}  window {:.3} s  cpu_source {}  cpus {}  idle {:.3} cpu-s  busy {:.3} cpu-s",
        report.host,
        seconds,
        report.cpu_source.as_str(),
        report.cpus,
        report.idle_cpu_ns as f64 / 1e9,
        report.busy_cpu_ns as f64 / 1e9,
    );
    let mut processes: Vec<_> = report.processes.iter().collect();
    processes.sort_by_key(|p| std::cmp::Reverse(p.cpu_ns));
    println!(
        "energy {:.3} J ({}{})  idle {:.3} J  unattributed {:.3} J  carbon {:.6} g at {:.1} g/kWh (PUE {})  embodied {:.6} g",
        report.host_energy_j,
        report.energy_source,
        if report.estimated { ", estimated" } else { "" },
        report.idle_energy_j,
        report.unattributed_energy_j,
        report.host_carbon_g,
        report.carbon_intensity_g_per_kwh,
        report.pue,
        report.host_embodied_g,
    );
    println!(
        "{:>8} {:>8} {:<16} {:>12} {:>7} {:>10} {:>12} {:<6} cgroup",
        "pid", "ppid", "comm", "cpu_ms", "cpu%", "energy_J", "carbon_mg", "exited"
    );
    for p in processes.iter().take(40) {
        println!(
            "{:>8} {:>8} {:<16} {:>12.3} {:>6.2}% {:>10.4} {:>12.4} {:<6} {}",
            p.pid,
            p.ppid,
            p.comm,
            p.cpu_ns as f64 / 1e6,
            100.0 * p.cpu_ns as f64 / report.duration_ns().max(1) as f64,
            p.energy_j,
            1000.0 * p.carbon_g,
            if p.exited { "yes" } else { "" },
            p.cgroup.as_deref().unwrap_or("-"),
        );
    }
    if processes.len() > 40 {
        println!(
            "... {} more processes (use --json for all)",
            processes.len() - 40
        );
    }
}

fn sample(source: &SourceArgs, duration: Duration, json: bool) -> Result<()> {
    let config = load_config(source)?;
    let mut pipeline = open_pipeline(&config, source)?;
    tracing::info!("window open: sampling for {duration:?}");
    std::thread::sleep(duration);
    let report = pipeline.next_window()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn run(source: &SourceArgs, insecure: bool) -> Result<()> {
    let config = load_config(source)?;
    let options = sci_agent::service::RunOptions {
        pipeline: PipelineOptions {
            force_procfs: source.procfs,
            marker_libraries: source.marker_libraries.clone(),
        },
        insecure,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = {
        let _entered = runtime.enter();
        agent_common::stop_signal::stop_signal().context("catching SIGINT and SIGTERM")?
    };
    runtime.block_on(async move {
        let shutdown = async {
            stop.await;
            tracing::info!("stopping");
        };
        sci_agent::service::run(config, options, shutdown).await
    })?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run_command())
}

fn run_command() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Sample {
            source,
            duration,
            json,
        } => sample(&source, duration, json),
        Command::Run { source, insecure } => run(&source, insecure),
    }
}
