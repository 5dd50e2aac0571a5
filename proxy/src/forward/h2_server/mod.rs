//! cogmesh's own HTTP/2 server connection, on its own codec ([`crate::codec`]): the client
//! side of an exchange without the `h2` crate. The default (`own_http2_codec: true`);
//! `--no-own-http2-codec` serves HTTP/2 clients on [`super::h2_lane`] and the `h2` crate instead.
//! The upstream side is still the `h2` crate ([`super::http2`]).
//!
//! Like the lane, one task per connection reads frames, runs each stream's exchange through
//! the full request path ([`super::Forward`]) and writes the responses as they come, all in
//! the same turn. What the codec saves: frames are read in place (a request body's data is a
//! slice of the read buffer, not a copy), header blocks are decoded straight into the request
//! and responses are encoded as literals, and streams are plain entries of this task's map:
//! no locks or wakers between a stream and its connection except for a request body, which
//! the upstream side may read from another task. Measured (callgrind, one worker, h2c to an
//! nginx upstream, `h2load -c 1`): 66.1k → 51.9k instructions per request against the lane,
//! the upstream side still on the `h2` crate then.
//!
//! Kept from the `h2` crate's server as the lane configures it: the listener's limits (
//! concurrent streams, stream and connection windows, header list size); streams over the
//! limit are refused (REFUSED_STREAM); a header list over its limit gets 431; a client's reset
//! cancels the exchange; a client that resets more unanswered streams within a second than
//! `http2_max_pending_accept_reset_streams` (rapid reset), or makes this end reset more streams
//! for its errors than `http2_max_local_error_reset_streams`, gets GOAWAY ENHANCE_YOUR_CALM; a response
//! of known length gets `content-length` and a missing `Date` is added; a failing response
//! body resets its stream (INTERNAL_ERROR); on drain, GOAWAY and the streams in flight finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::Either;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::debug;

mod head;
mod incoming;

use head::{add_field, encode_fields, RequestHead};
pub use incoming::Inbound;
use incoming::{lock, Incoming};

use super::body::ProxyBody;
use super::http2::H2Body;
use super::Forward;
use crate::codec::frame::{self, ErrorCode, Frame, FrameError};
use crate::codec::{hpack, StreamMap};
use crate::hardening::LimitsConfig;

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Response bodies are not polled while this much is waiting to be written.
const WRITE_HIGH: usize = 256 * 1024;
/// The largest frame this end accepts (SETTINGS_MAX_FRAME_SIZE left at its default).
const MAX_FRAME: u32 = frame::DEFAULT_MAX_FRAME_SIZE;
/// The window both ends start with (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

type Exchange = Abortable<Pin<Box<dyn Future<Output = (u32, Response<ProxyBody>)> + Send>>>;

/// Serves an HTTP/2 connection whose first bytes `io` holds (the preface), until the client
/// closes it, a connection error ends it, or the drain (`stop`) has sent GOAWAY and its streams
/// have ended. The preface and the client's SETTINGS must come within `handshake_timeout`.
pub async fn serve<IO>(
    io: IO,
    forward: Forward,
    limits: &LimitsConfig,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection::new(io, forward, limits);
    let handshake = tokio::time::sleep(handshake_timeout);
    let mut handshake = std::pin::pin!(handshake);
    let mut stopped = std::pin::pin!(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    std::future::poll_fn(|cx| {
        if !conn.settled && handshake.as_mut().poll(cx).is_ready() {
            debug!("no HTTP/2 preface and settings within the header-read timeout");
            return Poll::Ready(());
        }
        if !conn.draining && stopped.as_mut().poll(cx).is_ready() {
            conn.drain();
        }
        conn.poll(cx)
    })
    .await;
}

// === the connection ===

/// One stream of the connection.
struct Stream {
    /// The request body still coming (until END_STREAM or a reset).
    incoming: Option<Arc<Mutex<Incoming>>>,
    /// What the client may still send before a WINDOW_UPDATE, and what it sent that was read
    /// and not yet given back.
    recv_window: i64,
    unreported: u32,
    /// `content-length` of the request, less the data received.
    expected: Option<u64>,
    /// What this end may still send.
    send_window: i64,
    /// Cancels the exchange while it runs.
    abort: Option<AbortHandle>,
    /// The response body being sent, and data of it the windows held back.
    outgoing: Option<Pin<Box<ProxyBody>>>,
    held: Bytes,
    /// This end's side is done (END_STREAM sent, or the stream reset).
    sent_end: bool,
}

struct Connection<IO> {
    io: IO,
    forward: Forward,
    read: BytesMut,
    /// Bytes to write, and how many of them are written.
    write: Vec<u8>,
    written: usize,
    /// The preface and the client's first SETTINGS came.
    preface_read: bool,
    settled: bool,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    streams: StreamMap<Stream>,
    exchanges: FuturesUnordered<Exchange>,
    /// The streams whose response [`Connection::send_bodies`] has just ended, kept to reuse
    /// its allocation (one per response otherwise).
    finished: Vec<u32>,
    /// The highest stream the client opened.
    last_stream: u32,
    /// A header block split over CONTINUATIONs.
    blocks: frame::BlockAssembly,
    /// The client's SETTINGS.
    peer_max_frame: u32,
    peer_initial_window: i64,
    send_window: i64,
    recv_window: i64,
    unreported: u32,
    /// Limits.
    max_streams: usize,
    stream_window: u32,
    connection_window: u32,
    max_header_list: usize,
    /// Resets by the client of streams not yet answered, in the current second, and when that
    /// second began: past the limit, the connection ends (rapid reset).
    early_resets: usize,
    early_resets_since: tokio::time::Instant,
    max_early_resets: usize,
    local_resets: usize,
    max_local_resets: usize,
    draining: bool,
    /// The client sent GOAWAY or closed its side: no new streams.
    peer_done: bool,
    /// Everything written, the connection ends.
    closing: bool,
}

impl<IO> Connection<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn new(io: IO, forward: Forward, limits: &LimitsConfig) -> Self {
        let stream_window = limits.http2_stream_window_bytes.min(frame::MAX_WINDOW);
        let connection_window = limits
            .http2_connection_window_bytes
            .clamp(DEFAULT_WINDOW as u32, frame::MAX_WINDOW);
        let mut write = Vec::with_capacity(READ_CHUNK);
        use frame::setting::*;
        frame::put_settings(
            &mut write,
            &[
                (MAX_CONCURRENT_STREAMS, limits.http2_max_concurrent_streams),
                (INITIAL_WINDOW_SIZE, stream_window),
                (
                    MAX_HEADER_LIST_SIZE,
                    u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX),
                ),
            ],
        );
        if connection_window as i64 > DEFAULT_WINDOW {
            frame::put_window_update(&mut write, 0, connection_window - DEFAULT_WINDOW as u32);
        }
        Connection {
            io,
            forward,
            read: BytesMut::with_capacity(READ_CHUNK),
            write,
            written: 0,
            preface_read: false,
            settled: false,
            decoder: hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            encoder: hpack::Encoder::default(),
            streams: StreamMap::default(),
            exchanges: FuturesUnordered::new(),
            finished: Vec::new(),
            last_stream: 0,
            blocks: frame::BlockAssembly::default(),
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            peer_initial_window: DEFAULT_WINDOW,
            send_window: DEFAULT_WINDOW,
            recv_window: connection_window as i64,
            unreported: 0,
            max_streams: limits.http2_max_concurrent_streams as usize,
            stream_window,
            connection_window,
            max_header_list: limits.max_request_header_bytes,
            early_resets: 0,
            early_resets_since: tokio::time::Instant::now(),
            max_early_resets: limits.http2_max_pending_accept_reset_streams,
            local_resets: 0,
            max_local_resets: limits.http2_max_local_error_reset_streams,
            draining: false,
            peer_done: false,
            closing: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if !self.closing && self.pending_write() < WRITE_HIGH {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(true)) => progress = true,
                    Poll::Ready(Ok(false)) => return Poll::Ready(()),
                    Poll::Ready(Err(e)) => {
                        debug!("HTTP/2 connection error: {e}");
                        self.go_away(e.code);
                    }
                    Poll::Pending => {}
                }
            }
            while let Poll::Ready(Some(done)) = self.exchanges.poll_next_unpin(cx) {
                progress = true;
                if let Ok((id, response)) = done {
                    self.respond(id, response);
                }
            }
            self.give_back_windows(cx);
            if self.send_bodies(cx) {
                progress = true;
            }
            match self.flush(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(())) if self.closing => return Poll::Ready(()),
                _ => {}
            }
            if (self.draining || self.peer_done) && self.streams.is_empty() && self.pending_write() == 0 {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn pending_write(&self) -> usize {
        self.write.len() - self.written
    }

    /// Reads what the socket has and handles the frames in it: `false` when the client closed.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, FrameError>> {
        self.read.reserve(READ_CHUNK);
        let n = match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                debug!("HTTP/2 connection read failed: {e}");
                return Poll::Ready(Ok(false));
            }
            Poll::Ready(Ok(n)) => n,
        };
        if n == 0 {
            return Poll::Ready(Ok(false));
        }
        self.on_bytes()?;
        Poll::Ready(Ok(true))
    }

    fn on_bytes(&mut self) -> Result<(), FrameError> {
        if !self.preface_read {
            let n = self.read.len().min(frame::PREFACE.len());
            if self.read[..n] != frame::PREFACE[..n] {
                return Err(protocol("not the HTTP/2 preface"));
            }
            if n < frame::PREFACE.len() {
                return Ok(());
            }
            self.read.advance(n);
            self.preface_read = true;
        }
        while let Some((_, used)) = frame::parse(&self.read, MAX_FRAME)? {
            let chunk = self.read.split_to(used).freeze();
            let (frame, _) = frame::parse(&chunk, MAX_FRAME)?.expect("parsed above");
            self.on_frame(frame, &chunk)?;
            if self.closing {
                break;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame<'_>, chunk: &Bytes) -> Result<(), FrameError> {
        if !self.settled && !matches!(frame, Frame::Settings { ack: false, .. }) {
            return Err(protocol("the client's first frame is not SETTINGS"));
        }
        // A block is bounded like the list it decodes to (plus HPACK's overhead).
        let max_block = self.max_header_list * 2 + MAX_FRAME as usize;
        if let Some((stream, end_stream, block)) = self.blocks.feed(&frame, max_block)? {
            return self.on_header_block(stream, end_stream, &block);
        }
        match frame {
            Frame::Settings { ack: true, .. } => {}
            Frame::Settings { ack: false, settings } => self.on_settings(settings)?,
            // Taken by the assembly above.
            Frame::Headers { .. } | Frame::Continuation { .. } => {}
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(stream, end_stream, chunk.slice_ref(data), flow_len)?,
            Frame::RstStream { stream, .. } => {
                self.idle_check(stream)?;
                let Some(s) = self.streams.remove(&stream) else {
                    return Ok(());
                };
                let unanswered = s.abort.is_some();
                end_stream_state(s, "the client reset the stream");
                if !unanswered {
                    return Ok(());
                }
                let now = tokio::time::Instant::now();
                if now.duration_since(self.early_resets_since) >= Duration::from_secs(1) {
                    self.early_resets = 0;
                    self.early_resets_since = now;
                }
                self.early_resets += 1;
                if self.early_resets > self.max_early_resets {
                    return Err(frame::connection_error(
                        ErrorCode::ENHANCE_YOUR_CALM,
                        "too many streams reset before their response within a second",
                    ));
                }
            }
            Frame::WindowUpdate { stream: 0, increment } => {
                self.send_window += i64::from(increment);
                if self.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(frame::connection_error(
                        ErrorCode::FLOW_CONTROL_ERROR,
                        "the connection window went past 2^31-1",
                    ));
                }
            }
            Frame::WindowUpdate { stream, increment } => {
                self.idle_check(stream)?;
                let over = self.streams.get_mut(&stream).is_some_and(|s| {
                    s.send_window += i64::from(increment);
                    s.send_window > i64::from(frame::MAX_WINDOW)
                });
                if over {
                    self.reset(stream, ErrorCode::FLOW_CONTROL_ERROR)?;
                }
            }
            Frame::Ping { ack: false, payload } => frame::put_ping(&mut self.write, true, payload),
            Frame::Ping { ack: true, .. } => {}
            Frame::GoAway { .. } => self.peer_done = true,
            Frame::Priority { .. } | Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    /// A frame on a stream the client never opened is a connection error (RFC 9113 §5.1).
    fn idle_check(&self, stream: u32) -> Result<(), FrameError> {
        if stream > self.last_stream {
            return Err(protocol("a frame on a stream not yet opened"));
        }
        Ok(())
    }

    fn on_settings(&mut self, settings: frame::Settings) -> Result<(), FrameError> {
        if let Some(size) = settings.max_frame_size {
            self.peer_max_frame = size;
        }
        if let Some(window) = settings.initial_window_size {
            let delta = i64::from(window) - self.peer_initial_window;
            self.peer_initial_window = i64::from(window);
            for s in self.streams.values_mut() {
                s.send_window += delta;
                if s.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(frame::connection_error(
                        ErrorCode::FLOW_CONTROL_ERROR,
                        "a stream window went past 2^31-1",
                    ));
                }
            }
        }
        if settings.header_table_size.is_some() {
            self.encoder.peer_table_size_changed();
        }
        frame::put_settings_ack(&mut self.write);
        self.settled = true;
        Ok(())
    }

    fn on_data(&mut self, id: u32, end_stream: bool, data: Bytes, flow_len: u32) -> Result<(), FrameError> {
        self.recv_window = frame::take_window(self.recv_window, flow_len)?;
        self.idle_check(id)?;
        // Padding is given back at once; data too when nobody will read it.
        let padding = flow_len - data.len() as u32;
        let Some(stream) = self.streams.get_mut(&id) else {
            self.unreported += flow_len;
            return Ok(());
        };
        let Some(incoming) = stream.incoming.clone() else {
            self.unreported += flow_len;
            return self.reset(id, ErrorCode::STREAM_CLOSED);
        };
        self.unreported += padding;
        stream.unreported += padding;
        stream.recv_window -= i64::from(flow_len);
        if stream.recv_window < 0 {
            self.unreported += data.len() as u32;
            return self.reset(id, ErrorCode::FLOW_CONTROL_ERROR);
        }
        let length_broken = match &mut stream.expected {
            Some(left) => match left.checked_sub(data.len() as u64) {
                Some(rest) => {
                    *left = rest;
                    end_stream && rest != 0
                }
                None => true,
            },
            None => false,
        };
        if length_broken {
            self.unreported += data.len() as u32;
            return self.reset(id, ErrorCode::PROTOCOL_ERROR);
        }
        let mut shared = lock(&incoming);
        if !data.is_empty() {
            shared.data.push_back(data);
        }
        if end_stream {
            shared.ended = true;
            stream.incoming = None;
        }
        if let Some(reader) = shared.reader.take() {
            reader.wake();
        }
        drop(shared);
        if end_stream {
            self.close_if_done(id);
        }
        Ok(())
    }

    /// A complete header block: a new stream's request, or a stream's trailers.
    fn on_header_block(&mut self, id: u32, end_stream: bool, block: &[u8]) -> Result<(), FrameError> {
        if let Some(stream) = self.streams.get_mut(&id) {
            let Some(incoming) = stream.incoming.clone() else {
                return self.reset(id, ErrorCode::STREAM_CLOSED);
            };
            let mut trailers = HeaderMap::new();
            let mut malformed = false;
            let decoded = self.decoder.decode(block, self.max_header_list, |f| {
                malformed |= f.name.starts_with(b":") || !add_field(&mut trailers, f);
            });
            match decoded {
                Err(hpack::DecodeError::ListTooLarge { .. }) => malformed = true,
                Err(e) => return Err(crate::codec::compression_error(e)),
                Ok(()) => {}
            }
            if malformed || !end_stream {
                return self.reset(id, ErrorCode::PROTOCOL_ERROR);
            }
            let mut shared = lock(&incoming);
            shared.trailers = Some(trailers);
            shared.ended = true;
            if let Some(reader) = shared.reader.take() {
                reader.wake();
            }
            drop(shared);
            stream.incoming = None;
            self.close_if_done(id);
            return Ok(());
        }
        if id <= self.last_stream || id.is_multiple_of(2) {
            return Err(protocol("a new stream with an identifier not above the last"));
        }
        self.last_stream = id;
        let mut request = RequestHead {
            headers: HeaderMap::with_capacity(8),
            ..RequestHead::default()
        };
        let decoded = self
            .decoder
            .decode(block, self.max_header_list, |f| request.add(f));
        match decoded {
            Err(hpack::DecodeError::ListTooLarge { .. }) => {
                if !self.draining {
                    self.answer_at_once(id, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                }
                return Ok(());
            }
            Err(e) => return Err(crate::codec::compression_error(e)),
            Ok(()) => {}
        }
        if self.draining || self.peer_done || self.streams.len() >= self.max_streams {
            frame::put_rst_stream(&mut self.write, id, ErrorCode::REFUSED_STREAM);
            return Ok(());
        }
        let Some(mut req) = request.into_request() else {
            return self.reset_new(id, ErrorCode::PROTOCOL_ERROR);
        };
        let expected = super::http2::content_length(req.headers());
        if end_stream && expected.is_some_and(|n| n != 0) {
            return self.reset_new(id, ErrorCode::PROTOCOL_ERROR);
        }
        // A request without a body shares nothing with the connection.
        let incoming = (!end_stream).then(|| Arc::new(Mutex::new(Incoming::default())));
        let inbound = incoming.as_ref().map(|shared| Inbound(Arc::clone(shared)));
        let body = H2Body::own(inbound, req.headers());
        *req.version_mut() = Version::HTTP_2;
        let req = req.map(|()| Either::Right(body));
        let forward = self.forward.clone();
        let exchange: Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(async move { (id, forward.forward(req).await) });
        let (abort, registration) = AbortHandle::new_pair();
        self.exchanges.push(Abortable::new(exchange, registration));
        self.streams.insert(
            id,
            Stream {
                incoming,
                recv_window: i64::from(self.stream_window),
                unreported: 0,
                expected,
                send_window: self.peer_initial_window,
                abort: Some(abort),
                outgoing: None,
                held: Bytes::new(),
                sent_end: false,
            },
        );
        Ok(())
    }

    /// Writes the response head, and keeps the body to send as the windows allow.
    fn respond(&mut self, id: u32, response: Response<ProxyBody>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.abort = None;
        let (mut parts, body) = response.into_parts();
        super::http2::complete_response_head(&mut parts.headers, &body);
        let end = body.is_end_stream();
        let encoder = &mut self.encoder;
        frame::put_headers_with(&mut self.write, id, end, self.peer_max_frame, |block| {
            encoder.begin(block);
            encoder.status(parts.status.as_u16(), block);
            encode_fields(encoder, &parts.headers, block);
        });
        if end {
            stream.sent_end = true;
            self.close_if_done(id);
        } else {
            stream.outgoing = Some(Box::pin(body));
        }
    }

    /// Sends what response bodies have, as the windows allow: whether anything was sent.
    fn send_bodies(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut done = std::mem::take(&mut self.finished);
        for (&id, stream) in self.streams.iter_mut() {
            let Some(body) = stream.outgoing.as_mut() else {
                continue;
            };
            loop {
                if self.write.len() - self.written >= WRITE_HIGH {
                    break;
                }
                if !stream.held.is_empty() {
                    let room = stream
                        .send_window
                        .min(self.send_window)
                        .min(i64::from(self.peer_max_frame));
                    if room <= 0 {
                        break;
                    }
                    let part = stream.held.split_to((room as usize).min(stream.held.len()));
                    let last = stream.held.is_empty() && body.is_end_stream();
                    stream.send_window -= part.len() as i64;
                    self.send_window -= part.len() as i64;
                    frame::put_data_head(&mut self.write, id, part.len(), last);
                    self.write.extend_from_slice(&part);
                    progress = true;
                    if last {
                        stream.sent_end = true;
                        done.push(id);
                        break;
                    }
                    continue;
                }
                match body.as_mut().poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            if data.is_empty() && !body.is_end_stream() {
                                continue;
                            }
                            if data.is_empty() {
                                frame::put_data_head(&mut self.write, id, 0, true);
                                stream.sent_end = true;
                                done.push(id);
                                progress = true;
                                break;
                            }
                            stream.held = data;
                        }
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let encoder = &mut self.encoder;
                                frame::put_headers_with(
                                    &mut self.write,
                                    id,
                                    true,
                                    self.peer_max_frame,
                                    |block| {
                                        encoder.begin(block);
                                        encode_fields(encoder, &trailers, block);
                                    },
                                );
                                stream.sent_end = true;
                                done.push(id);
                                progress = true;
                                break;
                            }
                        }
                    },
                    Poll::Ready(None) => {
                        frame::put_data_head(&mut self.write, id, 0, true);
                        stream.sent_end = true;
                        done.push(id);
                        progress = true;
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        debug!("response body failed: {}", crate::error::error_chain(&*e));
                        frame::put_rst_stream(&mut self.write, id, ErrorCode::INTERNAL_ERROR);
                        stream.sent_end = true;
                        stream.incoming = None;
                        done.push(id);
                        progress = true;
                        break;
                    }
                }
            }
        }
        for &id in &done {
            if let Some(stream) = self.streams.get_mut(&id) {
                stream.outgoing = None;
            }
            self.close_if_done(id);
        }
        done.clear();
        self.finished = done;
        progress
    }

    /// Gives the client back, in WINDOW_UPDATE, the window of the request data that was read.
    fn give_back_windows(&mut self, cx: &mut Context<'_>) {
        for (&id, stream) in self.streams.iter_mut() {
            if let Some(incoming) = &stream.incoming {
                let mut shared = lock(incoming);
                if shared.connection.is_none() {
                    shared.connection = Some(cx.waker().clone());
                }
                let released = std::mem::take(&mut shared.released);
                drop(shared);
                stream.unreported += released;
                self.unreported += released;
                if stream.unreported >= self.stream_window / 2 {
                    frame::put_window_update(&mut self.write, id, stream.unreported);
                    stream.recv_window += i64::from(stream.unreported);
                    stream.unreported = 0;
                }
            }
        }
        if self.unreported > 0 && self.unreported >= self.connection_window / 2 {
            frame::put_window_update(&mut self.write, 0, self.unreported);
            self.recv_window += i64::from(self.unreported);
            self.unreported = 0;
        }
    }

    /// Removes a stream both sides are done with.
    fn close_if_done(&mut self, id: u32) {
        let done = self
            .streams
            .get(&id)
            .is_some_and(|s| s.sent_end && s.abort.is_none() && s.outgoing.is_none());
        if !done {
            return;
        }
        let stream = self.streams.remove(&id).expect("checked above");
        if stream.incoming.is_some() {
            // Answered before the request body ended: the client may stop sending
            // (RFC 9113 §8.1).
            frame::put_rst_stream(&mut self.write, id, ErrorCode::NO_ERROR);
            end_stream_state(stream, "the response ended first");
        }
    }

    /// Resets a stream for the client's error.
    fn reset(&mut self, id: u32, code: ErrorCode) -> Result<(), FrameError> {
        frame::put_rst_stream(&mut self.write, id, code);
        if let Some(stream) = self.streams.remove(&id) {
            end_stream_state(stream, "the stream broke the protocol");
        }
        self.count_local_reset()
    }

    fn reset_new(&mut self, id: u32, code: ErrorCode) -> Result<(), FrameError> {
        frame::put_rst_stream(&mut self.write, id, code);
        self.count_local_reset()
    }

    fn count_local_reset(&mut self) -> Result<(), FrameError> {
        self.local_resets += 1;
        if self.local_resets > self.max_local_resets {
            return Err(frame::connection_error(
                ErrorCode::ENHANCE_YOUR_CALM,
                "too many streams reset for errors",
            ));
        }
        Ok(())
    }

    /// Answers a new stream without the request path (its header list too large).
    fn answer_at_once(&mut self, id: u32, status: StatusCode) {
        let encoder = &mut self.encoder;
        frame::put_headers_with(&mut self.write, id, true, self.peer_max_frame, |block| {
            encoder.begin(block);
            encoder.status(status.as_u16(), block);
        });
        let _ = self.count_local_reset();
    }

    fn drain(&mut self) {
        self.draining = true;
        frame::put_goaway(&mut self.write, self.last_stream, ErrorCode::NO_ERROR, b"");
    }

    /// Ends the connection for an error of the client's: GOAWAY, then close once written.
    fn go_away(&mut self, code: ErrorCode) {
        frame::put_goaway(&mut self.write, self.last_stream, code, b"");
        for (_, stream) in self.streams.drain() {
            end_stream_state(stream, "the connection ended");
        }
        self.closing = true;
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        while self.written < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.write.clear();
        self.written = 0;
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Ends what a removed stream left running: its exchange is cancelled and its request body
/// fails with `why` when it had not ended.
fn end_stream_state(stream: Stream, why: &'static str) {
    if let Some(abort) = stream.abort {
        abort.abort();
    }
    if let Some(incoming) = stream.incoming {
        let mut shared = lock(&incoming);
        shared.failed = Some(why);
        if let Some(reader) = shared.reader.take() {
            reader.wake();
        }
    }
}

fn protocol(reason: &'static str) -> FrameError {
    frame::connection_error(ErrorCode::PROTOCOL_ERROR, reason)
}
