//! What the dashboard, the hotspot API and the profile exports show, read
//! from the store's rollups (never raw windows) beside the one evaluation.
use std::collections::{BTreeMap, BTreeSet};

use crate::dashboard::{DashboardData, FlameGraphPanel};
use crate::error::AggregatorError;
use crate::hotspots::{
    find_hotspots, FunctionPeriod, HostPeriod, Hotspot, HotspotInput, HotspotOptions,
    IntensityHour, WorkloadPeriod,
};
use crate::profiles::MergedProfile;
use crate::sci::Evaluation;
use crate::store::{ProfileCount, Range, Store};

fn some_unless_none(s: &str) -> Option<String> {
    (!s.is_empty() && s != "(none)" && s != "-").then(|| s.to_string())
}

/// Profiles of the range, one per (service, scenario), from the hourly
/// merged stacks (optionally of one service and/or scenario).
pub fn profiles(
    store: &dyn Store,
    range: &Range,
    service: Option<&str>,
    scenario: Option<&str>,
) -> Result<Vec<MergedProfile>, AggregatorError> {
    let (from_s, to_s) = range.host_range(&store.layout());
    let mut merged: BTreeMap<(String, String), MergedProfile> = BTreeMap::new();
    for s in store.stacks(range, service, scenario)? {
        let profile = merged
            .entry((s.service.clone(), s.scenario.clone()))
            .or_insert_with(|| MergedProfile {
                service: some_unless_none(&s.service),
                scenario: some_unless_none(&s.scenario),
                start_unix_ns: from_s * 1_000_000_000,
                end_unix_ns: to_s * 1_000_000_000,
                stacks: BTreeMap::new(),
            });
        let totals = profile.stacks.entry(s.stack).or_default();
        totals.samples += s.samples;
        totals.energy_j += s.energy_j;
    }
    Ok(merged.into_values().collect())
}

/// Most profiles (service, scenario) the dashboard and the hotspot rules
/// read, those with the most energy, and most stacks read of each.
pub const SHOWN_PROFILES: usize = 12;
pub const SHOWN_STACKS: usize = 1_000;
/// The stack that stands for a profile's stacks beyond [`SHOWN_STACKS`]
/// (their samples and energy together), so a shown profile keeps its totals.
pub const OTHER_STACKS: &str = "[other stacks]";

/// The profiles the dashboard and the hotspot rules read: the
/// [`SHOWN_PROFILES`] with the most energy, each with its [`SHOWN_STACKS`]
/// heaviest stacks and the rest as one [`OTHER_STACKS`] stack; and how many
/// profiles the range holds. The store ranks, so what is read follows the
/// answer, not the stored rows (4 windows of 200,000 unique stacks over
/// 40,000 services took 490 MB more to serve one dashboard when every
/// stack was read).
pub fn top_profiles(
    store: &dyn Store,
    range: &Range,
) -> Result<(Vec<MergedProfile>, ProfileCount), AggregatorError> {
    let (from_s, to_s) = range.host_range(&store.layout());
    let (top, all) = store.top_profiles(range, SHOWN_PROFILES)?;
    let mut profiles = Vec::with_capacity(top.len());
    for t in top {
        let mut profile = MergedProfile {
            service: some_unless_none(&t.service),
            scenario: some_unless_none(&t.scenario),
            start_unix_ns: from_s * 1_000_000_000,
            end_unix_ns: to_s * 1_000_000_000,
            stacks: BTreeMap::new(),
        };
        let (mut samples, mut energy_j) = (0u64, 0.0);
        for s in store.top_stacks(range, &t.service, &t.scenario, SHOWN_STACKS)? {
            samples += s.samples;
            energy_j += s.energy_j;
            let totals = profile.stacks.entry(s.stack).or_default();
            totals.samples += s.samples;
            totals.energy_j += s.energy_j;
        }
        let rest_samples = t.samples.saturating_sub(samples);
        if rest_samples > 0 {
            let rest = profile.stacks.entry(OTHER_STACKS.to_string()).or_default();
            rest.samples += rest_samples;
            rest.energy_j += (t.energy_j - energy_j).max(0.0);
        }
        profiles.push(profile);
    }
    Ok((profiles, all))
}

/// The hotspot rules' input for the range, the profiles it used (see
/// [`top_profiles`]), how many profiles the range holds, and what the
/// input could not see.
///
/// With a data centre, `e` is that data centre's evaluation: its hosts
/// and its scenarios' work are read, and every region's intensity (a move
/// compares with the others). Profiles are stored per service, not per
/// data centre, so only the profiles of services that ran in this data
/// centre alone are read; the others are named in the notes.
pub fn hotspot_input(
    store: &dyn Store,
    range: &Range,
    e: &Evaluation,
    datacenter: Option<&str>,
) -> Result<(HotspotInput, Vec<MergedProfile>, ProfileCount, Vec<String>), AggregatorError> {
    let hosts = e
        .hosts
        .iter()
        .map(|h| HostPeriod {
            host: h.host.clone(),
            region: some_unless_none(&h.datacenter),
            cpu_utilisation: h.cpu_utilisation,
            busy_cpu_ns: 0,
            idle_cpu_ns: 0,
            energy_j: h.energy_j,
            idle_energy_j: h.idle_energy_j,
            carbon_g: h.carbon_g,
            embodied_g: h.embodied_g,
            transactions: BTreeMap::from([(
                "all scenarios".to_string(),
                h.transactions.round() as u64,
            )]),
        })
        .collect();
    // Workloads: per scenario and region, the fleet's carbon and transactions.
    let mut workloads: BTreeMap<(String, Option<String>), WorkloadPeriod> = BTreeMap::new();
    for s in store.scenario_periods(range)? {
        if datacenter.is_some_and(|dc| dc != s.datacenter) {
            continue;
        }
        let region = some_unless_none(&s.datacenter);
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
        w.transactions += s.transactions.round() as u64;
    }
    let (mut profiles, all) = top_profiles(store, range)?;
    let mut notes = Vec::new();
    if let Some(dc) = datacenter {
        let mut places: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in store.host_services(range)? {
            places.entry(r.service).or_default().insert(r.datacenter);
        }
        let only_here = |p: &MergedProfile| {
            p.service
                .as_ref()
                .and_then(|s| places.get(s))
                .is_some_and(|dcs| dcs.len() == 1 && dcs.contains(dc))
        };
        let (here, elsewhere): (Vec<_>, Vec<_>) = profiles.into_iter().partition(only_here);
        profiles = here;
        if !elsewhere.is_empty() {
            let names: Vec<String> = elsewhere.iter().map(MergedProfile::subject).collect();
            notes.push(format!(
                "hot functions not ranked for {}: their service also runs outside {dc} or is \
                 unassigned, and profiles are stored per service, not per data centre",
                names.join(", ")
            ));
        }
    }
    let functions = profiles
        .iter()
        .flat_map(|p| {
            p.actionable_functions()
                .into_iter()
                .filter(|f| f.function != OTHER_STACKS)
                .map(|f| FunctionPeriod {
                    service: or_unassigned(&p.service),
                    scenario: or_unassigned(&p.scenario),
                    function: f.function.clone(),
                    energy_j: f.self_energy_j,
                    samples: f.self_samples,
                })
        })
        .collect();
    let intensity = store
        .intensity_hours(range)?
        .into_iter()
        .filter_map(|r| {
            let region = some_unless_none(&r.datacenter)?;
            (r.host_s > 0.0 && r.intensity_x_s > 0.0).then(|| IntensityHour {
                region,
                hour_unix_s: r.hour_unix_s,
                intensity_g_per_kwh: r.intensity_x_s / r.host_s,
            })
        })
        .collect();
    Ok((
        HotspotInput {
            period_start_unix_ns: e.from_unix_s * 1_000_000_000,
            period_end_unix_ns: e.to_unix_s * 1_000_000_000,
            hosts,
            workloads: workloads.into_values().collect(),
            functions,
            intensity,
        },
        profiles,
        all,
        notes,
    ))
}

/// The hotspots of the range (of one data centre, `e` being its
/// evaluation) and what the rules could not see.
pub fn hotspots(
    store: &dyn Store,
    range: &Range,
    e: &Evaluation,
    options: &HotspotOptions,
    datacenter: Option<&str>,
) -> Result<(Vec<Hotspot>, Vec<String>), AggregatorError> {
    let (input, _, _, notes) = hotspot_input(store, range, e, datacenter)?;
    Ok((find_hotspots(&input, options), notes))
}

/// Why a profile is not shown (too few samples to support a claim).
pub fn withheld_reason(p: &MergedProfile, min_samples: u64) -> Option<String> {
    let samples = p.total_samples();
    (samples < min_samples).then(|| {
        format!(
            "{}: flame graph and hot functions withheld: {samples} samples, fewer than the minimum of {min_samples}",
            p.subject()
        )
    })
}

fn now_text() -> String {
    agent_common::time_text::now_rfc3339()
}

pub fn dashboard(
    store: &dyn Store,
    range: &Range,
    e: Evaluation,
    options: &HotspotOptions,
    datacenter: Option<&str>,
) -> Result<DashboardData, AggregatorError> {
    let (input, profiles, all, notes) = hotspot_input(store, range, &e, datacenter)?;
    let mut flamegraphs = Vec::new();
    let mut withheld = notes;
    for p in &profiles {
        if let Some(reason) = withheld_reason(p, options.min_samples) {
            withheld.push(reason);
            continue;
        }
        if let Ok(svg) = p.flamegraph_svg() {
            flamegraphs.push(FlameGraphPanel {
                service: or_unassigned(&p.service),
                scenario: or_unassigned(&p.scenario),
                samples: p.total_samples(),
                svg,
            });
        }
    }
    let shown_samples: u64 = profiles.iter().map(|p| p.total_samples()).sum();
    let shown_energy_j: f64 = profiles
        .iter()
        .flat_map(|p| p.stacks.values())
        .map(|t| t.energy_j)
        .sum();
    if all.profiles > profiles.len() as u64 {
        withheld.push(format!(
            "{} more profiles not shown ({} samples, {:.6} J): the dashboard shows the {SHOWN_PROFILES} with the most energy (each at /api/v1/profile)",
            all.profiles - profiles.len() as u64,
            all.samples.saturating_sub(shown_samples),
            (all.energy_j - shown_energy_j).max(0.0)
        ));
    }
    Ok(DashboardData {
        title: "sci-cf: carbon per business transaction".into(),
        generated_at: now_text(),
        evaluation: e,
        hotspots: find_hotspots(&input, options),
        flamegraphs,
        withheld,
    })
}

/// A profile's service or scenario label, `unassigned` when it has none.
fn or_unassigned(label: &Option<String>) -> String {
    label
        .clone()
        .unwrap_or_else(|| agent_common::UNASSIGNED.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hotspots::HotspotKind;
    use crate::sci::evaluate_store;
    use crate::store::sqlite::SqliteStore;
    use sci_proto::v1;

    const T0: u64 = 1_700_000_000 / 3600 * 3600;

    fn window(host: &str, dc: &str, hour: u64, intensity_g_per_kwh: f64) -> v1::WindowReport {
        let start_unix_ns = (T0 + hour * 3600) * 1_000_000_000;
        v1::WindowReport {
            host: host.into(),
            datacenter: dc.into(),
            agent_instance: "a".into(),
            seq: hour,
            start_unix_ns,
            end_unix_ns: start_unix_ns + 3600 * 1_000_000_000,
            host_energy_j: 3.6e6,
            host_carbon_g: intensity_g_per_kwh,
            busy_cpu_ns: 1,
            idle_cpu_ns: 1,
            cpus: 1,
            energy_source: "rapl".into(),
            cpu_source: "ebpf".into(),
            carbon_intensity_g_per_kwh: intensity_g_per_kwh,
            pue: 1.0,
            ..Default::default()
        }
    }

    /// Two regions over two hours, intensities taken from the stored
    /// windows (through the rollups): the east's repayment work
    /// (deferrable) should move to the west and to the east's cleaner hour,
    /// with savings computed by hand.
    #[test]
    fn stored_intensities_drive_the_move_rules() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("sci.db")).unwrap();
        let mut e1_hour1 = window("e1", "east", 1, 400.0);
        e1_hour1.scenarios.push(v1::ScenarioRecord {
            scenario: "repayment".into(),
            transactions: 10,
            cpu_ns: 1,
            energy_j: 1.0,
            carbon_g: 100.0,
            ..Default::default()
        });
        e1_hour1.profile.push(v1::ProfileStack {
            service: "repay-svc".into(),
            scenario: "repayment".into(),
            stack: "main;schedule;hot_path".into(),
            samples: 60,
            energy_j: 0.5,
            ..Default::default()
        });
        store
            .commit(&[window("e1", "east", 0, 800.0), e1_hour1])
            .unwrap();
        store
            .commit(&[
                window("w1", "west", 0, 300.0),
                window("w1", "west", 1, 300.0),
            ])
            .unwrap();
        let range = Range::new(T0, T0 + 7200, 3600, &store.layout()).unwrap();
        let hours = store.intensity_hours(&range).unwrap();
        assert_eq!(hours.len(), 4);
        assert_eq!(hours[0].datacenter, "east");
        assert_eq!(hours[0].intensity_x_s / hours[0].host_s, 800.0);
        let e = evaluate_store(&store, &range, &crate::config::standard_weights(), 0.9).unwrap();
        let (found, _) = hotspots(&store, &range, &e, &HotspotOptions::default(), None).unwrap();
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
        // Its sample count travels with the claim.
        assert!(function
            .evidence
            .figures
            .contains(&("samples".to_string(), 60.0)));
    }

    /// Below the minimum sample count, no hot-function claim, and the
    /// profile is withheld with the reason.
    #[test]
    fn thin_profiles_are_withheld_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("sci.db")).unwrap();
        let mut w = window("e1", "east", 0, 400.0);
        w.scenarios.push(v1::ScenarioRecord {
            scenario: "credit".into(),
            transactions: 3,
            energy_j: 1.0,
            carbon_g: 1.0,
            ..Default::default()
        });
        w.profile.push(v1::ProfileStack {
            service: "loan".into(),
            scenario: "credit".into(),
            stack: "main;hot".into(),
            samples: 3,
            energy_j: 0.3,
            ..Default::default()
        });
        store.commit(&[w]).unwrap();
        let range = Range::new(T0, T0 + 3600, 3600, &store.layout()).unwrap();
        let e = evaluate_store(&store, &range, &crate::config::standard_weights(), 0.9).unwrap();
        let data = dashboard(&store, &range, e, &HotspotOptions::default(), None).unwrap();
        assert!(data.flamegraphs.is_empty());
        assert!(data
            .hotspots
            .iter()
            .all(|h| h.kind != HotspotKind::HotFunction));
        assert_eq!(
            data.withheld,
            vec!["loan/credit: flame graph and hot functions withheld: 3 samples, fewer than the minimum of 50".to_string()]
        );
    }
}
