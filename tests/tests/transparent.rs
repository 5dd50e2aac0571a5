//! Transparent interception end to end, in two "pods": network namespaces this test creates
//! (see `cogmesh_e2e::netns`: a veth pair, addresses in 198.18.0.0/24 and 2001:2::/64 that exist
//! only inside them) and removes at the end, also when an assertion fails.
//!
//! In each pod `cogmesh-proxy init` installs the iptables rules and a sidecar runs in transparent
//! mode as uid 2102 (the uid the rules skip). The client pod's apps (curl, Python sockets, run as
//! root and unaware of any proxy) call the server pod: HTTP to a service's virtual address and to
//! its endpoint address, over IPv4 and IPv6, goes through both sidecars (their request metrics
//! count it), an opaque
//! TCP echo passes through, and an SMTP-like server that speaks first gets its banner to the
//! client without waiting for protocol detection (the detection metric says `opaque_port`, and
//! no connection timed out).
//!
//! It needs root (network namespaces, iptables) and FAILS otherwise: CI runs as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::netns::{in_ns, Pods, SERVER_IP, SERVER_IP6};
use cogmesh_e2e::{bin, eventually, metric_value, python, run_with_timeout, Proc};

const PROXY_UID: &str = "2102";
const VIRTUAL_IP: &str = "198.18.0.100";

fn run(cmd: &mut Command) -> (bool, String) {
    let (code, out, err) = run_with_timeout(cmd, Duration::from_secs(30));
    (code == Some(0), format!("{}{}", out.trim(), err.trim()))
}

/// The sidecar of a pod: transparent listeners on 4140/4143, admin on 127.0.0.1:4191, as the
/// proxy uid.
fn sidecar(ns: &str, dir: &Path, name: &str, yaml: &str) -> Proc {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    proxy_as_proxy_uid(ns, name, &["--config".as_ref(), path.as_os_str()])
}

/// `cogmesh-proxy ARGS` in `ns` as the proxy uid, once its admin port says ready.
fn proxy_as_proxy_uid(ns: &str, name: &str, args: &[&std::ffi::OsStr]) -> Proc {
    let mut cmd = in_ns(ns, "setpriv");
    cmd.args([
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
        "--",
    ])
    .arg(bin("cogmesh-proxy"))
    .args(args);
    let mut proc = Proc::spawn(name, &mut cmd);
    eventually(&format!("{name} ready"), Duration::from_secs(20), || {
        assert!(proc.is_running(), "{name} exited");
        let (ok, out) = run(in_ns(ns, "curl").args(["-s", "http://127.0.0.1:4191/ready"]));
        (ok && !out.is_empty()).then_some(())
    });
    proc
}

fn scrape(ns: &str) -> String {
    let (ok, out) = run(in_ns(ns, "curl").args(["-s", "http://127.0.0.1:4191/metrics"]));
    assert!(ok, "cannot scrape the sidecar in {ns}: {out}");
    out
}

fn init(ns: &str, extra: &[&str]) {
    let (ok, out) = run(in_ns(ns, bin("cogmesh-proxy")).arg("init").args(extra));
    assert!(ok, "cogmesh-proxy init {extra:?} in {ns} failed: {out}");
}

fn nat_rules(ns: &str, binary: &str) -> String {
    let (ok, out) = run(in_ns(ns, binary).args(["-t", "nat", "-S"]));
    assert!(ok, "{binary} -t nat -S in {ns}: {out}");
    out
}

/// The apps of the server pod: HTTP on 8080 (answers with the path it was asked for; IPv4 and
/// IPv6), a TCP echo on 7000, and an SMTP-like server that sends its banner first on 2525
/// (declared opaque to the sidecars) and 2526 (not declared).
const SERVER_APPS: &str = r#"
import socket, socketserver, threading, http.server

class Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("web says hi to " + self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(4096)
            if not data:
                return
            self.request.sendall(data)

class Smtp(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 cogmesh-test ESMTP ready\r\n")
        for line in self.rfile:
            if line.strip().upper() == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            self.wfile.write(b"250 ok\r\n")

class Web6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

socketserver.ThreadingTCPServer.allow_reuse_address = True
servers = [
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Web),
    Web6(("::", 8080), Web),
    socketserver.ThreadingTCPServer(("0.0.0.0", 7000), Echo),
    socketserver.ThreadingTCPServer(("0.0.0.0", 2525), Smtp),
    socketserver.ThreadingTCPServer(("0.0.0.0", 2526), Smtp),
]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
"#;

/// Starts [`SERVER_APPS`] in `ns` and waits until they listen.
fn server_apps(ns: &str) -> Proc {
    let mut apps = Proc::spawn(
        "server apps",
        in_ns(ns, python())
            .args(["-c", SERVER_APPS])
            .stdout(std::process::Stdio::piped()),
    );
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = apps.child.stdout.take().unwrap();
    std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "server apps did not start");
    apps
}

/// A TCP client in the client pod: connects, optionally sends, prints what it reads first.
fn tcp_client(ns: &str, addr: &str, send: Option<&str>) -> String {
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {}), timeout=10)\n{}\n\
         print(s.recv(4096).decode().strip())\n",
        addr.split(':').next().unwrap(),
        addr.split(':').nth(1).unwrap(),
        send.map(|m| format!("s.sendall(b'{m}')")).unwrap_or_default(),
    );
    let (ok, out) = run(in_ns(ns, python()).args(["-c", &script]));
    assert!(ok, "TCP client to {addr} failed: {out}");
    out
}

fn counter(metrics: &str, name_and_labels: &str) -> f64 {
    metric_value(metrics, name_and_labels).unwrap_or(0.0)
}

#[test]
fn apps_in_pods_talk_through_both_sidecars_without_knowing() {
    let pods = Pods::create("cmt").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempdir();

    // iptables in both pods; installing twice gives the same rules.
    for ns in [&pods.client, &pods.server] {
        init(ns, &["--proxy-uid", PROXY_UID]);
        let once = (nat_rules(ns, "iptables"), nat_rules(ns, "ip6tables"));
        init(ns, &["--proxy-uid", PROXY_UID]);
        let twice = (nat_rules(ns, "iptables"), nat_rules(ns, "ip6tables"));
        assert_eq!(once, twice, "init is not idempotent");
        assert!(
            once.0.contains("-A PREROUTING -p tcp -j COGMESH_INBOUND"),
            "{}",
            once.0
        );
        assert!(
            once.0.contains(&format!("--uid-owner {PROXY_UID} -j RETURN")),
            "{}",
            once.0
        );
        assert!(
            once.1.contains("-A OUTPUT -p tcp -j COGMESH_OUTPUT"),
            "{}",
            once.1
        );
    }

    let _apps = server_apps(&pods.server);

    let listeners = "
listeners:
  - { name: outbound, address: 0.0.0.0:4140, direction: outbound }
  - { name: inbound, address: 0.0.0.0:4143, direction: inbound }
  - { name: outbound-v6, address: '[::]:4140', direction: outbound }
  - { name: inbound-v6, address: '[::]:4143', direction: inbound }
";
    let _server_sidecar = sidecar(
        &pods.server,
        &dir,
        "server-sidecar",
        &format!(
            "admin: 127.0.0.1:4191\n{listeners}services:\n  - {{ name: web, endpoints: [127.0.0.1:8080] }}\n\
             \x20 - {{ name: web6, endpoints: ['[::1]:8080'] }}\n\
             transparent:\n  opaque_ports: [2525]\n"
        ),
    );
    let _client_sidecar = sidecar(
        &pods.client,
        &dir,
        "client-sidecar",
        &format!(
            "admin: 127.0.0.1:4191\n{listeners}services:\n  - {{ name: web, endpoints: [{SERVER_IP}:8080] }}\n\
             \x20 - {{ name: web6, endpoints: ['[{SERVER_IP6}]:8080'] }}\n\
             transparent:\n  opaque_ports: [2525]\n  virtual_services:\n    - {{ service: web, address: {VIRTUAL_IP}:80 }}\n"
        ),
    );

    // HTTP to the service's virtual address and to its endpoint, from an app that knows
    // nothing of the mesh.
    for (url, path) in [
        (format!("http://{VIRTUAL_IP}/by-vip"), "/by-vip"),
        (format!("http://{SERVER_IP}:8080/by-endpoint"), "/by-endpoint"),
    ] {
        let (ok, out) = run(in_ns(&pods.client, "curl").args(["-s", "--max-time", "10", &url]));
        assert!(ok, "curl {url}: {out}");
        assert_eq!(out, format!("web says hi to {path}"));
    }
    // IPv6: ip6tables rules, IP6T_SO_ORIGINAL_DST, the [::] listeners.
    let url = format!("http://[{SERVER_IP6}]:8080/by-v6");
    let (ok, out) = run(in_ns(&pods.client, "curl").args(["-s", "-g", "--max-time", "10", &url]));
    assert!(ok, "curl {url}: {out}");
    assert_eq!(out, "web says hi to /by-v6");

    let client = scrape(&pods.client);
    let server = scrape(&pods.server);
    for (m, direction) in [(&client, "outbound"), (&server, "inbound")] {
        assert_eq!(
            counter(
                m,
                &format!(r#"request_total{{direction="{direction}",service="web6"}}"#)
            ),
            1.0,
            "{m}"
        );
    }
    assert_eq!(
        counter(&client, r#"request_total{direction="outbound",service="web"}"#),
        2.0,
        "{client}"
    );
    assert_eq!(
        counter(&server, r#"request_total{direction="inbound",service="web"}"#),
        2.0,
        "{server}"
    );
    assert_eq!(
        counter(
            &client,
            r#"protocol_detect_total{direction="outbound",result="http1"}"#
        ),
        3.0
    );
    // The client sidecar keeps its connections to the server's address open between requests
    // (its per-worker pools), so the two IPv4 requests may share one: two or three captured
    // connections, every one of them HTTP to the service.
    let captured = counter(
        &server,
        r#"transparent_connection_total{direction="inbound",destination="service"}"#,
    );
    assert!((2.0..=3.0).contains(&captured), "{server}");
    assert_eq!(
        counter(
            &server,
            r#"protocol_detect_total{direction="inbound",result="http1"}"#
        ),
        captured,
        "{server}"
    );

    // Opaque TCP: an echo through both captures.
    let echoed = tcp_client(
        &pods.client,
        &format!("{SERVER_IP}:7000"),
        Some("ping through the mesh"),
    );
    assert_eq!(echoed, "ping through the mesh");
    let client = scrape(&pods.client);
    let server = scrape(&pods.server);
    assert_eq!(
        counter(
            &client,
            r#"protocol_detect_total{direction="outbound",result="opaque"}"#
        ),
        1.0,
        "{client}"
    );
    assert_eq!(
        counter(
            &server,
            r#"protocol_detect_total{direction="inbound",result="opaque"}"#
        ),
        1.0,
        "{server}"
    );
    assert_eq!(
        counter(
            &client,
            r#"transparent_connection_total{direction="outbound",destination="passthrough"}"#
        ),
        1.0
    );

    // Server speaks first: the banner arrives although the client sends nothing, and neither
    // sidecar waited for detection to time out.
    let banner = tcp_client(&pods.client, &format!("{SERVER_IP}:2525"), None);
    assert_eq!(banner, "220 cogmesh-test ESMTP ready");
    for (ns, direction) in [(&pods.client, "outbound"), (&pods.server, "inbound")] {
        let m = scrape(ns);
        assert_eq!(
            counter(
                &m,
                &format!(r#"protocol_detect_total{{direction="{direction}",result="opaque_port"}}"#)
            ),
            1.0,
            "{m}"
        );
        assert_eq!(
            counter(
                &m,
                &format!(r#"protocol_detect_total{{direction="{direction}",result="timeout"}}"#)
            ),
            0.0,
            "{m}"
        );
    }

    // The same server on a port nobody declared opaque: detection waits for its timeout, then
    // proxies the connection as opaque TCP, so the banner still arrives (late), and the metric
    // says why.
    let banner = tcp_client(&pods.client, &format!("{SERVER_IP}:2526"), None);
    assert_eq!(banner, "220 cogmesh-test ESMTP ready");
    let m = scrape(&pods.client);
    assert_eq!(
        counter(
            &m,
            r#"protocol_detect_total{direction="outbound",result="timeout"}"#
        ),
        1.0,
        "{m}"
    );

    // The rules come off again.
    for ns in [&pods.client, &pods.server] {
        init(ns, &["--remove"]);
        for binary in ["iptables", "ip6tables"] {
            let rules = nat_rules(ns, binary);
            assert!(!rules.contains("COGMESH"), "{binary} rules left in {ns}: {rules}");
        }
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cogmesh-transparent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What `cogmesh inject` runs: `cogmesh-proxy --transparent` with no file, joined to the control
/// plane, routes a captured call to a service the control plane pushed (here a static service of
/// control.yaml), and counts it under that service.
#[test]
fn a_sidecar_without_a_file_routes_services_the_control_plane_pushes() {
    let pods = Pods::create("cmq").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempdir().join("quick");
    std::fs::create_dir_all(&dir).unwrap();
    init(&pods.client, &["--proxy-uid", PROXY_UID]);
    let _apps = server_apps(&pods.server);

    let control_yaml = dir.join("control.yaml");
    std::fs::write(
        &control_yaml,
        format!("listen: 127.0.0.1:7070\nweight_interval_ms: 200\nservices:\n  - {{ name: api, endpoints: [{SERVER_IP}:8080] }}\n"),
    )
    .unwrap();
    let _control = Proc::spawn(
        "control plane",
        in_ns(&pods.client, bin("cogmesh"))
            .args(["control", "--config"])
            .arg(&control_yaml)
            .env("COGMESH_LOG", "warn"),
    );
    let args = [
        "--transparent",
        "--control",
        "127.0.0.1:7070",
        "--service",
        "client",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut sidecar = proxy_as_proxy_uid(&pods.client, "quick sidecar", &args);

    // Until the table arrives the call passes through untouched; then it is routed to `api`.
    let url = format!("http://{SERVER_IP}:8080/quick");
    let metrics = eventually(
        "the call routed to the pushed service",
        Duration::from_secs(30),
        || {
            assert!(sidecar.is_running(), "the sidecar exited");
            let (ok, out) = run(in_ns(&pods.client, "curl").args(["-s", "--max-time", "5", &url]));
            assert!(ok, "curl {url}: {out}");
            assert_eq!(out, "web says hi to /quick");
            let (ok, m) = run(in_ns(&pods.client, "curl").args(["-s", "http://127.0.0.1:4191/metrics"]));
            (ok && counter(&m, r#"request_total{direction="outbound",service="api"}"#) >= 1.0).then_some(m)
        },
    );
    assert!(
        counter(
            &metrics,
            r#"protocol_detect_total{direction="outbound",result="http1"}"#
        ) >= 1.0,
        "{metrics}"
    );
}
