//! Circuit breaking: with `max_requests: 2` and a slow upstream, a third concurrent request
//! fails fast with 503 `overloaded` and `x-cogmesh-overloaded: true`, is counted, and the
//! service takes requests again once the slow ones finish.

use std::time::Duration;

use cogmesh_e2e::{curl_head, eventually, metric_value, start_workload, Proxy};

fn curl(url: &str) -> (u16, String) {
    curl_head(&[], url)
}

#[test]
fn max_requests_overflow_is_503_overloaded_and_counted() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_service(&[upstream.addr], &["circuit_breaker: { max_requests: 2 }"]);
    let slow_url = proxy.url("/sleep?ms=3000");
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = slow_url.clone();
            std::thread::spawn(move || curl(&url))
        })
        .collect();
    let in_flight = format!(
        r#"endpoint_in_flight{{service="web",endpoint="{}"}}"#,
        upstream.addr
    );
    eventually("two slow requests in flight", Duration::from_secs(20), || {
        (metric_value(&proxy.metrics(), &in_flight) == Some(2.0)).then_some(())
    });

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
