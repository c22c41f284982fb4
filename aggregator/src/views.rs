//! What the dashboard, the hotspot API, the profile exports and the HTML
//! report show, built from the store's rows and the SCI evaluation.
use std::collections::BTreeMap;

use crate::dashboard::{DashboardData, EvaluationReport, FlameGraphPanel, HostRow, PeriodFigures};
use crate::hotspots::{
    find_hotspots, scenario_weights, FunctionPeriod, HostPeriod, Hotspot, HotspotInput,
    HotspotOptions, IntensityHour, WorkloadPeriod,
};
use crate::profiles::{merge, MergedProfile, StackRow};
use crate::sci::Evaluation;
use crate::store::StoredRows;

fn some_unless_none(s: &str) -> Option<String> {
    (!s.is_empty() && s != "(none)" && s != "-").then(|| s.to_string())
}

pub fn stack_rows(rows: &StoredRows) -> Vec<StackRow> {
    rows.profiles
        .iter()
        .map(|p| StackRow {
            window_end_unix_ns: p.end_unix_ns,
            service: some_unless_none(&p.service),
            scenario: some_unless_none(&p.scenario),
            stack: p.stack.clone(),
            samples: p.samples,
            energy_j: p.energy_j,
        })
        .collect()
}

/// Profiles of the range, one per (service, scenario).
pub fn profiles(rows: &StoredRows, from_s: u64, to_s: u64) -> Vec<MergedProfile> {
    merge(
        &stack_rows(rows),
        from_s * 1_000_000_000,
        to_s * 1_000_000_000,
    )
}

/// The hotspot rules' input for the whole range.
pub fn hotspot_input(rows: &StoredRows, e: &Evaluation) -> HotspotInput {
    let mut hosts: BTreeMap<String, HostPeriod> = BTreeMap::new();
    for w in &rows.windows {
        let h = hosts.entry(w.host.clone()).or_insert_with(|| HostPeriod {
            host: w.host.clone(),
            region: some_unless_none(&w.datacenter),
            ..Default::default()
        });
        h.busy_cpu_ns += w.busy_cpu_ns;
        h.idle_cpu_ns += w.idle_cpu_ns;
        h.energy_j += w.energy_j;
        h.idle_energy_j += w.idle_energy_j;
        h.carbon_g += w.carbon_g;
        h.embodied_g += w.embodied_g;
    }
    for s in rows.scenarios.iter().filter(|s| s.scenario != "unassigned") {
        if let Some(h) = hosts.get_mut(&s.host) {
            *h.transactions.entry(s.scenario.clone()).or_default() += s.transactions;
        }
    }
    for h in hosts.values_mut() {
        let total = h.busy_cpu_ns + h.idle_cpu_ns;
        h.cpu_utilisation = if total > 0 {
            h.busy_cpu_ns as f64 / total as f64
        } else {
            0.0
        };
    }
    // Workloads: per scenario and region, the fleet's carbon and transactions
    // (the scenario lines carry the completed transactions; services are
    // summed because a transaction's work spans several of them).
    let region_of: BTreeMap<&str, Option<String>> = hosts
        .values()
        .map(|h| (h.host.as_str(), h.region.clone()))
        .collect();
    let mut workloads: BTreeMap<(String, Option<String>), WorkloadPeriod> = BTreeMap::new();
    for s in &rows.scenarios {
        let region = region_of.get(s.host.as_str()).cloned().flatten();
        let w = workloads
            .entry((s.scenario.clone(), region.clone()))
            .or_insert_with(|| WorkloadPeriod {
                service: "all services".into(),
                scenario: s.scenario.clone(),
                region,
                ..Default::default()
            });
        w.energy_j += s.energy_j;
        w.carbon_g += s.carbon_g + s.embodied_g;
        w.transactions += s.transactions;
    }
    let functions = profiles(rows, e.from_unix_s, e.to_unix_s)
        .iter()
        .flat_map(|p| {
            p.functions().into_iter().map(|f| FunctionPeriod {
                service: p.service.clone().unwrap_or_else(|| "unassigned".into()),
                scenario: p.scenario.clone().unwrap_or_else(|| "unassigned".into()),
                function: f.function.clone(),
                energy_j: f.self_energy_j,
            })
        })
        .collect();
    HotspotInput {
        period_start_unix_ns: e.from_unix_s * 1_000_000_000,
        period_end_unix_ns: e.to_unix_s * 1_000_000_000,
        hosts: hosts.into_values().collect(),
        workloads: workloads.into_values().collect(),
        functions,
        intensity: intensity_hours(rows),
    }
}

/// The grid intensity each region's agents applied, per hour: the mean of
/// their windows' intensities weighted by window duration (agents read it
/// from their hourly series, so this is the series the fleet actually used).
/// A window belongs to the hour holding its last instant, as in the periods.
pub fn intensity_hours(rows: &StoredRows) -> Vec<IntensityHour> {
    let mut sums: BTreeMap<(String, u64), (f64, f64)> = BTreeMap::new();
    for w in &rows.windows {
        let Some(region) = some_unless_none(&w.datacenter) else {
            continue;
        };
        if !(w.intensity_g_per_kwh.is_finite() && w.intensity_g_per_kwh > 0.0) {
            continue;
        }
        let duration_s = w.end_unix_ns.saturating_sub(w.start_unix_ns) as f64 / 1e9;
        let hour_unix_s = w.end_unix_ns.saturating_sub(1) / 1_000_000_000 / 3600 * 3600;
        let entry = sums.entry((region, hour_unix_s)).or_default();
        entry.0 += w.intensity_g_per_kwh * duration_s;
        entry.1 += duration_s;
    }
    sums.into_iter()
        .filter(|(_, (_, duration_s))| *duration_s > 0.0)
        .map(
            |((region, hour_unix_s), (weighted, duration_s))| IntensityHour {
                region,
                hour_unix_s,
                intensity_g_per_kwh: weighted / duration_s,
            },
        )
        .collect()
}

pub fn hotspots(rows: &StoredRows, e: &Evaluation) -> Vec<Hotspot> {
    find_hotspots(&hotspot_input(rows, e), &HotspotOptions::default())
}

fn periods(e: &Evaluation) -> Vec<PeriodFigures> {
    e.periods
        .iter()
        .map(|p| PeriodFigures {
            label: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(p.start_unix_s),
            )
            .to_string(),
            start_unix_ns: p.start_unix_s * 1_000_000_000,
            end_unix_ns: p.end_unix_s * 1_000_000_000,
            transactions: p.transactions.clone(),
            operational_g: p.operational_g,
            embodied_g: p.embodied_g,
            business_units: p.business_units,
        })
        .collect()
}

fn now_text() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub fn dashboard(rows: &StoredRows, e: &Evaluation) -> DashboardData {
    let input = hotspot_input(rows, e);
    let flamegraphs = profiles(rows, e.from_unix_s, e.to_unix_s)
        .iter()
        .filter_map(|p| {
            Some(FlameGraphPanel {
                service: p.service.clone().unwrap_or_else(|| "unassigned".into()),
                scenario: p.scenario.clone().unwrap_or_else(|| "unassigned".into()),
                svg: p.flamegraph_svg().ok()?,
            })
        })
        .collect();
    DashboardData {
        title: "sci-cf: carbon per business transaction".into(),
        generated_at: now_text(),
        periods: periods(e),
        scenarios: scenario_weights(&input.workloads),
        hosts: e
            .hosts
            .iter()
            .map(|h| HostRow {
                host: h.host.clone(),
                region: some_unless_none(&h.datacenter),
                cpu_utilisation: h.cpu_utilisation,
                energy_j: h.energy_j,
                idle_energy_j: h.idle_energy_j,
                carbon_g: h.carbon_g,
                embodied_g: h.embodied_g,
                transactions: h.transactions,
            })
            .collect(),
        hotspots: find_hotspots(&input, &HotspotOptions::default()),
        flamegraphs,
    }
}

pub fn report(e: &Evaluation) -> EvaluationReport {
    EvaluationReport {
        title: "SCI_CF evaluation report (T/CQJR 032.2-2025, Appendix A)".into(),
        subject: format!("{} hosts", e.hosts.len()),
        generated_at: now_text(),
        periods: periods(e),
        weights: e.weights.clone(),
        method: e.method.clone(),
        factors: vec![
            (
                "periods".into(),
                format!(
                    "{} periods of {} s, {} with transactions",
                    e.periods.len(),
                    e.period_s,
                    e.periods_defined
                ),
            ),
            (
                "SCI_CF (mean of SCI_j)".into(),
                e.sci_cf_mean.map_or("undefined".into(), |v| {
                    format!("{v:.6} gCO2e per business unit")
                }),
            ),
            (
                "pooled sum(O+M)/sum(R)".into(),
                e.sci_cf_pooled.map_or("undefined".into(), |v| {
                    format!("{v:.6} gCO2e per business unit")
                }),
            ),
            (
                "energy".into(),
                if e.hosts.iter().any(|h| h.estimated) {
                    "some hosts estimated with the power model (no RAPL)".into()
                } else {
                    "RAPL".into()
                },
            ),
        ],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hotspots::HotspotKind;
    use crate::sci::evaluate;
    use crate::store::{ProfileRow, ScenarioRow, WindowRow};

    const T0: u64 = 1_700_000_000 / 3600 * 3600;

    fn window(host: &str, dc: &str, hour: u64, intensity_g_per_kwh: f64) -> WindowRow {
        let start_unix_ns = (T0 + hour * 3600) * 1_000_000_000;
        WindowRow {
            host: host.into(),
            datacenter: dc.into(),
            agent_instance: "a".into(),
            seq: hour,
            start_unix_ns,
            end_unix_ns: start_unix_ns + 3600 * 1_000_000_000,
            energy_j: 3.6e6,
            idle_energy_j: 0.0,
            carbon_g: intensity_g_per_kwh,
            embodied_g: 0.0,
            busy_cpu_ns: 1,
            idle_cpu_ns: 1,
            cpus: 1,
            estimated: false,
            energy_source: "rapl".into(),
            cpu_source: "ebpf".into(),
            intensity_g_per_kwh,
            pue: 1.0,
        }
    }

    /// Two regions over two hours, intensities taken from the windows: the
    /// east's repayment work (deferrable) should move to the west and to
    /// the east's cleaner hour, with savings computed by hand.
    #[test]
    fn stored_intensities_drive_the_move_rules() {
        let rows = StoredRows {
            windows: vec![
                window("e1", "east", 0, 800.0),
                window("e1", "east", 1, 400.0),
                window("w1", "west", 0, 300.0),
                window("w1", "west", 1, 300.0),
            ],
            scenarios: vec![ScenarioRow {
                host: "e1".into(),
                end_unix_ns: (T0 + 7200) * 1_000_000_000,
                scenario: "repayment".into(),
                transactions: 10,
                cpu_ns: 1,
                energy_j: 1.0,
                carbon_g: 100.0,
                embodied_g: 0.0,
            }],
            profiles: vec![ProfileRow {
                end_unix_ns: (T0 + 7200) * 1_000_000_000,
                service: "repay-svc".into(),
                scenario: "repayment".into(),
                stack: "main;schedule;hot_path".into(),
                samples: 10,
                energy_j: 0.5,
            }],
            ..Default::default()
        };
        let hours = intensity_hours(&rows);
        assert_eq!(hours.len(), 4);
        assert_eq!(hours[0].region, "east");
        assert_eq!(hours[0].intensity_g_per_kwh, 800.0);
        let e = evaluate(&rows, T0, T0 + 7200, 3600, &BTreeMap::new());
        let found = hotspots(&rows, &e);
        // East's mean is 600, west's 300: moving saves 1 - 300/600 = 50%.
        let region = found
            .iter()
            .find(|h| h.kind == HotspotKind::MoveRegion)
            .unwrap();
        assert!((region.impact_carbon_g - 50.0).abs() < 1e-9);
        assert!(region.recommendation.contains("to west"));
        // East's cleanest hour is 400 against its mean 600: saves 1/3.
        let hour = found
            .iter()
            .find(|h| h.kind == HotspotKind::MoveHour)
            .unwrap();
        assert!((hour.impact_carbon_g - 100.0 / 3.0).abs() < 1e-9);
        assert!(hour.recommendation.contains(&(T0 + 3600).to_string()));
        // The function's carbon: the scenario's 100 g per joule x 0.5 J.
        let function = found
            .iter()
            .find(|h| h.kind == HotspotKind::HotFunction)
            .unwrap();
        assert_eq!(function.subject, "repay-svc/repayment/hot_path");
        assert!((function.impact_carbon_g - 50.0).abs() < 1e-9);
    }
}
