//! Circuit breaking: with `max_requests: 2` and a slow upstream, a third concurrent request
//! fails fast with 503 `overloaded` and `x-cogmesh-overloaded: true`, is counted, and the
//! service takes requests again once the slow ones finish. With `max_connections: 2`, a third
//! HTTP/1 connection to the service is not opened: the request that needed it gets the same 503.

use std::time::Duration;

use cogmesh_e2e::{curl_head, eventually, metric_value, start_workload, Proxy};

fn curl(url: &str) -> (u16, String) {
    curl_head(&[], url)
}

/// Starts two 3-second requests and waits until both are in flight at the upstream.
fn two_slow_requests(
    proxy: &Proxy,
    upstream: std::net::SocketAddr,
) -> Vec<std::thread::JoinHandle<(u16, String)>> {
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = proxy.url("/sleep?ms=3000");
            std::thread::spawn(move || curl(&url))
        })
        .collect();
    let in_flight = format!(r#"endpoint_in_flight{{service="web",endpoint="{upstream}"}}"#);
    eventually("two slow requests in flight", Duration::from_secs(20), || {
        (metric_value(&proxy.metrics(), &in_flight) == Some(2.0)).then_some(())
    });
    slow
}

#[test]
fn max_requests_overflow_is_503_overloaded_and_counted() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_service(&[upstream.addr], &["circuit_breaker: { max_requests: 2 }"]);
    let slow = two_slow_requests(&proxy, upstream.addr);

    let (status, head) = curl(&proxy.url("/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-cogmesh-overloaded: true"), "{head}");
    assert!(head.contains("x-cogmesh-error: overloaded"), "{head}");

    for s in slow {
        assert_eq!(s.join().unwrap().0, 200, "the admitted requests are served");
    }
    assert_eq!(
        curl(&proxy.url("/sleep?ms=1")).0,
        200,
        "room again after they finished"
    );
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"circuit_breaker_overflow_total{service="web",threshold="max_requests"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"proxy_error_total{direction="outbound",service="web",error="overloaded"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn max_connections_overflow_is_503_overloaded_and_the_endpoint_is_not_blamed() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_service(&[upstream.addr], &["circuit_breaker: { max_connections: 2 }"]);
    // Two slow requests hold the two connections the service may have.
    let slow = two_slow_requests(&proxy, upstream.addr);
    let (status, head) = curl(&proxy.url("/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-cogmesh-overloaded: true"), "{head}");
    for s in slow {
        assert_eq!(s.join().unwrap().0, 200);
    }
    // The two connections are back in the pool: the next requests reuse them.
    for _ in 0..5 {
        assert_eq!(curl(&proxy.url("/sleep?ms=1")).0, 200);
    }
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"circuit_breaker_overflow_total{service="web",threshold="max_connections"}"#
        ),
        Some(1.0),
        "{m}"
    );
    let ejected = format!(
        r#"endpoint_ejected{{service="web",endpoint="{}"}}"#,
        upstream.addr
    );
    assert_eq!(metric_value(&m, &ejected), Some(0.0), "{m}");
}
