//! Hardening: what a client may send before the proxy gives up on it, at least as strict as
//! Envoy's edge recommendations.
//!
//! hyper enforces most of it once told to (see [`configure`]): HTTP/1 header count (431), the header-read timeout (slowloris), conflicting duplicate `Content-Length` (400); for
//! HTTP/2 the concurrent streams, flow-control windows, header list size and rapid-reset bounds.
//! Four gaps remain, closed here:
//!
//! - hyper accepts `Content-Length` together with `Transfer-Encoding` (it drops the length and
//!   closes after the response, which RFC 9112 §6.3 permits). A request smuggling attempt should
//!   be refused outright, so [`GuardedIo`] watches the request heads of an HTTP/1 connection and
//!   turns such a head into one hyper answers with 400 and a closed connection.
//! - hyper-util's auto builder cannot set hyper's `max_header_size`, and hyper's read-buffer
//!   limit is approximate (one read may overshoot it): [`GuardedIo`] measures each HTTP/1 head
//!   and makes hyper answer 431 to one over the limit.
//! - hyper-util's protocol detection (HTTP/1 or HTTP/2 preface) waits for bytes without a time
//!   limit, before hyper's header-read timer starts: a client that connects and sends nothing
//!   would hold its connection forever. [`GuardedIo`] bounds the first request head by the same
//!   header-read timeout.
//! - HTTP/2 has no header-count limit in hyper: [`too_many_headers`] is checked per request.
//!
//! Tracking HTTP/1 message boundaries costs a head search per request and a few bytes of state
//! per body chunk; bodies of known length are skipped in bulk.

mod framing;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub use self::framing::{Framing, Verdict};

/// Request head (request line and headers) size limit: Envoy's `max_request_headers_kb` 60.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 60 * 1024;
/// The smallest head limit allowed: hyper's initial HTTP/1 read buffer.
pub const MIN_REQUEST_HEADER_BYTES: usize = 8192;
/// Header count limit: Envoy's `max_headers_count` default 100 (also hyper's HTTP/1 default).
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 100;
/// Envoy's edge recommendation for `max_concurrent_streams`.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Envoy's edge recommendation: 64 KiB per stream ...
pub const DEFAULT_HTTP2_STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// ... and 1 MiB per connection.
pub const DEFAULT_HTTP2_CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
/// Streams a client may open and reset before the server accepted them (CVE-2023-44487,
/// "rapid reset"); more and the connection gets GOAWAY. hyper's default, made explicit.
pub const DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for protocol errors the client caused before it closes the
/// connection (the other half of rapid-reset protection); h2's default, made explicit.
pub const DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// `limits:` in proxy.yaml; every field has the default above. Changes need a restart.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_request_header_bytes")]
    pub max_request_header_bytes: usize,
    #[serde(default = "default_max_request_headers")]
    pub max_request_headers: usize,
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    #[serde(default = "default_http2_stream_window_bytes")]
    pub http2_stream_window_bytes: u32,
    #[serde(default = "default_http2_connection_window_bytes")]
    pub http2_connection_window_bytes: u32,
    #[serde(default = "default_http2_max_pending_accept_reset_streams")]
    pub http2_max_pending_accept_reset_streams: usize,
    #[serde(default = "default_http2_max_local_error_reset_streams")]
    pub http2_max_local_error_reset_streams: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            http2_stream_window_bytes: DEFAULT_HTTP2_STREAM_WINDOW_BYTES,
            http2_connection_window_bytes: DEFAULT_HTTP2_CONNECTION_WINDOW_BYTES,
            http2_max_pending_accept_reset_streams: DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            http2_max_local_error_reset_streams: DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
        }
    }
}

fn default_max_request_header_bytes() -> usize {
    DEFAULT_MAX_REQUEST_HEADER_BYTES
}
fn default_max_request_headers() -> usize {
    DEFAULT_MAX_REQUEST_HEADERS
}
fn default_http2_max_concurrent_streams() -> u32 {
    DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS
}
fn default_http2_stream_window_bytes() -> u32 {
    DEFAULT_HTTP2_STREAM_WINDOW_BYTES
}
fn default_http2_connection_window_bytes() -> u32 {
    DEFAULT_HTTP2_CONNECTION_WINDOW_BYTES
}
fn default_http2_max_pending_accept_reset_streams() -> usize {
    DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS
}
fn default_http2_max_local_error_reset_streams() -> usize {
    DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS
}

impl LimitsConfig {
    /// Range checks; `Err((field, reason))` with the field relative to `limits`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_request_header_bytes < MIN_REQUEST_HEADER_BYTES {
            return Err((
                "max_request_header_bytes",
                format!(
                    "must be at least {MIN_REQUEST_HEADER_BYTES}, got {}",
                    self.max_request_header_bytes
                ),
            ));
        }
        let positive = [
            ("max_request_headers", self.max_request_headers as u64),
            (
                "http2_max_concurrent_streams",
                u64::from(self.http2_max_concurrent_streams),
            ),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be greater than 0".into()));
            }
        }
        // RFC 9113 §6.5.2: windows are at least 65535 and at most 2^31 - 1.
        for (field, v) in [
            ("http2_stream_window_bytes", self.http2_stream_window_bytes),
            (
                "http2_connection_window_bytes",
                self.http2_connection_window_bytes,
            ),
        ] {
            if !(65_535..=0x7fff_ffff).contains(&v) {
                return Err((field, format!("must be between 65535 and 2147483647, got {v}")));
            }
        }
        Ok(())
    }
}

/// Applies the limits to the server builder. Both protocols get a timer: without one hyper runs
/// no header-read timeout at all (DESIGN.md).
pub fn configure(
    builder: &mut auto::Builder<TokioExecutor>,
    limits: &LimitsConfig,
    header_read_timeout: Duration,
) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(limits.max_request_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes)
        .max_header_list_size(u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams);
}

/// More header fields than allowed (HTTP/2; hyper counts them for HTTP/1).
pub fn too_many_headers(headers: &http::HeaderMap, limits: &LimitsConfig) -> bool {
    headers.len() > limits.max_request_headers
}

/// What hyper reads instead of a refused head: an invalid method token, which hyper answers
/// with `400 Bad Request` before closing the connection.
const REFUSED_HEAD: &[u8] = b"\x01 / HTTP/1.1\r\n\r\n";

/// What hyper reads instead of an oversize head: more header fields than it accepts, which it
/// answers with `431 Request Header Fields Too Large` before closing the connection.
fn too_large_head(max_headers: usize) -> Vec<u8> {
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    for _ in 0..=max_headers {
        head.extend_from_slice(b"x:\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

thread_local! {
    /// Each worker's buffer for reading request heads (see `GuardedIo::poll_read`).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; 8192].into_boxed_slice());
}

/// A client connection whose HTTP/1 request heads are checked before hyper parses them, and
/// whose first head must arrive within the header-read timeout (see the module doc).
pub struct GuardedIo<T> {
    inner: T,
    framing: Framing,
    max_headers: usize,
    /// Bytes checked and ready for hyper.
    ready: Vec<u8>,
    ready_at: usize,
    /// Set until the first request head is complete.
    first_head: Option<Pin<Box<Sleep>>>,
    /// Requests refused as smuggling attempts.
    refused: Counter,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, limits: &LimitsConfig, header_read_timeout: Duration, refused: Counter) -> Self {
        GuardedIo {
            inner,
            framing: Framing::new(limits.max_request_header_bytes),
            max_headers: limits.max_request_headers,
            ready: Vec::new(),
            ready_at: 0,
            first_head: Some(Box::pin(tokio::time::sleep(header_read_timeout))),
            refused,
        }
    }

    fn take_ready(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.ready.len() - self.ready_at);
        buf.put_slice(&self.ready[self.ready_at..self.ready_at + n]);
        self.ready_at += n;
        if self.ready_at == self.ready.len() {
            self.ready.clear();
            self.ready_at = 0;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_at < this.ready.len() {
                this.take_ready(buf);
                return Poll::Ready(Ok(()));
            }
            if this.framing.is_opaque() {
                this.first_head = None;
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Body bytes go straight into hyper's buffer, without a copy through ours.
            if let Some(left) = this.framing.body_left() {
                let room = buf.remaining().min(usize::try_from(left).unwrap_or(usize::MAX));
                // Initialized first, so marking the bytes read as filled needs no `unsafe`.
                buf.initialize_unfilled_to(room);
                let mut direct = buf.take(room);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                buf.advance(n);
                this.framing.skipped(n as u64);
                return Poll::Ready(Ok(()));
            }
            // The read goes through this worker's scratch buffer, initialized once: a fresh
            // zeroed array per read would cost an 8 KiB memset on every request.
            let polled = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut read = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let data = read.filled();
                        if data.is_empty() {
                            Poll::Ready(Ok(None))
                        } else {
                            Poll::Ready(Ok(Some(this.framing.feed(data, &mut this.ready))))
                        }
                    }
                }
            });
            let verdict = match polled {
                Poll::Pending => {
                    if let Some(sleep) = this.first_head.as_mut() {
                        if sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no complete request head within the header-read timeout",
                            )));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(Some(verdict))) => verdict,
                Poll::Ready(Ok(None)) => {
                    // End of input: hand over what is held back, hyper decides what it was.
                    this.framing.finish(&mut this.ready);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
            };
            if this.framing.heads_seen() > 0 {
                this.first_head = None;
            }
            match verdict {
                Verdict::Pass => {}
                Verdict::Refused => {
                    this.refused.inc();
                    this.ready.extend_from_slice(REFUSED_HEAD);
                }
                Verdict::TooLarge => this.ready.extend(too_large_head(this.max_headers)),
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests;
