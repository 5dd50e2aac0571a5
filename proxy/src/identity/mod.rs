//! The sidecar's workload identity: a key made here (it never leaves the sidecar), a CSR for the
//! SPIFFE ID, `Identity.Certify` at the control plane, and the answer written into the identity
//! directory that the TLS code watches:
//!
//! - `ca.pem`: the trust bundle;
//! - `key.pem`: the private key (PKCS#8, mode 0600);
//! - `cert.pem`: the leaf, then its chain.
//!
//! Each file is replaced atomically (a temp file in the same directory, then `rename`), in that
//! order: `cert.pem` last, so a reader that reloads when `cert.pem` changes finds the key that
//! goes with it. The certificate is renewed (with a new key) at [`DEFAULT_RENEW_FRACTION`] of
//! its remaining lifetime, and after a failure with exponential backoff; the files keep the
//! last good certificate meanwhile.
//!
//! The first request proves the identity with a bootstrap token (`token` or `token_file`).
//! When the control plane serves TLS (`control_ca` given), calls go over TLS verified against
//! that bundle, and renewals present the current certificate (mTLS), which proves the identity
//! by itself.
//!
//! ```yaml
//! identity:
//!   name: spiffe://cogmesh.local/ns/default/sa/web
//!   dir: /var/run/cogmesh/identity
//!   token_file: /var/run/secrets/cogmesh/token     # or token: ...
//!   control: 127.0.0.1:7070                        # default: control.address
//!   control_ca: /etc/cogmesh/ca.pem                # the control plane serves TLS
//! ```
//!
//! Metrics: `identity_cert_expiry_timestamp_seconds` (Unix time the certificate in the files
//! expires) and `identity_renewal_total{result="ok|failed"}`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cogmesh_proto::v1::identity_client::IdentityClient;
use cogmesh_proto::v1::{CertifyRequest, CertifyResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Renew once this fraction of the certificate's remaining lifetime has passed.
pub const DEFAULT_RENEW_FRACTION: f64 = 0.7;
/// First retry delay after a failed request; doubles up to [`MAX_RETRY_MS`].
pub const FIRST_RETRY_MS: u64 = 500;
pub const MAX_RETRY_MS: u64 = 60_000;
/// How long one Certify call may take.
pub const CERTIFY_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The SPIFFE ID asked for: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub name: String,
    /// Where `cert.pem`, `key.pem` and `ca.pem` are written.
    pub dir: PathBuf,
    /// The bootstrap token, inline ...
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// ... or read from this file at every request (a mounted secret that may rotate).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The control plane's gRPC address; default: the first of `control.addresses`.
    #[serde(default)]
    pub control: Option<SocketAddr>,
    /// The CA bundle that the control plane's TLS certificate is verified against; without
    /// it the control plane is called in plaintext.
    #[serde(default)]
    pub control_ca: Option<PathBuf>,
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
}

fn default_renew_fraction() -> f64 {
    DEFAULT_RENEW_FRACTION
}

impl IdentityConfig {
    /// Field (under `identity.`) and reason of the first problem.
    pub fn check(&self, has_control: bool) -> Result<(), (&'static str, String)> {
        let Some(rest) = self.name.strip_prefix("spiffe://") else {
            return Err((
                "name",
                format!("{:?} is not a SPIFFE ID (spiffe://...)", self.name),
            ));
        };
        let shape = rest
            .split_once('/')
            .map(|(domain, path)| (domain, path.split('/').collect::<Vec<_>>()));
        match shape {
            Some((domain, p))
                if !domain.is_empty()
                    && p.len() == 4
                    && p[0] == "ns"
                    && p[2] == "sa"
                    && !p[1].is_empty()
                    && !p[3].is_empty() => {}
            _ => {
                return Err((
                    "name",
                    format!(
                        "{:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                        self.name
                    ),
                ))
            }
        }
        if self.dir.as_os_str().is_empty() {
            return Err(("dir", "must not be empty".into()));
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(("token", "give token or token_file, not both".into()));
        }
        if self.token.is_none() && self.token_file.is_none() {
            return Err((
                "token_file",
                "a bootstrap token (token or token_file) is needed for the first certificate".into(),
            ));
        }
        if self.control.is_none() && !has_control {
            return Err(("control", "set identity.control or the control section".into()));
        }
        if !(self.renew_fraction > 0.0 && self.renew_fraction < 1.0) {
            return Err((
                "renew_fraction",
                format!("must be between 0 and 1, got {}", self.renew_fraction),
            ));
        }
        Ok(())
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    pub result: &'static str,
}

/// The identity client's metrics, registered with the proxy's.
#[derive(Clone, Default)]
pub struct IdentityMetrics {
    pub expiry: Gauge,
    pub renewals: Family<RenewalLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "identity_cert_expiry_timestamp",
            "When the workload certificate in the identity directory expires (Unix time)",
            Unit::Seconds,
            self.expiry.clone(),
        );
        registry.register(
            "identity_renewal",
            "Certificate requests to the control plane, by result",
            self.renewals.clone(),
        );
    }

    fn count(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.renewals.get_or_create(&RenewalLabels { result }).inc();
    }
}

// === the pure parts ===

/// How long to wait before renewing a certificate valid until `valid_until` (Unix s), at `now`.
pub fn renew_delay(now: SystemTime, valid_until_unix_s: i64, fraction: f64) -> Duration {
    let now_s = now.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let left = (valid_until_unix_s as f64 - now_s).max(0.0);
    Duration::from_secs_f64(left * fraction)
}

/// The delay before retry `attempt` (0-based) after failures: doubling from
/// [`FIRST_RETRY_MS`], capped at [`MAX_RETRY_MS`], scaled by `jitter` ∈ [0.5, 1].
pub fn retry_delay(attempt: u32, jitter: f64) -> Duration {
    let ms = FIRST_RETRY_MS
        .saturating_mul(1u64 << attempt.min(20))
        .min(MAX_RETRY_MS);
    Duration::from_millis((ms as f64 * jitter.clamp(0.5, 1.0)) as u64)
}

/// A new key and a CSR (DER) for `name`; the key as PKCS#8 PEM.
pub fn key_and_csr(name: &str) -> Result<(String, Vec<u8>), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        name.try_into().map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Replaces `dir/name` with `bytes` atomically (temp file, then rename).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Writes the three files, `cert.pem` last.
pub fn write_identity(dir: &Path, key_pem: &str, response: &CertifyResponse) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(dir, "ca.pem", response.trust_bundle_pem.as_bytes(), 0o644)?;
    write_atomic(dir, "key.pem", key_pem.as_bytes(), 0o600)?;
    write_atomic(dir, "cert.pem", response.certificate_chain_pem.as_bytes(), 0o644)
}

// === the client ===

/// Gets a certificate, writes it, renews it; forever.
pub async fn run(config: IdentityConfig, control: String, metrics: IdentityMetrics) {
    let mut failures = 0u32;
    loop {
        // Every other retry goes without the current certificate (see `control_channel`), so
        // neither a rejected certificate nor a token removed after the first one locks it out.
        let delay = match certify(&config, &control, failures.is_multiple_of(2)).await {
            Ok((key_pem, response)) => match write_identity(&config.dir, &key_pem, &response) {
                Ok(()) => {
                    metrics.count(true);
                    metrics.expiry.set(response.valid_until_unix_s);
                    failures = 0;
                    let delay = renew_delay(
                        SystemTime::now(),
                        response.valid_until_unix_s,
                        config.renew_fraction,
                    );
                    info!(
                        identity = config.name,
                        dir = %config.dir.display(),
                        valid_until = response.valid_until_unix_s,
                        renew_in_ms = delay.as_millis() as u64,
                        "workload certificate written"
                    );
                    delay
                }
                Err(e) => {
                    warn!(dir = %config.dir.display(), "cannot write the identity files: {e}");
                    metrics.count(false);
                    failures += 1;
                    retry_delay(failures - 1, 0.5 + fastrand::f64() / 2.0)
                }
            },
            Err(e) => {
                metrics.count(false);
                failures += 1;
                let delay = retry_delay(failures - 1, 0.5 + fastrand::f64() / 2.0);
                warn!(
                    identity = config.name,
                    attempt = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "certificate request failed: {e}"
                );
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// One Certify call with a new key: the key (PEM) and the answer.
async fn certify(
    config: &IdentityConfig,
    control: &str,
    may_use_current: bool,
) -> Result<(String, CertifyResponse), String> {
    let (key_pem, csr) = key_and_csr(&config.name)?;
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|e| {
                // Renewals over mTLS need no token; a first request without one fails
                // with "token: missing", logged below.
                tracing::debug!(file = %f.display(), "cannot read the bootstrap token: {e}");
                String::new()
            }),
        (None, None) => String::new(),
    };
    let channel = control_channel(Some(config), control, may_use_current).await?;
    let mut client = IdentityClient::new(channel);
    let request = CertifyRequest {
        csr,
        identity: config.name.clone(),
        token,
    };
    let call = client.certify(request);
    let response = tokio::time::timeout(Duration::from_millis(CERTIFY_TIMEOUT_MS), call)
        .await
        .map_err(|_| "the control plane did not answer in time".to_string())?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    if response.certificate_chain_pem.is_empty() {
        return Err("the control plane sent no certificate".into());
    }
    Ok((key_pem, response))
}

/// A channel to the control plane (also for `MeshControl.Connect`): plaintext, or, with
/// `control_ca`, TLS verified against it, presenting the current certificate when there is one
/// (and `may_use_current`: after a failure the next try goes without it, so a certificate the
/// control plane no longer accepts cannot lock the sidecar out while the token still works).
pub async fn control_channel(
    config: Option<&IdentityConfig>,
    control: &str,
    may_use_current: bool,
) -> Result<tonic::transport::Channel, String> {
    let Some((config, ca_file)) = config.and_then(|c| Some((c, c.control_ca.as_ref()?))) else {
        return tonic::transport::Endpoint::from_shared(format!("http://{control}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot reach the control plane at {control}: {e}"));
    };
    let ca = std::fs::read_to_string(ca_file)
        .map_err(|e| format!("identity.control_ca: cannot read {}: {e}", ca_file.display()))?;
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if may_use_current {
        if let Some(current) = current_identity(&config.dir) {
            tls = tls.identity(current);
        }
    }
    tonic::transport::Endpoint::from_shared(format!("https://{control}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot reach the control plane at {control} over TLS: {e}"))
}

/// The certificate and key in `dir`, if both are there.
fn current_identity(dir: &Path) -> Option<tonic::transport::Identity> {
    let cert = std::fs::read(dir.join("cert.pem")).ok()?;
    let key = std::fs::read(dir.join("key.pem")).ok()?;
    Some(tonic::transport::Identity::from_pem(cert, key))
}

/// How long a sidecar whose TLS identity comes from the control plane waits for its first
/// certificate at start before it gives up (exit 2).
pub const FIRST_CERTIFICATE_TIMEOUT_SECS: u64 = 30;

/// The control plane the client asks: `identity.control`, else the first of `control.addresses`.
fn control_address(config: &crate::config::ProxyConfig) -> Option<String> {
    let identity = config.identity.as_ref()?;
    match identity.control {
        Some(address) => Some(address.to_string()),
        None => config.control.as_ref()?.addresses.first().cloned(),
    }
}

/// Before TLS starts: when the identity directory has no certificate yet, asks for one (with
/// the usual backoff) for at most `limit`, so the sidecar's listeners and origination start
/// with the identity the control plane issued. Nothing to do without `identity`, or when a
/// certificate is there already (the background client renews it).
pub async fn first_certificate(
    config: &crate::config::ProxyConfig,
    metrics: &IdentityMetrics,
    limit: Duration,
) -> Result<(), String> {
    let Some(identity) = config.identity.as_ref() else {
        return Ok(());
    };
    if identity.dir.join(CERT_FILE).exists() {
        return Ok(());
    }
    let control = control_address(config).ok_or_else(|| {
        "identity: no control plane address (identity.control or control.addresses)".to_string()
    })?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut failures = 0u32;
    loop {
        let attempt = certify(identity, &control, false)
            .await
            .and_then(|(key_pem, response)| {
                write_identity(&identity.dir, &key_pem, &response)
                    .map(|()| response)
                    .map_err(|e| {
                        format!(
                            "cannot write the identity files in {}: {e}",
                            identity.dir.display()
                        )
                    })
            });
        match attempt {
            Ok(response) => {
                metrics.count(true);
                metrics.expiry.set(response.valid_until_unix_s);
                info!(identity = identity.name, "first workload certificate written");
                return Ok(());
            }
            Err(e) => {
                metrics.count(false);
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "identity: no workload certificate for {} from {control} within {} s: {e}",
                        identity.name,
                        limit.as_secs()
                    ));
                }
                warn!(
                    identity = identity.name,
                    "waiting for the first workload certificate: {e}"
                );
                tokio::time::sleep(retry_delay(failures, 0.75)).await;
                failures += 1;
            }
        }
    }
}

/// Starts the client if `identity` is configured (on the current runtime).
pub fn spawn(
    config: &crate::config::ProxyConfig,
    metrics: &IdentityMetrics,
) -> Option<tokio::task::JoinHandle<()>> {
    let identity = config.identity.clone()?;
    let control = control_address(config)?;
    Some(tokio::spawn(run(identity, control, metrics.clone())))
}

/// Shared with the TLS code: the files' names in the identity directory.
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_FILE: &str = "ca.pem";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_the_fraction_of_what_is_left() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(renew_delay(now, 1_100, 0.7), Duration::from_secs(70));
        assert_eq!(renew_delay(now, 900, 0.7), Duration::ZERO);
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(retry_delay(0, 1.0), Duration::from_millis(500));
        assert_eq!(retry_delay(3, 1.0), Duration::from_millis(4_000));
        assert_eq!(retry_delay(3, 0.5), Duration::from_millis(2_000));
        assert_eq!(retry_delay(30, 1.0), Duration::from_millis(MAX_RETRY_MS));
    }

    #[test]
    fn the_csr_names_the_identity_and_the_files_replace_atomically() {
        let (key, csr) = key_and_csr("spiffe://cogmesh.local/ns/default/sa/web").unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        assert!(!csr.is_empty());
        let dir = std::env::temp_dir().join(format!("cogmesh-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let response = |c: &str| CertifyResponse {
            certificate_chain_pem: c.into(),
            trust_bundle_pem: "bundle".into(),
            valid_until_unix_s: 1,
            valid_from_unix_s: 0,
        };
        write_identity(&dir, &key, &response("one")).unwrap();
        write_identity(&dir, &key, &response("two")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(CERT_FILE)).unwrap(), "two");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temp files left: {names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_config_is_checked() {
        let ok = IdentityConfig {
            name: "spiffe://cogmesh.local/ns/default/sa/web".into(),
            dir: "/tmp/x".into(),
            token: Some("t".into()),
            token_file: None,
            control: None,
            control_ca: None,
            renew_fraction: 0.7,
        };
        assert!(ok.check(true).is_ok());
        assert_eq!(ok.check(false).unwrap_err().0, "control");
        let bad = IdentityConfig {
            name: "spiffe://cogmesh.local/web".into(),
            ..ok.clone()
        };
        assert_eq!(bad.check(true).unwrap_err().0, "name");
        let bad = IdentityConfig {
            token: None,
            ..ok.clone()
        };
        assert_eq!(bad.check(true).unwrap_err().0, "token_file");
        let bad = IdentityConfig {
            renew_fraction: 1.0,
            ..ok
        };
        assert_eq!(bad.check(true).unwrap_err().0, "renew_fraction");
    }
}
