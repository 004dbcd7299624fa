//! The client-certificate verifier: the CA's and CRL's checks, remembering
//! what the client presented so a refusal can name it.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;

/// Passes every check to the real verifier, remembering the certificate the
/// client presented so a refused handshake can be audited with its subject.
#[derive(Debug)]
pub(super) struct Remembering {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) presented: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
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
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if signs(end_entity) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            ))
        }
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
pub(super) type Presented = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// Whether a client certificate is for this: a key usage extension, when
/// present, must include digitalSignature (RFC 5280 §4.2.1.3 and
/// §4.2.1.12; RFC 8446 §4.4.2.2), and the extended key usage must be
/// present and name clientAuth. webpki accepts a certificate without an
/// extended key usage for any purpose (RFC 5280 allows it); the gateway
/// does not, so a certificate the CA issued for something else (a server,
/// a signing key) that happens to carry an identity is no caller.
fn signs(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let key_usage = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.digital_signature(),
        Ok(None) => true,
        Err(_) => false,
    };
    let client_auth = matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
    key_usage && client_auth
}

/// Whether the gateway's CA issued `der`, whatever its validity period or
/// revocation: the chain is checked as of the middle of the certificate's own
/// validity, and a revoked certificate was issued by us too.
pub(super) fn issued_by_us(verifier: &dyn ClientCertVerifier, der: &[u8]) -> bool {
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
