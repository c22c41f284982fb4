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
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sci_proto::keda::external_scaler_server::ExternalScaler;
use sci_proto::keda::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::respond::now_s;
use super::shifting::{plan_shift, DeferrableJob, ShiftPlan};
use crate::config::AggregatorConfig;
use crate::ingest::{IngestCounters, SharedStore};

pub struct CarbonScaler {
    store: SharedStore,
    config: Arc<AggregatorConfig>,
    counters: Arc<Mutex<IngestCounters>>,
    /// How often a StreamIsActive re-plans between hour boundaries.
    poll: Duration,
}

impl CarbonScaler {
    pub fn new(
        store: SharedStore,
        config: Arc<AggregatorConfig>,
        counters: Arc<Mutex<IngestCounters>>,
    ) -> Self {
        CarbonScaler {
            store,
            config,
            counters,
            poll: Duration::from_secs(60),
        }
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

    async fn plan(&self, job: DeferrableJob, at: u64) -> Result<ShiftPlan, Status> {
        let store = Arc::clone(&self.store);
        let config = Arc::clone(&self.config);
        tokio::task::spawn_blocking(move || {
            plan_shift(store.as_ref(), &config.scheduling, &job, at)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)
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
        let job = self.job(request.get_ref())?;
        let now = now_s();
        let plan = self.plan(job, now).await?;
        Ok(Response::new(IsActiveResponse {
            result: plan.active_at(now),
        }))
    }

    type StreamIsActiveStream = ActivityStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActivityStream>, Status> {
        let job = self.job(request.get_ref())?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let scaler = CarbonScaler {
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            counters: Arc::clone(&self.counters),
            poll: self.poll,
        };
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = now_s();
                let active = match scaler.plan(job.clone(), now).await {
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
        let job = self.job(request.get_ref())?;
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
        let job = self.job(&object)?;
        let now = now_s();
        let plan = self.plan(job.clone(), now).await?;
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
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<SpecStream>, Status> {
        Err(Status::unimplemented(
            "the metric spec does not change: KEDA polls GetMetricSpec",
        ))
    }
}
