//! The Appendix A evaluation report (step e), in Markdown (JSON is the
//! [`Evaluation`] itself).
use std::fmt::Write as _;

use crate::sci::Evaluation;

fn g(v: Option<f64>) -> String {
    v.map_or_else(|| "undefined".to_string(), |v| format!("{v:.6}"))
}

fn unix_to_text(s: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .to_string()
}

pub fn markdown(e: &Evaluation) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# SCI_CF evaluation report\n");
    let _ = writeln!(
        md,
        "Range: {} to {} ({} periods of {} s, {} with transactions).\n",
        unix_to_text(e.from_unix_s),
        unix_to_text(e.to_unix_s),
        e.periods.len(),
        e.period_s,
        e.periods_defined
    );
    let _ = writeln!(
        md,
        "**SCI_CF (mean of the periods' SCI_j, Appendix A step d): {} gCO2e per business unit**\n",
        g(e.sci_cf_mean)
    );
    let _ = writeln!(md, "Pooled ratio sum(O+M)/sum(R) over the range, for comparison: {} gCO2e per business unit.\n", g(e.sci_cf_pooled));
    let _ = writeln!(
        md,
        "Weights used (alpha_i): {}.\n",
        e.weights
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "## Periods\n");
    let _ = writeln!(md, "| period start | windows | hosts | TA credit | TA drawdown | TA repayment | TA query | O (g) | M (g) | R | SCI_j (g/unit) |");
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in &e.periods {
        let ta = |s: &str| p.transactions.get(s).copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.6} | {:.6} | {} | {} |",
            unix_to_text(p.start_unix_s),
            p.windows,
            p.hosts,
            ta("credit"),
            ta("drawdown"),
            ta("repayment"),
            ta("query"),
            p.operational_g,
            p.embodied_g,
            p.business_units,
            g(p.sci_g_per_unit)
        );
    }
    let _ = writeln!(md, "\n## Scenarios\n");
    let _ = writeln!(md, "| scenario | transactions | energy (J) | carbon (g) | embodied (g) | g per transaction | measured weight | standard weight |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in &e.scenarios {
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.6} | {:.6} | {} | {} | {} |",
            s.scenario,
            s.transactions,
            s.energy_j,
            s.carbon_g,
            s.embodied_g,
            g(s.g_per_transaction),
            s.measured_weight.map_or("-".into(), |w| format!("{w:.2}")),
            s.standard_weight
        );
    }
    let _ = writeln!(md, "\n## Hosts\n");
    let _ = writeln!(md, "| host | data centre | windows | energy (J) | idle (J) | carbon (g) | embodied (g) | CPU utilisation | transactions | estimated |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for h in &e.hosts {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3} | {:.6} | {:.6} | {:.1}% | {} | {} |",
            h.host,
            h.datacenter,
            h.windows,
            h.energy_j,
            h.idle_energy_j,
            h.carbon_g,
            h.embodied_g,
            100.0 * h.cpu_utilisation,
            h.transactions,
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
        "| service/scenario | energy (J) | carbon (g) | embodied (g) | CPU (s) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for s in &e.services {
        let _ = writeln!(
            md,
            "| {} | {:.3} | {:.6} | {:.6} | {:.3} |",
            s.key,
            s.energy_j,
            s.carbon_g,
            s.embodied_g,
            s.cpu_ns as f64 / 1e9
        );
    }
    let _ = writeln!(md, "\n## Method and factors\n\n{}\n", e.method);
    md
}
