//! What a window adds to each rollup table: [`Deltas`] sums the additions of
//! one commit per table and row key (a window split across buckets in
//! proportion to time), and [`rollup_upsert`] turns a table's sums into the
//! [`Upsert`] that adds them to the rows already stored.
use std::collections::BTreeMap;

use agent_common::request_cpu::finer_buckets;
use agent_common::REQUEST_CPU_SUB_BUCKET_BITS;
use sci_proto::v1;

use super::backend::{Column, Upsert};
use super::layout::{split_by_time, RollupLayout, DAY_S};
use super::tables::{
    or_none, Table, FLEET, FLEET_COARSE, HOST, HOST_COARSE, HOST_SERVICE, PROFILE, PROFILE_COARSE,
    REQUEST_CPU, REQUEST_CPU_TOTAL, SCENARIO, SCENARIO_COARSE, SERVICE, SERVICE_COARSE,
    SERVICE_FINE, SUPPLY, SUPPLY_COARSE, SUPPLY_SERVICE, SUPPLY_SERVICE_COARSE, TABLES,
};

/// A rollup row's key column: the names borrow from the windows being
/// committed, so summing a window allocates nothing per row it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    I(i64),
    T(&'a str),
}

/// The widest key and sum lists of [`TABLES`]: a row is kept in arrays of
/// these lengths, the unused tail constant within a table (so it neither
/// reorders nor splits that table's rows).
const MAX_KEYS: usize = 6;
const MAX_SUMS: usize = 17;
const _: () = {
    let mut i = 0;
    while i < TABLES.len() {
        assert!(TABLES[i].keys.len() <= MAX_KEYS && TABLES[i].sums.len() <= MAX_SUMS);
        i += 1;
    }
};
type RowKey<'a> = [Key<'a>; MAX_KEYS];

fn row_key<'a>(columns: &[Key<'a>]) -> RowKey<'a> {
    let mut key = [Key::I(0); MAX_KEYS];
    key[..columns.len()].copy_from_slice(columns);
    key
}

/// Rollup additions of one commit, summed per row key before they are
/// written (in key order, so concurrent aggregators lock rows in one order).
#[derive(Default)]
pub(super) struct Deltas<'a> {
    rows: [BTreeMap<RowKey<'a>, [f64; MAX_SUMS]>; TABLES.len()],
}

impl<'a> Deltas<'a> {
    /// One [`Upsert`] per table with additions, in [`TABLES`] order.
    pub(super) fn upserts(&self) -> impl Iterator<Item = Upsert> + '_ {
        TABLES
            .iter()
            .zip(&self.rows)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(t, rows)| rollup_upsert(t, rows))
    }

    /// Upserts of the tables whose index is in `tables`, only their rows of
    /// buckets from `from_s` on (a rebuild from raw windows,
    /// [`super::restep`]).
    pub(super) fn upserts_from(&self, tables: &[usize], from_s: u64) -> Vec<Upsert> {
        let from = Key::I(i64::try_from(from_s).unwrap_or(i64::MAX));
        TABLES
            .iter()
            .zip(&self.rows)
            .filter(|(t, _)| tables.contains(&t.index))
            .filter_map(|(t, rows)| {
                let kept: BTreeMap<RowKey<'a>, [f64; MAX_SUMS]> = rows
                    .iter()
                    .filter(|(k, _)| k[0] >= from)
                    .map(|(k, v)| (*k, *v))
                    .collect();
                (!kept.is_empty()).then(|| rollup_upsert(t, &kept))
            })
            .collect()
    }

    fn add(&mut self, table: &Table, key: &[Key<'a>], values: &[f64]) {
        let row = self.rows[table.index]
            .entry(row_key(key))
            .or_insert([0.0; MAX_SUMS]);
        for (sum, v) in row.iter_mut().zip(values) {
            *sum += v;
        }
    }

    /// Adds one window; `supply` is its supply's key ([`super::supply::supply_key`]).
    pub(super) fn add_window(
        &mut self,
        w: &'a v1::WindowReport,
        supply: &'a str,
        layout: &RollupLayout,
    ) {
        let dc = or_none(&w.datacenter);
        let end_bucket =
            |step: u64| (w.end_unix_ns.saturating_sub(1) / 1_000_000_000) / step * step;
        let no_embodied = v1::EmbodiedFactors::default();
        let embodied = w.embodied.as_ref().unwrap_or(&no_embodied);
        let share_source = w.embodied.as_ref().map_or("", |e| e.share_source.as_str());
        let estimated_j = if w.estimated { w.host_energy_j } else { 0.0 };
        // Per scenario over the window: transactions and figures from the
        // scenario lines, idle energy from the processes.
        let mut scenarios: BTreeMap<&'a str, [f64; 6]> = BTreeMap::new();
        for s in &w.scenarios {
            let e = scenarios.entry(or_none(&s.scenario)).or_default();
            e[0] += s.transactions as f64;
            e[1] += s.cpu_ns as f64;
            e[2] += s.energy_j;
            e[4] += s.carbon_g;
            e[5] += s.embodied_g;
        }
        let mut services: BTreeMap<(&'a str, &'a str), [f64; 5]> = BTreeMap::new();
        let mut host_services: BTreeMap<&'a str, f64> = BTreeMap::new();
        for p in &w.processes {
            let scenario = if p.scenario.is_empty() {
                agent_common::UNASSIGNED
            } else {
                p.scenario.as_str()
            };
            if let Some(e) = scenarios.get_mut(scenario) {
                e[3] += p.idle_share_j;
            }
            let e = services
                .entry((or_none(&p.service), or_none(&p.scenario)))
                .or_default();
            e[0] += p.cpu_ns as f64;
            e[1] += p.energy_j;
            e[2] += p.idle_share_j;
            e[3] += p.carbon_g;
            e[4] += p.embodied_g;
            *host_services.entry(or_none(&p.service)).or_default() += p.cpu_ns as f64;
        }
        let transactions: f64 = w
            .scenarios
            .iter()
            .filter(|s| s.scenario != agent_common::UNASSIGNED)
            .map(|s| s.transactions as f64)
            .sum();
        for (fleet_t, scenario_t, step) in [
            (&FLEET, &SCENARIO, layout.step_s),
            (&FLEET_COARSE, &SCENARIO_COARSE, layout.host_step_s),
        ] {
            for (bucket, share, seconds) in split_by_time(w.start_unix_ns, w.end_unix_ns, step) {
                let ended = if bucket == end_bucket(step) { 1.0 } else { 0.0 };
                let bucket = Key::I(bucket as i64);
                self.add(
                    fleet_t,
                    &[
                        bucket,
                        Key::T(dc),
                        Key::T(&w.intensity_source),
                        Key::T(&w.energy_source),
                        Key::T(&w.energy_model),
                        Key::T(share_source),
                    ],
                    &[
                        ended,
                        seconds,
                        share * w.host_energy_j,
                        share * w.idle_energy_j,
                        share * estimated_j,
                        share * w.unattributed_energy_j,
                        share * w.host_carbon_g,
                        share * w.host_embodied_g,
                        share * w.busy_cpu_ns as f64,
                        share * w.idle_cpu_ns as f64,
                        share * w.steal_cpu_ns as f64,
                        share * w.unattributed_cpu_ns as f64,
                        seconds * w.carbon_intensity_g_per_kwh,
                        seconds * w.pue,
                        seconds * embodied.total_embodied_g,
                        seconds * embodied.lifespan_s,
                        seconds * embodied.resource_share,
                    ],
                );
                for (scenario, e) in &scenarios {
                    self.add(
                        scenario_t,
                        &[bucket, Key::T(dc), Key::T(scenario)],
                        &e.map(|v| share * v),
                    );
                }
            }
        }
        for (host_t, service_t, step) in [
            (&HOST, &SERVICE, layout.host_step_s),
            (&HOST_COARSE, &SERVICE_COARSE, DAY_S),
        ] {
            for (bucket, share, seconds) in split_by_time(w.start_unix_ns, w.end_unix_ns, step) {
                let bucket = Key::I(bucket as i64);
                self.add(
                    host_t,
                    &[bucket, Key::T(&w.host), Key::T(dc)],
                    &[
                        seconds,
                        share * w.host_energy_j,
                        share * w.idle_energy_j,
                        share * estimated_j,
                        share * w.host_carbon_g,
                        share * w.host_embodied_g,
                        share * w.busy_cpu_ns as f64,
                        share * w.idle_cpu_ns as f64,
                        share * transactions,
                    ],
                );
                for ((service, scenario), e) in &services {
                    self.add(
                        service_t,
                        &[bucket, Key::T(dc), Key::T(service), Key::T(scenario)],
                        &e.map(|v| share * v),
                    );
                }
            }
        }
        for (bucket, share, _) in split_by_time(w.start_unix_ns, w.end_unix_ns, layout.step_s) {
            let bucket = Key::I(bucket as i64);
            for ((service, scenario), e) in &services {
                self.add(
                    &SERVICE_FINE,
                    &[bucket, Key::T(dc), Key::T(service), Key::T(scenario)],
                    &e.map(|v| share * v),
                );
            }
        }
        let host_end_bucket = Key::I(end_bucket(layout.host_step_s) as i64);
        for h in &w.request_cpu {
            let (service, scenario) = (Key::T(or_none(&h.service)), Key::T(or_none(&h.scenario)));
            let mut requests = 0.0;
            for (bin, &n) in h.counts.iter().enumerate() {
                if n > 0 {
                    requests += n as f64;
                    // Older agents' coarser buckets (validated: 0 or the
                    // current bits) spread evenly over the finer ones they span.
                    let finer = finer_buckets(bin, h.sub_bucket_bits, REQUEST_CPU_SUB_BUCKET_BITS);
                    let share = n as f64 / finer.len() as f64;
                    for fine in finer {
                        self.add(
                            &REQUEST_CPU,
                            &[
                                host_end_bucket,
                                Key::T(dc),
                                service,
                                scenario,
                                Key::I(fine as i64),
                            ],
                            &[share],
                        );
                    }
                }
            }
            self.add(
                &REQUEST_CPU_TOTAL,
                &[host_end_bucket, Key::T(dc), service, scenario],
                &[
                    requests,
                    h.sum_cpu_ns as f64,
                    h.sum_cpu_ns as f64 * h.energy_j_per_cpu_ns,
                ],
            );
        }
        for (bucket, share, _) in split_by_time(w.start_unix_ns, w.end_unix_ns, layout.host_step_s)
        {
            let bucket = Key::I(bucket as i64);
            for (service, cpu_ns) in &host_services {
                self.add(
                    &HOST_SERVICE,
                    &[bucket, Key::T(dc), Key::T(&w.host), Key::T(service)],
                    &[share * cpu_ns],
                );
            }
        }
        self.add_supply(w, dc, supply, transactions, &services, layout);
        for (profile_t, step) in [(&PROFILE, layout.host_step_s), (&PROFILE_COARSE, DAY_S)] {
            let bucket = Key::I(end_bucket(step) as i64);
            for s in &w.profile {
                self.add(
                    profile_t,
                    &[
                        bucket,
                        Key::T(or_none(&s.service)),
                        Key::T(or_none(&s.scenario)),
                        Key::T(&s.stack),
                    ],
                    &[s.samples as f64, s.energy_j],
                );
            }
        }
    }
}

impl<'a> Deltas<'a> {
    /// The supply rollups of one window. A scenario's transactions go to
    /// the services that ran it in the window in proportion to their CPU
    /// time in it (all of them to the one service when only one ran it;
    /// equally when none used CPU; to `(none)` when no process had it).
    fn add_supply(
        &mut self,
        w: &'a v1::WindowReport,
        dc: &'a str,
        supply: &'a str,
        transactions: f64,
        services: &BTreeMap<(&'a str, &'a str), [f64; 5]>,
        layout: &RollupLayout,
    ) {
        let mut per_service: BTreeMap<(&'a str, &'a str), [f64; 6]> = services
            .iter()
            .map(|(k, e)| (*k, [e[0], e[1], e[2], e[3], e[4], 0.0]))
            .collect();
        for s in &w.scenarios {
            if s.transactions == 0 || s.scenario == agent_common::UNASSIGNED {
                continue;
            }
            let scenario = or_none(&s.scenario);
            let runners: Vec<((&'a str, &'a str), f64)> = services
                .iter()
                .filter(|((_, sc), _)| *sc == scenario)
                .map(|(k, e)| (*k, e[0]))
                .collect();
            let cpu: f64 = runners.iter().map(|(_, c)| c).sum();
            let txn = s.transactions as f64;
            if runners.is_empty() {
                per_service.entry(("(none)", scenario)).or_default()[5] += txn;
            }
            for (k, c) in &runners {
                let share = if cpu > 0.0 {
                    c / cpu
                } else {
                    1.0 / runners.len() as f64
                };
                per_service.entry(*k).or_default()[5] += txn * share;
            }
        }
        let capacity_cpu_ns = f64::from(w.cpus) * (w.end_unix_ns - w.start_unix_ns) as f64;
        for (supply_t, service_t, step) in [
            (&SUPPLY, &SUPPLY_SERVICE, layout.host_step_s),
            (&SUPPLY_COARSE, &SUPPLY_SERVICE_COARSE, DAY_S),
        ] {
            for (bucket, share, seconds) in split_by_time(w.start_unix_ns, w.end_unix_ns, step) {
                let bucket = Key::I(bucket as i64);
                self.add(
                    supply_t,
                    &[bucket, Key::T(dc), Key::T(supply)],
                    &[
                        seconds,
                        share * capacity_cpu_ns,
                        share * w.busy_cpu_ns as f64,
                        share * w.host_energy_j,
                        share * w.host_carbon_g,
                        share * w.host_embodied_g,
                        seconds * w.carbon_intensity_g_per_kwh,
                        seconds * w.pue,
                        share * transactions,
                    ],
                );
                for ((service, scenario), e) in &per_service {
                    self.add(
                        service_t,
                        &[
                            bucket,
                            Key::T(dc),
                            Key::T(supply),
                            Key::T(service),
                            Key::T(scenario),
                        ],
                        &e.map(|v| share * v),
                    );
                }
            }
        }
    }
}

/// A table's summed additions as an [`Upsert`] that adds them to the rows
/// already there.
fn rollup_upsert(t: &Table, rows: &BTreeMap<RowKey, [f64; MAX_SUMS]>) -> Upsert {
    let mut columns = Vec::with_capacity(t.keys.len() + t.sums.len());
    for (c, name) in t.keys.iter().enumerate() {
        let column = match rows.keys().next().map(|k| k[c]) {
            Some(Key::T(_)) => Column::Text(
                rows.keys()
                    .map(|k| match k[c] {
                        Key::T(s) => s.to_string(),
                        Key::I(i) => i.to_string(),
                    })
                    .collect(),
            ),
            _ => Column::Int(
                rows.keys()
                    .map(|k| match k[c] {
                        Key::I(i) => i,
                        Key::T(_) => 0,
                    })
                    .collect(),
            ),
        };
        columns.push((*name, column));
    }
    for (c, name) in t.sums.iter().enumerate() {
        columns.push((*name, Column::Real(rows.values().map(|s| s[c]).collect())));
    }
    Upsert {
        table: t.name,
        columns,
        conflict_keys: t.keys,
        on_conflict: t
            .sums
            .iter()
            .map(|c| format!("{c} = {}.{c} + excluded.{c}", t.name))
            .collect::<Vec<_>>()
            .join(", "),
    }
}
