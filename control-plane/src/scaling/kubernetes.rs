//! The `kubernetes` backend: a decision patches the `scale` subresource of the service's
//! Deployment (`PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, a JSON merge
//! patch of `spec.replicas`), and the Deployment controller does the rest. The control plane's
//! ServiceAccount needs `patch` on `deployments/scale` in that namespace.
//!
//! Decisions arrive on a channel from the (synchronous) scaler and are applied in order; a
//! failed patch is logged and the next decision tries again.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

use super::config::KubernetesScaling;

/// Applies `(service, replicas)` decisions until the channel closes.
pub async fn run(
    mut decisions: UnboundedReceiver<(String, u32)>,
    config: KubernetesScaling,
    deployments: BTreeMap<String, String>,
) {
    let client = match crate::control::kubernetes::api_client(config.api_server.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            warn!("the kubernetes scaling backend is off: no API client ({e})");
            return;
        }
    };
    let api: Api<Deployment> = Api::namespaced(client, &config.namespace);
    while let Some((service, replicas)) = decisions.recv().await {
        let name = deployments
            .get(&service)
            .cloned()
            .unwrap_or_else(|| service.clone());
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        match api
            .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => info!(%service, deployment = %name, replicas, "deployment scaled"),
            Err(e) => warn!(%service, deployment = %name, replicas, "cannot scale the deployment: {e}"),
        }
    }
}
