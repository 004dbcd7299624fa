//! The gateway's outbound HTTPS client (PDS, MESH): one HTTP/1.1 exchange
//! per connection (hyper over tokio-rustls; no OpenSSL), bounded by a
//! time-out, with a client certificate where the service wants mutual TLS
//! (MESH). Calls are few (hundreds to thousands a day), so a connection
//! pool would buy nothing but state.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an exchange gave no answer. Carries no request or answer content.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No answer within the time-out.
    #[error("no answer in time")]
    Timeout,
    /// No connection, or it broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request could not be built or sent as given.
    #[error("unusable request: {0}")]
    Invalid(String),
    /// The answer's body is larger than the transport reads (bytes).
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// The largest answer read by default (a PDS Patient resource is a few KiB).
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// A client certificate chain and its private key, PEM.
pub struct ClientIdentity<'a> {
    /// The certificate chain.
    pub cert_pem: &'a [u8],
    /// The private key (zeroised by the caller).
    pub key_pem: &'a [u8],
}

/// An answer: status, `Retry-After` seconds if given, headers, body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, seconds.
    pub retry_after_s: Option<u64>,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Makes connections: TLS for `https`, plain TCP for `http` (loopback only,
/// checked by the config).
#[derive(Clone)]
pub struct Transport {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
    max_answer: usize,
}

impl Transport {
    /// A transport trusting the CA certificates in `ca_pem` (none are
    /// needed when every URL is plain http to a loopback double).
    ///
    /// # Errors
    /// `tls` and no certificate could be read from `ca_pem`.
    pub fn new(ca_pem: &[u8], timeout: Duration, tls: bool) -> Result<Self, String> {
        Self::with_identity(ca_pem, None, timeout, tls)
    }

    /// As [`Transport::new`], presenting `identity` to servers that ask for
    /// a client certificate (mutual TLS).
    ///
    /// # Errors
    /// As [`Transport::new`]; a certificate or key that does not read.
    pub fn with_identity(
        ca_pem: &[u8],
        identity: Option<ClientIdentity<'_>>,
        timeout: Duration,
        tls: bool,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(ca_pem).flatten() {
            let _ = roots.add(cert);
        }
        if roots.is_empty() && tls {
            return Err("holds no usable CA certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(id) => {
                use rustls::pki_types::PrivateKeyDer;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(id.cert_pem)
                        .collect::<Result<_, _>>()
                        .map_err(|_| "the client certificate does not read as PEM".to_owned())?;
                if chain.is_empty() {
                    return Err("holds no client certificate".into());
                }
                let key = PrivateKeyDer::from_pem_slice(id.key_pem)
                    .map_err(|_| "the client key does not read as a PEM private key".to_owned())?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("the client certificate and key do not go together: {e}")
                })?
            }
        };
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
            max_answer: MAX_ANSWER_BYTES,
        })
    }

    /// The same transport reading answers of up to `bytes`.
    #[must_use]
    pub fn max_answer(mut self, bytes: usize) -> Self {
        self.max_answer = bytes;
        self
    }

    /// Sends `request` and reads the answer, all within the time-out.
    ///
    /// # Errors
    /// [`HttpError::Timeout`], [`HttpError::Unreachable`].
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<Answer, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| HttpError::Timeout)?
    }

    async fn exchange(&self, mut request: http::Request<Full<Bytes>>) -> Result<Answer, HttpError> {
        let uri = request.uri().clone();
        // HTTP/1.1 to an origin server: the request line carries the path
        // (origin-form); the host goes in `Host` (set by the caller).
        *request.uri_mut() = uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .parse()
            .map_err(|_| HttpError::Invalid("the request path does not parse".into()))?;
        let host = uri.host().unwrap_or_default().to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let unreachable = |what: &str| HttpError::Unreachable(what.to_owned());
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(&format!("connect: {}", e.kind())))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|_| unreachable("bad host name"))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| unreachable(&format!("TLS: {e}")))?;
            round_trip(TokioIo::new(tls), request, self.max_answer).await
        } else {
            round_trip(TokioIo::new(tcp), request, self.max_answer).await
        }
    }
}

async fn round_trip<IO>(
    io: IO,
    request: http::Request<Full<Bytes>>,
    max_answer: usize,
) -> Result<Answer, HttpError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let unreachable = HttpError::Unreachable;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(format!("handshake: {e}")))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(format!("request: {e}")));
    let answer = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after_s = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            let headers = response.headers().clone();
            let body = Limited::new(response.into_body(), max_answer)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge(max_answer)
                    } else {
                        unreachable(format!("answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status,
                retry_after_s,
                headers,
                body,
            })
        }
        Err(e) => Err(e),
    };
    driver.abort();
    answer
}
