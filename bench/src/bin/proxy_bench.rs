//! `proxy-bench`: the side-by-side benchmark of cogmesh-proxy against direct connections, Envoy,
//! HAProxy and nginx. See the `cogmesh_bench` crate doc and bench/README.md for what it measures.
//!
//! ```text
//! bench/setup.sh && cargo build --release -p cogmesh-proxy -p cogmesh-bench \
//!     && target/release/proxy-bench [--quick]
//! ```

fn main() {
    std::process::exit(cogmesh_bench::main_with_args());
}
