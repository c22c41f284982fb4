//! The check afterwards: a stored migration plan against what happened.
//!
//! The move is carried out at the time the operator gave
//! (`POST /api/v1/plans/{id}/carried-out?at=`), else at the first host step
//! after the plan's range in which the service's share of the scenario's
//! transactions on the target supply rose by at least half the share the
//! plan moves (detected, said so). Before = the plan's own range; after =
//! from the carried-out time (rounded up to a host step) to `to`.
//!
//! Realised: the service's operational + embodied g per transaction of the
//! scenario over all supplies, after against before, with the review's
//! bootstrap interval (periods of one host step); realised g/day saved =
//! (before - after) x its transactions per day after (per day of data:
//! host steps with transactions). Predicted, on the
//! same footing: the plan's g/day saved (and interval) over the service's
//! transactions per day before, as a change per transaction.
use serde::Serialize;
use serde_json::Value;

use super::supplies::{pairs, service_series, Periods, Sums};
use crate::error::AggregatorError;
use crate::review::stats::{compare, Bootstrap, Difference, Estimator};
use crate::store::{Range, Store, StoredPlan};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanCheck {
    pub plan_id: String,
    pub service: String,
    pub scenario: String,
    pub carried_out_unix_s: u64,
    /// `operator` or `detected`.
    pub carried_out_source: String,
    pub before_from_unix_s: u64,
    pub before_to_unix_s: u64,
    pub after_from_unix_s: u64,
    pub after_to_unix_s: u64,
    pub predicted_saving_g_per_day: Option<f64>,
    pub predicted_saving_ci_low_g_per_day: Option<f64>,
    pub predicted_saving_ci_high_g_per_day: Option<f64>,
    /// Predicted change of g per transaction (after - before), over all supplies.
    pub predicted_change_g_per_transaction: Option<f64>,
    pub predicted_change_ci_low: Option<f64>,
    pub predicted_change_ci_high: Option<f64>,
    /// Measured change (after - before) with its interval and verdict.
    pub realised_change_g_per_transaction: Difference,
    pub realised_saving_g_per_day: Option<f64>,
    pub realised_saving_ci_low_g_per_day: Option<f64>,
    pub realised_saving_ci_high_g_per_day: Option<f64>,
    pub transactions_per_day_before: f64,
    pub transactions_per_day_after: f64,
    /// Whether the predicted change lies in the realised interval.
    pub prediction_within_interval: Option<bool>,
    pub notes: Vec<String>,
}

fn invalid(m: String) -> AggregatorError {
    AggregatorError::Invalid(m)
}

fn text<'a>(v: &'a Value, pointer: &str) -> Result<&'a str, AggregatorError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("stored plan has no {pointer}")))
}

fn number(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

/// Per period sums of the service's scenario, all supplies together, and on `to` alone.
fn periods(
    store: &dyn Store,
    range: &Range,
    service: &str,
    scenario: &str,
    target: (&str, &str),
) -> Result<(Periods, Periods), AggregatorError> {
    let series = service_series(&store.supply_service_periods(range, Some(service))?);
    let (mut all, mut on_target) = (Periods::new(), Periods::new());
    for ((id, sc), ps) in series.get(service).into_iter().flatten() {
        if sc != scenario {
            continue;
        }
        let is_target = id.datacenter == target.0 && id.supply == target.1;
        for (p, s) in ps {
            let add = |e: &mut Sums| {
                e.transactions += s.transactions;
                e.carbon_g += s.carbon_g;
                e.operational_g += s.operational_g;
                e.energy_j += s.energy_j;
                e.cpu_ns += s.cpu_ns;
            };
            add(all.entry(*p).or_default());
            if is_target {
                add(on_target.entry(*p).or_default());
            }
        }
    }
    Ok((all, on_target))
}

/// Checks a stored migration plan over `[carried out, to)`.
pub fn check_plan(
    store: &dyn Store,
    stored: &StoredPlan,
    to: u64,
    bootstrap: &Bootstrap,
) -> Result<PlanCheck, AggregatorError> {
    if stored.kind != "migration" {
        return Err(invalid(format!(
            "plan {} is a {} plan: the check afterwards measures migration plans",
            stored.id, stored.kind
        )));
    }
    let plan: Value = serde_json::from_str(&stored.body)
        .map_err(|e| invalid(format!("stored plan {}: {e}", stored.id)))?;
    let service = text(&plan, "/request/service")?.to_string();
    let scenario = text(&plan, "/scenario")?.to_string();
    let target = (
        text(&plan, "/request/to/datacenter")?,
        text(&plan, "/request/to/supply")?,
    );
    let step = store.layout().host_step_s;
    let before_from = number(&plan, "/from_unix_s").unwrap_or(0.0) as u64;
    let before_to = number(&plan, "/to_unix_s").unwrap_or(0.0) as u64;
    let share = number(&plan, "/request/share").unwrap_or(1.0);
    let before = Range {
        from_s: before_from,
        to_s: before_to,
        period_s: step,
    };
    let (all_before, target_before) = periods(store, &before, &service, &scenario, target)?;
    let txn = |p: &Periods| p.values().map(|s| s.transactions).sum::<f64>();
    let mut notes = Vec::new();
    let (carried_out, source) = match stored.carried_out_unix_s {
        Some(t) => (t, "operator".to_string()),
        None => {
            let later = Range {
                from_s: before_to,
                to_s: to.max(before_to + step) / step * step,
                period_s: step,
            };
            let (all_after, target_after) = periods(store, &later, &service, &scenario, target)?;
            let share_before = txn(&target_before) / txn(&all_before).max(1e-300);
            let moved = share * (1.0 - share_before);
            let threshold = share_before + moved / 2.0;
            let found = all_after.iter().find(|(p, s)| {
                s.transactions > 0.0
                    && target_after.get(p).map_or(0.0, |t| t.transactions) / s.transactions
                        >= threshold
            });
            match found {
                Some((p, _)) => (
                    *p,
                    format!(
                        "detected: the first hour in which {service}'s share of {scenario} transactions on the target reached {:.1}% (before: {:.1}%)",
                        threshold * 100.0,
                        share_before * 100.0
                    ),
                ),
                None => {
                    return Err(invalid(format!(
                        "plan {}: not carried out yet (no operator time, and {service}'s share on the target never reached {:.1}%)",
                        stored.id,
                        threshold * 100.0
                    )))
                }
            }
        }
    };
    let after = Range {
        from_s: carried_out.div_ceil(step) * step,
        to_s: to / step * step,
        period_s: step,
    };
    if after.from_s >= after.to_s {
        return Err(invalid(format!(
            "plan {}: nothing measured after it was carried out ({} to {})",
            stored.id, after.from_s, after.to_s
        )));
    }
    let (all_after, _) = periods(store, &after, &service, &scenario, target)?;
    // Days of data: host steps with transactions (hours the range holds but
    // nothing was measured in do not dilute the rate).
    let days = |p: &Periods| {
        (p.values().filter(|s| s.transactions > 0.0).count() as f64 * step as f64 / 86_400.0)
            .max(1e-300)
    };
    let per_day_before = txn(&all_before) / days(&all_before);
    let per_day_after = txn(&all_after) / days(&all_after);
    let realised = compare(
        Estimator::PooledRatio,
        &pairs(&all_before, |s| s.carbon_g),
        &pairs(&all_after, |s| s.carbon_g),
        bootstrap,
    );
    let saving = |d: Option<f64>| d.map(|d| -d * per_day_after);
    let predicted = number(&plan, "/predicted_saving_g_per_day");
    let predicted_low = number(&plan, "/saving_ci_low_g_per_day");
    let predicted_high = number(&plan, "/saving_ci_high_g_per_day");
    let change = |s: Option<f64>| s.map(|s| -s / per_day_before.max(1e-300));
    let predicted_change = change(predicted);
    let within = predicted_change
        .zip(realised.ci_low.zip(realised.ci_high))
        .map(|(p, (lo, hi))| lo <= p && p <= hi);
    notes.push("realised figures are over all supplies the service ran the scenario on; other changes in the same time (releases, load mix, grid) are in them too".to_string());
    Ok(PlanCheck {
        plan_id: stored.id.clone(),
        service,
        scenario,
        carried_out_unix_s: carried_out,
        carried_out_source: source,
        before_from_unix_s: before.from_s,
        before_to_unix_s: before.to_s,
        after_from_unix_s: after.from_s,
        after_to_unix_s: after.to_s,
        predicted_saving_g_per_day: predicted,
        predicted_saving_ci_low_g_per_day: predicted_low,
        predicted_saving_ci_high_g_per_day: predicted_high,
        predicted_change_g_per_transaction: predicted_change,
        predicted_change_ci_low: change(predicted_high),
        predicted_change_ci_high: change(predicted_low),
        realised_saving_g_per_day: saving(realised.difference),
        realised_saving_ci_low_g_per_day: saving(realised.ci_high),
        realised_saving_ci_high_g_per_day: saving(realised.ci_low),
        realised_change_g_per_transaction: realised,
        transactions_per_day_before: per_day_before,
        transactions_per_day_after: per_day_after,
        prediction_within_interval: within,
        notes,
    })
}
