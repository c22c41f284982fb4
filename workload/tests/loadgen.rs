//! `sci-loadgen` against real services: a short compressed day sends the
//! number of requests the shape integrates to (hand-computed), every request
//! is answered (sent = ok + failed), and the completed counts match what the
//! services reported: UDP ingest for the dedicated roles, marker counters of
//! the shared role.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, IngestSink, ServiceProcess, SCENARIOS};

struct Fleet {
    _dir: tempfile::TempDir,
    sink: IngestSink,
    dedicated: Vec<(&'static str, ServiceProcess)>,
    shared: ServiceProcess,
}

fn start_fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let sink = IngestSink::bind();
    let dedicated = SCENARIOS
        .iter()
        .map(|s| {
            (
                *s,
                ServiceProcess::start(
                    s,
                    Some(sink.addr()),
                    &dir.path().join(format!("{s}.sqlite")),
                ),
            )
        })
        .collect();
    let shared = ServiceProcess::start("shared", None, &dir.path().join("shared.sqlite"));
    Fleet {
        _dir: dir,
        sink,
        dedicated,
        shared,
    }
}

fn loadgen(fleet: &Fleet, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sci-loadgen"));
    for (role, svc) in &fleet.dedicated {
        cmd.arg("--target").arg(format!("{role}={}", svc.addr));
    }
    cmd.arg("--target")
        .arg(format!("shared={}", fleet.shared.addr));
    cmd.args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn check_report(fleet: &Fleet, report: &serde_json::Value) {
    let mut dedicated_ok = HashMap::new();
    let mut shared_stats = Client::connect(fleet.shared.addr).stats();
    for s in SCENARIOS {
        let r = &report["scenarios"][s];
        let n = |k: &str| r[k].as_u64().unwrap();
        assert_eq!(n("transport_errors"), 0, "{s}");
        assert_eq!(n("sent"), n("ok") + n("failed"), "{s}");
        for kind in ["dedicated", "shared"] {
            let c = &r[kind];
            assert_eq!(
                c["sent"].as_u64().unwrap(),
                c["ok"].as_u64().unwrap() + c["failed"].as_u64().unwrap(),
                "{s} {kind}"
            );
        }
        assert_eq!(
            n("ok"),
            r["dedicated"]["ok"].as_u64().unwrap() + r["shared"]["ok"].as_u64().unwrap()
        );
        dedicated_ok.insert(s.to_string(), r["dedicated"]["ok"].as_u64().unwrap());
        // The shared service marked exactly the completed flows it answered.
        let shared = shared_stats.remove(s).unwrap();
        assert_eq!(
            shared["marker_completed"],
            r["shared"]["ok"].as_u64().unwrap(),
            "{s}"
        );
        assert_eq!(
            shared["marker_failed"],
            r["shared"]["failed"].as_u64().unwrap(),
            "{s}"
        );
    }
    // The dedicated services reported exactly the completed flows over UDP.
    dedicated_ok.retain(|_, v| *v > 0);
    let received = fleet
        .sink
        .collect(&dedicated_ok, Duration::from_millis(400));
    assert_eq!(received, dedicated_ok);
}

#[test]
fn a_compressed_day_sends_the_shape_integral_and_every_completion_is_reported() {
    let fleet = start_fleet();
    // One whole day in 4 s at 60 rps peak: 60 * 4 * 13.6875/24 = 136.875,
    // so 136 requests (the shape module's hand-computed daily mean). The
    // last tick issues what is due up to 4 s, so this holds however slowly
    // the (debug-build) services answer.
    let out = loadgen(
        &fleet,
        &[
            "--duration",
            "4s",
            "--day-seconds",
            "4",
            "--peak-rps",
            "60",
            "--concurrency",
            "16",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("t=")).collect();
    assert!(progress.len() >= 3, "{stderr}");
    assert!(progress[0].starts_with("t=1s rps="), "{}", progress[0]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    println!("{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let sent = report["total"]["sent"].as_u64().unwrap();
    assert!((135..=137).contains(&sent), "sent {sent}");
    assert_eq!(report["interrupted"], false);
    // The default mix 1:2:3:10 reaches every scenario, both target kinds.
    for s in SCENARIOS {
        assert!(report["scenarios"][s]["sent"].as_u64().unwrap() > 0, "{s}");
    }
    let shared_sent: u64 = SCENARIOS
        .iter()
        .map(|s| report["scenarios"][s]["shared"]["sent"].as_u64().unwrap())
        .sum();
    assert!(shared_sent > 0 && shared_sent < sent, "{shared_sent}");
    check_report(&fleet, &report);
}

#[test]
fn sigint_ends_the_run_early_with_a_complete_report() {
    let fleet = start_fleet();
    let mut child = loadgen(
        &fleet,
        &[
            "--duration",
            "60s",
            "--day-seconds",
            "60",
            "--start-hour",
            "12",
            "--peak-rps",
            "30",
        ],
    )
    .spawn()
    .unwrap();
    // Ready once the run is under way: its first progress line (after 1 s).
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "sci-loadgen ended before its first progress line");
        if line.starts_with("t=") {
            break;
        }
    }
    // The rest of stderr is drained, so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    drain.join().unwrap();
    assert!(status.success(), "{status}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["interrupted"], true);
    assert!(report["elapsed_s"].as_f64().unwrap() < 10.0);
    assert!(report["total"]["sent"].as_u64().unwrap() > 0);
    check_report(&fleet, &report);
}

#[test]
fn bad_arguments_are_named() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sci-loadgen"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&["--target", "credit=10.0.0.1:7000"]).contains("not a loopback address"));
    assert!(run(&["--target", "loan=127.0.0.1:7000"]).contains("loan"));
    assert!(
        run(&["--target", "query=127.0.0.1:7000", "--mix", "credit=1"]).contains("no scenario")
    );
    assert!(run(&["--target", "query=127.0.0.1:7000", "--peak-rps", "0"]).contains("--peak-rps"));
}
