//! The strategies compared and the proxy process that runs each: `cogmesh-proxy` with
//! `--balancer cognitive | round_robin | p2c_ewma`, or Envoy with a static cluster whose
//! `lb_policy` is `LEAST_REQUEST` (P2C on active requests, the default `choice_count` of 2).
//!
//! Both get one worker (`--workers 1`, `--concurrency 1`), the same endpoints in the same order,
//! and the same response timeout (cogmesh `--response-timeout-ms`, Envoy's route `timeout`).
//! Envoy's circuit breakers are raised so that its own 503s (overflow) do not mix into the
//! comparison; it has no outlier detection and no retries, as configured by default. cogmesh
//! ejects an endpoint for 10 s after a timeout or a refused connection, as it always does.
//!
//! Owns: the command lines, the Envoy bootstrap, and readiness (the admin `/ready` answers 200
//! and a real `GET /work` through the proxy answers 200).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cogmesh_bench::procs::{self, Server};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Cognitive,
    RoundRobin,
    P2cEwma,
    /// cogmesh's own `least_request` (not in the default set; for diagnosis: the same P2C on
    /// in-flight counts as Envoy's, inside cogmesh).
    LeastRequest,
    EnvoyLeastRequest,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Cognitive,
        Variant::RoundRobin,
        Variant::P2cEwma,
        Variant::LeastRequest,
        Variant::EnvoyLeastRequest,
    ];

    /// The name on the command line (`--variants`) and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Cognitive => "cognitive",
            Variant::RoundRobin => "round_robin",
            Variant::P2cEwma => "p2c_ewma",
            Variant::LeastRequest => "least_request",
            Variant::EnvoyLeastRequest => "envoy",
        }
    }

    /// The name in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Cognitive => "cogmesh cognitive",
            Variant::RoundRobin => "cogmesh round_robin",
            Variant::P2cEwma => "cogmesh p2c_ewma",
            Variant::LeastRequest => "cogmesh least_request",
            Variant::EnvoyLeastRequest => "Envoy LEAST_REQUEST",
        }
    }

    pub fn parse(name: &str) -> Result<Variant> {
        if name == "envoy_least_request" {
            return Ok(Variant::EnvoyLeastRequest);
        }
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == name)
            .with_context(|| {
                format!("unknown variant {name:?} (cognitive, round_robin, p2c_ewma, least_request, envoy)")
            })
    }

    /// The `--balancer` of cogmesh-proxy; `None` for Envoy.
    pub fn cogmesh_balancer(self) -> Option<&'static str> {
        match self {
            Variant::Cognitive => Some("cognitive"),
            Variant::RoundRobin => Some("round_robin"),
            Variant::P2cEwma => Some("p2c_ewma"),
            Variant::LeastRequest => Some("least_request"),
            Variant::EnvoyLeastRequest => None,
        }
    }
}

/// The programs the bench starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub proxy: PathBuf,
    /// `cogmesh` (for `cogmesh workload`).
    pub workload: PathBuf,
    pub envoy: Option<PathBuf>,
    pub oha: PathBuf,
}

/// A proxy in front of the fleet; stopped when dropped.
pub struct Proxy {
    pub server: Server,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Proxy {
    pub fn start(
        variant: Variant,
        bins: &Binaries,
        upstreams: &[SocketAddr],
        timeout_ms: u64,
        dir: &Path,
    ) -> Result<Proxy> {
        let listen = procs::loopback(procs::free_port()?);
        let admin = procs::loopback(procs::free_port()?);
        let mut command;
        match variant.cogmesh_balancer() {
            Some(balancer) => {
                command = Command::new(&bins.proxy);
                command
                    .args(["--listen", &listen.to_string()])
                    .args(["--admin", &admin.to_string()])
                    .args(["--balancer", balancer])
                    .args(["--workers", "1"])
                    .args(["--response-timeout-ms", &timeout_ms.to_string()])
                    .args(["--log-level", "warn"]);
                for upstream in upstreams {
                    command.args(["--upstream", &upstream.to_string()]);
                }
            }
            None => {
                let envoy = bins.envoy.as_ref().context("Envoy is not installed")?;
                let conf = dir.join("envoy.yaml");
                fs::write(&conf, envoy_config(listen, admin, upstreams, timeout_ms))?;
                command = Command::new(envoy);
                command
                    .arg("-c")
                    .arg(&conf)
                    .args(["--concurrency", "1"])
                    .arg("--disable-hot-restart")
                    .args(["--log-level", "warn"]);
            }
        }
        let mut server = Server::spawn(variant.name(), &mut command, dir)?;
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        loop {
            procs::check_interrupted()?;
            server.check_alive()?;
            let err = match probe(listen, admin) {
                Ok(()) => break,
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after {limit:?}: {err:#}; log:\n{}",
                    variant.label(),
                    server.log_tail(15)
                );
            }
            procs::sleep(Duration::from_millis(50))?;
        }
        Ok(Proxy {
            server,
            listen,
            admin,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/work", self.listen)
    }
}

fn probe(listen: SocketAddr, admin: SocketAddr) -> Result<()> {
    let (status, _) = procs::http1_get(admin, "/ready", Duration::from_secs(1))?;
    if status != 200 {
        bail!("admin /ready answered {status}");
    }
    let (status, body) = procs::http1_get(listen, "/work", Duration::from_secs(5))?;
    if status != 200 {
        bail!(
            "GET /work through the proxy answered {status}: {:.200}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// A protobuf JSON duration: `1.000s`.
fn duration(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// Envoy bootstrap: one HTTP listener routing everything to one static cluster of `upstreams`
/// balanced by `LEAST_REQUEST`, with the route timeout `timeout_ms` and an admin listener.
pub fn envoy_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstreams: &[SocketAddr],
    timeout_ms: u64,
) -> String {
    let addr = cogmesh_bench::peers::envoy_address;
    let endpoints: String = upstreams
        .iter()
        .map(|u| format!("        - endpoint: {{ address: {} }}\n", addr(*u)))
        .collect();
    format!(
        "admin:
  address: {admin}
static_resources:
  listeners:
  - name: bench
    address: {listen}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: workloads, timeout: {timeout} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: workloads
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - {{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100000 }}
    load_assignment:
      cluster_name: workloads
      endpoints:
      - lb_endpoints:
{endpoints}",
        admin = addr(admin),
        listen = addr(listen),
        timeout = duration(timeout_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_round_trip_by_name() {
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.name()).unwrap(), v);
        }
        assert_eq!(Variant::parse("least_request").unwrap(), Variant::LeastRequest);
        assert_eq!(
            Variant::parse("envoy_least_request").unwrap(),
            Variant::EnvoyLeastRequest
        );
        assert!(Variant::parse("ring_hash").is_err());
        assert_eq!(Variant::EnvoyLeastRequest.cogmesh_balancer(), None);
    }

    #[test]
    fn envoy_cluster_lists_every_upstream_with_least_request() {
        let a = |p| procs::loopback(p);
        let conf = envoy_config(a(1), a(2), &[a(11), a(12), a(13)], 1000);
        assert!(conf.contains("lb_policy: LEAST_REQUEST"));
        assert!(conf.contains("timeout: 1.000s"));
        for port in [11, 12, 13] {
            assert!(conf.contains(&format!("port_value: {port} }} }} }}")));
        }
        assert_eq!(conf.matches("- endpoint:").count(), 3);
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
        assert_eq!(duration(15_000), "15.000s");
        assert_eq!(duration(250), "0.250s");
    }
}
