//! The control plane with real sidecars on loopback: sidecars join with Hello, the control
//! plane pushes versioned routing tables (whole, then as deltas) that a client sidecar routes
//! with, sidecars ACK (or
//! NACK with a reason, and the refused version is not sent again), operators read it all through
//! `MeshAdmin` (tonic client and grpcurl over server reflection), and a sidecar restarted while
//! the control plane is down routes from its saved table (static stability).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{
    eventually, free_addr, grpcurl, http_get, metric_value, run_with_timeout, start_control, start_workload,
    ControlPlane, Proxy,
};
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{SyncStatusRequest, SyncStatusResponse};

fn inbound(cp: &ControlPlane, app: std::net::SocketAddr, service: &str) -> Proxy {
    Proxy::inbound(cp.addr, app, service)
}

fn config(proxy: &Proxy) -> serde_json::Value {
    let (status, body) = http_get(proxy.admin, "/config").unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

fn endpoints_of(proxy: &Proxy, service: &str) -> Vec<String> {
    let c = config(proxy);
    c["routing_table"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().unwrap().clone())
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect()
}

/// Counts `x-served-by` over `n` requests through `proxy`.
fn spread(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (code, out, err) = run_with_timeout(
            Command::new("curl").args(["-sS", "-o", "/dev/null", "-D", "-", &proxy.url("/")]),
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(0), "{err}");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let who = out
            .lines()
            .find_map(|l| l.strip_prefix("x-served-by: "))
            .unwrap_or("?")
            .trim()
            .to_string();
        *seen.entry(who).or_default() += 1;
    }
    seen
}

fn sync_status(cp: &ControlPlane) -> SyncStatusResponse {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        MeshAdminClient::new(channel)
            .get_sync_status(SyncStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn pushed_tables_route_traffic_and_every_sidecar_acks() {
    let admin = free_addr();
    let cp = start_control(&[
        "--weight-interval-ms",
        "200",
        "--admin-listen",
        &admin.to_string(),
    ]);
    let w1 = start_workload("reasoning-1");
    let w2 = start_workload("reasoning-2");
    let s1 = inbound(&cp, w1.addr, "reasoning");
    // Round robin, so that sequential requests visibly reach both instances.
    let client = Proxy::quick(
        &[],
        &[
            "--upstream-service",
            "reasoning",
            "--balancer",
            "round_robin",
            "--control",
            &cp.addr.to_string(),
            "--service",
            "gateway",
        ],
    );
    eventually(
        "the client to learn the first reasoning instance",
        Duration::from_secs(20),
        || (endpoints_of(&client, "reasoning") == vec![s1.listen.to_string()]).then_some(()),
    );
    // The second instance joins a table the client already runs: it gets it as a delta.
    let s2 = inbound(&cp, w2.addr, "reasoning");

    let mut expected = vec![s1.listen.to_string(), s2.listen.to_string()];
    expected.sort();
    eventually(
        "the client to learn both reasoning instances",
        Duration::from_secs(20),
        || {
            let mut got = endpoints_of(&client, "reasoning");
            got.sort();
            (got == expected).then_some(())
        },
    );
    assert!(
        config(&client)["routing_table"]["control_version"]
            .as_u64()
            .unwrap()
            > 0
    );

    let seen = spread(&client, 40);
    assert_eq!(seen.values().sum::<usize>(), 40, "{seen:?}");
    assert!(seen.get("reasoning-1").is_some_and(|n| *n > 0), "{seen:?}");
    assert!(seen.get("reasoning-2").is_some_and(|n| *n > 0), "{seen:?}");

    let status = eventually(
        "every sidecar to ACK the current version",
        Duration::from_secs(20),
        || {
            let s = sync_status(&cp);
            (s.sidecars.len() == 3
                && s.sidecars
                    .iter()
                    .all(|c| c.connected && c.acked_version == s.current_version))
            .then_some(s)
        },
    );
    assert!(
        status.sidecars.iter().all(|s| s.rejected.is_empty()),
        "{status:?}"
    );
    let services: Vec<_> = status.sidecars.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains(&"gateway") && services.contains(&"reasoning"),
        "{services:?}"
    );
    let (code, metrics) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    let deltas = metric_value(&metrics, "table_delta_push_total").unwrap();
    assert!(deltas >= 1.0, "no table went as a delta:\n{metrics}");
    assert!(
        metric_value(&metrics, "table_push_total").unwrap() > deltas,
        "the first table goes whole"
    );
    assert_eq!(
        metric_value(&metrics, "table_answer_total{result=\"nack\"}").unwrap_or(0.0),
        0.0,
        "{metrics}"
    );
}

#[test]
fn a_refused_table_is_reported_and_not_resent() {
    let cp = start_control(&["--weight-interval-ms", "200"]);
    let w1 = start_workload("reasoning-1");
    let s1 = inbound(&cp, w1.addr, "reasoning");
    let client = Proxy::quick(
        &[],
        &[
            "--upstream-service",
            "reasoning",
            "--control",
            &cp.addr.to_string(),
            "--service",
            "gateway",
        ],
    );
    eventually(
        "the client to learn the instance",
        Duration::from_secs(20),
        || (endpoints_of(&client, "reasoning") == vec![s1.listen.to_string()]).then_some(()),
    );

    // A sidecar that claims the client's own listener as its instance address: the next table
    // would make the client send traffic to itself, so the client must refuse it.
    let bogus = Proxy::quick(
        &[w1.addr],
        &[
            "--control",
            &cp.addr.to_string(),
            "--service",
            "reasoning",
            "--instance-address",
            &client.listen.to_string(),
        ],
    );
    let node = format!("gateway@{}", client.listen);
    let status = eventually("the client to NACK", Duration::from_secs(20), || {
        let s = sync_status(&cp);
        let c = s.sidecars.iter().find(|c| c.node == node)?.clone();
        (!c.rejected.is_empty()).then_some(c)
    });
    let rejection = &status.rejected[0];
    assert!(rejection.error.contains("routing loop"), "{rejection:?}");
    assert!(status.acked_version < rejection.version);
    // The client kept its last good table and still routes.
    assert_eq!(endpoints_of(&client, "reasoning"), vec![s1.listen.to_string()]);
    assert_eq!(spread(&client, 5)["reasoning-1"], 5);

    // When the bogus instance leaves, the next table is accepted.
    drop(bogus);
    eventually("the client to ACK a newer table", Duration::from_secs(20), || {
        let s = sync_status(&cp);
        let c = s.sidecars.iter().find(|c| c.node == node)?.clone();
        (c.acked_version > rejection.version).then_some(())
    });
}

#[test]
fn grpcurl_reads_the_admin_api_through_reflection() {
    let cp = start_control(&[]);
    let w1 = start_workload("reasoning-1");
    let _s1 = inbound(&cp, w1.addr, "reasoning");
    let target = cp.addr.to_string();
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args(["-plaintext", &target, "list"]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
    for service in [
        "cogmesh.v1.MeshAdmin",
        "cogmesh.v1.MeshControl",
        "grpc.health.v1.Health",
    ] {
        assert!(out.contains(service), "{service} missing from {out}");
    }
    let services = eventually("the instance to be listed", Duration::from_secs(20), || {
        let (code, out, _) = run_with_timeout(
            Command::new(grpcurl()).args([
                "-plaintext",
                "-d",
                "{}",
                &target,
                "cogmesh.v1.MeshAdmin/ListServices",
            ]),
            Duration::from_secs(30),
        );
        (code == Some(0) && out.contains("reasoning")).then_some(out)
    });
    let parsed: serde_json::Value = serde_json::from_str(&services).expect("grpcurl prints JSON");
    assert_eq!(parsed["services"][0]["name"], "reasoning", "{parsed}");
    let (code, out, err) = run_with_timeout(
        Command::new(grpcurl()).args(["-plaintext", &target, "grpc.health.v1.Health/Check"]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("SERVING"), "{out}");
}

#[test]
fn a_sidecar_restarted_without_the_control_plane_routes_from_its_saved_table() {
    let mut cp = start_control(&["--weight-interval-ms", "200"]);
    let w1 = start_workload("reasoning-1");
    let w2 = start_workload("reasoning-2");
    let s1 = inbound(&cp, w1.addr, "reasoning");
    let s2 = inbound(&cp, w2.addr, "reasoning");
    let dir = std::env::temp_dir().join(format!("cogmesh-state-{}-{}", std::process::id(), cp.addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("table.pb");
    let args = |state: &std::path::Path| {
        vec![
            "--upstream-service".to_string(),
            "reasoning".into(),
            "--control".into(),
            cp.addr.to_string(),
            "--service".into(),
            "gateway".into(),
            "--state-file".into(),
            state.display().to_string(),
        ]
    };
    let a = args(&state);
    let client = Proxy::quick(&[], &a.iter().map(String::as_str).collect::<Vec<_>>());
    eventually("both instances", Duration::from_secs(20), || {
        (endpoints_of(&client, "reasoning").len() == 2 && state.exists()).then_some(())
    });
    drop(client);

    // The control plane goes away; a new client sidecar starts from the saved table.
    cp.proc.signal("TERM");
    assert!(cp.proc.wait_exit(Duration::from_secs(10)).is_some());
    let restarted = Proxy::quick(&[], &a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut got = endpoints_of(&restarted, "reasoning");
    got.sort();
    let mut expected = vec![s1.listen.to_string(), s2.listen.to_string()];
    expected.sort();
    assert_eq!(got, expected);
    let seen = spread(&restarted, 20);
    assert_eq!(seen.values().sum::<usize>(), 20, "{seen:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
