//! `ScalingPolicy`: what a service's replica count should follow, as written in control.yaml
//! (`services[].scaling`) and set through `MeshAdmin`.
//!
//! Utilization targets and thresholds are percentages (`target_cpu_utilization: 70`), cognitive
//! load is a fraction (0..1) as the sidecars report it, durations are seconds.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingPolicy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Percent of a replica's CPU.
    pub target_cpu_utilization: Option<f64>,
    /// Percent of a replica's memory.
    pub target_memory_utilization: Option<f64>,
    /// Cognitive load per replica, 0..1.
    pub target_cognitive_load: Option<f64>,
    /// p99 latency the service should stay under.
    pub target_latency_ms: Option<f64>,
    /// Requests in flight per ready replica.
    pub target_in_flight_per_replica: Option<f64>,
    /// Scale up only while some utilization (cpu, memory, cognitive load × 100) is above this
    /// percentage, or a latency / in-flight target is exceeded. None: the targets alone decide.
    pub scale_up_threshold: Option<f64>,
    /// Scale down only while every utilization is below this percentage.
    pub scale_down_threshold: Option<f64>,
    /// Ratios of observed to target within 1 ± tolerance change nothing.
    pub tolerance: f64,
    /// Minimum seconds between two scale-ups.
    pub cooldown_up_s: f64,
    /// Minimum seconds after any scaling before a scale-down.
    pub cooldown_down_s: f64,
    /// A scale-up follows the lowest recommendation of this window (0: the latest).
    pub stabilization_up_s: f64,
    /// A scale-down follows the highest recommendation of this window.
    pub stabilization_down_s: f64,
    /// Most replicas added by one decision (lifted in panic mode).
    pub max_step_up: u32,
    /// Most replicas removed by one decision.
    pub max_step_down: u32,
    /// The window the scale-down recommendation averages over (Knative's stable window).
    pub stable_window_s: f64,
    /// The window the scale-up recommendation averages over (Knative's panic window).
    pub panic_window_s: f64,
    /// Panic when the panic-window demand is at least this multiple of the current capacity.
    pub panic_threshold: f64,
    /// How far ahead the trend term looks (about a replica's start-up time); 0 turns it off.
    pub trend_lookahead_s: f64,
    /// Bumped by every change through `MeshAdmin`; decisions carry it.
    pub version: u64,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        ScalingPolicy {
            min_replicas: 1,
            max_replicas: 10,
            target_cpu_utilization: Some(70.0),
            target_memory_utilization: None,
            target_cognitive_load: None,
            target_latency_ms: None,
            target_in_flight_per_replica: None,
            scale_up_threshold: None,
            scale_down_threshold: None,
            tolerance: 0.1,
            cooldown_up_s: 0.0,
            cooldown_down_s: 30.0,
            stabilization_up_s: 3.0,
            stabilization_down_s: 300.0,
            max_step_up: 4,
            max_step_down: 2,
            stable_window_s: 60.0,
            panic_window_s: 6.0,
            panic_threshold: 2.0,
            trend_lookahead_s: 10.0,
            version: 0,
        }
    }
}

/// A policy field that is out of range: the field and why.
#[derive(Debug, PartialEq)]
pub struct PolicyError {
    pub field: &'static str,
    pub reason: String,
}

impl ScalingPolicy {
    /// Every rule a policy must satisfy, checked in field order; the first broken one is
    /// returned.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let fail = |field: &'static str, reason: String| Err(PolicyError { field, reason });
        if self.min_replicas > self.max_replicas {
            return fail(
                "min_replicas",
                format!(
                    "{} is above max_replicas ({})",
                    self.min_replicas, self.max_replicas
                ),
            );
        }
        if self.max_replicas == 0 {
            return fail("max_replicas", "must be at least 1".into());
        }
        let percents = [
            ("target_cpu_utilization", self.target_cpu_utilization),
            ("target_memory_utilization", self.target_memory_utilization),
            ("scale_up_threshold", self.scale_up_threshold),
            ("scale_down_threshold", self.scale_down_threshold),
        ];
        for (field, value) in percents {
            if let Some(v) = value {
                if !(v > 0.0 && v <= 100.0) {
                    return fail(field, format!("{v} is not a percentage in (0, 100]"));
                }
            }
        }
        if let Some(v) = self.target_cognitive_load {
            if !(v > 0.0 && v <= 1.0) {
                return fail("target_cognitive_load", format!("{v} is not in (0, 1]"));
            }
        }
        for (field, value) in [
            ("target_latency_ms", self.target_latency_ms),
            ("target_in_flight_per_replica", self.target_in_flight_per_replica),
        ] {
            if let Some(v) = value {
                if !(v > 0.0 && v.is_finite()) {
                    return fail(field, format!("{v} must be a positive number"));
                }
            }
        }
        if self.metrics().next().is_none() {
            return fail(
                "target_cpu_utilization",
                "no target is set: give at least one target_* field".into(),
            );
        }
        if let (Some(up), Some(down)) = (self.scale_up_threshold, self.scale_down_threshold) {
            if down >= up {
                return fail(
                    "scale_down_threshold",
                    format!("{down} must be below scale_up_threshold ({up})"),
                );
            }
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return fail("tolerance", format!("{} is not in [0, 1)", self.tolerance));
        }
        for (field, v) in [
            ("cooldown_up_s", self.cooldown_up_s),
            ("cooldown_down_s", self.cooldown_down_s),
            ("stabilization_up_s", self.stabilization_up_s),
            ("stabilization_down_s", self.stabilization_down_s),
            ("trend_lookahead_s", self.trend_lookahead_s),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return fail(field, format!("{v} is not a duration in [0, 86400] seconds"));
            }
        }
        for (field, v) in [
            ("stable_window_s", self.stable_window_s),
            ("panic_window_s", self.panic_window_s),
        ] {
            if !(1.0..=3600.0).contains(&v) {
                return fail(field, format!("{v} is not a window in [1, 3600] seconds"));
            }
        }
        if self.panic_window_s > self.stable_window_s {
            return fail(
                "panic_window_s",
                format!(
                    "{} is longer than stable_window_s ({})",
                    self.panic_window_s, self.stable_window_s
                ),
            );
        }
        if self.panic_threshold.is_nan() || self.panic_threshold <= 1.0 {
            return fail(
                "panic_threshold",
                format!("{} must be above 1", self.panic_threshold),
            );
        }
        if self.max_step_up == 0 {
            return fail("max_step_up", "must be at least 1".into());
        }
        if self.max_step_down == 0 {
            return fail("max_step_down", "must be at least 1".into());
        }
        Ok(())
    }

    /// The metrics this policy scales on, with their targets in the units of
    /// [`super::engine::Observation`].
    pub fn metrics(&self) -> impl Iterator<Item = (super::engine::Metric, f64)> + '_ {
        use super::engine::Metric;
        [
            (Metric::Cpu, self.target_cpu_utilization.map(|p| p / 100.0)),
            (Metric::Memory, self.target_memory_utilization.map(|p| p / 100.0)),
            (Metric::CognitiveLoad, self.target_cognitive_load),
            (Metric::LatencyP99, self.target_latency_ms),
            (Metric::InFlight, self.target_in_flight_per_replica),
        ]
        .into_iter()
        .filter_map(|(m, t)| Some((m, t?)))
    }
}

impl ScalingPolicy {
    /// The policy as `MeshAdmin` shows it.
    pub fn to_proto(&self, service: &str) -> cogmesh_proto::v1::ScalingPolicy {
        cogmesh_proto::v1::ScalingPolicy {
            service: service.to_string(),
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_cpu_utilization: self.target_cpu_utilization,
            target_memory_utilization: self.target_memory_utilization,
            target_cognitive_load: self.target_cognitive_load,
            target_latency_ms: self.target_latency_ms,
            target_in_flight_per_replica: self.target_in_flight_per_replica,
            scale_up_threshold: self.scale_up_threshold,
            scale_down_threshold: self.scale_down_threshold,
            tolerance: self.tolerance,
            cooldown_up_s: self.cooldown_up_s,
            cooldown_down_s: self.cooldown_down_s,
            stabilization_up_s: self.stabilization_up_s,
            stabilization_down_s: self.stabilization_down_s,
            max_step_up: self.max_step_up,
            max_step_down: self.max_step_down,
            stable_window_s: self.stable_window_s,
            panic_window_s: self.panic_window_s,
            panic_threshold: self.panic_threshold,
            trend_lookahead_s: self.trend_lookahead_s,
            version: self.version,
        }
    }

    /// A policy sent through `MeshAdmin` (its version is the control plane's to set).
    pub fn from_proto(p: &cogmesh_proto::v1::ScalingPolicy) -> Self {
        ScalingPolicy {
            min_replicas: p.min_replicas,
            max_replicas: p.max_replicas,
            target_cpu_utilization: p.target_cpu_utilization,
            target_memory_utilization: p.target_memory_utilization,
            target_cognitive_load: p.target_cognitive_load,
            target_latency_ms: p.target_latency_ms,
            target_in_flight_per_replica: p.target_in_flight_per_replica,
            scale_up_threshold: p.scale_up_threshold,
            scale_down_threshold: p.scale_down_threshold,
            tolerance: p.tolerance,
            cooldown_up_s: p.cooldown_up_s,
            cooldown_down_s: p.cooldown_down_s,
            stabilization_up_s: p.stabilization_up_s,
            stabilization_down_s: p.stabilization_down_s,
            max_step_up: p.max_step_up,
            max_step_down: p.max_step_down,
            stable_window_s: p.stable_window_s,
            panic_window_s: p.panic_window_s,
            panic_threshold: p.panic_threshold,
            trend_lookahead_s: p.trend_lookahead_s,
            version: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_scale_on_cpu() {
        let p = ScalingPolicy::default();
        assert_eq!(p.validate(), Ok(()));
        let metrics: Vec<_> = p.metrics().collect();
        assert_eq!(metrics, vec![(super::super::engine::Metric::Cpu, 0.7)]);
    }

    #[test]
    fn the_admin_form_round_trips() {
        let p = ScalingPolicy {
            target_cognitive_load: Some(0.6),
            scale_up_threshold: Some(80.0),
            version: 3,
            ..Default::default()
        };
        let proto = p.to_proto("reasoning");
        assert_eq!(proto.service, "reasoning");
        assert_eq!(
            ScalingPolicy::from_proto(&proto),
            ScalingPolicy { version: 0, ..p }
        );
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let check = |p: ScalingPolicy, field: &str| {
            let e = p.validate().unwrap_err();
            assert_eq!(e.field, field, "{e:?}");
        };
        check(
            ScalingPolicy {
                min_replicas: 5,
                max_replicas: 3,
                ..Default::default()
            },
            "min_replicas",
        );
        check(
            ScalingPolicy {
                target_cpu_utilization: Some(170.0),
                ..Default::default()
            },
            "target_cpu_utilization",
        );
        check(
            ScalingPolicy {
                target_cognitive_load: Some(1.5),
                ..Default::default()
            },
            "target_cognitive_load",
        );
        check(
            ScalingPolicy {
                scale_up_threshold: Some(40.0),
                scale_down_threshold: Some(80.0),
                ..Default::default()
            },
            "scale_down_threshold",
        );
        check(
            ScalingPolicy {
                target_cpu_utilization: None,
                ..Default::default()
            },
            "target_cpu_utilization",
        );
        check(
            ScalingPolicy {
                panic_window_s: 120.0,
                ..Default::default()
            },
            "panic_window_s",
        );
        check(
            ScalingPolicy {
                tolerance: 1.0,
                ..Default::default()
            },
            "tolerance",
        );
    }
}
