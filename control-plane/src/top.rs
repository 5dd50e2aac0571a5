//! `cogmesh top`: a live view of the mesh's traffic, like `linkerd viz stat`/`top`: per service
//! and per endpoint the request rate, success rate, p50 / p99 latency, cognitive load, weight,
//! in-flight requests, breaker state and replicas, read from `MeshAdmin.ListServices` (which the
//! sidecars' load reports feed) every second. `--once` prints one view and exits, as a table or
//! (`--output json`) as one JSON object, for scripts.
//!
//! The numbers are those of the control plane's last weight interval: rates summed over every
//! sidecar that sent requests to the endpoint, latency the highest percentile any of them saw,
//! success `1 − errors/requests` where errors are 5xx and gateway failures.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use cogmesh_proto::v1::{ListServicesRequest, ServiceStatus};
use serde::Serialize;

/// How often the live view refreshes.
pub const REFRESH: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Plain,
    Json,
}

/// One service and its endpoints, as shown.
#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceRow {
    pub service: String,
    pub replicas: u32,
    pub rps: f64,
    /// `None` without requests.
    pub success_rate: Option<f64>,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub cognitive_load: f64,
    pub in_flight: u64,
    /// Endpoints some sidecar has ejected.
    pub breakers_open: usize,
    pub endpoints: Vec<EndpointRow>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct EndpointRow {
    pub address: String,
    pub node: String,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub cognitive_load: f64,
    pub weight: f64,
    pub in_flight: u64,
    /// `open` while a sidecar has the endpoint ejected, else `closed`.
    pub breaker: &'static str,
}

fn success(rps: f64, eps: f64) -> Option<f64> {
    (rps > 0.0).then(|| (1.0 - eps / rps).clamp(0.0, 1.0))
}

/// The rows of the view: services by name; p50 is the request-weighted mean of the endpoints',
/// p99 the highest.
pub fn rows(services: &[ServiceStatus]) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = services
        .iter()
        .map(|s| {
            let endpoints: Vec<EndpointRow> = s
                .endpoints
                .iter()
                .map(|e| EndpointRow {
                    address: e.address.clone(),
                    node: e.node.clone(),
                    rps: e.qps,
                    success_rate: success(e.qps, e.errors_per_second),
                    latency_p50_ms: e.latency_p50_ms,
                    latency_p99_ms: e.latency_p99_ms,
                    cognitive_load: e.cognitive_load,
                    weight: e.weight,
                    in_flight: e.in_flight,
                    breaker: if e.ejected_by > 0 { "open" } else { "closed" },
                })
                .collect();
            let rps: f64 = s.endpoints.iter().map(|e| e.qps).sum();
            let eps: f64 = s.endpoints.iter().map(|e| e.errors_per_second).sum();
            let n = s.endpoints.len().max(1) as f64;
            ServiceRow {
                service: s.name.clone(),
                replicas: s.replicas,
                rps,
                success_rate: success(rps, eps),
                latency_p50_ms: if rps > 0.0 {
                    s.endpoints.iter().map(|e| e.latency_p50_ms * e.qps).sum::<f64>() / rps
                } else {
                    0.0
                },
                latency_p99_ms: s.endpoints.iter().map(|e| e.latency_p99_ms).fold(0.0, f64::max),
                cognitive_load: s.endpoints.iter().map(|e| e.cognitive_load).sum::<f64>() / n,
                in_flight: s.endpoints.iter().map(|e| e.in_flight).sum(),
                breakers_open: endpoints.iter().filter(|e| e.breaker == "open").count(),
                endpoints,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.service.cmp(&b.service));
    rows
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{:.2}%", r * 100.0))
}

/// The plain-text table.
pub fn render(rows: &[ServiceRow]) -> String {
    let mut out = format!(
        "{:<30} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>6} {:>8}  BREAKER\n",
        "SERVICE / ENDPOINT", "REPLICAS", "RPS", "SUCCESS", "P50 ms", "P99 ms", "LOAD", "WEIGHT", "INFLIGHT"
    );
    for s in rows {
        out.push_str(&format!(
            "{:<30} {:>8} {:>9.1} {:>8} {:>8.1} {:>8.1} {:>5.2} {:>6} {:>8}  {}/{} open\n",
            s.service,
            s.replicas,
            s.rps,
            percent(s.success_rate),
            s.latency_p50_ms,
            s.latency_p99_ms,
            s.cognitive_load,
            "-",
            s.in_flight,
            s.breakers_open,
            s.endpoints.len()
        ));
        for e in &s.endpoints {
            out.push_str(&format!(
                "  {:<28} {:>8} {:>9.1} {:>8} {:>8.1} {:>8.1} {:>5.2} {:>6.2} {:>8}  {}\n",
                e.address,
                "",
                e.rps,
                percent(e.success_rate),
                e.latency_p50_ms,
                e.latency_p99_ms,
                e.cognitive_load,
                e.weight,
                e.in_flight,
                e.breaker
            ));
        }
    }
    out
}

/// Runs the view against the control plane at `control`: once, or every [`REFRESH`] until
/// Ctrl-C.
pub async fn run(control: SocketAddr, once: bool, output: Output) -> anyhow::Result<()> {
    let mut admin = crate::cli::admin_client(control).await?;
    let live_terminal = !once && output == Output::Plain && std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let services = admin
            .list_services(ListServicesRequest {})
            .await
            .context("MeshAdmin.ListServices")?
            .into_inner()
            .services;
        let rows = rows(&services);
        let text = match output {
            Output::Json => {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let v = serde_json::json!({ "control": control.to_string(), "unix_ms": unix_ms, "services": rows });
                format!("{v}\n")
            }
            Output::Plain if live_terminal => format!(
                "\x1b[2J\x1b[Hcogmesh top — {control} — every {} s, Ctrl-C to stop\n\n{}",
                REFRESH.as_secs(),
                render(&rows)
            ),
            Output::Plain => format!("{}\n", render(&rows)),
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        if once {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::EndpointStatus;

    #[test]
    fn services_sum_rates_and_weigh_latencies() {
        let e = |address: &str, qps, eps, p50, p99, ejected_by| EndpointStatus {
            address: address.into(),
            weight: 1.0,
            qps,
            errors_per_second: eps,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            ejected_by,
            ..Default::default()
        };
        let services = vec![ServiceStatus {
            name: "web".into(),
            replicas: 2,
            endpoints: vec![
                e("a:1", 30.0, 3.0, 2.0, 10.0, 0),
                e("b:1", 10.0, 7.0, 6.0, 40.0, 1),
            ],
        }];
        let rows = rows(&services);
        let s = &rows[0];
        assert_eq!(s.rps, 40.0);
        assert_eq!(s.success_rate, Some(0.75));
        assert_eq!(s.latency_p50_ms, 3.0);
        assert_eq!(s.latency_p99_ms, 40.0);
        assert_eq!(s.breakers_open, 1);
        assert_eq!(s.endpoints[0].success_rate, Some(0.9));
        assert_eq!(s.endpoints[1].breaker, "open");
        let text = render(&rows);
        assert!(text.contains("75.00%"), "{text}");
        assert!(text.contains("1/2 open"), "{text}");
        let idle = rows_of_idle();
        assert_eq!(idle[0].success_rate, None);
        assert!(render(&idle).contains(" -"));
    }

    fn rows_of_idle() -> Vec<ServiceRow> {
        rows(&[ServiceStatus {
            name: "idle".into(),
            replicas: 1,
            endpoints: vec![EndpointStatus::default()],
        }])
    }
}
