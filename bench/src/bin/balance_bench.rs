//! `balance-bench`: cogmesh's balancer strategies for real on loopback — `cognitive`,
//! `round_robin` and `p2c_ewma` in `cogmesh-proxy`, and Envoy's `LEAST_REQUEST` — in front of the
//! same `cogmesh workload` processes, in the scenarios of `balance-sim`: (b) capacities 1:2:4 at
//! 80 % and 100 % of capacity, and (a, shortened) one slow endpoint in eleven with a 1 s timeout.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-control -p cogmesh-bench
//! target/release/balance-bench            # about 7 minutes
//! target/release/balance-bench --quick    # about 2 minutes
//! ```
//!
//! What it runs, how it measures and how to read the tables: see the `balance_bench` module.

#[path = "../balance_bench/mod.rs"]
mod balance_bench;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(balance_bench::main_with_args())
}
