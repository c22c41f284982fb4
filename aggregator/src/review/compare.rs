//! Release B against release A, or this month against last: per scenario,
//! carbon, energy and CPU per completed transaction in each range, the
//! difference and its 95% interval (bootstrap over periods, see
//! [`super::stats`]), and SCI_CF (mean of periods and pooled) of each range.
//!
//! Everything is per transaction, so a quieter range is not an improvement
//! by itself. Figures come from the rollups only:
//! - datacenter scope: the scenario rollups (carbon + embodied, dynamic +
//!   idle energy, CPU of each scenario's processes; transactions);
//! - service scope: the service rollups (that service's share of each
//!   scenario) over the scenario's transactions in the same periods. Periods
//!   of whole host steps read the host-step rollups (kept for
//!   rollup_retention); shorter ones (a 30-minute review) read the service
//!   rollups per rollup step, kept as long as raw windows. Service figures
//!   per rollup step, not a finer host step for recent data: the host step
//!   is fixed at database creation and also cuts the host, profile and
//!   supply rollups, whose cost per window would grow with it; one more
//!   table of service rows per minute for a week is small and answers any
//!   period the scenario rollups (the transactions) can. A range older than
//!   that table holds is refused with the reason;
//! - host scope: the host rollups (the host's carbon, energy and busy CPU
//!   over all its transactions: hosts do not split their figures by scenario).
use std::collections::BTreeMap;

use serde::Serialize;

use super::stats::{compare, Bootstrap, Difference, Estimator, PeriodPair, Verdict};
use crate::error::AggregatorError;
use crate::sci::{evaluate, Disclosure, EvaluationInput};
use crate::store::{Range, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Datacenter,
    Service,
    Host,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "datacenter" => Ok(Scope::Datacenter),
            "service" => Ok(Scope::Service),
            "host" => Ok(Scope::Host),
            other => Err(format!("scope {other:?}: use datacenter, service or host")),
        }
    }
}

/// Which part of the fleet is compared.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filters {
    pub datacenter: Option<String>,
    pub service: Option<String>,
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompareOptions {
    pub scope: Scope,
    pub filters: Filters,
    pub bootstrap: Bootstrap,
    pub weights: BTreeMap<String, f64>,
    pub min_coverage: f64,
}

/// One range's totals for a scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RangeTotals {
    pub transactions: f64,
    pub carbon_g: f64,
    pub energy_j: f64,
    /// The part of `energy_j` that moves with the service's own CPU (without
    /// the idle share, which moves with whatever else runs on the host).
    pub dynamic_energy_j: f64,
    pub cpu_ns: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioComparison {
    pub scenario: String,
    pub baseline: RangeTotals,
    pub candidate: RangeTotals,
    /// gCO2e (operational + embodied) per transaction.
    pub g_per_transaction: Difference,
    /// J (dynamic + idle share) per transaction.
    pub energy_j_per_transaction: Difference,
    /// Dynamic J per transaction: the energy that moves with the service.
    pub dynamic_energy_j_per_transaction: Difference,
    pub cpu_ns_per_transaction: Difference,
    /// The verdict in words, naming the figure that decided it.
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RangeSpec {
    pub from_unix_s: u64,
    pub to_unix_s: u64,
    pub period_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub baseline: RangeSpec,
    pub candidate: RangeSpec,
    pub scope: Scope,
    pub filters: Filters,
    pub method: String,
    pub bootstrap: Bootstrap,
    /// Mean of SCI_j over each range's periods in the mean (gCO2e/unit).
    pub sci_cf_mean: Difference,
    /// sum(O + M) / sum(R) over the same periods.
    pub sci_cf_pooled: Difference,
    pub scenarios: Vec<ScenarioComparison>,
    /// Per data centre, the factors behind each range's figures.
    pub baseline_disclosure: Vec<Disclosure>,
    pub candidate_disclosure: Vec<Disclosure>,
    /// What the comparison could not see, in sentences.
    pub notes: Vec<String>,
}

pub const METHOD: &str = "Per scenario and period j: carbon_j (operational + embodied g), energy_j (dynamic + idle share J), cpu_j (ns) and TA_j (completed transactions) from the rollups; per-transaction figure of a range = sum over its periods / sum of TA_j (pooled ratio). Difference = candidate - baseline; 95% interval: bootstrap over periods (each range resampled with replacement, fixed seed), expanded percentile for small samples (tail probability Phi(sqrt(n/(n-1)) t_{n-1,0.975}), n the smaller period count). Verdict: lower / higher when the interval excludes 0, else no detectable difference. SCI_CF as Appendix A (mean of covered periods' SCI_j; pooled ratio beside it), compared the same way.";

/// A scenario's per-period sums.
#[derive(Default, Clone, Copy)]
struct Sums {
    transactions: f64,
    carbon_g: f64,
    energy_j: f64,
    dynamic_energy_j: f64,
    cpu_ns: f64,
}

struct RangeData {
    /// scenario -> period -> sums
    scenarios: BTreeMap<String, BTreeMap<u64, Sums>>,
    sci_periods: Vec<PeriodPair>,
    sci_pooled_periods: Vec<PeriodPair>,
    disclosure: Vec<Disclosure>,
}

fn keep(filter: &Option<String>, value: &str) -> bool {
    filter.as_deref().is_none_or(|f| f == value)
}

fn read_range(
    store: &dyn Store,
    range: &Range,
    options: &CompareOptions,
) -> Result<RangeData, AggregatorError> {
    let f = &options.filters;
    // SCI_CF of the data centre(s) in the filter (Appendix A, with coverage).
    let mut input = EvaluationInput::read(store, range)?;
    if let Some(dc) = &f.datacenter {
        input.fleet.retain(|r| &r.datacenter == dc);
        input.scenarios.retain(|r| &r.datacenter == dc);
        input.hosts.retain(|r| &r.datacenter == dc);
        input.services.retain(|r| &r.datacenter == dc);
        input.spans.retain(|r| &r.datacenter == dc);
    }
    let evaluation = evaluate(
        &input,
        range,
        range.host_range(&store.layout()),
        &options.weights,
        options.min_coverage,
    );
    let in_mean: Vec<_> = evaluation.periods.iter().filter(|p| p.in_mean).collect();
    let sci_periods = in_mean
        .iter()
        .filter_map(|p| p.sci_g_per_unit)
        .map(|s| PeriodPair {
            numerator: s,
            denominator: 1.0,
        })
        .collect();
    let sci_pooled_periods = in_mean
        .iter()
        .map(|p| PeriodPair {
            numerator: p.operational_g + p.embodied_g,
            denominator: p.business_units,
        })
        .collect();

    let mut scenarios: BTreeMap<String, BTreeMap<u64, Sums>> = BTreeMap::new();
    let mut transactions_by: BTreeMap<(&str, u64), f64> = BTreeMap::new();
    for r in &input.scenarios {
        *transactions_by
            .entry((r.scenario.as_str(), r.period * range.period_s))
            .or_default() += r.transactions;
    }
    match options.scope {
        Scope::Datacenter => {
            for r in &input.scenarios {
                if !options.weights.contains_key(&r.scenario) {
                    continue;
                }
                let s = scenarios
                    .entry(r.scenario.clone())
                    .or_default()
                    .entry(r.period * range.period_s)
                    .or_default();
                s.transactions += r.transactions;
                s.carbon_g += r.carbon_g + r.embodied_g;
                s.energy_j += r.energy_j + r.idle_energy_j;
                s.dynamic_energy_j += r.energy_j;
                s.cpu_ns += r.cpu_ns;
            }
        }
        Scope::Service => {
            for p in store.service_periods(range)? {
                let r = &p.row;
                if !keep(&f.datacenter, &r.datacenter)
                    || !keep(&f.service, &r.service)
                    || !options.weights.contains_key(&r.scenario)
                {
                    continue;
                }
                let s = scenarios
                    .entry(r.scenario.clone())
                    .or_default()
                    .entry(p.period_start_s)
                    .or_default();
                s.carbon_g += r.carbon_g + r.embodied_g;
                s.energy_j += r.energy_j + r.idle_energy_j;
                s.dynamic_energy_j += r.energy_j;
                s.cpu_ns += r.cpu_ns;
            }
            for (scenario, periods) in scenarios.iter_mut() {
                for (period, s) in periods.iter_mut() {
                    s.transactions = transactions_by
                        .get(&(scenario.as_str(), *period))
                        .copied()
                        .unwrap_or(0.0);
                }
            }
        }
        Scope::Host => {
            for p in store.host_periods(range)? {
                let r = &p.row;
                if !keep(&f.datacenter, &r.datacenter) || !keep(&f.host, &r.host) {
                    continue;
                }
                let s = scenarios
                    .entry("all scenarios (host figures)".to_string())
                    .or_default()
                    .entry(p.period_start_s)
                    .or_default();
                s.transactions += r.transactions;
                s.carbon_g += r.carbon_g + r.embodied_g;
                s.energy_j += r.energy_j;
                s.dynamic_energy_j += r.energy_j - r.idle_energy_j;
                s.cpu_ns += r.busy_cpu_ns;
            }
        }
    }
    Ok(RangeData {
        scenarios,
        sci_periods,
        sci_pooled_periods,
        disclosure: evaluation.disclosure,
    })
}

fn pairs(periods: &BTreeMap<u64, Sums>, field: fn(&Sums) -> f64) -> Vec<PeriodPair> {
    periods
        .values()
        .filter(|s| s.transactions > 0.0)
        .map(|s| PeriodPair {
            numerator: field(s),
            denominator: s.transactions,
        })
        .collect()
}

fn totals(periods: Option<&BTreeMap<u64, Sums>>) -> RangeTotals {
    let mut t = RangeTotals::default();
    for s in periods.into_iter().flat_map(|p| p.values()) {
        t.transactions += s.transactions;
        t.carbon_g += s.carbon_g;
        t.energy_j += s.energy_j;
        t.dynamic_energy_j += s.dynamic_energy_j;
        t.cpu_ns += s.cpu_ns;
    }
    t
}

/// "carbon per transaction lower (-20.0%)", or why there is no verdict.
fn verdict_words(what: &str, d: &Difference) -> String {
    match (d.verdict, d.relative_difference) {
        (Verdict::Lower | Verdict::Higher, Some(r)) => {
            format!("{what} {} ({:+.1}%)", d.verdict.as_str(), 100.0 * r)
        }
        (v, _) => format!("{what}: {}", v.as_str()),
    }
}

/// The scenario's verdict in words, naming the figure that decided it.
/// Carbon per transaction decides when its interval excludes 0. When it
/// does not, but the figures that move with the service alone (dynamic
/// energy, CPU per transaction) do, the summary says so: the carbon figure
/// carries the idle share, which moves with the host's other load.
fn summary(c: &ScenarioComparison) -> String {
    let decisive = |d: &Difference| matches!(d.verdict, Verdict::Lower | Verdict::Higher);
    let carbon = verdict_words("carbon per transaction", &c.g_per_transaction);
    if decisive(&c.g_per_transaction) {
        return format!(
            "{}: {carbon}, decided by gCO2e per transaction (operational + embodied); {}",
            c.scenario,
            verdict_words(
                "dynamic energy per transaction",
                &c.dynamic_energy_j_per_transaction
            )
        );
    }
    let own: Vec<String> = [
        (
            "dynamic energy per transaction",
            &c.dynamic_energy_j_per_transaction,
        ),
        ("CPU per transaction", &c.cpu_ns_per_transaction),
    ]
    .into_iter()
    .filter(|(_, d)| decisive(d))
    .map(|(w, d)| verdict_words(w, d))
    .collect();
    if own.is_empty() {
        format!(
            "{}: {carbon}; no figure per transaction changed detectably",
            c.scenario
        )
    } else {
        format!(
            "{}: {carbon} (it carries the idle share, which moves with the host's other load); the service's own figures decided: {}",
            c.scenario,
            own.join(", ")
        )
    }
}

/// Compares the candidate range against the baseline.
pub fn compare_ranges(
    store: &dyn Store,
    baseline: &Range,
    candidate: &Range,
    options: &CompareOptions,
) -> Result<Comparison, AggregatorError> {
    if options.scope == Scope::Host {
        let step = store.layout().host_step_s;
        if !baseline.period_s.is_multiple_of(step) || !candidate.period_s.is_multiple_of(step) {
            return Err(AggregatorError::Invalid(format!(
                "a {:?} comparison needs periods that are multiples of host_rollup_step ({step} s)",
                options.scope
            )));
        }
    }
    let a = read_range(store, baseline, options)?;
    let b = read_range(store, candidate, options)?;
    let bs = &options.bootstrap;
    let empty = BTreeMap::new();
    let mut names: Vec<&String> = a.scenarios.keys().chain(b.scenarios.keys()).collect();
    names.sort();
    names.dedup();
    let mut notes = Vec::new();
    let scenarios = names
        .into_iter()
        .map(|name| {
            let pa = a.scenarios.get(name).unwrap_or(&empty);
            let pb = b.scenarios.get(name).unwrap_or(&empty);
            let cmp = |field: fn(&Sums) -> f64| {
                compare(
                    Estimator::PooledRatio,
                    &pairs(pa, field),
                    &pairs(pb, field),
                    bs,
                )
            };
            let mut c = ScenarioComparison {
                scenario: name.clone(),
                baseline: totals(Some(pa)),
                candidate: totals(Some(pb)),
                g_per_transaction: cmp(|s| s.carbon_g),
                energy_j_per_transaction: cmp(|s| s.energy_j),
                dynamic_energy_j_per_transaction: cmp(|s| s.dynamic_energy_j),
                cpu_ns_per_transaction: cmp(|s| s.cpu_ns),
                summary: String::new(),
            };
            c.summary = summary(&c);
            c
        })
        .collect::<Vec<_>>();
    for s in &scenarios {
        if s.baseline.transactions == 0.0 || s.candidate.transactions == 0.0 {
            notes.push(format!(
                "{}: no completed transactions in the {} range; no per-transaction comparison",
                s.scenario,
                if s.baseline.transactions == 0.0 {
                    "baseline"
                } else {
                    "candidate"
                }
            ));
        }
    }
    if options.scope == Scope::Service {
        notes.push("service scope: a scenario's carbon, energy and CPU are this service's share only; transactions are the scenario's completed transactions in the data centre filter (services do not count transactions)".to_string());
    }
    if options.scope == Scope::Host {
        notes.push("host scope: hosts do not split their figures by scenario; per transaction is over all the host's transactions, unweighted".to_string());
    }
    if options.filters.host.is_some() && options.scope != Scope::Host {
        notes.push("the host filter applies to the host scope only".to_string());
    }
    if options.filters.service.is_some() && options.scope != Scope::Service {
        notes.push("the service filter applies to the service scope only".to_string());
    }
    let spec = |r: &Range| RangeSpec {
        from_unix_s: r.from_s,
        to_unix_s: r.to_s,
        period_s: r.period_s,
    };
    Ok(Comparison {
        baseline: spec(baseline),
        candidate: spec(candidate),
        scope: options.scope,
        filters: options.filters.clone(),
        method: METHOD.to_string(),
        bootstrap: *bs,
        sci_cf_mean: compare(Estimator::Mean, &a.sci_periods, &b.sci_periods, bs),
        sci_cf_pooled: compare(
            Estimator::PooledRatio,
            &a.sci_pooled_periods,
            &b.sci_pooled_periods,
            bs,
        ),
        scenarios,
        baseline_disclosure: a.disclosure,
        candidate_disclosure: b.disclosure,
        notes,
    })
}
