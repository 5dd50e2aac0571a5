//! HTTP/2 cleartext (prior knowledge) and gRPC through the proxy: 100 concurrent h2c streams;
//! unary, server-, client- and bidi-streaming calls with a tonic client, and with Python grpcio
//! as client and as server; non-OK `grpc-status` with its message passed through; upstream
//! connections replaced and closed, one per worker; uploads from both workers at once; a
//! client's reset and a drain with streams in flight.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use cogmesh_e2e::{
    counting_upstream, eventually, free_addr, python, python_json, repo_root, start_workload, wait_tcp,
    ConnectionEnd, Proc, Proxy,
};
use cogmesh_proto::v1::workload_client::WorkloadClient;
use cogmesh_proto::v1::InferRequest;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_100_concurrent_streams() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let mut calls = Vec::new();
    for i in 0..100 {
        let client = client.clone();
        let url = proxy.url(&format!("/sleep?ms={}", 200 + i % 7));
        calls.push(tokio::spawn(async move {
            let resp = client.get(url.parse().unwrap()).await.expect("h2c request");
            let status = resp.status();
            let version = resp.version();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, version, body)
        }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let (status, version, body) = c.await.unwrap();
        assert_eq!(status, 200, "stream {i}");
        assert_eq!(version, http::Version::HTTP_2);
        assert_eq!(body, format!("slept {} ms", 200 + i % 7));
    }
    // The upstream hop spoke HTTP/2 too (the protocol follows the client's).
    let resp = client.get(proxy.url("/headers").parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
}

/// Uploads from many client connections at once, so that with two workers both write to
/// their upstream HTTP/2 connections, many streams on each (the kernel spreads the eight client
/// connections over the workers' listeners): 64 streams each send 256 KiB of their own pattern
/// to the
/// workload's `/echo`, past the 64 KiB stream window, and each gets exactly its bytes back.
/// Frames written out of order, lost or mixed on the upstream connection show as a protocol
/// error, a stream with no answer (60 s) or a body that differs. (How often two writers meet
/// in one run depends on timing: a probe counted zero to a few times per run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_from_both_workers_share_the_upstream_connection_intact() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &["--workers", "2"]);
    let mut calls = Vec::new();
    for conn in 0..8u8 {
        // A client of its own: its own TCP connection to the proxy.
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Full<Bytes>>();
        for stream in 0..8u8 {
            let (client, url) = (client.clone(), proxy.url("/echo"));
            let body: Bytes = (0..256 * 1024)
                .map(|i: u32| (i as u8).wrapping_mul(conn + 1).wrapping_add(stream))
                .collect();
            calls.push(tokio::spawn(async move {
                let req = http::Request::post(url)
                    .body(http_body_util::Full::new(body.clone()))
                    .unwrap();
                let resp = client.request(req).await.expect("h2c upload");
                assert_eq!(resp.status(), 200);
                let echoed = resp.into_body().collect().await.expect("echo body").to_bytes();
                (body, echoed)
            }));
        }
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (sent, echoed) = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .unwrap_or_else(|_| panic!("stream {i}: no answer within 60 s"))
            .unwrap();
        assert_eq!(echoed.len(), sent.len(), "stream {i}: length");
        assert!(echoed == sent, "stream {i}: the echo differs from what was sent");
    }
}

async fn tonic_client(proxy: &Proxy) -> WorkloadClient<Channel> {
    let channel = Channel::from_shared(proxy.url(""))
        .unwrap()
        .connect()
        .await
        .expect("tonic connects to the proxy");
    WorkloadClient::new(channel)
}

fn request(prompt: &str) -> InferRequest {
    InferRequest {
        prompt: prompt.into(),
        ..Default::default()
    }
}

/// Runs every call shape against whatever serves Workload behind `proxy`.
async fn exercise_tonic(proxy: &Proxy, served_by: &str) {
    let mut client = tonic_client(proxy).await;

    let reply = client.infer(request("hi")).await.expect("unary").into_inner();
    assert_eq!(reply.text, "echo: hi");
    assert_eq!(reply.served_by, served_by);

    let mut stream = client
        .generate(InferRequest {
            count: 5,
            ..request("g")
        })
        .await
        .expect("server streaming")
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(r) = stream.message().await.expect("stream message") {
        seqs.push(r.seq);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    let up = tokio_stream::iter(["a", "b", "c"].map(request));
    let reply = client.upload(up).await.expect("client streaming").into_inner();
    assert_eq!(reply.text, "a,b,c");
    assert_eq!(reply.seq, 3);

    // Bidi: send one, read one, so the exchange really interleaves through the proxy.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .converse(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..5u64 {
        tx.send(request(&format!("m{i}"))).await.unwrap();
        let r = replies.message().await.unwrap().expect("a reply per message");
        assert_eq!((r.text.as_str(), r.seq), (format!("echo: m{i}").as_str(), i));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    let status = client
        .infer(InferRequest {
            fail_code: tonic::Code::NotFound as i32,
            fail_message: "no such model".into(),
            ..request("x")
        })
        .await
        .expect_err("a non-OK status");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "no such model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tonic_client_and_server() {
    let upstream = start_workload("rust-workload");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    exercise_tonic(&proxy, "rust-workload").await;
}

fn peer_script() -> std::path::PathBuf {
    repo_root().join("tests/python/grpc_peer.py")
}

fn python_client(target: std::net::SocketAddr, case: &str) -> serde_json::Value {
    let target = target.to_string();
    python_json("grpc_peer.py", &["client", "--target", &target, "--case", case])
}

#[test]
fn grpc_python_client_through_the_proxy() {
    let upstream = start_workload("rust-workload");
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let unary = python_client(proxy.listen, "unary");
    assert_eq!(unary["text"], "echo: hi", "{unary}");
    assert_eq!(unary["served_by"], "rust-workload", "{unary}");
    let bidi = python_client(proxy.listen, "bidi");
    assert_eq!(bidi["seqs"], serde_json::json!([0, 1, 2, 3, 4]), "{bidi}");
    let error = python_client(proxy.listen, "error");
    assert_eq!(error["code"], "NOT_FOUND", "{error}");
    assert_eq!(error["details"], "no such model", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tonic_client_to_python_server() {
    let addr = free_addr();
    let mut server = Proc::spawn(
        "python grpc server",
        Command::new(python()).arg(peer_script()).args([
            "server",
            "--port",
            &addr.port().to_string(),
            "--name",
            "python-workload",
        ]),
    );
    wait_tcp(addr, &mut server);
    let proxy = Proxy::quick(&[addr], &[]);
    exercise_tonic(&proxy, "python-workload").await;
}

/// With the relay off, the first bytes of a connection still tell HTTP/2 from HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_http1_relay_h2c_and_http1_are_both_served() {
    let upstream = start_workload("w1");
    let proxy = Proxy::quick(&[upstream.addr], &["--no-http1-relay"]);
    let resp = h2c_client()
        .get(proxy.url("/headers").parse().unwrap())
        .await
        .expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    let listen = proxy.listen;
    let (status, body) = tokio::task::spawn_blocking(move || cogmesh_e2e::http_get(listen, "/headers"))
        .await
        .unwrap()
        .expect("HTTP/1.1 request");
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
}

async fn concurrent_h2(proxy: &Proxy, n: usize) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let url = proxy.url("/");
            tokio::spawn(async move { client.get(url.parse().unwrap()).await.map(|r| r.status()) })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().expect("h2c request"), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_upstream_connection_opens_per_stream_limit() {
    // Requests answered after 300 ms, so concurrent ones overlap.
    let delay = Duration::from_millis(300);
    // Default limit (100 streams per connection): 30 concurrent streams share one connection.
    let upstream = counting_upstream(true, delay, ConnectionEnd::Never).await;
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    concurrent_h2(&proxy, 30).await;
    assert_eq!(upstream.accepted(), 1);

    // 10 streams per connection: 30 concurrent streams need more than one connection, and never
    // more than the cap of 8.
    let upstream = counting_upstream(true, delay, ConnectionEnd::Never).await;
    let proxy = Proxy::quick(&[upstream.addr], &["--http2-streams-per-connection", "10"]);
    concurrent_h2(&proxy, 30).await;
    let n = upstream.accepted();
    assert!((2..=8).contains(&n), "{n} upstream connections");
}

/// With two workers, each opens an HTTP/2 connection of its own to the endpoint and keeps
/// using it: 40 h2c client connections, one request each, spread over the workers by
/// `SO_REUSEPORT` (all 40 on one worker has odds of 2^-39), make exactly two upstream
/// connections. A worker does not send on the other's connection, whose task (reading the
/// responses) runs on the other worker's thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_opens_its_own_upstream_h2_connection() {
    let upstream = counting_upstream(true, Duration::ZERO, ConnectionEnd::Never).await;
    let proxy = Proxy::quick(&[upstream.addr], &["--workers", "2"]);
    for i in 0..40 {
        // A client of its own: a new TCP connection to the proxy.
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Empty<Bytes>>();
        let resp = client.get(proxy.url("/").parse().unwrap()).await;
        assert_eq!(resp.expect("h2c request").status(), 200, "request {i}");
    }
    let n = upstream.accepted();
    assert_eq!(
        n, 2,
        "{n} upstream connections for 40 h2c requests from two workers"
    );
}

/// An HTTP/2 connection the upstream closed is replaced by the next request, which succeeds;
/// the streams that arrive together while it opens share the one new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_h2_connection_the_upstream_closed_is_replaced() {
    let upstream = counting_upstream(
        true,
        Duration::from_millis(20),
        ConnectionEnd::Dropped(Duration::from_millis(150)),
    )
    .await;
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    for round in 1..=4 {
        concurrent_h2(&proxy, 5).await;
        assert_eq!(upstream.accepted(), round, "connections after round {round}");
        // Past the upstream's connection lifetime: the pooled connection is closed by now.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// An HTTP/2 connection unused for the pool's idle timeout is closed; the next request opens
/// another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_h2_connections_close_after_the_idle_timeout() {
    let upstream = counting_upstream(true, Duration::ZERO, ConnectionEnd::Never).await;
    let proxy = upstream.proxy_with_idle_timeout(300);
    concurrent_h2(&proxy, 3).await;
    assert_eq!(upstream.accepted(), 1);
    upstream.wait_until_all_closed();
    concurrent_h2(&proxy, 3).await;
    assert_eq!(upstream.accepted(), 2);
}

/// An HTTP/2 connection on which the upstream sent GOAWAY takes no new streams: a request that
/// comes after it goes on a new connection and succeeds, and the request already in flight on
/// the old one is still answered there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_h2_connection_that_sent_goaway_is_replaced() {
    // Answers after 1.5 s; GOAWAY 300 ms after a connection opens.
    let end = ConnectionEnd::GracefulAfter(Duration::from_millis(300));
    let upstream = counting_upstream(true, Duration::from_millis(1500), end).await;
    let proxy = Proxy::quick(&[upstream.addr], &[]);
    let in_flight = concurrent_h2(&proxy, 1);
    let after_goaway = async {
        // Well after the first connection's GOAWAY, well before its answer.
        while upstream.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        concurrent_h2(&proxy, 1).await;
    };
    tokio::join!(in_flight, after_goaway);
    assert_eq!(
        upstream.accepted(),
        2,
        "the request after GOAWAY opened a new connection"
    );
}

fn h2c_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_in_flight_h2_streams_then_exits_0() {
    let upstream = start_workload("w1");
    let mut proxy = Proxy::quick(&[upstream.addr], &["--workers", "2"]);
    let client = h2c_client();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("/sleep?ms=1500"));
            tokio::spawn(async move {
                let resp = client.get(url.parse().unwrap()).await.expect("h2c request");
                let status = resp.status();
                (status, resp.into_body().collect().await.unwrap().to_bytes())
            })
        })
        .collect();
    eventually("six streams in flight", Duration::from_secs(20), || {
        (proxy.endpoint_in_flight() == 6).then_some(())
    });
    proxy.proc.signal("TERM");
    for c in calls {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "slept 1500 ms");
    }
    proxy.assert_drains_and_exits_0();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_the_client_resets_cancels_its_upstream_request() {
    let upstream = start_workload("w1");
    // No response timeout: only the reset can end the request early.
    let proxy = Proxy::quick(&[upstream.addr], &["--response-timeout-ms", "0"]);
    let client = h2c_client();
    let url = proxy.url("/sleep?ms=60000");
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.get(url.parse().unwrap()).await.map(|r| r.status()) }
    });
    eventually("the stream in flight", Duration::from_secs(20), || {
        (proxy.endpoint_in_flight() == 1).then_some(())
    });
    // Dropping the response future resets the stream (RST_STREAM, CANCEL).
    call.abort();
    // The upstream would answer after a minute; the proxy gives the request up at once.
    eventually("the request given up", Duration::from_secs(20), || {
        (proxy.endpoint_in_flight() == 0).then_some(())
    });
    let resp = client
        .get(proxy.url("/").parse().unwrap())
        .await
        .expect("h2c request");
    assert_eq!(resp.status(), 200, "the connection still serves");
}
