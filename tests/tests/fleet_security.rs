//! Who may send, and what is accepted: tokens, mutual TLS (certificates made
//! here with rcgen), and hostile payloads. Every refusal has a reason, is
//! counted, and the server keeps serving.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Duration;

use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use sci_tests::fleet::{
    allow_open_files, carbon_g, connect_from, now_s, periods_total, window, Aggregator,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a-0123456789\"\n";

async fn open(url: String, tls: Option<ClientTlsConfig>) -> Channel {
    let mut endpoint = Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect_lazy()
}

/// Sends one batch with `token` and returns the first answer.
async fn send(
    channel: Channel,
    token: Option<&str>,
    batch: v1::AgentBatch,
) -> Result<v1::Ack, tonic::Status> {
    let mut client = IngestClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![batch]));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut acks = client.stream(request).await?.into_inner();
    match acks.message().await? {
        Some(ack) => Ok(ack),
        None => Err(tonic::Status::aborted("stream closed without an ack")),
    }
}

fn batch(host: &str, windows: Vec<v1::WindowReport>) -> v1::AgentBatch {
    v1::AgentBatch {
        host: host.into(),
        agent_instance: "inst".into(),
        windows,
        sent_unix_ns: 0,
    }
}

/// A call refused by the TLS layer, never answered at the gRPC level: the
/// client reports it cancelled, as a transport error (the server's alert or
/// the pipe it closed, whichever the client reads first), or, for a
/// plaintext client, as the HTTP/2 protocol error that TLS bytes make. A
/// gRPC status from the server (PermissionDenied, Unauthenticated, ...)
/// would mean the handshake let the client in.
fn refused_before_grpc(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Cancelled => true,
        Code::Unknown => status.message() == "transport error",
        Code::Internal => status.message().starts_with("h2 protocol error"),
        _ => false,
    }
}

fn good(host: &str, seq: u64) -> v1::WindowReport {
    window(
        host,
        "inst",
        seq,
        now_s() - 100 + seq,
        1,
        5.0,
        0.02,
        [1, 0, 0, 2],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_identify_agents() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let ch = || open(agg.url(), None);
    let no_token = send(ch().await, None, batch("host-a", vec![good("host-a", 0)]))
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated, "{no_token}");
    let bad_token = send(
        ch().await,
        Some("nope"),
        batch("host-a", vec![good("host-a", 0)]),
    )
    .await
    .unwrap_err();
    assert_eq!(bad_token.code(), Code::Unauthenticated, "{bad_token}");
    let other_host = send(
        ch().await,
        Some("token-a-0123456789"),
        batch("host-b", vec![good("host-b", 0)]),
    )
    .await
    .unwrap_err();
    assert_eq!(other_host.code(), Code::PermissionDenied, "{other_host}");
    let ack = send(
        ch().await,
        Some("token-a-0123456789"),
        batch("host-a", vec![good("host-a", 0)]),
    )
    .await
    .unwrap();
    assert_eq!(ack.acked_through_seq, 0);
    assert!(ack.refused.is_empty());
    let metrics = agg.metrics();
    assert!(
        metrics.contains("sci_ingest_refused_streams_total{reason=\"unauthenticated\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sci_ingest_refused_streams_total{reason=\"bad_credentials\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_refused_with_a_reason_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let mut nan = good("host-a", 1);
    nan.host_energy_j = f64::NAN;
    let mut negative = good("host-a", 2);
    negative.host_carbon_g = -1.0;
    let mut future = good("host-a", 3);
    future.start_unix_ns = (now_s() + 3600) * 1_000_000_000;
    future.end_unix_ns = future.start_unix_ns + 1_000_000_000;
    let mut impossible = good("host-a", 4);
    impossible.host_energy_j = 1e9; // a gigajoule in one second
    let mut unknown = good("host-a", 5);
    unknown.scenarios[0].scenario = "lending".into();
    let mut bad_process = good("host-a", 6);
    bad_process.processes.push(v1::ProcessRecord {
        pid: 7,
        energy_j: f64::INFINITY,
        ..Default::default()
    });
    let windows = vec![
        good("host-a", 0),
        nan,
        negative,
        future,
        impossible,
        unknown,
        bad_process,
        good("host-a", 7),
    ];
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", windows),
    )
    .await
    .unwrap();
    assert_eq!(ack.acked_through_seq, 7);
    let reasons: Vec<(u64, String)> = ack
        .refused
        .iter()
        .map(|r| (r.seq, r.reason.clone()))
        .collect();
    println!("{reasons:#?}");
    let kinds: Vec<&str> = ack
        .refused
        .iter()
        .map(|r| r.reason.split(':').next().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "not_finite",
            "negative",
            "future",
            "impossible_energy",
            "unknown_scenario",
            "not_finite"
        ]
    );
    // Only the two good windows are stored, whole.
    let stored = periods_total(&agg.sci(now_s() - 3600, now_s() + 10, 3600), "/windows");
    assert_eq!(stored, 2);

    // Random bytes on the gRPC port, then an oversized message: the server survives both.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", agg.grpc_port)).unwrap();
    let _ = raw.write_all(&[0x5a; 4096]);
    drop(raw);
    let mut huge = good("host-a", 8);
    huge.processes = vec![
        v1::ProcessRecord {
            comm: "x".repeat(64),
            ..Default::default()
        };
        600_000
    ];
    let too_big = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![huge]),
    )
    .await;
    // Over the 32 MiB message limit: refused as such, not a silent end of stream.
    let too_big = too_big.unwrap_err();
    assert_eq!(too_big.code(), Code::ResourceExhausted, "{too_big}");
    assert!(too_big.message().contains("message limit"), "{too_big}");
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![good("host-a", 9)]),
    )
    .await
    .unwrap();
    assert_eq!(ack.acked_through_seq, 9, "still serving");
    let metrics = agg.metrics();
    assert!(
        metrics
            .contains("sci_ingest_refused_windows_total{host=\"host-a\",reason=\"not_finite\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("sci_store_healthy 1"));
}

struct Pki {
    ca_pem: String,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn pki(name: &str) -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        ca: rcgen::Issuer::new(params, key),
    }
}

/// (cert PEM, key PEM) signed by `pki`, with common name `cn`.
fn leaf(pki: &Pki, cn: &str, sans: &[&str]) -> (String, String) {
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_identifies_agents_by_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki("sci-cf test CA");
    let other = pki("another CA");
    let (server_cert, server_key) = leaf(&ca, "aggregator", &["localhost", "127.0.0.1"]);
    let write = |name: &str, text: &str| {
        std::fs::write(d.join(name), text).unwrap();
        d.join(name).display().to_string()
    };
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nrevoked = [\"host-r\"]\n",
        write("server.pem", &server_cert),
        write("server.key", &server_key),
        write("ca.pem", &ca.ca_pem)
    );
    let agg = Aggregator::start(
        d,
        3600,
        &format!("{tls}[limits]\nhandshake_timeout = \"1s\"\n"),
        false,
    );
    let url = format!("https://localhost:{}", agg.grpc_port);
    let client = |cert: Option<(String, String)>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.ca_pem.clone()))
            .domain_name("localhost");
        if let Some((c, k)) = cert {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        tls
    };

    let ack = send(
        open(url.clone(), Some(client(Some(leaf(&ca, "host-a", &[]))))).await,
        None,
        batch("host-a", vec![good("host-a", 0)]),
    )
    .await
    .unwrap();
    assert_eq!(ack.acked_through_seq, 0);
    let wrong_host = send(
        open(url.clone(), Some(client(Some(leaf(&ca, "host-a", &[]))))).await,
        None,
        batch("host-b", vec![good("host-b", 0)]),
    )
    .await
    .unwrap_err();
    assert_eq!(wrong_host.code(), Code::PermissionDenied, "{wrong_host}");
    let revoked = send(
        open(url.clone(), Some(client(Some(leaf(&ca, "host-r", &[]))))).await,
        None,
        batch("host-r", vec![good("host-r", 0)]),
    )
    .await
    .unwrap_err();
    assert_eq!(revoked.code(), Code::PermissionDenied, "{revoked}");
    let no_cert = send(
        open(url.clone(), Some(client(None))).await,
        None,
        batch("host-a", vec![good("host-a", 1)]),
    )
    .await;
    // The TLS handshake fails, so the server closes the connection before any
    // gRPC exchange: the client sees its call cancelled or, when the server's
    // TLS 1.3 alert or closed pipe is read first, a transport error.
    assert!(
        refused_before_grpc(no_cert.as_ref().unwrap_err()),
        "a client without a certificate must be refused: {no_cert:?}"
    );
    let wrong_ca = send(
        open(url.clone(), Some(client(Some(leaf(&other, "host-a", &[]))))).await,
        None,
        batch("host-a", vec![good("host-a", 2)]),
    )
    .await;
    assert!(
        refused_before_grpc(wrong_ca.as_ref().unwrap_err()),
        "a certificate from another CA must be refused: {wrong_ca:?}"
    );
    println!(
        "no certificate: {:?}\nwrong CA: {:?}",
        no_cert.unwrap_err(),
        wrong_ca.unwrap_err()
    );
    // Plaintext is not even spoken on a TLS listener.
    let plain = send(
        open(format!("http://127.0.0.1:{}", agg.grpc_port), None).await,
        None,
        batch("host-a", vec![good("host-a", 3)]),
    )
    .await;
    let plain = plain.unwrap_err();
    println!("plaintext: {plain:?}");
    assert!(refused_before_grpc(&plain), "{plain:?}");
    // Only the first window, from the valid agent, is stored.
    let stored = periods_total(&agg.sci(now_s() - 3600, now_s() + 10, 3600), "/windows");
    assert_eq!(stored, 1);

    // A connection that never starts its TLS handshake is closed after handshake_timeout.
    use std::io::Read;
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", agg.grpc_port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = silent.read(&mut buf);
    let closed_after = started.elapsed();
    println!("silent TLS client closed after {closed_after:?}: {read:?}");
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );
}

/// GET with an optional bearer token; (status, body).
fn get_with_token(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<u64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_conflict_is_refused_with_its_code_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let first = good("host-a", 0);
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![first.clone()]),
    )
    .await
    .unwrap();
    assert_eq!((ack.stored, ack.duplicates), (1, 0));
    // The same window again: a replay, acknowledged, not stored twice.
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![first.clone()]),
    )
    .await
    .unwrap();
    assert_eq!((ack.stored, ack.duplicates), (0, 1));
    assert!(ack.refused.is_empty());
    // Same key, different figures: refused with its own code, never "delivered".
    let mut other = first.clone();
    other.host_energy_j += 1.0;
    other.host_carbon_g = carbon_g(other.host_energy_j, 1.0);
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![other, good("host-a", 1)]),
    )
    .await
    .unwrap();
    assert_eq!(ack.acked_through_seq, 1);
    assert_eq!((ack.stored, ack.duplicates), (1, 0));
    assert_eq!(ack.refused.len(), 1);
    assert_eq!(ack.refused[0].seq, 0);
    assert_eq!(ack.refused[0].code, v1::RefusalCode::SeqConflict as i32);
    assert!(ack.refused[0].reason.starts_with("seq_conflict:"));
    let e = agg.sci(now_s() - 3600, now_s() + 10, 3600);
    let carbon = e["operational_g"].as_f64().unwrap();
    assert!(
        (carbon - 2.0 * carbon_g(5.0, 1.0)).abs() < 1e-15,
        "the first window's figures stay: {carbon}"
    );
    let m = agg.metrics();
    assert_eq!(metric(&m, "sci_ingest_conflicts_total"), 1);
    assert_eq!(
        metric(&m, "sci_ingest_windows_total{result=\"duplicate\"}"),
        1
    );
    assert_eq!(
        metric(
            &m,
            "sci_ingest_refused_windows_total{host=\"host-a\",reason=\"seq_conflict\"}"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_figures_are_refused_and_no_sum_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        dir.path(),
        3600,
        &format!("max_transactions_per_s = 1000\n{TOKENS}"),
        true,
    );
    // A window from the epoch: 56 years long, so 10^12 J fits the power ceiling.
    let mut epoch = good("host-a", 0);
    epoch.start_unix_ns = 0;
    epoch.host_energy_j = 1e12;
    // Transactions whose sum wraps u64.
    let mut wraps = good("host-a", 1);
    wraps.scenarios[0].transactions = u64::MAX - 1;
    wraps.scenarios[3].transactions = 3;
    // One that fits u64 but not a signed total.
    let mut huge = good("host-a", 2);
    huge.scenarios[0].transactions = 1 << 63;
    // 5,000 transactions in one second, above 1,000/s.
    let mut busy = good("host-a", 3);
    busy.scenarios[3].transactions = 5_000;
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![epoch, wraps, huge, busy, good("host-a", 4)]),
    )
    .await
    .unwrap();
    let got: Vec<(u64, &str, i32)> = ack
        .refused
        .iter()
        .map(|r| (r.seq, r.reason.split(':').next().unwrap(), r.code))
        .collect();
    let invalid = v1::RefusalCode::Invalid as i32;
    assert_eq!(
        got,
        [
            (0, "too_long", invalid),
            (1, "overflow", invalid),
            (2, "overflow", invalid),
            (3, "impossible_transactions", invalid),
        ]
    );
    assert_eq!(ack.stored, 1);

    // A 1 MB host name is refused without being echoed back.
    let long = "h".repeat(1 << 20);
    let mut w = good("host-a", 5);
    w.host = long.clone();
    let refused = send(open(agg.url(), None).await, None, batch(&long, vec![w])).await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(status.message().len() < 200);
    // Authenticated, with a 1 MB host: refused by name, echo bounded.
    let mut w = good("host-a", 5);
    w.host = long.clone();
    let status = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch(&long, vec![w]),
    )
    .await
    .unwrap_err();
    println!("{}", status.message());
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("bad_name:"));
    assert!(
        status.message().len() < 300,
        "{} bytes",
        status.message().len()
    );

    // Query bounds are checked before seconds become nanoseconds.
    let from = 1u64 << 55;
    let (code, body) = get_with_token(
        agg.http_port,
        &format!("/api/v1/sci?from={from}&to={}", from + 3600),
        None,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("below"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_needs_a_token_and_healthz_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = "[[http_tokens]]\nname = \"grafana\"\ntoken = \"read-token-0123456789\"\n";
    let agg = Aggregator::start(dir.path(), 3600, &format!("{TOKENS}{tokens}"), true);
    let port = agg.http_port;
    // Every route of aggregator/src/http.rs but /healthz, review routes included.
    let protected = [
        "/api/v1/sci",
        "/api/v1/hotspots",
        "/api/v1/profile",
        "/api/v1/compare",
        "/api/v1/distributions",
        "/dashboard/compare",
        "/dashboard",
        "/report",
        "/metrics",
    ];
    for path in protected {
        let (code, body) = get_with_token(port, path, None);
        assert_eq!(code, 401, "{path}: {body}");
        let (code, _) = get_with_token(port, path, Some("read-token-0123456788"));
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, body) = get_with_token(port, path, Some("read-token-0123456789"));
        // Past authentication: the handler's answer (200, a 400 naming a
        // parameter, or a 404 saying what has no data; axum's own 404 for an
        // unknown route has no body).
        assert!(
            code == 200 || ((code == 400 || code == 404) && !body.is_empty()),
            "{path}: {code} {body}"
        );
    }
    // A token of an agent is not a reader's.
    let (code, _) = get_with_token(port, "/api/v1/sci", Some("token-a-0123456789"));
    assert_eq!(code, 401);
    let (code, body) = get_with_token(port, "/healthz", None);
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, _) = get_with_token(
        port,
        &format!("/api/v1/sci?x={}", "a".repeat(5000)),
        Some("read-token-0123456789"),
    );
    assert_eq!(code, 414);
    let (_, m) = get_with_token(port, "/metrics", Some("read-token-0123456789"));
    // 9 paths without a token, 9 with a wrong one, 1 with an agent's token.
    assert_eq!(
        metric(&m, "sci_http_unauthorized_total"),
        2 * protected.len() as u64 + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_agents_out() {
    allow_open_files(4096);
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nmax_connections = 600\nmax_connections_per_address = 32\nidle_timeout = \"3s\"\n";
    let agg = Aggregator::start(dir.path(), 3600, &format!("{TOKENS}{limits}"), true);
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    // 1,000 idle connections to each port from one address, as an attacker would.
    let mut idle = Vec::new();
    let mut opened = Vec::new();
    for port in [agg.grpc_port, agg.http_port] {
        let before = idle.len();
        for _ in 0..1000 {
            if let Some(c) = connect_from(attacker, port) {
                idle.push(c);
            }
        }
        opened.push(idle.len() - before);
    }
    assert!(idle.len() >= 1900, "only {} connections opened", idle.len());
    // A valid agent is served within 1 s meanwhile ...
    let started = std::time::Instant::now();
    let ack = tokio::time::timeout(
        Duration::from_secs(1),
        send(
            open(agg.url(), None).await,
            Some("token-a-0123456789"),
            batch("host-a", vec![good("host-a", 0)]),
        ),
    )
    .await
    .expect("an agent waited more than 1 s")
    .unwrap();
    let agent_ms = started.elapsed().as_millis();
    assert_eq!(ack.stored, 1);
    // ... and so is /healthz.
    let started = std::time::Instant::now();
    let (code, _) = get_with_token(agg.http_port, "/healthz", None);
    let health_ms = started.elapsed().as_millis();
    assert_eq!(code, 200);
    assert!(health_ms < 1000, "{health_ms} ms");
    println!("agent acked in {agent_ms} ms, /healthz in {health_ms} ms");
    // Every attacker connection is accounted for: closed at accept (beyond
    // 32 from its address), or admitted and then closed idle, or still open
    // (at most 32). A connection the kernel could not queue at once is
    // accepted after a SYN-ACK retransmit, seconds later.
    for (listener, opened) in ["grpc", "http"].into_iter().zip(opened) {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            let m = agg.metrics();
            let refused = metric(
                &m,
                &format!("sci_connections_refused_total{{listener=\"{listener}\",limit=\"max_connections_per_address\"}}"),
            );
            let idle_closed = metric(
                &m,
                &format!("sci_connections_refused_total{{listener=\"{listener}\",limit=\"idle_timeout\"}}"),
            );
            // Beyond 16 unauthenticated from one address, the oldest is evicted.
            let evicted = metric(
                &m,
                &format!("sci_connections_refused_total{{listener=\"{listener}\",limit=\"max_unauthenticated_connections\"}}"),
            );
            let open = metric(
                &m,
                &format!("sci_connections_open{{listener=\"{listener}\"}}"),
            );
            // 32 from the attacker, plus this /metrics request on the HTTP side.
            assert!(open <= 33, "{listener}: {open} open");
            if refused + evicted + idle_closed + open >= opened as u64 {
                println!("{listener}: of {opened}, {refused} refused at accept, {evicted} evicted, {idle_closed} closed idle, {open} open");
                assert!(
                    refused + evicted >= opened as u64 / 2,
                    "{listener}: {refused} refused, {evicted} evicted"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{listener}: of {opened}, {refused} refused, {evicted} evicted, {idle_closed} idle, {open} open"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The admitted idle ones are closed after idle_timeout: nothing stays open.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = agg.metrics();
        let open = metric(&m, "sci_connections_open{listener=\"grpc\"}");
        let closed = metric(
            &m,
            "sci_connections_refused_total{listener=\"grpc\",limit=\"idle_timeout\"}",
        );
        // At most 16 of them were left unauthenticated (the rest evicted).
        if open == 0 && closed >= 16 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} gRPC connections still open, {closed} closed idle"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), 3600, TOKENS, true);
    let mut client = IngestClient::new(open(agg.url(), None).await);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![batch(
        "host-a",
        vec![good("host-a", 0)],
    )]));
    request.metadata_mut().insert(
        "authorization",
        "Bearer token-a-0123456789".parse().unwrap(),
    );
    // 64 KiB of metadata, above max_metadata_bytes (16 KiB).
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(64 * 1024).parse().unwrap());
    let refused = match client.stream(request).await {
        Ok(response) => response.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    let status = refused.unwrap_err();
    println!("oversized metadata: {status:?}");
    // The server closes the connection (GOAWAY ENHANCE_YOUR_CALM) without reading further.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        format!("{status:?}").contains("header_list_way_too_large"),
        "{status:?}"
    );
    // Nothing of it was stored, and a valid agent is still served.
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a-0123456789"),
        batch("host-a", vec![good("host-a", 1)]),
    )
    .await
    .unwrap();
    assert_eq!((ack.stored, ack.acked_through_seq), (1, 1));
    let metrics = agg.metrics();
    assert!(
        metrics.contains("sci_ingest_windows_total{result=\"accepted\"} 1"),
        "{metrics}"
    );
}
