//! ORCA load reports through the proxy, against a real hyper upstream started by the test that
//! answers with each report form: the proxy records the endpoint's load (visible in
//! `endpoint_load` on /metrics), counts accepted and rejected reports, strips the report from what
//! the client sees, and never fails a request because of a malformed report.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use cogmesh_e2e::{metric_value, Proxy};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// Answers `/report?h=VALUE` with `endpoint-load-metrics: VALUE`, and `/trailer?t=VALUE` with a
/// body followed by the trailer `endpoint-load-metrics-bin: VALUE` (as gRPC does).
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let query = req.uri().query().unwrap_or_default().to_string();
                    let value = query.split_once('=').map(|(_, v)| decode(v)).unwrap_or_default();
                    let mut frames = vec![Ok(Frame::data(Bytes::from_static(b"ok")))];
                    let mut resp = Response::builder();
                    if req.uri().path() == "/report" {
                        resp = resp.header("endpoint-load-metrics", value);
                    } else {
                        resp = resp.header("content-type", "application/grpc");
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("0"));
                        t.insert(
                            "endpoint-load-metrics-bin",
                            HeaderValue::from_str(&value).unwrap(),
                        );
                        frames.push(Ok(Frame::trailers(t)));
                    }
                    let body: StreamBody<Frames> = StreamBody::new(futures_util::stream::iter(frames));
                    Ok::<_, Infallible>(resp.body(body).unwrap())
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Percent-encodes everything but ASCII letters and digits.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_are_read_counted_and_stripped() {
    let up = upstream().await;
    let proxy = Proxy::quick(&[up], &[]);
    let h1 = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let endpoint_load = format!(r#"endpoint_load{{service="upstream",endpoint="{up}"}}"#);

    // TEXT, JSON and BIN forms on HTTP/1.1; each sets the endpoint's load.
    let bin_07 = "CQAAAAAAAOA/QhkKDmNvZ25pdGl2ZV9sb2FkEWZmZmZmZuY/"; // cpu 0.5, cognitive_load 0.7
    let cases = [
        (
            "TEXT named_metrics.cognitive_load=0.42, cpu_utilization=0.9".to_string(),
            0.42,
        ),
        (r#"JSON {"application_utilization":0.33}"#.to_string(), 0.33),
        (format!("BIN {bin_07}"), 0.7),
    ];
    for (value, expected) in cases {
        let url = proxy.url(&format!("/report?h={}", encode(&value)));
        let resp = h1.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers().get("endpoint-load-metrics").is_none(),
            "the report reached the client"
        );
        resp.into_body().collect().await.unwrap();
        let m = proxy.metrics();
        assert_eq!(metric_value(&m, &endpoint_load), Some(expected), "{value}: {m}");
    }

    // Garbage and NaN: the request still succeeds, the report is counted as rejected and the
    // last good load stays.
    for bad in ["TEXT cpu_utilization=NaN", "garbage", "BIN ***"] {
        let url = proxy.url(&format!("/report?h={}", encode(bad)));
        let resp = h1.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200, "{bad}");
        resp.into_body().collect().await.unwrap();
    }
    let m = proxy.metrics();
    assert_eq!(metric_value(&m, &endpoint_load), Some(0.7), "{m}");
    let counted = |result: &str| {
        metric_value(
            &m,
            &format!(r#"load_report_total{{direction="outbound",service="upstream",result="{result}"}}"#),
        )
    };
    assert_eq!(counted("accepted"), Some(3.0), "{m}");
    assert_eq!(counted("rejected"), Some(3.0), "{m}");

    // The gRPC trailer form over HTTP/2; the trailer is stripped, grpc-status kept.
    let bin_02 = "QhkKDmNvZ25pdGl2ZV9sb2FkEZqZmZmZmck/"; // cognitive_load 0.2
    let resp = h2
        .get(
            proxy
                .url(&format!("/trailer?t={}", encode(bin_02)))
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(
        trailers.get("endpoint-load-metrics-bin").is_none(),
        "{trailers:?}"
    );
    let m = proxy.metrics();
    assert_eq!(metric_value(&m, &endpoint_load), Some(0.2), "{m}");
}
