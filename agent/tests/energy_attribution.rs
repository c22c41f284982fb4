//! Attribution: hand-computed cases, and conservation asserted every window.
#![allow(clippy::unwrap_used)]

use sci_agent::sources::energy::{
    DomainKind, DomainReading, EnergySource, ModelSource, PowerModel, WindowEnergy,
};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sci_agent::sources::sched::proc_info::ProcInfo;
use sci_agent::sources::sched::{CpuSample, ProcessCpu};
use sci_agent::transforms::attribution::{conservation_holds, Attributor};
use sci_agent::window::{CpuSource, LossCounters, ProcessRecord, WindowReport};

const S: u64 = 1_000_000_000;

fn proc(pid: u32, cpu_ns: u64, per_cpu: Vec<u64>) -> ProcessCpu {
    ProcessCpu {
        pid,
        info: Arc::new(ProcInfo {
            comm: format!("p{pid}").into(),
            ..Default::default()
        }),
        cpu_ns,
        cpu_ns_per_cpu: per_cpu,
        ..Default::default()
    }
}

fn sample(cpus: u32, idle: Vec<u64>, unowned: Vec<u64>, processes: Vec<ProcessCpu>) -> CpuSample {
    CpuSample {
        source: CpuSource::Ebpf,
        start_unix_ns: 1_700_000_000 * S,
        end_unix_ns: 1_700_000_000 * S + S,
        cpus,
        idle_ns_per_cpu: idle,
        unowned_busy_ns_per_cpu: unowned,
        processes,
        lost: LossCounters::default(),
    }
}

fn report_for(sample: &CpuSample) -> WindowReport {
    let mut r = WindowReport::new(
        "h".into(),
        "i".into(),
        sample.start_unix_ns,
        sample.end_unix_ns,
        sample.source,
        sample.cpus,
    );
    r.processes = sample
        .processes
        .iter()
        .map(|p| ProcessRecord {
            pid: p.pid,
            comm: p.info.comm.clone(),
            cpu_ns: p.cpu_ns,
            ..Default::default()
        })
        .collect();
    r.busy_cpu_ns = sample.busy_cpu_ns();
    r.idle_cpu_ns = sample.idle_cpu_ns();
    r
}

fn domain(
    name: &str,
    kind: DomainKind,
    package: Option<u32>,
    cpus: Vec<u32>,
    energy_j: f64,
    counted: bool,
) -> DomainReading {
    DomainReading {
        name: name.into(),
        kind,
        package,
        cpus,
        energy_j,
        counts_toward_host: counted,
        idle_power_w: None,
        known_idle_j: None,
    }
}

fn rapl(domains: Vec<DomainReading>) -> WindowEnergy {
    WindowEnergy {
        source: "rapl-powercap".into(),
        estimated: false,
        duration_ns: S,
        domains,
        warnings: vec![],
        faults: Default::default(),
        sample_interval_ns: S,
        host_factors: None,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn two_packages_hand_computed() {
    // CPUs 0,1 on package 0; CPUs 2,3 on package 1. One second.
    // A runs 0.5 s on each of CPU 0 and 1; B 1 s on CPU 2; C 0.4 s with no per-CPU split
    // (spread: 0.2 s on each package); 0.2 s of unowned busy time on CPU 3.
    let s = sample(
        4,
        vec![S / 2, S / 2, 0, S * 8 / 10],
        vec![0, 0, 0, S / 5],
        vec![
            proc(1, S, vec![S / 2, S / 2, 0, 0]),
            proc(2, S, vec![0, 0, S, 0]),
            proc(3, 2 * S / 5, vec![]),
        ],
    );
    // package-0 100 J + dram 20 J, package-1 60 J + dram 10 J = 190 J; core is inside package-0.
    let e = rapl(vec![
        domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0, 1],
            100.0,
            true,
        ),
        domain(
            "package-0/core",
            DomainKind::Core,
            Some(0),
            vec![0, 1],
            70.0,
            false,
        ),
        domain(
            "package-0/dram",
            DomainKind::Dram,
            Some(0),
            vec![0, 1],
            20.0,
            true,
        ),
        domain(
            "package-1",
            DomainKind::Package,
            Some(1),
            vec![2, 3],
            60.0,
            true,
        ),
        domain(
            "package-1/dram",
            DomainKind::Dram,
            Some(1),
            vec![2, 3],
            10.0,
            true,
        ),
    ]);
    // Idle 19 W from config: 19 J idle, 171 J dynamic = 0.9 of each domain.
    // Package 0 side: 0.9 * 120 = 108 J over 1.2 s busy (A 1.0, C 0.2): A 90, C 18.
    // Package 1 side: 0.9 * 70 = 63 J over 1.4 s busy (B 1.0, C 0.2, unowned 0.2): B 45, C 9, unattributed 9.
    let mut a = Attributor::with_idle_power(Some(19.0));
    let mut r = report_for(&s);
    a.attribute(&s, &e, &mut r);
    assert!(close(r.host_energy_j, 190.0));
    assert!(close(r.idle_energy_j, 19.0));
    assert!(
        close(r.processes[0].energy_j, 90.0),
        "{}",
        r.processes[0].energy_j
    );
    assert!(
        close(r.processes[1].energy_j, 45.0),
        "{}",
        r.processes[1].energy_j
    );
    assert!(
        close(r.processes[2].energy_j, 27.0),
        "{}",
        r.processes[2].energy_j
    );
    assert!(
        close(r.unattributed_energy_j, 9.0),
        "{}",
        r.unattributed_energy_j
    );
    // Idle shares by busy CPU time: 2.6 s busy in all.
    assert!(close(r.processes[0].idle_share_j, 19.0 / 2.6));
    assert!(close(r.processes[2].idle_share_j, 19.0 * 0.4 / 2.6));
    assert_eq!(r.idle_baseline_source, "config");
    assert_eq!(
        (r.energy_source.as_str(), r.estimated),
        ("rapl-powercap", false)
    );
    let names: Vec<&str> = r.domains.iter().map(|d| d.domain.as_str()).collect();
    assert_eq!(
        names,
        ["package-0", "package-0/dram", "package-1", "package-1/dram"]
    );
    assert!(conservation_holds(&r));
    assert_eq!(r.conservation_violations, 0);
}

#[test]
fn procfs_processes_without_per_cpu_split_with_the_model() {
    // 4 vCPU, 1 s, 2 s busy of 4: u = 0.5. CCF: P = 4 * (0.74 + 2.76 * 0.5) = 8.48 W.
    let s = sample(
        4,
        vec![S / 2; 4],
        vec![0; 4],
        vec![proc(10, 3 * S / 2, vec![]), proc(11, S / 2, vec![])],
    );
    let mut model = ModelSource::new(PowerModel::ccf(), 4);
    let e = model.window_energy(&s).unwrap();
    let mut a = Attributor::with_idle_power(None);
    let mut r = report_for(&s);
    a.attribute(&s, &e, &mut r);
    assert!(close(r.host_energy_j, 8.48));
    // Model idle: 4 * 0.74 = 2.96 J; dynamic 5.52 J split 3:1.
    assert!(close(r.idle_energy_j, 2.96));
    assert!(close(r.processes[0].energy_j, 4.14));
    assert!(close(r.processes[1].energy_j, 1.38));
    assert!(close(r.unattributed_energy_j, 0.0));
    assert_eq!(
        (
            r.energy_source.as_str(),
            r.estimated,
            r.idle_baseline_source.as_str()
        ),
        ("model-linear", true, "model")
    );
    assert!(conservation_holds(&r));
}

#[test]
fn energy_below_baseline_is_all_idle() {
    let s = sample(
        2,
        vec![S / 2; 2],
        vec![0; 2],
        vec![proc(1, S, vec![S / 2, S / 2])],
    );
    let e = rapl(vec![domain(
        "package-0",
        DomainKind::Package,
        Some(0),
        vec![0, 1],
        30.0,
        true,
    )]);
    let mut a = Attributor::with_idle_power(Some(100.0));
    let mut r = report_for(&s);
    a.attribute(&s, &e, &mut r);
    assert!(
        close(r.idle_energy_j, 30.0),
        "idle capped at the measured energy"
    );
    assert_eq!(r.processes[0].energy_j, 0.0);
    assert!(close(r.processes[0].idle_share_j, 30.0));
    assert_eq!(r.unattributed_energy_j, 0.0);
    assert!(conservation_holds(&r));
}

#[test]
fn no_process_at_all() {
    let s = sample(2, vec![S; 2], vec![0; 2], vec![]);
    let e = rapl(vec![domain(
        "package-0",
        DomainKind::Package,
        Some(0),
        vec![0, 1],
        50.0,
        true,
    )]);
    let mut a = Attributor::with_idle_power(Some(20.0));
    let mut r = report_for(&s);
    a.attribute(&s, &e, &mut r);
    assert!(close(r.idle_energy_j, 20.0));
    assert!(close(r.unattributed_energy_j, 30.0));
    assert!(conservation_holds(&r));
    assert_eq!(r.conservation_violations, 0);
}

#[test]
fn package_whose_cpus_ran_nothing_is_unattributed() {
    // All the work on package 0; package 1's dynamic energy has no process to go to.
    let s = sample(
        4,
        vec![0, 0, S, S],
        vec![0; 4],
        vec![proc(1, 2 * S, vec![S, S, 0, 0])],
    );
    let e = rapl(vec![
        domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0, 1],
            40.0,
            true,
        ),
        domain(
            "package-1",
            DomainKind::Package,
            Some(1),
            vec![2, 3],
            20.0,
            true,
        ),
    ]);
    let mut a = Attributor::with_idle_power(Some(12.0)); // 8 J idle on package 0, 4 J on package 1
    let mut r = report_for(&s);
    a.attribute(&s, &e, &mut r);
    assert!(close(r.processes[0].energy_j, 32.0));
    assert!(close(r.unattributed_energy_j, 16.0));
    assert!(close(r.idle_energy_j, 12.0));
    assert!(conservation_holds(&r));
}

#[test]
fn learned_baseline_from_low_utilisation_windows() {
    let mut a = Attributor::with_idle_power(None);
    // Window 1: 5 % busy, 20 J -> idle learned 20 W.
    let s1 = sample(
        2,
        vec![S * 95 / 100; 2],
        vec![0; 2],
        vec![proc(1, S / 10, vec![S / 20, S / 20])],
    );
    let mut r1 = report_for(&s1);
    a.attribute(
        &s1,
        &rapl(vec![domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0, 1],
            20.0,
            true,
        )]),
        &mut r1,
    );
    assert_eq!(r1.idle_baseline_source, "learned");
    assert!(close(a.learned_idle_power_w("package-0").unwrap(), 20.0));
    // Window 2: 50 % busy, 60 J -> 20 J idle, 40 J to the process.
    let s2 = sample(
        2,
        vec![S / 2; 2],
        vec![0; 2],
        vec![proc(1, S, vec![S / 2, S / 2])],
    );
    let mut r2 = report_for(&s2);
    a.attribute(
        &s2,
        &rapl(vec![domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0, 1],
            60.0,
            true,
        )]),
        &mut r2,
    );
    assert!(close(r2.idle_energy_j, 20.0));
    assert!(close(r2.processes[0].energy_j, 40.0));
    assert!(conservation_holds(&r1) && conservation_holds(&r2));
}

/// Deterministic pseudo-random windows: conservation is asserted on every one.
#[test]
fn conservation_every_window() {
    let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut next = move |bound: u64| rng.random_range(0..bound.max(1));
    for idle_cfg in [None, Some(35.0)] {
        let mut a = Attributor::with_idle_power(idle_cfg);
        for window in 0..500 {
            let cpus = 1 + next(8) as u32;
            let mut processes = Vec::new();
            for pid in 0..next(12) {
                let per_cpu: Vec<u64> = if next(3) == 0 {
                    vec![]
                } else {
                    (0..cpus).map(|_| next(S / 4)).collect()
                };
                let cpu_ns = if per_cpu.is_empty() {
                    next(S)
                } else {
                    per_cpu.iter().sum()
                };
                processes.push(proc(pid as u32 + 1, cpu_ns, per_cpu));
            }
            let unowned: Vec<u64> = (0..cpus)
                .map(|_| if next(4) == 0 { next(S / 10) } else { 0 })
                .collect();
            let idle: Vec<u64> = (0..cpus).map(|_| next(S)).collect();
            let s = sample(cpus, idle, unowned, processes);
            let half = cpus.div_ceil(2);
            let e = rapl(vec![
                domain(
                    "package-0",
                    DomainKind::Package,
                    Some(0),
                    (0..half).collect(),
                    next(200_000) as f64 / 1000.0,
                    true,
                ),
                domain(
                    "package-1",
                    DomainKind::Package,
                    Some(1),
                    (half..cpus).collect(),
                    next(200_000) as f64 / 1000.0,
                    true,
                ),
                domain(
                    "package-0/dram",
                    DomainKind::Dram,
                    Some(0),
                    (0..half).collect(),
                    next(20_000) as f64 / 1000.0,
                    true,
                ),
                domain(
                    "package-0/core",
                    DomainKind::Core,
                    Some(0),
                    (0..half).collect(),
                    1.0e6,
                    false,
                ),
            ]);
            let mut r = report_for(&s);
            a.attribute(&s, &e, &mut r);
            assert!(conservation_holds(&r), "window {window}: {r:?}");
            let expected_host: f64 = e
                .domains
                .iter()
                .filter(|d| d.counts_toward_host)
                .map(|d| d.energy_j)
                .sum();
            assert!(close(r.host_energy_j, expected_host));
            assert!(r
                .processes
                .iter()
                .all(|p| p.energy_j >= 0.0 && p.idle_share_j >= 0.0));
            assert!(r.idle_energy_j <= r.host_energy_j && r.unattributed_energy_j >= 0.0);
        }
        assert_eq!(a.conservation_violations(), 0);
    }
}

#[test]
fn bad_domains_are_left_out_and_violations_counted() {
    let s = sample(1, vec![0], vec![0], vec![proc(1, S, vec![S])]);
    let mut a = Attributor::with_idle_power(Some(1.0));
    // A source bug (NaN or negative joules) is left out, not counted as 0 or as a negative.
    let mut r = report_for(&s);
    let e = rapl(vec![
        domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0],
            5.0,
            true,
        ),
        domain(
            "package-1",
            DomainKind::Package,
            Some(1),
            vec![0],
            f64::NAN,
            true,
        ),
        domain(
            "package-2",
            DomainKind::Package,
            Some(2),
            vec![0],
            -3.0,
            true,
        ),
    ]);
    a.attribute(&s, &e, &mut r);
    assert!(close(r.host_energy_j, 5.0) && close(r.processes[0].energy_j, 4.0));
    assert_eq!(r.domains.len(), 1);
    assert_eq!(r.conservation_violations, 0);
    // A report that does not add up (e.g. edited by a later stage) is counted.
    r.processes[0].energy_j += 0.5;
    assert!(!a.check_conservation(&mut r));
    assert_eq!(
        (a.conservation_violations(), r.conservation_violations),
        (1, 1)
    );
    let mut r = report_for(&s);
    a.attribute(
        &s,
        &rapl(vec![domain(
            "package-0",
            DomainKind::Package,
            Some(0),
            vec![0],
            5.0,
            true,
        )]),
        &mut r,
    );
    assert_eq!(r.conservation_violations, 1, "a good window adds none");
}
