//! Autoscaling: per-service policies, the decision engine that turns sidecar reports into
//! replica counts, the decision history, and the backends that apply decisions.

pub mod alerts;
pub mod config;
pub mod engine;
pub mod history;
pub mod keda;
pub mod kubernetes;
pub mod policy;
pub mod process;
pub mod scaler;

pub use config::ScalingConfig;
pub use engine::{decide, Decision, EngineState, Metric, Observation};
pub use policy::{PolicyError, ScalingPolicy};
pub use scaler::Scaler;
