//! What the exporters send: the fleet and scenario rollups as cumulative
//! counters sampled at each rollup step's end, per data centre (and
//! scenario), plus the hosts expected per data centre as a gauge.
//!
//! A counter's value at `t` is its total over `[origin, t)` (the origin is
//! where the export began, kept with the position), so for any period
//! `[a, b)` made of whole steps, `x@b - x@a` is exactly the sum the store
//! holds for it: O_j, M_j, TA_i^j and R_j of Appendix A. Every known series
//! gets a sample at every step (zero additions included), so a PromQL
//! `offset` always finds the period's start.
//!
//! Labels are bounded: `datacenter` (configured sites) and `scenario` (the
//! four of the standard and `unassigned`); no host or process label.
use std::collections::BTreeMap;

use crate::error::AggregatorError;
use crate::store::{Range, Store};

/// A series: metric name and its labels (sorted by name).
pub type SeriesKey = (String, Vec<(String, String)>);

/// Names of the exported series (also used by the rules, dashboards and docs).
pub mod names {
    pub const OPERATIONAL_G: &str = "sci_fleet_operational_carbon_grams_total";
    pub const EMBODIED_G: &str = "sci_fleet_embodied_carbon_grams_total";
    pub const ENERGY_J: &str = "sci_fleet_energy_joules_total";
    pub const ESTIMATED_J: &str = "sci_fleet_estimated_energy_joules_total";
    pub const UNATTRIBUTED_J: &str = "sci_fleet_unattributed_energy_joules_total";
    pub const HOST_S: &str = "sci_fleet_host_seconds_total";
    pub const HOSTS: &str = "sci_fleet_hosts";
    pub const SCENARIO_TRANSACTIONS: &str = "sci_fleet_scenario_transactions_total";
    pub const SCENARIO_UNITS: &str = "sci_fleet_scenario_business_units_total";
    pub const SCENARIO_ENERGY_J: &str = "sci_fleet_scenario_energy_joules_total";
    pub const SCENARIO_OPERATIONAL_G: &str = "sci_fleet_scenario_operational_carbon_grams_total";
    pub const SCENARIO_EMBODIED_G: &str = "sci_fleet_scenario_embodied_carbon_grams_total";
    /// Every counter, then the gauge.
    pub const ALL: [&str; 12] = [
        OPERATIONAL_G,
        EMBODIED_G,
        ENERGY_J,
        ESTIMATED_J,
        UNATTRIBUTED_J,
        HOST_S,
        SCENARIO_TRANSACTIONS,
        SCENARIO_UNITS,
        SCENARIO_ENERGY_J,
        SCENARIO_OPERATIONAL_G,
        SCENARIO_EMBODIED_G,
        HOSTS,
    ];
}

fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    (name.to_string(), labels)
}

/// One step's additions to the counters, and the gauges at its end.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    /// The step's end (the samples' timestamp), unix seconds.
    pub end_s: u64,
    pub additions: BTreeMap<SeriesKey, f64>,
    pub gauges: BTreeMap<SeriesKey, f64>,
}

/// [`read_steps`] on a blocking thread, off the exporter's runtime.
pub async fn read_steps_blocking(
    store: crate::store::SharedStore,
    from_s: u64,
    to_s: u64,
    weights: BTreeMap<String, f64>,
) -> Result<Vec<Step>, AggregatorError> {
    tokio::task::spawn_blocking(move || read_steps(store.as_ref(), from_s, to_s, &weights))
        .await
        .map_err(|e| AggregatorError::Invalid(format!("reading the rollups: {e}")))?
}

/// The steps of `[from_s, to_s)` (whole rollup steps) from the store's
/// rollups, each with what it adds to every series it touches.
pub fn read_steps(
    store: &dyn Store,
    from_s: u64,
    to_s: u64,
    weights: &BTreeMap<String, f64>,
) -> Result<Vec<Step>, AggregatorError> {
    let step = store.layout().step_s;
    if from_s >= to_s {
        return Ok(Vec::new());
    }
    let range = Range {
        from_s,
        to_s,
        period_s: step,
    };
    let mut steps: BTreeMap<u64, Step> = (from_s / step..to_s.div_ceil(step))
        .map(|j| {
            (
                j,
                Step {
                    end_s: (j + 1) * step,
                    ..Default::default()
                },
            )
        })
        .collect();
    for r in store.fleet_periods(&range)? {
        let Some(s) = steps.get_mut(&r.period) else {
            continue;
        };
        let dc = [("datacenter", r.datacenter.as_str())];
        for (name, v) in [
            (names::OPERATIONAL_G, r.operational_g),
            (names::EMBODIED_G, r.embodied_g),
            (names::ENERGY_J, r.energy_j),
            (names::ESTIMATED_J, r.estimated_energy_j),
            (names::UNATTRIBUTED_J, r.unattributed_energy_j),
            (names::HOST_S, r.host_s),
        ] {
            *s.additions.entry(key(name, &dc)).or_default() += v;
        }
    }
    for r in store.scenario_periods(&range)? {
        let Some(s) = steps.get_mut(&r.period) else {
            continue;
        };
        let labels = [
            ("datacenter", r.datacenter.as_str()),
            ("scenario", r.scenario.as_str()),
        ];
        let weight = weights.get(&r.scenario).copied().unwrap_or(0.0);
        for (name, v) in [
            (names::SCENARIO_TRANSACTIONS, r.transactions),
            (names::SCENARIO_UNITS, weight * r.transactions),
            (names::SCENARIO_ENERGY_J, r.energy_j + r.idle_energy_j),
            (names::SCENARIO_OPERATIONAL_G, r.carbon_g),
            (names::SCENARIO_EMBODIED_G, r.embodied_g),
        ] {
            *s.additions.entry(key(name, &labels)).or_default() += v;
        }
    }
    // Hosts expected: those whose data spans (first to last window) overlap the step.
    let spans = store.host_spans()?;
    for s in steps.values_mut() {
        let (start_ns, end_ns) = ((s.end_s - step) * 1_000_000_000, s.end_s * 1_000_000_000);
        let mut hosts: BTreeMap<&str, f64> = BTreeMap::new();
        for h in &spans {
            if h.first_start_ns < end_ns && h.last_end_ns > start_ns {
                *hosts.entry(h.datacenter.as_str()).or_default() += 1.0;
            }
        }
        for (dc, n) in hosts {
            s.gauges.insert(key(names::HOSTS, &[("datacenter", dc)]), n);
        }
    }
    Ok(steps.into_values().collect())
}
