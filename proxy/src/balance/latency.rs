//! Per-endpoint latency distribution for the load reports (and so for `cogmesh top`'s p50 /
//! p99): a fixed set of logarithmic buckets counted with one relaxed atomic add per attempt.
//! The reporter diffs two snapshots and reads percentiles from the difference, so no reset and
//! no lock is ever needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets grow by ×1.25 from [`FIRST_BOUND_US`]: 64 of them reach ≈ 16 minutes.
pub const BUCKETS: usize = 64;
/// The upper bound of the first bucket, µs.
pub const FIRST_BOUND_US: f64 = 50.0;
const GROWTH: f64 = 1.25;

/// Latency counts by bucket.
#[derive(Debug)]
pub struct LatencyBuckets {
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyBuckets {
    fn default() -> Self {
        LatencyBuckets {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The upper bound of bucket `i`, µs.
fn bound_us(i: usize) -> f64 {
    FIRST_BOUND_US * GROWTH.powi(i as i32)
}

fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= FIRST_BOUND_US {
        return 0;
    }
    let i = ((us / FIRST_BOUND_US).ln() / GROWTH.ln()).ceil() as usize;
    i.min(BUCKETS - 1)
}

impl LatencyBuckets {
    pub fn observe(&self, latency: Duration) {
        self.counts[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// The `q` quantile (0–1) in milliseconds of the observations between snapshots `before` and
/// `after`, interpolated within its bucket; `None` without observations.
pub fn quantile_ms(before: &[u64; BUCKETS], after: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let counts: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut seen = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let low = if i == 0 { 0.0 } else { bound_us(i - 1) };
            let share = (rank - seen as f64) / n as f64;
            return Some((low + (bound_us(i) - low) * share) / 1000.0);
        }
        seen += n;
    }
    Some(bound_us(BUCKETS - 1) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_difference_of_snapshots() {
        let b = LatencyBuckets::default();
        for _ in 0..50 {
            b.observe(Duration::from_millis(100));
        }
        let before = b.snapshot();
        for _ in 0..98 {
            b.observe(Duration::from_millis(2));
        }
        b.observe(Duration::from_millis(40));
        b.observe(Duration::from_millis(40));
        let after = b.snapshot();
        let p50 = quantile_ms(&before, &after, 0.5).unwrap();
        let p99 = quantile_ms(&before, &after, 0.99).unwrap();
        // Within one bucket (×1.25) of the truth; the earlier 100 ms do not count.
        assert!((1.6..=2.5).contains(&p50), "{p50}");
        assert!((32.0..=50.0).contains(&p99), "{p99}");
        assert_eq!(quantile_ms(&after, &after, 0.5), None);
        assert_eq!(bucket_of(Duration::from_secs(100_000)), BUCKETS - 1);
        assert_eq!(bucket_of(Duration::ZERO), 0);
    }
}
