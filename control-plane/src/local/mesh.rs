//! `deploy/local/mesh.yaml`: the services of a local mesh, their replicas, commands, resources
//! and scaling policies. `mesh.<environment>.yaml` beside it is layered on top (maps merge key
//! by key), like control.yaml's environment files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::control::config::{merge, read_yaml, ConfigError};
use crate::scaling::ScalingPolicy;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    /// The control plane's gRPC address (default 127.0.0.1:7070) and metrics address.
    #[serde(default)]
    pub control: ControlSection,
    /// Seconds every replica has to become ready before everything is rolled back.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    pub services: BTreeMap<String, MeshService>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    pub listen: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshService {
    pub replicas: u32,
    /// One replica's app; `{address}` is its port, `{name}` its name, `cogmesh` this binary.
    pub command: Vec<String>,
    /// Requests and limits as a Kubernetes manifest would give them (recorded and shown; a
    /// local process is not confined to them).
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Without a policy the replica count stays as given.
    #[serde(default)]
    pub scaling: Option<ScalingPolicy>,
    /// Each replica's sidecar admits this many requests at once; beyond it, low and sheddable
    /// requests are shed first (priority admission). Default: no limit.
    #[serde(default)]
    pub max_concurrency: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU, e.g. `500m` or `2`.
    pub cpu: String,
    /// Memory, e.g. `256Mi` or `1Gi`.
    pub memory: String,
}

fn default_ready_timeout() -> u64 {
    20
}

fn valid_cpu(s: &str) -> bool {
    let n = s.strip_suffix('m').unwrap_or(s);
    !n.is_empty() && n.parse::<f64>().is_ok_and(|v| v > 0.0)
}

fn valid_memory(s: &str) -> bool {
    let n = ["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"]
        .iter()
        .find_map(|u| s.strip_suffix(u))
        .unwrap_or(s);
    !n.is_empty() && n.parse::<u64>().is_ok_and(|v| v > 0)
}

impl MeshFile {
    /// Reads `path` and, with `environment`, `mesh.<environment>.yaml` beside it.
    pub fn load(path: &Path, environment: Option<&str>) -> Result<MeshFile, ConfigError> {
        let mut value = read_yaml(path)?;
        let mut label = path.display().to_string();
        if let Some(env) = environment {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("mesh");
            let overlay = path.with_file_name(format!("{stem}.{env}.yaml"));
            if !overlay.exists() {
                return Err(ConfigError {
                    file: overlay.display().to_string(),
                    field: ".".into(),
                    reason: format!("no environment file for {env:?}"),
                });
            }
            merge(&mut value, read_yaml(&overlay)?);
            label = format!("{label} + {}", overlay.display());
        }
        let mesh: MeshFile = serde_path_to_error::deserialize(value).map_err(|e| ConfigError {
            file: label.clone(),
            field: e.path().to_string(),
            reason: e.into_inner().to_string(),
        })?;
        mesh.validate().map_err(|(field, reason)| ConfigError {
            file: label,
            field,
            reason,
        })?;
        Ok(mesh)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.services.is_empty() {
            return Err(("services".into(), "a mesh needs at least one service".into()));
        }
        if !(1..=600).contains(&self.ready_timeout_s) {
            return Err((
                "ready_timeout_s".into(),
                format!("{} is not within [1, 600]", self.ready_timeout_s),
            ));
        }
        for (name, s) in &self.services {
            let at = |f: &str| format!("services.{name}.{f}");
            if !(1..=50).contains(&s.replicas) {
                return Err((at("replicas"), format!("{} is not within [1, 50]", s.replicas)));
            }
            if !s.command.iter().any(|a| a.contains("{address}")) {
                return Err((
                    at("command"),
                    "no argument contains {address}: the replica could not be given its port".into(),
                ));
            }
            if s.max_concurrency == Some(0) {
                return Err((at("max_concurrency"), "must be greater than 0".into()));
            }
            if let Some(r) = &s.resources {
                if !valid_cpu(&r.cpu) {
                    return Err((
                        at("resources.cpu"),
                        format!("{:?} is not a CPU quantity like 500m or 2", r.cpu),
                    ));
                }
                if !valid_memory(&r.memory) {
                    return Err((
                        at("resources.memory"),
                        format!("{:?} is not a memory quantity like 256Mi", r.memory),
                    ));
                }
            }
            if let Some(p) = &s.scaling {
                p.validate()
                    .map_err(|e| (at(&format!("scaling.{}", e.field)), e.reason))?;
                if !(p.min_replicas..=p.max_replicas).contains(&s.replicas) {
                    return Err((
                        at("replicas"),
                        format!(
                            "{} is outside its scaling policy's {}..{}",
                            s.replicas, p.min_replicas, p.max_replicas
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The control plane's configuration for this mesh: the process backend runs every
    /// service's replicas, each starting at `replicas`; a service without a policy is pinned
    /// there.
    pub fn control_yaml(&self, listen: SocketAddr, history: &Path) -> String {
        let services: BTreeMap<&String, serde_json::Value> = self
            .services
            .iter()
            .map(|(name, s)| {
                let policy = s.scaling.clone().unwrap_or(ScalingPolicy {
                    min_replicas: s.replicas,
                    max_replicas: s.replicas,
                    ..Default::default()
                });
                let entry = serde_json::json!({
                    "policy": policy,
                    "command": s.command,
                    "initial_replicas": s.replicas,
                    "max_concurrency": s.max_concurrency,
                });
                (name, entry)
            })
            .collect();
        let config = serde_json::json!({
            "listen": listen.to_string(),
            "admin_listen": self.control.metrics.map(|m| m.to_string()),
            "weight_interval_ms": 500,
            "scaling": {
                "interval_ms": 1000,
                "history_file": history.display().to_string(),
                "backend": "process",
                "services": services,
            },
        });
        // JSON is YAML.
        serde_json::to_string_pretty(&config).expect("a JSON value serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_example_mesh_and_its_environments_load() {
        let base = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/mesh.yaml"));
        let mesh = MeshFile::load(base, None).expect("deploy/local/mesh.yaml");
        let replicas: Vec<(&str, u32)> = mesh
            .services
            .iter()
            .map(|(n, s)| (n.as_str(), s.replicas))
            .collect();
        assert_eq!(
            replicas,
            vec![
                ("attention_allocator", 2),
                ("cognitive_gateway", 2),
                ("memory_manager", 2),
                ("reasoning_engine", 3),
                ("tensor_processor", 4)
            ]
        );
        let reasoning = mesh.services["reasoning_engine"].scaling.as_ref().unwrap();
        assert_eq!((reasoning.min_replicas, reasoning.max_replicas), (1, 5));
        assert_eq!(reasoning.target_cognitive_load, Some(0.7));
        for env in ["development", "staging", "production"] {
            MeshFile::load(base, Some(env)).unwrap_or_else(|e| panic!("{env}: {e}"));
        }
        // The gateway's sidecars get an admission limit, carried into the control plane's
        // process backend.
        let control: crate::control::config::ControlFile = serde_yaml_ng::from_str(
            &mesh.control_yaml("127.0.0.1:7070".parse().unwrap(), Path::new("/tmp/h")),
        )
        .unwrap();
        let scaling = control.scaling;
        assert_eq!(scaling.services["cognitive_gateway"].max_concurrency, Some(6));
        assert_eq!(scaling.services["reasoning_engine"].max_concurrency, None);
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let dir = std::env::temp_dir().join(format!("cogmesh-meshfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = write(
            &dir,
            "m1.yaml",
            "services: { a: { replicas: 0, command: [x, \"{address}\"] } }",
        );
        let e = MeshFile::load(&p, None).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("services.a.replicas", "0 is not within [1, 50]")
        );
        let p = write(
            &dir,
            "m2.yaml",
            "services: { a: { replicas: 1, command: [x], colour: red } }",
        );
        let e = MeshFile::load(&p, None).unwrap_err();
        assert!(e.field.starts_with("services.a"), "{e}");
        assert!(e.reason.contains("unknown field `colour`"), "{e}");
        let p = write(
            &dir,
            "m3.yaml",
            "services: { a: { replicas: 1, command: [x, \"{address}\"], resources: { cpu: lots, memory: 1Gi } } }",
        );
        assert_eq!(
            MeshFile::load(&p, None).unwrap_err().field,
            "services.a.resources.cpu"
        );
        let p = write(
            &dir,
            "m4.yaml",
            "services: { a: { replicas: 9, command: [x, \"{address}\"], scaling: { max_replicas: 5 } } }",
        );
        let e = MeshFile::load(&p, None).unwrap_err();
        assert_eq!(e.field, "services.a.replicas");
        assert!(e.file.ends_with("m4.yaml"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
