//! `scaling-bench`: load traces (step ×5, ramp, diurnal sine, ±20 % noise, a 10 s spike)
//! replayed through cogmesh's scaling engine, the plain Kubernetes HPA rule and a KEDA-like
//! 30 s poll, all driving the same replica model; prints reaction time, over-provisioning,
//! time under capacity and direction reversals, with ratios to the HPA. Deterministic and
//! in-process (no load on the machine's network), so it runs in about a second.
//!
//! ```text
//! cargo run --release -p cogmesh-bench --bin scaling-bench -- [--secs 1800] [--seed 7]
//!     [--startup 10] [--capacity 50]
//! ```
//!
//! Targets (autoscaling issue): a decision within 5 s of a step, under-capacity time ≤ 0.5×
//! the HPA's, at most one reversal per 10 minutes under noise. The model and the autoscalers
//! are described in `cogmesh_bench::scaling_sim`.

use clap::Parser;
use cogmesh_bench::scaling_sim::{run, Model};

#[derive(Parser)]
#[command(about = "Autoscaling replay: cogmesh vs the HPA rule vs a KEDA-like poll")]
struct Args {
    /// Seconds per trace.
    #[arg(long, default_value_t = 1800)]
    secs: usize,
    /// Seed of the noise trace.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Seconds from a scale-up decision to ready replicas.
    #[arg(long, default_value_t = 10)]
    startup: u64,
    /// Requests per second one replica serves.
    #[arg(long, default_value_t = 50.0)]
    capacity: f64,
}

fn main() {
    let args = Args::parse();
    if args.secs < 600 || args.secs > 86_400 {
        eprintln!("scaling-bench: --secs must be within [600, 86400]");
        std::process::exit(2);
    }
    if !(args.capacity > 0.0 && args.capacity.is_finite()) || args.startup > 3600 {
        eprintln!("scaling-bench: --capacity must be positive and --startup at most 3600");
        std::process::exit(2);
    }
    let model = Model {
        capacity: args.capacity,
        startup: args.startup,
        ..Model::default()
    };
    print!("{}", run(&model, args.secs, args.seed));
}
