//! Autoscaling with the `process` backend on loopback: the control plane starts a service's
//! replicas (a `cogmesh workload` behind its own inbound sidecar each), a step of offered load
//! through a client sidecar scales it up, the client's balancer spreads traffic to the new
//! replicas, the service scales down once the load is gone and the window has passed, every
//! decision is listed by `cogmesh scaling history` with its reason, and stopping the control
//! plane stops every replica it started. And KEDA's external scaler, called with `grpcurl`,
//! reports the policy's targets and the totals of what the replicas report.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cogmesh_e2e::{
    bin, eventually, free_addr, grpcurl, http_get, metric_value, run_with_timeout, wait_tcp, Proc, Proxy,
};

/// The endpoints of `service` as `cogmesh routes --json` shows them.
fn route_entries(control: SocketAddr, service: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh")).args(["routes", "--json", "--control", &control.to_string()]),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(0), "cogmesh routes: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("routes JSON");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// (address, qps) per endpoint of `service`.
fn endpoints(control: SocketAddr, service: &str) -> Vec<(String, f64)> {
    route_entries(control, service)
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or_default().to_string(),
                e["qps"].as_f64().unwrap_or(0.0),
            )
        })
        .collect()
}

fn history(control: SocketAddr) -> Vec<serde_json::Value> {
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh")).args([
            "scaling",
            "history",
            "--json",
            "--control",
            &control.to_string(),
        ]),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(0), "cogmesh scaling history: {err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("history JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A control plane from `scaling` (the YAML of the `scaling:` section, indented by two) in a
/// fresh temp dir, serving metrics on `metrics`; returns it, its address and the dir.
fn control_with(tag: &str, scaling: &str, metrics: SocketAddr) -> (Proc, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("cogmesh-autoscale-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let control_addr = free_addr();
    let config = dir.join("control.yaml");
    let scaling = scaling.replace("{dir}", &dir.display().to_string());
    std::fs::write(
        &config,
        format!(
            "listen: \"{control_addr}\"\nadmin_listen: \"{metrics}\"\nweight_interval_ms: 250\nscaling:\n{scaling}"
        ),
    )
    .unwrap();
    let mut control = Proc::spawn(
        "cogmesh control",
        Command::new(bin("cogmesh"))
            .args(["control", "--config"])
            .arg(&config)
            .env("COGMESH_LOG", "warn"),
    );
    wait_tcp(control_addr, &mut control);
    (control, control_addr, dir)
}

/// `n` closed-loop clients of `GET /work` on `listen` until `stop` or 90 s.
fn load(
    listen: SocketAddr,
    n: usize,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    (0..n)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((200, _)) = http_get(listen, "/work") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// A client sidecar that routes to `service`, learning its endpoints from the control plane.
fn client_of(control: SocketAddr, service: &str) -> Proxy {
    Proxy::quick(
        &[],
        &[
            "--upstream-service",
            service,
            "--control",
            &control.to_string(),
            "--service",
            "gateway",
        ],
    )
}

/// A client on `MeshControl.Connect` that says Hello as a sidecar of `gateway` routing to
/// `service`, and collects the scaling decisions the control plane pushes, until `stop`.
fn decisions_pushed(
    control: SocketAddr,
    service: &str,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<(u32, u32)>>> {
    use cogmesh_proto::v1::mesh_control_client::MeshControlClient;
    use cogmesh_proto::v1::{control_message, sidecar_message, Hello, SidecarMessage};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (out, service) = (seen.clone(), service.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))
                .unwrap()
                .connect()
                .await
                .expect("connect to the control plane");
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(SidecarMessage {
                kind: Some(sidecar_message::Kind::Hello(Hello {
                    node: "decision-watcher".into(),
                    service: "gateway".into(),
                    instance_address: free_addr().to_string(),
                    subscriptions: vec![service],
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut inbound = MeshControlClient::new(channel)
                .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("MeshControl.Connect")
                .into_inner();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                let next = tokio::time::timeout(Duration::from_millis(200), inbound.message()).await;
                match next {
                    Ok(Ok(Some(m))) => {
                        if let Some(control_message::Kind::ScalingDecision(d)) = m.kind {
                            out.lock().unwrap().push((d.from_replicas, d.to_replicas));
                        }
                    }
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            drop(tx);
        });
    });
    seen
}

const WORKLOAD: &str = r#"[cogmesh, workload, --listen, "{address}", --name, "{name}", --capacity, "2", --service-time-ms, "40"]"#;

#[test]
fn process_backend_scales_up_under_a_load_step_and_back_down() {
    // Windows shortened for a test: decisions every 500 ms, 1 s to react, 6 s before a
    // scale-down. A replica has 2 slots and takes 40 ms a request: ~50 req/s.
    let metrics_addr = free_addr();
    let (mut control, control_addr, dir) = control_with(
        "step",
        &format!(
            r#"  interval_ms: 500
  history_file: "{{dir}}/scaling.jsonl"
  backend: process
  services:
    reasoning:
      policy:
        min_replicas: 1
        max_replicas: 4
        target_cpu_utilization: null
        target_cognitive_load: 0.5
        stabilization_up_s: 1
        stabilization_down_s: 6
        cooldown_down_s: 2
        stable_window_s: 4
        panic_window_s: 2
        trend_lookahead_s: 0
      command: {WORKLOAD}
"#
        ),
        metrics_addr,
    );
    let history_file = dir.join("scaling.jsonl");

    // The minimum: one replica registers through its sidecar.
    let first = eventually("the first replica registers", Duration::from_secs(30), || {
        let e = endpoints(control_addr, "reasoning");
        (e.len() == 1).then(|| e[0].0.clone())
    });

    let client = client_of(control_addr, "reasoning");
    let watching = Arc::new(AtomicBool::new(false));
    let pushed = decisions_pushed(control_addr, "reasoning", watching.clone());

    // A step of offered load: 10 closed-loop clients (one replica serves ~2 at a time).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let clients = load(client.listen, 10, &stop, &ok);

    // Scaled up, and the client's balancer sends traffic to the new replicas.
    eventually("scale-up to at least 3 replicas", Duration::from_secs(60), || {
        (endpoints(control_addr, "reasoning").len() >= 3).then_some(())
    });
    let busy = eventually("traffic on 3 replicas", Duration::from_secs(30), || {
        let e = endpoints(control_addr, "reasoning");
        let busy: Vec<_> = e.iter().filter(|(_, qps)| *qps > 0.5).cloned().collect();
        (busy.len() >= 3).then_some(busy)
    });
    assert!(busy.iter().any(|(a, _)| *a != first), "{busy:?}");

    // The load stops: back to one replica once the down window has passed.
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "requests served: {}",
        ok.load(Ordering::Relaxed)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let e = route_entries(control_addr, "reasoning");
        if e.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scale-down to 1 replica within 90 s: endpoints {e:?}, decisions {:?}",
            history(control_addr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every decision is in the history, with its reason, and was pushed on MeshControl to a
    // sidecar that routes to the service.
    // (Read together: a decision may still come while the test looks.)
    let (decisions, pushed) = eventually("every decision pushed", Duration::from_secs(10), || {
        let decisions = history(control_addr);
        let p = pushed.lock().unwrap().clone();
        (p.len() == decisions.len()).then_some((decisions, p))
    });
    watching.store(true, Ordering::Relaxed);
    assert!(pushed.iter().any(|(from, to)| to > from), "{pushed:?}");
    let ups: Vec<_> = decisions
        .iter()
        .filter(|d| d["to"].as_u64() > d["from"].as_u64())
        .collect();
    let downs: Vec<_> = decisions
        .iter()
        .filter(|d| d["to"].as_u64() < d["from"].as_u64())
        .collect();
    assert!(!ups.is_empty() && !downs.is_empty(), "{decisions:?}");
    assert!(ups.iter().all(|d| d["metric"] == "cognitive_load"), "{ups:?}");
    assert!(
        ups[0]["reason"].as_str().unwrap().contains("cognitive_load"),
        "{}",
        ups[0]["reason"]
    );
    assert!(
        downs
            .iter()
            .any(|d| d["reason"].as_str().unwrap().contains("below target")),
        "{downs:?}"
    );
    let stored = std::fs::read_to_string(&history_file).expect("the history file");
    assert_eq!(stored.lines().count(), decisions.len());

    // The control plane's metrics count them, and pass promtool.
    let (status, metrics) = http_get(metrics_addr, "/metrics").expect("scrape the control plane");
    assert_eq!(status, 200);
    let count = |direction: &str| {
        metric_value(
            &metrics,
            &format!(r#"scaling_decisions_total{{service="reasoning",direction="{direction}"}}"#),
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(
        (count("up"), count("down")),
        (ups.len(), downs.len()),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, r#"scaling_replicas{service="reasoning"}"#),
        Some(1.0),
        "{metrics}"
    );
    let (code, out, err) = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "curl -sS --fail http://{metrics_addr}/metrics | promtool check metrics"
        )),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "promtool check metrics:\n{out}\n{err}");

    // Stopping the control plane stops its replicas: their sidecars no longer accept.
    let replica: SocketAddr = endpoints(control_addr, "reasoning")[0].0.parse().unwrap();
    drop(client);
    control.signal("TERM");
    let status = control
        .wait_exit(Duration::from_secs(20))
        .expect("the control plane exits");
    assert_eq!(status.code(), Some(0));
    eventually("the replicas are gone", Duration::from_secs(15), || {
        TcpStream::connect_timeout(&replica, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn grpcurl_call(control: SocketAddr, method: &str, body: &str) -> serde_json::Value {
    try_grpcurl(control, method, body).unwrap_or_else(|e| panic!("grpcurl {method}: {e}"))
}

/// Calls an ExternalScaler method; the JSON it printed, or grpcurl's error output.
fn try_grpcurl(control: SocketAddr, method: &str, body: &str) -> Result<serde_json::Value, String> {
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            body,
            &control.to_string(),
            &format!("externalscaler.ExternalScaler/{method}"),
        ]),
        Duration::from_secs(30),
    );
    if code != Some(0) {
        return Err(err);
    }
    serde_json::from_str(&out).map_err(|e| format!("printed {out:?}: {e}"))
}

#[test]
fn keda_external_scaler_reports_policy_targets_and_reported_totals() {
    // Two replicas, kept at two (min = max), saturated by the load: each reports load 1.0.
    let (_control, control_addr, dir) = control_with(
        "keda",
        &format!(
            r#"  backend: process
  services:
    reasoning:
      policy: {{ min_replicas: 2, max_replicas: 2, target_cpu_utilization: null, target_cognitive_load: 0.6 }}
      command: {WORKLOAD}
"#
        ),
        free_addr(),
    );
    eventually("both replicas register", Duration::from_secs(30), || {
        (endpoints(control_addr, "reasoning").len() == 2).then_some(())
    });
    let object =
        r#"{"name": "reasoning-scaler", "namespace": "default", "scalerMetadata": {"service": "reasoning"}}"#;

    // The policy's target, per replica.
    let spec = grpcurl_call(control_addr, "GetMetricSpec", object);
    assert_eq!(spec["metricSpecs"][0]["metricName"], "cognitive_load", "{spec}");
    assert_eq!(spec["metricSpecs"][0]["targetSizeFloat"], 0.6, "{spec}");
    assert_eq!(spec["metricSpecs"].as_array().unwrap().len(), 1, "{spec}");

    let client = client_of(control_addr, "reasoning");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let clients = load(client.listen, 12, &stop, &ok);
    // Both replicas report load 1.0: the service total is 2.0, and it is active.
    let request = format!(r#"{{"scaledObjectRef": {object}, "metricName": "cognitive_load"}}"#);
    let value = eventually(
        "the total load of two saturated replicas",
        Duration::from_secs(30),
        || {
            let loads: Vec<f64> = endpoints_with_load(control_addr, "reasoning");
            let v = try_grpcurl(control_addr, "GetMetrics", &request).ok()?;
            let total = v["metricValues"][0]["metricValueFloat"].as_f64().unwrap_or(0.0);
            (loads.len() == 2 && loads.iter().all(|l| *l == 1.0) && total == 2.0).then_some(v)
        },
    );
    assert_eq!(
        value["metricValues"][0]["metricName"], "cognitive_load",
        "{value}"
    );
    assert_eq!(value["metricValues"][0]["metricValue"], "2", "{value}");
    let active = grpcurl_call(control_addr, "IsActive", object);
    assert_eq!(active["result"], true, "{active}");
    // A mean cognitive load of 1.0 is past the critical threshold (0.9): MeshAdmin lists it.
    let alerts = eventually("a critical cognitive-load alert", Duration::from_secs(20), || {
        let v = admin_call(control_addr, "ListAlerts");
        let critical = v["alerts"].as_array()?.iter().any(|a| {
            a["service"] == "reasoning" && a["metric"] == "cognitive_load" && a["level"] == "critical"
        });
        critical.then_some(v)
    });
    assert_eq!(alerts["alerts"][0]["threshold"], 0.9, "{alerts}");

    // An operator changes the target through MeshAdmin: KEDA sees it, with a new version.
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            r#"{"policy": {"service": "reasoning", "min_replicas": 2, "max_replicas": 2, "target_cognitive_load": 0.8,
                "tolerance": 0.1, "cooldown_down_s": 30, "stabilization_up_s": 3, "stabilization_down_s": 300,
                "max_step_up": 4, "max_step_down": 2, "stable_window_s": 60, "panic_window_s": 6,
                "panic_threshold": 2}}"#,
            &control_addr.to_string(),
            "cogmesh.v1.MeshAdmin/SetScalingPolicy",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "SetScalingPolicy: {err}");
    assert!(out.contains("\"version\": \"1\""), "{out}");
    let spec = grpcurl_call(control_addr, "GetMetricSpec", object);
    assert_eq!(spec["metricSpecs"][0]["targetSizeFloat"], 0.8, "{spec}");
    // An invalid policy is refused with the field and the reason.
    let (code, _, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            r#"{"policy": {"service": "reasoning", "min_replicas": 5, "max_replicas": 2, "target_cognitive_load": 0.8}}"#,
            &control_addr.to_string(),
            "cogmesh.v1.MeshAdmin/SetScalingPolicy",
        ]),
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("InvalidArgument") && err.contains("policy.min_replicas"),
        "{err}"
    );

    // A service without a policy is refused by name.
    let (code, _, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            r#"{"name": "nope"}"#,
            &control_addr.to_string(),
            "externalscaler.ExternalScaler/GetMetricSpec",
        ]),
        Duration::from_secs(30),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("NotFound") && err.contains("\"nope\""), "{err}");

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 0);
    // Idle again: the alert clears.
    eventually("the alert to clear", Duration::from_secs(30), || {
        let v = admin_call(control_addr, "ListAlerts");
        v["alerts"].as_array().is_none_or(|a| a.is_empty()).then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `MeshAdmin` method without arguments, through grpcurl.
fn admin_call(control: SocketAddr, method: &str) -> serde_json::Value {
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            "{}",
            &control.to_string(),
            &format!("cogmesh.v1.MeshAdmin/{method}"),
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "grpcurl {method}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("grpcurl {method} printed {out:?}: {e}"))
}

/// The cognitive load `cogmesh routes` shows for each endpoint of `service`.
fn endpoints_with_load(control: SocketAddr, service: &str) -> Vec<f64> {
    route_entries(control, service)
        .iter()
        .map(|e| e["cognitive_load"].as_f64().unwrap_or(0.0))
        .collect()
}

/// The `kubernetes` backend against a fake API server on loopback (no real API server can run
/// here): it follows the documented `scale` subresource of `apps/v1` Deployments — `PATCH
/// /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale` with a JSON merge patch of
/// `spec.replicas`, answered with an `autoscaling/v1` `Scale`. A service below its policy's
/// minimum (no replica registered) is scaled to the minimum, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_backend_patches_the_deployment_scale() {
    use http_body_util::BodyExt;
    // (method, path, content type, body) of every request the fake API server got.
    type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let body = String::from_utf8_lossy(&body).to_string();
                        let replicas = serde_json::from_str::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["spec"]["replicas"].as_u64())
                            .unwrap_or(0);
                        record.lock().unwrap().push((method, path, content_type, body));
                        let scale = serde_json::json!({
                            "apiVersion": "autoscaling/v1", "kind": "Scale",
                            "metadata": {"name": "reasoning-engine", "namespace": "mesh"},
                            "spec": {"replicas": replicas}, "status": {"replicas": 0}
                        });
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from(scale.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let (_control, _addr, dir) = tokio::task::spawn_blocking(move || {
        control_with(
            "kube",
            &format!(
                r#"  interval_ms: 300
  backend: kubernetes
  kubernetes: {{ namespace: mesh, api_server: "http://{api}" }}
  services:
    reasoning:
      deployment: reasoning-engine
      policy: {{ min_replicas: 2, max_replicas: 4, target_cpu_utilization: null, target_cognitive_load: 0.5 }}
"#
            ),
            free_addr(),
        )
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More ticks pass: the replicas it asked for count as starting, so it does not ask again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (method, path, content_type, body) = &seen[0];
    assert_eq!(method, "PATCH");
    assert_eq!(
        path,
        "/apis/apps/v1/namespaces/mesh/deployments/reasoning-engine/scale"
    );
    assert_eq!(content_type, "application/merge-patch+json");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body, serde_json::json!({"spec": {"replicas": 2}}));
    let _ = std::fs::remove_dir_all(&dir);
}
