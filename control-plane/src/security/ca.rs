//! The mesh's certificate authority (`rcgen`): signs short-lived workload certificates whose
//! only name is a SPIFFE URI SAN.
//!
//! The root is loaded from PEM files (production), or generated: kept in a directory so a
//! restart keeps the same trust bundle (development), or in memory only. Signing checks the
//! CSR's signature and that it asks for nothing but the identity the caller proved; the
//! certificate's names, key usages and lifetime come from here, never from the CSR.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::CaSource;

/// How long a generated root is valid (10 years).
pub const GENERATED_ROOT_TTL_DAYS: u64 = 3650;
/// A certificate's `notBefore` is this far in the past, so peers with a slightly slow clock
/// accept it at once.
pub const BACKDATE_S: u64 = 60;

/// Why a CA could not be set up: which source field, and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct CaError {
    /// The `control.yaml` field the problem is in (`identity.ca.cert`, ...).
    pub field: &'static str,
    pub reason: String,
}

/// Why a CSR was refused; each maps to one gRPC status in [`super::certify`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignError {
    #[error("csr: not a PKCS#10 request (DER or PEM): {0}")]
    Malformed(String),
    #[error("csr: the request asks for {asked:?}, not {identity:?}")]
    OtherName { asked: String, identity: String },
    #[error("csr: a workload certificate cannot be a CA")]
    AsksForCa,
    #[error("signing failed: {0}")]
    Internal(String),
}

/// A certificate issued for a workload.
pub struct Issued {
    /// Leaf, then the chain up to (not including) the root.
    pub chain_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl CertificateAuthority {
    /// Loads or generates the root as `source` says.
    pub fn from_source(source: &CaSource, trust_domain: &str) -> Result<Self, CaError> {
        match (&source.cert, &source.key, &source.dir) {
            (Some(cert), Some(key), _) => Self::load(cert, key),
            (_, _, Some(dir)) => Self::generated_in(dir, trust_domain),
            _ => Self::generate(trust_domain).map(|(ca, _)| ca),
        }
    }

    /// The CA whose certificate and key are in these PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |field: &'static str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| CaError {
                field,
                reason: format!("cannot read {}: {e}", p.display()),
            })
        };
        let (cert_pem, key_pem) = (read("identity.ca.cert", cert)?, read("identity.ca.key", key)?);
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| CaError {
            field: "identity.ca.key",
            reason: format!("{}: not a PEM private key: {e}", key.display()),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|e| CaError {
            field: "identity.ca.cert",
            reason: format!("{}: not a PEM CA certificate: {e}", cert.display()),
        })?;
        Ok(CertificateAuthority {
            issuer,
            root_pem: cert_pem,
        })
    }

    /// The root kept in `dir` (`ca.pem`, `ca-key.pem`), made there on first use.
    pub fn generated_in(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if cert.exists() && key.exists() {
            return Self::load(&cert, &key);
        }
        let fail = |e: std::io::Error| CaError {
            field: "identity.ca.dir",
            reason: format!("cannot keep the generated root in {}: {e}", dir.display()),
        };
        let (ca, key_pem) = Self::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(fail)?;
        write_private(&key, key_pem.as_bytes()).map_err(fail)?;
        std::fs::write(&cert, &ca.root_pem).map_err(fail)?;
        tracing::info!(dir = %dir.display(), "generated a development CA root");
        Ok(ca)
    }

    /// A new self-signed root (and its key, PEM).
    pub fn generate(trust_domain: &str) -> Result<(Self, String), CaError> {
        let internal = |e: rcgen::Error| CaError {
            field: "identity.ca",
            reason: format!("cannot generate a root: {e}"),
        };
        let key = KeyPair::generate().map_err(internal)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cogmesh root CA ({trust_domain})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(BACKDATE_S)).into();
        params.not_after = (now + Duration::from_secs(GENERATED_ROOT_TTL_DAYS * 86_400)).into();
        let cert = params.self_signed(&key).map_err(internal)?;
        let key_pem = key.serialize_pem();
        let ca = CertificateAuthority {
            issuer: Issuer::new(params, key),
            root_pem: cert.pem(),
        };
        Ok((ca, key_pem))
    }

    /// The trust bundle (the root certificate, PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs `csr` (DER or PEM) for `identity`, valid for `ttl` from now.
    pub fn sign(&self, csr: &[u8], identity: &str, ttl: Duration) -> Result<Issued, SignError> {
        let request = parse_csr(csr)?;
        for san in &request.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == identity => {}
                other => {
                    return Err(SignError::OtherName {
                        asked: san_text(other),
                        identity: identity.to_string(),
                    })
                }
            }
        }
        if !matches!(request.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(SignError::AsksForCa);
        }
        let internal = |e: rcgen::Error| SignError::Internal(e.to_string());
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().map_err(internal)?)];
        // Empty subject: the URI SAN is the only name (rcgen then marks the SAN critical, as
        // RFC 5280 asks).
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rand::random::<[u8; 16]>().map(|b| b & 0x7f).to_vec().into());
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(BACKDATE_S);
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(internal)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            not_before,
            not_after,
        })
    }
}

impl CertificateAuthority {
    /// A certificate for the control plane itself: `names` (DNS or IP) and its SPIFFE ID, for
    /// `key`, PEM.
    pub fn sign_server(
        &self,
        key: &KeyPair,
        names: &[String],
        identity: &str,
        ttl: Duration,
    ) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.subject_alt_names.push(SanType::URI(identity.try_into()?));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "cogmesh control plane");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(BACKDATE_S)).into();
        params.not_after = (now + ttl).into();
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, SignError> {
    let malformed = |e: rcgen::Error| SignError::Malformed(e.to_string());
    if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(csr).map_err(|e| SignError::Malformed(e.to_string()))?;
        CertificateSigningRequestParams::from_pem(text).map_err(malformed)
    } else {
        CertificateSigningRequestParams::from_der(&csr.into()).map_err(malformed)
    }
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(u) => u.as_str().to_string(),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://cogmesh.local/ns/default/sa/web";

    fn csr(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_a_csr_for_the_proven_identity_only() {
        let (ca, _) = CertificateAuthority::generate("cogmesh.local").unwrap();
        let ttl = Duration::from_secs(3600);
        let ok = ca
            .sign(
                csr(vec![SanType::URI(ID.try_into().unwrap())]).as_bytes(),
                ID,
                ttl,
            )
            .unwrap();
        assert!(ok.chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            ok.not_after.duration_since(ok.not_before).unwrap(),
            ttl + Duration::from_secs(BACKDATE_S)
        );
        // No SAN in the CSR: the CA puts the identity in.
        assert!(ca.sign(csr(vec![]).as_bytes(), ID, ttl).is_ok());
        let other = "spiffe://cogmesh.local/ns/default/sa/admin";
        let e = ca
            .sign(
                csr(vec![SanType::URI(other.try_into().unwrap())]).as_bytes(),
                ID,
                ttl,
            )
            .err()
            .unwrap();
        assert_eq!(
            e,
            SignError::OtherName {
                asked: other.into(),
                identity: ID.into()
            }
        );
        let e = ca
            .sign(
                csr(vec![SanType::DnsName("web".try_into().unwrap())]).as_bytes(),
                ID,
                ttl,
            )
            .err()
            .unwrap();
        assert!(matches!(e, SignError::OtherName { .. }), "{e}");
        assert!(matches!(
            ca.sign(b"not a csr", ID, ttl).err().unwrap(),
            SignError::Malformed(_)
        ));
    }

    #[test]
    fn a_generated_root_is_kept_and_reused() {
        let dir = std::env::temp_dir().join(format!("cogmesh-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = CertificateAuthority::generated_in(&dir, "cogmesh.local").unwrap();
        let again = CertificateAuthority::generated_in(&dir, "cogmesh.local").unwrap();
        assert_eq!(first.root_pem(), again.root_pem());
        let _ = std::fs::remove_dir_all(&dir);
        let e = CertificateAuthority::load(&dir.join("nope.pem"), &dir.join("nope-key.pem"))
            .err()
            .unwrap();
        assert_eq!(e.field, "identity.ca.cert");
    }
}
