//! The response body the proxy sends downstream: an upstream body streamed as it arrives, a
//! short body the proxy made itself (errors, cache hits), or a body a route rewrote on the way
//! (compressed, or recorded into the cache). Only the rewritten kind is boxed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;

use prometheus_client::metrics::counter::Counter;

use super::http2::H2Body;
use super::idle::IdleTimer;
use super::pool::Lease;
use crate::balance::{orca, InFlight};
use crate::compress::{BoxError, CodedBody};

/// A response body as an upstream sends it: through hyper (HTTP/1.1, HTTP/2 over TLS) or from
/// a plain-text HTTP/2 connection of [`super::http2`].
pub type UpstreamIncoming = Either<Incoming, H2Body>;

pub enum ProxyBody {
    /// Keeps the endpoint's in-flight count until the body ends or is dropped, and gives the
    /// HTTP/1.1 connection back to the pool once the body has ended (dropping it half-way
    /// closes the connection instead).
    Upstream {
        body: UpstreamIncoming,
        in_flight: Option<InFlight>,
        reports: Option<TrailerReports>,
        lease: Option<Lease>,
        held: Option<Held>,
        /// The stream's idle timer, when the service has `stream_idle_timeout_ms`.
        idle: Option<Box<IdleTimer>>,
    },
    Local(Option<Bytes>),
    /// Compressed or recorded for the cache; streams like the others.
    Coded(CodedBody),
}

/// What a response keeps until its body ends: the request's slots in its service's circuit
/// breaker and in the instance's concurrency limit.
#[derive(Debug, Default)]
pub struct Held {
    pub breaker: Option<crate::breaker::RequestPermit>,
    pub admission: Option<crate::admission::AdmissionPermit>,
}

/// How to handle an ORCA report in the trailers (gRPC responses): record the load on the
/// endpoint, count it, and strip it unless the service forwards reports.
pub struct TrailerReports {
    pub strip: bool,
    pub accepted: Counter,
    pub rejected: Counter,
}

impl ProxyBody {
    pub fn upstream(
        body: UpstreamIncoming,
        in_flight: InFlight,
        reports: Option<TrailerReports>,
        mut lease: Option<Lease>,
    ) -> Self {
        if body.is_end_stream() {
            // No body to wait for (HEAD, 204, 304, empty): the connection is free already.
            release(&mut lease);
        }
        ProxyBody::Upstream {
            body,
            in_flight: Some(in_flight),
            reports,
            lease,
            held: None,
            idle: None,
        }
    }

    /// Ends the stream once it has been idle for the timer's timeout.
    pub fn with_idle_timer(mut self, timer: Option<IdleTimer>) -> Self {
        if let ProxyBody::Upstream { idle, .. } = &mut self {
            *idle = timer.map(Box::new);
        }
        self
    }

    /// Also keeps the request's slot in the concurrency limit until the body ends.
    pub fn with_admission(mut self, permit: Option<crate::admission::AdmissionPermit>) -> Self {
        if let ProxyBody::Upstream { held: Some(h), .. } = &mut self {
            h.admission = permit;
        }
        self
    }

    /// Keeps `held` until the body ends or is dropped.
    pub fn holding(mut self, h: Held) -> Self {
        if let ProxyBody::Upstream { held, .. } = &mut self {
            *held = Some(h);
        }
        self
    }

    pub fn local(bytes: Bytes) -> Self {
        ProxyBody::Local(Some(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream {
                body,
                in_flight,
                reports,
                lease,
                held,
                idle,
            } => {
                let mut polled = Pin::new(&mut *body).poll_frame(cx);
                if let Some(timer) = idle {
                    match &polled {
                        Poll::Ready(Some(Ok(_))) => timer.touch(),
                        Poll::Pending => {
                            if let Poll::Ready(err) = timer.poll_expired(cx) {
                                in_flight.take();
                                held.take();
                                lease.take();
                                return Poll::Ready(Some(Err(err)));
                            }
                        }
                        _ => {}
                    }
                }
                if let (Poll::Ready(Some(Ok(frame))), Some(reports)) = (&mut polled, reports.as_ref()) {
                    if let Some(trailers) = frame.trailers_mut() {
                        read_trailer_report(trailers, in_flight.as_ref(), reports);
                    }
                }
                match &polled {
                    Poll::Ready(None) => {
                        in_flight.take();
                        held.take();
                        release(lease);
                    }
                    Poll::Ready(Some(Err(_))) => {
                        in_flight.take();
                        held.take();
                        lease.take();
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        release(lease);
                    }
                    _ => {}
                }
                polled.map_err(BoxError::from)
            }
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Coded(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(bytes) => bytes.is_none(),
            ProxyBody::Coded(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Local(None) => SizeHint::with_exact(0),
            ProxyBody::Coded(body) => body.size_hint(),
        }
    }
}

fn read_trailer_report(
    trailers: &mut http::HeaderMap,
    in_flight: Option<&InFlight>,
    reports: &TrailerReports,
) {
    match orca::from_trailers(trailers) {
        Ok(None) => return,
        Ok(Some(report)) => {
            if let (Some(load), Some(f)) = (report.load(), in_flight) {
                f.endpoint().observe_load(load);
            }
            reports.accepted.inc();
        }
        Err(e) => {
            tracing::debug!("ignoring load report in trailers: {e}");
            reports.rejected.inc();
        }
    }
    if reports.strip {
        trailers.remove(orca::LOAD_TRAILER);
    }
}

/// Gives a leased connection back to the pool, once.
fn release(lease: &mut Option<Lease>) {
    if let Some(l) = lease.take() {
        l.release();
    }
}
