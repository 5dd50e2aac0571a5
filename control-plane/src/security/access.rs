//! Access control in front of every gRPC service of the control plane: a tower layer that
//! names the caller, checks its role against the method, and rate limits the admin API per
//! caller. Handlers find the caller in the request's extensions ([`caller_of`]) to audit the
//! changes they make.
//!
//! Who is calling:
//! 1. `authorization: Bearer <token>` naming a caller of `auth.callers` (an unknown token is
//!    `UNAUTHENTICATED`, never a fallback to weaker credentials);
//! 2. else the client certificate's SPIFFE ID (when the control plane serves TLS): a caller of
//!    `auth.callers` with that `identity`, or a sidecar of the mesh's trust domain (role
//!    `sidecar`);
//! 3. else, without an `auth` section, `anonymous` with the `admin` role (development);
//!    with one, `UNAUTHENTICATED`.
//!
//! What a method needs: health and reflection are open (so `grpcurl list` works), as is
//! `Identity.Certify` (it checks bootstrap tokens itself); `MeshControl` needs a sidecar
//! identity (or `admin`) once the control plane serves TLS with client certificates;
//! `MeshAdmin.Set*` (and any other change) needs `operator`; other `MeshAdmin` methods and KEDA's
//! `ExternalScaler` need `viewer`; anything else needs `admin`. Refusals are
//! `PERMISSION_DENIED` and go to the audit log with who, what and when.
//!
//! Rate limit: with an `auth` section, every `MeshAdmin` call takes a token from its caller's
//! bucket (`auth.rate_limit`); an empty bucket is `RESOURCE_EXHAUSTED` for that caller only.
//! The buckets sit behind one mutex: this is the operators' API, a few calls a second, not the
//! data path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Status;

use super::audit::{now_rfc3339, AuditLog, Outcome, Record};
use super::{AuthConfig, RateLimit, Role};

/// The name open (no `auth` section) callers go by.
pub const ANONYMOUS: &str = "anonymous";

/// Who made a request, as the handlers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerInfo {
    pub name: Arc<str>,
    pub role: Role,
}

/// The caller of `request` (the layer put it there; `anonymous` admin when served without it).
pub fn caller_of<T>(request: &tonic::Request<T>) -> CallerInfo {
    request
        .extensions()
        .get::<CallerInfo>()
        .cloned()
        .unwrap_or_else(|| CallerInfo {
            name: ANONYMOUS.into(),
            role: Role::Admin,
        })
}

// === the policy ===

/// The role a method needs; `None`: open to anyone.
pub fn required_role(path: &str) -> Option<Role> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection"
        | "cogmesh.v1.Identity" => None,
        "cogmesh.v1.MeshControl" => Some(Role::Sidecar),
        "cogmesh.v1.MeshAdmin" if is_change(method) => Some(Role::Operator),
        "cogmesh.v1.MeshAdmin" | "externalscaler.ExternalScaler" => Some(Role::Viewer),
        _ => Some(Role::Admin),
    }
}

/// Whether a method name is a change (and so audited).
pub fn is_change(method: &str) -> bool {
    ["Set", "Delete", "Update", "Create", "Apply", "Scale"]
        .iter()
        .any(|verb| method.starts_with(verb))
}

/// Whether `role` may call a method that needs `required`. The sidecar role is not below the
/// others: it may only do what sidecars do, and only sidecars (and admins) may do that.
pub fn allows(role: Role, required: Role) -> bool {
    match required {
        Role::Sidecar => matches!(role, Role::Sidecar | Role::Admin),
        _ => role != Role::Sidecar && role >= required,
    }
}

/// A token bucket: `tokens` left at `at`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(limit: &RateLimit, now: Instant) -> Self {
        Bucket {
            tokens: limit.burst,
            at: now,
        }
    }

    /// Refills for the time since the last call, then takes one token if there is one.
    pub fn take(&mut self, limit: &RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.requests_per_second).min(limit.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The callers and limits in force (replaced whole on reload).
struct Policy {
    /// None: no `auth` section, every caller is anonymous admin.
    auth: Option<AuthConfig>,
    by_token: HashMap<String, CallerInfo>,
    by_identity: HashMap<String, CallerInfo>,
}

impl Policy {
    fn new(auth: Option<&AuthConfig>) -> Self {
        let mut by_token = HashMap::new();
        let mut by_identity = HashMap::new();
        for c in auth.iter().flat_map(|a| &a.callers) {
            let info = CallerInfo {
                name: c.name.as_str().into(),
                role: c.role,
            };
            if let Some(t) = &c.token {
                by_token.insert(t.clone(), info.clone());
            }
            if let Some(id) = &c.identity {
                by_identity.insert(id.clone(), info);
            }
        }
        Policy {
            auth: auth.cloned(),
            by_token,
            by_identity,
        }
    }
}

/// The shared state of the layer.
pub struct Access {
    policy: Mutex<Policy>,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
    /// Sidecars are known by their certificates: set when the server asks for client certs.
    pub sidecars_need_identity: bool,
    /// The mesh's trust domain: a certificate of it makes a sidecar.
    trust_domain: Option<String>,
    pub audit: AuditLog,
    pub metrics: super::SecurityMetrics,
}

impl Access {
    pub fn new(
        auth: Option<&AuthConfig>,
        trust_domain: Option<String>,
        sidecars_need_identity: bool,
        audit: AuditLog,
    ) -> Self {
        Access {
            policy: Mutex::new(Policy::new(auth)),
            buckets: Mutex::default(),
            sidecars_need_identity,
            trust_domain,
            audit,
            metrics: Default::default(),
        }
    }

    /// Swaps in reloaded callers and limits (buckets of callers that stay keep their tokens).
    pub fn set_auth(&self, auth: Option<&AuthConfig>) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = Policy::new(auth);
    }

    /// Who sent a request with these headers and this client-certificate identity.
    pub fn identify(&self, headers: &http::HeaderMap, peer: Option<&str>) -> Result<CallerInfo, Status> {
        let policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or_else(|| Status::unauthenticated("authorization: expected `Bearer <token>`"))?;
            return match policy.by_token.get(token) {
                Some(c) => Ok(c.clone()),
                None if policy.auth.is_none() => Ok(anonymous()),
                None => Err(Status::unauthenticated("authorization: unknown bearer token")),
            };
        }
        if let Some(id) = peer {
            if let Some(c) = policy.by_identity.get(id) {
                return Ok(c.clone());
            }
            if let Some(td) = &self.trust_domain {
                if super::parse_spiffe_id(id, td).is_some() {
                    return Ok(CallerInfo {
                        name: id.into(),
                        role: Role::Sidecar,
                    });
                }
            }
        }
        if policy.auth.is_none() {
            return Ok(anonymous());
        }
        Err(Status::unauthenticated(
            "no credentials: send `authorization: Bearer <token>` or a client certificate",
        ))
    }

    /// Takes a token from `caller`'s bucket; false when it is empty. No limit without `auth`.
    pub fn admit(&self, caller: &CallerInfo, now: Instant) -> bool {
        let limit = {
            let policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
            match &policy.auth {
                Some(a) => a.rate_limit.clone(),
                None => return true,
            }
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .entry(Arc::clone(&caller.name))
            .or_insert_with(|| Bucket::full(&limit, now))
            .take(&limit, now)
    }

    /// The decision for one request: the caller, or the status to answer with (audited).
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&str>,
    ) -> Result<Option<CallerInfo>, Status> {
        let Some(required) = required_role(path) else {
            return Ok(None);
        };
        if required == Role::Sidecar && !self.sidecars_need_identity {
            return Ok(None);
        }
        let method = path.trim_start_matches('/');
        let caller = self.identify(headers, peer).inspect_err(|status| {
            self.refused(ANONYMOUS, "-", method, Outcome::Denied, status.message());
        })?;
        if !allows(caller.role, required) {
            let reason = format!(
                "{method} needs the {} role; {} has {}",
                required.as_str(),
                caller.name,
                caller.role.as_str()
            );
            self.refused(
                &caller.name,
                caller.role.as_str(),
                method,
                Outcome::Denied,
                &reason,
            );
            return Err(Status::permission_denied(reason));
        }
        if method.starts_with("cogmesh.v1.MeshAdmin/") && !self.admit(&caller, Instant::now()) {
            let reason = format!("{} is over its rate limit on the admin API", caller.name);
            self.refused(
                &caller.name,
                caller.role.as_str(),
                method,
                Outcome::RateLimited,
                &reason,
            );
            return Err(Status::resource_exhausted(reason));
        }
        Ok(Some(caller))
    }

    fn refused(&self, caller: &str, role: &str, method: &str, result: Outcome, reason: &str) {
        let label = match (result, caller) {
            (Outcome::RateLimited, _) => "rate_limited",
            (_, ANONYMOUS) => "unauthenticated",
            _ => "permission_denied",
        };
        self.metrics
            .api_refused
            .get_or_create(&super::RefusedLabels { reason: label })
            .inc();
        self.audit.write(&Record {
            time: now_rfc3339(),
            caller,
            role,
            method,
            target: "",
            result,
            reason,
            before: None,
            after: None,
        });
    }
}

fn anonymous() -> CallerInfo {
    CallerInfo {
        name: ANONYMOUS.into(),
        role: Role::Admin,
    }
}

/// The SPIFFE ID (first URI SAN) of a DER certificate.
pub fn spiffe_id_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

/// The verified client certificate's SPIFFE ID of a request served over TLS.
pub fn peer_identity(extensions: &http::Extensions) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    spiffe_id_of(certs.first()?)
}

// === the layer ===

#[derive(Clone)]
pub struct AccessLayer {
    pub access: Arc<Access>,
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            access: Arc::clone(&self.access),
        }
    }
}

#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    access: Arc<Access>,
}

impl<S, B> tower::Service<http::Request<B>> for AccessService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<tonic::body::Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = peer_identity(request.extensions());
        match self
            .access
            .check(request.uri().path(), request.headers(), peer.as_deref())
        {
            Ok(caller) => {
                if let Some(c) = caller {
                    request.extensions_mut().insert(c);
                }
                futures_util::future::Either::Left(self.inner.call(request))
            }
            Err(status) => futures_util::future::Either::Right(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Caller;

    fn auth() -> AuthConfig {
        let caller = |name: &str, role, token: &str| Caller {
            name: name.into(),
            role,
            token: Some(token.into()),
            identity: None,
        };
        AuthConfig {
            callers: vec![
                caller("val", Role::Viewer, "view"),
                caller("olga", Role::Operator, "oper"),
                Caller {
                    name: "ci".into(),
                    role: Role::Admin,
                    token: None,
                    identity: Some("spiffe://cogmesh.local/ns/ops/sa/ci".into()),
                },
            ],
            rate_limit: RateLimit {
                requests_per_second: 1.0,
                burst: 2.0,
            },
            audit_log: None,
        }
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    const SET: &str = "/cogmesh.v1.MeshAdmin/SetScalingPolicy";
    const LIST: &str = "/cogmesh.v1.MeshAdmin/ListServices";

    #[test]
    fn roles_decide_per_method() {
        let access = Access::new(
            Some(&auth()),
            Some("cogmesh.local".into()),
            true,
            AuditLog::open(None).unwrap(),
        );
        let code = |path: &str, h: &http::HeaderMap, peer: Option<&str>| {
            access
                .check(path, h, peer)
                .map(|c| c.map(|c| c.name.to_string()))
                .map_err(|s| s.code())
        };
        assert_eq!(code(LIST, &bearer("view"), None), Ok(Some("val".into())));
        assert_eq!(
            code(SET, &bearer("view"), None),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(code(SET, &bearer("oper"), None), Ok(Some("olga".into())));
        assert_eq!(
            code(SET, &bearer("nope"), None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(SET, &http::HeaderMap::new(), None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code("/grpc.health.v1.Health/Check", &http::HeaderMap::new(), None),
            Ok(None)
        );
        let sidecar = Some("spiffe://cogmesh.local/ns/default/sa/web");
        let connect = "/cogmesh.v1.MeshControl/Connect";
        assert!(code(connect, &http::HeaderMap::new(), sidecar).is_ok());
        assert_eq!(
            code(LIST, &http::HeaderMap::new(), sidecar),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(connect, &bearer("oper"), None),
            Err(tonic::Code::PermissionDenied)
        );
        let ci = Some("spiffe://cogmesh.local/ns/ops/sa/ci");
        assert_eq!(code(SET, &http::HeaderMap::new(), ci), Ok(Some("ci".into())));
        assert_eq!(
            code(
                LIST,
                &http::HeaderMap::new(),
                Some("spiffe://elsewhere/ns/a/sa/b")
            ),
            Err(tonic::Code::Unauthenticated)
        );
    }

    #[test]
    fn without_auth_everyone_is_an_unlimited_admin() {
        let access = Access::new(None, None, false, AuditLog::open(None).unwrap());
        for _ in 0..100 {
            let c = access.check(SET, &http::HeaderMap::new(), None).unwrap().unwrap();
            assert_eq!((&*c.name, c.role), (ANONYMOUS, Role::Admin));
        }
        assert_eq!(
            access
                .check("/cogmesh.v1.MeshControl/Connect", &http::HeaderMap::new(), None)
                .unwrap(),
            None
        );
    }

    #[test]
    fn the_bucket_refills_at_the_rate_up_to_the_burst() {
        let limit = RateLimit {
            requests_per_second: 2.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(&limit, t0);
        assert!((0..3).all(|_| b.take(&limit, t0)));
        assert!(!b.take(&limit, t0));
        assert!(b.take(&limit, t0 + std::time::Duration::from_millis(500)));
        assert!(!b.take(&limit, t0 + std::time::Duration::from_millis(500)));
        let later = t0 + std::time::Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(&limit, later)));
        assert!(!b.take(&limit, later));
    }

    #[test]
    fn rate_limits_are_per_caller() {
        let access = Access::new(Some(&auth()), None, false, AuditLog::open(None).unwrap());
        let over = (0..5)
            .map(|_| access.check(LIST, &bearer("view"), None))
            .filter(|r| matches!(r, Err(s) if s.code() == tonic::Code::ResourceExhausted))
            .count();
        assert!(over >= 2, "burst 2 at 1/s: most of 5 quick calls are refused");
        assert!(access.check(LIST, &bearer("oper"), None).is_ok());
    }
}
