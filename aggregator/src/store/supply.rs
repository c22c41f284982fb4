//! A window's resource supply as the rollups key it: one canonical text
//! per distinct supply (hardware and labels), and its attributes as rows of
//! `supply_attrs`, which a grouping by any attribute joins.
use sci_proto::v1;

/// The supply of windows that carry none (agents before #27).
pub const NO_SUPPLY: &str = "(none)";

/// Attributes a supply has besides its labels (`label.<key>`), in the order
/// the canonical text shows them.
pub const ATTRIBUTES: [&str; 7] = [
    "arch",
    "cpu_vendor",
    "cpu_model",
    "logical_cpus",
    "memory_gib",
    "machine_kind",
    "physical_host_cpus",
];

fn gib(bytes: u64) -> String {
    // Rounded to whole GiB: MemTotal is a little under the nominal size.
    format!("{:.0}", (bytes as f64 / (1u64 << 30) as f64).round())
}

/// One supply attribute's value.
fn attribute(s: &v1::ResourceSupply, name: &str) -> String {
    match name {
        "arch" => s.arch.clone(),
        "cpu_vendor" => s.cpu_vendor.clone(),
        "cpu_model" => s.cpu_model.clone(),
        "logical_cpus" => s.logical_cpus.to_string(),
        "memory_gib" => gib(s.memory_bytes),
        "machine_kind" => s.machine_kind.clone(),
        "physical_host_cpus" => s.physical_host_cpus.to_string(),
        _ => String::new(),
    }
}

/// The canonical text of a supply, e.g. `x86_64 AMD EPYC 7B13, 2 CPUs,
/// 24 GiB, vm of 64 CPUs | pool=batch-a zone=sh-2`. Two windows share a
/// supply when they share this text.
pub fn supply_key(supply: Option<&v1::ResourceSupply>) -> String {
    let Some(s) = supply else {
        return NO_SUPPLY.to_string();
    };
    let model = if s.cpu_model.is_empty() {
        "unknown CPU"
    } else {
        &s.cpu_model
    };
    let kind = match (s.machine_kind.as_str(), s.physical_host_cpus) {
        ("vm", 0) => "vm".to_string(),
        ("vm", n) => format!("vm of {n} CPUs"),
        ("", _) => "unknown kind".to_string(),
        (k, _) => k.to_string(),
    };
    let mut key = format!(
        "{} {model}, {} CPUs, {} GiB, {kind}",
        s.arch,
        s.logical_cpus,
        gib(s.memory_bytes)
    );
    if !s.labels.is_empty() {
        key.push_str(" |");
        for (k, v) in &s.labels {
            key.push_str(&format!(" {k}={v}"));
        }
    }
    key
}

/// (attribute, value) rows of a supply: [`ATTRIBUTES`] then `label.<key>`.
pub fn supply_attributes(supply: Option<&v1::ResourceSupply>) -> Vec<(String, String)> {
    let Some(s) = supply else {
        return Vec::new();
    };
    ATTRIBUTES
        .iter()
        .map(|a| (a.to_string(), attribute(s, a)))
        .chain(
            s.labels
                .iter()
                .map(|(k, v)| (format!("label.{k}"), v.clone())),
        )
        .collect()
}

/// Whether `name` is an attribute a grouping can use: one of
/// [`ATTRIBUTES`], `datacenter`, `supply`, or `label.<key>`.
pub fn groupable(name: &str) -> bool {
    ATTRIBUTES.contains(&name)
        || name == "datacenter"
        || name == "supply"
        || name
            .strip_prefix("label.")
            .is_some_and(|k| !k.is_empty() && k.len() <= 63)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_key_names_hardware_and_labels() {
        let s = v1::ResourceSupply {
            cpu_model: "AMD EPYC 7B13".into(),
            cpu_vendor: "AuthenticAMD".into(),
            arch: "x86_64".into(),
            logical_cpus: 2,
            memory_bytes: 24 * (1 << 30) - 300 * (1 << 20),
            machine_kind: "vm".into(),
            physical_host_cpus: 64,
            labels: [("pool".to_string(), "a".to_string())].into(),
        };
        assert_eq!(
            supply_key(Some(&s)),
            "x86_64 AMD EPYC 7B13, 2 CPUs, 24 GiB, vm of 64 CPUs | pool=a"
        );
        assert_eq!(supply_key(None), NO_SUPPLY);
        let attrs = supply_attributes(Some(&s));
        assert!(attrs.contains(&("label.pool".into(), "a".into())));
        assert!(attrs.contains(&("memory_gib".into(), "24".into())));
        assert!(groupable("label.zone") && groupable("cpu_model") && !groupable("x; DROP"));
    }
}
