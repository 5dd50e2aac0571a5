//! The request path of a listener: route the request to a service, pick an endpoint, rewrite
//! the request for the hop (RFC 9110 hop-by-hop headers, `x-forwarded-*`, protocol), send it on
//! the shared upstream pool, and stream the response back. Upgrades (WebSocket) are spliced.
//!
//! Bodies are never buffered: the downstream body is handed to the upstream client as it is,
//! and the upstream body streams back inside [`ProxyBody`], which also keeps the endpoint's
//! in-flight count until the response ends. Errors become responses through
//! [`crate::error::ProxyError`], the one place that maps causes to statuses.
//!
//! A route with a [`RoutePolicy`] wraps the upstream exchange: the cache may answer or
//! revalidate, request bodies may be decompressed and responses compressed (all streamed, see
//! [`crate::cache`] and [`crate::compress`]). Routes without one pay a single `None` check.

mod body;
mod h2_client;
pub mod h2_lane;
pub mod h2_server;
mod headers;
mod http2;
mod idle;
mod pool;
pub mod relay;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use self::body::{Held, ProxyBody, TrailerReports, UpstreamIncoming};
pub use self::http2::Http2Conns;
pub use self::pool::Http1Pool;
use self::pool::{Lease, PoolSettings};
pub use self::relay::RelayPool;
use crate::balance::cost::retry_after_penalty;
use crate::balance::{orca, Endpoint, InFlight};
use crate::compress::{self, CodedBody};
use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::error::ErrorKind;
use crate::error::ProxyError;
use crate::metrics::ServiceMetrics;
use crate::route::{Origination, RoutePolicy, RoutingTable, SharedTable};
use crate::tls::PeerIdentity;

/// A client's request body: through hyper's server, or on the HTTP/2 lane ([`h2_lane`]).
pub type DownstreamBody = Either<Incoming, http2::H2Body>;

/// A request body on its way upstream: the client's, or the client's decompressed.
pub type UpstreamBody = Either<DownstreamBody, CodedBody>;

/// The upstream connections, shared by every listener and worker thread.
///
/// HTTP/1: idle keep-alive connections per endpoint (see [`pool`]), closed after the idle
/// timeout. HTTP/2: up to [`MAX_HTTP2_CONNECTIONS`] multiplexed connections per endpoint and
/// worker (see [`http2`]; with TLS, [`crate::tls::client`]): a request goes on its worker's
/// connection `in_flight / http2_streams_per_connection` of its endpoint, so an endpoint gets
/// another connection for every `http2_streams_per_connection` concurrent streams instead of
/// queueing behind one connection's stream limit. A worker sends only on connections it
/// opened, whose task runs on its thread: on another worker's, each request would cost two
/// cross-thread wake-ups (see [`http2`] for what that measured).
#[derive(Clone)]
pub struct Upstreams {
    http1: PoolSettings,
    streams_per_connection: u64,
}

/// The most HTTP/2 connections to one endpoint from one worker.
pub const MAX_HTTP2_CONNECTIONS: usize = 8;

impl Upstreams {
    pub fn new(config: &ProxyConfig) -> Self {
        Upstreams {
            http1: PoolSettings {
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                idle_timeout: Duration::from_millis(config.pool_idle_timeout_ms),
            },
            streams_per_connection: config.http2_streams_per_connection.max(1),
        }
    }

    /// How long connecting to an endpoint may take.
    pub fn connect_timeout(&self) -> Duration {
        self.http1.connect_timeout
    }

    /// How long an HTTP/1.1 connection may stay idle.
    pub fn idle_timeout(&self) -> Duration {
        self.http1.idle_timeout
    }

    /// Which of an endpoint's HTTP/2 connections the next stream goes on, with `in_flight`
    /// streams open to it: the current worker's `in_flight / streams_per_connection`-th, worker
    /// `w`'s `k`-th being `w * MAX_HTTP2_CONNECTIONS + k`.
    fn http2_index(&self, in_flight: u64) -> usize {
        let k = ((in_flight / self.streams_per_connection) as usize).min(MAX_HTTP2_CONNECTIONS - 1);
        crate::worker::index() * MAX_HTTP2_CONNECTIONS + k
    }

    /// Sends a request that is ready for the hop and waits for the response headers.
    async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        open: u64,
        mut req: Request<UpstreamBody>,
        origination: &Origination,
        breaker: &Arc<crate::breaker::Breaker>,
    ) -> Result<(Response<UpstreamIncoming>, Option<Lease>), ProxyError> {
        let tls = match origination {
            Origination::Plaintext => None,
            Origination::Tls(client) => Some(client.as_ref()),
            Origination::Unavailable => {
                return Err(ProxyError::UpstreamConnect {
                    endpoint: endpoint.addr,
                    cause: "the service needs TLS but the sidecar has no identity".into(),
                })
            }
        };
        if req.version() == Version::HTTP_2 {
            let index = self.http2_index(open);
            // The client's authority goes on as `:authority`: its URI's, else its Host's, else
            // the endpoint's address.
            let from_host = host_authority(&mut req);
            let Some(client) = tls else {
                // cogmesh's own client takes `:authority` from the URI (without a copy), else
                // this one, and `:path` from the URI.
                let otherwise = from_host.as_ref().unwrap_or(&endpoint.authority);
                let (addr, timeout) = (endpoint.addr, self.http1.connect_timeout);
                let response = http2::send(&endpoint.http2, index, addr, otherwise, timeout, req).await?;
                return Ok((response.map(Either::Right), None));
            };
            let authority = req.uri().authority().cloned();
            let authority = authority
                .or(from_host)
                .unwrap_or_else(|| endpoint.authority.clone());
            // hyper's client takes both from an absolute URI; the endpoint's clients dial the
            // endpoint whatever the authority.
            let uri = Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query(origin_form(req.uri()))
                .build()
                .expect("scheme, authority and path are valid");
            *req.uri_mut() = uri;
            let clients = client.http2_clients(endpoint.addr);
            let response = clients[index.min(clients.len() - 1)].request(req).await;
            return match response {
                Ok(r) => Ok((r.map(Either::Left), None)),
                Err(e) => Err(ProxyError::from_client(endpoint.addr, &e)),
            };
        }
        *req.uri_mut() = Uri::from(origin_form(req.uri()));
        if !req.headers().contains_key(HOST) {
            let host =
                HeaderValue::from_str(endpoint.authority.as_str()).expect("an authority is a valid header");
            req.headers_mut().insert(HOST, host);
        }
        let (response, lease) = pool::send(endpoint, req, self.http1, tls, breaker).await?;
        Ok((response.map(Either::Left), Some(lease)))
    }
}

/// For a request going on over HTTP/2, where the client's authority is `:authority` (RFC 9113
/// §8.3.1), as Envoy and Linkerd keep it: takes `Host` out of the headers (a `Host` beside
/// `:authority` must not differ from it) and gives its value when the URI names no authority
/// (an HTTP/1.1 client in origin form, an HTTP/2 client that sent `host` only).
fn host_authority<B>(req: &mut Request<B>) -> Option<http::uri::Authority> {
    let host = req.headers_mut().remove(HOST)?;
    if req.uri().authority().is_some() {
        return None;
    }
    http::uri::Authority::try_from(host.as_bytes()).ok()
}

/// The path and query of `uri`, `/` when it has none.
fn origin_form(uri: &Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// What every connection of a worker shares: one `Arc` to clone per request instead of the
/// table and every pooled client.
pub struct Shared {
    pub table: SharedTable,
    pub upstreams: Upstreams,
    pub limits: crate::hardening::LimitsConfig,
    /// Spans and the access log (each `None` when off).
    pub observe: crate::observe::Observe,
}

/// The hyper service of one accepted connection.
#[derive(Clone)]
pub struct Forward {
    shared: Arc<Shared>,
    listener: usize,
    client_ip: HeaderValue,
    /// Transparent mode: the service the connection's original destination belongs to; its
    /// requests go there whatever the routes say.
    pinned: Option<Arc<str>>,
    /// The peer's verified identity on a TLS listener.
    identity: Option<Arc<PeerIdentity>>,
    peer_ip: std::net::IpAddr,
}

impl Forward {
    pub fn new(
        shared: Arc<Shared>,
        listener: usize,
        peer: SocketAddr,
        identity: Option<PeerIdentity>,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header value");
        Forward {
            shared,
            listener,
            client_ip,
            pinned: None,
            identity: identity.map(Arc::new),
            peer_ip: peer.ip(),
        }
    }

    /// Sends every request of the connection to `service` (see [`crate::transparent`]).
    pub fn pinned_to(mut self, service: Option<Arc<str>>) -> Self {
        self.pinned = service;
        self
    }

    async fn forward(self, req: Request<DownstreamBody>) -> Response<ProxyBody> {
        let start = Instant::now();
        let Some(begun) = self.shared.observe.begin(&req, start) else {
            return self.route_and_send(req, start, None).await;
        };
        let response = self.route_and_send(req, start, Some(&begun)).await;
        if !begun.records() {
            return response;
        }
        let table = self.shared.table.load();
        let listener = &table.listeners[self.listener];
        let (name, direction) = (listener.name.as_str(), listener.direction.as_str());
        self.shared
            .observe
            .finish(begun, &response, self.peer_ip, (name, direction));
        response
    }

    async fn route_and_send(
        &self,
        req: Request<DownstreamBody>,
        start: Instant,
        begun: Option<&crate::observe::Begun>,
    ) -> Response<ProxyBody> {
        let table = self.shared.table.load_full();
        let routes = &table.listeners[self.listener];
        let matched = match &self.pinned {
            None => table.route_match(self.listener, &req),
            Some(name) => crate::route::RouteMatch {
                service: table.services.iter().position(|s| *s.name == **name),
                rate_limit: None,
                priority: None,
                retry_non_idempotent: false,
                policy: None,
                access: None,
                route: None,
            },
        };
        let route = matched.service;
        let peer = self.identity.as_deref();
        if let Err(err) = crate::tls::authz::authorize(&table, self.listener, &matched, peer) {
            let metrics = route.map_or(&routes.unrouted, |i| &routes.metrics[i]);
            return Self::answer_error(metrics, start, &err, is_grpc(&req));
        }
        let client = crate::ratelimit::Client {
            ip: self.client_ip.as_bytes(),
            identity: self.identity.as_ref().and_then(|p| p.id.as_deref()),
        };
        let limited = crate::ratelimit::admit(
            [routes.rate_limit.as_deref(), matched.rate_limit],
            req.headers(),
            client,
        );
        if let Err(decision) = limited {
            let metrics = route.map_or(&routes.unrouted, |i| &routes.metrics[i]);
            let err = ProxyError::RateLimited(decision);
            return Self::answer_error(metrics, start, &err, is_grpc(&req));
        }
        let Some(index) = route else {
            let err = ProxyError::NoRoute;
            debug!(error = err.kind().label(), uri = %req.uri(), "{err}");
            return Self::answer_error(&routes.unrouted, start, &err, is_grpc(&req));
        };
        if let Some(b) = begun {
            b.routed(&table, index, matched.route);
        }
        let span = begun.and_then(|b| b.span.as_ref());
        let any_method = matched.retry_non_idempotent;
        let metrics = &routes.metrics[index];
        metrics.requests.inc();
        let grpc = is_grpc(&req);
        let priority = crate::admission::Priority::of(req.headers(), matched.priority);
        let admitted = match table.admission.as_ref() {
            None => None,
            Some(a) => Some(a.admit(priority).await),
        };
        let admitted = match admitted {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(retry_after_secs)) => {
                let err = ProxyError::Shed {
                    priority,
                    retry_after_secs,
                };
                return Self::answer_error(metrics, start, &err, grpc);
            }
        };
        if crate::hardening::too_many_headers(req.headers(), &self.shared.limits) {
            let err = ProxyError::TooManyHeaders {
                limit: self.shared.limits.max_request_headers,
            };
            return Self::answer_error(metrics, start, &err, grpc);
        }
        let result = match matched.policy {
            None => {
                self.exchange(&table, index, req.map(Either::Left), any_method, span)
                    .await
            }
            // Boxed: with the cache and compression this future is larger than the plain
            // exchange's, and inline it would make every request's future as large (and copied
            // whole when the future is queued).
            Some(policy) => Box::pin(self.with_policy(policy, &table, index, req, any_method, span)).await,
        };
        let mut response = match result {
            Ok(response) => {
                metrics.latency.observe(start.elapsed());
                metrics.response(response.status().as_u16());
                response.map(|b| b.with_admission(admitted))
            }
            Err(err) => Self::answer_error(metrics, start, &err, grpc),
        };
        if let Some(headers) = matched.access.and_then(|a| a.security_headers.as_ref()) {
            headers.apply(response.headers_mut());
        }
        response
    }

    /// The exchange of a route with a policy: request decompression, then the cache (which may
    /// answer without the upstream), then response compression.
    async fn with_policy(
        &self,
        policy: &RoutePolicy,
        table: &RoutingTable,
        index: usize,
        req: Request<DownstreamBody>,
        retry_any_method: bool,
        span: Option<&crate::otel::ServerSpan>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let method = req.method().clone();
        let compression = policy.compression.as_ref();
        let accept = compression.and_then(|_| req.headers().get(ACCEPT_ENCODING).cloned());
        let decode = compression
            .filter(|c| c.decompress_requests)
            .and_then(|_| compress::request_encoding(req.headers()));
        let req = match decode {
            Some(encoding) => {
                let (mut parts, body) = req.into_parts();
                compress::rewrite_for_decoding(&mut parts.headers);
                Request::from_parts(parts, Either::Right(compress::decode(body, encoding)))
            }
            None => req.map(Either::Left),
        };
        let exchange = |req| self.exchange(table, index, req, retry_any_method, span);
        let response = match &policy.cache {
            Some(cache) => cache.serve(req, exchange).await?,
            None => exchange(req).await?,
        };
        Ok(match compression {
            Some(c) => c.apply(&method, accept.as_ref(), response, |body, encoding| {
                ProxyBody::Coded(compress::encode(body, encoding))
            }),
            None => response,
        })
    }

    /// One upstream exchange: its attempts (retries per the service's policy, see
    /// [`crate::retry`], each on another endpoint when there is one) within the service's
    /// request timeout, and what each attempt tells the balancer and the outlier detector.
    /// `retry_any_method`: the route lets non-idempotent requests be retried too.
    async fn exchange(
        &self,
        table: &RoutingTable,
        index: usize,
        req: Request<UpstreamBody>,
        retry_any_method: bool,
        span: Option<&crate::otel::ServerSpan>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let metrics = &table.listeners[self.listener].metrics[index];
        let tracer = span.and(self.shared.observe.tracer.as_deref());
        let service = &table.services[index];
        let upgrade = headers::is_upgrade(&req);
        let grpc = is_grpc(&req);
        // With an idle timeout, the request body marks the stream active as it streams.
        let activity = service
            .stream_idle_timeout
            .filter(|_| !upgrade)
            .map(|_| idle::Activity::new());
        let req = match &activity {
            Some(activity) => {
                activity.touch();
                let activity = Arc::clone(activity);
                req.map(|b| Either::Right(idle::ActiveBody::new(b, activity).boxed_unsync()))
            }
            None => req,
        };
        let mut avoid = None;
        let mut _retry_permit = None;
        let attempts = async {
            let (mut attempts, mut req) = crate::retry::Attempts::prepare(
                &service.retry,
                &service.retry_budget,
                &service.breaker,
                req,
                crate::retry::Eligibility {
                    upgrade,
                    grpc,
                    any_method: retry_any_method,
                },
            )
            .await;
            loop {
                let attempt_start = Instant::now();
                let client_span = match (tracer, span) {
                    (Some(t), Some(s)) => {
                        let method = req.method().clone();
                        t.start_client(s, &method, req.headers_mut())
                    }
                    _ => None,
                };
                let (outcome, endpoint) = match self
                    .send(table, index, metrics, req, avoid, activity.as_ref())
                    .await
                {
                    Ok((response, endpoint)) => (Ok(response), Some(endpoint)),
                    Err((err, endpoint)) => (Err(err), endpoint),
                };
                if let (Some(t), Some(s), Some(c)) = (tracer, span, client_span) {
                    t.end_client(
                        s,
                        c,
                        &client_outcome(&service.name, &outcome, endpoint.as_deref()),
                    );
                }
                let retriable = match &outcome {
                    Ok(response) => attempts.retries_response(response),
                    Err(err) => matches!(err.kind(), ErrorKind::UpstreamConnect | ErrorKind::UpstreamReset),
                };
                self.observe_attempt(service, &outcome, endpoint.as_deref(), attempt_start);
                if retriable {
                    match attempts.next_attempt() {
                        Ok(Some((next, permit, wait))) => {
                            debug!(service = %service.name, "retrying after {} ms", wait.as_millis());
                            metrics.retry(crate::retry::RETRY_SENT);
                            _retry_permit = Some(permit);
                            avoid = endpoint.map(|e| e.addr);
                            tokio::time::sleep(wait).await;
                            req = next;
                            continue;
                        }
                        Ok(None) => {}
                        Err(refusal) => metrics.retry(refusal.label()),
                    }
                }
                return outcome;
            }
        };
        match service.request_timeout {
            None => attempts.await,
            Some(after) => tokio::time::timeout(after, attempts).await.unwrap_or_else(|_| {
                let err = ProxyError::RequestTimeout { after };
                warn!(service = %service.name, error = err.kind().label(), "{err}");
                Err(err)
            }),
        }
    }

    /// What one attempt tells the balancer and the outlier detector about its endpoint.
    fn observe_attempt(
        &self,
        service: &crate::route::Service,
        outcome: &Result<Response<ProxyBody>, ProxyError>,
        endpoint: Option<&Endpoint>,
        attempt_start: Instant,
    ) {
        let Some(endpoint) = endpoint else {
            if let Err(err) = outcome {
                let kind = err.kind();
                // Overload refusals come in floods: one warning each would flood the log too.
                if kind == ErrorKind::Overloaded {
                    debug!(service = %service.name, error = kind.label(), "{err}");
                } else {
                    warn!(service = %service.name, error = kind.label(), "{err}");
                }
            }
            return;
        };
        let elapsed = attempt_start.elapsed();
        match outcome {
            Ok(response) => {
                let retry_after = response.headers().get(http::header::RETRY_AFTER);
                observe_answer(
                    service,
                    endpoint,
                    response.status().as_u16(),
                    retry_after.map(HeaderValue::as_bytes),
                    elapsed,
                );
            }
            Err(err) => {
                observe_failure(service, endpoint, err.kind(), elapsed);
                warn!(service = %service.name, error = err.kind().label(), "{err}");
            }
        }
    }

    /// Counts a request the proxy failed itself and makes its response.
    fn answer_error(
        metrics: &ServiceMetrics,
        start: Instant,
        err: &ProxyError,
        grpc: bool,
    ) -> Response<ProxyBody> {
        let kind = err.kind();
        metrics.error(kind);
        metrics.latency.observe(start.elapsed());
        metrics.response(kind.status().as_u16());
        error_response(err, grpc)
    }

    async fn send(
        &self,
        table: &RoutingTable,
        index: usize,
        metrics: &ServiceMetrics,
        mut req: Request<UpstreamBody>,
        avoid: Option<SocketAddr>,
        activity: Option<&Arc<idle::Activity>>,
    ) -> Result<(Response<ProxyBody>, Arc<Endpoint>), (ProxyError, Option<Arc<Endpoint>>)> {
        let service = &table.services[index];
        let mut permit = match service.breaker.try_request() {
            Ok(p) => p,
            Err(threshold) => {
                let service = service.name.clone();
                return Err((ProxyError::Overloaded { service, threshold }, None));
            }
        };
        let hash = service.hash_of(&req);
        // A retry goes to another endpoint when the balancer offers one within a few draws.
        let mut picked = service.endpoints.pick(hash);
        for _ in 0..3 {
            match picked {
                Some(e) if Some(e.addr) == avoid && service.endpoints.available() > 1 => {
                    picked = service.endpoints.pick(hash);
                }
                _ => break,
            }
        }
        let Some(endpoint) = picked else {
            let err = ProxyError::NoEndpoints {
                service: service.name.clone(),
            };
            return Err((err, None));
        };
        let endpoint = Arc::clone(endpoint);

        let upgrade = headers::is_upgrade(&req);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let use_http2 = !upgrade
            && match service.protocol {
                UpstreamProtocol::Auto => parts.version == Version::HTTP_2,
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::Http2 => true,
            };

        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if !use_http2 && !parts.headers.contains_key(HOST) {
            // HTTP/2 → HTTP/1.1: the authority moves to the Host header.
            if let Some(authority) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        headers::set_forwarded(&mut parts.headers, &self.client_ip);

        parts.version = if use_http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        let open = endpoint.in_flight();
        let in_flight = InFlight::start(Arc::clone(&endpoint));
        let pending = self.shared.upstreams.send(
            &endpoint,
            open,
            Request::from_parts(parts, body),
            &service.origination,
            &service.breaker,
        );
        let result = match service.response_timeout {
            Some(after) => match tokio::time::timeout(after, pending).await {
                Ok(result) => result,
                Err(_) => {
                    let err = ProxyError::UpstreamTimeout {
                        endpoint: endpoint.addr,
                        after,
                    };
                    return Err((err, Some(endpoint)));
                }
            },
            None => pending.await,
        };
        permit.answered();
        let (mut response, lease) = match result {
            Ok(r) => r,
            // Refused by our own max_connections: nothing to hold against the endpoint.
            Err(e) if e.kind() == ErrorKind::Overloaded => return Err((e, None)),
            Err(e) => return Err((e, Some(endpoint))),
        };

        let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(downstream)) = (switched, downstream_upgrade) {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(splice(downstream, upstream));
        }
        headers::strip_hop_by_hop(response.headers_mut(), switched);
        // After a protocol switch the connection belongs to the spliced streams.
        let lease = lease.filter(|_| !switched);

        record_load_report(&endpoint, metrics, orca::from_headers(response.headers()));
        if !service.forward_load_reports {
            response.headers_mut().remove(orca::LOAD_HEADER);
        }
        // gRPC carries its report in the trailers.
        let trailer_reports = is_grpc(&response).then(|| TrailerReports {
            strip: !service.forward_load_reports,
            accepted: metrics.load_reports_accepted.clone(),
            rejected: metrics.load_reports_rejected.clone(),
        });
        let held = Held {
            breaker: Some(permit),
            admission: None,
        };
        let idle = activity
            .zip(service.stream_idle_timeout)
            .map(|(activity, after)| {
                activity.touch();
                idle::IdleTimer::new(Arc::clone(activity), after, metrics.stream_idle_timeouts.clone())
            });
        Ok((
            response.map(|b| {
                ProxyBody::upstream(b, in_flight, trailer_reports, lease)
                    .holding(held)
                    .with_idle_timer(idle)
            }),
            endpoint,
        ))
    }
}

impl hyper::service::Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req.map(Either::Left)).await) })
    }
}

/// What an answer of `endpoint` (its status and `Retry-After`, `elapsed` after the request
/// went out) tells the balancer and the outlier detector.
///
/// An endpoint that asks us to back off is backed off for the time it asked (bounded), so the
/// balancer moves traffic away from it for that long. Its refusal is neither a latency sample
/// nor an outlier's failure: the endpoint is alive and full, and ejecting it (30 s and more)
/// would take its capacity away exactly when the service is short of capacity.
fn observe_answer(
    service: &crate::route::Service,
    endpoint: &Endpoint,
    status: u16,
    retry_after: Option<&[u8]>,
    elapsed: Duration,
) {
    let backoff = matches!(status, 429 | 503)
        .then_some(retry_after)
        .flatten()
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        .map(retry_after_penalty);
    let failed = (500..600).contains(&status);
    if failed {
        endpoint.record_failure();
    }
    match backoff {
        Some(backoff) => {
            endpoint.back_off(backoff);
            endpoint.latency().observe(elapsed);
        }
        None => {
            endpoint.observe_rtt(elapsed);
            service.endpoints.observe_outcome(endpoint, failed);
        }
    }
}

/// What a failed attempt (no answer: `kind`, after `elapsed`) tells the balancer and the
/// outlier detector; a gateway failure also holds the endpoint at full load and ejects it.
fn observe_failure(service: &crate::route::Service, endpoint: &Endpoint, kind: ErrorKind, elapsed: Duration) {
    endpoint.record_failure();
    if matches!(kind, ErrorKind::UpstreamTimeout | ErrorKind::UpstreamConnect) {
        service.endpoints.gateway_failure(endpoint, elapsed);
    }
    service.endpoints.observe_outcome(endpoint, true);
}

/// What a response's load report tells the balancer, counted as accepted or rejected (a
/// malformed report is ignored, never a failed request).
fn record_load_report(
    endpoint: &Endpoint,
    metrics: &ServiceMetrics,
    report: Result<Option<orca::LoadReport>, orca::ReportError>,
) {
    match report {
        Ok(None) => {}
        Ok(Some(report)) => {
            if let Some(load) = report.load() {
                endpoint.observe_load(load);
            }
            metrics.load_reports_accepted.inc();
        }
        Err(e) => {
            debug!(endpoint = %endpoint.addr, "ignoring load report: {e}");
            metrics.load_reports_rejected.inc();
        }
    }
}

/// What an attempt's CLIENT span records.
fn client_outcome<'a>(
    service: &'a str,
    outcome: &Result<Response<ProxyBody>, ProxyError>,
    endpoint: Option<&Endpoint>,
) -> crate::otel::ClientOutcome<'a> {
    crate::otel::ClientOutcome {
        service,
        endpoint: endpoint.map(|e| e.addr),
        status: outcome.as_ref().ok().map(|r| r.status().as_u16()),
        error: outcome.as_ref().err().map(|e| e.kind().label()),
    }
}

fn is_grpc(msg: &impl HasHeaders) -> bool {
    msg.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

trait HasHeaders {
    fn headers(&self) -> &http::HeaderMap;
}

impl<B> HasHeaders for Request<B> {
    fn headers(&self) -> &http::HeaderMap {
        Request::headers(self)
    }
}

impl<B> HasHeaders for Response<B> {
    fn headers(&self) -> &http::HeaderMap {
        Response::headers(self)
    }
}

/// The response for a request the proxy failed: the status of the cause, a plain-text body
/// naming it, and `x-cogmesh-error` with the metric label. gRPC callers also get `grpc-status`
/// UNAVAILABLE (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) and `grpc-message`, so their status says
/// why. A rate-limited request also gets `Retry-After` and `RateLimit-*`.
fn error_response(err: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let kind = err.kind();
    let text = format!("cogmesh: {err}\n");
    // A gRPC error with HTTP 200 is trailers-only: no body, gRPC's content type.
    let (grpc_code, grpc_status) = kind.grpc();
    let trailers_only = grpc && grpc_status == StatusCode::OK;
    let mut builder = Response::builder()
        .status(kind.status())
        .header(
            CONTENT_TYPE,
            if trailers_only {
                "application/grpc"
            } else {
                "text/plain; charset=utf-8"
            },
        )
        .header(crate::error::ERROR_HEADER, kind.label());
    match err {
        ProxyError::RateLimited(d) => builder = crate::ratelimit::add_headers(builder, d),
        ProxyError::Overloaded { .. } => builder = builder.header("x-cogmesh-overloaded", "true"),
        ProxyError::Shed { retry_after_secs, .. } => {
            builder = builder.header(http::header::RETRY_AFTER, *retry_after_secs)
        }
        _ => {}
    }
    if grpc {
        builder = builder.status(grpc_status).header("grpc-status", grpc_code);
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(text.trim_end())) {
            builder = builder.header("grpc-message", v);
        }
    }
    let body = if trailers_only { String::new() } else { text };
    builder
        .body(ProxyBody::local(body.into()))
        .expect("status and headers are valid")
}

/// `grpc-message` is percent-encoded outside printable ASCII (and `%` itself).
fn percent_encode_grpc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Copies bytes both ways between the two halves of an upgraded connection until both close.
async fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::join!(downstream, upstream) {
        (Ok(down), Ok(up)) => {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                debug!("upgraded connection ended: {e}");
            }
        }
        (down, up) => warn!(
            downstream_ok = down.is_ok(),
            upstream_ok = up.is_ok(),
            "connection upgrade failed"
        ),
    }
}
