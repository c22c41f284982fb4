//! What the plan endpoints answer with when a request is wrong, and the
//! clock they read: shared by the plan, Carbon Aware and KEDA handlers.
use axum::http::StatusCode;

use crate::http::HttpState;

pub(super) type Failure = (StatusCode, String);

/// Counts a refused request of `endpoint` and passes the failure on.
pub(super) fn refused(state: &HttpState, endpoint: &str, failure: Failure) -> Failure {
    if failure.0 == StatusCode::BAD_REQUEST {
        *state
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plan_requests_refused
            .entry(endpoint.to_string())
            .or_default() += 1;
    }
    failure
}

pub(super) fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn bad(message: String) -> Failure {
    (StatusCode::BAD_REQUEST, message)
}
