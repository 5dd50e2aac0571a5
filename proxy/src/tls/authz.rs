//! Identity-based authorization on the inbound side: which peers (by the SPIFFE identity of
//! their client certificate) may use a route or a listener.
//!
//! A route's `authorization` applies to the requests it matches; a listener's applies to the
//! requests on it that match no route with its own (its default service, typically). Rules:
//! a `deny` pattern that matches refuses, else an `allow` pattern that matches admits, else
//! `default` decides (`deny` unless set). A peer without a verified certificate has no
//! identity and matches no pattern. A refusal is 403 (`grpc-status` 7, PERMISSION_DENIED, for
//! gRPC), counted in `authz_denied_total` with the peer's identity.
//!
//! The decision is a pure function of the policy and the identity: a few string comparisons,
//! no allocation. Routes and listeners without a policy pay one `Option` check.

use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// `authorization` on a route or listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Identities admitted: exact, or a prefix ending in `*`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Identities refused even when an `allow` pattern matches them.
    #[serde(default)]
    pub deny: Vec<String>,
    /// What happens to identities no pattern matches (and to peers without one).
    #[serde(default)]
    pub default: Verdict,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    #[default]
    Deny,
}

/// An identity pattern: exact, or a prefix (`spiffe://td/ns/prod/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(String),
    Prefix(String),
}

impl IdentityPattern {
    /// Parses a pattern; `*` is allowed only at the end.
    pub fn parse(text: &str) -> Result<IdentityPattern, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        match text.find('*') {
            None => Ok(IdentityPattern::Exact(text.to_string())),
            Some(i) if i == text.len() - 1 => Ok(IdentityPattern::Prefix(text[..i].to_string())),
            Some(_) => Err(format!("{text:?}: `*` may only end a pattern (a prefix match)")),
        }
    }

    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityPattern::Exact(e) => identity == e,
            IdentityPattern::Prefix(p) => identity.starts_with(p.as_str()),
        }
    }
}

/// A compiled [`AuthorizationConfig`].
#[derive(Debug)]
pub struct Authorization {
    allow: Vec<IdentityPattern>,
    deny: Vec<IdentityPattern>,
    default: Verdict,
}

impl Authorization {
    /// Compiles a validated configuration.
    pub fn new(config: &AuthorizationConfig) -> Authorization {
        let compile = |v: &[String]| v.iter().filter_map(|p| IdentityPattern::parse(p).ok()).collect();
        Authorization {
            allow: compile(&config.allow),
            deny: compile(&config.deny),
            default: config.default,
        }
    }

    /// Whether a peer with `identity` (none without a verified certificate) may pass.
    pub fn admits(&self, identity: Option<&str>) -> bool {
        let Some(id) = identity else {
            return self.default == Verdict::Allow;
        };
        if self.deny.iter().any(|p| p.matches(id)) {
            return false;
        }
        if self.allow.iter().any(|p| p.matches(id)) {
            return true;
        }
        self.default == Verdict::Allow
    }
}

/// Checks the patterns of a configuration; the error is (field under the policy, reason).
pub fn check(config: &AuthorizationConfig) -> Result<(), (String, String)> {
    for (list, patterns) in [("allow", &config.allow), ("deny", &config.deny)] {
        for (i, p) in patterns.iter().enumerate() {
            IdentityPattern::parse(p).map_err(|reason| (format!("{list}[{i}]"), reason))?;
        }
    }
    Ok(())
}

/// Who is at the other end of a downstream connection, resolved once per connection.
#[derive(Debug, Default)]
pub struct PeerIdentity {
    /// The SPIFFE identity of the verified client certificate.
    pub id: Option<Arc<str>>,
    /// `authz_denied_total` for this peer on this listener, resolved at the first denial (so
    /// peers that are never refused take no identity label).
    denied: OnceLock<Counter>,
}

impl PeerIdentity {
    pub fn new(id: Option<Arc<str>>) -> PeerIdentity {
        PeerIdentity {
            id,
            denied: OnceLock::new(),
        }
    }

    /// The denial counter of this connection, made by `resolve` the first time.
    pub fn denied(&self, resolve: impl FnOnce() -> Counter) -> &Counter {
        self.denied.get_or_init(resolve)
    }
}

/// Whether the matched route's authorization (else the listener's) admits the connection's
/// peer; a refusal is counted with the peer's identity and becomes 403.
pub fn authorize(
    table: &crate::route::RoutingTable,
    listener: usize,
    matched: &crate::route::RouteMatch<'_>,
    peer: Option<&PeerIdentity>,
) -> Result<(), crate::error::ProxyError> {
    let routes = &table.listeners[listener];
    let policy = matched
        .access
        .and_then(|a| a.authorization.as_ref())
        .or(routes.authorization.as_ref());
    let Some(policy) = policy else {
        return Ok(());
    };
    let id = peer.and_then(|p| p.id.as_deref());
    if policy.admits(id) {
        return Ok(());
    }
    let resolve = || table.tls_metrics.denied(&routes.name, id);
    match peer {
        Some(peer) => peer.denied(resolve).inc(),
        None => resolve().inc(),
    };
    tracing::debug!(listener = %routes.name, identity = id.unwrap_or("none"), "request refused by authorization");
    Err(crate::error::ProxyError::Forbidden {
        identity: peer.and_then(|p| p.id.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], default: Verdict) -> Authorization {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Authorization::new(&AuthorizationConfig {
            allow: own(allow),
            deny: own(deny),
            default,
        })
    }

    #[test]
    fn deny_beats_allow_beats_default() {
        let p = policy(
            &["spiffe://td/ns/prod/*", "spiffe://td/ns/dev/sa/ci"],
            &["spiffe://td/ns/prod/sa/legacy"],
            Verdict::Deny,
        );
        assert!(p.admits(Some("spiffe://td/ns/prod/sa/web")));
        assert!(p.admits(Some("spiffe://td/ns/dev/sa/ci")));
        assert!(!p.admits(Some("spiffe://td/ns/dev/sa/ci2")));
        assert!(!p.admits(Some("spiffe://td/ns/prod/sa/legacy")));
        assert!(!p.admits(Some("spiffe://other/ns/prod/sa/web")));
        assert!(!p.admits(None));
        let open = policy(&[], &["spiffe://td/ns/bad/*"], Verdict::Allow);
        assert!(open.admits(None));
        assert!(open.admits(Some("spiffe://td/ns/good/sa/x")));
        assert!(!open.admits(Some("spiffe://td/ns/bad/sa/x")));
    }

    #[test]
    fn a_star_only_ends_a_pattern() {
        assert_eq!(
            IdentityPattern::parse("spiffe://td/*"),
            Ok(IdentityPattern::Prefix("spiffe://td/".into()))
        );
        assert!(IdentityPattern::parse("spiffe://*/ns/a").is_err());
        assert!(IdentityPattern::parse("").is_err());
        let bad = AuthorizationConfig {
            allow: vec!["ok".into()],
            deny: vec!["a*b".into()],
            default: Verdict::Deny,
        };
        assert_eq!(check(&bad).unwrap_err().0, "deny[0]");
    }
}
