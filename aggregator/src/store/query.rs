//! The queries shared by every backend: [`Store`] for any [`Backend`]. Each
//! rollup query is a [`SumQuery`] (which table, which range, grouped by
//! what, summed what) and a map from its answer's columns to a row of
//! [`super::rows`]. A new query: a method on [`Store`], and here its
//! `SumQuery` and its map.
use std::collections::BTreeMap;
use std::time::Duration;

use sci_proto::v1;

use super::backend::{Backend, Value};
use super::layout::{Range, Retention, RollupLayout, DAY_S};
use super::rows::{
    CommitOutcome, Expired, FleetRow, HostPeriodRow, HostRow, HostServiceRow, HostSpan,
    IntensityRow, ProfileCount, RequestCpuRow, ScenarioRow, ServicePeriodRow, ServiceRest,
    ServiceRow, StackSum, StoredPlan, SupplyAttr, SupplyRow, SupplyServiceRow,
};
use super::supply::groupable;
use super::tables::{
    Table, FINE_TABLES, FLEET, FLEET_COARSE, HOST, HOST_COARSE, HOST_SERVICE, PROFILE,
    PROFILE_COARSE, REQUEST_CPU, REQUEST_CPU_TOTAL, SCENARIO, SCENARIO_COARSE, SERVICE,
    SERVICE_COARSE, SERVICE_FINE, SERVICE_FINE_FROM_KEY, SUPPLY, SUPPLY_COARSE, SUPPLY_SERVICE,
    SUPPLY_SERVICE_COARSE, TABLES,
};
use super::Store;
use crate::error::AggregatorError;

/// A column of a [`SumQuery`]'s answer, before its sums.
#[derive(Clone, Copy)]
enum Col<'a> {
    /// The period index, `bucket_s / period_s` (`bucket_s` itself without
    /// a period): grouped and ordered by.
    Period,
    /// A key column: grouped and ordered by.
    Key(&'a str),
    /// A column that the grouped ones determine (a host's data centre),
    /// read as its `MAX`.
    Max(&'a str),
}

/// One query over a rollup table: its rows in `[from_s, to_s)` grouped by
/// the [`Col::Period`] and [`Col::Key`] columns, `sums` summed, ordered by
/// the grouped columns. With a coarse copy, whole coarse buckets are read
/// from it (see [`source`]).
struct SumQuery<'a> {
    table: &'a Table,
    /// The coarse copy and its bucket length.
    coarse: Option<(&'a Table, u64)>,
    from_s: u64,
    to_s: u64,
    /// The period length, for [`Col::Period`].
    period_s: Option<u64>,
    columns: &'a [Col<'a>],
    sums: &'a [&'a str],
    /// `column = value` conditions, for the values that are given.
    filters: &'a [(&'a str, Option<&'a str>)],
    /// Only the `limit` rows with the largest `expression` (of the sums),
    /// largest first (`(expression, limit)`): the database ranks, the
    /// answer is the limit's size whatever the rows it read.
    top: Option<(&'a str, usize)>,
    /// Joins `supply_attrs AS a` on the row's supply and this attribute,
    /// so `a.value` can be a column.
    supply_attribute: Option<&'a str>,
}

impl<'a> SumQuery<'a> {
    /// All of `table`'s sums over `[from_s, to_s)`, to which the caller adds
    /// its columns.
    fn over(table: &'a Table, from_s: u64, to_s: u64) -> SumQuery<'a> {
        SumQuery {
            table,
            coarse: None,
            from_s,
            to_s,
            period_s: None,
            columns: &[],
            sums: table.sums,
            filters: &[],
            top: None,
            supply_attribute: None,
        }
    }

    fn sql(&self) -> (String, Vec<Value>) {
        let mut params = Vec::new();
        let src = source(
            self.table,
            self.coarse,
            self.from_s,
            self.to_s,
            self.period_s,
            &mut params,
        );
        let period = self.period_s.map(|period_s| {
            params.push(Value::Int(period_s as i64));
            format!("bucket_s / ${}", params.len())
        });
        let mut filter = String::new();
        if let Some(attr) = self.supply_attribute {
            params.push(Value::Text(attr.to_string()));
            filter.push_str(&format!(
                " JOIN supply_attrs AS a ON a.supply = src.supply AND a.attr = ${}",
                params.len()
            ));
        }
        let mut glue = " WHERE";
        for (column, value) in self.filters {
            if let Some(value) = value {
                params.push(Value::Text(value.to_string()));
                filter.push_str(&format!("{glue} {column} = ${}", params.len()));
                glue = " AND";
            }
        }
        let (mut select, mut group, mut order) = (Vec::new(), Vec::new(), Vec::new());
        for (i, column) in self.columns.iter().enumerate() {
            let expr = match *column {
                Col::Period => period.clone().unwrap_or_else(|| "bucket_s".to_string()),
                Col::Key(c) => c.to_string(),
                Col::Max(c) => format!("MAX({c})"),
            };
            if !matches!(column, Col::Max(_)) {
                group.push(expr.clone());
                order.push((i + 1).to_string());
            }
            select.push(expr);
        }
        select.extend(self.sums.iter().map(|c| format!("SUM({c})")));
        let mut limit = String::new();
        if let Some((expression, n)) = self.top {
            order.insert(0, format!("{expression} DESC"));
            params.push(Value::Int(i64::try_from(n).unwrap_or(i64::MAX)));
            limit = format!(" LIMIT ${}", params.len());
        }
        let sql = format!(
            "SELECT {} FROM {src}{filter} GROUP BY {} ORDER BY {}{limit}",
            select.join(", "),
            group.join(", "),
            order.join(", ")
        );
        (sql, params)
    }

    /// The answer's rows, each through `map`.
    fn read<T>(
        &self,
        db: &dyn Backend,
        map: impl Fn(&[Value]) -> T,
    ) -> Result<Vec<T>, AggregatorError> {
        let (sql, params) = self.sql();
        Ok(db.read(&sql, &params)?.iter().map(|r| map(r)).collect())
    }
}

/// A derived table `src` with the rows of `[from_s, to_s)`: the whole
/// buckets of `coarse` (step `coarse_step`) inside the range, the finer
/// `fine` rows only at its edges, when every period holds whole coarse
/// buckets (`period_s` a multiple of the coarse step, or no periods). Sums
/// are additive, so both readings give the same totals; the coarse one
/// reads up to 60 (or 24) times fewer rows. Its parameters are appended.
fn source(
    fine: &Table,
    coarse: Option<(&Table, u64)>,
    from_s: u64,
    to_s: u64,
    period_s: Option<u64>,
    params: &mut Vec<Value>,
) -> String {
    let columns: Vec<&str> = fine.keys.iter().chain(fine.sums).copied().collect();
    let columns = columns.join(", ");
    let mut param = |v: u64| {
        params.push(Value::Int(v as i64));
        format!("${}", params.len())
    };
    if let Some((coarse, coarse_step)) = coarse {
        let inner_from = from_s.div_ceil(coarse_step) * coarse_step;
        let inner_to = to_s / coarse_step * coarse_step;
        if inner_from < inner_to && period_s.is_none_or(|p| p.is_multiple_of(coarse_step)) {
            let (a, b, f, t) = (
                param(inner_from),
                param(inner_to),
                param(from_s),
                param(to_s),
            );
            return format!(
                "(SELECT {columns} FROM {} WHERE bucket_s >= {a} AND bucket_s < {b} \
                 UNION ALL SELECT {columns} FROM {} WHERE (bucket_s >= {f} AND bucket_s < {a}) \
                 OR (bucket_s >= {b} AND bucket_s < {t})) AS src",
                coarse.name, fine.name
            );
        }
    }
    let (f, t) = (param(from_s), param(to_s));
    format!(
        "(SELECT {columns} FROM {} WHERE bucket_s >= {f} AND bucket_s < {t}) AS src",
        fine.name
    )
}

/// Service sums per period from the rollup-step table, for periods that
/// are not whole host steps; refused when the range starts before what that
/// table still holds (kept for raw_retention, see [`FINE_TABLES`]).
fn service_periods_fine(
    db: &dyn Backend,
    range: &Range,
    layout: &RollupLayout,
) -> Result<Vec<ServicePeriodRow>, AggregatorError> {
    let kept_from = db
        .read(
            "SELECT value FROM meta WHERE key = $1",
            &[Value::Text(SERVICE_FINE_FROM_KEY.into())],
        )?
        .first()
        .and_then(|r| r[0].text().parse::<u64>().ok());
    if let Some(kept_from) = kept_from.filter(|k| range.from_s < *k) {
        return Err(AggregatorError::Invalid(format!(
            "service figures per {} s (needed for a {} s period) are kept as long as raw windows (raw_retention): before {kept_from} (unix s) they were already rolled up into host steps of {} s; start the range at or after {kept_from}, or use a period that is a multiple of {} s",
            layout.step_s, range.period_s, layout.host_step_s, layout.host_step_s
        )));
    }
    SumQuery {
        period_s: Some(range.period_s),
        columns: &[Period, Key("datacenter"), Key("service"), Key("scenario")],
        ..SumQuery::over(&SERVICE_FINE, range.from_s, range.to_s)
    }
    .read(db, |r| ServicePeriodRow {
        period_start_s: r[0].i64() as u64 * range.period_s,
        row: ServiceRow::from_columns(&r[1..]),
    })
}

/// The range of a per-period host-step query: whole host steps, periods
/// made of whole host steps.
fn host_periods_range(range: &Range, layout: &RollupLayout) -> Result<(u64, u64), AggregatorError> {
    if !range.period_s.is_multiple_of(layout.host_step_s) {
        return Err(AggregatorError::Invalid(format!(
            "period {} s is not a multiple of host_rollup_step {} s: host and service figures per period need whole host steps",
            range.period_s, layout.host_step_s
        )));
    }
    Ok(range.host_range(layout))
}

impl ServiceRow {
    /// datacenter, service, scenario, then the five sums in field order.
    fn from_columns(r: &[Value]) -> ServiceRow {
        ServiceRow {
            datacenter: r[0].text(),
            service: r[1].text(),
            scenario: r[2].text(),
            cpu_ns: r[3].f64(),
            energy_j: r[4].f64(),
            idle_energy_j: r[5].f64(),
            carbon_g: r[6].f64(),
            embodied_g: r[7].f64(),
        }
    }
}

impl HostRow {
    /// host, datacenter, then the nine sums in field order.
    fn from_columns(r: &[Value]) -> HostRow {
        let f = |i: usize| r[2 + i].f64();
        HostRow {
            host: r[0].text(),
            datacenter: r[1].text(),
            host_s: f(0),
            energy_j: f(1),
            idle_energy_j: f(2),
            estimated_energy_j: f(3),
            carbon_g: f(4),
            embodied_g: f(5),
            busy_cpu_ns: f(6),
            idle_cpu_ns: f(7),
            transactions: f(8),
        }
    }
}

use Col::{Key, Max, Period};

impl<B: Backend> Store for B {
    fn commit(&self, windows: &[v1::WindowReport]) -> Result<Vec<CommitOutcome>, AggregatorError> {
        self.commit_batch(windows)
    }

    fn layout(&self) -> RollupLayout {
        Backend::layout(self)
    }

    fn fleet_periods(&self, range: &Range) -> Result<Vec<FleetRow>, AggregatorError> {
        SumQuery {
            coarse: Some((&FLEET_COARSE, Backend::layout(self).host_step_s)),
            period_s: Some(range.period_s),
            columns: &[
                Period,
                Key("datacenter"),
                Key("intensity_source"),
                Key("energy_source"),
                Key("energy_model"),
                Key("share_source"),
            ],
            ..SumQuery::over(&FLEET, range.from_s, range.to_s)
        }
        .read(self, |r| {
            let f = |i: usize| r[6 + i].f64();
            FleetRow {
                period: r[0].i64() as u64,
                datacenter: r[1].text(),
                intensity_source: r[2].text(),
                energy_source: r[3].text(),
                energy_model: r[4].text(),
                share_source: r[5].text(),
                windows_ended: f(0),
                host_s: f(1),
                energy_j: f(2),
                idle_energy_j: f(3),
                estimated_energy_j: f(4),
                unattributed_energy_j: f(5),
                operational_g: f(6),
                embodied_g: f(7),
                busy_cpu_ns: f(8),
                idle_cpu_ns: f(9),
                steal_cpu_ns: f(10),
                unattributed_cpu_ns: f(11),
                intensity_x_s: f(12),
                pue_x_s: f(13),
                te_x_s: f(14),
                el_x_s: f(15),
                share_x_s: f(16),
            }
        })
    }

    fn scenario_periods(&self, range: &Range) -> Result<Vec<ScenarioRow>, AggregatorError> {
        SumQuery {
            coarse: Some((&SCENARIO_COARSE, Backend::layout(self).host_step_s)),
            period_s: Some(range.period_s),
            columns: &[Period, Key("datacenter"), Key("scenario")],
            ..SumQuery::over(&SCENARIO, range.from_s, range.to_s)
        }
        .read(self, |r| ScenarioRow {
            period: r[0].i64() as u64,
            datacenter: r[1].text(),
            scenario: r[2].text(),
            transactions: r[3].f64(),
            cpu_ns: r[4].f64(),
            energy_j: r[5].f64(),
            idle_energy_j: r[6].f64(),
            carbon_g: r[7].f64(),
            embodied_g: r[8].f64(),
        })
    }

    fn hosts(&self, range: &Range) -> Result<Vec<HostRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        SumQuery {
            coarse: Some((&HOST_COARSE, DAY_S)),
            columns: &[Key("host"), Max("datacenter")],
            ..SumQuery::over(&HOST, from, to)
        }
        .read(self, HostRow::from_columns)
    }

    fn services(
        &self,
        range: &Range,
        limit: usize,
    ) -> Result<(Vec<ServiceRow>, ServiceRest), AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let coarse = Some((&SERVICE_COARSE, DAY_S));
        let top = SumQuery {
            coarse,
            columns: &[Key("datacenter"), Key("service"), Key("scenario")],
            top: Some(("SUM(carbon_g) + SUM(embodied_g)", limit)),
            ..SumQuery::over(&SERVICE, from, to)
        }
        .read(self, ServiceRow::from_columns)?;
        let mut params = Vec::new();
        let src = source(&SERVICE, coarse, from, to, None, &mut params);
        let summed: Vec<String> = SERVICE.sums.iter().map(|c| format!("SUM({c})")).collect();
        let inner: Vec<String> = SERVICE
            .sums
            .iter()
            .map(|c| format!("SUM({c}) AS {c}"))
            .collect();
        let sql = format!(
            "SELECT COUNT(*), {} FROM (SELECT {} FROM {src} \
             GROUP BY datacenter, service, scenario) AS services",
            summed.join(", "),
            inner.join(", ")
        );
        let mut rest = ServiceRest::default();
        if let Some(r) = self.read(&sql, &params)?.first() {
            rest.services = r[0].i64().max(0) as u64;
            let mut columns = vec![Value::Text(String::new()); 3];
            columns.extend(r[1..].iter().cloned());
            rest.total = ServiceRow::from_columns(&columns);
        }
        Ok((top, rest))
    }

    fn stacks(
        &self,
        range: &Range,
        service: Option<&str>,
        scenario: Option<&str>,
    ) -> Result<Vec<StackSum>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        SumQuery {
            coarse: Some((&PROFILE_COARSE, DAY_S)),
            columns: &[Key("service"), Key("scenario"), Key("stack")],
            filters: &[("service", service), ("scenario", scenario)],
            ..SumQuery::over(&PROFILE, from, to)
        }
        .read(self, |r| StackSum {
            service: r[0].text(),
            scenario: r[1].text(),
            stack: r[2].text(),
            samples: r[3].f64().round() as u64,
            energy_j: r[4].f64(),
        })
    }

    fn top_profiles(
        &self,
        range: &Range,
        limit: usize,
    ) -> Result<(Vec<StackSum>, ProfileCount), AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let coarse = Some((&PROFILE_COARSE, DAY_S));
        let top = SumQuery {
            coarse,
            columns: &[Key("service"), Key("scenario")],
            top: Some(("SUM(energy_j)", limit)),
            ..SumQuery::over(&PROFILE, from, to)
        }
        .read(self, |r| StackSum {
            service: r[0].text(),
            scenario: r[1].text(),
            stack: String::new(),
            samples: r[2].f64().round() as u64,
            energy_j: r[3].f64(),
        })?;
        let mut params = Vec::new();
        let src = source(&PROFILE, coarse, from, to, None, &mut params);
        let sql = format!(
            "SELECT COUNT(*), SUM(samples), SUM(energy_j) FROM \
             (SELECT SUM(samples) AS samples, SUM(energy_j) AS energy_j FROM {src} \
             GROUP BY service, scenario) AS profiles"
        );
        let all = self
            .read(&sql, &params)?
            .first()
            .map(|r| ProfileCount {
                profiles: r[0].i64().max(0) as u64,
                samples: r[1].f64().round() as u64,
                energy_j: r[2].f64(),
            })
            .unwrap_or_default();
        Ok((top, all))
    }

    fn top_stacks(
        &self,
        range: &Range,
        service: &str,
        scenario: &str,
        limit: usize,
    ) -> Result<Vec<StackSum>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        SumQuery {
            coarse: Some((&PROFILE_COARSE, DAY_S)),
            columns: &[Key("stack")],
            filters: &[("service", Some(service)), ("scenario", Some(scenario))],
            top: Some(("SUM(energy_j)", limit)),
            ..SumQuery::over(&PROFILE, from, to)
        }
        .read(self, |r| StackSum {
            service: service.to_string(),
            scenario: scenario.to_string(),
            stack: r[0].text(),
            samples: r[1].f64().round() as u64,
            energy_j: r[2].f64(),
        })
    }

    fn intensity_hours(&self, range: &Range) -> Result<Vec<IntensityRow>, AggregatorError> {
        SumQuery {
            coarse: Some((&FLEET_COARSE, Backend::layout(self).host_step_s)),
            period_s: Some(3600),
            columns: &[Key("datacenter"), Period],
            sums: &["intensity_x_s", "host_s"],
            ..SumQuery::over(&FLEET, range.from_s, range.to_s)
        }
        .read(self, |r| IntensityRow {
            datacenter: r[0].text(),
            hour_unix_s: r[1].i64() as u64 * 3600,
            intensity_x_s: r[2].f64(),
            host_s: r[3].f64(),
        })
    }

    fn host_spans(&self) -> Result<Vec<HostSpan>, AggregatorError> {
        Ok(self
            .read(
                "SELECT host, datacenter, first_start_ns, last_end_ns FROM hosts ORDER BY host",
                &[],
            )?
            .into_iter()
            .map(|r| HostSpan {
                host: r[0].text(),
                datacenter: r[1].text(),
                first_start_ns: r[2].i64() as u64,
                last_end_ns: r[3].i64() as u64,
            })
            .collect())
    }

    fn extent(&self) -> Result<Option<(u64, u64)>, AggregatorError> {
        let rows = self.read(
            "SELECT MIN(first_start_ns), MAX(last_end_ns) FROM hosts",
            &[],
        )?;
        Ok(rows.first().and_then(|r| match (&r[0], &r[1]) {
            (Value::Int(a), Value::Int(b)) => Some((
                *a as u64 / 1_000_000_000,
                (*b as u64).div_ceil(1_000_000_000),
            )),
            _ => None,
        }))
    }

    fn expire(&self, now_s: u64, retention: &Retention) -> Result<Expired, AggregatorError> {
        let cutoff_ns = |keep: Duration| now_s.saturating_sub(keep.as_secs()) * 1_000_000_000;
        let (raw_windows, raw_partitions_dropped) = self.expire_raw(cutoff_ns(retention.raw))?;
        let mut expired = Expired {
            raw_windows,
            raw_partitions_dropped,
            ..Default::default()
        };
        let rollup_cutoff_s = now_s.saturating_sub(retention.rollups.as_secs()) as i64;
        let raw_cutoff_s = now_s.saturating_sub(retention.raw.as_secs()) as i64;
        self.write(&mut |tx| {
            expired.keys = tx.execute(
                "DELETE FROM window_keys WHERE end_ns < $1",
                &[Value::Int(cutoff_ns(retention.keys) as i64)],
            )?;
            expired.rollup_rows = 0;
            for t in TABLES {
                let fine = FINE_TABLES.iter().any(|f| f.index == t.index);
                let cutoff_s = if fine {
                    raw_cutoff_s.max(rollup_cutoff_s)
                } else {
                    rollup_cutoff_s
                };
                expired.rollup_rows += tx.execute(
                    &format!("DELETE FROM {} WHERE bucket_s < $1", t.name),
                    &[Value::Int(cutoff_s)],
                )?;
            }
            // A commit upserts the attributes of every supply it writes
            // rollups for: with it waiting (or done), no supply it names
            // loses its attributes here.
            tx.lock_table("supply_attrs")?;
            expired.supply_attrs = tx.execute(
                "DELETE FROM supply_attrs WHERE NOT EXISTS \
                 (SELECT 1 FROM supply_rollup AS r WHERE r.supply = supply_attrs.supply)",
                &[],
            )?;
            // A plan is checked against the rollups of its hours: kept while
            // they are (from its creation, or its carrying out if later).
            expired.plans = tx.execute(
                "DELETE FROM plans WHERE created_unix_s < $1 \
                 AND (carried_out_unix_s IS NULL OR carried_out_unix_s < $1)",
                &[Value::Int(rollup_cutoff_s)],
            )?;
            // What the fine service rollups no longer hold: a shorter
            // service review from before it is refused with the reason.
            let stored = tx.query(
                "SELECT value FROM meta WHERE key = $1",
                &[Value::Text(SERVICE_FINE_FROM_KEY.into())],
            )?;
            let from_s = stored
                .first()
                .and_then(|r| r[0].text().parse::<i64>().ok())
                .unwrap_or(0)
                .max(raw_cutoff_s.max(rollup_cutoff_s));
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[
                    Value::Text(SERVICE_FINE_FROM_KEY.into()),
                    Value::Text(from_s.to_string()),
                ],
            )?;
            Ok(())
        })?;
        Ok(expired)
    }

    fn disk_usage(&self) -> Result<BTreeMap<String, u64>, AggregatorError> {
        Backend::disk_usage(self)
    }

    fn healthy(&self) -> bool {
        self.read("SELECT 1", &[]).is_ok()
    }

    fn service_periods(&self, range: &Range) -> Result<Vec<ServicePeriodRow>, AggregatorError> {
        let layout = Backend::layout(self);
        if !range.period_s.is_multiple_of(layout.host_step_s) {
            return service_periods_fine(self, range, &layout);
        }
        let (from, to) = host_periods_range(range, &layout)?;
        SumQuery {
            coarse: Some((&SERVICE_COARSE, DAY_S)),
            period_s: Some(range.period_s),
            columns: &[Period, Key("datacenter"), Key("service"), Key("scenario")],
            ..SumQuery::over(&SERVICE, from, to)
        }
        .read(self, |r| ServicePeriodRow {
            period_start_s: r[0].i64() as u64 * range.period_s,
            row: ServiceRow::from_columns(&r[1..]),
        })
    }

    fn host_periods(&self, range: &Range) -> Result<Vec<HostPeriodRow>, AggregatorError> {
        let (from, to) = host_periods_range(range, &Backend::layout(self))?;
        SumQuery {
            coarse: Some((&HOST_COARSE, DAY_S)),
            period_s: Some(range.period_s),
            columns: &[Period, Key("host"), Max("datacenter")],
            ..SumQuery::over(&HOST, from, to)
        }
        .read(self, |r| HostPeriodRow {
            period_start_s: r[0].i64() as u64 * range.period_s,
            row: HostRow::from_columns(&r[1..]),
        })
    }

    fn request_cpu(
        &self,
        range: &Range,
        datacenter: Option<&str>,
    ) -> Result<Vec<RequestCpuRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        let filters = [("datacenter", datacenter)];
        let mut out: BTreeMap<(String, String), RequestCpuRow> = SumQuery {
            columns: &[Key("service"), Key("scenario")],
            filters: &filters,
            ..SumQuery::over(&REQUEST_CPU_TOTAL, from, to)
        }
        .read(self, |r| {
            let row = RequestCpuRow {
                service: r[0].text(),
                scenario: r[1].text(),
                bins: Vec::new(),
                requests: r[2].f64(),
                cpu_ns: r[3].f64(),
                energy_j: r[4].f64(),
            };
            ((row.service.clone(), row.scenario.clone()), row)
        })?
        .into_iter()
        .collect();
        let bins = SumQuery {
            columns: &[Key("service"), Key("scenario"), Key("bin")],
            filters: &filters,
            ..SumQuery::over(&REQUEST_CPU, from, to)
        }
        .read(self, |r| {
            let bin = r[2]
                .i64()
                .clamp(0, agent_common::REQUEST_CPU_BUCKETS as i64 - 1)
                as usize;
            ((r[0].text(), r[1].text()), bin, r[3].f64())
        })?;
        for (key, bin, requests) in bins {
            if let Some(row) = out.get_mut(&key) {
                if row.bins.len() <= bin {
                    row.bins.resize(bin + 1, 0.0);
                }
                row.bins[bin] += requests;
            }
        }
        Ok(out.into_values().collect())
    }

    fn host_services(&self, range: &Range) -> Result<Vec<HostServiceRow>, AggregatorError> {
        let (from, to) = range.host_range(&Backend::layout(self));
        SumQuery {
            columns: &[Max("datacenter"), Key("host"), Key("service")],
            ..SumQuery::over(&HOST_SERVICE, from, to)
        }
        .read(self, |r| HostServiceRow {
            datacenter: r[0].text(),
            host: r[1].text(),
            service: r[2].text(),
            cpu_ns: r[3].f64(),
        })
    }

    fn supply_periods(&self, range: &Range) -> Result<Vec<SupplyRow>, AggregatorError> {
        let (from, to) = host_periods_range(range, &Backend::layout(self))?;
        SumQuery {
            coarse: Some((&SUPPLY_COARSE, DAY_S)),
            period_s: Some(range.period_s),
            columns: &[Period, Key("datacenter"), Key("supply")],
            ..SumQuery::over(&SUPPLY, from, to)
        }
        .read(self, |r| SupplyRow {
            period_start_s: r[0].i64() as u64 * range.period_s,
            ..SupplyRow::from_sums(r[1].text(), r[2].text(), &r[3..])
        })
    }

    fn supply_service_periods(
        &self,
        range: &Range,
        service: Option<&str>,
    ) -> Result<Vec<SupplyServiceRow>, AggregatorError> {
        let (from, to) = host_periods_range(range, &Backend::layout(self))?;
        SumQuery {
            period_s: Some(range.period_s),
            columns: &[
                Period,
                Key("datacenter"),
                Key("supply"),
                Key("service"),
                Key("scenario"),
            ],
            filters: &[("service", service)],
            coarse: Some((&SUPPLY_SERVICE_COARSE, DAY_S)),
            ..SumQuery::over(&SUPPLY_SERVICE, from, to)
        }
        .read(self, |r| SupplyServiceRow {
            period_start_s: r[0].i64() as u64 * range.period_s,
            datacenter: r[1].text(),
            supply: r[2].text(),
            service: r[3].text(),
            scenario: r[4].text(),
            cpu_ns: r[5].f64(),
            energy_j: r[6].f64(),
            idle_energy_j: r[7].f64(),
            carbon_g: r[8].f64(),
            embodied_g: r[9].f64(),
            transactions: r[10].f64(),
        })
    }

    fn supply_groups(
        &self,
        range: &Range,
        attribute: &str,
    ) -> Result<Vec<SupplyRow>, AggregatorError> {
        if !groupable(attribute) {
            return Err(AggregatorError::Invalid(format!(
                "group_by {:?}: use datacenter, supply, {} or label.<key>",
                attribute.chars().take(64).collect::<String>(),
                super::supply::ATTRIBUTES.join(", ")
            )));
        }
        let (from, to) = range.host_range(&Backend::layout(self));
        let (columns, join): (&[Col], _) = match attribute {
            "datacenter" => (&[Key("datacenter")], None),
            "supply" => (&[Key("supply")], None),
            attr => (&[Key("a.value")], Some(attr)),
        };
        SumQuery {
            coarse: Some((&SUPPLY_COARSE, DAY_S)),
            columns,
            supply_attribute: join,
            ..SumQuery::over(&SUPPLY, from, to)
        }
        .read(self, |r| {
            SupplyRow::from_sums(String::new(), r[0].text(), &r[1..])
        })
    }

    fn supply_group_periods(
        &self,
        range: &Range,
        attribute: &str,
    ) -> Result<Vec<SupplyRow>, AggregatorError> {
        if !groupable(attribute) || attribute == "datacenter" {
            return Err(AggregatorError::Invalid(format!(
                "group_by {:?}: use supply, {} or label.<key>",
                attribute.chars().take(64).collect::<String>(),
                super::supply::ATTRIBUTES.join(", ")
            )));
        }
        let (from, to) = host_periods_range(range, &Backend::layout(self))?;
        let (columns, join): (&[Col], _) = match attribute {
            "supply" => (&[Period, Key("datacenter"), Key("supply")], None),
            attr => (&[Period, Key("datacenter"), Key("a.value")], Some(attr)),
        };
        SumQuery {
            coarse: Some((&SUPPLY_COARSE, DAY_S)),
            period_s: Some(range.period_s),
            columns,
            supply_attribute: join,
            ..SumQuery::over(&SUPPLY, from, to)
        }
        .read(self, |r| SupplyRow {
            period_start_s: r[0].i64() as u64 * range.period_s,
            ..SupplyRow::from_sums(r[1].text(), r[2].text(), &r[3..])
        })
    }

    fn supply_attrs(&self) -> Result<Vec<SupplyAttr>, AggregatorError> {
        Ok(self
            .read(
                "SELECT supply, attr, value FROM supply_attrs ORDER BY supply, attr",
                &[],
            )?
            .into_iter()
            .map(|r| SupplyAttr {
                supply: r[0].text(),
                attr: r[1].text(),
                value: r[2].text(),
            })
            .collect())
    }

    fn save_plan(&self, plan: &StoredPlan) -> Result<(), AggregatorError> {
        self.write(&mut |tx| {
            tx.execute(
                "INSERT INTO plans (id, created_unix_s, kind, service, carried_out_unix_s, body) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                 carried_out_unix_s = excluded.carried_out_unix_s, body = excluded.body",
                &[
                    Value::Text(plan.id.clone()),
                    Value::Int(plan.created_unix_s as i64),
                    Value::Text(plan.kind.clone()),
                    Value::Text(plan.service.clone()),
                    plan.carried_out_unix_s
                        .map_or(Value::Null, |t| Value::Int(t as i64)),
                    Value::Text(plan.body.clone()),
                ],
            )?;
            Ok(())
        })
    }

    fn plans(&self) -> Result<Vec<StoredPlan>, AggregatorError> {
        Ok(self
            .read(
                "SELECT id, created_unix_s, kind, service, carried_out_unix_s, body FROM plans \
                 ORDER BY created_unix_s DESC, id",
                &[],
            )?
            .into_iter()
            .map(|r| StoredPlan {
                id: r[0].text(),
                created_unix_s: r[1].i64() as u64,
                kind: r[2].text(),
                service: r[3].text(),
                carried_out_unix_s: match r[4] {
                    Value::Int(t) => Some(t as u64),
                    _ => None,
                },
                body: r[5].text(),
            })
            .collect())
    }
}

impl SupplyRow {
    /// A row from the nine sums of `supply_rollup` in column order.
    fn from_sums(datacenter: String, supply: String, r: &[Value]) -> SupplyRow {
        let f = |i: usize| r[i].f64();
        SupplyRow {
            period_start_s: 0,
            datacenter,
            supply,
            host_s: f(0),
            capacity_cpu_ns: f(1),
            busy_cpu_ns: f(2),
            energy_j: f(3),
            operational_g: f(4),
            embodied_g: f(5),
            intensity_x_s: f(6),
            pue_x_s: f(7),
            transactions: f(8),
        }
    }
}
