//! The schema: versioned migrations (the SQL files under
//! `aggregator/migrations/`, one set per database) and the rollup layout
//! recorded in `meta` when a database is created.
use super::backend::{Tx, Value};
use super::layout::RollupLayout;
use crate::error::AggregatorError;

/// Checks (or records, on a new database) the rollup layout.
pub(super) fn check_layout(tx: &mut dyn Tx, layout: &RollupLayout) -> Result<(), AggregatorError> {
    let stored = tx.query("SELECT key, value FROM meta", &[])?;
    let get = |k: &str| {
        stored
            .iter()
            .find(|r| r[0].text() == k)
            .and_then(|r| r[1].text().parse::<u64>().ok())
    };
    match (get("rollup_step_s"), get("host_rollup_step_s")) {
        (Some(step), Some(host_step)) => {
            if step != layout.step_s || host_step != layout.host_step_s {
                return Err(AggregatorError::Invalid(format!(
                    "the database's rollups use rollup_step {step} s and host_rollup_step {host_step} s; \
                     the configuration asks for {} s and {} s (set them back, or change the store's with `sci-aggregator change-rollup-steps`)",
                    layout.step_s, layout.host_step_s
                )));
            }
        }
        _ => {
            for (k, v) in [
                ("rollup_step_s", layout.step_s),
                ("host_rollup_step_s", layout.host_step_s),
            ] {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[Value::Text(k.into()), Value::Text(v.to_string())],
                )?;
            }
        }
    }
    Ok(())
}

/// Versioned migrations: (version, SQL).
pub(super) fn migrations(postgres: bool) -> [(i64, &'static str); 8] {
    if postgres {
        [
            (
                1,
                include_str!("../../migrations/postgres/0001_rollups.sql"),
            ),
            (
                2,
                include_str!("../../migrations/postgres/0002_coarse_rollups.sql"),
            ),
            (
                4,
                include_str!("../../migrations/postgres/0004_review_rollups.sql"),
            ),
            (
                5,
                include_str!("../../migrations/postgres/0005_request_cpu_log_linear.sql"),
            ),
            (
                27,
                include_str!("../../migrations/postgres/0027_supplies.sql"),
            ),
            (
                28,
                include_str!("../../migrations/postgres/0028_service_fine_rollup.sql"),
            ),
            (
                29,
                include_str!("../../migrations/postgres/0029_supply_retention.sql"),
            ),
            (
                30,
                include_str!("../../migrations/postgres/0030_supply_daily.sql"),
            ),
        ]
    } else {
        [
            (1, include_str!("../../migrations/sqlite/0001_rollups.sql")),
            (
                2,
                include_str!("../../migrations/sqlite/0002_coarse_rollups.sql"),
            ),
            (
                4,
                include_str!("../../migrations/sqlite/0004_review_rollups.sql"),
            ),
            (
                5,
                include_str!("../../migrations/sqlite/0005_request_cpu_log_linear.sql"),
            ),
            (
                27,
                include_str!("../../migrations/sqlite/0027_supplies.sql"),
            ),
            (
                28,
                include_str!("../../migrations/sqlite/0028_service_fine_rollup.sql"),
            ),
            (
                29,
                include_str!("../../migrations/sqlite/0029_supply_retention.sql"),
            ),
            (
                30,
                include_str!("../../migrations/sqlite/0030_supply_daily.sql"),
            ),
        ]
    }
}
