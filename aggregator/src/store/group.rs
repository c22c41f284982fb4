//! Group commit: the batches that ingest streams hand to the store at the
//! same time are written by one writer in one transaction.
//!
//! Every commit adds to the same few rollup rows (the fleet's and each
//! scenario's current minute and hour, each service's hour, ...). Concurrent
//! transactions on PostgreSQL each lock those rows until they commit, so
//! they queue on each other's row locks (`Lock: transactionid` in
//! `pg_stat_activity`), and every commit leaves one more version of each hot
//! row behind, which the queries' snapshots keep from being pruned. With one
//! writer and the waiting batches merged, each hot row is updated once per
//! transaction, whatever the number of streams.
//!
//! No thread of its own: a caller that finds the writer idle becomes it,
//! takes everything queued (up to [`MAX_WINDOWS`]), commits, hands each
//! caller its outcomes, and leaves; a waiting caller then takes over. A
//! merged transaction that fails is retried batch by batch, so one batch's
//! error is reported to that batch only.
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use sci_proto::v1;

use super::backend::Backend;
use super::commit::commit_windows;
use super::rows::CommitOutcome;
use crate::error::AggregatorError;

/// At most this many windows in one merged transaction (a batch larger
/// than this goes alone).
pub const MAX_WINDOWS: usize = 1024;

#[derive(Default)]
struct State {
    queue: Vec<(u64, Vec<v1::WindowReport>)>,
    writing: bool,
    next_id: u64,
    done: HashMap<u64, Result<Vec<CommitOutcome>, AggregatorError>>,
}

#[derive(Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    wake: Condvar,
}

/// Hands the group's callers their results when the writer is done, and
/// an error if it panicked, so no caller waits for good.
struct Writing<'a> {
    group_commit: &'a GroupCommit,
    ids: Vec<u64>,
    results: Option<Vec<Result<Vec<CommitOutcome>, AggregatorError>>>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.group_commit.state);
        state.writing = false;
        let mut results = self.results.take().unwrap_or_default().into_iter();
        for id in &self.ids {
            let result = results.next().unwrap_or_else(|| {
                Err(AggregatorError::Postgres(
                    "the store's writer failed during this commit".into(),
                ))
            });
            state.done.insert(*id, result);
        }
        self.group_commit.wake.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupCommit {
    /// Commits `windows` with whatever other batches are waiting; blocks
    /// until they are committed (or failed).
    pub fn commit(
        &self,
        db: &dyn Backend,
        windows: &[v1::WindowReport],
    ) -> Result<Vec<CommitOutcome>, AggregatorError> {
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = lock(&self.state);
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push((id, windows.to_vec()));
        loop {
            if let Some(result) = state.done.remove(&id) {
                return result;
            }
            if state.writing {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            state.writing = true;
            let mut taken = 0;
            let mut count = 0;
            for (_, w) in &state.queue {
                if count > 0 && count + w.len() > MAX_WINDOWS {
                    break;
                }
                count += w.len();
                taken += 1;
            }
            let group: Vec<(u64, Vec<v1::WindowReport>)> = state.queue.drain(..taken).collect();
            drop(state);
            let mut writing = Writing {
                group_commit: self,
                ids: group.iter().map(|(id, _)| *id).collect(),
                results: None,
            };
            writing.results = Some(write_group(db, &group));
            drop(writing);
            state = lock(&self.state);
        }
    }
}

fn write_group(
    db: &dyn Backend,
    group: &[(u64, Vec<v1::WindowReport>)],
) -> Vec<Result<Vec<CommitOutcome>, AggregatorError>> {
    if group.len() == 1 {
        return vec![commit_windows(db, &group[0].1)];
    }
    let merged: Vec<v1::WindowReport> = group.iter().flat_map(|(_, w)| w.iter().cloned()).collect();
    match commit_windows(db, &merged) {
        Ok(outcomes) => {
            let mut rest = &outcomes[..];
            group
                .iter()
                .map(|(_, w)| {
                    let (mine, others) = rest.split_at(w.len());
                    rest = others;
                    Ok(mine.to_vec())
                })
                .collect()
        }
        Err(e) => {
            tracing::warn!(
                "store: a commit of {} merged batches failed ({e}); committing them one by one",
                group.len()
            );
            group.iter().map(|(_, w)| commit_windows(db, w)).collect()
        }
    }
}
