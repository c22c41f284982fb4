//! Server-rendered HTML: the fleet dashboard and the printable evaluation
//! report (Appendix A of the standard), plus the same report in Markdown.
//!
//! One self-contained page each: inline CSS, charts drawn here as inline SVG,
//! no script, nothing fetched from elsewhere. Every value from the data is
//! escaped. The aggregator maps its query results onto the plain structs
//! below; [`crate::hotspots`] and [`crate::profiles`] supply the hotspot
//! list and flame graphs.
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::hotspots::{Hotspot, ScenarioWeight};

/// One measurement period j of the evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeriodFigures {
    /// e.g. `2026-11-25 08:00-09:00`.
    pub label: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// TA_i: completed transactions per scenario.
    pub transactions: BTreeMap<String, u64>,
    /// O_j: operational carbon.
    pub operational_g: f64,
    /// M_j: embodied carbon apportioned to the period.
    pub embodied_g: f64,
    /// R_j = sum alpha_i TA_i.
    pub business_units: f64,
}

impl PeriodFigures {
    /// SCI_j = (O_j + M_j) / R_j; None when the period had no business.
    pub fn sci_g_per_unit(&self) -> Option<f64> {
        (self.business_units > 0.0)
            .then(|| (self.operational_g + self.embodied_g) / self.business_units)
    }
}

/// The evaluation's SCI_CF: the mean of the per-period SCI_j (periods
/// without business left out, as SCI_j is undefined there).
pub fn mean_sci(periods: &[PeriodFigures]) -> Option<f64> {
    let values: Vec<f64> = periods
        .iter()
        .filter_map(PeriodFigures::sci_g_per_unit)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Pooled over the whole evaluation: (sum O + sum M) / sum R (disclosed beside the mean).
pub fn pooled_sci(periods: &[PeriodFigures]) -> Option<f64> {
    let units: f64 = periods.iter().map(|p| p.business_units).sum();
    let carbon: f64 = periods.iter().map(|p| p.operational_g + p.embodied_g).sum();
    (units > 0.0).then(|| carbon / units)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostRow {
    pub host: String,
    pub region: Option<String>,
    pub cpu_utilisation: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub transactions: u64,
}

/// A flame graph SVG (from [`crate::profiles::MergedProfile::flamegraph_svg`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlameGraphPanel {
    pub service: String,
    pub scenario: String,
    pub svg: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DashboardData {
    pub title: String,
    /// When the page was generated (shown as given).
    pub generated_at: String,
    pub periods: Vec<PeriodFigures>,
    pub scenarios: Vec<ScenarioWeight>,
    pub hosts: Vec<HostRow>,
    pub hotspots: Vec<Hotspot>,
    pub flamegraphs: Vec<FlameGraphPanel>,
}

/// What the evaluation report discloses besides the figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvaluationReport {
    pub title: String,
    /// Platform / organisation evaluated.
    pub subject: String,
    pub generated_at: String,
    pub periods: Vec<PeriodFigures>,
    /// alpha_i used.
    pub weights: BTreeMap<String, f64>,
    /// How energy and carbon were measured (e.g. "RAPL via eBPF-attributed CPU time").
    pub method: String,
    /// (factor, value with unit and source), e.g. ("grid emission factor", "581 g/kWh, ...").
    pub factors: Vec<(String, String)>,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.decimals$}"))
}

const SCENARIO_ORDER: [&str; 4] = ["credit", "drawdown", "repayment", "query"];

/// Scenario columns: the standard's four, then any other seen, in name order.
fn scenario_columns(periods: &[PeriodFigures]) -> Vec<String> {
    let mut columns: Vec<String> = SCENARIO_ORDER.iter().map(|s| s.to_string()).collect();
    let mut others: Vec<String> = periods
        .iter()
        .flat_map(|p| p.transactions.keys())
        .filter(|s| !SCENARIO_ORDER.contains(&s.as_str()))
        .cloned()
        .collect();
    others.sort();
    others.dedup();
    columns.extend(others);
    columns
}

const STYLE: &str = "body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#1d2733;background:#fff}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dfe5ec;padding-bottom:4px}\
.meta{color:#5b6b7c;font-size:13px}\
.cards{display:flex;gap:16px;margin:16px 0}.card{border:1px solid #dfe5ec;border-radius:6px;padding:10px 16px;min-width:160px}\
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#5b6b7c}\
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dfe5ec;padding:4px 8px;text-align:right}\
th{background:#f3f6f9}td.l,th.l{text-align:left}tr.warn td{background:#fff4e5}\
ol.hot li{margin:6px 0}.kind{display:inline-block;font-size:11px;padding:1px 6px;border-radius:3px;background:#e8eef5;margin-right:6px}\
iframe.flame{border:1px solid #dfe5ec;margin:8px 0;width:100%;display:block}\
@media print{body{margin:10mm}.cards{break-inside:avoid}table{break-inside:auto}tr{break-inside:avoid}}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n{body}</body></html>\n",
        escape_html(title)
    )
}

/// Bar chart of SCI_j per period (g CO2e per business unit), with the mean as a line.
pub fn sci_chart_svg(periods: &[PeriodFigures]) -> String {
    let (width, height) = (900.0_f64, 260.0_f64);
    let (left, right, top, bottom) = (64.0, 16.0, 16.0, 48.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let values: Vec<Option<f64>> = periods.iter().map(PeriodFigures::sci_g_per_unit).collect();
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    let scale_max = if max > 0.0 { nice_ceiling(max) } else { 1.0 };
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"SCI_CF per period\" \
         font-family=\"sans-serif\" font-size=\"11\">"
    );
    for tick in 0..=4 {
        let value = scale_max * tick as f64 / 4.0;
        let y = top + plot_h - plot_h * tick as f64 / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#dfe5ec\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#5b6b7c\">{}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0,
            format_tick(value)
        );
    }
    let n = periods.len().max(1) as f64;
    let slot = plot_w / n;
    let bar_w = (slot * 0.7).max(1.0);
    for (i, (period, value)) in periods.iter().zip(&values).enumerate() {
        let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
        if let Some(v) = value {
            let h = plot_h * v / scale_max;
            let _ = write!(
                svg,
                "<rect class=\"bar\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" \
                 fill=\"#2f7d5b\"><title>{}: {v:.4} g/unit</title></rect>",
                top + plot_h - h,
                escape_html(&period.label)
            );
        }
        // Label every period when few, else about ten of them.
        let every = (periods.len() / 10).max(1);
        if i % every == 0 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1d2733\">{}</text>",
                left + slot * i as f64 + slot / 2.0,
                top + plot_h + 16.0,
                escape_html(&period.label)
            );
        }
    }
    if let Some(mean) = mean_sci(periods) {
        let y = top + plot_h - plot_h * mean / scale_max;
        let _ = write!(
            svg,
            "<line class=\"mean\" x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" \
             stroke=\"#c0392b\" stroke-dasharray=\"6 4\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#c0392b\">mean {mean:.4}</text>",
            left + plot_w,
            left + plot_w,
            y - 4.0
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#1d2733\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#5b6b7c\">\
         SCI_CF per period, gCO2e per business unit</text></svg>",
        top + plot_h,
        left + plot_w,
        top + plot_h,
        left + plot_w / 2.0,
        height - 8.0
    );
    svg
}

/// The smallest of 1, 2, 2.5, 5 x 10^k at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * magnitude >= value {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn format_tick(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else if value >= 0.1 {
        format!("{value:.3}")
    } else {
        format!("{value:.4}")
    }
}

fn periods_table(periods: &[PeriodFigures]) -> String {
    let columns = scenario_columns(periods);
    let mut html = String::from("<table class=\"periods\"><tr><th class=\"l\">period</th>");
    for c in &columns {
        let _ = write!(html, "<th>TA {}</th>", escape_html(c));
    }
    html.push_str(
        "<th>O (gCO2e)</th><th>M (gCO2e)</th><th>R (units)</th><th>SCI_j (g/unit)</th></tr>",
    );
    for p in periods {
        let _ = write!(html, "<tr><td class=\"l\">{}</td>", escape_html(&p.label));
        for c in &columns {
            let _ = write!(
                html,
                "<td>{}</td>",
                p.transactions.get(c).copied().unwrap_or(0)
            );
        }
        let _ = write!(
            html,
            "<td>{:.2}</td><td>{:.2}</td><td>{:.0}</td><td>{}</td></tr>",
            p.operational_g,
            p.embodied_g,
            p.business_units,
            fmt_opt(p.sci_g_per_unit(), 5)
        );
    }
    html.push_str("</table>");
    html
}

fn summary_cards(periods: &[PeriodFigures]) -> String {
    let o: f64 = periods.iter().map(|p| p.operational_g).sum();
    let m: f64 = periods.iter().map(|p| p.embodied_g).sum();
    let r: f64 = periods.iter().map(|p| p.business_units).sum();
    format!(
        "<div class=\"cards\">\
         <div class=\"card\"><div class=\"v\" id=\"sci-mean\">{}</div><div class=\"k\">SCI_CF (mean of SCI_j), g/unit</div></div>\
         <div class=\"card\"><div class=\"v\" id=\"sci-pooled\">{}</div><div class=\"k\">pooled (ΣO+ΣM)/ΣR, g/unit</div></div>\
         <div class=\"card\"><div class=\"v\">{:.1}</div><div class=\"k\">O + M, gCO2e</div></div>\
         <div class=\"card\"><div class=\"v\">{:.0}</div><div class=\"k\">R, business units</div></div>\
         <div class=\"card\"><div class=\"v\">{}</div><div class=\"k\">periods</div></div></div>",
        fmt_opt(mean_sci(periods), 5),
        fmt_opt(pooled_sci(periods), 5),
        o + m,
        r,
        periods.len()
    )
}

fn scenarios_table(scenarios: &[ScenarioWeight]) -> String {
    let mut html = String::from(
        "<table class=\"scenarios\"><tr><th class=\"l\">scenario</th><th>transactions</th>\
         <th>carbon (gCO2e)</th><th>g per transaction</th><th>measured weight (× query)</th>\
         <th>standard weight α</th><th>measured / standard</th></tr>",
    );
    for s in scenarios {
        let warn = s.gap_factor.is_some_and(|g| g > 1.25);
        let _ = write!(
            html,
            "<tr{}><td class=\"l\">{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if warn { " class=\"warn\"" } else { "" },
            escape_html(&s.scenario),
            s.transactions,
            s.carbon_g,
            fmt_opt(s.carbon_per_transaction_g, 5),
            fmt_opt(s.measured_weight, 1),
            fmt_opt(s.standard_weight, 0),
            fmt_opt(s.gap_factor, 2)
        );
    }
    html.push_str("</table>");
    html
}

fn hosts_table(hosts: &[HostRow]) -> String {
    let mut html = String::from(
        "<table class=\"hosts\"><tr><th class=\"l\">host</th><th class=\"l\">region</th>\
         <th>CPU %</th><th>energy (kJ)</th><th>idle energy %</th><th>carbon (gCO2e)</th>\
         <th>embodied (gCO2e)</th><th>transactions</th></tr>",
    );
    for h in hosts {
        let idle_pct = if h.energy_j > 0.0 {
            100.0 * h.idle_energy_j / h.energy_j
        } else {
            0.0
        };
        let _ = write!(
            html,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{:.1}</td><td>{:.1}</td>\
             <td>{:.0}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
            escape_html(&h.host),
            escape_html(h.region.as_deref().unwrap_or("–")),
            h.cpu_utilisation * 100.0,
            h.energy_j / 1000.0,
            idle_pct,
            h.carbon_g,
            h.embodied_g,
            h.transactions
        );
    }
    html.push_str("</table>");
    html
}

fn hotspot_list(hotspots: &[Hotspot]) -> String {
    if hotspots.is_empty() {
        return "<p>No hotspot found in this period.</p>".into();
    }
    let mut html = String::from("<ol class=\"hot\">");
    for h in hotspots {
        let figures: Vec<String> = h
            .evidence
            .figures
            .iter()
            .map(|(k, v)| format!("{}={}", escape_html(k), format_figure(*v)))
            .collect();
        let _ = write!(
            html,
            "<li><span class=\"kind\">{}</span><b>{}</b> – {:.2} gCO2e at stake<br>{}<br>\
             <span class=\"meta\">{}</span></li>",
            h.kind.as_str(),
            escape_html(&h.subject),
            h.impact_carbon_g,
            escape_html(&h.recommendation),
            figures.join(", ")
        );
    }
    html.push_str("</ol>");
    html
}

fn format_figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Height in pixels from an SVG's `height="N"` attribute (inferno writes one).
fn svg_height_px(svg: &str) -> Option<u32> {
    let start = svg.find("<svg")?;
    let tag = &svg[start..start + svg[start..].find('>')?];
    let value = tag.split(" height=\"").nth(1)?;
    value[..value.find('"')?]
        .parse::<f64>()
        .ok()
        .map(|h| h.ceil() as u32)
}

/// A flame graph in an `<iframe srcdoc>`: inferno's SVG brings its own
/// script (zoom, search, label fitting) and global CSS, which must neither
/// touch the page's charts nor clash with a second flame graph's ids.
fn flame_graph_frame(title: &str, svg: &str) -> String {
    let start = svg.find("<svg").unwrap_or(0);
    let document = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>body{{margin:0}}\
         svg{{width:100%;height:auto}}</style></head><body>{}</body></html>",
        &svg[start..]
    );
    format!(
        "<iframe class=\"flame\" title=\"{}\" style=\"height:{}px\" srcdoc=\"{}\"></iframe>",
        escape_html(title),
        svg_height_px(svg).unwrap_or(400) + 8,
        escape_html(&document)
    )
}

/// The fleet dashboard page.
pub fn render_dashboard(data: &DashboardData) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><div class=\"meta\">generated {} · SCI_CF = (O + M) / R, R = Σ α_i·TA_i \
         (T/CQJR 032.2—2025)</div>",
        escape_html(&data.title),
        escape_html(&data.generated_at)
    );
    body.push_str(&summary_cards(&data.periods));
    body.push_str("<h2>Fleet SCI_CF per period</h2>");
    body.push_str(&sci_chart_svg(&data.periods));
    body.push_str("<h2>Carbon per transaction by scenario</h2>");
    body.push_str(&scenarios_table(&data.scenarios));
    body.push_str("<h2>Hotspots</h2>");
    body.push_str(&hotspot_list(&data.hotspots));
    body.push_str("<h2>Hosts</h2>");
    body.push_str(&hosts_table(&data.hosts));
    body.push_str("<h2>Periods</h2>");
    body.push_str(&periods_table(&data.periods));
    if !data.flamegraphs.is_empty() {
        body.push_str("<h2>Energy flame graphs</h2>");
        for panel in &data.flamegraphs {
            let title = format!("{} / {}", panel.service, panel.scenario);
            let _ = write!(
                body,
                "<h3>{}</h3>{}",
                escape_html(&title),
                flame_graph_frame(&format!("energy flame graph {title}"), &panel.svg)
            );
        }
    }
    page(&data.title, &body)
}

/// Weights, heaviest first (the standard's order for its four scenarios).
fn sorted_weights(report: &EvaluationReport) -> Vec<(String, f64)> {
    let mut weights: Vec<(String, f64)> = report
        .weights
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    weights.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    weights
}

/// The printable evaluation report (HTML).
pub fn render_evaluation_report_html(report: &EvaluationReport) -> String {
    let weights = sorted_weights(report);
    let factors = &report.factors;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><div class=\"meta\">{} · generated {}</div>",
        escape_html(&report.title),
        escape_html(&report.subject),
        escape_html(&report.generated_at)
    );
    body.push_str(&summary_cards(&report.periods));
    body.push_str("<h2>Result</h2><table class=\"result\">");
    let _ = write!(
        body,
        "<tr><th class=\"l\">SCI_CF (mean of SCI_j over {} periods)</th><td>{} gCO2e/unit</td></tr>\
         <tr><th class=\"l\">pooled (ΣO+ΣM)/ΣR</th><td>{} gCO2e/unit</td></tr></table>",
        report.periods.iter().filter(|p| p.sci_g_per_unit().is_some()).count(),
        fmt_opt(mean_sci(&report.periods), 5),
        fmt_opt(pooled_sci(&report.periods), 5)
    );
    body.push_str("<h2>Measurement periods</h2>");
    body.push_str(&periods_table(&report.periods));
    body.push_str(&sci_chart_svg(&report.periods));
    body.push_str("<h2>Method</h2>");
    let _ = write!(body, "<p>{}</p>", escape_html(&report.method));
    body.push_str("<h2>Weights α_i</h2><table class=\"weights\"><tr><th class=\"l\">scenario</th><th>α</th></tr>");
    for (scenario, weight) in &weights {
        let _ = write!(
            body,
            "<tr><td class=\"l\">{}</td><td>{weight}</td></tr>",
            escape_html(scenario)
        );
    }
    body.push_str("</table><h2>Factors</h2><table class=\"factors\"><tr><th class=\"l\">factor</th><th class=\"l\">value</th></tr>");
    for (name, value) in factors {
        let _ = write!(
            body,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
            escape_html(name),
            escape_html(value)
        );
    }
    body.push_str("</table>");
    page(&report.title, &body)
}

fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The same evaluation report in Markdown.
pub fn render_evaluation_report_markdown(report: &EvaluationReport) -> String {
    let weights = sorted_weights(report);
    let factors = &report.factors;
    let columns = scenario_columns(&report.periods);
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", md_cell(&report.title));
    let _ = writeln!(
        md,
        "{} · generated {}\n",
        md_cell(&report.subject),
        md_cell(&report.generated_at)
    );
    let _ = writeln!(
        md,
        "**SCI_CF (mean of SCI_j): {} gCO2e per business unit**; pooled (ΣO+ΣM)/ΣR: {} gCO2e per unit.\n",
        fmt_opt(mean_sci(&report.periods), 5),
        fmt_opt(pooled_sci(&report.periods), 5)
    );
    md.push_str("## Measurement periods\n\n| period |");
    for c in &columns {
        let _ = write!(md, " TA {} |", md_cell(c));
    }
    md.push_str(" O (gCO2e) | M (gCO2e) | R (units) | SCI_j (g/unit) |\n|---|");
    for _ in &columns {
        md.push_str("---:|");
    }
    md.push_str("---:|---:|---:|---:|\n");
    for p in &report.periods {
        let _ = write!(md, "| {} |", md_cell(&p.label));
        for c in &columns {
            let _ = write!(md, " {} |", p.transactions.get(c).copied().unwrap_or(0));
        }
        let _ = writeln!(
            md,
            " {:.2} | {:.2} | {:.0} | {} |",
            p.operational_g,
            p.embodied_g,
            p.business_units,
            fmt_opt(p.sci_g_per_unit(), 5)
        );
    }
    let _ = writeln!(md, "\n## Method\n\n{}\n", report.method);
    md.push_str("## Weights α_i\n\n| scenario | α |\n|---|---:|\n");
    for (scenario, weight) in &weights {
        let _ = writeln!(md, "| {} | {weight} |", md_cell(scenario));
    }
    md.push_str("\n## Factors\n\n| factor | value |\n|---|---|\n");
    for (name, value) in factors {
        let _ = writeln!(md, "| {} | {} |", md_cell(name), md_cell(value));
    }
    md
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hotspots::{Evidence, HotspotKind};

    fn period(label: &str, credit: u64, query: u64, o: f64, m: f64) -> PeriodFigures {
        PeriodFigures {
            label: label.into(),
            start_unix_ns: 0,
            end_unix_ns: 3_600_000_000_000,
            transactions: BTreeMap::from([
                ("credit".to_string(), credit),
                ("query".to_string(), query),
            ]),
            operational_g: o,
            embodied_g: m,
            business_units: 24.0 * credit as f64 + query as f64,
        }
    }

    /// Period 1: R = 24*10 + 260 = 500, (40 + 10) / 500 = 0.1.
    /// Period 2: R = 24*5 + 80 = 200, (50 + 10) / 200 = 0.3.
    /// Period 3: no business, left out of the mean.
    /// Mean = 0.2; pooled = (40+10+50+10+3+1) / 700 = 114/700.
    fn periods() -> Vec<PeriodFigures> {
        vec![
            period("08:00", 10, 260, 40.0, 10.0),
            period("09:00", 5, 80, 50.0, 10.0),
            period("10:00", 0, 0, 3.0, 1.0),
        ]
    }

    #[test]
    fn mean_and_pooled_follow_the_standard() {
        let p = periods();
        assert!((p[0].sci_g_per_unit().unwrap() - 0.1).abs() < 1e-12);
        assert!((p[1].sci_g_per_unit().unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(p[2].sci_g_per_unit(), None);
        assert!((mean_sci(&p).unwrap() - 0.2).abs() < 1e-12);
        assert!((pooled_sci(&p).unwrap() - 114.0 / 700.0).abs() < 1e-12);
        assert_eq!(mean_sci(&[]), None);
    }

    #[test]
    fn chart_bars_are_proportional_to_sci() {
        let svg = sci_chart_svg(&periods());
        // Max 0.3 -> axis 0.5; plot height 196: bars 39.2 and 117.6, none for 10:00.
        let heights: Vec<f64> = svg
            .split("<rect class=\"bar\"")
            .skip(1)
            .map(|rect| {
                let h = rect.split("height=\"").nth(1).unwrap();
                h[..h.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert_eq!(heights, vec![39.2, 117.6]);
        // The mean line at 0.2: y = 16 + 196 - 78.4 = 133.6.
        assert!(svg.contains("<line class=\"mean\" x1=\"64\" y1=\"133.6\""));
        assert!(svg.contains(">mean 0.2000<"));
    }

    #[test]
    fn dashboard_escapes_data_and_inlines_flame_graphs() {
        let data = DashboardData {
            title: "Fleet <east>".into(),
            generated_at: "2026-11-25".into(),
            periods: periods(),
            scenarios: crate::hotspots::scenario_weights(&[]),
            hosts: vec![HostRow {
                host: "app-1".into(),
                region: Some("east".into()),
                cpu_utilisation: 0.5,
                energy_j: 2000.0,
                idle_energy_j: 500.0,
                carbon_g: 1.0,
                embodied_g: 0.5,
                transactions: 10,
            }],
            hotspots: vec![Hotspot {
                kind: HotspotKind::IdleHost,
                subject: "spare-1".into(),
                impact_carbon_g: 9.0,
                evidence: Evidence {
                    period_start_unix_ns: 0,
                    period_end_unix_ns: 1,
                    figures: vec![("cpu_utilisation".into(), 0.02)],
                },
                recommendation: "consolidate: <script>alert(1)</script>".into(),
            }],
            flamegraphs: vec![FlameGraphPanel {
                service: "loan-api".into(),
                scenario: "credit".into(),
                svg: "<?xml version=\"1.0\"?><!DOCTYPE svg><svg id=\"fg\" height=\"166\"><script>init()</script><g/></svg>".into(),
            }],
        };
        let html = render_dashboard(&data);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<title>Fleet &lt;east&gt;</title>"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        // The flame graph (and its script) lives in its own document: 166 px + 8.
        assert!(html.contains(
            "<iframe class=\"flame\" title=\"energy flame graph loan-api / credit\" \
             style=\"height:174px\" srcdoc=\"&lt;!DOCTYPE html&gt;"
        ));
        assert!(html.contains(
            "&lt;body&gt;&lt;svg id=&quot;fg&quot; height=&quot;166&quot;&gt;\
             &lt;script&gt;init()&lt;/script&gt;&lt;g/&gt;&lt;/svg&gt;&lt;/body&gt;"
        ));
        assert!(!html.contains("<?xml"));
        assert!(html.contains("<div class=\"v\" id=\"sci-mean\">0.20000</div>"));
        assert!(html.contains("<div class=\"v\" id=\"sci-pooled\">0.16286</div>"));
        // Host row: 25% idle energy, 2.0 kJ.
        assert!(html.contains("<td>50.0</td><td>2.0</td><td>25</td>"));
        // Self-contained: nothing loaded from elsewhere; the only URL is the SVG namespace.
        assert!(!html.contains("src=") && !html.contains("<link") && !html.contains("<script"));
        assert_eq!(
            html.matches("http://").count(),
            html.matches("http://www.w3.org/2000/svg").count()
        );
    }

    fn report() -> EvaluationReport {
        EvaluationReport {
            title: "SCI_CF evaluation".into(),
            subject: "demo platform".into(),
            generated_at: "2026-11-25".into(),
            periods: periods(),
            weights: BTreeMap::from([
                ("credit".to_string(), 24.0),
                ("drawdown".to_string(), 7.0),
                ("repayment".to_string(), 3.0),
                ("query".to_string(), 1.0),
            ]),
            method: "eBPF CPU time x RAPL energy".into(),
            factors: vec![("grid emission factor".into(), "581 g/kWh".into())],
        }
    }

    #[test]
    fn markdown_report_has_the_periods_and_the_mean() {
        let md = render_evaluation_report_markdown(&report());
        assert!(md.contains("**SCI_CF (mean of SCI_j): 0.20000 gCO2e per business unit**"));
        assert!(md.contains("pooled (ΣO+ΣM)/ΣR: 0.16286"));
        assert!(md.contains(
            "| period | TA credit | TA drawdown | TA repayment | TA query | O (gCO2e) | M (gCO2e) | R (units) | SCI_j (g/unit) |"
        ));
        assert!(md.contains("| 08:00 | 10 | 0 | 0 | 260 | 40.00 | 10.00 | 500 | 0.10000 |"));
        assert!(md.contains("| 10:00 | 0 | 0 | 0 | 0 | 3.00 | 1.00 | 0 | – |"));
        // Weights in the standard's order.
        let credit = md.find("| credit | 24 |").unwrap();
        let query = md.find("| query | 1 |").unwrap();
        assert!(credit < query);
        assert!(md.contains("| grid emission factor | 581 g/kWh |"));
    }

    #[test]
    fn html_report_carries_the_same_figures() {
        let html = render_evaluation_report_html(&report());
        assert!(html.contains("SCI_CF (mean of SCI_j over 2 periods)</th><td>0.20000 gCO2e/unit"));
        assert!(html.contains("<td class=\"l\">08:00</td><td>10</td><td>0</td><td>0</td><td>260</td><td>40.00</td><td>10.00</td><td>500</td><td>0.10000</td>"));
        assert!(html
            .contains("<td class=\"l\">grid emission factor</td><td class=\"l\">581 g/kWh</td>"));
        assert!(html.contains("eBPF CPU time x RAPL energy"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(0.12), 0.2);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
    }
}
