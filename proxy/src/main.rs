//! `cogmesh-proxy`: command-line entry point. Quick mode builds a configuration from flags;
//! full mode reads `--config proxy.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cogmesh_proxy::config::{ProxyConfig, UpstreamProtocol, DEFAULT_ADMIN_ADDR};

/// The cogmesh sidecar proxy: routes HTTP/1.1, HTTP/2 and gRPC to the endpoint that will answer
/// soonest.
///
/// Quick mode:  cogmesh-proxy --listen 127.0.0.1:4140 --upstream 127.0.0.1:8080 [--upstream ...]
/// Full mode:   cogmesh-proxy --config proxy.yaml
#[derive(Parser, Debug)]
#[command(name = "cogmesh-proxy", version, verbatim_doc_comment)]
struct Args {
    /// Configuration file (YAML): listeners, services, endpoints and routes. Excludes --listen
    /// and --upstream.
    #[arg(long, conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,

    /// Quick mode: address of the (outbound) listener.
    #[arg(long, requires = "upstream")]
    listen: Option<SocketAddr>,

    /// Quick mode: an endpoint of the one service; repeat for several endpoints.
    #[arg(long, requires = "listen")]
    upstream: Vec<SocketAddr>,

    /// Admin server address (/live, /ready, /metrics, /config). Overrides the file's `admin`.
    #[arg(long)]
    admin: Option<SocketAddr>,

    /// Worker threads, each with its own runtime and SO_REUSEPORT listener. Overrides the file.
    #[arg(long)]
    workers: Option<usize>,

    /// Quick mode: protocol to the upstream (auto = same as the client's).
    #[arg(long, value_enum, default_value_t = UpstreamProtocol::Auto)]
    protocol: UpstreamProtocol,

    /// Quick mode: milliseconds the upstream may take to send response headers (504 after);
    /// 0 disables.
    #[arg(long)]
    response_timeout_ms: Option<u64>,

    /// Milliseconds an upstream TCP connect may take (502 after). Overrides the file.
    #[arg(long)]
    connect_timeout_ms: Option<u64>,

    /// Milliseconds in-flight requests may take to finish after SIGTERM. Overrides the file.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,

    /// Log filter, e.g. `info` or `cogmesh_proxy=debug` (RUST_LOG syntax).
    #[arg(long, env = "COGMESH_LOG", default_value = "info")]
    log_level: String,

    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_level, &args.log_format);
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cogmesh-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cogmesh_proxy::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cogmesh-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &Args) -> Result<ProxyConfig, cogmesh_proxy::config::ConfigError> {
    const FLAGS: &str = "<command line>";
    let (mut config, source) = match (&args.config, args.listen) {
        (Some(path), _) => (ProxyConfig::from_file(path)?, path.display().to_string()),
        (None, Some(listen)) => {
            let admin = DEFAULT_ADMIN_ADDR.parse().expect("constant address parses");
            let mut c = ProxyConfig::quick(listen, args.upstream.clone(), admin);
            c.services[0].protocol = args.protocol;
            if let Some(ms) = args.response_timeout_ms {
                c.services[0].response_timeout_ms = ms;
            }
            (c, FLAGS.to_string())
        }
        (None, None) => {
            return Err(cogmesh_proxy::config::ConfigError {
                file: FLAGS.into(),
                field: "--config / --listen".into(),
                reason: "give either --config FILE or --listen ADDR with at least one --upstream ADDR".into(),
            })
        }
    };
    if let Some(a) = args.admin {
        config.admin = a;
    }
    if let Some(w) = args.workers {
        config.workers = w;
    }
    if let Some(ms) = args.connect_timeout_ms {
        config.connect_timeout_ms = ms;
    }
    if let Some(ms) = args.drain_timeout_ms {
        config.drain_timeout_ms = ms;
    }
    // Flags can break what the file alone satisfied (e.g. --workers 0): validate the result,
    // naming the flags when they were the source.
    let origin = if args.config.is_some() && (args.admin.is_some() || args.workers.is_some()) {
        format!("{source} (with command-line overrides)")
    } else {
        source
    };
    config.validate(&origin)?;
    Ok(config)
}

fn init_logging(filter: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
