//! Platform power from a BMC over Redfish, against a Redfish server not
//! written here: `sushy-static` from OpenStack's sushy-tools (installed by
//! `cargo xtask setup`), serving a mock-up tree this test writes and
//! updates, over HTTPS with a CA made here (rcgen).
//!
//! sushy-static checks no credentials (it has no authentication); basic
//! auth is tested against sushy-emulator from the same package.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sci_agent::sources::energy::redfish::{RedfishConfig, RedfishPoller, RedfishSource};
use sci_agent::sources::energy::{EnergySource, ModelSource, PowerModel, WindowEnergy};
use sci_agent::sources::sched::CpuSample;
use sci_agent::window::{CpuSource, LossCounters};
use sci_tests::{provisioned_tool, sci_home, wait_until};

const SENSOR: &str = "Chassis/1/Sensors/PowerSensor";

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// RFC 3339 (UTC, milliseconds) of a unix time, as a BMC writes `ReadingTime`.
fn rfc3339(t_ns: u64) -> String {
    let secs = t_ns / 1_000_000_000;
    let ms = (t_ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// A mock-up tree served by sushy-static.
struct Bmc {
    program: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    tls: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Bmc {
    fn start(program: &Path, tls: Option<(PathBuf, PathBuf)>) -> Bmc {
        let dir = tempfile::tempdir().unwrap();
        let mut bmc = Bmc {
            program: program.to_path_buf(),
            dir,
            port: free_port(),
            tls,
            child: None,
        };
        bmc.write_raw(
            "",
            r#"{"@odata.id":"/redfish/v1","RedfishVersion":"1.15.0"}"#,
        );
        bmc.serve();
        bmc
    }

    fn serve(&mut self) {
        let mut cmd = Command::new(&self.program);
        cmd.args(["-i", "127.0.0.1", "-p", &self.port.to_string(), "-m"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key)) = &self.tls {
            cmd.arg("-c").arg(cert).arg("-k").arg(key);
        }
        self.child = Some(cmd.spawn().unwrap());
        let port = self.port;
        wait_until("sushy-static listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pause or resume the server (a hung BMC: connections wait, nothing answers).
    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn write_raw(&self, resource: &str, body: &str) {
        let dir = self.dir.path().join(resource);
        std::fs::create_dir_all(&dir).unwrap();
        // Whole files only: sushy-static opens the file on each request.
        let tmp = dir.join("index.json.tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join("index.json")).unwrap();
    }

    /// A power Sensor resource with the BMC's time of the reading.
    fn reading(&self, watts: f64, t_ns: u64) {
        self.write_raw(
            SENSOR,
            &format!(
                r#"{{"@odata.id":"/redfish/v1/{SENSOR}","Id":"PowerSensor","ReadingType":"Power","Reading":{watts},"ReadingUnits":"W","ReadingTime":"{}"}}"#,
                rfc3339(t_ns)
            ),
        );
    }

    fn config(&self) -> RedfishConfig {
        RedfishConfig {
            url: format!(
                "{}://localhost:{}",
                if self.tls.is_some() { "https" } else { "http" },
                self.port
            ),
            path: format!("/redfish/v1/{SENSOR}"),
            username: Some("root".into()),
            password: Some("calvin".into()),
            timeout_ms: 500,
            poll_ms: 100,
            stale_after_ms: 1_000,
            ..RedfishConfig::default()
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sushy_static(test: &str) -> Option<PathBuf> {
    provisioned_tool(&sci_home().join("venv/bin/sushy-static"), test)
}

/// A CA and a certificate for `localhost` signed by it, as PEM files.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let made = sci_tests::tls::localhost_cert("test BMC CA");
    let (ca, crt, k) = (dir.join("ca.pem"), dir.join("bmc.pem"), dir.join("bmc.key"));
    std::fs::write(&ca, made.ca_pem).unwrap();
    std::fs::write(&crt, made.cert_pem).unwrap();
    std::fs::write(&k, made.key_pem).unwrap();
    (ca, crt, k)
}

fn window(start: u64, end: u64) -> CpuSample {
    CpuSample {
        source: CpuSource::Procfs,
        start_unix_ns: start,
        end_unix_ns: end,
        cpus: 2,
        idle_ns_per_cpu: vec![end - start; 2],
        unowned_busy_ns_per_cpu: vec![0; 2],
        processes: Vec::new(),
        lost: LossCounters::default(),
    }
}

fn model() -> Box<dyn EnergySource> {
    Box::new(ModelSource::new(PowerModel::ccf(), 2))
}

/// The trapezoid over the series served, on [start, end] (the hand integration).
fn served_energy_j(series: &[(u64, f64)], start: u64, end: u64) -> f64 {
    let mut e = 0.0;
    for pair in series.windows(2) {
        let ((t0, p0), (t1, p1)) = (pair[0], pair[1]);
        let (lo, hi) = (t0.max(start), t1.min(end));
        if hi <= lo {
            continue;
        }
        let at = |t: u64| p0 + (p1 - p0) * (t - t0) as f64 / (t1 - t0) as f64;
        e += (at(lo) + at(hi)) / 2.0 * (hi - lo) as f64 / 1e9;
    }
    e
}

#[test]
fn redfish_energy_per_window_matches_the_served_power_series() {
    let Some(program) = sushy_static("redfish_energy_per_window_matches_the_served_power_series")
    else {
        return;
    };
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(pki.path());
    let bmc = Arc::new(Mutex::new(Bmc::start(&program, Some((cert, key)))));
    let t0 = unix_ns();
    bmc.lock().unwrap().reading(250.0, t0);
    let mut cfg = bmc.lock().unwrap().config();
    cfg.ca_file = Some(ca);
    let mut source = RedfishSource::new(RedfishPoller::start(&cfg).unwrap(), model());
    assert_eq!(source.name(), "redfish");

    // The BMC refreshes every 250 ms: a load that steps and ramps.
    let series = Arc::new(Mutex::new(vec![(t0, 250.0)]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let (bmc, series, stop) = (Arc::clone(&bmc), Arc::clone(&series), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut k = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let watts = 250.0 + 40.0 * ((k / 4) % 3) as f64 + 3.0 * (k % 4) as f64;
                let t = unix_ns();
                bmc.lock().unwrap().reading(watts, t);
                series.lock().unwrap().push((t, watts));
                k += 1;
            }
        })
    };
    wait_until("the first reading", || {
        if let Some(f) = source.failing() {
            println!("not yet: {f}");
        }
        source.readings().0 >= 1
    });
    let mut start = source.readings().1.unwrap();
    let mut total_agent_j = 0.0;
    let mut total_served_j = 0.0;
    for i in 0..8 {
        let end = start + 1_000_000_000;
        // The window is read once the BMC's next sample after its end is in.
        wait_until("a reading after the window", || {
            source.readings().1.is_some_and(|t| t > end)
        });
        let e: WindowEnergy = source.window_energy(&window(start, end)).unwrap();
        let served = served_energy_j(&series.lock().unwrap(), start, end);
        assert_eq!(
            (e.source.as_str(), e.estimated),
            ("redfish", false),
            "{e:?}"
        );
        let got = e.host_energy_j();
        println!(
            "window {i}: agent {got:.3} J, served series {served:.3} J, sample interval {:.0} ms",
            e.sample_interval_ns as f64 / 1e6
        );
        assert!(
            (got - served).abs() <= 0.01 * served,
            "window {i}: {got} J against {served} J by hand"
        );
        assert!(e.sample_interval_ns > 0 && e.sample_interval_ns < 1_000_000_000);
        assert!(e.faults.is_empty(), "{:?}", e.faults);
        total_agent_j += got;
        total_served_j += served;
        start = end;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    println!("8 windows: agent {total_agent_j:.3} J, served {total_served_j:.3} J");
}

/// Reads windows of 200 ms ending now until one counts `fault` and has no
/// platform figure (the last good reading is held for `stale_after_ms`,
/// never longer); returns it and every warning of the windows read meanwhile.
fn window_with_fault(source: &mut RedfishSource, fault: &str) -> (WindowEnergy, Vec<String>) {
    let mut found = None;
    let mut warnings = Vec::new();
    wait_until(&format!("a window counting {fault}"), || {
        let end = unix_ns();
        let e = source
            .window_energy(&window(end - 200_000_000, end))
            .unwrap();
        warnings.extend(e.warnings.iter().cloned());
        let hit = e.faults.contains_key(fault) && e.estimated;
        if hit {
            found = Some(e);
        }
        hit
    });
    (found.unwrap(), warnings)
}

#[test]
fn redfish_faults_are_counted_and_named_and_never_invent_energy() {
    let Some(program) =
        sushy_static("redfish_faults_are_counted_and_named_and_never_invent_energy")
    else {
        return;
    };
    let mut bmc = Bmc::start(&program, None);
    bmc.reading(300.0, unix_ns());
    let cfg = bmc.config();
    let mut source = RedfishSource::new(RedfishPoller::start(&cfg).unwrap(), model());
    // A background refresher keeps the reading fresh while wanted.
    wait_until("the first reading", || source.readings().0 >= 1);
    let fresh = |bmc: &Bmc, source: &RedfishSource| {
        let before = source.readings().0;
        bmc.reading(300.0, unix_ns());
        wait_until("a fresh reading", || source.readings().0 > before);
    };

    // Garbage JSON: counted, the window is the model's (estimated), said once.
    bmc.write_raw(SENSOR, "{\"Reading\": 3");
    let (e, warnings) = window_with_fault(&mut source, "redfish/garbage");
    println!("garbage: {:?} {warnings:?}", e.faults);
    assert!(e.estimated && e.source.starts_with("model"), "{e:?}");
    assert!(e.faults.contains_key("redfish/missing"), "{:?}", e.faults);
    assert_eq!(
        warnings
            .iter()
            .filter(|w| w.contains("platform power not measured") && w.contains("garbage"))
            .count(),
        1,
        "{warnings:?}"
    );

    // A reading of 0 W, and one that jumps above the ceiling: rejected, counted.
    fresh(&bmc, &source);
    bmc.reading(0.0, unix_ns());
    let (e, _) = window_with_fault(&mut source, "redfish/zero");
    assert!(e.estimated, "{e:?}");
    fresh(&bmc, &source);
    bmc.reading(50_000.0, unix_ns());
    let (e, _) = window_with_fault(&mut source, "redfish/jump");
    assert!(e.estimated, "{e:?}");

    // Stale: the BMC's ReadingTime stops advancing.
    fresh(&bmc, &source);
    let frozen = unix_ns();
    bmc.reading(310.0, frozen);
    let (e, warnings) = window_with_fault(&mut source, "redfish/stale");
    println!("stale: {:?} {warnings:?}", e.faults);
    assert!(e.estimated, "{e:?}");

    // Slow: the server hangs (SIGSTOP); requests time out.
    fresh(&bmc, &source);
    bmc.signal(libc::SIGSTOP);
    let (e, _) = window_with_fault(&mut source, "redfish/timeout");
    assert!(e.estimated, "{e:?}");
    bmc.signal(libc::SIGCONT);

    // Down: the server goes away mid-run. Windows go on (the model's), flagged.
    fresh(&bmc, &source);
    bmc.stop();
    let (e, warnings) = window_with_fault(&mut source, "redfish/unreachable");
    println!("down: {:?} {warnings:?}", e.faults);
    assert!(e.estimated && e.host_energy_j() > 0.0, "{e:?}");
    // And comes back: measured again.
    bmc.serve();
    fresh(&bmc, &source);
    let mut back = None;
    wait_until("a measured window after the BMC came back", || {
        bmc.reading(300.0, unix_ns());
        let end = unix_ns();
        let e = source
            .window_energy(&window(end - 100_000_000, end))
            .unwrap();
        let ok = !e.estimated;
        if ok {
            back = Some(e);
        }
        ok
    });
    let e = back.unwrap();
    assert_eq!(e.source, "redfish");
    // 300 W held or interpolated over 100 ms.
    assert!((e.host_energy_j() - 30.0).abs() < 1e-6, "{e:?}");
}

/// Where RAPL measures, the window keeps RAPL's domains and adds
/// `platform-rest` = platform - RAPL, by the configured rule; the BMC's
/// certificate pinned by its SHA-256 is accepted, another one refused (`tls`).
#[test]
fn redfish_split_over_rapl_and_a_pinned_certificate() {
    use sci_agent::sources::energy::redfish::PlatformSplit;
    use sci_agent::sources::energy::{CpuTopology, EnergyConfig, PowercapSource};
    let Some(program) = sushy_static("redfish_split_over_rapl_and_a_pinned_certificate") else {
        return;
    };
    let pki = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = tls_files(pki.path());
    let der = pem_der(&std::fs::read_to_string(&cert).unwrap());
    let pin = sha256_hex(&der);
    let bmc = Bmc::start(&program, Some((cert, key)));
    // A constant 300 W platform: the BMC refreshes its ReadingTime.
    let t0 = unix_ns();
    bmc.reading(300.0, t0);
    // The host's RAPL: one package zone this test moves by 100 W.
    let sysfs = tempfile::tempdir().unwrap();
    let zone = sysfs.path().join("class/powercap/intel-rapl:0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("name"), "package-0\n").unwrap();
    std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").unwrap();
    std::fs::write(zone.join("energy_uj"), "1000000\n").unwrap();
    for (split, idle) in [
        (PlatformSplit::CpuShare, false),
        (PlatformSplit::Idle, true),
    ] {
        std::fs::write(zone.join("energy_uj"), "1000000\n").unwrap();
        let energy_cfg = EnergyConfig {
            sysfs_root: sysfs.path().to_path_buf(),
            ..EnergyConfig::default()
        };
        let rapl =
            PowercapSource::discover(sysfs.path(), &CpuTopology::single_package(2), &energy_cfg)
                .unwrap();
        let mut cfg = bmc.config();
        cfg.pinned_sha256 = Some(pin.clone());
        cfg.split = split;
        let mut source = RedfishSource::new(RedfishPoller::start(&cfg).unwrap(), Box::new(rapl));
        assert_eq!(source.name(), "redfish+rapl-powercap");
        wait_until("a reading through the pinned certificate", || {
            source.readings().0 >= 1
        });
        let first = source.readings().1.unwrap();
        wait_until("readings over more than the window", || {
            bmc.reading(300.0, unix_ns());
            source.readings().1.is_some_and(|t| t > first + 600_000_000)
        });
        let end = source.readings().1.unwrap();
        let start = end - 500_000_000;
        // 50 J on the package over the 0.5 s window: 100 W.
        std::fs::write(zone.join("energy_uj"), "51000000\n").unwrap();
        let e = source.window_energy(&window(start, end)).unwrap();
        assert!(!e.estimated, "{e:?}");
        let rapl_j = e
            .domains
            .iter()
            .find(|d| d.name == "package-0")
            .unwrap()
            .energy_j;
        let rest = e
            .domains
            .iter()
            .find(|d| d.name == "platform-rest")
            .unwrap();
        assert_eq!(rapl_j, 50.0);
        // 300 W x 0.5 s = 150 J of platform, 100 J beyond RAPL.
        assert!((rest.energy_j - 100.0).abs() < 1e-6, "{e:?}");
        assert!((e.host_energy_j() - 150.0).abs() < 1e-6, "{e:?}");
        assert_eq!(rest.known_idle_j.is_some(), idle, "{split:?}");
    }

    // A pin that is not the BMC's certificate: refused, named.
    let mut cfg = bmc.config();
    cfg.pinned_sha256 = Some("00".repeat(32));
    let source = RedfishSource::new(RedfishPoller::start(&cfg).unwrap(), model());
    wait_until("the pin refused", || {
        source
            .failing()
            .is_some_and(|f| f.starts_with("tls") && f.contains("not the pinned one"))
    });
    assert_eq!(source.readings().0, 0);
}

/// The DER bytes of the first PEM certificate.
fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&b64)
}

fn base64_decode(text: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = alphabet.iter().position(|a| *a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

/// SHA-256 of `bytes` as hex, by `sha256sum` (an independent implementation).
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Basic auth against a Redfish server that checks it: sushy-emulator (same
/// package) with an htpasswd file (bcrypt) and its fake driver. A wrong
/// password is `unauthorized` (HTTP 401); the right one gets through, to a
/// resource with no power reading in it (`garbage`, named).
#[test]
fn redfish_basic_auth_against_a_server_that_checks_it() {
    let test = "redfish_basic_auth_against_a_server_that_checks_it";
    let (Some(emulator), Some(python)) = (
        provisioned_tool(&sci_home().join("venv/bin/sushy-emulator"), test),
        provisioned_tool(&sci_home().join("venv/bin/python"), test),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&python)
        .args([
            "-c",
            "import bcrypt; print('root:' + bcrypt.hashpw(b'calvin', bcrypt.gensalt(rounds=4)).decode())",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let port = free_port();
    let conf = dir.path().join("emulator.conf");
    std::fs::write(
        &conf,
        format!(
            "SUSHY_EMULATOR_AUTH_FILE = '{}'\nSUSHY_EMULATOR_FAKE_DRIVER = True\nSUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\n",
            htpasswd.display()
        ),
    )
    .unwrap();
    struct Emulator(Child);
    impl Drop for Emulator {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _emulator = Emulator(
        Command::new(&emulator)
            .arg("--config")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("sushy-emulator listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    for (password, fault) in [("wrong", "unauthorized"), ("calvin", "garbage")] {
        let cfg = RedfishConfig {
            url: format!("http://127.0.0.1:{port}"),
            path: "/redfish/v1/Chassis".into(),
            username: Some("root".into()),
            password: Some(password.into()),
            poll_ms: 100,
            stale_after_ms: 1_000,
            ..RedfishConfig::default()
        };
        let source = RedfishSource::new(RedfishPoller::start(&cfg).unwrap(), model());
        let mut last = None;
        wait_until(&format!("{password}: {fault}"), || {
            last = source.failing();
            last.as_deref().is_some_and(|f| f.starts_with(fault))
        });
        println!("{password}: {}", last.unwrap());
    }
}
