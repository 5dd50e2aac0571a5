//! Who may do what on the control plane: workload identity and the operators' access.
//!
//! - [`ca`]: the certificate authority that signs the sidecars' certificates (SPIFFE URI SAN).
//! - [`certify`]: the `cogmesh.v1.Identity` gRPC service in front of it.
//! - [`access`]: the tower layer in front of every gRPC service: it names the caller (bearer
//!   token or mTLS identity), checks the caller's role against the method, and rate limits the
//!   admin API per caller.
//! - [`audit`]: the append-only audit log of every change (and every refused attempt).
//!
//! This module owns the `identity` and `auth` sections of `control.yaml`:
//!
//! ```yaml
//! identity:
//!   trust_domain: cogmesh.local          # spiffe://<trust_domain>/ns/<namespace>/sa/<account>
//!   certificate_ttl_s: 86400             # default 24 h
//!   ca: { dir: /var/lib/cogmesh/ca }     # development: a root made once, kept in dir
//!   # ca: { cert: ca.pem, key: ca-key.pem }   # production: loaded from files
//!   workloads:                           # who may ask for which identity the first time
//!     - { namespace: default, service_account: web, token: s3cret }
//! auth:
//!   callers:
//!     - { name: alice, role: operator, token: t0ken }
//!     - { name: ci, role: admin, identity: spiffe://cogmesh.local/ns/ops/sa/ci }
//!   rate_limit: { requests_per_second: 10, burst: 20 }
//!   audit_log: /var/lib/cogmesh/audit.jsonl
//! ```
//!
//! Without an `auth` section (allowed in development and staging only) the API is open: every
//! caller counts as `anonymous` with the `admin` role, and changes are still audited.

pub mod access;
pub mod audit;
pub mod ca;
pub mod certify;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The trust domain when `identity.trust_domain` is not given.
pub const DEFAULT_TRUST_DOMAIN: &str = "cogmesh.local";
/// Lifetime of a workload certificate when `identity.certificate_ttl_s` is not given (24 h).
pub const DEFAULT_CERTIFICATE_TTL_S: u64 = 24 * 3600;
/// Admin API requests per second per caller when `auth.rate_limit` is not given.
pub const DEFAULT_RATE_PER_SECOND: f64 = 20.0;
/// Admin API burst per caller when `auth.rate_limit` is not given.
pub const DEFAULT_BURST: f64 = 40.0;

/// Field and reason of the first problem in the `identity` and `auth` sections. `strict`
/// (production, distributed) requires `auth`, a CA from files and long tokens.
pub fn validate(
    identity: Option<&IdentityConfig>,
    auth: Option<&AuthConfig>,
    strict: bool,
) -> Result<(), (String, String)> {
    if let Some(i) = identity {
        i.validate(strict)?;
    }
    match auth {
        Some(a) => a.validate(strict),
        None if strict => Err((
            "auth".into(),
            "must be set in production: callers with tokens or identities (without it the API is open)"
                .into(),
        )),
        None => Ok(()),
    }
}

/// The first field whose change needs a restart: the CA and its trust domain, TLS, the audit
/// log's file, and turning `identity` or `auth` on or off. Callers, tokens, roles, the rate
/// limit, workloads and the certificate TTL reload.
pub fn restart_needed(
    current: (Option<&IdentityConfig>, Option<&AuthConfig>),
    next: (Option<&IdentityConfig>, Option<&AuthConfig>),
) -> Option<&'static str> {
    match (current.0, next.0) {
        (Some(a), Some(b)) => {
            if a.trust_domain != b.trust_domain {
                return Some("identity.trust_domain");
            }
            if a.ca != b.ca {
                return Some("identity.ca");
            }
            if a.server_names != b.server_names {
                return Some("identity.server_names");
            }
        }
        (None, None) => {}
        _ => return Some("identity"),
    }
    match (current.1, next.1) {
        (Some(a), Some(b)) if a.audit_log != b.audit_log => Some("auth.audit_log"),
        (Some(_), None) | (None, Some(_)) => Some("auth"),
        _ => None,
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusedLabels {
    /// `unauthenticated`, `permission_denied` or `rate_limited`.
    pub reason: &'static str,
}

/// The security metrics on the control plane's `GET /metrics`.
#[derive(Clone, Default)]
pub struct SecurityMetrics {
    /// `certificate_requests_total{result="issued|refused"}`.
    pub certificate_requests: prometheus_client::metrics::family::Family<
        ResultLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// `api_refused_total{reason}`: calls the access layer refused.
    pub api_refused: prometheus_client::metrics::family::Family<
        RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl SecurityMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "certificate_requests",
            "Identity.Certify requests, issued or refused",
            self.certificate_requests.clone(),
        );
        registry.register(
            "api_refused",
            "gRPC calls refused by access control, by reason",
            self.api_refused.clone(),
        );
    }
}

/// The security state `serve` runs with, built from the configuration.
pub struct Security {
    pub metrics: SecurityMetrics,
    pub access: std::sync::Arc<access::Access>,
    pub authority: Option<std::sync::Arc<certify::Authority>>,
    /// Set when the control plane serves TLS (`identity.server_names`).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// The lifetime of the control plane's own certificate; a restart issues a new one.
pub const SERVER_CERTIFICATE_TTL_S: u64 = 365 * 24 * 3600;

impl Security {
    /// Loads or makes the CA, the server certificate and opens the audit log. Errors name the
    /// field.
    pub fn from_config(
        identity: Option<&IdentityConfig>,
        auth: Option<&AuthConfig>,
    ) -> Result<Self, (String, String)> {
        let metrics = SecurityMetrics::default();
        let authority = match identity {
            Some(i) => {
                let ca = ca::CertificateAuthority::from_source(&i.ca, &i.trust_domain)
                    .map_err(|e| (e.field.to_string(), e.reason))?;
                let mut authority = certify::Authority::new(ca, i.clone());
                authority.metrics = metrics.clone();
                Some(std::sync::Arc::new(authority))
            }
            None => None,
        };
        let tls = match (identity, &authority) {
            (Some(i), Some(a)) if !i.server_names.is_empty() => Some(server_tls(i, &a.ca)?),
            _ => None,
        };
        let audit_path = auth.and_then(|a| a.audit_log.as_deref());
        let audit = audit::AuditLog::open(audit_path).map_err(|e| {
            (
                "auth.audit_log".to_string(),
                format!(
                    "cannot open {} for appending: {e}",
                    audit_path.unwrap_or(Path::new("")).display()
                ),
            )
        })?;
        let mut access = access::Access::new(
            auth,
            identity.map(|i| i.trust_domain.clone()),
            tls.is_some(),
            audit,
        );
        access.metrics = metrics.clone();
        Ok(Security {
            metrics,
            access: std::sync::Arc::new(access),
            authority,
            tls,
        })
    }
}

/// The server side of TLS: a certificate from the CA for `server_names` (with the control
/// plane's own SPIFFE ID), client certificates verified against the CA but optional.
fn server_tls(
    i: &IdentityConfig,
    ca: &ca::CertificateAuthority,
) -> Result<tonic::transport::ServerTlsConfig, (String, String)> {
    let fail = |e: String| ("identity.server_names".to_string(), e);
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let cert = ca
        .sign_server(
            &key,
            &i.server_names,
            &i.spiffe_id("cogmesh", "control"),
            std::time::Duration::from_secs(SERVER_CERTIFICATE_TTL_S),
        )
        .map_err(|e| fail(e.to_string()))?;
    let identity = tonic::transport::Identity::from_pem(cert, key.serialize_pem());
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(ca.root_pem()))
        .client_auth_optional(true))
}

// === identity ===

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_ttl")]
    pub certificate_ttl_s: u64,
    #[serde(default)]
    pub ca: CaSource,
    /// Bootstrap tokens: a sidecar proves with one of these that it may have an identity.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Serve the control plane's gRPC over TLS, with a certificate from this CA for these
    /// names (DNS names or IP addresses). Client certificates from the CA are then verified
    /// and name the caller (they are optional: operators may send a bearer token instead).
    #[serde(default)]
    pub server_names: Vec<String>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.into()
}

fn default_ttl() -> u64 {
    DEFAULT_CERTIFICATE_TTL_S
}

/// Where the CA's root comes from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaSource {
    /// Development: a root generated on first start and kept here (`ca.pem`, `ca-key.pem`),
    /// so restarts keep the same trust bundle. Neither `dir` nor `cert`: a root in memory only.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Production: the CA certificate (PEM) ...
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// ... and its private key (PEM, PKCS#8).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// One workload that may ask for a certificate: its identity and the token that proves it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    #[serde(skip_serializing)]
    pub token: String,
}

impl IdentityConfig {
    /// The SPIFFE ID of `namespace`/`service_account` in this trust domain.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }

    /// Field and reason of the first problem.
    pub fn validate(&self, strict: bool) -> Result<(), (String, String)> {
        let f = |field: &str| format!("identity.{field}");
        if !is_dns_name(&self.trust_domain) {
            return Err((
                f("trust_domain"),
                format!(
                    "{:?} is not a trust domain (a DNS name, lowercase)",
                    self.trust_domain
                ),
            ));
        }
        if !(1..=366 * 24 * 3600).contains(&self.certificate_ttl_s) {
            return Err((
                f("certificate_ttl_s"),
                format!(
                    "must be between 1 and 31622400 (a year), got {}",
                    self.certificate_ttl_s
                ),
            ));
        }
        match (&self.ca.dir, &self.ca.cert, &self.ca.key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err((
                    f("ca"),
                    "give either dir (generated root) or cert and key, not both".into(),
                ))
            }
            (_, Some(_), None) => return Err((f("ca.key"), "must be given with ca.cert".into())),
            (_, None, Some(_)) => return Err((f("ca.cert"), "must be given with ca.key".into())),
            (_, None, None) if strict => {
                return Err((
                    f("ca"),
                    "production needs a CA loaded from files (cert and key), not a generated root".into(),
                ))
            }
            _ => {}
        }
        for (i, n) in self.server_names.iter().enumerate() {
            if n.parse::<std::net::IpAddr>().is_err() && !is_dns_name(n) {
                return Err((
                    f(&format!("server_names[{i}]")),
                    format!("{n:?} is neither an IP address nor a DNS name"),
                ));
            }
        }
        let mut tokens = std::collections::HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |field: &str| f(&format!("workloads[{i}].{field}"));
            if !is_dns_label(&w.namespace) {
                return Err((
                    at("namespace"),
                    format!("{:?} is not a namespace name", w.namespace),
                ));
            }
            if !is_dns_name(&w.service_account) {
                return Err((
                    at("service_account"),
                    format!("{:?} is not a service account name", w.service_account),
                ));
            }
            check_token(&w.token, strict).map_err(|r| (at("token"), r))?;
            if !tokens.insert(w.token.as_str()) {
                return Err((
                    at("token"),
                    "used by another workload: a token proves one identity".into(),
                ));
            }
        }
        Ok(())
    }
}

// === auth ===

/// What a caller may do. Each role can do everything the ones before it can.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A sidecar (mTLS identity of the mesh): `MeshControl.Connect` and renewals only.
    Sidecar,
    /// Reads: services, sync and config status, decisions, alerts, policies, watches.
    Viewer,
    /// Reads, and changes policies and scaling.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Sidecar => "sidecar",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub callers: Vec<Caller>,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// The append-only audit log (JSON lines). None: audit records go to the log only.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
}

/// An operator (or tool) that may call the admin API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// Sent as `authorization: Bearer <token>`.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// The SPIFFE ID of the client certificate it presents (when the control plane serves TLS).
    #[serde(default)]
    pub identity: Option<String>,
}

/// A token bucket per caller over the admin API (`RESOURCE_EXHAUSTED` when empty).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default = "default_rate")]
    pub requests_per_second: f64,
    #[serde(default = "default_burst")]
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            requests_per_second: DEFAULT_RATE_PER_SECOND,
            burst: DEFAULT_BURST,
        }
    }
}

fn default_rate() -> f64 {
    DEFAULT_RATE_PER_SECOND
}

fn default_burst() -> f64 {
    DEFAULT_BURST
}

impl AuthConfig {
    /// Field and reason of the first problem.
    pub fn validate(&self, strict: bool) -> Result<(), (String, String)> {
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        let mut identities = std::collections::HashSet::new();
        for (i, c) in self.callers.iter().enumerate() {
            let at = |field: &str| format!("auth.callers[{i}].{field}");
            if c.name.is_empty() || c.name.chars().any(|ch| ch.is_control() || ch == '"') {
                return Err((at("name"), "must be a non-empty name without quotes".into()));
            }
            if !names.insert(c.name.as_str()) {
                return Err((at("name"), format!("duplicate caller {:?}", c.name)));
            }
            if c.role == Role::Sidecar {
                return Err((
                    at("role"),
                    "sidecar is given by the mesh's certificates; expected viewer, operator or admin".into(),
                ));
            }
            match (&c.token, &c.identity) {
                (None, None) => return Err((at("token"), "give a token, an identity, or both".into())),
                (Some(t), _) => {
                    check_token(t, strict).map_err(|r| (at("token"), r))?;
                    if !tokens.insert(t.as_str()) {
                        return Err((at("token"), "used by another caller".into()));
                    }
                }
                _ => {}
            }
            if let Some(id) = &c.identity {
                if !id.starts_with("spiffe://") {
                    return Err((
                        at("identity"),
                        format!("{id:?} is not a SPIFFE ID (spiffe://...)"),
                    ));
                }
                if !identities.insert(id.as_str()) {
                    return Err((at("identity"), "used by another caller".into()));
                }
            }
        }
        let r = &self.rate_limit;
        if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
            return Err((
                "auth.rate_limit.requests_per_second".into(),
                format!("must be > 0, got {}", r.requests_per_second),
            ));
        }
        if !(r.burst.is_finite() && r.burst >= 1.0) {
            return Err((
                "auth.rate_limit.burst".into(),
                format!("must be >= 1, got {}", r.burst),
            ));
        }
        Ok(())
    }
}

/// A token short enough to guess is refused in production.
fn check_token(token: &str, strict: bool) -> Result<(), String> {
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be a non-empty string without spaces".into());
    }
    if strict && token.len() < 16 {
        return Err(format!(
            "must be at least 16 characters in production, got {}",
            token.len()
        ));
    }
    Ok(())
}

/// Whether `s` is a DNS label (RFC 1123): a Kubernetes namespace name.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The `(namespace, service_account)` of a SPIFFE ID in `trust_domain`, if it is one.
pub fn parse_spiffe_id<'a>(id: &'a str, trust_domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = id.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?;
    let rest = rest.strip_prefix("/ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let sa = rest.strip_prefix("sa/")?;
    (is_dns_label(ns) && is_dns_name(sa)).then_some((ns, sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_only_in_their_trust_domain() {
        assert_eq!(
            parse_spiffe_id("spiffe://cogmesh.local/ns/default/sa/web", "cogmesh.local"),
            Some(("default", "web"))
        );
        for bad in [
            "spiffe://other.local/ns/default/sa/web",
            "spiffe://cogmesh.local/ns/default/sa/",
            "spiffe://cogmesh.local/ns/Default/sa/web",
            "spiffe://cogmesh.local/ns/default/sa/web/extra",
            "spiffe://cogmesh.localx/ns/default/sa/web",
            "https://cogmesh.local/ns/default/sa/web",
        ] {
            assert_eq!(parse_spiffe_id(bad, "cogmesh.local"), None, "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_by_power() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert!(Role::Sidecar < Role::Viewer);
    }
}
