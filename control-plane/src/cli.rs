//! `cogmesh routes`, `cogmesh status` and `cogmesh scaling history`: read a running control
//! plane through `MeshAdmin` and print a table (or JSON with `--json`) for operators.

use std::net::SocketAddr;

use anyhow::Context;
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{
    ConfigStatusRequest, ListScalingDecisionsRequest, ListServicesRequest, SyncStatusRequest,
};
use tonic::transport::Channel;

/// The admin client: over TLS when `COGMESH_CA` names the control plane's CA bundle, with
/// `authorization: Bearer $COGMESH_TOKEN` when that is set (see the control plane's `auth`).
pub type AdminClient = MeshAdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

pub async fn admin_client(control: SocketAddr) -> anyhow::Result<AdminClient> {
    let ca = std::env::var_os("COGMESH_CA");
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{control}"))?
        .connect_timeout(std::time::Duration::from_secs(3));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca)
            .with_context(|| format!("COGMESH_CA: cannot read {}", ca.to_string_lossy()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {control}"))?;
    let token = match std::env::var("COGMESH_TOKEN") {
        Ok(t) => Some(
            format!("Bearer {}", t.trim())
                .parse()
                .context("COGMESH_TOKEN: not a valid header value")?,
        ),
        Err(_) => None,
    };
    Ok(MeshAdminClient::with_interceptor(channel, Bearer(token)))
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            request.metadata_mut().insert("authorization", t.clone());
        }
        Ok(request)
    }
}

pub async fn routes(control: SocketAddr, json: bool) -> anyhow::Result<()> {
    let services = admin_client(control)
        .await?
        .list_services(ListServicesRequest {})
        .await
        .context("MeshAdmin.ListServices")?
        .into_inner()
        .services;
    if json {
        let v: Vec<_> = services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": s.name,
                    "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                        "address": e.address, "weight": e.weight, "node": e.node,
                        "cognitive_load": e.cognitive_load, "qps": e.qps,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:>7} {:>8} {:>8}  NODE",
        "SERVICE", "ENDPOINT", "WEIGHT", "LOAD", "QPS"
    );
    for s in &services {
        for e in &s.endpoints {
            println!(
                "{:<24} {:<22} {:>7.2} {:>8.2} {:>8.1}  {}",
                s.name, e.address, e.weight, e.cognitive_load, e.qps, e.node
            );
        }
    }
    Ok(())
}

pub async fn status(control: SocketAddr, json: bool) -> anyhow::Result<()> {
    let mut admin = admin_client(control).await?;
    let sync = admin
        .get_sync_status(SyncStatusRequest {})
        .await
        .context("MeshAdmin.GetSyncStatus")?
        .into_inner();
    let config = admin
        .get_config_status(ConfigStatusRequest {})
        .await
        .context("MeshAdmin.GetConfigStatus")?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "current_version": sync.current_version,
            "sidecars": sync.sidecars.iter().map(|s| serde_json::json!({
                "node": s.node, "service": s.service, "instance_address": s.instance_address,
                "connected": s.connected, "acked_version": s.acked_version, "sent_version": s.sent_version,
                "rejected": s.rejected.iter().map(|r| serde_json::json!({"version": r.version, "error": r.error})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "config": {
                "environment": config.environment, "sources": config.sources,
                "reloads_applied": config.reloads_applied, "reloads_refused": config.reloads_refused,
                "last_error": config.last_error,
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "control plane: table version {}, environment {}, config {} (reloads: {} applied, {} refused)",
        sync.current_version,
        config.environment,
        if config.sources.is_empty() {
            "defaults".to_string()
        } else {
            config.sources.join(" + ")
        },
        config.reloads_applied,
        config.reloads_refused
    );
    if !config.last_error.is_empty() {
        println!("last refused configuration: {}", config.last_error);
    }
    println!();
    println!(
        "{:<36} {:<16} {:<10} {:>6} {:>6}  SYNC",
        "SIDECAR", "SERVICE", "STATE", "ACKED", "SENT"
    );
    for s in &sync.sidecars {
        let state = if s.connected { "connected" } else { "gone" };
        let in_sync = if s.acked_version == sync.current_version {
            "in sync".to_string()
        } else if let Some(r) = s.rejected.last() {
            format!("NACKed v{}: {}", r.version, r.error)
        } else {
            "behind".to_string()
        };
        println!(
            "{:<36} {:<16} {:<10} {:>6} {:>6}  {}",
            s.node, s.service, state, s.acked_version, s.sent_version, in_sync
        );
    }
    Ok(())
}

/// `cogmesh scaling history`: every recorded decision, oldest first.
pub async fn scaling_history(control: SocketAddr, service: Option<String>, json: bool) -> anyhow::Result<()> {
    let decisions = admin_client(control)
        .await?
        .list_scaling_decisions(ListScalingDecisionsRequest {
            service: service.unwrap_or_default(),
        })
        .await
        .context("MeshAdmin.ListScalingDecisions")?
        .into_inner()
        .decisions;
    if json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "service": d.service, "from": d.from_replicas, "to": d.to_replicas,
                    "metric": d.metric, "observed": d.observed, "target": d.target,
                    "reason": d.reason, "unix_ms": d.unix_ms, "policy_version": d.policy_version,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:>4} {:>4}  {:<22} REASON",
        "TIME (UTC)", "SERVICE", "FROM", "TO", "METRIC"
    );
    for d in &decisions {
        println!(
            "{:<24} {:<20} {:>4} {:>4}  {:<22} {}",
            utc(d.unix_ms),
            d.service,
            d.from_replicas,
            d.to_replicas,
            d.metric,
            d.reason
        );
    }
    Ok(())
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS.mmm` (UTC), from the civil-from-days algorithm.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00.000");
        // 2026-11-26 12:00:00.250 UTC
        assert_eq!(super::utc(1_795_694_400_250), "2026-11-26 12:00:00.250");
        // A leap day.
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
