//! Project tasks: `cargo xtask setup | test | bench | demo`.
//!
//! Every task first runs `setup`, which provisions what the build needs and
//! nothing else (nightly rust-src, a pinned bpf-linker built against the
//! nightly toolchain's own LLVM, Debian packages some tests use). Each step
//! checks before it acts, so a second run takes seconds.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod demo_aggregator;
#[cfg(test)]
mod dependency_closure;
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
    Setup {
        /// Only what building the binaries needs (nightly rust-src and
        /// bpf-linker), not the tests' Debian packages and Python tools: the
        /// container images' build stage.
        #[arg(long)]
        build_only: bool,
    },
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
    // Without the variables `cargo run` set for xtask itself, so that its
    // builds and the tests' builds share their artifacts (see sci_test_harness::cargo).
    let mut cargo = sci_test_harness::cargo();
    if sci_test_harness::ci() {
        // A fresh clone builds once: incremental state would only take disk.
        cargo.env("CARGO_INCREMENTAL", "0");
    }
    cargo
}

/// Totals of the `test result:` lines of cargo test runs.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
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
        }
    }
}

/// Runs `cargo test ARGS`, passing its output through and adding up its results.
fn cargo_test(args: &[&str], skip_log: &Path, totals: &mut TestTotals) -> Result<()> {
    use std::io::BufRead;
    let mut cmd = cargo();
    // Every test binary runs even after one fails, so a run shows all failures.
    cmd.args(["test", "--no-fail-fast"])
        .args(args)
        .env(sci_test_harness::SKIP_LOG_ENV, skip_log)
        .current_dir(workspace_root());
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

/// The skips the tests recorded (one `skipping TEST: REASON` line each): the
/// tests append them to the skip log, since libtest captures the output of
/// passing tests in the first phase.
fn recorded_skips(skip_log: &Path) -> Result<Vec<String>> {
    match std::fs::read_to_string(skip_log) {
        Ok(text) => Ok(text.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", skip_log.display())),
    }
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
    let skip_log = workspace_root().join("target/xtask-test-skips.log");
    if let Some(dir) = skip_log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Err(e) = std::fs::remove_file(&skip_log) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("removing {}", skip_log.display()));
        }
    }
    let mut totals = TestTotals::default();
    // Unit and crate tests in parallel; they need no root.
    let crates = cargo_test(
        &["--workspace", "--exclude", "sci-tests"],
        &skip_log,
        &mut totals,
    );
    // End-to-end and privileged tests one at a time: they load eBPF, start
    // servers and measure CPU time, and must not disturb each other.
    // Run even when a crate test failed, so one run shows every failure.
    let end_to_end = cargo_test(
        &["-p", "sci-tests", "--", "--test-threads=1", "--nocapture"],
        &skip_log,
        &mut totals,
    );
    // A test that skipped passed for cargo; not for us.
    let skips = recorded_skips(&skip_log)?;
    let skipped = skips.len() as u64;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed.saturating_sub(skipped),
        totals.failed,
        skipped + totals.ignored
    );
    for skip in &skips {
        println!("  {skip}");
    }
    crates?;
    end_to_end?;
    check_skips(sci_test_harness::ci(), &skips)
}

/// Under CI every privileged test must run: any recorded skip fails the run, naming the tests.
fn check_skips(ci: bool, skips: &[String]) -> Result<()> {
    if ci && !skips.is_empty() {
        bail!(
            "{} test(s) skipped under CI, where every privileged test must run:\n  {}",
            skips.len(),
            skips.join("\n  ")
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run_task())
}

fn run_task() -> Result<()> {
    let cli = Cli::parse();
    let build_only = matches!(cli.task, Task::Setup { build_only: true });
    setup::setup(build_only)?;
    match cli.task {
        Task::Setup { .. } => Ok(()),
        Task::Test { no_lint } => test(no_lint),
        Task::Bench(args) => bench::bench(args),
        Task::Demo(args) => demo::demo(args),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_skip_under_ci_fails_and_names_the_test() {
        let dir = std::env::temp_dir().join(format!("xtask-skips-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        assert!(recorded_skips(&log).unwrap().is_empty(), "no log: no skip");
        std::fs::write(
            &log,
            "skipping hot_path_tops_the_profile_of_its_process: needs root to load eBPF (runs on CI, where CI=true)\n",
        )
        .unwrap();
        let skips = recorded_skips(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(skips.len(), 1);
        let e = check_skips(true, &skips).unwrap_err().to_string();
        assert!(
            e.contains("hot_path_tops_the_profile_of_its_process"),
            "{e}"
        );
        assert!(
            check_skips(false, &skips).is_ok(),
            "outside CI a skip is counted, not failed"
        );
        assert!(check_skips(true, &[]).is_ok());
    }
}
