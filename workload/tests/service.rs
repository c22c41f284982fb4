//! `sci-finance-service` as a real process: every role answers its flows,
//! dedicated roles report exactly their completed transactions over UDP,
//! the shared role marks every flow with sci-marker, bad input is answered
//! and the service keeps serving, SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, IngestSink, ServiceProcess, SCENARIOS};

/// The services under test are built with the same profile as this test.
const PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

fn comm_of(pid: i32) -> (String, Vec<String>) {
    let process = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let path = t.unwrap().path().join("comm");
            std::fs::read_to_string(path).unwrap().trim().to_string()
        })
        .collect();
    (process.trim().to_string(), threads)
}

/// Sends `n` flows of `scenario`; returns (ok, failed) from the answers.
fn send_flows(client: &mut Client, scenario: &str, n: u32, prefix: &str) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    for i in 0..n {
        let id = format!("{prefix}-{scenario}-{i}");
        let answer = client.ask(&format!("{scenario} {id}"));
        if answer == format!("ok {id}") {
            ok += 1;
        } else {
            assert!(
                answer.starts_with(&format!("err {id} ")),
                "answer `{answer}`"
            );
            assert!(!answer.contains("internal"), "answer `{answer}`");
            failed += 1;
        }
    }
    (ok, failed)
}

fn dedicated_role(scenario: &str, n: u32) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{scenario}.sqlite"));
    let sink = IngestSink::bind();
    let service = ServiceProcess::start(scenario, Some(sink.addr()), &db);

    let (process, threads) = comm_of(service.pid());
    let comm = format!("cf-{scenario}");
    assert_eq!(process, comm);
    assert!(threads.iter().all(|t| *t == comm), "{threads:?}");

    let mut client = Client::connect(service.addr);
    let (ok, failed) = send_flows(&mut client, scenario, n, "t");
    assert_eq!(ok + failed, u64::from(n));
    assert!(ok > 0, "{scenario}: no flow completed");
    // A scenario of another role is refused and counted nowhere.
    let other = SCENARIOS.iter().find(|s| **s != scenario).unwrap();
    assert_eq!(
        client.ask(&format!("{other} x-1")),
        format!("err x-1 wrong-role this service is {scenario}")
    );

    let stats = client.stats();
    let own = &stats[scenario];
    assert_eq!(own["ok"], ok);
    assert_eq!(own["failed"], failed);
    assert_eq!(own["errors"], 0);
    for s in SCENARIOS {
        // Dedicated roles never call the markers.
        assert_eq!(
            stats[s]["marker_completed"] + stats[s]["marker_failed"],
            0,
            "{s}"
        );
    }
    println!(
        "{scenario} (dedicated, {PROFILE} build): {ok} ok, {failed} failed, worker CPU {:.1} us per flow",
        own["cpu_ns"] as f64 / f64::from(n) / 1000.0
    );

    let expected = HashMap::from([(scenario.to_string(), ok)]);
    let received = sink.collect(&expected, Duration::from_millis(400));
    assert_eq!(received, expected, "ingest datagrams");

    let status = service.terminate();
    assert!(status.success(), "{status}");
    // Exactly the datagrams for the completed flows, nothing more at exit.
    let after = sink.collect(&HashMap::new(), Duration::from_millis(300));
    assert!(after.is_empty(), "{after:?}");

    // The database holds the records of the flows.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let count = |table: &str| -> u64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    };
    match scenario {
        "credit" => {
            assert_eq!(count("applications"), u64::from(n));
            let approved: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM applications WHERE decision = 'approved'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(approved as u64, ok);
        }
        "drawdown" => {
            let new_payouts: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM payouts WHERE request_id LIKE 't-drawdown-%'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(new_payouts as u64, ok);
        }
        "repayment" => {
            assert_eq!(count("debits"), u64::from(n));
            assert_eq!(count("notices"), 3 * u64::from(n));
            assert_eq!(count("collections"), failed);
        }
        _ => assert_eq!(count("bureau"), 50_000),
    }
}

#[test]
fn credit_role_answers_and_reports_completed_transactions() {
    dedicated_role("credit", 30);
}

#[test]
fn drawdown_role_answers_and_reports_completed_transactions() {
    dedicated_role("drawdown", 120);
}

#[test]
fn repayment_role_answers_and_reports_completed_transactions() {
    dedicated_role("repayment", 120);
}

#[test]
fn query_role_answers_and_reports_completed_transactions() {
    dedicated_role("query", 200);
}

#[test]
fn shared_role_serves_all_four_scenarios_and_marks_every_flow() {
    let dir = tempfile::tempdir().unwrap();
    let service = ServiceProcess::start("shared", None, &dir.path().join("shared.sqlite"));
    let (process, threads) = comm_of(service.pid());
    assert_eq!(process, "cf-shared");
    assert!(threads.iter().all(|t| t == "cf-shared"), "{threads:?}");

    let mut client = Client::connect(service.addr);
    let mut answers = HashMap::new();
    for (scenario, n) in [
        ("credit", 20),
        ("drawdown", 60),
        ("repayment", 60),
        ("query", 100),
    ] {
        answers.insert(scenario, send_flows(&mut client, scenario, n, "s"));
    }
    let stats = client.stats();
    for scenario in SCENARIOS {
        let (ok, failed) = answers[scenario];
        assert!(ok > 0, "{scenario}");
        assert_eq!(stats[scenario]["ok"], ok, "{scenario}");
        assert_eq!(stats[scenario]["failed"], failed, "{scenario}");
        // One marker begin/end per flow, `ok` exactly for the completed ones.
        assert_eq!(stats[scenario]["marker_completed"], ok, "{scenario}");
        assert_eq!(stats[scenario]["marker_failed"], failed, "{scenario}");
        println!(
            "{scenario} (shared, {PROFILE} build): {ok} ok, {failed} failed, worker CPU {:.1} us per flow",
            stats[scenario]["cpu_ns"] as f64 / (ok + failed) as f64 / 1000.0
        );
    }
    assert_eq!(
        service.terminate().code(),
        Some(0),
        "exit status (None: killed by a signal)"
    );
}

#[test]
fn bad_lines_are_answered_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let service = ServiceProcess::start("query", None, &dir.path().join("q.sqlite"));
    let mut client = Client::connect(service.addr);
    assert!(client.ask("query").starts_with("err - bad-request"));
    assert!(client.ask("query a b").starts_with("err - bad-request"));
    assert_eq!(client.ask("loan q-1"), "err q-1 unknown-scenario");
    let long = format!("query {}", "x".repeat(400));
    assert!(client
        .ask(&long)
        .starts_with("err - bad-request line longer than 256"));
    let answer = client.ask("query q-2");
    assert!(
        answer == "ok q-2" || answer.starts_with("err q-2 invalid-token"),
        "{answer}"
    );
    let stats = client.stats();
    assert_eq!(stats["query"]["ok"] + stats["query"]["failed"], 1);
    assert_eq!(
        service.terminate().code(),
        Some(0),
        "exit status (None: killed by a signal)"
    );
}

#[test]
fn misuse_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sci-finance-service"))
            .args(args)
            .arg("--db")
            .arg(dir.path().join("x.sqlite"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[
        "--role",
        "shared",
        "--listen",
        "127.0.0.1:0",
        "--ingest-udp",
        "127.0.0.1:9",
    ]);
    assert!(
        err.contains("--ingest-udp") && err.contains("sci-marker"),
        "{err}"
    );
    let err = run(&["--role", "query", "--listen", "0.0.0.0:0"]);
    assert!(err.contains("not a loopback address"), "{err}");
    let err = run(&["--role", "loan", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("loan"), "{err}");
}

#[test]
fn sigterm_answers_the_flow_in_progress_and_reports_it() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let sink = IngestSink::bind();
    let service = ServiceProcess::start("credit", Some(sink.addr()), &dir.path().join("c.sqlite"));
    let mut stream = std::net::TcpStream::connect(service.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    const BURST: u64 = 40;
    let burst: String = (0..BURST).map(|i| format!("credit stop-{i}\n")).collect();
    stream.write_all(burst.as_bytes()).unwrap();
    // Ready when the service is working through the burst: its first flow is
    // done (the service's own counters, asked on a second connection).
    let mut observer = Client::connect(service.addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let done_before_signal = loop {
        let credit = observer.stats().remove("credit").unwrap();
        let done = credit["ok"] + credit["failed"] + credit["errors"];
        if done > 0 {
            break done;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service never started the burst"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    drop(observer);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(service.pid(), libc::SIGTERM) };
    let mut ok = 0u64;
    let mut answered = 0;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let id = format!("stop-{answered}");
        assert!(
            line == format!("ok {id}") || line.starts_with(&format!("err {id} ")),
            "answer `{line}` to {id}"
        );
        ok += u64::from(line.starts_with("ok "));
        answered += 1;
    }
    println!(
        "SIGTERM during a burst of {BURST} credit flows, {done_before_signal} done before it: {answered} answered, {ok} ok"
    );
    // The flows done before the signal, and the one in progress when it came
    // (if the burst was not over yet), are all answered.
    assert!(
        answered >= (done_before_signal + 1).min(BURST),
        "{answered} answered, {done_before_signal} done before SIGTERM: the flow in progress was not answered"
    );
    assert_eq!(
        service.terminate().code(),
        Some(0),
        "exit status (None: killed by a signal)"
    );
    let expected: HashMap<String, u64> = if ok > 0 {
        HashMap::from([("credit".to_string(), ok)])
    } else {
        HashMap::new()
    };
    assert_eq!(
        sink.collect(&expected, Duration::from_millis(300)),
        expected
    );
}
