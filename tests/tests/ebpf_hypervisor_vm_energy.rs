//! VMs measured through their hypervisor's agent, end to end on this machine:
//! a host-role agent pipeline (real eBPF sampler, the powercap reader on a
//! tree this test drives: the VM has no RAPL) attributes energy to a cgroup
//! v2 group standing for a VM (sci-burn processes with known duty inside,
//! one more outside it) and publishes the VM's folder; a guest-role agent
//! pipeline reads it with the `hypervisor` energy source. Over 60 windows,
//! with the published counter wrapping, the guest's energy equals the host's
//! attribution to the group to 1 uJ, and energy is conserved across the
//! boundary. Privileged: skipped (with one line) without root outside CI.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sci_agent::config::AgentConfig;
use sci_agent::pipeline::{Pipeline, PipelineOptions};
use sci_agent::sources::energy::hypervisor::{VmRule, VmsConfig};
use sci_tests::procs::Reaped;
use sci_tests::{skip_privileged, wait_for_exec};

const BURN: &str = env!("CARGO_BIN_EXE_sci-burn");
const MAX_UJ: u64 = 262_143_328_850;
/// The published counter's range: 40 J, so the VM's counter wraps several times.
const VM_MAX_UJ: u64 = 40_000_000;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            let (_dev, mount, fstype) = (parts.next()?, parts.next()?, parts.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(mount))
        })
        .expect("a cgroup2 mount")
}

/// The group standing for the VM; on drop its processes go back to the root.
struct VmGroup {
    root: PathBuf,
    dir: PathBuf,
}

impl Drop for VmGroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The host's RAPL tree under `root` (every CPU on package 0, the package's
/// counter at 5 J); returns the package's zone.
fn powercap_tree(root: &Path) -> PathBuf {
    for cpu in sci_agent::sources::sched::proc_info::online_cpus() {
        write(
            &root.join(format!(
                "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
            )),
            "0\n",
        );
    }
    let package = root.join("class/powercap/intel-rapl:0");
    write(&package.join("name"), "package-0\n");
    write(&package.join("max_energy_range_uj"), &format!("{MAX_UJ}\n"));
    write(&package.join("energy_uj"), "5000000\n");
    package
}

/// The group standing for a VM (`/sci-test-<tag>-<pid>`) with two sci-burn
/// processes inside (60% and 30%) and one more outside it (45%, the host's own).
fn vm_with_burners(tag: &str, seconds: &str) -> (VmGroup, Reaped, String) {
    let cgroot = cgroup2_root();
    let name = format!("sci-test-{tag}-{}", std::process::id());
    let group = VmGroup {
        dir: cgroot.join(&name),
        root: cgroot,
    };
    let _ = std::fs::remove_dir(&group.dir);
    std::fs::create_dir(&group.dir).unwrap();
    let mut children = Reaped(Vec::new());
    for duty in ["60", "30", "45"] {
        children.0.push(
            Command::new(BURN)
                .args(["--duty", duty, "--seconds", seconds])
                .spawn()
                .unwrap(),
        );
    }
    let pids: Vec<u32> = children.0.iter().map(|c| c.id()).collect();
    for pid in &pids {
        wait_for_exec(*pid, Path::new(BURN));
    }
    for pid in &pids[..2] {
        std::fs::write(group.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    (group, children, format!("/{name}"))
}

/// The group's CPU time so far (cgroup2 `cpu.stat` `usage_usec`), in ns.
fn cgroup_usage_ns(group: &VmGroup) -> u64 {
    let stat = std::fs::read_to_string(group.dir.join("cpu.stat")).unwrap();
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    usec * 1000
}

#[test]
fn the_guest_reports_exactly_what_the_host_attributed_to_its_vm() {
    if skip_privileged("the_guest_reports_exactly_what_the_host_attributed_to_its_vm") {
        return;
    }
    // The host's RAPL tree.
    let sysfs = tempfile::tempdir().unwrap();
    let root = sysfs.path();
    let package = powercap_tree(root);
    let mut package_uj: u64 = 5_000_000;

    // The VM: a cgroup with two burners; one more burner is the host's own.
    let (group, _children, cgroup) = vm_with_burners("vm", "60");

    let publish = tempfile::tempdir().unwrap();
    let mut host_config = AgentConfig::default();
    host_config.agent.host = Some("hypervisor-1".into());
    host_config.energy.sysfs_root = root.to_path_buf();
    host_config.energy.source = "powercap".into();
    host_config.energy.probe_ms = 0;
    host_config.energy.idle_power_w = Some(4.0);
    host_config.carbon.host_kind = sci_agent::transforms::carbon::HostKind::BareMetal;
    host_config.carbon.intensity_g_per_kwh = Some(412.5);
    host_config.carbon.pue = 1.3;
    host_config.profile.enabled = false;
    host_config.vms = VmsConfig {
        publish_dir: Some(publish.path().to_path_buf()),
        max_energy_range_uj: VM_MAX_UJ,
        rules: vec![VmRule {
            name: "vm1".into(),
            cgroup: Some(cgroup.clone()),
            qemu_name: None,
            qemu_uuid: None,
            vcpus: 1,
            vsock_cid: None,
            firecracker_uds: None,
        }],
        ..VmsConfig::default()
    };
    let (mut host, fallback) = Pipeline::open(&host_config, &PipelineOptions::default()).unwrap();
    assert!(fallback.is_none(), "eBPF must load here: {fallback:?}");
    host.next_window().unwrap();
    let usage_before_ns = cgroup_usage_ns(&group);

    // The guest agent: its own configuration says nothing of the host's factors.
    let mut guest_config = AgentConfig::default();
    guest_config.agent.host = Some("vm1".into());
    guest_config.energy.source = "hypervisor".into();
    guest_config.energy.hypervisor_dir = Some(publish.path().join("vm1"));
    guest_config.carbon.intensity_g_per_kwh = Some(999.0);
    guest_config.profile.enabled = false;
    let guest_options = PipelineOptions {
        force_procfs: true,
        marker_libraries: Vec::new(),
    };
    let (mut guest, _) = Pipeline::open(&guest_config, &guest_options).unwrap();
    assert_eq!(guest.energy_source(), "hypervisor");

    let mut host_total_uj = 0.0;
    let mut guest_total_j = 0.0;
    let mut previous_counter = 0u64;
    let mut wraps = 0;
    let mut vm_cpu_ns = 0;
    let mut usage_after_ns = 0;
    for window in 0..60 {
        std::thread::sleep(Duration::from_millis(200));
        // 30 J on the package this window (150 W over 200 ms).
        package_uj += 30_000_000;
        std::fs::write(package.join("energy_uj"), format!("{package_uj}\n")).unwrap();
        let h = host.next_window().unwrap();
        usage_after_ns = cgroup_usage_ns(&group);
        assert_eq!(
            (h.energy_source.as_str(), h.estimated),
            ("rapl-powercap", false)
        );
        let shares = host.last_vm_shares().to_vec();
        assert_eq!(shares.len(), 1);
        let vm = &shares[0];
        // A window can hold no CPU of the VM under load (a 205 ms one did):
        // its CPU time is checked over the run against the cgroup's own count.
        vm_cpu_ns += vm.cpu_ns;

        // Conservation across the boundary: VM + host's own processes +
        // unattributed + the idle the VM did not take = host total.
        let own_j: f64 = h
            .processes
            .iter()
            .filter(|p| p.cgroup.as_deref() != Some(cgroup.as_str()))
            .map(|p| p.energy_j)
            .sum();
        let total = vm.energy_j() + own_j + h.unattributed_energy_j + (h.idle_energy_j - vm.idle_j);
        assert!(
            (total - h.host_energy_j).abs() <= 1e-9 * h.host_energy_j,
            "window {window}: {total} J != host {} J",
            h.host_energy_j
        );

        let counter: u64 = std::fs::read_to_string(
            publish
                .path()
                .join("vm1/class/powercap/intel-rapl:0/energy_uj"),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        if counter < previous_counter {
            wraps += 1;
        }
        previous_counter = counter;

        let g = guest.next_window().unwrap();
        assert_eq!(
            (g.energy_source.as_str(), g.estimated),
            ("hypervisor", false),
            "window {window}"
        );
        assert!(
            (g.host_energy_j - vm.energy_j()).abs() <= 1e-6,
            "window {window}: guest {} J, host attributed {} J",
            g.host_energy_j,
            vm.energy_j()
        );
        // The host's factors, not the guest's configuration.
        assert_eq!((g.carbon_intensity_g_per_kwh, g.pue), (412.5, 1.3));
        assert!(
            g.intensity_source.contains("hypervisor-1"),
            "{}",
            g.intensity_source
        );
        let physical = h.cpus as f64;
        assert_eq!(g.embodied.resource_share, 1.0 / physical);
        assert!(
            g.embodied.share_source.contains("hypervisor hypervisor-1")
                && g.embodied.share_source.contains("1 vCPUs"),
            "{}",
            g.embodied.share_source
        );
        host_total_uj += vm.energy_j() * 1e6;
        guest_total_j += g.host_energy_j;
    }
    println!(
        "60 windows: host attributed {:.6} J to the VM, the guest reported {guest_total_j:.6} J; the published counter wrapped {wraps} time(s)",
        host_total_uj / 1e6
    );
    assert!(wraps >= 1, "the counter must wrap during the test");
    assert!((guest_total_j * 1e6 - host_total_uj).abs() <= 1.0);
    // Ground truth of the VM's CPU over the 60 windows: cgroup2 cpu.stat read
    // right after the first and the last window closed (only the instants
    // between a window's end and the read differ).
    let usage_ns = usage_after_ns - usage_before_ns;
    println!("the VM's processes: {vm_cpu_ns} ns attributed, cpu.stat {usage_ns} ns");
    assert!(vm_cpu_ns > 0, "the VM's processes ran");
    assert!(
        vm_cpu_ns.abs_diff(usage_ns) as f64 <= 0.01 * usage_ns as f64,
        "attributed {vm_cpu_ns} ns, cgroup cpu.stat {usage_ns} ns"
    );
}

fn f(w: &serde_json::Value, key: &str) -> f64 {
    w[key].as_f64().unwrap()
}

fn u(w: &serde_json::Value, key: &str) -> u64 {
    w[key].as_u64().unwrap_or(0)
}

/// A powercap tree under `<dir>/sys` that a thread advances at 150 W on the
/// package (1.5 J every 10 ms, written atomically) until dropped.
struct RaplAt150W {
    root: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RaplAt150W {
    fn start(dir: &Path) -> RaplAt150W {
        let root = dir.join("sys");
        let package = powercap_tree(&root);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut uj: u64 = 5_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    uj += 1_500_000;
                    let tmp = package.join("energy_uj.tmp");
                    std::fs::write(&tmp, format!("{uj}\n")).unwrap();
                    std::fs::rename(&tmp, package.join("energy_uj")).unwrap();
                }
            })
        };
        RaplAt150W {
            root,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RaplAt150W {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The host's and the guest's agent.toml in `dir`: the host on the powercap
/// tree `sys` with `vms` lines and the VM rule `vm1` for `cgroup` (plus
/// `rule` lines), the guest with `energy.source = "hypervisor"` and `guest`
/// lines; the guest's own factors differ from the host's.
fn agent_configs(
    dir: &Path,
    sys: &Path,
    cgroup: &str,
    vms: &str,
    rule: &str,
    guest: &str,
) -> (PathBuf, PathBuf) {
    let host_toml = dir.join("host.toml");
    std::fs::write(
        &host_toml,
        format!(
            r#"[agent]
host = "hypervisor-1"
interval = "200ms"
[energy]
source = "powercap"
sysfs_root = "{}"
probe_ms = 0
idle_power_w = 4.0
[carbon]
host_kind = "bare_metal"
intensity_g_per_kwh = 412.5
pue = 1.3
[profile]
enabled = false
[vms]
{vms}
max_energy_range_uj = {VM_MAX_UJ}
[[vms.rules]]
name = "vm1"
cgroup = "{cgroup}"
vcpus = 1
{rule}
"#,
            sys.display(),
        ),
    )
    .unwrap();
    let guest_toml = dir.join("guest.toml");
    std::fs::write(
        &guest_toml,
        format!(
            r#"[agent]
host = "vm1"
interval = "200ms"
[energy]
source = "hypervisor"
{guest}
[carbon]
intensity_g_per_kwh = 999.0
[profile]
enabled = false
"#
        ),
    )
    .unwrap();
    (host_toml, guest_toml)
}

/// The host's attribution to the VM of `cgroup`, window by window, from
/// its JSON windows, in the publisher's order (the processes' dynamic
/// energy, then the vCPU's share of idle): (window end, floor of the
/// cumulative uJ) per window, and the VM's CPU time over them.
fn published_by(host_windows: &[serde_json::Value], cgroup: &str) -> (Vec<(u64, u64)>, u64) {
    let mut published_uj = Vec::new();
    let mut host_total_j = 0.0;
    let mut vm_cpu_total_ns = 0;
    for w in host_windows {
        assert_eq!(w["energy_source"], "rapl-powercap", "{w}");
        let host_cpus = u(w, "cpus") as f64;
        let mut dynamic_j = 0.0;
        for p in w["processes"].as_array().unwrap() {
            let in_vm = p["cgroup"]
                .as_str()
                .is_some_and(|c| c == cgroup || c.starts_with(&format!("{cgroup}/")));
            if in_vm {
                dynamic_j += f(p, "energy_j");
                vm_cpu_total_ns += u(p, "cpu_ns");
            }
        }
        host_total_j += dynamic_j + f(w, "idle_energy_j") * 1.0 / host_cpus;
        published_uj.push((u(w, "end_unix_ns"), (host_total_j * 1e6).floor() as u64));
    }
    (published_uj, vm_cpu_total_ns)
}

/// One `sci-agent run` whose windows (JSON lines on stdout) are collected.
struct RunningAgent {
    child: std::process::Child,
    windows: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl RunningAgent {
    fn start(args: &[&str]) -> RunningAgent {
        use std::io::BufRead;
        let mut child = Command::new(sci_tests::cargo_bin("sci-agent", "sci-agent"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let windows = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&windows);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        RunningAgent {
            child,
            windows,
            reader: Some(reader),
        }
    }

    fn count(&self) -> usize {
        self.windows.lock().unwrap().len()
    }

    /// Windows whose energy the hypervisor measured above zero so far
    /// (not the power model's estimate of a window it could not read).
    fn with_energy(&self) -> usize {
        self.windows
            .lock()
            .unwrap()
            .iter()
            .filter(|w| {
                w["energy_source"] == "hypervisor"
                    && w["estimated"] == false
                    && w["host_energy_j"].as_f64().is_some_and(|j| j > 0.0)
            })
            .count()
    }

    /// SIGTERM, then every window it printed (the last one closes at the stop).
    fn stop(mut self) -> Vec<serde_json::Value> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "sci-agent ended with {status}");
        self.reader.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.windows.lock().unwrap())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same boundary with two real `sci-agent run` processes, each with its
/// own agent.toml, printing its windows as JSON lines: the host role (real
/// eBPF, a powercap tree a thread of this test advances at 150 W) and the
/// guest role (procfs, `energy.source = "hypervisor"`). The agents' windows
/// are not aligned, so each guest window is matched to the host windows it
/// covers by the host window ends it carries (`energy_sample_interval_ns`
/// is the distance between the two host windows it read): its energy must
/// be the published counter's floor difference over exactly those host
/// windows, computed here from the host's own JSON (its processes in the
/// VM's cgroup plus its vCPU's share of idle), to 1 uJ.
#[test]
fn two_sci_agents_host_and_guest_agree_to_the_microjoule() {
    if skip_privileged("two_sci_agents_host_and_guest_agree_to_the_microjoule") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rapl = RaplAt150W::start(dir.path());
    let (_group, _children, cgroup) = vm_with_burners("vm2", "90");
    let publish = dir.path().join("vms");
    let (host_toml, guest_toml) = agent_configs(
        dir.path(),
        &rapl.root,
        &cgroup,
        &format!("publish_dir = \"{}\"", publish.display()),
        "",
        &format!("hypervisor_dir = \"{}\"", publish.join("vm1").display()),
    );

    let host = RunningAgent::start(&["run", "--config", host_toml.to_str().unwrap()]);
    sci_tests::wait_until("the host agent's first published window", || {
        publish.join("vm1/sci-host.json").exists()
    });
    let guest = RunningAgent::start(&["run", "--procfs", "--config", guest_toml.to_str().unwrap()]);
    // 60 guest windows that received energy (under load, some receive
    // none: the host published nothing during them).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while guest.with_energy() < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "60 guest windows with energy in 60 s: {} of {}",
            guest.with_energy(),
            guest.count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let host_windows = host.stop();
    // The guest reads the host's last window, then finds nothing new.
    let after = guest.count() + 3;
    sci_tests::wait_until("three guest windows after the host stopped", || {
        guest.count() >= after
    });
    let guest_windows = guest.stop();
    drop(rapl);

    let (published_uj, vm_cpu_total_ns) = published_by(&host_windows, &cgroup);
    let published_at = |end_ns: u64| -> u64 {
        published_uj
            .iter()
            .find(|(end, _)| *end == end_ns)
            .unwrap_or_else(|| panic!("no host window ends at {end_ns}"))
            .1
    };

    // Where the guest started: the last host window's end less every interval the guest covered.
    let last_end = published_uj.last().unwrap().0;
    let covered_ns: u64 = guest_windows
        .iter()
        .map(|g| u(g, "energy_sample_interval_ns"))
        .sum();
    let mut read_end = last_end - covered_ns;
    let first_uj = published_at(read_end);
    let physical = host_windows[0]["cpus"].as_u64().unwrap() as f64;
    let mut guest_total_j = 0.0;
    let mut measured = 0;
    for (i, g) in guest_windows.iter().enumerate() {
        assert_eq!(
            (g["energy_source"].as_str(), g["estimated"].as_bool()),
            (Some("hypervisor"), Some(false)),
            "guest window {i}: {g}"
        );
        assert_eq!(
            (f(g, "carbon_intensity_g_per_kwh"), f(g, "pue")),
            (412.5, 1.3),
            "guest window {i}: the host's factors"
        );
        assert_eq!(
            g["embodied"]["resource_share"].as_f64(),
            Some(1.0 / physical)
        );
        let previous_uj = published_at(read_end);
        read_end += u(g, "energy_sample_interval_ns");
        let now_uj = published_at(read_end);
        let expected_j = (now_uj - previous_uj) as f64 / 1e6;
        let got_j = f(g, "host_energy_j");
        assert!(
            (got_j - expected_j).abs() <= 1e-6,
            "guest window {i}: guest {got_j} J, host attributed {expected_j} J"
        );
        if expected_j > 0.0 {
            measured += 1;
        }
        guest_total_j += got_j;
    }
    assert_eq!(read_end, last_end);
    let host_covered_uj = published_at(last_end) - first_uj;
    let wraps = published_at(last_end) / (VM_MAX_UJ + 1) - first_uj / (VM_MAX_UJ + 1);
    println!(
        "two sci-agent processes: {} host windows, {} guest windows ({measured} with energy); host attributed {:.6} J to the VM over the guest's span, the guest reported {guest_total_j:.6} J; the published counter wrapped {wraps} time(s); the VM's processes ran {vm_cpu_total_ns} ns",
        host_windows.len(),
        guest_windows.len(),
        host_covered_uj as f64 / 1e6
    );
    assert!(measured >= 60, "guest windows with energy: {measured}");
    assert!(
        vm_cpu_total_ns > 1_000_000_000,
        "the VM's processes ran: {vm_cpu_total_ns} ns"
    );
    assert!(wraps >= 1, "the counter must wrap during the test");
    assert!((guest_total_j * 1e6 - host_covered_uj as f64).abs() <= 1.0);
}

/// The same two real agents over the vsock transport in its Unix-socket
/// form: the host agent listens where Firecracker forwards a guest's
/// connections to CID 2 port 5200 (`<uds_path>_5200`, `vms.vsock =
/// "firecracker"`, no folder at all), the guest agent connects there
/// (`hypervisor_transport = "vsock"`, `hypervisor_uds`). Midway the host
/// agent is stopped and started again. Every guest window the hypervisor
/// measured equals, to 1 uJ, the published counter's floor difference over
/// the host windows it read, following from the one before it (nothing
/// lost or counted twice); the windows that did not are flagged
/// (`hypervisor/failed`, estimated by the model), and there are no more of
/// them than the host's outage spans, plus the re-basing read.
#[test]
fn two_sci_agents_over_vsock_agree_and_a_host_restart_costs_only_its_windows() {
    if skip_privileged("two_sci_agents_over_vsock_agree_and_a_host_restart_costs_only_its_windows")
    {
        return;
    }
    use sci_agent::sources::energy::vsock::{Client, Target};
    let dir = tempfile::tempdir().unwrap();
    let rapl = RaplAt150W::start(dir.path());
    let (_group, _children, cgroup) = vm_with_burners("vm3", "120");
    let uds = dir.path().join("v.sock");
    let socket = dir.path().join("v.sock_5200");
    let (host_toml, guest_toml) = agent_configs(
        dir.path(),
        &rapl.root,
        &cgroup,
        "vsock = \"firecracker\"\nvsock_port = 5200",
        &format!("firecracker_uds = \"{}\"", uds.display()),
        &format!(
            "hypervisor_transport = \"vsock\"\nhypervisor_uds = \"{}\"",
            socket.display()
        ),
    );
    let host_args = ["run", "--config", host_toml.to_str().unwrap()];
    let serving = || {
        let mut probe = Client::new(Target::Unix(socket.clone()), "vm1", Duration::from_secs(1));
        probe.fetch().is_ok()
    };
    let host = RunningAgent::start(&host_args);
    sci_tests::wait_until("the host agent serving its first window", serving);
    let guest = RunningAgent::start(&["run", "--procfs", "--config", guest_toml.to_str().unwrap()]);
    let wait_for_energy = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while guest.with_energy() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} guest windows with energy in 60 s: {} of {}",
                guest.with_energy(),
                guest.count()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_energy(30);
    let first_run = host.stop();
    let after = guest.count() + 3;
    sci_tests::wait_until("three guest windows without the host", || {
        guest.count() >= after
    });
    let host = RunningAgent::start(&host_args);
    let with_energy = guest.with_energy();
    wait_for_energy(with_energy + 30);
    let second_run = host.stop();
    let after = guest.count() + 3;
    sci_tests::wait_until("three guest windows after the host stopped", || {
        guest.count() >= after
    });
    let guest_windows = guest.stop();
    drop(rapl);

    let runs = [
        published_by(&first_run, &cgroup).0,
        published_by(&second_run, &cgroup).0,
    ];
    // Where the guest read last: (run, host window index).
    let mut cursor: Option<(usize, usize)> = None;
    let (mut measured, mut flagged, mut tail) = (0, 0, 0);
    let outage_start_ns = u(first_run.last().unwrap(), "end_unix_ns");
    let outage_end_ns = u(&second_run[0], "end_unix_ns");
    let last_host_end_ns = u(second_run.last().unwrap(), "end_unix_ns");
    let mut guest_total_j = 0.0;
    let mut matched_uj = 0u64;
    for (i, g) in guest_windows.iter().enumerate() {
        let interval_ns = u(g, "energy_sample_interval_ns");
        let got_j = f(g, "host_energy_j");
        if g["energy_source"] != "hypervisor" || g["estimated"].as_bool() != Some(false) {
            assert!(
                g["energy_faults"]["hypervisor/failed"].as_u64() >= Some(1),
                "guest window {i} without the hypervisor's energy is flagged: {g}"
            );
            let end_ns = u(g, "end_unix_ns");
            if end_ns > last_host_end_ns {
                // After the host stopped for good, at the end of the test.
                tail += 1;
            } else {
                // Within the outage, or the re-basing read that ends it.
                assert!(
                    end_ns > outage_start_ns && end_ns <= outage_end_ns + 2 * 200_000_000,
                    "guest window {i} flagged outside the host's outage: {g}"
                );
                flagged += 1;
            }
            cursor = None;
            continue;
        }
        assert_eq!(
            (f(g, "carbon_intensity_g_per_kwh"), f(g, "pue")),
            (412.5, 1.3),
            "guest window {i}: the host's factors"
        );
        assert_eq!(
            g["embodied"]["resource_share"].as_f64(),
            Some(1.0 / u(&first_run[0], "cpus") as f64),
            "guest window {i}: the VM's embodied share from the host"
        );
        if interval_ns == 0 {
            // The host published nothing during this guest window.
            assert_eq!(got_j, 0.0, "guest window {i}: {g}");
            assert!(
                g["energy_faults"]["hypervisor/stale"].as_u64() == Some(1),
                "guest window {i}: {g}"
            );
            measured += 1;
            continue;
        }
        // The host windows it read: following the last read, or (after a
        // re-basing) the one pair of host windows this far apart.
        let candidates: Vec<(usize, usize, usize)> = match cursor {
            Some((run, a)) => (a..runs[run].len())
                .filter(|&b| runs[run][b].0 - runs[run][a].0 == interval_ns)
                .map(|b| (run, a, b))
                .collect(),
            None => (0..2)
                .flat_map(|run| {
                    let r = &runs[run];
                    (0..r.len()).flat_map(move |a| {
                        (a + 1..r.len())
                            .filter(move |&b| r[b].0 - r[a].0 == interval_ns)
                            .map(move |b| (run, a, b))
                    })
                })
                .collect(),
        };
        assert_eq!(
            candidates.len(),
            1,
            "guest window {i} (interval {interval_ns} ns, cursor {cursor:?}): host windows it read: {candidates:?}"
        );
        let (run, a, b) = candidates[0];
        let expected_uj = runs[run][b].1 - runs[run][a].1;
        let got_uj = (got_j * 1e6).round() as u64;
        assert!(
            got_uj.abs_diff(expected_uj) <= 1,
            "guest window {i}: guest {got_j} J, host attributed {expected_uj} uJ"
        );
        guest_total_j += got_j;
        matched_uj += expected_uj;
        measured += 1;
        cursor = Some((run, b));
    }
    let outage_ns = outage_end_ns - outage_start_ns;
    let outage_windows = outage_ns.div_ceil(200_000_000) as usize;
    println!(
        "vsock (unix socket): {} + {} host windows, {} guest windows: {measured} measured ({guest_total_j:.6} J, host {matched_uj} uJ), {flagged} flagged over a host outage of {:.3} s ({outage_windows} windows of 200 ms), {tail} after the host's final stop",
        first_run.len(),
        second_run.len(),
        guest_windows.len(),
        outage_ns as f64 / 1e9
    );
    // The published counter wraps at VM_MAX_UJ: each run's wraps, as the guest saw them.
    let wraps: u64 = runs
        .iter()
        .map(|r| r.last().unwrap().1 / (VM_MAX_UJ + 1))
        .sum();
    println!("the published counter wrapped {wraps} time(s) over the two runs");
    assert!(wraps >= 1, "the counter must wrap during the test");
    assert!(measured >= 60, "guest windows measured: {measured}");
    assert!(flagged >= 1, "the restart must show in the guest's windows");
    assert!(
        flagged <= outage_windows + 2,
        "{flagged} windows flagged for an outage of {outage_windows} windows"
    );
    assert!((guest_total_j * 1e6 - matched_uj as f64).abs() <= 1.0);
}

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// VMs known by their qemu process, not their cgroup: a real qemu TCG guest
/// (`-name guest=vm1`) whose one vCPU spins on a boot sector of `jmp $`,
/// and an idle qemu (`-machine none`, `-name guest=vm10`, `-uuid`), both
/// in the test's own cgroup. Rule vm1 by `qemu_name`, rule vm2 by
/// `qemu_uuid`. Ground truth: each qemu's rusage (all its threads) once
/// reaped; the CPU time each rule attributed over the windows must match it
/// within 1%, vm1 must not take vm10's process, and each VM's published
/// counter must be the floor of the energy its shares add up to.
#[test]
fn a_vm_rule_by_qemu_process_attributes_exactly_its_cpu_time() {
    if skip_privileged("a_vm_rule_by_qemu_process_attributes_exactly_its_cpu_time") {
        return;
    }
    let Some(qemu) = sci_tests::provisioned_tool(
        Path::new(QEMU),
        "a_vm_rule_by_qemu_process_attributes_exactly_its_cpu_time",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sys");
    let package = powercap_tree(&root);
    let mut package_uj: u64 = 5_000_000;
    // A boot sector that spins: `jmp $` and the 0x55AA signature.
    let mut sector = vec![0u8; 512];
    sector[..2].copy_from_slice(&[0xEB, 0xFE]);
    sector[510..].copy_from_slice(&[0x55, 0xAA]);
    let image = dir.path().join("spin.img");
    std::fs::write(&image, &sector).unwrap();
    const UUID: &str = "6f0b4c1e-5a3d-4e2b-9c1f-0123456789ab";

    let publish = dir.path().join("vms");
    let mut config = AgentConfig::default();
    config.agent.host = Some("hypervisor-1".into());
    config.energy.sysfs_root = root.clone();
    config.energy.source = "powercap".into();
    config.energy.probe_ms = 0;
    config.energy.idle_power_w = Some(4.0);
    config.carbon.host_kind = sci_agent::transforms::carbon::HostKind::BareMetal;
    config.carbon.intensity_g_per_kwh = Some(412.5);
    config.profile.enabled = false;
    let rule = |name: &str, qemu_name: Option<&str>, qemu_uuid: Option<&str>| VmRule {
        name: name.into(),
        cgroup: None,
        qemu_name: qemu_name.map(str::to_string),
        qemu_uuid: qemu_uuid.map(str::to_string),
        vcpus: 1,
        vsock_cid: None,
        firecracker_uds: None,
    };
    config.vms = VmsConfig {
        publish_dir: Some(publish.clone()),
        max_energy_range_uj: VM_MAX_UJ,
        rules: vec![
            rule("vm1", Some("vm1"), None),
            rule("vm2", None, Some(&UUID.to_uppercase())),
        ],
        ..VmsConfig::default()
    };
    let (mut host, fallback) = Pipeline::open(&config, &PipelineOptions::default()).unwrap();
    assert!(fallback.is_none(), "eBPF must load here: {fallback:?}");
    host.next_window().unwrap();

    let mut qemus = Reaped(Vec::new());
    for args in [
        vec![
            "-name",
            "guest=vm1,debug-threads=on",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "16",
            "-display",
            "none",
            "-nic",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-drive",
            &format!("file={},format=raw,if=floppy", image.display()),
        ],
        vec![
            "-name",
            "guest=vm10",
            "-uuid",
            UUID,
            "-machine",
            "none",
            "-display",
            "none",
            "-nic",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
        ],
    ] {
        qemus
            .0
            .push(Command::new(&qemu).args(args).spawn().unwrap());
    }
    for q in &qemus.0 {
        wait_for_exec(q.id(), &qemu);
    }

    let mut cpu_ns = [0u64; 2];
    let mut published_j = [0.0f64; 2];
    let mut truth_ns = [0u64; 2];
    for window in 0..20 {
        std::thread::sleep(Duration::from_millis(200));
        if window == 15 {
            // Stop both and take their rusage; the windows after catch their last CPU time.
            for (i, q) in qemus.0.drain(..).enumerate() {
                unsafe { libc::kill(q.id() as i32, libc::SIGTERM) };
                truth_ns[i] = sci_tests::procs::wait_child_rusage_ns(q);
            }
        }
        package_uj += 30_000_000;
        std::fs::write(package.join("energy_uj"), format!("{package_uj}\n")).unwrap();
        let report = host.next_window().unwrap();
        let shares = host.last_vm_shares().to_vec();
        for (i, share) in shares.iter().enumerate() {
            cpu_ns[i] += share.cpu_ns;
            // The publisher's own sum, in its order.
            published_j[i] += share.dynamic_j + share.idle_j;
        }
        assert!(
            report
                .processes
                .iter()
                .filter(|p| p.comm.starts_with("qemu-system-"))
                .all(|p| p.cmdline.is_some()),
            "window {window}: a qemu process without its command line"
        );
    }
    for (i, vm) in ["vm1", "vm2"].iter().enumerate() {
        let counter: u64 = std::fs::read_to_string(
            publish.join(format!("{vm}/class/powercap/intel-rapl:0/energy_uj")),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        let expected = (published_j[i] * 1e6).floor() as u64 % (VM_MAX_UJ + 1);
        println!(
            "{vm}: qemu rusage {} ns, the rule attributed {} ns ({:+.3}%), {:.6} J, published counter {counter} uJ",
            truth_ns[i],
            cpu_ns[i],
            100.0 * (cpu_ns[i] as f64 - truth_ns[i] as f64) / truth_ns[i] as f64,
            published_j[i]
        );
        assert!(
            counter.abs_diff(expected) <= 1,
            "{vm}: counter {counter} uJ, shares {expected} uJ"
        );
    }
    assert!(
        truth_ns[0] > 500_000_000,
        "the TCG guest spun: {} ns",
        truth_ns[0]
    );
    for i in 0..2 {
        assert!(
            cpu_ns[i].abs_diff(truth_ns[i]) as f64 <= 0.01 * truth_ns[i] as f64,
            "vm{}: attributed {} ns, rusage {} ns",
            i + 1,
            cpu_ns[i],
            truth_ns[i]
        );
    }
}
