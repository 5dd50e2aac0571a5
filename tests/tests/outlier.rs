//! Outlier ejection: an upstream that starts answering 500 is ejected after the configured
//! number of consecutive failures, the other endpoint takes every request meanwhile, and once it
//! recovers it is probed and readmitted after the ejection time; in the success-rate mode an
//! upstream failing half its requests among four healthy ones is ejected at the interval's end.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cogmesh_e2e::{curl_head, eventually, free_addr, http_get, metric_value, start_workload, Proxy};

/// A real HTTP/1.1 server on loopback that answers 500 while `failing` (every
/// `fail_one_in`-th request), else 200, and counts the requests it got.
struct Flaky {
    addr: SocketAddr,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

fn start_flaky() -> Flaky {
    start_flaky_one_in(1)
}

fn start_flaky_one_in(fail_one_in: u64) -> Flaky {
    // A port free a moment ago can be taken meanwhile: try a few.
    let listener = (0..5)
        .find_map(|_| TcpListener::bind(free_addr()).ok())
        .expect("a loopback port");
    let addr = listener.local_addr().expect("local addr");
    let failing = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicU64::new(0));
    let (f, h) = (Arc::clone(&failing), Arc::clone(&hits));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (f, h) = (Arc::clone(&f), Arc::clone(&h));
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    // Read one request head (the proxy sends GETs without bodies).
                    let mut line = String::new();
                    let mut lines = 0;
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => lines += 1,
                        }
                    }
                    if lines == 0 {
                        return;
                    }
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    let status = if f.load(Ordering::SeqCst) && n % fail_one_in == 0 {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    let reply =
                        format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\nx-served-by: flaky\r\n\r\nflaky");
                    if writer.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Flaky { addr, failing, hits }
}

#[test]
fn a_flapping_upstream_is_ejected_and_readmitted() {
    let good = start_workload("good");
    let flaky = start_flaky();
    let proxy = Proxy::with_service(
        &[good.addr, flaky.addr],
        &[
            "balancer: round_robin",
            "outlier_detection: { consecutive_failures: 3, base_ejection_time_ms: 1000, ejection_jitter_ms: 0, max_ejection_percent: 50 }",
        ],
    );
    let url = proxy.url("/status/200");
    let ejected = format!(r#"endpoint_ejected{{service="web",endpoint="{}"}}"#, flaky.addr);

    // Round robin: the flaky endpoint gets every other request until its third 500.
    let mut failures = 0;
    while flaky.hits.load(Ordering::SeqCst) < 3 {
        if curl_head(&[], &url).0 == 500 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3);
    assert_eq!(metric_value(&proxy.metrics(), &ejected), Some(1.0));
    // Ejected: every request goes to the good endpoint (the ejection lasts 1 s; a request that
    // finds it over would be the probe and still fail, so stop at the first 500).
    let before = flaky.hits.load(Ordering::SeqCst);
    let mut served_by_good = 0;
    for _ in 0..6 {
        let (status, head) = curl_head(&[], &url);
        if status == 500 {
            break;
        }
        assert!(head.contains("x-served-by: good"), "{head}");
        served_by_good += 1;
    }
    assert!(served_by_good >= 1);

    // It recovers; after the ejection time a probe readmits it.
    flaky.failing.store(false, Ordering::SeqCst);
    eventually("the ejection to end", Duration::from_secs(30), || {
        (metric_value(&proxy.metrics(), &ejected) == Some(0.0)).then_some(())
    });
    let after_recovery = flaky.hits.load(Ordering::SeqCst);
    let mut statuses = Vec::new();
    eventually(
        "the flaky endpoint to serve again",
        Duration::from_secs(30),
        || {
            statuses.push(curl_head(&[], &url).0);
            (flaky.hits.load(Ordering::SeqCst) >= after_recovery + 2).then_some(())
        },
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(flaky.hits.load(Ordering::SeqCst) > before);
}

#[test]
fn an_endpoint_failing_half_its_requests_is_ejected_by_success_rate() {
    let healthy: Vec<_> = (0..4).map(|i| start_workload(&format!("w{i}"))).collect();
    let flaky = start_flaky_one_in(2);
    let mut endpoints: Vec<SocketAddr> = healthy.iter().map(|w| w.addr).collect();
    endpoints.push(flaky.addr);
    let proxy = Proxy::with_service(
        &endpoints,
        &[
            "balancer: round_robin",
            // Consecutive failures never reach 3 here (it alternates): only the success rate
            // can eject it.
            "outlier_detection: { consecutive_failures: 3, ejection_jitter_ms: 0, max_ejection_percent: 20, success_rate: { interval_ms: 500, minimum_hosts: 5, request_volume: 10 } }",
        ],
    );
    let ejected = format!(r#"endpoint_ejected{{service="web",endpoint="{}"}}"#, flaky.addr);
    // Round robin for at most 3000 requests, until the ejection shows.
    let mut sent = 0;
    while metric_value(&proxy.metrics(), &ejected) != Some(1.0) {
        assert!(sent < 3000, "not ejected after {sent} requests");
        for _ in 0..25 {
            http_get(proxy.listen, "/status/200").expect("request");
        }
        sent += 25;
    }
    // Ejected: the next requests all succeed.
    for _ in 0..20 {
        assert_eq!(http_get(proxy.listen, "/status/200").unwrap().0, 200);
    }
}
