//! Trace context on the wire: W3C `traceparent` read and written, B3 read (the single `b3`
//! header and the `x-b3-*` set; 64-bit trace ids are widened to 128 bits as B3 specifies).
//! `tracestate` is left as the client sent it (we add no entry of our own).
//!
//! Parsing works on the header bytes and never allocates; writing a `traceparent` formats into a
//! fixed buffer.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The caller's span, as its trace headers name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's sampling decision; `None` when it left it to us (B3 without `sampled`).
    pub sampled: Option<bool>,
    pub format: Format,
}

/// Which headers carried the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    /// The single `b3` header.
    B3Single,
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`.
    B3Multi,
}

/// The trace headers of one request, found in a single pass over its names.
#[derive(Default)]
struct Found<'a> {
    traceparent: Option<&'a HeaderValue>,
    b3: Option<&'a HeaderValue>,
    trace_id: Option<&'a HeaderValue>,
    span_id: Option<&'a HeaderValue>,
    sampled: Option<&'a HeaderValue>,
    flags: Option<&'a HeaderValue>,
}

impl<'a> Found<'a> {
    /// One walk over the names instead of a hashed lookup per name this module reads: at low
    /// sampling most requests carry none of them, and a walk over a request's handful of
    /// headers costs less than hashing six names (measured with callgrind: about 250
    /// instructions per request saved). The first value of a repeated name counts, as with
    /// `HeaderMap::get`.
    fn scan(headers: &'a HeaderMap) -> Self {
        let mut found = Found::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "traceparent" => &mut found.traceparent,
                "b3" => &mut found.b3,
                "x-b3-traceid" => &mut found.trace_id,
                "x-b3-spanid" => &mut found.span_id,
                "x-b3-sampled" => &mut found.sampled,
                "x-b3-flags" => &mut found.flags,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        found
    }
}

/// The parent a request names: `traceparent` first, else B3. A malformed header counts as
/// absent (the request then starts a trace), as the W3C specification asks.
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    let found = Found::scan(headers);
    if let Some(v) = found.traceparent {
        return parse_traceparent(v.as_bytes());
    }
    if let Some(v) = found.b3 {
        return parse_b3_single(v.as_bytes());
    }
    let trace_id = found.trace_id?;
    let span_id = found.span_id?;
    let sampled = match (found.flags, found.sampled) {
        (Some(f), _) if f.as_bytes() == b"1" => Some(true),
        (_, Some(s)) => b3_sampled(s.as_bytes())?,
        _ => None,
    };
    Some(Parent {
        trace_id: b3_trace_id(trace_id.as_bytes())?,
        span_id: hex_array(span_id.as_bytes())?,
        sampled,
        format: Format::B3Multi,
    })
}

/// `version-traceid-spanid-flags`, version `00` (later versions: the first four fields are read
/// the same way, as the specification allows).
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version: [u8; 1] = hex_array(&v[0..2])?;
    if version[0] == 0xff || (version[0] == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id: [u8; 16] = hex_array(&v[3..35])?;
    let span_id: [u8; 8] = hex_array(&v[36..52])?;
    let flags: [u8; 1] = hex_array(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags[0] & 1 == 1),
        format: Format::W3c,
    })
}

/// `traceid-spanid[-sampled[-parentspanid]]`; a lone `0`/`1`/`d` (a decision without ids)
/// gives no parent.
fn parse_b3_single(v: &[u8]) -> Option<Parent> {
    let mut parts = v.split(|b| *b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_array(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => b3_sampled(s)?,
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
    })
}

/// `1`, `d` (debug) and `true` sample, `0` and `false` do not.
fn b3_sampled(v: &[u8]) -> Option<Option<bool>> {
    match v {
        b"1" | b"d" | b"true" => Some(Some(true)),
        b"0" | b"false" => Some(Some(false)),
        _ => None,
    }
}

/// 32 hex digits, or 16 widened with zeros on the left.
fn b3_trace_id(v: &[u8]) -> Option<[u8; 16]> {
    match v.len() {
        32 => hex_array(v),
        16 => {
            let low: [u8; 8] = hex_array(v)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn hex_array<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // Upper case is invalid in traceparent, common in B3.
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

/// `00-{trace_id}-{span_id}-{01|00}`.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    ids_value(
        *b"00-00000000000000000000000000000000-0000000000000000-00",
        3,
        trace_id,
        span_id,
        sampled,
    )
}

/// `{trace_id}-{span_id}-{1|0}`.
fn b3_single(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
    ids_value(
        *b"00000000000000000000000000000000-0000000000000000-0",
        0,
        trace_id,
        span_id,
        sampled,
    )
}

/// Fills `template`: the trace id from `at`, then a dash, the span id, a dash, and the sampled
/// flag as its last character.
fn ids_value<const N: usize>(
    mut v: [u8; N],
    at: usize,
    trace_id: &[u8; 16],
    span_id: &[u8; 8],
    sampled: bool,
) -> HeaderValue {
    write_hex(&mut v[at..at + 32], trace_id);
    write_hex(&mut v[at + 33..at + 49], span_id);
    if sampled {
        v[N - 1] = b'1';
    }
    HeaderValue::from_bytes(&v).expect("hex digits and dashes are a valid header value")
}

/// Names `span_id` as the parent of the next hop: always `traceparent`; a request that came
/// with B3 also gets its B3 rewritten (as the single header), so B3-only tracers further on
/// stay in the trace.
pub fn inject(headers: &mut HeaderMap, trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool, b3: bool) {
    headers.insert(TRACEPARENT, traceparent(trace_id, span_id, sampled));
    if b3 {
        for name in [
            X_B3_TRACE_ID,
            X_B3_SPAN_ID,
            X_B3_PARENT_SPAN_ID,
            X_B3_SAMPLED,
            X_B3_FLAGS,
        ] {
            headers.remove(name);
        }
        headers.insert(B3, b3_single(trace_id, span_id, sampled));
    }
}

/// Lower-case hex of an id, for logs.
pub fn hex<const N: usize>(id: &[u8; N]) -> String {
    let mut out = vec![0u8; 2 * N];
    write_hex(&mut out, id);
    String::from_utf8(out).expect("hex digits are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let p = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(p.sampled, Some(true));
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(traceparent(&p.trace_id, &p.span_id, true), TP);
        assert_eq!(
            traceparent(&p.trace_id, &p.span_id, false).to_str().unwrap(),
            &TP.replace("-01", "-00")
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
        // A later version may append fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what";
        assert_eq!(parse_traceparent(later.as_bytes()).unwrap().sampled, Some(false));
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            B3,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"),
        );
        let p = extract(&h).unwrap();
        assert_eq!(hex(&p.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hex(&p.span_id), "e457b5a2e4d86bd1");
        assert_eq!((p.sampled, p.format), (Some(true), Format::B3Single));
        h.insert(B3, HeaderValue::from_static("0"));
        assert_eq!(extract(&h), None);

        let mut h = HeaderMap::new();
        h.insert(X_B3_TRACE_ID, HeaderValue::from_static("64fe8b2a57d3eff7"));
        h.insert(X_B3_SPAN_ID, HeaderValue::from_static("E457B5A2E4D86BD1"));
        h.insert(X_B3_SAMPLED, HeaderValue::from_static("0"));
        let p = extract(&h).unwrap();
        assert_eq!(hex(&p.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert_eq!((p.sampled, p.format), (Some(false), Format::B3Multi));
        h.insert(X_B3_FLAGS, HeaderValue::from_static("1"));
        assert_eq!(extract(&h).unwrap().sampled, Some(true));
    }

    #[test]
    fn the_first_of_repeated_trace_headers_counts() {
        let mut h = HeaderMap::new();
        h.append(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        h.append(TRACEPARENT, HeaderValue::from_static(TP));
        h.append(
            TRACEPARENT,
            HeaderValue::from_static("00-11111111111111111111111111111111-2222222222222222-00"),
        );
        let p = extract(&h).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.sampled, Some(true));
    }

    #[test]
    fn traceparent_wins_and_injection_rewrites_b3() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(X_B3_TRACE_ID, HeaderValue::from_static("64fe8b2a57d3eff7"));
        h.insert(X_B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        assert_eq!(extract(&h).unwrap().format, Format::W3c);
        let p = extract(&h).unwrap();
        inject(&mut h, &p.trace_id, &[1, 2, 3, 4, 5, 6, 7, 8], true, true);
        assert_eq!(
            h[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        assert_eq!(h[B3], "4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-1");
        assert!(!h.contains_key(X_B3_TRACE_ID));
    }
}
