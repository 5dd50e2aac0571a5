//! Retries of a service: which failures are retried, how often, after what backoff, and the
//! retry budget that keeps retries from amplifying an outage.
//!
//! A request may be retried when its method is idempotent (RFC 9110 §9.2.2), or the service
//! allows retrying any method (`non_idempotent: true`) or its route does
//! (`retry_non_idempotent: true`), or it is a gRPC call and the service
//! lists gRPC codes to retry (gRPC's own retry policies are per method, not per HTTP verb). Its
//! body, if any, is kept in a replay buffer of at most `replay_buffer_bytes` (see [`replay`]);
//! a longer body is sent once and its retry refused (`body_too_large`). Retried failures: a
//! connection that could not be made, a reset or refused stream, the statuses in
//! `retry_statuses` (default 502, 503, 504) and, for gRPC, a trailers-only response whose
//! `grpc-status` is in `retry_grpc_codes` (default `unavailable`). A retry goes to another
//! endpoint when there is one, after an exponential backoff with full jitter, and needs both a
//! slot in the service's circuit breaker (`max_retries`) and the budget.
//!
//! The budget (as Finagle's and Linkerd's): over the last [`BUDGET_WINDOW_SECS`] seconds, retries
//! may be at most `budget_ratio` × requests plus `min_retries_per_sec` × the window. It is ten
//! one-second slots of atomic counters, so every worker thread shares it without a lock.

pub mod replay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use http_body::Body;
use http_body_util::Either;

use crate::breaker::{Breaker, RetryPermit};
use crate::compress::CodedBody;
use crate::forward::UpstreamBody;
use replay::{Buffered, ReadAhead};

/// Seconds of history the budget looks at.
pub const BUDGET_WINDOW_SECS: u64 = 10;
/// Off unless configured, as in Envoy and Linkerd: a retry policy is the operator's decision,
/// and without one the request path pays nothing for retries (no head copy, no budget count).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 1;
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 25;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 250;
/// Envoy's default per-request buffer limit for retries.
pub const DEFAULT_REPLAY_BUFFER_BYTES: usize = 64 * 1024;

/// A gRPC status code (grpc/doc/statuscodes.md), by its name in snake case.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GrpcCode {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// `retry:` of a service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 (the default) turns retries off.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_retry_statuses")]
    pub retry_statuses: Vec<u16>,
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    #[serde(default = "default_min_retries_per_sec")]
    pub min_retries_per_sec: u32,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// gRPC codes retried when they come in a trailers-only response.
    #[serde(default = "default_retry_grpc_codes")]
    pub retry_grpc_codes: Vec<GrpcCode>,
    /// Bytes of request body kept for a retry; a longer body is not retried.
    #[serde(default = "default_replay_buffer_bytes")]
    pub replay_buffer_bytes: usize,
    /// Retry requests whatever their method (POST, PATCH too): for services whose handlers are
    /// idempotent anyway.
    #[serde(default)]
    pub non_idempotent: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_statuses: default_retry_statuses(),
            budget_ratio: DEFAULT_BUDGET_RATIO,
            min_retries_per_sec: DEFAULT_MIN_RETRIES_PER_SEC,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            retry_grpc_codes: default_retry_grpc_codes(),
            replay_buffer_bytes: DEFAULT_REPLAY_BUFFER_BYTES,
            non_idempotent: false,
        }
    }
}

fn default_retry_grpc_codes() -> Vec<GrpcCode> {
    vec![GrpcCode::Unavailable]
}
fn default_replay_buffer_bytes() -> usize {
    DEFAULT_REPLAY_BUFFER_BYTES
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget_ratio() -> f64 {
    DEFAULT_BUDGET_RATIO
}
fn default_min_retries_per_sec() -> u32 {
    DEFAULT_MIN_RETRIES_PER_SEC
}
fn default_backoff_base_ms() -> u64 {
    DEFAULT_BACKOFF_BASE_MS
}
fn default_backoff_max_ms() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}

impl RetryConfig {
    /// Range checks; `Err((field, reason))` relative to `retry`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_attempts == 0 {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        if !(0.0..=10.0).contains(&self.budget_ratio) {
            return Err((
                "budget_ratio",
                format!("must be between 0 and 10, got {}", self.budget_ratio),
            ));
        }
        if let Some(s) = self.retry_statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(("retry_statuses", format!("{s} is not an HTTP status")));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err((
                "backoff_max_ms",
                format!("must be >= backoff_base_ms ({})", self.backoff_base_ms),
            ));
        }
        Ok(())
    }

    /// The wait before retry number `retry` (1 for the first), with `draw` in [0, 1): full
    /// jitter over `min(base × 2^(retry−1), max)`.
    pub fn backoff(&self, retry: u32, draw: f64) -> Duration {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << retry.saturating_sub(1).min(20));
        let cap = exp.min(self.backoff_max_ms);
        Duration::from_millis((cap as f64 * draw.clamp(0.0, 1.0)) as u64)
    }
}

/// Whether a method is idempotent (RFC 9110 §9.2.2): sending it twice has the effect of once.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The retries of one request: what to send again, and whether the policy, the breaker and
/// the budget allow another attempt.
pub struct Attempts<'a> {
    config: &'a RetryConfig,
    budget: &'a Budget,
    breaker: &'a Arc<Breaker>,
    replay: Option<Replay>,
    grpc: bool,
    attempt: u32,
}

/// A request's head and body, to send it again.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: ReplayBody,
}

enum ReplayBody {
    Empty,
    Buffered(Arc<Buffered>),
    /// Longer than the replay buffer: the retry is refused.
    TooLarge,
}

/// The `result` label of a retry that was sent.
pub const RETRY_SENT: &str = "sent";
/// Every `result` label of `retry_total`.
pub const RETRY_RESULTS: [&str; 4] = [
    RETRY_SENT,
    "budget_exhausted",
    "breaker_overflow",
    "body_too_large",
];

/// Why a failed attempt was not retried, when it could have been.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Budget,
    Breaker,
    BodyTooLarge,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Budget => RETRY_RESULTS[1],
            Refusal::Breaker => RETRY_RESULTS[2],
            Refusal::BodyTooLarge => RETRY_RESULTS[3],
        }
    }
}

/// What decides, besides the method, whether a request may be retried.
#[derive(Clone, Copy, Debug, Default)]
pub struct Eligibility {
    /// An upgrade (WebSocket): never retried.
    pub upgrade: bool,
    /// A gRPC call: retried when the service lists gRPC codes.
    pub grpc: bool,
    /// Its route allows retrying any method.
    pub any_method: bool,
}

impl<'a> Attempts<'a> {
    /// Counts the request in the budget and, if it may be retried, keeps its head and reads its
    /// body into the replay buffer; gives back the request to send first.
    pub async fn prepare(
        config: &'a RetryConfig,
        budget: &'a Budget,
        breaker: &'a Arc<Breaker>,
        req: http::Request<UpstreamBody>,
        eligibility: Eligibility,
    ) -> (Self, http::Request<UpstreamBody>) {
        let Eligibility {
            upgrade,
            grpc,
            any_method,
        } = eligibility;
        let mut attempts = Attempts {
            config,
            budget,
            breaker,
            replay: None,
            grpc,
            attempt: 1,
        };
        if config.max_attempts <= 1 {
            return (attempts, req);
        }
        budget.record_request(Instant::now());
        let eligible = is_idempotent(req.method())
            || config.non_idempotent
            || any_method
            || (grpc && !config.retry_grpc_codes.is_empty());
        if upgrade || !eligible {
            return (attempts, req);
        }
        let (parts, body) = req.into_parts();
        let (body, replay_body) = if body.is_end_stream() {
            (body, ReplayBody::Empty)
        } else {
            // Boxed, so the futures of requests that never buffer stay small (a request's
            // future is copied whole when it is queued).
            match Box::pin(replay::read_ahead(body, config.replay_buffer_bytes)).await {
                ReadAhead::Complete(buffered) => (buffered.body(), ReplayBody::Buffered(buffered)),
                ReadAhead::TooLarge(body) => (body, ReplayBody::TooLarge),
            }
        };
        attempts.replay = Some(Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: replay_body,
        });
        (attempts, http::Request::from_parts(parts, body))
    }

    /// Whether the policy retries this response: its status, or for gRPC the `grpc-status` of
    /// a trailers-only response.
    pub fn retries_response<B>(&self, response: &http::Response<B>) -> bool {
        if self.config.max_attempts <= 1 {
            return false;
        }
        if self.config.retry_statuses.contains(&response.status().as_u16()) {
            return true;
        }
        self.grpc
            && !self.config.retry_grpc_codes.is_empty()
            && response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
                .is_some_and(|code| self.config.retry_grpc_codes.iter().any(|c| *c as u16 == code))
    }

    /// After a retriable failure: the request to send again, the breaker slot it holds and the
    /// backoff to wait first; `Ok(None)` when the request cannot be retried (its method, an
    /// upgrade, attempts used up), `Err` when its body was too long to keep, or the budget or
    /// the breaker refused.
    #[allow(clippy::type_complexity)]
    pub fn next_attempt(
        &mut self,
    ) -> Result<Option<(http::Request<UpstreamBody>, RetryPermit, Duration)>, Refusal> {
        let Some(replay) = &self.replay else {
            return Ok(None);
        };
        if self.attempt >= self.config.max_attempts {
            return Ok(None);
        }
        let body = match &replay.body {
            ReplayBody::Empty => Either::Right(CodedBody::default()),
            ReplayBody::Buffered(buffered) => buffered.body(),
            ReplayBody::TooLarge => return Err(Refusal::BodyTooLarge),
        };
        let permit = self.breaker.try_retry().map_err(|_| Refusal::Breaker)?;
        if !self.budget.try_retry(self.config, Instant::now()) {
            return Err(Refusal::Budget);
        }
        let mut req = http::Request::new(body);
        *req.method_mut() = replay.method.clone();
        *req.uri_mut() = replay.uri.clone();
        *req.version_mut() = replay.version;
        *req.headers_mut() = replay.headers.clone();
        let wait = self.config.backoff(self.attempt, fastrand::f64());
        self.attempt += 1;
        Ok(Some((req, permit, wait)))
    }
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// The retry budget of one service.
#[derive(Debug)]
pub struct Budget {
    slots: [Slot; BUDGET_WINDOW_SECS as usize],
    epoch: Instant,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            slots: Default::default(),
            epoch: Instant::now(),
        }
    }
}

impl Budget {
    /// The slot of `now`, cleared first if it still holds an older second. (Two threads
    /// clearing at once may drop a count: the budget is an estimate, never a lock.)
    fn slot(&self, now: Instant) -> (&Slot, u64) {
        let second = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let slot = &self.slots[(second % BUDGET_WINDOW_SECS) as usize];
        let seen = slot.second.load(Ordering::Relaxed);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        (slot, second)
    }

    /// Counts a request (first attempts only).
    pub fn record_request(&self, now: Instant) {
        self.slot(now).0.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget if there is room.
    pub fn try_retry(&self, config: &RetryConfig, now: Instant) -> bool {
        let (slot, second) = self.slot(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let at = s.second.load(Ordering::Relaxed);
            if at + BUDGET_WINDOW_SECS > second && at <= second {
                requests += s.requests.load(Ordering::Relaxed);
                retries += s.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = config.budget_ratio * requests as f64
            + f64::from(config.min_retries_per_sec) * BUDGET_WINDOW_SECS as f64;
        if (retries as f64) < allowed.floor() {
            slot.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    fn config(ratio: f64, min_per_sec: u32) -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: ratio,
            min_retries_per_sec: min_per_sec,
            ..RetryConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_of_requests_in_the_window() {
        let c = config(0.2, 0);
        let b = Budget::default();
        for _ in 0..100 {
            b.record_request(Instant::now());
        }
        let allowed = (0..50).filter(|_| b.try_retry(&c, Instant::now())).count();
        assert_eq!(allowed, 20);
        // Ten seconds later the old requests (and retries) are out of the window.
        advance(Duration::from_secs(10)).await;
        assert!(!b.try_retry(&c, Instant::now()));
        for _ in 0..10 {
            b.record_request(Instant::now());
        }
        assert_eq!((0..5).filter(|_| b.try_retry(&c, Instant::now())).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_has_a_floor_per_second_and_forgets_slot_by_slot() {
        let c = config(0.2, 1);
        let b = Budget::default();
        // No traffic: 1/s over 10 s = 10 retries.
        assert_eq!((0..20).filter(|_| b.try_retry(&c, Instant::now())).count(), 10);
        advance(Duration::from_secs(9)).await;
        assert!(!b.try_retry(&c, Instant::now()));
        // After 10 s the first second's retries have left the window.
        advance(Duration::from_secs(1)).await;
        assert_eq!((0..20).filter(|_| b.try_retry(&c, Instant::now())).count(), 10);
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let c = RetryConfig::default();
        let full: Vec<u64> = (1..=6)
            .map(|r| c.backoff(r, 0.999_999).as_millis() as u64)
            .collect();
        assert_eq!(full, [24, 49, 99, 199, 249, 249]);
        assert_eq!(c.backoff(3, 0.5), Duration::from_millis(50));
        assert_eq!(c.backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn idempotent_methods_are_those_of_rfc_9110() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::DELETE));
        assert!(is_idempotent(&http::Method::PUT));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }

    #[test]
    fn config_is_range_checked() {
        let c = RetryConfig {
            retry_statuses: vec![503, 1000],
            ..RetryConfig::default()
        };
        assert_eq!(
            c.check(),
            Err(("retry_statuses", "1000 is not an HTTP status".to_string()))
        );
        assert_eq!(RetryConfig::default().check(), Ok(()));
    }
}
