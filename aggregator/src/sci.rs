//! SCI_CF per measurement period, as Appendix A of T/CQJR 032.2 sets out:
//! for each period j, O_j (operational carbon of every host), M_j (embodied
//! carbon), TA_i^j (completed transactions per scenario across the fleet),
//! R_j = sum alpha_i TA_i^j with the aggregator's weights, and
//! SCI_j = (O_j + M_j) / R_j; a period with R_j = 0 is undefined (not 0, not
//! infinity). The evaluation's SCI_CF is the mean of the SCI_j of the
//! periods in the mean (step d); the pooled ratio sum(O + M) / sum(R) over
//! the same periods is given beside it.
//!
//! Periods are aligned to the wall clock (multiples of the period length
//! since the Unix epoch) and filled by time: a window straddling a boundary
//! counts in each period in proportion to its time there (the store splits
//! it at ingest). Each period reports its coverage: host-seconds of data
//! against the hosts expected (those whose first-to-last data spans the
//! period) x the period's length. A period below the minimum coverage is
//! shown but left out of the mean and the pooled ratio, and says why.
//!
//! This is the one evaluation: the API returns it as JSON, and the report
//! (Markdown, HTML), the dashboard and /metrics render it.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Serialize, Serializer};

use crate::config::SCENARIOS;
use crate::error::AggregatorError;
use crate::figures::{percent, sig4};
use crate::store::{
    FleetRow, HostRow, HostSpan, Range, ScenarioRow, ServiceRest, ServiceRow, Store,
};
use agent_common::UNASSIGNED;

/// Counts that are sums of time-split shares: written as integers when whole.
fn count<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    let r = v.round();
    if (v - r).abs() <= 1e-9 * r.abs().max(1.0) && (0.0..9.0e15).contains(&r) {
        s.serialize_u64(r as u64)
    } else {
        s.serialize_f64(*v)
    }
}

fn counts<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(k, &Count(*v))?;
    }
    map.end()
}

struct Count(f64);

impl Serialize for Count {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        count(&self.0, s)
    }
}

/// The factors behind a data centre's figures (per period, or over the
/// range): what an auditor needs to redo them. Factor means are weighted by
/// host-seconds.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Disclosure {
    pub datacenter: String,
    /// Grid intensity the agents applied, gCO2e/kWh.
    pub intensity_g_per_kwh: f64,
    pub intensity_sources: Vec<String>,
    pub pue: f64,
    /// TE: embodied emissions of the physical machine, g.
    pub total_embodied_g: f64,
    /// EL: expected lifespan, s.
    pub lifespan_s: f64,
    /// RR/ToR: share of the machine the host reserves.
    pub resource_share: f64,
    pub share_sources: Vec<String>,
    pub energy_sources: Vec<String>,
    /// Power models of estimated energy (empty: measured).
    pub energy_models: Vec<String>,
    pub energy_j: f64,
    /// Share of the energy estimated by a power model (not measured).
    pub estimated_energy_share: f64,
    /// Share of the energy no process record explains (procfs blind spot).
    pub unattributed_energy_share: f64,
    /// Share of the energy of work no scenario rule assigned.
    pub unassigned_energy_share: f64,
    pub host_seconds: f64,
    pub steal_cpu_s: f64,
    pub unattributed_cpu_s: f64,
}

#[derive(Default)]
struct DisclosureSums {
    host_s: f64,
    intensity_x_s: f64,
    pue_x_s: f64,
    te_x_s: f64,
    el_x_s: f64,
    share_x_s: f64,
    energy_j: f64,
    estimated_j: f64,
    unattributed_j: f64,
    unassigned_j: f64,
    steal_ns: f64,
    unattributed_ns: f64,
    intensity_sources: BTreeSet<String>,
    share_sources: BTreeSet<String>,
    energy_sources: BTreeSet<String>,
    energy_models: BTreeSet<String>,
}

impl DisclosureSums {
    fn add(&mut self, r: &FleetRow) {
        self.host_s += r.host_s;
        self.intensity_x_s += r.intensity_x_s;
        self.pue_x_s += r.pue_x_s;
        self.te_x_s += r.te_x_s;
        self.el_x_s += r.el_x_s;
        self.share_x_s += r.share_x_s;
        self.energy_j += r.energy_j;
        self.estimated_j += r.estimated_energy_j;
        self.unattributed_j += r.unattributed_energy_j;
        self.steal_ns += r.steal_cpu_ns;
        self.unattributed_ns += r.unattributed_cpu_ns;
        let named = |s: &str| {
            if s.is_empty() {
                "(not stated)".to_string()
            } else {
                s.to_string()
            }
        };
        self.intensity_sources.insert(named(&r.intensity_source));
        self.share_sources.insert(named(&r.share_source));
        self.energy_sources.insert(named(&r.energy_source));
        if !r.energy_model.is_empty() {
            self.energy_models.insert(r.energy_model.clone());
        }
    }

    fn finish(self, datacenter: &str) -> Disclosure {
        let per_s = |x: f64| {
            if self.host_s > 0.0 {
                x / self.host_s
            } else {
                0.0
            }
        };
        let share = |x: f64| {
            if self.energy_j > 0.0 {
                x / self.energy_j
            } else {
                0.0
            }
        };
        Disclosure {
            datacenter: datacenter.to_string(),
            intensity_g_per_kwh: per_s(self.intensity_x_s),
            intensity_sources: self.intensity_sources.into_iter().collect(),
            pue: per_s(self.pue_x_s),
            total_embodied_g: per_s(self.te_x_s),
            lifespan_s: per_s(self.el_x_s),
            resource_share: per_s(self.share_x_s),
            share_sources: self.share_sources.into_iter().collect(),
            energy_sources: self.energy_sources.into_iter().collect(),
            energy_models: self.energy_models.into_iter().collect(),
            energy_j: self.energy_j,
            estimated_energy_share: share(self.estimated_j),
            unattributed_energy_share: share(self.unattributed_j),
            unassigned_energy_share: share(self.unassigned_j),
            host_seconds: self.host_s,
            steal_cpu_s: self.steal_ns / 1e9,
            unattributed_cpu_s: self.unattributed_ns / 1e9,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeriodFigures {
    pub start_unix_s: u64,
    pub end_unix_s: u64,
    /// Windows ending in the period (a straddling window counts where it ends).
    pub windows: u64,
    /// Hosts expected: their data spans (first to last window) overlap the period.
    pub hosts: usize,
    /// Host-seconds of data in the period.
    pub host_seconds: f64,
    /// host_seconds / (hosts x the period's length within the range).
    pub coverage: f64,
    /// Coverage at or above the minimum: the period counts in the pooled ratio.
    pub covered: bool,
    /// Whether SCI_j counts in SCI_CF (defined and covered).
    pub in_mean: bool,
    /// Why it does not, when it does not.
    pub excluded_reason: Option<String>,
    pub energy_j: f64,
    /// O_j, gCO2e.
    pub operational_g: f64,
    /// M_j, gCO2e.
    pub embodied_g: f64,
    /// TA_i^j per scenario (shares of straddling windows make fractions).
    #[serde(serialize_with = "counts")]
    pub transactions: BTreeMap<String, f64>,
    /// R_j.
    pub business_units: f64,
    /// SCI_j in gCO2e per business unit; null when R_j = 0.
    pub sci_g_per_unit: Option<f64>,
    pub undefined_reason: Option<String>,
    /// Per data centre: the factors behind O_j and M_j.
    pub disclosure: Vec<Disclosure>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScenarioFigures {
    pub scenario: String,
    pub standard_weight: f64,
    #[serde(serialize_with = "count")]
    pub transactions: f64,
    pub cpu_ns: f64,
    /// Dynamic energy: the scenario's share of busy energy.
    pub energy_j: f64,
    /// Idle energy charged to its processes.
    pub idle_energy_j: f64,
    /// energy_j + idle_energy_j: the energy its carbon stands for.
    pub total_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    /// (carbon + embodied) / transactions; null without transactions, and
    /// null when no energy was measured for the scenario (not 0 g).
    pub g_per_transaction: Option<f64>,
    /// Why `g_per_transaction` is null when the scenario has transactions.
    pub g_per_transaction_note: Option<String>,
    /// g_per_transaction relative to query's: the measured counterpart of alpha_i.
    pub measured_weight: Option<f64>,
}

impl ScenarioFigures {
    /// Carbon per transaction as text: the mass, "no energy measured", or
    /// "–" without transactions.
    pub fn per_transaction_text(&self) -> String {
        match (self.g_per_transaction, &self.g_per_transaction_note) {
            (Some(g), _) => crate::figures::mass_g(g),
            (None, Some(_)) => "no energy measured".into(),
            (None, None) => "–".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    pub key: String,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub cpu_ns: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostFigures {
    pub host: String,
    pub datacenter: String,
    pub host_seconds: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub cpu_utilisation: f64,
    #[serde(serialize_with = "count")]
    pub transactions: f64,
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
    /// Minimum coverage for a period to count in SCI_CF.
    pub min_coverage: f64,
    /// Periods with data (periods without any are not listed).
    pub periods: Vec<PeriodFigures>,
    /// Periods of the range without any data.
    pub periods_without_data: u64,
    /// Periods with R_j > 0.
    pub periods_defined: usize,
    /// Periods in SCI_CF: defined and covered.
    pub periods_in_mean: usize,
    /// Defined periods left out for coverage.
    pub periods_below_coverage: usize,
    /// Mean of SCI_j over the periods in the mean (Appendix A step d).
    pub sci_cf_mean: Option<f64>,
    /// sum(O_j + M_j) / sum(R_j) over the same periods.
    pub sci_cf_pooled: Option<f64>,
    /// What the mean leaves out, in a sentence (null when nothing).
    pub coverage_note: Option<String>,
    /// Totals over every period of the range.
    pub energy_j: f64,
    pub operational_g: f64,
    pub embodied_g: f64,
    pub business_units: f64,
    pub scenarios: Vec<ScenarioFigures>,
    /// Host and service figures cover whole host-rollup steps: this range.
    pub hosts_from_unix_s: u64,
    pub hosts_to_unix_s: u64,
    pub hosts: Vec<HostFigures>,
    pub datacenters: Vec<Breakdown>,
    /// Per data centre over the range: the factors behind the figures.
    pub disclosure: Vec<Disclosure>,
    pub services: Vec<Breakdown>,
}

/// Why a scenario with transactions has no carbon per transaction.
pub const NO_ENERGY_MEASURED: &str = "no energy measured: no process of this scenario was measured in the range (check the scenario rules); not 0 g";

pub const METHOD: &str = "T/CQJR 032.2-2025 Appendix A: per period j, O_j = sum of the hosts' operational carbon (energy x grid intensity x PUE), M_j = sum of the hosts' embodied carbon (TE x TiR/EL x RR/ToR), TA_i^j = completed transactions of scenario i, R_j = sum alpha_i TA_i^j, SCI_j = (O_j + M_j) / R_j (undefined when R_j = 0); SCI_CF = mean of the SCI_j of the periods with R_j > 0 and enough coverage; the pooled ratio uses the same periods. Periods are aligned to the wall clock; a window straddling a boundary counts in each period in proportion to its time there. Coverage = host-seconds of data / (hosts expected x period length).";

/// What an evaluation reads from the store, already summed per period.
#[derive(Debug, Clone, Default)]
pub struct EvaluationInput {
    pub fleet: Vec<FleetRow>,
    pub scenarios: Vec<ScenarioRow>,
    pub hosts: Vec<HostRow>,
    /// The [`SHOWN_SERVICES`] rows with the most carbon.
    pub services: Vec<ServiceRow>,
    /// How many service rows the range holds, and their sums together.
    pub services_all: ServiceRest,
    pub spans: Vec<HostSpan>,
}

/// Most (data centre, service, scenario) rows an evaluation reads, those
/// with the most carbon; the rest is one `(N other services)` line.
pub const SHOWN_SERVICES: usize = 200;

impl EvaluationInput {
    pub fn read(store: &dyn Store, range: &Range) -> Result<Self, AggregatorError> {
        let (services, services_all) = store.services(range, SHOWN_SERVICES)?;
        Ok(EvaluationInput {
            fleet: store.fleet_periods(range)?,
            scenarios: store.scenario_periods(range)?,
            hosts: store.hosts(range)?,
            services,
            services_all,
            spans: store.host_spans()?,
        })
    }
}

impl EvaluationInput {
    /// Keeps one data centre's rows; an error naming the known ones when no
    /// host of the store ever reported from `datacenter`.
    pub fn only_datacenter(&mut self, datacenter: &str) -> Result<(), String> {
        known_datacenter(&self.spans, datacenter)?;
        self.fleet.retain(|r| r.datacenter == datacenter);
        self.scenarios.retain(|r| r.datacenter == datacenter);
        self.hosts.retain(|r| r.datacenter == datacenter);
        self.services.retain(|r| r.datacenter == datacenter);
        self.spans.retain(|r| r.datacenter == datacenter);
        Ok(())
    }
}

/// Ok when a host of `spans` (the store's hosts) ever reported from
/// `datacenter`; else an error naming the known data centres.
pub fn known_datacenter(spans: &[HostSpan], datacenter: &str) -> Result<(), String> {
    let known: BTreeSet<&str> = spans.iter().map(|s| s.datacenter.as_str()).collect();
    if known.contains(datacenter) {
        return Ok(());
    }
    let known: Vec<&str> = known.into_iter().collect();
    Err(format!(
        "datacenter {datacenter:?}: no host has reported from it (known: {})",
        if known.is_empty() {
            "none yet".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// Reads the range's rollups and evaluates them.
pub fn evaluate_store(
    store: &dyn Store,
    range: &Range,
    weights: &BTreeMap<String, f64>,
    min_coverage: f64,
) -> Result<Evaluation, AggregatorError> {
    let input = EvaluationInput::read(store, range)?;
    let (hosts_from, hosts_to) = range.host_range(&store.layout());
    Ok(evaluate(
        &input,
        range,
        (hosts_from, hosts_to),
        weights,
        min_coverage,
    ))
}

/// Mean of the defined SCI_j of `periods` that are in the mean.
pub fn mean_sci(periods: &[PeriodFigures]) -> Option<f64> {
    let values: Vec<f64> = periods
        .iter()
        .filter(|p| p.in_mean)
        .filter_map(|p| p.sci_g_per_unit)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// sum(O + M) / sum(R) over the covered periods (those the mean may use;
/// a covered period without transactions adds carbon and no units).
pub fn pooled_sci(periods: &[PeriodFigures]) -> Option<f64> {
    let included = periods.iter().filter(|p| p.covered);
    let (carbon, units) = included.fold((0.0, 0.0), |(c, r), p| {
        (c + p.operational_g + p.embodied_g, r + p.business_units)
    });
    (units > 0.0).then(|| carbon / units)
}

pub fn evaluate(
    input: &EvaluationInput,
    range: &Range,
    hosts_range: (u64, u64),
    weights: &BTreeMap<String, f64>,
    min_coverage: f64,
) -> Evaluation {
    let period_s = range.period_s.max(1);
    let unassigned_by: BTreeMap<(u64, String), f64> = input
        .scenarios
        .iter()
        .filter(|s| s.scenario == UNASSIGNED)
        .fold(BTreeMap::new(), |mut m, s| {
            *m.entry((s.period, s.datacenter.clone())).or_default() += s.energy_j + s.idle_energy_j;
            m
        });
    let mut periods: BTreeMap<u64, PeriodFigures> = BTreeMap::new();
    let mut disclosures: BTreeMap<u64, BTreeMap<String, DisclosureSums>> = BTreeMap::new();
    let mut range_disclosure: BTreeMap<String, DisclosureSums> = BTreeMap::new();
    let new_period = |j: u64| PeriodFigures {
        start_unix_s: j * period_s,
        end_unix_s: (j + 1) * period_s,
        windows: 0,
        hosts: 0,
        host_seconds: 0.0,
        coverage: 0.0,
        covered: false,
        in_mean: false,
        excluded_reason: None,
        energy_j: 0.0,
        operational_g: 0.0,
        embodied_g: 0.0,
        transactions: SCENARIOS.iter().map(|s| (s.to_string(), 0.0)).collect(),
        business_units: 0.0,
        sci_g_per_unit: None,
        undefined_reason: None,
        disclosure: Vec::new(),
    };
    let mut datacenters: BTreeMap<String, Breakdown> = BTreeMap::new();
    for r in &input.fleet {
        let p = periods
            .entry(r.period)
            .or_insert_with(|| new_period(r.period));
        p.windows += r.windows_ended.round() as u64;
        p.host_seconds += r.host_s;
        p.energy_j += r.energy_j;
        p.operational_g += r.operational_g;
        p.embodied_g += r.embodied_g;
        disclosures
            .entry(r.period)
            .or_default()
            .entry(r.datacenter.clone())
            .or_default()
            .add(r);
        range_disclosure
            .entry(r.datacenter.clone())
            .or_default()
            .add(r);
        let b = datacenters
            .entry(r.datacenter.clone())
            .or_insert_with(|| Breakdown {
                key: r.datacenter.clone(),
                energy_j: 0.0,
                idle_energy_j: 0.0,
                carbon_g: 0.0,
                embodied_g: 0.0,
                cpu_ns: 0.0,
            });
        b.energy_j += r.energy_j;
        b.idle_energy_j += r.idle_energy_j;
        b.carbon_g += r.operational_g;
        b.embodied_g += r.embodied_g;
        b.cpu_ns += r.busy_cpu_ns;
    }
    for ((j, dc), unassigned_j) in &unassigned_by {
        if let Some(d) = disclosures.get_mut(j).and_then(|m| m.get_mut(dc)) {
            d.unassigned_j += unassigned_j;
        }
        if let Some(d) = range_disclosure.get_mut(dc) {
            d.unassigned_j += unassigned_j;
        }
    }
    for s in &input.scenarios {
        if !weights.contains_key(&s.scenario) {
            continue;
        }
        let p = periods
            .entry(s.period)
            .or_insert_with(|| new_period(s.period));
        *p.transactions.entry(s.scenario.clone()).or_default() += s.transactions;
    }
    for (j, p) in periods.iter_mut() {
        let start = p.start_unix_s.max(range.from_s);
        let end = p.end_unix_s.min(range.to_s);
        let (start_ns, end_ns) = (start * 1_000_000_000, end * 1_000_000_000);
        p.hosts = input
            .spans
            .iter()
            .filter(|h| h.first_start_ns < end_ns && h.last_end_ns > start_ns)
            .count();
        let expected_s = p.hosts as f64 * end.saturating_sub(start) as f64;
        p.coverage = if expected_s > 0.0 {
            p.host_seconds / expected_s
        } else {
            0.0
        };
        p.business_units = p
            .transactions
            .iter()
            .map(|(s, n)| weights.get(s).copied().unwrap_or(0.0) * n)
            .sum();
        p.covered = p.coverage + 1e-12 >= min_coverage;
        if p.business_units > 0.0 {
            p.sci_g_per_unit = Some((p.operational_g + p.embodied_g) / p.business_units);
            if p.covered {
                p.in_mean = true;
            } else {
                p.excluded_reason = Some(format!(
                    "coverage {} is below the minimum {} ({} host-seconds of data for {} hosts x {} s)",
                    percent(p.coverage),
                    percent(min_coverage),
                    sig4(p.host_seconds),
                    p.hosts,
                    end.saturating_sub(start)
                ));
            }
        } else {
            p.undefined_reason = Some("no completed transactions in the period (R = 0)".into());
            p.excluded_reason = p.undefined_reason.clone();
            if !p.covered {
                p.excluded_reason = Some(format!(
                    "no completed transactions (R = 0); coverage {} is also below the minimum {}",
                    percent(p.coverage),
                    percent(min_coverage)
                ));
            }
        }
        if let Some(by_dc) = disclosures.remove(j) {
            p.disclosure = by_dc.into_iter().map(|(dc, d)| d.finish(&dc)).collect();
        }
    }
    let periods: Vec<PeriodFigures> = periods.into_values().collect();
    let periods_defined = periods
        .iter()
        .filter(|p| p.sci_g_per_unit.is_some())
        .count();
    let periods_in_mean = periods.iter().filter(|p| p.in_mean).count();
    let periods_below_coverage = periods_defined - periods_in_mean;
    let total_periods = (range.to_s.div_ceil(period_s)).saturating_sub(range.from_s / period_s);
    let periods_without_data = total_periods.saturating_sub(periods.len() as u64);
    let coverage_note = (periods_below_coverage > 0).then(|| {
        format!(
            "{periods_below_coverage} of {periods_defined} periods with transactions are below the minimum coverage of {} and are shown but left out of SCI_CF (mean and pooled)",
            percent(min_coverage)
        )
    });

    // Per scenario, over the whole range.
    let mut by_scenario: BTreeMap<String, [f64; 6]> = BTreeMap::new();
    for s in &input.scenarios {
        let e = by_scenario.entry(s.scenario.clone()).or_default();
        e[0] += s.transactions;
        e[1] += s.cpu_ns;
        e[2] += s.energy_j;
        e[3] += s.idle_energy_j;
        e[4] += s.carbon_g;
        e[5] += s.embodied_g;
    }
    // Transactions without any energy or carbon measured for their
    // processes are not free: the figure is unknown, not 0 g.
    let measured = |e: &[f64; 6]| e[2] + e[3] > 0.0 || e[4] + e[5] > 0.0;
    let per_txn = |name: &str| {
        by_scenario
            .get(name)
            .filter(|e| e[0] > 0.0 && measured(e))
            .map(|e| (e[4] + e[5]) / e[0])
    };
    let query_g = per_txn("query");
    let figures = |name: &str, standard_weight: f64, weighted: bool| {
        let e = by_scenario.get(name).copied().unwrap_or_default();
        let g = if weighted { per_txn(name) } else { None };
        ScenarioFigures {
            scenario: name.to_string(),
            standard_weight,
            transactions: e[0],
            cpu_ns: e[1],
            energy_j: e[2],
            idle_energy_j: e[3],
            total_energy_j: e[2] + e[3],
            carbon_g: e[4],
            embodied_g: e[5],
            g_per_transaction: g,
            g_per_transaction_note: (weighted && e[0] > 0.0 && !measured(&e))
                .then(|| NO_ENERGY_MEASURED.to_string()),
            measured_weight: match (g, query_g) {
                (Some(g), Some(q)) if q > 0.0 => Some(g / q),
                _ => None,
            },
        }
    };
    let mut scenarios: Vec<ScenarioFigures> = SCENARIOS
        .iter()
        .map(|name| figures(name, weights.get(*name).copied().unwrap_or(0.0), true))
        .collect();
    if by_scenario.contains_key(UNASSIGNED) {
        scenarios.push(figures(UNASSIGNED, 0.0, false));
    }

    let last_seen: BTreeMap<&str, u64> = input
        .spans
        .iter()
        .map(|s| (s.host.as_str(), s.last_end_ns / 1_000_000_000))
        .collect();
    let hosts = input
        .hosts
        .iter()
        .map(|h| {
            let total = h.busy_cpu_ns + h.idle_cpu_ns;
            HostFigures {
                host: h.host.clone(),
                datacenter: h.datacenter.clone(),
                host_seconds: h.host_s,
                energy_j: h.energy_j,
                idle_energy_j: h.idle_energy_j,
                carbon_g: h.carbon_g,
                embodied_g: h.embodied_g,
                cpu_utilisation: if total > 0.0 {
                    h.busy_cpu_ns / total
                } else {
                    0.0
                },
                transactions: h.transactions,
                estimated: h.estimated_energy_j > 0.0,
                last_seen_unix_s: last_seen.get(h.host.as_str()).copied().unwrap_or(0),
            }
        })
        .collect();

    let mut services: BTreeMap<String, Breakdown> = BTreeMap::new();
    for s in &input.services {
        let key = format!("{}/{}", s.service, s.scenario);
        let b = services.entry(key.clone()).or_insert_with(|| Breakdown {
            key,
            energy_j: 0.0,
            idle_energy_j: 0.0,
            carbon_g: 0.0,
            embodied_g: 0.0,
            cpu_ns: 0.0,
        });
        b.energy_j += s.energy_j;
        b.idle_energy_j += s.idle_energy_j;
        b.carbon_g += s.carbon_g;
        b.embodied_g += s.embodied_g;
        b.cpu_ns += s.cpu_ns;
    }
    let mut services: Vec<Breakdown> = services.into_values().collect();
    services.sort_by(|a, b| (b.carbon_g + b.embodied_g).total_cmp(&(a.carbon_g + a.embodied_g)));
    let all = &input.services_all;
    if all.services > input.services.len() as u64 {
        let shown = |f: fn(&ServiceRow) -> f64| input.services.iter().map(f).sum::<f64>();
        services.push(Breakdown {
            key: format!(
                "({} other services)",
                all.services - input.services.len() as u64
            ),
            energy_j: (all.total.energy_j - shown(|s| s.energy_j)).max(0.0),
            idle_energy_j: (all.total.idle_energy_j - shown(|s| s.idle_energy_j)).max(0.0),
            carbon_g: (all.total.carbon_g - shown(|s| s.carbon_g)).max(0.0),
            embodied_g: (all.total.embodied_g - shown(|s| s.embodied_g)).max(0.0),
            cpu_ns: (all.total.cpu_ns - shown(|s| s.cpu_ns)).max(0.0),
        });
    }

    Evaluation {
        from_unix_s: range.from_s,
        to_unix_s: range.to_s,
        period_s,
        weights: weights.clone(),
        method: METHOD.to_string(),
        min_coverage,
        periods_without_data,
        periods_defined,
        periods_in_mean,
        periods_below_coverage,
        sci_cf_mean: mean_sci(&periods),
        sci_cf_pooled: pooled_sci(&periods),
        coverage_note,
        energy_j: periods.iter().map(|p| p.energy_j).sum(),
        operational_g: periods.iter().map(|p| p.operational_g).sum(),
        embodied_g: periods.iter().map(|p| p.embodied_g).sum(),
        business_units: periods.iter().map(|p| p.business_units).sum(),
        periods,
        scenarios,
        hosts_from_unix_s: hosts_range.0,
        hosts_to_unix_s: hosts_range.1,
        hosts,
        datacenters: datacenters.into_values().collect(),
        disclosure: range_disclosure
            .into_iter()
            .map(|(dc, d)| d.finish(&dc))
            .collect(),
        services,
    }
}
