//! Endpoint selection: the endpoint set of a service, the per-endpoint statistics the balancer
//! reads, and the strategies that pick an endpoint for a request.
//!
//! Statistics live in atomics inside `Arc<Endpoint>`, so every worker thread reads and updates
//! them without a lock, and a routing-table swap that keeps an endpoint keeps its statistics
//! (see [`EndpointSet::rebuild`]). The decisions themselves are the pure functions of [`cost`].
//!
//! Strategies (per service): `cognitive` (default: the cheapest by [`cost::cognitive_cost`] of
//! [`cost::COGNITIVE_CHOICES`] weighted draws, the first two a P2C pair),
//! `p2c_ewma` (Linkerd), `least_request` (Envoy, two choices), `round_robin`, and `ring_hash`
//! (affinity on a header or cookie). Ejected endpoints are never picked.

pub mod cost;
mod ewma;
pub mod latency;
pub mod orca;
mod ring;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use serde::Serialize;
use tokio::time::Instant;

pub use self::ewma::{decayed_ewma, PeakEwma, DECAY_SECS, DEFAULT_RTT_MS};
pub use self::ring::stable_hash;
use self::ring::Ring;
use crate::config::BalancerKind;
use crate::outlier::{OutlierConfig, OutlierState, Phase as OutlierPhase, Verdict as OutlierVerdict};

/// An endpoint that timed out or refused a connection is not picked for this long (unless it
/// is the last one available): a stalled endpoint otherwise looks idle, since it answers nothing.
pub const GATEWAY_FAILURE_EJECTION_MS: u64 = 10_000;

/// A load report older than this is ignored (the endpoint counts as unloaded until it reports
/// again), so an endpoint that stopped getting traffic is probed again.
pub const DEFAULT_LOAD_STALE_MS: u64 = 10_000;

/// One upstream address of a service.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, resolved once so requests do not format it.
    pub authority: Authority,
    in_flight: AtomicU64,
    /// Sum of the start times (ns since `epoch`) of the requests in flight: with `in_flight`
    /// it gives their mean age, which bounds the latency of an endpoint that stopped answering.
    in_flight_started_ns: AtomicU64,
    /// When (ns since `epoch`) the in-flight count last went from 0 to 1, and when the endpoint
    /// last answered (a response, or a refusal with `Retry-After`): together they say how long
    /// an endpoint that holds requests has been silent ([`cost::silence_ns`]).
    busy_since_ns: AtomicU64,
    answered_ns: AtomicU64,
    picks: AtomicU64,
    /// Responses that were 5xx or failed in the proxy (connect, reset, timeout).
    failures: AtomicU64,
    rtt: PeakEwma,
    /// Observed latencies by bucket, for the load reports.
    latency: latency::LatencyBuckets,
    /// f64 bits of the last reported load; `load_at_ns` 0 means never reported.
    load: AtomicU64,
    load_at_ns: AtomicU64,
    /// Not a candidate until this time (ns since `epoch`); 0: never ejected.
    ejected_until_ns: AtomicU64,
    /// The endpoint asked us (429/503 `Retry-After`) to stay away until this time (ns since
    /// `epoch`); 0: never. See [`cost::expected_rtt_ns`].
    backoff_until_ns: AtomicU64,
    /// Consecutive failures and the ejection cycle (see [`crate::outlier`]).
    pub outlier: OutlierState,
    epoch: Instant,
    /// Idle HTTP/1.1 connections to this endpoint.
    pub http1: crate::forward::Http1Pool,
    /// Idle connections of the HTTP/1.1 relay (see [`crate::forward::relay`]).
    pub relay: crate::forward::RelayPool,
    /// HTTP/2 connections to this endpoint when it is plain text (see `crate::forward::http2`).
    pub http2: crate::forward::Http2Conns,
}

/// What `/config` and the metrics show of an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    pub address: SocketAddr,
    pub weight: f64,
    pub in_flight: u64,
    pub requests: u64,
    pub rtt_ewma_ms: f64,
    /// The last load report, while fresh.
    pub load: Option<f64>,
    pub ejected: bool,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        let authority =
            Authority::try_from(addr.to_string().as_str()).expect("a socket address is a valid authority");
        Endpoint {
            addr,
            authority,
            in_flight: AtomicU64::new(0),
            in_flight_started_ns: AtomicU64::new(0),
            busy_since_ns: AtomicU64::new(0),
            answered_ns: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rtt: PeakEwma::new(),
            latency: Default::default(),
            load: AtomicU64::new(0f64.to_bits()),
            load_at_ns: AtomicU64::new(0),
            ejected_until_ns: AtomicU64::new(0),
            backoff_until_ns: AtomicU64::new(0),
            outlier: OutlierState::default(),
            epoch: Instant::now(),
            http1: Default::default(),
            relay: Default::default(),
            http2: Default::default(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// Nanoseconds since this endpoint's epoch at `now`, +1 so that an event at the epoch
    /// itself is not mistaken for "never".
    fn ns_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the latency of a response.
    pub fn observe_rtt(&self, rtt: Duration) {
        self.answered_ns.store(self.now_ns(), Ordering::Relaxed);
        self.rtt.observe(rtt);
        self.latency.observe(rtt);
    }

    /// Records a 429/503 that asked for `backoff` (`Retry-After`, see
    /// [`cost::retry_after_penalty`]): until it has passed, the balancer's latency estimate of
    /// the endpoint is at least what is left of it. The peak-EWMA is not touched: the refusal
    /// says nothing about how long a request takes there, and an EWMA sample would weigh on
    /// the estimate for its whole decay time (~10 s), not for the time asked.
    pub fn back_off(&self, backoff: Duration) {
        let now = self.now_ns();
        self.answered_ns.store(now, Ordering::Relaxed);
        let until = now.saturating_add(backoff.as_nanos() as u64);
        self.backoff_until_ns.fetch_max(until, Ordering::Relaxed);
    }

    /// What is left of the back-off at `now`, ns (0 when none).
    fn backoff_left_ns(&self, now: Instant) -> f64 {
        let until = self.backoff_until_ns.load(Ordering::Relaxed);
        until.saturating_sub(self.ns_at(now)) as f64
    }

    /// The distribution of observed latencies (for the load reports' p50 / p99).
    pub fn latency(&self) -> &latency::LatencyBuckets {
        &self.latency
    }

    pub fn rtt_ewma_ns(&self) -> f64 {
        self.rtt.estimate_ns()
    }

    /// Records the load the endpoint reported about itself.
    pub fn observe_load(&self, load: f64) {
        self.load.store(load.to_bits(), Ordering::Relaxed);
        self.load_at_ns.store(self.now_ns(), Ordering::Relaxed);
    }

    /// The last reported load if it is younger than `stale`, else `None`.
    pub fn fresh_load(&self, stale: Duration) -> Option<f64> {
        self.fresh_load_at(Instant::now(), stale)
    }

    fn fresh_load_at(&self, now: Instant, stale: Duration) -> Option<f64> {
        let at = self.load_at_ns.load(Ordering::Relaxed);
        // `at` may lie in the future (see `observe_gateway_failure`): fresh until then + stale.
        if at == 0 || self.ns_at(now).saturating_sub(at) > stale.as_nanos() as u64 {
            return None;
        }
        Some(f64::from_bits(self.load.load(Ordering::Relaxed)))
    }

    /// Ejects the endpoint until further notice (`true`) or returns it (`false`).
    pub fn set_ejected(&self, ejected: bool) {
        let until = if ejected { u64::MAX } else { 0 };
        self.ejected_until_ns.store(until, Ordering::Relaxed);
    }

    /// Ejects the endpoint for `duration`: no request is sent to it until then.
    pub fn eject_for(&self, duration: Duration) {
        let until = self.now_ns().saturating_add(duration.as_nanos() as u64);
        self.ejected_until_ns.store(until, Ordering::Relaxed);
    }

    /// Ejected, or half-open with its probe request still in flight.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        (until != 0 && self.now_ns() < until)
            || (self.outlier.phase() == OutlierPhase::Probing && self.in_flight() > 0)
    }

    /// How long the endpoint has been back since its last ejection ended (since its creation
    /// if never ejected; zero while ejected).
    fn healthy_for(&self) -> Duration {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        if until == u64::MAX {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.now_ns().saturating_sub(until))
    }

    /// What a gateway failure (timeout, refused connection) tells the balancer: the endpoint
    /// took at least `waited` and is as loaded as it gets ([`cost::GATEWAY_FAILURE_LOAD`]).
    /// Whether to eject it as well is the caller's decision, which knows whether other
    /// endpoints are left.
    ///
    /// That load stays in force for `hold` (the ejection) and then for the usual staleness
    /// bound, so the endpoint does not come back from ejection looking idle: it answers
    /// nothing, so nothing else would refresh its report, and an unloaded-looking endpoint
    /// beside healthy ones that report real load would win every draw. Only endpoints that
    /// failed too cost as much; the others, however long their queues, win against it.
    pub fn observe_gateway_failure(&self, waited: Duration, hold: Duration) {
        // A sample of the wait, but not an answer: the endpoint stays silent.
        self.rtt.observe(waited);
        self.latency.observe(waited);
        self.load
            .store(cost::GATEWAY_FAILURE_LOAD.to_bits(), Ordering::Relaxed);
        let at = self.now_ns().saturating_add(hold.as_nanos() as u64);
        self.load_at_ns.store(at, Ordering::Relaxed);
    }

    /// The latency estimate the balancer uses ([`cost::expected_rtt_ns`]): the peak-EWMA, the
    /// mean age of the requests still in flight, or what is left of a `Retry-After` back-off,
    /// whichever is largest.
    pub fn effective_rtt_ns(&self) -> f64 {
        self.effective_rtt_ns_at(Instant::now())
    }

    fn effective_rtt_ns_at(&self, now: Instant) -> f64 {
        cost::expected_rtt_ns(
            self.rtt.estimate_ns_at(now),
            self.mean_in_flight_age_ns(now),
            self.backoff_left_ns(now),
        )
    }

    /// How long the endpoint, holding `in_flight` requests, has gone without answering
    /// ([`cost::silence_ns`]).
    fn silence_ns(&self, now: Instant, in_flight: u64) -> f64 {
        cost::silence_ns(
            in_flight,
            self.ns_at(now),
            self.answered_ns.load(Ordering::Relaxed),
            self.busy_since_ns.load(Ordering::Relaxed),
        )
    }

    /// Mean age of the requests in flight (0 with none).
    fn mean_in_flight_age_ns(&self, now: Instant) -> f64 {
        let n = self.in_flight();
        if n == 0 {
            return 0.0;
        }
        let started = self.in_flight_started_ns.load(Ordering::Relaxed) as f64 / n as f64;
        (self.ns_at(now) as f64 - started).max(0.0)
    }

    pub fn cognitive_cost(&self, weight: f64, stale: Duration) -> f64 {
        self.cognitive_cost_at(Instant::now(), weight, stale)
    }

    fn cognitive_cost_at(&self, now: Instant, weight: f64, stale: Duration) -> f64 {
        let ewma = self.rtt.estimate_ns_at(now);
        let age = self.mean_in_flight_age_ns(now);
        // Read once: the silence, the overdue count and the queue term see the same count.
        let in_flight = self.in_flight();
        let load = cost::effective_load(
            self.fresh_load_at(now, stale),
            self.silence_ns(now, in_flight),
            in_flight,
            ewma,
        );
        let rtt = cost::expected_rtt_ns(ewma, age, self.backoff_left_ns(now));
        cost::cognitive_cost(rtt, in_flight, load, weight)
    }

    pub fn p2c_cost(&self) -> f64 {
        self.p2c_cost_at(Instant::now())
    }

    fn p2c_cost_at(&self, now: Instant) -> f64 {
        cost::p2c_ewma_cost(self.effective_rtt_ns_at(now), self.in_flight())
    }

    pub fn snapshot(&self, weight: f64, stale: Duration) -> EndpointSnapshot {
        EndpointSnapshot {
            address: self.addr,
            weight,
            in_flight: self.in_flight(),
            requests: self.picks(),
            rtt_ewma_ms: self.rtt.estimate_ns() / 1e6,
            load: self.fresh_load(stale),
            ejected: self.is_ejected(),
        }
    }
}

/// Counts a request as outstanding on its endpoint until dropped.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started_ns: u64,
}

impl InFlight {
    pub fn start(endpoint: Arc<Endpoint>) -> Self {
        let started_ns = endpoint.now_ns();
        endpoint
            .in_flight_started_ns
            .fetch_add(started_ns, Ordering::Relaxed);
        if endpoint.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            endpoint.busy_since_ns.store(started_ns, Ordering::Relaxed);
        }
        endpoint.picks.fetch_add(1, Ordering::Relaxed);
        endpoint.outlier.on_pick();
        InFlight { endpoint, started_ns }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.endpoint
            .in_flight_started_ns
            .fetch_sub(self.started_ns, Ordering::Relaxed);
    }
}

/// The endpoints of one service and the strategy that picks among them.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    weights: Vec<f64>,
    /// Cumulative weights, for draws proportional to weight.
    prefix: Vec<f64>,
    uniform: bool,
    kind: BalancerKind,
    stale: Duration,
    next: AtomicUsize,
    ring: Option<Ring>,
    outlier: OutlierConfig,
    /// When the success-rate interval ends; kept across rebuilds, as the endpoints' counts are.
    rate_interval: Arc<IntervalClock>,
}

/// The end of the current success-rate interval, shared by the worker threads.
#[derive(Debug)]
struct IntervalClock {
    epoch: Instant,
    /// Nanoseconds since `epoch`; 0 before the first outcome.
    ends_ns: AtomicU64,
}

impl Default for IntervalClock {
    fn default() -> Self {
        IntervalClock {
            epoch: Instant::now(),
            ends_ns: AtomicU64::new(0),
        }
    }
}

impl IntervalClock {
    /// Whether the interval is over at `now`; if so, exactly one caller gets `true` and the
    /// next interval of `length` starts.
    fn roll(&self, now: Instant, length: Duration) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let ends = self.ends_ns.load(Ordering::Relaxed);
        now_ns >= ends
            && self
                .ends_ns
                .compare_exchange(
                    ends,
                    now_ns + length.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

impl EndpointSet {
    /// Builds a set for `members` (address, weight), reusing the endpoints (and so the
    /// statistics) of `previous` for addresses that stay. Weights ≤ 0 or not finite count as 1.
    pub fn rebuild(
        previous: Option<&EndpointSet>,
        members: &[(SocketAddr, f64)],
        kind: BalancerKind,
        stale: Duration,
    ) -> Self {
        let old: HashMap<SocketAddr, &Arc<Endpoint>> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = members
            .iter()
            .map(|(a, _)| {
                old.get(a)
                    .map(|e| Arc::clone(e))
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        let weights: Vec<f64> = members
            .iter()
            .map(|(_, w)| if w.is_finite() && *w > 0.0 { *w } else { 1.0 })
            .collect();
        let prefix = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let ring = (kind == BalancerKind::RingHash).then(|| Ring::build(&endpoints, &weights));
        EndpointSet {
            endpoints,
            weights,
            prefix,
            uniform,
            kind,
            stale,
            next: AtomicUsize::new(0),
            ring,
            outlier: OutlierConfig::default(),
            rate_interval: previous.map(|p| Arc::clone(&p.rate_interval)).unwrap_or_default(),
        }
    }

    /// A set of equally weighted endpoints.
    pub fn uniform(addrs: &[SocketAddr], kind: BalancerKind) -> Self {
        let members: Vec<_> = addrs.iter().map(|a| (*a, 1.0)).collect();
        Self::rebuild(None, &members, kind, Duration::from_millis(DEFAULT_LOAD_STALE_MS))
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Endpoints that are candidates now.
    pub fn available(&self) -> usize {
        self.endpoints.iter().filter(|e| !e.is_ejected()).count()
    }

    /// What a timeout or refused connection to `endpoint` (after `waited`) does: the endpoint is
    /// charged the wait and full load (see [`Endpoint::observe_gateway_failure`]) and ejected
    /// for [`GATEWAY_FAILURE_EJECTION_MS`] — unless it is the last available one: with none,
    /// every request would fail fast, which is worse than trying a slow one.
    pub fn gateway_failure(&self, endpoint: &Endpoint, waited: Duration) {
        let ejection = Duration::from_millis(GATEWAY_FAILURE_EJECTION_MS);
        endpoint.observe_gateway_failure(waited, ejection);
        if self.available() > 1 {
            endpoint.eject_for(ejection);
        }
    }

    /// The set with this outlier-ejection policy (the default is Envoy's).
    pub fn with_outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = outlier;
        self
    }

    /// Records a response of `endpoint` (`failed`: 5xx or a gateway failure) and ejects it
    /// when the outlier policy says so — unless as many endpoints as `max_ejection_percent`
    /// allows are out already, or it is the last available one.
    pub fn observe_outcome(&self, endpoint: &Endpoint, failed: bool) {
        if let Some(rate) = &self.outlier.success_rate {
            endpoint.outlier.count(failed);
            if self
                .rate_interval
                .roll(Instant::now(), Duration::from_millis(rate.interval_ms))
            {
                self.compare_success_rates(rate);
            }
        }
        let verdict = endpoint
            .outlier
            .on_outcome(failed, &self.outlier, endpoint.healthy_for());
        if let OutlierVerdict::Eject { times } = verdict {
            self.eject(endpoint, times);
        }
    }

    /// At the end of a success-rate interval: ejects the endpoints whose success rate is an
    /// outlier (see [`crate::outlier::success_rate_outliers`]).
    fn compare_success_rates(&self, rate: &crate::outlier::SuccessRateConfig) {
        let window: Vec<(u64, u64)> = self.endpoints.iter().map(|e| e.outlier.take_window()).collect();
        for i in crate::outlier::success_rate_outliers(&window, rate) {
            let endpoint = &self.endpoints[i];
            if endpoint.is_ejected() {
                continue;
            }
            let times = self
                .outlier
                .decayed_times(endpoint.outlier.times_ejected(), endpoint.healthy_for());
            tracing::info!(
                endpoint = %endpoint.addr,
                requests = window[i].0,
                failures = window[i].1,
                "success rate far below the other endpoints': ejecting"
            );
            self.eject(endpoint, times + 1);
        }
    }

    /// Ejects `endpoint` for the `times`-th time, unless as many endpoints as
    /// `max_ejection_percent` allows are out already, or it is the last available one.
    fn eject(&self, endpoint: &Endpoint, times: u32) {
        let ejected = self.endpoints.len() - self.available();
        let already = usize::from(endpoint.is_ejected());
        if ejected - already >= self.outlier.max_ejected(self.endpoints.len())
            || self.available() - (1 - already) == 0
        {
            return;
        }
        endpoint.eject_for(self.outlier.ejection_time(times, fastrand::f64()));
        endpoint.outlier.ejected(times);
    }

    pub fn kind(&self) -> BalancerKind {
        self.kind
    }

    pub fn load_staleness(&self) -> Duration {
        self.stale
    }

    pub fn snapshots(&self) -> Vec<EndpointSnapshot> {
        self.endpoints
            .iter()
            .zip(&self.weights)
            .map(|(e, w)| e.snapshot(*w, self.stale))
            .collect()
    }

    /// Picks the endpoint for the next request; `None` when no endpoint can take it.
    /// `hash` is the request's affinity key, used by `ring_hash`.
    pub fn pick(&self, hash: Option<u64>) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            let e = &self.endpoints[0];
            return (!e.is_ejected()).then_some(e);
        }
        let i = match self.kind {
            BalancerKind::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            BalancerKind::RingHash => match (hash, &self.ring) {
                (Some(h), Some(ring)) => return ring.lookup(h, &self.endpoints),
                _ => self.draw_one(),
            },
            BalancerKind::Cognitive => {
                let (a, b) = self.draw_available_two();
                let now = Instant::now();
                let cost = |e: &Endpoint, w| e.cognitive_cost_at(now, w, self.stale);
                let mut best = self.better(a, b, cost);
                let mut best_cost = cost(&self.endpoints[best], self.weights[best]);
                for _ in 2..cost::COGNITIVE_CHOICES {
                    let c = self.draw_one();
                    let c_cost = cost(&self.endpoints[c], self.weights[c]);
                    let (ec, eb) = (self.endpoints[c].is_ejected(), self.endpoints[best].is_ejected());
                    if cost::cheaper_candidate(ec, c_cost, eb, best_cost) {
                        (best, best_cost) = (c, c_cost);
                    }
                }
                best
            }
            BalancerKind::P2cEwma => {
                let (a, b) = self.draw_available_two();
                let now = Instant::now();
                self.better(a, b, |e, _| e.p2c_cost_at(now))
            }
            BalancerKind::LeastRequest => {
                let (a, b) = self.draw_available_two();
                self.better(a, b, |e, w| e.in_flight() as f64 / w)
            }
        };
        let e = &self.endpoints[i];
        if !e.is_ejected() {
            return Some(e);
        }
        // The choice was ejected. Round robin moves on to the next turn, so the ejected
        // endpoint's share spreads over all the others; every other strategy takes the first
        // available endpoint after a random start. (Always taking the ejected endpoint's
        // neighbour would double that neighbour's load and can cascade into ejecting them all.)
        let start = match self.kind {
            BalancerKind::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            _ => fastrand::usize(..n),
        };
        (0..n)
            .map(|k| &self.endpoints[(start + k) % n])
            .find(|e| !e.is_ejected())
    }

    fn draw_one(&self) -> usize {
        if self.uniform {
            fastrand::usize(..self.endpoints.len())
        } else {
            cost::weighted_index(&self.prefix, fastrand::f64())
        }
    }

    /// Two candidates for a P2C comparison, drawn among the endpoints not ejected: a pair that
    /// includes an ejected endpoint is drawn again, up to [`cost::PAIR_DRAWS`] draws in all
    /// (after that [`Self::better`] still prefers the one not ejected). Drawing again is a
    /// uniform (or weighted) draw among the available endpoints, what P2C over Envoy's healthy
    /// host set does. Keeping such a pair instead handed its other endpoint a win without a
    /// comparison, so whichever endpoints happened to be drawn with an ejected one took its
    /// traffic, whatever they cost: with one of four ejected, half of all picks.
    fn draw_available_two(&self) -> (usize, usize) {
        let mut pair = self.draw_two();
        for _ in 1..cost::PAIR_DRAWS {
            if !self.endpoints[pair.0].is_ejected() && !self.endpoints[pair.1].is_ejected() {
                break;
            }
            pair = self.draw_two();
        }
        pair
    }

    fn draw_two(&self) -> (usize, usize) {
        let n = self.endpoints.len();
        if self.uniform {
            cost::pair(n, fastrand::usize(..n), fastrand::usize(..n - 1))
        } else {
            cost::weighted_pair(&self.prefix, fastrand::f64(), fastrand::f64())
        }
    }

    /// Of two candidates, the one not ejected with the lower cost (the first on a tie).
    fn better(&self, a: usize, b: usize, cost: impl Fn(&Endpoint, f64) -> f64) -> usize {
        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
        match (ea.is_ejected(), eb.is_ejected()) {
            (false, true) => a,
            (true, false) => b,
            _ => {
                if cost(eb, self.weights[b]) < cost(ea, self.weights[a]) {
                    b
                } else {
                    a
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
