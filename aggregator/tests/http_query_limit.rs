//! The HTTP API's query limit, counted (#27 follow-up): a real axum server
//! on loopback over a real SQLite store, with `max_concurrent_queries = 1`.
//! With the one permit held (as a running query holds it) a query is 503
//! with `Retry-After`, and counted in
//! `sci_http_queries_refused_total{reason="busy"}`; once it is given back
//! the same query is answered.
#![allow(clippy::unwrap_used)]
use std::sync::{Arc, Mutex};

use sci_aggregator::config::AggregatorConfig;
use sci_aggregator::http::{router, HttpState};
use sci_aggregator::ingest::IngestCounters;
use sci_aggregator::store::SharedStore;
use sci_test_harness::http::http_get;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_limit_is_503_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "database = \"{}\"\nmax_concurrent_queries = 1\n",
        dir.path().join("sci.db").display()
    );
    let config =
        AggregatorConfig::from_toml_str(&toml, &dir.path().join("aggregator.toml")).unwrap();
    let store: SharedStore = Arc::from(config.open_store().unwrap());
    let state = HttpState::new(
        store,
        Arc::new(config),
        Arc::new(Mutex::new(IngestCounters::default())),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let get = move |path: &'static str| {
        tokio::task::spawn_blocking(move || http_get(port, path).unwrap())
    };
    let path = "/api/v1/sci?from=1767225600&to=1767229200";

    let held = Arc::clone(&state.queries).acquire_owned().await.unwrap();
    let (status, body) = get(path).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many queries"), "{body}");
    let (_, metrics) = get("/metrics").await.unwrap();
    assert!(
        metrics.contains("sci_http_queries_refused_total{reason=\"busy\"} 1"),
        "{metrics}"
    );
    drop(held);
    let (status, body) = get(path).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = get("/metrics").await.unwrap();
    assert!(metrics.contains("sci_http_queries_refused_total{reason=\"busy\"} 1"));
}
