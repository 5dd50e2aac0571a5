//! `obs-bench`: the cost of observability in cogmesh-proxy: throughput and added latency with
//! tracing off, at 1 % and 100 % sampling (OTLP/HTTP to a sink in the bench), and with
//! `/metrics` scraped every second.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench
//! target/release/obs-bench [--rounds 3] [--secs 3]
//! ```
//!
//! What it runs and how to read the table: see the `obs_bench` module.

#[path = "../obs_bench/mod.rs"]
mod obs_bench;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(obs_bench::main_with_args())
}
