//! `cargo xtask demo`: the whole system on this machine.
//!
//! Builds the release binaries, then starts, each in its own process group:
//! the aggregator (SQLite store in a fresh directory, token auth on
//! loopback), the consumer-finance services (credit, drawdown, repayment,
//! query, and one shared service that marks its requests with sci-marker),
//! the agent (eBPF as root, procfs otherwise, said clearly), and the load
//! generator with a daily shape compressed into the run. At the end it prints
//! the fleet SCI_CF (mean of periods and pooled), the per-scenario table with
//! measured against standard weights, the top hotspots, and where the reports
//! are. Ctrl-C stops everything cleanly.
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::supervisor::{catch_signals, interrupted, sleep_unless_interrupted, Supervisor};
use crate::{cargo, run, workspace_root};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long the load runs (one compressed business day).
    #[arg(long, default_value = "60s", value_parser = agent_common::time_text::parse_duration)]
    duration: Duration,
    /// Peak requests per second of the load generator.
    #[arg(long, default_value_t = 40)]
    peak_rps: u32,
    /// Agent window length.
    #[arg(long, default_value = "2s", value_parser = agent_common::time_text::parse_duration)]
    interval: Duration,
    /// Measurement period length at the aggregator (several periods make the mean).
    #[arg(long, default_value = "10s", value_parser = agent_common::time_text::parse_duration)]
    period: Duration,
    /// Where the run's files go (default: target/demo/<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also save a screenshot of the dashboard (headless Chromium) here, at
    /// the end of the load.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    /// The agent's CPU profile sampling frequency, Hz (0: profiling off).
    #[arg(long, default_value_t = 19)]
    profile_hz: u32,
    /// Print, last, one JSON line with the agent's and the aggregator's
    /// peak RSS (the kernel's VmHWM, read just before each is stopped) and
    /// the windows stored: `cargo xtask bench --only "peak memory"` reads it.
    #[arg(long)]
    memory_json: bool,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads the child's first stdout line (`listening ADDR`) and returns ADDR.
fn listening_addr(child_stdout: impl std::io::Read + Send + 'static, name: &str) -> Result<String> {
    let mut lines = BufReader::new(child_stdout).lines();
    let first = lines
        .next()
        .with_context(|| format!("{name} exited before listening"))??;
    let addr = first
        .strip_prefix("listening ")
        .with_context(|| format!("{name} printed {first:?} instead of `listening ADDR`"))?
        .to_string();
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(addr)
}

const ROLES: [&str; 5] = ["credit", "drawdown", "repayment", "query", "shared"];

fn agent_toml(
    interval: Duration,
    profile_hz: u32,
    ingest_port: u16,
    metrics_port: u16,
    spool: &Path,
    aggregator: &str,
    token: &str,
) -> String {
    let mut rules = String::new();
    for role in ROLES {
        let scenario = if role == "shared" {
            String::new()
        } else {
            format!("scenario = \"{role}\"\n")
        };
        rules.push_str(&format!(
            "[[scenarios.rules]]\nservice = \"{role}-svc\"\n{scenario}comm = \"cf-{role}\"\n\n"
        ));
    }
    format!(
        "[agent]\nhost = \"demo-host\"\ndatacenter = \"demo-dc\"\ninterval = \"{}ms\"\nspool_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n\
         [profile]\nenabled = {}\nfrequency_hz = {}\n\n\
         [ingest]\nudp_listen = \"127.0.0.1:{ingest_port}\"\n\n\
         [aggregator]\nurl = \"{aggregator}\"\ntoken = \"{token}\"\n\n\
         [scenarios]\n{rules}",
        interval.as_millis(),
        spool.display(),
        profile_hz > 0,
        profile_hz.max(1)
    )
}

/// Peak resident memory of a live process (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

pub fn demo(args: DemoArgs) -> Result<()> {
    catch_signals();
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "sci-agent",
        "-p",
        "sci-aggregator",
        "-p",
        "sci-workload",
    ]))?;
    let bin = workspace_root().join("target/release");
    let out = match args.out {
        Some(dir) => dir,
        None => workspace_root().join("target/demo").join(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                .to_string(),
        ),
    };
    std::fs::create_dir_all(&out)?;
    let mut sup = Supervisor::new();
    let root = unsafe_is_root();
    println!(
        "sci-cf demo: {} of load, agent windows of {:?}, periods of {:?}; files in {}",
        agent_common::time_text::format_duration(args.duration),
        args.interval,
        args.period,
        out.display()
    );
    if root {
        println!("CPU accounting: eBPF (running as root)");
    } else {
        println!("CPU accounting: procfs polling (not root: eBPF cannot load; per-request markers are not followed)");
    }

    let run_started_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    // Aggregator.
    let grpc_port = free_port()?;
    let http_port = free_port()?;
    let token = format!("{:032x}", std::process::id() as u128 * 0x9e3779b97f4a7c15);
    let aggregator_toml = out.join("aggregator.toml");
    std::fs::write(
        &aggregator_toml,
        crate::demo_aggregator::config(
            grpc_port,
            http_port,
            &out.join("sci.db"),
            args.period,
            &token,
        ),
    )?;
    let aggregator_pid = sup.spawn(
        "aggregator",
        Command::new(bin.join("sci-aggregator"))
            .args(["serve", "--insecure", "--config"])
            .arg(&aggregator_toml)
            .stdout(std::fs::File::create(out.join("aggregator.log"))?)
            .stderr(std::fs::File::create(out.join("aggregator.err.log"))?),
    )?;
    crate::demo_aggregator::wait_healthy(http_port, Duration::from_secs(20))?;

    // Services.
    let ingest_port = free_port()?;
    let mut targets = Vec::new();
    for role in ROLES {
        let mut cmd = Command::new(bin.join("sci-finance-service"));
        cmd.args(["--role", role, "--listen", "127.0.0.1:0"]);
        if role != "shared" {
            cmd.args(["--ingest-udp", &format!("127.0.0.1:{ingest_port}")]);
        }
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(out.join(format!("{role}.log")))?);
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {role} service"))?;
        let stdout = child.stdout.take().context("service stdout")?;
        let addr = listening_addr(stdout, role)?;
        sup.adopt(role, child);
        targets.push(format!("{role}={addr}"));
    }

    // Agent: follows the shared service's markers (the binary links sci-marker).
    let metrics_port = free_port()?;
    let agent_toml_path = out.join("agent.toml");
    std::fs::write(
        &agent_toml_path,
        agent_toml(
            args.interval,
            args.profile_hz,
            ingest_port,
            metrics_port,
            &out.join("spool"),
            &format!("http://127.0.0.1:{grpc_port}"),
            &token,
        ),
    )?;
    let agent_pid = sup.spawn(
        "agent",
        Command::new(bin.join("sci-agent"))
            .args(["run", "--insecure", "--config"])
            .arg(&agent_toml_path)
            .arg("--markers")
            .arg(bin.join("sci-finance-service"))
            .stdout(std::fs::File::create(out.join("agent.log"))?)
            .stderr(std::fs::File::create(out.join("agent.err.log"))?),
    )?;
    std::thread::sleep(Duration::from_secs(2));

    // Load: one business day compressed into the run.
    let mut loadgen = Command::new(bin.join("sci-loadgen"));
    for t in &targets {
        loadgen.args(["--target", t]);
    }
    loadgen
        .args(["--duration", &format!("{}s", args.duration.as_secs())])
        .args(["--day-seconds", &args.duration.as_secs().to_string()])
        .args(["--peak-rps", &args.peak_rps.to_string()])
        .stdout(std::fs::File::create(out.join("loadgen.json"))?)
        .stderr(Stdio::piped());
    loadgen.process_group(0);
    let mut child = loadgen.spawn().context("starting the load generator")?;
    let progress = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut p) = progress.lock() {
                    *p = line;
                }
            }
        });
    }
    sup.adopt("loadgen", child);

    let started = Instant::now();
    let total = args.duration;
    while started.elapsed() < total + Duration::from_secs(1) {
        if !sleep_unless_interrupted(Duration::from_secs(1)) {
            println!("\ninterrupted: stopping everything");
            sup.stop_all();
            return Ok(());
        }
        if let Some((name, status)) = sup.exited() {
            if name != "loadgen" {
                sup.stop_all();
                bail!(
                    "{name} stopped early ({status}); see its log in {}",
                    out.display()
                );
            }
            break;
        }
        let line = progress.lock().map(|p| p.clone()).unwrap_or_default();
        let windows = crate::demo_aggregator::windows_ingested(http_port).unwrap_or(0);
        print!(
            "\r[{:>3}/{}s] windows at aggregator: {windows:<5} {line:<90}",
            started.elapsed().as_secs(),
            total.as_secs()
        );
        let _ = std::io::stdout().flush();
    }
    println!();
    sup.stop("loadgen");
    // Let the last windows reach the aggregator.
    sleep_unless_interrupted(args.interval * 2 + Duration::from_secs(1));
    let agent_peak_rss_mib = peak_rss_mib(agent_pid);
    sup.stop("agent");
    if let Some(png) = &args.screenshot {
        if let Err(e) = crate::demo_aggregator::screenshot(http_port, png) {
            sup.stop_all();
            return Err(e);
        }
        println!("dashboard screenshot: {}", png.display());
    }
    let summary =
        crate::demo_aggregator::summary(&bin, &aggregator_toml, &out, run_started_s, args.period);
    let aggregator_peak_rss_mib = peak_rss_mib(aggregator_pid);
    let windows = crate::demo_aggregator::windows_ingested(http_port).unwrap_or(0);
    sup.stop_all();
    if interrupted() {
        return Ok(());
    }
    print!("{}", summary?);
    if args.memory_json {
        // The store as it is on disk (the file and its WAL): raw windows,
        // dedupe keys and rollups of this one host's run.
        let store_bytes: u64 = ["sci.db", "sci.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(out.join(f)).ok())
            .map(|m| m.len())
            .sum();
        println!(
            "{}",
            serde_json::json!({
                "agent_peak_rss_mib": agent_peak_rss_mib?,
                "aggregator_peak_rss_mib": aggregator_peak_rss_mib?,
                "windows": windows,
                "store_bytes_per_window": store_bytes as f64 / windows.max(1) as f64,
                "profile_hz": args.profile_hz,
            })
        );
    }
    Ok(())
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
