//! The autoscaling replay: load traces through three autoscalers driving the same replica
//! model, second by second, deterministic (seeded noise).
//!
//! Replica model (a fluid queue): each ready replica serves `capacity` requests/s; offered load
//! beyond the ready capacity waits in a backlog that is served first once capacity frees up.
//! New replicas become ready `startup` seconds after the decision; removed replicas go at once
//! (starting ones first). What the autoscalers observe, per second:
//! - CPU utilization of the ready replicas: `served / (ready × capacity)`, so it saturates at 1
//!   however large the backlog — what a CPU metric shows;
//! - requests in flight at the service's sidecars: `served × service_time + backlog`
//!   (Little's law plus the queue);
//! - requests per second offered and served — what cogmesh's sidecars count.
//!
//! Autoscalers:
//! - `cogmesh`: the control plane's engine (`cogmesh_control::scaling::decide`) every second on
//!   CPU (target 70 %) with the offered and served request rates its sidecars report (so a
//!   saturated CPU shows the demand behind it), default policy otherwise (3 s up / 300 s down stabilization, 6 s panic window at 2×, trend
//!   over 30 s looking 10 s ahead, max step 4 up / 2 down, 30 s down cooldown);
//! - `hpa`: the plain Kubernetes HPA rule on CPU every 15 s (sync period) over the last 15 s
//!   (metrics resolution), tolerance 0.1, scale-up limit max(+100 %, +4 pods) per sync, 300 s
//!   scale-down stabilization (highest recommendation of the window);
//! - `keda`: the same HPA rule fed an in-flight metric that is polled every 30 s (KEDA's default
//!   `pollingInterval`) — a scaler on the queue/concurrency signal, read late.
//!
//! Every run starts with 300 s of the trace's initial load (not counted), so windows are full.
//! Reported per trace and autoscaler:
//! - `react s`: seconds from the load change (step, spike) to the first scale-up decision;
//! - `over r·s`: replica-seconds above need, need = ceil(load / (capacity × 0.7));
//! - `under s`: seconds with ready capacity below the offered load;
//! - `backlog`: the largest backlog, requests;
//! - `rev`: direction reversals (an up after a down or a down after an up), and per 10 min.

use std::fmt::Write as _;

use cogmesh_control::scaling::{decide, EngineState, Observation, ScalingPolicy};

/// The replica model's constants.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    /// Requests per second one ready replica serves.
    pub capacity: f64,
    /// Seconds one request takes.
    pub service_time: f64,
    /// Seconds from a scale-up decision to the new replicas being ready.
    pub startup: u64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// CPU utilization the autoscalers aim at.
    pub target: f64,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            capacity: 50.0,
            service_time: 0.1,
            startup: 10,
            min_replicas: 1,
            max_replicas: 40,
            target: 0.7,
        }
    }
}

/// A load trace: offered requests/s for each second, and when its load change happens (for
/// the reaction time).
pub struct Trace {
    pub name: &'static str,
    pub load: Vec<f64>,
    pub change_at: Option<usize>,
}

/// A small deterministic generator (SplitMix64) for the noise trace.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The five traces, `secs` long each.
pub fn traces(secs: usize, seed: u64) -> Vec<Trace> {
    let s = secs as f64;
    // Change times fall off the 15 s / 30 s grids of the HPA and KEDA pollers (+7 s).
    let at = |f: f64| (s * f) as usize + 7;
    let step = (0..secs)
        .map(|t| {
            if (at(1.0 / 6.0)..at(2.0 / 3.0)).contains(&t) {
                500.0
            } else {
                100.0
            }
        })
        .collect();
    let ramp = (0..secs)
        .map(|t| {
            let t = t as f64;
            let (a, b, c, d) = (s / 6.0, s / 2.0, s * 2.0 / 3.0, s * 5.0 / 6.0);
            if t < a {
                100.0
            } else if t < b {
                100.0 + 600.0 * (t - a) / (b - a)
            } else if t < c {
                700.0
            } else if t < d {
                700.0 - 600.0 * (t - c) / (d - c)
            } else {
                100.0
            }
        })
        .collect();
    let diurnal = (0..secs)
        .map(|t| 300.0 - 200.0 * (2.0 * std::f64::consts::PI * t as f64 / s).cos())
        .collect();
    let mut rng = Rng(seed);
    let noise = (0..secs).map(|_| 300.0 * (0.8 + 0.4 * rng.next_f64())).collect();
    let spike = (0..secs)
        .map(|t| {
            if (at(1.0 / 3.0)..at(1.0 / 3.0) + 10).contains(&t) {
                800.0
            } else {
                100.0
            }
        })
        .collect();
    vec![
        Trace {
            name: "step ×5",
            load: step,
            change_at: Some(at(1.0 / 6.0)),
        },
        Trace {
            name: "ramp",
            load: ramp,
            change_at: None,
        },
        Trace {
            name: "diurnal sine",
            load: diurnal,
            change_at: None,
        },
        Trace {
            name: "±20 % noise",
            load: noise,
            change_at: None,
        },
        Trace {
            name: "spike 10 s",
            load: spike,
            change_at: Some(at(1.0 / 3.0)),
        },
    ]
}

/// What an autoscaler sees each second.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub t: u64,
    pub ready: u32,
    pub starting: u32,
    pub cpu: f64,
    pub in_flight: f64,
    pub offered: f64,
    pub served: f64,
}

/// An autoscaler under test: given what it sees this second, the replica count it wants
/// (None: no change).
pub trait Autoscaler {
    fn name(&self) -> &'static str;
    fn tick(&mut self, seen: &Seen) -> Option<u32>;
}

/// cogmesh's engine on CPU and in-flight per replica.
pub struct Cogmesh {
    policy: ScalingPolicy,
    state: EngineState,
}

impl Cogmesh {
    pub fn new(model: &Model) -> Self {
        let policy = ScalingPolicy {
            min_replicas: model.min_replicas,
            max_replicas: model.max_replicas,
            target_cpu_utilization: Some(model.target * 100.0),
            ..Default::default()
        };
        assert_eq!(policy.validate(), Ok(()), "the bench's policy is valid");
        Cogmesh {
            policy,
            state: EngineState::default(),
        }
    }
}

impl Autoscaler for Cogmesh {
    fn name(&self) -> &'static str {
        "cogmesh"
    }

    fn tick(&mut self, seen: &Seen) -> Option<u32> {
        let obs = Observation {
            at_ms: seen.t * 1000,
            ready: seen.ready,
            starting: seen.starting,
            cpu: Some(seen.cpu),
            in_flight: Some(seen.in_flight),
            offered_rps: Some(seen.offered),
            served_rps: Some(seen.served),
            ..Default::default()
        };
        decide(&self.policy, &mut self.state, &obs).map(|d| d.to)
    }
}

/// Which signal the HPA rule reads and how often it is refreshed.
#[derive(Clone, Copy)]
enum HpaSignal {
    /// CPU averaged over the last `sync` seconds.
    Cpu,
    /// In-flight per ready replica, as last polled.
    InFlightPolled { every: u64 },
}

/// The HPA rule: every 15 s, `ceil(ready × observed / target)` outside ±10 %, up-limit
/// max(2×, +4), 300 s down-stabilization.
pub struct Hpa {
    name: &'static str,
    signal: HpaSignal,
    target: f64,
    min: u32,
    max: u32,
    sync: u64,
    cpu_window: Vec<f64>,
    polled: Option<f64>,
    recommendations: Vec<(u64, u32)>,
}

impl Hpa {
    pub fn cpu(model: &Model) -> Self {
        Hpa::with("hpa", HpaSignal::Cpu, model.target, model)
    }

    pub fn keda(model: &Model) -> Self {
        let per_replica_target = model.target * model.capacity * model.service_time;
        Hpa::with(
            "keda",
            HpaSignal::InFlightPolled { every: 30 },
            per_replica_target,
            model,
        )
    }

    fn with(name: &'static str, signal: HpaSignal, target: f64, model: &Model) -> Self {
        Hpa {
            name,
            signal,
            target,
            min: model.min_replicas,
            max: model.max_replicas,
            sync: 15,
            cpu_window: Vec::new(),
            polled: None,
            recommendations: Vec::new(),
        }
    }
}

impl Autoscaler for Hpa {
    fn name(&self) -> &'static str {
        self.name
    }

    fn tick(&mut self, seen: &Seen) -> Option<u32> {
        self.cpu_window.push(seen.cpu);
        if self.cpu_window.len() > self.sync as usize {
            self.cpu_window.remove(0);
        }
        if let HpaSignal::InFlightPolled { every } = self.signal {
            if seen.t.is_multiple_of(every) {
                self.polled = Some(seen.in_flight / f64::from(seen.ready.max(1)));
            }
        }
        if !seen.t.is_multiple_of(self.sync) {
            return None;
        }
        let observed = match self.signal {
            HpaSignal::Cpu => self.cpu_window.iter().sum::<f64>() / self.cpu_window.len() as f64,
            HpaSignal::InFlightPolled { .. } => self.polled?,
        };
        let current = seen.ready + seen.starting;
        let ratio = observed / self.target;
        let desired = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (f64::from(seen.ready) * ratio).ceil() as u32
        }
        .clamp(self.min, self.max);
        self.recommendations.push((seen.t, desired));
        self.recommendations.retain(|r| r.0 + 300 >= seen.t);
        let to = if desired > current {
            desired.min((current * 2).max(current + 4))
        } else {
            // Down-stabilization: the highest recommendation of the last 300 s.
            self.recommendations.iter().map(|r| r.1).max().unwrap_or(desired)
        };
        (to != current).then_some(to)
    }
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub react_s: Option<u64>,
    pub over_replica_s: f64,
    pub under_s: u64,
    pub max_backlog: f64,
    pub reversals: u32,
    pub decisions: u32,
    pub replica_s: f64,
}

/// Replays `trace` through `scaler` on `model`.
pub fn replay(model: &Model, trace: &Trace, scaler: &mut dyn Autoscaler) -> Outcome {
    let warmup = 300u64;
    let initial = trace.load[0];
    let need = |load: f64| ((load / (model.capacity * model.target)).ceil() as u32).max(model.min_replicas);
    let mut ready = need(initial);
    // Replicas starting: the second each becomes ready.
    let mut starting: Vec<u64> = Vec::new();
    let mut backlog = 0.0;
    let mut out = Outcome::default();
    let mut last_direction = 0i8;
    for step in 0..warmup + trace.load.len() as u64 {
        let t = step;
        let counted = step >= warmup;
        let i = step.saturating_sub(warmup) as usize;
        let load = if counted { trace.load[i] } else { initial };
        // Replicas whose start-up ended.
        let before = starting.len();
        starting.retain(|&at| at > t);
        ready += (before - starting.len()) as u32;

        let capacity = f64::from(ready) * model.capacity;
        let served = capacity.min(load + backlog);
        backlog = (backlog + load - served).max(0.0);
        let seen = Seen {
            t,
            ready,
            starting: starting.len() as u32,
            cpu: if capacity > 0.0 { served / capacity } else { 1.0 },
            in_flight: served * model.service_time + backlog,
            offered: load,
            served,
        };
        if counted {
            let total = ready + starting.len() as u32;
            out.over_replica_s += f64::from(total.saturating_sub(need(load)));
            out.replica_s += f64::from(total);
            if capacity < load {
                out.under_s += 1;
            }
            out.max_backlog = out.max_backlog.max(backlog);
        }
        if let Some(to) = scaler.tick(&seen) {
            let to = to.clamp(model.min_replicas, model.max_replicas);
            let total = ready + starting.len() as u32;
            if to == total {
                continue;
            }
            let direction = if to > total { 1 } else { -1 };
            if counted {
                out.decisions += 1;
                if last_direction != 0 && direction != last_direction {
                    out.reversals += 1;
                }
                if direction > 0 && out.react_s.is_none() {
                    if let Some(change) = trace.change_at.filter(|c| i >= *c) {
                        out.react_s = Some((i - change) as u64);
                    }
                }
            }
            last_direction = direction;
            if to > total {
                starting.extend(std::iter::repeat_n(t + model.startup, (to - total) as usize));
            } else {
                let mut remove = total - to;
                while remove > 0 && starting.pop().is_some() {
                    remove -= 1;
                }
                ready -= remove.min(ready.saturating_sub(1));
            }
        }
    }
    out
}

/// Runs every trace through every autoscaler and renders the table.
pub fn run(model: &Model, secs: usize, seed: u64) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Autoscaling replay: {secs} s per trace (+300 s warm-up), capacity {} req/s per replica, \
         service time {} s, start-up {} s, target {} %, seed {seed}",
        model.capacity,
        model.service_time,
        model.startup,
        model.target * 100.0
    );
    let _ = writeln!(
        text,
        "{:<13} {:<8} {:>7} {:>9} {:>8} {:>8} {:>9} {:>4} {:>8}  {:>12} {:>12}",
        "trace",
        "scaler",
        "react s",
        "over r·s",
        "under s",
        "backlog",
        "replica·s",
        "rev",
        "rev/10m",
        "under ÷ hpa",
        "over ÷ hpa"
    );
    for trace in traces(secs, seed) {
        let scalers: Vec<Box<dyn Autoscaler>> = vec![
            Box::new(Cogmesh::new(model)),
            Box::new(Hpa::cpu(model)),
            Box::new(Hpa::keda(model)),
        ];
        let outcomes: Vec<(&'static str, Outcome)> = scalers
            .into_iter()
            .map(|mut s| (s.name(), replay(model, &trace, s.as_mut())))
            .collect();
        let hpa = outcomes
            .iter()
            .find(|o| o.0 == "hpa")
            .map(|o| o.1.clone())
            .unwrap_or_default();
        for (name, o) in &outcomes {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else if a == 0.0 {
                    "both 0".to_string()
                } else {
                    "hpa 0".to_string()
                }
            };
            let _ = writeln!(
                text,
                "{:<13} {:<8} {:>7} {:>9.0} {:>8} {:>8.0} {:>9.0} {:>4} {:>8.2}  {:>12} {:>12}",
                trace.name,
                name,
                o.react_s.map_or("-".to_string(), |r| r.to_string()),
                o.over_replica_s,
                o.under_s,
                o.max_backlog,
                o.replica_s,
                o.reversals,
                f64::from(o.reversals) * 600.0 / secs as f64,
                ratio(o.under_s as f64, hpa.under_s as f64),
                ratio(o.over_replica_s, hpa.over_replica_s),
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_model_queues_what_capacity_cannot_serve() {
        struct Fixed;
        impl Autoscaler for Fixed {
            fn name(&self) -> &'static str {
                "fixed"
            }
            fn tick(&mut self, _: &Seen) -> Option<u32> {
                None
            }
        }
        let model = Model::default();
        // 100 req/s needs ceil(100 / 35) = 3 replicas (150 req/s); 200 req/s for 10 s builds a
        // backlog of 50 per second, 500 in all, served at 0 extra capacity... then drained by
        // the 50 req/s headroom at 100 req/s in 10 s.
        let mut load = vec![100.0; 100];
        for l in load.iter_mut().skip(20).take(10) {
            *l = 200.0;
        }
        let trace = Trace {
            name: "t",
            load,
            change_at: Some(20),
        };
        let o = replay(&model, &trace, &mut Fixed);
        assert_eq!(o.max_backlog, 500.0);
        assert_eq!(o.under_s, 10);
        assert_eq!(o.decisions, 0);
        assert_eq!(o.replica_s, 300.0);
    }
}
