//! HTTP interface: `GET /api/v1/sci?from=&to=&period=` (JSON evaluation),
//! `GET /api/v1/hotspots?from=&to=` (ranked hotspots with evidence),
//! `GET /api/v1/profile?service=&scenario=&format=svg|pprof` (energy flame
//! graph or pprof), `GET /dashboard` (HTML), `GET /metrics` (Prometheus
//! text), `GET /healthz`.
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
    evaluate_with_rows(state, q).map(|(e, _)| e)
}

/// The evaluation of a range and the rows it came from.
pub fn evaluate_with_rows(
    state: &HttpState,
    q: &RangeQuery,
) -> Result<(Evaluation, crate::store::StoredRows), (StatusCode, String)> {
    let to = q.to.unwrap_or_else(|| now_s() + 1);
    let from = q.from.unwrap_or(to.saturating_sub(86_400));
    let period = q.period.unwrap_or(state.config.period.as_secs()).max(1);
    if from >= to {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("from ({from}) must be before to ({to})"),
        ));
    }
    // Seconds become nanoseconds below: refuse what would not fit before multiplying.
    let max_s = i64::MAX as u64 / 1_000_000_000;
    if to > max_s {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("from and to must be unix seconds below {max_s}"),
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
    Ok((
        evaluate(&rows, from, to, period, &state.config.weights),
        rows,
    ))
}

async fn dashboard(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let page = tokio::task::spawn_blocking(move || {
        evaluate_with_rows(&state, &q).map(|(e, rows)| {
            crate::dashboard::render_dashboard(&crate::views::dashboard(&rows, &e))
        })
    })
    .await;
    match page {
        Ok(Ok(html)) => ([("content-type", "text/html; charset=utf-8")], html).into_response(),
        Ok(Err((code, message))) => (code, message).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn hotspots(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let found = tokio::task::spawn_blocking(move || {
        evaluate_with_rows(&state, &q).map(|(e, rows)| crate::views::hotspots(&rows, &e))
    })
    .await;
    match found {
        Ok(Ok(hotspots)) => Json(hotspots).into_response(),
        Ok(Err((code, message))) => (code, message).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ProfileQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub service: Option<String>,
    pub scenario: Option<String>,
    /// `svg` (flame graph, default) or `pprof` (gzip-compressed profile.proto).
    pub format: Option<String>,
}

async fn profile(State(state): State<HttpState>, Query(q): Query<ProfileQuery>) -> Response {
    let answer = tokio::task::spawn_blocking(move || -> Result<Response, (StatusCode, String)> {
        let range = RangeQuery {
            from: q.from,
            to: q.to,
            period: None,
        };
        let (e, rows) = evaluate_with_rows(&state, &range)?;
        let merged = crate::views::profiles(&rows, e.from_unix_s, e.to_unix_s);
        let wanted = |p: &&crate::profiles::MergedProfile| {
            q.service
                .as_ref()
                .is_none_or(|s| p.service.as_ref() == Some(s))
                && q.scenario
                    .as_ref()
                    .is_none_or(|s| p.scenario.as_ref() == Some(s))
        };
        let Some(profile) = merged.iter().find(wanted) else {
            return Err((
                StatusCode::NOT_FOUND,
                "no profile for that service and scenario in the range".into(),
            ));
        };
        let internal = |e: crate::profiles::ProfileExportError| {
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        };
        match q.format.as_deref().unwrap_or("svg") {
            "svg" => Ok((
                [("content-type", "image/svg+xml")],
                profile.flamegraph_svg().map_err(internal)?,
            )
                .into_response()),
            "pprof" => Ok((
                [("content-type", "application/octet-stream")],
                profile.to_pprof_gzip().map_err(internal)?,
            )
                .into_response()),
            other => Err((
                StatusCode::BAD_REQUEST,
                format!("format {other:?}: use svg or pprof"),
            )),
        }
    })
    .await;
    match answer {
        Ok(Ok(response)) => response,
        Ok(Err((code, message))) => (code, message).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
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
    c.render_limits(&mut out);
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
        .route("/api/v1/hotspots", get(hotspots))
        .route("/api/v1/profile", get(profile))
        .route("/dashboard", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}
