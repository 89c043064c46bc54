//! The certificate of domain mode's TLS listener (`api.<domain>` and `*.<domain>`).
//!
//! Either a `*.<domain>` certificate signed by a local CA that SoulBox makes once per domain
//! and keeps (`<dir>/<domain>/ca.pem`, key `ca.key` 0600), or a certificate chain and key the
//! operator supplies as PEM files, reloaded when the files change. rustls with the `ring`
//! provider serves it; certificates are made with `rcgen`.
//!
//! The local CA is name-constrained to the domain: clients that trust it (through
//! `SSL_CERT_FILE` or `NODE_EXTRA_CA_CERTS`) accept nothing it signs for any other name, so
//! a stolen `ca.key` cannot be used against other sites. Its key never leaves the data dir;
//! code in sandboxes never sees any of this (TLS ends at the gateway).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Datelike, Days, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often certificate files are checked for changes (and the local leaf for expiry).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// The local CA's validity.
const CA_DAYS: u64 = 10 * 365;
/// A generated leaf's validity; it is renewed when less than [`RENEW_BEFORE_DAYS`] are left.
const LEAF_DAYS: u64 = 365;
const RENEW_BEFORE_DAYS: i64 = 30;
/// The system's CA bundle (Debian's `ca-certificates`), joined with the local CA into
/// `ca-bundle.pem` so that `SSL_CERT_FILE` can point at one file trusting both.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// E2B's own domains: new SDKs route those through `sandbox.<domain>`, not by host.
const E2B_DOMAINS: [&str; 7] = [
    "e2b.app",
    "e2b.dev",
    "e2b.pro",
    "e2b-staging.dev",
    "e2b-tango.dev",
    "e2b-juliett.dev",
    "foxtrot-2.e2b.dev",
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate and key do not fit together: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid domain '{domain}': {reason}")]
    Domain { domain: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks a sandbox domain and returns it lower-cased: DNS labels of letters, digits and
/// inner hyphens, at least two of them (so that `*.<domain>` is a sane wildcard), and none of
/// E2B's own domains.
pub fn validate_domain(domain: &str) -> Result<String, TlsError> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let bad = |reason: &str| TlsError::Domain {
        domain: domain.to_owned(),
        reason: reason.to_owned(),
    };
    if d.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 {
        return Err(bad(
            "use at least two labels (e.g. soulbox.localhost), so *.<domain> is a valid wildcard",
        ));
    }
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(bad(
                "each label must be 1-63 letters, digits or inner hyphens (no port: the TLS \
                 listener's port is added to the advertised domain)",
            ));
        }
    }
    if E2B_DOMAINS.contains(&d.as_str()) {
        return Err(bad(
            "E2B's own domains make new SDKs route through sandbox.<domain>; pick another",
        ));
    }
    Ok(d)
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// A `*.<domain>` certificate signed by a local CA kept in `<dir>/<domain>/`.
    LocalCa { dir: PathBuf, domain: String },
    /// A PEM certificate chain (leaf first) and its PEM private key, used as they are.
    Files { cert: PathBuf, key: PathBuf },
}

/// The files of a local CA that clients need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCa {
    /// The CA certificate (`NODE_EXTRA_CA_CERTS`).
    pub cert: PathBuf,
    /// The system's trusted CAs plus this one (`SSL_CERT_FILE`), when the system bundle
    /// exists; else the CA certificate alone.
    pub bundle: PathBuf,
}

/// The certificate the TLS listener serves; swapped in place on reload or renewal.
#[derive(Debug)]
pub struct Certificates {
    source: CertificateSource,
    current: RwLock<Current>,
    local_ca: Option<LocalCa>,
}

#[derive(Debug, Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    /// Files: what the files looked like when loaded; local CA: when the leaf expires.
    stamp: Stamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Files(Vec<FileStamp>),
    Expires(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Certificates {
    /// Loads (or, for a local CA, makes) the certificate.
    pub fn load(source: CertificateSource) -> Result<Arc<Certificates>, TlsError> {
        let (current, local_ca) = match &source {
            CertificateSource::Files { cert, key } => (load_files(cert, key)?, None),
            CertificateSource::LocalCa { dir, domain } => {
                let ca = ensure_ca(dir, domain)?;
                (issue_leaf(&ca, domain)?, Some(ca.files))
            }
        };
        Ok(Arc::new(Certificates {
            source,
            current: RwLock::new(current),
            local_ca,
        }))
    }

    /// The local CA's files, when the certificate comes from one.
    pub fn local_ca(&self) -> Option<&LocalCa> {
        self.local_ca.as_ref()
    }

    /// A rustls server config serving this certificate with ALPN `h2` and `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reloads changed files, or renews a local leaf that is about to expire. Returns whether
    /// the certificate changed. A file pair that does not load keeps the old certificate.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let stamp = self.read().stamp;
        let fresh = match (&self.source, &stamp) {
            (CertificateSource::Files { cert, key }, Stamp::Files(old)) => {
                if &stamps(&[cert, key])? == old {
                    return Ok(false);
                }
                load_files(cert, key)?
            }
            (CertificateSource::LocalCa { dir, domain }, Stamp::Expires(at)) => {
                if *at - chrono::Duration::days(RENEW_BEFORE_DAYS) > Utc::now() {
                    return Ok(false);
                }
                issue_leaf(&ensure_ca(dir, domain)?, domain)?
            }
            _ => return Ok(false),
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(true)
    }

    /// Calls [`refresh`](Self::refresh) every [`RELOAD_INTERVAL`], forever.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.refresh()).await {
                Ok(Ok(true)) => tracing::info!("TLS certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; serving the previous one")
                }
                Err(e) => tracing::error!(error = %e, "TLS certificate reload task"),
            }
        }
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key)
    }
}

fn load_files(cert: &Path, key: &Path) -> Result<Current, TlsError> {
    // Stamp first: a file replaced while we read it is then read again on the next check.
    let stamp = Stamp::Files(stamps(&[cert, key])?);
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())?;
    Ok(Current {
        key: Arc::new(certified),
        stamp,
    })
}

fn stamps(paths: &[&Path]) -> Result<Vec<FileStamp>, TlsError> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).map_err(io_err(p))?;
            Ok(FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: m.mtime(),
                mtime_nsec: m.mtime_nsec(),
            })
        })
        .collect()
}

/// A loaded local CA.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    files: LocalCa,
}

/// The CA's parameters. Deterministic per domain: a CA loaded from its files is rebuilt from
/// them (an issuer needs the subject name, key usages and key-id method, not the dates).
fn ca_params(domain: &str, now: DateTime<Utc>) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("SoulBox local CA for {domain}"));
    p.distinguished_name
        .push(DnType::OrganizationName, "SoulBox");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(domain.to_owned())],
        excluded_subtrees: Vec::new(),
    });
    set_validity(&mut p, now, CA_DAYS)?;
    Ok(p)
}

/// Valid from the start of yesterday (clients with a slightly slow clock) for `days`.
fn set_validity(p: &mut CertificateParams, now: DateTime<Utc>, days: u64) -> Result<(), TlsError> {
    let day = |d: DateTime<Utc>| {
        u8::try_from(d.month())
            .ok()
            .zip(u8::try_from(d.day()).ok())
            .map(|(m, dd)| rcgen::date_time_ymd(d.year(), m, dd))
    };
    let start = now.checked_sub_days(Days::new(1)).and_then(day);
    let end = now.checked_add_days(Days::new(days)).and_then(day);
    let (Some(start), Some(end)) = (start, end) else {
        return Err(TlsError::Domain {
            domain: String::new(),
            reason: "certificate dates out of range".into(),
        });
    };
    p.not_before = start;
    p.not_after = end;
    Ok(())
}

/// Loads the domain's CA from `<dir>/<domain>/`, making it first if either file is missing,
/// and rewrites the bundle (the system's CAs change with updates).
fn ensure_ca(dir: &Path, domain: &str) -> Result<Ca, TlsError> {
    let dir = dir.join(domain);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(io_err(&dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let now = Utc::now();
    let params = ca_params(domain, now)?;
    let (key, der) = if cert_path.exists() && key_path.exists() {
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let der = CertificateDer::from_pem_file(&cert_path).map_err(|e| TlsError::Pem {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
        (key, der)
    } else {
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), %domain, "made a local CA");
        (key, cert.der().clone())
    };
    let bundle_path = dir.join("ca-bundle.pem");
    let ca_pem = std::fs::read(&cert_path).map_err(io_err(&cert_path))?;
    let bundle = match std::fs::read(SYSTEM_BUNDLE) {
        Ok(mut system) => {
            if !system.ends_with(b"\n") {
                system.push(b'\n');
            }
            system.extend_from_slice(&ca_pem);
            system
        }
        Err(_) => ca_pem,
    };
    write_file(&bundle_path, &bundle, 0o644)?;
    Ok(Ca {
        issuer: Issuer::new(params, key),
        der,
        files: LocalCa {
            cert: cert_path,
            bundle: bundle_path,
        },
    })
}

/// A fresh `*.<domain>` leaf (new key) signed by `ca`.
fn issue_leaf(ca: &Ca, domain: &str) -> Result<Current, TlsError> {
    let now = Utc::now();
    let mut p = CertificateParams::new(vec![format!("*.{domain}")])?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, now, LEAF_DAYS)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca.issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(
        vec![cert.der().clone(), ca.der.clone()],
        key_der,
        &provider(),
    )?;
    let expires = now.checked_add_days(Days::new(LEAF_DAYS)).unwrap_or(now);
    Ok(Current {
        key: Arc::new(certified),
        stamp: Stamp::Expires(expires),
    })
}

/// Writes `path` whole (a temporary file renamed over it) with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_checked() {
        assert_eq!(
            validate_domain("SoulBox.Localhost.").ok().as_deref(),
            Some("soulbox.localhost")
        );
        assert!(validate_domain("sb.example.com").is_ok());
        for bad in [
            "localhost",
            "e2b.app",
            "e2b.dev",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a.b:443",
            "*.a.b",
            "",
        ] {
            assert!(validate_domain(bad).is_err(), "{bad}");
        }
    }
}
