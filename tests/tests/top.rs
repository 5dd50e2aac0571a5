//! `cogmesh top --once` against a running mesh: a control plane, two replicas of `web` behind
//! their inbound sidecars, and a client sidecar taking load of which one request in four fails
//! (the workload's `/status/500`). The view shows the loaded service with its replicas, a
//! non-zero request rate and the 75 % success rate, in JSON and as a table.
//!
//! The client sidecar balances round robin: with a random choice of endpoint, one failure in four
//! puts five failures in a row on one endpoint every thousand requests or so, and the outlier
//! detector then ejects it (Envoy's `consecutive_5xx` default, rightly) — the breaker column would
//! depend on luck. Alternating endpoints under "three successes, one failure" never gives either
//! endpoint two failures in a row, so both breakers must stay closed.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cogmesh_e2e::{bin, eventually, http_get, run_with_timeout, start_control, start_workload, Proxy};

fn top(control: std::net::SocketAddr, output: &str) -> String {
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh")).args([
            "top",
            "--once",
            "--output",
            output,
            "--control",
            &control.to_string(),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "cogmesh top failed: {err}");
    out
}

#[test]
fn top_once_shows_the_loaded_service_with_its_rate_and_success() {
    let cp = start_control(&[]);
    let apps = [start_workload("web-1"), start_workload("web-2")];
    let _inbound: Vec<Proxy> = apps
        .iter()
        .map(|a| Proxy::inbound(cp.addr, a.addr, "web"))
        .collect();
    let cp_addr = cp.addr.to_string();
    let client = Proxy::quick(
        &[],
        &[
            "--upstream-service",
            "web",
            "--control",
            &cp_addr,
            "--service",
            "gateway",
            "--balancer",
            "round_robin",
        ],
    );
    eventually(
        "the client sidecar routes to web",
        Duration::from_secs(20),
        || matches!(http_get(client.listen, "/"), Ok((200, _))).then_some(()),
    );

    // Three successes, then a 500, over and over (bounded: 60 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, sent, target) = (Arc::clone(&stop), Arc::clone(&sent), client.listen);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let path = if i % 4 == 3 { "/status/500" } else { "/" };
                let _ = http_get(target, path);
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let web = eventually("top shows web under load", Duration::from_secs(30), || {
        let view: serde_json::Value = serde_json::from_str(&top(cp.addr, "json")).ok()?;
        let web = view["services"]
            .as_array()?
            .iter()
            .find(|s| s["service"] == "web")?
            .clone();
        let rps = web["rps"].as_f64()?;
        (rps > 0.0 && web["replicas"] == 2 && web["endpoints"].as_array()?.len() == 2).then_some(web)
    });
    let success = web["success_rate"].as_f64().unwrap();
    assert!(
        (0.65..=0.85).contains(&success),
        "success rate {success}: {web:#}"
    );
    assert!(web["latency_p99_ms"].as_f64().unwrap() > 0.0, "{web:#}");
    for e in web["endpoints"].as_array().unwrap() {
        assert_eq!(e["breaker"], "closed");
        assert!(e["weight"].as_f64().unwrap() > 0.0);
    }

    let table = top(cp.addr, "plain");
    let line = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no web row in\n{table}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[1], "2", "replicas: {line}");
    assert!(cells[2].parse::<f64>().unwrap() > 0.0, "rps: {line}");
    let percent: f64 = cells[3].trim_end_matches('%').parse().unwrap();
    assert!((65.0..=85.0).contains(&percent), "success: {line}");
    assert!(table.starts_with("SERVICE / ENDPOINT"), "{table}");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert!(sent.load(Ordering::Relaxed) > 0);
}
