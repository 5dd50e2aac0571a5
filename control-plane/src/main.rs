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
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// gRPC address to listen on.
    #[arg(long, value_name = "ADDR", default_value = cogmesh_control::control::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// How often endpoint weights are recomputed from sidecar reports, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = cogmesh_control::control::DEFAULT_WEIGHT_INTERVAL_MS)]
    weight_interval_ms: u64,
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

async fn control(args: ControlArgs) -> anyhow::Result<()> {
    if args.weight_interval_ms == 0 {
        anyhow::bail!("--weight-interval-ms: must be greater than 0");
    }
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    tracing::info!(address = %args.listen, "control plane listening");
    let config = cogmesh_control::control::ControlConfig {
        weight_interval: std::time::Duration::from_millis(args.weight_interval_ms),
    };
    cogmesh_control::control::serve(listener, config, shutdown)
        .await
        .context("serving the control plane")?;
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
