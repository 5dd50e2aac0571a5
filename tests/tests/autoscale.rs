//! Autoscaling with the `process` backend on loopback: the control plane starts a service's
//! replicas (a `cogmesh workload` behind its own inbound sidecar each), a step of offered load
//! through a client sidecar scales it up, the client's balancer spreads traffic to the new
//! replicas, the service scales down once the load is gone and the window has passed, every
//! decision is listed by `cogmesh scaling history` with its reason, and stopping the control
//! plane stops every replica it started.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cogmesh_e2e::{bin, eventually, free_addr, http_get, run_with_timeout, wait_tcp, Proc, Proxy};

/// `cogmesh routes --json` for one service: (address, qps) per endpoint.
fn endpoints(control: SocketAddr, service: &str) -> Vec<(String, f64)> {
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

#[test]
fn process_backend_scales_up_under_a_load_step_and_back_down() {
    let dir = std::env::temp_dir().join(format!("cogmesh-autoscale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let control_addr = free_addr();
    let history_file = dir.join("scaling.jsonl");
    let config = dir.join("control.yaml");
    // Windows shortened for a test: decisions every 500 ms, 2 s to react, 6 s before a
    // scale-down. A replica has 2 slots and takes 40 ms a request: ~50 req/s.
    std::fs::write(
        &config,
        format!(
            r#"
listen: "{control_addr}"
weight_interval_ms: 250
scaling:
  interval_ms: 500
  history_file: "{}"
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
      command: [cogmesh, workload, --listen, "{{address}}", --name, "{{name}}", --capacity, "2", --service-time-ms, "40"]
"#,
            history_file.display()
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

    // The minimum: one replica registers through its sidecar.
    let first = eventually("the first replica registers", Duration::from_secs(30), || {
        let e = endpoints(control_addr, "reasoning");
        (e.len() == 1).then(|| e[0].0.clone())
    });

    // A client sidecar that routes to the service, learning its endpoints from the control plane.
    let client = Proxy::quick(
        &[],
        &[
            "--upstream-service",
            "reasoning",
            "--control",
            &control_addr.to_string(),
            "--service",
            "gateway",
        ],
    );

    // A step of offered load: 10 closed-loop clients (one replica serves ~2 at a time).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(90);
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let (stop, ok, listen) = (stop.clone(), ok.clone(), client.listen);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((200, _)) = http_get(listen, "/work") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

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
    eventually("scale-down to 1 replica", Duration::from_secs(90), || {
        (endpoints(control_addr, "reasoning").len() == 1).then_some(())
    });

    // Every decision is in the history, with its reason.
    let decisions = history(control_addr);
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
