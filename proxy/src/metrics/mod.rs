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
//! - `tcp_open_connections{direction,listener}`: accepted connections currently open.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::error::ErrorKind;

/// Latency buckets in seconds: 0.5 ms to 30 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
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
pub struct ConnectionLabels {
    pub direction: &'static str,
    pub listener: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_SECONDS)
}

/// Every metric family of the proxy, registered once at start.
pub struct Metrics {
    registry: Registry,
    requests: Family<TrafficLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: HistogramFamily<TrafficLabels>,
    errors: Family<ErrorLabels, Counter>,
    connections: Family<ConnectionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<TrafficLabels, Counter>::default();
        let responses = Family::<ResponseLabels, Counter>::default();
        let latency: HistogramFamily<TrafficLabels> = Family::new_with_constructor(latency_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let connections = Family::<ConnectionLabels, Gauge>::default();
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
        Metrics {
            registry,
            requests,
            responses,
            latency,
            errors,
            connections,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry)
            .expect("writing to a String cannot fail");
        to_prometheus_text(&open_metrics)
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
            labels,
        }
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

/// `prometheus-client` writes OpenMetrics: counter families are named without `_total`, and
/// there are `# UNIT` and `# EOF` lines. The Prometheus text format (what `promtool check
/// metrics` and most scrapers expect by default) names the family like its samples.
pub fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + counters.len() * 16);
    for line in open_metrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

const STATUS_SLOTS: usize = 600;

/// Handles for one (direction, service): the request path only touches atomics; a status code
/// or error seen for the first time resolves its handle once.
pub struct ServiceMetrics {
    labels: TrafficLabels,
    pub requests: Counter,
    pub latency: Histogram,
    responses: Family<ResponseLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    by_status: Vec<OnceLock<Counter>>,
    by_error: Vec<OnceLock<Counter>>,
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
