//! The embedded store: one SQLite file in WAL mode. One write connection
//! (ingest commits, retention) and a pool of read connections, so queries
//! read a snapshot while ingest writes; a read past the query timeout is
//! interrupted (progress handler). No partitions: retention deletes rows.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::backend::{Backend, Tx, Value};
use super::commit::commit_windows;
use super::layout::RollupLayout;
use super::rows::CommitOutcome;
use super::schema::{check_layout, migrations};
use crate::error::AggregatorError;

pub struct SqliteStore {
    path: PathBuf,
    layout: RollupLayout,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    query_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `$1` placeholders (the shared SQL) as SQLite's `?1`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn to_sql(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Real(r) => rusqlite::types::Value::Real(*r),
        Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
        Value::Bytes(b) => rusqlite::types::Value::Blob(b.clone()),
        Value::Null => rusqlite::types::Value::Null,
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
        ValueRef::Null => Value::Null,
    }
}

fn run_query(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Vec<Value>>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(&sqlite_sql(sql))?;
    let columns = statement.column_count();
    let params: Vec<rusqlite::types::Value> = params.iter().map(to_sql).collect();
    let mut rows = statement.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(from_sql(row.get_ref(i)?));
        }
        out.push(values);
    }
    Ok(out)
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

impl Tx for SqliteTx<'_> {
    fn batch(&mut self, sql: &str) -> Result<(), AggregatorError> {
        Ok(self.0.execute_batch(sql)?)
    }
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, AggregatorError> {
        let mut statement = self.0.prepare_cached(&sqlite_sql(sql))?;
        let params: Vec<rusqlite::types::Value> = params.iter().map(to_sql).collect();
        Ok(statement.execute(rusqlite::params_from_iter(params))? as u64)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError> {
        Ok(run_query(self.0, sql, params)?)
    }
}

fn connect(path: &Path) -> Result<Connection, AggregatorError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open_with(
        path: &Path,
        layout: RollupLayout,
        query_timeout: Duration,
    ) -> Result<Self, AggregatorError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| AggregatorError::io(format!("creating {}", dir.display()), e))?;
        }
        let mut conn = connect(path)?;
        {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_unix_s BIGINT NOT NULL)",
            )?;
            let legacy: i64 = tx.query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'scenarios'",
                [],
                |r| r.get(0),
            )?;
            if legacy > 0 {
                return Err(AggregatorError::Invalid(format!(
                    "{} was written by an aggregator without rollups; start a new database file",
                    path.display()
                )));
            }
            for (version, sql) in migrations(false) {
                let done: i64 = tx.query_row(
                    "SELECT count(*) FROM schema_migrations WHERE version = ?1",
                    [version],
                    |r| r.get(0),
                )?;
                if done == 0 {
                    tx.execute_batch(sql)?;
                    tx.execute(
                        "INSERT INTO schema_migrations VALUES (?1, strftime('%s','now'))",
                        [version],
                    )?;
                }
            }
            check_layout(&mut SqliteTx(&tx), &layout)?;
            tx.commit()?;
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            layout,
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            query_timeout,
        })
    }

    /// With the default layout (1 min, 1 h) and a 30 s query timeout.
    /// The rollup layout recorded in the database at `path` when it was
    /// created; None if the file does not exist or records none yet.
    pub fn stored_layout(path: &Path) -> Result<Option<RollupLayout>, AggregatorError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let has_meta: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'meta'",
            [],
            |r| r.get(0),
        )?;
        if has_meta == 0 {
            return Ok(None);
        }
        let get = |key: &str| -> Result<Option<u64>, AggregatorError> {
            let mut stmt = conn.prepare("SELECT value FROM meta WHERE key = ?1")?;
            let mut rows = stmt.query([key])?;
            Ok(match rows.next()? {
                Some(row) => row.get::<_, String>(0)?.parse().ok(),
                None => None,
            })
        };
        Ok(match (get("rollup_step_s")?, get("host_rollup_step_s")?) {
            (Some(step_s), Some(host_step_s)) => Some(RollupLayout {
                step_s,
                host_step_s,
            }),
            _ => None,
        })
    }

    /// The pid of another process that has the database at `path` open, if
    /// any: every SQLite connection to a WAL database holds a shared lock on
    /// the "DMS" byte (offset 128) of its `-shm` file while it is open. Call
    /// it before this process opens the file (closing the descriptor used
    /// here drops this process's own locks on the `-shm` file).
    pub fn held_by(path: &Path) -> Result<Option<i32>, AggregatorError> {
        use std::os::fd::AsRawFd;
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        let shm = PathBuf::from(shm);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&shm)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AggregatorError::io(format!("opening {}", shm.display()), e)),
        };
        // SAFETY: a plain C struct, all zeros is a valid value.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = 128;
        lock.l_len = 1;
        // SAFETY: F_GETLK on an open descriptor with a valid `flock` to fill.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) } != 0 {
            return Err(AggregatorError::io(
                format!("testing the locks of {}", shm.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok((lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid))
    }

    pub fn open(path: &Path) -> Result<Self, AggregatorError> {
        Self::open_with(
            path,
            RollupLayout {
                step_s: 60,
                host_step_s: 3600,
            },
            Duration::from_secs(30),
        )
    }
}

impl Backend for SqliteStore {
    fn layout(&self) -> RollupLayout {
        self.layout
    }

    fn commit_batch(
        &self,
        windows: &[sci_proto::v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError> {
        commit_windows(self, windows)
    }

    fn write(
        &self,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), AggregatorError>,
    ) -> Result<(), AggregatorError> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        f(&mut SqliteTx(&tx))?;
        tx.commit()?;
        Ok(())
    }

    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, AggregatorError> {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        let deadline = Instant::now() + self.query_timeout;
        conn.progress_handler(10_000, Some(move || Instant::now() > deadline));
        let result = run_query(&conn, sql, params);
        conn.progress_handler(0, None::<fn() -> bool>);
        lock(&self.readers).push(conn);
        result.map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::OperationInterrupted =>
            {
                AggregatorError::QueryTimeout(self.query_timeout)
            }
            e => AggregatorError::Store(e),
        })
    }

    fn prepare_raw_days(&self, _days: &[u64]) -> Result<(), AggregatorError> {
        Ok(())
    }

    fn expire_raw(&self, cutoff_ns: u64) -> Result<(u64, u64), AggregatorError> {
        // In slices, so that ingest waits for at most one of them.
        let mut total = 0;
        loop {
            let conn = lock(&self.writer);
            let n = conn.execute(
                "DELETE FROM windows_raw WHERE rowid IN (SELECT rowid FROM windows_raw WHERE end_ns < ?1 LIMIT 5000)",
                [cutoff_ns as i64],
            )? as u64;
            drop(conn);
            total += n;
            if n < 5000 {
                return Ok((total, 0));
            }
        }
    }

    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError> {
        let mut usage = BTreeMap::new();
        let mut total = 0;
        for suffix in ["", "-wal"] {
            let file = PathBuf::from(format!("{}{suffix}", self.path.display()));
            total += std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        }
        usage.insert("total".to_string(), total);
        // Per table, where SQLite was built with the dbstat table.
        let conn = lock(&self.writer);
        if let Ok(rows) = run_query(
            &conn,
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name",
            &[],
        ) {
            for r in rows {
                usage.insert(r[0].text(), r[1].i64() as u64);
            }
        }
        Ok(usage)
    }
}
