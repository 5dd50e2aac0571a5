//! Leader election among control-plane replicas through a `coordination.k8s.io/v1` Lease, the
//! way Kubernetes' own controllers elect theirs: every replica serves sidecars and the admin
//! API; only the holder of the Lease makes scaling decisions (see `Scaler::set_leader`).
//!
//! Every `retry_period_ms` a replica reads the Lease and takes one [`Step`]:
//! - no Lease: create it, holding it (a `409 Conflict` means another replica was first);
//! - held by us: renew (`renewTime` now);
//! - held by another replica whose `renewTime + leaseDurationSeconds` has passed, or by nobody
//!   (released): take it over (`acquireTime`, `renewTime` now, `leaseTransitions` + 1);
//! - else follow.
//!
//! Writes replace the object with the `resourceVersion` that was read, so two replicas racing
//! for an expired Lease cannot both win: the API server answers the loser `409 Conflict`. A
//! leader that cannot renew for a whole lease duration steps down before anyone can take over
//! — at worst the mesh has no leader for a moment, never two. On shutdown the leader releases
//! the Lease (empty holder), so a successor takes over at its next retry instead of waiting for
//! the expiry.
//!
//! [`next_step`] is the pure decision; [`run`] is the loop around the API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long a Lease stays valid without renewal (Kubernetes' controllers use 15 s).
pub const DEFAULT_LEASE_DURATION_S: u32 = 15;
/// How often a replica reads (and the leader renews) the Lease.
pub const DEFAULT_RETRY_PERIOD_MS: u64 = 2_000;
pub const DEFAULT_LEASE_NAME: &str = "cogmesh-control";

/// The `leader_election:` section of control.yaml.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LeaderElection {
    /// The namespace of the Lease (usually the control plane's own).
    pub namespace: String,
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// This replica's name in the Lease; default `$POD_NAME`, else `<host name>-<pid>`.
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default = "default_lease_duration_s")]
    pub lease_duration_s: u32,
    #[serde(default = "default_retry_period_ms")]
    pub retry_period_ms: u64,
    /// The API server's URL; default: the in-cluster service account, else the kubeconfig.
    #[serde(default)]
    pub api_server: Option<String>,
}

fn default_lease_name() -> String {
    DEFAULT_LEASE_NAME.into()
}
fn default_lease_duration_s() -> u32 {
    DEFAULT_LEASE_DURATION_S
}
fn default_retry_period_ms() -> u64 {
    DEFAULT_RETRY_PERIOD_MS
}

impl LeaderElection {
    /// Field path and reason of the first invalid setting.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.namespace.is_empty() {
            return Err(("namespace".into(), "must not be empty".into()));
        }
        if self.lease_name.is_empty() {
            return Err(("lease_name".into(), "must not be empty".into()));
        }
        if self.lease_duration_s == 0 {
            return Err(("lease_duration_s".into(), "must be at least 1".into()));
        }
        if self.retry_period_ms == 0 || self.retry_period_ms >= u64::from(self.lease_duration_s) * 1000 {
            return Err((
                "retry_period_ms".into(),
                format!(
                    "must be above 0 and below the lease duration ({} ms), got {}",
                    u64::from(self.lease_duration_s) * 1000,
                    self.retry_period_ms
                ),
            ));
        }
        Ok(())
    }

    /// The identity this replica writes into the Lease.
    pub fn identity(&self) -> String {
        if let Some(i) = &self.identity {
            return i.clone();
        }
        if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "cogmesh".into());
        format!("{host}-{}", std::process::id())
    }
}

/// What the Lease as read asks this replica to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    Renew,
    TakeOver,
    Follow { holder: String },
}

/// Decides from the Lease's spec (`None`: there is no Lease) at `now_ms` (Unix milliseconds).
pub fn next_step(spec: Option<&LeaseSpec>, me: &str, now_ms: i64) -> Step {
    let Some(spec) = spec else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::TakeOver;
    }
    let renewed_ms = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map_or(0, |t| t.0.as_millisecond());
    let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0)) * 1000;
    if now_ms >= renewed_ms + duration_ms {
        Step::TakeOver
    } else {
        Step::Follow {
            holder: holder.to_string(),
        }
    }
}

// === metrics ===

/// `leader` (1 while this replica holds the Lease) and `leader_transitions_total` (times this
/// replica became leader).
#[derive(Clone, Default)]
pub struct LeaderMetrics {
    pub leader: Gauge,
    pub transitions: Counter,
}

impl LeaderMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            self.leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this replica became the leader",
            self.transitions.clone(),
        );
    }
}

// === the loop ===

/// Whether this replica leads now; shared with whoever acts only as leader.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// A replica without election leads alone.
    pub fn sole() -> Self {
        Leadership(Arc::new(AtomicBool::new(true)))
    }

    pub fn follower() -> Self {
        Leadership(Arc::new(AtomicBool::new(false)))
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, leading: bool) {
        self.0.store(leading, Ordering::Release);
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Campaigns for the Lease until `stop` turns true, then releases it if held.
pub async fn run(
    config: LeaderElection,
    leadership: Leadership,
    on_change: impl Fn(bool) + Send,
    metrics: LeaderMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let client = match crate::control::kubernetes::api_client(config.api_server.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            warn!("leader election is off and this replica follows: no API client ({e})");
            return;
        }
    };
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let me = config.identity();
    let lease_duration = Duration::from_secs(u64::from(config.lease_duration_s));
    let retry = Duration::from_millis(config.retry_period_ms);
    info!(identity = %me, lease = %config.lease_name, namespace = %config.namespace, "campaigning for leadership");
    // When the leader last wrote the Lease successfully.
    let mut renewed_at: Option<tokio::time::Instant> = None;
    let set = |leading: bool| {
        if leadership.is_leader() != leading {
            leadership.set(leading);
            metrics.leader.set(i64::from(leading));
            if leading {
                metrics.transitions.inc();
                info!(identity = %me, "became the leader");
            } else {
                warn!(identity = %me, "no longer the leader");
            }
            on_change(leading);
        }
    };
    loop {
        match campaign(&api, &config, &me).await {
            Ok(true) => {
                renewed_at = Some(tokio::time::Instant::now());
                set(true);
            }
            Ok(false) => {
                renewed_at = None;
                set(false);
            }
            Err(e) => {
                warn!(lease = %config.lease_name, "leader election: {e}");
                // Step down before another replica may take over the expired Lease.
                if renewed_at.is_some_and(|t| t.elapsed() + retry >= lease_duration) {
                    renewed_at = None;
                    set(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.changed() => break,
        }
    }
    if leadership.is_leader() {
        release(&api, &config, &me).await;
        set(false);
    }
}

/// One round: read the Lease and act. `Ok(true)` when this replica holds it afterwards.
async fn campaign(api: &Api<Lease>, config: &LeaderElection, me: &str) -> Result<bool, kube::Error> {
    let current = api.get_opt(&config.lease_name).await?;
    let now_ms = Timestamp::now().as_millisecond();
    let step = next_step(current.as_ref().and_then(|l| l.spec.as_ref()), me, now_ms);
    let fresh = |transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(config.lease_duration_s as i32),
        acquire_time: Some(micro_now()),
        renew_time: Some(micro_now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let written = match (step, current) {
        (Step::Follow { .. }, _) => return Ok(false),
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(fresh(0)),
            };
            api.create(&PostParams::default(), &lease).await
        }
        (Step::Renew, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(micro_now());
            spec.lease_duration_seconds = Some(config.lease_duration_s as i32);
            api.replace(&config.lease_name, &PostParams::default(), &lease)
                .await
        }
        (Step::TakeOver, Some(mut lease)) => {
            let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
            lease.spec = Some(fresh(transitions + 1));
            api.replace(&config.lease_name, &PostParams::default(), &lease)
                .await
        }
        (_, None) => return Ok(false),
    };
    match written {
        Ok(_) => Ok(true),
        // Another replica wrote first: follow until the next round reads the new state.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up so a successor need not wait for it to expire.
async fn release(api: &Api<Lease>, config: &LeaderElection, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(&config.lease_name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(micro_now());
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(identity = %me, "released the leader Lease"),
        Err(e) => warn!("cannot release the leader Lease (it will expire): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_ms: i64, duration_s: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(Timestamp::from_millisecond(renewed_ms).unwrap())),
            lease_duration_seconds: Some(duration_s),
            ..Default::default()
        }
    }

    #[test]
    fn steps() {
        assert_eq!(next_step(None, "a", 0), Step::Create);
        let held_by_a = spec(Some("a"), 10_000, 15);
        assert_eq!(next_step(Some(&held_by_a), "a", 20_000), Step::Renew);
        assert_eq!(
            next_step(Some(&held_by_a), "b", 24_999),
            Step::Follow { holder: "a".into() }
        );
        assert_eq!(next_step(Some(&held_by_a), "b", 25_000), Step::TakeOver);
        assert_eq!(
            next_step(Some(&spec(None, 10_000, 15)), "b", 10_001),
            Step::TakeOver
        );
        assert_eq!(
            next_step(Some(&spec(Some(""), 10_000, 15)), "b", 10_001),
            Step::TakeOver
        );
    }

    #[test]
    fn checks() {
        let mut c: LeaderElection = serde_yaml_ng::from_str("namespace: cogmesh").unwrap();
        assert_eq!(c.lease_name, DEFAULT_LEASE_NAME);
        c.check().unwrap();
        c.retry_period_ms = 15_000;
        assert_eq!(c.check().unwrap_err().0, "retry_period_ms");
        c.identity = Some("replica-1".into());
        assert_eq!(c.identity(), "replica-1");
    }
}
