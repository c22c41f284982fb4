//! Resource selection (standard 7.4): what a service costs per transaction
//! on each supply it ran on, ranked, with the supply's grid intensity and
//! PUE beside it so that "cheaper because of the hardware" and "cheaper
//! because of the grid" are told apart.
//!
//! For service S, scenario i and supply A (a data centre and a supply key):
//! per period j (whole host steps), carbon_j = S's operational + embodied g
//! on A's hosts, energy_j = its dynamic + idle-share J, cpu_j its CPU-ns,
//! TA_j the transactions of i it served there (a host's transactions of i
//! split among the services that ran i in proportion to their CPU). The
//! figure per transaction is sum(carbon_j) / sum(TA_j) (pooled, as the
//! review does); its interval and the difference to the cheapest supply
//! with its interval come from the review's bootstrap ([`crate::review::
//! stats::compare`]), which needs at least two periods with transactions
//! on each side (else "insufficient data").
//!
//! Hardware against grid: with k = intensity x PUE / 3.6e6 (g per J at
//! the plug) and E energy per transaction, the operational difference
//! B - A = (E_B - E_A) k_A + E_B (k_B - k_A): the first term is the
//! hardware (and software) at A's grid, the second the grid and PUE.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::AggregatorError;
use crate::review::stats::{compare, Bootstrap, Difference, Estimator, PeriodPair};
use crate::store::{Range, Store, SupplyRow, SupplyServiceRow};

/// Joules per kWh.
const J_PER_KWH: f64 = 3.6e6;

/// A data centre's supply: where a service can run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SupplyId {
    pub datacenter: String,
    pub supply: String,
}

impl std::fmt::Display for SupplyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}", self.datacenter, self.supply)
    }
}

/// Per-period sums of one (service, scenario) on one supply.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sums {
    pub transactions: f64,
    pub carbon_g: f64,
    pub operational_g: f64,
    pub energy_j: f64,
    pub cpu_ns: f64,
}

/// A supply's factors over the range.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SupplyFactors {
    pub host_hours: f64,
    /// Busy CPU over nominal capacity.
    pub utilisation: f64,
    pub intensity_g_per_kwh: Option<f64>,
    pub pue: Option<f64>,
}

impl SupplyFactors {
    fn of(rows: &[&SupplyRow]) -> SupplyFactors {
        let host_s: f64 = rows.iter().map(|r| r.host_s).sum();
        let capacity: f64 = rows.iter().map(|r| r.capacity_cpu_ns).sum();
        let busy: f64 = rows.iter().map(|r| r.busy_cpu_ns).sum();
        let mean = |f: fn(&SupplyRow) -> f64| {
            (host_s > 0.0).then(|| rows.iter().map(|r| f(r)).sum::<f64>() / host_s)
        };
        SupplyFactors {
            host_hours: host_s / 3600.0,
            utilisation: if capacity > 0.0 { busy / capacity } else { 0.0 },
            intensity_g_per_kwh: mean(|r| r.intensity_x_s),
            pue: mean(|r| r.pue_x_s),
        }
    }

    /// g CO2e per J at the plug (intensity x PUE).
    fn g_per_j(&self) -> Option<f64> {
        self.intensity_g_per_kwh
            .zip(self.pue)
            .map(|(i, p)| i * p / J_PER_KWH)
    }
}

/// One supply's line in the ranking.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SupplyCost {
    pub supply: SupplyId,
    pub rank: usize,
    pub transactions: f64,
    pub periods: usize,
    /// Operational + embodied g per transaction, with its 95% interval
    /// (`difference`, `ci_low`, `ci_high` of a comparison against zero).
    pub g_per_transaction: Difference,
    pub energy_j_per_transaction: Difference,
    pub cpu_ns_per_transaction: Difference,
    pub factors: SupplyFactors,
    /// This supply against the cheapest (candidate = this one).
    pub vs_cheapest: Option<Difference>,
    /// Of the operational difference to the cheapest, per transaction: the
    /// part due to energy per transaction (hardware) and to intensity x PUE.
    pub hardware_g_per_transaction: Option<f64>,
    pub grid_g_per_transaction: Option<f64>,
}

/// The ranking of one (service, scenario).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranking {
    pub service: String,
    pub scenario: String,
    pub supplies: Vec<SupplyCost>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Selection {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub period_s: u64,
    pub method: String,
    pub rankings: Vec<Ranking>,
    pub notes: Vec<String>,
}

pub const METHOD: &str = "Per service, scenario and supply (data centre and hardware/labels), per period j of whole host steps: carbon_j (operational + embodied g of the service's processes on the supply's hosts), energy_j (dynamic + idle share J), cpu_j (ns) and TA_j (the scenario's transactions on those hosts, split among the services that ran the scenario by CPU share). Per transaction = sum over periods / sum TA_j. 95% intervals: the review's bootstrap over periods (expanded percentile), at least two periods with transactions per supply. Ranked by g per transaction. Operational difference to the cheapest split as (E_B - E_A) k_A (hardware) + E_B (k_B - k_A) (grid), k = intensity x PUE / 3.6e6 g/J.";

/// Period start -> sums.
pub type Periods = BTreeMap<u64, Sums>;
/// (supply, scenario) -> periods, of one service.
pub type ServiceSeries = BTreeMap<(SupplyId, String), Periods>;

/// Per-period sums of `service` on every supply and scenario it ran.
pub fn service_series(rows: &[SupplyServiceRow]) -> BTreeMap<String, ServiceSeries> {
    let mut out: BTreeMap<String, ServiceSeries> = BTreeMap::new();
    for r in rows {
        if r.scenario == agent_common::UNASSIGNED || r.scenario == "(none)" {
            continue;
        }
        let id = SupplyId {
            datacenter: r.datacenter.clone(),
            supply: r.supply.clone(),
        };
        let s = out
            .entry(r.service.clone())
            .or_default()
            .entry((id, r.scenario.clone()))
            .or_default()
            .entry(r.period_start_s)
            .or_default();
        s.transactions += r.transactions;
        s.carbon_g += r.carbon_g + r.embodied_g;
        s.operational_g += r.carbon_g;
        s.energy_j += r.energy_j + r.idle_energy_j;
        s.cpu_ns += r.cpu_ns;
    }
    out
}

/// Periods with transactions as (numerator, transactions) pairs.
pub fn pairs(periods: &Periods, field: fn(&Sums) -> f64) -> Vec<PeriodPair> {
    periods
        .values()
        .filter(|s| s.transactions > 0.0)
        .map(|s| PeriodPair {
            numerator: field(s),
            denominator: s.transactions,
        })
        .collect()
}

/// One range's pooled figure with its interval: the review's bootstrap of
/// the difference to a baseline of as many periods that is exactly zero.
pub fn interval(periods: &[PeriodPair], bootstrap: &Bootstrap) -> Difference {
    let zero: Vec<PeriodPair> = periods
        .iter()
        .map(|_| PeriodPair {
            numerator: 0.0,
            denominator: 1.0,
        })
        .collect();
    compare(Estimator::PooledRatio, &zero, periods, bootstrap)
}

/// Each supply's factors over the range (intensity, PUE, utilisation).
pub fn supply_factors(rows: &[SupplyRow]) -> BTreeMap<SupplyId, SupplyFactors> {
    let mut by: BTreeMap<SupplyId, Vec<&SupplyRow>> = BTreeMap::new();
    for r in rows {
        by.entry(SupplyId {
            datacenter: r.datacenter.clone(),
            supply: r.supply.clone(),
        })
        .or_default()
        .push(r);
    }
    by.into_iter()
        .map(|(id, rows)| (id, SupplyFactors::of(&rows)))
        .collect()
}

/// The ranking of every (service, scenario) in the range, or of one service.
pub fn select(
    store: &dyn Store,
    range: &Range,
    service: Option<&str>,
    bootstrap: &Bootstrap,
) -> Result<Selection, AggregatorError> {
    let step = store.layout().host_step_s;
    if !range.period_s.is_multiple_of(step) {
        return Err(AggregatorError::Invalid(format!(
            "period {} s: supply figures need periods of whole host steps ({step} s)",
            range.period_s
        )));
    }
    let series = service_series(&store.supply_service_periods(range, service)?);
    let factors = supply_factors(&store.supply_periods(range)?);
    let mut rankings = Vec::new();
    let mut notes = Vec::new();
    for (service, by_supply) in &series {
        let mut scenarios: BTreeMap<&str, Vec<(&SupplyId, &Periods)>> = BTreeMap::new();
        for ((id, scenario), periods) in by_supply {
            scenarios
                .entry(scenario.as_str())
                .or_default()
                .push((id, periods));
        }
        for (scenario, supplies) in scenarios {
            let mut costs: Vec<(SupplyCost, &Periods)> = supplies
                .into_iter()
                .map(|(id, periods)| {
                    let cost = SupplyCost {
                        supply: id.clone(),
                        rank: 0,
                        transactions: periods.values().map(|s| s.transactions).sum(),
                        periods: periods.values().filter(|s| s.transactions > 0.0).count(),
                        g_per_transaction: interval(&pairs(periods, |s| s.carbon_g), bootstrap),
                        energy_j_per_transaction: interval(
                            &pairs(periods, |s| s.energy_j),
                            bootstrap,
                        ),
                        cpu_ns_per_transaction: interval(&pairs(periods, |s| s.cpu_ns), bootstrap),
                        factors: factors.get(id).cloned().unwrap_or_default(),
                        vs_cheapest: None,
                        hardware_g_per_transaction: None,
                        grid_g_per_transaction: None,
                    };
                    (cost, periods)
                })
                .collect();
            costs.retain(|(c, _)| {
                let keep = c.transactions > 0.0;
                if !keep {
                    notes.push(format!(
                        "{service}/{scenario} on {}: CPU but no transactions in the range; not ranked",
                        c.supply
                    ));
                }
                keep
            });
            costs.sort_by(|a, b| {
                let g = |c: &SupplyCost| c.g_per_transaction.candidate.unwrap_or(f64::INFINITY);
                g(&a.0).total_cmp(&g(&b.0))
            });
            let Some((cheapest, cheapest_periods)) = costs.first().cloned() else {
                continue;
            };
            let cheapest_e = cheapest.energy_j_per_transaction.candidate;
            let cheapest_k = cheapest.factors.g_per_j();
            for (i, (c, periods)) in costs.iter_mut().enumerate() {
                c.rank = i + 1;
                if i > 0 {
                    c.vs_cheapest = Some(compare(
                        Estimator::PooledRatio,
                        &pairs(cheapest_periods, |s| s.carbon_g),
                        &pairs(periods, |s| s.carbon_g),
                        bootstrap,
                    ));
                    if let (Some(ea), Some(ka), Some(eb), Some(kb)) = (
                        cheapest_e,
                        cheapest_k,
                        c.energy_j_per_transaction.candidate,
                        c.factors.g_per_j(),
                    ) {
                        c.hardware_g_per_transaction = Some((eb - ea) * ka);
                        c.grid_g_per_transaction = Some(eb * (kb - ka));
                    }
                }
            }
            rankings.push(Ranking {
                service: service.clone(),
                scenario: scenario.to_string(),
                supplies: costs.into_iter().map(|(c, _)| c).collect(),
            });
        }
    }
    if rankings.is_empty() {
        notes.push("no service with transactions on any supply in the range (windows from agents before #27 have no supply and show as \"(none)\")".to_string());
    }
    Ok(Selection {
        from_unix_s: range.from_s,
        to_unix_s: range.to_s,
        period_s: range.period_s,
        method: METHOD.to_string(),
        rankings,
        notes,
    })
}

/// A group of supplies sharing one attribute's value, over the range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SupplyGroup {
    pub value: String,
    pub host_hours: f64,
    pub utilisation: f64,
    pub energy_j: f64,
    pub operational_g: f64,
    pub embodied_g: f64,
    pub transactions: f64,
    pub intensity_g_per_kwh: Option<f64>,
    pub pue: Option<f64>,
}

/// The fleet grouped by one supply attribute (a query over the rollups).
pub fn groups(
    store: &dyn Store,
    range: &Range,
    attribute: &str,
) -> Result<Vec<SupplyGroup>, AggregatorError> {
    Ok(store
        .supply_groups(range, attribute)?
        .into_iter()
        .map(|r| {
            let f = SupplyFactors::of(&[&r]);
            SupplyGroup {
                value: r.supply,
                host_hours: f.host_hours,
                utilisation: f.utilisation,
                energy_j: r.energy_j,
                operational_g: r.operational_g,
                embodied_g: r.embodied_g,
                transactions: r.transactions,
                intensity_g_per_kwh: f.intensity_g_per_kwh,
                pue: f.pue,
            }
        })
        .collect())
}
