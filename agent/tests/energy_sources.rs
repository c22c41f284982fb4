//! Energy sources against synthetic sysfs trees laid out like the kernel's.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sci_agent::sources::energy::{
    select_energy_source, select_energy_source_with, CpuTopology, DomainKind, EnergyConfig,
    EnergyCounter, EnergyError, EnergySource, HostDomains, PerfCounterOpener, PerfPmuSource,
    PowercapSource,
};
use sci_agent::sources::sched::CpuSample;
use sci_agent::window::{CpuSource, LossCounters};

fn sample(duration_ns: u64, cpus: u32) -> CpuSample {
    CpuSample {
        source: CpuSource::Procfs,
        start_unix_ns: 1_700_000_000_000_000_000,
        end_unix_ns: 1_700_000_000_000_000_000 + duration_ns,
        cpus,
        idle_ns_per_cpu: vec![duration_ns; cpus as usize],
        unowned_busy_ns_per_cpu: vec![0; cpus as usize],
        processes: Vec::new(),
        lost: LossCounters::default(),
    }
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn zone(root: &Path, id: &str, name: &str, energy_uj: u64, max_uj: u64) -> PathBuf {
    let dir = root.join("class/powercap").join(id);
    write(&dir.join("name"), &format!("{name}\n"));
    write(&dir.join("energy_uj"), &format!("{energy_uj}\n"));
    write(&dir.join("max_energy_range_uj"), &format!("{max_uj}\n"));
    dir
}

fn set_energy(root: &Path, id: &str, energy_uj: u64) {
    fs::write(
        root.join("class/powercap").join(id).join("energy_uj"),
        format!("{energy_uj}\n"),
    )
    .unwrap();
}

fn topology(root: &Path, packages: &[u32]) {
    for (cpu, pkg) in packages.iter().enumerate() {
        write(
            &root.join(format!(
                "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
            )),
            &format!("{pkg}\n"),
        );
    }
}

const MAX_UJ: u64 = 262_143_328_850;

/// Rewrites powercap `energy_uj` files from this process's CPU time (20 W
/// per busy CPU) every millisecond until dropped: counters that move with
/// the real load, as RAPL's do, for the start-up probe.
struct LiveZones {
    stop: Arc<std::sync::atomic::AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl LiveZones {
    fn start(root: &Path, ids: &[&str]) -> LiveZones {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let files: Vec<PathBuf> = ids
            .iter()
            .map(|id| root.join("class/powercap").join(id).join("energy_uj"))
            .collect();
        let flag = Arc::clone(&stop);
        let writer = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let uj = (process_cpu_s() * 20e6) as u64 + 1_000_000;
                for f in &files {
                    // Whole values only, as sysfs gives them (a plain write
                    // truncates first, and a reader could see an empty file).
                    let tmp = f.with_extension("tmp");
                    if fs::write(&tmp, format!("{uj}\n")).is_ok() {
                        let _ = fs::rename(&tmp, f);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        LiveZones {
            stop,
            writer: Some(writer),
        }
    }
}

impl Drop for LiveZones {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Every CPU of a `cpus`-CPU sample busy for the whole window.
fn busy_sample(duration_ns: u64, cpus: u32) -> CpuSample {
    let mut s = sample(duration_ns, cpus);
    s.idle_ns_per_cpu = vec![0; cpus as usize];
    s.unowned_busy_ns_per_cpu = vec![duration_ns; cpus as usize];
    s
}

/// Two packages, each with core and dram sub-zones, plus a psys zone.
fn two_package_tree(root: &Path) {
    topology(root, &[0, 0, 1, 1]);
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    zone(root, "intel-rapl:0:0", "core", 500_000, MAX_UJ);
    zone(root, "intel-rapl:0:1", "dram", 300_000, MAX_UJ);
    zone(root, "intel-rapl:1", "package-1", 2_000_000, MAX_UJ);
    zone(root, "intel-rapl:1:0", "core", 700_000, MAX_UJ);
    zone(root, "intel-rapl:1:1", "dram", 400_000, MAX_UJ);
    zone(root, "intel-rapl:2", "psys", 9_000_000, MAX_UJ);
    // MMIO duplicate of package-0: must be ignored.
    zone(root, "intel-rapl-mmio:0", "package-0", 55, MAX_UJ);
}

fn cfg(root: &Path) -> EnergyConfig {
    EnergyConfig {
        sysfs_root: root.to_path_buf(),
        ..EnergyConfig::default()
    }
}

fn powercap(root: &Path, cfg: &EnergyConfig) -> PowercapSource {
    PowercapSource::discover(root, &CpuTopology::read(root, 4), cfg).unwrap()
}

fn domain_j(e: &sci_agent::sources::energy::WindowEnergy, name: &str) -> Option<f64> {
    e.domains
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.energy_j)
}

#[test]
fn powercap_packages_and_dram_without_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    two_package_tree(root);
    let mut src = powercap(root, &cfg(root));
    assert_eq!(
        src.domain_names(),
        [
            "package-0",
            "package-0/core",
            "package-0/dram",
            "package-1",
            "package-1/core",
            "package-1/dram",
            "psys"
        ]
    );
    set_energy(root, "intel-rapl:0", 1_000_000 + 40_000_000); // 40 J
    set_energy(root, "intel-rapl:0:0", 500_000 + 25_000_000); // 25 J, inside package-0
    set_energy(root, "intel-rapl:0:1", 300_000 + 6_000_000); // 6 J
    set_energy(root, "intel-rapl:1", 2_000_000 + 30_000_000); // 30 J
    set_energy(root, "intel-rapl:1:0", 700_000 + 20_000_000);
    set_energy(root, "intel-rapl:1:1", 400_000 + 4_000_000); // 4 J
    set_energy(root, "intel-rapl:2", 9_000_000 + 95_000_000); // 95 J
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert_eq!(e.source, "rapl-powercap");
    assert!(!e.estimated);
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
    assert_eq!(domain_j(&e, "package-0"), Some(40.0));
    assert_eq!(domain_j(&e, "package-0/core"), Some(25.0));
    assert_eq!(domain_j(&e, "package-1/dram"), Some(4.0));
    // packages + dram; core and psys are informational.
    assert!((e.host_energy_j() - (40.0 + 6.0 + 30.0 + 4.0)).abs() < 1e-9);
    let p1 = e.domains.iter().find(|d| d.name == "package-1").unwrap();
    assert_eq!(
        (p1.kind, p1.package, p1.cpus.clone(), p1.counts_toward_host),
        (DomainKind::Package, Some(1), vec![2, 3], true)
    );
    let core = e
        .domains
        .iter()
        .find(|d| d.name == "package-0/core")
        .unwrap();
    assert!(!core.counts_toward_host);
    let dram = e
        .domains
        .iter()
        .find(|d| d.name == "package-0/dram")
        .unwrap();
    assert_eq!(
        (dram.kind, dram.cpus.clone(), dram.counts_toward_host),
        (DomainKind::Dram, vec![0, 1], true)
    );

    // With psys chosen, the host is psys alone.
    let mut psys_cfg = cfg(root);
    psys_cfg.host_domains = HostDomains::Psys;
    let mut src = powercap(root, &psys_cfg);
    set_energy(root, "intel-rapl:2", 104_000_000 + 50_000_000);
    set_energy(root, "intel-rapl:0", 41_000_000 + 1_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert!((e.host_energy_j() - 50.0).abs() < 1e-9);
    assert_eq!(e.domains.iter().filter(|d| d.counts_toward_host).count(), 1);
}

/// The kernel's powercap counter: `energy_uj` takes the values
/// `0..=max_energy_range_uj` and the value after `max_energy_range_uj` is 0,
/// i.e. it counts modulo `max_energy_range_uj + 1`.
fn kernel_counter_after(value_uj: u64, spent_uj: u64, max_energy_range_uj: u64) -> u64 {
    (value_uj + spent_uj) % (max_energy_range_uj + 1)
}

#[test]
fn powercap_wrap_around_between_two_reads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let max = 65_532_610_987; // a real max_energy_range_uj
    let start = 65_529_610_988; // 3 J before the counter reads 0 again
                                // The boundary values, written out: 2,999,999 uJ up to the top, one
                                // more to restart at 0, then 2.5 J more.
    assert_eq!(kernel_counter_after(start, 2_999_999, max), 65_532_610_987);
    assert_eq!(kernel_counter_after(start, 3_000_000, max), 0);
    assert_eq!(kernel_counter_after(start, 5_500_000, max), 2_500_000);
    zone(root, "intel-rapl:0", "package-0", start, max);
    let mut src = powercap(root, &cfg(root));
    set_energy(
        root,
        "intel-rapl:0",
        kernel_counter_after(start, 5_500_000, max),
    );
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    let j = domain_j(&e, "package-0").unwrap();
    assert!((j - 5.5).abs() < 1e-9, "{j} J across the wrap, 5.5 J spent");
    // And the next window continues from the wrapped value.
    set_energy(root, "intel-rapl:0", 3_500_000);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert!((domain_j(&e, "package-0").unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn powercap_counter_at_its_top_and_just_after() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let max = 262_143_328_850; // a real max_energy_range_uj
    zone(root, "intel-rapl:0", "package-0", max - 1_000_000, max);
    let mut src = powercap(root, &cfg(root));
    // A window that ends with the counter exactly at its top: 1 J, no wrap.
    assert_eq!(kernel_counter_after(max - 1_000_000, 1_000_000, max), max);
    set_energy(root, "intel-rapl:0", max);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    let j = domain_j(&e, "package-0").unwrap();
    assert!((j - 1.0).abs() < 1e-9, "{j} J up to the top");
    // The next one starts at the top: 2 J takes it to 1,999,999.
    assert_eq!(kernel_counter_after(max, 2_000_000, max), 1_999_999);
    set_energy(root, "intel-rapl:0", 1_999_999);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    let j = domain_j(&e, "package-0").unwrap();
    assert!(
        (j - 2.0).abs() < 1e-9,
        "{j} J from the top across the restart"
    );
}

#[test]
fn powercap_zone_that_disappears_is_reported_not_zero() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    two_package_tree(root);
    let mut src = powercap(root, &cfg(root));
    fs::remove_dir_all(root.join("class/powercap/intel-rapl:1")).unwrap();
    set_energy(root, "intel-rapl:0", 11_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert_eq!(
        domain_j(&e, "package-1"),
        None,
        "a vanished package must be left out, not reported as 0 J"
    );
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("intel-rapl:1 (package-1) left out of this window")),
        "{:?}",
        e.warnings
    );
    assert!((e.host_energy_j() - 10.0).abs() < 1e-9);

    // It comes back: re-based (no energy this window), then measured again.
    zone(root, "intel-rapl:1", "package-1", 5_000_000, MAX_UJ);
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-1") && w.contains("re-based")),
        "{:?}",
        e.warnings
    );
    assert_eq!(domain_j(&e, "package-1"), None);
    set_energy(root, "intel-rapl:1", 12_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert!((domain_j(&e, "package-1").unwrap() - 7.0).abs() < 1e-9);

    // Every counted zone gone: an error, never a 0 W host.
    for id in [
        "intel-rapl:0",
        "intel-rapl:0:1",
        "intel-rapl:1",
        "intel-rapl:1:1",
    ] {
        fs::remove_dir_all(root.join("class/powercap").join(id)).unwrap();
    }
    let err = src.window_energy(&sample(1_000_000_000, 4)).unwrap_err();
    assert!(matches!(err, EnergyError::AllDomainsFailed(_)), "{err}");
    assert!(err.to_string().contains("package-0"), "{err}");
}

#[test]
fn powercap_unreadable_and_non_numeric_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    zone(root, "intel-rapl:1", "package-1", 1_000_000, MAX_UJ);
    let mut src = powercap(root, &cfg(root));
    // A directory where the counter file should be (chmod 000 does not stop root).
    let p1 = root.join("class/powercap/intel-rapl:1/energy_uj");
    fs::remove_file(&p1).unwrap();
    fs::create_dir(&p1).unwrap();
    fs::write(
        root.join("class/powercap/intel-rapl:0/energy_uj"),
        "12abc\n",
    )
    .unwrap();
    let err = src
        .window_energy(&sample(1_000_000_000, 2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("intel-rapl:0/energy_uj")
            && err.contains("expected an unsigned integer, found \"12abc\""),
        "{err}"
    );
    assert!(err.contains("intel-rapl:1/energy_uj"), "{err}");

    // Discovery with an unreadable name file skips that zone with a reason.
    let dir2 = tempfile::tempdir().unwrap();
    let root2 = dir2.path();
    zone(root2, "intel-rapl:0", "package-0", 1, MAX_UJ);
    let bad = zone(root2, "intel-rapl:1", "package-1", 1, MAX_UJ);
    fs::write(bad.join("max_energy_range_uj"), "lots\n").unwrap();
    let mut src = powercap(root2, &cfg(root2));
    assert_eq!(src.domain_names(), ["package-0"]);
    set_energy(root2, "intel-rapl:0", 2_000_001);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("intel-rapl:1 (package-1) skipped") && w.contains("\"lots\"")),
        "{:?}",
        e.warnings
    );

    // No powercap at all.
    let empty = tempfile::tempdir().unwrap();
    let err = PowercapSource::discover(
        empty.path(),
        &CpuTopology::single_package(2),
        &cfg(empty.path()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("class/powercap"), "{err}");
}

#[test]
fn powercap_absurd_values_rejected_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(
        root,
        "intel-rapl:0",
        "package-0",
        1_000_000,
        100_000_000_000,
    );
    zone(
        root,
        "intel-rapl:1",
        "package-1",
        1_000_000,
        100_000_000_000,
    );
    let mut c = cfg(root);
    c.max_domain_power_w = 500.0;
    let mut src = powercap(root, &c);
    set_energy(root, "intel-rapl:0", 1_000_000 + 1_200_000_000); // 1200 J in 2 s = 600 W
    set_energy(root, "intel-rapl:1", 1_000_000 + 100_000_000); // 100 J in 2 s = 50 W
    let e = src.window_energy(&sample(2_000_000_000, 2)).unwrap();
    assert_eq!(domain_j(&e, "package-0"), None);
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-0") && w.contains("600.0 W, above the ceiling of 500 W")),
        "{:?}",
        e.warnings
    );
    assert!((e.host_energy_j() - 100.0).abs() < 1e-9);
    // A value above the counter's range is impossible.
    set_energy(root, "intel-rapl:1", 100_000_000_001);
    set_energy(root, "intel-rapl:0", 1_201_000_000 + 1_000_000);
    let e = src.window_energy(&sample(2_000_000_000, 2)).unwrap();
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-1") && w.contains("above max_energy_range_uj")),
        "{:?}",
        e.warnings
    );
    assert!((domain_j(&e, "package-0").unwrap() - 1.0).abs() < 1e-9);
}

// ---- perf PMU ----

#[derive(Clone, Default)]
struct FakeCounters {
    /// (config, cpu) -> current count; absent = read error.
    values: Arc<Mutex<HashMap<(u64, u32), u64>>>,
    /// (config, cpu) -> counts per second of this process's CPU time: a
    /// counter that moves with the real load (the start-up probe's threads).
    live: Arc<Mutex<HashMap<(u64, u32), f64>>>,
    opened: Arc<Mutex<Vec<(u32, u64, u32)>>>,
    refuse_config: Option<u64>,
}

struct FakeCounter {
    key: (u64, u32),
    values: Arc<Mutex<HashMap<(u64, u32), u64>>>,
    live: Arc<Mutex<HashMap<(u64, u32), f64>>>,
}

/// CPU time this process has used (every thread), in seconds.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec for the call.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) },
        0
    );
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl EnergyCounter for FakeCounter {
    fn read_count(&mut self) -> Result<u64, EnergyError> {
        if let Some(rate) = self.live.lock().unwrap().get(&self.key) {
            return Ok((process_cpu_s() * rate) as u64);
        }
        self.values
            .lock()
            .unwrap()
            .get(&self.key)
            .copied()
            .ok_or_else(|| EnergyError::Io {
                path: PathBuf::from(format!("fake counter {:?}", self.key)),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
    }
}

impl PerfCounterOpener for FakeCounters {
    fn open(
        &mut self,
        pmu_type: u32,
        config: u64,
        cpu: u32,
        event: &str,
    ) -> Result<Box<dyn EnergyCounter>, EnergyError> {
        if self.refuse_config == Some(config) {
            return Err(EnergyError::PerfOpen {
                event: event.to_string(),
                cpu,
                source: std::io::Error::from_raw_os_error(libc::EACCES),
            });
        }
        self.opened.lock().unwrap().push((pmu_type, config, cpu));
        Ok(Box::new(FakeCounter {
            key: (config, cpu),
            values: Arc::clone(&self.values),
            live: Arc::clone(&self.live),
        }))
    }
}

/// 2^-32 J, written by the kernel as `2.3283064365386962890625e-10`.
const PKG_SCALE_TEXT: &str = "2.3283064365386962890625e-10";
const RAM_SCALE: f64 = 1.52587890625e-05;

fn power_pmu_tree(root: &Path) {
    let pmu = root.join("bus/event_source/devices/power");
    write(&pmu.join("type"), "23\n");
    write(&pmu.join("cpumask"), "0,2\n");
    write(&pmu.join("events/energy-pkg"), "event=0x02\n");
    write(
        &pmu.join("events/energy-pkg.scale"),
        &format!("{PKG_SCALE_TEXT}\n"),
    );
    write(&pmu.join("events/energy-pkg.unit"), "Joules\n");
    write(&pmu.join("events/energy-ram"), "event=0x03\n");
    write(
        &pmu.join("events/energy-ram.scale"),
        &format!("{RAM_SCALE:e}\n"),
    );
    write(&pmu.join("events/energy-ram.unit"), "Joules\n");
}

#[test]
fn perf_pmu_discovery_and_counting() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    topology(root, &[0, 0, 1, 1]);
    power_pmu_tree(root);
    let fake = FakeCounters::default();
    {
        let mut v = fake.values.lock().unwrap();
        v.insert((2, 0), 1_000);
        v.insert((2, 2), 5_000);
        v.insert((3, 0), 10);
        v.insert((3, 2), 20);
    }
    let mut src = PerfPmuSource::discover(
        root,
        &CpuTopology::read(root, 4),
        &cfg(root),
        Box::new(fake.clone()),
    )
    .unwrap();
    let mut opened = fake.opened.lock().unwrap().clone();
    opened.sort();
    assert_eq!(opened, vec![(23, 2, 0), (23, 2, 2), (23, 3, 0), (23, 3, 2)]);
    assert_eq!(
        src.domain_names(),
        ["package-0", "package-1", "package-0/dram", "package-1/dram"]
    );
    // package-0: 2^32 counts = 1 J; package-1: 3 * 2^32; dram-0: 65536 counts = 1 J; dram-1: 2 J.
    {
        let mut v = fake.values.lock().unwrap();
        v.insert((2, 0), 1_000 + (1u64 << 32));
        v.insert((2, 2), 5_000 + 3 * (1u64 << 32));
        v.insert((3, 0), 10 + 65_536);
        v.insert((3, 2), 20 + 2 * 65_536);
    }
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert_eq!(e.source, "rapl-perf");
    assert!((domain_j(&e, "package-0").unwrap() - 1.0).abs() < 1e-9);
    assert!((domain_j(&e, "package-1").unwrap() - 3.0).abs() < 1e-9);
    assert!((domain_j(&e, "package-1/dram").unwrap() - 2.0).abs() < 1e-9);
    assert!((e.host_energy_j() - 7.0).abs() < 1e-9);
    let p1 = e.domains.iter().find(|d| d.name == "package-1").unwrap();
    assert_eq!(p1.cpus, vec![2, 3]);

    // A counter that cannot be read is left out with a warning; one going backwards is rejected.
    {
        let mut v = fake.values.lock().unwrap();
        v.remove(&(3, 2));
        v.insert((2, 2), 7);
        v.insert((2, 0), 1_000 + 2 * (1u64 << 32));
    }
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-1/dram left out")),
        "{:?}",
        e.warnings
    );
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-1") && w.contains("went backwards")),
        "{:?}",
        e.warnings
    );
    // package-0: 1 J; package-0/dram unchanged: 0 J; package-1 and its dram left out.
    assert!((e.host_energy_j() - 1.0).abs() < 1e-9);
    assert!((domain_j(&e, "package-0").unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(domain_j(&e, "package-1"), None);
}

#[test]
fn perf_pmu_bad_descriptions_name_the_file() {
    let cases: [(&str, &str, &str); 4] = [
        ("events/energy-pkg", "evnt=0x02", "expected `event=0x..`"),
        ("events/energy-pkg.unit", "Watts", "expected unit `Joules`"),
        (
            "events/energy-pkg.scale",
            "tiny",
            "positive number of joules",
        ),
        ("cpumask", "", "CPU list"),
    ];
    for (file, content, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        power_pmu_tree(root);
        fs::write(
            root.join("bus/event_source/devices/power").join(file),
            content,
        )
        .unwrap();
        let err = PerfPmuSource::discover(
            root,
            &CpuTopology::single_package(4),
            &cfg(root),
            Box::new(FakeCounters::default()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(file) && err.contains(reason), "{file}: {err}");
    }
}

#[test]
fn selection_prefers_perf_then_powercap_then_model() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    two_package_tree(root);
    power_pmu_tree(root);
    let fake = FakeCounters::default();
    // 20 W per busy CPU on the packages (2^-32 J counts), 5 W on dram (2^-16 J).
    for (key, rate) in [
        ((2, 0), 20.0 * 2f64.powi(32)),
        ((2, 2), 20.0 * 2f64.powi(32)),
        ((3, 0), 5.0 / RAM_SCALE),
        ((3, 2), 5.0 / RAM_SCALE),
    ] {
        fake.live.lock().unwrap().insert(key, rate);
    }
    let (src, warnings) = select_energy_source_with(&cfg(root), 4, Box::new(fake));
    assert_eq!((src.name(), src.estimated()), ("rapl-perf", false));
    assert!(warnings.is_empty(), "{warnings:?}");

    // perf_event_open refused (e.g. perf_event_paranoid): powercap, with the reason.
    let refusing = FakeCounters {
        refuse_config: Some(2),
        ..Default::default()
    };
    let live = LiveZones::start(
        root,
        &[
            "intel-rapl:0",
            "intel-rapl:0:0",
            "intel-rapl:0:1",
            "intel-rapl:1",
            "intel-rapl:1:0",
            "intel-rapl:1:1",
            "intel-rapl:2",
        ],
    );
    let (src, warnings) = select_energy_source_with(&cfg(root), 4, Box::new(refusing));
    drop(live);
    assert_eq!(src.name(), "rapl-powercap");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("perf PMU not used") && w.contains("energy-pkg")),
        "{warnings:?}"
    );

    // No RAPL at all (this VM through the real opener): the model, estimated.
    let empty = tempfile::tempdir().unwrap();
    let mut c = cfg(empty.path());
    c.power_model = "tdp:150".into();
    let (mut src, warnings) = select_energy_source(&c, 4);
    assert_eq!((src.name(), src.estimated()), ("model-tdp", true));
    assert!(
        warnings.iter().any(|w| w.contains("estimated")),
        "{warnings:?}"
    );
    let e = src.window_energy(&sample(1_000_000_000, 4)).unwrap();
    // Idle sample: 0.12 * 150 W for 1 s.
    assert!((e.host_energy_j() - 18.0).abs() < 1e-9);

    // Asking for powercap where there is none falls back to the model and says so.
    c.source = "powercap".into();
    let (src, warnings) = select_energy_source(&c, 4);
    assert_eq!(src.name(), "model-tdp");
    assert!(
        warnings.iter().any(|w| w.contains("powercap not used")),
        "{warnings:?}"
    );
}

#[test]
fn rapl_failure_falls_back_to_the_model_for_that_window() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    let live = LiveZones::start(root, &["intel-rapl:0"]);
    let (mut src, warnings) =
        select_energy_source_with(&cfg(root), 2, Box::new(FakeCounters::default()));
    drop(live);
    assert_eq!(src.name(), "rapl-powercap");
    assert!(
        warnings.iter().any(|w| w.contains("perf PMU not used")),
        "{warnings:?}"
    );
    // The windows go on from where the probe left the counter.
    let base: u64 = fs::read_to_string(root.join("class/powercap/intel-rapl:0/energy_uj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert_eq!(e.source, "rapl-powercap");
    set_energy(root, "intel-rapl:0", base + 3_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert_eq!(
        (e.source.as_str(), e.estimated, e.host_energy_j()),
        ("rapl-powercap", false, 3.0)
    );
    fs::write(
        root.join("class/powercap/intel-rapl:0/energy_uj"),
        "garbage",
    )
    .unwrap();
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    // Idle 2-vCPU sample with CCF: 2 * 0.74 W for 1 s, marked estimated.
    assert_eq!((e.source.as_str(), e.estimated), ("model-linear", true));
    assert!((e.host_energy_j() - 1.48).abs() < 1e-9);
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("rapl-powercap stopped reading") && w.contains("\"garbage\"")),
        "{:?}",
        e.warnings
    );
    assert_eq!(e.faults.get("rapl-powercap/failed"), Some(&1));
    // Said once: the next failing windows only count.
    for _ in 0..5 {
        let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
        assert!(e.estimated);
        assert!(
            !e.warnings.iter().any(|w| w.contains("stopped reading")),
            "{:?}",
            e.warnings
        );
        assert_eq!(e.faults.get("rapl-powercap/failed"), Some(&1));
        assert_eq!(e.faults.get("rapl-powercap/no_domain_read"), Some(&1));
    }
    // It reads again: re-based first (left out), then measured, said once.
    set_energy(root, "intel-rapl:0", 5_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert!(e.estimated, "the re-basing window has no counted domain");
    set_energy(root, "intel-rapl:0", 7_000_000);
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert_eq!(
        (e.source.as_str(), e.host_energy_j()),
        ("rapl-powercap", 2.0)
    );
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("reads again after 7 window(s)")),
        "{:?}",
        e.warnings
    );
    assert!(e.faults.is_empty(), "{:?}", e.faults);
}

/// The Intel VM: a perf `power` PMU whose only event, `energy-psys`,
/// reads 0. The start-up probe keeps every CPU busy and sees the counter
/// not move: the source is refused once, with the reason, and the next one
/// (here the model) is chosen. Before the probe the agent announced
/// `rapl-perf` and then failed every window with an empty reason.
#[test]
fn a_power_pmu_whose_only_counter_reads_zero_is_refused_at_start_up() {
    for host_domains in [HostDomains::Packages, HostDomains::Psys] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let pmu = root.join("bus/event_source/devices/power");
        write(&pmu.join("type"), "23\n");
        write(&pmu.join("cpumask"), "0\n");
        write(&pmu.join("events/energy-psys"), "event=0x05\n");
        write(
            &pmu.join("events/energy-psys.scale"),
            &format!("{PKG_SCALE_TEXT}\n"),
        );
        write(&pmu.join("events/energy-psys.unit"), "Joules\n");
        let fake = FakeCounters::default();
        fake.values.lock().unwrap().insert((5, 0), 0);
        let mut c = cfg(root);
        c.host_domains = host_domains;
        let started = std::time::Instant::now();
        let (mut src, warnings) = select_energy_source_with(&c, 2, Box::new(fake));
        assert!(started.elapsed() >= std::time::Duration::from_millis(c.probe_ms));
        assert_eq!((src.name(), src.estimated()), ("model-linear", true));
        let refused = warnings
            .iter()
            .find(|w| w.contains("RAPL perf PMU refused by the start-up probe"))
            .unwrap_or_else(|| panic!("{host_domains:?}: {warnings:?}"));
        // Counted (psys) it did not move; with the packages counted, a psys
        // counter alone leaves nothing that counts toward the host.
        let why = match host_domains {
            HostDomains::Psys => "did not move",
            HostDomains::Packages => "energy.host_domains = packages",
        };
        assert!(
            refused.contains("psys") && refused.contains(why),
            "{refused}"
        );
        assert!(
            !refused.contains(": )") && !refused.contains("()"),
            "{refused}"
        );
        // Windows under load: the model, with no warning per window.
        for _ in 0..3 {
            let e = src.window_energy(&busy_sample(1_000_000_000, 2)).unwrap();
            assert!(e.warnings.is_empty() && e.faults.is_empty(), "{e:?}");
            // 2 vCPUs at 100 %: 2 x 3.5 W for 1 s.
            assert!((e.host_energy_j() - 7.0).abs() < 1e-9);
        }
    }
}

/// A counter that stops after start-up, while its CPUs are busy, is not a
/// 0 W host: the domain is left out (counted as `stuck`), and with no other
/// counted domain the window is estimated and the outage is said once.
#[test]
fn a_counter_stuck_under_load_is_not_a_zero_watt_host() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    zone(root, "intel-rapl:0:1", "dram", 500_000, MAX_UJ);
    let live = LiveZones::start(root, &["intel-rapl:0", "intel-rapl:0:1"]);
    let (mut src, warnings) =
        select_energy_source_with(&cfg(root), 2, Box::new(FakeCounters::default()));
    drop(live);
    assert_eq!(src.name(), "rapl-powercap", "{warnings:?}");
    set_energy(root, "intel-rapl:0", 1_000_000);
    set_energy(root, "intel-rapl:0:1", 500_000);
    let _ = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    // The package stops, the dram still counts: the package is left out.
    set_energy(root, "intel-rapl:0:1", 1_500_000);
    let e = src.window_energy(&busy_sample(1_000_000_000, 2)).unwrap();
    assert_eq!(domain_j(&e, "package-0"), None);
    assert_eq!((e.estimated, e.host_energy_j()), (false, 1.0));
    assert_eq!(e.faults.get("rapl-powercap/stuck"), Some(&1));
    assert!(
        e.warnings
            .iter()
            .any(|w| w.contains("package-0 left out") && w.contains("did not move")),
        "{:?}",
        e.warnings
    );
    // An idle window may read 0 J on a counter that did not tick: not stuck.
    let e = src.window_energy(&sample(1_000_000_000, 2)).unwrap();
    assert_eq!(domain_j(&e, "package-0"), Some(0.0));
    assert!(e.faults.is_empty(), "{:?}", e.faults);
    // Both stop under load: estimated, said once, counted every window.
    let mut said = 0;
    for _ in 0..4 {
        let e = src.window_energy(&busy_sample(1_000_000_000, 2)).unwrap();
        assert_eq!((e.source.as_str(), e.estimated), ("model-linear", true));
        assert_eq!(e.faults.get("rapl-powercap/failed"), Some(&1));
        assert_eq!(e.faults.get("rapl-powercap/no_domain_read"), Some(&1));
        said += e
            .warnings
            .iter()
            .filter(|w| w.contains("stopped reading") && w.contains("did not move"))
            .count();
    }
    assert_eq!(said, 1);
}

/// A domain that does not move during the probe is disabled with its reason;
/// the source stays when a counted domain moved.
#[test]
fn the_probe_disables_a_domain_that_does_not_move() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    zone(root, "intel-rapl:0:1", "dram", 500_000, MAX_UJ);
    let live = LiveZones::start(root, &["intel-rapl:0"]);
    let (src, warnings) =
        select_energy_source_with(&cfg(root), 2, Box::new(FakeCounters::default()));
    drop(live);
    assert_eq!(src.name(), "rapl-powercap");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("domain package-0/dram disabled") && w.contains("did not move")),
        "{warnings:?}"
    );
    assert_eq!(src.domain_names(), ["package-0"]);
}

#[test]
fn energy_config_validation_names_the_key() {
    let cases: [(EnergyConfig, &str); 4] = [
        (
            EnergyConfig {
                source: "nvml".into(),
                ..Default::default()
            },
            "energy.source = \"nvml\"",
        ),
        (
            EnergyConfig {
                power_model: "linear:3".into(),
                ..Default::default()
            },
            "invalid power model \"linear:3\"",
        ),
        (
            EnergyConfig {
                idle_power_w: Some(-1.0),
                ..Default::default()
            },
            "energy.idle_power_w = -1",
        ),
        (
            EnergyConfig {
                max_domain_power_w: 0.0,
                ..Default::default()
            },
            "energy.max_domain_power_w = 0",
        ),
    ];
    for (c, message) in cases {
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
    assert!(EnergyConfig::default().validate().is_ok());
}

/// A window's energy warnings reach `sci_energy_warnings_total`: the
/// pipeline keeps the count of its last window, which the agent's
/// measurement loop adds to the registry (as here).
#[test]
fn energy_warnings_of_a_window_reach_the_metric() {
    use sci_agent::config::AgentConfig;
    use sci_agent::pipeline::{Pipeline, PipelineOptions};
    use sci_agent::sinks::metrics::MetricsRegistry;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    two_package_tree(root);
    let config = AgentConfig {
        energy: EnergyConfig {
            source: "powercap".into(),
            // Static files do not move: this test is about the metric.
            probe_ms: 0,
            ..cfg(root)
        },
        ..AgentConfig::default()
    };
    let options = PipelineOptions {
        force_procfs: true,
        marker_libraries: Vec::new(),
    };
    let (mut pipeline, _) = Pipeline::open(&config, &options).unwrap();
    let metrics = MetricsRegistry::new();
    pipeline.next_window().unwrap();
    let first = pipeline.last_energy_warnings();
    metrics.observe_energy_warnings(first);
    fs::remove_dir_all(root.join("class/powercap/intel-rapl:1")).unwrap();
    pipeline.next_window().unwrap();
    let second = pipeline.last_energy_warnings();
    assert!(second >= 1, "a vanished package is a warning");
    metrics.observe_energy_warnings(second);
    let rendered = metrics.render();
    let total: f64 = rendered
        .lines()
        .find_map(|l| l.strip_prefix("sci_energy_warnings_total "))
        .unwrap_or_else(|| panic!("no sci_energy_warnings_total in\n{rendered}"))
        .parse()
        .unwrap();
    assert_eq!(total, (first + second) as f64);
}

/// A source that stops reading after start-up: every window it misses is
/// counted in the window (`energy_faults`) and in `sci_energy_faults_total`,
/// and the windows say they were estimated.
#[test]
fn a_failing_source_is_counted_per_window_in_the_faults_metric() {
    use sci_agent::config::AgentConfig;
    use sci_agent::pipeline::{Pipeline, PipelineOptions};
    use sci_agent::sinks::metrics::MetricsRegistry;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    zone(root, "intel-rapl:0", "package-0", 1_000_000, MAX_UJ);
    let config = AgentConfig {
        energy: EnergyConfig {
            source: "powercap".into(),
            probe_ms: 0,
            ..cfg(root)
        },
        ..AgentConfig::default()
    };
    let options = PipelineOptions {
        force_procfs: true,
        marker_libraries: Vec::new(),
    };
    let (mut pipeline, _) = Pipeline::open(&config, &options).unwrap();
    let metrics = MetricsRegistry::new();
    set_energy(root, "intel-rapl:0", 2_000_000);
    let w = pipeline.next_window().unwrap();
    assert_eq!(
        (w.energy_source.as_str(), w.estimated),
        ("rapl-powercap", false)
    );
    assert!(w.energy_faults.is_empty(), "{:?}", w.energy_faults);
    assert!(w.energy_sample_interval_ns > 0);
    metrics.observe(&w);
    fs::write(root.join("class/powercap/intel-rapl:0/energy_uj"), "x\n").unwrap();
    for _ in 0..3 {
        let w = pipeline.next_window().unwrap();
        assert!(w.estimated && w.energy_source.starts_with("model"), "{w:?}");
        assert_eq!(w.energy_faults.get("rapl-powercap/failed"), Some(&1));
        metrics.observe(&w);
    }
    let rendered = metrics.render();
    let failed = rendered
        .lines()
        .find(|l| {
            l.starts_with("sci_energy_faults_total{")
                && l.contains("source=\"rapl-powercap\"")
                && l.contains("fault=\"failed\"")
        })
        .unwrap_or_else(|| panic!("no failed series in\n{rendered}"));
    assert!(failed.ends_with(" 3"), "{failed}");
}
