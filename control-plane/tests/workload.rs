//! End-to-end checks of `cogmesh workload`, served in-process on a loopback port chosen at run time
//! and driven with real clients: hyper (HTTP/1.1 and h2c), tonic (gRPC) and tungstenite (WebSocket).
//! The simulated cognitive service (`--capacity` and friends) is checked at the end.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use cogmesh_control::workload::{self, OrcaForm, ServiceTimeDist, SimConfig};
use cogmesh_proto::orca::OrcaLoadReport;
use cogmesh_proto::v1::workload_client::WorkloadClient;
use cogmesh_proto::v1::InferRequest;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

const NAME: &str = "w-test";

/// A workload running in-process; `stop` triggers its graceful shutdown.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), workload::WorkloadError>>,
}

async fn start() -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(workload::serve(listener, NAME.into(), async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

/// A workload that simulates a cognitive service as `sim` says.
async fn start_with(sim: SimConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(workload::serve_with(listener, NAME.into(), sim, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

async fn grpc_client(addr: SocketAddr) -> WorkloadClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkloadClient::new(channel)
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

type ChunkSender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type ChunkBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

fn chunk_body() -> (ChunkSender, ChunkBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, StreamBody::new(ReceiverStream::new(rx)))
}

/// An HTTP/1.1 or h2c (prior knowledge) connection.
enum Conn<B> {
    H1(hyper::client::conn::http1::SendRequest<B>),
    H2(hyper::client::conn::http2::SendRequest<B>),
}

impl<B> Conn<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn open(addr: SocketAddr, version: Version) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        if version == Version::HTTP_2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            Conn::H1(send)
        }
    }

    async fn send(&mut self, mut req: Request<B>, addr: SocketAddr) -> Response<Incoming> {
        match self {
            Conn::H1(send) => {
                req.headers_mut()
                    .insert(http::header::HOST, addr.to_string().parse().unwrap());
                send.send_request(req).await.unwrap()
            }
            Conn::H2(send) => {
                *req.uri_mut() = format!("http://{addr}{}", req.uri()).parse().unwrap();
                send.send_request(req).await.unwrap()
            }
        }
    }
}

async fn get(addr: SocketAddr, version: Version, path: &str) -> (StatusCode, Response<Bytes>) {
    request(addr, version, Method::GET, path).await
}

async fn request(
    addr: SocketAddr,
    version: Version,
    method: Method,
    path: &str,
) -> (StatusCode, Response<Bytes>) {
    let mut conn = Conn::open(addr, version).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = conn.send(req, addr).await;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (status, Response::from_parts(parts, body))
}

#[tokio::test]
async fn http_routes_on_both_versions() {
    let workload = start().await;
    let addr = workload.addr;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let (status, response) = get(addr, version, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response.body().as_ref(), [b'x'; 1024]);
        assert_eq!(response.headers()["x-served-by"], NAME);
        assert_eq!(response.headers()["content-type"], "text/plain");

        let n = 200_000;
        let (status, response) = get(addr, version, &format!("/bytes?n={n}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response.headers()["content-length"], n.to_string().as_str());
        assert_eq!(response.body().len(), n);
        assert!(response
            .body()
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8));

        let (status, response) = get(addr, version, "/sleep?ms=20").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response.body().as_ref(), b"slept 20 ms");

        let (status, response) = get(addr, version, "/status/418").await;
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        assert_eq!(response.body().as_ref(), b"status 418");
        assert_eq!(response.headers()["x-served-by"], NAME);
        assert_eq!(get(addr, version, "/status/101").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(get(addr, version, "/status/x").await.0, StatusCode::BAD_REQUEST);

        let (status, response) = get(addr, version, "/headers").await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        let expected = if version == Version::HTTP_2 {
            "HTTP/2.0"
        } else {
            "HTTP/1.1"
        };
        assert_eq!(json["version"], expected);
        assert!(json["headers"].is_object());

        assert_eq!(get(addr, version, "/ws").await.0, StatusCode::BAD_REQUEST);
        let (status, response) = get(addr, version, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["x-served-by"], NAME);
    }
    workload.shutdown().await;
}

/// Each chunk comes back before the next one is sent: the echo does not buffer the body.
#[tokio::test]
async fn echo_streams_chunk_by_chunk() {
    let workload = start().await;
    let addr = workload.addr;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let mut conn = Conn::open(addr, version).await;
        let (tx, body) = chunk_body();
        let req = Request::post("/echo")
            .header("content-type", "application/x-test")
            .body(body)
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let response = conn.send(req, addr).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/x-test");
        let mut body = response.into_body();
        for chunk in ["one", "two", "three"] {
            if chunk != "one" {
                tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.unwrap();
            }
            let mut got = Vec::new();
            while got.len() < chunk.len() {
                let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                    .await
                    .expect("echo answers before the request ends")
                    .unwrap()
                    .unwrap();
                got.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(got, chunk.as_bytes());
        }
        drop(tx);
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
    }
    workload.shutdown().await;
}

#[tokio::test]
async fn grpc_workload_service() {
    let workload = start().await;
    let mut client = grpc_client(workload.addr).await;
    let prompt = |p: &str| InferRequest {
        prompt: p.into(),
        ..Default::default()
    };

    let reply = client.infer(prompt("hi")).await.unwrap();
    assert_eq!(reply.metadata().get("x-served-by").unwrap(), NAME);
    let reply = reply.into_inner();
    assert_eq!(
        (reply.text.as_str(), reply.served_by.as_str(), reply.seq),
        ("echo: hi", NAME, 0)
    );

    let error = client
        .infer(InferRequest {
            fail_code: 5,
            fail_message: "no such model".into(),
            ..prompt("hi")
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert_eq!(error.message(), "no such model");

    let parts: Vec<_> = client
        .generate(InferRequest {
            count: 3,
            ..prompt("hi")
        })
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    let parts: Vec<_> = parts.iter().map(|r| (r.text.as_str(), r.seq)).collect();
    assert_eq!(parts, [("part 0", 0), ("part 1", 1), ("part 2", 2)]);

    let upload = tokio_stream::iter(["a", "b", "c"].map(prompt));
    let reply = client.upload(upload).await.unwrap().into_inner();
    assert_eq!((reply.text.as_str(), reply.seq), ("a,b,c", 3));

    let (tx, rx) = mpsc::channel(4);
    let mut replies = client
        .converse(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for (seq, p) in ["x", "y"].into_iter().enumerate() {
        tx.send(prompt(p)).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!((reply.text, reply.seq), (format!("echo: {p}"), seq as u64));
    }
    tx.send(InferRequest {
        fail_code: 8,
        fail_message: "too much".into(),
        ..prompt("z")
    })
    .await
    .unwrap();
    let error = replies.message().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    assert_eq!(error.message(), "too much");

    workload.shutdown().await;
}

#[tokio::test]
async fn websocket_echo() {
    let workload = start().await;
    let tcp = TcpStream::connect(workload.addr).await.unwrap();
    let url = format!("ws://{}/ws", workload.addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["x-served-by"], NAME);

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0_u8, 1, 2])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0_u8, 1, 2])
    );
    ws.close(None).await.unwrap();
    while let Some(message) = ws.next().await {
        if message.is_err() {
            break;
        }
    }
    workload.shutdown().await;
}

/// Shutdown lets a request in flight finish and then returns.
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let workload = start().await;
    let addr = workload.addr;
    let in_flight = tokio::spawn(get(addr, Version::HTTP_11, "/sleep?ms=300"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    workload.shutdown().await;
    let (status, response) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"slept 300 ms");
    assert!(TcpStream::connect(addr).await.is_err());
}

// === the simulated cognitive service ===

fn limited(capacity: usize, queue: usize, orca_form: OrcaForm) -> SimConfig {
    SimConfig {
        capacity,
        queue,
        service_time_dist: ServiceTimeDist::Fixed,
        orca_form,
        ..SimConfig::default()
    }
}

async fn stats(addr: SocketAddr) -> serde_json::Value {
    let (status, response) = get(addr, Version::HTTP_11, "/admin/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    serde_json::from_slice(response.body()).unwrap()
}

/// Polls `/admin/stats` until `field` reaches `value` (at most 5 s).
async fn wait_stat(addr: SocketAddr, field: &str, value: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = stats(addr).await;
        if stats[field] == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{field} never reached {value}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `k=v` pairs of a TEXT report, as the proxy reads them.
fn parse_text_report(value: &str) -> std::collections::BTreeMap<String, f64> {
    let body = value.strip_prefix("TEXT ").expect("TEXT form");
    body.split(", ")
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("k=v");
            (k.to_owned(), v.parse().expect("a number"))
        })
        .collect()
}

fn load_report(response: &Response<Bytes>) -> std::collections::BTreeMap<String, f64> {
    let value = response.headers()["endpoint-load-metrics"].to_str().unwrap();
    parse_text_report(value)
}

/// Capacity 1, queue 1: the first request is served, the second waits, the third is refused at
/// once; every answer carries the load it was sent under.
#[tokio::test]
async fn capacity_and_queue_refuse_the_third_request() {
    let workload = start_with(limited(1, 1, OrcaForm::Text)).await;
    let addr = workload.addr;
    let first = tokio::spawn(get(addr, Version::HTTP_11, "/work?ms=1500"));
    wait_stat(addr, "busy", 1).await;
    let second = tokio::spawn(get(addr, Version::HTTP_2, "/work?ms=100"));
    wait_stat(addr, "queued", 1).await;

    let (status, third) = get(addr, Version::HTTP_11, "/work?ms=100").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers()["retry-after"], "1");
    assert_eq!(third.headers()["x-served-by"], NAME);
    assert_eq!(third.body().as_ref(), b"queue full");
    // One busy and one queued of one slot: demand twice the capacity, the slot full; nothing
    // completed yet.
    assert_eq!(
        third.headers()["endpoint-load-metrics"],
        "TEXT named_metrics.cognitive_load=2, application_utilization=2, cpu_utilization=1, \
         rps_fractional=0"
    );
    let stats_now = stats(addr).await;
    assert_eq!(
        stats_now,
        serde_json::json!({
            "name": NAME, "capacity": 1, "busy": 1, "queued": 1, "completed": 0,
            "rejected": 1, "stalled": 0, "received": 3,
        })
    );

    // The first hands its slot to the second: still one busy, none queued.
    let (status, first) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first.body().as_ref(), b"done");
    assert_eq!(first.headers()["x-served-by"], NAME);
    let report = load_report(&first);
    let keys: Vec<_> = report.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "application_utilization",
            "cpu_utilization",
            "named_metrics.cognitive_load",
            "rps_fractional"
        ]
    );
    assert_eq!(report["named_metrics.cognitive_load"], 1.0);
    assert_eq!(report["application_utilization"], 1.0);
    assert_eq!(report["cpu_utilization"], 1.0);
    assert_eq!(report["rps_fractional"], 1.0);

    // The second leaves the workload idle.
    let (status, second) = second.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second.body().as_ref(), b"done");
    let report = load_report(&second);
    assert_eq!(report["named_metrics.cognitive_load"], 0.0);
    assert_eq!(report["cpu_utilization"], 0.0);
    assert_eq!(report["rps_fractional"], 2.0);

    let stats_after = stats(addr).await;
    assert_eq!(
        (
            &stats_after["busy"],
            &stats_after["queued"],
            &stats_after["completed"]
        ),
        (&0.into(), &0.into(), &2.into())
    );
    workload.shutdown().await;
}

#[tokio::test]
async fn load_report_forms() {
    // JSON: the proto3 JSON mapping.
    let workload = start_with(limited(2, 4, OrcaForm::Json)).await;
    let (status, response) = get(workload.addr, Version::HTTP_11, "/work?ms=0").await;
    assert_eq!(status, StatusCode::OK);
    let value = response.headers()["endpoint-load-metrics"].to_str().unwrap();
    let json: serde_json::Value = serde_json::from_str(value.strip_prefix("JSON ").unwrap()).unwrap();
    assert_eq!(json["named_metrics"]["cognitive_load"], 0.0);
    assert_eq!(json["application_utilization"], 0.0);
    assert_eq!(json["cpu_utilization"], 0.0);
    assert_eq!(json["rps_fractional"], 1.0);
    workload.shutdown().await;

    // BIN: base64 of the proto, on every response (here a 404).
    let workload = start_with(limited(2, 4, OrcaForm::Bin)).await;
    let (status, response) = get(workload.addr, Version::HTTP_2, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let value = response.headers()["endpoint-load-metrics"].to_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.strip_prefix("BIN ").unwrap())
        .unwrap();
    let report = <OrcaLoadReport as prost::Message>::decode(bytes.as_slice()).unwrap();
    assert_eq!(report.named_metrics["cognitive_load"], 0.0);
    workload.shutdown().await;

    // None, and an unlimited workload: no report at all.
    for sim in [limited(2, 4, OrcaForm::None), SimConfig::default()] {
        let workload = start_with(sim).await;
        let (status, response) = get(workload.addr, Version::HTTP_11, "/work?ms=0").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response.body().as_ref(), b"done");
        assert!(!response.headers().contains_key("endpoint-load-metrics"));
        workload.shutdown().await;
    }
}

/// The load in an `endpoint-load-metrics-bin` gRPC trailer.
fn trailer_load(metadata: &tonic::metadata::MetadataMap) -> OrcaLoadReport {
    let value = metadata
        .get_bin("endpoint-load-metrics-bin")
        .expect("a load report trailer");
    let bytes = value.to_bytes().unwrap();
    <OrcaLoadReport as prost::Message>::decode(bytes.as_ref()).unwrap()
}

#[tokio::test]
async fn grpc_infer_takes_a_slot_and_reports_in_trailers() {
    let workload = start_with(limited(1, 0, OrcaForm::Text)).await;
    let mut client = grpc_client(workload.addr).await;
    let slow = InferRequest {
        prompt: "slow".into(),
        work_ms: 1000,
        ..Default::default()
    };
    let busy = tokio::spawn({
        let mut client = client.clone();
        async move { client.infer(slow).await }
    });
    wait_stat(workload.addr, "busy", 1).await;

    let refused = client
        .infer(InferRequest {
            prompt: "second".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(refused.message(), "queue full");
    assert_eq!(
        trailer_load(refused.metadata()).named_metrics["cognitive_load"],
        1.0
    );

    let reply = busy.await.unwrap().unwrap();
    // Sent after the slot was released.
    let report = trailer_load(reply.metadata());
    assert_eq!(report.named_metrics["cognitive_load"], 0.0);
    assert_eq!(report.rps_fractional, 1.0);
    assert_eq!(reply.into_inner().text, "echo: slow");
    let stats = stats(workload.addr).await;
    assert_eq!((&stats["completed"], &stats["rejected"]), (&1.into(), &1.into()));
    workload.shutdown().await;
}

#[tokio::test]
async fn admin_faults_stall_and_delay() {
    let workload = start_with(limited(4, 4, OrcaForm::Text)).await;
    let addr = workload.addr;
    let post = |path: &'static str| request(addr, Version::HTTP_11, Method::POST, path);

    let (status, response) = get(addr, Version::HTTP_11, "/admin/stall?for_ms=300").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    let (status, response) = post("/admin/stall?for_ms=1000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"stalled for 1000 ms");

    // A request in the window hangs without a slot, then is served.
    let stalled = tokio::spawn(get(addr, Version::HTTP_11, "/work?ms=0"));
    wait_stat(addr, "stalled", 1).await;
    assert_eq!(stats(addr).await["busy"], 0);
    let (status, response) = stalled.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"done");
    assert_eq!(stats(addr).await["stalled"], 0);

    let (status, response) = post("/admin/delay?ms=50&for_ms=1000").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"delay 50 ms for 1000 ms");
    let (status, response) = post("/admin/delay?ms=0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.body().as_ref(), b"delay cleared");
    assert_eq!(post("/admin/delay").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(post("/admin/stall?for_ms=x").await.0, StatusCode::BAD_REQUEST);

    // A stall longer than the test ends with the workload's shutdown.
    post("/admin/stall?for_ms=600000").await;
    let stuck = tokio::spawn(get(addr, Version::HTTP_11, "/work?ms=0"));
    wait_stat(addr, "stalled", 1).await;
    workload.shutdown().await;
    let (status, response) = stuck.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.body().as_ref(), b"shutting down");
}
