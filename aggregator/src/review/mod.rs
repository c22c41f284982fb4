//! Optimisation reviews (#15): release B against release A, or this month
//! against last. [`review`] gathers the comparison per transaction with
//! intervals ([`compare`]), the differential energy flame graph
//! ([`diff_profile`]), the per-request CPU and energy distributions
//! ([`distribution`]) and the consolidation plan of the candidate range
//! ([`consolidation`]); [`report`] prints them (Markdown, HTML) with the
//! disclosed factors. Everything reads rollups only.
pub mod compare;
pub mod consolidation;
pub mod diff_flame;
pub mod diff_profile;
pub mod distribution;
pub mod report;
pub mod stats;

use serde::Serialize;

use crate::error::AggregatorError;
use crate::store::{Range, Store};

/// What a review asks.
#[derive(Debug, Clone)]
pub struct ReviewRequest {
    pub baseline: Range,
    pub candidate: Range,
    pub compare: compare::CompareOptions,
    /// Service of the differential flame graph (default: the one whose
    /// stacks of the scenario hold most energy in the candidate range).
    pub profile_service: Option<String>,
    /// Scenario of the differential flame graph (default: credit).
    pub profile_scenario: Option<String>,
    pub min_profile_samples: u64,
    pub consolidation: consolidation::ConsolidationOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct Review {
    pub comparison: compare::Comparison,
    pub distributions: Vec<distribution::DistributionComparison>,
    pub diff_profile: Option<diff_profile::DiffProfile>,
    /// The consolidation plan over the candidate range.
    pub consolidation: consolidation::ConsolidationPlan,
}

/// Runs a review.
pub fn review(store: &dyn Store, request: &ReviewRequest) -> Result<Review, AggregatorError> {
    let comparison = compare::compare_ranges(
        store,
        &request.baseline,
        &request.candidate,
        &request.compare,
    )?;
    let service_filter = request.compare.filters.service.as_deref();
    let datacenter = request.compare.filters.datacenter.as_deref();
    let distributions = distribution::compare_distributions(
        &store.request_cpu(&request.baseline, datacenter)?,
        &store.request_cpu(&request.candidate, datacenter)?,
        service_filter,
    );
    let scenario = request
        .profile_scenario
        .clone()
        .unwrap_or_else(|| "credit".to_string());
    let service = match request
        .profile_service
        .clone()
        .or_else(|| service_filter.map(str::to_string))
    {
        Some(s) => Some(s),
        None => {
            let mut by_service: std::collections::BTreeMap<String, f64> = Default::default();
            for s in store.stacks(&request.candidate, None, Some(&scenario))? {
                *by_service.entry(s.service).or_default() += s.energy_j;
            }
            by_service
                .into_iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(s, _)| s)
        }
    };
    let diff_profile = match service {
        Some(service) => Some(diff_profile::diff_ranges(
            store,
            &request.baseline,
            &request.candidate,
            &service,
            &scenario,
            request.min_profile_samples,
        )?),
        None => None,
    };
    let consolidation = consolidation::plan_store_in(
        store,
        &request.candidate,
        &request.consolidation,
        datacenter,
    )?;
    Ok(Review {
        comparison,
        distributions,
        diff_profile,
        consolidation,
    })
}
