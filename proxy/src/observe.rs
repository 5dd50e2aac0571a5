//! What the request path reports besides metrics: spans ([`crate::otel`]) and the access log
//! ([`crate::access_log`]). [`Observe`] holds both (each `None` when off); [`Begun`] is what a
//! request carries while either is on. With both off a request pays one check.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use http::{Method, Request, Response, Version};
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry};
use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::otel::{ServerOutcome, ServerSpan, Tracer};
use crate::route::RoutingTable;

/// The tracer and the access log of a running proxy.
#[derive(Clone, Default, Debug)]
pub struct Observe {
    pub tracer: Option<Arc<Tracer>>,
    pub access_log: Option<Arc<AccessLog>>,
}

/// A request being observed: its span, and what the access log and the span need to know
/// once the response goes out.
pub struct Begun {
    pub span: Option<ServerSpan>,
    method: Method,
    path: String,
    version: Version,
    wall: Option<SystemTime>,
    started: Instant,
    /// Whether anything will read what the request was (see [`Observe::begin`]).
    keep: bool,
    routed: OnceLock<Routed>,
}

/// Where routing sent the request.
struct Routed {
    table: Arc<RoutingTable>,
    service: usize,
    route: Option<Arc<str>>,
}

impl Observe {
    /// Starts what the configuration turns on: the span exporter (on the current runtime) and
    /// the access log's writer thread.
    pub fn start(
        config: &ProxyConfig,
        metrics: &Metrics,
    ) -> Result<(Self, Option<crate::otel::export::Flush>), String> {
        let mut observe = Observe::default();
        let mut flush = None;
        if let Some(t) = &config.tracing {
            let service_name = t
                .service_name
                .clone()
                .or_else(|| config.control.as_ref().map(|c| c.service.clone()))
                .unwrap_or_else(|| "cogmesh-proxy".into());
            let (tracer, f) = crate::otel::export::start(t, &service_name, metrics.telemetry.spans.clone())
                .map_err(|e| e.to_string())?;
            observe.tracer = Some(tracer);
            flush = Some(f);
        }
        if let Some(a) = &config.access_log {
            let counters = &metrics.telemetry;
            let log = AccessLog::start(
                a,
                counters.access_log_written.clone(),
                counters.access_log_dropped.clone(),
            )
            .map_err(|e| format!("access_log.path: cannot open {:?}: {e}", a.path))?;
            observe.access_log = Some(Arc::new(log));
        }
        Ok((observe, flush))
    }

    /// `None` when neither spans nor the access log are on.
    pub fn begin<B>(&self, req: &Request<B>, started: Instant) -> Option<Begun> {
        if self.tracer.is_none() && self.access_log.is_none() {
            return None;
        }
        let span = self
            .tracer
            .as_ref()
            .map(|t| t.server_span(req.headers(), started));
        // The path and method are kept only for what will use them: the access log, or a
        // recorded span (an unsampled request allocates nothing here).
        let keep = self.access_log.is_some() || span.as_ref().is_some_and(ServerSpan::is_sampled);
        Some(Begun {
            span,
            method: req.method().clone(),
            path: if keep {
                req.uri().path().to_owned()
            } else {
                String::new()
            },
            version: req.version(),
            wall: self.access_log.as_ref().map(|_| SystemTime::now()),
            started,
            keep,
            routed: OnceLock::new(),
        })
    }

    /// Ends the request's span and writes its access-log line.
    pub fn finish<B>(
        &self,
        begun: Begun,
        response: &Response<B>,
        client_ip: IpAddr,
        listener: (&str, &'static str),
    ) {
        let status = response.status().as_u16();
        let error = response.headers().get(crate::error::ERROR_HEADER).and_then(|v| {
            let kinds = crate::error::ErrorKind::ALL.iter();
            kinds.map(|k| k.label()).find(|l| l.as_bytes() == v.as_bytes())
        });
        let routed = begun.routed.get();
        let service = routed.map(|r| r.table.services[r.service].name.as_str());
        let route = routed.and_then(|r| r.route.as_deref());
        if let Some(log) = &self.access_log {
            let trace_id = begun.span.as_ref().map(ServerSpan::trace_id_hex);
            log.record(&Entry {
                start: begun.wall.unwrap_or_else(SystemTime::now),
                client_ip,
                method: begun.method.as_str(),
                path: &begun.path,
                protocol: protocol(begun.version),
                status,
                duration: begun.started.elapsed(),
                direction: listener.1,
                listener: listener.0,
                service,
                route,
                error,
                trace_id,
            });
        }
        if let (Some(tracer), Some(span)) = (&self.tracer, begun.span) {
            tracer.end_server(
                span,
                &ServerOutcome {
                    method: &begun.method,
                    path: &begun.path,
                    listener: listener.0,
                    direction: listener.1,
                    route,
                    service,
                    status,
                    error,
                },
            );
        }
    }
}

impl Begun {
    /// Whether [`Observe::finish`] has anything to write: an access-log line or a recorded span.
    /// An unsampled request without an access log is done once its trace headers went out.
    pub fn records(&self) -> bool {
        self.keep
    }

    /// Records where routing sent the request.
    pub fn routed(&self, table: &Arc<RoutingTable>, service: usize, route: Option<&Arc<str>>) {
        if !self.keep {
            return;
        }
        let _ = self.routed.set(Routed {
            table: Arc::clone(table),
            service,
            route: route.cloned(),
        });
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}
