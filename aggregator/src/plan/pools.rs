//! Consolidation per pool over a week (standard 7.2): pools are supplies
//! grouped by an attribute (`label.pool` by default), read from the supply
//! rollups; zombie hosts from the host rollups.
//!
//! Per pool and hour h: hosts_h = host-seconds / 3600, cores per host =
//! capacity / host-seconds, busy cores = busy CPU-ns / 3.6e12. Per hour of
//! the week (0 = Monday 00:00 UTC) the most busy cores and hosts of the
//! range's weeks; hosts needed = ceil(busy / (cores per host x target)),
//! at least 1; hosts to release = whole hosts - needed. Idle power per
//! host: the intercept of the least-squares line of power per host
//! (energy / host-seconds) against utilisation over the pool's hours (a
//! released host stops drawing it; the load and its dynamic energy move).
//! Saving per hour = released x idle W x 3600 J, at the pool's measured
//! intensity x PUE. Peak and valley: the hours of the week with the most
//! and the fewest busy cores.
//!
//! A zombie host is on (it reports), serves no transactions and is below
//! `zombie_max_utilisation` for at least `zombie_hours` consecutive hours;
//! each such run is listed with the energy and carbon it drew (measured).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::AggregatorError;
use crate::review::consolidation::hosts_needed;
use crate::store::{Range, Store, SupplyRow};

const HOUR_S: u64 = 3600;
/// 1970-01-01 was a Thursday: its 00:00 is hour 72 of a Monday-based week.
const EPOCH_HOUR_OF_WEEK: u64 = 72;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolOptions {
    /// The supply attribute that names a pool (`label.pool`).
    pub group_by: String,
    pub target_utilisation: f64,
    pub zombie_hours: u32,
    pub zombie_max_utilisation: f64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            group_by: "label.pool".into(),
            target_utilisation: 0.6,
            zombie_hours: 24,
            zombie_max_utilisation: 0.05,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeekHour {
    /// 0 = Monday 00:00 UTC.
    pub hour_of_week: u32,
    /// The most busy cores in this hour of the range's weeks.
    pub busy_cores: f64,
    /// The most hosts reporting in it.
    pub hosts: f64,
    pub hosts_needed: u32,
    pub hosts_to_release: u32,
    pub saving_j: f64,
    pub saving_g: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolWeek {
    pub datacenter: String,
    pub pool: String,
    pub cores_per_host: f64,
    pub idle_power_w: f64,
    pub idle_power_source: String,
    pub intensity_g_per_kwh: f64,
    pub pue: f64,
    pub peak_hour_of_week: u32,
    pub peak_busy_cores: f64,
    pub valley_hour_of_week: u32,
    pub valley_busy_cores: f64,
    pub peak_to_valley: Option<f64>,
    pub hours: Vec<WeekHour>,
    pub released_host_hours_per_week: f64,
    pub saving_j_per_week: f64,
    pub saving_g_per_week: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZombieRun {
    pub datacenter: String,
    pub host: String,
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub hours: u32,
    pub utilisation: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    /// Operational + embodied g of the host in those hours.
    pub carbon_g: f64,
    /// Whether the run reaches the end of the range (the host is a zombie now).
    pub ongoing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolConsolidation {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub options: PoolOptions,
    pub pools: Vec<PoolWeek>,
    pub zombies: Vec<ZombieRun>,
    pub assumptions: Vec<String>,
}

/// Idle power per host: the intercept at utilisation 0 of the
/// least-squares line of power per host against utilisation.
fn idle_power(points: &[(f64, f64)]) -> (f64, String) {
    let n = points.len() as f64;
    if points.is_empty() {
        return (0.0, "no hours measured".into());
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var <= 1e-12 {
        return (
            my,
            format!("mean power per host over {n} hour(s) of one utilisation (an upper bound of idle power)"),
        );
    }
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = cov / var;
    (
        (my - slope * mx).max(0.0),
        format!("intercept of the least-squares line of power per host against utilisation over {n} hour(s) ({} W per unit of utilisation)", crate::figures::sig4(slope)),
    )
}

fn pool_week(datacenter: &str, pool: &str, rows: &[&SupplyRow], target: f64) -> PoolWeek {
    let sum = |f: fn(&SupplyRow) -> f64| rows.iter().map(|r| f(r)).sum::<f64>();
    let host_s = sum(|r| r.host_s);
    let cores_per_host = if host_s > 0.0 {
        sum(|r| r.capacity_cpu_ns) / 1e9 / host_s
    } else {
        0.0
    };
    let (intensity, pue) = if host_s > 0.0 {
        (
            sum(|r| r.intensity_x_s) / host_s,
            sum(|r| r.pue_x_s) / host_s,
        )
    } else {
        (0.0, 1.0)
    };
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.host_s > 0.0 && r.capacity_cpu_ns > 0.0)
        .map(|r| (r.busy_cpu_ns / r.capacity_cpu_ns, r.energy_j / r.host_s))
        .collect();
    let (idle_w, idle_source) = idle_power(&points);
    let mut week: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for r in rows {
        let how = ((r.period_start_s / HOUR_S + EPOCH_HOUR_OF_WEEK) % 168) as u32;
        let e = week.entry(how).or_default();
        e.0 = e.0.max(r.busy_cpu_ns / 3.6e12);
        e.1 = e.1.max(r.host_s / HOUR_S as f64);
    }
    let g_per_j = intensity * pue / 3.6e6;
    let hours: Vec<WeekHour> = week
        .into_iter()
        .map(|(how, (busy, hosts))| {
            let whole = (hosts + 1e-6).floor() as usize;
            let needed = hosts_needed(busy, cores_per_host, target).min(whole.max(1));
            let release = whole.saturating_sub(needed);
            let saving_j = release as f64 * idle_w * HOUR_S as f64;
            WeekHour {
                hour_of_week: how,
                busy_cores: busy,
                hosts,
                hosts_needed: needed as u32,
                hosts_to_release: release as u32,
                saving_j,
                saving_g: saving_j * g_per_j,
            }
        })
        .collect();
    // The first hour of the week with the most (fewest) busy cores.
    let peak = hours
        .iter()
        .reduce(|a, b| if b.busy_cores > a.busy_cores { b } else { a });
    let valley = hours
        .iter()
        .reduce(|a, b| if b.busy_cores < a.busy_cores { b } else { a });
    let (peak_how, peak_busy) = peak.map_or((0, 0.0), |h| (h.hour_of_week, h.busy_cores));
    let (valley_how, valley_busy) = valley.map_or((0, 0.0), |h| (h.hour_of_week, h.busy_cores));
    PoolWeek {
        datacenter: datacenter.to_string(),
        pool: pool.to_string(),
        cores_per_host,
        idle_power_w: idle_w,
        idle_power_source: idle_source,
        intensity_g_per_kwh: intensity,
        pue,
        peak_hour_of_week: peak_how,
        peak_busy_cores: peak_busy,
        valley_hour_of_week: valley_how,
        valley_busy_cores: valley_busy,
        peak_to_valley: (valley_busy > 0.0).then(|| peak_busy / valley_busy),
        released_host_hours_per_week: hours.iter().map(|h| f64::from(h.hosts_to_release)).sum(),
        saving_j_per_week: hours.iter().map(|h| h.saving_j).sum(),
        saving_g_per_week: hours.iter().map(|h| h.saving_g).sum(),
        hours,
    }
}

/// The pools' week and the zombie hosts over `[from_s, to_s)`.
pub fn plan_pools(
    store: &dyn Store,
    from_s: u64,
    to_s: u64,
    options: &PoolOptions,
) -> Result<PoolConsolidation, AggregatorError> {
    if !(options.target_utilisation > 0.0 && options.target_utilisation <= 1.0) {
        return Err(AggregatorError::Invalid(format!(
            "target_utilisation = {} must be above 0 and at most 1",
            options.target_utilisation
        )));
    }
    if options.zombie_hours == 0 {
        return Err(AggregatorError::Invalid(
            "zombie_hours must be at least 1".into(),
        ));
    }
    let layout = store.layout();
    if !HOUR_S.is_multiple_of(layout.host_step_s) {
        return Err(AggregatorError::Invalid(format!(
            "pools are planned by the hour: host_rollup_step ({} s) must divide an hour",
            layout.host_step_s
        )));
    }
    let from = from_s / HOUR_S * HOUR_S;
    let to = to_s.div_ceil(HOUR_S) * HOUR_S;
    let hourly = Range::new(from, to.max(from + HOUR_S), HOUR_S, &layout)
        .map_err(AggregatorError::Invalid)?;
    let rows = store.supply_group_periods(&hourly, &options.group_by)?;
    let mut by_pool: BTreeMap<(&str, &str), Vec<&SupplyRow>> = BTreeMap::new();
    for r in &rows {
        by_pool
            .entry((r.datacenter.as_str(), r.supply.as_str()))
            .or_default()
            .push(r);
    }
    let pools = by_pool
        .into_iter()
        .map(|((dc, pool), rows)| pool_week(dc, pool, &rows, options.target_utilisation))
        .collect();
    // Zombies: runs of consecutive idle hours without transactions.
    let mut by_host: BTreeMap<String, Vec<crate::store::HostPeriodRow>> = BTreeMap::new();
    for r in store.host_periods(&hourly)? {
        by_host.entry(r.row.host.clone()).or_default().push(r);
    }
    let mut zombies = Vec::new();
    for (host, mut hours) in by_host {
        hours.sort_by_key(|r| r.period_start_s);
        let mut run: Vec<&crate::store::HostPeriodRow> = Vec::new();
        let close = |run: &mut Vec<&crate::store::HostPeriodRow>, zombies: &mut Vec<ZombieRun>| {
            if run.len() >= options.zombie_hours as usize {
                let busy: f64 = run.iter().map(|r| r.row.busy_cpu_ns).sum();
                let all: f64 = run
                    .iter()
                    .map(|r| r.row.busy_cpu_ns + r.row.idle_cpu_ns)
                    .sum();
                let last = run[run.len() - 1].period_start_s + HOUR_S;
                zombies.push(ZombieRun {
                    datacenter: run[0].row.datacenter.clone(),
                    host: host.clone(),
                    from_unix_s: run[0].period_start_s,
                    to_unix_s: last,
                    hours: run.len() as u32,
                    utilisation: if all > 0.0 { busy / all } else { 0.0 },
                    energy_j: run.iter().map(|r| r.row.energy_j).sum(),
                    idle_energy_j: run.iter().map(|r| r.row.idle_energy_j).sum(),
                    carbon_g: run.iter().map(|r| r.row.carbon_g + r.row.embodied_g).sum(),
                    ongoing: last >= to,
                });
            }
            run.clear();
        };
        for r in &hours {
            let all = r.row.busy_cpu_ns + r.row.idle_cpu_ns;
            let idle = r.row.host_s > 0.0
                && r.row.transactions <= 0.0
                && (all <= 0.0 || r.row.busy_cpu_ns / all < options.zombie_max_utilisation);
            let follows = run
                .last()
                .is_none_or(|p| p.period_start_s + HOUR_S == r.period_start_s);
            if !idle || !follows {
                close(&mut run, &mut zombies);
            }
            if idle {
                run.push(r);
            }
        }
        close(&mut run, &mut zombies);
    }
    Ok(PoolConsolidation {
        from_unix_s: from,
        to_unix_s: to,
        options: options.clone(),
        pools,
        zombies,
        assumptions: vec![
            format!("a pool is the supplies sharing {} (supply rollups); its hosts are interchangeable", options.group_by),
            "per hour of the week, the most busy cores and hosts over the range's weeks: the release holds in every week seen".into(),
            format!("hosts needed: busy cores / (cores per host x {:.0}%), rounded up, at least 1; the load of a released host and its dynamic energy move to the others", options.target_utilisation * 100.0),
            "a released host draws nothing: saving = released hosts x idle power per host x 1 h, at the pool's mean intensity x PUE".into(),
            format!("zombie: reporting, no transactions and utilisation below {:.0}% for at least {} consecutive hour(s) (host rollups); its energy and carbon in those hours are measured", options.zombie_max_utilisation * 100.0, options.zombie_hours),
            "sub-hour peaks are not seen".into(),
        ],
    })
}
