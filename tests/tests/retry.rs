//! Retries: killing one of three upstreams under load loses no idempotent request (connect
//! failures and resets are retried on another endpoint), and while every upstream fails the
//! retries stay within the budget.

use std::time::Duration;

use cogmesh_e2e::{curl_head, http_get, metric_value, start_workload, Proxy};

#[test]
fn killing_one_of_three_upstreams_under_load_loses_no_idempotent_request() {
    let mut upstreams: Vec<_> = (0..3).map(|i| start_workload(&format!("w{i}"))).collect();
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let proxy = Proxy::with_service(&addrs, &["balancer: round_robin", "retry: { max_attempts: 3 }"]);
    let listen = proxy.listen;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..150)
                    .map(|_| http_get(listen, "/sleep?ms=5").map(|r| r.0).unwrap_or(0))
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let victim = upstreams.remove(1);
    let mut proc = victim.proc;
    let _ = proc.child.kill();
    let _ = proc.child.wait();
    let statuses: Vec<u16> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    let m = proxy.metrics();
    let sent = metric_value(
        &m,
        r#"retry_total{direction="outbound",service="web",result="sent"}"#,
    );
    assert!(
        sent.unwrap_or(0.0) >= 1.0,
        "the kill should have needed a retry: {m}"
    );
}

#[test]
fn retries_stay_within_the_budget_while_every_upstream_fails() {
    let upstreams: Vec<_> = (0..2).map(|i| start_workload(&format!("w{i}"))).collect();
    let proxy = Proxy::with_service(
        &[upstreams[0].addr, upstreams[1].addr],
        &[
            "retry: { max_attempts: 3, budget_ratio: 0.2, min_retries_per_sec: 0, backoff_base_ms: 1, backoff_max_ms: 2 }",
            "outlier_detection: { consecutive_failures: 0 }",
        ],
    );
    for _ in 0..100 {
        assert_eq!(http_get(proxy.listen, "/status/503").unwrap().0, 503);
    }
    let m = proxy.metrics();
    let retry = |result: &str| {
        metric_value(
            &m,
            &format!(r#"retry_total{{direction="outbound",service="web",result="{result}"}}"#),
        )
        .unwrap_or(0.0)
    };
    // Each of the 100 requests wanted two retries; the budget allows 20 % of the requests.
    assert!(retry("sent") >= 1.0 && retry("sent") <= 20.0, "{m}");
    assert!(retry("budget_exhausted") >= 80.0, "{m}");
    let picks: f64 = upstreams
        .iter()
        .map(|u| {
            metric_value(
                &m,
                &format!(r#"endpoint_picks_total{{service="web",endpoint="{}"}}"#, u.addr),
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(picks, 100.0 + retry("sent"), "{m}");
}

#[test]
fn the_request_timeout_bounds_all_attempts_with_504() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_service(&[upstream.addr], &["request_timeout_ms: 300"]);
    let (status, head) = curl_head(&[], &proxy.url("/sleep?ms=5000"));
    assert_eq!(status, 504, "{head}");
    assert!(head.contains("x-cogmesh-error: upstream_timeout"), "{head}");
    // Fast requests are not affected.
    assert_eq!(curl_head(&[], &proxy.url("/sleep?ms=1")).0, 200);
}
