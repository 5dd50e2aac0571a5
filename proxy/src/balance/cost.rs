//! The pure decisions of the balancers, callable without a runtime (the simulator in `bench/`
//! uses the same functions): the cognitive cost, the pair draws, and the penalty for an
//! endpoint that asked us to back off.

use std::time::Duration;

/// Up to this load the load factor is the queueing-delay factor `1/(1−ρ)`; above it, an
/// exponential with the same value and slope at the knee (see [`load_factor`]). 7/8: exact in
/// binary, so the factor there is exactly 8.
pub const KNEE_LOAD: f64 = 0.875;
/// Loads above this are treated as this: a report of demand / capacity may exceed 1, but the
/// cost must stay finite (the factor at 50 is about 1e171).
pub const MAX_LOAD: f64 = 50.0;
/// The load an endpoint is held at after a gateway failure (it timed out or refused the
/// connection): [`MAX_LOAD`], as loaded as a report can make it. A load of 1 (full, no queue)
/// was not enough: in `balance-sim` scenario (a), healthy endpoints that reported queues
/// (loads 1.25–1.75) while one backend was out cost more than the dead one held at 1, and each
/// sidecar sent it a few more requests, all lost, as soon as its ejection ended.
pub const GATEWAY_FAILURE_LOAD: f64 = MAX_LOAD;
/// A `Retry-After` shorter than this still backs off this long.
pub const MIN_RETRY_PENALTY_MS: u64 = 100;
/// A `Retry-After` longer than this backs off only this long.
pub const MAX_RETRY_PENALTY_MS: u64 = 10_000;

/// The factor by which a load report `ρ` (demand / capacity, more than 1 while requests queue)
/// inflates the expected time of one more request: `1/(1−ρ)` up to [`KNEE_LOAD`], then
/// `8 × e^(8 × (ρ − 7/8))` — the same value and slope at the knee, and ×e^8 (about 3000) for
/// every further unit of load, i.e. for every queue as long as the endpoint's slots. Past the
/// knee the endpoint's own account of its queue, relative to its capacity, outweighs everything
/// the proxy measures (latency and in-flight count scale with the queue too, but not with the
/// capacity), so overloaded endpoints of different sizes end up with queues in proportion to
/// their slots — the same wait everywhere — instead of with the same number of requests.
/// Negative or NaN loads count as idle, loads above [`MAX_LOAD`] as [`MAX_LOAD`].
pub fn load_factor(load: f64) -> f64 {
    let load = if load.is_nan() {
        0.0
    } else {
        load.clamp(0.0, MAX_LOAD)
    };
    if load <= KNEE_LOAD {
        return 1.0 / (1.0 - load);
    }
    let at_knee = 1.0 / (1.0 - KNEE_LOAD);
    at_knee * (at_knee * (load - KNEE_LOAD)).exp()
}

/// The expected time for an endpoint to answer one more request:
/// `rtt × (in_flight + 1) × load_factor(load) / weight` — latency times the queue ahead of the
/// request, inflated by the [`load_factor`] of the load the endpoint reports about itself,
/// divided by the weight the control plane gives it.
pub fn cognitive_cost(rtt_ns: f64, in_flight: u64, load: f64, weight: f64) -> f64 {
    let weight = if weight > 0.0 { weight } else { f64::MIN_POSITIVE };
    rtt_ns * (in_flight as f64 + 1.0) * load_factor(load) / weight
}

/// An endpoint that holds requests is overdue once it has been silent for as long as this
/// many answers should have taken: by Little's law an endpoint holding `in_flight` requests
/// that take `rtt` each answers `in_flight / rtt` of them per unit of time, so a silence of
/// `rtt / in_flight` is one answer missed. The peak-EWMA as `rtt` is about the slow end of the
/// endpoint's latencies, so that count is conservative, and half an answer is the threshold: in
/// `balance-sim` (scenarios a and ra) 1 still let a stalled endpoint that had last reported
/// itself idle collect requests for about twice as long, and 0.3 was no better than 0.5.
pub const OVERDUE_ANSWERS: f64 = 0.5;

/// The load the cognitive cost uses: the endpoint's fresh report (0 without one), or, while it
/// is overdue, how overdue it is if that is higher: `silence × in_flight / (OVERDUE_ANSWERS ×
/// rtt)`, the answers it has missed, counted in units of [`OVERDUE_ANSWERS`] (overdue means
/// more than 1). `silence` is how long the endpoint has held requests without answering
/// ([`silence_ns`]).
///
/// A stalled endpoint sends no new report, and the last one it sent (from before it stalled,
/// perhaps when it was idle) would otherwise make it look idle beside healthy endpoints that
/// report their real load, and win draws until its requests time out. This way it counts as
/// overloaded as soon as its answers stop coming at the pace it has been answering, and more so
/// the longer the silence and the more requests it holds. An endpoint that answers at its
/// usual pace is never overdue, however long its queue.
pub fn effective_load(reported: Option<f64>, silence_ns: f64, in_flight: u64, rtt_ewma_ns: f64) -> f64 {
    let load = reported.unwrap_or(0.0);
    let overdue = silence_ns * in_flight as f64 / (OVERDUE_ANSWERS * rtt_ewma_ns);
    if overdue.is_finite() && overdue > 1.0 {
        load.max(overdue)
    } else {
        load
    }
}

/// How long an endpoint that holds requests has gone without answering: since the later of its
/// last answer and the moment it went from idle to busy (ns on one clock); 0 when it holds
/// none.
pub fn silence_ns(in_flight: u64, now_ns: u64, answered_ns: u64, busy_since_ns: u64) -> f64 {
    if in_flight == 0 {
        return 0.0;
    }
    now_ns.saturating_sub(answered_ns.max(busy_since_ns)) as f64
}

/// The latency estimate of the cost: the peak-EWMA, the mean age of the requests in flight
/// (an endpoint that stalls answers nothing, so its EWMA alone would never rise), or what is
/// left of the back-off an endpoint asked for with `Retry-After`, whichever is largest.
pub fn expected_rtt_ns(ewma_ns: f64, mean_age_ns: f64, backoff_left_ns: f64) -> f64 {
    ewma_ns.max(mean_age_ns).max(backoff_left_ns)
}

/// Linkerd's peak-EWMA load: latency × (in-flight + 1).
pub fn p2c_ewma_cost(rtt_ns: f64, in_flight: u64) -> f64 {
    rtt_ns * (in_flight as f64 + 1.0)
}

/// How many candidates a `cognitive` pick compares: the weighted pair of P2C
/// ([`weighted_pair`]), then this many less two further weighted draws
/// ([`weighted_index`], with replacement), each against the cheapest so far
/// ([`cheaper_candidate`]). Two would be plain P2C, as `p2c_ewma` and `least_request` keep.
///
/// Why five: with two, scenario (a) of `balance-sim` (eleven backends, one slowed to 2 s) put
/// cognitive's p99.9 level with `p2c_ewma`'s (602 vs 598 ms, seed 1), since a pair of two
/// queued endpoints leaves nothing better to choose, whatever the costs say. More candidates
/// let the cost find an endpoint with a free slot more often. In `balance-sim --scenarios a,ra`
/// over seeds 1–5, five beat three, four, six and eight: p99.9 in (ra) fell below `p2c_ewma`'s
/// on all five seeds and in (a) on four of five. More draws also mean more sidecars that agree
/// on the same cheapest endpoint between two reports (herding), which six and eight began to
/// show. Three more costs to compute make a pick about 0.3 µs slower: 612 ns at 1 000 endpoints
/// against 290 ns with the pair, still under the 1 µs target (`bench/benches/pick.rs`).
pub const COGNITIVE_CHOICES: usize = 5;

/// Whether a further candidate replaces the cheapest so far: one not ejected replaces an
/// ejected one; otherwise a strictly lower cost wins, so on a tie the earlier draw stays.
pub fn cheaper_candidate(
    candidate_ejected: bool,
    candidate_cost: f64,
    best_ejected: bool,
    best_cost: f64,
) -> bool {
    match (candidate_ejected, best_ejected) {
        (false, true) => true,
        (true, false) => false,
        _ => candidate_cost < best_cost,
    }
}

/// How many pairs a P2C pick draws at most while the pair it drew includes an ejected endpoint
/// (`EndpointSet::draw_available_two`): with a quarter of many endpoints ejected, a pair
/// includes one 7 times in 16, and four pairs in a row about 1 time in 27.
pub const PAIR_DRAWS: usize = 4;

/// Two distinct indices in `0..n` from two uniform draws `r1 ∈ 0..n` and `r2 ∈ 0..n-1`
/// (`n ≥ 2`): the second draw skips the first index, so every ordered pair is equally likely.
pub fn pair(n: usize, r1: usize, r2: usize) -> (usize, usize) {
    debug_assert!(n >= 2 && r1 < n && r2 < n - 1);
    let second = if r2 >= r1 { r2 + 1 } else { r2 };
    (r1, second)
}

/// The index drawn by `u ∈ [0, 1)` when index `i` has probability `weight_i / total`;
/// `prefix[i]` is the sum of the weights up to and including `i`.
pub fn weighted_index(prefix: &[f64], u: f64) -> usize {
    let total = prefix.last().copied().unwrap_or(0.0);
    let target = u * total;
    // The first index whose cumulative weight exceeds the target.
    prefix.partition_point(|&c| c <= target).min(prefix.len() - 1)
}

/// Two distinct indices, each drawn with probability proportional to its weight: the second
/// draw is made over the weights without the first (`u2` rescaled onto the remaining mass).
pub fn weighted_pair(prefix: &[f64], u1: f64, u2: f64) -> (usize, usize) {
    let first = weighted_index(prefix, u1);
    let total = prefix.last().copied().unwrap_or(0.0);
    let w_first = prefix[first] - if first == 0 { 0.0 } else { prefix[first - 1] };
    let remaining = total - w_first;
    let mut target = u2 * remaining;
    // Skip over the first index's slice of the line.
    let below = if first == 0 { 0.0 } else { prefix[first - 1] };
    if target >= below {
        target += w_first;
    }
    let mut second = prefix.partition_point(|&c| c <= target).min(prefix.len() - 1);
    if second == first {
        // Rounding at a boundary: take the neighbour.
        second = if first + 1 < prefix.len() {
            first + 1
        } else {
            first - 1
        };
    }
    (first, second)
}

/// How long an endpoint that answered 429/503 with `Retry-After: seconds` is backed off: its
/// latency estimate is at least what is left of this (see [`expected_rtt_ns`]). The back-off
/// is kept apart from the peak-EWMA, so it ends when it says and does not bury the endpoint's
/// measured latency for the EWMA's decay time.
pub fn retry_after_penalty(seconds: u64) -> Duration {
    Duration::from_millis((seconds.saturating_mul(1000)).clamp(MIN_RETRY_PENALTY_MS, MAX_RETRY_PENALTY_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cognitive_cost_exact_values() {
        // 10 ms, 1 in flight, idle, weight 1: 10 ms × 2.
        assert_eq!(cognitive_cost(10e6, 1, 0.0, 1.0), 20e6);
        // Load 0.5 doubles it; weight 2 halves it.
        assert_eq!(cognitive_cost(10e6, 1, 0.5, 2.0), 20e6);
        // Load 0.75: factor 4.
        assert_eq!(cognitive_cost(1e6, 0, 0.75, 1.0), 4e6);
        // Past the knee (7/8, factor 8): 8 × e^(8 × (ρ − 7/8)). Load 1: 8e; load 2: 8e^9;
        // load 3 (a queue twice the slots): 8e^17 — an overloaded endpoint costs more the
        // longer its queue, about 3000 times more per queue as long as its slots.
        assert_eq!(cognitive_cost(1e6, 0, 1.0, 1.0), 1e6 * (8.0 * 1f64.exp()));
        assert_eq!(cognitive_cost(1e6, 0, 2.0, 1.0), 1e6 * (8.0 * 9f64.exp()));
        assert_eq!(cognitive_cost(1e6, 0, 3.0, 1.0), 1e6 * (8.0 * 17f64.exp()));
        assert_eq!(
            cognitive_cost(10e6, 3, 2.0, 4.0),
            10e6 * 4.0 * (8.0 * 9f64.exp()) / 4.0
        );
        // Negative and NaN loads (never produced by the parser) count as idle; loads beyond
        // MAX_LOAD as MAX_LOAD; the cost stays finite.
        assert_eq!(cognitive_cost(1e6, 0, -1.0, 1.0), 1e6);
        assert_eq!(cognitive_cost(1e6, 0, f64::NAN, 1.0), 1e6);
        assert_eq!(
            cognitive_cost(1e6, 0, 1e300, 1.0),
            cognitive_cost(1e6, 0, MAX_LOAD, 1.0)
        );
        assert_eq!(load_factor(f64::INFINITY), load_factor(MAX_LOAD));
        assert!(load_factor(MAX_LOAD).is_finite());
        assert_eq!(p2c_ewma_cost(10e6, 3), 40e6);
    }

    #[test]
    fn load_factor_is_smooth_at_the_knee_and_grows_past_it() {
        assert_eq!(load_factor(0.0), 1.0);
        assert_eq!(load_factor(0.5), 2.0);
        assert_eq!(load_factor(0.75), 4.0);
        assert_eq!(load_factor(KNEE_LOAD), 8.0);
        // Same value and slope (1/(1−ρ)² = 64) on both sides of the knee.
        let h = 1e-7;
        let below = (load_factor(KNEE_LOAD) - load_factor(KNEE_LOAD - h)) / h;
        let above = (load_factor(KNEE_LOAD + h) - load_factor(KNEE_LOAD)) / h;
        assert!((below - 64.0).abs() < 1e-3, "{below}");
        assert!((above - 64.0).abs() < 1e-3, "{above}");
        // One more unit of load past the knee: ×e^8.
        assert!((load_factor(2.5) / load_factor(1.5) - 8f64.exp()).abs() < 1e-6);
        // Strictly increasing up to MAX_LOAD, then flat and finite.
        let mut last = 0.0;
        for i in 0..=5000 {
            let f = load_factor(i as f64 / 100.0);
            assert!(f > last && f.is_finite(), "{i}: {f} after {last}");
            last = f;
        }
        assert_eq!(load_factor(MAX_LOAD + 1.0), load_factor(MAX_LOAD));
    }

    #[test]
    fn weighted_index_follows_the_weights() {
        let prefix = [1.0, 3.0, 7.0]; // weights 1, 2, 4
        assert_eq!(weighted_index(&prefix, 0.0), 0);
        assert_eq!(weighted_index(&prefix, 0.99 / 7.0), 0);
        assert_eq!(weighted_index(&prefix, 1.0 / 7.0), 1);
        assert_eq!(weighted_index(&prefix, 2.99 / 7.0), 1);
        assert_eq!(weighted_index(&prefix, 3.0 / 7.0), 2);
        assert_eq!(weighted_index(&prefix, 0.999_999), 2);
    }

    #[test]
    fn weighted_pair_is_distinct_and_excludes_the_first_draw() {
        let prefix = [1.0, 3.0, 7.0];
        // First draw 2 (weight 4); the second is over weights [1, 2]: u2 < 1/3 → 0, else 1.
        assert_eq!(weighted_pair(&prefix, 0.9, 0.0), (2, 0));
        assert_eq!(weighted_pair(&prefix, 0.9, 0.34), (2, 1));
        // First draw 0 (weight 1); the second is over [2, 4]: u2 < 1/3 → 1, else 2.
        assert_eq!(weighted_pair(&prefix, 0.0, 0.3), (0, 1));
        assert_eq!(weighted_pair(&prefix, 0.0, 0.5), (0, 2));
        // First draw 1; the second over [1, 4]: u2 < 0.2 → 0, else 2.
        assert_eq!(weighted_pair(&prefix, 0.2, 0.19), (1, 0));
        assert_eq!(weighted_pair(&prefix, 0.2, 0.21), (1, 2));
        for i in 0..1000 {
            let (a, b) = weighted_pair(&prefix, (i as f64) / 1000.0, ((i * 7919) % 1000) as f64 / 1000.0);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn pair_is_always_distinct_and_covers_every_pair() {
        let n = 4;
        let mut seen = std::collections::HashSet::new();
        for r1 in 0..n {
            for r2 in 0..n - 1 {
                let (a, b) = pair(n, r1, r2);
                assert_ne!(a, b);
                seen.insert((a, b));
            }
        }
        assert_eq!(seen.len(), n * (n - 1));
        assert_eq!(pair(3, 1, 1), (1, 2));
        assert_eq!(pair(3, 1, 0), (1, 0));
    }

    #[test]
    fn silent_endpoints_count_as_overloaded() {
        // One request, silent for 15 ms against a 30 ms estimate: half an answer missed, which
        // is OVERDUE_ANSWERS — not more, so the report stands.
        assert_eq!(OVERDUE_ANSWERS, 0.5);
        assert_eq!(effective_load(Some(0.25), 15e6, 1, 30e6), 0.25);
        assert_eq!(effective_load(None, 15e6, 1, 30e6), 0.0);
        // Silent for 30 ms: one answer missed, overdue by 2, whatever it last said.
        assert_eq!(effective_load(Some(0.25), 30e6, 1, 30e6), 2.0);
        assert_eq!(effective_load(None, 30e6, 1, 30e6), 2.0);
        // Four requests held: four times the answers missed in the same silence.
        assert_eq!(effective_load(Some(0.25), 30e6, 4, 30e6), 8.0);
        assert_eq!(effective_load(Some(0.25), 6e6, 4, 30e6), 1.6);
        assert_eq!(effective_load(Some(0.25), 3e6, 4, 30e6), 0.25);
        // A higher report is kept.
        assert_eq!(effective_load(Some(2.5), 30e6, 1, 30e6), 2.5);
        // Nothing in flight (no silence), or no estimate to compare with: the report.
        assert_eq!(effective_load(Some(0.5), 0.0, 0, 30e6), 0.5);
        assert_eq!(effective_load(Some(0.5), 1e6, 1, 0.0), 0.5);
    }

    #[test]
    fn silence_runs_from_the_later_of_the_last_answer_and_becoming_busy() {
        // Nothing in flight: never silent.
        assert_eq!(silence_ns(0, 1_000, 10, 20), 0.0);
        // Busy since 20, last answer at 10 (before): silent since 20.
        assert_eq!(silence_ns(3, 1_000, 10, 20), 980.0);
        // Answered at 500 while busy: silent since 500.
        assert_eq!(silence_ns(3, 1_000, 500, 20), 500.0);
        // Clocks read out of order never give a negative silence.
        assert_eq!(silence_ns(1, 5, 10, 20), 0.0);
    }

    #[test]
    fn expected_rtt_is_the_largest_estimate() {
        assert_eq!(expected_rtt_ns(30e6, 0.0, 0.0), 30e6);
        assert_eq!(expected_rtt_ns(30e6, 2e9, 0.0), 2e9);
        assert_eq!(expected_rtt_ns(30e6, 10e6, 900e6), 900e6);
    }

    #[test]
    fn retry_after_penalty_is_bounded() {
        assert_eq!(retry_after_penalty(0), Duration::from_millis(100));
        assert_eq!(retry_after_penalty(2), Duration::from_secs(2));
        assert_eq!(retry_after_penalty(3600), Duration::from_secs(10));
    }
}
