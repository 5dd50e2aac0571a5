//! Header rewriting for one hop: RFC 9110 §7.6.1 hop-by-hop headers, upgrades, and the
//! `x-forwarded-for` / `x-forwarded-proto` headers operators expect from a proxy.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
use http::{Request, Version};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The hop-by-hop headers of RFC 9110 §7.6.1 (and the legacy `Proxy-Connection`), in the
/// order of the bits [`strip_hop_by_hop`] uses for them.
pub(super) const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TRANSFER_ENCODING,
    TE,
    UPGRADE,
];
const HAS_CONNECTION: u8 = 1;
const HAS_TE: u8 = 1 << 4;
const HAS_UPGRADE: u8 = 1 << 5;

/// Removes the headers that describe this connection rather than the message: `Connection`
/// and every header it names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`,
/// and `TE` unless it is exactly `trailers` (gRPC needs that one end to end). With `upgrade`,
/// `Upgrade` is kept and `Connection: upgrade` restated, so the next hop can switch too.
///
/// One pass over the names finds which of them are present, so a message without them costs
/// no hash lookups (this runs twice per proxied request).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present & HAS_CONNECTION != 0 {
        // Headers named by `Connection` other than the ones removed below anyway.
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
        {
            let known = ["close", "keep-alive", "upgrade", "te", ""]
                .iter()
                .any(|k| token.eq_ignore_ascii_case(k));
            if !known {
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(&name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        let bit = 1u8 << i;
        if present & bit == 0 || bit == HAS_UPGRADE {
            continue;
        }
        if bit == HAS_TE
            && headers
                .get(TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HAS_UPGRADE != 0 {
        headers.remove(UPGRADE);
    }
}

/// Appends the client's address to `x-forwarded-for` and sets `x-forwarded-proto`.
pub fn set_forwarded(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    let forwarded = match headers.get(&X_FORWARDED_FOR) {
        Some(prior) => {
            let mut v = Vec::with_capacity(prior.len() + 2 + client_ip.len());
            v.extend_from_slice(prior.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone())
        }
        None => client_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, forwarded);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_connection_and_the_headers_it_names() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_upgrading() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn connection_tokens_are_case_insensitive_and_may_repeat() {
        let mut h = map(&[
            ("Connection", "Keep-Alive"),
            ("connection", " X-Trace-Hop ,close"),
            ("x-trace-hop", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "TRAILERS"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "host"], "{h:?}");
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_untouched() {
        let mut h = map(&[("host", "a"), ("accept", "*/*"), ("x-app", "1")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn appends_to_x_forwarded_for() {
        let ip = HeaderValue::from_static("127.0.0.1");
        let mut h = map(&[("x-forwarded-for", "10.1.2.3")]);
        set_forwarded(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &ip);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    }
}
