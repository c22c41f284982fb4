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
            while !stop.load(Ordering::Relaxed) {
                let mut wait = until_next_boundary(interval, SystemTime::now());
                // Sleep in short steps so a stop request is seen quickly.
                while wait > Duration::ZERO && !stop.load(Ordering::Relaxed) {
                    let step = wait.min(Duration::from_millis(200));
                    std::thread::sleep(step);
                    wait = wait.saturating_sub(step);
                }
                match pipeline.next_window() {
                    Ok(window) => {
                        setup
                            .metrics
                            .observe_energy_warnings(pipeline.last_energy_warnings());
                        if windows.blocking_send(window).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::error!("window not measured: {e}"),
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

    let metrics = Arc::new(MetricsRegistry::new());
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
            let resume = (spool.agent_instance().to_string(), spool.next_seq());
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
        resume: forwarding.as_ref().map(|(_, _, _, resume)| resume.clone()),
    };
    let measurement = spawn_measurement(setup, Arc::clone(&stop), tx).await?;
    tracing::info!(
        "measuring every {}",
        agent_common::time_text::format_duration(config.agent.interval)
    );

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            window = rx.recv() => {
                let Some(window) = window else { break };
                metrics.observe(&window);
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
    drop(rx);
    if let Some((_, _, task, _)) = forwarding {
        task.abort();
    }
    let _ = tokio::task::spawn_blocking(move || measurement.join()).await;
    Ok(())
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
