//! Circuit breaking per service, with Envoy's thresholds: at most `max_connections` HTTP/1
//! connections open to the service's endpoints, at most `max_requests` requests in flight to the
//! service (until the response body ends), at most `max_pending_requests` of them still waiting
//! for the upstream's response headers, at most `max_retries` retries in flight.
//! A request over a threshold fails at once with 503 `overloaded` and
//! `x-cogmesh-overloaded: true` instead of queueing behind a service that is already saturated;
//! each overflow is counted by threshold.
//!
//! The counters are atomics in an `Arc<Breaker>` that a configuration reload keeps for a
//! service that stays (permits taken before the reload are returned to the same counters); the
//! thresholds are atomics too, so a reload changes them in place.
//!
//! `max_connections` is checked when the HTTP/1 pool has no idle connection for a request and
//! would open one: over the threshold the request fails at once (Envoy would queue it among the
//! pending requests until a connection frees). HTTP/2 multiplexes each endpoint on at most a few
//! connections and is not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// Envoy's default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
/// Envoy's default `max_requests`.
pub const DEFAULT_MAX_REQUESTS: u64 = 1024;
/// Envoy's default `max_pending_requests`.
pub const DEFAULT_MAX_PENDING_REQUESTS: u64 = 1024;
/// Envoy's default `max_retries`.
pub const DEFAULT_MAX_RETRIES: u64 = 3;

/// `circuit_breaker:` of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    #[serde(default = "default_max_requests")]
    pub max_requests: u64,
    #[serde(default = "default_max_pending_requests")]
    pub max_pending_requests: u64,
    #[serde(default = "default_max_retries")]
    pub max_retries: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

fn default_max_connections() -> u64 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_requests() -> u64 {
    DEFAULT_MAX_REQUESTS
}
fn default_max_pending_requests() -> u64 {
    DEFAULT_MAX_PENDING_REQUESTS
}
fn default_max_retries() -> u64 {
    DEFAULT_MAX_RETRIES
}

impl CircuitBreakerConfig {
    /// Range checks; `Err((field, reason))` relative to `circuit_breaker`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("max_connections", self.max_connections),
            ("max_requests", self.max_requests),
            ("max_pending_requests", self.max_pending_requests),
        ] {
            if v == 0 {
                return Err((field, "must be greater than 0".into()));
            }
        }
        Ok(())
    }
}

/// Which threshold a request ran into: the metric label and the error's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    MaxConnections,
    MaxRequests,
    MaxPendingRequests,
    MaxRetries,
}

impl Threshold {
    pub fn as_str(self) -> &'static str {
        match self {
            Threshold::MaxConnections => "max_connections",
            Threshold::MaxRequests => "max_requests",
            Threshold::MaxPendingRequests => "max_pending_requests",
            Threshold::MaxRetries => "max_retries",
        }
    }
}

/// Overflow counters, one per threshold.
#[derive(Clone, Debug, Default)]
pub struct OverflowCounters {
    pub max_connections: Counter,
    pub max_requests: Counter,
    pub max_pending_requests: Counter,
    pub max_retries: Counter,
}

/// The breaker of one service.
#[derive(Debug)]
pub struct Breaker {
    /// The service's name, for the error of a refused request.
    service: String,
    max_connections: AtomicU64,
    max_requests: AtomicU64,
    max_pending: AtomicU64,
    max_retries: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    pending: AtomicU64,
    retries: AtomicU64,
    overflow: OverflowCounters,
}

impl Breaker {
    pub fn new(service: &str, config: &CircuitBreakerConfig, overflow: OverflowCounters) -> Self {
        let b = Breaker {
            service: service.to_string(),
            max_connections: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            max_requests: AtomicU64::new(0),
            max_pending: AtomicU64::new(0),
            max_retries: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            overflow,
        };
        b.set_limits(config);
        b
    }

    /// `previous` with the thresholds of `config` (its counters carry over), or a new breaker.
    pub fn reuse_or_new(
        service: &str,
        previous: Option<&Arc<Breaker>>,
        config: &CircuitBreakerConfig,
        overflow: impl FnOnce() -> OverflowCounters,
    ) -> Arc<Breaker> {
        match previous {
            Some(p) => {
                p.set_limits(config);
                Arc::clone(p)
            }
            None => Arc::new(Breaker::new(service, config, overflow())),
        }
    }

    fn set_limits(&self, config: &CircuitBreakerConfig) {
        self.max_connections
            .store(config.max_connections, Ordering::Relaxed);
        self.max_requests.store(config.max_requests, Ordering::Relaxed);
        self.max_pending
            .store(config.max_pending_requests, Ordering::Relaxed);
        self.max_retries.store(config.max_retries, Ordering::Relaxed);
    }

    /// Requests in flight, those still waiting for response headers, and retries in flight.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        )
    }

    /// Admits a request (in flight and pending), or names the threshold it overflows.
    pub fn try_request(self: &Arc<Self>) -> Result<RequestPermit, Threshold> {
        if !take(&self.requests, &self.max_requests) {
            self.overflow.max_requests.inc();
            return Err(Threshold::MaxRequests);
        }
        if !take(&self.pending, &self.max_pending) {
            self.requests.fetch_sub(1, Ordering::Relaxed);
            self.overflow.max_pending_requests.inc();
            return Err(Threshold::MaxPendingRequests);
        }
        Ok(RequestPermit {
            breaker: Arc::clone(self),
            pending: true,
        })
    }

    /// Admits a retry, or refuses it (the caller answers with what it has).
    /// A slot for a new upstream connection, or `None` over `max_connections` (not counted as
    /// an overflow: the caller may still do without a new connection).
    pub fn connection_slot(self: &Arc<Self>) -> Option<ConnectionPermit> {
        take(&self.connections, &self.max_connections).then(|| ConnectionPermit {
            breaker: Arc::clone(self),
        })
    }

    /// Counts a request refused for want of a connection slot, and its error.
    pub fn connections_overflowed(&self) -> crate::error::ProxyError {
        self.overflow.max_connections.inc();
        crate::error::ProxyError::Overloaded {
            service: self.service.clone(),
            threshold: Threshold::MaxConnections,
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn try_retry(self: &Arc<Self>) -> Result<RetryPermit, Threshold> {
        if !take(&self.retries, &self.max_retries) {
            self.overflow.max_retries.inc();
            return Err(Threshold::MaxRetries);
        }
        Ok(RetryPermit {
            breaker: Arc::clone(self),
        })
    }
}

/// Increments `count` unless it is at `max`.
fn take(count: &AtomicU64, max: &AtomicU64) -> bool {
    let max = max.load(Ordering::Relaxed);
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// A request counted against its service until dropped.
#[derive(Debug)]
pub struct RequestPermit {
    breaker: Arc<Breaker>,
    pending: bool,
}

impl RequestPermit {
    /// The upstream answered (or failed): the request no longer counts as pending.
    pub fn answered(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.breaker.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.answered();
        self.breaker.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry counted against its service until dropped.
/// An upstream connection counted against `max_connections` until dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    breaker: Arc<Breaker>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.breaker.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct RetryPermit {
    breaker: Arc<Breaker>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.breaker.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(max_requests: u64, max_pending_requests: u64, max_retries: u64) -> Arc<Breaker> {
        let config = CircuitBreakerConfig {
            max_connections: 2,
            max_requests,
            max_pending_requests,
            max_retries,
        };
        Arc::new(Breaker::new("web", &config, OverflowCounters::default()))
    }

    #[test]
    fn connections_over_the_threshold_are_refused_until_one_closes() {
        let b = breaker(10, 10, 1);
        let (one, two) = (b.connection_slot().unwrap(), b.connection_slot().unwrap());
        assert!(b.connection_slot().is_none());
        // Only a request that finally goes without a connection counts as an overflow.
        assert_eq!(b.overflow.max_connections.get(), 0);
        let err = b.connections_overflowed();
        assert_eq!(
            err.to_string(),
            "service \"web\" is overloaded: circuit breaker threshold max_connections reached"
        );
        assert_eq!(b.overflow.max_connections.get(), 1);
        drop(one);
        assert_eq!(b.connections(), 1);
        let _three = b.connection_slot().unwrap();
        drop(two);
        assert_eq!(b.connections(), 1);
    }

    #[test]
    fn requests_over_max_requests_overflow_until_one_finishes() {
        let b = breaker(2, 10, 3);
        let mut first = b.try_request().unwrap();
        let second = b.try_request().unwrap();
        assert_eq!(b.try_request().unwrap_err(), Threshold::MaxRequests);
        assert_eq!(b.overflow.max_requests.get(), 1);
        first.answered();
        // Answered but still streaming its body: still in flight.
        assert_eq!(b.counts(), (2, 1, 0));
        assert_eq!(b.try_request().unwrap_err(), Threshold::MaxRequests);
        drop(first);
        assert_eq!(b.counts(), (1, 1, 0));
        let third = b.try_request().unwrap();
        drop((second, third));
        assert_eq!(b.counts(), (0, 0, 0));
        assert_eq!(b.overflow.max_requests.get(), 2);
    }

    #[test]
    fn pending_requests_have_their_own_threshold() {
        let b = breaker(10, 1, 3);
        let mut first = b.try_request().unwrap();
        assert_eq!(b.try_request().unwrap_err(), Threshold::MaxPendingRequests);
        // The refused request gave its in-flight slot back.
        assert_eq!(b.counts(), (1, 1, 0));
        first.answered();
        first.answered();
        assert_eq!(b.counts(), (1, 0, 0));
        let _second = b.try_request().unwrap();
        assert_eq!(b.overflow.max_pending_requests.get(), 1);
    }

    #[test]
    fn retries_are_bounded_and_zero_disables_them() {
        let b = breaker(10, 10, 1);
        let r = b.try_retry().unwrap();
        assert_eq!(b.try_retry().unwrap_err(), Threshold::MaxRetries);
        drop(r);
        assert!(b.try_retry().is_ok());
        let b = breaker(10, 10, 0);
        assert_eq!(b.try_retry().unwrap_err(), Threshold::MaxRetries);
    }

    #[test]
    fn a_reload_keeps_the_counters_and_changes_the_thresholds() {
        let b = breaker(1, 1, 1);
        let permit = b.try_request().unwrap();
        let config = CircuitBreakerConfig {
            max_connections: 2,
            max_requests: 2,
            max_pending_requests: 2,
            max_retries: 1,
        };
        let same = Breaker::reuse_or_new("web", Some(&b), &config, OverflowCounters::default);
        assert!(Arc::ptr_eq(&b, &same));
        let second = same.try_request().unwrap();
        assert_eq!(same.try_request().unwrap_err(), Threshold::MaxRequests);
        drop((permit, second));
        assert_eq!(same.counts(), (0, 0, 0));
    }

    #[test]
    fn config_is_range_checked() {
        let c = CircuitBreakerConfig {
            max_requests: 0,
            ..CircuitBreakerConfig::default()
        };
        assert_eq!(c.check().unwrap_err().0, "max_requests");
        assert_eq!(CircuitBreakerConfig::default().check(), Ok(()));
    }
}
