//! The autoscaler of a running control plane: every `interval_ms`, for each service with a
//! policy, an [`Observation`] from what the sidecars report, a decision from the engine, and —
//! when the count changes — a record in the history, a message to every watcher, and the
//! backend's action.
//!
//! What a service's observation holds: `ready` = its endpoints in the routing table;
//! `starting` = replicas the process backend started whose sidecar has not registered yet;
//! `cognitive_load` = the mean of the fresh loads its endpoints reported, 0 for an endpoint
//! without one (absent while the service has no endpoint); `offered_rps` = the requests per second all sidecars sent to it. Sidecars do not
//! report CPU, memory, latency or in-flight per service yet, so policies on those wait (and,
//! as the engine guarantees, never scale down) until they do.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use cogmesh_proto::v1::{Alert, ScalingDecision, ServiceStatus};
use tokio::sync::broadcast;
use tracing::info;

use super::alerts::{AlertEvent, Alerts, AlertsConfig, Level};
use super::config::{BackendKind, ScalingConfig};
use super::engine::{decide, EngineState, Observation};
use super::history::{History, Record};
use super::policy::ScalingPolicy;
use super::process::ProcessBackend;
use crate::metrics::{AlertLabels, DecisionLabels, ScalingMetrics, ServiceLabels};

/// A service's policy, engine state and last observation.
struct ServiceState {
    policy: ScalingPolicy,
    initial_replicas: Option<u32>,
    /// The replica count last decided (the kubernetes backend's replicas not ready yet are
    /// this minus the endpoints seen).
    desired: Option<u32>,
    engine: EngineState,
    last: Option<Observation>,
}

pub struct Scaler {
    services: Mutex<BTreeMap<String, ServiceState>>,
    history: History,
    decisions: broadcast::Sender<ScalingDecision>,
    process: Option<ProcessBackend>,
    /// The kubernetes backend's queue of (service, replicas) patches.
    kubernetes: Option<tokio::sync::mpsc::UnboundedSender<(String, u32)>>,
    kubernetes_queue: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<(String, u32)>>>,
    alerts_config: Mutex<AlertsConfig>,
    alerts: Mutex<Alerts>,
    alert_events: broadcast::Sender<Alert>,
    metrics: ScalingMetrics,
}

impl Scaler {
    pub fn new(
        config: &ScalingConfig,
        alerts: &AlertsConfig,
        control: SocketAddr,
        metrics: ScalingMetrics,
    ) -> Self {
        let (decisions, _) = broadcast::channel(256);
        let (alert_events, _) = broadcast::channel(256);
        let process =
            (config.backend == BackendKind::Process).then(|| ProcessBackend::new(control, &config.services));
        let (kubernetes, kubernetes_queue) = if config.backend == BackendKind::Kubernetes {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Scaler {
            services: Mutex::new(
                config
                    .services
                    .iter()
                    .map(|(name, s)| {
                        let state = ServiceState {
                            policy: s.policy.clone(),
                            initial_replicas: s.initial_replicas,
                            desired: None,
                            engine: EngineState::default(),
                            last: None,
                        };
                        (name.clone(), state)
                    })
                    .collect(),
            ),
            history: History::open(config.history_file.as_deref()),
            decisions,
            process,
            kubernetes,
            kubernetes_queue: Mutex::new(kubernetes_queue),
            alerts_config: Mutex::new(alerts.clone()),
            alerts: Mutex::new(Alerts::default()),
            alert_events,
            metrics,
        }
    }

    /// Applies reloaded policies; each service keeps its engine state (windows, cooldowns).
    pub fn set_policies(&self, config: &ScalingConfig) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for (name, s) in &config.services {
            if let Some(state) = services.get_mut(name) {
                let version = state.policy.version;
                if state.policy
                    != (ScalingPolicy {
                        version,
                        ..s.policy.clone()
                    })
                {
                    state.policy = ScalingPolicy {
                        version: version + 1,
                        ..s.policy.clone()
                    };
                    info!(service = %name, version = version + 1, "scaling policy reloaded");
                }
            }
        }
    }

    /// Starts the process backend's minimum replicas.
    pub fn start(&self) {
        let Some(process) = &self.process else {
            return;
        };
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for (name, state) in services.iter_mut() {
            let p = &state.policy;
            let initial = state.initial_replicas.unwrap_or(p.min_replicas);
            let initial = initial.clamp(p.min_replicas, p.max_replicas);
            state.desired = Some(initial);
            process.scale(name, initial);
        }
    }

    /// The kubernetes backend's patches to apply (once; see [`super::kubernetes::run`]).
    pub fn take_kubernetes_queue(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, u32)>> {
        self.kubernetes_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Applies reloaded alert thresholds.
    pub fn set_alerts(&self, config: &AlertsConfig) {
        *self.alerts_config.lock().unwrap_or_else(|p| p.into_inner()) = config.clone();
    }

    /// One round of decisions over `services` (the mesh's view) at `unix_ms`, and of alerts.
    /// Only the `leading` replica decides (see `control::leader`); every replica alerts.
    pub fn tick(&self, services: &[ServiceStatus], unix_ms: u64, leading: bool) {
        if leading {
            self.decide(services, unix_ms);
        }
        self.evaluate_alerts(services, unix_ms);
    }

    /// Alerts for every service with endpoints: the observation its policy's engine made this
    /// tick, or (without a policy) one from what its endpoints report.
    fn evaluate_alerts(&self, services: &[ServiceStatus], unix_ms: u64) {
        let config = self
            .alerts_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let observed: BTreeMap<String, Option<Observation>> = {
            let scaling = self.services.lock().unwrap_or_else(|p| p.into_inner());
            scaling.iter().map(|(n, s)| (n.clone(), s.last.clone())).collect()
        };
        let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        for status in services.iter().filter(|s| !s.endpoints.is_empty()) {
            let obs = observed
                .get(&status.name)
                .cloned()
                .flatten()
                .unwrap_or_else(|| observe(status, unix_ms));
            for event in alerts.evaluate(&config, &status.name, &obs) {
                match event.level {
                    Level::Ok => info!(
                        service = %event.service, metric = event.metric, value = event.value,
                        "alert cleared (was {})", event.previous.as_str()
                    ),
                    level => tracing::warn!(
                        service = %event.service, metric = event.metric, value = event.value,
                        threshold = event.threshold, "alert {}", level.as_str()
                    ),
                }
                let labels = |level: Level| AlertLabels {
                    service: event.service.clone(),
                    metric: event.metric,
                    level: level.as_str(),
                };
                if event.previous != Level::Ok {
                    self.metrics
                        .alert_active
                        .get_or_create(&labels(event.previous))
                        .set(0);
                }
                if event.level != Level::Ok {
                    self.metrics
                        .alert_active
                        .get_or_create(&labels(event.level))
                        .set(1);
                }
                self.metrics
                    .alert_transitions
                    .get_or_create(&labels(event.level))
                    .inc();
                let _ = self.alert_events.send(alert_proto(&event));
            }
        }
    }

    /// The alerts not at `ok`.
    pub fn active_alerts(&self) -> Vec<Alert> {
        let alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        alerts.active().iter().map(alert_proto).collect()
    }

    pub fn subscribe_alerts(&self) -> broadcast::Receiver<Alert> {
        self.alert_events.subscribe()
    }

    fn decide(&self, services: &[ServiceStatus], unix_ms: u64) {
        let mut scaling = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for (name, service) in scaling.iter_mut() {
            let empty = ServiceStatus {
                name: name.clone(),
                endpoints: Vec::new(),
                replicas: 0,
            };
            let status = services.iter().find(|s| &s.name == name).unwrap_or(&empty);
            let mut obs = observe(status, unix_ms);
            if let Some(p) = &self.process {
                // Only this backend's replicas count: endpoints from elsewhere stay as they are.
                let visible: HashSet<String> = status.endpoints.iter().map(|e| e.address.clone()).collect();
                obs.starting = p.starting(name, &visible);
                obs.ready = p.running(name).saturating_sub(obs.starting);
            } else if let Some(desired) = service.desired {
                // Pods the Deployment is still starting have not registered yet.
                obs.starting = desired.saturating_sub(obs.ready);
            }
            let decision = decide(&service.policy, &mut service.engine, &obs);
            service.last = Some(obs);
            let Some(d) = decision else {
                // A replica that exited (or never started) is replaced: the process backend
                // keeps the count last decided.
                if let (Some(p), Some(desired)) = (&self.process, service.desired) {
                    p.scale(name, desired);
                }
                continue;
            };
            info!(
                service = %name, from = d.from, to = d.to, metric = %d.metric,
                "scaling decision: {}", d.reason
            );
            let record = Record {
                service: name.clone(),
                from: d.from,
                to: d.to,
                metric: d.metric.name().to_string(),
                observed: d.observed,
                target: d.target,
                reason: d.reason,
                unix_ms,
                policy_version: service.policy.version,
            };
            let direction = if record.to > record.from { "up" } else { "down" };
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    service: name.clone(),
                    direction,
                })
                .inc();
            self.metrics
                .replicas
                .get_or_create(&ServiceLabels {
                    service: name.clone(),
                })
                .set(i64::from(record.to));
            let _ = self.decisions.send(to_proto(&record));
            self.history.append(record);
            service.desired = Some(d.to);
            if let Some(p) = &self.process {
                p.scale(name, d.to);
            }
            if let Some(k) = &self.kubernetes {
                let _ = k.send((name.clone(), d.to));
            }
        }
    }

    /// Every service's policy.
    pub fn policies(&self) -> Vec<(String, ScalingPolicy)> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services
            .iter()
            .map(|(n, s)| (n.clone(), s.policy.clone()))
            .collect()
    }

    /// Replaces a configured service's policy (validated first); returns it with its new
    /// version.
    pub fn set_policy(&self, service: &str, mut policy: ScalingPolicy) -> Result<ScalingPolicy, String> {
        policy
            .validate()
            .map_err(|e| format!("policy.{}: {}", e.field, e.reason))?;
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = services.get_mut(service) else {
            return Err(format!(
                "service {service:?} has no scaling section in the configuration"
            ));
        };
        policy.version = state.policy.version + 1;
        info!(
            service,
            version = policy.version,
            "scaling policy set through MeshAdmin"
        );
        state.policy = policy.clone();
        Ok(policy)
    }

    /// A service's policy and the last observation made for it, if it has a policy.
    pub fn view(&self, service: &str) -> Option<(ScalingPolicy, Option<Observation>)> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        services.get(service).map(|s| (s.policy.clone(), s.last.clone()))
    }

    pub fn history(&self, service: Option<&str>) -> Vec<ScalingDecision> {
        self.history.list(service).iter().map(to_proto).collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ScalingDecision> {
        self.decisions.subscribe()
    }

    /// Stops the replicas the process backend started.
    pub fn shutdown(&self) {
        if let Some(p) = &self.process {
            p.shutdown();
        }
    }
}

/// What a service's endpoints report: their number, their mean cognitive load (a registered
/// endpoint without a fresh report is idle — its sidecar reports every second, the app only
/// while it serves — so it counts as 0; absent without endpoints) and the requests per second
/// the sidecars sent to them.
fn observe(status: &ServiceStatus, unix_ms: u64) -> Observation {
    let n = status.endpoints.len();
    Observation {
        at_ms: unix_ms,
        ready: n as u32,
        cognitive_load: (n > 0)
            .then(|| status.endpoints.iter().map(|e| e.cognitive_load).sum::<f64>() / n as f64),
        offered_rps: Some(status.endpoints.iter().map(|e| e.qps).sum()),
        ..Default::default()
    }
}

fn alert_proto(e: &AlertEvent) -> Alert {
    Alert {
        service: e.service.clone(),
        metric: e.metric.to_string(),
        level: e.level.as_str().to_string(),
        previous_level: e.previous.as_str().to_string(),
        value: e.value,
        threshold: e.threshold,
        unix_ms: e.unix_ms,
    }
}

fn to_proto(r: &Record) -> ScalingDecision {
    ScalingDecision {
        service: r.service.clone(),
        from_replicas: r.from,
        to_replicas: r.to,
        metric: r.metric.clone(),
        observed: r.observed,
        target: r.target,
        reason: r.reason.clone(),
        unix_ms: r.unix_ms,
        policy_version: r.policy_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::config::ServiceScaling;

    #[test]
    fn policies_set_through_the_api_are_validated_and_versioned() {
        let config = ScalingConfig {
            services: [("reasoning".to_string(), ServiceScaling::default())].into(),
            ..Default::default()
        };
        let scaler = Scaler::new(
            &config,
            &AlertsConfig::default(),
            "127.0.0.1:7070".parse().unwrap(),
            ScalingMetrics::default(),
        );
        let wanted = ScalingPolicy {
            target_cognitive_load: Some(0.8),
            ..Default::default()
        };
        let set = scaler.set_policy("reasoning", wanted.clone()).unwrap();
        assert_eq!(set.version, 1);
        assert_eq!(scaler.policies(), vec![("reasoning".to_string(), set.clone())]);
        let bad = ScalingPolicy {
            min_replicas: 9,
            max_replicas: 3,
            ..Default::default()
        };
        assert_eq!(
            scaler.set_policy("reasoning", bad),
            Err("policy.min_replicas: 9 is above max_replicas (3)".to_string())
        );
        assert!(scaler
            .set_policy("unknown", wanted)
            .unwrap_err()
            .contains("\"unknown\""));
        // A reload with the file's (different) policy bumps the version again.
        scaler.set_policies(&config);
        assert_eq!(scaler.policies()[0].1.version, 2);
        assert_eq!(scaler.policies()[0].1.target_cognitive_load, None);
    }
}
