//! One sidecar's balancer in simulated time: the per-endpoint statistics the proxy keeps
//! (in-flight count and the sum of their start times, peak-EWMA latency, last load report) and
//! the strategies, written as `cogmesh_proxy::balance::EndpointSet::pick` does them, on top of
//! the proxy's own pure functions (`balance::cost::*`, `balance::decayed_ewma`).
//!
//! The proxy's `Endpoint` reads the wall clock (`tokio::time::Instant`), so it cannot run in
//! simulated time; this file restates its few lines of bookkeeping with the clock as an
//! argument. Everything that decides — costs, pair draws, EWMA update and its decay on read — is
//! the proxy's code.

use cogmesh_proxy::balance::cost::{cognitive_cost, p2c_ewma_cost, pair, weighted_pair};
use cogmesh_proxy::balance::{decayed_ewma, DEFAULT_LOAD_STALE_MS, DEFAULT_RTT_MS};

use super::rng::Rng;
use super::workload::MS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Cognitive,
    /// `cognitive` with the weights a control plane aware of the capacities would push.
    CognitiveWeighted,
    P2cEwma,
    LeastRequest,
    RoundRobin,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Cognitive,
        Strategy::CognitiveWeighted,
        Strategy::P2cEwma,
        Strategy::LeastRequest,
        Strategy::RoundRobin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Cognitive => "cognitive",
            Strategy::CognitiveWeighted => "cognitive_w",
            Strategy::P2cEwma => "p2c_ewma",
            Strategy::LeastRequest => "least_request",
            Strategy::RoundRobin => "round_robin",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|k| k.name() == s)
    }
}

fn secs_since(then_ns: u64, now_ns: u64) -> f64 {
    now_ns.saturating_sub(then_ns) as f64 / 1e9
}

/// What a sidecar knows about one endpoint (the fields of the proxy's `Endpoint`).
#[derive(Clone, Debug)]
struct View {
    in_flight: u64,
    /// Sum of the send times of the requests in flight.
    started_sum_ns: u64,
    ewma_ns: f64,
    ewma_at_ns: u64,
    load: f64,
    load_at_ns: Option<u64>,
}

impl View {
    fn new() -> Self {
        View {
            in_flight: 0,
            started_sum_ns: 0,
            ewma_ns: DEFAULT_RTT_MS * MS as f64,
            // The proxy's estimate is stamped at its epoch, the start of the run here.
            ewma_at_ns: 0,
            load: 0.0,
            load_at_ns: None,
        }
    }

    /// `PeakEwma::estimate_ns`: the stored estimate decayed toward zero with the time since the
    /// last sample. The proxy computes `stored × e^(−Δt/τ)`, which is exactly
    /// `decayed_ewma(stored, 0, Δt)` (a zero sample is never a peak).
    fn ewma_now_ns(&self, now: u64) -> f64 {
        decayed_ewma(self.ewma_ns, 0.0, secs_since(self.ewma_at_ns, now))
    }

    /// `Endpoint::effective_rtt_ns`: the EWMA, or the mean age of the requests in flight.
    fn effective_rtt_ns(&self, now: u64) -> f64 {
        let ewma = self.ewma_now_ns(now);
        if self.in_flight == 0 {
            return ewma;
        }
        let started = self.started_sum_ns as f64 / self.in_flight as f64;
        ewma.max(now as f64 - started)
    }

    /// `Endpoint::fresh_load`; with `keep_in_flight` (a what-if, not the proxy) a report does
    /// not go stale while requests are in flight on the endpoint.
    fn fresh_load(&self, now: u64, stale_ns: u64, keep_in_flight: bool) -> Option<f64> {
        let at = self.load_at_ns?;
        (now.saturating_sub(at) <= stale_ns || (keep_in_flight && self.in_flight > 0)).then_some(self.load)
    }
}

/// The balancer state of one sidecar for one service.
#[derive(Debug)]
pub struct Sidecar {
    strategy: Strategy,
    views: Vec<View>,
    weights: Vec<f64>,
    prefix: Vec<f64>,
    uniform: bool,
    next: usize,
    stale_ns: u64,
    keep_load_in_flight: bool,
}

impl Sidecar {
    /// `weights` as the control plane pushes them (`EndpointSet::rebuild` semantics: a weight
    /// that is not a positive finite number counts as 1).
    pub fn new(strategy: Strategy, weights: &[f64], keep_load_in_flight: bool) -> Self {
        let weights: Vec<f64> = weights
            .iter()
            .map(|w| if w.is_finite() && *w > 0.0 { *w } else { 1.0 })
            .collect();
        let prefix = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        Sidecar {
            strategy,
            views: vec![View::new(); weights.len()],
            weights,
            prefix,
            uniform,
            next: 0,
            stale_ns: DEFAULT_LOAD_STALE_MS * MS,
            keep_load_in_flight,
        }
    }

    /// `EndpointSet::pick(None)` at simulated time `now` (no endpoint is ever ejected here).
    pub fn pick(&mut self, now: u64, rng: &mut Rng) -> usize {
        let n = self.views.len();
        if n == 1 {
            return 0;
        }
        match self.strategy {
            Strategy::RoundRobin => {
                let i = self.next % n;
                self.next = self.next.wrapping_add(1);
                i
            }
            Strategy::Cognitive | Strategy::CognitiveWeighted => {
                let (a, b) = self.draw_two(rng);
                self.better(a, b, |v, w| {
                    let load = v
                        .fresh_load(now, self.stale_ns, self.keep_load_in_flight)
                        .unwrap_or(0.0);
                    cognitive_cost(v.effective_rtt_ns(now), v.in_flight, load, w)
                })
            }
            Strategy::P2cEwma => {
                let (a, b) = self.draw_two(rng);
                self.better(a, b, |v, _| p2c_ewma_cost(v.effective_rtt_ns(now), v.in_flight))
            }
            Strategy::LeastRequest => {
                let (a, b) = self.draw_two(rng);
                self.better(a, b, |v, w| v.in_flight as f64 / w)
            }
        }
    }

    fn draw_two(&self, rng: &mut Rng) -> (usize, usize) {
        let n = self.views.len();
        if self.uniform {
            pair(n, rng.below(n), rng.below(n - 1))
        } else {
            weighted_pair(&self.prefix, rng.unit(), rng.unit())
        }
    }

    /// The lower-cost candidate, the first on a tie (`EndpointSet::better`).
    fn better(&self, a: usize, b: usize, cost: impl Fn(&View, f64) -> f64) -> usize {
        if cost(&self.views[b], self.weights[b]) < cost(&self.views[a], self.weights[a]) {
            b
        } else {
            a
        }
    }

    /// `InFlight::start`.
    pub fn start(&mut self, i: usize, now: u64) {
        let v = &mut self.views[i];
        v.in_flight += 1;
        v.started_sum_ns += now;
    }

    /// `InFlight`'s drop: the response is complete or the client gave up.
    pub fn finish(&mut self, i: usize, sent_ns: u64) {
        let v = &mut self.views[i];
        v.in_flight -= 1;
        v.started_sum_ns -= sent_ns;
    }

    /// `Endpoint::observe_rtt` (`PeakEwma::observe`: the sample is folded into the stored
    /// estimate, not the read-time decayed one).
    pub fn observe_rtt(&mut self, i: usize, now: u64, sample_ns: u64) {
        let v = &mut self.views[i];
        let elapsed_secs = secs_since(v.ewma_at_ns, now);
        v.ewma_at_ns = now;
        v.ewma_ns = decayed_ewma(v.ewma_ns, sample_ns as f64, elapsed_secs);
    }

    /// `Endpoint::observe_load`.
    pub fn observe_load(&mut self, i: usize, now: u64, load: f64) {
        let v = &mut self.views[i];
        v.load = load;
        v.load_at_ns = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proxy::balance::DECAY_SECS;

    #[test]
    fn read_decay_matches_the_proxy_formula() {
        // `PeakEwma::estimate_ns` is `stored × e^(−Δt/τ)`; the view computes it through
        // `decayed_ewma` with a zero sample and must get the same bits.
        let mut v = View::new();
        v.ewma_ns = 123_456_789.0;
        v.ewma_at_ns = 2_000_000_000;
        for now in [2_000_000_000u64, 2_500_000_000, 9_000_000_000, 60_000_000_000] {
            let since = (now - v.ewma_at_ns) as f64 / 1e9;
            assert_eq!(v.ewma_now_ns(now), v.ewma_ns * (-since / DECAY_SECS).exp());
        }
    }

    #[test]
    fn a_stalled_endpoint_costs_the_age_of_its_requests() {
        let mut s = Sidecar::new(Strategy::P2cEwma, &[1.0, 1.0], false);
        s.start(0, 0);
        // 2 s later nothing came back: the age (2 s) beats the decayed 30 ms initial estimate.
        assert_eq!(s.views[0].effective_rtt_ns(2_000_000_000), 2e9);
        s.finish(0, 0);
        assert_eq!(s.views[0].in_flight, 0);
    }
}
