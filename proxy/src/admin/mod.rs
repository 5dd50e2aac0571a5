//! The admin server (default `127.0.0.1:4191`, localhost only): `GET /live`, `GET /ready`,
//! `GET /metrics` (Prometheus text) and `GET /config` (the effective configuration and the
//! current routing table as JSON), `GET`/`PUT /log-level` (see [`log_level`]: the one
//! mutation, served on a loopback admin address only).

pub mod log_level;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::server::State;

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    if req.uri().path() == "/log-level" && req.method() == Method::PUT {
                        let enabled = state.config.load().admin_mutations;
                        return Ok::<_, Infallible>(put_log_level(req, enabled, loopback).await);
                    }
                    Ok::<_, Infallible>(respond(&state, &req))
                }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                debug!("admin connection ended: {e}");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn respond(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served here (and PUT on /log-level)\n",
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, state.metrics.encode()),
        "/log-level" => match log_level::current() {
            Some(filter) => text(StatusCode::OK, "text/plain", format!("{filter}\n")),
            None => text(
                StatusCode::NOT_IMPLEMENTED,
                "text/plain",
                "no changeable log filter\n",
            ),
        },
        "/config" => {
            let table = state.table.load();
            let body = serde_json::json!({
                "config": &**state.config.load(),
                "last_reload": &*state.last_reload.lock().unwrap_or_else(|p| p.into_inner()),
                "routing_table": table.snapshot(),
            });
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).unwrap_or_default(),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /live, /ready, /metrics, /config or /log-level\n",
        ),
    }
}

/// The longest filter `PUT /log-level` reads.
const MAX_LOG_FILTER_BYTES: usize = 4096;

/// `PUT /log-level`: the body is the new filter.
async fn put_log_level(req: Request<Incoming>, enabled: bool, loopback: bool) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    if !enabled {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "changing the log level is off: set `admin_mutations: true` in proxy.yaml\n",
        );
    }
    if !loopback {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "changing the log level is served on a loopback admin address only\n",
        );
    }
    let body = http_body_util::Limited::new(req.into_body(), MAX_LOG_FILTER_BYTES);
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let reason = format!("the filter must be at most {MAX_LOG_FILTER_BYTES} bytes\n");
            return text(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", reason);
        }
    };
    let Ok(filter) = std::str::from_utf8(&bytes) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "the filter must be UTF-8\n",
        );
    };
    match log_level::set(filter) {
        Ok(()) => {
            tracing::info!(
                filter = filter.trim(),
                "log filter changed through the admin server"
            );
            text(StatusCode::OK, "text/plain", format!("{}\n", filter.trim()))
        }
        Err(log_level::Refused::NotInstalled) => text(
            StatusCode::NOT_IMPLEMENTED,
            "text/plain",
            "no changeable log filter\n",
        ),
        Err(log_level::Refused::Invalid(reason)) => text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("invalid log filter: {reason}\n"),
        ),
    }
}
