//! Differential energy flame graph of one service and scenario between two
//! ranges, per transaction: each stack's energy in a range (profile
//! rollups) divided by the scenario's completed transactions in that range,
//! so a busier range does not look worse. The SVG is inferno's differential
//! flame graph (folded `stack baseline candidate`, nano-joules per
//! transaction): frame widths are the candidate's energy per transaction
//! (beside it, the baseline's), each frame coloured by its own change of
//! self samples per transaction ([`super::diff_flame`]). The
//! functions are ranked by the change of their inclusive energy per
//! transaction (itself and its callees), each with its samples in both
//! ranges; a caller whose change one callee carries (>= 80% of it, same
//! sign) names that callee and ranks after the functions that locate the
//! change. Unsymbolised (`[unknown]`) and kernel (`_[k]`) frames never
//! explain a caller's change and rank after every other function. Below the minimum samples (#11) in either range, the graph and
//! the functions are withheld and say why.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::AggregatorError;
use crate::store::{Range, StackSum, Store};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StackChange {
    pub stack: String,
    pub baseline_j_per_transaction: f64,
    pub candidate_j_per_transaction: f64,
    pub baseline_samples: u64,
    pub candidate_samples: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionChange {
    pub function: String,
    /// Inclusive energy per transaction (the function and its callees).
    pub baseline_j_per_transaction: f64,
    pub candidate_j_per_transaction: f64,
    /// candidate - baseline.
    pub change_j_per_transaction: f64,
    /// Samples of stacks holding the function.
    pub baseline_samples: u64,
    pub candidate_samples: u64,
    /// A callee that carries at least 80% of this function's change (the
    /// deepest such): the change is located there, so this one ranks after
    /// the functions that are not so explained.
    pub explained_by_callee: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffProfile {
    pub service: String,
    pub scenario: String,
    pub baseline_transactions: f64,
    pub candidate_transactions: f64,
    pub baseline_samples: u64,
    pub candidate_samples: u64,
    pub baseline_energy_j: f64,
    pub candidate_energy_j: f64,
    pub min_samples: u64,
    /// Why the graph and functions are withheld, when they are.
    pub withheld_reason: Option<String>,
    pub stacks: Vec<StackChange>,
    /// By |change|, largest first.
    pub functions: Vec<FunctionChange>,
}

fn per_transaction(energy_j: f64, transactions: f64) -> f64 {
    if transactions > 0.0 {
        energy_j / transactions
    } else {
        0.0
    }
}

/// Whether a frame can be where a caller's change is located: not an
/// unsymbolised frame (`[unknown]`, any `[...]`) and not kernel code
/// (`_[k]`), which runs on the caller's behalf and moves with it.
pub fn locates_change(frame: &str) -> bool {
    !(frame.starts_with('[') || frame.ends_with("_[k]"))
}

/// Builds the differential profile from both ranges' stacks and transactions.
pub fn diff(
    service: &str,
    scenario: &str,
    baseline: &[StackSum],
    candidate: &[StackSum],
    baseline_transactions: f64,
    candidate_transactions: f64,
    min_samples: u64,
) -> DiffProfile {
    let mut stacks: BTreeMap<&str, StackChange> = BTreeMap::new();
    for (rows, transactions, is_baseline) in [
        (baseline, baseline_transactions, true),
        (candidate, candidate_transactions, false),
    ] {
        for r in rows {
            let e = stacks.entry(&r.stack).or_insert_with(|| StackChange {
                stack: r.stack.clone(),
                baseline_j_per_transaction: 0.0,
                candidate_j_per_transaction: 0.0,
                baseline_samples: 0,
                candidate_samples: 0,
            });
            let j = per_transaction(r.energy_j, transactions);
            if is_baseline {
                e.baseline_j_per_transaction += j;
                e.baseline_samples += r.samples;
            } else {
                e.candidate_j_per_transaction += j;
                e.candidate_samples += r.samples;
            }
        }
    }
    let mut functions: BTreeMap<&str, FunctionChange> = BTreeMap::new();
    for s in stacks.values() {
        let mut seen: Vec<&str> = Vec::new();
        for frame in s.stack.split(';') {
            if seen.contains(&frame) {
                continue;
            }
            seen.push(frame);
            let f = functions.entry(frame).or_insert_with(|| FunctionChange {
                function: frame.to_string(),
                baseline_j_per_transaction: 0.0,
                candidate_j_per_transaction: 0.0,
                change_j_per_transaction: 0.0,
                baseline_samples: 0,
                candidate_samples: 0,
                explained_by_callee: None,
            });
            f.baseline_j_per_transaction += s.baseline_j_per_transaction;
            f.candidate_j_per_transaction += s.candidate_j_per_transaction;
            f.baseline_samples += s.baseline_samples;
            f.candidate_samples += s.candidate_samples;
        }
    }
    let mut functions: Vec<FunctionChange> = functions
        .into_values()
        .map(|mut f| {
            f.change_j_per_transaction =
                f.candidate_j_per_transaction - f.baseline_j_per_transaction;
            f
        })
        .collect();
    // A caller changes by at least its callees' change: rank the functions
    // that locate the change first, their callers after them.
    let change: BTreeMap<String, f64> = functions
        .iter()
        .map(|f| (f.function.clone(), f.change_j_per_transaction))
        .collect();
    let mut explained: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for s in stacks.keys() {
        let frames: Vec<&str> = s.split(';').collect();
        for (i, caller) in frames.iter().enumerate() {
            let c = change.get(*caller).copied().unwrap_or(0.0);
            if c == 0.0 {
                continue;
            }
            for (depth, callee) in frames.iter().enumerate().skip(i + 1) {
                if callee == caller || !locates_change(callee) {
                    continue;
                }
                let g = change.get(*callee).copied().unwrap_or(0.0);
                if g * c > 0.0 && g.abs() >= 0.8 * c.abs() {
                    let e = explained
                        .entry(caller.to_string())
                        .or_insert((0, String::new()));
                    if depth >= e.0 {
                        *e = (depth, callee.to_string());
                    }
                }
            }
        }
    }
    for f in &mut functions {
        f.explained_by_callee = explained.get(&f.function).map(|e| e.1.clone());
    }
    // Unsymbolised and kernel frames say where time went, not what to change:
    // they rank after the functions that locate a change.
    let later =
        |f: &FunctionChange| f.explained_by_callee.is_some() || !locates_change(&f.function);
    functions.sort_by(|a, b| {
        later(a)
            .cmp(&later(b))
            .then(
                b.change_j_per_transaction
                    .abs()
                    .total_cmp(&a.change_j_per_transaction.abs()),
            )
            .then_with(|| a.function.cmp(&b.function))
    });
    let baseline_samples: u64 = baseline.iter().map(|r| r.samples).sum();
    let candidate_samples: u64 = candidate.iter().map(|r| r.samples).sum();
    let mut withheld_reason = None;
    if baseline_samples < min_samples || candidate_samples < min_samples {
        withheld_reason = Some(format!(
            "{service}/{scenario}: differential flame graph and functions withheld: {baseline_samples} baseline and {candidate_samples} candidate samples, the minimum is {min_samples} in each"
        ));
    } else if baseline_transactions <= 0.0 || candidate_transactions <= 0.0 {
        withheld_reason = Some(format!(
            "{service}/{scenario}: no completed transactions in a range: no energy per transaction"
        ));
    }
    if withheld_reason.is_some() {
        functions.clear();
    }
    DiffProfile {
        service: service.to_string(),
        scenario: scenario.to_string(),
        baseline_transactions,
        candidate_transactions,
        baseline_samples,
        candidate_samples,
        baseline_energy_j: baseline.iter().map(|r| r.energy_j).sum(),
        candidate_energy_j: candidate.iter().map(|r| r.energy_j).sum(),
        min_samples,
        withheld_reason,
        stacks: stacks.into_values().collect(),
        functions,
    }
}

/// Reads both ranges' stacks of `service`/`scenario` and the scenario's
/// transactions (scenario rollups) and builds the differential profile.
pub fn diff_ranges(
    store: &dyn Store,
    baseline: &Range,
    candidate: &Range,
    service: &str,
    scenario: &str,
    min_samples: u64,
) -> Result<DiffProfile, AggregatorError> {
    // Stacks cover whole host steps: count the transactions of the same span.
    let layout = store.layout();
    let transactions = |r: &Range| -> Result<f64, AggregatorError> {
        let (from, to) = r.host_range(&layout);
        let whole = Range::new(from, to, to - from, &layout).map_err(AggregatorError::Invalid)?;
        Ok(store
            .scenario_periods(&whole)?
            .iter()
            .filter(|s| s.scenario == scenario)
            .map(|s| s.transactions)
            .sum())
    };
    Ok(diff(
        service,
        scenario,
        &store.stacks(baseline, Some(service), Some(scenario))?,
        &store.stacks(candidate, Some(service), Some(scenario))?,
        transactions(baseline)?,
        transactions(candidate)?,
        min_samples,
    ))
}

impl DiffProfile {
    /// Folded lines `stack baseline candidate` in nano-joules per transaction.
    pub fn folded_lines(&self) -> Vec<String> {
        let nj = |j: f64| (j * 1e9).round().max(0.0) as u64;
        self.stacks
            .iter()
            .filter(|s| {
                nj(s.baseline_j_per_transaction) > 0 || nj(s.candidate_j_per_transaction) > 0
            })
            .map(|s| {
                format!(
                    "{} {} {}",
                    s.stack,
                    nj(s.baseline_j_per_transaction),
                    nj(s.candidate_j_per_transaction)
                )
            })
            .collect()
    }

    /// The differential flame graph (SVG) at the candidate's widths; a
    /// one-frame graph saying why when withheld.
    pub fn flamegraph_svg(&self) -> Result<String, crate::profiles::ProfileExportError> {
        self.svg(false)
    }

    /// The same graph at the baseline's widths: code the candidate no longer
    /// runs is visible here (it has no width in the candidate's graph).
    /// Colours keep their meaning (blue: lower in the candidate).
    pub fn baseline_flamegraph_svg(&self) -> Result<String, crate::profiles::ProfileExportError> {
        self.svg(true)
    }

    fn svg(&self, baseline_widths: bool) -> Result<String, crate::profiles::ProfileExportError> {
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "Energy per transaction, {} widths: {}/{}",
            if baseline_widths {
                "baseline"
            } else {
                "candidate"
            },
            self.service,
            self.scenario
        );
        options.subtitle = Some(
            "colour: own samples per transaction, red more, blue fewer in the candidate".into(),
        );
        options.count_name = "nJ/transaction".to_string();
        options.deterministic = true;
        let nj = |j: f64| (j * 1e9).round().max(0.0) as u64;
        let per_txn = |samples: u64, transactions: f64| {
            if transactions > 0.0 {
                samples as f64 / transactions
            } else {
                0.0
            }
        };
        let mut stacks: Vec<super::diff_flame::FlameStack> = if self.withheld_reason.is_some() {
            Vec::new()
        } else {
            self.stacks
                .iter()
                .map(|s| super::diff_flame::FlameStack {
                    stack: s.stack.clone(),
                    width: nj(if baseline_widths {
                        s.baseline_j_per_transaction
                    } else {
                        s.candidate_j_per_transaction
                    }),
                    baseline_self_per_transaction: per_txn(
                        s.baseline_samples,
                        self.baseline_transactions,
                    ),
                    candidate_self_per_transaction: per_txn(
                        s.candidate_samples,
                        self.candidate_transactions,
                    ),
                })
                .collect()
        };
        if stacks.iter().all(|s| s.width == 0) {
            stacks.clear();
            let reason = self
                .withheld_reason
                .clone()
                .unwrap_or_else(|| "no energy measured".into())
                .replace([';', ' '], "_");
            stacks.push(super::diff_flame::FlameStack {
                stack: format!("[{reason}]"),
                width: 1,
                baseline_self_per_transaction: 0.0,
                candidate_self_per_transaction: 0.0,
            });
        }
        super::diff_flame::svg(
            options,
            &stacks,
            &format!("{}/{}", self.service, self.scenario),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(stack: &str, samples: u64, energy_j: f64) -> StackSum {
        StackSum {
            service: "svc".into(),
            scenario: "credit".into(),
            stack: stack.into(),
            samples,
            energy_j,
        }
    }

    /// Several changed functions: `encode` rises by 0.5 J/txn, `score` falls
    /// by 0.3, `price` by 0.1; ranked by the size of the change, whatever
    /// its sign (a ranking by signed change would put `score` first).
    #[test]
    fn functions_rank_by_the_size_of_their_change_whatever_its_sign() {
        let base = [
            row("main;score", 100, 60.0),
            row("main;price", 100, 40.0),
            row("main;encode", 100, 10.0),
            row("main;log", 100, 20.0),
        ];
        let cand = [
            row("main;score", 100, 30.0),
            row("main;price", 100, 30.0),
            row("main;encode", 100, 60.0),
            row("main;log", 100, 20.0),
        ];
        let d = diff("svc", "credit", &base, &cand, 100.0, 100.0, 50);
        let ranked: Vec<(&str, f64)> = d
            .functions
            .iter()
            .filter(|f| f.explained_by_callee.is_none())
            .map(|f| (f.function.as_str(), f.change_j_per_transaction))
            .collect();
        let names: Vec<&str> = ranked.iter().map(|r| r.0).collect();
        assert_eq!(names, ["encode", "score", "price", "log"], "{ranked:?}");
        assert!((ranked[0].1 - 0.5).abs() < 1e-12);
        assert!((ranked[1].1 + 0.3).abs() < 1e-12);
        assert!((ranked[2].1 + 0.1).abs() < 1e-12);
        // main's change (+0.1) is not carried by one callee (>= 80%): not explained.
        let main = d.functions.iter().find(|f| f.function == "main").unwrap();
        assert!((main.change_j_per_transaction - 0.1).abs() < 1e-12);
    }

    /// Code the candidate no longer runs has width only in the baseline-width graph.
    #[test]
    fn removed_code_shows_in_the_baseline_width_graph() {
        let base = [row("main;plan", 100, 50.0), row("main;exec", 100, 50.0)];
        let cand = [row("main;exec", 100, 50.0)];
        let d = diff("svc", "credit", &base, &cand, 100.0, 100.0, 1);
        let title = |svg: &str, f: &str| svg.contains(&format!("<title>{f} ("));
        let candidate = d.flamegraph_svg().unwrap();
        let baseline = d.baseline_flamegraph_svg().unwrap();
        assert!(
            !title(&candidate, "plan"),
            "no width in the candidate's graph"
        );
        assert!(title(&baseline, "plan"), "visible at the baseline's widths");
        assert!(title(&baseline, "exec") && title(&candidate, "exec"));
        assert!(baseline.contains("baseline widths"));
    }

    /// The fill of the frame named `function` in `svg` and its title.
    fn frame_fill(svg: &str, function: &str) -> (String, String) {
        let at = svg
            .find(&format!("<title>{function} ("))
            .unwrap_or_else(|| panic!("no frame {function}"));
        let g = &svg[at..];
        let title = &g[7..g.find("</title>").unwrap()];
        let fill = g.split("fill=\"").nth(1).unwrap();
        (
            fill[..fill.find('"').unwrap()].to_string(),
            title.to_string(),
        )
    }

    /// Each frame is coloured by its own change of self samples per
    /// transaction, whatever its energy did. 100 transactions in each range;
    /// self samples per transaction, baseline -> candidate: parse 2.0 -> 1.8
    /// (-0.2), plan 1.0 -> 0.61 (-39%, -0.39; its energy ROSE, 10 -> 15 J,
    /// as when the host's energy per sample rises), opt 0.5 -> 1.0 (+0.5,
    /// the largest), exec 1.0 -> 1.0, main none. By hand, with
    /// c = 100 + 150 x (1 - |change| / 0.5): opt rgb(255,100,100), plan
    /// c = 133 blue, parse c = 190 blue, exec and main white rgb(250,250,250).
    #[test]
    fn frames_are_coloured_by_their_own_change_of_samples_per_transaction() {
        let base = [
            row("main;parse", 200, 20.0),
            row("main;plan", 100, 10.0),
            row("main;plan;opt", 50, 5.0),
            row("main;exec", 100, 10.0),
        ];
        let cand = [
            row("main;parse", 180, 18.0),
            row("main;plan", 61, 15.0),
            row("main;plan;opt", 100, 10.0),
            row("main;exec", 100, 10.0),
        ];
        let d = diff("svc", "credit", &base, &cand, 100.0, 100.0, 1);
        for svg in [
            d.flamegraph_svg().unwrap(),
            d.baseline_flamegraph_svg().unwrap(),
        ] {
            let fill = |f: &str| frame_fill(&svg, f).0;
            assert_eq!(fill("opt"), "rgb(255,100,100)");
            assert_eq!(fill("plan"), "rgb(133,133,255)", "fell 39%: blue");
            assert_eq!(fill("parse"), "rgb(190,190,255)");
            assert_eq!(fill("exec"), "rgb(250,250,250)");
            assert_eq!(fill("main"), "rgb(250,250,250)");
            let (_, title) = frame_fill(&svg, "plan");
            assert!(
                title.ends_with("own samples per transaction 1.000 → 0.6100, -39.00%)"),
                "{title}"
            );
        }
        // The candidate's widths: plan and opt, (15 + 10) J / 100 = 250,000,000 nJ.
        let (_, title) = frame_fill(&d.flamegraph_svg().unwrap(), "plan");
        assert!(
            title.starts_with("plan (250,000,000 nJ/transaction"),
            "{title}"
        );
    }

    /// `[unknown]` and kernel frames never explain a caller's change.
    #[test]
    fn unknown_and_kernel_frames_do_not_explain_a_change() {
        let base = [
            row("main;plan;[unknown]", 100, 50.0),
            row("main;read;do_syscall_64_[k]", 100, 20.0),
        ];
        let cand = [
            row("main;plan;[unknown]", 1, 0.1),
            row("main;read;do_syscall_64_[k]", 100, 10.0),
        ];
        let d = diff("svc", "credit", &base, &cand, 100.0, 100.0, 1);
        let by = |name: &str| {
            d.functions
                .iter()
                .find(|f| f.function == name)
                .unwrap()
                .explained_by_callee
                .clone()
        };
        assert_eq!(by("plan"), None, "plan locates its own change");
        assert_eq!(by("read"), None);
        // plan (the real change) ranks first; main is explained by it; the
        // unsymbolised and kernel frames come after every function.
        assert_eq!(d.functions[0].function, "plan");
        assert_eq!(by("main").as_deref(), Some("plan"));
        let pos = |name: &str| d.functions.iter().position(|f| f.function == name).unwrap();
        assert!(pos("read") < pos("[unknown]") && pos("read") < pos("do_syscall_64_[k]"));
    }

    #[test]
    fn the_function_made_cheaper_ranks_first_per_transaction() {
        // Baseline: 100 transactions; main;score 60 J, main;price 40 J.
        // Candidate: 200 transactions (busier); main;score 60 J (0.3 J/txn,
        // was 0.6), main;price 80 J (0.4 J/txn, unchanged).
        let base = [row("main;score", 600, 60.0), row("main;price", 400, 40.0)];
        let cand = [row("main;score", 600, 60.0), row("main;price", 800, 80.0)];
        let d = diff("svc", "credit", &base, &cand, 100.0, 200.0, 50);
        assert!(d.withheld_reason.is_none());
        let top = &d.functions[0];
        assert_eq!(top.function, "score");
        assert!((top.baseline_j_per_transaction - 0.6).abs() < 1e-12);
        assert!((top.candidate_j_per_transaction - 0.3).abs() < 1e-12);
        assert!((top.change_j_per_transaction + 0.3).abs() < 1e-12);
        assert_eq!((top.baseline_samples, top.candidate_samples), (600, 600));
        assert_eq!(top.explained_by_callee, None);
        // main changes by exactly score's change: explained by it, ranked after.
        let main = d.functions.iter().find(|f| f.function == "main").unwrap();
        assert_eq!(main.explained_by_callee.as_deref(), Some("score"));
        let price = d.functions.iter().find(|f| f.function == "price").unwrap();
        assert!(price.change_j_per_transaction.abs() < 1e-12);
        let svg = d.flamegraph_svg().unwrap();
        assert!(svg.contains("score") && svg.contains("<svg"));
        assert!(d
            .folded_lines()
            .contains(&"main;score 600000000 300000000".to_string()));
        // Too few samples: withheld, with the reason.
        let few = diff("svc", "credit", &base[..1], &cand, 100.0, 200.0, 1000);
        assert!(few.functions.is_empty());
        assert!(few.withheld_reason.unwrap().contains("600 baseline"));
    }
}
