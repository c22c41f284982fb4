//! The commit shared by every backend: dedupe against `window_keys`, the
//! raw windows appended, their additions to the rollups ([`super::deltas`])
//! and the hosts' spans upserted, all in one transaction.
//!
//! A host's windows may not overlap: the host-seconds stored in each of its
//! host buckets (`host_rollup.host_s`) plus those of the new windows may not
//! exceed the bucket's length (by more than [`OVERLAP_TOLERANCE_S`]), so a
//! host's coverage never exceeds 100%. A window that would is an
//! [`CommitOutcome::Overlap`] and is not stored. The check reads the rows
//! the commit adds to, so its cost does not grow with history. Two
//! aggregators committing windows of one host at the same moment (on one
//! PostgreSQL) each see the other's only once committed: that race is not
//! closed.
use std::collections::{BTreeMap, BTreeSet};

use sci_proto::v1;

use super::backend::{values_clause, Backend, Column, Upsert, Value, ROWS_PER_STATEMENT};
use super::deltas::Deltas;
use super::encoding::{canonical_encoding, content_digest};
use super::layout::{split_by_time, DAY_NS};
use super::rows::{CommitOutcome, HostSpan};
use super::supply::{supply_attributes, supply_key};
use super::tables::or_none;
use crate::error::AggregatorError;

fn key_key(w: &v1::WindowReport) -> (String, String, u64) {
    (w.host.clone(), w.agent_instance.clone(), w.seq)
}

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
        let mut inserted: BTreeSet<(String, String, u64)> = BTreeSet::new();
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
        let overlapping = overlaps(tx, windows, &stored, layout.host_step_s)?;
        if !overlapping.is_empty() {
            for &i in &overlapping {
                let w = &windows[i];
                tx.execute(
                    "DELETE FROM window_keys WHERE host = $1 AND agent_instance = $2 AND seq = $3",
                    &[
                        Value::Text(w.host.clone()),
                        Value::Text(w.agent_instance.clone()),
                        Value::Int(w.seq as i64),
                    ],
                )?;
                outcomes[i] = CommitOutcome::Overlap;
            }
            stored.retain(|i| !overlapping.contains(i));
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
        // A batch holds one host's windows, nearly always of one supply: its
        // key and attributes are made once, not per window.
        let mut supplies: Vec<String> = Vec::with_capacity(stored.len());
        let mut attrs: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut last: Option<(Option<&v1::ResourceSupply>, usize)> = None;
        for &i in &stored {
            let supply = windows[i].supply.as_ref();
            let key = match last {
                Some((prev, k)) if prev == supply => supplies[k].clone(),
                _ => {
                    let key = supply_key(supply);
                    if !attrs.keys().any(|(s, _)| *s == key) {
                        for (attr, value) in supply_attributes(supply) {
                            attrs.insert((key.clone(), attr), value);
                        }
                    }
                    key
                }
            };
            last = Some((supply, supplies.len()));
            supplies.push(key);
        }
        let mut deltas = Deltas::default();
        let mut spans: BTreeMap<String, HostSpan> = BTreeMap::new();
        for (&i, supply) in stored.iter().zip(&supplies) {
            let w = &windows[i];
            deltas.add_window(w, supply, &layout);
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
        for upsert in deltas.upserts() {
            tx.upsert_later(upsert)?;
        }
        if !attrs.is_empty() {
            tx.upsert_later(Upsert {
                table: "supply_attrs",
                columns: vec![
                    (
                        "supply",
                        Column::Text(attrs.keys().map(|(s, _)| s.clone()).collect()),
                    ),
                    (
                        "attr",
                        Column::Text(attrs.keys().map(|(_, a)| a.clone()).collect()),
                    ),
                    ("value", Column::Text(attrs.values().cloned().collect())),
                ],
                conflict_keys: &["supply", "attr"],
                on_conflict: "value = excluded.value".to_string(),
            })?;
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

/// Coverage of a host bucket may exceed its length by this much (rounding
/// of the seconds split across buckets is far below it).
pub const OVERLAP_TOLERANCE_S: f64 = 0.001;

/// The new windows (indices into `windows`, in order) that would make their
/// host cover more than a whole host bucket, counting what is stored and
/// the new windows before them.
fn overlaps(
    tx: &mut dyn super::backend::Tx,
    windows: &[v1::WindowReport],
    new: &[usize],
    host_step_s: u64,
) -> Result<BTreeSet<usize>, AggregatorError> {
    let mut covered: BTreeMap<(&str, u64), f64> = BTreeMap::new();
    let mut span: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for &i in new {
        let w = &windows[i];
        for (bucket, _, _) in split_by_time(w.start_unix_ns, w.end_unix_ns, host_step_s) {
            let e = span.entry(&w.host).or_insert((bucket, bucket));
            e.0 = e.0.min(bucket);
            e.1 = e.1.max(bucket);
        }
    }
    for (host, (first, last)) in &span {
        let rows = tx.query(
            "SELECT bucket_s, SUM(host_s) FROM host_rollup WHERE host = $1 AND bucket_s >= $2 AND bucket_s <= $3 GROUP BY bucket_s",
            &[
                Value::Text(host.to_string()),
                Value::Int(*first as i64),
                Value::Int(*last as i64),
            ],
        )?;
        for row in rows {
            covered.insert((host, row[0].i64() as u64), row[1].f64());
        }
    }
    let mut out = BTreeSet::new();
    for &i in new {
        let w = &windows[i];
        let parts = split_by_time(w.start_unix_ns, w.end_unix_ns, host_step_s);
        let over = parts.iter().any(|(bucket, _, seconds)| {
            covered
                .get(&(w.host.as_str(), *bucket))
                .copied()
                .unwrap_or(0.0)
                + seconds
                > host_step_s as f64 + OVERLAP_TOLERANCE_S
        });
        if over {
            out.insert(i);
            continue;
        }
        for (bucket, _, seconds) in parts {
            *covered.entry((w.host.as_str(), bucket)).or_default() += seconds;
        }
    }
    Ok(out)
}
