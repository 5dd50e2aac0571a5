//! Retries: killing one of three upstreams under load loses no idempotent request (connect
//! failures and resets are retried on another endpoint), while every upstream fails the retries
//! stay within the budget, and request bodies are replayed from the replay buffer up to its
//! limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cogmesh_e2e::{curl_head, free_addr, http_get, metric_value, start_workload, Proxy};

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

/// An upstream that reads each request whole (head and `content-length` body) and answers 503:
/// what a retry must recover from after the body was consumed. Counts the body bytes it read.
fn consuming_503_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = (0..5)
        .find_map(|_| TcpListener::bind(free_addr()).ok())
        .expect("a loopback port for the upstream");
    let addr = listener.local_addr().expect("local addr");
    let read = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&read);
    // The thread ends with the test process; it only ever talks to the proxy.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    counter.fetch_add(length, Ordering::SeqCst);
                    let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, read)
}

/// POSTs `body` to `path` with curl; the status and what came back.
fn post(proxy: &Proxy, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let file = std::env::temp_dir().join(format!(
        "cogmesh-retry-body-{}-{}",
        std::process::id(),
        body.len()
    ));
    std::fs::write(&file, body).expect("write body");
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(proxy.url(path))
        .output()
        .expect("curl runs");
    let _ = std::fs::remove_file(&file);
    let mut out = out.stdout;
    let split = out.iter().rposition(|b| *b == b'\n').expect("status line");
    let status = std::str::from_utf8(&out[split + 1..])
        .unwrap()
        .parse()
        .unwrap_or(0);
    out.truncate(split);
    (status, out)
}

#[test]
fn a_request_body_is_replayed_from_the_buffer_and_a_longer_one_or_another_route_is_not_retried() {
    let (failing, consumed) = consuming_503_upstream();
    let good = start_workload("echo");
    // POSTs may be retried on /echo only: its route allows it.
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
listeners:
  - {{ name: edge, address: "{{listen}}", default_service: web }}
services:
  - name: web
    endpoints: ["{failing}", "{}"]
    balancer: round_robin
    retry: {{ max_attempts: 2, replay_buffer_bytes: 65536, backoff_base_ms: 1, backoff_max_ms: 2 }}
    outlier_detection: {{ consecutive_failures: 0 }}
routes:
  - {{ match: {{ path_prefix: /echo }}, service: web, retry_non_idempotent: true }}
"#,
        good.addr
    ));
    // A 20 KiB POST: whichever endpoint gets it first, it ends at the good one, whole.
    let small: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..6 {
        let (status, echoed) = post(&proxy, "/echo", &small);
        assert_eq!(status, 200);
        assert!(
            echoed == small,
            "the echoed body differs ({} bytes)",
            echoed.len()
        );
    }
    assert!(
        consumed.load(Ordering::SeqCst) >= small.len(),
        "the failing upstream never read a body, so no replay happened"
    );
    let m = proxy.metrics();
    let retry = |result: &str| {
        metric_value(
            &m,
            &format!(r#"retry_total{{direction="outbound",service="web",result="{result}"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert!(retry("sent") >= 3.0, "{m}");
    // A 100 KiB POST is longer than the buffer: sent once; at the failing endpoint it fails.
    let large = vec![b'x'; 100_000];
    let statuses: Vec<u16> = (0..4).map(|_| post(&proxy, "/echo", &large).0).collect();
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    let m = proxy.metrics();
    let too_large = metric_value(
        &m,
        r#"retry_total{direction="outbound",service="web",result="body_too_large"}"#,
    );
    assert_eq!(too_large, Some(2.0), "{m}");
    // Elsewhere a POST is not retried: the one that meets the failing endpoint fails.
    let statuses: Vec<u16> = (0..4).map(|_| post(&proxy, "/status/200", b"x").0).collect();
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
}

/// A gRPC server (HTTP/2, hyper) that answers every call with a trailers-only UNAVAILABLE, as a
/// server that is shutting down does.
async fn unavailable_grpc_server() -> SocketAddr {
    use hyper::service::service_fn;
    // A port free a moment ago can be taken meanwhile: try a few.
    let mut listener = None;
    for _ in 0..5 {
        if let Ok(l) = tokio::net::TcpListener::bind(free_addr()).await {
            listener = Some(l);
            break;
        }
    }
    let listener = listener.expect("a loopback port for the gRPC server");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let service = service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .header("grpc-message", "draining")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("a valid response");
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), service),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_answered_unavailable_is_retried_on_another_endpoint() {
    use cogmesh_proto::v1::workload_client::WorkloadClient;
    use cogmesh_proto::v1::InferRequest;
    let failing = unavailable_grpc_server().await;
    let good = start_workload("grpc");
    let proxy = Proxy::with_service(
        &[failing, good.addr],
        &[
            "balancer: round_robin",
            "retry: { max_attempts: 2, retry_grpc_codes: [unavailable], backoff_base_ms: 1, backoff_max_ms: 2 }",
            "outlier_detection: { consecutive_failures: 0 }",
        ],
    );
    let channel = tonic::transport::Channel::from_shared(proxy.url(""))
        .unwrap()
        .connect()
        .await
        .expect("tonic connects to the proxy");
    let mut client = WorkloadClient::new(channel);
    for i in 0..6 {
        let request = InferRequest {
            prompt: format!("p{i}"),
            ..Default::default()
        };
        let reply = client
            .infer(request)
            .await
            .expect("every call succeeds")
            .into_inner();
        assert_eq!(reply.text, format!("echo: p{i}"));
    }
    let m = proxy.metrics();
    let sent = metric_value(
        &m,
        r#"retry_total{direction="outbound",service="web",result="sent"}"#,
    );
    assert!(sent.unwrap_or(0.0) >= 3.0, "{m}");
}
