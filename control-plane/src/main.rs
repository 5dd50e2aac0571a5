//! `cogmesh`: the operator CLI. Each subcommand is a thin shell over the library: it parses flags,
//! sets up logging and signals, and hands over to the subsystem that does the work.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cogmesh_control::workload::{sim, OrcaForm, ServiceTimeDist, SimConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Log filter used when neither `--log-level` nor `COGMESH_LOG` is given.
const DEFAULT_LOG_FILTER: &str = "info";

#[derive(Debug, Parser)]
#[command(name = "cogmesh", version, about = "cogmesh operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter, e.g. `info` or `cogmesh_control=debug` (RUST_LOG syntax).
    #[arg(long, global = true, env = "COGMESH_LOG", default_value = DEFAULT_LOG_FILTER)]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sample workload: HTTP/1.1, h2c, gRPC (cogmesh.v1.Workload) and WebSocket on one port.
    Workload(WorkloadArgs),
    /// Run the control plane: sidecars connect to it (MeshControl), operators query it
    /// (MeshAdmin); gRPC health and reflection are served too.
    Control(ControlArgs),
    /// Validate a control.yaml (and its environment layers) without starting anything.
    Check(CheckArgs),
    /// Services, endpoints and their weights, from a running control plane.
    Routes(AdminArgs),
    /// A live view of every service and endpoint: rps, success rate, p50/p99 latency,
    /// cognitive load, weight, in flight, breaker state, replicas; refreshed every second.
    Top(TopArgs),
    /// Sidecars and their sync state (versions ACKed, NACKed and why), and the control plane's
    /// configuration status.
    Status(AdminArgs),
    /// Start a local mesh from a mesh file (control plane, every replica behind its own
    /// sidecar), wait until all are ready, and keep it up until Ctrl-C or `cogmesh down`.
    Up(UpArgs),
    /// Stop the local mesh `cogmesh up` started.
    Down(DownArgs),
    /// Bring the example mesh up, drive a load pattern through it with a live view, print a
    /// summary and stop everything.
    Demo(DemoArgs),
    /// Add the sidecar and its init container to every pod template of Kubernetes manifests
    /// (opt out with the annotation `cogmesh.io/inject: disabled`); idempotent.
    Inject(cogmesh_control::inject::InjectArgs),
    /// Autoscaling: `cogmesh scaling history` lists the decisions a control plane recorded.
    #[command(subcommand)]
    Scaling(ScalingCommand),
}

#[derive(Debug, Args)]
struct MeshArgs {
    /// The mesh file.
    #[arg(default_value = "deploy/local/mesh.yaml")]
    file: std::path::PathBuf,
    /// Layer mesh.<environment>.yaml (beside the file) on top: development, staging, production.
    #[arg(long)]
    environment: Option<String>,
    /// The control plane's gRPC address [default: from the file, else 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
    /// The control plane's metrics address [default: from the file].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

impl MeshArgs {
    fn load(&self) -> anyhow::Result<cogmesh_control::local::mesh::MeshFile> {
        let mut file = cogmesh_control::local::mesh::MeshFile::load(&self.file, self.environment.as_deref())?;
        if let Some(c) = self.control {
            file.control.listen = Some(c);
        }
        if let Some(m) = self.metrics {
            file.control.metrics = Some(m);
        }
        Ok(file)
    }
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    mesh: MeshArgs,
}

#[derive(Debug, Args)]
struct DownArgs {
    /// The control plane address of the mesh to stop.
    #[arg(long, value_name = "ADDR", default_value = cogmesh_control::control::DEFAULT_LISTEN)]
    control: SocketAddr,
}

#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    mesh: MeshArgs,
    /// How long the load pattern runs, e.g. 60s or 2m (at least 20s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s or 2m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        _ => return Err(format!("{s:?}: use s or m")),
    };
    if !(20..=3600).contains(&secs) {
        return Err(format!("{s:?} is not between 20s and 60m"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Subcommand)]
enum ScalingCommand {
    /// Every scaling decision recorded (oldest first), with its metric and reason.
    History(HistoryArgs),
}

#[derive(Debug, Args)]
struct HistoryArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only this service's decisions.
    #[arg(long)]
    service: Option<String>,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// control.yaml; its environment file (control.<environment>.yaml) is layered on top, then
    /// COGMESH_* variables, then these flags. Watched and reloaded on change or SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// gRPC address to listen on [default: from the file, else 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// How often endpoint weights are recomputed from sidecar reports, in milliseconds.
    #[arg(long, value_name = "MS")]
    weight_interval_ms: Option<u64>,
    /// HTTP address serving Prometheus metrics on GET /metrics [default: from the file, else none].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// After a restart into a running mesh, hold pushes this long so every sidecar can
    /// reconnect first (a fresh mesh is served at once).
    #[arg(long, value_name = "MS", default_value_t = cogmesh_control::control::DEFAULT_STARTUP_GRACE_MS)]
    startup_grace_ms: u64,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The control.yaml to validate (with its environment file and COGMESH_* variables).
    file: std::path::PathBuf,
}

#[derive(Debug, Args)]
struct AdminArgs {
    /// The control plane's gRPC address.
    #[arg(long, value_name = "ADDR", default_value = cogmesh_control::control::DEFAULT_LISTEN)]
    control: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TopArgs {
    /// The control plane's gRPC address.
    #[arg(long, value_name = "ADDR", default_value = cogmesh_control::control::DEFAULT_LISTEN)]
    control: SocketAddr,
    /// Print one view and exit.
    #[arg(long)]
    once: bool,
    /// A table, or one JSON object per view.
    #[arg(long, value_enum, default_value = "plain")]
    output: cogmesh_control::top::Output,
}

#[derive(Debug, Args)]
struct WorkloadArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Instance name reported in `x-served-by` and gRPC `served_by` [default: the listen address].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Simulate a cognitive service: requests to `/work` and gRPC `Infer` served at once; 0 =
    /// unlimited, no queue and no load reports.
    #[arg(long, value_name = "C", default_value_t = 0)]
    capacity: usize,
    /// Requests that may wait for a slot; more are refused at once (503 `queue full`,
    /// `Retry-After: 1`; gRPC RESOURCE_EXHAUSTED).
    #[arg(long, value_name = "Q", default_value_t = sim::DEFAULT_QUEUE)]
    queue: usize,
    /// Mean service time of `/work` and `Infer`, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = sim::DEFAULT_SERVICE_TIME_MS)]
    service_time_ms: f64,
    /// Distribution of the service times around their mean.
    #[arg(long, value_enum, default_value_t = ServiceTimeDist::Exponential)]
    service_time_dist: ServiceTimeDist,
    /// Seed of the service-time draws (same seed, same draws).
    #[arg(long, value_name = "S", default_value_t = sim::DEFAULT_SEED)]
    seed: u64,
    /// Form of the `endpoint-load-metrics` report on HTTP responses (gRPC always gets the
    /// `endpoint-load-metrics-bin` trailer, unless `none`).
    #[arg(long, value_enum, default_value_t = OrcaForm::Text)]
    orca_form: OrcaForm,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, whatever RUST_BACKTRACE says.
            eprintln!("cogmesh: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(&cli.log_level, cli.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Workload(args) => workload(args).await,
            Command::Control(args) => control(args).await,
            Command::Check(args) => check(args),
            Command::Inject(args) => cogmesh_control::inject::run(args),
            Command::Routes(args) => cogmesh_control::cli::routes(args.control, args.json).await,
            Command::Status(args) => cogmesh_control::cli::status(args.control, args.json).await,
            Command::Top(args) => cogmesh_control::top::run(args.control, args.once, args.output).await,
            Command::Up(args) => up(args).await,
            Command::Down(args) => cogmesh_control::local::up::down(args.control),
            Command::Demo(args) => {
                let file = args.mesh.load()?;
                cogmesh_control::local::demo::run(file, args.duration).await
            }
            Command::Scaling(ScalingCommand::History(args)) => {
                cogmesh_control::cli::scaling_history(args.admin.control, args.service, args.admin.json).await
            }
        }
    })
}

async fn workload(args: WorkloadArgs) -> anyhow::Result<()> {
    // Install the handlers before serving, so a signal that comes right after start is not lost.
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let name = args.name.unwrap_or_else(|| local.to_string());
    let sim = SimConfig {
        capacity: args.capacity,
        queue: args.queue,
        service_time_ms: args.service_time_ms,
        service_time_dist: args.service_time_dist,
        seed: args.seed,
        orca_form: args.orca_form,
    };
    cogmesh_control::workload::serve_with(listener, name, sim, shutdown).await?;
    Ok(())
}

fn load_control_config(
    file: Option<&std::path::Path>,
) -> anyhow::Result<cogmesh_control::control::config::Resolved> {
    Ok(cogmesh_control::control::config::load(file, &|k| {
        std::env::var(k).ok()
    })?)
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let resolved = load_control_config(Some(&args.file))?;
    let kubernetes = match &resolved.discovery.kubernetes {
        Some(k) => format!(
            ", EndpointSlices of namespace {}{}",
            k.namespace,
            k.label_selector
                .as_deref()
                .map_or(String::new(), |s| format!(" matching {s}"))
        ),
        None => String::new(),
    };
    println!(
        "{}: valid ({} environment, listen {}, weight interval {} ms, {} static service(s){kubernetes})",
        resolved.sources.join(" + "),
        resolved.environment.as_str(),
        resolved.listen,
        resolved.weight_interval_ms,
        resolved.services.len()
    );
    Ok(())
}

async fn control(args: ControlArgs) -> anyhow::Result<()> {
    let mut resolved = load_control_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        resolved.listen = listen;
    }
    if let Some(ms) = args.weight_interval_ms {
        anyhow::ensure!(
            ms > 0 && ms <= 60_000,
            "--weight-interval-ms: must be between 1 and 60000, got {ms}"
        );
        resolved.weight_interval_ms = ms;
    }
    if let Some(admin) = args.admin_listen {
        resolved.admin_listen = Some(admin);
    }
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let listener = TcpListener::bind(resolved.listen)
        .await
        .with_context(|| format!("listen {}: cannot bind", resolved.listen))?;
    tracing::info!(
        address = %resolved.listen,
        environment = resolved.environment.as_str(),
        "control plane listening"
    );
    let admin = match resolved.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin_listen {addr}: cannot bind"))?,
        ),
        None => None,
    };
    let security =
        cogmesh_control::security::Security::from_config(resolved.identity.as_ref(), resolved.auth.as_ref())
            .map_err(|(field, reason)| {
                let files = if resolved.sources.is_empty() {
                    "<defaults>".to_string()
                } else {
                    resolved.sources.join(" + ")
                };
                anyhow::anyhow!("{files}: {field}: {reason}")
            })?;
    let config = cogmesh_control::control::ControlConfig {
        security,
        resolved,
        startup_grace: std::time::Duration::from_millis(args.startup_grace_ms),
        path: args.config,
        admin,
    };
    cogmesh_control::control::serve(listener, config, shutdown)
        .await
        .context("serving the control plane")?;
    Ok(())
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let file = args.mesh.load()?;
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let started = std::time::Instant::now();
    let mut mesh = cogmesh_control::local::up::Mesh::up(file).await?;
    println!("{}", mesh.status().await);
    println!(
        "up in {:.1} s; Ctrl-C or `cogmesh down --control {}` stops it",
        started.elapsed().as_secs_f64(),
        mesh.control
    );
    shutdown.await;
    println!("stopping the mesh");
    mesh.stop();
    Ok(())
}

/// Logs go to stderr; colours only on a terminal.
fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("--log-level / COGMESH_LOG {filter:?}: not a log filter"))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}
