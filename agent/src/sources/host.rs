//! The host as a resource supply (standard 7.4): CPU model and vendor,
//! architecture, logical CPUs, memory, bare metal or VM and the physical
//! machine's CPUs, and the operator's labels (pool, instance type, zone).
//! Read once when the agent starts and put in every window, so the
//! aggregator can compare the same service on different supplies.
//!
//! Labels come from `[host] labels` in agent.toml and, under Kubernetes,
//! from `[host] labels_file`: a file in the downward API's format (one
//! `key="value"` per line), e.g. the pod's labels with the node's topology
//! labels copied in, or a file an init container writes from the node
//! object. A key in agent.toml wins over the same key in the file, and
//! both win over the node's labels read from the API server
//! ([`crate::sources::node_labels`], `[host.kubernetes]`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::AgentError;
use crate::transforms::carbon::{CarbonConfig, HostKind};
use crate::window::ResourceSupply;

use super::labels::check_label;
pub use super::labels::{MAX_LABELS, MAX_LABEL_BYTES};

/// `[host]` section of agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Operator labels of this host, e.g. `pool = "batch-a"`, `zone = "sh-2"`.
    pub labels: BTreeMap<String, String>,
    /// A file of `key="value"` lines (Kubernetes downward API format).
    pub labels_file: Option<PathBuf>,
    /// The node's labels from the Kubernetes API server (`[host.kubernetes]`).
    pub kubernetes: crate::sources::node_labels::NodeLabelsConfig,
}

fn config_error(key: &str, message: String) -> AgentError {
    AgentError::Config {
        path: key.into(),
        message,
    }
}

/// Parses a downward-API labels file: `key="value"` per line.
pub fn parse_labels_file(path: &Path) -> Result<BTreeMap<String, String>, AgentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::io(format!("host.labels_file {}", path.display()), e))?;
    let mut labels = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("host.labels_file {} line {}", path.display(), n + 1);
        let Some((key, value)) = line.split_once('=') else {
            return Err(config_error(&at, format!("{line:?} is not key=\"value\"")));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value)
            .replace("\\\"", "\"");
        check_label(key.trim(), &value, &at)?;
        labels.insert(key.trim().to_string(), value);
    }
    Ok(labels)
}

/// The first value of `field` in /proc/cpuinfo's text.
fn cpuinfo_field<'a>(cpuinfo: &'a str, field: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == field).then(|| value.trim())
    })
}

/// This host's supply. `proc_root` is `/proc` (a directory of the same
/// shape in tests); `logical_cpus` the CPUs the sampler sees.
pub fn describe(
    proc_root: &Path,
    logical_cpus: u32,
    host: &HostConfig,
    carbon: &CarbonConfig,
) -> Result<ResourceSupply, AgentError> {
    let mut labels = match &host.labels_file {
        Some(path) => parse_labels_file(path)?,
        None => BTreeMap::new(),
    };
    for (key, value) in &host.labels {
        check_label(key, value, &format!("host.labels.{key}"))?;
        labels.insert(key.clone(), value.clone());
    }
    if labels.len() > MAX_LABELS {
        return Err(config_error(
            "host.labels",
            format!("{} labels (at most {MAX_LABELS})", labels.len()),
        ));
    }
    let cpuinfo = std::fs::read_to_string(proc_root.join("cpuinfo")).unwrap_or_default();
    let meminfo = std::fs::read_to_string(proc_root.join("meminfo")).unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024);
    let hypervisor = cpuinfo_field(&cpuinfo, "flags")
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == "hypervisor"));
    let vm = match carbon.host_kind {
        HostKind::Vm => true,
        HostKind::BareMetal => false,
        HostKind::Auto => hypervisor,
    };
    let physical_host_cpus = if vm {
        carbon.physical_host_vcpus.unwrap_or(0)
    } else {
        logical_cpus
    };
    Ok(ResourceSupply {
        cpu_model: cpuinfo_field(&cpuinfo, "model name")
            .unwrap_or_default()
            .to_string(),
        cpu_vendor: cpuinfo_field(&cpuinfo, "vendor_id")
            .unwrap_or_default()
            .to_string(),
        arch: std::env::consts::ARCH.to_string(),
        logical_cpus,
        memory_bytes,
        machine_kind: if vm { "vm" } else { "bare_metal" }.to_string(),
        physical_host_cpus,
        labels,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn proc_tree(flags: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cpuinfo"),
            format!("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu {flags} sse\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       24576000 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn a_vm_with_labels_from_file_and_config() {
        let proc = proc_tree("hypervisor");
        let file = proc.path().join("labels");
        std::fs::write(
            &file,
            "pool=\"from-file\"\ntopology.kubernetes.io/zone=\"sh-2\"\n",
        )
        .unwrap();
        let host = HostConfig {
            labels: BTreeMap::from([("pool".into(), "batch-a".into())]),
            labels_file: Some(file),
            ..Default::default()
        };
        let carbon = CarbonConfig {
            physical_host_vcpus: Some(64),
            ..Default::default()
        };
        let s = describe(proc.path(), 2, &host, &carbon).unwrap();
        assert_eq!(s.cpu_model, "AMD EPYC 7B13");
        assert_eq!(s.cpu_vendor, "AuthenticAMD");
        assert_eq!(s.memory_bytes, 24_576_000 * 1024);
        assert_eq!(s.machine_kind, "vm");
        assert_eq!(s.physical_host_cpus, 64);
        assert_eq!(s.labels["pool"], "batch-a");
        assert_eq!(s.labels["topology.kubernetes.io/zone"], "sh-2");
    }

    #[test]
    fn bare_metal_counts_its_own_cpus() {
        let proc = proc_tree("");
        let s = describe(
            proc.path(),
            8,
            &HostConfig::default(),
            &CarbonConfig::default(),
        )
        .unwrap();
        assert_eq!(
            (s.machine_kind.as_str(), s.physical_host_cpus),
            ("bare_metal", 8)
        );
    }

    #[test]
    fn bad_labels_are_refused_by_key() {
        let proc = proc_tree("");
        let host = HostConfig {
            labels: BTreeMap::from([("bad key".into(), "x".into())]),
            labels_file: None,
            ..Default::default()
        };
        let e = describe(proc.path(), 2, &host, &CarbonConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host.labels.bad key") && e.contains("letters"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_parses_when_uncommented() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let example: String = text
            .split_once("# [host]")
            .unwrap()
            .1
            .split("\n\n")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            // Settings, not the prose between them.
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
            .collect::<Vec<_>>()
            .join("\n");
        let host: HostConfig = toml::from_str(&format!("{example}\n")).unwrap();
        assert_eq!(host.labels["pool"], "batch-a");
        assert!(host.labels_file.is_some());
    }
}
