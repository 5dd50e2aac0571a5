//! Alerts: per service and metric, a `warning` and a `critical` threshold, evaluated at every
//! scaling tick on the same observation the engine sees. A level is entered when the value
//! reaches its threshold and left only when the value falls below the threshold minus the
//! hysteresis band, so a value hovering at a threshold does not flap. Every change of level
//! (including back to `ok`) is an [`AlertEvent`]: logged, streamed by `MeshAdmin.WatchAlerts`,
//! and the active ones listed by `MeshAdmin.ListAlerts`.
//!
//! Defaults (configurable under `alerts:` in control.yaml): CPU 80 / 95 %, memory 85 / 95 %,
//! cognitive load 0.8 / 0.9, p99 latency 100 / 500 ms; hysteresis 5 % of the threshold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::engine::{Metric, Observation};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub warning: f64,
    pub critical: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Percent.
    pub cpu_utilization: Thresholds,
    /// Percent.
    pub memory_utilization: Thresholds,
    /// 0..1.
    pub cognitive_load: Thresholds,
    pub latency_p99_ms: Thresholds,
    /// A level clears once the value is this fraction below its threshold.
    pub hysteresis: f64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            cpu_utilization: Thresholds {
                warning: 80.0,
                critical: 95.0,
            },
            memory_utilization: Thresholds {
                warning: 85.0,
                critical: 95.0,
            },
            cognitive_load: Thresholds {
                warning: 0.8,
                critical: 0.9,
            },
            latency_p99_ms: Thresholds {
                warning: 100.0,
                critical: 500.0,
            },
            hysteresis: 0.05,
        }
    }
}

impl AlertsConfig {
    /// The first wrong field below `alerts`, and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, t) in self.rules() {
            if !(t.warning > 0.0 && t.warning.is_finite() && t.critical.is_finite()) {
                return Err((
                    format!("alerts.{name}.warning"),
                    "thresholds must be positive numbers".into(),
                ));
            }
            if t.critical < t.warning {
                return Err((
                    format!("alerts.{name}.critical"),
                    format!("{} is below the warning threshold ({})", t.critical, t.warning),
                ));
            }
        }
        if !(0.0..0.5).contains(&self.hysteresis) {
            return Err((
                "alerts.hysteresis".into(),
                format!("{} is not in [0, 0.5)", self.hysteresis),
            ));
        }
        Ok(())
    }

    fn rules(&self) -> [(&'static str, Thresholds); 4] {
        [
            ("cpu_utilization", self.cpu_utilization),
            ("memory_utilization", self.memory_utilization),
            ("cognitive_load", self.cognitive_load),
            ("latency_p99_ms", self.latency_p99_ms),
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// A change of an alert's level.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    pub service: String,
    pub metric: &'static str,
    pub level: Level,
    pub previous: Level,
    pub value: f64,
    /// The threshold of `level` (of `previous` when clearing to ok).
    pub threshold: f64,
    pub unix_ms: u64,
}

/// The alert levels of every (service, metric).
#[derive(Debug, Default)]
pub struct Alerts {
    levels: BTreeMap<(String, &'static str), (Level, AlertEvent)>,
}

/// The level `value` is at, given the current `level` (hysteresis on the way down).
fn next_level(t: Thresholds, hysteresis: f64, level: Level, value: f64) -> Level {
    let holds = |threshold: f64, at: Level| {
        value >= threshold || (level >= at && value >= threshold * (1.0 - hysteresis))
    };
    if holds(t.critical, Level::Critical) {
        Level::Critical
    } else if holds(t.warning, Level::Warning) {
        Level::Warning
    } else {
        Level::Ok
    }
}

impl Alerts {
    /// Evaluates `obs` of `service`; returns the level changes.
    pub fn evaluate(&mut self, config: &AlertsConfig, service: &str, obs: &Observation) -> Vec<AlertEvent> {
        let values = [
            (
                config.cpu_utilization,
                obs.value(Metric::Cpu).map(|v| v * 100.0),
                "cpu_utilization",
            ),
            (
                config.memory_utilization,
                obs.value(Metric::Memory).map(|v| v * 100.0),
                "memory_utilization",
            ),
            (config.cognitive_load, obs.cognitive_load, "cognitive_load"),
            (config.latency_p99_ms, obs.latency_p99_ms, "latency_p99_ms"),
        ];
        let mut events = Vec::new();
        for (t, value, metric) in values {
            // A metric nobody reports keeps its level until it is reported again.
            let Some(value) = value.filter(|v| v.is_finite()) else {
                continue;
            };
            let key = (service.to_string(), metric);
            let previous = self.levels.get(&key).map_or(Level::Ok, |(l, _)| *l);
            let level = next_level(t, config.hysteresis, previous, value);
            if level == previous {
                continue;
            }
            // The threshold crossed: of the higher of the two levels.
            let threshold = if level.max(previous) == Level::Critical {
                t.critical
            } else {
                t.warning
            };
            let event = AlertEvent {
                service: service.to_string(),
                metric,
                level,
                previous,
                value,
                threshold,
                unix_ms: obs.at_ms,
            };
            if level == Level::Ok {
                self.levels.remove(&key);
            } else {
                self.levels.insert(key, (level, event.clone()));
            }
            events.push(event);
        }
        events
    }

    /// The alerts not at `ok`, with the event that raised them to their level.
    pub fn active(&self) -> Vec<AlertEvent> {
        self.levels.values().map(|(_, e)| e.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(at_ms: u64, l: f64) -> Observation {
        Observation {
            at_ms,
            ready: 2,
            cognitive_load: Some(l),
            ..Default::default()
        }
    }

    #[test]
    fn levels_rise_at_thresholds_and_fall_below_the_hysteresis_band() {
        let c = AlertsConfig::default();
        let mut a = Alerts::default();
        let levels =
            |events: Vec<AlertEvent>| events.iter().map(|e| (e.level, e.threshold)).collect::<Vec<_>>();
        assert_eq!(levels(a.evaluate(&c, "r", &load(0, 0.5))), vec![]);
        assert_eq!(
            levels(a.evaluate(&c, "r", &load(1, 0.8))),
            vec![(Level::Warning, 0.8)]
        );
        // 0.77 is inside the band (0.8 × 0.95 = 0.76): still warning.
        assert_eq!(levels(a.evaluate(&c, "r", &load(2, 0.77))), vec![]);
        assert_eq!(
            levels(a.evaluate(&c, "r", &load(3, 0.95))),
            vec![(Level::Critical, 0.9)]
        );
        // 0.86 is inside the critical band (0.9 × 0.95 = 0.855): still critical.
        assert_eq!(levels(a.evaluate(&c, "r", &load(4, 0.86))), vec![]);
        assert_eq!(
            levels(a.evaluate(&c, "r", &load(5, 0.85))),
            vec![(Level::Warning, 0.9)]
        );
        assert_eq!(a.active().len(), 1);
        assert_eq!(
            levels(a.evaluate(&c, "r", &load(6, 0.75))),
            vec![(Level::Ok, 0.8)]
        );
        assert!(a.active().is_empty());
        // A value that is not reported changes nothing.
        let none = Observation {
            at_ms: 7,
            ..Default::default()
        };
        assert_eq!(levels(a.evaluate(&c, "r", &none)), vec![]);
    }

    /// deploy/prometheus/alerts.yaml pages on the same thresholds as these defaults.
    #[test]
    fn the_prometheus_rules_use_the_default_thresholds() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/alerts.yaml");
        let rules = std::fs::read_to_string(path).expect("deploy/prometheus/alerts.yaml");
        let d = AlertsConfig::default();
        for fragment in [
            format!("avg by (service) (endpoint_load) >= {}", d.cognitive_load.warning),
            format!(
                "avg by (service) (endpoint_load) >= {}",
                d.cognitive_load.critical
            ),
            format!("[2m]))) >= {}", d.latency_p99_ms.warning / 1000.0),
            format!("[2m]))) >= {}", d.latency_p99_ms.critical / 1000.0),
            format!(
                "{{resource=\"cpu\"}}) >= {:.2}",
                d.cpu_utilization.warning / 100.0
            ),
            format!(
                "{{resource=\"cpu\"}}) >= {:.2}",
                d.cpu_utilization.critical / 100.0
            ),
            format!(
                "{{resource=\"memory\"}}) >= {:.2}",
                d.memory_utilization.warning / 100.0
            ),
            format!(
                "{{resource=\"memory\"}}) >= {:.2}",
                d.memory_utilization.critical / 100.0
            ),
        ] {
            assert!(rules.contains(&fragment), "no rule with {fragment:?} in {path}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = AlertsConfig::default();
        c.cognitive_load.critical = 0.5;
        assert_eq!(c.validate().unwrap_err().0, "alerts.cognitive_load.critical");
        let c = AlertsConfig {
            hysteresis: 0.9,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "alerts.hysteresis");
        assert_eq!(AlertsConfig::default().validate(), Ok(()));
    }
}
