//! The proxy's Prometheus metrics (`prometheus-client`), and pre-resolved per-(direction,
//! service) handles so the request path increments atomics without formatting labels or looking
//! up a label map.
//!
//! Names (the exposition adds `_total` to counters):
//! - `request_total{direction,service}`: requests routed to a service;
//! - `response_total{direction,service,status_code,classification}`: responses sent downstream,
//!   `classification` is `success` or `failure` (5xx or a proxy error);
//! - `response_latency_seconds{direction,service}`: histogram, request start to response headers;
//! - `proxy_error_total{direction,service,error}`: requests the proxy failed itself, by cause;
//! - `tcp_open_connections{direction,listener}`: accepted connections currently open;
//!   `tcp_accepted_connections_total`, `tcp_read_bytes_total` and `tcp_write_bytes_total` with
//!   the same labels (bytes as the proxy read and wrote them on client connections);
//! - `request_refused_total{direction,listener}`: HTTP/1 request heads refused as smuggling
//!   attempts (`Content-Length` with `Transfer-Encoding`, conflicting lengths);
//! - `rate_limited_total{scope,name}`: requests refused with 429 by the rate limiter of a
//!   listener (`scope="listener"`) or a route (`scope="route"`, `name` its name or `routes[i]`);
//! - `circuit_breaker_overflow_total{service,threshold}`: requests (or retries) refused by a
//!   service's circuit breaker, by threshold (`max_requests`, `max_pending_requests`,
//!   `max_retries`);
//! - `admission_total{priority,result}`: requests through the instance's concurrency limit,
//!   `admitted` or `shed`, by priority (the basis of attention efficiency), and the
//!   `admission_limit` gauge (the limit in force: static, or adaptive);
//! - `retry_total{direction,service,result}`: retries `sent`, and retriable failures not retried
//!   because of the budget (`budget_exhausted`), the breaker's `max_retries`
//!   (`breaker_overflow`) or a body longer than the replay buffer (`body_too_large`);
//! - `trace_span_total{result}`: finished spans `exported`, `failed` (export error) or
//!   `dropped` (queue full); `access_log_line_total{result}`: lines `written` or `dropped`;
//! - `config_reload_total{result}`: reloads of proxy.yaml, `applied` or `refused`;
//! - `stream_idle_timeout_total{direction,service}`: streams ended by `stream_idle_timeout_ms`;
//! - `load_report_total{direction,service,result}`: ORCA load reports read from responses,
//!   `accepted` or `rejected` (malformed reports are ignored, never fail a request);
//! - `compressed_response_total{route,encoding}`: responses compressed, per coding;
//! - `cache_lookup_total{route,result}`: GET/HEAD requests on a caching route, `result` one of
//!   `hit`, `miss`, `revalidated` (stale, confirmed by a 304), `coalesced` (served after waiting
//!   for another request's fetch) or `bypass`;
//! - `cache_eviction_total{route}`, and the gauges `cache_stored_bytes{route}`,
//!   `cache_entries{route}`;
//! - TLS and authorization: `tls_handshake_total`, `tls_handshake_failure_total`,
//!   `tls_identity_reload_total`, `tls_identity_expiry_timestamp_seconds`, `authz_denied_total`
//!   (see `crate::tls::metrics`);
//! - per endpoint, read from the routing table at scrape time (so the request path pays
//!   nothing): `endpoint_in_flight`, `endpoint_rtt_ewma_seconds`, `endpoint_load` (while the
//!   last report is fresh), `endpoint_weight`, `endpoint_ejected` gauges and `endpoint_picks_total`,
//!   each labelled `{service,endpoint}`.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::error::ErrorKind;

mod counted;
mod sharded;
pub use self::counted::{ByteCounters, CountedIo};
pub use self::sharded::{LatencyHistogram, ShardedCounter};

/// Latency buckets in seconds: 0.5 ms to 30 s, roughly ×2.5 apart.
pub static LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub direction: &'static str,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: &'static str,
    pub service: String,
    pub status_code: u16,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: &'static str,
    pub service: String,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadReportLabels {
    pub direction: &'static str,
    pub service: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompressionLabels {
    pub route: String,
    pub encoding: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLookupLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub scope: &'static str,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub service: String,
    pub threshold: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub priority: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub direction: &'static str,
    pub service: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: &'static str,
    pub listener: String,
}

type HistogramFamily<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::new(&LATENCY_BUCKETS_SECONDS)
}

/// Every metric family of the proxy, registered once at start.
pub struct Metrics {
    registry: Registry,
    requests: Family<TrafficLabels, ShardedCounter>,
    responses: Family<ResponseLabels, ShardedCounter>,
    latency: HistogramFamily<TrafficLabels>,
    errors: Family<ErrorLabels, Counter>,
    connections: Family<ConnectionLabels, Gauge>,
    refused: Family<ConnectionLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    overflow: Family<OverflowLabels, Counter>,
    admission: Family<AdmissionLabels, Counter>,
    admission_limit: Gauge,
    retries: Family<RetryLabels, Counter>,
    load_reports: Family<LoadReportLabels, Counter>,
    stream_idle_timeouts: Family<TrafficLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    compressed: Family<CompressionLabels, Counter>,
    cache_lookups: Family<CacheLookupLabels, Counter>,
    cache_evictions: Family<RouteLabels, Counter>,
    cache_bytes: Family<RouteLabels, Gauge>,
    cache_entries: Family<RouteLabels, Gauge>,
    /// Transparent mode: protocol detection and where captured connections went.
    pub transparent: crate::transparent::TransparentMetrics,
    /// TLS handshakes, identity rotations and authorization denials (see `crate::tls::metrics`).
    pub tls: crate::tls::TlsMetrics,
    /// Set once the first routing table exists; read by the endpoint collector.
    pub table: Arc<OnceLock<crate::route::SharedTable>>,
    pub identity: crate::identity::IdentityMetrics,
    /// Spans and access-log lines: exported, written, dropped.
    pub telemetry: crate::otel::TelemetryCounters,
    tcp: TcpFamilies,
}

/// Accepted connections and their bytes, per listener.
struct TcpFamilies {
    accepted: Family<ConnectionLabels, Counter>,
    read: Family<ConnectionLabels, Counter>,
    written: Family<ConnectionLabels, Counter>,
}

impl TcpFamilies {
    fn register(registry: &mut Registry) -> Self {
        let f = TcpFamilies {
            accepted: Family::default(),
            read: Family::default(),
            written: Family::default(),
        };
        registry.register(
            "tcp_accepted_connections",
            "Client connections accepted",
            f.accepted.clone(),
        );
        registry.register_with_unit(
            "tcp_read",
            "Bytes read from client connections",
            Unit::Bytes,
            f.read.clone(),
        );
        registry.register_with_unit(
            "tcp_write",
            "Bytes written to client connections",
            Unit::Bytes,
            f.written.clone(),
        );
        f
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<TrafficLabels, ShardedCounter>::default();
        let responses = Family::<ResponseLabels, ShardedCounter>::default();
        let latency: HistogramFamily<TrafficLabels> = Family::new_with_constructor(latency_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let connections = Family::<ConnectionLabels, Gauge>::default();
        let refused = Family::<ConnectionLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let overflow = Family::<OverflowLabels, Counter>::default();
        let admission = Family::<AdmissionLabels, Counter>::default();
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retry",
            "Retries sent, and retriable failures not retried (budget, breaker)",
            retries.clone(),
        );
        registry.register(
            "admission",
            "Requests through the concurrency limit, admitted or shed, by priority",
            admission.clone(),
        );
        let admission_limit = Gauge::default();
        registry.register(
            "admission_limit",
            "The instance's concurrency limit in force (static, or adaptive)",
            admission_limit.clone(),
        );
        registry.register(
            "circuit_breaker_overflow",
            "Requests refused by a service's circuit breaker, by threshold",
            overflow.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limiter",
            rate_limited.clone(),
        );
        registry.register(
            "request_refused",
            "HTTP/1 request heads refused as smuggling attempts",
            refused.clone(),
        );
        let load_reports = Family::<LoadReportLabels, Counter>::default();
        let stream_idle_timeouts = Family::<TrafficLabels, Counter>::default();
        registry.register(
            "stream_idle_timeout",
            "Streams ended after carrying nothing for stream_idle_timeout_ms",
            stream_idle_timeouts.clone(),
        );
        let table = Arc::new(OnceLock::new());
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reload",
            "Configuration reloads, applied or refused",
            reloads.clone(),
        );
        registry.register(
            "load_report",
            "ORCA load reports read from upstream responses",
            load_reports.clone(),
        );
        registry.register_collector(Box::new(EndpointCollector {
            table: Arc::clone(&table),
        }));
        registry.register("request", "Requests routed to a service", requests.clone());
        registry.register("response", "Responses sent to the client", responses.clone());
        registry.register_with_unit(
            "response_latency",
            "Time from request start to response headers",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "proxy_error",
            "Requests failed by the proxy, by cause",
            errors.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Accepted TCP connections currently open",
            connections.clone(),
        );
        let compressed = Family::<CompressionLabels, Counter>::default();
        registry.register(
            "compressed_response",
            "Responses compressed by the proxy, per encoding",
            compressed.clone(),
        );
        let cache_lookups = Family::<CacheLookupLabels, Counter>::default();
        registry.register(
            "cache_lookup",
            "GET/HEAD requests on caching routes, by result",
            cache_lookups.clone(),
        );
        let cache_evictions = Family::<RouteLabels, Counter>::default();
        registry.register(
            "cache_eviction",
            "Cached responses evicted to make room",
            cache_evictions.clone(),
        );
        let cache_bytes = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "cache_stored_bytes",
            "Bytes of cached responses (headers and bodies)",
            cache_bytes.clone(),
        );
        let cache_entries = Family::<RouteLabels, Gauge>::default();
        registry.register("cache_entries", "Cached responses", cache_entries.clone());
        let transparent = crate::transparent::TransparentMetrics::register(&mut registry);
        let tls = crate::tls::TlsMetrics::register(&mut registry);
        let identity = crate::identity::IdentityMetrics::default();
        identity.register(&mut registry);
        let telemetry = crate::otel::TelemetryCounters::register(&mut registry);
        let tcp = TcpFamilies::register(&mut registry);
        Metrics {
            transparent,
            tls,
            identity,
            registry,
            telemetry,
            tcp,
            compressed,
            cache_lookups,
            cache_evictions,
            cache_bytes,
            cache_entries,
            requests,
            responses,
            latency,
            errors,
            connections,
            refused,
            rate_limited,
            overflow,
            admission,
            admission_limit,
            retries,
            load_reports,
            stream_idle_timeouts,
            reloads,
            table,
        }
    }

    /// A listener's accepted-connection counter and byte counters.
    pub fn tcp(&self, direction: &'static str, listener: &str) -> (Counter, ByteCounters) {
        let labels = ConnectionLabels {
            direction,
            listener: listener.to_string(),
        };
        let bytes = ByteCounters {
            read: self.tcp.read.get_or_create(&labels).clone(),
            written: self.tcp.written.get_or_create(&labels).clone(),
        };
        (self.tcp.accepted.get_or_create(&labels).clone(), bytes)
    }

    /// The reload counter for `applied` (true) or `refused` (false).
    pub fn config_reloads(&self, applied: bool) -> Counter {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ReloadLabels { result }).clone()
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Pre-resolves the handles of one (direction, service) pair.
    pub fn service(&self, direction: &'static str, service: &str) -> ServiceMetrics {
        let labels = TrafficLabels {
            direction,
            service: service.to_string(),
        };
        ServiceMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            responses: self.responses.clone(),
            errors: self.errors.clone(),
            by_status: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            by_error: (0..ErrorKind::ALL.len()).map(|_| OnceLock::new()).collect(),
            retries: self.retries.clone(),
            by_retry: Default::default(),
            load_reports_accepted: self.load_report_counter(direction, service, "accepted"),
            load_reports_rejected: self.load_report_counter(direction, service, "rejected"),
            stream_idle_timeouts: self.stream_idle_timeouts.get_or_create(&labels).clone(),
            labels,
        }
    }

    fn load_report_counter(&self, direction: &'static str, service: &str, result: &'static str) -> Counter {
        self.load_reports
            .get_or_create(&LoadReportLabels {
                direction,
                service: service.to_string(),
                result,
            })
            .clone()
    }

    /// The `compressed_response_total` handle of a route and coding.
    pub fn compressed_responses(&self, route: &str, encoding: &'static str) -> Counter {
        self.compressed
            .get_or_create(&CompressionLabels {
                route: route.to_string(),
                encoding,
            })
            .clone()
    }

    /// The cache handles of a route.
    pub fn cache(&self, route: &str) -> crate::cache::CacheMetrics {
        let lookup = |result| {
            self.cache_lookups
                .get_or_create(&CacheLookupLabels {
                    route: route.to_string(),
                    result,
                })
                .clone()
        };
        let labels = RouteLabels {
            route: route.to_string(),
        };
        crate::cache::CacheMetrics {
            hit: lookup("hit"),
            miss: lookup("miss"),
            revalidated: lookup("revalidated"),
            coalesced: lookup("coalesced"),
            bypass: lookup("bypass"),
            evictions: self.cache_evictions.get_or_create(&labels).clone(),
            stored_bytes: self.cache_bytes.get_or_create(&labels).clone(),
            entries: self.cache_entries.get_or_create(&labels).clone(),
        }
    }

    /// The admitted and shed counters of the concurrency limit, per priority.
    pub fn admission(&self) -> crate::admission::AdmissionCounters {
        let counter = |p: crate::admission::Priority, result: &'static str| {
            self.admission
                .get_or_create(&AdmissionLabels {
                    priority: p.as_str(),
                    result,
                })
                .clone()
        };
        let all = crate::admission::Priority::ALL;
        crate::admission::AdmissionCounters {
            admitted: all.map(|p| counter(p, "admitted")),
            shed: all.map(|p| counter(p, "shed")),
            limit: self.admission_limit.clone(),
        }
    }

    /// The overflow counters of one service's circuit breaker.
    pub fn breaker_overflow(&self, service: &str) -> crate::breaker::OverflowCounters {
        let counter = |threshold: crate::breaker::Threshold| {
            self.overflow
                .get_or_create(&OverflowLabels {
                    service: service.to_string(),
                    threshold: threshold.as_str(),
                })
                .clone()
        };
        crate::breaker::OverflowCounters {
            max_connections: counter(crate::breaker::Threshold::MaxConnections),
            max_requests: counter(crate::breaker::Threshold::MaxRequests),
            max_pending_requests: counter(crate::breaker::Threshold::MaxPendingRequests),
            max_retries: counter(crate::breaker::Threshold::MaxRetries),
        }
    }

    /// The counter of one listener's or route's rate limiter.
    pub fn rate_limited(&self, scope: &'static str, name: &str) -> Counter {
        self.rate_limited
            .get_or_create(&LimitLabels {
                scope,
                name: name.to_string(),
            })
            .clone()
    }

    pub fn requests_refused(&self, direction: &'static str, listener: &str) -> Counter {
        self.refused
            .get_or_create(&ConnectionLabels {
                direction,
                listener: listener.to_string(),
            })
            .clone()
    }

    pub fn connections(&self, direction: &'static str, listener: &str) -> Gauge {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                listener: listener.to_string(),
            })
            .clone()
    }
}

const STATUS_SLOTS: usize = 600;

/// Handles for one (direction, service): the request path only touches atomics; a status code
/// or error seen for the first time resolves its handle once.
pub struct ServiceMetrics {
    labels: TrafficLabels,
    pub requests: ShardedCounter,
    pub latency: LatencyHistogram,
    responses: Family<ResponseLabels, ShardedCounter>,
    errors: Family<ErrorLabels, Counter>,
    by_status: Vec<OnceLock<ShardedCounter>>,
    by_error: Vec<OnceLock<Counter>>,
    retries: Family<RetryLabels, Counter>,
    by_retry: [OnceLock<Counter>; crate::retry::RETRY_RESULTS.len()],
    pub load_reports_accepted: Counter,
    pub load_reports_rejected: Counter,
    pub stream_idle_timeouts: Counter,
}

impl ServiceMetrics {
    /// Counts a response sent downstream; 5xx classify as `failure`.
    pub fn response(&self, status: u16) {
        let classification = if status >= 500 { "failure" } else { "success" };
        let slot = usize::from(status).min(STATUS_SLOTS - 1);
        self.by_status[slot]
            .get_or_init(|| {
                self.responses
                    .get_or_create(&ResponseLabels {
                        direction: self.labels.direction,
                        service: self.labels.service.clone(),
                        status_code: status,
                        classification,
                    })
                    .clone()
            })
            .inc();
    }

    /// Counts a retry outcome, one of [`crate::retry::RETRY_RESULTS`].
    pub fn retry(&self, result: &'static str) {
        let slot = crate::retry::RETRY_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.by_retry[slot]
            .get_or_init(|| {
                self.retries
                    .get_or_create(&RetryLabels {
                        direction: self.labels.direction,
                        service: self.labels.service.clone(),
                        result,
                    })
                    .clone()
            })
            .inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        self.by_error[kind as usize]
            .get_or_init(|| {
                self.errors
                    .get_or_create(&ErrorLabels {
                        direction: self.labels.direction,
                        service: self.labels.service.clone(),
                        error: kind.label(),
                    })
                    .clone()
            })
            .inc();
    }
}

/// Encodes the per-endpoint gauges from the current routing table at scrape time.
struct EndpointCollector {
    table: Arc<OnceLock<crate::route::SharedTable>>,
}

impl std::fmt::Debug for EndpointCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointCollector")
    }
}

impl prometheus_client::collector::Collector for EndpointCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;

        let Some(shared) = self.table.get() else {
            return Ok(());
        };
        let table = shared.load();
        let rows: Vec<(EndpointLabels, crate::balance::EndpointSnapshot)> = table
            .services
            .iter()
            .flat_map(|s| {
                s.endpoints.snapshots().into_iter().map(|e| {
                    let labels = EndpointLabels {
                        service: s.name.clone(),
                        endpoint: e.address.to_string(),
                    };
                    (labels, e)
                })
            })
            .collect();
        type Gauges = [(
            &'static str,
            &'static str,
            fn(&crate::balance::EndpointSnapshot) -> Option<f64>,
        ); 5];
        let gauges: Gauges = [
            ("endpoint_in_flight", "Requests in flight to the endpoint", |e| {
                Some(e.in_flight as f64)
            }),
            (
                "endpoint_rtt_ewma_seconds",
                "Peak-EWMA response latency of the endpoint",
                |e| Some(e.rtt_ewma_ms / 1e3),
            ),
            (
                "endpoint_load",
                "Load the endpoint last reported (ORCA), while fresh",
                |e| e.load,
            ),
            ("endpoint_weight", "Balancer weight of the endpoint", |e| {
                Some(e.weight)
            }),
            ("endpoint_ejected", "1 while the endpoint is ejected", |e| {
                Some(if e.ejected { 1.0 } else { 0.0 })
            }),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, e) in &rows {
                if let Some(v) = value(e) {
                    ConstGauge::new(v).encode(family.encode_family(labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "endpoint_picks",
            "Requests sent to the endpoint",
            None,
            MetricType::Counter,
        )?;
        for (labels, e) in &rows {
            ConstCounter::new(e.requests).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_like_their_samples() {
        let m = Metrics::new();
        m.service("outbound", "web").requests.inc();
        let text = m.encode();
        assert!(
            text.contains("# HELP request_total Requests routed to a service."),
            "{text}"
        );
        assert!(text.contains("# TYPE request_total counter"), "{text}");
        assert!(
            text.contains("request_total{direction=\"outbound\",service=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE response_latency_seconds histogram"),
            "{text}"
        );
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn endpoint_gauges_come_from_the_table() {
        let m = Metrics::new();
        let config = crate::config::ProxyConfig::quick(
            "127.0.0.1:1".parse().unwrap(),
            vec!["127.0.0.1:9".parse().unwrap()],
            "127.0.0.1:2".parse().unwrap(),
        );
        let table = crate::route::RoutingTable::build(&config, None, &m);
        table.services[0].endpoints.endpoints()[0].observe_load(0.25);
        let _ = m.table.set(Arc::new(arc_swap::ArcSwap::from_pointee(table)));
        let text = m.encode();
        assert!(
            text.contains(r#"endpoint_load{service="upstream",endpoint="127.0.0.1:9"} 0.25"#),
            "{text}"
        );
        assert!(
            text.contains(r#"endpoint_picks_total{service="upstream",endpoint="127.0.0.1:9"} 0"#),
            "{text}"
        );
    }
}
