//! Endpoint weights from every sidecar's reports, in the spirit of gRPC's weighted round robin:
//! `weight = qps / (utilization + penalty × eps / qps)`, with the endpoint's cognitive load as
//! its utilization. The raw weight is then tamed so that one noisy report cannot swing traffic:
//!
//! 1. damped: a new target moves the weight only halfway (EWMA, `SMOOTHING`); once the next
//!    update confirms it (its target within `CONFIRM_TOLERANCE` of the last one), the weight
//!    goes to the mean of the two targets. Either way it moves at most a factor `MAX_STEP` per
//!    update. So a one-window outlier moves a weight halfway and back, while a real change
//!    lands in two updates (three for more than a ×4 change) instead of the ~7 an EWMA alone
//!    takes to come within rounding — every update that changes a weight is a table version
//!    fanned out to every sidecar;
//! 2. clamped to `[MIN_RATIO, MAX_RATIO]` × the mean weight of the service;
//! 3. slow start: a new endpoint ramps from `SLOW_START_FLOOR` × the mean to its computed weight
//!    over `SLOW_START_SECS`, instead of being blacked out or flooded;
//! 4. normalized so the service's mean weight is 1 (1 is neutral for the balancer).
//!
//! Everything here is a pure function of (previous state, observations, time).

use std::collections::BTreeMap;

/// Penalty for errors, as gRPC WRR's `error_utilization_penalty`.
pub const ERROR_PENALTY: f64 = 1.0;
/// Weight of a new observation in the EWMA.
pub const SMOOTHING: f64 = 0.5;
/// Two consecutive targets within this relative distance confirm each other (see step 1).
pub const CONFIRM_TOLERANCE: f64 = 0.1;
/// A weight changes by at most this factor per update.
pub const MAX_STEP: f64 = 2.0;
pub const MIN_RATIO: f64 = 0.1;
pub const MAX_RATIO: f64 = 10.0;
pub const SLOW_START_SECS: f64 = 30.0;
pub const SLOW_START_FLOOR: f64 = 0.1;
/// Utilization below this is treated as this, so an idle endpoint's weight stays finite.
pub const MIN_UTILIZATION: f64 = 0.01;

/// What the control plane knows of one endpoint at one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Requests per second served, summed over every reporting sidecar.
    pub qps: f64,
    /// Errors per second, summed.
    pub eps: f64,
    /// The endpoint's cognitive load in [0, 1] (its own report if it has one).
    pub utilization: f64,
}

/// The weight state of one endpoint between updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightState {
    pub weight: f64,
    /// Seconds (on the caller's clock) when the endpoint was first seen.
    pub first_seen_secs: f64,
    /// The target of the last update that had traffic to judge by.
    pub last_target: Option<f64>,
}

/// gRPC WRR's raw weight; `None` when there is no traffic to judge by.
pub fn raw_weight(o: &Observation) -> Option<f64> {
    if !(o.qps.is_finite() && o.qps > 0.0) {
        return None;
    }
    let utilization = o.utilization.clamp(MIN_UTILIZATION, 1.0);
    let penalty = if o.eps.is_finite() && o.eps > 0.0 {
        ERROR_PENALTY * o.eps / o.qps
    } else {
        0.0
    };
    Some(o.qps / (utilization + penalty))
}

/// One update of a service's weights at time `now_secs`. Endpoints missing from `observed` are
/// dropped; endpoints without traffic keep their previous weight (or start neutral).
pub fn update(
    previous: &BTreeMap<String, WeightState>,
    observed: &BTreeMap<String, Option<Observation>>,
    now_secs: f64,
) -> BTreeMap<String, WeightState> {
    // 1. Raw weights, in units relative to the mean raw weight of endpoints with traffic.
    let raws: BTreeMap<&String, f64> = observed
        .iter()
        .filter_map(|(k, o)| o.as_ref().and_then(raw_weight).map(|w| (k, w)))
        .collect();
    let raw_mean = mean(raws.values().copied()).unwrap_or(1.0);

    let mut next: BTreeMap<String, WeightState> = BTreeMap::new();
    for key in observed.keys() {
        let prior = previous.get(key).copied();
        let first_seen_secs = prior.map_or(now_secs, |p| p.first_seen_secs);
        let old = prior.map_or(1.0, |p| p.weight);
        let observed_target = raws.get(key).map(|r| r / raw_mean);
        let target = observed_target.unwrap_or(old);
        // 2. Damping: halfway to a new target, to a confirmed one; then bounded step.
        let confirmed = match (prior.and_then(|p| p.last_target), observed_target) {
            (Some(last), Some(t)) => (t - last).abs() <= CONFIRM_TOLERANCE * last,
            _ => false,
        };
        let proposed = match (confirmed, prior.and_then(|p| p.last_target)) {
            (true, Some(last)) => (target + last) / 2.0,
            _ => old + SMOOTHING * (target - old),
        };
        let stepped = proposed.clamp(old / MAX_STEP, old * MAX_STEP);
        next.insert(
            key.clone(),
            WeightState {
                weight: stepped,
                first_seen_secs,
                last_target: observed_target,
            },
        );
    }

    // 3. Clamp around the mean, 4. slow start, 5. normalize to mean 1.
    let Some(m) = mean(next.values().map(|s| s.weight)) else {
        return next;
    };
    for s in next.values_mut() {
        s.weight = s.weight.clamp(MIN_RATIO * m, MAX_RATIO * m);
        let age = (now_secs - s.first_seen_secs).max(0.0);
        if age < SLOW_START_SECS {
            let ramp = SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * age / SLOW_START_SECS;
            s.weight = s.weight.min(m * ramp.max(SLOW_START_FLOOR)).max(MIN_RATIO * m);
        }
    }
    // Renormalizing moves the mean, so clamp and normalize until both hold (a few rounds).
    for _ in 0..16 {
        let m = mean(next.values().map(|s| s.weight)).unwrap_or(1.0);
        if m <= 0.0 {
            break;
        }
        let mut clamped = false;
        for s in next.values_mut() {
            let w = (s.weight / m).clamp(MIN_RATIO, MAX_RATIO);
            clamped |= w != s.weight / m;
            s.weight = w;
        }
        if !clamped {
            break;
        }
    }
    next
}

/// Whether an update of `previous` without traffic to any of `addresses` (the service's
/// members, the same set as `previous`'s) would keep every weight: each is past slow start and
/// had no target last time, so it is neither damped towards anything nor ramped, and the
/// weights were normalized by the update that made them. (Renormalizing again would only move
/// them by rounding error.) The caller may then keep `previous` as it is.
pub fn at_rest<'a>(
    previous: &BTreeMap<String, WeightState>,
    mut addresses: impl Iterator<Item = &'a String>,
    now_secs: f64,
) -> bool {
    addresses.all(|a| {
        previous
            .get(a)
            .is_some_and(|s| s.last_target.is_none() && now_secs - s.first_seen_secs >= SLOW_START_SECS)
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(qps: f64, eps: f64, utilization: f64) -> Option<Observation> {
        Some(Observation {
            qps,
            eps,
            utilization,
        })
    }

    fn settled(weight: f64) -> WeightState {
        WeightState {
            weight,
            first_seen_secs: -1000.0,
            last_target: None,
        }
    }

    #[test]
    fn a_service_at_rest_keeps_its_weights() {
        let prev = BTreeMap::from([("a".to_string(), settled(0.5)), ("b".to_string(), settled(1.5))]);
        let names: Vec<String> = prev.keys().cloned().collect();
        let idle: BTreeMap<String, Option<Observation>> = names.iter().map(|n| (n.clone(), None)).collect();
        assert!(at_rest(&prev, names.iter(), 0.0));
        assert_eq!(update(&prev, &idle, 0.0), prev);
        // Not at rest: a member still in slow start, one with a target to confirm, a new one.
        let mut young = prev.clone();
        young.get_mut("a").unwrap().first_seen_secs = -10.0;
        assert!(!at_rest(&young, names.iter(), 0.0));
        assert_ne!(update(&young, &idle, 0.0), young);
        let mut pending = prev.clone();
        pending.get_mut("b").unwrap().last_target = Some(1.5);
        assert!(!at_rest(&pending, names.iter(), 0.0));
        assert_ne!(update(&pending, &idle, 0.0), pending);
        let more = ["a", "b", "c"].map(String::from);
        assert!(!at_rest(&prev, more.iter(), 0.0));
    }

    #[test]
    fn raw_weight_is_grpc_wrr() {
        assert_eq!(raw_weight(&obs(100.0, 0.0, 0.5).unwrap()), Some(200.0));
        // 10 errors/s at 100 qps: penalty 0.1.
        assert_eq!(raw_weight(&obs(100.0, 10.0, 0.4).unwrap()), Some(200.0));
        assert_eq!(raw_weight(&obs(0.0, 0.0, 0.5).unwrap()), None);
        // Idle utilization is floored.
        assert_eq!(raw_weight(&obs(1.0, 0.0, 0.0).unwrap()), Some(100.0));
    }

    #[test]
    fn one_update_exact_values() {
        // Two settled endpoints at weight 1; b is twice as efficient (same qps, half the load).
        let prev = BTreeMap::from([("a".to_string(), settled(1.0)), ("b".to_string(), settled(1.0))]);
        let seen = BTreeMap::from([
            ("a".to_string(), obs(100.0, 0.0, 0.8)),
            ("b".to_string(), obs(100.0, 0.0, 0.4)),
        ]);
        let next = update(&prev, &seen, 0.0);
        // raw 125 and 250, mean 187.5 → targets 2/3 and 4/3; EWMA halfway → 5/6 and 7/6;
        // mean is already 1.
        assert!((next["a"].weight - 5.0 / 6.0).abs() < 1e-12, "{next:?}");
        assert!((next["b"].weight - 7.0 / 6.0).abs() < 1e-12, "{next:?}");
    }

    #[test]
    fn a_confirmed_change_lands_in_two_updates_and_a_one_off_is_damped() {
        // 100 endpoints with equal traffic; "a" settled at 1 with the same target last time.
        let names: Vec<String> = (0..100).map(|i| format!("e{i:02}")).collect();
        let prev: BTreeMap<String, WeightState> = names
            .iter()
            .map(|n| {
                let mut s = settled(1.0);
                s.last_target = Some(1.0);
                (n.clone(), s)
            })
            .collect();
        let seen = |load_e00: f64| -> BTreeMap<String, Option<Observation>> {
            names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        obs(100.0, 0.0, if n == "e00" { load_e00 } else { 0.3 }),
                    )
                })
                .collect()
        };
        // e00's load goes 0.3 → 0.9: raw 111.1 vs 333.3 elsewhere, mean 331.1.
        let raw_mean = (111.0 + 1.0 / 9.0 + 99.0 * (1000.0 / 3.0)) / 100.0;
        let target = (1000.0 / 9.0) / raw_mean;
        let first = update(&prev, &seen(0.9), 0.0);
        // Not confirmed yet: halfway (before renormalizing to mean 1).
        let halfway = 1.0 + SMOOTHING * (target - 1.0);
        let rest = 1.0 + SMOOTHING * ((1000.0 / 3.0) / raw_mean - 1.0);
        let mean = (halfway + 99.0 * rest) / 100.0;
        assert!(
            (first["e00"].weight - halfway / mean).abs() < 1e-12,
            "{:?}",
            first["e00"]
        );
        // Confirmed by the next update: the mean of the two targets, bounded to ×½ of the last.
        let second = update(&first, &seen(0.9), 1.0);
        let bounded = (first["e00"].weight / MAX_STEP).max(target);
        let m2 = (bounded + 99.0 * (1000.0 / 3.0) / raw_mean) / 100.0;
        assert!(
            (second["e00"].weight - bounded / m2).abs() < 1e-12,
            "{:?}",
            second["e00"]
        );
        // Within 5 % of the target after two updates; the third does not move it further than that.
        assert!(
            (second["e00"].weight / target - 1.0).abs() < 0.05,
            "{:?}",
            second["e00"]
        );
        // A one-window outlier (the load back to 0.3 at once) is not confirmed: halfway back.
        let outlier = update(&prev, &seen(0.9), 0.0);
        let back = update(&outlier, &seen(0.3), 1.0);
        assert!(
            back["e00"].weight < 1.0 && back["e00"].weight > outlier["e00"].weight,
            "{back:?}"
        );
    }

    #[test]
    fn steps_are_bounded_and_weights_clamped() {
        let names = ["a", "b", "c", "d"];
        let prev: BTreeMap<String, WeightState> =
            names.iter().map(|n| (n.to_string(), settled(1.0))).collect();
        // b is 1000× better than the others: its EWMA target (4 × 1000/1003 ≈ 3.99) is more
        // than the ×2 a single update may move, so the step cap binds.
        let seen: BTreeMap<String, Option<Observation>> = names
            .iter()
            .map(|n| (n.to_string(), obs(if *n == "b" { 1000.0 } else { 1.0 }, 0.0, 1.0)))
            .collect();
        let next = update(&prev, &seen, 0.0);
        let a = 1.0 + SMOOTHING * (1.0 / 250.75 - 1.0);
        let ratio = next["b"].weight / next["a"].weight;
        assert!((ratio - MAX_STEP / a).abs() < 1e-9, "{next:?}");
        // Many updates later the ratio is capped by the clamp around the mean.
        let mut state = next;
        for _ in 0..50 {
            state = update(&state, &seen, 0.0);
        }
        let m = state.values().map(|s| s.weight).sum::<f64>() / 4.0;
        assert!((m - 1.0).abs() < 1e-9);
        for s in state.values() {
            assert!(
                s.weight >= MIN_RATIO * m - 1e-9 && s.weight <= MAX_RATIO * m + 1e-9,
                "{state:?}"
            );
        }
        assert!(state["b"].weight > 3.0, "{state:?}");
    }

    #[test]
    fn new_endpoints_start_slow_not_dark() {
        let prev = BTreeMap::from([("a".to_string(), settled(1.0))]);
        let seen = BTreeMap::from([("a".to_string(), obs(100.0, 0.0, 0.5)), ("new".to_string(), None)]);
        let next = update(&prev, &seen, 0.0);
        // At age 0 the newcomer gets the floor (0.1 × mean before normalizing), never 0.
        let ratio = next["new"].weight / next["a"].weight;
        assert!((ratio - SLOW_START_FLOOR).abs() < 1e-9, "{next:?}");
        // Halfway through slow start it is allowed 55 % of the mean.
        let later = update(&next, &seen, SLOW_START_SECS / 2.0);
        assert!(later["new"].weight > next["new"].weight);
        let after = update(&later, &seen, SLOW_START_SECS * 2.0);
        assert!(after["new"].weight > later["new"].weight);
    }

    #[test]
    fn endpoints_without_traffic_keep_their_weight() {
        let prev = BTreeMap::from([("a".to_string(), settled(1.5)), ("b".to_string(), settled(0.5))]);
        let seen = BTreeMap::from([("a".to_string(), None), ("b".to_string(), None)]);
        let next = update(&prev, &seen, 0.0);
        assert_eq!(next["a"].weight, 1.5);
        assert_eq!(next["b"].weight, 0.5);
    }
}
