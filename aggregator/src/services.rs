//! The services view (`GET /api/v1/services`): per data centre, service and
//! scenario, carbon, energy and CPU over the range (whole host-rollup
//! steps), the hosts the service ran on, and transactions with carbon per
//! transaction.
//!
//! Transactions are counted per scenario and data centre (a window's
//! scenario records carry no service), so a service's transactions are
//! known only when it is the only service serving its scenario in its data
//! centre; otherwise they are left null with the reason, never guessed.
//! A service with transactions but no energy measured says so, never 0 g.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::AggregatorError;
use crate::store::{Range, Store};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceFigures {
    pub datacenter: String,
    pub service: String,
    pub scenario: String,
    pub cpu_ns: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    /// Completed transactions of the scenario in the data centre, when this
    /// service alone serves it there.
    pub transactions: Option<f64>,
    pub g_per_transaction: Option<f64>,
    /// Why `transactions` or `g_per_transaction` is null.
    pub note: Option<String>,
    /// Hosts the service used CPU on.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServicesView {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub datacenter: Option<String>,
    pub services: Vec<ServiceFigures>,
    /// (data centre, service, scenario) rows of the range beyond the
    /// `SERVICES_SHOWN` with the most carbon, left out of `services`.
    pub services_not_shown: u64,
}

/// Rows the services view answers with at most (the store ranks by carbon).
pub const SERVICES_SHOWN: usize = 1000;

/// The services of `range`, of one data centre when given.
pub fn services_view(
    store: &dyn Store,
    range: &Range,
    datacenter: Option<&str>,
) -> Result<ServicesView, AggregatorError> {
    let keep = |dc: &str| datacenter.is_none_or(|d| d == dc);
    let (rows, rest) = store.services(range, SERVICES_SHOWN)?;
    let services_not_shown = rest.services.saturating_sub(rows.len() as u64);
    // Transactions over the same whole host steps as the services' sums.
    let (from_s, to_s) = range.host_range(&store.layout());
    let mut transactions: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in store.scenario_periods(&Range {
        from_s,
        to_s,
        period_s: to_s - from_s,
    })? {
        *transactions
            .entry((s.datacenter.clone(), s.scenario.clone()))
            .or_default() += s.transactions;
    }
    let mut hosts: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for h in store.host_services(range)? {
        if h.cpu_ns > 0.0 {
            hosts
                .entry((h.datacenter.clone(), h.service.clone()))
                .or_default()
                .insert(h.host);
        }
    }
    let mut serving: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &rows {
        *serving
            .entry((r.datacenter.clone(), r.scenario.clone()))
            .or_default() += 1;
    }
    let mut services: Vec<ServiceFigures> = rows
        .into_iter()
        .filter(|r| keep(&r.datacenter))
        .map(|r| {
            let key = (r.datacenter.clone(), r.scenario.clone());
            let others = serving.get(&key).copied().unwrap_or(1);
            let total = transactions.get(&key).copied().unwrap_or(0.0);
            let measured = r.energy_j + r.idle_energy_j > 0.0 || r.carbon_g + r.embodied_g > 0.0;
            let (txns, g, note) = if others > 1 {
                (
                    None,
                    None,
                    Some(format!(
                        "{others} services serve {} in {}: transactions are counted per scenario, not per service",
                        r.scenario, r.datacenter
                    )),
                )
            } else if total <= 0.0 {
                (Some(0.0), None, None)
            } else if !measured {
                (Some(total), None, Some(crate::sci::NO_ENERGY_MEASURED.into()))
            } else {
                (Some(total), Some((r.carbon_g + r.embodied_g) / total), None)
            };
            ServiceFigures {
                hosts: hosts
                    .get(&(r.datacenter.clone(), r.service.clone()))
                    .map(|h| h.iter().cloned().collect())
                    .unwrap_or_default(),
                datacenter: r.datacenter,
                service: r.service,
                scenario: r.scenario,
                cpu_ns: r.cpu_ns,
                energy_j: r.energy_j,
                idle_energy_j: r.idle_energy_j,
                carbon_g: r.carbon_g,
                embodied_g: r.embodied_g,
                transactions: txns,
                g_per_transaction: g,
                note,
            }
        })
        .collect();
    services.sort_by(|a, b| (b.carbon_g + b.embodied_g).total_cmp(&(a.carbon_g + a.embodied_g)));
    Ok(ServicesView {
        from_unix_s: from_s,
        to_unix_s: to_s,
        datacenter: datacenter.map(str::to_string),
        services,
        services_not_shown,
    })
}
