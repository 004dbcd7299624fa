//! PDS's use of the gateway's HTTPS client ([`crate::https`]): its errors
//! as [`PdsError`]s.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use super::PdsError;
pub use crate::https::Answer;
use crate::https::HttpError;

impl From<HttpError> for PdsError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Timeout => PdsError::Timeout,
            HttpError::Unreachable(what) => PdsError::Unreachable(what),
            HttpError::Invalid(what) => PdsError::Invalid(what),
            HttpError::TooLarge(_) => PdsError::Invalid("the answer is too large".into()),
        }
    }
}

/// Makes connections: TLS for `https`, plain TCP for `http` (loopback only,
/// checked by the config).
#[derive(Clone)]
pub struct Transport(crate::https::Transport);

impl Transport {
    /// A transport trusting the CA certificates in `ca_pem` (none are
    /// needed when every URL is plain http to a loopback double).
    ///
    /// # Errors
    /// `tls` and no certificate could be read from `ca_pem`.
    pub fn new(ca_pem: &[u8], timeout: Duration, tls: bool) -> Result<Self, String> {
        crate::https::Transport::new(ca_pem, timeout, tls).map(Self)
    }

    /// Sends `request` and reads the answer, all within the time-out.
    ///
    /// # Errors
    /// [`PdsError::Timeout`], [`PdsError::Unreachable`].
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<Answer, PdsError> {
        self.0.send(request).await.map_err(PdsError::from)
    }
}
