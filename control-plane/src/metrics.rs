//! The autoscaler's Prometheus metrics, registered with the control plane's others (see
//! `control::metrics`, served on `admin_listen`). Names (counters get `_total`):
//! - `scaling_decisions_total{service,direction}`: decisions, `up` or `down`;
//! - `scaling_replicas{service}`: the replica count of the last decision;
//! - `alert_active{service,metric,level}`: 1 while an alert is at `warning` / `critical`;
//! - `alert_transitions_total{service,metric,level}`: changes of level, by the level entered.
//!
//! Label sets are bounded by the configured services and the fixed metric and level names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub service: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub service: String,
    pub metric: &'static str,
    pub level: &'static str,
}

/// The handles the scaler and the alerts write.
#[derive(Clone, Debug, Default)]
pub struct ScalingMetrics {
    pub decisions: Family<DecisionLabels, Counter>,
    pub replicas: Family<ServiceLabels, Gauge>,
    pub alert_active: Family<AlertLabels, Gauge>,
    pub alert_transitions: Family<AlertLabels, Counter>,
}

impl ScalingMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "scaling_decisions",
            "Scaling decisions by service and direction",
            self.decisions.clone(),
        );
        registry.register(
            "scaling_replicas",
            "Replica count of the last scaling decision",
            self.replicas.clone(),
        );
        registry.register(
            "alert_active",
            "1 while the alert is at the level",
            self.alert_active.clone(),
        );
        registry.register(
            "alert_transitions",
            "Changes of alert level, by the level entered",
            self.alert_transitions.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_in_the_exposition() {
        let m = ScalingMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.decisions
            .get_or_create(&DecisionLabels {
                service: "reasoning".into(),
                direction: "up",
            })
            .inc();
        m.replicas
            .get_or_create(&ServiceLabels {
                service: "reasoning".into(),
            })
            .set(3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"scaling_decisions_total{service="reasoning",direction="up"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"scaling_replicas{service="reasoning"} 3"#),
            "{text}"
        );
    }
}
