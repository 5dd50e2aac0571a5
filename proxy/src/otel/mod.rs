//! OpenTelemetry tracing of proxied requests (`tracing:` in proxy.yaml, off by default).
//!
//! Every request gets a SERVER span (listener, route, service, status, retries), and every
//! upstream attempt a CLIENT span under it (service, endpoint, status, attempt); the CLIENT
//! span's id goes upstream in `traceparent` (see [`propagation`]), so the next sidecar's
//! SERVER span is its child. The caller's `traceparent` (or B3) is the SERVER span's parent.
//!
//! Head sampling: a request whose caller decided follows the decision (`parent_based`, the
//! default); otherwise the trace id decides against `sampling_ratio`, the way OpenTelemetry's
//! `TraceIdRatioBased` sampler does, so every hop with the same ratio agrees. An unsampled
//! request costs a random id, and (without a caller's `traceparent`) the header that carries the
//! "not sampled" decision on; no span is built and no wall clock is read.
//!
//! Spans are the SDK's [`SpanData`], filled in here rather than through the SDK's `Tracer`,
//! so the request path decides and builds exactly what it needs. Finished spans go into a
//! bounded queue (never waiting: a full queue drops the span and counts it in
//! `trace_span_total{result="dropped"}`) that [`export`] drains in batches to the
//! `opentelemetry-otlp` exporter, over OTLP/gRPC (tonic) or OTLP/HTTP protobuf (hyper).
//!
//! A SERVER span ends when the response headers go out (the body streams on afterwards), like
//! `response_latency_seconds`; a CLIENT span when the upstream's response headers arrive.
//!
//! With tracing off the proxy holds no tracer, and the request path pays one `None` check.

pub mod export;
pub mod propagation;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::ConfigError;

// === config ===

/// `tracing:` in proxy.yaml. Changing it needs a restart.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP receiver: `http://host:4317` for gRPC; for HTTP the full URL, or a base URL to
    /// which `/v1/traces` is added.
    pub otlp_endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// The share of traces started here that are recorded, 0 to 1.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// Follow the caller's sampling decision when its trace headers carry one.
    #[serde(default = "default_true")]
    pub parent_based: bool,
    /// `service.name` of the exported resource; default the control-plane service, else
    /// `cogmesh-proxy`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Finished spans waiting for export; more are dropped (and counted).
    #[serde(default = "default_max_queue_spans")]
    pub max_queue_spans: usize,
    /// Spans per export request.
    #[serde(default = "default_max_batch_spans")]
    pub max_batch_spans: usize,
    /// How long a batch waits to fill after its first span.
    #[serde(default = "default_batch_timeout_ms")]
    pub batch_timeout_ms: u64,
    /// An export that takes longer is abandoned (its spans count as failed).
    #[serde(default = "default_export_timeout_ms")]
    pub export_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`).
    Http,
}

pub const DEFAULT_SAMPLING_RATIO: f64 = 1.0;
pub const DEFAULT_MAX_QUEUE_SPANS: usize = 2048;
pub const DEFAULT_MAX_BATCH_SPANS: usize = 512;
pub const DEFAULT_BATCH_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_EXPORT_TIMEOUT_MS: u64 = 10_000;

fn default_sampling_ratio() -> f64 {
    DEFAULT_SAMPLING_RATIO
}
fn default_true() -> bool {
    true
}
fn default_max_queue_spans() -> usize {
    DEFAULT_MAX_QUEUE_SPANS
}
fn default_max_batch_spans() -> usize {
    DEFAULT_MAX_BATCH_SPANS
}
fn default_batch_timeout_ms() -> u64 {
    DEFAULT_BATCH_TIMEOUT_MS
}
fn default_export_timeout_ms() -> u64 {
    DEFAULT_EXPORT_TIMEOUT_MS
}

impl TracingConfig {
    /// The configuration with every default, sending to `otlp_endpoint`.
    pub fn new(otlp_endpoint: String, protocol: OtlpProtocol) -> Self {
        TracingConfig {
            otlp_endpoint,
            protocol,
            sampling_ratio: DEFAULT_SAMPLING_RATIO,
            parent_based: true,
            service_name: None,
            max_queue_spans: DEFAULT_MAX_QUEUE_SPANS,
            max_batch_spans: DEFAULT_MAX_BATCH_SPANS,
            batch_timeout_ms: DEFAULT_BATCH_TIMEOUT_MS,
            export_timeout_ms: DEFAULT_EXPORT_TIMEOUT_MS,
        }
    }

    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            file: file.into(),
            field: format!("tracing.{field}"),
            reason,
        };
        match self.otlp_endpoint.parse::<http::Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {}
            _ => {
                return Err(err(
                    "otlp_endpoint",
                    format!(
                        "expected an http:// or https:// URL, got {:?}",
                        self.otlp_endpoint
                    ),
                ))
            }
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(err(
                "sampling_ratio",
                format!("must be between 0 and 1, got {}", self.sampling_ratio),
            ));
        }
        if self.max_queue_spans == 0 {
            return Err(err("max_queue_spans", "must be at least 1".into()));
        }
        if self.max_batch_spans == 0 || self.max_batch_spans > self.max_queue_spans {
            return Err(err(
                "max_batch_spans",
                format!(
                    "must be between 1 and max_queue_spans ({}), got {}",
                    self.max_queue_spans, self.max_batch_spans
                ),
            ));
        }
        if self.export_timeout_ms == 0 {
            return Err(err("export_timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

// === sampling ===

/// The head-sampling decision for a request with `parent` (the caller's span, if any) and the
/// trace id it will carry. `threshold` comes from [`ratio_threshold`].
pub fn should_sample(
    parent_sampled: Option<bool>,
    parent_based: bool,
    trace_id: &[u8; 16],
    threshold: u64,
) -> bool {
    match parent_sampled {
        Some(decided) if parent_based => decided,
        _ => {
            // As OpenTelemetry's TraceIdRatioBased: the low 63 bits of the trace id's last
            // eight bytes against ratio × 2^63.
            let low = u64::from_be_bytes(trace_id[8..].try_into().expect("eight bytes")) >> 1;
            low < threshold
        }
    }
}

/// `ratio × 2^63`, with 1 sampling every trace.
pub fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio.max(0.0) * (1u64 << 63) as f64) as u64
    }
}

fn random_trace_id() -> [u8; 16] {
    let id = fastrand::u128(1..);
    id.to_be_bytes()
}

fn random_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

// === impl Tracer ===

/// Counters of what became of finished spans.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    pub exported: Counter,
    pub dropped: Counter,
    pub failed: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The counters of tracing and the access log, registered with the proxy's metrics.
#[derive(Clone, Debug)]
pub struct TelemetryCounters {
    pub spans: SpanCounters,
    pub access_log_written: Counter,
    pub access_log_dropped: Counter,
}

impl TelemetryCounters {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let spans = prometheus_client::metrics::family::Family::<ResultLabel, Counter>::default();
        registry.register(
            "trace_span",
            "Finished trace spans: exported, failed (export error) or dropped (queue full)",
            spans.clone(),
        );
        let lines = prometheus_client::metrics::family::Family::<ResultLabel, Counter>::default();
        registry.register(
            "access_log_line",
            "Access log lines written or dropped (queue full)",
            lines.clone(),
        );
        let get = |f: &prometheus_client::metrics::family::Family<ResultLabel, Counter>, result| {
            f.get_or_create(&ResultLabel { result }).clone()
        };
        TelemetryCounters {
            spans: SpanCounters {
                exported: get(&spans, "exported"),
                dropped: get(&spans, "dropped"),
                failed: get(&spans, "failed"),
            },
            access_log_written: get(&lines, "written"),
            access_log_dropped: get(&lines, "dropped"),
        }
    }
}

/// Starts and finishes the spans of proxied requests; shared by every worker.
#[derive(Debug)]
pub struct Tracer {
    queue: mpsc::Sender<SpanData>,
    threshold: u64,
    parent_based: bool,
    scope: InstrumentationScope,
    counters: SpanCounters,
}

/// The SERVER span of one request, and what its upstream attempts propagate.
#[derive(Debug)]
pub struct ServerSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    sampled: bool,
    /// Whether the proxy writes the trace headers upstream: not when an unsampled request
    /// already carries its caller's (they pass on untouched).
    propagate: bool,
    b3: bool,
    /// Wall-clock start, read only for sampled spans.
    start: Option<SystemTime>,
    started: Instant,
    /// Upstream attempts started so far.
    attempts: AtomicU32,
    trace_state: Option<HeaderValue>,
}

/// The CLIENT span of one upstream attempt (sampled requests only).
#[derive(Debug)]
pub struct ClientSpan {
    method: Method,
    span_id: [u8; 8],
    start: SystemTime,
    started: Instant,
    attempt: u32,
}

/// What a finished request tells its SERVER span.
pub struct ServerOutcome<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub listener: &'a str,
    pub direction: &'static str,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    pub status: u16,
    /// The proxy's error label when the proxy failed the request itself.
    pub error: Option<&'static str>,
}

/// What an upstream attempt tells its CLIENT span.
pub struct ClientOutcome<'a> {
    pub service: &'a str,
    pub endpoint: Option<SocketAddr>,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
}

impl ServerSpan {
    /// Whether the span is recorded (and exported).
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The trace id in lower-case hex (for the access log).
    pub fn trace_id_hex(&self) -> String {
        propagation::hex(&self.trace_id)
    }
}

impl Tracer {
    fn new(config: &TracingConfig, queue: mpsc::Sender<SpanData>, counters: SpanCounters) -> Self {
        Tracer {
            queue,
            threshold: ratio_threshold(config.sampling_ratio),
            parent_based: config.parent_based,
            scope: InstrumentationScope::builder("cogmesh-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            counters,
        }
    }

    /// The SERVER span of a request with these headers.
    pub fn server_span(&self, headers: &HeaderMap, started: Instant) -> ServerSpan {
        let parent = propagation::extract(headers);
        let trace_id = parent.map_or_else(random_trace_id, |p| p.trace_id);
        let sampled = should_sample(
            parent.and_then(|p| p.sampled),
            self.parent_based,
            &trace_id,
            self.threshold,
        );
        ServerSpan {
            trace_id,
            span_id: random_span_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            propagate: sampled || parent.is_none(),
            b3: parent.is_some_and(|p| p.format != propagation::Format::W3c),
            start: sampled.then(SystemTime::now),
            started,
            attempts: AtomicU32::new(0),
            trace_state: sampled
                .then(|| headers.get(propagation::TRACESTATE).cloned())
                .flatten(),
        }
    }

    /// Ends a request's SERVER span (a no-op for an unsampled one).
    pub fn end_server(&self, span: ServerSpan, outcome: &ServerOutcome<'_>) {
        let Some(start) = span.start else { return };
        let mut attributes = vec![
            KeyValue::new("http.request.method", outcome.method.as_str().to_owned()),
            KeyValue::new("url.path", outcome.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(outcome.status)),
            KeyValue::new("cogmesh.listener", outcome.listener.to_owned()),
            KeyValue::new("cogmesh.direction", outcome.direction),
            // Every upstream attempt counted one; the first is not a retry.
            KeyValue::new(
                "cogmesh.retries",
                i64::from(span.attempts.load(Ordering::Relaxed).saturating_sub(1)),
            ),
        ];
        if let Some(route) = outcome.route {
            attributes.push(KeyValue::new("cogmesh.route", route.to_owned()));
        }
        if let Some(service) = outcome.service {
            attributes.push(KeyValue::new("cogmesh.service", service.to_owned()));
        }
        if let Some(error) = outcome.error {
            attributes.push(KeyValue::new("error.type", error));
        }
        let name = format!(
            "{} {}",
            outcome.method,
            outcome.service.unwrap_or(outcome.listener)
        );
        let status = status_of(outcome.status, outcome.error);
        let end = start + span.started.elapsed();
        let parent = span.parent.unwrap_or([0; 8]);
        self.finish(
            &span,
            span.span_id,
            parent,
            span.parent.is_some(),
            SpanKind::Server,
            name,
            (start, end),
            attributes,
            status,
        );
    }

    /// Starts the CLIENT span of an upstream attempt and writes the trace headers of the next
    /// hop into `headers`. `None` for an unsampled request.
    pub fn start_client(
        &self,
        server: &ServerSpan,
        method: &Method,
        headers: &mut HeaderMap,
    ) -> Option<ClientSpan> {
        let attempt = server.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if !server.sampled {
            if server.propagate {
                propagation::inject(headers, &server.trace_id, &server.span_id, false, server.b3);
            }
            return None;
        }
        let span_id = random_span_id();
        propagation::inject(headers, &server.trace_id, &span_id, true, server.b3);
        Some(ClientSpan {
            method: method.clone(),
            span_id,
            start: SystemTime::now(),
            started: Instant::now(),
            attempt,
        })
    }

    /// Ends an attempt's CLIENT span.
    pub fn end_client(&self, server: &ServerSpan, span: ClientSpan, outcome: &ClientOutcome<'_>) {
        let mut attributes = vec![
            KeyValue::new("http.request.method", span.method.as_str().to_owned()),
            KeyValue::new("cogmesh.service", outcome.service.to_owned()),
            KeyValue::new("cogmesh.attempt", i64::from(span.attempt)),
        ];
        if let Some(endpoint) = outcome.endpoint {
            attributes.push(KeyValue::new("server.address", endpoint.ip().to_string()));
            attributes.push(KeyValue::new("server.port", i64::from(endpoint.port())));
        }
        if let Some(status) = outcome.status {
            attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(error) = outcome.error {
            attributes.push(KeyValue::new("error.type", error));
        }
        let status = status_of(outcome.status.unwrap_or(0), outcome.error);
        let end = span.start + span.started.elapsed();
        self.finish(
            server,
            span.span_id,
            server.span_id,
            false,
            SpanKind::Client,
            format!("{} {}", span.method, outcome.service),
            (span.start, end),
            attributes,
            status,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        server: &ServerSpan,
        span_id: [u8; 8],
        parent: [u8; 8],
        parent_is_remote: bool,
        kind: SpanKind,
        name: String,
        (start_time, end_time): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) {
        let trace_state = server
            .trace_state
            .as_ref()
            .and_then(|v| v.to_str().ok()?.parse::<TraceState>().ok())
            .unwrap_or_default();
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(server.trace_id),
                SpanId::from_bytes(span_id),
                TraceFlags::SAMPLED,
                false,
                trace_state,
            ),
            parent_span_id: SpanId::from_bytes(parent),
            parent_span_is_remote: parent_is_remote,
            span_kind: kind,
            name: Cow::Owned(name),
            start_time,
            end_time,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        };
        if self.queue.try_send(span).is_err() {
            self.counters.dropped.inc();
        }
    }
}

/// OpenTelemetry's HTTP rule: 5xx (or a failure without a status) is an error; 4xx is not an
/// error of a SERVER span, but the proxy's own refusals carry their error label.
fn status_of(status: u16, error: Option<&'static str>) -> Status {
    match error {
        Some(label) => Status::error(label),
        None if status >= 500 || status == 0 => Status::error(""),
        None => Status::Unset,
    }
}

/// How long the proxy waits, at shutdown, for the last spans to be exported.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_sampling_follows_the_trace_id() {
        let all = ratio_threshold(1.0);
        let none = ratio_threshold(0.0);
        let half = ratio_threshold(0.5);
        let mut low = [0u8; 16];
        low[15] = 2;
        let mut high = [0xffu8; 16];
        high[0] = 0;
        assert!(should_sample(None, true, &high, all));
        assert!(!should_sample(None, true, &low, none));
        assert!(should_sample(None, true, &low, half));
        assert!(!should_sample(None, true, &high, half));
        // A caller's decision wins when parent-based, not otherwise.
        assert!(should_sample(Some(true), true, &high, none));
        assert!(!should_sample(Some(false), true, &low, all));
        assert!(should_sample(Some(false), false, &low, all));
        // About the ratio over many random ids.
        let one_percent = ratio_threshold(0.01);
        let hits = (0..100_000)
            .filter(|_| should_sample(None, true, &random_trace_id(), one_percent))
            .count();
        assert!((700..1300).contains(&hits), "{hits}");
    }

    #[tokio::test]
    async fn unsampled_requests_propagate_without_spans() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut config = TracingConfig::new("http://127.0.0.1:4317".into(), OtlpProtocol::Grpc);
        config.sampling_ratio = 0.0;
        let tracer = Tracer::new(&config, tx, SpanCounters::default());
        let span = tracer.server_span(&HeaderMap::new(), Instant::now());
        let mut upstream = HeaderMap::new();
        assert!(tracer.start_client(&span, &Method::GET, &mut upstream).is_none());
        let sent = propagation::parse_traceparent(upstream[propagation::TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent.sampled, Some(false));
        assert_eq!(sent.trace_id, span.trace_id);
        // A caller's unsampled traceparent passes on untouched.
        let mut caller = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        caller.insert(propagation::TRACEPARENT, HeaderValue::from_static(tp));
        let span = tracer.server_span(&caller, Instant::now());
        assert!(tracer.start_client(&span, &Method::GET, &mut caller).is_none());
        assert_eq!(caller[propagation::TRACEPARENT], tp);
        tracer.end_server(
            span,
            &ServerOutcome {
                method: &Method::GET,
                path: "/",
                listener: "l",
                direction: "outbound",
                route: None,
                service: None,
                status: 200,
                error: None,
            },
        );
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn sampled_spans_are_parented_and_a_full_queue_drops() {
        let (tx, mut rx) = mpsc::channel(1);
        let config = TracingConfig::new("http://127.0.0.1:4317".into(), OtlpProtocol::Grpc);
        let counters = SpanCounters::default();
        let tracer = Tracer::new(&config, tx, counters.clone());
        let mut headers = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(propagation::TRACEPARENT, HeaderValue::from_static(tp));
        let server = tracer.server_span(&headers, Instant::now());
        let client = tracer.start_client(&server, &Method::GET, &mut headers).unwrap();
        let sent = propagation::parse_traceparent(headers[propagation::TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent.span_id, client.span_id);
        let outcome = ClientOutcome {
            service: "web",
            endpoint: Some("127.0.0.1:8080".parse().unwrap()),
            status: Some(200),
            error: None,
        };
        tracer.end_client(&server, client, &outcome);
        let span = rx.try_recv().unwrap();
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(span.parent_span_id, SpanId::from_bytes(server.span_id));
        assert_eq!(span.span_context.trace_id(), TraceId::from_bytes(server.trace_id));
        // The queue holds one span: the second is dropped and counted.
        let client = tracer.start_client(&server, &Method::GET, &mut headers).unwrap();
        tracer.end_client(&server, client, &outcome);
        let client = tracer.start_client(&server, &Method::GET, &mut headers).unwrap();
        tracer.end_client(&server, client, &outcome);
        assert_eq!(counters.dropped.get(), 1);
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::ProxyConfig;

    const BASE: &str = r#"
listeners: [{ name: out, address: "127.0.0.1:4140", default_service: web }]
services: [{ name: web, endpoints: ["127.0.0.1:8080"] }]
"#;

    fn load(extra: &str) -> Result<ProxyConfig, crate::config::ConfigError> {
        ProxyConfig::from_yaml("proxy.yaml", &format!("{BASE}{extra}"))
    }

    #[test]
    fn tracing_and_access_log_parse_with_defaults() {
        let c = load("tracing: { otlp_endpoint: \"http://127.0.0.1:4318\", protocol: http }\naccess_log: { format: json }\n")
            .unwrap();
        let t = c.tracing.unwrap();
        assert_eq!(t.protocol, super::OtlpProtocol::Http);
        assert_eq!(t.sampling_ratio, 1.0);
        assert!(t.parent_based);
        assert_eq!(t.max_queue_spans, super::DEFAULT_MAX_QUEUE_SPANS);
        assert_eq!(c.access_log.unwrap().path, "stdout");
        assert!(load("").unwrap().tracing.is_none());
    }

    #[test]
    fn bad_tracing_and_access_log_fields_are_refused_with_their_path() {
        let cases = [
            (
                "tracing: { otlp_endpoint: \"127.0.0.1:4317\" }",
                "tracing.otlp_endpoint",
                "http:// or https://",
            ),
            (
                "tracing: { otlp_endpoint: \"http://c:4317\", sampling_ratio: 2 }",
                "tracing.sampling_ratio",
                "between 0 and 1",
            ),
            (
                "tracing: { otlp_endpoint: \"http://c:4317\", max_batch_spans: 4096 }",
                "tracing.max_batch_spans",
                "max_queue_spans",
            ),
            (
                "access_log: { format: \"{status} {nope}\" }",
                "access_log.format",
                "unknown field {nope}",
            ),
        ];
        for (extra, field, reason) in cases {
            let e = load(extra).unwrap_err();
            assert_eq!(
                (e.file.as_str(), e.field.as_str()),
                ("proxy.yaml", field),
                "{extra}: {e:?}"
            );
            assert!(e.reason.contains(reason), "{extra}: {}", e.reason);
        }
        let e = load("tracing: { otlp_endpoint: \"http://c:4317\", protocol: udp }").unwrap_err();
        assert!(e.field.starts_with("tracing"), "{e:?}");
    }
}
