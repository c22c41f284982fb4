//! Carbon: the SCI formulas against hand computations; intensity files.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use sci_agent::config::AgentConfig;
use sci_agent::transforms::carbon::{CarbonConfig, CarbonError, CarbonTransform, IntensitySource};
use sci_agent::window::{CpuSource, ProcessRecord, WindowReport};

const HOUR_NS: u64 = 3_600_000_000_000;
const T0: u64 = 1_704_067_200; // 2024-01-01T00:00:00Z

fn report(start_s: u64, duration_ns: u64) -> WindowReport {
    WindowReport::new(
        "h".into(),
        "i".into(),
        start_s * 1_000_000_000,
        start_s * 1_000_000_000 + duration_ns,
        CpuSource::Ebpf,
        4,
    )
}

#[test]
fn worked_sci_example_embodied() {
    // TE = 1000 kg, EL = 4 years, TiR = 1 h, RR/ToR = 1: 1000e3 g / (4 * 8760) = 28.54 g.
    let t = CarbonTransform::from_config(&CarbonConfig {
        host_kind: sci_agent::transforms::carbon::HostKind::BareMetal,
        ..CarbonConfig::default()
    })
    .unwrap();
    let mut r = report(T0, HOUR_NS);
    t.apply(&mut r).unwrap();
    assert!(
        (r.host_embodied_g - 28.54).abs() < 0.01,
        "{}",
        r.host_embodied_g
    );
    assert!((r.host_embodied_g - 1.0e6 / 35_040.0).abs() < 1e-9);
}

#[test]
fn operational_carbon_by_hand() {
    // 3.6e6 J = 1 kWh at the China 2023 average (530.6 g/kWh).
    let t = CarbonTransform::from_config(&CarbonConfig::default()).unwrap();
    let mut r = report(T0, HOUR_NS);
    r.host_energy_j = 3.6e6;
    r.busy_cpu_ns = 4 * HOUR_NS;
    r.processes = vec![
        ProcessRecord {
            pid: 1,
            cpu_ns: 3 * HOUR_NS,
            energy_j: 1.0e6,
            idle_share_j: 0.8e6,
            ..Default::default()
        },
        ProcessRecord {
            pid: 2,
            cpu_ns: HOUR_NS,
            energy_j: 0.9e6,
            ..Default::default()
        },
    ];
    t.apply(&mut r).unwrap();
    assert!((r.host_carbon_g - 530.6).abs() < 1e-9);
    assert_eq!((r.carbon_intensity_g_per_kwh, r.pue), (530.6, 1.0));
    // Process 1: (1.0e6 + 0.8e6) J = 0.5 kWh -> 265.3 g; embodied 3/4 of the host's.
    assert!((r.processes[0].carbon_g - 265.3).abs() < 1e-9);
    assert!((r.processes[1].carbon_g - 132.65).abs() < 1e-9);
    assert!((r.processes[0].embodied_g - 0.75 * r.host_embodied_g).abs() < 1e-12);

    // PUE 1.2 -> 636.72 g.
    let t = CarbonTransform::from_config(&CarbonConfig {
        pue: 1.2,
        ..Default::default()
    })
    .unwrap();
    t.apply(&mut r).unwrap();
    assert!(
        (r.host_carbon_g - 636.72).abs() < 1e-9,
        "{}",
        r.host_carbon_g
    );
    assert_eq!(r.pue, 1.2);

    // A named regional grid.
    let t = CarbonTransform::from_config(&CarbonConfig {
        grid: Some("east".into()),
        ..Default::default()
    })
    .unwrap();
    t.apply(&mut r).unwrap();
    assert!((r.host_carbon_g - 550.0).abs() < 1e-9);
}

#[test]
fn config_errors_are_clear() {
    let cases: [(CarbonConfig, &str); 5] = [
        (
            CarbonConfig {
                pue: 0.9,
                ..Default::default()
            },
            "carbon.pue = 0.9 must be between 1.0 and 5",
        ),
        (
            CarbonConfig {
                grid: Some("mars".into()),
                ..Default::default()
            },
            "carbon.grid = \"mars\" is not one of china, north",
        ),
        (
            CarbonConfig {
                grid: Some("east".into()),
                intensity_g_per_kwh: Some(500.0),
                ..Default::default()
            },
            "set only one of",
        ),
        (
            CarbonConfig {
                lifetime_years: 0.0,
                ..Default::default()
            },
            "carbon.lifetime_years",
        ),
        (
            CarbonConfig {
                intensity_file: Some("/nonexistent/sci-intensity.csv".into()),
                ..Default::default()
            },
            "/nonexistent/sci-intensity.csv",
        ),
    ];
    for (cfg, message) in cases {
        let err = CarbonTransform::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
}

#[test]
fn agent_toml_sections() {
    let text = r#"
[energy]
sysfs_root = "/host/sys"
power_model = "tdp:150"
idle_power_w = 42.5
host_domains = "psys"

[carbon]
grid = "south"
pue = 1.3
embodied_kg_per_host = 1500
lifetime_years = 5
"#;
    let cfg = AgentConfig::from_toml_str(text, Path::new("agent.toml")).unwrap();
    assert_eq!(cfg.energy.sysfs_root, Path::new("/host/sys"));
    assert_eq!(cfg.energy.idle_power_w, Some(42.5));
    assert_eq!(cfg.energy.source, "auto");
    assert_eq!(cfg.carbon.grid.as_deref(), Some("south"));
    assert_eq!(
        (
            cfg.carbon.pue,
            cfg.carbon.embodied_kg_per_host,
            cfg.carbon.lifetime_years
        ),
        (1.3, 1500.0, 5.0)
    );
    let err = AgentConfig::from_toml_str("[energy]\nsysfs_rot = \"/x\"\n", Path::new("agent.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sysfs_rot"), "{err}");
}

#[test]
fn intensity_series_lookup_at_window_midpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.csv");
    std::fs::write(
        &path,
        format!(
            "timestamp,g_per_kwh\n# hourly\n{T0},500\n2024-01-01T09:00:00+08:00,400.5\n\n{},300\n",
            T0 + 7200
        ),
    )
    .unwrap();
    let t = CarbonTransform::from_config(&CarbonConfig {
        intensity_file: Some(path.clone()),
        ..Default::default()
    })
    .unwrap();
    // Window 00:50-01:20: midpoint 01:05 -> second row (09:00+08:00 = 01:00Z).
    let mut r = report(T0 + 3000, 1_800_000_000_000);
    r.host_energy_j = 3.6e6;
    t.apply(&mut r).unwrap();
    assert_eq!(r.carbon_intensity_g_per_kwh, 400.5);
    assert!((r.host_carbon_g - 400.5).abs() < 1e-9);
    // Window 00:10-00:20 -> first row.
    let mut r = report(T0 + 600, 600_000_000_000);
    t.apply(&mut r).unwrap();
    assert_eq!(r.carbon_intensity_g_per_kwh, 500.0);
    // 02:30 -> last row, still in force for an hour.
    let mut r = report(T0 + 9000, 1_000_000_000);
    t.apply(&mut r).unwrap();
    assert_eq!(r.carbon_intensity_g_per_kwh, 300.0);
    // Before the file starts, and long after it ends: errors naming the file; report untouched.
    for start in [T0 - 3600, T0 + 4 * 3600] {
        let mut r = report(start, 1_000_000_000);
        let err = t.apply(&mut r).unwrap_err();
        assert!(matches!(err, CarbonError::NoIntensity { .. }), "{err}");
        assert!(err.to_string().contains("grid.csv"), "{err}");
        assert_eq!(r.carbon_intensity_g_per_kwh, 0.0);
    }
}

#[test]
fn intensity_series_bad_rows_name_file_and_line() {
    let cases = [
        (
            format!("{T0},500\n{},abc\n", T0 + 3600),
            2,
            "intensity \"abc\"",
        ),
        (
            format!("{T0},500\n{T0},510\n"),
            2,
            "not after the previous row",
        ),
        (format!("# c\n{T0},500,7\n"), 2, "expected 2 fields"),
        (
            format!("{T0},500\nnoon,510\n"),
            2,
            "neither unix seconds nor RFC 3339",
        ),
        (format!("{T0},-4\n"), 1, "non-negative"),
        ("timestamp,g_per_kwh\n".to_string(), 0, "no data rows"),
    ];
    for (text, line, reason) in cases {
        let err = IntensitySource::parse_csv(&text, Path::new("/etc/sci/grid.csv")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&format!("/etc/sci/grid.csv line {line}: "))
                && message.contains(reason),
            "{message}"
        );
    }
}
