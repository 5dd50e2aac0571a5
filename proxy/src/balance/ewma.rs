//! Peak-EWMA latency estimate, as Linkerd's balancer keeps per endpoint: a sample above the
//! estimate replaces it at once (react to slowness immediately); a lower sample is averaged in
//! with a weight that grows with the time since the last sample (`1 − e^(−Δt/τ)`), so the
//! estimate recovers over about `DECAY_SECS`. Reading the estimate also decays it toward zero
//! with the time since the last sample (as Linkerd's balancer does), so an endpoint that has not
//! been tried for a while looks fast again and gets probed, instead of being starved forever by
//! one bad sample or by the pessimistic initial value.
//!
//! The estimate and its timestamp are two atomics; two updates racing may lose one sample,
//! which a statistic tolerates, and in exchange no request ever waits on a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Time constant τ of the decay, in seconds.
pub const DECAY_SECS: f64 = 10.0;
/// Estimate of an endpoint nothing has been observed from, in milliseconds.
pub const DEFAULT_RTT_MS: f64 = 30.0;

/// The new estimate after observing `sample_ns` `elapsed_secs` after the previous update.
pub fn decayed_ewma(estimate_ns: f64, sample_ns: f64, elapsed_secs: f64) -> f64 {
    if sample_ns > estimate_ns {
        return sample_ns;
    }
    let decay = (-elapsed_secs.max(0.0) / DECAY_SECS).exp();
    estimate_ns * decay + sample_ns * (1.0 - decay)
}

#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: AtomicU64,
    /// Nanoseconds since `epoch` at the last update.
    updated_ns: AtomicU64,
    epoch: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakEwma {
    pub fn new() -> Self {
        PeakEwma {
            estimate_ns: AtomicU64::new((DEFAULT_RTT_MS * 1e6).to_bits()),
            updated_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The estimate now: the stored value decayed by the time since it was stored.
    pub fn estimate_ns(&self) -> f64 {
        self.estimate_ns_at(Instant::now())
    }

    /// [`PeakEwma::estimate_ns`] at `now`, so that a caller comparing several endpoints reads
    /// the clock once.
    pub fn estimate_ns_at(&self, now: Instant) -> f64 {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let since = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64 / 1e9;
        self.stored_ns() * (-since / DECAY_SECS).exp()
    }

    fn stored_ns(&self) -> f64 {
        f64::from_bits(self.estimate_ns.load(Ordering::Relaxed))
    }

    pub fn observe(&self, sample: Duration) {
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        let last_ns = self.updated_ns.swap(now_ns, Ordering::Relaxed);
        let elapsed_secs = now_ns.saturating_sub(last_ns) as f64 / 1e9;
        let next = decayed_ewma(self.stored_ns(), sample.as_nanos() as f64, elapsed_secs);
        self.estimate_ns.store(next.to_bits(), Ordering::Relaxed);
    }
}
