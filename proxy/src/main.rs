//! `cogmesh-proxy`: command-line entry point. Quick mode builds a configuration from flags;
//! full mode reads `--config proxy.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cogmesh_proxy::config::{
    BalancerKind, ControlConfig, Direction, ProxyConfig, UpstreamProtocol, DEFAULT_ADMIN_ADDR,
    DEFAULT_REPORT_INTERVAL_MS, DEFAULT_WEIGHT_EXPIRY_MS,
};

/// The cogmesh sidecar proxy: routes HTTP/1.1, HTTP/2 and gRPC to the endpoint that will answer
/// soonest.
///
/// Quick mode:  cogmesh-proxy --listen 127.0.0.1:4140 --upstream 127.0.0.1:8080 [--upstream ...]
/// Full mode:   cogmesh-proxy --config proxy.yaml
/// iptables:    cogmesh-proxy init [--proxy-uid 2102] [--remove] [--dry-run] (see `init --help`)
#[derive(Parser, Debug)]
#[command(name = "cogmesh-proxy", version, verbatim_doc_comment)]
struct Args {
    /// Configuration file (YAML): listeners, services, endpoints and routes. Excludes --listen
    /// and --upstream.
    #[arg(long, conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,

    /// Quick mode: address of the listener.
    #[arg(long)]
    listen: Option<SocketAddr>,

    /// Quick mode: an endpoint of the one service; repeat for several endpoints. May be left
    /// out with --control, which then provides the endpoints.
    #[arg(long, requires = "listen")]
    upstream: Vec<SocketAddr>,

    /// Quick mode: the name of the one service (what the control plane calls it).
    #[arg(long, default_value = cogmesh_proxy::config::QUICK_SERVICE)]
    upstream_service: String,

    /// Quick mode: the listener's direction (a metric label; inbound fronts the local app).
    #[arg(long, value_enum, default_value_t = Direction::Outbound)]
    direction: Direction,

    /// Join the control plane at this address (`cogmesh control`, HOST:PORT). Several
    /// (comma-separated or repeated): replicas to fail over between. Overrides the file.
    #[arg(long, requires = "service", value_delimiter = ',', value_name = "HOST:PORT")]
    control: Vec<String>,

    /// Transparent mode without a file: listeners `outbound` on 0.0.0.0:4140 and `inbound` on
    /// 0.0.0.0:4143 receive iptables-redirected connections (see `cogmesh-proxy init`).
    #[arg(long, conflicts_with_all = ["config", "listen"])]
    transparent: bool,

    /// With --control: the service this sidecar's own instance belongs to.
    #[arg(long)]
    service: Option<String>,

    /// With --control: where other sidecars reach this instance [default: the listener].
    #[arg(long)]
    instance_address: Option<SocketAddr>,

    /// With --control: this sidecar's unique name [default: SERVICE@INSTANCE_ADDRESS].
    #[arg(long)]
    node: Option<String>,

    /// With --control: file that keeps the last accepted routing table (static stability).
    #[arg(long)]
    state_file: Option<PathBuf>,

    /// Get a workload certificate for this SPIFFE ID from the control plane's CA and keep it
    /// renewed in --identity-dir (cert.pem, key.pem, ca.pem). Overrides the file's `identity`.
    #[arg(long, value_name = "SPIFFE_ID", requires_all = ["identity_dir", "identity_token_file"])]
    identity: Option<String>,

    /// With --identity: the directory the certificate, key and trust bundle are written to.
    #[arg(long, value_name = "DIR", requires = "identity")]
    identity_dir: Option<PathBuf>,

    /// With --identity: the file holding the bootstrap token that proves the identity.
    #[arg(long, value_name = "FILE", requires = "identity")]
    identity_token_file: Option<PathBuf>,

    /// With --identity: the CA bundle of the control plane's TLS certificate (then the control
    /// plane is called over TLS, and renewals use mTLS).
    #[arg(long, value_name = "FILE", requires = "identity")]
    identity_control_ca: Option<PathBuf>,

    /// Admin server address (/live, /ready, /metrics, /config). Overrides the file's `admin`.
    #[arg(long)]
    admin: Option<SocketAddr>,

    /// Worker threads, each with its own runtime and SO_REUSEPORT listener. Overrides the file.
    #[arg(long)]
    workers: Option<usize>,

    /// Quick mode: protocol to the upstream (auto = same as the client's).
    #[arg(long, value_enum, default_value_t = UpstreamProtocol::Auto)]
    protocol: UpstreamProtocol,

    /// Quick mode: how to pick an endpoint.
    #[arg(long, value_enum, default_value_t = BalancerKind::Cognitive)]
    balancer: BalancerKind,

    /// Quick mode: milliseconds the upstream may take to send response headers (504 after);
    /// 0 disables.
    #[arg(long)]
    response_timeout_ms: Option<u64>,

    /// Milliseconds an upstream TCP connect may take (502 after). Overrides the file.
    #[arg(long)]
    connect_timeout_ms: Option<u64>,

    /// Concurrent HTTP/2 streams per upstream connection before another connection to the
    /// endpoint is opened (up to 8). Overrides the file.
    #[arg(long)]
    http2_streams_per_connection: Option<u64>,

    /// Milliseconds in-flight requests may take to finish after SIGTERM. Overrides the file.
    #[arg(long)]
    drain_timeout_ms: Option<u64>,

    /// Milliseconds to keep serving new connections after SIGTERM (with /ready failing)
    /// before draining. Overrides the file.
    #[arg(long)]
    shutdown_delay_ms: Option<u64>,

    /// Send every request through the full request path, none through the HTTP/1.1 relay
    /// (`http1_relay: false`). Overrides the file.
    #[arg(long)]
    no_http1_relay: bool,

    /// Serve HTTP/2 clients on the `h2` crate (the lane) instead of cogmesh's own HTTP/2 codec
    /// (`own_http2_codec: false`). Overrides the file.
    #[arg(long)]
    no_own_http2_codec: bool,

    /// Priority admission: requests in flight through this instance before low and sheddable
    /// ones are shed and the rest queue (`admission.max_concurrency`). Overrides the file.
    #[arg(long)]
    max_concurrency: Option<u64>,

    /// Export OpenTelemetry spans to this OTLP receiver (`http://host:4317` for gRPC, the
    /// `/v1/traces` URL or its base for HTTP). Overrides the file's `tracing.otlp_endpoint`.
    #[arg(long)]
    otlp_endpoint: Option<String>,

    /// With --otlp-endpoint: OTLP over gRPC or HTTP (protobuf).
    #[arg(long, value_enum)]
    otlp_protocol: Option<cogmesh_proxy::otel::OtlpProtocol>,

    /// With --otlp-endpoint: the share of new traces recorded, 0 to 1 (callers' decisions are
    /// followed).
    #[arg(long)]
    trace_sampling_ratio: Option<f64>,

    /// Write an access log line per request: `stdout`, `stderr` or a file path.
    #[arg(long)]
    access_log: Option<String>,

    /// With --access-log: a template of `{field}`s, or `json`.
    #[arg(long, requires = "access_log")]
    access_log_format: Option<String>,

    /// Log filter, e.g. `info` or `cogmesh_proxy=debug` (RUST_LOG syntax).
    #[arg(long, env = "COGMESH_LOG", default_value = "info")]
    log_level: String,

    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    // `cogmesh-proxy init [...]`: the iptables rules of transparent mode (see `init.rs`).
    if std::env::args().nth(1).as_deref() == Some("init") {
        return cogmesh_proxy::init::main(std::env::args().skip(1));
    }
    let args = Args::parse();
    init_logging(&args.log_level, &args.log_format);
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cogmesh-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let source = args.config.clone().map(|path| {
        let (admin, workers, connect, drain, streams) = (
            args.admin,
            args.workers,
            args.connect_timeout_ms,
            args.drain_timeout_ms,
            args.http2_streams_per_connection,
        );
        let (shutdown_delay, max_concurrency) = (args.shutdown_delay_ms, args.max_concurrency);
        let no_relay = args.no_http1_relay;
        let no_own_codec = args.no_own_http2_codec;
        let control = config.control.clone();
        let identity = args.identity.is_some().then(|| config.identity.clone()).flatten();
        let observe = observe_overrides(&args);
        cogmesh_proxy::reload::ConfigSource {
            path,
            // The same command-line overrides apply to every reloaded file.
            overrides: Box::new(move |c: &mut ProxyConfig| {
                if let Some(a) = admin {
                    c.admin = a;
                }
                if let Some(w) = workers {
                    c.workers = w;
                }
                if let Some(ms) = connect {
                    c.connect_timeout_ms = ms;
                }
                if let Some(ms) = drain {
                    c.drain_timeout_ms = ms;
                }
                if let Some(n) = streams {
                    c.http2_streams_per_connection = n;
                }
                if let Some(ms) = shutdown_delay {
                    c.shutdown_delay_ms = ms;
                }
                if no_relay {
                    c.http1_relay = false;
                }
                if no_own_codec {
                    c.own_http2_codec = false;
                }
                if let Some(n) = max_concurrency {
                    set_max_concurrency(c, n);
                }
                if control.is_some() && c.control.is_none() {
                    c.control = control.clone();
                }
                if identity.is_some() {
                    c.identity = identity.clone();
                }
                observe(c);
            }),
        }
    });
    match cogmesh_proxy::server::run(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(cogmesh_proxy::server::ServeError::Config(e)) => {
            eprintln!("cogmesh-proxy: invalid configuration: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("cogmesh-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--max-concurrency`: the admission limit, with the file's other admission settings if any.
fn set_max_concurrency(config: &mut ProxyConfig, max_concurrency: u64) {
    match &mut config.admission {
        Some(a) => a.max_concurrency = max_concurrency,
        None => {
            config.admission = Some(cogmesh_proxy::admission::AdmissionConfig::with_limit(
                max_concurrency,
            ))
        }
    }
}

fn load(args: &Args) -> Result<ProxyConfig, cogmesh_proxy::config::ConfigError> {
    const FLAGS: &str = "<command line>";
    let listen = match (args.transparent, args.listen) {
        (true, _) => Some(
            cogmesh_proxy::transparent::OUTBOUND_ADDR
                .parse()
                .expect("constant address parses"),
        ),
        (false, listen) => listen,
    };
    let (mut config, source) = match (&args.config, listen) {
        (Some(path), _) => (ProxyConfig::from_file(path)?, path.display().to_string()),
        (None, Some(listen)) => {
            let admin = DEFAULT_ADMIN_ADDR.parse().expect("constant address parses");
            if args.upstream.is_empty() && args.control.is_empty() && !args.transparent {
                return Err(cogmesh_proxy::config::ConfigError {
                    file: FLAGS.into(),
                    field: "--upstream".into(),
                    reason: "give at least one --upstream ADDR (or --control, which provides endpoints)"
                        .into(),
                });
            }
            let mut c = ProxyConfig::quick(listen, args.upstream.clone(), admin);
            c.services[0].name = args.upstream_service.clone();
            c.listeners[0].default_service = Some(args.upstream_service.clone());
            c.listeners[0].direction = args.direction;
            if args.direction == Direction::Inbound {
                c.listeners[0].name = "inbound".into();
            }
            c.services[0].protocol = args.protocol;
            c.services[0].balancer = args.balancer;
            if args.balancer == BalancerKind::RingHash {
                return Err(cogmesh_proxy::config::ConfigError {
                    file: FLAGS.into(),
                    field: "--balancer".into(),
                    reason: "ring_hash needs a hash_key; use a --config file".into(),
                });
            }
            if let Some(ms) = args.response_timeout_ms {
                c.services[0].response_timeout_ms = ms;
            }
            if args.transparent {
                cogmesh_proxy::transparent::quick(&mut c);
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
    if let Some(n) = args.http2_streams_per_connection {
        config.http2_streams_per_connection = n;
    }
    if let Some(ms) = args.shutdown_delay_ms {
        config.shutdown_delay_ms = ms;
    }
    if let Some(n) = args.max_concurrency {
        set_max_concurrency(&mut config, n);
    }
    if args.no_http1_relay {
        config.http1_relay = false;
    }
    if args.no_own_http2_codec {
        config.own_http2_codec = false;
    }
    if let (false, Some(service)) = (args.control.is_empty(), &args.service) {
        config.control = Some(ControlConfig {
            addresses: args.control.clone(),
            service: service.clone(),
            node: args.node.clone(),
            instance_address: args.instance_address,
            zone: String::new(),
            state_file: args.state_file.clone(),
            report_interval_ms: DEFAULT_REPORT_INTERVAL_MS,
            weight_expiry_ms: DEFAULT_WEIGHT_EXPIRY_MS,
        });
    }
    if let (Some(name), Some(dir)) = (&args.identity, &args.identity_dir) {
        config.identity = Some(cogmesh_proxy::identity::IdentityConfig {
            name: name.clone(),
            dir: dir.clone(),
            token: None,
            token_file: args.identity_token_file.clone(),
            control: None,
            control_ca: args.identity_control_ca.clone(),
            renew_fraction: cogmesh_proxy::identity::DEFAULT_RENEW_FRACTION,
        });
    }

    observe_overrides(args)(&mut config);
    config.link_identity();
    // Flags can break what the file alone satisfied (e.g. --workers 0): validate the result,
    // naming the flags when they were the source.
    let origin = if args.config.is_some()
        && (args.admin.is_some() || args.workers.is_some() || args.max_concurrency.is_some())
    {
        format!("{source} (with command-line overrides)")
    } else {
        source
    };
    config.validate(&origin)?;
    Ok(config)
}

/// What the tracing and access-log flags change in a configuration (the file's or quick
/// mode's), applied at start and to every reloaded file.
fn observe_overrides(args: &Args) -> impl Fn(&mut ProxyConfig) + Send + Sync + 'static {
    use cogmesh_proxy::access_log::AccessLogConfig;
    use cogmesh_proxy::otel::{OtlpProtocol, TracingConfig};
    let (endpoint, protocol, ratio) = (
        args.otlp_endpoint.clone(),
        args.otlp_protocol,
        args.trace_sampling_ratio,
    );
    let (log_path, log_format) = (args.access_log.clone(), args.access_log_format.clone());
    move |c: &mut ProxyConfig| {
        if let Some(endpoint) = &endpoint {
            let t = c
                .tracing
                .get_or_insert_with(|| TracingConfig::new(endpoint.clone(), OtlpProtocol::default()));
            t.otlp_endpoint = endpoint.clone();
        }
        if let Some(t) = c.tracing.as_mut() {
            if let Some(p) = protocol {
                t.protocol = p;
            }
            if let Some(r) = ratio {
                t.sampling_ratio = r;
            }
        }
        if let Some(path) = &log_path {
            let mut log = AccessLogConfig {
                path: path.clone(),
                format: cogmesh_proxy::access_log::DEFAULT_FORMAT.into(),
            };
            if let Some(f) = &log_format {
                log.format = f.clone();
            }
            c.access_log = Some(log);
        }
    }
}

/// Logs to stderr as text or JSON lines, through a filter the admin server can change at run
/// time (`PUT /log-level`).
fn init_logging(filter: &str, format: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let (filter, initial) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, filter.to_owned()),
        Err(_) => (EnvFilter::new("info"), "info".to_owned()),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    cogmesh_proxy::admin::log_level::install(&initial, move |new| {
        let parsed = EnvFilter::try_new(new).map_err(|e| e.to_string())?;
        handle.reload(parsed).map_err(|e| e.to_string())
    });
}
