//! Micro-benchmark of one balancer decision: `EndpointSet::pick(None)` over 10, 100 and 1000
//! endpoints with non-uniform weights, for `cognitive` (the default) and, for comparison,
//! `p2c_ewma`, `least_request` and `round_robin`.
//!
//! ```text
//! cargo bench -p cogmesh-bench --bench pick -- --quick
//! ```
//!
//! The endpoints carry realistic statistics before the measurement starts — varied EWMA
//! latencies, fresh load reports on most of them, requests in flight on a third — so the cost
//! functions take their full path (mean in-flight age, load factor) rather than the idle one.
//! Target: well under 1 µs per pick at 1000 endpoints. `clock/Instant::now` measures one read of
//! the monotonic clock (`tokio::time::Instant::now` is `std`'s outside test builds), which the
//! cost functions pay per candidate.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cogmesh_proxy::balance::{EndpointSet, InFlight};
use cogmesh_proxy::config::BalancerKind;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const SIZES: [usize; 3] = [10, 100, 1000];
const STRATEGIES: [BalancerKind; 4] = [
    BalancerKind::Cognitive,
    BalancerKind::P2cEwma,
    BalancerKind::LeastRequest,
    BalancerKind::RoundRobin,
];

/// A set of `n` endpoints with weights 1 to 4 and some history; the returned guards keep the
/// in-flight requests open.
fn populated(n: usize, kind: BalancerKind) -> (EndpointSet, Vec<InFlight>) {
    let members: Vec<(SocketAddr, f64)> = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 8080));
            (addr, 1.0 + (i % 4) as f64)
        })
        .collect();
    let set = EndpointSet::rebuild(None, &members, kind, Duration::from_secs(10));
    let mut guards = Vec::new();
    for (i, e) in set.endpoints().iter().enumerate() {
        e.observe_rtt(Duration::from_micros(5_000 + (i as u64 * 7_919) % 45_000));
        if i % 5 != 0 {
            e.observe_load(((i * 37) % 100) as f64 / 100.0);
        }
        if i % 3 == 0 {
            guards.push(InFlight::start(Arc::clone(e)));
        }
    }
    (set, guards)
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for kind in STRATEGIES {
        for n in SIZES {
            let (set, _guards) = populated(n, kind);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &set, |b, set| {
                b.iter(|| black_box(set.pick(black_box(None))).map(|e| e.addr))
            });
        }
    }
    group.finish();
}

/// What one clock read costs here: the cost functions read the clock (load freshness, age of
/// the requests in flight) once or twice per candidate.
fn clock(c: &mut Criterion) {
    c.bench_function("clock/Instant::now", |b| b.iter(|| black_box(Instant::now())));
}

criterion_group!(benches, pick, clock);
criterion_main!(benches);
