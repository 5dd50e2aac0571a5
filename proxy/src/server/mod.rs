//! Process shape: one `current_thread` tokio runtime per worker thread, each with its own
//! `SO_REUSEPORT` listener socket per configured listener (thread-per-core; DESIGN.md measured it
//! ≈18 % ahead of the work-stealing runtime). The routing table, endpoint statistics, metrics and
//! the upstream pool are shared by every worker without locks on the request path.
//!
//! The main thread runs the admin server and waits for SIGTERM/SIGINT; then every worker stops
//! accepting, asks its connections to finish (HTTP/2 GOAWAY, HTTP/1 closes after the in-flight
//! response) and waits for them up to the drain timeout.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::ProxyConfig;
use crate::forward::{h2_lane, relay, Forward, Shared, Upstreams};
use crate::hardening::GuardedIo;
use crate::metrics::Metrics;
use crate::route::{EndpointOverrides, RoutingTable, SharedTable};

/// Why the proxy could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    /// A configuration that only proved unusable at start (unreadable identity files, a key
    /// that does not match its certificate).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Observe(String),
    /// No workload certificate from the control plane in time.
    #[error("{0}")]
    Identity(String),
}

/// What the admin server shows and the workers share.
pub struct State {
    /// The configuration in force; a reload swaps it (see [`crate::reload`]).
    pub config: ArcSwap<ProxyConfig>,
    pub metrics: Metrics,
    pub table: SharedTable,
    pub ready: AtomicBool,
    /// Endpoints pushed by the control plane and the table version they came from; they
    /// survive configuration reloads. The lock also serializes table rebuilds.
    pub pushed: Mutex<(EndpointOverrides, u64)>,
    /// The outcome of the last configuration reload, for `/config`.
    pub last_reload: Mutex<Option<crate::reload::ReloadOutcome>>,
    /// The sidecar's TLS identity and what origination needs, with `tls` configured.
    pub tls: Option<crate::tls::client::Origin>,
    /// Spans and the access log; both `None` when off (see [`crate::observe`]).
    pub observe: crate::observe::Observe,
    /// Per listener, the identity it terminates TLS with (see `crate::tls::server`).
    pub listener_identities: Vec<Option<Arc<crate::tls::IdentityStore>>>,
}

impl State {
    /// Rebuilds the routing table from the configuration in force and the pushed endpoints,
    /// keeping endpoint statistics, and swaps it in. `update` may change the pushed endpoints
    /// first (under the same lock, so two rebuilds never race).
    pub fn rebuild_table(&self, update: impl FnOnce(&mut (EndpointOverrides, u64))) {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        update(&mut pushed);
        let config = self.config.load();
        let current = self.table.load();
        let next = RoutingTable::build_with(
            &config,
            Some(&current),
            &self.metrics,
            &pushed.0,
            pushed.1,
            self.tls.as_ref(),
        );
        self.table.store(Arc::new(next));
    }
}

/// Binds everything, serves until SIGTERM/SIGINT, drains, and returns. With `source`, the
/// configuration file is watched and reloaded (see [`crate::reload`]).
pub fn run(config: ProxyConfig, source: Option<crate::reload::ConfigSource>) -> Result<(), ServeError> {
    let admin_listener = bind(config.admin, false).map_err(|source| ServeError::Bind {
        what: "the admin server".into(),
        addr: config.admin,
        source,
    })?;
    let reuse_port = config.workers > 1;
    let mut sockets: Vec<Vec<(usize, StdTcpListener)>> = (0..config.workers).map(|_| Vec::new()).collect();
    for (index, l) in config.listeners.iter().enumerate() {
        for worker in sockets.iter_mut() {
            let socket = bind(l.address, reuse_port).map_err(|source| ServeError::Bind {
                what: format!("listener {:?}", l.name),
                addr: l.address,
                source,
            })?;
            worker.push((index, socket));
        }
    }

    crate::worker::set_count(config.workers);
    let metrics = Metrics::new();
    // The main thread's runtime (admin server, control-plane client, span export) exists before
    // the workers, so the span exporter can be built inside it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let (observe, exporting) = runtime
        .block_on(async { crate::observe::Observe::start(&config, &metrics) })
        .map_err(ServeError::Observe)?;
    let file = source
        .as_ref()
        .map_or_else(|| "<command line>".to_string(), |s| s.path.display().to_string());
    // A TLS identity issued by the control plane: the first certificate comes before TLS starts.
    if config.tls.is_some() {
        let limit = Duration::from_secs(crate::identity::FIRST_CERTIFICATE_TIMEOUT_SECS);
        runtime
            .block_on(crate::identity::first_certificate(
                &config,
                &metrics.identity,
                limit,
            ))
            .map_err(ServeError::Identity)?;
    }
    let tls = match &config.tls {
        None => None,
        Some(t) => Some(crate::tls::client::Origin::load(t, &config, &metrics.tls, &file)?),
    };
    let listener_identities = crate::tls::server::listener_identities(
        &config,
        tls.as_ref().map(|o| &o.store),
        &metrics.tls,
        &file,
    )?;
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::build_with(
        &config,
        None,
        &metrics,
        &EndpointOverrides::new(),
        0,
        tls.as_ref(),
    )));
    let _ = metrics.table.set(Arc::clone(&table));
    let upstreams = Upstreams::new(&config);
    let drain = Duration::from_millis(config.drain_timeout_ms);
    let state = Arc::new(State {
        config: ArcSwap::from_pointee(config),
        metrics,
        table,
        ready: AtomicBool::new(false),
        pushed: Mutex::new((EndpointOverrides::new(), 0)),
        last_reload: Mutex::new(None),
        tls,
        observe,
        listener_identities,
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut workers = Vec::new();
    for (i, listeners) in sockets.into_iter().enumerate() {
        let state = Arc::clone(&state);
        let upstreams = upstreams.clone();
        let stop = stop_rx.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        let handle = std::thread::Builder::new()
            .name(format!("cogmesh-worker-{i}"))
            .spawn(move || {
                crate::worker::enter(i);
                runtime.block_on(worker(listeners, state, upstreams, stop, drain))
            })
            .map_err(ServeError::Runtime)?;
        workers.push(handle);
    }

    runtime.block_on(async {
        let admin_listener = TcpListener::from_std(admin_listener).map_err(ServeError::Runtime)?;
        tokio::spawn(admin::serve(admin_listener, Arc::clone(&state)));
        let config = state.config.load_full();
        if let Some(control) = config.control.clone() {
            tokio::spawn(crate::control::run(Arc::clone(&state), control));
        }
        crate::identity::spawn(&config, &state.metrics.identity);
        if let Some(source) = source {
            tokio::spawn(crate::reload::watch(Arc::clone(&state), source));
        }
        if let (Some(origin), Some(true)) = (&state.tls, config.tls.as_ref().map(|t| t.watch)) {
            tokio::spawn(crate::tls::identity::watch(Arc::clone(&origin.store)));
        }
        // Listeners with certificates of their own watch them too.
        for store in state.listener_identities.iter().flatten() {
            if !state.tls.as_ref().is_some_and(|o| Arc::ptr_eq(&o.store, store)) {
                tokio::spawn(crate::tls::identity::watch(Arc::clone(store)));
            }
        }
        state.ready.store(true, Ordering::Release);
        for l in &config.listeners {
            info!(listener = %l.name, address = %l.address, direction = l.direction.as_str(), "listening");
        }
        info!(address = %config.admin, workers = config.workers, "admin server listening");
        wait_for_signal().await;
        state.ready.store(false, Ordering::Release);
        let delay = Duration::from_millis(state.config.load().shutdown_delay_ms);
        if !delay.is_zero() {
            info!(
                delay_ms = delay.as_millis() as u64,
                "shutting down: still serving (not ready) before draining; a second signal drains at once"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wait_for_signal() => {}
            }
        }
        info!(
            drain_ms = drain.as_millis() as u64,
            "shutting down: draining connections"
        );
        let _ = stop_tx.send(true);
        for w in workers {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        // The workers are gone: the spans still queued are exported.
        if let Some(flush) = exporting {
            flush.finish(crate::otel::FLUSH_TIMEOUT).await;
        }
        info!("stopped");
        Ok(())
    })
}

/// A listening socket; with `reuse_port`, several sockets share the address and the kernel
/// spreads connections over them.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<StdTcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]:P` is IPv6 only, so `0.0.0.0:P` can be a listener of its own (transparent mode
        // has both).
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

fn server_builder(config: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_read_timeout = Duration::from_millis(config.header_read_timeout_ms);
    crate::hardening::configure(&mut builder, &config.limits, header_read_timeout);
    builder
}

async fn worker(
    listeners: Vec<(usize, StdTcpListener)>,
    state: Arc<State>,
    upstreams: Upstreams,
    stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = Arc::new(GracefulShutdown::new());
    let builder = Arc::new(server_builder(&state.config.load()));
    tokio::spawn(sweep_idle(
        Arc::clone(&state),
        upstreams.idle_timeout(),
        stop.clone(),
    ));
    tokio::spawn(keep_a_timer_due(stop.clone()));
    let mut accepting = Vec::new();
    for (index, socket) in listeners {
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot register listener: {e}");
                continue;
            }
        };
        accepting.push(tokio::spawn(accept_loop(
            listener,
            index,
            Arc::clone(&state),
            upstreams.clone(),
            Arc::clone(&builder),
            Arc::clone(&graceful),
            stop.clone(),
        )));
    }
    for task in accepting {
        let _ = task.await;
    }
    // Every accept loop has ended and dropped its handle.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return;
    };
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("drain timeout reached with connections still open; closing them");
    }
}

/// How soon a timer is always due on a worker's runtime (see [`keep_a_timer_due`]).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`TIMER_TICK`] on this worker's runtime. Tokio's timer driver wakes
/// its thread (an eventfd write, then one more turn of `epoll_wait`) whenever a new timer is due
/// sooner than every timer already set. Without a near one, the response timeout of each request
/// was such a timer: two system calls more per request (seen with strace). With this tick only a
/// timer shorter than the tick wakes the driver.
async fn keep_a_timer_due(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Closes this worker's upstream connections that stayed idle past the idle timeout (see
/// [`crate::forward::Http1Pool::sweep`]).
async fn sweep_idle(state: Arc<State>, idle_timeout: Duration, mut stop: watch::Receiver<bool>) {
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let table = state.table.load();
        for service in &table.services {
            for endpoint in service.endpoints.endpoints() {
                endpoint.http1.sweep();
                endpoint.relay.sweep();
                endpoint.http2.sweep(idle_timeout);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    index: usize,
    state: Arc<State>,
    upstreams: Upstreams,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    // Listeners cannot change on reload (see crate::reload), so this copy stays accurate.
    let config = state.config.load().listeners[index].clone();
    let open = state.metrics.connections(config.direction.as_str(), &config.name);
    let (accepted_total, bytes) = state.metrics.tcp(config.direction.as_str(), &config.name);
    let limits = state.config.load().limits.clone();
    let header_read_timeout = Duration::from_millis(state.config.load().header_read_timeout_ms);
    let acceptor = match (&config.tls, &state.listener_identities[index]) {
        (Some(t), Some(store)) => Some(Arc::new(crate::tls::server::ListenerAcceptor::new(
            t,
            Arc::clone(store),
            state.metrics.tls.clone(),
            &config.name,
        ))),
        _ => None,
    };
    let shared = Arc::new(Shared {
        table: Arc::clone(&state.table),
        upstreams,
        limits: limits.clone(),
        observe: state.observe.clone(),
    });
    let servers = Arc::new(Servers {
        hyper: builder,
        limits: limits.clone(),
        header_read_timeout,
        refused: state
            .metrics
            .requests_refused(config.direction.as_str(), &config.name),
        stop: stop.clone(),
        own_http2_codec: state.config.load().own_http2_codec,
    });
    let capture =
        crate::transparent::Capture::for_listener(&state.config.load(), index, &state.metrics.transparent);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(listener = %config.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        accepted_total.inc();
        let watcher = graceful.watcher();
        let open = open.clone();
        open.inc();
        let (shared, servers, bytes) = (Arc::clone(&shared), Arc::clone(&servers), bytes.clone());
        if let Some(acceptor) = acceptor.clone() {
            tokio::spawn(async move {
                if let Some((stream, identity)) = acceptor.accept(stream, peer).await {
                    let stream = crate::metrics::CountedIo::new(stream, bytes);
                    // As on plain text: nothing is sent before the client's first bytes (an
                    // HTTP/2 server's SETTINGS would be), and they decide the server.
                    if let Some((io, read)) = h2_lane::sniff(stream, servers.header_read_timeout).await {
                        let service = Forward::new(shared, index, peer, Some(identity));
                        servers
                            .serve(relay::Prefixed::new(io, read), service, watcher, peer)
                            .await;
                    }
                }
                open.dec();
            });
            continue;
        }
        let relay_on = state.config.load().http1_relay;
        let serve_http = move |stream, pinned: Option<Arc<str>>| async move {
            let stream = crate::metrics::CountedIo::new(stream, bytes);
            let (io, read) = if relay_on && relay::enabled(&shared) {
                let lane = relay::Lane {
                    shared: Arc::clone(&shared),
                    listener: index,
                    client_ip: peer.ip().to_string(),
                    pinned: pinned.clone(),
                    stop: servers.stop.clone(),
                    header_read_timeout: servers.header_read_timeout,
                };
                match relay::serve(stream, lane).await {
                    relay::Ended::Closed => return,
                    relay::Ended::Handoff(io, read) => (io, read),
                }
            } else {
                match h2_lane::sniff(stream, servers.header_read_timeout).await {
                    Some(started) => started,
                    None => return,
                }
            };
            let service = Forward::new(Arc::clone(&shared), index, peer, None).pinned_to(pinned);
            servers
                .serve(relay::Prefixed::new(io, read), service, watcher, peer)
                .await;
        };
        match &capture {
            None => tokio::spawn(async move {
                serve_http(stream, None).await;
                open.dec();
            }),
            Some(capture) => {
                let (capture, table) = (Arc::clone(capture), state.table.load_full());
                tokio::spawn(async move {
                    capture.handle(stream, table, serve_http).await;
                    open.dec();
                })
            }
        };
    }
}

/// What serving a connection of a listener takes once its first bytes are read; one per
/// listener, shared by its connections.
struct Servers {
    /// hyper's server: HTTP/1.1 the relay did not serve (and any HTTP/2 not recognised as such).
    hyper: Arc<auto::Builder<TokioExecutor>>,
    limits: crate::hardening::LimitsConfig,
    header_read_timeout: Duration,
    /// Requests refused as smuggling attempts (see [`GuardedIo`]).
    refused: prometheus_client::metrics::counter::Counter,
    /// Set when the proxy drains.
    stop: watch::Receiver<bool>,
    /// HTTP/2 clients go to [`crate::forward::h2_server`] rather than the lane on `h2`.
    own_http2_codec: bool,
}

impl Servers {
    /// Serves one accepted connection (plaintext or TLS) whose first bytes `stream` holds, until
    /// it ends or the drain closes it: when they are HTTP/2's preface, on the own HTTP/2 server
    /// (or, with `own_http2_codec: false`, the lane on `h2`); on hyper's server otherwise.
    /// `watcher` keeps the drain waiting until then.
    async fn serve<IO>(
        &self,
        stream: relay::Prefixed<IO>,
        service: Forward,
        watcher: hyper_util::server::graceful::Watcher,
        peer: SocketAddr,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if stream.prefix().starts_with(h2_lane::PREFACE_START) {
            let stop = self.stop.clone();
            if self.own_http2_codec {
                crate::forward::h2_server::serve(
                    stream,
                    service,
                    &self.limits,
                    self.header_read_timeout,
                    stop,
                )
                .await;
            } else {
                h2_lane::serve(stream, service, &self.limits, self.header_read_timeout, stop).await;
            }
            drop(watcher);
            return;
        }
        let stream = GuardedIo::new(
            stream,
            &self.limits,
            self.header_read_timeout,
            self.refused.clone(),
        );
        let conn = self
            .hyper
            .serve_connection_with_upgrades(TokioIo::new(stream), service);
        if let Err(e) = watcher.watch(conn).await {
            debug!(%peer, "connection ended with an error: {e}");
        }
    }
}
