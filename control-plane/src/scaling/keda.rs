//! KEDA's `externalscaler.ExternalScaler`, served on the control plane's gRPC port, so a cluster
//! running KEDA scales a Deployment on what cogmesh's sidecars report (a ScaledObject trigger of
//! `type: external` with `scalerAddress` pointing here and `service: <name>` in its metadata).
//!
//! The metrics are the policy's: one `MetricSpec` per target, with the per-replica target as
//! `targetSizeFloat`; `GetMetrics` returns the service total, `ready × observed` — with KEDA's
//! `AverageValue` targets the HPA then computes `ceil(ready × observed / target)`, the rule
//! cogmesh's own engine starts from. `IsActive` is true while the service has traffic or load.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cogmesh_proto::externalscaler::external_scaler_server::ExternalScaler;
use cogmesh_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef,
};
use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::engine::Observation;
use super::policy::ScalingPolicy;
use super::Scaler;

pub struct KedaService {
    pub scaler: Arc<Scaler>,
    /// How often `StreamIsActive` re-checks.
    pub interval: Duration,
}

fn service_of(r: &ScaledObjectRef) -> String {
    r.scaler_metadata
        .get("service")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| r.name.clone())
}

impl KedaService {
    fn view(&self, r: &ScaledObjectRef) -> Result<(String, ScalingPolicy, Option<Observation>), Status> {
        let service = service_of(r);
        match self.scaler.view(&service) {
            Some((policy, last)) => Ok((service, policy, last)),
            None => Err(Status::not_found(format!(
                "service {service:?} has no scaling policy in the control plane's configuration"
            ))),
        }
    }
}

/// Whether the service has any demand.
fn active(last: Option<&Observation>, policy: &ScalingPolicy) -> bool {
    last.is_some_and(|o| {
        o.offered_rps.is_some_and(|r| r > 0.0)
            || policy.metrics().any(|(m, _)| o.value(m).is_some_and(|v| v > 0.0))
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for KedaService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let (_, policy, last) = self.view(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: active(last.as_ref(), &policy),
        }))
    }

    type StreamIsActiveStream = BoxStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let (service, _, _) = self.view(request.get_ref())?;
        let scaler = Arc::clone(&self.scaler);
        let interval = self.interval;
        let stream = futures_util::stream::unfold(None, move |previous: Option<bool>| {
            let (scaler, service) = (Arc::clone(&scaler), service.clone());
            async move {
                loop {
                    if previous.is_some() {
                        tokio::time::sleep(interval).await;
                    }
                    let (policy, last) = scaler.view(&service)?;
                    let now = active(last.as_ref(), &policy);
                    if previous != Some(now) {
                        return Some((Ok(IsActiveResponse { result: now }), Some(now)));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let (_, policy, _) = self.view(request.get_ref())?;
        let metric_specs = policy
            .metrics()
            .map(|(m, target)| MetricSpec {
                metric_name: m.name().to_string(),
                target_size: target.ceil() as i64,
                target_size_float: target,
            })
            .collect();
        Ok(Response::new(GetMetricSpecResponse { metric_specs }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        let object = request.scaled_object_ref.unwrap_or_default();
        let (service, policy, last) = self.view(&object)?;
        let Some((metric, _)) = policy.metrics().find(|(m, _)| m.name() == request.metric_name) else {
            return Err(Status::not_found(format!(
                "{:?} is not a metric of {service}'s policy",
                request.metric_name
            )));
        };
        let Some(obs) = last else {
            return Err(Status::unavailable(format!("no observation of {service} yet")));
        };
        let Some(value) = obs.value(metric) else {
            return Err(Status::unavailable(format!(
                "{metric} is not reported for {service}"
            )));
        };
        let total = f64::from(obs.ready) * value;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: metric.name().to_string(),
                metric_value: total.ceil() as i64,
                metric_value_float: total,
            }],
        }))
    }
}
