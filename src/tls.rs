//! Mutual TLS: the rustls server configuration, the accept loop that turns
//! TCP connections into authenticated ones, and the caller's identity taken
//! from its client certificate's SAN URI.
//!
//! There is no plaintext listener. Clients must present a certificate issued
//! by the configured CA (and not revoked, when a CRL is configured); a
//! certificate without a `urn:ods:` or `urn:operator:` SAN URI is dropped at
//! the handshake. Whether an ODS code is *registered* is decided per call.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::clinical::OdsCode;

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

/// Days until a PEM certificate expires (negative once expired).
///
/// # Errors
/// The PEM holds no parsable certificate.
pub fn days_until_expiry(pem: &[u8]) -> Result<i64, TlsError> {
    let der = certs_from_pem(pem, Path::new("certificate"))?
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::Invalid("no certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| TlsError::Invalid("unparsable certificate".into()))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok((cert.validity().not_after.timestamp() - now) / 86_400)
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
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", what.display())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration: TLS 1.2 and 1.3, client certificates
/// required and verified against the CA and CRL, ALPN `h2`.
///
/// # Errors
/// Unreadable or invalid files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(&read(&files.ca)?, &files.ca)? {
        roots.add(cert)?;
    }
    let crls = match &files.crl {
        Some(path) => rustls_pemfile::crls(&mut &read(path)?[..])
            .collect::<Result<Vec<CertificateRevocationListDer<'static>>, _>>()
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?,
        None => Vec::new(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let chain = certs_from_pem(&read(&files.cert)?, &files.cert)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &read(&files.key)?[..])
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.key.display())))?
        .ok_or_else(|| TlsError::Invalid(format!("{}: no private key", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server configuration in force, swappable without a restart (for
/// example when the CRL file changes).
#[derive(Clone)]
pub struct ReloadableConfig {
    files: TlsFiles,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ReloadableConfig {
    /// Loads the configuration from `files`.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    /// Re-reads every file; on error the configuration in force stays.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    fn get(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The files behind this configuration.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

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
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections, completes the TLS handshake within `timeout`,
/// and yields the authenticated connections until `listener` is dropped with
/// the returned stream.
pub fn incoming(
    listener: TcpListener,
    config: ReloadableConfig,
    timeout: Duration,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
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
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.get());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "TLS handshake refused"),
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .ok_or(IdentityError::NoIdentity)
                            .and_then(|c| identity_from_cert(c));
                        match identity {
                            Ok(identity) => {
                                let conn = TlsConn {
                                    stream,
                                    info: ConnInfo { identity, remote },
                                };
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(e) => {
                                tracing::info!(%remote, error = %e, "client certificate refused")
                            }
                        }
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
        assert!(days_until_expiry(org.cert_pem.as_bytes()).unwrap() > 700);
    }
}
