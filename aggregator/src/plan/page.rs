//! `GET /dashboard/plan`: the plans on one server-rendered page (maud, every
//! interpolation escaped, nothing fetched from outside): the supply ranking
//! per service and scenario over the range, each deferrable job's
//! time-shifting plan for the window in force now, and every stored plan
//! with its prediction and its check afterwards (a migration carried out,
//! a time-shift plan whose window has ended).
use maud::{html, Markup};

use super::check::PlanCheck;
use super::shift_check::ShiftCheck;
use super::shifting::ShiftPlan;
use super::supplies::Selection;
use crate::figures::{count, mass_g, sig4};
use crate::store::StoredPlan;

/// What the page shows.
pub struct PlanPage {
    pub selection: Selection,
    pub shifts: Vec<Result<ShiftPlan, String>>,
    pub stored: Vec<(StoredPlan, Option<Result<StoredCheck, String>>)>,
}

/// The check afterwards of a stored plan, by kind.
pub enum StoredCheck {
    Migration(PlanCheck),
    Shift(ShiftCheck),
}

impl StoredCheck {
    /// The realised saving (with its unit) and its interval, formatted.
    fn realised(&self) -> String {
        match self {
            StoredCheck::Migration(c) => format!(
                "{}/day {}",
                opt(c.realised_saving_g_per_day, mass_g),
                interval(
                    c.realised_saving_ci_low_g_per_day,
                    c.realised_saving_ci_high_g_per_day,
                    mass_g
                )
            ),
            StoredCheck::Shift(c) => format!(
                "{} in the window {}",
                mass_g(c.realised_saving_g),
                interval(c.realised_saving.ci_low, c.realised_saving.ci_high, mass_g)
            ),
        }
    }

    fn within(&self) -> &'static str {
        let w = match self {
            StoredCheck::Migration(c) => c.prediction_within_interval,
            StoredCheck::Shift(c) => c.prediction_within_interval,
        };
        w.map_or("–", |w| if w { "yes" } else { "no" })
    }
}

/// A stored plan's predicted saving and interval, formatted with its unit.
fn predicted(body: &serde_json::Value) -> String {
    let f = |k: &str| body.get(k).and_then(serde_json::Value::as_f64);
    if let Some(p) = f("predicted_saving_g_per_day") {
        return format!(
            "{}/day {}",
            mass_g(p),
            interval(
                f("saving_ci_low_g_per_day"),
                f("saving_ci_high_g_per_day"),
                mass_g
            )
        );
    }
    let bounds = body
        .get("predicted_saving_interval_g")
        .and_then(serde_json::Value::as_array);
    let bound = |i: usize| {
        bounds
            .and_then(|b| b.get(i))
            .and_then(serde_json::Value::as_f64)
    };
    format!(
        "{} {}",
        opt(f("predicted_saving_g"), mass_g),
        interval(bound(0), bound(1), mass_g)
    )
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

fn interval(lo: Option<f64>, hi: Option<f64>, f: fn(f64) -> String) -> String {
    match (lo, hi) {
        (Some(lo), Some(hi)) => format!("[{}, {}]", f(lo), f(hi)),
        _ => "–".to_string(),
    }
}

fn ranking(selection: &Selection) -> Markup {
    html! {
        h2 { "Resource selection (7.4): cost per transaction on each supply" }
        p { (selection.method) }
        @for r in &selection.rankings {
            h3 { (r.service) " / " (r.scenario) }
            table {
                tr { th { "rank" } th { "data centre / supply" } th { "transactions" }
                     th { "g per transaction [95%]" } th { "J per transaction" }
                     th { "intensity g/kWh" } th { "PUE" } th { "utilisation" }
                     th { "vs cheapest" } th { "hardware g" } th { "grid g" } }
                @for c in &r.supplies {
                    tr {
                        td { (c.rank) }
                        td { (c.supply.to_string()) }
                        td { (count(c.transactions)) }
                        td { (opt(c.g_per_transaction.candidate, mass_g)) " "
                             (interval(c.g_per_transaction.ci_low, c.g_per_transaction.ci_high, mass_g)) }
                        td { (opt(c.energy_j_per_transaction.candidate, sig4)) }
                        td { (opt(c.factors.intensity_g_per_kwh, sig4)) }
                        td { (opt(c.factors.pue, sig4)) }
                        td { (crate::figures::percent(c.factors.utilisation)) }
                        td { (c.vs_cheapest.as_ref().map_or("–", |d| d.verdict.as_str())) }
                        td { (opt(c.hardware_g_per_transaction, mass_g)) }
                        td { (opt(c.grid_g_per_transaction, mass_g)) }
                    }
                }
            }
        }
        @for n in &selection.notes { p { (n) } }
    }
}

fn shifts(plans: &[Result<ShiftPlan, String>]) -> Markup {
    html! {
        h2 { "Time shifting (7.2): deferrable jobs" }
        @if plans.is_empty() { p { "No [[scheduling.deferrable]] jobs configured." } }
        @for p in plans {
            @match p {
                Err(e) => p { (e) },
                Ok(p) => {
                    h3 { (p.job.name) " (" (p.job.service) ", " (p.job.datacenter) ")" }
                    p { (p.verdict) "; predicted saving " (opt(p.predicted_saving_g, mass_g))
                        " (baseline " (opt(p.baseline_g, mass_g)) ", planned " (opt(p.planned_g, mass_g)) ")" }
                    table {
                        tr { th { "hour (UTC)" } th { "intensity g/kWh" } th { "free cores" } th { "planned" } th { "baseline" } }
                        @for h in &p.hours {
                            tr {
                                td { (agent_common::time_text::format_unix_s(h.hour_unix_s as i64)) }
                                td { (opt(h.intensity_g_per_kwh, sig4)) }
                                td { (opt(h.free_cores, sig4)) }
                                td { @if h.planned { "run" } }
                                td { @if h.baseline { "as released" } }
                            }
                        }
                    }
                    ul { @for a in &p.assumptions { li { (a) } } }
                }
            }
        }
    }
}

fn stored(plans: &[(StoredPlan, Option<Result<StoredCheck, String>>)]) -> Markup {
    html! {
        h2 { "Stored plans and the check afterwards" }
        @if plans.is_empty() { p { "No stored plans (POST /api/v1/plans/migration or /api/v1/plans/shift)." } }
        table {
            tr { th { "plan" } th { "kind" } th { "service" } th { "made" } th { "carried out" }
                 th { "predicted saving [95%]" } th { "realised saving [95%]" } th { "prediction in realised interval" } }
            @for (p, check) in plans {
                @let body: serde_json::Value = serde_json::from_str(&p.body).unwrap_or_default();
                tr {
                    td { (p.id) }
                    td { (p.kind) }
                    td { (p.service) }
                    td { (agent_common::time_text::format_unix_s(p.created_unix_s as i64)) }
                    td { (p.carried_out_unix_s.map_or("–".to_string(), |t| agent_common::time_text::format_unix_s(t as i64))) }
                    td { (predicted(&body)) }
                    @match check {
                        Some(Ok(c)) => {
                            td { (c.realised()) }
                            td { (c.within()) }
                        }
                        Some(Err(e)) => { td colspan="2" { (e) } }
                        None => { td { "–" } td { "–" } }
                    }
                }
            }
        }
    }
}

/// The same as Markdown (`/dashboard/plan?format=md`).
pub fn markdown(data: &PlanPage) -> String {
    use std::fmt::Write as _;
    let t = |s: u64| agent_common::time_text::format_unix_s(s as i64);
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::new();
    let sel = &data.selection;
    let _ = writeln!(out, "# Plans: resource selection and global scheduling\n");
    let _ = writeln!(
        out,
        "Range {} to {}.\n",
        t(sel.from_unix_s),
        t(sel.to_unix_s)
    );
    let _ = writeln!(out, "## Resource selection (7.4)\n\n{}\n", sel.method);
    for r in &sel.rankings {
        let _ = writeln!(out, "### {} / {}\n", r.service, r.scenario);
        let _ = writeln!(out, "| rank | data centre / supply | transactions | g per transaction [95%] | J per transaction | intensity g/kWh | PUE | vs cheapest | hardware g | grid g |");
        let _ = writeln!(out, "|---:|---|---:|---|---:|---:|---:|---|---:|---:|");
        for c in &r.supplies {
            let g = &c.g_per_transaction;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} {} | {} | {} | {} | {} | {} | {} |",
                c.rank,
                cell(&c.supply.to_string()),
                count(c.transactions),
                opt(g.candidate, mass_g),
                interval(g.ci_low, g.ci_high, mass_g),
                opt(c.energy_j_per_transaction.candidate, sig4),
                opt(c.factors.intensity_g_per_kwh, sig4),
                opt(c.factors.pue, sig4),
                c.vs_cheapest.as_ref().map_or("–", |d| d.verdict.as_str()),
                opt(c.hardware_g_per_transaction, mass_g),
                opt(c.grid_g_per_transaction, mass_g),
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "## Time shifting (7.2)\n");
    for p in &data.shifts {
        match p {
            Err(e) => {
                let _ = writeln!(out, "- {e}");
            }
            Ok(p) => {
                let _ = writeln!(
                    out,
                    "- **{}** ({}, {}): {}; predicted saving {}; planned hours {}",
                    p.job.name,
                    p.job.service,
                    p.job.datacenter,
                    p.verdict,
                    opt(p.predicted_saving_g, mass_g),
                    p.planned_hours
                        .iter()
                        .map(|h| t(*h))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    let _ = writeln!(out, "\n## Stored plans and the check afterwards\n");
    let _ = writeln!(out, "| plan | kind | service | made | carried out | predicted saving [95%] | realised saving [95%] | prediction in realised interval |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (p, check) in &data.stored {
        let body: serde_json::Value = serde_json::from_str(&p.body).unwrap_or_default();
        let (realised, within) = match check {
            Some(Ok(c)) => (c.realised(), c.within().to_string()),
            Some(Err(e)) => (cell(e), "–".to_string()),
            None => ("–".to_string(), "–".to_string()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.id,
            p.kind,
            p.service,
            t(p.created_unix_s),
            p.carried_out_unix_s.map_or("–".to_string(), t),
            predicted(&body),
            realised,
            within
        );
    }
    out
}

/// The whole page.
pub fn render(data: &PlanPage) -> String {
    crate::dashboard::page(
        "sci-cf plans",
        html! {
            h1 { "Plans: resource selection and global scheduling" }
            p { "Range " (agent_common::time_text::format_unix_s(data.selection.from_unix_s as i64))
                " to " (agent_common::time_text::format_unix_s(data.selection.to_unix_s as i64)) "." }
            (ranking(&data.selection))
            (shifts(&data.shifts))
            (stored(&data.stored))
        },
    )
}
