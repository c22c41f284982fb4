//! Virtual machines measured through their hypervisor's agent.
//!
//! Host role ([`VmPublisher`], `[vms]`): the host agent knows each VM by a
//! rule (its cgroup: libvirt's `machine.slice/machine-qemu-...scope`, a
//! Firecracker jailer cgroup, any cgroup v2 path prefix; or its qemu
//! process: comm or exe `qemu-system-*` whose command line names the guest
//! with `-name guest=<name>` / `-name <name>` or `-uuid <uuid>`; a process
//! matching any of the rule's matchers is the VM's) and, after every
//! window, adds to the VM's cumulative energy its processes' dynamic energy
//! plus its share of the host's idle energy by its reserved vCPUs
//! (`idle x vcpus / host CPUs`). It publishes, per VM, a powercap-shaped
//! folder `<publish_dir>/<vm>/class/powercap/intel-rapl:0/` (`name`
//! `package-0`, `energy_uj`, `max_energy_range_uj`: the counter wraps as
//! RAPL's does), so any RAPL reader in the guest reads it (over virtiofs or
//! 9p), and `<publish_dir>/<vm>/sci-host.json`, one atomic document with the
//! same counter, the cumulative idle part, the host's intensity and its
//! source, PUE and the VM's embodied share (its vCPUs over the physical
//! host's CPUs, from the host).
//!
//! Guest role ([`HypervisorSource`], `energy.source = "hypervisor"`): reads
//! `sci-host.json` each window; the energy is the counter's delta (wrap
//! handled as for powercap), measured, not estimated, and the window takes
//! the host's intensity, PUE and embodied share ([`HostFactors`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::powercap::counter_delta_uj;
use super::{count_fault, DomainKind, DomainReading, EnergyError, EnergySource, WindowEnergy};
use crate::sources::sched::CpuSample;
use crate::window::WindowReport;

pub use crate::transforms::carbon::HostFactors;

/// `sci-host.json`: written by the host agent, read by the guest's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedVm {
    pub vm: String,
    /// The powercap counter (wraps at `max_energy_range_uj`).
    pub energy_uj: u64,
    pub max_energy_range_uj: u64,
    /// Cumulative idle part of the energy, never wrapping.
    pub idle_energy_uj_total: u64,
    /// Host windows published so far.
    pub windows: u64,
    /// End of the last host window published.
    pub window_end_unix_ns: u64,
    /// Host energy source (e.g. `rapl-perf`, `redfish+rapl-perf`) and whether it estimated.
    pub host_energy_source: String,
    pub host_estimated: bool,
    pub vcpus: u32,
    pub host_cpus: u32,
    pub factors: HostFactors,
}

/// One VM rule of `[vms]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRule {
    /// Folder name under `publish_dir` (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// cgroup v2 path prefix of the VM's processes (`/machine.slice/machine-qemu-1-vm1.scope`).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The guest name of a qemu process (`-name guest=<name>` or `-name <name>`).
    #[serde(default)]
    pub qemu_name: Option<String>,
    /// The `-uuid` of a qemu process.
    #[serde(default)]
    pub qemu_uuid: Option<String>,
    /// vCPUs reserved for the VM.
    pub vcpus: u32,
}

/// Default counter range: the one many RAPL packages report (about 262 kJ).
pub const DEFAULT_MAX_ENERGY_RANGE_UJ: u64 = 262_143_328_850;

/// `[vms]` section (host role).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmsConfig {
    /// Where the per-VM folders go; none: nothing is published.
    pub publish_dir: Option<PathBuf>,
    /// Range of the published counters.
    pub max_energy_range_uj: u64,
    pub rules: Vec<VmRule>,
}

impl Default for VmsConfig {
    fn default() -> Self {
        VmsConfig {
            publish_dir: None,
            max_energy_range_uj: DEFAULT_MAX_ENERGY_RANGE_UJ,
            rules: Vec::new(),
        }
    }
}

impl VmsConfig {
    /// Check the section; the message names the key.
    pub fn validate(&self) -> Result<(), EnergyError> {
        let bad = |key: &str, reason: String| EnergyError::Config(format!("vms.{key}: {reason}"));
        if self.max_energy_range_uj < 1_000_000 {
            return Err(bad(
                "max_energy_range_uj",
                format!("{} is below 1 J", self.max_energy_range_uj),
            ));
        }
        if !self.rules.is_empty() && self.publish_dir.is_none() {
            return Err(bad(
                "publish_dir",
                "VM rules need a directory to publish to".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let ok = !r.name.is_empty()
                && r.name != "."
                && r.name != ".."
                && r.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(bad(
                    &format!("rules[{i}].name"),
                    format!("{:?} must be letters, digits, -, _ or .", r.name),
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(bad(
                    &format!("rules[{i}].name"),
                    format!("{:?} is named twice", r.name),
                ));
            }
            if r.cgroup.is_none() && r.qemu_name.is_none() && r.qemu_uuid.is_none() {
                return Err(bad(
                    &format!("rules[{i}]"),
                    "a rule needs cgroup, qemu_name or qemu_uuid".into(),
                ));
            }
            if let Some(cgroup) = r.cgroup.as_deref().filter(|c| !c.starts_with('/')) {
                return Err(bad(
                    &format!("rules[{i}].cgroup"),
                    format!("{cgroup:?} must be a cgroup v2 path starting with /"),
                ));
            }
            for (key, value) in [("qemu_name", &r.qemu_name), ("qemu_uuid", &r.qemu_uuid)] {
                if let Some(v) = value
                    .as_deref()
                    .filter(|v| v.is_empty() || v.chars().any(|c| c == ',' || c.is_whitespace()))
                {
                    return Err(bad(
                        &format!("rules[{i}].{key}"),
                        format!("{v:?} must be one word without commas (as qemu's command line holds it)"),
                    ));
                }
            }
            if r.vcpus == 0 {
                return Err(bad(
                    &format!("rules[{i}].vcpus"),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The guest name and uuid a qemu process was started with; None when the
/// process is not qemu (comm or exe `qemu-system-*`). `cmdline` is the
/// words joined by spaces, as the window holds it.
pub fn qemu_identity(
    comm: &str,
    exe: Option<&str>,
    cmdline: Option<&str>,
) -> Option<(Option<String>, Option<String>)> {
    let exe_name = exe.map(|e| e.rsplit('/').next().unwrap_or(e));
    let is_qemu =
        comm.starts_with("qemu-system-") || exe_name.is_some_and(|e| e.starts_with("qemu-system-"));
    if !is_qemu {
        return None;
    }
    let (mut name, mut uuid) = (None, None);
    let mut words = cmdline.unwrap_or_default().split_whitespace();
    while let Some(word) = words.next() {
        // qemu takes `-name` and `--name` alike.
        match word.trim_start_matches('-') {
            "name" if word.starts_with('-') => {
                let value = words.next().unwrap_or_default();
                for (i, part) in value.split(',').enumerate() {
                    match part.split_once('=') {
                        Some(("guest", guest)) => name = Some(guest.to_string()),
                        None if i == 0 && !part.is_empty() => name = Some(part.to_string()),
                        _ => {}
                    }
                }
            }
            "uuid" if word.starts_with('-') => uuid = words.next().map(str::to_string),
            _ => {}
        }
    }
    Some((name, uuid))
}

impl VmRule {
    /// Whether `p` is one of this VM's processes (any matcher of the rule).
    pub fn matches(&self, p: &crate::window::ProcessRecord) -> bool {
        if let (Some(prefix), Some(cgroup)) = (&self.cgroup, p.cgroup.as_deref()) {
            if under(cgroup, prefix) {
                return true;
            }
        }
        if self.qemu_name.is_none() && self.qemu_uuid.is_none() {
            return false;
        }
        let Some((name, uuid)) = qemu_identity(&p.comm, p.exe.as_deref(), p.cmdline.as_deref())
        else {
            return false;
        };
        (self.qemu_name.is_some() && self.qemu_name == name)
            || (self.qemu_uuid.is_some()
                && self
                    .qemu_uuid
                    .as_deref()
                    .zip(uuid.as_deref())
                    .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b)))
    }
}

/// A VM's part of one host window.
#[derive(Debug, Clone, PartialEq)]
pub struct VmShare {
    pub vm: String,
    /// Dynamic energy of the VM's processes.
    pub dynamic_j: f64,
    /// Its share of the host's idle energy (by reserved vCPUs).
    pub idle_j: f64,
    /// CPU time of its processes.
    pub cpu_ns: u64,
}

impl VmShare {
    pub fn energy_j(&self) -> f64 {
        self.dynamic_j + self.idle_j
    }
}

/// Whether `cgroup` is `prefix` or below it.
fn under(cgroup: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    cgroup == prefix || cgroup.starts_with(&format!("{prefix}/")) || prefix.is_empty()
}

/// The VMs' parts of a window whose energy and carbon are filled.
pub fn vm_shares(rules: &[VmRule], report: &WindowReport) -> Vec<VmShare> {
    let host_cpus = report.cpus.max(1);
    rules
        .iter()
        .map(|rule| {
            let mut share = VmShare {
                vm: rule.name.clone(),
                dynamic_j: 0.0,
                idle_j: report.idle_energy_j * f64::from(rule.vcpus.min(host_cpus))
                    / f64::from(host_cpus),
                cpu_ns: 0,
            };
            for p in &report.processes {
                if rule.matches(p) {
                    share.dynamic_j += p.energy_j;
                    share.cpu_ns += p.cpu_ns;
                }
            }
            share
        })
        .collect()
}

fn write_atomically(path: &Path, text: &str) -> Result<(), EnergyError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| EnergyError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EnergyError::io(path, e))
}

struct VmState {
    rule: VmRule,
    dir: PathBuf,
    total_j: f64,
    idle_total_j: f64,
    windows: u64,
}

/// Host role: publishes each VM's cumulative energy (see the module note).
pub struct VmPublisher {
    vms: Vec<VmState>,
    max_energy_range_uj: u64,
}

impl VmPublisher {
    /// Creates the folders; fails naming the path that cannot be written.
    pub fn new(cfg: &VmsConfig) -> Result<Option<VmPublisher>, EnergyError> {
        cfg.validate()?;
        let Some(dir) = &cfg.publish_dir else {
            return Ok(None);
        };
        let mut vms = Vec::new();
        for rule in &cfg.rules {
            let vm_dir = dir.join(&rule.name);
            let zone = vm_dir.join("class/powercap/intel-rapl:0");
            std::fs::create_dir_all(&zone).map_err(|e| EnergyError::io(&zone, e))?;
            write_atomically(&zone.join("name"), "package-0\n")?;
            write_atomically(
                &zone.join("max_energy_range_uj"),
                &format!("{}\n", cfg.max_energy_range_uj),
            )?;
            vms.push(VmState {
                rule: rule.clone(),
                dir: vm_dir,
                total_j: 0.0,
                idle_total_j: 0.0,
                windows: 0,
            });
        }
        Ok(Some(VmPublisher {
            vms,
            max_energy_range_uj: cfg.max_energy_range_uj,
        }))
    }

    /// Adds a window whose energy and carbon are filled and publishes every VM.
    pub fn publish(&mut self, report: &WindowReport) -> Result<Vec<VmShare>, EnergyError> {
        let rules: Vec<VmRule> = self.vms.iter().map(|v| v.rule.clone()).collect();
        let shares = vm_shares(&rules, report);
        let host_cpus = report.cpus.max(1);
        for (vm, share) in self.vms.iter_mut().zip(&shares) {
            vm.total_j += share.energy_j();
            vm.idle_total_j += share.idle_j;
            vm.windows += 1;
            // Cumulative rounding: the counter never drifts from the sum of the windows.
            let total_uj = (vm.total_j * 1e6).floor() as u64;
            let energy_uj = total_uj % (self.max_energy_range_uj + 1);
            let vcpus = vm.rule.vcpus.min(host_cpus);
            let document = PublishedVm {
                vm: vm.rule.name.clone(),
                energy_uj,
                max_energy_range_uj: self.max_energy_range_uj,
                idle_energy_uj_total: (vm.idle_total_j * 1e6).floor() as u64,
                windows: vm.windows,
                window_end_unix_ns: report.end_unix_ns,
                host_energy_source: report.energy_source.clone(),
                host_estimated: report.estimated,
                vcpus,
                host_cpus,
                factors: HostFactors {
                    host: report.host.clone(),
                    intensity_g_per_kwh: report.carbon_intensity_g_per_kwh,
                    intensity_source: report.intensity_source.clone(),
                    pue: report.pue,
                    resource_share: f64::from(vcpus) / f64::from(host_cpus)
                        * report.embodied.resource_share,
                    share_source: format!(
                        "hypervisor {}: {vcpus} vCPUs of the physical host's {host_cpus} (x the host's own share {}: {})",
                        report.host, report.embodied.resource_share, report.embodied.share_source
                    ),
                },
            };
            let json = serde_json::to_string_pretty(&document).map_err(|e| EnergyError::Parse {
                path: vm.dir.join("sci-host.json"),
                reason: e.to_string(),
            })?;
            write_atomically(&vm.dir.join("sci-host.json"), &json)?;
            write_atomically(
                &vm.dir.join("class/powercap/intel-rapl:0/energy_uj"),
                &format!("{energy_uj}\n"),
            )?;
        }
        Ok(shares)
    }
}

/// Guest role: the VM's energy as its host attributed it.
pub struct HypervisorSource {
    file: PathBuf,
    previous: Option<PublishedVm>,
    cpus: u32,
}

fn read_published(file: &Path) -> Result<PublishedVm, EnergyError> {
    let text = std::fs::read_to_string(file).map_err(|e| EnergyError::io(file, e))?;
    serde_json::from_str(&text).map_err(|e| EnergyError::Parse {
        path: file.to_path_buf(),
        reason: format!("not what a host agent publishes: {e}"),
    })
}

impl HypervisorSource {
    /// `dir` is the VM's folder as the guest sees it (`<publish_dir>/<vm>` on the host).
    pub fn open(dir: &Path, cpus: u32) -> Result<HypervisorSource, EnergyError> {
        let file = dir.join("sci-host.json");
        let first = read_published(&file)?;
        Ok(HypervisorSource {
            file,
            previous: Some(first),
            cpus,
        })
    }
}

impl EnergySource for HypervisorSource {
    fn name(&self) -> &str {
        "hypervisor"
    }

    fn estimated(&self) -> bool {
        false
    }

    fn window_energy(&mut self, sample: &CpuSample) -> Result<WindowEnergy, EnergyError> {
        let duration_ns = sample.end_unix_ns.saturating_sub(sample.start_unix_ns);
        let now = match read_published(&self.file) {
            Ok(now) => now,
            Err(e) => {
                // Re-based when it can be read again: the energy in between is unknown.
                self.previous = None;
                return Err(e);
            }
        };
        let Some(previous) = self.previous.replace(now.clone()) else {
            return Err(EnergyError::AllDomainsFailed(format!(
                "{} readable again: re-based, this window has no energy",
                self.file.display()
            )));
        };
        if now.max_energy_range_uj != previous.max_energy_range_uj || now.windows < previous.windows
        {
            return Err(EnergyError::Absurd {
                domain: "vm".into(),
                reason: format!(
                    "{}: the host's counter restarted (windows {} -> {}, range {} -> {}); re-based",
                    self.file.display(),
                    previous.windows,
                    now.windows,
                    previous.max_energy_range_uj,
                    now.max_energy_range_uj
                ),
            });
        }
        let energy_j = counter_delta_uj(previous.energy_uj, now.energy_uj, now.max_energy_range_uj)
            as f64
            / 1e6;
        let idle_j = (now
            .idle_energy_uj_total
            .saturating_sub(previous.idle_energy_uj_total) as f64
            / 1e6)
            .min(energy_j);
        let mut warnings = Vec::new();
        let mut faults = BTreeMap::new();
        if now.windows == previous.windows {
            warnings.push(format!(
                "{}: the host published no window during this one (its energy lands in the next)",
                self.file.display()
            ));
            count_fault(&mut faults, "hypervisor", "stale");
        }
        if now.host_estimated {
            warnings.push(format!(
                "the host's energy is estimated ({})",
                now.host_energy_source
            ));
        }
        Ok(WindowEnergy {
            source: "hypervisor".into(),
            estimated: now.host_estimated,
            duration_ns,
            domains: vec![DomainReading {
                name: "vm".into(),
                kind: DomainKind::Hypervisor,
                package: None,
                cpus: (0..self.cpus.max(1)).collect(),
                energy_j,
                counts_toward_host: true,
                idle_power_w: None,
                known_idle_j: Some(idle_j),
            }],
            warnings,
            faults,
            sample_interval_ns: now
                .window_end_unix_ns
                .saturating_sub(previous.window_end_unix_ns),
            host_factors: Some(now.factors),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rules_are_refused_naming_the_key() {
        let rule = |name: &str, cgroup: &str, vcpus: u32| VmRule {
            name: name.into(),
            cgroup: Some(cgroup.into()),
            qemu_name: None,
            qemu_uuid: None,
            vcpus,
        };
        let with = |rules: Vec<VmRule>| VmsConfig {
            publish_dir: Some("/run/sci/vms".into()),
            rules,
            ..VmsConfig::default()
        };
        assert!(with(vec![rule("vm1", "/machine.slice/vm1.scope", 2)])
            .validate()
            .is_ok());
        for (config, key) in [
            (with(vec![rule("../etc", "/a", 1)]), "vms.rules[0].name"),
            (
                with(vec![rule("a", "/a", 1), rule("a", "/b", 1)]),
                "vms.rules[1].name",
            ),
            (
                with(vec![rule("a", "machine.slice", 1)]),
                "vms.rules[0].cgroup",
            ),
            (with(vec![rule("a", "/a", 0)]), "vms.rules[0].vcpus"),
            (
                with(vec![VmRule {
                    cgroup: None,
                    ..rule("a", "/a", 1)
                }]),
                "vms.rules[0]: a rule needs cgroup, qemu_name or qemu_uuid",
            ),
            (
                with(vec![VmRule {
                    qemu_name: Some("vm1,debug-threads=on".into()),
                    ..rule("a", "/a", 1)
                }]),
                "vms.rules[0].qemu_name",
            ),
            (
                VmsConfig {
                    rules: vec![rule("a", "/a", 1)],
                    ..VmsConfig::default()
                },
                "vms.publish_dir",
            ),
            (
                VmsConfig {
                    max_energy_range_uj: 10,
                    ..VmsConfig::default()
                },
                "vms.max_energy_range_uj",
            ),
        ] {
            let e = config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn a_qemu_command_line_gives_its_guest_name_and_uuid() {
        let exe = Some("/usr/bin/qemu-system-x86_64");
        for (comm, exe, cmdline, expected) in [
            (
                "qemu-system-x86",
                exe,
                "qemu-system-x86_64 -name guest=vm1,debug-threads=on -uuid 6F0B-1 -m 16",
                Some((Some("vm1"), Some("6F0B-1"))),
            ),
            (
                "qemu-system-x86",
                None,
                "qemu-system-x86_64 -name vm2",
                Some((Some("vm2"), None)),
            ),
            (
                "CPU 0/KVM",
                exe,
                "x --name debug-threads=on,guest=vm3",
                Some((Some("vm3"), None)),
            ),
            (
                "qemu-system-x86",
                exe,
                "qemu-system-x86_64 -machine none",
                Some((None, None)),
            ),
            // Not qemu: a guest name on another program's command line is not a VM.
            ("sh", Some("/bin/sh"), "sh -c x -name guest=vm1", None),
        ] {
            let got = qemu_identity(comm, exe, Some(cmdline));
            let got = got.as_ref().map(|(n, u)| (n.as_deref(), u.as_deref()));
            assert_eq!(got, expected, "{cmdline}");
        }
    }

    #[test]
    fn a_cgroup_rule_matches_the_group_and_below_only() {
        assert!(under(
            "/machine.slice/vm1.scope",
            "/machine.slice/vm1.scope"
        ));
        assert!(under(
            "/machine.slice/vm1.scope/vcpu0",
            "/machine.slice/vm1.scope"
        ));
        assert!(!under(
            "/machine.slice/vm10.scope",
            "/machine.slice/vm1.scope"
        ));
    }
}
