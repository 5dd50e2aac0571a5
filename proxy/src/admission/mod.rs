//! Attention (priority) admission: one concurrency limit per proxy instance, shared by every
//! listener and worker, that under overload admits in priority order and sheds the lowest first.
//!
//! A request's priority comes from `x-cogmesh-priority` (`critical`, `high`, `normal`, `low`,
//! `sheddable`), else from its route, else `normal`. Below the limit a request is admitted with
//! two atomic operations. At the limit:
//! - `low` and `sheddable` requests are shed at once (503 `shed` with `Retry-After`);
//! - `critical`, `high` and `normal` ones wait in a short queue, at most `max_queue_wait_ms`;
//!   every slot that frees goes to the highest priority waiting (oldest first within one);
//! - the queue holds at most `max_queued` requests: a newcomer of higher priority pushes out
//!   the newest of the lowest priority queued, which is shed at once.
//!
//! The queue's lock is taken only at the limit, never on the way in below it; a finished
//! request takes it only while someone waits. The limit is `admission.max_concurrency`, or,
//! with `admission.adaptive`, starts there and follows latency (see [`adaptive`]). The
//! controller lives in the routing table and a reload keeps it, updating the limits in place
//! (an adaptive limit keeps what it learned while its settings stay the same).

pub mod adaptive;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

use adaptive::{Adaptive, AdaptiveConfig};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// The request header that carries a priority.
pub const PRIORITY_HEADER: &str = "x-cogmesh-priority";
/// `Retry-After` of a shed request, in seconds.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// How long a request may wait for a slot at the limit.
pub const DEFAULT_MAX_QUEUE_WAIT_MS: u64 = 100;

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
    /// Whether requests of this priority may wait for a slot (else they are shed at the limit).
    pub fn may_wait(self) -> bool {
        self <= Priority::Normal
    }

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
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Requests in flight through this instance, all listeners together.
    pub max_concurrency: u64,
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u64,
    /// Requests waiting for a slot, all priorities together; default `max_concurrency`.
    #[serde(default)]
    pub max_queued: Option<u64>,
    #[serde(default = "default_max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
    /// A limit that follows latency, starting at `max_concurrency`; absent: static.
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
}

fn default_retry_after_secs() -> u64 {
    DEFAULT_RETRY_AFTER_SECS
}
fn default_max_queue_wait_ms() -> u64 {
    DEFAULT_MAX_QUEUE_WAIT_MS
}

impl AdmissionConfig {
    /// A limit of `max_concurrency` with the default queue and `Retry-After`.
    pub fn with_limit(max_concurrency: u64) -> Self {
        AdmissionConfig {
            max_concurrency,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            max_queued: None,
            max_queue_wait_ms: DEFAULT_MAX_QUEUE_WAIT_MS,
            adaptive: None,
        }
    }

    /// Range checks; `Err((field, reason))` relative to `admission`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_concurrency == 0 {
            return Err(("max_concurrency", "must be greater than 0".into()));
        }
        self.adaptive.as_ref().map_or(Ok(()), AdaptiveConfig::check)
    }
}

/// Admitted and shed counters, indexed like [`Priority::ALL`].
#[derive(Clone, Debug, Default)]
pub struct AdmissionCounters {
    pub admitted: [Counter; 5],
    pub shed: [Counter; 5],
    /// The limit in force.
    pub limit: Gauge,
}

/// The instance's concurrency limit.
#[derive(Debug)]
pub struct Admission {
    limit: AtomicU64,
    retry_after_secs: AtomicU64,
    max_queued: AtomicU64,
    max_wait_ms: AtomicU64,
    in_flight: AtomicU64,
    /// Requests in the queue; read without the lock to skip it when nobody waits.
    waiting: AtomicU64,
    queue: Mutex<Queue>,
    counters: AdmissionCounters,
    /// With `adaptive`: what moves the limit.
    adaptive: ArcSwapOption<Adaptive>,
}

/// Waiters per priority, oldest first; each gets `true` (admitted, the slot is theirs) or
/// `false` (pushed out: shed).
#[derive(Debug, Default)]
struct Queue {
    by_priority: [VecDeque<(u64, oneshot::Sender<bool>)>; 5],
    next_id: u64,
}

impl Admission {
    pub fn new(config: &AdmissionConfig, counters: AdmissionCounters) -> Self {
        let a = Admission {
            limit: AtomicU64::new(0),
            retry_after_secs: AtomicU64::new(0),
            max_queued: AtomicU64::new(0),
            max_wait_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            counters,
            adaptive: ArcSwapOption::empty(),
        };
        a.set_limits(config);
        a
    }

    fn set_limits(&self, config: &AdmissionConfig) {
        let current = self.adaptive.load_full();
        match (&config.adaptive, current) {
            // Same adaptive settings: keep the learned limit.
            (Some(new), Some(old)) if *new == old.config => {}
            (Some(new), _) => {
                let adaptive = Adaptive::new(new.clone(), config.max_concurrency);
                self.set_limit(adaptive.limit());
                self.adaptive.store(Some(Arc::new(adaptive)));
            }
            (None, _) => {
                self.adaptive.store(None);
                self.set_limit(config.max_concurrency);
            }
        }
        self.retry_after_secs
            .store(config.retry_after_secs.max(1), Ordering::Relaxed);
        let queued = config.max_queued.unwrap_or(config.max_concurrency);
        self.max_queued.store(queued, Ordering::Relaxed);
        self.max_wait_ms
            .store(config.max_queue_wait_ms, Ordering::Relaxed);
    }

    /// `previous` with the limits of `config` (its in-flight count carries over), or a new one.
    pub fn reuse_or_new(
        previous: Option<&Arc<Admission>>,
        config: &AdmissionConfig,
        counters: impl FnOnce() -> AdmissionCounters,
    ) -> Arc<Admission> {
        match previous {
            Some(p) => {
                p.set_limits(config);
                p.dispatch();
                Arc::clone(p)
            }
            None => Arc::new(Admission::new(config, counters())),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The limit in force.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
        self.counters.limit.set(limit as i64);
    }

    /// Takes a slot if one is free.
    fn try_take(&self) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request of priority `p`, at once or after a wait in the queue, or sheds it:
    /// `Err(retry_after_secs)`.
    pub async fn admit(self: &Arc<Self>, p: Priority) -> Result<AdmissionPermit, u64> {
        // Below the limit and nobody waiting: in at once (no jumping the queue).
        if self.waiting.load(Ordering::SeqCst) == 0 && self.try_take() {
            return Ok(self.admitted(p));
        }
        if !p.may_wait() {
            return Err(self.shed(p));
        }
        let (id, rx) = {
            let mut q = self.lock();
            // Counted as waiting before the last look at the slots: a request finishing now
            // either sees us waiting or left a slot we see (no lost wake-up).
            self.waiting.fetch_add(1, Ordering::SeqCst);
            if self.try_take() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Ok(self.admitted(p));
            }
            if self.waiting.load(Ordering::SeqCst) > self.max_queued.load(Ordering::Relaxed)
                && !self.push_out_lower(&mut q, p)
            {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                drop(q);
                return Err(self.shed(p));
            }
            let (tx, rx) = oneshot::channel();
            let id = q.next_id;
            q.next_id += 1;
            q.by_priority[p as usize].push_back((id, tx));
            (id, rx)
        };
        let wait = Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed));
        let mut waiter = Waiter {
            admission: self,
            priority: p,
            id,
            rx: Some(rx),
        };
        let outcome = match waiter.rx.as_mut() {
            Some(rx) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(admitted)) => {
                    waiter.rx = None;
                    admitted
                }
                Ok(Err(_)) => {
                    waiter.rx = None;
                    false
                }
                // Timed out: the waiter leaves the queue (or takes a slot handed over meanwhile).
                Err(_) => waiter.leave(),
            },
            None => false,
        };
        if outcome {
            Ok(self.admitted(p))
        } else {
            Err(self.shed(p))
        }
    }

    /// Makes room in a full queue for priority `p` by pushing out the newest waiter of the
    /// lowest priority below `p`; `false` if there is none.
    fn push_out_lower(&self, q: &mut Queue, p: Priority) -> bool {
        for lower in Priority::ALL.iter().rev().take_while(|l| **l > p) {
            if let Some((_, tx)) = q.by_priority[*lower as usize].pop_back() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(false);
                return true;
            }
        }
        false
    }

    /// Hands free slots to the highest-priority waiters.
    fn dispatch(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut q = self.lock();
        'slots: while self.waiting.load(Ordering::SeqCst) > 0 && self.try_take() {
            for queue in q.by_priority.iter_mut() {
                while let Some((_, tx)) = queue.pop_front() {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    if tx.send(true).is_ok() {
                        continue 'slots;
                    }
                    // That waiter is gone (its client left): the next one gets the slot.
                }
            }
            // Nobody left to take the slot.
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            break;
        }
    }

    fn admitted(self: &Arc<Self>, p: Priority) -> AdmissionPermit {
        self.counters.admitted[p as usize].inc();
        // The clock is read only when the limit follows latency.
        let started = self.adaptive.load().is_some().then(Instant::now);
        AdmissionPermit {
            admission: Arc::clone(self),
            started,
        }
    }

    fn shed(&self, p: Priority) -> u64 {
        self.counters.shed[p as usize].inc();
        self.retry_after_secs.load(Ordering::Relaxed)
    }
}

/// A request in the queue. Dropped before its answer (its client left, or it timed out), it
/// leaves the queue — or gives back a slot that was handed to it meanwhile.
struct Waiter<'a> {
    admission: &'a Admission,
    priority: Priority,
    id: u64,
    rx: Option<oneshot::Receiver<bool>>,
}

impl Waiter<'_> {
    /// Leaves the queue; `true` if a slot was handed over first (it is ours then).
    fn leave(&mut self) -> bool {
        let Some(mut rx) = self.rx.take() else {
            return false;
        };
        let mut q = self.admission.lock();
        let queue = &mut q.by_priority[self.priority as usize];
        if let Some(i) = queue.iter().position(|(w, _)| *w == self.id) {
            queue.remove(i);
            self.admission.waiting.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        rx.try_recv().unwrap_or(false)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.leave() {
            self.admission.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.admission.dispatch();
        }
    }
}

/// A request counted against the instance's limit until dropped.
#[derive(Debug)]
pub struct AdmissionPermit {
    admission: Arc<Admission>,
    /// When it was admitted, if the limit follows latency.
    started: Option<Instant>,
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        let a = &self.admission;
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let (Some(started), Some(adaptive)) = (self.started, &*a.adaptive.load()) {
            let now = Instant::now();
            if let Some(limit) = adaptive.record(now.saturating_duration_since(started), now) {
                a.set_limit(limit);
            }
        }
        a.dispatch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limit: u64, queued: u64) -> Arc<Admission> {
        let config = AdmissionConfig {
            max_concurrency: limit,
            retry_after_secs: 2,
            max_queued: Some(queued),
            max_queue_wait_ms: 100,
            adaptive: None,
        };
        Arc::new(Admission::new(&config, AdmissionCounters::default()))
    }

    fn counts(a: &Admission) -> ([u64; 5], [u64; 5]) {
        (
            a.counters.admitted.each_ref().map(|c| c.get()),
            a.counters.shed.each_ref().map(|c| c.get()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn freed_slots_go_to_the_highest_priority_waiting() {
        let a = admission(1, 10);
        let held = a.admit(Priority::Normal).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for p in [Priority::Normal, Priority::High, Priority::Critical] {
            let (a, order) = (Arc::clone(&a), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let permit = a.admit(p).await;
                order.lock().unwrap().push((p, permit.is_ok()));
                // Hold the slot for 10 ms so the next waiter gets it after.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        // Sheddable and low are shed at once at the limit.
        assert_eq!(a.admit(Priority::Sheddable).await.unwrap_err(), 2);
        assert_eq!(a.admit(Priority::Low).await.unwrap_err(), 2);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            [
                (Priority::Critical, true),
                (Priority::High, true),
                (Priority::Normal, true)
            ]
        );
        assert_eq!(counts(&a), ([1, 1, 2, 0, 0], [0, 0, 0, 1, 1]));
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_leaves_no_slot_behind() {
        let a = admission(1, 10);
        let held = a.admit(Priority::Normal).await.unwrap();
        let b = Arc::clone(&a);
        let gone = tokio::spawn(async move { b.admit(Priority::Normal).await.map(|_| ()) });
        tokio::task::yield_now().await;
        // The slot is handed over, then the waiter is cancelled before it looks.
        drop(held);
        gone.abort();
        let _ = gone.await;
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
        assert!(a.admit(Priority::Low).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_shed_after_the_longest_wait() {
        let a = admission(1, 10);
        let _held = a.admit(Priority::Critical).await.unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(a.admit(Priority::Normal).await.unwrap_err(), 2);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(a.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_pushes_out_the_lowest_for_a_higher_newcomer() {
        let a = admission(1, 1);
        let held = a.admit(Priority::Normal).await.unwrap();
        let b = Arc::clone(&a);
        let normal = tokio::spawn(async move { b.admit(Priority::Normal).await.map(|_| ()) });
        tokio::task::yield_now().await;
        // The queue (1) is full: another normal request is shed at once ...
        let start = tokio::time::Instant::now();
        assert!(a.admit(Priority::Normal).await.is_err());
        assert_eq!(start.elapsed(), Duration::ZERO);
        // ... but a critical one pushes the queued normal out and takes its place.
        let b = Arc::clone(&a);
        let critical = tokio::spawn(async move { b.admit(Priority::Critical).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(normal.await.unwrap(), Err(2));
        drop(held);
        assert_eq!(critical.await.unwrap(), Ok(()));
        assert_eq!(counts(&a), ([1, 0, 1, 0, 0], [0, 0, 2, 0, 0]));
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

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_count_and_changes_the_limit() {
        let a = admission(2, 2);
        let _one = a.admit(Priority::Critical).await.unwrap();
        let config = AdmissionConfig {
            max_concurrency: 1,
            retry_after_secs: 1,
            max_queued: Some(0),
            max_queue_wait_ms: 100,
            adaptive: None,
        };
        let same = Admission::reuse_or_new(Some(&a), &config, AdmissionCounters::default);
        assert_eq!(same.in_flight(), 1);
        assert_eq!(same.admit(Priority::Critical).await.unwrap_err(), 1);
    }
}
