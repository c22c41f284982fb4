//! A workload with a known CPU demand, for tests and benchmarks.
//!
//! - `sci-burn <busy_ms>`: spins until it has used `busy_ms` of its own CPU
//!   time (CLOCK_PROCESS_CPUTIME_ID, so the demand is exact under any load).
//! - `sci-burn --duty <percent> --seconds <s>`: in every 20 ms period, spins
//!   for `percent`% of it and sleeps the rest, for `s` seconds of wall time.
//!   With `--threads N`, N threads do so, thread i at `percent / (i + 1)`%.
//!   Words after `--` are ignored (they only lengthen the command line).
use sci_tests::spin::spin_thread_cpu_ns;
use std::time::{Duration, Instant};

fn spin_cpu_ns(ns: u64) {
    spin_thread_cpu_ns(ns, 200);
}

fn duty_cycle(percent: u64, end: Instant) {
    let period = Duration::from_millis(20);
    let busy_ns = period.as_nanos() as u64 * percent.min(100) / 100;
    while Instant::now() < end {
        let start = Instant::now();
        spin_cpu_ns(busy_ns);
        if let Some(rest) = period.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

#[derive(clap::Parser)]
#[command(group = clap::ArgGroup::new("demand").required(true).args(["busy_ms", "duty"]))]
struct Args {
    /// Spin until this process has used BUSY_MS of its own CPU time.
    busy_ms: Option<u64>,
    /// Busy PERCENT of every 20 ms period (with --seconds).
    #[arg(long, requires = "seconds")]
    duty: Option<u64>,
    /// Wall time of the duty cycle.
    #[arg(long, requires = "duty")]
    seconds: Option<u64>,
    /// Threads of the duty cycle, thread i at PERCENT / (i + 1).
    #[arg(long, requires = "duty", default_value_t = 1)]
    threads: u64,
    /// Words after `--`, ignored: they only shape the command line (tests of
    /// what the agent reads as a process's description).
    #[arg(last = true)]
    words: Vec<String>,
}

fn main() {
    let args: Args = clap::Parser::parse();
    if let (Some(percent), Some(seconds)) = (args.duty, args.seconds) {
        let threads = args.threads.max(1);
        let end = Instant::now() + Duration::from_secs(seconds);
        if threads == 1 {
            // On the main thread, so /proc/<pid>/schedstat tells its whole demand.
            duty_cycle(percent, end);
            return;
        }
        let workers: Vec<_> = (0..threads)
            .map(|i| std::thread::spawn(move || duty_cycle(percent / (i + 1), end)))
            .collect();
        for worker in workers {
            let _ = worker.join();
        }
        return;
    }
    spin_cpu_ns(args.busy_ms.unwrap_or(0) * 1_000_000);
}
