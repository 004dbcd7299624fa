//! Application-restricted access, signed JWT pattern (NHS API platform):
//! a JWT signed RS512 with our private key (`iss` = `sub` = the API key,
//! `aud` = the token URL, a fresh `jti`, `exp` at most five minutes ahead,
//! `kid` in the header) is exchanged at the token endpoint
//! (`grant_type=client_credentials`, `client_assertion_type=
//! urn:ietf:params:oauth:client-assertion-type:jwt-bearer`) for a bearer
//! token, kept until shortly before it expires.
//!
//! Neither key, the JWT nor the token is ever logged or put in an error.

use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::PdsError;

/// How long a JWT is valid: the platform refuses more than five minutes.
const JWT_LIFETIME_S: i64 = 240;
/// A token is renewed this long before it expires.
const TOKEN_MARGIN_MS: i64 = 30_000;

/// Our credentials, loaded once.
pub struct Credentials {
    api_key: Zeroizing<String>,
    key: EncodingKey,
    key_id: String,
    token_url: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    exp: i64,
}

/// The token endpoint's answer. `expires_in` is a string there ("599").
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl Credentials {
    /// Credentials from the key material.
    ///
    /// # Errors
    /// The API key is empty or the private key is not an RSA key in PEM
    /// (the message names neither value).
    pub fn new(
        api_key: &str,
        private_key_pem: &[u8],
        key_id: &str,
        token_url: &str,
    ) -> Result<Self, String> {
        let api_key = api_key.trim();
        if api_key.is_empty() {
            return Err("the API key file is empty".into());
        }
        let key = EncodingKey::from_rsa_pem(private_key_pem)
            .map_err(|_| "not an RSA private key in PEM form".to_owned())?;
        Ok(Self {
            api_key: Zeroizing::new(api_key.to_owned()),
            key,
            key_id: key_id.to_owned(),
            token_url: token_url.to_owned(),
        })
    }

    /// The token URL (the JWT's audience).
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// A fresh signed JWT, `now_s` seconds since the epoch.
    ///
    /// # Errors
    /// Signing failed.
    pub fn assertion(&self, now_s: i64) -> Result<Zeroizing<String>, PdsError> {
        let mut header = Header::new(Algorithm::RS512);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.api_key,
            sub: &self.api_key,
            aud: &self.token_url,
            jti: uuid::Uuid::new_v4().to_string(),
            exp: now_s + JWT_LIFETIME_S,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Zeroizing::new)
            .map_err(|_| PdsError::Auth("could not sign the JWT".into()))
    }

    /// The token request's form body for `assertion`.
    pub fn token_form(assertion: &str) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "grant_type=client_credentials&client_assertion_type={}&client_assertion={}",
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer", assertion
        ))
    }
}

/// The bearer token in use, if any.
#[derive(Default)]
pub struct TokenCache {
    held: Mutex<Option<(Zeroizing<String>, i64)>>,
}

impl TokenCache {
    /// The token, if one is held and not about to expire at `now_ms`.
    pub fn get(&self, now_ms: i64) -> Option<Zeroizing<String>> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref()
            .filter(|(_, until)| *until > now_ms)
            .map(|(t, _)| t.clone())
    }

    /// Forgets the token (PDS refused it).
    pub fn clear(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Keeps the token from a token endpoint answer `body` read at `now_ms`.
    ///
    /// # Errors
    /// The answer is not a token.
    pub fn store(&self, body: &[u8], now_ms: i64) -> Result<Zeroizing<String>, PdsError> {
        let answer: TokenAnswer = serde_json::from_slice(body)
            .map_err(|_| PdsError::Auth("the token endpoint's answer is not a token".into()))?;
        let seconds = match answer.expires_in {
            Some(serde_json::Value::String(s)) => s.parse::<i64>().ok(),
            Some(serde_json::Value::Number(n)) => n.as_i64(),
            _ => None,
        }
        .unwrap_or(300);
        let until = now_ms + (seconds * 1_000 - TOKEN_MARGIN_MS).max(1_000);
        let token = Zeroizing::new(answer.access_token);
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((token.clone(), until));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_early_and_take_string_lifetimes() {
        let cache = TokenCache::default();
        cache
            .store(
                br#"{"access_token":"t","expires_in":"599","token_type":"Bearer"}"#,
                0,
            )
            .unwrap();
        assert!(cache.get(500_000).is_some());
        assert!(cache.get(570_000).is_none(), "renewed before it expires");
        assert!(cache.store(b"{}", 0).is_err());
        cache.clear();
        assert!(cache.get(0).is_none());
    }

    #[test]
    fn a_bad_key_is_refused_without_echoing_it() {
        let err =
            Credentials::new("key", b"not a key", "kid", "https://t/oauth2/token").unwrap_err();
        assert!(!err.contains("not a key"));
        assert!(Credentials::new(" ", b"", "kid", "u").is_err());
    }
}
