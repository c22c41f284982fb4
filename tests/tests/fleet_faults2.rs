//! The rest of issue 28, each against a real `sci-aggregator` on loopback
//! (both stores where a store is involved: SQLite, and a scratch
//! PostgreSQL): nothing stuck until a restart (item 4), clocks and overlaps
//! (items 5 and 2), amplification (item 7), the last foot-guns (item 8).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::AggregatorConfig as AgentAggregatorConfig;
use sci_agent::sinks::spool::{Spool, QUARANTINE_DIR};
use sci_proto::v1;
use sci_tests::cargo_bin;
use sci_tests::fleet::{now_s, window, Agent, Aggregator};

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a-0123456789\"\n";
const TOKEN: &str = "token-a-0123456789";

/// A plausible window of host-a over one second: 5 J at 530.6 g/kWh and
/// PUE 1.2, carbon as the agent computes it.
fn valid(instance: &str, seq: u64, start_s: u64) -> v1::WindowReport {
    let energy_j = 5.0;
    let mut w = window(
        "host-a",
        instance,
        seq,
        start_s,
        1,
        energy_j,
        energy_j / 3.6e6 * 530.6 * 1.2,
        0.001,
        [1, 0, 0, 2],
    );
    w.pue = 1.2;
    w
}

fn agent_config(url: String) -> AgentAggregatorConfig {
    AgentAggregatorConfig {
        url: Some(url),
        token: Some(TOKEN.into()),
        max_backoff: Duration::from_millis(500),
        batch_windows: 4,
        ..Default::default()
    }
}

fn quarantined(spool_dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(spool_dir.join(QUARANTINE_DIR))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Item 4: a window file deleted while the agent runs is counted and
/// skipped; the 35 others are delivered (main: 0 of 36 acknowledged,
/// looping on "moving to quarantine: No such file").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_file_that_vanishes_is_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let spool_dir = dir.path().join("spool");
    let start = now_s() - 600;
    let mut spool = Spool::open(&spool_dir, 1 << 30, "x").unwrap();
    for i in 0..36 {
        spool.append(&valid("x", 0, start + i)).unwrap();
    }
    let gone = spool_dir.join(format!("{:020}.win", 7));
    std::fs::remove_file(&gone).unwrap();
    let agent = Agent::with_spool(spool, agent_config(agg.url()));
    let began = Instant::now();
    agent.drained(Duration::from_secs(15)).await;
    println!(
        "35 windows delivered around a vanished one in {:?}",
        began.elapsed()
    );
    assert_eq!(agg.windows_ingested("accepted"), 35);
    assert_eq!(agent.spool().stats().vanished, 1);
    assert_eq!(
        agent.spool().stats().corrupt,
        0,
        "a vanished file is not damaged"
    );
}

/// Item 4: a second agent on a spool in use is refused with the holder's
/// pid, in-process and as the real `sci-agent` binary (main: both opened it).
#[test]
fn a_second_agent_on_one_spool_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let held = Spool::open(&spool_dir, 1 << 20, "first").unwrap();
    let second = Spool::open(&spool_dir, 1 << 20, "second");
    let message = second.err().map(|e| e.to_string()).unwrap_or_default();
    let pid = format!("pid {}", std::process::id());
    assert!(
        message.contains(&pid) && message.contains("in use by another agent"),
        "second open: {message:?}"
    );

    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nhost = \"host-a\"\ninterval = \"1s\"\nspool_dir = \"{}\"\n\
             [aggregator]\nurl = \"http://127.0.0.1:9\"\ntoken = \"{TOKEN}\"\n",
            spool_dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--insecure", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent ran: {stderr}");
    assert!(
        stderr.contains(&pid) && stderr.contains(&spool_dir.display().to_string()),
        "{stderr}"
    );
    // Released with the spool: a later agent takes it.
    drop(held);
    assert!(Spool::open(&spool_dir, 1 << 20, "third").is_ok());
}

/// Item 4: a window of processes larger than the aggregator's message limit
/// (it cannot be trimmed: it has no profile stacks) is quarantined and
/// counted; the 32 windows around it are delivered (main: 1 of 33 after
/// 30 s, batches shrunk to 64 KiB, no counter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_above_the_message_limit_is_quarantined_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        3600,
        &format!("{TOKENS}[limits]\nmax_message_bytes = 262144\n"),
        true,
    );
    let spool_dir = dir.path().join("spool");
    let agent = Agent::start(&spool_dir, agent_config(agg.url()), "x");
    let start = now_s() - 600;
    for i in 0..33 {
        let mut w = valid("x", 0, start + i);
        if i == 16 {
            w.processes = (0..8_000u32)
                .map(|pid| v1::ProcessRecord {
                    pid: 10_000 + pid,
                    comm: format!("worker-{pid}"),
                    exe: format!("/opt/app/bin/worker-{pid}"),
                    ..Default::default()
                })
                .collect();
        }
        agent.push(&w);
    }
    let began = Instant::now();
    agent.drained(Duration::from_secs(20)).await;
    println!(
        "32 windows delivered around an oversized one in {:?}",
        began.elapsed()
    );
    assert_eq!(agg.windows_ingested("accepted"), 32);
    assert_eq!(agent.spool().stats().oversized, 1);
    let q = quarantined(&spool_dir);
    assert_eq!(q.len(), 2, "the window and its reason: {q:?}");
    let reason = std::fs::read_to_string(
        spool_dir
            .join(QUARANTINE_DIR)
            .join(q.iter().find(|n| n.ends_with(".reason")).unwrap()),
    )
    .unwrap();
    assert!(reason.contains("message limit"), "{reason}");
}
