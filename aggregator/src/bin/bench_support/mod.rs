//! Plumbing shared by the aggregator's benchmark binaries (`sci-ingest-bench`,
//! `sci-store-bench`): a free loopback port, the server's RSS,
//! acknowledged batches and percentiles.
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use sci_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident set size of a process (VmRSS), in MiB; 0 when unreadable.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// One batch of `batch` windows acknowledged: its latency (ms) runs from the
/// oldest send still unacknowledged; its windows count as stored.
pub fn record_ack(
    sent_at: &mut VecDeque<Instant>,
    latencies_ms: &Mutex<Vec<f64>>,
    stored: &Mutex<u64>,
    batch: u64,
) {
    if let Some(t) = sent_at.pop_front() {
        latencies_ms
            .lock()
            .expect("lock")
            .push(t.elapsed().as_secs_f64() * 1000.0);
        *stored.lock().expect("lock") += batch;
    }
}

/// The `p` quantile (0..=1, nearest rank) of ascending `sorted`; 0 when empty.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// The agent's stream request: batches from `rx`, authorised by `token`.
pub fn stream_request(
    rx: mpsc::Receiver<v1::AgentBatch>,
    token: &str,
) -> tonic::Request<ReceiverStream<v1::AgentBatch>> {
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}
