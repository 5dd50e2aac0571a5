//! The cognitive balancer end to end: three simulated cognitive workloads of capacity 1, 2 and 4
//! (same fixed service time) and a fourth that stalls for the whole test, behind one
//! `cogmesh-proxy` with its default balancer. A bounded closed-loop load goes through the proxy,
//! and the test checks what an operator would: the bigger instances served more, the stalled one
//! served nothing and was tried only a few times, and the load reports never leaked to clients.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{http_get, http_post, start_workload_with, Proxy, Workload};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Closed-loop clients: each sends its next request when the previous one is answered. More
/// than the 7 slots of the healthy workloads together, so queues form and capacity matters.
const CLIENTS: usize = 8;
/// Requests in the whole run: ≈ 3–4 s at the healthy workloads' ≈ 300 requests/s, well inside
/// the proxy's 10 s staleness of what it learned (see `MAX_STALLED_ATTEMPTS`).
const REQUESTS: usize = 1000;
/// Service time of every request, fixed so that only capacity tells the workloads apart.
const SERVICE_TIME_MS: &str = "20";
/// The proxy gives up on a response after this long (504), so requests sent to the stalled
/// workload end and their clients go on.
const RESPONSE_TIMEOUT_MS: &str = "1000";
/// The whole load must be over well within this, or the test fails instead of hanging.
const RUN_LIMIT_SECS: u64 = 120;
/// The most requests the stalled workload may receive: one per client. Until the first request
/// to it times out, the proxy knows nothing bad about it (no load report, and a latency estimate
/// that only its requests' age raises), so P2C may well pick it, and while the healthy workloads
/// report themselves full it can look cheapest for a while. But each client that gets it is
/// blocked for the whole response timeout, so no client can reach it twice before the first
/// timeout, one timeout after the first pick. A balancer that learns from that timeout does not
/// pick it again within this short run (it may probe it again once what it learned goes stale,
/// ≈ 10 s later, after the run); more than one attempt per client means it kept feeding a dead
/// endpoint.
const MAX_STALLED_ATTEMPTS: u64 = CLIENTS as u64;

fn simulated(name: &str, capacity: &str) -> Workload {
    start_workload_with(
        name,
        &[
            "--capacity",
            capacity,
            "--queue",
            "64",
            "--service-time-dist",
            "fixed",
            "--service-time-ms",
            SERVICE_TIME_MS,
        ],
    )
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    /// Successful responses by `x-served-by`.
    served: BTreeMap<String, usize>,
    /// Responses by status code.
    statuses: BTreeMap<u16, usize>,
    /// Responses that carried a load report header.
    leaked_reports: usize,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (name, n) in other.served {
            *self.served.entry(name).or_default() += n;
        }
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.leaked_reports += other.leaked_reports;
    }

    fn served(&self, name: &str) -> usize {
        self.served.get(name).copied().unwrap_or(0)
    }
}

/// Sends `REQUESTS` requests to `/work` from `CLIENTS` closed-loop clients.
async fn drive(url: String) -> Tally {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let issued = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, issued, url) = (client.clone(), Arc::clone(&issued), url.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while issued.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                    let req = http::Request::get(url.as_str())
                        .body(Empty::new())
                        .expect("valid request");
                    let response = client.request(req).await.expect("the proxy answers");
                    let status = response.status();
                    *tally.statuses.entry(status.as_u16()).or_default() += 1;
                    let headers = response.headers();
                    if headers.contains_key("endpoint-load-metrics")
                        || headers.contains_key("endpoint-load-metrics-bin")
                    {
                        tally.leaked_reports += 1;
                    }
                    let served_by = headers
                        .get("x-served-by")
                        .map(|v| v.to_str().unwrap_or("?").to_owned());
                    let body = response.into_body().collect().await.expect("whole body");
                    if status.is_success() {
                        assert_eq!(body.to_bytes().as_ref(), b"done");
                        let name = served_by.expect("a success names its server");
                        *tally.served.entry(name).or_default() += 1;
                    }
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for client in clients {
        tally.merge(client.await.expect("client task"));
    }
    tally
}

/// A workload's `/admin/stats`.
fn stats(workload: &Workload) -> serde_json::Value {
    let (status, body) = http_get(workload.addr, "/admin/stats").expect("workload stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// The proxy's `requests` count (picks) for the endpoint at `addr`, from `/config`.
fn picks(proxy: &Proxy, addr: SocketAddr) -> u64 {
    let (status, body) = http_get(proxy.admin, "/config").expect("proxy /config");
    assert_eq!(status, 200, "{body}");
    let config: serde_json::Value = serde_json::from_str(&body).expect("config is JSON");
    config["routing_table"]["services"]
        .as_array()
        .expect("services")
        .iter()
        .flat_map(|s| s["endpoints"].as_array().expect("endpoints"))
        .find(|e| e["address"] == addr.to_string())
        .and_then(|e| e["requests"].as_u64())
        .unwrap_or_else(|| panic!("endpoint {addr} not in /config: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_wins_and_a_stalled_endpoint_is_avoided() {
    let small = simulated("cap1", "1");
    let medium = simulated("cap2", "2");
    let large = simulated("cap4", "4");
    let stalled = simulated("stalled", "4");
    let (status, body) = http_post(stalled.addr, "/admin/stall?for_ms=600000").unwrap();
    assert_eq!(status, 200, "{body}");

    let upstreams = [small.addr, medium.addr, large.addr, stalled.addr];
    let proxy = Proxy::quick(&upstreams, &["--response-timeout-ms", RESPONSE_TIMEOUT_MS]);

    let started = std::time::Instant::now();
    let tally = tokio::time::timeout(Duration::from_secs(RUN_LIMIT_SECS), drive(proxy.url("/work")))
        .await
        .expect("the load finishes on its own");
    let stalled_stats = stats(&stalled);
    let stalled_picks = picks(&proxy, stalled.addr);
    eprintln!(
        "{tally:?} in {:?}\nstalled workload: {stalled_stats}, picked {stalled_picks} times",
        started.elapsed()
    );

    assert_eq!(tally.statuses.values().sum::<usize>(), REQUESTS, "{tally:?}");
    assert_eq!(
        tally.leaked_reports, 0,
        "the proxy must strip endpoint-load-metrics: {tally:?}"
    );
    let (one, two, four) = (tally.served("cap1"), tally.served("cap2"), tally.served("cap4"));
    assert!(
        four > two && two > one,
        "served should follow capacity 4 > 2 > 1: {tally:?}"
    );

    assert_eq!(tally.served("stalled"), 0, "{tally:?}");
    assert_eq!(stalled_stats["completed"], 0, "{stalled_stats}");
    let received = stalled_stats["received"].as_u64().expect("received");
    assert!(
        stalled_picks <= MAX_STALLED_ATTEMPTS && received <= MAX_STALLED_ATTEMPTS,
        "the stalled workload was tried {stalled_picks} times (it received {received}); \
         at most {MAX_STALLED_ATTEMPTS} expected: {tally:?}"
    );
    // Every try of the stalled workload ended as a 504 to its client, nothing else failed.
    assert_eq!(
        tally.statuses.get(&504).copied().unwrap_or(0) as u64,
        stalled_picks,
        "{tally:?}"
    );
    assert!(tally.statuses.keys().all(|s| *s == 200 || *s == 504), "{tally:?}");
}
