//! Metrics written on every request, kept per worker thread and summed when scraped.
//!
//! prometheus-client's histogram takes a mutex per observation, and its counter is one atomic
//! that every worker would write: at two or more workers both bounce a cache line between cores
//! on each request. Here each worker has its own cache-line-aligned shard (see
//! [`crate::worker`]) and a scrape adds them up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A value owned by one worker, alone in its cache lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

fn shards<T: Default>() -> Arc<[Padded<T>]> {
    (0..crate::worker::count()).map(|_| Padded::default()).collect()
}

fn own<T>(shards: &[Padded<T>]) -> &T {
    &shards[crate::worker::index() % shards.len()].0
}

/// A monotonic counter with one shard per worker.
#[derive(Clone, Debug)]
pub struct ShardedCounter {
    shards: Arc<[Padded<AtomicU64>]>,
}

impl Default for ShardedCounter {
    fn default() -> Self {
        ShardedCounter { shards: shards() }
    }
}

impl ShardedCounter {
    pub fn inc(&self) {
        own(&self.shards).fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A latency histogram with one shard per worker: an atomic count per bucket and the sum in
/// nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    /// Upper bounds in seconds, ascending; each shard has one more count, for +Inf.
    bounds: &'static [f64],
    shards: Arc<[Padded<Shard>]>,
}

#[derive(Debug, Default)]
struct Shard {
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let shards = (0..crate::worker::count())
            .map(|_| {
                Padded(Shard {
                    counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                    sum_ns: AtomicU64::new(0),
                })
            })
            .collect();
        LatencyHistogram { bounds, shards }
    }

    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        // The first bucket whose bound is ≥ the value (`le` is inclusive).
        let slot = self.bounds.partition_point(|b| *b < secs);
        let shard = own(&self.shards);
        shard.counts[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations per bucket over all shards (not cumulative), the last one for +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .enumerate()
            .map(|(i, bound)| {
                let n = self
                    .shards
                    .iter()
                    .map(|s| s.0.counts[i].load(Ordering::Relaxed))
                    .sum();
                (bound, n)
            })
            .collect()
    }

    fn sum_ns(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.sum_ns.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_ns() as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_whose_bound_is_not_below_them() {
        static BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];
        let h = LatencyHistogram::new(&BOUNDS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1)); // on the bound: le is inclusive
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let counts: Vec<u64> = h.buckets().iter().map(|(_, c)| *c).collect();
        assert_eq!(counts, vec![2, 0, 1, 1]);
        assert_eq!(h.sum_ns(), 3_051_500_000);
    }

    #[test]
    fn shards_of_every_worker_are_summed() {
        static BOUNDS: [f64; 1] = [0.01];
        let counter = ShardedCounter {
            shards: (0..3).map(|_| Padded::default()).collect(),
        };
        let h = LatencyHistogram {
            bounds: &BOUNDS,
            shards: (0..3)
                .map(|_| {
                    Padded(Shard {
                        counts: (0..2).map(|_| AtomicU64::new(0)).collect(),
                        sum_ns: AtomicU64::new(0),
                    })
                })
                .collect(),
        };
        let threads: Vec<_> = (0..3)
            .map(|w| {
                let (counter, h) = (counter.clone(), h.clone());
                std::thread::spawn(move || {
                    crate::worker::enter(w);
                    for _ in 0..=w {
                        counter.inc();
                        h.observe(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.get(), 6);
        let per_shard: Vec<u64> = counter
            .shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .collect();
        assert_eq!(per_shard, vec![1, 2, 3]);
        assert_eq!(h.buckets(), vec![(0.01, 6), (f64::INFINITY, 0)]);
        assert_eq!(h.sum_ns(), 30_000_000);
    }

    #[test]
    fn text_output_is_cumulative_with_sum_and_count() {
        static BOUNDS: [f64; 2] = [0.01, 0.1];
        let h = LatencyHistogram::new(&BOUNDS);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(20));
        let c = ShardedCounter::default();
        c.inc();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("lat", "latency", h);
        registry.register("req", "requests", c);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE lat histogram"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.01\"} 1"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.1\"} 2"), "{text}");
        assert!(text.contains("lat_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("lat_count 2"), "{text}");
        assert!(text.contains("lat_sum 0.025"), "{text}");
        assert!(text.contains("# TYPE req counter"), "{text}");
        assert!(text.contains("req_total 1"), "{text}");
    }
}
