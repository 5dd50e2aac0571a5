//! `balance-bench`: the balancer scenarios of `balance-sim`, for real on loopback.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-control -p cogmesh-bench
//! target/release/balance-bench [--quick] [--scenarios b,a] [--variants cognitive,round_robin,...]
//! ```
//!
//! Strategies: `cogmesh-proxy --balancer cognitive`, `round_robin` and `p2c_ewma` (each with
//! `--workers 1`), and Envoy with `lb_policy: LEAST_REQUEST` (`--concurrency 1`), see
//! [`proxies`]. Each scenario starts its `cogmesh workload` processes once ([`fleet`]); every
//! strategy runs in front of the same processes, one at a time, a fresh proxy process per run.
//!
//! Scenarios:
//! - **(b) unequal capacities**: three workloads with 2, 4 and 8 slots (1:2:4), 20 ms mean
//!   exponential service time, queues of 64 (full → 503 `Retry-After: 1`), each reporting its
//!   load in ORCA `endpoint-load-metrics` TEXT. Total capacity = slots / service time = 700 rps;
//!   offered 80 % and 100 % of it.
//! - **(a, shortened) one slow endpoint**: eleven workloads × 4 slots (2200 rps), one of which
//!   takes 2 s longer per request for the middle half of the run (`POST /admin/delay?ms=2000
//!   &for_ms=...` on its admin route), a 1 s response timeout in the proxy (cogmesh
//!   `--response-timeout-ms 1000`, Envoy route `timeout: 1s`), offered 70 % of capacity.
//!
//! A run: wait until every workload is idle, start the proxy (ready when its admin `/ready`
//! answers 200 and a `GET /work` through it answers 200), warm up open loop at the run's rate
//! (not measured), then the measured run: `oha -q RATE --latency-correction -z D -c 256`
//! (uniform pacing; a latency counts from when the request was scheduled, so a stalled proxy is
//! not hidden by the client waiting for it), JSON output. Meanwhile a sampler reads every
//! workload's `/admin/stats` and, for cogmesh, the proxy's `/config` (the ORCA load it holds per
//! endpoint, its RTT EWMA, in-flight counts, ejections) every 250 ms. Rounds are interleaved
//! (round → offered load → strategy, the order rotating each round) and the tables show medians
//! over rounds.
//!
//! Reported per strategy: offered rps; achieved rps = 200 responses per second; success = 200s
//! over all responses and errors (requests cut off by the end of the run are not counted);
//! p50 / p99 / p99.9 over all responses as the client saw them (a 503 or 504 counts with its
//! latency); each endpoint's share of the requests; the proxy's CPU per request. Then the ratio
//! of cognitive's p99 to round robin's and to Envoy's, and the issue's targets with PASS / FAIL
//! (printed, never asserted): (b) cognitive p99 ≤ 0.5× round robin's and ≤ 0.8× Envoy
//! LEAST_REQUEST's at equal (within 1 %) or higher throughput; (a) cognitive success ≥ 99.9 %
//! and p99.9 below p2c_ewma's. A per-endpoint table says what each strategy did and, for
//! cogmesh, what the proxy believed.
//!
//! Flags worth knowing (`--help` for all): `--scenarios b,a`, `--variants` (also
//! `least_request`: cogmesh's own P2C on in-flight counts, to tell the balancer from the rest of
//! the proxy), `--b-rounds`/`--a-rounds`, `--b-secs`/`--a-secs`, `--b-slots 2,4,8`,
//! `--service-time-dist fixed`, `--sample-ms`, `--json FILE` (every sample), `--keep-temp` (keeps
//! each run's directory: the proxy's log, oha's JSON, and `ticks.csv` with every sample of the
//! workloads' queues and the proxy's view of each endpoint, for looking at a run over time).
//!
//! Client, proxy and workloads share the machine (2 cores here): runs during which other
//! processes used more than 0.1 core are flagged. Ports are picked at run time on 127.0.0.1,
//! every load run is bounded, every process started is stopped (also on error and Ctrl-C).
//! The defaults take about 7 minutes, `--quick` about 2.

pub mod fleet;
pub mod measure;
pub mod proxies;
pub mod table;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cogmesh_bench::load::Oha;
use cogmesh_bench::peers::{first_line, is_executable, on_path};
use cogmesh_bench::{peers, procs};

use self::fleet::{Fleet, SimSettings};
use self::measure::{Ctx, Sample};
use self::proxies::{Binaries, Variant};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "balance-bench",
    about = "cogmesh cognitive vs round_robin vs p2c_ewma vs Envoy LEAST_REQUEST, for real on loopback",
    long_about = None
)]
pub struct Options {
    /// About 2 minutes: 1 round, 5 s runs of (b), a 16 s run of (a), 1 s warm-ups (explicit
    /// flags still win).
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run: b (capacities 1:2:4), a (one slow endpoint).
    #[arg(long, value_delimiter = ',', default_value = "b,a")]
    pub scenarios: Vec<String>,
    /// Strategies: cognitive, round_robin, p2c_ewma, envoy (skipped if Envoy is missing); also
    /// least_request (cogmesh's own, for diagnosis).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cognitive,round_robin,p2c_ewma,envoy"
    )]
    pub variants: Vec<String>,
    /// Interleaved rounds of (b) [default: 3, quick: 1].
    #[arg(long)]
    pub b_rounds: Option<usize>,
    /// Interleaved rounds of (a) [default: 2, quick: 1].
    #[arg(long)]
    pub a_rounds: Option<usize>,
    /// Seconds per measured run of (b) [default: 8, quick: 5].
    #[arg(long)]
    pub b_secs: Option<f64>,
    /// Seconds per measured run of (a); the endpoint is slow for the middle half [default: 20,
    /// quick: 16].
    #[arg(long)]
    pub a_secs: Option<f64>,
    /// Seconds of open-loop warm-up at the run's rate before each measured run [default: 2,
    /// quick: 1].
    #[arg(long)]
    pub warmup_secs: Option<f64>,
    /// (b): slots of the workloads.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    pub b_slots: Vec<usize>,
    /// (b): offered loads, % of capacity.
    #[arg(long, value_delimiter = ',', default_value = "80,100")]
    pub b_loads: Vec<u32>,
    /// (b): response timeout of every proxy, ms (15 s is both cogmesh's and Envoy's default).
    #[arg(long, default_value_t = 15_000)]
    pub b_timeout_ms: u64,
    /// (a): number of workloads (the first one is slowed).
    #[arg(long, default_value_t = 11)]
    pub a_endpoints: usize,
    /// (a): slots of each workload.
    #[arg(long, default_value_t = 4)]
    pub a_slots: usize,
    /// (a): offered load, % of capacity.
    #[arg(long, default_value_t = 70)]
    pub a_load: u32,
    /// (a): extra latency of the slow endpoint, ms.
    #[arg(long, default_value_t = 2000)]
    pub a_delay_ms: u64,
    /// (a): response timeout of every proxy, ms.
    #[arg(long, default_value_t = 1000)]
    pub a_timeout_ms: u64,
    /// Mean service time of the workloads, ms.
    #[arg(long, default_value_t = 20.0)]
    pub service_time_ms: f64,
    /// Service-time distribution of the workloads: exponential or fixed.
    #[arg(long, default_value = "exponential")]
    pub service_time_dist: String,
    /// Queue of each workload (requests waiting for a slot before 503s).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Connections of the open-loop client (its concurrency ceiling).
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Runtime threads of the open-loop client.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// How often the workloads and the proxy are sampled during a run, ms.
    #[arg(long, default_value_t = 250)]
    pub sample_ms: u64,
    /// The cogmesh-proxy binary [default: <repo>/target/release/cogmesh-proxy].
    #[arg(long)]
    pub proxy_bin: Option<PathBuf>,
    /// The cogmesh binary, for `cogmesh workload` [default: <repo>/target/release/cogmesh].
    #[arg(long)]
    pub cogmesh_bin: Option<PathBuf>,
    /// The Envoy binary [default: <repo>/.tools/bin/envoy, <repo>/.venv/bin/envoy, PATH].
    #[arg(long)]
    pub envoy_bin: Option<PathBuf>,
    /// Keep the temp dir with configs, logs and raw oha output.
    #[arg(long)]
    pub keep_temp: bool,
    /// Also write every sample as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One offered load of a scenario.
#[derive(Debug, Clone)]
pub struct Level {
    /// `b80`, `b100`, `a70`.
    pub key: String,
    pub percent: u32,
    pub rate: u32,
}

/// The slow-down of scenario (a).
#[derive(Debug, Clone)]
pub struct Slow {
    /// Which workload.
    pub index: usize,
    pub delay_ms: u64,
    /// From the start of the measured run.
    pub from: Duration,
    pub length: Duration,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub key: &'static str,
    pub title: String,
    pub details: Vec<String>,
    pub slots: Vec<usize>,
    pub levels: Vec<Level>,
    pub rounds: usize,
    pub duration: Duration,
    pub timeout_ms: u64,
    pub slow: Option<Slow>,
    /// Rows of the per-endpoint table: a name and the workloads it sums up.
    pub groups: Vec<(String, Vec<usize>)>,
}

impl Scenario {
    /// The part of the run the per-endpoint means cover (seconds since its start): while the
    /// endpoint is slow in (a), everything in (b).
    pub fn window(&self) -> (f64, f64) {
        match &self.slow {
            Some(slow) => (slow.from.as_secs_f64(), (slow.from + slow.length).as_secs_f64()),
            None => (0.0, f64::INFINITY),
        }
    }

    /// Rough wall time: warm-up + run + ~1.5 s of start/stop per case (+ the slow requests'
    /// drain in (a)).
    fn estimate(&self, warmup: Duration, variants: usize) -> Duration {
        let drain = if self.slow.is_some() {
            Duration::from_millis(2500)
        } else {
            Duration::ZERO
        };
        let per_case = warmup + self.duration + Duration::from_millis(1500) + drain;
        per_case * (self.rounds * self.levels.len() * variants) as u32
    }
}

/// Capacity in requests per second of `slots` at a mean service time of `service_ms`.
pub fn capacity_rps(slots: &[usize], service_ms: f64) -> f64 {
    slots.iter().sum::<usize>() as f64 * 1000.0 / service_ms
}

fn secs(value: Option<f64>, normal: f64, quick: f64, is_quick: bool) -> Result<Duration> {
    let secs = value.unwrap_or(if is_quick { quick } else { normal });
    if !(secs > 0.0 && secs <= 300.0) {
        bail!("run durations must be within (0, 300] seconds, got {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The scenarios asked for, with `--quick` and the defaults applied.
pub fn scenarios(options: &Options) -> Result<Vec<Scenario>> {
    let q = options.quick;
    if !(options.service_time_ms.is_finite() && options.service_time_ms > 0.0) {
        bail!("--service-time-ms must be > 0");
    }
    if !matches!(options.service_time_dist.as_str(), "exponential" | "fixed") {
        bail!("--service-time-dist must be exponential or fixed");
    }
    let service = format!(
        "{} ms mean {} service time",
        options.service_time_ms, options.service_time_dist
    );
    let mut out = Vec::new();
    for key in &options.scenarios {
        match key.trim() {
            "b" => {
                let slots = options.b_slots.clone();
                if slots.len() < 2 || slots.contains(&0) {
                    bail!("--b-slots needs at least two non-zero slot counts");
                }
                if options.b_loads.is_empty() || options.b_loads.iter().any(|&p| p == 0 || p > 300) {
                    bail!("--b-loads must be percentages in 1..=300");
                }
                let capacity = capacity_rps(&slots, options.service_time_ms);
                let rounds = options.b_rounds.unwrap_or(if q { 1 } else { 3 });
                let duration = secs(options.b_secs, 8.0, 5.0, q)?;
                out.push(Scenario {
                    key: "b",
                    title: format!(
                        "(b) unequal capacities: {} workloads with {} slots",
                        slots.len(),
                        slots.iter().map(usize::to_string).collect::<Vec<_>>().join(":")
                    ),
                    details: vec![
                        format!(
                            "{service}, queue {}; total capacity {capacity:.0} rps; response timeout {} ms",
                            options.queue, options.b_timeout_ms
                        ),
                        format!(
                            "{} round(s) of {:.0} s measured runs, interleaved",
                            rounds,
                            duration.as_secs_f64()
                        ),
                    ],
                    levels: options
                        .b_loads
                        .iter()
                        .map(|&percent| Level {
                            key: format!("b{percent}"),
                            percent,
                            rate: (capacity * percent as f64 / 100.0).round().max(1.0) as u32,
                        })
                        .collect(),
                    groups: slots
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (format!("w{i} ({s} slots)"), vec![i]))
                        .collect(),
                    slots,
                    rounds,
                    duration,
                    timeout_ms: options.b_timeout_ms,
                    slow: None,
                });
            }
            "a" => {
                if options.a_endpoints < 2 || options.a_slots == 0 {
                    bail!("(a) needs at least 2 endpoints with at least 1 slot");
                }
                if options.a_load == 0 || options.a_load > 300 {
                    bail!("--a-load must be a percentage in 1..=300");
                }
                let slots = vec![options.a_slots; options.a_endpoints];
                let capacity = capacity_rps(&slots, options.service_time_ms);
                let rounds = options.a_rounds.unwrap_or(if q { 1 } else { 2 });
                let duration = secs(options.a_secs, 20.0, 16.0, q)?;
                let slow = Slow {
                    index: 0,
                    delay_ms: options.a_delay_ms,
                    from: duration / 4,
                    length: duration / 2,
                };
                let n = slots.len();
                out.push(Scenario {
                    key: "a",
                    title: format!(
                        "(a, shortened) one slow endpoint: {n} workloads × {} slots, w0 +{} ms \
                         per request from {:.0} s to {:.0} s of each run",
                        options.a_slots,
                        options.a_delay_ms,
                        slow.from.as_secs_f64(),
                        (slow.from + slow.length).as_secs_f64()
                    ),
                    details: vec![
                        format!(
                            "{service}, queue {}; total capacity {capacity:.0} rps; response timeout {} ms",
                            options.queue, options.a_timeout_ms
                        ),
                        format!(
                            "{} round(s) of {:.0} s measured runs, interleaved",
                            rounds,
                            duration.as_secs_f64()
                        ),
                    ],
                    levels: vec![Level {
                        key: format!("a{}", options.a_load),
                        percent: options.a_load,
                        rate: (capacity * options.a_load as f64 / 100.0).round().max(1.0) as u32,
                    }],
                    groups: vec![
                        ("w0 (slow)".to_string(), vec![0]),
                        (format!("w1..w{} (mean)", n - 1), (1..n).collect()),
                    ],
                    slots,
                    rounds,
                    duration,
                    timeout_ms: options.a_timeout_ms,
                    slow: Some(slow),
                });
            }
            other => bail!("unknown scenario {other:?} (b, a)"),
        }
    }
    Ok(out)
}

/// Finds the programs and copies cogmesh's two binaries into `dir`, so a rebuild during the
/// run does not change them between strategies or rounds.
fn binaries(options: &Options, repo: &Path, dir: &Path) -> Result<(Binaries, Vec<String>)> {
    let built = |given: &Option<PathBuf>, name: &str| -> Result<PathBuf> {
        let path = given
            .clone()
            .unwrap_or_else(|| repo.join("target/release").join(name));
        if !is_executable(&path) {
            bail!(
                "{} not found: cargo build --release -p cogmesh-proxy -p cogmesh-control",
                path.display()
            );
        }
        let copy = dir.join(name);
        fs::copy(&path, &copy).with_context(|| format!("copy {}", path.display()))?;
        Ok(copy)
    };
    let describe = |given: &Option<PathBuf>, name: &str| {
        let path = given
            .clone()
            .unwrap_or_else(|| repo.join("target/release").join(name));
        let age = fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map_or(String::new(), |a| {
                format!(" (built {} min ago)", a.as_secs() / 60)
            });
        format!("{name}: {}{age}", path.display())
    };
    let proxy = built(&options.proxy_bin, "cogmesh-proxy")?;
    let workload = built(&options.cogmesh_bin, "cogmesh")?;
    let oha = [repo.join(".tools/bin/oha")]
        .into_iter()
        .find(|p| is_executable(p))
        .or_else(|| on_path("oha"))
        .context("oha not found: run bench/setup.sh first")?;
    let envoy = match &options.envoy_bin {
        Some(path) => Some(path.clone()).filter(|p| is_executable(p)),
        None => [repo.join(".tools/bin/envoy"), repo.join(".venv/bin/envoy")]
            .into_iter()
            .find(|p| is_executable(p))
            .or_else(|| on_path("envoy")),
    };
    let version = |bin: &Path| first_line(bin, &["--version"]);
    let mut lines = vec![
        describe(&options.proxy_bin, "cogmesh-proxy"),
        describe(&options.cogmesh_bin, "cogmesh"),
        format!("oha: {}", version(&oha)),
    ];
    match &envoy {
        Some(bin) => lines.push(format!("envoy: {}", version(bin))),
        None => lines.push("envoy: not installed (skipped; bench/setup.sh installs it)".into()),
    }
    Ok((
        Binaries {
            proxy,
            workload,
            envoy,
            oha,
        },
        lines,
    ))
}

/// Parses the command line, runs the bench, prints the tables. Exit code 130 after an interrupt.
pub fn main_with_args() -> u8 {
    procs::install_signal_handlers();
    let options = Options::parse();
    procs::exit_code("balance-bench", run(&options))
}

pub fn run(options: &Options) -> Result<()> {
    let scenarios = scenarios(options)?;
    let mut variants = Vec::new();
    for name in &options.variants {
        let v = Variant::parse(name.trim())?;
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    if variants.is_empty() {
        bail!("--variants is empty");
    }
    let repo = peers::repo_root();
    let dir = std::env::temp_dir().join(format!("cogmesh-balance-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = binaries(options, &repo, &dir)
        .and_then(|(bins, lines)| run_in(options, &scenarios, variants, &bins, &lines, &dir));
    let keep = options.keep_temp || matches!(result, Ok(false)) || (result.is_err() && !procs::interrupted());
    if keep {
        eprintln!(
            "configs, logs and raw oha output kept in {} (--keep-temp, or a run failed)",
            dir.display()
        );
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    result.map(|_| ())
}

/// Runs every scenario; `Ok(true)` if no run failed.
fn run_in(
    options: &Options,
    scenarios: &[Scenario],
    mut variants: Vec<Variant>,
    bins: &Binaries,
    tool_lines: &[String],
    dir: &Path,
) -> Result<bool> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "cogmesh balance bench: real processes on loopback, {cores} CPU cores; every proxy with one worker"
    );
    for line in tool_lines {
        println!("  {line}");
    }
    if bins.envoy.is_none() {
        variants.retain(|v| *v != Variant::EnvoyLeastRequest);
    }
    let (busy0, total0) = procs::machine_cpu_secs();
    procs::sleep(Duration::from_secs(1))?;
    let (busy1, total1) = procs::machine_cpu_secs();
    let busy = if total1 > total0 {
        (busy1 - busy0) / (total1 - total0)
    } else {
        0.0
    };
    println!(
        "  CPU busy before the run: {:.0} % of {cores} cores",
        busy * 100.0
    );
    if busy > 0.10 {
        println!("  warning: something else is using the CPU (a build?): expect noisy latency tails");
    }
    let warmup = Duration::from_secs_f64(
        options
            .warmup_secs
            .unwrap_or(if options.quick { 1.0 } else { 2.0 })
            .clamp(0.0, 60.0),
    );
    let estimate: Duration = scenarios.iter().map(|s| s.estimate(warmup, variants.len())).sum();
    eprintln!(
        "estimated time: about {} min {} s",
        estimate.as_secs() / 60,
        estimate.as_secs() % 60
    );
    let sim = SimSettings {
        service_time_ms: options.service_time_ms,
        dist: options.service_time_dist.clone(),
        queue: options.queue,
    };
    let started = Instant::now();
    let mut all = Vec::new();
    let mut failed = 0;
    for scenario in scenarios {
        let scenario_dir = dir.join(format!("scenario-{}", scenario.key));
        fs::create_dir_all(&scenario_dir)?;
        let mut fleet = Fleet::start(&bins.workload, &scenario.slots, &sim, &scenario_dir)?;
        let mut samples: Vec<Sample> = Vec::new();
        let ctx = Ctx {
            bins,
            oha: Oha {
                bin: &bins.oha,
                connections: options.connections,
                threads: options.client_threads,
            },
            warmup,
            sample_every: Duration::from_millis(options.sample_ms.max(20)),
            dir: &scenario_dir,
        };
        for round in 0..scenario.rounds {
            let mut order = variants.clone();
            let len = order.len();
            order.rotate_left(round % len);
            for level in &scenario.levels {
                for &variant in &order {
                    let sample = measure::run_case(&ctx, &mut fleet, scenario, level, variant, round);
                    procs::check_interrupted()?;
                    eprintln!("[{:>4.0}s] {}", started.elapsed().as_secs_f64(), sample.summary());
                    samples.push(sample);
                    fleet.check_alive().context("a workload died")?;
                }
            }
        }
        drop(fleet);
        print!("{}", table::render(scenario, &variants, &samples));
        let failures: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
        if !failures.is_empty() {
            println!(
                "\n  {} run(s) failed and are left out of the medians:",
                failures.len()
            );
            for s in &failures {
                println!("    {}", s.summary());
            }
        }
        let disturbed: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.foreign_cpu_cores.is_some_and(|f| f > table::DISTURBED_CORES))
            .collect();
        if !disturbed.is_empty() {
            println!(
                "\n  {} run(s) disturbed (other processes used > {} core meanwhile):",
                disturbed.len(),
                table::DISTURBED_CORES
            );
            for s in &disturbed {
                println!(
                    "    {} round {} {}: {:.2} cores",
                    s.level,
                    s.round + 1,
                    s.variant.label(),
                    s.foreign_cpu_cores.unwrap_or(0.0)
                );
            }
        }
        failed += failures.len();
        all.extend(samples);
    }
    println!("\ntotal time {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &options.json {
        let json = serde_json::json!({
            "tools": tool_lines,
            "variants": variants,
            "samples": all,
        });
        fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(failed == 0)
}
