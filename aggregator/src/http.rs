//! HTTP interface: `GET /api/v1/sci?from=&to=&period=` (JSON evaluation),
//! `GET /metrics` (Prometheus text), `GET /healthz`.
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::AggregatorConfig;
use crate::ingest::{IngestCounters, SharedStore};
use crate::sci::{evaluate, Evaluation};

#[derive(Clone)]
pub struct HttpState {
    pub store: SharedStore,
    pub config: Arc<AggregatorConfig>,
    pub counters: Arc<Mutex<IngestCounters>>,
}

#[derive(Debug, Deserialize)]
pub struct RangeQuery {
    /// Unix seconds (default: 24 h before `to`).
    pub from: Option<u64>,
    /// Unix seconds (default: now).
    pub to: Option<u64>,
    /// Period length in seconds (default: the configured period).
    pub period: Option<u64>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Evaluates a range from the store.
pub fn evaluate_range(
    state: &HttpState,
    q: &RangeQuery,
) -> Result<Evaluation, (StatusCode, String)> {
    let to = q.to.unwrap_or_else(|| now_s() + 1);
    let from = q.from.unwrap_or(to.saturating_sub(86_400));
    let period = q.period.unwrap_or(state.config.period.as_secs()).max(1);
    if from >= to {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("from ({from}) must be before to ({to})"),
        ));
    }
    if (to - from) / period > 100_000 {
        return Err((
            StatusCode::BAD_REQUEST,
            "more than 100000 periods: use a longer period".into(),
        ));
    }
    let rows = lock(&state.store)
        .rows(from * 1_000_000_000, to * 1_000_000_000)
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(evaluate(&rows, from, to, period, &state.config.weights))
}

async fn sci(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    match tokio::task::spawn_blocking(move || evaluate_range(&state, &q)).await {
        Ok(Ok(evaluation)) => Json(evaluation).into_response(),
        Ok(Err((code, message))) => (code, message).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text: fleet SCI over the last 24 h, per scenario, ingest counters.
pub fn render_metrics(state: &HttpState) -> String {
    let mut out = String::new();
    let healthy = lock(&state.store).healthy();
    let _ = writeln!(out, "# HELP sci_store_healthy 1 when the store answers.\n# TYPE sci_store_healthy gauge\nsci_store_healthy {}", u8::from(healthy));
    if let Ok(e) = evaluate_range(
        state,
        &RangeQuery {
            from: None,
            to: None,
            period: None,
        },
    ) {
        let _ = writeln!(out, "# HELP sci_fleet_sci_g_per_unit Fleet SCI_CF over the last 24 h, gCO2e per business unit (mean of periods, and pooled).\n# TYPE sci_fleet_sci_g_per_unit gauge");
        if let Some(v) = e.sci_cf_mean {
            let _ = writeln!(out, "sci_fleet_sci_g_per_unit{{method=\"mean\"}} {v}");
        }
        if let Some(v) = e.sci_cf_pooled {
            let _ = writeln!(out, "sci_fleet_sci_g_per_unit{{method=\"pooled\"}} {v}");
        }
        let _ = writeln!(out, "# HELP sci_fleet_scenario_g_per_transaction Carbon per completed transaction over the last 24 h.\n# TYPE sci_fleet_scenario_g_per_transaction gauge");
        for s in e.scenarios.iter().filter(|s| s.g_per_transaction.is_some()) {
            let _ = writeln!(
                out,
                "sci_fleet_scenario_g_per_transaction{{scenario=\"{}\"}} {}",
                s.scenario,
                s.g_per_transaction.unwrap_or(0.0)
            );
        }
        let _ = writeln!(out, "# HELP sci_fleet_scenario_measured_weight Carbon per transaction relative to query's (the measured alpha).\n# TYPE sci_fleet_scenario_measured_weight gauge");
        for s in e.scenarios.iter().filter(|s| s.measured_weight.is_some()) {
            let _ = writeln!(
                out,
                "sci_fleet_scenario_measured_weight{{scenario=\"{}\"}} {}",
                s.scenario,
                s.measured_weight.unwrap_or(0.0)
            );
        }
    }
    let c = lock(&state.counters);
    let _ = writeln!(out, "# HELP sci_ingest_windows_total Windows stored (new), and replays ignored (duplicate).\n# TYPE sci_ingest_windows_total counter");
    let _ = writeln!(
        out,
        "sci_ingest_windows_total{{result=\"accepted\"}} {}",
        c.windows_accepted
    );
    let _ = writeln!(
        out,
        "sci_ingest_windows_total{{result=\"duplicate\"}} {}",
        c.windows_duplicate
    );
    let _ = writeln!(out, "# HELP sci_ingest_batches_total Batches committed and acknowledged.\n# TYPE sci_ingest_batches_total counter\nsci_ingest_batches_total {}", c.batches);
    let _ = writeln!(out, "# HELP sci_ingest_refused_windows_total Windows refused, per host and reason.\n# TYPE sci_ingest_refused_windows_total counter");
    for ((host, kind), n) in &c.refused {
        let _ = writeln!(
            out,
            "sci_ingest_refused_windows_total{{host=\"{}\",reason=\"{kind}\"}} {n}",
            escape(host)
        );
    }
    let _ = writeln!(out, "# HELP sci_ingest_refused_streams_total Streams refused before any window, per reason.\n# TYPE sci_ingest_refused_streams_total counter");
    for (kind, n) in &c.streams_refused {
        let _ = writeln!(
            out,
            "sci_ingest_refused_streams_total{{reason=\"{kind}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP sci_ingest_decode_errors_total Streams ended by an undecodable message.\n# TYPE sci_ingest_decode_errors_total counter\nsci_ingest_decode_errors_total {}", c.decode_errors);
    let _ = writeln!(out, "# HELP sci_host_last_seen_seconds End of the last window accepted from each host (unix seconds).\n# TYPE sci_host_last_seen_seconds gauge");
    for (host, s) in &c.last_seen {
        let _ = writeln!(
            out,
            "sci_host_last_seen_seconds{{host=\"{}\"}} {s}",
            escape(host)
        );
    }
    out
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match tokio::task::spawn_blocking(move || render_metrics(&state)).await {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let healthy = tokio::task::spawn_blocking(move || lock(&state.store).healthy())
        .await
        .unwrap_or(false);
    if healthy {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/api/v1/sci", get(sci))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}
