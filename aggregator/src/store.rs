//! Storage of accepted windows, behind [`Store`] so a server database can
//! follow the embedded SQLite one.
//!
//! SQLite layout (one file, WAL): `windows` keyed by (host, agent_instance,
//! seq), the unique key that makes replays harmless (a duplicate is ignored
//! whole); per window its `scenarios` lines, its figures per (service,
//! scenario) rolled up from the processes, and its profile stacks. A batch is
//! one transaction: committed whole before it is acknowledged.
//!
//! Each stored window keeps the SHA-256 of its encoded report (`digest`): a
//! window arriving again with the same key is a `Duplicate` when the digests
//! match (a replay, ignored) and a `Conflict` otherwise (refused: the agent
//! reused a seq for different figures, which must never overwrite or vanish).
use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection};
use sci_proto::v1;

use crate::error::AggregatorError;

/// A stored window's host-level figures.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub host: String,
    pub datacenter: String,
    pub agent_instance: String,
    pub seq: u64,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub busy_cpu_ns: u64,
    pub idle_cpu_ns: u64,
    pub cpus: u32,
    pub estimated: bool,
    pub energy_source: String,
    pub cpu_source: String,
    pub intensity_g_per_kwh: f64,
    pub pue: f64,
}

/// A scenario line of a stored window.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioRow {
    pub host: String,
    pub end_unix_ns: u64,
    pub scenario: String,
    pub transactions: u64,
    pub cpu_ns: u64,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A (service, scenario) line of a stored window.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    pub host: String,
    pub end_unix_ns: u64,
    pub service: String,
    pub scenario: String,
    pub cpu_ns: u64,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A folded stack of a stored window.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub end_unix_ns: u64,
    pub service: String,
    pub scenario: String,
    pub stack: String,
    pub samples: u64,
    pub energy_j: f64,
}

/// Everything stored for windows ending in a time range.
#[derive(Debug, Clone, Default)]
pub struct StoredRows {
    pub windows: Vec<WindowRow>,
    pub scenarios: Vec<ScenarioRow>,
    pub services: Vec<ServiceRow>,
    pub profiles: Vec<ProfileRow>,
}

/// What happened to one window of a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// New: stored.
    Stored,
    /// Same key and same content digest as a stored window: a replay, ignored.
    Duplicate,
    /// Same key as a stored window but different content: not stored.
    Conflict,
}

/// SHA-256 of the window's protobuf encoding (maps are ordered, so the
/// encoding of a window is always the same bytes).
pub fn window_digest(w: &v1::WindowReport) -> [u8; 32] {
    use prost::Message;
    use sha2::Digest;
    sha2::Sha256::digest(w.encode_to_vec()).into()
}

pub trait Store: Send {
    /// Stores the windows in one transaction; a window whose key (host,
    /// agent_instance, seq) is stored already is skipped whole, as a
    /// `Duplicate` or a `Conflict`. One outcome per window, in order.
    fn commit(
        &mut self,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError>;
    /// Rows of the windows with `from_ns < end <= to_ns`.
    fn rows(&self, from_ns: u64, to_ns: u64) -> Result<StoredRows, AggregatorError>;
    /// Whether the store can serve (a trivial query succeeds).
    fn healthy(&self) -> bool;
}

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, AggregatorError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| AggregatorError::io(format!("creating {}", dir.display()), e))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS windows (
                host TEXT NOT NULL, agent_instance TEXT NOT NULL, seq INTEGER NOT NULL,
                datacenter TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
                energy_j REAL NOT NULL, idle_energy_j REAL NOT NULL,
                carbon_g REAL NOT NULL, embodied_g REAL NOT NULL,
                busy_cpu_ns INTEGER NOT NULL, idle_cpu_ns INTEGER NOT NULL, cpus INTEGER NOT NULL,
                estimated INTEGER NOT NULL, energy_source TEXT NOT NULL, cpu_source TEXT NOT NULL,
                intensity_g_per_kwh REAL NOT NULL, pue REAL NOT NULL, merged_windows INTEGER NOT NULL,
                PRIMARY KEY (host, agent_instance, seq));
             CREATE INDEX IF NOT EXISTS windows_end ON windows(end_ns);
             CREATE TABLE IF NOT EXISTS scenarios (
                host TEXT NOT NULL, agent_instance TEXT NOT NULL, seq INTEGER NOT NULL, end_ns INTEGER NOT NULL,
                scenario TEXT NOT NULL, transactions INTEGER NOT NULL, cpu_ns INTEGER NOT NULL,
                energy_j REAL NOT NULL, carbon_g REAL NOT NULL, embodied_g REAL NOT NULL);
             CREATE INDEX IF NOT EXISTS scenarios_end ON scenarios(end_ns);
             CREATE TABLE IF NOT EXISTS services (
                host TEXT NOT NULL, agent_instance TEXT NOT NULL, seq INTEGER NOT NULL, end_ns INTEGER NOT NULL,
                service TEXT NOT NULL, scenario TEXT NOT NULL, cpu_ns INTEGER NOT NULL,
                energy_j REAL NOT NULL, carbon_g REAL NOT NULL, embodied_g REAL NOT NULL);
             CREATE INDEX IF NOT EXISTS services_end ON services(end_ns);
             CREATE TABLE IF NOT EXISTS profiles (
                end_ns INTEGER NOT NULL, service TEXT NOT NULL, scenario TEXT NOT NULL,
                stack TEXT NOT NULL, samples INTEGER NOT NULL, energy_j REAL NOT NULL);
             CREATE INDEX IF NOT EXISTS profiles_end ON profiles(end_ns);",
        )?;
        let has_digest = conn.prepare("SELECT digest FROM windows LIMIT 0").is_ok();
        if !has_digest {
            // Databases from before the digest: their windows count as replays
            // of whatever arrives with their key (NULL digest).
            conn.execute_batch("ALTER TABLE windows ADD COLUMN digest BLOB")?;
        }
        Ok(SqliteStore { conn })
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}

impl Store for SqliteStore {
    fn commit(
        &mut self,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError> {
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(windows.len());
        for w in windows {
            let digest = window_digest(w);
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO windows (host, agent_instance, seq, datacenter, start_ns, end_ns,
                    energy_j, idle_energy_j, carbon_g, embodied_g, busy_cpu_ns, idle_cpu_ns, cpus,
                    estimated, energy_source, cpu_source, intensity_g_per_kwh, pue, merged_windows, digest)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
                params![
                    w.host,
                    w.agent_instance,
                    w.seq as i64,
                    w.datacenter,
                    w.start_unix_ns as i64,
                    w.end_unix_ns as i64,
                    w.host_energy_j,
                    w.idle_energy_j,
                    w.host_carbon_g,
                    w.host_embodied_g,
                    w.busy_cpu_ns as i64,
                    w.idle_cpu_ns as i64,
                    w.cpus,
                    w.estimated,
                    w.energy_source,
                    w.cpu_source,
                    w.carbon_intensity_g_per_kwh,
                    w.pue,
                    w.merged_windows.max(1),
                    &digest[..],
                ],
            )?;
            if inserted == 0 {
                let stored: Option<Vec<u8>> = tx.query_row(
                    "SELECT digest FROM windows WHERE host = ?1 AND agent_instance = ?2 AND seq = ?3",
                    params![w.host, w.agent_instance, w.seq as i64],
                    |r| r.get(0),
                )?;
                outcomes.push(match stored {
                    Some(d) if d != digest => CommitOutcome::Conflict,
                    _ => CommitOutcome::Duplicate,
                });
                continue;
            }
            outcomes.push(CommitOutcome::Stored);
            let key = (
                w.host.as_str(),
                w.agent_instance.as_str(),
                w.seq as i64,
                w.end_unix_ns as i64,
            );
            for s in &w.scenarios {
                tx.execute(
                    "INSERT INTO scenarios VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                    params![
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        s.scenario,
                        s.transactions as i64,
                        s.cpu_ns as i64,
                        s.energy_j,
                        s.carbon_g,
                        s.embodied_g
                    ],
                )?;
            }
            let mut services: BTreeMap<(String, String), (u64, f64, f64, f64)> = BTreeMap::new();
            for p in &w.processes {
                let e = services
                    .entry((
                        or_none(&p.service).to_string(),
                        or_none(&p.scenario).to_string(),
                    ))
                    .or_default();
                e.0 += p.cpu_ns;
                e.1 += p.energy_j;
                e.2 += p.carbon_g;
                e.3 += p.embodied_g;
            }
            for ((service, scenario), (cpu_ns, energy_j, carbon_g, embodied_g)) in services {
                tx.execute(
                    "INSERT INTO services VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                    params![
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        service,
                        scenario,
                        cpu_ns as i64,
                        energy_j,
                        carbon_g,
                        embodied_g
                    ],
                )?;
            }
            for s in &w.profile {
                tx.execute(
                    "INSERT INTO profiles VALUES (?1,?2,?3,?4,?5,?6)",
                    params![
                        key.3,
                        or_none(&s.service),
                        or_none(&s.scenario),
                        s.stack,
                        s.samples as i64,
                        s.energy_j
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn rows(&self, from_ns: u64, to_ns: u64) -> Result<StoredRows, AggregatorError> {
        let range = params![from_ns as i64, to_ns as i64];
        let mut rows = StoredRows::default();
        let mut q = self.conn.prepare(
            "SELECT host, datacenter, agent_instance, seq, start_ns, end_ns, energy_j, idle_energy_j, carbon_g, embodied_g,
                    busy_cpu_ns, idle_cpu_ns, cpus, estimated, energy_source, cpu_source, intensity_g_per_kwh, pue
             FROM windows WHERE end_ns > ?1 AND end_ns <= ?2 ORDER BY end_ns",
        )?;
        rows.windows = q
            .query_map(range, |r| {
                Ok(WindowRow {
                    host: r.get(0)?,
                    datacenter: r.get(1)?,
                    agent_instance: r.get(2)?,
                    seq: r.get::<_, i64>(3)? as u64,
                    start_unix_ns: r.get::<_, i64>(4)? as u64,
                    end_unix_ns: r.get::<_, i64>(5)? as u64,
                    energy_j: r.get(6)?,
                    idle_energy_j: r.get(7)?,
                    carbon_g: r.get(8)?,
                    embodied_g: r.get(9)?,
                    busy_cpu_ns: r.get::<_, i64>(10)? as u64,
                    idle_cpu_ns: r.get::<_, i64>(11)? as u64,
                    cpus: r.get(12)?,
                    estimated: r.get(13)?,
                    energy_source: r.get(14)?,
                    cpu_source: r.get(15)?,
                    intensity_g_per_kwh: r.get(16)?,
                    pue: r.get(17)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut q = self.conn.prepare(
            "SELECT host, end_ns, scenario, transactions, cpu_ns, energy_j, carbon_g, embodied_g
             FROM scenarios WHERE end_ns > ?1 AND end_ns <= ?2",
        )?;
        rows.scenarios = q
            .query_map(range, |r| {
                Ok(ScenarioRow {
                    host: r.get(0)?,
                    end_unix_ns: r.get::<_, i64>(1)? as u64,
                    scenario: r.get(2)?,
                    transactions: r.get::<_, i64>(3)? as u64,
                    cpu_ns: r.get::<_, i64>(4)? as u64,
                    energy_j: r.get(5)?,
                    carbon_g: r.get(6)?,
                    embodied_g: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut q = self.conn.prepare(
            "SELECT host, end_ns, service, scenario, cpu_ns, energy_j, carbon_g, embodied_g
             FROM services WHERE end_ns > ?1 AND end_ns <= ?2",
        )?;
        rows.services = q
            .query_map(range, |r| {
                Ok(ServiceRow {
                    host: r.get(0)?,
                    end_unix_ns: r.get::<_, i64>(1)? as u64,
                    service: r.get(2)?,
                    scenario: r.get(3)?,
                    cpu_ns: r.get::<_, i64>(4)? as u64,
                    energy_j: r.get(5)?,
                    carbon_g: r.get(6)?,
                    embodied_g: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut q = self.conn.prepare(
            "SELECT end_ns, service, scenario, stack, samples, energy_j FROM profiles WHERE end_ns > ?1 AND end_ns <= ?2",
        )?;
        rows.profiles = q
            .query_map(range, |r| {
                Ok(ProfileRow {
                    end_unix_ns: r.get::<_, i64>(0)? as u64,
                    service: r.get(1)?,
                    scenario: r.get(2)?,
                    stack: r.get(3)?,
                    samples: r.get::<_, i64>(4)? as u64,
                    energy_j: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn healthy(&self) -> bool {
        self.conn
            .query_row("SELECT count(*) FROM windows", [], |r| r.get::<_, i64>(0))
            .is_ok()
    }
}
