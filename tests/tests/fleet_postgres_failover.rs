//! Several aggregators, one store: two `sci-aggregator` processes on one
//! real PostgreSQL, and a real `sci-agent run` with both in its aggregator
//! list. The first aggregator is killed (SIGKILL) mid-run; the agent fails
//! over to the second and resumes from its acks. Then:
//! - every window the agent made is in the store exactly once: its seqs are
//!   0..n without a gap, and the rollups hold the raw windows' sums exactly
//!   once (a window committed twice would count twice there);
//! - the shared store's /api/v1/sci (SCI_CF per period and mean, O, M, R)
//!   equals that of a single aggregator on SQLite fed the same windows.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sci_agent::sinks::grpc::AggregatorConfig;
use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use sci_tests::fleet::{free_port, periods_total, Agent, Aggregator};
use sci_tests::postgres::ScratchPostgres;
use sci_tests::{cargo_bin, wait_until};

const HOST: &str = "pg-failover";
const TOKEN: &str = "token-pg-failover";

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// The agent's token; every period in the mean, however short the run (the
/// comparison is of the same windows, not of their coverage).
fn tokens() -> String {
    format!("min_coverage = 0.0\n[[agents]]\nhost = \"{HOST}\"\ntoken = \"{TOKEN}\"\n")
}

/// The windows stored in PostgreSQL for HOST, decoded, in (instance, seq) order.
fn stored_windows(pg: &ScratchPostgres, db: &str) -> Vec<v1::WindowReport> {
    let text = pg
        .psql_in(
            db,
            &format!(
                "SELECT encode(payload, 'hex') FROM windows_raw WHERE host = '{HOST}' \
                 ORDER BY agent_instance, seq"
            ),
        )
        .unwrap();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|hex| {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            v1::WindowReport::decode(&bytes[..]).unwrap()
        })
        .collect()
}

fn sql_numbers(pg: &ScratchPostgres, db: &str, sql: &str) -> Vec<f64> {
    pg.psql_in(db, sql)
        .unwrap()
        .trim()
        .split('|')
        .map(|v| {
            v.parse::<f64>()
                .unwrap_or_else(|e| panic!("{sql}: {v:?}: {e}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregators_on_one_postgresql_store_each_window_once_across_a_failover() {
    let test = "two_aggregators_on_one_postgresql_store_each_window_once_across_a_failover";
    let Some(pg) = ScratchPostgres::start_or_skip(test) else {
        return;
    };
    let db = "sci_failover";
    let url = pg.create_database(db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = format!("postgres_url = \"{url}\"\n{}", tokens());
    let mut dirs = BTreeMap::new();
    for name in ["a", "b", "single"] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        dirs.insert(name, d);
    }
    let mut a = Aggregator::start(&dirs["a"], 60, &shared, true);
    let b = Aggregator::start(&dirs["b"], 60, &shared, true);

    // The real agent, both aggregators in its list, transactions on UDP.
    let udp_port = free_port();
    let spool_dir = dir.path().join("spool");
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[agent]\nhost = \"{HOST}\"\ndatacenter = \"dc-pg\"\ninterval = \"1s\"\nspool_dir = \"{}\"\n\
             [ingest]\nudp_listen = \"127.0.0.1:{udp_port}\"\n\
             [aggregator]\nurl = \"{}\"\nurls = [\"{}\"]\ntoken = \"{TOKEN}\"\nmax_backoff = \"500ms\"\n",
            spool_dir.display(),
            a.url(),
            b.url()
        ),
    )
    .unwrap();
    let mut agent = Command::new(cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--insecure", "--config"])
        .arg(&agent_config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"credit 1\nquery 3\n", ("127.0.0.1", udp_port));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let wait = |what: &str, agg: &Aggregator, n: u64, agent: &mut std::process::Child| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while agg.windows_ingested("accepted") < n {
            if let Ok(Some(status)) = agent.try_wait() {
                panic!("the agent exited ({status}):\n{}", agent_log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: fewer than {n} windows after 60 s; agent log:\n{}",
                agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("aggregator A", &a, 6, &mut agent);
    a.kill_9();
    wait("aggregator B after A was killed", &b, 6, &mut agent);
    // SIGTERM: the agent stops; what it had not delivered stays in its spool.
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    let status = agent.wait().unwrap();
    assert!(status.success(), "agent: {status}; log:\n{}", agent_log());
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    // The rest of its spool through B (the agent's own forwarder).
    let leftover = Agent::start(
        &spool_dir,
        AggregatorConfig {
            url: Some(b.url()),
            token: Some(TOKEN.into()),
            max_backoff: Duration::from_millis(500),
            ..Default::default()
        },
        "unused-new-instance",
    );
    leftover.drained(Duration::from_secs(30)).await;
    drop(leftover);

    // Exactly once: seqs 0..n per instance, each once.
    let windows = stored_windows(&pg, db);
    let n = windows.len() as u64;
    assert!(n >= 12, "only {n} windows stored");
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for w in &windows {
        seqs.entry(w.agent_instance.clone())
            .or_default()
            .push(w.seq);
    }
    for (instance, s) in &seqs {
        let expected: Vec<u64> = (0..s.len() as u64).collect();
        assert_eq!(s, &expected, "instance {instance}: seqs not 0..n once each");
    }
    assert!(
        windows
            .iter()
            .any(|w| w.scenarios.iter().any(|s| s.transactions > 0)),
        "no transactions reached the windows"
    );
    // Rollups hold each window once.
    let host_s: f64 = windows
        .iter()
        .map(|w| (w.end_unix_ns - w.start_unix_ns) as f64 / 1e9)
        .sum();
    let energy_j: f64 = windows.iter().map(|w| w.host_energy_j).sum();
    let carbon_g: f64 = windows.iter().map(|w| w.host_carbon_g).sum();
    let rolled = sql_numbers(
        &pg,
        db,
        &format!(
            "SELECT SUM(host_s), SUM(energy_j), SUM(carbon_g) FROM host_rollup WHERE host = '{HOST}'"
        ),
    );
    assert!(close(rolled[0], host_s), "host_s {} vs {host_s}", rolled[0]);
    assert!(
        close(rolled[1], energy_j),
        "energy {} vs {energy_j}",
        rolled[1]
    );
    assert!(
        close(rolled[2], carbon_g),
        "carbon {} vs {carbon_g}",
        rolled[2]
    );
    let ended = sql_numbers(&pg, db, "SELECT SUM(windows_ended) FROM fleet_rollup");
    assert_eq!(ended[0].round() as u64, n);

    // The same windows through one aggregator on SQLite.
    let single = Aggregator::start(&dirs["single"], 60, &tokens(), true);
    let mut client = IngestClient::connect(single.url()).await.unwrap();
    let batches: Vec<v1::AgentBatch> = seqs
        .keys()
        .flat_map(|instance| {
            let of_instance: Vec<v1::WindowReport> = windows
                .iter()
                .filter(|w| &w.agent_instance == instance)
                .cloned()
                .collect();
            of_instance
                .chunks(64)
                .map(|chunk| v1::AgentBatch {
                    host: HOST.into(),
                    agent_instance: instance.clone(),
                    windows: chunk.to_vec(),
                    sent_unix_ns: 0,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let sent = batches.len();
    let mut request = tonic::Request::new(tokio_stream::iter(batches));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut acks = client.stream(request).await.unwrap().into_inner();
    let mut stored = 0;
    for _ in 0..sent {
        let ack = acks.message().await.unwrap().unwrap();
        assert!(ack.refused.is_empty(), "refused: {:?}", ack.refused);
        stored += ack.stored;
    }
    assert_eq!(stored, n);
    wait_until("the single aggregator's windows", || {
        single.windows_ingested("accepted") == n
    });

    let from = windows.iter().map(|w| w.start_unix_ns).min().unwrap() / 1_000_000_000 / 60 * 60;
    let to = windows.iter().map(|w| w.end_unix_ns).max().unwrap() / 1_000_000_000 + 61;
    let shared_sci = b.sci(from, to, 60);
    let single_sci = single.sci(from, to, 60);
    assert_eq!(periods_total(&shared_sci, "/windows"), n);
    assert_eq!(periods_total(&single_sci, "/windows"), n);
    assert!(
        shared_sci["sci_cf_mean"].as_f64().is_some(),
        "SCI_CF undefined: {shared_sci}"
    );
    for key in [
        "sci_cf_mean",
        "sci_cf_pooled",
        "operational_g",
        "embodied_g",
        "energy_j",
        "business_units",
    ] {
        match (shared_sci[key].as_f64(), single_sci[key].as_f64()) {
            (Some(x), Some(y)) => {
                assert!(close(x, y), "{key}: PostgreSQL {x} vs single SQLite {y}")
            }
            (None, None) => {}
            (x, y) => panic!("{key}: PostgreSQL {x:?} vs single SQLite {y:?}"),
        }
    }
    let per_period = |e: &serde_json::Value| -> Vec<(u64, Option<f64>)> {
        e["periods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["start_unix_s"].as_u64().unwrap(),
                    p["sci_g_per_unit"].as_f64(),
                )
            })
            .collect()
    };
    let (p_shared, p_single) = (per_period(&shared_sci), per_period(&single_sci));
    assert_eq!(p_shared.len(), p_single.len());
    assert!(
        p_shared.iter().any(|(_, sci)| sci.is_some()),
        "no period with SCI_j defined: {shared_sci}"
    );
    for ((s1, x), (s2, y)) in p_shared.iter().zip(&p_single) {
        assert_eq!(s1, s2);
        match (x, y) {
            (Some(x), Some(y)) => assert!(close(*x, *y), "period {s1}: {x} vs {y}"),
            (None, None) => {}
            _ => panic!("period {s1}: SCI_j {x:?} vs {y:?}"),
        }
    }
    println!(
        "{n} windows in {} instance(s), SCI_CF mean {} (PostgreSQL, two aggregators) = {} (SQLite, one)",
        seqs.len(),
        shared_sci["sci_cf_mean"],
        single_sci["sci_cf_mean"]
    );
}
