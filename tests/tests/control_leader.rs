//! Several control-plane replicas: leader election through a `coordination.k8s.io/v1` Lease, and
//! a sidecar that fails over between control-plane addresses.
//!
//! No real API server can run here (no cluster), so the API server is a small fake on loopback
//! written below, following the documented REST protocol for Leases:
//! `GET /apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}` returns the Lease or a
//! `404` Status; `POST .../namespaces/{ns}/leases` creates it (`409 AlreadyExists` if it
//! exists); `PUT .../leases/{name}` replaces it, and answers `409 Conflict` when the body's
//! `metadata.resourceVersion` is not the stored one (optimistic concurrency). Every stored
//! object gets a new `resourceVersion`.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{
    bin, eventually, free_addr, http_get, metric_value, run_with_timeout, serve_http1, start_control, Proxy,
};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cogmesh/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/cogmesh/leases/cogmesh-control";

#[derive(Default)]
struct LeaseStore {
    resource_version: u64,
    lease: Option<Value>,
    /// `spec.holderIdentity` of every successful write, in order ("" for none).
    holders: Vec<String>,
}

struct FakeApiServer {
    addr: SocketAddr,
    store: Arc<Mutex<LeaseStore>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeApiServer {
    fn start() -> FakeApiServer {
        let store = Arc::new(Mutex::new(LeaseStore {
            resource_version: 500,
            ..Default::default()
        }));
        let st = Arc::clone(&store);
        let (addr, runtime) = serve_http1(move |req| answer(req, Arc::clone(&st)));
        FakeApiServer {
            addr,
            store,
            _runtime: runtime,
        }
    }

    fn holder(&self) -> Option<String> {
        let s = self.store.lock().unwrap();
        s.lease.as_ref()?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    }

    fn lease(&self) -> Value {
        self.store.lock().unwrap().lease.clone().unwrap_or(Value::Null)
    }

    fn holders(&self) -> Vec<String> {
        self.store.lock().unwrap().holders.clone()
    }
}

fn status(code: u16, reason: &str) -> hyper::Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code
    });
    respond(code, body)
}

fn respond(code: u16, body: Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    store: Arc<Mutex<LeaseStore>>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut s = store.lock().unwrap();
    let store_lease = |s: &mut LeaseStore, mut lease: Value| {
        s.resource_version += 1;
        lease["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        lease["apiVersion"] = json!("coordination.k8s.io/v1");
        lease["kind"] = json!("Lease");
        s.holders
            .push(lease["spec"]["holderIdentity"].as_str().unwrap_or("").to_string());
        s.lease = Some(lease.clone());
        lease
    };
    match (method.as_str(), path.as_str()) {
        ("GET", LEASE) => match &s.lease {
            Some(l) => respond(200, l.clone()),
            None => status(404, "NotFound"),
        },
        ("POST", LEASES) => {
            if s.lease.is_some() {
                return status(409, "AlreadyExists");
            }
            let Ok(lease) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest");
            };
            respond(201, store_lease(&mut s, lease))
        }
        ("PUT", LEASE) => {
            let Ok(lease) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest");
            };
            let Some(current) = &s.lease else {
                return status(404, "NotFound");
            };
            if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(409, "Conflict");
            }
            respond(200, store_lease(&mut s, lease))
        }
        _ => status(404, "NotFound"),
    }
}

struct Replica {
    identity: String,
    admin: SocketAddr,
    cp: cogmesh_e2e::ControlPlane,
}

fn replica(api: &FakeApiServer, dir: &std::path::Path, identity: &str) -> Replica {
    let config = dir.join(format!("{identity}.yaml"));
    std::fs::write(
        &config,
        format!(
            "leader_election:\n  namespace: cogmesh\n  identity: {identity}\n  lease_duration_s: 2\n  \
             retry_period_ms: 200\n  api_server: http://{}\n",
            api.addr
        ),
    )
    .unwrap();
    let admin = free_addr();
    let cp = start_control(&[
        "--config",
        config.to_str().unwrap(),
        "--admin-listen",
        &admin.to_string(),
    ]);
    Replica {
        identity: identity.to_string(),
        admin,
        cp,
    }
}

fn leader_gauge(r: &Replica) -> Option<f64> {
    let (_, metrics) = http_get(r.admin, "/metrics").ok()?;
    metric_value(&metrics, "leader ")
}

/// The sidecars `cogmesh status` lists as connected to `control`.
fn connected(control: SocketAddr) -> Vec<String> {
    let (_, out, _) = run_with_timeout(
        Command::new(bin("cogmesh")).args(["status", "--json", "--control", &control.to_string()]),
        Duration::from_secs(10),
    );
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v["sidecars"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| s["connected"] == true)
                .filter_map(|s| s["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn one_replica_leads_and_another_takes_over_when_it_dies() {
    let api = FakeApiServer::start();
    let dir = std::env::temp_dir().join(format!("cogmesh-leader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut replicas: Vec<Replica> = ["cp-a", "cp-b", "cp-c"]
        .iter()
        .map(|id| replica(&api, &dir, id))
        .collect();

    // Exactly one leads: the Lease names it and only its `leader` gauge is 1.
    let first = eventually("a leader", Duration::from_secs(20), || api.holder());
    let gauges = eventually("every replica's leader gauge", Duration::from_secs(20), || {
        let g: Vec<f64> = replicas.iter().filter_map(leader_gauge).collect();
        (g.len() == 3 && g.iter().sum::<f64>() == 1.0).then_some(g)
    });
    let leader = replicas.iter().position(|r| r.identity == first).unwrap();
    assert_eq!(gauges[leader], 1.0, "{gauges:?}");
    assert_eq!(api.lease()["spec"]["leaseTransitions"], 0);

    // A sidecar given the leader's address first, then a follower's.
    let follower = (leader + 1) % 3;
    // The second one by host name: sidecars resolve names on every connect.
    let second_address = replicas[follower].cp.addr;
    let controls = format!("{},localhost:{}", replicas[leader].cp.addr, second_address.port());
    let app = free_addr();
    let _sidecar = Proxy::quick(
        &[app],
        &[
            "--direction",
            "inbound",
            "--control",
            &controls,
            "--service",
            "web",
            "--node",
            "web-1",
        ],
    );
    eventually(
        "the sidecar on the first address",
        Duration::from_secs(20),
        || {
            connected(replicas[leader].cp.addr)
                .contains(&"web-1".to_string())
                .then_some(())
        },
    );

    // The leader dies without a word (SIGKILL): once its Lease expires another replica takes
    // over, and the sidecar moves to the second address.
    replicas[leader].cp.proc.signal("KILL");
    let _ = replicas[leader].cp.proc.wait_exit(Duration::from_secs(5));
    let dead = replicas.remove(leader);
    let second = eventually("a new leader", Duration::from_secs(20), || {
        api.holder().filter(|h| *h != dead.identity && !h.is_empty())
    });
    assert_eq!(api.lease()["spec"]["leaseTransitions"], 1, "{}", api.lease());
    let successor = replicas.iter().position(|r| r.identity == second).unwrap();
    eventually("the successor's leader gauge", Duration::from_secs(20), || {
        (leader_gauge(&replicas[successor]) == Some(1.0)).then_some(())
    });
    drop(dead);
    eventually(
        "the sidecar failed over to the second address",
        Duration::from_secs(30),
        || {
            connected(second_address)
                .contains(&"web-1".to_string())
                .then_some(())
        },
    );

    // A leader stopped on purpose (SIGTERM) releases the Lease on its way out, and the last
    // replica takes it.
    let holders_before = api.holders().len();
    replicas[successor].cp.proc.signal("TERM");
    assert!(
        replicas[successor]
            .cp
            .proc
            .wait_exit(Duration::from_secs(15))
            .is_some(),
        "the leader did not stop"
    );
    let released = api.holders()[holders_before..].contains(&String::new());
    assert!(released, "no release written: {:?}", api.holders());
    let last = replicas.iter().find(|r| r.identity != second).unwrap();
    eventually("the last replica leads", Duration::from_secs(20), || {
        (api.holder().as_deref() == Some(last.identity.as_str())).then_some(())
    });
    eventually("the last replica's leader gauge", Duration::from_secs(20), || {
        (leader_gauge(last) == Some(1.0)).then_some(())
    });
    let _ = std::fs::remove_dir_all(&dir);
}
