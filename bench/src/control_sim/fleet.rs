//! N simulated sidecars in this process, each one real `MeshControl.Connect` stream over
//! loopback HTTP/2 (streams spread over a few tonic `Channel`s, one connection each).
//!
//! Every sidecar sends `Hello`, then a `LoadReport` every second (first one at a per-sidecar
//! offset in [0, 1 s), so reports are spread evenly instead of arriving in one burst), and ACKs
//! every routing table it receives. Unless told otherwise, sidecars take deltas, as real ones
//! do; a delta against another version than the sidecar's fails the run (a control-plane bug). Sidecars `0..instances` front instances of `reasoning`; the
//! rest front instances of `gateway`, a client of `reasoning`, and report on its endpoints.
//!
//! Everything the coordinator measures lives in [`Shared`], in atomics: per sidecar the last
//! table version and watched weight, and during a probe the time its first table with the
//! changed weight arrived.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cogmesh_proto::v1::{sidecar_message, Ack, EndpointLoad, Hello, Load, LoadReport, SidecarMessage};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::wire::{Control, SidecarCodec, TableSummary, Watched, CONNECT_PATH};

pub const SERVICE: &str = "reasoning";
pub const CLIENT_SERVICE: &str = "gateway";
/// Requests per second each reporting client says it sends to each endpoint it reports.
const RPS_PER_ENDPOINT: f64 = 10.0;
/// Streams opening at once (the rest wait): the control plane handles each Hello under its lock.
const CONNECTS_IN_FLIGHT: usize = 256;

/// Which clients report on which `reasoning` endpoints.
#[derive(Clone, Copy, Debug)]
pub enum ReportMode {
    /// The first `observers` clients each report on every instance; the other clients report
    /// only their own load. Every report that carries endpoints covers all of them equally.
    Observers { observers: usize },
    /// Every client reports on `fanout` instances (client c: instances c·fanout .. +fanout,
    /// modulo the instance count), the way real clients spread over a subset.
    Spread { fanout: usize },
}

/// The `instance_address` of sidecar `i`: distinct loopback addresses that nothing dials.
pub fn address(i: usize) -> String {
    format!("127.{}.{}.{}:4143", 1 + (i >> 16), (i >> 8) & 0xff, i & 0xff)
}

/// Nanoseconds since `base`, never 0 (0 means "not yet" in the atomics below).
fn ns_since(base: Instant) -> u64 {
    (base.elapsed().as_nanos() as u64).max(1)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SplitMix64: deterministic per-sidecar offsets without a random-number dependency.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store_f64(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

fn atomics(n: usize, value: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(value)).collect()
}

/// State shared by the sidecar tasks and the coordinator.
pub struct Shared {
    base: Instant,
    pub n: usize,
    pub instances: usize,
    mode: ReportMode,
    /// Sidecars say `accepts_deltas` in their Hello.
    accepts_deltas: bool,
    instance_addresses: Vec<String>,
    /// Current cognitive load of each instance (f64 bits); its sidecar reports it.
    loads: Vec<AtomicU64>,
    pub connected: AtomicUsize,
    pub ended: AtomicUsize,
    pub failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    last_connect_ns: AtomicU64,
    first_table_ns: Vec<AtomicU64>,
    pub with_table: AtomicUsize,
    last_version: Vec<AtomicU64>,
    watched_weight: Vec<AtomicU64>,
    /// During a probe: when each sidecar got its first table past the threshold.
    arrival_ns: Vec<AtomicU64>,
    /// A table counts as changed when the watched weight is below `low` or above `high`.
    probe_low: AtomicU64,
    probe_high: AtomicU64,
    /// When the watched instance's sidecar sent its first report with the new load.
    t0_ns: AtomicU64,
    max_version: AtomicU64,
    new_version_ns: AtomicU64,
    pub tables: AtomicU64,
    /// Of `tables`, the deltas.
    pub deltas: AtomicU64,
    pub table_bytes: AtomicU64,
    /// Wakes the watched sidecar to move its report schedule (see [`Shared::rephase_watched`]).
    rephase: Notify,
    /// Moves so far; seeds the next offset.
    rephased: AtomicU64,
    /// The largest whole table received: bytes and endpoints.
    pub last_table_bytes: AtomicU64,
    pub last_table_endpoints: AtomicU64,
    pub reports: AtomicU64,
}

impl Shared {
    pub fn now_ns(&self) -> u64 {
        ns_since(self.base)
    }

    fn fail(&self, idx: usize, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("sidecar {idx}: {error}"));
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How long ago the last stream finished opening.
    pub fn since_last_connect(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.last_connect_ns.load(Ordering::Relaxed)),
        )
    }

    /// The newest table version any sidecar has seen.
    pub fn max_version(&self) -> u64 {
        self.max_version.load(Ordering::Relaxed)
    }

    /// How long since a sidecar last saw a version newer than all before it.
    pub fn quiet_for(&self) -> Duration {
        Duration::from_nanos(
            self.now_ns()
                .saturating_sub(self.new_version_ns.load(Ordering::Relaxed)),
        )
    }

    /// Clients whose last table is the newest version. (Instances are not counted: their
    /// table — their own service only — does not change when `reasoning`'s weights do, and the
    /// control plane sends a sidecar only tables that changed for it.)
    pub fn converged(&self) -> usize {
        let max = self.max_version();
        self.last_version[self.instances..]
            .iter()
            .filter(|v| v.load(Ordering::Relaxed) == max)
            .count()
    }

    /// The median of the watched weight over the sidecars (NaN where a sidecar has no table).
    pub fn watched_weight_median(&self) -> f64 {
        let mut w: Vec<f64> = self
            .watched_weight
            .iter()
            .map(load_f64)
            .filter(|w| w.is_finite())
            .collect();
        if w.is_empty() {
            return f64::NAN;
        }
        w.sort_by(f64::total_cmp);
        w[w.len() / 2]
    }

    pub fn load(&self, instance: usize) -> f64 {
        load_f64(&self.loads[instance])
    }

    /// Starts watching for tables whose watched weight leaves `[low, high]`, from now on.
    pub fn arm(&self, low: f64, high: f64) {
        for a in &self.arrival_ns {
            a.store(0, Ordering::Relaxed);
        }
        self.t0_ns.store(0, Ordering::SeqCst);
        store_f64(&self.probe_low, low);
        store_f64(&self.probe_high, high);
    }

    pub fn disarm(&self) {
        store_f64(&self.probe_low, f64::NEG_INFINITY);
        store_f64(&self.probe_high, f64::INFINITY);
    }

    /// Changes what instance `i`'s sidecar (and every client) reports as its load, from their
    /// next report on.
    pub fn set_load(&self, instance: usize, load: f64) {
        store_f64(&self.loads[instance], load);
    }

    /// Moves the watched sidecar's report schedule: its next report goes out at a point spread
    /// over the next second, another one at every call. The control plane's weight ticks run
    /// at a fixed rate and reports every 1 s, so without this the wait from a report to the
    /// next tick would be the same for every probe of a run (whatever the phase between the
    /// two happened to be) instead of sampling the whole tick interval, as the changes of
    /// many sidecars with their own phases do.
    pub fn rephase_watched(&self) {
        self.rephased.fetch_add(1, Ordering::Relaxed);
        self.rephase.notify_one();
    }

    pub fn t0_ns(&self) -> Option<u64> {
        Some(self.t0_ns.load(Ordering::SeqCst)).filter(|t| *t > 0)
    }

    /// The clients' arrival slots: instances subscribe only to their local service, so the
    /// watched weight never reaches them and they are not waited for.
    fn client_arrivals(&self) -> &[AtomicU64] {
        &self.arrival_ns[self.instances..]
    }

    /// Clients (the sidecars that route to the watched service) in the fleet.
    pub fn clients(&self) -> usize {
        self.n - self.instances
    }

    /// Clients that have seen the change so far.
    pub fn arrived(&self) -> usize {
        self.client_arrivals()
            .iter()
            .filter(|a| a.load(Ordering::Relaxed) > 0)
            .count()
    }

    /// Arrival times (ns since base) of the current probe at every client; `None` for clients
    /// still waiting.
    pub fn arrivals(&self) -> Vec<Option<u64>> {
        self.client_arrivals()
            .iter()
            .map(|a| Some(a.load(Ordering::Relaxed)).filter(|t| *t > 0))
            .collect()
    }

    /// Sidecar `idx` got `table`; the watched weight in the table it now runs is `weight`.
    fn on_table(&self, idx: usize, table: &TableSummary, weight: f64) {
        let now = self.now_ns();
        store_f64(&self.watched_weight[idx], weight);
        self.last_version[idx].store(table.version, Ordering::Relaxed);
        if self.first_table_ns[idx]
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.with_table.fetch_add(1, Ordering::Relaxed);
        }
        if weight < load_f64(&self.probe_low) || weight > load_f64(&self.probe_high) {
            let _ = self.arrival_ns[idx].compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        if self.max_version.fetch_max(table.version, Ordering::Relaxed) < table.version {
            self.new_version_ns.store(now, Ordering::Relaxed);
        }
        self.tables.fetch_add(1, Ordering::Relaxed);
        self.table_bytes.fetch_add(table.bytes as u64, Ordering::Relaxed);
        if table.base.is_some() {
            self.deltas.fetch_add(1, Ordering::Relaxed);
        } else {
            // The largest whole table (a client's; an instance's covers no mesh service).
            self.last_table_bytes
                .fetch_max(table.bytes as u64, Ordering::Relaxed);
            self.last_table_endpoints
                .fetch_max(table.endpoints as u64, Ordering::Relaxed);
        }
    }

    fn hello(&self, idx: usize) -> SidecarMessage {
        // As real sidecars do, each subscribes to the services it routes to: an instance only
        // to its local app's service (not in the mesh table), a client to `reasoning`.
        let (node, service, subscribes) = if idx < self.instances {
            (format!("{SERVICE}-{idx}"), SERVICE, "local")
        } else {
            (
                format!("{CLIENT_SERVICE}-{}", idx - self.instances),
                CLIENT_SERVICE,
                SERVICE,
            )
        };
        SidecarMessage {
            kind: Some(sidecar_message::Kind::Hello(Hello {
                node,
                service: service.into(),
                instance_address: address(idx),
                zone: "bench".into(),
                version: "control-bench".into(),
                table_version: 0,
                subscriptions: vec![subscribes.into()],
                accepts_deltas: self.accepts_deltas,
            })),
        }
    }

    /// The `reasoning` instances client `c` reports on.
    fn reported_instances(&self, client: usize) -> impl Iterator<Item = usize> + '_ {
        let m = self.instances;
        let (start, count) = match self.mode {
            ReportMode::Observers { observers } if client < observers => (0, m),
            ReportMode::Observers { .. } => (0, 0),
            ReportMode::Spread { fanout } => (client * fanout, fanout.min(m)),
        };
        (start..start + count).map(move |i| i % m)
    }

    fn report(&self, idx: usize) -> LoadReport {
        let clients = (self.n - self.instances).max(1) as f64;
        let (instance, endpoints) = if idx < self.instances {
            let instance = Load {
                cognitive_load: self.load(idx),
                cpu_utilization: 0.4,
                mem_utilization: 0.5,
                attention_efficiency: 1.0,
                reasoning_throughput_rps: RPS_PER_ENDPOINT * clients / self.instances as f64,
                latency_p50_ms: 800.0,
                latency_p99_ms: 4_000.0,
                ..Default::default()
            };
            (instance, Vec::new())
        } else {
            let endpoints = self
                .reported_instances(idx - self.instances)
                .map(|i| EndpointLoad {
                    service: SERVICE.into(),
                    address: self.instance_addresses[i].clone(),
                    load: Some(Load {
                        cognitive_load: self.load(i),
                        reasoning_throughput_rps: RPS_PER_ENDPOINT,
                        latency_p50_ms: 800.0,
                        latency_p99_ms: 4_000.0,
                        in_flight: 8,
                        ..Default::default()
                    }),
                    ejected: false,
                })
                .collect();
            let instance = Load {
                cognitive_load: 0.2,
                cpu_utilization: 0.1,
                mem_utilization: 0.2,
                attention_efficiency: 1.0,
                ..Default::default()
            };
            (instance, endpoints)
        };
        LoadReport {
            unix_ms: unix_ms(),
            instance: Some(instance),
            endpoints,
        }
    }
}

/// The running sidecars.
pub struct Fleet {
    pub shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Starts `n` sidecars over `channels` (sidecar i uses channel i mod len); returns at once.
    /// Sidecar 0 fronts instance 0, whose weight is watched. With a `join_rate` (sidecars per
    /// second), sidecar i opens its stream i / join_rate seconds from now; else all at once.
    pub fn start(
        n: usize,
        instances: usize,
        (mode, accepts_deltas): (ReportMode, bool),
        channels: &[Channel],
        low_load: f64,
        join_rate: Option<f64>,
    ) -> Fleet {
        let instance_addresses: Vec<String> = (0..instances).map(address).collect();
        let watched = Arc::new(Watched {
            service: SERVICE.into(),
            address: instance_addresses[0].clone(),
        });
        let shared = Arc::new(Shared {
            base: Instant::now(),
            n,
            instances,
            mode,
            accepts_deltas,
            instance_addresses,
            loads: atomics(instances, low_load.to_bits()),
            connected: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            last_connect_ns: AtomicU64::new(0),
            first_table_ns: atomics(n, 0),
            with_table: AtomicUsize::new(0),
            last_version: atomics(n, 0),
            watched_weight: atomics(n, f64::NAN.to_bits()),
            arrival_ns: atomics(n, 0),
            probe_low: AtomicU64::new(f64::NEG_INFINITY.to_bits()),
            probe_high: AtomicU64::new(f64::INFINITY.to_bits()),
            t0_ns: AtomicU64::new(0),
            max_version: AtomicU64::new(0),
            new_version_ns: AtomicU64::new(1),
            tables: AtomicU64::new(0),
            deltas: AtomicU64::new(0),
            table_bytes: AtomicU64::new(0),
            rephase: Notify::new(),
            rephased: AtomicU64::new(0),
            last_table_bytes: AtomicU64::new(0),
            last_table_endpoints: AtomicU64::new(0),
            reports: AtomicU64::new(0),
        });
        let gate = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
        let codec = SidecarCodec::new(watched);
        let mut tasks = JoinSet::new();
        for idx in 0..n {
            let sidecar = Sidecar {
                shared: Arc::clone(&shared),
                idx,
                channel: channels[idx % channels.len()].clone(),
                codec: codec.clone(),
                gate: Arc::clone(&gate),
                join_at: join_rate.map(|rate| shared.base + Duration::from_secs_f64(idx as f64 / rate)),
            };
            tasks.spawn(sidecar.run());
        }
        Fleet { shared, tasks }
    }

    /// Ends every sidecar task.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

struct Sidecar {
    shared: Arc<Shared>,
    idx: usize,
    channel: Channel,
    codec: SidecarCodec,
    gate: Arc<Semaphore>,
    join_at: Option<Instant>,
}

impl Sidecar {
    async fn run(self) {
        let shared = Arc::clone(&self.shared);
        let idx = self.idx;
        if let Err(error) = self.stream().await {
            shared.fail(idx, error);
        }
        shared.ended.fetch_add(1, Ordering::Relaxed);
    }

    async fn stream(self) -> Result<(), String> {
        let shared = &self.shared;
        let (tx, rx) = mpsc::channel::<SidecarMessage>(16);
        tx.send(shared.hello(self.idx))
            .await
            .map_err(|_| "request stream closed")?;
        if let Some(at) = self.join_at {
            tokio::time::sleep_until(at).await;
        }
        let permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
        let mut grpc = tonic::client::Grpc::new(self.channel).max_decoding_message_size(64 << 20);
        grpc.ready()
            .await
            .map_err(|e| format!("channel not ready: {e}"))?;
        let response = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(CONNECT_PATH),
                self.codec,
            )
            .await
            .map_err(|s| format!("Connect failed: {s}"))?;
        drop(permit);
        shared.connected.fetch_add(1, Ordering::Relaxed);
        shared
            .last_connect_ns
            .fetch_max(shared.now_ns(), Ordering::Relaxed);
        let mut inbound = response.into_inner();

        let offset = Duration::from_nanos(splitmix(self.idx as u64) % 1_000_000_000);
        let mut tick = tokio::time::interval_at(Instant::now() + offset, Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let watched = self.idx == 0;
        let mut last_sent_load = f64::NAN;
        // The table this sidecar runs: its version and the watched endpoint's weight in it.
        let (mut version, mut weight) = (0u64, f64::NAN);
        loop {
            tokio::select! {
                _ = shared.rephase.notified(), if watched => {
                    let k = shared.rephased.load(Ordering::Relaxed);
                    let offset = Duration::from_nanos(splitmix(k.wrapping_add(1 << 32)) % 1_000_000_000);
                    tick = tokio::time::interval_at(Instant::now() + offset, Duration::from_secs(1));
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                }
                _ = tick.tick() => {
                    let report = shared.report(self.idx);
                    if watched {
                        let load = report.instance.as_ref().map_or(f64::NAN, |l| l.cognitive_load);
                        if last_sent_load.is_finite() && load != last_sent_load {
                            let _ = shared.t0_ns.compare_exchange(0, shared.now_ns(), Ordering::SeqCst, Ordering::SeqCst);
                        }
                        last_sent_load = load;
                    }
                    let message = SidecarMessage { kind: Some(sidecar_message::Kind::LoadReport(report)) };
                    tx.send(message).await.map_err(|_| "request stream closed")?;
                    shared.reports.fetch_add(1, Ordering::Relaxed);
                }
                message = inbound.message() => match message {
                    Ok(Some(Control::Table(table))) => {
                        weight = match table.base {
                            None => table.watched_weight.unwrap_or(f64::NAN),
                            Some(base) if base != version => {
                                return Err(format!(
                                    "got a delta to version {} against version {base}, but runs version {version}",
                                    table.version
                                ));
                            }
                            Some(_) if table.watched_removed => f64::NAN,
                            Some(_) => table.watched_weight.unwrap_or(weight),
                        };
                        version = table.version;
                        shared.on_table(self.idx, &table, weight);
                        let ack = SidecarMessage {
                            kind: Some(sidecar_message::Kind::Ack(Ack { version: table.version })),
                        };
                        tx.send(ack).await.map_err(|_| "request stream closed")?;
                    }
                    Ok(Some(Control::Other)) => {}
                    Ok(None) => return Err("the control plane ended the stream".into()),
                    Err(status) => return Err(format!("stream failed: {status}")),
                },
            }
        }
    }
}
