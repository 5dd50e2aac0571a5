//! OpenTelemetry tracing end to end: real sidecars export their spans over OTLP (one over HTTP,
//! one over gRPC) to a real receiver built on the official `opentelemetry-proto` Python package
//! (tests/python/otlp_receiver.py), and the spans of one request form one correctly parented
//! trace under the client's `traceparent`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cogmesh_e2e::{eventually, free_addr, python, repo_root, start_workload, wait_tcp, Proc, Proxy};
use serde_json::Value;

/// The Python OTLP receiver and the file it writes spans to.
struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    out: PathBuf,
    _proc: Proc,
}

impl Receiver {
    fn start() -> Receiver {
        let (grpc, http) = (free_addr(), free_addr());
        let out = std::env::temp_dir().join(format!(
            "cogmesh-spans-{}-{}.jsonl",
            std::process::id(),
            grpc.port()
        ));
        let _ = std::fs::remove_file(&out);
        let mut proc = Proc::spawn(
            "otlp_receiver.py",
            Command::new(python())
                .arg(repo_root().join("tests/python/otlp_receiver.py"))
                .args(["--grpc-port", &grpc.port().to_string()])
                .args(["--http-port", &http.port().to_string()])
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::null()),
        );
        wait_tcp(grpc, &mut proc);
        wait_tcp(http, &mut proc);
        Receiver {
            grpc,
            http,
            out,
            _proc: proc,
        }
    }

    /// Every span received so far of `trace_id`.
    fn spans(&self, trace_id: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|s| s["trace_id"] == trace_id)
            .collect()
    }

    /// Waits until `n` spans of `trace_id` arrived.
    fn wait_for(&self, trace_id: &str, n: usize) -> Vec<Value> {
        eventually(
            &format!("{n} spans of trace {trace_id}"),
            Duration::from_secs(20),
            || {
                let spans = self.spans(trace_id);
                (spans.len() >= n).then_some(spans)
            },
        )
    }
}

/// GET `path` through `addr` with extra header lines; the status and body.
fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn find<'a>(spans: &'a [Value], service: &str, kind: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["service"] == service && s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} span of {service} in {spans:#?}"))
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn a_request_through_two_sidecars_is_one_trace_under_the_clients_span() {
    let receiver = Receiver::start();
    let app = start_workload("traced");
    // The inbound sidecar exports over OTLP/gRPC, the outbound one over OTLP/HTTP.
    let inbound = Proxy::quick(
        &[app.addr],
        &[
            "--direction",
            "inbound",
            "--upstream-service",
            "app",
            "--otlp-endpoint",
            &format!("http://{}", receiver.grpc),
        ],
    );
    let outbound = Proxy::quick(
        &[inbound.listen],
        &[
            "--upstream-service",
            "app",
            "--otlp-endpoint",
            &format!("http://{}", receiver.http),
            "--otlp-protocol",
            "http",
        ],
    );

    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let (status, body) = get_with(
        outbound.listen,
        "/headers",
        &[("traceparent", &traceparent), ("tracestate", "vendor=opaque")],
    );
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let app_parent = seen["headers"]["traceparent"].as_str().unwrap().to_owned();
    assert_eq!(seen["headers"]["tracestate"], "vendor=opaque");

    let spans = receiver.wait_for(TRACE_ID, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    // Both sidecars call themselves cogmesh-proxy (no control plane): tell them apart by how
    // they exported.
    let by = |via: &str, kind: &str| -> Value {
        spans
            .iter()
            .find(|s| s["via"] == via && s["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} span over {via} in {spans:#?}"))
    };
    let (a_server, a_client) = (by("http", "SERVER"), by("http", "CLIENT"));
    let (b_server, b_client) = (by("grpc", "SERVER"), by("grpc", "CLIENT"));
    assert_eq!(a_server["parent_span_id"], CLIENT_SPAN);
    assert_eq!(a_client["parent_span_id"], a_server["span_id"]);
    assert_eq!(b_server["parent_span_id"], a_client["span_id"]);
    assert_eq!(b_client["parent_span_id"], b_server["span_id"]);
    // The app got the inbound sidecar's CLIENT span as its parent.
    assert_eq!(
        app_parent,
        format!("00-{TRACE_ID}-{}-01", b_client["span_id"].as_str().unwrap())
    );
    // What each span says about the request.
    assert_eq!(a_server["attributes"]["http.response.status_code"], 200);
    assert_eq!(a_server["attributes"]["cogmesh.service"], "app");
    assert_eq!(a_server["attributes"]["cogmesh.direction"], "outbound");
    assert_eq!(a_server["attributes"]["url.path"], "/headers");
    assert_eq!(a_server["attributes"]["cogmesh.retries"], 0);
    assert_eq!(a_client["attributes"]["cogmesh.attempt"], 1);
    assert_eq!(a_client["attributes"]["server.port"], inbound.listen.port());
    assert_eq!(b_server["attributes"]["cogmesh.direction"], "inbound");
    assert_eq!(b_client["attributes"]["server.port"], app.addr.port());
    for s in &spans {
        assert!(s["end_ns"].as_u64() >= s["start_ns"].as_u64(), "{s}");
        assert_eq!(s["status"], "UNSET", "{s}");
    }
    // A client's span encloses its server's.
    assert!(a_client["start_ns"].as_u64() <= b_server["start_ns"].as_u64());

    // The export is counted.
    let metrics = outbound.metrics();
    assert!(
        metrics.contains("trace_span_total{result=\"exported\"} 2"),
        "{metrics}"
    );
}

#[test]
fn b3_parents_are_read_and_unsampled_callers_are_not_recorded() {
    let receiver = Receiver::start();
    let app = start_workload("traced-b3");
    let proxy = Proxy::quick(
        &[app.addr],
        &[
            "--otlp-endpoint",
            &format!("http://{}", receiver.grpc),
            "--trace-sampling-ratio",
            "0",
        ],
    );
    // B3 multi headers with a sampled decision: followed even at ratio 0 (parent-based).
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let (status, body) = get_with(
        proxy.listen,
        "/headers",
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ],
    );
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_str(&body).unwrap();
    let spans = receiver.wait_for(b3_trace, 2);
    let server = find(&spans, "cogmesh-proxy", "SERVER");
    let client = find(&spans, "cogmesh-proxy", "CLIENT");
    assert_eq!(server["parent_span_id"], "e457b5a2e4d86bd1");
    // Upstream gets W3C and the B3 it came with, both naming the CLIENT span.
    let client_id = client["span_id"].as_str().unwrap();
    assert_eq!(
        seen["headers"]["traceparent"],
        format!("00-{b3_trace}-{client_id}-01")
    );
    assert_eq!(seen["headers"]["b3"], format!("{b3_trace}-{client_id}-1"));
    assert!(seen["headers"].get("x-b3-spanid").is_none());

    // An unsampled caller: its traceparent passes on untouched and nothing is recorded; a
    // request without one starts a trace that ratio 0 does not record, and says so upstream.
    let unsampled = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    let (_, body) = get_with(proxy.listen, "/headers", &[("traceparent", &unsampled)]);
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["traceparent"], unsampled.as_str());
    let (_, body) = get_with(proxy.listen, "/headers", &[]);
    let seen: Value = serde_json::from_str(&body).unwrap();
    let fresh = seen["headers"]["traceparent"].as_str().unwrap();
    assert!(fresh.starts_with("00-") && fresh.ends_with("-00"), "{fresh}");
    // The sampled request's spans were exported; after one more batch period nothing else came.
    std::thread::sleep(Duration::from_millis(1500));
    let all = std::fs::read_to_string(&receiver.out).unwrap_or_default();
    assert_eq!(all.lines().count(), 2, "{all}");
}

/// An Envoy bootstrap: one HTTP listener routing everything to `upstream`, with Envoy's
/// OpenTelemetry tracer exporting over OTLP/gRPC to `otlp` (every request sampled).
fn envoy_config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr, otlp: SocketAddr) -> String {
    let addr = |a: SocketAddr| {
        format!(
            "{{ socket_address: {{ address: {}, port_value: {} }} }}",
            a.ip(),
            a.port()
        )
    };
    let cluster = |name: &str, a: SocketAddr, h2: bool| {
        let h2 = if h2 {
            "    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"
        } else {
            ""
        };
        format!(
            "  - name: {name}
    type: STATIC
    connect_timeout: 2s
{h2}    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {} }} }}] }}]
",
            addr(a)
        )
    };
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: hop
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hop
          tracing:
            random_sampling: {{ value: 100 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                service_name: envoy
                grpc_service:
                  envoy_grpc: {{ cluster_name: otlp }}
                  timeout: 2s
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: app }} }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{}{}",
        cluster("app", upstream, false),
        cluster("otlp", otlp, true),
        admin = addr(admin),
        listen = addr(listen),
    )
}

#[test]
fn the_trace_continues_through_an_envoy_hop_with_its_opentelemetry_tracer() {
    let envoy_bin = repo_root().join(".venv/bin/envoy");
    assert!(
        envoy_bin.exists(),
        "{} is missing: run scripts/test.sh",
        envoy_bin.display()
    );
    let receiver = Receiver::start();
    let app = start_workload("behind-envoy");
    let inbound = Proxy::quick(
        &[app.addr],
        &[
            "--direction",
            "inbound",
            "--upstream-service",
            "app",
            "--otlp-endpoint",
            &format!("http://{}", receiver.grpc),
        ],
    );
    let (listen, admin) = (free_addr(), free_addr());
    let config = std::env::temp_dir().join(format!(
        "cogmesh-envoy-{}-{}.yaml",
        std::process::id(),
        listen.port()
    ));
    std::fs::write(
        &config,
        envoy_config(listen, admin, inbound.listen, receiver.grpc),
    )
    .unwrap();
    let mut envoy = Proc::spawn(
        "envoy",
        Command::new(&envoy_bin)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .arg("--base-id")
            .arg(listen.port().to_string())
            .stdout(Stdio::null()),
    );
    wait_tcp(listen, &mut envoy);
    let outbound = Proxy::quick(
        &[listen],
        &[
            "--upstream-service",
            "envoy-hop",
            "--otlp-endpoint",
            &format!("http://{}", receiver.http),
            "--otlp-protocol",
            "http",
        ],
    );
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let (status, body) = eventually("a 200 through Envoy", Duration::from_secs(20), || {
        let (status, body) = get_with(outbound.listen, "/headers", &[("traceparent", &traceparent)]);
        (status == 200).then_some((status, body))
    });
    assert_eq!(status, 200, "{body}");

    // Envoy flushes its spans every 5 s.
    let spans = eventually("the spans of every hop", Duration::from_secs(30), || {
        let spans = receiver.spans(trace_id);
        let envoy_spans = spans.iter().filter(|s| s["service"] == "envoy").count();
        (spans.len() >= 5 && envoy_spans >= 1).then_some(spans)
    });
    let by = |pick: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        spans
            .iter()
            .find(|s| pick(s))
            .cloned()
            .unwrap_or_else(|| panic!("no {what} in {spans:#?}"))
    };
    let a_server = by(
        &|s| s["via"] == "http" && s["kind"] == "SERVER",
        "outbound SERVER span",
    );
    let a_client = by(
        &|s| s["via"] == "http" && s["kind"] == "CLIENT",
        "outbound CLIENT span",
    );
    let b_server = by(
        &|s| s["service"] == "cogmesh-proxy" && s["via"] == "grpc" && s["kind"] == "SERVER",
        "inbound SERVER span",
    );
    let b_client = by(
        &|s| s["service"] == "cogmesh-proxy" && s["via"] == "grpc" && s["kind"] == "CLIENT",
        "inbound CLIENT span",
    );
    let envoy_spans: Vec<&Value> = spans.iter().filter(|s| s["service"] == "envoy").collect();
    assert_eq!(a_server["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(a_client["parent_span_id"], a_server["span_id"]);
    // Envoy's span is the child of the outbound sidecar's CLIENT span ...
    let envoy_first = envoy_spans
        .iter()
        .find(|s| s["parent_span_id"] == a_client["span_id"])
        .unwrap_or_else(|| panic!("no Envoy span under {}: {spans:#?}", a_client["span_id"]));
    // ... and the inbound sidecar's SERVER span the child of an Envoy span (its only one, or
    // its upstream span when Envoy makes two).
    let envoy_ids: Vec<&Value> = envoy_spans.iter().map(|s| &s["span_id"]).collect();
    assert!(envoy_ids.contains(&&b_server["parent_span_id"]), "{spans:#?}");
    assert_eq!(b_client["parent_span_id"], b_server["span_id"]);
    assert_eq!(envoy_first["trace_id"], trace_id);
    drop(envoy);
    let _ = std::fs::remove_file(config);
}

#[test]
fn a_retried_request_has_a_client_span_per_attempt() {
    let receiver = Receiver::start();
    let dead = free_addr();
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
workers: 1
listeners:
  - {{ name: edge, address: "{{listen}}", direction: outbound, default_service: flaky }}
services:
  - {{ name: flaky, endpoints: ["{dead}"], retry: {{ max_attempts: 2, backoff_base_ms: 1, backoff_max_ms: 1 }} }}
tracing: {{ otlp_endpoint: "http://{grpc}", batch_timeout_ms: 100 }}
"#,
        grpc = receiver.grpc
    ));
    let trace_id = "11111111111111111111111111111111";
    let (status, _) = get_with(
        proxy.listen,
        "/",
        &[("traceparent", &format!("00-{trace_id}-2222222222222222-01"))],
    );
    assert_eq!(status, 502);
    let spans = receiver.wait_for(trace_id, 3);
    let server = find(&spans, "cogmesh-proxy", "SERVER");
    assert_eq!(server["attributes"]["cogmesh.retries"], 1);
    assert_eq!(server["attributes"]["error.type"], "upstream_connect");
    assert_eq!(server["attributes"]["http.response.status_code"], 502);
    assert_eq!(server["status"], "ERROR");
    let mut attempts: Vec<i64> = spans
        .iter()
        .filter(|s| s["kind"] == "CLIENT")
        .map(|s| {
            assert_eq!(s["parent_span_id"], server["span_id"]);
            assert_eq!(s["attributes"]["error.type"], "upstream_connect");
            assert_eq!(s["attributes"]["server.port"], dead.port());
            s["attributes"]["cogmesh.attempt"].as_i64().unwrap()
        })
        .collect();
    attempts.sort();
    assert_eq!(attempts, [1, 2]);
}
