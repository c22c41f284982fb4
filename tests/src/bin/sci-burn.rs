//! A workload with a known CPU demand, for tests and benchmarks.
//!
//! - `sci-burn <busy_ms>`: spins until it has used `busy_ms` of its own CPU
//!   time (CLOCK_PROCESS_CPUTIME_ID, so the demand is exact under any load).
//! - `sci-burn --duty <percent> --seconds <s>`: in every 20 ms period, spins
//!   for `percent`% of it and sleeps the rest, for `s` seconds of wall time.
//!   With `--threads N` (after the other arguments), N threads do so, thread
//!   i at `percent / (i + 1)`%.
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    if args.first().map(String::as_str) == Some("--duty") {
        let (Some(percent), Some(seconds)) = (number(1), number(3)) else {
            eprintln!("usage: sci-burn --duty <percent> --seconds <s>");
            std::process::exit(2);
        };
        let threads = match args.get(4).map(String::as_str) {
            Some("--threads") => number(5).unwrap_or(1).max(1),
            _ => 1,
        };
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
    let Some(busy_ms) = number(0) else {
        eprintln!("usage: sci-burn <busy_ms> | --duty <percent> --seconds <s>");
        std::process::exit(2);
    };
    spin_cpu_ns(busy_ms * 1_000_000);
}
