//! `cache-bench`: what per-route compression and caching cost and give, cogmesh against Envoy.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench
//! target/release/cache-bench [--secs 3] [--connections 32]
//! ```
//!
//! One nginx origin serves two static JSON files, 1 KiB and 100 KiB, with
//! `Cache-Control: max-age=3600`, `ETag` and `Last-Modified`. In front of it, one at a time and a
//! fresh process each (one worker: cogmesh `workers: 1`, Envoy `--concurrency 1`), every proxy
//! runs in three modes:
//!
//! - `plain`: forwarding only;
//! - `gzip`: response compression, gzip only (cogmesh `compression: { encodings: [gzip] }` at
//!   level 6; Envoy's `compressor` filter with its gzip library at its default level), JSON, at
//!   least 1024 bytes; the client sends `Accept-Encoding: gzip`;
//! - `cache`: cogmesh `cache: {}`; Envoy's `cache` filter with `SimpleHttpCache`; warmed by the
//!   readiness probe, which checks that the second response carries `Age`.
//!
//! Each (proxy, mode, size) is one closed-loop run, `oha -c C -z D` (JSON output): requests per
//! second and p99 as the client saw them, and the proxy's CPU time per request (utime + stime of
//! its process over the run). `direct` (the origin without a proxy) is the reference
//! line. The table shows both proxies side by side, cogmesh ÷ Envoy, and the cache hit path
//! against the uncached (`plain`) one per proxy and size, in throughput and in CPU per request
//! (on a saturated 2-core machine the client caps throughput, so CPU per request is the fairer
//! measure); the issue's target is ≥ 2× for cogmesh (printed, never asserted).
//!
//! cogmesh runs with `http1_relay: false` in all three modes, so `plain` is the request path
//! the cache and the compressor live on and the ratio is what they change on it. Routes without
//! a policy normally take the relay, which forwards a plain request at about half that path's
//! CPU (see `proxy-bench`).
//!
//! Client, proxies and origin share the machine: the CPU other processes used during each run is
//! printed, and a run with more than 0.25 core of it is marked disturbed. Ports are picked at run
//! time on 127.0.0.1, every load run is bounded, and every process started is stopped, also on
//! error and Ctrl-C.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::load::{Latency, Oha};
use cogmesh_bench::peers::{self, Proto, Tools};
use cogmesh_bench::procs::{self, loopback, Server};
use cogmesh_bench::report::DISTURBED_CORES;

#[derive(Debug, Clone, Parser)]
#[command(name = "cache-bench", about = "Compression and caching: cogmesh vs Envoy")]
pub struct Options {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Seconds of unmeasured load before each run.
    #[arg(long, default_value_t = 0.5)]
    pub warmup_secs: f64,
    /// Client connections (closed loop).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// The cogmesh-proxy binary [default: target/release/cogmesh-proxy].
    #[arg(long)]
    pub cogmesh_bin: Option<PathBuf>,
    /// Keep configs, logs and oha output.
    #[arg(long)]
    pub keep_temp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Direct,
    Cogmesh,
    Envoy,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Cogmesh => "cogmesh",
            Proxy::Envoy => "envoy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Gzip,
    Cache,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Plain, Mode::Gzip, Mode::Cache];

    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Gzip => "gzip",
            Mode::Cache => "cache (warm)",
        }
    }

    fn headers(self) -> &'static [&'static str] {
        match self {
            Mode::Gzip => &["accept-encoding: gzip"],
            _ => &[],
        }
    }
}

/// The two bodies: file name and size.
const SIZES: [(&str, usize); 2] = [("1k.json", 1024), ("100k.json", 100 * 1024)];

struct Run {
    proxy: Proxy,
    mode: Mode,
    size: usize,
    result: Result<Latency, String>,
    /// The proxy's CPU time per request during the run, µs.
    cpu_us: Option<f64>,
    foreign_cores: f64,
}

pub fn main_with_args() -> u8 {
    procs::install_signal_handlers();
    let options = Options::parse();
    procs::exit_code("cache-bench", run(&options))
}

fn run(options: &Options) -> Result<()> {
    let bin = options.cogmesh_bin.as_deref();
    peers::with_work_dir("cogmesh-cache-bench", bin, options.keep_temp, |tools, dir| {
        run_in(options, tools, dir)
    })
}

fn run_in(options: &Options, tools: &Tools, dir: &Path) -> Result<()> {
    println!(
        "cogmesh cache bench: {} s closed-loop runs, {} connections, HTTP/1.1, loopback, one worker per proxy",
        options.secs, options.connections
    );
    for line in tools.versions() {
        if line.starts_with("oha")
            || line.starts_with("envoy")
            || line.starts_with("cogmesh")
            || line.starts_with("nginx")
        {
            println!("  {line}");
        }
    }
    let (busy0, total0) = procs::machine_cpu_secs();
    procs::sleep(Duration::from_secs(1))?;
    let (busy1, total1) = procs::machine_cpu_secs();
    println!(
        "  CPU busy before the run: {:.0} % of the machine",
        (busy1 - busy0) / (total1 - total0).max(1e-9) * 100.0
    );

    let origin = start_origin(tools, dir)?;
    let oha = Oha {
        bin: &tools.oha,
        connections: options.connections,
        threads: 0,
    };
    let duration = Duration::from_secs_f64(options.secs.clamp(0.5, 60.0));
    let warmup = Duration::from_secs_f64(options.warmup_secs.clamp(0.0, 10.0));
    let mut runs = Vec::new();
    let mut plan = vec![(Proxy::Direct, Mode::Plain)];
    for proxy in [Proxy::Cogmesh, Proxy::Envoy] {
        if proxy == Proxy::Envoy && tools.envoy.is_none() {
            println!("  envoy: not installed, skipped");
            continue;
        }
        plan.extend(Mode::ALL.map(|m| (proxy, m)));
    }
    let started = Instant::now();
    for (proxy, mode) in plan {
        let case_dir = dir.join(format!(
            "{}-{}",
            proxy.name(),
            mode.name().split(' ').next().unwrap_or("x")
        ));
        fs::create_dir_all(&case_dir)?;
        let front = match Front::start(proxy, mode, tools, origin.1, &case_dir) {
            Ok(front) => front,
            Err(err) => {
                for (_, size) in SIZES {
                    runs.push(Run {
                        proxy,
                        mode,
                        size,
                        result: Err(format!("{err:#}")),
                        cpu_us: None,
                        foreign_cores: 0.0,
                    });
                }
                continue;
            }
        };
        for (file, size) in SIZES {
            let url = format!("http://{}/{file}", front.listen);
            let (result, cpu_us, foreign_cores) =
                measure(&oha, &url, mode, warmup, duration, &front, &origin.0, &case_dir);
            procs::check_interrupted()?;
            let run = Run {
                proxy,
                mode,
                size,
                result: result.map_err(|e| format!("{e:#}")),
                cpu_us,
                foreign_cores,
            };
            eprintln!("[{:>4.0}s] {}", started.elapsed().as_secs_f64(), summary(&run));
            runs.push(run);
        }
    }
    drop(origin);
    print!("{}", render(&runs));
    Ok(())
}

/// One measured run (after a warm-up): its latency, the proxy's CPU µs per request, and the CPU
/// other processes used meanwhile, in cores.
#[allow(clippy::too_many_arguments)]
fn measure(
    oha: &Oha,
    url: &str,
    mode: Mode,
    warmup: Duration,
    duration: Duration,
    front: &Front,
    origin: &Server,
    dir: &Path,
) -> (Result<Latency>, Option<f64>, f64) {
    if !warmup.is_zero() {
        if let Err(err) = oha.closed_loop(url, Proto::H1, warmup, mode.headers(), dir) {
            return (Err(err.context("warm-up")), None, 0.0);
        }
    }
    let proxy_cpu = || front.server.as_ref().map(|s| s.usage().cpu_secs);
    let proxy0 = proxy_cpu();
    let ours = || {
        procs::own_cpu_secs()
            + origin.usage().cpu_secs
            + front.server.as_ref().map_or(0.0, |s| s.usage().cpu_secs)
    };
    let (machine0, ours0, t0) = (procs::machine_cpu_secs().0, ours(), Instant::now());
    let result = oha.closed_loop(url, Proto::H1, duration, mode.headers(), dir);
    let machine = procs::machine_cpu_secs().0 - machine0;
    let foreign = ((machine - (ours() - ours0)) / t0.elapsed().as_secs_f64().max(1e-3)).max(0.0);
    let cpu_us = match (&result, proxy0, proxy_cpu()) {
        (Ok(l), Some(before), Some(after)) => Some((after - before) * 1e6 / (l.ok + l.failed).max(1) as f64),
        _ => None,
    };
    let result = result.and_then(|latency| {
        if latency.ok == 0 || latency.failed > latency.ok / 100 {
            bail!(
                "{} ok, {} failed: {}",
                latency.ok,
                latency.failed,
                latency.failures
            );
        }
        Ok(latency)
    });
    (result, cpu_us, foreign)
}

// === the origin and the proxies ===

/// nginx serving `www/1k.json` and `www/100k.json` as cacheable JSON; returns it and its address.
fn start_origin(tools: &Tools, dir: &Path) -> Result<(Server, SocketAddr)> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::create_dir_all(dir.join("origin-tmp"))?;
    for (file, size) in SIZES {
        fs::write(www.join(file), json_body(size))?;
    }
    let addr = loopback(procs::free_port()?);
    let mut conf = peers::nginx_preamble(dir, "origin", 1);
    let _ = write!(
        conf,
        "    server {{
        listen {addr} reuseport;
        default_type application/json;
        root {www};
        add_header Cache-Control \"max-age=3600\";
    }}
}}
",
        www = www.display()
    );
    let path = dir.join("origin.conf");
    fs::write(&path, conf)?;
    let mut server = Server::spawn(
        "origin-nginx",
        Command::new(&tools.nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("origin.error.log")),
        dir,
    )?;
    peers::wait_ready(&mut server, Duration::from_secs(15), || {
        let (status, head, body) = get(addr, "/1k.json", &[])?;
        if status != 200 || body.len() != 1024 || !head.contains("etag:") {
            bail!("origin: status {status}, {} bytes", body.len());
        }
        Ok(())
    })?;
    Ok((server, addr))
}

/// Deterministic JSON of exactly `size` bytes: an array of small records, padded with spaces.
fn json_body(size: usize) -> Vec<u8> {
    let mut out = String::from("[");
    let mut i = 0;
    loop {
        let record = format!(
            "{{\"id\":{i},\"name\":\"item-{i}\",\"score\":{},\"tags\":[\"a\",\"b\"]}}",
            i * 7 % 101
        );
        if out.len() + record.len() + 2 > size {
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&record);
        i += 1;
    }
    out.push(']');
    while out.len() < size {
        out.push(' ');
    }
    out.into_bytes()
}

/// The proxy in front of the origin for one (proxy, mode); `server` is `None` for direct.
struct Front {
    listen: SocketAddr,
    server: Option<Server>,
}

impl Front {
    fn start(proxy: Proxy, mode: Mode, tools: &Tools, origin: SocketAddr, dir: &Path) -> Result<Front> {
        if proxy == Proxy::Direct {
            return Ok(Front {
                listen: origin,
                server: None,
            });
        }
        let listen = loopback(procs::free_port()?);
        let admin = loopback(procs::free_port()?);
        let mut command;
        if proxy == Proxy::Cogmesh {
            let policy = match mode {
                Mode::Plain => "",
                Mode::Gzip => "\n    compression: { encodings: [gzip], content_types: [application/json], min_size: 1024 }",
                Mode::Cache => "\n    cache: {}",
            };
            let conf = dir.join("proxy.yaml");
            fs::write(
                &conf,
                format!(
                    "admin: \"{admin}\"
workers: 1
http1_relay: false
listeners:
  - {{ name: bench, address: \"{listen}\", default_service: origin }}
services:
  - {{ name: origin, endpoints: [\"{origin}\"] }}
routes:
  - name: bench
    service: origin{policy}
"
                ),
            )?;
            command = Command::new(tools.cogmesh.as_ref().context("cogmesh-proxy not built")?);
            command.arg("--config").arg(&conf).env("COGMESH_LOG", "warn");
        } else {
            let filters = match mode {
                Mode::Plain => "",
                Mode::Gzip => ENVOY_GZIP,
                Mode::Cache => ENVOY_CACHE,
            };
            let conf = dir.join("envoy.yaml");
            fs::write(
                &conf,
                peers::envoy_config_with_filters(listen, admin, Proto::H1, origin, filters),
            )?;
            command = Command::new(tools.envoy.as_ref().context("envoy not installed")?);
            command.arg("-c").arg(&conf).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]);
        }
        let mut server = Server::spawn(proxy.name(), &mut command, dir)?;
        peers::wait_ready(&mut server, Duration::from_secs(30), || {
            let (status, _, _) = get(admin, "/ready", &[])?;
            if status != 200 {
                bail!("admin /ready answered {status}");
            }
            check_mode(listen, mode)
        })?;
        Ok(Front {
            listen,
            server: Some(server),
        })
    }
}

/// Envoy's compressor filter: gzip for JSON of at least 1024 bytes.
const ENVOY_GZIP: &str = "          - name: envoy.filters.http.compressor
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor
              response_direction_config:
                common_config:
                  min_content_length: 1024
                  content_type: [application/json]
              compressor_library:
                name: gzip
                typed_config:
                  \"@type\": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip
";

/// Envoy's cache filter with its in-memory `SimpleHttpCache`.
const ENVOY_CACHE: &str = "          - name: envoy.filters.http.cache
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.cache.v3.CacheConfig
              typed_config:
                \"@type\": type.googleapis.com/envoy.extensions.http.cache.simple_http_cache.v3.SimpleHttpCacheConfig
";

/// The proxy does what the mode says: the 100 KiB body arrives gzip-encoded and smaller, or the
/// second request for each file is a cache hit (`Age`). Also warms the cache.
fn check_mode(listen: SocketAddr, mode: Mode) -> Result<()> {
    for (file, size) in SIZES {
        let path = format!("/{file}");
        let (status, head, body) = get(listen, &path, mode.headers())?;
        if status != 200 {
            bail!("GET {path} answered {status}");
        }
        match mode {
            Mode::Plain if body.len() != size => bail!("GET {path}: {} bytes", body.len()),
            Mode::Gzip if !head.contains("content-encoding: gzip") || body.len() >= size => {
                bail!(
                    "GET {path} with gzip: not compressed ({} bytes)\n{head}",
                    body.len()
                )
            }
            Mode::Cache => {
                let (_, head, _) = get(listen, &path, &[])?;
                if !head.contains("\nage:") {
                    bail!("GET {path} twice: the second response has no Age (not cached)\n{head}");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One HTTP/1.1 GET with `Connection: close`: status, lower-cased head, raw body bytes.
fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> Result<(u16, String, Vec<u8>)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let (status, body) = procs::parse_http1_response(&response)?;
    let head_len = response.len() - body.len();
    let head = String::from_utf8_lossy(&response[..head_len]).to_ascii_lowercase();
    Ok((status, head, body))
}

// === the report ===

fn summary(run: &Run) -> String {
    let size = if run.size >= 1024 * 100 {
        "100 KiB"
    } else {
        "1 KiB"
    };
    match &run.result {
        Ok(l) => format!(
            "{:<8} {:<13} {size:<8} {:>8.0} req/s  p99 {:>7.0} µs  CPU {:>5} µs/req  (other CPU {:.2} cores)",
            run.proxy.name(),
            run.mode.name(),
            l.rps,
            l.p99_us,
            run.cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
            run.foreign_cores
        ),
        Err(e) => format!(
            "{:<8} {:<13} {size:<8} failed: {e}",
            run.proxy.name(),
            run.mode.name()
        ),
    }
}

fn find(runs: &[Run], proxy: Proxy, mode: Mode, size: usize) -> Option<&Run> {
    runs.iter()
        .find(|r| r.proxy == proxy && r.mode == mode && r.size == size && r.result.is_ok())
}

fn rps(run: Option<&Run>) -> Option<f64> {
    run.and_then(|r| r.result.as_ref().ok()).map(|l| l.rps)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// req/s, p99 µs and CPU µs per request of one run.
fn cell(run: Option<&Run>) -> String {
    match run.and_then(|r| Some((r.result.as_ref().ok()?, r.cpu_us))) {
        Some((l, cpu)) => format!(
            "{:>8.0} {:>8.0} {:>7}",
            l.rps,
            l.p99_us,
            cpu.map_or("-".into(), |c| format!("{c:.1}"))
        ),
        None => format!("{:>8} {:>8} {:>7}", "-", "-", "-"),
    }
}

fn size_label(size: usize) -> &'static str {
    if size >= 100 * 1024 {
        "100 KiB"
    } else {
        "1 KiB"
    }
}

/// The table: per mode and size, cogmesh and Envoy req/s, p99 and CPU per request, cogmesh ÷
/// Envoy (req/s); then the cache hit path against the uncached one.
fn render(runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nClosed loop: req/s, p99 µs, proxy CPU µs per request (ratio: cogmesh ÷ envoy req/s)\n"
    );
    let _ = writeln!(
        out,
        "{:<8} {:<13} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>7} | {:>6}",
        "body", "mode", "cogmesh", "p99", "CPU", "envoy", "p99", "CPU", "ratio"
    );
    let _ = writeln!(out, "{}", "-".repeat(88));
    for (_, size) in SIZES {
        let label = size_label(size);
        if let Some(d) = find(runs, Proxy::Direct, Mode::Plain, size) {
            let _ = writeln!(
                out,
                "{label:<8} {:<13} | {} | (no proxy)",
                "direct",
                cell(Some(d))
            );
        }
        for mode in Mode::ALL {
            let c = find(runs, Proxy::Cogmesh, mode, size);
            let e = find(runs, Proxy::Envoy, mode, size);
            let _ = writeln!(
                out,
                "{label:<8} {:<13} | {} | {} | {:>6}",
                mode.name(),
                cell(c),
                cell(e),
                ratio(rps(c), rps(e))
            );
        }
    }
    let _ = writeln!(
        out,
        "\nCache hit path vs uncached (plain): throughput ×, and CPU per request ÷ (target for cogmesh: ≥ 2):\n"
    );
    for (_, size) in SIZES {
        let hit = |p| {
            let cache = find(runs, p, Mode::Cache, size);
            let plain = find(runs, p, Mode::Plain, size);
            let cpu = |r: Option<&Run>| r.and_then(|r| r.cpu_us);
            format!(
                "{:>5} req/s, {:>5} CPU",
                ratio(rps(cache), rps(plain)),
                ratio(cpu(plain), cpu(cache))
            )
        };
        let _ = writeln!(
            out,
            "  {:<8} cogmesh {}   envoy {}",
            size_label(size),
            hit(Proxy::Cogmesh),
            hit(Proxy::Envoy)
        );
    }
    let disturbed: Vec<String> = runs
        .iter()
        .filter(|r| r.foreign_cores > DISTURBED_CORES)
        .map(|r| {
            format!(
                "{} {} {} B ({:.2} cores)",
                r.proxy.name(),
                r.mode.name(),
                r.size,
                r.foreign_cores
            )
        })
        .collect();
    if !disturbed.is_empty() {
        let _ = writeln!(
            out,
            "\nDisturbed (other processes used more than {DISTURBED_CORES} core): {}",
            disturbed.join("; ")
        );
    }
    let failed: Vec<String> = runs.iter().filter(|r| r.result.is_err()).map(summary).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nFailed runs:\n  {}", failed.join("\n  "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_have_the_exact_size() {
        for (_, size) in SIZES {
            let body = json_body(size);
            assert_eq!(body.len(), size);
            assert!(body.starts_with(b"[{\"id\":0,"));
            let text = String::from_utf8(body).unwrap();
            assert!(text.trim_end().ends_with("}]"), "{}", &text[text.len() - 20..]);
        }
    }

    #[test]
    fn envoy_filters_sit_before_the_router() {
        let a = loopback(1);
        for filters in [ENVOY_GZIP, ENVOY_CACHE] {
            let conf = peers::envoy_config_with_filters(a, a, Proto::H1, a, filters);
            if let Some(path) = std::env::var_os("CACHE_BENCH_DUMP") {
                fs::write(PathBuf::from(path).join(format!("{}.yaml", filters.len())), &conf).unwrap();
            }
            let filter = conf.find(filters.lines().next().unwrap()).unwrap();
            let router = conf.find("- name: envoy.filters.http.router").unwrap();
            assert!(filter < router, "{conf}");
        }
    }

    #[test]
    fn the_table_has_ratios() {
        let latency = |rps| Latency {
            rps,
            p99_us: 500.0,
            ok: 1,
            ..Latency::default()
        };
        let runs: Vec<Run> = [
            (Proxy::Cogmesh, Mode::Plain, 10_000.0),
            (Proxy::Cogmesh, Mode::Cache, 25_000.0),
            (Proxy::Envoy, Mode::Plain, 8_000.0),
            (Proxy::Envoy, Mode::Cache, 12_000.0),
        ]
        .into_iter()
        .map(|(proxy, mode, rps)| Run {
            proxy,
            mode,
            size: 1024,
            result: Ok(latency(rps)),
            cpu_us: Some(1e6 / rps),
            foreign_cores: 0.0,
        })
        .collect();
        let table = render(&runs);
        assert!(
            table.contains("1 KiB    cogmesh  2.50 req/s,  2.50 CPU   envoy  1.50 req/s,  1.50 CPU"),
            "{table}"
        );
        assert!(table.contains("1.25"), "{table}");
    }
}
