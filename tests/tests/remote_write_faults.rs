//! Remote-write under faults, from a real `sci-aggregator` to a receiver
//! on loopback that decodes every request (snappy, protobuf) and answers
//! as told: down (connection refused) for a minute, 503, 429 with
//! Retry-After, 400 once, slower than the exporter's timeout. Afterwards
//! every step of the store is in the receiver except the one request the
//! 400 refused, whose samples are exactly those counted as dropped; the
//! counters' last values equal the store's sums (nothing lost, nothing
//! counted twice), and each fault is counted under its outcome.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use sci_agent::sinks::grpc::AggregatorConfig;
use sci_agent::sinks::spool::Spool;
use sci_aggregator::export::prompb::WriteRequest;
use sci_tests::fleet::{
    free_port, metric_value, now_s, read_http_request, window, Agent, Aggregator,
};
use tokio::io::AsyncWriteExt;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Unavailable,
    TooMany,
    BadOnce,
    SlowOnce,
}

#[derive(Default)]
struct Received {
    /// (series name + labels) -> timestamp ms -> value, of accepted requests.
    series: BTreeMap<String, BTreeMap<i64, f64>>,
    refused_samples: u64,
    refused_timestamps: Vec<i64>,
    headers_ok: bool,
}

struct Receiver {
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Received>>,
}

impl Receiver {
    /// Serves on `port` until the returned task is aborted.
    fn serve(&self, port: u16) -> tokio::task::JoinHandle<()> {
        let (mode, got) = (Arc::clone(&self.mode), Arc::clone(&self.got));
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (mode, got) = (Arc::clone(&mode), Arc::clone(&got));
                tokio::spawn(async move {
                    while let Some((head, body)) = read_http_request(&mut s).await {
                        let request = WriteRequest::decode(
                            snap::raw::Decoder::new()
                                .decompress_vec(&body)
                                .unwrap()
                                .as_slice(),
                        )
                        .unwrap();
                        let current = *mode.lock().unwrap();
                        let answer = match current {
                            Mode::Ok | Mode::SlowOnce => {
                                if current == Mode::SlowOnce {
                                    *mode.lock().unwrap() = Mode::Ok;
                                    // Longer than the exporter's 1 s timeout: it gives up and resends.
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                }
                                let mut g = got.lock().unwrap();
                                g.headers_ok = head.contains("content-encoding: snappy")
                                    && head.contains("content-type: application/x-protobuf")
                                    && head.contains("x-prometheus-remote-write-version: 0.1.0");
                                for ts in &request.timeseries {
                                    let key = format!("{:?}", ts.labels.iter().map(|l| (&l.name, &l.value)).collect::<Vec<_>>());
                                    let points = g.series.entry(key).or_default();
                                    for s in &ts.samples {
                                        points.insert(s.timestamp, s.value);
                                    }
                                }
                                "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_string()
                            }
                            Mode::Unavailable => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".into(),
                            Mode::TooMany => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 4\r\n\r\nslow".into(),
                            Mode::BadOnce => {
                                // The next request is the slow one: set here,
                                // not by the test after it saw the 400, so the
                                // exporter cannot send it in between.
                                *mode.lock().unwrap() = Mode::SlowOnce;
                                let mut g = got.lock().unwrap();
                                for ts in &request.timeseries {
                                    g.refused_samples += ts.samples.len() as u64;
                                    g.refused_timestamps.extend(ts.samples.iter().map(|s| s.timestamp));
                                }
                                "HTTP/1.1 400 Bad Request\r\ncontent-length: 16\r\n\r\nout of bounds!!!".into()
                            }
                        };
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    }
}

fn outcome(agg: &Aggregator, outcome: &str) -> u64 {
    metric_value(
        &agg.metrics(),
        &format!("sci_remote_write_requests_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0)
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_and_only_refused_requests_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(dir.path(), 60, "", true);
    // 30 minutes of one host's 60 s windows, stored before the export starts.
    let origin = (now_s() / 60 - 31) * 60;
    let spool = Spool::open(&dir.path().join("spool"), 64 << 20, "inst-a").unwrap();
    let agent = Agent::with_spool(
        spool,
        AggregatorConfig {
            url: Some(agg.url()),
            max_backoff: Duration::from_millis(500),
            ..Default::default()
        },
    );
    for k in 0..30u64 {
        agent.push(&window(
            "host-a",
            "inst-a",
            k,
            origin + 60 * k,
            60,
            // Carbon follows the energy: the variation is in the energy.
            100.0 * (1 + k % 7) as f64,
            0.001,
            [k % 2, 1, 0, 3],
        ));
    }
    agent.drained(Duration::from_secs(30)).await;

    let port = free_port();
    let receiver = Receiver {
        mode: Arc::new(Mutex::new(Mode::Ok)),
        got: Arc::new(Mutex::new(Received::default())),
    };
    let mut text = std::fs::read_to_string(&agg.config).unwrap();
    text.push_str(&format!(
        "[remote_write]\nurl = \"http://127.0.0.1:{port}/api/v1/write\"\nstart = \"{origin}\"\ndelay = \"5s\"\nmax_steps_per_request = 2\ntimeout = \"1s\"\nmin_backoff = \"200ms\"\nmax_backoff = \"2s\"\n"
    ));
    std::fs::write(&agg.config, text).unwrap();
    agg.restart(true);

    // Down for a minute: nothing listens.
    let down_until = Instant::now() + Duration::from_secs(60);
    wait_for("refused connections", 30, || outcome(&agg, "error") >= 2).await;
    let position = |agg: &Aggregator| {
        metric_value(&agg.metrics(), "sci_remote_write_position_seconds").unwrap_or(0)
    };
    assert_eq!(position(&agg), origin, "no progress while down");
    tokio::time::sleep(down_until.saturating_duration_since(Instant::now())).await;
    assert_eq!(position(&agg), origin, "no progress while down");
    let server = receiver.serve(port);
    // 503, then 429: retried, no progress.
    *receiver.mode.lock().unwrap() = Mode::Unavailable;
    wait_for("a 503", 30, || outcome(&agg, "5xx") >= 2).await;
    *receiver.mode.lock().unwrap() = Mode::TooMany;
    wait_for("a 429", 30, || outcome(&agg, "429") >= 2).await;
    assert_eq!(position(&agg), origin, "no progress on 5xx and 429");
    // One 400: that request is dropped and counted; then a slow answer
    // (timed out, sent again); then everything else.
    let errors_before = outcome(&agg, "error");
    *receiver.mode.lock().unwrap() = Mode::BadOnce;
    wait_for("a 400", 30, || outcome(&agg, "4xx") == 1).await;
    let target = (now_s() - 5) / 60 * 60;
    wait_for("the export to catch up", 60, || position(&agg) >= target).await;
    assert!(
        outcome(&agg, "error") > errors_before,
        "the slow answer timed out"
    );
    server.abort();

    let m = agg.metrics();
    let got = receiver.got.lock().unwrap();
    assert!(got.headers_ok, "remote-write headers");
    let dropped = metric_value(&m, "sci_remote_write_samples_total{result=\"dropped\"}").unwrap();
    assert_eq!(
        dropped, got.refused_samples,
        "dropped = the samples the 400 refused"
    );
    assert!(dropped > 0);
    // Every step from the origin to the position is in the receiver, except the refused ones.
    let end = position(&agg);
    let refused: std::collections::BTreeSet<i64> = got.refused_timestamps.iter().copied().collect();
    let energy = got
        .series
        .iter()
        .find(|(k, _)| k.contains("sci_fleet_energy_joules_total"))
        .map(|(_, v)| v.clone())
        .unwrap();
    for t in (origin + 60..=end).step_by(60) {
        let ms = (t * 1000) as i64;
        assert!(
            energy.contains_key(&ms) != refused.contains(&ms),
            "step ending {t}: received {} refused {}",
            energy.contains_key(&ms),
            refused.contains(&ms)
        );
    }
    // The counters' last values are the store's sums over [origin, end).
    let (status, body) = sci_tests::fleet::http_get(
        agg.http_port,
        &format!("/api/v1/sci?from={origin}&to={end}&period=60"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    let last = |name: &str| {
        got.series
            .iter()
            .filter(|(k, _)| k.contains(&format!("\"{name}\"")))
            .map(|(_, v)| *v.values().last().unwrap())
            .sum::<f64>()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    for (name, key) in [
        ("sci_fleet_energy_joules_total", "energy_j"),
        ("sci_fleet_operational_carbon_grams_total", "operational_g"),
        ("sci_fleet_embodied_carbon_grams_total", "embodied_g"),
        ("sci_fleet_scenario_business_units_total", "business_units"),
    ] {
        let (exported, stored) = (last(name), e[key].as_f64().unwrap());
        assert!(
            close(exported, stored),
            "{name}: exported {exported}, stored {stored}"
        );
    }
    // The 30 windows pushed: 100 J x (1 + k mod 7), 11,500 J by hand.
    let expected_energy: f64 = (0..30u64).map(|k| 100.0 * (1 + k % 7) as f64).sum();
    assert_eq!(expected_energy, 11_500.0);
    assert!(close(
        last("sci_fleet_energy_joules_total"),
        expected_energy
    ));
}
