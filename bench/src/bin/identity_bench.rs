//! `identity-bench`: what the control plane's security costs. For three setups of a real
//! `cogmesh control` — `open` (no `auth`, plaintext), `token` (`auth` with bearer tokens,
//! plaintext) and `tls+token` (the same over TLS from the mesh CA) — it measures, with C
//! concurrent clients for S seconds each:
//!
//! - `admin`: `MeshAdmin.ListServices` calls (what the access layer adds per call: caller
//!   lookup, role check, rate-limit bucket);
//! - `certify`: `Identity.Certify` (CSR parse and signature check, ECDSA P-256 signing), with
//!   CSRs made beforehand so the client's key generation is not in the numbers.
//!
//! Each row: calls per second, latency p50 / p99 (µs) and the control plane's CPU per call (µs,
//! from /proc). There is no peer: no other CA or admin API is set up the same way here; the
//! `open` row is the baseline the others are compared with.
//!
//! ```text
//! cargo build --release -p cogmesh-control -p cogmesh-bench
//! target/release/identity-bench [--secs 5] [--concurrency 4] [--cogmesh-bin target/release/cogmesh]
//! ```
//!
//! Everything binds 127.0.0.1; each phase is bounded by `--secs`; the control plane is stopped
//! after each setup and dies with the bench (process group + `PR_SET_PDEATHSIG`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::procs::{free_port, loopback, Server};
use cogmesh_proto::v1::identity_client::IdentityClient;
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{CertifyRequest, ListServicesRequest};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "identity-bench")]
struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The control-plane binary.
    #[arg(long, default_value = "target/release/cogmesh")]
    cogmesh_bin: PathBuf,
}

const TOKEN: &str = "bench-operator-token-0123456789";
const WORKLOAD_TOKEN: &str = "bench-workload-token-0123456789";
const IDENTITY: &str = "spiffe://cogmesh.local/ns/bench/sa/web";

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Open,
    Token,
    TlsToken,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Open => "open",
            Setup::Token => "token",
            Setup::TlsToken => "tls+token",
        }
    }
}

struct Row {
    setup: &'static str,
    phase: &'static str,
    calls: usize,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    cpu_us_per_call: f64,
    errors: usize,
}

fn main() {
    let args = Args::parse();
    cogmesh_bench::procs::install_signal_handlers();
    let code = match run(&args) {
        Ok(rows) => {
            print_table(&args, &rows);
            0
        }
        Err(e) => {
            eprintln!("identity-bench: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args) -> Result<Vec<Row>> {
    if !args.cogmesh_bin.exists() {
        bail!(
            "{} is missing: cargo build --release -p cogmesh-control",
            args.cogmesh_bin.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let csrs = make_csrs(256)?;
    let mut rows = Vec::new();
    for setup in [Setup::Open, Setup::Token, Setup::TlsToken] {
        let dir = std::env::temp_dir().join(format!(
            "cogmesh-identity-bench-{}-{}",
            setup.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let addr = loopback(free_port()?);
        std::fs::write(dir.join("control.yaml"), control_yaml(setup, addr, &dir))?;
        let mut server = Server::spawn(
            &format!("control-{}", setup.name()),
            Command::new(&args.cogmesh_bin)
                .args(["control", "--config"])
                .arg(dir.join("control.yaml"))
                .env("COGMESH_LOG", "warn"),
            &dir,
        )?;
        wait_tcp(addr, &mut server)?;
        let result = runtime.block_on(measure(args, setup, addr, &dir, &csrs, &server));
        server.stop();
        let _ = std::fs::remove_dir_all(&dir);
        rows.extend(result?);
    }
    Ok(rows)
}

fn control_yaml(setup: Setup, addr: SocketAddr, dir: &Path) -> String {
    let mut yaml = format!(
        "listen: \"{addr}\"\nidentity:\n  ca: {{ dir: \"{}/ca\" }}\n  workloads:\n    - {{ namespace: bench, service_account: web, token: {WORKLOAD_TOKEN} }}\n",
        dir.display()
    );
    if setup == Setup::TlsToken {
        yaml.push_str("  server_names: [\"127.0.0.1\"]\n");
    }
    if setup != Setup::Open {
        yaml.push_str(&format!(
            "auth:\n  callers:\n    - {{ name: bench, role: operator, token: {TOKEN} }}\n  rate_limit: {{ requests_per_second: 1000000, burst: 1000000 }}\n"
        ));
    }
    yaml
}

fn wait_tcp(addr: SocketAddr, server: &mut Server) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        server.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 20 s", server.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// CSRs (DER) for the bench identity, made before any timing.
fn make_csrs(n: usize) -> Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| {
            cogmesh_proxy::identity::key_and_csr(IDENTITY)
                .map(|(_, csr)| csr)
                .map_err(anyhow::Error::msg)
        })
        .collect()
}

async fn channel(setup: Setup, addr: SocketAddr, dir: &Path) -> Result<Channel> {
    if setup != Setup::TlsToken {
        return Ok(Channel::from_shared(format!("http://{addr}"))?.connect().await?);
    }
    let ca = std::fs::read(dir.join("ca/ca.pem")).context("the generated CA")?;
    let tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    Ok(Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

fn with_token<T>(setup: Setup, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if setup != Setup::Open {
        let value = format!("Bearer {TOKEN}").parse().expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn measure(
    args: &Args,
    setup: Setup,
    addr: SocketAddr,
    dir: &Path,
    csrs: &[Vec<u8>],
    server: &Server,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for phase in ["admin", "certify"] {
        let mut tasks = Vec::new();
        let cpu_before = server.usage().cpu_secs;
        let start = Instant::now();
        let until = start + Duration::from_secs(args.secs);
        for c in 0..args.concurrency {
            let channel = channel(setup, addr, dir).await?;
            let csrs = csrs.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let mut admin = MeshAdminClient::new(channel.clone());
                let mut identity = IdentityClient::new(channel);
                let mut i = c;
                while Instant::now() < until {
                    let t = Instant::now();
                    let ok = if phase == "admin" {
                        admin
                            .list_services(with_token(setup, ListServicesRequest {}))
                            .await
                            .is_ok()
                    } else {
                        let request = CertifyRequest {
                            csr: csrs[i % csrs.len()].clone(),
                            identity: IDENTITY.into(),
                            token: WORKLOAD_TOKEN.into(),
                        };
                        identity.certify(request).await.is_ok()
                    };
                    i += 1;
                    if ok {
                        latencies.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await?;
            latencies.extend(l);
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = server.usage().cpu_secs - cpu_before;
        latencies.sort_unstable();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        rows.push(Row {
            setup: setup.name(),
            phase,
            calls: latencies.len(),
            per_sec: latencies.len() as f64 / elapsed,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            cpu_us_per_call: if latencies.is_empty() {
                0.0
            } else {
                cpu * 1e6 / latencies.len() as f64
            },
            errors,
        });
    }
    Ok(rows)
}

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "identity-bench: {} clients, {} s per phase, control plane {}",
        args.concurrency,
        args.secs,
        args.cogmesh_bin.display()
    );
    println!(
        "{:<10} {:<8} {:>8} {:>10} {:>9} {:>9} {:>12} {:>7}",
        "setup", "phase", "calls", "calls/s", "p50 µs", "p99 µs", "CPU µs/call", "errors"
    );
    for r in rows {
        println!(
            "{:<10} {:<8} {:>8} {:>10.0} {:>9} {:>9} {:>12.1} {:>7}",
            r.setup, r.phase, r.calls, r.per_sec, r.p50_us, r.p99_us, r.cpu_us_per_call, r.errors
        );
    }
}
