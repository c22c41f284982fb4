//! The second round of faults and hostile input (issue 28), each against a
//! real `sci-aggregator` on loopback, on both stores where a store is
//! involved (SQLite, and a scratch PostgreSQL): no window stops a host's
//! delivery, no absurd figure is stored, no connection without credentials
//! holds a slot, nothing stays stuck until a restart.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sci_agent::sinks::grpc::AggregatorConfig as AgentAggregatorConfig;
use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use sci_tests::fleet::{
    allow_open_files, connect_from, metric_value, now_s, set_pue, window, Agent, Aggregator,
};
use sci_tests::postgres::ScratchPostgres;
use tonic::transport::{Channel, Endpoint};

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a-0123456789\"\n";
const TOKEN: &str = "token-a-0123456789";

/// One store the aggregator runs on: its name, the TOML that selects it,
/// and the PostgreSQL server (kept alive while the test runs).
struct StoreUnderTest {
    name: &'static str,
    toml: String,
    pg: Option<(ScratchPostgres, String)>,
}

/// SQLite, and PostgreSQL when a scratch server starts (else one recorded skip line).
fn stores(test: &str) -> Vec<StoreUnderTest> {
    let mut out = vec![StoreUnderTest {
        name: "sqlite",
        toml: String::new(),
        pg: None,
    }];
    if let Some(pg) = ScratchPostgres::start_or_skip(test) {
        let db = "sci_faults";
        let url = pg.create_database(db).unwrap();
        out.push(StoreUnderTest {
            name: "postgres",
            toml: format!("postgres_url = \"{url}\"\n"),
            pg: Some((pg, db.to_string())),
        });
    }
    out
}

fn channel(url: String) -> Channel {
    Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Sends one batch as host-a and returns the first answer.
async fn send(url: String, windows: Vec<v1::WindowReport>) -> Result<v1::Ack, tonic::Status> {
    send_on(channel(url), windows).await
}

/// Sends one batch as host-a on `channel` and returns the first answer.
async fn send_on(
    channel: Channel,
    windows: Vec<v1::WindowReport>,
) -> Result<v1::Ack, tonic::Status> {
    let mut client = IngestClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![v1::AgentBatch {
        host: "host-a".into(),
        agent_instance: "inst".into(),
        windows,
        sent_unix_ns: 0,
    }]));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut acks = client.stream(request).await?.into_inner();
    match acks.message().await? {
        Some(ack) => Ok(ack),
        None => Err(tonic::Status::aborted("stream closed without an ack")),
    }
}

/// A plausible window of host-a (instance "inst") over one second: 5 J at
/// 530.6 g/kWh and PUE 1.2, carbon as the agent computes it.
fn valid(seq: u64, start_s: u64) -> v1::WindowReport {
    let mut w = window("host-a", "inst", seq, start_s, 1, 5.0, 0.001, [1, 0, 0, 2]);
    set_pue(&mut w, 1.2);
    w
}

/// A folded stack of `frames` frames with pseudo-random names: text that
/// does not compress (PostgreSQL's btree takes at most 2,704 bytes).
fn random_stack(frames: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..frames)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("fn_{x:016x}")
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The windows of issue 28 item 1: each stopped a host's delivery on PostgreSQL.
fn poison_windows(first_seq: u64, start_s: u64) -> Vec<(&'static str, v1::WindowReport)> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    let mut next = |name: &'static str, f: &dyn Fn(&mut v1::WindowReport)| {
        let mut w = valid(seq, start_s + seq);
        f(&mut w);
        out.push((name, w));
        seq += 1;
    };
    next("incompressible_stack", &|w| {
        w.profile.push(v1::ProfileStack {
            pid: 1,
            comm: "java".into(),
            service: "loan".into(),
            scenario: "credit".into(),
            stack: random_stack(400, 7),
            samples: 3,
            energy_j: 0.5,
        })
    });
    next("long_frame", &|w| {
        w.profile.push(v1::ProfileStack {
            pid: 1,
            comm: "java".into(),
            service: "loan".into(),
            scenario: "credit".into(),
            stack: format!("main;{};leaf", "x".repeat(9000)),
            samples: 1,
            energy_j: 0.1,
        })
    });
    next("nul_in_service", &|w| {
        w.processes.push(v1::ProcessRecord {
            pid: 10,
            comm: "loan".into(),
            service: "lo\0an".into(),
            cpu_ns: 1_000_000,
            ..Default::default()
        })
    });
    next("nul_in_datacenter", &|w| w.datacenter = "dc\0-1".into());
    next("long_service", &|w| {
        w.processes.push(v1::ProcessRecord {
            pid: 11,
            comm: "loan".into(),
            service: "s".repeat(10_000),
            cpu_ns: 1_000_000,
            ..Default::default()
        })
    });
    next("long_datacenter", &|w| w.datacenter = "d".repeat(10_000));
    next("long_intensity_source", &|w| {
        w.intensity_source = "i".repeat(10_000)
    });
    out
}

/// What became of a window: "stored", or the refusal's kind and whether
/// its code is permanent (the agent quarantines it and goes on).
fn outcome(ack: &v1::Ack) -> String {
    match ack.refused.first() {
        None if ack.stored == 1 => "stored".into(),
        None => format!("stored {} duplicates {}", ack.stored, ack.duplicates),
        Some(r) => format!(
            "{} ({})",
            r.reason.split(':').next().unwrap_or(""),
            v1::RefusalCode::try_from(r.code)
                .map(|c| c.as_str_name())
                .unwrap_or("?")
        ),
    }
}

/// Item 1: every window that reaches a key is bounded and checked before the
/// store sees it, so both stores take exactly the same windows; none stops
/// delivery, and a valid window after them is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_window_stops_delivery_and_both_stores_take_the_same() {
    let test = "no_window_stops_delivery_and_both_stores_take_the_same";
    let start = now_s() - 600;
    let mut by_store = Vec::new();
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        let mut outcomes = Vec::new();
        for (name, w) in poison_windows(0, start) {
            let seq = w.seq;
            let answer = tokio::time::timeout(Duration::from_secs(10), send(agg.url(), vec![w]))
                .await
                .unwrap_or_else(|_| panic!("{}: {name}: no answer in 10 s", store.name));
            let ack = answer.unwrap_or_else(|status| {
                panic!(
                    "{}: {name}: the stream failed ({:?}: {}): the agent would retry it for good",
                    store.name,
                    status.code(),
                    status.message()
                )
            });
            assert_eq!(ack.acked_through_seq, seq, "{}: {name}", store.name);
            outcomes.push((name, outcome(&ack)));
        }
        println!("{}: {outcomes:?}", store.name);
        let after = send(agg.url(), vec![valid(100, start + 100)])
            .await
            .unwrap();
        assert_eq!(
            after.stored, 1,
            "{}: the valid window after them",
            store.name
        );
        // Shortened stacks are counted; refusals are counted by reason.
        let m = agg.metrics();
        assert_eq!(
            metric_value(&m, "sci_ingest_stacks_shortened_total"),
            Some(2),
            "{}:\n{m}",
            store.name
        );
        assert_eq!(
            metric_value(
                &m,
                "sci_ingest_refused_windows_total{host=\"host-a\",reason=\"bad_name\"}"
            ),
            Some(5),
            "{}",
            store.name
        );
        by_store.push((store.name, outcomes));
    }
    let expected: Vec<(&str, String)> = [
        ("incompressible_stack", "stored"),
        ("long_frame", "stored"),
        ("nul_in_service", "bad_name (REFUSAL_CODE_INVALID)"),
        ("nul_in_datacenter", "bad_name (REFUSAL_CODE_INVALID)"),
        ("long_service", "bad_name (REFUSAL_CODE_INVALID)"),
        ("long_datacenter", "bad_name (REFUSAL_CODE_INVALID)"),
        ("long_intensity_source", "bad_name (REFUSAL_CODE_INVALID)"),
    ]
    .into_iter()
    .map(|(n, o)| (n, o.to_string()))
    .collect();
    for (store, outcomes) in &by_store {
        assert_eq!(outcomes, &expected, "{store}");
    }
}

/// Item 1, through the agent's own spool and forwarder: the poison windows
/// among valid ones; every valid window is acknowledged within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_poison_window_keeps_delivering() {
    let test = "an_agent_behind_a_poison_window_keeps_delivering";
    let start = now_s() - 600;
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        let spool_dir = dir.path().join("spool");
        let agent = Agent::start(
            &spool_dir,
            AgentAggregatorConfig {
                url: Some(agg.url()),
                token: Some(TOKEN.into()),
                max_backoff: Duration::from_millis(500),
                batch_windows: 4,
                ..Default::default()
            },
            "x",
        );
        let poison = poison_windows(0, start);
        let mut valid_count = 0u64;
        for (i, (_, p)) in poison.iter().enumerate() {
            let mut p = p.clone();
            p.agent_instance = "x".into();
            agent.push(&p);
            for k in 0..6u64 {
                let mut w = valid(0, start + 100 + i as u64 * 6 + k);
                w.agent_instance = "x".into();
                agent.push(&w);
                valid_count += 1;
            }
        }
        let began = Instant::now();
        agent.drained(Duration::from_secs(20)).await;
        println!(
            "{}: {} windows settled in {:?}",
            store.name,
            valid_count + poison.len() as u64,
            began.elapsed()
        );
        let stored = agg.windows_ingested("accepted");
        // The valid ones, and the two whose stacks were shortened.
        assert_eq!(stored, valid_count + 2, "{}", store.name);
    }
}

/// Item 1: an error the store raises for one window (a constraint the test
/// adds to each store) refuses that window with a permanent code; the
/// others of its batch are stored, and delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_the_store_refuses_is_refused_alone_with_a_permanent_code() {
    let test = "a_window_the_store_refuses_is_refused_alone_with_a_permanent_code";
    let start = now_s() - 600;
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        // The schema exists once the aggregator is up.
        match &store.pg {
            Some((pg, db)) => {
                pg.psql_in(
                    db,
                    "ALTER TABLE fleet_rollup ADD CONSTRAINT test_no_refused_dc CHECK (datacenter <> 'dc-refused')",
                )
                .unwrap();
            }
            None => {
                let db = rusqlite::Connection::open(dir.path().join("sci.db")).unwrap();
                db.busy_timeout(Duration::from_secs(10)).unwrap();
                db.execute_batch(
                    "CREATE TRIGGER test_no_refused_dc_i BEFORE INSERT ON fleet_rollup \
                       WHEN NEW.datacenter = 'dc-refused' BEGIN SELECT RAISE(ABORT, 'dc-refused'); END;\
                     CREATE TRIGGER test_no_refused_dc_u BEFORE UPDATE ON fleet_rollup \
                       WHEN NEW.datacenter = 'dc-refused' BEGIN SELECT RAISE(ABORT, 'dc-refused'); END;",
                )
                .unwrap();
            }
        }
        let mut refused_by_store = valid(1, start + 1);
        refused_by_store.datacenter = "dc-refused".into();
        let ack = send(
            agg.url(),
            vec![valid(0, start), refused_by_store, valid(2, start + 2)],
        )
        .await
        .unwrap_or_else(|s| panic!("{}: {:?}: {}", store.name, s.code(), s.message()));
        assert_eq!(
            (ack.acked_through_seq, ack.stored),
            (2, 2),
            "{}",
            store.name
        );
        assert_eq!(ack.refused.len(), 1, "{}", store.name);
        assert_eq!(ack.refused[0].seq, 1);
        assert_eq!(ack.refused[0].code, v1::RefusalCode::Invalid as i32);
        assert!(
            ack.refused[0].reason.starts_with("store_refused:"),
            "{}",
            ack.refused[0].reason
        );
        let after = send(agg.url(), vec![valid(3, start + 3)]).await.unwrap();
        assert_eq!(after.stored, 1);
        let m = agg.metrics();
        assert_eq!(
            metric_value(
                &m,
                "sci_ingest_refused_windows_total{host=\"host-a\",reason=\"store_refused\"}"
            ),
            Some(1),
            "{}",
            store.name
        );
    }
}

/// What an attacker's connection sends: an HTTP/2 client that pings, or
/// an HTTP/1 client that sends its headers one byte at a time.
#[derive(Clone, Copy)]
enum Attack {
    Http2Ping,
    Slowloris,
}

/// `count` attacking connections to `port` from 127.0.0.2 and up (`count /
/// addresses` from each), each sending something every 500 ms so that no
/// idle timeout closes it, and opened again when the server closes it.
/// Returns the stop flag and the number of connections opened.
fn attack(
    port: u16,
    count: usize,
    addresses: u8,
    kind: Attack,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    // The attackers run on a runtime of their own, so they do not starve the
    // test's own client of its runtime's threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            runtime.block_on(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            runtime.shutdown_background();
        });
    }
    for i in 0..count {
        let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % addresses as usize) as u8);
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        handle.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(std) = connect_from(from, port) else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                std.set_nonblocking(true).unwrap();
                let mut conn = tokio::net::TcpStream::from_std(std).unwrap();
                let first: Vec<u8> = match kind {
                    // Client preface and an empty SETTINGS frame.
                    Attack::Http2Ping => {
                        let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                        b.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
                        b
                    }
                    Attack::Slowloris => b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec(),
                };
                if conn.write_all(&first).await.is_err() {
                    continue;
                }
                let mut buf = [0u8; 4096];
                let mut n = 0u64;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let more: Vec<u8> = match kind {
                        Attack::Http2Ping => {
                            let mut f = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
                            f.extend_from_slice(&n.to_be_bytes());
                            f
                        }
                        Attack::Slowloris => format!("X-{n}: a\r\n").into_bytes(),
                    };
                    n += 1;
                    if conn.write_all(&more).await.is_err() {
                        break;
                    }
                    // Read what the server sends (SETTINGS, PING acks) until the next ping.
                    match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    (stop, opened)
}

/// Item 3: 520 connections from 9 loopback addresses, each an HTTP/2 client
/// pinging under the idle timeout, opened again whenever closed, cannot keep a
/// valid agent out (acknowledged within 1 s, default limits); nor can 520
/// slowloris connections keep `/healthz` from answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinging_connections_without_credentials_cannot_lock_agents_out() {
    allow_open_files(8192);
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let (grpc_stop, grpc_opened) = attack(agg.grpc_port, 520, 9, Attack::Http2Ping);
    let (http_stop, http_opened) = attack(agg.http_port, 520, 9, Attack::Slowloris);
    // Until every attacker has connected once and the server's slots are taken.
    let deadline = Instant::now() + Duration::from_secs(30);
    while grpc_opened.load(std::sync::atomic::Ordering::Relaxed) < 520
        || http_opened.load(std::sync::atomic::Ordering::Relaxed) < 520
    {
        assert!(Instant::now() < deadline, "attackers could not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start = now_s() - 60;
    for seq in 0..3u64 {
        let began = Instant::now();
        let ack = tokio::time::timeout(
            Duration::from_secs(1),
            send(agg.url(), vec![valid(seq, start + seq)]),
        )
        .await
        .unwrap_or_else(|_| panic!("attempt {seq}: a valid agent waited more than 1 s"))
        .unwrap_or_else(|s| panic!("attempt {seq}: {:?}: {}", s.code(), s.message()));
        assert_eq!(ack.stored, 1);
        println!("agent acknowledged in {:?}", began.elapsed());
        let began = Instant::now();
        let health = tokio::task::spawn_blocking({
            let port = agg.http_port;
            move || sci_tests::fleet::http_get(port, "/healthz")
        })
        .await
        .unwrap();
        let health_ms = began.elapsed().as_millis();
        assert_eq!(health.map(|(c, _)| c), Some(200));
        assert!(health_ms < 1000, "/healthz in {health_ms} ms");
        println!("/healthz in {health_ms} ms");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let m = agg.metrics();
    grpc_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    http_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for listener in ["grpc", "http"] {
        let series = |limit: &str| {
            metric_value(
                &m,
                &format!(
                    "sci_connections_refused_total{{listener=\"{listener}\",limit=\"{limit}\"}}"
                ),
            )
            .unwrap_or_else(|| panic!("no {limit} series for {listener}:\n{m}"))
        };
        let (timed_out, evicted) = (
            series("auth_timeout"),
            series("max_unauthenticated_connections"),
        );
        let unauthenticated = metric_value(
            &m,
            &format!("sci_connections_unauthenticated{{listener=\"{listener}\"}}"),
        )
        .unwrap();
        println!("{listener}: {timed_out} closed at auth_timeout, {evicted} evicted, {unauthenticated} unauthenticated open");
        assert!(evicted > 0, "{listener}");
        assert!(unauthenticated <= 128, "{listener}: {unauthenticated}");
    }
}

/// Item 3: at start-up the aggregator raises its open-file limit to what
/// its connection limits need, or refuses to start, saying why.
#[test]
fn the_open_file_limit_is_raised_or_start_up_refused() {
    use std::os::unix::process::CommandExt;
    fn spawn(dir: &std::path::Path, soft: u64, hard: u64) -> std::process::Child {
        let config = dir.join("aggregator.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\ndatabase = \"{}\"\n{TOKENS}",
                sci_tests::fleet::free_port(),
                sci_tests::fleet::free_port(),
                dir.join("sci.db").display()
            ),
        )
        .unwrap();
        let mut cmd =
            std::process::Command::new(sci_tests::cargo_bin("sci-aggregator", "sci-aggregator"));
        cmd.args(["serve", "--insecure", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }
    // Default limits: 512 connections per listener need 2 x 512 + 256 + 6 = 1,286.
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn(dir.path(), 1024, 1024);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running with 1,024 descriptors"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    println!("{stderr}");
    assert!(!status.success());
    assert!(
        stderr.contains("need 1286 file descriptors")
            && stderr.contains("hard open-file limit is 1024")
            && stderr.contains("limits.max_connections"),
        "{stderr}"
    );
    // A soft limit below the need and a hard limit above it: raised at start.
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn(dir.path(), 1024, 4096);
    let limits_file = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let soft = loop {
        assert!(child.try_wait().unwrap().is_none(), "exited");
        let text = std::fs::read_to_string(&limits_file).unwrap();
        let soft: u64 = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap();
        if soft != 1024 || Instant::now() > deadline {
            break soft;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, 1286);
}

/// Item 3: a connection that keeps pinging but never presents credentials
/// is closed at `auth_timeout`, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinging_connection_without_credentials_is_closed_at_auth_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        3600,
        &format!("{TOKENS}[limits]\nauth_timeout = \"1s\"\n"),
        true,
    );
    let (stop, opened) = attack(agg.grpc_port, 4, 2, Attack::Http2Ping);
    let began = Instant::now();
    let series = "sci_connections_refused_total{listener=\"grpc\",limit=\"auth_timeout\"}";
    loop {
        let closed = metric_value(&agg.metrics(), series).unwrap();
        if closed >= 4 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{closed} closed at auth_timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = began.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    println!(
        "4 pinging connections closed at auth_timeout after {elapsed:?} ({} opened)",
        opened.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    // An agent's connection, authenticated, outlives auth_timeout.
    let channel = channel(agg.url());
    let ack = send_on(channel.clone(), vec![valid(0, now_s() - 60)])
        .await
        .unwrap();
    assert_eq!(ack.stored, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = agg.metrics();
    assert_eq!(
        metric_value(&m, "sci_connections_open{listener=\"grpc\"}"),
        Some(1),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "sci_connections_unauthenticated{listener=\"grpc\"}"),
        Some(0),
        "{m}"
    );
    let ack = send_on(channel, vec![valid(1, now_s() - 59)])
        .await
        .unwrap();
    assert_eq!(ack.stored, 1);
}

/// Item 2: absurd but finite figures are refused by reason, on both stores,
/// and the fleet's figures stay the valid windows' (never null or infinite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_figures_are_refused_and_fleet_figures_stay_finite() {
    let test = "absurd_figures_are_refused_and_fleet_figures_stay_finite";
    // Windows straddling an hour boundary, as in the report.
    let hour = (now_s() - 7200) / 3600 * 3600 + 3600;
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let agg = Aggregator::start(dir.path(), 3600, &format!("{}{TOKENS}", store.toml), true);
        let mut seq = 0;
        let mut absurd = |f: &dyn Fn(&mut v1::WindowReport)| {
            let mut w = valid(seq, hour - 1 + seq * 2);
            w.end_unix_ns = w.start_unix_ns + 2_000_000_000;
            f(&mut w);
            seq += 1;
            w
        };
        let cases: Vec<(&str, v1::WindowReport)> = vec![
            ("implausible_carbon", absurd(&|w| w.host_carbon_g = 1e308)),
            (
                "implausible_carbon",
                absurd(&|w| w.scenarios[0].carbon_g = 1e308),
            ),
            ("implausible_pue", absurd(&|w| w.pue = 0.0)),
            ("implausible_pue", absurd(&|w| w.pue = 1e6)),
            ("implausible_cpus", absurd(&|w| w.cpus = 0)),
            (
                "implausible_energy",
                absurd(&|w| w.idle_energy_j = w.host_energy_j * 2.0),
            ),
            ("implausible_energy", absurd(&|w| w.host_energy_j = 2_000.0)),
            (
                "implausible_intensity",
                absurd(&|w| w.carbon_intensity_g_per_kwh = 1e308),
            ),
            (
                "implausible_embodied",
                absurd(&|w| w.host_embodied_g = 1e300),
            ),
            (
                "implausible_embodied",
                absurd(&|w| {
                    w.embodied = Some(v1::EmbodiedFactors {
                        total_embodied_g: 1e300,
                        lifespan_s: 1.0,
                        resource_share: 1.0,
                        share_source: "config".into(),
                    })
                }),
            ),
            (
                "implausible_requests",
                absurd(&|w| {
                    w.request_cpu.push(v1::RequestCpuHistogram {
                        scenario: "credit".into(),
                        service: "loan".into(),
                        counts: vec![0, 1 << 62],
                        sum_cpu_ns: 1 << 62,
                        energy_j_per_cpu_ns: 1e-9,
                        sub_bucket_bits: agent_common::REQUEST_CPU_SUB_BUCKET_BITS,
                    })
                }),
            ),
        ];
        for (kind, w) in cases {
            let ack = send(agg.url(), vec![w]).await.unwrap();
            let got = ack
                .refused
                .first()
                .map(|r| r.reason.clone())
                .unwrap_or_default();
            assert!(
                got.starts_with(kind),
                "{}: expected {kind}, got {got:?}",
                store.name
            );
            assert_eq!(ack.refused[0].code, v1::RefusalCode::Invalid as i32);
        }
        let mut expected_g = 0.0;
        for k in 0..2u64 {
            let mut w = valid(seq + k, hour - 1 + k * 2);
            w.end_unix_ns = w.start_unix_ns + 2_000_000_000;
            expected_g += w.host_carbon_g;
            assert_eq!(send(agg.url(), vec![w]).await.unwrap().stored, 1);
        }
        let e = agg.sci(hour - 3600, hour + 3600, 3600);
        let carbon = e["operational_g"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: operational_g is not a number: {e}", store.name));
        assert!(
            (carbon - expected_g).abs() <= 1e-9 * expected_g,
            "{}: {carbon} g, expected {expected_g}",
            store.name
        );
        for p in e["periods"].as_array().unwrap() {
            assert!(p["operational_g"].is_number(), "{}: {p}", store.name);
        }
    }
}

/// Item 6: on SIGTERM the aggregator stops taking batches, acknowledges
/// what it committed, ends the stream with UNAVAILABLE, and exits within its
/// grace period; every acknowledged window is stored, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_within_the_grace_period() {
    let test = "sigterm_ends_streams_and_exits_within_the_grace_period";
    for store in stores(test) {
        let dir = tempfile::tempdir().unwrap();
        let mut agg = Aggregator::start(
            dir.path(),
            3600,
            &format!("{}shutdown_grace = \"5s\"\n{TOKENS}", store.toml),
            true,
        );
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::AgentBatch>(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let mut client = IngestClient::new(channel(agg.url()));
        let mut acks = client.stream(request).await.unwrap().into_inner();
        let start = now_s() - 1000;
        let sender = tokio::spawn(async move {
            for seq in 0..600u64 {
                let batch = v1::AgentBatch {
                    host: "host-a".into(),
                    agent_instance: "inst".into(),
                    windows: vec![valid(seq, start + seq)],
                    sent_unix_ns: 0,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut acked = 0u64;
        let mut stopped_at = None;
        let end = loop {
            if acked == 10 && stopped_at.is_none() {
                // SAFETY: a signal to the child this test started.
                unsafe { libc::kill(agg.child.id() as i32, libc::SIGTERM) };
                stopped_at = Some(Instant::now());
            }
            match tokio::time::timeout(Duration::from_secs(20), acks.message()).await {
                Ok(Ok(Some(ack))) => acked += ack.stored,
                Ok(other) => break other,
                Err(_) => panic!("{}: no answer for 20 s", store.name),
            }
        };
        let stopped_at = stopped_at.unwrap();
        let ended_after = stopped_at.elapsed();
        sender.abort();
        let status = end.unwrap_err();
        println!(
            "{}: stream ended {ended_after:?} after SIGTERM: {:?} {}; {acked} acknowledged",
            store.name,
            status.code(),
            status.message()
        );
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(ended_after < Duration::from_secs(2), "{ended_after:?}");
        let exited = loop {
            if let Some(status) = agg.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                stopped_at.elapsed() < Duration::from_secs(7),
                "{}: still running 7 s after SIGTERM (grace 5 s)",
                store.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "{}: exited {exited} {:?} after SIGTERM",
            store.name,
            stopped_at.elapsed()
        );
        // Every acknowledged window is stored, and nothing else.
        agg.restart(true);
        let e = agg.sci(start - 10, now_s() + 10, 3600);
        let stored = sci_tests::fleet::periods_total(&e, "/windows");
        assert_eq!(stored, acked, "{}", store.name);
    }
}
