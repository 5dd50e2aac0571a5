//! `cogmesh control`: the control plane's gRPC server.
//!
//! - `MeshControl.Connect` ([`connect`]): one bidirectional stream per sidecar (Hello,
//!   LoadReports, ACK/NACK in; RoutingTable snapshots out). Pushes coalesce per sidecar through a
//!   `watch` channel: the latest table wins and at most one is in flight (the next goes out
//!   once the sidecar answered the last), with no fixed debounce.
//!   A version a sidecar NACKed is never sent to it again. Each version is encoded once and its
//!   bytes shared by every stream; a sidecar that takes deltas gets only the changes to the
//!   table it ACKed last (also encoded once per base version).
//! - `MeshAdmin`: services with endpoints and weights, per-sidecar sync status, table watch.
//! - gRPC health (`grpc.health.v1`) and reflection (v1), so `grpcurl` works without protos.
//!
//! Weights are recomputed every `weight_interval` from the reports received since the last
//! update (see [`weights`]); a new table version is made only when something changed.

pub mod config;
mod connect;
pub mod kubernetes;
pub mod leader;
mod metrics;
mod state;
pub mod weights;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cogmesh_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use cogmesh_proto::v1::identity_server::IdentityServer;
use cogmesh_proto::v1::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use cogmesh_proto::v1::{
    Alert, ConfigStatusRequest, ConfigStatusResponse, GetScalingPoliciesRequest, GetScalingPoliciesResponse,
    ListAlertsRequest, ListAlertsResponse, ListScalingDecisionsRequest, ListScalingDecisionsResponse,
    ListServicesRequest, ListServicesResponse, RoutingTable, ScalingDecision, SetScalingPolicyRequest,
    SyncStatusRequest, SyncStatusResponse, WatchAlertsRequest, WatchScalingDecisionsRequest,
    WatchTablesRequest,
};
use futures_util::Stream;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

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
    /// Where `GET /metrics` is served (bound by the caller from `admin_listen`), if anywhere.
    pub admin: Option<tokio::net::TcpListener>,
    /// The CA, access control and audit log (built from `resolved`'s `identity` and `auth`).
    pub security: crate::security::Security,
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
    /// Held through a weight update, so that at most one runs at a time.
    weighing: Mutex<()>,
    config: Mutex<config::Resolved>,
    config_status: Mutex<ConfigStatus>,
    /// The weight interval in force, in ms (a reload may change it).
    weight_interval_ms: std::sync::atomic::AtomicU64,
    /// An instance reported a load [`state::LOAD_SHIFT`] away from its last one.
    shift: LoadShift,
    /// The state's open window of reports (see [`state::OpenWindow`]).
    window: Arc<Mutex<state::OpenWindow>>,
    tables: watch::Sender<Arc<RoutingTable>>,
    metrics: metrics::Metrics,
    /// The current version's encoded frames, shared by every push stream.
    encoded: Mutex<connect::EncodedTables>,
    /// Turns true at shutdown: every sidecar stream ends, so the server can drain.
    stopping: watch::Sender<bool>,
    start: Instant,
    startup_grace: Duration,
    scaler: Arc<crate::scaling::Scaler>,
    access: Arc<crate::security::access::Access>,
    authority: Option<Arc<crate::security::certify::Authority>>,
}

/// A pending load shift (set by a stream's reader, taken by the weight ticker), and the wake-up
/// that goes with it. The next update, early or on the tick, reads every instance's load, so
/// it takes the shift whichever it is.
#[derive(Debug, Default)]
struct LoadShift {
    pending: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl LoadShift {
    fn signal(&self) {
        self.pending.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether a shift was pending; none is afterwards.
    fn take(&self) -> bool {
        self.pending.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
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

    fn encoded(&self) -> std::sync::MutexGuard<'_, connect::EncodedTables> {
        self.encoded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the configuration; a bad one is refused and the last good one stays.
    fn reload(&self, path: &std::path::Path) {
        let current = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = config::load(Some(path), &|k| std::env::var(k).ok())
            .map_err(|e| e.to_string())
            .and_then(|next| {
                if next.discovery != current.discovery {
                    return Err(format!(
                        "{}: discovery: changing it needs a restart",
                        next.sources.join(" + ")
                    ));
                }
                if next.leader_election != current.leader_election {
                    return Err(format!(
                        "{}: leader_election: changing it needs a restart",
                        next.sources.join(" + ")
                    ));
                }
                if next.admin_listen != current.admin_listen {
                    return Err(format!(
                        "{}: admin_listen: changing it needs a restart",
                        next.sources.join(" + ")
                    ));
                }
                if next.listen != current.listen {
                    return Err(format!(
                        "{}: listen: changing it ({} → {}) needs a restart",
                        next.sources.join(" + "),
                        current.listen,
                        next.listen
                    ));
                }
                if let Some(field) = crate::security::restart_needed(
                    (current.identity.as_ref(), current.auth.as_ref()),
                    (next.identity.as_ref(), next.auth.as_ref()),
                ) {
                    return Err(format!(
                        "{}: {field}: changing it needs a restart (callers, tokens and workloads reload)",
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
                    .config_reload
                    .get_or_create(&metrics::ReloadLabels { result: "applied" })
                    .inc();
                info!(environment = next.environment.as_str(), "configuration reloaded");
                self.weight_interval_ms
                    .store(next.weight_interval_ms, std::sync::atomic::Ordering::Relaxed);
                self.state().statics = next.services.clone();
                self.scaler.set_policies(&next.scaling);
                self.scaler.set_alerts(&next.alerts);
                self.access.set_auth(next.auth.as_ref());
                if let (Some(a), Some(i)) = (&self.authority, &next.identity) {
                    a.set_config(i.clone());
                }
                *self.config.lock().unwrap_or_else(|p| p.into_inner()) = next;
                drop(status);
                self.publish(state::Window::Reuse);
            }
            Err(e) => {
                status.refused += 1;
                self.metrics
                    .config_reload
                    .get_or_create(&metrics::ReloadLabels { result: "refused" })
                    .inc();
                warn!("configuration refused, keeping the last good one: {e}");
                status.last_error = e;
            }
        }
    }

    /// Recomputes and publishes a new table if anything changed.
    fn publish(&self, window: state::Window) {
        let now = self.now_secs();
        // One update at a time (the ticker and a reload may both call this).
        let _one = state::lock(&self.weighing);
        // Inputs under the state lock, the update without it, the new version under it again:
        // reports, ACKs and pushes wait only for the copy and the comparison.
        let (inputs, book) = {
            let mut state = self.state();
            (state.weight_inputs(window), state.book())
        };
        let services = state::lock(&book).update(inputs, now);
        let table = self.state().publish(services);
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
    let control_metrics = metrics::Metrics::with_security(&config.security.metrics);
    let scaling_metrics = control_metrics.scaling.clone();
    let state = MeshState::with_statics(config.resolved.services.clone());
    let mesh = Arc::new(Mesh {
        window: state.open_window(),
        state: Mutex::new(state),
        weighing: Mutex::default(),
        weight_interval_ms: std::sync::atomic::AtomicU64::new(config.resolved.weight_interval_ms),
        shift: LoadShift::default(),
        config: Mutex::new(config.resolved.clone()),
        config_status: Mutex::new(ConfigStatus::default()),
        tables,
        encoded: Mutex::default(),
        metrics: control_metrics,
        stopping,
        start: Instant::now(),
        startup_grace: config.startup_grace,
        scaler: Arc::new(crate::scaling::Scaler::new(
            &config.resolved.scaling,
            &config.resolved.alerts,
            listener.local_addr().unwrap_or(config.resolved.listen),
            scaling_metrics,
        )),
        access: Arc::clone(&config.security.access),
        authority: config.security.authority.clone(),
    });
    mesh.publish(state::Window::Reuse);
    let (leadership, election) = match config.resolved.leader_election.clone() {
        None => (leader::Leadership::sole(), None),
        Some(election) => {
            let leadership = leader::Leadership::follower();
            let task = tokio::spawn(leader::run(
                election,
                leadership.clone(),
                |_| {},
                mesh.metrics.leader.clone(),
                mesh.stopping.subscribe(),
            ));
            (leadership, Some(task))
        }
    };
    let scaling = spawn_scaling(Arc::clone(&mesh), config.resolved.scaling.interval_ms, leadership);
    let kubernetes_scaling = match (
        mesh.scaler.take_kubernetes_queue(),
        &config.resolved.scaling.kubernetes,
    ) {
        (Some(queue), Some(k)) => {
            let deployments = config
                .resolved
                .scaling
                .services
                .iter()
                .filter_map(|(n, s)| Some((n.clone(), s.deployment.clone()?)))
                .collect();
            Some(tokio::spawn(crate::scaling::kubernetes::run(
                queue,
                k.clone(),
                deployments,
            )))
        }
        _ => None,
    };

    // Weight ticks at a fixed rate: sleeping an interval after each update would stretch the
    // period by the update's own time (at 10 000 sidecars, 100 ms ticks came 130–145 ms apart).
    // An instance whose own load shifts does not wait for the tick (see `state::Window`).
    let ticker = {
        let mesh = Arc::clone(&mesh);
        tokio::spawn(async move {
            let period = |mesh: &Mesh| {
                Duration::from_millis(
                    mesh.weight_interval_ms
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .max(1),
                )
            };
            let every = |period: Duration| {
                let mut every = tokio::time::interval_at(Instant::now() + period, period);
                // A late update is followed by a full interval, not by a burst of catch-up ones.
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            };
            // On a blocking thread: an update takes milliseconds at 10 000 sidecars, and on a
            // runtime worker it would hold up the pushes of a fan-out that much.
            let update = |window: state::Window| {
                let mesh = Arc::clone(&mesh);
                async move {
                    let _ = tokio::task::spawn_blocking(move || mesh.publish(window)).await;
                }
            };
            let mut current = period(&mesh);
            let mut ticks = every(current);
            // At most one early update between two ticks: a fleet whose loads all swing
            // costs at most twice the updates of a quiet one, and waits for the tick. An early
            // update restarts the interval, so the next version does not go out while this
            // one's fan-out still runs (at 10 000 sidecars that takes ~100 ms).
            let mut early = true;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        mesh.shift.take();
                        update(state::Window::Close).await;
                        early = true;
                    }
                    _ = mesh.shift.wake.notified(), if early => {
                        // A shift the last tick already read leaves a stale wake-up behind.
                        if mesh.shift.take() {
                            update(state::Window::Reuse).await;
                            ticks.reset();
                            early = false;
                        }
                    }
                }
                // A reload may have changed the interval.
                if period(&mesh) != current {
                    current = period(&mesh);
                    ticks = every(current);
                }
            }
        })
    };
    let admin = config
        .admin
        .map(|l| tokio::spawn(metrics::serve(l, Arc::clone(&mesh))));
    let discovery = config
        .resolved
        .discovery
        .kubernetes
        .clone()
        .map(|k| tokio::spawn(kubernetes::run(Arc::clone(&mesh), k)));
    let watcher = config
        .path
        .clone()
        .map(|path| tokio::spawn(watch_config(Arc::clone(&mesh), path)));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<connect::ControlRoute>().await;
    health.set_serving::<MeshAdminServer<AdminService>>().await;
    health
        .set_serving::<IdentityServer<crate::security::certify::IdentityService>>()
        .await;
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
    // No Nagle delay on the push streams' last partial segment.
    let incoming = futures_util::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |accepted| {
            accepted.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = config.security.tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(crate::security::access::AccessLayer {
            access: Arc::clone(&mesh.access),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(connect::ControlRoute {
            mesh: Arc::clone(&mesh),
        })
        .add_service(MeshAdminServer::new(AdminService {
            mesh: Arc::clone(&mesh),
        }))
        .add_service(IdentityServer::new(crate::security::certify::IdentityService {
            authority: config.security.authority.clone(),
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
    if let Some(k) = kubernetes_scaling {
        k.abort();
    }
    if let Some(w) = watcher {
        w.abort();
    }
    if let Some(d) = discovery {
        d.abort();
    }
    if let Some(a) = admin {
        a.abort();
    }
    if let Some(election) = election {
        // The leader hands the Lease over on its way out (bounded: an unreachable API server
        // must not hold the exit).
        if tokio::time::timeout(Duration::from_secs(3), election)
            .await
            .is_err()
        {
            warn!("leader election did not finish releasing the Lease");
        }
    }
    let scaler = Arc::clone(&mesh_for_shutdown.scaler);
    let _ = tokio::task::spawn_blocking(move || scaler.shutdown()).await;
    result
}

/// Starts the process backend's replicas, then decides every `interval_ms`.
fn spawn_scaling(
    mesh: Arc<Mesh>,
    interval_ms: u64,
    leadership: leader::Leadership,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let scaler = Arc::clone(&mesh.scaler);
        let _ = tokio::task::spawn_blocking(move || scaler.start()).await;
        let mut every = tokio::time::interval(Duration::from_millis(interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let view = mesh.state().services_view();
            let services = view.services();
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let scaler = Arc::clone(&mesh.scaler);
            let leading = leadership.is_leader();
            let _ = tokio::task::spawn_blocking(move || scaler.tick(&services, unix_ms, leading)).await;
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
            // Reading the files (as every reload does) is not a change: reacting to it would
            // reload again and again, counting one bad edit as many refusals.
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
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

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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
            services: {
                let view = self.mesh.state().services_view();
                view.services()
            },
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
        let caller = crate::security::access::caller_of(&request);
        let Some(p) = request.into_inner().policy else {
            return Err(Status::invalid_argument("policy: missing"));
        };
        let policy = crate::scaling::ScalingPolicy::from_proto(&p);
        let before = self
            .mesh
            .scaler
            .policies()
            .into_iter()
            .find(|(name, _)| *name == p.service)
            .map(|(_, before)| before);
        let result = self.mesh.scaler.set_policy(&p.service, policy.clone());
        let json = |p: &crate::scaling::ScalingPolicy| serde_json::to_value(p).ok();
        let (outcome, reason, after) = match &result {
            Ok(set) => (crate::security::audit::Outcome::Allowed, "", json(set)),
            Err(e) => (crate::security::audit::Outcome::Failed, e.as_str(), json(&policy)),
        };
        self.mesh.access.audit.write(&crate::security::audit::Record {
            time: crate::security::audit::now_rfc3339(),
            caller: &caller.name,
            role: caller.role.as_str(),
            method: "cogmesh.v1.MeshAdmin/SetScalingPolicy",
            target: &p.service,
            result: outcome,
            reason,
            before: before.as_ref().and_then(json),
            after,
        });
        match result {
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
