//! What the dashboard, the hotspot API, the profile exports and the HTML
//! report show, built from the store's rows and the SCI evaluation.
use std::collections::BTreeMap;

use crate::dashboard::{DashboardData, EvaluationReport, FlameGraphPanel, HostRow, PeriodFigures};
use crate::hotspots::{
    find_hotspots, scenario_weights, FunctionPeriod, HostPeriod, Hotspot, HotspotInput,
    HotspotOptions, WorkloadPeriod,
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
    // Workloads: per scenario, the fleet's carbon and transactions (the
    // scenario lines carry the completed transactions), plus per service.
    let mut workloads: BTreeMap<(String, String), WorkloadPeriod> = BTreeMap::new();
    for s in &rows.scenarios {
        let w = workloads
            .entry(("all services".into(), s.scenario.clone()))
            .or_insert_with(|| WorkloadPeriod {
                service: "all services".into(),
                scenario: s.scenario.clone(),
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
        intensity: Vec::new(),
    }
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
