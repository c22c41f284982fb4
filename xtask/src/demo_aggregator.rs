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

fn g(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or_else(|| "undefined".into(), |v| format!("{v:.6}"))
}

/// The closing summary: fleet SCI_CF, per-scenario table, top workloads, report files.
pub fn summary(
    bin: &Path,
    aggregator_toml: &Path,
    http_port: u16,
    out: &Path,
    from_s: u64,
    period: Duration,
) -> Result<String> {
    let to_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 1;
    let (status, body) = http_get(
        http_port,
        &format!(
            "/api/v1/sci?from={from_s}&to={to_s}&period={}",
            period.as_secs().max(1)
        ),
    )
    .context("no answer from the aggregator")?;
    if status != 200 {
        bail!("aggregator answered {status}: {body}");
    }
    let e: serde_json::Value = serde_json::from_str(&body)?;
    let mut s = String::new();
    writeln!(
        s,
        "\n== Fleet SCI_CF (T/CQJR 032.2, gCO2e per business unit; query = 1 unit) =="
    )?;
    writeln!(
        s,
        "  mean of {} periods with transactions (Appendix A): {}",
        e["periods_defined"],
        g(&e["sci_cf_mean"])
    )?;
    writeln!(
        s,
        "  pooled sum(O+M)/sum(R) over the run:            {}",
        g(&e["sci_cf_pooled"])
    )?;
    writeln!(
        s,
        "  O = {} g, M = {} g, R = {} units, {} periods of {} s",
        g(&e["operational_g"]),
        g(&e["embodied_g"]),
        e["business_units"].as_f64().unwrap_or(0.0),
        e["periods"].as_array().map_or(0, |p| p.len()),
        e["period_s"].as_u64().unwrap_or(0)
    )?;
    writeln!(s, "\n== Per scenario ==")?;
    writeln!(
        s,
        "  {:<11} {:>12} {:>12} {:>16} {:>10} {:>10}",
        "scenario", "transactions", "energy J", "g/transaction", "measured", "standard"
    )?;
    for sc in e["scenarios"].as_array().into_iter().flatten() {
        writeln!(
            s,
            "  {:<11} {:>12} {:>12.3} {:>16} {:>10} {:>10}",
            sc["scenario"].as_str().unwrap_or("?"),
            sc["transactions"].as_u64().unwrap_or(0),
            sc["energy_j"].as_f64().unwrap_or(0.0),
            g(&sc["g_per_transaction"]),
            sc["measured_weight"]
                .as_f64()
                .map_or("-".into(), |w| format!("{w:.1}")),
            sc["standard_weight"].as_f64().unwrap_or(0.0)
        )?;
    }
    writeln!(s, "\n== Where the carbon goes (top services) ==")?;
    for sv in e["services"].as_array().into_iter().flatten().take(6) {
        writeln!(
            s,
            "  {:<28} {:>10.3} J {:>12} g",
            sv["key"]
                .as_str()
                .unwrap_or("?")
                .replace("(none)/(none)", "unassigned (no rule)"),
            sv["energy_j"].as_f64().unwrap_or(0.0),
            g(
                &(sv["carbon_g"].as_f64().unwrap_or(0.0)
                    + sv["embodied_g"].as_f64().unwrap_or(0.0))
                .into()
            )
        )?;
    }
    for (format, file) in [("md", "report.md"), ("json", "report.json")] {
        let output = Command::new(bin.join("sci-aggregator"))
            .args(["report", "--config"])
            .arg(aggregator_toml)
            .args(["--from", &from_s.to_string(), "--format", format])
            .output()
            .context("running sci-aggregator report")?;
        if !output.status.success() {
            bail!(
                "sci-aggregator report failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::write(out.join(file), output.stdout)?;
    }
    writeln!(
        s,
        "\nEvaluation report: {} (and report.json); logs and configs in {}",
        out.join("report.md").display(),
        out.display()
    )?;
    Ok(s)
}
