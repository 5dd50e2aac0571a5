//! `cogmesh routes` and `cogmesh status`: read a running control plane through `MeshAdmin` and
//! print a table (or JSON with `--json`) for operators.

use std::net::SocketAddr;

use anyhow::Context;
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{ConfigStatusRequest, ListServicesRequest, SyncStatusRequest};
use tonic::transport::Channel;

async fn client(control: SocketAddr) -> anyhow::Result<MeshAdminClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {control}"))?;
    Ok(MeshAdminClient::new(channel))
}

pub async fn routes(control: SocketAddr, json: bool) -> anyhow::Result<()> {
    let services = client(control)
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
    let mut admin = client(control).await?;
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
