//! Kubernetes discovery: `cogmesh control` with `discovery.kubernetes` lists and watches the
//! `discovery.k8s.io/v1` EndpointSlices of a namespace and serves their ready endpoints as the
//! service named by `kubernetes.io/service-name`, through `MeshAdmin` / `cogmesh routes`.
//!
//! No real API server can run here (no cluster, no container runtime), so the API server is a
//! small fake on loopback written below. It follows the documented REST protocol of the
//! Kubernetes API: `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` with
//! `labelSelector` returns an `EndpointSliceList` with a `metadata.resourceVersion`; the same
//! path with `watch=true&resourceVersion=R` streams newline-delimited JSON watch events
//! (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) newer than R, each carrying the whole object; a
//! resource version that is too old is answered with an `ERROR` event holding a `410` Status,
//! after which a client must list again. The objects are the documented EndpointSlice JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{bin, eventually, free_addr, http_get, run_with_timeout, serve_http1, start_control};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};

const NAMESPACE: &str = "mesh";
const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/mesh/endpointslices";

/// The fake API server's objects and event log.
#[derive(Default)]
struct ApiState {
    resource_version: u64,
    slices: BTreeMap<String, Value>,
    /// (resource version, watch event line).
    events: Vec<(u64, String)>,
    /// Watches from before this resource version get `410 Gone`.
    oldest_watchable: u64,
    /// Query strings of every request, for the assertions.
    queries: Vec<String>,
}

struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    _runtime: tokio::runtime::Runtime,
}

fn endpoint_slice(name: &str, service: &str, endpoints: &[(&str, bool)], rv: u64) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "resourceVersion": rv.to_string(),
            "labels": { "kubernetes.io/service-name": service, "app": service }
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "metrics", "port": 9090, "protocol": "TCP" },
            { "name": "http", "port": 8080, "protocol": "TCP" }
        ],
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": ready, "terminating": false },
            "nodeName": "node-1"
        })).collect::<Vec<_>>()
    })
}

impl FakeApiServer {
    fn start() -> FakeApiServer {
        let state = Arc::new(Mutex::new(ApiState {
            resource_version: 100,
            ..Default::default()
        }));
        let changed = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (st, ch) = (Arc::clone(&state), changed.clone());
        let (addr, runtime) = serve_http1(move |req| {
            let response = answer(req, Arc::clone(&st), ch.clone());
            async move { response }
        });
        FakeApiServer {
            addr,
            state,
            changed,
            _runtime: runtime,
        }
    }

    /// Creates or replaces a slice (an ADDED or MODIFIED event).
    fn apply(&self, name: &str, service: &str, endpoints: &[(&str, bool)]) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        let object = endpoint_slice(name, service, endpoints, rv);
        let kind = if s.slices.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.events
            .push((rv, json!({ "type": kind, "object": object }).to_string()));
        s.slices.insert(name.to_string(), object);
        drop(s);
        self.changed.send_modify(|v| *v += 1);
    }

    fn delete(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        if let Some(mut object) = s.slices.remove(name) {
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.events
                .push((rv, json!({ "type": "DELETED", "object": object }).to_string()));
        }
        drop(s);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Compacts history: every open watch gets `410 Gone` and clients must list again.
    fn expire_history(&self) {
        let mut s = self.state.lock().unwrap();
        // Watches that have not seen everything up to now are refused.
        s.oldest_watchable = s.resource_version;
        drop(s);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Changes the list only, as if events were lost while the watch was down.
    fn apply_silently(&self, name: &str, service: &str, endpoints: &[(&str, bool)]) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        s.slices
            .insert(name.to_string(), endpoint_slice(name, service, endpoints, rv));
    }

    fn queries(&self) -> Vec<String> {
        self.state.lock().unwrap().queries.clone()
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether `object` matches the request's label selector (the test uses `key=value` only).
fn selected(selector: Option<&str>, object: &Value) -> bool {
    match selector.and_then(|s| s.split_once('=')) {
        Some((k, v)) => object["metadata"]["labels"][k] == v,
        None => true,
    }
}

fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    state: Arc<Mutex<ApiState>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
) -> hyper::Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    state.lock().unwrap().queries.push(query.clone());
    let json_response = |status: u16, v: Value| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())).boxed())
            .unwrap()
    };
    if req.uri().path() != PATH {
        return json_response(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
        );
    }
    let selector: Option<String> = query_param(&query, "labelSelector").map(|s| s.replace("%3D", "="));
    let watching = matches!(query_param(&query, "watch"), Some("true" | "1"));
    if !watching {
        let s = state.lock().unwrap();
        let items: Vec<Value> = s
            .slices
            .values()
            .filter(|o| selected(selector.as_deref(), o))
            .cloned()
            .collect();
        return json_response(
            200,
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": { "resourceVersion": s.resource_version.to_string() },
                "items": items
            }),
        );
    }
    let from: u64 = query_param(&query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut changes = changed.subscribe();
    tokio::spawn(async move {
        let mut sent = from;
        loop {
            let (lines, gone) = {
                let s = state.lock().unwrap();
                if sent < s.oldest_watchable {
                    (Vec::new(), true)
                } else {
                    let lines: Vec<(u64, String)> = s
                        .events
                        .iter()
                        .filter(|(rv, line)| {
                            *rv > sent
                                && serde_json::from_str::<Value>(line)
                                    .is_ok_and(|e| selected(selector.as_deref(), &e["object"]))
                        })
                        .cloned()
                        .collect();
                    (lines, false)
                }
            };
            if gone {
                let status = json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "too old resource version",
                        "reason": "Expired", "code": 410
                    }
                });
                let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{status}\n"))))).await;
                return;
            }
            for (rv, line) in lines {
                if tx
                    .send(Ok(Frame::data(Bytes::from(format!("{line}\n")))))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = rv;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

/// `cogmesh routes --json`: service → endpoint addresses.
fn routes(control: SocketAddr) -> BTreeMap<String, Vec<String>> {
    let (code, out, err) = run_with_timeout(
        Command::new(bin("cogmesh")).args(["routes", "--json", "--control", &control.to_string()]),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut addrs: Vec<String> = s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["address"].as_str().unwrap().to_string())
                .collect();
            addrs.sort();
            (s["service"].as_str().unwrap().to_string(), addrs)
        })
        .collect()
}

fn wait_for_routes(control: SocketAddr, what: &str, check: impl Fn(&BTreeMap<String, Vec<String>>) -> bool) {
    eventually(what, Duration::from_secs(30), || {
        let r = routes(control);
        check(&r).then_some(())
    });
}

#[test]
fn endpoint_slices_are_listed_watched_and_relisted_after_410() {
    let api = FakeApiServer::start();
    api.apply(
        "reasoning-a",
        "reasoning",
        &[("10.1.0.1", true), ("10.1.0.2", false)],
    );
    // Another service's slice, outside the label selector.
    api.apply("billing-a", "billing", &[("10.9.0.1", true)]);

    let dir = std::env::temp_dir().join(format!("cogmesh-control-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("control.yaml");
    std::fs::write(
        &config,
        format!(
            "discovery:\n  kubernetes:\n    namespace: {NAMESPACE}\n    label_selector: app=reasoning\n    port: http\n    api_server: http://{}\n",
            api.addr
        ),
    )
    .unwrap();
    // `cogmesh check` knows the section and refuses a bad one with file, field and reason.
    let check = |path: &std::path::Path| {
        run_with_timeout(
            Command::new(bin("cogmesh")).arg("check").arg(path),
            Duration::from_secs(10),
        )
    };
    let (code, out, err) = check(&config);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("EndpointSlices of namespace mesh matching app=reasoning"),
        "{out}"
    );
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "discovery:\n  kubernetes:\n    namespace: Mesh\n").unwrap();
    let (code, _, err) = check(&bad);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("bad.yaml: discovery.kubernetes.namespace: \"Mesh\" is not a namespace name"),
        "{err}"
    );

    let admin = free_addr();
    let admin_arg = admin.to_string();
    let cp = start_control(&[
        "--admin-listen",
        &admin_arg,
        "--config",
        config.to_str().unwrap(),
        "--weight-interval-ms",
        "100",
    ]);

    // Listed: the ready endpoint on the `http` port; the unready one and the other service not.
    wait_for_routes(cp.addr, "the listed slice", |r| {
        r.get("reasoning") == Some(&vec!["10.1.0.1:8080".to_string()])
    });
    assert!(!routes(cp.addr).contains_key("billing"));
    let first = api.queries().first().cloned().unwrap_or_default();
    assert_eq!(
        query_param(&first, "labelSelector"),
        Some("app%3Dreasoning"),
        "{first}"
    );

    // Watched: a new slice (ADDED), then the endpoint turning ready (MODIFIED)...
    api.apply("reasoning-b", "reasoning", &[("10.1.0.3", true)]);
    api.apply(
        "reasoning-a",
        "reasoning",
        &[("10.1.0.1", true), ("10.1.0.2", true)],
    );
    wait_for_routes(cp.addr, "ADDED and MODIFIED slices", |r| {
        r.get("reasoning").map(Vec::len) == Some(3)
    });
    // ... and a slice going away (DELETED).
    api.delete("reasoning-a");
    wait_for_routes(cp.addr, "the DELETED slice's endpoints to go", |r| {
        r.get("reasoning") == Some(&vec!["10.1.0.3:8080".to_string()])
    });
    assert!(
        api.queries()
            .iter()
            .any(|q| matches!(query_param(q, "watch"), Some("true" | "1"))),
        "no watch request: {:?}",
        api.queries()
    );

    // History compacted while a change was missed: 410 Gone, so the control plane lists again
    // and converges on the list (the missed slice appears, nothing stale stays).
    api.apply_silently("reasoning-c", "reasoning", &[("10.1.0.4", true)]);
    api.expire_history();
    wait_for_routes(cp.addr, "the relisted slices", |r| {
        r.get("reasoning") == Some(&vec!["10.1.0.3:8080".to_string(), "10.1.0.4:8080".to_string()])
    });

    // Changing the discovery section needs a restart: the reload is refused, reported through
    // MeshAdmin (`cogmesh status`), and the watch goes on with the configuration in force.
    std::fs::write(
        &config,
        format!(
            "discovery:\n  kubernetes:\n    namespace: other\n    api_server: http://{}\n",
            api.addr
        ),
    )
    .unwrap();
    let status = eventually("the refused reload", Duration::from_secs(20), || {
        let (_, out, _) = run_with_timeout(
            Command::new(bin("cogmesh")).args(["status", "--json", "--control", &cp.addr.to_string()]),
            Duration::from_secs(10),
        );
        let v: Value = serde_json::from_str(&out).ok()?;
        (v["config"]["reloads_refused"].as_u64()? >= 1).then_some(v)
    });
    let error = status["config"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("discovery: changing it needs a restart"),
        "{error}"
    );
    // One edit, one refusal: the reload's own reading of the file is not a change (it used to
    // trigger another reload every 100 ms, counting one bad edit many times).
    std::thread::sleep(Duration::from_secs(1));
    let (_, out, _) = run_with_timeout(
        Command::new(bin("cogmesh")).args(["status", "--json", "--control", &cp.addr.to_string()]),
        Duration::from_secs(10),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["reloads_refused"], 1, "{}", v["config"]);
    // ... and counted in the control plane's metrics.
    let (code, metrics) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("config_reload_total{result=\"refused\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("routing_table_version "), "{metrics}");
    api.apply("reasoning-d", "reasoning", &[("10.1.0.5", true)]);
    wait_for_routes(cp.addr, "a slice added after the refused reload", |r| {
        r.get("reasoning").map(Vec::len) == Some(3)
    });
    let _ = std::fs::remove_dir_all(&dir);
}
