//! TLS termination on a listener: the handshake (with a timeout), ALPN `h2` and `http/1.1`,
//! client certificates verified against the trust bundle in force, and the peer's SPIFFE
//! identity for authorization.
//!
//! The certificate and the client verifier are looked up in the [`IdentityStore`] at each
//! handshake, so a rotated identity is used by the next connection while open ones go on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use super::authz::PeerIdentity;
use super::metrics::{FailureReason, Side};
use super::{ClientAuth, IdentityStore, ListenerTls, TlsMetrics};

/// ALPN protocols a listener offers, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS side of one listener.
pub struct ListenerAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    metrics: TlsMetrics,
    listener: String,
    handshake_timeout: Duration,
}

impl ListenerAcceptor {
    pub fn new(config: &ListenerTls, store: Arc<IdentityStore>, metrics: TlsMetrics, listener: &str) -> Self {
        let provider = super::provider();
        let versions: &[&rustls::SupportedProtocolVersion] = if config.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .expect("the ring provider supports TLS 1.2 and 1.3");
        let resolver = Arc::new(CurrentCert(Arc::clone(&store)));
        let mut server = match config.client_auth {
            ClientAuth::None => builder.with_no_client_auth().with_cert_resolver(resolver),
            auth => builder
                .with_client_cert_verifier(Arc::new(CurrentClientVerifier {
                    store,
                    provider,
                    mandatory: auth == ClientAuth::Required,
                }))
                .with_cert_resolver(resolver),
        };
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        ListenerAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            metrics,
            listener: listener.to_string(),
            handshake_timeout: Duration::from_millis(super::HANDSHAKE_TIMEOUT_MS),
        }
    }

    /// Completes the handshake and names the peer; `None` (logged and counted) if it failed.
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TlsStream<TcpStream>, PeerIdentity)> {
        let result = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream)).await;
        let (reason, err) = match result {
            Ok(Ok(tls)) => {
                let conn = tls.get_ref().1;
                self.metrics.handshake(Side::Server, conn.protocol_version());
                let id: Option<Arc<str>> = conn
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| super::identity::leaf_facts(leaf).ok())
                    .and_then(|facts| facts.spiffe_id)
                    .map(Arc::from);
                return Some((tls, PeerIdentity::new(id)));
            }
            Ok(Err(e)) => (FailureReason::of_io(&e), e.to_string()),
            Err(_) => (
                FailureReason::Timeout,
                format!("no handshake within {:?}", self.handshake_timeout),
            ),
        };
        self.metrics.failure(Side::Server, reason);
        if reason == FailureReason::Io {
            // Probes and clients that hang up early: not worth a warning each.
            debug!(listener = %self.listener, %peer, reason = reason.as_str(), "TLS handshake failed: {err}");
        } else {
            warn!(listener = %self.listener, %peer, reason = reason.as_str(), "TLS handshake refused: {err}");
        }
        None
    }
}

/// The identity each listener terminates TLS with (`None` for plaintext listeners): its own
/// certificate files, else the sidecar's identity. Errors name `file`, the field and the reason.
pub fn listener_identities(
    config: &crate::config::ProxyConfig,
    sidecar: Option<&Arc<IdentityStore>>,
    metrics: &TlsMetrics,
    file: &str,
) -> Result<Vec<Option<Arc<IdentityStore>>>, crate::config::ConfigError> {
    let error = |field: String, reason: String| crate::config::ConfigError {
        file: file.to_string(),
        field,
        reason,
    };
    let mut stores = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let store = match l.tls.as_ref().map(|t| t.own_files(i, config.tls.as_ref())) {
            None => None,
            Some(None) => sidecar.cloned(),
            Some(Some(files)) => {
                let files = files.map_err(|(field, reason)| error(field, reason))?;
                let store = IdentityStore::load(files, metrics.clone(), false)
                    .map_err(|e| error(e.field, format!("{}: {}", e.path, e.reason)))?;
                Some(store)
            }
        };
        stores.push(store);
    }
    Ok(stores)
}

/// Serves the certificate of the identity in force (server and client side alike).
#[derive(Debug)]
pub(super) struct CurrentCert(pub(super) Arc<IdentityStore>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().key))
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates against the trust bundle in force.
#[derive(Debug)]
struct CurrentClientVerifier {
    store: Arc<IdentityStore>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

impl ClientCertVerifier for CurrentClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can rotate under us; clients send their certificate without hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.store.current().client_verifier {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General(
                "no trust bundle for client certificates".into(),
            )),
        }
    }

    handshake_signatures!();
}
