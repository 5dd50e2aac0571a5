//! `transparent-bench`: what transparent interception costs, against a direct connection and
//! against the same proxy addressed explicitly. Needs root (network namespaces, iptables).
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench
//! sudo target/release/transparent-bench [--secs 3] [--connections 32] [--rounds 2]
//! ```
//!
//! Two network namespaces joined by a veth pair (addresses in 198.18.0.0/24, inside them
//! only): the "server pod" runs nginx answering 1 KiB from memory on 198.18.0.2:8080; the
//! "client pod" runs the load generator (oha, closed loop, HTTP/1.1 keep-alive) and one
//! cogmesh-proxy (one worker) in four modes, a fresh process each:
//!
//! - `direct`: no proxy, no iptables rules;
//! - `explicit`: the client calls the proxy's listener (`--listen`, `--upstream`), no rules;
//! - `transparent`: `cogmesh-proxy init` rules; the client calls 198.18.0.2:8080, the outbound
//!   listener reads the original destination, detects HTTP/1 and serves it through the normal
//!   request path pinned to the service that endpoint belongs to;
//! - `transparent_tcp`: the same with port 8080 in `opaque_ports`: no detection, bytes spliced.
//!
//! Per mode it prints requests per second, p50 / p99 as the client saw them, the proxy's CPU
//! time per request (utime + stime over the run) and the ratio of each to `explicit` (the cost of
//! capture itself: `SO_ORIGINAL_DST`, the peek, the NAT). Several rounds interleave the modes;
//! the table shows medians. Every run is bounded, every process is stopped and the namespaces
//! removed at the end, also on error and Ctrl-C.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::load::{Latency, Oha};
use cogmesh_bench::peers::{self, Proto};
use cogmesh_bench::procs::{self, Server};
use cogmesh_bench::report::median;
use cogmesh_e2e::netns::{in_ns, Pods, SERVER_IP};

const PROXY_UID: &str = "2102";
const ORIGIN_PORT: u16 = 8080;
const EXPLICIT_LISTEN: &str = "127.0.0.1:4150";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "transparent-bench",
    about = "Transparent interception: its cost over direct and explicit proxying"
)]
struct Options {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Client connections (closed loop).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Interleaved rounds over every mode.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The cogmesh-proxy binary [default: target/release/cogmesh-proxy].
    #[arg(long)]
    cogmesh_bin: Option<PathBuf>,
    /// The oha binary [default: .tools/bin/oha].
    #[arg(long)]
    oha_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Explicit,
    Transparent,
    TransparentTcp,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Direct,
        Mode::Explicit,
        Mode::Transparent,
        Mode::TransparentTcp,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
            Mode::TransparentTcp => "transparent_tcp",
        }
    }
}

/// One measured run of a mode.
struct Run {
    latency: Latency,
    cpu_us_per_request: Option<f64>,
}

struct Bench {
    options: Options,
    pods: Pods,
    dir: PathBuf,
    cogmesh: PathBuf,
    /// A script that runs oha inside the client namespace.
    oha: PathBuf,
}

impl Bench {
    fn run(&self, mode: Mode) -> Result<Run> {
        let rules = matches!(mode, Mode::Transparent | Mode::TransparentTcp);
        if rules {
            let mut init = in_ns(&self.pods.client, &self.cogmesh);
            let out = init
                .args(["init", "--ipv4-only", "--proxy-uid", PROXY_UID])
                .output()?;
            if !out.status.success() {
                bail!("cogmesh-proxy init: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let result = self.measure(mode);
        if rules {
            let _ = in_ns(&self.pods.client, &self.cogmesh)
                .args(["init", "--ipv4-only", "--remove"])
                .output();
        }
        result
    }

    fn measure(&self, mode: Mode) -> Result<Run> {
        let origin = format!("{SERVER_IP}:{ORIGIN_PORT}");
        let opaque = if mode == Mode::TransparentTcp {
            "[8080]"
        } else {
            "[]"
        };
        let config = match mode {
            Mode::Direct => None,
            Mode::Explicit => Some(format!(
                "admin: 127.0.0.1:4191\nlisteners:\n  - {{ name: outbound, address: {EXPLICIT_LISTEN}, default_service: web }}\n\
                 services:\n  - {{ name: web, endpoints: [{origin}] }}\n"
            )),
            Mode::Transparent | Mode::TransparentTcp => Some(format!(
                "admin: 127.0.0.1:4191\nlisteners:\n  - {{ name: outbound, address: 127.0.0.1:4140 }}\n\
                 services:\n  - {{ name: web, endpoints: [{origin}] }}\n\
                 transparent:\n  listeners: [outbound]\n  opaque_ports: {opaque}\n"
            )),
        };
        let proxy = match config {
            None => None,
            Some(yaml) => {
                let path = self.dir.join(format!("{}.yaml", mode.name()));
                std::fs::write(&path, yaml)?;
                let mut cmd = in_ns(&self.pods.client, Path::new("setpriv"));
                cmd.args([
                    &format!("--reuid={PROXY_UID}"),
                    &format!("--regid={PROXY_UID}"),
                    "--clear-groups",
                    "--",
                ])
                .arg(&self.cogmesh)
                .args(["--workers", "1", "--log-level", "warn", "--config"])
                .arg(&path);
                let mut server = Server::spawn(&format!("cogmesh-{}", mode.name()), &mut cmd, &self.dir)?;
                self.wait_ready(&mut server)?;
                Some(server)
            }
        };
        let url = match mode {
            Mode::Explicit => format!("http://{EXPLICIT_LISTEN}/"),
            _ => format!("http://{origin}/"),
        };
        let oha = Oha {
            bin: &self.oha,
            connections: self.options.connections,
            threads: 1,
        };
        // Warm-up: connections and pools open, the proxy's first allocations made.
        oha.closed_loop(&url, Proto::H1, Duration::from_millis(500), &[], &self.dir)?;
        let before = proxy.as_ref().map(Server::usage);
        let latency = oha.closed_loop(
            &url,
            Proto::H1,
            Duration::from_secs_f64(self.options.secs),
            &[],
            &self.dir,
        )?;
        let cpu = match (&proxy, before) {
            (Some(p), Some(b)) => Some(p.usage().cpu_secs - b.cpu_secs),
            _ => None,
        };
        if latency.ok == 0 || latency.failed > 0 {
            bail!(
                "{}: {} ok, {} failed: {}",
                mode.name(),
                latency.ok,
                latency.failed,
                latency.failures
            );
        }
        let requests = latency.rps * self.options.secs;
        Ok(Run {
            cpu_us_per_request: cpu.map(|c| c * 1e6 / requests.max(1.0)),
            latency,
        })
    }

    fn wait_ready(&self, server: &mut Server) -> Result<()> {
        wait_until(server, &self.pods.client, "http://127.0.0.1:4191/ready")
    }
}

/// Waits until `url` answers 2xx from inside `ns` (and `server` still runs), at most 10 s.
fn wait_until(server: &mut Server, ns: &str, url: &str) -> Result<()> {
    for _ in 0..200 {
        server.check_alive()?;
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-sf", "-o", "/dev/null", url])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(());
        }
        procs::sleep(Duration::from_millis(50))?;
    }
    bail!("{} not answering {url} within 10 s", server.name())
}

fn main() -> std::process::ExitCode {
    procs::install_signal_handlers();
    let options = Options::parse();
    std::process::ExitCode::from(procs::exit_code("transparent-bench", run(options)))
}

fn run(options: Options) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cogmesh = options
        .cogmesh_bin
        .clone()
        .unwrap_or_else(|| root.join("target/release/cogmesh-proxy"));
    let oha_bin = options
        .oha_bin
        .clone()
        .unwrap_or_else(|| root.join(".tools/bin/oha"));
    for (what, path) in [("cogmesh-proxy", &cogmesh), ("oha", &oha_bin)] {
        if !path.exists() {
            bail!(
                "{what} not found at {} (bench/setup.sh, cargo build --release)",
                path.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("cogmesh-transparent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pods = Pods::create("cmb").map_err(anyhow::Error::msg)?;

    // The origin: nginx in the server namespace, 1 KiB from memory.
    let body: String = (0..1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut conf = peers::nginx_preamble(&dir, "origin", 1);
    let _ = write!(
        conf,
        "    server {{\n        listen {SERVER_IP}:{ORIGIN_PORT} reuseport backlog=4096;\n        default_type text/plain;\n        \
         location / {{ return 200 \"{body}\"; }}\n    }}\n}}\n"
    );
    std::fs::create_dir_all(dir.join("origin-tmp"))?;
    let conf_path = dir.join("origin.conf");
    std::fs::write(&conf_path, conf)?;
    let mut nginx = in_ns(&pods.server, Path::new("nginx"));
    nginx
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("origin.error.log"));
    let mut origin = Server::spawn("origin", &mut nginx, &dir)?;
    wait_until(
        &mut origin,
        &pods.client,
        &format!("http://{SERVER_IP}:{ORIGIN_PORT}/"),
    )?;

    let oha = dir.join("oha-in-netns.sh");
    std::fs::write(
        &oha,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            pods.client,
            oha_bin.display()
        ),
    )?;
    std::fs::set_permissions(&oha, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let bench = Bench {
        options: options.clone(),
        pods,
        dir: dir.clone(),
        cogmesh,
        oha,
    };

    let mut runs: Vec<(Mode, Run)> = Vec::new();
    for round in 0..options.rounds {
        for mode in Mode::ALL {
            let r = bench
                .run(mode)
                .with_context(|| format!("round {round}, {}", mode.name()))?;
            eprintln!(
                "round {round} {:<16} {:>8.0} rps  p99 {:>6.0} µs  cpu/req {}",
                mode.name(),
                r.latency.rps,
                r.latency.p99_us,
                r.cpu_us_per_request.map_or("-".into(), |c| format!("{c:.1} µs"))
            );
            runs.push((mode, r));
        }
    }
    print!("{}", render(&runs, &options));
    drop(bench);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn render(runs: &[(Mode, Run)], options: &Options) -> String {
    let med = |mode: Mode, f: &dyn Fn(&Run) -> Option<f64>| {
        median(
            runs.iter()
                .filter(|(m, _)| *m == mode)
                .filter_map(|(_, r)| f(r))
                .collect(),
        )
    };
    let rps = |m| med(m, &|r: &Run| Some(r.latency.rps));
    let cpu = |m| med(m, &|r: &Run| r.cpu_us_per_request);
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ntransparent-bench: HTTP/1.1 keep-alive, 1 KiB, {} connections, {} s runs, median of {} rounds, 1 proxy worker\n",
        options.connections, options.secs, options.rounds
    );
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:>9} {:>9} {:>12} {:>14} {:>16}",
        "mode", "rps", "p50 µs", "p99 µs", "cpu/req µs", "rps ÷ explicit", "cpu ÷ explicit"
    );
    for mode in Mode::ALL {
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:>9} {:>9} {:>12} {:>14} {:>16}",
            mode.name(),
            fmt(rps(mode), 0),
            fmt(med(mode, &|r: &Run| Some(r.latency.p50_us)), 0),
            fmt(med(mode, &|r: &Run| Some(r.latency.p99_us)), 0),
            fmt(cpu(mode), 1),
            ratio(rps(mode), rps(Mode::Explicit)),
            ratio(cpu(mode), cpu(Mode::Explicit)),
        );
    }
    out
}
