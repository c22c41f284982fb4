//! The agent stopped mid-window (#24): the real agent (eBPF) sends to a real
//! aggregator (SQLite, gRPC on loopback); SIGTERM arrives half-way through a
//! window. The partial window up to the stop instant must be stored, the
//! last period's coverage must be what was measured (hand-computed from the
//! stored windows), and a restart must leave no unreported gap: the next
//! run's first window starts after the last one ended and the agent reports
//! exactly that difference as unmeasured. Privileged.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use sci_proto::v1;
use sci_tests::fleet::{free_port, http_get, Aggregator};
use sci_tests::{cargo_bin, skip_privileged};

const TOKEN: &str = "agent-stop-token-0123456789abcdef";
const HOST: &str = "stop-host";
const INTERVAL_NS: u64 = 2_000_000_000;
const PERIOD_S: u64 = 6;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn start_agent(config: &Path, log: &Path) -> Child {
    Command::new(cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--insecure", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        ))
        .spawn()
        .unwrap()
}

/// Every stored window of the host, by start.
fn stored_windows(db: &Path) -> Vec<v1::WindowReport> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT payload FROM windows_raw WHERE host = ?1")
        .unwrap();
    let mut windows: Vec<v1::WindowReport> = stmt
        .query_map([HOST], |row| row.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|payload| v1::WindowReport::decode(payload.unwrap().as_slice()).unwrap())
        .collect();
    windows.sort_by_key(|w| w.start_unix_ns);
    windows
}

/// Polls `condition` every 50 ms for at most `limit`; panics with `what`.
fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_stop_mid_window_stores_the_partial_window_and_a_restart_reports_its_gap() {
    if skip_privileged("a_stop_mid_window_stores_the_partial_window_and_a_restart_reports_its_gap")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        PERIOD_S,
        &format!("[[agents]]\nhost = \"{HOST}\"\ntoken = \"{TOKEN}\"\n"),
        true,
    );
    let metrics_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nhost = \"{HOST}\"\ninterval = \"2s\"\nspool_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [aggregator]\nurl = \"{}\"\ntoken = \"{TOKEN}\"\nmax_backoff = \"500ms\"\nshutdown_grace = \"10s\"\n",
            dir.path().join("spool").display(),
            agg.url()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let db = dir.path().join("sci.db");

    let mut agent = start_agent(&config, &log);
    // Run until one whole period after the first window's start is stored.
    wait_for("a whole period measured", Duration::from_secs(60), || {
        assert!(
            agent.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            agent_log()
        );
        let w = stored_windows(&db);
        w.first().zip(w.last()).is_some_and(|(first, last)| {
            last.end_unix_ns >= first.start_unix_ns + (PERIOD_S + 2) * 1_000_000_000
        })
    });
    // Half-way through a window (0.9..1.1 s past a 2 s boundary).
    wait_for("the middle of a window", Duration::from_secs(5), || {
        (900_000_000..1_100_000_000).contains(&(now_ns() % INTERVAL_NS))
    });
    let stop_ns = now_ns();
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    let mut status = None;
    wait_for("the agent to stop", Duration::from_secs(20), || {
        status = agent.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "agent:\n{}", agent_log());

    let run1 = stored_windows(&db);
    let last = run1.last().unwrap();
    // The partial window up to the stop instant is stored (delivered within the grace).
    assert!(
        last.start_unix_ns % INTERVAL_NS < 200_000_000 && last.start_unix_ns <= stop_ns,
        "last window starts at (just after) a boundary before the stop: {} vs stop {stop_ns}",
        last.start_unix_ns
    );
    assert!(
        last.end_unix_ns >= stop_ns && last.end_unix_ns < stop_ns + 500_000_000,
        "last window ends at the stop: end {} stop {stop_ns}\n{}",
        last.end_unix_ns,
        agent_log()
    );
    let partial_ns = last.end_unix_ns - last.start_unix_ns;
    assert!(
        partial_ns > 800_000_000 && partial_ns < 1_600_000_000,
        "a partial window ({partial_ns} ns of a 2 s interval)"
    );
    // Windows of the run are contiguous: nothing between them went unmeasured.
    for pair in run1.windows(2) {
        assert_eq!(pair[0].end_unix_ns, pair[1].start_unix_ns, "contiguous");
    }
    let spooled = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".win")
        })
        .count();
    assert_eq!(spooled, 0, "everything delivered before exit");

    // The last period's coverage is what was measured in it.
    let period_start_s = last.end_unix_ns / 1_000_000_000 / PERIOD_S * PERIOD_S;
    let period_start_ns = period_start_s * 1_000_000_000;
    let measured_s = run1
        .iter()
        .map(|w| {
            let from = w.start_unix_ns.max(period_start_ns);
            w.end_unix_ns.saturating_sub(from) as f64 / 1e9
        })
        .sum::<f64>();
    let (code, body) = http_get(
        agg.http_port,
        &format!(
            "/api/v1/sci?from={period_start_s}&to={}&period={PERIOD_S}",
            period_start_s + PERIOD_S
        ),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let sci: serde_json::Value = serde_json::from_str(&body).unwrap();
    let period = &sci["periods"][0];
    let coverage = period["coverage"].as_f64().unwrap();
    let hand = measured_s / PERIOD_S as f64;
    assert!(
        (coverage - hand).abs() < 1e-6,
        "coverage of the last period {coverage} vs measured {hand} ({measured_s} s of {PERIOD_S} s): {period}"
    );
    assert!(hand < 1.0, "the stop is inside the period");

    // Restart: the next run's first window starts after the last one ended,
    // and the difference is reported as unmeasured, to the nanosecond.
    let mut agent = start_agent(&config, &log);
    let run1_len = run1.len();
    wait_for(
        "a window of the second run",
        Duration::from_secs(60),
        || {
            assert!(
                agent.try_wait().unwrap().is_none(),
                "agent exited:\n{}",
                agent_log()
            );
            stored_windows(&db).len() > run1_len
        },
    );
    let all = stored_windows(&db);
    let first2 = &all[run1_len];
    assert_eq!(all[run1_len - 1].end_unix_ns, last.end_unix_ns);
    assert!(first2.start_unix_ns >= last.end_unix_ns, "no overlap");
    assert_eq!(
        first2.agent_instance, last.agent_instance,
        "same run identity"
    );
    assert_eq!(first2.seq, last.seq + 1, "numbering continues");
    let gap_s = (first2.start_unix_ns - last.end_unix_ns) as f64 / 1e9;
    let reported = metric(metrics_port, "sci_agent_unmeasured_seconds_total")
        .unwrap_or_else(|| panic!("no sci_agent_unmeasured_seconds_total"));
    assert!(
        (reported - gap_s).abs() < 1e-6,
        "gap reported {reported} s, stored windows show {gap_s} s"
    );
    assert!(
        agent_log().contains("not measured:"),
        "the log names the gap:\n{}",
        agent_log()
    );
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    let _ = agent.wait();
}
