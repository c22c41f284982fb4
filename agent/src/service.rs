//! `sci-agent run`: the long-running agent.
//!
//! One OS thread measures: closing a window moves that thread across every
//! CPU (see `sources::sched::ebpf`), which must not happen to a tokio worker.
//! Windows start on multiples of the interval (wall clock), so windows of
//! different hosts line up. The tokio runtime serves the ingest endpoint and
//! `/metrics`, and hands every window to the sink: the aggregator stream
//! (through the on-disk spool) or, without an aggregator, stdout as JSON lines.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sci_proto::v1;
use tokio::sync::{mpsc, Notify};

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::sinks::grpc::{connect, run_forwarder, ForwarderStats};
use crate::sinks::metrics::{serve_metrics, MetricsRegistry};
use crate::sinks::spool::Spool;
use crate::sources::ingest::{IngestCounters, IngestEndpoint};
use crate::window::WindowReport;

/// Time until the next multiple of `interval` since the Unix epoch.
pub fn until_next_boundary(interval: Duration, now: SystemTime) -> Duration {
    let interval_ns = interval.as_nanos().max(1);
    let now_ns = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let next = (now_ns / interval_ns + 1) * interval_ns;
    Duration::from_nanos((next - now_ns) as u64)
}

/// How the measurement thread sets its pipeline up.
struct MeasurementSetup {
    config: AgentConfig,
    options: PipelineOptions,
    counters: Arc<IngestCounters>,
    /// Where each window's energy-source warnings are counted.
    metrics: Arc<MetricsRegistry>,
    /// (agent_instance, next_seq) from the spool, when there is one.
    resume: Option<(String, u64)>,
    /// Where the previous run's last spooled window ended, when known.
    previous_end_ns: Option<u64>,
}

/// Says how long nothing was measured between the previous run's last
/// window and this run's first (the agent was not running), in the log and
/// in `sci_agent_unmeasured_seconds_total`.
fn report_gap(previous_end_ns: Option<u64>, first: &WindowReport, metrics: &MetricsRegistry) {
    let Some(previous_end_ns) = previous_end_ns else {
        return;
    };
    if first.start_unix_ns < previous_end_ns {
        tracing::warn!(
            "this run's first window starts {:.3} s before the previous run's last one ended (clock stepped back)",
            (previous_end_ns - first.start_unix_ns) as f64 / 1e9
        );
        return;
    }
    let gap_s = (first.start_unix_ns - previous_end_ns) as f64 / 1e9;
    metrics.observe_unmeasured(gap_s);
    tracing::warn!(
        "not measured: {gap_s:.3} s between the previous run's last window (ended at {previous_end_ns} ns) and this run's first (from {} ns): the agent was not running",
        first.start_unix_ns
    );
}

/// Opens the pipeline on its own thread (the profiler's symboliser is not
/// `Send`, and closing windows moves the thread across CPUs) and runs the
/// measurement loop until `stop` is set; windows go to `windows`. Returns
/// once the pipeline is open, or with the reason it could not be.
async fn spawn_measurement(
    setup: MeasurementSetup,
    stop: Arc<AtomicBool>,
    windows: mpsc::Sender<WindowReport>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), AgentError>>();
    let interval = setup.config.agent.interval;
    let handle = std::thread::Builder::new()
        .name("sci-measure".into())
        .spawn(move || {
            let mut pipeline = match Pipeline::open(&setup.config, &setup.options) {
                Ok((pipeline, fallback)) => {
                    if let Some(reason) = fallback {
                        tracing::warn!("{reason}");
                    }
                    pipeline
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            pipeline.set_ingest(setup.counters);
            if let Some((instance, next_seq)) = setup.resume {
                pipeline.resume(instance, next_seq);
            }
            let _ = ready_tx.send(Ok(()));
            let mut first = true;
            loop {
                let mut wait = until_next_boundary(interval, SystemTime::now());
                // Sleep in short steps so a stop request is seen quickly.
                while wait > Duration::ZERO && !stop.load(Ordering::Relaxed) {
                    let step = wait.min(Duration::from_millis(200));
                    std::thread::sleep(step);
                    wait = wait.saturating_sub(step);
                }
                // On stop this closes the partial window up to the stop instant:
                // it is measured, spooled and sent like any other.
                let stopping = stop.load(Ordering::Relaxed);
                match pipeline.next_window() {
                    Ok(window) => {
                        if first {
                            first = false;
                            report_gap(setup.previous_end_ns, &window, &setup.metrics);
                        }
                        setup
                            .metrics
                            .observe_energy_warnings(pipeline.last_energy_warnings());
                        if let Some(status) = pipeline.node_labels_status() {
                            setup.metrics.observe_node_labels(status);
                        }
                        if windows.blocking_send(window).is_err() {
                            tracing::error!("window not spooled: the agent's main loop has ended");
                            return;
                        }
                    }
                    Err(e) => tracing::error!("window not measured: {e}"),
                }
                if stopping {
                    return;
                }
            }
        })
        .map_err(|e| AgentError::io("spawning the measurement thread", e))?;
    match ready_rx.await {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(AgentError::Ebpf(
            "the measurement thread stopped while opening".into(),
        )),
    }
}

/// What `run` needs beyond agent.toml.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub pipeline: PipelineOptions,
    /// Allow a plaintext connection to the aggregator (warned about).
    pub insecure: bool,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    // Refuse bad settings before anything starts.
    config.validate()?;
    config.energy.validate()?;
    let counters = IngestCounters::new();
    let _ingest = IngestEndpoint::start(&config.ingest, counters.clone()).await?;

    let metrics =
        Arc::new(MetricsRegistry::new().with_service_series(config.agent.max_service_series));
    if let Some(listen) = &config.agent.metrics_listen {
        let addr = listen.parse().map_err(|e| AgentError::Config {
            path: "agent.metrics_listen".into(),
            message: format!("{listen:?} is not an address: {e}"),
        })?;
        let registry = Arc::clone(&metrics);
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(addr, registry).await {
                tracing::error!("{e}");
            }
        });
    }

    let otlp = match &config.otlp {
        Some(cfg) => {
            let (sink, stats) = crate::sinks::otlp::OtlpSink::start(cfg)?;
            metrics.set_otlp(stats);
            tracing::info!("otlp: every window to {}", cfg.endpoint);
            Some(sink)
        }
        None => None,
    };

    // With an aggregator, windows go through the spool; the agent run keeps
    // the spool's identity and numbering across restarts.
    let forwarding = match &config.aggregator.url {
        Some(_) => {
            let mut spool = Spool::open(
                &config.agent.spool_dir,
                config.aggregator.spool_max_bytes,
                &crate::window::new_agent_instance(),
            )?;
            spool.set_window_limits(
                config.aggregator.batch_max_bytes,
                crate::sinks::spool::DEFAULT_MAX_MERGED_SPAN,
            );
            metrics.set_delivery(spool.delivery_stats(), config.aggregator.behind_after);
            let resume = (
                spool.agent_instance().to_string(),
                spool.next_seq(),
                spool.measured_through_ns(),
            );
            if !spool.is_empty() {
                tracing::info!("spool: {} windows from an earlier run to send", spool.len());
            }
            let spool = Arc::new(Mutex::new(spool));
            let notify = Arc::new(Notify::new());
            if config
                .aggregator
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("http://"))
                && options.insecure
            {
                tracing::warn!("--insecure: windows go to the aggregator unencrypted");
            }
            // Refuse a bad aggregator setting now, not in the background.
            connect(&config.aggregator, options.insecure).await?;
            let task = tokio::spawn(run_forwarder(
                config.aggregator.clone(),
                options.insecure,
                Arc::clone(&spool),
                Arc::clone(&notify),
                Arc::new(ForwarderStats::default()),
            ));
            Some((spool, notify, task, resume))
        }
        None => None,
    };

    let (tx, mut rx) = mpsc::channel::<WindowReport>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let setup = MeasurementSetup {
        config: config.clone(),
        options: options.pipeline.clone(),
        counters,
        metrics: Arc::clone(&metrics),
        resume: forwarding
            .as_ref()
            .map(|(_, _, _, (instance, seq, _))| (instance.clone(), *seq)),
        previous_end_ns: forwarding.as_ref().and_then(|(_, _, _, (_, _, end))| *end),
    };
    let measurement = spawn_measurement(setup, Arc::clone(&stop), tx).await?;
    tracing::info!(
        "measuring every {}",
        agent_common::time_text::format_duration(config.agent.interval)
    );

    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                // The measurement thread closes the partial window and ends,
                // which closes the channel: everything it measured comes through.
                stopping = true;
                stop.store(true, Ordering::Relaxed);
            }
            window = rx.recv() => {
                let Some(window) = window else { break };
                metrics.observe(&window);
                if let Some(otlp) = &otlp {
                    otlp.offer(&window);
                }
                match &forwarding {
                    Some((spool, notify, _, _)) => {
                        let record = v1::WindowReport::from(&window);
                        let spool = Arc::clone(spool);
                        let appended = tokio::task::spawn_blocking(move || {
                            spool.lock().unwrap_or_else(|p| p.into_inner()).append(&record)
                        })
                        .await;
                        match appended {
                            Ok(Ok(_)) => notify.notify_one(),
                            Ok(Err(e)) => tracing::error!("window {} not spooled: {e}", window.seq),
                            Err(e) => tracing::error!("window {} not spooled: {e}", window.seq),
                        }
                    }
                    None => match serde_json::to_string(&window) {
                        Ok(line) => println!("{line}"),
                        Err(e) => tracing::error!("window {}: {e}", window.seq),
                    },
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || measurement.join()).await;
    if let Some(otlp) = &otlp {
        otlp.drain(config.aggregator.shutdown_grace).await;
    }
    if let Some((spool, _, task, _)) = forwarding {
        deliver_before_exit(&spool, config.aggregator.shutdown_grace).await;
        task.abort();
    }
    Ok(())
}

/// Lets the forwarder deliver what is spooled for at most `grace`; what is
/// left stays in the spool for the next run, and the log says how much.
async fn deliver_before_exit(spool: &Mutex<Spool>, grace: Duration) {
    let pending = || spool.lock().unwrap_or_else(|p| p.into_inner()).len();
    let deadline = tokio::time::Instant::now() + grace;
    while pending() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match pending() {
        0 => tracing::info!("stopped: every window delivered"),
        n => tracing::warn!(
            "stopped with {n} windows not yet acknowledged after {}: they stay in the spool and are sent by the next run",
            agent_common::time_text::format_duration(grace)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_on_interval_boundaries() {
        let at = UNIX_EPOCH + Duration::from_millis(10_250);
        assert_eq!(
            until_next_boundary(Duration::from_secs(1), at),
            Duration::from_millis(750)
        );
        assert_eq!(
            until_next_boundary(Duration::from_secs(10), at),
            Duration::from_millis(9_750)
        );
        let exact = UNIX_EPOCH + Duration::from_secs(20);
        assert_eq!(
            until_next_boundary(Duration::from_secs(10), exact),
            Duration::from_secs(10)
        );
    }
}
