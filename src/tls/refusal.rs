//! Connections refused before any call: who (as far as known), why in
//! fixed words, and the tally that summarises a flood.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use super::identity::identity_from_cert;

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

/// The identity of a presented certificate (issued by the gateway's CA), else its subject (printable
/// ASCII, at most 120 characters), else its address.
pub(super) fn cert_actor(der: &[u8], remote: &SocketAddr) -> String {
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
pub(super) fn handshake_reason(e: &io::Error) -> String {
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

pub(super) fn tls_reason(tls: &rustls::Error) -> String {
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
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "client certificate not for client authentication (key usage or extended key usage)"
                .into()
        }
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
pub(super) struct Tally(std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>);

impl Tally {
    const MAX_ACTORS: usize = 64;

    pub(super) fn add(&self, refusal: Refusal) {
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
    pub(super) fn take(&self) -> Vec<Refusal> {
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
