//! Helpers for the fleet tests: a real `sci-aggregator` process on loopback,
//! HTTP requests to it, and windows with known figures.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::{run_forwarder, AggregatorConfig, ForwarderStats};
use sci_agent::sinks::spool::Spool;
use sci_proto::v1;
use tokio::sync::Notify;

use crate::cargo_bin;

pub use sci_test_harness::http::{free_port, http_get, http_post};

/// A running aggregator; killed (SIGKILL) on drop.
pub struct Aggregator {
    pub child: Child,
    pub grpc_port: u16,
    pub http_port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Aggregator {
    /// Writes aggregator.toml in `dir` (with `extra` TOML appended) and starts it.
    pub fn start(dir: &Path, period_s: u64, extra: &str, insecure: bool) -> Aggregator {
        let grpc_port = free_port();
        let http_port = free_port();
        let config = dir.join("aggregator.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen = \"127.0.0.1:{grpc_port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\ndatabase = \"{}\"\nperiod = \"{period_s}s\"\n{extra}",
                dir.join("sci.db").display()
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let mut agg = Aggregator {
            child: Self::spawn(&config, insecure, dir),
            grpc_port,
            http_port,
            dir: dir.to_path_buf(),
            config,
        };
        agg.wait_ready();
        agg
    }

    fn spawn(config: &Path, insecure: bool, dir: &Path) -> Child {
        let mut cmd = Command::new(cargo_bin("sci-aggregator", "sci-aggregator"));
        cmd.args(["serve", "--config"]).arg(config);
        if insecure {
            cmd.arg("--insecure");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("aggregator.log"))
            .ok()
            .map(Stdio::from)
            .unwrap_or_else(Stdio::null);
        cmd.stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sci-aggregator: {e}"))
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some((200, _)) = http_get(self.http_port, "/healthz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.join("aggregator.log")).unwrap_or_default();
                panic!("sci-aggregator exited ({status}): {log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("sci-aggregator not ready after 30 s");
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and database.
    pub fn restart(&mut self, insecure: bool) {
        self.kill_9();
        self.child = Self::spawn(&self.config, insecure, &self.dir);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn sci(&self, from_s: u64, to_s: u64, period_s: u64) -> serde_json::Value {
        let (status, body) = http_get(
            self.http_port,
            &format!("/api/v1/sci?from={from_s}&to={to_s}&period={period_s}"),
        )
        .unwrap_or_else(|| panic!("no answer from /api/v1/sci"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// `sci_ingest_windows_total{result="RESULT"}` from /metrics; panics if
    /// the series is missing or not a number.
    pub fn windows_ingested(&self, result: &str) -> u64 {
        let metrics = self.metrics();
        let series = format!("sci_ingest_windows_total{{result=\"{result}\"}}");
        metric_value(&metrics, &series)
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// The value of `series` (name and labels exactly as exposed) in a
/// Prometheus text exposition.
/// The sum over the periods of an `/api/v1/sci` answer of the whole number at
/// JSON `pointer` in each, e.g. "/windows" or "/transactions/query".
pub fn periods_total(sci: &serde_json::Value, pointer: &str) -> u64 {
    sci["periods"]
        .as_array()
        .unwrap_or_else(|| panic!("no periods in {sci}"))
        .iter()
        .map(|p| {
            p.pointer(pointer)
                .and_then(|v| v.as_u64())
                .unwrap_or_else(|| panic!("no whole number at {pointer} in {p}"))
        })
        .sum()
}

pub fn metric_value(exposition: &str, series: &str) -> Option<u64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The grid intensity of the test fleet's windows, g/kWh.
pub const INTENSITY_G_PER_KWH: f64 = 530.6;

/// Operational carbon of `energy_j` at [`INTENSITY_G_PER_KWH`] and `pue`,
/// as the agent computes it (the aggregator refuses a window whose carbon
/// is not its energy x intensity x PUE).
pub fn carbon_g(energy_j: f64, pue: f64) -> f64 {
    energy_j / 3.6e6 * INTENSITY_G_PER_KWH * pue
}

/// Sets a window's PUE and the carbon that follows from it (host and
/// scenarios, each an eighth as [`window`] makes them).
pub fn set_pue(w: &mut v1::WindowReport, pue: f64) {
    w.pue = pue;
    w.host_carbon_g = carbon_g(w.host_energy_j, pue);
    for s in &mut w.scenarios {
        s.carbon_g = w.host_carbon_g / 8.0;
    }
}

/// A window with the given figures, its carbon following from its energy
/// ([`carbon_g`] at PUE 1); transactions in credit, drawdown, repayment,
/// query order.
#[allow(clippy::too_many_arguments)]
pub fn window(
    host: &str,
    instance: &str,
    seq: u64,
    start_s: u64,
    length_s: u64,
    energy_j: f64,
    embodied_g: f64,
    transactions: [u64; 4],
) -> v1::WindowReport {
    let carbon_g = carbon_g(energy_j, 1.0);
    let names = ["credit", "drawdown", "repayment", "query"];
    let weights = [24.0, 7.0, 3.0, 1.0];
    v1::WindowReport {
        host: host.into(),
        agent_instance: instance.into(),
        seq,
        datacenter: "dc-1".into(),
        start_unix_ns: start_s * 1_000_000_000,
        end_unix_ns: (start_s + length_s) * 1_000_000_000,
        cpu_source: "ebpf".into(),
        cpus: 2,
        idle_cpu_ns: length_s * 1_000_000_000,
        busy_cpu_ns: length_s * 1_000_000_000,
        energy_source: "model-linear".into(),
        estimated: true,
        host_energy_j: energy_j,
        idle_energy_j: energy_j / 2.0,
        host_carbon_g: carbon_g,
        host_embodied_g: embodied_g,
        carbon_intensity_g_per_kwh: INTENSITY_G_PER_KWH,
        pue: 1.0,
        weights: names
            .iter()
            .zip(weights)
            .map(|(n, w)| (n.to_string(), w))
            .collect(),
        scenarios: names
            .iter()
            .zip(weights)
            .zip(transactions)
            .map(|((name, weight), txn)| v1::ScenarioRecord {
                scenario: name.to_string(),
                weight,
                transactions: txn,
                cpu_ns: 1_000_000 * txn,
                energy_j: energy_j / 8.0,
                carbon_g: carbon_g / 8.0,
                embodied_g: embodied_g / 8.0,
            })
            .collect(),
        business_units: transactions
            .iter()
            .zip(weights)
            .map(|(t, w)| *t as f64 * w)
            .sum(),
        merged_windows: 1,
        ..Default::default()
    }
}

/// What one service did for one scenario in a window (for [`service_window`]).
#[derive(Debug, Clone, Copy)]
pub struct ServiceLoad<'a> {
    pub service: &'a str,
    pub scenario: &'a str,
    pub transactions: u64,
    pub cpu_ns: u64,
    pub energy_j: f64,
    pub embodied_g: f64,
}

/// The host a [`service_window`] ran on.
#[derive(Debug, Clone)]
pub struct HostShape {
    pub host: String,
    pub datacenter: String,
    pub cpus: u32,
    pub intensity_g_per_kwh: f64,
    pub pue: f64,
    /// Busy CPU of processes outside the services, per second of window.
    pub background_cpu_ns_per_s: u64,
    /// Idle power, W (its energy stays with the host, unattributed to services).
    pub idle_power_w: f64,
    pub supply: Option<v1::ResourceSupply>,
}

/// A window of `length_s` on `shape` in which each load's process ran:
/// operational carbon = energy x intensity x PUE / 3.6e6, every figure
/// adding up to the host's.
pub fn service_window(
    shape: &HostShape,
    instance: &str,
    seq: u64,
    start_s: u64,
    length_s: u64,
    loads: &[ServiceLoad],
) -> v1::WindowReport {
    let k = shape.intensity_g_per_kwh * shape.pue / 3.6e6;
    let weight = |s: &str| match s {
        "credit" => 24.0,
        "drawdown" => 7.0,
        "repayment" => 3.0,
        _ => 1.0,
    };
    let mut scenarios: std::collections::BTreeMap<&str, v1::ScenarioRecord> = Default::default();
    let mut processes = Vec::new();
    for (i, l) in loads.iter().enumerate() {
        let e = scenarios
            .entry(l.scenario)
            .or_insert_with(|| v1::ScenarioRecord {
                scenario: l.scenario.into(),
                weight: weight(l.scenario),
                ..Default::default()
            });
        e.transactions += l.transactions;
        e.cpu_ns += l.cpu_ns;
        e.energy_j += l.energy_j;
        e.carbon_g += l.energy_j * k;
        e.embodied_g += l.embodied_g;
        processes.push(v1::ProcessRecord {
            pid: 100 + i as u32,
            comm: l.service.into(),
            service: l.service.into(),
            scenario: l.scenario.into(),
            cpu_ns: l.cpu_ns,
            energy_j: l.energy_j,
            carbon_g: l.energy_j * k,
            embodied_g: l.embodied_g,
            ..Default::default()
        });
    }
    let service_cpu: u64 = loads.iter().map(|l| l.cpu_ns).sum();
    let busy = service_cpu + shape.background_cpu_ns_per_s * length_s;
    let capacity = u64::from(shape.cpus) * length_s * 1_000_000_000;
    let idle_j = shape.idle_power_w * length_s as f64;
    let energy_j = idle_j + loads.iter().map(|l| l.energy_j).sum::<f64>();
    let embodied_g: f64 = loads.iter().map(|l| l.embodied_g).sum();
    let business_units = scenarios
        .values()
        .map(|s| s.transactions as f64 * s.weight)
        .sum();
    v1::WindowReport {
        host: shape.host.clone(),
        agent_instance: instance.into(),
        seq,
        datacenter: shape.datacenter.clone(),
        start_unix_ns: start_s * 1_000_000_000,
        end_unix_ns: (start_s + length_s) * 1_000_000_000,
        cpu_source: "ebpf".into(),
        cpus: shape.cpus,
        busy_cpu_ns: busy,
        idle_cpu_ns: capacity.saturating_sub(busy),
        energy_source: "model-linear".into(),
        estimated: true,
        host_energy_j: energy_j,
        idle_energy_j: idle_j,
        host_carbon_g: energy_j * k,
        host_embodied_g: embodied_g,
        carbon_intensity_g_per_kwh: shape.intensity_g_per_kwh,
        pue: shape.pue,
        weights: scenarios
            .values()
            .map(|s| (s.scenario.clone(), s.weight))
            .collect(),
        scenarios: scenarios.into_values().collect(),
        business_units,
        processes,
        merged_windows: 1,
        supply: shape.supply.clone(),
        ..Default::default()
    }
}

/// The agent's delivery half in-process: a real spool and the real forwarder
/// task sending it to an aggregator. Dropping it stops the forwarder.
pub struct Agent {
    pub spool: Arc<Mutex<Spool>>,
    pub notify: Arc<Notify>,
    pub stats: Arc<ForwarderStats>,
    task: tokio::task::JoinHandle<Result<(), sci_agent::error::AgentError>>,
}

impl Agent {
    /// Opens the spool in `dir` (capped at `cfg.spool_max_bytes`) and starts forwarding it.
    pub fn start(dir: &Path, cfg: AggregatorConfig, instance: &str) -> Agent {
        let spool = Spool::open(dir, cfg.spool_max_bytes, instance)
            .unwrap_or_else(|e| panic!("opening spool {}: {e}", dir.display()));
        Self::with_spool(spool, cfg)
    }

    /// Starts forwarding an already opened spool. Must run inside a tokio runtime.
    pub fn with_spool(spool: Spool, cfg: AggregatorConfig) -> Agent {
        let spool = Arc::new(Mutex::new(spool));
        let notify = Arc::new(Notify::new());
        let stats = Arc::new(ForwarderStats::default());
        let task = tokio::spawn(run_forwarder(
            cfg,
            true,
            Arc::clone(&spool),
            Arc::clone(&notify),
            Arc::clone(&stats),
        ));
        Agent {
            spool,
            notify,
            stats,
            task,
        }
    }

    /// Stops the forwarder task; the spool stays open until the agent is dropped.
    pub fn stop_forwarder(&self) {
        self.task.abort();
    }

    /// Spools one window and wakes the forwarder.
    pub fn push(&self, w: &v1::WindowReport) {
        self.spool()
            .append(w)
            .unwrap_or_else(|e| panic!("spooling window seq {}: {e}", w.seq));
        self.notify.notify_one();
    }

    /// Windows spooled and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.spool().len()
    }

    /// The spool, locked.
    pub fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the aggregator has acknowledged every spooled window; panics after `within`.
    pub async fn drained(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.pending() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} windows still unacknowledged",
                self.pending()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    /// Stops the forwarder and waits (up to 5 s) until its task has let go
    /// of the spool, so the spool's lock is free for the next agent.
    fn drop(&mut self) {
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.spool) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A TCP connection to 127.0.0.1:`port` from the source address `from` (any 127/8 address).
pub fn connect_from(from: std::net::Ipv4Addr, port: u16) -> Option<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let addr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = addr(from, 0);
        let remote = addr(std::net::Ipv4Addr::LOCALHOST, port);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(std::net::TcpStream::from_raw_fd(fd))
    }
}

/// Raises the open-file limit to what the test needs (up to the hard limit).
pub fn allow_open_files(n: u64) {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < n {
            limit.rlim_cur = n.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// One HTTP/1.1 request read from `s`: its head (lowercased) and body (by
/// `content-length`); None when the connection ends first.
pub async fn read_http_request(s: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((head, buf[head_end..head_end + length].to_vec()))
}
