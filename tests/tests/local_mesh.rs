//! The local mesh: `cogmesh demo` on deploy/local/mesh.yaml runs on its own to the end with
//! traffic flowing and a scaling decision, and leaves no process behind; `cogmesh up` with a
//! replica command that fails rolls everything back and says which replica failed and why.
//! Control-plane ports are picked at run time; every replica process carries
//! `COGMESH_CONTROL_PLANE=<control address>` in its environment, which is how the test finds
//! what is left.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{bin, free_addr, repo_root, run_with_timeout};

/// Processes whose environment names `control` as their control plane.
fn replicas_of(control: SocketAddr) -> Vec<String> {
    let marker = format!("COGMESH_CONTROL_PLANE={control}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        if let Ok(env) = std::fs::read(path.join("environ")) {
            if env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn demo_runs_to_the_end_with_traffic_and_a_scaling_decision_and_cleans_up() {
    let control = free_addr();
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh"))
            .current_dir(repo_root())
            .args(["demo", "deploy/local/mesh.yaml", "--duration", "24s"])
            .args([
                "--control",
                &control.to_string(),
                "--metrics",
                &free_addr().to_string(),
            ])
            .env("COGMESH_LOG", "warn"),
        Duration::from_secs(150),
    );
    assert_eq!(code, Some(0), "cogmesh demo failed:\n{out}\n{err}");
    let requests: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no request count in:\n{out}"));
    assert!(requests > 1000, "{requests} requests:\n{out}");
    let decisions: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("scaling decisions: "))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no decision count in:\n{out}"));
    assert!(decisions >= 1, "no scaling decision:\n{out}");
    assert!(
        out.contains("phase: burst") && out.contains("phase: replica killed"),
        "{out}"
    );
    // Priority admission at the gateway's sidecars: critical requests wait for a slot while
    // sheddable ones are shed first, so critical ones never fare worse; none is shed.
    let per_priority = |p: &str| -> (f64, u64) {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(p) && l.contains("shed by priority admission"))
            .unwrap_or_else(|| panic!("no {p} line in:\n{out}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        (
            words[3].parse().expect("success %"),
            words[6].parse().expect("shed count"),
        )
    };
    let (critical_ok, critical_shed) = per_priority("critical");
    let (sheddable_ok, _) = per_priority("sheddable");
    assert_eq!(critical_shed, 0, "critical requests were shed:\n{out}");
    assert!(
        critical_ok >= sheddable_ok,
        "critical {critical_ok} % < sheddable {sheddable_ok} %:\n{out}"
    );
    assert!(out.contains("everything the demo started is stopped"), "{out}");
    let left = replicas_of(control);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn up_with_a_failing_replica_rolls_back_and_names_it() {
    let dir = std::env::temp_dir().join(format!("cogmesh-broken-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        r#"
ready_timeout_s: 5
services:
  healthy:
    replicas: 2
    command: [cogmesh, workload, --listen, "{address}", --name, "{name}"]
  broken:
    replicas: 1
    command: [cogmesh, workload, --listen, "{address}", --no-such-flag]
"#,
    )
    .unwrap();
    let control = free_addr();
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh"))
            .arg("up")
            .arg(&mesh)
            .args(["--control", &control.to_string()])
            .env("COGMESH_LOG", "warn"),
        Duration::from_secs(60),
    );
    assert_ne!(code, Some(0), "cogmesh up should fail:\n{out}\n{err}");
    assert!(err.contains("not every replica became ready within 5 s"), "{err}");
    assert!(err.contains("broken: 0 of 1 replicas ready"), "{err}");
    assert!(err.contains("broken-1: app exited (exit status: 2)"), "{err}");
    assert!(err.contains("rolled back"), "{err}");
    assert!(!err.contains("healthy:"), "the healthy service was ready: {err}");
    let left = replicas_of(control);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
