//! The review report: Markdown and printable HTML of a [`Review`] (its JSON
//! is the review itself), with the disclosed factors of both ranges.
use std::fmt::Write as _;

use maud::html;

use super::stats::Difference;
use super::Review;
use crate::dashboard::{disclosure_table, page};
use crate::figures::{count, energy_j, mass_g, opt_of_kind, percent, sig4, signed_percent, Kind};
use crate::report::{disclosure_cells, unix_to_text, DISCLOSURE_COLUMNS};

fn opt(v: Option<f64>) -> String {
    v.map(sig4).unwrap_or_else(|| "–".into())
}

fn relative(v: Option<f64>) -> String {
    v.map(signed_percent).unwrap_or_else(|| "–".into())
}

fn interval(d: &Difference, kind: Kind) -> String {
    match (d.ci_low, d.ci_high) {
        (Some(lo), Some(hi)) => format!(
            "[{}, {}]",
            opt_of_kind(Some(lo), kind),
            opt_of_kind(Some(hi), kind)
        ),
        _ => "–".into(),
    }
}

/// Rows of (label, what the figure is, how it prints, difference) of the
/// whole comparison.
fn difference_rows(r: &Review) -> Vec<(String, &'static str, Kind, &Difference)> {
    let c = &r.comparison;
    let mut rows = vec![
        (
            "SCI_CF (mean of periods)".to_string(),
            "CO2e per unit",
            Kind::MassG,
            &c.sci_cf_mean,
        ),
        (
            "SCI_CF (pooled)".to_string(),
            "CO2e per unit",
            Kind::MassG,
            &c.sci_cf_pooled,
        ),
    ];
    for s in &c.scenarios {
        rows.push((
            format!("{} carbon / transaction", s.scenario),
            "CO2e",
            Kind::MassG,
            &s.g_per_transaction,
        ));
        rows.push((
            format!("{} energy / transaction (dynamic + idle share)", s.scenario),
            "energy",
            Kind::EnergyJ,
            &s.energy_j_per_transaction,
        ));
        rows.push((
            format!("{} dynamic energy / transaction", s.scenario),
            "energy",
            Kind::EnergyJ,
            &s.dynamic_energy_j_per_transaction,
        ));
        rows.push((
            format!("{} CPU / transaction", s.scenario),
            "CPU time",
            Kind::DurationNs,
            &s.cpu_ns_per_transaction,
        ));
    }
    rows
}

fn difference_cells(label: &str, unit: &str, kind: Kind, d: &Difference) -> Vec<String> {
    vec![
        label.to_string(),
        unit.to_string(),
        opt_of_kind(d.baseline, kind),
        opt_of_kind(d.candidate, kind),
        opt_of_kind(d.difference, kind),
        relative(d.relative_difference),
        interval(d, kind),
        match &d.reason {
            Some(reason) => format!("{}: {reason}", d.verdict.as_str()),
            None => d.verdict.as_str().to_string(),
        },
        format!("{} / {}", d.baseline_periods, d.candidate_periods),
    ]
}

const DIFFERENCE_COLUMNS: [&str; 9] = [
    "figure",
    "unit",
    "baseline",
    "candidate",
    "difference",
    "relative",
    "95% interval",
    "verdict",
    "periods",
];

const DISTRIBUTION_COLUMNS: [&str; 10] = [
    "service",
    "scenario",
    "requests (base / cand)",
    "p50 CPU",
    "p90 CPU",
    "p99 CPU",
    "p50 energy",
    "p90 energy",
    "p99 energy",
    "mean energy",
];

fn pair(a: Option<f64>, b: Option<f64>, kind: Kind) -> String {
    format!("{} → {}", opt_of_kind(a, kind), opt_of_kind(b, kind))
}

fn tables(r: &Review) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
    let mut out = Vec::new();
    let diffs = difference_rows(r)
        .into_iter()
        .map(|(l, u, k, d)| difference_cells(&l, u, k, d))
        .collect();
    out.push((
        "Comparison per transaction".to_string(),
        DIFFERENCE_COLUMNS.iter().map(|s| s.to_string()).collect(),
        diffs,
    ));
    let dist = r
        .distributions
        .iter()
        .map(|d| {
            let (a, b) = (&d.baseline, &d.candidate);
            vec![
                d.service.clone(),
                d.scenario.clone(),
                format!("{} / {}", count(a.requests), count(b.requests)),
                pair(a.p50_cpu_ns, b.p50_cpu_ns, Kind::DurationNs),
                pair(a.p90_cpu_ns, b.p90_cpu_ns, Kind::DurationNs),
                pair(a.p99_cpu_ns, b.p99_cpu_ns, Kind::DurationNs),
                pair(a.p50_energy_j, b.p50_energy_j, Kind::EnergyJ),
                pair(a.p90_energy_j, b.p90_energy_j, Kind::EnergyJ),
                pair(a.p99_energy_j, b.p99_energy_j, Kind::EnergyJ),
                pair(a.mean_energy_j, b.mean_energy_j, Kind::EnergyJ),
            ]
        })
        .collect();
    out.push((
        "Per-request CPU and energy distributions (baseline → candidate)".to_string(),
        DISTRIBUTION_COLUMNS.iter().map(|s| s.to_string()).collect(),
        dist,
    ));
    if let Some(p) = &r.diff_profile {
        let rows = p
            .functions
            .iter()
            .take(15)
            .map(|f| {
                vec![
                    f.function.clone(),
                    energy_j(f.baseline_j_per_transaction),
                    energy_j(f.candidate_j_per_transaction),
                    energy_j(f.change_j_per_transaction),
                    format!("{} / {}", f.baseline_samples, f.candidate_samples),
                ]
            })
            .collect();
        out.push((
            format!(
                "Functions whose energy per transaction changed most: {}/{}",
                p.service, p.scenario
            ),
            [
                "function",
                "baseline energy/txn",
                "candidate energy/txn",
                "change energy/txn",
                "samples (base / cand)",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            rows,
        ));
    }
    let mut zombies = Vec::new();
    let mut pools = Vec::new();
    for dc in &r.consolidation.datacenters {
        for z in &dc.zombies {
            zombies.push(vec![
                z.datacenter.clone(),
                z.host.clone(),
                z.service.clone(),
                percent(z.utilisation),
                sig4(z.idle_power_w),
                energy_j(z.energy_saved_j_per_day),
                mass_g(z.operational_saved_g_per_day),
                mass_g(z.embodied_saved_g_per_day),
            ]);
        }
        for p in &dc.pools {
            pools.push(vec![
                p.datacenter.clone(),
                p.service.clone(),
                p.hosts.len().to_string(),
                sig4(p.peak_busy_cores),
                sig4(p.valley_busy_cores),
                opt(p.peak_to_valley),
                p.valley_hours.len().to_string(),
                sig4(p.freed_host_hours_per_day),
                sig4(p.idle_power_w),
                energy_j(p.energy_saved_j_per_day),
                mass_g(p.operational_saved_g_per_day),
                mass_g(p.embodied_saved_g_per_day),
            ]);
        }
    }
    out.push((
        "Zombie hosts (first: all their time is saved)".to_string(),
        [
            "data centre",
            "host",
            "service",
            "utilisation",
            "idle W",
            "energy saved/day",
            "O saved/day",
            "M saved/day",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        zombies,
    ));
    out.push((
        format!(
            "Consolidation at {} target utilisation (candidate range)",
            percent(r.consolidation.options.target_utilisation)
        ),
        [
            "data centre",
            "pool (service)",
            "hosts",
            "peak busy cores",
            "valley busy cores",
            "peak/valley",
            "valley hours",
            "freed host-h/day",
            "idle W/host",
            "energy saved/day",
            "O saved/day",
            "M saved/day",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        pools,
    ));
    out
}

fn md_row(cells: &[String]) -> String {
    let cells: Vec<String> = cells
        .iter()
        .map(|c| c.replace('|', "\\|").replace('\n', " "))
        .collect();
    format!("| {} |\n", cells.join(" | "))
}

fn range_text(from: u64, to: u64, period: u64) -> String {
    format!(
        "{} to {} (periods of {period} s)",
        unix_to_text(from),
        unix_to_text(to)
    )
}

/// The review in Markdown.
pub fn markdown(r: &Review) -> String {
    let c = &r.comparison;
    let mut md = String::from("# Optimisation review\n\n");
    let _ =
        writeln!(
        md,
        "Baseline: {}. Candidate: {}. Scope: {:?}; filters: data centre {}, service {}, host {}.\n",
        range_text(c.baseline.from_unix_s, c.baseline.to_unix_s, c.baseline.period_s),
        range_text(c.candidate.from_unix_s, c.candidate.to_unix_s, c.candidate.period_s),
        c.scope,
        c.filters.datacenter.as_deref().unwrap_or("all"),
        c.filters.service.as_deref().unwrap_or("all"),
        c.filters.host.as_deref().unwrap_or("all"),
    );
    md.push_str("## Verdicts\n\n");
    for s in &c.scenarios {
        let _ = writeln!(md, "- {}", s.summary);
    }
    md.push('\n');
    for (title, header, rows) in tables(r) {
        let _ = writeln!(md, "## {title}\n");
        if rows.is_empty() {
            md.push_str("(none)\n\n");
            continue;
        }
        md.push_str(&md_row(&header));
        md.push_str(&md_row(&vec!["---".to_string(); header.len()]));
        for row in rows {
            md.push_str(&md_row(&row));
        }
        md.push('\n');
    }
    if let Some(p) = &r.diff_profile {
        if let Some(reason) = &p.withheld_reason {
            let _ = writeln!(md, "Differential flame graph: {reason}.\n");
        } else {
            let _ = writeln!(md, "Differential flame graph: `GET /api/v1/compare?...&format=svg` or the HTML report.\n");
        }
    }
    for (title, disclosure) in [
        ("Disclosure: baseline", &c.baseline_disclosure),
        ("Disclosure: candidate", &c.candidate_disclosure),
    ] {
        let _ = writeln!(md, "## {title}\n");
        md.push_str(&md_row(&DISCLOSURE_COLUMNS.map(String::from)));
        md.push_str(&md_row(&vec!["---".to_string(); DISCLOSURE_COLUMNS.len()]));
        for d in disclosure {
            md.push_str(&md_row(&disclosure_cells(d)));
        }
        md.push('\n');
    }
    md.push_str("## What this could not see\n\n");
    for n in &c.notes {
        let _ = writeln!(md, "- {n}");
    }
    md.push_str("\n## Method and assumptions\n\n");
    let _ = writeln!(md, "- {}", c.method);
    for d in r
        .consolidation
        .data
        .iter()
        .chain(&r.consolidation.assumptions)
    {
        let _ = writeln!(md, "- {d}");
    }
    md
}

/// The review as a printable HTML page (with the differential flame graph).
pub fn html(r: &Review, generated_at: &str) -> String {
    let c = &r.comparison;
    let title = "Optimisation review";
    // The differential flame graph at the candidate's widths and, below it,
    // at the baseline's (removed code shows there), each in its own frame
    // at the page's full width (inferno's script sizes the first SVG of its
    // document: two inline graphs would share one script and ids).
    let flame_graphs = r.diff_profile.as_ref().map(|p| {
        [
            ("candidate widths", p.flamegraph_svg()),
            ("baseline widths", p.baseline_flamegraph_svg()),
        ]
    });
    let body = html! {
        h1 { (title) }
        div class="meta" {
            "baseline " (range_text(c.baseline.from_unix_s, c.baseline.to_unix_s, c.baseline.period_s))
            " · candidate " (range_text(c.candidate.from_unix_s, c.candidate.to_unix_s, c.candidate.period_s))
            " · scope " (format!("{:?}", c.scope))
            " · generated " (generated_at)
        }
        h2 { "Verdicts" }
        ul { @for s in &c.scenarios { li { (s.summary) } } }
        @for (title, header, rows) in tables(r) {
            h2 { (title) }
            @if rows.is_empty() {
                p { "(none)" }
            } @else {
                table {
                    tr { @for h in header { th { (h) } } }
                    @for row in rows {
                        tr { @for cell in row { td { (cell) } } }
                    }
                }
            }
        }
        @if let Some(graphs) = flame_graphs {
            h2 { "Differential energy flame graph (per transaction)" }
            @for (widths, svg) in graphs {
                @match svg {
                    Ok(svg) => (crate::dashboard::flame_graph_frame(
                        &format!("differential flame graph, {widths}"),
                        &svg,
                    )),
                    Err(e) => p { (e.to_string()) },
                }
            }
        }
        h2 { "Disclosure: baseline" }
        (disclosure_table(&c.baseline_disclosure))
        h2 { "Disclosure: candidate" }
        (disclosure_table(&c.candidate_disclosure))
        h2 { "What this could not see" }
        ul { @for n in &c.notes { li { (n) } } }
        h2 { "Method and assumptions" }
        ul {
            li { (c.method) }
            @for d in r.consolidation.data.iter().chain(&r.consolidation.assumptions) {
                li { (d) }
            }
        }
    };
    page(title, body)
}
