//! HTTP/2 to plain-text endpoints, on cogmesh's own client connection
//! ([`super::h2_client`]).
//!
//! Each endpoint keeps, for each worker, up to [`super::MAX_HTTP2_CONNECTIONS`] connections in
//! [`Http2Conns`]; the caller says which one (by its open streams, see
//! [`super::Upstreams`]). A connection is opened once, by the first request of its worker that
//! needs it, and the requests that arrive while it connects wait for the same attempt.
//!
//! A worker sends only on connections it opened, as the HTTP/1 pool does: a connection's task
//! (which reads the endpoint's frames) runs on the worker that opened it, so a stream of
//! another worker would need two cross-thread wake-ups, one to write its request and one to
//! hand it its response. Measured with `proxy-bench --workers 2 --head-to-head` (h2c, 1000
//! req/s, nginx upstream, 4 rounds): against nginx, cogmesh's p99 went from 1.24× nginx's
//! (lower in 0/4 rounds) with one connection shared by both workers to 0.98× (2/4); against
//! HAProxy from 1.16× (0/4) to 0.88× (3/4). With one worker (the default) an endpoint has one
//! connection, more only past its stream limit; with N workers, N. A connection the peer
//! closed (or sent GOAWAY on) is replaced on the next request; one unused for the pool's idle
//! timeout is dropped by [`Http2Conns::sweep`] and closes once its streams end.
//!
//! Settings are hyper's client defaults: 2 MiB stream and 5 MiB connection windows, 16 KiB
//! frames, 16 KiB of response headers, no server push.
//!
//! Also here: [`H2Body`], a body received on HTTP/2 (a response from an endpoint, or a request
//! from a client), and [`pipe`], which sends a body on a stream of the `h2` crate (for the
//! lane, [`super::h2_lane`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared};
use h2::{RecvStream, SendStream};
use http::header::{HeaderValue, CONTENT_LENGTH, DATE};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tracing::debug;

use super::h2_client;
use super::pool::connect_tcp;
use super::UpstreamBody;
use crate::compress::BoxError;
use crate::error::{error_chain, ProxyError};

/// A connection being opened: every request that needs it waits on the same attempt.
type Connecting = Shared<Pin<Box<dyn Future<Output = Result<h2_client::Handle, String>> + Send>>>;

struct Slot {
    connection: Connecting,
    /// Which opening this is, so a request only replaces the connection it found broken.
    generation: u64,
    last_used: Instant,
}

/// The HTTP/2 connections of one endpoint (see the module docs).
#[derive(Default)]
pub struct Http2Conns {
    slots: Mutex<Vec<Option<Slot>>>,
    generations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Http2Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let open = slots.iter().filter(|s| s.is_some()).count();
        f.debug_struct("Http2Conns").field("connections", &open).finish()
    }
}

impl Http2Conns {
    /// Connection `index` to `addr`, opened (or reopened, when `broken` names the opening
    /// found unusable) as needed.
    fn connection(
        &self,
        index: usize,
        addr: SocketAddr,
        connect_timeout: Duration,
        broken: Option<u64>,
    ) -> (Connecting, u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() <= index {
            slots.resize_with(index + 1, || None);
        }
        let slot = &mut slots[index];
        let usable = match slot {
            Some(s) => Some(s.generation) != broken && !matches!(s.connection.peek(), Some(Err(_))),
            None => false,
        };
        if !usable {
            let generation = self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let connecting: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(open(addr, connect_timeout));
            *slot = Some(Slot {
                connection: connecting.shared(),
                generation,
                last_used: Instant::now(),
            });
        }
        let s = slot.as_mut().expect("the slot was filled above");
        s.last_used = Instant::now();
        (s.connection.clone(), s.generation)
    }

    /// Drops the connections no request used for `idle_timeout`; each closes once its last
    /// stream ends.
    pub fn sweep(&self, idle_timeout: Duration) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|s| s.last_used.elapsed() >= idle_timeout)
            {
                *slot = None;
            }
        }
    }
}

/// Opens a connection: TCP within the connect timeout, then the HTTP/2 preface and SETTINGS;
/// the connection's task runs on the current worker until it closes.
async fn open(addr: SocketAddr, connect_timeout: Duration) -> Result<h2_client::Handle, String> {
    let stream = connect_tcp(addr, connect_timeout).await.map_err(|e| match e {
        ProxyError::UpstreamConnect { cause, .. } => cause,
        other => other.to_string(),
    })?;
    let _ = stream.set_nodelay(true);
    Ok(h2_client::start(stream, addr))
}

/// Sends `req` to the endpoint at `addr` (`:authority` is the URI's, else `authority`; `:path`
/// the request's path and query) on connection `index` of `conns` (the current worker's, see
/// [`super::Upstreams`]) and waits for the response headers.
pub async fn send(
    conns: &Http2Conns,
    index: usize,
    addr: SocketAddr,
    authority: &http::uri::Authority,
    connect_timeout: Duration,
    req: Request<UpstreamBody>,
) -> Result<Response<H2Body>, ProxyError> {
    // Hop-by-hop headers, which HTTP/2 forbids, are gone already (`strip_hop_by_hop`).
    // A connection found unusable before the request went out is replaced once.
    let mut broken = None;
    let connection = loop {
        let (connecting, generation) = conns.connection(index, addr, connect_timeout, broken);
        let connection = connecting.await.map_err(|cause| ProxyError::UpstreamConnect {
            endpoint: addr,
            cause,
        })?;
        if connection.usable() || broken.is_some() {
            break connection;
        }
        debug!(endpoint = %addr, "HTTP/2 connection unusable, opening another");
        broken = Some(generation);
    };
    connection.send(addr, authority, req).await
}

/// Sends a body on its stream: data as the peer's flow control allows, then trailers or the end
/// of the stream. A body that fails resets the stream with `failed`; a stream the peer reset
/// stops the copy.
pub(super) async fn pipe<B>(body: B, mut stream: SendStream<Bytes>, failed: h2::Reason)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reason.map(|r| format!("the peer reset the stream: {r}"))));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match frame {
            Err(why) => {
                debug!("body not sent: {}", why.unwrap_or_else(|e| error_chain(&e)));
                return;
            }
            Ok(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                debug!("body failed: {}", error_chain(&*e.into()));
                stream.send_reset(failed);
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let last = body.is_end_stream();
                if send_data(&mut stream, data, last).await.is_err() || last {
                    return;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            let _ = stream.send_trailers(trailers);
            return;
        }
    }
}

/// Sends `data` as the stream's send window allows.
async fn send_data(stream: &mut SendStream<Bytes>, mut data: Bytes, last: bool) -> Result<(), h2::Error> {
    if data.is_empty() {
        return stream.send_data(data, last);
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        // Capacity left from an earlier grant is used without waiting: `poll_capacity` only
        // wakes on a change.
        let granted = match stream.capacity() {
            0 => match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(h2::Error::from(h2::Reason::CANCEL)),
            },
            left => left,
        };
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        stream.send_data(part, last && data.is_empty())?;
    }
    Ok(())
}

/// A body received on HTTP/2, a response from an endpoint or a request from a client (see
/// [`super::h2_lane`] and [`super::h2_server`]): data (its flow-control window released as it
/// is passed on), then trailers.
pub struct H2Body {
    recv: Recv,
    data_ended: bool,
    /// What remains of a `content-length`, for the size hint.
    remaining: Option<u64>,
}

/// Where an [`H2Body`] comes from: a stream of the `h2` crate, or of cogmesh's own server
/// connection.
enum Recv {
    Crate(RecvStream),
    Own(super::h2_server::Inbound),
    Upstream(h2_client::UpstreamRecv),
    /// A request that came without a body (END_STREAM on its HEADERS).
    Ended,
}

impl Recv {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        match self {
            Recv::Crate(recv) => {
                let data = ready!(recv.poll_data(cx));
                if let Some(Ok(data)) = &data {
                    let _ = recv.flow_control().release_capacity(data.len());
                }
                Poll::Ready(data.map(|d| d.map_err(BoxError::from)))
            }
            Recv::Own(own) => own.poll_data(cx),
            Recv::Upstream(up) => up.poll_data(cx),
            Recv::Ended => Poll::Ready(None),
        }
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<http::HeaderMap>, BoxError>> {
        match self {
            Recv::Crate(recv) => recv.poll_trailers(cx).map_err(BoxError::from),
            Recv::Own(own) => own.poll_trailers(cx),
            Recv::Upstream(up) => up.poll_trailers(),
            Recv::Ended => Poll::Ready(Ok(None)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Recv::Crate(recv) => recv.is_end_stream(),
            Recv::Own(own) => own.is_end_stream(),
            Recv::Upstream(up) => up.is_end_stream(),
            Recv::Ended => true,
        }
    }
}

impl H2Body {
    /// The body of a response on cogmesh's own client connection; `remaining` is its
    /// `content-length`, for the size hint.
    pub(super) fn upstream(recv: h2_client::UpstreamRecv, remaining: Option<u64>) -> H2Body {
        H2Body {
            recv: Recv::Upstream(recv),
            data_ended: false,
            remaining,
        }
    }

    /// The body of a client's request on the lane, its `content-length` (when valid) kept for
    /// the size hint.
    pub(super) fn request(req: Request<RecvStream>) -> Request<H2Body> {
        let remaining = content_length(req.headers());
        req.map(|recv| H2Body {
            recv: Recv::Crate(recv),
            data_ended: false,
            remaining,
        })
    }

    /// The body of a request on cogmesh's own server connection: `None` when the request came
    /// without one.
    pub(super) fn own(inbound: Option<super::h2_server::Inbound>, headers: &http::HeaderMap) -> H2Body {
        H2Body {
            recv: inbound.map_or(Recv::Ended, Recv::Own),
            data_ended: false,
            remaining: content_length(headers),
        }
    }
}

/// What a response head sent to an HTTP/2 client gets from this end, whichever server sends
/// it: `content-length` when the body's size is known and the head has none, and a `Date` when
/// it has none (RFC 9110 §6.6.1), as hyper's server gives it; so do the proxy's own responses.
pub(super) fn complete_response_head(headers: &mut http::HeaderMap, body: &impl Body) {
    if let Some(len) = body.size_hint().exact() {
        if !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    if !headers.contains_key(DATE) {
        headers.insert(DATE, now_http_date());
    }
}

thread_local! {
    /// This worker's `Date` value and the second it was made for.
    static DATE_NOW: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
}

/// The current time as an HTTP date, formatted once a second per worker.
fn now_http_date() -> HeaderValue {
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE_NOW.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let formatted = httpdate::fmt_http_date(now);
            *cached = (
                second,
                HeaderValue::from_str(&formatted).expect("an HTTP date is a valid header value"),
            );
        }
        cached.1.clone()
    })
}

pub(super) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.data_ended {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_ended = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) if !self.data_ended => SizeHint::with_exact(n),
            _ if self.recv.is_end_stream() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
