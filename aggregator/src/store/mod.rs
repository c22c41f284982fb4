//! Storage of accepted windows and their rollups, behind [`Store`]:
//! SQLite (WAL, one file: the embedded default) or PostgreSQL (production,
//! several aggregators on one server). Both run the same SQL, written here
//! once; [`sqlite`] and [`postgres`] only supply connections.
//!
//! At ingest, in the transaction that stores a raw window, the window's
//! figures are added to additive rollups:
//! - `fleet_rollup` and `scenario_rollup` per base step (`rollup_step`,
//!   default 1 min: every period length is a multiple of it), per data
//!   centre (and, for the fleet, per disclosure: intensity source, energy
//!   source and model, embodied share source) and per scenario;
//! - `host_rollup`, `service_rollup` and `profile_rollup` per host step
//!   (`host_rollup_step`, default 1 h);
//!
//! A window is split across buckets in proportion to time (a 10:59:30-
//! 11:00:30 window puts half its carbon, energy and transactions in each
//! hour) and adds its host-seconds to each bucket, so each period reports
//! its coverage. Profile stacks go whole to the host-step bucket holding the
//! window's end. Every query reads rollups with `GROUP BY` in SQL: its cost
//! and memory follow the answer's size, not the stored windows.
//!
//! Dedupe is exact: `window_keys` holds (host, agent_instance, seq) as a
//! unique key with the window's content digest (SHA-256 of its prost
//! encoding, the `weights` map in key order); a replay with the same digest
//! is a [`CommitOutcome::Duplicate`], another content a
//! [`CommitOutcome::Conflict`] (nothing is overwritten). The raw window is
//! kept (that encoding) in `windows_raw` for the raw retention.
mod group;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use sci_proto::v1;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::AggregatorError;

/// What became of one window of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitOutcome {
    /// New: stored and added to the rollups.
    Stored,
    /// Already stored with the same content digest: ignored.
    Duplicate,
    /// Already stored with another content: ignored, the first one stands.
    Conflict,
}

/// Bucket lengths of the rollups (fixed when the database is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RollupLayout {
    /// Fleet and scenario rollups: every period is a multiple of it.
    pub step_s: u64,
    /// Host, service and profile rollups.
    pub host_step_s: u64,
}

impl RollupLayout {
    pub fn validate(&self) -> Result<(), String> {
        if self.step_s == 0
            || self.host_step_s == 0
            || !self.host_step_s.is_multiple_of(self.step_s)
            || !DAY_S.is_multiple_of(self.host_step_s)
        {
            return Err(format!(
                "host_rollup_step ({} s) must be a multiple of rollup_step ({} s) and divide a day, both > 0",
                self.host_step_s, self.step_s
            ));
        }
        Ok(())
    }
}

/// A time range `[from_s, to_s)` cut in periods of `period_s`, all multiples
/// of the rollup step (see [`Range::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub from_s: u64,
    pub to_s: u64,
    pub period_s: u64,
}

impl Range {
    /// Widens `[from_s, to_s)` to whole rollup steps; the period must be a
    /// multiple of the step.
    pub fn new(
        from_s: u64,
        to_s: u64,
        period_s: u64,
        layout: &RollupLayout,
    ) -> Result<Range, String> {
        let step = layout.step_s;
        if period_s == 0 || !period_s.is_multiple_of(step) {
            return Err(format!(
                "period {period_s} s is not a multiple of the rollup step {step} s (rollup_step in aggregator.toml)"
            ));
        }
        if from_s >= to_s {
            return Err(format!("from ({from_s}) must be before to ({to_s})"));
        }
        Ok(Range {
            from_s: from_s / step * step,
            to_s: to_s.div_ceil(step) * step,
            period_s,
        })
    }

    /// The range widened to whole host steps (what host, service and
    /// profile figures cover).
    pub fn host_range(&self, layout: &RollupLayout) -> (u64, u64) {
        let step = layout.host_step_s;
        (self.from_s / step * step, self.to_s.div_ceil(step) * step)
    }
}

/// Fleet sums of one period, data centre and disclosure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetRow {
    pub period: u64,
    pub datacenter: String,
    pub intensity_source: String,
    pub energy_source: String,
    pub energy_model: String,
    pub share_source: String,
    pub windows_ended: f64,
    pub host_s: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub estimated_energy_j: f64,
    pub unattributed_energy_j: f64,
    pub operational_g: f64,
    pub embodied_g: f64,
    pub busy_cpu_ns: f64,
    pub idle_cpu_ns: f64,
    pub steal_cpu_ns: f64,
    pub unattributed_cpu_ns: f64,
    /// Sums of factor x host-seconds (divide by host_s for the mean).
    pub intensity_x_s: f64,
    pub pue_x_s: f64,
    pub te_x_s: f64,
    pub el_x_s: f64,
    pub share_x_s: f64,
}

/// Scenario sums of one period and data centre.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScenarioRow {
    pub period: u64,
    pub datacenter: String,
    pub scenario: String,
    pub transactions: f64,
    pub cpu_ns: f64,
    /// Dynamic energy (the scenario's CPU share of busy energy).
    pub energy_j: f64,
    /// Idle energy its processes were charged.
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A host's sums over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostRow {
    pub host: String,
    pub datacenter: String,
    pub host_s: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub estimated_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub busy_cpu_ns: f64,
    pub idle_cpu_ns: f64,
    pub transactions: f64,
}

/// A (data centre, service, scenario)'s sums over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRow {
    pub datacenter: String,
    pub service: String,
    pub scenario: String,
    pub cpu_ns: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A folded stack's samples and energy over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StackSum {
    pub service: String,
    pub scenario: String,
    pub stack: String,
    pub samples: u64,
    pub energy_j: f64,
}

/// A (data centre, service, scenario)'s sums in one period (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePeriodRow {
    pub period_start_s: u64,
    pub row: ServiceRow,
}

/// A host's sums in one period (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPeriodRow {
    pub period_start_s: u64,
    pub row: HostRow,
}

/// A merged per-request CPU histogram of one service and scenario.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestCpuRow {
    pub service: String,
    pub scenario: String,
    /// Requests per log2 bin (bin i: 2^(i-1) <= t < 2^i ns; bin 0: t = 0).
    pub bins: Vec<f64>,
    pub requests: f64,
    pub cpu_ns: f64,
    /// Energy of those requests' CPU time (sum_cpu_ns x J per CPU-ns).
    pub energy_j: f64,
}

/// CPU of one service on one host over a range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostServiceRow {
    pub datacenter: String,
    pub host: String,
    pub service: String,
    pub cpu_ns: f64,
}

/// A data centre's intensity in one hour: sum of intensity x host-seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntensityRow {
    pub datacenter: String,
    pub hour_unix_s: u64,
    pub intensity_x_s: f64,
    pub host_s: f64,
}

/// When a host sent data: its first window's start, its last window's end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSpan {
    pub host: String,
    pub datacenter: String,
    pub first_start_ns: u64,
    pub last_end_ns: u64,
}

/// How long each kind of data is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw windows (and their stacks).
    pub raw: Duration,
    /// Dedupe keys: at least as long as a window may arrive late.
    pub keys: Duration,
    /// Rollups (profiles are merged per service, scenario and hour at ingest).
    pub rollups: Duration,
}

/// What an expiry pass removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Expired {
    pub raw_windows: u64,
    pub raw_partitions_dropped: u64,
    pub keys: u64,
    pub rollup_rows: u64,
}

pub trait Store: Send + Sync {
    /// Stores the windows in one transaction with their rollups; per window
    /// (in order) whether it was new, a duplicate or a conflict.
    fn commit(&self, windows: &[v1::WindowReport]) -> Result<Vec<CommitOutcome>, AggregatorError>;
    fn layout(&self) -> RollupLayout;
    /// Fleet sums per period, data centre and disclosure.
    fn fleet_periods(&self, range: &Range) -> Result<Vec<FleetRow>, AggregatorError>;
    /// Scenario sums per period and data centre.
    fn scenario_periods(&self, range: &Range) -> Result<Vec<ScenarioRow>, AggregatorError>;
    fn hosts(&self, range: &Range) -> Result<Vec<HostRow>, AggregatorError>;
    fn services(&self, range: &Range) -> Result<Vec<ServiceRow>, AggregatorError>;
    /// Stacks of the range, optionally of one service and/or scenario.
    fn stacks(
        &self,
        range: &Range,
        service: Option<&str>,
        scenario: Option<&str>,
    ) -> Result<Vec<StackSum>, AggregatorError>;
    fn intensity_hours(&self, range: &Range) -> Result<Vec<IntensityRow>, AggregatorError>;
    /// Every host's span of data (one row per host of the fleet).
    fn host_spans(&self) -> Result<Vec<HostSpan>, AggregatorError>;
    /// First and last second with data, if any.
    fn extent(&self) -> Result<Option<(u64, u64)>, AggregatorError>;
    /// Removes what is older than the retention at `now_s`.
    fn expire(&self, now_s: u64, retention: &Retention) -> Result<Expired, AggregatorError>;
    /// Bytes the store takes on disk (file or database), and per table where known.
    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError>;
    /// Whether the store can serve (a trivial query succeeds).
    fn healthy(&self) -> bool;
    /// Service sums per period: the range in whole host steps, the period a
    /// multiple of the host step.
    fn service_periods(&self, range: &Range) -> Result<Vec<ServicePeriodRow>, AggregatorError>;
    /// Host sums per period (as [`Store::service_periods`]).
    fn host_periods(&self, range: &Range) -> Result<Vec<HostPeriodRow>, AggregatorError>;
    /// Per-request CPU histograms merged over the range (whole host steps),
    /// per service and scenario.
    fn request_cpu(&self, range: &Range) -> Result<Vec<RequestCpuRow>, AggregatorError>;
    /// CPU of each service on each host over the range (whole host steps).
    fn host_services(&self, range: &Range) -> Result<Vec<HostServiceRow>, AggregatorError>;
}

impl ServiceRow {
    /// datacenter, service, scenario, then the five sums in field order.
    fn from_columns(r: &[Value]) -> ServiceRow {
        ServiceRow {
            datacenter: r[0].text(),
            service: r[1].text(),
            scenario: r[2].text(),
            cpu_ns: r[3].f64(),
            energy_j: r[4].f64(),
            idle_energy_j: r[5].f64(),
            carbon_g: r[6].f64(),
            embodied_g: r[7].f64(),
        }
    }
}

impl HostRow {
    /// host, datacenter, then the nine sums in field order.
    fn from_columns(r: &[Value]) -> HostRow {
        let f = |i: usize| r[2 + i].f64();
        HostRow {
            host: r[0].text(),
            datacenter: r[1].text(),
            host_s: f(0),
            energy_j: f(1),
            idle_energy_j: f(2),
            estimated_energy_j: f(3),
            carbon_g: f(4),
            embodied_g: f(5),
            busy_cpu_ns: f(6),
            idle_cpu_ns: f(7),
            transactions: f(8),
        }
    }
}

/// A value crossing into or out of SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(Vec<u8>),
    Null,
}

impl Value {
    fn f64(&self) -> f64 {
        match self {
            Value::Int(i) => *i as f64,
            Value::Real(r) => *r,
            _ => 0.0,
        }
    }
    fn i64(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            Value::Real(r) => *r as i64,
            _ => 0,
        }
    }
    fn text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            _ => String::new(),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Bytes(b) => b.clone(),
            _ => Vec::new(),
        }
    }
}

/// One column of an [`Upsert`], a value per row.
pub enum Column {
    Int(Vec<i64>),
    Text(Vec<String>),
    Real(Vec<f64>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Int(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::Real(v) => v.len(),
        }
    }
    fn value(&self, row: usize) -> Value {
        match self {
            Column::Int(v) => Value::Int(v[row]),
            Column::Text(v) => Value::Text(v[row].clone()),
            Column::Real(v) => Value::Real(v[row]),
        }
    }
}

/// Rows for `table`, column by column: each is inserted, or, when a row
/// with the same `conflict_keys` is there, merged into it by `on_conflict`
/// (the `DO UPDATE SET` list, where `excluded.c` is the new row's value).
pub struct Upsert {
    pub table: &'static str,
    pub columns: Vec<(&'static str, Column)>,
    pub conflict_keys: &'static [&'static str],
    pub on_conflict: String,
}

impl Upsert {
    fn rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }
}

/// One open write transaction.
pub trait Tx {
    /// Several statements without parameters (migrations).
    fn batch(&mut self, sql: &str) -> Result<(), AggregatorError>;
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, AggregatorError>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError>;
    /// Appends `rows` (each one value per column) to `table`, where no
    /// conflict can arise: multi-row INSERTs, or a binary COPY on
    /// PostgreSQL, which spares the server parsing every value as text.
    fn append_rows(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[Vec<Value>],
    ) -> Result<(), AggregatorError> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {table} ({}) VALUES {}",
                columns.join(", "),
                values_clause(chunk.len(), columns.len())
            );
            let params: Vec<Value> = chunk.iter().flatten().cloned().collect();
            self.execute(&sql, &params)?;
        }
        Ok(())
    }
    /// Adds `upsert`'s rows: multi-row INSERTs of a hundred rows each, or, on
    /// PostgreSQL, held and sent with every other upsert of the commit in one
    /// statement with a binary array per column. An error, if any, fails the
    /// transaction either way.
    fn upsert_later(&mut self, upsert: Upsert) -> Result<(), AggregatorError> {
        let names: Vec<&str> = upsert.columns.iter().map(|(name, _)| *name).collect();
        let rows = upsert.rows();
        let mut first = 0;
        while first < rows {
            let count = (rows - first).min(ROWS_PER_STATEMENT);
            let sql = format!(
                "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO UPDATE SET {}",
                upsert.table,
                names.join(", "),
                values_clause(count, names.len()),
                upsert.conflict_keys.join(", "),
                upsert.on_conflict
            );
            let mut params = Vec::with_capacity(count * names.len());
            for row in first..first + count {
                params.extend(upsert.columns.iter().map(|(_, c)| c.value(row)));
            }
            self.execute(&sql, &params)?;
            first += count;
        }
        Ok(())
    }
}

/// What a database supplies: transactions on a write connection, queries on
/// read connections (never the writer's, so reads never wait for ingest),
/// and the raw-window partitions.
pub trait Backend: Send + Sync {
    fn layout(&self) -> RollupLayout;
    /// Stores one batch (see [`Store::commit`]); PostgreSQL merges the
    /// batches that arrive together into one transaction ([`group`]).
    fn commit_batch(
        &self,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError>
    where
        Self: Sized,
    {
        commit_windows(self, windows)
    }
    /// Runs `f` in one transaction, committed when it returns Ok.
    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), AggregatorError>,
    ) -> Result<(), AggregatorError>;
    /// Rows of one read query (on a read connection, within the query timeout).
    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError>;
    /// Makes sure raw windows ending on these UTC days can be stored.
    fn prepare_raw_days(&self, days: &[u64]) -> Result<(), AggregatorError>;
    /// Drops or deletes raw windows ending before `cutoff_ns`: (rows, partitions).
    fn expire_raw(&self, cutoff_ns: u64) -> Result<(u64, u64), AggregatorError>;
    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError>;
}

/// The encoding that is stored and digested: the prost encoding with the
/// `weights` records (field 24) moved to the end, as the first stores wrote
/// it, so digests stay comparable across versions. A move of bytes, not a
/// second encoding: the window is not cloned.
pub fn canonical_encoding(w: &v1::WindowReport) -> Vec<u8> {
    const WEIGHTS_FIELD: u32 = 24;
    let encoded = w.encode_to_vec();
    if w.weights.is_empty() {
        return encoded;
    }
    let mut head = Vec::with_capacity(encoded.len());
    let mut weights = Vec::new();
    let mut rest: &[u8] = &encoded;
    while !rest.is_empty() {
        let before = rest.len();
        let mut record = rest;
        let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut record) else {
            return encoded;
        };
        let skipped = prost::encoding::skip_field(
            wire_type,
            tag,
            &mut record,
            prost::encoding::DecodeContext::default(),
        );
        if skipped.is_err() {
            return encoded;
        }
        let (this, after) = rest.split_at(before - record.len());
        if tag == WEIGHTS_FIELD {
            weights.extend_from_slice(this);
        } else {
            head.extend_from_slice(this);
        }
        rest = after;
    }
    head.extend_from_slice(&weights);
    head
}

pub fn content_digest(encoding: &[u8]) -> Vec<u8> {
    Sha256::digest(encoding).to_vec()
}

/// `(none)` for an empty name (as the rollups key it).
fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}

/// Pieces of `[start_ns, end_ns)` in buckets of `step_s`: (bucket start s,
/// share of the window, seconds in the bucket).
pub fn split_by_time(start_ns: u64, end_ns: u64, step_s: u64) -> Vec<(u64, f64, f64)> {
    let step_ns = step_s.max(1) as u128 * 1_000_000_000;
    let (start, end) = (start_ns as u128, end_ns as u128);
    if end <= start {
        let bucket = end.saturating_sub(1) / step_ns;
        return vec![((bucket * step_ns / 1_000_000_000) as u64, 1.0, 0.0)];
    }
    let length = (end - start) as f64;
    let mut pieces = Vec::new();
    let mut bucket = start / step_ns;
    loop {
        let b_start = bucket * step_ns;
        let b_end = b_start + step_ns;
        if b_start >= end {
            break;
        }
        let overlap = (b_end.min(end) - b_start.max(start)) as f64;
        if overlap > 0.0 {
            pieces.push((
                (b_start / 1_000_000_000) as u64,
                overlap / length,
                overlap / 1e9,
            ));
        }
        bucket += 1;
    }
    pieces
}

/// A rollup table: key columns, then summed columns.
struct Table {
    name: &'static str,
    keys: &'static [&'static str],
    sums: &'static [&'static str],
}

const FLEET: Table = Table {
    name: "fleet_rollup",
    keys: &[
        "bucket_s",
        "datacenter",
        "intensity_source",
        "energy_source",
        "energy_model",
        "share_source",
    ],
    sums: &[
        "windows_ended",
        "host_s",
        "energy_j",
        "idle_energy_j",
        "estimated_energy_j",
        "unattributed_energy_j",
        "operational_g",
        "embodied_g",
        "busy_cpu_ns",
        "idle_cpu_ns",
        "steal_cpu_ns",
        "unattributed_cpu_ns",
        "intensity_x_s",
        "pue_x_s",
        "te_x_s",
        "el_x_s",
        "share_x_s",
    ],
};
const SCENARIO: Table = Table {
    name: "scenario_rollup",
    keys: &["bucket_s", "datacenter", "scenario"],
    sums: &[
        "transactions",
        "cpu_ns",
        "energy_j",
        "idle_energy_j",
        "carbon_g",
        "embodied_g",
    ],
};
const HOST: Table = Table {
    name: "host_rollup",
    keys: &["bucket_s", "host", "datacenter"],
    sums: &[
        "host_s",
        "energy_j",
        "idle_energy_j",
        "estimated_energy_j",
        "carbon_g",
        "embodied_g",
        "busy_cpu_ns",
        "idle_cpu_ns",
        "transactions",
    ],
};
const SERVICE: Table = Table {
    name: "service_rollup",
    keys: &["bucket_s", "datacenter", "service", "scenario"],
    sums: &[
        "cpu_ns",
        "energy_j",
        "idle_energy_j",
        "carbon_g",
        "embodied_g",
    ],
};
const PROFILE: Table = Table {
    name: "profile_rollup",
    keys: &["bucket_s", "service", "scenario", "stack"],
    sums: &["samples", "energy_j"],
};
/// Coarser copies: fleet and scenario sums per host step, host, service and
/// profile sums per day. A long query reads whole coarse buckets from these
/// and only its edges from the finer tables (see [`source`]).
const FLEET_COARSE: Table = Table {
    name: "fleet_rollup_h",
    ..FLEET
};
const SCENARIO_COARSE: Table = Table {
    name: "scenario_rollup_h",
    ..SCENARIO
};
const HOST_COARSE: Table = Table {
    name: "host_rollup_d",
    ..HOST
};
const SERVICE_COARSE: Table = Table {
    name: "service_rollup_d",
    ..SERVICE
};
const PROFILE_COARSE: Table = Table {
    name: "profile_rollup_d",
    ..PROFILE
};
/// Optimisation reviews (#15): per host step, request CPU histograms (bin
/// counts and totals) and each service's CPU on each host.
const REQUEST_CPU: Table = Table {
    name: "request_cpu_rollup",
    keys: &["bucket_s", "service", "scenario", "bin"],
    sums: &["requests"],
};
const REQUEST_CPU_TOTAL: Table = Table {
    name: "request_cpu_total_rollup",
    keys: &["bucket_s", "service", "scenario"],
    sums: &["requests", "cpu_ns", "energy_j"],
};
const HOST_SERVICE: Table = Table {
    name: "host_service_rollup",
    keys: &["bucket_s", "datacenter", "host", "service"],
    sums: &["cpu_ns"],
};
const TABLES: [&Table; 13] = [
    &FLEET,
    &SCENARIO,
    &HOST,
    &SERVICE,
    &PROFILE,
    &FLEET_COARSE,
    &SCENARIO_COARSE,
    &HOST_COARSE,
    &SERVICE_COARSE,
    &PROFILE_COARSE,
    &REQUEST_CPU,
    &REQUEST_CPU_TOTAL,
    &HOST_SERVICE,
];
pub const DAY_S: u64 = 86_400;

/// A rollup row's key column: the names borrow from the windows being
/// committed, so summing a window allocates nothing per row it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    I(i64),
    T(&'a str),
}

/// The widest key and sum lists of [`TABLES`]: a row is kept in arrays of
/// these lengths, the unused tail constant within a table (so it neither
/// reorders nor splits that table's rows).
const MAX_KEYS: usize = 6;
const MAX_SUMS: usize = 17;
const _: () = {
    let mut i = 0;
    while i < TABLES.len() {
        assert!(TABLES[i].keys.len() <= MAX_KEYS && TABLES[i].sums.len() <= MAX_SUMS);
        i += 1;
    }
};
type RowKey<'a> = [Key<'a>; MAX_KEYS];

fn row_key<'a>(columns: &[Key<'a>]) -> RowKey<'a> {
    let mut key = [Key::I(0); MAX_KEYS];
    key[..columns.len()].copy_from_slice(columns);
    key
}

/// Rollup additions of one commit, summed per row key before they are
/// written (in key order, so concurrent aggregators lock rows in one order).
#[derive(Default)]
struct Deltas<'a> {
    rows: [BTreeMap<RowKey<'a>, [f64; MAX_SUMS]>; 13],
}

impl<'a> Deltas<'a> {
    fn add(&mut self, table: usize, key: &[Key<'a>], values: &[f64]) {
        let row = self.rows[table]
            .entry(row_key(key))
            .or_insert([0.0; MAX_SUMS]);
        for (sum, v) in row.iter_mut().zip(values) {
            *sum += v;
        }
    }

    fn add_window(&mut self, w: &'a v1::WindowReport, layout: &RollupLayout) {
        let dc = or_none(&w.datacenter);
        let end_bucket =
            |step: u64| (w.end_unix_ns.saturating_sub(1) / 1_000_000_000) / step * step;
        let no_embodied = v1::EmbodiedFactors::default();
        let embodied = w.embodied.as_ref().unwrap_or(&no_embodied);
        let share_source = w.embodied.as_ref().map_or("", |e| e.share_source.as_str());
        let estimated_j = if w.estimated { w.host_energy_j } else { 0.0 };
        // Per scenario over the window: transactions and figures from the
        // scenario lines, idle energy from the processes.
        let mut scenarios: BTreeMap<&'a str, [f64; 6]> = BTreeMap::new();
        for s in &w.scenarios {
            let e = scenarios.entry(or_none(&s.scenario)).or_default();
            e[0] += s.transactions as f64;
            e[1] += s.cpu_ns as f64;
            e[2] += s.energy_j;
            e[4] += s.carbon_g;
            e[5] += s.embodied_g;
        }
        let mut services: BTreeMap<(&'a str, &'a str), [f64; 5]> = BTreeMap::new();
        let mut host_services: BTreeMap<&'a str, f64> = BTreeMap::new();
        for p in &w.processes {
            let scenario = if p.scenario.is_empty() {
                agent_common::UNASSIGNED
            } else {
                p.scenario.as_str()
            };
            if let Some(e) = scenarios.get_mut(scenario) {
                e[3] += p.idle_share_j;
            }
            let e = services
                .entry((or_none(&p.service), or_none(&p.scenario)))
                .or_default();
            e[0] += p.cpu_ns as f64;
            e[1] += p.energy_j;
            e[2] += p.idle_share_j;
            e[3] += p.carbon_g;
            e[4] += p.embodied_g;
            *host_services.entry(or_none(&p.service)).or_default() += p.cpu_ns as f64;
        }
        let transactions: f64 = w
            .scenarios
            .iter()
            .filter(|s| s.scenario != agent_common::UNASSIGNED)
            .map(|s| s.transactions as f64)
            .sum();
        for (fleet_t, scenario_t, step) in [(0, 1, layout.step_s), (5, 6, layout.host_step_s)] {
            for (bucket, share, seconds) in split_by_time(w.start_unix_ns, w.end_unix_ns, step) {
                let ended = if bucket == end_bucket(step) { 1.0 } else { 0.0 };
                let bucket = Key::I(bucket as i64);
                self.add(
                    fleet_t,
                    &[
                        bucket,
                        Key::T(dc),
                        Key::T(&w.intensity_source),
                        Key::T(&w.energy_source),
                        Key::T(&w.energy_model),
                        Key::T(share_source),
                    ],
                    &[
                        ended,
                        seconds,
                        share * w.host_energy_j,
                        share * w.idle_energy_j,
                        share * estimated_j,
                        share * w.unattributed_energy_j,
                        share * w.host_carbon_g,
                        share * w.host_embodied_g,
                        share * w.busy_cpu_ns as f64,
                        share * w.idle_cpu_ns as f64,
                        share * w.steal_cpu_ns as f64,
                        share * w.unattributed_cpu_ns as f64,
                        seconds * w.carbon_intensity_g_per_kwh,
                        seconds * w.pue,
                        seconds * embodied.total_embodied_g,
                        seconds * embodied.lifespan_s,
                        seconds * embodied.resource_share,
                    ],
                );
                for (scenario, e) in &scenarios {
                    self.add(
                        scenario_t,
                        &[bucket, Key::T(dc), Key::T(scenario)],
                        &e.map(|v| share * v),
                    );
                }
            }
        }
        for (host_t, service_t, step) in [(2, 3, layout.host_step_s), (7, 8, DAY_S)] {
            for (bucket, share, seconds) in split_by_time(w.start_unix_ns, w.end_unix_ns, step) {
                let bucket = Key::I(bucket as i64);
                self.add(
                    host_t,
                    &[bucket, Key::T(&w.host), Key::T(dc)],
                    &[
                        seconds,
                        share * w.host_energy_j,
                        share * w.idle_energy_j,
                        share * estimated_j,
                        share * w.host_carbon_g,
                        share * w.host_embodied_g,
                        share * w.busy_cpu_ns as f64,
                        share * w.idle_cpu_ns as f64,
                        share * transactions,
                    ],
                );
                for ((service, scenario), e) in &services {
                    self.add(
                        service_t,
                        &[bucket, Key::T(dc), Key::T(service), Key::T(scenario)],
                        &e.map(|v| share * v),
                    );
                }
            }
        }
        let host_end_bucket = Key::I(end_bucket(layout.host_step_s) as i64);
        for h in &w.request_cpu {
            let (service, scenario) = (Key::T(or_none(&h.service)), Key::T(or_none(&h.scenario)));
            let mut requests = 0.0;
            for (bin, &n) in h.counts.iter().enumerate() {
                if n > 0 {
                    requests += n as f64;
                    self.add(
                        10,
                        &[host_end_bucket, service, scenario, Key::I(bin as i64)],
                        &[n as f64],
                    );
                }
            }
            self.add(
                11,
                &[host_end_bucket, service, scenario],
                &[
                    requests,
                    h.sum_cpu_ns as f64,
                    h.sum_cpu_ns as f64 * h.energy_j_per_cpu_ns,
                ],
            );
        }
        for (bucket, share, _) in split_by_time(w.start_unix_ns, w.end_unix_ns, layout.host_step_s)
        {
            let bucket = Key::I(bucket as i64);
            for (service, cpu_ns) in &host_services {
                self.add(
                    12,
                    &[bucket, Key::T(dc), Key::T(&w.host), Key::T(service)],
                    &[share * cpu_ns],
                );
            }
        }
        for (profile_t, step) in [(4, layout.host_step_s), (9, DAY_S)] {
            let bucket = Key::I(end_bucket(step) as i64);
            for s in &w.profile {
                self.add(
                    profile_t,
                    &[
                        bucket,
                        Key::T(or_none(&s.service)),
                        Key::T(or_none(&s.scenario)),
                        Key::T(&s.stack),
                    ],
                    &[s.samples as f64, s.energy_j],
                );
            }
        }
    }
}

/// `$1, $2, ...` placeholders for `rows` rows of `width` values.
fn values_clause(rows: usize, width: usize) -> String {
    let mut out = String::new();
    for r in 0..rows {
        if r > 0 {
            out.push(',');
        }
        out.push('(');
        for c in 0..width {
            if c > 0 {
                out.push(',');
            }
            out.push_str(&format!("${}", r * width + c + 1));
        }
        out.push(')');
    }
    out
}

const ROWS_PER_STATEMENT: usize = 100;

/// A table's summed additions as an [`Upsert`] that adds them to the rows
/// already there.
fn rollup_upsert(t: &Table, rows: &BTreeMap<RowKey, [f64; MAX_SUMS]>) -> Upsert {
    let mut columns = Vec::with_capacity(t.keys.len() + t.sums.len());
    for (c, name) in t.keys.iter().enumerate() {
        let column = match rows.keys().next().map(|k| k[c]) {
            Some(Key::T(_)) => Column::Text(
                rows.keys()
                    .map(|k| match k[c] {
                        Key::T(s) => s.to_string(),
                        Key::I(i) => i.to_string(),
                    })
                    .collect(),
            ),
            _ => Column::Int(
                rows.keys()
                    .map(|k| match k[c] {
                        Key::I(i) => i,
                        Key::T(_) => 0,
                    })
                    .collect(),
            ),
        };
        columns.push((*name, column));
    }
    for (c, name) in t.sums.iter().enumerate() {
        columns.push((*name, Column::Real(rows.values().map(|s| s[c]).collect())));
    }
    Upsert {
        table: t.name,
        columns,
        conflict_keys: t.keys,
        on_conflict: t
            .sums
            .iter()
            .map(|c| format!("{c} = {}.{c} + excluded.{c}", t.name))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn key_key(w: &v1::WindowReport) -> (String, String, u64) {
    (w.host.clone(), w.agent_instance.clone(), w.seq)
}

pub const DAY_NS: u64 = 86_400 * 1_000_000_000;

/// The commit shared by every backend.
pub fn commit_windows(
    db: &dyn Backend,
    windows: &[v1::WindowReport],
) -> Result<Vec<CommitOutcome>, AggregatorError> {
    if windows.is_empty() {
        return Ok(Vec::new());
    }
    let layout = db.layout();
    let encoded: Vec<(Vec<u8>, Vec<u8>)> = windows
        .iter()
        .map(|w| {
            let bytes = canonical_encoding(w);
            let digest = content_digest(&bytes);
            (bytes, digest)
        })
        .collect();
    let mut days: Vec<u64> = windows.iter().map(|w| w.end_unix_ns / DAY_NS).collect();
    days.sort_unstable();
    days.dedup();
    db.prepare_raw_days(&days)?;
    let mut outcomes = Vec::new();
    db.write(&mut |tx| {
        outcomes = vec![CommitOutcome::Stored; windows.len()];
        // Within the batch: a key seen earlier decides against that one.
        let mut first_of: BTreeMap<(String, String, u64), usize> = BTreeMap::new();
        let mut candidates = Vec::new();
        for (i, w) in windows.iter().enumerate() {
            match first_of.get(&key_key(w)) {
                Some(&j) => {
                    outcomes[i] = if encoded[j].1 == encoded[i].1 {
                        CommitOutcome::Duplicate
                    } else {
                        CommitOutcome::Conflict
                    }
                }
                None => {
                    first_of.insert(key_key(w), i);
                    candidates.push(i);
                }
            }
        }
        let mut inserted: std::collections::BTreeSet<(String, String, u64)> = Default::default();
        for chunk in candidates.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO window_keys (host, agent_instance, seq, end_ns, digest) VALUES {} \
                 ON CONFLICT (host, agent_instance, seq) DO NOTHING RETURNING host, agent_instance, seq",
                values_clause(chunk.len(), 5)
            );
            let mut params = Vec::with_capacity(chunk.len() * 5);
            for &i in chunk {
                let w = &windows[i];
                params.push(Value::Text(w.host.clone()));
                params.push(Value::Text(w.agent_instance.clone()));
                params.push(Value::Int(w.seq as i64));
                params.push(Value::Int(w.end_unix_ns as i64));
                params.push(Value::Bytes(encoded[i].1.clone()));
            }
            for row in tx.query(&sql, &params)? {
                inserted.insert((row[0].text(), row[1].text(), row[2].i64() as u64));
            }
        }
        let mut stored = Vec::new();
        for &i in &candidates {
            let w = &windows[i];
            if inserted.contains(&key_key(w)) {
                stored.push(i);
                continue;
            }
            let rows = tx.query(
                "SELECT digest FROM window_keys WHERE host = $1 AND agent_instance = $2 AND seq = $3",
                &[
                    Value::Text(w.host.clone()),
                    Value::Text(w.agent_instance.clone()),
                    Value::Int(w.seq as i64),
                ],
            )?;
            let same = rows.first().is_some_and(|r| r[0].bytes() == encoded[i].1);
            outcomes[i] = if same {
                CommitOutcome::Duplicate
            } else {
                CommitOutcome::Conflict
            };
        }
        let raw_rows: Vec<Vec<Value>> = stored
            .iter()
            .map(|&i| {
                let w = &windows[i];
                vec![
                    Value::Int(w.end_unix_ns as i64),
                    Value::Text(w.host.clone()),
                    Value::Text(w.agent_instance.clone()),
                    Value::Int(w.seq as i64),
                    Value::Bytes(encoded[i].0.clone()),
                ]
            })
            .collect();
        tx.append_rows(
            "windows_raw",
            &["end_ns", "host", "agent_instance", "seq", "payload"],
            &raw_rows,
        )?;
        let mut deltas = Deltas::default();
        let mut spans: BTreeMap<String, HostSpan> = BTreeMap::new();
        for &i in &stored {
            let w = &windows[i];
            deltas.add_window(w, &layout);
            let span = spans.entry(w.host.clone()).or_insert_with(|| HostSpan {
                host: w.host.clone(),
                datacenter: or_none(&w.datacenter).to_string(),
                first_start_ns: w.start_unix_ns,
                last_end_ns: w.end_unix_ns,
            });
            span.first_start_ns = span.first_start_ns.min(w.start_unix_ns);
            span.last_end_ns = span.last_end_ns.max(w.end_unix_ns);
            or_none(&w.datacenter).clone_into(&mut span.datacenter);
        }
        for (t, rows) in TABLES.iter().zip(&deltas.rows) {
            if !rows.is_empty() {
                tx.upsert_later(rollup_upsert(t, rows))?;
            }
        }
        if !spans.is_empty() {
            let spans: Vec<&HostSpan> = spans.values().collect();
            tx.upsert_later(Upsert {
                table: "hosts",
                columns: vec![
                    ("host", Column::Text(spans.iter().map(|s| s.host.clone()).collect())),
                    (
                        "datacenter",
                        Column::Text(spans.iter().map(|s| s.datacenter.clone()).collect()),
                    ),
                    (
                        "first_start_ns",
                        Column::Int(spans.iter().map(|s| s.first_start_ns as i64).collect()),
                    ),
                    (
                        "last_end_ns",
                        Column::Int(spans.iter().map(|s| s.last_end_ns as i64).collect()),
                    ),
                ],
                conflict_keys: &["host"],
                on_conflict: "datacenter = excluded.datacenter, \
                    first_start_ns = CASE WHEN excluded.first_start_ns < hosts.first_start_ns THEN excluded.first_start_ns ELSE hosts.first_start_ns END, \
                    last_end_ns = CASE WHEN excluded.last_end_ns > hosts.last_end_ns THEN excluded.last_end_ns ELSE hosts.last_end_ns END"
                    .to_string(),
            })?;
        }
        Ok(())
    })?;
    Ok(outcomes)
}

/// A derived table `src` with the rows of `[from_s, to_s)`: the whole
/// buckets of `coarse` (step `coarse_step`) inside the range, the finer
/// `fine` rows only at its edges, when every period holds whole coarse
/// buckets (`period_s` a multiple of the coarse step, or no periods). Sums
/// are additive, so both readings give the same totals; the coarse one
/// reads up to 60 (or 24) times fewer rows. Its parameters are appended.
fn source(
    fine: &Table,
    coarse: &Table,
    coarse_step: u64,
    from_s: u64,
    to_s: u64,
    period_s: Option<u64>,
    params: &mut Vec<Value>,
) -> String {
    let columns: Vec<&str> = fine.keys.iter().chain(fine.sums).copied().collect();
    let columns = columns.join(", ");
    let inner_from = from_s.div_ceil(coarse_step) * coarse_step;
    let inner_to = to_s / coarse_step * coarse_step;
    let mut param = |v: u64| {
        params.push(Value::Int(v as i64));
        format!("${}", params.len())
    };
    if inner_from < inner_to && period_s.is_none_or(|p| p.is_multiple_of(coarse_step)) {
        let (a, b, f, t) = (
            param(inner_from),
            param(inner_to),
            param(from_s),
            param(to_s),
        );
        format!(
            "(SELECT {columns} FROM {} WHERE bucket_s >= {a} AND bucket_s < {b} \
             UNION ALL SELECT {columns} FROM {} WHERE (bucket_s >= {f} AND bucket_s < {a}) \
             OR (bucket_s >= {b} AND bucket_s < {t})) AS src",
            coarse.name, fine.name
        )
    } else {
        let (f, t) = (param(from_s), param(to_s));
        format!(
            "(SELECT {columns} FROM {} WHERE bucket_s >= {f} AND bucket_s < {t}) AS src",
            fine.name
        )
    }
}

/// `bucket_s / $n`, the period appended to the parameters.
fn period_expr(period_s: u64, params: &mut Vec<Value>) -> String {
    params.push(Value::Int(period_s as i64));
    format!("bucket_s / ${}", params.len())
}

fn sum_list(columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| format!("SUM({c})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The queries shared by every backend.
impl<B: Backend> Store for B {
    fn commit(&self, windows: &[v1::WindowReport]) -> Result<Vec<CommitOutcome>, AggregatorError> {
        self.commit_batch(windows)
    }

    fn layout(&self) -> RollupLayout {
        Backend::layout(self)
    }

    fn fleet_periods(&self, range: &Range) -> Result<Vec<FleetRow>, AggregatorError> {
        let layout = Backend::layout(self);
        let mut params = Vec::new();
        let src = source(
            &FLEET,
            &FLEET_COARSE,
            layout.host_step_s,
            range.from_s,
            range.to_s,
            Some(range.period_s),
            &mut params,
        );
        let period = period_expr(range.period_s, &mut params);
        let sql = format!(
            "SELECT {period} AS period, datacenter, intensity_source, energy_source, energy_model, share_source, {} \
             FROM {src} GROUP BY {period}, datacenter, intensity_source, energy_source, energy_model, share_source \
             ORDER BY 1, 2, 3, 4, 5, 6",
            sum_list(FLEET.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| {
                let f = |i: usize| r[6 + i].f64();
                FleetRow {
                    period: r[0].i64() as u64,
                    datacenter: r[1].text(),
                    intensity_source: r[2].text(),
                    energy_source: r[3].text(),
                    energy_model: r[4].text(),
                    share_source: r[5].text(),
                    windows_ended: f(0),
                    host_s: f(1),
                    energy_j: f(2),
                    idle_energy_j: f(3),
                    estimated_energy_j: f(4),
                    unattributed_energy_j: f(5),
                    operational_g: f(6),
                    embodied_g: f(7),
                    busy_cpu_ns: f(8),
                    idle_cpu_ns: f(9),
                    steal_cpu_ns: f(10),
                    unattributed_cpu_ns: f(11),
                    intensity_x_s: f(12),
                    pue_x_s: f(13),
                    te_x_s: f(14),
                    el_x_s: f(15),
                    share_x_s: f(16),
                }
            })
            .collect())
    }

    fn scenario_periods(&self, range: &Range) -> Result<Vec<ScenarioRow>, AggregatorError> {
        let layout = Backend::layout(self);
        let mut params = Vec::new();
        let src = source(
            &SCENARIO,
            &SCENARIO_COARSE,
            layout.host_step_s,
            range.from_s,
            range.to_s,
            Some(range.period_s),
            &mut params,
        );
        let period = period_expr(range.period_s, &mut params);
        let sql = format!(
            "SELECT {period} AS period, datacenter, scenario, {} FROM {src} \
             GROUP BY {period}, datacenter, scenario ORDER BY 1, 2, 3",
            sum_list(SCENARIO.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| ScenarioRow {
                period: r[0].i64() as u64,
                datacenter: r[1].text(),
                scenario: r[2].text(),
                transactions: r[3].f64(),
                cpu_ns: r[4].f64(),
                energy_j: r[5].f64(),
                idle_energy_j: r[6].f64(),
                carbon_g: r[7].f64(),
                embodied_g: r[8].f64(),
            })
            .collect())
    }

    fn hosts(&self, range: &Range) -> Result<Vec<HostRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let mut params = Vec::new();
        let src = source(&HOST, &HOST_COARSE, DAY_S, from, to, None, &mut params);
        let sql = format!(
            "SELECT host, MAX(datacenter), {} FROM {src} GROUP BY host ORDER BY host",
            sum_list(HOST.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| HostRow::from_columns(&r))
            .collect())
    }

    fn services(&self, range: &Range) -> Result<Vec<ServiceRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let mut params = Vec::new();
        let src = source(
            &SERVICE,
            &SERVICE_COARSE,
            DAY_S,
            from,
            to,
            None,
            &mut params,
        );
        let sql = format!(
            "SELECT datacenter, service, scenario, {} FROM {src} \
             GROUP BY datacenter, service, scenario ORDER BY 1, 2, 3",
            sum_list(SERVICE.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| ServiceRow::from_columns(&r))
            .collect())
    }

    fn stacks(
        &self,
        range: &Range,
        service: Option<&str>,
        scenario: Option<&str>,
    ) -> Result<Vec<StackSum>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let mut params = Vec::new();
        let src = source(
            &PROFILE,
            &PROFILE_COARSE,
            DAY_S,
            from,
            to,
            None,
            &mut params,
        );
        let mut filter = String::from(" WHERE 1 = 1");
        if let Some(service) = service {
            params.push(Value::Text(service.to_string()));
            filter.push_str(&format!(" AND service = ${}", params.len()));
        }
        if let Some(scenario) = scenario {
            params.push(Value::Text(scenario.to_string()));
            filter.push_str(&format!(" AND scenario = ${}", params.len()));
        }
        let sql = format!(
            "SELECT service, scenario, stack, SUM(samples), SUM(energy_j) FROM {src}{filter} \
             GROUP BY service, scenario, stack ORDER BY 1, 2, 3"
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| StackSum {
                service: r[0].text(),
                scenario: r[1].text(),
                stack: r[2].text(),
                samples: r[3].f64().round() as u64,
                energy_j: r[4].f64(),
            })
            .collect())
    }

    fn intensity_hours(&self, range: &Range) -> Result<Vec<IntensityRow>, AggregatorError> {
        let layout = Backend::layout(self);
        let mut params = Vec::new();
        let src = source(
            &FLEET,
            &FLEET_COARSE,
            layout.host_step_s,
            range.from_s,
            range.to_s,
            Some(3600),
            &mut params,
        );
        let hour = period_expr(3600, &mut params);
        let sql = format!(
            "SELECT datacenter, {hour}, SUM(intensity_x_s), SUM(host_s) FROM {src} \
             GROUP BY datacenter, {hour} ORDER BY 1, 2"
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| IntensityRow {
                datacenter: r[0].text(),
                hour_unix_s: r[1].i64() as u64 * 3600,
                intensity_x_s: r[2].f64(),
                host_s: r[3].f64(),
            })
            .collect())
    }

    fn host_spans(&self) -> Result<Vec<HostSpan>, AggregatorError> {
        Ok(self
            .read(
                "SELECT host, datacenter, first_start_ns, last_end_ns FROM hosts ORDER BY host",
                &[],
            )?
            .into_iter()
            .map(|r| HostSpan {
                host: r[0].text(),
                datacenter: r[1].text(),
                first_start_ns: r[2].i64() as u64,
                last_end_ns: r[3].i64() as u64,
            })
            .collect())
    }

    fn extent(&self) -> Result<Option<(u64, u64)>, AggregatorError> {
        let rows = self.read(
            "SELECT MIN(first_start_ns), MAX(last_end_ns) FROM hosts",
            &[],
        )?;
        Ok(rows.first().and_then(|r| match (&r[0], &r[1]) {
            (Value::Int(a), Value::Int(b)) => Some((
                *a as u64 / 1_000_000_000,
                (*b as u64).div_ceil(1_000_000_000),
            )),
            _ => None,
        }))
    }

    fn expire(&self, now_s: u64, retention: &Retention) -> Result<Expired, AggregatorError> {
        let cutoff_ns = |keep: Duration| now_s.saturating_sub(keep.as_secs()) * 1_000_000_000;
        let (raw_windows, raw_partitions_dropped) = self.expire_raw(cutoff_ns(retention.raw))?;
        let mut expired = Expired {
            raw_windows,
            raw_partitions_dropped,
            ..Default::default()
        };
        let rollup_cutoff_s = now_s.saturating_sub(retention.rollups.as_secs()) as i64;
        self.write(&mut |tx| {
            expired.keys = tx.execute(
                "DELETE FROM window_keys WHERE end_ns < $1",
                &[Value::Int(cutoff_ns(retention.keys) as i64)],
            )?;
            expired.rollup_rows = 0;
            for t in TABLES {
                expired.rollup_rows += tx.execute(
                    &format!("DELETE FROM {} WHERE bucket_s < $1", t.name),
                    &[Value::Int(rollup_cutoff_s)],
                )?;
            }
            Ok(())
        })?;
        Ok(expired)
    }

    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError> {
        Backend::disk_usage(self)
    }

    fn healthy(&self) -> bool {
        self.read("SELECT 1", &[]).is_ok()
    }

    fn service_periods(&self, range: &Range) -> Result<Vec<ServicePeriodRow>, AggregatorError> {
        let layout = Backend::layout(self);
        let (from, to) = host_periods_range(range, &layout)?;
        let mut params = Vec::new();
        let src = source(
            &SERVICE,
            &SERVICE_COARSE,
            DAY_S,
            from,
            to,
            Some(range.period_s),
            &mut params,
        );
        let period = period_expr(range.period_s, &mut params);
        let sql = format!(
            "SELECT {period}, datacenter, service, scenario, {} FROM {src} \
             GROUP BY {period}, datacenter, service, scenario ORDER BY 1, 2, 3, 4",
            sum_list(SERVICE.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| ServicePeriodRow {
                period_start_s: r[0].i64() as u64 * range.period_s,
                row: ServiceRow::from_columns(&r[1..]),
            })
            .collect())
    }

    fn host_periods(&self, range: &Range) -> Result<Vec<HostPeriodRow>, AggregatorError> {
        let layout = Backend::layout(self);
        let (from, to) = host_periods_range(range, &layout)?;
        let mut params = Vec::new();
        let src = source(
            &HOST,
            &HOST_COARSE,
            DAY_S,
            from,
            to,
            Some(range.period_s),
            &mut params,
        );
        let period = period_expr(range.period_s, &mut params);
        let sql = format!(
            "SELECT {period}, host, MAX(datacenter), {} FROM {src} \
             GROUP BY {period}, host ORDER BY 1, 2",
            sum_list(HOST.sums)
        );
        Ok(self
            .read(&sql, &params)?
            .into_iter()
            .map(|r| HostPeriodRow {
                period_start_s: r[0].i64() as u64 * range.period_s,
                row: HostRow::from_columns(&r[1..]),
            })
            .collect())
    }

    fn request_cpu(&self, range: &Range) -> Result<Vec<RequestCpuRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let params = [Value::Int(from as i64), Value::Int(to as i64)];
        let mut out: BTreeMap<(String, String), RequestCpuRow> = BTreeMap::new();
        for r in self.read(
            "SELECT service, scenario, SUM(requests), SUM(cpu_ns), SUM(energy_j) \
             FROM request_cpu_total_rollup WHERE bucket_s >= $1 AND bucket_s < $2 \
             GROUP BY service, scenario ORDER BY 1, 2",
            &params,
        )? {
            out.insert(
                (r[0].text(), r[1].text()),
                RequestCpuRow {
                    service: r[0].text(),
                    scenario: r[1].text(),
                    bins: Vec::new(),
                    requests: r[2].f64(),
                    cpu_ns: r[3].f64(),
                    energy_j: r[4].f64(),
                },
            );
        }
        for r in self.read(
            "SELECT service, scenario, bin, SUM(requests) FROM request_cpu_rollup \
             WHERE bucket_s >= $1 AND bucket_s < $2 GROUP BY service, scenario, bin ORDER BY 1, 2, 3",
            &params,
        )? {
            let bin = r[2].i64().clamp(0, 64) as usize;
            if let Some(row) = out.get_mut(&(r[0].text(), r[1].text())) {
                if row.bins.len() <= bin {
                    row.bins.resize(bin + 1, 0.0);
                }
                row.bins[bin] += r[3].f64();
            }
        }
        Ok(out.into_values().collect())
    }

    fn host_services(&self, range: &Range) -> Result<Vec<HostServiceRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        Ok(self
            .read(
                "SELECT MAX(datacenter), host, service, SUM(cpu_ns) FROM host_service_rollup \
                 WHERE bucket_s >= $1 AND bucket_s < $2 GROUP BY host, service ORDER BY 2, 3",
                &[Value::Int(from as i64), Value::Int(to as i64)],
            )?
            .into_iter()
            .map(|r| HostServiceRow {
                datacenter: r[0].text(),
                host: r[1].text(),
                service: r[2].text(),
                cpu_ns: r[3].f64(),
            })
            .collect())
    }
}

/// The range of a per-period host-step query: whole host steps, periods
/// made of whole host steps.
fn host_periods_range(range: &Range, layout: &RollupLayout) -> Result<(u64, u64), AggregatorError> {
    if !range.period_s.is_multiple_of(layout.host_step_s) {
        return Err(AggregatorError::Invalid(format!(
            "period {} s is not a multiple of host_rollup_step {} s: host and service figures per period need whole host steps",
            range.period_s, layout.host_step_s
        )));
    }
    Ok(range.host_range(layout))
}

/// Opens the store the configuration names: PostgreSQL when `postgres_url`
/// is set, else the SQLite file `database`.
pub fn open(config: &crate::config::AggregatorConfig) -> Result<Box<dyn Store>, AggregatorError> {
    let layout = config.rollup_layout();
    layout.validate().map_err(AggregatorError::Invalid)?;
    match &config.postgres_url {
        Some(url) => Ok(Box::new(postgres::PostgresStore::open(
            url,
            layout,
            config.max_concurrent_queries as u32 + 1,
            config.query_timeout,
        )?)),
        None => Ok(Box::new(sqlite::SqliteStore::open_with(
            &config.database,
            layout,
            config.query_timeout,
        )?)),
    }
}

/// Checks (or records, on a new database) the rollup layout.
pub(crate) fn check_layout(tx: &mut dyn Tx, layout: &RollupLayout) -> Result<(), AggregatorError> {
    let stored = tx.query("SELECT key, value FROM meta", &[])?;
    let get = |k: &str| {
        stored
            .iter()
            .find(|r| r[0].text() == k)
            .and_then(|r| r[1].text().parse::<u64>().ok())
    };
    match (get("rollup_step_s"), get("host_rollup_step_s")) {
        (Some(step), Some(host_step)) => {
            if step != layout.step_s || host_step != layout.host_step_s {
                return Err(AggregatorError::Invalid(format!(
                    "the database's rollups use rollup_step {step} s and host_rollup_step {host_step} s; \
                     the configuration asks for {} s and {} s (set them back, or start a new database)",
                    layout.step_s, layout.host_step_s
                )));
            }
        }
        _ => {
            for (k, v) in [
                ("rollup_step_s", layout.step_s),
                ("host_rollup_step_s", layout.host_step_s),
            ] {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[Value::Text(k.into()), Value::Text(v.to_string())],
                )?;
            }
        }
    }
    Ok(())
}

/// Versioned migrations: (version, SQL).
pub(crate) fn migrations(postgres: bool) -> [(i64, &'static str); 3] {
    if postgres {
        [
            (
                1,
                include_str!("../../migrations/postgres/0001_rollups.sql"),
            ),
            (
                2,
                include_str!("../../migrations/postgres/0002_coarse_rollups.sql"),
            ),
            (
                4,
                include_str!("../../migrations/postgres/0004_review_rollups.sql"),
            ),
        ]
    } else {
        [
            (1, include_str!("../../migrations/sqlite/0001_rollups.sql")),
            (
                2,
                include_str!("../../migrations/sqlite/0002_coarse_rollups.sql"),
            ),
            (
                4,
                include_str!("../../migrations/sqlite/0004_review_rollups.sql"),
            ),
        ]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_split_in_proportion_to_time() {
        // 10:59:30 - 11:00:30 in hours: half and half.
        let h = 1_700_000_000 / 3600 * 3600;
        let s = (h + 3600 - 30) * 1_000_000_000;
        let pieces = split_by_time(s, s + 60 * 1_000_000_000, 3600);
        assert_eq!(pieces, vec![(h, 0.5, 30.0), (h + 3600, 0.5, 30.0)]);
        // Inside one bucket: whole.
        let pieces = split_by_time(h * 1_000_000_000, (h + 10) * 1_000_000_000, 60);
        assert_eq!(pieces, vec![(h, 1.0, 10.0)]);
        // 1 h window at a 1 min step: 60 pieces summing to 1.
        let pieces = split_by_time(h * 1_000_000_000, (h + 3600) * 1_000_000_000, 60);
        assert_eq!(pieces.len(), 60);
        assert!((pieces.iter().map(|p| p.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_canonical_encoding_keeps_the_layout_earlier_digests_were_taken_on() {
        // As the first stores wrote it: every field but the weights, in
        // field order, then the weights in key order.
        let mut w = v1::WindowReport {
            host: "h".into(),
            seq: 7,
            host_energy_j: 12.5,
            scenarios: vec![v1::ScenarioRecord {
                scenario: "credit".into(),
                transactions: 3,
                ..Default::default()
            }],
            processes: vec![v1::ProcessRecord {
                pid: 4,
                service: "svc".into(),
                ..Default::default()
            }],
            request_cpu: vec![v1::RequestCpuHistogram::default()],
            ..Default::default()
        };
        for (k, v) in [("query", 1.0), ("credit", 24.0), ("drawdown", 7.0)] {
            w.weights.insert(k.into(), v);
        }
        w.ingest_refused.insert("late".into(), 2);
        let mut without_weights = w.clone();
        without_weights.weights.clear();
        let mut expected = without_weights.encode_to_vec();
        prost::encoding::btree_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::double::encode,
            prost::encoding::double::encoded_len,
            24,
            &w.weights,
            &mut expected,
        );
        assert_ne!(expected, w.encode_to_vec());
        assert_eq!(canonical_encoding(&w), expected);
        w.weights.clear();
        assert_eq!(canonical_encoding(&w), w.encode_to_vec());
    }

    #[test]
    fn the_digest_does_not_depend_on_the_weights_order() {
        let mut a = v1::WindowReport::default();
        let mut b = v1::WindowReport::default();
        for (k, v) in [
            ("credit", 24.0),
            ("drawdown", 7.0),
            ("repayment", 3.0),
            ("query", 1.0),
        ] {
            a.weights.insert(k.into(), v);
        }
        for (k, v) in [
            ("query", 1.0),
            ("repayment", 3.0),
            ("drawdown", 7.0),
            ("credit", 24.0),
        ] {
            b.weights.insert(k.into(), v);
        }
        assert_eq!(canonical_encoding(&a), canonical_encoding(&b));
        let decoded = v1::WindowReport::decode(&canonical_encoding(&a)[..]).unwrap();
        assert_eq!(decoded, a);
        b.weights.insert("query".into(), 2.0);
        assert_ne!(
            content_digest(&canonical_encoding(&a)),
            content_digest(&canonical_encoding(&b))
        );
    }
}
