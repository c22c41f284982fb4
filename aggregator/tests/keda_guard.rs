//! KEDA's external scaler behind the gRPC port's identity check and the
//! query limit (#27): a real tonic server on loopback serving the scaler
//! over a real SQLite store, called by a real tonic client speaking KEDA's
//! protocol. No credentials and an unknown token are UNAUTHENTICATED; an
//! `[[agents]]` token is answered from the plan; with the one
//! `max_concurrent_queries` permit held (as a running HTTP query holds it)
//! a plan is RESOURCE_EXHAUSTED, and it is answered again once the permit
//! is given back. Every refusal is counted by reason.
#![allow(clippy::unwrap_used)]
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sci_aggregator::config::AggregatorConfig;
use sci_aggregator::ingest::IngestCounters;
use sci_aggregator::plan::keda::CarbonScaler;
use sci_aggregator::store::SharedStore;
use sci_proto::keda::external_scaler_client::ExternalScalerClient;
use sci_proto::keda::external_scaler_server::ExternalScalerServer;
use sci_proto::keda::{GetMetricsRequest, ScaledObjectRef};
use tokio::sync::Semaphore;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn object() -> ScaledObjectRef {
    ScaledObjectRef {
        name: "worker".into(),
        namespace: "batch".into(),
        scaler_metadata: BTreeMap::from([("job".to_string(), "statements".to_string())]),
    }
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_scaler_needs_credentials_and_a_query_permit() {
    // Not across an hour boundary: the plan answers for the hour it is called in.
    while now_s() % 3600 > 3540 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let now_hour = now_s() / 3600 * 3600;
    // dc-k: this hour at 100 g/kWh, the hours around it at 500.
    let csv = dir.path().join("dck.csv");
    let mut text = String::from("timestamp,g_per_kwh\n");
    for i in 0..5 {
        let h = now_hour - 3600 + i * 3600;
        let v = if h == now_hour { 100.0 } else { 500.0 };
        text.push_str(&format!(
            "{},{v}\n",
            agent_common::time_text::format_unix_s(h as i64)
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let hhmm = |h: u64| format!("{:02}:00", (h / 3600) % 24);
    let toml = format!(
        r#"
database = "{}"
max_concurrent_queries = 1
[[agents]]
host = "r1"
token = "r1-token-0123456789abcdef"
[[scheduling.deferrable]]
name = "statements"
service = "statements"
datacenter = "dc-k"
release = "{}"
deadline = "{}"
hours = 1
replicas = 3
cores = 0.5
energy_j_per_hour = 1000.0
[[scheduling.intensity]]
datacenter = "dc-k"
path = "{}"
format = "csv"
"#,
        dir.path().join("sci.db").display(),
        hhmm(now_hour - 3600),
        hhmm(now_hour + 3 * 3600),
        csv.display()
    );
    let config =
        AggregatorConfig::from_toml_str(&toml, &dir.path().join("aggregator.toml")).unwrap();
    let store: SharedStore = Arc::from(config.open_store().unwrap());
    let config = Arc::new(config);
    let counters = Arc::new(Mutex::new(IngestCounters::default()));
    let queries = Arc::new(Semaphore::new(config.max_concurrent_queries));
    let scaler = CarbonScaler::new(
        store,
        Arc::clone(&config),
        Arc::clone(&counters),
        Arc::clone(&queries),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExternalScalerServer::new(scaler))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = ExternalScalerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // No credentials, an unknown token, a malformed header.
    let none = client.is_active(object()).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let unknown = client
        .get_metrics(with_token(
            GetMetricsRequest {
                scaled_object_ref: Some(object()),
                metric_name: "sci_plan_statements".into(),
            },
            "guess",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    let mut malformed = Request::new(object());
    malformed.metadata_mut().insert(
        "authorization",
        MetadataValue::from_static("r1-token-0123456789abcdef"),
    );
    let malformed = client.get_metric_spec(malformed).await.unwrap_err();
    assert_eq!(malformed.code(), Code::Unauthenticated, "{malformed:?}");
    let stream = client.stream_is_active(object()).await.unwrap_err();
    assert_eq!(stream.code(), Code::Unauthenticated, "{stream:?}");

    // An agent's token: this hour is the plan's (lowest intensity).
    let active = client
        .is_active(with_token(object(), "r1-token-0123456789abcdef"))
        .await
        .unwrap()
        .into_inner();
    assert!(active.result);
    let metrics = client
        .get_metrics(with_token(
            GetMetricsRequest {
                scaled_object_ref: Some(object()),
                metric_name: "sci_plan_statements".into(),
            },
            "r1-token-0123456789abcdef",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.metric_values[0].metric_value, 3);

    // The one query permit held: the plan is refused, not queued.
    let held = Arc::clone(&queries).acquire_owned().await.unwrap();
    let busy = client
        .is_active(with_token(object(), "r1-token-0123456789abcdef"))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    assert!(
        busy.message().contains("max_concurrent_queries = 1"),
        "{busy:?}"
    );
    let busy = client
        .get_metrics(with_token(
            GetMetricsRequest {
                scaled_object_ref: Some(object()),
                metric_name: "sci_plan_statements".into(),
            },
            "r1-token-0123456789abcdef",
        ))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    // The metric spec needs no plan: answered while the permit is held.
    let spec = client
        .get_metric_spec(with_token(object(), "r1-token-0123456789abcdef"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "sci_plan_statements");
    drop(held);
    assert!(
        client
            .is_active(with_token(object(), "r1-token-0123456789abcdef"))
            .await
            .unwrap()
            .into_inner()
            .result
    );

    let refused = counters.lock().unwrap().keda_refused.clone();
    assert_eq!(
        refused,
        BTreeMap::from([
            ("bad_credentials".to_string(), 2),
            ("busy".to_string(), 2),
            ("unauthenticated".to_string(), 2),
        ])
    );
    // Every permit was given back.
    assert_eq!(queries.available_permits(), 1);
}
