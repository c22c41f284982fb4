//! `[[scenarios.rules]]`: compiled while agent.toml is read, so a bad rule is
//! reported by toml with its line and the rule's index.
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use globset::{Glob, GlobBuilder, GlobMatcher};
use regex::Regex;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{Assignment, Scenario};
use crate::sources::sched::ProcessCpu;
use crate::window::Text;

/// Environment variable a `scenario = "from_env"` rule reads.
pub const SCENARIO_ENV: &str = "SCI_SCENARIO";

/// A rule as written in agent.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleText {
    service: Option<String>,
    scenario: Option<String>,
    cgroup: Option<String>,
    systemd_unit: Option<String>,
    container: Option<String>,
    comm: Option<String>,
    exe: Option<String>,
    cmdline: Option<String>,
    env: Option<String>,
    pod_label: Option<String>,
}

/// Scenario a rule gives.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleScenario {
    /// The rule names a service only.
    None,
    Fixed(Scenario),
    /// The process's `SCI_SCENARIO` variable; the rule does not match without a valid one.
    FromEnv,
}

#[derive(Debug, Clone)]
enum Matcher {
    Cgroup(GlobMatcher),
    SystemdUnit(GlobMatcher),
    Container(String),
    Comm(GlobMatcher),
    Exe(GlobMatcher),
    Cmdline(Regex),
    Env { key: String, value: GlobMatcher },
    PodLabel { key: String, value: GlobMatcher },
}

/// One compiled rule; all its matchers must match.
#[derive(Debug, Clone)]
pub struct ScenarioRule {
    pub index: usize,
    pub service: Option<Text>,
    pub scenario: RuleScenario,
    matchers: Vec<Matcher>,
}

impl ScenarioRule {
    /// Whether the rule looks at a process's command line (then forked
    /// processes' own titles are read).
    pub fn reads_cmdline(&self) -> bool {
        self.matchers
            .iter()
            .any(|m| matches!(m, Matcher::Cmdline(_)))
    }

    /// Whether the rule looks at a process's `SCI_*` environment.
    pub fn reads_environment(&self) -> bool {
        matches!(self.scenario, RuleScenario::FromEnv)
            || self
                .matchers
                .iter()
                .any(|m| matches!(m, Matcher::Env { .. }))
    }
}

fn path_glob(field: &str, pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{field} = {pattern:?} is not a valid glob: {e}"))
}

fn plain_glob(field: &str, pattern: &str) -> Result<GlobMatcher, String> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{field} = {pattern:?} is not a valid glob: {e}"))
}

fn key_value(field: &str, text: &str) -> Result<(String, GlobMatcher), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{field} = {text:?} must be KEY=VALUE (VALUE may be a glob)"))?;
    if key.is_empty() {
        return Err(format!("{field} = {text:?} has an empty key"));
    }
    Ok((key.to_string(), plain_glob(field, value)?))
}

impl ScenarioRule {
    fn compile(index: usize, text: RuleText) -> Result<Self, String> {
        let scenario = match text.scenario.as_deref() {
            None => RuleScenario::None,
            Some("from_env") => RuleScenario::FromEnv,
            Some(name) => RuleScenario::Fixed(Scenario::from_name(name).ok_or_else(|| {
                super::ScenarioError::UnknownScenario { name: name.into() }.to_string()
            })?),
        };
        if text.service.as_deref() == Some("") {
            return Err("service must not be empty".into());
        }
        if text.service.is_none() && scenario == RuleScenario::None {
            return Err("a rule must give a service, a scenario or both".into());
        }
        let mut matchers = Vec::new();
        if let Some(p) = &text.cgroup {
            matchers.push(Matcher::Cgroup(path_glob("cgroup", p)?));
        }
        if let Some(p) = &text.systemd_unit {
            let pattern = if p.contains('.') {
                p.clone()
            } else {
                format!("{p}.service")
            };
            matchers.push(Matcher::SystemdUnit(plain_glob("systemd_unit", &pattern)?));
        }
        if let Some(c) = &text.container {
            if c.is_empty() {
                return Err("container must not be empty".into());
            }
            matchers.push(Matcher::Container(c.clone()));
        }
        if let Some(p) = &text.comm {
            matchers.push(Matcher::Comm(plain_glob("comm", p)?));
        }
        if let Some(p) = &text.exe {
            matchers.push(Matcher::Exe(path_glob("exe", p)?));
        }
        if let Some(r) = &text.cmdline {
            let re =
                Regex::new(r).map_err(|e| format!("cmdline = {r:?} is not a valid regex: {e}"))?;
            matchers.push(Matcher::Cmdline(re));
        }
        if let Some(kv) = &text.env {
            let (key, value) = key_value("env", kv)?;
            matchers.push(Matcher::Env { key, value });
        }
        if let Some(kv) = &text.pod_label {
            let (key, value) = key_value("pod_label", kv)?;
            matchers.push(Matcher::PodLabel { key, value });
        }
        if matchers.is_empty() {
            return Err("a rule needs at least one matcher (cgroup, systemd_unit, container, comm, exe, cmdline, env, pod_label)".into());
        }
        Ok(ScenarioRule {
            index,
            service: text.service.map(Text::from),
            scenario,
            matchers,
        })
    }

    fn matches(&self, process: &ProcessCpu, pod_labels_dir: Option<&Path>) -> bool {
        let process = &*process.info;
        self.matchers.iter().all(|m| match m {
            Matcher::Cgroup(g) => process.cgroup.as_deref().is_some_and(|c| g.is_match(c)),
            Matcher::SystemdUnit(g) => process
                .cgroup
                .as_deref()
                .and_then(systemd_unit_from_cgroup)
                .is_some_and(|u| g.is_match(u)),
            Matcher::Container(c) => process
                .container_id
                .as_deref()
                .is_some_and(|id| id.starts_with(c.as_str())),
            Matcher::Comm(g) => g.is_match(&*process.comm),
            Matcher::Exe(g) => process.exe.as_deref().is_some_and(|e| g.is_match(e)),
            Matcher::Cmdline(re) => process.cmdline.as_deref().is_some_and(|c| re.is_match(c)),
            Matcher::Env { key, value } => process
                .env
                .iter()
                .any(|(k, v)| k == key && value.is_match(v)),
            Matcher::PodLabel { key, value } => {
                let labels =
                    pod_labels_dir
                        .zip(process.cgroup.as_deref())
                        .and_then(|(dir, cgroup)| {
                            pod_uid_from_cgroup(cgroup).and_then(|uid| read_pod_labels(dir, &uid))
                        });
                labels
                    .and_then(|l| l.get(key).map(|v| value.is_match(v)))
                    .unwrap_or(false)
            }
        })
    }
}

/// First matching rule wins.
pub(super) fn evaluate(
    rules: &[ScenarioRule],
    process: &ProcessCpu,
    pod_labels_dir: Option<&Path>,
) -> Assignment {
    for rule in rules {
        if !rule.matches(process, pod_labels_dir) {
            continue;
        }
        let scenario = match &rule.scenario {
            RuleScenario::None => None,
            RuleScenario::Fixed(s) => Some(*s),
            RuleScenario::FromEnv => {
                let from_env = process
                    .info
                    .env
                    .iter()
                    .find(|(k, _)| k == SCENARIO_ENV)
                    .and_then(|(_, v)| v.parse::<Scenario>().ok());
                match from_env {
                    Some(s) => Some(s),
                    None => continue,
                }
            }
        };
        return Assignment {
            scenario,
            service: rule.service.clone(),
            rule_index: Some(rule.index),
        };
    }
    Assignment::default()
}

/// The innermost `*.service` component of a cgroup path.
pub fn systemd_unit_from_cgroup(cgroup: &str) -> Option<&str> {
    cgroup.rsplit('/').find(|c| c.ends_with(".service"))
}

/// UID of the pod a cgroup path belongs to (systemd driver:
/// `kubepods-burstable-pod<uid_with_underscores>.slice`; cgroupfs driver:
/// `/kubepods/burstable/pod<uid>/`), lower case with dashes.
pub fn pod_uid_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup.split('/').find_map(|component| {
        let component = component.strip_suffix(".slice").unwrap_or(component);
        let at = component.rfind("pod")?;
        let uid = component[at + 3..].replace('_', "-").to_ascii_lowercase();
        let groups: Vec<&str> = uid.split('-').collect();
        let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        shape_ok.then_some(uid)
    })
}

/// Labels of a pod from `<dir>/<uid>` or `<dir>/<uid>/labels`, in the
/// downward-API format (`key="value"` per line; unquoted values accepted).
pub fn read_pod_labels(dir: &Path, uid: &str) -> Option<BTreeMap<String, String>> {
    let direct = dir.join(uid);
    let path = if direct.is_dir() {
        direct.join("labels")
    } else {
        direct
    };
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (k.trim().to_string(), v.to_string())
            })
            .collect(),
    )
}

/// Compiles each rule inside the deserializer's call for its table, so toml
/// puts the table's line on the error.
struct RuleSeed(usize);

impl<'de> DeserializeSeed<'de> for RuleSeed {
    type Value = ScenarioRule;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ScenarioRule, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RuleSeed {
    type Value = ScenarioRule;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "scenarios.rules[{}] as a table", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ScenarioRule, A::Error> {
        let text = RuleText::deserialize(MapAccessDeserializer::new(map))
            .map_err(|e| serde::de::Error::custom(format!("scenarios.rules[{}]: {e}", self.0)))?;
        ScenarioRule::compile(self.0, text)
            .map_err(|m| serde::de::Error::custom(format!("scenarios.rules[{}]: {m}", self.0)))
    }
}

struct RulesVisitor;

impl<'de> Visitor<'de> for RulesVisitor {
    type Value = Vec<ScenarioRule>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of [[scenarios.rules]] tables")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rules = Vec::new();
        while let Some(rule) = seq.next_element_seed(RuleSeed(rules.len()))? {
            rules.push(rule);
        }
        Ok(rules)
    }
}

pub(super) fn deserialize_rules<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<ScenarioRule>, D::Error> {
    d.deserialize_seq(RulesVisitor)
}
