//! A deterministic discrete-event simulator of one service behind cogmesh sidecars, for
//! comparing the balancer strategies on the proxy's own decision functions (see
//! `src/bin/balance_sim.rs`).

pub mod balancer;
pub mod engine;
pub mod rng;
pub mod table;
pub mod workload;
