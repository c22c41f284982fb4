//! Cost of the Prometheus remote-write export (or, with `--protocol otlp`,
//! of the OTLP/gRPC export), run by `cargo xtask bench`:
//! the rollups of a fleet (default 2,000 hosts in 3 data centres, 60 s
//! windows for 30 minutes) are committed into a fresh SQLite store, then
//! the real exporter ([`RemoteWriter`], or [`OtlpExporter`]) sends them one
//! rollup step per request (as it does live, one request a minute) to a
//! receiver on loopback that reads each request and answers 204 (for OTLP:
//! a tonic `MetricsService` server on its own single-thread runtime, which
//! decodes each request and answers OK). Prints one JSON line:
//! the exporter's CPU per minute of fleet data (every thread's schedstat
//! runtime during the export, less the receiver thread's), compressed
//! bytes (OTLP: encoded protobuf) and samples per minute, and the number of
//! series.
//!
//! `sci-export-bench [--hosts 2000] [--datacenters 3] [--minutes 30] [--protocol otlp]`
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sci_aggregator::config::standard_weights;
use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use agent_common::otlp::opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use sci_aggregator::export::otlp::{OtlpConfig, OtlpExportStats, OtlpExporter};
use sci_aggregator::export::remote_write::{RemoteWriteConfig, RemoteWriteStats, RemoteWriter};
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{RollupLayout, Store};
use sci_proto::v1;

/// Cost of the Prometheus remote-write export.
#[derive(clap::Parser)]
struct Args {
    /// Hosts of the fleet.
    #[arg(long, default_value_t = 2000)]
    hosts: u64,
    /// Data centres the hosts are spread over.
    #[arg(long, default_value_t = 3)]
    datacenters: u64,
    /// Minutes of 60 s windows to commit and export.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// `remote-write` or `otlp`.
    #[arg(long, default_value = "remote-write")]
    protocol: String,
}

/// The OTLP receiver: takes every request; keeps its thread's CPU time.
struct Otlp {
    cpu: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl MetricsService for Otlp {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        drop(request);
        self.cpu.store(
            schedstat_ns(std::path::Path::new("/proc/thread-self/schedstat")),
            Ordering::Relaxed,
        );
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves OTLP on `listener` from one thread (its own runtime), so its CPU
/// is that thread's alone.
fn otlp_receiver(listener: std::net::TcpListener, cpu: Arc<AtomicU64>) -> Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(
            tokio::net::TcpListener::from_std(listener)?,
        );
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(Otlp { cpu }))
            .serve_with_incoming(incoming)
            .await
            .context("the OTLP receiver")
    })
}

const SCENARIOS: [&str; 5] = ["credit", "drawdown", "repayment", "query", "unassigned"];

fn window(host: u64, dc: u64, seq: u64, start_s: u64) -> v1::WindowReport {
    let l = 60.0;
    v1::WindowReport {
        host: format!("host-{host}"),
        agent_instance: "bench".into(),
        seq,
        datacenter: format!("dc-{dc}"),
        start_unix_ns: start_s * 1_000_000_000,
        end_unix_ns: (start_s + 60) * 1_000_000_000,
        cpu_source: "ebpf".into(),
        cpus: 8,
        busy_cpu_ns: 120_000_000_000,
        idle_cpu_ns: 360_000_000_000,
        energy_source: "model-linear".into(),
        estimated: true,
        host_energy_j: 150.0 * l,
        idle_energy_j: 80.0 * l,
        carbon_intensity_g_per_kwh: 530.6,
        pue: 1.3,
        host_carbon_g: 150.0 * l / 3.6e6 * 530.6 * 1.3,
        host_embodied_g: 0.001 * l,
        scenarios: SCENARIOS
            .iter()
            .enumerate()
            .map(|(i, s)| v1::ScenarioRecord {
                scenario: s.to_string(),
                transactions: (60 * (5 - i as u64)) / 2,
                cpu_ns: 18_000_000_000,
                energy_j: 10.0 * l,
                carbon_g: 0.002 * l,
                embodied_g: 0.0002 * l,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A thread's CPU time from its schedstat (the scheduler's runtime, ns).
fn schedstat_ns(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of every live thread of this process, ns (the runtime's
/// blocking threads stay alive 10 s after their work, so they are counted).
fn process_cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .map(|t| schedstat_ns(&t.path().join("schedstat")))
                .sum()
        })
        .unwrap_or(0)
}

/// Answers every request 204 after reading it; keeps its own CPU time (ns)
/// in `cpu` after each request, to be taken out of the process's.
fn receiver(listener: std::net::TcpListener, bytes: Arc<AtomicU64>, cpu: Arc<AtomicU64>) {
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + 4 + length {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            bytes.fetch_add(length as u64, Ordering::Relaxed);
            buf.drain(..head_end + 4 + length);
            if s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .is_err()
            {
                break;
            }
            cpu.store(
                schedstat_ns(std::path::Path::new("/proc/thread-self/schedstat")),
                Ordering::Relaxed,
            );
        }
    }
}

fn main() -> Result<()> {
    let Args {
        hosts,
        datacenters: dcs,
        minutes,
        protocol,
    } = clap::Parser::parse();
    let otlp = match protocol.as_str() {
        "remote-write" => false,
        "otlp" => true,
        other => anyhow::bail!("--protocol {other:?}: remote-write or otlp"),
    };
    let dir = std::env::temp_dir().join(format!("sci-export-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let layout = RollupLayout {
        step_s: 60,
        host_step_s: 3600,
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_with(
        &dir.join("sci.db"),
        layout,
        Duration::from_secs(60),
    )?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let origin = (now / 3600 - 2) * 3600;
    for m in 0..minutes {
        let batch: Vec<v1::WindowReport> = (0..hosts)
            .map(|h| window(h, h % dcs, m, origin + 60 * m))
            .collect();
        store.commit(&batch)?;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (bytes, receiver_cpu_ns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    {
        let (b, c) = (Arc::clone(&bytes), Arc::clone(&receiver_cpu_ns));
        std::thread::spawn(move || {
            if otlp {
                if let Err(e) = otlp_receiver(listener, c) {
                    eprintln!("{e:#}");
                }
            } else {
                receiver(listener, b, c)
            }
        });
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let (rw_stats, otlp_stats) = (
        Arc::new(RemoteWriteStats::default()),
        Arc::new(OtlpExportStats::default()),
    );
    let cpu_before = process_cpu_ns();
    let started = std::time::Instant::now();
    let until = Some(origin + 60 * minutes);
    runtime.block_on(async {
        if otlp {
            let cfg = OtlpConfig {
                endpoint: format!("http://127.0.0.1:{port}"),
                delay: Duration::ZERO,
                max_steps_per_request: 1,
                ..Default::default()
            };
            let mut exporter = OtlpExporter::open(
                cfg,
                dir.join("state.json"),
                Arc::clone(&store),
                standard_weights(),
                Arc::clone(&otlp_stats),
                Some(origin),
            )?;
            exporter.run(until).await
        } else {
            let cfg = RemoteWriteConfig {
                url: format!("http://127.0.0.1:{port}/api/v1/write"),
                delay: Duration::ZERO,
                max_steps_per_request: 1,
                ..Default::default()
            };
            let mut writer = RemoteWriter::open(
                cfg,
                dir.join("state.json"),
                Arc::clone(&store),
                standard_weights(),
                Arc::clone(&rw_stats),
                Some(origin),
            )?;
            writer.run(until).await
        }
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    // The main thread's share of the setup (the commits) is in cpu_before.
    let cpu_ms = (process_cpu_ns() - cpu_before) as f64 / 1e6
        - receiver_cpu_ns.load(Ordering::Relaxed) as f64 / 1e6;
    let (samples, bytes) = if otlp {
        (
            otlp_stats.client.points_sent.load(Ordering::Relaxed) as f64,
            otlp_stats.client.bytes_sent.load(Ordering::Relaxed) as f64,
        )
    } else {
        (
            rw_stats.samples_sent.load(Ordering::Relaxed) as f64,
            bytes.load(Ordering::Relaxed) as f64,
        )
    };
    let series = samples / minutes as f64;
    std::fs::remove_dir_all(&dir).context("removing the scratch store")?;
    println!(
        "{}",
        serde_json::json!({
            "exporter_cpu_ms_per_min": cpu_ms / minutes as f64,
            "bytes_per_min": bytes / minutes as f64,
            "samples_per_min": samples / minutes as f64,
            "series": series,
            "wall_ms_per_min": wall_s * 1000.0 / minutes as f64,
        })
    );
    Ok(())
}
