//! Load benchmark of the aggregator's ingest, run by `cargo xtask bench`:
//! starts the real `sci-aggregator` (plaintext, token auth, fresh SQLite),
//! then N simulated agents stream windows of W workloads each over loopback
//! as fast as acks come back (each agent keeps a few batches in flight).
//! Prints one JSON line: windows/s and workload records/s stored, p50/p99 ack
//! latency (batch sent -> its ack), and the aggregator's CPU and RSS.
//!
//! `sci-ingest-bench --aggregator PATH [--agents 8] [--workloads 50] [--batch 32] [--seconds 10]`
use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;

mod bench_support;
use bench_support::{free_port, pct, record_ack, rss_mib, stream_request};

#[derive(clap::Parser)]
#[command(about = "Load benchmark of the aggregator's ingest")]
struct Args {
    /// The sci-aggregator binary to load.
    #[arg(long)]
    aggregator: std::path::PathBuf,
    /// Simulated agents, each keeping 3 batches in flight.
    #[arg(long, default_value_t = 8)]
    agents: u64,
    /// Workload records per window.
    #[arg(long, default_value_t = 50)]
    workloads: u64,
    /// Windows per batch.
    #[arg(long, default_value_t = 32)]
    batch: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

fn window(host: &str, seq: u64, workloads: u64, now_s: u64) -> v1::WindowReport {
    v1::WindowReport {
        host: host.into(),
        agent_instance: "bench".into(),
        seq,
        datacenter: "dc".into(),
        start_unix_ns: (now_s - 600) * 1_000_000_000 + seq * 1_000_000,
        end_unix_ns: (now_s - 600) * 1_000_000_000 + (seq + 1) * 1_000_000,
        cpu_source: "ebpf".into(),
        cpus: 2,
        // What agents send since #27: the host's resource supply.
        supply: Some(v1::ResourceSupply {
            cpu_model: "AMD EPYC 7B13".into(),
            cpu_vendor: "AuthenticAMD".into(),
            arch: "x86_64".into(),
            logical_cpus: 2,
            memory_bytes: 8 << 30,
            machine_kind: "vm".into(),
            physical_host_cpus: 64,
            labels: [("pool".to_string(), host.to_string())].into(),
        }),
        host_energy_j: 0.001,
        carbon_intensity_g_per_kwh: 530.6,
        host_carbon_g: 0.001 / 3.6e6 * 530.6,
        host_embodied_g: 0.000_001,
        pue: 1.0,
        scenarios: ["credit", "drawdown", "repayment", "query", "unassigned"]
            .iter()
            .map(|s| v1::ScenarioRecord {
                scenario: s.to_string(),
                transactions: 1,
                ..Default::default()
            })
            .collect(),
        processes: (0..workloads)
            .map(|i| v1::ProcessRecord {
                pid: 1000 + i as u32,
                comm: format!("svc-{}", i % 10),
                service: format!("service-{}", i % 10),
                scenario: "query".into(),
                cpu_ns: 1_000_000,
                energy_j: 0.000_01,
                carbon_g: 0.000_000_01,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let Args {
        aggregator,
        agents,
        workloads,
        batch,
        seconds,
    } = clap::Parser::parse();
    let dir = std::env::temp_dir().join(format!("sci-ingest-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let grpc = free_port()?;
    let http = free_port()?;
    let mut config = format!(
        "grpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndatabase = \"{}\"\n",
        dir.join("bench.db").display()
    );
    for a in 0..agents {
        config.push_str(&format!(
            "[[agents]]\nhost = \"host-{a}\"\ntoken = \"token-{a}-0123456789\"\n"
        ));
    }
    std::fs::write(dir.join("aggregator.toml"), config)?;
    let mut server = Command::new(aggregator)
        .args(["serve", "--insecure", "--config"])
        .arg(dir.join("aggregator.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting sci-aggregator")?;
    let pid = server.id();
    let started = Instant::now();
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))?
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => bail!("aggregator not reachable: {e}"),
        }
    };
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stored = Arc::new(Mutex::new(0u64));
    let cpu_before = cpu_seconds(pid);
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
            let mut acks = client.stream(request).await.expect("stream").into_inner();
            let host = format!("host-{a}");
            let mut seq = 0u64;
            let mut sent_at: VecDeque<Instant> = VecDeque::new();
            while Instant::now() < deadline {
                while sent_at.len() < 3 {
                    let windows = (0..batch)
                        .map(|i| window(&host, seq + i, workloads, now_s))
                        .collect();
                    seq += batch;
                    sent_at.push_back(Instant::now());
                    if tx
                        .send(v1::AgentBatch {
                            host: host.clone(),
                            agent_instance: "bench".into(),
                            windows,
                            sent_unix_ns: 0,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                match acks.message().await {
                    Ok(Some(_)) => {
                        record_ack(&mut sent_at, &latencies, &stored, batch);
                    }
                    _ => return,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = run_start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let rss = rss_mib(pid);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let mut l = latencies.lock().expect("lock").clone();
    l.sort_by(f64::total_cmp);
    let windows = *stored.lock().expect("lock") as f64;
    // Wire size: one window of `workloads` records, protobuf-encoded, per record.
    let sample = window("host-0", 1, workloads, now_s);
    let empty = window("host-0", 1, 0, now_s);
    let bytes_per_record = (prost::Message::encoded_len(&sample)
        - prost::Message::encoded_len(&empty)) as f64
        / workloads.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "ingest",
            "agents": agents,
            "workloads_per_window": workloads,
            "batch": batch,
            "windows_per_s": windows / elapsed,
            "workload_records_per_s": windows * workloads as f64 / elapsed,
            "ack_latency_p50_ms": pct(&l, 0.5),
            "ack_latency_p99_ms": pct(&l, 0.99),
            "aggregator_cpu_percent": 100.0 * cpu / elapsed,
            "aggregator_rss_mib": rss,
            "bytes_per_workload_record": bytes_per_record,
            "bytes_per_window": prost::Message::encoded_len(&sample),
        })
    );
    Ok(())
}
