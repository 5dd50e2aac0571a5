//! `GET /ws`: the WebSocket echo. Checks the RFC 6455 upgrade request, answers `101 Switching
//! Protocols` itself, and, once hyper hands over the connection, echoes text and binary messages
//! until the client closes. Ping/pong and the close handshake are tungstenite's. On shutdown a
//! session sends `1001 going away` and waits for the client's close.

use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::http::{empty, text};
use super::{BoxBody, Instance};

/// The only WebSocket version there is (RFC 6455).
const WEBSOCKET_VERSION: &str = "13";

/// Answers an upgrade request with 101 and starts the echo session; anything else gets 400.
pub(super) fn accept(instance: &Instance, mut req: Request<Incoming>) -> Response<BoxBody> {
    let Some(key) = upgrade_key(req.method(), req.headers()) else {
        let mut response = text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade: GET with Connection: upgrade, Upgrade: websocket, \
             Sec-WebSocket-Version: 13 and Sec-WebSocket-Key",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static(WEBSOCKET_VERSION),
        );
        return response;
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    let shutdown = instance.shutdown.clone();
    let session = instance.sessions.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => echo(TokioIo::new(upgraded), shutdown).await,
            Err(error) => tracing::debug!(%error, "WebSocket upgrade failed"),
        }
        drop(session);
    });

    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    response
}

/// The `Sec-WebSocket-Key` of a valid upgrade request, else `None`.
fn upgrade_key<'a>(method: &Method, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|value| value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let upgrade_request = method == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == WEBSOCKET_VERSION);
    if !upgrade_request {
        return None;
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|key| !key.is_empty())
}

/// Echoes messages on an upgraded connection until it closes.
async fn echo<S>(io: S, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    tracing::debug!("WebSocket session open");
    let mut closing = false;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if let Err(error) = ws.send(message).await {
                        tracing::debug!(%error, "WebSocket send failed");
                        break;
                    }
                }
                // Pings are answered and a close is acknowledged by tungstenite as we keep reading.
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, "WebSocket session ended with an error");
                    break;
                }
                None => break,
            },
            () = stopping(&mut shutdown), if !closing => {
                closing = true;
                let frame = CloseFrame { code: CloseCode::Away, reason: "shutting down".into() };
                if ws.close(Some(frame)).await.is_err() {
                    break;
                }
            }
        }
    }
    tracing::debug!("WebSocket session closed");
}

/// Resolves once shutdown has started (or the workload is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, before the caller awaits again.
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        headers
    }

    #[test]
    fn a_complete_upgrade_request_is_accepted() {
        let headers = upgrade_headers();
        let key = upgrade_key(&Method::GET, &headers).unwrap();
        // The worked example of RFC 6455, section 1.3.
        assert_eq!(derive_accept_key(key.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn incomplete_upgrade_requests_are_refused() {
        assert!(upgrade_key(&Method::POST, &upgrade_headers()).is_none());
        for missing in [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_KEY,
        ] {
            let mut headers = upgrade_headers();
            headers.remove(&missing);
            assert!(upgrade_key(&Method::GET, &headers).is_none(), "{missing}");
        }
        let mut headers = upgrade_headers();
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert!(upgrade_key(&Method::GET, &headers).is_none());
    }
}
