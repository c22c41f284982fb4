//! Shared by the aggregator's integration tests that read its HTTP API.

/// The aggregator's HTTP API with the plan routes (as the server merges
/// them, without its token check) over `store` on a loopback port; the
/// runtime serves as long as it is kept.
pub fn serve(
    store: sci_aggregator::store::sqlite::SqliteStore,
    config: sci_aggregator::config::AggregatorConfig,
) -> (tokio::runtime::Runtime, std::net::SocketAddr) {
    let store: std::sync::Arc<dyn sci_aggregator::store::Store> = std::sync::Arc::new(store);
    let state = sci_aggregator::http::HttpState::new(
        store,
        std::sync::Arc::new(config),
        Default::default(),
    );
    let app = sci_aggregator::http::routes()
        .merge(sci_aggregator::plan::http::routes())
        .with_state(state);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (runtime, addr)
}
