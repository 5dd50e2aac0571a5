//! The control-plane benchmark behind `control-bench` (see the binary's docs for how to run it).
//!
//! For each N: a fresh `cogmesh control` process, N simulated sidecars ([`fleet`]) on real
//! loopback gRPC, then four phases:
//!
//! 1. **connect** — all N streams open (at most 256 Hellos in flight) and each gets its first
//!    routing table; the time this takes is reported (every Hello makes a new table version that
//!    goes to every sidecar already connected whose services it changed, so this is the control
//!    plane's cold-start storm);
//! 2. **settle** — wait until the last sidecar joined more than `--settle-secs` ago (31 s: slow
//!    start ramps a new endpoint over 30 s, and every ramp step is a new version) and no new
//!    version has appeared for 2 s;
//! 3. **steady** — `--steady-secs` of plain reporting (N reports per second, nothing changes):
//!    control-plane CPU as cores (utime + stime from `/proc/PID/stat`), RSS, and how many table
//!    versions it still makes (should be none);
//! 4. **probes** — `--probes` load changes of one instance (`reasoning-0`), alternating
//!    0.3 → 0.95 (its weight drops) and back (it rises). T0 is when that instance's sidecar sends
//!    its first report with the new load (clients report the new load for it from their next
//!    report on too); that report goes out at a point spread over the next second, another for
//!    every probe (its report schedule is moved), since with the control plane's fixed-rate
//!    weight tick and a fixed 1 s report period the wait for the next tick would otherwise be
//!    the same in every probe of a run; for every client (the sidecars that route to `reasoning`; instances
//!    subscribe only to their own service and never see it), the arrival is when it receives
//!    its first table in which that endpoint's weight moved past ±15 % of the weight before the
//!    change. Latency = arrival − T0 per client; p50 / p99 / max are over all clients of all
//!    probes; "missed" counts clients that did not get it within `--probe-timeout-secs`. This
//!    covers the recompute and the fan-out. The instance's own report moves its load by more
//!    than the control plane's load shift (0.1), so the control plane updates weights on that
//!    report instead of at the next weight tick; a change seen only in clients' reports would
//!    wait for the tick too (uniform in 0..`--weight-interval-ms`). It does not include the
//!    sidecar's own report period (up to 1 s between a load change and the report that
//!    carries it).
//!
//! Peak RSS is `VmHWM` over the whole run, connect storm included. A watchdog kills the control
//! plane if its RSS passes `--max-rss-mib`; the run of that N then fails with that reason.

mod fleet;
mod plane;
mod wire;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use self::fleet::{Fleet, ReportMode, Shared};
use self::plane::ControlPlane;

/// Targets from the control-plane issue, at N = 10 000.
const TARGET_P99_MS: f64 = 250.0;
const TARGET_CORES: f64 = 1.0;
const TARGET_RSS_MIB: f64 = 500.0;
/// A table counts as carrying the change once the watched weight moved by this share.
const CHANGE_THRESHOLD: f64 = 0.15;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "control-bench",
    about = "N simulated sidecars against `cogmesh control`: CPU, memory and weight-propagation latency",
    long_about = None
)]
pub struct Options {
    /// N = 100 and 1000 only (the 10 000 run takes the longest).
    #[arg(long)]
    pub quick: bool,
    /// Sidecar counts N, comma-separated [default: 100,1000,10000; quick: 100,1000].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// The control plane's `--weight-interval-ms`.
    #[arg(long, default_value_t = 100)]
    pub weight_interval_ms: u64,
    /// Share of the sidecars that front `reasoning` instances; the rest are its clients.
    #[arg(long, default_value_t = 0.1)]
    pub instance_share: f64,
    /// Connect streams per HTTP/2 connection (tonic Channel).
    #[arg(long, default_value_t = 100)]
    pub streams_per_conn: usize,
    /// Endpoint entries per second that client reports carry, in total: that many
    /// clients ÷ instances report on every instance (capped at all clients), the rest only on
    /// themselves. Every report then covers all instances equally.
    #[arg(long, default_value_t = 90_000)]
    pub entries_per_sec: usize,
    /// Instead: every client reports on K instances, as real clients spread over a subset. With
    /// a weight interval shorter than the 1 s report period, each interval then sees a different
    /// subset of reporters per endpoint, and the control plane's qps sums (and weights) jitter.
    #[arg(long, value_name = "K")]
    pub fanout: Option<usize>,
    /// Sidecars do not take deltas (`accepts_deltas` unset in their Hello): every version goes
    /// whole, as to sidecars from before deltas.
    #[arg(long)]
    pub whole_tables: bool,
    /// Sidecars joining per second, as in a rolling start; 0 = all at once, as when a restarted
    /// control plane sees every sidecar reconnect (at most 256 Hellos in flight either way).
    #[arg(long, default_value_t = 0.0)]
    pub join_rate: f64,
    /// Seconds after the last sidecar joined before measuring (slow start lasts 30 s).
    #[arg(long, default_value_t = 31.0)]
    pub settle_secs: f64,
    /// Seconds of steady-state reporting measured for CPU.
    #[arg(long, default_value_t = 10.0)]
    pub steady_secs: f64,
    /// Load changes measured (alternating down and up).
    #[arg(long, default_value_t = 4)]
    pub probes: usize,
    /// Seconds a probe waits for the change to reach every client.
    #[arg(long, default_value_t = 20.0)]
    pub probe_timeout_secs: f64,
    /// Seconds all N streams get to open and receive a first table.
    #[arg(long, default_value_t = 300.0)]
    pub connect_timeout_secs: f64,
    /// The control plane is killed (and that N fails) past this RSS.
    #[arg(long, default_value_t = 8192)]
    pub max_rss_mib: u64,
    /// Reported cognitive load of the instances, and of the probed one when it is busy.
    #[arg(long, default_value_t = 0.3)]
    pub low_load: f64,
    #[arg(long, default_value_t = 0.95)]
    pub high_load: f64,
    /// The control plane's log filter (its logs go to a file in the temp directory).
    #[arg(long, default_value = "info")]
    pub control_log_level: String,
    /// The `cogmesh` binary [default: <repo>/target/release/cogmesh].
    #[arg(long)]
    pub cogmesh_bin: Option<PathBuf>,
}

/// Parses the command line, runs, prints; the process exit code.
pub fn main() -> i32 {
    let options = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sidecar-sim")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("control-bench: starting the tokio runtime: {e}");
            return 1;
        }
    };
    // The control plane is spawned from this (main) thread inside block_on, so its
    // parent-death signal is tied to a thread that lives for the whole run.
    let result = runtime.block_on(run(&options));
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("control-bench: {e:#}");
            1
        }
    }
}

/// Runs every N; `Ok(false)` if one of them could not be measured.
async fn run(options: &Options) -> Result<bool> {
    let sizes = match (options.quick, options.sizes.is_empty()) {
        (_, false) => options.sizes.clone(),
        (true, true) => vec![100, 1000],
        (false, true) => vec![100, 1000, 10_000],
    };
    if sizes.iter().any(|&n| n < 2) {
        bail!("every N must be at least 2 (one instance and one client)");
    }
    if options.streams_per_conn == 0 || options.weight_interval_ms == 0 {
        bail!("--streams-per-conn and --weight-interval-ms must be positive");
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = options
        .cogmesh_bin
        .clone()
        .unwrap_or_else(|| repo.join("target/release/cogmesh"));
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p cogmesh-control`",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("cogmesh-control-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Every N runs the same build, even if a concurrent `cargo build` replaces the binary.
    let snapshot = dir.join("cogmesh");
    std::fs::copy(&bin, &snapshot).with_context(|| format!("copy {}", bin.display()))?;

    let nofile = plane::raise_nofile_limit();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "cogmesh control-plane bench: N = {sizes:?}, weight interval {} ms, {cores} CPU cores, \
         loopback, open files ≤ {nofile}",
        options.weight_interval_ms
    );
    println!(
        "  {} % of sidecars are `reasoning` instances, the rest its clients; reports every 1 s \
         (offsets spread over the second), ≤ {} streams per HTTP/2 connection",
        (options.instance_share * 100.0).round(),
        options.streams_per_conn
    );
    match options.fanout {
        Some(k) => println!("  every client reports on {k} instances (--fanout)"),
        None => println!(
            "  clients carrying endpoint reports cover every instance ({} entries/s in all); the \
             others report only their own load",
            options.entries_per_sec
        ),
    }
    println!(
        "  settle {} s after the last join (slow start 30 s), steady window {} s, {} probes \
         (load {} ↔ {}), change = watched weight moved ≥ {} %",
        options.settle_secs,
        options.steady_secs,
        options.probes,
        options.low_load,
        options.high_load,
        CHANGE_THRESHOLD * 100.0
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or("?".into(), |age| format!("built {} min ago", age.as_secs() / 60));
    println!(
        "  control plane: {} ({built}; logs in {})",
        bin.display(),
        dir.display()
    );
    let (busy0, total0) = plane::machine_cpu_secs();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (busy1, total1) = plane::machine_cpu_secs();
    let busy = (busy1 - busy0) / (total1 - total0).max(1e-9);
    println!("  CPU busy before the run: {:.0} % of all cores", busy * 100.0);
    if busy > 0.1 {
        println!("  warning: something else is using the CPU (a build?): numbers will be noisy");
    }

    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for &n in &sizes {
        let outcome = measure(options, n, &snapshot, &dir).await;
        if let Some(e) = &outcome.error {
            eprintln!("N = {n}: failed: {e}");
        }
        outcomes.push(outcome);
    }
    print!("{}", render(&outcomes));
    println!("\ntotal time {:.0} s", started.elapsed().as_secs_f64());
    let ok = outcomes.iter().all(|o| o.error.is_none());
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("control-plane logs kept in {}", dir.display());
    }
    Ok(ok)
}

/// One load change.
#[derive(Debug, Default)]
struct Probe {
    down: bool,
    baseline: f64,
    /// Arrival − T0 of every client that got the change, ms.
    latencies_ms: Vec<f64>,
    /// Clients that did not get it within the probe timeout.
    missing: usize,
    /// Arrivals before T0 (noise past the threshold, not the change).
    early: usize,
    /// Whether the mesh was quiet (no new version, every sidecar on the newest) before it.
    quiet: bool,
    /// Table versions made while it ran.
    versions: u64,
}

/// CPU used over a window, in cores (CPU seconds per second).
#[derive(Clone, Copy, Debug, Default)]
struct Cores {
    secs: f64,
    /// The control plane.
    cp: f64,
    /// This process: the simulated sidecars.
    sim: f64,
    /// Everything else on the machine (a build running beside the bench, say).
    foreign: f64,
}

struct CpuWindow {
    wall: Instant,
    cp: f64,
    sim: f64,
    machine: f64,
}

impl CpuWindow {
    fn open(cp: &ControlPlane) -> CpuWindow {
        CpuWindow {
            wall: Instant::now(),
            cp: cp.usage().cpu_secs,
            sim: own_cpu_secs(),
            machine: plane::machine_cpu_secs().0,
        }
    }

    fn close(&self, cp: &ControlPlane) -> Cores {
        let secs = self.wall.elapsed().as_secs_f64().max(1e-3);
        let cp = (cp.usage().cpu_secs - self.cp) / secs;
        let sim = (own_cpu_secs() - self.sim) / secs;
        let machine = (plane::machine_cpu_secs().0 - self.machine) / secs;
        Cores {
            secs,
            cp,
            sim,
            foreign: (machine - cp - sim).max(0.0),
        }
    }
}

#[derive(Debug, Default)]
struct Steady {
    cores: Cores,
    versions: u64,
    reports_per_sec: f64,
    tables_per_sec: f64,
}

#[derive(Debug, Default)]
struct Outcome {
    n: usize,
    instances: usize,
    conns: usize,
    connect_secs: Option<f64>,
    connect_cp_cpu_secs: Option<f64>,
    quiet_after_settle: Option<bool>,
    steady: Option<Steady>,
    rss_kib: Option<u64>,
    peak_kib: Option<u64>,
    table_bytes: u64,
    table_endpoints: u64,
    probes: Vec<Probe>,
    probe_cores: Option<Cores>,
    /// Over the whole run: tables the sidecars received, how many were deltas, and their bytes.
    received: (u64, u64, u64),
    connected_at_failure: usize,
    error: Option<String>,
}

async fn measure(options: &Options, n: usize, bin: &std::path::Path, dir: &std::path::Path) -> Outcome {
    let instances = ((n as f64 * options.instance_share).round() as usize).clamp(1, n - 1);
    let mut outcome = Outcome {
        n,
        instances,
        conns: n.div_ceil(options.streams_per_conn),
        ..Default::default()
    };
    let log = dir.join(format!("control-n{n}.log"));
    let started = plane::free_port().and_then(|port| {
        ControlPlane::start(
            bin,
            port,
            options.weight_interval_ms,
            &options.control_log_level,
            &log,
            options.max_rss_mib,
        )
    });
    let mut cp = match started {
        Ok(cp) => cp,
        Err(e) => {
            outcome.error = Some(format!("{e:#}"));
            return outcome;
        }
    };
    if let Err(e) = measure_in(options, &mut cp, &mut outcome).await {
        // When the watchdog killed the control plane, the sidecars' failing streams may be
        // noticed first: name the cause.
        std::thread::sleep(Duration::from_millis(200));
        outcome.error = Some(match cp.killed_at_kib() {
            Some(kib) => format!(
                "the control plane was killed by the bench's RSS watchdog at {} MiB (--max-rss-mib) \
                 with {} of {} sidecars connected",
                kib / 1024,
                outcome.connected_at_failure,
                outcome.n
            ),
            None => format!("{e:#}"),
        });
    }
    let hwm = cp.usage().hwm_kib;
    outcome.peak_kib = match (hwm, cp.killed_at_kib()) {
        (0, None) => outcome.peak_kib,
        (hwm, killed) => Some(hwm.max(killed.unwrap_or(0))),
    };
    cp.stop(Duration::from_secs(8));
    outcome
}

async fn measure_in(options: &Options, cp: &mut ControlPlane, outcome: &mut Outcome) -> Result<()> {
    let n = outcome.n;
    cp.wait_ready(Duration::from_secs(10))?;
    let mode = match options.fanout {
        Some(k) => ReportMode::Spread { fanout: k.max(1) },
        None => ReportMode::Observers {
            observers: (options.entries_per_sec / outcome.instances).clamp(1, n - outcome.instances),
        },
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", cp.addr))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(2 << 20);
    let mut channels: Vec<Channel> = Vec::with_capacity(outcome.conns);
    for _ in 0..outcome.conns {
        channels.push(endpoint.connect().await.context("connect to the control plane")?);
    }
    eprintln!(
        "N = {n}: {} instances, {} clients ({mode:?}), {} connections: connecting…",
        outcome.instances,
        n - outcome.instances,
        outcome.conns
    );

    let join_rate = (options.join_rate > 0.0).then_some(options.join_rate);
    let fleet = Fleet::start(
        n,
        outcome.instances,
        (mode, !options.whole_tables),
        &channels,
        options.low_load,
        join_rate,
    );
    let shared = Arc::clone(&fleet.shared);
    let result = run_phases(options, cp, outcome, &shared).await;
    outcome.connected_at_failure = shared.connected.load(Ordering::Relaxed);
    result?;
    // Stop: the control plane ends every stream, then the tasks go.
    cp.stop(Duration::from_secs(8));
    fleet.shutdown().await;
    drop(channels);
    Ok(())
}

/// Connect, settle, steady, probes.
async fn run_phases(
    options: &Options,
    cp: &mut ControlPlane,
    outcome: &mut Outcome,
    shared: &Shared,
) -> Result<()> {
    let n = outcome.n;
    // 1. Connect (the sidecar tasks started just before).
    let cpu_before = cp.usage().cpu_secs;
    let connect_started = Instant::now();
    let connected = wait_for(cp, shared, secs(options.connect_timeout_secs), |s| {
        s.with_table.load(Ordering::Relaxed) == n
    })
    .await?;
    if !connected {
        bail!(
            "after {} s only {} of {n} streams were open and {} had a table",
            options.connect_timeout_secs,
            shared.connected.load(Ordering::Relaxed),
            shared.with_table.load(Ordering::Relaxed)
        );
    }
    outcome.connect_secs = Some(connect_started.elapsed().as_secs_f64());
    outcome.connect_cp_cpu_secs = Some(cp.usage().cpu_secs - cpu_before);
    eprintln!(
        "N = {n}: all connected in {:.1} s (control plane used {:.1} CPU s), table version {}; \
         settling {} s…",
        outcome.connect_secs.unwrap_or_default(),
        outcome.connect_cp_cpu_secs.unwrap_or_default(),
        shared.max_version(),
        options.settle_secs
    );

    // 2. Settle: past slow start and quiet.
    let settle = secs(options.settle_secs);
    let quiet = wait_for(cp, shared, settle + Duration::from_secs(60), |s| {
        s.since_last_connect() >= settle && s.quiet_for() >= Duration::from_secs(2)
    })
    .await?;
    outcome.quiet_after_settle = Some(quiet);
    if !quiet {
        eprintln!("N = {n}: still making new versions after the settle time; measuring anyway");
    }

    // 3. Steady state.
    let (v0, r0, t0) = (
        shared.max_version(),
        shared.reports.load(Ordering::Relaxed),
        shared.tables.load(Ordering::Relaxed),
    );
    let window = CpuWindow::open(cp);
    wait_for(cp, shared, secs(options.steady_secs), |_| false).await?;
    let cores = window.close(cp);
    let wall = cores.secs;
    let usage = cp.usage();
    outcome.steady = Some(Steady {
        cores,
        versions: shared.max_version() - v0,
        reports_per_sec: (shared.reports.load(Ordering::Relaxed) - r0) as f64 / wall,
        tables_per_sec: (shared.tables.load(Ordering::Relaxed) - t0) as f64 / wall,
    });
    outcome.rss_kib = Some(usage.rss_kib);
    outcome.peak_kib = Some(usage.hwm_kib);
    outcome.table_bytes = shared.last_table_bytes.load(Ordering::Relaxed);
    outcome.table_endpoints = shared.last_table_endpoints.load(Ordering::Relaxed);
    if let Some(s) = &outcome.steady {
        eprintln!(
            "N = {n}: steady: control plane {:.3} cores, RSS {:.0} MiB, {} new versions in {:.0} s, \
             {:.0} reports/s; probing…",
            s.cores.cp,
            usage.rss_kib as f64 / 1024.0,
            s.versions,
            s.cores.secs,
            s.reports_per_sec
        );
    }

    // 4. Probes.
    let window = CpuWindow::open(cp);
    let interval = Duration::from_millis(options.weight_interval_ms);
    let quiet_needed = (interval * 5).max(Duration::from_secs(1));
    for k in 0..options.probes {
        let down = k % 2 == 0;
        let quiet = wait_for(cp, shared, Duration::from_secs(20), |s| {
            s.quiet_for() >= quiet_needed && s.converged() == s.clients()
        })
        .await?;
        let baseline = shared.watched_weight_median();
        if !baseline.is_finite() || baseline <= 0.0 {
            bail!("the watched endpoint has no weight in the sidecars' tables ({baseline})");
        }
        let (low, high) = if down {
            (baseline * (1.0 - CHANGE_THRESHOLD), f64::INFINITY)
        } else {
            (f64::NEG_INFINITY, baseline * (1.0 + CHANGE_THRESHOLD))
        };
        let v0 = shared.max_version();
        shared.arm(low, high);
        shared.set_load(0, if down { options.high_load } else { options.low_load });
        shared.rephase_watched();
        wait_for(cp, shared, secs(options.probe_timeout_secs), |s| {
            s.t0_ns().is_some() && s.arrived() == s.clients()
        })
        .await?;
        shared.disarm();
        let Some(t0) = shared.t0_ns() else {
            bail!("the watched sidecar did not send a report within the probe timeout");
        };
        let arrivals = shared.arrivals();
        let mut probe = Probe {
            down,
            baseline,
            quiet,
            versions: shared.max_version() - v0,
            ..Default::default()
        };
        for arrival in &arrivals {
            match arrival {
                None => probe.missing += 1,
                Some(a) if *a < t0 => probe.early += 1,
                Some(a) => probe.latencies_ms.push((a - t0) as f64 / 1e6),
            }
        }
        probe.latencies_ms.sort_by(f64::total_cmp);
        eprintln!(
            "N = {n}: probe {}/{} ({}, weight {:.2}): p50 {} p99 {} max {} ms, {} missed, {} versions",
            k + 1,
            options.probes,
            if down { "down" } else { "up" },
            baseline,
            fmt_ms(percentile(&probe.latencies_ms, 50.0)),
            fmt_ms(percentile(&probe.latencies_ms, 99.0)),
            fmt_ms(probe.latencies_ms.last().copied()),
            probe.missing,
            probe.versions
        );
        outcome.probes.push(probe);
    }
    outcome.probe_cores = Some(window.close(cp));
    outcome.received = (
        shared.tables.load(Ordering::Relaxed),
        shared.deltas.load(Ordering::Relaxed),
        shared.table_bytes.load(Ordering::Relaxed),
    );
    outcome.peak_kib = Some(cp.usage().hwm_kib);
    Ok(())
}

/// Polls `done` every 10 ms until it holds (`Ok(true)`) or `timeout` passes (`Ok(false)`);
/// fails at once if the control plane dies or a sidecar stream fails.
async fn wait_for(
    cp: &mut ControlPlane,
    shared: &Shared,
    timeout: Duration,
    mut done: impl FnMut(&Shared) -> bool,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(shared) {
            return Ok(true);
        }
        cp.check_alive()?;
        if shared.failed.load(Ordering::Relaxed) > 0 {
            bail!(
                "{} sidecar stream(s) failed, first: {}",
                shared.failed.load(Ordering::Relaxed),
                shared.first_error().unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 86_400.0))
}

fn own_cpu_secs() -> f64 {
    plane::cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "FAIL (no data)",
    }
}

fn render(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:>6} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>10} {:>9} {:>13}",
        "N",
        "inst",
        "connect s",
        "CPU cores",
        "RSS MiB",
        "peak MiB",
        "p50 ms",
        "p99 ms",
        "max ms",
        "missed",
        "vers/s",
        "p99<250ms",
        "CPU<1",
        "peak<500MiB"
    );
    for o in outcomes {
        let all: Vec<f64> = {
            let mut v: Vec<f64> = o
                .probes
                .iter()
                .flat_map(|p| p.latencies_ms.iter().copied())
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let missed: usize = o.probes.iter().map(|p| p.missing).sum();
        let p99 = percentile(&all, 99.0);
        let measured_all = !o.probes.is_empty() && o.error.is_none();
        let latency_pass = measured_all.then(|| missed == 0 && p99.is_some_and(|p| p < TARGET_P99_MS));
        let cores = o.steady.as_ref().map(|s| s.cores.cp);
        let _ = writeln!(
            out,
            "{:>6} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>10} {:>9} {:>13}",
            o.n,
            o.instances,
            o.connect_secs.map_or("-".into(), |s| format!("{s:.2}")),
            cores.map_or("-".into(), |c| format!("{c:.3}")),
            mib(o.rss_kib),
            mib(o.peak_kib),
            fmt_ms(percentile(&all, 50.0)),
            fmt_ms(p99),
            fmt_ms(all.last().copied()),
            if o.probes.is_empty() {
                "-".into()
            } else {
                missed.to_string()
            },
            o.steady
                .as_ref()
                .map_or("-".into(), |s| format!("{:.1}", s.versions as f64 / s.cores.secs)),
            verdict(latency_pass),
            verdict(cores.map(|c| c < TARGET_CORES)),
            verdict(o.peak_kib.map(|k| (k as f64 / 1024.0) < TARGET_RSS_MIB)),
        );
    }
    let _ = writeln!(
        out,
        "\nCPU cores: control plane's utime+stime ÷ wall time over the steady window (N reports/s, \
         no change). RSS at the end of it; peak = VmHWM over the whole run (connect storm included).\n\
         p50/p99/max: arrival − T0 over every client of every probe; missed: clients it did not \
         reach within the probe timeout. vers/s: table versions made in \
         the steady window (nothing changed, so ideally 0). Targets are the issue's, for N = 10 000."
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "\nN = {}: {} instances, {} connections",
            o.n, o.instances, o.conns
        );
        if let (Some(c), Some(cpu)) = (o.connect_secs, o.connect_cp_cpu_secs) {
            let _ = writeln!(
                out,
                "  connect: {c:.1} s to open all streams and deliver a first table, {cpu:.1} CPU s \
                 in the control plane"
            );
        }
        if o.quiet_after_settle == Some(false) {
            let _ = writeln!(
                out,
                "  not quiet after the settle time: versions were still being made"
            );
        }
        if let Some(s) = &o.steady {
            // With deltas, a client may never get its whole table after the first (empty) one.
            let whole = if o.table_endpoints > 0 {
                format!(
                    "; whole table {} endpoints, {:.1} KiB ({:.1} MiB per version if sent whole to \
                     every sidecar)",
                    o.table_endpoints,
                    o.table_bytes as f64 / 1024.0,
                    o.table_bytes as f64 * o.n as f64 / (1024.0 * 1024.0)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  steady: {:.0} reports/s, {:.1} tables/s received; simulator {:.2} cores, others \
                 {:.2} cores{whole}",
                s.reports_per_sec, s.tables_per_sec, s.cores.sim, s.cores.foreign,
            );
        }
        if let Some(c) = o.probe_cores {
            let _ = writeln!(
                out,
                "  during the probes ({:.0} s): control plane {:.3} cores, simulator {:.2}, others {:.2}",
                c.secs, c.cp, c.sim, c.foreign
            );
        }
        if o.received.0 > 0 {
            let _ = writeln!(
                out,
                "  received over the run: {} tables ({} of them deltas), {:.1} MiB",
                o.received.0,
                o.received.1,
                o.received.2 as f64 / (1024.0 * 1024.0)
            );
        }
        for (k, p) in o.probes.iter().enumerate() {
            let _ =
                writeln!(
                out,
                "  probe {} {:<4} from weight {:.2}: min {} p50 {} p99 {} max {} ms, {} missed, {} early, \
                 {} versions{}",
                k + 1,
                if p.down { "down" } else { "up" },
                p.baseline,
                fmt_ms(p.latencies_ms.first().copied()),
                fmt_ms(percentile(&p.latencies_ms, 50.0)),
                fmt_ms(percentile(&p.latencies_ms, 99.0)),
                fmt_ms(p.latencies_ms.last().copied()),
                p.missing,
                p.early,
                p.versions,
                if p.quiet { "" } else { " (mesh not quiet before it)" }
            );
        }
        if let Some(e) = &o.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn addresses_are_distinct_and_parse() {
        let a: std::collections::HashSet<String> = (0..70_000).map(fleet::address).collect();
        assert_eq!(a.len(), 70_000);
        for i in [0, 255, 256, 65_535, 65_536] {
            fleet::address(i).parse::<std::net::SocketAddr>().unwrap();
        }
    }
}
