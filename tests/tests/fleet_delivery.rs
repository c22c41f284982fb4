//! The delivery contract end to end, faults turned around: a real
//! `sci-aggregator` on loopback, the agent's real spool and forwarder. After
//! each fault every window is stored exactly once or quarantined and counted,
//! and delivery resumes without restarting anything.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::{Spool, QUARANTINE_DIR};
use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use sci_tests::fleet::{carbon_g, now_s, periods_total, window, Agent, Aggregator};

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a-0123456789\"\n";

fn config(urls: &[String]) -> AggregatorConfig {
    AggregatorConfig {
        url: Some(urls[0].clone()),
        urls: urls[1..].to_vec(),
        token: Some("token-a-0123456789".into()),
        max_backoff: Duration::from_millis(500),
        batch_windows: 16,
        ..Default::default()
    }
}

/// (windows stored, operational carbon g) over the last hour and a bit.
fn stored(agg: &Aggregator, from_s: u64) -> (u64, f64) {
    let e = agg.sci(from_s, now_s() + 60, 3600);
    (
        periods_total(&e, "/windows"),
        e["operational_g"].as_f64().unwrap(),
    )
}

fn quarantined(spool_dir: &Path) -> Vec<String> {
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

/// One query per second at `start_s + i` for each i in `seconds`: 1 J each
/// (its carbon at 530.6 g/kWh, [`carbon_g`]).
fn push_queries(agent: &Agent, start_s: u64, seconds: std::ops::Range<u64>) {
    for i in seconds {
        agent.push(&window(
            "host-a",
            "x",
            0,
            start_s + i,
            1,
            1.0,
            0.0,
            [0, 0, 0, 1],
        ));
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_seqs_are_renumbered_and_refused_windows_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let start = now_s() - 600;
    // An earlier run of instance "inst" stored seqs 0..5 (its spool state was then lost).
    let mut client = IngestClient::connect(agg.url()).await.unwrap();
    let earlier: Vec<v1::WindowReport> = (0..5)
        .map(|seq| {
            window(
                "host-a",
                "inst",
                seq,
                start + seq,
                1,
                1.0,
                0.0,
                [0, 0, 0, 1],
            )
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(vec![v1::AgentBatch {
        host: "host-a".into(),
        agent_instance: "inst".into(),
        windows: earlier,
        sent_unix_ns: 0,
    }]));
    request.metadata_mut().insert(
        "authorization",
        "Bearer token-a-0123456789".parse().unwrap(),
    );
    let ack = client
        .stream(request)
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack.stored, 5);

    // The new run reuses instance "inst" from seq 0: seqs 0..5 collide.
    // Its windows are spooled before the forwarder starts, so all ten carry "inst".
    let spool_dir = dir.path().join("spool");
    let mut spool = Spool::open(&spool_dir, 1 << 28, "inst").unwrap();
    let mut expected_carbon = 5.0 * carbon_g(1.0, 1.0);
    for i in 0..10u64 {
        let energy_j = (i + 1) as f64;
        let carbon = carbon_g(energy_j, 1.0);
        let mut w = window(
            "host-a",
            "x",
            0,
            start + 100 + i,
            1,
            energy_j,
            0.0,
            [0, 0, 0, 1],
        );
        if i == 7 {
            w.host_energy_j = f64::NAN; // refused for good: quarantined
        } else {
            expected_carbon += carbon;
        }
        spool.append(&w).unwrap();
    }
    let agent = Agent::with_spool(spool, config(&[agg.url()]));
    agent.drained(Duration::from_secs(30)).await;
    let (windows, carbon) = stored(&agg, start - 10);
    println!("stored {windows} windows, {carbon} g (expected 14, {expected_carbon} g)");
    assert_eq!(
        windows,
        5 + 9,
        "the earlier run's 5 and every valid new window, once"
    );
    assert!(
        close(carbon, expected_carbon),
        "{carbon} vs {expected_carbon}"
    );
    let s = agent.spool.lock().unwrap().stats().clone();
    assert_eq!(s.renumbered, 5);
    assert!(s.new_instances >= 1);
    assert_eq!(s.quarantined_refused, 1);
    assert_ne!(agent.spool.lock().unwrap().agent_instance(), "inst");
    assert_eq!(
        quarantined(&spool_dir),
        ["00000000000000000007.reason", "00000000000000000007.win"]
    );
    let reason = std::fs::read_to_string(
        spool_dir
            .join(QUARANTINE_DIR)
            .join("00000000000000000007.reason"),
    )
    .unwrap();
    assert!(reason.contains("not_finite"), "{reason}");
    let m = agg.metrics();
    assert!(m.contains("sci_ingest_conflicts_total 5"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_over_the_message_limit_is_delivered_in_smaller_batches() {
    let dir = tempfile::tempdir().unwrap();
    // The aggregator takes at most 2 MiB per message; the agent believes 8 MiB.
    let agg = Aggregator::start(
        dir.path(),
        3600,
        &format!("{TOKENS}[limits]\nmax_message_bytes = 2097152\n"),
        true,
    );
    let start = now_s() - 600;
    let spool_dir = dir.path().join("spool");
    let cfg = AggregatorConfig {
        batch_max_bytes: 8 * 1024 * 1024,
        ..config(&[agg.url()])
    };
    let profile = |seed: u64, n: usize| -> Vec<v1::ProfileStack> {
        (0..n)
            .map(|i| v1::ProfileStack {
                comm: "svc".into(),
                stack: format!("main;handler_{seed};frame_{i:05};{}", "f".repeat(200)),
                samples: 1,
                energy_j: 0.0001,
                ..Default::default()
            })
            .collect()
    };
    // While the aggregator is down, 40 windows of ~300 KB pile up.
    let spool = Spool::open(&spool_dir, cfg.spool_max_bytes, "inst").unwrap();
    let agent = Agent::with_spool(
        spool,
        AggregatorConfig {
            url: Some("http://127.0.0.1:9".into()),
            ..cfg.clone()
        },
    );
    let mut expected_carbon = 0.0;
    for i in 0..40u64 {
        let energy_j = (i + 1) as f64;
        let carbon = carbon_g(energy_j, 1.0);
        let mut w = window("host-a", "x", 0, start + i, 1, energy_j, 0.0, [0, 0, 0, 1]);
        w.profile = profile(i, 1200);
        expected_carbon += carbon;
        agent.push(&w);
    }
    let backlog = agent.spool.lock().unwrap().bytes();
    println!("backlog {backlog} bytes in 40 windows");
    assert!(backlog > 10 * 1024 * 1024);
    // The agent restarts its forwarder towards the real aggregator (same spool).
    drop(agent);
    let spool = Spool::open(&spool_dir, cfg.spool_max_bytes, "ignored").unwrap();
    let agent = Agent::with_spool(spool, cfg);
    agent.drained(Duration::from_secs(60)).await;
    let (windows, carbon) = stored(&agg, start - 10);
    assert_eq!(windows, 40);
    assert!(close(carbon, expected_carbon));
    let smaller = agent
        .stats
        .batch_bytes_override
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("batches came down to {smaller} bytes");
    assert!(smaller > 0 && smaller <= 2 * 1024 * 1024);
    let m = agg.metrics();
    assert!(m.contains("sci_ingest_decode_errors_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_larger_than_the_limit_is_trimmed_counted_and_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let start = now_s() - 600;
    let spool_dir = dir.path().join("spool");
    let cfg = AggregatorConfig {
        batch_max_bytes: 1024 * 1024,
        spool_max_bytes: 64 * 1024 * 1024,
        ..config(&[agg.url()])
    };
    let mut spool = Spool::open(&spool_dir, cfg.spool_max_bytes, "inst").unwrap();
    spool.set_window_limits(cfg.batch_max_bytes, Duration::from_secs(3600));
    let agent = Agent::with_spool(spool, cfg);
    let mut w = window("host-a", "x", 0, start, 1, 1.0, 0.0, [0, 0, 0, 1]);
    w.profile = (0..20_000)
        .map(|i| v1::ProfileStack {
            comm: "svc".into(),
            stack: format!("main;frame_{i:05};{}", "g".repeat(150)),
            samples: 1,
            energy_j: 1e-5 * (i % 100 + 1) as f64,
            ..Default::default()
        })
        .collect();
    agent.push(&w);
    agent.drained(Duration::from_secs(30)).await;
    let (windows, carbon) = stored(&agg, start - 10);
    assert_eq!(windows, 1);
    assert!(close(carbon, carbon_g(1.0, 1.0)));
    let trimmed = agent.spool.lock().unwrap().stats().trimmed_stacks;
    println!("{trimmed} of 20000 stacks trimmed");
    assert!(trimmed > 0 && trimmed < 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_to_the_next_aggregator_and_resumes_from_acks() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut a = Aggregator::start(&a_dir, 3600, TOKENS, true);
    let b = Aggregator::start(&b_dir, 3600, TOKENS, true);
    let start = now_s() - 600;
    let agent = Agent::start(
        &dir.path().join("spool"),
        config(&[a.url(), b.url()]),
        "inst",
    );
    push_queries(&agent, start, 0..10);
    agent.drained(Duration::from_secs(30)).await;
    assert_eq!(stored(&a, start - 10).0, 10);
    a.kill_9();
    push_queries(&agent, start, 10..25);
    agent.drained(Duration::from_secs(30)).await;
    let (on_b, _) = stored(&b, start - 10);
    assert_eq!(on_b, 15, "B holds exactly what A never acknowledged");
    assert!(
        agent
            .stats
            .failovers
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        agent
            .stats
            .current_url
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_ahead_of_the_aggregator_clock_are_kept_and_delivered_later() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        3600,
        &format!("max_clock_skew = \"1s\"\n{TOKENS}"),
        true,
    );
    let spool_dir = dir.path().join("spool");
    let agent = Agent::start(&spool_dir, config(&[agg.url()]), "inst");
    // The agent's clock runs 4 s ahead: its window ends 4 s in the aggregator's future.
    let ahead_end = now_s() + 4;
    let started = Instant::now();
    agent.push(&window(
        "host-a",
        "x",
        0,
        ahead_end - 1,
        1,
        1.0,
        0.0,
        [0, 0, 0, 1],
    ));
    agent.drained(Duration::from_secs(30)).await;
    let waited = started.elapsed();
    println!("delivered after {waited:?}");
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    let (windows, carbon) = stored(&agg, ahead_end - 3600);
    assert_eq!(windows, 1);
    assert!(close(carbon, carbon_g(1.0, 1.0)));
    let s = agent.spool.lock().unwrap().stats().clone();
    assert!(s.deferred >= 1);
    assert_eq!(s.quarantined_refused, 0);
    assert!(quarantined(&spool_dir).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_starts_a_new_instance_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let start = now_s() - 600;
    let spool_dir = dir.path().join("spool");
    let agent = Agent::start(&spool_dir, config(&[agg.url()]), "inst");
    push_queries(&agent, start, 0..20);
    agent.drained(Duration::from_secs(30)).await;
    drop(agent);
    // One digit of the state changes while the agent is stopped: next seq 20 reads 10.
    let state_path = spool_dir.join("state");
    let state = std::fs::read_to_string(&state_path).unwrap();
    assert!(state.starts_with("v3 inst 20 "), "{state}");
    std::fs::write(&state_path, state.replacen("inst 20", "inst 10", 1)).unwrap();
    let agent = Agent::start(&spool_dir, config(&[agg.url()]), "ignored");
    let s = agent.spool.lock().unwrap().stats().clone();
    assert_eq!(s.state_recovered, 1);
    assert_ne!(agent.spool.lock().unwrap().agent_instance(), "inst");
    push_queries(&agent, start, 20..35);
    agent.drained(Duration::from_secs(30)).await;
    let (windows, carbon) = stored(&agg, start - 10);
    assert_eq!(windows, 35, "none of the 15 new windows taken for a replay");
    assert!(close(carbon, 35.0 * carbon_g(1.0, 1.0)));
    let m = agg.metrics();
    assert!(m.contains("sci_ingest_conflicts_total 0"), "{m}");
    assert!(
        m.contains("sci_ingest_windows_total{result=\"duplicate\"} 0"),
        "{m}"
    );
}

/// A tmpfs of `size` mounted on `dir`; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_counts_what_it_loses_and_recovers() {
    if sci_tests::skip_privileged("a_full_spool_disk_counts_what_it_loses_and_recovers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let _tmpfs = Tmpfs::mount(&spool_dir, "256k");
    let start = now_s() - 600;
    // The aggregator is down: windows of ~10 KB pile up until the disk is full.
    let mut spool = Spool::open(&spool_dir, 1 << 30, "inst").unwrap();
    let mut failed = 0u64;
    for i in 0..60u64 {
        let mut w = window("host-a", "x", 0, start + i, 1, 1.0, 0.0, [0, 0, 0, 1]);
        w.processes = (0..100)
            .map(|p| v1::ProcessRecord {
                pid: p,
                comm: format!("worker-{p:03}-{}", "c".repeat(60)),
                ..Default::default()
            })
            .collect();
        if spool.append(&w).is_err() {
            failed += 1;
        }
    }
    let s = spool.stats().clone();
    println!(
        "appended {}, lost to the full disk {} (write failures {})",
        s.appended, s.dropped_write_failed, s.write_failures
    );
    assert!(failed > 0, "the 256 KiB disk never filled");
    assert_eq!(s.dropped_write_failed, failed);
    assert_eq!(
        s.appended + s.dropped_write_failed,
        60,
        "every window spooled or counted"
    );
    let tmp: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    // The aggregator comes up: what was spooled is delivered, space frees, and
    // new windows are spooled and delivered again without a restart.
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let appended = s.appended;
    let agent = Agent::with_spool(spool, config(&[agg.url()]));
    agent.drained(Duration::from_secs(60)).await;
    push_queries(&agent, start, 60..70);
    agent.drained(Duration::from_secs(30)).await;
    let (windows, _) = stored(&agg, start - 10);
    assert_eq!(windows, appended + 10);

    // The spool's filesystem turns read-only: each window is counted lost, no .tmp.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&spool_dir)
        .status()
        .unwrap();
    assert!(status.success());
    let before = agent.spool.lock().unwrap().stats().clone();
    for i in 70..75 {
        let w = window("host-a", "x", 0, start + i, 1, 1.0, 0.0, [0, 0, 0, 1]);
        let err = agent
            .spool
            .lock()
            .unwrap()
            .append(&w)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Read-only file system"), "{err}");
    }
    let after = agent.spool.lock().unwrap().stats().clone();
    assert_eq!(after.dropped_write_failed - before.dropped_write_failed, 5);
    assert_eq!(after.appended, before.appended);
    assert!(std::fs::read_dir(&spool_dir)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
}
