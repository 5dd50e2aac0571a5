//! Issue 6, control-plane half, end to end: the real `cogmesh control` with `auth` and
//! `identity` sections, called with grpcurl (roles, rate limits, audit log) and by real
//! `cogmesh-proxy` sidecars (certificates checked with `openssl`), and two sidecars that get
//! their certificates from the control plane's CA and talk mTLS with each other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{
    bin, eventually, free_addr, grpcurl, http_get, metric_value, run_with_timeout, start_workload, wait_tcp,
    Proc, Proxy,
};

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
    let metrics = free_addr();
    let yaml = AUTH
        .replace("{dir}", &dir.display().to_string())
        .replace("burst: 3", "burst: 100");
    let (_control, addr) = control(&dir, &format!("admin_listen: \"{metrics}\"\n{yaml}"));

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

    // The CLI sends COGMESH_TOKEN.
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(bin("cogmesh"));
        cmd.args(["status", "--control", &addr.to_string()]);
        if let Some(t) = token {
            cmd.env("COGMESH_TOKEN", t);
        }
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    };
    let (code, _, err) = status(Some("viewer-token"));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = status(None);
    assert!(code != Some(0) && err.contains("no credentials"), "{err}");

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
    // Counted on the control plane's /metrics too.
    let (_, text) = http_get(metrics, "/metrics").unwrap();
    assert!(
        metric_value(&text, "api_refused_total{reason=\"permission_denied\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "api_refused_total{reason=\"unauthenticated\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
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

// === workload certificates ===

const WEB: &str = "spiffe://cogmesh.local/ns/default/sa/web";
const WEB_TOKEN: &str = "web-bootstrap-token";

/// The `identity` section: a root generated in `{dir}/ca`, certificates for `ttl_s`, and the
/// bootstrap token of default/web.
fn identity_yaml(dir: &Path, ttl_s: u64, extra: &str) -> String {
    format!(
        "identity:\n  certificate_ttl_s: {ttl_s}\n  ca: {{ dir: \"{}/ca\" }}\n  workloads:\n    - {{ namespace: default, service_account: web, token: {WEB_TOKEN} }}\n{extra}",
        dir.display()
    )
}

/// A sidecar of `web` on `control` asking for `identity` with the token in `{dir}/token`,
/// writing to `{dir}/id`.
fn sidecar(control: std::net::SocketAddr, dir: &Path, identity: &str, extra: &[&str]) -> Proxy {
    let token = dir.join("token");
    if !token.exists() {
        std::fs::write(&token, WEB_TOKEN).unwrap();
    }
    let mut args: Vec<String> = [
        "--control",
        &control.to_string(),
        "--service",
        "web",
        "--identity",
        identity,
        "--identity-dir",
        &dir.join("id").display().to_string(),
        "--identity-token-file",
        &token.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::quick(&[], &args)
}

/// Runs `openssl args`; its stdout (asserting success).
fn openssl(args: &[&str]) -> String {
    let (code, out, err) = run_with_timeout(Command::new("openssl").args(args), Duration::from_secs(30));
    assert_eq!(code, Some(0), "openssl {args:?}: {err}");
    out
}

/// The certificate and key in `id`, read so that they belong together (the sidecar may be
/// replacing them meanwhile: key first, cert last).
fn cert_and_key(id: &Path) -> (String, String) {
    eventually(
        "a consistent certificate and key",
        Duration::from_secs(30),
        || {
            let cert = std::fs::read_to_string(id.join("cert.pem")).ok()?;
            let key = std::fs::read_to_string(id.join("key.pem")).ok()?;
            let again = std::fs::read_to_string(id.join("cert.pem")).ok()?;
            (cert == again).then_some((cert, key))
        },
    )
}

/// A new P-256 key (`{dir}/{name}-key.pem`) and a CSR for it made by openssl, with `san` as its
/// URI SAN; the CSR's DER in base64 (as grpcurl takes `bytes`).
fn csr_b64(dir: &Path, name: &str, san: Option<&str>) -> String {
    let der = dir.join(format!("{name}.csr"));
    let key = dir.join(format!("{name}-key.pem"));
    let (key, out) = (key.display().to_string(), der.display().to_string());
    let subject = format!("/CN={name}");
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-subj",
        &subject,
        "-outform",
        "DER",
        "-out",
        &out,
    ];
    let ext = san.map(|s| format!("subjectAltName=URI:{s}"));
    if let Some(e) = &ext {
        args.extend(["-addext", e.as_str()]);
    }
    openssl(&args);
    openssl(&["base64", "-A", "-in", &out]).trim().to_string()
}

/// Unix seconds of an openssl date (`notAfter=Nov 26 15:00:00 2026 GMT`), with `date`.
fn unix_of(line: &str) -> i64 {
    let when = line.split_once('=').map_or(line, |(_, v)| v).trim();
    let (code, out, err) = run_with_timeout(
        Command::new("date").args(["-u", "-d", when, "+%s"]),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(0), "date: {err}");
    out.trim().parse().unwrap()
}

/// A sidecar started against the control plane gets a certificate for its SPIFFE ID, signed by
/// the CA, valid for the configured TTL (plus the CA's 60 s backdating), with its key beside
/// it; and renews it (the file changes, the renewal counter grows).
#[test]
fn a_sidecar_gets_a_certificate_and_renews_it() {
    let dir = tempdir("certify");
    let (_control, addr) = control(&dir, &identity_yaml(&dir, 4, ""));
    let proxy = sidecar(addr, &dir, WEB, &[]);
    let id = dir.join("id");
    let (cert, key) = cert_and_key(&id);
    let (cert_file, key_file) = (dir.join("cert-1.pem"), dir.join("key-1.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let cert_path = cert_file.display().to_string();

    let text = openssl(&["x509", "-in", &cert_path, "-noout", "-text"]);
    assert!(text.contains(&format!("URI:{WEB}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Client Authentication") && text.contains("TLS Web Server Authentication"),
        "{text}"
    );
    // Signed by the control plane's root, which is also the trust bundle written beside it.
    let root = std::fs::read_to_string(dir.join("ca/ca.pem")).unwrap();
    assert_eq!(std::fs::read_to_string(id.join("ca.pem")).unwrap(), root);
    let ca_path = dir.join("ca/ca.pem").display().to_string();
    let verified = openssl(&["verify", "-no_check_time", "-CAfile", &ca_path, &cert_path]);
    assert!(verified.contains(": OK"), "{verified}");
    // Lifetime: the configured TTL from issuance, backdated 60 s.
    let dates = openssl(&["x509", "-in", &cert_path, "-noout", "-startdate", "-enddate"]);
    let mut lines = dates.lines();
    let (start, end) = (unix_of(lines.next().unwrap()), unix_of(lines.next().unwrap()));
    assert_eq!(end - start, 4 + 60, "{dates}");
    // The key is the certificate's (PKCS#8, private to the sidecar's user).
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let key_path = key_file.display().to_string();
    assert_eq!(
        openssl(&["x509", "-in", &cert_path, "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", &key_path, "-pubout"])
    );

    // Renewed before it expires: a new certificate (and key) in the files.
    let renewed = eventually("the certificate to be renewed", Duration::from_secs(60), || {
        let (next, _) = cert_and_key(&id);
        (next != cert).then_some(next)
    });
    std::fs::write(&cert_file, &renewed).unwrap();
    let text = openssl(&["x509", "-in", &cert_path, "-noout", "-text"]);
    assert!(text.contains(&format!("URI:{WEB}")), "{text}");
    let metrics = proxy.metrics();
    assert!(
        metric_value(&metrics, "identity_renewal_total{result=\"ok\"}").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
    let expiry = metric_value(&metrics, "identity_cert_expiry_timestamp_seconds").unwrap_or(0.0);
    assert!(expiry > start as f64, "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CSR for an identity the caller may not have is refused with a clear error: a token for
/// web asking for db (PERMISSION_DENIED), a CSR naming db in a request for web
/// (INVALID_ARGUMENT), and a sidecar asking for db writes nothing and counts the failure.
#[test]
fn a_csr_for_another_identity_is_refused() {
    let dir = tempdir("refused");
    let metrics = free_addr();
    let yaml = format!("admin_listen: \"{metrics}\"\n{}", identity_yaml(&dir, 3600, ""));
    let (_control, addr) = control(&dir, &yaml);
    const DB: &str = "spiffe://cogmesh.local/ns/default/sa/db";
    let csr_for = |san: &str| csr_b64(&dir, "workload", Some(san));
    let certify = |csr: &str, identity: &str| {
        call(
            addr,
            None,
            "cogmesh.v1.Identity/Certify",
            &format!(r#"{{"csr": "{csr}", "identity": "{identity}", "token": "{WEB_TOKEN}"}}"#),
        )
    };
    // The token proves web; db is refused.
    let (code, _, err) = certify(&csr_for(DB), DB);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("PermissionDenied") && err.contains(&format!("the token proves {WEB}, not {DB}")),
        "{err}"
    );
    // Asking for web with a CSR that names db.
    let (code, _, err) = certify(&csr_for(DB), WEB);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("InvalidArgument") && err.contains(&format!("asks for \"{DB}\"")),
        "{err}"
    );
    // The same request done right is served (the refusals above are about the identity).
    let (code, out, err) = certify(&csr_for(WEB), WEB);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");

    // A sidecar asking for db with web's token gets nothing and says so in its metrics.
    let proxy = sidecar(addr, &dir, DB, &[]);
    eventually("a failed certificate request", Duration::from_secs(30), || {
        metric_value(&proxy.metrics(), "identity_renewal_total{result=\"failed\"}").filter(|v| *v >= 1.0)
    });
    assert!(!dir.join("id/cert.pem").exists());
    let (_, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(
        metric_value(&text, "certificate_requests_total{result=\"issued\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "certificate_requests_total{result=\"refused\"}").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With TLS on the control plane, sidecars join `MeshControl` with their certificate and renew
/// over mTLS without the bootstrap token; operators call over TLS with a bearer token.
#[test]
fn over_tls_sidecars_join_and_renew_with_their_certificate() {
    let dir = tempdir("mtls");
    let auth = "auth:\n  callers:\n    - { name: val, role: viewer, token: viewer-token }\n    - { name: ci, role: admin, identity: \"spiffe://cogmesh.local/ns/ops/sa/ci\" }\n";
    let extra = "    - { namespace: ops, service_account: ci, token: ci-bootstrap-token }\n  server_names: [\"127.0.0.1\", localhost]\n";
    let yaml = identity_yaml(&dir, 4, extra) + auth;
    let (_control, addr) = control(&dir, &yaml);
    let ca = dir.join("ca/ca.pem").display().to_string();
    let proxy = sidecar(addr, &dir, WEB, &["--identity-control-ca", &ca]);
    let (first, _) = cert_and_key(&dir.join("id"));
    // From now on only the certificate can prove who the sidecar is.
    std::fs::remove_file(dir.join("token")).unwrap();
    let renewed = eventually("a renewal over mTLS", Duration::from_secs(60), || {
        let (next, _) = cert_and_key(&dir.join("id"));
        (next != first).then_some(next)
    });
    assert!(renewed.contains("BEGIN CERTIFICATE"));
    // The sidecar joined the control plane over mTLS; a viewer sees it over TLS.
    let status = eventually("the sidecar to join", Duration::from_secs(60), || {
        let (code, out, _) = run_with_timeout(
            Command::new(grpcurl()).args([
                "-cacert",
                &ca,
                "-H",
                "authorization: Bearer viewer-token",
                &addr.to_string(),
                "cogmesh.v1.MeshAdmin/GetSyncStatus",
            ]),
            Duration::from_secs(30),
        );
        (code == Some(0) && out.contains("\"service\": \"web\"")).then_some(out)
    });
    assert!(status.contains("web"), "{status}");
    // Plaintext is not served.
    let (code, _, _) = call(
        addr,
        Some("viewer-token"),
        "cogmesh.v1.MeshAdmin/ListServices",
        "{}",
    );
    assert_ne!(code, Some(0));

    // An operator tool authenticates with a client certificate from the CA (key and CSR made
    // by openssl, certified with its bootstrap token): admin by its identity, no token sent.
    let csr = csr_b64(&dir, "ci", None);
    let key = dir.join("ci-key.pem");
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args([
            "-cacert", &ca, "-d",
            &format!(r#"{{"csr": "{}", "identity": "spiffe://cogmesh.local/ns/ops/sa/ci", "token": "ci-bootstrap-token"}}"#, csr),
            &addr.to_string(), "cogmesh.v1.Identity/Certify",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cert = dir.join("ci.pem");
    std::fs::write(&cert, answer["certificateChainPem"].as_str().unwrap()).unwrap();
    let admin_call = |with_cert: bool| {
        let mut cmd = Command::new(grpcurl());
        cmd.args(["-cacert", &ca]);
        if with_cert {
            cmd.args([
                "-cert",
                &cert.display().to_string(),
                "-key",
                &key.display().to_string(),
            ]);
        }
        cmd.args([&addr.to_string(), "cogmesh.v1.MeshAdmin/GetConfigStatus"]);
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    };
    let (code, out, err) = admin_call(true);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("environment"), "{out}");
    let (code, _, err) = admin_call(false);
    assert!(code != Some(0) && err.contains("Unauthenticated"), "{err}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

const CLIENT: &str = "spiffe://cogmesh.local/ns/default/sa/client";
const CLIENT_TOKEN: &str = "client-bootstrap-token";

/// Automatic mTLS: two sidecars make their keys, get certificates from the control plane's CA
/// and, with `tls: {}` (no files named by hand), talk TLS 1.3 to each other with client
/// certificates and checked SPIFFE identities; the app behind the server sidecar sees plaintext.
#[test]
fn sidecars_with_certificates_from_the_ca_talk_mtls() {
    let dir = tempdir("automtls");
    let client_workload =
        format!("    - {{ namespace: default, service_account: client, token: {CLIENT_TOKEN} }}\n");
    let (_control, control_addr) = control(&dir, &identity_yaml(&dir, 3600, &client_workload));
    std::fs::write(dir.join("web-token"), WEB_TOKEN).unwrap();
    std::fs::write(dir.join("client-token"), CLIENT_TOKEN).unwrap();
    let app = start_workload("app");
    let d = dir.display();
    let server = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
identity: {{ name: "{WEB}", dir: "{d}/web-id", token_file: "{d}/web-token", control: "{control_addr}" }}
tls: {{}}
listeners:
  - {{ name: inbound, address: "{{listen}}", direction: inbound, default_service: app, tls: {{ client_auth: required }}, authorization: {{ allow: ["{CLIENT}"] }} }}
services:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.addr
    ));
    let client = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
identity: {{ name: "{CLIENT}", dir: "{d}/client-id", token_file: "{d}/client-token", control: "{control_addr}" }}
tls: {{}}
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: web }}
services:
  - {{ name: web, endpoints: ["{}"], tls: {{ identity: "{WEB}" }} }}
"#,
        server.listen
    ));
    for _ in 0..3 {
        let (status, body) = http_get(client.listen, "/sleep?ms=1").expect("a request through both sidecars");
        assert_eq!((status, body.as_str()), (200, "slept 1 ms"));
    }
    // Both identities came from the CA, and the hop between the sidecars was TLS 1.3.
    for (id, name) in [("web-id", WEB), ("client-id", CLIENT)] {
        let text = openssl(&["x509", "-in", &format!("{d}/{id}/cert.pem"), "-noout", "-text"]);
        assert!(text.contains(&format!("URI:{name}")), "{text}");
    }
    let handshakes = r#"tls_handshake_total{side="server",version="TLSv1_3"}"#;
    assert!(
        metric_value(&server.metrics(), handshakes).unwrap_or(0.0) >= 1.0,
        "{}",
        server.metrics()
    );
    // Without a client certificate the server sidecar refuses the connection.
    let refused = std::process::Command::new("curl")
        .args(["-s", "-k", "--max-time", "5"])
        .arg(format!("https://{}/sleep?ms=1", server.listen))
        .output()
        .expect("curl runs");
    assert_ne!(
        refused.status.code(),
        Some(0),
        "a peer without a certificate got through"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
