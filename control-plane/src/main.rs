//! `cogmesh`: the operator CLI. Each subcommand is a thin shell over the library: it parses flags,
//! sets up logging and signals, and hands over to the subsystem that does the work.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Log filter used when `RUST_LOG` is not set.
const DEFAULT_LOG_FILTER: &str = "info";

#[derive(Debug, Parser)]
#[command(name = "cogmesh", version, about = "cogmesh operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sample workload: HTTP/1.1, h2c, gRPC (cogmesh.v1.Workload) and WebSocket on one port.
    Workload(WorkloadArgs),
}

#[derive(Debug, Args)]
struct WorkloadArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Instance name reported in `x-served-by` and gRPC `served_by` [default: the listen address].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Workload(args) => workload(args).await,
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
    cogmesh_control::workload::serve(listener, name, shutdown).await?;
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
