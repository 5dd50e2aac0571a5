//! Response compression (and optional request decompression) for the routes that enable it.
//!
//! Owns: `Accept-Encoding` negotiation with q-values ([`negotiate`]), the decision whether a
//! response is worth compressing ([`Compression::eligible`]), the header rewrite that goes with
//! compressing (`Content-Encoding`, `Vary: Accept-Encoding`, no `Content-Length`, a weak `ETag`,
//! no `Accept-Ranges`, as Envoy's compressor filter does), and the streaming encoder/decoder
//! bodies built on `async-compression`. Bodies are never buffered whole: the encoder reads the
//! upstream body as it arrives and hands compressed chunks on as the codec emits them.
//!
//! The pure parts (negotiation, eligibility, header rewrite) are plain functions tested without
//! a runtime; the forward path calls [`Compression::apply`] once per response.

use std::io;

use async_compression::tokio::bufread::{
    BrotliDecoder, BrotliEncoder, GzipDecoder, GzipEncoder, ZstdDecoder, ZstdEncoder,
};
use async_compression::Level;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, VARY,
};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::config::CompressionConfig;

/// The error type of bodies the proxy transforms.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy rewrote (compressed or decompressed), streamed.
pub type CodedBody = UnsyncBoxBody<Bytes, BoxError>;

/// gzip level: zlib's default, what Envoy's gzip compressor and most servers use.
pub const GZIP_LEVEL: i32 = 6;
/// brotli quality: 4 is about gzip-6 speed with better ratio (11, the library default, is for
/// static assets, far too slow per request); Envoy's default is 3.
pub const BROTLI_QUALITY: i32 = 4;
/// zstd level: the library's (and Envoy's) default.
pub const ZSTD_LEVEL: i32 = 3;
/// Size of the chunks the encoder hands downstream at most.
const CHUNK_BYTES: usize = 16 * 1024;

/// A content coding the proxy can produce and decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Encoding {
    #[serde(rename = "zstd")]
    Zstd,
    #[serde(rename = "br")]
    Brotli,
    #[serde(rename = "gzip")]
    Gzip,
}

impl Encoding {
    pub const ALL: [Encoding; 3] = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];

    /// The token in `Content-Encoding` / `Accept-Encoding`, and the metric label.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
        }
    }

    /// The coding named by a `Content-Encoding` value, if it is one we decode.
    pub fn from_token(token: &str) -> Option<Encoding> {
        let t = token.trim();
        if t.eq_ignore_ascii_case("gzip") || t.eq_ignore_ascii_case("x-gzip") {
            Some(Encoding::Gzip)
        } else if t.eq_ignore_ascii_case("br") {
            Some(Encoding::Brotli)
        } else if t.eq_ignore_ascii_case("zstd") {
            Some(Encoding::Zstd)
        } else {
            None
        }
    }
}

/// The q-value of `coding` in an `Accept-Encoding` header, in thousandths (0..=1000), or `None`
/// when the header does not mention it (nor `*`). Malformed elements are skipped.
fn accepted_q(header: &str, coding: Encoding) -> Option<u16> {
    let mut star = None;
    for element in header.split(',') {
        let mut parts = element.split(';');
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let mut q = Some(1000);
        for param in parts {
            if let Some((k, v)) = param.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = parse_qvalue(v.trim());
                }
            }
        }
        let Some(q) = q else { continue };
        if name == "*" {
            star = Some(q);
        } else if Encoding::from_token(name) == Some(coding) {
            return Some(q);
        }
    }
    star
}

/// RFC 9110 §12.4.2: `0[.ddd]` or `1[.000]`, in thousandths.
pub fn parse_qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// The coding to use for a client sending `accept_encoding`: the acceptable one (q > 0) with the
/// highest q, ties broken by `preference` (the route's order). `None`: send identity.
pub fn negotiate(accept_encoding: &str, preference: &[Encoding]) -> Option<Encoding> {
    let mut best: Option<(u16, Encoding)> = None;
    for &coding in preference {
        let q = accepted_q(accept_encoding, coding).unwrap_or(0);
        if q > 0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, coding));
        }
    }
    best.map(|(_, c)| c)
}

/// A route's compression policy with its metric handles, built from [`CompressionConfig`].
pub struct Compression {
    encodings: Vec<Encoding>,
    /// Lower-cased media types; `type/*` entries match every subtype.
    content_types: Vec<String>,
    min_size: u64,
    pub decompress_requests: bool,
    /// Indexed like [`Encoding::ALL`].
    compressed: [Counter; 3],
}

impl Compression {
    /// `counter(encoding)` resolves the route's `compressed_response_total` handle once.
    pub fn new(config: &CompressionConfig, counter: impl Fn(Encoding) -> Counter) -> Self {
        Compression {
            encodings: config.encodings.clone(),
            content_types: config
                .content_types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            min_size: config.min_size,
            decompress_requests: config.decompress_requests,
            compressed: Encoding::ALL.map(counter),
        }
    }

    /// Whether a response of this status and these headers should be compressed for clients that
    /// accept it (and so also carries `Vary: Accept-Encoding` for those that do not).
    pub fn eligible(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if status.is_informational()
            || matches!(
                status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            )
            || status == StatusCode::SWITCHING_PROTOCOLS
        {
            return false;
        }
        // Already encoded (anything but an explicit identity) is passed on as it is.
        if headers
            .get_all(CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
        {
            return false;
        }
        if has_token(headers, CACHE_CONTROL, "no-transform") {
            return false;
        }
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if length.is_some_and(|n| n < self.min_size) {
            return false;
        }
        let Some(media) = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        else {
            return false;
        };
        self.content_types.iter().any(|t| match t.strip_suffix("/*") {
            Some(main) => media.split_once('/').is_some_and(|(m, _)| m == main),
            None => *t == media,
        })
    }

    /// Compresses `response` for a request with `method` and `accept_encoding` when the route's
    /// policy says so; otherwise returns it unchanged (plus `Vary` when it varies).
    pub fn apply<B>(
        &self,
        method: &Method,
        accept_encoding: Option<&HeaderValue>,
        response: Response<B>,
        wrap: impl FnOnce(B, Encoding) -> B,
    ) -> Response<B> {
        if !self.eligible(response.status(), response.headers()) {
            return response;
        }
        let (mut parts, body) = response.into_parts();
        add_vary_accept_encoding(&mut parts.headers);
        let chosen = accept_encoding
            .and_then(|v| v.to_str().ok())
            .and_then(|v| negotiate(v, &self.encodings));
        let Some(encoding) = chosen else {
            return Response::from_parts(parts, body);
        };
        rewrite_for_encoding(&mut parts.headers, encoding);
        self.compressed[encoding_index(encoding)].inc();
        // A HEAD response has no body to encode; its headers say what GET would send.
        let body = if *method == Method::HEAD {
            body
        } else {
            wrap(body, encoding)
        };
        Response::from_parts(parts, body)
    }
}

fn encoding_index(e: Encoding) -> usize {
    Encoding::ALL.iter().position(|x| *x == e).unwrap_or(0)
}

/// Whether a comma-separated header lists `token` (case-insensitive, parameters ignored).
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(['=', ';'])
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(token)
        })
}

/// Adds `Vary: Accept-Encoding` unless `Vary` already lists it or is `*`.
pub fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    if has_token(headers, VARY, "accept-encoding") || has_token(headers, VARY, "*") {
        return;
    }
    headers.append(VARY, HeaderValue::from_static("accept-encoding"));
}

/// The header changes of a compressed response: its coding, no length (the body is streamed),
/// a weak validator (the bytes differ from the identity representation's), no range support.
pub fn rewrite_for_encoding(headers: &mut HeaderMap, encoding: Encoding) {
    headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
    headers.remove(CONTENT_LENGTH);
    headers.remove(ACCEPT_RANGES);
    if let Some(etag) = headers.get(ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = Vec::with_capacity(etag.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(etag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(v) => {
                    headers.insert(ETAG, v);
                }
                Err(_) => {
                    headers.remove(ETAG);
                }
            }
        }
    }
}

/// The request's `Content-Encoding` if it is exactly one coding we decode.
pub fn request_encoding(headers: &HeaderMap) -> Option<Encoding> {
    let mut values = headers.get_all(CONTENT_ENCODING).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    if text.contains(',') {
        return None;
    }
    Encoding::from_token(text)
}

/// Removes the headers a decoded request body invalidates.
pub fn rewrite_for_decoding(headers: &mut HeaderMap) {
    headers.remove(CONTENT_ENCODING);
    headers.remove(CONTENT_LENGTH);
}

// === streaming bodies ===

fn reader<B>(body: B) -> StreamReader<impl futures_util::Stream<Item = io::Result<Bytes>>, Bytes>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    StreamReader::new(body.into_data_stream().map_err(|e| io::Error::other(e.into())))
}

fn stream_out<R: AsyncRead + Send + 'static>(read: R) -> CodedBody {
    let frames = ReaderStream::with_capacity(read, CHUNK_BYTES)
        .map_ok(Frame::data)
        .map_err(BoxError::from);
    StreamBody::new(frames).boxed_unsync()
}

/// `body` compressed with `encoding`, as a stream.
pub fn encode<B>(body: B, encoding: Encoding) -> CodedBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let input = reader(body);
    match encoding {
        Encoding::Gzip => stream_out(GzipEncoder::with_quality(input, Level::Precise(GZIP_LEVEL))),
        Encoding::Brotli => stream_out(BrotliEncoder::with_quality(input, Level::Precise(BROTLI_QUALITY))),
        Encoding::Zstd => stream_out(ZstdEncoder::with_quality(input, Level::Precise(ZSTD_LEVEL))),
    }
}

/// `body` decompressed from `encoding`, as a stream; corrupt input ends the body with an error.
pub fn decode<B>(body: B, encoding: Encoding) -> CodedBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let input = reader(body);
    match encoding {
        Encoding::Gzip => stream_out(GzipDecoder::new(input)),
        Encoding::Brotli => stream_out(BrotliDecoder::new(input)),
        Encoding::Zstd => stream_out(ZstdDecoder::new(input)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Encoding::*;

    const ALL: [Encoding; 3] = [Zstd, Brotli, Gzip];

    #[test]
    fn qvalues_parse_exactly() {
        assert_eq!(parse_qvalue("1"), Some(1000));
        assert_eq!(parse_qvalue("1.000"), Some(1000));
        assert_eq!(parse_qvalue("0.5"), Some(500));
        assert_eq!(parse_qvalue("0.05"), Some(50));
        assert_eq!(parse_qvalue("0.123"), Some(123));
        assert_eq!(parse_qvalue("0"), Some(0));
        assert_eq!(parse_qvalue("0."), Some(0));
        for bad in ["1.5", "2", "0.1234", "-1", "abc", "", "0.x", "1.001"] {
            assert_eq!(parse_qvalue(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn negotiation_follows_q_then_the_route_order() {
        // curl --compressed
        assert_eq!(negotiate("deflate, gzip, br, zstd", &ALL), Some(Zstd));
        assert_eq!(negotiate("deflate, gzip, br, zstd", &[Gzip, Brotli]), Some(Gzip));
        assert_eq!(negotiate("gzip;q=0.5, br;q=0.8", &ALL), Some(Brotli));
        assert_eq!(negotiate("gzip;q=1.0, br;q=0.999", &ALL), Some(Gzip));
        assert_eq!(negotiate("x-gzip", &ALL), Some(Gzip));
        assert_eq!(negotiate("GZIP ; Q=0.3", &ALL), Some(Gzip));
        // Wildcards cover what is not named; q=0 forbids.
        assert_eq!(negotiate("*", &ALL), Some(Zstd));
        assert_eq!(negotiate("*;q=0.1, zstd;q=0", &ALL), Some(Brotli));
        assert_eq!(negotiate("gzip;q=0, br;q=0, zstd;q=0", &ALL), None);
        assert_eq!(negotiate("identity", &ALL), None);
        assert_eq!(negotiate("deflate", &ALL), None);
        assert_eq!(negotiate("", &ALL), None);
        // Malformed elements are ignored, the rest still counts.
        assert_eq!(negotiate("br;q=abc, gzip;q=0.2", &ALL), Some(Gzip));
        assert_eq!(negotiate(",,;q=1, ;", &ALL), None);
    }

    fn policy() -> Compression {
        let config: CompressionConfig = serde_yaml_ng::from_str("min_size: 100").unwrap();
        Compression::new(&config, |_| Counter::default())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn eligibility() {
        let p = policy();
        let ok = StatusCode::OK;
        let json = [("content-type", "application/json; charset=utf-8")];
        assert!(p.eligible(ok, &headers(&json)));
        assert!(
            p.eligible(ok, &headers(&[("content-type", "text/csv")])),
            "text/*"
        );
        assert!(!p.eligible(ok, &headers(&[("content-type", "image/png")])));
        assert!(!p.eligible(ok, &headers(&[])), "no content type");
        assert!(!p.eligible(StatusCode::NO_CONTENT, &headers(&json)));
        assert!(!p.eligible(StatusCode::NOT_MODIFIED, &headers(&json)));
        assert!(!p.eligible(StatusCode::PARTIAL_CONTENT, &headers(&json)));
        let mut h = headers(&json);
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        assert!(!p.eligible(ok, &h), "below min_size");
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("100"));
        assert!(p.eligible(ok, &h));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("garbage"));
        assert!(p.eligible(ok, &h), "a malformed length counts as unknown");
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!p.eligible(ok, &h), "already encoded");
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert!(p.eligible(ok, &h));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=5, no-transform"));
        assert!(!p.eligible(ok, &h));
    }

    #[test]
    fn headers_of_a_compressed_response() {
        let mut h = headers(&[
            ("content-length", "5000"),
            ("etag", "\"abc\""),
            ("accept-ranges", "bytes"),
            ("vary", "origin"),
        ]);
        add_vary_accept_encoding(&mut h);
        rewrite_for_encoding(&mut h, Brotli);
        assert_eq!(h["content-encoding"], "br");
        assert_eq!(h["etag"], "W/\"abc\"");
        assert!(!h.contains_key("content-length") && !h.contains_key("accept-ranges"));
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["origin", "accept-encoding"]);
        // Already weak stays as is; Vary is not repeated.
        add_vary_accept_encoding(&mut h);
        rewrite_for_encoding(&mut h, Gzip);
        assert_eq!(h["etag"], "W/\"abc\"");
        assert_eq!(h.get_all("vary").iter().count(), 2);
        let mut star = headers(&[("vary", "*")]);
        add_vary_accept_encoding(&mut star);
        assert_eq!(star.get_all("vary").iter().count(), 1);
    }

    #[test]
    fn request_encodings() {
        assert_eq!(
            request_encoding(&headers(&[("content-encoding", "gzip")])),
            Some(Gzip)
        );
        assert_eq!(
            request_encoding(&headers(&[("content-encoding", "zstd")])),
            Some(Zstd)
        );
        assert_eq!(
            request_encoding(&headers(&[("content-encoding", "gzip, br")])),
            None
        );
        assert_eq!(
            request_encoding(&headers(&[("content-encoding", "deflate")])),
            None
        );
        assert_eq!(request_encoding(&headers(&[])), None);
    }

    #[tokio::test]
    async fn encoders_round_trip_through_decoders() {
        let text: Bytes = (0..50_000u32)
            .map(|i| format!("{{\"n\":{i}}}"))
            .collect::<String>()
            .into();
        for e in ALL {
            let body = http_body_util::Full::new(text.clone());
            let packed = encode(body, e).collect().await.unwrap().to_bytes();
            assert!(packed.len() < text.len() / 4, "{e:?}: {} bytes", packed.len());
            let unpacked = decode(http_body_util::Full::new(packed), e)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert!(unpacked == text, "{e:?} round trip differs");
        }
        // Garbage fails the body, it does not panic.
        let bad = decode(http_body_util::Full::new(Bytes::from_static(b"not gzip")), Gzip);
        assert!(bad.collect().await.is_err());
    }
}
