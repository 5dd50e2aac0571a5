//! The pure decisions of the balancers, callable without a runtime (the simulator in `bench/`
//! uses the same functions): the cognitive cost, the pair draws, and the penalty for an
//! endpoint that asked us to back off.

use std::time::Duration;

/// Loads above this are treated as this: `1/(1−ρ)` must stay finite.
pub const MAX_LOAD: f64 = 0.95;
/// A `Retry-After` shorter than this still costs this much latency.
pub const MIN_RETRY_PENALTY_MS: u64 = 100;
/// A `Retry-After` longer than this costs only this much latency.
pub const MAX_RETRY_PENALTY_MS: u64 = 10_000;

/// The expected time for an endpoint to answer one more request:
/// `rtt × (in_flight + 1) × 1/(1 − min(load, 0.95)) / weight` — latency times the queue ahead
/// of the request, inflated by the queueing-delay factor of the load the endpoint reports about
/// itself, divided by the weight the control plane gives it.
pub fn cognitive_cost(rtt_ns: f64, in_flight: u64, load: f64, weight: f64) -> f64 {
    let load = load.clamp(0.0, MAX_LOAD);
    let weight = if weight > 0.0 { weight } else { f64::MIN_POSITIVE };
    rtt_ns * (in_flight as f64 + 1.0) / (1.0 - load) / weight
}

/// Requests in flight whose mean age exceeds this many times the endpoint's latency estimate
/// are overdue: the endpoint has stopped answering at its usual pace. 1: on average older than
/// a typical response takes. (The balancer simulator in `bench/` measured 2 to react too late
/// to a stall: the first second's requests had already gone to the stalled endpoint.)
pub const OVERDUE_FACTOR: f64 = 1.0;

/// The load the cognitive cost uses: the endpoint's fresh report (0 without one), raised to
/// [`MAX_LOAD`] while its requests are overdue — a stalled endpoint sends no new report, and
/// the last one it sent (from before it stalled) would otherwise make it look idle beside
/// healthy endpoints that report their real load.
pub fn effective_load(reported: Option<f64>, mean_age_ns: f64, rtt_ewma_ns: f64) -> f64 {
    let load = reported.unwrap_or(0.0);
    if mean_age_ns > OVERDUE_FACTOR * rtt_ewma_ns {
        load.max(MAX_LOAD)
    } else {
        load
    }
}

/// Linkerd's peak-EWMA load: latency × (in-flight + 1).
pub fn p2c_ewma_cost(rtt_ns: f64, in_flight: u64) -> f64 {
    rtt_ns * (in_flight as f64 + 1.0)
}

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

/// The latency charged for a 429/503 that carries `Retry-After: seconds`.
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
        // Load is capped at 0.95: factor 20.
        assert!((cognitive_cost(1e6, 0, 3.0, 1.0) - 20e6).abs() < 1e-3);
        assert_eq!(
            cognitive_cost(1e6, 0, 0.95, 1.0),
            cognitive_cost(1e6, 0, 1.0, 1.0)
        );
        // Negative loads (never produced by the parser) count as idle.
        assert_eq!(cognitive_cost(1e6, 0, -1.0, 1.0), 1e6);
        assert_eq!(p2c_ewma_cost(10e6, 3), 40e6);
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
    fn overdue_endpoints_count_as_saturated() {
        // Mean age 30 ms against a 30 ms estimate: on time, the report stands.
        assert_eq!(effective_load(Some(0.25), 30e6, 30e6), 0.25);
        assert_eq!(effective_load(None, 30e6, 30e6), 0.0);
        // Mean age 31 ms: overdue, saturated whatever it last said.
        assert_eq!(effective_load(Some(0.25), 31e6, 30e6), MAX_LOAD);
        assert_eq!(effective_load(None, 31e6, 30e6), MAX_LOAD);
        // A report above the cap is kept (the cost caps it anyway).
        assert_eq!(effective_load(Some(1.0), 31e6, 30e6), 1.0);
        // Nothing in flight: mean age 0, never overdue.
        assert_eq!(effective_load(Some(0.5), 0.0, 30e6), 0.5);
    }

    #[test]
    fn retry_after_penalty_is_bounded() {
        assert_eq!(retry_after_penalty(0), Duration::from_millis(100));
        assert_eq!(retry_after_penalty(2), Duration::from_secs(2));
        assert_eq!(retry_after_penalty(3600), Duration::from_secs(10));
    }
}
