//! The rollup tables: each one's name, key columns and summed columns, as
//! the migrations create them (`aggregator/migrations/`). What a window adds
//! to each is in [`super::deltas`]; the queries that read them are in
//! [`super::query`]. A new rollup table: a migration, a [`Table`] here (next
//! index, added to [`TABLES`]), its additions in `deltas`, and its queries.

/// A rollup table: key columns (the first is always `bucket_s`), then
/// summed columns.
pub(super) struct Table {
    /// Its position in [`TABLES`].
    pub index: usize,
    pub name: &'static str,
    pub keys: &'static [&'static str],
    pub sums: &'static [&'static str],
    /// The bucket length its `bucket_s` is cut in.
    pub step: Step,
}

/// Which of the layout's bucket lengths a table uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// `rollup_step`.
    Base,
    /// `host_rollup_step`.
    Host,
    /// A day, whatever the layout.
    Day,
}

pub(super) const FLEET: Table = Table {
    index: 0,
    name: "fleet_rollup",
    keys: &[
        "bucket_s",
        "datacenter",
        "intensity_source",
        "energy_source",
        "energy_model",
        "share_source",
    ],
    sums: &[
        "windows_ended",
        "host_s",
        "energy_j",
        "idle_energy_j",
        "estimated_energy_j",
        "unattributed_energy_j",
        "operational_g",
        "embodied_g",
        "busy_cpu_ns",
        "idle_cpu_ns",
        "steal_cpu_ns",
        "unattributed_cpu_ns",
        "intensity_x_s",
        "pue_x_s",
        "te_x_s",
        "el_x_s",
        "share_x_s",
    ],
    step: Step::Base,
};
pub(super) const SCENARIO: Table = Table {
    index: 1,
    name: "scenario_rollup",
    keys: &["bucket_s", "datacenter", "scenario"],
    sums: &[
        "transactions",
        "cpu_ns",
        "energy_j",
        "idle_energy_j",
        "carbon_g",
        "embodied_g",
    ],
    step: Step::Base,
};
pub(super) const HOST: Table = Table {
    index: 2,
    name: "host_rollup",
    keys: &["bucket_s", "host", "datacenter"],
    sums: &[
        "host_s",
        "energy_j",
        "idle_energy_j",
        "estimated_energy_j",
        "carbon_g",
        "embodied_g",
        "busy_cpu_ns",
        "idle_cpu_ns",
        "transactions",
    ],
    step: Step::Host,
};
pub(super) const SERVICE: Table = Table {
    index: 3,
    name: "service_rollup",
    keys: &["bucket_s", "datacenter", "service", "scenario"],
    sums: &[
        "cpu_ns",
        "energy_j",
        "idle_energy_j",
        "carbon_g",
        "embodied_g",
    ],
    step: Step::Host,
};
pub(super) const PROFILE: Table = Table {
    index: 4,
    name: "profile_rollup",
    keys: &["bucket_s", "service", "scenario", "stack"],
    sums: &["samples", "energy_j"],
    step: Step::Host,
};
/// Coarser copies: fleet and scenario sums per host step, host, service and
/// profile sums per day. A long query reads whole coarse buckets from these
/// and only its edges from the finer tables (see [`super::query`]).
pub(super) const FLEET_COARSE: Table = Table {
    index: 5,
    name: "fleet_rollup_h",
    step: Step::Host,
    ..FLEET
};
pub(super) const SCENARIO_COARSE: Table = Table {
    index: 6,
    name: "scenario_rollup_h",
    step: Step::Host,
    ..SCENARIO
};
pub(super) const HOST_COARSE: Table = Table {
    index: 7,
    name: "host_rollup_d",
    step: Step::Day,
    ..HOST
};
pub(super) const SERVICE_COARSE: Table = Table {
    index: 8,
    name: "service_rollup_d",
    step: Step::Day,
    ..SERVICE
};
pub(super) const PROFILE_COARSE: Table = Table {
    index: 9,
    name: "profile_rollup_d",
    step: Step::Day,
    ..PROFILE
};
/// Optimisation reviews (#15): per host step, request CPU histograms (bin
/// counts and totals) and each service's CPU on each host.
pub(super) const REQUEST_CPU: Table = Table {
    index: 10,
    name: "request_cpu_rollup",
    keys: &["bucket_s", "datacenter", "service", "scenario", "bin"],
    sums: &["requests"],
    step: Step::Host,
};
pub(super) const REQUEST_CPU_TOTAL: Table = Table {
    index: 11,
    name: "request_cpu_total_rollup",
    keys: &["bucket_s", "datacenter", "service", "scenario"],
    sums: &["requests", "cpu_ns", "energy_j"],
    step: Step::Host,
};
pub(super) const HOST_SERVICE: Table = Table {
    index: 12,
    name: "host_service_rollup",
    keys: &["bucket_s", "datacenter", "host", "service"],
    sums: &["cpu_ns"],
    step: Step::Host,
};

/// Resource supplies (#27): per host step, each supply's hosts and each
/// service's share of them (with the transactions it served). A supply's
/// attributes are in `supply_attrs` (not a rollup: one row per supply and
/// attribute), which grouping by an attribute joins.
pub(super) const SUPPLY: Table = Table {
    index: 13,
    name: "supply_rollup",
    keys: &["bucket_s", "datacenter", "supply"],
    sums: &[
        "host_s",
        "capacity_cpu_ns",
        "busy_cpu_ns",
        "energy_j",
        "operational_g",
        "embodied_g",
        "intensity_x_s",
        "pue_x_s",
        "transactions",
    ],
    step: Step::Host,
};
pub(super) const SUPPLY_SERVICE: Table = Table {
    index: 14,
    name: "supply_service_rollup",
    keys: &["bucket_s", "datacenter", "supply", "service", "scenario"],
    sums: &[
        "cpu_ns",
        "energy_j",
        "idle_energy_j",
        "carbon_g",
        "embodied_g",
        "transactions",
    ],
    step: Step::Host,
};

/// Service sums per rollup step (issue 24: service reviews shorter than a
/// host step), kept as long as raw windows ([`FINE_TABLES`]).
pub(super) const SERVICE_FINE: Table = Table {
    index: 15,
    name: "service_rollup_m",
    step: Step::Base,
    ..SERVICE
};

/// Tables kept for the raw windows' retention, not the rollups'.
pub(super) const FINE_TABLES: [&Table; 1] = [&SERVICE_FINE];

/// `meta` key: the first second `service_rollup_m` holds (absent: all of
/// the store's data). Set by the migration on a store that had service
/// rollups before it, moved forward by retention.
pub(super) const SERVICE_FINE_FROM_KEY: &str = "service_rollup_m_from_s";

/// The daily copies of the supply rollups (#27): a long supply query reads
/// whole days from them and only its edges by host step.
pub(super) const SUPPLY_COARSE: Table = Table {
    index: 16,
    name: "supply_rollup_d",
    step: Step::Day,
    ..SUPPLY
};
pub(super) const SUPPLY_SERVICE_COARSE: Table = Table {
    index: 17,
    name: "supply_service_rollup_d",
    step: Step::Day,
    ..SUPPLY_SERVICE
};

/// Every rollup table, in the order commits write them and retention
/// deletes from them.
pub(super) const TABLES: [&Table; 18] = [
    &FLEET,
    &SCENARIO,
    &HOST,
    &SERVICE,
    &PROFILE,
    &FLEET_COARSE,
    &SCENARIO_COARSE,
    &HOST_COARSE,
    &SERVICE_COARSE,
    &PROFILE_COARSE,
    &REQUEST_CPU,
    &REQUEST_CPU_TOTAL,
    &HOST_SERVICE,
    &SUPPLY,
    &SUPPLY_SERVICE,
    &SERVICE_FINE,
    &SUPPLY_COARSE,
    &SUPPLY_SERVICE_COARSE,
];
const _: () = {
    let mut i = 0;
    while i < TABLES.len() {
        assert!(
            TABLES[i].index == i,
            "a Table's index is its position in TABLES"
        );
        i += 1;
    }
};

/// `(none)` for an empty name (as the rollups key it).
pub(super) fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}
