//! Attention (priority) admission: one concurrency limit per proxy instance, shared by every
//! listener and worker, that under overload keeps its capacity for the requests that matter.
//!
//! A request's priority comes from `x-cogmesh-priority` (`critical`, `high`, `normal`, `low`,
//! `sheddable`), else from its route, else `normal`. Each priority may use only a share of the
//! limit ([`SHARE_PERCENT`]): `sheddable` requests are admitted while fewer than half the slots
//! are taken, `critical` ones up to the full limit. Under overload the in-flight count climbs
//! past the lower shares first, so the lowest priorities are shed first and the top of the
//! limit stays free for the highest; a refused request gets 503 `shed` with `Retry-After` at
//! once (two atomic operations, no queue, no timer).
//!
//! The limit is static (`admission.max_concurrency`); an adaptive limit (gradient, from
//! latency) would only change how the limit is set, not this admission rule. The controller
//! lives in the routing table and a reload keeps it (and its in-flight count), updating the
//! limit in place.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// The request header that carries a priority.
pub const PRIORITY_HEADER: &str = "x-cogmesh-priority";
/// `Retry-After` of a shed request, in seconds.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// The share of the concurrency limit each priority may fill, indexed like [`Priority::ALL`].
pub const SHARE_PERCENT: [u64; 5] = [100, 90, 80, 65, 50];

/// How much a request matters when the instance is overloaded.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical = 0,
    High = 1,
    #[default]
    Normal = 2,
    Low = 3,
    Sheddable = 4,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Sheddable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Sheddable => "sheddable",
        }
    }

    /// Parses a header value (case-insensitive); `None` for anything else.
    pub fn parse(value: &[u8]) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().as_bytes().eq_ignore_ascii_case(value.trim_ascii()))
    }

    /// The request's priority: its header if valid, else the route's, else `normal`.
    pub fn of(headers: &http::HeaderMap, route: Option<Priority>) -> Priority {
        headers
            .get(PRIORITY_HEADER)
            .and_then(|v| Priority::parse(v.as_bytes()))
            .or(route)
            .unwrap_or_default()
    }
}

/// `admission:` in proxy.yaml (absent: no concurrency limit).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Requests in flight through this instance, all listeners together.
    pub max_concurrency: u64,
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u64,
}

fn default_retry_after_secs() -> u64 {
    DEFAULT_RETRY_AFTER_SECS
}

impl AdmissionConfig {
    /// Range checks; `Err((field, reason))` relative to `admission`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_concurrency == 0 {
            return Err(("max_concurrency", "must be greater than 0".into()));
        }
        Ok(())
    }
}

/// The slots priority `p` may fill under a limit of `limit`: at least one, so a small limit
/// still admits every priority when idle.
pub fn slots_for(limit: u64, p: Priority) -> u64 {
    (limit * SHARE_PERCENT[p as usize] / 100).max(1)
}

/// Admitted and shed counters, indexed like [`Priority::ALL`].
#[derive(Clone, Debug, Default)]
pub struct AdmissionCounters {
    pub admitted: [Counter; 5],
    pub shed: [Counter; 5],
}

/// The instance's concurrency limit.
#[derive(Debug)]
pub struct Admission {
    limit: AtomicU64,
    retry_after_secs: AtomicU64,
    in_flight: AtomicU64,
    counters: AdmissionCounters,
}

impl Admission {
    pub fn new(config: &AdmissionConfig, counters: AdmissionCounters) -> Self {
        Admission {
            limit: AtomicU64::new(config.max_concurrency),
            retry_after_secs: AtomicU64::new(config.retry_after_secs),
            in_flight: AtomicU64::new(0),
            counters,
        }
    }

    /// `previous` with the limit of `config` (its in-flight count carries over), or a new one.
    pub fn reuse_or_new(
        previous: Option<&Arc<Admission>>,
        config: &AdmissionConfig,
        counters: impl FnOnce() -> AdmissionCounters,
    ) -> Arc<Admission> {
        match previous {
            Some(p) => {
                p.limit.store(config.max_concurrency, Ordering::Relaxed);
                p.retry_after_secs
                    .store(config.retry_after_secs, Ordering::Relaxed);
                Arc::clone(p)
            }
            None => Arc::new(Admission::new(config, counters())),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Admits a request of priority `p`, or sheds it: `Err(retry_after_secs)`.
    pub fn try_admit(self: &Arc<Self>, p: Priority) -> Result<AdmissionPermit, u64> {
        let slots = slots_for(self.limit.load(Ordering::Relaxed), p);
        let taken = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < slots).then_some(n + 1)
            });
        if taken.is_err() {
            self.counters.shed[p as usize].inc();
            return Err(self.retry_after_secs.load(Ordering::Relaxed).max(1));
        }
        self.counters.admitted[p as usize].inc();
        Ok(AdmissionPermit {
            admission: Arc::clone(self),
        })
    }
}

/// A request counted against the instance's limit until dropped.
#[derive(Debug)]
pub struct AdmissionPermit {
    admission: Arc<Admission>,
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limit: u64) -> Arc<Admission> {
        let config = AdmissionConfig {
            max_concurrency: limit,
            retry_after_secs: 2,
        };
        Arc::new(Admission::new(&config, AdmissionCounters::default()))
    }

    #[test]
    fn shares_of_a_limit_of_twenty() {
        let slots: Vec<u64> = Priority::ALL.iter().map(|p| slots_for(20, *p)).collect();
        assert_eq!(slots, [20, 18, 16, 13, 10]);
        assert_eq!(slots_for(1, Priority::Sheddable), 1);
    }

    #[test]
    fn under_overload_the_lowest_are_shed_first_and_critical_keeps_the_top() {
        let a = admission(20);
        let mut held = Vec::new();
        // Sheddable traffic fills half the limit, then is shed.
        while let Ok(p) = a.try_admit(Priority::Sheddable) {
            held.push(p);
        }
        assert_eq!(a.in_flight(), 10);
        // Normal traffic gets up to 16, low nothing more.
        while let Ok(p) = a.try_admit(Priority::Normal) {
            held.push(p);
        }
        assert_eq!(a.in_flight(), 16);
        assert_eq!(a.try_admit(Priority::Low).unwrap_err(), 2);
        // The top four slots are still there for critical requests.
        for _ in 0..4 {
            held.push(a.try_admit(Priority::Critical).unwrap());
        }
        assert!(a.try_admit(Priority::Critical).is_err());
        let admitted: Vec<u64> = a.counters.admitted.iter().map(|c| c.get()).collect();
        let shed: Vec<u64> = a.counters.shed.iter().map(|c| c.get()).collect();
        assert_eq!(admitted, [4, 0, 6, 0, 10]);
        assert_eq!(shed, [1, 0, 1, 1, 1]);
        // Finished requests free their slots.
        held.clear();
        assert_eq!(a.in_flight(), 0);
        assert!(a.try_admit(Priority::Sheddable).is_ok());
    }

    #[test]
    fn priority_comes_from_the_header_then_the_route() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Priority::of(&h, None), Priority::Normal);
        assert_eq!(Priority::of(&h, Some(Priority::Low)), Priority::Low);
        h.insert(PRIORITY_HEADER, " Critical ".parse().unwrap());
        assert_eq!(Priority::of(&h, Some(Priority::Low)), Priority::Critical);
        h.insert(PRIORITY_HEADER, "urgent".parse().unwrap());
        assert_eq!(Priority::of(&h, Some(Priority::High)), Priority::High);
    }

    #[test]
    fn a_reload_keeps_the_count_and_changes_the_limit() {
        let a = admission(2);
        let _one = a.try_admit(Priority::Critical).unwrap();
        let config = AdmissionConfig {
            max_concurrency: 1,
            retry_after_secs: 1,
        };
        let same = Admission::reuse_or_new(Some(&a), &config, AdmissionCounters::default);
        assert_eq!(same.in_flight(), 1);
        assert_eq!(same.try_admit(Priority::Critical).unwrap_err(), 1);
    }
}
