//! Faults on the local ingest endpoint, turned around: idle Unix clients that
//! hold every slot are closed after `idle_timeout` and a valid report gets
//! through; a UDP flood loses datagrams in the kernel, and every one of them
//! is counted (accepted + refused + kernel drops = sent).
#![allow(clippy::unwrap_used)]
mod common;

use std::time::{Duration, Instant};

use common::udp_endpoint;
use sci_agent::sources::ingest::{IngestConfig, IngestCounters, IngestEndpoint, RefusalReason};
use sci_agent::transforms::scenario::Scenario;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

#[tokio::test]
async fn idle_unix_clients_are_closed_and_a_valid_report_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let cfg = IngestConfig {
        unix_socket: Some(path.clone()),
        max_connections: 64,
        idle_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let counters = IngestCounters::new();
    let _endpoint = IngestEndpoint::start(&cfg, counters.clone()).await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(UnixStream::connect(&path).await.unwrap());
    }
    let started = Instant::now();
    // While the 64 idle clients hold the slots a report is refused (counted) ...
    let deadline = started + Duration::from_secs(10);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let mut conn = UnixStream::connect(&path).await.unwrap();
        let _ = conn.write_all(b"credit 2\n").await;
        drop(conn);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if counters.peek().accepted_lines == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no report accepted in 10 s");
    }
    let served_after = started.elapsed();
    // The report gets in as soon as the first idle client is closed; the
    // others' timers may fire a little later on a loaded host.
    let w = loop {
        let w = counters.peek();
        let closed = w.refused.get(&RefusalReason::IdleTimeout).copied();
        if closed >= Some(64) || Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "report accepted after {served_after:?} ({attempts} attempts); refused: {:?}",
        w.refused
    );
    // ... and once the idle ones are closed it is accepted: no restart.
    assert_eq!(w.transactions.get(Scenario::Credit), 2);
    assert_eq!(w.refused.get(&RefusalReason::IdleTimeout), Some(&64));
    assert_eq!(
        w.refused.get(&RefusalReason::TooManyConnections).copied(),
        Some(attempts - 1),
        "every refused attempt counted"
    );
    assert!(served_after < Duration::from_secs(2), "{served_after:?}");
    drop(idle);
}

#[tokio::test]
async fn a_udp_flood_loses_datagrams_only_where_they_are_counted() {
    let (_endpoint, counters, addr) = udp_endpoint(IngestConfig::default()).await;
    let sent: u64 = 200_000;
    // A plain blocking sender on its own thread, as fast as it goes.
    std::thread::spawn(move || {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..sent {
            let _ = client.send_to(b"query 1\n", addr);
        }
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let w = loop {
        let w = counters.peek();
        if w.accepted_lines + w.refused_total() >= sent || Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The kernel's own count for this socket (/proc/net/udp, by local port).
    let text = std::fs::read_to_string("/proc/net/udp").unwrap();
    let local = format!("0100007F:{:04X}", addr.port());
    let line = text.lines().find(|l| l.contains(&local)).unwrap();
    let kernel_drops: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
    let dropped = w
        .refused
        .get(&RefusalReason::UdpDropped)
        .copied()
        .unwrap_or(0);
    println!(
        "sent {sent}: accepted {}, refused {:?} (kernel drops {dropped})",
        w.accepted_lines, w.refused
    );
    assert_eq!(
        w.accepted_lines + w.refused_total(),
        sent,
        "every datagram accounted for"
    );
    assert_eq!(dropped, kernel_drops);
    assert_eq!(w.transactions.get(Scenario::Query), w.accepted_lines);
}
