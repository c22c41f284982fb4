//! The check afterwards of a stored time-shift plan: once its window has
//! passed, when the job's service really ran and what that saved.
//!
//! Ran hours R: the hours of the window in which the service used CPU in
//! its data centre; E_h its energy in hour h (dynamic + idle share J, as
//! the plan measures E). Intensity I(h): the data centre's measured
//! intensity in hour h (the windows' intensity, weighted by host time),
//! else the plan's (said). Baseline: the plan's baseline hours (run at
//! release), at their mean intensity I_B. Realised saving =
//! sum over R of E_h x PUE x (I_B - I(h)) / 3.6e6 g: the same energy, at
//! the baseline hours against the hours it ran in. Its 95% interval is the
//! review's bootstrap over the ran hours (each hour's saving; at least four
//! hours), beside the prediction and its interval from the plan.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::supplies::interval;
use crate::error::AggregatorError;
use crate::review::stats::{Bootstrap, Difference, PeriodPair};
use crate::store::{Range, Store, StoredPlan};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShiftCheck {
    pub plan_id: String,
    pub job: String,
    pub service: String,
    pub datacenter: String,
    pub window_start_unix_s: u64,
    pub window_end_unix_s: u64,
    pub planned_hours: Vec<u64>,
    pub baseline_hours: Vec<u64>,
    /// Hours of the window in which the service used CPU.
    pub ran_hours: Vec<u64>,
    /// Whether it ran in exactly the planned hours.
    pub ran_as_planned: bool,
    pub energy_j: f64,
    pub pue: f64,
    /// Mean intensity of the baseline hours (g/kWh).
    pub baseline_intensity_g_per_kwh: f64,
    pub predicted_saving_g: Option<f64>,
    pub predicted_saving_interval_g: Option<[f64; 2]>,
    pub realised_saving_g: f64,
    /// The bootstrap over the ran hours (its `candidate` is the saving).
    pub realised_saving: Difference,
    /// Whether the predicted saving lies in the realised interval.
    pub prediction_within_interval: Option<bool>,
    pub notes: Vec<String>,
}

fn invalid(m: String) -> AggregatorError {
    AggregatorError::Invalid(m)
}

fn hours_of(plan: &Value, pointer: &str) -> Vec<u64> {
    plan.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Checks a stored time-shift plan once its window has ended (before `to`).
pub fn check_shift(
    store: &dyn Store,
    stored: &StoredPlan,
    to: u64,
    bootstrap: &Bootstrap,
) -> Result<ShiftCheck, AggregatorError> {
    let plan: Value = serde_json::from_str(&stored.body)
        .map_err(|e| invalid(format!("stored plan {}: {e}", stored.id)))?;
    let text = |p: &str| {
        plan.pointer(p)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("stored plan {} has no {p}", stored.id)))
    };
    let number = |p: &str| plan.pointer(p).and_then(Value::as_f64);
    let (job, service, datacenter) = (
        text("/job/name")?,
        text("/job/service")?,
        text("/job/datacenter")?,
    );
    let start = number("/window_start_unix_s").unwrap_or(0.0) as u64;
    let end = number("/window_end_unix_s").unwrap_or(0.0) as u64;
    if to < end {
        return Err(invalid(format!(
            "plan {}: its window ends at {end}; check it after that (to = {to})",
            stored.id
        )));
    }
    let planned_hours = hours_of(&plan, "/planned_hours");
    let baseline_hours = hours_of(&plan, "/baseline_hours");
    let pue = number("/pue").unwrap_or(1.0);
    let planned_intensity: BTreeMap<u64, f64> = plan
        .pointer("/hours")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|h| {
            Some((
                h.get("hour_unix_s")?.as_u64()?,
                h.get("intensity_g_per_kwh")?.as_f64()?,
            ))
        })
        .collect();
    let step = store.layout().host_step_s;
    let range = Range {
        from_s: start / step * step,
        to_s: end.div_ceil(step) * step,
        period_s: 3600.max(step),
    };
    let mut energy: BTreeMap<u64, f64> = BTreeMap::new();
    let mut cpu: BTreeMap<u64, f64> = BTreeMap::new();
    for r in store.supply_service_periods(&range, Some(&service))? {
        if r.datacenter == datacenter {
            *energy.entry(r.period_start_s).or_default() += r.energy_j + r.idle_energy_j;
            *cpu.entry(r.period_start_s).or_default() += r.cpu_ns;
        }
    }
    let ran_hours: Vec<u64> = cpu
        .iter()
        .filter(|(_, c)| **c > 0.0)
        .map(|(h, _)| *h)
        .collect();
    let mut measured: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for r in store.intensity_hours(&Range {
        period_s: store.layout().step_s,
        ..range
    })? {
        if r.datacenter == datacenter {
            let e = measured.entry(r.hour_unix_s).or_default();
            e.0 += r.intensity_x_s;
            e.1 += r.host_s;
        }
    }
    let mut notes = Vec::new();
    let mut from_plan = Vec::new();
    let mut intensity = |h: u64| -> Option<f64> {
        match measured.get(&h).filter(|(_, s)| *s > 0.0) {
            Some((x, s)) => Some(x / s),
            None => {
                from_plan.push(h);
                planned_intensity.get(&h).copied()
            }
        }
    };
    let baseline: Option<Vec<f64>> = baseline_hours.iter().map(|h| intensity(*h)).collect();
    let baseline = baseline.filter(|b| !b.is_empty()).ok_or_else(|| {
        invalid(format!(
            "plan {}: no intensity for its baseline hours",
            stored.id
        ))
    })?;
    let baseline_intensity = baseline.iter().sum::<f64>() / baseline.len() as f64;
    let mut per_hour = Vec::new();
    for h in &ran_hours {
        let i = intensity(*h).ok_or_else(|| {
            invalid(format!(
                "plan {}: no intensity measured or planned for hour {h}",
                stored.id
            ))
        })?;
        per_hour.push(energy[h] * pue * (baseline_intensity - i) / 3.6e6);
    }
    if !from_plan.is_empty() {
        notes.push(format!(
            "no intensity measured in {} hour(s) ({}): the plan's intensity is used there",
            from_plan.len(),
            from_plan
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let n = per_hour.len().max(1) as f64;
    let pairs: Vec<PeriodPair> = per_hour
        .iter()
        .map(|s| PeriodPair {
            numerator: *s,
            denominator: 1.0 / n,
        })
        .collect();
    let realised = interval(&pairs, bootstrap);
    let ran_as_planned = ran_hours == planned_hours;
    let energy_j = ran_hours.iter().map(|h| energy[h]).sum();
    if !ran_as_planned {
        notes.push("the service did not run in exactly the planned hours: the saving is of the hours it ran in".to_string());
    }
    notes.push("the same energy is assumed at the baseline hours; other load of the service in the window counts as the job's".to_string());
    let predicted_saving_g = number("/predicted_saving_g");
    let prediction_within_interval = predicted_saving_g
        .zip(realised.ci_low.zip(realised.ci_high))
        .map(|(p, (lo, hi))| lo <= p && p <= hi);
    Ok(ShiftCheck {
        plan_id: stored.id.clone(),
        job,
        service,
        datacenter,
        window_start_unix_s: start,
        window_end_unix_s: end,
        planned_hours,
        baseline_hours,
        ran_hours,
        ran_as_planned,
        energy_j,
        pue,
        baseline_intensity_g_per_kwh: baseline_intensity,
        predicted_saving_g,
        predicted_saving_interval_g: plan
            .pointer("/predicted_saving_interval_g")
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
        realised_saving_g: per_hour.iter().sum(),
        realised_saving: realised,
        prediction_within_interval,
        notes,
    })
}
