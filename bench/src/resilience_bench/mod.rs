//! `resilience-bench`: how exactly cogmesh's rate limiter holds its rate, next to Envoy's local
//! rate limit filter, and what priority admission does for critical traffic under overload.
//!
//! (a) Rate-limit accuracy. One nginx upstream (1 KiB from memory); in front of it, in turn,
//!     `cogmesh-proxy` with a listener `rate_limit` of 1000 req/s (burst 100) and Envoy with
//!     `envoy.filters.http.local_ratelimit` at the same rate (100 tokens every 100 ms, bucket of
//!     100), one worker each. `oha` offers 3000 req/s open loop for the window (10 s, `--quick`
//!     3 s); the admitted rate is the 200s over the window, its error the distance from 1000 in
//!     %, raw and with the initial burst (100) taken out.
//! (b) Overload with priorities. One `cogmesh workload` with 8 slots and a fixed 20 ms service
//!     time (capacity 400 req/s, queue 64); cogmesh in front with `admission: max_concurrency 8`.
//!     Offered 2× capacity — 160 req/s `critical` and 640 req/s `normal` from two oha processes at
//!     once — with admission and without; and `critical` alone (unloaded) for reference. Printed:
//!     success (200s) and p99 per priority, and critical p99 relative to unloaded.
//! (c) Fault run. Three `cogmesh workload` upstreams (`/sleep?ms=5`); in front, in turn, cogmesh
//!     (`retry: max_attempts 3`, outlier detection: 5 consecutive failures) and Envoy configured
//!     the same way (`retry_on: connect-failure,reset,5xx`, 2 retries on other hosts, outlier
//!     detection with 5 consecutive 5xx / gateway failures), one worker each, fresh upstreams for
//!     each. 400 req/s open loop for the window; a third of the way in, one upstream is killed
//!     (SIGKILL). Printed: success % and p50/p99 for each, and the ratios.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-control -p cogmesh-bench
//! target/release/resilience-bench [--quick]
//! ```
//!
//! A report, not a test: nothing compares a number with a threshold.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::load::{Latency, Oha};
use cogmesh_bench::peers::{self, envoy_address, Proto, Tools, Upstream};
use cogmesh_bench::procs::{self, Server};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "resilience-bench",
    about = "Rate-limit accuracy vs Envoy, priority admission under overload, and an upstream kill vs Envoy"
)]
pub struct Options {
    /// Short windows: 3 s instead of 10 s.
    #[arg(long)]
    pub quick: bool,
    /// Measurement window in seconds [default: 10, quick: 3].
    #[arg(long)]
    pub window_secs: Option<f64>,
    /// Configured rate limit, requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Offered load as a multiple of the rate limit.
    #[arg(long, default_value_t = 3)]
    pub overload: u32,
    /// Token bucket size of both limiters.
    #[arg(long, default_value_t = 100)]
    pub burst: u32,
    /// Skip part (b), priority admission.
    #[arg(long)]
    pub skip_priority: bool,
    /// Skip part (c), the upstream kill.
    #[arg(long)]
    pub skip_fault: bool,
    /// Keep the temp dir with configs, logs and raw oha output.
    #[arg(long)]
    pub keep_temp: bool,
}

pub fn main_with_args() -> u8 {
    procs::install_signal_handlers();
    let options = Options::parse();
    procs::exit_code("resilience-bench", run(&options))
}

pub fn run(options: &Options) -> Result<()> {
    let window =
        Duration::from_secs_f64(
            options
                .window_secs
                .unwrap_or(if options.quick { 3.0 } else { 10.0 }),
        );
    if window.is_zero() || window > Duration::from_secs(120) || options.rate == 0 || options.burst == 0 {
        bail!("the window must be within (0, 120] s, and rate and burst above 0");
    }
    let repo = peers::repo_root();
    let tools = Tools::find(&repo, None)?;
    let proxy = tools
        .cogmesh
        .clone()
        .context("target/release/cogmesh-proxy is not built")?;
    let dir = std::env::temp_dir().join(format!("cogmesh-resilience-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = run_in(options, &tools, &proxy, window, &dir);
    if options.keep_temp || (result.is_err() && !procs::interrupted()) {
        eprintln!("configs, logs and raw output kept in {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(options: &Options, tools: &Tools, proxy: &Path, window: Duration, dir: &Path) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "resilience bench: {cores} CPU cores, loopback, window {:.0} s",
        window.as_secs_f64()
    );
    for line in tools.versions() {
        println!("  {line}");
    }
    let offered = options.rate * options.overload;
    println!(
        "\n(a) rate-limit accuracy: limit {} req/s (burst {}), offered {offered} req/s open loop, HTTP/1.1",
        options.rate, options.burst
    );
    let upstream = Upstream::start(tools, dir, 1)?;
    let oha = Oha {
        bin: &tools.oha,
        connections: 64,
        threads: 1,
    };
    let mut rows = Vec::new();
    let cogmesh_yaml = format!(
        "admin: \"{{admin}}\"\nlisteners:\n  - name: bench\n    address: \"{{listen}}\"\n    default_service: nginx\n    \
         rate_limit: {{ requests_per_second: {}, burst: {} }}\nservices:\n  - {{ name: nginx, endpoints: [\"{}\"] }}\n",
        options.rate, options.burst, upstream.h1
    );
    let limited = start_cogmesh(proxy, &cogmesh_yaml, dir, "cogmesh-ratelimit")?;
    rows.push((
        "cogmesh",
        limit_run(&oha, &limited.url("/"), offered, window, options, dir, "cogmesh")?,
    ));
    drop(limited);
    match &tools.envoy {
        Some(envoy) => {
            let e = start_envoy(envoy, upstream.h1, options, dir)?;
            rows.push((
                "envoy",
                limit_run(&oha, &e.url("/"), offered, window, options, dir, "envoy")?,
            ));
        }
        None => println!("  envoy: not installed, skipped"),
    }
    drop(upstream);
    println!(
        "\n| proxy | offered req/s | admitted | admitted req/s | error % | error % without burst | 429s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {} | {:.1} | {:+.2} | {:+.2} | {} |",
            r.offered_rps, r.admitted, r.admitted_rps, r.error_pct, r.steady_error_pct, r.refused
        );
    }
    if let [(_, c), (_, e)] = rows.as_slice() {
        println!(
            "\ncogmesh ÷ envoy: admitted {:.3}, |error| {:.2}",
            c.admitted as f64 / e.admitted.max(1) as f64,
            c.error_pct.abs() / e.error_pct.abs().max(1e-9)
        );
    }
    if !options.skip_priority {
        priority_runs(tools, proxy, window, dir)?;
    }
    if !options.skip_fault {
        fault_runs(tools, proxy, window, dir)?;
    }
    println!("\nshared 2-core machine: client, proxy and upstream compete for the same cores; other builds may run beside the bench");
    Ok(())
}

struct LimitRow {
    offered_rps: f64,
    admitted: u64,
    admitted_rps: f64,
    error_pct: f64,
    steady_error_pct: f64,
    refused: u64,
}

fn limit_run(
    oha: &Oha,
    url: &str,
    offered: u32,
    window: Duration,
    options: &Options,
    dir: &Path,
    tag: &str,
) -> Result<LimitRow> {
    let work = dir.join(tag);
    fs::create_dir_all(&work)?;
    let r = oha.open_loop(url, Proto::H1, offered, window, &work)?;
    let secs = window.as_secs_f64();
    let rate = f64::from(options.rate);
    let admitted_rps = r.ok as f64 / secs;
    let steady = r.ok.saturating_sub(u64::from(options.burst)) as f64 / secs;
    let refused = status_count(&work, "429");
    eprintln!("  {tag}: {} ok, {} other ({})", r.ok, r.failed, r.failures);
    Ok(LimitRow {
        offered_rps: (r.ok + r.failed) as f64 / secs,
        admitted: r.ok,
        admitted_rps,
        error_pct: (admitted_rps - rate) / rate * 100.0,
        steady_error_pct: (steady - rate) / rate * 100.0,
        refused,
    })
}

/// How many responses of `code` the last oha run in `dir` got (from its JSON report).
fn status_count(dir: &Path, code: &str) -> u64 {
    fs::read_to_string(dir.join("oha.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t.trim()).ok())
        .and_then(|j| j.pointer(&format!("/statusCodeDistribution/{code}"))?.as_u64())
        .unwrap_or(0)
}

/// A proxy process and where it listens; stopped when dropped.
struct Running {
    _server: Server,
    listen: SocketAddr,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }
}

fn start_cogmesh(bin: &Path, yaml: &str, dir: &Path, tag: &str) -> Result<Running> {
    let listen = procs::loopback(procs::free_port()?);
    let admin = procs::loopback(procs::free_port()?);
    let conf = dir.join(format!("{tag}.yaml"));
    fs::write(
        &conf,
        yaml.replace("{listen}", &listen.to_string())
            .replace("{admin}", &admin.to_string()),
    )?;
    let mut command = Command::new(bin);
    command.arg("--config").arg(&conf).env("COGMESH_LOG", "warn");
    let server = Server::spawn(tag, &mut command, dir)?;
    wait_until(server, listen, Some(admin))
}

fn start_envoy(bin: &Path, upstream: SocketAddr, options: &Options, dir: &Path) -> Result<Running> {
    let (rate, burst) = (options.rate, options.burst);
    let config =
        |listen, admin, _: &[SocketAddr]| envoy_rate_limit_config(listen, admin, upstream, rate, burst);
    start_envoy_with(bin, &config, &[upstream], dir, "envoy-ratelimit")
}

/// Waits until the admin port (if any) says ready and the listener accepts connections.
fn wait_until(mut server: Server, listen: SocketAddr, admin: Option<SocketAddr>) -> Result<Running> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        procs::check_interrupted()?;
        server.check_alive()?;
        let ready = admin.is_none_or(|a| {
            matches!(
                procs::http1_get(a, "/ready", Duration::from_secs(1)),
                Ok((200, _))
            )
        });
        if ready && std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(1)).is_ok() {
            // Let the bucket fill again after the readiness probes.
            procs::sleep(Duration::from_millis(300))?;
            return Ok(Running {
                _server: server,
                listen,
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after 30 s; log:\n{}",
                server.name(),
                server.log_tail(15)
            );
        }
        procs::sleep(Duration::from_millis(50))?;
    }
}

/// Envoy with `local_ratelimit` at `rate` req/s: `burst` tokens, refilled in 10 steps a second.
fn envoy_rate_limit_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    rate: u32,
    burst: u32,
) -> String {
    let addr = envoy_address;
    let per_fill = (rate / 10).max(1);
    format!(
        r#"admin:
  address: {admin}
static_resources:
  listeners:
  - name: limited
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: limited
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: local_rate_limit
              token_bucket: {{ max_tokens: {burst}, tokens_per_fill: {per_fill}, fill_interval: 0.1s }}
              filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_enabled }}
              filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_enforced }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {up} }}
"#,
        admin = addr(admin),
        listen = addr(listen),
        up = addr(upstream),
    )
}

/// The workload's slots and service time: capacity 400 req/s.
const SLOTS: u32 = 8;
const SERVICE_MS: u32 = 20;

fn priority_runs(tools: &Tools, proxy: &Path, window: Duration, dir: &Path) -> Result<()> {
    let capacity = SLOTS * 1000 / SERVICE_MS;
    let critical_rps = capacity * 2 / 5; // 20 % of 2× capacity
    let normal_rps = capacity * 8 / 5;
    println!(
        "\n(b) overload: workload {SLOTS} slots × {SERVICE_MS} ms fixed (capacity {capacity} req/s, queue 64); \
         offered {critical_rps} critical + {normal_rps} normal req/s; admission max_concurrency {SLOTS}"
    );
    let workload_bin = tools.repo.join("target/release/cogmesh");
    if !workload_bin.exists() {
        println!("  {} is not built: skipped", workload_bin.display());
        return Ok(());
    }
    let addr = procs::loopback(procs::free_port()?);
    let mut command = Command::new(&workload_bin);
    command
        .args(["workload", "--listen", &addr.to_string(), "--name", "w"])
        .args(["--capacity", &SLOTS.to_string(), "--queue", "64"])
        .args([
            "--service-time-ms",
            &SERVICE_MS.to_string(),
            "--service-time-dist",
            "fixed",
        ])
        .args(["--log-level", "warn"]);
    let workload = Server::spawn("workload", &mut command, dir)?;
    let _workload = wait_until(workload, addr, None)?;
    let yaml = |admission: bool| {
        let limit = if admission {
            format!("admission: {{ max_concurrency: {SLOTS} }}\n")
        } else {
            String::new()
        };
        format!(
            "admin: \"{{admin}}\"\n{limit}listeners:\n  - {{ name: bench, address: \"{{listen}}\", default_service: w }}\n\
             services:\n  - {{ name: w, endpoints: [\"{addr}\"] }}\n"
        )
    };
    let oha = |connections| Oha {
        bin: &tools.oha,
        connections,
        threads: 1,
    };
    let critical = ["x-cogmesh-priority: critical"];
    let normal = ["x-cogmesh-priority: normal"];

    let p = start_cogmesh(proxy, &yaml(true), dir, "cogmesh-admission-unloaded")?;
    let work = dir.join("unloaded");
    fs::create_dir_all(&work)?;
    let unloaded =
        oha(32).open_loop_with_headers(&p.url("/work"), Proto::H1, critical_rps, window, &work, &critical)?;
    drop(p);

    let mut rows = vec![("unloaded", "critical", critical_rps, unloaded.clone())];
    for (label, admission) in [("no admission", false), ("admission", true)] {
        let p = start_cogmesh(
            proxy,
            &yaml(admission),
            dir,
            &format!("cogmesh-{}", label.replace(' ', "-")),
        )?;
        let url = p.url("/work");
        let (crit_dir, norm_dir) = (
            dir.join(format!("{label}-critical")),
            dir.join(format!("{label}-normal")),
        );
        fs::create_dir_all(&crit_dir)?;
        fs::create_dir_all(&norm_dir)?;
        let (c, n) = std::thread::scope(|s| {
            let c = s.spawn(|| {
                oha(32).open_loop_with_headers(&url, Proto::H1, critical_rps, window, &crit_dir, &critical)
            });
            let n = s.spawn(|| {
                oha(128).open_loop_with_headers(&url, Proto::H1, normal_rps, window, &norm_dir, &normal)
            });
            (c.join(), n.join())
        });
        let c = c.map_err(|_| anyhow::anyhow!("oha thread panicked"))??;
        let n = n.map_err(|_| anyhow::anyhow!("oha thread panicked"))??;
        rows.push((label, "critical", critical_rps, c));
        rows.push((label, "normal", normal_rps, n));
    }
    println!("\n| case | priority | offered req/s | success % | p99 ms | p99 ÷ unloaded critical p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    for (case, priority, rps, r) in &rows {
        println!(
            "| {case} | {priority} | {rps} | {:.1} | {:.1} | {:.2} |",
            success_pct(r),
            r.p99_us / 1e3,
            r.p99_us / unloaded.p99_us.max(1.0)
        );
    }
    Ok(())
}

fn success_pct(r: &Latency) -> f64 {
    r.ok as f64 / (r.ok + r.failed).max(1) as f64 * 100.0
}

/// Offered load of the fault run.
const FAULT_RPS: u32 = 400;

fn fault_runs(tools: &Tools, proxy: &Path, window: Duration, dir: &Path) -> Result<()> {
    println!(
        "\n(c) fault run: 3 workload upstreams (/sleep?ms=5), {FAULT_RPS} req/s open loop for {:.0} s, one upstream killed after {:.1} s",
        window.as_secs_f64(),
        window.as_secs_f64() / 3.0
    );
    let workload_bin = tools.repo.join("target/release/cogmesh");
    if !workload_bin.exists() {
        println!("  {} is not built: skipped", workload_bin.display());
        return Ok(());
    }
    let mut rows: Vec<(&str, Latency)> = Vec::new();
    let proxies: [&str; 2] = ["cogmesh", "envoy"];
    for name in proxies {
        if name == "envoy" && tools.envoy.is_none() {
            println!("  envoy: not installed, skipped");
            continue;
        }
        let mut upstreams = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..3 {
            let addr = procs::loopback(procs::free_port()?);
            let mut command = Command::new(&workload_bin);
            command
                .args([
                    "workload",
                    "--listen",
                    &addr.to_string(),
                    "--name",
                    &format!("w{i}"),
                ])
                .args(["--log-level", "warn"]);
            let server = Server::spawn(&format!("{name}-upstream-{i}"), &mut command, dir)?;
            upstreams.push(wait_until(server, addr, None)?);
            addrs.push(addr);
        }
        let running = match (name, &tools.envoy) {
            ("envoy", Some(envoy)) => {
                start_envoy_with(envoy, &envoy_fault_config, &addrs, dir, "envoy-fault")?
            }
            _ => {
                let endpoints: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
                let yaml = format!(
                    "admin: \"{{admin}}\"\nlisteners:\n  - {{ name: bench, address: \"{{listen}}\", default_service: w }}\n\
                     services:\n  - name: w\n    endpoints: [{}]\n    retry: {{ max_attempts: 3 }}\n    \
                     outlier_detection: {{ consecutive_failures: 5, max_ejection_percent: 50 }}\n",
                    endpoints.join(", ")
                );
                start_cogmesh(proxy, &yaml, dir, "cogmesh-fault")?
            }
        };
        let work = dir.join(format!("{name}-fault"));
        fs::create_dir_all(&work)?;
        let victim = upstreams.remove(1);
        let url = running.url("/sleep?ms=5");
        let oha = Oha {
            bin: &tools.oha,
            connections: 64,
            threads: 1,
        };
        let result = std::thread::scope(|s| {
            let load = s.spawn(|| oha.open_loop(&url, Proto::H1, FAULT_RPS, window, &work));
            let killer = s.spawn(move || {
                let mut victim = victim;
                let killed = procs::sleep(window / 3).map(|()| {
                    let pgid = victim._server.pid();
                    // SAFETY: signalling our own child's process group.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                });
                victim._server.stop();
                killed
            });
            (load.join(), killer.join())
        });
        let (load, killed) = result;
        killed.map_err(|_| anyhow::anyhow!("killer thread panicked"))??;
        let r = load.map_err(|_| anyhow::anyhow!("oha thread panicked"))??;
        eprintln!("  {name}: {} ok, {} failed ({})", r.ok, r.failed, r.failures);
        rows.push((name, r));
    }
    println!("\n| proxy | requests | success % | failed | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {} | {:.2} | {} | {:.2} | {:.2} |",
            r.ok + r.failed,
            success_pct(r),
            r.failed,
            r.p50_us / 1e3,
            r.p99_us / 1e3
        );
    }
    if let [(_, c), (_, e)] = rows.as_slice() {
        println!(
            "\ncogmesh ÷ envoy: failed requests {:.2}, p99 {:.2}",
            c.failed as f64 / e.failed.max(1) as f64,
            c.p99_us / e.p99_us.max(1.0)
        );
    }
    Ok(())
}

/// Envoy with `config(listen, admin, upstreams)`, one worker.
fn start_envoy_with(
    bin: &Path,
    config: &dyn Fn(SocketAddr, SocketAddr, &[SocketAddr]) -> String,
    upstreams: &[SocketAddr],
    dir: &Path,
    tag: &str,
) -> Result<Running> {
    let listen = procs::loopback(procs::free_port()?);
    let admin = procs::loopback(procs::free_port()?);
    let conf = dir.join(format!("{tag}.yaml"));
    fs::write(&conf, config(listen, admin, upstreams))?;
    let mut command = Command::new(bin);
    command.arg("-c").arg(&conf).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]);
    let server = Server::spawn(tag, &mut command, dir)?;
    wait_until(server, listen, Some(admin))
}

/// Envoy set up as the fault run's cogmesh: 2 retries on other hosts after connect failures,
/// resets and 5xx; outlier detection after 5 consecutive 5xx or gateway failures.
fn envoy_fault_config(listen: SocketAddr, admin: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let endpoints: String = upstreams
        .iter()
        .map(|u| format!("        - endpoint: {{ address: {} }}\n", envoy_address(*u)))
        .collect();
    format!(
        r#"admin:
  address: {admin}
static_resources:
  listeners:
  - name: fault
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: fault
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: upstream
                  retry_policy:
                    retry_on: connect-failure,reset,5xx
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 3
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    outlier_detection:
      consecutive_5xx: 5
      consecutive_gateway_failure: 5
      enforcing_consecutive_gateway_failure: 100
      max_ejection_percent: 50
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        admin = envoy_address(admin),
        listen = envoy_address(listen),
    )
}
