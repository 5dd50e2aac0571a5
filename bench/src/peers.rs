//! The servers under test: the nginx upstream, cogmesh-proxy, and the peers (Envoy, HAProxy, nginx as
//! a reverse proxy), each configured by the bench at run time.
//!
//! Owns: finding the binaries, writing each peer's configuration into the run's temp dir, the command
//! lines, and readiness (the listener answers a real request through to the upstream, and an admin
//! `/ready` where the server has one). One [`Instance`] serves one protocol on one listener, so CPU
//! and memory are never shared between the HTTP/1.1 and the h2c measurement.
//!
//! Upstream protocol per case, as close to "follow the client" as each peer allows:
//! HTTP/1.1 in → HTTP/1.1 out everywhere; h2c in → h2c out for cogmesh (its default), Envoy
//! (`http2_protocol_options` on the cluster) and HAProxy (`proto h2` on the server); nginx cannot
//! proxy HTTP/2 to an upstream (`proxy_pass` speaks HTTP/1.x only), so its h2c case goes out over
//! pooled HTTP/1.1.
//!
//! Head to head, both proxies of a duel speak the same protocol to the upstream
//! ([`duel_cogmesh_args`]): against nginx over h2c, cogmesh goes out over HTTP/1.1 too. The
//! upstream servers answer HTTP/2 later than HTTP/1.1, so a duel across upstream protocols would
//! compare the upstreams, not the proxies.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::{self, free_port, loopback, Server};

/// Size of the upstream's response body.
pub const BODY_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    H1,
    H2c,
}

impl Proto {
    pub fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2c => "h2c",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Cogmesh,
    Envoy,
    Haproxy,
    Nginx,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Cogmesh,
        Kind::Envoy,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Cogmesh => "cogmesh",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }

    pub fn parse(name: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .with_context(|| format!("unknown proxy {name:?} (direct, cogmesh, envoy, haproxy, nginx)"))
    }
}

/// Where the external programs are. `None` for a peer whose binary is missing (it is skipped).
#[derive(Debug, Clone)]
pub struct Tools {
    pub repo: PathBuf,
    pub oha: PathBuf,
    pub wrk: PathBuf,
    pub h2load: Option<PathBuf>,
    pub nginx: PathBuf,
    pub nginx_version: (u32, u32, u32),
    pub haproxy: Option<PathBuf>,
    pub envoy: Option<PathBuf>,
    pub cogmesh: Option<PathBuf>,
    /// Where `cogmesh` was copied from, once [`Tools::snapshot_cogmesh`] ran.
    pub cogmesh_origin: Option<PathBuf>,
}

/// Runs a cogmesh benchmark in a fresh work directory `$TMPDIR/<name>-<pid>` with the tools
/// found (cogmesh required, copied in so a rebuild during the run does not mix two builds); the
/// directory is removed afterwards unless `keep` or the run failed.
pub fn with_work_dir(
    name: &str,
    cogmesh_bin: Option<&Path>,
    keep: bool,
    run: impl FnOnce(&Tools, &Path) -> Result<()>,
) -> Result<()> {
    let repo = repo_root();
    let mut tools = Tools::find(&repo, cogmesh_bin)?;
    if tools.cogmesh.is_none() {
        bail!("target/release/cogmesh-proxy is not built: cargo build --release -p cogmesh-proxy");
    }
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    tools.snapshot_cogmesh(&dir)?;
    let result = run(&tools, &dir);
    if keep || (result.is_err() && !procs::interrupted()) {
        eprintln!("configs, logs and oha output kept in {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

/// The first executable called `name` on PATH (or in the sbin directories).
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The first non-empty line a program prints (stdout, else stderr) for `args`, e.g. its version.
pub fn first_line(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|out| {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("?")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|err| format!("? ({err})"))
}

fn first_executable(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|path| is_executable(path))
}

/// The repository root: from the bench binary's place (`target/release/proxy-bench`), else from the
/// source tree it was built from.
pub fn repo_root() -> PathBuf {
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|dir| dir.join("bench/setup.sh").exists());
    from_exe.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

impl Tools {
    pub fn find(repo: &Path, cogmesh_bin: Option<&Path>) -> Result<Tools> {
        let tools = repo.join(".tools/bin");
        let missing = |what: &str| format!("{what} not found: run bench/setup.sh first");
        let oha = first_executable([tools.join("oha")])
            .or_else(|| on_path("oha"))
            .with_context(|| missing("oha"))?;
        let wrk = on_path("wrk").with_context(|| missing("wrk"))?;
        let nginx = on_path("nginx").with_context(|| missing("nginx"))?;
        let nginx_version = nginx_version(&nginx)?;
        let cogmesh = match cogmesh_bin {
            Some(path) => Some(path.to_path_buf()),
            None => Some(repo.join("target/release/cogmesh-proxy")),
        }
        .filter(|path| is_executable(path));
        Ok(Tools {
            repo: repo.to_path_buf(),
            oha,
            wrk,
            h2load: on_path("h2load"),
            nginx,
            nginx_version,
            haproxy: on_path("haproxy"),
            envoy: first_executable([tools.join("envoy"), repo.join(".venv/bin/envoy")])
                .or_else(|| on_path("envoy")),
            cogmesh,
            cogmesh_origin: None,
        })
    }

    /// Copies the cogmesh-proxy binary into `dir` and uses the copy from then on.
    pub fn snapshot_cogmesh(&mut self, dir: &Path) -> Result<()> {
        if let Some(bin) = self.cogmesh.take() {
            let copy = dir.join("cogmesh-proxy");
            fs::copy(&bin, &copy).with_context(|| format!("copy {}", bin.display()))?;
            self.cogmesh = Some(copy);
            self.cogmesh_origin = Some(bin);
        }
        Ok(())
    }

    /// The binary for `kind`, or `None` if it is not installed / not built.
    pub fn binary(&self, kind: Kind) -> Option<&Path> {
        match kind {
            Kind::Direct => Some(self.nginx.as_path()),
            Kind::Cogmesh => self.cogmesh.as_deref(),
            Kind::Envoy => self.envoy.as_deref(),
            Kind::Haproxy => self.haproxy.as_deref(),
            Kind::Nginx => Some(self.nginx.as_path()),
        }
    }

    /// One line per tool with its version, for the report header.
    pub fn versions(&self) -> Vec<String> {
        let mut lines = vec![
            format!("oha: {}", first_line(&self.oha, &["--version"])),
            format!("wrk: {}", first_line(&self.wrk, &["--version"])),
            format!("nginx: {}", first_line(&self.nginx, &["-v"])),
        ];
        if let Some(h2load) = &self.h2load {
            lines.push(format!("h2load: {}", first_line(h2load, &["--version"])));
        }
        match &self.haproxy {
            Some(bin) => lines.push(format!("haproxy: {}", first_line(bin, &["-v"]))),
            None => lines.push("haproxy: not installed (skipped)".into()),
        }
        match &self.envoy {
            Some(bin) => lines.push(format!("envoy: {}", first_line(bin, &["--version"]))),
            None => lines.push("envoy: not installed (skipped)".into()),
        }
        match &self.cogmesh {
            Some(bin) => {
                let bin = self.cogmesh_origin.as_ref().unwrap_or(bin);
                let built = fs::metadata(bin)
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|time| time.elapsed().ok())
                    .map(|age| format!("built {} min ago", age.as_secs() / 60))
                    .unwrap_or_default();
                lines.push(format!("cogmesh-proxy: {} ({built})", bin.display()));
            }
            None => lines.push("cogmesh-proxy: target/release/cogmesh-proxy not built (skipped)".to_string()),
        }
        lines
    }
}

fn nginx_version(nginx: &Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(nginx).arg("-v").output()?;
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    parse_nginx_version(&text).with_context(|| format!("cannot read nginx version from {text:?}"))
}

pub fn parse_nginx_version(text: &str) -> Option<(u32, u32, u32)> {
    let version = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// The upstream protocol the extra cogmesh arguments ask for (`--protocol X` or `--protocol=X`);
/// the last one wins, as with clap.
pub fn cogmesh_upstream_protocol(args: &[String]) -> Option<&str> {
    let mut protocol = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if let Some(value) = arg.strip_prefix("--protocol=") {
            protocol = Some(value);
        } else if arg == "--protocol" {
            protocol = args.next().map(String::as_str);
        }
    }
    protocol
}

/// The protocol a proxy of `kind` speaks to the upstream when its clients speak `proto`.
pub fn upstream_protocol(kind: Kind, proto: Proto, cogmesh_args: &[String]) -> Proto {
    match (kind, cogmesh_upstream_protocol(cogmesh_args)) {
        // nginx's proxy_pass speaks HTTP/1.x only.
        (Kind::Nginx, _) | (Kind::Cogmesh, Some("http1")) => Proto::H1,
        (Kind::Cogmesh, Some("http2")) => Proto::H2c,
        _ => proto,
    }
}

/// cogmesh's arguments in a duel against `peer`: the extra ones, plus the `--protocol` that makes
/// cogmesh speak to the upstream as the peer does, unless the extra arguments choose one.
pub fn duel_cogmesh_args(peer: Kind, proto: Proto, cogmesh_args: &[String]) -> Vec<String> {
    let mut args = cogmesh_args.to_vec();
    let mine = upstream_protocol(Kind::Cogmesh, proto, cogmesh_args);
    let theirs = upstream_protocol(peer, proto, cogmesh_args);
    if cogmesh_upstream_protocol(cogmesh_args).is_none() && mine != theirs {
        args.push(
            match theirs {
                Proto::H1 => "--protocol=http1",
                Proto::H2c => "--protocol=http2",
            }
            .to_string(),
        );
    }
    args
}

/// The nginx `listen` line for a plain-text listener; for h2c, nginx before 1.25.1 takes `http2` as
/// a listen parameter (prior knowledge only), later versions have the `http2 on` directive.
fn nginx_listen(version: (u32, u32, u32), addr: SocketAddr, proto: Proto) -> String {
    match proto {
        Proto::H1 => format!("listen {addr} reuseport;"),
        Proto::H2c if version >= (1, 25, 1) => format!("listen {addr} reuseport;\n        http2 on;"),
        Proto::H2c => format!("listen {addr} http2 reuseport;"),
    }
}

/// Settings shared by both nginx roles: no access log, no temp files outside `dir`, connections
/// kept for the whole run (nginx closes a keep-alive connection after 1000 requests by default,
/// which would make the load generator and the proxies reconnect and distort both).
pub fn nginx_preamble(dir: &Path, name: &str, workers: usize) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};
daemon off;
master_process on;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/{name}-tmp/body;
    proxy_temp_path {d}/{name}-tmp/proxy;
    fastcgi_temp_path {d}/{name}-tmp/fastcgi;
    uwsgi_temp_path {d}/{name}-tmp/uwsgi;
    scgi_temp_path {d}/{name}-tmp/scgi;
"
    )
}

/// The upstream: one nginx with an HTTP/1.1 listener and an h2c listener, both answering every
/// request with the same 1 KiB body from memory.
pub fn nginx_upstream_config(
    dir: &Path,
    version: (u32, u32, u32),
    workers: usize,
    h1: SocketAddr,
    h2c: SocketAddr,
) -> String {
    // 1 KiB of printable text with no characters nginx would interpret.
    let body: String = (0..BODY_BYTES)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut conf = nginx_preamble(dir, "upstream", workers);
    for (addr, proto) in [(h1, Proto::H1), (h2c, Proto::H2c)] {
        let _ = write!(
            conf,
            "    server {{
        {listen}
        default_type text/plain;
        location / {{
            return 200 \"{body}\";
        }}
    }}
",
            listen = nginx_listen(version, addr, proto)
        );
    }
    conf.push_str("}\n");
    conf
}

/// nginx as a reverse proxy: a keep-alive pool of HTTP/1.1 connections to the upstream.
pub fn nginx_proxy_config(
    dir: &Path,
    version: (u32, u32, u32),
    workers: usize,
    listen: SocketAddr,
    proto: Proto,
    upstream: SocketAddr,
) -> String {
    let mut conf = nginx_preamble(dir, "nginx-proxy", workers);
    let _ = write!(
        conf,
        "    upstream backend {{
        server {upstream};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
        listen = nginx_listen(version, listen, proto)
    );
    conf
}

pub fn haproxy_config(threads: usize, listen: SocketAddr, proto: Proto, upstream: SocketAddr) -> String {
    let h2 = match proto {
        Proto::H1 => "",
        Proto::H2c => " proto h2",
    };
    format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always

frontend bench
    bind {listen}{h2}
    default_backend upstream

backend upstream
    server up1 {upstream}{h2}
"
    )
}

/// Envoy bootstrap: one listener with an HTTP connection manager (codec AUTO: HTTP/1.1 and h2c
/// prior knowledge), one static cluster, an admin listener for `/ready`.
pub fn envoy_config(listen: SocketAddr, admin: SocketAddr, proto: Proto, upstream: SocketAddr) -> String {
    envoy_config_with_filters(listen, admin, proto, upstream, "")
}

/// [`envoy_config`] with more HTTP filters before the router: `filters` is YAML list items
/// indented to sit under `http_filters:` (10 spaces before each `- name:`).
pub fn envoy_config_with_filters(
    listen: SocketAddr,
    admin: SocketAddr,
    proto: Proto,
    upstream: SocketAddr,
    filters: &str,
) -> String {
    let upstream_h2 = match proto {
        Proto::H1 => String::new(),
        Proto::H2c => "    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"
        .to_string(),
    };
    let addr = envoy_address;
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: bench
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: upstream }}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
{upstream_h2}    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {upstream}
",
        admin = addr(admin),
        listen = addr(listen),
        upstream = addr(upstream),
    )
}

/// The server that every case ends at: nginx, or `cogmesh workload`.
pub struct Upstream {
    pub server: Server,
    pub h1: SocketAddr,
    pub h2c: SocketAddr,
}

impl Upstream {
    pub fn start(tools: &Tools, dir: &Path, workers: usize) -> Result<Upstream> {
        let h1 = loopback(free_port()?);
        let h2c = loopback(free_port()?);
        let conf = dir.join("upstream.conf");
        fs::create_dir_all(dir.join("upstream-tmp"))?;
        fs::write(
            &conf,
            nginx_upstream_config(dir, tools.nginx_version, workers, h1, h2c),
        )?;
        let server = Server::spawn(
            "upstream-nginx",
            Command::new(&tools.nginx)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("upstream.error.log")),
            dir,
        )?;
        Upstream::ready(server, h1, h2c)
    }

    /// `cogmesh workload` as the upstream instead: hyper, HTTP/1.1 and h2c on one port, 1 KiB
    /// of `x` at `/`. Its HTTP/2 sends a response's head and data in one write, where nginx's,
    /// on a connection carrying many streams, often sends the data apart and later.
    pub fn start_workload(bin: &Path, dir: &Path) -> Result<Upstream> {
        let addr = loopback(free_port()?);
        let server = Server::spawn(
            "upstream-workload",
            Command::new(bin)
                .arg("workload")
                .arg("--listen")
                .arg(addr.to_string()),
            dir,
        )?;
        Upstream::ready(server, addr, addr)
    }

    /// Once both listeners answer.
    fn ready(mut server: Server, h1: SocketAddr, h2c: SocketAddr) -> Result<Upstream> {
        wait_ready(&mut server, Duration::from_secs(15), || {
            check_h1(h1)?;
            procs::h2c_handshake(h2c, Duration::from_secs(1))
        })?;
        Ok(Upstream { server, h1, h2c })
    }

    pub fn addr(&self, proto: Proto) -> SocketAddr {
        match proto {
            Proto::H1 => self.h1,
            Proto::H2c => self.h2c,
        }
    }
}

/// One proxy (or none, for direct) serving one protocol on `listen`.
pub struct Instance {
    pub kind: Kind,
    pub proto: Proto,
    pub listen: SocketAddr,
    /// Empty for [`Kind::Direct`].
    pub server: Option<Server>,
    /// The admin address of cogmesh and Envoy.
    pub admin: Option<SocketAddr>,
}

impl Instance {
    pub fn start(
        kind: Kind,
        proto: Proto,
        workers: usize,
        upstream: &Upstream,
        tools: &Tools,
        dir: &Path,
        cogmesh_args: &[String],
    ) -> Result<Instance> {
        let up = upstream.addr(upstream_protocol(kind, proto, cogmesh_args));
        if kind == Kind::Direct {
            return Ok(Instance {
                kind,
                proto,
                listen: up,
                server: None,
                admin: None,
            });
        }
        let bin = tools
            .binary(kind)
            .with_context(|| format!("{} is not installed", kind.name()))?;
        let listen = loopback(free_port()?);
        let tag = format!("{}-{}-n{workers}", kind.name(), proto_tag(proto));
        let mut admin = None;
        let mut command = Command::new(bin);
        match kind {
            Kind::Direct => unreachable!("handled above"),
            Kind::Cogmesh => {
                let addr = loopback(free_port()?);
                admin = Some(addr);
                command
                    .arg("--listen")
                    .arg(listen.to_string())
                    .arg("--upstream")
                    .arg(up.to_string())
                    .arg("--admin")
                    .arg(addr.to_string())
                    .arg("--workers")
                    .arg(workers.to_string())
                    .args(cogmesh_args);
            }
            Kind::Envoy => {
                let addr = loopback(free_port()?);
                admin = Some(addr);
                let conf = dir.join(format!("{tag}.yaml"));
                fs::write(&conf, envoy_config(listen, addr, proto, up))?;
                command
                    .arg("-c")
                    .arg(&conf)
                    .arg("--concurrency")
                    .arg(workers.to_string())
                    .arg("--disable-hot-restart")
                    .arg("--log-level")
                    .arg("warn");
            }
            Kind::Haproxy => {
                let conf = dir.join(format!("{tag}.cfg"));
                fs::write(&conf, haproxy_config(workers, listen, proto, up))?;
                // -db: stay in the foreground, one process (threads only).
                command.arg("-db").arg("-f").arg(&conf);
            }
            Kind::Nginx => {
                let conf = dir.join(format!("{tag}.conf"));
                fs::create_dir_all(dir.join("nginx-proxy-tmp"))?;
                fs::write(
                    &conf,
                    nginx_proxy_config(dir, tools.nginx_version, workers, listen, proto, up),
                )?;
                command
                    .arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg(dir.join(format!("{tag}.error.log")));
            }
        }
        let mut server = Server::spawn(&tag, &mut command, dir)?;
        wait_ready(&mut server, Duration::from_secs(30), || {
            if let Some(admin) = admin {
                let (status, _) = procs::http1_get(admin, "/ready", Duration::from_secs(1))?;
                if status != 200 {
                    bail!("admin /ready answered {status}");
                }
            }
            match proto {
                Proto::H1 => check_h1(listen),
                Proto::H2c => procs::h2c_handshake(listen, Duration::from_secs(1)),
            }
        })?;
        Ok(Instance {
            kind,
            proto,
            listen,
            server: Some(server),
            admin,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.listen)
    }
}

fn proto_tag(proto: Proto) -> &'static str {
    match proto {
        Proto::H1 => "h1",
        Proto::H2c => "h2c",
    }
}

/// A GET through `addr` returns 200 with the upstream's 1 KiB body.
fn check_h1(addr: SocketAddr) -> Result<()> {
    let (status, body) = procs::http1_get(addr, "/", Duration::from_secs(1))?;
    if status != 200 || body.len() < BODY_BYTES {
        bail!("GET / via {addr}: status {status}, {} body bytes", body.len());
    }
    Ok(())
}

/// Waits until `probe` succeeds (at most `limit`), failing early if `server` exits.
pub fn wait_ready(server: &mut Server, limit: Duration, mut probe: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        procs::check_interrupted()?;
        server.check_alive()?;
        let err = match probe() {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after {limit:?}: {err:#}; log:\n{}",
                server.name(),
                server.log_tail(15)
            );
        }
        procs::sleep(Duration::from_millis(50))?;
    }
}

/// An address in Envoy's bootstrap YAML: `{ socket_address: { address, port_value } }`.
pub fn envoy_address(a: SocketAddr) -> String {
    format!(
        "{{ socket_address: {{ address: {}, port_value: {} }} }}",
        a.ip(),
        a.port()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        loopback(port)
    }

    #[test]
    fn nginx_versions() {
        assert_eq!(
            parse_nginx_version("nginx version: nginx/1.22.1\n"),
            Some((1, 22, 1))
        );
        assert_eq!(
            parse_nginx_version("nginx version: nginx/1.27.4 (Ubuntu)"),
            Some((1, 27, 4))
        );
        assert_eq!(parse_nginx_version("nginx version: openresty"), None);
    }

    #[test]
    fn cogmesh_upstream_protocol_reads_both_spellings_and_the_last_wins() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            cogmesh_upstream_protocol(&args(&["--protocol=http1"])),
            Some("http1")
        );
        assert_eq!(
            cogmesh_upstream_protocol(&args(&["--protocol", "http2", "--workers", "2"])),
            Some("http2")
        );
        assert_eq!(
            cogmesh_upstream_protocol(&args(&["--protocol=http2", "--protocol", "http1"])),
            Some("http1")
        );
        assert_eq!(cogmesh_upstream_protocol(&args(&["--no-http1-relay"])), None);
    }

    #[test]
    fn a_duel_puts_cogmesh_on_the_peers_upstream_protocol_unless_told_otherwise() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let none = args(&[]);
        // nginx goes out over HTTP/1.1 whatever its clients speak; so does cogmesh against it.
        assert_eq!(upstream_protocol(Kind::Nginx, Proto::H2c, &none), Proto::H1);
        assert_eq!(
            duel_cogmesh_args(Kind::Nginx, Proto::H2c, &none),
            args(&["--protocol=http1"])
        );
        assert_eq!(
            upstream_protocol(Kind::Cogmesh, Proto::H2c, &args(&["--protocol=http1"])),
            Proto::H1
        );
        // Where the peer follows the client, so does cogmesh: nothing is added.
        assert!(duel_cogmesh_args(Kind::Nginx, Proto::H1, &none).is_empty());
        assert!(duel_cogmesh_args(Kind::Envoy, Proto::H2c, &none).is_empty());
        assert!(duel_cogmesh_args(Kind::Haproxy, Proto::H2c, &none).is_empty());
        assert!(duel_cogmesh_args(Kind::Cogmesh, Proto::H2c, &none).is_empty());
        // A protocol chosen on the command line is kept, even where it differs from the peer's.
        let h2 = args(&["--protocol", "http2"]);
        assert_eq!(duel_cogmesh_args(Kind::Nginx, Proto::H2c, &h2), h2);
        assert_eq!(upstream_protocol(Kind::Cogmesh, Proto::H1, &h2), Proto::H2c);
    }

    #[test]
    fn nginx_h2c_listen_follows_the_version() {
        let a = addr(8080);
        assert_eq!(
            nginx_listen((1, 22, 1), a, Proto::H2c),
            "listen 127.0.0.1:8080 http2 reuseport;"
        );
        assert!(nginx_listen((1, 25, 1), a, Proto::H2c).contains("http2 on;"));
        assert!(!nginx_listen((1, 25, 1), a, Proto::H1).contains("http2"));
    }

    #[test]
    fn upstream_config_serves_one_kib_on_both_listeners() {
        let conf = nginx_upstream_config(Path::new("/tmp/x"), (1, 22, 1), 1, addr(1), addr(2));
        assert_eq!(conf.matches("return 200").count(), 2);
        let body = conf.split("return 200 \"").nth(1).unwrap();
        assert_eq!(body.find('"'), Some(BODY_BYTES));
        assert!(conf.contains("listen 127.0.0.1:2 http2"));
        assert!(conf.contains("worker_processes 1;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn nginx_proxy_keeps_upstream_connections() {
        let conf = nginx_proxy_config(Path::new("/tmp/x"), (1, 22, 1), 2, addr(1), Proto::H1, addr(9));
        assert!(conf.contains("worker_processes 2;"));
        assert!(conf.contains("server 127.0.0.1:9;"));
        assert!(conf.contains("keepalive 256;"));
        assert!(conf.contains("proxy_set_header Connection \"\";"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn haproxy_h2c_on_both_sides() {
        let conf = haproxy_config(2, addr(1), Proto::H2c, addr(9));
        assert!(conf.contains("nbthread 2"));
        assert!(conf.contains("bind 127.0.0.1:1 proto h2"));
        assert!(conf.contains("server up1 127.0.0.1:9 proto h2"));
        assert!(!haproxy_config(1, addr(1), Proto::H1, addr(9)).contains("proto h2"));
    }

    #[test]
    fn envoy_h2c_cluster_only_for_h2c() {
        let h1 = envoy_config(addr(1), addr(2), Proto::H1, addr(9));
        assert!(h1.contains("codec_type: AUTO"));
        assert!(h1.contains("port_value: 9"));
        assert!(!h1.contains("http2_protocol_options"));
        let h2 = envoy_config(addr(1), addr(2), Proto::H2c, addr(9));
        assert!(h2.contains("http2_protocol_options: {}"));
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.name()).unwrap(), kind);
        }
        assert!(Kind::parse("linkerd").is_err());
    }
}
