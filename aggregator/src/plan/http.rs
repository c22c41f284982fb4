//! HTTP of the plans (#27):
//! - `GET /api/v1/supplies?from=&to=&group_by=` the fleet grouped by one
//!   supply attribute (`supply` by default);
//! - `GET /api/v1/supplies/select?from=&to=[&service=&period=]` the
//!   ranking of supplies per service and scenario (7.4);
//! - `GET|POST /api/v1/plans/migration?from=&to=&service=&from_datacenter=
//!   &from_supply=&to_datacenter=&to_supply=[&scenario=&share=
//!   &target_utilisation=]` a migration plan (POST also stores it);
//! - `GET|POST /api/v1/plans/shift?[job=&at=]` time-shifting plans of the
//!   deferrable jobs (7.2; POST also stores them);
//! - `GET /api/v1/plans/location?scenario=[&from=&to=]` marginal carbon
//!   of one more transaction per data centre and hour, and a traffic split
//!   that respects measured room (7.2);
//! - `GET /api/v1/plans/consolidation?[from=&to=&group_by=
//!   &target_utilisation=&zombie_hours=]` each pool's week: peak, valley,
//!   hosts to release per hour with the saving, and zombie hosts
//!   ([`super::pools`], 7.2);
//! - `GET /api/v1/plans` the stored plans; `POST /api/v1/plans/{id}/
//!   carried-out?at=` when a plan was carried out; `GET /api/v1/plans/{id}/
//!   check?to=` the realised saving against the predicted ([`super::check`]);
//! - `GET /dashboard/plan?[from=&to=&service=]` all of it on one page
//!   ([`super::page`]);
//! - the Carbon Aware SDK-compatible routes ([`super::carbon_aware`]).
//!
//! A parameter that is wrong is refused with 400 naming it, and counted in
//! `sci_plan_requests_refused_total{endpoint}`.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::migration::{plan_migration, MigrationRequest};
use super::supplies::{groups, select, SupplyId};
use crate::http::{bounded, range_of, HttpState, RangeQuery};
use crate::review::stats::Bootstrap;

use super::respond::{bad, now_s, refused, Failure};

/// The review's bootstrap settings, with the caller's seed if given.
fn bootstrap(seed: Option<u64>) -> Bootstrap {
    Bootstrap {
        seed: seed.unwrap_or(Bootstrap::default().seed),
        ..Default::default()
    }
}

/// Runs `work` as a bounded query ([`bounded`]); a wrong request is
/// counted under `endpoint` ([`refused`]).
async fn answer<F>(state: HttpState, endpoint: &'static str, work: F) -> Response
where
    F: FnOnce(&HttpState) -> Result<Response, Failure> + Send + 'static,
{
    let s = state.clone();
    bounded(&state, move || {
        work(&s).map_err(|f| refused(&s, endpoint, f))
    })
    .await
}

/// Stores `plan` and counts it.
fn save_plan<T: serde::Serialize>(
    state: &HttpState,
    kind: &str,
    service: &str,
    now: u64,
    plan: &T,
) -> Result<String, Failure> {
    let stored =
        super::store_plan(state.store.as_ref(), kind, service, now, plan).map_err(store_failure)?;
    state
        .counters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .plans_stored += 1;
    Ok(stored.id)
}

fn store_failure(e: crate::error::AggregatorError) -> Failure {
    match e {
        crate::error::AggregatorError::Invalid(m) => bad(m),
        other => (StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppliesQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub group_by: Option<String>,
}

fn hourly_range(
    state: &HttpState,
    from: Option<u64>,
    to: Option<u64>,
    period: Option<u64>,
) -> Result<crate::store::Range, Failure> {
    let step = state.store.layout().host_step_s;
    let to = to.map(|t| t.div_ceil(step) * step);
    let from = from.map(|f| f / step * step);
    range_of(
        state,
        &RangeQuery {
            from,
            to,
            period: Some(period.unwrap_or(step)),
            datacenter: None,
            format: None,
        },
    )
}

async fn supplies(State(state): State<HttpState>, Query(q): Query<SuppliesQuery>) -> Response {
    answer(state, "supplies", move |s| {
        let range = hourly_range(s, q.from, q.to, None)?;
        let by = q.group_by.as_deref().unwrap_or("supply");
        let groups = groups(s.store.as_ref(), &range, by).map_err(store_failure)?;
        Ok(Json(serde_json::json!({
            "from_unix_s": range.from_s,
            "to_unix_s": range.to_s,
            "group_by": by,
            "groups": groups,
        }))
        .into_response())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub period: Option<u64>,
    pub service: Option<String>,
    pub seed: Option<u64>,
}

async fn select_supplies(State(state): State<HttpState>, Query(q): Query<SelectQuery>) -> Response {
    answer(state, "supplies/select", move |s| {
        let range = hourly_range(s, q.from, q.to, q.period)?;
        let bootstrap = bootstrap(q.seed);
        let selection = select(s.store.as_ref(), &range, q.service.as_deref(), &bootstrap)
            .map_err(store_failure)?;
        Ok(Json(selection).into_response())
    })
    .await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub service: Option<String>,
    pub scenario: Option<String>,
    pub from_datacenter: Option<String>,
    pub from_supply: Option<String>,
    pub to_datacenter: Option<String>,
    pub to_supply: Option<String>,
    pub share: Option<f64>,
    pub target_utilisation: Option<f64>,
    pub seed: Option<u64>,
}

fn migration(state: &HttpState, q: &MigrationQuery, save: bool) -> Result<Response, Failure> {
    let need = |v: &Option<String>, name: &str| {
        v.clone().ok_or_else(|| bad(format!("{name} is required")))
    };
    let range = hourly_range(state, q.from, q.to, None)?;
    let request = MigrationRequest {
        service: need(&q.service, "service")?,
        scenario: q.scenario.clone(),
        from: SupplyId {
            datacenter: need(&q.from_datacenter, "from_datacenter")?,
            supply: need(&q.from_supply, "from_supply")?,
        },
        to: SupplyId {
            datacenter: need(&q.to_datacenter, "to_datacenter")?,
            supply: need(&q.to_supply, "to_supply")?,
        },
        share: q.share.unwrap_or(1.0),
        target_utilisation: q.target_utilisation.unwrap_or(0.6),
        bootstrap: bootstrap(q.seed),
    };
    let plan = plan_migration(state.store.as_ref(), &range, &request).map_err(store_failure)?;
    if !save {
        return Ok(Json(plan).into_response());
    }
    let id = save_plan(state, "migration", &request.service, now_s(), &plan)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": id, "plan": plan })),
    )
        .into_response())
}

async fn migration_get(
    State(state): State<HttpState>,
    Query(q): Query<MigrationQuery>,
) -> Response {
    answer(state, "plans/migration", move |s| migration(s, &q, false)).await
}

async fn migration_post(
    State(state): State<HttpState>,
    Query(q): Query<MigrationQuery>,
) -> Response {
    answer(state, "plans/migration", move |s| migration(s, &q, true)).await
}

async fn plans(State(state): State<HttpState>) -> Response {
    answer(state, "plans", move |s| {
        let plans = s.store.plans().map_err(store_failure)?;
        let plans: Vec<serde_json::Value> = plans
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id,
                    "kind": p.kind,
                    "service": p.service,
                    "created_unix_s": p.created_unix_s,
                    "carried_out_unix_s": p.carried_out_unix_s,
                    "plan": serde_json::from_str::<serde_json::Value>(&p.body).unwrap_or_default(),
                })
            })
            .collect();
        Ok(Json(serde_json::json!({ "plans": plans })).into_response())
    })
    .await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftQuery {
    /// One job (default: every `[[scheduling.deferrable]]` job).
    pub job: Option<String>,
    /// Plan the windows in force at this unix time (default: now).
    pub at: Option<u64>,
}

fn shift(state: &HttpState, q: &ShiftQuery, save: bool) -> Result<Response, Failure> {
    let jobs: Vec<_> = state
        .config
        .scheduling
        .deferrable
        .iter()
        .filter(|j| q.job.as_deref().is_none_or(|n| n == j.name))
        .collect();
    if let (Some(name), true) = (&q.job, jobs.is_empty()) {
        return Err(bad(format!(
            "job {} is not a [[scheduling.deferrable]] job",
            crate::validate::clip(name)
        )));
    }
    let now = now_s();
    let at = q.at.unwrap_or(now);
    let mut plans = Vec::new();
    for job in jobs {
        let plan =
            super::shifting::plan_shift(state.store.as_ref(), &state.config.scheduling, job, at)
                .map_err(store_failure)?;
        let id = if save {
            Some(save_plan(state, "shift", &job.service, now, &plan)?)
        } else {
            None
        };
        plans.push(serde_json::json!({ "id": id, "plan": plan }));
    }
    let status = if save {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({ "at_unix_s": at, "plans": plans })),
    )
        .into_response())
}

async fn shift_get(State(state): State<HttpState>, Query(q): Query<ShiftQuery>) -> Response {
    answer(state, "plans/shift", move |s| shift(s, &q, false)).await
}

async fn shift_post(State(state): State<HttpState>, Query(q): Query<ShiftQuery>) -> Response {
    answer(state, "plans/shift", move |s| shift(s, &q, true)).await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationQuery {
    pub scenario: Option<String>,
    /// Unix seconds (default: this hour).
    pub from: Option<u64>,
    /// Unix seconds (default: 24 h after `from`).
    pub to: Option<u64>,
}

async fn location(State(state): State<HttpState>, Query(q): Query<LocationQuery>) -> Response {
    answer(state, "plans/location", move |s| {
        let scenario = q
            .scenario
            .clone()
            .ok_or_else(|| bad("scenario is required".into()))?;
        let now = now_s();
        let from = q.from.unwrap_or(now / 3600 * 3600);
        let to = q.to.unwrap_or(from + 86_400);
        if to <= from || to - from > 31 * 86_400 {
            return Err(bad("to must be after from, at most 31 days".into()));
        }
        let plan = super::location::plan_location(
            s.store.as_ref(),
            &s.config.scheduling,
            &scenario,
            from,
            to,
        )
        .map_err(store_failure)?;
        Ok(Json(plan).into_response())
    })
    .await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsQuery {
    /// Unix seconds (default: 7 days before `to`).
    pub from: Option<u64>,
    /// Unix seconds (default: now).
    pub to: Option<u64>,
    /// The supply attribute that names a pool (default `label.pool`).
    pub group_by: Option<String>,
    pub target_utilisation: Option<f64>,
    pub zombie_hours: Option<u32>,
}

async fn pools(State(state): State<HttpState>, Query(q): Query<PoolsQuery>) -> Response {
    answer(state, "plans/consolidation", move |s| {
        let to = q.to.unwrap_or_else(now_s);
        let from = q.from.unwrap_or(to.saturating_sub(7 * 86_400));
        if to <= from || to - from > 400 * 86_400 {
            return Err(bad("to must be after from, at most 400 days".into()));
        }
        let defaults = super::pools::PoolOptions::default();
        let options = super::pools::PoolOptions {
            group_by: q.group_by.clone().unwrap_or(defaults.group_by),
            target_utilisation: q.target_utilisation.unwrap_or(defaults.target_utilisation),
            zombie_hours: q.zombie_hours.unwrap_or(defaults.zombie_hours),
            ..defaults
        };
        let plan = super::pools::plan_pools(s.store.as_ref(), from, to, &options)
            .map_err(store_failure)?;
        Ok(Json(plan).into_response())
    })
    .await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarriedOutQuery {
    /// Unix seconds (default: now).
    pub at: Option<u64>,
}

fn find_plan(state: &HttpState, id: &str) -> Result<crate::store::StoredPlan, Failure> {
    state
        .store
        .plans()
        .map_err(store_failure)?
        .into_iter()
        .find(|p| p.id == id)
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no plan {}", crate::validate::clip(id)),
            )
        })
}

async fn carried_out(
    State(state): State<HttpState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<CarriedOutQuery>,
) -> Response {
    answer(state, "plans/carried-out", move |s| {
        let mut plan = find_plan(s, &id)?;
        let now = now_s();
        let at = q.at.unwrap_or(now);
        if at > now + 60 {
            return Err(bad(format!("at {at} is in the future")));
        }
        plan.carried_out_unix_s = Some(at);
        s.store.save_plan(&plan).map_err(store_failure)?;
        Ok(Json(serde_json::json!({ "id": plan.id, "carried_out_unix_s": at })).into_response())
    })
    .await
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    /// End of the measured "after" range, unix s (default: now).
    pub to: Option<u64>,
    pub seed: Option<u64>,
}

async fn check(
    State(state): State<HttpState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<CheckQuery>,
) -> Response {
    answer(state, "plans/check", move |s| {
        let plan = find_plan(s, &id)?;
        let now = now_s();
        let bootstrap = bootstrap(q.seed);
        if plan.kind == "shift" {
            let checked = super::shift_check::check_shift(
                s.store.as_ref(),
                &plan,
                q.to.unwrap_or(now),
                &bootstrap,
            )
            .map_err(store_failure)?;
            return Ok(Json(checked).into_response());
        }
        let checked =
            super::check::check_plan(s.store.as_ref(), &plan, q.to.unwrap_or(now), &bootstrap)
                .map_err(store_failure)?;
        Ok(Json(checked).into_response())
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPageQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub period: Option<u64>,
    pub service: Option<String>,
    /// html (default) or md.
    pub format: Option<String>,
}

async fn plan_page(State(state): State<HttpState>, Query(q): Query<PlanPageQuery>) -> Response {
    answer(state, "dashboard/plan", move |s| {
        let now = now_s();
        let format_ok = matches!(q.format.as_deref(), None | Some("html" | "md"));
        if !format_ok {
            return Err(bad(format!(
                "format {}: use html or md",
                crate::validate::clip(q.format.as_deref().unwrap_or_default())
            )));
        }
        let to = q.to.unwrap_or(now);
        let from = q.from.unwrap_or(to.saturating_sub(7 * 86_400));
        let range = hourly_range(s, Some(from), Some(to), q.period)?;
        let bootstrap = Bootstrap::default();
        let selection = select(s.store.as_ref(), &range, q.service.as_deref(), &bootstrap)
            .map_err(store_failure)?;
        let shifts = s
            .config
            .scheduling
            .deferrable
            .iter()
            .map(|job| {
                super::shifting::plan_shift(s.store.as_ref(), &s.config.scheduling, job, now)
                    .map_err(|e| format!("{}: {e}", job.name))
            })
            .collect();
        let stored = s
            .store
            .plans()
            .map_err(store_failure)?
            .into_iter()
            .map(|p| {
                use super::page::StoredCheck;
                let window_end = serde_json::from_str::<serde_json::Value>(&p.body)
                    .ok()
                    .and_then(|b| b.get("window_end_unix_s").and_then(|v| v.as_u64()));
                let check = match p.kind.as_str() {
                    "migration" if p.carried_out_unix_s.is_some() => Some(
                        super::check::check_plan(s.store.as_ref(), &p, now, &bootstrap)
                            .map(StoredCheck::Migration),
                    ),
                    "shift" if window_end.is_some_and(|e| e <= now) => Some(
                        super::shift_check::check_shift(s.store.as_ref(), &p, now, &bootstrap)
                            .map(StoredCheck::Shift),
                    ),
                    _ => None,
                }
                .map(|c| c.map_err(|e| e.to_string()));
                (p, check)
            })
            .collect();
        let pools = super::pools::plan_pools(
            s.store.as_ref(),
            from,
            to,
            &super::pools::PoolOptions::default(),
        )
        .map_err(|e| format!("consolidation per pool: {e}"));
        let page = super::page::PlanPage {
            selection,
            shifts,
            pools,
            stored,
        };
        Ok(if q.format.as_deref() == Some("md") {
            (
                [("content-type", "text/markdown; charset=utf-8")],
                super::page::markdown(&page),
            )
                .into_response()
        } else {
            (
                [("content-type", "text/html; charset=utf-8")],
                super::page::render(&page),
            )
                .into_response()
        })
    })
    .await
}

/// The plan routes, merged into [`crate::http::router`].
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/supplies", get(supplies))
        .route("/api/v1/supplies/select", get(select_supplies))
        .route(
            "/api/v1/plans/migration",
            get(migration_get).post(migration_post),
        )
        .route("/api/v1/plans/shift", get(shift_get).post(shift_post))
        .route("/api/v1/plans/location", get(location))
        .route("/api/v1/plans/consolidation", get(pools))
        .route("/api/v1/plans", get(plans))
        .route("/dashboard/plan", get(plan_page))
        .route(
            "/api/v1/plans/{id}/carried-out",
            axum::routing::post(carried_out),
        )
        .route("/api/v1/plans/{id}/check", get(check))
        .merge(super::carbon_aware::routes())
}
