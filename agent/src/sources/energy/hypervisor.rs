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
//! The same document is served over vsock when `[vms] vsock` is set (see
//! [`super::vsock`]: an `AF_VSOCK` port, or Firecracker's per-VM Unix socket).
//!
//! Guest role ([`HypervisorSource`], `energy.source = "hypervisor"`): reads
//! `sci-host.json` each window (from the folder, or over vsock with
//! `energy.hypervisor_transport = "vsock"`); the energy is the counter's delta (wrap
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
    /// With `vms.vsock = "af_vsock"`: the guest's CID; only that peer reads this VM.
    #[serde(default)]
    pub vsock_cid: Option<u32>,
    /// With `vms.vsock = "firecracker"`: the VM's vsock `uds_path`; the host
    /// agent listens on `<firecracker_uds>_<vms.vsock_port>`.
    #[serde(default)]
    pub firecracker_uds: Option<PathBuf>,
}

/// Where the host serves the VMs' documents over vsock (`vms.vsock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VsockListen {
    #[default]
    Off,
    /// `AF_VSOCK` `VMADDR_CID_ANY:vsock_port` (qemu/libvirt with vhost-vsock).
    AfVsock,
    /// A Unix socket per VM at `<firecracker_uds>_<vsock_port>`.
    Firecracker,
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
    /// Serve the documents over vsock too (`off`, `af_vsock`, `firecracker`).
    pub vsock: VsockListen,
    /// The vsock port guests connect to (with `vsock` other than `off`).
    pub vsock_port: Option<u32>,
    pub rules: Vec<VmRule>,
}

impl Default for VmsConfig {
    fn default() -> Self {
        VmsConfig {
            publish_dir: None,
            max_energy_range_uj: DEFAULT_MAX_ENERGY_RANGE_UJ,
            vsock: VsockListen::Off,
            vsock_port: None,
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
        if !self.rules.is_empty() && self.publish_dir.is_none() && self.vsock == VsockListen::Off {
            return Err(bad(
                "publish_dir",
                "VM rules need a directory to publish to (or vms.vsock)".into(),
            ));
        }
        match (self.vsock, self.vsock_port) {
            (VsockListen::Off, Some(_)) => {
                return Err(bad(
                    "vsock_port",
                    "set vms.vsock (af_vsock or firecracker) to listen".into(),
                ))
            }
            (VsockListen::Off, None) => {}
            (_, None) => {
                return Err(bad(
                    "vsock_port",
                    "required with vms.vsock (the port guests connect to)".into(),
                ))
            }
            (_, Some(port)) if port == 0 || port == libc::VMADDR_PORT_ANY => {
                return Err(bad(
                    "vsock_port",
                    format!("{port} is not a port a guest can connect to"),
                ))
            }
            _ => {}
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
            match (self.vsock, r.vsock_cid, &r.firecracker_uds) {
                (VsockListen::AfVsock, None, _) => {
                    return Err(bad(
                        &format!("rules[{i}].vsock_cid"),
                        "required with vms.vsock = \"af_vsock\" (the guest's CID: only it reads this VM)".into(),
                    ))
                }
                (VsockListen::AfVsock, Some(cid), _) if cid < 3 || cid == libc::VMADDR_CID_ANY => {
                    return Err(bad(
                        &format!("rules[{i}].vsock_cid"),
                        format!("{cid} is not a guest's CID (3 or more)"),
                    ))
                }
                (VsockListen::Firecracker, _, None) => {
                    return Err(bad(
                        &format!("rules[{i}].firecracker_uds"),
                        "required with vms.vsock = \"firecracker\" (the VM's vsock uds_path)".into(),
                    ))
                }
                (VsockListen::Firecracker, _, Some(p)) if p.as_os_str().is_empty() => {
                    return Err(bad(
                        &format!("rules[{i}].firecracker_uds"),
                        "an empty path".into(),
                    ))
                }
                _ => {}
            }
            if let Some(cid) = r.vsock_cid.filter(|_| self.vsock == VsockListen::AfVsock) {
                if self.rules[..i].iter().any(|o| o.vsock_cid == Some(cid)) {
                    return Err(bad(
                        &format!("rules[{i}].vsock_cid"),
                        format!("CID {cid} is given to two VMs"),
                    ));
                }
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
    dir: Option<PathBuf>,
    total_j: f64,
    idle_total_j: f64,
    windows: u64,
}

/// The vsock listeners `[vms]` asks for; a bind error names the key and the errno.
fn start_server(cfg: &VmsConfig) -> Result<Option<super::vsock::Server>, EnergyError> {
    use super::vsock::{Endpoint, Server};
    let Some(port) = cfg.vsock_port else {
        return Ok(None);
    };
    let server = match cfg.vsock {
        VsockListen::Off => return Ok(None),
        VsockListen::AfVsock => Server::start(vec![Endpoint::Vsock {
            port,
            vms_by_cid: cfg
                .rules
                .iter()
                .filter_map(|r| Some((r.vsock_cid?, r.name.clone())))
                .collect(),
            key: "vms.vsock_port".into(),
        }])?,
        VsockListen::Firecracker => {
            let mut endpoints = Vec::new();
            for (i, r) in cfg.rules.iter().enumerate() {
                let Some(uds) = &r.firecracker_uds else {
                    continue;
                };
                let mut path = uds.clone().into_os_string();
                path.push(format!("_{port}"));
                endpoints.push(Endpoint::Unix {
                    path: path.into(),
                    vm: r.name.clone(),
                    key: format!("vms.rules[{i}].firecracker_uds"),
                });
            }
            Server::start(endpoints)?
        }
    };
    Ok(Some(server))
}

/// Host role: publishes each VM's cumulative energy (see the module note).
pub struct VmPublisher {
    vms: Vec<VmState>,
    max_energy_range_uj: u64,
    server: Option<super::vsock::Server>,
}

impl VmPublisher {
    /// Creates the folders; fails naming the path that cannot be written.
    pub fn new(cfg: &VmsConfig) -> Result<Option<VmPublisher>, EnergyError> {
        cfg.validate()?;
        if cfg.publish_dir.is_none() && cfg.vsock == VsockListen::Off {
            return Ok(None);
        }
        let mut vms = Vec::new();
        for rule in &cfg.rules {
            let vm_dir = cfg.publish_dir.as_ref().map(|dir| dir.join(&rule.name));
            if let Some(vm_dir) = &vm_dir {
                let zone = vm_dir.join("class/powercap/intel-rapl:0");
                std::fs::create_dir_all(&zone).map_err(|e| EnergyError::io(&zone, e))?;
                write_atomically(&zone.join("name"), "package-0\n")?;
                write_atomically(
                    &zone.join("max_energy_range_uj"),
                    &format!("{}\n", cfg.max_energy_range_uj),
                )?;
            }
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
            server: start_server(cfg)?,
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
                path: PathBuf::from(format!("sci-host.json of {}", vm.rule.name)),
                reason: e.to_string(),
            })?;
            if let Some(server) = &self.server {
                server.publish(&vm.rule.name, &json);
            }
            if let Some(dir) = &vm.dir {
                write_atomically(&dir.join("sci-host.json"), &json)?;
                write_atomically(
                    &dir.join("class/powercap/intel-rapl:0/energy_uj"),
                    &format!("{energy_uj}\n"),
                )?;
            }
        }
        Ok(shares)
    }

    /// What the vsock listeners refused since the last call (`vms/vsock_*`).
    pub fn take_faults(&self) -> BTreeMap<String, u64> {
        self.server
            .as_ref()
            .map(|s| s.take_faults())
            .unwrap_or_default()
    }
}

/// Where the guest reads the host's document.
pub enum Feed {
    /// `<dir>/sci-host.json` (virtiofs, 9p).
    Folder(PathBuf),
    /// Over vsock (or its Unix-socket form).
    Socket(super::vsock::Client),
}

impl Feed {
    fn describe(&self) -> String {
        match self {
            Feed::Folder(file) => file.display().to_string(),
            Feed::Socket(client) => client.target().to_string(),
        }
    }

    fn read(&mut self) -> Result<PublishedVm, EnergyError> {
        let (text, path) = match self {
            Feed::Folder(file) => (
                std::fs::read(&*file).map_err(|e| EnergyError::io(&*file, e))?,
                file.clone(),
            ),
            Feed::Socket(client) => (client.fetch()?, PathBuf::from(client.target().to_string())),
        };
        serde_json::from_slice(&text).map_err(|e| EnergyError::Parse {
            path,
            reason: format!("not what a host agent publishes: {e}"),
        })
    }
}

/// Guest role: the VM's energy as its host attributed it.
pub struct HypervisorSource {
    feed: Feed,
    previous: Option<PublishedVm>,
    cpus: u32,
}

impl HypervisorSource {
    /// `dir` is the VM's folder as the guest sees it (`<publish_dir>/<vm>` on the host).
    pub fn open(dir: &Path, cpus: u32) -> Result<HypervisorSource, EnergyError> {
        Self::with_feed(Feed::Folder(dir.join("sci-host.json")), cpus)
    }

    /// Reads the first document now: a feed that cannot be read is refused at start.
    pub fn with_feed(mut feed: Feed, cpus: u32) -> Result<HypervisorSource, EnergyError> {
        let first = feed.read()?;
        if let Feed::Socket(client) = &mut feed {
            client.take_reconnected();
        }
        Ok(HypervisorSource {
            feed,
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
        let now = match self.feed.read() {
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
                self.feed.describe()
            )));
        };
        if now.max_energy_range_uj != previous.max_energy_range_uj || now.windows < previous.windows
        {
            return Err(EnergyError::Absurd {
                domain: "vm".into(),
                reason: format!(
                    "{}: the host's counter restarted (windows {} -> {}, range {} -> {}); re-based",
                    self.feed.describe(),
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
                self.feed.describe()
            ));
            count_fault(&mut faults, "hypervisor", "stale");
        }
        if let Feed::Socket(client) = &mut self.feed {
            if client.take_reconnected() {
                count_fault(&mut faults, "hypervisor", "reconnected");
            }
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
            vsock_cid: None,
            firecracker_uds: None,
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
            (
                VmsConfig {
                    vsock: VsockListen::AfVsock,
                    ..with(vec![rule("a", "/a", 1)])
                },
                "vms.vsock_port: required",
            ),
            (
                VmsConfig {
                    vsock_port: Some(5200),
                    ..with(vec![rule("a", "/a", 1)])
                },
                "vms.vsock_port: set vms.vsock",
            ),
            (
                VmsConfig {
                    vsock: VsockListen::AfVsock,
                    vsock_port: Some(u32::MAX),
                    ..with(vec![rule("a", "/a", 1)])
                },
                "vms.vsock_port: 4294967295",
            ),
            (
                VmsConfig {
                    vsock: VsockListen::AfVsock,
                    vsock_port: Some(5200),
                    ..with(vec![rule("a", "/a", 1)])
                },
                "vms.rules[0].vsock_cid: required",
            ),
            (
                VmsConfig {
                    vsock: VsockListen::AfVsock,
                    vsock_port: Some(5200),
                    ..with(vec![VmRule {
                        vsock_cid: Some(2),
                        ..rule("a", "/a", 1)
                    }])
                },
                "vms.rules[0].vsock_cid: 2 is not a guest's CID",
            ),
            (
                VmsConfig {
                    vsock: VsockListen::AfVsock,
                    vsock_port: Some(5200),
                    ..with(vec![
                        VmRule {
                            vsock_cid: Some(7),
                            ..rule("a", "/a", 1)
                        },
                        VmRule {
                            vsock_cid: Some(7),
                            ..rule("b", "/b", 1)
                        },
                    ])
                },
                "vms.rules[1].vsock_cid: CID 7 is given to two VMs",
            ),
            (
                VmsConfig {
                    vsock: VsockListen::Firecracker,
                    vsock_port: Some(5200),
                    ..with(vec![rule("a", "/a", 1)])
                },
                "vms.rules[0].firecracker_uds: required",
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
    fn the_guests_vsock_keys_are_refused_naming_the_key() {
        use crate::sources::energy::EnergyConfig;
        let guest = |f: &dyn Fn(&mut EnergyConfig)| {
            let mut c = EnergyConfig {
                source: "hypervisor".into(),
                hypervisor_transport: "vsock".into(),
                hypervisor_vsock_port: Some(5200),
                ..EnergyConfig::default()
            };
            f(&mut c);
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(guest(&|_| {}), "");
        assert_eq!(
            guest(&|c| {
                c.hypervisor_vsock_port = None;
                c.hypervisor_uds = Some("/run/v.sock_5200".into());
            }),
            ""
        );
        for (change, key) in [
            (
                &(|c: &mut EnergyConfig| c.hypervisor_transport = "virtio".into())
                    as &dyn Fn(&mut EnergyConfig),
                "energy.hypervisor_transport: \"virtio\"",
            ),
            (
                &|c: &mut EnergyConfig| c.hypervisor_vsock_port = None,
                "energy.hypervisor_vsock_port: required",
            ),
            (
                &|c: &mut EnergyConfig| c.hypervisor_uds = Some("/s".into()),
                "energy.hypervisor_uds: a Unix socket instead",
            ),
            (
                &|c: &mut EnergyConfig| c.hypervisor_dir = Some("/d".into()),
                "energy.hypervisor_dir",
            ),
            (
                &|c: &mut EnergyConfig| c.hypervisor_timeout_ms = 0,
                "energy.hypervisor_timeout_ms: 0",
            ),
            (
                &|c: &mut EnergyConfig| c.hypervisor_vm = "x".repeat(65),
                "energy.hypervisor_vm",
            ),
            (
                &|c: &mut EnergyConfig| c.source = "model".into(),
                "energy.hypervisor_vsock_port: only with",
            ),
        ] {
            let e = guest(change);
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
