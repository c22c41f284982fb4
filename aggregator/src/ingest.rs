//! The gRPC ingest service: authenticates the agent, validates each window,
//! commits the valid ones of a batch in one transaction, and only then
//! answers with a cumulative ack (refused windows listed with their reason).
//!
//! Identity: with mutual TLS, the client certificate's common name (a
//! revoked name is refused); with tokens, the host the bearer token belongs
//! to; both, they must agree. A batch for another host than the identity is
//! `PermissionDenied`; no or unknown credentials are `Unauthenticated`.
//! Without tokens and client CA the server only runs with `--insecure`, and
//! then trusts the host a batch names.
use agent_common::prometheus_text::Family;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sci_proto::v1;
use sci_proto::v1::ingest_server::Ingest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::AggregatorConfig;
use crate::error::AggregatorError;
use crate::store::{CommitOutcome, Store};
use crate::validate::{
    check_clock, check_names, clip, code_of, shorten_stacks, trim_stacks, validate_window,
};

/// Ingest counters, shown on /metrics.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub windows_accepted: u64,
    pub windows_duplicate: u64,
    /// Windows refused because their key held different content (also in `refused`).
    pub windows_conflict: u64,
    /// Sums of the windows stored since start (Prometheus counters).
    pub operational_g: f64,
    pub embodied_g: f64,
    pub energy_j: f64,
    pub transactions: BTreeMap<String, u64>,
    pub batches: u64,
    /// (host, kind) -> windows refused.
    pub refused: BTreeMap<(String, String), u64>,
    /// kind -> streams refused before any window (unauthenticated, permission_denied, ...).
    pub streams_refused: BTreeMap<String, u64>,
    /// host -> unix seconds of the last window end accepted.
    pub last_seen: BTreeMap<String, u64>,
    /// Streams ended by a message that could not be decoded.
    pub decode_errors: u64,
    /// HTTP requests refused for want of a valid bearer token.
    pub http_unauthorized: u64,
    /// HTTP requests refused for headers over limits.max_metadata_bytes.
    pub http_headers_too_large: u64,
    /// Expensive HTTP queries refused (503): `busy` (no
    /// max_concurrent_queries permit) or `timeout` (past query_timeout).
    pub http_queries_refused: BTreeMap<String, u64>,
    /// Profile stacks shortened to the store's bounds (long frames, deep stacks).
    pub stacks_shortened: u64,
    /// Profile stacks trimmed from windows over max_stacks_per_window.
    pub stacks_trimmed: u64,
    /// Plan and supply requests refused for a wrong parameter, per endpoint (#27).
    pub plan_requests_refused: BTreeMap<String, u64>,
    /// Plans stored since start.
    pub plans_stored: u64,
    /// Rows the hourly retention removed since start, per kind.
    pub retention_deleted: BTreeMap<String, u64>,
    /// KEDA scaler calls refused, per reason (unauthenticated, busy, ...).
    pub keda_refused: BTreeMap<String, u64>,
    /// The listeners' connection limiters (gRPC, HTTP).
    pub limiters: Vec<Arc<crate::limits::ConnectionLimiter>>,
}

impl IngestCounters {
    /// Prometheus lines of the delivery contract and the listeners' limits.
    pub fn limit_families(&self, out: &mut Vec<Family>) {
        use std::sync::atomic::Ordering;
        out.push(
            Family::counter(
                "sci_ingest_conflicts_total",
                "Windows refused because a different window with the same (host, instance, seq) is stored.",
            )
            .single(self.windows_conflict as f64),
        );
        out.push(
            Family::counter(
                "sci_http_unauthorized_total",
                "HTTP requests refused without a valid bearer token.",
            )
            .single(self.http_unauthorized as f64),
        );
        out.push(
            Family::counter(
                "sci_http_headers_too_large_total",
                "HTTP requests refused (431) for headers over limits.max_metadata_bytes.",
            )
            .single(self.http_headers_too_large as f64),
        );
        let mut queries = Family::counter(
            "sci_http_queries_refused_total",
            "Expensive HTTP queries answered 503: busy (no max_concurrent_queries permit) or timeout (past query_timeout).",
        );
        for (reason, n) in &self.http_queries_refused {
            queries.push(&[("reason", reason)], *n as f64);
        }
        out.push(queries);
        out.push(
            Family::counter(
                "sci_ingest_stacks_shortened_total",
                "Profile stacks shortened to the store's key bounds (frames over 256 bytes, stacks over 2,048 bytes).",
            )
            .single(self.stacks_shortened as f64),
        );
        out.push(
            Family::counter(
                "sci_ingest_stacks_trimmed_total",
                "Profile stacks trimmed (lowest energy first, energy kept as profile_trimmed_energy_j) from windows over max_stacks_per_window.",
            )
            .single(self.stacks_trimmed as f64),
        );
        let mut open = Family::gauge("sci_connections_open", "Connections open per listener.");
        let mut refused = Family::counter(
            "sci_connections_refused_total",
            "Connections closed at accept, per listener and limit, and closed idle.",
        );
        for l in &self.limiters {
            open.push(&[("listener", l.listener)], l.open() as f64);
            for (limit, n) in [
                ("max_connections", &l.refused_total_limit),
                ("max_connections_per_address", &l.refused_address_limit),
                ("idle_timeout", &l.closed_idle),
                ("auth_timeout", &l.closed_unauthenticated),
                (
                    "max_unauthenticated_connections",
                    &l.evicted_unauthenticated,
                ),
            ] {
                refused.push(
                    &[("listener", l.listener), ("limit", limit)],
                    n.load(Ordering::Relaxed) as f64,
                );
            }
        }
        let mut pending = Family::gauge(
            "sci_connections_unauthenticated",
            "Connections open per listener that have not presented valid credentials yet.",
        );
        for l in &self.limiters {
            pending.push(&[("listener", l.listener)], l.unauthenticated() as f64);
        }
        out.push(open);
        out.push(pending);
        out.push(refused);
    }
}

/// Commits `windows` in one transaction; when the store refuses the data
/// (not when it is down), commits them one by one, so that only a window the
/// store refuses on its own is refused (`Err` with the store's reason) and
/// the others are stored. Any other error is the store's: the caller
/// answers UNAVAILABLE and the agent retries.
pub fn commit_isolating(
    store: &dyn Store,
    windows: &[v1::WindowReport],
) -> Result<Vec<Result<CommitOutcome, String>>, AggregatorError> {
    match store.commit(windows) {
        Ok(outcomes) => Ok(outcomes.into_iter().map(Ok).collect()),
        Err(e) if e.is_rejected() => {
            tracing::warn!(
                "store: a batch of {} windows was refused ({e}); committing them one by one",
                windows.len()
            );
            let mut out = Vec::with_capacity(windows.len());
            for w in windows {
                match store.commit(std::slice::from_ref(w)) {
                    Ok(outcome) => out.push(Ok(outcome
                        .first()
                        .copied()
                        .unwrap_or(CommitOutcome::Duplicate))),
                    Err(e) if e.is_rejected() => out.push(Err(e.to_string())),
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// The store, shared by ingest and queries (it has its own connections).
pub use crate::store::SharedStore;

pub struct IngestService {
    store: SharedStore,
    config: Arc<AggregatorConfig>,
    counters: Arc<Mutex<IngestCounters>>,
    auth: crate::auth::GrpcAuth,
    /// The gRPC listener's limiter: told which connections authenticated.
    limiter: Option<Arc<crate::limits::ConnectionLimiter>>,
    /// True once the server is stopping: no new stream or batch is taken.
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IngestService {
    pub fn new(
        store: SharedStore,
        config: Arc<AggregatorConfig>,
        counters: Arc<Mutex<IngestCounters>>,
    ) -> Self {
        let auth = crate::auth::GrpcAuth::new(&config);
        IngestService {
            store,
            config,
            counters,
            auth,
            limiter: None,
            stopping: None,
        }
    }

    /// Stops taking streams and batches once `stopping` turns true: the
    /// batch being committed is committed and acknowledged, then the
    /// stream ends with UNAVAILABLE (the agent resends the rest elsewhere
    /// or later).
    pub fn with_stop(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Tells `limiter` of each connection that presents valid credentials.
    pub fn with_limiter(mut self, limiter: Arc<crate::limits::ConnectionLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn refuse_stream(&self, kind: &str, status: Status) -> Status {
        *lock(&self.counters)
            .streams_refused
            .entry(kind.to_string())
            .or_default() += 1;
        tracing::warn!("ingest stream refused ({kind}): {}", status.message());
        status
    }

    /// The host this stream may send for; None means "trust the batch" (insecure, open).
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        self.auth
            .identify(request)
            .map_err(|r| self.refuse_stream(r.kind, r.status))
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<v1::Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<v1::AgentBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        if self.stopping.as_ref().is_some_and(|s| *s.borrow()) {
            return Err(Status::unavailable("the aggregator is stopping"));
        }
        let identity = self.authenticate(&request)?;
        if let (Some(limiter), Some(peer)) = (&self.limiter, request.remote_addr()) {
            limiter.mark_authenticated(peer);
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<v1::Ack, Status>>(8);
        let store = Arc::clone(&self.store);
        let config = Arc::clone(&self.config);
        let counters = Arc::clone(&self.counters);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let next = match stopping.as_mut() {
                    Some(stop) => tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => None,
                        next = inbound.message() => Some(next),
                    },
                    None => Some(inbound.message().await),
                };
                let Some(next) = next else {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "the aggregator is stopping: send the rest again",
                        )))
                        .await;
                    return;
                };
                let batch = match next {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return,
                    Err(status) => {
                        lock(&counters).decode_errors += 1;
                        tracing::warn!("ingest stream ended: {status}");
                        // Say why, so the agent does not take the end for success.
                        let answer = if status.code() == tonic::Code::OutOfRange {
                            Status::resource_exhausted(format!(
                                "batch over the aggregator's message limit ({}): send smaller batches",
                                status.message()
                            ))
                        } else {
                            Status::invalid_argument(format!(
                                "undecodable batch: {}",
                                status.message()
                            ))
                        };
                        let _ = tx.send(Err(answer)).await;
                        return;
                    }
                };
                if let Err(r) = check_names(&batch.host, &batch.agent_instance) {
                    *lock(&counters)
                        .streams_refused
                        .entry(r.kind.into())
                        .or_default() += 1;
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "{}: {}",
                            r.kind, r.reason
                        ))))
                        .await;
                    return;
                }
                if let Some(id) = &identity {
                    if &batch.host != id {
                        *lock(&counters)
                            .streams_refused
                            .entry("permission_denied".into())
                            .or_default() += 1;
                        let _ = tx
                            .send(Err(Status::permission_denied(format!(
                                "agent {} may not send windows of host {}",
                                clip(id),
                                clip(&batch.host)
                            ))))
                            .await;
                        return;
                    }
                }
                let now = now_unix_ns();
                let clock = check_clock(batch.sent_unix_ns, &config, now);
                let mut accepted = Vec::new();
                let mut refused = Vec::new();
                let mut stacks_shortened = 0;
                let mut stacks_trimmed = 0;
                for mut w in batch.windows {
                    let checked = clock.clone().and_then(|()| {
                        validate_window(&w, &batch.host, &batch.agent_instance, &config, now)
                    });
                    match checked {
                        Ok(()) => {
                            stacks_trimmed += trim_stacks(&mut w, config.max_stacks_per_window);
                            stacks_shortened += shorten_stacks(&mut w);
                            accepted.push(w)
                        }
                        Err(r) => {
                            *lock(&counters)
                                .refused
                                .entry((batch.host.clone(), r.kind.to_string()))
                                .or_default() += 1;
                            refused.push(v1::Refusal {
                                seq: w.seq,
                                reason: format!("{}: {}", r.kind, r.reason),
                                code: r.code() as i32,
                            });
                        }
                    }
                }
                let acked_through = accepted
                    .iter()
                    .map(|w| w.seq)
                    .chain(refused.iter().map(|r| r.seq))
                    .max();
                let store = Arc::clone(&store);
                let committed = tokio::task::spawn_blocking(move || {
                    commit_isolating(store.as_ref(), &accepted).map(|outcomes| (outcomes, accepted))
                })
                .await;
                let (outcomes, accepted) = match committed {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => {
                        tracing::error!("store: {e}");
                        let _ = tx
                            .send(Err(Status::unavailable(format!("store: {e}"))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("commit task: {e}"))))
                            .await;
                        return;
                    }
                };
                let mut stored = 0u64;
                let mut duplicates = 0u64;
                let mut store_refused = 0u64;
                let mut overlaps = 0u64;
                let mut last_end_s = None;
                let mut stored_sums = (0.0, 0.0, 0.0);
                let mut stored_transactions: BTreeMap<String, u64> = BTreeMap::new();
                for (w, outcome) in accepted.iter().zip(&outcomes) {
                    match outcome {
                        Err(reason) => {
                            store_refused += 1;
                            tracing::warn!(
                                "host {} instance {} seq {}: the store refused the window ({reason}); refused",
                                clip(&w.host),
                                clip(&w.agent_instance),
                                w.seq
                            );
                            refused.push(v1::Refusal {
                                seq: w.seq,
                                reason: format!("store_refused: {}", clip(reason)),
                                code: code_of("store_refused") as i32,
                            });
                        }
                        Ok(CommitOutcome::Stored) => {
                            stored += 1;
                            last_end_s = last_end_s.max(Some(w.end_unix_ns / 1_000_000_000));
                            stored_sums.0 += w.host_carbon_g;
                            stored_sums.1 += w.host_embodied_g;
                            stored_sums.2 += w.host_energy_j;
                            for s in &w.scenarios {
                                let t = stored_transactions.entry(s.scenario.clone()).or_default();
                                *t = t.saturating_add(s.transactions);
                            }
                        }
                        Ok(CommitOutcome::Duplicate) => duplicates += 1,
                        Ok(CommitOutcome::Overlap) => {
                            overlaps += 1;
                            tracing::warn!(
                                "host {} instance {} seq {}: overlaps windows of its host already stored; refused",
                                clip(&w.host),
                                clip(&w.agent_instance),
                                w.seq
                            );
                            refused.push(v1::Refusal {
                                seq: w.seq,
                                reason: format!(
                                    "overlap: window [{}, {}) s would make host {} cover more than the whole of a {} s bucket (its time overlaps windows already stored)",
                                    w.start_unix_ns / 1_000_000_000,
                                    w.end_unix_ns.div_ceil(1_000_000_000),
                                    clip(&w.host),
                                    config.host_rollup_step.as_secs()
                                ),
                                code: code_of("overlap") as i32,
                            });
                        }
                        Ok(CommitOutcome::Conflict) => {
                            tracing::warn!(
                                "host {} instance {} seq {}: a different window with this key is stored; refused",
                                clip(&w.host),
                                clip(&w.agent_instance),
                                w.seq
                            );
                            refused.push(v1::Refusal {
                                seq: w.seq,
                                reason: format!(
                                    "seq_conflict: a different window of instance {} with seq {} is stored",
                                    clip(&w.agent_instance),
                                    w.seq
                                ),
                                code: code_of("seq_conflict") as i32,
                            });
                        }
                    }
                }
                let conflicts = outcomes
                    .iter()
                    .filter(|o| **o == Ok(CommitOutcome::Conflict))
                    .count() as u64;
                refused.sort_by_key(|r| r.seq);
                {
                    let mut c = lock(&counters);
                    c.batches += 1;
                    c.windows_accepted += stored;
                    c.windows_duplicate += duplicates;
                    c.windows_conflict += conflicts;
                    c.operational_g += stored_sums.0;
                    c.embodied_g += stored_sums.1;
                    c.energy_j += stored_sums.2;
                    for (scenario, n) in stored_transactions {
                        let t = c.transactions.entry(scenario).or_default();
                        *t = t.saturating_add(n);
                    }
                    c.stacks_shortened += stacks_shortened;
                    c.stacks_trimmed += stacks_trimmed;
                    if store_refused > 0 {
                        *c.refused
                            .entry((batch.host.clone(), "store_refused".into()))
                            .or_default() += store_refused;
                    }
                    if overlaps > 0 {
                        *c.refused
                            .entry((batch.host.clone(), "overlap".into()))
                            .or_default() += overlaps;
                    }
                    if conflicts > 0 {
                        *c.refused
                            .entry((batch.host.clone(), "seq_conflict".into()))
                            .or_default() += conflicts;
                    }
                    if let Some(end) = last_end_s {
                        let seen = c.last_seen.entry(batch.host.clone()).or_default();
                        *seen = (*seen).max(end);
                    }
                }
                let Some(acked_through_seq) = acked_through else {
                    continue;
                };
                let ack = v1::Ack {
                    agent_instance: batch.agent_instance.clone(),
                    acked_through_seq,
                    refused,
                    stored,
                    duplicates,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
