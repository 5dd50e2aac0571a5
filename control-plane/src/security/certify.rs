//! `cogmesh.v1.Identity`: sidecars get their certificates here.
//!
//! A caller proves the identity it asks for in one of two ways:
//! - a bootstrap token from `identity.workloads` (first certificate; like Linkerd's check of a
//!   pod's ServiceAccount token, but with a token the operator hands to the workload);
//! - over mTLS, a valid certificate for that same identity (renewal).
//!
//! Refusals say why: `INVALID_ARGUMENT` (not an identity of this trust domain, a malformed
//! CSR, a CSR naming someone else), `UNAUTHENTICATED` (no or unknown token),
//! `PERMISSION_DENIED` (the token proves another identity), `FAILED_PRECONDITION` (no
//! `identity` section).

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use cogmesh_proto::v1::identity_server::Identity;
use cogmesh_proto::v1::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use super::ca::{CertificateAuthority, SignError};
use super::IdentityConfig;

/// The CA with the configuration that says who may have which identity.
pub struct Authority {
    pub ca: CertificateAuthority,
    pub metrics: super::SecurityMetrics,
    config: Mutex<IdentityConfig>,
}

impl Authority {
    pub fn new(ca: CertificateAuthority, config: IdentityConfig) -> Self {
        Authority {
            ca,
            metrics: Default::default(),
            config: Mutex::new(config),
        }
    }

    /// Swaps in reloaded workloads and TTL (the CA and trust domain need a restart).
    pub fn set_config(&self, config: IdentityConfig) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn config(&self) -> IdentityConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks that a caller with `token` (or the mTLS identity `peer`) may have `identity`, then
    /// signs `csr` for it.
    pub fn certify(
        &self,
        csr: &[u8],
        identity: &str,
        token: &str,
        peer: Option<&str>,
    ) -> Result<CertifyResponse, Status> {
        let result = self.check_and_sign(csr, identity, token, peer);
        let result_label = if result.is_ok() { "issued" } else { "refused" };
        self.metrics
            .certificate_requests
            .get_or_create(&super::ResultLabels { result: result_label })
            .inc();
        result
    }

    fn check_and_sign(
        &self,
        csr: &[u8],
        identity: &str,
        token: &str,
        peer: Option<&str>,
    ) -> Result<CertifyResponse, Status> {
        let config = self.config();
        if super::parse_spiffe_id(identity, &config.trust_domain).is_none() {
            return Err(Status::invalid_argument(format!(
                "identity: {identity:?} is not spiffe://{}/ns/<namespace>/sa/<service-account>",
                config.trust_domain
            )));
        }
        if peer != Some(identity) {
            if token.is_empty() {
                return Err(Status::unauthenticated(
                    "token: missing (a bootstrap token, or call over mTLS with a certificate for this identity)",
                ));
            }
            let Some(w) = config.workloads.iter().find(|w| same_secret(&w.token, token)) else {
                return Err(Status::unauthenticated(
                    "token: not a bootstrap token of this control plane",
                ));
            };
            let proven = config.spiffe_id(&w.namespace, &w.service_account);
            if proven != identity {
                tracing::warn!(
                    asked = identity,
                    proven,
                    "certificate refused: identity not proven"
                );
                return Err(Status::permission_denied(format!(
                    "identity: the token proves {proven}, not {identity}"
                )));
            }
        }
        let ttl = Duration::from_secs(config.certificate_ttl_s);
        let issued = self.ca.sign(csr, identity, ttl).map_err(|e| match e {
            SignError::Internal(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        let unix = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        tracing::info!(
            identity,
            renewal = peer == Some(identity),
            valid_until = unix(issued.not_after),
            "certificate issued"
        );
        Ok(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.root_pem().to_string(),
            valid_until_unix_s: unix(issued.not_after),
            valid_from_unix_s: unix(issued.not_before),
        })
    }
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gRPC service.
pub struct IdentityService {
    pub authority: Option<Arc<Authority>>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let Some(authority) = &self.authority else {
            return Err(Status::failed_precondition(
                "this control plane has no `identity` section in control.yaml: it issues no certificates",
            ));
        };
        let peer = super::access::peer_identity(request.extensions());
        let r = request.into_inner();
        let authority = Arc::clone(authority);
        // Signing is CPU work (a few hundred µs): off the async workers.
        tokio::task::spawn_blocking(move || authority.certify(&r.csr, &r.identity, &r.token, peer.as_deref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{CaSource, Workload};

    fn authority() -> Authority {
        let config = IdentityConfig {
            trust_domain: "cogmesh.local".into(),
            certificate_ttl_s: 60,
            ca: CaSource::default(),
            server_names: vec![],
            workloads: vec![Workload {
                namespace: "default".into(),
                service_account: "web".into(),
                token: "web-token".into(),
            }],
        };
        let (ca, _) = CertificateAuthority::generate("cogmesh.local").unwrap();
        Authority::new(ca, config)
    }

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::default();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    const WEB: &str = "spiffe://cogmesh.local/ns/default/sa/web";

    #[test]
    fn a_token_proves_one_identity() {
        let a = authority();
        let ok = a.certify(&csr(), WEB, "web-token", None).unwrap();
        assert_eq!(ok.valid_until_unix_s - ok.valid_from_unix_s, 60 + 60);
        assert!(ok.trust_bundle_pem.contains("BEGIN CERTIFICATE"));
        let other = "spiffe://cogmesh.local/ns/default/sa/db";
        let e = a.certify(&csr(), other, "web-token", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("proves spiffe://cogmesh.local/ns/default/sa/web"),
            "{e:?}"
        );
        let e = a.certify(&csr(), WEB, "", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = a.certify(&csr(), WEB, "web-tokeN", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = a
            .certify(&csr(), "spiffe://elsewhere/ns/default/sa/web", "web-token", None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        // Renewal over mTLS: the certificate being renewed is the proof.
        assert!(a.certify(&csr(), other, "", Some(other)).is_ok());
        assert!(a.certify(&csr(), other, "", Some(WEB)).is_err());
    }
}
