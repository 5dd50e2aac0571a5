//! Header blocks on cogmesh's own HTTP/2 server connection: a request's head as its fields are
//! decoded and checked (RFC 9113 §8.2, §8.3.1), and a response's fields encoded.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Uri};

use crate::codec::hpack;

/// Appends the fields of `headers`, sensitive values never indexed.
pub(super) fn encode_fields(encoder: &hpack::Encoder, headers: &HeaderMap, block: &mut Vec<u8>) {
    for (name, value) in headers {
        encoder.field(
            name.as_str().as_bytes(),
            value.as_bytes(),
            value.is_sensitive(),
            block,
        );
    }
}

/// Adds a regular field to `headers`: `false` when it is not valid in HTTP/2 (RFC 9113
/// §8.2): uppercase or invalid names, invalid values, connection-specific fields, a `te`
/// other than `trailers`.
pub(super) fn add_field(headers: &mut HeaderMap, f: hpack::Field<'_>) -> bool {
    if f.name.iter().any(u8::is_ascii_uppercase) {
        return false;
    }
    let Ok(name) = HeaderName::from_bytes(f.name) else {
        return false;
    };
    let Ok(mut value) = HeaderValue::from_bytes(f.value) else {
        return false;
    };
    let connection_specific = matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    );
    if connection_specific || (name == http::header::TE && f.value != b"trailers") {
        return false;
    }
    value.set_sensitive(f.never_indexed);
    headers.append(name, value);
    true
}

/// A request's head as its fields are decoded. `:authority` and `:path` are copied once out of
/// the decoding buffer and become the URI's parts as they are.
#[derive(Default)]
pub(super) struct RequestHead {
    pub(super) method: Option<Method>,
    pub(super) scheme: Option<Scheme>,
    pub(super) authority: Option<Bytes>,
    pub(super) path: Option<Bytes>,
    pub(super) headers: HeaderMap,
    pub(super) malformed: bool,
    pub(super) regular_seen: bool,
}

impl RequestHead {
    pub(super) fn add(&mut self, f: hpack::Field<'_>) {
        let Some(pseudo) = f.name.strip_prefix(b":") else {
            self.regular_seen = true;
            self.malformed |= !add_field(&mut self.headers, f);
            return;
        };
        // Pseudo-header fields come first, once each, with valid values.
        let valid = match pseudo {
            b"method" => set_once(&mut self.method, Method::from_bytes(f.value).ok()),
            b"scheme" => set_once(&mut self.scheme, Scheme::try_from(f.value).ok()),
            b"authority" => set_once(&mut self.authority, Some(Bytes::copy_from_slice(f.value))),
            b"path" => set_once(&mut self.path, Some(Bytes::copy_from_slice(f.value))),
            _ => false,
        };
        self.malformed |= !valid || self.regular_seen;
    }

    /// The request, or `None` when it is malformed (RFC 9113 §8.3.1). A request without
    /// `:authority`, which the RFC allows, gets a URI of its path alone, like an HTTP/1.1
    /// request in origin form: its host is then the `Host` header's.
    pub(super) fn into_request(self) -> Option<Request<()>> {
        if self.malformed {
            return None;
        }
        let method = self.method?;
        let mut uri = http::uri::Parts::default();
        if method == Method::CONNECT {
            uri.authority = Some(Authority::from_maybe_shared(self.authority?).ok()?);
        } else {
            let path = self.path.filter(|p| !p.is_empty())?;
            let scheme = self.scheme?;
            uri.path_and_query = Some(PathAndQuery::from_maybe_shared(path).ok()?);
            if let Some(authority) = self.authority {
                uri.authority = Some(Authority::from_maybe_shared(authority).ok()?);
                uri.scheme = Some(scheme);
            }
        }
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_parts(uri).ok()?;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}

/// Fills a pseudo-header's slot: `false` when it was filled already or the value is not valid.
fn set_once<T>(slot: &mut Option<T>, value: Option<T>) -> bool {
    let fresh = slot.is_none() && value.is_some();
    *slot = value;
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&str, &str)]) -> Option<Request<()>> {
        let mut head = RequestHead::default();
        for (name, value) in fields {
            head.add(hpack::Field {
                name: name.as_bytes(),
                value: value.as_bytes(),
                never_indexed: false,
            });
        }
        head.into_request()
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "web.example:8080"),
        (":path", "/a?b=c"),
    ];

    #[test]
    fn pseudo_headers_make_the_uri() {
        let req = head(&[GET[0], GET[1], GET[2], GET[3], ("accept", "*/*")]).unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "http://web.example:8080/a?b=c");
        assert_eq!(req.headers()["accept"], "*/*");
    }

    #[test]
    fn without_authority_the_uri_is_the_path_and_host_names_the_host() {
        let req = head(&[GET[0], GET[1], GET[3], ("host", "web.example")]).unwrap();
        assert_eq!(req.uri(), "/a?b=c");
        assert_eq!(req.uri().authority(), None);
        assert_eq!(req.headers()["host"], "web.example");
    }

    #[test]
    fn connect_names_only_an_authority() {
        let req = head(&[(":method", "CONNECT"), (":authority", "db.example:5432")]).unwrap();
        assert_eq!(req.uri().authority().unwrap(), "db.example:5432");
        assert!(head(&[(":method", "CONNECT")]).is_none());
    }

    #[test]
    fn malformed_heads_are_refused() {
        let cases: [&[(&str, &str)]; 7] = [
            // A pseudo-header twice, after a regular field, unknown, or with a bad value.
            &[GET[0], GET[1], GET[2], GET[3], (":path", "/again")],
            &[GET[0], GET[1], ("accept", "*/*"), GET[2], GET[3]],
            &[GET[0], GET[1], GET[2], GET[3], (":status", "200")],
            &[GET[0], (":scheme", "ht tp"), GET[2], GET[3]],
            &[GET[0], GET[1], (":authority", "a b"), GET[3]],
            // No :path, or an empty one.
            &[GET[0], GET[1], GET[2]],
            &[GET[0], GET[1], GET[2], (":path", "")],
        ];
        for fields in cases {
            assert!(head(fields).is_none(), "{fields:?}");
        }
    }
}
