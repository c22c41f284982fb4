//! Per-request CPU histogram (#15): the marker uprobes add each request's CPU
//! time on its thread, between sci_scenario_begin and sci_scenario_end, to a
//! per-(process, scenario) log-linear histogram in the kernel. Ground truth: the
//! thread's own CPU clock (CLOCK_THREAD_CPUTIME_ID) around each request.
//! The kernel's interval starts inside the begin call's uprobe trap and ends
//! inside the end call's, so a request's true cost lies between the work
//! alone and the work with both marker calls. On this VM a trap costs tens
//! of microseconds when the thread has just woken (40-90 us measured for the
//! pair), a tenth of the smallest requests: the check is against that band,
//! not a single figure.
//! Some requests sleep half-way (switched out and back in), others are
//! preempted by a contending thread, so both the switch path and the marker
//! estimates are exercised. Privileged: skipped (with one line) without root
//! outside CI.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_common::{request_cpu_bucket, SCENARIO_CREDIT, SCENARIO_QUERY};
use sci_agent::sources::sched::ebpf::{EbpfOptions, EbpfSampler};
use sci_agent::sources::sched::CpuSampler;
use sci_tests::skip_privileged;
use sci_tests::spin::{spin_thread_cpu_ns, thread_cpu_ns};

/// (inner, outer) CPU ns of one request: the work alone, and the work with
/// both marker calls.
fn request(scenario: u32, work_ns: u64, sleep_half_way: bool) -> (u64, u64) {
    let t0 = thread_cpu_ns();
    sci_marker::sci_scenario_begin(scenario);
    let t1 = thread_cpu_ns();
    if sleep_half_way {
        spin_thread_cpu_ns(work_ns / 2, 50);
        std::thread::sleep(Duration::from_millis(2));
        spin_thread_cpu_ns(work_ns - work_ns / 2, 50);
    } else {
        spin_thread_cpu_ns(work_ns, 50);
    }
    let t2 = thread_cpu_ns();
    sci_marker::sci_scenario_end(scenario, 1);
    let t3 = thread_cpu_ns();
    (t2 - t1, t3 - t0)
}

#[test]
fn each_request_lands_in_its_bucket() {
    if skip_privileged("each_request_lands_in_its_bucket") {
        return;
    }
    let mut sampler = EbpfSampler::load(&EbpfOptions::default()).unwrap();
    // This test binary links libsci_marker statically: follow its own symbols.
    sampler
        .attach_markers(&std::env::current_exe().unwrap())
        .unwrap();
    sampler.sample().unwrap();

    // A thread that competes for the CPUs, so that some requests are preempted.
    let stop = Arc::new(AtomicBool::new(false));
    let contender = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                spin_thread_cpu_ns(3_000_000, 50);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Requests of 1.5 x 2^k ns (the middle of a log2 bucket) and of 2^k ns
    // x 1.1 and x 1.9 (near the edges), from ~100 us to ~50 ms.
    let worker = std::thread::spawn(|| {
        let mut truth: Vec<(u32, u64, u64)> = Vec::new();
        for k in 17..26u32 {
            for (i, factor) in [1.1, 1.5, 1.9].into_iter().enumerate() {
                let work_ns = ((1u64 << k) as f64 * factor) as u64;
                let scenario = if i == 1 {
                    SCENARIO_QUERY
                } else {
                    SCENARIO_CREDIT
                };
                let (inner, outer) = request(scenario, work_ns, k % 2 == 0);
                truth.push((scenario, inner, outer));
            }
        }
        truth
    });
    let truth = worker.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    contender.join().unwrap();
    let window = sampler.sample().unwrap();
    assert_eq!(window.lost.request_histogram_full, 0);

    let me = window
        .processes
        .iter()
        .find(|p| p.pid == std::process::id())
        .expect("the test process is in the window");
    for scenario in [SCENARIO_CREDIT, SCENARIO_QUERY] {
        let mine: Vec<(u64, u64)> = truth
            .iter()
            .filter(|(s, _, _)| *s == scenario)
            .map(|(_, inner, outer)| (*inner, *outer))
            .collect();
        let histogram = me
            .request_cpu
            .iter()
            .find(|h| h.scenario == scenario)
            .unwrap_or_else(|| panic!("no histogram for scenario {scenario}"));
        let kernel_requests: u64 = histogram.counts.iter().sum();
        assert_eq!(
            kernel_requests,
            mine.len() as u64,
            "scenario {scenario}: requests"
        );
        assert_eq!(
            kernel_requests, me.scenario_transactions[scenario as usize],
            "histogram and transaction count agree"
        );

        let work_ns: u64 = mine.iter().map(|(inner, _)| inner).sum();
        let marked_ns: u64 = mine.iter().map(|(_, outer)| outer).sum();
        println!(
            "scenario {scenario}: {kernel_requests} requests, kernel {} ns, work alone {work_ns} ns, with markers {marked_ns} ns, counts {:?}",
            histogram.sum_cpu_ns, histogram.counts
        );
        // 1% either side for the estimate inside a running slice.
        assert!(
            histogram.sum_cpu_ns as f64 >= work_ns as f64 * 0.99
                && histogram.sum_cpu_ns as f64 <= marked_ns as f64 * 1.01,
            "scenario {scenario}: sum {} ns outside [{work_ns}, {marked_ns}] ns",
            histogram.sum_cpu_ns
        );

        // Every request in a bucket its band reaches (1% either side): per
        // bucket, the kernel's count lies between the requests surely there
        // and those that may be.
        let mut sure = vec![0u64; agent_common::REQUEST_CPU_BUCKETS];
        let mut may = vec![0u64; agent_common::REQUEST_CPU_BUCKETS];
        for (inner, outer) in &mine {
            let (low, high) = (
                request_cpu_bucket((*inner as f64 * 0.99) as u64),
                request_cpu_bucket((*outer as f64 * 1.01) as u64),
            );
            if low == high {
                sure[low] += 1;
            }
            for count in &mut may[low..=high] {
                *count += 1;
            }
        }
        for b in 0..agent_common::REQUEST_CPU_BUCKETS {
            let got = histogram.counts.get(b).copied().unwrap_or(0);
            assert!(
                sure[b] <= got && got <= may[b],
                "scenario {scenario} bucket {b}: kernel {got}, truth between {} and {}",
                sure[b],
                may[b]
            );
        }
    }
}

/// The aggregator's per-request CPU distribution of `service` (the last
/// 24 h) from `/api/v1/distributions`, if it has one.
fn distribution(http: u16, service: &str) -> Option<serde_json::Value> {
    let (status, body) =
        sci_tests::fleet::http_get(http, &format!("/api/v1/distributions?service={service}"))?;
    assert_eq!(status, 200, "{body}");
    let found: serde_json::Value = serde_json::from_str(&body).unwrap();
    found.as_array()?.first().cloned()
}

/// Issue 24, end to end: 1000 real requests whose CPU times are the exact
/// quantiles (i + 0.5) / 1000 of a log-normal distribution (median 5 ms,
/// sigma 0.6), marked in a process the agent follows; the kernel's
/// histograms go through the agent's window, gRPC, the aggregator's
/// rollups and the review's distribution. p50/p90/p99 must be within 5% of
/// the distribution's exact quantiles (log2 bins put p90 and p99 20-30% high).
#[test]
fn lognormal_percentiles_end_to_end_within_five_percent() {
    use statrs::distribution::{ContinuousCDF, LogNormal};
    use std::io::Write;
    use std::process::{Command, Stdio};
    if skip_privileged("lognormal_percentiles_end_to_end_within_five_percent") {
        return;
    }
    const TOKEN: &str = "lognormal-token-0123456789abcdef";
    let aggregator = sci_tests::cargo_bin("sci-aggregator", "sci-aggregator");
    let agent = sci_tests::cargo_bin("sci-agent", "sci-agent");
    let requests_bin = sci_tests::cargo_bin("sci-tests", "sci-requests");
    let dir = tempfile::tempdir().unwrap();
    // The service's processes are told apart by their command name.
    let service_bin = dir.path().join("cf-lognormal");
    std::os::unix::fs::symlink(&requests_bin, &service_bin).unwrap();
    let (grpc, http, metrics) = (
        sci_tests::fleet::free_port(),
        sci_tests::fleet::free_port(),
        sci_tests::fleet::free_port(),
    );
    let agg_toml = dir.path().join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "grpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndatabase = \"{}\"\n\
             period = \"5s\"\nrollup_step = \"5s\"\nhost_rollup_step = \"5s\"\n\n\
             [[agents]]\nhost = \"lognormal-host\"\ntoken = \"{TOKEN}\"\n",
            dir.path().join("sci.db").display()
        ),
    )
    .unwrap();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\nhost = \"lognormal-host\"\ndatacenter = \"lognormal-dc\"\ninterval = \"1000ms\"\nspool_dir = \"{}\"\n\
             metrics_listen = \"127.0.0.1:{metrics}\"\n\n\
             [aggregator]\nurl = \"http://127.0.0.1:{grpc}\"\ntoken = \"{TOKEN}\"\n\n[scenarios]\n\
             [[scenarios.rules]]\nservice = \"lognormal-svc\"\ncomm = \"cf-lognormal\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let agg = Command::new(&aggregator)
        .args(["serve", "--insecure", "--config"])
        .arg(&agg_toml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("aggregator.err")).unwrap())
        .spawn()
        .unwrap();
    let mut fleet = sci_tests::procs::Reaped(vec![agg]);
    sci_tests::wait_until("the aggregator is healthy", || {
        matches!(sci_tests::fleet::http_get(http, "/healthz"), Some((200, _)))
    });
    let agent_child = Command::new(&agent)
        .args(["run", "--insecure", "--config"])
        .arg(&agent_toml)
        .arg("--markers")
        .arg(&requests_bin)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
        .spawn()
        .unwrap();
    fleet.0.push(agent_child);
    // eBPF loaded, markers followed: the agent's first window is stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let exposition = sci_tests::fleet::http_get(http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let stored = sci_tests::fleet::metric_value(
            &exposition,
            "sci_ingest_windows_total{result=\"accepted\"}",
        );
        if stored.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no window stored after 60 s: {}\n{}",
            std::fs::read_to_string(dir.path().join("agent.err")).unwrap_or_default(),
            exposition
                .lines()
                .filter(|l| l.contains("ingest"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let lognormal = LogNormal::new(5e6f64.ln(), 0.6).unwrap();
    let n = 1000usize;
    let work: Vec<u64> = (0..n)
        .map(|i| lognormal.inverse_cdf((i as f64 + 0.5) / n as f64) as u64)
        .collect();
    let mut child = Command::new(&service_bin)
        .arg(SCENARIO_CREDIT.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for ns in &work {
            writeln!(stdin, "{ns}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sci-requests failed");
    let truth: Vec<(u64, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(truth.len(), n);

    // Every request's window stored: the distribution counts all of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let d = loop {
        let found = distribution(http, "lognormal-svc");
        if let Some(d) = found.filter(|d| d["requests"].as_f64() == Some(n as f64)) {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 20 s the stored distribution is {:?}; all from /api/v1/distributions: {:?}",
            distribution(http, "lognormal-svc"),
            sci_tests::fleet::http_get(http, "/api/v1/distributions")
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(d["scenario"], "credit", "{d}");
    // The exact mean lies between the work alone and the work with markers.
    let (inner_ns, outer_ns): (u64, u64) = (
        truth.iter().map(|t| t.0).sum(),
        truth.iter().map(|t| t.1).sum(),
    );
    let mean = d["mean_cpu_ns"].as_f64().unwrap();
    assert!(
        mean >= inner_ns as f64 / n as f64 * 0.99 && mean <= outer_ns as f64 / n as f64 * 1.01,
        "mean {mean} ns outside the truth's band"
    );
    let sorted = |pick: fn(&(u64, u64)) -> u64| {
        let mut v: Vec<u64> = truth.iter().map(pick).collect();
        v.sort_unstable();
        v
    };
    let (inner, outer) = (sorted(|t| t.0), sorted(|t| t.1));
    let mut errors = Vec::new();
    for (q, key) in [
        (0.5, "p50_cpu_ns"),
        (0.9, "p90_cpu_ns"),
        (0.99, "p99_cpu_ns"),
    ] {
        let exact = lognormal.inverse_cdf(q);
        let got = d[key].as_f64().unwrap();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        println!(
            "{key}: log-normal {exact:.0} ns, requests {}..{} ns (work alone..with markers), review {got:.0} ns, error {:+.2}%",
            inner[rank],
            outer[rank],
            (got / exact - 1.0) * 100.0
        );
        errors.push((key, got / exact - 1.0));
    }
    for (key, error) in errors {
        assert!(error.abs() < 0.05, "{key}: error {:+.2}%", error * 100.0);
    }
}
