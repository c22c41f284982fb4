//! Measurements behind BENCHMARKS.md; `cargo xtask bench` runs each several
//! times and writes medians with min/max. Each prints one JSON line.
//!
//! - `kernel --seconds S`: with bpf_stats on, attaches the full accounting
//!   programs and the bare baseline side by side, drives a context-switch
//!   storm (two threads ping-ponging through pipes), and reports ns per
//!   sched_switch event of each and their ratio (same run, same events).
//! - `agent --processes N --seconds S`: N live processes that each wake once
//!   a second, the agent's pipeline closing a window every second; reports the
//!   agent's own CPU% (rusage, steady state after a first window) and RSS. `--churn`: N shell loops that
//!   fork+exec `sleep` every second instead (N new processes per second).
//! - `follow --workload containers|pgbench --seconds S`: the agent (1 s
//!   windows, a `container` and a `cmdline` rule, so cgroup moves are
//!   followed and forked processes' titles read) while runc starts a
//!   busybox container every 0.6 s (100 a minute), or while `pgbench -C -S`
//!   opens about 500 connections a second on a scratch PostgreSQL (a forked
//!   backend each); reports the agent's CPU% (rusage of this process less
//!   the thread that drives the workload) and RSS.
//! - `accuracy`: eBPF cpu_ns of three busy processes against schedstat.
//! - `capture`: 300 processes of 5-20 ms: share accounted by eBPF and by procfs polling.
//! - `markers --pairs N`: ns per marker call (sci_scenario_begin/end) without
//!   the agent's uprobes, with them but without the per-request CPU
//!   histogram, and with both, in the same run; checks the kernel counted
//!   every transaction and every request.
use std::io::{Read, Write};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sci_agent::config::AgentConfig;
use sci_agent::pipeline::{Pipeline, PipelineOptions};
use sci_agent::sources::sched::ebpf::{ebpf_object, EbpfOptions, EbpfSampler, ProgramStats};
use sci_agent::sources::sched::CpuSampler;

/// The baseline of `kernel`: only `sched_switch_bare` (built into the eBPF
/// object with the `bench` feature), a sched_switch program that adds elapsed
/// time to a per-CPU hash map keyed by tgid and does nothing else. Detached
/// on drop.
struct BareBaseline {
    ebpf: aya::Ebpf,
}

impl BareBaseline {
    fn load() -> Result<Self> {
        let mut ebpf = aya::EbpfLoader::new()
            .load(ebpf_object())
            .context("loading the eBPF object")?;
        let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let program: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut("sched_switch_bare")
            .context("program sched_switch_bare missing (built without the bench feature?)")?
            .try_into()?;
        program
            .load("sched_switch", &btf)
            .context("verifying sched_switch_bare")?;
        program.attach().context("attaching sched_switch_bare")?;
        Ok(BareBaseline { ebpf })
    }

    fn stats(&self) -> Option<ProgramStats> {
        let info = self.ebpf.program("sched_switch_bare")?.info().ok()?;
        Some(ProgramStats {
            name: "sched_switch_bare".into(),
            run_time_ns: info.run_time().as_nanos() as u64,
            run_count: info.run_count(),
        })
        .filter(|s| s.run_count > 0)
    }
}

fn set_bpf_stats(on: bool) -> Result<()> {
    std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("writing /proc/sys/kernel/bpf_stats_enabled (needs root)")
}

/// Two threads bouncing one byte through a pair of pipes: every hop is a context switch.
fn switch_storm(duration: Duration) -> Result<u64> {
    let (mut a_read, mut a_write) = std::io::pipe()?;
    let (mut b_read, mut b_write) = std::io::pipe()?;
    let deadline = Instant::now() + duration;
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while a_read.read_exact(&mut byte).is_ok() {
            if byte[0] == 1 || b_write.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut round_trips = 0u64;
    let mut byte = [0u8; 1];
    while Instant::now() < deadline {
        a_write.write_all(&[0])?;
        b_read.read_exact(&mut byte)?;
        round_trips += 1;
    }
    a_write.write_all(&[1])?;
    let _ = echo.join();
    Ok(round_trips)
}

fn find(stats: &[ProgramStats], name: &str) -> Option<ProgramStats> {
    stats.iter().find(|s| s.name == name).cloned()
}

fn kernel(seconds: u64) -> Result<()> {
    set_bpf_stats(true)?;
    let result = (|| -> Result<serde_json::Value> {
        let sampler = EbpfSampler::load(&EbpfOptions::default())?;
        let bare = BareBaseline::load()?;
        let full_before = find(&sampler.program_stats(), "sched_switch").context("full stats")?;
        let bare_before = bare.stats().unwrap_or(ProgramStats {
            name: "sched_switch_bare".into(),
            run_time_ns: 0,
            run_count: 0,
        });
        let started = Instant::now();
        let round_trips = switch_storm(Duration::from_secs(seconds))?;
        let elapsed = started.elapsed().as_secs_f64();
        let full = find(&sampler.program_stats(), "sched_switch").context("full stats")?;
        let bare_after = bare.stats().context("bare stats")?;
        let full_events = full.run_count - full_before.run_count;
        let bare_events = bare_after.run_count - bare_before.run_count;
        let full_ns =
            (full.run_time_ns - full_before.run_time_ns) as f64 / full_events.max(1) as f64;
        let bare_ns =
            (bare_after.run_time_ns - bare_before.run_time_ns) as f64 / bare_events.max(1) as f64;
        Ok(serde_json::json!({
            "bench": "kernel",
            "seconds": elapsed,
            "events_per_s": full_events as f64 / elapsed,
            "round_trips_per_s": round_trips as f64 / elapsed,
            "full_ns_per_event": full_ns,
            "bare_ns_per_event": bare_ns,
            "full_over_bare": full_ns / bare_ns,
        }))
    })();
    set_bpf_stats(false)?;
    println!("{}", result?);
    Ok(())
}

fn rusage_self_ns() -> u64 {
    // SAFETY: rusage is plain data written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(usage.ru_utime) + us(usage.ru_stime)) * 1000
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Children(Vec<Child>);
impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn agent(processes: u64, seconds: u64, procfs: bool, churn: bool, profiling: bool) -> Result<()> {
    // Long-lived processes that wake every second (each a live, changing map
    // entry); with --churn, shell loops that also fork+exec `sleep` every second.
    let me = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    for _ in 0..processes {
        let child = if churn {
            Command::new("sh")
                .args(["-c", "while :; do sleep 1; done"])
                .spawn()
        } else {
            Command::new(&me).arg("sleeper").spawn()
        };
        children.0.push(child.context("spawning a sleeper")?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut config = AgentConfig::default();
    config.profile.enabled = profiling;
    let (mut pipeline, fallback) = Pipeline::open(
        &config,
        &PipelineOptions {
            force_procfs: procfs,
            marker_libraries: Vec::new(),
        },
    )?;
    if let Some(reason) = fallback {
        if !procfs {
            bail!("{reason}");
        }
    }
    // Steady state: the windows that first see each process read it from
    // procfs once (every sleeper has run by the end of the second); their
    // cost is reported apart, as first sight.
    let mut first_sight_ns = 0u64;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        let before = thread_cpu_ns();
        pipeline.next_window()?;
        first_sight_ns += thread_cpu_ns() - before;
    }
    let cpu_before = rusage_self_ns();
    let started = Instant::now();
    let mut windows = 0u64;
    let mut rows = 0usize;
    let mut max_rss_kib = 0;
    // The window itself, on this thread: closing it and running it through
    // every stage (the process-event thread, whose cost follows the host's
    // process churn rather than its live processes, is not in it).
    let mut window_ns = 0u64;
    let mut window_rows = 0u64;
    let mut per_window_ns: Vec<u64> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let before = thread_cpu_ns();
        let report = pipeline.next_window()?;
        let this_window_ns = thread_cpu_ns() - before;
        window_ns += this_window_ns;
        per_window_ns.push(this_window_ns);
        window_rows += report.processes.len() as u64;
        rows = rows.max(report.processes.len());
        windows += 1;
        max_rss_kib = max_rss_kib.max(rss_kib());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ns = rusage_self_ns() - cpu_before;
    println!(
        "{}",
        serde_json::json!({
            "bench": "agent",
            "source": if procfs { "procfs" } else { "ebpf" },
            "churn": churn,
            "profile": profiling,
            "processes": processes,
            "windows": windows,
            "max_rows": rows,
            "cpu_percent_of_one_core": 100.0 * cpu_ns as f64 / 1e9 / elapsed,
            "window_thread_cpu_percent_of_one_core": 100.0 * window_ns as f64 / 1e9 / elapsed,
            "window_ns_per_process_row": window_ns as f64 / window_rows.max(1) as f64,
            "per_window_ms": per_window_ns.iter().map(|ns| *ns as f64 / 1e6).collect::<Vec<_>>(),
            "median_window_ns_per_process_row": median(&per_window_ns) / (window_rows as f64 / windows.max(1) as f64).max(1.0),
            "first_sight_ms": first_sight_ns as f64 / 1e6,
            "rss_mib": max_rss_kib as f64 / 1024.0,
        })
    );
    drop(children);
    Ok(())
}

fn median(values: &[u64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0) as f64
}

/// ns per begin+end pair, over `pairs` transactions on this thread.
fn marker_pairs_ns(pairs: u64) -> f64 {
    let started = Instant::now();
    for _ in 0..pairs {
        sci_marker::sci_scenario_begin(4);
        sci_marker::sci_scenario_end(4, 1);
    }
    started.elapsed().as_nanos() as f64 / pairs as f64
}

/// ns per followed begin+end pair, with the agent's uprobes attached by a
/// sampler loaded with `options`; checks the kernel counted every transaction
/// (and, with the histogram, every request).
fn followed_pairs_ns(pairs: u64, request_histogram: bool) -> Result<f64> {
    let mut sampler =
        EbpfSampler::load_with_request_histogram(&EbpfOptions::default(), request_histogram)?;
    sampler.attach_markers(&std::env::current_exe()?)?;
    let pair_ns = marker_pairs_ns(pairs);
    let window = sampler.sample()?;
    let me = std::process::id();
    let mine = || window.processes.iter().filter(|p| p.pid == me);
    let counted: u64 = mine().map(|p| p.scenario_transactions[4]).sum();
    if counted != pairs {
        bail!("the kernel counted {counted} transactions of {pairs}");
    }
    let in_histogram: u64 = mine()
        .flat_map(|p| &p.request_cpu)
        .flat_map(|h| &h.counts)
        .sum();
    let expected = if request_histogram { pairs } else { 0 };
    if in_histogram != expected {
        bail!("the request histogram holds {in_histogram} requests, expected {expected}");
    }
    Ok(pair_ns)
}

/// Cost of one marker call followed by the agent's uprobes: the same loop of
/// begin/end pairs without the uprobes, with them but without the per-request
/// CPU histogram, and with both (same run, `--rounds` alternations, fastest
/// round of each).
fn markers(pairs: u64, rounds: u64) -> Result<()> {
    marker_pairs_ns(pairs / 10);
    let bare_pair_ns = marker_pairs_ns(pairs);
    // Alternate rounds without and with the histogram; the fastest round of
    // each stands for it (other load on the machine only ever adds time).
    let rounds = rounds.max(1);
    let mut no_histogram_pair_ns = f64::MAX;
    let mut followed_pair_ns = f64::MAX;
    for _ in 0..rounds {
        no_histogram_pair_ns = no_histogram_pair_ns.min(followed_pairs_ns(pairs, false)?);
        followed_pair_ns = followed_pair_ns.min(followed_pairs_ns(pairs, true)?);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "markers",
            "pairs": pairs,
            "bare_ns_per_call": bare_pair_ns / 2.0,
            "followed_without_histogram_ns_per_call": no_histogram_pair_ns / 2.0,
            "followed_ns_per_call": followed_pair_ns / 2.0,
            "uprobe_overhead_ns_per_call": (followed_pair_ns - bare_pair_ns) / 2.0,
            "histogram_over_without": followed_pair_ns / no_histogram_pair_ns,
        })
    );
    Ok(())
}

/// CPU time of the calling thread (ns).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[inline(never)]
fn profile_load_inner(n: u64) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        std::hint::black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(i))
    })
}

#[inline(never)]
fn profile_load_outer(stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::hint::black_box(profile_load_inner(100_000));
    }
}

/// `profile --seconds S`: cost of the CPU profiler at 19 Hz and 99 Hz under
/// a CPU-bound load (one spinning thread per CPU): ns per `cpu_profile` run
/// (bpf_stats), samples per second, and the agent's CPU% spent draining and
/// symbolising one window per second (thread CPU time of `drain`, steady
/// state after the first window, whose cold symboliser is reported apart).
fn profile(seconds: u64) -> Result<()> {
    use sci_agent::sources::profile::{CpuProfiler, ProfilerOptions};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let seconds = seconds.max(2);
    set_bpf_stats(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load: Vec<_> = (0..cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || profile_load_outer(&stop))
        })
        .collect();
    let result = (|| -> Result<Vec<serde_json::Value>> {
        let mut runs = Vec::new();
        for frequency_hz in [19u64, 99] {
            let mut profiler = CpuProfiler::load(&ProfilerOptions {
                frequency_hz,
                cpus: None,
            })?;
            let before = profiler.program_stats().context("cpu_profile stats")?;
            let started = Instant::now();
            let mut first_drain_ns = 0;
            let mut steady_drain_ns = 0;
            let mut samples = 0u64;
            let mut stacks = 0usize;
            for window in 0..seconds {
                std::thread::sleep(Duration::from_secs(1));
                let cpu_before = thread_cpu_ns();
                let drained = profiler.drain()?;
                let cost_ns = thread_cpu_ns() - cpu_before;
                samples += drained.samples;
                stacks += drained.stacks.len();
                if window == 0 {
                    first_drain_ns = cost_ns;
                } else {
                    steady_drain_ns += cost_ns;
                }
            }
            let wall_s = started.elapsed().as_secs_f64();
            let after = profiler.program_stats().context("cpu_profile stats")?;
            let runs_counted = after.run_count - before.run_count;
            runs.push(serde_json::json!({
                "frequency_hz": frequency_hz,
                "ns_per_sample": (after.run_time_ns - before.run_time_ns) as f64
                    / runs_counted.max(1) as f64,
                "samples_per_s": runs_counted as f64 / wall_s,
                "drained_samples": samples,
                "stacks_per_window": stacks as f64 / seconds as f64,
                "first_drain_ms": first_drain_ns as f64 / 1e6,
                "drain_cpu_percent": 100.0 * steady_drain_ns as f64 / ((seconds - 1) as f64 * 1e9),
            }));
        }
        Ok(runs)
    })();
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        let _ = thread.join();
    }
    set_bpf_stats(false)?;
    // One flat JSON object: each figure suffixed with its sampling frequency.
    let mut flat = serde_json::json!({"bench": "profile", "seconds": seconds, "cpus": cpus});
    for run in result? {
        let hz = run["frequency_hz"].as_u64().unwrap_or(0);
        if let (Some(out), Some(fields)) = (flat.as_object_mut(), run.as_object()) {
            for (key, value) in fields {
                out.insert(format!("{key}_{hz}hz"), value.clone());
            }
        }
    }
    println!("{flat}");
    Ok(())
}

/// Spins until this process has used `ms` of CPU time.
fn burn_ms(ms: u64) {
    let until = process_cpu_ns() + ms * 1_000_000;
    let mut x = 0u64;
    while process_cpu_ns() < until {
        for i in 0..200u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    std::hint::black_box(x);
}

fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn schedstat_ns(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("schedstat")
}

/// CPU-time accuracy: three processes burning 100%, 50% and 20% of a core;
/// the eBPF window's cpu_ns against /proc/<pid>/schedstat over the same window.
fn accuracy(seconds: u64) -> Result<()> {
    let me = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    for duty in [100, 50, 20] {
        children.0.push(
            Command::new(&me)
                .args(["duty", &duty.to_string()])
                .spawn()?,
        );
    }
    let mut sampler = EbpfSampler::load(&EbpfOptions::default())?;
    std::thread::sleep(Duration::from_millis(300));
    let pids: Vec<u32> = children.0.iter().map(|c| c.id()).collect();
    let before: Vec<u64> = pids
        .iter()
        .map(|p| schedstat_ns(*p))
        .collect::<Result<_>>()?;
    sampler.sample()?;
    std::thread::sleep(Duration::from_secs(seconds));
    let window = sampler.sample()?;
    let after: Vec<u64> = pids
        .iter()
        .map(|p| schedstat_ns(*p))
        .collect::<Result<_>>()?;
    let mut worst = 0.0f64;
    for (i, pid) in pids.iter().enumerate() {
        let truth = (after[i] - before[i]) as f64;
        let agent: u64 = window
            .processes
            .iter()
            .filter(|p| p.pid == *pid)
            .map(|p| p.cpu_ns)
            .sum();
        worst = worst.max((agent as f64 - truth).abs() / truth);
    }
    println!(
        "{}",
        serde_json::json!({"bench": "accuracy", "worst_error_percent": 100.0 * worst})
    );
    Ok(())
}

/// Short-lived processes: 300 processes of 5-20 ms each inside one window;
/// share of their CPU time (from wait4's rusage) that the eBPF path and a
/// procfs poller at the same interval account.
fn capture() -> Result<()> {
    use sci_agent::sources::sched::procfs::ProcfsSampler;
    let me = std::env::current_exe()?;
    let mut sampler = EbpfSampler::load(&EbpfOptions::default())?;
    let mut polling = ProcfsSampler::new("/proc")?;
    sampler.sample()?;
    polling.sample()?;
    let mut truth = std::collections::HashMap::new();
    for i in 0..300u64 {
        let child = Command::new(&me)
            .args(["burn", &(5 + (i * 7) % 16).to_string()])
            .spawn()?;
        let pid = child.id();
        std::mem::forget(child);
        let mut status = 0;
        // SAFETY: rusage is plain data written by the kernel.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        truth.insert(pid, (us(usage.ru_utime) + us(usage.ru_stime)) * 1000);
    }
    let window = sampler.sample()?;
    let polled = polling.sample()?;
    let total: u64 = truth.values().sum();
    let share = |processes: &[sci_agent::sources::sched::ProcessCpu]| {
        100.0
            * processes
                .iter()
                .filter(|p| truth.contains_key(&p.pid))
                .map(|p| p.cpu_ns)
                .sum::<u64>() as f64
            / total as f64
    };
    println!(
        "{}",
        serde_json::json!({"bench": "capture", "ebpf_percent": share(&window.processes), "procfs_percent": share(&polled.processes)})
    );
    Ok(())
}

/// The agent's config for `follow`: rules that make it follow moves and
/// read titles.
const FOLLOW_RULES: &str = r#"
[[scenarios.rules]]
container = "5c1"
service = "container-app"
scenario = "query"

[[scenarios.rules]]
cmdline = '^postgres: '
service = "pg"
scenario = "query"
"#;

/// Drives the workload of `follow` on its own thread until `stop`, and
/// returns what it did.
fn follow_driver(
    workload: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<String>>> {
    use sci_test_harness::containers::runc_bundle;
    use sci_test_harness::postgres::ScratchPostgres;
    use std::sync::atomic::Ordering;
    match workload {
        "containers" => {
            let bundle =
                std::env::temp_dir().join(format!("sci-bench-runc-{}", std::process::id()));
            let script = "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; true";
            let parent = format!("sci-bench-runc-{}", std::process::id());
            let runc = std::path::PathBuf::from("/usr/sbin/runc");
            Ok(std::thread::spawn(move || {
                let mut started = 0u64;
                let next = Instant::now();
                let mut due = next;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{:0>64}", format!("5c1{:x}{started:x}", std::process::id()));
                    runc_bundle(
                        &runc,
                        std::path::Path::new("/bin/busybox"),
                        &bundle,
                        script,
                        &format!("/{parent}/{id}"),
                    )
                    .map_err(anyhow::Error::msg)?;
                    let status = Command::new(&runc)
                        .args(["run", "--bundle"])
                        .arg(&bundle)
                        .arg(format!("sci-bench-{started}"))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .status()?;
                    if !status.success() {
                        bail!("runc run: {status}");
                    }
                    started += 1;
                    due += Duration::from_millis(600);
                    if let Some(rest) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(rest);
                    }
                }
                let _ = std::fs::remove_dir_all(&bundle);
                for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
                    let _ = std::fs::remove_dir(hierarchy.path().join(&parent));
                }
                let per_minute = started as f64 * 60.0 / next.elapsed().as_secs_f64();
                Ok(format!("{started} containers, {per_minute:.0}/min"))
            }))
        }
        "pgbench" => {
            let server = ScratchPostgres::start().map_err(anyhow::Error::msg)?;
            Ok(std::thread::spawn(move || {
                let init = server
                    .client("pgbench")
                    .args(["-i", "-q", "-s", "1", "postgres"])
                    .output()?;
                if !init.status.success() {
                    bail!("pgbench -i: {init:?}");
                }
                let mut connections = 0u64;
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let out = server
                        .client("pgbench")
                        .args([
                            "-C", "-S", "-c", "8", "-j", "2", "-R", "500", "-T", "2", "-n",
                            "postgres",
                        ])
                        .output()?;
                    if !out.status.success() {
                        bail!("pgbench -C: {out:?}");
                    }
                    let text = String::from_utf8_lossy(&out.stdout);
                    connections += text
                        .lines()
                        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                        .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                }
                let per_second = connections as f64 / started.elapsed().as_secs_f64();
                drop(server);
                Ok(format!("{connections} connections, {per_second:.0}/s"))
            }))
        }
        other => bail!("follow --workload containers|pgbench, not {other:?}"),
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The agent's cost while containers start or connections fork backends.
fn follow(workload: String, seconds: u64) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = AgentConfig::from_toml_str(FOLLOW_RULES, std::path::Path::new("follow.toml"))?;
    let (mut pipeline, fallback) = Pipeline::open(
        &config,
        &PipelineOptions {
            force_procfs: false,
            marker_libraries: Vec::new(),
        },
    )?;
    if let Some(reason) = fallback {
        bail!("{reason}");
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let driver = follow_driver(&workload, std::sync::Arc::clone(&stop))?;
    // Two windows to reach the steady state (the workload's first processes
    // are described then), then the measured run.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        pipeline.next_window()?;
    }
    // The driver thread's CPU clock: its time is not the agent's.
    let driver_clock = {
        use std::os::unix::thread::JoinHandleExt;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: a live thread's handle and a clockid to write into.
        let r = unsafe { libc::pthread_getcpuclockid(driver.as_pthread_t(), &mut clock) };
        if r != 0 {
            bail!("pthread_getcpuclockid: error {r}");
        }
        clock
    };
    let driver_before = clock_ns(driver_clock);
    let cpu_before = rusage_self_ns();
    let started = Instant::now();
    let mut max_rss_kib = 0;
    let mut windows = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        pipeline.next_window()?;
        windows += 1;
        max_rss_kib = max_rss_kib.max(rss_kib());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ns = rusage_self_ns() - cpu_before;
    let driver_ns = clock_ns(driver_clock).saturating_sub(driver_before);
    stop.store(true, Ordering::Relaxed);
    let done = driver
        .join()
        .map_err(|_| anyhow::anyhow!("the workload thread panicked"))??;
    let agent_ns = cpu_ns.saturating_sub(driver_ns);
    println!(
        "{}",
        serde_json::json!({
            "bench": "follow",
            "workload": workload,
            "done": done,
            "windows": windows,
            "cpu_percent_of_one_core": 100.0 * agent_ns as f64 / 1e9 / elapsed,
            "driver_cpu_percent_of_one_core": 100.0 * driver_ns as f64 / 1e9 / elapsed,
            "rss_mib": max_rss_kib as f64 / 1024.0,
        })
    );
    Ok(())
}

#[derive(Parser)]
#[command(about = "Measurements behind BENCHMARKS.md (one JSON line per run)")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// ns per sched_switch event of the full accounting program and of the bare baseline.
    Kernel {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The agent's CPU while containers start (runc) or connections fork backends (pgbench -C).
    Follow {
        /// containers or pgbench.
        #[arg(long, default_value = "containers")]
        workload: String,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The agent's own CPU and RSS with N live processes, a window every second.
    Agent {
        #[arg(long, default_value_t = 100)]
        processes: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Sample procfs instead of eBPF.
        #[arg(long)]
        procfs: bool,
        /// N shell loops that fork+exec `sleep` every second instead of N sleepers.
        #[arg(long)]
        churn: bool,
        /// With the CPU profiler attached.
        #[arg(long)]
        profile: bool,
    },
    /// ns per marker call, not followed, followed without and with the request histogram.
    Markers {
        #[arg(long, default_value_t = 200_000)]
        pairs: u64,
        /// Alternating rounds with the uprobes (the fastest of each stands).
        #[arg(long, default_value_t = 3)]
        rounds: u64,
    },
    /// eBPF cpu_ns of three busy processes against schedstat.
    Accuracy {
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// 300 short processes: share of their CPU time accounted by eBPF and by procfs polling.
    Capture,
    /// The CPU profiler's cost at 19 Hz and 99 Hz.
    Profile {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// (child of `capture`) spins until this process has used MS of CPU time.
    #[command(hide = true)]
    Burn {
        #[arg(default_value_t = 10)]
        ms: u64,
    },
    /// (child of `accuracy`) busy PERCENT of every 20 ms, until killed.
    #[command(hide = true)]
    Duty {
        #[arg(default_value_t = 50)]
        percent: u64,
    },
    /// (child of `agent`) wakes once a second, until killed.
    #[command(hide = true)]
    Sleeper,
}

fn main() -> Result<()> {
    match Args::parse().bench {
        Bench::Kernel { seconds } => kernel(seconds),
        Bench::Agent {
            processes,
            seconds,
            procfs,
            churn,
            profile,
        } => agent(processes, seconds, procfs, churn, profile),
        Bench::Follow { workload, seconds } => follow(workload, seconds),
        Bench::Markers { pairs, rounds } => markers(pairs, rounds),
        Bench::Accuracy { seconds } => accuracy(seconds),
        Bench::Capture => capture(),
        Bench::Profile { seconds } => profile(seconds),
        Bench::Burn { ms } => {
            burn_ms(ms);
            Ok(())
        }
        Bench::Duty { percent } => {
            let percent = percent.min(100);
            loop {
                let start = Instant::now();
                burn_ms(percent / 5);
                if let Some(rest) = Duration::from_millis(20).checked_sub(start.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        Bench::Sleeper => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}
