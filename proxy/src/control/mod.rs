//! The sidecar's side of `MeshControl.Connect`: say Hello, report load every
//! `report_interval`, apply every routing table the control plane pushes (or refuse it with a
//! NACK that says why), and keep routing when the control plane is gone.
//!
//! Tables come whole or, once the sidecar runs one, as a delta against it (`accepts_deltas` in
//! the Hello): the delta is applied to the last accepted table and the result is checked,
//! applied, saved and answered exactly like a whole table. A delta that does not fit (another
//! base version, an endpoint to remove that is not there) is NACKed and the table kept.
//!
//! Static stability: every accepted table is written to `state_file` (protobuf, written to a
//! temporary file and renamed) and applied at start before the control plane is reached; while
//! it is unreachable the sidecar keeps its table and reconnects with jittered exponential
//! backoff; pushed weights fall back to neutral only after `weight_expiry`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cogmesh_proto::v1::mesh_control_client::MeshControlClient;
use cogmesh_proto::v1::{
    control_message, sidecar_message, Ack, EndpointLoad, Hello, Load, LoadReport, Nack,
    RoutingTable as TableMsg, SidecarMessage,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub mod failover;

use self::failover::{ControlTargets, NextAttempt};
use crate::config::ControlConfig;
use crate::route::EndpointOverrides;
use crate::server::State;

/// First reconnect delay; doubles up to `MAX_BACKOFF_MS`, with full jitter.
pub const BASE_BACKOFF_MS: u64 = 250;
pub const MAX_BACKOFF_MS: u64 = 30_000;

/// The delay before reconnect attempt `attempt` (0-based), given a uniform draw `u ∈ [0, 1)`:
/// full jitter over an exponentially growing, capped window.
pub fn backoff(attempt: u32, u: f64) -> Duration {
    let window = BASE_BACKOFF_MS
        .saturating_mul(1u64 << attempt.min(16))
        .min(MAX_BACKOFF_MS);
    Duration::from_millis(((window as f64) * u.clamp(0.0, 1.0)) as u64).max(Duration::from_millis(10))
}

/// Why a pushed table was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TableError {
    #[error("service {service:?}: endpoint {address:?} is not an IP:port address")]
    BadAddress { service: String, address: String },
    #[error("service {service:?}: endpoint {address} has weight {weight}, expected a finite number > 0")]
    BadWeight {
        service: String,
        address: String,
        weight: f64,
    },
    #[error("service {service:?}: endpoint {address} is listed twice")]
    Duplicate { service: String, address: String },
    #[error("service {service:?}: endpoint {address} is this proxy's own listener (a routing loop)")]
    Loop { service: String, address: SocketAddr },
}

/// Checks a pushed table and turns it into endpoint overrides for the services this sidecar
/// routes to. Services it does not know are ignored.
pub fn overrides_from(
    table: &TableMsg,
    known: &HashSet<&str>,
    own_listeners: &HashSet<SocketAddr>,
) -> Result<EndpointOverrides, TableError> {
    let mut out = EndpointOverrides::new();
    for s in &table.services {
        let mut members = Vec::with_capacity(s.endpoints.len());
        let mut seen = HashSet::new();
        for e in &s.endpoints {
            let address: SocketAddr = e.address.parse().map_err(|_| TableError::BadAddress {
                service: s.name.clone(),
                address: e.address.clone(),
            })?;
            if !(e.weight.is_finite() && e.weight > 0.0) {
                return Err(TableError::BadWeight {
                    service: s.name.clone(),
                    address: e.address.clone(),
                    weight: e.weight,
                });
            }
            if !seen.insert(address) {
                return Err(TableError::Duplicate {
                    service: s.name.clone(),
                    address: e.address.clone(),
                });
            }
            if known.contains(s.name.as_str()) && own_listeners.contains(&address) {
                return Err(TableError::Loop {
                    service: s.name.clone(),
                    address,
                });
            }
            members.push((address, e.weight));
        }
        if known.contains(s.name.as_str()) {
            out.insert(s.name.clone(), members);
        }
    }
    Ok(out)
}

/// Applies a pushed (or persisted) table; with `neutral`, all weights become 1.
fn apply(state: &State, table: &TableMsg, neutral: bool) -> Result<(), TableError> {
    let config = state.config.load();
    let mut known: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    let own: HashSet<SocketAddr> = config.listeners.iter().map(|l| l.address).collect();
    if config.transparent.is_some() {
        // Transparent mode routes to every service of the mesh: the original destination of a
        // captured connection finds it (see crate::transparent::pushed_services). A pushed
        // service that lists one of our listeners (our own registration, without
        // --instance-address) is left out rather than refusing the table.
        known.extend(
            table
                .services
                .iter()
                .filter(|s| {
                    !s.endpoints
                        .iter()
                        .any(|e| e.address.parse().is_ok_and(|a: SocketAddr| own.contains(&a)))
                })
                .map(|s| s.name.as_str()),
        );
    }
    let mut overrides = overrides_from(table, &known, &own)?;
    if neutral {
        for members in overrides.values_mut() {
            for m in members.iter_mut() {
                m.1 = 1.0;
            }
        }
    }
    state.rebuild_table(|pushed| *pushed = (overrides, table.version));
    Ok(())
}

fn persist(path: &Path, table: &TableMsg) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, table.encode_to_vec())?;
    std::fs::rename(&tmp, path)
}

/// Applies the table kept in `state_file`, if there is a readable one.
pub fn restore(state: &State, config: &ControlConfig) -> Option<TableMsg> {
    let path = config.state_file.as_ref()?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), "cannot read the saved routing table: {e}");
            return None;
        }
    };
    let table = match TableMsg::decode(bytes.as_slice()) {
        Ok(t) => t,
        Err(e) => {
            warn!(path = %path.display(), "ignoring a corrupt saved routing table: {e}");
            return None;
        }
    };
    match apply(state, &table, false) {
        Ok(()) => {
            info!(version = table.version, path = %path.display(), "routing from the saved table");
            Some(table)
        }
        Err(e) => {
            warn!(path = %path.display(), "ignoring the saved routing table: {e}");
            None
        }
    }
}

/// The services a sidecar asks the control plane for: those it routes to, or (none listed) all
/// of them, as a transparent sidecar needs (the original destination picks the service).
fn subscriptions(config: &crate::config::ProxyConfig) -> Vec<String> {
    if config.transparent.is_some() {
        return Vec::new();
    }
    config.services.iter().map(|s| s.name.clone()).collect()
}

/// Runs the control-plane session forever: connect, serve, reconnect.
pub async fn run(state: Arc<State>, config: ControlConfig) {
    let mut last = restore(&state, &config);
    let instance_address = config
        .instance_address
        .unwrap_or_else(|| state.config.load().listeners[0].address);
    let hello = Hello {
        node: config
            .node
            .clone()
            .unwrap_or_else(|| format!("{}@{}", config.service, instance_address)),
        service: config.service.clone(),
        instance_address: instance_address.to_string(),
        zone: config.zone.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        table_version: last.as_ref().map_or(0, |t| t.version),
        subscriptions: subscriptions(&state.config.load()),
        accepts_deltas: true,
    };
    let expiry = Duration::from_millis(config.weight_expiry_ms);
    let mut last_contact = Instant::now();
    let mut neutralized = false;
    let mut targets = ControlTargets::new(config.addresses.clone());
    loop {
        let mut joined = false;
        let hello = Hello {
            table_version: last.as_ref().map_or(0, |t| t.version),
            ..hello.clone()
        };
        let address = targets.current().to_string();
        let outcome = session(&state, &config, &address, hello, &mut last, &mut joined).await;
        match outcome {
            Ok(()) => info!(control = %address, "control plane closed the stream"),
            Err(e) => warn!(
                control = %address,
                "control plane unreachable: {}",
                crate::error::error_chain(e.as_ref())
            ),
        }
        if joined {
            // The session got somewhere: start the backoff over.
            last_contact = Instant::now();
            neutralized = false;
        }
        if !neutralized && last_contact.elapsed() >= expiry {
            if let Some(t) = &last {
                if apply(&state, t, true).is_ok() {
                    warn!(
                        "no control plane for {} s: weights back to neutral",
                        expiry.as_secs()
                    );
                    neutralized = true;
                }
            }
        }
        let delay = match targets.after_session(joined) {
            NextAttempt::Now => continue,
            NextAttempt::Backoff { round } => backoff(round, fastrand::f64()),
        };
        debug!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting to the control plane"
        );
        tokio::time::sleep(delay).await;
    }
}

/// One stream: Hello, then reports out and tables in until it ends.
async fn session(
    state: &Arc<State>,
    config: &ControlConfig,
    address: &str,
    hello: Hello,
    last: &mut Option<TableMsg>,
    joined: &mut bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Over TLS with the workload certificate when the identity section says the control
    // plane serves TLS; plaintext otherwise.
    let identity = state.config.load().identity.clone();
    let channel = crate::identity::control_channel(identity.as_ref(), address, true).await?;
    let mut client = MeshControlClient::new(channel);
    let (tx, rx) = mpsc::channel::<SidecarMessage>(16);
    tx.send(SidecarMessage {
        kind: Some(sidecar_message::Kind::Hello(hello)),
    })
    .await?;
    let mut inbound = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(control = %address, "joined the control plane");
    *joined = true;

    let reporter = tokio::spawn(report_loop(
        Arc::clone(state),
        tx.clone(),
        Duration::from_millis(config.report_interval_ms),
    ));
    let result = loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        let table = match message.kind {
            Some(control_message::Kind::RoutingTable(table)) => table,
            Some(control_message::Kind::RoutingTableDelta(delta)) => {
                let empty = TableMsg::default();
                match cogmesh_proto::delta::apply(last.as_ref().unwrap_or(&empty), &delta) {
                    Ok(table) => table,
                    Err(e) => {
                        warn!(version = delta.version, "refusing routing table delta: {e}");
                        let nack = sidecar_message::Kind::Nack(Nack {
                            version: delta.version,
                            error: e.to_string(),
                        });
                        if tx.send(SidecarMessage { kind: Some(nack) }).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                }
            }
            Some(control_message::Kind::ScalingDecision(d)) => {
                info!(
                    service = %d.service, from = d.from_replicas, to = d.to_replicas, metric = %d.metric,
                    "scaling decision: {}", d.reason
                );
                continue;
            }
            None => continue,
        };
        let reply = match apply(state, &table, false) {
            Ok(()) => {
                info!(version = table.version, "applied routing table");
                if let Some(path) = &config.state_file {
                    if let Err(e) = persist(path, &table) {
                        warn!(path = %path.display(), "cannot save the routing table: {e}");
                    }
                }
                let version = table.version;
                *last = Some(table);
                sidecar_message::Kind::Ack(Ack { version })
            }
            Err(e) => {
                warn!(version = table.version, "refusing routing table: {e}");
                sidecar_message::Kind::Nack(Nack {
                    version: table.version,
                    error: e.to_string(),
                })
            }
        };
        if tx.send(SidecarMessage { kind: Some(reply) }).await.is_err() {
            break Ok(());
        }
    };
    reporter.abort();
    result
}

/// Sends a LoadReport every `interval` with what this sidecar saw of each endpoint.
async fn report_loop(state: Arc<State>, tx: mpsc::Sender<SidecarMessage>, interval: Duration) {
    type Counts = (u64, u64, [u64; crate::balance::latency::BUCKETS]);
    let mut previous: HashMap<(String, SocketAddr), Counts> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let secs = interval.as_secs_f64();
        let table = state.table.load();
        let mut endpoints = Vec::new();
        let mut instance = Load::default();
        for s in &table.services {
            let stale = s.endpoints.load_staleness();
            for e in s.endpoints.endpoints() {
                let key = (s.name.clone(), e.addr);
                let (picks, failures, latency) = (e.picks(), e.failures(), e.latency().snapshot());
                let (p0, f0, l0) = previous
                    .insert(key, (picks, failures, latency))
                    .unwrap_or((picks, failures, latency));
                let quantile = |q| crate::balance::latency::quantile_ms(&l0, &latency, q).unwrap_or(0.0);
                // The balancer uses demand past 1 (a queue longer than the capacity); the
                // report keeps the protocol's [0, 1].
                let load = e.fresh_load(stale).unwrap_or(0.0).min(1.0);
                instance.in_flight += e.in_flight();
                // An inbound sidecar fronts its own app: the app's load is the instance's.
                if table
                    .listeners
                    .iter()
                    .all(|l| l.direction == crate::config::Direction::Inbound)
                {
                    instance.cognitive_load = instance.cognitive_load.max(load);
                }
                endpoints.push(EndpointLoad {
                    service: s.name.clone(),
                    address: e.addr.to_string(),
                    load: Some(Load {
                        cognitive_load: load,
                        reasoning_throughput_rps: picks.saturating_sub(p0) as f64 / secs,
                        errors_per_second: failures.saturating_sub(f0) as f64 / secs,
                        latency_p50_ms: quantile(0.5),
                        latency_p99_ms: quantile(0.99),
                        in_flight: e.in_flight(),
                        ..Default::default()
                    }),
                    ejected: e.is_ejected(),
                });
            }
        }
        let report = LoadReport {
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            instance: Some(instance),
            endpoints,
        };
        if tx
            .send(SidecarMessage {
                kind: Some(sidecar_message::Kind::LoadReport(report)),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::{ServiceEndpoints, WeightedEndpoint};

    fn table(endpoints: &[(&str, f64)]) -> TableMsg {
        TableMsg {
            version: 7,
            services: vec![
                ServiceEndpoints {
                    name: "reasoning".into(),
                    endpoints: endpoints
                        .iter()
                        .map(|(a, w)| WeightedEndpoint {
                            address: a.to_string(),
                            weight: *w,
                        })
                        .collect(),
                },
                ServiceEndpoints {
                    name: "elsewhere".into(),
                    endpoints: vec![],
                },
            ],
        }
    }

    fn check(t: &TableMsg) -> Result<EndpointOverrides, TableError> {
        let known = HashSet::from(["reasoning"]);
        let own = HashSet::from(["127.0.0.1:4140".parse().unwrap()]);
        overrides_from(t, &known, &own)
    }

    #[test]
    fn accepts_known_services_and_ignores_others() {
        let o = check(&table(&[("127.0.0.1:1", 1.0), ("127.0.0.1:2", 2.5)])).unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(o["reasoning"][1], ("127.0.0.1:2".parse().unwrap(), 2.5));
    }

    #[test]
    fn refuses_bad_tables_saying_why() {
        assert_eq!(
            check(&table(&[("nowhere", 1.0)])).unwrap_err().to_string(),
            r#"service "reasoning": endpoint "nowhere" is not an IP:port address"#
        );
        assert!(matches!(
            check(&table(&[("127.0.0.1:1", f64::NAN)])),
            Err(TableError::BadWeight { .. })
        ));
        assert!(matches!(
            check(&table(&[("127.0.0.1:1", 0.0)])),
            Err(TableError::BadWeight { .. })
        ));
        assert!(matches!(
            check(&table(&[("127.0.0.1:1", 1.0), ("127.0.0.1:1", 1.0)])),
            Err(TableError::Duplicate { .. })
        ));
        assert!(matches!(
            check(&table(&[("127.0.0.1:4140", 1.0)])),
            Err(TableError::Loop { .. })
        ));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(0, 0.5), Duration::from_millis(125));
        assert_eq!(backoff(3, 0.5), Duration::from_millis(1000));
        assert_eq!(backoff(30, 0.999_999), Duration::from_millis(29_999));
        assert_eq!(backoff(5, 0.0), Duration::from_millis(10));
    }
}
