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

pub mod config;
mod state;
pub mod weights;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cogmesh_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use cogmesh_proto::v1::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use cogmesh_proto::v1::mesh_control_server::{MeshControl, MeshControlServer};
use cogmesh_proto::v1::{
    control_message, sidecar_message, Alert, ConfigStatusRequest, ConfigStatusResponse, ControlMessage,
    GetScalingPoliciesRequest, GetScalingPoliciesResponse, ListAlertsRequest, ListAlertsResponse,
    ListScalingDecisionsRequest, ListScalingDecisionsResponse, ListServicesRequest, ListServicesResponse,
    RoutingTable, ScalingDecision, SetScalingPolicyRequest, SidecarMessage, SyncStatusRequest,
    SyncStatusResponse, WatchAlertsRequest, WatchScalingDecisionsRequest, WatchTablesRequest,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use self::state::MeshState;

/// How often weights are recomputed from reports, by default.
pub const DEFAULT_WEIGHT_INTERVAL_MS: u64 = 1_000;
/// The control plane's default address (localhost; the sidecars' `--control`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// What `serve` runs with: the configuration in force and, to reload it, where it came from.
pub struct ControlConfig {
    pub resolved: config::Resolved,
    /// See [`DEFAULT_STARTUP_GRACE_MS`].
    pub startup_grace: Duration,
    /// The base `control.yaml`, watched (with its environment file) and reloaded on change or
    /// SIGHUP.
    pub path: Option<std::path::PathBuf>,
}

/// Reload bookkeeping for `MeshAdmin.GetConfigStatus`.
#[derive(Debug, Default)]
struct ConfigStatus {
    applied: u64,
    refused: u64,
    last_error: String,
}

/// Shared by every stream handler.
struct Mesh {
    state: Mutex<MeshState>,
    config: Mutex<config::Resolved>,
    config_status: Mutex<ConfigStatus>,
    /// The weight interval in force, in ms (a reload may change it).
    weight_interval_ms: std::sync::atomic::AtomicU64,
    tables: watch::Sender<Arc<RoutingTable>>,
    /// Turns true at shutdown: every sidecar stream ends, so the server can drain.
    stopping: watch::Sender<bool>,
    start: Instant,
    startup_grace: Duration,
    scaler: Arc<crate::scaling::Scaler>,
    metrics: Arc<crate::metrics::ControlMetrics>,
}

/// How long open streams may take to end after a shutdown signal.
pub const DRAIN_TIMEOUT_MS: u64 = 5_000;

/// After a restart into a running mesh (a sidecar says Hello with a table it got earlier), the
/// control plane knows only the sidecars that have reconnected so far. Pushing then would tell
/// the others' clients that those instances are gone. So while some sidecar came back with a
/// table, pushes wait this long after start: longer than the sidecars' longest reconnect delay
/// (30 s), so every live sidecar has said Hello again. Meanwhile sidecars route with what they
/// have (static stability). A fresh mesh (no sidecar has a table) is served at once.
pub const DEFAULT_STARTUP_GRACE_MS: u64 = 32_000;

impl Mesh {
    /// Whether pushes must still wait (see [`DEFAULT_STARTUP_GRACE_MS`]); how long if so.
    fn hold_pushes(&self) -> Option<Duration> {
        let left = self.startup_grace.checked_sub(self.start.elapsed())?;
        (self.state().existing_mesh && !left.is_zero()).then_some(left)
    }

    fn now_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MeshState> {
        // A panic while holding the lock would be a bug; keep serving with the data as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the configuration; a bad one is refused and the last good one stays.
    fn reload(&self, path: &std::path::Path) {
        let current = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = config::load(Some(path), &|k| std::env::var(k).ok())
            .map_err(|e| e.to_string())
            .and_then(|next| {
                if next.listen != current.listen {
                    return Err(format!(
                        "{}: listen: changing it ({} → {}) needs a restart",
                        next.sources.join(" + "),
                        current.listen,
                        next.listen
                    ));
                }
                if next.metrics_listen != current.metrics_listen {
                    return Err(format!(
                        "{}: metrics_listen: changing it needs a restart",
                        next.sources.join(" + ")
                    ));
                }
                if let Some(field) = current.scaling.restart_needed(&next.scaling) {
                    return Err(format!(
                        "{}: {field}: changing it needs a restart (policies reload)",
                        next.sources.join(" + ")
                    ));
                }
                Ok(next)
            });
        let mut status = self.config_status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(next) => {
                status.applied += 1;
                self.metrics
                    .reloads
                    .get_or_create(&crate::metrics::ResultLabels { result: "applied" })
                    .inc();
                info!(environment = next.environment.as_str(), "configuration reloaded");
                self.weight_interval_ms
                    .store(next.weight_interval_ms, std::sync::atomic::Ordering::Relaxed);
                self.state().statics = next.services.clone();
                self.scaler.set_policies(&next.scaling);
                self.scaler.set_alerts(&next.alerts);
                *self.config.lock().unwrap_or_else(|p| p.into_inner()) = next;
                drop(status);
                self.publish(0.0);
            }
            Err(e) => {
                status.refused += 1;
                self.metrics
                    .reloads
                    .get_or_create(&crate::metrics::ResultLabels { result: "refused" })
                    .inc();
                warn!("configuration refused, keeping the last good one: {e}");
                status.last_error = e;
            }
        }
    }

    /// Recomputes and publishes a new table if anything changed.
    fn publish(&self, interval_secs: f64) {
        let now = self.now_secs();
        let (table, connected, version) = {
            let mut state = self.state();
            let table = state.recompute(now, interval_secs);
            let connected = state.sidecars.values().filter(|s| s.connected).count();
            (table, connected, state.version)
        };
        self.metrics.sidecars_connected.set(connected as i64);
        self.metrics.table_version.set(version as i64);
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
    let metrics = Arc::new(crate::metrics::ControlMetrics::default());
    let metrics_server = match crate::metrics::bind(config.resolved.metrics_listen).await {
        Ok(Some(l)) => Some(tokio::spawn(crate::metrics::serve(l, Arc::clone(&metrics)))),
        Ok(None) => None,
        Err(e) => {
            // The control plane still serves sidecars; the operator sees why metrics are missing.
            warn!(address = ?config.resolved.metrics_listen, "cannot serve metrics: {e}");
            None
        }
    };
    let mesh = Arc::new(Mesh {
        state: Mutex::new(MeshState::with_statics(config.resolved.services.clone())),
        weight_interval_ms: std::sync::atomic::AtomicU64::new(config.resolved.weight_interval_ms),
        config: Mutex::new(config.resolved.clone()),
        config_status: Mutex::new(ConfigStatus::default()),
        tables,
        stopping,
        start: Instant::now(),
        startup_grace: config.startup_grace,
        scaler: Arc::new(crate::scaling::Scaler::new(
            &config.resolved.scaling,
            &config.resolved.alerts,
            listener.local_addr().unwrap_or(config.resolved.listen),
            metrics.scaling.clone(),
        )),
        metrics,
    });
    mesh.publish(0.0);
    let scaling = spawn_scaling(Arc::clone(&mesh), config.resolved.scaling.interval_ms);

    let ticker = {
        let mesh = Arc::clone(&mesh);
        tokio::spawn(async move {
            loop {
                let ms = mesh.weight_interval_ms.load(std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                mesh.publish(ms as f64 / 1e3);
            }
        })
    };
    let watcher = config
        .path
        .clone()
        .map(|path| tokio::spawn(watch_config(Arc::clone(&mesh), path)));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MeshControlServer<ControlService>>().await;
    health.set_serving::<MeshAdminServer<AdminService>>().await;
    health
        .set_serving::<ExternalScalerServer<crate::scaling::keda::KedaService>>()
        .await;
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

    let mesh_for_shutdown = Arc::clone(&mesh);
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
        .add_service(MeshAdminServer::new(AdminService {
            mesh: Arc::clone(&mesh),
        }))
        .add_service(ExternalScalerServer::new(crate::scaling::keda::KedaService {
            scaler: Arc::clone(&mesh.scaler),
            interval: Duration::from_millis(config.resolved.scaling.interval_ms),
        }))
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
    scaling.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(w) = watcher {
        w.abort();
    }
    let scaler = Arc::clone(&mesh_for_shutdown.scaler);
    let _ = tokio::task::spawn_blocking(move || scaler.shutdown()).await;
    result
}

/// Starts the process backend's replicas, then decides every `interval_ms`.
fn spawn_scaling(mesh: Arc<Mesh>, interval_ms: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let scaler = Arc::clone(&mesh.scaler);
        let _ = tokio::task::spawn_blocking(move || scaler.start()).await;
        let mut every = tokio::time::interval(Duration::from_millis(interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let services = mesh.state().services();
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let scaler = Arc::clone(&mesh.scaler);
            let _ = tokio::task::spawn_blocking(move || scaler.tick(&services, unix_ms)).await;
        }
    })
}

/// Reloads the configuration when its files change or on SIGHUP.
async fn watch_config(mesh: Arc<Mesh>, path: std::path::PathBuf) {
    use notify::Watcher;
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("control")
        .to_string();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            // The base file or any environment file beside it.
            let ours = event.paths.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&stem) && !n.ends_with(".tmp"))
            });
            if ours {
                let _ = tx.send(());
            }
        }
    })
    .ok();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ".".into());
    if let Some(w) = watcher.as_mut() {
        if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), "cannot watch the configuration (SIGHUP still reloads): {e}");
        }
    }
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                info!("SIGHUP: reloading the configuration");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        mesh.reload(&path);
    }
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
        // Membership changes are published by the next weight tick, not here: a connect storm
        // (thousands of sidecars after a rollout) then makes one table version per tick, not one
        // per sidecar, each fanned out to everyone.
        let subscriptions = hello.subscriptions.clone();
        let hello_service = hello.service.clone();
        let session = self.mesh.state().hello(hello);

        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(read_sidecar(
            Arc::clone(&self.mesh),
            node.clone(),
            session,
            inbound,
            done_tx,
        ));
        // Scaling decisions for the sidecar's own service and the services it routes to go out
        // on the same stream, between tables; the stream ends when the table stream does.
        let own = hello_service;
        let wanted = subscriptions.clone();
        let decisions = broadcast_stream(
            self.mesh.scaler.subscribe(),
            self.mesh.stopping.subscribe(),
            move |d: &ScalingDecision| d.service == own || wanted.is_empty() || wanted.contains(&d.service),
        )
        .filter_map(|d| std::future::ready(d.ok()))
        .map(|d| {
            Some(Ok(ControlMessage {
                kind: Some(control_message::Kind::ScalingDecision(d)),
            }))
        });
        let tables = push_stream(Arc::clone(&self.mesh), node, subscriptions, done_rx)
            .map(Some)
            .chain(futures_util::stream::once(std::future::ready(None)));
        let merged = futures_util::stream::select(tables, decisions)
            .take_while(|m| std::future::ready(m.is_some()))
            .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(merged)))
    }
}

/// What one sidecar's push stream waits on.
struct Pushes {
    mesh: Arc<Mesh>,
    node: String,
    /// Services this sidecar routes to; empty: all.
    subscriptions: Vec<String>,
    tables: watch::Receiver<Arc<RoutingTable>>,
    stopping: watch::Receiver<bool>,
    done: tokio::sync::oneshot::Receiver<()>,
}

/// The tables sent to one sidecar, pulled by the gRPC stream only when it can send: a table is
/// cloned for the wire at that moment and never queued, so at most one is pending per sidecar
/// and the latest wins. A version the sidecar NACKed is skipped.
fn push_stream(
    mesh: Arc<Mesh>,
    node: String,
    subscriptions: Vec<String>,
    done: tokio::sync::oneshot::Receiver<()>,
) -> BoxStream<ControlMessage> {
    let mut tables = mesh.tables.subscribe();
    tables.mark_changed();
    let stopping = mesh.stopping.subscribe();
    let pushes = Pushes {
        mesh,
        node,
        subscriptions,
        tables,
        stopping,
        done,
    };
    Box::pin(futures_util::stream::unfold(pushes, |mut p| async move {
        loop {
            tokio::select! {
                _ = &mut p.done => return None,
                _ = p.stopping.wait_for(|s| *s) => return None,
                changed = p.tables.changed() => if changed.is_err() { return None },
            }
            if let Some(left) = p.mesh.hold_pushes() {
                debug!(node = %p.node, left_ms = left.as_millis() as u64, "holding pushes until every sidecar is back");
                tokio::select! {
                    _ = &mut p.done => return None,
                    _ = p.stopping.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(left) => {}
                }
            }
            let table = Arc::clone(&p.tables.borrow_and_update());
            if table.version == 0 {
                continue;
            }
            {
                let mut state = p.mesh.state();
                if state.was_rejected(&p.node, table.version) {
                    debug!(node = %p.node, version = table.version, "not resending a refused version");
                    continue;
                }
                if let Some(s) = state.sidecars.get_mut(&p.node) {
                    s.sent_version = table.version;
                }
            }
            // Only the services the sidecar routes to: a client of one service does not get
            // the whole mesh (what makes fan-out grow with the square of the mesh size).
            let message = ControlMessage {
                kind: Some(control_message::Kind::RoutingTable(for_subscriber(
                    &table,
                    &p.subscriptions,
                ))),
            };
            return Some((Ok(message), p));
        }
    }))
}

/// The part of `table` a sidecar subscribed to (all of it without subscriptions).
fn for_subscriber(table: &RoutingTable, subscriptions: &[String]) -> RoutingTable {
    if subscriptions.is_empty() {
        return table.clone();
    }
    RoutingTable {
        version: table.version,
        services: table
            .services
            .iter()
            .filter(|s| subscriptions.contains(&s.name))
            .cloned()
            .collect(),
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
    // Published by the next weight tick, like a join.
    mesh.state().disconnect(&node, session);
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

    async fn get_config_status(
        &self,
        _: Request<ConfigStatusRequest>,
    ) -> Result<Response<ConfigStatusResponse>, Status> {
        let config = self.mesh.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let status = self.mesh.config_status.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(ConfigStatusResponse {
            environment: config.environment.as_str().to_string(),
            sources: config.sources.clone(),
            reloads_applied: status.applied,
            reloads_refused: status.refused,
            last_error: status.last_error.clone(),
            effective_json: serde_json::to_string(&config).unwrap_or_default(),
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

    async fn list_scaling_decisions(
        &self,
        request: Request<ListScalingDecisionsRequest>,
    ) -> Result<Response<ListScalingDecisionsResponse>, Status> {
        let service = request.into_inner().service;
        let decisions = self
            .mesh
            .scaler
            .history((!service.is_empty()).then_some(service.as_str()));
        Ok(Response::new(ListScalingDecisionsResponse { decisions }))
    }

    async fn list_alerts(
        &self,
        _: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        Ok(Response::new(ListAlertsResponse {
            alerts: self.mesh.scaler.active_alerts(),
        }))
    }

    type WatchAlertsStream = BoxStream<Alert>;

    async fn watch_alerts(
        &self,
        _: Request<WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let alerts = self.mesh.scaler.subscribe_alerts();
        Ok(Response::new(broadcast_stream(
            alerts,
            self.mesh.stopping.subscribe(),
            |_| true,
        )))
    }

    async fn get_scaling_policies(
        &self,
        _: Request<GetScalingPoliciesRequest>,
    ) -> Result<Response<GetScalingPoliciesResponse>, Status> {
        let policies = self
            .mesh
            .scaler
            .policies()
            .iter()
            .map(|(name, p)| p.to_proto(name))
            .collect();
        Ok(Response::new(GetScalingPoliciesResponse { policies }))
    }

    async fn set_scaling_policy(
        &self,
        request: Request<SetScalingPolicyRequest>,
    ) -> Result<Response<cogmesh_proto::v1::ScalingPolicy>, Status> {
        let Some(p) = request.into_inner().policy else {
            return Err(Status::invalid_argument("policy: missing"));
        };
        let policy = crate::scaling::ScalingPolicy::from_proto(&p);
        match self.mesh.scaler.set_policy(&p.service, policy) {
            Ok(set) => Ok(Response::new(set.to_proto(&p.service))),
            Err(e) if e.starts_with("policy.") => Err(Status::invalid_argument(e)),
            Err(e) => Err(Status::not_found(e)),
        }
    }

    type WatchScalingDecisionsStream = BoxStream<ScalingDecision>;

    async fn watch_scaling_decisions(
        &self,
        request: Request<WatchScalingDecisionsRequest>,
    ) -> Result<Response<Self::WatchScalingDecisionsStream>, Status> {
        let service = request.into_inner().service;
        let decisions = self.mesh.scaler.subscribe();
        Ok(Response::new(broadcast_stream(
            decisions,
            self.mesh.stopping.subscribe(),
            move |d: &ScalingDecision| service.is_empty() || d.service == service,
        )))
    }
}

/// The items of a broadcast channel that pass `keep`, until shutdown. A subscriber too slow to
/// keep up gets `DATA_LOSS` saying how many it missed (the list RPCs have them), then goes on.
fn broadcast_stream<T: Clone + Send + 'static>(
    items: tokio::sync::broadcast::Receiver<T>,
    stopping: watch::Receiver<bool>,
    keep: impl Fn(&T) -> bool + Send + Sync + 'static,
) -> BoxStream<T> {
    use tokio::sync::broadcast::error::RecvError;
    Box::pin(futures_util::stream::unfold(
        (items, stopping, keep),
        |(mut items, mut stopping, keep)| async move {
            loop {
                let next = tokio::select! {
                    next = items.recv() => next,
                    _ = stopping.wait_for(|s| *s) => return None,
                };
                match next {
                    Ok(item) if keep(&item) => return Some((Ok(item), (items, stopping, keep))),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        let status = Status::data_loss(format!("{n} messages were missed; list them"));
                        return Some((Err(status), (items, stopping, keep)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::ServiceEndpoints;

    #[test]
    fn subscribers_get_only_their_services() {
        let table = RoutingTable {
            version: 3,
            services: ["gateway", "reasoning", "memory"]
                .iter()
                .map(|n| ServiceEndpoints {
                    name: n.to_string(),
                    endpoints: vec![],
                })
                .collect(),
        };
        let t = for_subscriber(&table, &["reasoning".to_string()]);
        assert_eq!(t.version, 3);
        assert_eq!(t.services.len(), 1);
        assert_eq!(t.services[0].name, "reasoning");
        assert_eq!(for_subscriber(&table, &[]).services.len(), 3);
        assert!(for_subscriber(&table, &["local".to_string()]).services.is_empty());
    }
}
