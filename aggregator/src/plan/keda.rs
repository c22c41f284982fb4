//! KEDA's external scaler (`externalscaler.ExternalScaler`), served on the
//! aggregator's gRPC listener, so a deferrable worker Deployment scales up
//! in the hours its time-shifting plan chose and to zero outside them, with
//! no change to the application.
//!
//! A ScaledObject names its job in the trigger's metadata:
//!
//! ```yaml
//! triggers:
//!   - type: external-push          # or external
//!     metadata:
//!       scalerAddress: sci-aggregator:7443
//!       job: repayment-batch       # a [[scheduling.deferrable]] name
//! ```
//!
//! `IsActive` is true in a planned hour; `GetMetricSpec` asks for one
//! replica per unit of `sci_plan_<job>` (target 1); `GetMetrics` answers
//! the job's `replicas` in a planned hour, 0 outside; `StreamIsActive`
//! sends the activity at once and again whenever it changes (checked at
//! every hour boundary and every `poll`). `StreamMetricSpec` is answered
//! Unimplemented: KEDA then polls `GetMetricSpec` (its documented fallback).
//!
//! Every call passes the same identity check as the ingest
//! ([`crate::auth`]): KEDA presents a client certificate (its
//! TriggerAuthentication's `caCert`, `tlsClientCert`, `tlsClientKey`), other
//! clients may use an `[[agents]]` bearer token. Each plan takes one of the
//! HTTP API's `max_concurrent_queries` permits (none free: RESOURCE_EXHAUSTED)
//! and runs within `query_timeout` (DEADLINE_EXCEEDED past it); a
//! StreamIsActive waits for its permit instead. Refusals are counted in
//! `sci_keda_requests_refused_total{reason}`.
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sci_proto::keda::external_scaler_server::ExternalScaler;
use sci_proto::keda::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::respond::now_s;
use super::shifting::{plan_shift, DeferrableJob, ShiftPlan};
use crate::auth::GrpcAuth;
use crate::config::AggregatorConfig;
use crate::ingest::{IngestCounters, SharedStore};
use crate::limits::ConnectionLimiter;

#[derive(Clone)]
pub struct CarbonScaler {
    store: SharedStore,
    config: Arc<AggregatorConfig>,
    counters: Arc<Mutex<IngestCounters>>,
    auth: GrpcAuth,
    /// The HTTP API's permits for expensive queries (`max_concurrent_queries`).
    queries: Arc<Semaphore>,
    /// The gRPC listener's limiter: told which connections authenticated.
    limiter: Option<Arc<ConnectionLimiter>>,
    /// How often a StreamIsActive re-plans between hour boundaries.
    poll: Duration,
}

impl CarbonScaler {
    pub fn new(
        store: SharedStore,
        config: Arc<AggregatorConfig>,
        counters: Arc<Mutex<IngestCounters>>,
        queries: Arc<Semaphore>,
    ) -> Self {
        CarbonScaler {
            store,
            auth: GrpcAuth::new(&config),
            config,
            counters,
            queries,
            limiter: None,
            poll: Duration::from_secs(60),
        }
    }

    /// Tells `limiter` of each connection that presents valid credentials.
    pub fn with_limiter(mut self, limiter: Arc<ConnectionLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn count(&self, reason: &str) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keda_refused
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// The identity check of the whole gRPC port, then the job.
    fn admit<T>(
        &self,
        request: &Request<T>,
        object: &ScaledObjectRef,
    ) -> Result<DeferrableJob, Status> {
        if let Err(refusal) = self.auth.identify(request) {
            self.count(refusal.kind);
            return Err(refusal.status);
        }
        if let (Some(limiter), Some(peer)) = (&self.limiter, request.remote_addr()) {
            limiter.mark_authenticated(peer);
        }
        self.job(object)
    }

    fn refuse(&self, status: Status) -> Status {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plan_requests_refused
            .entry("keda".to_string())
            .or_default() += 1;
        status
    }

    /// The job a ScaledObject names (metadata `job`).
    fn job(&self, object: &ScaledObjectRef) -> Result<DeferrableJob, Status> {
        let Some(name) = object.scaler_metadata.get("job") else {
            return Err(self.refuse(Status::invalid_argument(
                "scalerMetadata.job is required: the name of a [[scheduling.deferrable]] job",
            )));
        };
        self.config
            .scheduling
            .deferrable
            .iter()
            .find(|j| &j.name == name)
            .cloned()
            .ok_or_else(|| {
                self.refuse(Status::not_found(format!(
                    "scalerMetadata.job {} is not a [[scheduling.deferrable]] job",
                    crate::validate::clip(name)
                )))
            })
    }

    /// The plan of `job` at `at`, with one query permit: taken at once
    /// (none free: RESOURCE_EXHAUSTED), or, with `wait`, when one frees.
    async fn plan(&self, job: DeferrableJob, at: u64, wait: bool) -> Result<ShiftPlan, Status> {
        let permit = if wait {
            Arc::clone(&self.queries).acquire_owned().await.ok()
        } else {
            Arc::clone(&self.queries).try_acquire_owned().ok()
        };
        let Some(permit) = permit else {
            self.count("busy");
            return Err(Status::resource_exhausted(format!(
                "too many queries running (max_concurrent_queries = {}): retry later",
                self.config.max_concurrent_queries
            )));
        };
        let store = Arc::clone(&self.store);
        let config = Arc::clone(&self.config);
        let task = tokio::task::spawn_blocking(move || {
            let plan = plan_shift(store.as_ref(), &config.scheduling, &job, at);
            drop(permit);
            plan
        });
        let timeout = self.config.query_timeout + Duration::from_secs(1);
        match tokio::time::timeout(timeout, task).await {
            Ok(joined) => joined
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Status::from),
            Err(_) => {
                self.count("timeout");
                Err(Status::deadline_exceeded(format!(
                    "plan timed out after {:?} (query_timeout)",
                    self.config.query_timeout
                )))
            }
        }
    }

    fn metric_name(job: &DeferrableJob) -> String {
        format!("sci_plan_{}", job.name)
    }
}

type ActivityStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type SpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for CarbonScaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let job = self.admit(&request, request.get_ref())?;
        let now = now_s();
        let plan = self.plan(job, now, false).await?;
        Ok(Response::new(IsActiveResponse {
            result: plan.active_at(now),
        }))
    }

    type StreamIsActiveStream = ActivityStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActivityStream>, Status> {
        let job = self.admit(&request, request.get_ref())?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let scaler = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = now_s();
                let active = match scaler.plan(job.clone(), now, true).await {
                    Ok(plan) => Ok(plan.active_at(now)),
                    Err(e) => Err(e),
                };
                let changed = match (&active, last) {
                    (Ok(a), Some(l)) => *a != l,
                    _ => true,
                };
                if changed {
                    let message = active.clone().map(|result| IsActiveResponse { result });
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
                last = active.ok();
                let to_boundary = Duration::from_secs(3600 - now % 3600);
                tokio::select! {
                    _ = tokio::time::sleep(to_boundary.min(scaler.poll)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let job = self.admit(&request, request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: Self::metric_name(&job),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let object = request
            .get_ref()
            .scaled_object_ref
            .clone()
            .unwrap_or_default();
        let job = self.admit(&request, &object)?;
        let now = now_s();
        let plan = self.plan(job.clone(), now, false).await?;
        let replicas = if plan.active_at(now) { job.replicas } else { 0 };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: Self::metric_name(&job),
                metric_value: i64::from(replicas),
                metric_value_float: f64::from(replicas),
            }],
        }))
    }

    type StreamMetricSpecStream = SpecStream;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<SpecStream>, Status> {
        if let Err(refusal) = self.auth.identify(&request) {
            self.count(refusal.kind);
            return Err(refusal.status);
        }
        Err(Status::unimplemented(
            "the metric spec does not change: KEDA polls GetMetricSpec",
        ))
    }
}
