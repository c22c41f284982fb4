//! Prometheus exposition: totals, folding of exited processes, bounded series,
//! and the real HTTP endpoint on loopback.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use sci_agent::sinks::metrics::{serve_metrics_on, MetricsRegistry};
use sci_agent::window::{CpuSource, LossCounters, ProcessRecord, WindowReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn record(pid: u32, comm: &str, energy_j: f64, exited: bool) -> ProcessRecord {
    ProcessRecord {
        pid,
        comm: comm.into(),
        cgroup: Some("/system.slice/app.service".into()),
        cpu_ns: 500_000_000,
        exited,
        energy_j,
        idle_share_j: energy_j / 10.0,
        carbon_g: energy_j / 100.0,
        embodied_g: 0.01,
        ..Default::default()
    }
}

fn window(seq: u64, processes: Vec<ProcessRecord>) -> WindowReport {
    let mut r = WindowReport::new(
        "h".into(),
        "i".into(),
        seq * 1_000_000_000,
        (seq + 1) * 1_000_000_000,
        CpuSource::Ebpf,
        2,
    );
    r.seq = seq;
    r.energy_source = "model-linear".into();
    r.estimated = true;
    r.host_energy_j = 10.0;
    r.idle_energy_j = 4.0;
    r.host_carbon_g = 0.5;
    r.host_embodied_g = 0.25;
    r.busy_cpu_ns = 1_000_000_000;
    r.idle_cpu_ns = 1_000_000_000;
    r.conservation_violations = 0;
    r.lost = LossCounters {
        ringbuf_drops: 3,
        late_cpu_ns: 2_000_000_000,
        request_histogram_full: 4,
        profile_samples_lost: 5,
        profile_stacks_lost: 7,
        ..Default::default()
    };
    r.processes = processes;
    r
}

/// `name{labels}` -> value, from the exposition text.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn sum_family(m: &HashMap<String, f64>, family: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{family}{{")))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn totals_and_exited_processes_folded_by_comm() {
    let reg = MetricsRegistry::new();
    reg.observe(&window(
        0,
        vec![
            record(100, "api", 2.0, false),
            record(200, "batch", 1.0, true),
        ],
    ));
    let m = parse(&reg.render());
    assert_eq!(m["sci_host_energy_joules_total"], 10.0);
    let api = "{pid=\"100\",comm=\"api\",cgroup=\"/system.slice/app.service\"}";
    let batch = "{comm=\"batch\",cgroup=\"/system.slice/app.service\"}";
    assert_eq!(m[&format!("sci_process_energy_joules_total{api}")], 2.0);
    // Exited in its first window: straight into the comm series, no pid label.
    assert_eq!(m[&format!("sci_process_energy_joules_total{batch}")], 1.0);
    assert_eq!(
        m["sci_energy_source_info{source=\"model-linear\",estimated=\"true\"}"],
        1.0
    );
    assert_eq!(m["sci_cpu_source_info{source=\"ebpf\"}"], 1.0);

    reg.observe(&window(
        1,
        vec![
            record(100, "api", 3.0, true),
            record(101, "api", 0.5, false),
        ],
    ));
    let m = parse(&reg.render());
    assert_eq!(m["sci_host_energy_joules_total"], 20.0);
    assert_eq!(m["sci_host_idle_energy_joules_total"], 8.0);
    assert_eq!(m["sci_host_embodied_grams_total"], 0.5);
    assert_eq!(m["sci_lost_events_total{kind=\"ringbuf_drop\"}"], 6.0);
    assert_eq!(
        m["sci_lost_events_total{kind=\"request_histogram_full\"}"],
        8.0
    );
    assert_eq!(
        m["sci_lost_events_total{kind=\"profile_samples_lost\"}"],
        10.0
    );
    assert_eq!(
        m["sci_lost_events_total{kind=\"profile_stacks_lost\"}"],
        14.0
    );
    assert_eq!(m["sci_lost_cpu_seconds_total{kind=\"late\"}"], 4.0);
    assert_eq!(m["sci_host_cpu_seconds_total{mode=\"busy\"}"], 2.0);
    // pid 100 exited: its 5 J now live in the comm series; pid 101 has its own.
    assert!(!m.contains_key(&format!("sci_process_energy_joules_total{api}")));
    assert_eq!(
        m["sci_process_energy_joules_total{comm=\"api\",cgroup=\"/system.slice/app.service\"}"],
        5.0
    );
    assert_eq!(m["sci_process_energy_joules_total{pid=\"101\",comm=\"api\",cgroup=\"/system.slice/app.service\"}"], 0.5);
    assert_eq!(sum_family(&m, "sci_process_energy_joules_total"), 6.5);
    assert_eq!(sum_family(&m, "sci_process_cpu_seconds_total"), 2.0);
}

#[test]
fn series_are_bounded_and_totals_kept() {
    let reg = MetricsRegistry::with_limits(3, 4);
    let mut total_j = 0.0;
    for w in 0..20u64 {
        let processes: Vec<ProcessRecord> = (0..10u32)
            .map(|i| {
                let pid = (w as u32) * 100 + i;
                let comm = format!("job-{}", (w as u32 * 10 + i) % 37);
                record(pid, &comm, 1.0 + f64::from(i), i % 2 == 0)
            })
            .collect();
        total_j += processes.iter().map(|p| p.energy_j).sum::<f64>();
        reg.observe(&window(w, processes));
        assert!(
            reg.process_series_count() <= 3 + 4,
            "window {w}: {}",
            reg.process_series_count()
        );
    }
    let text = reg.render();
    let m = parse(&text);
    // Nothing lost: the bounded series still add up to every joule observed.
    assert!((sum_family(&m, "sci_process_energy_joules_total") - total_j).abs() < 1e-9);
    assert!(m.keys().any(|k| k.contains("comm=\"_other\"")), "{text}");
    // Label values are escaped.
    let reg = MetricsRegistry::new();
    reg.observe(&window(0, vec![record(1, "we\"ird\\name", 1.0, true)]));
    assert!(reg.render().contains("comm=\"we\\\"ird\\\\name\""));
}

async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn serves_metrics_over_http() {
    let reg = Arc::new(MetricsRegistry::new());
    reg.observe(&window(0, vec![record(7, "svc", 2.5, false)]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_metrics_on(listener, Arc::clone(&reg)));

    let response = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        // Header names are case-insensitive (hyper writes them in lower case).
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    let m = parse(body);
    assert_eq!(m["sci_process_energy_joules_total{pid=\"7\",comm=\"svc\",cgroup=\"/system.slice/app.service\"}"], 2.5);

    // A later window shows up on the next scrape.
    reg.observe(&window(1, vec![record(7, "svc", 1.5, false)]));
    let response = http(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(
        parse(response.split_once("\r\n\r\n").unwrap().1)["sci_host_energy_joules_total"] == 20.0
    );

    assert!(http(
        addr,
        "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .await
    .starts_with("HTTP/1.1 404"));
    assert!(http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .await
    .starts_with("HTTP/1.1 405"));
    // A client that sends garbage and hangs up does not stop the server.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    assert!(http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .await
    .starts_with("HTTP/1.1 200"));
    server.abort();
}

/// Per (service, scenario) series: hand sums per pair, the pairs beyond
/// the limit in `_other` with each folded record counted, and no joule lost.
#[test]
fn service_series_are_bounded_folded_and_counted() {
    let labelled =
        |pid: u32, service: Option<&str>, scenario: Option<&str>, energy_j: f64| ProcessRecord {
            service: service.map(Into::into),
            scenario: scenario.map(Into::into),
            ..record(pid, "worker", energy_j, false)
        };
    let processes = || {
        vec![
            labelled(10, Some("loan-api"), Some("credit"), 1.0),
            labelled(11, Some("loan-api"), Some("query"), 2.0),
            labelled(12, Some("batch"), Some("repayment"), 4.0),
            labelled(13, None, None, 8.0),
        ]
    };
    let bounded = MetricsRegistry::new().with_service_series(3);
    let open = MetricsRegistry::new();
    for w in 0..2 {
        bounded.observe(&window(w, processes()));
        open.observe(&window(w, processes()));
    }
    let m = parse(&bounded.render());
    let series = |m: &HashMap<String, f64>, family: &str, service: &str, scenario: &str| {
        m[&format!("{family}{{service=\"{service}\",scenario=\"{scenario}\"}}")]
    };
    let energy = "sci_service_energy_joules_total";
    assert_eq!(series(&m, energy, "loan-api", "credit"), 2.0);
    assert_eq!(series(&m, energy, "loan-api", "query"), 4.0);
    // batch/repayment and the unlabelled process arrived past the limit of 3
    // (two pairs and _other): 2 windows x (4 + 8) J, 4 records folded.
    assert_eq!(series(&m, energy, "_other", "_other"), 24.0);
    assert_eq!(m["sci_service_series_folded_total"], 4.0);
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with(&format!("{energy}{{")))
            .count(),
        3
    );
    assert_eq!(sum_family(&m, energy), 30.0);
    assert_eq!(sum_family(&m, "sci_service_cpu_seconds_total"), 4.0);
    assert!(
        (sum_family(&m, "sci_service_carbon_grams_total") - 0.30).abs() < 1e-12,
        "{m:?}"
    );

    // Under the default limit every pair has its own series; none folded.
    let m = parse(&open.render());
    assert_eq!(series(&m, energy, "batch", "repayment"), 8.0);
    assert_eq!(series(&m, energy, "unassigned", "unassigned"), 16.0);
    assert_eq!(m["sci_service_series_folded_total"], 0.0);
}
