//! The on-disk spool: every window is durable before it is sent, and leaves
//! the spool only when the aggregator has stored it, or into the quarantine
//! folder with the reason (counted). Nothing is deleted in silence.
//!
//! Layout of the spool directory:
//! - `<seq, 20 digits>.win`, one per window:
//!   `b"SCIW"` | version (u8, 1) | payload length (u32 LE) | CRC-32 of the
//!   payload (u32 LE) | payload (the `sci.v1.WindowReport`, protobuf, which
//!   names its own agent instance). Written to a `.tmp` file, fsynced,
//!   renamed into place, then the directory is fsynced: a window is in the
//!   spool whole or not at all; a failed write (full disk, read-only
//!   filesystem) removes its `.tmp` and is counted.
//! - `state`: `v3 <agent_instance> <next_seq> <measured_through_ns> <crc32 hex>`,
//!   written the same way, so a restarted agent keeps its identity and
//!   continues the numbering, and knows where the last spooled window ended
//!   (the time until its own first window was not measured: it says so).
//!   A `v2` state (without the end) is read as it is. A `state` whose checksum does not match, that cannot be
//!   read, or that is missing while windows are spooled is reported and
//!   rebuilt from the spool's own files: a new agent instance (so no seq of
//!   the old one is ever reused) numbering after the highest spooled seq;
//!   the spooled windows keep the instance they were written with.
//! - `quarantine/`: windows the aggregator refused for good, files found
//!   damaged (at start or while sending), and windows too large to send, each
//!   with a `.reason` file.
//! - `lock`: held with `flock` by the agent that has the spool open, and
//!   holding its pid; a second agent on the same spool is refused with that
//!   pid (two writers would number windows over each other).
//!
//! A window file that vanishes while the agent runs (deleted by hand, a
//! cleaner) is counted in `vanished` and skipped: it is gone, and waiting
//! for it would stop every later window.
//!
//! Refusals (see `sci.v1.RefusalCode`): a seq conflict or a wrong instance
//! makes the spool start a new agent instance and renumber the refused
//! window under it (it was not stored, so it cannot count twice); a window
//! ahead of the aggregator's clock stays and is sent again later; any other
//! refusal quarantines the window.
//!
//! Bounded size, in bytes: when the spool holds more than `max_bytes`, the
//! two oldest windows that were never sent (same instance, joined span at
//! most `max_merged_span`) are merged into one coarser window (time range
//! joined; energy, carbon, CPU, transactions and profile stacks summed;
//! processes rolled up by comm and service), which keeps the later seq and
//! counts in `merged_windows`. When no pair can be merged the oldest unsent
//! window is dropped (counted). Windows that may already have been sent are
//! never merged or dropped (the aggregator could hold them), so the spool
//! can exceed its bound by what is in flight (at most two batches).
//! A window larger than `max_window_bytes` has its profile stacks trimmed,
//! lowest energy first, until it fits; the trim is recorded in the window
//! (`profile_stacks_trimmed`, `profile_trimmed_energy_j`) and counted. If
//! it still does not fit (a window made of processes), its processes are
//! rolled up by comm, service and scenario (as a merge does); a window that
//! still does not fit is quarantined whole and counted in `oversized`.
//! Splitting it into several windows over the same time would make the
//! host's windows overlap, which the aggregator refuses.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sci_proto::v1;
use sci_proto::v1::RefusalCode;

use crate::error::AgentError;
use crate::window::{new_agent_instance, WindowReport};
use crate::wire::ToWire;

const MAGIC: &[u8; 4] = b"SCIW";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 4 + 4;
/// Default largest window record: a quarter of the aggregator's default message limit.
pub const DEFAULT_MAX_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Default longest span of a merged window (the aggregator's default `max_window_length`).
pub const DEFAULT_MAX_MERGED_SPAN: Duration = Duration::from_secs(3600);
pub const QUARANTINE_DIR: &str = "quarantine";

/// Encodes a window as a spool record.
pub fn encode_record(window: &v1::WindowReport) -> Vec<u8> {
    let payload = window.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a spool record; the error says what is wrong with it.
pub fn decode_record(bytes: &[u8]) -> Result<v1::WindowReport, String> {
    if bytes.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err("bad magic".into());
    }
    if bytes[4] != VERSION {
        return Err(format!("unknown version {}", bytes[4]));
    }
    let len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    let crc = u32::from_le_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
    let payload = &bytes[HEADER..];
    if payload.len() != len {
        return Err(format!(
            "payload is {} bytes, header says {len} (torn write)",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    v1::WindowReport::decode(payload).map_err(|e| format!("undecodable payload: {e}"))
}

/// Writes `bytes` as `dir/name` atomically and durably; on failure nothing
/// is left behind (no `.tmp`).
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AgentError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let result = (|| {
        let mut file = File::create(&tmp)
            .map_err(|e| AgentError::io(format!("creating {}", tmp.display()), e))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| AgentError::io(format!("renaming {}", tmp.display()), e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| AgentError::io(format!("syncing {}", dir.display()), e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.win")
}

fn state_text(instance: &str, next_seq: u64, measured_through_ns: u64) -> String {
    let body = format!("{instance} {next_seq} {measured_through_ns}");
    format!("v3 {body} {:08x}\n", crc32fast::hash(body.as_bytes()))
}

/// What a `state` file holds.
type State = (String, u64, Option<u64>);

/// (instance, next_seq, end of the last spooled window) of a `state` file,
/// or what is wrong with it.
fn parse_state(text: &str) -> Result<State, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let checked = |body: String, crc: &str| {
        let want = format!("{:08x}", crc32fast::hash(body.as_bytes()));
        if crc != want {
            return Err(format!(
                "checksum mismatch (file says {crc}, content gives {want})"
            ));
        }
        Ok(())
    };
    let number = |what: &str, text: &str| {
        text.parse::<u64>()
            .map_err(|e| format!("{what} {text:?}: {e}"))
    };
    match words[..] {
        ["v3", instance, next, through, crc] => {
            checked(format!("{instance} {next} {through}"), crc)?;
            let through = number("measured through", through)?;
            Ok((
                instance.to_string(),
                number("next seq", next)?,
                (through > 0).then_some(through),
            ))
        }
        ["v2", instance, next, crc] => {
            checked(format!("{instance} {next}"), crc)?;
            Ok((instance.to_string(), number("next seq", next)?, None))
        }
        // The format before checksums: taken as it is.
        [instance, next] if !instance.is_empty() && instance != "v2" && instance != "v3" => {
            Ok((instance.to_string(), number("next seq", next)?, None))
        }
        _ => Err(format!("unreadable ({} words)", words.len())),
    }
}

/// Counters of what the spool did (a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub appended: u64,
    pub acked: u64,
    pub merges: u64,
    /// Files found damaged (at start or while sending), moved to quarantine.
    pub corrupt: u64,
    /// Windows refused for good by the aggregator, moved to quarantine.
    pub quarantined_refused: u64,
    /// Windows renumbered under a new instance after a seq conflict or wrong instance.
    pub renumbered: u64,
    /// New agent instances started (damaged or lost state, seq conflicts).
    pub new_instances: u64,
    /// Damaged or lost `state` files rebuilt from the spool's files.
    pub state_recovered: u64,
    /// Refusals for a clock ahead of the aggregator's: kept, sent again later.
    pub deferred: u64,
    /// Windows lost because the spool could not write them (full disk, read-only).
    pub dropped_write_failed: u64,
    /// Windows (as measured: a merged record counts all it stands for)
    /// dropped to hold the byte bound when nothing could be merged.
    pub dropped_spool_full: u64,
    /// Profile stacks trimmed so a window fits the batch limit.
    pub trimmed_stacks: u64,
    /// Failed writes of any spool file (window, merge, state).
    pub write_failures: u64,
    /// Window files that vanished while the agent ran: skipped.
    pub vanished: u64,
    /// Windows too large to send even trimmed and rolled up, or refused by
    /// the aggregator as larger than its message limit: quarantined.
    pub oversized: u64,
    /// Windows refused because this host's clock is behind the
    /// aggregator's (misdated): quarantined.
    pub clock_behind: u64,
}

/// What the spool reports to the metrics endpoint, readable without its lock.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub pending_windows: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// End (unix ns) of the oldest window waiting, 0 when none.
    pub oldest_pending_end_ns: AtomicU64,
    pub acked: AtomicU64,
    pub merges: AtomicU64,
    pub corrupt: AtomicU64,
    pub quarantined_refused: AtomicU64,
    pub renumbered: AtomicU64,
    pub new_instances: AtomicU64,
    pub state_recovered: AtomicU64,
    pub deferred: AtomicU64,
    pub dropped_write_failed: AtomicU64,
    pub dropped_spool_full: AtomicU64,
    pub trimmed_stacks: AtomicU64,
    pub write_failures: AtomicU64,
    pub vanished: AtomicU64,
    pub oversized: AtomicU64,
    pub clock_behind: AtomicU64,
    /// Windows held as ahead of the aggregator's clock.
    pub held_windows: AtomicU64,
    /// Unix seconds of the last acknowledgement, 0 before the first.
    pub last_ack_unix_s: AtomicU64,
    /// Unix seconds of the last refusal for the agent's clock (ahead or
    /// behind the aggregator's), 0 before the first.
    pub last_clock_refusal_unix_s: AtomicU64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_window_bytes: u64,
    max_merged_span_ns: u64,
    agent_instance: String,
    next_seq: u64,
    /// End (unix ns) of the last window appended, by this run or an earlier one.
    measured_through_ns: Option<u64>,
    /// seq -> (size in bytes of the record file, window end unix ns).
    sizes: BTreeMap<u64, (u64, u64)>,
    /// Windows with seq <= this may have reached the aggregator: never merged.
    maybe_sent_through: Option<u64>,
    /// Refused as ahead of the aggregator's clock: kept through acks, sent again later.
    held: BTreeSet<u64>,
    stats: SpoolStats,
    shared: Arc<DeliveryStats>,
    clock_log: RateLimitedLog,
    /// Holds the spool's `flock` while the spool is open.
    _lock: File,
}

/// A log line said at most once a minute, with how many were not said.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    const EVERY: Duration = Duration::from_secs(60);

    /// Whether to say the line now, and how many were held back before it.
    fn admit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Takes the spool's lock file, or says which process holds it. The lock
/// is held on a read-only descriptor (a file open for writing would keep
/// the spool's filesystem from being remounted read-only); the pid is
/// written through another.
fn lock_spool(dir: &Path) -> Result<File, AgentError> {
    use std::io::Read;
    let path = dir.join("lock");
    let io = |what: &str, e| AgentError::io(format!("{what} {}", path.display()), e);
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| io("creating", e))?;
    let mut file = File::open(&path).map_err(|e| io("opening", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "a process that has not written its pid yet".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(AgentError::Spool(format!(
                "{} is in use by another agent ({holder}, holding {}): two agents on one spool would number windows over each other; give each agent its own agent.spool_dir",
                dir.display(),
                path.display()
            )));
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("locking", e)),
    }
    fs::write(&path, format!("{}\n", std::process::id())).map_err(|e| io("writing", e))?;
    Ok(file)
}

/// What the spool did with an acknowledgement.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settled {
    pub deleted: usize,
    pub quarantined: usize,
    pub renumbered: usize,
    pub deferred: usize,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A new spool takes `new_instance`
    /// as its agent instance; an existing one keeps its own.
    pub fn open(dir: &Path, max_bytes: u64, new_instance: &str) -> Result<Spool, AgentError> {
        fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating spool {}", dir.display()), e))?;
        let lock = lock_spool(dir)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            max_window_bytes: DEFAULT_MAX_WINDOW_BYTES,
            max_merged_span_ns: DEFAULT_MAX_MERGED_SPAN.as_nanos() as u64,
            agent_instance: new_instance.to_string(),
            next_seq: 0,
            measured_through_ns: None,
            sizes: BTreeMap::new(),
            maybe_sent_through: None,
            held: BTreeSet::new(),
            stats: SpoolStats::default(),
            shared: Arc::new(DeliveryStats::default()),
            clock_log: RateLimitedLog::default(),
            _lock: lock,
        };
        let entries = fs::read_dir(dir)
            .map_err(|e| AgentError::io(format!("listing {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write that never completed: its window was never acknowledged as spooled.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".win")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = fs::read(entry.path())
                .map_err(|e| AgentError::io(format!("reading {}", entry.path().display()), e))?;
            match decode_record(&bytes) {
                Ok(w) => {
                    spool.sizes.insert(seq, (bytes.len() as u64, w.end_unix_ns));
                }
                Err(reason) => spool.quarantine_file(seq, &format!("damaged: {reason}"), true)?,
            }
        }
        let highest = spool.sizes.keys().next_back().map_or(0, |s| s + 1);
        let state_path = dir.join("state");
        let state = match fs::read_to_string(&state_path) {
            Ok(text) => Some(parse_state(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(format!("cannot be read: {e}"))),
        };
        match state {
            Some(Ok((instance, next, through))) => {
                spool.agent_instance = instance;
                spool.next_seq = next.max(highest);
                spool.measured_through_ns = through;
            }
            None if spool.sizes.is_empty() => {}
            problem => {
                let what = match problem {
                    Some(Err(reason)) => format!("is damaged ({reason})"),
                    _ => format!("is missing while {} windows are spooled", spool.sizes.len()),
                };
                spool.agent_instance = new_agent_instance();
                spool.next_seq = highest;
                spool.stats.state_recovered += 1;
                spool.stats.new_instances += 1;
                tracing::error!(
                    "spool: {} {what}; rebuilt from the spool's files: new agent instance {} from seq {} ({} spooled windows keep their own instance)",
                    state_path.display(),
                    spool.agent_instance,
                    spool.next_seq,
                    spool.sizes.len()
                );
            }
        }
        let spooled_end = spool.sizes.values().map(|(_, end)| *end).max();
        spool.measured_through_ns = spool.measured_through_ns.max(spooled_end);
        // Everything found may have been sent by the previous run.
        spool.maybe_sent_through = spool.sizes.keys().next_back().copied();
        spool.write_state()?;
        spool.publish();
        Ok(spool)
    }

    /// Largest window record and longest merged span (defaults: 8 MiB, 1 h).
    pub fn set_window_limits(&mut self, max_window_bytes: u64, max_merged_span: Duration) {
        self.max_window_bytes = max_window_bytes.max(1024);
        self.max_merged_span_ns = max_merged_span.as_nanos() as u64;
    }

    /// The counters shared with the metrics endpoint.
    pub fn delivery_stats(&self) -> Arc<DeliveryStats> {
        Arc::clone(&self.shared)
    }

    fn publish(&self) {
        let s = &self.stats;
        let d = &self.shared;
        d.pending_windows
            .store(self.sizes.len() as u64, Ordering::Relaxed);
        d.pending_bytes.store(self.bytes(), Ordering::Relaxed);
        d.oldest_pending_end_ns.store(
            self.sizes.values().map(|(_, end)| *end).min().unwrap_or(0),
            Ordering::Relaxed,
        );
        for (atomic, value) in [
            (&d.acked, s.acked),
            (&d.merges, s.merges),
            (&d.corrupt, s.corrupt),
            (&d.quarantined_refused, s.quarantined_refused),
            (&d.renumbered, s.renumbered),
            (&d.new_instances, s.new_instances),
            (&d.state_recovered, s.state_recovered),
            (&d.deferred, s.deferred),
            (&d.dropped_write_failed, s.dropped_write_failed),
            (&d.dropped_spool_full, s.dropped_spool_full),
            (&d.trimmed_stacks, s.trimmed_stacks),
            (&d.write_failures, s.write_failures),
            (&d.vanished, s.vanished),
            (&d.oversized, s.oversized),
            (&d.clock_behind, s.clock_behind),
            (&d.held_windows, self.held.len() as u64),
        ] {
            atomic.store(value, Ordering::Relaxed);
        }
    }

    fn write_state(&mut self) -> Result<(), AgentError> {
        let text = state_text(
            &self.agent_instance,
            self.next_seq,
            self.measured_through_ns.unwrap_or(0),
        );
        let written = write_durably(&self.dir, "state", text.as_bytes());
        if written.is_err() {
            self.stats.write_failures += 1;
        }
        written
    }

    /// Moves `seq`'s file to the quarantine folder with `reason` beside it.
    fn quarantine_file(&mut self, seq: u64, reason: &str, damaged: bool) -> Result<(), AgentError> {
        let qdir = self.dir.join(QUARANTINE_DIR);
        fs::create_dir_all(&qdir)
            .map_err(|e| AgentError::io(format!("creating {}", qdir.display()), e))?;
        let from = self.dir.join(file_name(seq));
        let mut to = qdir.join(file_name(seq));
        let mut n = 1;
        while to.exists() {
            to = qdir.join(format!("{seq:020}.{n}.win"));
            n += 1;
        }
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from.exists() => {
                self.vanished(seq);
                return Ok(());
            }
            Err(e) => {
                return Err(AgentError::io(
                    format!("moving {} to quarantine", from.display()),
                    e,
                ))
            }
        }
        let _ = fs::write(to.with_extension("reason"), format!("{reason}\n"));
        self.sizes.remove(&seq);
        self.held.remove(&seq);
        if damaged {
            self.stats.corrupt += 1;
        } else {
            self.stats.quarantined_refused += 1;
        }
        tracing::error!(
            "spool: window {seq} quarantined as {}: {reason}",
            to.display()
        );
        Ok(())
    }

    /// `seq`'s file is gone: forget it, counted (waiting for it would stop
    /// every later window).
    fn vanished(&mut self, seq: u64) {
        self.sizes.remove(&seq);
        self.held.remove(&seq);
        self.stats.vanished += 1;
        tracing::error!(
            "spool: window {seq} vanished from {} while the agent ran (deleted by something else); skipped",
            self.dir.display()
        );
    }

    /// Quarantines `seq` as too large to send: the aggregator refused it
    /// alone as larger than its message limit. Counted in `oversized`.
    pub fn quarantine_oversized(&mut self, seq: u64, reason: &str) -> Result<(), AgentError> {
        if !self.sizes.contains_key(&seq) {
            return Ok(());
        }
        let before = self.stats.quarantined_refused;
        self.quarantine_file(seq, &format!("too large to send: {reason}"), false)?;
        if self.stats.quarantined_refused > before {
            self.stats.quarantined_refused = before;
            self.stats.oversized += 1;
        }
        self.publish();
        Ok(())
    }

    pub fn agent_instance(&self) -> &str {
        &self.agent_instance
    }

    /// The seq the next window will carry.
    /// Where the last window appended (by this run or an earlier one) ended:
    /// a restarted agent measured nothing between it and its first window.
    pub fn measured_through_ns(&self) -> Option<u64> {
        self.measured_through_ns
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Windows waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// The seqs waiting, oldest first.
    pub fn pending_seqs(&self) -> Vec<u64> {
        self.sizes.keys().copied().collect()
    }

    pub fn bytes(&self) -> u64 {
        self.sizes.values().map(|(size, _)| size).sum()
    }

    /// Removes profile stacks (lowest energy first) until the record fits
    /// `max_window_bytes`, recording the trim in the window; then, if it
    /// still does not fit, rolls its processes up. False when it still does
    /// not fit.
    fn fit(&mut self, window: &mut v1::WindowReport) -> bool {
        let limit = self.max_window_bytes as usize;
        if HEADER + window.encoded_len() <= limit {
            return true;
        }
        // Without any stack, would it fit? If not, the processes are the bulk.
        let profile = std::mem::take(&mut window.profile);
        let without_profile = HEADER + window.encoded_len();
        window.profile = profile;
        if without_profile > limit {
            let before = window.processes.len();
            roll_up_processes(window);
            tracing::warn!(
                "spool: window {} of {before} processes rolled up to {} (by comm, service and scenario) to fit {limit} bytes",
                window.seq,
                window.processes.len()
            );
        }
        if HEADER + window.encoded_len() > limit && !window.profile.is_empty() {
            self.trim_stacks(window, limit);
        }
        HEADER + window.encoded_len() <= limit
    }

    fn trim_stacks(&mut self, window: &mut v1::WindowReport, limit: usize) {
        window
            .profile
            .sort_by(|a, b| b.energy_j.total_cmp(&a.energy_j));
        let mut trimmed = 0u64;
        while HEADER + window.encoded_len() > limit {
            let Some(stack) = window.profile.pop() else {
                break;
            };
            // Drop a batch of the smallest at once when far over: encoded_len is O(n).
            trimmed += 1;
            window.profile_trimmed_energy_j += stack.energy_j.max(0.0);
            let over = HEADER + window.encoded_len();
            if over > limit + limit / 4 {
                let extra = window.profile.len() / 8;
                for s in window.profile.drain(window.profile.len() - extra..) {
                    trimmed += 1;
                    window.profile_trimmed_energy_j += s.energy_j.max(0.0);
                }
            }
        }
        window.profile_stacks_trimmed += trimmed;
        self.stats.trimmed_stacks += trimmed;
        tracing::warn!(
            "spool: window {} trimmed of {trimmed} profile stacks to fit {limit} bytes",
            window.seq
        );
    }

    /// Writes a record; on failure counts it and leaves nothing behind.
    fn write_window(&mut self, window: &v1::WindowReport) -> Result<u64, AgentError> {
        let record = encode_record(window);
        match write_durably(&self.dir, &file_name(window.seq), &record) {
            Ok(()) => {
                self.sizes
                    .insert(window.seq, (record.len() as u64, window.end_unix_ns));
                Ok(record.len() as u64)
            }
            Err(e) => {
                self.stats.write_failures += 1;
                Err(e)
            }
        }
    }

    /// Appends a window under the spool's instance and next seq (which it
    /// returns), durably, then keeps the spool within bounds. If it cannot
    /// be written the window is lost, counted, and the error says why; an
    /// `Ok` means the window is on disk.
    pub fn append(&mut self, window: &v1::WindowReport) -> Result<u64, AgentError> {
        let mut window = window.clone();
        window.agent_instance = self.agent_instance.clone();
        window.seq = self.next_seq;
        if !self.fit(&mut window) {
            return self.quarantine_unsendable(&window);
        }
        if let Err(e) = self.write_window(&window) {
            self.stats.dropped_write_failed += 1;
            self.publish();
            return Err(e);
        }
        self.next_seq += 1;
        self.stats.appended += 1;
        self.measured_through_ns = self.measured_through_ns.max(Some(window.end_unix_ns));
        // The window is spooled: a failure from here on is reported (and
        // counted) but does not un-spool it. A stale `state` is corrected at
        // the next start from the files themselves.
        if let Err(e) = self.write_state() {
            tracing::error!("spool: state not updated after window {}: {e}", window.seq);
        }
        if let Err(e) = self.enforce_bound() {
            tracing::error!("spool: could not hold the byte bound: {e}");
        }
        self.publish();
        Ok(window.seq)
    }

    /// A window that cannot fit `max_window_bytes` even trimmed and rolled
    /// up goes straight to quarantine (counted in `oversized`); the error
    /// says so. Its seq is used, so the numbering stays unique.
    fn quarantine_unsendable(&mut self, window: &v1::WindowReport) -> Result<u64, AgentError> {
        let size = HEADER + window.encoded_len();
        let reason = format!(
            "too large to send: {size} bytes with {} processes rolled up and every profile stack trimmed, above the {} byte window limit (aggregator.batch_max_bytes)",
            window.processes.len(),
            self.max_window_bytes
        );
        let qdir = self.dir.join(QUARANTINE_DIR);
        let written = fs::create_dir_all(&qdir)
            .map_err(|e| AgentError::io(format!("creating {}", qdir.display()), e))
            .and_then(|_| write_durably(&qdir, &file_name(window.seq), &encode_record(window)));
        self.next_seq += 1;
        if let Err(e) = self.write_state() {
            tracing::error!("spool: state not updated after window {}: {e}", window.seq);
        }
        match written {
            Ok(()) => {
                let _ = fs::write(
                    qdir.join(file_name(window.seq)).with_extension("reason"),
                    format!("{reason}\n"),
                );
                self.stats.oversized += 1;
            }
            Err(e) => {
                self.stats.write_failures += 1;
                self.stats.dropped_write_failed += 1;
                self.publish();
                return Err(e);
            }
        }
        self.publish();
        Err(AgentError::Spool(format!(
            "window {} quarantined: {reason}",
            window.seq
        )))
    }

    fn read(&self, seq: u64) -> Result<v1::WindowReport, String> {
        let path = self.dir.join(file_name(seq));
        let bytes = fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        decode_record(&bytes)
    }

    /// The next batch after `after` (all windows when None), in seq order:
    /// windows of one agent instance, at most `max_windows` and `max_bytes`
    /// of records (at least one window). A file found damaged is
    /// quarantined and skipped.
    pub fn next_batch(
        &mut self,
        after: Option<u64>,
        max_windows: usize,
        max_bytes: u64,
    ) -> Result<Vec<v1::WindowReport>, AgentError> {
        let candidates: Vec<(u64, u64)> = self
            .sizes
            .iter()
            .filter(|(s, _)| after.is_none_or(|a| **s > a))
            .map(|(s, (size, _))| (*s, *size))
            .collect();
        let mut out: Vec<v1::WindowReport> = Vec::new();
        let mut bytes = 0u64;
        for (seq, size) in candidates {
            if out.len() >= max_windows.max(1) || (!out.is_empty() && bytes + size > max_bytes) {
                break;
            }
            let mut window = match self.read(seq) {
                Ok(w) => w,
                Err(reason) => {
                    self.quarantine_file(seq, &format!("damaged: {reason}"), true)?;
                    continue;
                }
            };
            let (mut size, mut window_ok) = (size, true);
            if size > self.max_window_bytes && !window.profile.is_empty() {
                // Spooled under a larger limit (an earlier run): trim it now, or it
                // might never be accepted (the window limit is below the aggregator's).
                if !self.fit(&mut window) {
                    // Spooled under a larger limit and too large for this one.
                    let reason = format!(
                        "{size} bytes, above the {} byte window limit even trimmed and rolled up",
                        self.max_window_bytes
                    );
                    self.quarantine_oversized(seq, &reason)?;
                    continue;
                }
                match self.write_window(&window) {
                    Ok(new_size) => size = new_size,
                    Err(e) => {
                        tracing::error!("spool: trimmed window {seq} not rewritten: {e}");
                        window_ok = false;
                    }
                }
            }
            if !window_ok {
                break;
            }
            if out
                .first()
                .is_some_and(|f| f.agent_instance != window.agent_instance)
            {
                break;
            }
            bytes += size;
            out.push(window);
        }
        if let Some(last) = out.last() {
            self.maybe_sent_through = Some(
                self.maybe_sent_through
                    .map_or(last.seq, |s| s.max(last.seq)),
            );
        }
        self.publish();
        Ok(out)
    }

    /// The aggregator holds every window with seq <= `seq`: delete them.
    pub fn ack_through(&mut self, seq: u64) -> Result<usize, AgentError> {
        self.settle(&v1::Ack {
            acked_through_seq: seq,
            ..Default::default()
        })
        .map(|s| s.deleted)
    }

    /// Applies an acknowledgement: refused windows are quarantined,
    /// renumbered under a new instance, or kept for later (by their code);
    /// every other window with seq <= `acked_through_seq` is deleted.
    pub fn settle(&mut self, ack: &v1::Ack) -> Result<Settled, AgentError> {
        let mut settled = Settled::default();
        let mut renumber = Vec::new();
        for refusal in &ack.refused {
            if !self.sizes.contains_key(&refusal.seq) {
                continue;
            }
            let code = RefusalCode::try_from(refusal.code).unwrap_or(RefusalCode::Unspecified);
            match code {
                RefusalCode::SeqConflict | RefusalCode::WrongInstance => renumber.push(refusal.seq),
                RefusalCode::ClockBehind => {
                    self.shared
                        .last_clock_refusal_unix_s
                        .store(now_unix_s(), Ordering::Relaxed);
                    let before = self.stats.quarantined_refused;
                    self.quarantine_file(
                        refusal.seq,
                        &format!("refused by the aggregator: {}", refusal.reason),
                        false,
                    )?;
                    if self.stats.quarantined_refused > before {
                        self.stats.quarantined_refused = before;
                        self.stats.clock_behind += 1;
                    }
                    settled.quarantined += 1;
                }
                RefusalCode::ClockAhead => {
                    self.held.insert(refusal.seq);
                    self.stats.deferred += 1;
                    settled.deferred += 1;
                    self.shared
                        .last_clock_refusal_unix_s
                        .store(now_unix_s(), Ordering::Relaxed);
                    // Said once a minute: a clock far ahead defers every window.
                    if let Some(unsaid) = self.clock_log.admit() {
                        tracing::warn!(
                            "aggregator: window {} is ahead of its clock ({}); kept, sent again later ({unsaid} more such refusals since the last line)",
                            refusal.seq,
                            refusal.reason
                        );
                    }
                }
                _ => {
                    self.quarantine_file(
                        refusal.seq,
                        &format!("refused by the aggregator: {}", refusal.reason),
                        false,
                    )?;
                    settled.quarantined += 1;
                }
            }
        }
        if !renumber.is_empty() {
            self.agent_instance = new_agent_instance();
            self.stats.new_instances += 1;
            tracing::warn!(
                "aggregator refused {} windows for their seq or instance; new agent instance {}",
                renumber.len(),
                self.agent_instance
            );
            for seq in renumber {
                let Ok(mut window) = self.read(seq) else {
                    self.quarantine_file(seq, "damaged while renumbering", true)?;
                    continue;
                };
                window.agent_instance = self.agent_instance.clone();
                window.seq = self.next_seq;
                self.write_window(&window)?;
                self.next_seq += 1;
                self.write_state()?;
                let _ = fs::remove_file(self.dir.join(file_name(seq)));
                self.sizes.remove(&seq);
                self.stats.renumbered += 1;
                settled.renumbered += 1;
            }
        }
        let done: Vec<u64> = self
            .sizes
            .range(..=ack.acked_through_seq)
            .map(|(s, _)| *s)
            .filter(|s| !self.held.contains(s))
            .collect();
        for s in &done {
            let path = self.dir.join(file_name(*s));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::io(format!("deleting {}", path.display()), e)),
            }
            self.sizes.remove(s);
        }
        settled.deleted = done.len();
        self.stats.acked += done.len() as u64;
        self.shared
            .last_ack_unix_s
            .store(now_unix_s(), Ordering::Relaxed);
        self.publish();
        Ok(settled)
    }

    /// Windows kept because they were ahead of the aggregator's clock; they
    /// are sent again by the next stream (after a back-off).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Forgets which windows were held: the next stream sends them again.
    pub fn release_held(&mut self) {
        self.held.clear();
    }

    fn enforce_bound(&mut self) -> Result<(), AgentError> {
        while self.bytes() > self.max_bytes {
            let unsent: Vec<u64> = self
                .sizes
                .keys()
                .copied()
                .filter(|s| self.maybe_sent_through.is_none_or(|t| *s > t))
                .filter(|s| !self.held.contains(s))
                .collect();
            // The two oldest unsent windows that may become one.
            let mut pair = None;
            let mut damaged = None;
            for w in unsent.windows(2) {
                let (older, newer) = (w[0], w[1]);
                let (a, b) = match (self.read(older), self.read(newer)) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(r), _) => {
                        damaged = Some((older, r));
                        break;
                    }
                    (_, Err(r)) => {
                        damaged = Some((newer, r));
                        break;
                    }
                };
                let span = a.end_unix_ns.max(b.end_unix_ns) - a.start_unix_ns.min(b.start_unix_ns);
                if a.agent_instance == b.agent_instance && span <= self.max_merged_span_ns {
                    pair = Some((older, a, b));
                    break;
                }
            }
            if let Some((seq, reason)) = damaged {
                self.quarantine_file(seq, &format!("damaged: {reason}"), true)?;
                continue;
            }
            match pair {
                Some((older, a, b)) => {
                    let mut merged = merge_windows(&a, &b);
                    // Two windows that fit merge into one within the limit
                    // once rolled up; if not, the merged record is sent as it is.
                    let _ = self.fit(&mut merged);
                    self.write_window(&merged)?;
                    let _ = fs::remove_file(self.dir.join(file_name(older)));
                    self.sizes.remove(&older);
                    self.stats.merges += 1;
                    tracing::warn!(
                        "spool over {} bytes: merged window {older} into {}",
                        self.max_bytes,
                        merged.seq
                    );
                }
                None => {
                    // Nothing can be merged: the oldest unsent window goes, counted
                    // (but never the newest: it is what was just measured).
                    let Some(&oldest) = unsent.first().filter(|_| unsent.len() > 1) else {
                        return Ok(());
                    };
                    let stands_for = self
                        .read(oldest)
                        .map_or(1, |w| u64::from(w.merged_windows.max(1)));
                    let _ = fs::remove_file(self.dir.join(file_name(oldest)));
                    self.sizes.remove(&oldest);
                    self.stats.dropped_spool_full += stands_for;
                    tracing::error!(
                        "spool over {} bytes and nothing can be merged: window {oldest} dropped",
                        self.max_bytes
                    );
                }
            }
        }
        Ok(())
    }
}

/// The window's processes added up by (comm, service, scenario), without
/// pid, exe, cgroup, command line or threads (as a merge does): the same
/// CPU time, energy and carbon in fewer records.
fn roll_up_processes(window: &mut v1::WindowReport) {
    let mut rolled: BTreeMap<(String, String, String), v1::ProcessRecord> = BTreeMap::new();
    for p in window.processes.drain(..) {
        let e = rolled
            .entry((p.comm.clone(), p.service.clone(), p.scenario.clone()))
            .or_insert_with(|| v1::ProcessRecord {
                comm: p.comm.clone(),
                service: p.service.clone(),
                scenario: p.scenario.clone(),
                ..Default::default()
            });
        e.cpu_ns = e.cpu_ns.saturating_add(p.cpu_ns);
        e.energy_j += p.energy_j;
        e.idle_share_j += p.idle_share_j;
        e.carbon_g += p.carbon_g;
        e.embodied_g += p.embodied_g;
    }
    window.processes = rolled.into_values().collect();
}

/// One coarser window standing for `a` then `b` (b keeps its seq): the
/// window document's arithmetic ([`WindowReport::absorb`]).
pub fn merge_windows(a: &v1::WindowReport, b: &v1::WindowReport) -> v1::WindowReport {
    let earlier: WindowReport = a.to_wire();
    let mut merged: WindowReport = b.to_wire();
    merged.absorb(&earlier);
    merged.to_wire()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A window of `energy_j` over one second with `stacks` profile stacks.
    fn window(seq: u64, energy_j: f64, stacks: usize) -> v1::WindowReport {
        let start = 1_700_000_000_000_000_000 + seq * 1_000_000_000;
        v1::WindowReport {
            host: "h".into(),
            agent_instance: "ignored".into(),
            seq,
            start_unix_ns: start,
            end_unix_ns: start + 1_000_000_000,
            host_energy_j: energy_j,
            busy_cpu_ns: 1_000,
            scenarios: vec![v1::ScenarioRecord {
                scenario: "query".into(),
                transactions: 3,
                ..Default::default()
            }],
            profile: (0..stacks)
                .map(|i| v1::ProfileStack {
                    comm: "svc".into(),
                    stack: format!("main;work;frame_{i:04}_{}", "x".repeat(40)),
                    samples: 1,
                    energy_j: 0.001 * (i + 1) as f64,
                    ..Default::default()
                })
                .collect(),
            merged_windows: 1,
            ..Default::default()
        }
    }

    /// Issue 28 item 2: a merged window's carbon is still its energy x
    /// intensity x PUE (the aggregator refuses one that is not): the merge
    /// keeps the energy-weighted intensity. Two windows, 2 J at 100 g/kWh
    /// and 6 J at 500 g/kWh, PUE 1.5: 8 J carrying (2 x 100 + 6 x 500) / 8 =
    /// 400 g/kWh (main: the later window's 500, with the carbon of both).
    #[test]
    fn a_merged_window_keeps_carbon_equal_to_energy_x_intensity_x_pue() {
        let mut a = window(0, 2.0, 0);
        let mut b = window(1, 6.0, 0);
        for (w, intensity) in [(&mut a, 100.0), (&mut b, 500.0)] {
            w.carbon_intensity_g_per_kwh = intensity;
            w.pue = 1.5;
            w.host_carbon_g = w.host_energy_j / 3.6e6 * intensity * 1.5;
        }
        let m = merge_windows(&a, &b);
        assert_eq!(m.host_energy_j, 8.0);
        assert!((m.carbon_intensity_g_per_kwh - 400.0).abs() < 1e-9, "{m:?}");
        let expected_g = 8.0 / 3.6e6 * 400.0 * 1.5;
        assert!((m.host_carbon_g - expected_g).abs() < 1e-15);
        assert!(
            (m.host_energy_j / 3.6e6 * m.carbon_intensity_g_per_kwh * m.pue - m.host_carbon_g)
                .abs()
                < 1e-15
        );
        // No energy at all: the later window's intensity stays.
        let (mut a, mut b) = (window(0, 0.0, 0), window(1, 0.0, 0));
        a.carbon_intensity_g_per_kwh = 100.0;
        b.carbon_intensity_g_per_kwh = 500.0;
        assert_eq!(merge_windows(&a, &b).carbon_intensity_g_per_kwh, 500.0);
    }

    #[test]
    fn merged_windows_add_request_histograms_bucket_by_bucket() {
        let histogram =
            |service: &str, counts: Vec<u64>, sum: u64, rate: f64| v1::RequestCpuHistogram {
                scenario: "credit".into(),
                service: service.into(),
                counts,
                sum_cpu_ns: sum,
                energy_j_per_cpu_ns: rate,
                sub_bucket_bits: 4,
            };
        let mut a = window(1, 1.0, 0);
        a.request_cpu = vec![histogram("loans", vec![0, 2, 1], 10, 1e-9)];
        a.lost = Some(v1::LossCounters {
            request_histogram_full: 2,
            ..Default::default()
        });
        let mut b = window(2, 1.0, 0);
        b.request_cpu = vec![
            histogram("loans", vec![1, 0, 0, 4], 30, 3e-9),
            histogram("web", vec![0, 1], 1, 5e-9),
        ];
        b.lost = Some(v1::LossCounters {
            request_histogram_full: 1,
            ..Default::default()
        });
        let m = merge_windows(&a, &b);
        assert_eq!(m.request_cpu.len(), 2);
        assert_eq!(m.request_cpu[0].service, "loans");
        assert_eq!(m.request_cpu[0].counts, vec![1, 2, 1, 4]);
        assert_eq!(m.request_cpu[0].sum_cpu_ns, 40);
        // Weighted by the requests' CPU time: (10 x 1 + 30 x 3) / 40 nJ/ns.
        assert!((m.request_cpu[0].energy_j_per_cpu_ns - 2.5e-9).abs() < 1e-20);
        assert_eq!(m.request_cpu[1], histogram("web", vec![0, 1], 1, 5e-9));
        assert_eq!(m.lost.unwrap().request_histogram_full, 3);
        // A window spooled by an older agent (log2 buckets) is not added
        // bucket by bucket to a log-linear one: both are kept.
        let mut old = window(3, 1.0, 0);
        old.request_cpu = vec![v1::RequestCpuHistogram {
            sub_bucket_bits: 0,
            ..histogram("web", vec![0, 7], 7, 5e-9)
        }];
        let m = merge_windows(&m, &old);
        let web: Vec<_> = m
            .request_cpu
            .iter()
            .filter(|h| h.service == "web")
            .collect();
        assert_eq!(web.len(), 2, "{web:?}");
        assert_eq!((web[0].sub_bucket_bits, &web[0].counts), (0, &vec![0, 7]));
        assert_eq!((web[1].sub_bucket_bits, &web[1].counts), (4, &vec![0, 1]));
    }

    fn all_windows(spool: &mut Spool) -> Vec<v1::WindowReport> {
        spool.next_batch(None, usize::MAX, u64::MAX).unwrap()
    }

    fn quarantined(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(QUARANTINE_DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn the_spool_takes_its_own_instance_and_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
        assert_eq!(spool.append(&window(77, 1.0, 0)).unwrap(), 0);
        assert_eq!(spool.append(&window(3, 1.0, 0)).unwrap(), 1);
        let w = all_windows(&mut spool);
        assert_eq!(
            w.iter()
                .map(|w| (w.agent_instance.as_str(), w.seq))
                .collect::<Vec<_>>(),
            [("inst", 0), ("inst", 1)]
        );
    }

    #[test]
    fn merging_on_overflow_holds_the_byte_bound_and_keeps_every_joule() {
        let dir = tempfile::tempdir().unwrap();
        // Each window with 30 stacks is ~2.3 KB; 20 of them would be ~46 KB.
        let one = encode_record(&window(0, 1.0, 30)).len() as u64;
        let max = 6 * one;
        let mut spool = Spool::open(dir.path(), max, "inst").unwrap();
        for seq in 0..20 {
            spool.append(&window(seq, 1.5, 30)).unwrap();
            assert!(
                spool.bytes() <= max,
                "{} > {max} after {seq}",
                spool.bytes()
            );
        }
        let windows = all_windows(&mut spool);
        let energy: f64 = windows.iter().map(|w| w.host_energy_j).sum();
        let merged: u32 = windows.iter().map(|w| w.merged_windows).sum();
        let txn: u64 = windows
            .iter()
            .flat_map(|w| &w.scenarios)
            .map(|s| s.transactions)
            .sum();
        let samples: u64 = windows
            .iter()
            .flat_map(|w| &w.profile)
            .map(|s| s.samples)
            .sum();
        assert!((energy - 30.0).abs() < 1e-9, "{energy} J of 20 x 1.5 J");
        assert_eq!(merged, 20, "every window is in exactly one record");
        assert_eq!(txn, 60);
        assert_eq!(samples, 20 * 30, "the same stacks are summed, not repeated");
        assert_eq!(spool.stats().merges, 20 - windows.len() as u64);
        assert_eq!(spool.stats().dropped_spool_full, 0);
        // The same 30 stacks, summed: a merged window is no bigger than one window.
        assert!(windows.iter().all(|w| w.profile.len() == 30));
        // Merged time ranges join without gaps or overlap.
        assert_eq!(windows[0].start_unix_ns, window(0, 0.0, 0).start_unix_ns);
    }

    #[test]
    fn merging_never_joins_more_than_the_longest_window_and_drops_counted() {
        let dir = tempfile::tempdir().unwrap();
        let one = encode_record(&window(0, 1.0, 0)).len() as u64;
        let mut spool = Spool::open(dir.path(), 3 * one + one / 2, "inst").unwrap();
        // Windows may span at most 2 s merged: pairs only.
        spool.set_window_limits(1 << 20, Duration::from_secs(2));
        for seq in 0..10 {
            spool.append(&window(seq, 1.0, 0)).unwrap();
        }
        let windows = all_windows(&mut spool);
        assert!(spool.bytes() <= 3 * one + one / 2);
        assert!(windows
            .iter()
            .all(|w| w.end_unix_ns - w.start_unix_ns <= 2_000_000_000));
        let merged: u64 = windows.iter().map(|w| u64::from(w.merged_windows)).sum();
        let s = spool.stats();
        assert_eq!(
            merged + s.dropped_spool_full,
            10,
            "kept + dropped = appended"
        );
        assert!(s.dropped_spool_full > 0);
    }

    #[test]
    fn a_window_over_the_limit_is_trimmed_and_the_trim_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30, "inst").unwrap();
        spool.set_window_limits(64 * 1024, DEFAULT_MAX_MERGED_SPAN);
        let big = window(0, 5.0, 3000);
        let total_profile_j: f64 = big.profile.iter().map(|s| s.energy_j).sum();
        assert!(encode_record(&big).len() > 64 * 1024);
        spool.append(&big).unwrap();
        let w = &all_windows(&mut spool)[0];
        assert!(encode_record(w).len() <= 64 * 1024);
        assert_eq!(w.profile.len() as u64 + w.profile_stacks_trimmed, 3000);
        let kept_j: f64 = w.profile.iter().map(|s| s.energy_j).sum();
        assert!((kept_j + w.profile_trimmed_energy_j - total_profile_j).abs() < 1e-6);
        // The lowest-energy stacks went first.
        let min_kept = w
            .profile
            .iter()
            .map(|s| s.energy_j)
            .fold(f64::MAX, f64::min);
        assert!(min_kept > w.profile_trimmed_energy_j / w.profile_stacks_trimmed as f64);
        assert_eq!(spool.stats().trimmed_stacks, w.profile_stacks_trimmed);
        assert_eq!(w.host_energy_j, 5.0);
    }

    #[test]
    fn a_window_of_processes_over_the_limit_is_rolled_up_or_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30, "inst").unwrap();
        spool.set_window_limits(64 * 1024, DEFAULT_MAX_MERGED_SPAN);
        let processes = |comms: u32| {
            (0..4000u32)
                .map(|pid| v1::ProcessRecord {
                    pid,
                    comm: format!("worker-{}", pid % comms),
                    service: "loans".into(),
                    exe: format!("/opt/app/bin/worker-{pid}"),
                    cpu_ns: 1000,
                    energy_j: 0.25,
                    ..Default::default()
                })
                .collect::<Vec<_>>()
        };
        // 4,000 processes of 10 programs: rolled up, every joule kept.
        let mut big = window(0, 5.0, 0);
        big.processes = processes(10);
        assert!(encode_record(&big).len() > 64 * 1024);
        spool.append(&big).unwrap();
        let w = &all_windows(&mut spool)[0];
        assert_eq!(w.processes.len(), 10);
        let energy_j: f64 = w.processes.iter().map(|p| p.energy_j).sum();
        let cpu_ns: u64 = w.processes.iter().map(|p| p.cpu_ns).sum();
        assert!((energy_j - 1000.0).abs() < 1e-9, "{energy_j}");
        assert_eq!(cpu_ns, 4_000_000);
        // 4,000 distinct programs: no roll-up helps; quarantined, counted.
        let mut huge = window(1, 5.0, 0);
        huge.processes = processes(4000);
        let e = spool.append(&huge).unwrap_err().to_string();
        assert!(e.contains("too large to send"), "{e}");
        assert_eq!(spool.stats().oversized, 1);
        assert_eq!(spool.len(), 1, "only the rolled-up window waits");
        assert_eq!(
            quarantined(dir.path()).len(),
            2,
            "the window and its reason"
        );
        assert_eq!(spool.next_seq(), 2, "its seq is used");
    }

    #[test]
    fn batches_are_bounded_in_bytes_and_by_instance() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 30, "inst").unwrap();
        for seq in 0..10 {
            spool.append(&window(seq, 1.0, 30)).unwrap();
        }
        let one = encode_record(&window(0, 1.0, 30)).len() as u64;
        let batch = spool.next_batch(None, 64, 3 * one + 10).unwrap();
        assert_eq!(batch.len(), 3);
        // One window bigger than the byte bound still goes, alone.
        let batch = spool.next_batch(Some(2), 64, 10).unwrap();
        assert_eq!(batch.iter().map(|w| w.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_damaged_file_is_moved_aside_at_start_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
            for seq in 0..3 {
                spool.append(&window(seq, 1.0, 0)).unwrap();
            }
        }
        let victim = dir.path().join(file_name(1));
        let mut bytes = fs::read(&victim).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&victim, bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
        assert_eq!(spool.pending_seqs(), [0, 2]);
        assert_eq!(spool.stats().corrupt, 1);
        assert_eq!(
            quarantined(dir.path()),
            ["00000000000000000001.reason", "00000000000000000001.win"]
        );
        let reason = fs::read_to_string(
            dir.path()
                .join(QUARANTINE_DIR)
                .join("00000000000000000001.reason"),
        )
        .unwrap();
        assert!(reason.contains("checksum mismatch"), "{reason}");
        assert_eq!(all_windows(&mut spool).len(), 2);
        assert_eq!(spool.agent_instance(), "inst", "an intact state is kept");
    }

    #[test]
    fn a_file_damaged_while_running_is_quarantined_and_sending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
        for seq in 0..4 {
            spool.append(&window(seq, 1.0, 0)).unwrap();
        }
        fs::write(dir.path().join(file_name(1)), b"SCIW garbage").unwrap();
        let batch = spool.next_batch(None, 64, u64::MAX).unwrap();
        assert_eq!(batch.iter().map(|w| w.seq).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(spool.stats().corrupt, 1);
        assert_eq!(quarantined(dir.path()).len(), 2);
        assert_eq!(spool.ack_through(3).unwrap(), 3);
        assert!(spool.is_empty());
    }

    #[test]
    fn the_end_of_the_last_window_survives_a_restart_and_its_delivery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
            assert_eq!(spool.measured_through_ns(), None);
            for seq in 0..3 {
                spool.append(&window(seq, 1.0, 0)).unwrap();
            }
            // Delivered: the files go, the end stays.
            spool.ack_through(2).unwrap();
            assert!(spool.is_empty());
        }
        let spool = Spool::open(dir.path(), 1 << 20, "other").unwrap();
        assert_eq!(spool.agent_instance(), "inst");
        assert_eq!(spool.next_seq(), 3);
        assert_eq!(
            spool.measured_through_ns(),
            Some(1_700_000_000_000_000_000 + 3 * 1_000_000_000)
        );
        // A state written before the end was kept (v2) is read as it is.
        let body = "old 7";
        let v2 = format!("v2 {body} {:08x}\n", crc32fast::hash(body.as_bytes()));
        assert_eq!(parse_state(&v2), Ok(("old".to_string(), 7, None)));
        assert!(parse_state("v3 old 7 99 00000000").is_err());
    }

    #[test]
    fn a_damaged_state_is_detected_and_rebuilt_from_the_spool_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
            for seq in 0..12 {
                spool.append(&window(seq, 1.0, 0)).unwrap();
            }
            // The first two were delivered.
            spool.ack_through(1).unwrap();
        }
        let state_path = dir.path().join("state");
        let state = fs::read_to_string(&state_path).unwrap();
        assert!(state.starts_with("v3 inst 12 "), "{state}");
        // One damaged digit: next seq 12 reads 02 (seqs 2..11 would be reused).
        fs::write(&state_path, state.replacen("inst 12", "inst 02", 1)).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "fresh").unwrap();
        assert_eq!(spool.stats().state_recovered, 1);
        assert_ne!(
            spool.agent_instance(),
            "inst",
            "a new instance: no seq is reused"
        );
        assert_ne!(spool.agent_instance(), "fresh");
        assert_eq!(
            spool.next_seq(),
            12,
            "numbering continues after the spooled files"
        );
        // The spooled windows keep the instance they were measured under.
        let pending = all_windows(&mut spool);
        assert_eq!(pending.len(), 10);
        assert!(pending.iter().all(|w| w.agent_instance == "inst"));
        let new_seq = spool.append(&window(99, 1.0, 0)).unwrap();
        assert_eq!(new_seq, 12);
        // A batch never mixes instances.
        let first = spool.next_batch(None, 64, u64::MAX).unwrap();
        assert_eq!(first.len(), 10);
        let rest = spool.next_batch(Some(11), 64, u64::MAX).unwrap();
        assert_eq!(rest[0].agent_instance, spool.agent_instance());

        // A missing state with windows spooled is rebuilt the same way.
        drop(spool);
        fs::remove_file(&state_path).unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, "fresh").unwrap();
        assert_eq!(spool.stats().state_recovered, 1);
        assert_eq!(spool.next_seq(), 13);
        assert_eq!(spool.len(), 11);
    }

    #[test]
    fn refusals_are_quarantined_renumbered_or_held_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
        for seq in 0..5 {
            spool.append(&window(seq, 1.0 + seq as f64, 0)).unwrap();
        }
        let refusal = |seq: u64, code: RefusalCode| v1::Refusal {
            seq,
            reason: format!("{code:?}"),
            code: code as i32,
        };
        let settled = spool
            .settle(&v1::Ack {
                agent_instance: "inst".into(),
                acked_through_seq: 4,
                refused: vec![
                    refusal(1, RefusalCode::Invalid),
                    refusal(2, RefusalCode::SeqConflict),
                    refusal(3, RefusalCode::ClockAhead),
                ],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            settled,
            Settled {
                deleted: 2,
                quarantined: 1,
                renumbered: 1,
                deferred: 1
            }
        );
        // 1 is in quarantine with its reason; 2 came back as seq 5 of a new instance; 3 is kept.
        assert_eq!(
            quarantined(dir.path()),
            ["00000000000000000001.reason", "00000000000000000001.win"]
        );
        assert_eq!(spool.pending_seqs(), [3, 5]);
        assert_ne!(spool.agent_instance(), "inst");
        // Two batches: one per instance.
        let old = all_windows(&mut spool);
        assert_eq!(old.len(), 1);
        assert_eq!((old[0].agent_instance.as_str(), old[0].seq), ("inst", 3));
        let new = spool.next_batch(Some(3), 64, u64::MAX).unwrap();
        assert_eq!(new[0].agent_instance, spool.agent_instance());
        assert_eq!(
            new[0].host_energy_j, 3.0,
            "the renumbered window is window 2"
        );
        let s = spool.stats();
        assert_eq!(
            (
                s.quarantined_refused,
                s.renumbered,
                s.new_instances,
                s.deferred
            ),
            (1, 1, 1, 1)
        );
        // A later ack does not delete the held window until it is sent again.
        spool.ack_through(3).unwrap();
        assert_eq!(spool.pending_seqs(), [3, 5]);
        spool.release_held();
        spool.ack_through(5).unwrap();
        assert!(spool.is_empty());
    }

    #[test]
    fn a_failed_write_is_counted_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, "inst").unwrap();
        spool.append(&window(0, 1.0, 0)).unwrap();
        // The next record's name is taken by a non-empty directory: the rename fails.
        let blocker = dir.path().join(file_name(1));
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("x"), b"x").unwrap();
        let err = spool.append(&window(1, 1.0, 0)).unwrap_err().to_string();
        assert!(err.contains("renaming"), "{err}");
        assert_eq!(spool.stats().dropped_write_failed, 1);
        assert_eq!(spool.stats().write_failures, 1);
        let tmp: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(tmp.is_empty(), "{tmp:?}");
        fs::remove_dir_all(&blocker).unwrap();
        // The spool goes on with the next window.
        assert_eq!(spool.append(&window(2, 1.0, 0)).unwrap(), 1);
    }
}
