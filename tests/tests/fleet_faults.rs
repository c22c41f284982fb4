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
use sci_tests::fleet::{metric_value, now_s, window, Agent, Aggregator};
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
    let mut client = IngestClient::new(channel(url));
    let mut request = tonic::Request::new(tokio_stream::iter(vec![v1::AgentBatch {
        host: "host-a".into(),
        agent_instance: "inst".into(),
        windows,
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
    let energy_j = 5.0;
    let carbon_g = energy_j / 3.6e6 * 530.6 * 1.2;
    let mut w = window(
        "host-a",
        "inst",
        seq,
        start_s,
        1,
        energy_j,
        carbon_g,
        0.001,
        [1, 0, 0, 2],
    );
    w.pue = 1.2;
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
