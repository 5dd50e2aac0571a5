//! `control-bench`: N simulated sidecars against the cogmesh control plane — its CPU, memory, and
//! how long a load change takes to reach every client sidecar as a new weight — for N = 100, 1000 and
//! 10 000 (the control-plane issue's targets at 10 000: p99 under 250 ms, under one core, under
//! 500 MiB).
//!
//! ```text
//! cargo build --release -p cogmesh-control -p cogmesh-bench
//! target/release/control-bench            # N = 100, 1000, 10000: about 5 min
//! target/release/control-bench --quick    # N = 100, 1000: about 2 min
//! ```
//!
//! For each N, a fresh `target/release/cogmesh control --listen 127.0.0.1:<free port>
//! --weight-interval-ms 100` is started (a copy of the binary, so a concurrent rebuild does not
//! change it mid-run) and N sidecars connect to it from this process: one tokio runtime, real
//! `MeshControl.Connect` streams over loopback HTTP/2, 100 streams per connection (so N = 10 000
//! needs about 100 sockets on each side; the bench raises its soft `RLIMIT_NOFILE` to the hard
//! limit anyway, which the control plane inherits — with `--streams-per-conn 1`, give it
//! `ulimit -n` ≥ 2 N + 100). One sidecar in ten fronts an instance of `reasoning`, the others
//! front `gateway` instances that call it; all report every second, offsets spread over the
//! second, and ACK every table. After everyone joined, the bench waits 31 s for slow start to
//! pass, measures 10 s of steady reporting, then changes the load `reasoning-0` reports (0.3 ↔
//! 0.95, four times) and times the first table with its new weight at every client. Phases and
//! the exact definitions are in the `control_sim` module docs.
//!
//! Useful flags (`--help` for all): `--sizes 100,1000`, `--weight-interval-ms MS`,
//! `--probes K`, `--settle-secs S`, `--steady-secs S`, `--streams-per-conn S`, `--fanout K`
//! (clients report on K instances each, instead of full coverage), `--max-rss-mib M` (the
//! control plane is killed past it, default 8192), `--cogmesh-bin PATH`.
//!
//! Everything binds 127.0.0.1 only; every phase has a timeout; the control plane is stopped
//! (SIGTERM, then SIGKILL) after each N and on every error path, and gets `PR_SET_PDEATHSIG`, so
//! it dies with the bench even if the bench is killed. Exit code 1 if an N could not be measured;
//! missing a target is reported in the table, not in the exit code.

#[path = "../control_sim/mod.rs"]
mod control_sim;

fn main() {
    std::process::exit(control_sim::main());
}
