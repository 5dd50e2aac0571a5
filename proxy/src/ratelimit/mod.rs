//! Per-instance rate limiting: a token bucket per listener, per route, and optionally per client
//! key (a header's value or the client IP) under either, for inbound and outbound listeners.
//!
//! A request over the limit gets 429 with `Retry-After` and `RateLimit-Limit` /
//! `RateLimit-Remaining` / `RateLimit-Reset` (gRPC: `RESOURCE_EXHAUSTED`); the mapping to a
//! response lives in [`crate::error`] and `forward`.
//!
//! The bucket is GCRA (the "virtual scheduling" form of a token bucket): one atomic holding the
//! theoretical arrival time, updated with compare-and-swap, so every worker thread shares a
//! bucket without a lock. It is written here rather than taken from `governor` because it reads
//! tokio's clock — the paused-clock tests pin exact values — and answers the remaining-tokens
//! and reset questions the `RateLimit-*` headers need in the same step. Keyed buckets sit in a
//! map behind a mutex of their own limiter (never a global one), bounded to [`MAX_KEYS`].
//!
//! Limiters live in the routing table and are carried over to the next table while their
//! configuration stays the same, so a reload does not refill them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Distinct client keys one limiter tracks; beyond it, keys whose buckets are full again are
/// forgotten first, and if none are, the newest key shares one overflow bucket.
pub const MAX_KEYS: usize = 65_536;

/// `rate_limit:` on a listener or a route.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate.
    pub requests_per_second: u32,
    /// Requests allowed at once after a quiet period; default `requests_per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// One bucket per client key instead of one for everybody.
    #[serde(default)]
    pub key: Option<ClientKey>,
}

/// Whose requests share a bucket: `key: client_ip`, `key: identity` or `key: { header: NAME }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "KeyRepr", into = "KeyRepr")]
pub enum ClientKey {
    /// The value of this request header (requests without it share one bucket).
    Header(String),
    /// The address of the downstream connection.
    ClientIp,
    /// The peer's mTLS identity (its SPIFFE ID) on a TLS listener; peers without one share a
    /// bucket.
    Identity,
}

/// The YAML spelling of [`ClientKey`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum KeyRepr {
    Named(String),
    Header(HeaderKey),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HeaderKey {
    header: String,
}

impl TryFrom<KeyRepr> for ClientKey {
    type Error = String;

    fn try_from(r: KeyRepr) -> Result<Self, String> {
        match r {
            KeyRepr::Named(n) if n == "client_ip" => Ok(ClientKey::ClientIp),
            KeyRepr::Named(n) if n == "identity" => Ok(ClientKey::Identity),
            KeyRepr::Named(n) => Err(format!(
                "expected `client_ip`, `identity` or `{{ header: NAME }}`, got {n:?}"
            )),
            KeyRepr::Header(h) => Ok(ClientKey::Header(h.header)),
        }
    }
}

impl From<ClientKey> for KeyRepr {
    fn from(k: ClientKey) -> Self {
        match k {
            ClientKey::ClientIp => KeyRepr::Named("client_ip".into()),
            ClientKey::Identity => KeyRepr::Named("identity".into()),
            ClientKey::Header(header) => KeyRepr::Header(HeaderKey { header }),
        }
    }
}

impl RateLimitConfig {
    /// Range checks; `Err((field, reason))` relative to `rate_limit`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.requests_per_second == 0 {
            return Err(("requests_per_second", "must be greater than 0".into()));
        }
        if self.burst == Some(0) {
            return Err(("burst", "must be greater than 0".into()));
        }
        if let Some(ClientKey::Header(h)) = &self.key {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(("key.header", format!("{h:?} is not a valid HTTP header name")));
            }
        }
        Ok(())
    }

    fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

/// Who sent a request, for per-client buckets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Client<'a> {
    /// The downstream address, as text.
    pub ip: &'a [u8],
    /// The peer's mTLS identity, on a TLS listener that verified one.
    pub identity: Option<&'a str>,
}

/// The outcome of taking one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket size (`RateLimit-Limit`).
    pub limit: u32,
    /// Tokens left after this request (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Until the bucket is full again (`RateLimit-Reset`).
    pub reset: Duration,
    /// Until a request would be allowed (`Retry-After`); zero when allowed.
    pub retry_after: Duration,
}

/// Whole seconds for a header: rounded up, so a client that waits that long is not refused again.
pub fn header_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

/// A GCRA token bucket shared by threads.
#[derive(Debug)]
pub struct Bucket {
    /// Nanoseconds per token.
    interval_ns: u64,
    burst: u32,
    /// Theoretical arrival time, ns since `epoch`: the bucket is full once `now` reaches it.
    tat_ns: AtomicU64,
    epoch: Instant,
}

impl Bucket {
    pub fn new(requests_per_second: u32, burst: u32) -> Self {
        Bucket {
            interval_ns: 1_000_000_000 / u64::from(requests_per_second.max(1)),
            burst: burst.max(1),
            tat_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Takes one token at `now` if there is one.
    pub fn try_take(&self, now: Instant) -> Decision {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let capacity_ns = self.interval_ns * u64::from(self.burst);
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now_ns) + self.interval_ns;
            if next - now_ns > capacity_ns {
                // Allowed once `next - now ≤ capacity`.
                let wait = next - now_ns - capacity_ns;
                return Decision {
                    allowed: false,
                    limit: self.burst,
                    remaining: 0,
                    reset: Duration::from_nanos(tat.saturating_sub(now_ns)),
                    retry_after: Duration::from_nanos(wait),
                };
            }
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let remaining = (capacity_ns - (next - now_ns)) / self.interval_ns;
                    return Decision {
                        allowed: true,
                        limit: self.burst,
                        remaining: remaining as u32,
                        reset: Duration::from_nanos(next - now_ns),
                        retry_after: Duration::ZERO,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Full again at `now` (a keyed limiter may forget it).
    fn is_full(&self, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.tat_ns.load(Ordering::Relaxed) <= now_ns
    }
}

/// The limiter of one listener or route.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    key_header: Option<http::HeaderName>,
    shared: Bucket,
    keyed: Mutex<HashMap<Box<[u8]>, Arc<Bucket>>>,
    /// Requests refused by this limiter.
    pub limited: Counter,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig, limited: Counter) -> Self {
        let key_header = match &config.key {
            Some(ClientKey::Header(h)) => http::HeaderName::from_bytes(h.as_bytes()).ok(),
            _ => None,
        };
        RateLimiter {
            shared: Bucket::new(config.requests_per_second, config.burst()),
            key_header,
            config,
            keyed: Mutex::new(HashMap::new()),
            limited,
        }
    }

    /// `previous` if it has the same configuration (its buckets carry over), else a new one.
    pub fn reuse_or_new(
        previous: Option<&Arc<RateLimiter>>,
        config: &RateLimitConfig,
        limited: impl FnOnce() -> Counter,
    ) -> Arc<RateLimiter> {
        match previous {
            Some(p) if p.config == *config => Arc::clone(p),
            _ => Arc::new(RateLimiter::new(config.clone(), limited())),
        }
    }

    /// Takes a token for a request with these headers from this client address.
    pub fn check(&self, headers: &http::HeaderMap, client: Client<'_>, now: Instant) -> Decision {
        let key: &[u8] = match (&self.config.key, &self.key_header) {
            (None, _) => return self.count(self.shared.try_take(now)),
            (Some(ClientKey::ClientIp), _) => client.ip,
            (Some(ClientKey::Identity), _) => client.identity.map_or(&[], str::as_bytes),
            (Some(ClientKey::Header(_)), Some(name)) => headers.get(name).map_or(&[], |v| v.as_bytes()),
            (Some(ClientKey::Header(_)), None) => &[],
        };
        let bucket = {
            let mut map = self.keyed.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key) {
                Some(b) => Arc::clone(b),
                None => {
                    if map.len() >= MAX_KEYS {
                        map.retain(|_, b| !b.is_full(now));
                    }
                    if map.len() >= MAX_KEYS {
                        // Every tracked client is active: unknown ones share the overflow bucket.
                        drop(map);
                        return self.count(self.shared.try_take(now));
                    }
                    let b = Arc::new(Bucket::new(self.config.requests_per_second, self.config.burst()));
                    map.insert(key.into(), Arc::clone(&b));
                    b
                }
            }
        };
        self.count(bucket.try_take(now))
    }

    fn count(&self, d: Decision) -> Decision {
        if !d.allowed {
            self.limited.inc();
        }
        d
    }
}

#[cfg(test)]
mod tests;

/// Takes a token from each limiter in turn; the first refusal wins.
pub fn admit(
    limiters: [Option<&RateLimiter>; 2],
    headers: &http::HeaderMap,
    client: Client<'_>,
) -> Result<(), Decision> {
    let now = Instant::now();
    for l in limiters.into_iter().flatten() {
        let d = l.check(headers, client, now);
        if !d.allowed {
            return Err(d);
        }
    }
    Ok(())
}

/// `Retry-After` and the `RateLimit-*` fields (draft-ietf-httpapi-ratelimit-headers) of a refusal.
pub fn add_headers(builder: http::response::Builder, d: &Decision) -> http::response::Builder {
    builder
        .header(http::header::RETRY_AFTER, header_secs(d.retry_after).max(1))
        .header("ratelimit-limit", d.limit)
        .header("ratelimit-remaining", d.remaining)
        .header("ratelimit-reset", header_secs(d.reset).max(1))
}
