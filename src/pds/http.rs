//! One HTTP/1.1 exchange per connection (hyper over tokio-rustls; no
//! OpenSSL), bounded by a time-out. Lookups are few (hundreds a day), so a
//! connection pool would buy nothing but state.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::PdsError;

/// The largest answer read (a Patient resource is a few KiB).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// An answer: status, `Retry-After` seconds if given, body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, seconds.
    pub retry_after_s: Option<u64>,
    /// The body.
    pub body: Bytes,
}

/// Makes connections: TLS for `https`, plain TCP for `http` (loopback only,
/// checked by the config).
#[derive(Clone)]
pub struct Transport {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Transport {
    /// A transport trusting the CA certificates in `ca_pem` (none are
    /// needed when every URL is plain http to a loopback double).
    ///
    /// # Errors
    /// `tls` and no certificate could be read from `ca_pem`.
    pub fn new(ca_pem: &[u8], timeout: Duration, tls: bool) -> Result<Self, String> {
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
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// Sends `request` and reads the answer, all within the time-out.
    ///
    /// # Errors
    /// [`PdsError::Timeout`], [`PdsError::Unreachable`].
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<Answer, PdsError> {
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| PdsError::Timeout)?
    }

    async fn exchange(&self, mut request: http::Request<Full<Bytes>>) -> Result<Answer, PdsError> {
        let uri = request.uri().clone();
        // HTTP/1.1 to an origin server: the request line carries the path
        // (origin-form); the host goes in `Host` (set by the caller).
        *request.uri_mut() = uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .parse()
            .map_err(|_| PdsError::Invalid("the request path does not parse".into()))?;
        let host = uri.host().unwrap_or_default().to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let unreachable = |what: &str| PdsError::Unreachable(what.to_owned());
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
            round_trip(TokioIo::new(tls), request).await
        } else {
            round_trip(TokioIo::new(tcp), request).await
        }
    }
}

async fn round_trip<IO>(io: IO, request: http::Request<Full<Bytes>>) -> Result<Answer, PdsError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let unreachable = |what: String| PdsError::Unreachable(what);
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
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("answer: {e}")))?
                .to_bytes();
            Ok(Answer {
                status,
                retry_after_s,
                body,
            })
        }
        Err(e) => Err(e),
    };
    driver.abort();
    answer
}
