//! TLS for the sidecar: termination on listeners, origination to endpoints, sidecar-to-sidecar
//! mTLS with SPIFFE identities, and identity-based authorization on the inbound side.
//!
//! The sidecar's own identity (certificate chain, key, trust bundle) lives in files, written by
//! the identity client (a CSR to the control plane's CA) or by an operator; [`identity`] loads
//! them, watches them and swaps a new identity in without touching open connections. Everything
//! else reads the identity in force through an [`identity::IdentityStore`]: the server's
//! certificate resolver, the client's certificate resolver and both certificate verifiers, so the
//! rustls configurations are built once and a rotation is one pointer swap.
//!
//! - [`server`]: a listener's TLS acceptor (ALPN `h2`, `http/1.1`), optional or required client
//!   certificates, the peer's SPIFFE identity handed to routing; a listener may have a
//!   certificate of its own (an edge listener's public one), loaded and watched the same way;
//! - [`client`]: origination to a service's endpoints with SNI and a verified server name or
//!   SPIFFE identity, presenting our own identity (mTLS);
//! - [`authz`]: per-route (and per-listener) allowed client identities, 403 otherwise;
//! - [`metrics`]: handshakes by version, failures by reason, identity reloads, denials.
//!
//! rustls with the `ring` provider only (no OpenSSL, nothing to build with cmake or NASM):
//! TLS 1.3 everywhere, TLS 1.2 accepted from external clients on listeners that allow it.
//! Listeners and services without `tls` pay nothing: their path has no TLS branch beyond one
//! `Option` check per connection.

/// The handshake signature checks of a certificate verifier (client or server side): the
/// provider's algorithms, through `self.provider`. Both verifiers differ only in how they check
/// the certificate itself.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

pub mod authz;
pub mod client;
pub mod identity;
pub mod metrics;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::authz::{AuthorizationConfig, PeerIdentity};
pub use self::identity::{Identity, IdentityStore};
pub use self::metrics::TlsMetrics;

/// The file names of an identity directory, as the identity client writes them.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_FILE: &str = "ca.pem";

/// How long a TLS handshake may take on a listener before the connection is closed.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// The crypto provider of every TLS configuration of the proxy: ring's, with
/// `TLS13_AES_128_GCM_SHA256` preferred (as BoringSSL, and so Envoy, does on CPUs with AES
/// instructions): as strong as 256-bit AES for TLS and faster.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// `tls` in proxy.yaml: where the sidecar's identity is. Either `identity_dir` (with
/// `cert.pem`, `key.pem`, `ca.pem`) or the files one by one; a file given explicitly wins over
/// the directory's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
    /// The certificate chain, leaf first (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The trust bundle peers are verified against (PEM); needed for client certificates on
    /// listeners and for origination.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Watch the files and swap a new identity in when they change (default true).
    #[serde(default = "yes")]
    pub watch: bool,
}

fn yes() -> bool {
    true
}

/// The identity files a [`TlsConfig`] names, each with its field path for error messages.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityFiles {
    pub cert: (String, PathBuf),
    pub key: (String, PathBuf),
    pub ca: Option<(String, PathBuf)>,
}

impl TlsConfig {
    /// The files to load, or the field and reason why they cannot be known.
    pub fn files(&self) -> Result<IdentityFiles, (String, String)> {
        let from_dir = |name: &str| self.identity_dir.as_ref().map(|d| d.join(name));
        let pick = |explicit: &Option<PathBuf>, field: &str, name: &str| match (explicit, from_dir(name)) {
            (Some(p), _) => Some((format!("tls.{field}"), p.clone())),
            (None, Some(p)) => Some(("tls.identity_dir".to_string(), p)),
            (None, None) => None,
        };
        let missing = |field: &str| {
            (
                format!("tls.{field}"),
                "is required without tls.identity_dir (a directory with cert.pem, key.pem, ca.pem)"
                    .to_string(),
            )
        };
        Ok(IdentityFiles {
            cert: pick(&self.cert, "cert", CERT_FILE).ok_or_else(|| missing("cert"))?,
            key: pick(&self.key, "key", KEY_FILE).ok_or_else(|| missing("key"))?,
            ca: pick(&self.ca, "ca", CA_FILE),
        })
    }
}

/// `tls` on a listener: terminate TLS with the sidecar's identity, or with a certificate of
/// its own (`cert` and `key`, e.g. a public one for an edge listener; watched like the identity).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Client certificates: `required` (mTLS, the sidecar-to-sidecar default), `optional`
    /// (verified when sent) or `none`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Accept TLS 1.2 as well (for external clients); sidecars always speak TLS 1.3.
    #[serde(default)]
    pub allow_tls12: bool,
    /// The listener's own certificate chain (PEM), instead of the sidecar's identity.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The trust bundle for client certificates; default the sidecar's (`tls.ca`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl ListenerTls {
    /// The listener's own certificate files (listener `i`), if it has them; the trust bundle
    /// falls back to the sidecar's.
    pub fn own_files(
        &self,
        i: usize,
        sidecar: Option<&TlsConfig>,
    ) -> Option<Result<IdentityFiles, (String, String)>> {
        if self.cert.is_none() && self.key.is_none() {
            return None;
        }
        let field = |f: &str| format!("listeners[{i}].tls.{f}");
        let required = |f: &str, p: &Option<PathBuf>| {
            p.clone()
                .map(|p| (field(f), p))
                .ok_or_else(|| (field(f), "is required with a listener certificate".to_string()))
        };
        let files = (|| {
            let ca = match &self.ca {
                Some(p) => Some((field("ca"), p.clone())),
                None => sidecar.map(TlsConfig::files).transpose()?.and_then(|f| f.ca),
            };
            Ok(IdentityFiles {
                cert: required("cert", &self.cert)?,
                key: required("key", &self.key)?,
                ca,
            })
        })();
        Some(files)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
    None,
}

/// `tls` on a service: originate TLS to its endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceTls {
    /// SNI and, without `identity`, the name the server certificate must be valid for.
    /// Default: the endpoint's IP address (no SNI is sent for an IP).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The SPIFFE identity the server must present, exact or a prefix ending in `*`
    /// (`spiffe://cluster.local/ns/prod/*`). With it, the server name is not checked (the
    /// identity is what sidecars authenticate), as in Istio and Linkerd.
    #[serde(default)]
    pub identity: Option<String>,
    /// Present the sidecar's own certificate (mTLS); default true.
    #[serde(default = "yes")]
    pub client_cert: bool,
}

/// Checks the TLS parts of a configuration that need no files: every listener or service
/// with `tls` needs the top-level `tls` identity, and verification needs a trust bundle.
pub fn validate(config: &crate::config::ProxyConfig) -> Result<(), (String, String)> {
    let files = match &config.tls {
        Some(t) => Some(t.files()?),
        None => None,
    };
    let has_ca = files.as_ref().is_some_and(|f| f.ca.is_some());
    for (i, l) in config.listeners.iter().enumerate() {
        let Some(t) = &l.tls else { continue };
        let has_ca = match t.own_files(i, config.tls.as_ref()) {
            Some(own) => own?.ca.is_some(),
            None if files.is_none() => {
                return Err((
                    format!("listeners[{i}].tls"),
                    "needs the sidecar's identity (tls.identity_dir, or tls.cert and tls.key) or its own cert and key".into(),
                ));
            }
            None => has_ca,
        };
        if t.client_auth != ClientAuth::None && !has_ca {
            return Err((
                format!("listeners[{i}].tls.client_auth"),
                "verifying client certificates needs a trust bundle: set tls.ca or tls.identity_dir".into(),
            ));
        }
    }
    for (i, s) in config.services.iter().enumerate() {
        let Some(t) = &s.tls else { continue };
        if !has_ca {
            return Err((
                format!("services[{i}].tls"),
                "originating TLS needs a trust bundle: set tls.ca or tls.identity_dir".into(),
            ));
        }
        if let Some(name) = &t.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err((
                    format!("services[{i}].tls.server_name"),
                    format!("{name:?} is not a DNS name or IP address"),
                ));
            }
        }
        if let Some(id) = &t.identity {
            authz::IdentityPattern::parse(id)
                .map_err(|reason| (format!("services[{i}].tls.identity"), reason))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::ProxyConfig;

    fn error_of(yaml: &str) -> String {
        ProxyConfig::from_yaml("p.yaml", yaml).unwrap_err().to_string()
    }

    #[test]
    fn tls_settings_need_an_identity_and_a_trust_bundle() {
        let listener = "listeners:\n  - { name: in, address: \"127.0.0.1:1\", default_service: a, tls: {} }\nservices:\n  - { name: a }\n";
        assert_eq!(
            error_of(listener),
            "p.yaml: listeners[0].tls: needs the sidecar's identity (tls.identity_dir, or tls.cert and tls.key) or its own cert and key"
        );
        let no_ca = format!("tls: {{ cert: c.pem, key: k.pem }}\n{listener}");
        assert!(error_of(&no_ca).starts_with("p.yaml: listeners[0].tls.client_auth: "));
        let no_key = format!("tls: {{ cert: c.pem }}\n{listener}");
        assert!(error_of(&no_key).starts_with("p.yaml: tls.key: is required"));
        let service = "tls: { cert: c.pem, key: k.pem }\nlisteners:\n  - { name: out, address: \"127.0.0.1:1\" }\nservices:\n  - { name: a, tls: { identity: \"spiffe://td/*/x\" } }\n";
        assert!(
            error_of(service).starts_with("p.yaml: services[0].tls: originating TLS needs a trust bundle")
        );
        let pattern = service.replace("key: k.pem", "key: k.pem, ca: ca.pem");
        assert!(error_of(&pattern).starts_with("p.yaml: services[0].tls.identity: "));
        let dir = "tls: { identity_dir: /run/id }\nlisteners:\n  - { name: in, address: \"127.0.0.1:1\", default_service: a, tls: {}, authorization: { allow: [\"a*b\"] } }\nservices:\n  - { name: a }\n";
        assert!(error_of(dir).starts_with("p.yaml: listeners[0].authorization.allow[0]: "));
        let own = "listeners:\n  - { name: in, address: \"127.0.0.1:1\", default_service: a, tls: { cert: c.pem } }\nservices:\n  - { name: a }\n";
        assert_eq!(
            error_of(own),
            "p.yaml: listeners[0].tls.key: is required with a listener certificate"
        );
        let own = own.replace("cert: c.pem", "cert: c.pem, key: k.pem");
        assert!(error_of(&own).starts_with("p.yaml: listeners[0].tls.client_auth: "));
        let own = own.replace("key: k.pem", "key: k.pem, client_auth: none");
        assert!(ProxyConfig::from_yaml("p.yaml", &own).is_ok());
        let ok = dir.replace("a*b", "spiffe://td/ns/x/*");
        let config = ProxyConfig::from_yaml("p.yaml", &ok).unwrap();
        let files = config.tls.unwrap().files().unwrap();
        assert_eq!(files.key.1, std::path::PathBuf::from("/run/id/key.pem"));
        assert_eq!(files.ca.unwrap().0, "tls.identity_dir");
    }
}
