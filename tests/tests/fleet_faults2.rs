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

/// One store the aggregator runs on: its TOML and the PostgreSQL server
/// (kept alive while the test runs).
struct StoreUnderTest {
    name: &'static str,
    toml: String,
    _pg: Option<sci_tests::postgres::ScratchPostgres>,
}

/// SQLite, and PostgreSQL when a scratch server starts (else one recorded skip line).
fn stores(test: &str) -> Vec<StoreUnderTest> {
    let mut out = vec![StoreUnderTest {
        name: "sqlite",
        toml: String::new(),
        _pg: None,
    }];
    if let Some(pg) = sci_tests::postgres::ScratchPostgres::start_or_skip(test) {
        let url = pg.create_database("sci_faults2").unwrap();
        out.push(StoreUnderTest {
            name: "postgres",
            toml: format!("postgres_url = \"{url}\"\n"),
            _pg: Some(pg),
        });
    }
    out
}

/// Sends one batch as host-a (agent clock `sent_unix_ns`) and returns the ack.
async fn send(
    url: String,
    instance: &str,
    windows: Vec<v1::WindowReport>,
    sent_unix_ns: u64,
) -> v1::Ack {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut client = v1::ingest_client::IngestClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![v1::AgentBatch {
        host: "host-a".into(),
        agent_instance: instance.into(),
        windows,
        sent_unix_ns,
    }]));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut acks = client.stream(request).await.unwrap().into_inner();
    acks.message().await.unwrap().unwrap()
}

/// A window of host-a of `length_s` seconds at 5 W.
fn valid_for(instance: &str, seq: u64, start_s: u64, length_s: u64) -> v1::WindowReport {
    let mut w = valid(instance, seq, start_s);
    let energy_j = 5.0 * length_s as f64;
    w.end_unix_ns = (start_s + length_s) * 1_000_000_000;
    w.host_energy_j = energy_j;
    w.idle_energy_j = energy_j / 2.0;
    w.host_carbon_g = energy_j / 3.6e6 * 530.6 * 1.2;
    w.idle_cpu_ns = length_s * 1_000_000_000;
    w.busy_cpu_ns = length_s * 1_000_000_000;
    w
}

fn refused_total(agg: &Aggregator, reason: &str) -> u64 {
    let series = format!("sci_ingest_refused_windows_total{{host=\"host-a\",reason=\"{reason}\"}}");
    sci_tests::fleet::metric_value(&agg.metrics(), &series).unwrap_or(0)
}

/// Item 5: an agent whose clock is a day behind sends 15 windows dated
/// yesterday (within max_window_age): each is refused with CLOCK_BEHIND and
/// counted, on both stores (main: 15 of 15 stored into yesterday).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_clock_a_day_behind_is_refused_with_its_own_code_and_counted() {
    let test = "an_agent_clock_a_day_behind_is_refused_with_its_own_code_and_counted";
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        let agent_now_s = now_s() - 86_400;
        let windows: Vec<_> = (0..15)
            .map(|i| valid("behind", i, agent_now_s - 60 + i))
            .collect();
        let ack = send(agg.url(), "behind", windows, agent_now_s * 1_000_000_000).await;
        assert_eq!(ack.refused.len(), 15, "{}: {ack:?}", store.name);
        assert!(
            ack.refused
                .iter()
                .all(|r| r.code == v1::RefusalCode::ClockBehind as i32
                    && r.reason.contains("behind the aggregator's")),
            "{}: {:?}",
            store.name,
            ack.refused[0]
        );
        assert_eq!(agg.windows_ingested("accepted"), 0, "{}", store.name);
        assert_eq!(refused_total(&agg, "clock_behind"), 15, "{}", store.name);
        // The same windows from an agent whose clock is right are stored.
        let windows: Vec<_> = (0..15)
            .map(|i| valid("right", i, agent_now_s - 60 + i))
            .collect();
        let ack = send(agg.url(), "right", windows, now_s() * 1_000_000_000).await;
        assert!(ack.refused.is_empty(), "{}: {ack:?}", store.name);
        assert_eq!(agg.windows_ingested("accepted"), 15, "{}", store.name);
    }
}

/// Items 2 and 5: a host's windows may not overlap. One agent instance
/// covers an hour; another sends windows over the same hour (the overlap
/// that follows a clock set back): refused as `overlap`, counted, and the
/// host's coverage of that hour stays 3,600 s; a replay of the first is
/// still a duplicate, and the next hour is stored. Both stores (main: the
/// hour held 4,200 host-seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_windows_may_not_overlap_on_either_store() {
    let test = "a_host_windows_may_not_overlap_on_either_store";
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        let hour = (now_s() / 3600 - 3) * 3600;
        let first: Vec<_> = (0..60)
            .map(|i| valid_for("first", i, hour + i * 60, 60))
            .collect();
        let now_ns = now_s() * 1_000_000_000;
        let ack = send(agg.url(), "first", first.clone(), now_ns).await;
        assert!(ack.refused.is_empty(), "{}: {ack:?}", store.name);
        let second: Vec<_> = (0..10)
            .map(|i| valid_for("second", i, hour + 300 + i * 60, 60))
            .chain(std::iter::once(valid_for("second", 10, hour + 3600, 60)))
            .collect();
        let ack = send(agg.url(), "second", second, now_ns).await;
        assert_eq!(ack.refused.len(), 10, "{}: {ack:?}", store.name);
        assert!(
            ack.refused.iter().all(|r| r.seq < 10
                && r.code == v1::RefusalCode::Invalid as i32
                && r.reason.starts_with("overlap:")),
            "{}: {:?}",
            store.name,
            ack.refused
        );
        assert_eq!(ack.stored, 1, "{}: the next hour is stored", store.name);
        assert_eq!(refused_total(&agg, "overlap"), 10, "{}", store.name);
        let replay = send(agg.url(), "first", first, now_ns).await;
        assert!(replay.refused.is_empty(), "{}: {replay:?}", store.name);
        assert_eq!(replay.duplicates, 60, "{}", store.name);
        assert_eq!(agg.windows_ingested("accepted"), 61, "{}", store.name);
        // The hour's coverage as the API reports it.
        let sci = agg.sci(hour, hour + 3600, 3600);
        let host_s = sci["periods"][0]["host_seconds"].as_f64().unwrap();
        assert!((host_s - 3600.0).abs() < 1e-6, "{}: {host_s}", store.name);
    }
}
