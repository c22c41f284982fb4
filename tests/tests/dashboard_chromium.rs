//! The aggregator's dashboard in a real browser: headless Chromium loads
//! /dashboard served on loopback with windows sent through the real
//! forwarder, its DOM must show those figures, and its screenshot is kept as
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_real_data_in_chromium() {
    let Some(_) = provisioned_tool(
        Path::new("/usr/bin/chromium"),
        "dashboard_renders_real_data_in_chromium",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        60,
        "[[agents]]\nhost = \"loan-host-7\"\ntoken = \"t\"\n",
        true,
    );
    let spool = Arc::new(Mutex::new(
        Spool::open(&dir.path().join("spool"), 1 << 26, "inst").unwrap(),
    ));
    let notify = Arc::new(Notify::new());
    let forwarder = tokio::spawn(run_forwarder(
        AggregatorConfig {
            url: Some(agg.url()),
            token: Some("t".into()),
            ..Default::default()
        },
        true,
        Arc::clone(&spool),
        Arc::clone(&notify),
        Arc::new(ForwarderStats::default()),
    ));
    let start = (now_s() / 60 - 4) * 60;
    for i in 0..12u64 {
        let mut w = window(
            "loan-host-7",
            "inst",
            i,
            start + 20 * i,
            20,
            40.0,
            0.5,
            0.25,
            [2, 3, 5, 20],
        );
        w.processes.push(v1::ProcessRecord {
            pid: 42,
            comm: "cf-credit".into(),
            service: "credit-svc".into(),
            scenario: "credit".into(),
            cpu_ns: 1_000_000_000,
            energy_j: 10.0,
            carbon_g: 0.2,
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
        spool.lock().unwrap().append(&w).unwrap();
        notify.notify_one();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spool.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "windows not acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    forwarder.abort();

    let url = format!(
        "http://127.0.0.1:{}/dashboard?from={}&to={}&period=60",
        agg.http_port,
        start,
        now_s() + 1
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
