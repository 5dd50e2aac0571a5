//! The workload's plain HTTP routes (HTTP/1.1 and h2c alike). Routing is by path only; the method
//! is not checked, except that the admin routes that change state want POST.
//!
//! | path                            | answer                                                  |
//! |---------------------------------|---------------------------------------------------------|
//! | `/`                             | 200, 1024 bytes of `x`                                  |
//! | `/echo`                         | 200, the request body streamed back frame by frame      |
//! | `/bytes?n=N`                    | 200, N bytes, byte i = i mod 251, in 64 KiB chunks      |
//! | `/sleep?ms=N`                   | 200 after N ms                                          |
//! | `/status/CODE`                  | CODE (200..=599, else 400)                              |
//! | `/headers`                      | 200, JSON `{"version", "authority", "headers"}`          |
//! | `/ws`                           | 101 and a WebSocket echo (see [`super::ws`]), 400 without upgrade |
//! | `/work[?ms=N]`                  | 200 `done` after a slot and the service time (N ms, else drawn); 503 `queue full` with `Retry-After: 1` (see [`super::sim`]) |
//! | `POST /admin/delay?ms=D[&for_ms=T]` | 200; adds D ms to `/work` and `Infer` arriving in the next T ms (until cleared without T; D=0 clears) |
//! | `POST /admin/stall?for_ms=T`    | 200; `/work` and `Infer` arriving in the next T ms hang until then |
//! | `/admin/stats`                  | 200, JSON `{"name", "capacity", "busy", "queued", "completed", "rejected", "stalled", "received"}` |
//! | anything else                   | 404                                                     |

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::sim::{Refusal, RETRY_AFTER_SECS};
use super::{ws, BoxBody, BoxError, Instance};

/// Size of the body of `GET /`.
const ROOT_BODY_BYTES: usize = 1024;
/// Chunk size of `/bytes` bodies.
const PATTERN_CHUNK_BYTES: usize = 64 * 1024;
/// Period of the `/bytes` pattern: byte i is `i % 251` (a prime, so chunk edges do not line up).
const PATTERN_PERIOD: usize = 251;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Answers one non-gRPC request.
pub(super) async fn route(instance: &Instance, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path();
    if let Some(code) = path.strip_prefix("/status/") {
        return status(code);
    }
    match path {
        "/" => root(),
        "/echo" => echo(req),
        "/bytes" => bytes(req.uri().query()),
        "/sleep" => sleep(req.uri().query()).await,
        "/headers" => headers(&req),
        "/ws" => ws::accept(instance, req),
        "/work" => work(instance, req.uri().query()).await,
        "/admin/delay" => admin_delay(instance, req.method(), req.uri().query()),
        "/admin/stall" => admin_stall(instance, req.method(), req.uri().query()),
        "/admin/stats" => admin_stats(instance),
        "/admin/crash" => admin_crash(req.method()),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn root() -> Response<BoxBody> {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    let body = BODY.get_or_init(|| Bytes::from(vec![b'x'; ROOT_BODY_BYTES]));
    text(StatusCode::OK, body.clone())
}

/// Streams the request body back as it arrives: the response body *is* the request body, so
/// nothing is buffered beyond what hyper holds for one frame. Trailers come back too.
fn echo(req: Request<Incoming>) -> Response<BoxBody> {
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let body = req.into_body().map_err(BoxError::from).boxed_unsync();
    let mut response = Response::new(body);
    if let Some(content_type) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    response
}

fn bytes(query: Option<&str>) -> Response<BoxBody> {
    let Some(n) = query_u64(query, "n") else {
        return text(StatusCode::BAD_REQUEST, "expected ?n=<bytes>");
    };
    let mut response = Response::new(PatternBody::new(n).map_err(|never| match never {}).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    // hyper derives content-length from the body's exact size hint; set it anyway so HTTP/2
    // carries it too.
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, n.into());
    response
}

async fn sleep(query: Option<&str>) -> Response<BoxBody> {
    let Some(ms) = query_u64(query, "ms") else {
        return text(StatusCode::BAD_REQUEST, "expected ?ms=<milliseconds>");
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(StatusCode::OK, format!("slept {ms} ms"))
}

async fn work(instance: &Instance, query: Option<&str>) -> Response<BoxBody> {
    let service_time = match query_value(query, "ms") {
        None => instance.sim.draw_service_time(),
        Some(ms) => match ms.parse() {
            Ok(ms) => Duration::from_millis(ms),
            Err(_) => return text(StatusCode::BAD_REQUEST, "expected ?ms=<milliseconds>"),
        },
    };
    match instance.sim.work(service_time).await {
        Ok(()) => text(StatusCode::OK, "done"),
        Err(refusal) => {
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, refusal.to_string());
            if refusal == Refusal::QueueFull {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, RETRY_AFTER_SECS.into());
            }
            response
        }
    }
}

/// `POST /admin/crash`: the process exits with status 3 right after answering — a replica
/// dying, for demos and fault tests.
fn admin_crash(method: &Method) -> Response<BoxBody> {
    if method != Method::POST {
        return post_only();
    }
    tracing::warn!("crashing on request (POST /admin/crash)");
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::process::exit(3);
    });
    text(StatusCode::OK, "crashing")
}

fn admin_delay(instance: &Instance, method: &Method, query: Option<&str>) -> Response<BoxBody> {
    if method != Method::POST {
        return post_only();
    }
    let (Some(ms), Ok(window)) = (query_u64(query, "ms"), optional_u64(query, "for_ms")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected ?ms=<milliseconds>[&for_ms=<milliseconds>]",
        );
    };
    instance
        .sim
        .set_delay(Duration::from_millis(ms), window.map(Duration::from_millis));
    let answer = match window {
        _ if ms == 0 => "delay cleared".to_owned(),
        Some(window) => format!("delay {ms} ms for {window} ms"),
        None => format!("delay {ms} ms until cleared"),
    };
    text(StatusCode::OK, answer)
}

fn admin_stall(instance: &Instance, method: &Method, query: Option<&str>) -> Response<BoxBody> {
    if method != Method::POST {
        return post_only();
    }
    let Some(window) = query_u64(query, "for_ms") else {
        return text(StatusCode::BAD_REQUEST, "expected ?for_ms=<milliseconds>");
    };
    instance.sim.set_stall(Duration::from_millis(window));
    let answer = if window == 0 {
        "stall cleared".to_owned()
    } else {
        format!("stalled for {window} ms")
    };
    text(StatusCode::OK, answer)
}

fn admin_stats(instance: &Instance) -> Response<BoxBody> {
    let json = serde_json::to_vec(&instance.sim.stats()).expect("stats serialize");
    let mut response = Response::new(full(json));
    response.headers_mut().insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}

fn post_only() -> Response<BoxBody> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static("POST"));
    response
}

fn status(code: &str) -> Response<BoxBody> {
    let Some(status) = parse_status(code) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("invalid status code {code:?}: expected 200..=599"),
        );
    };
    // These statuses must not carry a body.
    if matches!(status.as_u16(), 204 | 205 | 304) {
        let mut response = Response::new(empty());
        *response.status_mut() = status;
        return response;
    }
    text(status, format!("status {}", status.as_u16()))
}

fn headers(req: &Request<Incoming>) -> Response<BoxBody> {
    let json = serde_json::json!({
        "version": format!("{:?}", req.version()),
        "authority": req.uri().authority().map(|a| a.as_str()),
        "headers": headers_json(req.headers()),
    });
    let mut response = Response::new(full(json.to_string()));
    response.headers_mut().insert(CONTENT_TYPE, APPLICATION_JSON);
    response
}

// === helpers ===

/// A `text/plain` response.
pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    response
}

pub(super) fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) fn empty() -> BoxBody {
    full(Bytes::new())
}

/// The value of `key` in a query string, as a `u64`. `None` when absent or not a number.
fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query_value(query, key).and_then(|v| v.parse().ok())
}

/// The value of `key` in a query string, as a `u64` if present: `Err` when it is not a number.
fn optional_u64(query: Option<&str>, key: &str) -> Result<Option<u64>, ()> {
    query_value(query, key)
        .map(|v| v.parse().map_err(|_| ()))
        .transpose()
}

/// The raw value of `key` in a query string.
fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A final (non-1xx) status code, 200..=599.
fn parse_status(code: &str) -> Option<StatusCode> {
    let code: u16 = code.parse().ok()?;
    if (200..=599).contains(&code) {
        StatusCode::from_u16(code).ok()
    } else {
        None
    }
}

/// Header names to their values, repeated values joined by ", ".
fn headers_json(headers: &HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    headers
        .keys()
        .map(|name| {
            let values: Vec<_> = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect();
            (name.as_str().to_owned(), values.join(", ").into())
        })
        .collect()
}

// === impl PatternBody ===

/// The `/bytes` body: `len` bytes of the repeating pattern, in chunks of [`PATTERN_CHUNK_BYTES`].
/// Every chunk is a slice of one shared buffer, so a body of any size allocates nothing.
#[derive(Debug)]
struct PatternBody {
    offset: u64,
    len: u64,
}

impl PatternBody {
    fn new(len: u64) -> Self {
        Self { offset: 0, len }
    }

    fn remaining(&self) -> u64 {
        self.len - self.offset
    }
}

/// The pattern bytes starting at `offset`, `len` of them (`len <= PATTERN_CHUNK_BYTES`).
fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        (0..PATTERN_CHUNK_BYTES + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    });
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    pattern.slice(start..start + len)
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let remaining = self.remaining();
        if remaining == 0 {
            return Poll::Ready(None);
        }
        let len = remaining.min(PATTERN_CHUNK_BYTES as u64) as usize;
        let chunk = pattern_chunk(self.offset, len);
        self.offset += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_found_by_key() {
        assert_eq!(query_u64(Some("n=10"), "n"), Some(10));
        assert_eq!(query_u64(Some("a=1&n=7"), "n"), Some(7));
        assert_eq!(query_u64(Some("n=x"), "n"), None);
        assert_eq!(query_u64(Some("nn=1"), "n"), None);
        assert_eq!(query_u64(None, "n"), None);
        assert_eq!(optional_u64(Some("ms=5&for_ms=9"), "for_ms"), Ok(Some(9)));
        assert_eq!(optional_u64(Some("ms=5"), "for_ms"), Ok(None));
        assert_eq!(optional_u64(Some("for_ms=x"), "for_ms"), Err(()));
    }

    #[test]
    fn only_final_status_codes_are_accepted() {
        assert_eq!(parse_status("200"), Some(StatusCode::OK));
        assert_eq!(parse_status("599").map(|s| s.as_u16()), Some(599));
        assert_eq!(parse_status("101"), None);
        assert_eq!(parse_status("600"), None);
        assert_eq!(parse_status("abc"), None);
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert("x-b", HeaderValue::from_static("3"));
        let json = headers_json(&headers);
        assert_eq!(json["x-a"], "1, 2");
        assert_eq!(json["x-b"], "3");
    }

    #[tokio::test]
    async fn pattern_body_has_the_pattern_across_chunks() {
        let n = 3 * PATTERN_CHUNK_BYTES as u64 + 17;
        let body = PatternBody::new(n);
        assert_eq!(body.size_hint().exact(), Some(n));
        let mut body = body;
        let mut chunks = 0;
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= PATTERN_CHUNK_BYTES);
            all.extend_from_slice(&data);
            chunks += 1;
        }
        assert_eq!(chunks, 4);
        assert_eq!(all.len() as u64, n);
        assert!(all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    }

    #[tokio::test]
    async fn empty_pattern_body_ends_at_once() {
        let mut body = PatternBody::new(0);
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}
