//! The moat certificate authority and the leaf certificates it mints.
//!
//! Created once at `$MOAT_HOME/proxy/ca/ca.crt` and `ca.key` (P-256; key
//! 0600, directory 0700) and reused. Leaves are P-256, valid from an hour ago
//! for 30 days, cached per host with a bound; concurrent first requests for
//! one host mint it exactly once.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, ErrorKind, Result};
use crate::paths;

/// How many leaf certificates are kept.
pub const LEAF_CACHE_SIZE: usize = 4096;

type Cell = Arc<OnceLock<std::result::Result<Arc<CertifiedKey>, String>>>;

/// The CA: its certificate on disk and the key that signs leaves.
pub struct CertificateAuthority {
    cert_path: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    cache: Mutex<LeafCache>,
    mints: AtomicU64,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LeafCache {
    cells: HashMap<String, Cell>,
    order: VecDeque<String>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Moat CA");
    dn.push(DnType::OrganizationName, "moat");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Internal, format!("{what}: {e}"))
}

impl CertificateAuthority {
    /// Loads the CA from `dir` (normally `$MOAT_HOME/proxy/ca`), creating it
    /// on first use. A key readable by group or others is refused.
    pub fn load_or_create(dir: &Path) -> Result<CertificateAuthority> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        paths::private_dir(dir)?;
        let (cert_pem, key) = if cert_path.exists() && key_path.exists() {
            check_private(&key_path)?;
            let cert_pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| Error::io(&cert_path, "read", e))?;
            let key_pem =
                std::fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, "read", e))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "{}: not a valid private key ({e}); remove {} and {} to create a new CA",
                        key_path.display(),
                        cert_path.display(),
                        key_path.display()
                    ),
                )
            })?;
            (cert_pem, key)
        } else {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
                .map_err(|e| tls_err("cannot generate the ca key", e))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| tls_err("cannot create the ca certificate", e))?;
            let cert_pem = cert.pem();
            paths::write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            paths::write_private(&cert_path, cert_pem.as_bytes(), 0o644)?;
            (cert_pem, key)
        };
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .and_then(|r| r.ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("{}: no certificate in the file", cert_path.display()),
                )
            })?;
        Ok(CertificateAuthority {
            cert_path,
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(), key),
            cache: Mutex::new(LeafCache::default()),
            mints: AtomicU64::new(0),
        })
    }

    /// The path of the CA certificate (PEM), to trust in clients.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// How many leaf certificates have been minted since start.
    pub fn mint_count(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The leaf certificate for `host` (a DNS name or an IP address), minted
    /// on first use and cached.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let cell = {
            let mut cache = self
                .cache
                .lock()
                .map_err(|_| Error::new(ErrorKind::Internal, "leaf cache lock poisoned"))?;
            if let Some(cell) = cache.cells.get(&host) {
                cell.clone()
            } else {
                if cache.order.len() >= LEAF_CACHE_SIZE {
                    if let Some(old) = cache.order.pop_front() {
                        cache.cells.remove(&old);
                    }
                }
                let cell: Cell = Arc::default();
                cache.cells.insert(host.clone(), cell.clone());
                cache.order.push_back(host.clone());
                cell
            }
        };
        // One thread mints; others for the same host wait for its result.
        let result = cell.get_or_init(|| {
            self.mints.fetch_add(1, Ordering::Relaxed);
            self.mint(&host).map_err(|e| e.to_string())
        });
        result
            .clone()
            .map_err(|e| Error::new(ErrorKind::Internal, e))
    }

    fn mint(&self, host: &str) -> Result<Arc<CertifiedKey>> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| tls_err("cannot generate a leaf key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let san =
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.to_string().try_into().map_err(|e| {
                    tls_err(&format!("cannot mint a certificate for \"{host}\""), e)
                })?),
            };
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(30);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_err("cannot sign a leaf certificate", e))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&key_der)
            .map_err(|e| tls_err("cannot load a leaf key", e))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            signing_key,
        )))
    }
}

fn check_private(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "read", e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{}: the ca key is readable by other users; run chmod 600 on it",
                    path.display()
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("proxy/ca");
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        let again = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn a_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("ca");
        CertificateAuthority::load_or_create(&dir).unwrap();
        std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = CertificateAuthority::load_or_create(&dir).unwrap_err();
        assert!(err.to_string().contains("readable by other users"), "{err}");
    }

    #[test]
    fn leaves_verify_against_the_ca_and_are_minted_once() {
        use rustls::client::danger::ServerCertVerifier;
        let home = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(home.path()).unwrap();
        // A reloaded CA (same key, fresh Issuer) signs leaves that verify.
        let ca = Arc::new(CertificateAuthority::load_or_create(home.path()).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let ca = ca.clone();
                std::thread::spawn(move || ca.leaf("api.github.com").unwrap())
            })
            .collect();
        let leaves: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(ca.mint_count(), 1);
        assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
        let name = rustls_pki_types::ServerName::try_from("api.github.com").unwrap();
        verifier
            .verify_server_cert(
                &leaves[0].cert[0],
                &[],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        let ip_leaf = ca.leaf("10.1.2.3").unwrap();
        let ip = rustls_pki_types::ServerName::try_from("10.1.2.3").unwrap();
        verifier
            .verify_server_cert(
                &ip_leaf.cert[0],
                &[],
                &ip,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
    }
}
