//! A latency histogram that records without a lock: one atomic counter per bucket and the sum
//! in nanoseconds. prometheus-client's own histogram takes a mutex per observation, which every
//! worker thread would contend for on each request of the same service.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds in seconds, ascending; `counts` has one more slot, for +Inf.
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        LatencyHistogram {
            inner: Arc::new(Inner {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_ns: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        // The first bucket whose bound is ≥ the value (`le` is inclusive).
        let slot = self.inner.bounds.partition_point(|b| *b < secs);
        self.inner.counts[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations per bucket (not cumulative), the last one for +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let inner = &self.inner;
        inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
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
        assert_eq!(h.inner.sum_ns.load(Ordering::Relaxed), 3_051_500_000);
    }

    #[test]
    fn text_output_is_cumulative_with_sum_and_count() {
        static BOUNDS: [f64; 2] = [0.01, 0.1];
        let h = LatencyHistogram::new(&BOUNDS);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(20));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("lat", "latency", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE lat histogram"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.01\"} 1"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.1\"} 2"), "{text}");
        assert!(text.contains("lat_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("lat_count 2"), "{text}");
        assert!(text.contains("lat_sum 0.025"), "{text}");
    }
}
