//! Process lifecycle: readiness and liveness on the admin server, `/config`, and graceful
//! shutdown — SIGTERM while requests are in flight lets them complete, then the proxy exits 0.

use std::time::Duration;

use cogmesh_e2e::{eventually, http_get, start_workload, Proxy};

#[test]
fn admin_endpoints() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    assert_eq!(http_get(proxy.admin, "/live").unwrap().0, 200);
    assert_eq!(http_get(proxy.admin, "/ready").unwrap().0, 200);
    let (status, body) = http_get(proxy.admin, "/config").unwrap();
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).expect("JSON config");
    assert_eq!(
        config["config"]["listeners"][0]["address"],
        proxy.listen.to_string()
    );
    assert_eq!(
        config["routing_table"]["services"][0]["endpoints"][0]["address"],
        upstream.addr.to_string(),
        "{config}"
    );
    assert_eq!(http_get(proxy.admin, "/nope").unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_in_flight_requests_then_exits_0() {
    let upstream = start_workload("w1");
    let mut proxy = Proxy::quick(&[upstream.addr], &["--workers", "2"]);
    let mut calls = Vec::new();
    for _ in 0..6 {
        let addr = proxy.listen;
        calls.push(tokio::task::spawn_blocking(move || {
            http_get(addr, "/sleep?ms=1500")
        }));
    }
    // Wait until the proxy reports all six in flight (polling, no fixed sleep).
    eventually("six requests in flight", Duration::from_secs(20), || {
        (proxy.endpoint_in_flight() == 6).then_some(())
    });
    proxy.proc.signal("TERM");
    for c in calls {
        let (status, body) = c.await.unwrap().expect("in-flight request completes");
        assert_eq!(status, 200);
        assert_eq!(body, "slept 1500 ms");
    }
    proxy.assert_drains_and_exits_0();
}

#[test]
fn with_a_shutdown_delay_new_requests_are_served_after_sigterm_while_not_ready() {
    let upstream = start_workload("w1");
    let mut proxy = Proxy::quick(&[upstream.addr], &["--shutdown-delay-ms", "5000"]);
    assert_eq!(http_get(proxy.admin, "/ready").unwrap().0, 200);
    proxy.proc.signal("TERM");
    // Readiness fails at once, so Kubernetes takes the pod out of its Services...
    eventually("/ready to fail", Duration::from_secs(5), || {
        (http_get(proxy.admin, "/ready").map(|r| r.0).ok() == Some(503)).then_some(())
    });
    // ...while clients that still send to it (a new connection each) are served.
    for _ in 0..3 {
        let (status, body) = http_get(proxy.listen, "/sleep?ms=1").expect("served during the delay");
        assert_eq!((status, body.as_str()), (200, "slept 1 ms"));
    }
    assert!(proxy.proc.is_running());
    let status = proxy
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("proxy exits after the delay and the drain");
    assert_eq!(status.code(), Some(0));
}
