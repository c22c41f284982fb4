//! What a database supplies to the shared SQL: the [`Backend`] (a write
//! transaction, read queries, raw-window partitions) and its [`Tx`], the
//! [`Value`]s crossing into and out of SQL, and the [`Upsert`] batches that
//! a commit adds to the rollups. [`super::sqlite`] and [`super::postgres`]
//! implement them.
use std::collections::BTreeMap;

use sci_proto::v1;

use super::layout::RollupLayout;
use super::rows::CommitOutcome;
use crate::error::AggregatorError;

/// Rows per multi-row INSERT.
pub(super) const ROWS_PER_STATEMENT: usize = 100;

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
    pub(super) fn f64(&self) -> f64 {
        match self {
            Value::Int(i) => *i as f64,
            Value::Real(r) => *r,
            _ => 0.0,
        }
    }
    pub(super) fn i64(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            Value::Real(r) => *r as i64,
            _ => 0,
        }
    }
    pub(super) fn text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            _ => String::new(),
        }
    }
    pub(super) fn bytes(&self) -> Vec<u8> {
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
    pub(super) fn len(&self) -> usize {
        match self {
            Column::Int(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::Real(v) => v.len(),
        }
    }
    pub(super) fn value(&self, row: usize) -> Value {
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
    pub(super) fn rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }
}

/// One open write transaction.
pub trait Tx {
    /// Several statements without parameters (migrations).
    fn batch(&mut self, sql: &str) -> Result<(), AggregatorError>;
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, AggregatorError>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError>;
    /// Keeps concurrent writers out of `table` until this transaction ends
    /// (PostgreSQL; SQLite has one writer at a time already).
    fn lock_table(&mut self, _table: &str) -> Result<(), AggregatorError> {
        Ok(())
    }
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
    /// Stores one batch (see [`super::Store::commit`]) with
    /// [`super::commit::commit_windows`]; PostgreSQL merges the batches that
    /// arrive together into one transaction ([`super::group`]).
    fn commit_batch(
        &self,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError>
    where
        Self: Sized;
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

/// `$1, $2, ...` placeholders for `rows` rows of `width` values.
pub(super) fn values_clause(rows: usize, width: usize) -> String {
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
