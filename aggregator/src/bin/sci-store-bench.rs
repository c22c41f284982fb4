//! The fleet at real size, run by `cargo xtask bench` on SQLite and on
//! PostgreSQL: a month of a fleet (default 2,000 hosts in 3 data centres,
//! 1 h windows: the month's rollups) is written into a fresh store through
//! the store's commit (one transaction per hour of the fleet), then the real
//! `sci-aggregator` serves it while simulated agents stream 10 s windows of
//! 50 workloads over gRPC and /api/v1/sci (30 days, hourly) and /dashboard
//! (30 days) run in a loop. Prints one JSON line: query times, ingest
//! windows/s and p99 ack while the queries run, the aggregator's peak RSS,
//! bytes on disk per raw window (measured on the streamed 10 s windows) and
//! per host-day of rollups, and the raw volume of a day of the fleet at
//! 10 s windows at that size.
//!
//! `sci-store-bench --aggregator PATH [--postgres-url URL] [--hosts 2000]
//!  [--days 30] [--agents 8] [--seconds 30] [--rate 2400] [--backfill-workloads 10]`
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sci_aggregator::config::AggregatorConfig;
use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;

mod bench_support;
use bench_support::{free_port, pct, record_ack, rss_mib, stream_request};

#[derive(clap::Parser)]
#[command(
    about = "The fleet at real size: a month of rollups in a fresh store, queries under ingest"
)]
struct Args {
    /// The sci-aggregator binary to serve the store.
    #[arg(long)]
    aggregator: std::path::PathBuf,
    /// Store in this PostgreSQL database instead of a fresh SQLite file.
    #[arg(long)]
    postgres_url: Option<String>,
    #[arg(long, default_value_t = 2000)]
    hosts: u64,
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Simulated agents streaming while the queries loop.
    #[arg(long, default_value_t = 8)]
    agents: u64,
    /// How long the agents stream while the queries loop.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Workloads per window of the month's backfill.
    #[arg(long, default_value_t = 10)]
    backfill_workloads: u64,
    /// The month is already in the store (a previous run's database).
    #[arg(long)]
    skip_backfill: bool,
    /// Offered load: windows/s over all agents (open loop: batches leave on a
    /// timer, whatever the acks do, so ack latency is not set by the bench's
    /// own queue). 0: closed loop, 3 batches in flight per agent.
    #[arg(long, default_value_t = 2400)]
    rate: u64,
}

/// GET on loopback: (status, body bytes, seconds).
fn http_get(port: u16, path: &str) -> Result<(u16, usize, f64)> {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body[..body.len().min(64)]).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.len(), started.elapsed().as_secs_f64()))
}

const SCENARIOS: [&str; 5] = ["credit", "drawdown", "repayment", "query", "unassigned"];

/// One window of `host` over [start_s, start_s + length_s) with `workloads`
/// processes over 24 services.
fn window(
    host: u64,
    dc: u64,
    instance: &str,
    seq: u64,
    start_s: u64,
    length_s: u64,
    workloads: u64,
) -> v1::WindowReport {
    let l = length_s as f64;
    v1::WindowReport {
        host: format!("host-{host}"),
        agent_instance: instance.into(),
        seq,
        datacenter: format!("dc-{dc}"),
        start_unix_ns: start_s * 1_000_000_000,
        end_unix_ns: (start_s + length_s) * 1_000_000_000,
        cpu_source: "ebpf".into(),
        cpus: 8,
        busy_cpu_ns: length_s * 2_000_000_000,
        idle_cpu_ns: length_s * 6_000_000_000,
        steal_cpu_ns: length_s * 10_000_000,
        energy_source: "model-linear".into(),
        energy_model: "linear 10-35 W per vCPU".into(),
        estimated: true,
        host_energy_j: 150.0 * l,
        idle_energy_j: 80.0 * l,
        carbon_intensity_g_per_kwh: 530.6 + 50.0 * dc as f64,
        intensity_source: format!("region:dc-{dc}"),
        pue: 1.3,
        host_carbon_g: 150.0 * l / 3.6e6 * (530.6 + 50.0 * dc as f64) * 1.3,
        host_embodied_g: 0.001 * l,
        embodied: Some(v1::EmbodiedFactors {
            total_embodied_g: 1_000_000.0,
            lifespan_s: 4.0 * 365.0 * 86_400.0,
            resource_share: 8.0 / 64.0,
            share_source: "vm: 8 of 64 vCPUs".into(),
        }),
        scenarios: SCENARIOS
            .iter()
            .enumerate()
            .map(|(i, s)| v1::ScenarioRecord {
                scenario: s.to_string(),
                transactions: (length_s * (5 - i as u64)) / 2,
                cpu_ns: length_s * 300_000_000,
                energy_j: 10.0 * l,
                carbon_g: 0.002 * l,
                embodied_g: 0.0002 * l,
                ..Default::default()
            })
            .collect(),
        processes: (0..workloads)
            .map(|i| v1::ProcessRecord {
                pid: 1000 + i as u32,
                comm: format!("svc-{}", i % 24),
                service: format!("service-{}", i % 24),
                scenario: SCENARIOS[(i % 5) as usize].into(),
                cpu_ns: length_s * 40_000_000,
                energy_j: 0.8 * l,
                idle_share_j: 0.5 * l,
                carbon_g: 0.0002 * l,
                ..Default::default()
            })
            .collect(),
        profile: (0..5)
            .map(|i| v1::ProfileStack {
                service: format!("service-{i}"),
                scenario: SCENARIOS[i % 4].into(),
                stack: format!("main;handle;work_{i};hot_{}", i % 2),
                samples: 19 * length_s,
                energy_j: 0.5 * l,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// (raw bytes: raw windows + dedupe keys, rollup bytes) from the store's
/// per-table usage.
fn split_usage(usage: &BTreeMap<String, u64>) -> (u64, u64) {
    let mut raw = 0;
    let mut rollups = 0;
    for (name, bytes) in usage {
        if name.starts_with("windows_raw") || name.starts_with("window_keys") {
            raw += bytes;
        } else if name.contains("_rollup") || name == "hosts" {
            rollups += bytes;
        }
    }
    (raw, rollups)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let Args {
        aggregator,
        postgres_url,
        hosts,
        days,
        agents,
        seconds,
        backfill_workloads,
        skip_backfill,
        rate,
    } = clap::Parser::parse();
    let workloads = 50;
    let batch = 32;
    let dir = std::env::temp_dir().join(format!("sci-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let grpc = free_port()?;
    let http = free_port()?;
    let mut text = format!(
        "grpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndatabase = \"{}\"\nperiod = \"1h\"\nmax_concurrent_queries = 8\n",
        dir.join("bench.db").display()
    );
    if let Some(url) = &postgres_url {
        text.push_str(&format!("postgres_url = \"{url}\"\n"));
    }
    for a in 0..agents {
        text.push_str(&format!(
            "[[agents]]\nhost = \"host-{a}\"\ntoken = \"token-{a}-0123456789\"\n"
        ));
    }
    let config_path = dir.join("aggregator.toml");
    std::fs::write(&config_path, &text)?;
    let config = AggregatorConfig::load(&config_path)?;

    // The month, one hour of the whole fleet per commit.
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let first_hour = (now_s / 3600 - days * 24) * 3600;
    let backfill_started = Instant::now();
    // The store's clients block: off the async runtime.
    let backfill_config = config.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let config = backfill_config;
        let store = config.open_store()?;
        for h in 0..days * 24 {
            if skip_backfill {
                break;
            }
            let windows: Vec<v1::WindowReport> = (0..hosts)
                .map(|host| {
                    window(
                        host,
                        host % 3,
                        "month",
                        h,
                        first_hour + h * 3600,
                        3600,
                        backfill_workloads,
                    )
                })
                .collect();
            store.commit(&windows)?;
        }
        Ok(())
    })
    .await??;
    let backfill_s = backfill_started.elapsed().as_secs_f64();
    let month_windows = hosts * days * 24;
    // Steady state: raw windows past the raw retention (7 days) are gone,
    // as the aggregator's hourly retention pass would have done.
    let usage_config = config.clone();
    let usage_before = tokio::task::spawn_blocking(move || -> Result<_> {
        let store = usage_config.open_store()?;
        let expired = store.expire(now_s, &usage_config.retention())?;
        eprintln!("retention before serving: {expired:?}");
        // What an operator does after a bulk load: the month was written in
        // minutes, not over a month, so autovacuum would otherwise visit
        // every table it just grew during the measured minute and take a
        // core of the host from ingest there; and the checkpoint the load's
        // WAL started would still be writing out its pages, and syncing
        // them, while ingest is timed.
        if let Some(url) = &usage_config.postgres_url {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            for statement in ["VACUUM (ANALYZE)", "CHECKPOINT"] {
                let started = Instant::now();
                client.batch_execute(statement)?;
                eprintln!(
                    "{statement} after the backfill: {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(store.disk_usage()?)
    })
    .await??;

    let mut server = Command::new(&aggregator)
        .args(["serve", "--insecure", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join("aggregator.log"),
        )?))
        .spawn()
        .context("starting sci-aggregator")?;
    let pid = server.id();
    let started = Instant::now();
    loop {
        if let Ok((200, _, _)) = http_get(http, "/healthz") {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = server.kill();
            bail!("aggregator not ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let to = now_s + 1;
    let from = to - days * 86_400;
    let sci_path = format!("/api/v1/sci?from={from}&to={to}&period=3600");
    let dashboard_path = format!("/dashboard?from={from}&to={to}&period=3600");
    // Idle: each query alone (best of 3 after a first run).
    let mut alone = BTreeMap::new();
    for (name, path) in [("sci", &sci_path), ("dashboard", &dashboard_path)] {
        let mut times = Vec::new();
        for _ in 0..3 {
            let (status, bytes, s) = http_get(http, path)?;
            if status != 200 {
                bail!("{path}: HTTP {status}");
            }
            eprintln!("{name}: {s:.3} s, {bytes} bytes");
            times.push(s);
        }
        times.sort_by(f64::total_cmp);
        alone.insert(name, times[1]);
    }
    let (metrics_status, _, metrics_s) = http_get(http, "/metrics")?;

    // Ingest while the queries loop; the peak RSS sampled throughout.
    let peak_rss = Arc::new(Mutex::new(rss_mib(pid)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak_rss, stop) = (Arc::clone(&peak_rss), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rss = rss_mib(pid);
                let mut peak = peak_rss.lock().unwrap_or_else(|p| p.into_inner());
                *peak = peak.max(rss);
                drop(peak);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let query_times: Arc<Mutex<BTreeMap<&'static str, Vec<f64>>>> = Arc::default();
    let querier = {
        let (stop, query_times) = (Arc::clone(&stop), Arc::clone(&query_times));
        let (sci_path, dashboard_path) = (sci_path.clone(), dashboard_path.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (name, path) in [("sci", &sci_path), ("dashboard", &dashboard_path)] {
                    if let Ok((200, _, s)) = http_get(http, path) {
                        query_times
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(name)
                            .or_default()
                            .push(s);
                    }
                }
            }
        })
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))?
        .connect()
        .await?;
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stored = Arc::new(Mutex::new(0u64));
    let run_start = Instant::now();
    let deadline = run_start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for a in 0..agents {
        let channel = channel.clone();
        let latencies = Arc::clone(&latencies);
        let stored = Arc::clone(&stored);
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<v1::AgentBatch>(4);
            let mut client = IngestClient::new(channel).max_decoding_message_size(64 << 20);
            let request = stream_request(rx, &format!("token-{a}-0123456789"));
            let Ok(response) = client.stream(request).await else {
                return;
            };
            let mut acks = response.into_inner();
            // Acks are read by their own task: a sender held up by the
            // server's backpressure must not leave acks unread (which would
            // hold the server's stream, and count its wait as ack latency).
            let sent_at: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
            let acked = Arc::new(tokio::sync::Notify::new());
            let reader = {
                let (sent_at, acked) = (Arc::clone(&sent_at), Arc::clone(&acked));
                tokio::spawn(async move {
                    while let Ok(Some(_)) = acks.message().await {
                        let mut sent = sent_at.lock().unwrap_or_else(|p| p.into_inner());
                        record_ack(&mut sent, &latencies, &stored, batch);
                        drop(sent);
                        acked.notify_one();
                    }
                })
            };
            let mut seq = 0u64;
            // A new agent instance per run: its windows are new in a reused store.
            let instance = format!("load-{now_s}");
            let interval = (rate > 0)
                .then(|| Duration::from_secs_f64(batch as f64 * agents as f64 / rate as f64));
            let mut next_send = Instant::now();
            // 10 s windows from 5 days ago on, in order (an agent's backlog
            // after an outage: inside the month and the raw retention).
            let day_start = now_s - 5 * 86_400;
            while Instant::now() < deadline {
                match interval {
                    Some(i) => {
                        tokio::time::sleep_until(next_send.into()).await;
                        next_send += i;
                    }
                    None => {
                        let in_flight = || sent_at.lock().unwrap_or_else(|p| p.into_inner()).len();
                        while in_flight() >= 3 && Instant::now() < deadline {
                            let _ =
                                tokio::time::timeout_at(deadline.into(), acked.notified()).await;
                        }
                    }
                }
                // The deadline ends the offer too: a server that falls
                // behind must not keep the bench sending its backlog.
                if Instant::now() >= deadline {
                    break;
                }
                let windows = (0..batch)
                    .map(|i| {
                        let s = seq + i;
                        window(a, a % 3, &instance, s, day_start + s * 10, 10, workloads)
                    })
                    .collect();
                seq += batch;
                sent_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(Instant::now());
                let batch = v1::AgentBatch {
                    host: format!("host-{a}"),
                    agent_instance: instance.clone(),
                    windows,
                    sent_unix_ns: 0,
                };
                match tokio::time::timeout_at(deadline.into(), tx.send(batch)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            // Acks still due after the deadline are not counted.
            tokio::time::sleep_until(deadline.into()).await;
            reader.abort();
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = querier.join();
    let _ = sampler.join();
    let peak_rss = *peak_rss.lock().unwrap_or_else(|p| p.into_inner());
    let _ = server.kill();
    let _ = server.wait();

    let usage_config = config.clone();
    let usage_after = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok(usage_config.open_store()?.disk_usage()?)
    })
    .await??;
    let (raw_before, rollups_bytes) = split_usage(&usage_before);
    let (raw_after, _) = split_usage(&usage_after);
    let streamed = *stored.lock().expect("lock");
    let bytes_per_raw_window = raw_after.saturating_sub(raw_before) as f64 / streamed.max(1) as f64;
    let mut l = latencies.lock().expect("lock").clone();
    l.sort_by(f64::total_cmp);
    let mut q = query_times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for v in q.values_mut() {
        v.sort_by(f64::total_cmp);
    }
    let loaded = |name: &str, p: f64| q.get(name).map(|v| pct(v, p)).unwrap_or(f64::NAN);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "bench": "store",
            "store": if postgres_url.is_some() { "postgresql" } else { "sqlite" },
            "hosts": hosts,
            "days": days,
            "month_windows": month_windows,
            "backfill_windows_per_s": month_windows as f64 / backfill_s,
            "sci_30d_hourly_s": alone["sci"],
            "dashboard_30d_s": alone["dashboard"],
            "metrics_s": metrics_s,
            "metrics_status": metrics_status,
            "sci_30d_hourly_under_ingest_p50_s": loaded("sci", 0.5),
            "sci_30d_hourly_under_ingest_max_s": loaded("sci", 1.0),
            "dashboard_30d_under_ingest_p50_s": loaded("dashboard", 0.5),
            "dashboard_30d_under_ingest_max_s": loaded("dashboard", 1.0),
            "queries_under_ingest": q.values().map(Vec::len).sum::<usize>(),
            "ingest_windows_per_s": streamed as f64 / elapsed,
            "offered_windows_per_s": rate,
            "ack_latency_p50_ms": pct(&l, 0.5),
            "ack_latency_p99_ms": pct(&l, 0.99),
            "aggregator_peak_rss_mib": peak_rss,
            "bytes_per_raw_window": bytes_per_raw_window,
            "rollup_bytes_per_host_day": rollups_bytes as f64 / (hosts * days) as f64,
            "raw_bytes_per_fleet_day_at_10s": bytes_per_raw_window * hosts as f64 * 8640.0,
            "disk_bytes_total": usage_after.get("total").copied().unwrap_or(0),
        })
    );
    Ok(())
}
