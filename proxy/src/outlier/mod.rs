//! Outlier ejection per endpoint, with Envoy's semantics for consecutive failures: after
//! `consecutive_failures` 5xx responses or gateway failures in a row an endpoint is ejected for
//! `base_ejection_time × times ejected` (capped at `max_ejection_time`) plus a random jitter; when
//! the time is up it is half-open: one probe request is let through and decides — a success
//! closes it, a failure ejects it again at once with the next multiplier. The multiplier decays
//! by one for every `base_ejection_time` the endpoint stays healthy. At most
//! `max_ejection_percent` of a service's endpoints (at least one) are ejected at a time, and
//! never the last available one. A 429/503 with `Retry-After` is no outcome here: the endpoint
//! is alive and full, and the forwarder backs it off for the time it asked instead
//! ([`crate::balance::Endpoint::back_off`]).
//!
//! The success-rate mode (`success_rate`, off unless configured) is Envoy's too: every
//! `interval_ms`, the endpoints that served at least `request_volume` requests in the interval
//! are compared — if there are at least `minimum_hosts` of them, those whose success rate is
//! below `mean − stdev_factor × stdev` of the group are ejected (same ejection times, probe and
//! limits as above). The interval is evaluated by the first outcome recorded after it ends, so
//! no timer task runs per service.
//!
//! This module holds the policy (pure functions, tested without a runtime) and the per-endpoint
//! state (atomics); [`crate::balance::EndpointSet::observe_outcome`] applies them. The immediate
//! 10 s ejection after a timeout or refused connection
//! ([`crate::balance::EndpointSet::gateway_failure`]) stays: a stalled endpoint must leave at
//! once, not after five more stalls.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Envoy's `consecutive_5xx` default.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Envoy's `base_ejection_time` default.
pub const DEFAULT_BASE_EJECTION_TIME_MS: u64 = 30_000;
/// Envoy's `max_ejection_time` default.
pub const DEFAULT_MAX_EJECTION_TIME_MS: u64 = 300_000;
/// Random extra ejection time, up to this much, so ejected endpoints do not return together.
pub const DEFAULT_EJECTION_JITTER_MS: u64 = 1_000;
/// Envoy's `max_ejection_percent` default.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's `interval` default: how often success rates are compared.
pub const DEFAULT_SUCCESS_RATE_INTERVAL_MS: u64 = 10_000;
/// Envoy's `success_rate_minimum_hosts` default.
pub const DEFAULT_SUCCESS_RATE_MINIMUM_HOSTS: u32 = 5;
/// Envoy's `success_rate_request_volume` default.
pub const DEFAULT_SUCCESS_RATE_REQUEST_VOLUME: u64 = 100;
/// Envoy's `success_rate_stdev_factor` default (1900 / 1000).
pub const DEFAULT_SUCCESS_RATE_STDEV_FACTOR: f64 = 1.9;

/// `outlier_detection.success_rate:`: eject endpoints whose success rate is far below their peers'.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateConfig {
    #[serde(default = "default_success_rate_interval_ms")]
    pub interval_ms: u64,
    /// Endpoints with enough requests needed for a comparison.
    #[serde(default = "default_success_rate_minimum_hosts")]
    pub minimum_hosts: u32,
    /// Requests an endpoint must have served in the interval to be compared.
    #[serde(default = "default_success_rate_request_volume")]
    pub request_volume: u64,
    #[serde(default = "default_success_rate_stdev_factor")]
    pub stdev_factor: f64,
}

impl Default for SuccessRateConfig {
    fn default() -> Self {
        SuccessRateConfig {
            interval_ms: DEFAULT_SUCCESS_RATE_INTERVAL_MS,
            minimum_hosts: DEFAULT_SUCCESS_RATE_MINIMUM_HOSTS,
            request_volume: DEFAULT_SUCCESS_RATE_REQUEST_VOLUME,
            stdev_factor: DEFAULT_SUCCESS_RATE_STDEV_FACTOR,
        }
    }
}

fn default_success_rate_interval_ms() -> u64 {
    DEFAULT_SUCCESS_RATE_INTERVAL_MS
}
fn default_success_rate_minimum_hosts() -> u32 {
    DEFAULT_SUCCESS_RATE_MINIMUM_HOSTS
}
fn default_success_rate_request_volume() -> u64 {
    DEFAULT_SUCCESS_RATE_REQUEST_VOLUME
}
fn default_success_rate_stdev_factor() -> f64 {
    DEFAULT_SUCCESS_RATE_STDEV_FACTOR
}

/// The endpoints (indices into `window`, one `(requests, failures)` per endpoint) whose success
/// rate over the interval is an outlier: below `mean − stdev_factor × stdev` of the endpoints
/// with at least `request_volume` requests, when there are at least `minimum_hosts` of those.
pub fn success_rate_outliers(window: &[(u64, u64)], config: &SuccessRateConfig) -> Vec<usize> {
    let rated: Vec<(usize, f64)> = window
        .iter()
        .enumerate()
        .filter(|(_, (requests, _))| *requests >= config.request_volume.max(1))
        .map(|(i, (requests, failures))| (i, 1.0 - *failures.min(requests) as f64 / *requests as f64))
        .collect();
    if rated.is_empty() || rated.len() < config.minimum_hosts as usize {
        return Vec::new();
    }
    let n = rated.len() as f64;
    let mean = rated.iter().map(|(_, r)| r).sum::<f64>() / n;
    let variance = rated.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - config.stdev_factor * variance.sqrt();
    rated
        .into_iter()
        .filter(|(_, rate)| *rate < threshold)
        .map(|(i, _)| i)
        .collect()
}

/// `outlier_detection:` of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// 0 turns consecutive-failure ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_base_ejection_time_ms")]
    pub base_ejection_time_ms: u64,
    #[serde(default = "default_max_ejection_time_ms")]
    pub max_ejection_time_ms: u64,
    #[serde(default = "default_ejection_jitter_ms")]
    pub ejection_jitter_ms: u64,
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// The success-rate mode; off unless given.
    #[serde(default)]
    pub success_rate: Option<SuccessRateConfig>,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time_ms: DEFAULT_BASE_EJECTION_TIME_MS,
            max_ejection_time_ms: DEFAULT_MAX_EJECTION_TIME_MS,
            ejection_jitter_ms: DEFAULT_EJECTION_JITTER_MS,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            success_rate: None,
        }
    }
}

fn default_consecutive_failures() -> u32 {
    DEFAULT_CONSECUTIVE_FAILURES
}
fn default_base_ejection_time_ms() -> u64 {
    DEFAULT_BASE_EJECTION_TIME_MS
}
fn default_max_ejection_time_ms() -> u64 {
    DEFAULT_MAX_EJECTION_TIME_MS
}
fn default_ejection_jitter_ms() -> u64 {
    DEFAULT_EJECTION_JITTER_MS
}
fn default_max_ejection_percent() -> u32 {
    DEFAULT_MAX_EJECTION_PERCENT
}

impl OutlierConfig {
    /// Range checks; `Err((field, reason))` relative to `outlier_detection`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.base_ejection_time_ms == 0 {
            return Err(("base_ejection_time_ms", "must be greater than 0".into()));
        }
        if self.max_ejection_time_ms < self.base_ejection_time_ms {
            return Err((
                "max_ejection_time_ms",
                format!(
                    "must be >= base_ejection_time_ms ({}), got {}",
                    self.base_ejection_time_ms, self.max_ejection_time_ms
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err((
                "max_ejection_percent",
                format!("must be at most 100, got {}", self.max_ejection_percent),
            ));
        }
        if let Some(sr) = &self.success_rate {
            if sr.interval_ms == 0 {
                return Err(("success_rate.interval_ms", "must be greater than 0".into()));
            }
            if !(sr.stdev_factor.is_finite() && sr.stdev_factor >= 0.0) {
                return Err((
                    "success_rate.stdev_factor",
                    format!("must be a number >= 0, got {}", sr.stdev_factor),
                ));
            }
        }
        Ok(())
    }

    /// How long the `times`-th ejection lasts (`times` ≥ 1), with `draw` in [0, 1) picking the
    /// jitter.
    pub fn ejection_time(&self, times: u32, draw: f64) -> Duration {
        let base = self.base_ejection_time_ms.saturating_mul(u64::from(times.max(1)));
        let jitter = (self.ejection_jitter_ms as f64 * draw.clamp(0.0, 1.0)) as u64;
        Duration::from_millis(base.min(self.max_ejection_time_ms) + jitter)
    }

    /// How many of `endpoints` may be ejected at once: the percentage, but at least one.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * self.max_ejection_percent as usize / 100).max(1)
    }

    /// The multiplier after an endpoint that was ejected `times` times stayed healthy for
    /// `healthy`: one less per whole base ejection time.
    pub fn decayed_times(&self, times: u32, healthy: Duration) -> u32 {
        let steps = healthy.as_millis() / u128::from(self.base_ejection_time_ms.max(1));
        times.saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
    }
}

/// Where an endpoint is in the ejection cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Taking traffic.
    Closed = 0,
    /// Ejected (until its time is up), then waiting for its probe.
    Open = 1,
    /// The probe is in flight; no other request until it answers.
    Probing = 2,
}

/// The outlier state of one endpoint.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive: AtomicU32,
    times_ejected: AtomicU32,
    phase: AtomicU8,
    /// Requests and failures in the current success-rate interval (counted only in that mode).
    window_requests: AtomicU64,
    window_failures: AtomicU64,
}

/// What an outcome asks of the endpoint set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Eject for the `times`-th time (subject to the set's limits).
    Eject {
        times: u32,
    },
}

impl OutlierState {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Open,
            2 => Phase::Probing,
            _ => Phase::Closed,
        }
    }

    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    /// The endpoint was ejected (for the `times`-th time).
    pub fn ejected(&self, times: u32) {
        self.times_ejected.store(times, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.phase.store(Phase::Open as u8, Ordering::Relaxed);
    }

    /// Counts a response in the success-rate interval.
    pub fn count(&self, failed: bool) {
        self.window_requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.window_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The interval's `(requests, failures)`, starting the next one.
    pub fn take_window(&self) -> (u64, u64) {
        (
            self.window_requests.swap(0, Ordering::Relaxed),
            self.window_failures.swap(0, Ordering::Relaxed),
        )
    }

    /// A request goes to the endpoint: after an ejection, it is the probe.
    pub fn on_pick(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Open as u8,
            Phase::Probing as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Records a response (`failed`: 5xx or a gateway failure). `healthy` is how long the
    /// endpoint has been back since its last ejection ended, for the multiplier's decay.
    pub fn on_outcome(&self, failed: bool, config: &OutlierConfig, healthy: Duration) -> Verdict {
        let probing = self.phase() == Phase::Probing;
        if !failed {
            self.consecutive.store(0, Ordering::Relaxed);
            if probing {
                self.phase.store(Phase::Closed as u8, Ordering::Relaxed);
            }
            return Verdict::Keep;
        }
        let times = config.decayed_times(self.times_ejected(), healthy);
        if probing {
            return Verdict::Eject { times: times + 1 };
        }
        if config.consecutive_failures == 0 {
            return Verdict::Keep;
        }
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= config.consecutive_failures {
            Verdict::Eject { times: times + 1 }
        } else {
            Verdict::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn ejection_time_grows_with_times_ejected_and_is_capped() {
        let c = OutlierConfig::default();
        let times: Vec<Duration> = [1, 2, 3, 10, 11, 100]
            .iter()
            .map(|t| c.ejection_time(*t, 0.0))
            .collect();
        assert_eq!(
            times,
            [secs(30), secs(60), secs(90), secs(300), secs(300), secs(300)]
        );
        assert_eq!(c.ejection_time(1, 0.5), Duration::from_millis(30_500));
        assert_eq!(c.ejection_time(10, 0.999), Duration::from_millis(300_999));
    }

    #[test]
    fn max_ejection_percent_keeps_a_floor_but_ejects_at_least_one() {
        let c = OutlierConfig::default();
        assert_eq!([3, 10, 25, 100].map(|n| c.max_ejected(n)), [1, 1, 2, 10]);
        let half = OutlierConfig {
            max_ejection_percent: 50,
            ..c
        };
        assert_eq!(half.max_ejected(3), 1);
        assert_eq!(half.max_ejected(4), 2);
    }

    #[test]
    fn five_consecutive_failures_eject_and_a_success_resets_the_count() {
        let c = OutlierConfig::default();
        let s = OutlierState::default();
        for _ in 0..4 {
            assert_eq!(s.on_outcome(true, &c, Duration::ZERO), Verdict::Keep);
        }
        assert_eq!(s.on_outcome(false, &c, Duration::ZERO), Verdict::Keep);
        for _ in 0..4 {
            assert_eq!(s.on_outcome(true, &c, Duration::ZERO), Verdict::Keep);
        }
        assert_eq!(
            s.on_outcome(true, &c, Duration::ZERO),
            Verdict::Eject { times: 1 }
        );
    }

    #[test]
    fn half_open_probe_decides() {
        let c = OutlierConfig::default();
        let s = OutlierState::default();
        s.ejected(1);
        assert_eq!(s.phase(), Phase::Open);
        s.on_pick();
        assert_eq!(s.phase(), Phase::Probing);
        // A failed probe ejects again at once, for twice as long.
        assert_eq!(
            s.on_outcome(true, &c, Duration::ZERO),
            Verdict::Eject { times: 2 }
        );
        s.ejected(2);
        assert_eq!(c.ejection_time(2, 0.0), secs(60));
        s.on_pick();
        // A successful probe closes it.
        assert_eq!(s.on_outcome(false, &c, Duration::ZERO), Verdict::Keep);
        assert_eq!(s.phase(), Phase::Closed);
        assert_eq!(s.times_ejected(), 2);
    }

    #[test]
    fn the_multiplier_decays_while_healthy() {
        let c = OutlierConfig::default();
        assert_eq!(c.decayed_times(3, secs(29)), 3);
        assert_eq!(c.decayed_times(3, secs(30)), 2);
        assert_eq!(c.decayed_times(3, secs(95)), 0);
        let s = OutlierState::default();
        s.ejected(3);
        s.on_pick();
        assert_eq!(s.on_outcome(false, &c, Duration::ZERO), Verdict::Keep);
        for _ in 0..4 {
            s.on_outcome(true, &c, secs(65));
        }
        // Healthy for 65 s after the third ejection: 3 − 2 = 1, so this is ejection number 2.
        assert_eq!(s.on_outcome(true, &c, secs(65)), Verdict::Eject { times: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_set_ejects_probes_and_readmits() {
        use crate::balance::{EndpointSet, InFlight};
        use crate::config::BalancerKind;
        let addrs: Vec<std::net::SocketAddr> = (1..=3).map(|p| ([127, 0, 0, 1], p).into()).collect();
        let config = OutlierConfig {
            ejection_jitter_ms: 0,
            ..OutlierConfig::default()
        };
        let set = EndpointSet::uniform(&addrs, BalancerKind::RoundRobin).with_outlier(config);
        let [a, b, _] = set.endpoints() else {
            unreachable!()
        };
        for _ in 0..5 {
            set.observe_outcome(a, true);
        }
        assert!(a.is_ejected());
        assert_eq!(set.available(), 2);
        // 10 % of 3 endpoints is still one: b is not ejected while a is out.
        for _ in 0..10 {
            set.observe_outcome(b, true);
        }
        assert!(!b.is_ejected());
        for _ in 0..100 {
            assert_ne!(set.pick(None).unwrap().addr, a.addr);
        }
        tokio::time::advance(secs(30) - Duration::from_millis(1)).await;
        assert!(a.is_ejected());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!a.is_ejected());
        // Half-open: the probe is in flight, nothing else goes there.
        let probe = InFlight::start(std::sync::Arc::clone(a));
        assert!(a.is_ejected());
        set.observe_outcome(a, true);
        drop(probe);
        // The failed probe ejected it again, for 60 s.
        tokio::time::advance(secs(60) - Duration::from_millis(1)).await;
        assert!(a.is_ejected());
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = InFlight::start(std::sync::Arc::clone(a));
        set.observe_outcome(a, false);
        drop(probe);
        assert!(!a.is_ejected());
        assert_eq!(a.outlier.phase(), Phase::Closed);
    }

    #[test]
    fn success_rate_outliers_are_below_mean_minus_factor_stdevs() {
        let c = SuccessRateConfig::default();
        // Rates 1, 1, 1, 1, 0.5: mean 0.9, stdev 0.2, threshold 0.9 − 1.9 × 0.2 = 0.52.
        let window = [(100, 0), (100, 0), (200, 0), (100, 0), (100, 50)];
        assert_eq!(success_rate_outliers(&window, &c), vec![4]);
        // Rates 1, .98, .99, 1, .97, .9: mean 0.9733, stdev 0.0345, threshold 0.9078.
        let window = [(100, 0), (100, 2), (100, 1), (100, 0), (100, 3), (100, 10)];
        assert_eq!(success_rate_outliers(&window, &c), vec![5]);
        // Rates .9, .8, .85, .95, .9: threshold 0.7831, all within the spread.
        let window = [(100, 10), (100, 20), (100, 15), (100, 5), (100, 10)];
        assert_eq!(success_rate_outliers(&window, &c), Vec::<usize>::new());
        // Too few requests: the bad endpoint is not rated, nor ejected.
        let window = [(100, 0), (100, 0), (100, 0), (100, 0), (99, 99)];
        assert_eq!(success_rate_outliers(&window, &c), Vec::<usize>::new());
        // Fewer than minimum_hosts rated: no comparison.
        let window = [(100, 0), (100, 0), (100, 0), (100, 60)];
        assert_eq!(success_rate_outliers(&window, &c), Vec::<usize>::new());
        let three = SuccessRateConfig {
            minimum_hosts: 3,
            stdev_factor: 1.0,
            ..c
        };
        assert_eq!(success_rate_outliers(&window, &three), vec![3]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_set_compares_success_rates_once_per_interval() {
        use crate::balance::EndpointSet;
        use crate::config::BalancerKind;
        let addrs: Vec<std::net::SocketAddr> = (1..=5).map(|p| ([127, 0, 0, 1], p).into()).collect();
        let config = OutlierConfig {
            consecutive_failures: 0,
            ejection_jitter_ms: 0,
            success_rate: Some(SuccessRateConfig {
                request_volume: 10,
                ..SuccessRateConfig::default()
            }),
            ..OutlierConfig::default()
        };
        let set = EndpointSet::uniform(&addrs, BalancerKind::RoundRobin).with_outlier(config);
        let endpoints = set.endpoints();
        // The first outcome starts the interval.
        set.observe_outcome(&endpoints[0], false);
        for round in 0..20 {
            for (i, e) in endpoints.iter().enumerate() {
                set.observe_outcome(e, i == 4 && round % 2 == 0);
            }
        }
        assert!(!endpoints[4].is_ejected(), "not before the interval ends");
        tokio::time::advance(secs(10)).await;
        set.observe_outcome(&endpoints[0], false);
        assert!(endpoints[4].is_ejected(), "50 % success among peers at 100 %");
        assert_eq!(set.available(), 4);
        // Ejected for the base time, then back.
        tokio::time::advance(secs(30)).await;
        assert!(!endpoints[4].is_ejected());
    }

    #[test]
    fn config_is_range_checked() {
        let c = OutlierConfig {
            max_ejection_time_ms: 1_000,
            ..OutlierConfig::default()
        };
        assert_eq!(
            c.check(),
            Err((
                "max_ejection_time_ms",
                "must be >= base_ejection_time_ms (30000), got 1000".to_string()
            ))
        );
        assert_eq!(OutlierConfig::default().check(), Ok(()));
    }
}
