//! SCI_CF per measurement period, as Appendix A of T/CQJR 032.2 sets out:
//! for each period j, O_j (operational carbon of every host), M_j (embodied
//! carbon), TA_i^j (completed transactions per scenario across the fleet),
//! R_j = sum alpha_i TA_i^j with the aggregator's weights, and
//! SCI_j = (O_j + M_j) / R_j; a period with R_j = 0 is undefined (not 0, not
//! infinity). The evaluation's SCI_CF is the mean of the defined SCI_j
//! (step d); the pooled ratio sum(O + M) / sum(R) is given beside it.
//!
//! Periods are aligned to the wall clock (multiples of the period length
//! since the Unix epoch). A window belongs to the period that holds its last
//! instant: a window [10:00, 10:05) is in the 10:00 hour, not the next one.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::SCENARIOS;
use crate::store::StoredRows;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeriodFigures {
    pub start_unix_s: u64,
    pub end_unix_s: u64,
    pub windows: usize,
    pub hosts: usize,
    pub energy_j: f64,
    /// O_j, gCO2e.
    pub operational_g: f64,
    /// M_j, gCO2e.
    pub embodied_g: f64,
    /// TA_i^j per scenario.
    pub transactions: BTreeMap<String, u64>,
    /// R_j.
    pub business_units: f64,
    /// SCI_j in gCO2e per business unit; null when R_j = 0.
    pub sci_g_per_unit: Option<f64>,
    pub undefined_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScenarioFigures {
    pub scenario: String,
    pub standard_weight: f64,
    pub transactions: u64,
    pub cpu_ns: u64,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    /// (carbon + embodied) / transactions; null without transactions.
    pub g_per_transaction: Option<f64>,
    /// g_per_transaction relative to query's: the measured counterpart of alpha_i.
    pub measured_weight: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    pub key: String,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub cpu_ns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostFigures {
    pub host: String,
    pub datacenter: String,
    pub windows: usize,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub cpu_utilisation: f64,
    pub transactions: u64,
    pub estimated: bool,
    pub last_seen_unix_s: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub period_s: u64,
    pub weights: BTreeMap<String, f64>,
    pub method: String,
    pub periods: Vec<PeriodFigures>,
    pub periods_defined: usize,
    /// Mean of the defined SCI_j (Appendix A step d).
    pub sci_cf_mean: Option<f64>,
    /// sum(O_j + M_j) / sum(R_j) over the range.
    pub sci_cf_pooled: Option<f64>,
    pub operational_g: f64,
    pub embodied_g: f64,
    pub business_units: f64,
    pub scenarios: Vec<ScenarioFigures>,
    pub hosts: Vec<HostFigures>,
    pub datacenters: Vec<Breakdown>,
    pub services: Vec<Breakdown>,
}

pub const METHOD: &str = "T/CQJR 032.2-2025 Appendix A: per period j, O_j = sum of the hosts' operational carbon (energy x grid intensity x PUE), M_j = sum of the hosts' embodied carbon (TE x TiR/EL x RR/ToR), TA_i^j = completed transactions of scenario i, R_j = sum alpha_i TA_i^j, SCI_j = (O_j + M_j) / R_j (undefined when R_j = 0); SCI_CF = mean of the defined SCI_j. Periods are aligned to the wall clock; a window belongs to the period that holds its last instant.";

/// Evaluates `[from, to)` in periods of `period_s` seconds with `weights`.
pub fn evaluate(
    rows: &StoredRows,
    from_unix_s: u64,
    to_unix_s: u64,
    period_s: u64,
    weights: &BTreeMap<String, f64>,
) -> Evaluation {
    let period_s = period_s.max(1);
    let period_of = |end_ns: u64| (end_ns.saturating_sub(1) / 1_000_000_000) / period_s;
    let mut periods: BTreeMap<u64, PeriodFigures> = BTreeMap::new();
    let mut hosts_in: BTreeMap<u64, std::collections::BTreeSet<String>> = BTreeMap::new();
    let new_period = |j: u64| PeriodFigures {
        start_unix_s: j * period_s,
        end_unix_s: (j + 1) * period_s,
        windows: 0,
        hosts: 0,
        energy_j: 0.0,
        operational_g: 0.0,
        embodied_g: 0.0,
        transactions: SCENARIOS.iter().map(|s| (s.to_string(), 0)).collect(),
        business_units: 0.0,
        sci_g_per_unit: None,
        undefined_reason: None,
    };
    for w in &rows.windows {
        let j = period_of(w.end_unix_ns);
        let p = periods.entry(j).or_insert_with(|| new_period(j));
        p.windows += 1;
        p.energy_j += w.energy_j;
        p.operational_g += w.carbon_g;
        p.embodied_g += w.embodied_g;
        hosts_in.entry(j).or_default().insert(w.host.clone());
    }
    for s in &rows.scenarios {
        if !weights.contains_key(&s.scenario) {
            continue;
        }
        let j = period_of(s.end_unix_ns);
        let p = periods.entry(j).or_insert_with(|| new_period(j));
        *p.transactions.entry(s.scenario.clone()).or_default() += s.transactions;
    }
    let mut defined = Vec::new();
    for (j, p) in periods.iter_mut() {
        p.hosts = hosts_in.get(j).map_or(0, |h| h.len());
        p.business_units = p
            .transactions
            .iter()
            .map(|(s, n)| weights.get(s).copied().unwrap_or(0.0) * *n as f64)
            .sum();
        if p.business_units > 0.0 {
            let sci = (p.operational_g + p.embodied_g) / p.business_units;
            p.sci_g_per_unit = Some(sci);
            defined.push(sci);
        } else {
            p.undefined_reason = Some("no completed transactions in the period (R = 0)".into());
        }
    }
    let operational_g: f64 = periods.values().map(|p| p.operational_g).sum();
    let embodied_g: f64 = periods.values().map(|p| p.embodied_g).sum();
    let business_units: f64 = periods.values().map(|p| p.business_units).sum();

    // Per scenario, over the whole range.
    let mut by_scenario: BTreeMap<String, (u64, u64, f64, f64, f64)> = BTreeMap::new();
    for s in &rows.scenarios {
        let e = by_scenario.entry(s.scenario.clone()).or_default();
        e.0 += s.transactions;
        e.1 += s.cpu_ns;
        e.2 += s.energy_j;
        e.3 += s.carbon_g;
        e.4 += s.embodied_g;
    }
    let per_txn = |name: &str| {
        by_scenario
            .get(name)
            .filter(|e| e.0 > 0)
            .map(|e| (e.3 + e.4) / e.0 as f64)
    };
    let query_g = per_txn("query");
    let mut scenarios: Vec<ScenarioFigures> = SCENARIOS
        .iter()
        .map(|name| {
            let e = by_scenario.get(*name).copied().unwrap_or_default();
            let g = per_txn(name);
            ScenarioFigures {
                scenario: name.to_string(),
                standard_weight: weights.get(*name).copied().unwrap_or(0.0),
                transactions: e.0,
                cpu_ns: e.1,
                energy_j: e.2,
                carbon_g: e.3,
                embodied_g: e.4,
                g_per_transaction: g,
                measured_weight: match (g, query_g) {
                    (Some(g), Some(q)) if q > 0.0 => Some(g / q),
                    _ => None,
                },
            }
        })
        .collect();
    if let Some(e) = by_scenario.get("unassigned") {
        scenarios.push(ScenarioFigures {
            scenario: "unassigned".into(),
            standard_weight: 0.0,
            transactions: e.0,
            cpu_ns: e.1,
            energy_j: e.2,
            carbon_g: e.3,
            embodied_g: e.4,
            g_per_transaction: None,
            measured_weight: None,
        });
    }

    let mut hosts: BTreeMap<String, HostFigures> = BTreeMap::new();
    for w in &rows.windows {
        let h = hosts.entry(w.host.clone()).or_insert_with(|| HostFigures {
            host: w.host.clone(),
            datacenter: w.datacenter.clone(),
            windows: 0,
            energy_j: 0.0,
            idle_energy_j: 0.0,
            carbon_g: 0.0,
            embodied_g: 0.0,
            cpu_utilisation: 0.0,
            transactions: 0,
            estimated: false,
            last_seen_unix_s: 0,
        });
        h.windows += 1;
        h.energy_j += w.energy_j;
        h.idle_energy_j += w.idle_energy_j;
        h.carbon_g += w.carbon_g;
        h.embodied_g += w.embodied_g;
        h.estimated |= w.estimated;
        h.last_seen_unix_s = h.last_seen_unix_s.max(w.end_unix_ns / 1_000_000_000);
        // Accumulate busy and total CPU time in the utilisation field's place below.
    }
    for (host, h) in hosts.iter_mut() {
        let (busy, total) = rows
            .windows
            .iter()
            .filter(|w| &w.host == host)
            .fold((0u64, 0u64), |(b, t), w| {
                (b + w.busy_cpu_ns, t + w.busy_cpu_ns + w.idle_cpu_ns)
            });
        h.cpu_utilisation = if total > 0 {
            busy as f64 / total as f64
        } else {
            0.0
        };
        h.transactions = rows
            .scenarios
            .iter()
            .filter(|s| &s.host == host && s.scenario != "unassigned")
            .map(|s| s.transactions)
            .sum();
    }

    let mut datacenters: BTreeMap<String, Breakdown> = BTreeMap::new();
    for w in &rows.windows {
        let key = if w.datacenter.is_empty() {
            "(none)".to_string()
        } else {
            w.datacenter.clone()
        };
        let b = datacenters.entry(key.clone()).or_insert_with(|| Breakdown {
            key,
            energy_j: 0.0,
            carbon_g: 0.0,
            embodied_g: 0.0,
            cpu_ns: 0,
        });
        b.energy_j += w.energy_j;
        b.carbon_g += w.carbon_g;
        b.embodied_g += w.embodied_g;
        b.cpu_ns += w.busy_cpu_ns;
    }
    let mut services: BTreeMap<String, Breakdown> = BTreeMap::new();
    for s in &rows.services {
        let key = format!("{}/{}", s.service, s.scenario);
        let b = services.entry(key.clone()).or_insert_with(|| Breakdown {
            key,
            energy_j: 0.0,
            carbon_g: 0.0,
            embodied_g: 0.0,
            cpu_ns: 0,
        });
        b.energy_j += s.energy_j;
        b.carbon_g += s.carbon_g;
        b.embodied_g += s.embodied_g;
        b.cpu_ns += s.cpu_ns;
    }
    let mut services: Vec<Breakdown> = services.into_values().collect();
    services.sort_by(|a, b| (b.carbon_g + b.embodied_g).total_cmp(&(a.carbon_g + a.embodied_g)));

    Evaluation {
        from_unix_s,
        to_unix_s,
        period_s,
        weights: weights.clone(),
        method: METHOD.to_string(),
        periods_defined: defined.len(),
        sci_cf_mean: (!defined.is_empty())
            .then(|| defined.iter().sum::<f64>() / defined.len() as f64),
        sci_cf_pooled: (business_units > 0.0)
            .then(|| (operational_g + embodied_g) / business_units),
        periods: periods.into_values().collect(),
        operational_g,
        embodied_g,
        business_units,
        scenarios,
        hosts: hosts.into_values().collect(),
        datacenters: datacenters.into_values().collect(),
        services,
    }
}
