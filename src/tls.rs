//! Mutual TLS: the rustls server configuration, the accept loop that turns
//! TCP connections into authenticated ones, and the caller's identity taken
//! from its client certificate's SAN URI.
//!
//! There is no plaintext listener. Clients must present a certificate issued
//! by the configured CA (and not revoked, when a CRL is configured); a
//! certificate without a `urn:ods:` or `urn:operator:` SAN URI is dropped at
//! the handshake. Whether an ODS code is *registered* is decided per call.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::clinical::OdsCode;

pub mod admission;

use admission::Admission;
pub use admission::AdmissionLimits;

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// An organisation, by ODS code (`urn:ods:<code>`).
    Organisation(OdsCode),
    /// A gateway operator (`urn:operator:<name>`).
    Operator(String),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Organisation(ods) => write!(f, "urn:ods:{ods}"),
            PeerIdentity::Operator(name) => write!(f, "urn:operator:{name}"),
        }
    }
}

/// Why a certificate names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a parsable X.509 certificate.
    #[error("client certificate is not valid X.509")]
    Unparsable,
    /// No SAN URI of a known form.
    #[error("client certificate has no urn:ods: or urn:operator: SAN URI")]
    NoIdentity,
    /// More than one identity.
    #[error("client certificate names more than one identity")]
    Ambiguous,
    /// A `urn:ods:` URI whose code is malformed.
    #[error("client certificate's ODS code is malformed")]
    BadOdsCode,
}

/// The identity in a client certificate's SAN URIs.
///
/// # Errors
/// See [`IdentityError`].
pub fn identity_from_cert(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
        .ok_or(IdentityError::NoIdentity)?;
    let mut found = None;
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let identity = if let Some(code) = uri.strip_prefix("urn:ods:") {
            PeerIdentity::Organisation(code.parse().map_err(|_| IdentityError::BadOdsCode)?)
        } else if let Some(name) = uri.strip_prefix("urn:operator:") {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(IdentityError::NoIdentity);
            }
            PeerIdentity::Operator(name.to_owned())
        } else {
            continue;
        };
        if found.replace(identity).is_some() {
            return Err(IdentityError::Ambiguous);
        }
    }
    found.ok_or(IdentityError::NoIdentity)
}

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

fn certs_from_pem(pem: &[u8], what: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", what.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The parts of the server configuration that do not change per connection.
struct Material {
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<CertifiedKey>,
    crl_next_update: Option<i64>,
}

fn load_material(files: &TlsFiles) -> Result<Material, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(&read(&files.ca)?, &files.ca)? {
        roots.add(cert)?;
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
    let crl_next_update = crls
        .iter()
        .filter_map(|crl| {
            <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(crl)
                .ok()
                .and_then(|(_, c)| c.next_update().map(|t| t.timestamp()))
        })
        .min();
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

/// A server configuration around `verifier`: TLS 1.3 and 1.2 only, client
/// certificates mandatory, ALPN `h2`, no session resumption (a resumed
/// session would skip the client-certificate and CRL checks).
fn config_with(
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<CertifiedKey>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
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
    config_with(m.verifier, m.certified)
}

/// Passes every check to the real verifier, remembering the certificate the
/// client presented so a refused handshake can be audited with its subject.
#[derive(Debug)]
struct Remembering {
    inner: Arc<dyn ClientCertVerifier>,
    presented: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl ClientCertVerifier for Remembering {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.to_vec());
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What identifies the files' contents: a change to any of them reloads.
type Fingerprint = Vec<Option<(std::time::SystemTime, u64, u64)>>;

fn fingerprint(files: &TlsFiles) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    [
        Some(&files.ca),
        Some(&files.cert),
        Some(&files.key),
        files.crl.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
    })
    .collect()
}

/// The TLS material in force, swappable without a restart: [`incoming`]
/// checks the files once a second and reloads when one changed.
#[derive(Clone)]
pub struct ReloadableConfig {
    files: TlsFiles,
    current: Arc<RwLock<Arc<Material>>>,
    seen: Arc<std::sync::Mutex<Fingerprint>>,
}

impl ReloadableConfig {
    /// Loads the configuration from `files`.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = fingerprint(&files);
        let material = load_material(&files)?;
        warn_if_stale(&material);
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Arc::new(material))),
            seen: Arc::new(std::sync::Mutex::new(seen)),
        })
    }

    /// Re-reads every file; on error the configuration in force stays.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = load_material(&self.files)?;
        warn_if_stale(&material);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        Ok(())
    }

    /// Reloads when any file changed since the last look (modification time,
    /// length or inode). Returns whether a new configuration is in force.
    pub fn reload_if_changed(&self) -> bool {
        let now = fingerprint(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match self.reload() {
            Ok(()) => {
                tracing::info!("TLS files changed: new CA, certificate or CRL in force");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but cannot be loaded; the previous configuration stays in force");
                false
            }
        }
    }

    fn material(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A configuration for one connection, and where it will put the
    /// certificate the client presents.
    fn for_connection(&self) -> Result<(Arc<rustls::ServerConfig>, Presented), TlsError> {
        let m = self.material();
        let presented = Presented::default();
        let verifier = Arc::new(Remembering {
            inner: m.verifier.clone(),
            presented: presented.clone(),
        });
        Ok((config_with(verifier, m.certified.clone())?, presented))
    }

    /// The files behind this configuration.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn warn_if_stale(m: &Material) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(next) = m.crl_next_update.filter(|t| *t < now) {
        tracing::warn!(
            overdue_s = now - next,
            "the CRL is past its nextUpdate; it is still enforced, but publish a fresh one"
        );
    }
}

type Presented = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller, from its certificate.
    pub identity: PeerIdentity,
    /// The caller's address.
    pub remote: SocketAddr,
}

/// An authenticated TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    _slot: ConnectionSlot,
    /// Ready once a reload finds the certificate no longer valid.
    revoked: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    _live: LiveGuard,
}

impl TlsConn {
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.revoked.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate no longer valid",
            )
        })
    }
}

/// Open connections with their certificates, so that a reload of the CA or
/// CRL can check them again and close those that no longer pass.
#[derive(Default)]
struct Live {
    next: std::sync::atomic::AtomicU64,
    conns: std::sync::Mutex<HashMap<u64, LiveConn>>,
}

struct LiveConn {
    chain: Vec<CertificateDer<'static>>,
    identity: PeerIdentity,
    cancel: tokio_util::sync::CancellationToken,
}

struct LiveGuard {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Live {
    fn register(
        self: &Arc<Self>,
        chain: Vec<CertificateDer<'static>>,
        identity: PeerIdentity,
    ) -> (LiveGuard, tokio_util::sync::CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = tokio_util::sync::CancellationToken::new();
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveConn {
                chain,
                identity,
                cancel: cancel.clone(),
            },
        );
        (
            LiveGuard {
                live: self.clone(),
                id,
            },
            cancel,
        )
    }

    /// Closes every open connection whose certificate `verifier` now
    /// refuses; returns the refusals.
    fn recheck(&self, verifier: &dyn ClientCertVerifier) -> Vec<Refusal> {
        let now = rustls::pki_types::UnixTime::now();
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = Vec::new();
        for conn in conns.values() {
            let Some((ee, intermediates)) = conn.chain.split_first() else {
                continue;
            };
            if let Err(e) = verifier.verify_client_cert(ee, intermediates, now) {
                conn.cancel.cancel();
                cut.push(Refusal {
                    actor: conn.identity.to_string(),
                    reason: format!("open connection closed: {}", tls_reason(&e)),
                });
            }
        }
        cut
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How many connections each key (identity, address) holds; a slot gives
/// its place back when dropped.
struct Counted<K: std::hash::Hash + Eq + Clone>(std::sync::Mutex<HashMap<K, usize>>);

impl<K: std::hash::Hash + Eq + Clone> Default for Counted<K> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(HashMap::new()))
    }
}

struct Slot<K: std::hash::Hash + Eq + Clone> {
    counted: Arc<Counted<K>>,
    key: K,
}

type ConnectionSlot = Slot<PeerIdentity>;

impl<K: std::hash::Hash + Eq + Clone> Counted<K> {
    fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<Slot<K>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counted: self.clone(),
            key: key.clone(),
        })
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = self.counted.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Limits on the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptLimits {
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Who may start a handshake (see [`admission`]).
    pub admission: AdmissionLimits,
    /// Open connections one identity may hold.
    pub max_connections_per_identity: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            admission: AdmissionLimits {
                max_handshakes: 256,
                max_handshakes_per_network: 128,
                per_address_per_second: 8,
                per_address_burst: 256,
                stall: Duration::from_secs(2),
            },
            max_connections_per_identity: 32,
        }
    }
}

/// A connection the gateway refused before any call, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Who, as far as known: the certificate's identity or subject when one
    /// was presented, else the remote address's class and address.
    pub actor: String,
    /// Why (never patient data).
    pub reason: String,
}

/// Where refusals go (the store's audit trail, in the gateway).
pub trait RefusalSink: Send + Sync + 'static {
    /// Records `refusal`; returns once it is durable or has failed.
    fn record(&self, refusal: Refusal) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// The remote address's class and address, for refusals with no certificate.
pub fn address_actor(remote: &SocketAddr) -> String {
    let ip = remote.ip().to_canonical();
    let class = match ip {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => "loopback",
        std::net::IpAddr::V4(v4) if v4.is_private() => "private",
        std::net::IpAddr::V4(v4) if v4.is_link_local() => "link-local",
        std::net::IpAddr::V6(v6) if v6.is_loopback() => "loopback",
        std::net::IpAddr::V6(v6) if v6.is_unique_local() => "private",
        std::net::IpAddr::V6(v6) if v6.is_unicast_link_local() => "link-local",
        _ => "public",
    };
    format!("peer:{class}:{ip}")
}

/// Whether the gateway's CA issued `der`, whatever its validity period or
/// revocation: the chain is checked as of the middle of the certificate's own
/// validity, and a revoked certificate was issued by us too.
fn issued_by_us(verifier: &dyn ClientCertVerifier, der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let (from, to) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let Ok(mid) = u64::try_from(from + (to - from) / 2) else {
        return false;
    };
    let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(mid));
    matches!(
        verifier.verify_client_cert(&CertificateDer::from(der), &[], at),
        Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
    )
}

/// The identity of a presented certificate (issued by the gateway's CA), else its subject (printable
/// ASCII, at most 120 characters), else its address.
fn cert_actor(der: &[u8], remote: &SocketAddr) -> String {
    if let Ok(identity) = identity_from_cert(der) {
        return identity.to_string();
    }
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let subject: String = cert
                .subject()
                .to_string()
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(120)
                .collect();
            format!("subject:{subject} ({})", address_actor(remote))
        }
        Err(_) => address_actor(remote),
    }
}

/// A short, fixed reason for a failed handshake (the client learns only the
/// TLS alert; the audit trail keeps this).
fn handshake_reason(e: &io::Error) -> String {
    use rustls::Error as E;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => "connection closed during the handshake".into(),
            io::ErrorKind::InvalidData => "malformed TLS record".into(),
            kind => format!("handshake failed: {kind}"),
        };
    };
    tls_reason(tls)
}

fn tls_reason(tls: &rustls::Error) -> String {
    use rustls::{CertificateError as C, Error as E};
    match tls {
        E::NoCertificatesPresented => "no client certificate".into(),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "client certificate expired".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "client certificate not yet valid".into()
        }
        E::InvalidCertificate(C::Revoked) => "client certificate revoked (CRL)".into(),
        E::InvalidCertificate(C::UnknownIssuer) => {
            "client certificate not issued by the gateway's CA".into()
        }
        E::InvalidCertificate(C::BadSignature) => "client certificate signature invalid".into(),
        E::InvalidCertificate(other) => format!("client certificate invalid: {other:?}")
            .chars()
            .take(120)
            .collect(),
        E::PeerIncompatible(p) => format!("incompatible TLS client: {p:?}")
            .chars()
            .take(120)
            .collect(),
        E::AlertReceived(a) => format!("client sent alert {a:?}"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => "malformed handshake".into(),
        E::InappropriateHandshakeMessage { .. } | E::PeerMisbehaved(_) => {
            "client broke the handshake protocol".into()
        }
        other => format!("handshake failed: {other}")
            .chars()
            .take(120)
            .collect(),
    }
}

/// Refusals before any call, counted per actor and reason and handed to the
/// sink as one summary per actor and reason a second: every refusal is on
/// record, but a flood of handshakes without a certificate cannot become a
/// flood of audit writes. At most [`Tally::MAX_ACTORS`] actor-and-reason
/// pairs a second are named; the rest are summed as `peer:many`.
#[derive(Default)]
struct Tally(std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>);

impl Tally {
    const MAX_ACTORS: usize = 64;

    fn add(&self, refusal: Refusal) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let known = counts.contains_key(&(refusal.actor.clone(), refusal.reason.clone()));
        let key = if known || counts.len() < Self::MAX_ACTORS {
            (refusal.actor, refusal.reason)
        } else {
            ("peer:many".to_owned(), refusal.reason)
        };
        *counts.entry(key).or_default() += 1;
    }

    /// What was counted since the last call, as one refusal per actor and reason.
    fn take(&self) -> Vec<Refusal> {
        let counts = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        counts
            .into_iter()
            .map(|((actor, reason), n)| Refusal {
                actor,
                reason: if n == 1 {
                    reason
                } else {
                    format!("{n} connections: {reason}")
                },
            })
            .collect()
    }
}

/// Once a second: reload the TLS files when they changed (closing open
/// connections whose certificate no longer passes), and hand the refusals
/// counted since the last tick to `sink`; once more when the listener is
/// dropped, so a shutdown loses none.
fn spawn_housekeeping(
    config: ReloadableConfig,
    closed: mpsc::Sender<Result<TlsConn, io::Error>>,
    tally: Arc<Tally>,
    admission: Arc<Admission>,
    sink: Arc<dyn RefusalSink>,
    live: Arc<Live>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 1u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = closed.closed() => break,
            }
            let cfg = config.clone();
            let live = live.clone();
            let cut = tokio::task::spawn_blocking(move || {
                if cfg.reload_if_changed() {
                    live.recheck(&*cfg.material().verifier)
                } else {
                    Vec::new()
                }
            })
            .await
            .unwrap_or_default();
            for refusal in cut {
                tracing::info!(reason = %refusal.reason, "open connection closed");
                sink.record(refusal).await;
            }
            for refusal in tally.take() {
                sink.record(refusal).await;
            }
            if n % 60 == 0 {
                admission.forget_idle();
            }
        }
        for refusal in tally.take() {
            sink.record(refusal).await;
        }
    })
}

/// Accepts TCP connections, admits them fairly (see [`admission`]),
/// completes the TLS handshake within the limit, and yields the
/// authenticated connections until the returned stream is dropped. Every
/// refused connection goes to `sink`, summarised once a second per actor and
/// reason; the returned handle finishes once the last summary is recorded
/// after the stream is dropped (await it before closing the store). Once a
/// second the TLS files are checked and reloaded when changed (a new CRL
/// applies to new connections from then on).
pub fn incoming(
    listener: TcpListener,
    config: ReloadableConfig,
    limits: AcceptLimits,
    sink: Arc<dyn RefusalSink>,
) -> (
    tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let admission = Arc::new(Admission::new(limits.admission.clone()));
    let open = Arc::new(Counted::<PeerIdentity>::default());
    let live = Arc::new(Live::default());
    let tally = Arc::new(Tally::default());
    let housekeeping = spawn_housekeeping(
        config.clone(),
        tx.clone(),
        tally.clone(),
        admission.clone(),
        sink,
        live.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let slot = match admission.admit(remote.ip()) {
                Ok((slot, evicted)) => {
                    for ip in evicted {
                        tally.add(Refusal {
                            actor: address_actor(&SocketAddr::new(ip, 0)),
                            reason: "handshake evicted for a newcomer: stalled, or its address or network held more handshakes (handshake table full)".into(),
                        });
                    }
                    slot
                }
                Err(why) => {
                    tally.add(Refusal {
                        actor: address_actor(&remote),
                        reason: why.reason().into(),
                    });
                    drop(tcp);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let shared = Shared {
                tx: tx.clone(),
                tally: tally.clone(),
                open: open.clone(),
                live: live.clone(),
                config: config.clone(),
                limits: limits.clone(),
            };
            tokio::spawn(handshake(tcp, remote, slot, shared));
        }
    });
    (
        tokio_stream::wrappers::ReceiverStream::new(rx),
        housekeeping,
    )
}

/// What every handshake task of one listener shares.
struct Shared {
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
    tally: Arc<Tally>,
    open: Arc<Counted<PeerIdentity>>,
    live: Arc<Live>,
    config: ReloadableConfig,
    limits: AcceptLimits,
}

/// One admitted connection: the handshake (unless evicted first), then the
/// connection to the server or its refusal to the tally.
async fn handshake(tcp: TcpStream, remote: SocketAddr, slot: admission::Admitted, s: Shared) {
    let outcome = tokio::select! {
        biased;
        () = slot.evicted.cancelled() => Err(None),
        outcome = authenticate(tcp, remote, &s.config, &s.limits, (&s.open, &s.live)) => outcome,
    };
    if slot.evicted.is_cancelled() {
        return; // counted as evicted, once
    }
    // The slot is free (and a refused connection closed) before anything
    // else, so slow audits cannot hold handshakes up.
    drop(slot);
    match outcome {
        Ok(conn) => {
            let _ = s.tx.send(Ok(conn)).await;
        }
        Err(Some(refusal)) => {
            tracing::info!(reason = %refusal.reason, "connection refused");
            s.tally.add(refusal);
        }
        Err(None) => {}
    }
}

/// The TLS handshake and the checks after it; `Err(None)` when the server's
/// own configuration is unusable (logged, not a client's fault).
async fn authenticate(
    tcp: TcpStream,
    remote: SocketAddr,
    config: &ReloadableConfig,
    limits: &AcceptLimits,
    (open, live): (&Arc<Counted<PeerIdentity>>, &Arc<Live>),
) -> Result<TlsConn, Option<Refusal>> {
    let (server_config, presented) = config.for_connection().map_err(|e| {
        tracing::error!(error = %e, "TLS configuration unusable");
        None
    })?;
    let verifier = config.material().verifier.clone();
    // A certificate's names are the caller's own words until the CA vouches
    // for them: only a certificate the gateway's CA issued is named.
    let presented_actor = || match presented
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        Some(der) if issued_by_us(&*verifier, der) => cert_actor(der, &remote),
        _ => address_actor(&remote),
    };
    let refusal = |actor, reason| Some(Refusal { actor, reason });
    let acceptor = TlsAcceptor::from(server_config);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Err(_) => return Err(refusal(presented_actor(), "TLS handshake timed out".into())),
        Ok(Err(e)) => return Err(refusal(presented_actor(), handshake_reason(&e))),
        Ok(Ok(stream)) => stream,
    };
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let identity = chain
        .first()
        .ok_or(IdentityError::NoIdentity)
        .and_then(|c| identity_from_cert(c))
        .map_err(|e| refusal(presented_actor(), e.to_string()))?;
    let Some(slot) = open.take(&identity, limits.max_connections_per_identity) else {
        return Err(refusal(
            identity.to_string(),
            format!(
                "more than {} open connections for this identity",
                limits.max_connections_per_identity
            ),
        ));
    };
    let (live, cancel) = live.register(chain, identity.clone());
    Ok(TlsConn {
        stream,
        info: ConnInfo { identity, remote },
        _slot: slot,
        revoked: Box::pin(cancel.cancelled_owned()),
        _live: live,
    })
}

/// A client channel over mutual TLS to `endpoint` (`https://127.0.0.1:port`),
/// for the built-in client, benches and tests.
///
/// # Errors
/// Bad PEM or a failed connection.
pub async fn client_channel(
    endpoint: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    Endpoint::from_shared(endpoint.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::CertAuthority;

    fn der(pem: &str) -> Vec<u8> {
        certs_from_pem(pem.as_bytes(), Path::new("x")).unwrap()[0].to_vec()
    }

    #[test]
    fn identity_comes_from_the_san_uri() {
        let ca = CertAuthority::generate("test").unwrap();
        let org = ca.issue_client_now("urn:ods:YG001").unwrap();
        assert_eq!(
            identity_from_cert(&der(&org.cert_pem)),
            Ok(PeerIdentity::Organisation("YG001".parse().unwrap()))
        );
        let op = ca.issue_client_now("urn:operator:oncall").unwrap();
        assert_eq!(
            identity_from_cert(&der(&op.cert_pem)).unwrap().to_string(),
            "urn:operator:oncall"
        );
        let other = ca.issue_client_now("https://example.invalid/x").unwrap();
        assert_eq!(
            identity_from_cert(&der(&other.cert_pem)),
            Err(IdentityError::NoIdentity)
        );
        let bad = ca.issue_client_now("urn:ods:not-a-code").unwrap();
        assert_eq!(
            identity_from_cert(&der(&bad.cert_pem)),
            Err(IdentityError::BadOdsCode)
        );
        assert_eq!(identity_from_cert(b"junk"), Err(IdentityError::Unparsable));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let expiry = expiry_timestamp(org.cert_pem.as_bytes()).unwrap();
        assert!(expiry - now > 700 * 86_400, "{expiry} {now}");
    }
}
