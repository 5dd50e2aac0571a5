//! One measured run: a fresh proxy of one strategy in front of the fleet, an open-loop warm-up,
//! then the measured open-loop run, with a sampler watching the workloads and the proxy
//! meanwhile, and (scenario a) the slow-down injected into one workload at a fixed time.
//!
//! Owns: the order of the steps, what is sampled (every `--sample-ms`: each workload's
//! `/admin/stats`, and for cogmesh the proxy's `/config` — the load report it holds per
//! endpoint, its RTT EWMA, in-flight count and ejection), and turning all that into a
//! [`Sample`]: the client's numbers from oha, per-endpoint traffic shares, queues and the
//! proxy's view, and CPU (the proxy's, and other processes' on the machine).

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cogmesh_bench::load::Oha;
use cogmesh_bench::peers::Proto;
use cogmesh_bench::procs;
use cogmesh_bench::report::median;
use cogmesh_proxy::balance::cost::cognitive_cost;
use serde::Serialize;
use serde_json::Value;

use super::fleet::{self, Fleet, Stats};
use super::proxies::{Binaries, Proxy, Variant};
use super::{Level, Scenario};

/// What the run needs besides the case itself.
pub struct Ctx<'a> {
    pub bins: &'a Binaries,
    pub oha: Oha<'a>,
    pub warmup: Duration,
    pub sample_every: Duration,
    pub dir: &'a Path,
}

/// One strategy, one offered load, one round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The level's key: `b80`, `b100`, `a70`.
    pub level: String,
    pub variant: Variant,
    pub round: usize,
    pub offered_rps: f64,
    /// Length of the measured run as oha reports it.
    pub secs: f64,
    /// Responses with status 200.
    pub ok: u64,
    /// Other statuses and errors (requests cut off by the end of the run excluded).
    pub failed: u64,
    pub failures: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// 200 responses per second of the run.
    pub goodput_rps: f64,
    /// CPU of the proxy's process per request, µs.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// CPU used during the run by processes that are neither the proxy, the workloads, oha
    /// nor the bench, in cores.
    pub foreign_cpu_cores: Option<f64>,
    pub endpoints: Vec<EndpointRun>,
    /// The scenario's endpoint groups (each endpoint alone, or slow vs the others).
    pub groups: Vec<EndpointRun>,
    /// Samples the sampler took (and how many of them had the proxy's view).
    pub ticks: usize,
    pub proxy_ticks: usize,
    pub error: Option<String>,
}

/// What happened at one endpoint (or a group of them) during a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointRun {
    pub name: String,
    pub slots: usize,
    /// Requests that reached the workload during the run.
    pub received: u64,
    /// Of them, refused because the queue was full (503).
    pub rejected: u64,
    /// Share of all requests received by the fleet during the run.
    pub share: f64,
    /// Share during the window of interest (scenario a: while the slow endpoint is slow).
    pub window_share: Option<f64>,
    /// Mean of (busy + queued) / slots in the window, as the workload counts it (the ORCA load
    /// it reports is the same ratio, at the moment of each response).
    pub demand: Option<f64>,
    /// Mean in the window of the load report the proxy held (0 while it held none, as the
    /// balancer reads it) — cogmesh only.
    pub orca_load: Option<f64>,
    /// Share of the window's samples in which the proxy held a fresh report.
    pub orca_fresh: Option<f64>,
    /// Mean RTT EWMA the proxy held, ms.
    pub rtt_ewma_ms: Option<f64>,
    /// Mean of the proxy's in-flight count.
    pub in_flight: Option<f64>,
    /// Share of the window's samples in which the endpoint was ejected.
    pub ejected: Option<f64>,
    /// Median over the window's samples of the cognitive cost the proxy's view gives, in ms:
    /// `rtt_ewma × (in_flight + 1) × load_factor(load)` (cogmesh's own [`cognitive_cost`],
    /// weight 1), whatever the strategy.
    pub cost_ms: Option<f64>,
}

impl Sample {
    fn new(level: &Level, variant: Variant, round: usize) -> Sample {
        Sample {
            level: level.key.clone(),
            variant,
            round,
            offered_rps: level.rate as f64,
            secs: 0.0,
            ok: 0,
            failed: 0,
            failures: String::new(),
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            p999_ms: f64::NAN,
            goodput_rps: 0.0,
            proxy_cpu_us_per_req: None,
            foreign_cpu_cores: None,
            endpoints: Vec::new(),
            groups: Vec::new(),
            ticks: 0,
            proxy_ticks: 0,
            error: None,
        }
    }

    pub fn success(&self) -> f64 {
        let total = self.ok + self.failed;
        if total == 0 {
            f64::NAN
        } else {
            self.ok as f64 / total as f64
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{:<5} round {} {:<20}",
            self.level,
            self.round + 1,
            self.variant.label()
        );
        if let Some(err) = &self.error {
            line.push_str(&format!(" FAILED: {}", err.lines().next().unwrap_or_default()));
            return line;
        }
        line.push_str(&format!(
            " {:.0}/{:.0} rps ok, {:.2} % success, p50 {:.1} p99 {:.1} p99.9 {:.1} ms",
            self.goodput_rps,
            self.offered_rps,
            self.success() * 100.0,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms
        ));
        let shares: Vec<String> = self
            .groups
            .iter()
            .map(|g| format!("{:.0}", g.share * 100.0))
            .collect();
        line.push_str(&format!(" | shares {} %", shares.join("/")));
        if !self.failures.is_empty() {
            line.push_str(&format!(" | {}", self.failures));
        }
        if let Some(foreign) = self
            .foreign_cpu_cores
            .filter(|f| *f > super::table::DISTURBED_CORES)
        {
            line.push_str(&format!(" | disturbed: others used {foreign:.2} cores"));
        }
        line
    }
}

/// Runs one case; a failure is recorded in the sample rather than returned.
pub fn run_case(
    ctx: &Ctx,
    fleet: &mut Fleet,
    scenario: &Scenario,
    level: &Level,
    variant: Variant,
    round: usize,
) -> Sample {
    let mut sample = Sample::new(level, variant, round);
    if let Err(err) = run_into(&mut sample, ctx, fleet, scenario, level, variant, round) {
        sample.error = Some(format!("{err:#}"));
    }
    sample
}

fn run_into(
    sample: &mut Sample,
    ctx: &Ctx,
    fleet: &mut Fleet,
    scenario: &Scenario,
    level: &Level,
    variant: Variant,
    round: usize,
) -> Result<()> {
    let case_dir = ctx
        .dir
        .join(format!("{}-r{}-{}", level.key, round + 1, variant.name()));
    let warmup_dir = case_dir.join("warmup");
    fs::create_dir_all(&warmup_dir)?;
    let slow_addr = scenario.slow.as_ref().map(|s| fleet.members[s.index].addr);
    if let Some(addr) = slow_addr {
        fleet::set_delay(addr, 0, None)?;
    }
    fleet.wait_idle(Duration::from_secs(15))?;

    let proxy = Proxy::start(variant, ctx.bins, &fleet.addrs(), scenario.timeout_ms, &case_dir)?;
    let url = proxy.url();
    if !ctx.warmup.is_zero() {
        ctx.oha
            .open_loop(&url, Proto::H1, level.rate, ctx.warmup, &warmup_dir)
            .context("warm-up run")?;
    }

    let before = fleet.stats()?;
    let proxy_cpu0 = proxy.server.usage().cpu_secs;
    let fleet_cpu0 = fleet.cpu_secs();
    let own_cpu0 = procs::own_cpu_secs();
    let (busy0, _) = procs::machine_cpu_secs();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(
        fleet.addrs(),
        variant.cogmesh_balancer().map(|_| proxy.admin),
        ctx.sample_every,
        start,
        Arc::clone(&stop),
    );
    let injector = match (&scenario.slow, slow_addr) {
        (Some(slow), Some(addr)) => {
            let (at, delay_ms, for_ms) = (slow.from, slow.delay_ms, slow.length.as_millis() as u64);
            let stop = Arc::clone(&stop);
            Some(thread::spawn(move || -> Result<()> {
                while start.elapsed() < at {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                fleet::set_delay(addr, delay_ms, Some(for_ms))
            }))
        }
        _ => None,
    };
    let result = ctx
        .oha
        .open_loop(&url, Proto::H1, level.rate, scenario.duration, &case_dir);
    stop.store(true, Ordering::Relaxed);
    let ticks = sampler.join().unwrap_or_default();
    let injected = injector.map(|handle| handle.join().unwrap_or_else(|_| Ok(())));
    let wall = start.elapsed().as_secs_f64();
    let after = fleet.stats()?;
    let proxy_cpu = proxy.server.usage().cpu_secs - proxy_cpu0;
    let fleet_cpu = fleet.cpu_secs() - fleet_cpu0;
    let own_cpu = procs::own_cpu_secs() - own_cpu0;
    let (busy1, _) = procs::machine_cpu_secs();
    drop(proxy);

    let latency = result?;
    if let Some(injected) = injected {
        injected.context("injecting the slow-down")?;
    }
    let report: Value = serde_json::from_str(
        fs::read_to_string(case_dir.join("oha.json"))
            .unwrap_or_default()
            .trim(),
    )
    .unwrap_or(Value::Null);
    sample.secs = report
        .pointer("/summary/total")
        .and_then(Value::as_f64)
        .unwrap_or(scenario.duration.as_secs_f64());
    sample.ok = latency.ok;
    sample.failed = latency.failed;
    sample.failures = latency.failures;
    sample.p50_ms = latency.p50_us / 1e3;
    sample.p99_ms = latency.p99_us / 1e3;
    sample.p999_ms = latency.p999_us / 1e3;
    sample.goodput_rps = latency.ok as f64 / sample.secs.max(1e-3);
    let requests = (latency.ok + latency.failed).max(1) as f64;
    sample.proxy_cpu_us_per_req = Some(proxy_cpu / requests * 1e6);
    if wall > 0.0 {
        sample.foreign_cpu_cores = Some(((busy1 - busy0) - proxy_cpu - fleet_cpu - own_cpu).max(0.0) / wall);
    }
    write_ticks(&case_dir.join("ticks.csv"), fleet, &ticks)?;
    let window = scenario.window();
    sample.endpoints = endpoint_runs(fleet, &before, &after, &ticks, window, scenario.slow.is_some());
    sample.groups = scenario
        .groups
        .iter()
        .map(|(name, members)| group(name, members, &sample.endpoints))
        .collect();
    sample.ticks = ticks.len();
    sample.proxy_ticks = ticks.iter().filter(|t| t.proxy.is_some()).count();
    Ok(())
}

/// The proxy's view of one endpoint, from its `/config`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProxyView {
    pub load: Option<f64>,
    pub rtt_ewma_ms: f64,
    pub in_flight: u64,
    pub ejected: bool,
}

/// One look at the workloads (by index; `None` where the call failed) and the proxy's endpoints.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    /// Seconds since the start of the measured run.
    pub t: f64,
    pub stats: Vec<Option<Stats>>,
    pub proxy: Option<HashMap<SocketAddr, ProxyView>>,
}

fn spawn_sampler(
    workloads: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    every: Duration,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Tick>> {
    thread::spawn(move || {
        let mut ticks = Vec::new();
        let mut next = start;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                thread::sleep((next - now).min(Duration::from_millis(10)));
                continue;
            }
            next += every;
            let t = start.elapsed().as_secs_f64();
            let stats = workloads.iter().map(|a| fleet::stats_of(*a).ok()).collect();
            let proxy = admin.and_then(|admin| {
                let (status, body) = procs::http1_get(admin, "/config", Duration::from_secs(1)).ok()?;
                (status == 200).then_some(())?;
                let json: Value = serde_json::from_slice(&body).ok()?;
                Some(proxy_views(&json))
            });
            ticks.push(Tick { t, stats, proxy });
        }
        ticks
    })
}

/// Every endpoint snapshot (`{"address", "load", "rtt_ewma_ms", "in_flight", "ejected"}`) found
/// anywhere in the proxy's `/config`, by address.
pub fn proxy_views(json: &Value) -> HashMap<SocketAddr, ProxyView> {
    let mut out = HashMap::new();
    let mut stack = vec![json];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                let address = map
                    .get("address")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let rtt = map.get("rtt_ewma_ms").and_then(Value::as_f64);
                if let (Some(address), Some(rtt)) = (address, rtt) {
                    out.insert(
                        address,
                        ProxyView {
                            load: map.get("load").and_then(Value::as_f64),
                            rtt_ewma_ms: rtt,
                            in_flight: map.get("in_flight").and_then(Value::as_u64).unwrap_or(0),
                            ejected: map.get("ejected").and_then(Value::as_bool).unwrap_or(false),
                        },
                    );
                } else {
                    stack.extend(map.values());
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    out
}

/// The sampler's observations as CSV (kept with `--keep-temp`), one row per tick and endpoint:
/// the workload's counters and queue, and the proxy's view of it where there is one.
fn write_ticks(path: &Path, fleet: &Fleet, ticks: &[Tick]) -> Result<()> {
    let mut csv = String::from(
        "t_s,endpoint,slots,received,completed,rejected,busy,queued,proxy_load,proxy_rtt_ewma_ms,\
         proxy_in_flight,proxy_ejected\n",
    );
    for tick in ticks {
        for (i, member) in fleet.members.iter().enumerate() {
            let stats = tick.stats.get(i).copied().flatten();
            let view = tick.proxy.as_ref().and_then(|p| p.get(&member.addr));
            let field = |v: Option<String>| v.unwrap_or_default();
            csv.push_str(&format!(
                "{:.3},{},{},{},{},{},{},{},{},{},{},{}\n",
                tick.t,
                member.name,
                member.slots,
                field(stats.map(|s| s.received.to_string())),
                field(stats.map(|s| s.completed.to_string())),
                field(stats.map(|s| s.rejected.to_string())),
                field(stats.map(|s| s.busy.to_string())),
                field(stats.map(|s| s.queued.to_string())),
                field(view.and_then(|v| v.load).map(|l| format!("{l:.3}"))),
                field(view.map(|v| format!("{:.2}", v.rtt_ewma_ms))),
                field(view.map(|v| v.in_flight.to_string())),
                field(view.map(|v| u8::from(v.ejected).to_string())),
            ));
        }
    }
    fs::write(path, csv).with_context(|| format!("write {}", path.display()))
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Per endpoint: counts over the whole run (from the stats before and after), and means over the
/// ticks inside `window` (seconds since the start).
pub fn endpoint_runs(
    fleet: &Fleet,
    before: &[Stats],
    after: &[Stats],
    ticks: &[Tick],
    window: (f64, f64),
    window_share: bool,
) -> Vec<EndpointRun> {
    let received: Vec<u64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.received.saturating_sub(b.received))
        .collect();
    let total = received.iter().sum::<u64>().max(1) as f64;
    let in_window: Vec<&Tick> = ticks
        .iter()
        .filter(|t| t.t >= window.0 && t.t <= window.1)
        .collect();
    // Requests received between the first and the last tick of the window.
    let window_received = |i: usize| -> Option<u64> {
        let first = in_window.iter().find_map(|t| t.stats.get(i).copied().flatten())?;
        let last = in_window
            .iter()
            .rev()
            .find_map(|t| t.stats.get(i).copied().flatten())?;
        Some(last.received.saturating_sub(first.received))
    };
    let window_total: u64 = (0..fleet.members.len()).filter_map(window_received).sum();
    fleet
        .members
        .iter()
        .enumerate()
        .map(|(i, member)| {
            let stats = || in_window.iter().filter_map(|t| t.stats.get(i).copied().flatten());
            let views = || {
                in_window
                    .iter()
                    .filter_map(|t| t.proxy.as_ref()?.get(&member.addr).copied())
            };
            let has_views = views().next().is_some();
            let view_mean =
                |f: &dyn Fn(&ProxyView) -> f64| has_views.then(|| mean(views().map(|v| f(&v)))).flatten();
            EndpointRun {
                name: member.name.clone(),
                slots: member.slots,
                received: received[i],
                rejected: after[i].rejected.saturating_sub(before[i].rejected),
                share: received[i] as f64 / total,
                window_share: window_share
                    .then(|| window_received(i).map(|r| r as f64 / window_total.max(1) as f64))
                    .flatten(),
                demand: mean(stats().map(|s| (s.busy + s.queued) as f64 / member.slots.max(1) as f64)),
                orca_load: view_mean(&|v| v.load.unwrap_or(0.0)),
                orca_fresh: view_mean(&|v| if v.load.is_some() { 1.0 } else { 0.0 }),
                rtt_ewma_ms: view_mean(&|v| v.rtt_ewma_ms),
                in_flight: view_mean(&|v| v.in_flight as f64),
                ejected: view_mean(&|v| if v.ejected { 1.0 } else { 0.0 }),
                // The median: past the knee the cost grows exponentially, and a mean would be
                // the one worst tick's.
                cost_ms: has_views
                    .then(|| {
                        median(
                            views()
                                .map(|v| {
                                    cognitive_cost(
                                        v.rtt_ewma_ms * 1e6,
                                        v.in_flight,
                                        v.load.unwrap_or(0.0),
                                        1.0,
                                    ) / 1e6
                                })
                                .collect(),
                        )
                    })
                    .flatten(),
            }
        })
        .collect()
}

/// Sums (counts, shares) and means (everything else) over the `members` of a group.
pub fn group(name: &str, members: &[usize], endpoints: &[EndpointRun]) -> EndpointRun {
    let picked: Vec<&EndpointRun> = members.iter().filter_map(|&i| endpoints.get(i)).collect();
    let avg = |f: &dyn Fn(&EndpointRun) -> Option<f64>| mean(picked.iter().filter_map(|e| f(e)));
    let sum_opt = |f: &dyn Fn(&EndpointRun) -> Option<f64>| {
        let values: Vec<f64> = picked.iter().filter_map(|e| f(e)).collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    EndpointRun {
        name: name.to_string(),
        slots: picked.iter().map(|e| e.slots).sum(),
        received: picked.iter().map(|e| e.received).sum(),
        rejected: picked.iter().map(|e| e.rejected).sum(),
        share: picked.iter().map(|e| e.share).sum(),
        window_share: sum_opt(&|e| e.window_share),
        demand: avg(&|e| e.demand),
        orca_load: avg(&|e| e.orca_load),
        orca_fresh: avg(&|e| e.orca_fresh),
        rtt_ewma_ms: avg(&|e| e.rtt_ewma_ms),
        in_flight: avg(&|e| e.in_flight),
        ejected: avg(&|e| e.ejected),
        cost_ms: avg(&|e| e.cost_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_views_are_found_by_address() {
        let json = serde_json::json!({
            "config": {"listeners": [{"address": "127.0.0.1:1"}]},
            "routing_table": {"services": [{"name": "upstream", "endpoints": [
                {"address": "127.0.0.1:11", "weight": 1.0, "in_flight": 3, "requests": 9,
                 "rtt_ewma_ms": 21.5, "load": 0.5, "ejected": false},
                {"address": "127.0.0.1:12", "weight": 1.0, "in_flight": 0, "requests": 2,
                 "rtt_ewma_ms": 30.0, "load": null, "ejected": true}
            ]}]}
        });
        let views = proxy_views(&json);
        assert_eq!(views.len(), 2);
        let a = views[&procs::loopback(11)];
        assert_eq!(
            (a.load, a.rtt_ewma_ms, a.in_flight, a.ejected),
            (Some(0.5), 21.5, 3, false)
        );
        let b = views[&procs::loopback(12)];
        assert_eq!((b.load, b.ejected), (None, true));
    }

    #[test]
    fn groups_sum_counts_and_average_the_rest() {
        let e = |name: &str, received, share, demand| EndpointRun {
            name: name.into(),
            slots: 4,
            received,
            share,
            demand: Some(demand),
            rtt_ewma_ms: None,
            ..Default::default()
        };
        let endpoints = [
            e("w0", 10, 0.1, 1.0),
            e("w1", 40, 0.4, 0.5),
            e("w2", 50, 0.5, 0.0),
        ];
        let g = group("others", &[1, 2], &endpoints);
        assert_eq!((g.slots, g.received), (8, 90));
        assert!((g.share - 0.9).abs() < 1e-12);
        assert_eq!(g.demand, Some(0.25));
        assert_eq!(g.rtt_ewma_ms, None);
        assert_eq!(g.window_share, None);
    }
}
