//! Attention (priority) admission: at the instance's concurrency limit, low and sheddable
//! requests are shed at once with 503 `shed` and `Retry-After`, while queued requests get freed
//! slots in priority order (a critical request that arrived later goes before a normal one), and
//! the counts per priority are exported. An adaptive limit grows while latency stays at its
//! baseline and shrinks when an overloaded upstream's latency rises.

use std::time::{Duration, Instant};

use cogmesh_e2e::{
    curl_head, eventually, http_get, metric_value, start_workload, start_workload_with, Proxy,
};

#[test]
fn slots_go_to_critical_first_and_the_lowest_are_shed() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
admission: {{ max_concurrency: 2, max_queue_wait_ms: 20000 }}
listeners:
  - {{ name: edge, address: "{{listen}}", default_service: web }}
services:
  - {{ name: web, endpoints: ["{}"] }}
routes:
  - {{ match: {{ path_prefix: /bulk }}, service: web, priority: sheddable }}
"#,
        upstream.addr
    ));
    let in_flight = format!(
        r#"endpoint_in_flight{{service="web",endpoint="{}"}}"#,
        upstream.addr
    );
    let spawn = |priority: &'static str, path: &str| {
        let url = proxy.url(path);
        std::thread::spawn(move || {
            let header = format!("x-cogmesh-priority: {priority}");
            let (status, head) = curl_head(&["-H", &header], &url);
            (status, head, Instant::now())
        })
    };
    // Two slow requests take both slots; one frees after 1.5 s, the other after 4 s.
    let short = spawn("normal", "/sleep?ms=1500");
    let long = spawn("normal", "/sleep?ms=4000");
    eventually("both slots taken", Duration::from_secs(20), || {
        (metric_value(&proxy.metrics(), &in_flight) == Some(2.0)).then_some(())
    });
    // A normal request queues first, a critical one after it.
    let normal = spawn("normal", "/sleep?ms=500");
    std::thread::sleep(Duration::from_millis(200));
    let critical = spawn("critical", "/sleep?ms=500");
    std::thread::sleep(Duration::from_millis(200));

    // At the limit, low priority and the sheddable route are refused at once.
    let (status, head) = curl_head(&["-H", "x-cogmesh-priority: low"], &proxy.url("/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-cogmesh-error: shed"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let (status, head) = curl_head(&[], &proxy.url("/bulk/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");

    let (critical, normal) = (critical.join().unwrap(), normal.join().unwrap());
    assert_eq!(critical.0, 200, "{}", critical.1);
    assert_eq!(normal.0, 200, "{}", normal.1);
    // Only one slot freed at 1.5 s: the critical request got it although it queued later.
    assert!(
        critical.2 < normal.2,
        "the critical request finished after the normal one"
    );
    assert_eq!(short.join().unwrap().0, 200);
    assert_eq!(long.join().unwrap().0, 200);

    let m = proxy.metrics();
    let count = |priority: &str, result: &str| {
        metric_value(
            &m,
            &format!(r#"admission_total{{priority="{priority}",result="{result}"}}"#),
        )
    };
    assert_eq!(count("normal", "admitted"), Some(3.0), "{m}");
    assert_eq!(count("critical", "admitted"), Some(1.0), "{m}");
    assert_eq!(count("low", "shed"), Some(1.0), "{m}");
    assert_eq!(count("sheddable", "shed"), Some(1.0), "{m}");
    assert_eq!(count("normal", "shed"), Some(0.0), "{m}");
}

#[test]
fn an_adaptive_limit_grows_at_baseline_latency_and_shrinks_under_overload() {
    // Four slots of 20 ms: beyond four concurrent requests, latency grows with the queue.
    let upstream = start_workload_with("cap4", &["--capacity", "4", "--service-time-ms", "20"]);
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
admission: {{ max_concurrency: 100, max_queue_wait_ms: 2000, adaptive: {{ min_limit: 4, max_limit: 400, window_ms: 300 }} }}
listeners:
  - {{ name: edge, address: "{{listen}}", default_service: web }}
services:
  - {{ name: web, endpoints: ["{}"] }}
"#,
        upstream.addr
    ));
    let limit = || metric_value(&proxy.metrics(), "admission_limit").expect("admission_limit");
    assert_eq!(limit(), 100.0);
    // Two clients (the upstream has four slots): latency stays at its baseline and the limit
    // grows. Batches until it shows, at most 2000 requests.
    for _ in 0..100 {
        let light: Vec<_> = (0..2)
            .map(|_| {
                let listen = proxy.listen;
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        assert_eq!(http_get(listen, "/work").unwrap().0, 200);
                    }
                })
            })
            .collect();
        for c in light {
            c.join().unwrap();
        }
        if limit() > 100.0 {
            break;
        }
    }
    let grown = limit();
    assert!(grown > 100.0, "limit {grown} after light load");
    // 32 clients against 4 slots: latency several times the baseline; the limit shrinks.
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let listen = proxy.listen;
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let _ = http_get(listen, "/work");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let shrunk = limit();
    assert!(
        shrunk < grown / 2.0,
        "limit {shrunk} after overload (was {grown})"
    );
}
