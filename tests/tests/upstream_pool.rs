//! The HTTP/1.1 upstream pool, seen from a real upstream (hyper) that counts its connections:
//! requests from many client connections share a few keep-alive connections, each worker
//! opening its own and borrowing another worker's only at `max_connections`, idle ones are
//! closed after the idle timeout, and a pooled connection the upstream closed is replaced
//! without failing the request.

use std::net::SocketAddr;
use std::time::Duration;

use cogmesh_e2e::{counting_upstream, http_get, metric_value, ConnectionEnd, Proxy};

/// A GET on a new client connection (`Connection: close`, which the proxy does not forward).
async fn get(addr: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, "/").expect("request through the proxy"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_each_worker_opens_its_own() {
    let server = counting_upstream(false, Duration::ZERO, ConnectionEnd::Never).await;
    let proxy = Proxy::quick(&[server.addr], &["--workers", "2"]);
    for _ in 0..40 {
        assert_eq!(get(proxy.listen).await, (200, "ok".to_string()));
    }
    // 40 client connections, spread over two workers by SO_REUSEPORT (all on one worker has
    // odds of 2^-39), one request at a time: one upstream connection per worker. A worker does
    // not run its requests over the other's connection (two cross-thread wake-ups each) when it
    // may open its own.
    let n = server.accepted();
    assert_eq!(n, 2, "{n} upstream connections for 40 sequential requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_max_connections_borrows_the_other_workers_idle_connection() {
    let server = counting_upstream(false, Duration::ZERO, ConnectionEnd::Never).await;
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
    assert_eq!(server.accepted(), 1, "one connection for both workers");
    let m = proxy.metrics();
    let overflow = r#"circuit_breaker_overflow_total{service="up",threshold="max_connections"}"#;
    assert_eq!(metric_value(&m, overflow), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_the_idle_timeout() {
    let server = counting_upstream(false, Duration::ZERO, ConnectionEnd::Never).await;
    let proxy = server.proxy_with_idle_timeout(300);
    for _ in 0..5 {
        assert_eq!(get(proxy.listen).await.0, 200);
    }
    assert_eq!(server.accepted(), 1);
    server.wait_until_all_closed();
    // The next request opens a new connection and succeeds.
    assert_eq!(get(proxy.listen).await.0, 200);
    assert_eq!(server.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_replaced() {
    let server = counting_upstream(
        false,
        Duration::ZERO,
        ConnectionEnd::Dropped(Duration::from_millis(150)),
    )
    .await;
    let proxy = Proxy::quick(&[server.addr], &[]);
    for round in 1..=4 {
        assert_eq!(get(proxy.listen).await, (200, "ok".to_string()), "round {round}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(server.accepted(), 4);
}
