//! Optimisation hotspots: where carbon goes and what to do about it.
//!
//! Pure functions over plain figures of one evaluation period (the
//! aggregator fills [`HotspotInput`] from its store). Each finding is a
//! [`Hotspot`]: what kind, about what, the figures behind it, and one
//! recommendation matching the standard's capabilities 2-4:
//! - consolidate: idle or zombie hosts (CPU utilisation under a threshold
//!   and no business transaction in the period) cost carbon for nothing;
//! - right-size: hosts whose idle energy dominates their energy;
//! - optimise: scenarios whose carbon per transaction relative to a query
//!   exceeds the weight the standard gives them (24/7/3/1), and the
//!   functions that burn most of a scenario's energy;
//! - move: work that would emit less in a lower-carbon region, or (for
//!   deferrable scenarios) at a lower-carbon hour, per the intensity series.
//!
//! [`find_hotspots`] ranks them by the carbon at stake (`impact_carbon_g`).
use crate::figures::{self, count, mass_g, percent, sig4};
use std::collections::BTreeMap;

/// The standard's compute weight alpha of a scenario (Appendix A).
pub fn standard_weight(scenario: &str) -> Option<f64> {
    agent_common::Scenario::from_code_name(scenario).map(agent_common::Scenario::standard_weight)
}

/// One host over the period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPeriod {
    pub host: String,
    pub region: Option<String>,
    /// Busy share of all CPUs, 0..1.
    pub cpu_utilisation: f64,
    pub busy_cpu_ns: u64,
    pub idle_cpu_ns: u64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    /// Completed transactions per scenario on this host.
    pub transactions: BTreeMap<String, u64>,
}

/// One service's work in one scenario (and region) over the period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadPeriod {
    pub service: String,
    pub scenario: String,
    pub region: Option<String>,
    pub energy_j: f64,
    pub carbon_g: f64,
    pub transactions: u64,
}

/// Profiled energy of one function (self energy: where it was the leaf).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionPeriod {
    pub service: String,
    pub scenario: String,
    pub function: String,
    pub energy_j: f64,
    /// Samples where it was the leaf.
    pub samples: u64,
}

/// Grid carbon intensity of a region for one hour.
#[derive(Debug, Clone, PartialEq)]
pub struct IntensityHour {
    pub region: String,
    /// Start of the hour (unix seconds, a multiple of 3600).
    pub hour_unix_s: u64,
    pub intensity_g_per_kwh: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HotspotInput {
    pub period_start_unix_ns: u64,
    pub period_end_unix_ns: u64,
    pub hosts: Vec<HostPeriod>,
    pub workloads: Vec<WorkloadPeriod>,
    pub functions: Vec<FunctionPeriod>,
    pub intensity: Vec<IntensityHour>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HotspotOptions {
    /// A host under this CPU utilisation with no transactions is idle/zombie.
    pub idle_cpu_utilisation: f64,
    /// A host whose idle energy share exceeds this is oversized.
    pub idle_energy_share: f64,
    /// Flag a scenario whose measured weight exceeds its standard weight by this factor.
    pub weight_gap_factor: f64,
    /// Functions reported per (service, scenario).
    pub top_functions: usize,
    /// A function must carry at least this share of its scenario's profiled energy.
    pub min_function_share: f64,
    /// Report a move only if it saves at least this share of the carbon.
    pub min_move_saving: f64,
    /// A (service, scenario) profile with fewer samples supports no
    /// hot-function claim (withheld; the dashboard says why).
    pub min_samples: u64,
    /// Scenarios whose work can run at another hour (batch auto-debit, reminders).
    pub deferrable_scenarios: Vec<String>,
}

impl Default for HotspotOptions {
    fn default() -> Self {
        HotspotOptions {
            idle_cpu_utilisation: 0.05,
            idle_energy_share: 0.6,
            weight_gap_factor: 1.25,
            top_functions: 3,
            min_function_share: 0.1,
            min_move_saving: 0.1,
            min_samples: 50,
            deferrable_scenarios: vec!["repayment".to_string()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HotspotKind {
    /// Idle or zombie host: consolidate.
    IdleHost,
    /// Idle energy dominates: right-size.
    OversizedHost,
    /// Scenario costs more per transaction (relative to a query) than its standard weight.
    WeightGap,
    /// Function burning a large share of a scenario's energy.
    HotFunction,
    /// Work that would emit less in another region.
    MoveRegion,
    /// Deferrable work that would emit less at another hour.
    MoveHour,
    /// The largest emitter among services and scenarios.
    TopEmitter,
}

impl HotspotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HotspotKind::IdleHost => "idle-host",
            HotspotKind::OversizedHost => "oversized-host",
            HotspotKind::WeightGap => "weight-gap",
            HotspotKind::HotFunction => "hot-function",
            HotspotKind::MoveRegion => "move-region",
            HotspotKind::MoveHour => "move-hour",
            HotspotKind::TopEmitter => "top-emitter",
        }
    }
}

/// The figures behind a hotspot, with the period they cover.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evidence {
    pub period_start_unix_ns: u64,
    pub period_end_unix_ns: u64,
    /// (name with unit, value), e.g. ("cpu_utilisation", 0.02).
    pub figures: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hotspot {
    pub kind: HotspotKind,
    /// Host, `service/scenario`, scenario, or `service/scenario/function`.
    pub subject: String,
    /// Carbon the recommendation could avoid (or, for a top emitter, its carbon).
    pub impact_carbon_g: f64,
    pub evidence: Evidence,
    pub recommendation: String,
}

/// A service/scenario with its carbon, transactions and ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadRank {
    pub service: String,
    pub scenario: String,
    pub carbon_g: f64,
    pub transactions: u64,
    /// None when it completed no transaction.
    pub carbon_per_transaction_g: Option<f64>,
    /// 1 = most carbon.
    pub rank_by_carbon: usize,
    /// 1 = most carbon per transaction; None without transactions.
    pub rank_by_carbon_per_transaction: Option<usize>,
}

/// A scenario's measured weight against the standard's.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioWeight {
    pub scenario: String,
    pub carbon_g: f64,
    pub transactions: u64,
    pub carbon_per_transaction_g: Option<f64>,
    /// Carbon per transaction over a query's (None without query transactions).
    pub measured_weight: Option<f64>,
    pub standard_weight: Option<f64>,
    /// measured / standard.
    pub gap_factor: Option<f64>,
}

/// Services and scenarios (regions summed) ranked by carbon and by carbon per transaction.
pub fn rank_workloads(workloads: &[WorkloadPeriod]) -> Vec<WorkloadRank> {
    let mut sums: BTreeMap<(String, String), (f64, u64)> = BTreeMap::new();
    for w in workloads {
        let entry = sums
            .entry((w.service.clone(), w.scenario.clone()))
            .or_default();
        entry.0 += w.carbon_g;
        entry.1 += w.transactions;
    }
    let mut ranks: Vec<WorkloadRank> = sums
        .into_iter()
        .map(
            |((service, scenario), (carbon_g, transactions))| WorkloadRank {
                service,
                scenario,
                carbon_g,
                transactions,
                carbon_per_transaction_g: (transactions > 0)
                    .then(|| carbon_g / transactions as f64),
                rank_by_carbon: 0,
                rank_by_carbon_per_transaction: None,
            },
        )
        .collect();
    let mut by_cpt: Vec<usize> = (0..ranks.len())
        .filter(|i| ranks[*i].carbon_per_transaction_g.is_some())
        .collect();
    by_cpt.sort_by(|a, b| {
        let (a, b) = (&ranks[*a], &ranks[*b]);
        b.carbon_per_transaction_g
            .unwrap_or(0.0)
            .total_cmp(&a.carbon_per_transaction_g.unwrap_or(0.0))
            .then_with(|| (&a.service, &a.scenario).cmp(&(&b.service, &b.scenario)))
    });
    for (rank, index) in by_cpt.into_iter().enumerate() {
        ranks[index].rank_by_carbon_per_transaction = Some(rank + 1);
    }
    ranks.sort_by(|a, b| {
        b.carbon_g
            .total_cmp(&a.carbon_g)
            .then_with(|| (&a.service, &a.scenario).cmp(&(&b.service, &b.scenario)))
    });
    for (rank, workload) in ranks.iter_mut().enumerate() {
        workload.rank_by_carbon = rank + 1;
    }
    ranks
}

/// Per scenario (services and regions summed): carbon per transaction, its
/// ratio to a query's, and that ratio over the standard's weight.
pub fn scenario_weights(workloads: &[WorkloadPeriod]) -> Vec<ScenarioWeight> {
    let mut sums: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for w in workloads {
        let entry = sums.entry(w.scenario.clone()).or_default();
        entry.0 += w.carbon_g;
        entry.1 += w.transactions;
    }
    let per_txn = |(carbon_g, transactions): (f64, u64)| {
        (transactions > 0).then(|| carbon_g / transactions as f64)
    };
    let query_cpt = sums
        .get("query")
        .copied()
        .and_then(per_txn)
        .filter(|g| *g > 0.0);
    let mut weights: Vec<ScenarioWeight> = sums
        .into_iter()
        .map(|(scenario, sums)| {
            let carbon_per_transaction_g = per_txn(sums);
            let measured_weight = carbon_per_transaction_g
                .zip(query_cpt)
                .map(|(cpt, query)| cpt / query);
            let standard = standard_weight(&scenario);
            ScenarioWeight {
                gap_factor: measured_weight.zip(standard).map(|(m, s)| m / s),
                scenario,
                carbon_g: sums.0,
                transactions: sums.1,
                carbon_per_transaction_g,
                measured_weight,
                standard_weight: standard,
            }
        })
        .collect();
    // The standard's order: credit, drawdown, repayment, query, then others.
    weights.sort_by(|a, b| {
        b.standard_weight
            .unwrap_or(0.0)
            .total_cmp(&a.standard_weight.unwrap_or(0.0))
            .then_with(|| a.scenario.cmp(&b.scenario))
    });
    weights
}

fn evidence(input: &HotspotInput, figures: Vec<(&str, f64)>) -> Evidence {
    Evidence {
        period_start_unix_ns: input.period_start_unix_ns,
        period_end_unix_ns: input.period_end_unix_ns,
        figures: figures
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect(),
    }
}

/// Hosts that idle (utilisation under the threshold, no transactions): consolidate.
pub fn idle_hosts(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    input
        .hosts
        .iter()
        .filter(|h| {
            h.cpu_utilisation < options.idle_cpu_utilisation
                && h.transactions.values().all(|n| *n == 0)
        })
        .map(|h| {
            let wasted_g = h.carbon_g + h.embodied_g;
            Hotspot {
                kind: HotspotKind::IdleHost,
                subject: h.host.clone(),
                impact_carbon_g: wasted_g,
                evidence: evidence(
                    input,
                    vec![
                        ("cpu_utilisation", h.cpu_utilisation),
                        ("transactions", 0.0),
                        ("energy_j", h.energy_j),
                        ("carbon_g", h.carbon_g),
                        ("embodied_g", h.embodied_g),
                    ],
                ),
                recommendation: format!(
                    "consolidate: {} ran at {} CPU and completed no business transaction; \
                     moving its work elsewhere and switching it off saves {} CO2e per period",
                    h.host,
                    percent(h.cpu_utilisation),
                    mass_g(wasted_g)
                ),
            }
        })
        .collect()
}

/// Busy hosts whose idle energy share exceeds the threshold: right-size.
pub fn oversized_hosts(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    let idle: Vec<String> = idle_hosts(input, options)
        .into_iter()
        .map(|h| h.subject)
        .collect();
    input
        .hosts
        .iter()
        .filter(|h| h.energy_j > 0.0 && !idle.contains(&h.host))
        .filter(|h| h.idle_energy_j / h.energy_j > options.idle_energy_share)
        .map(|h| {
            let idle_share = h.idle_energy_j / h.energy_j;
            let idle_carbon_g = h.carbon_g * idle_share;
            Hotspot {
                kind: HotspotKind::OversizedHost,
                subject: h.host.clone(),
                impact_carbon_g: idle_carbon_g,
                evidence: evidence(
                    input,
                    vec![
                        ("cpu_utilisation", h.cpu_utilisation),
                        ("idle_energy_share", idle_share),
                        ("energy_j", h.energy_j),
                        ("idle_energy_j", h.idle_energy_j),
                        ("idle_carbon_g", idle_carbon_g),
                    ],
                ),
                recommendation: format!(
                    "right-size: {} of {}'s energy is idle power ({} CO2e); \
                     a smaller instance or more work per host cuts it",
                    percent(idle_share),
                    h.host,
                    mass_g(idle_carbon_g)
                ),
            }
        })
        .collect()
}

/// Scenarios whose measured weight exceeds the standard's by the gap factor.
pub fn weight_gaps(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    scenario_weights(&input.workloads)
        .into_iter()
        .filter_map(|w| {
            let gap = w.gap_factor?;
            if gap < options.weight_gap_factor || w.scenario == "query" {
                return None;
            }
            let measured = w.measured_weight?;
            let standard = w.standard_weight?;
            // Carbon above what the standard's weight would allow.
            let excess_g = w.carbon_g * (1.0 - 1.0 / gap);
            Some(Hotspot {
                kind: HotspotKind::WeightGap,
                subject: w.scenario.clone(),
                impact_carbon_g: excess_g,
                evidence: evidence(
                    input,
                    vec![
                        ("carbon_per_transaction_g", w.carbon_per_transaction_g?),
                        ("measured_weight", measured),
                        ("standard_weight", standard),
                        ("gap_factor", gap),
                        ("carbon_g", w.carbon_g),
                    ],
                ),
                recommendation: format!(
                    "optimise the {} flow: one transaction costs {} queries' carbon where \
                     the standard weighs it {}; bringing it to its weight saves {} CO2e",
                    w.scenario,
                    sig4(measured),
                    count(standard),
                    mass_g(excess_g)
                ),
            })
        })
        .collect()
}

/// The top functions of each (service, scenario) by profiled energy.
pub fn hot_functions(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    let mut groups: BTreeMap<(&str, &str), Vec<&FunctionPeriod>> = BTreeMap::new();
    for f in &input.functions {
        groups
            .entry((f.service.as_str(), f.scenario.as_str()))
            .or_default()
            .push(f);
    }
    let mut hotspots = Vec::new();
    for ((service, scenario), mut functions) in groups {
        let total_j: f64 = functions.iter().map(|f| f.energy_j).sum();
        let total_samples: u64 = functions.iter().map(|f| f.samples).sum();
        if total_j <= 0.0 || total_samples < options.min_samples {
            continue;
        }
        // Carbon per joule of this workload, to express the stake in grams;
        // the scenario's across services when the service has no line.
        let sum = |same_service: bool| {
            input
                .workloads
                .iter()
                .filter(|w| w.scenario == scenario && (!same_service || w.service == service))
                .fold((0.0, 0.0), |(c, e), w| (c + w.carbon_g, e + w.energy_j))
        };
        let own = sum(true);
        let (carbon_g, energy_j) = if own.1 > 0.0 { own } else { sum(false) };
        let g_per_j = if energy_j > 0.0 {
            carbon_g / energy_j
        } else {
            0.0
        };
        functions.sort_by(|a, b| {
            b.energy_j
                .total_cmp(&a.energy_j)
                .then_with(|| a.function.cmp(&b.function))
        });
        for f in functions.into_iter().take(options.top_functions) {
            let share = f.energy_j / total_j;
            if share < options.min_function_share {
                continue;
            }
            hotspots.push(Hotspot {
                kind: HotspotKind::HotFunction,
                subject: format!("{service}/{scenario}/{}", f.function),
                impact_carbon_g: f.energy_j * g_per_j,
                evidence: evidence(
                    input,
                    vec![
                        ("energy_j", f.energy_j),
                        ("share_of_profiled_energy", share),
                        ("samples", f.samples as f64),
                        ("profile_samples", total_samples as f64),
                        ("carbon_g", f.energy_j * g_per_j),
                    ],
                ),
                recommendation: if f.function.starts_with("kernel time") {
                    format!(
                        "{}: {} of {service}'s {scenario} energy ({}); the kernel works on the \
                         service's behalf: make fewer or larger calls, not a kernel change",
                        f.function,
                        percent(share),
                        figures::energy_j(f.energy_j)
                    )
                } else {
                    format!(
                        "optimise function {}: {} of {service}'s {scenario} energy ({})",
                        f.function,
                        percent(share),
                        figures::energy_j(f.energy_j)
                    )
                },
            });
        }
    }
    hotspots
}

/// Mean intensity of each region over the hours of the period.
fn region_means(input: &HotspotInput) -> BTreeMap<&str, f64> {
    let start_s = input.period_start_unix_ns / 1_000_000_000;
    let end_s = input.period_end_unix_ns.div_ceil(1_000_000_000);
    let mut sums: BTreeMap<&str, (f64, u32)> = BTreeMap::new();
    for point in &input.intensity {
        if point.hour_unix_s + 3600 <= start_s || point.hour_unix_s >= end_s {
            continue;
        }
        let entry = sums.entry(point.region.as_str()).or_default();
        entry.0 += point.intensity_g_per_kwh;
        entry.1 += 1;
    }
    sums.into_iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(region, (sum, n))| (region, sum / n as f64))
        .collect()
}

/// Work that would emit less elsewhere (lowest mean intensity region over
/// the period) or, when deferrable, at the region's cleanest hour of the
/// period. Saving = carbon x (1 - better intensity / current intensity).
pub fn move_candidates(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    let means = region_means(input);
    let Some((best_region, best_mean)) = means
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1).then_with(|| a.0.cmp(b.0)))
        .map(|(r, m)| (*r, *m))
    else {
        return Vec::new();
    };
    let start_s = input.period_start_unix_ns / 1_000_000_000;
    let end_s = input.period_end_unix_ns.div_ceil(1_000_000_000);
    let mut hotspots = Vec::new();
    for w in &input.workloads {
        let Some(region) = w.region.as_deref() else {
            continue;
        };
        let Some(current) = means.get(region).copied().filter(|m| *m > 0.0) else {
            continue;
        };
        if w.carbon_g <= 0.0 {
            continue;
        }
        if region != best_region {
            let saving_share = 1.0 - best_mean / current;
            if saving_share >= options.min_move_saving {
                let saving_g = w.carbon_g * saving_share;
                hotspots.push(Hotspot {
                    kind: HotspotKind::MoveRegion,
                    subject: format!("{}/{}", w.service, w.scenario),
                    impact_carbon_g: saving_g,
                    evidence: evidence(
                        input,
                        vec![
                            ("carbon_g", w.carbon_g),
                            ("intensity_g_per_kwh", current),
                            ("target_intensity_g_per_kwh", best_mean),
                            ("saving_g", saving_g),
                        ],
                    ),
                    recommendation: format!(
                        "move {}'s {} work from {region} ({} g/kWh) to {best_region} \
                         ({} g/kWh): saves {} CO2e ({})",
                        w.service,
                        w.scenario,
                        sig4(current),
                        sig4(best_mean),
                        mass_g(saving_g),
                        percent(saving_share)
                    ),
                });
            }
        }
        if options.deferrable_scenarios.contains(&w.scenario) {
            let cleanest = input
                .intensity
                .iter()
                .filter(|p| p.region == region)
                .filter(|p| p.hour_unix_s + 3600 > start_s && p.hour_unix_s < end_s)
                .min_by(|a, b| {
                    a.intensity_g_per_kwh
                        .total_cmp(&b.intensity_g_per_kwh)
                        .then_with(|| a.hour_unix_s.cmp(&b.hour_unix_s))
                });
            if let Some(hour) = cleanest {
                let saving_share = 1.0 - hour.intensity_g_per_kwh / current;
                if saving_share >= options.min_move_saving {
                    let saving_g = w.carbon_g * saving_share;
                    hotspots.push(Hotspot {
                        kind: HotspotKind::MoveHour,
                        subject: format!("{}/{}", w.service, w.scenario),
                        impact_carbon_g: saving_g,
                        evidence: evidence(
                            input,
                            vec![
                                ("carbon_g", w.carbon_g),
                                ("intensity_g_per_kwh", current),
                                ("target_intensity_g_per_kwh", hour.intensity_g_per_kwh),
                                ("target_hour_unix_s", hour.hour_unix_s as f64),
                                ("saving_g", saving_g),
                            ],
                        ),
                        recommendation: format!(
                            "schedule {}'s {} batch in {region} at the hour starting {} (unix s, \
                             {} g/kWh instead of a mean {}): saves {} CO2e",
                            w.service,
                            w.scenario,
                            hour.hour_unix_s,
                            sig4(hour.intensity_g_per_kwh),
                            sig4(current),
                            mass_g(saving_g)
                        ),
                    });
                }
            }
        }
    }
    hotspots
}

/// The largest emitter among services/scenarios.
fn top_emitter(input: &HotspotInput) -> Option<Hotspot> {
    let top = rank_workloads(&input.workloads).into_iter().next()?;
    if top.carbon_g <= 0.0 {
        return None;
    }
    let fleet_g: f64 = input.workloads.iter().map(|w| w.carbon_g).sum();
    let share = top.carbon_g / fleet_g;
    Some(Hotspot {
        kind: HotspotKind::TopEmitter,
        subject: format!("{}/{}", top.service, top.scenario),
        impact_carbon_g: top.carbon_g,
        evidence: evidence(
            input,
            vec![
                ("carbon_g", top.carbon_g),
                ("share_of_workload_carbon", share),
                ("transactions", top.transactions as f64),
            ],
        ),
        recommendation: format!(
            "largest emitter: {}'s {} work is {} of workload carbon ({} CO2e); \
             profile it first",
            top.service,
            top.scenario,
            percent(share),
            mass_g(top.carbon_g)
        ),
    })
}

/// Every finding, most carbon at stake first (ties: kind, then subject).
pub fn find_hotspots(input: &HotspotInput, options: &HotspotOptions) -> Vec<Hotspot> {
    let mut hotspots = idle_hosts(input, options);
    hotspots.extend(oversized_hosts(input, options));
    hotspots.extend(weight_gaps(input, options));
    hotspots.extend(hot_functions(input, options));
    hotspots.extend(move_candidates(input, options));
    hotspots.extend(top_emitter(input));
    hotspots.sort_by(|a, b| {
        b.impact_carbon_g
            .total_cmp(&a.impact_carbon_g)
            .then_with(|| a.kind.cmp(&b.kind))
            .then_with(|| a.subject.cmp(&b.subject))
    });
    hotspots
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const T0: u64 = 1_700_000_000 / HOUR * HOUR;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    /// A recorded two-hour period: three hosts in two regions, two services.
    fn recorded() -> HotspotInput {
        let host = |name: &str,
                    region: &str,
                    util: f64,
                    e: f64,
                    idle: f64,
                    c: f64,
                    m: f64,
                    txns: &[(&str, u64)]| HostPeriod {
            host: name.into(),
            region: Some(region.into()),
            cpu_utilisation: util,
            busy_cpu_ns: 0,
            idle_cpu_ns: 0,
            energy_j: e,
            idle_energy_j: idle,
            carbon_g: c,
            embodied_g: m,
            transactions: txns.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
        };
        let work =
            |service: &str, scenario: &str, region: &str, e: f64, c: f64, n: u64| WorkloadPeriod {
                service: service.into(),
                scenario: scenario.into(),
                region: Some(region.into()),
                energy_j: e,
                carbon_g: c,
                transactions: n,
            };
        HotspotInput {
            period_start_unix_ns: T0 * 1_000_000_000,
            period_end_unix_ns: (T0 + 2 * HOUR) * 1_000_000_000,
            hosts: vec![
                host(
                    "app-1",
                    "east",
                    0.55,
                    360_000.0,
                    90_000.0,
                    50.0,
                    5.0,
                    &[("credit", 100), ("query", 4000)],
                ),
                host(
                    "batch-1",
                    "east",
                    0.12,
                    100_000.0,
                    70_000.0,
                    14.0,
                    5.0,
                    &[("repayment", 300)],
                ),
                host("spare-1", "west", 0.02, 80_000.0, 76_000.0, 4.0, 5.0, &[]),
                // Busy (20%) but no transactions: not a zombie by the rule.
                host("cron-1", "west", 0.20, 50_000.0, 20_000.0, 2.5, 5.0, &[]),
            ],
            workloads: vec![
                work("loan-api", "credit", "east", 180_000.0, 30.0, 100),
                work("loan-api", "query", "east", 60_000.0, 10.0, 4000),
                work("billing", "repayment", "east", 30_000.0, 6.0, 300),
            ],
            functions: vec![
                FunctionPeriod {
                    service: "loan-api".into(),
                    scenario: "credit".into(),
                    function: "risk_score".into(),
                    energy_j: 120_000.0,
                    samples: 1000,
                },
                FunctionPeriod {
                    service: "loan-api".into(),
                    scenario: "credit".into(),
                    function: "json_encode".into(),
                    energy_j: 40_000.0,
                    samples: 1000,
                },
                FunctionPeriod {
                    service: "loan-api".into(),
                    scenario: "credit".into(),
                    function: "log_line".into(),
                    energy_j: 10_000.0,
                    samples: 1000,
                },
                FunctionPeriod {
                    service: "loan-api".into(),
                    scenario: "credit".into(),
                    function: "memcpy".into(),
                    energy_j: 10_000.0,
                    samples: 1000,
                },
            ],
            intensity: vec![
                IntensityHour {
                    region: "east".into(),
                    hour_unix_s: T0,
                    intensity_g_per_kwh: 600.0,
                },
                IntensityHour {
                    region: "east".into(),
                    hour_unix_s: T0 + HOUR,
                    intensity_g_per_kwh: 400.0,
                },
                IntensityHour {
                    region: "west".into(),
                    hour_unix_s: T0,
                    intensity_g_per_kwh: 200.0,
                },
                IntensityHour {
                    region: "west".into(),
                    hour_unix_s: T0 + HOUR,
                    intensity_g_per_kwh: 200.0,
                },
                // Outside the period: ignored.
                IntensityHour {
                    region: "west".into(),
                    hour_unix_s: T0 + 2 * HOUR,
                    intensity_g_per_kwh: 10.0,
                },
            ],
        }
    }

    #[test]
    fn workloads_rank_by_carbon_and_by_carbon_per_transaction() {
        let ranks = rank_workloads(&recorded().workloads);
        let order: Vec<&str> = ranks.iter().map(|r| r.scenario.as_str()).collect();
        assert_eq!(order, vec!["credit", "query", "repayment"]);
        // Per transaction: credit 0.3 g, repayment 0.02 g, query 0.0025 g.
        assert!(close(ranks[0].carbon_per_transaction_g.unwrap(), 0.3));
        assert_eq!(ranks[0].rank_by_carbon_per_transaction, Some(1));
        assert_eq!(ranks[2].rank_by_carbon_per_transaction, Some(2));
        assert_eq!(ranks[1].rank_by_carbon_per_transaction, Some(3));
    }

    #[test]
    fn measured_weights_are_relative_to_a_query() {
        let weights = scenario_weights(&recorded().workloads);
        let order: Vec<&str> = weights.iter().map(|w| w.scenario.as_str()).collect();
        assert_eq!(order, vec!["credit", "repayment", "query"]);
        // credit: 0.3 / 0.0025 = 120 queries; standard 24 -> gap 5.
        assert!(close(weights[0].measured_weight.unwrap(), 120.0));
        assert!(close(weights[0].gap_factor.unwrap(), 5.0));
        // repayment: 0.02 / 0.0025 = 8; standard 3 -> gap 8/3.
        assert!(close(weights[1].measured_weight.unwrap(), 8.0));
        assert!(close(weights[1].gap_factor.unwrap(), 8.0 / 3.0));
        assert!(close(weights[2].measured_weight.unwrap(), 1.0));
    }

    #[test]
    fn idle_and_oversized_hosts() {
        let input = recorded();
        let options = HotspotOptions::default();
        let idle = idle_hosts(&input, &options);
        assert_eq!(idle.len(), 1, "{idle:?}");
        assert_eq!(idle[0].subject, "spare-1");
        assert!(close(idle[0].impact_carbon_g, 9.0));
        assert!(idle[0].recommendation.starts_with("consolidate"));
        // batch-1: 70% idle energy -> right-size; spare-1 is already idle;
        // app-1 25%, cron-1 40%: fine.
        let oversized = oversized_hosts(&input, &options);
        assert_eq!(oversized.len(), 1, "{oversized:?}");
        assert_eq!(oversized[0].subject, "batch-1");
        assert!(close(oversized[0].impact_carbon_g, 14.0 * 0.7));
        assert!(oversized[0].recommendation.starts_with("right-size"));
    }

    #[test]
    fn weight_gaps_name_the_excess_carbon() {
        let gaps = weight_gaps(&recorded(), &HotspotOptions::default());
        assert_eq!(gaps.len(), 2);
        // credit: 30 g x (1 - 1/5) = 24 g above its weight.
        assert_eq!(gaps[0].subject, "credit");
        assert!(close(gaps[0].impact_carbon_g, 24.0));
        // repayment: 6 g x (1 - 3/8) = 3.75 g.
        assert_eq!(gaps[1].subject, "repayment");
        assert!(close(gaps[1].impact_carbon_g, 3.75));
    }

    #[test]
    fn hot_functions_are_the_top_shares_of_a_scenario() {
        let hot = hot_functions(&recorded(), &HotspotOptions::default());
        // 180 kJ profiled; memcpy and log_line are 5.6% each: under 10%.
        let subjects: Vec<&str> = hot.iter().map(|h| h.subject.as_str()).collect();
        assert_eq!(
            subjects,
            vec!["loan-api/credit/risk_score", "loan-api/credit/json_encode"]
        );
        // risk_score: 120 kJ x (30 g / 180 kJ) = 20 g.
        assert!(close(hot[0].impact_carbon_g, 20.0));
        assert!(hot[0].recommendation.starts_with(
            "optimise function risk_score: 66.67% of loan-api's credit energy (120.0 kJ)"
        ));
    }

    /// Kernel time is reported as such, never as a function to optimise.
    #[test]
    fn kernel_time_is_not_a_function_to_optimise() {
        let mut input = recorded();
        input.functions[0].function = "kernel time in sendto()".into();
        let hot = hot_functions(&input, &HotspotOptions::default());
        assert_eq!(hot[0].subject, "loan-api/credit/kernel time in sendto()");
        assert!(
            hot[0].recommendation.starts_with(
                "kernel time in sendto(): 66.67% of loan-api's credit energy (120.0 kJ); the kernel works"
            ),
            "{}",
            hot[0].recommendation
        );
        assert!(hot
            .iter()
            .all(|h| !h.recommendation.contains("optimise function kernel")));
    }

    #[test]
    fn moves_to_a_cleaner_region_and_hour() {
        let moves = move_candidates(&recorded(), &HotspotOptions::default());
        // east mean 500, west mean 200 (the T0+2h point is outside): 60% saving.
        let region: Vec<(&str, f64)> = moves
            .iter()
            .filter(|h| h.kind == HotspotKind::MoveRegion)
            .map(|h| (h.subject.as_str(), h.impact_carbon_g))
            .collect();
        assert_eq!(region.len(), 3);
        assert!(region
            .iter()
            .any(|(s, g)| *s == "loan-api/credit" && close(*g, 18.0)));
        assert!(region
            .iter()
            .any(|(s, g)| *s == "billing/repayment" && close(*g, 3.6)));
        // Repayment is deferrable: east's cleanest hour is 400 vs mean 500: 20%.
        let hour: Vec<&Hotspot> = moves
            .iter()
            .filter(|h| h.kind == HotspotKind::MoveHour)
            .collect();
        assert_eq!(hour.len(), 1);
        assert_eq!(hour[0].subject, "billing/repayment");
        assert!(close(hour[0].impact_carbon_g, 1.2));
        assert!(hour[0]
            .evidence
            .figures
            .contains(&("target_hour_unix_s".to_string(), (T0 + HOUR) as f64)));
    }

    #[test]
    fn find_hotspots_ranks_by_carbon_at_stake() {
        let all = find_hotspots(&recorded(), &HotspotOptions::default());
        let ranked: Vec<(HotspotKind, &str)> =
            all.iter().map(|h| (h.kind, h.subject.as_str())).collect();
        assert_eq!(
            ranked[..5],
            [
                (HotspotKind::TopEmitter, "loan-api/credit"), // 30
                (HotspotKind::WeightGap, "credit"),           // 24
                (HotspotKind::HotFunction, "loan-api/credit/risk_score"), // 20
                (HotspotKind::MoveRegion, "loan-api/credit"), // 18
                (HotspotKind::OversizedHost, "batch-1"),      // 9.8
            ]
        );
        assert_eq!(all[5].kind, HotspotKind::IdleHost); // 9
        assert!(all
            .iter()
            .all(|h| h.evidence.period_start_unix_ns == T0 * 1_000_000_000));
        assert_eq!(all.len(), 11);
    }
}
