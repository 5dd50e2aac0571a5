//! The adaptive concurrency limit (`admission.adaptive`): the limit follows the latency of
//! the requests it admits, in the manner of gradient limiters (Netflix's Gradient2, Envoy's
//! adaptive concurrency filter) — while latency stays near its long-term baseline the limit
//! grows by about √limit per window, and when it rises above `tolerance` × the baseline the
//! limit shrinks in proportion, down to half per window.
//!
//! Every `window_ms` the mean latency of the requests that finished in the window (at least
//! [`MIN_SAMPLES`]) is the short-term latency; the baseline follows it down at once and up
//! slowly ([`BASELINE_RISE`] of the gap per window), so a sustained rise is treated as overload
//! for a good while before it becomes the new normal. The window is closed by the first request
//! that finishes after it; no timer task runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Requests a window needs before its latency counts.
pub const MIN_SAMPLES: u64 = 10;
/// Share of the gap by which the baseline rises towards a higher short-term latency, per window.
pub const BASELINE_RISE: f64 = 0.02;
pub const DEFAULT_MIN_LIMIT: u64 = 4;
pub const DEFAULT_MAX_LIMIT: u64 = 1000;
pub const DEFAULT_WINDOW_MS: u64 = 250;
pub const DEFAULT_TOLERANCE: f64 = 1.5;
pub const DEFAULT_SMOOTHING: f64 = 0.2;

/// `admission.adaptive:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    #[serde(default = "default_min_limit")]
    pub min_limit: u64,
    #[serde(default = "default_max_limit")]
    pub max_limit: u64,
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// How far above its baseline latency may rise before the limit shrinks.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Weight of each window's proposal in the limit (0 < smoothing ≤ 1).
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
}

fn default_min_limit() -> u64 {
    DEFAULT_MIN_LIMIT
}
fn default_max_limit() -> u64 {
    DEFAULT_MAX_LIMIT
}
fn default_window_ms() -> u64 {
    DEFAULT_WINDOW_MS
}
fn default_tolerance() -> f64 {
    DEFAULT_TOLERANCE
}
fn default_smoothing() -> f64 {
    DEFAULT_SMOOTHING
}

impl AdaptiveConfig {
    /// Range checks; `Err((field, reason))` relative to `admission`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.min_limit == 0 {
            return Err(("adaptive.min_limit", "must be greater than 0".into()));
        }
        if self.max_limit < self.min_limit {
            return Err((
                "adaptive.max_limit",
                format!("must be >= min_limit ({})", self.min_limit),
            ));
        }
        if self.window_ms == 0 {
            return Err(("adaptive.window_ms", "must be greater than 0".into()));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 1.0) {
            return Err((
                "adaptive.tolerance",
                format!("must be >= 1, got {}", self.tolerance),
            ));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err((
                "adaptive.smoothing",
                format!("must be in (0, 1], got {}", self.smoothing),
            ));
        }
        Ok(())
    }
}

/// The next limit after a window whose mean latency was `short` against a baseline of `long`.
pub fn next_limit(limit: f64, short: f64, long: f64, config: &AdaptiveConfig) -> f64 {
    let gradient = if short > 0.0 {
        (config.tolerance * long / short).clamp(0.5, 1.0)
    } else {
        1.0
    };
    let proposed = limit * gradient + limit.sqrt();
    let smoothed = (1.0 - config.smoothing) * limit + config.smoothing * proposed;
    smoothed.clamp(config.min_limit as f64, config.max_limit as f64)
}

/// The baseline after a window of mean latency `short`: down at once, up by [`BASELINE_RISE`].
pub fn next_baseline(long: f64, short: f64) -> f64 {
    if long == 0.0 || short <= long {
        short
    } else {
        long + BASELINE_RISE * (short - long)
    }
}

/// The measurements behind the limit, shared by every worker thread.
#[derive(Debug)]
pub struct Adaptive {
    pub config: AdaptiveConfig,
    epoch: Instant,
    window_ends_ns: AtomicU64,
    sum_ns: AtomicU64,
    samples: AtomicU64,
    /// f64 bits: the unrounded limit and the baseline latency (ns).
    limit: AtomicU64,
    baseline_ns: AtomicU64,
}

impl Adaptive {
    pub fn new(config: AdaptiveConfig, initial: u64) -> Self {
        let initial = (initial as f64).clamp(config.min_limit as f64, config.max_limit as f64);
        Adaptive {
            config,
            epoch: Instant::now(),
            window_ends_ns: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            limit: AtomicU64::new(initial.to_bits()),
            baseline_ns: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn limit(&self) -> u64 {
        f64::from_bits(self.limit.load(Ordering::Relaxed)).round() as u64
    }

    /// Records a request that took `latency`; at the end of a window, the new limit.
    pub fn record(&self, latency: Duration, now: Instant) -> Option<u64> {
        self.sum_ns
            .fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let ends = self.window_ends_ns.load(Ordering::Relaxed);
        if now_ns < ends {
            return None;
        }
        let next_end = now_ns + self.config.window_ms * 1_000_000;
        if self
            .window_ends_ns
            .compare_exchange(ends, next_end, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        let samples = self.samples.swap(0, Ordering::Relaxed);
        let sum = self.sum_ns.swap(0, Ordering::Relaxed);
        if ends == 0 || samples < MIN_SAMPLES {
            // The first window only starts the clock; a thin one says too little.
            return None;
        }
        let short = sum as f64 / samples as f64;
        let long = f64::from_bits(self.baseline_ns.load(Ordering::Relaxed));
        let long = if long == 0.0 { short } else { long };
        let limit = next_limit(
            f64::from_bits(self.limit.load(Ordering::Relaxed)),
            short,
            long,
            &self.config,
        );
        self.baseline_ns
            .store(next_baseline(long, short).to_bits(), Ordering::Relaxed);
        self.limit.store(limit.to_bits(), Ordering::Relaxed);
        Some(limit.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            min_limit: 4,
            max_limit: 1000,
            window_ms: 250,
            tolerance: 1.5,
            smoothing: 0.2,
        }
    }

    #[test]
    fn the_limit_grows_by_root_limit_while_latency_is_near_its_baseline() {
        let c = config();
        // Gradient 1 (1.5 × 10 / 12 > 1): proposal 100 + 10 = 110; smoothed 0.8 × 100 + 0.2 × 110.
        assert_eq!(next_limit(100.0, 12.0, 10.0, &c), 102.0);
    }

    #[test]
    fn the_limit_shrinks_with_the_gradient_down_to_half_per_window() {
        let c = config();
        // Gradient 1.5 × 10 / 20 = 0.75: proposal 75 + 10 = 85; 0.8 × 100 + 0.2 × 85 = 97.
        assert_eq!(next_limit(100.0, 20.0, 10.0, &c), 97.0);
        // Latency 10× the baseline: gradient clamped at 0.5, proposal 60, limit 92.
        assert_eq!(next_limit(100.0, 100.0, 10.0, &c), 92.0);
        // Never below min_limit nor above max_limit.
        assert_eq!(next_limit(4.0, 100.0, 10.0, &c), 4.0);
        assert_eq!(next_limit(1000.0, 1.0, 10.0, &c), 1000.0);
    }

    #[test]
    fn the_baseline_follows_latency_down_at_once_and_up_slowly() {
        assert_eq!(next_baseline(10.0, 8.0), 8.0);
        assert_eq!(next_baseline(10.0, 60.0), 11.0);
        assert_eq!(next_baseline(0.0, 30.0), 30.0);
    }

    #[tokio::test(start_paused = true)]
    async fn windows_of_samples_move_the_limit() {
        let a = Adaptive::new(config(), 100);
        let ms = Duration::from_millis;
        // The first record starts the first window.
        assert_eq!(a.record(ms(10), Instant::now()), None);
        for _ in 0..19 {
            assert_eq!(a.record(ms(10), Instant::now()), None);
        }
        tokio::time::advance(ms(250)).await;
        // 20 samples of 10 ms: at the baseline; the limit grows to 102.
        assert_eq!(a.record(ms(10), Instant::now()), Some(102));
        for _ in 0..20 {
            a.record(ms(100), Instant::now());
        }
        tokio::time::advance(ms(250)).await;
        // Mean (20 × 100 + 10) / 21 ms against a baseline of 10 ms: gradient 0.5.
        let limit = a.record(ms(10), Instant::now()).expect("a window ended");
        assert_eq!(
            limit,
            next_limit(102.0, 2010.0 / 21.0 * 1e6, 10e6, &config()).round() as u64
        );
        assert!(limit < 102);
        assert_eq!(a.limit(), limit);
        // A thin window (fewer than MIN_SAMPLES) changes nothing.
        tokio::time::advance(ms(250)).await;
        assert_eq!(a.record(ms(500), Instant::now()), None);
        assert_eq!(a.limit(), limit);
    }
}
