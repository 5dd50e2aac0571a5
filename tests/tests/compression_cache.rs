//! Per-route compression and caching through the real proxy, with real curl (`--compressed`
//! decodes gzip, br and zstd with the system's libcurl) and an origin server written here with
//! hyper that counts the requests it gets and answers conditionals.
//!
//! The origin's `/data/<name>` answers a JSON body; query parameters set its headers:
//! `size` (bytes), `cc` (`Cache-Control`), `etag`, `vary`, `ct` (content type), `ce` (a
//! `Content-Encoding` it claims), `delay_ms`. Every response carries `x-origin-request: N`, the
//! origin's request counter, so a client can tell which upstream response it got.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{metric_value, run_with_timeout, Proxy};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

// === the origin ===

/// What the origin saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    if_none_match: Option<String>,
    content_encoding: Option<String>,
    body: Bytes,
    status: u16,
}

struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Origin {
    fn start() -> Origin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&seen);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(Arc::clone(&seen), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            addr,
            seen,
            runtime: Some(runtime),
        }
    }

    /// Requests the origin got for `path`.
    fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

/// `size` bytes of JSON-looking text, the same for the same size.
fn json_body(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut i = 0;
    out.push(b'[');
    while out.len() < size {
        out.extend_from_slice(
            format!("{{\"id\":{i},\"name\":\"item-{i}\",\"tags\":[\"a\",\"b\"]}},").as_bytes(),
        );
        i += 1;
    }
    out.truncate(size);
    out
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",").replace("%20", " ")))
        .collect()
}

async fn answer(
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let q = query(&req);
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
    };
    let if_none_match = header("if-none-match");
    let content_encoding = header("content-encoding");
    if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let etag = q.get("etag").map(|e| format!("\"{e}\""));
    let not_modified = etag.is_some() && if_none_match == etag;
    let number = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            path: path.clone(),
            if_none_match,
            content_encoding,
            body: body.clone(),
            status: if not_modified { 304 } else { 200 },
        });
        seen.len()
    };
    let mut builder = Response::builder().header("x-origin-request", number.to_string());
    for (param, name) in [
        ("cc", "cache-control"),
        ("vary", "vary"),
        ("ce", "content-encoding"),
    ] {
        if let Some(v) = q.get(param) {
            builder = builder.header(name, v.as_str());
        }
    }
    if let Some(e) = &etag {
        builder = builder.header("etag", e.as_str());
    }
    if not_modified {
        return Ok(builder.status(304).body(Full::new(Bytes::new())).unwrap());
    }
    let response_body = if path == "/echo" {
        body
    } else {
        let size = q.get("size").and_then(|v| v.parse().ok()).unwrap_or(4096);
        Bytes::from(json_body(size))
    };
    let ct = q.get("ct").map_or("application/json", String::as_str);
    Ok(builder
        .header("content-type", ct)
        .body(Full::new(response_body))
        .unwrap())
}

// === the proxy and curl ===

fn proxy(origin: &Origin, route: &str) -> Proxy {
    Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: origin }}
services:
  - {{ name: origin, endpoints: ["{}"] }}
routes:
{route}
"#,
        origin.addr
    ))
}

struct Fetched {
    status: u16,
    /// Lower-cased header names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes on the wire (before curl decoded them).
    downloaded: usize,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cogmesh-cc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// curl with `args` for `url`: status, headers, (decoded) body and bytes downloaded.
fn curl(dir: &Path, args: &[&str], url: &str) -> Fetched {
    let head = dir.join("head.txt");
    let out = dir.join("body.bin");
    let _ = std::fs::remove_file(&out);
    let (code, stdout, err) = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "-D"])
            .arg(&head)
            .arg("-o")
            .arg(&out)
            .args(["-w", "%{http_code} %{size_download}"])
            .args(args)
            .arg(url),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "curl {args:?} {url} failed: {err}");
    let mut words = stdout.split_whitespace();
    let status = words.next().and_then(|w| w.parse().ok()).unwrap();
    let downloaded = words.next().and_then(|w| w.parse().ok()).unwrap();
    let headers = std::fs::read_to_string(&head)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Fetched {
        status,
        headers,
        body: std::fs::read(&out).unwrap_or_default(),
        downloaded,
    }
}

// === compression ===

const COMPRESSING: &str = r#"
  - name: json
    service: origin
    compression: { min_size: 1024 }
"#;

#[test]
fn curl_compressed_gets_identical_bodies_for_each_encoding() {
    let origin = Origin::start();
    let proxy = proxy(&origin, COMPRESSING);
    let dir = scratch("encodings");
    let size = 100 * 1024;
    let url = proxy.url(&format!("/data/big?size={size}&etag=v7"));
    for encoding in ["gzip", "br", "zstd"] {
        // --compressed makes curl decode; the explicit header picks the one coding to test.
        let got = curl(
            &dir,
            &["--compressed", "-H", &format!("accept-encoding: {encoding}")],
            &url,
        );
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("content-encoding"),
            Some(encoding),
            "{:?}",
            got.headers
        );
        assert_eq!(got.header("vary"), Some("accept-encoding"));
        assert_eq!(
            got.header("etag"),
            Some("W/\"v7\""),
            "a compressed body has a weak ETag"
        );
        assert_eq!(got.header("content-length"), None);
        assert!(got.body == json_body(size), "{encoding}: decoded body differs");
        assert!(
            got.downloaded < size / 4,
            "{encoding}: {} bytes on the wire",
            got.downloaded
        );
    }
    // curl's own Accept-Encoding ("deflate, gzip, br, zstd") gets the route's first choice.
    let got = curl(&dir, &["--compressed"], &url);
    assert_eq!(got.header("content-encoding"), Some("zstd"));
    assert!(got.body == json_body(size));
    // q-values: br preferred by the client.
    let got = curl(
        &dir,
        &[
            "--compressed",
            "-H",
            "accept-encoding: gzip;q=0.5, br;q=0.9, zstd;q=0",
        ],
        &url,
    );
    assert_eq!(got.header("content-encoding"), Some("br"));

    let m = proxy.metrics();
    for (encoding, n) in [("gzip", 1.0), ("br", 2.0), ("zstd", 2.0)] {
        assert_eq!(
            metric_value(
                &m,
                &format!(r#"compressed_response_total{{route="json",encoding="{encoding}"}}"#)
            ),
            Some(n),
            "{m}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_is_not_compressed_and_head() {
    let origin = Origin::start();
    let proxy = proxy(&origin, COMPRESSING);
    let dir = scratch("skips");
    let gzip = ["--compressed", "-H", "accept-encoding: gzip"];

    // A client without Accept-Encoding: identity, but the response says it varies.
    let got = curl(&dir, &[], &proxy.url("/data/a?size=5000"));
    assert_eq!(got.header("content-encoding"), None);
    assert_eq!(got.header("vary"), Some("accept-encoding"));
    assert_eq!(got.header("content-length"), Some("5000"));
    assert!(got.body == json_body(5000));

    // Below min_size, a type not in the list, no-transform: untouched.
    for path in [
        "/data/a?size=1000",
        "/data/a?size=5000&ct=image/png",
        "/data/a?size=5000&cc=no-transform",
    ] {
        let got = curl(&dir, &gzip, &proxy.url(path));
        assert_eq!(got.header("content-encoding"), None, "{path}");
        assert!(got.header("content-length").is_some(), "{path}");
    }

    // Already encoded upstream: passed on as it is (curl cannot decode this fake "gzip", so
    // fetch it without --compressed and compare the raw bytes).
    let got = curl(
        &dir,
        &["-H", "accept-encoding: gzip"],
        &proxy.url("/data/a?size=5000&ce=gzip"),
    );
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(got.header("vary"), None);
    assert!(got.body == json_body(5000), "an encoded body is not touched");

    // HEAD says what GET would send, without a length or a body.
    let got = curl(
        &dir,
        &["-I", "-H", "accept-encoding: br"],
        &proxy.url("/data/a?size=5000"),
    );
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-encoding"), Some("br"));
    assert_eq!(got.header("content-length"), None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn request_bodies_are_decompressed_when_the_route_asks() {
    let origin = Origin::start();
    let proxy = proxy(
        &origin,
        r#"
  - match: { path_prefix: /echo }
    service: origin
    compression: { decompress_requests: true }
"#,
    );
    let dir = scratch("decompress");
    let plain = json_body(200_000);
    let input = dir.join("in.json");
    std::fs::write(&input, &plain).unwrap();
    for (tool, encoding) in [("gzip", "gzip"), ("zstd", "zstd")] {
        let (code, _, err) = run_with_timeout(
            Command::new(tool).args(["-k", "-f", "-q"]).arg(&input),
            Duration::from_secs(30),
        );
        assert_eq!(code, Some(0), "{tool}: {err}");
        let packed = dir.join(format!("in.json.{}", if tool == "gzip" { "gz" } else { "zst" }));
        let got = curl(
            &dir,
            &[
                "-H",
                &format!("content-encoding: {encoding}"),
                "-H",
                "content-type: application/octet-stream",
                "--data-binary",
                &format!("@{}", packed.display()),
            ],
            &proxy.url("/echo"),
        );
        assert_eq!(got.status, 200);
        let seen = origin.requests("/echo");
        let last = seen.last().unwrap();
        assert_eq!(last.content_encoding, None, "the origin got a decoded body");
        assert!(last.body == plain, "{encoding}: the origin got other bytes");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// === caching ===

const CACHING: &str = r#"
  - name: cached
    service: origin
    cache: { max_bytes: 10000000, max_entry_bytes: 1000000 }
"#;

fn lookups(proxy: &Proxy, result: &str) -> f64 {
    let m = proxy.metrics();
    metric_value(
        &m,
        &format!(r#"cache_lookup_total{{route="cached",result="{result}"}}"#),
    )
    .unwrap_or_else(|| panic!("no cache_lookup_total for {result}: {m}"))
}

#[test]
fn cached_until_expiry_then_revalidated_with_a_conditional_request() {
    let origin = Origin::start();
    let proxy = proxy(&origin, CACHING);
    let dir = scratch("revalidate");
    let url = proxy.url("/data/r?size=3000&cc=max-age=3&etag=v1");

    let first = curl(&dir, &[], &url);
    assert_eq!(first.status, 200);
    assert!(first.body == json_body(3000));
    assert_eq!(origin.requests("/data/r").len(), 1);

    // Fresh: served by the proxy, with Age, the origin sees nothing.
    for _ in 0..3 {
        let hit = curl(&dir, &[], &url);
        assert_eq!(hit.status, 200);
        assert!(hit.body == json_body(3000));
        assert_eq!(hit.header("x-origin-request"), Some("1"));
        assert!(
            hit.header("age").is_some_and(|a| a.parse::<u64>().is_ok()),
            "{:?}",
            hit.headers
        );
    }
    assert_eq!(origin.requests("/data/r").len(), 1);
    assert_eq!(lookups(&proxy, "hit"), 3.0);
    assert_eq!(lookups(&proxy, "miss"), 1.0);

    // Stale: the proxy asks the origin with If-None-Match, the origin answers 304, the client
    // still gets 200 with the whole body.
    std::thread::sleep(Duration::from_millis(3500));
    let revalidated = curl(&dir, &[], &url);
    assert_eq!(revalidated.status, 200);
    assert!(revalidated.body == json_body(3000));
    let seen = origin.requests("/data/r");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].if_none_match.as_deref(), Some("\"v1\""));
    assert_eq!(seen[1].status, 304);
    // The 304's headers refresh the entry.
    assert_eq!(revalidated.header("x-origin-request"), Some("2"));
    assert_eq!(lookups(&proxy, "revalidated"), 1.0);

    // Fresh again after the 304.
    let hit = curl(&dir, &[], &url);
    assert_eq!(hit.header("x-origin-request"), Some("2"));
    assert_eq!(origin.requests("/data/r").len(), 2);

    // A client's own conditional on a fresh entry is answered by the proxy.
    let not_modified = curl(&dir, &["-H", "if-none-match: \"v1\""], &url);
    assert_eq!(not_modified.status, 304);
    assert_eq!(origin.requests("/data/r").len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vary_no_store_and_private_are_honoured() {
    let origin = Origin::start();
    let proxy = proxy(&origin, CACHING);
    let dir = scratch("vary");

    // Vary: one stored variant per x-tenant value.
    let url = proxy.url("/data/v?size=100&cc=max-age=60&vary=x-tenant");
    let number = |tenant: &str| {
        let got = curl(&dir, &["-H", &format!("x-tenant: {tenant}")], &url);
        assert_eq!(got.status, 200);
        got.header("x-origin-request").unwrap().to_string()
    };
    let a = number("a");
    let b = number("b");
    assert_ne!(a, b, "a different x-tenant is a different variant");
    assert_eq!(number("a"), a);
    assert_eq!(number("b"), b);
    assert_eq!(origin.requests("/data/v").len(), 2);
    // No x-tenant at all is a third variant.
    let got = curl(&dir, &[], &url);
    assert_ne!(got.header("x-origin-request"), Some(a.as_str()));
    assert_eq!(origin.requests("/data/v").len(), 3);

    // no-store and private responses are never stored; Vary: * neither.
    for (path, query) in [
        ("/data/ns", "cc=no-store"),
        ("/data/p", "cc=private%2C%20max-age=60"),
        ("/data/star", "cc=max-age=60&vary=*"),
    ] {
        for _ in 0..3 {
            assert_eq!(
                curl(&dir, &[], &proxy.url(&format!("{path}?{query}"))).status,
                200
            );
        }
        assert_eq!(origin.requests(path).len(), 3, "{path}");
    }

    // A request's own no-store bypasses the cache; no-cache forces revalidation.
    let url = proxy.url("/data/q?size=100&cc=max-age=60&etag=q1");
    curl(&dir, &[], &url);
    curl(&dir, &["-H", "cache-control: no-store"], &url);
    assert_eq!(origin.requests("/data/q").len(), 2);
    let got = curl(&dir, &["-H", "cache-control: no-cache"], &url);
    assert_eq!(got.status, 200);
    let seen = origin.requests("/data/q");
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].if_none_match.as_deref(), Some("\"q1\""));
    assert!(got.body == json_body(100));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_cache_headers_are_harmless() {
    let origin = Origin::start();
    let proxy = proxy(&origin, CACHING);
    let dir = scratch("malformed");
    // Malformed freshness is absent: with no validator, nothing is stored.
    for query in [
        "cc=max-age=abc",
        "cc=max-age=-5",
        "cc=%2C%2C%2C",
        "cc=s-maxage",
        "cc=max-age=1.5",
    ] {
        let url = proxy.url(&format!("/data/m?size=10&{query}"));
        for _ in 0..2 {
            assert_eq!(curl(&dir, &[], &url).status, 200, "{query}");
        }
    }
    assert_eq!(origin.requests("/data/m").len(), 10);
    // Malformed request headers do not keep a fresh entry from being served.
    let url = proxy.url("/data/ok?size=10&cc=max-age=60");
    curl(&dir, &[], &url);
    let got = curl(
        &dir,
        &[
            "-H",
            "cache-control: max-age=zz, ,=",
            "-H",
            "if-modified-since: yesterday",
            "-H",
            "pragma: ???",
        ],
        &url,
    );
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-origin-request"), Some("11"));
    assert_eq!(origin.requests("/data/ok").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_send_one_upstream_request() {
    let origin = Origin::start();
    let proxy = proxy(&origin, CACHING);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url: hyper::Uri = proxy
        .url("/data/slow?size=20000&cc=max-age=60&delay_ms=500")
        .parse()
        .unwrap();
    let requests = (0..100).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let response = client.get(url).await.expect("request through the proxy");
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        })
    });
    let results = futures_util::future::join_all(requests).await;
    for result in results {
        let (status, body) = result.unwrap();
        assert_eq!(status, 200);
        assert!(body == json_body(20000));
    }
    assert_eq!(origin.requests("/data/slow").len(), 1);
    let coalesced = lookups(&proxy, "coalesced");
    let hit = lookups(&proxy, "hit");
    assert_eq!(lookups(&proxy, "miss"), 1.0);
    assert_eq!(coalesced + hit, 99.0);
    assert!(coalesced > 0.0, "no request waited for the first one");
}

#[test]
fn entries_are_evicted_to_stay_within_max_bytes() {
    let origin = Origin::start();
    let proxy = proxy(
        &origin,
        r#"
  - name: cached
    service: origin
    cache: { max_bytes: 5000, max_entry_bytes: 2000 }
"#,
    );
    let dir = scratch("evict");
    for i in 0..5 {
        curl(
            &dir,
            &[],
            &proxy.url(&format!("/data/e{i}?size=1500&cc=max-age=60")),
        );
    }
    // Too large to store: streamed through, fetched every time.
    for _ in 0..2 {
        let got = curl(&dir, &[], &proxy.url("/data/huge?size=3000&cc=max-age=60"));
        assert!(got.body == json_body(3000));
    }
    assert_eq!(origin.requests("/data/huge").len(), 2);
    let m = proxy.metrics();
    let stored = metric_value(&m, r#"cache_stored_bytes{route="cached"}"#).unwrap();
    assert!(stored <= 5000.0 && stored > 0.0, "{m}");
    assert_eq!(
        metric_value(&m, r#"cache_entries{route="cached"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, r#"cache_eviction_total{route="cached"}"#),
        Some(3.0),
        "{m}"
    );
    // The two most recent are hits, the first was evicted.
    curl(&dir, &[], &proxy.url("/data/e4?size=1500&cc=max-age=60"));
    curl(&dir, &[], &proxy.url("/data/e0?size=1500&cc=max-age=60"));
    assert_eq!(origin.requests("/data/e4").len(), 1);
    assert_eq!(origin.requests("/data/e0").len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_turns_policies_on_and_keeps_an_unchanged_cache() {
    let origin = Origin::start();
    let proxy = proxy(&origin, "  - { name: cached, service: origin }\n");
    let dir = scratch("reload");
    let url = proxy.url("/data/h?size=4096&cc=max-age=60");
    let config = std::env::temp_dir().join(format!(
        "cogmesh-proxy-{}-{}.yaml",
        std::process::id(),
        proxy.listen.port()
    ));
    let original = std::fs::read_to_string(&config).expect("the harness's config file");
    let reload = |route: &str, applied: f64| {
        let text = original.replace("  - { name: cached, service: origin }\n", route);
        std::fs::write(&config, text).unwrap();
        cogmesh_e2e::eventually("the reload", Duration::from_secs(10), || {
            let m = proxy.metrics();
            (metric_value(&m, r#"config_reload_total{result="applied"}"#) == Some(applied)).then_some(())
        });
    };

    curl(&dir, &[], &url);
    curl(&dir, &[], &url);
    assert_eq!(origin.requests("/data/h").len(), 2, "no cache yet");

    reload(CACHING, 1.0);
    curl(&dir, &[], &url);
    curl(&dir, &[], &url);
    assert_eq!(origin.requests("/data/h").len(), 3, "cached after the reload");

    // Compression added, cache settings unchanged: the stored entry survives and is compressed.
    reload(&format!("{CACHING}    compression: {{}}\n"), 2.0);
    let got = curl(&dir, &["--compressed", "-H", "accept-encoding: gzip"], &url);
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert!(got.header("age").is_some());
    assert!(got.body == json_body(4096));
    assert_eq!(
        origin.requests("/data/h").len(),
        3,
        "the cache survived the reload"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
