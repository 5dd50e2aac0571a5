//! The HTTP/1.1 upstream pool: idle keep-alive connections per endpoint, shared by every worker.
//!
//! Each endpoint keeps one idle list per worker thread. A worker takes back the connections its
//! own runtime drives first (a connection's task runs on the runtime that opened it, so using
//! another worker's connection costs two cross-thread wake-ups per request), then borrows an
//! idle connection of another worker, and only then opens a new one. The owning worker's list
//! is locked by that worker alone on the hot path, so the lock is uncontended.
//!
//! A connection goes back to the pool when its response body has ended (see
//! [`super::ProxyBody`]); one whose response was abandoned half-way is closed, since the rest
//! of that response would still be on the wire. Idle connections close after the idle timeout:
//! checked when a list is used, and by [`Http1Pool::sweep`] for endpoints nobody calls.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::balance::Endpoint;
use crate::error::{error_chain, ProxyError};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}
static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// Sets how many idle lists each endpoint gets; call before the first endpoint is made.
pub fn set_worker_count(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// Marks the calling thread as worker `index`.
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// How upstream HTTP/1.1 connections are opened and kept.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// The idle HTTP/1.1 connections of one endpoint.
pub struct Http1Pool {
    /// One list per worker; the most recently used connection is last.
    slots: Box<[Mutex<Vec<Idle>>]>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").field("idle", &self.idle()).finish()
    }
}

impl Default for Http1Pool {
    fn default() -> Self {
        let n = WORKERS.load(Ordering::Relaxed);
        Http1Pool {
            slots: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

fn lock(slot: &Mutex<Vec<Idle>>) -> MutexGuard<'_, Vec<Idle>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Http1Pool {
    fn own_slot(&self) -> usize {
        WORKER.with(|w| w.get()) % self.slots.len()
    }

    /// An idle open connection: this worker's most recent one, else another worker's.
    fn take(&self, idle_timeout: Duration) -> Option<SendRequest<Incoming>> {
        let now = Instant::now();
        let own = self.own_slot();
        if let Some(s) = take_live(&mut lock(&self.slots[own]), now, idle_timeout) {
            return Some(s);
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != own)
            .find_map(|(_, slot)| take_live(&mut *slot.try_lock().ok()?, now, idle_timeout))
    }

    /// Puts a connection whose response has ended back for the next request.
    pub fn put(&self, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        lock(&self.slots[self.own_slot()]).push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes this worker's connections that have been idle longer than `idle_timeout`.
    pub fn sweep(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut slot = lock(&self.slots[self.own_slot()]);
        slot.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) <= idle_timeout);
    }

    /// Idle connections over all workers, for tests and `/config`.
    pub fn idle(&self) -> usize {
        self.slots.iter().map(|s| lock(s).len()).sum()
    }
}

/// Pops the most recent connection that is open and not idle too long; the ones passed over
/// are closed (dropping the sender ends an idle connection).
fn take_live(slot: &mut Vec<Idle>, now: Instant, idle_timeout: Duration) -> Option<SendRequest<Incoming>> {
    while let Some(idle) = slot.pop() {
        if !idle.sender.is_closed() && now.duration_since(idle.since) <= idle_timeout {
            return Some(idle.sender);
        }
    }
    None
}

/// A connection lent to one request; the response body gives it back with [`Lease::release`].
pub struct Lease {
    sender: SendRequest<Incoming>,
    endpoint: Arc<Endpoint>,
}

impl Lease {
    pub fn release(self) {
        self.endpoint.http1.put(self.sender);
    }
}

/// Sends `req` (origin-form URI, Host set) to `endpoint` on a pooled or new connection.
///
/// A pooled connection the upstream closed meanwhile hands the unsent request back, and it goes
/// out on the next connection; a request that reached the wire is never sent twice.
pub async fn send(
    endpoint: &Arc<Endpoint>,
    mut req: Request<Incoming>,
    settings: PoolSettings,
) -> Result<(http::Response<Incoming>, Lease), ProxyError> {
    let addr = endpoint.addr;
    loop {
        let (mut sender, pooled) = match endpoint.http1.take(settings.idle_timeout) {
            Some(s) => (s, true),
            None => (connect(addr, settings.connect_timeout).await?, false),
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

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<Incoming>, ProxyError> {
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
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(endpoint = %addr, "upstream connection ended: {}", error_chain(&e));
        }
    });
    Ok(sender)
}
