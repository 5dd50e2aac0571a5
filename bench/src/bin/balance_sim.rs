//! `balance-sim`: a deterministic discrete-event simulation comparing cogmesh's balancer
//! strategies (`cognitive`, `p2c_ewma`, `least_request`, `round_robin`, and `cognitive_w` where
//! the control plane would push weights) on the proxy's own decision functions.
//!
//! ```text
//! cargo run --release -p cogmesh-bench --bin balance-sim -- [--seed N] [--quick] [--sidecars N]
//!     [--scenarios a,b80,b100,c] [--strategies cognitive,round_robin]
//!     [--no-gateway-failure-handling] [--keep-load-in-flight]
//! ```
//!
//! Each backend has `capacity` slots and a FIFO queue, draws service times from the scenario's
//! distribution, and reports `load = (busy + queued) / capacity` (more than 1 while requests
//! queue) with each response.
//! Each sidecar (4 by default, each request goes to one at random) balances its share seeing
//! only what a real sidecar sees: its own in-flight requests per endpoint, the latencies of its
//! responses, the load reports they carry, and its own timeouts. The scenario's timeout is the
//! sidecar's response timeout (`response_timeout_ms`): when it passes the sidecar answers 504
//! and, as the proxy's forwarder does with a gateway failure, records an RTT sample of the time
//! waited and a load report of 1 for the endpoint, stamped at the end of the ejection time so
//! that it stays fresh for 10 s + 10 s (`observe_gateway_failure(waited, hold)`), and ejects it
//! for `GATEWAY_FAILURE_EJECTION_MS` (10 s) unless it is the last endpoint available to that
//! sidecar. The P2C strategies draw their pair again while it holds an ejected endpoint (up to
//! `PAIR_DRAWS` = 4 pairs), so they compare available endpoints only, and an ejected endpoint
//! loses any draw that still holds it to one that is not; when the strategy's
//! choice is ejected all the same (`EndpointSet::pick`), round robin advances its counter once
//! more and takes the first endpoint not ejected from that turn on (so the ejected endpoint's
//! turn is taken by the next one *instead of* that one's own turn), and the other strategies
//! take the first one not ejected from a uniformly random index (one more draw from the seeded
//! stream, made only then). Time is simulated and the random streams are seeded, so the same
//! seed prints the same numbers; every strategy gets exactly the same requests. A full run
//! simulates 60 s per scenario and strategy and takes well under a second.
//!
//! Scenarios:
//! - (a) 11 backends × 4 slots, one of them takes 2 s per request for the middle half of the
//!   run, 1 s response timeout (a timed-out request fails, frees the client and counts as a
//!   gateway failure; the backend still works on it), Poisson at 70 % of capacity;
//! - (b) capacities 4:8:16 slots (two backends each) with queues bounded at 4× the slots (a full
//!   backend answers 503 `Retry-After: 1`, which the sidecar takes as a back-off of
//!   `retry_after_penalty` (its latency estimate is at least what is left of it; no EWMA sample),
//!   as the proxy's forwarder does), Poisson at 80 % and 100 % of capacity; `cognitive_w` adds
//!   weights proportional to capacity, what the control plane's weights converge to at best;
//! - (c) on/off Markov-modulated Poisson bursts (130 % of capacity for ~1 s, 35 % for ~2 s) on
//!   8 equal backends, 0.5 % of the requests 100× as expensive as the rest.
//! - (r80, r100, ra) the shapes `balance-bench` runs for real, for one proxy (run them with
//!   `--sidecars 1`): 10 s of workloads with 2, 4 and 8 slots, queues of 64 and exponential
//!   20 ms service times at 80 % and 100 %; 20 s of eleven 4-slot workloads at 70 %, one at 2 s
//!   per request from 5 s to 15 s.
//!
//! In (a), `round_robin` used to collapse (about 50–57 % success): when an ejected endpoint's
//! turn went to the next endpoint in index order, that one got twice its share (140 % of its
//! capacity here), timed out in turn, was ejected and passed three shares on, and the ejections
//! cascaded through every backend. With the proxy's current fallback each remaining endpoint
//! keeps one share, and round robin loses only the requests it sends to the slow backend
//! before and between its ejections.
//!
//! `cognitive` (and `cognitive_w`) cost an endpoint as the proxy does: `max(EWMA, mean age of
//! the requests in flight, what is left of a back-off) × (in flight + 1) × load_factor(load) /
//! weight`, where `load_factor` is `1/(1 − load)` up to 7/8 and `8·e^(8·(load − 7/8))` past it,
//! and the load is the proxy's `cost::effective_load`: the fresh report (0 without one), or,
//! while the endpoint holds requests and has been silent for longer than `OVERDUE_ANSWERS`
//! (0.5) of the answers it should have given by Little's law (silence × in flight / stored
//! EWMA), that count of missed answers — so a stalled endpoint stops looking as idle as its last
//! report said within a fraction of its usual latency.
//!
//! Latency percentiles are over every request as the client saw it, a failed one (timed out or
//! rejected) counted as the timeout; `ok p99` is over the successful ones only; goodput is
//! successful responses per second of the run; `ejections` counts the endpoints the sidecars
//! ejected after a timeout (a renewal counts again); `→X %` columns are the share of picks that
//! went to the backends X (within the window shown).
//!
//! The default is the proxy's behaviour. `--no-gateway-failure-handling` (the proxy before it
//! handled timeouts: the balancer learned nothing from one) and `--keep-load-in-flight` are
//! what-ifs, not what the proxy does; the header line says when one is on. (The earlier
//! `--observe-timeouts` and `--timeout-is-full-load` what-ifs are gone: both are now part of the
//! proxy's behaviour, and so of the default.)

#[path = "../sim/mod.rs"]
mod sim;

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;

use sim::balancer::Strategy;
use sim::engine::{run, RunOptions};
use sim::rng::Rng;
use sim::table::{render, Row};
use sim::workload::scenarios;

#[derive(Parser, Debug)]
#[command(
    name = "balance-sim",
    about = "Deterministic simulation of cogmesh's balancer strategies"
)]
struct Args {
    /// Seed of the workload and of the balancers' draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// 20 s of simulated time per run instead of 60 s.
    #[arg(long)]
    quick: bool,
    /// Sidecars sharing the traffic, each with its own view of the endpoints.
    #[arg(long, default_value_t = 4)]
    sidecars: u32,
    /// Scenarios to run (a, b80, b100, c; r80, r100, ra: the shapes balance-bench runs, best
    /// with --sidecars 1).
    #[arg(long, value_delimiter = ',', default_value = "a,b80,b100,c")]
    scenarios: Vec<String>,
    /// Strategies to compare (cognitive_w runs only where the scenario has weights).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cognitive,cognitive_w,p2c_ewma,least_request,round_robin"
    )]
    strategies: Vec<String>,
    /// What-if (the proxy before its gateway-failure handling): a timeout teaches the balancer
    /// nothing (no RTT sample, no load report) and ejects nothing.
    #[arg(long)]
    no_gateway_failure_handling: bool,
    /// What-if: a load report does not go stale while requests are in flight on its endpoint
    /// (the proxy expires it after 10 s regardless).
    #[arg(long)]
    keep_load_in_flight: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.sidecars == 0 {
        bail!("--sidecars must be at least 1");
    }
    let mut strategies = Vec::new();
    for s in &args.strategies {
        match Strategy::parse(s) {
            Some(k) => strategies.push(k),
            None => bail!("unknown strategy {s:?}"),
        }
    }
    let duration_s = if args.quick { 20 } else { 60 };
    let all = scenarios(duration_s);
    for key in &args.scenarios {
        if !all.iter().any(|s| &s.key == key) {
            bail!("unknown scenario {key:?} (a, b80, b100, c, r80, r100, ra)");
        }
    }

    let started = Instant::now();
    let what_if: Vec<&str> = [
        (
            args.no_gateway_failure_handling,
            "timeouts neither observed nor ejected",
        ),
        (
            args.keep_load_in_flight,
            "load reports kept while requests are in flight",
        ),
    ]
    .iter()
    .filter_map(|&(on, what)| on.then_some(what))
    .collect();
    println!(
        "balance-sim: seed {}, {} s simulated per run, {} sidecar(s); {}",
        args.seed,
        duration_s,
        args.sidecars,
        if what_if.is_empty() {
            "the proxy's behaviour".to_string()
        } else {
            format!("WHAT-IF (not the proxy): {}", what_if.join(", "))
        }
    );
    for scenario in all.iter().filter(|s| args.scenarios.contains(&s.key)) {
        let requests = scenario.requests(args.sidecars, &mut Rng::new(args.seed));
        let opts = RunOptions {
            sidecars: args.sidecars,
            balancer_seed: args.seed ^ 0x5EED_BA1A_11CE,
            gateway_failure_handling: !args.no_gateway_failure_handling,
            keep_load_in_flight: args.keep_load_in_flight,
        };
        let rows: Vec<Row> = strategies
            .iter()
            .filter(|&&k| k != Strategy::CognitiveWeighted || scenario.weighted_variant)
            .map(|&k| Row::from_outcome(run(scenario, &requests, k, opts)))
            .collect();
        println!();
        println!("{}", scenario.title);
        println!(
            "  {}; {} requests",
            scenario.describe(args.sidecars),
            requests.len()
        );
        print!("{}", render(scenario, &rows));
    }
    println!();
    println!("(wall time {:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
