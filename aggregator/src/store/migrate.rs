//! Moving a SQLite store into PostgreSQL (`sci-aggregator migrate-store`).
//!
//! Both schemas come from the same migrations (`aggregator/migrations/`),
//! so every table of the SQLite file has a twin in PostgreSQL with the same
//! columns: rows are read from the file in one pass per table and appended
//! in statements of a few thousand rows, each value converted to the
//! PostgreSQL column's type (SQLite keeps what it is given). Raw windows go
//! to the day partitions they belong to, created first. The target must
//! have been created with the same rollup steps (checked when it is
//! opened) and hold no data yet: copying into a store that already has
//! rollups would add them twice.
use std::collections::BTreeMap;
use std::path::Path;

use super::backend::{values_clause, Backend, Value};
use super::layout::DAY_NS;
use super::postgres::PostgresStore;
use crate::error::AggregatorError;

/// Tables each store keeps for itself (applied migrations, its layout).
const OWN_TABLES: [&str; 2] = ["schema_migrations", "meta"];
/// Most parameters in one statement (PostgreSQL allows 65,535).
const MAX_PARAMS: usize = 60_000;

/// Rows copied, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    pub rows: BTreeMap<String, u64>,
}

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Real,
    Text,
    Bytes,
}

fn sqlite_err(context: &str, e: rusqlite::Error) -> AggregatorError {
    AggregatorError::Invalid(format!("{context}: {e}"))
}

/// Copies every table of the SQLite file at `from` into `to`.
pub fn copy_sqlite_to_postgres(
    from: &Path,
    to: &PostgresStore,
) -> Result<CopyReport, AggregatorError> {
    let conn = rusqlite::Connection::open_with_flags(
        from,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_err(&format!("opening {}", from.display()), e))?;
    let tables: Vec<String> = {
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .map_err(|e| sqlite_err("listing tables", e))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| sqlite_err("listing tables", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sqlite_err("listing tables", e))?;
        names
            .into_iter()
            .filter(|n| !OWN_TABLES.contains(&n.as_str()))
            .collect()
    };
    // Column types of the target's tables (partitions are reached through their parent).
    let mut target: BTreeMap<String, Vec<(String, Kind)>> = BTreeMap::new();
    for row in to.read(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c \
         JOIN pg_class t ON t.relname = c.table_name AND NOT t.relispartition \
         WHERE c.table_schema = current_schema() ORDER BY c.table_name, c.ordinal_position",
        &[],
    )? {
        let kind = match row[2].text().as_str() {
            "bigint" | "integer" | "smallint" => Kind::Int,
            "double precision" | "real" | "numeric" => Kind::Real,
            "bytea" => Kind::Bytes,
            _ => Kind::Text,
        };
        target
            .entry(row[0].text())
            .or_default()
            .push((row[1].text(), kind));
    }
    for table in &tables {
        if !target.contains_key(table) {
            return Err(AggregatorError::Invalid(format!(
                "table {table} of {} has no counterpart in PostgreSQL: migrate with an aggregator of the same version",
                from.display()
            )));
        }
        let held = to
            .read(
                &format!("SELECT COUNT(*) FROM (SELECT 1 FROM {table} LIMIT 1) AS one_row"),
                &[],
            )?
            .first()
            .is_some_and(|r| r[0].f64() > 0.0);
        if held {
            return Err(AggregatorError::Invalid(format!(
                "the PostgreSQL store already holds rows in {table}: migrate into a new database (copying would add them twice)"
            )));
        }
    }
    let mut report = CopyReport::default();
    for table in &tables {
        let columns = &target[table];
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        if table == "windows_raw" {
            let mut stmt = conn
                .prepare("SELECT DISTINCT end_ns / ?1 FROM windows_raw")
                .map_err(|e| sqlite_err("windows_raw days", e))?;
            let days = stmt
                .query_map([DAY_NS as i64], |r| r.get::<_, i64>(0))
                .map_err(|e| sqlite_err("windows_raw days", e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| sqlite_err("windows_raw days", e))?;
            let days: Vec<u64> = days.into_iter().map(|d| d.max(0) as u64).collect();
            to.prepare_raw_days(&days)?;
        }
        let mut stmt = conn
            .prepare(&format!("SELECT {} FROM {table}", names.join(", ")))
            .map_err(|e| sqlite_err(&format!("reading {table}"), e))?;
        let mut rows = stmt
            .query([])
            .map_err(|e| sqlite_err(&format!("reading {table}"), e))?;
        let per_statement = (MAX_PARAMS / names.len().max(1)).max(1);
        let mut batch: Vec<Value> = Vec::with_capacity(per_statement * names.len());
        let mut count = 0u64;
        let flush = |batch: &mut Vec<Value>| -> Result<(), AggregatorError> {
            if batch.is_empty() {
                return Ok(());
            }
            let n = batch.len() / names.len();
            let sql = format!(
                "INSERT INTO {table} ({}) VALUES {}",
                names.join(", "),
                values_clause(n, names.len())
            );
            let params = std::mem::take(batch);
            to.write(&mut |tx| tx.execute(&sql, &params).map(|_| ()))
        };
        while let Some(row) = rows
            .next()
            .map_err(|e| sqlite_err(&format!("reading {table}"), e))?
        {
            for (i, (name, kind)) in columns.iter().enumerate() {
                let raw = row
                    .get_ref(i)
                    .map_err(|e| sqlite_err(&format!("{table}.{name}"), e))?;
                batch.push(convert(raw, *kind, table, name)?);
            }
            count += 1;
            if batch.len() >= per_statement * names.len() {
                flush(&mut batch)?;
            }
        }
        flush(&mut batch)?;
        report.rows.insert(table.clone(), count);
    }
    copy_data_markers(&conn, to)?;
    Ok(report)
}

/// Copies the `meta` keys the target lacks: markers that describe the data
/// (such as `service_rollup_m_from_s`, the first second the per-minute
/// service table holds), not the layout, which both stores already share.
fn copy_data_markers(
    conn: &rusqlite::Connection,
    to: &PostgresStore,
) -> Result<(), AggregatorError> {
    let mut stmt = conn
        .prepare("SELECT key, value FROM meta ORDER BY key")
        .map_err(|e| sqlite_err("reading meta", e))?;
    let pairs = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(|e| sqlite_err("reading meta", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sqlite_err("reading meta", e))?;
    for (key, value) in pairs {
        let params = [Value::Text(key), Value::Text(value)];
        to.write(&mut |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &params,
            )
            .map(|_| ())
        })?;
    }
    Ok(())
}

/// One SQLite value as the PostgreSQL column's type.
fn convert(
    raw: rusqlite::types::ValueRef<'_>,
    kind: Kind,
    table: &str,
    column: &str,
) -> Result<Value, AggregatorError> {
    use rusqlite::types::ValueRef as R;
    let value = match (raw, kind) {
        (R::Null, _) => Value::Null,
        (R::Integer(i), Kind::Int) => Value::Int(i),
        (R::Integer(i), Kind::Real) => Value::Real(i as f64),
        (R::Real(r), Kind::Real) => Value::Real(r),
        (R::Real(r), Kind::Int) if r.fract() == 0.0 => Value::Int(r as i64),
        (R::Text(t), Kind::Text) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        (R::Integer(i), Kind::Text) => Value::Text(i.to_string()),
        (R::Real(r), Kind::Text) => Value::Text(r.to_string()),
        (R::Blob(b), Kind::Bytes) => Value::Bytes(b.to_vec()),
        (R::Text(t), Kind::Bytes) => Value::Bytes(t.to_vec()),
        (other, _) => {
            return Err(AggregatorError::Invalid(format!(
                "{table}.{column}: a {:?} value does not fit the PostgreSQL column",
                other.data_type()
            )))
        }
    };
    Ok(value)
}
