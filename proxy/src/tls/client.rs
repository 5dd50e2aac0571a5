//! TLS origination to a service's endpoints: SNI, the server's certificate verified against the
//! trust bundle in force and checked for the expected SPIFFE identity (or, without one, for the
//! server name), and the sidecar's own certificate presented (mTLS).
//!
//! One [`ServiceTlsClient`] per service with `tls`, built with the routing table; its rustls
//! configuration reads the [`IdentityStore`] at each handshake, so rotations need no rebuild.
//! HTTP/1.1 connections are opened by the pool ([`connect`]); HTTP/2 goes through pooled hyper
//! clients per endpoint, whose connector is [`TlsConnector`]: hyper's client sends its URI's
//! authority as `:authority` and pools connections by it, so the URI carries the client's
//! authority and the connector dials its endpoint whatever that says.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use super::authz::IdentityPattern;
use super::metrics::{FailureReason, Side};
use super::server::CurrentCert;
use super::{IdentityStore, ServiceTls, TlsMetrics};

/// The server presented a valid certificate for another identity.
#[derive(Debug, thiserror::Error)]
#[error("the server's identity {} is not the expected {expected}", got.as_deref().unwrap_or("(none: no SPIFFE URI SAN)"))]
pub struct IdentityMismatch {
    pub expected: String,
    pub got: Option<String>,
}

/// What origination needs from the process: the identity and the metrics.
#[derive(Clone, Debug)]
pub struct Origin {
    pub store: Arc<IdentityStore>,
    pub metrics: TlsMetrics,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Origin {
    /// Loads the sidecar's identity for a configuration with `tls`; errors name the file
    /// (`file`, the configuration's), the field and the reason.
    pub fn load(
        tls: &super::TlsConfig,
        config: &crate::config::ProxyConfig,
        metrics: &TlsMetrics,
        file: &str,
    ) -> Result<Origin, crate::config::ConfigError> {
        let error = |field: String, reason: String| crate::config::ConfigError {
            file: file.to_string(),
            field,
            reason,
        };
        let files = tls.files().map_err(|(field, reason)| error(field, reason))?;
        let store = IdentityStore::load(files, metrics.clone(), true)
            .map_err(|e| error(e.field, format!("{}: {}", e.path, e.reason)))?;
        Ok(Origin {
            store,
            metrics: metrics.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            idle_timeout: Duration::from_millis(config.pool_idle_timeout_ms),
        })
    }
}

/// The TLS client of one service.
pub struct ServiceTlsClient {
    pub settings: ServiceTls,
    /// The rustls configuration offering ALPN `http/1.1` only (the pool already chose the
    /// protocol).
    http1_config: Arc<ClientConfig>,
    /// The same offering ALPN `h2` only, for the HTTP/2 clients.
    http2_config: Arc<ClientConfig>,
    origin: Origin,
    /// HTTP/2 clients of each endpoint, made on its first HTTP/2 request. Read on every request
    /// without a lock; an endpoint seen for the first time copies the map.
    http2: ArcSwap<HashMap<SocketAddr, Http2Clients>>,
}

impl ServiceTlsClient {
    pub fn new(settings: &ServiceTls, origin: Origin) -> ServiceTlsClient {
        let provider = super::provider();
        let verifier = Arc::new(PeerVerifier {
            store: Arc::clone(&origin.store),
            provider: Arc::clone(&provider),
            identity: settings
                .identity
                .as_ref()
                .and_then(|p| Some((IdentityPattern::parse(p).ok()?, p.clone()))),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = if settings.client_cert {
            builder.with_client_cert_resolver(Arc::new(CurrentCert(Arc::clone(&origin.store))))
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(config);
        ServiceTlsClient {
            settings: settings.clone(),
            http1_config: with_alpn(&config, b"http/1.1"),
            http2_config: with_alpn(&config, b"h2"),
            origin,
            http2: ArcSwap::default(),
        }
    }

    /// The name sent as SNI and checked without an expected identity.
    fn server_name(&self, endpoint: SocketAddr) -> ServerName<'static> {
        self.settings
            .server_name
            .as_ref()
            .and_then(|n| ServerName::try_from(n.clone()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(endpoint.ip().into()))
    }

    /// The HTTP/2 clients of `endpoint`, one per connection it may have: each worker has
    /// [`crate::forward::MAX_HTTP2_CONNECTIONS`] of its own, so that a connection's task runs
    /// on the worker that sends on it. hyper pools by authority, so requests naming different
    /// authorities get connections of their own.
    pub fn http2_clients(&self, endpoint: SocketAddr) -> Http2Clients {
        if let Some(clients) = self.http2.load().get(&endpoint) {
            return Arc::clone(clients);
        }
        let connector = TlsConnector {
            config: Arc::clone(&self.http2_config),
            tls: Arc::new(self.handshaker()),
            endpoint,
        };
        let made: Http2Clients = (0..crate::forward::MAX_HTTP2_CONNECTIONS * crate::worker::count())
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .pool_idle_timeout(self.origin.idle_timeout)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector.clone())
            })
            .collect();
        // Two workers may make them at once: the first stored wins.
        self.http2.rcu(|clients| {
            let mut clients = HashMap::clone(clients);
            clients.entry(endpoint).or_insert_with(|| Arc::clone(&made));
            clients
        });
        self.http2.load().get(&endpoint).map_or(made, Arc::clone)
    }

    fn handshaker(&self) -> Handshaker {
        Handshaker {
            metrics: self.origin.metrics.clone(),
            connect_timeout: self.origin.connect_timeout,
            server_name: self.settings.server_name.clone(),
        }
    }

    /// Opens a TCP connection to `endpoint` and completes the TLS handshake for HTTP/1.1.
    pub async fn connect_http1(&self, endpoint: SocketAddr) -> Result<TlsStream<TcpStream>, String> {
        self.handshaker()
            .connect(
                Arc::clone(&self.http1_config),
                endpoint,
                self.server_name(endpoint),
            )
            .await
    }
}

/// `config` offering one ALPN protocol.
fn with_alpn(config: &ClientConfig, protocol: &[u8]) -> Arc<ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![protocol.to_vec()];
    Arc::new(config)
}

/// Connects and handshakes, counting and logging the outcome.
#[derive(Clone)]
struct Handshaker {
    metrics: TlsMetrics,
    connect_timeout: Duration,
    server_name: Option<String>,
}

impl Handshaker {
    async fn connect(
        &self,
        config: Arc<ClientConfig>,
        endpoint: SocketAddr,
        name: ServerName<'static>,
    ) -> Result<TlsStream<TcpStream>, String> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "connect timed out after {} ms",
                    self.connect_timeout.as_millis()
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp)).await;
        let (reason, err) = match handshake {
            Ok(Ok(tls)) => {
                self.metrics
                    .handshake(Side::Client, tls.get_ref().1.protocol_version());
                return Ok(tls);
            }
            Ok(Err(e)) => (FailureReason::of_io(&e), describe(&e)),
            Err(_) => (
                FailureReason::Timeout,
                format!("no TLS handshake within {} ms", self.connect_timeout.as_millis()),
            ),
        };
        self.metrics.failure(Side::Client, reason);
        warn!(%endpoint, reason = reason.as_str(), "TLS handshake with the upstream refused: {err}");
        Err(format!("TLS handshake failed ({}): {err}", reason.as_str()))
    }
}

/// A handshake error as an operator reads it (rustls shows our own verifier's errors with
/// their `Debug` form).
fn describe(err: &std::io::Error) -> String {
    match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => err.to_string(),
    }
}

/// The HTTP/2 clients of one endpoint, one per connection it may have, worker by worker (see
/// [`crate::forward::MAX_HTTP2_CONNECTIONS`]).
pub type Http2Clients = Arc<[Client<TlsConnector, crate::forward::UpstreamBody>]>;

/// The connector of an endpoint's HTTP/2 clients: TCP to the endpoint (not to the URI's
/// authority, which is the client's), then TLS with ALPN h2.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    tls: Arc<Handshaker>,
    endpoint: SocketAddr,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TlsConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConnection, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let config = Arc::clone(&self.config);
        let tls = Arc::clone(&self.tls);
        let endpoint = self.endpoint;
        Box::pin(async move {
            let name = tls
                .server_name
                .as_ref()
                .and_then(|n| ServerName::try_from(n.clone()).ok())
                .unwrap_or_else(|| ServerName::IpAddress(endpoint.ip().into()));
            let stream = tls
                .connect(config, endpoint, name)
                .await
                .map_err(std::io::Error::other)?;
            Ok(TlsConnection(TokioIo::new(stream)))
        })
    }
}

/// A client TLS connection as hyper's pooled client wants it.
pub struct TlsConnection(TokioIo<TlsStream<TcpStream>>);

impl Connection for TlsConnection {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        match self.0.inner().get_ref().1.alpn_protocol() {
            Some(b"h2") => connected.negotiated_h2(),
            _ => connected,
        }
    }
}

impl hyper::rt::Read for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// Verifies the server's chain against the trust bundle in force, then its SPIFFE identity
/// (or, without an expected identity, the server name).
#[derive(Debug)]
struct PeerVerifier {
    store: Arc<IdentityStore>,
    provider: Arc<CryptoProvider>,
    /// The pattern and its text, for the error.
    identity: Option<(IdentityPattern, String)>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let identity = self.store.current();
        let Some(roots) = identity.roots.as_ref() else {
            return Err(rustls::Error::General(
                "no trust bundle to verify the server".into(),
            ));
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match &self.identity {
            Some((pattern, expected)) => {
                let got = super::identity::leaf_facts(end_entity)
                    .ok()
                    .and_then(|f| f.spiffe_id);
                if !got.as_deref().is_some_and(|g| pattern.matches(g)) {
                    let mismatch = IdentityMismatch {
                        expected: expected.clone(),
                        got,
                    };
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                        rustls::OtherError(Arc::new(mismatch)),
                    )));
                }
            }
            None => rustls::client::verify_server_name(&cert, server_name)?,
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
