//! Kubernetes node labels in the window's supply (#27): the real agent
//! (`sci-agent run --procfs`, windows as JSON lines on stdout) reads its
//! node from an HTTPS server made here (rustls, a CA rcgen makes, the
//! agent's token checked as a Bearer header) that serves a recorded Node
//! object in `kubectl get node -o json` shape (tests/fixtures/
//! kubernetes-node.json). No Kubernetes API server runs on this machine:
//! this is tested against that recorded object, not a real API server.
//!
//! Checked: the allow-list keeps the node's topology, instance type, arch,
//! pool and sci-cf/ labels and not hostname/os; `[host] labels` win over
//! the node's; a label changed on the server reaches a later window; a
//! wrong token is `unauthorized`, counted, and the last labels are kept; a
//! rotated token file is read again; with the server down the faults are
//! `unreachable`, counted, and every window keeps the last good labels.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use sci_tests::fleet::{free_port, http_get};
use sci_tests::{cargo_bin, workspace_root};
use tokio_rustls::rustls;

const NODE: &str = "sci-worker-7";

/// What the server serves and accepts.
struct Served {
    node_json: String,
    token: String,
    answered: u64,
    refused: u64,
}

/// A one-route HTTPS server: `GET /api/v1/nodes/<NODE>` with the right
/// Bearer token answers the Node object, else 401 / 404.
struct ApiServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn handle(
    stream: std::net::TcpStream,
    config: &Arc<rustls::ServerConfig>,
    served: &Mutex<Served>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let conn = rustls::ServerConnection::new(Arc::clone(config)).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut reader = BufReader::new(&mut tls);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let (status, body) = {
        let mut s = served.lock().unwrap();
        let want = format!("Bearer {}", s.token);
        if request_line != format!("GET /api/v1/nodes/{NODE} HTTP/1.1\r\n") {
            (
                404,
                r#"{"kind":"Status","status":"Failure","reason":"NotFound","code":404}"#
                    .to_string(),
            )
        } else if authorization.as_deref() != Some(want.as_str()) {
            s.refused += 1;
            (
                401,
                r#"{"kind":"Status","status":"Failure","reason":"Unauthorized","code":401}"#
                    .to_string(),
            )
        } else {
            s.answered += 1;
            (200, s.node_json.clone())
        }
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    write!(
        tls,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    tls.conn.send_close_notify();
    tls.flush()?;
    // Let the client read to the end before the socket closes.
    let mut rest = [0u8; 64];
    let _ = tls.sock.read(&mut rest);
    Ok(())
}

impl ApiServer {
    fn start(config: Arc<rustls::ServerConfig>, served: Arc<Mutex<Served>>) -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(stream) = stream {
                    let _ = handle(stream, &config, &served);
                }
            }
        });
        ApiServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops listening: connections are refused from now on.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CA (PEM file) and a server config with a `localhost` certificate it signed.
fn tls(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    use rustls_pki_types::pem::PemObject;
    let made = sci_tests::tls::localhost_cert("test cluster CA");
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, &made.ca_pem).unwrap();
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(made.cert_pem.as_bytes()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(made.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    (ca, Arc::new(config))
}

/// The agent, its windows' supply labels as they come on stdout.
struct Agent {
    child: Child,
    labels: mpsc::Receiver<BTreeMap<String, String>>,
    metrics_port: u16,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// The next window's labels, within 20 s.
    fn next_labels(&self) -> BTreeMap<String, String> {
        self.labels
            .recv_timeout(Duration::from_secs(20))
            .expect("a window within 20 s")
    }

    /// Windows until one whose labels satisfy `want`, within 20 s.
    fn until(&self, what: &str, want: impl Fn(&BTreeMap<String, String>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let labels = self.next_labels();
            if want(&labels) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: last labels {labels:?}");
        }
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.metrics_port, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

fn start_agent(dir: &Path, api_port: u16, ca: &Path, token_file: &Path) -> Agent {
    let metrics_port = free_port();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nhost = \"{NODE}\"\ninterval = \"300ms\"\nspool_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n\
             [host]\nlabels = {{ pool = \"batch-a\" }}\n\n\
             [host.kubernetes]\nenabled = true\napi_url = \"https://localhost:{api_port}\"\nnode_name = \"{NODE}\"\n\
             token_file = \"{}\"\nca_file = \"{}\"\nrefresh_s = 1\ntimeout_ms = 500\n",
            dir.join("spool").display(),
            token_file.display(),
            ca.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(cargo_bin("sci-agent", "sci-agent"))
        .args(["run", "--procfs", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("agent.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let Ok(window) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let labels = window["supply"]["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            if tx.send(labels).is_err() {
                return;
            }
        }
    });
    Agent {
        child,
        labels: rx,
        metrics_port,
    }
}

fn expected(zone: &str) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/arch", "amd64"),
        ("node.kubernetes.io/instance-type", "c3-standard-8"),
        // `[host] labels` win over the node's `pool = web`.
        ("pool", "batch-a"),
        ("sci-cf/rack", "r12"),
        ("topology.kubernetes.io/region", "asia-east2"),
        ("topology.kubernetes.io/zone", zone),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn node_labels_from_the_api_server_reach_the_windows_and_survive_its_faults() {
    let dir = tempfile::tempdir().unwrap();
    let recorded =
        std::fs::read_to_string(workspace_root().join("tests/fixtures/kubernetes-node.json"))
            .unwrap();
    let (ca, server_config) = tls(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-one\n").unwrap();
    let served = Arc::new(Mutex::new(Served {
        node_json: recorded.clone(),
        token: "token-one".into(),
        answered: 0,
        refused: 0,
    }));
    let mut server = ApiServer::start(server_config, Arc::clone(&served));
    let agent = start_agent(dir.path(), server.port, &ca, &token_file);

    // The first window already has the node's labels: read before it opened.
    assert_eq!(agent.next_labels(), expected("asia-east2-a"));
    assert!(served.lock().unwrap().answered >= 1);

    // A label changed on the node reaches a later window.
    served.lock().unwrap().node_json = recorded.replace("\"asia-east2-a\"", "\"asia-east2-b\"");
    agent.until("the changed zone", |l| *l == expected("asia-east2-b"));

    // A token the server refuses: unauthorized, counted, the labels kept.
    served.lock().unwrap().token = "token-two".into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.metric("sci_agent_node_label_faults_total{fault=\"unauthorized\"}") < 1.0 {
        assert!(Instant::now() < deadline, "no unauthorized fault counted");
        assert_eq!(agent.next_labels(), expected("asia-east2-b"));
    }
    assert!(served.lock().unwrap().refused >= 1);
    // The rotated token file is read again at the next refresh.
    std::fs::write(&token_file, "token-two\n").unwrap();
    served.lock().unwrap().node_json = recorded.replace("\"r12\"", "\"r13\"");
    agent.until("the rotated token's read", |l| {
        l.get("sci-cf/rack").map(String::as_str) == Some("r13")
    });

    // The API server down: unreachable, counted, every window keeps the last labels.
    server.stop();
    let mut last_good = expected("asia-east2-a");
    last_good.insert("sci-cf/rack".into(), "r13".into());
    let reads_before = agent.metric("sci_agent_node_label_reads_total");
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.metric("sci_agent_node_label_faults_total{fault=\"unreachable\"}") < 2.0 {
        assert!(Instant::now() < deadline, "no unreachable faults counted");
        assert_eq!(agent.next_labels(), last_good);
    }
    assert_eq!(
        agent.metric("sci_agent_node_label_reads_total"),
        reads_before
    );
    assert_eq!(agent.metric("sci_agent_node_labels"), 6.0);
    // Not in the allow-list: never asked for, never counted as dropped.
    assert_eq!(
        agent.metric("sci_agent_node_labels_dropped_total{reason=\"invalid\"}"),
        0.0
    );
    let (answered, refused) = {
        let s = served.lock().unwrap();
        (s.answered, s.refused)
    };
    println!("served {answered} answers, refused {refused}; the agent read {reads_before} times");
}
