//! Response security headers per route: HSTS, `x-content-type-options`, `x-frame-options`,
//! `referrer-policy`, and optionally a content security policy.
//!
//! `security_headers: {}` sets the defaults below; each field can be changed or set to `""` to
//! leave that header out. The proxy's value replaces one the application sent, so a route's
//! policy holds whatever the application does. The header values are parsed once, when the
//! routing table is built; a response pays a few header inserts.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// Two years with subdomains: what HSTS preload lists ask for.
pub const DEFAULT_HSTS: &str = "max-age=63072000; includeSubDomains";
pub const DEFAULT_CONTENT_TYPE_OPTIONS: &str = "nosniff";
pub const DEFAULT_FRAME_OPTIONS: &str = "DENY";
pub const DEFAULT_REFERRER_POLICY: &str = "no-referrer";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecurityHeadersConfig {
    #[serde(default = "default_hsts")]
    pub strict_transport_security: String,
    #[serde(default = "default_content_type_options")]
    pub content_type_options: String,
    #[serde(default = "default_frame_options")]
    pub frame_options: String,
    #[serde(default = "default_referrer_policy")]
    pub referrer_policy: String,
    /// None by default: a useful policy depends on the application.
    #[serde(default)]
    pub content_security_policy: String,
}

fn default_hsts() -> String {
    DEFAULT_HSTS.into()
}
fn default_content_type_options() -> String {
    DEFAULT_CONTENT_TYPE_OPTIONS.into()
}
fn default_frame_options() -> String {
    DEFAULT_FRAME_OPTIONS.into()
}
fn default_referrer_policy() -> String {
    DEFAULT_REFERRER_POLICY.into()
}

impl SecurityHeadersConfig {
    fn fields(&self) -> [(&'static str, HeaderName, &str); 5] {
        [
            (
                "strict_transport_security",
                http::header::STRICT_TRANSPORT_SECURITY,
                &self.strict_transport_security,
            ),
            (
                "content_type_options",
                http::header::X_CONTENT_TYPE_OPTIONS,
                &self.content_type_options,
            ),
            (
                "frame_options",
                http::header::X_FRAME_OPTIONS,
                &self.frame_options,
            ),
            (
                "referrer_policy",
                http::header::REFERRER_POLICY,
                &self.referrer_policy,
            ),
            (
                "content_security_policy",
                http::header::CONTENT_SECURITY_POLICY,
                &self.content_security_policy,
            ),
        ]
    }

    /// The field and reason of a value that is not a valid header value.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (field, _, value) in self.fields() {
            if HeaderValue::from_str(value).is_err() {
                return Err((
                    field.to_string(),
                    format!("{value:?} is not a valid header value"),
                ));
            }
        }
        Ok(())
    }
}

/// The headers a route adds, parsed.
#[derive(Debug)]
pub struct SecurityHeaders {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl SecurityHeaders {
    pub fn new(config: &SecurityHeadersConfig) -> SecurityHeaders {
        let headers = config
            .fields()
            .into_iter()
            .filter(|(_, _, v)| !v.is_empty())
            .filter_map(|(_, name, v)| Some((name, HeaderValue::from_str(v).ok()?)))
            .collect();
        SecurityHeaders { headers }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_replace_and_empty_fields_are_left_out() {
        let mut config: SecurityHeadersConfig = serde_yaml_ng::from_str("{ frame_options: '' }").unwrap();
        let h = SecurityHeaders::new(&config);
        let mut map = HeaderMap::new();
        map.insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("bogus"),
        );
        h.apply(&mut map);
        assert_eq!(map[http::header::STRICT_TRANSPORT_SECURITY], DEFAULT_HSTS);
        assert_eq!(map[http::header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(map[http::header::REFERRER_POLICY], "no-referrer");
        assert!(!map.contains_key(http::header::X_FRAME_OPTIONS));
        assert!(!map.contains_key(http::header::CONTENT_SECURITY_POLICY));
        config.referrer_policy = "bad\nvalue".into();
        assert_eq!(config.check().unwrap_err().0, "referrer_policy");
    }
}
