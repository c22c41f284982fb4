//! The on-disk spool: every window is durable before it is sent, and is
//! deleted only after the aggregator acknowledges it.
//!
//! Layout of the spool directory:
//! - `<seq, 20 digits>.win`, one per window:
//!   `b"SCIW"` | version (u8, 1) | payload length (u32 LE) | CRC-32 of the
//!   payload (u32 LE) | payload (the `sci.v1.WindowReport`, protobuf).
//!   Written to a `.tmp` file, fsynced, renamed into place, then the
//!   directory is fsynced: a window is in the spool whole or not at all. A
//!   file whose frame or checksum does not match (a torn write, a bad disk)
//!   is reported, moved aside as `.corrupt`, and never sent.
//! - `state`: `agent_instance next_seq`, written the same way, so a
//!   restarted agent keeps its identity and continues the numbering, and the
//!   aggregator's de-duplication by (host, agent_instance, seq) still holds.
//!
//! Bounded size: when the spool holds more than `max_bytes`, the two oldest
//! windows that were never sent are merged into one coarser window (time
//! range joined; energy, carbon, CPU and transactions summed; processes
//! rolled up by comm and service), which keeps the later seq and counts in
//! `merged_windows`. Nothing measured is dropped; every merge is counted.
//! Windows that may already have been sent are never merged (the aggregator
//! could hold them), so the spool can exceed its bound while the oldest
//! unacknowledged windows are in flight.
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use sci_proto::v1;

use crate::error::AgentError;

const MAGIC: &[u8; 4] = b"SCIW";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 4 + 4;

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

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AgentError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file =
        File::create(&tmp).map_err(|e| AgentError::io(format!("creating {}", tmp.display()), e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| AgentError::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, &path)
        .map_err(|e| AgentError::io(format!("renaming {}", tmp.display()), e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AgentError::io(format!("syncing {}", dir.display()), e))
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.win")
}

/// Counters of what the spool did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub appended: u64,
    pub acked: u64,
    pub merges: u64,
    pub corrupt: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    agent_instance: String,
    next_seq: u64,
    /// seq -> size in bytes of the record file.
    sizes: BTreeMap<u64, u64>,
    /// Windows with seq <= this may have reached the aggregator: never merged.
    maybe_sent_through: Option<u64>,
    stats: SpoolStats,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A new spool takes `new_instance`
    /// as its agent instance; an existing one keeps its own.
    pub fn open(dir: &Path, max_bytes: u64, new_instance: &str) -> Result<Spool, AgentError> {
        fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating spool {}", dir.display()), e))?;
        let mut sizes = BTreeMap::new();
        let mut corrupt = 0;
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
                Ok(_) => {
                    sizes.insert(seq, bytes.len() as u64);
                }
                Err(reason) => {
                    tracing::error!(
                        "spool: {} is damaged ({reason}); moved aside, not sent",
                        entry.path().display()
                    );
                    let _ = fs::rename(entry.path(), entry.path().with_extension("corrupt"));
                    corrupt += 1;
                }
            }
        }
        let state = fs::read_to_string(dir.join("state")).ok();
        let (agent_instance, state_next) = match state
            .as_deref()
            .map(str::split_whitespace)
            .map(|mut w| (w.next(), w.next()))
        {
            Some((Some(instance), Some(next))) => {
                (instance.to_string(), next.parse::<u64>().unwrap_or(0))
            }
            _ => (new_instance.to_string(), 0),
        };
        let next_seq = state_next.max(sizes.keys().next_back().map_or(0, |s| s + 1));
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            agent_instance,
            next_seq,
            maybe_sent_through: sizes.keys().next_back().copied(),
            sizes,
            stats: SpoolStats {
                corrupt,
                ..Default::default()
            },
        };
        spool.write_state()?;
        Ok(spool)
    }

    fn write_state(&self) -> Result<(), AgentError> {
        write_durably(
            &self.dir,
            "state",
            format!("{} {}\n", self.agent_instance, self.next_seq).as_bytes(),
        )
    }

    pub fn agent_instance(&self) -> &str {
        &self.agent_instance
    }

    /// The seq the next window must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    /// Windows waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    /// Appends a window (its seq must be `next_seq()`), durably, then keeps the spool within bounds.
    pub fn append(&mut self, window: &v1::WindowReport) -> Result<(), AgentError> {
        if window.seq < self.next_seq && self.sizes.contains_key(&window.seq) {
            return Err(AgentError::Spool(format!(
                "window {} is already in the spool",
                window.seq
            )));
        }
        let record = encode_record(window);
        write_durably(&self.dir, &file_name(window.seq), &record)?;
        self.sizes.insert(window.seq, record.len() as u64);
        self.next_seq = self.next_seq.max(window.seq + 1);
        self.write_state()?;
        self.stats.appended += 1;
        self.enforce_bound()
    }

    fn read(&self, seq: u64) -> Result<v1::WindowReport, AgentError> {
        let path = self.dir.join(file_name(seq));
        let bytes = fs::read(&path)
            .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
        decode_record(&bytes)
            .map_err(|reason| AgentError::Spool(format!("{}: {reason}", path.display())))
    }

    /// Up to `max` windows after `after` (all windows when None), in seq order.
    pub fn windows_after(
        &mut self,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<v1::WindowReport>, AgentError> {
        let seqs: Vec<u64> = self
            .sizes
            .keys()
            .copied()
            .filter(|s| after.is_none_or(|a| *s > a))
            .take(max)
            .collect();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            out.push(self.read(seq)?);
        }
        if let Some(last) = out.last() {
            self.maybe_sent_through = Some(
                self.maybe_sent_through
                    .map_or(last.seq, |s| s.max(last.seq)),
            );
        }
        Ok(out)
    }

    /// The aggregator holds every window with seq <= `seq`: delete them.
    pub fn ack_through(&mut self, seq: u64) -> Result<usize, AgentError> {
        let done: Vec<u64> = self.sizes.range(..=seq).map(|(s, _)| *s).collect();
        for s in &done {
            let path = self.dir.join(file_name(*s));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::io(format!("deleting {}", path.display()), e)),
            }
            self.sizes.remove(s);
        }
        self.stats.acked += done.len() as u64;
        Ok(done.len())
    }

    fn enforce_bound(&mut self) -> Result<(), AgentError> {
        while self.bytes() > self.max_bytes {
            let mergeable: Vec<u64> = self
                .sizes
                .keys()
                .copied()
                .filter(|s| self.maybe_sent_through.is_none_or(|t| *s > t))
                .take(2)
                .collect();
            let [older, newer] = mergeable[..] else {
                return Ok(());
            };
            let merged = merge_windows(&self.read(older)?, &self.read(newer)?);
            let record = encode_record(&merged);
            write_durably(&self.dir, &file_name(newer), &record)?;
            self.sizes.insert(newer, record.len() as u64);
            let _ = fs::remove_file(self.dir.join(file_name(older)));
            self.sizes.remove(&older);
            self.stats.merges += 1;
            tracing::warn!(
                "spool over {} bytes: merged window {older} into {newer}",
                self.max_bytes
            );
        }
        Ok(())
    }
}

/// One coarser window standing for `a` then `b` (b keeps its seq).
pub fn merge_windows(a: &v1::WindowReport, b: &v1::WindowReport) -> v1::WindowReport {
    let mut m = b.clone();
    m.start_unix_ns = a.start_unix_ns.min(b.start_unix_ns);
    m.end_unix_ns = a.end_unix_ns.max(b.end_unix_ns);
    m.idle_cpu_ns = a.idle_cpu_ns + b.idle_cpu_ns;
    m.busy_cpu_ns = a.busy_cpu_ns + b.busy_cpu_ns;
    m.host_energy_j = a.host_energy_j + b.host_energy_j;
    m.idle_energy_j = a.idle_energy_j + b.idle_energy_j;
    m.unattributed_energy_j = a.unattributed_energy_j + b.unattributed_energy_j;
    m.host_carbon_g = a.host_carbon_g + b.host_carbon_g;
    m.host_embodied_g = a.host_embodied_g + b.host_embodied_g;
    m.business_units = a.business_units + b.business_units;
    m.estimated = a.estimated || b.estimated;
    m.conservation_violations = a.conservation_violations.max(b.conservation_violations);
    m.merged_windows = a.merged_windows.max(1) + b.merged_windows.max(1);
    if let (Some(la), Some(lb)) = (&a.lost, &m.lost) {
        m.lost = Some(v1::LossCounters {
            proc_map_full_events: la.proc_map_full_events + lb.proc_map_full_events,
            proc_map_full_cpu_ns: la.proc_map_full_cpu_ns + lb.proc_map_full_cpu_ns,
            ringbuf_drops: la.ringbuf_drops + lb.ringbuf_drops,
            thread_map_full: la.thread_map_full + lb.thread_map_full,
            txn_map_full: la.txn_map_full + lb.txn_map_full,
            scenario_map_full: la.scenario_map_full + lb.scenario_map_full,
            late_cpu_ns: la.late_cpu_ns + lb.late_cpu_ns,
        });
    }
    let mut domains: BTreeMap<String, f64> = BTreeMap::new();
    for d in a.domains.iter().chain(&b.domains) {
        *domains.entry(d.domain.clone()).or_default() += d.energy_j;
    }
    m.domains = domains
        .into_iter()
        .map(|(domain, energy_j)| v1::DomainEnergy { domain, energy_j })
        .collect();
    let mut scenarios: BTreeMap<String, v1::ScenarioRecord> = BTreeMap::new();
    for s in a.scenarios.iter().chain(&b.scenarios) {
        let e = scenarios
            .entry(s.scenario.clone())
            .or_insert_with(|| v1::ScenarioRecord {
                scenario: s.scenario.clone(),
                weight: s.weight,
                ..Default::default()
            });
        e.transactions += s.transactions;
        e.cpu_ns += s.cpu_ns;
        e.energy_j += s.energy_j;
        e.carbon_g += s.carbon_g;
        e.embodied_g += s.embodied_g;
    }
    m.scenarios = scenarios.into_values().collect();
    let mut processes: HashMap<(String, String, String), v1::ProcessRecord> = HashMap::new();
    for p in a.processes.iter().chain(&b.processes) {
        let e = processes
            .entry((p.comm.clone(), p.service.clone(), p.scenario.clone()))
            .or_insert_with(|| v1::ProcessRecord {
                comm: p.comm.clone(),
                service: p.service.clone(),
                scenario: p.scenario.clone(),
                cgroup: p.cgroup.clone(),
                ..Default::default()
            });
        e.cpu_ns += p.cpu_ns;
        e.energy_j += p.energy_j;
        e.idle_share_j += p.idle_share_j;
        e.carbon_g += p.carbon_g;
        e.embodied_g += p.embodied_g;
    }
    let mut processes: Vec<_> = processes.into_values().collect();
    processes.sort_by(|x, y| (&x.comm, &x.service).cmp(&(&y.comm, &y.service)));
    m.processes = processes;
    m.profile.extend(a.profile.iter().cloned());
    m
}
