//! The interval on a time-shift saving (#27): the job's energy per running
//! hour varies from day to day in the measured history (SQLite store, six
//! runs at 18:00); the plan moves it from 18:00 (500 g/kWh) to 02:00
//! (100 g/kWh). Point saving by hand: mean E x PUE x 400 / 3.6e6; its
//! interval is E's bootstrap interval scaled the same way, inside the
//! bounds the slowest and fastest runs give. A service whose runs all drew
//! the same energy gets an interval of zero width at the point; a
//! configured E gets none, and says why.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use sci_aggregator::config::AggregatorConfig;
use sci_aggregator::plan::shift_check::check_shift;
use sci_aggregator::plan::shifting::plan_shift;
use sci_aggregator::review::stats::Bootstrap;
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::{RollupLayout, Store};
use sci_proto::v1;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// 2026-01-01T00:00:00Z.
const DAY0: u64 = 1_767_225_600;
const NS: u64 = 1_000_000_000;
const PUE: f64 = 1.2;

fn hour_window(seq: u64, start_s: u64, services: &[(&str, f64)]) -> v1::WindowReport {
    at_intensity(seq, start_s, services, 400.0)
}

fn at_intensity(
    seq: u64,
    start_s: u64,
    services: &[(&str, f64)],
    intensity_g_per_kwh: f64,
) -> v1::WindowReport {
    v1::WindowReport {
        host: "r1".into(),
        agent_instance: "a".into(),
        seq,
        datacenter: "dc-1".into(),
        start_unix_ns: start_s * NS,
        end_unix_ns: (start_s + 3600) * NS,
        cpus: 8,
        host_energy_j: services.iter().map(|s| s.1).sum::<f64>() + 1000.0,
        busy_cpu_ns: 3600 * NS,
        carbon_intensity_g_per_kwh: intensity_g_per_kwh,
        pue: PUE,
        intensity_source: "config".into(),
        energy_source: "rapl".into(),
        processes: services
            .iter()
            .enumerate()
            .map(|(i, (service, energy_j))| v1::ProcessRecord {
                pid: i as u32 + 1,
                comm: service.to_string(),
                service: service.to_string(),
                cpu_ns: 1800 * NS,
                energy_j: *energy_j,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn a_time_shift_saving_has_an_interval_from_the_measured_energy() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
        .unwrap();
    // Days 0..6 at 18:00 (for an hour): "batch" draws 300, 320, ... 400 kJ; "steady" 360 kJ.
    let energies = [300e3, 320e3, 340e3, 360e3, 380e3, 400e3];
    // The host is measured every hour (1 of 8 cores busy): room everywhere.
    let mut windows = Vec::new();
    for (d, e) in energies.iter().enumerate() {
        for h in 0..24u64 {
            let services = if h == 18 {
                vec![("batch", *e), ("steady", 360e3)]
            } else {
                Vec::new()
            };
            windows.push(hour_window(
                d as u64 * 24 + h,
                DAY0 + d as u64 * 86_400 + h * 3600,
                &services,
            ));
        }
    }
    store.commit(&windows).unwrap();
    // The window of day 6: 18:00 at 500 g/kWh, 02:00 at 100, the rest 300.
    let release = DAY0 + 6 * 86_400 + 18 * 3600;
    let csv = dir.path().join("dc1.csv");
    let mut text = String::from("timestamp,g_per_kwh\n");
    for i in 0..12u64 {
        let v = match i {
            0 => 500.0,
            8 => 100.0,
            _ => 300.0,
        };
        text.push_str(&format!(
            "{},{v}\n",
            agent_common::time_text::format_unix_s((release + i * 3600) as i64)
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let job = |name: &str, service: &str, energy: &str| {
        format!(
            "[[scheduling.deferrable]]\nname = \"{name}\"\nservice = \"{service}\"\ndatacenter = \"dc-1\"\nrelease = \"18:00\"\ndeadline = \"06:00\"\nhours = 1\ncores = 0.5\n{energy}\n"
        )
    };
    let toml = format!(
        "database = \"{}\"\n{}{}{}[[scheduling.intensity]]\ndatacenter = \"dc-1\"\npath = \"{}\"\nformat = \"csv\"\n",
        dir.path().join("unused.db").display(),
        job("batch", "batch", ""),
        job("steady", "steady", ""),
        job("configured", "batch", "energy_j_per_hour = 350000.0"),
        csv.display()
    );
    let config = AggregatorConfig::from_toml_str(&toml, &dir.path().join("a.toml")).unwrap();
    let plan = |name: &str| {
        let job = config
            .scheduling
            .deferrable
            .iter()
            .find(|j| j.name == name)
            .unwrap();
        plan_shift(&store, &config.scheduling, job, release + 60).unwrap()
    };
    let factor = PUE * (500.0 - 100.0) / 3.6e6;

    let batch = plan("batch");
    assert_eq!(batch.planned_hours, vec![release + 8 * 3600], "{batch:?}");
    let mean_e: f64 = energies.iter().sum::<f64>() / 6.0;
    assert!((batch.energy_j_per_hour - mean_e).abs() < 1e-6);
    let point = batch.predicted_saving_g.unwrap();
    assert!((point - mean_e * factor).abs() < 1e-9, "{point}");
    assert!((point - 46.666_666_666_666_67).abs() < 1e-9, "{point}");
    let [lo, hi] = batch.predicted_saving_interval_g.unwrap();
    let [e_lo, e_hi] = batch.energy_j_per_hour_interval.unwrap();
    assert!((lo - e_lo * factor).abs() < 1e-9 && (hi - e_hi * factor).abs() < 1e-9);
    // Inside what the lightest and heaviest runs give, around the point.
    assert!(
        300e3 * factor <= lo && lo < point && point < hi && hi <= 400e3 * factor,
        "[{lo}, {hi}] around {point}"
    );
    assert!(batch.interval_note.is_none());

    let steady = plan("steady");
    let point = steady.predicted_saving_g.unwrap();
    assert!((point - 360e3 * factor).abs() < 1e-9);
    let [lo, hi] = steady.predicted_saving_interval_g.unwrap();
    assert!(
        (lo - point).abs() < 1e-9 && (hi - point).abs() < 1e-9,
        "[{lo}, {hi}]"
    );

    let configured = plan("configured");
    assert!((configured.predicted_saving_g.unwrap() - 350e3 * factor).abs() < 1e-9);
    assert!(configured.predicted_saving_interval_g.is_none());
    assert!(configured
        .interval_note
        .as_deref()
        .unwrap()
        .contains("configured"));
}

/// The check afterwards of a time-shift plan: "etl" (4 hours, 100 kJ an
/// hour in the history) is planned from 18:00-22:00 (500 g/kWh forecast)
/// to 00:00-04:00 (100). It then runs in those hours drawing 90, 100, 110
/// and 120 kJ while the measured intensity is 120, 100, 80 and 140, and
/// 480 in the baseline hours. By hand, each hour saves E x 1.2 x (480 -
/// I) / 3.6e6: 10.8 + 12.667 + 14.667 + 13.6 = 51.733 g, beside the
/// predicted 100 kJ x 1.2 x 4 x 400 / 3.6e6 = 53.333 g.
#[test]
fn a_time_shift_plan_is_checked_after_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
        .unwrap();
    let mut windows = Vec::new();
    let mut seq = 0;
    for d in 0..6u64 {
        for h in 0..24u64 {
            let services = if (18..22).contains(&h) {
                vec![("etl", 100e3)]
            } else {
                Vec::new()
            };
            windows.push(hour_window(seq, DAY0 + d * 86_400 + h * 3600, &services));
            seq += 1;
        }
    }
    store.commit(&windows).unwrap();
    let release = DAY0 + 6 * 86_400 + 18 * 3600;
    let csv = dir.path().join("dc1.csv");
    let mut text = String::from("timestamp,g_per_kwh\n");
    for i in 0..12u64 {
        let v = match i {
            0..=3 => 500.0,
            6..=9 => 100.0,
            _ => 300.0,
        };
        text.push_str(&format!(
            "{},{v}\n",
            agent_common::time_text::format_unix_s((release + i * 3600) as i64)
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let toml = format!(
        "database = \"{}\"\n[[scheduling.deferrable]]\nname = \"etl\"\nservice = \"etl\"\ndatacenter = \"dc-1\"\nrelease = \"18:00\"\ndeadline = \"06:00\"\nhours = 4\ncores = 0.5\n[[scheduling.intensity]]\ndatacenter = \"dc-1\"\npath = \"{}\"\nformat = \"csv\"\n",
        dir.path().join("unused.db").display(),
        csv.display()
    );
    let config = AggregatorConfig::from_toml_str(&toml, &dir.path().join("a.toml")).unwrap();
    let job = &config.scheduling.deferrable[0];
    let plan = plan_shift(&store, &config.scheduling, job, release + 60).unwrap();
    let planned: Vec<u64> = (6..10).map(|i| release + i * 3600).collect();
    assert_eq!(plan.planned_hours, planned, "{plan:?}");
    let predicted = 100e3 * PUE * 4.0 * 400.0 / 3.6e6;
    assert!((plan.predicted_saving_g.unwrap() - predicted).abs() < 1e-9);
    let stored = sci_aggregator::plan::store_plan(&store, "shift", "etl", release, &plan).unwrap();

    // The window as it happened: the job in the planned hours.
    let ran = [
        (6, 90e3, 120.0),
        (7, 100e3, 100.0),
        (8, 110e3, 80.0),
        (9, 120e3, 140.0),
    ];
    let mut windows = Vec::new();
    for i in 0..12u64 {
        let (services, intensity) = match ran.iter().find(|r| r.0 == i) {
            Some((_, e, g)) => (vec![("etl", *e)], *g),
            None if i < 4 => (Vec::new(), 480.0),
            None => (Vec::new(), 300.0),
        };
        windows.push(at_intensity(seq, release + i * 3600, &services, intensity));
        seq += 1;
    }
    store.commit(&windows).unwrap();
    let bootstrap = Bootstrap::default();
    let early = check_shift(&store, &stored, release + 11 * 3600, &bootstrap).unwrap_err();
    assert!(early.to_string().contains("check it after that"), "{early}");

    let check = check_shift(&store, &stored, release + 12 * 3600, &bootstrap).unwrap();
    assert_eq!(check.ran_hours, planned);
    assert!(check.ran_as_planned);
    assert!((check.baseline_intensity_g_per_kwh - 480.0).abs() < 1e-9);
    assert!((check.energy_j - 420e3).abs() < 1e-6);
    let by_hand = [10.8, 38.0 / 3.0, 44.0 / 3.0, 13.6];
    let total: f64 = by_hand.iter().sum();
    assert!((total - 51.733_333_333_333_33).abs() < 1e-9);
    assert!((check.realised_saving_g - total).abs() < 1e-9, "{check:?}");
    assert!((check.realised_saving.candidate.unwrap() - total).abs() < 1e-9);
    let (lo, hi) = (
        check.realised_saving.ci_low.unwrap(),
        check.realised_saving.ci_high.unwrap(),
    );
    assert!(
        4.0 * 10.8 <= lo && lo < total && total < hi && hi <= 4.0 * 44.0 / 3.0,
        "[{lo}, {hi}] around {total}"
    );
    // The prediction beside it, with its interval (constant E: zero width).
    assert!((check.predicted_saving_g.unwrap() - predicted).abs() < 1e-9);
    let [plo, phi] = check.predicted_saving_interval_g.unwrap();
    assert!((plo - predicted).abs() < 1e-9 && (phi - predicted).abs() < 1e-9);
    assert_eq!(
        check.prediction_within_interval,
        Some(lo <= predicted && predicted <= hi)
    );
    // The plans page shows both, as HTML and Markdown.
    use sci_aggregator::figures::mass_g;
    use sci_aggregator::plan::page::{markdown, render, PlanPage, StoredCheck};
    let range = sci_aggregator::store::Range {
        from_s: release,
        to_s: release + 12 * 3600,
        period_s: 3600,
    };
    let page = PlanPage {
        selection: sci_aggregator::plan::supplies::select(&store, &range, None, &bootstrap)
            .unwrap(),
        shifts: Vec::new(),
        pools: sci_aggregator::plan::pools::plan_pools(
            &store,
            range.from_s,
            range.to_s,
            &Default::default(),
        )
        .map_err(|e| e.to_string()),
        stored: vec![(stored.clone(), Some(Ok(StoredCheck::Shift(check.clone()))))],
    };
    let html = render(&page);
    let md = markdown(&page);
    for text in [&html, &md] {
        assert!(text.contains(&mass_g(total)), "{text}");
        assert!(text.contains(&mass_g(predicted)), "{text}");
        assert!(
            text.contains(&format!("[{}, {}]", mass_g(lo), mass_g(hi))),
            "{text}"
        );
    }
    assert!(
        md.contains(&format!("| {} | shift | etl |", stored.id)),
        "{md}"
    );
}
