//! The fleet over loopback: real `sci-aggregator` processes, the agent's real
//! spool and forwarder, real gRPC and SQLite. SCI_CF per period is checked
//! against a hand computation from the windows sent; faults (aggregator
//! killed with SIGKILL, agent restarted, connection cut) must leave every
//! window counted exactly once.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::Spool;
use sci_tests::fleet::{carbon_g, now_s, periods_total, window, Agent, Aggregator};

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a-0123456789\"\n[[agents]]\nhost = \"host-b\"\ntoken = \"token-b-0123456789\"\n";

/// An agent on its own 64 MiB spool, forwarding to `url` with `token`.
fn start_agent(dir: &Path, url: &str, token: &str, instance: &str) -> Agent {
    let spool = Spool::open(dir, 64 * 1024 * 1024, instance).unwrap();
    let cfg = AggregatorConfig {
        url: Some(url.into()),
        token: Some(token.into()),
        max_backoff: Duration::from_millis(500),
        batch_windows: 16,
        ..Default::default()
    };
    Agent::with_spool(spool, cfg)
}

/// Per period: host a's energy, embodied carbon and transactions, then host b's.
type PeriodPlan = (f64, f64, [u64; 4], f64, f64, [u64; 4]);

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sci_per_period_equals_the_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 10, TOKENS, true);
    // Three 10 s periods in the recent past; each host sends two 5 s windows per period.
    let base = (now_s() / 10 - 5) * 10;
    let a = start_agent(
        &dir.path().join("spool-a"),
        &agg.url(),
        "token-a-0123456789",
        "inst-a",
    );
    let b = start_agent(
        &dir.path().join("spool-b"),
        &agg.url(),
        "token-b-0123456789",
        "inst-b",
    );
    // (period, host a: energy J, embodied g, txns), (host b: ...); the
    // operational carbon follows from the energy (530.6 g/kWh, PUE 1).
    let plan: [PeriodPlan; 3] = [
        (2000.0, 0.5, [1, 2, 3, 10], 1000.0, 0.25, [0, 1, 0, 5]),
        (3000.0, 0.5, [0, 0, 0, 0], 2000.0, 0.25, [0, 0, 0, 0]), // R = 0: undefined
        (1500.0, 0.5, [2, 0, 1, 4], 500.0, 0.25, [1, 1, 1, 1]),
    ];
    let mut seq_a = 0;
    let mut seq_b = 0;
    for (j, (ea, ma, ta, eb, mb, tb)) in plan.iter().enumerate() {
        for half in 0..2u64 {
            let start = base + 10 * j as u64 + 5 * half;
            // Each window carries half the period's figures; transactions all in the first half.
            let txa = if half == 0 { *ta } else { [0; 4] };
            let txb = if half == 0 { *tb } else { [0; 4] };
            a.push(&window(
                "host-a",
                "inst-a",
                seq_a,
                start,
                5,
                ea / 2.0,
                ma / 2.0,
                txa,
            ));
            b.push(&window(
                "host-b",
                "inst-b",
                seq_b,
                start,
                5,
                eb / 2.0,
                mb / 2.0,
                txb,
            ));
            seq_a += 1;
            seq_b += 1;
        }
    }
    a.drained(Duration::from_secs(20)).await;
    b.drained(Duration::from_secs(20)).await;

    let e = agg.sci(base, base + 30, 10);
    let periods = e["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 3);
    let weights = [24.0, 7.0, 3.0, 1.0];
    let mut defined = Vec::new();
    let (mut total_om, mut total_r) = (0.0, 0.0);
    for (j, (ea, ma, ta, eb, mb, tb)) in plan.iter().enumerate() {
        let o = carbon_g(ea + eb, 1.0);
        let m = ma + mb;
        let r: f64 = (0..4).map(|i| weights[i] * (ta[i] + tb[i]) as f64).sum();
        let p = &periods[j];
        assert!(close(p["operational_g"].as_f64().unwrap(), o), "O_{j}: {p}");
        assert!(close(p["embodied_g"].as_f64().unwrap(), m), "M_{j}: {p}");
        assert!(
            close(p["business_units"].as_f64().unwrap(), r),
            "R_{j}: {p}"
        );
        assert_eq!(p["windows"], 4);
        if r > 0.0 {
            let sci = (o + m) / r;
            assert!(
                close(p["sci_g_per_unit"].as_f64().unwrap(), sci),
                "SCI_{j}: {p}"
            );
            defined.push(sci);
        } else {
            assert!(
                p["sci_g_per_unit"].is_null(),
                "period {j} must be undefined: {p}"
            );
            assert!(p["undefined_reason"].as_str().unwrap().contains("R = 0"));
        }
        total_om += o + m;
        total_r += r;
    }
    let mean = defined.iter().sum::<f64>() / defined.len() as f64;
    println!(
        "hand computation: SCI_j = {defined:?}, mean {mean}, pooled {}",
        total_om / total_r
    );
    assert!(close(e["sci_cf_mean"].as_f64().unwrap(), mean));
    assert!(close(
        e["sci_cf_pooled"].as_f64().unwrap(),
        total_om / total_r
    ));
    assert_eq!(e["periods_defined"], 2);
    assert_eq!(e["weights"]["credit"], 24.0);
    // Per scenario: carbon per transaction and the measured weight next to the standard's.
    let credit = e["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scenario"] == "credit")
        .unwrap();
    assert_eq!(credit["transactions"], 4);
    assert_eq!(credit["standard_weight"], 24.0);
    // Every scenario record of a window carries an eighth of its carbon, so
    // credit and query carry the same carbon: the measured weight is the
    // ratio of their transactions, 20 queries to 4 credits.
    let credit_txns: u64 = plan.iter().map(|p| p.2[0] + p.5[0]).sum();
    let query_txns: u64 = plan.iter().map(|p| p.2[3] + p.5[3]).sum();
    assert_eq!((credit_txns, query_txns), (4, 20));
    let measured_weight = credit["measured_weight"].as_f64().unwrap();
    assert!(
        close(measured_weight, query_txns as f64 / credit_txns as f64),
        "credit's measured weight {measured_weight}, by hand 20 / 4 = 5: {credit}"
    );
    assert_eq!(e["hosts"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_faults_never_lose_or_double_count_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let start = now_s() - 600;
    let spool_dir = dir.path().join("spool-a");
    let mut agent = start_agent(&spool_dir, &agg.url(), "token-a-0123456789", "inst-a");
    let mut expected_carbon = 0.0;
    let mut sent = 0u64;
    let mut push = |agent: &Agent, n: u64| {
        for _ in 0..n {
            let energy_j = (sent + 1) as f64;
            agent.push(&window(
                "host-a",
                "inst-a",
                sent,
                start + sent,
                1,
                energy_j,
                0.0,
                [0, 0, 0, 1],
            ));
            expected_carbon += carbon_g(energy_j, 1.0);
            sent += 1;
        }
    };
    push(&agent, 1);
    agent.drained(Duration::from_secs(30)).await;
    // SIGKILL the aggregator while windows stream, then restart it on the same
    // database. It is frozen first (SIGSTOP) so the stream stays open and
    // nothing more is acknowledged: the spool, read before the kill, proves
    // the windows were still unacknowledged when it died.
    // SAFETY: signals to the child process this test started.
    unsafe { libc::kill(agg.child.id() as i32, libc::SIGSTOP) };
    push(&agent, 39);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending_at_kill = agent.pending();
    agg.kill_9();
    assert_eq!(pending_at_kill, 39, "windows unacknowledged at the kill");
    push(&agent, 40);
    tokio::time::sleep(Duration::from_millis(700)).await;
    agg.restart(true);
    push(&agent, 20);
    agent.drained(Duration::from_secs(30)).await;

    // Kill the agent (its forwarder) with windows still spooled; a new one resumes from the spool.
    agg.kill_9();
    push(&agent, 30);
    drop(agent);
    agg.restart(true);
    agent = start_agent(
        &spool_dir,
        &agg.url(),
        "token-a-0123456789",
        "ignored-new-instance",
    );
    assert_eq!(
        agent.spool.lock().unwrap().agent_instance(),
        "inst-a",
        "the spool keeps the instance"
    );
    assert_eq!(
        agent.spool.lock().unwrap().next_seq(),
        sent,
        "the sequence resumes"
    );
    agent.drained(Duration::from_secs(30)).await;

    // A replay of everything (a spool that lost its acks) changes nothing,
    // and each replayed window is counted as a duplicate.
    let duplicates_before = agg.windows_ingested("duplicate");
    let replay_dir = dir.path().join("spool-replay");
    let replay = start_agent(&replay_dir, &agg.url(), "token-a-0123456789", "inst-a");
    for seq in 0..sent {
        replay.push(&window(
            "host-a",
            "inst-a",
            seq,
            start + seq,
            1,
            (seq + 1) as f64,
            0.0,
            [0, 0, 0, 1],
        ));
    }
    replay.drained(Duration::from_secs(30)).await;

    let e = agg.sci(start - 10, now_s() + 10, 3600);
    let windows = periods_total(&e, "/windows");
    let queries = periods_total(&e, "/transactions/query");
    let carbon = e["operational_g"].as_f64().unwrap();
    println!("sent {sent} windows; aggregator holds {windows}, {queries} transactions, {carbon} g (expected {expected_carbon} g)");
    assert_eq!(windows, sent, "every window exactly once");
    assert_eq!(queries, sent);
    assert!(close(carbon, expected_carbon));
    let duplicates = agg.windows_ingested("duplicate") - duplicates_before;
    println!("replayed {sent} windows: {duplicates} counted as duplicates");
    assert_eq!(
        duplicates, sent,
        "sci_ingest_windows_total{{result=\"duplicate\"}} must grow by the windows replayed"
    );
}
