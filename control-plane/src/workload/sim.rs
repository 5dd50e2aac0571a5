//! The cognitive-service simulation behind `GET /work` and gRPC `Infer`: a fixed number of
//! concurrent slots (`--capacity`), a bounded FIFO queue in front of them (`--queue`), a drawn
//! service time (`--service-time-ms`, `--service-time-dist`, `--seed`), the ORCA load report the
//! workload attaches to its responses (`--orca-form`), and the injected faults of
//! `/admin/delay` and `/admin/stall`.
//!
//! This module owns the queueing state and the reports; it leaves the HTTP and gRPC shapes of
//! requests and answers to [`super::http`], [`super::grpc`] and the dispatcher. The decisions
//! (admission, load, service-time draw, the encodings of a report) are pure functions; the
//! runtime state is one `std::sync::Mutex` whose critical sections never await — this is a test
//! upstream, and a lock keeps the slot hand-over obviously FIFO.
//!
//! With capacity 0 (the default) nothing is limited or reported: `/work` just spends its service
//! time, and `Infer` behaves as it always did.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use cogmesh_proto::orca::OrcaLoadReport;
use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Requests that may wait for a slot before new ones are refused, unless `--queue` says otherwise.
pub const DEFAULT_QUEUE: usize = 64;
/// Mean service time of a request, in milliseconds, unless `--service-time-ms` says otherwise.
pub const DEFAULT_SERVICE_TIME_MS: f64 = 20.0;
/// Seed of the service-time draws, unless `--seed` says otherwise.
pub const DEFAULT_SEED: u64 = 0;
/// The `Retry-After` of a refusal: come back in a second.
pub const RETRY_AFTER_SECS: u64 = 1;
/// The name of the named metric that carries the load (the wire spelling of ORCA).
pub const COGNITIVE_LOAD: &str = "cognitive_load";
/// Width of one bucket of the completion-rate window.
const RATE_BUCKET_MS: u64 = 100;
/// Buckets in the completion-rate window: together they span one second.
const RATE_BUCKETS: usize = 10;

/// How service times are drawn around their mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceTimeDist {
    /// Every request takes exactly the mean.
    Fixed,
    /// Memoryless, as for an M/M/c queue.
    #[default]
    Exponential,
}

/// How the load report is attached to HTTP responses (gRPC always uses the BIN trailer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OrcaForm {
    /// `endpoint-load-metrics: TEXT k=v, ...`
    #[default]
    Text,
    /// `endpoint-load-metrics: JSON {...}`
    Json,
    /// `endpoint-load-metrics: BIN <base64 proto>`
    Bin,
    /// No report at all.
    None,
}

/// The simulation's settings; the default simulates nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Concurrent slots; 0 = unlimited, no queue, no reports.
    pub capacity: usize,
    /// Requests that may wait for a slot; beyond that they are refused.
    pub queue: usize,
    /// Mean service time in milliseconds (finite, >= 0).
    pub service_time_ms: f64,
    pub service_time_dist: ServiceTimeDist,
    pub seed: u64,
    pub orca_form: OrcaForm,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity: 0,
            queue: DEFAULT_QUEUE,
            service_time_ms: DEFAULT_SERVICE_TIME_MS,
            service_time_dist: ServiceTimeDist::default(),
            seed: DEFAULT_SEED,
            orca_form: OrcaForm::default(),
        }
    }
}

/// Why the simulation settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("--service-time-ms {0}: must be a finite number >= 0")]
    ServiceTime(f64),
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if !(self.service_time_ms.is_finite() && self.service_time_ms >= 0.0) {
            return Err(SimConfigError::ServiceTime(self.service_time_ms));
        }
        Ok(())
    }
}

// === pure decisions ===

/// What happens to a request that arrives when `busy` slots are taken and `queued` requests wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A slot is free: start now.
    Start,
    /// Wait in the queue for a slot.
    Wait,
    /// The queue is full: refuse at once.
    Refuse,
}

/// The admission rule: a free slot is taken at once (capacity 0 means always free), else the
/// request waits if fewer than `queue_limit` already do, else it is refused.
pub fn admit(busy: usize, queued: usize, capacity: usize, queue_limit: usize) -> Admission {
    if capacity == 0 || busy < capacity {
        Admission::Start
    } else if queued < queue_limit {
        Admission::Wait
    } else {
        Admission::Refuse
    }
}

/// The load an instance reports: the demand on it relative to its capacity — not capped at 1:
/// an instance with a queue reports how many times over its slots are asked for, as ORCA's
/// `application_utilization` may (so that a balancer can tell a long queue from a short one) —
/// and how busy its slots are. `None` for an unlimited instance, which has nothing to report.
pub fn load(busy: usize, queued: usize, capacity: usize) -> Option<(f64, f64)> {
    if capacity == 0 {
        return None;
    }
    let capacity = capacity as f64;
    let cognitive_load = (busy + queued) as f64 / capacity;
    let cpu_utilization = (busy as f64 / capacity).min(1.0);
    Some((cognitive_load, cpu_utilization))
}

/// A service time in milliseconds for the uniform draw `u ∈ [0, 1)`.
pub fn service_time_ms(dist: ServiceTimeDist, mean_ms: f64, u: f64) -> f64 {
    match dist {
        ServiceTimeDist::Fixed => mean_ms,
        // Inverse transform: −mean · ln(1 − u); finite because u < 1.
        ServiceTimeDist::Exponential => -mean_ms * (1.0 - u).ln(),
    }
}

/// One ORCA load report as the workload sends it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadReport {
    /// `(busy + queued) / capacity`, more than 1 while requests queue; also sent as
    /// `application_utilization`.
    pub cognitive_load: f64,
    /// `busy / capacity`.
    pub cpu_utilization: f64,
    /// Requests completed per second over the last second.
    pub rps_fractional: f64,
}

impl LoadReport {
    /// The `endpoint-load-metrics` header value in `form`; `None` for [`OrcaForm::None`].
    pub fn header_value(&self, form: OrcaForm) -> Option<String> {
        match form {
            OrcaForm::Text => Some(self.text()),
            OrcaForm::Json => Some(format!("JSON {}", self.json())),
            OrcaForm::Bin => Some(format!("BIN {}", self.bin())),
            OrcaForm::None => None,
        }
    }

    /// `TEXT named_metrics.cognitive_load=L, application_utilization=L, cpu_utilization=C,
    /// rps_fractional=R`, numbers in their shortest exact form (`1`, `0.5`).
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(128);
        let _ = write!(
            s,
            "TEXT named_metrics.{COGNITIVE_LOAD}={}, application_utilization={}, \
             cpu_utilization={}, rps_fractional={}",
            self.cognitive_load, self.cognitive_load, self.cpu_utilization, self.rps_fractional
        );
        s
    }

    /// The proto3 JSON mapping (proto field names).
    pub fn json(&self) -> String {
        serde_json::json!({
            "cpu_utilization": self.cpu_utilization,
            "application_utilization": self.cognitive_load,
            "rps_fractional": self.rps_fractional,
            "named_metrics": { COGNITIVE_LOAD: self.cognitive_load },
        })
        .to_string()
    }

    pub fn proto(&self) -> OrcaLoadReport {
        let mut report = OrcaLoadReport {
            cpu_utilization: self.cpu_utilization,
            application_utilization: self.cognitive_load,
            rps_fractional: self.rps_fractional,
            ..Default::default()
        };
        report
            .named_metrics
            .insert(COGNITIVE_LOAD.to_owned(), self.cognitive_load);
        report
    }

    /// Base64 (standard alphabet, padded) of the serialized `OrcaLoadReport`: the BIN form's
    /// payload and the `endpoint-load-metrics-bin` trailer.
    pub fn bin(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.proto().encode_to_vec())
    }
}

/// Completions counted in [`RATE_BUCKETS`] buckets of [`RATE_BUCKET_MS`]: the rate over the
/// last second, in 100 ms steps, without keeping a timestamp per request.
#[derive(Debug, Default)]
struct RateWindow {
    counts: [u64; RATE_BUCKETS],
    /// Index (time / bucket width) of the newest bucket.
    newest: u64,
}

impl RateWindow {
    /// Moves the window so that `bucket` is the newest, emptying the buckets it passes.
    fn advance(&mut self, bucket: u64) {
        if bucket <= self.newest {
            return;
        }
        let passed = bucket - self.newest;
        if passed >= RATE_BUCKETS as u64 {
            self.counts = [0; RATE_BUCKETS];
        } else {
            for i in 1..=passed {
                self.counts[((self.newest + i) % RATE_BUCKETS as u64) as usize] = 0;
            }
        }
        self.newest = bucket;
    }

    fn record(&mut self, now_ms: u64) {
        let bucket = now_ms / RATE_BUCKET_MS;
        self.advance(bucket);
        // A completion stamped before the newest bucket (a racing clock read) counts in it.
        self.counts[(self.newest % RATE_BUCKETS as u64) as usize] += 1;
    }

    fn per_second(&mut self, now_ms: u64) -> f64 {
        self.advance(now_ms / RATE_BUCKET_MS);
        let window_secs = (RATE_BUCKETS as u64 * RATE_BUCKET_MS) as f64 / 1000.0;
        self.counts.iter().sum::<u64>() as f64 / window_secs
    }
}

// === runtime ===

/// Why a request got no service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("queue full")]
    QueueFull,
    #[error("shutting down")]
    ShuttingDown,
}

/// What `GET /admin/stats` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub name: String,
    pub capacity: usize,
    /// Slots taken now (requests in service, when unlimited).
    pub busy: usize,
    /// Requests waiting for a slot now.
    pub queued: usize,
    /// Requests that finished their service.
    pub completed: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Requests held by `/admin/stall` now.
    pub stalled: usize,
    /// `/work` and `Infer` requests that arrived, whatever became of them.
    pub received: u64,
}

/// A fault injected through the admin routes, active until `until`.
#[derive(Clone, Copy, Debug)]
struct Fault<T> {
    value: T,
    until: Option<Instant>,
}

impl<T: Copy> Fault<T> {
    fn at(this: &Option<Self>, now: Instant) -> Option<T> {
        this.and_then(|f| f.until.is_none_or(|until| now < until).then_some(f.value))
    }
}

#[derive(Debug, Default)]
struct State {
    busy: usize,
    /// Tickets and wake-ups of the requests waiting for a slot, oldest first.
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
    next_ticket: u64,
    stalled: usize,
    received: u64,
    completed: u64,
    rejected: u64,
    rate: RateWindow,
    delay: Option<Fault<Duration>>,
    /// Requests arriving before this instant hang until it.
    stall_until: Option<Instant>,
}

/// The simulated service of one workload instance.
#[derive(Debug)]
pub struct Simulator {
    name: String,
    config: SimConfig,
    state: Mutex<State>,
    rng: Mutex<SmallRng>,
    /// Set when the workload shuts down: stalled requests give up.
    closing: watch::Sender<bool>,
    epoch: Instant,
}

impl Simulator {
    pub fn new(name: &str, config: SimConfig) -> Self {
        Simulator {
            name: name.to_owned(),
            rng: Mutex::new(SmallRng::seed_from_u64(config.seed)),
            config,
            state: Mutex::default(),
            closing: watch::Sender::new(false),
            epoch: Instant::now(),
        }
    }

    /// Whether requests are limited and reported on (capacity > 0).
    pub fn is_limited(&self) -> bool {
        self.config.capacity > 0
    }

    pub fn orca_form(&self) -> OrcaForm {
        self.config.orca_form
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every section is a few updates.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A service time drawn from the configured distribution.
    pub fn draw_service_time(&self) -> Duration {
        let u: f64 = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .random();
        let ms = service_time_ms(self.config.service_time_dist, self.config.service_time_ms, u);
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// The report to attach now; `None` when unlimited.
    pub fn report(&self) -> Option<LoadReport> {
        let now_ms = self.now_ms();
        let mut state = self.state();
        let (cognitive_load, cpu_utilization) = load(state.busy, state.waiting.len(), self.config.capacity)?;
        Some(LoadReport {
            cognitive_load,
            cpu_utilization,
            rps_fractional: state.rate.per_second(now_ms),
        })
    }

    pub fn stats(&self) -> Stats {
        let state = self.state();
        Stats {
            name: self.name.clone(),
            capacity: self.config.capacity,
            busy: state.busy,
            queued: state.waiting.len(),
            completed: state.completed,
            rejected: state.rejected,
            stalled: state.stalled,
            received: state.received,
        }
    }

    /// Adds `delay` to the service time of requests arriving within `window` (for ever when
    /// `None`); a zero delay clears it.
    pub fn set_delay(&self, delay: Duration, window: Option<Duration>) {
        let until = window.map(|w| Instant::now() + w);
        self.state().delay = (!delay.is_zero()).then_some(Fault { value: delay, until });
    }

    /// Holds requests arriving within `window` until the window ends; a zero window clears it
    /// for requests that arrive from now on.
    pub fn set_stall(&self, window: Duration) {
        self.state().stall_until = (!window.is_zero()).then(|| Instant::now() + window);
    }

    /// Makes stalled requests give up (the workload is shutting down).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Serves one request that needs `service_time`: waits out a stall, takes a slot (or a
    /// place in the queue, or is refused), and holds it for the service time plus any injected
    /// delay. The slot is free again when this returns.
    pub async fn work(&self, service_time: Duration) -> Result<(), Refusal> {
        let now = Instant::now();
        let (delay, stall_until) = {
            let mut state = self.state();
            state.received += 1;
            let stall = state.stall_until.filter(|until| now < *until);
            if stall.is_some() {
                state.stalled += 1;
            }
            (Fault::at(&state.delay, now), stall)
        };
        if let Some(until) = stall_until {
            let _stalled = Stalled(self);
            let mut closing = self.closing.subscribe();
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                _ = closing.wait_for(|closing| *closing) => return Err(Refusal::ShuttingDown),
            }
        }
        let slot = self.acquire().await?;
        tokio::time::sleep(service_time + delay.unwrap_or_default()).await;
        slot.complete();
        Ok(())
    }

    /// A slot, now or in FIFO order once one is released.
    async fn acquire(&self) -> Result<Slot<'_>, Refusal> {
        let queued = {
            let mut state = self.state();
            match admit(
                state.busy,
                state.waiting.len(),
                self.config.capacity,
                self.config.queue,
            ) {
                Admission::Start => {
                    state.busy += 1;
                    return Ok(Slot(self));
                }
                Admission::Refuse => {
                    state.rejected += 1;
                    return Err(Refusal::QueueFull);
                }
                Admission::Wait => {
                    let (wake, woken) = oneshot::channel();
                    let ticket = state.next_ticket;
                    state.next_ticket += 1;
                    state.waiting.push_back((ticket, wake));
                    Queued {
                        sim: self,
                        ticket,
                        woken: Some(woken),
                    }
                }
            }
        };
        queued.granted().await
    }

    /// Hands a released slot to the oldest waiting request, or frees it.
    fn release(&self, state: &mut State) {
        while let Some((_, wake)) = state.waiting.pop_front() {
            if wake.send(()).is_ok() {
                return;
            }
        }
        state.busy -= 1;
    }
}

/// A taken slot; released (to the next in line) when dropped.
struct Slot<'a>(&'a Simulator);

impl Slot<'_> {
    fn complete(self) {
        let now_ms = self.0.now_ms();
        let mut state = self.0.state();
        state.completed += 1;
        state.rate.record(now_ms);
        drop(state);
        // Dropping `self` releases the slot, under the lock again.
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        self.0.release(&mut state);
    }
}

/// A place in the queue. Dropped before its turn (the client went away), it leaves the queue;
/// dropped after the slot was handed to it but before it took it, it passes the slot on.
struct Queued<'a> {
    sim: &'a Simulator,
    ticket: u64,
    /// `None` once the slot has been taken.
    woken: Option<oneshot::Receiver<()>>,
}

impl<'a> Queued<'a> {
    async fn granted(mut self) -> Result<Slot<'a>, Refusal> {
        let woken = self.woken.as_mut().expect("a queued request waits once");
        // The sender is only dropped after sending: `Drop for Queued` removes the entry itself.
        let result = woken.await;
        self.woken = None;
        match result {
            Ok(()) => Ok(Slot(self.sim)),
            Err(_) => Err(Refusal::ShuttingDown),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.woken.is_none() {
            return;
        }
        let mut state = self.sim.state();
        if let Some(at) = state.waiting.iter().position(|(t, _)| *t == self.ticket) {
            state.waiting.remove(at);
        } else {
            // Woken (under the lock) but gone before taking the slot: pass it on.
            self.sim.release(&mut state);
        }
    }
}

/// Counts a request as stalled while it lives.
struct Stalled<'a>(&'a Simulator);

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.state().stalled -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn admission_starts_waits_then_refuses() {
        assert_eq!(admit(0, 0, 2, 1), Admission::Start);
        assert_eq!(admit(1, 0, 2, 1), Admission::Start);
        assert_eq!(admit(2, 0, 2, 1), Admission::Wait);
        assert_eq!(admit(2, 1, 2, 1), Admission::Refuse);
        // No queue: refused as soon as the slots are taken.
        assert_eq!(admit(1, 0, 1, 0), Admission::Refuse);
        // Capacity 0 is unlimited.
        assert_eq!(admit(1000, 0, 0, 0), Admission::Start);
    }

    #[test]
    fn load_counts_the_queue_beyond_one() {
        assert_eq!(load(0, 0, 4), Some((0.0, 0.0)));
        assert_eq!(load(2, 0, 4), Some((0.5, 0.5)));
        assert_eq!(load(4, 0, 4), Some((1.0, 1.0)));
        // Two waiting for four slots: demand 1.5 times the capacity; the slots are just full.
        assert_eq!(load(4, 2, 4), Some((1.5, 1.0)));
        assert_eq!(load(1, 1, 4), Some((0.5, 0.25)));
        assert_eq!(load(3, 0, 0), None);
    }

    #[test]
    fn service_times_follow_the_distribution() {
        assert_eq!(service_time_ms(ServiceTimeDist::Fixed, 20.0, 0.9), 20.0);
        assert_eq!(service_time_ms(ServiceTimeDist::Exponential, 20.0, 0.0), 0.0);
        // The median of an exponential is mean · ln 2.
        let median = service_time_ms(ServiceTimeDist::Exponential, 20.0, 0.5);
        assert!((median - 20.0 * std::f64::consts::LN_2).abs() < 1e-9);
    }

    #[test]
    fn seeded_draws_are_deterministic_with_the_right_mean() {
        let config = SimConfig {
            seed: 7,
            ..SimConfig::default()
        };
        let (a, b) = (Simulator::new("a", config.clone()), Simulator::new("b", config));
        let draws: Vec<_> = (0..20_000).map(|_| a.draw_service_time()).collect();
        assert!(draws.iter().all(|d| *d == b.draw_service_time()));
        let mean_ms = draws.iter().map(|d| d.as_secs_f64() * 1000.0).sum::<f64>() / 20_000.0;
        assert!((mean_ms - 20.0).abs() < 1.0, "mean {mean_ms} ms");
    }

    #[test]
    fn report_encodings() {
        let report = LoadReport {
            cognitive_load: 1.0,
            cpu_utilization: 0.5,
            rps_fractional: 12.5,
        };
        assert_eq!(
            report.header_value(OrcaForm::Text).unwrap(),
            "TEXT named_metrics.cognitive_load=1, application_utilization=1, \
             cpu_utilization=0.5, rps_fractional=12.5"
        );
        let json = report.header_value(OrcaForm::Json).unwrap();
        let json: serde_json::Value = serde_json::from_str(json.strip_prefix("JSON ").unwrap()).unwrap();
        assert_eq!(json["named_metrics"][COGNITIVE_LOAD], 1.0);
        assert_eq!(json["application_utilization"], 1.0);
        assert_eq!(json["cpu_utilization"], 0.5);
        assert_eq!(json["rps_fractional"], 12.5);
        let bin = report.header_value(OrcaForm::Bin).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(bin.strip_prefix("BIN ").unwrap())
            .unwrap();
        assert_eq!(OrcaLoadReport::decode(bytes.as_slice()).unwrap(), report.proto());
        assert_eq!(report.proto().named_metrics[COGNITIVE_LOAD], 1.0);
        assert_eq!(report.header_value(OrcaForm::None), None);
    }

    #[test]
    fn rate_window_covers_the_last_second() {
        let mut rate = RateWindow::default();
        for ms in [0, 50, 150, 950] {
            rate.record(ms);
        }
        assert_eq!(rate.per_second(990), 4.0);
        // At 1.05 s the first bucket (0–100 ms) has left the window.
        assert_eq!(rate.per_second(1050), 2.0);
        assert_eq!(rate.per_second(1999), 0.0);
        rate.record(5000);
        assert_eq!(rate.per_second(5000), 1.0);
        assert_eq!(rate.per_second(60_000), 0.0);
    }

    fn sim(capacity: usize, queue: usize) -> Arc<Simulator> {
        Arc::new(Simulator::new(
            "w",
            SimConfig {
                capacity,
                queue,
                service_time_dist: ServiceTimeDist::Fixed,
                ..SimConfig::default()
            },
        ))
    }

    fn spawn_work(sim: &Arc<Simulator>, ms: u64) -> tokio::task::JoinHandle<Result<(), Refusal>> {
        let sim = Arc::clone(sim);
        tokio::spawn(async move { sim.work(Duration::from_millis(ms)).await })
    }

    /// Lets spawned tasks run up to their next timer.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_handed_over_in_arrival_order() {
        let sim = sim(1, 2);
        let start = Instant::now();
        let first = spawn_work(&sim, 100);
        settle().await;
        let second = spawn_work(&sim, 100);
        settle().await;
        let third = spawn_work(&sim, 100);
        settle().await;
        let fourth = spawn_work(&sim, 100);
        settle().await;
        assert_eq!(fourth.await.unwrap(), Err(Refusal::QueueFull));
        let stats = sim.stats();
        assert_eq!((stats.busy, stats.queued, stats.rejected), (1, 2, 1));
        // One slot, one busy and two queued: demand three times the capacity.
        assert_eq!(sim.report().unwrap().cognitive_load, 3.0);
        assert_eq!(sim.report().unwrap().cpu_utilization, 1.0);

        first.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        second.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        third.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        let stats = sim.stats();
        assert_eq!((stats.busy, stats.queued, stats.completed), (0, 0, 3));
        assert_eq!(stats.received, 4);
        assert_eq!(sim.report().unwrap().rps_fractional, 3.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_leaves_the_queue_frees_its_place() {
        let sim = sim(1, 1);
        let first = spawn_work(&sim, 100);
        settle().await;
        let second = spawn_work(&sim, 100);
        settle().await;
        assert_eq!(sim.stats().queued, 1);
        second.abort();
        settle().await;
        assert_eq!(sim.stats().queued, 0);
        let third = spawn_work(&sim, 100);
        settle().await;
        assert_eq!(sim.stats().queued, 1);
        first.await.unwrap().unwrap();
        third.await.unwrap().unwrap();
        let stats = sim.stats();
        assert_eq!((stats.busy, stats.queued, stats.completed), (0, 0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_is_added_while_its_window_lasts() {
        let sim = sim(4, 0);
        sim.set_delay(Duration::from_millis(50), Some(Duration::from_millis(1000)));
        let start = Instant::now();
        sim.work(Duration::from_millis(10)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(60));
        tokio::time::advance(Duration::from_millis(1000)).await;
        let start = Instant::now();
        sim.work(Duration::from_millis(10)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        // No window: until cleared.
        sim.set_delay(Duration::from_millis(5), None);
        let start = Instant::now();
        sim.work(Duration::from_millis(10)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(15));
        sim.set_delay(Duration::ZERO, None);
        let start = Instant::now();
        sim.work(Duration::from_millis(10)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_requests_hang_until_the_stall_ends_or_shutdown() {
        let sim = sim(1, 8);
        sim.set_stall(Duration::from_millis(500));
        let start = Instant::now();
        let stalled = spawn_work(&sim, 10);
        settle().await;
        assert_eq!(sim.stats().stalled, 1);
        assert_eq!(sim.stats().busy, 0);
        stalled.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(510));
        assert_eq!(sim.stats().stalled, 0);

        sim.set_stall(Duration::from_secs(600));
        let stalled = spawn_work(&sim, 10);
        settle().await;
        tokio::time::advance(Duration::from_secs(5)).await;
        sim.close();
        assert_eq!(stalled.await.unwrap(), Err(Refusal::ShuttingDown));
        let stats = sim.stats();
        assert_eq!((stats.stalled, stats.completed, stats.received), (0, 1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_instances_count_but_do_not_queue_or_report() {
        let sim = sim(0, 0);
        let tasks: Vec<_> = (0..5).map(|_| spawn_work(&sim, 100)).collect();
        settle().await;
        assert_eq!(sim.stats().busy, 5);
        assert_eq!(sim.report(), None);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(sim.stats().completed, 5);
    }
}
