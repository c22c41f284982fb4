//! `sci-aggregator serve`: the gRPC ingest (with gRPC health) and the HTTP
//! interface over one store.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sci_proto::v1::ingest_server::IngestServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::AggregatorConfig;
use crate::error::AggregatorError;
use crate::http::{router, HttpState};
use crate::ingest::{IngestCounters, IngestService, SharedStore};

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, AggregatorError> {
    std::fs::read(path)
        .map_err(|e| AggregatorError::io(format!("reading {what} {}", path.display()), e))
}

/// Runs until `shutdown` resolves.
pub async fn serve(
    config: AggregatorConfig,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AggregatorError> {
    let config_err = |message: String| AggregatorError::Config {
        path: "aggregator.toml".into(),
        message,
    };
    if config.tls.is_none() && !insecure {
        return Err(config_err(
            "no [tls] section: agents' windows would travel in plaintext; configure TLS or pass --insecure".into(),
        ));
    }
    if config.tls.is_none() {
        tracing::warn!("--insecure: the gRPC ingest listens in plaintext");
    }
    if config.agents.is_empty() && config.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
        if !insecure {
            return Err(config_err(
                "no agent tokens and no client CA: any agent could send; configure [[agents]] or tls.client_ca, or pass --insecure".into(),
            ));
        }
        tracing::warn!("--insecure: no agent authentication configured, every agent is trusted");
    }
    // Opened on a blocking thread: the PostgreSQL client blocks on its own runtime.
    let store: SharedStore = {
        let config = config.clone();
        Arc::from(
            tokio::task::spawn_blocking(move || crate::store::open(&config))
                .await
                .map_err(|e| AggregatorError::Invalid(format!("opening the store: {e}")))??,
        )
    };
    let config = Arc::new(config);
    let counters = Arc::new(Mutex::new(IngestCounters::default()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IngestServer<IngestService>>().await;
    {
        let store = Arc::clone(&store);
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                let s = Arc::clone(&store);
                let ok = tokio::task::spawn_blocking(move || s.healthy())
                    .await
                    .unwrap_or(false);
                if ok {
                    health.set_serving::<IngestServer<IngestService>>().await;
                } else {
                    health
                        .set_not_serving::<IngestServer<IngestService>>()
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    let http_listener = tokio::net::TcpListener::bind(&config.http_listen)
        .await
        .map_err(|e| {
            AggregatorError::io(format!("binding http_listen {}", config.http_listen), e)
        })?;
    let grpc_addr = config
        .grpc_listen
        .parse()
        .map_err(|e| config_err(format!("grpc_listen {:?}: {e}", config.grpc_listen)))?;
    let http_state = HttpState::new(
        Arc::clone(&store),
        Arc::clone(&config),
        Arc::clone(&counters),
    );
    tokio::spawn(crate::http::refresh_recent(
        http_state.clone(),
        Duration::from_secs(60),
    ));
    {
        // Retention: hourly, off the ingest path (SQLite deletes in slices).
        let store = Arc::clone(&store);
        let retention = config.retention();
        tokio::spawn(async move {
            loop {
                let s = Arc::clone(&store);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                match tokio::task::spawn_blocking(move || s.expire(now, &retention)).await {
                    Ok(Ok(expired)) => tracing::info!("retention: {expired:?}"),
                    Ok(Err(e)) => tracing::warn!("retention: {e}"),
                    Err(e) => tracing::warn!("retention: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, router(http_state))
            .with_graceful_shutdown(async move {
                let _ = http_stop.changed().await;
            })
            .await
    });

    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut server_tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(&tls.cert, "tls.cert")?,
            read(&tls.key, "tls.key")?,
        ));
        if let Some(ca) = &tls.client_ca {
            server_tls =
                server_tls.client_ca_root(Certificate::from_pem(read(ca, "tls.client_ca")?));
        }
        builder = builder
            .tls_config(server_tls)
            .map_err(|e| config_err(format!("tls: {e}")))?;
    }
    let ingest = IngestService::new(Arc::clone(&store), Arc::clone(&config), counters);
    tracing::info!(
        "gRPC ingest on {}, HTTP on {}",
        config.grpc_listen,
        config.http_listen
    );
    let mut grpc_stop = stop_rx;
    builder
        .add_service(health_service)
        .add_service(IngestServer::new(ingest).max_decoding_message_size(32 * 1024 * 1024))
        .serve_with_shutdown(grpc_addr, async move {
            let _ = grpc_stop.changed().await;
        })
        .await
        .map_err(|e| AggregatorError::Invalid(format!("gRPC server: {e}")))?;
    let _ = http.await;
    Ok(())
}
