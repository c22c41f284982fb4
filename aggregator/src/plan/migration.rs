//! A migration plan (standard 7.4): move service S (or a share of its
//! traffic) of scenario i from supply A to supply B.
//!
//! Predicted saving per day = share x TA_A/day x (c_A - c_B), c the
//! operational + embodied g per transaction on each supply over the range
//! ([`super::supplies`]), TA_A/day the transactions of i S served on A per
//! day of the range. Its 95% interval is share x TA_A/day x the interval of
//! c_A - c_B (the review's bootstrap over periods; TA_A/day taken as
//! known). No recommendation when that interval includes zero, or when B
//! cannot hold the load.
//!
//! Capacity, hour by hour of the day (UTC): S needs, at hour h, share x
//! its CPU on A in h x (CPU per transaction on B / on A), the most of any
//! day of the range; B has, at hour h, target utilisation x its nominal
//! CPU (logical CPUs x time) minus its busy CPU, the least of any day.
//! Every hour must fit. Sub-hour peaks are not seen (hourly rollups).
use std::collections::BTreeMap;

use serde::Serialize;

use super::supplies::{interval, pairs, service_series, supply_factors, SupplyFactors, SupplyId};
use crate::error::AggregatorError;
use crate::review::stats::{compare, Bootstrap, Difference, Estimator, Verdict};
use crate::store::{Range, Store};

/// CPU-ns in one core-hour.
const CORE_HOUR_NS: f64 = 3.6e12;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationRequest {
    pub service: String,
    /// Default: the service's only scenario on A.
    pub scenario: Option<String>,
    pub from: SupplyId,
    pub to: SupplyId,
    /// Share of S's traffic on A that moves (0 < share <= 1).
    pub share: f64,
    /// Utilisation B may run at (0 < t <= 1).
    pub target_utilisation: f64,
    pub bootstrap: Bootstrap,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourCapacity {
    /// Hour of the day, UTC (0-23).
    pub hour: u32,
    /// Cores S would need on B in this hour (its peak over the days).
    pub needed_cores: f64,
    /// Cores free on B under the target utilisation (its least over the days).
    pub free_cores: f64,
    pub fits: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapacityCheck {
    pub target_utilisation: f64,
    pub fits: bool,
    pub hours: Vec<HourCapacity>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationPlan {
    pub request: MigrationRequest,
    pub scenario: String,
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub from_g_per_transaction: Difference,
    pub to_g_per_transaction: Difference,
    /// c_B - c_A per transaction with its interval and verdict.
    pub difference_g_per_transaction: Difference,
    pub from_factors: SupplyFactors,
    pub to_factors: SupplyFactors,
    /// Transactions of the scenario S served on A per day of the range.
    pub transactions_per_day: f64,
    pub moved_transactions_per_day: f64,
    pub predicted_saving_g_per_day: Option<f64>,
    pub saving_ci_low_g_per_day: Option<f64>,
    pub saving_ci_high_g_per_day: Option<f64>,
    pub capacity: CapacityCheck,
    pub recommended: bool,
    /// Why (or why not), in one sentence.
    pub verdict: String,
    pub assumptions: Vec<String>,
}

fn invalid(message: String) -> AggregatorError {
    AggregatorError::Invalid(message)
}

/// Plans the move from what the range measured (hourly periods).
pub fn plan_migration(
    store: &dyn Store,
    range: &Range,
    request: &MigrationRequest,
) -> Result<MigrationPlan, AggregatorError> {
    if !(request.share > 0.0 && request.share <= 1.0) {
        return Err(invalid(format!(
            "share {} must be above 0 and at most 1",
            request.share
        )));
    }
    if !(request.target_utilisation > 0.0 && request.target_utilisation <= 1.0) {
        return Err(invalid(format!(
            "target_utilisation {} must be above 0 and at most 1",
            request.target_utilisation
        )));
    }
    if request.from == request.to {
        return Err(invalid("from and to are the same supply".to_string()));
    }
    let step = store.layout().host_step_s;
    let hourly = Range {
        period_s: step,
        ..*range
    };
    let rows = store.supply_service_periods(&hourly, Some(&request.service))?;
    let series = service_series(&rows);
    let empty = Default::default();
    let by_supply = series.get(&request.service).unwrap_or(&empty);
    let scenario = match &request.scenario {
        Some(s) => s.clone(),
        None => {
            let on_a: Vec<&String> = by_supply
                .keys()
                .filter(|(id, _)| id == &request.from)
                .map(|(_, s)| s)
                .collect();
            match on_a.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(invalid(format!(
                        "service {:?} has no transactions on {} in the range",
                        request.service, request.from
                    )))
                }
                many => {
                    return Err(invalid(format!(
                    "service {:?} serves several scenarios on {} ({}): choose one with scenario=",
                    request.service,
                    request.from,
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
                }
            }
        }
    };
    let periods = |id: &SupplyId| by_supply.get(&(id.clone(), scenario.clone()));
    let a = periods(&request.from).ok_or_else(|| {
        invalid(format!(
            "service {:?} has no {scenario} figures on {}",
            request.service, request.from
        ))
    })?;
    let b = periods(&request.to).ok_or_else(|| {
        invalid(format!(
            "service {:?} never ran {scenario} on {}: no measured per-transaction figure there (run a share of it there first)",
            request.service, request.to
        ))
    })?;
    let bs = &request.bootstrap;
    let diff = compare(
        Estimator::PooledRatio,
        &pairs(a, |s| s.carbon_g),
        &pairs(b, |s| s.carbon_g),
        bs,
    );
    let days = (range.to_s - range.from_s) as f64 / 86_400.0;
    let transactions_per_day = a.values().map(|s| s.transactions).sum::<f64>() / days;
    let moved = transactions_per_day * request.share;
    let saving = |d: Option<f64>| d.map(|d| -d * moved);

    // Capacity, hour of day by hour of day.
    let cpu_ratio = {
        let per = |p: &BTreeMap<u64, super::supplies::Sums>| {
            let t: f64 = p.values().map(|s| s.transactions).sum();
            (t > 0.0).then(|| p.values().map(|s| s.cpu_ns).sum::<f64>() / t)
        };
        match (per(a), per(b)) {
            (Some(ca), Some(cb)) if ca > 0.0 => cb / ca,
            _ => 1.0,
        }
    };
    let mut need_ns: BTreeMap<u64, f64> = BTreeMap::new();
    for r in &rows {
        if r.datacenter == request.from.datacenter && r.supply == request.from.supply {
            *need_ns.entry(r.period_start_s).or_default() += r.cpu_ns;
        }
    }
    let mut needed = [0.0f64; 24];
    for (hour_s, ns) in &need_ns {
        let h = ((hour_s % 86_400) / 3600) as usize;
        needed[h] =
            needed[h].max(ns * request.share * cpu_ratio / (step as f64 / 3600.0) / CORE_HOUR_NS);
    }
    let mut free = [f64::INFINITY; 24];
    let mut seen = [false; 24];
    for r in store.supply_periods(&hourly)? {
        if r.datacenter == request.to.datacenter && r.supply == request.to.supply {
            let h = ((r.period_start_s % 86_400) / 3600) as usize;
            let room = (request.target_utilisation * r.capacity_cpu_ns - r.busy_cpu_ns).max(0.0)
                / (step as f64 / 3600.0)
                / CORE_HOUR_NS;
            free[h] = free[h].min(room);
            seen[h] = true;
        }
    }
    let hours: Vec<HourCapacity> = (0..24)
        .filter(|&h| needed[h] > 0.0 || seen[h])
        .map(|h| {
            let free_cores = if seen[h] { free[h] } else { 0.0 };
            HourCapacity {
                hour: h as u32,
                needed_cores: needed[h],
                free_cores,
                fits: needed[h] <= free_cores,
            }
        })
        .collect();
    let capacity = CapacityCheck {
        target_utilisation: request.target_utilisation,
        fits: hours.iter().all(|h| h.fits),
        hours,
    };
    let (recommended, verdict) = match (diff.verdict, capacity.fits) {
        (Verdict::Lower, true) => (true, format!(
            "move: {} per transaction is lower on {} and the interval of the difference excludes zero; {} holds the load at every hour under {:.0}% utilisation",
            scenario, request.to, request.to, request.target_utilisation * 100.0
        )),
        (Verdict::Lower, false) => (false, format!(
            "no move: cheaper per transaction on {}, but it lacks the capacity at hour(s) {} (UTC) under {:.0}% utilisation",
            request.to,
            capacity.hours.iter().filter(|h| !h.fits).map(|h| h.hour.to_string()).collect::<Vec<_>>().join(", "),
            request.target_utilisation * 100.0
        )),
        (Verdict::Higher, _) => (false, format!(
            "no move: {} costs more per transaction on {} (interval excludes zero)",
            scenario, request.to
        )),
        (Verdict::NoDetectableDifference, _) => (false, "no recommendation: the interval of the saving includes zero (the difference is within noise)".to_string()),
        (Verdict::InsufficientData, _) => (false, "no recommendation: fewer than two periods with transactions on a supply".to_string()),
    };
    let factors = supply_factors(&store.supply_periods(range)?);
    Ok(MigrationPlan {
        request: request.clone(),
        scenario: scenario.clone(),
        from_unix_s: range.from_s,
        to_unix_s: range.to_s,
        from_g_per_transaction: interval(&pairs(a, |s| s.carbon_g), bs),
        to_g_per_transaction: interval(&pairs(b, |s| s.carbon_g), bs),
        predicted_saving_g_per_day: saving(diff.difference),
        saving_ci_low_g_per_day: saving(diff.ci_high),
        saving_ci_high_g_per_day: saving(diff.ci_low),
        difference_g_per_transaction: diff,
        from_factors: factors.get(&request.from).cloned().unwrap_or_default(),
        to_factors: factors.get(&request.to).cloned().unwrap_or_default(),
        transactions_per_day,
        moved_transactions_per_day: moved,
        capacity,
        recommended,
        verdict,
        assumptions: vec![
            format!("the per-transaction figures measured on each supply over the range hold after the move (same release, same request mix); {scenario} transactions of a host are split among the services that ran {scenario} there by CPU share"),
            format!("{:.6} transactions of {scenario} per day on {} as measured, {:.0}% of them move", transactions_per_day, request.from, request.share * 100.0),
            "grid intensity and PUE of each supply stay as measured over the range; the figure per transaction includes the idle energy and embodied share charged to the service today".to_string(),
            format!("capacity: the service's CPU per hour on the source x share x CPU per transaction on the target / on the source ({cpu_ratio:.4}), its peak over the days of each hour of the day, against the target's logical CPUs x {:.0}% minus its busy CPU, the least over the days; sub-hour peaks are not seen", request.target_utilisation * 100.0),
            "the saving's interval treats transactions per day as known; it is the bootstrap interval of the per-transaction difference times the moved transactions per day".to_string(),
        ],
    })
}
