//! Issue 6, control-plane half, end to end: the real `cogmesh control` with `auth` and
//! `identity` sections, called with grpcurl (roles, rate limits, audit log) and by real
//! `cogmesh-proxy` sidecars (certificates checked with `openssl`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{bin, free_addr, grpcurl, run_with_timeout, wait_tcp, Proc};

/// A fresh temp dir for one test.
fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cogmesh-security-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cogmesh control` with `yaml` (after `listen`) as its control.yaml in `dir`.
fn control(dir: &Path, yaml: &str) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let config = dir.join("control.yaml");
    std::fs::write(&config, format!("listen: \"{addr}\"\n{yaml}")).unwrap();
    let mut proc = Proc::spawn(
        "cogmesh control",
        Command::new(bin("cogmesh"))
            .args(["control", "--config"])
            .arg(&config)
            .env("COGMESH_LOG", "warn"),
    );
    wait_tcp(addr, &mut proc);
    (proc, addr)
}

/// grpcurl `method` on `addr` in plaintext with `token` (if any) and `data`: exit code, stdout,
/// stderr.
fn call(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    method: &str,
    data: &str,
) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(grpcurl());
    cmd.arg("-plaintext");
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    cmd.args(["-d", data, &addr.to_string(), method]);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

const SET_POLICY: &str = "cogmesh.v1.MeshAdmin/SetScalingPolicy";
const POLICY: &str = r#"{"policy": {"service": "reasoning", "min_replicas": 1, "max_replicas": 7, "target_cognitive_load": 0.6,
    "tolerance": 0.1, "cooldown_down_s": 30, "stabilization_up_s": 3, "stabilization_down_s": 300,
    "max_step_up": 4, "max_step_down": 2, "stable_window_s": 60, "panic_window_s": 6, "panic_threshold": 2}}"#;

const AUTH: &str = "auth:
  callers:
    - { name: val, role: viewer, token: viewer-token }
    - { name: olga, role: operator, token: operator-token }
  audit_log: \"{dir}/audit.jsonl\"
  rate_limit: { requests_per_second: 0.001, burst: 3 }
scaling:
  backend: none
  services:
    reasoning:
      policy: { min_replicas: 1, max_replicas: 3, target_cognitive_load: 0.7 }
";

fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// A viewer token cannot change a scaling policy (PERMISSION_DENIED), an operator token can,
/// no token is UNAUTHENTICATED, and the audit log has the denied attempt (who, what, when) and
/// the change (before/after).
#[test]
fn roles_guard_changes_and_the_audit_log_shows_both() {
    let dir = tempdir("rbac");
    let (_control, addr) = control(&dir, &AUTH.replace("{dir}", &dir.display().to_string()));

    // A viewer reads, but cannot change.
    let (code, out, err) = call(
        addr,
        Some("viewer-token"),
        "cogmesh.v1.MeshAdmin/GetScalingPolicies",
        "{}",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"maxReplicas\": 3"), "{out}");
    let (code, _, err) = call(addr, Some("viewer-token"), SET_POLICY, POLICY);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("PermissionDenied") && err.contains("needs the operator role"),
        "{err}"
    );
    // No credentials, or unknown ones: unauthenticated. Health and reflection stay open.
    let (code, _, err) = call(addr, None, SET_POLICY, POLICY);
    assert!(code != Some(0) && err.contains("Unauthenticated"), "{err}");
    let (code, _, err) = call(addr, Some("guess"), SET_POLICY, POLICY);
    assert!(code != Some(0) && err.contains("Unauthenticated"), "{err}");
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args(["-plaintext", &addr.to_string(), "list"]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cogmesh.v1.Identity"), "{out}");

    // The operator changes it.
    let (code, out, err) = call(addr, Some("operator-token"), SET_POLICY, POLICY);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"maxReplicas\": 7"), "{out}");
    let (_, out, _) = call(
        addr,
        Some("viewer-token"),
        "cogmesh.v1.MeshAdmin/GetScalingPolicies",
        "{}",
    );
    assert!(out.contains("\"maxReplicas\": 7"), "{out}");

    let lines = audit_lines(&dir);
    let denied = lines
        .iter()
        .find(|l| l["caller"] == "val")
        .unwrap_or_else(|| panic!("no record of the viewer's attempt: {lines:?}"));
    assert_eq!(denied["result"], "denied");
    assert_eq!(denied["role"], "viewer");
    assert_eq!(denied["method"], SET_POLICY);
    assert!(
        denied["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{denied}"
    );
    assert!(lines
        .iter()
        .any(|l| l["result"] == "denied" && l["caller"] == "anonymous"));
    let change = lines
        .iter()
        .find(|l| l["caller"] == "olga")
        .unwrap_or_else(|| panic!("no record of the change: {lines:?}"));
    assert_eq!(change["result"], "allowed");
    assert_eq!(change["target"], "reasoning");
    assert_eq!(change["before"]["max_replicas"], 3, "{change}");
    assert_eq!(change["after"]["max_replicas"], 7, "{change}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A caller over its admin-API rate limit gets RESOURCE_EXHAUSTED while another caller is
/// served; the refusal is audited.
#[test]
fn the_admin_api_is_rate_limited_per_caller() {
    let dir = tempdir("ratelimit");
    let (_control, addr) = control(&dir, &AUTH.replace("{dir}", &dir.display().to_string()));
    const LIST: &str = "cogmesh.v1.MeshAdmin/ListServices";
    // Burst 3, refilling one token in 1000 s: three calls pass, the fourth is refused.
    for i in 0..3 {
        let (code, _, err) = call(addr, Some("viewer-token"), LIST, "{}");
        assert_eq!(code, Some(0), "call {i}: {err}");
    }
    let (code, _, err) = call(addr, Some("viewer-token"), LIST, "{}");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("ResourceExhausted") && err.contains("rate limit"),
        "{err}"
    );
    // Another caller has its own bucket.
    let (code, _, err) = call(addr, Some("operator-token"), LIST, "{}");
    assert_eq!(code, Some(0), "{err}");
    let lines = audit_lines(&dir);
    assert!(
        lines
            .iter()
            .any(|l| l["caller"] == "val" && l["result"] == "rate_limited"),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
