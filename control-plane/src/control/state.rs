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
    /// The instance's own last report of its cognitive load (see [`InstanceLoad`]).
    pub self_load: Arc<InstanceLoad>,
}

#[derive(Debug, Default)]
pub struct MeshState {
    /// node → sidecar. Hashed, not sorted: every report, push and ACK looks its sidecar up
    /// under the state lock, and a sorted map of 10 000 nodes cost ~14 cache-missing string
    /// compares per lookup.
    pub sidecars: HashMap<String, Sidecar>,
    next_session: u64,
    /// The weights and what the last update saw, behind their own lock (see [`WeightBook`]).
    book: Arc<Mutex<WeightBook>>,
    /// service → addresses of its connected sidecars; rebuilt after a join or a leave only
    /// (copying 10 000 addresses every weight tick cost milliseconds under this lock).
    /// With it, their instances' loads by address.
    sidecar_members: Option<(Arc<Members>, Arc<Instances>)>,
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
    /// The reports since the last weight update, behind their own lock (see [`OpenWindow`]).
    window: Arc<Mutex<OpenWindow>>,
}

/// Per-endpoint sums of the reports since the last weight update. Behind its own lock, not the
/// state lock: a client's report on 1 000 endpoints takes a few hundred µs to fold in, and
/// the pushes and ACKs of a fan-out to 10 000 sidecars would queue behind it on the state lock.
#[derive(Debug, Default)]
pub struct OpenWindow {
    sums: HashMap<String, Accumulated>,
    reports: u64,
    reporters: std::collections::HashSet<String>,
}

impl OpenWindow {
    /// Folds `report`, from `node`, into the per-endpoint sums at once, so memory stays
    /// proportional to the number of endpoints, not to sidecars × endpoints × reports.
    pub fn add(&mut self, node: &str, report: LoadReport) {
        self.reports += 1;
        if !self.reporters.contains(node) {
            self.reporters.insert(node.to_string());
        }
        for e in report.endpoints {
            let Some(l) = e.load else { continue };
            let acc = match self.sums.get_mut(&e.address) {
                Some(a) => a,
                None => self.sums.entry(e.address).or_default(),
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

    /// The sums and the mean reports per reporter (see [`WeightInputs`]); the window starts
    /// over.
    fn close(&mut self) -> (HashMap<String, Accumulated>, f64) {
        // Rates are rates: when a sidecar sent k reports in this window, its rates were added
        // k times, so the update divides by the mean k.
        let per_reporter = if self.reporters.is_empty() {
            1.0
        } else {
            (self.reports as f64 / self.reporters.len() as f64).max(1.0)
        };
        self.reports = 0;
        self.reporters.clear();
        (std::mem::take(&mut self.sums), per_reporter)
    }
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
    /// The last closed window's per-endpoint sums and its mean reports per reporter.
    window: HashMap<String, Accumulated>,
    per_reporter: f64,
}

/// An instance's own report that moves its load by this much or more makes the control plane
/// update weights at once instead of at the next tick (see [`Window::Reuse`]).
pub const LOAD_SHIFT: f64 = 0.1;

/// Which reports a weight update reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The reports since the last closed window, which this update closes: the weight tick.
    Close,
    /// The last closed window's reports again, with the instances' loads as they are now: an
    /// update between ticks (an instance's load shifted, a reload) that leaves the open window
    /// to fill up. Rates summed over part of a window would make every weight jitter.
    Reuse,
}

/// The services, endpoints and what was last observed of them, for `ListServices` and the
/// autoscaler: built from a [`ServicesView`] outside the state lock (at 10 000 sidecars,
/// ~20 000 small allocations that every push and ACK would otherwise wait for).
#[derive(Debug)]
pub struct ServicesView {
    table: Arc<RoutingTable>,
    members: Arc<Members>,
    instances: Arc<Instances>,
    book: Arc<Mutex<WeightBook>>,
}

impl ServicesView {
    pub fn services(&self) -> Vec<ServiceStatus> {
        let book = lock(&self.book);
        self.table
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                replicas: self.members.get(&s.name).map_or(0, Vec::len) as u32,
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let o = book.last_observed.get(&e.address);
                        let t = book.last_traffic.get(&e.address).copied().unwrap_or_default();
                        let instance = self.instances.get(&e.address);
                        // The instance's own load as it reports it now, else what the clients'
                        // reports said at the last update.
                        let load = instance.and_then(|i| i.load.get());
                        EndpointStatus {
                            address: e.address.clone(),
                            weight: e.weight,
                            node: instance.map(|i| i.node.clone()).unwrap_or_default(),
                            cognitive_load: load.or(o.map(|o| o.utilization)).unwrap_or(0.0),
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
    /// Whether `window` closes a weight interval (else it is empty and the update reuses the
    /// last closed one: see [`Window`]).
    closes: bool,
    /// instance address → its sidecar and its own last report of its load.
    instances: Arc<Instances>,
}

/// An instance's own last report of its cognitive load, shared by its sidecar's entry and the
/// weight update (which reads it without copying every instance's load at every tick).
#[derive(Debug)]
pub struct InstanceLoad(std::sync::atomic::AtomicU64);

/// instance address → its sidecar's node and the instance's load, for the connected sidecars.
pub type Instances = HashMap<String, Instance>;

#[derive(Debug)]
pub struct Instance {
    pub node: String,
    pub load: Arc<InstanceLoad>,
}

impl InstanceLoad {
    /// No report yet.
    const NONE: u64 = u64::MAX;

    fn none() -> Arc<Self> {
        Arc::new(InstanceLoad(std::sync::atomic::AtomicU64::new(Self::NONE)))
    }

    pub fn get(&self) -> Option<f64> {
        let bits = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (bits != Self::NONE).then(|| f64::from_bits(bits))
    }

    /// Stores `load` (a NaN is no load) and returns the one it replaces.
    fn set(&self, load: f64) -> Option<f64> {
        let bits = if load.is_nan() { Self::NONE } else { load.to_bits() };
        let was = self.0.swap(bits, std::sync::atomic::Ordering::Relaxed);
        (was != Self::NONE).then(|| f64::from_bits(was))
    }
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
            closes,
            instances,
        } = inputs;
        // An early update sees the traffic of the last closed window again, with the loads
        // instances report now; the window is kept for the next one.
        if closes {
            self.window = window;
            self.per_reporter = per_reporter;
        }
        let (window, per_reporter) = (&self.window, self.per_reporter.max(1.0));
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
            // A service still at rest with the same members: what `ListServices` shows for it
            // was written when it came to rest (no traffic; the loads it shows are read when
            // listed), so its endpoints are not visited at all.
            let visit = !(resting && rested_before);
            let observed: BTreeMap<String, Option<Observation>> = if !visit {
                BTreeMap::new()
            } else {
                addrs()
                    .filter_map(|a| {
                        let w = window.get(a);
                        let q = w.map_or(0.0, |w| w.qps / per_reporter);
                        let utilization = instances.get(a).and_then(|i| i.load.get()).or_else(|| {
                            w.filter(|w| w.load_n > 0)
                                .map(|w| w.load_sum / f64::from(w.load_n))
                        });
                        let o = (q > 0.0).then(|| Observation {
                            qps: q,
                            eps: w.map_or(0.0, |w| w.eps / per_reporter),
                            utilization: utilization.unwrap_or(0.0),
                        });
                        // What `ListServices` shows (and the autoscaler reads): an endpoint
                        // nobody sent requests to this interval is idle now, not as busy as it
                        // last was.
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
                    .collect()
            };
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
                self_load: InstanceLoad::none(),
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

    /// Takes the instance's own load from `report`; returns `None` for an unknown node (the
    /// report is then ignored), else whether the load moved by [`LOAD_SHIFT`] or more (the
    /// control plane then updates weights without waiting for the next tick). The report's
    /// endpoints go to [`OpenWindow::add`], under the window's lock.
    pub fn instance_report(&mut self, node: &str, report: &LoadReport) -> Option<bool> {
        let s = self.sidecars.get_mut(node)?;
        let mut shifted = false;
        if let Some(i) = &report.instance {
            let load = i.cognitive_load;
            let was = s.self_load.set(load);
            shifted = was.is_some_and(|was| (load - was).abs() >= LOAD_SHIFT);
        }
        Some(shifted)
    }

    /// The reports since the last weight update, shared with the streams' readers.
    pub fn open_window(&self) -> Arc<Mutex<OpenWindow>> {
        Arc::clone(&self.window)
    }

    /// [`Self::instance_report`], then the endpoints into the open window.
    #[cfg(test)]
    pub fn report(&mut self, node: &str, report: LoadReport) -> bool {
        let Some(shifted) = self.instance_report(node, &report) else {
            return false;
        };
        lock(&self.window).add(node, report);
        shifted
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
    pub fn recompute(&mut self, now_secs: f64, window: Window) -> Option<Arc<RoutingTable>> {
        let inputs = self.weight_inputs(window);
        let book = Arc::clone(&self.book);
        let services = lock(&book).update(inputs, now_secs);
        self.publish(services)
    }

    /// Takes what a weight update reads: membership, the instances' own loads and, when
    /// `window` closes it, the window's reports (which start over). Copies nothing per
    /// sidecar unless one joined or left; the update itself needs no lock on `self`.
    pub fn weight_inputs(&mut self, window: Window) -> WeightInputs {
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
        let (sidecars, instances) = self.members();
        let closes = window == Window::Close;
        let (window, per_reporter) = if closes {
            lock(&self.window).close()
        } else {
            (HashMap::new(), 1.0)
        };
        WeightInputs {
            listed,
            sidecars,
            window,
            per_reporter,
            closes,
            instances,
        }
    }

    /// Every connected sidecar's instance by service, and by address with its node and load:
    /// rebuilt after a join or a leave only.
    fn members(&mut self) -> (Arc<Members>, Arc<Instances>) {
        if let Some((m, i)) = &self.sidecar_members {
            return (Arc::clone(m), Arc::clone(i));
        }
        let mut members = Members::new();
        let mut instances = Instances::new();
        for s in self.sidecars.values().filter(|s| s.connected) {
            let address = s.hello.instance_address.clone();
            let instance = Instance {
                node: s.hello.node.clone(),
                load: Arc::clone(&s.self_load),
            };
            instances.insert(address.clone(), instance);
            match members.get_mut(&s.hello.service) {
                Some(m) => m.push(address),
                None => {
                    members.insert(s.hello.service.clone(), vec![address]);
                }
            }
        }
        let (members, instances) = (Arc::new(members), Arc::new(instances));
        self.sidecar_members = Some((Arc::clone(&members), Arc::clone(&instances)));
        (members, instances)
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

    /// What [`ServicesView::services`] reads, taken under the state lock without copying
    /// anything per endpoint.
    pub fn services_view(&mut self) -> ServicesView {
        let (members, instances) = self.members();
        ServicesView {
            table: Arc::clone(&self.table),
            members,
            instances,
            book: Arc::clone(&self.book),
        }
    }

    /// Every sidecar's sync state, by node name.
    pub fn sync_status(&self) -> Vec<SidecarStatus> {
        let mut sidecars: Vec<&Sidecar> = self.sidecars.values().collect();
        sidecars.sort_unstable_by(|a, b| a.hello.node.cmp(&b.hello.node));
        sidecars
            .into_iter()
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
        let t1 = m.recompute(100.0, Window::Close).expect("first table");
        assert_eq!(t1.version, 1);
        assert_eq!(t1.services[0].endpoints.len(), 1);
        assert!(m.recompute(101.0, Window::Close).is_none(), "nothing changed");
        let s = m.hello(hello("b", "reasoning", "127.0.0.1:7002"));
        let t2 = m.recompute(102.0, Window::Close).expect("a member joined");
        assert_eq!(t2.version, 2);
        assert_eq!(t2.services[0].endpoints.len(), 2);
        assert!(m.disconnect("b", s));
        let t3 = m.recompute(103.0, Window::Close).unwrap();
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
        let first = lock(&book).update(m.weight_inputs(Window::Close), 0.0);
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
        let rested = lock(&book).update(m.weight_inputs(Window::Close), 100.0);
        assert!(Arc::ptr_eq(&first[0], &rested[0]));
        assert!(m.publish(rested).is_none());
        // Still at rest with the same members (known from the last update, not checked again).
        let again = lock(&book).update(m.weight_inputs(Window::Close), 100.5);
        assert!(Arc::ptr_eq(&first[0], &again[0]));
        // Traffic to it: weighed again, even with the same members.
        let session = m.hello(hello("client", "gw", "127.0.0.1:7000"));
        let calls = lock(&book).update(m.weight_inputs(Window::Close), 100.6);
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
        let busy = lock(&book).update(m.weight_inputs(Window::Close), 100.7);
        assert!(!Arc::ptr_eq(&first[0], &busy[1]));
        assert_eq!(busy[1].endpoints[0].weight, 1.0);
        assert_eq!(m.publish(busy).map(|t| t.version), Some(2), "gw joined");
        // A member joins (and the client leaves): a new service, and a version with it.
        assert!(m.disconnect("client", session));
        m.hello(hello("b", "r", "127.0.0.1:7002"));
        let joined = lock(&book).update(m.weight_inputs(Window::Close), 101.0);
        assert!(!Arc::ptr_eq(&first[0], &joined[0]));
        let t = m.publish(joined).expect("a member joined");
        assert_eq!(
            (t.version, t.services.len(), t.services[0].endpoints.len()),
            (3, 1, 2)
        );
    }

    /// Instances a (127.0.0.1:7001) and b (:7002) of `r`, and a client of it in `gw`.
    fn two_instances_and_a_client() -> MeshState {
        let mut m = MeshState::default();
        m.hello(hello("a", "r", "127.0.0.1:7001"));
        m.hello(hello("b", "r", "127.0.0.1:7002"));
        m.hello(hello("client", "gw", "127.0.0.1:7000"));
        m
    }

    #[test]
    fn reports_move_weights_and_nacks_are_remembered_across_reconnects() {
        let mut m = two_instances_and_a_client();
        // Settle slow start.
        m.recompute(0.0, Window::Close);
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
            m.recompute(100.0 * t as f64, Window::Close);
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

    /// An instance's own load that shifts by `LOAD_SHIFT` is flagged, and an update between
    /// ticks (`Window::Reuse`) weighs it against the traffic of the last closed window while
    /// the reports of the open one wait for the tick.
    #[test]
    fn a_load_shift_is_weighed_at_once_against_the_last_closed_window() {
        let mut m = two_instances_and_a_client();
        let own = |load: f64| LoadReport {
            instance: Some(Load {
                cognitive_load: load,
                ..Default::default()
            }),
            ..Default::default()
        };
        let traffic = |rps: f64| LoadReport {
            endpoints: ["127.0.0.1:7001", "127.0.0.1:7002"]
                .into_iter()
                .map(|address| EndpointLoad {
                    service: "r".into(),
                    address: address.into(),
                    load: Some(Load {
                        reasoning_throughput_rps: rps,
                        ..Default::default()
                    }),
                    ejected: false,
                })
                .collect(),
            ..Default::default()
        };
        assert!(!m.report("a", own(0.3)), "a first report is no shift");
        assert!(!m.report("b", own(0.3)));
        assert!(!m.report("a", own(0.39)), "0.09 is below LOAD_SHIFT");
        assert!(!m.report("a", own(0.3)));
        assert!(!m.report("nobody", own(0.9)), "unknown nodes are ignored");
        m.recompute(0.0, Window::Close);
        // Past slow start, one closed window with equal traffic and equal loads.
        m.report("client", traffic(50.0));
        m.recompute(100.0, Window::Close);
        let weight = |m: &MeshState, address: &str| {
            let r = m.table.services.iter().find(|s| s.name == "r").unwrap();
            r.endpoints.iter().find(|e| e.address == address).unwrap().weight
        };
        assert_eq!(
            (weight(&m, "127.0.0.1:7001"), weight(&m, "127.0.0.1:7002")),
            (1.0, 1.0)
        );
        let version = m.version;

        // a's load triples; a client's report opens the next window.
        assert!(m.report("a", own(0.9)));
        // ListServices (and the autoscaler) see the instance's load as it reports it now.
        let shown = m.services_view().services();
        let r = shown.iter().find(|s| s.name == "r").unwrap();
        let load = |address: &str| {
            r.endpoints
                .iter()
                .find(|e| e.address == address)
                .unwrap()
                .cognitive_load
        };
        assert_eq!(
            (r.replicas, load("127.0.0.1:7001"), load("127.0.0.1:7002")),
            (2, 0.9, 0.3)
        );
        m.report("client", traffic(5.0));
        let early = m
            .recompute(100.05, Window::Reuse)
            .expect("the shift makes a version");
        assert_eq!(early.version, version + 1);
        // The closed window's equal traffic, a at 0.9 and b at 0.3: raw weights 1 : 3, so
        // targets 0.5 and 1.5, and each weight moves halfway: 0.75 and 1.25.
        assert_eq!(
            (weight(&m, "127.0.0.1:7001"), weight(&m, "127.0.0.1:7002")),
            (0.75, 1.25)
        );
        // The open window (a's report and the client's second one) was left to the tick.
        assert_eq!(lock(&m.window).reports, 2);
        m.recompute(100.1, Window::Close)
            .expect("the tick confirms the targets");
        assert_eq!(lock(&m.window).reports, 0);
        assert_eq!(
            (weight(&m, "127.0.0.1:7001"), weight(&m, "127.0.0.1:7002")),
            (0.5, 1.5)
        );
    }
}
