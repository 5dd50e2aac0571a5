//! `control.yaml`: the control plane's configuration, layered and validated.
//!
//! Layers, each overriding the one before (maps merge key by key, lists are replaced whole):
//! 1. the base file, e.g. `control.yaml`;
//! 2. the environment file beside it, `control.<environment>.yaml`, if it exists;
//! 3. environment variables: `COGMESH_ENVIRONMENT`, `COGMESH_CONTROL_LISTEN`,
//!    `COGMESH_CONTROL_WEIGHT_INTERVAL_MS`.
//!
//! The environment (`development`, `staging`, `production`, `distributed`) selects defaults
//! and how strict validation is. Errors name the file(s), the field path and the reason.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Localhost defaults, fast weight updates, anything goes.
    #[default]
    Development,
    Staging,
    /// The listen address must be given explicitly.
    Production,
    /// Several control-plane replicas (Kubernetes); like production.
    Distributed,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Staging => "staging",
            Environment::Production => "production",
            Environment::Distributed => "distributed",
        }
    }
}

/// The whole control-plane configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    #[serde(default)]
    pub environment: Environment,
    /// gRPC address for sidecars and operators.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// How often weights are recomputed from reports.
    #[serde(default)]
    pub weight_interval_ms: Option<u64>,
    /// HTTP address serving `GET /metrics` (Prometheus); none by default.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Services whose endpoints are known without a sidecar (static discovery).
    #[serde(default)]
    pub services: Vec<StaticService>,
    /// Autoscaling policies and the backend that applies decisions.
    #[serde(default)]
    pub scaling: crate::scaling::ScalingConfig,
    /// Alert thresholds (warning / critical) per metric.
    #[serde(default)]
    pub alerts: crate::scaling::alerts::AlertsConfig,
    /// Other sources of endpoints.
    #[serde(default)]
    pub discovery: Discovery,
    /// Several replicas: the one holding this Lease makes scaling decisions (see
    /// [`super::leader`]); without it this replica always does.
    #[serde(default)]
    pub leader_election: Option<super::leader::LeaderElection>,
    /// Workload identity: the CA and who may ask it for which identity (see `security`).
    #[serde(default)]
    pub identity: Option<crate::security::IdentityConfig>,
    /// Operators' access: callers and roles, rate limit, audit log (see `security`).
    #[serde(default)]
    pub auth: Option<crate::security::AuthConfig>,
}

/// Endpoint sources besides sidecar Hellos and `services`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// EndpointSlices of a Kubernetes namespace (see [`super::kubernetes`]).
    #[serde(default)]
    pub kubernetes: Option<KubernetesDiscovery>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// The namespace whose EndpointSlices are listed and watched.
    pub namespace: String,
    /// A Kubernetes label selector (`app=reasoning,tier!=batch`) narrowing the slices.
    #[serde(default)]
    pub label_selector: Option<String>,
    /// The EndpointSlice port (by name) that sidecars dial; default: each slice's first port.
    #[serde(default)]
    pub port: Option<String>,
    /// The API server's URL; default: the in-cluster service account, else the kubeconfig
    /// (as `kubectl` finds it).
    #[serde(default)]
    pub api_server: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticService {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

fn err(file: &str, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Deep merge: maps key by key, anything else replaced by the overlay.
pub(crate) fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

pub(crate) fn read_yaml(path: &Path) -> Result<Value, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| err(&file, ".", format!("cannot read: {e}")))?;
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Default::default()));
    }
    serde_yaml_ng::from_str(&text).map_err(|e| err(&file, ".", e.to_string()))
}

/// The environment file that goes with `base` for `environment`.
pub fn environment_file(base: &Path, environment: Environment) -> PathBuf {
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("control");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("yaml");
    base.with_file_name(format!("{stem}.{}.{ext}", environment.as_str()))
}

/// The resolved configuration: what is in force.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Resolved {
    pub environment: Environment,
    pub listen: SocketAddr,
    pub weight_interval_ms: u64,
    pub admin_listen: Option<SocketAddr>,
    pub services: Vec<StaticService>,
    pub scaling: crate::scaling::ScalingConfig,
    pub alerts: crate::scaling::alerts::AlertsConfig,
    pub discovery: Discovery,
    pub leader_election: Option<super::leader::LeaderElection>,
    pub identity: Option<crate::security::IdentityConfig>,
    pub auth: Option<crate::security::AuthConfig>,
    /// The files the configuration came from, in layer order.
    pub sources: Vec<String>,
}

/// Loads `base` (if given) with its environment file and the environment variables `env`.
pub fn load(base: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved, ConfigError> {
    let mut value = Value::Mapping(Default::default());
    let mut sources = Vec::new();
    if let Some(base) = base {
        value = read_yaml(base)?;
        sources.push(base.display().to_string());
    }
    // The environment decides which overlay file applies; the variable beats the base file.
    let environment: Environment = match env("COGMESH_ENVIRONMENT") {
        Some(e) => serde_yaml_ng::from_str(&e).map_err(|_| {
            err(
                "environment",
                "COGMESH_ENVIRONMENT",
                format!(
                    "unknown environment {e:?} (expected development, staging, production or distributed)"
                ),
            )
        })?,
        None => match value.get("environment") {
            Some(v) => serde_yaml_ng::from_value(v.clone()).map_err(|e| {
                err(
                    sources.first().map_or("control.yaml", |s| s.as_str()),
                    "environment",
                    e.to_string(),
                )
            })?,
            None => Environment::default(),
        },
    };
    if let Some(base) = base {
        let overlay_path = environment_file(base, environment);
        if overlay_path.exists() {
            let overlay = read_yaml(&overlay_path)?;
            merge(&mut value, overlay);
            sources.push(overlay_path.display().to_string());
        }
    }
    let label = if sources.is_empty() {
        "<defaults>".to_string()
    } else {
        sources.join(" + ")
    };
    let parsed: ControlFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        err(&label, field, e.into_inner().to_string())
    })?;

    let listen = match env("COGMESH_CONTROL_LISTEN") {
        Some(v) => Some(v.parse().map_err(|_| {
            err(
                "environment",
                "COGMESH_CONTROL_LISTEN",
                format!("{v:?} is not an IP:port address"),
            )
        })?),
        None => parsed.listen,
    };
    let weight_interval_ms = match env("COGMESH_CONTROL_WEIGHT_INTERVAL_MS") {
        Some(v) => Some(v.parse().map_err(|_| {
            err(
                "environment",
                "COGMESH_CONTROL_WEIGHT_INTERVAL_MS",
                format!("{v:?} is not a number"),
            )
        })?),
        None => parsed.weight_interval_ms,
    };
    let strict = matches!(environment, Environment::Production | Environment::Distributed);
    let listen = match (listen, strict) {
        (Some(l), _) => l,
        (None, false) => super::DEFAULT_LISTEN.parse().expect("constant address parses"),
        (None, true) => {
            return Err(err(
                &label,
                "listen",
                format!(
                    "must be set explicitly in the {} environment",
                    environment.as_str()
                ),
            ))
        }
    };
    let weight_interval_ms = weight_interval_ms.unwrap_or(super::DEFAULT_WEIGHT_INTERVAL_MS);
    if weight_interval_ms == 0 || weight_interval_ms > 60_000 {
        return Err(err(
            &label,
            "weight_interval_ms",
            format!("must be between 1 and 60000, got {weight_interval_ms}"),
        ));
    }
    let mut names = HashSet::new();
    for (i, s) in parsed.services.iter().enumerate() {
        if s.name.is_empty() {
            return Err(err(&label, format!("services[{i}].name"), "must not be empty"));
        }
        if !names.insert(s.name.as_str()) {
            return Err(err(
                &label,
                format!("services[{i}].name"),
                format!("duplicate service {:?}", s.name),
            ));
        }
        let mut seen = HashSet::new();
        for (j, e) in s.endpoints.iter().enumerate() {
            if !seen.insert(e) {
                return Err(err(
                    &label,
                    format!("services[{i}].endpoints[{j}]"),
                    format!("duplicate endpoint {e}"),
                ));
            }
            if strict && e.ip().is_unspecified() {
                return Err(err(
                    &label,
                    format!("services[{i}].endpoints[{j}]"),
                    format!("{e} is not a routable address"),
                ));
            }
        }
    }
    parsed
        .scaling
        .validate()
        .map_err(|(field, reason)| err(&label, field, reason))?;
    parsed
        .alerts
        .validate()
        .map_err(|(field, reason)| err(&label, field, reason))?;
    if parsed.admin_listen.is_some_and(|a| a == listen) {
        return Err(err(
            &label,
            "admin_listen",
            format!("must differ from listen ({listen})"),
        ));
    }
    if let Some(k) = &parsed.discovery.kubernetes {
        check_kubernetes(k, strict)
            .map_err(|(field, reason)| err(&label, format!("discovery.kubernetes.{field}"), reason))?;
    }
    if let Some(Err((field, reason))) = parsed.leader_election.as_ref().map(|l| l.check()) {
        return Err(err(&label, format!("leader_election.{field}"), reason));
    }
    crate::security::validate(parsed.identity.as_ref(), parsed.auth.as_ref(), strict)
        .map_err(|(field, reason)| err(&label, field, reason))?;
    Ok(Resolved {
        environment,
        listen,
        weight_interval_ms,
        admin_listen: parsed.admin_listen,
        services: parsed.services,
        scaling: parsed.scaling,
        alerts: parsed.alerts,
        discovery: parsed.discovery,
        leader_election: parsed.leader_election,
        identity: parsed.identity,
        auth: parsed.auth,
        sources,
    })
}

/// Field and reason of the first problem in a Kubernetes discovery section.
fn check_kubernetes(k: &KubernetesDiscovery, strict: bool) -> Result<(), (&'static str, String)> {
    // A namespace name is a DNS label (RFC 1123).
    if !crate::security::is_dns_label(&k.namespace) {
        return Err((
            "namespace",
            format!(
                "{:?} is not a namespace name (lowercase letters, digits and '-', at most 63)",
                k.namespace
            ),
        ));
    }
    if let Some(sel) = &k.label_selector {
        if sel.trim().is_empty() {
            return Err(("label_selector", "must not be empty when given".into()));
        }
        // What a selector is made of: keys, values, operators, set syntax.
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./=!,() ".contains(c);
        if let Some(c) = sel.chars().find(|c| !allowed(*c)) {
            return Err((
                "label_selector",
                format!("{sel:?}: {c:?} cannot appear in a label selector"),
            ));
        }
    }
    if let Some(p) = &k.port {
        if p.is_empty() {
            return Err(("port", "must not be empty when given".into()));
        }
    }
    if let Some(url) = &k.api_server {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ("api_server", format!("{url:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if !strict => {}
            Some("http") => {
                return Err((
                    "api_server",
                    format!("{url:?}: plain http is only allowed in development and staging"),
                ))
            }
            _ => return Err(("api_server", format!("{url:?}: expected an http(s):// URL"))),
        }
        if uri.authority().is_none() {
            return Err(("api_server", format!("{url:?}: no host")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cogmesh-control-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The error loading `text` as `dir/control.yaml` gives.
    fn refused(dir: &Path, text: &str) -> ConfigError {
        let base = write(dir, "control.yaml", text);
        load(Some(&base), &no_env).unwrap_err()
    }

    #[test]
    fn defaults_without_a_file() {
        let r = load(None, &no_env).unwrap();
        assert_eq!(r.environment, Environment::Development);
        assert_eq!(r.listen.to_string(), super::super::DEFAULT_LISTEN);
        assert_eq!(r.weight_interval_ms, super::super::DEFAULT_WEIGHT_INTERVAL_MS);
    }

    #[test]
    fn layers_base_environment_file_and_variables() {
        let d = tempdir("layers");
        let base = write(
            &d,
            "control.yaml",
            "environment: staging\nweight_interval_ms: 500\nservices:\n  - { name: db, endpoints: [\"127.0.0.1:5432\"] }\n",
        );
        write(
            &d,
            "control.staging.yaml",
            "weight_interval_ms: 250\nlisten: 127.0.0.1:7171\n",
        );
        let r = load(Some(&base), &no_env).unwrap();
        assert_eq!(r.environment, Environment::Staging);
        assert_eq!(r.weight_interval_ms, 250);
        assert_eq!(r.listen.to_string(), "127.0.0.1:7171");
        assert_eq!(r.services[0].name, "db");
        assert_eq!(r.sources.len(), 2);
        let env = |k: &str| (k == "COGMESH_CONTROL_WEIGHT_INTERVAL_MS").then(|| "100".to_string());
        assert_eq!(load(Some(&base), &env).unwrap().weight_interval_ms, 100);
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let d = tempdir("errors");
        let base = write(
            &d,
            "control.yaml",
            "environment: production\nweight_interval_ms: 0\n",
        );
        let e = load(Some(&base), &no_env).unwrap_err();
        assert_eq!(e.field, "listen");
        assert!(e.reason.contains("production"), "{e}");
        let base = write(&d, "control.yaml", "listen: 127.0.0.1:1\nweight_interval_ms: 0\n");
        let e = load(Some(&base), &no_env).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: weight_interval_ms: must be between 1 and 60000, got 0",
                base.display()
            )
        );
        let base = write(
            &d,
            "control.yaml",
            "services:\n  - { name: a, endpoints: [\"127.0.0.1:1\"], weight: 2 }\n",
        );
        let e = load(Some(&base), &no_env).unwrap_err();
        assert!(e.field.starts_with("services[0]"), "{e}");
        assert!(e.reason.contains("unknown field `weight`"), "{e}");
        let e = refused(&d, "listen: 127.0.0.1:7070\nadmin_listen: 127.0.0.1:7070\n");
        assert_eq!(e.field, "admin_listen");
        assert!(e.reason.contains("must differ from listen"), "{e}");
        let base = write(&d, "control.yaml", "environment: prod\n");
        let e = load(Some(&base), &no_env).unwrap_err();
        assert_eq!(e.field, "environment");
        let env = |k: &str| (k == "COGMESH_CONTROL_LISTEN").then(|| "nowhere".to_string());
        let base = write(&d, "control.yaml", "");
        let e = load(Some(&base), &env).unwrap_err();
        assert_eq!(e.field, "COGMESH_CONTROL_LISTEN");
    }

    #[test]
    fn kubernetes_discovery_is_validated() {
        let d = tempdir("kubernetes");
        let ok = write(
            &d,
            "control.yaml",
            "discovery:\n  kubernetes:\n    namespace: mesh\n    label_selector: app=reasoning\n    port: http\n    api_server: http://127.0.0.1:8001\n",
        );
        let r = load(Some(&ok), &no_env).unwrap();
        let k = r.discovery.kubernetes.unwrap();
        assert_eq!(k.namespace, "mesh");
        assert_eq!(k.port.as_deref(), Some("http"));
        for (yaml, field, reason) in [
            (
                "namespace: Mesh_1",
                "discovery.kubernetes.namespace",
                "not a namespace name",
            ),
            (
                "namespace: m\n    label_selector: \"app=a;b\"",
                "discovery.kubernetes.label_selector",
                "cannot appear",
            ),
            (
                "namespace: m\n    api_server: ftp://x",
                "discovery.kubernetes.api_server",
                "http(s)",
            ),
            (
                "namespace: m\n    watch: true",
                "discovery.kubernetes",
                "unknown field `watch`",
            ),
        ] {
            let e = refused(&d, &format!("discovery:\n  kubernetes:\n    {yaml}\n"));
            assert!(e.field.starts_with(field), "{yaml}: {e}");
            assert!(e.reason.contains(reason), "{yaml}: {e}");
        }
        // Plain http to the API server only outside production.
        let base = write(
            &d,
            "control.yaml",
            "environment: production\nlisten: 127.0.0.1:1\ndiscovery:\n  kubernetes:\n    namespace: m\n    api_server: http://10.0.0.1\n",
        );
        let e = load(Some(&base), &no_env).unwrap_err();
        assert_eq!(e.field, "discovery.kubernetes.api_server", "{e}");
    }

    #[test]
    fn identity_and_auth_are_validated() {
        let d = tempdir("security");
        let ok = refused_or(&d, "identity:\n  workloads: [{ namespace: default, service_account: web, token: t }]\nauth:\n  callers: [{ name: a, role: viewer, token: v }]\n");
        let r = ok.unwrap();
        assert_eq!(
            r.identity.unwrap().certificate_ttl_s,
            crate::security::DEFAULT_CERTIFICATE_TTL_S
        );
        for (yaml, field, reason) in [
            ("identity: { trust_domain: Bad_Domain }", "identity.trust_domain", "not a trust domain"),
            ("identity: { certificate_ttl_s: 0 }", "identity.certificate_ttl_s", "between 1"),
            ("identity: { ca: { cert: a.pem } }", "identity.ca.key", "with ca.cert"),
            ("identity: { workloads: [{ namespace: a, service_account: b, token: x }, { namespace: c, service_account: d, token: x }] }", "identity.workloads[1].token", "another workload"),
            ("auth: { callers: [{ name: a, role: sidecar, token: x }] }", "auth.callers[0].role", "expected viewer"),
            ("auth: { callers: [{ name: a, role: admin }] }", "auth.callers[0].token", "give a token"),
            ("auth: { callers: [{ name: a, role: root, token: x }] }", "auth.callers[0].role", "unknown variant"),
            ("auth: { rate_limit: { requests_per_second: 0 } }", "auth.rate_limit.requests_per_second", "> 0"),
            ("environment: production\nlisten: 127.0.0.1:1", "auth", "must be set in production"),
            ("environment: production\nlisten: 127.0.0.1:1\nauth: { callers: [{ name: a, role: admin, token: short }] }", "auth.callers[0].token", "at least 16"),
        ] {
            let e = refused(&d, &format!("{yaml}\n"));
            assert!(e.field.starts_with(field), "{yaml}: {e}");
            assert!(e.reason.contains(reason), "{yaml}: {e}");
        }
    }

    fn refused_or(dir: &Path, text: &str) -> Result<Resolved, ConfigError> {
        let base = write(dir, "control.yaml", text);
        load(Some(&base), &no_env)
    }

    #[test]
    fn the_shipped_configuration_is_valid_in_every_environment() {
        let base = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/local/control.yaml"
        ));
        for e in ["development", "staging", "production", "distributed"] {
            let env = move |k: &str| (k == "COGMESH_ENVIRONMENT").then(|| e.to_string());
            let r = load(Some(base), &env).unwrap_or_else(|err| panic!("{e}: {err}"));
            assert_eq!(r.environment.as_str(), e);
            assert_eq!(r.sources.len(), 2, "{e}: the environment file is layered on");
        }
    }
}
