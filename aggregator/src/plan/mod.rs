//! Plans for the standard's capabilities 7.2 (global scheduling of
//! computing resources) and 7.4 (selection of and migration between
//! computing resource supplies), from what sci-cf measured per business
//! transaction: [`supplies`] ranks the supplies a service ran on,
//! [`migration`] plans a move between two with its predicted saving and a
//! capacity check; [`shifting`] places deferrable jobs in low-carbon
//! hours (7.2), [`location`] gives the marginal carbon of a transaction per
//! site and hour with a traffic split; [`keda`] and [`carbon_aware`] are the
//! signals schedulers consume. Every plan is stored with its prediction
//! ([`store_plan`]) and [`check`] measures it afterwards. [`http`] serves them.
pub mod carbon_aware;
pub mod check;
pub mod http;
pub mod intensity;
pub mod keda;
pub mod location;
pub mod migration;
pub mod page;
pub mod pools;
mod respond;
pub mod shift_check;
pub mod shifting;
pub mod supplies;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::AggregatorError;
use crate::store::{Store, StoredPlan};

/// Stores `plan` (its JSON) under a new id made from its content and time.
pub fn store_plan<T: Serialize>(
    store: &dyn Store,
    kind: &str,
    service: &str,
    created_unix_s: u64,
    plan: &T,
) -> Result<StoredPlan, AggregatorError> {
    let body = serde_json::to_string(plan)
        .map_err(|e| AggregatorError::Invalid(format!("plan to JSON: {e}")))?;
    let digest = Sha256::digest(format!("{kind}\n{service}\n{created_unix_s}\n{body}"));
    let id: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let stored = StoredPlan {
        id: format!("{kind}-{id}"),
        created_unix_s,
        kind: kind.to_string(),
        service: service.to_string(),
        carried_out_unix_s: None,
        body,
    };
    store.save_plan(&stored)?;
    Ok(stored)
}
