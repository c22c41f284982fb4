//! Who may send, and what is accepted: tokens, mutual TLS (certificates made
//! here with rcgen), and hostile payloads. Every refusal has a reason, is
//! counted, and the server keeps serving.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::Duration;

use sci_proto::v1;
use sci_proto::v1::ingest_client::IngestClient;
use sci_tests::fleet::{now_s, window, Aggregator};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const TOKENS: &str = "[[agents]]\nhost = \"host-a\"\ntoken = \"token-a\"\n";

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
        0.01,
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
        Some("token-a"),
        batch("host-b", vec![good("host-b", 0)]),
    )
    .await
    .unwrap_err();
    assert_eq!(other_host.code(), Code::PermissionDenied, "{other_host}");
    let ack = send(
        ch().await,
        Some("token-a"),
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
        Some("token-a"),
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
    let e = agg.sci(now_s() - 3600, now_s() + 10, 3600);
    let stored: u64 = e["periods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["windows"].as_u64().unwrap())
        .sum();
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
        Some("token-a"),
        batch("host-a", vec![huge]),
    )
    .await;
    assert!(
        too_big.is_err() || !too_big.as_ref().unwrap().refused.is_empty(),
        "{too_big:?}"
    );
    let ack = send(
        open(agg.url(), None).await,
        Some("token-a"),
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
    let agg = Aggregator::start(d, 3600, &tls, false);
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
    assert!(
        no_cert.is_err(),
        "a client without a certificate must be refused"
    );
    let wrong_ca = send(
        open(url.clone(), Some(client(Some(leaf(&other, "host-a", &[]))))).await,
        None,
        batch("host-a", vec![good("host-a", 2)]),
    )
    .await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from another CA must be refused"
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
    assert!(plain.is_err());
}
