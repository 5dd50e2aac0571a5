//! Per-instance rate limiting: a listener's bucket, a route's bucket per client key, the 429
//! with `Retry-After` and `RateLimit-*`, gRPC's RESOURCE_EXHAUSTED, and the counters.

use std::time::Instant;

use cogmesh_e2e::{metric_value, start_workload, Proxy};

use cogmesh_e2e::curl_head as curl;

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[test]
fn listener_limit_answers_429_with_rate_limit_headers() {
    let upstream = start_workload("w");
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
listeners:
  - name: edge
    address: "{{listen}}"
    default_service: web
    rate_limit: {{ requests_per_second: 1, burst: 3 }}
services:
  - {{ name: web, endpoints: ["{}"] }}
"#,
        upstream.addr
    ));
    let start = Instant::now();
    let results: Vec<(u16, String)> = (0..6).map(|_| curl(&[], &proxy.url("/sleep?ms=1"))).collect();
    let elapsed = start.elapsed();
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses[..3],
        [200, 200, 200],
        "the burst is admitted: {statuses:?}"
    );
    // One more token per second after the burst.
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(
        admitted <= 3 + elapsed.as_secs() + 1,
        "{statuses:?} in {elapsed:?}"
    );
    let (_, head) = results
        .iter()
        .find(|r| r.0 == 429)
        .expect("a request over the limit");
    assert_eq!(header(head, "retry-after"), Some("1"), "{head}");
    assert_eq!(header(head, "ratelimit-limit"), Some("3"), "{head}");
    assert_eq!(header(head, "ratelimit-remaining"), Some("0"), "{head}");
    let reset: u64 = header(head, "ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=3).contains(&reset), "{head}");
    assert_eq!(header(head, "x-cogmesh-error"), Some("rate_limited"), "{head}");

    let refused = statuses.iter().filter(|s| **s == 429).count() as f64;
    let m = proxy.metrics();
    assert_eq!(
        metric_value(&m, r#"rate_limited_total{scope="listener",name="edge"}"#),
        Some(refused),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            r#"proxy_error_total{direction="outbound",service="web",error="rate_limited"}"#
        ),
        Some(refused),
        "{m}"
    );
}

#[test]
fn route_limit_keyed_by_header_keeps_clients_apart_and_grpc_gets_resource_exhausted() {
    let upstream = start_workload("w");
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
listeners:
  - {{ name: edge, address: "{{listen}}", direction: inbound, default_service: web }}
services:
  - {{ name: web, endpoints: ["{}"] }}
routes:
  - name: sleepy
    match: {{ path_prefix: /sleep }}
    service: web
    rate_limit: {{ requests_per_second: 1, burst: 1, key: {{ header: x-api-key }} }}
"#,
        upstream.addr
    ));
    let url = proxy.url("/sleep?ms=1");
    let (a1, _) = curl(&["-H", "x-api-key: a"], &url);
    let (a2, head) = curl(&["-H", "x-api-key: a"], &url);
    let (b1, _) = curl(&["-H", "x-api-key: b"], &url);
    assert_eq!(a1, 200);
    // The second request of client a may only pass if a whole second went by.
    if a2 != 200 {
        assert_eq!(a2, 429, "{head}");
    }
    assert_eq!(b1, 200, "client b has its own bucket");
    // Other routes are not limited.
    for _ in 0..3 {
        assert_eq!(curl(&["-H", "x-api-key: a"], &proxy.url("/echo")).0, 200);
    }

    // gRPC (h2c): trailers-only HTTP 200 with grpc-status 8 once over the limit.
    let grpc = [
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/grpc",
        "-H",
        "x-api-key: g",
        "-X",
        "POST",
    ];
    let refused = (0..4)
        .map(|_| curl(&grpc, &url))
        .find(|(_, head)| header(head, "grpc-status") == Some("8"))
        .expect("a gRPC request over the limit");
    assert_eq!(refused.0, 200, "{}", refused.1);
    assert_eq!(header(&refused.1, "content-type"), Some("application/grpc"));
    assert!(
        header(&refused.1, "grpc-message").unwrap().contains("rate limit"),
        "{}",
        refused.1
    );
    assert_eq!(header(&refused.1, "retry-after"), Some("1"));

    let m = proxy.metrics();
    let n = metric_value(&m, r#"rate_limited_total{scope="route",name="sleepy"}"#).unwrap_or(0.0);
    assert!(n >= 1.0, "{m}");
}
