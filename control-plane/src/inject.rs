//! `cogmesh inject`: adds the mesh to Kubernetes manifests, like `linkerd inject`.
//!
//! Every pod template of the input (multi-document YAML; `List` items too) — of a Pod,
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob — gets:
//! - the init container `cogmesh-init` (`cogmesh-proxy init`: the iptables rules, with the
//!   `NET_ADMIN`/`NET_RAW` capabilities it needs and nothing else);
//! - the sidecar container `cogmesh-proxy` in transparent mode, as uid [`PROXY_UID`], joined to
//!   the control plane, with readiness and liveness probes on its admin port;
//! - the annotation `cogmesh.io/injected: "true"`.
//!
//! A template is left alone when its workload or the template carries the opt-out annotation
//! `cogmesh.io/inject: disabled`, when it uses the host's network (the rules would capture the
//! node's traffic), or when it already has the sidecar — so injecting twice gives the same
//! output. Other documents pass through unchanged. Nothing here touches the network; the
//! outcome of each resource is reported to the caller.

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// The annotation that opts a workload out (`disabled`).
pub const INJECT_ANNOTATION: &str = "cogmesh.io/inject";
/// The annotation set on injected pod templates.
pub const INJECTED_ANNOTATION: &str = "cogmesh.io/injected";
/// The annotation that names the mesh service of a workload (default: its `app.kubernetes.io/name`
/// or `app` label, else the workload's name).
pub const SERVICE_ANNOTATION: &str = "cogmesh.io/service";
pub const PROXY_CONTAINER: &str = "cogmesh-proxy";
pub const INIT_CONTAINER: &str = "cogmesh-init";
/// The sidecar's uid; the iptables rules skip its traffic.
pub const PROXY_UID: u32 = 2102;
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/cogmesh/cogmesh-proxy:0.1.0";
/// The control plane's Service in the manifests of `deploy/kubernetes/`.
pub const DEFAULT_CONTROL: &str = "cogmesh-control.cogmesh.svc.cluster.local:7070";
pub const ADMIN_PORT: u16 = 4191;
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;

/// What `cogmesh inject` adds.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    pub proxy_image: String,
    /// Control-plane addresses (`host:port`), tried in turn by the sidecar.
    pub control: Vec<String>,
    /// Outbound ports the init container leaves alone.
    pub skip_outbound_ports: Vec<u16>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            control: vec![DEFAULT_CONTROL.into()],
            skip_outbound_ports: Vec::new(),
        }
    }
}

/// What happened to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `kind/name`.
    pub resource: String,
    pub result: InjectResult,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectResult {
    Injected,
    AlreadyInjected,
    OptedOut,
    HostNetwork,
    /// Not a workload with a pod template (Service, ConfigMap, ...).
    NotAWorkload,
}

impl InjectResult {
    pub fn describe(self) -> &'static str {
        match self {
            InjectResult::Injected => "injected",
            InjectResult::AlreadyInjected => "already injected, unchanged",
            InjectResult::OptedOut => "skipped: cogmesh.io/inject: disabled",
            InjectResult::HostNetwork => "skipped: uses the host network",
            InjectResult::NotAWorkload => "not a workload, unchanged",
        }
    }
}

/// Why the input could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {document}: not valid YAML: {source}")]
    Yaml {
        document: usize,
        source: serde_yaml_ng::Error,
    },
    #[error("document {document} ({resource}): {field}: {reason}")]
    Shape {
        document: usize,
        resource: String,
        field: String,
        reason: String,
    },
}

/// `cogmesh inject [FILE|-]`.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// Manifests to inject (multi-document YAML); `-` or nothing reads standard input.
    #[arg(default_value = "-")]
    pub file: String,
    /// The cogmesh-proxy image of the sidecar and the init container.
    #[arg(long, default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// A control-plane address (`host:port`); repeat for several, the sidecar fails over
    /// between them.
    #[arg(long = "control", value_name = "HOST:PORT", default_value = DEFAULT_CONTROL)]
    pub control: Vec<String>,
    /// Outbound ports the iptables rules leave alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
}

/// Reads the manifests, writes the injected ones to standard output and a line per resource
/// to standard error.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Read;
    let mut input = String::new();
    if args.file == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading standard input")?;
    } else {
        input = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?;
    }
    let options = InjectOptions {
        proxy_image: args.proxy_image,
        control: args.control,
        skip_outbound_ports: args.skip_outbound_ports,
    };
    let source = if args.file == "-" {
        "<stdin>"
    } else {
        args.file.as_str()
    };
    let (out, outcomes) = inject(&input, &options).with_context(|| source.to_string())?;
    print!("{out}");
    for o in outcomes {
        eprintln!("{} {}", o.resource, o.result.describe());
    }
    Ok(())
}

/// Injects every document of `input`; returns the output YAML and what happened to each resource.
pub fn inject(input: &str, options: &InjectOptions) -> Result<(String, Vec<Outcome>), InjectError> {
    let mut out = String::new();
    let mut outcomes = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let document = i + 1;
        let mut value = Value::deserialize(doc).map_err(|source| InjectError::Yaml { document, source })?;
        if value.is_null() {
            continue;
        }
        inject_resource(&mut value, options, document, &mut outcomes)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml_ng::to_string(&value).map_err(|source| InjectError::Yaml { document, source })?,
        );
    }
    Ok((out, outcomes))
}

fn inject_resource(
    value: &mut Value,
    options: &InjectOptions,
    document: usize,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), InjectError> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let resource = format!("{}/{name}", kind.to_ascii_lowercase());
    if kind == "List" {
        if let Some(Value::Sequence(items)) = value.get_mut("items") {
            for item in items {
                inject_resource(item, options, document, outcomes)?;
            }
        }
        return Ok(());
    }
    let workload_opt_out = opted_out(value.get("metadata"));
    let workload_service = annotation(value.get("metadata"), SERVICE_ANNOTATION).map(str::to_string);
    let template = match kind.as_str() {
        "Pod" => Some(&mut *value),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            value.get_mut("spec").and_then(|s| s.get_mut("template"))
        }
        "CronJob" => value
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|j| j.get_mut("spec"))
            .and_then(|s| s.get_mut("template")),
        _ => None,
    };
    let shape = |field: &str, reason: &str| InjectError::Shape {
        document,
        resource: resource.clone(),
        field: field.to_string(),
        reason: reason.to_string(),
    };
    let result = match template {
        None => InjectResult::NotAWorkload,
        Some(_) if workload_opt_out => InjectResult::OptedOut,
        Some(template) => {
            let service = workload_service
                .or_else(|| annotation(template.get("metadata"), SERVICE_ANNOTATION).map(str::to_string))
                .or_else(|| label(template.get("metadata"), "app.kubernetes.io/name"))
                .or_else(|| label(template.get("metadata"), "app"))
                .unwrap_or_else(|| name.clone());
            inject_template(template, &service, options).map_err(|(f, r)| shape(f, r))?
        }
    };
    outcomes.push(Outcome { resource, result });
    Ok(())
}

fn annotation<'a>(metadata: Option<&'a Value>, key: &str) -> Option<&'a str> {
    metadata?.get("annotations")?.get(key)?.as_str()
}

fn label(metadata: Option<&Value>, key: &str) -> Option<String> {
    Some(metadata?.get("labels")?.get(key)?.as_str()?.to_string())
}

fn opted_out(metadata: Option<&Value>) -> bool {
    annotation(metadata, INJECT_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("disabled"))
}

/// Adds the containers to one pod template (`metadata` + `spec`).
fn inject_template(
    template: &mut Value,
    service: &str,
    options: &InjectOptions,
) -> Result<InjectResult, (&'static str, &'static str)> {
    if opted_out(template.get("metadata")) {
        return Ok(InjectResult::OptedOut);
    }
    let Some(spec) = template.get_mut("spec").and_then(Value::as_mapping_mut) else {
        return Err(("spec", "a pod template needs a spec"));
    };
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(InjectResult::HostNetwork);
    }
    let containers = match spec.get("containers") {
        Some(Value::Sequence(c)) => c,
        _ => return Err(("spec.containers", "expected a list of containers")),
    };
    let has = |list: Option<&Value>, name: &str| {
        list.and_then(Value::as_sequence).is_some_and(|l| {
            l.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
        })
    };
    if has(Some(&spec["containers"]), PROXY_CONTAINER) || has(spec.get("initContainers"), INIT_CONTAINER) {
        return Ok(InjectResult::AlreadyInjected);
    }
    let app_port = containers
        .iter()
        .filter_map(|c| {
            c.get("ports")?
                .as_sequence()?
                .first()?
                .get("containerPort")?
                .as_u64()
        })
        .next();

    let proxy = proxy_container(service, app_port, options);
    let init = init_container(options);
    if let Some(Value::Sequence(c)) = spec.get_mut("containers") {
        c.push(proxy);
    }
    match spec.get_mut("initContainers") {
        Some(Value::Sequence(list)) => list.insert(0, init),
        _ => {
            spec.insert("initContainers".into(), Value::Sequence(vec![init]));
        }
    }

    let metadata = entry_mapping(
        template
            .as_mapping_mut()
            .expect("a template with a spec is a mapping"),
        "metadata",
    );
    let annotations = entry_mapping(metadata, "annotations");
    annotations.insert(INJECTED_ANNOTATION.into(), "true".into());
    Ok(InjectResult::Injected)
}

/// The mapping at `key`, created (empty) when missing or not a mapping.
fn entry_mapping<'a>(map: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    if !map.get(key).is_some_and(Value::is_mapping) {
        map.insert(key.into(), Value::Mapping(Mapping::new()));
    }
    map.get_mut(key)
        .and_then(Value::as_mapping_mut)
        .expect("just inserted")
}

/// A container from its YAML text (kept in the order a reader expects), with `args` set.
fn container(text: &str, args: Vec<String>) -> Value {
    let mut c: Value = serde_yaml_ng::from_str(text).expect("the container templates are valid YAML");
    let args = Value::Sequence(args.into_iter().map(Value::String).collect());
    c.as_mapping_mut()
        .expect("a container is a mapping")
        .insert("args".into(), args);
    c
}

fn proxy_container(service: &str, app_port: Option<u64>, options: &InjectOptions) -> Value {
    let mut args = vec![
        "--transparent".to_string(),
        "--admin".into(),
        format!("0.0.0.0:{ADMIN_PORT}"),
        "--service".into(),
        service.to_string(),
        "--log-format".into(),
        "json".into(),
    ];
    for c in &options.control {
        args.push("--control".into());
        args.push(c.clone());
    }
    if let Some(port) = app_port {
        // Kubernetes expands $(POD_IP) from the container's environment.
        args.push("--instance-address".into());
        args.push(format!("$(POD_IP):{port}"));
    }
    let text = format!(
        r#"
name: {PROXY_CONTAINER}
image: {image:?}
args: []
env:
  - name: POD_IP
    valueFrom: {{ fieldRef: {{ fieldPath: status.podIP }} }}
ports:
  - {{ name: cogmesh-admin, containerPort: {ADMIN_PORT} }}
  - {{ name: cogmesh-in, containerPort: {INBOUND_PORT} }}
readinessProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 10
livenessProbe:
  httpGet: {{ path: /live, port: {ADMIN_PORT} }}
  periodSeconds: 10
resources:
  requests: {{ cpu: 10m, memory: 16Mi }}
  limits: {{ cpu: "1", memory: 128Mi }}
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: [ALL] }}
"#,
        image = options.proxy_image,
    );
    container(&text, args)
}

fn init_container(options: &InjectOptions) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--skip-inbound-ports".into(),
        ADMIN_PORT.to_string(),
    ];
    if !options.skip_outbound_ports.is_empty() {
        args.push("--skip-outbound-ports".into());
        let ports: Vec<String> = options.skip_outbound_ports.iter().map(u16::to_string).collect();
        args.push(ports.join(","));
    }
    // Root with NET_ADMIN/NET_RAW only, for iptables in the pod's network namespace.
    let text = format!(
        r#"
name: {INIT_CONTAINER}
image: {image:?}
args: []
resources:
  requests: {{ cpu: 10m, memory: 8Mi }}
  limits: {{ cpu: 100m, memory: 32Mi }}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ add: [NET_ADMIN, NET_RAW], drop: [ALL] }}
"#,
        image = options.proxy_image,
    );
    container(&text, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: web }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      containers:
        - { name: web, image: web:1, ports: [{ containerPort: 8080 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web }
spec: { ports: [{ port: 80 }] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: nightly }
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{ name: job, image: job:1 }]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: agent, annotations: { cogmesh.io/inject: disabled } }
spec:
  selector: { matchLabels: { app: agent } }
  template:
    metadata: { labels: { app: agent } }
    spec: { containers: [{ name: agent, image: agent:1 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: node-exporter }
spec: { hostNetwork: true, containers: [{ name: x, image: x:1 }] }
"#;

    #[test]
    fn injects_templates_and_is_idempotent() {
        let options = InjectOptions::default();
        let (once, outcomes) = inject(INPUT, &options).unwrap();
        let results: Vec<(&str, InjectResult)> =
            outcomes.iter().map(|o| (o.resource.as_str(), o.result)).collect();
        assert_eq!(
            results,
            [
                ("deployment/web", InjectResult::Injected),
                ("service/web", InjectResult::NotAWorkload),
                ("cronjob/nightly", InjectResult::Injected),
                ("daemonset/agent", InjectResult::OptedOut),
                ("pod/node-exporter", InjectResult::HostNetwork),
            ]
        );
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&once)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let pod = &docs[0]["spec"]["template"];
        assert_eq!(pod["metadata"]["annotations"][INJECTED_ANNOTATION], "true");
        let containers = pod["spec"]["containers"].as_sequence().unwrap();
        assert_eq!(containers[1]["name"], PROXY_CONTAINER);
        let args: Vec<&str> = containers[1]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.windows(2).any(|w| w == ["--service", "web"]), "{args:?}");
        assert!(args
            .windows(2)
            .any(|w| w == ["--instance-address", "$(POD_IP):8080"]));
        assert_eq!(pod["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
        assert!(docs[3]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none());

        let (twice, outcomes) = inject(&once, &options).unwrap();
        assert_eq!(once, twice);
        assert_eq!(outcomes[0].result, InjectResult::AlreadyInjected);
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let bad = "kind: Pod\nmetadata: { name: p }\nspec: { containers: 3 }\n";
        let e = inject(bad, &InjectOptions::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            "document 1 (pod/p): spec.containers: expected a list of containers"
        );
        assert!(inject("a: [", &InjectOptions::default()).is_err());
    }
}
