//! Failures a user can act on: an unreachable upstream (502), a service without endpoints (503),
//! a slow upstream (504), a request no route matches (404) — each with a body naming the cause,
//! an `x-cogmesh-error` header and a metric label; and invalid configuration refused at start.

use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{bin, free_addr, metric_value, run_with_timeout, start_workload, Proxy};

fn curl(url: &str) -> (u16, String, String) {
    let (code, out, err) = run_with_timeout(
        Command::new("curl").args(["-sS", "-D", "-", url]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "curl failed: {err}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn unreachable_upstream_is_502_naming_the_endpoint() {
    let dead = free_addr(); // nothing listens here
    let proxy = Proxy::quick(&[dead], &[]);
    let (status, head, body) = curl(&proxy.url("/"));
    assert_eq!(status, 502, "{head}{body}");
    assert!(head.contains("x-cogmesh-error: upstream_connect"), "{head}");
    assert!(
        body.contains(&dead.to_string()),
        "body should name the endpoint: {body}"
    );
    assert!(
        body.to_lowercase().contains("refused"),
        "body should name the cause: {body}"
    );
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"proxy_error_total{direction="outbound",service="upstream",error="upstream_connect"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn slow_upstream_is_504() {
    let upstream = start_workload("slow");
    let proxy = Proxy::quick(&[upstream.addr], &["--response-timeout-ms", "200"]);
    let (status, head, body) = curl(&proxy.url("/sleep?ms=3000"));
    assert_eq!(status, 504, "{head}{body}");
    assert!(head.contains("x-cogmesh-error: upstream_timeout"), "{head}");
    assert!(body.contains("200 ms"), "{body}");
    // A fast request on the same proxy still works.
    let (status, _, _) = curl(&proxy.url("/sleep?ms=1"));
    assert_eq!(status, 200);
}

#[test]
fn service_without_endpoints_is_503_and_unrouted_is_404() {
    let proxy = Proxy::with_config(
        r#"
admin: "{admin}"
listeners:
  - { name: outbound, address: "{listen}" }
services:
  - { name: empty }
routes:
  - { match: { path_prefix: /empty }, service: empty }
"#,
    );
    let (status, head, body) = curl(&proxy.url("/empty/x"));
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("x-cogmesh-error: no_endpoints"), "{head}");
    assert!(body.contains("\"empty\" has no endpoints"), "{body}");
    let (status, head, _) = curl(&proxy.url("/other"));
    assert_eq!(status, 404);
    assert!(head.contains("x-cogmesh-error: no_route"), "{head}");
}

fn start_with_config(yaml: &str) -> (Option<i32>, String) {
    let path = std::env::temp_dir().join(format!(
        "cogmesh-bad-{}-{}.yaml",
        std::process::id(),
        free_addr().port()
    ));
    std::fs::write(&path, yaml).unwrap();
    let (code, _, err) = run_with_timeout(
        Command::new(bin("cogmesh-proxy")).arg("--config").arg(&path),
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_file(&path);
    (code, err.replace(&path.display().to_string(), "proxy.yaml"))
}

#[test]
fn invalid_configuration_is_refused_with_file_field_and_reason() {
    let base = r#"
listeners:
  - { name: outbound, address: "127.0.0.1:1" }
services:
  - { name: web, endpoints: ["127.0.0.1:8080"] }
routes:
  - { match: { path_prefix: / }, service: web }
"#;
    let cases = [
        (
            base.replace("{ name: web,", "{ name: web, wieght: 3,"),
            "proxy.yaml: services[0].wieght: unknown field `wieght`",
        ),
        (
            base.replace("127.0.0.1:8080", "127.0.0.1:http"),
            "proxy.yaml: services[0].endpoints[0]: invalid socket address syntax",
        ),
        (
            base.replace("service: web }", "service: api }"),
            r#"proxy.yaml: routes[0].service: no service named "api" (known: "web")"#,
        ),
    ];
    for (yaml, expected) in cases {
        let (code, err) = start_with_config(&yaml);
        assert_eq!(code, Some(2), "expected exit 2; stderr: {err}");
        assert!(
            err.contains(expected),
            "stderr {err:?} should contain {expected:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, err) = start_with_config("listeners: [");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("proxy.yaml"), "{err}");
}

#[test]
fn metrics_pass_promtool() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    for path in ["/", "/status/503", "/status/404"] {
        let _ = curl(&proxy.url(path));
    }
    let (code, out, err) = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "curl -sS --fail http://{}/metrics | promtool check metrics",
            proxy.admin
        )),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "promtool check metrics failed:\n{out}\n{err}");
    let m = proxy.metrics();
    assert_eq!(
        metric_value(
            &m,
            r#"response_total{direction="outbound",service="upstream",status_code="503",classification="failure"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        m.contains(r#"tcp_open_connections{direction="outbound",listener="outbound"}"#),
        "{m}"
    );
}
