//! Side-by-side benchmark of the cogmesh proxy core against no proxy and three peers.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench \
//!     && target/release/proxy-bench [--quick]
//! ```
//! (or `bench/run.sh [--quick]`, which does exactly that).
//!
//! One run on one machine: a single nginx upstream answers every request with a 1 KiB body from
//! memory, on an HTTP/1.1 listener and an h2c (HTTP/2 prior knowledge) listener. In front of it, in
//! turn: direct (no proxy), `cogmesh-proxy`, Envoy, HAProxy and nginx as a reverse proxy, each with
//! the same N workers (threads or processes), for every N in `--workers` (default 1 and 2). For each
//! proxy, N and protocol, a fresh proxy process is started, checked with a real request through it,
//! and measured:
//!
//! 1. latency added over direct at a fixed rate: `oha -q 1000 --latency-correction` (open loop),
//!    p50 / p99 / p99.9, for HTTP/1.1 and h2c, as proxied minus the direct case of the same round;
//! 2. maximum throughput: closed loop, `wrk -c 64 -t 2` (HTTP/1.1; h2c with `--h2c-throughput`,
//!    by h2load), and the ratio of cogmesh to each peer;
//! 3. CPU seconds per 1000 requests (utime + stime from `/proc/PID/stat`, summed over all the
//!    proxy's processes, before and after each run) and RSS: idle (VmRSS once ready) and peak under
//!    load (VmHWM), summed over processes;
//! 4. the issue's targets, one row each: the verdict on the medians, and in how many rounds the
//!    target held between that round's own samples;
//! 5. with `--head-to-head`: cogmesh and each peer at the same time, each under its own open-loop
//!    client, so that both tails come from the same seconds of a noisy machine (and a target row
//!    per protocol in 4), and a sign test over the rounds: whether cogmesh was lower (or higher)
//!    in more of them than chance. `--head-to-head-only` runs this table alone, so that enough
//!    rounds for the test fit in the time.
//!
//! Everything repeats in R interleaved rounds (default 3, the proxy order rotating each round) and
//! the tables show medians: single runs on a small machine are noisy. Ports are picked at run time
//! on 127.0.0.1, every load run is bounded in time, and every process started is stopped and reaped,
//! also on error and on Ctrl-C. The defaults take about 10 minutes, `--quick` about 2.
//!
//! This is a report, not a test: nothing here compares a number with a threshold.

pub mod load;
pub mod peers;
pub mod procs;
pub mod report;
pub mod scaling_sim;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::load::{ClosedLoop, Latency, Oha};
use crate::peers::{Instance, Kind, Proto, Tools, Upstream};
use crate::report::{Duel, RateDuel, Sample, Setup};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "proxy-bench",
    about = "Side-by-side benchmark: direct vs cogmesh-proxy vs Envoy vs HAProxy vs nginx",
    long_about = None
)]
pub struct Options {
    /// About 2 minutes: 1 round, 3 s runs, 0.5 s warm-up (explicit flags still win).
    #[arg(long)]
    pub quick: bool,
    /// Interleaved rounds; tables report medians [default: 3, quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Worker counts N to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub workers: Vec<usize>,
    /// Which of direct, cogmesh, envoy, haproxy, nginx to run, comma-separated (direct is always
    /// run: the latency table is relative to it). Missing binaries are skipped.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,cogmesh,envoy,haproxy,nginx"
    )]
    pub proxies: Vec<String>,
    /// Open-loop request rate for the latency runs, requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds per open-loop latency run [default: 5, quick: 3].
    #[arg(long)]
    pub latency_secs: Option<f64>,
    /// Connections the open-loop client spreads its requests over.
    #[arg(long, default_value_t = 16)]
    pub latency_connections: usize,
    /// Runtime threads of the open-loop client (oha --worker-threads); 0 = oha's default (one per
    /// core). One thread keeps up with 1000 req/s and leaves the other core to the servers.
    #[arg(long, default_value_t = 1)]
    pub latency_client_threads: usize,
    /// Seconds per closed-loop throughput run (whole seconds) [default: 5, quick: 3].
    #[arg(long)]
    pub throughput_secs: Option<f64>,
    /// Connections of the closed-loop client.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Threads of the closed-loop client.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seconds of traffic before the measured runs of each proxy, not measured [default: 1,
    /// quick: 0.5].
    #[arg(long)]
    pub warmup_secs: Option<f64>,
    /// Also measure h2c maximum throughput (h2load), which adds a closed-loop run per proxy.
    #[arg(long)]
    pub h2c_throughput: bool,
    /// Also run cogmesh and each peer head to head: both at the same time, each under its own
    /// open-loop client at `--rate`, so that whatever disturbs the machine disturbs both (table 5
    /// and a target row per protocol). Adds one latency run per peer, N and protocol and round.
    #[arg(long)]
    pub head_to_head: bool,
    /// Only the head-to-head runs (implies `--head-to-head`): no solo latency, throughput or
    /// memory runs, so that many more rounds fit in the same time. Table 5 then decides between
    /// cogmesh and each peer with a sign test over the rounds.
    #[arg(long)]
    pub head_to_head_only: bool,
    /// Throughput duels instead of the solo runs (add `--head-to-head` for the latency duels
    /// too): for each peer, cogmesh and the peer both running and the closed loop of
    /// `--connections` sent to each in turn, cogmesh, peer, peer, cogmesh, `--throughput-secs` a
    /// run; HTTP/1.1, and h2c with `--h2c-throughput`. Table 6 decides between cogmesh and each
    /// peer with a sign test over the rounds, free of the drift between solo runs a minute apart.
    #[arg(long)]
    pub throughput_duels: bool,
    /// The upstream server: nginx, or `workload` (`cogmesh workload`, hyper, from
    /// `target/release/cogmesh`: `cargo build --release -p cogmesh-control`), whose HTTP/2 sends a
    /// response's head and data together.
    #[arg(long, value_enum, default_value_t = UpstreamServer::Nginx)]
    pub upstream_server: UpstreamServer,
    /// nginx worker processes of the upstream (nginx only).
    #[arg(long, default_value_t = 1)]
    pub upstream_workers: usize,
    /// The cogmesh-proxy binary [default: <repo>/target/release/cogmesh-proxy].
    #[arg(long)]
    pub cogmesh_bin: Option<PathBuf>,
    /// Extra argument for cogmesh-proxy (repeatable), e.g. --cogmesh-arg=--protocol=http1.
    #[arg(long, allow_hyphen_values = true)]
    pub cogmesh_arg: Vec<String>,
    /// Keep the temp dir with the generated configs, logs and raw tool output.
    #[arg(long)]
    pub keep_temp: bool,
    /// Also write every sample and the tables' inputs as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamServer {
    Nginx,
    Workload,
}

/// The settings in force once `--quick` and the defaults are applied.
struct Plan {
    rounds: usize,
    workers: Vec<usize>,
    kinds: Vec<Kind>,
    latency: Duration,
    throughput: Duration,
    warmup: Duration,
}

impl Plan {
    fn new(options: &Options, tools: &Tools) -> Result<(Plan, Vec<String>)> {
        let secs = |value: Option<f64>, normal: f64, quick: f64| -> Result<Duration> {
            let secs = value.unwrap_or(if options.quick { quick } else { normal });
            if !(secs > 0.0 && secs <= 120.0) {
                bail!("run durations must be within (0, 120] seconds, got {secs}");
            }
            Ok(Duration::from_secs_f64(secs))
        };
        let mut skipped = Vec::new();
        let mut kinds = vec![Kind::Direct];
        for name in &options.proxies {
            let kind = Kind::parse(name.trim())?;
            if kinds.contains(&kind) {
                continue;
            }
            if tools.binary(kind).is_some() {
                kinds.push(kind);
            } else {
                skipped.push(format!("{}: binary not found, skipped", kind.name()));
            }
        }
        kinds.sort();
        let workers = options.workers.clone();
        if workers.is_empty() || workers.contains(&0) {
            bail!("--workers needs counts of at least 1");
        }
        let rounds = options.rounds.unwrap_or(if options.quick { 1 } else { 3 });
        if rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let plan = Plan {
            rounds,
            workers,
            kinds,
            latency: secs(options.latency_secs, 5.0, 3.0)?,
            throughput: Duration::from_secs(secs(options.throughput_secs, 5.0, 3.0)?.as_secs().max(1)),
            warmup: Duration::from_secs_f64(
                options
                    .warmup_secs
                    .unwrap_or(if options.quick { 0.5 } else { 1.0 })
                    .clamp(0.0, 30.0),
            ),
        };
        Ok((plan, skipped))
    }

    /// Rough wall time: load runs plus ~0.7 s of start/stop per proxy process.
    fn estimate(&self, h2c_throughput: bool, head_to_head: bool, solo: bool, rate_duels: bool) -> Duration {
        let per_proto = self.warmup + self.latency + Duration::from_millis(700);
        let h2c_max = if h2c_throughput {
            self.throughput
        } else {
            Duration::ZERO
        };
        let per_case = per_proto * 2 + self.throughput + h2c_max;
        let cases = if solo {
            per_case * (self.rounds * self.workers.len() * self.kinds.len()) as u32
        } else {
            Duration::ZERO
        };
        let duels = if head_to_head {
            let peers = self.peers().len() + 1;
            (self.warmup + self.latency + Duration::from_millis(1400))
                * (self.rounds * self.workers.len() * 2 * peers) as u32
        } else {
            Duration::ZERO
        };
        let rate_duels = if rate_duels {
            let protos = if h2c_throughput { 2 } else { 1 };
            (self.warmup * 2 + self.throughput * 4 + Duration::from_millis(1400))
                * (self.rounds * self.workers.len() * protos * self.peers().len()) as u32
        } else {
            Duration::ZERO
        };
        cases + duels + rate_duels
    }

    /// The proxies cogmesh is compared with.
    fn peers(&self) -> Vec<Kind> {
        let others = |k: &&Kind| !matches!(k, Kind::Direct | Kind::Cogmesh);
        if !self.kinds.contains(&Kind::Cogmesh) {
            return Vec::new();
        }
        self.kinds.iter().filter(others).copied().collect()
    }
}

/// Parses the command line, runs the bench, prints the tables. Exit code 130 after an interrupt.
pub fn main_with_args() -> i32 {
    procs::install_signal_handlers();
    let options = Options::parse();
    i32::from(procs::exit_code("proxy-bench", run(&options)))
}

pub fn run(options: &Options) -> Result<()> {
    let repo = peers::repo_root();
    let mut tools = Tools::find(&repo, options.cogmesh_bin.as_deref())?;
    let (plan, skipped) = Plan::new(options, &tools)?;
    if (options.head_to_head_only || options.throughput_duels) && plan.peers().is_empty() {
        bail!(
            "--head-to-head-only and --throughput-duels need cogmesh and at least one of envoy, haproxy, nginx in --proxies, \
             with their binaries{}",
            skipped.iter().map(|s| format!("; {s}")).collect::<String>()
        );
    }
    let dir = std::env::temp_dir().join(format!("cogmesh-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Run every round on the same cogmesh build, even if a rebuild replaces the binary meanwhile.
    tools.snapshot_cogmesh(&dir)?;
    let result = run_in(options, &tools, &plan, &skipped, &dir);
    // Keep the evidence when a case failed or the bench did; not after a Ctrl-C.
    let keep = options.keep_temp || matches!(result, Ok(false)) || (result.is_err() && !procs::interrupted());
    if keep {
        eprintln!(
            "configs, logs and raw output kept in {} (--keep-temp, or a case failed)",
            dir.display()
        );
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    result.map(|_| ())
}

/// Runs every case; `Ok(true)` if none failed.
fn run_in(options: &Options, tools: &Tools, plan: &Plan, skipped: &[String], dir: &Path) -> Result<bool> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "cogmesh proxy bench: {} round(s), N = {:?}, {} CPU cores, upstream {}, 1 KiB body, loopback",
        plan.rounds,
        plan.workers,
        cores,
        match options.upstream_server {
            UpstreamServer::Nginx => format!("nginx with {} worker(s)", options.upstream_workers),
            UpstreamServer::Workload => "cogmesh workload".to_string(),
        }
    );
    for line in tools.versions().iter().chain(skipped) {
        println!("  {line}");
    }
    if !options.cogmesh_arg.is_empty() {
        println!("  cogmesh-proxy extra args: {:?}", options.cogmesh_arg);
    }
    let busy = cpu_busy(Duration::from_secs(1))?;
    println!(
        "  CPU busy before the run: {:.0} % of {cores} cores",
        busy * 100.0
    );
    if busy > 0.10 {
        println!("  warning: something else is using the CPU (a build?): expect noisy latency tails");
    }
    let solo = !options.head_to_head_only && !options.throughput_duels;
    let head_to_head = options.head_to_head || options.head_to_head_only;
    let estimate = plan.estimate(
        options.h2c_throughput,
        head_to_head,
        solo,
        options.throughput_duels,
    );
    eprintln!(
        "estimated time: about {} min {} s",
        estimate.as_secs() / 60,
        estimate.as_secs() % 60
    );

    let mut upstream = match options.upstream_server {
        UpstreamServer::Nginx => Upstream::start(tools, dir, options.upstream_workers)?,
        UpstreamServer::Workload => {
            let bin = tools.repo.join("target/release/cogmesh");
            if !peers::is_executable(&bin) {
                bail!(
                    "{} not found: build it with `cargo build --release -p cogmesh-control`",
                    bin.display()
                );
            }
            Upstream::start_workload(&bin, dir)?
        }
    };
    let oha = Oha {
        bin: &tools.oha,
        connections: options.latency_connections,
        threads: options.latency_client_threads,
    };
    let closed = ClosedLoop {
        wrk: &tools.wrk,
        h2load: tools.h2load.as_deref(),
        connections: options.connections,
        threads: options.threads,
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut duels = Vec::new();
    let mut rate_duels = Vec::new();
    let rate_protos: &[Proto] = if options.h2c_throughput {
        &[Proto::H1, Proto::H2c]
    } else {
        &[Proto::H1]
    };
    for round in 0..plan.rounds {
        for &workers in &plan.workers {
            // Rotate the order each round so no proxy always runs first or right after another.
            let mut order = if solo { plan.kinds.clone() } else { Vec::new() };
            if !order.is_empty() {
                let len = order.len();
                order.rotate_left(round % len);
            }
            for kind in order {
                for proto in [Proto::H1, Proto::H2c] {
                    let case = Case {
                        round,
                        workers,
                        kind,
                        proto,
                    };
                    let sample = case.measure(options, tools, plan, &upstream, &oha, &closed, dir);
                    procs::check_interrupted()?;
                    eprintln!("[{:>4.0}s] {}", started.elapsed().as_secs_f64(), sample.summary());
                    samples.push(sample);
                }
            }
            if head_to_head {
                let mut peers = plan.peers();
                if !peers.is_empty() {
                    let len = peers.len();
                    peers.rotate_left(round % len);
                }
                // Last, cogmesh against itself: how far apart the method puts two equal proxies.
                let control = (!peers.is_empty()).then_some(Kind::Cogmesh);
                for peer in peers.into_iter().chain(control) {
                    for proto in [Proto::H1, Proto::H2c] {
                        let mut duel = Duel::new(round, workers, proto, peer);
                        if let Err(err) = duel_into(&mut duel, options, tools, plan, &upstream, &oha, dir) {
                            duel.error = Some(format!("{err:#}"));
                        }
                        procs::check_interrupted()?;
                        eprintln!("[{:>4.0}s] {}", started.elapsed().as_secs_f64(), duel.summary());
                        duels.push(duel);
                    }
                }
            }
            if options.throughput_duels {
                let mut peers = plan.peers();
                if !peers.is_empty() {
                    let len = peers.len();
                    peers.rotate_left(round % len);
                }
                for peer in peers {
                    for &proto in rate_protos {
                        let mut duel = RateDuel::new(round, workers, proto, peer);
                        if let Err(err) =
                            rate_duel_into(&mut duel, options, tools, plan, &upstream, &closed, dir)
                        {
                            duel.error = Some(format!("{err:#}"));
                        }
                        procs::check_interrupted()?;
                        eprintln!("[{:>4.0}s] {}", started.elapsed().as_secs_f64(), duel.summary());
                        rate_duels.push(duel);
                    }
                }
            }
        }
        upstream.server.check_alive().context("the upstream died")?;
    }
    drop(upstream);

    let setup = Setup {
        rounds: plan.rounds,
        workers: plan.workers.clone(),
        kinds: plan.kinds.clone(),
        rate: options.rate,
        latency_secs: plan.latency.as_secs_f64(),
        latency_connections: options.latency_connections,
        throughput_secs: plan.throughput.as_secs_f64(),
        connections: options.connections,
        threads: options.threads,
        h2c_throughput: options.h2c_throughput,
        solo,
    };
    print!("{}", report::render(&setup, &samples, &duels, &rate_duels));
    let failures: Vec<String> = samples
        .iter()
        .filter(|s| s.error.is_some())
        .map(Sample::summary)
        .chain(duels.iter().filter(|d| d.error.is_some()).map(Duel::summary))
        .chain(
            rate_duels
                .iter()
                .filter(|d| d.error.is_some())
                .map(RateDuel::summary),
        )
        .collect();
    if !failures.is_empty() {
        println!(
            "\n{} case(s) failed and are left out of the medians:",
            failures.len()
        );
        for summary in &failures {
            println!("  {summary}");
        }
    }
    println!("\ntotal time {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &options.json {
        let json = serde_json::json!({
            "tools": tools.versions(),
            "rounds": plan.rounds,
            "workers": plan.workers,
            "rate": options.rate,
            "latency_secs": plan.latency.as_secs_f64(),
            "throughput_secs": plan.throughput.as_secs_f64(),
            "connections": options.connections,
            "samples": samples,
            "head_to_head": duels,
            "throughput_in_turn": rate_duels,
        });
        fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(failures.is_empty())
}

struct Case {
    round: usize,
    workers: usize,
    kind: Kind,
    proto: Proto,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        options: &Options,
        tools: &Tools,
        plan: &Plan,
        upstream: &Upstream,
        oha: &Oha,
        closed: &ClosedLoop,
        dir: &Path,
    ) -> Sample {
        let mut sample = Sample::new(self.round, self.workers, self.kind, self.proto);
        if let Err(err) = self.measure_into(&mut sample, options, tools, plan, upstream, oha, closed, dir) {
            sample.error = Some(format!("{err:#}"));
        }
        sample
    }

    #[allow(clippy::too_many_arguments)]
    fn measure_into(
        &self,
        sample: &mut Sample,
        options: &Options,
        tools: &Tools,
        plan: &Plan,
        upstream: &Upstream,
        oha: &Oha,
        closed: &ClosedLoop,
        dir: &Path,
    ) -> Result<()> {
        let case_dir = dir.join(format!(
            "r{}-n{}-{}-{}",
            self.round + 1,
            self.workers,
            self.kind.name(),
            match self.proto {
                Proto::H1 => "h1",
                Proto::H2c => "h2c",
            }
        ));
        fs::create_dir_all(&case_dir)?;
        let mut instance = Instance::start(
            self.kind,
            self.proto,
            self.workers,
            upstream,
            tools,
            &case_dir,
            &options.cogmesh_arg,
        )?;
        let url = instance.url();
        let usage = |instance: &Instance| instance.server.as_ref().map(|server| server.usage());
        sample.rss_idle_kib = usage(&instance).map(|u| u.rss_kib);

        if !plan.warmup.is_zero() {
            let warm = oha.open_loop(&url, self.proto, options.rate, plan.warmup, &case_dir)?;
            if warm.ok == 0 {
                bail!("warm-up got no 200 response: {}", warm.failures);
            }
        }

        let window = CpuWindow::open(&instance, upstream);
        let latency = oha.open_loop(&url, self.proto, options.rate, plan.latency, &case_dir)?;
        let (proxy_cpu, foreign) = window.close(&instance, upstream);
        let requests = (latency.ok + latency.failed).max(1);
        sample.cpu_s_per_1k_at_rate = proxy_cpu.map(|cpu| cpu / requests as f64 * 1000.0);
        sample.foreign_cpu_cores = Some(foreign);
        sample.latency = Some(latency);
        alive(&mut instance)?;

        if self.proto == Proto::H1 || options.h2c_throughput {
            let window = CpuWindow::open(&instance, upstream);
            let throughput = closed.run(&url, self.proto, plan.throughput, &case_dir)?;
            let (proxy_cpu, foreign) = window.close(&instance, upstream);
            let requests = throughput.requests.max(1);
            sample.cpu_s_per_1k_at_max = proxy_cpu.map(|cpu| cpu / requests as f64 * 1000.0);
            sample.foreign_cpu_cores = Some(foreign.max(sample.foreign_cpu_cores.unwrap_or(0.0)));
            sample.throughput = Some(throughput);
            alive(&mut instance)?;
        }
        sample.rss_peak_kib = usage(&instance).map(|u| u.hwm_kib);
        Ok(())
    }
}

/// Where and how the two processes of a duel start: the duel's directory, and cogmesh's
/// arguments for the peer's upstream protocol.
struct DuelSide {
    case_dir: PathBuf,
    proto: Proto,
    workers: usize,
    cogmesh_args: Vec<String>,
}

impl DuelSide {
    /// `tag` names the kind of duel in the directory, e.g. `r3-n1-h2h-nginx-HTTP1.1`.
    fn new(
        dir: &Path,
        tag: &str,
        round: usize,
        workers: usize,
        proto: Proto,
        peer: Kind,
        options: &Options,
    ) -> DuelSide {
        DuelSide {
            case_dir: dir.join(format!(
                "r{}-n{workers}-{tag}-{}-{}",
                round + 1,
                peer.name(),
                proto.label().replace('/', "")
            )),
            proto,
            workers,
            cogmesh_args: peers::duel_cogmesh_args(peer, proto, &options.cogmesh_arg),
        }
    }

    /// A fresh `kind` process in the subdirectory `name`, and that directory.
    fn start(
        &self,
        kind: Kind,
        name: &str,
        upstream: &Upstream,
        tools: &Tools,
    ) -> Result<(Instance, PathBuf)> {
        let kind_dir = self.case_dir.join(name);
        fs::create_dir_all(&kind_dir)?;
        let instance = Instance::start(
            kind,
            self.proto,
            self.workers,
            upstream,
            tools,
            &kind_dir,
            &self.cogmesh_args,
        )?;
        Ok((instance, kind_dir))
    }
}

/// One head-to-head run: fresh cogmesh and peer processes, warmed up and then measured at the
/// same time, each by an oha of its own.
fn duel_into(
    duel: &mut Duel,
    options: &Options,
    tools: &Tools,
    plan: &Plan,
    upstream: &Upstream,
    oha: &Oha,
    dir: &Path,
) -> Result<()> {
    let side = DuelSide::new(
        dir,
        "h2h",
        duel.round,
        duel.workers,
        duel.proto,
        duel.peer,
        options,
    );
    duel.upstream =
        [Kind::Cogmesh, duel.peer].map(|kind| peers::upstream_protocol(kind, duel.proto, &side.cogmesh_args));
    let start = |kind: Kind, name: &str| side.start(kind, name, upstream, tools);
    // Which side starts first and whose client runs on a thread of its own alternate by round:
    // the control rows (cogmesh against cogmesh) showed the side started first and driven from
    // the spawned thread behind in most rounds.
    let swap = duel.round % 2 == 1;
    let peer_name = format!("peer-{}", duel.peer.name());
    let ((mut cogmesh, cogmesh_dir), (mut other, other_dir)) = if swap {
        let other = start(duel.peer, &peer_name)?;
        (start(Kind::Cogmesh, "cogmesh")?, other)
    } else {
        let cogmesh = start(Kind::Cogmesh, "cogmesh")?;
        (cogmesh, start(duel.peer, &peer_name)?)
    };
    let both = |duration: Duration| -> Result<(Latency, Latency)> {
        let run = |instance: &Instance, work_dir: &Path| {
            oha.open_loop(&instance.url(), duel.proto, options.rate, duration, work_dir)
        };
        let ((a, a_dir), (b, b_dir)) = if swap {
            ((&other, &other_dir), (&cogmesh, &cogmesh_dir))
        } else {
            ((&cogmesh, &cogmesh_dir), (&other, &other_dir))
        };
        let (first, second) = std::thread::scope(|scope| {
            let first = scope.spawn(|| run(a, a_dir));
            let second = run(b, b_dir);
            let first = first
                .join()
                .map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
            anyhow::Ok((first?, second?))
        })?;
        Ok(if swap { (second, first) } else { (first, second) })
    };
    if !plan.warmup.is_zero() {
        let (mine, theirs) = both(plan.warmup)?;
        if mine.ok == 0 || theirs.ok == 0 {
            bail!(
                "warm-up got no 200 response: {} / {}",
                mine.failures,
                theirs.failures
            );
        }
    }
    let (mine, theirs) = both(plan.latency)?;
    duel.cogmesh = Some(mine);
    duel.other = Some(theirs);
    alive(&mut cogmesh)?;
    alive(&mut other)
}

/// One throughput duel: fresh cogmesh and peer processes, each warmed up by the closed loop,
/// then measured by it in turn, cogmesh, peer, peer, cogmesh (peer first in odd rounds). A run
/// with errors fails the duel: a proxy answering errors fast would look faster.
#[allow(clippy::too_many_arguments)]
fn rate_duel_into(
    duel: &mut RateDuel,
    options: &Options,
    tools: &Tools,
    plan: &Plan,
    upstream: &Upstream,
    closed: &ClosedLoop,
    dir: &Path,
) -> Result<()> {
    let side = DuelSide::new(
        dir,
        "turns",
        duel.round,
        duel.workers,
        duel.proto,
        duel.peer,
        options,
    );
    let mut sides = vec![
        side.start(Kind::Cogmesh, "cogmesh", upstream, tools)?,
        side.start(duel.peer, &format!("peer-{}", duel.peer.name()), upstream, tools)?,
    ];
    let run = |side: usize, duration: Duration| -> Result<f64> {
        let (instance, work_dir) = &sides[side];
        let throughput = closed.run(&instance.url(), duel.proto, duration, work_dir)?;
        if throughput.errors > 0 || throughput.requests == 0 {
            bail!(
                "{}: {} errors in {} requests",
                if side == 0 { "cogmesh" } else { duel.peer.name() },
                throughput.errors,
                throughput.requests
            );
        }
        Ok(throughput.rps)
    };
    if !plan.warmup.is_zero() {
        run(0, plan.warmup)?;
        run(1, plan.warmup)?;
    }
    let order: [usize; 4] = if duel.round % 2 == 1 {
        [1, 0, 0, 1]
    } else {
        [0, 1, 1, 0]
    };
    for side in order {
        let rps = run(side, plan.throughput)?;
        procs::check_interrupted()?;
        if side == 0 {
            duel.cogmesh.push(rps);
        } else {
            duel.other.push(rps);
        }
    }
    for (instance, _) in &mut sides {
        alive(instance)?;
    }
    Ok(())
}

fn alive(instance: &mut Instance) -> Result<()> {
    match instance.server.as_mut() {
        Some(server) => server.check_alive(),
        None => Ok(()),
    }
}

/// Share of all cores' time that was busy over `window`.
fn cpu_busy(window: Duration) -> Result<f64> {
    let (busy0, total0) = procs::machine_cpu_secs();
    procs::sleep(window)?;
    let (busy1, total1) = procs::machine_cpu_secs();
    Ok(((busy1 - busy0) / (total1 - total0).max(1e-9)).clamp(0.0, 1.0))
}

/// CPU accounting around one load run: what the proxy used, and how much CPU went to processes
/// that are neither the proxy, the upstream, the load generator nor the bench (a build running
/// beside the bench, say), in cores.
struct CpuWindow {
    started: Instant,
    machine: f64,
    own: f64,
    upstream: f64,
    proxy: Option<f64>,
}

impl CpuWindow {
    fn open(instance: &Instance, upstream: &Upstream) -> CpuWindow {
        CpuWindow {
            started: Instant::now(),
            machine: procs::machine_cpu_secs().0,
            own: procs::own_cpu_secs(),
            upstream: upstream.server.usage().cpu_secs,
            proxy: instance.server.as_ref().map(|s| s.usage().cpu_secs),
        }
    }

    /// (proxy CPU seconds, foreign CPU in cores) since `open`.
    fn close(self, instance: &Instance, upstream: &Upstream) -> (Option<f64>, f64) {
        let proxy = instance
            .server
            .as_ref()
            .zip(self.proxy)
            .map(|(s, before)| s.usage().cpu_secs - before);
        let machine = procs::machine_cpu_secs().0 - self.machine;
        let ours = procs::own_cpu_secs() - self.own + upstream.server.usage().cpu_secs - self.upstream
            + proxy.unwrap_or(0.0);
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        (proxy, ((machine - ours) / wall).max(0.0))
    }
}
