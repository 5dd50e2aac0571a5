//! The errors the proxy answers itself, and their one mapping to an HTTP status, a metric label
//! and a short plain-text body that names the cause.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, StatusCode};

/// The header that carries [`ErrorKind::label`] on a response the proxy made itself.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-cogmesh-error");

/// The cause of a response the proxy made itself. The discriminant indexes per-cause metric
/// handles, so keep [`ErrorKind::ALL`] in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NoRoute = 0,
    NoEndpoints = 1,
    UpstreamConnect = 2,
    UpstreamTimeout = 3,
    UpstreamReset = 4,
    HeaderTooLarge = 5,
    RateLimited = 6,
    Overloaded = 7,
    Shed = 8,
    Forbidden = 9,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::NoRoute,
        ErrorKind::NoEndpoints,
        ErrorKind::UpstreamConnect,
        ErrorKind::UpstreamTimeout,
        ErrorKind::UpstreamReset,
        ErrorKind::HeaderTooLarge,
        ErrorKind::RateLimited,
        ErrorKind::Overloaded,
        ErrorKind::Shed,
        ErrorKind::Forbidden,
    ];

    /// The metric label and `x-cogmesh-error` header value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoEndpoints => "no_endpoints",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Shed => "shed",
            ErrorKind::Forbidden => "forbidden",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoEndpoints | ErrorKind::Overloaded | ErrorKind::Shed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::UpstreamConnect | ErrorKind::UpstreamReset => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The `grpc-status` a gRPC caller gets, and the HTTP status it comes with: a refusal the
    /// caller should back off from is an ordinary gRPC error (HTTP 200, trailers-only).
    pub fn grpc(self) -> (&'static str, StatusCode) {
        match self {
            ErrorKind::UpstreamTimeout => ("4", self.status()),
            ErrorKind::RateLimited => ("8", StatusCode::OK),
            // PERMISSION_DENIED
            ErrorKind::Forbidden => ("7", StatusCode::OK),
            _ => ("14", self.status()),
        }
    }
}

/// A failed request, with what the operator needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request and the listener has no default service")]
    NoRoute,
    #[error("service {service:?} has no endpoints")]
    NoEndpoints { service: String },
    #[error("cannot connect to upstream {endpoint}: {cause}")]
    UpstreamConnect { endpoint: SocketAddr, cause: String },
    #[error("upstream {endpoint} sent no response headers within {} ms", after.as_millis())]
    UpstreamTimeout { endpoint: SocketAddr, after: Duration },
    #[error("upstream {endpoint} failed the request: {cause}")]
    UpstreamReset { endpoint: SocketAddr, cause: String },
    #[error("no response within the request timeout of {} ms", after.as_millis())]
    RequestTimeout { after: Duration },
    #[error("the request has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("rate limit of {} requests exceeded; retry in {} s", .0.limit, crate::ratelimit::header_secs(.0.retry_after))]
    RateLimited(crate::ratelimit::Decision),
    #[error("service {service:?} is overloaded: circuit breaker threshold {} reached", .threshold.as_str())]
    Overloaded {
        service: String,
        threshold: crate::breaker::Threshold,
    },
    #[error("shed: the proxy is at its concurrency limit for {} requests", .priority.as_str())]
    Shed {
        priority: crate::admission::Priority,
        retry_after_secs: u64,
    },
    #[error("peer {} is not allowed on this route", identity.as_deref().unwrap_or("without a verified identity"))]
    Forbidden { identity: Option<std::sync::Arc<str>> },
}

impl ProxyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::NoRoute => ErrorKind::NoRoute,
            ProxyError::NoEndpoints { .. } => ErrorKind::NoEndpoints,
            ProxyError::UpstreamConnect { .. } => ErrorKind::UpstreamConnect,
            ProxyError::UpstreamTimeout { .. } | ProxyError::RequestTimeout { .. } => {
                ErrorKind::UpstreamTimeout
            }
            ProxyError::UpstreamReset { .. } => ErrorKind::UpstreamReset,
            ProxyError::TooManyHeaders { .. } => ErrorKind::HeaderTooLarge,
            ProxyError::RateLimited(_) => ErrorKind::RateLimited,
            ProxyError::Overloaded { .. } => ErrorKind::Overloaded,
            ProxyError::Shed { .. } => ErrorKind::Shed,
            ProxyError::Forbidden { .. } => ErrorKind::Forbidden,
        }
    }

    /// Classifies a client error from hyper-util's pooled client.
    pub fn from_client(endpoint: SocketAddr, err: &hyper_util::client::legacy::Error) -> Self {
        let cause = error_chain(err);
        if err.is_connect() {
            ProxyError::UpstreamConnect { endpoint, cause }
        } else {
            ProxyError::UpstreamReset { endpoint, cause }
        }
    }
}

/// `err` and its sources joined with ": ", the way an operator reads a cause.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_one_status_and_label() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert_eq!(ErrorKind::NoEndpoints.status(), 503);
        assert_eq!(ErrorKind::UpstreamConnect.status(), 502);
        assert_eq!(ErrorKind::UpstreamTimeout.status(), 504);
        assert_eq!(ErrorKind::UpstreamTimeout.label(), "upstream_timeout");
        assert_eq!(ErrorKind::RateLimited.status(), 429);
        assert_eq!(ErrorKind::RateLimited.grpc(), ("8", StatusCode::OK));
        assert_eq!(ErrorKind::Forbidden.status(), 403);
        assert_eq!(ErrorKind::Forbidden.grpc(), ("7", StatusCode::OK));
        assert_eq!(
            ErrorKind::NoEndpoints.grpc(),
            ("14", StatusCode::SERVICE_UNAVAILABLE)
        );
    }
}
