//! TLS and authorization metrics, and the one place that turns a handshake error into a
//! failure reason.
//!
//! - `tls_handshake_total{side,version}`: completed handshakes, `side` `server` (a listener)
//!   or `client` (origination), `version` `TLSv1_3` or `TLSv1_2`;
//! - `tls_handshake_failure_total{side,reason}`: failed handshakes by [`FailureReason`];
//! - `tls_identity_reload_total{result}`: identity rotations `applied` or `refused`;
//! - `tls_identity_expiry_timestamp_seconds`: `notAfter` of the sidecar's certificate;
//! - `authz_denied_total{listener,identity}`: requests refused with 403 by authorization, by
//!   the peer's SPIFFE identity (`none` without one). At most [`MAX_IDENTITY_LABELS`]
//!   identities get their own label; the rest are counted as `other`.
//!
//! Handshake counters are resolved when the metrics are built (a handshake increments an
//! atomic); an identity's denial counter is resolved once per connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Distinct peer identities labelled in `authz_denied_total`; further ones are `other`.
pub const MAX_IDENTITY_LABELS: usize = 64;

/// Which end of the handshake the proxy was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server = 0,
    Client = 1,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Why a handshake failed; the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The peer's certificate (or, from its alert, ours) has expired.
    Expired = 0,
    NotYetValid = 1,
    /// The certificate does not chain to the trust bundle.
    UnknownCa = 2,
    /// The certificate is valid but names another identity (SPIFFE ID or server name).
    BadIdentity = 3,
    /// A listener that requires client certificates got none.
    NoClientCert = 4,
    /// Any other certificate problem (bad encoding, signature, usage).
    BadCertificate = 5,
    /// No common version or cipher suite, unexpected messages, a peer's other alerts.
    Protocol = 6,
    Timeout = 7,
    /// The connection failed or closed during the handshake.
    Io = 8,
}

impl FailureReason {
    pub const ALL: [FailureReason; 9] = [
        FailureReason::Expired,
        FailureReason::NotYetValid,
        FailureReason::UnknownCa,
        FailureReason::BadIdentity,
        FailureReason::NoClientCert,
        FailureReason::BadCertificate,
        FailureReason::Protocol,
        FailureReason::Timeout,
        FailureReason::Io,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Expired => "expired",
            FailureReason::NotYetValid => "not_yet_valid",
            FailureReason::UnknownCa => "unknown_ca",
            FailureReason::BadIdentity => "bad_identity",
            FailureReason::NoClientCert => "no_client_cert",
            FailureReason::BadCertificate => "bad_certificate",
            FailureReason::Protocol => "protocol",
            FailureReason::Timeout => "timeout",
            FailureReason::Io => "io",
        }
    }

    /// The reason of a rustls error.
    pub fn of_tls(err: &rustls::Error) -> FailureReason {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        match err {
            E::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => FailureReason::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => FailureReason::NotYetValid,
                C::UnknownIssuer => FailureReason::UnknownCa,
                C::NotValidForName | C::NotValidForNameContext { .. } => FailureReason::BadIdentity,
                C::Other(other)
                    if other
                        .0
                        .downcast_ref::<super::client::IdentityMismatch>()
                        .is_some() =>
                {
                    FailureReason::BadIdentity
                }
                _ => FailureReason::BadCertificate,
            },
            E::NoCertificatesPresented => FailureReason::NoClientCert,
            E::AlertReceived(alert) => match *alert {
                A::CertificateExpired => FailureReason::Expired,
                A::UnknownCA => FailureReason::UnknownCa,
                A::CertificateRequired => FailureReason::NoClientCert,
                A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate => {
                    FailureReason::BadCertificate
                }
                _ => FailureReason::Protocol,
            },
            _ => FailureReason::Protocol,
        }
    }

    /// The reason of an I/O error from a TLS handshake (rustls errors travel inside).
    pub fn of_io(err: &std::io::Error) -> FailureReason {
        match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(tls) => FailureReason::of_tls(tls),
            None => FailureReason::Io,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    side: &'static str,
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    side: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    listener: String,
    identity: String,
}

/// The TLS and authorization metric handles; cheap to clone.
#[derive(Clone)]
pub struct TlsMetrics {
    /// `[side][0]` TLS 1.3, `[side][1]` TLS 1.2.
    handshakes: [[Counter; 2]; 2],
    failures: [Vec<Counter>; 2],
    reloads: Family<ResultLabels, Counter>,
    expiry: Gauge,
    denied: Family<DeniedLabels, Counter>,
    /// Identities with their own label so far.
    labelled: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for TlsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMetrics")
    }
}

impl TlsMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> TlsMetrics {
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let expiry = Gauge::default();
        let denied = Family::<DeniedLabels, Counter>::default();
        registry.register(
            "tls_handshake",
            "Completed TLS handshakes, by side and version",
            handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failure",
            "Failed TLS handshakes, by side and reason",
            failures.clone(),
        );
        registry.register(
            "tls_identity_reload",
            "Rotations of the sidecar's TLS identity, applied or refused",
            reloads.clone(),
        );
        registry.register(
            "tls_identity_expiry_timestamp_seconds",
            "notAfter of the sidecar's certificate, seconds since the Unix epoch",
            expiry.clone(),
        );
        registry.register(
            "authz_denied",
            "Requests refused by authorization, by listener and peer identity",
            denied.clone(),
        );
        let per_side = |side: Side| {
            let version = |v| {
                handshakes
                    .get_or_create(&HandshakeLabels {
                        side: side.as_str(),
                        version: v,
                    })
                    .clone()
            };
            [version("TLSv1_3"), version("TLSv1_2")]
        };
        let reasons = |side: Side| {
            FailureReason::ALL
                .iter()
                .map(|r| {
                    failures
                        .get_or_create(&FailureLabels {
                            side: side.as_str(),
                            reason: r.as_str(),
                        })
                        .clone()
                })
                .collect()
        };
        TlsMetrics {
            handshakes: [per_side(Side::Server), per_side(Side::Client)],
            failures: [reasons(Side::Server), reasons(Side::Client)],
            reloads,
            expiry,
            denied,
            labelled: Arc::default(),
        }
    }

    pub fn handshake(&self, side: Side, version: Option<rustls::ProtocolVersion>) {
        let i = usize::from(version != Some(rustls::ProtocolVersion::TLSv1_3));
        self.handshakes[side as usize][i].inc();
    }

    pub fn failure(&self, side: Side, reason: FailureReason) {
        self.failures[side as usize][reason as usize].inc();
    }

    pub fn identity_reloads(&self, applied: bool) -> Counter {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).clone()
    }

    pub fn set_identity(&self, identity: &super::Identity) {
        self.expiry.set(identity.not_after_unix);
    }

    /// The denial counter of a peer identity on a listener (once per connection).
    pub fn denied(&self, listener: &str, identity: Option<&str>) -> Counter {
        let identity = match identity {
            None => "none".to_string(),
            Some(id) => {
                let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
                if labelled.contains(id) || labelled.len() < MAX_IDENTITY_LABELS {
                    labelled.insert(id.to_string());
                    id.to_string()
                } else {
                    "other".to_string()
                }
            }
        };
        self.denied
            .get_or_create(&DeniedLabels {
                listener: listener.to_string(),
                identity,
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_of_certificate_errors_and_alerts() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let r = |e| FailureReason::of_tls(&e);
        assert_eq!(r(E::InvalidCertificate(C::Expired)), FailureReason::Expired);
        assert_eq!(
            r(E::InvalidCertificate(C::UnknownIssuer)),
            FailureReason::UnknownCa
        );
        assert_eq!(
            r(E::InvalidCertificate(C::NotValidForName)),
            FailureReason::BadIdentity
        );
        assert_eq!(
            r(E::InvalidCertificate(C::BadSignature)),
            FailureReason::BadCertificate
        );
        assert_eq!(r(E::NoCertificatesPresented), FailureReason::NoClientCert);
        assert_eq!(r(E::AlertReceived(A::UnknownCA)), FailureReason::UnknownCa);
        assert_eq!(r(E::AlertReceived(A::CertificateExpired)), FailureReason::Expired);
        assert_eq!(r(E::AlertReceived(A::ProtocolVersion)), FailureReason::Protocol);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, E::InvalidCertificate(C::Expired));
        assert_eq!(FailureReason::of_io(&io), FailureReason::Expired);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(FailureReason::of_io(&eof), FailureReason::Io);
        for (i, reason) in FailureReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn identity_labels_are_capped() {
        let mut registry = Registry::default();
        let m = TlsMetrics::register(&mut registry);
        for i in 0..MAX_IDENTITY_LABELS {
            m.denied("in", Some(&format!("spiffe://td/ns/a/sa/{i}"))).inc();
        }
        m.denied("in", Some("spiffe://td/ns/b/sa/late")).inc();
        m.denied("in", Some("spiffe://td/ns/a/sa/0")).inc();
        m.denied("in", None).inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"authz_denied_total{listener="in",identity="other"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"authz_denied_total{listener="in",identity="spiffe://td/ns/a/sa/0"} 2"#));
        assert!(text.contains(r#"authz_denied_total{listener="in",identity="none"} 1"#));
        assert!(!text.contains("sa/late"));
    }
}
