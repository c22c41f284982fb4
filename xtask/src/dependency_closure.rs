//! xtask must build with the stable toolchain alone: it is what installs
//! nightly's rust-src and bpf-linker. So no crate it depends on (normal or
//! build dependencies, transitively) may compile the eBPF object, which is
//! what a build dependency on `aya-build` or a dependency on `agent-ebpf`
//! means. `cargo metadata` gives the resolved graph; this walks it from xtask.
use std::collections::{HashMap, HashSet, VecDeque};

use anyhow::{Context, Result};
use serde_json::Value;

/// One crate in xtask's closure that builds eBPF, with the path that reaches it.
#[derive(Debug, PartialEq)]
pub struct EbpfBuilder {
    pub package: String,
    pub why: String,
    pub chain: Vec<String>,
}

impl std::fmt::Display for EbpfBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}), reached by {}",
            self.package,
            self.why,
            self.chain.join(" -> ")
        )
    }
}

/// The crates reachable from package `root` (its normal and build
/// dependencies, not dev) that build the eBPF object, from `cargo metadata
/// --format-version 1` output.
pub fn ebpf_builders_reached(metadata: &Value, root: &str) -> Result<Vec<EbpfBuilder>> {
    let packages = metadata["packages"]
        .as_array()
        .context("metadata: no packages")?;
    let name_of: HashMap<&str, &str> = packages
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let builds_ebpf: HashMap<&str, String> = packages
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_str()?;
            if p["name"].as_str()? == "agent-ebpf" {
                return Some((id, "it is the eBPF program".to_string()));
            }
            let aya_build = p["dependencies"].as_array()?.iter().any(|d| {
                d["name"].as_str() == Some("aya-build") && d["kind"].as_str() == Some("build")
            });
            aya_build.then(|| {
                (
                    id,
                    "its build script compiles eBPF with aya-build".to_string(),
                )
            })
        })
        .collect();
    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .context("metadata: no resolve graph")?;
    let edges: HashMap<&str, Vec<&str>> = nodes
        .iter()
        .filter_map(|n| {
            let id = n["id"].as_str()?;
            let deps = n["deps"]
                .as_array()?
                .iter()
                .filter(|d| {
                    d["dep_kinds"].as_array().is_some_and(|kinds| {
                        kinds.iter().any(|k| k["kind"].as_str() != Some("dev"))
                    })
                })
                .filter_map(|d| d["pkg"].as_str())
                .collect();
            Some((id, deps))
        })
        .collect();
    let root_id = name_of
        .iter()
        .find(|(_, name)| **name == root)
        .map(|(id, _)| *id)
        .with_context(|| format!("metadata: no package {root}"))?;
    let mut parent: HashMap<&str, &str> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::from([root_id]);
    let mut queue = VecDeque::from([root_id]);
    let mut found = Vec::new();
    while let Some(id) = queue.pop_front() {
        if let Some(why) = builds_ebpf.get(id) {
            let mut chain = vec![name_of.get(id).copied().unwrap_or(id).to_string()];
            let mut at = id;
            while let Some(p) = parent.get(at) {
                chain.push(name_of.get(p).copied().unwrap_or(p).to_string());
                at = p;
            }
            chain.reverse();
            found.push(EbpfBuilder {
                package: chain.last().cloned().unwrap_or_default(),
                why: why.clone(),
                chain,
            });
        }
        for dep in edges.get(id).into_iter().flatten() {
            if seen.insert(dep) {
                parent.insert(dep, id);
                queue.push_back(dep);
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dependency_closure_builds_no_ebpf() {
        let out = crate::cargo()
            .args(["metadata", "--format-version", "1"])
            .current_dir(crate::workspace_root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
        let found = ebpf_builders_reached(&metadata, "xtask").unwrap();
        let listed: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            found.is_empty(),
            "xtask must build before set-up, but its dependencies build eBPF:\n  {}",
            listed.join("\n  ")
        );
        // The check itself sees the crate that does.
        let agent = ebpf_builders_reached(&metadata, "sci-tests").unwrap();
        assert!(agent.iter().any(|b| b.package == "sci-agent"), "{agent:?}");
    }

    /// The shape of the regression #22 found: xtask -> sci-tests -> sci-agent.
    #[test]
    fn names_the_offending_crate_and_the_path_to_it() {
        let dep = |id: &str, kind: Option<&str>| serde_json::json!({"pkg": id, "dep_kinds": [{"kind": kind, "target": null}]});
        let metadata = serde_json::json!({
            "packages": [
                {"id": "x", "name": "xtask", "dependencies": []},
                {"id": "t", "name": "sci-tests", "dependencies": []},
                {"id": "a", "name": "sci-agent", "dependencies": [
                    {"name": "aya-build", "kind": "build"}]},
                {"id": "d", "name": "devonly", "dependencies": [
                    {"name": "aya-build", "kind": "build"}]},
            ],
            "resolve": {"nodes": [
                {"id": "x", "deps": [dep("t", None), dep("d", Some("dev"))]},
                {"id": "t", "deps": [dep("a", None)]},
                {"id": "a", "deps": []},
                {"id": "d", "deps": []},
            ]}
        });
        let found = ebpf_builders_reached(&metadata, "xtask").unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].package, "sci-agent");
        assert_eq!(found[0].chain, ["xtask", "sci-tests", "sci-agent"]);
        assert!(found[0].to_string().contains("aya-build"));
    }
}
