//! The production store: PostgreSQL (15 here), shared by any number of
//! aggregators. Two connection pools (r2d2): writers for ingest commits and
//! retention, readers for queries, whose sessions carry `statement_timeout`
//! so a query past the timeout is cancelled by the server. Raw windows are
//! range-partitioned by end time, one partition per UTC day
//! (`windows_raw_d<day>`), created at ingest and dropped whole by retention.
//! Plain SQL only (no extension), so PostgreSQL-compatible distributed
//! engines run it too. Migrations run under an advisory lock, so aggregators
//! starting together apply each once.
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use sci_proto::v1;

use super::backend::{Backend, Column, Tx, Upsert, Value};
use super::group::GroupCommit;
use super::layout::{RollupLayout, DAY_NS};
use super::rows::CommitOutcome;
use super::schema::{check_layout, migrations};
use crate::error::AggregatorError;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// The `postgres` client blocks on its own runtime: every call, and the
/// closing of its connections, must happen off the async runtime's threads
/// (the aggregator calls the store from blocking tasks; [`Drop`] hands the
/// pools to a plain thread when dropped on a runtime thread).
pub struct PostgresStore {
    layout: RollupLayout,
    /// (writers, readers); None only while dropping.
    pools: Option<(Pool, Pool)>,
    partitions: Mutex<HashSet<u64>>,
    query_timeout: Duration,
    group_commit: GroupCommit,
    /// Whether the server compresses with lz4 (PostgreSQL 14+ built with
    /// it): raw payloads then go to TOAST through lz4 instead of pglz.
    lz4: bool,
}

/// A data exception (SQLSTATE class 22), an integrity constraint (23) or a
/// program limit such as an index row too large (54) is the data's fault:
/// [`AggregatorError::Rejected`]. Anything else is the store's.
fn pg(e: postgres::Error) -> AggregatorError {
    let class = e.code().map(|c| &c.code()[..2]);
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    };
    match class {
        Some("22" | "23" | "54") => AggregatorError::Rejected(text),
        _ => AggregatorError::Postgres(text),
    }
}

fn pool_err(e: r2d2::Error) -> AggregatorError {
    AggregatorError::Postgres(format!("connection pool: {e}"))
}

/// The parameters as the client takes them, borrowed (no copy of texts or bytes).
fn params_of(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    const NULL: Option<i64> = None;
    values
        .iter()
        .map(|v| -> &(dyn ToSql + Sync) {
            match v {
                Value::Int(i) => i,
                Value::Real(r) => r,
                Value::Text(t) => t,
                Value::Bytes(b) => b,
                Value::Null => &NULL,
            }
        })
        .collect()
}

fn rows_of(rows: Vec<postgres::Row>) -> Result<Vec<Vec<Value>>, AggregatorError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(row.len());
        for (i, column) in row.columns().iter().enumerate() {
            let t = column.type_();
            let v = if *t == Type::INT8 {
                row.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
            } else if *t == Type::INT4 {
                row.try_get::<_, Option<i32>>(i)
                    .map(|v| v.map(|v| Value::Int(v.into())))
            } else if *t == Type::INT2 {
                row.try_get::<_, Option<i16>>(i)
                    .map(|v| v.map(|v| Value::Int(v.into())))
            } else if *t == Type::FLOAT8 {
                row.try_get::<_, Option<f64>>(i).map(|v| v.map(Value::Real))
            } else if *t == Type::FLOAT4 {
                row.try_get::<_, Option<f32>>(i)
                    .map(|v| v.map(|v| Value::Real(v.into())))
            } else if *t == Type::BYTEA {
                row.try_get::<_, Option<Vec<u8>>>(i)
                    .map(|v| v.map(Value::Bytes))
            } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME {
                row.try_get::<_, Option<String>>(i)
                    .map(|v| v.map(Value::Text))
            } else {
                // Types the shared SQL never reads (void of pg_advisory_xact_lock, ...).
                Ok(None)
            }
            .map_err(pg)?;
            values.push(v.unwrap_or(Value::Null));
        }
        out.push(values);
    }
    Ok(out)
}

/// The upserts held by [`Tx::upsert_later`] are sent as one statement
/// (after the held settings), before the next statement that needs an
/// answer and before the commit. On a busy host every round trip waits for
/// both processes to be scheduled; a commit of a few hundred windows went
/// from some 70 round trips to about 5. The upserts carry their values as
/// binary arrays (`unnest`), which the server neither parses nor converts
/// from text: with the values inline as literals, parsing them was a third
/// of the writer's time. Statements with parameters are sent with their
/// types, so the server is not asked to describe them first (one round trip
/// each, not two).
struct PgTx<'a, 'b> {
    tx: &'a mut postgres::Transaction<'b>,
    /// Settings of the transaction (`SET LOCAL ...`), sent with its first statement.
    held: String,
    upserts: Vec<Upsert>,
}

/// The array type and SQL name of an upsert column.
fn array_of(column: &Column) -> (Type, &'static str) {
    match column {
        Column::Int(_) => (Type::INT8_ARRAY, "BIGINT[]"),
        Column::Text(_) => (Type::TEXT_ARRAY, "TEXT[]"),
        Column::Real(_) => (Type::FLOAT8_ARRAY, "DOUBLE PRECISION[]"),
    }
}

/// `upserts` as one statement: each an `INSERT ... SELECT FROM unnest(...)
/// ON CONFLICT ... DO UPDATE` in a `WITH` (each table appears once, so no
/// row is touched twice), with its parameters in order.
fn upserts_statement(upserts: &[Upsert]) -> (String, Vec<(&(dyn ToSql + Sync), Type)>) {
    let mut sql = String::from("WITH ");
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::new();
    for (i, u) in upserts.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        let names: Vec<&str> = u.columns.iter().map(|(name, _)| *name).collect();
        let mut arrays = Vec::with_capacity(u.columns.len());
        for (_, column) in &u.columns {
            let (array_type, sql_type) = array_of(column);
            let value: &(dyn ToSql + Sync) = match column {
                Column::Int(v) => v,
                Column::Text(v) => v,
                Column::Real(v) => v,
            };
            params.push((value, array_type));
            arrays.push(format!("CAST(${} AS {sql_type})", params.len()));
        }
        sql.push_str(&format!(
            "u{i} AS (INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT ({}) DO UPDATE SET {})",
            u.table,
            names.join(", "),
            arrays.join(", "),
            u.conflict_keys.join(", "),
            u.on_conflict
        ));
    }
    sql.push_str(" SELECT 1");
    (sql, params)
}

/// The column type a value is sent as (none for NULL, which says no type).
fn pg_type(v: &Value) -> Option<Type> {
    match v {
        Value::Int(_) => Some(Type::INT8),
        Value::Real(_) => Some(Type::FLOAT8),
        Value::Text(_) => Some(Type::TEXT),
        Value::Bytes(_) => Some(Type::BYTEA),
        Value::Null => None,
    }
}

/// The parameters with their types, when none is NULL.
fn typed_params(values: &[Value]) -> Option<Vec<(&(dyn ToSql + Sync), Type)>> {
    values
        .iter()
        .zip(params_of(values))
        .map(|(v, p)| Some((p, pg_type(v)?)))
        .collect()
}

impl PgTx<'_, '_> {
    fn flush(&mut self) -> Result<(), AggregatorError> {
        if !self.held.is_empty() {
            let sql = std::mem::take(&mut self.held);
            self.tx.batch_execute(&sql).map_err(pg)?;
        }
        if !self.upserts.is_empty() {
            let upserts = std::mem::take(&mut self.upserts);
            let (sql, params) = upserts_statement(&upserts);
            self.tx.execute_typed(&sql, &params).map_err(pg)?;
        }
        Ok(())
    }
}

impl Tx for PgTx<'_, '_> {
    fn batch(&mut self, sql: &str) -> Result<(), AggregatorError> {
        self.flush()?;
        self.tx.batch_execute(sql).map_err(pg)
    }
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, AggregatorError> {
        self.flush()?;
        match typed_params(params) {
            Some(typed) => self.tx.execute_typed(sql, &typed),
            None => self.tx.execute(sql, &params_of(params)),
        }
        .map_err(pg)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError> {
        self.flush()?;
        let rows = match typed_params(params) {
            Some(typed) => self.tx.query_typed(sql, &typed),
            None => self.tx.query(sql, &params_of(params)),
        }
        .map_err(pg)?;
        rows_of(rows)
    }
    fn lock_table(&mut self, table: &str) -> Result<(), AggregatorError> {
        self.flush()?;
        // Conflicts with the ROW EXCLUSIVE lock every writer takes.
        self.tx
            .batch_execute(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
            .map_err(pg)
    }
    fn upsert_later(&mut self, upsert: Upsert) -> Result<(), AggregatorError> {
        for (name, column) in &upsert.columns {
            if let Column::Text(texts) = column {
                if let Some(t) = texts.iter().find(|t| t.contains('\0')) {
                    return Err(AggregatorError::Invalid(format!(
                        "{}.{name}: text with a NUL character cannot be stored: {:?}",
                        upsert.table,
                        t.chars().take(60).collect::<String>()
                    )));
                }
            }
        }
        self.upserts.push(upsert);
        Ok(())
    }
    fn append_rows(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[Vec<Value>],
    ) -> Result<(), AggregatorError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let types = first
            .iter()
            .map(|v| {
                pg_type(v).ok_or_else(|| {
                    AggregatorError::Invalid(format!(
                        "appending to {table}: a NULL gives no column type"
                    ))
                })
            })
            .collect::<Result<Vec<Type>, _>>()?;
        let sink = self
            .tx
            .copy_in(&format!(
                "COPY {table} ({}) FROM STDIN (FORMAT binary)",
                columns.join(", ")
            ))
            .map_err(pg)?;
        let mut writer = BinaryCopyInWriter::new(sink, &types);
        for row in rows {
            writer.write(&params_of(row)).map_err(pg)?;
        }
        writer.finish().map_err(pg)?;
        Ok(())
    }
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL or a libpq key=value string),
    /// migrates, and checks the rollup layout.
    pub fn open(
        url: &str,
        layout: RollupLayout,
        readers: u32,
        query_timeout: Duration,
    ) -> Result<Self, AggregatorError> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| AggregatorError::Postgres(format!("postgres_url: {e}")))?;
        let given = config.get_options().unwrap_or_default().to_string();
        let mut read_config = config.clone();
        // Each query on one core: parallel workers are processes forked per
        // query, and on a small server they took the CPU that ingest needs
        // (on 2 vCPUs, a quarter of it went to starting and ending them).
        // Options given in the URL come after, so they can turn them back on.
        read_config.options(&format!(
            "-c max_parallel_workers_per_gather=0 {given} -c statement_timeout={} -c default_transaction_read_only=on",
            query_timeout.as_millis()
        ));
        let writers = r2d2::Pool::builder()
            .max_size(4)
            .connection_timeout(Duration::from_secs(10))
            .build(PostgresConnectionManager::new(config, NoTls))
            .map_err(pool_err)?;
        let readers = r2d2::Pool::builder()
            .max_size(readers.max(1))
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(10))
            .build(PostgresConnectionManager::new(read_config, NoTls))
            .map_err(pool_err)?;
        let store = PostgresStore {
            layout,
            pools: Some((writers, readers)),
            partitions: Mutex::new(HashSet::new()),
            query_timeout,
            group_commit: GroupCommit::default(),
            lz4: false,
        };
        // A raw window (2-3 KB) crosses the TOAST threshold, and pglz took
        // the largest share of the writer's CPU (a twentieth of the host's
        // under the store bench); lz4 compresses about as well for a
        // fraction of it. Servers without it (or engines without the
        // setting) keep their default.
        let lz4 = store
            .read(
                "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)",
                &[],
            )
            .is_ok_and(|rows| !rows.is_empty());
        let mut store = store;
        store.lz4 = lz4;
        store.write(&mut |tx| {
            tx.query("SELECT pg_advisory_xact_lock(50320251)", &[])?;
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_unix_s BIGINT NOT NULL)",
                &[],
            )?;
            for (version, sql) in migrations(true) {
                let done = tx.query(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[Value::Int(version)],
                )?;
                if done.is_empty() {
                    tx.batch(sql)?;
                    tx.execute(
                        "INSERT INTO schema_migrations VALUES ($1, CAST(EXTRACT(EPOCH FROM now()) AS BIGINT))",
                        &[Value::Int(version)],
                    )?;
                }
            }
            check_layout(tx, &layout)
        })?;
        Ok(store)
    }
}

impl PostgresStore {
    /// The rollup layout recorded in the database at `url` (None: no
    /// sci-aggregator store there yet), and the other sessions connected to
    /// that database (application name and client address each), so a
    /// maintenance command can refuse while an aggregator is connected.
    pub fn stored_layout(
        url: &str,
    ) -> Result<(Option<RollupLayout>, Vec<String>), AggregatorError> {
        let mut client = postgres::Client::connect(url, NoTls).map_err(pg)?;
        let sessions = client
            .query(
                "SELECT COALESCE(NULLIF(application_name, ''), '(no name)') || ' from ' || \
                 COALESCE(host(client_addr), 'a local socket') || ' (pid ' || pid::text || ')' \
                 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend'",
                &[],
            )
            .map_err(pg)?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let has_meta = client
            .query("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'meta'", &[])
            .map_err(pg)?;
        if has_meta.is_empty() {
            return Ok((None, sessions));
        }
        let mut get = |key: &str| -> Result<Option<u64>, AggregatorError> {
            Ok(client
                .query("SELECT value FROM meta WHERE key = $1", &[&key])
                .map_err(pg)?
                .first()
                .and_then(|r| r.get::<_, String>(0).parse().ok()))
        };
        let layout = match (get("rollup_step_s")?, get("host_rollup_step_s")?) {
            (Some(step_s), Some(host_step_s)) => Some(RollupLayout {
                step_s,
                host_step_s,
            }),
            _ => None,
        };
        Ok((layout, sessions))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(pools) = self.pools.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let closer = std::thread::spawn(move || drop(pools));
                let _ = closer.join();
            }
        }
    }
}

impl PostgresStore {
    fn writers(&self) -> Result<&Pool, AggregatorError> {
        self.pools
            .as_ref()
            .map(|p| &p.0)
            .ok_or_else(|| AggregatorError::Postgres("store closed".into()))
    }
    fn readers(&self) -> Result<&Pool, AggregatorError> {
        self.pools
            .as_ref()
            .map(|p| &p.1)
            .ok_or_else(|| AggregatorError::Postgres("store closed".into()))
    }
}

fn partition_name(day: u64) -> String {
    format!("windows_raw_d{day}")
}

impl Backend for PostgresStore {
    fn layout(&self) -> RollupLayout {
        self.layout
    }

    fn commit_batch(
        &self,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError> {
        self.group_commit.commit(self, windows)
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), AggregatorError>,
    ) -> Result<(), AggregatorError> {
        let mut client = self.writers()?.get().map_err(pool_err)?;
        let mut tx = client.transaction().map_err(pg)?;
        let mut held = PgTx {
            tx: &mut tx,
            held: if self.lz4 {
                "SET LOCAL default_toast_compression = 'lz4';\n".to_string()
            } else {
                String::new()
            },
            upserts: Vec::new(),
        };
        f(&mut held)?;
        held.flush()?;
        tx.commit().map_err(pg)
    }

    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError> {
        let mut client = self.readers()?.get().map_err(pool_err)?;
        let refs = params_of(params);
        match client.query(sql, &refs) {
            Ok(rows) => rows_of(rows),
            Err(e) if e.code() == Some(&postgres::error::SqlState::QUERY_CANCELED) => {
                Err(AggregatorError::QueryTimeout(self.query_timeout))
            }
            Err(e) => Err(pg(e)),
        }
    }

    fn prepare_raw_days(&self, days: &[u64]) -> Result<(), AggregatorError> {
        let missing: Vec<u64> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            days.iter()
                .copied()
                .filter(|d| !known.contains(d))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut client = self.writers()?.get().map_err(pool_err)?;
        for day in missing {
            let name = partition_name(day);
            // Raw windows are only inserted (their keys live in window_keys)
            // and dropped with their partition; the aggregator never reads
            // them back. Autovacuum has nothing to do there: a vacuum
            // triggered by inserts (PostgreSQL 13+) would reread every page
            // just written, and an analyze would sample the growing
            // partition for statistics no query uses, each a core of a small
            // host for a second or more, minute after minute under steady
            // ingest. The partition is gone long before freezing would
            // matter (an anti-wraparound vacuum still runs regardless).
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF windows_raw FOR VALUES FROM ({}) TO ({}) WITH (autovacuum_enabled = false)",
                day * DAY_NS,
                (day + 1) * DAY_NS
            );
            if let Err(e) = client.batch_execute(&create) {
                // Another aggregator may have created it at the same moment.
                let exists = client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                    .map_err(pg)?
                    .get::<_, bool>(0);
                if !exists {
                    return Err(pg(e));
                }
            }
            self.partitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(day);
        }
        Ok(())
    }

    fn expire_raw(&self, cutoff_ns: u64) -> Result<(u64, u64), AggregatorError> {
        let mut client = self.writers()?.get().map_err(pool_err)?;
        let partitions = client
            .query(
                "SELECT c.relname, CAST(c.reltuples AS BIGINT) FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
                 WHERE p.relname = 'windows_raw'",
                &[],
            )
            .map_err(pg)?;
        let (mut rows, mut dropped) = (0u64, 0u64);
        for partition in partitions {
            let name: String = partition.get(0);
            let Some(day) = name
                .strip_prefix("windows_raw_d")
                .and_then(|d| d.parse::<u64>().ok())
            else {
                continue;
            };
            if (day + 1) * DAY_NS <= cutoff_ns {
                client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .map_err(pg)?;
                self.partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&day);
                rows += partition.get::<_, i64>(1).max(0) as u64;
                dropped += 1;
            }
        }
        Ok((rows, dropped))
    }

    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError> {
        let mut client = self.readers()?.get().map_err(pool_err)?;
        let mut usage = BTreeMap::new();
        for row in client
            .query(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c \
                 WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace",
                &[],
            )
            .map_err(pg)?
        {
            let name: String = row.get(0);
            let key = if name.starts_with("windows_raw_d") {
                "windows_raw".to_string()
            } else {
                name
            };
            *usage.entry(key).or_insert(0) += row.get::<_, i64>(1).max(0) as u64;
        }
        let total: u64 = usage.values().sum();
        usage.insert("total".to_string(), total);
        Ok(usage)
    }
}
