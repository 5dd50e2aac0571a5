//! The HTTP/1.1 relay: the fast lane of a plaintext HTTP/1.1 connection.
//!
//! Most requests through a sidecar are plain: a method, a path, a handful of headers, perhaps a
//! body of known length, answered by a response of known length or chunked. For those, the full
//! request path (hyper's server parsing into a `HeaderMap`, the tower of policies, hyper's
//! client encoding the request again on a connection driven by a task of its own, and the same
//! once more for the response) costs about twice the CPU of nginx per request. The relay
//! serves them itself: it parses the head in place (`httparse`), routes on it, rewrites it for
//! the hop into one buffer (RFC 9110 hop-by-hop headers removed, `x-forwarded-*` set, names in
//! lower case as hyper writes them), and sends it on an upstream connection of its own pool,
//! driven by the client connection's own task; the response head is rewritten the same way and
//! the body bytes are copied as they come, framing kept (`content-length` or chunked).
//!
//! Whatever the relay does not handle goes to the full path, for that request and the rest of
//! the connection: the bytes read so far are handed over unconsumed ([`Ended::Handoff`]), so the
//! full path sees the connection as if it had been its own from the start. That covers every
//! request the relay does not recognise as plain — HTTP/1.0, `Expect`, `Upgrade`,
//! `Transfer-Encoding` on a request, an absolute-form target, gRPC, a malformed or oversize head
//! (which the full path answers with 400 or 431) — and every route or service with something
//! the relay does not do: a rate limit, admission control, authorization, security headers, a
//! cache or compression policy, retries, a request or stream-idle timeout, ring-hash affinity,
//! TLS or HTTP/2 upstream, and the access log. It also covers a `max_connections` limit reached
//! with no idle connection to borrow, which the full path may still serve from its own pool.
//!
//! What the relay does do, it does as the full path does: the same balancer pick, in-flight
//! count, breaker permit, `max_connections` slot per upstream connection, response timeout,
//! ORCA load reports (read, counted, stripped unless forwarded), what an answer or a failure
//! tells the balancer and the outlier detector, the same metrics, the same spans (the trace
//! headers of the next hop, a SERVER and a CLIENT span when sampled), and the same error
//! responses (503 `overloaded` / `no_endpoints`, 502, 504, with the cause in the body and
//! `x-cogmesh-error`). A pooled upstream connection found closed when the request goes out is
//! replaced by a fresh one, as hyper's pool does.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::HeaderName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::{observe_answer, observe_failure, Shared};
use crate::balance::{orca, Endpoint, InFlight};
use crate::breaker::ConnectionPermit;
use crate::config::UpstreamProtocol;
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::ServiceMetrics;
use crate::route::{Origination, RouteInput, RoutingTable};

/// Header fields the relay parses in one head; a head with more goes to the full path, which
/// applies the configured limit (431).
const MAX_HEADERS: usize = 100;
/// How much is read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Attempts on pooled connections that turn out closed, before a fresh one.
const STALE_RETRIES: usize = 2;

/// What the relay needs of the connection's listener.
pub struct Lane {
    pub shared: Arc<Shared>,
    pub listener: usize,
    /// The client's address as `x-forwarded-for` gets it.
    pub client_ip: String,
    /// Every request of the connection goes to this service (transparent capture).
    pub pinned: Option<Arc<str>>,
    /// Set when the proxy drains: idle connections close, busy ones after their response.
    pub stop: watch::Receiver<bool>,
    pub header_read_timeout: Duration,
}

/// How a connection left the relay.
pub enum Ended<IO> {
    /// Closed (by either side, after an error, or drained).
    Closed,
    /// The rest goes to the full request path; the bytes are what was read and not served.
    Handoff(IO, BytesMut),
}

/// Whether the relay may serve this listener's connections at all: not while the access log is
/// on, which needs the full path's view of every request. (Spans it records itself.)
pub fn enabled(shared: &Shared) -> bool {
    shared.observe.access_log.is_none()
}

/// Serves the connection's plain requests until it closes or a request needs the full path.
pub async fn serve<IO>(mut io: IO, mut lane: Lane) -> Ended<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut work = Work {
        out: Vec::with_capacity(1024),
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        trace_headers: http::HeaderMap::new(),
    };
    // The first head must arrive within the header-read timeout of the connection's start;
    // later ones within it of their first byte.
    let mut deadline = Some(Instant::now() + lane.header_read_timeout);
    loop {
        match exchange(&mut io, &mut buf, &mut lane, &mut work, deadline).await {
            Next::KeepAlive => deadline = None,
            Next::Close => {
                let _ = io.shutdown().await;
                return Ended::Closed;
            }
            Next::Drop => return Ended::Closed,
            Next::Handoff => return Ended::Handoff(io, buf),
        }
    }
}

/// Buffers reused by every exchange of a connection.
struct Work {
    /// The head (and first body bytes) being written.
    out: Vec<u8>,
    /// What the upstream sent.
    rbuf: BytesMut,
    /// With tracing on, the request's trace headers, then the next hop's (kept for its
    /// capacity).
    trace_headers: http::HeaderMap,
}

enum Next {
    KeepAlive,
    /// Close after what was written.
    Close,
    /// Close at once (the client is gone).
    Drop,
    Handoff,
}

/// The plain request at the start of the buffer, ready to go upstream.
struct Head {
    /// Bytes of the head in the buffer.
    len: usize,
    /// `content-length`, 0 without one.
    body: u64,
    service: usize,
    /// Safe to send again when the upstream closed without answering.
    idempotent: bool,
    /// A HEAD request: the response has no body, whatever its headers say.
    head_method: bool,
    /// The client asked to close after this exchange.
    close: bool,
    /// With tracing on: what the request's spans need (boxed: most requests have none).
    trace: Option<Box<Trace>>,
}

/// What the spans of a relayed request need of its head.
struct Trace {
    server: crate::otel::ServerSpan,
    client: Option<crate::otel::ClientSpan>,
    method: http::Method,
    path: String,
    route: Option<Arc<str>>,
}

/// The spans of a relayed request: the SERVER span and the CLIENT span of its one attempt.
struct Traced {
    tracer: Arc<crate::otel::Tracer>,
    trace: Box<Trace>,
    table: Arc<RoutingTable>,
    listener: usize,
    service: usize,
}

impl Traced {
    /// The spans of a recorded request, to be ended with its outcome.
    fn start(
        tracer: &Arc<crate::otel::Tracer>,
        trace: Box<Trace>,
        (table, listener, service): (&Arc<RoutingTable>, usize, usize),
    ) -> Traced {
        Traced {
            tracer: Arc::clone(tracer),
            trace,
            table: Arc::clone(table),
            listener,
            service,
        }
    }

    /// Ends both spans: the answer's status, or the proxy's error.
    fn finish(self, status: u16, error: Option<&'static str>, endpoint: Option<SocketAddr>) {
        let service = self.table.services[self.service].name.as_str();
        if let Some(client) = self.trace.client {
            let outcome = crate::otel::ClientOutcome {
                service,
                endpoint,
                status: error.is_none().then_some(status),
                error,
            };
            self.tracer.end_client(&self.trace.server, client, &outcome);
        }
        let listener = &self.table.listeners[self.listener];
        let outcome = crate::otel::ServerOutcome {
            method: &self.trace.method,
            path: &self.trace.path,
            listener: &listener.name,
            direction: listener.direction.as_str(),
            route: self.trace.route.as_deref(),
            service: Some(service),
            status,
            error,
        };
        self.tracer.end_server(self.trace.server, &outcome);
    }
}

/// The headers trace context travels in.
fn is_trace_header(name: &str) -> bool {
    ["traceparent", "tracestate", "b3"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        || name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("x-b3-"))
}

enum Inspected {
    Partial,
    Handoff,
    Relay(Head),
}

/// One request and its response.
async fn exchange<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    lane: &mut Lane,
    work: &mut Work,
    mut deadline: Option<Instant>,
) -> Next
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let max_head = lane.shared.limits.max_request_header_bytes;
    let max_headers = lane.shared.limits.max_request_headers.min(MAX_HEADERS);
    let (head, table) = loop {
        if !buf.is_empty() {
            // The table in force when the head is complete (a reload may swap it while the
            // connection waits for its next request).
            let table = lane.shared.table.load_full();
            match inspect(
                buf,
                &table,
                lane,
                max_headers,
                &mut work.trace_headers,
                &mut work.out,
            ) {
                // Over the head limit: the full path answers 431.
                Inspected::Relay(head) if head.len > max_head => return Next::Handoff,
                Inspected::Relay(head) => break (head, table),
                Inspected::Handoff => return Next::Handoff,
                Inspected::Partial if buf.len() >= max_head => return Next::Handoff,
                Inspected::Partial => {
                    deadline.get_or_insert_with(|| Instant::now() + lane.header_read_timeout);
                }
            }
        } else if *lane.stop.borrow() {
            return Next::Close;
        }
        match read_head_bytes(io, buf, &mut lane.stop, deadline).await {
            HeadRead::More => {}
            HeadRead::Eof if buf.is_empty() => return Next::Drop,
            // A head cut short: the full path answers it as it would.
            HeadRead::Eof => return Next::Handoff,
            HeadRead::Stop | HeadRead::TimedOut | HeadRead::Failed => return Next::Drop,
        }
    };
    let start = Instant::now();
    let mut head = head;
    let mut traced = match (head.trace.take(), &lane.shared.observe.tracer) {
        (Some(trace), Some(tracer)) => Some(Traced::start(
            tracer,
            trace,
            (&table, lane.listener, head.service),
        )),
        _ => None,
    };
    work.out.extend_from_slice(b"\r\n");
    let service = &table.services[head.service];
    let metrics = &table.listeners[lane.listener].metrics[head.service];
    let at = At {
        head: &head,
        metrics,
        service,
        start,
    };
    let mut permit = match service.breaker.try_request() {
        Ok(permit) => permit,
        Err(threshold) => {
            metrics.requests.inc();
            let err = ProxyError::Overloaded {
                service: service.name.clone(),
                threshold,
            };
            return fail(io, buf, &at, None, err, &mut traced).await;
        }
    };
    let Some(endpoint) = service.endpoints.pick(None) else {
        metrics.requests.inc();
        let err = ProxyError::NoEndpoints {
            service: service.name.clone(),
        };
        return fail(io, buf, &at, None, err, &mut traced).await;
    };
    let endpoint = Arc::clone(endpoint);
    let (mut upstream, mut pooled) = match endpoint.relay.take() {
        Some(u) => (u, true),
        None => {
            // Over `max_connections` the full path may still borrow another worker's
            // connection, or answers 503 itself.
            match service.breaker.connection_slot() {
                Some(slot) => {
                    metrics.requests.inc();
                    match connect(endpoint.addr, lane.shared.upstreams.connect_timeout(), slot).await {
                        Ok(u) => (u, false),
                        Err(err) => return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await,
                    }
                }
                None => match endpoint.relay.borrow() {
                    Some(u) => (u, true),
                    None => return Next::Handoff,
                },
            }
        }
    };
    if pooled {
        metrics.requests.inc();
    }
    let _in_flight = InFlight::start(Arc::clone(&endpoint));
    let buffered = (head.body).min((buf.len() - head.len) as u64) as usize;
    let whole = buffered as u64 == head.body;
    work.out.extend_from_slice(&buf[head.len..head.len + buffered]);
    let mut sent_at = Instant::now();
    let mut stale = 0;
    // Send the request; on a pooled connection the upstream closed meanwhile, again on another.
    let answer = loop {
        if let Err(e) = upstream.stream.write_all(&work.out).await {
            if pooled && stale < STALE_RETRIES && whole {
                stale += 1;
                (upstream, pooled) = match replacement(&endpoint, service, lane).await {
                    Ok(next) => next,
                    Err(err) => return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await,
                };
                continue;
            }
            let err = reset(endpoint.addr, &e);
            return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await;
        }
        if !whole {
            buf.advance(head.len + buffered);
            let left = head.body - buffered as u64;
            match copy_exact(io, &mut upstream.stream, left, &mut work.rbuf).await {
                Ok(()) => {}
                Err(CopyError::Source(_)) => return Next::Drop,
                Err(CopyError::Sink(e)) => {
                    let err = reset(endpoint.addr, &e);
                    return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await;
                }
            }
        }
        let waited = read_answer(&mut upstream.stream, &mut work.rbuf, head.head_method);
        let answer = match service.response_timeout {
            None => waited.await,
            Some(after) => match tokio::time::timeout(after, waited).await {
                Ok(answer) => answer,
                Err(_) => {
                    let err = ProxyError::UpstreamTimeout {
                        endpoint: endpoint.addr,
                        after,
                    };
                    return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await;
                }
            },
        };
        match answer {
            Ok(answer) => break answer,
            Err(AnswerError::Closed) if pooled && stale < STALE_RETRIES && whole && head.idempotent => {
                stale += 1;
                (upstream, pooled) = match replacement(&endpoint, service, lane).await {
                    Ok(next) => next,
                    Err(err) => return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await,
                };
                sent_at = Instant::now();
            }
            Err(e) => {
                let err = ProxyError::UpstreamReset {
                    endpoint: endpoint.addr,
                    cause: e.to_string(),
                };
                return fail(io, buf, &at, Some(&endpoint), err, &mut traced).await;
            }
        }
    };
    permit.answered();
    if whole {
        buf.advance(head.len + buffered);
    }
    let close = head.close || *lane.stop.borrow() || answer.framing == Framing::UntilClose;
    work.out.clear();
    {
        let rhead = &work.rbuf[..answer.head_len];
        let reported = respond_head(rhead, &answer, close, service.forward_load_reports, &mut work.out);
        metrics.latency.observe(start.elapsed());
        metrics.response(answer.code);
        super::record_load_report(&endpoint, metrics, reported);
        if let Some(t) = traced.take() {
            t.finish(answer.code, None, Some(endpoint.addr));
        }
        observe_answer(
            service,
            &endpoint,
            answer.code,
            answer.retry_after.as_deref(),
            sent_at.elapsed(),
        );
    }
    work.rbuf.advance(answer.head_len);
    let relayed = relay_body(
        io,
        &mut upstream.stream,
        answer.framing,
        &mut work.rbuf,
        &mut work.out,
    )
    .await;
    match relayed {
        Ok(true) if !answer.upstream_close => endpoint.relay.put(upstream),
        Ok(_) => {}
        Err(CopyError::Source(e)) => {
            // The client got part of the body: closing tells it so.
            tracing::debug!(endpoint = %endpoint.addr, "upstream body ended early: {e}");
            return Next::Close;
        }
        Err(CopyError::Sink(_)) => return Next::Drop,
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

enum HeadRead {
    More,
    Eof,
    Stop,
    TimedOut,
    Failed,
}

/// Reads more of a request head: waits for the drain while the connection is idle, and for
/// the deadline (the header-read timeout) once one is set.
async fn read_head_bytes<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    stop: &mut watch::Receiver<bool>,
    deadline: Option<Instant>,
) -> HeadRead
where
    IO: AsyncRead + Unpin,
{
    buf.reserve(READ_CHUNK);
    let idle = buf.is_empty();
    let read = io.read_buf(buf);
    let result = match deadline {
        None => tokio::select! {
            r = read => r,
            _ = stop.changed(), if idle => return HeadRead::Stop,
        },
        Some(at) => tokio::select! {
            r = read => r,
            _ = stop.changed(), if idle => return HeadRead::Stop,
            _ = tokio::time::sleep_until(at) => return HeadRead::TimedOut,
        },
    };
    match result {
        Ok(0) => HeadRead::Eof,
        Ok(_) => HeadRead::More,
        Err(_) => HeadRead::Failed,
    }
}

/// A request head as route matching reads it.
struct RawHead<'a> {
    host: Option<&'a str>,
    path: &'a str,
    headers: &'a [httparse::Header<'a>],
}

impl RouteInput for RawHead<'_> {
    fn host(&self) -> Option<&str> {
        self.host
    }

    fn path(&self) -> &str {
        self.path.split('?').next().unwrap_or(self.path)
    }

    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
            .map(|h| h.value)
    }
}

/// Parses the head at the start of `buf` and decides: plain and routed to a service the relay
/// serves (the head rewritten for the hop into `out`), not complete yet, or for the full path.
fn inspect(
    buf: &[u8],
    table: &RoutingTable,
    lane: &Lane,
    max_headers: usize,
    incoming: &mut http::HeaderMap,
    out: &mut Vec<u8>,
) -> Inspected {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage[..max_headers]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Inspected::Partial,
        Err(_) => return Inspected::Handoff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Inspected::Handoff;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Inspected::Handoff;
    }
    let mut host = None;
    let mut body = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Inspected::Handoff;
            }
            match visible(h.value) {
                Some(v) => host = Some(v),
                None => return Inspected::Handoff,
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let parsed = visible(h.value).and_then(|v| v.trim().parse::<u64>().ok());
            match (body, parsed) {
                (None, Some(n)) => body = Some(n),
                _ => return Inspected::Handoff,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    // Upgrades, and headers the connection names as hop-by-hop.
                    return Inspected::Handoff;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
            || (name.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"application/grpc"))
        {
            return Inspected::Handoff;
        }
    }
    let Some(host) = host else {
        return Inspected::Handoff;
    };
    let service = match &lane.pinned {
        None => {
            let raw = RawHead {
                host: Some(host),
                path,
                headers: req.headers,
            };
            let matched = table.route_match_by(lane.listener, &raw);
            let plain = matched.rate_limit.is_none() && matched.policy.is_none() && matched.access.is_none();
            match matched.service {
                Some(s) if plain => (s, matched.route.cloned()),
                _ => return Inspected::Handoff,
            }
        }
        Some(name) => match table.services.iter().position(|s| *s.name == **name) {
            Some(s) => (s, None),
            None => return Inspected::Handoff,
        },
    };
    let (service, route) = service;
    let routes = &table.listeners[lane.listener];
    let s = &table.services[service];
    let relayable = routes.rate_limit.is_none()
        && routes.authorization.is_none()
        && table.admission.is_none()
        && s.protocol != UpstreamProtocol::Http2
        && matches!(s.origination, Origination::Plaintext)
        && s.retry.max_attempts <= 1
        && s.request_timeout.is_none()
        && s.stream_idle_timeout.is_none()
        && s.hash_key.is_none();
    if !relayable {
        return Inspected::Handoff;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = None;
    let tracing = lane.shared.observe.tracer.is_some();
    if tracing {
        incoming.clear();
    }
    for h in req.headers.iter() {
        let name = h.name;
        if tracing && is_trace_header(name) {
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(h.value),
            ) else {
                return Inspected::Handoff;
            };
            incoming.append(n, v);
            continue;
        }
        if is_hop_by_hop(name)
            && !(name.eq_ignore_ascii_case("te") && h.value.eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.get_or_insert(h.value);
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-proto") {
            continue;
        }
        put_header(out, name, h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = forwarded_for {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(lane.client_ip.as_bytes());
    // The blank line comes after the trace headers (see `exchange`).
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    let idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
    let trace = match &lane.shared.observe.tracer {
        None => None,
        Some(tracer) => {
            let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
                return Inspected::Handoff;
            };
            let server = tracer.server_span(incoming, Instant::now());
            // The request's trace headers, as the tracer rewrites them for the next hop.
            let client = tracer.start_client(&server, &method, incoming);
            for (name, value) in &*incoming {
                put_header(out, name.as_str(), value.as_bytes());
            }
            // An unsampled request is done with tracing once its headers are written.
            server.is_sampled().then(|| {
                Box::new(Trace {
                    server,
                    client,
                    method,
                    path: path.split('?').next().unwrap_or(path).to_owned(),
                    route,
                })
            })
        }
    };
    Inspected::Relay(Head {
        len,
        body: body.unwrap_or(0),
        service,
        idempotent,
        head_method: method == "HEAD",
        close,
        trace,
    })
}

/// The hop-by-hop headers of RFC 9110 §7.6.1 and the legacy `Proxy-Connection` (as
/// [`super::headers::strip_hop_by_hop`] removes them).
fn is_hop_by_hop(name: &str) -> bool {
    super::headers::HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// A header value as text, if it is printable ASCII (what `HeaderValue::to_str` accepts).
fn visible(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// `name: value\r\n`, the name in lower case as hyper writes it.
fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body: a response to HEAD, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Neither length nor chunked: the body runs until the upstream closes.
    UntilClose,
}

/// The response head at the start of `rbuf`.
#[derive(Debug)]
struct Answer {
    head_len: usize,
    code: u16,
    framing: Framing,
    /// The upstream will close the connection after this response.
    upstream_close: bool,
    retry_after: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
}

/// Reads the response head (skipping informational 1xx heads) into `rbuf`.
async fn read_answer(
    upstream: &mut TcpStream,
    rbuf: &mut BytesMut,
    head_method: bool,
) -> Result<Answer, AnswerError> {
    rbuf.clear();
    loop {
        if !rbuf.is_empty() {
            match parse_answer(rbuf, head_method)? {
                Some(answer) if (100..200).contains(&answer.code) => {
                    if answer.code == 101 {
                        return Err(AnswerError::Malformed("101 without an upgrade"));
                    }
                    rbuf.advance(answer.head_len);
                    continue;
                }
                Some(answer) => return Ok(answer),
                None => {}
            }
        }
        rbuf.reserve(READ_CHUNK);
        if upstream.read_buf(rbuf).await? == 0 {
            return Err(AnswerError::Closed);
        }
    }
}

fn parse_answer(rbuf: &[u8], head_method: bool) -> Result<Option<Answer>, AnswerError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let head_len = match resp.parse(rbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if rbuf.len() > 64 * 1024 => {
            return Err(AnswerError::Malformed("head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(AnswerError::Malformed("not HTTP/1.x")),
    };
    let code = resp.code.ok_or(AnswerError::Malformed("no status"))?;
    let mut length = None;
    let mut chunked = false;
    let mut coded = false;
    let mut upstream_close = resp.version == Some(0);
    let mut retry_after = None;
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = visible(h.value)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(AnswerError::Malformed("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(AnswerError::Malformed("two content-lengths"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                }
            }
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(h.value.to_vec());
        }
    }
    let framing = if head_method || matches!(code, 100..=199 | 204 | 304) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if coded {
        Framing::UntilClose
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Some(Answer {
        head_len,
        code,
        framing,
        upstream_close: upstream_close || framing == Framing::UntilClose,
        retry_after,
    }))
}

/// Writes the response head for the client into `out` (hop-by-hop headers and the headers the
/// upstream's `Connection` names removed, the load report stripped unless forwarded) and
/// returns the load report it carried.
fn respond_head(
    rhead: &[u8],
    answer: &Answer,
    close: bool,
    forward_reports: bool,
    out: &mut Vec<u8>,
) -> Result<Option<orca::LoadReport>, orca::ReportError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    // Parsed before, so it parses again.
    let _ = resp.parse(rhead);
    let _ = write!(
        Bytes(out),
        "HTTP/1.1 {} {}\r\n",
        answer.code,
        resp.reason
            .filter(|r| !r.is_empty())
            .or_else(|| http::StatusCode::from_u16(answer.code).ok()?.canonical_reason())
            .unwrap_or("")
    );
    let named: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect();
    for h in resp.headers.iter() {
        let name = h.name;
        let te_trailers = name.eq_ignore_ascii_case("te") && h.value.eq_ignore_ascii_case(b"trailers");
        if (is_hop_by_hop(name) && !te_trailers)
            || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            || (!forward_reports && name.eq_ignore_ascii_case(orca::LOAD_HEADER.as_str()))
        {
            continue;
        }
        put_header(out, name, h.value);
    }
    if answer.framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    orca::from_values(
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(orca::LOAD_HEADER.as_str()))
            .map(|h| h.value),
    )
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

enum CopyError {
    /// Reading failed (or ended early).
    Source(io::Error),
    /// Writing failed.
    Sink(io::Error),
}

/// Sends the response head in `out` and the body after it: the part already in `rbuf`, then
/// what the upstream sends until the framing says the body ended. `Ok(true)`: the upstream
/// connection may serve another request.
async fn relay_body<IO>(
    io: &mut IO,
    upstream: &mut TcpStream,
    framing: Framing,
    rbuf: &mut BytesMut,
    out: &mut Vec<u8>,
) -> Result<bool, CopyError>
where
    IO: AsyncWrite + Unpin,
{
    match framing {
        Framing::Empty => {
            io.write_all(out).await.map_err(CopyError::Sink)?;
            Ok(rbuf.is_empty())
        }
        Framing::Length(n) => {
            let here = n.min(rbuf.len() as u64) as usize;
            out.extend_from_slice(&rbuf[..here]);
            let extra = rbuf.len() > here;
            rbuf.clear();
            io.write_all(out).await.map_err(CopyError::Sink)?;
            copy_exact(upstream, io, n - here as u64, rbuf).await?;
            Ok(!extra)
        }
        Framing::Chunked => {
            let mut end = ChunkedEnd::default();
            let mut first = true;
            loop {
                let found = end
                    .feed(rbuf)
                    .map_err(|()| CopyError::Source(io::Error::other("malformed chunked body")))?;
                let upto = found.unwrap_or(rbuf.len());
                if first {
                    out.extend_from_slice(&rbuf[..upto]);
                    io.write_all(out).await.map_err(CopyError::Sink)?;
                    first = false;
                } else {
                    io.write_all(&rbuf[..upto]).await.map_err(CopyError::Sink)?;
                }
                if found.is_some() {
                    return Ok(upto == rbuf.len());
                }
                rbuf.clear();
                rbuf.reserve(READ_CHUNK);
                match upstream.read_buf(rbuf).await {
                    Ok(0) => return Err(CopyError::Source(io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                    Err(e) => return Err(CopyError::Source(e)),
                }
            }
        }
        Framing::UntilClose => {
            out.extend_from_slice(rbuf);
            rbuf.clear();
            io.write_all(out).await.map_err(CopyError::Sink)?;
            loop {
                rbuf.clear();
                rbuf.reserve(READ_CHUNK);
                match upstream.read_buf(rbuf).await {
                    Ok(0) => return Ok(false),
                    Ok(_) => io.write_all(rbuf).await.map_err(CopyError::Sink)?,
                    Err(e) => return Err(CopyError::Source(e)),
                }
            }
        }
    }
}

/// Copies exactly `n` bytes from `from` to `to` through `scratch`.
async fn copy_exact<R, W>(
    from: &mut R,
    to: &mut W,
    mut n: u64,
    scratch: &mut BytesMut,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while n > 0 {
        scratch.clear();
        scratch.reserve(READ_CHUNK);
        let want = n.min(READ_CHUNK as u64) as usize;
        let mut limited = (&mut *from).take(want as u64);
        match limited.read_buf(scratch).await {
            Ok(0) => return Err(CopyError::Source(io::ErrorKind::UnexpectedEof.into())),
            Ok(got) => {
                to.write_all(&scratch[..got]).await.map_err(CopyError::Sink)?;
                n -= got as u64;
            }
            Err(e) => return Err(CopyError::Source(e)),
        }
    }
    Ok(())
}

/// Where an exchange is: its request, its service and metrics, and when it began.
#[derive(Clone, Copy)]
struct At<'a> {
    head: &'a Head,
    metrics: &'a ServiceMetrics,
    service: &'a crate::route::Service,
    start: Instant,
}

/// Answers a request the relay failed itself, as the full path does: counted, told to the
/// balancer (when an endpoint was involved), logged, and a plain-text response naming the
/// cause. The connection stays open when the whole request had been read.
async fn fail<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    at: &At<'_>,
    endpoint: Option<&Arc<Endpoint>>,
    err: ProxyError,
    traced: &mut Option<Traced>,
) -> Next
where
    IO: AsyncWrite + Unpin,
{
    let At {
        head,
        metrics,
        service,
        start,
    } = *at;
    let kind = err.kind();
    if let Some(t) = traced.take() {
        t.finish(
            kind.status().as_u16(),
            Some(kind.label()),
            endpoint.map(|e| e.addr),
        );
    }
    if let Some(endpoint) = endpoint {
        observe_failure(service, endpoint, kind, start.elapsed());
    }
    // Overload refusals come in floods: one warning each would flood the log too.
    if kind == ErrorKind::Overloaded {
        tracing::debug!(service = %service.name, error = kind.label(), "{err}");
    } else {
        warn!(service = %service.name, error = kind.label(), "{err}");
    }
    metrics.error(kind);
    metrics.latency.observe(start.elapsed());
    let status = kind.status();
    metrics.response(status.as_u16());
    // The request was read whole if the buffer still holds it.
    let whole = buf.len() as u64 >= head.len as u64 + head.body;
    let close = head.close || !whole;
    if whole {
        buf.advance(head.len + head.body as usize);
    }
    let text = format!("cogmesh: {err}\n");
    let mut out = Vec::with_capacity(160 + text.len());
    let _ = write!(
        Bytes(&mut out),
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{}: {}\r\n{}content-length: {}\r\n{}\r\n{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        crate::error::ERROR_HEADER,
        kind.label(),
        if kind == ErrorKind::Overloaded {
            "x-cogmesh-overloaded: true\r\n"
        } else {
            ""
        },
        text.len(),
        if close { "connection: close\r\n" } else { "" },
        text
    );
    if io.write_all(&out).await.is_err() {
        return Next::Drop;
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

fn reset(endpoint: SocketAddr, e: &io::Error) -> ProxyError {
    ProxyError::UpstreamReset {
        endpoint,
        cause: e.to_string(),
    }
}

/// Another connection after a pooled one turned out closed: the next pooled one, else a new
/// one (which needs a `max_connections` slot).
async fn replacement(
    endpoint: &Endpoint,
    service: &crate::route::Service,
    lane: &Lane,
) -> Result<(Upstream, bool), ProxyError> {
    if let Some(u) = endpoint.relay.take() {
        return Ok((u, true));
    }
    let Some(slot) = service.breaker.connection_slot() else {
        return match endpoint.relay.borrow() {
            Some(u) => Ok((u, true)),
            None => Err(service.breaker.connections_overflowed()),
        };
    };
    let u = connect(endpoint.addr, lane.shared.upstreams.connect_timeout(), slot).await?;
    Ok((u, false))
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    slot: ConnectionPermit,
) -> Result<Upstream, ProxyError> {
    let stream = super::pool::connect_tcp(addr, timeout).await?;
    Ok(Upstream {
        stream,
        owner: crate::worker::index(),
        _slot: slot,
    })
}

/// A relay connection to an endpoint, holding its `max_connections` slot while open.
pub struct Upstream {
    stream: TcpStream,
    /// The worker whose runtime it is registered with; its idle list takes it back.
    owner: usize,
    _slot: ConnectionPermit,
}

/// The idle relay connections of one endpoint: one list per worker (a connection is driven by
/// the runtime that opened it), the most recent last, swept like [`super::Http1Pool`].
pub struct RelayPool {
    slots: Box<[Mutex<Slot>]>,
}

#[repr(align(128))]
#[derive(Default)]
struct Slot {
    idle: Vec<(Upstream, u64)>,
    sweeps: u64,
}

impl Default for RelayPool {
    fn default() -> Self {
        RelayPool {
            slots: (0..crate::worker::count()).map(|_| Mutex::default()).collect(),
        }
    }
}

impl std::fmt::Debug for RelayPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayPool").field("idle", &self.idle()).finish()
    }
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl RelayPool {
    fn own(&self) -> &Mutex<Slot> {
        &self.slots[crate::worker::index() % self.slots.len()]
    }

    /// This worker's most recent idle connection that is still open.
    fn take(&self) -> Option<Upstream> {
        take_open(&mut lock(self.own()).idle)
    }

    /// Another worker's idle connection, for when `max_connections` refuses a new one (see
    /// [`super::Http1Pool`]): a connection driven across threads beats a 503.
    fn borrow(&self) -> Option<Upstream> {
        self.slots
            .iter()
            .filter_map(|s| s.try_lock().ok())
            .find_map(|mut slot| take_open(&mut slot.idle))
    }

    fn put(&self, u: Upstream) {
        let mut slot = lock(&self.slots[u.owner % self.slots.len()]);
        let since = slot.sweeps;
        slot.idle.push((u, since));
    }

    /// Closes this worker's connections idle since before its previous sweep (see
    /// [`super::Http1Pool::sweep`]).
    pub fn sweep(&self) {
        let mut slot = lock(self.own());
        let now = slot.sweeps;
        slot.idle.retain(|(_, since)| since + 1 >= now);
        slot.sweeps += 1;
    }

    pub fn idle(&self) -> usize {
        self.slots.iter().map(|s| lock(s).idle.len()).sum()
    }
}

/// Pops the most recent connection that the upstream has not closed (as far as the runtime
/// has seen; a close it has not seen yet shows when the request goes out).
fn take_open(idle: &mut Vec<(Upstream, u64)>) -> Option<Upstream> {
    while let Some((u, _)) = idle.pop() {
        let mut probe = [0u8; 1];
        match u.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(u),
            // Closed, failed, or bytes nobody asked for: not reusable.
            _ => continue,
        }
    }
    None
}

/// Where a chunked body ends, found as its bytes go by (RFC 9112 §7.1): chunk sizes (with
/// extensions), chunk data and its CRLF, the last chunk, trailer fields, the final CRLF.
#[derive(Debug, Default)]
struct ChunkedEnd {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size { value: u64, digits: u8, extension: bool },
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

impl Default for ChunkState {
    fn default() -> Self {
        ChunkState::Size {
            value: 0,
            digits: 0,
            extension: false,
        }
    }
}

impl ChunkedEnd {
    /// Feeds the next bytes: `Ok(Some(i))` when the body ends after `data[..i]`, `Ok(None)`
    /// when it goes on past `data`, `Err` when the bytes are not chunked coding.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                ChunkState::Size {
                    value,
                    digits,
                    extension,
                } => match (b, extension) {
                    (b'\r', _) if digits > 0 => ChunkState::SizeLf { value },
                    (_, true) => self.state,
                    (b';' | b' ' | b'\t', false) if digits > 0 => ChunkState::Size {
                        value,
                        digits,
                        extension: true,
                    },
                    (_, false) => {
                        let d = (b as char).to_digit(16).ok_or(())?;
                        if digits >= 15 {
                            return Err(());
                        }
                        ChunkState::Size {
                            value: value * 16 + u64::from(d),
                            digits: digits + 1,
                            extension: false,
                        }
                    }
                },
                ChunkState::SizeLf { value } if b == b'\n' => {
                    if value == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data(value)
                    }
                }
                ChunkState::Data(left) => {
                    let take = left.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - take)
                    };
                    continue;
                }
                ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
                ChunkState::DataLf if b == b'\n' => ChunkState::default(),
                ChunkState::TrailerStart if b == b'\r' => ChunkState::FinalLf,
                ChunkState::TrailerStart | ChunkState::TrailerLine if b != b'\r' => ChunkState::TrailerLine,
                ChunkState::TrailerLine => ChunkState::TrailerLf,
                ChunkState::TrailerLf if b == b'\n' => ChunkState::TrailerStart,
                ChunkState::FinalLf if b == b'\n' => {
                    self.state = ChunkState::Done;
                    return Ok(Some(i + 1));
                }
                _ => return Err(()),
            };
            i += 1;
        }
        Ok(None)
    }
}

/// A connection handed to the full path: reads return the bytes the relay had read first.
pub struct Prefixed<IO> {
    prefix: BytesMut,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(inner: IO, prefix: BytesMut) -> Self {
        Prefixed { prefix, inner }
    }

    /// What is still to be read before the connection's own bytes.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = buf.remaining().min(this.prefix.len());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(parts: &[&[u8]]) -> Result<Option<(usize, usize)>, ()> {
        let mut end = ChunkedEnd::default();
        for (k, part) in parts.iter().enumerate() {
            if let Some(i) = end.feed(part)? {
                return Ok(Some((k, i)));
            }
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_after_the_last_chunk_and_its_trailers() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        assert_eq!(ends(&[body]), Ok(Some((0, body.len() - 4))));
        // Trailer fields, then the empty line.
        let trailers = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        assert_eq!(ends(&[trailers]), Ok(Some((0, trailers.len()))));
        // Split anywhere, byte by byte: the same end.
        let pieces: Vec<&[u8]> = trailers.chunks(1).collect();
        assert_eq!(ends(&pieces), Ok(Some((trailers.len() - 1, 1))));
        // Not finished yet.
        assert_eq!(ends(&[b"5\r\nhel"]), Ok(None));
        assert_eq!(ends(&[b"0\r\n"]), Ok(None));
        // Not chunked coding.
        assert_eq!(ends(&[b"x\r\n"]), Err(()));
        assert_eq!(ends(&[b"5\r\nhelloX"]), Err(()));
        assert_eq!(ends(&[b"\r\n"]), Err(()));
        assert_eq!(ends(&[b"ffffffffffffffff\r\n"]), Err(()));
    }

    #[test]
    fn trace_context_headers_are_recognised_in_any_case() {
        for name in [
            "traceparent",
            "TraceState",
            "b3",
            "X-B3-TraceId",
            "x-b3-sampled",
            "x-b3-flags",
        ] {
            assert!(is_trace_header(name), "{name}");
        }
        for name in ["x-b3", "x-b", "b33", "trace", "x-request-id"] {
            assert!(!is_trace_header(name), "{name}");
        }
    }

    #[test]
    fn a_response_head_tells_how_its_body_ends() {
        let parse =
            |head: &str, head_method: bool| parse_answer(head.as_bytes(), head_method).unwrap().unwrap();
        let a = parse("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", false);
        assert_eq!(
            (a.code, a.framing, a.upstream_close),
            (200, Framing::Length(12), false)
        );
        let a = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(a.framing, Framing::Chunked);
        let a = parse("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", true);
        assert_eq!(a.framing, Framing::Empty);
        let a = parse("HTTP/1.1 304 Not Modified\r\n\r\n", false);
        assert_eq!(a.framing, Framing::Empty);
        // Neither: until the upstream closes, and the connection is not pooled.
        let a = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((a.framing, a.upstream_close), (Framing::UntilClose, true));
        let a = parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(a.upstream_close);
        let a = parse(
            "HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(a.retry_after.as_deref(), Some(&b"2"[..]));
        assert!(a.upstream_close);
        assert!(parse_answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-len", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_client_gets_the_head_without_hop_by_hop_headers_and_the_load_report() {
        let head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nEndpoint-Load-Metrics: TEXT application_utilization=0.5\r\nX-App: yes\r\n\r\n";
        let answer = parse_answer(head, false).unwrap().unwrap();
        let mut out = Vec::new();
        let report = respond_head(head, &answer, false, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(report.load(), Some(0.5));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-app: yes\r\n\r\n"
        );
        let mut out = Vec::new();
        respond_head(head, &answer, true, true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("endpoint-load-metrics: TEXT"), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
    }
}
