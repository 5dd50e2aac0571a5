//! The routing table: which service a request goes to, and each service's endpoints.
//!
//! A [`RoutingTable`] is immutable. The proxy keeps the current one behind
//! `arc_swap::ArcSwap`; each request loads it without locking, and a new configuration (or,
//! later, the control plane) stores a whole new table built by [`RoutingTable::build`], which
//! carries endpoint statistics over from the previous table.
//!
//! A route may carry a [`RoutePolicy`] (compression, cache). It is built with the table, so a
//! reload applies new settings atomically; a route's cache survives a reload that keeps its
//! name and cache settings.
//!
//! A route may also carry a [`RouteAccess`]: who may use it (identity-based authorization,
//! see [`crate::tls::authz`]) and the security headers its responses get. A service with `tls`
//! carries its TLS client ([`Origination`]), kept across rebuilds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use serde::Serialize;

use crate::balance::{EndpointSet, EndpointSnapshot};
use crate::cache::RouteCache;
use crate::compress::Compression;
use crate::config::{Direction, HashKey, ProxyConfig, UpstreamProtocol};
use crate::metrics::{Metrics, ServiceMetrics};
use crate::ratelimit::RateLimiter;

/// The service label of requests that matched no route.
pub const UNROUTED_SERVICE: &str = "unknown";

/// Endpoints (with weights) of services, as pushed by the control plane; they replace the
/// configured endpoints of the services they name.
pub type EndpointOverrides = HashMap<String, Vec<(std::net::SocketAddr, f64)>>;

pub struct RoutingTable {
    /// Local version: bumped by every rebuild.
    pub version: u64,
    /// The control-plane table version this table applies (0: configuration only).
    pub control_version: u64,
    pub services: Vec<Service>,
    routes: Vec<Route>,
    pub listeners: Vec<ListenerRoutes>,
    /// The instance's concurrency limit, if configured.
    pub admission: Option<Arc<crate::admission::Admission>>,
    /// Where authorization denials of connections without an identity are counted.
    pub tls_metrics: crate::tls::TlsMetrics,
}

pub struct Service {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub response_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub endpoints: EndpointSet,
    pub hash_key: Option<HashKey>,
    pub forward_load_reports: bool,
    pub breaker: Arc<crate::breaker::Breaker>,
    pub retry: crate::retry::RetryConfig,
    /// Kept across reloads for a service that stays.
    pub retry_budget: Arc<crate::retry::Budget>,
    pub origination: Origination,
}

/// How a service's endpoints are reached.
#[derive(Clone)]
pub enum Origination {
    Plaintext,
    Tls(Arc<crate::tls::client::ServiceTlsClient>),
    /// The service asks for TLS but the table was built without the sidecar's identity:
    /// requests fail rather than go out in plaintext.
    Unavailable,
}

/// Who may use a route and what its responses get.
pub struct RouteAccess {
    pub authorization: Option<crate::tls::authz::Authorization>,
    pub security_headers: Option<crate::security_headers::SecurityHeaders>,
}

/// Per listener: the default service and the metric handles of every service seen through it.
pub struct ListenerRoutes {
    pub name: String,
    pub direction: Direction,
    default_service: Option<usize>,
    /// Indexed like `RoutingTable::services`.
    pub metrics: Vec<ServiceMetrics>,
    pub unrouted: ServiceMetrics,
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// For requests that match no route with its own authorization.
    pub authorization: Option<crate::tls::authz::Authorization>,
}

struct Route {
    /// The route's `name`, else `routes[i]` (spans and the access log).
    name: Arc<str>,
    host: Option<String>,
    path_prefix: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    service: usize,
    /// `None` when the route neither compresses nor caches: the request path pays one check.
    policy: Option<Arc<RoutePolicy>>,
    rate_limit: Option<Arc<RateLimiter>>,
    priority: Option<crate::admission::Priority>,
    retry_non_idempotent: bool,
    access: Option<RouteAccess>,
}

/// What a route does to responses besides forwarding them.
pub struct RoutePolicy {
    /// The `route` metric label: the route's name, else `routes[i]`.
    pub label: String,
    pub compression: Option<Compression>,
    pub cache: Option<Arc<RouteCache>>,
}

/// What routing found for a request.
pub struct RouteMatch<'a> {
    /// The service index, `None` without a route and a default service.
    pub service: Option<usize>,
    pub rate_limit: Option<&'a RateLimiter>,
    pub priority: Option<crate::admission::Priority>,
    /// The route lets requests of any method be retried.
    pub retry_non_idempotent: bool,
    /// The matched route's compression and cache, if any.
    pub policy: Option<&'a Arc<RoutePolicy>>,
    /// The matched route's authorization and security headers, if any.
    pub access: Option<&'a RouteAccess>,
    /// The matched route's name (`routes[i]` without one); `None` for the default service.
    pub route: Option<&'a Arc<str>>,
}

impl RoutingTable {
    /// Builds a table from a validated configuration, reusing endpoint statistics of `previous`.
    pub fn build(config: &ProxyConfig, previous: Option<&RoutingTable>, metrics: &Metrics) -> Self {
        Self::build_with(config, previous, metrics, &EndpointOverrides::new(), 0, None)
    }

    /// Like [`RoutingTable::build`], with the endpoints of some services replaced.
    pub fn build_with(
        config: &ProxyConfig,
        previous: Option<&RoutingTable>,
        metrics: &Metrics,
        overrides: &EndpointOverrides,
        control_version: u64,
        tls: Option<&crate::tls::client::Origin>,
    ) -> Self {
        let old: HashMap<&str, &Service> = previous
            .map(|p| p.services.iter().map(|s| (s.name.as_str(), s)).collect())
            .unwrap_or_default();
        let pushed_only = crate::transparent::pushed_services(config, overrides);
        let services: Vec<Service> = config
            .services
            .iter()
            .chain(&pushed_only)
            .map(|s| Service {
                name: s.name.clone(),
                protocol: s.protocol,
                response_timeout: (s.response_timeout_ms > 0)
                    .then(|| Duration::from_millis(s.response_timeout_ms)),
                request_timeout: (s.request_timeout_ms > 0)
                    .then(|| Duration::from_millis(s.request_timeout_ms)),
                stream_idle_timeout: (s.stream_idle_timeout_ms > 0)
                    .then(|| Duration::from_millis(s.stream_idle_timeout_ms)),
                endpoints: EndpointSet::rebuild(
                    old.get(s.name.as_str()).map(|o| &o.endpoints),
                    &overrides
                        .get(&s.name)
                        .cloned()
                        .unwrap_or_else(|| s.endpoints.iter().map(|a| (*a, 1.0)).collect()),
                    s.balancer,
                    Duration::from_millis(s.load_report_stale_ms),
                )
                .with_outlier(s.outlier_detection.clone()),
                hash_key: s.hash_key.clone(),
                forward_load_reports: s.forward_load_reports,
                retry: s.retry.clone(),
                retry_budget: old
                    .get(s.name.as_str())
                    .map(|o| Arc::clone(&o.retry_budget))
                    .unwrap_or_default(),
                breaker: crate::breaker::Breaker::reuse_or_new(
                    &s.name,
                    old.get(s.name.as_str()).map(|o| &o.breaker),
                    &s.circuit_breaker,
                    || metrics.breaker_overflow(&s.name),
                ),
                origination: origination(s, old.get(s.name.as_str()).copied(), tls),
            })
            .collect();
        let index: HashMap<&str, usize> = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let old_caches: HashMap<&str, &Arc<RouteCache>> = previous
            .map(|p| {
                p.routes
                    .iter()
                    .filter_map(|r| r.policy.as_ref())
                    .filter_map(|p| Some((p.label.as_str(), p.cache.as_ref()?)))
                    .collect()
            })
            .unwrap_or_default();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route {
                name: r.name.clone().unwrap_or_else(|| format!("routes[{i}]")).into(),
                priority: r.priority,
                retry_non_idempotent: r.retry_non_idempotent,
                rate_limit: r.rate_limit.as_ref().map(|c| {
                    let name = r.name.clone().unwrap_or_else(|| format!("routes[{i}]"));
                    let kept = previous
                        .and_then(|p| p.routes.get(i))
                        .and_then(|p| p.rate_limit.as_ref());
                    RateLimiter::reuse_or_new(kept, c, || metrics.rate_limited("route", &name))
                }),
                host: r.matches.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.matches.path_prefix.clone(),
                headers: r
                    .matches
                    .headers
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            HeaderName::from_bytes(k.as_bytes()).ok()?,
                            HeaderValue::from_str(v).ok()?,
                        ))
                    })
                    .collect(),
                service: index[r.service.as_str()],
                policy: route_policy(i, r, &old_caches, metrics),
                access: (r.authorization.is_some() || r.security_headers.is_some()).then(|| RouteAccess {
                    authorization: r
                        .authorization
                        .as_ref()
                        .map(crate::tls::authz::Authorization::new),
                    security_headers: r
                        .security_headers
                        .as_ref()
                        .map(crate::security_headers::SecurityHeaders::new),
                }),
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let direction = l.direction.as_str();
                ListenerRoutes {
                    name: l.name.clone(),
                    direction: l.direction,
                    default_service: l.default_service.as_ref().map(|s| index[s.as_str()]),
                    metrics: services
                        .iter()
                        .map(|s| metrics.service(direction, &s.name))
                        .collect(),
                    unrouted: metrics.service(direction, UNROUTED_SERVICE),
                    rate_limit: l.rate_limit.as_ref().map(|c| {
                        let kept = previous
                            .and_then(|p| p.listeners.iter().find(|o| o.name == l.name))
                            .and_then(|o| o.rate_limit.as_ref());
                        RateLimiter::reuse_or_new(kept, c, || metrics.rate_limited("listener", &l.name))
                    }),
                    authorization: l
                        .authorization
                        .as_ref()
                        .map(crate::tls::authz::Authorization::new),
                }
            })
            .collect();
        let admission = config.admission.as_ref().map(|c| {
            crate::admission::Admission::reuse_or_new(previous.and_then(|p| p.admission.as_ref()), c, || {
                metrics.admission()
            })
        });
        RoutingTable {
            tls_metrics: metrics.tls.clone(),
            admission,
            version: previous.map_or(1, |p| p.version + 1),
            control_version,
            services,
            routes,
            listeners,
        }
    }

    /// The index of the service a request on `listener` goes to.
    pub fn route<B>(&self, listener: usize, req: &Request<B>) -> Option<usize> {
        self.route_match(listener, req).service
    }

    /// Like [`RoutingTable::route`], with the matched route's rate limiter, priority and
    /// response policy.
    pub fn route_match<B>(&self, listener: usize, req: &Request<B>) -> RouteMatch<'_> {
        self.route_match_by(listener, &ParsedRequest(req))
    }

    /// [`Self::route_match`] over what a request head says, however it was parsed (the
    /// HTTP/1.1 relay matches on the raw head, without building a `Request`).
    pub fn route_match_by(&self, listener: usize, req: &impl RouteInput) -> RouteMatch<'_> {
        match self.matched_route(req) {
            Some(r) => RouteMatch {
                service: Some(r.service),
                rate_limit: r.rate_limit.as_deref(),
                priority: r.priority,
                retry_non_idempotent: r.retry_non_idempotent,
                policy: r.policy.as_ref(),
                access: r.access.as_ref(),
                route: Some(&r.name),
            },
            None => RouteMatch {
                service: self.listeners[listener].default_service,
                rate_limit: None,
                priority: None,
                retry_non_idempotent: false,
                policy: None,
                access: None,
                route: None,
            },
        }
    }

    fn matched_route(&self, req: &impl RouteInput) -> Option<&Route> {
        if self.routes.is_empty() {
            return None;
        }
        let host = req.host().map(strip_port);
        for r in &self.routes {
            if let Some(h) = &r.host {
                match host {
                    Some(got) if got.eq_ignore_ascii_case(h) => {}
                    _ => continue,
                }
            }
            if let Some(p) = &r.path_prefix {
                if !req.path().starts_with(p.as_str()) {
                    continue;
                }
            }
            if r.headers.iter().all(|(k, v)| req.header(k) == Some(v.as_bytes())) {
                return Some(r);
            }
        }
        None
    }

    /// Whether some route matches on request headers (the relay then looks them up).
    pub fn routes_on_headers(&self) -> bool {
        self.routes.iter().any(|r| !r.headers.is_empty())
    }

    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot {
            version: self.version,
            control_version: self.control_version,
            services: self
                .services
                .iter()
                .map(|s| ServiceSnapshot {
                    name: s.name.clone(),
                    balancer: s.endpoints.kind().as_str(),
                    endpoints: s.endpoints.snapshots(),
                })
                .collect(),
        }
    }
}

impl Service {
    /// The request's affinity key for `ring_hash`, hashed.
    pub fn hash_of<B>(&self, req: &Request<B>) -> Option<u64> {
        let key = self.hash_key.as_ref()?;
        let value: &[u8] = match key {
            HashKey::Header(name) => req.headers().get(name.as_str())?.as_bytes(),
            HashKey::Cookie(name) => req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| *k == name)?
                .1
                .as_bytes(),
        };
        Some(crate::balance::stable_hash(value))
    }
}

/// How a service's endpoints are reached: its TLS client is kept across rebuilds (its settings
/// cannot change without a restart, see `crate::reload`).
fn origination(
    s: &crate::config::ServiceConfig,
    old: Option<&Service>,
    tls: Option<&crate::tls::client::Origin>,
) -> Origination {
    let Some(settings) = &s.tls else {
        return Origination::Plaintext;
    };
    match (old.map(|o| &o.origination), tls) {
        (Some(Origination::Tls(client)), _) if client.settings == *settings => {
            Origination::Tls(Arc::clone(client))
        }
        (_, Some(origin)) => Origination::Tls(Arc::new(crate::tls::client::ServiceTlsClient::new(
            settings,
            origin.clone(),
        ))),
        (_, None) => Origination::Unavailable,
    }
}

/// The policy of route `i`, reusing the previous table's cache of the same route when its
/// settings did not change.
fn route_policy(
    i: usize,
    r: &crate::config::RouteConfig,
    old_caches: &HashMap<&str, &Arc<RouteCache>>,
    metrics: &Metrics,
) -> Option<Arc<RoutePolicy>> {
    if r.compression.is_none() && r.cache.is_none() {
        return None;
    }
    let label = r.name.clone().unwrap_or_else(|| format!("routes[{i}]"));
    let compression = r
        .compression
        .as_ref()
        .map(|c| Compression::new(c, |e| metrics.compressed_responses(&label, e.token())));
    let cache = r.cache.as_ref().map(|c| match old_caches.get(label.as_str()) {
        Some(old) if old.config == *c => Arc::clone(old),
        _ => RouteCache::new(c, metrics.cache(&label)),
    });
    Some(Arc::new(RoutePolicy {
        label,
        compression,
        cache,
    }))
}

/// What route matching reads of a request: the host it names (the URI's, from HTTP/2
/// `:authority` or an absolute-form target, else the `Host` header, which may carry a port that
/// matching strips), its path, and the first value of a header.
pub trait RouteInput {
    fn host(&self) -> Option<&str>;
    fn path(&self) -> &str;
    fn header(&self, name: &HeaderName) -> Option<&[u8]>;
}

struct ParsedRequest<'a, B>(&'a Request<B>);

impl<B> RouteInput for ParsedRequest<'_, B> {
    fn host(&self) -> Option<&str> {
        match self.0.uri().host() {
            Some(h) => Some(h),
            None => self.0.headers().get(http::header::HOST)?.to_str().ok(),
        }
    }

    fn path(&self) -> &str {
        self.0.uri().path()
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.0.headers().get(name).map(HeaderValue::as_bytes)
    }
}

/// A host without its port, but a bracketed IPv6 literal whole.
fn strip_port(raw: &str) -> &str {
    match raw.rfind(':') {
        Some(i) if !raw.ends_with(']') && !raw[..i].contains(':') => &raw[..i],
        _ => raw,
    }
}

#[derive(Serialize)]
pub struct TableSnapshot {
    pub version: u64,
    pub control_version: u64,
    pub services: Vec<ServiceSnapshot>,
}

#[derive(Serialize)]
pub struct ServiceSnapshot {
    pub name: String,
    pub balancer: &'static str,
    pub endpoints: Vec<EndpointSnapshot>,
}

/// The shared, swappable current table.
pub type SharedTable = Arc<arc_swap::ArcSwap<RoutingTable>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        let c = ProxyConfig::from_yaml(
            "t.yaml",
            r#"
listeners:
  - { name: out, address: "127.0.0.1:4140", default_service: web }
services:
  - { name: web, endpoints: ["127.0.0.1:8080"] }
  - { name: api }
routes:
  - { match: { host: API.local, path_prefix: /v1 }, service: api }
  - { match: { headers: { x-canary: "1" } }, service: api }
"#,
        )
        .unwrap();
        RoutingTable::build(&c, None, &Metrics::new())
    }

    fn req(uri: &str, host: &str, canary: bool) -> Request<()> {
        let mut b = Request::builder().uri(uri).header("host", host);
        if canary {
            b = b.header("x-canary", "1");
        }
        b.body(()).unwrap()
    }

    #[test]
    fn routes_by_host_path_and_header_then_default() {
        let t = table();
        assert_eq!(t.route(0, &req("/v1/x", "api.local:4140", false)), Some(1));
        assert_eq!(t.route(0, &req("/v2/x", "api.local", false)), Some(0));
        assert_eq!(t.route(0, &req("/v1/x", "web.local", false)), Some(0));
        assert_eq!(t.route(0, &req("/", "web.local", true)), Some(1));
        assert_eq!(t.route(0, &req("http://api.local/v1", "ignored", false)), Some(1));
    }

    fn cached_table(cache: &str, previous: Option<&RoutingTable>) -> RoutingTable {
        let c = ProxyConfig::from_yaml(
            "t.yaml",
            &format!(
                r#"
listeners:
  - {{ name: out, address: "127.0.0.1:4140", default_service: web }}
services:
  - {{ name: web, endpoints: ["127.0.0.1:8080"] }}
routes:
  - {{ name: api, match: {{ path_prefix: /api }}, service: web, cache: {cache}, compression: {{}} }}
  - {{ match: {{ path_prefix: /plain }}, service: web }}
"#
            ),
        )
        .unwrap();
        RoutingTable::build(&c, previous, &Metrics::new())
    }

    fn cache_of(t: &RoutingTable) -> Arc<RouteCache> {
        let matched = t.route_match(0, &req("/api/x", "h", false));
        Arc::clone(matched.policy.unwrap().cache.as_ref().unwrap())
    }

    #[test]
    fn policies_come_with_the_table_and_caches_survive_unchanged_reloads() {
        let t = cached_table("{}", None);
        let policy = t.route_match(0, &req("/api/x", "h", false)).policy.unwrap();
        assert_eq!(policy.label, "api");
        assert!(policy.compression.is_some());
        assert!(t.route_match(0, &req("/plain", "h", false)).policy.is_none());
        assert!(t.route_match(0, &req("/other", "h", false)).policy.is_none());
        let kept = cached_table("{}", Some(&t));
        assert!(Arc::ptr_eq(&cache_of(&t), &cache_of(&kept)));
        let changed = cached_table("{ max_bytes: 5000, max_entry_bytes: 100 }", Some(&kept));
        assert!(!Arc::ptr_eq(&cache_of(&kept), &cache_of(&changed)));
        assert_eq!(cache_of(&changed).config.max_bytes, 5000);
    }

    #[test]
    fn a_rebuilt_table_has_the_next_version() {
        let t = table();
        let c = ProxyConfig::quick(
            "127.0.0.1:1".parse().unwrap(),
            vec![],
            "127.0.0.1:2".parse().unwrap(),
        );
        let next = RoutingTable::build(&c, Some(&t), &Metrics::new());
        assert_eq!(next.version, 2);
        assert_eq!(next.route(0, &req("/", "x", false)), Some(0));
    }
}
