//! cogmesh's own HTTP/2 client connection to an endpoint, on its own codec ([`crate::codec`]):
//! the upstream side of an h2c exchange without the `h2` crate.
//!
//! A connection is shared by the requests of the worker that opened it, each on its own task
//! ([`super::http2::Http2Conns`]; the code does not rely on them being on one thread), so its
//! state is behind one lock: the frames waiting to be written, the streams (a response head,
//! data and trailers received, windows), the peer's settings. Requests encode their HEADERS and
//! DATA into it from their own tasks and write them to the socket themselves, with the lock
//! released and one writer at a time ([`Shared::write_out`]); with many streams open, the first
//! request of a burst yields once and writes the frames of the whole burst in one system call
//! ([`Handle::send`]). One task per connection, on the
//! worker that opened it, writes what the socket did not take, reads the endpoint's frames,
//! decodes response heads (the HPACK decoder is that task's alone) and wakes whoever waits. A
//! stream ends when its response body (or, before the response, its request) is dropped:
//! unfinished, it is reset with CANCEL.
//!
//! Measured (callgrind, one worker, h2c to an nginx upstream, `h2load -c 1`): 51.9k → 42.1k
//! instructions per request against the `h2` crate's client, with the table-driven Huffman
//! decoding and identifier-hashed stream maps that came with it; 39.6k once the HPACK
//! decoder reused its table's buffers. System calls (`COUNT=syscalls bench/instructions.sh`):
//! the read that would end in `EAGAIN` after each response is saved (reads go through
//! `AsyncRead`, which takes a short read as drained), and with two workers no thread sleeps
//! on the lock while another writes (futex calls 0.2–0.6 → 0.01 per request). Batching the
//! writes of a burst (`LOAD=closed CONNECTIONS=64 COUNT=syscalls`): 3.14 → 2.22 system calls
//! per request (HAProxy 2.45), and h2c throughput (h2load, 64 connections, one worker) from
//! 0.80 of HAProxy's to parity (0.95–1.19 over runs; in turn, `--throughput-duels`, 1.00).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

use super::UpstreamBody;
use crate::codec::frame::{self, ErrorCode, Frame, FrameError};
use crate::codec::{hpack, StreamMap};
use crate::compress::BoxError;
use crate::error::{error_chain, ProxyError};

/// What a connection asks of the endpoint: hyper's client defaults, as before.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
pub const MAX_RESPONSE_HEADERS: usize = 16 * 1024;
/// Streams opened before the server's SETTINGS say how many it takes.
const INITIAL_MAX_STREAMS: usize = 100;
const DEFAULT_WINDOW: i64 = 65_535;
const READ_CHUNK: usize = 16 * 1024;
/// Open streams from which requests batch their writes ([`Handle::send`]): at 1000 requests/s
/// a connection rarely has more than two, under a closed-loop load dozens.
const BATCH_AT_STREAMS: usize = 8;

struct ClientStream {
    /// The response head once it came, or why it will not.
    head: Option<Result<Response<()>, String>>,
    /// The head came (or failed): later header blocks are trailers.
    head_seen: bool,
    head_waiter: Option<Waker>,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// END_STREAM came from the endpoint.
    ended: bool,
    failed: Option<String>,
    reader: Option<Waker>,
    /// Read and not yet given back; what the endpoint may still send.
    unreported: u32,
    recv_window: i64,
    /// What this end may still send, and who waits for more.
    send_window: i64,
    sender: Option<Waker>,
    /// This end's side ended (END_STREAM sent).
    sent_end: bool,
}

/// A connection's socket for writing, and its state behind the lock.
struct Shared {
    /// Written by whoever queued frames, outside the lock (see [`Shared::write_out`]).
    io: OwnedWriteHalf,
    state: Mutex<State>,
}

/// How [`Shared::write_out`] left what was queued.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Written {
    /// All of it is written, or another thread is writing it now.
    Done,
    /// The socket is full: the rest waits for it to take more.
    Full,
    Failed,
}

struct State {
    /// Frames to write, queued by requests and by the connection task.
    out: Vec<u8>,
    /// A thread is writing `out`'s earlier part outside the lock; frames queued meanwhile
    /// are written by it, after that part.
    writing: bool,
    /// A request queued its frames and will write `out` after the tasks ready on its worker
    /// have run: requests queued meanwhile leave their frames to it (see [`Handle::send`]).
    flush_pending: bool,
    encoder: hpack::Encoder,
    next_stream: u32,
    streams: StreamMap<ClientStream>,
    peer_max_frame: u32,
    peer_initial_window: i64,
    peer_max_streams: usize,
    send_window: i64,
    unreported: u32,
    /// Why the connection is no longer usable: closed, failed, or GOAWAY.
    unusable: Option<String>,
    /// No [`Handle`] is left: no new stream will come.
    released: bool,
    task: Option<Waker>,
}

impl State {
    fn wake_task(&mut self) {
        if let Some(task) = &self.task {
            task.wake_by_ref();
        }
    }
}

impl Shared {
    /// Writes what is queued, as far as the socket takes it now: whoever queued frames sends
    /// them, with no hop to the connection's task (on another worker, a wake-up costs a
    /// syscall on each side). The socket is written with the lock released, so a request
    /// queueing its frames, or the connection task handing out a response, does not wait
    /// for a write (nor sleep on the lock); what is queued meanwhile is written after, by
    /// the same thread. Takes the lock held and gives it back.
    fn write_out<'a>(&'a self, mut state: MutexGuard<'a, State>) -> (MutexGuard<'a, State>, Written) {
        // This writer (or the one writing now) takes all that is queued: nobody waits on a
        // pending flush any more.
        state.flush_pending = false;
        if state.writing {
            return (state, Written::Done);
        }
        state.writing = true;
        let mut outcome = Written::Done;
        while !state.out.is_empty() && outcome == Written::Done {
            let mut buf = std::mem::take(&mut state.out);
            drop(state);
            let mut at = 0;
            while at < buf.len() {
                match self.io.try_write(&buf[at..]) {
                    Ok(0) => outcome = Written::Failed,
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => outcome = Written::Full,
                    Err(_) => outcome = Written::Failed,
                }
                if outcome != Written::Done {
                    break;
                }
            }
            buf.drain(..at);
            state = lock(self);
            // What was queued meanwhile goes after what is left (and `buf` keeps its capacity).
            let queued = std::mem::replace(&mut state.out, buf);
            state.out.extend_from_slice(&queued);
        }
        state.writing = false;
        (state, outcome)
    }

    /// Sends what a request queued: written now, or by the task when the socket is full or
    /// failed.
    fn send(&self, state: MutexGuard<'_, State>) {
        let (mut state, outcome) = self.write_out(state);
        if outcome != Written::Done {
            state.wake_task();
        }
    }
}

/// A connection to one endpoint; clones share it. When the last is dropped (the pool let the
/// connection go), the connection closes once its streams have ended.
#[derive(Clone)]
pub struct Handle(Arc<Token>);

struct Token(Arc<Shared>);

impl Drop for Token {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.released = true;
        state.wake_task();
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connects (the TCP connection given), sends the preface and SETTINGS, and starts the
/// connection's task on the current worker.
pub fn start(io: TcpStream, addr: SocketAddr) -> Handle {
    let (reader, io) = io.into_split();
    let mut out = Vec::with_capacity(READ_CHUNK);
    out.extend_from_slice(frame::PREFACE);
    use frame::setting::*;
    frame::put_settings(
        &mut out,
        &[
            (ENABLE_PUSH, 0),
            (INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (MAX_HEADER_LIST_SIZE, MAX_RESPONSE_HEADERS as u32),
        ],
    );
    frame::put_window_update(&mut out, 0, CONNECTION_WINDOW - DEFAULT_WINDOW as u32);
    let state = State {
        out,
        writing: false,
        flush_pending: false,
        encoder: hpack::Encoder::default(),
        next_stream: 1,
        streams: StreamMap::default(),
        peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
        peer_initial_window: DEFAULT_WINDOW,
        peer_max_streams: INITIAL_MAX_STREAMS,
        send_window: DEFAULT_WINDOW,
        unreported: 0,
        unusable: None,
        released: false,
        task: None,
    };
    let shared = Arc::new(Shared {
        io,
        state: Mutex::new(state),
    });
    let handle = Handle(Arc::new(Token(Arc::clone(&shared))));
    tokio::spawn(async move {
        let mut conn = Connection {
            reader,
            shared,
            decoder: hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            read: BytesMut::with_capacity(READ_CHUNK),
            blocks: frame::BlockAssembly::default(),
            recv_window: i64::from(CONNECTION_WINDOW),
            woken: Vec::new(),
        };
        let why = std::future::poll_fn(|cx| conn.poll(cx)).await;
        debug!(endpoint = %addr, "HTTP/2 upstream connection ended: {why}");
        conn.fail_all(&why);
    });
    handle
}

impl Handle {
    /// Whether a new stream may go on this connection.
    pub fn usable(&self) -> bool {
        let state = lock(&self.0 .0);
        state.unusable.is_none() && state.streams.len() < state.peer_max_streams
    }

    /// Sends `req` (`:authority` is the URI's, else `authority`; `:path` the request's path and
    /// query) and waits for the response head; the request body is sent meanwhile, and what is
    /// left of it after the head arrives goes on in a task.
    pub async fn send(
        &self,
        addr: SocketAddr,
        authority: &http::uri::Authority,
        req: Request<UpstreamBody>,
    ) -> Result<Response<super::http2::H2Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let (id, flusher) = {
            let mut state = lock(&self.0 .0);
            if let Some(why) = &state.unusable {
                return Err(ProxyError::UpstreamReset {
                    endpoint: addr,
                    cause: why.clone(),
                });
            }
            let id = state.next_stream;
            state.next_stream += 2;
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let authority = parts.uri.authority().unwrap_or(authority);
            let max_frame = state.peer_max_frame;
            let State { out, encoder, .. } = &mut *state;
            frame::put_headers_with(out, id, end, max_frame, |block| {
                encoder.begin(block);
                for (name, value) in [
                    (":method", parts.method.as_str()),
                    (":scheme", "http"),
                    (":authority", authority.as_str()),
                    (":path", path),
                ] {
                    encoder.field(name.as_bytes(), value.as_bytes(), false, block);
                }
                for (name, value) in &parts.headers {
                    encoder.field(
                        name.as_str().as_bytes(),
                        value.as_bytes(),
                        value.is_sensitive(),
                        block,
                    );
                }
            });
            let send_window = state.peer_initial_window;
            state.streams.insert(
                id,
                ClientStream {
                    head: None,
                    head_seen: false,
                    head_waiter: None,
                    data: VecDeque::new(),
                    trailers: None,
                    ended: false,
                    failed: None,
                    reader: None,
                    unreported: 0,
                    recv_window: i64::from(STREAM_WINDOW),
                    send_window,
                    sender: None,
                    sent_end: end,
                },
            );
            // Busy, the frames of the requests the worker reads next are best written with
            // these, in one system call: the first request to queue yields once before it writes
            // (its worker runs the other ready tasks first), and the requests queued meanwhile
            // leave their frames to it. With few streams open, each request writes at once.
            let mut flusher = false;
            if state.streams.len() < BATCH_AT_STREAMS {
                self.0 .0.send(state);
            } else if !state.flush_pending {
                state.flush_pending = true;
                flusher = true;
            }
            (id, flusher)
        };
        // Dropped before the flush (the request cancelled), the guard writes what is queued.
        let mut stream = StreamGuard {
            shared: Arc::clone(&self.0 .0),
            id,
        };
        if flusher {
            tokio::task::yield_now().await;
            let state = lock(&stream.shared);
            if state.flush_pending {
                stream.shared.send(state);
            }
        }
        let head = if end {
            std::future::poll_fn(|cx| stream.poll_head(cx)).await
        } else {
            let mut pipe = Box::pin(send_body(Arc::clone(&self.0 .0), id, body));
            let mut sent = false;
            let head = std::future::poll_fn(|cx| {
                if let Poll::Ready(head) = stream.poll_head(cx) {
                    return Poll::Ready(head);
                }
                if !sent && pipe.as_mut().poll(cx).is_ready() {
                    sent = true;
                }
                Poll::Pending
            })
            .await;
            if head.is_ok() && !sent {
                tokio::spawn(pipe);
            }
            head
        };
        let head = head.map_err(|cause| ProxyError::UpstreamReset {
            endpoint: addr,
            cause,
        })?;
        let remaining = super::http2::content_length(head.headers());
        Ok(head.map(|()| super::http2::H2Body::upstream(UpstreamRecv(stream), remaining)))
    }
}

/// A stream, until its response body is done with: dropped unfinished, it is reset.
struct StreamGuard {
    shared: Arc<Shared>,
    id: u32,
}

impl StreamGuard {
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, String>> {
        let mut state = lock(&self.shared);
        let Some(stream) = state.streams.get_mut(&self.id) else {
            return Poll::Ready(Err("the stream is gone".into()));
        };
        match stream.head.take() {
            Some(head) => Poll::Ready(head),
            None => {
                stream.head_waiter = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        let Some(stream) = state.streams.remove(&self.id) else {
            return;
        };
        // Data received and not read is given back to the connection window.
        let unread: usize = stream.data.iter().map(Bytes::len).sum();
        state.unreported += unread as u32 + stream.unreported;
        if !(stream.ended && stream.sent_end) && stream.failed.is_none() && state.unusable.is_none() {
            frame::put_rst_stream(&mut state.out, self.id, ErrorCode::CANCEL);
        }
        if let Some(sender) = stream.sender {
            sender.wake();
        }
        // The task has work only if the connection is now idle and let go, or windows are
        // to be given back (waking it from another worker costs a syscall on each side).
        let for_task =
            (state.released && state.streams.is_empty()) || state.unreported >= CONNECTION_WINDOW / 2;
        let (mut state, outcome) = self.shared.write_out(state);
        if for_task || outcome != Written::Done {
            state.wake_task();
        }
    }
}

/// Sends a request body on stream `id` as the windows allow, then trailers or END_STREAM. A
/// body that fails resets the stream (CANCEL).
async fn send_body(shared: Arc<Shared>, id: u32, body: UpstreamBody) {
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let frame = match frame {
            None => {
                let mut state = lock(&shared);
                if let Some(stream) = state.streams.get_mut(&id) {
                    stream.sent_end = true;
                    frame::put_data_head(&mut state.out, id, 0, true);
                    shared.send(state);
                }
                return;
            }
            Some(Err(e)) => {
                debug!("request body failed: {}", error_chain(&*e));
                let mut wake = Vec::new();
                let mut state = lock(&shared);
                if let Some(stream) = state.streams.get_mut(&id) {
                    // The endpoint answers a reset with nothing: the stream fails here.
                    fail(stream, "the request body failed", &mut wake);
                    frame::put_rst_stream(&mut state.out, id, ErrorCode::CANCEL);
                    shared.send(state);
                } else {
                    drop(state);
                }
                wake.into_iter().for_each(Waker::wake);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let mut state = lock(&shared);
                    if let Some(stream) = state.streams.get_mut(&id) {
                        stream.sent_end = true;
                        let max_frame = state.peer_max_frame;
                        let State { out, encoder, .. } = &mut *state;
                        frame::put_headers_with(out, id, true, max_frame, |block| {
                            encoder.begin(block);
                            for (name, value) in &trailers {
                                encoder.field(name.as_str().as_bytes(), value.as_bytes(), false, block);
                            }
                        });
                        shared.send(state);
                    }
                }
                return;
            }
        };
        let last = body.is_end_stream();
        if data.is_empty() && !last {
            continue;
        }
        loop {
            let sent = std::future::poll_fn(|cx| {
                let mut state = lock(&shared);
                let (conn_window, max_frame) = (state.send_window, state.peer_max_frame);
                let Some(stream) = state.streams.get_mut(&id).filter(|s| s.failed.is_none()) else {
                    return Poll::Ready(None);
                };
                let room = stream.send_window.min(conn_window).min(i64::from(max_frame));
                if room <= 0 && !data.is_empty() {
                    stream.sender = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let part = data.split_to((room.max(0) as usize).min(data.len()));
                let end = last && data.is_empty();
                stream.send_window -= part.len() as i64;
                if end {
                    stream.sent_end = true;
                }
                state.send_window -= part.len() as i64;
                frame::put_data_head(&mut state.out, id, part.len(), end);
                state.out.extend_from_slice(&part);
                shared.send(state);
                Poll::Ready(Some(data.is_empty()))
            })
            .await;
            match sent {
                None => return,
                Some(true) => break,
                Some(false) => {}
            }
        }
        if last {
            return;
        }
    }
}

/// The reading end of a response body (in an [`super::http2::H2Body`]).
pub struct UpstreamRecv(StreamGuard);

impl UpstreamRecv {
    pub(super) fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let id = self.0.id;
        let mut state = lock(&self.0.shared);
        let Some(stream) = state.streams.get_mut(&id) else {
            return Poll::Ready(Some(Err("the stream is gone".into())));
        };
        if let Some(data) = stream.data.pop_front() {
            stream.unreported += data.len() as u32;
            let update = stream.unreported >= STREAM_WINDOW / 2;
            state.unreported += data.len() as u32;
            if update || state.unreported >= CONNECTION_WINDOW / 2 {
                state.wake_task();
            }
            return Poll::Ready(Some(Ok(data)));
        }
        if let Some(why) = &stream.failed {
            return Poll::Ready(Some(Err(why.clone().into())));
        }
        if stream.ended {
            return Poll::Ready(None);
        }
        stream.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(super) fn poll_trailers(&mut self) -> Poll<Result<Option<HeaderMap>, BoxError>> {
        let id = self.0.id;
        let mut state = lock(&self.0.shared);
        Poll::Ready(Ok(state.streams.get_mut(&id).and_then(|s| s.trailers.take())))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        let state = lock(&self.0.shared);
        state
            .streams
            .get(&self.0.id)
            .is_none_or(|s| s.ended && s.data.is_empty() && s.trailers.is_none() && s.failed.is_none())
    }
}

// === the connection task ===

struct Connection {
    /// The socket's reading half: read by this task only. (Read through `AsyncRead`, which
    /// takes a short read as "drained" and so saves the read that would say `WouldBlock`.)
    reader: OwnedReadHalf,
    shared: Arc<Shared>,
    decoder: hpack::Decoder,
    read: BytesMut,
    blocks: frame::BlockAssembly,
    /// What the endpoint may still send on the connection.
    recv_window: i64,
    /// Requests to wake for what was read. They are woken after the task's next turn under the
    /// lock (window updates, writes), so that a request woken on another worker, which takes
    /// the lock at once, does not find it held (both threads would sleep on the futex).
    woken: Vec<Waker>,
}

impl Connection {
    /// Runs until the connection ends: why.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        loop {
            // The windows readers gave back, and what requests queued and could not write.
            let (idle, unwritten) = {
                let mut state = lock(&self.shared);
                if state.task.as_ref().is_none_or(|t| !t.will_wake(cx.waker())) {
                    state.task = Some(cx.waker().clone());
                }
                let State { streams, out, .. } = &mut *state;
                for (&id, stream) in streams.iter_mut() {
                    if stream.unreported >= STREAM_WINDOW / 2 && !stream.ended {
                        frame::put_window_update(out, id, stream.unreported);
                        stream.recv_window += i64::from(stream.unreported);
                        stream.unreported = 0;
                    }
                }
                if state.unreported >= CONNECTION_WINDOW / 2 {
                    let unreported = state.unreported;
                    frame::put_window_update(&mut state.out, 0, unreported);
                    self.recv_window += i64::from(unreported);
                    state.unreported = 0;
                }
                let (state, outcome) = self.shared.write_out(state);
                if outcome == Written::Failed {
                    return Poll::Ready("write failed".into());
                }
                // Let go by its pool (idle) and no stream left: the connection closes.
                (
                    state.released && state.streams.is_empty(),
                    outcome == Written::Full,
                )
            };
            self.woken.drain(..).for_each(Waker::wake);
            if idle && !unwritten {
                return Poll::Ready("closed as idle".into());
            }
            if unwritten {
                match self.shared.io.as_ref().poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(format!("write failed: {e}")),
                    Poll::Pending => {}
                }
            }
            self.read.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.reader), cx, &mut self.read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready("the endpoint closed the connection".into()),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(format!("read failed: {e}")),
            }
            if let Err(e) = self.on_bytes() {
                let mut state = lock(&self.shared);
                frame::put_goaway(&mut state.out, 0, e.code, b"");
                drop(self.shared.write_out(state));
                self.woken.drain(..).for_each(Waker::wake);
                return Poll::Ready(format!("the endpoint broke the protocol: {e}"));
            }
        }
    }

    /// Handles the frames read; whom they concern is in `self.woken`.
    fn on_bytes(&mut self) -> Result<(), FrameError> {
        let mut wake = std::mem::take(&mut self.woken);
        let result = (|| {
            while let Some((_, used)) = frame::parse(&self.read, frame::DEFAULT_MAX_FRAME_SIZE)? {
                let chunk = self.read.split_to(used).freeze();
                let (f, _) = frame::parse(&chunk, frame::DEFAULT_MAX_FRAME_SIZE)?.expect("parsed above");
                self.on_frame(f, &chunk, &mut wake)?;
            }
            Ok(())
        })();
        self.woken = wake;
        result
    }

    fn on_frame(&mut self, f: Frame<'_>, chunk: &Bytes, wake: &mut Vec<Waker>) -> Result<(), FrameError> {
        let max_block = 2 * MAX_RESPONSE_HEADERS + frame::DEFAULT_MAX_FRAME_SIZE as usize;
        if let Some((stream, end_stream, block)) = self.blocks.feed(&f, max_block)? {
            return self.on_header_block(stream, end_stream, &block, wake);
        }
        match f {
            // Taken by the assembly above.
            Frame::Headers { .. } | Frame::Continuation { .. } => {}
            Frame::Data {
                stream: id,
                end_stream,
                data,
                flow_len,
            } => {
                self.recv_window = frame::take_window(self.recv_window, flow_len)?;
                let mut state = lock(&self.shared);
                let padding = flow_len - data.len() as u32;
                match state.streams.get_mut(&id) {
                    Some(stream) if !stream.ended && stream.failed.is_none() => {
                        stream.recv_window -= i64::from(flow_len);
                        stream.unreported += padding;
                        if !data.is_empty() {
                            stream.data.push_back(chunk.slice_ref(data));
                        }
                        stream.ended |= end_stream;
                        wake.extend(stream.reader.take());
                        state.unreported += padding;
                    }
                    _ => state.unreported += flow_len,
                }
            }
            Frame::RstStream { stream: id, code } => {
                let mut state = lock(&self.shared);
                if let Some(stream) = state.streams.get_mut(&id) {
                    let why = format!("the endpoint reset the stream ({})", code.0);
                    fail(stream, &why, wake);
                }
            }
            Frame::Settings { ack: true, .. } => {}
            Frame::Settings { ack: false, settings } => {
                let mut state = lock(&self.shared);
                if let Some(size) = settings.max_frame_size {
                    state.peer_max_frame = size;
                }
                if let Some(n) = settings.max_concurrent_streams {
                    state.peer_max_streams = n as usize;
                }
                if settings.header_table_size.is_some() {
                    state.encoder.peer_table_size_changed();
                }
                if let Some(window) = settings.initial_window_size {
                    let delta = i64::from(window) - state.peer_initial_window;
                    state.peer_initial_window = i64::from(window);
                    for stream in state.streams.values_mut() {
                        stream.send_window += delta;
                        wake.extend(stream.sender.take());
                    }
                }
                frame::put_settings_ack(&mut state.out);
            }
            Frame::Ping { ack: false, payload } => {
                frame::put_ping(&mut lock(&self.shared).out, true, payload)
            }
            Frame::Ping { ack: true, .. } => {}
            Frame::GoAway {
                last_stream, code, ..
            } => {
                let mut state = lock(&self.shared);
                state.unusable = Some(format!("the endpoint sent GOAWAY ({})", code.0));
                for (&id, stream) in state.streams.iter_mut() {
                    if id > last_stream {
                        fail(stream, "the endpoint refused the stream (GOAWAY)", wake);
                    }
                }
            }
            Frame::WindowUpdate { stream: 0, increment } => {
                let mut state = lock(&self.shared);
                state.send_window += i64::from(increment);
                for stream in state.streams.values_mut() {
                    wake.extend(stream.sender.take());
                }
            }
            Frame::WindowUpdate {
                stream: id,
                increment,
            } => {
                let mut state = lock(&self.shared);
                if let Some(stream) = state.streams.get_mut(&id) {
                    stream.send_window += i64::from(increment);
                    wake.extend(stream.sender.take());
                }
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    /// A response head, an informational one (skipped), or trailers.
    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
        wake: &mut Vec<Waker>,
    ) -> Result<(), FrameError> {
        let mut status = None;
        let mut headers = HeaderMap::with_capacity(8);
        let mut malformed = false;
        let decoded = self.decoder.decode(block, MAX_RESPONSE_HEADERS, |f| {
            if f.name == b":status" {
                status = std::str::from_utf8(f.value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok());
            } else if f.name.starts_with(b":") {
                malformed = true;
            } else {
                match (
                    http::header::HeaderName::from_bytes(f.name),
                    HeaderValue::from_bytes(f.value),
                ) {
                    (Ok(name), Ok(value)) => {
                        headers.append(name, value);
                    }
                    _ => malformed = true,
                }
            }
        });
        let too_large = match decoded {
            Ok(()) => false,
            Err(hpack::DecodeError::ListTooLarge { .. }) => true,
            Err(e) => return Err(crate::codec::compression_error(e)),
        };
        let mut state = lock(&self.shared);
        let Some(stream) = state.streams.get_mut(&id) else {
            return Ok(());
        };
        if too_large || malformed {
            let why = if too_large {
                "response headers over the limit"
            } else {
                "a malformed response head"
            };
            fail(stream, why, wake);
            frame::put_rst_stream(&mut state.out, id, ErrorCode::PROTOCOL_ERROR);
            return Ok(());
        }
        if !stream.head_seen {
            let Some(status) = status.and_then(|s| StatusCode::from_u16(s).ok()) else {
                fail(stream, "a response head without a valid :status", wake);
                return Ok(());
            };
            if status.is_informational() {
                return Ok(());
            }
            let mut response = Response::new(());
            *response.status_mut() = status;
            *response.version_mut() = http::Version::HTTP_2;
            *response.headers_mut() = headers;
            stream.head = Some(Ok(response));
            stream.ended |= end_stream;
            stream.head_seen = true;
            wake.extend(stream.head_waiter.take());
        } else {
            stream.trailers = Some(headers);
            stream.ended = true;
            wake.extend(stream.reader.take());
        }
        Ok(())
    }

    fn fail_all(&mut self, why: &str) {
        let mut wake = Vec::new();
        let mut state = lock(&self.shared);
        state.unusable.get_or_insert_with(|| why.to_string());
        for stream in state.streams.values_mut() {
            fail(stream, why, &mut wake);
        }
        drop(state);
        for w in wake {
            w.wake();
        }
    }
}

/// The stream fails with `why`: its head (if it did not come) and its body.
fn fail(stream: &mut ClientStream, why: &str, wake: &mut Vec<Waker>) {
    if stream.failed.is_some() || (stream.ended && stream.head_seen) {
        return;
    }
    stream.failed = Some(why.to_string());
    if !stream.head_seen {
        stream.head = Some(Err(why.to_string()));
        stream.head_seen = true;
    }
    wake.extend(stream.head_waiter.take());
    wake.extend(stream.reader.take());
    wake.extend(stream.sender.take());
}
