//! Kubernetes discovery: endpoints from the `discovery.k8s.io/v1` EndpointSlices of one
//! namespace, listed and then watched through `kube`'s watcher (which relists after a `410
//! Gone`, follows bookmarks and backs off on errors).
//!
//! A slice belongs to the mesh service named by its `kubernetes.io/service-name` label; its
//! endpoints count when `conditions.ready` is true or absent (the API says to read a missing
//! `ready` as true), and they are dialled on the port named in `discovery.kubernetes.port` (the
//! slice's first port when none is named). FQDN slices are skipped: sidecars dial addresses.
//!
//! Discovered endpoints join the same membership as sidecar Hellos and static services (see
//! `MeshState::discovered`); like a sidecar joining, a change is published by the next weight
//! tick. What this module owns is the translation of a slice into addresses
//! ([`slice_endpoints`], a pure function) and the watch loop; the rest is the mesh state's.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tracing::{info, warn};

use super::config::KubernetesDiscovery;
use super::Mesh;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one slice contributes: its service and the ready endpoints' addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoints {
    pub service: String,
    pub addresses: Vec<SocketAddr>,
}

/// The service and ready addresses of `slice`, dialled on the port named `port` (the first
/// port if `None`). `None` when the slice names no service, has no such port, or is not IP.
pub fn slice_endpoints(slice: &EndpointSlice, port: Option<&str>) -> Option<SliceEndpoints> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    let chosen = match port {
        Some(name) => ports.iter().find(|p| p.name.as_deref() == Some(name))?,
        None => ports.first()?,
    };
    let number = u16::try_from(chosen.port?).ok().filter(|p| *p > 0)?;
    let addresses = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, number))
        .collect();
    Some(SliceEndpoints { service, addresses })
}

/// The key a slice is tracked under (names are unique within the watched namespace).
fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// A client for `config.api_server`, or for the cluster this process runs in (service account)
/// or the kubeconfig's current context.
async fn client(config: &KubernetesDiscovery) -> Result<Client, String> {
    api_client(config.api_server.as_deref()).await
}

/// A client for the API server at `api_server`, or (none) for the cluster this process runs in
/// (service account) or the kubeconfig's current context.
pub(crate) async fn api_client(api_server: Option<&str>) -> Result<Client, String> {
    match api_server {
        Some(url) => {
            let uri: http::Uri = url.parse().map_err(|e| format!("api_server {url:?}: {e}"))?;
            Client::try_from(kube::Config::new(uri)).map_err(|e| e.to_string())
        }
        None => Client::try_default().await.map_err(|e| e.to_string()),
    }
}

/// Lists and watches the configured EndpointSlices until the task is aborted, feeding every
/// change into the mesh state.
pub(super) async fn run(mesh: Arc<Mesh>, config: KubernetesDiscovery) {
    let client = match client(&config).await {
        Ok(c) => c,
        Err(e) => {
            warn!("Kubernetes discovery is off: no API client ({e})");
            return;
        }
    };
    let api: Api<EndpointSlice> = Api::namespaced(client, &config.namespace);
    let mut watch_config = watcher::Config::default();
    if let Some(selector) = &config.label_selector {
        watch_config = watch_config.labels(selector);
    }
    info!(namespace = %config.namespace, selector = ?config.label_selector, "watching EndpointSlices");
    let port = config.port.as_deref();
    let mut events = std::pin::pin!(watcher::watcher(api, watch_config).default_backoff());
    // A (re)list in progress: what it has listed so far, swapped in whole when it is done, so
    // slices deleted while the watch was down disappear too.
    let mut relist: Option<BTreeMap<String, SliceEndpoints>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist = Some(BTreeMap::new()),
            Ok(Event::InitApply(slice)) => {
                if let (Some(listed), Some(e)) = (relist.as_mut(), slice_endpoints(&slice, port)) {
                    listed.insert(slice_name(&slice), e);
                }
            }
            Ok(Event::InitDone) => {
                let listed = relist.take().unwrap_or_default();
                info!(slices = listed.len(), "EndpointSlices listed");
                mesh.state().discovered = listed;
            }
            Ok(Event::Apply(slice)) => {
                let name = slice_name(&slice);
                let mut state = mesh.state();
                match slice_endpoints(&slice, port) {
                    Some(e) => state.discovered.insert(name, e),
                    None => state.discovered.remove(&name),
                };
            }
            Ok(Event::Delete(slice)) => {
                mesh.state().discovered.remove(&slice_name(&slice));
            }
            Err(e) => warn!("EndpointSlice watch failed, retrying with backoff: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice as the API serves it (the documented JSON shape).
    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn reasoning(address_type: &str, addresses: &[(&str, Option<bool>)]) -> EndpointSlice {
        slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "reasoning-x1",
                "namespace": "mesh",
                "labels": { "kubernetes.io/service-name": "reasoning" }
            },
            "addressType": address_type,
            "ports": [
                { "name": "metrics", "port": 9090, "protocol": "TCP" },
                { "name": "http", "port": 8080, "protocol": "TCP" }
            ],
            "endpoints": addresses.iter().map(|(a, ready)| {
                let mut e = serde_json::json!({ "addresses": [a] });
                if let Some(r) = ready {
                    e["conditions"] = serde_json::json!({ "ready": r });
                }
                e
            }).collect::<Vec<_>>()
        }))
    }

    #[test]
    fn ready_endpoints_on_the_named_port() {
        let s = reasoning(
            "IPv4",
            &[
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", Some(false)),
                ("10.0.0.3", None),
            ],
        );
        let e = slice_endpoints(&s, Some("http")).unwrap();
        assert_eq!(e.service, "reasoning");
        let addrs: Vec<String> = e.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.3:8080"]);
        // Without a port name: the first port.
        let first = slice_endpoints(&s, None).unwrap();
        assert_eq!(first.addresses[0].to_string(), "10.0.0.1:9090");
        // A port the slice does not have, an FQDN slice, a slice of no service: nothing.
        assert!(slice_endpoints(&s, Some("grpc")).is_none());
        assert!(slice_endpoints(&reasoning("FQDN", &[("a.example", None)]), None).is_none());
        let mut orphan = s.clone();
        orphan.metadata.labels = None;
        assert!(slice_endpoints(&orphan, None).is_none());
        let v6 = reasoning("IPv6", &[("fd00::1", Some(true))]);
        assert_eq!(
            slice_endpoints(&v6, Some("http")).unwrap().addresses[0].to_string(),
            "[fd00::1]:8080"
        );
    }
}
