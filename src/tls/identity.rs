//! The caller's identity, from its client certificate's SAN URI
//! (`urn:ods:<code>` or `urn:operator:<name>`).

use std::fmt;

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
        let identity = if let Some(code) = strip_urn(uri, "urn:ods:") {
            PeerIdentity::Organisation(code.parse().map_err(|_| IdentityError::BadOdsCode)?)
        } else if let Some(name) = strip_urn(uri, "urn:operator:") {
            if !is_operator_name(name) {
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

/// `uri` after `prefix` (`urn:<namespace>:`), read as RFC 8141 reads a
/// URN: its scheme and namespace identifier ignore case, so
/// `URN:ODS:YG002` is an identity too (and beside `urn:ods:YG001`, a
/// second one: ambiguous).
fn strip_urn<'a>(uri: &'a str, prefix: &str) -> Option<&'a str> {
    let head = uri.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &uri[prefix.len()..])
}

/// Whether `name` is an operator's name as `urn:operator:<name>` carries
/// it: letters, digits and `-`.
#[must_use]
pub fn is_operator_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::certs::CertAuthority;
    use crate::tls::expiry_timestamp;
    use crate::tls::material::certs_from_pem;

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
        // RFC 8141: the scheme and namespace ignore case (the code does not).
        let upper = ca.issue_client_now("URN:ODS:YG002").unwrap();
        assert_eq!(
            identity_from_cert(&der(&upper.cert_pem)),
            Ok(PeerIdentity::Organisation("YG002".parse().unwrap()))
        );
        let lower_code = ca.issue_client_now("urn:ods:yg002").unwrap();
        assert_eq!(
            identity_from_cert(&der(&lower_code.cert_pem)),
            Err(IdentityError::BadOdsCode)
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
