//! HTTP interface: `GET /api/v1/sci?from=&to=&period=` (JSON evaluation),
//! `GET /api/v1/hotspots?from=&to=` (ranked hotspots with evidence),
//! `GET /api/v1/profile?service=&scenario=&format=svg|pprof` (energy flame
//! graph or pprof), `GET /dashboard` (HTML), `GET /report?format=md|html`,
//! `GET /metrics` (Prometheus text), `GET /healthz`;
//! optimisation reviews: `GET /api/v1/compare?baseline_from=&baseline_to=&
//! candidate_from=&candidate_to=[&scope=&datacenter=&service=&host=&period=&
//! profile_service=&profile_scenario=&target_utilisation=&seed=]&format=
//! json|md|html|svg`, `GET /dashboard/compare?...` (the HTML review) and
//! `GET /api/v1/distributions?from=&to=[&service=&datacenter=]` (per-request CPU and
//! energy p50/p90/p99 per service and scenario), `GET /api/v1/services?
//! from=&to=[&datacenter=]` (carbon, energy, CPU, hosts and transactions per
//! service and scenario). Times are unix seconds or RFC 3339, periods
//! seconds or a duration, and `datacenter=` narrows the evaluation to one
//! data centre; an unknown parameter is refused with its name
//! ([`crate::params`]).
//!
//! Every query reads rollups on the store's read connections, never the
//! ingest's. At most `max_concurrent_queries` expensive queries run at once
//! (more get 503 with `Retry-After`), each within `query_timeout` (503
//! past it); both are counted in `sci_http_queries_refused_total{reason}`.
//! /metrics reads counters kept at ingest and an evaluation of the last
//! 24 h refreshed in the background, never a query per scrape.
use agent_common::prometheus_text::{self, Family};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::AggregatorConfig;
use crate::error::AggregatorError;
use crate::hotspots::HotspotOptions;
use crate::ingest::{IngestCounters, SharedStore};
use crate::sci::{evaluate, Evaluation, EvaluationInput};
use crate::store::Range;

#[derive(Clone)]
pub struct HttpState {
    pub store: SharedStore,
    pub config: Arc<AggregatorConfig>,
    pub counters: Arc<Mutex<IngestCounters>>,
    /// Permits for expensive queries.
    pub queries: Arc<Semaphore>,
    /// The last 24 h, refreshed in the background for /metrics.
    pub recent: Arc<Mutex<Option<Evaluation>>>,
    /// The same per data centre.
    pub recent_by_datacenter: Arc<Mutex<BTreeMap<String, Evaluation>>>,
    /// The remote-write exporter's counters.
    pub remote_write: Arc<crate::export::remote_write::RemoteWriteStats>,
    pub otlp: Arc<crate::export::otlp::OtlpExportStats>,
}

impl HttpState {
    pub fn new(
        store: SharedStore,
        config: Arc<AggregatorConfig>,
        counters: Arc<Mutex<IngestCounters>>,
    ) -> Self {
        HttpState {
            queries: Arc::new(Semaphore::new(config.max_concurrent_queries)),
            recent: Arc::new(Mutex::new(None)),
            recent_by_datacenter: Arc::new(Mutex::new(BTreeMap::new())),
            remote_write: Default::default(),
            otlp: Default::default(),
            store,
            config,
            counters,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// Unix seconds or RFC 3339 (default: 24 h before `to`).
    #[serde(default, deserialize_with = "crate::params::time")]
    pub from: Option<u64>,
    /// Unix seconds or RFC 3339 (default: now).
    #[serde(default, deserialize_with = "crate::params::time")]
    pub to: Option<u64>,
    /// Period length, seconds or a duration (default: the configured period).
    #[serde(default, deserialize_with = "crate::params::period")]
    pub period: Option<u64>,
    /// One data centre's figures (default: the whole fleet).
    pub datacenter: Option<String>,
    /// Report format: md (default) or html.
    pub format: Option<String>,
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

type Failure = (StatusCode, String);

fn store_failure(e: AggregatorError) -> Failure {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// The range `from`..`to` of a query that has no period or format of its own.
fn range_from_to(state: &HttpState, from: Option<u64>, to: Option<u64>) -> Result<Range, Failure> {
    range_of(
        state,
        &RangeQuery {
            from,
            to,
            ..Default::default()
        },
    )
}

/// The range a query asks for, in whole rollup steps.
pub fn range_of(state: &HttpState, q: &RangeQuery) -> Result<Range, Failure> {
    let to = q.to.unwrap_or_else(|| now_s() + 1);
    let from = q.from.unwrap_or(to.saturating_sub(86_400));
    let period = q.period.unwrap_or(state.config.period.as_secs()).max(1);
    if from < to && (to - from) / period > 100_000 {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("more than 100000 periods of {period} s in the range: use a longer period"),
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
    Range::new(from, to, period, &state.store.layout()).map_err(|m| (StatusCode::BAD_REQUEST, m))
}

/// Evaluates a range from the store's rollups, of one data centre when the
/// query names one (404 when the store has never heard of it).
pub fn evaluate_range(state: &HttpState, q: &RangeQuery) -> Result<Evaluation, Failure> {
    let range = range_of(state, q)?;
    let mut input = EvaluationInput::read(state.store.as_ref(), &range).map_err(store_failure)?;
    if let Some(dc) = &q.datacenter {
        input
            .only_datacenter(dc)
            .map_err(|m| (StatusCode::NOT_FOUND, m))?;
    }
    Ok(evaluate(
        &input,
        &range,
        range.host_range(&state.store.layout()),
        &state.config.weights,
        state.config.min_coverage,
    ))
}

fn hotspot_options(state: &HttpState) -> HotspotOptions {
    HotspotOptions {
        min_samples: state.config.min_profile_samples,
        ..Default::default()
    }
}

/// The hotspots of the query's range (of one data centre with
/// `datacenter=`) and what the rules could not see there.
fn range_hotspots(
    state: &HttpState,
    q: &RangeQuery,
    e: &Evaluation,
) -> Result<(Vec<crate::hotspots::Hotspot>, Vec<String>), Failure> {
    crate::views::hotspots(
        state.store.as_ref(),
        &range_of(state, q)?,
        e,
        &hotspot_options(state),
        q.datacenter.as_deref(),
    )
    .map_err(store_failure)
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "5")],
        "too many queries running: retry later",
    )
        .into_response()
}

/// Runs an expensive query: a permit (else 503 + Retry-After), a blocking
/// thread, the query timeout (503 past it; the store cancels the query).
pub async fn bounded<F>(state: &HttpState, work: F) -> Response
where
    F: FnOnce() -> Result<Response, Failure> + Send + 'static,
{
    let refused = |reason: &str| {
        *lock(&state.counters)
            .http_queries_refused
            .entry(reason.to_string())
            .or_default() += 1;
    };
    let Ok(permit) = Arc::clone(&state.queries).try_acquire_owned() else {
        refused("busy");
        return busy();
    };
    let timeout = state.config.query_timeout + Duration::from_secs(1);
    let task = tokio::task::spawn_blocking(move || {
        let answer = work();
        drop(permit);
        answer
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(response))) => response,
        Ok(Ok(Err((code, message)))) => (code, message).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(_) => {
            refused("timeout");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "30")],
                format!("query timed out after {:?}", state.config.query_timeout),
            )
                .into_response()
        }
    }
}

async fn dashboard(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let range = range_of(&s, &q)?;
        let e = evaluate_range(&s, &q)?;
        let data = crate::views::dashboard(
            s.store.as_ref(),
            &range,
            e,
            &hotspot_options(&s),
            q.datacenter.as_deref(),
        )
        .map_err(store_failure)?;
        Ok((
            [("content-type", "text/html; charset=utf-8")],
            crate::dashboard::render_dashboard(&data),
        )
            .into_response())
    })
    .await
}

async fn report(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let e = evaluate_range(&s, &q)?;
        match q.format.as_deref().unwrap_or("md") {
            "md" => {
                let (found, notes) = range_hotspots(&s, &q, &e)?;
                let mut md = crate::report::markdown(&e);
                md.push_str(&crate::report::hotspots_markdown(&found, &notes));
                Ok(([("content-type", "text/markdown; charset=utf-8")], md).into_response())
            }
            "html" => Ok((
                [("content-type", "text/html; charset=utf-8")],
                crate::dashboard::render_evaluation_report_html(
                    &e,
                    &crate::report::unix_to_text(now_s()),
                ),
            )
                .into_response()),
            other => Err((
                StatusCode::BAD_REQUEST,
                format!("format {other:?}: use md or html (JSON is /api/v1/sci)"),
            )),
        }
    })
    .await
}

/// Hotspots of the range, of one data centre with `datacenter=`; what the
/// rules could not see there is in the `sci-cf-notes` header.
async fn hotspots(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let e = evaluate_range(&s, &q)?;
        let (found, notes) = range_hotspots(&s, &q, &e)?;
        let mut response = Json(found).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&notes.join("; ")) {
            if !notes.is_empty() {
                response.headers_mut().insert("sci-cf-notes", v);
            }
        }
        Ok(response)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileQuery {
    #[serde(default, deserialize_with = "crate::params::time")]
    pub from: Option<u64>,
    #[serde(default, deserialize_with = "crate::params::time")]
    pub to: Option<u64>,
    pub service: Option<String>,
    pub scenario: Option<String>,
    /// `svg` (flame graph, default) or `pprof` (gzip-compressed profile.proto).
    pub format: Option<String>,
}

async fn profile(State(state): State<HttpState>, Query(q): Query<ProfileQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let range = range_from_to(&s, q.from, q.to)?;
        let merged = crate::views::profiles(
            s.store.as_ref(),
            &range,
            q.service.as_deref(),
            q.scenario.as_deref(),
        )
        .map_err(store_failure)?;
        let Some(profile) = merged.first() else {
            return Err((
                StatusCode::NOT_FOUND,
                "no profile for that service and scenario in the range".into(),
            ));
        };
        if let Some(reason) = crate::views::withheld_reason(profile, s.config.min_profile_samples) {
            return Err((StatusCode::UNPROCESSABLE_ENTITY, reason));
        }
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
    .await
}

async fn sci(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        evaluate_range(&s, &q).map(|e| Json(e).into_response())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareQuery {
    /// Default: as long as the candidate range, just before it.
    #[serde(default, deserialize_with = "crate::params::time")]
    pub baseline_from: Option<u64>,
    #[serde(default, deserialize_with = "crate::params::time")]
    pub baseline_to: Option<u64>,
    /// Default: the last 24 h.
    #[serde(default, deserialize_with = "crate::params::time")]
    pub candidate_from: Option<u64>,
    #[serde(default, deserialize_with = "crate::params::time")]
    pub candidate_to: Option<u64>,
    #[serde(default, deserialize_with = "crate::params::period")]
    pub period: Option<u64>,
    pub scope: Option<String>,
    pub datacenter: Option<String>,
    pub service: Option<String>,
    pub host: Option<String>,
    pub profile_service: Option<String>,
    pub profile_scenario: Option<String>,
    pub target_utilisation: Option<f64>,
    pub seed: Option<u64>,
    /// json (default), md, html or svg (the differential flame graph).
    pub format: Option<String>,
}

fn review_request(
    state: &HttpState,
    q: &CompareQuery,
) -> Result<crate::review::ReviewRequest, Failure> {
    use crate::review::{compare, consolidation, stats};
    let range = |from, to| {
        range_of(
            state,
            &RangeQuery {
                from: Some(from),
                to: Some(to),
                period: q.period,
                ..Default::default()
            },
        )
    };
    let scope: compare::Scope = q
        .scope
        .as_deref()
        .unwrap_or("datacenter")
        .parse()
        .map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    let target = q.target_utilisation.unwrap_or(0.6);
    if !(target > 0.0 && target <= 1.0) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("target_utilisation {target}: give a share in (0, 1]"),
        ));
    }
    let mut bootstrap = stats::Bootstrap::default();
    if let Some(seed) = q.seed {
        bootstrap.seed = seed;
    }
    let candidate_to = q.candidate_to.unwrap_or_else(|| now_s() + 1);
    let candidate_from = q
        .candidate_from
        .unwrap_or(candidate_to.saturating_sub(86_400));
    let baseline_to = q.baseline_to.unwrap_or(candidate_from);
    let baseline_from = q
        .baseline_from
        .unwrap_or(baseline_to.saturating_sub(candidate_to.saturating_sub(candidate_from)));
    Ok(crate::review::ReviewRequest {
        baseline: range(baseline_from, baseline_to)?,
        candidate: range(candidate_from, candidate_to)?,
        compare: compare::CompareOptions {
            scope,
            filters: compare::Filters {
                datacenter: q.datacenter.clone(),
                service: q.service.clone(),
                host: q.host.clone(),
            },
            bootstrap,
            weights: state.config.weights.clone(),
            min_coverage: state.config.min_coverage,
        },
        profile_service: q.profile_service.clone(),
        profile_scenario: q.profile_scenario.clone(),
        min_profile_samples: state.config.min_profile_samples,
        consolidation: consolidation::ConsolidationOptions {
            target_utilisation: target,
            ..Default::default()
        },
    })
}

fn review_failure(e: AggregatorError) -> Failure {
    match e {
        AggregatorError::Invalid(m) => (StatusCode::BAD_REQUEST, m),
        other => store_failure(other),
    }
}

fn render_review(q: &CompareQuery, r: &crate::review::Review) -> Result<Response, Failure> {
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(r).into_response()),
        "md" => Ok((
            [("content-type", "text/markdown; charset=utf-8")],
            crate::review::report::markdown(r),
        )
            .into_response()),
        "html" => Ok((
            [("content-type", "text/html; charset=utf-8")],
            crate::review::report::html(r, &crate::report::unix_to_text(now_s())),
        )
            .into_response()),
        "svg" => match &r.diff_profile {
            Some(p) => Ok((
                [("content-type", "image/svg+xml")],
                p.flamegraph_svg()
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            )
                .into_response()),
            None => Err((
                StatusCode::NOT_FOUND,
                "no profiled service for the differential flame graph: give profile_service".into(),
            )),
        },
        other => Err((
            StatusCode::BAD_REQUEST,
            format!("format {other:?}: use json, md, html or svg"),
        )),
    }
}

async fn compare(State(state): State<HttpState>, Query(q): Query<CompareQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let request = review_request(&s, &q)?;
        let r = crate::review::review(s.store.as_ref(), &request).map_err(review_failure)?;
        render_review(&q, &r)
    })
    .await
}

async fn compare_page(
    State(state): State<HttpState>,
    Query(mut q): Query<CompareQuery>,
) -> Response {
    q.format = Some("html".into());
    compare(State(state), Query(q)).await
}

async fn services(State(state): State<HttpState>, Query(q): Query<RangeQuery>) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        if q.format.is_some() {
            return Err((
                StatusCode::BAD_REQUEST,
                "format: /api/v1/services answers JSON only".into(),
            ));
        }
        let range = range_of(&s, &q)?;
        let view =
            crate::services::services_view(s.store.as_ref(), &range, q.datacenter.as_deref())
                .map_err(store_failure)?;
        Ok(Json(view).into_response())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributionQuery {
    #[serde(default, deserialize_with = "crate::params::time")]
    pub from: Option<u64>,
    #[serde(default, deserialize_with = "crate::params::time")]
    pub to: Option<u64>,
    pub service: Option<String>,
    /// One data centre's requests (404 naming the known ones when no host
    /// ever reported from it).
    pub datacenter: Option<String>,
}

async fn distributions(
    State(state): State<HttpState>,
    Query(q): Query<DistributionQuery>,
) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        let range = range_from_to(&s, q.from, q.to)?;
        if let Some(dc) = &q.datacenter {
            let spans = s.store.host_spans().map_err(store_failure)?;
            crate::sci::known_datacenter(&spans, dc).map_err(|m| (StatusCode::NOT_FOUND, m))?;
        }
        let rows = s
            .store
            .request_cpu(&range, q.datacenter.as_deref())
            .map_err(store_failure)?;
        let found: Vec<crate::review::distribution::Distribution> = rows
            .iter()
            .filter(|r| q.service.as_deref().is_none_or(|x| x == r.service))
            .map(crate::review::distribution::Distribution::of)
            .collect();
        Ok(Json(found).into_response())
    })
    .await
}

/// Re-evaluates the last 24 h for /metrics every `every` (a rollup query
/// of the size of the answer, off the scrape path).
pub async fn refresh_recent(state: HttpState, every: Duration) {
    loop {
        let s = state.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            let fleet = evaluate_range(&s, &RangeQuery::default())?;
            let datacenters: BTreeSet<String> = fleet
                .disclosure
                .iter()
                .map(|d| d.datacenter.clone())
                .collect();
            let mut by_dc = BTreeMap::new();
            for dc in datacenters {
                let q = RangeQuery {
                    from: Some(fleet.from_unix_s),
                    to: Some(fleet.to_unix_s),
                    datacenter: Some(dc.clone()),
                    ..Default::default()
                };
                by_dc.insert(dc, evaluate_range(&s, &q)?);
            }
            Ok::<_, Failure>((fleet, by_dc))
        })
        .await;
        match evaluated {
            Ok(Ok((e, by_dc))) => {
                *lock(&state.recent) = Some(e);
                *lock(&state.recent_by_datacenter) = by_dc;
            }
            Ok(Err((_, message))) => tracing::warn!("refreshing the 24 h evaluation: {message}"),
            Err(e) => tracing::warn!("refreshing the 24 h evaluation: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Prometheus text: fleet SCI over the last 24 h, per scenario, ingest counters.
pub fn render_metrics(state: &HttpState) -> String {
    let mut out: Vec<Family> = Vec::new();
    out.push(
        Family::gauge("sci_store_healthy", "1 when the store answers.")
            .single(f64::from(u8::from(state.store.healthy()))),
    );
    let recent = lock(&state.recent).clone();
    if let Some(e) = recent {
        let mut sci = Family::gauge(
            "sci_fleet_sci_g_per_unit",
            "Fleet SCI_CF over the last 24 h, gCO2e per business unit (mean of periods, and pooled).",
        );
        if let Some(v) = e.sci_cf_mean {
            sci.push(&[("method", "mean")], v);
        }
        if let Some(v) = e.sci_cf_pooled {
            sci.push(&[("method", "pooled")], v);
        }
        out.push(sci);
        let mut per_txn = Family::gauge(
            "sci_fleet_scenario_g_per_transaction",
            "Carbon per completed transaction over the last 24 h.",
        );
        let mut measured = Family::gauge(
            "sci_fleet_scenario_measured_weight",
            "Carbon per transaction relative to query's (the measured alpha).",
        );
        for s in &e.scenarios {
            if let Some(v) = s.g_per_transaction {
                per_txn.push(&[("scenario", &s.scenario)], v);
            }
            if let Some(v) = s.measured_weight {
                measured.push(&[("scenario", &s.scenario)], v);
            }
        }
        out.push(per_txn);
        out.push(measured);
    }
    let by_dc = lock(&state.recent_by_datacenter).clone();
    if !by_dc.is_empty() {
        let mut sci = Family::gauge(
            "sci_datacenter_sci_g_per_unit",
            "SCI_CF of each data centre over the last 24 h, gCO2e per business unit (mean of periods, and pooled).",
        );
        let mut coverage = Family::gauge(
            "sci_datacenter_periods_in_mean",
            "Periods of the last 24 h in each data centre's SCI_CF (defined and covered).",
        );
        for (dc, e) in &by_dc {
            if let Some(v) = e.sci_cf_mean {
                sci.push(&[("datacenter", dc), ("method", "mean")], v);
            }
            if let Some(v) = e.sci_cf_pooled {
                sci.push(&[("datacenter", dc), ("method", "pooled")], v);
            }
            coverage.push(&[("datacenter", dc)], e.periods_in_mean as f64);
        }
        out.push(sci);
        out.push(coverage);
    }
    let c = lock(&state.counters);
    out.push(
        Family::counter(
            "sci_ingest_windows_total",
            "Windows stored (new), and replays ignored (duplicate).",
        )
        .with(&[("result", "accepted")], c.windows_accepted as f64)
        .with(&[("result", "duplicate")], c.windows_duplicate as f64)
        .with(&[("result", "conflict")], c.windows_conflict as f64),
    );
    out.push(
        Family::counter(
            "sci_ingest_carbon_grams_total",
            "Operational and embodied carbon of the windows stored since start.",
        )
        .with(&[("kind", "operational")], c.operational_g)
        .with(&[("kind", "embodied")], c.embodied_g),
    );
    out.push(
        Family::counter(
            "sci_ingest_energy_joules_total",
            "Host energy of the windows stored since start.",
        )
        .single(c.energy_j),
    );
    let mut transactions = Family::counter(
        "sci_ingest_transactions_total",
        "Completed transactions of the windows stored since start, per scenario.",
    );
    for (scenario, n) in &c.transactions {
        transactions.push(&[("scenario", scenario)], *n as f64);
    }
    out.push(transactions);
    out.push(
        Family::counter(
            "sci_ingest_batches_total",
            "Batches committed and acknowledged.",
        )
        .single(c.batches as f64),
    );
    let mut refused = Family::counter(
        "sci_ingest_refused_windows_total",
        "Windows refused, per host and reason.",
    );
    for ((host, kind), n) in &c.refused {
        refused.push(&[("host", host), ("reason", &kind.to_string())], *n as f64);
    }
    out.push(refused);
    let mut streams = Family::counter(
        "sci_ingest_refused_streams_total",
        "Streams refused before any window, per reason.",
    );
    for (kind, n) in &c.streams_refused {
        streams.push(&[("reason", &kind.to_string())], *n as f64);
    }
    out.push(streams);
    out.push(
        Family::counter(
            "sci_ingest_decode_errors_total",
            "Streams ended by an undecodable message.",
        )
        .single(c.decode_errors as f64),
    );
    c.limit_families(&mut out);
    plan_metric_families(&c.plan_requests_refused, c.plans_stored, &mut out);
    let mut keda = Family::counter(
        "sci_keda_requests_refused_total",
        "KEDA external scaler calls refused, per reason (unauthenticated, bad_credentials, revoked, permission_denied, busy, timeout).",
    );
    for (reason, n) in &c.keda_refused {
        keda.push(&[("reason", reason)], *n as f64);
    }
    out.push(keda);
    let mut retention = Family::counter(
        "sci_retention_deleted_total",
        "Rows (or raw partitions) the hourly retention removed since start, per kind.",
    );
    for (kind, n) in &c.retention_deleted {
        retention.push(&[("kind", kind)], *n as f64);
    }
    out.push(retention);
    state.remote_write.families(&mut out);
    state.otlp.families(&mut out);
    let mut last_seen = Family::gauge(
        "sci_host_last_seen_seconds",
        "End of the last window accepted from each host (unix seconds).",
    );
    for (host, s) in &c.last_seen {
        last_seen.push(&[("host", host)], *s as f64);
    }
    out.push(last_seen);
    prometheus_text::render(out)
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match tokio::task::spawn_blocking(move || render_metrics(&state)).await {
        Ok(text) => ([("content-type", prometheus_text::CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let healthy = tokio::task::spawn_blocking(move || state.store.healthy())
        .await
        .unwrap_or(false);
    if healthy {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
    }
}

/// The API's routes; the server merges the plan routes
/// (`crate::plan::http::routes`) beside them.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/sci", get(sci))
        .route("/api/v1/hotspots", get(hotspots))
        .route("/api/v1/profile", get(profile))
        .route("/api/v1/compare", get(compare))
        .route("/api/v1/distributions", get(distributions))
        .route("/api/v1/services", get(services))
        .route("/dashboard/compare", get(compare_page))
        .route("/dashboard", get(dashboard))
        .route("/report", get(report))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
}

/// The API's routes with their state (without the plan routes).
pub fn router(state: HttpState) -> Router {
    routes().with_state(state)
}

/// `sci_plan_requests_refused_total` and `sci_plans_stored_total`.
fn plan_metric_families(refused: &BTreeMap<String, u64>, stored: u64, out: &mut Vec<Family>) {
    let mut f = Family::counter(
        "sci_plan_requests_refused_total",
        "Plan and supply requests refused for a wrong parameter, per endpoint.",
    );
    for (endpoint, n) in refused {
        f.push(&[("endpoint", endpoint)], *n as f64);
    }
    out.push(f);
    out.push(
        Family::counter("sci_plans_stored_total", "Plans stored since start.")
            .single(stored as f64),
    );
}
