//! cogmesh-control: the cogmesh control plane and the pieces behind the `cogmesh` operator CLI.
//!
//! Today it holds [`workload`], the sample workload server that tests and benchmarks put behind the
//! sidecar; the control plane proper (registry, aggregator, autoscaler) joins it here.
#![forbid(unsafe_code)]

pub mod cli;
pub mod control;
pub mod inject;
pub mod local;
pub mod metrics;
pub mod scaling;
pub mod security;
pub mod top;
pub mod workload;
