//! The sidecar's identity: loaded from PEM files, checked (the key matches the certificate, the
//! trust bundle parses), kept behind an `ArcSwap`, and swapped when the files change.
//!
//! The identity client writes each file atomically (temporary file + rename), so the directory
//! is watched rather than the files (a rename replaces the inode a file watch would follow).
//! A new set of files is loaded as a whole; anything wrong with it — unreadable, not PEM, a key
//! that does not match the certificate, a certificate already expired — is refused with a log
//! line naming the file, the field and the reason, counted, and the identity in force stays.
//! Connections already open keep the identity they were established with; new handshakes use
//! the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tracing::{info, warn};

use super::{IdentityFiles, TlsMetrics};

/// One loaded identity.
#[derive(Debug)]
pub struct Identity {
    pub key: Arc<CertifiedKey>,
    /// The trust bundle; `None` when no `ca` file is configured.
    pub roots: Option<Arc<RootCertStore>>,
    /// Verifies client certificates against `roots` (chain and validity; who may do what is
    /// [`super::authz`]'s business).
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The leaf's SPIFFE URI SAN, if it has one.
    pub spiffe_id: Option<String>,
    /// The leaf's `notAfter`, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// The bytes the identity was loaded from, to skip reloads that change nothing.
    source: Vec<u8>,
}

/// Why a set of identity files was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {path}: {reason}")]
pub struct LoadError {
    /// The configuration field that names the file (`tls.cert`, `tls.identity_dir`, ...).
    pub field: String,
    pub path: String,
    pub reason: String,
}

fn load_error(field: &str, path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError {
        field: field.to_string(),
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| load_error(field, path, format!("cannot read: {e}")))
}

impl Identity {
    /// Loads and checks the files.
    pub fn load(files: &IdentityFiles) -> Result<Identity, LoadError> {
        let (cert_field, cert_path) = (&files.cert.0, &files.cert.1);
        let (key_field, key_path) = (&files.key.0, &files.key.1);
        let cert_pem = read(cert_field, cert_path)?;
        let key_pem = read(key_field, key_path)?;
        let ca_pem = match &files.ca {
            Some((field, path)) => Some((field, path, read(field, path)?)),
            None => None,
        };

        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| load_error(cert_field, cert_path, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(load_error(cert_field, cert_path, "no CERTIFICATE block found"));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| load_error(key_field, key_path, format!("not a PEM private key: {e}")))?;
        let provider = super::provider();
        let leaf = chain[0].clone();
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => load_error(
                key_field,
                key_path,
                format!(
                    "the key does not match the certificate in {}",
                    cert_path.display()
                ),
            ),
            e => load_error(key_field, key_path, format!("unusable private key: {e}")),
        })?;
        let facts = leaf_facts(&leaf).map_err(|reason| {
            load_error(
                cert_field,
                cert_path,
                format!("cannot parse the certificate: {reason}"),
            )
        })?;

        let (roots, client_verifier) = match &ca_pem {
            None => (None, None),
            Some((field, path, pem)) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert =
                        cert.map_err(|e| load_error(field, path, format!("not a PEM trust bundle: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| load_error(field, path, format!("unusable CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(load_error(field, path, "no CERTIFICATE block found"));
                }
                let roots = Arc::new(roots);
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| load_error(field, path, format!("unusable trust bundle: {e}")))?;
                (Some(roots), Some(verifier))
            }
        };
        let mut source = cert_pem;
        source.extend_from_slice(&key_pem);
        if let Some((_, _, pem)) = ca_pem {
            source.extend_from_slice(&pem);
        }
        Ok(Identity {
            key: Arc::new(certified),
            roots,
            client_verifier,
            spiffe_id: facts.spiffe_id,
            not_after_unix: facts.not_after_unix,
            source,
        })
    }

    pub fn is_expired(&self) -> bool {
        unix_now() > self.not_after_unix
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the proxy reads from a leaf certificate besides what rustls checks.
pub struct LeafFacts {
    pub spiffe_id: Option<String>,
    pub not_after_unix: i64,
}

/// The SPIFFE URI SAN and expiry of a DER certificate.
pub fn leaf_facts(der: &[u8]) -> Result<LeafFacts, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spiffe_id = cert.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
            _ => None,
        })
    });
    Ok(LeafFacts {
        spiffe_id,
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The identity in force, swapped by the watcher.
pub struct IdentityStore {
    current: ArcSwap<Identity>,
    files: IdentityFiles,
    metrics: TlsMetrics,
    /// The sidecar's own identity (its expiry is the exported one), not a listener's
    /// certificate.
    primary: bool,
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore")
            .field("files", &self.files)
            .finish()
    }
}

impl IdentityStore {
    /// Loads the identity for the first time (an expired certificate is loaded with a
    /// warning: the process still serves what does not need it, and a renewal replaces it).
    pub fn load(
        files: IdentityFiles,
        metrics: TlsMetrics,
        primary: bool,
    ) -> Result<Arc<IdentityStore>, LoadError> {
        let identity = Identity::load(&files)?;
        if identity.is_expired() {
            warn!(cert = %files.cert.1.display(), "the sidecar's certificate has expired; peers will refuse it until it is renewed");
        }
        if primary {
            metrics.set_identity(&identity);
        }
        info!(
            identity = identity.spiffe_id.as_deref().unwrap_or("-"),
            cert = %files.cert.1.display(),
            "TLS identity loaded"
        );
        Ok(Arc::new(IdentityStore {
            current: ArcSwap::from_pointee(identity),
            files,
            metrics,
            primary,
        }))
    }

    /// The identity in force (one atomic load).
    pub fn current(&self) -> arc_swap::Guard<Arc<Identity>> {
        self.current.load()
    }

    /// Loads the files again and swaps the identity in if they changed and are good.
    pub fn reload(&self) -> Result<bool, LoadError> {
        let next = Identity::load(&self.files)?;
        if next.source == self.current.load().source {
            return Ok(false);
        }
        if next.is_expired() {
            return Err(load_error(
                &self.files.cert.0,
                &self.files.cert.1,
                "the new certificate has already expired",
            ));
        }
        if self.primary {
            self.metrics.set_identity(&next);
        }
        self.current.store(Arc::new(next));
        Ok(true)
    }

    /// The directories that hold the identity files.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [
            Some(&self.files.cert),
            Some(&self.files.key),
            self.files.ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|(_, p)| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
        .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    fn watches(&self, path: &Path) -> bool {
        [
            Some(&self.files.cert),
            Some(&self.files.key),
            self.files.ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|(_, p)| p.file_name() == path.file_name())
    }
}

/// Several events arrive for one rotation (a rename per file): wait this long for quiet.
pub const RELOAD_DEBOUNCE_MS: u64 = 100;

/// A refused set of files is refused for good if nothing changes for this long.
pub const RELOAD_SETTLE_MS: u64 = 500;

/// Watches the identity files until the process ends, reloading after each change.
pub async fn watch(store: Arc<IdentityStore>) {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let events = {
        let store = Arc::clone(&store);
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if !event.kind.is_access() && event.paths.iter().any(|p| store.watches(p)) {
                    let _ = tx.send(());
                }
            }
        })
    };
    let mut watcher = match events {
        Ok(w) => w,
        Err(e) => {
            warn!("cannot watch the identity files; rotations need a restart: {e}");
            return;
        }
    };
    for dir in store.dirs() {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            warn!(dir = %dir.display(), "cannot watch the identity directory; rotations need a restart: {e}");
        }
    }
    let mut pending = false;
    loop {
        if !pending && rx.recv().await.is_none() {
            return;
        }
        pending = false;
        tokio::time::sleep(Duration::from_millis(RELOAD_DEBOUNCE_MS)).await;
        while rx.try_recv().is_ok() {}
        match store.reload() {
            Ok(true) => {
                store.metrics.identity_reloads(true).inc();
                let current = store.current();
                info!(
                    identity = current.spiffe_id.as_deref().unwrap_or("-"),
                    not_after_unix = current.not_after_unix,
                    "TLS identity rotated"
                );
            }
            Ok(false) => {}
            Err(e) => {
                // A rotation replaces the files one by one: a key that does not match yet may
                // be followed by its certificate. Refuse only once the files stay as they are.
                if let Ok(Some(())) =
                    tokio::time::timeout(Duration::from_millis(RELOAD_SETTLE_MS), rx.recv()).await
                {
                    pending = true;
                    continue;
                }
                store.metrics.identity_reloads(false).inc();
                warn!("new TLS identity refused, keeping the one in force: {e}");
            }
        }
    }
}
