//! Project tasks: `cargo xtask setup | test | bench | demo`.
//!
//! Every task first runs `setup`, which provisions what the build needs and
//! nothing else (nightly rust-src, a pinned bpf-linker built against the
//! nightly toolchain's own LLVM, Debian packages some tests use). Each step
//! checks before it acts, so a second run takes seconds.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod demo_aggregator;
mod setup;
mod supervisor;

#[derive(Parser)]
#[command(about = "sci-cf project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent).
    Setup,
    /// Run every check and test: fmt, clippy, unit tests, then the end-to-end
    /// and privileged tests one at a time.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Measure, and write BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Run the whole system on this machine with a consumer-finance workload.
    Demo(demo::DemoArgs),
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Totals of the `test result:` lines of cargo test runs.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    skipped: u64,
}

impl TestTotals {
    fn read_line(&mut self, line: &str) {
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            let number_before = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            self.passed += number_before("passed");
            self.failed += number_before("failed");
            self.ignored += number_before("ignored");
        } else if line.contains("skipping ") {
            self.skipped += 1;
        }
    }
}

/// Runs `cargo test ARGS`, passing its output through and adding up its results.
fn cargo_test(args: &[&str], totals: &mut TestTotals) -> Result<()> {
    use std::io::BufRead;
    let mut cmd = cargo();
    cmd.arg("test").args(args).current_dir(workspace_root());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            totals.read_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn test(no_lint: bool) -> Result<()> {
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let mut totals = TestTotals::default();
    // Unit and crate tests in parallel; they need no root.
    let crates = cargo_test(&["--workspace", "--exclude", "sci-tests"], &mut totals);
    // End-to-end and privileged tests one at a time: they load eBPF, start
    // servers and measure CPU time, and must not disturb each other.
    let end_to_end = crates.and_then(|_| {
        cargo_test(
            &["-p", "sci-tests", "--", "--test-threads=1", "--nocapture"],
            &mut totals,
        )
    });
    // A privileged test that skipped (one "skipping ..." line) passed for cargo; not for us.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed.saturating_sub(totals.skipped),
        totals.failed,
        totals.skipped + totals.ignored
    );
    end_to_end
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::setup()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Test { no_lint } => test(no_lint),
        Task::Bench(args) => bench::bench(args),
        Task::Demo(args) => demo::demo(args),
    }
}
