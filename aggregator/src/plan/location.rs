//! Location shifting (standard 7.2): per data centre and hour, the marginal
//! carbon of one more transaction of a scenario, and a split of the
//! scenario's traffic across the sites that respects their measured room.
//!
//! For data centre d, from its measured history (scenario rollups, the
//! `scheduling.history` before `from`): E_d = (dynamic + idle-share J) per
//! transaction of the scenario, M_d = embodied g per transaction, C_d = CPU-ns
//! per transaction, PUE_d the mean PUE. In hour h with intensity I_d(h)
//! (the data centre's file, else the same hour of the day measured):
//! marginal g = E_d x I_d(h) x PUE_d / 3.6e6 + M_d. Room: free cores at the
//! target utilisation (the least over the history of that hour of the day,
//! the scenario's own CPU given back) x 3.6e12 / C_d transactions per hour.
//! Demand in hour h: the scenario's mean transactions in that hour of the
//! day over the history's hours with data, all sites together. Split: the cheapest site first,
//! up to its room, then the next; what no site holds is `unplaced`. Only
//! data centres that served the scenario have a measured figure: others are
//! not offered (nothing is extrapolated to hardware it never ran on).
use std::collections::BTreeMap;

use serde::Serialize;

use super::intensity;
use super::shifting::SchedulingConfig;
use crate::error::AggregatorError;
use crate::store::{Range, Store};

const CORE_HOUR_NS: f64 = 3.6e12;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteHour {
    pub hour_unix_s: u64,
    pub intensity_g_per_kwh: Option<f64>,
    /// Marginal operational + embodied g of one more transaction.
    pub g_per_transaction: Option<f64>,
    /// Transactions per hour the site has room for (None: no capacity data).
    pub room_transactions: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Site {
    pub datacenter: String,
    pub energy_j_per_transaction: f64,
    pub embodied_g_per_transaction: f64,
    pub cpu_ns_per_transaction: f64,
    pub pue: f64,
    pub intensity_source: String,
    pub hours: Vec<SiteHour>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourSplit {
    pub hour_unix_s: u64,
    pub demand_transactions: f64,
    /// (data centre, transactions), cheapest first.
    pub split: Vec<(String, f64)>,
    pub unplaced_transactions: f64,
    /// g of this split against the demand all at its current sites' mean figure.
    pub planned_g: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocationPlan {
    pub scenario: String,
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub sites: Vec<Site>,
    pub splits: Vec<HourSplit>,
    pub assumptions: Vec<String>,
}

impl LocationPlan {
    /// The site with the lowest marginal g per transaction in the hour holding `at`.
    pub fn best_at(&self, at: u64) -> Option<(&Site, &SiteHour)> {
        let hour = at / 3600 * 3600;
        self.sites
            .iter()
            .filter_map(|s| {
                let h = s.hours.iter().find(|h| h.hour_unix_s == hour)?;
                h.g_per_transaction.map(|g| (s, h, g))
            })
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|(s, h, _)| (s, h))
    }
}

/// Plans the hours in `[from, to)` for `scenario`.
pub fn plan_location(
    store: &dyn Store,
    config: &SchedulingConfig,
    scenario: &str,
    from: u64,
    to: u64,
) -> Result<LocationPlan, AggregatorError> {
    if !agent_common::SCENARIO_NAMES.contains(&scenario) {
        return Err(AggregatorError::Invalid(format!(
            "scenario {}: use credit, drawdown, repayment or query",
            crate::validate::clip(scenario)
        )));
    }
    let step = store.layout().host_step_s;
    let history_to = from / step * step;
    let history = Range {
        from_s: history_to.saturating_sub(config.history.as_secs()) / step * step,
        to_s: history_to,
        period_s: step,
    };
    if history.from_s >= history.to_s {
        return Err(AggregatorError::Invalid("no history before `from`".into()));
    }
    // Per data centre: sums of the scenario, and its CPU per bucket.
    #[derive(Default)]
    struct Sums {
        txn: f64,
        energy_j: f64,
        embodied_g: f64,
        cpu_ns: f64,
    }
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    let mut own_cpu: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let mut demand_by_hod = [0.0f64; 24];
    for r in store.supply_service_periods(&history, None)? {
        if r.scenario != scenario {
            continue;
        }
        let s = sums.entry(r.datacenter.clone()).or_default();
        s.txn += r.transactions;
        s.energy_j += r.energy_j + r.idle_energy_j;
        s.embodied_g += r.embodied_g;
        s.cpu_ns += r.cpu_ns;
        *own_cpu
            .entry((r.datacenter.clone(), r.period_start_s))
            .or_default() += r.cpu_ns;
        demand_by_hod[(r.period_start_s % 86_400 / 3600) as usize] += r.transactions;
    }
    // Capacity and PUE per data centre.
    let mut pue: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut free: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let mut buckets: BTreeMap<(String, u64), (f64, f64)> = BTreeMap::new();
    for r in store.supply_periods(&history)? {
        let p = pue.entry(r.datacenter.clone()).or_default();
        p.0 += r.pue_x_s;
        p.1 += r.host_s;
        let b = buckets
            .entry((r.datacenter.clone(), r.period_start_s))
            .or_default();
        b.0 += r.capacity_cpu_ns;
        b.1 += r.busy_cpu_ns;
    }
    for ((dc, bucket), (capacity, busy)) in &buckets {
        let room = (config.target_utilisation * capacity - busy
            + own_cpu.get(&(dc.clone(), *bucket)).copied().unwrap_or(0.0))
            / (CORE_HOUR_NS * step as f64 / 3600.0);
        let e = free
            .entry((dc.clone(), bucket % 86_400 / 3600))
            .or_insert(f64::INFINITY);
        *e = e.min(room.max(0.0));
    }
    // Hours of each hour of the day that the history holds data for.
    let mut seen_by_hod = [0.0f64; 24];
    let distinct: std::collections::BTreeSet<u64> = buckets.keys().map(|(_, b)| *b).collect();
    for b in distinct {
        seen_by_hod[(b % 86_400 / 3600) as usize] += step as f64 / 3600.0;
    }
    let hours: Vec<u64> = (from / 3600 * 3600..to).step_by(3600).collect();
    let mut sites = Vec::new();
    for (dc, s) in &sums {
        if s.txn <= 0.0 {
            continue;
        }
        let (series, source) =
            intensity::for_hours(store, &config.intensity, dc, &history, from, to)?;
        let pue_dc = pue
            .get(dc)
            .filter(|(_, h)| *h > 0.0)
            .map_or(1.0, |(x, h)| x / h);
        let (e, m, c) = (s.energy_j / s.txn, s.embodied_g / s.txn, s.cpu_ns / s.txn);
        sites.push(Site {
            datacenter: dc.clone(),
            energy_j_per_transaction: e,
            embodied_g_per_transaction: m,
            cpu_ns_per_transaction: c,
            pue: pue_dc,
            intensity_source: source,
            hours: hours
                .iter()
                .map(|&h| {
                    let i = series.get(&h).copied();
                    SiteHour {
                        hour_unix_s: h,
                        intensity_g_per_kwh: i,
                        g_per_transaction: i.map(|i| e * i * pue_dc / 3.6e6 + m),
                        room_transactions: free
                            .get(&(dc.clone(), h % 86_400 / 3600))
                            .filter(|_| c > 0.0)
                            .map(|cores| cores * CORE_HOUR_NS / c),
                    }
                })
                .collect(),
        });
    }
    let splits = hours
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let hod = (h % 86_400 / 3600) as usize;
            let demand = if seen_by_hod[hod] > 0.0 {
                demand_by_hod[hod] / seen_by_hod[hod]
            } else {
                0.0
            };
            let mut offers: Vec<(&str, f64, f64)> = sites
                .iter()
                .filter_map(|s| {
                    let sh = &s.hours[i];
                    sh.g_per_transaction.map(|g| {
                        (
                            s.datacenter.as_str(),
                            g,
                            sh.room_transactions.unwrap_or(f64::INFINITY),
                        )
                    })
                })
                .collect();
            offers.sort_by(|a, b| a.1.total_cmp(&b.1));
            let mut left = demand;
            let mut split = Vec::new();
            let mut planned_g = 0.0;
            for (dc, g, room) in offers {
                if left <= 0.0 {
                    break;
                }
                let take = left.min(room);
                if take > 0.0 {
                    split.push((dc.to_string(), take));
                    planned_g += take * g;
                    left -= take;
                }
            }
            HourSplit {
                hour_unix_s: h,
                demand_transactions: demand,
                split,
                unplaced_transactions: left.max(0.0),
                planned_g,
            }
        })
        .collect();
    Ok(LocationPlan {
        scenario: scenario.to_string(),
        from_unix_s: from,
        to_unix_s: to,
        sites,
        splits,
        assumptions: vec![
            format!("per-transaction energy, embodied share and CPU of {scenario} per data centre as measured over the {} h before `from`", (history.to_s - history.from_s) / 3600),
            "marginal g = energy per transaction x intensity x PUE / 3.6e6 + embodied per transaction; a site's idle power is charged per transaction as today".to_string(),
            format!("room: free cores at {:.0}% utilisation, the least over the history of the same hour of the day, the scenario's own CPU given back", config.target_utilisation * 100.0),
            "demand: the scenario's mean transactions in that hour of the day over the history; latency and data residency are not weighed".to_string(),
        ],
    })
}
