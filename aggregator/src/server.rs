//! `sci-aggregator serve`: the gRPC ingest (with gRPC health) and the HTTP
//! interface over one store.
//!
//! Both listeners admit connections through [`crate::limits`] (per-address
//! and total limits, idle timeout; TLS handshake timeout on gRPC), and bound
//! request metadata. The HTTP side answers `/healthz` to anyone; every other
//! path needs `Authorization: Bearer <token>` of an `[[http_tokens]]` entry.
//! Without any HTTP token the server only starts when `http_listen` is a
//! loopback address (or with `--insecure`).
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sci_proto::v1::ingest_server::IngestServer;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::AggregatorConfig;
use crate::error::AggregatorError;
use crate::http::HttpState;
use crate::ingest::{IngestCounters, IngestService, SharedStore};
use crate::limits::{admit_connections, AdmittedListener, ConnectionLimiter};

/// Longest request target (path and query) the HTTP side reads.
const MAX_URI_BYTES: usize = 4096;

#[derive(Clone)]
struct HttpAuth {
    tokens: Arc<Vec<(String, String)>>,
    counters: Arc<Mutex<IngestCounters>>,
    limiter: Arc<ConnectionLimiter>,
    max_header_bytes: usize,
}

impl HttpAuth {
    /// The connection of `request` presented valid credentials.
    fn authenticated(&self, request: &Request) {
        if let Some(peer) = request
            .extensions()
            .get::<axum::extract::ConnectInfo<crate::limits::Peer>>()
        {
            self.limiter.mark_authenticated(peer.0 .0);
        }
    }
}

/// Compares without stopping at the first differing byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(auth): State<HttpAuth>, request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return (
            StatusCode::URI_TOO_LONG,
            format!("request target of {target} bytes (at most {MAX_URI_BYTES})"),
        )
            .into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > auth.max_header_bytes {
        auth.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .http_headers_too_large += 1;
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers of {header_bytes} bytes (limits.max_metadata_bytes: {})",
                auth.max_header_bytes
            ),
        )
            .into_response();
    }
    if auth.tokens.is_empty() {
        auth.authenticated(&request);
        return next.run(request).await;
    }
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let holder = presented.and_then(|p| {
        auth.tokens
            .iter()
            .find(|(_, token)| same_secret(token.as_bytes(), p.as_bytes()))
            .map(|(name, _)| name.clone())
    });
    match holder {
        Some(_) => {
            auth.authenticated(&request);
            next.run(request).await
        }
        None => {
            auth.counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .http_unauthorized += 1;
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                if presented.is_some() {
                    "unknown token"
                } else {
                    "this endpoint needs `Authorization: Bearer <token>` (aggregator.toml [[http_tokens]])"
                },
            )
                .into_response()
        }
    }
}

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
    let http_addr: SocketAddr = config
        .http_listen
        .parse()
        .map_err(|e| config_err(format!("http_listen {:?}: {e}", config.http_listen)))?;
    if config.http_tokens.is_empty() && !http_addr.ip().is_loopback() {
        if !insecure {
            return Err(config_err(format!(
                "http_listen {http_addr} is not loopback and no [[http_tokens]] are configured: anyone could read the fleet's figures; add tokens, listen on 127.0.0.1, or pass --insecure"
            )));
        }
        tracing::warn!("--insecure: the HTTP API on {http_addr} needs no token");
    }
    // Opened on a blocking thread: the PostgreSQL client blocks on its own runtime.
    let store: SharedStore = {
        let config = config.clone();
        Arc::from(
            tokio::task::spawn_blocking(move || config.open_store())
                .await
                .map_err(|e| AggregatorError::Invalid(format!("opening the store: {e}")))??,
        )
    };
    // Each listener may hold max_connections descriptors, the store and the
    // process some more: make sure the process may open them, or say why not.
    let pool = if config.postgres_url.is_some() {
        2 * (config.max_concurrent_queries as u64 + 1)
    } else {
        config.max_concurrent_queries as u64 + 2
    };
    let needed = 2 * config.limits.max_connections as u64 + pool + crate::limits::DESCRIPTOR_MARGIN;
    crate::limits::ensure_descriptors(needed).map_err(|e| config_err(format!("limits: {e}")))?;
    let config = Arc::new(config);
    let grpc_limiter = ConnectionLimiter::new("grpc", &config.limits);
    let http_limiter = ConnectionLimiter::new("http", &config.limits);
    let counters = Arc::new(Mutex::new(IngestCounters {
        limiters: vec![Arc::clone(&grpc_limiter), Arc::clone(&http_limiter)],
        ..Default::default()
    }));

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

    let http_listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .map_err(|e| AggregatorError::io(format!("binding http_listen {http_addr}"), e))?;
    let grpc_addr: SocketAddr = config
        .grpc_listen
        .parse()
        .map_err(|e| config_err(format!("grpc_listen {:?}: {e}", config.grpc_listen)))?;
    let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| AggregatorError::io(format!("binding grpc_listen {grpc_addr}"), e))?;
    let idle = config.limits.idle_timeout;
    let http_limiter_for_auth = Arc::clone(&http_limiter);
    let grpc_limiter_for_auth = Arc::clone(&grpc_limiter);
    let http_listener = AdmittedListener {
        local: http_addr,
        connections: admit_connections(http_listener, http_limiter, idle),
    };
    let grpc_incoming = tokio_stream::wrappers::ReceiverStream::new(admit_connections(
        grpc_listener,
        grpc_limiter,
        idle,
    ))
    .map(|(stream, _)| Ok::<_, std::io::Error>(stream));
    let http_state = HttpState::new(
        Arc::clone(&store),
        Arc::clone(&config),
        Arc::clone(&counters),
    );
    // The KEDA scaler's plans take the same permits as the HTTP queries.
    let queries = Arc::clone(&http_state.queries);
    tokio::spawn(crate::http::refresh_recent(
        http_state.clone(),
        Duration::from_secs(60),
    ));
    if let Some(rw) = &config.remote_write {
        let path = crate::export::remote_write::state_path(
            rw,
            &config.database,
            config.postgres_url.is_some(),
        )
        .map_err(config_err)?;
        let mut writer = crate::export::remote_write::RemoteWriter::open(
            rw.clone(),
            path,
            Arc::clone(&store),
            config.weights.clone(),
            Arc::clone(&http_state.remote_write),
            None,
        )?;
        tracing::info!(
            "remote-write to {} from {} (unix s)",
            rw.url,
            writer.position_s()
        );
        tokio::spawn(async move {
            if let Err(e) = writer.run(None).await {
                tracing::error!("remote-write stopped: {e}");
            }
        });
    }
    if let Some(o) = &config.otlp {
        let path =
            crate::export::otlp::state_path(o, &config.database, config.postgres_url.is_some())
                .map_err(config_err)?;
        let mut exporter = crate::export::otlp::OtlpExporter::open(
            o.clone(),
            path,
            Arc::clone(&store),
            config.weights.clone(),
            Arc::clone(&http_state.otlp),
            None,
        )?;
        tracing::info!(
            "otlp export to {} from {} (unix s)",
            o.endpoint,
            exporter.position_s()
        );
        tokio::spawn(async move {
            if let Err(e) = exporter.run(None).await {
                tracing::error!("otlp export stopped: {e}");
            }
        });
    }
    {
        // Retention: hourly, off the ingest path (SQLite deletes in slices).
        let store = Arc::clone(&store);
        let retention = config.retention();
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            loop {
                let s = Arc::clone(&store);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                match tokio::task::spawn_blocking(move || s.expire(now, &retention)).await {
                    Ok(Ok(expired)) => {
                        tracing::info!("retention: {expired:?}");
                        let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                        for (kind, rows) in expired.kinds() {
                            *c.retention_deleted.entry(kind.to_string()).or_default() += rows;
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("retention: {e}"),
                    Err(e) => tracing::warn!("retention: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
    }
    let auth = HttpAuth {
        tokens: Arc::new(
            config
                .http_tokens
                .iter()
                .map(|t| (t.name.clone(), t.token.clone()))
                .collect(),
        ),
        counters: Arc::clone(&counters),
        limiter: Arc::clone(&http_limiter_for_auth),
        max_header_bytes: config.limits.max_metadata_bytes,
    };
    let app = crate::http::routes()
        .merge(crate::plan::http::routes())
        .with_state(http_state)
        .layer(axum::middleware::from_fn_with_state(auth, require_token));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(
            http_listener,
            app.into_make_service_with_connect_info::<crate::limits::Peer>(),
        )
        .with_graceful_shutdown(async move {
            let _ = http_stop.changed().await;
        })
        .await
    });

    let limits = &config.limits;
    let mut builder = Server::builder()
        .http2_max_header_list_size(u32::try_from(limits.max_metadata_bytes).unwrap_or(u32::MAX))
        // An agent needs one stream (and one for the health check).
        .max_concurrent_streams(8);
    if let Some(tls) = &config.tls {
        let mut server_tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&tls.cert, "tls.cert")?,
                read(&tls.key, "tls.key")?,
            ))
            .timeout(limits.handshake_timeout);
        if let Some(ca) = &tls.client_ca {
            server_tls =
                server_tls.client_ca_root(Certificate::from_pem(read(ca, "tls.client_ca")?));
        }
        builder = builder
            .tls_config(server_tls)
            .map_err(|e| config_err(format!("tls: {e}")))?;
    }
    let scaler = crate::plan::keda::CarbonScaler::new(
        Arc::clone(&store),
        Arc::clone(&config),
        Arc::clone(&counters),
        queries,
    )
    .with_limiter(Arc::clone(&grpc_limiter_for_auth));
    let ingest = IngestService::new(Arc::clone(&store), Arc::clone(&config), counters)
        .with_limiter(grpc_limiter_for_auth)
        .with_stop(stop_rx.clone());
    tracing::info!(
        "gRPC ingest on {}, HTTP on {}",
        config.grpc_listen,
        config.http_listen
    );
    let mut grpc_stop = stop_rx.clone();
    let grpc = builder
        .add_service(health_service)
        .add_service(IngestServer::new(ingest).max_decoding_message_size(limits.max_message_bytes))
        .add_service(sci_proto::keda::external_scaler_server::ExternalScalerServer::new(scaler))
        .serve_with_incoming_shutdown(grpc_incoming, async move {
            let _ = grpc_stop.changed().await;
        });
    // Once stopping, the server has shutdown_grace to finish what it holds.
    let mut grace_stop = stop_rx;
    let grace = config.shutdown_grace;
    let deadline = async move {
        let _ = grace_stop.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = grpc => served.map_err(|e| AggregatorError::Invalid(format!("gRPC server: {e}")))?,
        _ = deadline => tracing::warn!("stopping: connections still open after shutdown_grace ({grace:?}); exiting"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), http).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::TlsConfig;

    #[tokio::test]
    async fn a_non_loopback_http_listener_needs_tokens() {
        let config = AggregatorConfig {
            http_listen: "0.0.0.0:0".into(),
            tls: Some(TlsConfig {
                cert: "/nonexistent/cert.pem".into(),
                key: "/nonexistent/key.pem".into(),
                client_ca: Some("/nonexistent/ca.pem".into()),
                revoked: Vec::new(),
            }),
            ..Default::default()
        };
        let err = serve(config, false, async {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http_listen 0.0.0.0:0 is not loopback") && err.contains("http_tokens"),
            "{err}"
        );
        // The shipped configuration and the default bind HTTP to loopback.
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aggregator.toml");
        let shipped = AggregatorConfig::load(&path).unwrap();
        for listen in [shipped.http_listen, AggregatorConfig::default().http_listen] {
            let addr: SocketAddr = listen.parse().unwrap();
            assert!(addr.ip().is_loopback(), "{addr}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abcdef", b"abcdef"));
        assert!(!same_secret(b"abcdef", b"abcdeg"));
        assert!(!same_secret(b"abc", b"abcdef"));
    }
}
