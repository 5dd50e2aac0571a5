//! RFC 9111 decisions as plain functions: `Cache-Control` parsing, whether a response may be
//! stored by a shared cache, its freshness lifetime and current age, and the conditional request
//! that revalidates it. Every function takes the clock as an argument, so tests pin exact values.
//!
//! Malformed directives are treated as absent (a `max-age=abc` is no `max-age`); the one
//! exception is RFC 9111 §5.3's rule that an unparsable `Expires` means "already expired".

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, PRAGMA, SET_COOKIE, VARY,
};
use http::StatusCode;

/// delta-seconds above this are capped (RFC 9111 §1.2.2).
pub const MAX_DELTA_SECS: u64 = 2_147_483_648;

/// The directives of `Cache-Control` a shared cache acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
}

impl CacheControl {
    /// Parses every `Cache-Control` line of `headers`. The first occurrence of a directive wins.
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for directive in split_directives(text) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let name = name.to_ascii_lowercase();
                match name.as_str() {
                    "max-age" if cc.max_age.is_none() => cc.max_age = arg.and_then(delta_seconds),
                    "s-maxage" if cc.s_maxage.is_none() => cc.s_maxage = arg.and_then(delta_seconds),
                    "no-store" => cc.no_store = true,
                    // The field-name forms are handled like the plain ones (the safe side).
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits on commas outside quoted strings (`private="a, b"` is one directive).
fn split_directives(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut quoted = false;
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}

/// `delta-seconds`: digits only, capped at [`MAX_DELTA_SECS`].
fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(MAX_DELTA_SECS).min(MAX_DELTA_SECS))
}

/// An HTTP-date header, or `None` if absent or malformed.
pub fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?.trim()).ok()
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1 "heuristically
/// cacheable").
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Whether the response has `ETag` or `Last-Modified`.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

/// What the request asks of the cache (RFC 9111 §5.2.1), plus what makes it unsuitable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestMode {
    /// Serve from the cache when fresh, store the response.
    Normal,
    /// Serve only after revalidating (`no-cache`, `max-age=0`, `Pragma: no-cache`); store.
    Revalidate,
    /// Neither serve nor store (`no-store`, ranges).
    Bypass,
}

pub fn request_mode(headers: &HeaderMap) -> RequestMode {
    let cc = CacheControl::parse(headers);
    if cc.no_store || headers.contains_key(http::header::RANGE) {
        return RequestMode::Bypass;
    }
    let pragma_no_cache = !headers.contains_key(CACHE_CONTROL)
        && headers
            .get_all(PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
    if cc.no_cache || cc.max_age == Some(0) || pragma_no_cache {
        RequestMode::Revalidate
    } else {
        RequestMode::Normal
    }
}

/// Whether a shared cache may store this response to a GET (RFC 9111 §3, §3.5), given the
/// route's `default_ttl`. Responses setting cookies are never stored (the nginx default).
pub fn storable(
    status: StatusCode,
    request: &HeaderMap,
    response: &HeaderMap,
    default_ttl: Duration,
) -> bool {
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return false;
    }
    let req = CacheControl::parse(request);
    let cc = CacheControl::parse(response);
    if req.no_store || cc.no_store || cc.private || response.contains_key(SET_COOKIE) {
        return false;
    }
    if vary_names(response).is_none() {
        return false; // Vary: *
    }
    if request.contains_key(AUTHORIZATION) && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return false;
    }
    let explicit = cc.s_maxage.is_some() || cc.max_age.is_some() || response.contains_key(EXPIRES);
    if explicit || cc.public {
        return true;
    }
    heuristically_cacheable(status) && (!default_ttl.is_zero() || has_validator(response) || cc.no_cache)
}

/// The freshness lifetime (RFC 9111 §4.2.1): `s-maxage`, else `max-age`, else `Expires − Date`,
/// else `default_ttl`; zero with `no-cache` (always revalidate). `received` stands in for a
/// missing `Date`.
pub fn freshness_lifetime(response: &HeaderMap, received: SystemTime, default_ttl: Duration) -> Duration {
    let cc = CacheControl::parse(response);
    if cc.no_cache {
        return Duration::ZERO;
    }
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Duration::from_secs(s);
    }
    if response.contains_key(EXPIRES) {
        let Some(expires) = http_date(response, EXPIRES) else {
            return Duration::ZERO; // invalid Expires: already expired (§5.3)
        };
        let date = http_date(response, DATE).unwrap_or(received);
        return expires.duration_since(date).unwrap_or(Duration::ZERO);
    }
    default_ttl
}

/// When and how a stored response was obtained: what its age is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    /// The response's `Date`, or `response_time` without one.
    pub date: SystemTime,
    /// The response's `Age` header (0 without one).
    pub age: Duration,
    pub lifetime: Duration,
}

impl Timing {
    pub fn new(
        response: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        default_ttl: Duration,
    ) -> Timing {
        let age = response
            .get(http::header::AGE)
            .and_then(|v| delta_seconds(v.to_str().ok()?.trim()))
            .map_or(Duration::ZERO, Duration::from_secs);
        Timing {
            request_time,
            response_time,
            date: http_date(response, DATE).unwrap_or(response_time),
            age,
            lifetime: freshness_lifetime(response, response_time, default_ttl),
        }
    }

    /// RFC 9111 §4.2.3 `current_age` at `now`.
    pub fn current_age(&self, now: SystemTime) -> Duration {
        let apparent = self.response_time.duration_since(self.date).unwrap_or_default();
        let delay = self
            .response_time
            .duration_since(self.request_time)
            .unwrap_or_default();
        let initial = apparent.max(self.age + delay);
        let resident = now.duration_since(self.response_time).unwrap_or_default();
        initial + resident
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.current_age(now) < self.lifetime
    }
}

/// The request header names `Vary` lists, lower-cased; `None` for `Vary: *`.
pub fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in response.get_all(VARY) {
        let Ok(text) = v.to_str() else { continue };
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    Some(names)
}

/// The values a request has for `names`, joined per name, to match later requests against
/// (RFC 9111 §4.1; values compared after trimming, case-sensitively).
pub fn vary_values(request: &HeaderMap, names: &[HeaderName]) -> Vec<(HeaderName, Option<Vec<u8>>)> {
    names
        .iter()
        .map(|n| {
            let mut joined: Option<Vec<u8>> = None;
            for v in request.get_all(n) {
                let j = joined.get_or_insert_with(Vec::new);
                if !j.is_empty() {
                    j.extend_from_slice(b", ");
                }
                j.extend_from_slice(v.as_bytes().trim_ascii());
            }
            (n.clone(), joined)
        })
        .collect()
}

/// Whether a request selects a stored variant recorded with `stored` vary values.
pub fn vary_matches(request: &HeaderMap, stored: &[(HeaderName, Option<Vec<u8>>)]) -> bool {
    let names: Vec<HeaderName> = stored.iter().map(|(n, _)| n.clone()).collect();
    vary_values(request, &names) == stored
}

/// Whether the request carries its own preconditions (then only a fresh hit answers it).
pub fn has_conditionals(headers: &HeaderMap) -> bool {
    headers.contains_key(IF_NONE_MATCH)
        || headers.contains_key(IF_MODIFIED_SINCE)
        || headers.contains_key(http::header::IF_MATCH)
        || headers.contains_key(http::header::IF_UNMODIFIED_SINCE)
}

/// Whether a client's `If-None-Match` (weak comparison) or, without it, `If-Modified-Since`
/// says its copy of the stored response is current (RFC 9110 §13.2.2): answer 304.
pub fn not_modified_for(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let mine = opaque(etag);
        return inm.split(',').any(|t| t.trim() == "*" || opaque(t) == mine);
    }
    match (
        http_date(request, IF_MODIFIED_SINCE),
        http_date(stored, LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// The validators of a stored response as request conditionals (RFC 9111 §4.3.1).
pub fn conditional_headers(stored: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Some(etag) = stored.get(ETAG) {
        out.push((IF_NONE_MATCH, etag.clone()));
    }
    if let Some(lm) = stored.get(LAST_MODIFIED) {
        out.push((IF_MODIFIED_SINCE, lm.clone()));
    }
    out
}

/// Headers a 304 must not change in the stored response (RFC 9111 §3.2).
const KEEP_ON_UPDATE: [HeaderName; 3] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::TRANSFER_ENCODING,
];

/// The stored headers updated with those of a 304 (RFC 9111 §4.3.4).
pub fn updated_headers(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    for name in not_modified.keys() {
        if KEEP_ON_UPDATE.contains(name) {
            continue;
        }
        headers.remove(name);
        for v in not_modified.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    /// 2026-01-01T00:00:00Z, the fixed clock of these tests.
    fn t0() -> SystemTime {
        httpdate::parse_http_date("Thu, 01 Jan 2026 00:00:00 GMT").unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn cache_control_directives() {
        let cc = CacheControl::parse(&h(&[
            ("cache-control", "public, max-age=60"),
            (
                "cache-control",
                "S-MAXAGE=\"120\", must-revalidate, private=\"x, y\"",
            ),
        ]));
        assert_eq!(
            cc,
            CacheControl {
                max_age: Some(60),
                s_maxage: Some(120),
                no_store: false,
                no_cache: false,
                private: true,
                public: true,
                must_revalidate: true,
            }
        );
        let cc = CacheControl::parse(&h(&[(
            "cache-control",
            "no-store,no-cache, max-age=10, max-age=20",
        )]));
        assert!(cc.no_store && cc.no_cache);
        assert_eq!(cc.max_age, Some(10), "the first occurrence wins");
        // Malformed arguments are absent; huge ones capped.
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=abc, s-maxage=-1, ,,")]));
        assert_eq!(cc, CacheControl::default());
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=99999999999999999999999")]));
        assert_eq!(cc.max_age, Some(MAX_DELTA_SECS));
    }

    #[test]
    fn freshness_lifetime_precedence() {
        let zero = Duration::ZERO;
        let both = h(&[("cache-control", "max-age=60, s-maxage=30")]);
        assert_eq!(freshness_lifetime(&both, t0(), zero), secs(30));
        let max_age = h(&[
            ("cache-control", "max-age=60"),
            ("expires", "Thu, 01 Jan 2026 01:00:00 GMT"),
        ]);
        assert_eq!(freshness_lifetime(&max_age, t0(), zero), secs(60));
        let expires = h(&[
            ("date", "Thu, 01 Jan 2026 00:00:10 GMT"),
            ("expires", "Thu, 01 Jan 2026 00:05:00 GMT"),
        ]);
        assert_eq!(freshness_lifetime(&expires, t0(), zero), secs(290));
        // Without Date, the time of receipt.
        let expires = h(&[("expires", "Thu, 01 Jan 2026 00:05:00 GMT")]);
        assert_eq!(freshness_lifetime(&expires, t0(), zero), secs(300));
        let invalid = h(&[("expires", "0")]);
        assert_eq!(freshness_lifetime(&invalid, t0(), secs(99)), zero);
        let past = h(&[
            ("date", "Thu, 01 Jan 2026 00:00:10 GMT"),
            ("expires", "Thu, 01 Jan 2026 00:00:00 GMT"),
        ]);
        assert_eq!(freshness_lifetime(&past, t0(), zero), zero);
        assert_eq!(freshness_lifetime(&h(&[]), t0(), secs(7)), secs(7));
        let no_cache = h(&[("cache-control", "no-cache, max-age=60")]);
        assert_eq!(freshness_lifetime(&no_cache, t0(), zero), zero);
    }

    #[test]
    fn current_age_follows_rfc_9111() {
        // Requested at t0, received 2 s later, Date says 1 s before receipt, Age: 5.
        let response = h(&[
            ("date", "Thu, 01 Jan 2026 00:00:01 GMT"),
            ("age", "5"),
            ("cache-control", "max-age=10"),
        ]);
        let timing = Timing::new(&response, t0(), t0() + secs(2), Duration::ZERO);
        assert_eq!(timing.lifetime, secs(10));
        // corrected_initial_age = max(apparent 1, 5 + delay 2) = 7
        assert_eq!(timing.current_age(t0() + secs(2)), secs(7));
        assert_eq!(timing.current_age(t0() + secs(4)), secs(9));
        assert!(timing.is_fresh(t0() + secs(4)));
        assert!(!timing.is_fresh(t0() + secs(5)));
        // A Date in the future and a clock going backwards never make ages negative.
        let ahead = h(&[("date", "Thu, 01 Jan 2026 00:10:00 GMT")]);
        let timing = Timing::new(&ahead, t0(), t0(), secs(3));
        assert_eq!(timing.current_age(t0() - secs(1)), Duration::ZERO);
        assert_eq!(
            timing.current_age(t0() + Duration::from_millis(2500)),
            Duration::from_millis(2500)
        );
        // Malformed Age and Date are absent.
        let bad = h(&[("date", "yesterday"), ("age", "-3")]);
        let timing = Timing::new(&bad, t0(), t0() + secs(1), secs(3));
        assert_eq!(timing.date, t0() + secs(1));
        assert_eq!(timing.current_age(t0() + secs(1)), secs(1));
    }

    #[test]
    fn what_a_shared_cache_may_store() {
        let ok = StatusCode::OK;
        let none = HeaderMap::new();
        let zero = Duration::ZERO;
        let fresh = h(&[("cache-control", "max-age=60")]);
        assert!(storable(ok, &none, &fresh, zero));
        assert!(
            storable(StatusCode::FOUND, &none, &fresh, zero),
            "explicit freshness"
        );
        assert!(!storable(
            StatusCode::FOUND,
            &none,
            &h(&[("etag", "\"a\"")]),
            zero
        ));
        assert!(
            storable(ok, &none, &h(&[("etag", "\"a\"")]), zero),
            "validator only"
        );
        assert!(!storable(ok, &none, &none, zero), "nothing to go on");
        assert!(storable(ok, &none, &none, secs(5)), "default ttl");
        assert!(!storable(
            ok,
            &none,
            &h(&[("cache-control", "no-store, max-age=60")]),
            zero
        ));
        assert!(!storable(
            ok,
            &none,
            &h(&[("cache-control", "private, max-age=60")]),
            zero
        ));
        assert!(!storable(ok, &h(&[("cache-control", "no-store")]), &fresh, zero));
        assert!(!storable(
            ok,
            &none,
            &h(&[("cache-control", "max-age=60"), ("vary", "*")]),
            zero
        ));
        assert!(!storable(
            ok,
            &none,
            &h(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
            zero
        ));
        assert!(!storable(StatusCode::PARTIAL_CONTENT, &none, &fresh, zero));
        let auth = h(&[("authorization", "Bearer x")]);
        assert!(!storable(ok, &auth, &fresh, zero));
        assert!(storable(ok, &auth, &h(&[("cache-control", "s-maxage=60")]), zero));
    }

    #[test]
    fn request_modes() {
        assert_eq!(request_mode(&h(&[])), RequestMode::Normal);
        assert_eq!(
            request_mode(&h(&[("cache-control", "no-cache")])),
            RequestMode::Revalidate
        );
        assert_eq!(
            request_mode(&h(&[("cache-control", "max-age=0")])),
            RequestMode::Revalidate
        );
        assert_eq!(
            request_mode(&h(&[("pragma", "no-cache")])),
            RequestMode::Revalidate
        );
        assert_eq!(
            request_mode(&h(&[("pragma", "no-cache"), ("cache-control", "max-age=5")])),
            RequestMode::Normal
        );
        assert_eq!(
            request_mode(&h(&[("cache-control", "no-store")])),
            RequestMode::Bypass
        );
        assert_eq!(request_mode(&h(&[("range", "bytes=0-1")])), RequestMode::Bypass);
        assert_eq!(
            request_mode(&h(&[("if-none-match", "\"a\"")])),
            RequestMode::Normal
        );
    }

    #[test]
    fn vary_selects_variants() {
        let response = h(&[("vary", "Accept-Encoding, x-tenant"), ("vary", "accept-encoding")]);
        let names = vary_names(&response).unwrap();
        assert_eq!(names, ["accept-encoding", "x-tenant"]);
        let req = h(&[("accept-encoding", "gzip "), ("accept-encoding", "br")]);
        let stored = vary_values(&req, &names);
        assert_eq!(stored[0].1.as_deref(), Some(&b"gzip, br"[..]));
        assert_eq!(stored[1].1, None);
        assert!(vary_matches(&h(&[("accept-encoding", "gzip, br")]), &stored));
        assert!(!vary_matches(&h(&[("accept-encoding", "gzip")]), &stored));
        assert!(!vary_matches(
            &h(&[("accept-encoding", "gzip, br"), ("x-tenant", "a")]),
            &stored
        ));
        assert!(vary_matches(&h(&[("other", "1")]), &[]));
        assert_eq!(vary_names(&h(&[("vary", "origin, *")])), None);
    }

    #[test]
    fn client_conditionals_against_a_stored_response() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
        ]);
        assert!(not_modified_for(&h(&[("if-none-match", "W/\"v1\"")]), &stored));
        assert!(not_modified_for(
            &h(&[("if-none-match", "\"v0\", \"v1\"")]),
            &stored
        ));
        assert!(not_modified_for(&h(&[("if-none-match", "*")]), &stored));
        assert!(!not_modified_for(&h(&[("if-none-match", "\"v2\"")]), &stored));
        // If-None-Match wins over If-Modified-Since.
        assert!(!not_modified_for(
            &h(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Thu, 01 Jan 2026 00:00:00 GMT")
            ]),
            &stored
        ));
        assert!(not_modified_for(
            &h(&[("if-modified-since", "Thu, 01 Jan 2026 00:00:00 GMT")]),
            &stored
        ));
        assert!(!not_modified_for(
            &h(&[("if-modified-since", "Wed, 31 Dec 2025 23:59:59 GMT")]),
            &stored
        ));
        assert!(!not_modified_for(
            &h(&[("if-modified-since", "garbage")]),
            &stored
        ));
        assert!(has_conditionals(&h(&[("if-modified-since", "garbage")])));
    }

    #[test]
    fn revalidation_headers() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("content-length", "10"),
            ("x-app", "old"),
        ]);
        let cond = conditional_headers(&stored);
        assert_eq!(cond[0], (IF_NONE_MATCH, HeaderValue::from_static("\"v1\"")));
        assert_eq!(cond[1].0, IF_MODIFIED_SINCE);
        let updated = updated_headers(
            &stored,
            &h(&[("x-app", "new"), ("content-length", "0"), ("date", "x")]),
        );
        assert_eq!(updated["x-app"], "new");
        assert_eq!(updated["content-length"], "10");
        assert_eq!(updated["date"], "x");
        assert_eq!(updated["etag"], "\"v1\"");
    }
}
