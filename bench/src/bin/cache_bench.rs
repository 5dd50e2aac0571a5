//! `cache-bench`: per-route response compression and caching, cogmesh-proxy against Envoy's
//! compressor and cache filters, with and without them, 1 KiB and 100 KiB JSON bodies.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench
//! target/release/cache-bench [--secs 3] [--connections 32]    # about 1 minute
//! ```
//!
//! What it runs and how to read the table: see the `cache_bench` module.

#[path = "../cache_bench/mod.rs"]
mod cache_bench;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(cache_bench::main_with_args())
}
