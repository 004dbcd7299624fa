//! The PEM material: the CA, the server's certificate and key, the CRLs,
//! read from files into a rustls server configuration.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};

/// When a PEM certificate expires (its `notAfter`), Unix seconds.
///
/// # Errors
/// The PEM holds no parsable certificate.
pub fn expiry_timestamp(pem: &[u8]) -> Result<i64, TlsError> {
    let der = certs_from_pem(pem, Path::new("certificate"))?
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::Invalid("no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| TlsError::Invalid("unparsable certificate".into()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The earliest `nextUpdate` of the CRLs in a PEM file, Unix seconds: when
/// the list in force goes stale unless a fresh one is published.
///
/// # Errors
/// A file with no CRL, or one that does not parse or names no next update.
pub fn crl_next_update(pem: &[u8]) -> Result<i64, TlsError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let mut earliest: Option<i64> = None;
    for der in CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = der.map_err(|_| TlsError::Invalid("unreadable CRL PEM".into()))?;
        let (_, crl) = CertificateRevocationList::from_der(&der)
            .map_err(|_| TlsError::Invalid("unparsable CRL".into()))?;
        if let Some(t) = crl.next_update() {
            let t = t.timestamp();
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
    }
    earliest.ok_or_else(|| TlsError::Invalid("no CRL with a next update".into()))
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file's contents are unusable.
    #[error("{0}")]
    Invalid(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the server's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate(s) that issue client certificates, PEM.
    pub ca: PathBuf,
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// Certificate revocation list(s), PEM; optional.
    pub crl: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(super) fn certs_from_pem(
    pem: &[u8],
    what: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", what.display())))
}

pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The parts of the server configuration that do not change per connection.
pub(super) struct Material {
    pub(super) verifier: Arc<dyn ClientCertVerifier>,
    pub(super) certified: Arc<CertifiedKey>,
    pub(super) crl_next_update: Option<i64>,
}

pub(super) fn load_material(files: &TlsFiles) -> Result<Material, TlsError> {
    let mut roots = RootCertStore::empty();
    let cas = certs_from_pem(&read(&files.ca)?, &files.ca)?;
    for cert in &cas {
        roots.add(cert.clone())?;
    }
    let crls = match &files.crl {
        Some(path) => CertificateRevocationListDer::pem_slice_iter(&read(path)?)
            .collect::<Result<Vec<CertificateRevocationListDer<'static>>, _>>()
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?,
        None => Vec::new(),
    };
    if files.crl.is_some() && crls.is_empty() {
        return Err(TlsError::Invalid(
            "the CRL file holds no X509 CRL; refusing to run without the revocations it should carry"
                .into(),
        ));
    }
    let crl_next_update = check_crls(&crls, &cas)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let chain = certs_from_pem(&read(&files.cert)?, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::Invalid(format!("{}: no private key", files.key.display()))
        }
        e => TlsError::Invalid(format!("{}: {e}", files.key.display())),
    })?;
    let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider())?);
    Ok(Material {
        verifier,
        certified,
        crl_next_update,
    })
}

/// The earliest `nextUpdate` of `crls`, once each is shown to be signed by
/// a certificate of the client CA file. A list signed by anyone else would
/// make every handshake fail (webpki refuses a CRL whose signature does not
/// verify), which stops every handover: it is refused instead, so a bad
/// replacement leaves the previous list in force.
fn check_crls(
    crls: &[CertificateRevocationListDer<'_>],
    cas: &[CertificateDer<'_>],
) -> Result<Option<i64>, TlsError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::revocation_list::CertificateRevocationList;
    let cas: Vec<_> = cas
        .iter()
        .filter_map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .map(|(_, c)| c)
        })
        .collect();
    let mut next_update: Option<i64> = None;
    for (i, der) in crls.iter().enumerate() {
        let n = i + 1;
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| TlsError::Invalid(format!("CRL {n} in the CRL file: unparsable: {e}")))?;
        let signed = cas.iter().any(|ca| {
            ca.subject() == crl.issuer() && crl.verify_signature(ca.public_key()).is_ok()
        });
        if !signed {
            return Err(TlsError::Invalid(format!(
                "CRL {n} in the CRL file is not signed by a certificate of the client CA file \
                 (issuer {}); refusing it, since it would refuse every client",
                crl.issuer()
            )));
        }
        if let Some(t) = crl.next_update() {
            let t = t.timestamp();
            next_update = Some(next_update.map_or(t, |u| u.min(t)));
        }
    }
    Ok(next_update)
}

/// A server configuration around `verifier`: TLS 1.3 and 1.2 only, client
/// certificates mandatory, ALPN `h2` when `h2` (gRPC; MLLP offers none, so a
/// client naming its own protocol is not refused), no session resumption (a
/// resumed session would skip the client-certificate and CRL checks).
pub(super) fn config_with(
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<CertifiedKey>,
    h2: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Builds the server configuration: TLS 1.2 and 1.3, client certificates
/// required and verified against the CA and CRL, ALPN `h2`.
///
/// # Errors
/// Unreadable or invalid files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let m = load_material(files)?;
    config_with(m.verifier, m.certified, true)
}
