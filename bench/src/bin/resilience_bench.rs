//! `resilience-bench`: rate-limit accuracy of cogmesh-proxy next to Envoy's local rate limit
//! filter, and priority admission under 2× overload.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-control -p cogmesh-bench
//! target/release/resilience-bench            # 10 s windows, about 1.5 minutes
//! target/release/resilience-bench --quick    # 3 s windows, about 30 s
//! ```
//!
//! What it runs and how to read the tables: see the `resilience_bench` module.

#[path = "../resilience_bench/mod.rs"]
mod resilience_bench;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(resilience_bench::main_with_args())
}
