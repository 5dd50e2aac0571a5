//! `cogmesh workload`: the sample workload that stands in for a cognitive service behind the sidecar.
//!
//! One TCP port serves HTTP/1.1, HTTP/2 with prior knowledge (h2c), gRPC and WebSocket. This module
//! owns the listener, the per-connection hyper server, the split between gRPC (by `content-type`)
//! and plain HTTP, the `x-served-by` header, the ORCA load report on every response of a limited
//! instance, and the graceful shutdown. The routes themselves live in [`http`] and [`ws`], the gRPC
//! service in [`grpc`], the simulated service (slots, queue, faults, reports) in [`sim`].

mod grpc;
mod http;
pub mod sim;
mod ws;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use ::http::{Request, Response};
use bytes::Bytes;
use cogmesh_proto::v1::workload_server::WorkloadServer;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::service::Routes;
use tower::ServiceExt;

use self::sim::Simulator;
pub use self::sim::{OrcaForm, ServiceTimeDist, SimConfig};

/// How long a shutdown waits for in-flight requests and WebSocket sessions before giving up.
pub const SHUTDOWN_GRACE_SECS: u64 = 5;
/// How long a client may take to send the request head on an HTTP/1 connection.
const HEADER_READ_TIMEOUT_SECS: u64 = 30;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF_MS: u64 = 50;

/// The header that names the instance on every response.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
/// The ORCA load report on HTTP responses (TEXT, JSON or BIN form).
pub const LOAD_HEADER: HeaderName = HeaderName::from_static("endpoint-load-metrics");
/// The ORCA load report in gRPC trailers (always the base64 proto).
pub const LOAD_TRAILER: HeaderName = HeaderName::from_static("endpoint-load-metrics-bin");
/// Present in the header block of a gRPC response that is all trailers (an immediate error).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Error type of the response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one body type every route answers with, gRPC included.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why the workload could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("--name {name:?}: must be usable as an HTTP header value (visible ASCII)")]
    InvalidName { name: String },
    #[error("reading the listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error("building the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Sim(#[from] sim::SimConfigError),
}

/// What every request handler of one running workload shares.
pub(crate) struct Instance {
    /// The instance name: `x-served-by` and gRPC `served_by`.
    served_by: HeaderValue,
    /// gRPC services, entered for requests whose content-type is `application/grpc*`.
    grpc: Routes,
    /// Becomes `true` when shutdown starts; WebSocket sessions watch it to say goodbye.
    shutdown: watch::Receiver<bool>,
    /// Each WebSocket session holds a clone; shutdown waits until every clone is gone.
    sessions: mpsc::Sender<()>,
    /// The simulated service behind `/work` and `Infer`, and the admin routes' faults.
    sim: Arc<Simulator>,
}

/// Serves the workload on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests and WebSocket sessions finish for at most [`SHUTDOWN_GRACE_SECS`], and returns.
pub async fn serve(
    listener: TcpListener,
    name: String,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadError> {
    serve_with(listener, name, SimConfig::default(), shutdown).await
}

/// [`serve`], simulating a cognitive service as `sim` says (see [`sim`]).
pub async fn serve_with(
    listener: TcpListener,
    name: String,
    sim: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadError> {
    let served_by =
        HeaderValue::from_str(&name).map_err(|_| WorkloadError::InvalidName { name: name.clone() })?;
    sim.validate()?;
    let sim = Arc::new(Simulator::new(&name, sim));
    let local = listener.local_addr().map_err(WorkloadError::LocalAddr)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<WorkloadServer<grpc::WorkloadService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cogmesh_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let grpc = Routes::new(WorkloadServer::new(grpc::WorkloadService::with_simulator(
        &name,
        Arc::clone(&sim),
    )))
    .add_service(health_service)
    .add_service(reflection)
    .prepare();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (sessions_tx, mut sessions_rx) = mpsc::channel::<()>(1);
    let instance = Arc::new(Instance {
        served_by,
        grpc,
        shutdown: shutdown_rx,
        sessions: sessions_tx,
        sim: Arc::clone(&sim),
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(HEADER_READ_TIMEOUT_SECS));
    builder.http2().timer(TokioTimer::new());
    let connections = GracefulShutdown::new();

    tracing::info!(%local, %name, "workload listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let instance = instance.clone();
        let service = service_fn(move |req| dispatch(instance.clone(), req));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection closed with an error");
            }
        });
    }

    // Stop accepting, then drain.
    drop(listener);
    health
        .set_not_serving::<WorkloadServer<grpc::WorkloadService>>()
        .await;
    let _ = shutdown_tx.send(true);
    sim.close();
    let open = connections.count();
    let grace = Duration::from_secs(SHUTDOWN_GRACE_SECS);
    let drained = tokio::time::timeout(grace, async move {
        connections.shutdown().await;
        // The last `Instance` (and its `sessions` sender) goes with the connections; what is
        // left are the WebSocket sessions' clones.
        drop(instance);
        while sessions_rx.recv().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => tracing::info!(connections = open, "workload stopped"),
        Err(_) => tracing::warn!(
            grace_secs = SHUTDOWN_GRACE_SECS,
            "workload stopped with requests still in flight"
        ),
    }
    Ok(())
}

/// Sends gRPC to the tonic routes and everything else to the HTTP routes, then stamps the
/// instance name and, on a limited instance, the load report on the response.
async fn dispatch(instance: Arc<Instance>, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    tracing::debug!(method = %req.method(), uri = %req.uri(), version = ?req.version(), "request");
    let mut response = if is_grpc(&req) {
        let Ok(response) = instance.grpc.clone().oneshot(req).await;
        let response = response.map(|body| body.map_err(BoxError::from).boxed_unsync());
        report_in_trailers(&instance.sim, response)
    } else {
        let mut response = http::route(&instance, req).await;
        // Measured now, as the headers leave: the request's own slot is already released.
        let report = instance
            .sim
            .report()
            .and_then(|report| report.header_value(instance.sim.orca_form()));
        if let Some(value) = report.and_then(|v| HeaderValue::try_from(v).ok()) {
            response.headers_mut().insert(LOAD_HEADER, value);
        }
        response
    };
    response
        .headers_mut()
        .insert(SERVED_BY, instance.served_by.clone());
    Ok(response)
}

/// Puts the load report into the gRPC trailers, measured when they are sent. A response that is
/// all trailers (an immediate error) carries them in its header block.
fn report_in_trailers(sim: &Arc<Simulator>, mut response: Response<BoxBody>) -> Response<BoxBody> {
    if !sim.is_limited() || sim.orca_form() == OrcaForm::None {
        return response;
    }
    if response.headers().contains_key(GRPC_STATUS) {
        insert_bin_report(sim, response.headers_mut());
        return response;
    }
    let sim = Arc::clone(sim);
    response.map(|body| {
        body.map_frame(move |mut frame| {
            if let Some(trailers) = frame.trailers_mut() {
                insert_bin_report(&sim, trailers);
            }
            frame
        })
        .boxed_unsync()
    })
}

fn insert_bin_report(sim: &Simulator, headers: &mut HeaderMap) {
    let value = sim.report().map(|report| report.bin());
    if let Some(value) = value.and_then(|v| HeaderValue::try_from(v).ok()) {
        headers.insert(LOAD_TRAILER, value);
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_told_by_content_type() {
        let req = |ct: &str| Request::builder().header(CONTENT_TYPE, ct).body(()).unwrap();
        assert!(is_grpc(&req("application/grpc")));
        assert!(is_grpc(&req("application/grpc+proto")));
        assert!(!is_grpc(&req("application/json")));
        assert!(!is_grpc(&Request::new(())));
    }
}
