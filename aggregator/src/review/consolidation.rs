//! A consolidation plan per data centre, from what was measured: each host
//! pool's (hosts grouped by the service with most CPU on them) hourly
//! busy-CPU curve over the range, its peak-to-valley ratio, the hosts each
//! hour needs at a target utilisation, and what powering the others down in
//! those hours would save per day. Zombie hosts (no completed transactions,
//! utilisation below a threshold over the range) come first: the whole of
//! their time is saved.
//!
//! For hour h of a pool: busy_cores_h = sum of the pool's busy CPU-ns in h /
//! 3.6e12; hosts_needed_h = max(1, ceil(busy_cores_h / (target x cores per
//! host))); freed_h = hosts reporting in h - hosts_needed_h. Energy saved =
//! sum freed_h x idle power x 1 h (the load moves, its dynamic energy stays;
//! a powered-down host stops drawing idle power). O saved = energy (kWh) x
//! grid intensity x PUE of the data centre over the range; M = freed
//! host-hours x the hosts' embodied share per hour (TE x 1 h / EL x RR/ToR),
//! which is saved only if the freed capacity is retired or given other work.
//! Per day = over the range / its length in days.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::AggregatorError;
use crate::figures::percent;
use crate::store::{HostPeriodRow, Range, Store};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ConsolidationOptions {
    /// Utilisation the remaining hosts may run at (0.6).
    pub target_utilisation: f64,
    /// A host with no transactions below this utilisation is a zombie (0.05).
    pub zombie_max_utilisation: f64,
}

impl Default for ConsolidationOptions {
    fn default() -> Self {
        ConsolidationOptions {
            target_utilisation: 0.6,
            zombie_max_utilisation: 0.05,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourLoad {
    pub hour_unix_s: u64,
    pub busy_cores: f64,
    pub hosts_reporting: usize,
    pub hosts_needed: usize,
    pub hosts_freed: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolPlan {
    pub datacenter: String,
    pub service: String,
    pub hosts: Vec<String>,
    /// Mean CPUs per host ((busy + idle CPU-ns) / host-seconds).
    pub cores_per_host: f64,
    /// Mean idle power per host (idle energy / host-seconds), W.
    pub idle_power_w: f64,
    /// Embodied share per host-hour (host embodied g / host-hours), g.
    pub embodied_g_per_host_hour: f64,
    pub curve: Vec<HourLoad>,
    pub peak_busy_cores: f64,
    pub valley_busy_cores: f64,
    /// peak / valley busy cores (null when the valley is 0).
    pub peak_to_valley: Option<f64>,
    /// Hours (unix s) in which hosts can be powered down.
    pub valley_hours: Vec<u64>,
    pub freed_host_hours_per_day: f64,
    pub energy_saved_j_per_day: f64,
    pub operational_saved_g_per_day: f64,
    pub embodied_saved_g_per_day: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZombieHost {
    pub datacenter: String,
    pub host: String,
    pub service: String,
    pub utilisation: f64,
    pub transactions: f64,
    pub idle_power_w: f64,
    pub energy_saved_j_per_day: f64,
    pub operational_saved_g_per_day: f64,
    pub embodied_saved_g_per_day: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatacenterPlan {
    pub datacenter: String,
    /// Host-seconds-weighted over the range (fleet rollups).
    pub intensity_g_per_kwh: f64,
    pub pue: f64,
    pub zombies: Vec<ZombieHost>,
    pub pools: Vec<PoolPlan>,
    pub energy_saved_j_per_day: f64,
    pub operational_saved_g_per_day: f64,
    pub embodied_saved_g_per_day: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsolidationPlan {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub days: f64,
    pub options: ConsolidationOptions,
    pub datacenters: Vec<DatacenterPlan>,
    /// The data each figure comes from and what it assumes.
    pub data: Vec<String>,
    pub assumptions: Vec<String>,
}

/// Hosts needed for `busy_cores` at `target` x `cores` each (at least 1).
pub fn hosts_needed(busy_cores: f64, cores: f64, target: f64) -> usize {
    let capacity = cores * target;
    if capacity <= 0.0 {
        return 1;
    }
    // Tolerate the rounding of sums of time shares (1.0000000001 hosts is 1).
    ((busy_cores / capacity) - 1e-6).ceil().max(1.0) as usize
}

#[derive(Default)]
struct HostTotals {
    datacenter: String,
    host_s: f64,
    busy_ns: f64,
    idle_ns: f64,
    idle_energy_j: f64,
    embodied_g: f64,
    transactions: f64,
}

/// Plans from per-hour host rows and each host's pool.
pub fn plan(
    rows: &[HostPeriodRow],
    pools: &BTreeMap<String, String>,
    factors: &BTreeMap<String, (f64, f64)>,
    range: (u64, u64),
    options: &ConsolidationOptions,
) -> ConsolidationPlan {
    let days = (range.1.saturating_sub(range.0)) as f64 / 86_400.0;
    let per_day = |x: f64| if days > 0.0 { x / days } else { 0.0 };
    let mut hosts: BTreeMap<&str, HostTotals> = BTreeMap::new();
    for r in rows {
        let h = hosts.entry(&r.row.host).or_default();
        h.datacenter = r.row.datacenter.clone();
        h.host_s += r.row.host_s;
        h.busy_ns += r.row.busy_cpu_ns;
        h.idle_ns += r.row.idle_cpu_ns;
        h.idle_energy_j += r.row.idle_energy_j;
        h.embodied_g += r.row.embodied_g;
        h.transactions += r.row.transactions;
    }
    let utilisation = |h: &HostTotals| {
        let all = h.busy_ns + h.idle_ns;
        if all > 0.0 {
            h.busy_ns / all
        } else {
            0.0
        }
    };
    let zombie_hosts: BTreeSet<&str> = hosts
        .iter()
        .filter(|(_, h)| h.transactions <= 0.0 && utilisation(h) < options.zombie_max_utilisation)
        .map(|(name, _)| *name)
        .collect();
    let pool_of = |host: &str| pools.get(host).cloned().unwrap_or_else(|| "(none)".into());
    let mut datacenters: BTreeMap<String, DatacenterPlan> = BTreeMap::new();
    let dc_entry = |dcs: &mut BTreeMap<String, DatacenterPlan>, dc: &str| {
        let (intensity, pue) = factors.get(dc).copied().unwrap_or((0.0, 1.0));
        dcs.entry(dc.to_string())
            .or_insert_with(|| DatacenterPlan {
                datacenter: dc.to_string(),
                intensity_g_per_kwh: intensity,
                pue,
                zombies: Vec::new(),
                pools: Vec::new(),
                energy_saved_j_per_day: 0.0,
                operational_saved_g_per_day: 0.0,
                embodied_saved_g_per_day: 0.0,
            })
            .clone()
    };
    let carbon = |energy_j: f64, intensity: f64, pue: f64| energy_j / 3.6e6 * intensity * pue;
    for name in &zombie_hosts {
        let h = &hosts[name];
        let mut dc = dc_entry(&mut datacenters, &h.datacenter);
        let idle_w = if h.host_s > 0.0 {
            h.idle_energy_j / h.host_s
        } else {
            0.0
        };
        let energy = per_day(h.idle_energy_j);
        dc.zombies.push(ZombieHost {
            datacenter: h.datacenter.clone(),
            host: name.to_string(),
            service: pool_of(name),
            utilisation: utilisation(h),
            transactions: h.transactions,
            idle_power_w: idle_w,
            energy_saved_j_per_day: energy,
            operational_saved_g_per_day: carbon(energy, dc.intensity_g_per_kwh, dc.pue),
            embodied_saved_g_per_day: per_day(h.embodied_g),
        });
        datacenters.insert(dc.datacenter.clone(), dc);
    }
    // Pools: (dc, service) -> hour -> (busy ns, hosts reporting).
    let mut curves: BTreeMap<(String, String), BTreeMap<u64, (f64, usize)>> = BTreeMap::new();
    for r in rows {
        if zombie_hosts.contains(r.row.host.as_str()) || r.row.host_s <= 0.0 {
            continue;
        }
        let e = curves
            .entry((r.row.datacenter.clone(), pool_of(&r.row.host)))
            .or_default()
            .entry(r.period_start_s)
            .or_default();
        e.0 += r.row.busy_cpu_ns;
        e.1 += 1;
    }
    for ((dc_name, service), curve) in curves {
        let mut dc = dc_entry(&mut datacenters, &dc_name);
        let members: Vec<&str> = hosts
            .iter()
            .filter(|(name, h)| {
                h.datacenter == dc_name && !zombie_hosts.contains(*name) && pool_of(name) == service
            })
            .map(|(name, _)| *name)
            .collect();
        let sum = |f: fn(&HostTotals) -> f64| members.iter().map(|m| f(&hosts[m])).sum::<f64>();
        let host_s = sum(|h| h.host_s);
        let (cores, idle_w, embodied_h) = if host_s > 0.0 {
            (
                (sum(|h| h.busy_ns) + sum(|h| h.idle_ns)) / 1e9 / host_s,
                sum(|h| h.idle_energy_j) / host_s,
                sum(|h| h.embodied_g) / host_s * 3600.0,
            )
        } else {
            (0.0, 0.0, 0.0)
        };
        let curve: Vec<HourLoad> = curve
            .into_iter()
            .map(|(hour, (busy_ns, reporting))| {
                let busy_cores = busy_ns / 3.6e12;
                let needed =
                    hosts_needed(busy_cores, cores, options.target_utilisation).min(reporting);
                HourLoad {
                    hour_unix_s: hour,
                    busy_cores,
                    hosts_reporting: reporting,
                    hosts_needed: needed,
                    hosts_freed: reporting - needed,
                }
            })
            .collect();
        let peak = curve.iter().map(|h| h.busy_cores).fold(0.0, f64::max);
        let valley = curve
            .iter()
            .map(|h| h.busy_cores)
            .fold(f64::INFINITY, f64::min);
        let valley = if valley.is_finite() { valley } else { 0.0 };
        let freed: f64 = curve.iter().map(|h| h.hosts_freed as f64).sum();
        let energy = per_day(freed * idle_w * 3600.0);
        let pool = PoolPlan {
            datacenter: dc_name.clone(),
            service,
            hosts: members.iter().map(|m| m.to_string()).collect(),
            cores_per_host: cores,
            idle_power_w: idle_w,
            embodied_g_per_host_hour: embodied_h,
            peak_busy_cores: peak,
            valley_busy_cores: valley,
            peak_to_valley: (valley > 0.0).then(|| peak / valley),
            valley_hours: curve
                .iter()
                .filter(|h| h.hosts_freed > 0)
                .map(|h| h.hour_unix_s)
                .collect(),
            freed_host_hours_per_day: per_day(freed),
            energy_saved_j_per_day: energy,
            operational_saved_g_per_day: carbon(energy, dc.intensity_g_per_kwh, dc.pue),
            embodied_saved_g_per_day: per_day(freed * embodied_h),
            curve,
        };
        dc.pools.push(pool);
        datacenters.insert(dc_name, dc);
    }
    let mut datacenters: Vec<DatacenterPlan> = datacenters.into_values().collect();
    for dc in &mut datacenters {
        dc.energy_saved_j_per_day = dc
            .zombies
            .iter()
            .map(|z| z.energy_saved_j_per_day)
            .sum::<f64>()
            + dc.pools
                .iter()
                .map(|p| p.energy_saved_j_per_day)
                .sum::<f64>();
        dc.operational_saved_g_per_day = dc
            .zombies
            .iter()
            .map(|z| z.operational_saved_g_per_day)
            .sum::<f64>()
            + dc.pools
                .iter()
                .map(|p| p.operational_saved_g_per_day)
                .sum::<f64>();
        dc.embodied_saved_g_per_day = dc
            .zombies
            .iter()
            .map(|z| z.embodied_saved_g_per_day)
            .sum::<f64>()
            + dc.pools
                .iter()
                .map(|p| p.embodied_saved_g_per_day)
                .sum::<f64>();
    }
    ConsolidationPlan {
        from_unix_s: range.0,
        to_unix_s: range.1,
        days,
        options: *options,
        datacenters,
        data: vec![
            "busy and idle CPU, host-seconds, idle energy, embodied carbon and transactions per host and hour: host rollups (the agents' kernel CPU accounting and energy readings)".into(),
            "pool of a host: the service with most CPU on it over the range (host_service rollups, from the agents' process records)".into(),
            "grid intensity and PUE: host-seconds-weighted means of the data centre's windows over the range (fleet rollups)".into(),
        ],
        assumptions: vec![
            format!("target utilisation of the remaining hosts: {}", percent(options.target_utilisation)),
            format!("zombie: no completed transactions and utilisation below {} over the range", percent(options.zombie_max_utilisation)),
            "hosts of a pool are interchangeable (same CPUs); the load of a freed host moves to the others with its dynamic energy unchanged".into(),
            "a powered-down host draws nothing; saved energy = freed host-hours x the pool's measured idle power".into(),
            "embodied carbon is saved only if the freed capacity is retired or given other work (a powered-off host's M is still spent)".into(),
            "which hours: every hour of the range in which a pool needs fewer hosts than report (valley_hours); per day = over the range / its days".into(),
        ],
    }
}

/// Reads the range's host hours, pools and factors, and plans.
pub fn plan_store(
    store: &dyn Store,
    range: &Range,
    options: &ConsolidationOptions,
) -> Result<ConsolidationPlan, AggregatorError> {
    plan_store_in(store, range, options, None)
}

/// [`plan_store`] over the hosts of one data centre (all when None).
pub fn plan_store_in(
    store: &dyn Store,
    range: &Range,
    options: &ConsolidationOptions,
    datacenter: Option<&str>,
) -> Result<ConsolidationPlan, AggregatorError> {
    let wanted = |dc: &str| datacenter.is_none_or(|d| d == dc);
    let layout = store.layout();
    let hour = if 3600 % layout.host_step_s == 0 {
        3600
    } else {
        layout.host_step_s
    };
    let (from, to) = range.host_range(&layout);
    let hourly = Range::new(from, to, hour, &layout).map_err(AggregatorError::Invalid)?;
    let mut rows = store.host_periods(&hourly)?;
    rows.retain(|r| wanted(&r.row.datacenter));
    let mut best: BTreeMap<String, (f64, String)> = BTreeMap::new();
    for r in store
        .host_services(&hourly)?
        .into_iter()
        .filter(|r| wanted(&r.datacenter))
    {
        let e = best.entry(r.host.clone()).or_insert((-1.0, String::new()));
        if r.cpu_ns > e.0 && (r.service != "(none)" || e.1.is_empty()) {
            *e = (r.cpu_ns, r.service);
        }
    }
    let pools = best.into_iter().map(|(h, (_, s))| (h, s)).collect();
    let whole = Range::new(from, to, to - from, &layout).map_err(AggregatorError::Invalid)?;
    let mut sums: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for f in store
        .fleet_periods(&whole)?
        .into_iter()
        .filter(|f| wanted(&f.datacenter))
    {
        let e = sums.entry(f.datacenter.clone()).or_default();
        e.0 += f.intensity_x_s;
        e.1 += f.pue_x_s;
        e.2 += f.host_s;
    }
    let factors = sums
        .into_iter()
        .filter(|(_, v)| v.2 > 0.0)
        .map(|(dc, (i, p, s))| (dc, (i / s, p / s)))
        .collect();
    Ok(plan(&rows, &pools, &factors, (from, to), options))
}
