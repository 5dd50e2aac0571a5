//! Hardening defaults, tested with raw bytes on a TCP socket: oversize and too many headers get
//! 431, request smuggling attempts get 400 and a closed connection without reaching the
//! upstream, and a slowloris client is cut off after the header-read timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use cogmesh_e2e::{metric_value, run_with_timeout, start_workload, Proxy};

/// Sends `raw` and reads until the proxy closes the connection or a response with
/// `Connection: close` semantics is complete; returns the status and everything read.
fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The proxy may answer (and close) before it has read everything: ignore write errors.
    let _ = s.write_all(raw);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

fn proxy(upstream: SocketAddr, header_read_timeout_ms: u64) -> Proxy {
    Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
header_read_timeout_ms: {header_read_timeout_ms}
listeners:
  - {{ name: edge, address: "{{listen}}", default_service: web }}
services:
  - {{ name: web, endpoints: ["{upstream}"] }}
"#
    ))
}

fn request_with_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut raw = String::from("GET /sleep?ms=1 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    raw.into_bytes()
}

#[test]
fn oversize_headers_get_431_and_large_ones_within_the_limit_pass() {
    let upstream = start_workload("w");
    let proxy = proxy(upstream.addr, 10_000);
    let big = |n: usize| vec![("x-big".to_string(), "a".repeat(n))];
    let (status, text) = exchange(proxy.listen, &request_with_headers(&big(62 * 1024)));
    assert_eq!(status, 431, "{text}");
    let (status, text) = exchange(proxy.listen, &request_with_headers(&big(30 * 1024)));
    assert_eq!(status, 200, "{text}");
}

#[test]
fn too_many_headers_get_431_over_http1_and_http2() {
    let upstream = start_workload("w");
    let proxy = proxy(upstream.addr, 10_000);
    let many =
        |n: usize| -> Vec<(String, String)> { (0..n).map(|i| (format!("x-h{i}"), "v".into())).collect() };
    // Host and Connection are two of the 100.
    let (status, text) = exchange(proxy.listen, &request_with_headers(&many(101)));
    assert_eq!(status, 431, "{text}");
    let (status, text) = exchange(proxy.listen, &request_with_headers(&many(90)));
    assert_eq!(status, 200, "{text}");

    // HTTP/2 (h2c prior knowledge): hyper has no count limit there; the proxy checks it.
    let mut args = vec![
        "-sS".to_string(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{http_version}".into(),
        "--http2-prior-knowledge".into(),
    ];
    for i in 0..120 {
        args.push("-H".into());
        args.push(format!("x-h{i}: v"));
    }
    args.push(proxy.url("/sleep?ms=1"));
    let (code, out, err) = run_with_timeout(Command::new("curl").args(&args), Duration::from_secs(30));
    assert_eq!(code, Some(0), "curl failed: {err}");
    assert_eq!(out.trim(), "431 2", "{err}");
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"proxy_error_total{direction="outbound",service="web",error="header_too_large"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn smuggling_attempts_get_400_and_never_reach_the_upstream() {
    let upstream = start_workload("w");
    let proxy = proxy(upstream.addr, 10_000);
    let attempts: [&[u8]; 4] = [
        // CL.TE and TE.CL: both framings in one head.
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Two lengths that disagree, as two lines and as one list.
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 8\r\n\r\nabcdefgh",
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 3, 8\r\n\r\nabcdefgh",
    ];
    for raw in attempts {
        let (status, text) = exchange(proxy.listen, raw);
        assert_eq!(status, 400, "{}\n→ {text}", String::from_utf8_lossy(raw));
        // One response, then the connection was closed (read_to_end returned).
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    }
    // A smuggled request hidden in a pipelined body is not served either.
    let (status, text) = exchange(
        proxy.listen,
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /sleep?ms=1 HTTP/1.1\r\nHost: web\r\n\r\n",
    );
    assert_eq!(status, 400, "{text}");
    assert!(!text.contains("200 OK"), "{text}");

    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"request_refused_total{direction="outbound",listener="edge"}"#
        ),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, r#"request_total{direction="outbound",service="web"}"#),
        Some(0.0),
        "a smuggling attempt reached the request path: {m}"
    );
    // The same framings, well formed, go through.
    let (status, text) = exchange(
        proxy.listen,
        b"POST /echo HTTP/1.1\r\nHost: web\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("abc") || text.contains("\r\n\r\nabc") || text.contains("3\r\nabc"),
        "{text}"
    );
}

/// Writes `prefix`, then one byte every 200 ms, until the proxy closes the connection; returns
/// how long that took.
fn slowloris(addr: SocketAddr, prefix: &[u8]) -> Duration {
    let mut s = TcpStream::connect(addr).expect("connect to the proxy");
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let _ = s.write_all(prefix);
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the slow client was not cut off"
        );
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => panic!("unexpected response: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return start.elapsed(), // reset: also cut off
        }
        if s.write_all(b"a").is_err() {
            return start.elapsed();
        }
    }
}

#[test]
fn slowloris_clients_are_cut_off_after_the_header_read_timeout() {
    let upstream = start_workload("w");
    let proxy = proxy(upstream.addr, 1_000);
    let timeout = Duration::from_millis(1_000);
    // Trickling a header line, a byte at a time.
    let took = slowloris(proxy.listen, b"GET /sleep?ms=1 HTTP/1.1\r\nHost: web\r\nX-Slow: ");
    assert!(took >= timeout, "cut off before the timeout: {took:?}");
    // Trickling the request line (still in protocol detection).
    let took = slowloris(proxy.listen, b"G");
    assert!(took >= timeout, "cut off before the timeout: {took:?}");
    // Connecting and sending nothing at all.
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(start.elapsed() >= timeout && start.elapsed() < Duration::from_secs(30));
    // A prompt client on the same proxy is served.
    let (status, text) = exchange(proxy.listen, &request_with_headers(&[]));
    assert_eq!(status, 200, "{text}");
}
