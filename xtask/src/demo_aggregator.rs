//! The demo's side of the aggregator: its config, readiness, progress and
//! the closing summary (read from its HTTP API and its report command).
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sci_test_harness::http::http_get;

pub fn config(grpc_port: u16, http_port: u16, db: &Path, period: Duration, token: &str) -> String {
    format!(
        "grpc_listen = \"127.0.0.1:{grpc_port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\ndatabase = \"{}\"\nperiod = \"{}s\"\n\n[[agents]]\nhost = \"demo-host\"\ntoken = \"{token}\"\n",
        db.display(),
        period.as_secs().max(1)
    )
}

pub fn wait_healthy(http_port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some((200, _)) = http_get(http_port, "/healthz") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the aggregator did not become healthy within {within:?}")
}

/// Windows the aggregator has stored so far.
pub fn windows_ingested(http_port: u16) -> Option<u64> {
    let (_, body) = http_get(http_port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with("sci_ingest_windows_total{result=\"accepted\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The closing summary: `sci-aggregator report --format text` over the run
/// (the report's own figures and wording), and the report files beside it.
pub fn summary(
    bin: &Path,
    aggregator_toml: &Path,
    out: &Path,
    from_s: u64,
    period: Duration,
) -> Result<String> {
    let report = |format: &str| -> Result<Vec<u8>> {
        let output = Command::new(bin.join("sci-aggregator"))
            .args(["report", "--config"])
            .arg(aggregator_toml)
            .args([
                "--from",
                &from_s.to_string(),
                "--period",
                &format!("{}s", period.as_secs().max(1)),
                "--format",
                format,
            ])
            .output()
            .context("running sci-aggregator report")?;
        if !output.status.success() {
            bail!(
                "sci-aggregator report --format {format} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output.stdout)
    };
    for (format, file) in [
        ("md", "report.md"),
        ("json", "report.json"),
        ("html", "report.html"),
    ] {
        std::fs::write(out.join(file), report(format)?)?;
    }
    let mut s = String::from_utf8_lossy(&report("text")?).into_owned();
    writeln!(
        s,
        "\nEvaluation report: {} (and report.json, report.html); logs and configs in {}",
        out.join("report.md").display(),
        out.display()
    )?;
    Ok(s)
}

/// A screenshot of the dashboard by headless Chromium, the size of the
/// README's picture.
pub fn screenshot(http_port: u16, png: &Path) -> Result<()> {
    let profile = png.with_extension("chromium-profile");
    let output = Command::new("/usr/bin/chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1400,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("http://127.0.0.1:{http_port}/dashboard"))
        .output()
        .context("running /usr/bin/chromium (cargo xtask setup installs it)")?;
    let _ = std::fs::remove_dir_all(&profile);
    if !png.exists() {
        bail!(
            "chromium wrote no screenshot: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
