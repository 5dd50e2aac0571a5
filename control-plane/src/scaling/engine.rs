//! The scaling decision engine: pure — the policy, the engine's own state and one observation
//! in, at most one decision out. Time is the observation's `at_ms`, so tests drive it exactly.
//!
//! Every tick (about once a second per service):
//! 1. Demand, in replicas, per metric the policy targets: the HPA rule
//!    `ready × observed / target`; the service's demand is the largest. A metric without an
//!    observation is skipped, and then the tick may not scale down. CPU and cognitive load are
//!    first multiplied by offered ÷ served requests (see [`Observation::value`]), so a saturated
//!    service shows its real demand instead of 100 %.
//! 2. Scale-up follows the mean demand of the short (panic) window, or the trend when a linear
//!    fit over half the stable window is clear (R² ≥ 0.6) and predicts more demand
//!    `trend_lookahead_s` ahead; scale-down follows the mean of the stable window.
//! 3. Ratios within `1 ± tolerance` of the capacity hold. Capacity counts replicas still
//!    starting, so a scale-up is not repeated while its replicas boot.
//! 4. Panic (Knative): short-window demand ≥ `panic_threshold ×` capacity. While panicking
//!    (and a stable window after) the step limit is lifted and nothing scales down.
//! 5. Stabilization windows: up takes the lowest recommendation of its window, down the
//!    highest of its window (and waits until the engine has observed the service for that
//!    long). Cooldowns, thresholds and step limits gate the result.

use std::collections::VecDeque;
use std::fmt;

use super::policy::ScalingPolicy;

/// A signal a policy can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Mean CPU utilization of the ready replicas, 0..1.
    Cpu,
    /// Mean memory utilization, 0..1.
    Memory,
    /// Mean cognitive load, 0..1.
    CognitiveLoad,
    /// Service p99 latency, ms.
    LatencyP99,
    /// Requests in flight per ready replica.
    InFlight,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu_utilization",
            Metric::Memory => "memory_utilization",
            Metric::CognitiveLoad => "cognitive_load",
            Metric::LatencyP99 => "latency_p99_ms",
            Metric::InFlight => "in_flight_per_replica",
        }
    }

    /// Utilizations (0..1) are what `scale_up_threshold` / `scale_down_threshold` gate.
    fn is_utilization(self) -> bool {
        matches!(self, Metric::Cpu | Metric::Memory | Metric::CognitiveLoad)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the control plane knows about a service at one instant, aggregated from the reports of
/// its sidecars.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    pub at_ms: u64,
    /// Replicas serving traffic.
    pub ready: u32,
    /// Replicas started but not ready yet.
    pub starting: u32,
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub cognitive_load: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Requests in flight over all ready replicas.
    pub in_flight: Option<f64>,
    /// Requests per second arriving at the service's sidecars (including ones that wait).
    pub offered_rps: Option<f64>,
    /// Responses per second the replicas produce.
    pub served_rps: Option<f64>,
}

impl Observation {
    /// Offered ÷ served traffic, when both are known: above 1 while requests pile up.
    fn backlog_factor(&self) -> f64 {
        match (self.offered_rps, self.served_rps) {
            (Some(o), Some(s)) if s > 0.0 && o.is_finite() && s.is_finite() => (o / s).clamp(0.0, 100.0),
            _ => 1.0,
        }
    }

    /// The observed value of `metric`, in the units of its target. Work-driven utilizations
    /// (CPU, cognitive load) are scaled by offered ÷ served traffic: a saturated replica shows
    /// 100 % however much more work waits, and the sidecars see what waits.
    pub fn value(&self, metric: Metric) -> Option<f64> {
        let v = match metric {
            Metric::Cpu => self.cpu.map(|c| c * self.backlog_factor()),
            Metric::Memory => self.memory,
            Metric::CognitiveLoad => self.cognitive_load.map(|c| c * self.backlog_factor()),
            Metric::LatencyP99 => self.latency_p99_ms,
            Metric::InFlight => self.in_flight.map(|f| f / f64::from(self.ready.max(1))),
        }?;
        v.is_finite().then_some(v.max(0.0))
    }
}

/// A change of replica count and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    pub metric: Metric,
    pub observed: f64,
    pub target: f64,
    pub reason: String,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at_ms: u64,
    /// Replicas the demand needs.
    demand: f64,
}

/// What the engine remembers between ticks for one service.
#[derive(Clone, Debug, Default)]
pub struct EngineState {
    /// When the engine first saw the service: a scale-down needs a full window of history.
    first_ms: Option<u64>,
    samples: VecDeque<Sample>,
    recommendations: VecDeque<(u64, u32)>,
    panic_until_ms: Option<u64>,
    last_up_ms: Option<u64>,
    last_scale_ms: Option<u64>,
}

impl EngineState {
    /// Whether the service is in panic mode at `at_ms`.
    pub fn panicking(&self, at_ms: u64) -> bool {
        self.panic_until_ms.is_some_and(|u| at_ms < u)
    }
}

fn ms(secs: f64) -> u64 {
    (secs * 1000.0).round() as u64
}

fn mean_since(samples: &VecDeque<Sample>, from_ms: u64) -> Option<f64> {
    let (sum, n) = samples
        .iter()
        .filter(|s| s.at_ms >= from_ms)
        .fold((0.0, 0u32), |(sum, n), s| (sum + s.demand, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

/// Least-squares line through the samples since `from_ms`, evaluated `ahead_ms` after `now_ms`;
/// `None` unless there are at least 5 points and the fit explains ≥ 60 % of their variance.
fn trend_at(samples: &VecDeque<Sample>, from_ms: u64, now_ms: u64, ahead_ms: u64) -> Option<f64> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at_ms >= from_ms)
        .map(|s| ((s.at_ms as f64 - now_ms as f64) / 1000.0, s.demand))
        .collect();
    if points.len() < 5 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx <= 0.0 || syy <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let r2 = sxy * sxy / (sxx * syy);
    (slope > 0.0 && r2 >= 0.6).then(|| my + slope * (ahead_ms as f64 / 1000.0 - mx))
}

/// One tick of the engine for one service.
pub fn decide(policy: &ScalingPolicy, state: &mut EngineState, obs: &Observation) -> Option<Decision> {
    let now = obs.at_ms;
    let first_ms = *state.first_ms.get_or_insert(now);
    let total = obs.ready + obs.starting;
    let bounded = total.clamp(policy.min_replicas, policy.max_replicas);

    // Demand per metric; the largest drives.
    let mut driver: Option<(Metric, f64, f64, f64)> = None; // metric, observed, target, demand
    let mut missing = false;
    let mut utilization_max: Option<f64> = None;
    for (metric, target) in policy.metrics() {
        let Some(v) = obs.value(metric) else {
            missing = true;
            continue;
        };
        if metric.is_utilization() {
            utilization_max = Some(utilization_max.map_or(v, |u: f64| u.max(v)));
        }
        let demand = f64::from(obs.ready) * v / target;
        if driver.is_none_or(|d| demand > d.3) {
            driver = Some((metric, v, target, demand));
        }
    }
    let bounds_decision = |reason: String| {
        let (metric, observed, target) = driver.map_or((Metric::Cpu, 0.0, 0.0), |d| (d.0, d.1, d.2));
        Decision {
            from: total,
            to: bounded,
            metric,
            observed,
            target,
            reason,
        }
    };
    let Some((metric, observed, target, demand)) = driver.filter(|_| obs.ready > 0) else {
        // Nothing to measure: only the policy's bounds apply.
        return (bounded != total).then(|| {
            state.last_scale_ms = Some(now);
            bounds_decision(format!(
                "{total} replicas are outside the policy's {}..{}",
                policy.min_replicas, policy.max_replicas
            ))
        });
    };

    state.samples.push_back(Sample { at_ms: now, demand });
    let stable_from = now.saturating_sub(ms(policy.stable_window_s));
    while state.samples.front().is_some_and(|s| s.at_ms < stable_from) {
        state.samples.pop_front();
    }
    let panic_demand =
        mean_since(&state.samples, now.saturating_sub(ms(policy.panic_window_s))).unwrap_or(demand);
    let stable_demand = mean_since(&state.samples, stable_from).unwrap_or(demand);
    let trend = (policy.trend_lookahead_s > 0.0)
        .then(|| {
            trend_at(
                &state.samples,
                now.saturating_sub(ms(policy.stable_window_s / 2.0)),
                now,
                ms(policy.trend_lookahead_s),
            )
        })
        .flatten();
    let capacity = f64::from(total.max(1));
    if panic_demand >= policy.panic_threshold * capacity {
        state.panic_until_ms = Some(now + ms(policy.stable_window_s));
    }
    let panic = state.panicking(now);

    // The recommendation of this tick.
    let up_demand = trend.map_or(panic_demand, |t| t.max(panic_demand));
    let recommendation = if up_demand > capacity * (1.0 + policy.tolerance) {
        up_demand.ceil() as u32
    } else if stable_demand < capacity * (1.0 - policy.tolerance) {
        (stable_demand.ceil() as u32).max(1)
    } else {
        total
    }
    .clamp(policy.min_replicas, policy.max_replicas);
    state.recommendations.push_back((now, recommendation));
    let keep_from = now.saturating_sub(ms(policy.stabilization_up_s.max(policy.stabilization_down_s)));
    while state.recommendations.front().is_some_and(|r| r.0 < keep_from) {
        state.recommendations.pop_front();
    }
    let window = |secs: f64| {
        let from = now.saturating_sub(ms(secs));
        state
            .recommendations
            .iter()
            .filter(move |r| r.0 >= from)
            .map(|r| r.1)
    };

    if bounded != total {
        state.last_scale_ms = Some(now);
        return Some(bounds_decision(format!(
            "{total} replicas are outside the policy's {}..{}",
            policy.min_replicas, policy.max_replicas
        )));
    }

    let since = |t: Option<u64>| t.map_or(u64::MAX, |t| now.saturating_sub(t));
    let fmt_demand = |d: f64| format!("{d:.2}");
    if recommendation > total {
        let stabilized = window(policy.stabilization_up_s).min().unwrap_or(recommendation);
        if stabilized <= total {
            return None;
        }
        if !panic && since(state.last_up_ms) < ms(policy.cooldown_up_s) {
            return None;
        }
        let over_threshold = policy
            .scale_up_threshold
            .is_none_or(|p| !metric.is_utilization() || utilization_max.is_some_and(|u| u * 100.0 > p));
        if !panic && !over_threshold {
            return None;
        }
        let to = if panic {
            stabilized
        } else {
            stabilized.min(total.saturating_add(policy.max_step_up))
        };
        state.last_up_ms = Some(now);
        state.last_scale_ms = Some(now);
        let reason = if panic {
            format!(
                "panic: {metric} demand {} replicas is ≥ {}× the capacity of {total}",
                fmt_demand(panic_demand),
                policy.panic_threshold
            )
        } else if trend.is_some_and(|t| t > panic_demand) {
            format!(
                "{metric} rising: {} replicas needed in {} s",
                fmt_demand(up_demand),
                policy.trend_lookahead_s
            )
        } else {
            format!(
                "{metric} {observed:.3} above target {target:.3}: demand {} replicas",
                fmt_demand(up_demand)
            )
        };
        return Some(Decision {
            from: total,
            to,
            metric,
            observed,
            target,
            reason,
        });
    }
    if recommendation < total {
        // A scale-down needs a full stabilization window of observations, a complete set of
        // metrics, and no panic.
        if panic || missing || now.saturating_sub(first_ms) < ms(policy.stabilization_down_s) {
            return None;
        }
        let stabilized = window(policy.stabilization_down_s)
            .max()
            .unwrap_or(recommendation);
        if stabilized >= total || since(state.last_scale_ms) < ms(policy.cooldown_down_s) {
            return None;
        }
        let under_threshold = policy
            .scale_down_threshold
            .is_none_or(|p| utilization_max.is_none_or(|u| u * 100.0 < p));
        if !under_threshold {
            return None;
        }
        let to = stabilized.max(total.saturating_sub(policy.max_step_down));
        state.last_scale_ms = Some(now);
        return Some(Decision {
            from: total,
            to,
            metric,
            observed,
            target,
            reason: format!(
                "{metric} {observed:.3} below target {target:.3}: demand {} replicas over {} s",
                fmt_demand(stable_demand),
                policy.stabilization_down_s
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests;
