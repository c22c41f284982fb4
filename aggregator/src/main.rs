//! `sci-aggregator serve | report`.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sci_aggregator::config::AggregatorConfig;

#[derive(Parser)]
#[command(
    name = "sci-aggregator",
    version,
    about = "sci-cf aggregator: fleet SCI_CF per period"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive windows (gRPC) and serve the API, metrics and health.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Allow plaintext gRPC and/or no agent authentication (not for production).
        #[arg(long)]
        insecure: bool,
    },
    /// The Appendix A evaluation report for a time range.
    Report {
        /// aggregator.toml (weights, period, database); or give --db.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        db: Option<PathBuf>,
        /// Start of the range: unix seconds or RFC 3339 (default: the beginning).
        #[arg(long)]
        from: Option<String>,
        /// End of the range: unix seconds or RFC 3339 (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Period length, e.g. 1h (default: the configured one).
        #[arg(long, value_parser = agent_common::time_text::parse_duration)]
        period: Option<std::time::Duration>,
        /// One data centre's figures and hotspots (default: the fleet).
        #[arg(long)]
        datacenter: Option<String>,
        /// json, md, html (printable, with the SCI_j chart) or text (a
        /// summary for a terminal).
        #[arg(long, default_value = "md")]
        format: String,
    },
    /// Optimisation review: the candidate range against the baseline, per
    /// transaction, with 95% intervals, the differential flame graph, the
    /// distributions and the consolidation plan.
    Compare {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        db: Option<PathBuf>,
        /// FROM..TO (unix seconds or RFC 3339).
        #[arg(long)]
        baseline: String,
        /// FROM..TO (unix seconds or RFC 3339).
        #[arg(long)]
        candidate: String,
        /// datacenter, service or host.
        #[arg(long, default_value = "datacenter")]
        scope: String,
        #[arg(long)]
        datacenter: Option<String>,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// Period length, e.g. 1h (default: the configured one).
        #[arg(long, value_parser = agent_common::time_text::parse_duration)]
        period: Option<std::time::Duration>,
        /// Scenario of the differential flame graph (default: credit).
        #[arg(long)]
        profile_scenario: Option<String>,
        /// Service of the differential flame graph (default: the service
        /// holding most of the scenario's profiled energy, or --service).
        #[arg(long)]
        profile_service: Option<String>,
        /// Consolidation: target utilisation of the remaining hosts.
        #[arg(long, default_value_t = 0.6)]
        target_utilisation: f64,
        /// Bootstrap seed (the same seed gives the same interval).
        #[arg(long)]
        seed: Option<u64>,
        /// md, html, json, or svg (the differential flame graph alone).
        #[arg(long, default_value = "md")]
        format: String,
    },
    /// Copy a SQLite store into a new PostgreSQL database (same rollup
    /// steps; the target must hold no data). Stop the aggregator writing
    /// the file first, or copy an online backup of it.
    MigrateStore {
        /// sqlite:PATH (or a path) of the store to copy.
        #[arg(long)]
        from: String,
        /// postgres://... (or a libpq key=value string) of the target.
        #[arg(long)]
        to: String,
    },
    /// Change the rollup steps of a store in place (the aggregator
    /// stopped): to a multiple of the old step the rollups are summed
    /// into the coarser buckets; to any other step they are rebuilt from
    /// the raw windows the store still holds.
    ChangeRollupSteps {
        /// sqlite:PATH (or a path), or a postgres:// URL (or libpq key=value string).
        #[arg(long)]
        db: String,
        /// The new rollup_step, e.g. 5m (default: unchanged).
        #[arg(long, value_parser = agent_common::time_text::parse_duration)]
        rollup_step: Option<std::time::Duration>,
        /// The new host_rollup_step, e.g. 1h (default: unchanged).
        #[arg(long, value_parser = agent_common::time_text::parse_duration)]
        host_rollup_step: Option<std::time::Duration>,
        /// Drop rollups older than the raw windows when a step must be
        /// rebuilt from them (refused otherwise).
        #[arg(long)]
        drop_older: bool,
    },
    /// Backfill: send the rollups of FROM..TO to the [remote_write]
    /// endpoint (the same state file as `serve`, which goes on from TO).
    RemoteWrite {
        #[arg(long)]
        config: PathBuf,
        /// Where the export begins when it has no state yet (unix seconds or RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Stop once the steps before TO are sent (default: now less the delay).
        #[arg(long)]
        to: Option<String>,
    },
}

fn parse_range(text: &str, what: &str) -> Result<(u64, u64)> {
    let (from, to) = text
        .split_once("..")
        .with_context(|| format!("--{what} {text:?}: write FROM..TO"))?;
    let (from, to) = (parse_time(from)?, parse_time(to)?);
    let max_s = i64::MAX as u64 / 1_000_000_000;
    if from >= to || to > max_s {
        bail!("--{what} {text:?}: FROM must be before TO, both before unix second {max_s}");
    }
    Ok((from, to))
}

/// The configuration of `--config` (defaults without it), its database replaced by `--db`.
fn config_with_db(
    config: Option<&std::path::Path>,
    db: Option<std::path::PathBuf>,
) -> Result<AggregatorConfig> {
    let mut cfg = match config {
        Some(path) => AggregatorConfig::load(path)?,
        None => AggregatorConfig::default(),
    };
    match db {
        Some(db) => {
            // The store's rollup steps were fixed when it was created: read
            // them from it rather than refuse it for differing from defaults.
            if let Some(layout) = sci_aggregator::store::sqlite::SqliteStore::stored_layout(&db)? {
                cfg.rollup_step = Some(std::time::Duration::from_secs(layout.step_s));
                cfg.host_rollup_step = std::time::Duration::from_secs(layout.host_step_s);
            }
            cfg.database = db;
        }
        None if config.is_none() => bail!("give --config or --db"),
        None => {}
    }
    Ok(cfg)
}

fn parse_time(text: &str) -> Result<u64> {
    if let Ok(s) = text.parse::<u64>() {
        return Ok(s);
    }
    let t = agent_common::time_text::parse_time_utc_default(text)
        .map_err(|e| anyhow::anyhow!("{e}; or give unix seconds"))?;
    u64::try_from(t.as_second()).with_context(|| format!("{text:?} is before 1970"))
}

fn main() -> std::process::ExitCode {
    agent_common::cli_exit::exit_code(run())
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config, insecure } => {
            let config = AggregatorConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new()?;
            let stop = {
                let _entered = runtime.enter();
                agent_common::stop_signal::stop_signal().context("catching SIGINT and SIGTERM")?
            };
            runtime.block_on(sci_aggregator::server::serve(config, insecure, stop))?;
            Ok(())
        }
        Command::RemoteWrite { config, from, to } => {
            let cfg = AggregatorConfig::load(&config)?;
            let rw = cfg
                .remote_write
                .clone()
                .with_context(|| format!("{}: no [remote_write] section", config.display()))?;
            let state = sci_aggregator::export::remote_write::state_path(
                &rw,
                &cfg.database,
                cfg.postgres_url.is_some(),
            )
            .map_err(|m| anyhow::anyhow!("{}: {m}", config.display()))?;
            let from = from.as_deref().map(parse_time).transpose()?;
            let to = match to.as_deref().map(parse_time).transpose()? {
                Some(to) => to,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
                    .saturating_sub(rw.delay.as_secs()),
            };
            let store: std::sync::Arc<dyn sci_aggregator::store::Store> =
                std::sync::Arc::from(cfg.open_store()?);
            tokio::runtime::Runtime::new()?.block_on(async move {
                let stats = std::sync::Arc::default();
                let mut writer = sci_aggregator::export::remote_write::RemoteWriter::open(
                    rw,
                    state,
                    store,
                    cfg.weights.clone(),
                    std::sync::Arc::clone(&stats),
                    from,
                )?;
                writer.run(Some(to)).await?;
                let mut out = Vec::new();
                stats.families(&mut out);
                eprintln!(
                    "remote-write: position {} (unix s)\n{}",
                    writer.position_s(),
                    agent_common::prometheus_text::render(out)
                );
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(())
        }
        Command::MigrateStore { from, to } => {
            let path = PathBuf::from(from.strip_prefix("sqlite:").unwrap_or(&from));
            if !path.is_file() {
                bail!("--from {from}: no SQLite file at {}", path.display());
            }
            if !(to.starts_with("postgres://")
                || to.starts_with("postgresql://")
                || to.contains('='))
            {
                bail!("--to {to}: give a postgres:// URL or a libpq key=value string");
            }
            let layout = sci_aggregator::store::sqlite::SqliteStore::stored_layout(&path)?
                .with_context(|| format!("--from {from}: the file records no rollup steps (not a sci-aggregator store)"))?;
            let target = sci_aggregator::store::postgres::PostgresStore::open(
                &to,
                layout,
                2,
                std::time::Duration::from_secs(300),
            )
            .with_context(|| {
                format!(
                    "--to: opening the PostgreSQL store with the file's steps ({} s, {} s)",
                    layout.step_s, layout.host_step_s
                )
            })?;
            let report = sci_aggregator::store::migrate::copy_sqlite_to_postgres(&path, &target)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!(
                "migrate-store: copied {} rows; run VACUUM (ANALYZE) and CHECKPOINT on the database before serving from it",
                report.rows.values().sum::<u64>()
            );
            Ok(())
        }
        Command::ChangeRollupSteps {
            db,
            rollup_step,
            host_rollup_step,
            drop_older,
        } => change_rollup_steps(&db, rollup_step, host_rollup_step, drop_older),
        Command::Report {
            config,
            db,
            from,
            to,
            period,
            datacenter,
            format,
        } => {
            let cfg = config_with_db(config.as_deref(), db)?;
            let to = match to {
                Some(t) => parse_time(&t)?,
                None => {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_secs()
                        + 1
                }
            };
            let from = match from {
                Some(t) => parse_time(&t)?,
                None => 0,
            };
            let period_s = period.unwrap_or(cfg.period).as_secs().max(1);
            let max_s = i64::MAX as u64 / 1_000_000_000;
            if from > max_s || to > max_s {
                bail!("--from and --to must be before unix second {max_s}");
            }
            let store = cfg.open_store()?;
            let from = if from == 0 {
                store
                    .extent()?
                    .map(|(first, _)| first / period_s * period_s)
                    .unwrap_or(0)
            } else {
                from
            };
            let range = sci_aggregator::store::Range::new(from, to, period_s, &store.layout())
                .map_err(anyhow::Error::msg)?;
            let mut input = sci_aggregator::sci::EvaluationInput::read(store.as_ref(), &range)?;
            if let Some(dc) = &datacenter {
                input.only_datacenter(dc).map_err(anyhow::Error::msg)?;
            }
            let evaluation = sci_aggregator::sci::evaluate(
                &input,
                &range,
                range.host_range(&store.layout()),
                &cfg.weights,
                cfg.min_coverage,
            );
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&evaluation)?),
                "md" => {
                    let (found, notes) = sci_aggregator::views::hotspots(
                        store.as_ref(),
                        &range,
                        &evaluation,
                        &sci_aggregator::hotspots::HotspotOptions {
                            min_samples: cfg.min_profile_samples,
                            ..Default::default()
                        },
                        datacenter.as_deref(),
                    )?;
                    print!(
                        "{}{}",
                        sci_aggregator::report::markdown(&evaluation),
                        sci_aggregator::report::hotspots_markdown(&found, &notes)
                    );
                }
                "text" => print!("{}", sci_aggregator::report::console(&evaluation)),
                "html" => print!(
                    "{}",
                    sci_aggregator::dashboard::render_evaluation_report_html(
                        &evaluation,
                        &agent_common::time_text::now_rfc3339().to_string()
                    )
                ),
                other => bail!("--format {other}: use json, md, html or text"),
            }
            Ok(())
        }
        Command::Compare {
            config,
            db,
            baseline,
            candidate,
            scope,
            datacenter,
            service,
            host,
            period,
            profile_scenario,
            profile_service,
            target_utilisation,
            seed,
            format,
        } => {
            use sci_aggregator::review;
            let cfg = config_with_db(config.as_deref(), db)?;
            if !(target_utilisation > 0.0 && target_utilisation <= 1.0) {
                bail!("--target-utilisation {target_utilisation}: give a share in (0, 1]");
            }
            let scope: review::compare::Scope = scope.parse().map_err(anyhow::Error::msg)?;
            let period_s = period.unwrap_or(cfg.period).as_secs().max(1);
            let store = cfg.open_store()?;
            let layout = store.layout();
            let range = |text: &str, what: &str| -> Result<sci_aggregator::store::Range> {
                let (from, to) = parse_range(text, what)?;
                sci_aggregator::store::Range::new(from, to, period_s, &layout)
                    .map_err(anyhow::Error::msg)
            };
            let mut bootstrap = review::stats::Bootstrap::default();
            if let Some(seed) = seed {
                bootstrap.seed = seed;
            }
            let request = review::ReviewRequest {
                baseline: range(&baseline, "baseline")?,
                candidate: range(&candidate, "candidate")?,
                compare: review::compare::CompareOptions {
                    scope,
                    filters: review::compare::Filters {
                        datacenter,
                        service,
                        host,
                    },
                    bootstrap,
                    weights: cfg.weights.clone(),
                    min_coverage: cfg.min_coverage,
                },
                profile_service,
                profile_scenario,
                min_profile_samples: cfg.min_profile_samples,
                consolidation: review::consolidation::ConsolidationOptions {
                    target_utilisation,
                    ..Default::default()
                },
            };
            let result = review::review(store.as_ref(), &request)?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&result)?),
                "md" => print!("{}", review::report::markdown(&result)),
                "html" => print!(
                    "{}",
                    review::report::html(
                        &result,
                        &agent_common::time_text::now_rfc3339()
                            .to_string()
                    )
                ),
                "svg" => match &result.diff_profile {
                    Some(p) => print!("{}", p.flamegraph_svg()?),
                    None => bail!("no profiled service for the differential flame graph: give --profile-service"),
                },
                other => bail!("--format {other}: use md, html, json or svg"),
            }
            Ok(())
        }
    }
}

/// `sci-aggregator change-rollup-steps`.
fn change_rollup_steps(
    db: &str,
    rollup_step: Option<std::time::Duration>,
    host_rollup_step: Option<std::time::Duration>,
    drop_older: bool,
) -> Result<()> {
    use sci_aggregator::store::postgres::PostgresStore;
    use sci_aggregator::store::restep::change_rollup_steps;
    use sci_aggregator::store::sqlite::SqliteStore;
    use sci_aggregator::store::RollupLayout;
    let seconds = |d: Option<std::time::Duration>, flag: &str| -> Result<Option<u64>> {
        match d {
            Some(d) if d.subsec_nanos() != 0 || d.as_secs() == 0 => {
                bail!("--{flag} {d:?}: give a whole number of seconds above zero")
            }
            d => Ok(d.map(|d| d.as_secs())),
        }
    };
    let (step_s, host_step_s) = (
        seconds(rollup_step, "rollup-step")?,
        seconds(host_rollup_step, "host-rollup-step")?,
    );
    if step_s.is_none() && host_step_s.is_none() {
        bail!("give --rollup-step and/or --host-rollup-step");
    }
    let new_layout = |old: RollupLayout| RollupLayout {
        step_s: step_s.unwrap_or(old.step_s),
        host_step_s: host_step_s.unwrap_or(old.host_step_s),
    };
    let postgres =
        db.starts_with("postgres://") || db.starts_with("postgresql://") || db.contains('=');
    let report = if postgres {
        // An aggregator still connected would go on writing the old steps:
        // wait a little for sessions that are closing, then refuse.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let layout = loop {
            let (layout, sessions) = PostgresStore::stored_layout(db)?;
            if sessions.is_empty() {
                break layout;
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "--db: {} other session(s) are connected to the database ({}): stop every aggregator using it first",
                    sessions.len(),
                    sessions.join("; ")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let old = layout
            .context("--db: the database records no rollup steps (not a sci-aggregator store)")?;
        let store = PostgresStore::open(db, old, 1, std::time::Duration::from_secs(3600))?;
        change_rollup_steps(&store, new_layout(old), drop_older)?
    } else {
        let path = PathBuf::from(db.strip_prefix("sqlite:").unwrap_or(db));
        if !path.is_file() {
            bail!("--db {db}: no SQLite file at {}", path.display());
        }
        if let Some(pid) = SqliteStore::held_by(&path)? {
            bail!("--db {db}: process {pid} has the database open (an aggregator?): stop it first");
        }
        let old = SqliteStore::stored_layout(&path)?.with_context(|| {
            format!("--db {db}: the file records no rollup steps (not a sci-aggregator store)")
        })?;
        let store = SqliteStore::open_with(&path, old, std::time::Duration::from_secs(3600))?;
        change_rollup_steps(&store, new_layout(old), drop_older)?
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    let dropped: u64 = report.tables.values().map(|t| t.rows_dropped).sum();
    eprintln!(
        "change-rollup-steps: rollup_step {} s -> {} s, host_rollup_step {} s -> {} s; {} raw windows replayed; {} rows dropped{}. \
         Set rollup_step = \"{}s\" and host_rollup_step = \"{}s\" in aggregator.toml before starting the aggregator.",
        report.from.step_s,
        report.to.step_s,
        report.from.host_step_s,
        report.to.host_step_s,
        report.raw_windows_replayed,
        dropped,
        report
            .dropped_buckets_s
            .map(|(a, b)| format!(" (buckets from unix second {a} to {b})"))
            .unwrap_or_default(),
        report.to.step_s,
        report.to.host_step_s,
    );
    Ok(())
}
