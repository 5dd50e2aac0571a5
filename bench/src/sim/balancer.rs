//! One sidecar's balancer in simulated time: the per-endpoint statistics the proxy keeps
//! (in-flight count and the sum of their start times, peak-EWMA latency, last load report,
//! ejection deadline) and the strategies, written as `cogmesh_proxy::balance::EndpointSet::pick`
//! does them (ejected endpoints included), on top of the proxy's own pure functions
//! (`balance::cost::*`, `balance::decayed_ewma`). The cognitive cost's load term is the proxy's
//! `cost::effective_load`: the fresh report, or while the endpoint is overdue (silent, holding
//! requests, for longer than `OVERDUE_ANSWERS` of the answers it should have given) the count of
//! answers missed, if higher; its rtt term is `cost::expected_rtt_ns` (EWMA, mean age in flight,
//! what is left of a `Retry-After` back-off).
//!
//! The proxy's `Endpoint` reads the wall clock (`tokio::time::Instant`), so it cannot run in
//! simulated time; this file restates its few lines of bookkeeping with the clock as an
//! argument. Everything that decides — costs, pair draws, EWMA update and its decay on read — is
//! the proxy's code.

use cogmesh_proxy::balance::cost::{
    cheaper_candidate, cognitive_cost, effective_load, expected_rtt_ns, p2c_ewma_cost, pair, silence_ns,
    weighted_index, weighted_pair, COGNITIVE_CHOICES, GATEWAY_FAILURE_LOAD, PAIR_DRAWS,
};
use cogmesh_proxy::balance::{
    decayed_ewma, DEFAULT_LOAD_STALE_MS, DEFAULT_RTT_MS, GATEWAY_FAILURE_EJECTION_MS,
};

use super::rng::Rng;
use super::workload::MS;
#[cfg(test)]
use super::workload::SEC;

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
    /// When the in-flight count last went from 0 to 1, and when the endpoint last answered
    /// (`Endpoint::busy_since_ns`, `Endpoint::answered_ns`).
    busy_since_ns: u64,
    answered_ns: u64,
    ewma_ns: f64,
    ewma_at_ns: u64,
    load: f64,
    load_at_ns: Option<u64>,
    /// Not a candidate before this time; 0: never ejected (`Endpoint::ejected_until_ns`).
    ejected_until_ns: u64,
    /// Backed off (`Retry-After`) until this time; 0: never (`Endpoint::backoff_until_ns`).
    backoff_until_ns: u64,
}

impl View {
    fn new() -> Self {
        View {
            in_flight: 0,
            started_sum_ns: 0,
            busy_since_ns: 0,
            answered_ns: 0,
            ewma_ns: DEFAULT_RTT_MS * MS as f64,
            // The proxy's estimate is stamped at its epoch, the start of the run here.
            ewma_at_ns: 0,
            load: 0.0,
            load_at_ns: None,
            ejected_until_ns: 0,
            backoff_until_ns: 0,
        }
    }

    /// `Endpoint::is_ejected`. The proxy stamps `now + duration` and compares `now < until`
    /// on the same clock, so its `+1` on the epoch cancels out.
    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ns != 0 && now < self.ejected_until_ns
    }

    /// `PeakEwma::estimate_ns`: the stored estimate decayed toward zero with the time since the
    /// last sample. The proxy computes `stored × e^(−Δt/τ)`, which is exactly
    /// `decayed_ewma(stored, 0, Δt)` (a zero sample is never a peak).
    fn ewma_now_ns(&self, now: u64) -> f64 {
        decayed_ewma(self.ewma_ns, 0.0, secs_since(self.ewma_at_ns, now))
    }

    /// `Endpoint::mean_in_flight_age_ns`: the mean age of the requests in flight, 0 with none.
    /// (The proxy stamps both `now` and the start times `+1` after its epoch; the offsets
    /// cancel in the difference.)
    fn mean_in_flight_age_ns(&self, now: u64) -> f64 {
        if self.in_flight == 0 {
            return 0.0;
        }
        let started = self.started_sum_ns as f64 / self.in_flight as f64;
        (now as f64 - started).max(0.0)
    }

    /// `Endpoint::backoff_left_ns`: what is left of a `Retry-After` back-off, 0 when none.
    fn backoff_left_ns(&self, now: u64) -> f64 {
        self.backoff_until_ns.saturating_sub(now) as f64
    }

    /// `Endpoint::effective_rtt_ns`: the proxy's `expected_rtt_ns` of the EWMA, the mean age of
    /// the requests in flight and what is left of a back-off.
    fn effective_rtt_ns(&self, now: u64) -> f64 {
        expected_rtt_ns(
            self.ewma_now_ns(now),
            self.mean_in_flight_age_ns(now),
            self.backoff_left_ns(now),
        )
    }

    /// `Endpoint::cognitive_cost_at`: the rtt term is [`View::effective_rtt_ns`]; the load term
    /// is the proxy's `effective_load` of the fresh report (0 without one), the silence, the
    /// in-flight count and the stored EWMA: the report, or the answers missed while overdue if
    /// that is higher.
    fn cognitive_cost(&self, now: u64, weight: f64, stale_ns: u64, keep_in_flight: bool) -> f64 {
        let ewma = self.ewma_now_ns(now);
        let age = self.mean_in_flight_age_ns(now);
        let silence = silence_ns(self.in_flight, now, self.answered_ns, self.busy_since_ns);
        let load = effective_load(
            self.fresh_load(now, stale_ns, keep_in_flight),
            silence,
            self.in_flight,
            ewma,
        );
        let rtt = expected_rtt_ns(ewma, age, self.backoff_left_ns(now));
        cognitive_cost(rtt, self.in_flight, load, weight)
    }

    /// `Endpoint::fresh_load`: fresh while `now − at ≤ stale`, the age counting as 0 while
    /// `at` lies in the future (see [`Sidecar::observe_gateway_failure`]); with
    /// `keep_in_flight` (a what-if, not the proxy) a report does not go stale while requests
    /// are in flight on the endpoint.
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
    /// Ejections made by [`Sidecar::gateway_failure`] (a renewal counts again).
    ejections: u64,
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
            ejections: 0,
        }
    }

    /// `EndpointSet::pick(None)` at simulated time `now`: the strategy's choice, or when that
    /// is ejected the first endpoint that is not, scanning in index order (wrapping) from a
    /// start that depends on the strategy: round robin advances its counter once more and starts
    /// at the value that returns (the proxy's second `fetch_add`), every other strategy starts
    /// at a uniform index (`fastrand::usize(..n)` in the proxy; one more draw from `rng` here,
    /// made only in this case). `None` when every endpoint is ejected (the proxy answers 503
    /// `no_endpoints`). The strategy draws (and round robin advances) whether or not its choice
    /// is ejected, as in the proxy.
    pub fn pick(&mut self, now: u64, rng: &mut Rng) -> Option<usize> {
        let n = self.views.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return (!self.views[0].is_ejected(now)).then_some(0);
        }
        let i = match self.strategy {
            Strategy::RoundRobin => {
                let i = self.next % n;
                self.next = self.next.wrapping_add(1);
                i
            }
            Strategy::Cognitive | Strategy::CognitiveWeighted => {
                let (a, b) = self.draw_available_two(now, rng);
                let cost = |v: &View, w| v.cognitive_cost(now, w, self.stale_ns, self.keep_load_in_flight);
                let mut best = self.better(a, b, now, cost);
                let mut best_cost = cost(&self.views[best], self.weights[best]);
                for _ in 2..COGNITIVE_CHOICES {
                    let c = self.draw_one(rng);
                    let c_cost = cost(&self.views[c], self.weights[c]);
                    let (ec, eb) = (self.views[c].is_ejected(now), self.views[best].is_ejected(now));
                    if cheaper_candidate(ec, c_cost, eb, best_cost) {
                        (best, best_cost) = (c, c_cost);
                    }
                }
                best
            }
            Strategy::P2cEwma => {
                let (a, b) = self.draw_available_two(now, rng);
                self.better(a, b, now, |v, _| {
                    p2c_ewma_cost(v.effective_rtt_ns(now), v.in_flight)
                })
            }
            Strategy::LeastRequest => {
                let (a, b) = self.draw_available_two(now, rng);
                self.better(a, b, now, |v, w| v.in_flight as f64 / w)
            }
        };
        if !self.views[i].is_ejected(now) {
            return Some(i);
        }
        let start = match self.strategy {
            Strategy::RoundRobin => {
                let start = self.next;
                self.next = self.next.wrapping_add(1);
                start % n
            }
            Strategy::Cognitive
            | Strategy::CognitiveWeighted
            | Strategy::P2cEwma
            | Strategy::LeastRequest => rng.below(n),
        };
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&j| !self.views[j].is_ejected(now))
    }

    /// `EndpointSet::available`: endpoints that are candidates at `now`.
    pub fn available(&self, now: u64) -> usize {
        self.views.iter().filter(|v| !v.is_ejected(now)).count()
    }

    /// `EndpointSet::draw_available_two`: a pair that includes an ejected endpoint is drawn
    /// again, up to `PAIR_DRAWS` draws in all.
    fn draw_available_two(&self, now: u64, rng: &mut Rng) -> (usize, usize) {
        let mut pair = self.draw_two(rng);
        for _ in 1..PAIR_DRAWS {
            if !self.views[pair.0].is_ejected(now) && !self.views[pair.1].is_ejected(now) {
                break;
            }
            pair = self.draw_two(rng);
        }
        pair
    }

    /// `EndpointSet::draw_one`: a uniform or weighted index.
    fn draw_one(&self, rng: &mut Rng) -> usize {
        if self.uniform {
            rng.below(self.views.len())
        } else {
            weighted_index(&self.prefix, rng.unit())
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

    /// Of two candidates, the one not ejected; else (both or neither ejected) the lower-cost
    /// one, the first on a tie (`EndpointSet::better`).
    fn better(&self, a: usize, b: usize, now: u64, cost: impl Fn(&View, f64) -> f64) -> usize {
        let (va, vb) = (&self.views[a], &self.views[b]);
        match (va.is_ejected(now), vb.is_ejected(now)) {
            (false, true) => a,
            (true, false) => b,
            _ => {
                if cost(vb, self.weights[b]) < cost(va, self.weights[a]) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// `InFlight::start`.
    pub fn start(&mut self, i: usize, now: u64) {
        let v = &mut self.views[i];
        if v.in_flight == 0 {
            v.busy_since_ns = now;
        }
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
        self.views[i].answered_ns = now;
        self.observe_sample(i, now, sample_ns);
    }

    /// `PeakEwma::observe` alone (what `Endpoint::observe_gateway_failure` records: a sample,
    /// not an answer).
    fn observe_sample(&mut self, i: usize, now: u64, sample_ns: u64) {
        let v = &mut self.views[i];
        let elapsed_secs = secs_since(v.ewma_at_ns, now);
        v.ewma_at_ns = now;
        v.ewma_ns = decayed_ewma(v.ewma_ns, sample_ns as f64, elapsed_secs);
    }

    /// `Endpoint::back_off`: a 429/503 asked for `backoff_ns` (a later end replaces an
    /// earlier one, never the reverse).
    pub fn back_off(&mut self, i: usize, now: u64, backoff_ns: u64) {
        let v = &mut self.views[i];
        v.answered_ns = now;
        v.backoff_until_ns = v.backoff_until_ns.max(now.saturating_add(backoff_ns));
    }

    /// `Endpoint::observe_load`.
    pub fn observe_load(&mut self, i: usize, now: u64, load: f64) {
        let v = &mut self.views[i];
        v.load = load;
        v.load_at_ns = Some(now);
    }

    /// `Endpoint::eject_for`: not a candidate until `now + duration_ns` (a later ejection
    /// replaces an earlier one).
    pub fn eject_for(&mut self, i: usize, now: u64, duration_ns: u64) {
        self.views[i].ejected_until_ns = now.saturating_add(duration_ns);
    }

    /// `Endpoint::observe_gateway_failure(waited, hold)`: an RTT sample of the wait, and a load
    /// report of 1 stamped `now + hold_ns`, so that it stays fresh until `hold_ns` plus the
    /// staleness bound after the failure (a report time in the future counts as age 0).
    pub fn observe_gateway_failure(&mut self, i: usize, now: u64, waited_ns: u64, hold_ns: u64) {
        self.observe_sample(i, now, waited_ns);
        let v = &mut self.views[i];
        v.load = GATEWAY_FAILURE_LOAD;
        v.load_at_ns = Some(now.saturating_add(hold_ns));
    }

    /// What the proxy's forwarder does when a request to endpoint `i` fails with
    /// `upstream_timeout` or `upstream_connect` after `waited_ns` (the `Err` branch of
    /// `Forward::forward`, after the request's `InFlight` was dropped, i.e. after
    /// [`Sidecar::finish`]): `observe_gateway_failure(waited, GATEWAY_FAILURE_EJECTION_MS)` (an
    /// RTT sample of the wait and a load report of 1 held through the ejection, whether or not
    /// the endpoint is then ejected), then, if more than one endpoint is available at that
    /// moment (this one included when it is not already ejected),
    /// `eject_for(GATEWAY_FAILURE_EJECTION_MS)`.
    pub fn gateway_failure(&mut self, i: usize, now: u64, waited_ns: u64) {
        let ejection_ns = GATEWAY_FAILURE_EJECTION_MS * MS;
        self.observe_gateway_failure(i, now, waited_ns, ejection_ns);
        if self.available(now) > 1 {
            self.eject_for(i, now, ejection_ns);
            self.ejections += 1;
        }
    }

    /// How many times [`Sidecar::gateway_failure`] ejected an endpoint.
    pub fn ejections(&self) -> u64 {
        self.ejections
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

    const EJECT_NS: u64 = GATEWAY_FAILURE_EJECTION_MS * MS;
    const STALE_NS: u64 = DEFAULT_LOAD_STALE_MS * MS;

    #[test]
    fn a_stalled_endpoint_is_overdue_in_the_cognitive_cost() {
        // The proxy's `a_stalled_endpoint_costs_the_age_of_its_requests`: one request stuck
        // for 2 s, nothing answered, against the initial 30 ms estimate decayed on read to
        // 24.6 ms: 2 s / (0.5 × 24.6 ms) = 163 answers missed, so that is its load whatever it
        // last reported, on top of the 2 s age as the rtt term.
        for k in [Strategy::Cognitive, Strategy::CognitiveWeighted] {
            let mut s = Sidecar::new(k, &[1.0, 2.0], false);
            s.observe_load(0, 0, 0.1);
            s.start(0, 0);
            let now = 2_000_000_000;
            let v = &s.views[0];
            assert!((v.ewma_now_ns(now) - 30e6 * (-0.2f64).exp()).abs() < 1.0);
            assert_eq!(v.effective_rtt_ns(now), 2e9);
            let load = effective_load(Some(0.1), 2e9, 1, v.ewma_now_ns(now));
            assert!((load - 162.85).abs() < 0.01, "{load}");
            let cost = v.cognitive_cost(now, s.weights[0], s.stale_ns, false);
            assert_eq!(cost, cognitive_cost(2e9, 1, load, s.weights[0]), "{}", k.name());
            // p2c_ewma's cost of the same view is unchanged: age × (in flight + 1).
            assert_eq!(p2c_ewma_cost(v.effective_rtt_ns(now), v.in_flight), 4e9);
        }
    }

    #[test]
    fn overdue_compares_the_silence_with_the_decayed_estimate() {
        // Answered in 30 ms at 1 s, reported 0.25 then, one request sent then. Overdue once
        // silence × in flight > OVERDUE_ANSWERS (0.5) × the estimate as read (decayed): after
        // about 15 ms.
        assert_eq!(cogmesh_proxy::balance::cost::OVERDUE_ANSWERS, 0.5);
        let t0 = SEC;
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0], false);
        s.observe_rtt(0, t0, 30 * MS);
        s.observe_load(0, t0, 0.25);
        s.start(0, t0);
        let cost_at = |s: &Sidecar, age_ns: u64| {
            let now = t0 + age_ns;
            let v = &s.views[0];
            let ewma = v.ewma_ns * (-(age_ns as f64) / 1e9 / DECAY_SECS).exp();
            assert_eq!(v.ewma_now_ns(now), ewma);
            assert_eq!(v.mean_in_flight_age_ns(now), age_ns as f64);
            (v.cognitive_cost(now, 1.0, s.stale_ns, false), ewma)
        };
        // 14.9 ms: under half of the decayed 29.96 ms: on time, the report stands, and the rtt
        // term is the decayed EWMA.
        let (c, ewma) = cost_at(&s, 14_900_000);
        assert_eq!(c, cognitive_cost(ewma, 1, 0.25, 1.0));
        // 20 ms: overdue by 20 / (0.5 × 29.94).
        let (c, ewma) = cost_at(&s, 20 * MS);
        assert_eq!(c, cognitive_cost(ewma, 1, 20e6 / (0.5 * ewma), 1.0));
        // A second request at 20 ms and 5 ms more: 25 ms of silence with two held.
        s.start(0, t0 + 20 * MS);
        let now = t0 + 25 * MS;
        let v = &s.views[0];
        let ewma = v.ewma_now_ns(now);
        assert_eq!(
            v.cognitive_cost(now, 1.0, s.stale_ns, false),
            cognitive_cost(ewma, 2, 25e6 * 2.0 / (0.5 * ewma), 1.0)
        );
        // Nothing in flight: no silence, never overdue.
        s.finish(0, t0);
        s.finish(0, t0 + 20 * MS);
        let v = &s.views[0];
        assert_eq!(v.mean_in_flight_age_ns(now), 0.0);
        assert_eq!(
            v.cognitive_cost(now, 1.0, s.stale_ns, false),
            cognitive_cost(v.ewma_now_ns(now), 0, 0.25, 1.0)
        );
    }

    #[test]
    fn an_overdue_endpoint_without_a_report_counts_as_overloaded() {
        // Never reported (or its report went stale): load 0 on time, the answers missed once
        // overdue (against the initial 30 ms).
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0], false);
        s.start(0, 0);
        let v = &s.views[0];
        let now = 10 * MS;
        assert_eq!(
            v.cognitive_cost(now, 1.0, s.stale_ns, false),
            cognitive_cost(v.ewma_now_ns(now), 1, 0.0, 1.0)
        );
        let now = 100 * MS;
        assert_eq!(
            v.cognitive_cost(now, 1.0, s.stale_ns, false),
            cognitive_cost(100e6, 1, 100e6 / (0.5 * v.ewma_now_ns(now)), 1.0)
        );
        // The what-if that keeps reports while requests are in flight feeds the same rule.
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0], true);
        s.observe_load(0, 0, 0.1);
        s.start(0, 0);
        let now = 11 * SEC;
        assert_eq!(s.views[0].fresh_load(now, s.stale_ns, true), Some(0.1));
        let ewma = s.views[0].ewma_now_ns(now);
        assert_eq!(
            s.views[0].cognitive_cost(now, 1.0, s.stale_ns, true),
            cognitive_cost(11e9, 1, 11e9 / (0.5 * ewma), 1.0)
        );
    }

    #[test]
    fn cognitive_stops_picking_a_stalled_endpoint_that_last_reported_idle() {
        // Endpoint 0 answered in 30 ms and reported 0.1, then stalls with two requests in
        // flight; endpoint 1 answers in 50 ms, reports 0.8 and holds 4 requests. While 0 is on
        // time it is the cheaper; once it is overdue (silent 20 ms holding 2: 2.7 answers of
        // half its 30 ms missed) it loses every draw, as it would not on its stale 0.1.
        for (k, w0) in [(Strategy::Cognitive, 1.0), (Strategy::CognitiveWeighted, 2.0)] {
            let mut s = Sidecar::new(k, &[w0, 1.0], false);
            let mut rng = Rng::new(5);
            let t0 = SEC;
            s.observe_rtt(0, t0, 30 * MS);
            s.observe_load(0, t0, 0.1);
            s.start(0, t0);
            s.start(0, t0);
            for _ in 0..4 {
                s.start(1, t0);
            }
            // At 5 ms: 0 costs about 30 ms × 3 / 0.9 / w0 = 100 ms / w0 (silent 5 ms holding
            // 2: 0.67 answers missed), 1 costs 50 ms × 5 × 5 = 1250 ms.
            let on_time = t0 + 5 * MS;
            s.observe_rtt(1, on_time, 50 * MS);
            s.observe_load(1, on_time, 0.8);
            assert!(
                (0..20).all(|_| s.pick(on_time, &mut rng) == Some(0)),
                "{}",
                k.name()
            );
            // At 20 ms: 0 costs about 30 ms × 3 × 8e^14.3 / w0, 1 about 1250 ms.
            let overdue = t0 + 20 * MS;
            s.observe_rtt(1, overdue, 50 * MS);
            s.observe_load(1, overdue, 0.8);
            assert!(
                (0..20).all(|_| s.pick(overdue, &mut rng) == Some(1)),
                "{}",
                k.name()
            );
        }
        // p2c_ewma is unchanged: 30 ms × 3 = 90 ms against 50 ms × 5 = 250 ms: still 0.
        let mut s = Sidecar::new(Strategy::P2cEwma, &[1.0, 1.0], false);
        let mut rng = Rng::new(5);
        let t0 = SEC;
        s.observe_rtt(0, t0, 30 * MS);
        s.start(0, t0);
        s.start(0, t0);
        s.observe_rtt(1, t0, 50 * MS);
        for _ in 0..4 {
            s.start(1, t0);
        }
        assert!((0..20).all(|_| s.pick(t0 + 20 * MS, &mut rng) == Some(0)));
    }

    #[test]
    fn a_retry_after_is_a_back_off_not_a_sample() {
        // `Endpoint::back_off`: the EWMA keeps its value, the rtt term is what is left of the
        // back-off, and the refusal counts as an answer (no silence).
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0], false);
        s.observe_rtt(0, 0, 40 * MS);
        s.start(0, 0);
        s.back_off(0, 10 * MS, SEC);
        assert_eq!(s.views[0].ewma_ns, 40e6);
        assert_eq!(s.views[0].effective_rtt_ns(310 * MS), 700e6);
        assert_eq!(s.views[0].answered_ns, 10 * MS);
        // A shorter one does not cut it short; after it, the EWMA again.
        s.back_off(0, 20 * MS, 100 * MS);
        assert_eq!(s.views[0].backoff_until_ns, 1_010 * MS);
        s.finish(0, 0);
        let later = 1_010 * MS;
        assert_eq!(s.views[0].effective_rtt_ns(later), s.views[0].ewma_now_ns(later));
    }

    #[test]
    fn a_gateway_failure_is_a_sample_a_full_load_and_an_ejection() {
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0, 1.0], false);
        let now = 5 * 1_000_000_000;
        s.start(0, now - 1_000_000_000);
        s.finish(0, now - 1_000_000_000);
        s.gateway_failure(0, now, 1_000_000_000);
        // The wait is a peak: it replaces the estimate at once.
        assert_eq!(s.views[0].ewma_now_ns(now), 1e9);
        assert_eq!(
            s.views[0].fresh_load(now, s.stale_ns, false),
            Some(GATEWAY_FAILURE_LOAD)
        );
        // The full-load report is stamped at the end of the ejection.
        assert_eq!(s.views[0].load_at_ns, Some(now + EJECT_NS));
        assert_eq!(s.available(now), 2);
        // `now < until`: ejected up to the last nanosecond, back at `now + 10 s` exactly.
        assert!(s.views[0].is_ejected(now + EJECT_NS - 1));
        assert!(!s.views[0].is_ejected(now + EJECT_NS));
        assert_eq!(s.available(now + EJECT_NS), 3);
        // The report stays fresh through the ejection and the staleness bound after it
        // (`age > stale` is stale): up to `now + 20 s` included, not a nanosecond later.
        let held_until = now + EJECT_NS + STALE_NS;
        for t in [now + 1, now + EJECT_NS, now + EJECT_NS + 1, held_until] {
            assert_eq!(
                s.views[0].fresh_load(t, s.stale_ns, false),
                Some(GATEWAY_FAILURE_LOAD),
                "{t}"
            );
        }
        assert_eq!(s.views[0].fresh_load(held_until + 1, s.stale_ns, false), None);
        // A report the endpoint sends later (a response) replaces the held one, stamped then.
        s.observe_load(0, now + EJECT_NS + 1, 0.25);
        assert_eq!(
            s.views[0].fresh_load(held_until + 1, s.stale_ns, false),
            Some(0.25)
        );
    }

    #[test]
    fn the_held_full_load_keeps_a_returning_endpoint_out_of_cognitive_draws() {
        // Two endpoints; 0 failed at 1 s (ejected until 11 s). Endpoint 1 answers and reports
        // load 0.5 all along. Back from ejection, 0 costs more than 1 on load alone (both have
        // the same latency and nothing in flight) until 21 s: every pick goes to 1. Without
        // the hold (the report stamped at 1 s) it would look idle from 11 s on and win.
        let mut s = Sidecar::new(Strategy::Cognitive, &[1.0, 1.0], false);
        let mut rng = Rng::new(7);
        let t0 = 1_000_000_000;
        s.gateway_failure(0, t0, 30 * MS);
        s.observe_rtt(1, t0, 30 * MS);
        let mut t = t0 + EJECT_NS;
        while t <= t0 + EJECT_NS + STALE_NS {
            s.observe_load(1, t, 0.5);
            assert_eq!(s.pick(t, &mut rng), Some(1), "{t}");
            t += 100 * MS;
        }
        // Once the held report is stale, 0 looks unloaded and is the cheaper one.
        let t = t0 + EJECT_NS + STALE_NS + 1;
        s.observe_load(1, t, 0.5);
        assert!((0..20).any(|_| s.pick(t, &mut rng) == Some(0)));
    }

    #[test]
    fn the_last_available_endpoint_is_not_ejected() {
        let mut s = Sidecar::new(Strategy::P2cEwma, &[1.0, 1.0], false);
        s.gateway_failure(0, 10, 1_000);
        assert_eq!(s.available(10), 1);
        // Endpoint 1 fails too while 0 is out: it is the last one, so it stays (but is charged).
        s.gateway_failure(1, 20, 1_000);
        assert_eq!(s.available(20), 1);
        assert!(!s.views[1].is_ejected(20));
        // Its full-load report is held all the same (the proxy records it before deciding on
        // the ejection, with the ejection time as the hold).
        assert_eq!(s.views[1].load_at_ns, Some(20 + EJECT_NS));
        let held_until = 20 + EJECT_NS + STALE_NS;
        assert_eq!(
            s.views[1].fresh_load(held_until, s.stale_ns, false),
            Some(GATEWAY_FAILURE_LOAD)
        );
        assert_eq!(s.views[1].fresh_load(held_until + 1, s.stale_ns, false), None);
        // Endpoint 0 fails again (a request sent before its ejection): it is already out and
        // only 1 is available, so its ejection is not renewed.
        s.gateway_failure(0, 30, 1_000);
        assert_eq!(s.views[0].ejected_until_ns, 10 + EJECT_NS);
        assert_eq!(s.ejections(), 1);
    }

    #[test]
    fn a_failure_while_ejected_renews_the_ejection_if_others_are_left() {
        let mut s = Sidecar::new(Strategy::P2cEwma, &[1.0; 3], false);
        s.gateway_failure(0, 10, 1_000);
        // Another request to 0, sent before the ejection, times out: two others are available.
        s.gateway_failure(0, 500, 1_000);
        assert_eq!(s.views[0].ejected_until_ns, 500 + EJECT_NS);
        assert_eq!(s.ejections(), 2);
    }

    #[test]
    fn every_strategy_skips_ejected_endpoints_as_the_proxy_does() {
        for k in Strategy::ALL {
            let mut s = Sidecar::new(k, &[1.0, 2.0, 4.0], false);
            let mut rng = Rng::new(1);
            s.eject_for(1, 0, EJECT_NS);
            for t in 0..300 {
                assert_ne!(s.pick(t, &mut rng), Some(1), "{}", k.name());
            }
            // Back after the ejection.
            assert!(
                (0..300).any(|t| s.pick(EJECT_NS + t, &mut rng) == Some(1)),
                "{}",
                k.name()
            );
            for i in 0..3 {
                s.eject_for(i, EJECT_NS, EJECT_NS);
            }
            assert_eq!(s.pick(EJECT_NS + 1, &mut rng), None, "{}", k.name());
        }
    }

    #[test]
    fn round_robin_advances_once_more_on_an_ejected_turn() {
        // `EndpointSet::pick`: the counter advances on every pick (`fetch_add`); when its turn
        // is ejected it advances once more and the scan starts at the value that returns.
        // Picks made one after another (as one sidecar's are here) so start the scan at the
        // next turn, which the counter then skips: the ejected turn is taken by its neighbour
        // *instead of* the neighbour's own, and no endpoint gets two shares.
        let mut rng = Rng::new(1);
        let mut s = Sidecar::new(Strategy::RoundRobin, &[1.0; 4], false);
        s.eject_for(1, 0, EJECT_NS);
        let got: Vec<_> = (0..9).map(|_| s.pick(1, &mut rng).unwrap()).collect();
        assert_eq!(got, [0, 2, 3, 0, 2, 3, 0, 2, 3]);
        // Three picks took four turns each time round.
        assert_eq!(s.next, 12);

        // Two ejected in a row: the second ejected turn is skipped by the extra advance, the
        // scan runs past it to 3, whose own turn follows: 3 gets two picks in three.
        let mut s = Sidecar::new(Strategy::RoundRobin, &[1.0; 4], false);
        s.eject_for(1, 0, EJECT_NS);
        s.eject_for(2, 0, EJECT_NS);
        let got: Vec<_> = (0..6).map(|_| s.pick(1, &mut rng).unwrap()).collect();
        assert_eq!(got, [0, 3, 3, 0, 3, 3]);
        assert_eq!(s.next, 8);

        // Where the extra turn lands on an ejected endpoint the scan wraps: 11 backends, 10
        // and 0 ejected; the counter passes 10 (ejected) → start at 11 % 11 = 0 (ejected) → 1.
        let mut s = Sidecar::new(Strategy::RoundRobin, &[1.0; 11], false);
        s.eject_for(10, 0, EJECT_NS);
        s.eject_for(0, 0, EJECT_NS);
        let got: Vec<_> = (0..12).map(|_| s.pick(1, &mut rng).unwrap()).collect();
        // Turn 0 ejected → start 1: 1; then 2..9; turn 10 ejected → start 11 ≡ 0 → 1; turn 12
        // ≡ 1 → 1; then 2.
        assert_eq!(got, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1, 2]);

        // Every other endpoint out: 0 every time, two turns per pick.
        let mut s = Sidecar::new(Strategy::RoundRobin, &[1.0; 4], false);
        for i in 1..4 {
            s.eject_for(i, 0, EJECT_NS);
        }
        let got: Vec<_> = (0..4).map(|_| s.pick(1, &mut rng).unwrap()).collect();
        assert_eq!(got, [0, 0, 0, 0]);
        // Turns 0 (0), 1 (out) + 2 → 0, 3 (out) + 4 → 0, 5 (out) + 6 → 0.
        assert_eq!(s.next, 7);
        // Round robin never draws a random number.
        let mut fresh = Rng::new(1);
        let mut used = Rng::new(1);
        let mut s = Sidecar::new(Strategy::RoundRobin, &[1.0; 4], false);
        s.eject_for(2, 0, EJECT_NS);
        for _ in 0..10 {
            s.pick(1, &mut used);
        }
        assert_eq!(fresh.next_u64(), used.next_u64());
    }

    #[test]
    fn a_p2c_fallback_scans_from_a_uniform_start() {
        // Five endpoints, 0 and 1 ejected, nothing observed: every cost is equal, so `better`
        // takes the candidate not ejected, or the first of the pair. Replay the draws: pairs
        // until one holds no ejected endpoint (at most PAIR_DRAWS), then one uniform start
        // only when the choice is ejected.
        let ejected = |j: usize| j < 2;
        for k in [Strategy::Cognitive, Strategy::P2cEwma, Strategy::LeastRequest] {
            let mut s = Sidecar::new(k, &[1.0; 5], false);
            s.eject_for(0, 0, EJECT_NS);
            s.eject_for(1, 0, EJECT_NS);
            let mut rng = Rng::new(21);
            let mut replay = rng.clone();
            let mut fell_back_to = [0u32; 5];
            let mut picked = [0u32; 5];
            for t in 1..5_000 {
                let (mut a, mut b) = pair(5, replay.below(5), replay.below(4));
                for _ in 1..PAIR_DRAWS {
                    if !ejected(a) && !ejected(b) {
                        break;
                    }
                    (a, b) = pair(5, replay.below(5), replay.below(4));
                }
                let mut i = if ejected(a) && !ejected(b) { b } else { a };
                if matches!(k, Strategy::Cognitive) {
                    // Further single draws; with equal costs only an available one replaces
                    // an ejected choice.
                    for _ in 2..COGNITIVE_CHOICES {
                        let c = replay.below(5);
                        if cheaper_candidate(ejected(c), 0.0, ejected(i), 0.0) {
                            i = c;
                        }
                    }
                }
                let want = if ejected(i) {
                    let start = replay.below(5);
                    let j = (0..5).map(|d| (start + d) % 5).find(|&j| !ejected(j)).unwrap();
                    fell_back_to[j] += 1;
                    j
                } else {
                    i
                };
                assert_eq!(s.pick(t, &mut rng), Some(want), "{} at {t}", k.name());
                picked[want] += 1;
            }
            assert_eq!(rng.next_u64(), replay.next_u64(), "{}", k.name());
            // Four pairs in a row hold an ejected endpoint 0.7⁴ = 24 % of the time, and the
            // last is (0, 1) one time in seven of those: 3.4 %. That pick lands on 2 from
            // starts 0, 1, 2 and on 3 or 4 from their own: not always on the ejected endpoints'
            // neighbour. (Cognitive falls back only when its three further draws are ejected
            // too, 0.2 % of picks: too few to count here.)
            if matches!(k, Strategy::Cognitive) {
                continue;
            }
            let falls: u32 = fell_back_to.iter().sum();
            assert!(falls > 100, "{} {falls}", k.name());
            assert!(
                fell_back_to[3] > falls / 10 && fell_back_to[4] > falls / 10,
                "{fell_back_to:?}"
            );
            assert!(fell_back_to[2] > falls * 2 / 5, "{fell_back_to:?}");
            // The available three share the picks about evenly (a third each, ± 3 points).
            for j in 2..5 {
                let share = f64::from(picked[j]) / 4_999.0;
                assert!((share - 1.0 / 3.0).abs() < 0.03, "{} {picked:?}", k.name());
            }
        }
    }

    #[test]
    fn p2c_prefers_the_candidate_not_ejected_whatever_the_costs() {
        // Two endpoints: every draw is the pair (0, 1) in some order.
        for k in [Strategy::Cognitive, Strategy::P2cEwma, Strategy::LeastRequest] {
            let mut s = Sidecar::new(k, &[1.0, 1.0], false);
            let mut rng = Rng::new(3);
            // Endpoint 1 is far more expensive by every cost, endpoint 0 is ejected.
            for _ in 0..5 {
                s.start(1, 0);
            }
            s.observe_rtt(1, 0, 5_000_000_000);
            s.observe_load(1, 0, 0.9);
            s.eject_for(0, 0, EJECT_NS);
            for t in 1..100 {
                assert_eq!(s.pick(t, &mut rng), Some(1), "{}", k.name());
            }
            // Both candidates ejected: the cheaper by cost (0), which is ejected, so a scan
            // from a random start, which finds every endpoint ejected: nothing.
            s.eject_for(1, 0, EJECT_NS);
            assert_eq!(s.pick(100, &mut rng), None, "{}", k.name());
        }
    }

    #[test]
    fn both_ejected_candidates_compare_by_cost_then_fall_through() {
        // Three endpoints, 0 and 1 ejected, 2 not: a pair (0, 1) goes to the cheaper of the two
        // by cost, which is ejected, then to the first available endpoint from a random start,
        // which is 2 whatever the start; any pair with 2 in it goes to 2.
        let mut s = Sidecar::new(Strategy::P2cEwma, &[1.0; 3], false);
        let mut rng = Rng::new(5);
        s.eject_for(0, 0, EJECT_NS);
        s.eject_for(1, 0, EJECT_NS);
        for t in 0..200 {
            assert_eq!(s.pick(t, &mut rng), Some(2));
        }
    }

    #[test]
    fn a_pick_draws_again_only_while_its_pair_holds_an_ejected_endpoint() {
        // The proxy draws a pair, draws again while it holds an ejected endpoint (PAIR_DRAWS
        // pairs at most), and draws the fallback's start only when the choice is ejected.
        for (k, weights) in [
            (Strategy::Cognitive, [1.0; 3]),
            (Strategy::CognitiveWeighted, [1.0, 2.0, 4.0]),
            (Strategy::P2cEwma, [1.0; 3]),
            (Strategy::LeastRequest, [1.0; 3]),
        ] {
            // Cognitive draws COGNITIVE_CHOICES − 2 more single candidates, one number each.
            let more = match k {
                Strategy::Cognitive | Strategy::CognitiveWeighted => COGNITIVE_CHOICES - 2,
                _ => 0,
            };
            // Nothing ejected: one pair, two numbers per pick (and the further draws).
            let (mut a, mut b) = (Rng::new(11), Rng::new(11));
            let mut s = Sidecar::new(k, &weights, false);
            for now in 0..50 {
                assert!(s.pick(now, &mut a).is_some());
            }
            for _ in 0..50 * (2 + more) {
                b.next_u64();
            }
            assert_eq!(a.next_u64(), b.next_u64(), "{}", k.name());
            // All ejected: every pair holds one and every choice is ejected: PAIR_DRAWS pairs,
            // the further draws and the start, nine numbers per pick (twelve for cognitive).
            assert_eq!(PAIR_DRAWS, 4);
            let (mut a, mut b) = (Rng::new(11), Rng::new(11));
            for i in 0..3 {
                s.eject_for(i, 0, EJECT_NS);
            }
            for now in 0..50 {
                assert_eq!(s.pick(now, &mut a), None);
            }
            for _ in 0..50 * (9 + more) {
                b.next_u64();
            }
            assert_eq!(a.next_u64(), b.next_u64(), "{}", k.name());
        }
    }
}
