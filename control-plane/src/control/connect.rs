//! `MeshControl.Connect`, served by hand instead of through tonic's generated server, so that one
//! routing-table version is encoded once and its bytes are shared by every stream.
//!
//! With tonic's codec every stream would clone its table, encode it into its own buffer and keep
//! that copy queued in h2 until the socket takes it: at N = 10 000 sidecars, 9 000 clients of a
//! 1 000-endpoint service, that is 9 000 × 28 KiB = 250 MiB of copies per version. Here a
//! version's gRPC frame (5-byte prefix + protobuf) is built once per distinct subscription set
//! and every stream sends a reference-counted slice of it ([`Bytes`]), which h2 queues and
//! writes without copying.
//!
//! A sidecar that said `accepts_deltas` in its Hello gets a version as a `RoutingTableDelta`
//! against the version it last ACKed (only the endpoints that changed: a weight change in a
//! 1 000-endpoint service is one entry instead of the whole 28 KiB table), built and encoded
//! once per base version and shared like the full tables. After a NACK, or no answer, the next
//! table goes whole, so a sidecar's table never depends on a push it did not confirm.
//!
//! The first message must be `Hello`; reports and ACK/NACKs are read by one task per stream;
//! pushes coalesce per sidecar through a `watch` channel (latest wins, no debounce); a version
//! the sidecar NACKed is skipped, and so is a version that changes nothing it routes to.
//! At most one table is in flight per sidecar: before the stream sends a newer table it waits
//! for the sidecar's ACK or NACK of the last one (up to [`ANSWER_WAIT_MS`] after it went out),
//! as an xDS server waits for the answer to its last response. h2 accepts a body's data as
//! soon as it is produced and queues it, so without this a slow sidecar would be queued every
//! version in turn instead of only the latest. The reader records an answer in [`Answers`]
//! without waking the push stream, which looks at it only when it has something newer to send:
//! a version then costs one wake-up per sidecar, not two (at 10 000 sidecars the second was
//! 10 000 more task polls in the middle of the fan-out). Requests are decoded with tonic's own
//! `Streaming`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use cogmesh_proto::delta;
use cogmesh_proto::v1::{
    control_message, sidecar_message, ControlMessage, RoutingTable, ScalingDecision, SidecarMessage,
};
use futures_util::StreamExt;
use http_body::Frame;
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Streaming};
use tonic::server::NamedService;
use tonic::Status;
use tracing::{debug, info, warn};

use super::Mesh;

/// The one method of `cogmesh.v1.MeshControl`.
pub const CONNECT_PATH: &str = "/cogmesh.v1.MeshControl/Connect";
/// Largest sidecar message accepted (a report on every endpoint of a large service fits).
pub const MAX_SIDECAR_MESSAGE_BYTES: usize = 4 << 20;
/// How long a push stream waits for the answer (ACK or NACK) to the table it sent before it
/// may send a newer one anyway (a sidecar that never answers still gets updates, slowly).
pub const ANSWER_WAIT_MS: u64 = 5_000;
/// Initial decode buffer per stream. tonic's default (8 KiB) costs 80 MiB at 10 000 streams
/// while most messages (an instance's report, an ACK) are ~100 bytes; the buffer grows for the
/// few large reports.
const DECODE_BUFFER_BYTES: usize = 512;
/// A delta is sent instead of the whole table unless it is larger by more than this. When
/// everything in a table changed, its delta is the table plus the base version and little more;
/// sending it anyway keeps one path (apply to the confirmed table) for every push after the
/// first. A delta that also lists many removals is larger still, and goes whole.
const DELTA_SLACK_BYTES: usize = 64;

// === EncodedTables ===

/// The encoded gRPC frames of the current version: one per distinct subscription set, and one
/// per (subscription set, base version) a delta was asked for.
#[derive(Debug, Default)]
pub struct EncodedTables {
    version: u64,
    views: HashMap<Vec<String>, View>,
    /// Base version → subscription set → push.
    deltas: HashMap<u64, HashMap<Vec<String>, Push>>,
}

/// One subscription set's view of a version.
#[derive(Clone, Debug)]
pub struct View {
    /// The part of the table the subscriber gets.
    pub table: Arc<RoutingTable>,
    /// The `ControlMessage` in gRPC framing, shared by every stream that sends it.
    pub frame: Bytes,
    /// A hash of the view's services without the version: equal for two versions that differ
    /// only in services this subscriber does not route to.
    pub content: u64,
}

/// What goes on the wire for one push.
#[derive(Clone, Debug)]
pub struct Push {
    pub frame: Bytes,
    /// A `RoutingTableDelta` (else a whole `RoutingTable`).
    pub delta: bool,
}

impl EncodedTables {
    /// `table` as the subscriber of `subscriptions` (sorted, deduplicated) gets it: encoded on
    /// first use for this version, shared afterwards.
    pub fn view(&mut self, table: &RoutingTable, subscriptions: &[String]) -> View {
        if self.version != table.version {
            self.version = table.version;
            self.views.clear();
            self.deltas.clear();
        }
        if let Some(v) = self.views.get(subscriptions) {
            return v.clone();
        }
        let part = for_subscriber(table, subscriptions);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for service in &part.services {
            std::hash::Hash::hash(&service.encode_to_vec(), &mut hasher);
        }
        let content = std::hash::Hasher::finish(&hasher);
        // Encoded from the message, then taken back out of it: no copy of the table.
        let message = ControlMessage {
            kind: Some(control_message::Kind::RoutingTable(part)),
        };
        let frame = grpc_frame(&message);
        let Some(control_message::Kind::RoutingTable(part)) = message.kind else {
            unreachable!("the message was built as a routing table just above")
        };
        let view = View {
            table: Arc::new(part),
            frame,
            content,
        };
        self.views.insert(subscriptions.to_vec(), view.clone());
        view
    }

    /// What to send a subscriber of `subscriptions` that runs `base` to give it `next` (a view
    /// of the current version): the changes since `base`, or the whole table when that is
    /// smaller by more than [`DELTA_SLACK_BYTES`]. Built on first use for each base version,
    /// shared afterwards.
    pub fn push(&mut self, base: &View, next: &View, subscriptions: &[String]) -> Push {
        if next.table.version != self.version {
            // Not the current version's view (cannot happen: views are taken from it): no cache.
            return delta_or_whole(base, next);
        }
        let pushes = self.deltas.entry(base.table.version).or_default();
        if let Some(p) = pushes.get(subscriptions) {
            return p.clone();
        }
        let push = delta_or_whole(base, next);
        pushes.insert(subscriptions.to_vec(), push.clone());
        push
    }
}

/// The delta from `base` to `next`, unless the whole table is smaller by more than
/// [`DELTA_SLACK_BYTES`].
fn delta_or_whole(base: &View, next: &View) -> Push {
    let message = ControlMessage {
        kind: Some(control_message::Kind::RoutingTableDelta(delta::diff(
            &base.table,
            &next.table,
        ))),
    };
    if message.encoded_len() + 5 <= next.frame.len() + DELTA_SLACK_BYTES {
        Push {
            frame: grpc_frame(&message),
            delta: true,
        }
    } else {
        Push {
            frame: next.frame.clone(),
            delta: false,
        }
    }
}

/// A message in gRPC's length-prefixed framing (uncompressed).
fn grpc_frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has the capacity.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// The part of `table` a sidecar subscribed to (all of it without subscriptions).
pub fn for_subscriber(table: &RoutingTable, subscriptions: &[String]) -> RoutingTable {
    if subscriptions.is_empty() {
        return table.clone();
    }
    RoutingTable {
        version: table.version,
        services: table
            .services
            .iter()
            .filter(|s| subscriptions.contains(&s.name))
            .cloned()
            .collect(),
    }
}

// === ControlRoute ===

/// The `cogmesh.v1.MeshControl` service as a tower service for tonic's router.
#[derive(Clone)]
pub struct ControlRoute {
    pub(super) mesh: Arc<Mesh>,
}

impl NamedService for ControlRoute {
    const NAME: &'static str = "cogmesh.v1.MeshControl";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for ControlRoute {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mesh = Arc::clone(&self.mesh);
        Box::pin(async move {
            if request.uri().path() != CONNECT_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} is not a MeshControl method",
                    request.uri().path()
                ))
                .into_http());
            }
            Ok(match connect(mesh, request).await {
                Ok(body) => {
                    let mut response = http::Response::new(body);
                    response
                        .headers_mut()
                        .insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Reads Hello, registers the sidecar, starts its reader and returns its push body.
async fn connect(
    mesh: Arc<Mesh>,
    request: http::Request<tonic::body::Body>,
) -> Result<tonic::body::Body, Status> {
    let peer = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|i| i.remote_addr);
    let decoder =
        tonic_prost::ProstDecoder::<SidecarMessage>::new(BufferSettings::new(DECODE_BUFFER_BYTES, 32 << 10));
    let mut inbound = Streaming::new_request(
        decoder,
        request.into_body(),
        None,
        Some(MAX_SIDECAR_MESSAGE_BYTES),
    );
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before Hello"))?;
    let Some(sidecar_message::Kind::Hello(hello)) = first.kind else {
        return Err(Status::invalid_argument("the first message must be Hello"));
    };
    if hello.node.is_empty() || hello.service.is_empty() {
        return Err(Status::invalid_argument(
            "Hello: node and service must not be empty",
        ));
    }
    let address: SocketAddr = hello.instance_address.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "Hello: instance_address {:?} is not an IP:port address",
            hello.instance_address
        ))
    })?;
    let node = hello.node.clone();
    info!(%node, service = %hello.service, %address, peer = ?peer, "sidecar connected");
    // Membership changes are published by the next weight tick, not here: a connect storm
    // (thousands of sidecars after a rollout) then makes one table version per tick, not one
    // per sidecar, each fanned out to everyone.
    let mut subscriptions = hello.subscriptions.clone();
    subscriptions.sort();
    subscriptions.dedup();
    let own_service = hello.service.clone();
    let accepts_deltas = hello.accepts_deltas;
    let session = mesh.state().hello(hello);

    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let answers = Arc::new(Answers::default());
    tokio::spawn(read_sidecar(
        Arc::clone(&mesh),
        node.clone(),
        session,
        inbound,
        (done_tx, Arc::clone(&answers)),
    ));
    Ok(push_body(
        mesh,
        node,
        (own_service, subscriptions, accepts_deltas),
        done_rx,
        answers,
    ))
}

/// The sidecar's answer to the newest version it answered.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Answer {
    version: u64,
    /// ACK (else NACK).
    accepted: bool,
}

impl Answer {
    /// Takes `next` unless it answers an older version than the one already known.
    fn update(&mut self, next: Answer) {
        if next.version >= self.version {
            *self = next;
        }
    }
}

/// What one sidecar's reader and push stream share about its answers.
#[derive(Debug, Default)]
struct Answers {
    state: Mutex<AnswerState>,
    /// Notified on every answer; only a push stream waiting for one listens.
    arrived: Notify,
}

/// The newest answer, and the table still waiting for one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct AnswerState {
    latest: Answer,
    /// The version in flight and when it went out, until an answer to it (or a newer one)
    /// comes or the push stream stops waiting.
    awaiting: Option<(u64, Instant)>,
}

impl AnswerState {
    /// `version` went out `at`.
    fn sent(&mut self, version: u64, at: Instant) {
        self.awaiting = Some((version, at));
    }

    /// Records `answer`, received `at`; returns how long the table in flight waited for it
    /// (`table_ack_seconds`) when this is its answer.
    fn record(&mut self, answer: Answer, at: Instant) -> Option<Duration> {
        self.latest.update(answer);
        let (version, sent_at) = self.awaiting?;
        if self.latest.version < version {
            return None;
        }
        self.awaiting = None;
        Some(at.saturating_duration_since(sent_at))
    }

    /// The answer to `version`, once there is one: accepted (ACKed and nothing newer answered
    /// since) or not.
    fn answer_to(&self, version: u64) -> Option<bool> {
        (self.latest.version >= version).then(|| {
            self.latest
                == Answer {
                    version,
                    accepted: true,
                }
        })
    }
}

impl Answers {
    fn state(&self) -> std::sync::MutexGuard<'_, AnswerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader's side: records `answer` and wakes the push stream if it waits for one.
    fn record(&self, answer: Answer, metrics: &super::metrics::Metrics) {
        let waited = self.state().record(answer, Instant::now());
        if let Some(waited) = waited {
            metrics.table_ack_seconds.observe(waited.as_secs_f64());
        }
        self.arrived.notify_one();
    }
}

/// What one sidecar's push stream waits on.
struct Pushes {
    mesh: Arc<Mesh>,
    node: String,
    /// Services this sidecar routes to, sorted; empty: all.
    subscriptions: Vec<String>,
    tables: watch::Receiver<Arc<RoutingTable>>,
    stopping: watch::Receiver<bool>,
    done: tokio::sync::oneshot::Receiver<()>,
    /// [`View::content`] of the last table sent.
    last_content: Option<u64>,
    /// The sidecar's answers, recorded by its reader.
    answers: Arc<Answers>,
    /// The table sent whose answer the stream has not looked at yet.
    in_flight: Option<View>,
    /// Whether the sidecar applies deltas.
    accepts_deltas: bool,
    /// The table the sidecar ACKed last, which it runs; `None` when unsure (a NACK, no answer,
    /// nothing sent yet): the next table then goes whole.
    confirmed: Option<View>,
    /// When the table in flight went out.
    sent_at: Instant,
    /// Scaling decisions, of which the sidecar gets those for its own service and the
    /// services it routes to (`None` once the channel closed).
    decisions: Option<tokio::sync::broadcast::Receiver<ScalingDecision>>,
    own_service: String,
}

impl Pushes {
    /// Whether decisions about `service` go to this sidecar.
    fn wants(&self, service: &str) -> bool {
        service == self.own_service
            || self.subscriptions.is_empty()
            || self.subscriptions.iter().any(|s| s == service)
    }

    /// Waits for the sidecar's answer to the table in flight (at most until [`ANSWER_WAIT_MS`]
    /// after it went out) and takes it as the base of the next delta if it was an ACK.
    /// `None` when the stream is over.
    async fn settle_in_flight(&mut self) -> Option<()> {
        let Some(sent) = self.in_flight.take() else {
            return Some(());
        };
        let version = sent.table.version;
        let deadline = self.sent_at + Duration::from_millis(ANSWER_WAIT_MS);
        loop {
            // Registered before looking, so an answer recorded in between is not missed.
            let arrived = self.answers.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(accepted) = self.answers.state().answer_to(version) {
                self.confirmed = accepted.then_some(sent);
                return Some(());
            }
            tokio::select! {
                _ = &mut self.done => return None,
                _ = self.stopping.wait_for(|s| *s) => return None,
                _ = arrived => {}
                _ = tokio::time::sleep_until(deadline) => {
                    debug!(node = %self.node, version, "no answer to the last table; sending the next anyway");
                    // A late answer is not an answer to this push any more.
                    self.answers.state().awaiting = None;
                    self.confirmed = None;
                    return Some(());
                }
            }
        }
    }

    /// The next frame to send, or `None` when the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        let mut pending_decision: Option<ScalingDecision> = None;
        loop {
            let decision = async {
                match self.decisions.as_mut() {
                    Some(d) => d.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut self.done => return None,
                _ = self.stopping.wait_for(|s| *s) => return None,
                changed = self.tables.changed() => if changed.is_err() { return None },
                d = decision => {
                    match d {
                        Ok(d) => pending_decision = Some(d),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => self.decisions = None,
                    }
                }
            }
            if let Some(d) = pending_decision.take() {
                if self.wants(&d.service) {
                    let message = ControlMessage {
                        kind: Some(control_message::Kind::ScalingDecision(d)),
                    };
                    return Some(grpc_frame(&message));
                }
                continue;
            }
            if self.decisions.is_none() && !self.tables.has_changed().unwrap_or(false) {
                // Woken by the decision channel closing: wait for a table again.
                continue;
            }
            // The answer to the last table decides whether the next may go and as what
            // (a delta needs a confirmed base); it is looked at only now, so that ACKs do not
            // wake this stream.
            self.settle_in_flight().await?;
            if let Some(left) = self.mesh.hold_pushes() {
                debug!(node = %self.node, left_ms = left.as_millis() as u64, "holding pushes until every sidecar is back");
                tokio::select! {
                    _ = &mut self.done => return None,
                    _ = self.stopping.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(left) => {}
                }
            }
            let table = Arc::clone(&self.tables.borrow_and_update());
            if table.version == 0 {
                continue;
            }
            // Only the services the sidecar routes to: a client of one service does not get
            // the whole mesh (what makes fan-out grow with the square of the mesh size). The
            // view and what to push are taken under one lock; nothing is sent when nothing
            // this sidecar routes to changed (another service's members or weights did).
            // Without that, every join during a connect storm would resend every client its
            // unchanged table.
            let (view, push) = {
                let mut encoded = self.mesh.encoded();
                let view = encoded.view(&table, &self.subscriptions);
                let push = (self.last_content != Some(view.content)).then(|| match &self.confirmed {
                    Some(base) if self.accepts_deltas => encoded.push(base, &view, &self.subscriptions),
                    _ => Push {
                        frame: view.frame.clone(),
                        delta: false,
                    },
                });
                (view, push)
            };
            let push = {
                let mut state = self.mesh.state();
                if state.was_rejected(&self.node, table.version) {
                    debug!(node = %self.node, version = table.version, "not resending a refused version");
                    continue;
                }
                let Some(push) = push else {
                    state.same_view(&self.node, table.version);
                    continue;
                };
                state.sent(&self.node, table.version);
                push
            };
            self.mesh.metrics.table_pushes.inc();
            if push.delta {
                self.mesh.metrics.table_delta_pushes.inc();
            }
            self.last_content = Some(view.content);
            self.sent_at = Instant::now();
            self.answers.state().sent(view.table.version, self.sent_at);
            self.in_flight = Some(view);
            return Some(push.frame);
        }
    }
}

/// The tables sent to one sidecar as an HTTP/2 body, pulled by hyper only when the stream has
/// send capacity: the frame is fetched at that moment and never queued before, so at most one
/// is pending per sidecar and the latest wins. Ends with `grpc-status: 0` trailers.
fn push_body(
    mesh: Arc<Mesh>,
    node: String,
    (own_service, subscriptions, accepts_deltas): (String, Vec<String>, bool),
    done: tokio::sync::oneshot::Receiver<()>,
    answers: Arc<Answers>,
) -> tonic::body::Body {
    let mut tables = mesh.tables.subscribe();
    tables.mark_changed();
    let stopping = mesh.stopping.subscribe();
    let decisions = Some(mesh.scaler.subscribe());
    let pushes = Pushes {
        decisions,
        own_service,
        mesh,
        node,
        subscriptions,
        tables,
        stopping,
        done,
        last_content: None,
        answers,
        in_flight: None,
        accepts_deltas,
        confirmed: None,
        sent_at: Instant::now(),
    };
    let frames = futures_util::stream::unfold(pushes, |mut p| async move {
        let frame = p.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(frame)), p))
    })
    .chain(futures_util::stream::once(async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Ok(Frame::trailers(trailers))
    }));
    tonic::body::Body::new(http_body_util::StreamBody::new(frames))
}

/// Reads a sidecar's reports and acknowledgements until its stream ends.
async fn read_sidecar(
    mesh: Arc<Mesh>,
    node: String,
    session: u64,
    mut inbound: Streaming<SidecarMessage>,
    (done, answers): (tokio::sync::oneshot::Sender<()>, Arc<Answers>),
) {
    loop {
        match inbound.message().await {
            Ok(Some(SidecarMessage { kind: Some(kind) })) => match kind {
                sidecar_message::Kind::LoadReport(r) => {
                    let Some(shifted) = mesh.state().instance_report(&node, &r) else {
                        continue;
                    };
                    if shifted {
                        mesh.shift.signal();
                    }
                    super::state::lock(&mesh.window).add(&node, r);
                }
                sidecar_message::Kind::Ack(a) => {
                    debug!(%node, version = a.version, "ACK");
                    mesh.state().ack(&node, a.version);
                    mesh.metrics.table_answer("ack");
                    let answer = Answer {
                        version: a.version,
                        accepted: true,
                    };
                    answers.record(answer, &mesh.metrics);
                }
                sidecar_message::Kind::Nack(n) => {
                    warn!(%node, version = n.version, error = %n.error, "sidecar refused a routing table");
                    let version = n.version;
                    mesh.state().nack(&node, version, n.error);
                    mesh.metrics.table_answer("nack");
                    let answer = Answer {
                        version,
                        accepted: false,
                    };
                    answers.record(answer, &mesh.metrics);
                }
                sidecar_message::Kind::Hello(_) => {
                    warn!(%node, "ignoring a second Hello on one stream");
                }
            },
            Ok(Some(SidecarMessage { kind: None })) => {}
            Ok(None) => break,
            Err(e) => {
                debug!(%node, "sidecar stream failed: {e}");
                break;
            }
        }
    }
    info!(%node, "sidecar disconnected");
    let _ = done.send(());
    // Published by the next weight tick, like a join.
    mesh.state().disconnect(&node, session);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cogmesh_proto::v1::{ServiceEndpoints, WeightedEndpoint};

    fn table(version: u64) -> RoutingTable {
        RoutingTable {
            version,
            services: ["gateway", "reasoning", "memory"]
                .iter()
                .map(|n| ServiceEndpoints {
                    name: n.to_string(),
                    endpoints: vec![WeightedEndpoint {
                        address: "127.0.0.1:1".into(),
                        weight: 1.0,
                    }],
                })
                .collect(),
        }
    }

    #[test]
    fn subscribers_get_only_their_services() {
        let table = table(3);
        let t = for_subscriber(&table, &["reasoning".to_string()]);
        assert_eq!(t.version, 3);
        assert_eq!(t.services.len(), 1);
        assert_eq!(t.services[0].name, "reasoning");
        assert_eq!(for_subscriber(&table, &[]).services.len(), 3);
        assert!(for_subscriber(&table, &["local".to_string()]).services.is_empty());
    }

    #[test]
    fn a_version_is_encoded_once_per_subscription_set_and_decodes_back() {
        let mut cache = EncodedTables::default();
        let subs = vec!["reasoning".to_string()];
        let a = cache.view(&table(3), &subs).frame;
        let b = cache.view(&table(3), &subs).frame;
        assert_eq!(a.as_ptr(), b.as_ptr(), "the second subscriber shares the bytes");
        // gRPC framing: uncompressed flag, big-endian length, then the message.
        assert_eq!(a[0], 0);
        let len = u32::from_be_bytes([a[1], a[2], a[3], a[4]]) as usize;
        assert_eq!(len, a.len() - 5);
        let decoded = ControlMessage::decode(&a[5..]).unwrap();
        let Some(control_message::Kind::RoutingTable(t)) = decoded.kind else {
            panic!("not a table: {decoded:?}");
        };
        assert_eq!(t, for_subscriber(&table(3), &subs));
        // Another subscription set, and a new version, get their own encoding.
        let all = cache.view(&table(3), &[]);
        assert_ne!(all.frame.len(), a.len());
        let next = cache.view(&table(4), &subs);
        assert_eq!(
            next.content,
            cache.view(&table(4), &subs).content,
            "a new version with the same services has the same content"
        );
        let mut changed = table(5);
        changed.services[1].endpoints[0].weight = 0.5;
        let other = cache.view(&changed, &subs).content;
        assert_ne!(other, next.content);
        // A change outside the subscription leaves the subscriber's content as it was.
        let mut elsewhere = table(6);
        elsewhere.services[0].endpoints.clear();
        assert_eq!(cache.view(&elsewhere, &subs).content, next.content);
        let next = next.frame;
        assert_ne!(next.as_ptr(), a.as_ptr());
        let decoded = ControlMessage::decode(&next[5..]).unwrap();
        assert!(matches!(decoded.kind, Some(control_message::Kind::RoutingTable(t)) if t.version == 4));
    }

    fn decode(frame: &[u8]) -> control_message::Kind {
        ControlMessage::decode(&frame[5..]).unwrap().kind.unwrap()
    }

    #[test]
    fn a_confirmed_table_gets_the_changes_once_encoded_and_shared() {
        let mut cache = EncodedTables::default();
        let subs = vec!["reasoning".to_string()];
        // Five endpoints: the change of one is smaller than the table.
        let five = |version| {
            let mut t = table(version);
            t.services[1].endpoints = (1..=5)
                .map(|port| WeightedEndpoint {
                    address: format!("127.0.0.1:{port}"),
                    weight: 1.0,
                })
                .collect();
            t
        };
        let base = cache.view(&five(3), &subs);
        let mut changed = five(4);
        changed.services[1].endpoints[0].weight = 0.5;
        let next = cache.view(&changed, &subs);
        let push = cache.push(&base, &next, &subs);
        assert!(push.delta);
        let control_message::Kind::RoutingTableDelta(d) = decode(&push.frame) else {
            panic!("not a delta");
        };
        assert_eq!(
            d,
            cogmesh_proto::v1::RoutingTableDelta {
                version: 4,
                base_version: 3,
                services: vec![cogmesh_proto::v1::ServiceDelta {
                    name: "reasoning".into(),
                    upserted: vec![WeightedEndpoint {
                        address: "127.0.0.1:1".into(),
                        weight: 0.5,
                    }],
                    removed: vec![],
                }],
                removed_services: vec![],
            }
        );
        assert_eq!(delta::apply(&base.table, &d).as_ref(), Ok(&*next.table));
        let again = cache.push(&base, &next, &subs);
        assert_eq!(
            again.frame.as_ptr(),
            push.frame.as_ptr(),
            "built once per base version"
        );
    }

    #[test]
    fn a_delta_much_larger_than_the_table_goes_whole() {
        let mut cache = EncodedTables::default();
        let many = |version, first_port: u16| RoutingTable {
            version,
            services: vec![ServiceEndpoints {
                name: "reasoning".into(),
                endpoints: (first_port..first_port + 20)
                    .map(|port| WeightedEndpoint {
                        address: format!("127.0.0.1:{port}"),
                        weight: 1.0,
                    })
                    .collect(),
            }],
        };
        // Every endpoint replaced: the delta lists 20 removals besides the 20 new endpoints.
        let base = cache.view(&many(1, 1000), &[]);
        let next = cache.view(&many(2, 2000), &[]);
        let push = cache.push(&base, &next, &[]);
        assert!(!push.delta);
        assert_eq!(push.frame.as_ptr(), next.frame.as_ptr());
        // Everything changed but nothing left: a few bytes more than the table, sent as a delta.
        let base = cache.view(
            &RoutingTable {
                version: 3,
                services: vec![],
            },
            &[],
        );
        let next = cache.view(&table(4), &[]);
        let push = cache.push(&base, &next, &[]);
        assert!(push.delta);
        assert!(
            push.frame.len() > next.frame.len(),
            "{} vs {}",
            push.frame.len(),
            next.frame.len()
        );
    }

    #[test]
    fn an_answer_is_timed_against_the_table_in_flight() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let ack = |version| Answer {
            version,
            accepted: true,
        };
        let mut s = AnswerState::default();
        assert_eq!(s.answer_to(1), None);
        s.sent(3, t0);
        // An answer to an older version neither answers nor times the table in flight.
        assert_eq!(s.record(ack(2), t0 + ms(5)), None);
        assert_eq!(s.answer_to(3), None);
        assert_eq!(s.record(ack(3), t0 + ms(40)), Some(ms(40)));
        assert_eq!(s.answer_to(3), Some(true));
        // Timed once: a repeated ACK is not another sample.
        assert_eq!(s.record(ack(3), t0 + ms(50)), None);
        // A NACK answers too, refused.
        s.sent(4, t0 + ms(100));
        let nack = Answer {
            version: 4,
            accepted: false,
        };
        assert_eq!(s.record(nack, t0 + ms(107)), Some(ms(7)));
        assert_eq!(s.answer_to(4), Some(false));
        // An answer to a newer version than the one in flight answers it, not as an ACK of it.
        s.sent(5, t0 + ms(200));
        assert_eq!(s.record(ack(6), t0 + ms(230)), Some(ms(30)));
        assert_eq!(s.answer_to(5), Some(false));
        // A table the stream stopped waiting for is not timed by a late answer.
        s.sent(7, t0 + ms(300));
        s.awaiting = None;
        assert_eq!(s.record(ack(7), t0 + ms(6000)), None);
        assert_eq!(s.answer_to(7), Some(true));
    }

    #[test]
    fn the_newest_answer_wins() {
        let mut a = Answer::default();
        a.update(Answer {
            version: 5,
            accepted: true,
        });
        a.update(Answer {
            version: 4,
            accepted: false,
        });
        assert_eq!(
            a,
            Answer {
                version: 5,
                accepted: true
            }
        );
        a.update(Answer {
            version: 5,
            accepted: false,
        });
        assert_eq!(
            a,
            Answer {
                version: 5,
                accepted: false
            }
        );
        a.update(Answer {
            version: 6,
            accepted: true,
        });
        assert_eq!(
            a,
            Answer {
                version: 6,
                accepted: true
            }
        );
    }
}
