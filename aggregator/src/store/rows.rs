//! The rows the store answers with (one struct per query's answer), and
//! what a commit or an expiry pass reports. Plain data: how each is read
//! from SQL is in [`super::query`].
use serde::Serialize;

/// What became of one window of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitOutcome {
    /// New: stored and added to the rollups.
    Stored,
    /// Already stored with the same content digest: ignored.
    Duplicate,
    /// Already stored with another content: ignored, the first one stands.
    Conflict,
    /// Its host's windows would cover more than a whole host bucket (its
    /// time overlaps windows already stored): not stored.
    Overlap,
}

/// Fleet sums of one period, data centre and disclosure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetRow {
    pub period: u64,
    pub datacenter: String,
    pub intensity_source: String,
    pub energy_source: String,
    pub energy_model: String,
    pub share_source: String,
    pub windows_ended: f64,
    pub host_s: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub estimated_energy_j: f64,
    pub unattributed_energy_j: f64,
    pub operational_g: f64,
    pub embodied_g: f64,
    pub busy_cpu_ns: f64,
    pub idle_cpu_ns: f64,
    pub steal_cpu_ns: f64,
    pub unattributed_cpu_ns: f64,
    /// Sums of factor x host-seconds (divide by host_s for the mean).
    pub intensity_x_s: f64,
    pub pue_x_s: f64,
    pub te_x_s: f64,
    pub el_x_s: f64,
    pub share_x_s: f64,
}

/// Scenario sums of one period and data centre.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScenarioRow {
    pub period: u64,
    pub datacenter: String,
    pub scenario: String,
    pub transactions: f64,
    pub cpu_ns: f64,
    /// Dynamic energy (the scenario's CPU share of busy energy).
    pub energy_j: f64,
    /// Idle energy its processes were charged.
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A host's sums over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostRow {
    pub host: String,
    pub datacenter: String,
    pub host_s: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub estimated_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub busy_cpu_ns: f64,
    pub idle_cpu_ns: f64,
    pub transactions: f64,
}

/// A (data centre, service, scenario)'s sums over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRow {
    pub datacenter: String,
    pub service: String,
    pub scenario: String,
    pub cpu_ns: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
}

/// A folded stack's samples and energy over a range (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StackSum {
    pub service: String,
    pub scenario: String,
    pub stack: String,
    pub samples: u64,
    pub energy_j: f64,
}

/// How many (data centre, service, scenario) rows a range holds, and
/// their sums together (`total`'s names empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRest {
    pub services: u64,
    pub total: ServiceRow,
}

/// How many profiles (service, scenario) a range holds, and their samples
/// and energy together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProfileCount {
    pub profiles: u64,
    pub samples: u64,
    pub energy_j: f64,
}

/// A (data centre, service, scenario)'s sums in one period (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePeriodRow {
    pub period_start_s: u64,
    pub row: ServiceRow,
}

/// A host's sums in one period (whole host steps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPeriodRow {
    pub period_start_s: u64,
    pub row: HostRow,
}

/// A merged per-request CPU histogram of one service and scenario.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestCpuRow {
    pub service: String,
    pub scenario: String,
    /// Requests per log2 bin (bin i: 2^(i-1) <= t < 2^i ns; bin 0: t = 0).
    pub bins: Vec<f64>,
    pub requests: f64,
    pub cpu_ns: f64,
    /// Energy of those requests' CPU time (sum_cpu_ns x J per CPU-ns).
    pub energy_j: f64,
}

/// CPU of one service on one host over a range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostServiceRow {
    pub datacenter: String,
    pub host: String,
    pub service: String,
    pub cpu_ns: f64,
}

/// A data centre's intensity in one hour: sum of intensity x host-seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntensityRow {
    pub datacenter: String,
    pub hour_unix_s: u64,
    pub intensity_x_s: f64,
    pub host_s: f64,
}

/// When a host sent data: its first window's start, its last window's end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSpan {
    pub host: String,
    pub datacenter: String,
    pub first_start_ns: u64,
    pub last_end_ns: u64,
}

/// What an expiry pass removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Expired {
    pub raw_windows: u64,
    pub raw_partitions_dropped: u64,
    pub keys: u64,
    pub rollup_rows: u64,
    /// Attribute rows of supplies no rollup row names any more.
    pub supply_attrs: u64,
    /// Plans created, and carried out if they were, before the rollup cutoff.
    pub plans: u64,
}

impl Expired {
    /// (kind, rows) for `sci_retention_deleted_total{kind}`.
    pub fn kinds(&self) -> [(&'static str, u64); 6] {
        [
            ("raw_windows", self.raw_windows),
            ("raw_partitions", self.raw_partitions_dropped),
            ("keys", self.keys),
            ("rollup_rows", self.rollup_rows),
            ("supply_attrs", self.supply_attrs),
            ("plans", self.plans),
        ]
    }
}

/// A supply's sums (#27) in one period (whole host steps), or over a range
/// grouped by one attribute (then `supply` holds the attribute's value).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SupplyRow {
    pub period_start_s: u64,
    pub datacenter: String,
    pub supply: String,
    pub host_s: f64,
    /// Logical CPUs x seconds, in ns: what the hosts could run.
    pub capacity_cpu_ns: f64,
    pub busy_cpu_ns: f64,
    pub energy_j: f64,
    pub operational_g: f64,
    pub embodied_g: f64,
    /// Sums of factor x host-seconds (divide by host_s for the mean).
    pub intensity_x_s: f64,
    pub pue_x_s: f64,
    pub transactions: f64,
}

/// A service's share of a supply (#27) per scenario in one period (whole
/// host steps): its processes' figures and the transactions it served.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SupplyServiceRow {
    pub period_start_s: u64,
    pub datacenter: String,
    pub supply: String,
    pub service: String,
    pub scenario: String,
    pub cpu_ns: f64,
    pub energy_j: f64,
    pub idle_energy_j: f64,
    pub carbon_g: f64,
    pub embodied_g: f64,
    pub transactions: f64,
}

/// One attribute of a supply.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SupplyAttr {
    pub supply: String,
    pub attr: String,
    pub value: String,
}

/// A plan as stored (#27): its kind, the service it moves, when it was made
/// and carried out, and its whole JSON (prediction, assumptions, data).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoredPlan {
    pub id: String,
    pub created_unix_s: u64,
    pub kind: String,
    pub service: String,
    pub carried_out_unix_s: Option<u64>,
    pub body: String,
}
