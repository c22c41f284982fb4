//! The window document on the wire: the one conversion between
//! [`crate::window`] and `sci.v1` (proto/proto/sci/v1/sci.proto).
//!
//! Each message is converted by one field list, [`wire_pair!`], that writes
//! both directions as struct literals without `..Default::default()`: a
//! field added to either side and not listed here does not compile, and the
//! round-trip test (every field set, to the wire and back) catches a field
//! listed with the wrong meaning. Optional text is `None` in the document and
//! the empty string on the wire.
use std::collections::BTreeMap;

use sci_proto::v1;

use crate::window::{
    CpuSource, DomainEnergy, EmbodiedFactors, LossCounters, ProcessRecord, ProfileStack,
    RequestCpuHistogram, ResourceSupply, ScenarioRecord, Text, ThreadRecord, WindowReport,
};

/// A wire window the document cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cpu_source {0:?} is neither \"ebpf\" nor \"procfs\"")]
    CpuSource(String),
}

/// One side of a message to the other.
pub trait ToWire<T> {
    fn to_wire(&self) -> T;
}

macro_rules! same_on_both_sides {
    ($($t:ty),*) => {$(
        impl ToWire<$t> for $t {
            fn to_wire(&self) -> $t {
                self.clone()
            }
        }
    )*};
}
same_on_both_sides!(u32, u64, f64, bool, String);

impl ToWire<String> for Option<String> {
    fn to_wire(&self) -> String {
        self.clone().unwrap_or_default()
    }
}

impl ToWire<Option<String>> for String {
    fn to_wire(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.clone())
    }
}

impl ToWire<String> for Text {
    fn to_wire(&self) -> String {
        self.to_string()
    }
}

impl ToWire<Text> for String {
    fn to_wire(&self) -> Text {
        Text::from(self.as_str())
    }
}

impl ToWire<String> for Option<Text> {
    fn to_wire(&self) -> String {
        self.as_deref().unwrap_or_default().to_string()
    }
}

impl ToWire<Option<Text>> for String {
    fn to_wire(&self) -> Option<Text> {
        (!self.is_empty()).then(|| Text::from(self.as_str()))
    }
}

impl ToWire<String> for CpuSource {
    fn to_wire(&self) -> String {
        self.as_str().to_string()
    }
}

impl ToWire<CpuSource> for String {
    /// Checked by `TryFrom<&v1::WindowReport>` before any field is read.
    fn to_wire(&self) -> CpuSource {
        if self == CpuSource::Ebpf.as_str() {
            CpuSource::Ebpf
        } else {
            CpuSource::Procfs
        }
    }
}

impl<A: ToWire<B>, B> ToWire<Vec<B>> for Vec<A> {
    fn to_wire(&self) -> Vec<B> {
        self.iter().map(ToWire::to_wire).collect()
    }
}

impl<V: Clone> ToWire<BTreeMap<String, V>> for BTreeMap<String, V> {
    fn to_wire(&self) -> BTreeMap<String, V> {
        self.clone()
    }
}

/// Both directions of one message from one list of its fields.
macro_rules! wire_pair {
    ($doc:ident <-> $wire:ident { $($field:ident),* $(,)? }) => {
        impl ToWire<v1::$wire> for $doc {
            fn to_wire(&self) -> v1::$wire {
                v1::$wire { $($field: self.$field.to_wire(),)* }
            }
        }

        impl ToWire<$doc> for v1::$wire {
            fn to_wire(&self) -> $doc {
                $doc { $($field: self.$field.to_wire(),)* }
            }
        }
    };
}

/// A sub-message the document always has and the wire may leave out.
macro_rules! always_present {
    ($($doc:ident <-> $wire:ident),*) => {$(
        impl ToWire<Option<v1::$wire>> for $doc {
            fn to_wire(&self) -> Option<v1::$wire> {
                Some(self.to_wire())
            }
        }

        impl ToWire<$doc> for Option<v1::$wire> {
            fn to_wire(&self) -> $doc {
                self.as_ref().map(ToWire::to_wire).unwrap_or_default()
            }
        }
    )*};
}
always_present!(
    LossCounters <-> LossCounters,
    EmbodiedFactors <-> EmbodiedFactors,
    ResourceSupply <-> ResourceSupply
);

wire_pair!(ResourceSupply <-> ResourceSupply {
    cpu_model,
    cpu_vendor,
    arch,
    logical_cpus,
    memory_bytes,
    machine_kind,
    physical_host_cpus,
    labels,
});

wire_pair!(LossCounters <-> LossCounters {
    proc_map_full_events,
    proc_map_full_cpu_ns,
    ringbuf_drops,
    thread_map_full,
    txn_map_full,
    scenario_map_full,
    late_cpu_ns,
    request_histogram_full,
    profile_samples_lost,
    profile_stacks_lost,
});

wire_pair!(ThreadRecord <-> ThreadRecord { tid, cpu_ns });

wire_pair!(ProcessRecord <-> ProcessRecord {
    pid,
    ppid,
    comm,
    exe,
    cmdline,
    cgroup,
    container_id,
    cpu_ns,
    exited,
    scenario,
    service,
    threads,
    energy_j,
    idle_share_j,
    carbon_g,
    embodied_g,
});

wire_pair!(ScenarioRecord <-> ScenarioRecord {
    scenario,
    weight,
    transactions,
    cpu_ns,
    energy_j,
    carbon_g,
    embodied_g,
});

wire_pair!(DomainEnergy <-> DomainEnergy { domain, energy_j });

wire_pair!(ProfileStack <-> ProfileStack {
    pid,
    comm,
    service,
    scenario,
    stack,
    samples,
    energy_j,
});

wire_pair!(EmbodiedFactors <-> EmbodiedFactors {
    total_embodied_g,
    lifespan_s,
    resource_share,
    share_source,
});

wire_pair!(RequestCpuHistogram <-> RequestCpuHistogram {
    scenario,
    service,
    counts,
    sum_cpu_ns,
    energy_j_per_cpu_ns,
    sub_bucket_bits,
});

wire_pair!(WindowReport <-> WindowReport {
    host,
    agent_instance,
    seq,
    datacenter,
    start_unix_ns,
    end_unix_ns,
    cpu_source,
    cpus,
    idle_cpu_ns,
    busy_cpu_ns,
    lost,
    energy_source,
    estimated,
    host_energy_j,
    idle_energy_j,
    unattributed_energy_j,
    idle_baseline_source,
    domains,
    carbon_intensity_g_per_kwh,
    pue,
    host_carbon_g,
    host_embodied_g,
    conservation_violations,
    steal_cpu_ns,
    unattributed_cpu_ns,
    intensity_source,
    energy_model,
    embodied,
    weights,
    scenarios,
    business_units,
    ingest_refused,
    energy_faults,
    energy_sample_interval_ns,
    processes,
    profile,
    profile_stacks_trimmed,
    profile_trimmed_energy_j,
    request_cpu,
    merged_windows,
    supply,
});

impl From<&WindowReport> for v1::WindowReport {
    fn from(window: &WindowReport) -> Self {
        window.to_wire()
    }
}

impl TryFrom<&v1::WindowReport> for WindowReport {
    type Error = WireError;

    fn try_from(window: &v1::WindowReport) -> Result<Self, WireError> {
        if window.cpu_source != CpuSource::Ebpf.as_str()
            && window.cpu_source != CpuSource::Procfs.as_str()
        {
            return Err(WireError::CpuSource(window.cpu_source.clone()));
        }
        Ok(window.to_wire())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every field of the document set to a value of its own (no zero, no
    /// empty text or list, no false), so a field that is dropped or swapped
    /// on the way shows.
    fn every_field_set() -> WindowReport {
        let mut w = WindowReport::new("db-07".into(), "5f1c".into(), 11, 22, CpuSource::Ebpf, 33);
        w.seq = 44;
        w.datacenter = Some("east".into());
        w.idle_cpu_ns = 55;
        w.busy_cpu_ns = 66;
        w.lost = LossCounters {
            proc_map_full_events: 1,
            proc_map_full_cpu_ns: 2,
            ringbuf_drops: 3,
            thread_map_full: 4,
            txn_map_full: 5,
            scenario_map_full: 6,
            late_cpu_ns: 7,
            request_histogram_full: 8,
            profile_samples_lost: 9,
            profile_stacks_lost: 10,
        };
        w.energy_source = "powercap".into();
        w.estimated = true;
        w.host_energy_j = 1.5;
        w.idle_energy_j = 2.5;
        w.unattributed_energy_j = 3.5;
        w.idle_baseline_source = "learned".into();
        w.domains = vec![DomainEnergy {
            domain: "package-0".into(),
            energy_j: 4.5,
        }];
        w.carbon_intensity_g_per_kwh = 581.0;
        w.pue = 1.3;
        w.host_carbon_g = 5.5;
        w.host_embodied_g = 6.5;
        w.conservation_violations = 77;
        w.steal_cpu_ns = 88;
        w.unattributed_cpu_ns = 99;
        w.intensity_source = "config".into();
        w.energy_model = "linear".into();
        w.embodied = EmbodiedFactors {
            total_embodied_g: 7.5,
            lifespan_s: 8.5,
            resource_share: 0.25,
            share_source: "vm".into(),
        };
        w.weights = BTreeMap::from([("credit".to_string(), 24.0)]);
        w.scenarios = vec![ScenarioRecord {
            scenario: "credit".into(),
            weight: 24.0,
            transactions: 3,
            cpu_ns: 4,
            energy_j: 9.5,
            carbon_g: 10.5,
            embodied_g: 11.5,
        }];
        w.business_units = 72.0;
        w.ingest_refused = BTreeMap::from([("unknown_scenario".to_string(), 2)]);
        w.energy_faults = BTreeMap::from([("redfish/stale".to_string(), 3)]);
        w.energy_sample_interval_ns = 5_000_000_000;
        w.processes = vec![ProcessRecord {
            pid: 101,
            ppid: 1,
            comm: "loan-api".into(),
            exe: Some("/usr/bin/loan-api".into()),
            cmdline: Some("loan-api --port 80".into()),
            cgroup: Some("/system.slice/loan.service".into()),
            container_id: Some("c0ffee".into()),
            cpu_ns: 12,
            exited: true,
            scenario: Some("credit".into()),
            service: Some("loan".into()),
            threads: vec![ThreadRecord {
                tid: 102,
                cpu_ns: 13,
            }],
            energy_j: 12.5,
            idle_share_j: 13.5,
            carbon_g: 14.5,
            embodied_g: 15.5,
        }];
        w.profile = vec![ProfileStack {
            pid: 101,
            comm: "loan-api".into(),
            service: Some("loan".into()),
            scenario: Some("credit".into()),
            stack: "main;score".into(),
            samples: 14,
            energy_j: 16.5,
        }];
        w.profile_stacks_trimmed = 15;
        w.profile_trimmed_energy_j = 17.5;
        w.request_cpu = vec![RequestCpuHistogram {
            scenario: "credit".into(),
            service: "loan".into(),
            counts: vec![0, 1, 2],
            sum_cpu_ns: 16,
            energy_j_per_cpu_ns: 1e-9,
            sub_bucket_bits: 4,
        }];
        w.merged_windows = 3;
        w.supply = ResourceSupply {
            cpu_model: "AMD EPYC 7B13".into(),
            cpu_vendor: "AuthenticAMD".into(),
            arch: "x86_64".into(),
            logical_cpus: 2,
            memory_bytes: 24 << 30,
            machine_kind: "vm".into(),
            physical_host_cpus: 64,
            labels: BTreeMap::from([("pool".to_string(), "batch-a".to_string())]),
        };
        w
    }

    /// Paths of JSON leaves that hold a default value (0, "", false, null, []).
    fn unset_fields(value: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        use serde_json::Value;
        match value {
            Value::Null => out.push(path.into()),
            Value::Bool(b) if !b => out.push(path.into()),
            Value::Number(n) if n.as_f64() == Some(0.0) => out.push(path.into()),
            Value::String(s) if s.is_empty() => out.push(path.into()),
            Value::Array(items) if items.is_empty() => out.push(path.into()),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    // A histogram's bucket 0 may be 0 by nature; only lists of records are walked.
                    if item.is_object() {
                        unset_fields(item, &format!("{path}[{i}]"), out);
                    }
                }
            }
            Value::Object(fields) if fields.is_empty() => out.push(path.into()),
            Value::Object(fields) => {
                for (name, field) in fields {
                    unset_fields(field, &format!("{path}.{name}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_field_reaches_the_wire_and_comes_back() {
        let window = every_field_set();
        let mut unset = Vec::new();
        unset_fields(
            &serde_json::to_value(&window).unwrap(),
            "window",
            &mut unset,
        );
        assert!(
            unset.is_empty(),
            "the fixture must set every field of the document: {unset:?}"
        );
        let wire = v1::WindowReport::from(&window);
        assert_eq!(wire.processes[0].threads.len(), 1);
        assert_eq!(wire.ingest_refused["unknown_scenario"], 2);
        assert_eq!(wire.merged_windows, 3);
        let back = WindowReport::try_from(&wire).unwrap();
        assert_eq!(back, window);
        // And through the bytes prost writes.
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: v1::WindowReport = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(WindowReport::try_from(&decoded).unwrap(), window);
    }

    #[test]
    fn an_unknown_cpu_source_is_refused_by_name() {
        let mut wire = v1::WindowReport::from(&every_field_set());
        wire.cpu_source = "rapl".into();
        let e = WindowReport::try_from(&wire).unwrap_err();
        assert!(e.to_string().contains("\"rapl\""), "{e}");
    }
}
