//! `tls-bench`: a sidecar pair with mTLS between them, cogmesh next to Envoy configured the same
//! way, in front of the bench's nginx upstream:
//!
//! ```text
//! client ─HTTP/1.1─► sidecar A ─mTLS (TLS 1.3)─► sidecar B ─HTTP/1.1─► nginx (1 KiB)
//! ```
//!
//! Both pairs: one worker per sidecar, TLS 1.3 only, ECDSA P-256 certificates from one test CA
//! with SPIFFE URI SANs, client certificates required by B, A checking B's SPIFFE identity, ALPN
//! `http/1.1` between them, and the cipher suite both negotiate printed in the header (each side's
//! default order puts `TLS_AES_128_GCM_SHA256` first). Interleaved rounds, medians reported:
//!
//! - added latency: p50/p99 through the pair at a fixed rate (oha, open loop with latency
//!   correction) minus the same against nginx directly;
//! - maximum throughput through the pair (wrk, closed loop);
//! - new mTLS handshakes per second on B's listener: clients that each open a connection, do a
//!   full handshake (no resumption) with A's certificate, send one request, read the response,
//!   and close, as fast as B answers (two client threads against B's one worker);
//! - CPU per request of A + B during the throughput runs, and B's CPU per handshake: steadier
//!   than the rates on a shared machine.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench
//! target/release/tls-bench            # 3 rounds of 5 s windows, about 2 minutes
//! target/release/tls-bench --quick    # 1 round of 2 s windows, about 20 s
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::load::{ClosedLoop, Oha};
use cogmesh_bench::peers::{repo_root, wait_ready, Kind, Proto, Tools, Upstream};
use cogmesh_bench::procs::{self, free_port, loopback, Server};
use cogmesh_bench::report::median;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_ID: &str = "spiffe://cogmesh.bench/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cogmesh.bench/ns/default/sa/client";

#[derive(Parser, Debug)]
#[command(name = "tls-bench", about = "mTLS sidecar pair: cogmesh vs Envoy")]
struct Args {
    /// One round of 2 s windows.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measurement window.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Requests per second of the latency runs (below what either pair saturates at on a
    /// busy 2-core machine, so the numbers are latency, not queueing).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Connections of the throughput runs.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// The cogmesh-proxy binary (default target/release/cogmesh-proxy).
    #[arg(long)]
    cogmesh: Option<PathBuf>,
    /// Concurrent clients of the handshake runs.
    #[arg(long, default_value_t = 8)]
    handshake_clients: usize,
}

fn main() -> ExitCode {
    procs::install_signal_handlers();
    let args = Args::parse();
    ExitCode::from(procs::exit_code("tls-bench", run(&args)))
}

/// The certificates of the run, as files.
struct Pki {
    ca: PathBuf,
    a: (PathBuf, PathBuf),
    b: (PathBuf, PathBuf),
}

fn make_pki(dir: &Path) -> Result<Pki> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "tls-bench CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    let leaf = |name: &str, id: &str| -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names.push(SanType::URI(id.try_into()?));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let sub = dir.join(name);
        fs::create_dir_all(&sub)?;
        fs::write(sub.join("cert.pem"), cert.pem())?;
        fs::write(sub.join("key.pem"), key.serialize_pem())?;
        fs::write(sub.join("ca.pem"), ca.pem())?;
        Ok((sub.join("cert.pem"), sub.join("key.pem")))
    };
    let a = leaf("a", CLIENT_ID)?;
    let b = leaf("b", SERVER_ID)?;
    let ca_path = dir.join("ca.pem");
    fs::write(&ca_path, ca.pem())?;
    Ok(Pki { ca: ca_path, a, b })
}

/// One sidecar pair: the client talks to `a`, which originates mTLS to `b`.
struct Pair {
    kind: Kind,
    a: SocketAddr,
    b: SocketAddr,
    /// B, then A.
    servers: Vec<Server>,
}

impl Pair {
    /// CPU seconds used so far by (B, A).
    fn cpu(&self) -> (f64, f64) {
        (self.servers[0].usage().cpu_secs, self.servers[1].usage().cpu_secs)
    }
}

fn start_cogmesh(tools: &Tools, dir: &Path, pki: &Pki, upstream: SocketAddr) -> Result<Pair> {
    let bin = tools
        .binary(Kind::Cogmesh)
        .context("target/release/cogmesh-proxy is not built")?;
    let (a, b) = (loopback(free_port()?), loopback(free_port()?));
    let (a_admin, b_admin) = (loopback(free_port()?), loopback(free_port()?));
    let b_yaml = format!(
        "admin: \"{b_admin}\"\nworkers: 1\ntls: {{ identity_dir: \"{}\" }}\nlisteners:\n  - {{ name: inbound, address: \"{b}\", direction: inbound, default_service: app, tls: {{ client_auth: required }} }}\nservices:\n  - {{ name: app, endpoints: [\"{upstream}\"] }}\n",
        pki.b.0.parent().unwrap().display()
    );
    let a_yaml = format!(
        "admin: \"{a_admin}\"\nworkers: 1\ntls: {{ identity_dir: \"{}\" }}\nlisteners:\n  - {{ name: outbound, address: \"{a}\", default_service: b }}\nservices:\n  - {{ name: b, endpoints: [\"{b}\"], tls: {{ identity: \"{SERVER_ID}\" }} }}\n",
        pki.a.0.parent().unwrap().display()
    );
    let mut sidecars = Vec::new();
    for (name, yaml, admin) in [("cogmesh-b", b_yaml, b_admin), ("cogmesh-a", a_yaml, a_admin)] {
        let conf = dir.join(format!("{name}.yaml"));
        fs::write(&conf, yaml)?;
        let mut command = Command::new(bin);
        command.arg("--config").arg(&conf).env("COGMESH_LOG", "warn");
        sidecars.push((name, command, admin));
    }
    launch(Kind::Cogmesh, (a, b), sidecars, dir)
}

/// The `common_tls_context` both Envoys share: TLS 1.3 only, a certificate, the CA bundle.
fn envoy_tls_context(
    cert: &Path,
    key: &Path,
    ca: &Path,
    alpn: &str,
    indent: usize,
    san: Option<&str>,
) -> String {
    let pad = " ".repeat(indent);
    let san = san.map_or(String::new(), |id| {
        format!("{pad}    match_typed_subject_alt_names:\n{pad}    - san_type: URI\n{pad}      matcher: {{ exact: \"{id}\" }}\n")
    });
    format!(
        "{pad}common_tls_context:\n\
         {pad}  tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n\
         {pad}  alpn_protocols: [{alpn}]\n\
         {pad}  tls_certificates:\n\
         {pad}  - certificate_chain: {{ filename: \"{}\" }}\n\
         {pad}    private_key: {{ filename: \"{}\" }}\n\
         {pad}  validation_context:\n\
         {pad}    trusted_ca: {{ filename: \"{}\" }}\n{san}",
        cert.display(),
        key.display(),
        ca.display()
    )
}

/// An Envoy bootstrap: one HTTP listener (TLS with `listener_tls`) routing to one cluster (TLS
/// with `cluster_tls`).
fn envoy_bootstrap(
    admin: SocketAddr,
    listen: SocketAddr,
    listener_tls: &str,
    cluster: SocketAddr,
    cluster_tls: &str,
) -> String {
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: sidecar
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: sidecar
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: next }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{listener_tls}  clusters:
  - name: next
    type: STATIC
    connect_timeout: 2s
{cluster_tls}    load_assignment:
      cluster_name: next
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {cluster}
",
        admin = cogmesh_bench::peers::envoy_address(admin),
        listen = cogmesh_bench::peers::envoy_address(listen),
        cluster = cogmesh_bench::peers::envoy_address(cluster),
    )
}

fn start_envoy(tools: &Tools, dir: &Path, pki: &Pki, upstream: SocketAddr) -> Result<Pair> {
    let bin = tools
        .binary(Kind::Envoy)
        .context("envoy is not installed (bench/setup.sh)")?;
    let (a, b) = (loopback(free_port()?), loopback(free_port()?));
    let (a_admin, b_admin) = (loopback(free_port()?), loopback(free_port()?));
    let b_tls = format!(
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n{}",
        envoy_tls_context(&pki.b.0, &pki.b.1, &pki.ca, "\"h2\", \"http/1.1\"", 10, None)
    );
    let a_tls = format!(
        "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
        envoy_tls_context(&pki.a.0, &pki.a.1, &pki.ca, "\"http/1.1\"", 8, Some(SERVER_ID))
    );
    let mut sidecars = Vec::new();
    for (name, yaml, admin) in [
        (
            "envoy-b",
            envoy_bootstrap(b_admin, b, &b_tls, upstream, ""),
            b_admin,
        ),
        ("envoy-a", envoy_bootstrap(a_admin, a, "", b, &a_tls), a_admin),
    ] {
        let conf = dir.join(format!("{name}.yaml"));
        fs::write(&conf, yaml)?;
        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(&conf)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .args(["--base-id", &free_port()?.to_string()]);
        sidecars.push((name, command, admin));
    }
    launch(Kind::Envoy, (a, b), sidecars, dir)
}

/// Starts the sidecars (B first) and waits until each admin `/ready` answers 200 and a request
/// through A reaches nginx.
fn launch(
    kind: Kind,
    (a, b): (SocketAddr, SocketAddr),
    sidecars: Vec<(&str, Command, SocketAddr)>,
    dir: &Path,
) -> Result<Pair> {
    let mut servers = Vec::new();
    for (name, mut command, admin) in sidecars {
        let mut server = Server::spawn(name, &mut command, dir)?;
        wait_ready(&mut server, Duration::from_secs(30), || {
            let (status, _) = procs::http1_get(admin, "/ready", Duration::from_secs(1))?;
            if status != 200 {
                bail!("/ready answered {status}");
            }
            Ok(())
        })?;
        servers.push(server);
    }
    check_pair(&mut servers, a)?;
    Ok(Pair { kind, a, b, servers })
}

/// A request through the pair reaches nginx.
fn check_pair(servers: &mut [Server], a: SocketAddr) -> Result<()> {
    let last = servers.len() - 1;
    wait_ready(&mut servers[last], Duration::from_secs(15), || {
        let (status, body) = procs::http1_get(a, "/", Duration::from_secs(2))?;
        if status != 200 || body.len() < cogmesh_bench::peers::BODY_BYTES {
            bail!("GET / through the pair: status {status}, {} bytes", body.len());
        }
        Ok(())
    })
}

/// The TLS 1.3 suites in the order sidecar A offers them.
const TLS13_SUITES_OFFERED: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// The protocol version and cipher suite `openssl s_client` negotiates with B when it offers
/// the suites in A's order.
fn negotiated(b: SocketAddr, pki: &Pki) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-brief", "-connect", &b.to_string()])
        // The order both A's offer (rustls as cogmesh sets it up, BoringSSL in Envoy).
        .args(["-ciphersuites", TLS13_SUITES_OFFERED])
        .arg("-cert")
        .arg(&pki.a.0)
        .arg("-key")
        .arg(&pki.a.1)
        .arg("-CAfile")
        .arg(&pki.ca)
        .stdin(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        return "? (openssl not found)".into();
    };
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    format!(
        "{} {} ({})",
        field("Protocol version:"),
        field("Ciphersuite:"),
        field("Server Temp Key:")
    )
}

/// Full mTLS handshakes (plus one request each) per second against `b`.
fn handshakes_per_sec(b: SocketAddr, pki: &Pki, clients: usize, window: Duration) -> Result<(f64, u64)> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A's order: AES-128-GCM first.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(cert?)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&pki.a.0)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.a.1)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // Two client threads against B's one worker: the server, not the client, sets the pace.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (connector, done, failed) = (connector.clone(), Arc::clone(&done), Arc::clone(&failed));
                tokio::spawn(async move {
                    while start.elapsed() < window {
                        let once = async {
                            let tcp = tokio::net::TcpStream::connect(b).await?;
                            // As the sidecars do: no Nagle delay between handshake and request.
                            tcp.set_nodelay(true)?;
                            let name = ServerName::try_from("localhost").expect("a DNS name");
                            let mut tls = connector.connect(name, tcp).await?;
                            tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                                .await?;
                            // Read one whole response (by its length: servers differ in
                            // how soon they close after `Connection: close`), then hang up.
                            let mut response = Vec::new();
                            let mut chunk = [0u8; 4096];
                            loop {
                                let n = tls.read(&mut chunk).await?;
                                if n == 0 {
                                    return Err(std::io::Error::other("closed before the response ended"));
                                }
                                response.extend_from_slice(&chunk[..n]);
                                if response_complete(&response)? {
                                    break;
                                }
                            }
                            Ok::<_, std::io::Error>(())
                        };
                        match tokio::time::timeout(Duration::from_secs(5), once).await {
                            Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    let secs = start.elapsed().as_secs_f64();
    Ok((
        done.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    ))
}

/// Whether `buf` holds a whole `200` response with a `content-length` body.
fn response_complete(buf: &[u8]) -> std::io::Result<bool> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(false);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other(format!("not a 200: {head}")));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no content-length"))?;
    Ok(buf.len() >= end + 4 + length)
}

#[derive(Default)]
struct Samples {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps: Vec<f64>,
    handshakes: Vec<f64>,
    /// CPU µs of A + B per request in the throughput runs.
    cpu_per_request_us: Vec<f64>,
    /// CPU µs of B per handshake (and its one request).
    cpu_per_handshake_us: Vec<f64>,
    errors: u64,
}

fn run(args: &Args) -> Result<()> {
    let (rounds, window) = if args.quick {
        (1, Duration::from_secs(2))
    } else {
        (args.rounds.max(1), Duration::from_secs(args.seconds.max(1)))
    };
    let repo = repo_root();
    let tools = Tools::find(&repo, args.cogmesh.as_deref())?;
    let dir = std::env::temp_dir().join(format!("cogmesh-tls-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let pki = make_pki(&dir)?;
    let upstream = Upstream::start(&tools, &dir, 1)?;
    let pairs = [
        start_cogmesh(&tools, &dir, &pki, upstream.h1)?,
        start_envoy(&tools, &dir, &pki, upstream.h1)?,
    ];
    let oha = Oha {
        bin: &tools.oha,
        connections: 16,
        threads: 1,
    };
    let wrk = ClosedLoop {
        wrk: &tools.wrk,
        h2load: None,
        connections: args.connections,
        threads: 1,
    };
    let direct_url = format!("http://{}/", upstream.h1);
    let mut direct = Samples::default();
    let mut by_pair: Vec<Samples> = pairs.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        eprintln!("tls-bench: round {}/{rounds}", round + 1);
        let latency = oha.open_loop(&direct_url, Proto::H1, args.rate, window, &dir)?;
        direct.p50_us.push(latency.p50_us);
        direct.p99_us.push(latency.p99_us);
        direct
            .rps
            .push(wrk.run(&direct_url, Proto::H1, window, &dir)?.rps);
        // Alternate which pair goes first, so neither always follows the other's load.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (pair, samples) = (&pairs[i], &mut by_pair[i]);
            let url = format!("http://{}/", pair.a);
            let latency = oha.open_loop(&url, Proto::H1, args.rate, window, &dir)?;
            samples.p50_us.push(latency.p50_us);
            samples.p99_us.push(latency.p99_us);
            samples.errors += latency.failed;
            let before = pair.cpu();
            let throughput = wrk.run(&url, Proto::H1, window, &dir)?;
            let after = pair.cpu();
            let requests = throughput.requests.max(1) as f64;
            samples
                .cpu_per_request_us
                .push((after.0 - before.0 + after.1 - before.1) * 1e6 / requests);
            samples.rps.push(throughput.rps);
            samples.errors += throughput.errors;
            let before = pair.cpu();
            let (rate, failed) = handshakes_per_sec(pair.b, &pki, args.handshake_clients, window)?;
            let b_cpu = pair.cpu().0 - before.0;
            samples
                .cpu_per_handshake_us
                .push(b_cpu * 1e6 / (rate * window.as_secs_f64()).max(1.0));
            samples.handshakes.push(rate);
            samples.errors += failed;
            eprintln!(
                "  {:<8} p50 {:.0} µs, p99 {:.0} µs, {:.0} rps, {rate:.0} handshakes/s",
                pair.kind.name(),
                latency.p50_us,
                latency.p99_us,
                throughput.rps
            );
        }
    }

    let m = |v: &[f64]| median(v.to_vec()).unwrap_or(f64::NAN);
    let (d50, d99) = (m(&direct.p50_us), m(&direct.p99_us));
    println!("tls-bench: client → A → mTLS (TLS 1.3, client certificates, SPIFFE identity checked) → B → nginx, 1 KiB");
    println!(
        "one worker per sidecar; {rounds} round(s) of {} s, medians; latency at {} rps over 16 connections; throughput with {} connections; handshakes with {} clients",
        window.as_secs(),
        args.rate,
        args.connections,
        args.handshake_clients
    );
    for pair in &pairs {
        println!(
            "  {:<8} B negotiates: {}",
            pair.kind.name(),
            negotiated(pair.b, &pki)
        );
    }
    println!(
        "  direct: p50 {d50:.0} µs, p99 {d99:.0} µs, {:.0} rps",
        m(&direct.rps)
    );
    println!();
    let (c, e) = (&by_pair[0], &by_pair[1]);
    let rows = [
        (
            "added latency p50 (µs)",
            m(&c.p50_us) - d50,
            m(&e.p50_us) - d50,
            false,
        ),
        (
            "added latency p99 (µs)",
            m(&c.p99_us) - d99,
            m(&e.p99_us) - d99,
            false,
        ),
        ("p99 through the pair (µs)", m(&c.p99_us), m(&e.p99_us), false),
        ("max throughput (rps)", m(&c.rps), m(&e.rps), true),
        (
            "CPU µs per request (A + B)",
            m(&c.cpu_per_request_us),
            m(&e.cpu_per_request_us),
            false,
        ),
        (
            "new mTLS handshakes/s on B",
            m(&c.handshakes),
            m(&e.handshakes),
            true,
        ),
        (
            "CPU µs per handshake (B)",
            m(&c.cpu_per_handshake_us),
            m(&e.cpu_per_handshake_us),
            false,
        ),
    ];
    println!(
        "| {:<28} | {:>10} | {:>10} | {:>14} | {:>6} |",
        "metric", "cogmesh", "envoy", "cogmesh/envoy", "better"
    );
    println!("|{:-<30}|{:->12}|{:->12}|{:->16}|{:->8}|", "", "", "", "", "");
    for (name, cog, env, higher_is_better) in rows {
        let better = if higher_is_better { cog > env } else { cog < env };
        // An added p99 can come out below zero when the direct run's own tail was worse.
        let ratio = if cog > 0.0 && env > 0.0 {
            format!("{:.2}", cog / env)
        } else {
            "-".to_string()
        };
        println!(
            "| {name:<28} | {cog:>10.0} | {env:>10.0} | {ratio:>14} | {:>6} |",
            if better { "cogmesh" } else { "envoy" }
        );
    }
    println!("errors: cogmesh {}, envoy {}", c.errors, e.errors);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}
