//! Carbon Aware SDK-compatible HTTP endpoints: the Green Software
//! Foundation SDK's Web API paths, parameters and JSON shapes, so tools
//! written for the SDK work against sci-cf. Locations are data centres.
//!
//! - `GET /emissions/bylocations/best?location=a&location=b[&time=&toTime=]`:
//!   an array with the best `EmissionsData` (`location`, `time`, `duration`
//!   as `hh:mm:ss`, `rating` in g/kWh) of the locations and hours in
//!   [time, toTime) (default: this hour);
//! - `GET /emissions/forecasts/current?location=a[&dataStartAt=&dataEndAt=
//!   &windowSize=]`: an array of `EmissionsForecast` (`generatedAt`,
//!   `requestedAt`, `location`, `dataStartAt`, `dataEndAt`, `windowSize`
//!   minutes, `optimalDataPoints`, `forecastData` of `{location, timestamp,
//!   duration (minutes), value}`), hourly, the next 24 h by default.
//!
//! sci-cf's addition: with `scenario=credit|drawdown|repayment|query`, each
//! point also carries `gPerTransaction`, the measured marginal carbon of
//! one more transaction there ([`super::location`]), and "best" and
//! "optimal" are by it rather than by the grid alone. Ratings come from
//! the data centre's intensity file or its measured same-hour intensity.
//! Times are RFC 3339; a bad parameter is a 400 naming it.
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::location::plan_location;
use super::respond::{bad, now_s, refused};
use crate::http::{bounded, HttpState};

type Failure = (StatusCode, String);

/// Query pairs, percent-decoded (repeated keys kept, `location=a,b` split).
fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 3 <= bytes.len() {
                if let Ok(b) =
                    u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16)
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn time_param(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, Failure> {
    match pairs.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => agent_common::time_text::parse_rfc3339(v)
            .ok()
            .and_then(|t| u64::try_from(t.as_second()).ok())
            .map(Some)
            .ok_or_else(|| {
                bad(format!(
                    "{name} {} is not an RFC 3339 time",
                    crate::validate::clip(v)
                ))
            }),
    }
}

fn locations(pairs: &[(String, String)]) -> Result<Vec<String>, Failure> {
    let out: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "location")
        .flat_map(|(_, v)| v.split(',').map(str::trim).map(str::to_string))
        .filter(|v| !v.is_empty())
        .collect();
    if out.is_empty() {
        return Err(bad(
            "location is required (a data centre; repeat it for several)".into(),
        ));
    }
    Ok(out)
}

fn rfc3339(unix_s: u64) -> String {
    agent_common::time_text::format_unix_s(unix_s as i64)
}

/// Hourly (hour, rating, g per transaction) of one location over [from, to).
fn series(
    state: &HttpState,
    location: &str,
    scenario: Option<&str>,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, f64, Option<f64>)>, Failure> {
    let config = &state.config.scheduling;
    let step = state.store.layout().host_step_s;
    let history_to = from / step * step;
    let history = crate::store::Range {
        from_s: history_to.saturating_sub(config.history.as_secs()) / step * step,
        to_s: history_to.max(step),
        period_s: step,
    };
    let (intensity, _) = super::intensity::for_hours(
        state.store.as_ref(),
        &config.intensity,
        location,
        &history,
        from,
        to,
    )
    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let per_txn = match scenario {
        Some(s) => {
            let plan =
                plan_location(state.store.as_ref(), config, s, from, to).map_err(|e| match e {
                    crate::error::AggregatorError::Invalid(m) => bad(m),
                    other => (StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
                })?;
            plan.sites
                .into_iter()
                .find(|site| site.datacenter == location)
                .map(|site| site.hours)
        }
        None => None,
    };
    Ok((from / 3600 * 3600..to)
        .step_by(3600)
        .filter_map(|h| {
            let rating = intensity.get(&h).copied()?;
            let g = per_txn
                .as_ref()
                .and_then(|hours| hours.iter().find(|x| x.hour_unix_s == h))
                .and_then(|x| x.g_per_transaction);
            Some((h, rating, g))
        })
        .collect())
}

fn best(state: &HttpState, raw: Option<&str>) -> Result<Response, Failure> {
    let q = pairs(raw);
    let locations = locations(&q)?;
    let scenario = q
        .iter()
        .find(|(k, _)| k == "scenario")
        .map(|(_, v)| v.as_str());
    let from = time_param(&q, "time")?.unwrap_or_else(|| now_s() / 3600 * 3600);
    let to = time_param(&q, "toTime")?
        .unwrap_or(from + 3600)
        .max(from + 1);
    if to - from > 31 * 86_400 {
        return Err(bad("time to toTime spans more than 31 days".into()));
    }
    let mut candidates = Vec::new();
    for location in &locations {
        for (h, rating, g) in series(state, location, scenario, from, to)? {
            if scenario.is_some() && g.is_none() {
                continue;
            }
            candidates.push((location.clone(), h, rating, g));
        }
    }
    let key = |c: &(String, u64, f64, Option<f64>)| c.3.unwrap_or(c.2);
    let best = candidates
        .iter()
        .min_by(|a, b| key(a).total_cmp(&key(b)).then(a.1.cmp(&b.1)));
    let Some((location, h, rating, g)) = best else {
        return Err((
            StatusCode::NOT_FOUND,
            "no intensity (or, with scenario, no measured per-transaction figure) for these locations and times".into(),
        ));
    };
    let mut point = json!({
        "location": location,
        "time": rfc3339(*h),
        "rating": rating,
        "duration": "01:00:00",
    });
    if let (Some(s), Some(g)) = (scenario, g) {
        point["scenario"] = json!(s);
        point["gPerTransaction"] = json!(g);
    }
    Ok(Json(json!([point])).into_response())
}

fn forecast(state: &HttpState, raw: Option<&str>) -> Result<Response, Failure> {
    let q = pairs(raw);
    let locations = locations(&q)?;
    let scenario = q
        .iter()
        .find(|(k, _)| k == "scenario")
        .map(|(_, v)| v.as_str());
    let now = now_s();
    let from = time_param(&q, "dataStartAt")?.unwrap_or(now / 3600 * 3600);
    let to = time_param(&q, "dataEndAt")?
        .unwrap_or(from + 86_400)
        .max(from + 1);
    if to - from > 31 * 86_400 {
        return Err(bad(
            "dataStartAt to dataEndAt spans more than 31 days".into()
        ));
    }
    let window_min: u64 = match q.iter().find(|(k, _)| k == "windowSize") {
        None => 60,
        Some((_, v)) => v
            .parse()
            .ok()
            .filter(|m| *m > 0 && *m <= 31 * 24 * 60)
            .ok_or_else(|| {
                bad(format!(
                    "windowSize {}: whole minutes, 1 to 44640",
                    crate::validate::clip(v)
                ))
            })?,
    };
    let window_h = window_min.div_ceil(60) as usize;
    let mut out = Vec::new();
    for location in &locations {
        let points = series(state, location, scenario, from, to)?;
        let forecast_data: Vec<Value> = points
            .iter()
            .map(|(h, rating, g)| {
                let mut p = json!({
                    "location": location,
                    "timestamp": rfc3339(*h),
                    "duration": 60,
                    "value": rating,
                });
                if let Some(g) = g {
                    p["gPerTransaction"] = json!(g);
                }
                p
            })
            .collect();
        // The window of consecutive hours with the lowest mean.
        let score = |p: &(u64, f64, Option<f64>)| match scenario {
            Some(_) => p.2.unwrap_or(f64::INFINITY),
            None => p.1,
        };
        let optimal = points
            .windows(window_h.max(1))
            .filter(|w| w.windows(2).all(|x| x[1].0 == x[0].0 + 3600))
            .min_by(|a, b| {
                let mean = |w: &&[(u64, f64, Option<f64>)]| w.iter().map(score).sum::<f64>();
                mean(a).total_cmp(&mean(b))
            })
            .and_then(|w| w.first())
            .map(|(h, _, _)| {
                let i = points.iter().position(|p| p.0 == *h).unwrap_or(0);
                let w = &points[i..(i + window_h).min(points.len())];
                let mean_rating = w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64;
                let mut p = json!({
                    "location": location,
                    "timestamp": rfc3339(*h),
                    "duration": window_min,
                    "value": mean_rating,
                });
                if scenario.is_some() {
                    let g: Option<f64> = w.iter().map(|p| p.2).sum();
                    if let Some(g) = g {
                        p["gPerTransaction"] = json!(g / w.len() as f64);
                    }
                }
                p
            });
        out.push(json!({
            "generatedAt": rfc3339(now),
            "requestedAt": rfc3339(now),
            "location": location,
            "dataStartAt": rfc3339(from),
            "dataEndAt": rfc3339(to),
            "windowSize": window_min,
            "optimalDataPoints": optimal.into_iter().collect::<Vec<_>>(),
            "forecastData": forecast_data,
        }));
    }
    Ok(Json(Value::Array(out)).into_response())
}

/// Answers with `answer`, counting a 400 under `endpoint`.
async fn serve(
    state: HttpState,
    raw: Option<String>,
    endpoint: &'static str,
    answer: fn(&HttpState, Option<&str>) -> Result<Response, Failure>,
) -> Response {
    let s = state.clone();
    bounded(&state, move || {
        answer(&s, raw.as_deref()).map_err(|f| refused(&s, endpoint, f))
    })
    .await
}

async fn best_get(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    serve(state, raw, "emissions/bylocations/best", best).await
}

async fn forecast_get(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    serve(state, raw, "emissions/forecasts/current", forecast).await
}

/// The Carbon Aware SDK-compatible routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/emissions/bylocations/best", get(best_get))
        .route("/emissions/forecasts/current", get(forecast_get))
}
