//! Endpoint selection: the endpoint set of a service, the per-endpoint statistics the balancer
//! reads, and the strategies that pick an endpoint for a request.
//!
//! Statistics live in atomics inside `Arc<Endpoint>`, so every worker thread reads and updates
//! them without a lock, and a routing-table swap that keeps an endpoint keeps its statistics
//! (see [`EndpointSet::rebuild`]). The pure parts (pair draw, EWMA update, cost) are plain
//! functions tested without a runtime.

mod ewma;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use serde::Serialize;

pub use self::ewma::{decayed_ewma, PeakEwma, DECAY_SECS, DEFAULT_RTT_MS};
use crate::config::BalancerKind;

/// One upstream address of a service.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, resolved once so requests do not format it.
    pub authority: Authority,
    in_flight: AtomicU64,
    requests: AtomicU64,
    rtt: PeakEwma,
}

/// What `/config` shows of an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    pub address: SocketAddr,
    pub in_flight: u64,
    pub requests: u64,
    pub rtt_ewma_ms: f64,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        let authority =
            Authority::try_from(addr.to_string().as_str()).expect("a socket address is a valid authority");
        Endpoint {
            addr,
            authority,
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rtt: PeakEwma::new(),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records an observed response latency.
    pub fn observe_rtt(&self, rtt: Duration) {
        self.rtt.observe(rtt);
    }

    /// Linkerd's load estimate: latency × (outstanding requests + 1), in nanoseconds.
    pub fn p2c_cost(&self) -> f64 {
        self.rtt.estimate_ns() * (self.in_flight() as f64 + 1.0)
    }

    pub fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            address: self.addr,
            in_flight: self.in_flight(),
            requests: self.requests.load(Ordering::Relaxed),
            rtt_ewma_ms: self.rtt.estimate_ns() / 1e6,
        }
    }
}

/// Counts a request as outstanding on its endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn start(endpoint: Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        endpoint.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one service and the strategy that picks among them.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    kind: BalancerKind,
    next: AtomicUsize,
}

impl EndpointSet {
    /// Builds a set for `addrs`, reusing the endpoints (and so the statistics) of `previous`
    /// for addresses that stay.
    pub fn rebuild(previous: Option<&EndpointSet>, addrs: &[SocketAddr], kind: BalancerKind) -> Self {
        let old: HashMap<SocketAddr, &Arc<Endpoint>> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints = addrs
            .iter()
            .map(|a| {
                old.get(a)
                    .map(|e| Arc::clone(e))
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        EndpointSet {
            endpoints,
            kind,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn kind(&self) -> BalancerKind {
        self.kind
    }

    /// Picks the endpoint for the next request; `None` when the set is empty.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => Some(&self.endpoints[0]),
            _ => {
                let i = match self.kind {
                    BalancerKind::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
                    BalancerKind::P2cEwma => {
                        let (a, b) = pair(n, fastrand::usize(..n), fastrand::usize(..n - 1));
                        if self.endpoints[b].p2c_cost() < self.endpoints[a].p2c_cost() {
                            b
                        } else {
                            a
                        }
                    }
                };
                Some(&self.endpoints[i])
            }
        }
    }
}

/// Two distinct indices in `0..n` from two uniform draws `r1 ∈ 0..n` and `r2 ∈ 0..n-1`
/// (`n ≥ 2`): the second draw skips the first index, so every pair is equally likely.
pub fn pair(n: usize, r1: usize, r2: usize) -> (usize, usize) {
    debug_assert!(n >= 2 && r1 < n && r2 < n - 1);
    let second = if r2 >= r1 { r2 + 1 } else { r2 };
    (r1, second)
}

#[cfg(test)]
mod tests;
