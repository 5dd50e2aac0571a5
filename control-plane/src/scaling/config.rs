//! The `scaling:` section of control.yaml.
//!
//! ```yaml
//! scaling:
//!   interval_ms: 1000                 # how often decisions are made
//!   history_file: /var/lib/cogmesh/scaling.jsonl   # decisions survive restarts (none: memory)
//!   backend: process                  # none (decide and publish only) | process
//!   services:
//!     reasoning:
//!       policy: { min_replicas: 1, max_replicas: 5, target_cognitive_load: 0.7 }
//!       # process backend: how to start one replica's app; {address} is the app's port, {name}
//!       # the replica's name. "cogmesh" runs this binary. The control plane puts an inbound
//!       # cogmesh-proxy in front of each replica, registered with itself.
//!       command: [cogmesh, workload, --listen, "{address}", --name, "{name}"]
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::policy::ScalingPolicy;

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Decisions are made, recorded and published; something else applies them (KEDA, an
    /// operator watching `MeshAdmin`).
    #[default]
    None,
    /// The control plane starts and stops local replicas, each behind its own sidecar.
    Process,
    /// The control plane patches the `scale` subresource of each service's Deployment.
    Kubernetes,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingConfig {
    pub interval_ms: u64,
    pub history_file: Option<std::path::PathBuf>,
    pub backend: BackendKind,
    /// Where the `kubernetes` backend finds the Deployments.
    pub kubernetes: Option<KubernetesScaling>,
    pub services: BTreeMap<String, ServiceScaling>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesScaling {
    /// The namespace of the Deployments.
    pub namespace: String,
    /// The API server's URL; default: the in-cluster service account, else the kubeconfig.
    #[serde(default)]
    pub api_server: Option<String>,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            interval_ms: 1000,
            history_file: None,
            backend: BackendKind::None,
            kubernetes: None,
            services: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceScaling {
    #[serde(default)]
    pub policy: ScalingPolicy,
    /// The process backend's command for one replica's app.
    #[serde(default)]
    pub command: Vec<String>,
    /// Replicas the process backend starts with (within the policy's bounds); default: the
    /// policy's minimum.
    #[serde(default)]
    pub initial_replicas: Option<u32>,
    /// The `kubernetes` backend's Deployment for this service; default: the service's name.
    #[serde(default)]
    pub deployment: Option<String>,
    /// The process backend starts each replica's inbound sidecar with this priority-admission
    /// limit (`cogmesh-proxy --max-concurrency`): at the limit it sheds low and sheddable
    /// requests first. Default: no limit.
    #[serde(default)]
    pub max_concurrency: Option<u64>,
}

impl ScalingConfig {
    /// The first field that differs from `next` other than the policies, which a reload may
    /// change in place.
    pub fn restart_needed(&self, next: &ScalingConfig) -> Option<String> {
        if self.interval_ms != next.interval_ms {
            return Some("scaling.interval_ms".into());
        }
        if self.history_file != next.history_file {
            return Some("scaling.history_file".into());
        }
        if self.backend != next.backend {
            return Some("scaling.backend".into());
        }
        if self.kubernetes != next.kubernetes {
            return Some("scaling.kubernetes".into());
        }
        if !self.services.keys().eq(next.services.keys()) {
            return Some("scaling.services".into());
        }
        self.services
            .iter()
            .find(|(name, s)| {
                let n = &next.services[*name];
                n.command != s.command
                    || n.initial_replicas != s.initial_replicas
                    || n.deployment != s.deployment
            })
            .map(|(name, _)| format!("scaling.services.{name}.command"))
    }

    /// The first field that is wrong, as a path below `scaling`, and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(100..=60_000).contains(&self.interval_ms) {
            return Err((
                "scaling.interval_ms".into(),
                format!("{} is not within [100, 60000] ms", self.interval_ms),
            ));
        }
        if self.backend == BackendKind::Kubernetes {
            match &self.kubernetes {
                None => {
                    return Err((
                        "scaling.kubernetes".into(),
                        "the kubernetes backend needs `kubernetes: { namespace: ... }`".into(),
                    ))
                }
                Some(k) if k.namespace.is_empty() => {
                    return Err(("scaling.kubernetes.namespace".into(), "must not be empty".into()))
                }
                Some(_) => {}
            }
        }
        for (name, service) in &self.services {
            if let Err(e) = service.policy.validate() {
                return Err((format!("scaling.services.{name}.policy.{}", e.field), e.reason));
            }
            if self.backend == BackendKind::Process {
                if service.command.is_empty() {
                    return Err((
                        format!("scaling.services.{name}.command"),
                        "the process backend needs the command that starts a replica".into(),
                    ));
                }
                if !service.command.iter().any(|a| a.contains("{address}")) {
                    return Err((
                        format!("scaling.services.{name}.command"),
                        "no argument contains {address}: the replica could not be given its port".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ScalingConfig {
        serde_yaml_ng::from_str(yaml).expect("valid YAML for ScalingConfig")
    }

    #[test]
    fn errors_name_the_field_below_scaling() {
        let c = parse("services: { reasoning: { policy: { min_replicas: 4, max_replicas: 2 } } }");
        let (field, reason) = c.validate().unwrap_err();
        assert_eq!(field, "scaling.services.reasoning.policy.min_replicas");
        assert_eq!(reason, "4 is above max_replicas (2)");
        let c = parse("backend: process\nservices: { reasoning: { command: [cogmesh, workload] } }");
        let (field, reason) = c.validate().unwrap_err();
        assert_eq!(field, "scaling.services.reasoning.command");
        assert!(reason.contains("{address}"), "{reason}");
        assert!(serde_yaml_ng::from_str::<ScalingConfig>("services: { r: { polcy: {} } }").is_err());
        let (field, _) = parse("backend: kubernetes").validate().unwrap_err();
        assert_eq!(field, "scaling.kubernetes");
        let (field, _) = parse("backend: kubernetes\nkubernetes: { namespace: \"\" }")
            .validate()
            .unwrap_err();
        assert_eq!(field, "scaling.kubernetes.namespace");
        assert_eq!(
            parse("backend: kubernetes\nkubernetes: { namespace: mesh }").validate(),
            Ok(())
        );
        assert_eq!(parse("interval_ms: 500").validate(), Ok(()));
    }

    #[test]
    fn a_reload_may_change_policies_only() {
        let a = parse("backend: process\nservices: { r: { command: [x, \"{address}\"] } }");
        let mut b = a.clone();
        b.services.get_mut("r").unwrap().policy.max_replicas = 7;
        assert_eq!(a.restart_needed(&b), None);
        b.services.get_mut("r").unwrap().command.push("--more".into());
        assert_eq!(
            a.restart_needed(&b).as_deref(),
            Some("scaling.services.r.command")
        );
        let c = parse("backend: none\nservices: { r: { command: [x, \"{address}\"] } }");
        assert_eq!(a.restart_needed(&c).as_deref(), Some("scaling.backend"));
    }
}
