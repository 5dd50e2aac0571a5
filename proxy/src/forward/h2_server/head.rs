//! Header blocks on cogmesh's own HTTP/2 server connection: a request's head as its fields are
//! decoded and checked (RFC 9113 §8.2, §8.3.1), and a response's fields encoded.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
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

/// A request's head as its fields are decoded.
#[derive(Default)]
pub(super) struct RequestHead {
    pub(super) method: Option<Method>,
    pub(super) scheme: Option<Bytes>,
    pub(super) authority: Option<Bytes>,
    pub(super) path: Option<Bytes>,
    pub(super) headers: HeaderMap,
    pub(super) malformed: bool,
    pub(super) regular_seen: bool,
}

impl RequestHead {
    pub(super) fn add(&mut self, f: hpack::Field<'_>) {
        if let Some(pseudo) = f.name.strip_prefix(b":") {
            let slot = match pseudo {
                b"method" => {
                    self.malformed |= self.method.is_some() || self.regular_seen;
                    self.method = Method::from_bytes(f.value).ok();
                    self.malformed |= self.method.is_none();
                    return;
                }
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                _ => {
                    self.malformed = true;
                    return;
                }
            };
            self.malformed |= slot.is_some() || self.regular_seen;
            *slot = Some(Bytes::copy_from_slice(f.value));
            return;
        }
        self.regular_seen = true;
        self.malformed |= !add_field(&mut self.headers, f);
    }

    /// The request, or `None` when it is malformed (RFC 9113 §8.3.1).
    pub(super) fn into_request(self) -> Option<Request<()>> {
        if self.malformed {
            return None;
        }
        let method = self.method?;
        let mut uri = Uri::builder();
        if method == Method::CONNECT {
            uri = uri.authority(self.authority?.as_ref());
        } else {
            let path = self.path.filter(|p| !p.is_empty())?;
            uri = uri.scheme(self.scheme?.as_ref()).path_and_query(path.as_ref());
            if let Some(authority) = self.authority {
                uri = uri.authority(authority.as_ref());
            }
        }
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri.build().ok()?;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}
