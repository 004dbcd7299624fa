//! The `NHSMESH` authorisation header of MESH API v2: per request, a fresh
//! nonce, a nonce count of 0 and the time to the minute (`yyyyMMddHHmm`,
//! UTC), with an HMAC-SHA256 under the environment's shared key over
//! `mailbox:nonce:count:password:timestamp`:
//!
//! `NHSMESH {mailbox}:{nonce}:{count}:{timestamp}:{hex hmac}`
//!
//! The password and the shared key never leave this module in clear; the
//! header itself is a bearer credential for a few minutes, so it is never
//! logged either.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// A mailbox's credentials: its password and the environment's shared key.
pub struct Credentials {
    mailbox: String,
    password: Zeroizing<String>,
    shared_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mailbox", &self.mailbox)
            .field("password", &"<redacted>")
            .field("shared_key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Credentials of `mailbox`.
    pub fn new(mailbox: &str, password: &str, shared_key: &[u8]) -> Self {
        Self {
            mailbox: mailbox.to_owned(),
            password: Zeroizing::new(password.to_owned()),
            shared_key: Zeroizing::new(shared_key.to_vec()),
        }
    }

    /// The mailbox.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The header for a request made at `now`, with `nonce`.
    pub fn header_at(&self, nonce: &str, now: time::OffsetDateTime) -> Zeroizing<String> {
        let now = now.to_offset(time::UtcOffset::UTC);
        let timestamp = format!(
            "{:04}{:02}{:02}{:02}{:02}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute()
        );
        let count = 0;
        let signed = Zeroizing::new(format!(
            "{}:{nonce}:{count}:{}:{timestamp}",
            self.mailbox,
            self.password.as_str()
        ));
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.shared_key).expect("HMAC takes any key length");
        mac.update(signed.as_bytes());
        let digest = data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes());
        Zeroizing::new(format!(
            "NHSMESH {}:{nonce}:{count}:{timestamp}:{digest}",
            self.mailbox
        ))
    }

    /// The header for a request made now, with a fresh nonce.
    pub fn header(&self) -> Zeroizing<String> {
        self.header_at(
            &uuid::Uuid::new_v4().to_string(),
            time::OffsetDateTime::now_utc(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_the_published_construction() {
        let c = Credentials::new("X26ABC1", "password", b"TestKey");
        let at = time::macros::datetime!(2026-11-29 21:05:59 UTC);
        let h = c.header_at("4a8d4f0c-1c0b-4a4f-9b1c-2f6f3a0e9f11", at);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"TestKey").unwrap();
        mac.update(b"X26ABC1:4a8d4f0c-1c0b-4a4f-9b1c-2f6f3a0e9f11:0:password:202611292105");
        let want = data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes());
        assert_eq!(
            h.as_str(),
            format!("NHSMESH X26ABC1:4a8d4f0c-1c0b-4a4f-9b1c-2f6f3a0e9f11:0:202611292105:{want}")
        );
        // Another key, another password or another minute: another digest.
        let other = Credentials::new("X26ABC1", "password", b"OtherKey").header_at("n", at);
        assert_ne!(other.rsplit(':').next(), h.rsplit(':').next());
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("password\"") && !dbg.contains("TestKey"),
            "{dbg}"
        );
    }

    #[test]
    fn each_header_has_a_fresh_nonce() {
        let c = Credentials::new("X26ABC1", "password", b"TestKey");
        assert_ne!(c.header().as_str(), c.header().as_str());
    }
}
