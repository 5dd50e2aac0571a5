//! The HTTP/1.1 upstream pool, seen from a real upstream (hyper) that counts its connections:
//! requests from many client connections share a few keep-alive connections, each worker
//! opening its own and borrowing another worker's only at `max_connections`, idle ones are
//! closed after the idle timeout, and a pooled connection the upstream closed is replaced
//! without failing the request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{eventually, http_get, metric_value, Proxy};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

struct CountingServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

/// An HTTP/1.1 keep-alive server answering `ok`; with `lifetime`, it drops every connection
/// that long after accepting it (as an upstream with a short keep-alive timeout does).
async fn counting_server(lifetime: Option<Duration>) -> CountingServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"ok",
                    ))))
                });
                let conn =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                match lifetime {
                    Some(l) => {
                        let _ = tokio::time::timeout(l, conn).await;
                    }
                    None => {
                        let _ = conn.await;
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    CountingServer { addr, accepted, open }
}

/// A GET on a new client connection (`Connection: close`, which the proxy does not forward).
async fn get(addr: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, "/").expect("request through the proxy"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_each_worker_opens_its_own() {
    let server = counting_server(None).await;
    let proxy = Proxy::quick(&[server.addr], &["--workers", "2"]);
    for _ in 0..40 {
        assert_eq!(get(proxy.listen).await, (200, "ok".to_string()));
    }
    // 40 client connections, spread over two workers by SO_REUSEPORT (all on one worker has
    // odds of 2^-39), one request at a time: one upstream connection per worker. A worker does
    // not run its requests over the other's connection (two cross-thread wake-ups each) when it
    // may open its own.
    let n = server.accepted.load(Ordering::SeqCst);
    assert_eq!(n, 2, "{n} upstream connections for 40 sequential requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_max_connections_borrows_the_other_workers_idle_connection() {
    let server = counting_server(None).await;
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
workers: 2
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: up }}
services:
  - {{ name: up, endpoints: ["{}"], circuit_breaker: {{ max_connections: 1 }} }}
"#,
        server.addr
    ));
    for i in 0..40 {
        assert_eq!(get(proxy.listen).await, (200, "ok".to_string()), "request {i}");
    }
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one connection for both workers"
    );
    let m = proxy.metrics();
    let overflow = r#"circuit_breaker_overflow_total{service="up",threshold="max_connections"}"#;
    assert_eq!(metric_value(&m, overflow), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_the_idle_timeout() {
    let server = counting_server(None).await;
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
pool_idle_timeout_ms: 300
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: up }}
services:
  - {{ name: up, endpoints: ["{}"] }}
"#,
        server.addr
    ));
    for _ in 0..5 {
        assert_eq!(get(proxy.listen).await.0, 200);
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let open = server.open.clone();
    eventually(
        "the idle upstream connection is closed",
        Duration::from_secs(10),
        || (open.load(Ordering::SeqCst) == 0).then_some(()),
    );
    // The next request opens a new connection and succeeds.
    assert_eq!(get(proxy.listen).await.0, 200);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_replaced() {
    let server = counting_server(Some(Duration::from_millis(150))).await;
    let proxy = Proxy::quick(&[server.addr], &[]);
    for round in 1..=4 {
        assert_eq!(get(proxy.listen).await, (200, "ok".to_string()), "round {round}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 4);
}
