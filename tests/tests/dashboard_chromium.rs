//! The aggregator's dashboard in a real browser: headless Chromium loads
//! /dashboard served on loopback with windows sent through the real
//! forwarder, its DOM must show those figures (SCI_CF, transactions, a
//! host's energy, each computed by hand from the windows sent), and its screenshot is kept as
//! a test artifact (target/test-artifacts/dashboard.png).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::{run_forwarder, AggregatorConfig, ForwarderStats};
use sci_agent::sinks::spool::Spool;
use sci_proto::v1;
use sci_tests::fleet::{now_s, window, Aggregator};
use sci_tests::{provisioned_tool, workspace_root};
use tokio::sync::Notify;

fn chromium(args: &[String], profile: &Path) -> std::process::Output {
    Command::new("/usr/bin/chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap()
}

const WINDOWS: u64 = 12;
const WINDOW_ENERGY_J: f64 = 145.0;
/// Its carbon at the fixture's 530.6 g/kWh and PUE 1 (sci_tests::fleet::carbon_g).
const WINDOW_CARBON_G: f64 = WINDOW_ENERGY_J / 3.6e6 * sci_tests::fleet::INTENSITY_G_PER_KWH;
const WINDOW_EMBODIED_G: f64 = 0.25;
/// The standard's weights: credit, drawdown, repayment, query.
const WEIGHTS: [f64; 4] = [24.0, 7.0, 3.0, 1.0];

/// The text of an element, tags removed and entities decoded.
fn text_of(fragment: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in fragment.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
        .trim()
        .to_string()
}

/// The cells of each row of the first `<table class="CLASS">` in the DOM.
fn table(html: &str, class: &str) -> Vec<Vec<String>> {
    let open = format!("<table class=\"{class}\"");
    let start = html
        .find(&open)
        .unwrap_or_else(|| panic!("no table {class} in the DOM"));
    let body = &html[start..];
    let body = &body[..body.find("</table>").unwrap_or(body.len())];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            row.split("</t")
                .filter_map(|cell| {
                    let at = cell.rfind("<td").or_else(|| cell.rfind("<th"))?;
                    let inner = &cell[at..];
                    Some(text_of(&inner[inner.find('>')? + 1..]))
                })
                .collect()
        })
        .collect()
}

/// The cell of the row whose first cell is `row` in the column headed `column`.
fn cell(rows: &[Vec<String>], row: &str, column: &str) -> String {
    let header = &rows[0];
    let index = header
        .iter()
        .position(|h| h == column)
        .unwrap_or_else(|| panic!("no column {column:?} in {header:?}"));
    let found = rows
        .iter()
        .find(|r| r.first().map(String::as_str) == Some(row))
        .unwrap_or_else(|| panic!("no row {row:?} in {rows:?}"));
    found[index].clone()
}

/// The text of the summary card with id `id`.
fn card(html: &str, id: &str) -> String {
    let open = format!("id=\"{id}\"");
    let at = html
        .find(&open)
        .unwrap_or_else(|| panic!("no card {id} in the DOM"));
    let rest = &html[at..];
    let inner = &rest[rest.find('>').unwrap() + 1..];
    text_of(&inner[..inner.find('<').unwrap_or(inner.len())])
}

/// `shown` is `expected` rounded to the decimals the page shows. The page
/// scales units (`1.740 kJ`, `6.000 g`, `695.4 µg`): `expected` is in the
/// base unit (J or g) and the shown figure is brought back to it.
fn assert_shows(html: &str, what: &str, shown: &str, expected: f64) {
    let (number, unit) = shown.split_once(' ').unwrap_or((shown, ""));
    let factor = match unit.trim() {
        "" | "J" | "g" => 1.0,
        "GJ" => 1e9,
        "MJ" | "t" => 1e6,
        "kJ" | "kg" => 1e3,
        "mJ" | "mg" => 1e-3,
        "µg" => 1e-6,
        other => panic!("{what}: unknown unit {other:?} in {shown:?}"),
    };
    let value: f64 = number
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("{what}: {shown:?} is not a number"))
        * factor;
    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
    let half_last_digit = 0.5 * 10f64.powi(-(decimals as i32)) * factor;
    println!("{what}: the page shows {shown}, by hand {expected}");
    assert!(
        (value - expected).abs() <= half_last_digit * (1.0 + 1e-9),
        "{what}: the page shows {shown}, by hand {expected}\n{}",
        &html[..html.len().min(4000)]
    );
}

/// An aggregator (60 s periods, `extra` configuration) that knows loan-host-7.
fn loan_host_aggregator(dir: &Path, extra: &str) -> Aggregator {
    Aggregator::start(
        dir,
        60,
        &format!("{extra}[[agents]]\nhost = \"loan-host-7\"\ntoken = \"loan-host-7-token-0123\"\n"),
        true,
    )
}

/// Sends `windows` of loan-host-7 through the real forwarder and waits
/// until the aggregator has acknowledged them all.
async fn deliver(agg: &Aggregator, dir: &Path, windows: &[v1::WindowReport]) {
    let spool = Arc::new(Mutex::new(
        Spool::open(&dir.join("spool"), 1 << 26, "inst").unwrap(),
    ));
    let notify = Arc::new(Notify::new());
    let forwarder = tokio::spawn(run_forwarder(
        AggregatorConfig {
            url: Some(agg.url()),
            token: Some("loan-host-7-token-0123".into()),
            ..Default::default()
        },
        true,
        Arc::clone(&spool),
        Arc::clone(&notify),
        Arc::new(ForwarderStats::default()),
    ));
    for w in windows {
        spool.lock().unwrap().append(w).unwrap();
        notify.notify_one();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spool.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "windows not acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    forwarder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_real_data_in_chromium() {
    let Some(_) = provisioned_tool(
        Path::new("/usr/bin/chromium"),
        "dashboard_renders_real_data_in_chromium",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agg = loan_host_aggregator(dir.path(), "");
    let mut windows = Vec::new();
    let start = (now_s() / 60 - 4) * 60;
    // Four 60 s periods of three 20 s windows; queries grow by period so
    // that the mean of SCI_j and the pooled figure differ.
    let transactions = |i: u64| [2, 3, 5, 10 * (i / 3 + 1)];
    for i in 0..WINDOWS {
        let mut w = window(
            "loan-host-7",
            "inst",
            i,
            start + 20 * i,
            20,
            WINDOW_ENERGY_J,
            WINDOW_EMBODIED_G,
            transactions(i),
        );
        w.processes.push(v1::ProcessRecord {
            pid: 42,
            comm: "cf-credit".into(),
            service: "credit-svc".into(),
            scenario: "credit".into(),
            cpu_ns: 1_000_000_000,
            energy_j: 10.0,
            carbon_g: sci_tests::fleet::carbon_g(10.0, 1.0),
            ..Default::default()
        });
        w.profile.push(v1::ProfileStack {
            pid: 42,
            comm: "cf-credit".into(),
            service: "credit-svc".into(),
            scenario: "credit".into(),
            stack: "main;handle_application;score_risk".into(),
            samples: 30,
            energy_j: 6.0,
        });
        windows.push(w);
    }
    deliver(&agg, dir.path(), &windows).await;

    let to = now_s() + 1;
    let url = format!(
        "http://127.0.0.1:{}/dashboard?from={}&to={}&period=60",
        agg.http_port, start, to
    );
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(&["--dump-dom".into(), url.clone()], profile.path());
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("loan-host-7"),
        "hosts table: {}",
        &html[..html.len().min(2000)]
    );
    assert!(html.contains("credit"), "scenario table");
    assert!(
        html.contains("score_risk"),
        "the flame graph of credit-svc/credit"
    );
    assert!(html.contains("<svg"), "charts are SVG");

    // The figures the page shows, against a hand computation from the
    // windows sent. Per period j (0..4): O = 3 x 0.5 = 1.5 g, M = 3 x 0.25 =
    // 0.75 g, R = 3 x (24x2 + 7x3 + 3x5 + 10(j+1)) = 282, 312, 342, 372.
    let mut sci_j = Vec::new();
    let (mut total_om, mut total_r) = (0.0, 0.0);
    for period in 0..WINDOWS / 3 {
        let (mut om, mut r) = (0.0, 0.0);
        for i in 3 * period..3 * period + 3 {
            om += WINDOW_CARBON_G + WINDOW_EMBODIED_G;
            r += transactions(i)
                .iter()
                .zip(WEIGHTS)
                .map(|(t, w)| *t as f64 * w)
                .sum::<f64>();
        }
        sci_j.push(om / r);
        total_om += om;
        total_r += r;
    }
    assert_eq!(total_r, 1308.0);
    // 0.00695 and 0.00688 g/unit.
    let sci_cf = sci_j.iter().sum::<f64>() / sci_j.len() as f64;
    let pooled = total_om / total_r;
    assert_shows(
        &html,
        "SCI_CF (mean of SCI_j)",
        &card(&html, "sci-mean"),
        sci_cf,
    );
    assert_shows(&html, "pooled SCI", &card(&html, "sci-pooled"), pooled);
    // The cards against the API's figures for the same range (#24: cards
    // printed 2.110e-5): each card is the API's figure to its last digit,
    // in a unit, never in scientific notation.
    let api = agg.sci(start, to, 60);
    let covered: Vec<&serde_json::Value> = api["periods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["covered"] == true)
        .collect();
    let sum = |k: &str| covered.iter().map(|p| p[k].as_f64().unwrap()).sum::<f64>();
    for (id, what, expected) in [
        (
            "sci-mean",
            "SCI_CF card vs the API",
            api["sci_cf_mean"].as_f64().unwrap(),
        ),
        (
            "sci-pooled",
            "pooled card vs the API",
            api["sci_cf_pooled"].as_f64().unwrap(),
        ),
        (
            "om",
            "O + M card vs the API",
            sum("operational_g") + sum("embodied_g"),
        ),
        ("r", "R card vs the API", sum("business_units")),
    ] {
        let shown = card(&html, id);
        assert!(
            !shown.contains("e-") && !shown.contains("e+"),
            "{what}: {shown:?} in scientific notation"
        );
        assert_shows(&html, what, &shown, expected);
    }
    let scenarios = table(&html, "scenarios");
    let credit_txns: u64 = (0..WINDOWS).map(|i| transactions(i)[0]).sum();
    let query_txns: u64 = (0..WINDOWS).map(|i| transactions(i)[3]).sum();
    assert_eq!((credit_txns, query_txns), (24, 300));
    assert_shows(
        &html,
        "credit transactions",
        &cell(&scenarios, "credit", "transactions"),
        credit_txns as f64,
    );
    assert_shows(
        &html,
        "query transactions",
        &cell(&scenarios, "query", "transactions"),
        query_txns as f64,
    );
    let hosts = table(&html, "hosts");
    // 12 windows of 145 J: 1.74 kJ.
    assert_shows(
        &html,
        "the host's energy",
        &cell(&hosts, "loan-host-7", "energy"),
        WINDOWS as f64 * WINDOW_ENERGY_J,
    );
    assert_shows(
        &html,
        "the host's carbon",
        &cell(&hosts, "loan-host-7", "carbon"),
        WINDOWS as f64 * WINDOW_CARBON_G,
    );

    let artifacts: PathBuf = workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,1800".into(),
            url,
        ],
        profile.path(),
    );
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    // A page of real content, not a blank one: a blank 1400x1800 PNG compresses to a few KB.
    assert!(
        bytes.len() > 40_000,
        "screenshot only {} bytes",
        bytes.len()
    );
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}

/// Measures the flame graph frames of a page in Chromium: the page's own
/// markup with a script added at its end that writes, after load and
/// inferno's sizing, each frame's figures into `<pre id="measured">`.
fn measured_flame_frames(page: &str, profile: &Path) -> serde_json::Value {
    let script = r#"<script>
window.addEventListener('load', function () { setTimeout(function () {
  var out = [];
  // Flame graphs in frames, or drawn inline (inferno's SVG holds #frames).
  var graphs = [];
  document.querySelectorAll('iframe.flame').forEach(function (frame) {
    var doc = frame.contentDocument;
    graphs.push({ box: frame, svg: doc.querySelector('svg'),
                  viewport: doc.documentElement.clientWidth });
  });
  document.querySelectorAll('svg').forEach(function (svg) {
    if (svg.querySelector('#frames')) {
      var p = svg.parentElement, st = getComputedStyle(p);
      graphs.push({ box: svg, svg: svg, viewport:
        p.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) });
    }
  });
  graphs.forEach(function (g) {
    var title = g.svg.querySelector('#title');
    var s = g.svg.getBoundingClientRect();
    var t = title.getBoundingClientRect();
    var parent = g.box.parentElement;
    var ps = getComputedStyle(parent);
    out.push({
      svg_width: s.width, svg_left: s.left, svg_right: s.right,
      svg_top: s.top, svg_bottom: s.bottom,
      title_text: title.textContent,
      title_left: t.left, title_right: t.right, title_top: t.top, title_bottom: t.bottom,
      viewport_width: g.viewport,
      frame_width: g.box.getBoundingClientRect().width,
      container_width: parent.clientWidth - parseFloat(ps.paddingLeft) - parseFloat(ps.paddingRight)
    });
  });
  var pre = document.createElement('pre');
  pre.id = 'measured';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500); });
</script>"#;
    let at = page.rfind("</body>").expect("a page with a body");
    let file = profile.join("measured.html");
    std::fs::write(&file, format!("{}{script}{}", &page[..at], &page[at..])).unwrap();
    let dom = chromium(
        &[
            "--window-size=1000,3000".into(),
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            format!("file://{}", file.display()),
        ],
        profile,
    );
    let html = String::from_utf8_lossy(&dom.stdout);
    let start = html
        .find("<pre id=\"measured\">")
        .unwrap_or_else(|| panic!("nothing measured: {}", String::from_utf8_lossy(&dom.stderr)))
        + "<pre id=\"measured\">".len();
    let json = text_of(&html[start..start + html[start..].find("</pre>").unwrap()]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

/// The review page's differential flame graphs in Chromium: each SVG as
/// wide as its frame, each frame as wide as the page's content, and each
/// title wholly inside its SVG (#24: the inline SVG drew 300 px wide with
/// its title clipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_page_draws_its_flame_graphs_full_width_in_chromium() {
    let Some(_) = provisioned_tool(
        Path::new("/usr/bin/chromium"),
        "compare_page_draws_its_flame_graphs_full_width_in_chromium",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agg = loan_host_aggregator(dir.path(), "host_rollup_step = \"60s\"\n");
    let mut windows = Vec::new();
    // Eight 60 s periods of one 60 s window: the baseline the first four,
    // the candidate the last four, where score_risk is cheaper.
    let start = (now_s() / 60 - 9) * 60;
    for i in 0..8u64 {
        let candidate = i >= 4;
        let mut w = window(
            "loan-host-7",
            "inst",
            i,
            start + 60 * i,
            60,
            WINDOW_ENERGY_J,
            WINDOW_EMBODIED_G,
            [10, 3, 5, 20],
        );
        for (stack, samples) in [
            (
                "main;handle_application;score_risk",
                if candidate { 60 } else { 100 },
            ),
            ("main;handle_application;price_offer", 50),
        ] {
            w.profile.push(v1::ProfileStack {
                pid: 42,
                comm: "cf-credit".into(),
                service: "credit-svc".into(),
                scenario: "credit".into(),
                stack: stack.into(),
                samples,
                energy_j: samples as f64 * 0.05,
            });
        }
        windows.push(w);
    }
    deliver(&agg, dir.path(), &windows).await;

    let q = format!(
        "baseline_from={}&baseline_to={}&candidate_from={}&candidate_to={}&period=60&profile_service=credit-svc&profile_scenario=credit",
        start,
        start + 240,
        start + 240,
        start + 480
    );
    let (status, page) =
        sci_tests::fleet::http_get(agg.http_port, &format!("/dashboard/compare?{q}")).unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("score_risk"), "the profile is drawn");
    let profile = tempfile::tempdir().unwrap();
    let frames = measured_flame_frames(&page, profile.path());
    let frames = frames.as_array().unwrap();
    assert_eq!(frames.len(), 2, "candidate and baseline widths: {frames:?}");
    for f in frames {
        println!("{f}");
        let n = |k: &str| f[k].as_f64().unwrap_or_else(|| panic!("{k} in {f}"));
        // Full width: the SVG fills its frame, the frame the page's content.
        assert!(
            (n("svg_width") - n("viewport_width")).abs() <= 1.0,
            "SVG {} px wide in a frame of {} px: {f}",
            n("svg_width"),
            n("viewport_width")
        );
        assert!(
            (n("frame_width") - n("container_width")).abs() <= 1.0,
            "frame {} px wide in a container of {} px: {f}",
            n("frame_width"),
            n("container_width")
        );
        assert!(n("container_width") > 900.0, "a 1000 px window: {f}");
        // The title wholly inside the SVG.
        assert!(f["title_text"]
            .as_str()
            .unwrap()
            .starts_with("Energy per transaction"));
        assert!(
            n("title_left") >= n("svg_left")
                && n("title_right") <= n("svg_right")
                && n("title_top") >= n("svg_top")
                && n("title_bottom") <= n("svg_bottom"),
            "title outside its SVG: {f}"
        );
    }
}
