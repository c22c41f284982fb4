//! Storage of accepted windows and their rollups, behind [`Store`]:
//! SQLite (WAL, one file: the embedded default) or PostgreSQL (production,
//! several aggregators on one server). Both run the same SQL, written once
//! here; [`sqlite`] and [`postgres`] only supply connections.
//!
//! At ingest, in the transaction that stores a raw window, the window's
//! figures are added to additive rollups:
//! - `fleet_rollup` and `scenario_rollup` per base step (`rollup_step`,
//!   default 1 min: every period length is a multiple of it), per data
//!   centre (and, for the fleet, per disclosure: intensity source, energy
//!   source and model, embodied share source) and per scenario;
//! - `host_rollup`, `service_rollup` and `profile_rollup` per host step
//!   (`host_rollup_step`, default 1 h);
//! - `service_rollup_m` per base step, kept as long as raw windows: service
//!   figures for periods shorter than a host step (issue 24);
//!
//! A window is split across buckets in proportion to time (a 10:59:30-
//! 11:00:30 window puts half its carbon, energy and transactions in each
//! hour) and adds its host-seconds to each bucket, so each period reports
//! its coverage. Profile stacks go whole to the host-step bucket holding the
//! window's end. Every query reads rollups with `GROUP BY` in SQL: its cost
//! and memory follow the answer's size, not the stored windows.
//!
//! Dedupe is exact: `window_keys` holds (host, agent_instance, seq) as a
//! unique key with the window's content digest (SHA-256 of its prost
//! encoding, the `weights` map in key order); a replay with the same digest
//! is a [`CommitOutcome::Duplicate`], another content a
//! [`CommitOutcome::Conflict`] (nothing is overwritten). The raw window is
//! kept (that encoding) in `windows_raw` for the raw retention.
//!
//! Where things are:
//! - [`layout`]: bucket lengths, ranges, retention (time as rollups see it);
//! - [`rows`]: what queries answer with;
//! - `tables`: the sixteen rollup tables' names, columns and steps;
//! - `deltas`: what a window adds to each rollup table;
//! - `commit`: the commit (dedupe, raw windows, rollups, host spans);
//! - `encoding`: the stored encoding and its digest;
//! - `query`: every query ([`Store`] for any [`Backend`]);
//! - `schema`: migrations and the layout recorded in the database;
//! - [`restep`]: changing the rollup steps of a store in place;
//! - `backend`: what a database supplies ([`Backend`], [`Tx`], [`Value`]);
//!   [`sqlite`], [`postgres`] and `group` (PostgreSQL's group commit).
mod backend;
mod commit;
mod deltas;
mod encoding;
mod group;
pub mod layout;
pub mod migrate;
pub mod postgres;
mod query;
pub mod restep;
pub mod rows;
mod schema;
pub mod sqlite;
pub mod supply;
mod tables;

use std::collections::BTreeMap;

use sci_proto::v1;

pub use backend::{Backend, Column, Tx, Upsert, Value};
pub use commit::commit_windows;
pub use encoding::{canonical_encoding, content_digest};
pub use layout::{split_by_time, Range, Retention, RollupLayout, DAY_NS, DAY_S};
pub use rows::{
    CommitOutcome, Expired, FleetRow, HostPeriodRow, HostRow, HostServiceRow, HostSpan,
    IntensityRow, ProfileCount, RequestCpuRow, ScenarioRow, ServicePeriodRow, ServiceRest,
    ServiceRow, StackSum, StoredPlan, SupplyAttr, SupplyRow, SupplyServiceRow,
};

use crate::error::AggregatorError;

/// A store shared by the server's tasks.
pub type SharedStore = std::sync::Arc<dyn Store>;

pub trait Store: Send + Sync {
    /// Stores the windows in one transaction with their rollups; per window
    /// (in order) whether it was new, a duplicate or a conflict.
    fn commit(&self, windows: &[v1::WindowReport]) -> Result<Vec<CommitOutcome>, AggregatorError>;
    fn layout(&self) -> RollupLayout;
    /// Fleet sums per period, data centre and disclosure.
    fn fleet_periods(&self, range: &Range) -> Result<Vec<FleetRow>, AggregatorError>;
    /// Scenario sums per period and data centre.
    fn scenario_periods(&self, range: &Range) -> Result<Vec<ScenarioRow>, AggregatorError>;
    fn hosts(&self, range: &Range) -> Result<Vec<HostRow>, AggregatorError>;
    /// The `limit` (data centre, service, scenario) rows with the most
    /// carbon (operational and embodied), most first, and how many rows the
    /// range holds with their sums together. The database ranks.
    fn services(
        &self,
        range: &Range,
        limit: usize,
    ) -> Result<(Vec<ServiceRow>, ServiceRest), AggregatorError>;
    /// Stacks of the range, optionally of one service and/or scenario.
    fn stacks(
        &self,
        range: &Range,
        service: Option<&str>,
        scenario: Option<&str>,
    ) -> Result<Vec<StackSum>, AggregatorError>;
    /// The `limit` profiles (service, scenario) with the most profile
    /// energy in the range (stack empty), most first; and how many
    /// profiles the range holds with their samples and energy together.
    /// The database ranks: the answer's size is the limit's.
    fn top_profiles(
        &self,
        range: &Range,
        limit: usize,
    ) -> Result<(Vec<StackSum>, ProfileCount), AggregatorError>;
    /// The `limit` stacks of one service and scenario with the most energy, most first.
    fn top_stacks(
        &self,
        range: &Range,
        service: &str,
        scenario: &str,
        limit: usize,
    ) -> Result<Vec<StackSum>, AggregatorError>;
    fn intensity_hours(&self, range: &Range) -> Result<Vec<IntensityRow>, AggregatorError>;
    /// Every host's span of data (one row per host of the fleet).
    fn host_spans(&self) -> Result<Vec<HostSpan>, AggregatorError>;
    /// First and last second with data, if any.
    fn extent(&self) -> Result<Option<(u64, u64)>, AggregatorError>;
    /// Removes what is older than the retention at `now_s`.
    fn expire(&self, now_s: u64, retention: &Retention) -> Result<Expired, AggregatorError>;
    /// Bytes the store takes on disk (file or database), and per table where known.
    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError>;
    /// Whether the store can serve (a trivial query succeeds).
    fn healthy(&self) -> bool;
    /// Service sums per period: the range in whole host steps, the period a
    /// multiple of the host step.
    fn service_periods(&self, range: &Range) -> Result<Vec<ServicePeriodRow>, AggregatorError>;
    /// Host sums per period (as [`Store::service_periods`]).
    fn host_periods(&self, range: &Range) -> Result<Vec<HostPeriodRow>, AggregatorError>;
    /// Per-request CPU histograms merged over the range (whole host steps),
    /// per service and scenario, of one data centre (all when None).
    fn request_cpu(
        &self,
        range: &Range,
        datacenter: Option<&str>,
    ) -> Result<Vec<RequestCpuRow>, AggregatorError>;
    /// CPU of each service on each host over the range (whole host steps).
    fn host_services(&self, range: &Range) -> Result<Vec<HostServiceRow>, AggregatorError>;
    /// Supply sums per period and data centre (#27; periods of whole host steps).
    fn supply_periods(&self, range: &Range) -> Result<Vec<SupplyRow>, AggregatorError>;
    /// Each service's share of each supply per period and scenario,
    /// optionally of one service.
    fn supply_service_periods(
        &self,
        range: &Range,
        service: Option<&str>,
    ) -> Result<Vec<SupplyServiceRow>, AggregatorError>;
    /// Supply sums over the range grouped by one attribute (see
    /// [`supply::groupable`]): `supply` of each row is the attribute's value.
    fn supply_groups(
        &self,
        range: &Range,
        attribute: &str,
    ) -> Result<Vec<SupplyRow>, AggregatorError>;
    /// [`Store::supply_groups`] per period and data centre.
    fn supply_group_periods(
        &self,
        range: &Range,
        attribute: &str,
    ) -> Result<Vec<SupplyRow>, AggregatorError>;
    /// Every supply's attributes.
    fn supply_attrs(&self) -> Result<Vec<SupplyAttr>, AggregatorError>;
    /// Stores a plan (a new id) or replaces it (the same id).
    fn save_plan(&self, plan: &StoredPlan) -> Result<(), AggregatorError>;
    /// Every stored plan, newest first.
    fn plans(&self) -> Result<Vec<StoredPlan>, AggregatorError>;
}
