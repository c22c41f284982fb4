//! Platform power from the BMC over Redfish, integrated into energy per window.
//!
//! A poller thread GETs one Redfish resource every `poll_ms` (HTTP or HTTPS
//! with basic auth, a CA file or a pinned certificate, a timeout per
//! request) and keeps the readings: `PowerControl[0].PowerConsumedWatts` of
//! a `Chassis/{id}/Power` resource, `PowerWatts.Reading` of an
//! `EnvironmentMetrics` resource, or `Reading` of a power `Sensor`. When the
//! reading carries the BMC's own `ReadingTime`, that is the sample's time
//! and a reading whose time did not advance is the same sample (not a new
//! one); without it the sample is stamped when the answer arrived.
//!
//! A window's platform energy is the trapezoid over the samples (linear
//! between two samples at most `stale_after_ms` apart, the last value held
//! for at most `stale_after_ms` after it). A part of the window no fresh
//! sample covers is never filled in: the window then has no platform figure
//! (fault `stale`, or `no_sample` before the first one), and its energy is
//! the inner source's alone, flagged.
//!
//! The split ([`PlatformSplit`]): where RAPL measures, the window keeps the
//! RAPL domains and adds `platform-rest` = platform - RAPL (fans, disks,
//! NICs, PSU losses), attributed by CPU share like any domain (`cpu_share`)
//! or as idle energy shared by busy time (`idle`). Without RAPL the platform
//! reading is the host's energy (`platform`), measured, not estimated.
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::{count_fault, DomainKind, DomainReading, EnergyError, EnergySource, WindowEnergy};
pub(crate) use crate::sources::https_get::{failure, Failure};
use crate::sources::https_get::{HttpsGet, Names, Trust};
use crate::sources::sched::CpuSample;

/// How the platform power beyond RAPL is attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformSplit {
    /// `platform-rest` is a domain over all CPUs: idle baseline learned,
    /// the rest by CPU time.
    #[default]
    CpuShare,
    /// `platform-rest` is all idle energy, shared by busy CPU time.
    Idle,
}

/// `[energy.redfish]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedfishConfig {
    /// `https://bmc.example:443` (or `http://` for a BMC on a management network).
    pub url: String,
    /// Path of the power resource.
    pub path: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// File holding the password (first line), instead of `password`.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA(s) that signed the BMC's certificate.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the BMC's certificate (DER), hex, `:` allowed: that one
    /// certificate is accepted whatever signed it (self-signed BMCs).
    pub pinned_sha256: Option<String>,
    /// Time one request may take, connection included.
    pub timeout_ms: u64,
    /// Time between two requests.
    pub poll_ms: u64,
    /// A reading this much older than the next one (or than now) is not
    /// integrated further.
    pub stale_after_ms: u64,
    /// A reading above this many watts is rejected (`jump`).
    pub max_power_w: f64,
    pub split: PlatformSplit,
}

impl Default for RedfishConfig {
    fn default() -> Self {
        RedfishConfig {
            url: String::new(),
            path: "/redfish/v1/Chassis/1/Power".to_string(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            pinned_sha256: None,
            timeout_ms: 2_000,
            poll_ms: 1_000,
            stale_after_ms: 15_000,
            max_power_w: 20_000.0,
            split: PlatformSplit::CpuShare,
        }
    }
}

fn config_error(key: &str, reason: impl std::fmt::Display) -> EnergyError {
    EnergyError::Config(format!("energy.redfish.{key}: {reason}"))
}

impl RedfishConfig {
    /// Check the section; the message names the key.
    pub fn validate(&self) -> Result<(), EnergyError> {
        let url = self
            .url
            .parse::<hyper::Uri>()
            .map_err(|e| config_error("url", format!("{:?} is not a URL: {e}", self.url)))?;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(config_error(
                    "url",
                    format!("{:?} must start with https:// or http://", self.url),
                ))
            }
        }
        if url.host().is_none() {
            return Err(config_error("url", format!("{:?} has no host", self.url)));
        }
        if !self.path.starts_with('/') {
            return Err(config_error(
                "path",
                format!("{:?} must start with /", self.path),
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(config_error(
                "password_file",
                "set either password or password_file",
            ));
        }
        if self.username.is_none() != (self.password.is_none() && self.password_file.is_none()) {
            return Err(config_error(
                "username",
                "basic auth needs both a username and a password (or password_file)",
            ));
        }
        if let Some(pin) = &self.pinned_sha256 {
            parse_pin(pin)?;
        }
        self.settings().validate("energy.redfish", self.timeout_ms)
    }

    pub(crate) fn settings(&self) -> PollSettings {
        PollSettings {
            kind: "redfish",
            poll_ms: self.poll_ms,
            stale_after_ms: self.stale_after_ms,
            max_power_w: self.max_power_w,
            split: self.split,
        }
    }
}

fn parse_pin(pin: &str) -> Result<[u8; 32], EnergyError> {
    crate::sources::https_get::parse_pin(pin).ok_or_else(|| {
        config_error(
            "pinned_sha256",
            format!("{pin:?} is not 64 hex digits (a SHA-256)"),
        )
    })
}

/// One power reading of the BMC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerSample {
    pub t_unix_ns: u64,
    pub watts: f64,
}

/// What a Redfish answer says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParsedReading {
    pub watts: f64,
    /// The BMC's `ReadingTime`, when it gives one.
    pub reading_time_ns: Option<u64>,
}

fn reading_time(v: &serde_json::Value) -> Option<u64> {
    let text = v.get("ReadingTime")?.as_str()?;
    let s = crate::transforms::carbon::parse_timestamp(text)?;
    (s >= 0.0).then_some((s * 1e9) as u64)
}

/// Parse a Redfish power resource (see the module note); the error says
/// what was expected.
pub fn parse_power(body: &[u8]) -> Result<ParsedReading, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        )
    })?;
    let candidates = [
        v.get("PowerControl")
            .and_then(|p| p.get(0))
            .map(|p| (p, "PowerConsumedWatts")),
        v.get("PowerWatts").map(|p| (p, "Reading")),
        v.get("Reading").map(|_| (&v, "Reading")),
    ];
    for (object, field) in candidates.into_iter().flatten() {
        let Some(value) = object.get(field) else {
            continue;
        };
        let watts = value
            .as_f64()
            .ok_or_else(|| format!("{field} is {value}, not a number of watts"))?;
        return Ok(ParsedReading {
            watts,
            reading_time_ns: reading_time(object).or_else(|| reading_time(&v)),
        });
    }
    Err(
        "no PowerControl[0].PowerConsumedWatts, PowerWatts.Reading or Reading in the resource"
            .to_string(),
    )
}

/// A window's platform energy from the samples, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct Integral {
    pub energy_j: f64,
    /// Longest gap between two samples used (0 with one sample).
    pub max_gap_ns: u64,
    /// Age of the newest sample at the window's end.
    pub newest_age_ns: u64,
}

/// Why a window has no platform figure.
#[derive(Debug, Clone, PartialEq)]
pub enum NotCovered {
    /// No sample at or before some part of the window.
    NoSample,
    /// Samples too far apart (or the last too old) to cover the window.
    Stale {
        uncovered_ns: u64,
        newest_age_ns: u64,
    },
}

/// Trapezoid over `samples` (sorted by time) on `[start, end]`; see the module note.
pub fn integrate(
    samples: &[PowerSample],
    start: u64,
    end: u64,
    stale_after_ns: u64,
) -> Result<Integral, NotCovered> {
    let first_before = samples.iter().rposition(|s| s.t_unix_ns <= start);
    let Some(first) = first_before else {
        return Err(NotCovered::NoSample);
    };
    let mut energy_j = 0.0;
    let mut covered_ns = 0u64;
    let mut max_gap_ns = 0u64;
    let mut i = first;
    loop {
        let a = samples[i];
        let next = samples.get(i + 1).copied();
        // Linear to the next sample when it is close enough, else held for stale_after.
        let toward = next.filter(|b| b.t_unix_ns - a.t_unix_ns <= stale_after_ns);
        let seg_end = toward.map_or(a.t_unix_ns.saturating_add(stale_after_ns), |b| b.t_unix_ns);
        if let Some(b) = toward {
            max_gap_ns = max_gap_ns.max(b.t_unix_ns - a.t_unix_ns);
        }
        let power_at = |t: u64| match toward {
            Some(b) => {
                let span = (b.t_unix_ns - a.t_unix_ns).max(1) as f64;
                a.watts + (b.watts - a.watts) * (t - a.t_unix_ns) as f64 / span
            }
            None => a.watts,
        };
        let lo = a.t_unix_ns.max(start);
        let hi = seg_end.min(end);
        if hi > lo {
            energy_j += (power_at(lo) + power_at(hi)) / 2.0 * (hi - lo) as f64 / 1e9;
            covered_ns += hi - lo;
        }
        match next {
            Some(b) if b.t_unix_ns < end => i += 1,
            _ => break,
        }
    }
    let newest = samples
        .iter()
        .rev()
        .find(|s| s.t_unix_ns <= end)
        .map_or(0, |s| s.t_unix_ns);
    let newest_age_ns = end.saturating_sub(newest);
    let duration = end.saturating_sub(start);
    if covered_ns < duration {
        return Err(NotCovered::Stale {
            uncovered_ns: duration - covered_ns,
            newest_age_ns,
        });
    }
    Ok(Integral {
        energy_j,
        max_gap_ns,
        newest_age_ns,
    })
}

/// What the poller shares with the source.
#[derive(Debug, Default)]
struct Shared {
    samples: VecDeque<PowerSample>,
    /// Faults since the last window, by name (`timeout`, `unauthorized`, ...).
    faults: BTreeMap<String, u64>,
    /// The last error, while the BMC fails (cleared by a good reading).
    failing: Option<String>,
    /// Readings taken (good ones).
    readings: u64,
}

/// Samples kept: enough for windows of several minutes at one per second.
const MAX_SAMPLES: usize = 4096;

/// The HTTP(S) side: one GET of the power resource ([`HttpsGet`]).
struct Client {
    http: HttpsGet,
}

/// One way of asking a BMC for its power (Redfish, IPMI DCMI).
pub(crate) trait PowerReader: Send + 'static {
    fn read(&mut self) -> Result<ParsedReading, Failure>;
}

/// How a platform poller samples and judges the readings.
#[derive(Debug, Clone)]
pub(crate) struct PollSettings {
    /// `redfish` or `ipmi`: the source's name in faults and messages.
    pub(crate) kind: &'static str,
    pub(crate) poll_ms: u64,
    pub(crate) stale_after_ms: u64,
    pub(crate) max_power_w: f64,
    pub(crate) split: PlatformSplit,
}

impl PollSettings {
    /// Checks what every BMC source shares, and its request timeout; the
    /// message names the key under `prefix` (`energy.redfish`, `energy.ipmi`).
    pub(crate) fn validate(&self, prefix: &str, timeout_ms: u64) -> Result<(), EnergyError> {
        let bad =
            |key: &str, reason: String| EnergyError::Config(format!("{prefix}.{key}: {reason}"));
        if timeout_ms == 0 || timeout_ms > 60_000 {
            return Err(bad(
                "timeout_ms",
                format!("{timeout_ms} must be 1 to 60000 ms"),
            ));
        }
        if self.poll_ms < 100 || self.poll_ms > 600_000 {
            return Err(bad(
                "poll_ms",
                format!("{} must be 100 to 600000 ms", self.poll_ms),
            ));
        }
        if self.stale_after_ms < self.poll_ms {
            return Err(bad(
                "stale_after_ms",
                format!(
                    "{} is shorter than poll_ms = {}: every reading would be stale",
                    self.stale_after_ms, self.poll_ms
                ),
            ));
        }
        if !self.max_power_w.is_finite() || self.max_power_w <= 0.0 {
            return Err(bad(
                "max_power_w",
                format!("{} must be a positive number of watts", self.max_power_w),
            ));
        }
        Ok(())
    }
}

impl PowerReader for Client {
    fn read(&mut self) -> Result<ParsedReading, Failure> {
        self.get()
            .and_then(|body| parse_power(&body).map_err(|reason| failure("garbage", reason)))
    }
}

impl Client {
    fn new(cfg: &RedfishConfig) -> Result<Client, EnergyError> {
        use base64::Engine;
        let uri: hyper::Uri = format!("{}{}", cfg.url.trim_end_matches('/'), cfg.path)
            .parse()
            .map_err(|e| config_error("url", e))?;
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| EnergyError::io(file, e))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let authorization = match (&cfg.username, password) {
            (Some(user), Some(password)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            _ => None,
        };
        let trust = match (&cfg.pinned_sha256, &cfg.ca_file) {
            (Some(pin), _) => Some(Trust::Pinned(parse_pin(pin)?)),
            (None, Some(ca)) => Some(Trust::CaFile(ca)),
            (None, None) => None,
        };
        let http = HttpsGet::new(
            uri,
            authorization,
            trust,
            Duration::from_millis(cfg.timeout_ms),
            MAX_ANSWER_BYTES,
            Names {
                section: "energy.redfish",
                credentials: "the BMC's: energy.redfish.username/password",
            },
        )
        .map_err(|e| config_error(e.key, e.reason))?;
        Ok(Client { http })
    }

    fn get(&self) -> Result<Vec<u8>, Failure> {
        self.http.get()
    }
}

/// Longest power resource read: a BMC's is a few kB.
const MAX_ANSWER_BYTES: usize = 1 << 20;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One poll: fetch, parse, check, and record the sample or the fault.
fn poll_once(reader: &mut dyn PowerReader, cfg: &PollSettings, shared: &Mutex<Shared>) {
    let sent = unix_ns();
    let result = reader.read();
    let received = unix_ns();
    let mut s = match shared.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    let reading = match result {
        Ok(r) => r,
        Err(f) => {
            *s.faults.entry(f.fault.to_string()).or_default() += 1;
            s.failing = Some(format!("{}: {}", f.fault, f.message));
            return;
        }
    };
    let fault = if !reading.watts.is_finite() || reading.watts < 0.0 {
        Some(("garbage", format!("{} W is not a power", reading.watts)))
    } else if reading.watts == 0.0 {
        Some((
            "zero",
            "the BMC reads 0 W for a running server (sensor not ready or failed)".to_string(),
        ))
    } else if reading.watts > cfg.max_power_w {
        Some((
            "jump",
            format!(
                "{} W is above energy.{}.max_power_w = {} W",
                reading.watts, cfg.kind, cfg.max_power_w
            ),
        ))
    } else {
        None
    };
    if let Some((name, message)) = fault {
        *s.faults.entry(name.to_string()).or_default() += 1;
        s.failing = Some(format!("{name}: {message}"));
        return;
    }
    let t_unix_ns = match reading.reading_time_ns {
        Some(t) => {
            if s.samples.back().is_some_and(|last| t <= last.t_unix_ns) {
                // The BMC has not refreshed: the same sample, not a new one.
                let age_ns = received.saturating_sub(t);
                if age_ns > cfg.stale_after_ms * 1_000_000 {
                    *s.faults.entry("stale".to_string()).or_default() += 1;
                    s.failing = Some(format!(
                        "stale: the BMC's reading is {:.1} s old (energy.{}.stale_after_ms = {})",
                        age_ns as f64 / 1e9,
                        cfg.kind,
                        cfg.stale_after_ms
                    ));
                }
                return;
            }
            t
        }
        None => sent / 2 + received / 2,
    };
    s.failing = None;
    s.readings += 1;
    s.samples.push_back(PowerSample {
        t_unix_ns,
        watts: reading.watts,
    });
    while s.samples.len() > MAX_SAMPLES {
        s.samples.pop_front();
    }
}

/// The poller thread and what it shares; dropping it stops the thread.
pub struct PlatformPoller {
    cfg: PollSettings,
    shared: Arc<Mutex<Shared>>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The Redfish poller (a [`PlatformPoller`] reading Redfish).
pub type RedfishPoller = PlatformPoller;
/// Platform power on top of an inner source, from Redfish.
pub type RedfishSource = PlatformSource;

impl PlatformPoller {
    /// Check the section, build the client (CA file, pin, credentials) and start polling.
    pub fn start(cfg: &RedfishConfig) -> Result<PlatformPoller, EnergyError> {
        cfg.validate()?;
        let client = Client::new(cfg)?;
        Self::spawn(Box::new(client), cfg.settings())
    }

    /// Start polling `reader` every `cfg.poll_ms`.
    pub(crate) fn spawn(
        mut reader: Box<dyn PowerReader>,
        cfg: PollSettings,
    ) -> Result<PlatformPoller, EnergyError> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop, stopped) = mpsc::channel::<()>();
        let poll = Duration::from_millis(cfg.poll_ms);
        let thread = {
            let shared = Arc::clone(&shared);
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name(format!("sci-{}", cfg.kind))
                .spawn(move || loop {
                    poll_once(reader.as_mut(), &cfg, &shared);
                    match stopped.recv_timeout(poll) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                })
                .map_err(|e| EnergyError::io("platform power poller thread", e))?
        };
        Ok(PlatformPoller {
            cfg: cfg.clone(),
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        match self.shared.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for PlatformPoller {
    fn drop(&mut self) {
        // Ends the poller's wait; a request in flight ends by its timeout.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Platform power from the BMC on top of an inner source (RAPL or the model).
pub struct PlatformSource {
    inner: Box<dyn EnergySource>,
    poller: PlatformPoller,
    name: String,
    /// The reason platform power is missing, while it is (said once).
    missing: Option<String>,
}

impl PlatformSource {
    /// `inner` measures the CPU package (RAPL) or estimates (model).
    pub fn new(poller: PlatformPoller, inner: Box<dyn EnergySource>) -> PlatformSource {
        let kind = poller.cfg.kind;
        let name = if inner.estimated() {
            kind.to_string()
        } else {
            format!("{kind}+{}", inner.name())
        };
        PlatformSource {
            inner,
            poller,
            name,
            missing: None,
        }
    }

    /// Good readings taken so far, and the newest sample's time (tests wait on them).
    pub fn readings(&self) -> (u64, Option<u64>) {
        let s = self.poller.lock();
        (s.readings, s.samples.back().map(|x| x.t_unix_ns))
    }

    /// Why the last poll failed, while the BMC fails.
    pub fn failing(&self) -> Option<String> {
        self.poller.lock().failing.clone()
    }
}

impl EnergySource for PlatformSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn estimated(&self) -> bool {
        false
    }

    fn model_description(&self) -> Option<String> {
        self.inner.model_description()
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        let (start, end) = (sample.start_unix_ns, sample.end_unix_ns);
        let stale_after_ns = self.poller.cfg.stale_after_ms * 1_000_000;
        let kind = self.poller.cfg.kind;
        let (integral, faults, failing) = {
            let mut s = self.poller.lock();
            let samples: Vec<PowerSample> = s.samples.iter().copied().collect();
            // Keep what the next window may still need (the last sample before its start).
            while s.samples.len() > 1 && s.samples[1].t_unix_ns <= end {
                s.samples.pop_front();
            }
            (
                integrate(&samples, start, end, stale_after_ns),
                std::mem::take(&mut s.faults),
                s.failing.clone(),
            )
        };
        let inner = self.inner.window_energy(sample);
        let mut energy = match (integral, inner) {
            (Ok(platform), Ok(mut inner)) => {
                if self.missing.take().is_some() {
                    inner
                        .warnings
                        .push(format!("{}: platform power measured again", self.name));
                }
                self.with_platform(inner, &platform, end.saturating_sub(start))
            }
            (Ok(platform), Err(e)) => {
                // RAPL failed this window: the platform reading alone is still a measurement.
                let mut w = self.platform_only(&platform, end.saturating_sub(start));
                w.warnings.push(format!(
                    "{}: {e}; the host's energy is the platform's alone",
                    self.inner.name()
                ));
                count_fault(&mut w.faults, self.inner.name(), "failed");
                w
            }
            (Err(missing), inner) => {
                let why = match (&missing, &failing) {
                    (_, Some(f)) => f.clone(),
                    (NotCovered::NoSample, None) => "no reading yet".to_string(),
                    (
                        NotCovered::Stale {
                            uncovered_ns,
                            newest_age_ns,
                        },
                        None,
                    ) => format!(
                        "stale: {:.1} s of the window has no fresh reading (newest {:.1} s old)",
                        *uncovered_ns as f64 / 1e9,
                        *newest_age_ns as f64 / 1e9
                    ),
                };
                let mut w = inner?;
                // Said when the outage starts and when its cause changes
                // (the fault's name before the first `:`), not every window.
                let cause = |text: &str| text.split(':').next().unwrap_or("").to_string();
                if self.missing.as_deref().map(cause) != Some(cause(&why)) {
                    w.warnings.push(format!(
                        "{kind}: platform power not measured ({why}); windows carry {}'s energy alone until it is (counted in sci_energy_faults_total{{source=\"{kind}\"}})",
                        w.source
                    ));
                }
                self.missing = Some(why);
                let fault = match missing {
                    NotCovered::NoSample => "no_sample",
                    NotCovered::Stale { .. } => "stale",
                };
                count_fault(&mut w.faults, kind, "missing");
                if failing.is_none() {
                    count_fault(&mut w.faults, kind, fault);
                }
                w
            }
        };
        for (fault, n) in faults {
            *energy.faults.entry(format!("{kind}/{fault}")).or_default() += n;
        }
        Ok(energy)
    }
}

impl PlatformSource {
    fn platform_domain(&self, name: &str, energy_j: f64, idle: bool, cpus: u32) -> DomainReading {
        DomainReading {
            name: name.to_string(),
            kind: DomainKind::Platform,
            package: None,
            cpus: (0..cpus).collect(),
            energy_j,
            counts_toward_host: true,
            idle_power_w: None,
            known_idle_j: idle.then_some(energy_j),
        }
    }

    fn platform_only(&self, platform: &Integral, duration_ns: u64) -> WindowEnergy {
        WindowEnergy {
            source: self.poller.cfg.kind.to_string(),
            estimated: false,
            duration_ns,
            domains: vec![self.platform_domain("platform", platform.energy_j, false, self.cpus())],
            warnings: Vec::new(),
            faults: BTreeMap::new(),
            sample_interval_ns: platform.max_gap_ns,
            host_factors: None,
        }
    }

    fn cpus(&self) -> u32 {
        crate::sources::sched::proc_info::online_cpus().len().max(1) as u32
    }

    /// The split (see the module note).
    fn with_platform(
        &self,
        inner: WindowEnergy,
        platform: &Integral,
        duration_ns: u64,
    ) -> WindowEnergy {
        if inner.estimated {
            let mut w = self.platform_only(platform, duration_ns);
            w.warnings = inner.warnings;
            w.faults = inner.faults;
            return w;
        }
        let rapl_j = inner.host_energy_j();
        let rest_j = platform.energy_j - rapl_j;
        let mut w = inner;
        if rest_j < 0.0 {
            w.warnings.push(format!(
                "{}: platform {:.3} J is below RAPL's {:.3} J this window (the BMC averages over its own interval): platform left out of this window",
                self.poller.cfg.kind, platform.energy_j, rapl_j
            ));
            count_fault(&mut w.faults, self.poller.cfg.kind, "below_rapl");
            return w;
        }
        let cpus = w
            .domains
            .iter()
            .flat_map(|d| d.cpus.iter().copied())
            .max()
            .map_or_else(|| self.cpus(), |m| m + 1);
        w.domains.push(self.platform_domain(
            "platform-rest",
            rest_j,
            self.poller.cfg.split == PlatformSplit::Idle,
            cpus,
        ));
        w.source = self.name.clone();
        w.sample_interval_ns = platform.max_gap_ns;
        w
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(t_s: f64, watts: f64) -> PowerSample {
        PowerSample {
            t_unix_ns: (t_s * 1e9) as u64,
            watts,
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn trapezoid_by_hand() {
        let samples = [s(0.0, 100.0), s(2.0, 200.0), s(4.0, 200.0), s(6.0, 100.0)];
        // [1, 5]: 1..2 from 150 to 200 = 175; 2..4 = 400; 4..5 from 200 to 150 = 175.
        let i = integrate(&samples, SEC, 5 * SEC, 5 * SEC).unwrap();
        assert!((i.energy_j - 750.0).abs() < 1e-9, "{i:?}");
        assert_eq!(i.max_gap_ns, 2 * SEC);
        assert_eq!(i.newest_age_ns, SEC);
        // Held for at most stale_after after the last sample: [6, 8] held at 100 W.
        let i = integrate(&samples, 6 * SEC, 8 * SEC, 3 * SEC).unwrap();
        assert!((i.energy_j - 200.0).abs() < 1e-9, "{i:?}");
        // ...but not beyond it.
        let e = integrate(&samples, 6 * SEC, 10 * SEC, 3 * SEC).unwrap_err();
        assert_eq!(
            e,
            NotCovered::Stale {
                uncovered_ns: SEC,
                newest_age_ns: 4 * SEC
            }
        );
        // A gap longer than stale_after is not bridged: the first sample is
        // held for 5 s, then nothing until the next one.
        let gap = [s(0.0, 100.0), s(10.0, 100.0)];
        assert!((integrate(&gap, SEC, 2 * SEC, 5 * SEC).unwrap().energy_j - 100.0).abs() < 1e-9);
        assert_eq!(
            integrate(&gap, 4 * SEC, 7 * SEC, 5 * SEC),
            Err(NotCovered::Stale {
                uncovered_ns: 2 * SEC,
                newest_age_ns: 7 * SEC
            })
        );
        // A window starting on the first sample: 100 W to 150 W over 1 s.
        assert_eq!(
            integrate(&samples, 0, SEC, 5 * SEC).map(|i| i.energy_j),
            Ok(125.0)
        );
        // A window starting before the first sample is not covered.
        assert_eq!(
            integrate(&[s(1.0, 5.0)], 0, 2 * SEC, 5 * SEC),
            Err(NotCovered::NoSample)
        );
    }

    #[test]
    fn resources_parsed() {
        let power = br#"{"PowerControl":[{"PowerConsumedWatts":312.5}]}"#;
        assert_eq!(
            parse_power(power),
            Ok(ParsedReading {
                watts: 312.5,
                reading_time_ns: None
            })
        );
        let env = br#"{"PowerWatts":{"Reading":280,"ReadingTime":"2024-01-01T00:00:01.5Z"}}"#;
        assert_eq!(
            parse_power(env),
            Ok(ParsedReading {
                watts: 280.0,
                reading_time_ns: Some(1_704_067_201_500_000_000)
            })
        );
        let sensor = br#"{"Reading":90.25,"ReadingUnits":"W"}"#;
        assert_eq!(parse_power(sensor).unwrap().watts, 90.25);
        for (bad, says) in [
            (&b"{not json"[..], "not JSON"),
            (
                br#"{"PowerControl":[{"PowerConsumedWatts":"lots"}]}"#,
                "not a number",
            ),
            (
                br#"{"Thermal":{}}"#,
                "no PowerControl[0].PowerConsumedWatts",
            ),
        ] {
            let e = parse_power(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn config_refusals_name_the_key() {
        let ok = RedfishConfig {
            url: "http://127.0.0.1:8000".into(),
            ..Default::default()
        };
        ok.validate().unwrap();
        let cases: [(RedfishConfig, &str); 6] = [
            (
                RedfishConfig {
                    url: "ftp://bmc".into(),
                    ..ok.clone()
                },
                "energy.redfish.url",
            ),
            (
                RedfishConfig {
                    username: Some("root".into()),
                    ..ok.clone()
                },
                "energy.redfish.username",
            ),
            (
                RedfishConfig {
                    pinned_sha256: Some("abc".into()),
                    ..ok.clone()
                },
                "energy.redfish.pinned_sha256",
            ),
            (
                RedfishConfig {
                    timeout_ms: 0,
                    ..ok.clone()
                },
                "energy.redfish.timeout_ms",
            ),
            (
                RedfishConfig {
                    poll_ms: 2_000,
                    stale_after_ms: 1_000,
                    ..ok.clone()
                },
                "energy.redfish.stale_after_ms",
            ),
            (
                RedfishConfig {
                    max_power_w: f64::NAN,
                    ..ok.clone()
                },
                "energy.redfish.max_power_w",
            ),
        ];
        for (c, key) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
