//! The response body the proxy sends downstream: an upstream body streamed as it arrives, or a
//! short body the proxy made itself (errors). One concrete type, so nothing is boxed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use prometheus_client::metrics::counter::Counter;

use crate::balance::{orca, InFlight};

pub enum ProxyBody {
    /// Keeps the endpoint's in-flight count until the body ends or is dropped.
    Upstream {
        body: Incoming,
        in_flight: Option<InFlight>,
        reports: Option<TrailerReports>,
        held: Option<Held>,
    },
    Local(Option<Bytes>),
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
    pub fn upstream(body: Incoming, in_flight: InFlight, reports: Option<TrailerReports>) -> Self {
        ProxyBody::Upstream {
            body,
            in_flight: Some(in_flight),
            reports,
            held: None,
        }
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream {
                body,
                in_flight,
                reports,
                held,
            } => {
                let mut polled = Pin::new(body).poll_frame(cx);
                if let (Poll::Ready(Some(Ok(frame))), Some(reports)) = (&mut polled, reports.as_ref()) {
                    if let Some(trailers) = frame.trailers_mut() {
                        read_trailer_report(trailers, in_flight.as_ref(), reports);
                    }
                }
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    in_flight.take();
                    held.take();
                }
                polled
            }
            ProxyBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Local(None) => SizeHint::with_exact(0),
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

/// The body of a request sent upstream: the client's, or none (a retry of a bodiless request).
pub enum RequestBody {
    Client(Incoming),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
