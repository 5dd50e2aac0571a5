//! `cogmesh demo`: brings the local mesh up, puts a client sidecar in front of
//! `cognitive_gateway`, drives a load pattern through it, shows what the mesh does every second,
//! prints a summary and stops everything.
//!
//! Phases (shares of `--duration`): warm-up (20 %, 40 req/s), a burst with mixed priorities
//! (30 %, 400 req/s: 20 % critical, 50 % normal, 30 % sheddable), a slow replica (25 %, 150 req/s:
//! one gateway replica answers 200 ms late), a replica killed (25 %, 150 req/s: another one
//! crashes). Every load loop is open-loop, bounded by the phase's time, each request by 5 s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{ListServicesRequest, WatchAlertsRequest, WatchScalingDecisionsRequest};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Channel;

use super::mesh::MeshFile;
use super::up::Mesh;
use crate::scaling::process::free_port;

/// The service the demo's client sidecar routes to.
pub const ENTRY: &str = "cognitive_gateway";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    WarmUp,
    Burst,
    SlowReplica,
    ReplicaKilled,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::WarmUp => "warm-up",
            Phase::Burst => "burst",
            Phase::SlowReplica => "slow replica",
            Phase::ReplicaKilled => "replica killed",
        }
    }
}

const PHASES: [(Phase, f64, u32); 4] = [
    (Phase::WarmUp, 0.2, 40),
    (Phase::Burst, 0.3, 400),
    (Phase::SlowReplica, 0.25, 150),
    (Phase::ReplicaKilled, 0.25, 150),
];

const PRIORITIES: [&str; 3] = ["critical", "normal", "sheddable"];

/// The priority of the `i`-th request of the burst: 20 % critical, 50 % normal, 30 % sheddable.
fn burst_priority(i: u64) -> &'static str {
    match i % 10 {
        0 | 1 => "critical",
        2..=6 => "normal",
        _ => "sheddable",
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    priority: &'static str,
    ok: bool,
    /// Refused by a sidecar's priority admission (`x-cogmesh-error: shed`).
    shed: bool,
    latency: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn admin(control: SocketAddr) -> anyhow::Result<MeshAdminClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))?
        .connect()
        .await?;
    Ok(MeshAdminClient::new(channel))
}

/// The client sidecar in front of the gateway service.
struct Gateway {
    listen: SocketAddr,
    child: Child,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        crate::scaling::process::stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// Runs the demo for `duration`; the mesh file's control addresses may be overridden.
pub async fn run(file: MeshFile, duration: Duration) -> anyhow::Result<()> {
    if !file.services.contains_key(ENTRY) {
        bail!("the demo drives {ENTRY:?}, which the mesh file does not define");
    }
    let up_started = Instant::now();
    println!("== bringing the mesh up");
    let mut mesh = Mesh::up(file).await?;
    println!("{}", mesh.status().await);
    println!("   (up in {:.1} s)", up_started.elapsed().as_secs_f64());

    let gateway = start_gateway(&mesh).await?;
    let events = watch_events(mesh.control).await?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let started = Instant::now();
    let mut first_scale_up = None;
    let mut burst_at = None;
    let mut admin_client = admin(mesh.control).await?;

    for (phase, share, rate) in PHASES {
        let phase_len = duration.mul_f64(share);
        println!(
            "== phase: {} ({:.0} s, {rate} req/s)",
            phase.name(),
            phase_len.as_secs_f64()
        );
        if phase == Phase::Burst {
            burst_at = Some(started.elapsed());
        }
        if matches!(phase, Phase::SlowReplica | Phase::ReplicaKilled) {
            fault(&mut admin_client, phase, phase_len).await;
        }
        let phase_end = Instant::now() + phase_len;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_report = Instant::now() + Duration::from_secs(1);
        let mut i: u64 = 0;
        while Instant::now() < phase_end {
            tick.tick().await;
            let priority = if phase == Phase::Burst {
                burst_priority(i)
            } else {
                "normal"
            };
            i += 1;
            let (client, record) = (client.clone(), Arc::clone(&samples));
            let url = format!("http://{}/work", gateway.listen);
            tokio::spawn(async move {
                let sent = Instant::now();
                let req = http::Request::get(url)
                    .header("x-cogmesh-priority", priority)
                    .body(Empty::new())
                    .expect("a valid request");
                let (ok, shed) = match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
                {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let shed = resp.headers().get("x-cogmesh-error").is_some_and(|v| v == "shed");
                        let _ = resp.into_body().collect().await;
                        (status.is_success(), shed)
                    }
                    _ => (false, false),
                };
                let sample = Sample {
                    at: started.elapsed(),
                    priority,
                    ok,
                    shed,
                    latency: sent.elapsed(),
                };
                record.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
            });
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(1);
                let line = progress(&mut admin_client, phase, started.elapsed(), &samples, &events).await;
                println!("{line}");
            }
        }
        if first_scale_up.is_none() {
            first_scale_up = events.first_up(ENTRY);
        }
    }
    // Let the last requests finish (each is bounded by 5 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first_scale_up = first_scale_up.or_else(|| events.first_up(ENTRY));
    let summary = summarize(&samples, &events, burst_at, first_scale_up, started);
    println!("{summary}");
    drop(gateway);
    println!("== stopping the mesh");
    mesh.stop();
    println!("everything the demo started is stopped");
    let total = samples.lock().unwrap_or_else(|p| p.into_inner()).len();
    if total == 0 {
        bail!("no request was sent");
    }
    Ok(())
}

async fn start_gateway(mesh: &Mesh) -> anyhow::Result<Gateway> {
    let listen = free_port()?;
    let admin_addr = free_port()?;
    let bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("cogmesh-proxy"))
        .context("no directory for cogmesh-proxy")?;
    let child = Command::new(bin)
        .args([
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin_addr.to_string(),
        ])
        .args([
            "--upstream-service",
            ENTRY,
            "--control",
            &mesh.control.to_string(),
        ])
        .args(["--service", "demo-client"])
        .env("COGMESH_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start the client sidecar")?;
    let gateway = Gateway { listen, child };
    // Ready once a request goes through.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let url: http::Uri = format!("http://{listen}/work").parse()?;
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), client.get(url)).await {
            if r.status().is_success() {
                return Ok(gateway);
            }
        }
        if Instant::now() > deadline {
            bail!("the client sidecar did not route to {ENTRY} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Slows one gateway replica down, or crashes another, through its sidecar.
async fn fault(admin: &mut MeshAdminClient<Channel>, phase: Phase, for_how_long: Duration) {
    let Ok(services) = admin.list_services(ListServicesRequest {}).await else {
        return;
    };
    let endpoints: Vec<String> = services
        .into_inner()
        .services
        .into_iter()
        .find(|s| s.name == ENTRY)
        .map(|s| s.endpoints.into_iter().map(|e| e.address).collect())
        .unwrap_or_default();
    let (target, path) = match phase {
        Phase::SlowReplica => (
            endpoints.first(),
            format!("/admin/delay?ms=200&for_ms={}", for_how_long.as_millis()),
        ),
        _ => (endpoints.last(), "/admin/crash".to_string()),
    };
    let Some(target) = target else {
        return;
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{target}{path}"))
        .body(Empty::new())
        .expect("a valid request");
    match tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
        Ok(Ok(r)) => println!(
            "   {} → {target}: {}",
            path.split('?').next().unwrap_or(&path),
            r.status()
        ),
        _ => println!("   {path} → {target}: no answer"),
    }
}

/// A decision as the demo saw it: when, service, from, to, reason.
type SeenDecision = (Duration, String, u32, u32, String);

/// Decisions and alerts as they happen (printed at once, kept for the summary).
#[derive(Clone, Default)]
struct Events {
    decisions: Arc<Mutex<Vec<SeenDecision>>>,
    alerts: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn first_up(&self, service: &str) -> Option<Duration> {
        let d = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .find(|(_, s, from, to, _)| s == service && to > from)
            .map(|e| e.0)
    }
}

async fn watch_events(control: SocketAddr) -> anyhow::Result<Events> {
    let events = Events::default();
    let started = Instant::now();
    let mut decisions = admin(control)
        .await?
        .watch_scaling_decisions(WatchScalingDecisionsRequest::default())
        .await?
        .into_inner();
    let mut alerts = admin(control)
        .await?
        .watch_alerts(WatchAlertsRequest {})
        .await?
        .into_inner();
    let e = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(d)) = decisions.message().await {
            println!(
                "   ▲ scaling {}: {} → {} replicas ({})",
                d.service, d.from_replicas, d.to_replicas, d.reason
            );
            let entry = (
                started.elapsed(),
                d.service,
                d.from_replicas,
                d.to_replicas,
                d.reason,
            );
            e.decisions.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
        }
    });
    let e = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(a)) = alerts.message().await {
            let line = format!(
                "{} {} {} ({:.2}, threshold {:.2})",
                a.service, a.metric, a.level, a.value, a.threshold
            );
            println!("   ! alert {line}");
            e.alerts.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    Ok(events)
}

async fn progress(
    admin: &mut MeshAdminClient<Channel>,
    phase: Phase,
    elapsed: Duration,
    samples: &Mutex<Vec<Sample>>,
    events: &Events,
) -> String {
    let (rps, ok, p99) = {
        let samples = samples.lock().unwrap_or_else(|p| p.into_inner());
        let recent: Vec<&Sample> = samples
            .iter()
            .rev()
            .take_while(|s| s.at + Duration::from_secs(1) >= elapsed)
            .collect();
        let ok = recent.iter().filter(|s| s.ok).count();
        let mut lat: Vec<Duration> = recent.iter().map(|s| s.latency).collect();
        lat.sort();
        (recent.len(), ok, percentile(&lat, 0.99))
    };
    let services = match admin.list_services(ListServicesRequest {}).await {
        Ok(r) => r.into_inner().services,
        Err(_) => Vec::new(),
    };
    let mesh: Vec<String> = services
        .iter()
        .filter(|s| s.name == ENTRY || s.name == "reasoning_engine")
        .map(|s| {
            let n = s.endpoints.len().max(1) as f64;
            let load = s.endpoints.iter().map(|e| e.cognitive_load).sum::<f64>() / n;
            let weights: Vec<String> = s.endpoints.iter().map(|e| format!("{:.1}", e.weight)).collect();
            format!(
                "{} ×{} load {:.2} w [{}]",
                s.name,
                s.endpoints.len(),
                load,
                weights.join(" ")
            )
        })
        .collect();
    let decisions = events.decisions.lock().unwrap_or_else(|p| p.into_inner()).len();
    let alerts = events.alerts.lock().unwrap_or_else(|p| p.into_inner()).len();
    format!(
        "[{:>4.0} s {:<14}] {:>4} req/s  ok {:>5.1} %  p99 {:>5} ms | {} | decisions {decisions} alerts {alerts}",
        elapsed.as_secs_f64(),
        phase.name(),
        rps,
        if rps == 0 { 100.0 } else { ok as f64 * 100.0 / rps as f64 },
        p99.as_millis(),
        mesh.join(" | ")
    )
}

fn summarize(
    samples: &Mutex<Vec<Sample>>,
    events: &Events,
    burst_at: Option<Duration>,
    first_scale_up: Option<Duration>,
    started: Instant,
) -> String {
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner());
    // Per priority: requests, succeeded, shed.
    let mut by_priority: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for s in samples.iter() {
        let e = by_priority.entry(s.priority).or_default();
        e.0 += 1;
        e.1 += usize::from(s.ok);
        e.2 += usize::from(s.shed);
    }
    let mut lat: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.latency).collect();
    lat.sort();
    let ok: usize = by_priority.values().map(|v| v.1).sum();
    let mut out = format!(
        "== summary ({:.0} s)\nrequests: {}   succeeded: {} ({:.1} %)   p50 {} ms   p99 {} ms (successful requests)\n",
        started.elapsed().as_secs_f64(),
        samples.len(),
        ok,
        ok as f64 * 100.0 / samples.len().max(1) as f64,
        percentile(&lat, 0.5).as_millis(),
        percentile(&lat, 0.99).as_millis()
    );
    for p in PRIORITIES {
        if let Some((n, k, shed)) = by_priority.get(p) {
            out.push_str(&format!(
                "  {p:<10} {n:>6} requests, {:.1} % succeeded, {shed} shed by priority admission\n",
                *k as f64 * 100.0 / (*n).max(1) as f64
            ));
        }
    }
    let decisions = events.decisions.lock().unwrap_or_else(|p| p.into_inner());
    out.push_str(&format!("scaling decisions: {}\n", decisions.len()));
    for (at, service, from, to, reason) in decisions.iter() {
        out.push_str(&format!(
            "  {:>5.1} s  {service}: {from} → {to}  ({reason})\n",
            at.as_secs_f64()
        ));
    }
    match (burst_at, first_scale_up) {
        (Some(b), Some(u)) if u >= b => out.push_str(&format!(
            "time to scale: {:.1} s from the start of the burst to the first scale-up of {ENTRY}\n",
            (u - b).as_secs_f64()
        )),
        _ => out.push_str(&format!(
            "time to scale: {ENTRY} did not scale up during the burst\n"
        )),
    }
    let alerts = events.alerts.lock().unwrap_or_else(|p| p.into_inner());
    out.push_str(&format!("alerts: {}\n", alerts.len()));
    out
}
