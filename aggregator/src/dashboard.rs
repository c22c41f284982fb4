//! Server-rendered HTML: the fleet dashboard and the printable evaluation
//! report (Appendix A of the standard). Both render the one
//! [`Evaluation`] (the Markdown report is [`crate::report::markdown`]).
//!
//! One self-contained page each: inline CSS, charts drawn here as inline SVG,
//! no script, nothing fetched from elsewhere. Pages are maud templates: every
//! value from the data is escaped by the template engine; the only text
//! inserted unescaped is this file's own CSS. [`crate::hotspots`] and
//! [`crate::profiles`] supply the hotspot list and flame graphs. Figures
//! print as [`crate::figures`] says; the chart's axis is labelled in the
//! mass unit of its top tick.
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::figures::{
    count, energy_j, evidence_figure, mass_g, mass_unit, opt_of_kind, percent, sig4, Kind,
};
use crate::hotspots::Hotspot;
use crate::report::{disclosure_cells, unix_to_text, DISCLOSURE_COLUMNS};
use crate::sci::{mean_sci, pooled_sci, Disclosure, Evaluation, PeriodFigures};

/// A flame graph SVG (from [`crate::profiles::MergedProfile::flamegraph_svg`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlameGraphPanel {
    pub service: String,
    pub scenario: String,
    /// Samples behind it (shown with the graph).
    pub samples: u64,
    pub svg: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DashboardData {
    pub title: String,
    /// When the page was generated (shown as given).
    pub generated_at: String,
    pub evaluation: Evaluation,
    pub hotspots: Vec<Hotspot>,
    pub flamegraphs: Vec<FlameGraphPanel>,
    /// Profiles withheld (too few samples), each with the reason.
    pub withheld: Vec<String>,
}

fn fmt_opt(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), sig4)
}

/// An SVG coordinate: one decimal.
fn px(v: f64) -> String {
    format!("{v:.1}")
}

/// A period's label: its start, RFC 3339.
pub fn period_label(p: &PeriodFigures) -> String {
    unix_to_text(p.start_unix_s)
}

const SCENARIO_ORDER: [&str; 4] = agent_common::SCENARIO_NAMES;

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

fn periods_table(periods: &[PeriodFigures]) -> Markup {
    let columns = scenario_columns(periods);
    html! {
        table class="periods" {
            tr {
                th class="l" { "period" }
                th { "coverage" }
                @for c in &columns { th { "TA " (c) } }
                th { "O (CO2e)" } th { "M (CO2e)" } th { "R (units)" } th { "SCI_j (CO2e/unit)" }
                th class="l" { "in SCI_CF" }
            }
            @for p in periods {
                tr class=[(!p.in_mean).then_some("warn")] {
                    td class="l" { (period_label(p)) }
                    td { (percent(p.coverage)) }
                    @for c in &columns {
                        td { (count(p.transactions.get(c).copied().unwrap_or(0.0))) }
                    }
                    td { (mass_g(p.operational_g)) }
                    td { (mass_g(p.embodied_g)) }
                    td { (count(p.business_units)) }
                    td { (opt_of_kind(p.sci_g_per_unit, Kind::MassG)) }
                    td class="l" {
                        @if p.in_mean { "yes" } @else { "no: " (p.excluded_reason.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

fn summary_cards(e: &Evaluation) -> Markup {
    let covered = e.periods.iter().filter(|p| p.covered);
    let (om, r) = covered.fold((0.0, 0.0), |(c, r), p| {
        (c + p.operational_g + p.embodied_g, r + p.business_units)
    });
    let card = |id: Option<&str>, value: String, key: &str| {
        html! {
            div class="card" { div class="v" id=[id] { (value) } div class="k" { (key) } }
        }
    };
    html! {
        div class="cards" {
            (card(Some("sci-mean"), opt_of_kind(mean_sci(&e.periods), Kind::MassG), "SCI_CF (mean of SCI_j), CO2e per business unit"))
            (card(Some("sci-pooled"), opt_of_kind(pooled_sci(&e.periods), Kind::MassG), "pooled (ΣO+ΣM)/ΣR, CO2e per business unit"))
            (card(Some("om"), mass_g(om), "O + M (covered periods)"))
            (card(Some("r"), count(r), "R, business units"))
            (card(None, format!("{} / {}", e.periods_in_mean, e.periods.len()), "periods in SCI_CF / with data"))
        }
        @if let Some(note) = &e.coverage_note {
            p class="meta" id="coverage-note" { "Coverage: " (note) "." }
        }
    }
}

fn scenarios_table(e: &Evaluation) -> Markup {
    html! {
        table class="scenarios" {
            tr {
                th class="l" { "scenario" } th { "transactions" }
                th { "dynamic energy" } th { "idle share" } th { "total energy" }
                th { "carbon" } th { "embodied" } th { "per transaction" } th { "measured weight (× query)" }
                th { "standard weight α" } th { "measured / standard" }
            }
            @for s in &e.scenarios {
                @let gap = match (s.measured_weight, s.standard_weight) {
                    (Some(m), w) if w > 0.0 => Some(m / w),
                    _ => None,
                };
                tr class=[gap.is_some_and(|g| g > 1.25).then_some("warn")] {
                    td class="l" { (s.scenario) }
                    td { (count(s.transactions)) }
                    td { (energy_j(s.energy_j)) }
                    td { (energy_j(s.idle_energy_j)) }
                    td { (energy_j(s.total_energy_j)) }
                    td { (mass_g(s.carbon_g)) }
                    td { (mass_g(s.embodied_g)) }
                    td { (s.per_transaction_text()) }
                    td { (fmt_opt(s.measured_weight)) }
                    td { @if s.standard_weight > 0.0 { (sig4(s.standard_weight)) } @else { "–" } }
                    td { (fmt_opt(gap)) }
                }
            }
        }
    }
}

fn hosts_table(e: &Evaluation) -> Markup {
    html! {
        table class="hosts" {
            tr {
                th class="l" { "host" } th class="l" { "region" }
                th { "CPU %" } th { "energy" } th { "idle energy %" } th { "carbon" }
                th { "embodied" } th { "transactions" }
            }
            @for h in &e.hosts {
                @let idle = if h.energy_j > 0.0 { h.idle_energy_j / h.energy_j } else { 0.0 };
                tr {
                    td class="l" { (h.host) }
                    td class="l" { (h.datacenter) }
                    td { (sig4(h.cpu_utilisation * 100.0)) }
                    td { (energy_j(h.energy_j)) }
                    td { (sig4(idle * 100.0)) }
                    td { (mass_g(h.carbon_g)) }
                    td { (mass_g(h.embodied_g)) }
                    td { (count(h.transactions)) }
                }
            }
        }
    }
}

/// The factors behind the figures, one row per data centre.
pub fn disclosure_table(rows: &[Disclosure]) -> Markup {
    html! {
        table class="disclosure" {
            tr { @for c in DISCLOSURE_COLUMNS { th class="l" { (c) } } }
            @for d in rows {
                tr { @for c in disclosure_cells(d) { td class="l" { (c) } } }
            }
        }
    }
}

const STYLE: &str = "body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#1d2733;background:#fff}\
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dfe5ec;padding-bottom:4px}\
.meta{color:#5b6b7c;font-size:13px}\
.cards{display:flex;gap:16px;margin:16px 0}.card{border:1px solid #dfe5ec;border-radius:6px;padding:10px 16px;min-width:160px}\
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#5b6b7c}\
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dfe5ec;padding:4px 8px;text-align:right}\
th{background:#f3f6f9}td.l,th.l{text-align:left}tr.warn td{background:#fff4e5}\
ol.hot li{margin:6px 0}.kind{display:inline-block;font-size:11px;padding:1px 6px;border-radius:3px;background:#e8eef5;margin-right:6px}\
iframe.flame{border:1px solid #dfe5ec;margin:8px 0;width:100%;box-sizing:border-box;display:block}\
@media print{body{margin:10mm}.cards{break-inside:avoid}table{break-inside:auto}tr{break-inside:avoid}}";

/// A whole page: `title` in the head and as given, `body` below.
pub(crate) fn page(title: &str, body: Markup) -> String {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    };
    page.into_string() + "\n"
}

/// Bar chart of SCI_j per period (g CO2e per business unit), with the mean as a line.
/// SVG elements without content are written with a closing tag (`<line></line>`):
/// inline SVG in HTML does not read `<line>` as empty.
pub fn sci_chart_svg(periods: &[PeriodFigures]) -> Markup {
    let (width, height) = (900.0_f64, 260.0_f64);
    let (left, right, top, bottom) = (64.0, 16.0, 16.0, 48.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let values: Vec<Option<f64>> = periods.iter().map(|p| p.sci_g_per_unit).collect();
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    let scale_max = if max > 0.0 { nice_ceiling(max) } else { 1.0 };
    // Ticks print as plain numbers in the unit of the top one (µg for 5e-5 g).
    let (unit_g, unit) = mass_unit(scale_max);
    let n = periods.len().max(1) as f64;
    let slot = plot_w / n;
    let bar_w = (slot * 0.7).max(1.0);
    // Label every period when few, else about ten of them.
    let every = (periods.len() / 10).max(1);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (width) " " (height) }
            width=(width) height=(height) role="img" aria-label="SCI_CF per period"
            font-family="sans-serif" font-size="11" {
            @for tick in 0..=4 {
                @let value = scale_max * tick as f64 / 4.0;
                @let y = top + plot_h - plot_h * tick as f64 / 4.0;
                line x1=(left) y1=(px(y)) x2=(px(left + plot_w)) y2=(px(y)) stroke="#dfe5ec" {}
                text class="tick" x=(px(left - 6.0)) y=(px(y + 4.0)) text-anchor="end" fill="#5b6b7c" {
                    (sig4(value / unit_g))
                }
            }
            @for (i, (period, value)) in periods.iter().zip(&values).enumerate() {
                @if let Some(v) = value {
                    @let h = plot_h * v / scale_max;
                    // Periods left out of SCI_CF (coverage) are drawn grey.
                    @let (class, fill) = if period.in_mean { ("bar", "#2f7d5b") } else { ("bar-excluded", "#b8c2cc") };
                    rect class=(class) x=(px(left + slot * i as f64 + (slot - bar_w) / 2.0))
                        y=(px(top + plot_h - h)) width=(px(bar_w)) height=(px(h)) fill=(fill) {
                        title { (period_label(period)) ": " (mass_g(*v)) " CO2e per business unit" }
                    }
                }
                @if i % every == 0 {
                    text x=(px(left + slot * i as f64 + slot / 2.0)) y=(px(top + plot_h + 16.0))
                        text-anchor="middle" fill="#1d2733" { (period_label(period)) }
                }
            }
            @if let Some(mean) = mean_sci(periods) {
                @let y = top + plot_h - plot_h * mean / scale_max;
                line class="mean" x1=(left) y1=(px(y)) x2=(px(left + plot_w)) y2=(px(y))
                    stroke="#c0392b" stroke-dasharray="6 4" stroke-width="2" {}
                text x=(px(left + plot_w)) y=(px(y - 4.0)) text-anchor="end" fill="#c0392b" {
                    "mean " (mass_g(mean))
                }
            }
            line x1=(left) y1=(px(top + plot_h)) x2=(px(left + plot_w)) y2=(px(top + plot_h)) stroke="#1d2733" {}
            text x=(px(left + plot_w / 2.0)) y=(px(height - 8.0)) text-anchor="middle" fill="#5b6b7c" {
                "SCI_CF per period, " (unit) "CO2e per business unit"
            }
        }
    }
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

fn hotspot_list(hotspots: &[Hotspot]) -> Markup {
    html! {
        @if hotspots.is_empty() {
            p { "No hotspot found in this period." }
        } @else {
            ol class="hot" {
                @for h in hotspots {
                    li {
                        span class="kind" { (h.kind.as_str()) }
                        b { (h.subject) }
                        " – " (mass_g(h.impact_carbon_g)) " CO2e at stake"
                        br;
                        (h.recommendation)
                        br;
                        span class="meta" {
                            @for (i, (k, v)) in h.evidence.figures.iter().enumerate() {
                                @if i > 0 { ", " }
                                (k) "=" (evidence_figure(*v))
                            }
                        }
                    }
                }
            }
        }
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
/// touch the page's charts nor clash with a second flame graph's ids. The
/// frame's document is an attribute value, so the template escapes it whole.
pub(crate) fn flame_graph_frame(title: &str, svg: &str) -> Markup {
    let start = svg.find("<svg").unwrap_or(0);
    let document = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>body{{margin:0}}\
         svg{{width:100%;height:auto}}</style></head><body>{}</body></html>",
        &svg[start..]
    );
    let height = svg_height_px(svg).unwrap_or(400) + 8;
    html! {
        iframe class="flame" title=(title) style={ "height:" (height) "px" } srcdoc=(document) {}
    }
}

/// The fleet dashboard page.
pub fn render_dashboard(data: &DashboardData) -> String {
    let e = &data.evaluation;
    let body = html! {
        h1 { (data.title) }
        div class="meta" {
            "generated " (data.generated_at)
            " · SCI_CF = (O + M) / R, R = Σ α_i·TA_i (T/CQJR 032.2—2025)"
        }
        (summary_cards(e))
        h2 { "Fleet SCI_CF per period" }
        (sci_chart_svg(&e.periods))
        h2 { "Carbon per transaction by scenario" }
        (scenarios_table(e))
        h2 { "Disclosure" }
        (disclosure_table(&e.disclosure))
        h2 { "Hotspots" }
        (hotspot_list(&data.hotspots))
        h2 { "Hosts" }
        (hosts_table(e))
        h2 { "Periods" }
        (periods_table(&e.periods))
        @if !data.flamegraphs.is_empty() || !data.withheld.is_empty() {
            h2 { "Energy flame graphs" }
            @for panel in &data.flamegraphs {
                @let title = format!("{} / {}", panel.service, panel.scenario);
                h3 { (title) " " span class="meta" { "(" (panel.samples) " samples)" } }
                (flame_graph_frame(&format!("energy flame graph {title}"), &panel.svg))
            }
            @for reason in &data.withheld {
                p class="meta withheld" { (reason) }
            }
        }
    };
    page(&data.title, body)
}

/// The printable evaluation report (HTML).
pub fn render_evaluation_report_html(e: &Evaluation, generated_at: &str) -> String {
    let title = "SCI_CF evaluation report (T/CQJR 032.2-2025, Appendix A)";
    let mut weights: Vec<(String, f64)> = e.weights.iter().map(|(k, v)| (k.clone(), *v)).collect();
    weights.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let body = html! {
        h1 { (title) }
        div class="meta" {
            (e.hosts.len()) " hosts · " (unix_to_text(e.from_unix_s)) " to " (unix_to_text(e.to_unix_s))
            " · generated " (generated_at)
        }
        (summary_cards(e))
        h2 { "Result" }
        table class="result" {
            tr {
                th class="l" { "SCI_CF (mean of SCI_j over " (e.periods_in_mean) " periods)" }
                td { (opt_of_kind(e.sci_cf_mean, Kind::MassG)) " CO2e/unit" }
            }
            tr {
                th class="l" { "pooled (ΣO+ΣM)/ΣR" }
                td { (opt_of_kind(e.sci_cf_pooled, Kind::MassG)) " CO2e/unit" }
            }
        }
        h2 { "Disclosure" }
        (disclosure_table(&e.disclosure))
        h2 { "Measurement periods" }
        (periods_table(&e.periods))
        (sci_chart_svg(&e.periods))
        h2 { "Scenarios" }
        (scenarios_table(e))
        h2 { "Method" }
        p { (e.method) }
        h2 { "Weights α_i" }
        table class="weights" {
            tr { th class="l" { "scenario" } th { "α" } }
            @for (scenario, weight) in &weights {
                tr { td class="l" { (scenario) } td { (count(*weight)) } }
            }
        }
    };
    page(title, body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::hotspots::{Evidence, HotspotKind};
    use crate::sci::{evaluate, EvaluationInput};
    use crate::store::{FleetRow, HostRow, HostSpan, Range, ScenarioRow};

    const HOUR: u64 = 3600;

    fn weights() -> BTreeMap<String, f64> {
        crate::config::standard_weights()
    }

    /// Rows of one fully covered host-hour with the given figures.
    fn rows(input: &mut EvaluationInput, j: u64, credit: u64, query: u64, o: f64, m: f64) {
        input.fleet.push(FleetRow {
            period: j,
            datacenter: "dc-1".into(),
            windows_ended: 1.0,
            host_s: HOUR as f64,
            energy_j: 1000.0,
            operational_g: o,
            embodied_g: m,
            ..Default::default()
        });
        for (scenario, n) in [("credit", credit), ("query", query)] {
            input.scenarios.push(ScenarioRow {
                period: j,
                datacenter: "dc-1".into(),
                scenario: scenario.into(),
                transactions: n as f64,
                ..Default::default()
            });
        }
    }

    /// Period 1: R = 24*10 + 260 = 500, (40 + 10) / 500 = 0.1.
    /// Period 2: R = 24*5 + 80 = 200, (50 + 10) / 200 = 0.3.
    /// Period 3: no business, left out of the mean.
    /// Mean = 0.2; pooled = (40+10+50+10+3+1) / 700 = 114/700.
    pub(crate) fn evaluation() -> Evaluation {
        let mut input = EvaluationInput::default();
        rows(&mut input, 8, 10, 260, 40.0, 10.0);
        rows(&mut input, 9, 5, 80, 50.0, 10.0);
        rows(&mut input, 10, 0, 0, 3.0, 1.0);
        input.hosts.push(HostRow {
            host: "app-1".into(),
            datacenter: "east".into(),
            host_s: 3.0 * HOUR as f64,
            energy_j: 2000.0,
            idle_energy_j: 500.0,
            carbon_g: 1.0,
            embodied_g: 0.5,
            busy_cpu_ns: 1.0,
            idle_cpu_ns: 1.0,
            transactions: 10.0,
            ..Default::default()
        });
        evaluate_hours(&mut input, 8, 11)
    }

    /// The evaluation of hours `from_h..to_h`, host app-1 covering them all.
    fn evaluate_hours(input: &mut EvaluationInput, from_h: u64, to_h: u64) -> Evaluation {
        input.spans.push(HostSpan {
            host: "app-1".into(),
            datacenter: "dc-1".into(),
            first_start_ns: from_h * HOUR * 1_000_000_000,
            last_end_ns: to_h * HOUR * 1_000_000_000,
        });
        let range = Range {
            from_s: from_h * HOUR,
            to_s: to_h * HOUR,
            period_s: HOUR,
        };
        evaluate(input, &range, (range.from_s, range.to_s), &weights(), 0.9)
    }

    #[test]
    fn mean_and_pooled_follow_the_standard() {
        let e = evaluation();
        let p = &e.periods;
        assert!((p[0].sci_g_per_unit.unwrap() - 0.1).abs() < 1e-12);
        assert!((p[1].sci_g_per_unit.unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(p[2].sci_g_per_unit, None);
        assert!((mean_sci(p).unwrap() - 0.2).abs() < 1e-12);
        assert!((pooled_sci(p).unwrap() - 114.0 / 700.0).abs() < 1e-12);
        assert_eq!(mean_sci(&[]), None);
        assert_eq!(e.sci_cf_mean, mean_sci(p));
    }

    /// #24: a card showed "2.110e-5"; every card is unit-scaled with 4
    /// significant digits. SCI_j of 2.11e-5 g in both covered periods (mean
    /// 21.10 µg); R x 10^4 (pooled 114 / 7,000,000 g = 16.29 µg).
    #[test]
    fn summary_cards_print_small_figures_in_their_unit() {
        let mut e = evaluation();
        for p in e.periods.iter_mut().filter(|p| p.sci_g_per_unit.is_some()) {
            p.sci_g_per_unit = Some(2.11e-5);
        }
        for p in &mut e.periods {
            p.business_units *= 1e4;
        }
        let html = summary_cards(&e).into_string();
        let card = |id: &str| {
            let at = html.find(&format!("id=\"{id}\">")).unwrap() + id.len() + 6;
            html[at..at + html[at..].find('<').unwrap()].to_string()
        };
        assert_eq!(card("sci-mean"), "21.10 µg");
        assert_eq!(card("sci-pooled"), "16.29 µg");
        assert_eq!(card("r"), "7000000");
        let scientific = html
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .filter(|w| w.contains("e-") && w.starts_with(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>();
        assert!(scientific.is_empty(), "{scientific:?} in {html}");
    }

    #[test]
    fn chart_bars_are_proportional_to_sci() {
        let svg = sci_chart_svg(&evaluation().periods).into_string();
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
        assert!(svg.contains(">mean 200.0 mg<"));
    }

    #[test]
    fn dashboard_escapes_data_and_inlines_flame_graphs() {
        let mut e = evaluation();
        e.hosts[0].host = "app-1".into();
        let data = DashboardData {
            title: "Fleet <east>".into(),
            generated_at: "2026-11-25".into(),
            evaluation: e,
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
                samples: 120,
                svg: "<?xml version=\"1.0\"?><!DOCTYPE svg><svg id=\"fg\" height=\"166\"><script>init()</script><g/></svg>".into(),
            }],
            withheld: vec!["loan-api/query: 12 samples, fewer than 50".into()],
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
        // 4 significant digits.
        assert!(html.contains("<div class=\"v\" id=\"sci-mean\">200.0 mg</div>"));
        assert!(html.contains("<div class=\"v\" id=\"sci-pooled\">162.9 mg</div>"));
        // Host row: 50% CPU, 2.0 kJ, 25% idle energy.
        assert!(
            html.contains("<td>50.00</td><td>2.000 kJ</td><td>25.00</td>"),
            "{html}"
        );
        // Sample count shown; a withheld profile says why.
        assert!(html.contains("(120 samples)"));
        assert!(html.contains("loan-api/query: 12 samples, fewer than 50"));
        // Self-contained: nothing loaded from elsewhere; the only URL is the SVG namespace.
        assert!(!html.contains("src=") && !html.contains("<link") && !html.contains("<script"));
        assert_eq!(
            html.matches("http://").count(),
            html.matches("http://www.w3.org/2000/svg").count()
        );
    }

    #[test]
    fn html_report_carries_the_same_figures() {
        let html = render_evaluation_report_html(&evaluation(), "2026-11-25");
        assert!(html.contains("SCI_CF (mean of SCI_j over 2 periods)</th><td>200.0 mg CO2e/unit"));
        assert!(html.contains(
            "<td class=\"l\">1970-01-01T08:00:00Z</td><td>100.0%</td><td>10</td><td>0</td><td>0</td><td>260</td><td>40.00 g</td><td>10.00 g</td><td>500</td><td>100.0 mg</td>"
        ), "{html}");
        assert!(html.contains("T/CQJR 032.2-2025 Appendix A"));
        assert!(html.contains("<table class=\"disclosure\">"));
    }

    /// The chart's tick labels, read back from the SVG, against the data:
    /// the axis title names the unit, the labels in that unit sit where
    /// their values fall, and each bar's top reads as its period's SCI_j.
    fn assert_axis_matches_data(page: &str, periods: &[PeriodFigures]) {
        let svg = &page[page.find("<svg").unwrap()..];
        let svg = &svg[..svg.find("</svg>").unwrap()];
        let title = "SCI_CF per period, ";
        let unit = &svg[svg.find(title).unwrap() + title.len()..];
        let unit = &unit[..unit.find("CO2e per business unit").unwrap()];
        let unit_g = match unit {
            "t" => 1e6,
            "kg" => 1e3,
            "g" => 1.0,
            "mg" => 1e-3,
            "µg" => 1e-6,
            other => panic!("axis unit {other:?}"),
        };
        let attr = |tag: &str, name: &str| -> f64 {
            let at = tag.rfind(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
        };
        // (y of the tick's grid line, value of its label in grams)
        let mut ticks: Vec<(f64, f64)> = Vec::new();
        let parts: Vec<&str> = svg.split("<text class=\"tick\"").collect();
        for (before, tick) in parts.iter().zip(&parts[1..]) {
            let line = &before[before.rfind("<line").unwrap()..];
            let label = &tick[tick.find('>').unwrap() + 1..tick.find("</text>").unwrap()];
            ticks.push((attr(line, "y1"), label.parse::<f64>().unwrap() * unit_g));
        }
        assert_eq!(ticks.len(), 5, "{svg}");
        let (y0, v0) = ticks[0];
        let (y4, v4) = ticks[4];
        assert_eq!(v0, 0.0);
        let value_at = |y: f64| v0 + (y - y0) * (v4 - v0) / (y4 - y0);
        for (y, v) in &ticks {
            assert!(
                (value_at(*y) - v).abs() <= 1e-3 * v4,
                "tick {v} at y {y}: {ticks:?}"
            );
        }
        let max = periods
            .iter()
            .filter_map(|p| p.sci_g_per_unit)
            .fold(0.0, f64::max);
        assert!(
            v4 >= max && v4 < 2.5 * max,
            "top tick {v4} for data up to {max}"
        );
        let bars: Vec<f64> = svg
            .split("<rect class=\"bar")
            .skip(1)
            .map(|rect| value_at(attr(&rect[..rect.find('>').unwrap()], "y")))
            .collect();
        let expected: Vec<f64> = periods.iter().filter_map(|p| p.sci_g_per_unit).collect();
        assert_eq!(bars.len(), expected.len());
        for (bar, want) in bars.iter().zip(&expected) {
            assert!(
                (bar - want).abs() <= 5e-3 * want,
                "bar reads {bar}, data {want}"
            );
        }
    }

    /// SCI_j of 4e-5 and 1e-5 g per unit: an axis to 5e-5 g, ticks every
    /// 1.25e-5 g, labelled 0, 12.50, 25.00, 37.50, 50.00 in µg.
    fn micrograms_evaluation() -> Evaluation {
        let mut input = EvaluationInput::default();
        rows(&mut input, 8, 10, 260, 0.015, 0.005);
        rows(&mut input, 9, 5, 80, 0.0015, 0.0005);
        evaluate_hours(&mut input, 8, 10)
    }

    #[test]
    fn chart_ticks_are_labelled_with_their_values() {
        let e = micrograms_evaluation();
        let svg = sci_chart_svg(&e.periods).into_string();
        let labels: Vec<&str> = svg
            .split("<text class=\"tick\"")
            .skip(1)
            .map(|t| &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()])
            .collect();
        assert_eq!(labels, ["0", "12.50", "25.00", "37.50", "50.00"]);
        assert!(svg.contains("SCI_CF per period, µgCO2e per business unit"));
        for e in [micrograms_evaluation(), evaluation()] {
            let data = DashboardData {
                title: "Fleet".into(),
                generated_at: "now".into(),
                evaluation: e.clone(),
                hotspots: vec![],
                flamegraphs: vec![],
                withheld: vec![],
            };
            assert_axis_matches_data(&render_dashboard(&data), &e.periods);
            assert_axis_matches_data(&render_evaluation_report_html(&e, "now"), &e.periods);
        }
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(0.12), 0.2);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
    }
}
