//! HTTP/2 at the protocol level, against python-hyper's `h2` as the client
//! (tests/python/h2_peer.py): settings, PING, flow control both ways, header blocks split over
//! CONTINUATION, limits and the errors a client's mistakes get, rapid reset. Each case runs on
//! both HTTP/2 servers of the proxy: cogmesh's own codec (`--own-http2-codec`) and the lane on
//! the `h2` crate, and both must answer the same way.

use cogmesh_e2e::{python_json, start_workload, Proxy};
use serde_json::{json, Value};

/// The two HTTP/2 servers: the own codec, and the lane on the `h2` crate.
const SERVERS: [&str; 2] = ["own_http2_codec: true", "own_http2_codec: false"];

/// A proxy with `server` in front of a workload spoken to over HTTP/1.1 (whose header limits
/// are larger than the proxy's, so that the proxy's are the ones tested).
fn proxy(server: &str, upstream: std::net::SocketAddr) -> Proxy {
    proxy_to(server, "http1", upstream)
}

fn proxy_to(server: &str, protocol: &str, upstream: std::net::SocketAddr) -> Proxy {
    Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
{server}
listeners:
  - {{ name: edge, address: "{{listen}}", default_service: web }}
services:
  - {{ name: web, protocol: {protocol}, endpoints: ["{upstream}"] }}
"#
    ))
}

fn peer(proxy: &Proxy, case: &str, n: usize) -> Value {
    let port = proxy.listen.port().to_string();
    python_json("h2_peer.py", &[case, &port, "--n", &n.to_string()])
}

#[test]
fn settings_ping_and_flow_control_both_ways() {
    let upstream = start_workload("h2-protocol");
    for server in SERVERS {
        let proxy = proxy(server, upstream.addr);
        let got = peer(&proxy, "basics", 0);
        // 100 streams (the default limit), the PING's payload back, a 100 kB download and a
        // 5 MiB upload echoed byte for byte: both directions past the 64 KiB stream window.
        let want = json!({
            "settings_acked": true,
            "max_concurrent_streams": 100,
            "ping": [hex("cogmesh!")],
            "get": [200, 100_000],
            "post": [200, true],
        });
        assert_eq!(got, want, "{server}");
    }
}

/// The same through the upstream side's HTTP/2 client (h2c to the workload): its windows,
/// both ways, and its WINDOW_UPDATEs.
#[test]
fn bodies_cross_the_upstream_h2_connection_under_flow_control() {
    let upstream = start_workload("h2-protocol");
    let proxy = proxy_to(SERVERS[0], "http2", upstream.addr);
    let got = peer(&proxy, "basics", 0);
    assert_eq!(got["get"], json!([200, 100_000]), "{got}");
    assert_eq!(got["post"], json!([200, true]), "{got}");
}

#[test]
fn header_blocks_limits_and_malformed_requests() {
    let upstream = start_workload("h2-protocol");
    for server in SERVERS {
        let proxy = proxy(server, upstream.addr);
        let got = peer(&proxy, "headers", 0);
        // 32 kB of headers (past one 16 KiB frame: CONTINUATION) reach the upstream; 96 kB get
        // 431 (the limit is 60 KiB).
        assert_eq!(got["fits"], 200, "{server}: {got}");
        assert_eq!(got["fits_echoed"], true, "{server}: {got}");
        assert_eq!(got["over"], 431, "{server}: {got}");
        // A name in upper case makes the request malformed: PROTOCOL_ERROR (1). The own codec
        // resets the stream and the connection goes on (RFC 9113 §8.1.1); the `h2` crate ends
        // the whole connection, which the RFC allows too.
        if server == SERVERS[0] {
            assert_eq!(got["upper"], json!([null, 1]), "{got}");
            assert_eq!(got["after"], 200, "{got}");
            assert_eq!(got["goaway"], Value::Null, "{got}");
        } else {
            assert_eq!(got["goaway"]["code"], 1, "{got}");
        }
    }
}

#[test]
fn a_request_without_authority_is_served_with_its_host_header() {
    let upstream = start_workload("h2-protocol");
    for server in SERVERS {
        let proxy = proxy(server, upstream.addr);
        let got = peer(&proxy, "no_authority", 0);
        // [status, reset code, the upstream's Host header, its :authority]: RFC 9113 §8.3.1
        // lets a client leave out :authority; the request is served and its `host` reaches the
        // HTTP/1.1 upstream. With :authority and no `host`, the authority becomes the Host; a
        // `host` of its own stays (§8.3.1 says to make one only when there is none).
        let want = json!({
            "bare": [200, null, "bare.example", null],
            "both": [200, null, "both.example", null],
            "clash": [200, null, "other.example", null],
        });
        assert_eq!(got, want, "{server}");
    }
}

/// The client's authority reaches an HTTP/2 upstream as `:authority`, as it reaches an
/// HTTP/1.1 one as `Host`: from an HTTP/2 client's `:authority` or `host`, and from an HTTP/1.1
/// client's `Host`. No `host` goes on beside it, so none can differ from it (RFC 9113 §8.3.1).
#[test]
fn the_clients_authority_reaches_an_http2_upstream() {
    let upstream = start_workload("h2-protocol");
    let proxy = proxy_to(SERVERS[0], "http2", upstream.addr);
    let got = peer(&proxy, "no_authority", 0);
    let want = json!({
        "bare": [200, null, null, "bare.example"],
        "both": [200, null, null, "both.example"],
        "clash": [200, null, null, "clash.example"],
    });
    assert_eq!(got, want);
    // cogmesh_e2e::http_get sends `Host: <the proxy's address>`.
    let (status, body) = cogmesh_e2e::http_get(proxy.listen, "/headers").unwrap();
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["authority"], proxy.listen.to_string(), "{seen}");
    assert_eq!(seen["headers"]["host"], Value::Null, "{seen}");
}

#[test]
fn streams_over_the_limit_are_refused() {
    let upstream = start_workload("h2-protocol");
    for server in SERVERS {
        let proxy = proxy(server, upstream.addr);
        // Sent before the client read the proxy's SETTINGS: 100 are served, the rest refused
        // with REFUSED_STREAM, which a client may retry.
        let got = peer(&proxy, "refused", 105);
        assert_eq!(got, json!({"ok": 100, "refused": 5}), "{server}");
    }
}

#[test]
fn a_burst_of_resets_gets_goaway_enhance_your_calm() {
    let upstream = start_workload("h2-protocol");
    for server in SERVERS {
        let proxy = proxy(server, upstream.addr);
        // 50 streams opened and reset at once: past 20 (http2_max_pending_accept_reset_streams)
        // the connection ends with ENHANCE_YOUR_CALM (11).
        let got = peer(&proxy, "rapid_reset", 50);
        assert_eq!(got["goaway"]["code"], 11, "{server}: {got}");
        // The proxy still serves others.
        let again = peer(&proxy, "basics", 0);
        assert_eq!(again["get"], json!([200, 100_000]), "{server}");
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}
