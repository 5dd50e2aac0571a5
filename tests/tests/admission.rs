//! Attention (priority) admission: with a concurrency limit of 4 held by slow requests, the
//! lowest priorities are shed first with 503 `shed` and `Retry-After`, critical requests still
//! get through, the route sets a default priority, and the counts per priority are exported.

use std::time::Duration;

use cogmesh_e2e::{curl_head, eventually, metric_value, start_workload, Proxy};

#[test]
fn lowest_priorities_are_shed_first_and_critical_gets_through() {
    let upstream = start_workload("slow");
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
admission: {{ max_concurrency: 4 }}
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
    let hold = |priority: &'static str, n: usize| -> Vec<std::thread::JoinHandle<(u16, String)>> {
        (0..n)
            .map(|_| {
                let url = proxy.url("/sleep?ms=3000");
                let header = format!("x-cogmesh-priority: {priority}");
                std::thread::spawn(move || curl_head(&["-H", &header], &url))
            })
            .collect()
    };
    let wait_in_flight = |n: f64| {
        eventually("slow requests in flight", Duration::from_secs(20), || {
            (metric_value(&proxy.metrics(), &in_flight) == Some(n)).then_some(())
        })
    };
    // Sheddable requests may fill half the limit (2 of 4).
    let mut slow = hold("sheddable", 2);
    wait_in_flight(2.0);
    // The route makes /bulk sheddable: shed now.
    let (status, head) = curl_head(&[], &proxy.url("/bulk/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("x-cogmesh-error: shed"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    // Normal requests may fill 80 % (3 of 4).
    slow.extend(hold("normal", 1));
    wait_in_flight(3.0);
    let (status, head) = curl_head(&[], &proxy.url("/sleep?ms=1"));
    assert_eq!(status, 503, "normal is shed at 3 of 4: {head}");
    let (status, head) = curl_head(&["-H", "x-cogmesh-priority: low"], &proxy.url("/sleep?ms=1"));
    assert_eq!(status, 503, "{head}");
    // The last slot is kept for critical requests.
    let (status, head) = curl_head(&["-H", "x-cogmesh-priority: critical"], &proxy.url("/sleep?ms=1"));
    assert_eq!(status, 200, "{head}");

    for s in slow {
        assert_eq!(s.join().unwrap().0, 200);
    }
    let m = proxy.metrics();
    let count = |priority: &str, result: &str| {
        metric_value(
            &m,
            &format!(r#"admission_total{{priority="{priority}",result="{result}"}}"#),
        )
    };
    assert_eq!(count("sheddable", "admitted"), Some(2.0), "{m}");
    assert_eq!(count("sheddable", "shed"), Some(1.0), "{m}");
    assert_eq!(count("normal", "admitted"), Some(1.0), "{m}");
    assert_eq!(count("normal", "shed"), Some(1.0), "{m}");
    assert_eq!(count("low", "shed"), Some(1.0), "{m}");
    assert_eq!(count("critical", "admitted"), Some(1.0), "{m}");
    assert_eq!(count("critical", "shed"), Some(0.0), "{m}");
}
