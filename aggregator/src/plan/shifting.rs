//! Time shifting (standard 7.2): when each deferrable job (end-of-day
//! repayment runs, statement generation, risk scoring) should run within
//! its daily window, from each data centre's hourly intensity and measured
//! free capacity.
//!
//! A job is declared in `[[scheduling.deferrable]]`: its service, data
//! centre, daily release and deadline (UTC), the whole hours it must run.
//! From the measured history (`scheduling.history` before the release,
//! supply rollups): its energy per running hour E (the service's dynamic +
//! idle-share J over the hours it used CPU) and the cores it takes (its
//! peak hour), unless given; the data centre's PUE; and, per hour of the
//! day, the free cores under `scheduling.target_utilisation` (the least
//! over the days of target x logical CPUs - busy CPU, the job's own CPU
//! given back). The hours come from the data centre's intensity file
//! (`[[scheduling.intensity]]`), else the measured intensity of the same
//! hour of the day (a persistence forecast, said so).
//!
//! Plan: of the hours in [release, deadline) with an intensity and room
//! for the job's cores, the `hours` with the lowest intensity (earlier on
//! ties; hours need not be contiguous: the job is resumable by the hour).
//! Baseline: the first `hours` hours from the release (run as released).
//! Predicted saving = E x PUE x (sum of baseline intensities - sum of
//! planned) / 3.6e6 g. Embodied carbon does not move with the hour.
//!
//! Its 95% interval comes from the variation of the measured E: the
//! review's bootstrap over the hours the service ran (each hour's J,
//! pooled per running hour, at least two hours), scaled by PUE x the
//! intensity difference / 3.6e6 (the saving is linear in E). A configured
//! E, or a single measured hour, has no interval (said).
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::intensity;
use super::supplies::interval;
use crate::error::AggregatorError;
use crate::review::stats::{Bootstrap, PeriodPair};
use crate::store::{Range, Store};

const CORE_HOUR_NS: f64 = 3.6e12;

/// `[scheduling]` of aggregator.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingConfig {
    pub deferrable: Vec<DeferrableJob>,
    pub intensity: Vec<super::intensity::IntensityFile>,
    /// Utilisation a data centre's hosts may run at with the jobs (0.6).
    pub target_utilisation: f64,
    /// How far back measurements reach (7 days).
    #[serde(with = "agent_common::time_text::serde_duration")]
    pub history: Duration,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        SchedulingConfig {
            deferrable: Vec::new(),
            intensity: Vec::new(),
            target_utilisation: 0.6,
            history: Duration::from_secs(7 * 86_400),
        }
    }
}

/// A deferrable job: runs `hours` whole hours between its daily release and deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferrableJob {
    pub name: String,
    pub service: String,
    pub datacenter: String,
    /// Daily release, `HH:MM` UTC.
    pub release: String,
    /// Daily deadline, `HH:MM` UTC: the first one after the release.
    pub deadline: String,
    pub hours: u32,
    /// Replicas the KEDA scaler asks for in a planned hour (1).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Cores the job takes while it runs (default: measured).
    #[serde(default)]
    pub cores: Option<f64>,
    /// Energy per running hour at the hosts, J (default: measured).
    #[serde(default)]
    pub energy_j_per_hour: Option<f64>,
}

fn one() -> u32 {
    1
}

/// Seconds after midnight of `HH:MM`.
fn time_of_day(text: &str) -> Option<u64> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

impl SchedulingConfig {
    /// Checks every key; the message names it.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.target_utilisation > 0.0 && self.target_utilisation <= 1.0) {
            return Err(format!(
                "scheduling.target_utilisation = {} must be above 0 and at most 1",
                self.target_utilisation
            ));
        }
        if self.history < Duration::from_secs(3600) {
            return Err("scheduling.history must be at least 1h".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for j in &self.deferrable {
            let at = format!("scheduling.deferrable {:?}", j.name);
            if j.name.is_empty() || !names.insert(j.name.as_str()) {
                return Err(format!("{at}: name must be non-empty and unique"));
            }
            let (Some(r), Some(d)) = (time_of_day(&j.release), time_of_day(&j.deadline)) else {
                return Err(format!("{at}: release and deadline are HH:MM (UTC)"));
            };
            let window_h = ((d + 86_400 - r - 1) % 86_400 + 1) / 3600;
            if j.hours == 0 || u64::from(j.hours) > window_h {
                return Err(format!(
                    "{at}: hours = {} must be between 1 and the {window_h} whole hours from release to deadline",
                    j.hours
                ));
            }
            if j.cores.is_some_and(|c| !(c.is_finite() && c > 0.0))
                || j.energy_j_per_hour
                    .is_some_and(|e| !(e.is_finite() && e >= 0.0))
            {
                return Err(format!(
                    "{at}: cores must be > 0 and energy_j_per_hour >= 0"
                ));
            }
        }
        for f in &self.intensity {
            if !intensity::FORMATS.contains(&f.format.as_str()) {
                return Err(format!(
                    "scheduling.intensity {:?}: format {:?} (use {})",
                    f.datacenter,
                    f.format,
                    intensity::FORMATS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedHour {
    pub hour_unix_s: u64,
    pub intensity_g_per_kwh: Option<f64>,
    pub free_cores: Option<f64>,
    pub planned: bool,
    pub baseline: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShiftPlan {
    pub job: DeferrableJob,
    pub window_start_unix_s: u64,
    pub window_end_unix_s: u64,
    pub hours: Vec<PlannedHour>,
    /// Hours (unix s) the job should run in.
    pub planned_hours: Vec<u64>,
    pub baseline_hours: Vec<u64>,
    pub energy_j_per_hour: f64,
    pub energy_source: String,
    pub cores: f64,
    pub pue: f64,
    pub intensity_source: String,
    pub baseline_g: Option<f64>,
    pub planned_g: Option<f64>,
    pub predicted_saving_g: Option<f64>,
    /// 95% interval of E per running hour (J) from its measured variation.
    pub energy_j_per_hour_interval: Option<[f64; 2]>,
    /// 95% interval of the predicted saving (g), from E's.
    pub predicted_saving_interval_g: Option<[f64; 2]>,
    /// Why there is no interval, when there is none.
    pub interval_note: Option<String>,
    pub feasible: bool,
    pub verdict: String,
    pub assumptions: Vec<String>,
}

impl ShiftPlan {
    /// Whether `at` (unix s) falls in a planned hour.
    pub fn active_at(&self, at: u64) -> bool {
        self.planned_hours.contains(&(at / 3600 * 3600))
    }
}

/// The window of `job` in force at `at`: the first [release, deadline)
/// that ends after `at`.
pub fn window(job: &DeferrableJob, at: u64) -> Option<(u64, u64)> {
    let r = time_of_day(&job.release)?;
    let d = time_of_day(&job.deadline)?;
    let length = (d + 86_400 - r - 1) % 86_400 + 1;
    let day = at / 86_400 * 86_400;
    [day - 86_400, day, day + 86_400]
        .into_iter()
        .map(|day| (day + r, day + r + length))
        .find(|(_, end)| *end > at)
}

/// Plans `job`'s window in force at `at`.
pub fn plan_shift(
    store: &dyn Store,
    config: &SchedulingConfig,
    job: &DeferrableJob,
    at: u64,
) -> Result<ShiftPlan, AggregatorError> {
    let (start, end) = window(job, at).ok_or_else(|| {
        AggregatorError::Invalid(format!(
            "job {:?}: release or deadline is not HH:MM",
            job.name
        ))
    })?;
    let step = store.layout().host_step_s;
    let history_to = start / step * step;
    let history_from = history_to.saturating_sub(config.history.as_secs()) / step * step;
    let mut assumptions = Vec::new();
    let hourly = Range {
        from_s: history_from,
        to_s: history_to.max(history_from + step),
        period_s: step,
    };
    // The job's service: energy per running hour, peak cores, CPU per bucket.
    let mut own_cpu: BTreeMap<u64, f64> = BTreeMap::new();
    let mut own_energy: BTreeMap<u64, f64> = BTreeMap::new();
    for r in store.supply_service_periods(&hourly, Some(&job.service))? {
        if r.datacenter == job.datacenter {
            *own_cpu.entry(r.period_start_s).or_default() += r.cpu_ns;
            *own_energy.entry(r.period_start_s).or_default() += r.energy_j + r.idle_energy_j;
        }
    }
    let active: Vec<u64> = own_cpu
        .iter()
        .filter(|(_, c)| **c > 0.0)
        .map(|(h, _)| *h)
        .collect();
    let hours_per_bucket = step as f64 / 3600.0;
    let (energy_j_per_hour, energy_source) = match job.energy_j_per_hour {
        Some(e) => (e, "config: energy_j_per_hour".to_string()),
        None if !active.is_empty() => (
            active.iter().map(|h| own_energy[h]).sum::<f64>()
                / (active.len() as f64 * hours_per_bucket),
            format!(
                "measured: {}'s energy over the {} hour(s) it ran in the {} h before the release",
                job.service,
                active.len() as f64 * hours_per_bucket,
                (history_to - history_from) / 3600
            ),
        ),
        None => {
            return Err(AggregatorError::Invalid(format!(
                "job {:?}: service {:?} has no measured CPU in {} in the history; set energy_j_per_hour and cores",
                job.name, job.service, job.datacenter
            )))
        }
    };
    let cores = job.cores.unwrap_or_else(|| {
        active
            .iter()
            .map(|h| own_cpu[h] / (CORE_HOUR_NS * hours_per_bucket))
            .fold(0.0, f64::max)
    });
    // The data centre: PUE and free cores per hour of the day.
    let mut pue_x_s = 0.0;
    let mut host_s = 0.0;
    let mut by_bucket: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for r in store.supply_periods(&hourly)? {
        if r.datacenter == job.datacenter {
            pue_x_s += r.pue_x_s;
            host_s += r.host_s;
            let e = by_bucket.entry(r.period_start_s).or_default();
            e.0 += r.capacity_cpu_ns;
            e.1 += r.busy_cpu_ns;
        }
    }
    let pue = if host_s > 0.0 { pue_x_s / host_s } else { 1.0 };
    if host_s == 0.0 {
        assumptions.push(format!(
            "no measured hosts in {}: PUE 1 and no capacity limit",
            job.datacenter
        ));
    }
    let mut free: BTreeMap<u64, f64> = BTreeMap::new();
    for (bucket, (capacity, busy)) in &by_bucket {
        let room = (config.target_utilisation * capacity - busy
            + own_cpu.get(bucket).copied().unwrap_or(0.0))
            / (CORE_HOUR_NS * hours_per_bucket);
        let hod = bucket % 86_400 / 3600;
        let e = free.entry(hod).or_insert(f64::INFINITY);
        *e = e.min(room);
    }
    let (series, intensity_source) = intensity::for_hours(
        store,
        &config.intensity,
        &job.datacenter,
        &hourly,
        start,
        end,
    )?;
    let hours: Vec<u64> = (start / 3600 * 3600..end).step_by(3600).collect();
    let intensity_of = |h: u64| series.get(&h).copied();
    let free_of = |h: u64| {
        if by_bucket.is_empty() {
            None
        } else {
            Some(free.get(&(h % 86_400 / 3600)).copied().unwrap_or(0.0))
        }
    };
    let baseline: Vec<u64> = hours.iter().copied().take(job.hours as usize).collect();
    let mut candidates: Vec<u64> = hours
        .iter()
        .copied()
        .filter(|&h| intensity_of(h).is_some() && free_of(h).is_none_or(|f| f >= cores))
        .collect();
    candidates.sort_by(|a, b| {
        intensity_of(*a)
            .unwrap_or(f64::INFINITY)
            .total_cmp(&intensity_of(*b).unwrap_or(f64::INFINITY))
            .then(a.cmp(b))
    });
    let feasible = candidates.len() >= job.hours as usize;
    let mut planned: Vec<u64> = if feasible {
        candidates[..job.hours as usize].to_vec()
    } else {
        Vec::new()
    };
    planned.sort_unstable();
    let grams = |hs: &[u64]| -> Option<f64> {
        let sum: Option<f64> = hs.iter().map(|h| intensity_of(*h)).sum();
        sum.map(|i| energy_j_per_hour * pue * i / 3.6e6)
    };
    let baseline_g = grams(&baseline);
    let planned_g = feasible.then(|| grams(&planned)).flatten();
    let predicted_saving_g = baseline_g.zip(planned_g).map(|(b, p)| b - p);
    // E's interval from the hours the service ran (a configured E has none).
    let (energy_j_per_hour_interval, mut interval_note) = if job.energy_j_per_hour.is_some() {
        (
            None,
            Some("energy_j_per_hour is configured: no measured variation".to_string()),
        )
    } else {
        let per_hour: Vec<PeriodPair> = active
            .iter()
            .map(|h| PeriodPair {
                numerator: own_energy[h],
                denominator: hours_per_bucket,
            })
            .collect();
        let d = interval(&per_hour, &Bootstrap::default());
        match d.ci_low.zip(d.ci_high) {
            Some((lo, hi)) => (Some([lo, hi]), None),
            None => (None, d.reason.clone()),
        }
    };
    let predicted_saving_interval_g = match (energy_j_per_hour_interval, predicted_saving_g) {
        (Some([lo, hi]), Some(_)) if energy_j_per_hour > 0.0 => {
            // The saving is E x (a factor of the hours): the same factor scales E's bounds.
            let factor = predicted_saving_g.unwrap_or(0.0) / energy_j_per_hour;
            let (a, b) = (lo * factor, hi * factor);
            Some([a.min(b), a.max(b)])
        }
        (Some(_), Some(_)) => {
            interval_note = Some("no energy measured per running hour".to_string());
            None
        }
        _ => None,
    };
    let verdict = if !feasible {
        format!(
            "infeasible: only {} hour(s) of the window have an intensity and {:.3} free cores; the job needs {}",
            candidates.len(),
            cores,
            job.hours
        )
    } else if planned == baseline {
        "run as released: no lower-carbon hours within the deadline".to_string()
    } else {
        format!(
            "run at {} UTC instead of from the release",
            planned
                .iter()
                .map(|h| agent_common::time_text::format_unix_s(*h as i64))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    assumptions.extend([
        format!("energy per running hour {energy_j_per_hour:.6} J at the hosts ({energy_source}), the same in every hour"),
        format!("cores while running {cores:.4} ({})", if job.cores.is_some() { "config" } else { "the service's peak hour in the history" }),
        format!("PUE {pue:.4} (the data centre's mean over the history); O = E x intensity x PUE / 3.6e6"),
        format!("free cores per hour of the day: the least over the history of {:.0}% of logical CPUs less busy CPU, the job's own CPU given back", config.target_utilisation * 100.0),
        format!("intensity: {intensity_source}; a forecast's error is not in the saving"),
        "the job is resumable by the hour (planned hours need not be contiguous); embodied carbon does not change with the hour".to_string(),
    ]);
    Ok(ShiftPlan {
        job: job.clone(),
        window_start_unix_s: start,
        window_end_unix_s: end,
        hours: hours
            .iter()
            .map(|&h| PlannedHour {
                hour_unix_s: h,
                intensity_g_per_kwh: intensity_of(h),
                free_cores: free_of(h),
                planned: planned.contains(&h),
                baseline: baseline.contains(&h),
            })
            .collect(),
        planned_hours: planned,
        baseline_hours: baseline,
        energy_j_per_hour,
        energy_source,
        cores,
        pue,
        intensity_source,
        baseline_g,
        planned_g,
        predicted_saving_g,
        energy_j_per_hour_interval,
        predicted_saving_interval_g,
        interval_note,
        feasible,
        verdict,
        assumptions,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn job(release: &str, deadline: &str, hours: u32) -> DeferrableJob {
        DeferrableJob {
            name: "j".into(),
            service: "s".into(),
            datacenter: "dc".into(),
            release: release.into(),
            deadline: deadline.into(),
            hours,
            replicas: 1,
            cores: None,
            energy_j_per_hour: None,
        }
    }

    #[test]
    fn the_window_in_force_wraps_midnight() {
        let day = 20_000 * 86_400;
        let j = job("18:00", "06:00", 3);
        // At 02:00 the window that began yesterday at 18:00 is in force.
        assert_eq!(
            window(&j, day + 2 * 3600),
            Some((day - 6 * 3600, day + 6 * 3600))
        );
        // At 07:00 the next one.
        assert_eq!(
            window(&j, day + 7 * 3600),
            Some((day + 18 * 3600, day + 30 * 3600))
        );
        let config = SchedulingConfig {
            deferrable: vec![job("18:00", "20:00", 3)],
            ..Default::default()
        };
        let e = config.validate().unwrap_err();
        assert!(
            e.contains("hours = 3") && e.contains("2 whole hours"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_parses_when_uncommented() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aggregator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let example: String = text
            .split_once("# [scheduling]")
            .unwrap()
            .1
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config = crate::config::AggregatorConfig::from_toml_str(
            &format!("[scheduling]{example}\n"),
            &path,
        )
        .unwrap();
        let job = &config.scheduling.deferrable[0];
        assert_eq!((job.hours, job.replicas), (3, 4));
        assert_eq!(config.scheduling.intensity[0].format, "carbon_aware");
    }
}
