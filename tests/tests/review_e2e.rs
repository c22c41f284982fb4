//! Optimisation review end to end (#15), all real: the aggregator (SQLite,
//! gRPC over loopback), the agent (eBPF, profiler, marker uprobes), the
//! finance services and the load generator. The services run twice under
//! the same load, the second time with the credit flow's hot function
//! (`identity_digest`, 1000 -> 100 SHA-256 rounds: `--identity-rounds`)
//! made cheaper. `sci-aggregator compare` must find credit's carbon per
//! transaction lower (interval excluding 0), the change located at that
//! function in the differential flame graph, and the per-request CPU p50 of
//! credit lower (the kernel's histograms, WindowReport.request_cpu).
//! The services are built with frame pointers (else the stacks stop at the
//! leaf). Privileged: skipped (with one line) without root outside CI.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sci_tests::fleet::{free_port, http_get, now_s};
use sci_tests::procs::Reaped;
use sci_tests::{cargo_bin, skip_privileged};

const TOKEN: &str = "review-e2e-token-0123456789abcdef";
const RUN_S: u64 = 40;
/// Review period: a 40 s run holds at least 6 whole ones (reviews need 4).
const PERIOD_S: u64 = 5;

/// The finance service built with frame pointers (in its own target
/// directory under target/), so the profiler's user stacks reach from the
/// SHA-256 code up through `identity_digest` and the credit flow (std, built
/// without them, still ends the walk at the thread's start).
fn finance_service_with_frame_pointers() -> std::path::PathBuf {
    let target = sci_tests::workspace_root().join("target/frame-pointers");
    let status = sci_tests::cargo()
        .args([
            "build",
            "--quiet",
            "-p",
            "sci-workload",
            "--bin",
            "sci-finance-service",
        ])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C force-frame-pointers=yes")
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(sci_tests::workspace_root())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "building sci-finance-service with frame pointers"
    );
    target.join("debug/sci-finance-service")
}

/// Starts a finance service and returns it with its address.
fn service(bin: &Path, role: &str, ingest: u16, identity_rounds: Option<u32>) -> (Child, String) {
    let mut cmd = Command::new(bin);
    cmd.args(["--role", role, "--listen", "127.0.0.1:0"]);
    if role != "shared" {
        cmd.args(["--ingest-udp", &format!("127.0.0.1:{ingest}")]);
    }
    if let Some(rounds) = identity_rounds {
        cmd.args(["--identity-rounds", &rounds.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    std::thread::spawn(move || for _ in lines {});
    let addr = first.strip_prefix("listening ").unwrap().to_string();
    (child, addr)
}

/// One run: credit and shared services (cheaper or not) under the same
/// steady load (the daily shape at its lunch peak); returns (from, to) of
/// the range to compare, inside the run, on 10 s boundaries.
fn run(
    finance: &Path,
    loadgen: &Path,
    ingest: u16,
    identity_rounds: Option<u32>,
    db: &Path,
) -> (u64, u64) {
    let (credit, credit_addr) = service(finance, "credit", ingest, identity_rounds);
    let (shared, shared_addr) = service(finance, "shared", ingest, identity_rounds);
    let _services = Reaped(vec![credit, shared]);
    // The services answer (they printed their address); the range starts
    // on the next period boundary anyway.
    let start = now_s();
    let status = Command::new(loadgen)
        .args(["--target", &format!("credit={credit_addr}")])
        .args(["--target", &format!("shared={shared_addr}")])
        .args(["--duration", &format!("{RUN_S}s")])
        .args(["--day-seconds", "86400", "--start-hour", "12.5"])
        .args(["--peak-rps", "30", "--shared-fraction", "0.5"])
        .args(["--mix", "credit=1,drawdown=0,repayment=0,query=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "loadgen failed");
    let end = now_s();
    // The agent's windows of this run stored before the next starts.
    sci_tests::wait_until("the run's last windows stored", || {
        stored_through_s(db) > end
    });
    (
        (start + PERIOD_S).div_ceil(PERIOD_S) * PERIOD_S,
        (end - 1) / PERIOD_S * PERIOD_S,
    )
}

/// Where the last stored window ends (Unix seconds, 0 before any).
fn stored_through_s(db: &Path) -> u64 {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return 0;
    };
    conn.query_row(
        "SELECT COALESCE(MAX(end_ns), 0) FROM window_keys",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|ns| ns as u64 / 1_000_000_000)
    .unwrap_or(0)
}

#[test]
fn a_cheaper_credit_release_is_found_lower_at_its_hot_function() {
    if skip_privileged("a_cheaper_credit_release_is_found_lower_at_its_hot_function") {
        return;
    }
    let aggregator = cargo_bin("sci-aggregator", "sci-aggregator");
    let agent = cargo_bin("sci-agent", "sci-agent");
    let finance = finance_service_with_frame_pointers();
    let loadgen = cargo_bin("sci-workload", "sci-loadgen");
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http, ingest, metrics) = (free_port(), free_port(), free_port(), free_port());
    let agg_toml = dir.path().join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "grpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndatabase = \"{}\"\n\
             period = \"5s\"\nrollup_step = \"5s\"\nhost_rollup_step = \"5s\"\nmin_profile_samples = 50\n\n\
             [[agents]]\nhost = \"review-host\"\ntoken = \"{TOKEN}\"\n",
            dir.path().join("sci.db").display()
        ),
    )
    .unwrap();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\nhost = \"review-host\"\ndatacenter = \"review-dc\"\ninterval = \"1000ms\"\nspool_dir = \"{}\"\n\
             metrics_listen = \"127.0.0.1:{metrics}\"\n\n[profile]\nenabled = true\nfrequency_hz = 99\n\n\
             [ingest]\nudp_listen = \"127.0.0.1:{ingest}\"\n\n\
             [aggregator]\nurl = \"http://127.0.0.1:{grpc}\"\ntoken = \"{TOKEN}\"\n\n[scenarios]\n\
             [[scenarios.rules]]\nservice = \"credit-svc\"\nscenario = \"credit\"\ncomm = \"cf-credit\"\n\n\
             [[scenarios.rules]]\nservice = \"shared-svc\"\ncomm = \"cf-shared\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let agg = Command::new(&aggregator)
        .args(["serve", "--insecure", "--config"])
        .arg(&agg_toml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("aggregator.err")).unwrap())
        .spawn()
        .unwrap();
    let mut fleet = Reaped(vec![agg]);
    sci_tests::wait_until("the aggregator is healthy", || {
        matches!(http_get(http, "/healthz"), Some((200, _)))
    });
    let agent_child = Command::new(&agent)
        .args(["run", "--insecure", "--config"])
        .arg(&agent_toml)
        .arg("--markers")
        .arg(&finance)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
        .spawn()
        .unwrap();
    fleet.0.push(agent_child);
    // eBPF loaded and measuring: the agent has stored a window.
    let db = dir.path().join("sci.db");
    sci_tests::wait_until("the agent's first window stored", || {
        stored_through_s(&db) > 0
    });

    let (b0, b1) = run(&finance, &loadgen, ingest, None, &db);
    let (c0, c1) = run(&finance, &loadgen, ingest, Some(100), &db);
    println!("baseline {b0}..{b1}, candidate {c0}..{c1}");

    let out = Command::new(&aggregator)
        .args(["compare", "--config"])
        .arg(&agg_toml)
        .args(["--baseline", &format!("{b0}..{b1}")])
        .args(["--candidate", &format!("{c0}..{c1}")])
        .args(["--period", "5s", "--profile-service", "credit-svc"])
        .args(["--profile-scenario", "credit", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let artifacts = sci_tests::workspace_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("review_e2e.json"), &out.stdout).unwrap();
    for f in r["diff_profile"]["functions"]
        .as_array()
        .unwrap()
        .iter()
        .take(12)
    {
        println!(
            "changed: {} {} (explained by {})",
            f["function"], f["change_j_per_transaction"], f["explained_by_callee"]
        );
    }
    let credit = r["comparison"]["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "credit")
        .unwrap_or_else(|| panic!("no credit in the comparison: {r}"));
    println!("credit g/transaction: {}", credit["g_per_transaction"]);
    assert_eq!(credit["g_per_transaction"]["verdict"], "lower", "{credit}");
    assert!(credit["g_per_transaction"]["ci_high"].as_f64().unwrap() < 0.0);
    assert_eq!(credit["cpu_ns_per_transaction"]["verdict"], "lower");

    // The differential flame graph locates the change at identity_digest
    // (or inside it: the SHA-256 it calls).
    let profile = &r["diff_profile"];
    assert!(profile["withheld_reason"].is_null(), "{profile}");
    let top = profile["functions"][0]["function"].as_str().unwrap();
    println!("top changed function: {top}: {}", profile["functions"][0]);
    assert!(
        profile["functions"][0]["change_j_per_transaction"]
            .as_f64()
            .unwrap()
            < 0.0
    );
    let at_or_below_identity = top.contains("identity_digest")
        || profile["stacks"].as_array().unwrap().iter().any(|s| {
            let stack = s["stack"].as_str().unwrap();
            stack
                .find("identity_digest")
                .is_some_and(|i| stack[i..].contains(&format!(";{top}")))
        });
    assert!(
        at_or_below_identity,
        "the top changed function {top} is not identity_digest nor called by it"
    );

    // Per-request CPU (kernel histograms of marker-bracketed requests): p50 falls.
    let dist = r["distributions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["scenario"] == "credit")
        .unwrap_or_else(|| {
            panic!(
                "no credit request histogram (WindowReport.request_cpu): {}",
                r["distributions"]
            )
        });
    let (before, after) = (
        dist["baseline"]["p50_cpu_ns"].as_f64().unwrap(),
        dist["candidate"]["p50_cpu_ns"].as_f64().unwrap(),
    );
    println!("credit p50 CPU per request: {before} ns -> {after} ns");
    assert!(after < before, "p50 {before} -> {after}");
}
