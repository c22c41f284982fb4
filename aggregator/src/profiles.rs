//! Energy profiles across agents and windows.
//!
//! Agents send folded stacks (`root;...;leaf`, samples, joules) per window.
//! [`merge`] adds them up per (service, scenario) over a time range; a
//! [`MergedProfile`] renders as a flame graph SVG whose widths are energy
//! (micro-joules as integer counts, through `inferno`), and exports as a
//! gzip-compressed pprof `perftools.profiles.Profile` with two sample types,
//! `samples/count` and `energy/microjoules`, which `go tool pprof` and most
//! profile viewers read. The pprof message set below is written by hand from
//! profile.proto (only the fields we fill), encoded with prost.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

/// Errors of profile rendering and export.
#[derive(Debug, thiserror::Error)]
pub enum ProfileExportError {
    #[error("flame graph of {subject}: {source}")]
    FlameGraph {
        subject: String,
        #[source]
        source: std::io::Error,
    },
    #[error("compressing the pprof profile: {0}")]
    Gzip(#[source] std::io::Error),
}

/// One folded stack of one agent window, as stored by the aggregator.
#[derive(Debug, Clone, PartialEq)]
pub struct StackRow {
    /// End of the window the stack was sampled in (a window belongs to the
    /// period its end falls in, as in `sci`).
    pub window_end_unix_ns: u64,
    pub service: Option<String>,
    pub scenario: Option<String>,
    /// `frame;frame;frame`, root first.
    pub stack: String,
    pub samples: u64,
    pub energy_j: f64,
}

/// Samples and energy of one stack.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StackTotals {
    pub samples: u64,
    pub energy_j: f64,
}

/// All stacks of one service and scenario over `[start_unix_ns, end_unix_ns)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedProfile {
    pub service: Option<String>,
    pub scenario: Option<String>,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub stacks: BTreeMap<String, StackTotals>,
}

/// Energy of one function: `self` where it is the leaf (on CPU itself),
/// `total` where it is anywhere on the stack (itself and its callees).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionEnergy {
    pub function: String,
    pub self_samples: u64,
    pub self_energy_j: f64,
    pub total_energy_j: f64,
}

/// Adds up the rows whose window ends in `(start_unix_ns, end_unix_ns]` (as
/// the store selects them),
/// per (service, scenario); sorted by service, then scenario (None first).
pub fn merge(rows: &[StackRow], start_unix_ns: u64, end_unix_ns: u64) -> Vec<MergedProfile> {
    let mut merged: BTreeMap<(Option<String>, Option<String>), MergedProfile> = BTreeMap::new();
    for row in rows {
        if row.window_end_unix_ns <= start_unix_ns || row.window_end_unix_ns > end_unix_ns {
            continue;
        }
        let profile = merged
            .entry((row.service.clone(), row.scenario.clone()))
            .or_insert_with(|| MergedProfile {
                service: row.service.clone(),
                scenario: row.scenario.clone(),
                start_unix_ns,
                end_unix_ns,
                stacks: BTreeMap::new(),
            });
        let totals = profile.stacks.entry(row.stack.clone()).or_default();
        totals.samples += row.samples;
        totals.energy_j += row.energy_j;
    }
    merged.into_values().collect()
}

fn micro_joules(energy_j: f64) -> i64 {
    (energy_j * 1e6).round().max(0.0) as i64
}

impl MergedProfile {
    /// `service/scenario`, with `-` for what is unknown.
    pub fn subject(&self) -> String {
        format!(
            "{}/{}",
            self.service.as_deref().unwrap_or("-"),
            self.scenario.as_deref().unwrap_or("-")
        )
    }

    pub fn total_samples(&self) -> u64 {
        self.stacks.values().map(|t| t.samples).sum()
    }

    pub fn total_energy_j(&self) -> f64 {
        self.stacks.values().map(|t| t.energy_j).sum()
    }

    /// Functions by self energy, most first (ties by name).
    pub fn functions(&self) -> Vec<FunctionEnergy> {
        let mut by_name: BTreeMap<&str, FunctionEnergy> = BTreeMap::new();
        for (stack, totals) in &self.stacks {
            let frames: Vec<&str> = stack.split(';').collect();
            let mut seen: Vec<&str> = Vec::with_capacity(frames.len());
            for frame in &frames {
                // A recursive function counts once per stack in its total.
                if seen.contains(frame) {
                    continue;
                }
                seen.push(frame);
                by_name
                    .entry(frame)
                    .or_insert_with(|| FunctionEnergy {
                        function: frame.to_string(),
                        self_samples: 0,
                        self_energy_j: 0.0,
                        total_energy_j: 0.0,
                    })
                    .total_energy_j += totals.energy_j;
            }
            if let Some(leaf) = frames.last().and_then(|leaf| by_name.get_mut(leaf)) {
                leaf.self_samples += totals.samples;
                leaf.self_energy_j += totals.energy_j;
            }
        }
        let mut functions: Vec<FunctionEnergy> = by_name.into_values().collect();
        functions.sort_by(|a, b| {
            b.self_energy_j
                .total_cmp(&a.self_energy_j)
                .then_with(|| a.function.cmp(&b.function))
        });
        functions
    }

    /// Folded lines `stack count`, the count being micro-joules (stacks
    /// below one micro-joule are left out).
    pub fn folded_energy_lines(&self) -> Vec<String> {
        self.stacks
            .iter()
            .filter_map(|(stack, totals)| {
                let uj = micro_joules(totals.energy_j);
                (uj > 0).then(|| format!("{stack} {uj}"))
            })
            .collect()
    }

    /// A flame graph whose frame widths are energy (µJ).
    pub fn flamegraph_svg(&self) -> Result<String, ProfileExportError> {
        let lines = self.folded_energy_lines();
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!("Energy flame graph: {}", self.subject());
        options.count_name = "µJ".to_string();
        options.deterministic = true;
        options.hash = true;
        let mut svg = Vec::new();
        let result = if lines.is_empty() {
            // inferno refuses an empty profile; an empty graph says "nothing measured".
            inferno::flamegraph::from_lines(&mut options, ["[no energy measured] 0"], &mut svg)
        } else {
            inferno::flamegraph::from_lines(
                &mut options,
                lines.iter().map(String::as_str),
                &mut svg,
            )
        };
        result.map_err(|source| ProfileExportError::FlameGraph {
            subject: self.subject(),
            source,
        })?;
        Ok(String::from_utf8_lossy(&svg).into_owned())
    }

    /// The profile as a pprof message (not compressed).
    pub fn to_pprof(&self) -> pprof::Profile {
        let mut strings = StringTable::default();
        let samples_type = pprof::ValueType {
            r#type: strings.id("samples"),
            unit: strings.id("count"),
        };
        let energy_type = pprof::ValueType {
            r#type: strings.id("energy"),
            unit: strings.id("microjoules"),
        };
        let mut functions: Vec<pprof::Function> = Vec::new();
        let mut function_ids: HashMap<String, u64> = HashMap::new();
        let mut samples = Vec::with_capacity(self.stacks.len());
        for (stack, totals) in &self.stacks {
            // pprof wants the leaf first.
            let location_id = stack
                .split(';')
                .rev()
                .map(|frame| {
                    if let Some(id) = function_ids.get(frame) {
                        return *id;
                    }
                    let id = functions.len() as u64 + 1;
                    let name = strings.id(frame);
                    functions.push(pprof::Function {
                        id,
                        name,
                        system_name: name,
                        filename: 0,
                        start_line: 0,
                    });
                    function_ids.insert(frame.to_string(), id);
                    id
                })
                .collect();
            samples.push(pprof::Sample {
                location_id,
                value: vec![totals.samples as i64, micro_joules(totals.energy_j)],
            });
        }
        // One location per function (we have no addresses): same ids.
        let location = functions
            .iter()
            .map(|f| pprof::Location {
                id: f.id,
                mapping_id: 0,
                address: 0,
                line: vec![pprof::Line {
                    function_id: f.id,
                    line: 0,
                }],
            })
            .collect();
        let default_sample_type = energy_type.r#type;
        pprof::Profile {
            sample_type: vec![samples_type, energy_type],
            sample: samples,
            location,
            function: functions,
            string_table: strings.strings,
            time_nanos: self.start_unix_ns as i64,
            duration_nanos: self.end_unix_ns.saturating_sub(self.start_unix_ns) as i64,
            default_sample_type,
        }
    }

    /// The pprof profile, gzip-compressed (what `go tool pprof` opens).
    pub fn to_pprof_gzip(&self) -> Result<Vec<u8>, ProfileExportError> {
        use prost::Message;
        let bytes = self.to_pprof().encode_to_vec();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(&bytes)
            .map_err(ProfileExportError::Gzip)?;
        encoder.finish().map_err(ProfileExportError::Gzip)
    }
}

/// pprof's string table: index 0 is always the empty string.
struct StringTable {
    strings: Vec<String>,
    ids: HashMap<String, i64>,
}

impl Default for StringTable {
    fn default() -> Self {
        StringTable {
            strings: vec![String::new()],
            ids: HashMap::from([(String::new(), 0)]),
        }
    }
}

impl StringTable {
    fn id(&mut self, s: &str) -> i64 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.ids.insert(s.to_string(), id);
        id
    }
}

/// The part of `perftools.profiles` (profile.proto) we write; field numbers
/// are those of the published schema.
pub mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prost::Message;
    use std::io::Read;

    fn row(start: u64, scenario: &str, stack: &str, samples: u64, energy_j: f64) -> StackRow {
        StackRow {
            window_end_unix_ns: start,
            service: Some("loan-api".into()),
            scenario: Some(scenario.into()),
            stack: stack.into(),
            samples,
            energy_j,
        }
    }

    fn rows() -> Vec<StackRow> {
        vec![
            row(20, "credit", "main;score;hot_path", 30, 1.5),
            row(10, "credit", "main;score;hot_path", 10, 0.5),
            row(10, "credit", "main;score", 5, 0.25),
            row(10, "credit", "main;io", 5, 0.25),
            row(10, "query", "main;lookup", 4, 0.1),
            // Outside (0, 20]: left out.
            row(0, "credit", "main;early", 100, 9.0),
            row(21, "credit", "main;late", 100, 9.0),
        ]
    }

    #[test]
    fn merge_adds_up_per_service_and_scenario_within_the_range() {
        let merged = merge(&rows(), 0, 20);
        assert_eq!(merged.len(), 2);
        let credit = &merged[0];
        assert_eq!(credit.scenario.as_deref(), Some("credit"));
        assert_eq!(credit.stacks["main;score;hot_path"].samples, 40);
        assert!((credit.stacks["main;score;hot_path"].energy_j - 2.0).abs() < 1e-12);
        assert_eq!(credit.total_samples(), 50);
        assert!((credit.total_energy_j() - 2.5).abs() < 1e-12);
        assert!(!credit.stacks.contains_key("main;late"));
        assert!(!credit.stacks.contains_key("main;early"));
        assert_eq!(merged[1].total_samples(), 4);
    }

    #[test]
    fn functions_split_self_and_total_energy() {
        let credit = merge(&rows(), 0, 20).remove(0);
        let functions = credit.functions();
        // Self: hot_path 2.0, score 0.25, io 0.25 (ties by name: io, score), main 0.
        assert_eq!(functions[0].function, "hot_path");
        assert!((functions[0].self_energy_j - 2.0).abs() < 1e-12);
        assert_eq!(functions[0].self_samples, 40);
        assert_eq!(functions[1].function, "io");
        assert_eq!(functions[2].function, "score");
        assert!((functions[2].total_energy_j - 2.25).abs() < 1e-12);
        let main = functions.iter().find(|f| f.function == "main").unwrap();
        assert!((main.total_energy_j - 2.5).abs() < 1e-12);
        assert_eq!(main.self_energy_j, 0.0);
    }

    #[test]
    fn flame_graph_widths_are_micro_joules() {
        let credit = merge(&rows(), 0, 20).remove(0);
        assert_eq!(
            credit.folded_energy_lines(),
            vec![
                "main;io 250000".to_string(),
                "main;score 250000".to_string(),
                "main;score;hot_path 2000000".to_string(),
            ]
        );
        let svg = credit.flamegraph_svg().unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("Energy flame graph: loan-api/credit"));
        // inferno's tooltip: hot_path is 2,000,000 µJ of 2,500,000 = 80%.
        assert!(svg.contains("hot_path (2,000,000 µJ, 80.00%)"), "{svg}");
        assert!(svg.contains("all (2,500,000 µJ, 100%)"));
    }

    #[test]
    fn pprof_wire_format_follows_profile_proto() {
        // ValueType{type: 1, unit: 2} inside Profile.sample_type (field 1):
        // tag 0x0a, length 4, then 0x08 0x01 (field 1 varint), 0x10 0x02 (field 2).
        let profile = pprof::Profile {
            sample_type: vec![pprof::ValueType { r#type: 1, unit: 2 }],
            ..Default::default()
        };
        assert_eq!(
            profile.encode_to_vec(),
            vec![0x0a, 0x04, 0x08, 0x01, 0x10, 0x02]
        );
        // string_table is field 6 (tag 0x32), Sample.value field 2 packed (tag 0x12).
        let profile = pprof::Profile {
            string_table: vec!["".into(), "a".into()],
            ..Default::default()
        };
        assert_eq!(profile.encode_to_vec(), vec![0x32, 0x00, 0x32, 0x01, b'a']);
        let sample = pprof::Sample {
            location_id: vec![],
            value: vec![3, 5],
        };
        assert_eq!(sample.encode_to_vec(), vec![0x12, 0x02, 0x03, 0x05]);
    }

    #[test]
    fn pprof_export_round_trips_with_samples_and_energy() {
        let credit = merge(&rows(), 0, 20).remove(0);
        let gz = credit.to_pprof_gzip().unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut bytes)
            .unwrap();
        let profile = pprof::Profile::decode(&bytes[..]).unwrap();
        let s = |i: i64| profile.string_table[i as usize].as_str();
        assert_eq!(profile.string_table[0], "");
        assert_eq!(
            profile
                .sample_type
                .iter()
                .map(|t| (s(t.r#type), s(t.unit)))
                .collect::<Vec<_>>(),
            vec![("samples", "count"), ("energy", "microjoules")]
        );
        assert_eq!(s(profile.default_sample_type), "energy");
        assert_eq!(profile.duration_nanos, 20);
        let name_of = |location_id: u64| {
            let location = profile
                .location
                .iter()
                .find(|l| l.id == location_id)
                .unwrap();
            let function = profile
                .function
                .iter()
                .find(|f| f.id == location.line[0].function_id)
                .unwrap();
            s(function.name).to_string()
        };
        let hot = profile
            .sample
            .iter()
            .find(|sample| name_of(sample.location_id[0]) == "hot_path")
            .unwrap();
        let names: Vec<String> = hot.location_id.iter().map(|id| name_of(*id)).collect();
        assert_eq!(names, vec!["hot_path", "score", "main"]);
        assert_eq!(hot.value, vec![40, 2_000_000]);
        let total_uj: i64 = profile.sample.iter().map(|s| s.value[1]).sum();
        assert_eq!(total_uj, 2_500_000);
    }
}
