//! `cogmesh control`: the control plane's gRPC server.
//!
//! - `MeshControl.Connect`: one bidirectional stream per sidecar (Hello, LoadReports, ACK/NACK
//!   in; RoutingTable snapshots out). Pushes coalesce per sidecar through a `watch` channel: the
//!   latest table wins and at most one is pending, with no fixed debounce. A version a sidecar
//!   NACKed is never sent to it again.
//! - `MeshAdmin`: services with endpoints and weights, per-sidecar sync status, table watch.
//! - gRPC health (`grpc.health.v1`) and reflection (v1), so `grpcurl` works without protos.
//!
//! Weights are recomputed every `weight_interval` from the reports received since the last
//! update (see [`weights`]); a new table version is made only when something changed.

mod state;
pub mod weights;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cogmesh_proto::v1::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use cogmesh_proto::v1::mesh_control_server::{MeshControl, MeshControlServer};
use cogmesh_proto::v1::{
    control_message, sidecar_message, ControlMessage, ListServicesRequest, ListServicesResponse,
    RoutingTable, SidecarMessage, SyncStatusRequest, SyncStatusResponse, WatchTablesRequest,
};
use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use self::state::MeshState;

/// How often weights are recomputed from reports, by default.
pub const DEFAULT_WEIGHT_INTERVAL_MS: u64 = 1_000;
/// The control plane's default address (localhost; the sidecars' `--control`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub weight_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            weight_interval: Duration::from_millis(DEFAULT_WEIGHT_INTERVAL_MS),
        }
    }
}

/// Shared by every stream handler.
struct Mesh {
    state: Mutex<MeshState>,
    tables: watch::Sender<Arc<RoutingTable>>,
    /// Turns true at shutdown: every sidecar stream ends, so the server can drain.
    stopping: watch::Sender<bool>,
    start: Instant,
}

/// How long open streams may take to end after a shutdown signal.
pub const DRAIN_TIMEOUT_MS: u64 = 5_000;

impl Mesh {
    fn now_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MeshState> {
        // A panic while holding the lock would be a bug; keep serving with the data as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes and publishes a new table if anything changed.
    fn publish(&self, interval_secs: f64) {
        let now = self.now_secs();
        let table = self.state().recompute(now, interval_secs);
        if let Some(t) = table {
            info!(
                version = t.version,
                services = t.services.len(),
                "new routing table"
            );
            self.tables.send_replace(t);
        }
    }
}

/// Serves the control plane on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ControlConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (tables, _) = watch::channel(Arc::new(RoutingTable::default()));
    let (stopping, _) = watch::channel(false);
    let mesh = Arc::new(Mesh {
        state: Mutex::new(MeshState::default()),
        tables,
        stopping,
        start: Instant::now(),
    });
    mesh.publish(0.0);

    let ticker = {
        let mesh = Arc::clone(&mesh);
        let interval = config.weight_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                mesh.publish(interval.as_secs_f64());
            }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MeshControlServer<ControlService>>().await;
    health.set_serving::<MeshAdminServer<AdminService>>().await;
    // Both reflection versions: grpcurl releases before 1.9 only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cogmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (signalled_tx, mut signalled) = watch::channel(false);
    let shutdown = {
        let mesh = Arc::clone(&mesh);
        async move {
            shutdown.await;
            info!("shutting down: ending sidecar streams");
            mesh.stopping.send_replace(true);
            let _ = signalled_tx.send(true);
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(MeshControlServer::new(ControlService {
            mesh: Arc::clone(&mesh),
        }))
        .add_service(MeshAdminServer::new(AdminService { mesh }))
        .serve_with_incoming_shutdown(incoming, shutdown);
    let deadline = async move {
        while !*signalled.borrow_and_update() {
            if signalled.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_TIMEOUT_MS)).await;
    };
    let result = tokio::select! {
        result = server => result,
        _ = deadline => {
            warn!("drain timeout reached; closing the remaining streams");
            Ok(())
        }
    };
    ticker.abort();
    result
}

// === impl ControlService ===

struct ControlService {
    mesh: Arc<Mesh>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl MeshControl for ControlService {
    type ConnectStream = BoxStream<ControlMessage>;

    async fn connect(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before Hello"))?;
        let Some(sidecar_message::Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        if hello.node.is_empty() || hello.service.is_empty() {
            return Err(Status::invalid_argument(
                "Hello: node and service must not be empty",
            ));
        }
        let address: SocketAddr = hello.instance_address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "Hello: instance_address {:?} is not an IP:port address",
                hello.instance_address
            ))
        })?;
        let node = hello.node.clone();
        info!(%node, service = %hello.service, %address, peer = ?peer, "sidecar connected");
        let session = self.mesh.state().hello(hello);
        self.mesh.publish(0.0);

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(push_tables(Arc::clone(&self.mesh), node.clone(), tx, done_rx));
        tokio::spawn(read_sidecar(
            Arc::clone(&self.mesh),
            node,
            session,
            inbound,
            done_tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends every new table to one sidecar: the latest wins, a NACKed version is skipped.
async fn push_tables(
    mesh: Arc<Mesh>,
    node: String,
    tx: tokio::sync::mpsc::Sender<Result<ControlMessage, Status>>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tables = mesh.tables.subscribe();
    let mut stopping = mesh.stopping.subscribe();
    tables.mark_changed();
    loop {
        tokio::select! {
            _ = &mut done => return,
            _ = stopping.wait_for(|s| *s) => return,
            changed = tables.changed() => if changed.is_err() { return },
        }
        let table = Arc::clone(&tables.borrow_and_update());
        if table.version == 0 {
            continue;
        }
        {
            let mut state = mesh.state();
            if state.was_rejected(&node, table.version) {
                debug!(%node, version = table.version, "not resending a refused version");
                continue;
            }
            if let Some(s) = state.sidecars.get_mut(&node) {
                s.sent_version = table.version;
            }
        }
        let message = ControlMessage {
            kind: Some(control_message::Kind::RoutingTable((*table).clone())),
        };
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
    }
}

/// Reads a sidecar's reports and acknowledgements until its stream ends.
async fn read_sidecar(
    mesh: Arc<Mesh>,
    node: String,
    session: u64,
    mut inbound: Streaming<SidecarMessage>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    loop {
        match inbound.message().await {
            Ok(Some(SidecarMessage { kind: Some(kind) })) => match kind {
                sidecar_message::Kind::LoadReport(r) => mesh.state().report(&node, r),
                sidecar_message::Kind::Ack(a) => {
                    debug!(%node, version = a.version, "ACK");
                    mesh.state().ack(&node, a.version);
                }
                sidecar_message::Kind::Nack(n) => {
                    warn!(%node, version = n.version, error = %n.error, "sidecar refused a routing table");
                    mesh.state().nack(&node, n.version, n.error);
                }
                sidecar_message::Kind::Hello(_) => {
                    warn!(%node, "ignoring a second Hello on one stream");
                }
            },
            Ok(Some(SidecarMessage { kind: None })) => {}
            Ok(None) => break,
            Err(e) => {
                debug!(%node, "sidecar stream failed: {e}");
                break;
            }
        }
    }
    info!(%node, "sidecar disconnected");
    let _ = done.send(());
    if mesh.state().disconnect(&node, session) {
        mesh.publish(0.0);
    }
}

// === impl AdminService ===

struct AdminService {
    mesh: Arc<Mesh>,
}

#[tonic::async_trait]
impl MeshAdmin for AdminService {
    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(ListServicesResponse {
            services: self.mesh.state().services(),
        }))
    }

    async fn get_sync_status(
        &self,
        _: Request<SyncStatusRequest>,
    ) -> Result<Response<SyncStatusResponse>, Status> {
        let state = self.mesh.state();
        Ok(Response::new(SyncStatusResponse {
            current_version: state.version,
            sidecars: state.sync_status(),
        }))
    }

    type WatchTablesStream = BoxStream<RoutingTable>;

    async fn watch_tables(
        &self,
        _: Request<WatchTablesRequest>,
    ) -> Result<Response<Self::WatchTablesStream>, Status> {
        let mut tables = self.mesh.tables.subscribe();
        tables.mark_changed();
        let stopping = self.mesh.stopping.subscribe();
        Ok(Response::new(stream_from_watch(tables, stopping)))
    }
}

/// Every new table until shutdown.
fn stream_from_watch(
    tables: watch::Receiver<Arc<RoutingTable>>,
    stopping: watch::Receiver<bool>,
) -> BoxStream<RoutingTable> {
    Box::pin(futures_util::stream::unfold(
        (tables, stopping),
        |(mut tables, mut stopping)| async move {
            tokio::select! {
                changed = tables.changed() => changed.ok()?,
                _ = stopping.wait_for(|s| *s) => return None,
            }
            let table = (**tables.borrow_and_update()).clone();
            Some((Ok(table), (tables, stopping)))
        },
    ))
}
