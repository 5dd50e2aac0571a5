//! The control plane's Prometheus metrics, served as text on `GET /metrics` of the optional
//! admin address (`admin_listen` in control.yaml, `--admin-listen`): configuration reloads by
//! result (the same `config_reload_total{result}` as the proxy's), the routing-table version,
//! connected sidecars, table pushes and the sidecars' ACK/NACK answers, how far sidecars lag
//! behind the newest table, and the scaling decisions and alerts of [`crate::metrics`]. Everything
//! else about the mesh is read through `MeshAdmin`.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::debug;

use super::Mesh;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `refused`.
    pub result: &'static str,
}

/// Buckets of `table_ack_seconds`: 1 ms to 10 s (a sidecar that never answers is sent the next
/// table after 5 s anyway).
const TABLE_ACK_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabels {
    /// `ack` or `nack`.
    pub result: &'static str,
}

/// The metric handles, registered once.
pub struct Metrics {
    registry: Registry,
    pub config_reload: Family<ReloadLabels, Counter>,
    /// Routing tables sent to sidecars (one per sidecar per version it needed).
    pub table_pushes: Counter,
    /// Of those, the ones sent as a delta against the sidecar's table.
    pub table_delta_pushes: Counter,
    /// Sidecars' answers to tables: `ack` or `nack`.
    pub table_answers: Family<AnswerLabels, Counter>,
    sidecars_out_of_sync: Gauge,
    sync_lag_versions: Gauge,
    /// Push of a table to its ACK or NACK, per sidecar and table.
    pub table_ack_seconds: Histogram,
    table_version: Gauge<u64, AtomicU64>,
    sidecars_connected: Gauge,
    /// Scaling decisions and alerts (see [`crate::metrics`]).
    pub scaling: crate::metrics::ScalingMetrics,
    /// Leader election (see [`super::leader`]).
    pub leader: super::leader::LeaderMetrics,
}

impl Metrics {
    /// The control plane's metrics with the security ones (`certificate_requests_total`,
    /// `api_refused_total`) registered too.
    pub fn with_security(security: &crate::security::SecurityMetrics) -> Self {
        let mut metrics = Self::default();
        security.register(&mut metrics.registry);
        metrics
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let config_reload = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reload",
            "Reloads of control.yaml by result (a refused one leaves the last good configuration in force)",
            config_reload.clone(),
        );
        let table_version = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "routing_table_version",
            "The newest routing-table version",
            table_version.clone(),
        );
        let sidecars_connected = Gauge::default();
        registry.register(
            "sidecars_connected",
            "Sidecars with an open MeshControl.Connect stream",
            sidecars_connected.clone(),
        );
        let table_pushes = Counter::default();
        registry.register(
            "table_push",
            "Routing tables sent to sidecars",
            table_pushes.clone(),
        );
        let table_delta_pushes = Counter::default();
        registry.register(
            "table_delta_push",
            "Routing tables sent to sidecars as the changes to the table they run (part of table_push)",
            table_delta_pushes.clone(),
        );
        let table_answers = Family::<AnswerLabels, Counter>::default();
        registry.register(
            "table_answer",
            "Sidecars' answers to routing tables: ack (applied) or nack (refused)",
            table_answers.clone(),
        );
        let sidecars_out_of_sync = Gauge::default();
        registry.register(
            "sidecars_out_of_sync",
            "Connected sidecars that have not ACKed the newest routing table (for them)",
            sidecars_out_of_sync.clone(),
        );
        let sync_lag_versions = Gauge::default();
        registry.register(
            "sidecar_sync_lag_versions",
            "The most routing-table versions a connected sidecar is behind",
            sync_lag_versions.clone(),
        );
        let table_ack_seconds = Histogram::new(TABLE_ACK_BUCKETS_SECONDS);
        registry.register_with_unit(
            "table_ack",
            "Time from sending a routing table to a sidecar to its ACK or NACK",
            prometheus_client::registry::Unit::Seconds,
            table_ack_seconds.clone(),
        );
        let scaling = crate::metrics::ScalingMetrics::default();
        scaling.register(&mut registry);
        let leader = super::leader::LeaderMetrics::default();
        leader.register(&mut registry);
        Metrics {
            leader,
            registry,
            config_reload,
            table_pushes,
            table_delta_pushes,
            table_answers,
            sidecars_out_of_sync,
            sync_lag_versions,
            table_ack_seconds,
            table_version,
            sidecars_connected,
            scaling,
        }
    }
}

impl Metrics {
    pub fn table_answer(&self, result: &'static str) {
        self.table_answers.get_or_create(&AnswerLabels { result }).inc();
    }
}

/// The Prometheus text exposition of `mesh`'s metrics now.
fn render(mesh: &Mesh) -> String {
    {
        let state = mesh.state();
        mesh.metrics.table_version.set(state.version);
        let connected = state.sidecars.values().filter(|s| s.connected);
        mesh.metrics
            .sidecars_connected
            .set(connected.clone().count() as i64);
        let lags = connected.map(|s| state.version.saturating_sub(s.acked_version));
        let (behind, most) = lags.fold((0, 0), |(n, m), lag| (n + i64::from(lag > 0), m.max(lag)));
        mesh.metrics.sidecars_out_of_sync.set(behind);
        mesh.metrics.sync_lag_versions.set(most as i64);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    // The Prometheus text format (0.0.4), which `promtool check metrics` and every scraper read.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &mesh.metrics.registry);
    out
}

/// Serves `GET /metrics` (HTTP/1.1) on `listener` until the task is aborted.
pub(super) async fn serve(listener: tokio::net::TcpListener, mesh: Arc<Mesh>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let mesh = Arc::clone(&mesh);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mesh = Arc::clone(&mesh);
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(render(&mesh))))
                    } else {
                        hyper::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
                    };
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}
