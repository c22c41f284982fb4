//! `GET /dashboard/plan`: the plans on one server-rendered page (maud, every
//! interpolation escaped, nothing fetched from outside): the supply ranking
//! per service and scenario over the range, each deferrable job's
//! time-shifting plan for the window in force now, each pool's week of
//! consolidation (hosts to release per hour of the week, the saving, the
//! zombie hosts) and every stored plan with its prediction and its check
//! afterwards (a migration carried out, a time-shift plan whose window has
//! ended).
use maud::{html, Markup};

use super::check::PlanCheck;
use super::pools::{PoolConsolidation, PoolWeek, ZombieRun};
use super::shift_check::ShiftCheck;
use super::shifting::ShiftPlan;
use super::supplies::Selection;
use crate::figures::{count, energy_j, mass_g, percent, sig4};
use crate::store::StoredPlan;

/// What the page shows.
pub struct PlanPage {
    pub selection: Selection,
    pub shifts: Vec<Result<ShiftPlan, String>>,
    /// The pools' week over the page's range (7.2), or why it could not be made.
    pub pools: Result<PoolConsolidation, String>,
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

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Hour 0..168 of a Monday-based week as "Mon 00:00 (hour 0)".
fn hour_of_week(h: u32) -> String {
    let day = WEEKDAYS.get((h / 24) as usize).copied().unwrap_or("?");
    format!("{day} {:02}:00 (hour {h})", h % 24)
}

/// A pool's heading and its data: peak, valley, cores, idle power, factors.
fn pool_heading(p: &PoolWeek) -> (String, String) {
    (
        format!("{} / {}", p.datacenter, p.pool),
        format!(
            "Peak {} at {} busy cores, valley {} at {} busy cores (peak to valley {}); \
             {} cores per host; idle power {} W per host ({}); intensity {} g/kWh, PUE {}. \
             Predicted saving {} a week ({}, {} released host-hours).",
            hour_of_week(p.peak_hour_of_week),
            sig4(p.peak_busy_cores),
            hour_of_week(p.valley_hour_of_week),
            sig4(p.valley_busy_cores),
            opt(p.peak_to_valley, sig4),
            sig4(p.cores_per_host),
            sig4(p.idle_power_w),
            p.idle_power_source,
            sig4(p.intensity_g_per_kwh),
            sig4(p.pue),
            mass_g(p.saving_g_per_week),
            energy_j(p.saving_j_per_week),
            count(p.released_host_hours_per_week),
        ),
    )
}

fn zombie_cells(z: &ZombieRun) -> [String; 9] {
    let t = |s: u64| agent_common::time_text::format_unix_s(s as i64);
    [
        format!("{} / {}", z.datacenter, z.host),
        t(z.from_unix_s),
        t(z.to_unix_s),
        z.hours.to_string(),
        percent(z.utilisation),
        energy_j(z.energy_j),
        energy_j(z.idle_energy_j),
        mass_g(z.carbon_g),
        if z.ongoing { "yes" } else { "no" }.to_string(),
    ]
}

const ZOMBIE_HEADERS: [&str; 9] = [
    "host",
    "from",
    "to",
    "hours",
    "utilisation",
    "energy",
    "idle energy",
    "carbon (operational + embodied)",
    "still a zombie",
];

fn pools(plan: &Result<PoolConsolidation, String>) -> Markup {
    html! {
        h2 { "Consolidation per pool (7.2): hosts to release by the hour of the week" }
        @match plan {
            Err(e) => p { (e) },
            Ok(plan) => {
                @if plan.pools.is_empty() { p { "No pools measured in the range (supply rollups grouped by " (plan.options.group_by) ")." } }
                @for pool in &plan.pools {
                    @let (title, data) = pool_heading(pool);
                    h3 { (title) }
                    p { (data) }
                    details {
                    summary { "Hosts to release per hour of the week (" (pool.hours.len()) " hours measured)" }
                    table {
                        tr { th { "hour of week" } th { "busy cores" } th { "hosts" } th { "hosts needed" }
                             th { "to release" } th { "saving" } }
                        @for h in &pool.hours {
                            tr {
                                td { (hour_of_week(h.hour_of_week)) }
                                td { (sig4(h.busy_cores)) }
                                td { (count(h.hosts)) }
                                td { (h.hosts_needed) }
                                td { (h.hosts_to_release) }
                                td { (mass_g(h.saving_g)) }
                            }
                        }
                    }
                    }
                }
                h3 { "Zombie hosts" }
                @if plan.zombies.is_empty() { p { "None in the range." } }
                @else {
                    table {
                        tr { @for c in ZOMBIE_HEADERS { th { (c) } } }
                        @for z in &plan.zombies {
                            tr { @for c in zombie_cells(z) { td { (c) } } }
                        }
                    }
                }
                ul { @for a in &plan.assumptions { li { (a) } } }
            }
        }
    }
}

/// The pools' section as Markdown.
fn pools_markdown(plan: &Result<PoolConsolidation, String>, out: &mut String) {
    use std::fmt::Write as _;
    let cell = |s: &str| s.replace('|', "\\|");
    let _ = writeln!(
        out,
        "\n## Consolidation per pool (7.2): hosts to release by the hour of the week\n"
    );
    let plan = match plan {
        Err(e) => {
            let _ = writeln!(out, "{e}");
            return;
        }
        Ok(plan) => plan,
    };
    if plan.pools.is_empty() {
        let _ = writeln!(
            out,
            "No pools measured in the range (supply rollups grouped by {}).\n",
            plan.options.group_by
        );
    }
    for pool in &plan.pools {
        let (title, data) = pool_heading(pool);
        let _ = writeln!(out, "### {}\n\n{}\n", title, data);
        let _ = writeln!(
            out,
            "| hour of week | busy cores | hosts | hosts needed | to release | saving |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for h in &pool.hours {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                hour_of_week(h.hour_of_week),
                sig4(h.busy_cores),
                count(h.hosts),
                h.hosts_needed,
                h.hosts_to_release,
                mass_g(h.saving_g)
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "### Zombie hosts\n");
    if plan.zombies.is_empty() {
        let _ = writeln!(out, "None in the range.\n");
    } else {
        let _ = writeln!(out, "| {} |", ZOMBIE_HEADERS.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(ZOMBIE_HEADERS.len()));
        for z in &plan.zombies {
            let cells: Vec<String> = zombie_cells(z).iter().map(|c| cell(c)).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out.push('\n');
    }
    for a in &plan.assumptions {
        let _ = writeln!(out, "- {a}");
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
    pools_markdown(&data.pools, &mut out);
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
            (pools(&data.pools))
            (stored(&data.stored))
        },
    )
}
