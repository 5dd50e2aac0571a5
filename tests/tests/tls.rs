//! TLS end to end (issue 6, data plane): client → sidecar A (plaintext) → mTLS → sidecar B →
//! server (plaintext), with certificates made in the test by `rcgen` under a test CA and the
//! SPIFFE identities `spiffe://cogmesh.test/ns/<ns>/sa/<sa>`. Real peers: curl, `openssl
//! s_client`, and a raw TCP server that records the bytes it receives.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cogmesh_e2e::{
    bin, curl_head, eventually, free_addr, http_get, metric_value, run_with_timeout, start_workload, Proxy,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};

const TRUST_DOMAIN: &str = "spiffe://cogmesh.test";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// A test CA and a directory to write identities into.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// How long a leaf is valid.
#[derive(Clone, Copy, PartialEq)]
enum Validity {
    Current,
    Expired,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "cogmesh-tls-{}-{name}-{}",
            std::process::id(),
            free_addr().port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cogmesh test CA {name}"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { dir, ca }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Writes `cert.pem`, `key.pem` and `ca.pem` (this CA) for `id` into `<dir>/<name>/`, as
    /// the identity client does (each file to a temporary name, then renamed).
    fn identity(&self, name: &str, id: &str, validity: Validity) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self.leaf(name, id, validity);
        write_atomically(&dir.join("key.pem"), &key);
        write_atomically(&dir.join("cert.pem"), &cert);
        write_atomically(&dir.join("ca.pem"), &self.ca_pem());
        dir
    }

    /// A leaf certificate (PEM) and its key (PKCS#8 PEM) for `id`, valid for `localhost` and
    /// 127.0.0.1 too, for both server and client authentication.
    fn leaf(&self, cn: &str, id: &str, validity: Validity) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .subject_alt_names
            .push(SanType::URI(id.try_into().unwrap()));
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sidecar B: an inbound TLS listener (client certificates required) in front of `app`,
/// admitting the `default` namespace; `/admin.Only/` admits the `ops` namespace only.
fn inbound_sidecar(identity: &Path, app: SocketAddr) -> (Proxy, PathBuf) {
    Proxy::with_config_logged(&format!(
        r#"
admin: "{{admin}}"
tls: {{ identity_dir: "{dir}" }}
listeners:
  - name: inbound
    address: "{{listen}}"
    direction: inbound
    default_service: app
    tls: {{ client_auth: required }}
    authorization: {{ allow: ["{TRUST_DOMAIN}/ns/default/*"] }}
services:
  - {{ name: app, endpoints: ["{app}"], protocol: http1 }}
routes:
  - match: {{ path_prefix: /admin.Only/ }}
    service: app
    authorization: {{ allow: ["{TRUST_DOMAIN}/ns/ops/*"] }}
"#,
        dir = identity.display()
    ))
}

/// Sidecar A: a plaintext outbound listener; `routes` are `(path prefix, endpoint, expected
/// server identity)`, the last one the default.
fn outbound_sidecar(identity: &Path, routes: &[(&str, SocketAddr, &str)]) -> (Proxy, PathBuf) {
    let mut services = String::new();
    let mut table = String::new();
    for (i, (prefix, endpoint, expected)) in routes.iter().enumerate() {
        services.push_str(&format!(
            "  - {{ name: s{i}, endpoints: [\"{endpoint}\"], tls: {{ identity: \"{expected}\" }}, outlier_detection: {{ consecutive_failures: 1000 }} }}\n"
        ));
        table.push_str(&format!(
            "  - {{ match: {{ path_prefix: \"{prefix}\" }}, service: s{i} }}\n"
        ));
    }
    Proxy::with_config_logged(&format!(
        r#"
admin: "{{admin}}"
tls: {{ identity_dir: "{dir}" }}
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: s{last} }}
services:
{services}routes:
{table}"#,
        dir = identity.display(),
        last = routes.len() - 1,
    ))
}

/// A plaintext HTTP/1.1 server that records every request head it reads and answers `hello`.
struct RawServer {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

fn raw_server() -> RawServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { return };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Keep-alive: one response per request head, bodiless requests only.
                while let Ok(n) = stream.read(&mut chunk) {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let reply = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    RawServer { addr, heads }
}

fn curl(args: &[&str]) -> (Option<i32>, String, String) {
    run_with_timeout(
        Command::new("curl").args(["-sS", "--max-time", "20"]).args(args),
        Duration::from_secs(30),
    )
}

/// `openssl s_client` against `addr` with extra arguments; its whole output.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let (_, out, err) = run_with_timeout(
        Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(args),
        Duration::from_secs(20),
    );
    format!("{out}{err}")
}

/// `openssl s_client` with the certificate, key and trust bundle of the identity in `dir`;
/// checks that the server's chain verified.
fn s_client_as(addr: SocketAddr, dir: &Path, extra: &[&str]) -> String {
    let file = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (file("cert.pem"), file("key.pem"), file("ca.pem"));
    let mut args = vec![
        "-cert",
        &cert,
        "-key",
        &key,
        "-CAfile",
        &ca,
        "-verify_return_error",
    ];
    args.extend_from_slice(extra);
    let out = s_client(addr, &args);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    out
}

/// The peer certificate's subject in `s_client` output, without spaces (`CN=b`).
fn subject(s_client: &str) -> String {
    s_client
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or("")
        .replace(' ', "")
}

fn metric(proxy: &Proxy, prefix: &str) -> f64 {
    metric_value(&proxy.metrics(), prefix).unwrap_or(0.0)
}

/// Waits until the sample `prefix` of `proxy`'s metrics is at least 1.
fn wait_for_sample(proxy: &Proxy, prefix: &str, what: &str) {
    eventually(what, Duration::from_secs(10), || {
        (metric(proxy, prefix) >= 1.0).then_some(())
    });
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn mtls_between_sidecars_with_plaintext_at_both_ends() {
    let pki = Pki::new("pair");
    let server = raw_server();
    let b_dir = pki.identity("b", &spiffe("default", "server"), Validity::Current);
    let a_dir = pki.identity("a", &spiffe("default", "client"), Validity::Current);
    let (b, _) = inbound_sidecar(&b_dir, server.addr);
    let (a, _) = outbound_sidecar(&a_dir, &[("/", b.listen, &spiffe("default", "server"))]);

    // The client and the server both speak plaintext HTTP/1.1.
    let (code, body, err) = curl(&[&a.url("/hello?x=1")]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(body, "hello");
    let heads = server.heads.lock().unwrap().clone();
    assert!(
        heads.iter().any(|h| h.starts_with("GET /hello?x=1 HTTP/1.1\r\n")),
        "the server should read a plaintext request, got {heads:?}"
    );
    // HTTP/2 from the client: A → B is HTTP/2 over TLS (ALPN h2), B → server HTTP/1.1. The
    // client's authority (curl's: A's address) crosses as `:authority` and reaches the server
    // as its Host, as it does over HTTP/1.1.
    let (code, body, err) = curl(&["--http2-prior-knowledge", &a.url("/over-h2")]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(body, "hello");
    let heads = server.heads.lock().unwrap().clone();
    for path in ["/hello?x=1", "/over-h2"] {
        let head = heads
            .iter()
            .find(|h| h.starts_with(&format!("GET {path} HTTP/1.1\r\n")))
            .unwrap_or_else(|| panic!("no request for {path}: {heads:?}"));
        let host = format!("\r\nhost: {}\r\n", a.listen);
        assert!(head.to_ascii_lowercase().contains(&host), "{path}: {head}");
    }

    // TLS 1.3 between A and B, on both sides' counters.
    assert!(metric(&a, r#"tls_handshake_total{side="client",version="TLSv1_3"}"#) >= 1.0);
    assert!(metric(&b, r#"tls_handshake_total{side="server",version="TLSv1_3"}"#) >= 1.0);
    assert_eq!(
        metric(&a, r#"tls_handshake_total{side="client",version="TLSv1_2"}"#),
        0.0
    );

    // B's listener seen by openssl with A's certificate: TLS 1.3, ALPN h2, verified chain.
    let ca = b_dir.join("ca.pem");
    let out = s_client_as(b.listen, &a_dir, &["-alpn", "h2"]);
    assert!(out.contains("New, TLSv1.3, Cipher is TLS_"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");

    // Authorization on B: `/admin.Only/` admits the ops namespace only. HTTP/1 gets 403;
    // gRPC over HTTP/2 (A → B over TLS with ALPN h2) gets PERMISSION_DENIED.
    let (status, _) = curl_head(&[], &a.url("/admin.Only/Get"));
    assert_eq!(status, 403);
    let (status, head) = curl_head(
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
        ],
        &a.url("/admin.Only/Call"),
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("grpc-status: 7"), "{head}");
    let denied = format!(
        r#"authz_denied_total{{listener="inbound",identity="{}"}}"#,
        spiffe("default", "client")
    );
    assert_eq!(metric(&b, &denied), 2.0);
    assert_eq!(
        server.heads.lock().unwrap().len(),
        2,
        "denied requests never reach the server"
    );

    // Without a client certificate B refuses the handshake.
    let out = s_client(b.listen, &["-CAfile", ca.to_str().unwrap()]);
    assert!(!out.contains("hello"), "{out}");
    wait_for_sample(
        &b,
        r#"tls_handshake_failure_total{side="server",reason="no_client_cert"}"#,
        "the missing client certificate counted",
    );
}

/// With two workers, sidecar A opens an mTLS HTTP/2 connection of its own per worker to
/// sidecar B and keeps using it: 40 h2c requests, each from a new curl (a new connection to A,
/// spread over A's workers by `SO_REUSEPORT`; all 40 on one worker has odds of 2^-39), reach B
/// over exactly two TLS connections, counted by both sides' handshakes.
#[test]
fn each_worker_of_a_sidecar_opens_its_own_mtls_http2_connection() {
    let pki = Pki::new("workers");
    let app = start_workload("tls-workers");
    let b_dir = pki.identity("b", &spiffe("default", "server"), Validity::Current);
    let a_dir = pki.identity("a", &spiffe("default", "client"), Validity::Current);
    let (b, _) = inbound_sidecar(&b_dir, app.addr);
    let (a, _) = Proxy::with_config_logged(&format!(
        r#"
admin: "{{admin}}"
workers: 2
tls: {{ identity_dir: "{dir}" }}
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: b }}
services:
  - {{ name: b, endpoints: ["{b}"], tls: {{ identity: "{id}" }} }}
"#,
        dir = a_dir.display(),
        b = b.listen,
        id = spiffe("default", "server"),
    ));
    for i in 0..40 {
        let (code, out, err) = curl(&[
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            &a.url("/"),
        ]);
        assert_eq!(code, Some(0), "request {i}: {err}");
        assert_eq!(out, "200 2", "request {i}");
    }
    let server = r#"tls_handshake_total{side="server",version="TLSv1_3"}"#;
    let client = r#"tls_handshake_total{side="client",version="TLSv1_3"}"#;
    assert_eq!(metric(&b, server), 2.0, "B's handshakes");
    assert_eq!(metric(&a, client), 2.0, "A's handshakes");
}

/// An edge listener with a certificate of its own (no sidecar identity).
#[test]
fn curl_and_openssl_against_an_inbound_tls_listener() {
    let pki = Pki::new("edge");
    let app = start_workload("edge-app");
    let dir = pki.identity("edge", &spiffe("default", "edge"), Validity::Current);
    let (edge, _) = Proxy::with_config_logged(&format!(
        r#"
admin: "{{admin}}"
listeners:
  - name: edge
    address: "{{listen}}"
    direction: inbound
    default_service: app
    tls: {{ client_auth: none, cert: "{dir}/cert.pem", key: "{dir}/key.pem" }}
services:
  - {{ name: app, endpoints: ["{app}"] }}
routes:
  - {{ match: {{ path_prefix: /headers }}, service: app, security_headers: {{}} }}
"#,
        dir = dir.display(),
        app = app.addr,
    ));
    let ca = dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let port = edge.listen.port();
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let resolve = format!("localhost:{port}:127.0.0.1");

    // curl verifies the chain and the name against the CA bundle, over HTTP/1.1 and HTTP/2.
    let (status, head) = curl_head(&["--cacert", ca, "--resolve", &resolve, "--http1.1"], &url("/"));
    assert_eq!(status, 200, "{head}");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (status, head) = curl_head(
        &["--cacert", ca, "--resolve", &resolve, "--http2"],
        &url("/headers"),
    );
    assert_eq!(status, 200);
    assert!(head.starts_with("http/2 200"), "ALPN should pick h2: {head}");
    assert!(
        head.contains("strict-transport-security: max-age=63072000; includesubdomains"),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    let (_, plain_head) = curl_head(&["--cacert", ca, "--resolve", &resolve], &url("/"));
    assert!(
        !plain_head.contains("strict-transport-security"),
        "only the route sets them"
    );

    // Without the CA bundle curl refuses the certificate.
    let (code, _, _) = curl(&["--resolve", &resolve, "-o", "/dev/null", &url("/")]);
    assert_ne!(code, Some(0));

    let out = s_client(
        edge.listen,
        &[
            "-servername",
            "localhost",
            "-CAfile",
            ca,
            "-verify_return_error",
            "-alpn",
            "h2,http/1.1",
        ],
    );
    assert!(out.contains("New, TLSv1.3, Cipher is TLS_"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");

    // TLS 1.2 is off unless the listener allows it.
    let out = s_client(edge.listen, &["-tls1_2", "-CAfile", ca]);
    assert!(
        out.contains("alert protocol version") && out.contains("Cipher is (NONE)"),
        "{out}"
    );
    wait_for_sample(
        &edge,
        r#"tls_handshake_failure_total{side="server",reason="protocol"}"#,
        "the TLS 1.2 attempt counted",
    );
}

#[test]
fn expired_certificate_unknown_ca_and_wrong_identity_are_refused() {
    let pki = Pki::new("refusals");
    let other = Pki::new("foreign");
    let app = start_workload("refusals-app");
    let good = pki.identity("good", &spiffe("default", "server"), Validity::Current);
    let expired = pki.identity("expired", &spiffe("default", "server"), Validity::Expired);
    let wrong = pki.identity("wrong", &spiffe("default", "impostor"), Validity::Current);
    let (b_good, b_good_log) = inbound_sidecar(&good, app.addr);
    let (b_expired, _) = inbound_sidecar(&expired, app.addr);
    let (b_wrong, _) = inbound_sidecar(&wrong, app.addr);
    let expected = spiffe("default", "server");
    let client = pki.identity("client", &spiffe("default", "client"), Validity::Current);
    let (a, a_log) = outbound_sidecar(
        &client,
        &[
            ("/expired", b_expired.listen, &expected),
            ("/wrong", b_wrong.listen, &expected),
            ("/", b_good.listen, &expected),
        ],
    );

    assert_eq!(http_get(a.listen, "/").unwrap().0, 200);

    // B's certificate has expired: A refuses it.
    assert_eq!(http_get(a.listen, "/expired").unwrap().0, 502);
    assert!(
        metric(
            &a,
            r#"tls_handshake_failure_total{side="client",reason="expired"}"#
        ) >= 1.0
    );
    // B's certificate is valid but for another identity: A refuses it.
    let (status, body) = http_get(a.listen, "/wrong").unwrap();
    assert_eq!(status, 502);
    assert!(body.contains(&spiffe("default", "impostor")), "{body}");
    assert!(
        metric(
            &a,
            r#"tls_handshake_failure_total{side="client",reason="bad_identity"}"#
        ) >= 1.0
    );
    let log = log_of(&a_log);
    assert!(
        log.contains("TLS handshake with the upstream refused") && log.contains("expired"),
        "{log}"
    );
    assert!(log.contains(&format!("is not the expected {expected}")), "{log}");

    // A sidecar whose certificate comes from another CA: B refuses it.
    let foreign_dir = other.identity("foreign", &spiffe("default", "client"), Validity::Current);
    std::fs::write(foreign_dir.join("ca.pem"), pki.ca_pem()).unwrap();
    let (foreign, _) = outbound_sidecar(&foreign_dir, &[("/", b_good.listen, &expected)]);
    let (status, _) = http_get(foreign.listen, "/").unwrap();
    assert_eq!(status, 502);
    wait_for_sample(
        &b_good,
        r#"tls_handshake_failure_total{side="server",reason="unknown_ca"}"#,
        "B counts the unknown CA",
    );
    let log = log_of(&b_good_log);
    assert!(
        log.contains("TLS handshake refused") && log.contains("unknown_ca"),
        "{log}"
    );

    // An expired client certificate: B refuses it.
    let stale_dir = pki.identity("stale-client", &spiffe("default", "client"), Validity::Expired);
    let (stale, _) = outbound_sidecar(&stale_dir, &[("/", b_good.listen, &expected)]);
    assert_eq!(http_get(stale.listen, "/").unwrap().0, 502);
    wait_for_sample(
        &b_good,
        r#"tls_handshake_failure_total{side="server",reason="expired"}"#,
        "B counts the expired client certificate",
    );
}

#[test]
fn certificate_rotation_under_load_fails_no_request() {
    let pki = Pki::new("rotation");
    let app = start_workload("rotation-app");
    let b_dir = pki.identity("b", &spiffe("default", "server"), Validity::Current);
    let a_dir = pki.identity("a", &spiffe("default", "client"), Validity::Current);
    let (b, b_log) = inbound_sidecar(&b_dir, app.addr);
    let (a, _) = outbound_sidecar(&a_dir, &[("/", b.listen, &spiffe("default", "server"))]);
    let serving = |addr| s_client_as(addr, &a_dir, &[]);
    assert_eq!(
        subject(&serving(b.listen)),
        "CN=b",
        "B starts with its first certificate"
    );

    // Four clients through A while both sidecars' identities rotate: each sends requests one
    // after the other until the checks below are done (at most 5000 each).
    const CLIENTS: usize = 4;
    const MAX_REQUESTS: usize = 5000;
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (done, failures, target) = (Arc::clone(&done), Arc::clone(&failures), a.listen);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for _ in 0..MAX_REQUESTS {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match http_get(target, "/") {
                        Ok((200, _)) => {}
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    eventually("the load to get going", Duration::from_secs(30), || {
        (done.load(Ordering::SeqCst) >= 100).then_some(())
    });
    let (cert, key) = pki.leaf("b2", &spiffe("default", "server"), Validity::Current);
    write_atomically(&b_dir.join("key.pem"), &key);
    write_atomically(&b_dir.join("cert.pem"), &cert);
    let (cert, key) = pki.leaf("a2", &spiffe("default", "client"), Validity::Current);
    write_atomically(&a_dir.join("key.pem"), &key);
    write_atomically(&a_dir.join("cert.pem"), &cert);
    for proxy in [&a, &b] {
        eventually("the rotation applied", Duration::from_secs(10), || {
            (metric(proxy, r#"tls_identity_reload_total{result="applied"}"#) == 1.0).then_some(())
        });
    }
    // New handshakes get the new certificate while the load goes on.
    let at_rotation = done.load(Ordering::SeqCst);
    assert_eq!(
        subject(&serving(b.listen)),
        "CN=b2",
        "B serves its new certificate"
    );

    // A broken key is refused; the identity in force stays.
    write_atomically(
        &b_dir.join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    wait_for_sample(
        &b,
        r#"tls_identity_reload_total{result="refused"}"#,
        "the bad key refused",
    );
    assert_eq!(
        subject(&serving(b.listen)),
        "CN=b2",
        "B keeps its last good identity"
    );
    assert!(
        log_of(&b_log).contains("new TLS identity refused"),
        "{}",
        log_of(&b_log)
    );

    eventually(
        "more requests after the rotation",
        Duration::from_secs(30),
        || (done.load(Ordering::SeqCst) >= at_rotation + 200).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    assert!(
        done.load(Ordering::SeqCst) < CLIENTS * MAX_REQUESTS,
        "the load ran until the checks ended"
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn invalid_tls_configuration_is_refused_with_file_field_and_reason() {
    let pki = Pki::new("invalid");
    let good = pki.identity("good", &spiffe("default", "x"), Validity::Current);
    let bad_pem = pki.dir.join("bad-cert.pem");
    std::fs::write(&bad_pem, "this is not PEM\n").unwrap();
    let other_key = pki.dir.join("other-key.pem");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let cert = good.join("cert.pem");
    let key = good.join("key.pem");
    let cases = [
        (
            format!("identity_dir: \"{}\"", pki.dir.join("missing").display()),
            "tls.identity_dir",
            "cannot read",
        ),
        (
            format!("cert: \"{}\", key: \"{}\"", bad_pem.display(), key.display()),
            "tls.cert",
            "no CERTIFICATE block",
        ),
        (
            format!("cert: \"{}\", key: \"{}\"", cert.display(), other_key.display()),
            "tls.key",
            "does not match the certificate",
        ),
    ];
    for (i, (tls, field, reason)) in cases.iter().enumerate() {
        let file = pki.dir.join(format!("proxy-{i}.yaml"));
        std::fs::write(
            &file,
            format!(
                "admin: \"{}\"\ntls: {{ {tls} }}\nlisteners:\n  - {{ name: in, address: \"{}\", default_service: app, tls: {{ client_auth: none }} }}\nservices:\n  - {{ name: app, endpoints: [\"127.0.0.1:9\"] }}\n",
                free_addr(),
                free_addr()
            ),
        )
        .unwrap();
        let (code, _, err) = run_with_timeout(
            Command::new(bin("cogmesh-proxy")).arg("--config").arg(&file),
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{err}");
        let expected = format!("{}: {field}: ", file.display());
        assert!(err.contains(&expected) && err.contains(reason), "{err}");
    }
}

/// A WebSocket (HTTP/1.1 Upgrade) through the pair: the upgraded connection between the
/// sidecars is the mTLS one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_mtls_pair() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new("ws");
    let app = start_workload("ws-app");
    let b_dir = pki.identity("b", &spiffe("default", "server"), Validity::Current);
    let a_dir = pki.identity("a", &spiffe("default", "client"), Validity::Current);
    let (b, _) = inbound_sidecar(&b_dir, app.addr);
    let (a, _) = outbound_sidecar(&a_dir, &[("/", b.listen, &spiffe("default", "server"))]);
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", a.listen))
        .await
        .expect("websocket handshake through the pair");
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.expect("a reply").unwrap(),
            Message::text(format!("hello {i}"))
        );
    }
    ws.close(None).await.unwrap();
    assert!(metric(&a, r#"tls_handshake_total{side="client",version="TLSv1_3"}"#) >= 1.0);
}

/// The TLS alerting rules (deploy/prometheus/tls_alerts.yaml) parse and fire as their unit
/// tests say, checked with the real `promtool`.
#[test]
fn tls_alerting_rules_pass_promtool() {
    let promtool = |args: &[&str]| {
        let (code, out, err) = run_with_timeout(
            Command::new("promtool")
                .args(args)
                .current_dir(cogmesh_e2e::repo_root().join("deploy/prometheus")),
            Duration::from_secs(60),
        );
        assert_eq!(code, Some(0), "{out}{err}");
        format!("{out}{err}")
    };
    assert!(promtool(&["check", "rules", "tls_alerts.yaml"]).contains("SUCCESS: 3 rules found"));
    assert!(promtool(&["test", "rules", "tls_alerts_test.yaml"]).contains("SUCCESS"));
}
