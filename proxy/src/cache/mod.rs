//! The response cache of a route: GET/HEAD responses kept in memory and served while fresh,
//! revalidated with a conditional request when stale, with request coalescing so that a miss
//! under load sends one upstream request.
//!
//! Owns: the request flow around the upstream call ([`RouteCache::serve`]), the in-flight table
//! of misses (one leader per key fetches; followers wait for it and then read the store), and the
//! body wrapper that records a response while it streams to the leader's client, storing it when
//! it ends. RFC 9111 decisions live in [`policy`], the bounded LRU store in [`store`]; the
//! upstream call itself is the forward path's, passed in as a closure.
//!
//! Bodies up to `max_entry_bytes` are buffered (a copy beside the stream, never delaying it);
//! larger responses stream through unrecorded. The store and the in-flight table are each behind
//! one mutex held for a map operation, never across an await.

pub mod policy;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AGE, CONTENT_LENGTH, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use self::policy::{RequestMode, Timing};
use self::store::{Entry, Store};
use crate::compress::BoxError;
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::forward::ProxyBody;

/// Metric handles of one route's cache, resolved when the table is built.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    /// Served from the store while fresh.
    pub hit: Counter,
    /// Fetched from the upstream (nothing stored, or a stale entry that changed).
    pub miss: Counter,
    /// A stale entry the upstream confirmed with 304.
    pub revalidated: Counter,
    /// Served from the store after waiting for another request's fetch of the same key.
    pub coalesced: Counter,
    /// Not eligible for the cache (`no-store`, ranges, HEAD or conditional misses).
    pub bypass: Counter,
    pub evictions: Counter,
    pub stored_bytes: Gauge,
    pub entries: Gauge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlightState {
    Pending,
    Stored,
    Uncacheable,
}

/// One route's cache.
pub struct RouteCache {
    pub config: CacheConfig,
    default_ttl: Duration,
    max_entry_bytes: usize,
    store: Mutex<Store>,
    /// Misses being fetched, by key: followers wait on the receiver.
    flights: Mutex<HashMap<Arc<str>, Flight>>,
    next_flight: std::sync::atomic::AtomicU64,
    metrics: CacheMetrics,
}

/// A fetch in progress: its id (so a leader only removes its own) and what followers wait on.
type Flight = (u64, watch::Receiver<FlightState>);

enum Role {
    Leader(FlightGuard),
    Follower(watch::Receiver<FlightState>),
}

impl RouteCache {
    pub fn new(config: &CacheConfig, metrics: CacheMetrics) -> Arc<RouteCache> {
        metrics.stored_bytes.set(0);
        metrics.entries.set(0);
        Arc::new(RouteCache {
            config: config.clone(),
            default_ttl: Duration::from_millis(config.default_ttl_ms),
            max_entry_bytes: usize::try_from(config.max_entry_bytes).unwrap_or(usize::MAX),
            store: Mutex::new(Store::new(
                usize::try_from(config.max_bytes).unwrap_or(usize::MAX),
            )),
            flights: Mutex::new(HashMap::new()),
            next_flight: Default::default(),
            metrics,
        })
    }

    /// Answers `req` from the store or through `send` (the upstream call), storing what may be
    /// stored. Methods other than GET and HEAD go to `send`; unsafe ones invalidate the key.
    pub async fn serve<B, F, Fut>(
        self: &Arc<Self>,
        req: Request<B>,
        send: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    {
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            let key = cache_key(&req);
            let response = send(req).await?;
            let status = response.status();
            if !method.is_safe() && (status.is_success() || status.is_redirection()) {
                self.with_store(|s| s.invalidate(&key));
            }
            return Ok(response);
        }
        let mode = policy::request_mode(req.headers());
        if mode == RequestMode::Bypass {
            self.metrics.bypass.inc();
            return send(req).await;
        }
        let key = cache_key(&req);
        let mut waited = false;
        loop {
            let now = SystemTime::now();
            let found = self.with_store(|s| s.get(&key, req.headers()));
            if let Some(entry) = &found {
                if mode == RequestMode::Normal && entry.timing.is_fresh(now) {
                    let counter = if waited {
                        &self.metrics.coalesced
                    } else {
                        &self.metrics.hit
                    };
                    counter.inc();
                    return Ok(respond(entry, &method, req.headers(), now));
                }
            }
            // Only a fresh hit answers these; otherwise the upstream does, unrecorded.
            if method == Method::HEAD || policy::has_conditionals(req.headers()) {
                self.metrics.bypass.inc();
                return send(req).await;
            }
            if waited {
                // The fetch we waited for gave nothing this request can use.
                self.metrics.miss.inc();
                return send(req).await;
            }
            match self.join(&key) {
                Role::Follower(mut rx) => {
                    let _ = rx.wait_for(|s| *s != FlightState::Pending).await;
                    waited = true;
                }
                Role::Leader(guard) => return self.fetch(req, guard, found, send).await,
            }
        }
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut store);
        self.metrics.stored_bytes.set(store.bytes() as i64);
        self.metrics.entries.set(store.len() as i64);
        out
    }

    fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = flights.get(key) {
            return Role::Follower(rx.clone());
        }
        let id = self
            .next_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(FlightState::Pending);
        let key: Arc<str> = Arc::from(key);
        flights.insert(Arc::clone(&key), (id, rx));
        Role::Leader(FlightGuard {
            cache: Arc::clone(self),
            key,
            id,
            tx,
        })
    }

    /// The leader's upstream call: conditional when a stale entry has validators; a 304
    /// refreshes the entry, a storable response is recorded while it streams.
    async fn fetch<B, F, Fut>(
        self: &Arc<Self>,
        mut req: Request<B>,
        guard: FlightGuard,
        stale: Option<Arc<Entry>>,
        send: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    {
        let request_headers = req.headers().clone();
        if let Some(entry) = &stale {
            for (name, value) in policy::conditional_headers(&entry.headers) {
                req.headers_mut().insert(name, value);
            }
        }
        let request_time = SystemTime::now();
        let response = send(req).await?;
        let response_time = SystemTime::now();

        if let (StatusCode::NOT_MODIFIED, Some(entry)) = (response.status(), &stale) {
            let mut headers = policy::updated_headers(&entry.headers, response.headers());
            let timing = Timing::new(&headers, request_time, response_time, self.default_ttl);
            headers.remove(AGE);
            let refreshed = Entry {
                status: entry.status,
                headers,
                body: entry.body.clone(),
                vary: entry.vary.clone(),
                timing,
            };
            let storable = policy::storable(
                refreshed.status,
                &request_headers,
                &refreshed.headers,
                self.default_ttl,
            );
            let served = respond(&refreshed, &Method::GET, &HeaderMap::new(), response_time);
            if storable {
                self.insert(&guard.key, refreshed);
                guard.finish(FlightState::Stored);
            }
            self.metrics.revalidated.inc();
            return Ok(served);
        }

        self.metrics.miss.inc();
        let status = response.status();
        let length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let fits = length.is_none_or(|n| n <= self.max_entry_bytes as u64);
        if !fits || !policy::storable(status, &request_headers, response.headers(), self.default_ttl) {
            guard.finish(FlightState::Uncacheable);
            return Ok(response);
        }
        let names = policy::vary_names(response.headers()).unwrap_or_default();
        let vary = policy::vary_values(&request_headers, &names);
        let timing = Timing::new(response.headers(), request_time, response_time, self.default_ttl);
        let mut headers = response.headers().clone();
        headers.remove(AGE);
        let (parts, body) = response.into_parts();
        let mut recorder = Recorder {
            inner: body,
            buffer: BytesMut::new(),
            limit: self.max_entry_bytes,
            pending: Some(Pending {
                guard,
                status,
                headers,
                vary,
                timing,
            }),
        };
        if recorder.inner.is_end_stream() {
            recorder.complete(); // no body to wait for
        }
        Ok(Response::from_parts(
            parts,
            ProxyBody::Coded(recorder.boxed_unsync()),
        ))
    }

    fn insert(&self, key: &str, entry: Entry) {
        let inserted = self.with_store(|s| s.insert(key, entry));
        self.metrics.evictions.inc_by(inserted.evicted);
    }
}

/// The cache key: host (lower-cased, from the URI or `Host`) and path with query.
pub fn cache_key<B>(req: &Request<B>) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut key = String::with_capacity(host.len() + path.len());
    key.extend(host.chars().map(|c| c.to_ascii_lowercase()));
    key.push_str(path);
    key
}

/// A stored response as served at `now`: `Age` set, 304 when the client's own validators match,
/// no body for HEAD.
fn respond(entry: &Entry, method: &Method, request: &HeaderMap, now: SystemTime) -> Response<ProxyBody> {
    let mut headers = entry.headers.clone();
    let age = entry.timing.current_age(now).as_secs();
    headers.insert(AGE, HeaderValue::from(age));
    let (status, body) =
        if entry.status == StatusCode::OK && policy::not_modified_for(request, &entry.headers) {
            headers.remove(CONTENT_LENGTH);
            (StatusCode::NOT_MODIFIED, ProxyBody::Local(None))
        } else if *method == Method::HEAD {
            (entry.status, ProxyBody::Local(None))
        } else {
            (entry.status, ProxyBody::local(entry.body.clone()))
        };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A leader's place in the in-flight table; dropping it without [`FlightGuard::finish`] (the
/// client went away, the body failed) releases the followers to fetch on their own.
struct FlightGuard {
    cache: Arc<RouteCache>,
    key: Arc<str>,
    id: u64,
    tx: watch::Sender<FlightState>,
}

impl FlightGuard {
    fn finish(self, state: FlightState) {
        self.tx.send_replace(state);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
    }
}

/// What a recorded response becomes once its body has ended.
struct Pending {
    guard: FlightGuard,
    status: StatusCode,
    headers: HeaderMap,
    vary: Vec<(http::HeaderName, Option<Vec<u8>>)>,
    timing: Timing,
}

/// Streams the upstream body on unchanged while keeping a copy, up to `limit` bytes; stores the
/// entry when the body ends. Trailers, errors or too many bytes abandon the recording.
struct Recorder {
    inner: ProxyBody,
    buffer: BytesMut,
    limit: usize,
    pending: Option<Pending>,
}

impl Recorder {
    fn abandon(&mut self) {
        if let Some(p) = self.pending.take() {
            p.guard.finish(FlightState::Uncacheable);
        }
        self.buffer = BytesMut::new();
    }

    fn complete(&mut self) {
        let Some(p) = self.pending.take() else { return };
        let entry = Entry {
            status: p.status,
            headers: p.headers,
            body: std::mem::take(&mut self.buffer).freeze(),
            vary: p.vary,
            timing: p.timing,
        };
        p.guard.cache.insert(&p.guard.key, entry);
        p.guard.finish(FlightState::Stored);
    }
}

impl Body for Recorder {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if this.pending.is_some() => match frame.data_ref() {
                Some(data) if this.buffer.len() + data.len() <= this.limit => {
                    this.buffer.extend_from_slice(data);
                    if this.inner.is_end_stream() {
                        this.complete();
                    }
                }
                _ => this.abandon(),
            },
            Poll::Ready(None) => this.complete(),
            Poll::Ready(Some(Err(_))) => this.abandon(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache(max_entry_bytes: u64) -> Arc<RouteCache> {
        let config = CacheConfig {
            max_bytes: 1 << 20,
            max_entry_bytes,
            default_ttl_ms: 0,
        };
        RouteCache::new(&config, CacheMetrics::default())
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).header(HOST, "svc").body(()).unwrap()
    }

    /// The upstream of these tests: counts calls, waits `delay`, answers `cache_control`.
    async fn upstream(
        calls: &AtomicUsize,
        cache_control: &str,
        delay: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(delay).await;
        Ok(Response::builder()
            .header("cache-control", cache_control)
            .header("x-n", n)
            .body(ProxyBody::local(Bytes::from(vec![b'x'; 1000])))
            .unwrap())
    }

    async fn body_of(r: Response<ProxyBody>) -> (String, usize) {
        let n = r.headers()["x-n"].to_str().unwrap().to_string();
        (n, r.into_body().collect().await.unwrap().to_bytes().len())
    }

    /// A GET of `path` through `c` in its own task, the upstream answering after 100 ms; the
    /// task reads the body (and returns `x-n` and its length) only with `read`.
    fn spawn_get(
        c: &Arc<RouteCache>,
        calls: &Arc<AtomicUsize>,
        path: &'static str,
        cache_control: &'static str,
        read: bool,
    ) -> tokio::task::JoinHandle<Option<(String, usize)>> {
        let (c, calls) = (Arc::clone(c), Arc::clone(calls));
        tokio::spawn(async move {
            let r = c
                .serve(get(path), |_| {
                    upstream(&calls, cache_control, Duration::from_millis(100))
                })
                .await
                .unwrap();
            match read {
                true => Some(body_of(r).await),
                false => None,
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_coalesce_into_one_upstream_call() {
        let c = cache(10_000);
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|_| spawn_get(&c, &calls, "/a", "max-age=60", true))
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Some(("1".to_string(), 1000)));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.metrics.miss.get(), 1);
        assert_eq!(c.metrics.coalesced.get(), 9);
        assert!(c.flights.lock().unwrap().is_empty(), "the flight is gone");
        // Fresh: a later request is a plain hit.
        let r = c
            .serve(get("/a"), |_| upstream(&calls, "max-age=60", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(r.headers()["age"], "0");
        assert_eq!(c.metrics.hit.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn followers_of_an_uncacheable_response_go_upstream_themselves() {
        for (cache_control, max_entry) in [("no-store", 10_000), ("max-age=60", 999)] {
            let c = cache(max_entry);
            let calls = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..5)
                .map(|_| spawn_get(&c, &calls, "/b", cache_control, true))
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap().map(|(_, len)| len), Some(1000));
            }
            assert_eq!(
                calls.load(Ordering::SeqCst),
                5,
                "{cache_control}, max entry {max_entry}"
            );
            assert_eq!(c.with_store(|s| s.len()), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_leader_releases_its_followers() {
        let c = cache(10_000);
        let calls = Arc::new(AtomicUsize::new(0));
        // The leader's client drops the response without reading the body.
        let leader = spawn_get(&c, &calls, "/c", "max-age=60", false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let follower = spawn_get(&c, &calls, "/c", "max-age=60", true);
        leader.await.unwrap();
        assert_eq!(follower.await.unwrap(), Some(("2".to_string(), 1000)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn unsafe_methods_invalidate_and_head_misses_bypass() {
        let c = cache(10_000);
        let calls = AtomicUsize::new(0);
        let r = c
            .serve(get("/d"), |_| upstream(&calls, "max-age=60", Duration::ZERO))
            .await
            .unwrap();
        body_of(r).await;
        let head = Request::head("/e").header(HOST, "svc").body(()).unwrap();
        c.serve(head, |_| upstream(&calls, "max-age=60", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(c.metrics.bypass.get(), 1);
        assert_eq!(c.with_store(|s| s.len()), 1, "a HEAD miss is not stored");
        let head = Request::head("/d").header(HOST, "svc").body(()).unwrap();
        let r = c
            .serve(head, |_| upstream(&calls, "max-age=60", Duration::ZERO))
            .await
            .unwrap();
        assert!(r.body().is_end_stream(), "a HEAD hit has no body");
        assert_eq!(r.headers()["x-n"], "1");
        let post = Request::post("/d").header(HOST, "svc").body(()).unwrap();
        c.serve(post, |_| upstream(&calls, "no-store", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(c.with_store(|s| s.len()), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn keys_are_host_and_path_with_query() {
        assert_eq!(cache_key(&get("/a?b=1")), "svc/a?b=1");
        let r = Request::get("http://API.local:8080/x").body(()).unwrap();
        assert_eq!(cache_key(&r), "api.local:8080/x");
    }
}
