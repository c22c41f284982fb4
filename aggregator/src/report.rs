//! The Appendix A evaluation report (step e) in Markdown, the one Markdown
//! rendering of [`Evaluation`] (JSON is the evaluation itself; HTML is in
//! [`crate::dashboard`]). Figures print as [`crate::figures`] says.
use std::fmt::Write as _;

use crate::figures::{count, energy_j, mass_g, percent, sig4};
use crate::hotspots::Hotspot;
use crate::sci::{Disclosure, Evaluation};

/// gCO2e per business unit, unit-scaled.
pub fn sci_text(v: Option<f64>) -> String {
    v.map_or_else(
        || "undefined".to_string(),
        |v| format!("{} CO2e per business unit", mass_g(v)),
    )
}

pub fn unix_to_text(s: u64) -> String {
    agent_common::time_text::format_unix_s(s as i64)
}

fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "–".into()
    } else {
        items.join("; ")
    }
}

/// The disclosure table's header and one row per data centre (and period).
pub const DISCLOSURE_COLUMNS: [&str; 16] = [
    "data centre",
    "intensity (gCO2e/kWh)",
    "intensity source",
    "PUE",
    "TE",
    "EL (days)",
    "RR/ToR",
    "share source",
    "energy source",
    "energy model",
    "energy",
    "estimated share",
    "unattributed share",
    "unassigned share",
    "host-seconds",
    "steal (CPU-s)",
];

pub fn disclosure_cells(d: &Disclosure) -> [String; 16] {
    [
        d.datacenter.clone(),
        sig4(d.intensity_g_per_kwh),
        list(&d.intensity_sources),
        sig4(d.pue),
        mass_g(d.total_embodied_g),
        sig4(d.lifespan_s / 86_400.0),
        sig4(d.resource_share),
        list(&d.share_sources),
        list(&d.energy_sources),
        if d.energy_models.is_empty() {
            "measured".into()
        } else {
            d.energy_models.join("; ")
        },
        energy_j(d.energy_j),
        percent(d.estimated_energy_share),
        percent(d.unattributed_energy_share),
        percent(d.unassigned_energy_share),
        sig4(d.host_seconds),
        sig4(d.steal_cpu_s),
    ]
}

fn md_row(cells: &[String]) -> String {
    let cells: Vec<String> = cells.iter().map(|c| md_cell(c)).collect();
    format!("| {} |", cells.join(" | "))
}

pub fn markdown(e: &Evaluation) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# SCI_CF evaluation report\n");
    let _ = writeln!(
        md,
        "Range: {} to {} ({} periods of {} s with data, {} with transactions, {} in SCI_CF; {} without data).\n",
        unix_to_text(e.from_unix_s),
        unix_to_text(e.to_unix_s),
        e.periods.len(),
        e.period_s,
        e.periods_defined,
        e.periods_in_mean,
        e.periods_without_data
    );
    let _ = writeln!(
        md,
        "**SCI_CF (mean of the periods' SCI_j, Appendix A step d): {}**\n",
        sci_text(e.sci_cf_mean)
    );
    let _ = writeln!(
        md,
        "Pooled ratio sum(O+M)/sum(R) over the same periods, for comparison: {}.\n",
        sci_text(e.sci_cf_pooled)
    );
    match &e.coverage_note {
        Some(note) => {
            let _ = writeln!(md, "**Coverage:** {note}.\n");
        }
        None => {
            let _ = writeln!(
                md,
                "Coverage: every period with transactions has at least {} of its hosts' time in data.\n",
                percent(e.min_coverage)
            );
        }
    }
    // Heaviest first: the standard's order for its four scenarios.
    let mut weights: Vec<(&String, &f64)> = e.weights.iter().collect();
    weights.sort_by(|a, b| b.1.total_cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let _ = writeln!(
        md,
        "Weights used (alpha_i): {}.\n",
        weights
            .iter()
            .map(|(k, v)| format!("{k} {}", count(**v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "## Disclosure: the factors behind the figures\n");
    let _ = writeln!(md, "{}", md_row(&DISCLOSURE_COLUMNS.map(String::from)));
    let _ = writeln!(md, "|{}", "---|".repeat(DISCLOSURE_COLUMNS.len()));
    for d in &e.disclosure {
        let _ = writeln!(md, "{}", md_row(&disclosure_cells(d)));
    }
    let _ = writeln!(md, "\n## Periods\n");
    let _ = writeln!(md, "| period start | windows | hosts | coverage | TA credit | TA drawdown | TA repayment | TA query | O | M | R | SCI_j (CO2e/unit) | in SCI_CF |");
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for p in &e.periods {
        let ta = |s: &str| count(p.transactions.get(s).copied().unwrap_or(0.0));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            unix_to_text(p.start_unix_s),
            p.windows,
            p.hosts,
            percent(p.coverage),
            ta("credit"),
            ta("drawdown"),
            ta("repayment"),
            ta("query"),
            mass_g(p.operational_g),
            mass_g(p.embodied_g),
            count(p.business_units),
            p.sci_g_per_unit.map_or("undefined".into(), mass_g),
            if p.in_mean {
                "yes".to_string()
            } else {
                format!(
                    "no: {}",
                    md_cell(p.excluded_reason.as_deref().unwrap_or(""))
                )
            }
        );
    }
    let _ = writeln!(md, "\n### Factors per period and data centre\n");
    let _ = writeln!(
        md,
        "| period start | {}",
        md_row(&DISCLOSURE_COLUMNS.map(String::from)).trim_start_matches("| ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(DISCLOSURE_COLUMNS.len()));
    for p in &e.periods {
        for d in &p.disclosure {
            let _ = writeln!(
                md,
                "| {} {}",
                unix_to_text(p.start_unix_s),
                md_row(&disclosure_cells(d))
            );
        }
    }
    let _ = writeln!(md, "\n## Scenarios\n");
    let _ = writeln!(md, "| scenario | transactions | dynamic energy | idle share | total energy | carbon | embodied | per transaction | measured weight | standard weight |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &e.scenarios {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.scenario,
            count(s.transactions),
            energy_j(s.energy_j),
            energy_j(s.idle_energy_j),
            energy_j(s.total_energy_j),
            mass_g(s.carbon_g),
            mass_g(s.embodied_g),
            s.per_transaction_text(),
            s.measured_weight.map_or("–".into(), sig4),
            s.standard_weight
        );
    }
    let _ = writeln!(
        md,
        "\n## Hosts\n\nFigures of whole host-rollup steps: {} to {}.\n",
        unix_to_text(e.hosts_from_unix_s),
        unix_to_text(e.hosts_to_unix_s)
    );
    let _ = writeln!(md, "| host | data centre | data (h) | energy | idle energy | carbon | embodied | CPU utilisation | transactions | estimated |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for h in &e.hosts {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            md_cell(&h.host),
            md_cell(&h.datacenter),
            sig4(h.host_seconds / 3600.0),
            energy_j(h.energy_j),
            energy_j(h.idle_energy_j),
            mass_g(h.carbon_g),
            mass_g(h.embodied_g),
            percent(h.cpu_utilisation),
            count(h.transactions),
            if h.estimated {
                "yes (power model)"
            } else {
                "no"
            }
        );
    }
    let _ = writeln!(md, "\n## Services\n");
    let _ = writeln!(
        md,
        "| service/scenario | energy | idle share | carbon | embodied | CPU (s) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for s in &e.services {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            md_cell(&s.key),
            energy_j(s.energy_j),
            energy_j(s.idle_energy_j),
            mass_g(s.carbon_g),
            mass_g(s.embodied_g),
            sig4(s.cpu_ns / 1e9)
        );
    }
    let _ = writeln!(md, "\n## Method and factors\n\n{}\n", e.method);
    md
}

/// What a service key without a rule means, printed beside it.
pub const UNASSIGNED_NOTE: &str = "unassigned (no rule): processes no scenario rule claims (the OS, the agent, the load generator, anything not yet under a rule); their energy counts in the hosts' O and so in SCI_CF, but in no scenario";

/// The evaluation for a terminal: the same figures as [`markdown`] (4
/// significant digits, unit-scaled), the periods in the mean and those left
/// out with why, O, M and R over the covered periods (so that (O+M)/R is
/// the pooled figure printed beside it), the scenarios and the
/// heaviest services.
/// The hotspot section of the Markdown report: each finding with the
/// carbon at stake and its recommendation, then what the rules could not see.
pub fn hotspots_markdown(hotspots: &[Hotspot], notes: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Hotspots
"
    );
    if hotspots.is_empty() {
        let _ = writeln!(md, "No hotspot found in this range.\n");
    } else {
        let _ = writeln!(md, "| kind | subject | carbon at stake | recommendation |");
        let _ = writeln!(md, "|---|---|---|---|");
        for h in hotspots {
            let _ = writeln!(
                md,
                "{}",
                md_row(&[
                    h.kind.as_str().to_string(),
                    h.subject.clone(),
                    format!("{} ({} g)", mass_g(h.impact_carbon_g), h.impact_carbon_g),
                    h.recommendation.clone(),
                ])
            );
        }
        let _ = writeln!(md);
    }
    for note in notes {
        let _ = writeln!(md, "Not seen: {}.\n", md_cell(note));
    }
    md
}

pub fn console(e: &Evaluation) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== Fleet SCI_CF (T/CQJR 032.2-2025, gCO2e per business unit; query = 1 unit) =="
    );
    let _ = writeln!(
        s,
        "  SCI_CF, mean of the SCI_j of {} period(s) of {} s:   {}",
        e.periods_in_mean,
        e.period_s,
        sci_text(e.sci_cf_mean)
    );
    let _ = writeln!(
        s,
        "  pooled sum(O+M)/sum(R) over the covered periods:  {}",
        sci_text(e.sci_cf_pooled)
    );
    let covered = e.periods.iter().filter(|p| p.covered);
    let (o_g, m_g, r) = covered.fold((0.0, 0.0, 0.0), |(o, m, r), p| {
        (o + p.operational_g, m + p.embodied_g, r + p.business_units)
    });
    let _ = writeln!(
        s,
        "  over the covered periods: O = {}, M = {}, R = {} units",
        mass_g(o_g),
        mass_g(m_g),
        count(r)
    );
    let _ = writeln!(
        s,
        "  periods: {} with data ({} with transactions, {} in SCI_CF), {} without data",
        e.periods.len(),
        e.periods_defined,
        e.periods_in_mean,
        e.periods_without_data
    );
    for p in e.periods.iter().filter(|p| !p.in_mean) {
        let _ = writeln!(
            s,
            "    left out {} (coverage {}): {}",
            unix_to_text(p.start_unix_s),
            percent(p.coverage),
            p.excluded_reason.as_deref().unwrap_or("not in the mean")
        );
    }
    let _ = writeln!(s, "\n== Per scenario (whole range) ==");
    let _ = writeln!(
        s,
        "  {:<11} {:>12} {:>12} {:>16} {:>9} {:>9}",
        "scenario", "transactions", "energy", "per transaction", "measured", "standard"
    );
    for sc in &e.scenarios {
        let _ = writeln!(
            s,
            "  {:<11} {:>12} {:>12} {:>16} {:>9} {:>9}",
            sc.scenario,
            count(sc.transactions),
            energy_j(sc.total_energy_j),
            sc.per_transaction_text(),
            sc.measured_weight.map_or("–".into(), sig4),
            sc.standard_weight
        );
    }
    let _ = writeln!(
        s,
        "\n== Where the carbon goes (heaviest services, whole range) =="
    );
    let mut unassigned = false;
    for sv in e.services.iter().take(6) {
        let key = if sv.key == "(none)/(none)" {
            unassigned = true;
            "unassigned (no rule)"
        } else {
            sv.key.as_str()
        };
        let _ = writeln!(
            s,
            "  {:<30} {:>12} {:>12}",
            key,
            energy_j(sv.energy_j),
            mass_g(sv.carbon_g + sv.embodied_g)
        );
    }
    if unassigned {
        let _ = writeln!(s, "  {UNASSIGNED_NOTE}");
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The same evaluation the dashboard tests use: periods 0.1 and 0.3,
    /// one without business; mean 0.2, pooled 114/700.
    #[test]
    fn markdown_report_has_the_periods_and_the_mean() {
        let md = markdown(&crate::dashboard::tests::evaluation());
        assert!(md.contains("**SCI_CF (mean of the periods' SCI_j, Appendix A step d): 200.0 mg CO2e per business unit**"), "{md}");
        assert!(
            md.contains("over the same periods, for comparison: 162.9 mg CO2e per business unit")
        );
        assert!(md.contains(
            "| period start | windows | hosts | coverage | TA credit | TA drawdown | TA repayment | TA query | O | M | R | SCI_j (CO2e/unit) | in SCI_CF |"
        ));
        assert!(md.contains("| 1970-01-01T08:00:00Z | 1 | 1 | 100.0% | 10 | 0 | 0 | 260 | 40.00 g | 10.00 g | 500 | 100.0 mg | yes |"), "{md}");
        assert!(md.contains("| 1970-01-01T10:00:00Z | 1 | 1 | 100.0% | 0 | 0 | 0 | 0 | 3.000 g | 1.000 g | 0 | undefined | no: no completed transactions in the period (R = 0) |"), "{md}");
        // Weights in name order, the disclosure table present.
        assert!(
            md.contains("Weights used (alpha_i): credit 24, drawdown 7, repayment 3, query 1."),
            "{md}"
        );
        assert!(md.contains("## Disclosure: the factors behind the figures"));
        assert!(md.contains("| data centre | intensity (gCO2e/kWh) | intensity source | PUE | TE | EL (days) | RR/ToR |"));
    }

    /// Steal time (CPU time the hypervisor gave other guests) is disclosed
    /// in the md and html reports with the host-seconds it is out of.
    #[test]
    fn the_disclosure_shows_steal_time() {
        let mut e = crate::dashboard::tests::evaluation();
        e.disclosure = vec![Disclosure {
            datacenter: "dc1".into(),
            host_seconds: 7200.0,
            steal_cpu_s: 7.443,
            ..Default::default()
        }];
        let md = markdown(&e);
        assert!(md.contains("| steal (CPU-s) |"), "{md}");
        assert!(md.contains("| 7.443 |"), "{md}");
        let html = crate::dashboard::disclosure_table(&e.disclosure).into_string();
        assert!(html.contains("steal (CPU-s)"), "{html}");
        assert!(html.contains(">7.443<"), "{html}");
    }

    #[test]
    fn console_counts_the_periods_and_agrees_with_the_pooled_figure() {
        let e = crate::dashboard::tests::evaluation();
        let text = console(&e);
        assert!(text.contains("SCI_CF, mean of the SCI_j of 2 period(s) of 3600 s:   200.0 mg CO2e per business unit"), "{text}");
        assert!(
            text.contains("pooled sum(O+M)/sum(R) over the covered periods:  162.9 mg CO2e"),
            "{text}"
        );
        // O + M over the covered periods, divided by their R: the pooled figure.
        let (o, m, r) = e
            .periods
            .iter()
            .filter(|p| p.covered)
            .fold((0.0, 0.0, 0.0), |a, p| {
                (
                    a.0 + p.operational_g,
                    a.1 + p.embodied_g,
                    a.2 + p.business_units,
                )
            });
        assert!(((o + m) / r - e.sci_cf_pooled.unwrap()).abs() < 1e-12);
        assert!(
            text.contains("over the covered periods: O = 93.00 g, M = 21.00 g, R = 700 units"),
            "{text}"
        );
        assert!(text.contains("left out 1970-01-01T10:00:00Z (coverage 100.0%): no completed transactions in the period (R = 0)"), "{text}");
    }

    #[test]
    fn sci_text_names_the_unit() {
        assert_eq!(sci_text(Some(0.000083)), "83.00 µg CO2e per business unit");
        assert_eq!(sci_text(None), "undefined");
    }
}
