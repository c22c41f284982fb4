//! The reference in `docs/reference/` against the code: every configuration
//! key that agent.toml and aggregator.toml accept and every metric either
//! `/metrics` can show must have its line there, and every line there must
//! name something the code still has. Needs no root.
//!
//! Keys come from the real parsers: each section is a serde struct with
//! `deny_unknown_fields`, so a probe key in it is refused with the list of
//! the keys it accepts ("unknown field `x`, expected one of ..."). The walk
//! asks each key whether it is a table (or an array of tables) the same way,
//! so nested sections are found without a list kept by hand. Metric names
//! come from the `# TYPE` lines of the real renderers with every family
//! present. The reference lists them in Markdown tables whose first column
//! is headed `key` (config), `agent metric` or `aggregator metric`, one
//! backticked name per row.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const PROBE: &str = "sci_reference_probe";

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference")
}

/// One step of a key path: a table, or an array of tables (`name[]`).
#[derive(Clone)]
struct Step {
    name: String,
    array: bool,
}

/// A TOML document that puts the probe key inside the table at `path`.
fn probe_document(path: &[Step]) -> String {
    let mut text = String::new();
    for (i, step) in path.iter().enumerate() {
        let dotted: Vec<&str> = path[..=i].iter().map(|s| s.name.as_str()).collect();
        if step.array {
            text.push_str(&format!("[[{}]]\n", dotted.join(".")));
        } else if i + 1 == path.len() {
            text.push_str(&format!("[{}]\n", dotted.join(".")));
        }
    }
    // An inline table as the value: no scalar or map of scalars takes it,
    // so only a struct's unknown-field check can answer first.
    text.push_str(&format!("{PROBE} = {{}}\n"));
    text
}

/// What a parser said about the probe: the keys the table accepts, or that it
/// is not a table of that shape.
enum Probe {
    Keys(Vec<String>),
    NotATable,
    Accepted,
}

fn probe(parse: &dyn Fn(&str) -> Result<(), String>, path: &[Step]) -> Probe {
    let message = match parse(&probe_document(path)) {
        Ok(()) => return Probe::Accepted,
        Err(message) => message,
    };
    let Some(at) = message.find(&format!("unknown field `{PROBE}`")) else {
        return Probe::NotATable;
    };
    let rest = message[at..].lines().next().unwrap_or("");
    let expected = rest.split_once(", expected").map_or("", |(_, e)| e);
    // Backticked names: every second piece between backticks.
    let keys = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Probe::Keys(keys)
}

/// Every leaf key reachable from the table at `path`, dotted (`a.b[].c`).
fn walk(parse: &dyn Fn(&str) -> Result<(), String>, path: &[Step], out: &mut BTreeSet<String>) {
    let here = match probe(parse, path) {
        Probe::Keys(keys) => keys,
        Probe::NotATable => panic!("{}: not a table", dotted(path)),
        Probe::Accepted => panic!(
            "{}: an unknown key was accepted; a section without deny_unknown_fields hides its keys",
            dotted(path)
        ),
    };
    for key in here {
        let mut table = path.to_vec();
        table.push(Step {
            name: key.clone(),
            array: false,
        });
        let mut array = path.to_vec();
        array.push(Step {
            name: key,
            array: true,
        });
        if let Probe::Keys(_) = probe(parse, &table) {
            walk(parse, &table, out);
        } else if let Probe::Keys(_) = probe(parse, &array) {
            walk(parse, &array, out);
        } else {
            out.insert(dotted(&table));
        }
    }
}

fn dotted(path: &[Step]) -> String {
    path.iter()
        .map(|s| format!("{}{}", s.name, if s.array { "[]" } else { "" }))
        .collect::<Vec<_>>()
        .join(".")
}

/// The backticked names in the first column of every table whose first
/// header cell is `column`.
fn reference_names(file: &str, column: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(docs().join(file)).unwrap();
    let mut names = BTreeSet::new();
    let mut in_table = false;
    let mut header = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            header = false;
            continue;
        }
        let first = line
            .trim_matches('|')
            .split('|')
            .next()
            .unwrap_or("")
            .trim();
        if !in_table && !header {
            header = true;
            in_table = first == column;
            continue;
        }
        if !in_table || first.starts_with("---") {
            continue;
        }
        let name = first
            .strip_prefix('`')
            .and_then(|f| f.strip_suffix('`'))
            .unwrap_or_else(|| panic!("{file}: row {line:?} does not start with a `name`"));
        names.insert(name.to_string());
    }
    assert!(!names.is_empty(), "{file}: no table headed `{column}`");
    names
}

fn compare(what: &str, file: &str, code: &BTreeSet<String>, reference: &BTreeSet<String>) {
    let missing: Vec<_> = code.difference(reference).collect();
    let stale: Vec<_> = reference.difference(code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/reference/{file} and the code disagree on {what}:\n  \
         in the code, missing from the reference: {missing:?}\n  \
         in the reference, unknown to the code: {stale:?}"
    );
}

#[test]
fn agent_config_keys_are_the_reference_keys() {
    let parse = |text: &str| {
        sci_agent::config::AgentConfig::from_toml_str(text, Path::new("probe.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut code = BTreeSet::new();
    walk(&parse, &[], &mut code);
    assert!(
        code.contains("energy.source") && code.contains("scenarios.rules[].cmdline"),
        "the walk missed known keys: {code:?}"
    );
    let reference = reference_names("agent-config.md", "key");
    compare("agent.toml keys", "agent-config.md", &code, &reference);
}

#[test]
fn aggregator_config_keys_are_the_reference_keys() {
    let parse = |text: &str| {
        sci_aggregator::config::AggregatorConfig::from_toml_str(text, Path::new("probe.toml"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut code = BTreeSet::new();
    walk(&parse, &[], &mut code);
    assert!(
        code.contains("limits.max_connections") && code.contains("agents[].token"),
        "the walk missed known keys: {code:?}"
    );
    let reference = reference_names("aggregator-config.md", "key");
    compare(
        "aggregator.toml keys",
        "aggregator-config.md",
        &code,
        &reference,
    );
}

/// Metric names of a Prometheus text exposition, as a scrape sees them (a
/// counter's with `_total`).
fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| match l.split_once(' ') {
            Some((name, "counter")) if !name.ends_with("_total") => format!("{name}_total"),
            Some((name, _)) => name.to_string(),
            None => l.to_string(),
        })
        .collect()
}

#[test]
fn metrics_are_the_reference_metrics() {
    // The agent's endpoint, with the spool's delivery families shown (they
    // are there whenever an aggregator is configured).
    let agent = sci_agent::sinks::metrics::MetricsRegistry::new();
    agent.set_delivery(
        Arc::new(sci_agent::sinks::spool::DeliveryStats::default()),
        std::time::Duration::from_secs(300),
    );
    // The node labels families are there when `[host.kubernetes]` is on.
    agent.observe_node_labels(Default::default());
    agent.set_otlp(Arc::default());
    let agent = exposition_names(&agent.render());
    assert!(agent.contains("sci_host_energy_joules_total"), "{agent:?}");
    let reference = reference_names("metrics.md", "agent metric");
    compare("the agent's metrics", "metrics.md", &agent, &reference);

    // The aggregator's, with the 24 h evaluation present (its families are
    // shown once the first refresh has run).
    let dir = tempfile::tempdir().unwrap();
    let config = sci_aggregator::config::AggregatorConfig {
        database: dir.path().join("sci.db"),
        ..Default::default()
    };
    let store: Arc<dyn sci_aggregator::store::Store> = Arc::from(config.open_store().unwrap());
    let state = sci_aggregator::http::HttpState::new(store, Arc::new(config), Default::default());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let query = sci_aggregator::http::RangeQuery {
        from: Some(now - 86_400),
        to: Some(now),
        ..Default::default()
    };
    let evaluation = sci_aggregator::http::evaluate_range(&state, &query).unwrap();
    state
        .recent_by_datacenter
        .lock()
        .unwrap()
        .insert("dc-1".into(), evaluation.clone());
    *state.recent.lock().unwrap() = Some(evaluation);
    let aggregator = exposition_names(&sci_aggregator::http::render_metrics(&state));
    assert!(
        aggregator.contains("sci_fleet_sci_g_per_unit"),
        "{aggregator:?}"
    );
    let reference = reference_names("metrics.md", "aggregator metric");
    compare(
        "the aggregator's metrics",
        "metrics.md",
        &aggregator,
        &reference,
    );
}

#[test]
fn exported_series_are_the_reference_series() {
    let code: BTreeSet<String> = sci_aggregator::export::series::names::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let reference = reference_names("metrics.md", "exported series");
    compare("the exported series", "metrics.md", &code, &reference);
}

#[test]
fn otlp_metrics_are_the_reference_otlp_metrics() {
    let mut code: BTreeSet<String> = sci_aggregator::export::series::names::ALL
        .iter()
        .map(|s| {
            sci_aggregator::export::otlp::otel_metric(s)
                .unwrap()
                .0
                .to_string()
        })
        .collect();
    code.extend(
        sci_agent::sinks::otlp::METRICS
            .iter()
            .map(|(name, _, _)| name.to_string()),
    );
    let reference = reference_names("metrics.md", "OTLP metric");
    compare("the OTLP metrics", "metrics.md", &code, &reference);
}
