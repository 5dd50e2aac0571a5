//! The control plane's Prometheus metrics (`prometheus-client`), served as text on
//! `metrics_listen` (control.yaml) / `--metrics ADDR` at `GET /metrics`. Names (counters get
//! `_total` in the exposition):
//! - `control_sidecars_connected`, `control_table_version`: gauges, updated every weight tick;
//! - `control_config_reload_total{result}`: reloads of control.yaml, `applied` or `refused`;
//! - `scaling_decisions_total{service,direction}`: decisions, `up` or `down`;
//! - `scaling_replicas{service}`: the replica count of the last decision;
//! - `alert_active{service,metric,level}`: 1 while an alert is at `warning` / `critical`;
//! - `alert_transitions_total{service,metric,level}`: changes of level, by the level entered.
//!
//! Label sets are bounded by the configured services and the fixed metric and level names.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub service: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub service: String,
    pub metric: &'static str,
    pub level: &'static str,
}

/// The handles the scaler and the alerts write.
#[derive(Clone, Debug, Default)]
pub struct ScalingMetrics {
    pub decisions: Family<DecisionLabels, Counter>,
    pub replicas: Family<ServiceLabels, Gauge>,
    pub alert_active: Family<AlertLabels, Gauge>,
    pub alert_transitions: Family<AlertLabels, Counter>,
}

/// Every metric of the control plane, and the registry that encodes them.
pub struct ControlMetrics {
    registry: Registry,
    pub sidecars_connected: Gauge,
    pub table_version: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub scaling: ScalingMetrics,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let sidecars_connected = Gauge::default();
        let table_version = Gauge::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let scaling = ScalingMetrics::default();
        registry.register(
            "control_sidecars_connected",
            "Sidecars with an open MeshControl stream",
            sidecars_connected.clone(),
        );
        registry.register(
            "control_table_version",
            "Version of the newest routing table",
            table_version.clone(),
        );
        registry.register(
            "control_config_reload",
            "Reloads of control.yaml by result",
            reloads.clone(),
        );
        registry.register(
            "scaling_decisions",
            "Scaling decisions by service and direction",
            scaling.decisions.clone(),
        );
        registry.register(
            "scaling_replicas",
            "Replica count of the last scaling decision",
            scaling.replicas.clone(),
        );
        registry.register(
            "alert_active",
            "1 while the alert is at the level",
            scaling.alert_active.clone(),
        );
        registry.register(
            "alert_transitions",
            "Changes of alert level, by the level entered",
            scaling.alert_transitions.clone(),
        );
        ControlMetrics {
            registry,
            sidecars_connected,
            table_version,
            reloads,
            scaling,
        }
    }
}

impl ControlMetrics {
    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` (and `GET /live`) on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<ControlMetrics>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let (status, content_type, body) = match (req.method(), req.uri().path()) {
                        (&http::Method::GET, "/metrics") => (
                            StatusCode::OK,
                            "text/plain; version=0.0.4; charset=utf-8",
                            metrics.encode(),
                        ),
                        (&http::Method::GET, "/live") => (StatusCode::OK, "text/plain", "live\n".into()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found: try GET /metrics\n".into(),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, content_type)
                            .body(Full::new(Bytes::from(body)))
                            .expect("status and headers are valid"),
                    )
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "metrics connection ended: {e}");
            }
        });
    }
}

/// The metrics address to serve on, if any, bound.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(a) => Ok(Some(tokio::net::TcpListener::bind(a).await?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_in_the_exposition() {
        let m = ControlMetrics::default();
        m.sidecars_connected.set(3);
        m.reloads.get_or_create(&ResultLabels { result: "refused" }).inc();
        m.scaling
            .decisions
            .get_or_create(&DecisionLabels {
                service: "reasoning".into(),
                direction: "up",
            })
            .inc();
        let text = m.encode();
        assert!(text.contains("control_sidecars_connected 3"), "{text}");
        assert!(
            text.contains(r#"control_config_reload_total{result="refused"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"scaling_decisions_total{service="reasoning",direction="up"} 1"#),
            "{text}"
        );
    }
}
