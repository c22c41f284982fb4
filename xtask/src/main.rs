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
mod setup;

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
    // Unit and crate tests in parallel; they need no root.
    run(cargo().args(["test", "--workspace", "--exclude", "sci-tests"]))?;
    // End-to-end and privileged tests one at a time: they load eBPF, start
    // servers and measure CPU time, and must not disturb each other.
    run(cargo().args(["test", "-p", "sci-tests", "--", "--test-threads=1"]))?;
    Ok(())
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
