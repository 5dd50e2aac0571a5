//! cogmesh-proxy: the sidecar of the cogmesh service mesh.
//!
//! The request path (see `DESIGN.md`): [`server`] accepts connections and serves HTTP/1.1 and
//! HTTP/2 with hyper; [`forward`] routes each request ([`route`]) to a service, picks an endpoint
//! ([`balance`]) and sends it on the shared upstream pool; [`metrics`] and [`admin`] make it
//! observable; [`config`] describes it all. Routes may compress ([`compress`]) and cache
//! ([`cache`]) responses. [`tls`] terminates and originates TLS (sidecar-to-sidecar mTLS) and
//! authorizes peers by identity.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod balance;
pub mod breaker;
pub mod cache;
pub mod codec;
pub mod compress;
pub mod config;
pub mod control;
pub mod error;
pub mod forward;
pub mod hardening;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod observe;
pub mod otel;
pub mod outlier;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod route;
pub mod security_headers;
pub mod server;
pub mod tls;
pub mod transparent;
pub mod worker;
