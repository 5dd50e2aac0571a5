//! The control plane's view of the mesh, rebuilt from what sidecars tell it: who is connected,
//! which instance each one fronts, what they report, which table version each runs and what
//! each refused. Updated under one mutex by the (few, per-event) gRPC handlers; nothing here is
//! on a request path. The weights live in a [`WeightBook`] behind a second mutex, so that the
//! periodic weight update runs without the first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cogmesh_proto::v1::{
    EndpointStatus, Hello, LoadReport, Rejection, RoutingTable, ServiceEndpoints, ServiceStatus,
    SidecarStatus, WeightedEndpoint,
};

use super::weights::{self, Observation, WeightState};

/// One sidecar, connected or not.
#[derive(Debug)]
pub struct Sidecar {
    pub hello: Hello,
    pub connected: bool,
    /// Distinguishes a reconnection from the stream it replaced.
    pub session: u64,
    pub acked_version: u64,
    pub sent_version: u64,
    /// The newest version whose table for this sidecar is the one it was last sent (later
    /// versions changed only services it does not route to).
    pub same_as_sent: u64,
    pub rejected: Vec<Rejection>,
    /// The instance's own last report of its cognitive load.
    pub self_load: Option<f64>,
}

#[derive(Debug, Default)]
pub struct MeshState {
    pub sidecars: BTreeMap<String, Sidecar>,
    next_session: u64,
    /// The weights and what the last update saw, behind their own lock (see [`WeightBook`]).
    book: Arc<Mutex<WeightBook>>,
    /// service → addresses of its connected sidecars; rebuilt after a join or a leave only
    /// (copying 10 000 addresses every weight tick cost milliseconds under this lock).
    sidecar_members: Option<Arc<Members>>,
    pub version: u64,
    pub table: Arc<RoutingTable>,
    /// The services of `table` as the weight update made them: an update that leaves a
    /// service as it was returns the same `Arc`, so comparing with the table is a pointer
    /// check for it.
    published: Vec<Arc<ServiceEndpoints>>,
    /// Services known from configuration (static discovery).
    pub statics: Vec<super::config::StaticService>,
    /// Endpoints from Kubernetes EndpointSlices, by slice name.
    pub discovered: BTreeMap<String, super::kubernetes::SliceEndpoints>,
    /// Set when a sidecar says Hello with a table from before this process started.
    pub existing_mesh: bool,
    /// Per-endpoint sums of the reports since the last weight update.
    window: HashMap<String, Accumulated>,
    window_reports: u64,
    window_reporters: std::collections::HashSet<String>,
}

/// What weight updates carry from one to the next, and what the last one saw (for
/// ListServices). Behind its own lock: an update takes its [`WeightInputs`] under the state
/// lock and runs here without it, so reports, ACKs and pushes are not held up by it (at 10 000
/// sidecars an update takes milliseconds).
#[derive(Debug, Default)]
pub struct WeightBook {
    /// service → endpoint address → weight state.
    weights: BTreeMap<String, BTreeMap<String, WeightState>>,
    /// endpoint address → (qps, load) of the last update, for ListServices.
    last_observed: HashMap<String, Observation>,
    /// endpoint address → its [`Traffic`] of the last update, for ListServices.
    last_traffic: HashMap<String, Traffic>,
    /// service → what the last update returned for it (weights rounded as published), given
    /// back as is while the service is at rest instead of copying every address again.
    published: HashMap<String, Arc<ServiceEndpoints>>,
    /// service → the membership (sidecars, listed endpoints) it was at rest with at the last
    /// update. With the same members and still no traffic it is at rest now too (its weights
    /// were kept and time only moved on), so `weights::at_rest` — a lookup per endpoint, 9 000
    /// for the instances of a service nobody calls — is not run again.
    rested: HashMap<String, (Arc<Members>, Vec<String>)>,
}

/// service → endpoint addresses.
type Members = BTreeMap<String, Vec<String>>;

/// What one weight update reads (see [`MeshState::weight_inputs`]).
#[derive(Debug)]
pub struct WeightInputs {
    /// Configured and discovered endpoints.
    listed: Members,
    /// Connected sidecars' instances.
    sidecars: Arc<Members>,
    /// The window's per-endpoint sums.
    window: HashMap<String, Accumulated>,
    /// Mean reports per reporter in the window.
    per_reporter: f64,
    /// instance address → its own last report of its load.
    self_load: HashMap<String, f64>,
}

/// A poisoned lock keeps its data: a panic while holding it would be a bug, and the data is
/// still the last consistent state.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl WeightBook ===

impl WeightBook {
    /// One weight update from `inputs`: new weights for every service, rounded as published.
    /// A service at rest comes back as the same `Arc` as from the last update.
    pub fn update(&mut self, inputs: WeightInputs, now_secs: f64) -> Vec<Arc<ServiceEndpoints>> {
        let WeightInputs {
            listed,
            sidecars,
            window,
            per_reporter,
            self_load,
        } = inputs;
        self.last_traffic = window
            .iter()
            .map(|(a, w)| {
                let mut t = w.traffic;
                // Sums over several reports of one sidecar in the window count it once.
                t.in_flight = (t.in_flight as f64 / per_reporter).round() as u64;
                t.ejected_by = (f64::from(t.ejected_by) / per_reporter).round() as u32;
                (a.clone(), t)
            })
            .collect();
        let mut weights = BTreeMap::new();
        let mut published = HashMap::new();
        let mut rested = HashMap::new();
        let mut services = Vec::new();
        let names: std::collections::BTreeSet<&String> = listed.keys().chain(sidecars.keys()).collect();
        for service in names {
            let addrs = || {
                let listed = listed.get(service).into_iter().flatten();
                listed.chain(sidecars.get(service).into_iter().flatten())
            };
            let traffic = |a: &str| window.get(a).is_some_and(|w| w.qps > 0.0);
            let previous = self.weights.remove(service);
            let listed_here = listed.get(service).map_or(&[][..], Vec::as_slice);
            let rested_before = self
                .rested
                .get(service)
                .is_some_and(|(m, l)| Arc::ptr_eq(m, &sidecars) && l.as_slice() == listed_here);
            let resting = previous.as_ref().is_some_and(|p| {
                !addrs().any(|a| traffic(a))
                    && (rested_before
                        || (addrs().count() == p.len() && weights::at_rest(p, addrs(), now_secs)))
            });
            if resting {
                rested.insert(service.clone(), (Arc::clone(&sidecars), listed_here.to_vec()));
            }
            let observed: BTreeMap<String, Option<Observation>> = addrs()
                .filter_map(|a| {
                    let w = window.get(a);
                    let q = w.map_or(0.0, |w| w.qps / per_reporter);
                    let utilization = self_load.get(a).copied().or_else(|| {
                        w.filter(|w| w.load_n > 0)
                            .map(|w| w.load_sum / f64::from(w.load_n))
                    });
                    let o = (q > 0.0).then(|| Observation {
                        qps: q,
                        eps: w.map_or(0.0, |w| w.eps / per_reporter),
                        utilization: utilization.unwrap_or(0.0),
                    });
                    // What `ListServices` shows (and the autoscaler reads): an endpoint nobody
                    // sent requests to this interval is idle now, not as busy as it last was.
                    let shown = o.unwrap_or(Observation {
                        qps: 0.0,
                        eps: 0.0,
                        utilization: utilization.unwrap_or(0.0),
                    });
                    match self.last_observed.get_mut(a) {
                        Some(last) => *last = shown,
                        None => {
                            self.last_observed.insert(a.clone(), shown);
                        }
                    }
                    // Only what the update reads: nothing when the service is at rest.
                    (!resting).then(|| (a.clone(), o))
                })
                .collect();
            let last = self.published.remove(service);
            let (next, out) = match (previous, last) {
                // Every endpoint known, settled and without traffic: the update would keep
                // every weight (see `weights::at_rest`), so skip its cost (at 10 000 sidecars,
                // the 9 000 instances of services nobody calls), and that of copying them out.
                (Some(p), last) if resting => {
                    let out = last.unwrap_or_else(|| Arc::new(rounded(service, &p)));
                    (p, out)
                }
                (previous, _) => {
                    let next = weights::update(&previous.unwrap_or_default(), &observed, now_secs);
                    let out = Arc::new(rounded(service, &next));
                    (next, out)
                }
            };
            weights.insert(service.clone(), next);
            published.insert(service.clone(), Arc::clone(&out));
            services.push(out);
        }
        self.weights = weights;
        self.published = published;
        self.rested = rested;
        services
    }
}

/// A service's weights as the routing table carries them (rounded to hundredths).
fn rounded(name: &str, weights: &BTreeMap<String, WeightState>) -> ServiceEndpoints {
    ServiceEndpoints {
        name: name.to_string(),
        endpoints: weights
            .iter()
            .map(|(address, w)| WeightedEndpoint {
                address: address.clone(),
                weight: (w.weight * 100.0).round() / 100.0,
            })
            .collect(),
    }
}

/// Sums over the reports of one weight-update window, for one endpoint.
#[derive(Debug, Default)]
struct Accumulated {
    qps: f64,
    eps: f64,
    load_sum: f64,
    load_n: u32,
    /// What `cogmesh top` shows besides: the highest p50 / p99 any sidecar reported, the
    /// in-flight sum, and how many reports had the endpoint ejected.
    traffic: Traffic,
}

/// An endpoint's latency, in-flight count and ejections over one window (see [`Accumulated`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub in_flight: u64,
    pub ejected_by: u32,
}

impl MeshState {
    pub fn with_statics(statics: Vec<super::config::StaticService>) -> Self {
        MeshState {
            statics,
            ..MeshState::default()
        }
    }

    /// Registers (or re-registers) a sidecar; returns its session number.
    pub fn hello(&mut self, hello: Hello) -> u64 {
        // A sidecar that already runs a table from an earlier life of the control plane: keep
        // versions monotonic across restarts, and note that the mesh existed before us.
        if hello.table_version > 0 {
            self.existing_mesh = true;
            self.version = self.version.max(hello.table_version);
        }
        self.next_session += 1;
        self.sidecar_members = None;
        let session = self.next_session;
        let node = hello.node.clone();
        let previous = self.sidecars.remove(&node);
        self.sidecars.insert(
            node,
            Sidecar {
                hello,
                connected: true,
                session,
                acked_version: previous.as_ref().map_or(0, |p| p.acked_version),
                sent_version: 0,
                same_as_sent: 0,
                // A NACKed version is never sent to that sidecar again, across reconnects.
                rejected: previous.map(|p| p.rejected).unwrap_or_default(),
                self_load: None,
            },
        );
        session
    }

    /// Marks a sidecar gone, unless a newer session of it took over.
    pub fn disconnect(&mut self, node: &str, session: u64) -> bool {
        match self.sidecars.get_mut(node) {
            Some(s) if s.session == session => {
                s.connected = false;
                self.sidecar_members = None;
                true
            }
            _ => false,
        }
    }

    /// Folds a report into the window's per-endpoint sums at once, so memory stays
    /// proportional to the number of endpoints, not to sidecars × endpoints × reports.
    pub fn report(&mut self, node: &str, report: LoadReport) {
        let Some(s) = self.sidecars.get_mut(node) else {
            return;
        };
        if let Some(i) = &report.instance {
            s.self_load = Some(i.cognitive_load);
        }
        self.window_reports += 1;
        if !self.window_reporters.contains(node) {
            self.window_reporters.insert(node.to_string());
        }
        for e in report.endpoints {
            let Some(l) = e.load else { continue };
            let acc = match self.window.get_mut(&e.address) {
                Some(a) => a,
                None => self.window.entry(e.address).or_default(),
            };
            acc.qps += l.reasoning_throughput_rps;
            acc.eps += l.errors_per_second;
            acc.load_sum += l.cognitive_load;
            acc.load_n += 1;
            let t = &mut acc.traffic;
            t.p50_ms = t.p50_ms.max(l.latency_p50_ms);
            t.p99_ms = t.p99_ms.max(l.latency_p99_ms);
            t.in_flight += l.in_flight;
            t.ejected_by += u32::from(e.ejected);
        }
    }

    /// `version` went out to `node`.
    pub fn sent(&mut self, node: &str, version: u64) {
        if let Some(s) = self.sidecars.get_mut(node) {
            s.sent_version = version;
            s.same_as_sent = version;
        }
    }

    /// `version` was not sent to `node` because its table for it is the one it already has: a
    /// sidecar that ACKed that table is in sync with `version` too.
    pub fn same_view(&mut self, node: &str, version: u64) {
        if let Some(s) = self.sidecars.get_mut(node) {
            s.same_as_sent = version;
            if s.sent_version > 0 && s.acked_version >= s.sent_version {
                s.acked_version = s.acked_version.max(version);
            }
        }
    }

    pub fn ack(&mut self, node: &str, version: u64) {
        if let Some(s) = self.sidecars.get_mut(node) {
            s.acked_version = s.acked_version.max(version);
            if version == s.sent_version {
                s.acked_version = s.acked_version.max(s.same_as_sent);
            }
        }
    }

    pub fn nack(&mut self, node: &str, version: u64, error: String) {
        if let Some(s) = self.sidecars.get_mut(node) {
            if !s.rejected.iter().any(|r| r.version == version) {
                s.rejected.push(Rejection { version, error });
            }
        }
    }

    pub fn was_rejected(&self, node: &str, version: u64) -> bool {
        self.sidecars
            .get(node)
            .is_some_and(|s| s.rejected.iter().any(|r| r.version == version))
    }

    /// Recomputes weights from the reports since the last call and, if the table changed,
    /// makes a new version. Returns the new table when there is one. (The control plane runs
    /// the three steps separately, so that the weight update itself runs outside the lock.)
    #[cfg(test)]
    pub fn recompute(&mut self, now_secs: f64, interval_secs: f64) -> Option<Arc<RoutingTable>> {
        let _ = interval_secs;
        let inputs = self.weight_inputs();
        let book = Arc::clone(&self.book);
        let services = lock(&book).update(inputs, now_secs);
        self.publish(services)
    }

    /// Takes what a weight update reads: membership, and the window's reports (which start
    /// over). Copies about two strings per sidecar; the update itself needs no lock on `self`.
    pub fn weight_inputs(&mut self) -> WeightInputs {
        // Membership: the configured and discovered endpoints (few; copied every time), and
        // every connected sidecar, which fronts one endpoint of its service.
        let mut listed = Members::new();
        let mut add =
            |service: &str, addresses: &mut dyn Iterator<Item = String>| match listed.get_mut(service) {
                Some(m) => m.extend(addresses),
                None => {
                    listed.insert(service.to_string(), addresses.collect());
                }
            };
        for s in &self.statics {
            add(&s.name, &mut s.endpoints.iter().map(|e| e.to_string()));
        }
        for s in self.discovered.values() {
            add(&s.service, &mut s.addresses.iter().map(|e| e.to_string()));
        }
        let sidecars = match &self.sidecar_members {
            Some(m) => Arc::clone(m),
            None => {
                let mut members = Members::new();
                for s in self.sidecars.values().filter(|s| s.connected) {
                    let address = s.hello.instance_address.clone();
                    match members.get_mut(&s.hello.service) {
                        Some(m) => m.push(address),
                        None => {
                            members.insert(s.hello.service.clone(), vec![address]);
                        }
                    }
                }
                let members = Arc::new(members);
                self.sidecar_members = Some(Arc::clone(&members));
                members
            }
        };
        // Rates are rates: when a sidecar sent k reports in this window, its rates were added
        // k times, so the update divides by the mean k.
        let per_reporter = if self.window_reporters.is_empty() {
            1.0
        } else {
            (self.window_reports as f64 / self.window_reporters.len() as f64).max(1.0)
        };
        self.window_reports = 0;
        self.window_reporters.clear();
        let self_load = self
            .sidecars
            .values()
            .filter_map(|s| Some((s.hello.instance_address.clone(), s.self_load?)))
            .collect();
        WeightInputs {
            listed,
            sidecars,
            window: std::mem::take(&mut self.window),
            per_reporter,
            self_load,
        }
    }

    /// Makes a new version of `services` (the output of [`WeightBook::update`]) unless it is
    /// not worth one (see [`worth_a_version`]).
    pub fn publish(&mut self, services: Vec<Arc<ServiceEndpoints>>) -> Option<Arc<RoutingTable>> {
        if self.version > 0 && !worth_a_version(&self.published, &services) {
            return None;
        }
        self.version += 1;
        self.table = Arc::new(RoutingTable {
            version: self.version,
            services: services.iter().map(|s| (**s).clone()).collect(),
        });
        self.published = services;
        Some(Arc::clone(&self.table))
    }

    /// The weight book, shared with the control plane's weight tick.
    pub fn book(&self) -> Arc<Mutex<WeightBook>> {
        Arc::clone(&self.book)
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        let book = lock(&self.book);
        let nodes: HashMap<&str, &str> = self
            .sidecars
            .values()
            .filter(|s| s.connected)
            .map(|s| (s.hello.instance_address.as_str(), s.hello.node.as_str()))
            .collect();
        self.table
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                replicas: self
                    .sidecars
                    .values()
                    .filter(|c| c.connected && c.hello.service == s.name)
                    .count() as u32,
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let o = book.last_observed.get(&e.address);
                        let t = book.last_traffic.get(&e.address).copied().unwrap_or_default();
                        EndpointStatus {
                            address: e.address.clone(),
                            weight: e.weight,
                            node: nodes.get(e.address.as_str()).unwrap_or(&"").to_string(),
                            cognitive_load: o.map_or(0.0, |o| o.utilization),
                            qps: o.map_or(0.0, |o| o.qps),
                            errors_per_second: o.map_or(0.0, |o| o.eps),
                            latency_p50_ms: t.p50_ms,
                            latency_p99_ms: t.p99_ms,
                            in_flight: t.in_flight,
                            ejected_by: t.ejected_by,
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    pub fn sync_status(&self) -> Vec<SidecarStatus> {
        self.sidecars
            .values()
            .map(|s| SidecarStatus {
                node: s.hello.node.clone(),
                service: s.hello.service.clone(),
                instance_address: s.hello.instance_address.clone(),
                connected: s.connected,
                acked_version: s.acked_version,
                sent_version: s.sent_version,
                rejected: s.rejected.clone(),
            })
            .collect()
    }
}

/// A weight must move by more than this share of its published value to make a new version
/// on its own: each version goes to every sidecar (at N = 10 000, a 1 000-endpoint table to
/// 9 000 clients is 250 MiB on the wire), and a few per cent of weight is below what the
/// balancer's random pick can tell apart. Membership changes always make one.
pub const PUBLISH_DEADBAND: f64 = 0.05;

/// Whether `next` differs from the published `current` enough for a new version: another set
/// of services or endpoints, or a weight that moved past [`PUBLISH_DEADBAND`]. A service that
/// is the very one published is not compared entry by entry.
fn worth_a_version(current: &[Arc<ServiceEndpoints>], next: &[Arc<ServiceEndpoints>]) -> bool {
    if current.len() != next.len() {
        return true;
    }
    current
        .iter()
        .zip(next)
        .any(|(c, n)| !Arc::ptr_eq(c, n) && differs(c, n))
}

/// Whether `n` is another service, endpoint set, or set of weights (past the deadband) than `c`.
fn differs(c: &ServiceEndpoints, n: &ServiceEndpoints) -> bool {
    c.name != n.name
        || c.endpoints.len() != n.endpoints.len()
        || c.endpoints.iter().zip(&n.endpoints).any(|(a, b)| {
            a.address != b.address
                || (b.weight - a.weight).abs() > PUBLISH_DEADBAND * a.weight.abs().max(0.01)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::{EndpointLoad, Load};

    fn hello(node: &str, service: &str, addr: &str) -> Hello {
        Hello {
            node: node.into(),
            service: service.into(),
            instance_address: addr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn membership_makes_versions_and_unchanged_tables_do_not() {
        let mut m = MeshState::default();
        m.hello(hello("a", "reasoning", "127.0.0.1:7001"));
        let t1 = m.recompute(100.0, 1.0).expect("first table");
        assert_eq!(t1.version, 1);
        assert_eq!(t1.services[0].endpoints.len(), 1);
        assert!(m.recompute(101.0, 1.0).is_none(), "nothing changed");
        let s = m.hello(hello("b", "reasoning", "127.0.0.1:7002"));
        let t2 = m.recompute(102.0, 1.0).expect("a member joined");
        assert_eq!(t2.version, 2);
        assert_eq!(t2.services[0].endpoints.len(), 2);
        assert!(m.disconnect("b", s));
        let t3 = m.recompute(103.0, 1.0).unwrap();
        assert_eq!(t3.services[0].endpoints.len(), 1);
    }

    #[test]
    fn small_weight_moves_wait_for_a_bigger_one_or_a_membership_change() {
        let svc = |weights: &[(&str, f64)]| {
            vec![Arc::new(ServiceEndpoints {
                name: "r".into(),
                endpoints: weights
                    .iter()
                    .map(|(a, w)| WeightedEndpoint {
                        address: a.to_string(),
                        weight: *w,
                    })
                    .collect(),
            })]
        };
        let current = svc(&[("a", 1.0), ("b", 0.5)]);
        assert!(!worth_a_version(&current, &svc(&[("a", 1.04), ("b", 0.48)])));
        assert!(worth_a_version(&current, &svc(&[("a", 1.0), ("b", 0.53)])));
        assert!(worth_a_version(&current, &svc(&[("a", 1.0)])));
        assert!(worth_a_version(&current, &svc(&[("a", 1.0), ("c", 0.5)])));
        assert!(worth_a_version(&current, &[]));
        // The very services published: no version, whatever they hold.
        assert!(!worth_a_version(&current, &current.clone()));
    }

    #[test]
    fn a_service_at_rest_comes_back_as_published() {
        let mut m = MeshState::default();
        m.hello(hello("a", "r", "127.0.0.1:7001"));
        let book = m.book();
        let first = lock(&book).update(m.weight_inputs(), 0.0);
        assert_eq!(
            *first[0],
            ServiceEndpoints {
                name: "r".into(),
                endpoints: vec![WeightedEndpoint {
                    address: "127.0.0.1:7001".into(),
                    weight: 1.0,
                }],
            }
        );
        assert_eq!(m.publish(first.clone()).map(|t| t.version), Some(1));
        // Past slow start and nobody reports on it: the same service, not a copy, and no version.
        let rested = lock(&book).update(m.weight_inputs(), 100.0);
        assert!(Arc::ptr_eq(&first[0], &rested[0]));
        assert!(m.publish(rested).is_none());
        // Still at rest with the same members (known from the last update, not checked again).
        let again = lock(&book).update(m.weight_inputs(), 100.5);
        assert!(Arc::ptr_eq(&first[0], &again[0]));
        // Traffic to it: weighed again, even with the same members.
        let session = m.hello(hello("client", "gw", "127.0.0.1:7000"));
        let calls = lock(&book).update(m.weight_inputs(), 100.6);
        assert!(Arc::ptr_eq(&first[0], &calls[1]), "gw is new, r still at rest");
        m.report(
            "client",
            LoadReport {
                unix_ms: 0,
                instance: None,
                endpoints: vec![EndpointLoad {
                    service: "r".into(),
                    address: "127.0.0.1:7001".into(),
                    load: Some(Load {
                        reasoning_throughput_rps: 10.0,
                        cognitive_load: 0.5,
                        ..Default::default()
                    }),
                    ejected: false,
                }],
            },
        );
        let busy = lock(&book).update(m.weight_inputs(), 100.7);
        assert!(!Arc::ptr_eq(&first[0], &busy[1]));
        assert_eq!(busy[1].endpoints[0].weight, 1.0);
        assert_eq!(m.publish(busy).map(|t| t.version), Some(2), "gw joined");
        // A member joins (and the client leaves): a new service, and a version with it.
        assert!(m.disconnect("client", session));
        m.hello(hello("b", "r", "127.0.0.1:7002"));
        let joined = lock(&book).update(m.weight_inputs(), 101.0);
        assert!(!Arc::ptr_eq(&first[0], &joined[0]));
        let t = m.publish(joined).expect("a member joined");
        assert_eq!(
            (t.version, t.services.len(), t.services[0].endpoints.len()),
            (3, 1, 2)
        );
    }

    #[test]
    fn reports_move_weights_and_nacks_are_remembered_across_reconnects() {
        let mut m = MeshState::default();
        m.hello(hello("a", "r", "127.0.0.1:7001"));
        m.hello(hello("b", "r", "127.0.0.1:7002"));
        m.hello(hello("client", "gw", "127.0.0.1:7000"));
        // Settle slow start.
        m.recompute(0.0, 1.0);
        let load = |rps: f64, cl: f64| Load {
            reasoning_throughput_rps: rps,
            cognitive_load: cl,
            ..Default::default()
        };
        for t in 1..=5 {
            m.report(
                "client",
                LoadReport {
                    unix_ms: 0,
                    instance: None,
                    endpoints: vec![
                        EndpointLoad {
                            service: "r".into(),
                            address: "127.0.0.1:7001".into(),
                            load: Some(load(50.0, 0.9)),
                            ejected: false,
                        },
                        EndpointLoad {
                            service: "r".into(),
                            address: "127.0.0.1:7002".into(),
                            load: Some(load(50.0, 0.3)),
                            ejected: false,
                        },
                    ],
                },
            );
            m.recompute(100.0 * t as f64, 1.0);
        }
        let r = m.table.services.iter().find(|s| s.name == "r").unwrap();
        assert!(r.endpoints[1].weight > r.endpoints[0].weight, "{r:?}");

        m.nack("client", 3, "bad".into());
        // Versions that did not change a sidecar's table are not sent; once it ACKed the table
        // it has, it is in sync with them too.
        m.sent("client", 7);
        m.same_view("client", 8);
        assert_eq!(m.sidecars["client"].acked_version, 0, "7 is not ACKed yet");
        m.ack("client", 7);
        assert_eq!(m.sidecars["client"].acked_version, 8);
        m.same_view("client", 9);
        assert_eq!(m.sidecars["client"].acked_version, 9);
        assert!(m.was_rejected("client", 3));
        m.hello(hello("client", "gw", "127.0.0.1:7000"));
        assert!(m.was_rejected("client", 3), "forgotten after reconnect");
    }
}
