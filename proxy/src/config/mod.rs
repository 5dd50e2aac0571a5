//! The proxy's configuration: the `proxy.yaml` schema, the quick-mode equivalent built from
//! command-line flags, and validation.
//!
//! Every error names the file, the field path and the reason
//! (`proxy.yaml: routes[1].service: no service named "api" (known: "web")`), so an operator can
//! fix it without reading code. Parsing and validation are pure; nothing here touches the network.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Default admin address: localhost only, like Linkerd's admin port.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:4191";
/// Default outbound listener address.
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:4140";
/// How long an upstream TCP connect may take before the request fails with 502.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// How long the upstream may take to send response headers before the request fails with 504.
/// Envoy's default route timeout is the same 15 s.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 15_000;
/// How long in-flight requests may run after SIGTERM before the process exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// How long a client may take to send a complete HTTP/1 request head.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Streams per upstream HTTP/2 connection before another one is opened; 100 is the limit many
/// servers advertise (and the minimum RFC 9113 recommends).
pub const DEFAULT_HTTP2_STREAMS_PER_CONNECTION: u64 = 100;
/// Idle pooled upstream connections are closed after this long.
pub const DEFAULT_POOL_IDLE_TIMEOUT_MS: u64 = 90_000;

/// The whole proxy configuration, as in `proxy.yaml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Admin server address (`/live`, `/ready`, `/metrics`, `/config`).
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Worker threads, each with its own runtime and its own `SO_REUSEPORT` listener.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// After SIGTERM, in-flight requests get this long to finish once new connections are no
    /// longer accepted.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// After SIGTERM, keep accepting and serving new connections and requests this long (with
    /// `/ready` failing already) before draining: Kubernetes removes a terminating pod from its
    /// Services' endpoints asynchronously, and clients keep sending to it meanwhile. 0: drain at
    /// once.
    #[serde(default)]
    pub shutdown_delay_ms: u64,
    /// Serve the admin server's one mutating endpoint (`PUT /log-level`), on a loopback admin
    /// address only. Off by default.
    #[serde(default)]
    pub admin_mutations: bool,
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Serve plain HTTP/1.1 requests on the relay, the fast lane (see
    /// `cogmesh_proxy::forward::relay`); `false` sends every request through the full path.
    #[serde(default = "default_true")]
    pub http1_relay: bool,
    /// Serve HTTP/2 clients on cogmesh's own HTTP/2 codec (see
    /// `cogmesh_proxy::forward::h2_server`); `false` serves them on the `h2` crate (the lane).
    #[serde(default = "default_true")]
    pub own_http2_codec: bool,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Concurrent HTTP/2 streams per upstream connection before another connection to the
    /// same endpoint is opened (up to 8 connections).
    #[serde(default = "default_http2_streams_per_connection")]
    pub http2_streams_per_connection: u64,
    /// What clients may send: header size and count, HTTP/2 streams and windows.
    #[serde(default)]
    pub limits: crate::hardening::LimitsConfig,
    /// The instance's concurrency limit with priority shedding; none by default.
    #[serde(default)]
    pub admission: Option<crate::admission::AdmissionConfig>,
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Evaluated in order; the first match wins. Without a match the listener's
    /// `default_service` is used, and without one the request gets 404.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The control plane to join, if any.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// Transparent mode: listeners that receive iptables-redirected connections.
    #[serde(default)]
    pub transparent: Option<crate::transparent::TransparentConfig>,
    /// The sidecar's TLS identity (certificate, key, trust bundle); see `crate::tls`.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
    /// Get (and renew) a workload certificate from the control plane's CA (see `identity`).
    #[serde(default)]
    pub identity: Option<crate::identity::IdentityConfig>,
    /// OpenTelemetry spans over OTLP; off by default (see [`crate::otel`]).
    #[serde(default)]
    pub tracing: Option<crate::otel::TracingConfig>,
    /// One line per request; off by default (see [`crate::access_log`]).
    #[serde(default)]
    pub access_log: Option<crate::access_log::AccessLogConfig>,
}

/// How the sidecar joins the control plane (`cogmesh control`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The control plane's gRPC addresses (`host:port`), one string or a list: the sidecar
    /// uses one replica at a time and fails over to the next (see `control::failover`).
    #[serde(alias = "address", deserialize_with = "one_or_many")]
    pub addresses: Vec<String>,
    /// The service this sidecar's own instance belongs to.
    pub service: String,
    /// Unique name of this sidecar; default `<service>@<instance_address>`.
    #[serde(default)]
    pub node: Option<String>,
    /// Where other sidecars reach this instance; default the first listener's address.
    #[serde(default)]
    pub instance_address: Option<SocketAddr>,
    #[serde(default)]
    pub zone: String,
    /// Where the last accepted routing table is kept, so a restart routes before the control
    /// plane answers (static stability).
    #[serde(default)]
    pub state_file: Option<std::path::PathBuf>,
    #[serde(default = "default_report_interval_ms")]
    pub report_interval_ms: u64,
    /// Without the control plane for this long, pushed weights fall back to neutral (the
    /// endpoints stay).
    #[serde(default = "default_weight_expiry_ms")]
    pub weight_expiry_ms: u64,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

/// Sidecars report their load this often.
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 1_000;
/// Pushed weights outlive the control plane this long.
pub const DEFAULT_WEIGHT_EXPIRY_MS: u64 = 600_000;

fn default_report_interval_ms() -> u64 {
    DEFAULT_REPORT_INTERVAL_MS
}
fn default_weight_expiry_ms() -> u64 {
    DEFAULT_WEIGHT_EXPIRY_MS
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub default_service: Option<String>,
    /// A token bucket for every request on the listener (before routing).
    #[serde(default)]
    pub rate_limit: Option<crate::ratelimit::RateLimitConfig>,
    /// Terminate TLS (and verify client certificates) with the sidecar's identity.
    #[serde(default)]
    pub tls: Option<crate::tls::ListenerTls>,
    /// Allowed peer identities for requests that match no route with its own.
    #[serde(default)]
    pub authorization: Option<crate::tls::AuthorizationConfig>,
}

/// Which side of the application a listener serves; a label on every metric.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    #[default]
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// May be empty: requests then fail fast with 503 until endpoints arrive.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Deadline for the response headers over all attempts (retries and their backoff
    /// included); 504 after. 0: none (each attempt still has `response_timeout_ms`).
    #[serde(default)]
    pub request_timeout_ms: u64,
    /// A stream that carries nothing in either direction this long after its response headers
    /// is ended (reset). 0: none (Envoy's default is 5 min).
    #[serde(default)]
    pub stream_idle_timeout_ms: u64,
    #[serde(default)]
    pub balancer: BalancerKind,
    /// Affinity key for `balancer: ring_hash`, e.g. `{ header: x-session }`.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Load reports older than this are ignored.
    #[serde(default = "default_load_report_stale_ms")]
    pub load_report_stale_ms: u64,
    /// Pass the upstream's `endpoint-load-metrics*` headers and trailers on to the client
    /// (they are removed by default: they describe the endpoint, not the response).
    #[serde(default)]
    pub forward_load_reports: bool,
    /// Envoy-style thresholds; over one, requests fail fast with 503.
    #[serde(default)]
    pub circuit_breaker: crate::breaker::CircuitBreakerConfig,
    /// Ejection of endpoints that fail in a row (Envoy's `consecutive_5xx`).
    #[serde(default)]
    pub outlier_detection: crate::outlier::OutlierConfig,
    /// Retries of bodiless idempotent requests, within a budget.
    #[serde(default)]
    pub retry: crate::retry::RetryConfig,
    /// Originate TLS (mTLS between sidecars) to the endpoints.
    #[serde(default)]
    pub tls: Option<crate::tls::ServiceTls>,
}

/// The protocol spoken to a service's endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The same as the downstream request: HTTP/1.1 stays HTTP/1.1, HTTP/2 (and so gRPC) stays
    /// HTTP/2. An upgrade (WebSocket) always uses HTTP/1.1.
    #[default]
    Auto,
    Http1,
    Http2,
}

/// Endpoint selection strategy of a service.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Weighted power of two choices over latency × queue × the endpoint's reported load.
    #[default]
    Cognitive,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1), as Linkerd does.
    P2cEwma,
    /// Two random choices, the one with fewer requests in flight wins, as Envoy's default.
    LeastRequest,
    RoundRobin,
    /// Consistent hashing on `hash_key`, for affinity.
    RingHash,
}

impl BalancerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerKind::Cognitive => "cognitive",
            BalancerKind::P2cEwma => "p2c_ewma",
            BalancerKind::LeastRequest => "least_request",
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::RingHash => "ring_hash",
        }
    }
}

/// Where `ring_hash` finds a request's affinity key. Requests without it are spread at random.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashKey {
    Header(String),
    Cookie(String),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    pub service: String,
    /// A token bucket for the requests this route matches.
    #[serde(default)]
    pub rate_limit: Option<crate::ratelimit::RateLimitConfig>,
    /// The priority of requests without `x-cogmesh-priority` (default `normal`).
    #[serde(default)]
    pub priority: Option<crate::admission::Priority>,
    /// Lets the service's retry policy retry requests of any method on this route (POST,
    /// PATCH), not only idempotent ones.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Compress responses (and optionally decompress requests) on this route; `{}` for the
    /// defaults.
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
    /// Cache GET/HEAD responses of this route in memory; `{}` for the defaults.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Allowed peer identities (SPIFFE IDs of client certificates); others get 403.
    #[serde(default)]
    pub authorization: Option<crate::tls::AuthorizationConfig>,
    /// Security headers added to responses (HSTS, `x-content-type-options`, ...); `{}` for
    /// the defaults.
    #[serde(default)]
    pub security_headers: Option<crate::security_headers::SecurityHeadersConfig>,
}

/// Response compression of a route (see `crate::compress`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Codings the proxy may produce, preferred first when the client's q-values tie.
    #[serde(default = "default_encodings")]
    pub encodings: Vec<crate::compress::Encoding>,
    /// Media types to compress (parameters ignored); `text/*` matches every text subtype.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// Responses whose `Content-Length` is below this are sent as they are (unknown lengths are
    /// compressed).
    #[serde(default = "default_min_size")]
    pub min_size: u64,
    /// Decode request bodies sent with `Content-Encoding: gzip | br | zstd` before forwarding.
    #[serde(default)]
    pub decompress_requests: bool,
}

/// Codings offered when a route does not list them: zstd (fastest at a good ratio), then
/// brotli, then gzip (which every client has).
pub const DEFAULT_ENCODINGS: [crate::compress::Encoding; 3] = crate::compress::Encoding::ALL;
/// Media types compressed by default: text, JSON, JavaScript, XML and SVG, as Envoy's and
/// nginx's usual lists.
pub const DEFAULT_CONTENT_TYPES: [&str; 9] = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/x-javascript",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "image/svg+xml",
];
/// Below about 1 KiB compression saves less than it costs (headers and framing dominate).
pub const DEFAULT_COMPRESSION_MIN_SIZE_BYTES: u64 = 1024;

fn default_encodings() -> Vec<crate::compress::Encoding> {
    DEFAULT_ENCODINGS.to_vec()
}
fn default_content_types() -> Vec<String> {
    DEFAULT_CONTENT_TYPES.iter().map(|s| s.to_string()).collect()
}
fn default_min_size() -> u64 {
    DEFAULT_COMPRESSION_MIN_SIZE_BYTES
}

/// The response cache of a route (see `crate::cache`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Total size of stored bodies and headers; least recently used entries go first.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
    /// Responses larger than this are streamed through and not stored.
    #[serde(default = "default_cache_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Freshness given to storable responses that state none (no `max-age`, `s-maxage` or
    /// `Expires`). 0: such responses are only stored when they carry a validator, and then
    /// revalidated on every use.
    #[serde(default)]
    pub default_ttl_ms: u64,
}

/// Cache size of a route by default.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Largest cached response by default.
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: u64 = 1024 * 1024;

fn default_cache_max_bytes() -> u64 {
    DEFAULT_CACHE_MAX_BYTES
}
fn default_cache_max_entry_bytes() -> u64 {
    DEFAULT_CACHE_MAX_ENTRY_BYTES
}

/// All given conditions must hold. An empty match matches every request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact host (without port), case-insensitive.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Exact header values, header names case-insensitive.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN_ADDR.parse().expect("constant address parses")
}
fn default_true() -> bool {
    true
}

fn default_workers() -> usize {
    1
}
fn default_drain_timeout_ms() -> u64 {
    DEFAULT_DRAIN_TIMEOUT_MS
}
fn default_header_read_timeout_ms() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_MS
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_pool_idle_timeout_ms() -> u64 {
    DEFAULT_POOL_IDLE_TIMEOUT_MS
}
fn default_load_report_stale_ms() -> u64 {
    crate::balance::DEFAULT_LOAD_STALE_MS
}
fn default_http2_streams_per_connection() -> u64 {
    DEFAULT_HTTP2_STREAMS_PER_CONNECTION
}
fn default_response_timeout_ms() -> u64 {
    DEFAULT_RESPONSE_TIMEOUT_MS
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    /// Field path, e.g. `routes[1].service`; `.` for the document itself.
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

// === impl ProxyConfig ===

impl ProxyConfig {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&file, ".", format!("cannot read: {e}")))?;
        Self::from_yaml(&file, &text)
    }

    /// Parses and validates YAML text; `file` is only used in error messages.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: ProxyConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde_yaml_ng prefixes its own (shorter) path, e.g. "services[0]: unknown field";
            // ours is the full one, so drop that prefix. Its " at line L column C" stays.
            let reason = match inner.split_once(": ") {
                Some((prefix, rest)) if !prefix.contains(' ') => rest.to_string(),
                _ => inner,
            };
            ConfigError::new(file, field, reason)
        })?;
        config.link_identity();
        config.validate(file)?;
        Ok(config)
    }

    /// With `identity` (certificates from the control plane's CA) and a `tls` section that
    /// names no files of its own, TLS uses the identity's directory: the mesh's automatic mTLS.
    pub fn link_identity(&mut self) {
        if let (Some(tls), Some(identity)) = (&mut self.tls, &self.identity) {
            if tls.identity_dir.is_none() && tls.cert.is_none() && tls.key.is_none() {
                tls.identity_dir = Some(identity.dir.clone());
            }
        }
    }

    /// The configuration of quick mode: one outbound listener in front of one service.
    pub fn quick(listen: SocketAddr, upstreams: Vec<SocketAddr>, admin: SocketAddr) -> Self {
        ProxyConfig {
            admin,
            workers: default_workers(),
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
            shutdown_delay_ms: 0,
            admin_mutations: false,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            http1_relay: true,
            own_http2_codec: true,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            pool_idle_timeout_ms: DEFAULT_POOL_IDLE_TIMEOUT_MS,
            http2_streams_per_connection: DEFAULT_HTTP2_STREAMS_PER_CONNECTION,
            limits: Default::default(),
            admission: None,
            listeners: vec![ListenerConfig {
                name: "outbound".into(),
                address: listen,
                direction: Direction::Outbound,
                default_service: Some(QUICK_SERVICE.into()),
                rate_limit: None,
                tls: None,
                authorization: None,
            }],
            services: vec![ServiceConfig {
                name: QUICK_SERVICE.into(),
                endpoints: upstreams,
                protocol: UpstreamProtocol::Auto,
                response_timeout_ms: DEFAULT_RESPONSE_TIMEOUT_MS,
                request_timeout_ms: 0,
                stream_idle_timeout_ms: 0,
                balancer: BalancerKind::default(),
                hash_key: None,
                load_report_stale_ms: default_load_report_stale_ms(),
                forward_load_reports: false,
                circuit_breaker: Default::default(),
                outlier_detection: Default::default(),
                retry: Default::default(),
                tls: None,
            }],
            routes: Vec::new(),
            control: None,
            transparent: None,
            tls: None,
            identity: None,
            tracing: None,
            access_log: None,
        }
    }

    /// Checks what the schema alone cannot: references, uniqueness, ranges.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError::new(
                file,
                "workers",
                format!("must be between 1 and 1024, got {}", self.workers),
            ));
        }
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                file,
                "listeners",
                "at least one listener is required",
            ));
        }
        for (field, value) in [
            ("drain_timeout_ms", self.drain_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("pool_idle_timeout_ms", self.pool_idle_timeout_ms),
            ("http2_streams_per_connection", self.http2_streams_per_connection),
        ] {
            if value == 0 {
                return Err(ConfigError::new(file, field, "must be greater than 0"));
            }
        }
        if let Some(t) = &self.tracing {
            t.validate(file)?;
        }
        if let Some(a) = &self.access_log {
            a.validate(file)?;
        }
        if let Some(Err((field, reason))) = self.admission.as_ref().map(|a| a.check()) {
            return Err(ConfigError::new(file, format!("admission.{field}"), reason));
        }
        if let Err((field, reason)) = self.limits.check() {
            return Err(ConfigError::new(file, format!("limits.{field}"), reason));
        }
        if let Some(Err((field, reason))) = self.identity.as_ref().map(|i| i.check(self.control.is_some())) {
            return Err(ConfigError::new(file, format!("identity.{field}"), reason));
        }

        let mut service_names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.name.is_empty() {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].name"),
                    "must not be empty",
                ));
            }
            if !service_names.insert(s.name.as_str()) {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].name"),
                    format!("duplicate service name {:?}", s.name),
                ));
            }
            if s.balancer == BalancerKind::RingHash && s.hash_key.is_none() {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].hash_key"),
                    "balancer ring_hash needs a hash_key (`{ header: NAME }` or `{ cookie: NAME }`)",
                ));
            }
            if let Some(HashKey::Header(h)) = &s.hash_key {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(ConfigError::new(
                        file,
                        format!("services[{i}].hash_key.header"),
                        format!("{h:?} is not a valid HTTP header name"),
                    ));
                }
            }
            if let Err((field, reason)) = s.circuit_breaker.check() {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].circuit_breaker.{field}"),
                    reason,
                ));
            }
            if let Err((field, reason)) = s.retry.check() {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].retry.{field}"),
                    reason,
                ));
            }
            if let Err((field, reason)) = s.outlier_detection.check() {
                return Err(ConfigError::new(
                    file,
                    format!("services[{i}].outlier_detection.{field}"),
                    reason,
                ));
            }
            let mut seen = HashSet::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                if e.port() == 0 {
                    return Err(ConfigError::new(
                        file,
                        format!("services[{i}].endpoints[{j}]"),
                        format!("port must not be 0, got {e}"),
                    ));
                }
                if !seen.insert(e) {
                    return Err(ConfigError::new(
                        file,
                        format!("services[{i}].endpoints[{j}]"),
                        format!("duplicate endpoint {e}"),
                    ));
                }
            }
        }
        let known = || {
            let mut names: Vec<_> = self.services.iter().map(|s| format!("{:?}", s.name)).collect();
            names.sort();
            if names.is_empty() {
                "no services are defined".to_string()
            } else {
                format!("known: {}", names.join(", "))
            }
        };

        let mut listener_names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !listener_names.insert(l.name.as_str()) {
                return Err(ConfigError::new(
                    file,
                    format!("listeners[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            if !addresses.insert(l.address) || l.address == self.admin {
                return Err(ConfigError::new(
                    file,
                    format!("listeners[{i}].address"),
                    format!(
                        "address {} is already used by another listener or the admin server",
                        l.address
                    ),
                ));
            }
            if let Some(Err((field, reason))) = l.rate_limit.as_ref().map(|r| r.check()) {
                return Err(ConfigError::new(
                    file,
                    format!("listeners[{i}].rate_limit.{field}"),
                    reason,
                ));
            }
            if let Some(Err((field, reason))) = l.authorization.as_ref().map(crate::tls::authz::check) {
                return Err(ConfigError::new(
                    file,
                    format!("listeners[{i}].authorization.{field}"),
                    reason,
                ));
            }
            if let Some(svc) = &l.default_service {
                if !service_names.contains(svc.as_str()) {
                    return Err(ConfigError::new(
                        file,
                        format!("listeners[{i}].default_service"),
                        format!("no service named {svc:?} ({})", known()),
                    ));
                }
            }
        }

        if let Some(t) = &self.transparent {
            t.validate(self, file)?;
        }
        if let Some(c) = &self.control {
            if c.service.is_empty() {
                return Err(ConfigError::new(file, "control.service", "must not be empty"));
            }
            if c.addresses.is_empty() {
                return Err(ConfigError::new(
                    file,
                    "control.addresses",
                    "list at least one HOST:PORT",
                ));
            }
            for (i, a) in c.addresses.iter().enumerate() {
                let port = a
                    .rsplit_once(':')
                    .and_then(|(host, p)| (!host.is_empty()).then_some(p));
                if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
                    return Err(ConfigError::new(
                        file,
                        format!("control.addresses[{i}]"),
                        format!("expected HOST:PORT, got {a:?}"),
                    ));
                }
            }
            if c.report_interval_ms == 0 {
                return Err(ConfigError::new(
                    file,
                    "control.report_interval_ms",
                    "must be greater than 0",
                ));
            }
        }

        for (i, r) in self.routes.iter().enumerate() {
            if !service_names.contains(r.service.as_str()) {
                return Err(ConfigError::new(
                    file,
                    format!("routes[{i}].service"),
                    format!("no service named {:?} ({})", r.service, known()),
                ));
            }
            if let Some(Err((field, reason))) = r.rate_limit.as_ref().map(|r| r.check()) {
                return Err(ConfigError::new(
                    file,
                    format!("routes[{i}].rate_limit.{field}"),
                    reason,
                ));
            }
            if let Some(prefix) = &r.matches.path_prefix {
                if !prefix.starts_with('/') {
                    return Err(ConfigError::new(
                        file,
                        format!("routes[{i}].match.path_prefix"),
                        format!("must start with '/', got {prefix:?}"),
                    ));
                }
            }
            if let Some(c) = &r.compression {
                validate_compression(file, i, c)?;
            }
            if let Some(c) = &r.cache {
                validate_cache(file, i, c)?;
            }
            if let Some(Err((field, reason))) = r.authorization.as_ref().map(crate::tls::authz::check) {
                return Err(ConfigError::new(
                    file,
                    format!("routes[{i}].authorization.{field}"),
                    reason,
                ));
            }
            if let Some(Err((field, reason))) = r.security_headers.as_ref().map(|h| h.check()) {
                return Err(ConfigError::new(
                    file,
                    format!("routes[{i}].security_headers.{field}"),
                    reason,
                ));
            }
            for name in r.matches.headers.keys() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(ConfigError::new(
                        file,
                        format!("routes[{i}].match.headers.{name}"),
                        "is not a valid HTTP header name",
                    ));
                }
            }
        }
        crate::tls::validate(self).map_err(|(field, reason)| ConfigError::new(file, field, reason))?;
        Ok(())
    }
}

fn validate_compression(file: &str, i: usize, c: &CompressionConfig) -> Result<(), ConfigError> {
    let field = |f: &str| format!("routes[{i}].compression.{f}");
    if c.encodings.is_empty() {
        return Err(ConfigError::new(
            file,
            field("encodings"),
            "must list at least one of zstd, br, gzip",
        ));
    }
    for (j, e) in c.encodings.iter().enumerate() {
        if c.encodings[..j].contains(e) {
            return Err(ConfigError::new(
                file,
                format!("{}[{j}]", field("encodings")),
                format!("duplicate encoding {:?}", e.token()),
            ));
        }
    }
    if c.content_types.is_empty() {
        return Err(ConfigError::new(
            file,
            field("content_types"),
            "must list at least one media type",
        ));
    }
    for (j, t) in c.content_types.iter().enumerate() {
        let valid = t
            .split_once('/')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && !t.contains([' ', ';', ',']));
        if !valid {
            return Err(ConfigError::new(
                file,
                format!("{}[{j}]", field("content_types")),
                format!("expected a media type like \"application/json\" or \"text/*\", got {t:?}"),
            ));
        }
    }
    Ok(())
}

fn validate_cache(file: &str, i: usize, c: &CacheConfig) -> Result<(), ConfigError> {
    let field = |f: &str| format!("routes[{i}].cache.{f}");
    if c.max_bytes == 0 {
        return Err(ConfigError::new(
            file,
            field("max_bytes"),
            "must be greater than 0",
        ));
    }
    if c.max_entry_bytes == 0 || c.max_entry_bytes > c.max_bytes {
        return Err(ConfigError::new(
            file,
            field("max_entry_bytes"),
            format!(
                "must be between 1 and max_bytes ({}), got {}",
                c.max_bytes, c.max_entry_bytes
            ),
        ));
    }
    Ok(())
}

/// The service name quick mode gives to its `--upstream` endpoints.
pub const QUICK_SERVICE: &str = "upstream";

#[cfg(test)]
mod tests;
