//! The HTTP/1.1 upstream pool: idle keep-alive connections per endpoint, shared by every worker.
//!
//! Each endpoint keeps one idle list per worker thread. A connection's task runs on the runtime
//! that opened it, so a request on another worker's connection costs two cross-thread wake-ups.
//! A worker therefore takes its own most recent idle connection, else opens a new one (each
//! worker's list grows to the concurrency it sees, as Envoy's per-worker pools do), and borrows
//! another worker's idle connection only when `max_connections` refuses a new one: then a
//! shared connection is better than a 503. (Borrowing first, as this pool once did, sent about
//! one request in 18 across threads at two workers under load, for ever: a worker that borrows
//! never grows its own list.) The owning worker's list is locked by that worker alone on the hot
//! path, so the lock is uncontended.
//!
//! A connection goes back to its owner's list when its response body has ended (see
//! [`super::ProxyBody`]), whichever worker borrowed it; one whose response was abandoned
//! half-way is closed, since the rest of that response would still be on the wire.
//!
//! Idle connections close after the idle timeout without reading the clock per request: each
//! worker runs [`Http1Pool::sweep`] every half timeout, which closes the connections that have
//! not been used across two sweeps — after between one and one and a half idle timeouts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::UpstreamBody;
use crate::balance::Endpoint;
use crate::breaker::{Breaker, ConnectionPermit};
use crate::error::{error_chain, ProxyError};

/// How upstream HTTP/1.1 connections are opened and kept.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    /// The sweep count of its list when it went idle.
    since: u64,
}

/// One worker's idle connections to an endpoint; the most recently used one is last. Aligned
/// to a cache line pair so two workers' lists never share one.
#[repr(align(128))]
#[derive(Default)]
struct Slot {
    idle: Vec<Idle>,
    sweeps: u64,
}

/// The idle HTTP/1.1 connections of one endpoint.
pub struct Http1Pool {
    slots: Box<[Mutex<Slot>]>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").field("idle", &self.idle()).finish()
    }
}

impl Default for Http1Pool {
    fn default() -> Self {
        let n = crate::worker::count();
        Http1Pool {
            slots: (0..n).map(|_| Mutex::default()).collect(),
        }
    }
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Http1Pool {
    fn own_slot(&self) -> usize {
        crate::worker::index() % self.slots.len()
    }

    /// This worker's most recent idle connection that is still open.
    fn take_own(&self) -> Option<SendRequest<UpstreamBody>> {
        take_open(&mut lock(&self.slots[self.own_slot()]).idle)
    }

    /// Another worker's idle connection and that worker's index, for when this worker may not
    /// open one. A list its owner is using at the moment is passed over.
    fn borrow(&self) -> Option<(SendRequest<UpstreamBody>, usize)> {
        let own = self.own_slot();
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != own)
            .find_map(|(i, slot)| Some((take_open(&mut slot.try_lock().ok()?.idle)?, i)))
    }

    /// Puts a connection whose response has ended back in its owner's list.
    fn put(&self, sender: SendRequest<UpstreamBody>, owner: usize) {
        if sender.is_closed() {
            return;
        }
        let mut slot = lock(&self.slots[owner]);
        let since = slot.sweeps;
        slot.idle.push(Idle { sender, since });
    }

    /// Closes this worker's connections that have been idle since before its previous sweep;
    /// run every half idle timeout, that is an idle time between one and one and a half
    /// timeouts.
    pub fn sweep(&self) {
        let mut slot = lock(&self.slots[self.own_slot()]);
        let now = slot.sweeps;
        slot.idle.retain(|i| !i.sender.is_closed() && i.since + 1 >= now);
        slot.sweeps += 1;
    }

    /// Idle connections over all workers.
    pub fn idle(&self) -> usize {
        self.slots.iter().map(|s| lock(s).idle.len()).sum()
    }
}

/// Pops the most recent connection that is still open; closed ones are dropped.
fn take_open(idle: &mut Vec<Idle>) -> Option<SendRequest<UpstreamBody>> {
    while let Some(i) = idle.pop() {
        if !i.sender.is_closed() {
            return Some(i.sender);
        }
    }
    None
}

/// A connection lent to one request; the response body gives it back with [`Lease::release`].
pub struct Lease {
    sender: SendRequest<UpstreamBody>,
    endpoint: Arc<Endpoint>,
    /// The worker whose runtime drives the connection.
    owner: usize,
}

impl Lease {
    pub fn release(self) {
        self.endpoint.http1.put(self.sender, self.owner);
    }
}

/// Sends `req` (origin-form URI, Host set) to `endpoint` on a pooled or new connection.
///
/// A pooled connection the upstream closed meanwhile hands the unsent request back, and it goes
/// out on the next connection; a request that reached the wire is never sent twice.
///
/// A new connection needs a slot in the service's `max_connections` (`breaker`), which it keeps
/// until it closes; without one, another worker's idle connection is borrowed, and without
/// that the request is refused as overloaded.
pub async fn send(
    endpoint: &Arc<Endpoint>,
    mut req: Request<UpstreamBody>,
    settings: PoolSettings,
    tls: Option<&crate::tls::client::ServiceTlsClient>,
    breaker: &Arc<Breaker>,
) -> Result<(http::Response<Incoming>, Lease), ProxyError> {
    let addr = endpoint.addr;
    loop {
        let pool = &endpoint.http1;
        let (mut sender, owner, pooled) = match pool.take_own() {
            Some(s) => (s, pool.own_slot(), true),
            None => match breaker.connection_slot() {
                Some(permit) => {
                    let s = match tls {
                        None => Box::pin(connect(addr, settings.connect_timeout, permit)).await?,
                        Some(tls) => Box::pin(connect_tls(addr, tls, permit)).await?,
                    };
                    (s, pool.own_slot(), false)
                }
                None => match pool.borrow() {
                    Some((s, owner)) => (s, owner, true),
                    None => return Err(breaker.connections_overflowed()),
                },
            },
        };
        if let Err(e) = sender.ready().await {
            if pooled {
                continue;
            }
            return Err(reset(addr, &e));
        }
        match sender.try_send_request(req).await {
            Ok(response) => {
                let lease = Lease {
                    sender,
                    endpoint: Arc::clone(endpoint),
                    owner,
                };
                return Ok((response, lease));
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if pooled => {
                    debug!(endpoint = %addr, "pooled connection closed before the request went out; retrying on another");
                    req = unsent;
                }
                _ => return Err(reset(addr, e.error())),
            },
        }
    }
}

fn reset(endpoint: SocketAddr, err: &hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset {
        endpoint,
        cause: error_chain(err),
    }
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    permit: ConnectionPermit,
) -> Result<SendRequest<UpstreamBody>, ProxyError> {
    let stream = connect_tcp(addr, timeout).await?;
    handshake(addr, stream, permit).await
}

/// A TCP connection to an endpoint within `timeout`, with `TCP_NODELAY`; a failure is
/// `upstream_connect` with its cause.
pub(super) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let failed = |cause: String| ProxyError::UpstreamConnect {
        endpoint: addr,
        cause,
    };
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "connect timed out after {} ms",
                timeout.as_millis()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a TLS connection (see [`crate::tls::client`]) for HTTP/1.1.
async fn connect_tls(
    addr: SocketAddr,
    tls: &crate::tls::client::ServiceTlsClient,
    permit: ConnectionPermit,
) -> Result<SendRequest<UpstreamBody>, ProxyError> {
    let stream = tls
        .connect_http1(addr)
        .await
        .map_err(|cause| ProxyError::UpstreamConnect {
            endpoint: addr,
            cause,
        })?;
    handshake(addr, stream, permit).await
}

/// The HTTP/1.1 client handshake on an open connection; the connection is driven by a task,
/// which keeps its `max_connections` slot.
async fn handshake<IO>(
    addr: SocketAddr,
    io: IO,
    permit: ConnectionPermit,
) -> Result<SendRequest<UpstreamBody>, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::UpstreamConnect {
            endpoint: addr,
            cause: error_chain(&e),
        })?;
    tokio::spawn(Drive {
        connection: Box::pin(connection.with_upgrades()),
        addr,
        _permit: permit,
    });
    Ok(sender)
}

/// Runs one upstream connection until it closes. A hand-written future rather than an async
/// block: rustc cannot prove an async block holding this connection `Send` (the body's boxed
/// error type trips its higher-ranked lifetime check), while the struct is plainly `Send`.
struct Drive {
    connection: std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>,
    addr: SocketAddr,
    /// The connection's slot in `max_connections`, given back when it ends.
    _permit: ConnectionPermit,
}

impl std::future::Future for Drive {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let addr = self.addr;
        match self.connection.as_mut().poll(cx) {
            std::task::Poll::Ready(Err(e)) => {
                debug!(endpoint = %addr, "upstream connection ended: {}", error_chain(&e));
                std::task::Poll::Ready(())
            }
            std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(()),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}
