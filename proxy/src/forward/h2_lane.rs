//! The HTTP/2 lane: an HTTP/2 client connection (plain text with prior knowledge, or TLS with
//! ALPN `h2`) served on the `h2` crate directly, every stream of it driven by the connection's
//! own task. Used with `own_http2_codec: false` (`--no-own-http2-codec`); by default HTTP/2
//! clients are served on cogmesh's own codec ([`super::h2_server`]).
//!
//! hyper's server spawns a task per stream: the connection task decodes the request and hands
//! it over, the stream's task runs the request path and hands the response back for the
//! connection task to write, so each exchange costs a spawn and two task hand-overs. Here the
//! connection's task accepts the streams and polls their exchanges itself
//! (`FuturesUnordered`): a response is queued and written in the same turn of the task that
//! received it. The request path is the full one ([`super::Forward`]); only the server
//! around it changes. Measured: about 3 % fewer instructions per h2c request
//! (`bench/instructions.sh`); most of the rest is the `h2` codec itself, on both connections.
//!
//! Settings and limits are the listener's, as hyper's server applies them
//! ([`crate::hardening::LimitsConfig`]): concurrent streams, windows, header list size,
//! pending-accept and local-error reset streams. As hyper's server does, a client's reset stops
//! its stream's exchange (the upstream request is cancelled), a response body of known length
//! gets a `content-length`, and a failing response body resets its stream (`INTERNAL_ERROR`).
//! On drain the connection sends GOAWAY and closes once its streams have ended.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Either;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;
use tracing::debug;

use super::http2::{complete_response_head, pipe, H2Body};
use super::Forward;
use crate::error::error_chain;
use crate::hardening::LimitsConfig;

/// How the preface an HTTP/2 client starts with begins (RFC 9113 §3.4): enough to tell.
pub const PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Reads the start of a connection the relay does not serve (TLS, or the relay off), until it
/// shows whether it is HTTP/2's preface: the connection and what was read, or `None` when the
/// client closed it or sent nothing within `timeout`. Nothing is written before: an HTTP/2
/// server's SETTINGS sent at once, to a TLS client that then closes without a word (`openssl
/// s_client`), made the client die of a broken pipe with its output lost.
pub async fn sniff<IO>(mut io: IO, timeout: Duration) -> Option<(IO, BytesMut)>
where
    IO: AsyncRead + Unpin,
{
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = read.len().min(PREFACE_START.len());
        if n == PREFACE_START.len() || read[..n] != PREFACE_START[..n] {
            return Some((io, read));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut read)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

/// How much [`sniff`] reads at a time.
const READ_CHUNK: usize = 8 * 1024;

/// hyper's server defaults for what the listener's limits do not set.
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// Serves the connection until the client closes it, an error ends it, or the drain (`stop`)
/// has sent GOAWAY and its streams have ended. The handshake must complete within
/// `handshake_timeout`.
pub async fn serve<IO>(
    io: IO,
    forward: Forward,
    limits: &LimitsConfig,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = server_builder(limits).handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!("HTTP/2 handshake failed: {}", error_chain(&e));
            return;
        }
        Err(_) => {
            debug!("no HTTP/2 preface and settings within the header-read timeout");
            return;
        }
    };
    let mut stopped = pin!(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    let mut draining = false;
    let mut streams = FuturesUnordered::new();
    std::future::poll_fn(|cx| loop {
        if !draining && stopped.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.graceful_shutdown();
        }
        // Accepting also drives the connection: it reads frames and writes what the
        // exchanges queued.
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    streams.push(exchange(forward.clone(), req, respond))
                }
                Poll::Ready(Some(Err(e))) => {
                    debug!("HTTP/2 connection ended with an error: {}", error_chain(&e));
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        // An exchange that ended queued its last frames: accept again so they go out in this
        // turn rather than after a wake-up of the task by itself.
        let mut ended = false;
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
            ended = true;
        }
        if !ended {
            return Poll::Pending;
        }
    })
    .await;
}

fn server_builder(limits: &LimitsConfig) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes)
        .max_header_list_size(u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.http2_max_local_error_reset_streams))
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    builder
}

/// One stream: the request through the request path, then the response back, its body
/// streamed as it comes. A reset from the client drops the exchange where it is.
async fn exchange(forward: Forward, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let req = H2Body::request(req).map(Either::Right);
    // In a block of its own, so the request path's future is gone before the body is piped:
    // kept to the end of the function, its space would add to the pipe's in every stream.
    let response = {
        let mut answer = pin!(forward.forward(req));
        std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = respond.poll_reset(cx) {
                debug!("client reset the stream: {reason:?}");
                return Poll::Ready(None);
            }
            answer.as_mut().poll(cx).map(Some)
        })
        .await
    };
    let Some(response) = response else { return };
    // Connection-specific fields, which HTTP/2 forbids, are gone already: the request path
    // removes the upstream's (`strip_hop_by_hop`) and makes none of its own.
    let (mut parts, body) = response.into_parts();
    complete_response_head(&mut parts.headers, &body);
    let end = body.is_end_stream();
    let stream = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) => stream,
        Err(e) => {
            debug!("response not sent: {}", error_chain(&e));
            return;
        }
    };
    if !end {
        pipe(body, stream, h2::Reason::INTERNAL_ERROR).await;
    }
}
