//! The ingest endpoint on real sockets (a Unix socket in a tempdir, UDP on
//! 127.0.0.1:0): good lines land, bad ones are refused and counted per reason,
//! a UDP datagram is all or nothing, floods are rate-limited, and the
//! endpoint keeps serving after all of it.
#![allow(clippy::unwrap_used)]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::udp_endpoint;
use sci_agent::sources::ingest::{
    IngestConfig, IngestCounters, IngestEndpoint, IngestError, IngestWindow, RefusalReason,
};
use sci_agent::transforms::scenario::Scenario;
use tokio::io::AsyncWriteExt;
use tokio::net::{UdpSocket, UnixStream};

/// Waits until `done` holds for what was received (without draining it).
async fn wait_for(counters: &IngestCounters, done: impl Fn(&IngestWindow) -> bool) -> IngestWindow {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = counters.peek();
        if done(&w) || Instant::now() > deadline {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn refusals(pairs: &[(RefusalReason, u64)]) -> BTreeMap<RefusalReason, u64> {
    pairs.iter().copied().collect()
}

#[tokio::test]
async fn unix_socket_counts_good_lines_and_refuses_bad_ones_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let cfg = IngestConfig {
        unix_socket: Some(path.clone()),
        max_count_per_line: 1000,
        max_line_bytes: 64,
        ..Default::default()
    };
    let counters = IngestCounters::new();
    let endpoint = IngestEndpoint::start(&cfg, counters.clone()).await.unwrap();
    assert_eq!(endpoint.unix_socket(), Some(path.as_path()));

    let mut conn = UnixStream::connect(&path).await.unwrap();
    let overlong = format!("credit 1 {}\n", "x".repeat(200));
    let input = [
        "credit 1\n",
        "query 5 account-svc\n",
        "\n",                            // empty: ignored
        "loan 3\n",                      // unknown scenario
        "credit -2\n",                   // negative
        "credit two\n",                  // not an integer
        "credit 0\n",                    // zero
        "credit 1001\n",                 // above max_count_per_line
        "credit 18446744073709551616\n", // beyond u64
        &overlong,                       // overlong, skipped to its newline
        "repayment 2\r\n",               // CRLF accepted
        "\u{0}\u{1}\u{ff}garbage\n",
    ]
    .concat();
    conn.write_all(input.as_bytes()).await.unwrap();
    conn.write_all(&[0xff, 0xfe, b'\n']).await.unwrap(); // not UTF-8
                                                         // A line split over several writes is one line.
    conn.write_all(b"draw").await.unwrap();
    conn.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.write_all(b"down 4\n").await.unwrap();
    drop(conn);

    let w = wait_for(&counters, |w| {
        w.accepted_lines == 4 && w.refused_total() == 9
    })
    .await;
    assert_eq!(w.transactions.get(Scenario::Credit), 1);
    assert_eq!(w.transactions.get(Scenario::Query), 5);
    assert_eq!(w.transactions.get(Scenario::Repayment), 2);
    assert_eq!(w.transactions.get(Scenario::Drawdown), 4);
    assert_eq!(
        w.by_service
            .get(&(Scenario::Query, "account-svc".to_string())),
        Some(&5)
    );
    assert_eq!(
        w.refused,
        refusals(&[
            (RefusalReason::UnknownScenario, 1),
            (RefusalReason::Negative, 1),
            (RefusalReason::NotAnInteger, 1),
            (RefusalReason::Zero, 1),
            (RefusalReason::TooLarge, 2),
            (RefusalReason::Overlong, 1),
            (RefusalReason::Malformed, 2),
        ])
    );

    // Drained per window: the next window starts from zero, and the endpoint still serves.
    let taken = counters.take_window();
    assert_eq!(taken.accepted_lines, 4);
    assert_eq!(counters.peek(), IngestWindow::default());
    let mut conn = UnixStream::connect(&path).await.unwrap();
    conn.write_all(b"credit 7").await.unwrap(); // last line without newline, then EOF
    drop(conn);
    let w = wait_for(&counters, |w| w.accepted_lines == 1).await;
    assert_eq!(w.transactions.get(Scenario::Credit), 7);

    drop(endpoint);
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[tokio::test]
async fn unix_flood_is_rate_limited_per_connection_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let cfg = IngestConfig {
        unix_socket: Some(path.clone()),
        max_per_second: 10_000,
        ..Default::default()
    };
    let counters = IngestCounters::new();
    let _endpoint = IngestEndpoint::start(&cfg, counters.clone()).await.unwrap();

    let started = Instant::now();
    let mut conn = UnixStream::connect(&path).await.unwrap();
    conn.write_all("query 1000\n".repeat(50).as_bytes())
        .await
        .unwrap();
    drop(conn);
    let w = wait_for(&counters, |w| w.accepted_lines + w.refused_total() == 50).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    assert_eq!(w.accepted_lines + w.refused_total(), 50);
    // One second of burst (10 lines of 1000) plus what refilled while the test ran.
    let bound = 10 + (elapsed_s * 10.0).ceil() as u64;
    assert!(
        (10..=bound).contains(&w.accepted_lines),
        "accepted {} lines in {elapsed_s} s",
        w.accepted_lines
    );
    assert_eq!(w.transactions.get(Scenario::Query), 1000 * w.accepted_lines);
    assert_eq!(
        w.refused.get(&RefusalReason::RateLimited),
        Some(&(50 - w.accepted_lines))
    );
    assert_eq!(w.refused.len(), 1);

    // Another client has its own bucket: it is served at once.
    counters.take_window();
    let mut conn = UnixStream::connect(&path).await.unwrap();
    conn.write_all(b"credit 3\n").await.unwrap();
    drop(conn);
    let w = wait_for(&counters, |w| w.accepted_lines == 1).await;
    assert_eq!(w.transactions.get(Scenario::Credit), 3);
}

#[tokio::test]
async fn unix_connections_beyond_the_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let cfg = IngestConfig {
        unix_socket: Some(path.clone()),
        max_connections: 2,
        ..Default::default()
    };
    let counters = IngestCounters::new();
    let _endpoint = IngestEndpoint::start(&cfg, counters.clone()).await.unwrap();
    let idle_a = UnixStream::connect(&path).await.unwrap();
    let idle_b = UnixStream::connect(&path).await.unwrap();
    let _third = UnixStream::connect(&path).await.unwrap();
    let w = wait_for(&counters, |w| w.refused_total() == 1).await;
    assert_eq!(
        w.refused,
        refusals(&[(RefusalReason::TooManyConnections, 1)])
    );
    drop((idle_a, idle_b));
    // Slots free again once the idle clients leave.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = UnixStream::connect(&path).await.unwrap();
        let _ = conn.write_all(b"query 1\n").await;
        drop(conn);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if counters.peek().accepted_lines == 1 || Instant::now() > deadline {
            break;
        }
    }
    assert_eq!(counters.peek().transactions.get(Scenario::Query), 1);
}

#[tokio::test]
async fn udp_datagrams_are_all_or_nothing_and_garbage_does_not_stop_the_endpoint() {
    let (_endpoint, counters, addr) = udp_endpoint(IngestConfig::default()).await;
    assert_ne!(addr.port(), 0);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    client
        .send_to(b"credit 2\nquery 3 acct\n", addr)
        .await
        .unwrap();
    let w = wait_for(&counters, |w| w.accepted_lines == 2).await;
    assert_eq!(w.transactions.get(Scenario::Credit), 2);
    assert_eq!(w.transactions.get(Scenario::Query), 3);

    // One bad line spoils its whole datagram: the good line in it is not applied.
    client
        .send_to(b"drawdown 5\ncredit 100001\n", addr)
        .await
        .unwrap();
    client
        .send_to(&[0x00, 0xff, 0x13, 0x37], addr)
        .await
        .unwrap();
    client.send_to(&vec![b'a'; 60_000], addr).await.unwrap();
    let w = wait_for(&counters, |w| w.refused_total() == 3).await;
    assert_eq!(w.transactions.get(Scenario::Drawdown), 0);
    assert_eq!(
        w.refused,
        refusals(&[
            (RefusalReason::TooLarge, 1),
            (RefusalReason::Malformed, 1),
            (RefusalReason::Overlong, 1)
        ])
    );

    // Still serving.
    client.send_to(b"repayment 4\n", addr).await.unwrap();
    let w = wait_for(&counters, |w| w.accepted_lines == 3).await;
    assert_eq!(w.transactions.get(Scenario::Repayment), 4);
    assert_eq!(w.transactions.total(), 2 + 3 + 4);
}

#[tokio::test]
async fn udp_flood_from_one_source_is_rate_limited() {
    let (_endpoint, counters, addr) = udp_endpoint(IngestConfig {
        max_per_second: 500,
        ..Default::default()
    })
    .await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let sent = 40u64;
    for _ in 0..sent {
        client.send_to(b"query 100\n", addr).await.unwrap();
    }
    // Loopback UDP does not drop 40 small datagrams; wait for all of them.
    let w = wait_for(&counters, |w| w.accepted_lines + w.refused_total() == sent).await;
    let elapsed_s = started.elapsed().as_secs_f64();
    assert_eq!(w.accepted_lines + w.refused_total(), sent);
    let bound = 5 + (elapsed_s * 5.0).ceil() as u64;
    assert!(
        (5..=bound).contains(&w.accepted_lines),
        "accepted {} in {elapsed_s} s",
        w.accepted_lines
    );
    assert_eq!(
        w.refused.get(&RefusalReason::RateLimited),
        Some(&(sent - w.accepted_lines))
    );

    // A second source has its own bucket.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let before = w.accepted_lines;
    other.send_to(b"query 100\n", addr).await.unwrap();
    let w = wait_for(&counters, |w| w.accepted_lines == before + 1).await;
    assert_eq!(w.accepted_lines, before + 1);
}

#[tokio::test]
async fn bad_endpoint_settings_are_refused_clearly() {
    let counters = IngestCounters::new();
    let e = IngestEndpoint::start(
        &IngestConfig {
            udp_listen: Some("0.0.0.0:0".into()),
            ..Default::default()
        },
        counters.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, IngestError::BadUdpAddress { .. }), "{e}");
    assert!(e.to_string().contains("loopback"), "{e}");
    let e = IngestEndpoint::start(
        &IngestConfig {
            udp_listen: Some("localhost-ish".into()),
            ..Default::default()
        },
        counters.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not an ip:port"), "{e}");
    let e = IngestEndpoint::start(
        &IngestConfig {
            max_per_second: 0,
            ..Default::default()
        },
        counters,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("max_per_second"), "{e}");

    let e = sci_agent::config::AgentConfig::from_toml_str(
        "[ingest]\nudp_listen = \"127.0.0.1:9465\"\nmax_per_secnd = 5\n",
        std::path::Path::new("agent.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 3") && e.contains("max_per_secnd"), "{e}");
}

/// A /metrics endpoint whose body the test sets; answers 503 while `None`.
/// A /metrics server answering `body` (503 when None); returns its address
/// and the number of answers it has written.
async fn metrics_server(
    body: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> (std::net::SocketAddr, std::sync::Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = std::sync::Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = conn.read(&mut request).await;
            let current = body.lock().unwrap().clone();
            let response = match current {
                Some(b) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                ),
                None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".into(),
            };
            let _ = conn.write_all(response.as_bytes()).await;
            drop(conn);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, answered)
}

fn exposition(credit: u64, query: u64, extra: &str) -> String {
    format!(
        "# HELP loan_flows_total Completed flows.\n# TYPE loan_flows_total counter\n\
         loan_flows_total{{scenario=\"credit\",instance=\"a\"}} {credit}\n\
         loan_flows_total{{instance=\"b\",scenario=\"query\"}} {query}\n\
         loan_flows_total_created{{scenario=\"credit\"}} 1.7e9\n\
         other_total{{scenario=\"credit\"}} 999\n{extra}"
    )
}

#[tokio::test]
async fn prometheus_counter_increases_become_transactions_resets_handled() {
    use sci_agent::sources::ingest::{PrometheusScrapeConfig, PrometheusScraper};
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(exposition(100, 5, ""))));
    let (addr, _) = metrics_server(body.clone()).await;
    let cfg: PrometheusScrapeConfig = toml::from_str(&format!(
        "url = \"http://{addr}/metrics\"\nmetric = \"loan_flows_total\"\nservice = \"loan\"\n"
    ))
    .unwrap();
    let counters = IngestCounters::new();
    let mut scraper = PrometheusScraper::new(&cfg, 1_000_000).unwrap();

    // First scrape: baseline only (when those 100 happened is unknown).
    scraper.scrape_once(&counters).await;
    assert_eq!(counters.peek(), IngestWindow::default());

    *body.lock().unwrap() = Some(exposition(130, 5, ""));
    scraper.scrape_once(&counters).await;
    let w = counters.take_window();
    assert_eq!(w.transactions.get(Scenario::Credit), 30);
    assert_eq!(w.transactions.get(Scenario::Query), 0);
    assert_eq!(
        w.by_service.get(&(Scenario::Credit, "loan".to_string())),
        Some(&30)
    );

    // Credit counter reset (service restarted) to 4; query +2; an unknown scenario label.
    *body.lock().unwrap() = Some(exposition(4, 7, "loan_flows_total{scenario=\"loan\"} 3\n"));
    scraper.scrape_once(&counters).await;
    let w = counters.take_window();
    assert_eq!(w.transactions.get(Scenario::Credit), 4);
    assert_eq!(w.transactions.get(Scenario::Query), 2);
    assert_eq!(w.refused, refusals(&[(RefusalReason::UnknownScenario, 1)]));

    // The service is down: counted, nothing lost; the next scrape continues from 4 and 7.
    *body.lock().unwrap() = None;
    scraper.scrape_once(&counters).await;
    *body.lock().unwrap() = Some(exposition(10, 7, ""));
    scraper.scrape_once(&counters).await;
    let w = counters.take_window();
    assert_eq!(w.refused, refusals(&[(RefusalReason::ScrapeFailed, 1)]));
    assert_eq!(w.transactions.get(Scenario::Credit), 6);
    assert_eq!(w.transactions.get(Scenario::Query), 0);

    let e = PrometheusScraper::new(
        &toml::from_str::<PrometheusScrapeConfig>("url = \"https://x:1/m\"\nmetric = \"m\"\n")
            .unwrap(),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("only http://"), "{e}");
}

#[tokio::test]
async fn prometheus_scrape_reads_a_chunked_body() {
    use sci_agent::sources::ingest::{PrometheusScrapeConfig, PrometheusScraper};
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut value = 100;
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let _ = conn.read(&mut vec![0u8; 4096]).await;
            // The body in two chunks, the split inside a series' labels.
            let body = format!("loan_flows_total{{scenario=\"credit\"}} {value}\n");
            let (a, b) = body.split_at(20);
            let response = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            value += 7;
        }
    });
    let cfg: PrometheusScrapeConfig = toml::from_str(&format!(
        "url = \"http://{addr}/metrics\"\nmetric = \"loan_flows_total\"\n"
    ))
    .unwrap();
    let counters = IngestCounters::new();
    let mut scraper = PrometheusScraper::new(&cfg, 1_000_000).unwrap();
    scraper.scrape_once(&counters).await;
    scraper.scrape_once(&counters).await;
    let w = counters.take_window();
    assert_eq!(w.transactions.get(Scenario::Credit), 7, "{w:?}");
    assert!(w.refused.is_empty(), "{w:?}");
}

#[tokio::test]
async fn prometheus_scrape_runs_from_the_endpoint_on_its_interval() {
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(exposition(1, 1, ""))));
    let (addr, answered) = metrics_server(body.clone()).await;
    let cfg: sci_agent::config::AgentConfig = sci_agent::config::AgentConfig::from_toml_str(
        &format!(
            "[[ingest.prometheus]]\nurl = \"http://{addr}/metrics\"\nmetric = \"loan_flows_total\"\ninterval = \"20ms\"\n"
        ),
        std::path::Path::new("agent.toml"),
    )
    .unwrap();
    let counters = IngestCounters::new();
    let _endpoint = IngestEndpoint::start(&cfg.ingest, counters.clone())
        .await
        .unwrap();
    // The first scrape, answered with the old body, is the baseline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the endpoint never scraped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *body.lock().unwrap() = Some(exposition(9, 4, ""));
    let w = wait_for(&counters, |w| w.transactions.total() == 11).await;
    assert_eq!(w.transactions.get(Scenario::Credit), 8);
    assert_eq!(w.transactions.get(Scenario::Query), 3);
}

/// `pg_stat_database_xact_commit{datname="bench"}`: a selector with label
/// matchers reads only the series it names (here instance "a" of credit).
#[tokio::test]
async fn prometheus_scrape_selects_series_by_label() {
    use sci_agent::sources::ingest::{PrometheusScrapeConfig, PrometheusScraper};
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(exposition(100, 5, ""))));
    let (addr, _) = metrics_server(body.clone()).await;
    let cfg: PrometheusScrapeConfig = toml::from_str(&format!(
        "url = \"http://{addr}/metrics\"\nmetric = 'loan_flows_total{{instance=\"b\"}}'\n"
    ))
    .unwrap();
    let counters = IngestCounters::new();
    let mut scraper = PrometheusScraper::new(&cfg, 1_000_000).unwrap();
    scraper.scrape_once(&counters).await;
    *body.lock().unwrap() = Some(exposition(130, 9, ""));
    scraper.scrape_once(&counters).await;
    let w = counters.take_window();
    // Only instance "b" (query +4); instance "a" (credit +30) is not selected.
    assert_eq!(w.transactions.get(Scenario::Query), 4);
    assert_eq!(w.transactions.get(Scenario::Credit), 0);

    for bad in ["loan_flows_total{instance=b}", "{instance=\"b\"}", "9x"] {
        let cfg = PrometheusScrapeConfig {
            metric: bad.into(),
            ..cfg.clone()
        };
        let e = PrometheusScraper::new(&cfg, 1).unwrap_err().to_string();
        assert!(e.contains("metric"), "{bad}: {e}");
    }
}
