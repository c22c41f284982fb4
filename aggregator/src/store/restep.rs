//! Changing a store's rollup steps in place (`sci-aggregator
//! change-rollup-steps`), with the aggregator stopped, in one transaction.
//!
//! Each table is cut in one of the layout's steps ([`Table::step`]): the
//! base step (`fleet_rollup`, `scenario_rollup`, `service_rollup_m`), the
//! host step (their hourly copies, host, service, profile, request-CPU,
//! host-service and supply rollups) or a day (never changed). For each of
//! the two steps that changes:
//! - to a whole multiple of the old one (coarser): every row is moved to
//!   the new bucket holding it and summed there. Exact: a window's pieces
//!   in the old buckets add up to its pieces in the new ones (every sum is
//!   additive, a window's `windows_ended` is in the bucket holding its end,
//!   and so is a profile's or request histogram's row);
//! - to anything else (finer, or not a multiple): the tables are rebuilt
//!   from the raw windows by the code ingest uses ([`Deltas::add_window`]),
//!   so they equal what ingest at the new step would have written. Raw
//!   windows are kept shorter than rollups (`raw_retention`): the store
//!   holds them whole only from `service_rollup_m_from_s` (the raw cutoff
//!   of the last retention pass; absent: from the beginning), so only
//!   buckets from that second on (rounded up to a boundary of both old and
//!   new steps) are rebuilt. The queries read one step per table, so rows
//!   older than that are refused, or dropped with `--drop-older` (and
//!   counted in the report).
//!
//! The layout keys in `meta` change in the same transaction; afterwards a
//! period that is not a multiple of the new step is refused by the queries
//! as before, and an aggregator started with the old steps is refused.
use std::collections::BTreeMap;

use prost::Message;
use sci_proto::v1;
use serde::Serialize;

use super::backend::{Backend, Tx, Value};
use super::deltas::Deltas;
use super::layout::RollupLayout;
use super::supply::supply_key;
use super::tables::{Step, Table, SERVICE_FINE_FROM_KEY, TABLES};
use crate::error::AggregatorError;

/// Raw windows decoded and summed at a time during a rebuild.
const REPLAY_PAGE: i64 = 2_000;
/// The temporary table a coarser step is summed into.
const SCRATCH: &str = "restep_scratch";

/// How one table changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableChange {
    /// `rebucketed` (summed into the coarser step) or `rebuilt` (from raw windows).
    pub how: &'static str,
    pub rows_before: u64,
    pub rows_after: u64,
    /// Rows older than the raw windows, deleted (`--drop-older`).
    pub rows_dropped: u64,
}

/// What `change-rollup-steps` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestepReport {
    pub from: RollupLayout,
    pub to: RollupLayout,
    pub tables: BTreeMap<String, TableChange>,
    /// First second of the rebuilt buckets (when a step was rebuilt).
    pub rebuilt_from_s: Option<u64>,
    pub raw_windows_replayed: u64,
    /// First and last bucket start of the rows dropped (`--drop-older`).
    pub dropped_buckets_s: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Same,
    Coarser,
    Rebuild,
}

fn change(old_s: u64, new_s: u64) -> Change {
    if old_s == new_s {
        Change::Same
    } else if new_s.is_multiple_of(old_s) {
        Change::Coarser
    } else {
        Change::Rebuild
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

fn count(tx: &mut dyn Tx, sql: &str, params: &[Value]) -> Result<u64, AggregatorError> {
    Ok(tx
        .query(sql, params)?
        .first()
        .map_or(0, |r| r[0].i64().max(0) as u64))
}

/// Changes the store's rollup steps to `to` (see the module note).
pub fn change_rollup_steps(
    db: &dyn Backend,
    to: RollupLayout,
    drop_older: bool,
) -> Result<RestepReport, AggregatorError> {
    let from = db.layout();
    to.validate().map_err(AggregatorError::Invalid)?;
    if from == to {
        return Err(AggregatorError::Invalid(format!(
            "the store already uses rollup_step {} s and host_rollup_step {} s: nothing to change",
            from.step_s, from.host_step_s
        )));
    }
    let change_of = |t: &Table| match t.step {
        Step::Base => change(from.step_s, to.step_s),
        Step::Host => change(from.host_step_s, to.host_step_s),
        Step::Day => Change::Same,
    };
    let new_step = |t: &Table| match t.step {
        Step::Base => to.step_s,
        Step::Host => to.host_step_s,
        Step::Day => super::layout::DAY_S,
    };
    let rebuilt: Vec<&Table> = TABLES
        .iter()
        .copied()
        .filter(|t| change_of(t) == Change::Rebuild)
        .collect();
    let mut report = RestepReport {
        from,
        to,
        tables: BTreeMap::new(),
        rebuilt_from_s: None,
        raw_windows_replayed: 0,
        dropped_buckets_s: None,
    };
    db.write(&mut |tx| {
        report.tables.clear();
        report.raw_windows_replayed = 0;
        report.dropped_buckets_s = None;
        let marker = tx
            .query(
                "SELECT value FROM meta WHERE key = $1",
                &[Value::Text(SERVICE_FINE_FROM_KEY.into())],
            )?
            .first()
            .and_then(|r| r[0].text().parse::<u64>().ok());
        for t in TABLES {
            if change_of(t) == Change::Same {
                continue;
            }
            let rows_before = count(tx, &format!("SELECT COUNT(*) FROM {}", t.name), &[])?;
            let how = if change_of(t) == Change::Coarser {
                rebucket(tx, t, new_step(t))?;
                "rebucketed"
            } else {
                "rebuilt"
            };
            report.tables.insert(
                t.name.to_string(),
                TableChange {
                    how,
                    rows_before,
                    rows_after: 0,
                    rows_dropped: 0,
                },
            );
        }
        let mut fine_from_s = marker;
        if !rebuilt.is_empty() {
            // Buckets from here on get pieces of held raw windows only: a
            // window retention removed ended before the marker.
            let raw_from_s = marker.unwrap_or(0);
            let both =
                lcm(lcm(from.step_s, to.step_s), lcm(from.host_step_s, to.host_step_s)).max(1);
            let from_s = raw_from_s.div_ceil(both) * both;
            report.rebuilt_from_s = Some(from_s);
            let cut = Value::Int(i64::try_from(from_s).unwrap_or(i64::MAX));
            let mut older = Vec::new();
            for t in &rebuilt {
                let rows = tx.query(
                    &format!(
                        "SELECT COUNT(*), MIN(bucket_s), MAX(bucket_s) FROM {} WHERE bucket_s < $1",
                        t.name
                    ),
                    std::slice::from_ref(&cut),
                )?;
                if let Some(r) = rows.first().filter(|r| r[0].i64() > 0) {
                    older.push((t, r[0].i64() as u64, r[1].i64() as u64, r[2].i64() as u64));
                }
            }
            if !older.is_empty() && !drop_older {
                let rows: u64 = older.iter().map(|o| o.1).sum();
                let first = older.iter().map(|o| o.2).min().unwrap_or(0);
                return Err(AggregatorError::Invalid(format!(
                    "raw windows are held only from unix second {raw_from_s} (older ones expired by raw_retention), \
                     and a step that is not a whole multiple of the old one can only be rebuilt from raw windows: \
                     {rows} rows of {} from {first} to {from_s} cannot be rebuilt at rollup_step {} s / host_rollup_step {} s. \
                     Choose a multiple of the old steps ({} s, {} s), or give --drop-older to drop them",
                    older.iter().map(|o| o.0.name).collect::<Vec<_>>().join(", "),
                    to.step_s,
                    to.host_step_s,
                    from.step_s,
                    from.host_step_s,
                )));
            }
            for (t, rows, first, last) in &older {
                tx.execute(
                    &format!("DELETE FROM {} WHERE bucket_s < $1", t.name),
                    std::slice::from_ref(&cut),
                )?;
                if let Some(c) = report.tables.get_mut(t.name) {
                    c.rows_dropped = *rows;
                }
                let (a, b) = report.dropped_buckets_s.unwrap_or((*first, *last));
                report.dropped_buckets_s = Some((a.min(*first), b.max(*last)));
            }
            for t in &rebuilt {
                tx.execute(&format!("DELETE FROM {}", t.name), &[])?;
            }
            let indices: Vec<usize> = rebuilt.iter().map(|t| t.index).collect();
            report.raw_windows_replayed = replay(tx, &to, &indices, from_s)?;
            if rebuilt.iter().any(|t| t.step == Step::Base) && marker.is_some() {
                fine_from_s = Some(from_s.max(raw_from_s));
            }
        }
        if change(from.step_s, to.step_s) == Change::Coarser {
            // The bucket holding the marker may now begin before it.
            fine_from_s = marker.map(|m| m.div_ceil(to.step_s) * to.step_s);
        }
        for (name, c) in report.tables.iter_mut() {
            c.rows_after = count(tx, &format!("SELECT COUNT(*) FROM {name}"), &[])?;
        }
        let mut keys = vec![
            ("rollup_step_s", to.step_s),
            ("host_rollup_step_s", to.host_step_s),
        ];
        if let Some(m) = fine_from_s.filter(|m| Some(*m) != marker) {
            keys.push((SERVICE_FINE_FROM_KEY, m));
        }
        for (key, value) in keys {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[Value::Text(key.into()), Value::Text(value.to_string())],
            )?;
        }
        Ok(())
    })?;
    Ok(report)
}

/// Sums every row of `t` into buckets of `step_s` (a multiple of its step).
fn rebucket(tx: &mut dyn Tx, t: &Table, step_s: u64) -> Result<(), AggregatorError> {
    let bucket = format!("(bucket_s / {step_s}) * {step_s}");
    let keys = &t.keys[1..];
    let mut select = vec![format!("{bucket} AS bucket_s")];
    select.extend(keys.iter().map(|k| k.to_string()));
    select.extend(t.sums.iter().map(|s| format!("SUM({s}) AS {s}")));
    let mut group = vec![bucket];
    group.extend(keys.iter().map(|k| k.to_string()));
    let columns: Vec<&str> = t.keys.iter().chain(t.sums).copied().collect();
    tx.batch(&format!(
        "CREATE TEMP TABLE {SCRATCH} AS SELECT {} FROM {} GROUP BY {};\n\
         DELETE FROM {};\n\
         INSERT INTO {} ({cols}) SELECT {cols} FROM {SCRATCH};\n\
         DROP TABLE {SCRATCH};",
        select.join(", "),
        t.name,
        group.join(", "),
        t.name,
        t.name,
        cols = columns.join(", "),
    ))
}

/// Adds the raw windows' pieces in buckets from `from_s` on to the tables
/// `indices`, at `layout`; the windows replayed.
fn replay(
    tx: &mut dyn Tx,
    layout: &RollupLayout,
    indices: &[usize],
    from_s: u64,
) -> Result<u64, AggregatorError> {
    let after_ns = i64::try_from(from_s.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX);
    let mut last = (after_ns, String::new(), String::new(), -1i64);
    let mut replayed = 0u64;
    loop {
        let rows = tx.query(
            "SELECT end_ns, host, agent_instance, seq, payload FROM windows_raw \
             WHERE end_ns > $1 AND (end_ns > $2 OR (end_ns = $2 AND (host > $3 OR (host = $3 AND \
             (agent_instance > $4 OR (agent_instance = $4 AND seq > $5)))))) \
             ORDER BY end_ns, host, agent_instance, seq LIMIT $6",
            &[
                Value::Int(after_ns),
                Value::Int(last.0),
                Value::Text(last.1.clone()),
                Value::Text(last.2.clone()),
                Value::Int(last.3),
                Value::Int(REPLAY_PAGE),
            ],
        )?;
        let Some(tail) = rows.last() else {
            break;
        };
        last = (tail[0].i64(), tail[1].text(), tail[2].text(), tail[3].i64());
        let mut windows = Vec::with_capacity(rows.len());
        for r in &rows {
            let w = v1::WindowReport::decode(r[4].bytes().as_slice()).map_err(|e| {
                AggregatorError::Invalid(format!(
                    "windows_raw ({}, {}, seq {}): cannot decode the stored window: {e}",
                    r[1].text(),
                    r[2].text(),
                    r[3].i64()
                ))
            })?;
            windows.push(w);
        }
        let supplies: Vec<String> = windows
            .iter()
            .map(|w| supply_key(w.supply.as_ref()))
            .collect();
        let mut deltas = Deltas::default();
        for (w, supply) in windows.iter().zip(&supplies) {
            deltas.add_window(w, supply, layout);
        }
        for upsert in deltas.upserts_from(indices, from_s) {
            tx.upsert_later(upsert)?;
        }
        replayed += windows.len() as u64;
    }
    Ok(replayed)
}
