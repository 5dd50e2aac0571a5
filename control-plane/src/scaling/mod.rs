//! Autoscaling: per-service policies and the decision engine that turns sidecar reports into
//! replica counts.

pub mod engine;
pub mod policy;

pub use engine::{decide, Decision, EngineState, Metric, Observation};
pub use policy::{PolicyError, ScalingPolicy};
