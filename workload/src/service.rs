//! `sci-finance-service`: a TCP line-protocol server for one role.
//!
//! Protocol (one request per line, answered in order on the connection):
//! `<scenario> <request-id>` is answered `ok <request-id>` (a completed
//! transaction) or `err <request-id> <reason>` (refused by the business, or
//! not served); `stats` is answered with the process's own counters.
//!
//! The async side only parses and forwards: every flow runs on one of the
//! role's worker threads, each with its own SQLite connection, so the thread
//! that burns the CPU is the one the shared role's markers
//! (`sci_scenario_begin` / `sci_scenario_end`) are called on. Dedicated roles
//! never call the markers (their binary is the same file, so a uprobe on it
//! would otherwise count their flows twice); they report completions over UDP
//! ingest instead.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::error::WorkloadError;
use crate::flows::{DataSizes, FinanceDb, FlowOutcome};
use crate::ingest::{IngestReporter, FLUSH_INTERVAL};
use crate::scenario::{Role, Scenario, ScenarioCounters};
use crate::sys::thread_cpu_ns;

/// Longest request line accepted, newline excluded.
pub const MAX_LINE_BYTES: usize = 256;
const QUEUE_DEPTH: usize = 1024;
/// At shutdown, how long requests already taken may take to be answered.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub role: Role,
    /// Loopback address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Agent ingest endpoint for completed transactions (dedicated roles only).
    pub ingest_udp: Option<SocketAddr>,
    /// Database file; None: a file in the temp directory, removed at exit.
    pub db_path: Option<PathBuf>,
    pub workers: usize,
    pub sizes: DataSizes,
    pub max_connections: usize,
    /// SHA-256 rounds of the credit identity check (None: the default 1000).
    pub identity_rounds: Option<u32>,
}

impl ServiceConfig {
    pub fn new(role: Role, listen: SocketAddr) -> Self {
        ServiceConfig {
            role,
            listen,
            ingest_udp: None,
            db_path: None,
            workers: 2,
            sizes: DataSizes::default(),
            max_connections: 512,
            identity_rounds: None,
        }
    }
}

/// The process's own per-scenario counters.
#[derive(Debug, Default)]
pub struct ServiceStats {
    completed: [AtomicU64; 4],
    refused: [AtomicU64; 4],
    errors: [AtomicU64; 4],
    cpu_ns: [AtomicU64; 4],
}

impl ServiceStats {
    pub fn completed(&self, s: Scenario) -> u64 {
        self.completed[s.index()].load(Ordering::Relaxed)
    }
    pub fn refused(&self, s: Scenario) -> u64 {
        self.refused[s.index()].load(Ordering::Relaxed)
    }
    pub fn errors(&self, s: Scenario) -> u64 {
        self.errors[s.index()].load(Ordering::Relaxed)
    }
    /// Worker-thread CPU time spent in flows of `s` (all outcomes).
    pub fn cpu_ns(&self, s: Scenario) -> u64 {
        self.cpu_ns[s.index()].load(Ordering::Relaxed)
    }

    /// The `stats` answer: `stats <scenario>:ok=..,failed=..,errors=..,cpu_ns=..,marker_completed=..,marker_failed=..` per scenario.
    pub fn line(&self) -> String {
        let mut line = String::from("stats");
        for s in Scenario::ALL {
            line.push_str(&format!(
                " {s}:ok={},failed={},errors={},cpu_ns={},marker_completed={},marker_failed={}",
                self.completed(s),
                self.refused(s),
                self.errors(s),
                self.cpu_ns(s),
                s.completed(),
                s.failed()
            ));
        }
        line
    }
}

struct Job {
    scenario: Scenario,
    request_id: String,
    reply: oneshot::Sender<Result<FlowOutcome, String>>,
}

/// A started service: database filled, workers running, socket bound.
pub struct Service {
    config: ServiceConfig,
    listener: TcpListener,
    jobs: SyncSender<Job>,
    workers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    stats: Arc<ServiceStats>,
    ingest: Option<Arc<IngestReporter>>,
    db_path: PathBuf,
    remove_db_at_exit: bool,
}

impl Service {
    /// Creates (or reuses) the database, starts the workers and binds.
    pub async fn start(config: ServiceConfig) -> Result<Service, WorkloadError> {
        if !config.listen.ip().is_loopback() {
            return Err(WorkloadError::invalid(
                "--listen",
                format!("{} is not a loopback address", config.listen),
            ));
        }
        if config.workers == 0 {
            return Err(WorkloadError::invalid("--workers", "must be at least 1"));
        }
        let ingest = match (config.role, config.ingest_udp) {
            (Role::Shared, Some(_)) => {
                return Err(WorkloadError::invalid(
                    "--ingest-udp",
                    "the shared role reports through the sci-marker library; UDP ingest is for dedicated roles",
                ))
            }
            (_, Some(addr)) => Some(Arc::new(IngestReporter::new(addr)?)),
            (_, None) => None,
        };
        let (db_path, remove_db_at_exit) = match &config.db_path {
            Some(p) => (p.clone(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "sci-cf-workload-{}-{}.sqlite",
                    config.role,
                    std::process::id()
                )),
                true,
            ),
        };
        let sizes = config.sizes;
        let path = db_path.clone();
        let (first_db, filled) =
            tokio::task::spawn_blocking(move || FinanceDb::create_or_reuse(&path, sizes))
                .await
                .map_err(|e| WorkloadError::invalid("database setup", e.to_string()))??;
        tracing::info!(
            path = %db_path.display(),
            filled,
            bureau_records = sizes.bureau_records,
            accounts = sizes.accounts,
            "database ready"
        );
        let (jobs, receiver) = sync_channel::<Job>(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        let stopping = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServiceStats::default());
        let mut workers = Vec::with_capacity(config.workers);
        let mut first_db = Some(first_db);
        for _ in 0..config.workers {
            let mut db = match first_db.take() {
                Some(db) => db,
                None => FinanceDb::open(&db_path, sizes)?,
            };
            if let Some(rounds) = config.identity_rounds {
                db.set_identity_rounds(rounds);
            }
            let worker = Worker {
                role: config.role,
                db,
                jobs: Arc::clone(&receiver),
                stopping: Arc::clone(&stopping),
                stats: Arc::clone(&stats),
                ingest: ingest.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(config.role.comm().to_string())
                .spawn(move || worker.run())
                .map_err(|e| WorkloadError::io("starting a worker thread", e))?;
            workers.push(handle);
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| WorkloadError::io(format!("listening on {}", config.listen), e))?;
        Ok(Service {
            config,
            listener,
            jobs,
            workers,
            stopping,
            stats,
            ingest,
            db_path,
            remove_db_at_exit,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, WorkloadError> {
        self.listener
            .local_addr()
            .map_err(|e| WorkloadError::io("reading the bound address", e))
    }

    pub fn stats(&self) -> Arc<ServiceStats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `shutdown` resolves, then stops the workers, sends the
    /// last ingest counts and removes a temporary database.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), WorkloadError> {
        let Service {
            config,
            listener,
            jobs,
            workers,
            stopping,
            stats,
            ingest,
            db_path,
            remove_db_at_exit,
        } = self;
        let flusher = ingest.clone().map(|reporter| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(FLUSH_INTERVAL);
                let mut failing = false;
                loop {
                    tick.tick().await;
                    match reporter.flush() {
                        Ok(_) => failing = false,
                        Err(e) => {
                            if !failing {
                                tracing::warn!("{e}; the counts stay pending and are retried");
                            }
                            failing = true;
                        }
                    }
                }
            })
        });
        let mut connections = JoinSet::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if connections.len() >= config.max_connections {
                            tracing::warn!(%peer, max = config.max_connections, "too many connections; closing the new one");
                            continue;
                        }
                        let jobs = jobs.clone();
                        let stats = Arc::clone(&stats);
                        let in_flight = Arc::clone(&in_flight);
                        let role = config.role;
                        connections.spawn(async move {
                            if let Err(e) = serve_connection(stream, role, jobs, stats, in_flight).await {
                                tracing::debug!(%peer, "connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("accept failed: {e}"),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!("stopping");
        drop(listener);
        // Queued flows are answered `shutting-down`; the running ones finish
        // and their answers are written before the connections close.
        stopping.store(true, Ordering::SeqCst);
        let grace_end = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < grace_end {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        connections.shutdown().await;
        drop(jobs);
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        if let Some(f) = flusher {
            f.abort();
        }
        if let Some(reporter) = &ingest {
            if let Err(e) = reporter.flush() {
                tracing::warn!("last ingest report lost: {e}");
            }
        }
        tracing::info!("{}", stats.line());
        if remove_db_at_exit {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = db_path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
        }
        joined.map_err(|e| WorkloadError::invalid("worker shutdown", e.to_string()))
    }
}

struct Worker {
    role: Role,
    db: FinanceDb,
    jobs: Arc<Mutex<Receiver<Job>>>,
    stopping: Arc<AtomicBool>,
    stats: Arc<ServiceStats>,
    ingest: Option<Arc<IngestReporter>>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let next = self
                .jobs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .recv();
            let Ok(job) = next else { break };
            if self.stopping.load(Ordering::SeqCst) {
                let _ = job.reply.send(Ok(FlowOutcome::Refused("shutting-down")));
                continue;
            }
            let answer = self.run_flow(job.scenario, &job.request_id);
            let _ = job.reply.send(answer);
        }
    }

    fn run_flow(&mut self, scenario: Scenario, request_id: &str) -> Result<FlowOutcome, String> {
        let cpu_start_ns = thread_cpu_ns();
        let marker = match self.role {
            Role::Shared => Some(sci_marker::ScenarioGuard::begin(scenario)),
            Role::Dedicated(_) => None,
        };
        let result = self.db.run(scenario, request_id);
        let completed = matches!(result, Ok(FlowOutcome::Completed));
        if let Some(marker) = marker {
            marker.finish(completed);
        }
        let i = scenario.index();
        self.stats.cpu_ns[i].fetch_add(
            thread_cpu_ns().saturating_sub(cpu_start_ns),
            Ordering::Relaxed,
        );
        match &result {
            Ok(FlowOutcome::Completed) => {
                self.stats.completed[i].fetch_add(1, Ordering::Relaxed);
                if let Some(ingest) = &self.ingest {
                    ingest.add_completed(scenario);
                }
            }
            Ok(FlowOutcome::Refused(_)) => {
                self.stats.refused[i].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.errors[i].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%scenario, request_id, "flow failed: {e}");
            }
        }
        result.map_err(|e| e.to_string())
    }
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Flow {
        scenario: Scenario,
        request_id: String,
    },
    Stats,
}

/// Parses one line; the error is the whole `err ...` answer.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("");
    if first == "stats" && words.next().is_none() {
        return Ok(Request::Stats);
    }
    let (Some(id), None) = (words.next(), words.next()) else {
        return Err("err - bad-request expected `<scenario> <request-id>`".into());
    };
    if id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err("err - bad-request request id must be 1-128 printable ASCII characters".into());
    }
    match Scenario::from_name(first) {
        Some(scenario) => Ok(Request::Flow {
            scenario,
            request_id: id.to_string(),
        }),
        None => Err(format!("err {id} unknown-scenario")),
    }
}

async fn serve_connection(
    stream: TcpStream,
    role: Role,
    jobs: SyncSender<Job>,
    stats: Arc<ServiceStats>,
    in_flight: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::with_capacity(128);
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        // No newline within the limit: too long. (No newline and shorter:
        // end of stream; the line is taken as it is.)
        if buf.last() != Some(&b'\n') && n > MAX_LINE_BYTES {
            write
                .write_all(
                    format!("err - bad-request line longer than {MAX_LINE_BYTES} bytes\n")
                        .as_bytes(),
                )
                .await?;
            skip_line(&mut reader).await?;
            continue;
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let _answered = InFlight(&in_flight);
        let answer = match parse_request(line) {
            Ok(Request::Stats) => stats.line(),
            Ok(Request::Flow {
                scenario,
                request_id,
            }) if !role.serves(scenario) => {
                format!("err {request_id} wrong-role this service is {role}")
            }
            Ok(Request::Flow {
                scenario,
                request_id,
            }) => {
                let (reply, answer) = oneshot::channel();
                let job = Job {
                    scenario,
                    request_id: request_id.clone(),
                    reply,
                };
                match jobs.try_send(job) {
                    Ok(()) => match answer.await {
                        Ok(Ok(FlowOutcome::Completed)) => format!("ok {request_id}"),
                        Ok(Ok(FlowOutcome::Refused(reason))) => {
                            format!("err {request_id} {reason}")
                        }
                        Ok(Err(e)) => format!("err {request_id} internal {}", e.replace('\n', " ")),
                        Err(_) => format!("err {request_id} shutting-down"),
                    },
                    Err(TrySendError::Full(_)) => format!("err {request_id} overloaded"),
                    Err(TrySendError::Disconnected(_)) => format!("err {request_id} shutting-down"),
                }
            }
            Err(answer) => answer,
        };
        write.write_all(answer.as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
}

/// Counts a request as in flight until its answer is written (or the
/// connection task ends).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Discards input up to and including the next newline, without buffering it.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<()> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(());
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(pos) => {
                reader.consume(pos + 1);
                return Ok(());
            }
            None => {
                let len = available.len();
                reader.consume(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_name_what_is_wrong() {
        assert_eq!(
            parse_request("credit r-1"),
            Ok(Request::Flow {
                scenario: Scenario::Credit,
                request_id: "r-1".into()
            })
        );
        assert_eq!(parse_request("stats"), Ok(Request::Stats));
        assert_eq!(
            parse_request("loan r-2"),
            Err("err r-2 unknown-scenario".into())
        );
        assert!(parse_request("credit").is_err_and(|e| e.starts_with("err - bad-request")));
        assert!(parse_request("credit a b").is_err_and(|e| e.starts_with("err - bad-request")));
    }
}
