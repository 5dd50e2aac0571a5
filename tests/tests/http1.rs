//! HTTP/1.1 through the proxy: streamed 10 MiB bodies both ways (byte-exact, with hyper and with
//! curl), keep-alive, hop-by-hop headers and `x-forwarded-*`, and malformed requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{metric_value, run_with_timeout, start_workload, Proxy};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TEN_MIB: usize = 10 * 1024 * 1024;

/// The workload's `/bytes` pattern: byte i is i mod 251.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_streamed_both_ways_byte_exact() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();

    // Upload: a streamed (chunked, no content-length) 10 MiB body, echoed back.
    let data = Bytes::from(pattern(TEN_MIB));
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let req = http::Request::post(proxy.url("/echo"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.expect("echo through the proxy");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-served-by"], "w1");
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), TEN_MIB);
    assert!(echoed == data, "echoed body differs from the upload");

    // Download: 10 MiB from the upstream.
    let empty = StreamBody::new(futures_util::stream::iter(Vec::<
        Result<Frame<Bytes>, std::io::Error>,
    >::new()));
    let req = http::Request::get(proxy.url(&format!("/bytes?n={TEN_MIB}")))
        .body(empty)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == data, "downloaded body differs ({} bytes)", got.len());

    let m = proxy.metrics();
    assert_eq!(
        metric_value(&m, r#"request_total{direction="outbound",service="upstream"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"response_total{direction="outbound",service="upstream",status_code="200",classification="success"}"#
        ),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn curl_posts_and_gets_ten_mib() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let dir = std::env::temp_dir().join(format!("cogmesh-curl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.bin");
    let output = dir.join("out.bin");
    std::fs::write(&input, pattern(TEN_MIB)).unwrap();
    let (code, _, err) = run_with_timeout(
        Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "-H",
                "transfer-encoding: chunked",
                "--data-binary",
            ])
            .arg(format!("@{}", input.display()))
            .arg("-o")
            .arg(&output)
            .arg(proxy.url("/echo")),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "curl failed: {err}");
    assert!(
        std::fs::read(&output).unwrap() == pattern(TEN_MIB),
        "curl echo differs"
    );

    let (code, _, err) = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(&output)
            .arg(proxy.url(&format!("/bytes?n={TEN_MIB}"))),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "curl failed: {err}");
    assert!(
        std::fs::read(&output).unwrap() == pattern(TEN_MIB),
        "curl download differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hop_by_hop_headers_are_removed_and_forwarded_headers_set() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let (code, out, err) = run_with_timeout(
        Command::new("curl").args([
            "-sS",
            "--fail",
            "-H",
            "Connection: keep-alive, X-Hop",
            "-H",
            "X-Hop: secret",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "X-Forwarded-For: 192.0.2.7",
            "-H",
            "X-App: kept",
            &proxy.url("/headers"),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{err}");
    let seen: serde_json::Value = serde_json::from_str(&out).expect("JSON from /headers");
    let h = &seen["headers"];
    assert_eq!(h["x-app"], "kept", "{seen}");
    assert!(
        h.get("x-hop").is_none(),
        "a header named in Connection was forwarded: {seen}"
    );
    assert!(h.get("keep-alive").is_none(), "{seen}");
    assert_eq!(h["x-forwarded-for"], "192.0.2.7, 127.0.0.1", "{seen}");
    assert_eq!(h["x-forwarded-proto"], "http", "{seen}");
    assert_eq!(
        h["host"],
        proxy.listen.to_string(),
        "the client's Host is kept: {seen}"
    );
}

#[test]
fn keep_alive_reuses_the_client_connection() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..3 {
        write!(s, "GET / HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        // Read the head and the 1024-byte body.
        while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() > 1024) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[test]
fn malformed_request_gets_400_and_the_connection_is_closed() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"[..],
        &b"\x16\x03\x01garbage\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"[..],
    ] {
        let mut s = TcpStream::connect(proxy.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("the proxy closes the connection");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "for {garbage:?} got {text:?}");
    }
    assert!(proxy.proc.child.id() > 0);
    // The proxy is still serving.
    let (status, _) = cogmesh_e2e::http_get(proxy.listen, "/").unwrap();
    assert_eq!(status, 200);
}

/// Reads one HTTP/1.1 response off `r` (content-length or chunked): status, lower-cased head
/// text and body.
fn read_response(r: &mut impl std::io::BufRead) -> (u16, String, Vec<u8>) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "connection closed in a head: {head}"
        );
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let status: u16 = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::trim))
            .map(str::to_string)
    };
    let mut body = Vec::new();
    if let Some(n) = header("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    } else if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    (status, head, body)
}

/// Plain requests go through the relay (the fast lane) and the others through the full path,
/// on one keep-alive connection: four requests written at once — a GET answered with a length,
/// a POST with a length echoed back chunked, a chunked POST (the relay hands the connection
/// over here, with the bytes it had read) and a last GET with `Connection: close` — come back
/// complete and in order, and the connection closes after the last one. With the relay off
/// (`--no-http1-relay`) the same bytes give the same answers.
#[test]
fn relayed_and_handed_over_requests_share_one_connection() {
    let upstream = start_workload("w");
    for extra in [&[][..], &["--no-http1-relay"][..]] {
        let proxy = Proxy::quick(&[upstream.addr], extra);
        let mut s = TcpStream::connect(proxy.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let requests = concat!(
            "GET /bytes?n=5000 HTTP/1.1\r\nHost: web\r\n\r\n",
            "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n\r\nhello relay",
            "POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhyper\r\n0\r\n\r\n",
            "GET /sleep?ms=1 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        );
        s.write_all(requests.as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let (status, head, body) = read_response(&mut r);
        assert_eq!((status, body), (200, pattern(5000)), "{extra:?} {head}");
        assert!(head.contains("x-served-by: w"), "{head}");
        let (status, head, body) = read_response(&mut r);
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"hello relay"[..]),
            "{extra:?} {head}"
        );
        let (status, head, body) = read_response(&mut r);
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"hyper"[..]),
            "{extra:?} {head}"
        );
        let (status, head, body) = read_response(&mut r);
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"slept 1 ms"[..]),
            "{extra:?} {head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        let mut rest = Vec::new();
        assert_eq!(
            r.read_to_end(&mut rest).unwrap(),
            0,
            "nothing after the last response"
        );
        let m = proxy.metrics();
        assert_eq!(
            metric_value(&m, r#"request_total{direction="outbound",service="upstream"}"#),
            Some(4.0),
            "{m}"
        );
    }
}
