//! Time as the rollups see it: the bucket lengths fixed when a database is
//! created ([`RollupLayout`]), a queried range in whole buckets ([`Range`]),
//! how a window is split across buckets ([`split_by_time`]), and how long
//! each kind of data is kept ([`Retention`]). The configuration sets these;
//! nothing here reads it.
use std::time::Duration;

use serde::Serialize;

pub const DAY_S: u64 = 86_400;
pub const DAY_NS: u64 = DAY_S * 1_000_000_000;

/// Bucket lengths of the rollups (recorded when the database is created;
/// [`super::restep`] changes them).
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

#[cfg(test)]
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
}
