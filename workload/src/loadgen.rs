//! `sci-loadgen`: drives the finance services with a daily traffic shape.
//!
//! Requests are issued open-loop at `peak_rps * daily_load_fraction(hour)`
//! (see [`crate::shape`]), at most `concurrency` at a time: when all slots
//! are busy, issuing waits (the shape then lags rather than requests being
//! dropped). Each request picks its scenario from the mix and goes to the
//! shared service with probability `shared_fraction` (when one is given and a
//! dedicated one exists; otherwise to whichever exists). Connections are
//! kept open and reused, one request at a time per connection.
//!
//! The result counts per scenario and per target kind what was sent, answered
//! `ok` (a completed transaction) or `err` (failed), and transport errors
//! (no answer): `sent = ok + failed + transport_errors`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::error::WorkloadError;
use crate::scenario::{parse_scenario, Role, Scenario};
use crate::shape::RateAccumulator;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Service address per role (dedicated scenarios and/or shared).
    pub targets: HashMap<Role, SocketAddr>,
    pub duration: Duration,
    pub peak_rps: f64,
    pub day_seconds: f64,
    pub start_hour: f64,
    /// Relative weight of each scenario in the traffic.
    pub mix: [f64; 4],
    pub shared_fraction: f64,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub seed: u64,
}

impl LoadConfig {
    fn validate(&self) -> Result<(), WorkloadError> {
        if self.targets.is_empty() {
            return Err(WorkloadError::invalid(
                "--target",
                "at least one target is needed",
            ));
        }
        for (role, addr) in &self.targets {
            if !addr.ip().is_loopback() {
                return Err(WorkloadError::invalid(
                    "--target",
                    format!("{role}={addr} is not a loopback address"),
                ));
            }
        }
        if !(self.peak_rps > 0.0 && self.peak_rps.is_finite()) {
            return Err(WorkloadError::invalid(
                "--peak-rps",
                format!("{} (must be > 0)", self.peak_rps),
            ));
        }
        if !(self.day_seconds > 0.0 && self.day_seconds.is_finite()) {
            return Err(WorkloadError::invalid(
                "--day-seconds",
                format!("{} (must be > 0)", self.day_seconds),
            ));
        }
        if !(0.0..=1.0).contains(&self.shared_fraction) {
            return Err(WorkloadError::invalid(
                "--shared-fraction",
                format!("{} (must be within 0..=1)", self.shared_fraction),
            ));
        }
        if self.mix.iter().any(|w| !(*w >= 0.0 && w.is_finite())) {
            return Err(WorkloadError::invalid(
                "--mix",
                "weights must be finite and >= 0",
            ));
        }
        if self.concurrency == 0 {
            return Err(WorkloadError::invalid(
                "--concurrency",
                "must be at least 1",
            ));
        }
        if self.routable_mix().iter().all(|w| *w == 0.0) {
            return Err(WorkloadError::invalid(
                "--mix",
                "no scenario with a weight > 0 has a target (dedicated or shared)",
            ));
        }
        Ok(())
    }

    /// The mix restricted to scenarios some target serves.
    fn routable_mix(&self) -> [f64; 4] {
        let mut mix = self.mix;
        for s in Scenario::ALL {
            if !self.targets.keys().any(|r| r.serves(s)) {
                mix[s.index()] = 0.0;
            }
        }
        mix
    }
}

/// Parses `credit=1,drawdown=2,repayment=3,query=10` (missing scenarios weigh 0).
pub fn parse_mix(text: &str) -> Result<[f64; 4], WorkloadError> {
    let mut mix = [0.0; 4];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').ok_or_else(|| {
            WorkloadError::invalid("--mix", format!("`{part}` is not scenario=weight"))
        })?;
        let scenario = parse_scenario(name.trim())?;
        let weight: f64 = weight.trim().parse().map_err(|_| {
            WorkloadError::invalid(
                "--mix",
                format!("weight `{weight}` of {scenario} is not a number"),
            )
        })?;
        mix[scenario.index()] = weight;
    }
    Ok(mix)
}

/// Parses `credit=127.0.0.1:7001` (role=address).
pub fn parse_target(text: &str) -> Result<(Role, SocketAddr), WorkloadError> {
    let (role, addr) = text.split_once('=').ok_or_else(|| {
        WorkloadError::invalid("--target", format!("`{text}` is not role=address"))
    })?;
    let role: Role = role.trim().parse()?;
    let addr: SocketAddr = addr.trim().parse().map_err(|_| {
        WorkloadError::invalid("--target", format!("`{addr}` is not an ip:port address"))
    })?;
    Ok((role, addr))
}

/// Counts for one scenario at one kind of target.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub transport_errors: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        self.transport_errors += other.transport_errors;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub transport_errors: u64,
    /// Latency of answered requests (ok and failed), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub dedicated: Counts,
    pub shared: Counts,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenarios {
    pub credit: ScenarioReport,
    pub drawdown: ScenarioReport,
    pub repayment: ScenarioReport,
    pub query: ScenarioReport,
}

impl Scenarios {
    pub fn get(&self, s: Scenario) -> &ScenarioReport {
        match s {
            Scenario::Credit => &self.credit,
            Scenario::Drawdown => &self.drawdown,
            Scenario::Repayment => &self.repayment,
            Scenario::Query => &self.query,
        }
    }
}

/// The run's result, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub elapsed_s: f64,
    pub peak_rps: f64,
    pub day_seconds: f64,
    pub start_hour: f64,
    /// True when a signal ended the run before `duration`.
    pub interrupted: bool,
    pub scenarios: Scenarios,
    pub total: Counts,
}

#[derive(Default)]
struct Tally {
    dedicated: [Counts; 4],
    shared: [Counts; 4],
    latencies_us: [Vec<u64>; 4],
}

#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Failed,
    Transport,
}

/// Reusable connections per target.
struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<BufReader<TcpStream>>>>,
}

impl Pool {
    fn take(&self, addr: SocketAddr) -> Option<BufReader<TcpStream>> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&addr)
            .and_then(Vec::pop)
    }

    fn give_back(&self, addr: SocketAddr, conn: BufReader<TcpStream>) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_default()
            .push(conn);
    }
}

async fn exchange(
    conn: &mut BufReader<TcpStream>,
    scenario: Scenario,
    request_id: &str,
) -> std::io::Result<Answer> {
    conn.get_mut()
        .write_all(format!("{scenario} {request_id}\n").as_bytes())
        .await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("ok"), Some(id)) if id == request_id => Ok(Answer::Ok),
        (Some("err"), Some(id)) if id == request_id => Ok(Answer::Failed),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected answer `{}` to {request_id}", line.trim_end()),
        )),
    }
}

async fn send_one(
    pool: &Pool,
    addr: SocketAddr,
    scenario: Scenario,
    request_id: &str,
    timeout: Duration,
) -> Answer {
    let attempt = async {
        let mut conn = match pool.take(addr) {
            Some(c) => c,
            None => {
                let stream = TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                BufReader::new(stream)
            }
        };
        let answer = exchange(&mut conn, scenario, request_id).await?;
        pool.give_back(addr, conn);
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            tracing::debug!(%addr, request_id, "transport error: {e}");
            Answer::Transport
        }
        Err(_) => Answer::Transport,
    }
}

fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
}

/// Runs the load until `duration` has passed or `stop` resolves; waits for
/// the requests in flight (each bounded by the request timeout).
pub async fn run_load(
    config: LoadConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<LoadReport, WorkloadError> {
    config.validate()?;
    let mix = config.routable_mix();
    let mix_total: f64 = mix.iter().sum();
    let config = Arc::new(config);
    let pool = Arc::new(Pool {
        idle: Mutex::new(HashMap::new()),
    });
    let tally = Arc::new(Mutex::new(Tally::default()));
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let mut rate = RateAccumulator::new(config.peak_rps, config.day_seconds, config.start_hour);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_progress_s = 1u64;
    let mut sent_at_last_progress = 0u64;
    let mut sequence = 0u64;
    let mut interrupted = false;
    tokio::pin!(stop);
    'run: loop {
        tokio::select! {
            _ = &mut stop => { interrupted = true; break 'run; }
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed();
        // The last tick issues what is due up to the end of the run, so a
        // run sends the shape's integral over its duration however late the
        // ticks come (a busy machine, slow services holding every slot).
        let last_tick = elapsed >= config.duration;
        let due = rate.advance(elapsed.min(config.duration).as_secs_f64());
        for _ in 0..due {
            let permit = tokio::select! {
                _ = &mut stop => { interrupted = true; break 'run; }
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'run,
                },
            };
            let scenario = pick_scenario(&mut rng, &mix, mix_total);
            let (addr, shared) = route(&config, scenario, &mut rng)?;
            sequence += 1;
            let request_id = format!("lg{}-{sequence}", config.seed);
            {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                let counts = if shared {
                    &mut t.shared
                } else {
                    &mut t.dedicated
                };
                counts[scenario.index()].sent += 1;
            }
            let pool = Arc::clone(&pool);
            let tally = Arc::clone(&tally);
            let timeout = config.request_timeout;
            tokio::spawn(async move {
                let t0 = Instant::now();
                let answer = send_one(&pool, addr, scenario, &request_id, timeout).await;
                let latency_us = t0.elapsed().as_micros() as u64;
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                let i = scenario.index();
                let counts = if shared {
                    &mut t.shared[i]
                } else {
                    &mut t.dedicated[i]
                };
                match answer {
                    Answer::Ok => counts.ok += 1,
                    Answer::Failed => counts.failed += 1,
                    Answer::Transport => counts.transport_errors += 1,
                }
                if !matches!(answer, Answer::Transport) {
                    t.latencies_us[i].push(latency_us);
                }
                drop(permit);
            });
        }
        if last_tick {
            break;
        }
        if elapsed.as_secs() >= next_progress_s {
            let t = tally.lock().unwrap_or_else(|p| p.into_inner());
            let mut total = Counts::default();
            for c in t.dedicated.iter().chain(t.shared.iter()) {
                total.add(*c);
            }
            drop(t);
            eprintln!(
                "t={}s rps={} target_rps={:.1} ok={} failed={} transport_errors={} in_flight={}",
                elapsed.as_secs(),
                total.sent - sent_at_last_progress,
                rate.rate_at(elapsed.as_secs_f64()),
                total.ok,
                total.failed,
                total.transport_errors,
                config.concurrency - slots.available_permits()
            );
            sent_at_last_progress = total.sent;
            next_progress_s = elapsed.as_secs() + 1;
        }
    }
    // Wait for the requests in flight: every slot back.
    let wait = config.request_timeout + Duration::from_secs(1);
    let all = u32::try_from(config.concurrency).unwrap_or(u32::MAX);
    if tokio::time::timeout(wait, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {wait:?}; they are counted as sent only");
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let mut reports = Vec::with_capacity(4);
    let mut total = Counts::default();
    for s in Scenario::ALL {
        let i = s.index();
        let (d, sh) = (t.dedicated[i], t.shared[i]);
        let mut both = d;
        both.add(sh);
        total.add(both);
        let lat = &mut t.latencies_us[i];
        lat.sort_unstable();
        reports.push(ScenarioReport {
            sent: both.sent,
            ok: both.ok,
            failed: both.failed,
            transport_errors: both.transport_errors,
            p50_ms: percentile_ms(lat, 0.50),
            p99_ms: percentile_ms(lat, 0.99),
            dedicated: d,
            shared: sh,
        });
    }
    let mut it = reports.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| WorkloadError::invalid("report", "missing scenario"))
    };
    Ok(LoadReport {
        elapsed_s,
        peak_rps: config.peak_rps,
        day_seconds: config.day_seconds,
        start_hour: config.start_hour,
        interrupted,
        scenarios: Scenarios {
            credit: next()?,
            drawdown: next()?,
            repayment: next()?,
            query: next()?,
        },
        total,
    })
}

fn pick_scenario(rng: &mut SmallRng, mix: &[f64; 4], total: f64) -> Scenario {
    let mut x = rng.random::<f64>() * total;
    for s in Scenario::ALL {
        let w = mix[s.index()];
        if w > 0.0 && x < w {
            return s;
        }
        x -= w;
    }
    Scenario::ALL
        .into_iter()
        .rev()
        .find(|s| mix[s.index()] > 0.0)
        .unwrap_or(Scenario::Query)
}

/// The target for one request of `scenario`: (address, is the shared service).
fn route(
    config: &LoadConfig,
    scenario: Scenario,
    rng: &mut SmallRng,
) -> Result<(SocketAddr, bool), WorkloadError> {
    let dedicated = config.targets.get(&Role::Dedicated(scenario));
    let shared = config.targets.get(&Role::Shared);
    match (dedicated, shared) {
        (Some(d), Some(s)) => Ok(if rng.random::<f64>() < config.shared_fraction {
            (*s, true)
        } else {
            (*d, false)
        }),
        (Some(d), None) => Ok((*d, false)),
        (None, Some(s)) => Ok((*s, true)),
        (None, None) => Err(WorkloadError::invalid(
            "--target",
            format!("no target serves {scenario}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mix_and_targets_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_mix("credit=1,drawdown=2,repayment=3,query=10").unwrap(),
            [1.0, 2.0, 3.0, 10.0]
        );
        assert_eq!(parse_mix("query=5").unwrap(), [0.0, 0.0, 0.0, 5.0]);
        assert!(parse_mix("loan=1")
            .unwrap_err()
            .to_string()
            .contains("loan"));
        assert!(parse_mix("credit=x")
            .unwrap_err()
            .to_string()
            .contains("credit"));
        let (role, addr) = parse_target("shared=127.0.0.1:7005").unwrap();
        assert_eq!(role, Role::Shared);
        assert_eq!(addr.port(), 7005);
        assert!(parse_target("credit127.0.0.1:1").is_err());
    }

    #[test]
    fn scenario_picks_follow_the_mix() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mix = [1.0, 2.0, 3.0, 10.0];
        let mut n = [0u32; 4];
        for _ in 0..160_000 {
            n[pick_scenario(&mut rng, &mix, 16.0).index()] += 1;
        }
        // Expected 10,000 / 20,000 / 30,000 / 100,000; allow 3 %.
        for (got, want) in n.iter().zip([10_000.0, 20_000.0, 30_000.0, 100_000.0]) {
            assert!((f64::from(*got) - want).abs() < want * 0.03, "{n:?}");
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.50), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }
}
