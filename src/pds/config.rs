//! The `[pds]` section: off by default; checked before a port is bound.
//! The keys live in files the config names: neither the API key nor the
//! private key is ever in the config text, a log or an error.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// How the gateway reaches PDS (application-restricted, signed JWT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PdsConfig {
    /// Look parked releases up in PDS.
    pub enabled: bool,
    /// The FHIR R4 base, e.g. `https://api.service.nhs.uk/personal-demographics/FHIR/R4`.
    pub base_url: String,
    /// The OAuth 2.0 token endpoint, e.g. `https://api.service.nhs.uk/oauth2/token`
    /// (also the JWT's `aud`).
    pub token_url: String,
    /// File holding the application's API key (the JWT's `iss` and `sub`).
    pub api_key_file: Option<PathBuf>,
    /// The RSA private key (PEM) the JWT is signed with (RS512).
    pub private_key_file: Option<PathBuf>,
    /// The key id (`kid`) registered with the public key.
    pub key_id: String,
    /// Sent as `NHSD-End-User-Organisation-ODS` for a lookup that serves
    /// no one organisation; a lookup for a summary names its sender.
    pub end_user_organisation: Option<String>,
    /// CA bundle (PEM) to trust for `https`; default the system bundle.
    pub ca_file: Option<PathBuf>,
    /// One HTTP attempt (connect, send, answer), ms.
    pub timeout_ms: u64,
    /// Retries of one lookup after a 429, a 5xx or a time-out.
    pub max_retries: u32,
    /// First retry back-off, ms (doubles; a `Retry-After` is honoured up to 60 s).
    pub retry_backoff_ms: u64,
    /// How often the lookup task looks for parked releases due a lookup, ms
    /// (a newly parked release wakes it at once).
    pub poll_interval_ms: u64,
    /// First wait before looking a parked release up again, s (doubles).
    pub recheck_after_seconds: u64,
    /// Longest wait between lookups of one parked release, s.
    pub max_recheck_after_seconds: u64,
    /// Consecutive failed lookups that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the open breaker refuses lookups before one trial, ms.
    pub breaker_open_ms: u64,
    /// Most lookups in one round.
    pub batch: u32,
    /// Most requests a second to PDS: the application's rate limit (PDS
    /// allows 5 unless onboarded for more); requests beyond it wait.
    pub requests_per_second: u32,
}

impl Default for PdsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: "https://api.service.nhs.uk/personal-demographics/FHIR/R4".into(),
            token_url: "https://api.service.nhs.uk/oauth2/token".into(),
            api_key_file: None,
            private_key_file: None,
            key_id: String::new(),
            end_user_organisation: None,
            ca_file: None,
            timeout_ms: 10_000,
            max_retries: 2,
            retry_backoff_ms: 500,
            poll_interval_ms: 30_000,
            recheck_after_seconds: 3_600,
            max_recheck_after_seconds: 86_400,
            breaker_failures: 5,
            breaker_open_ms: 60_000,
            batch: 50,
            requests_per_second: 5,
        }
    }
}

/// The system's CA bundle (Debian and derivatives).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("pds.{field}"),
        reason: reason.into(),
    }
}

impl PdsConfig {
    /// Checks the section when enabled (a disabled section is not read).
    ///
    /// # Errors
    /// The first field that is missing or out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        for (field, url) in [("base_url", &self.base_url), ("token_url", &self.token_url)] {
            check_url(url).map_err(|reason| bad(field, reason))?;
        }
        if self.key_id.trim().is_empty() {
            return Err(bad(
                "key_id",
                "required: the kid registered with the public key",
            ));
        }
        if let Some(ods) = &self.end_user_organisation {
            ods.parse::<crate::clinical::OdsCode>()
                .map_err(|_| bad("end_user_organisation", "must be an ODS code"))?;
        }
        let within = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, format!("must be between {lo} and {hi}")))
            }
        };
        within("timeout_ms", self.timeout_ms, 100, 120_000)?;
        within(
            "requests_per_second",
            self.requests_per_second.into(),
            1,
            10_000,
        )?;
        within("max_retries", self.max_retries.into(), 0, 10)?;
        within("retry_backoff_ms", self.retry_backoff_ms, 10, 60_000)?;
        within("poll_interval_ms", self.poll_interval_ms, 50, 3_600_000)?;
        within(
            "recheck_after_seconds",
            self.recheck_after_seconds,
            1,
            7 * 86_400,
        )?;
        within(
            "max_recheck_after_seconds",
            self.max_recheck_after_seconds,
            self.recheck_after_seconds,
            30 * 86_400,
        )?;
        within("breaker_failures", self.breaker_failures.into(), 1, 1_000)?;
        within("breaker_open_ms", self.breaker_open_ms, 100, 3_600_000)?;
        within("batch", self.batch.into(), 1, 10_000)?;
        Ok(())
    }
}

/// `https`, or plain `http` to a loopback address only (a test double); MESH uses it too.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL".to_owned())?;
    let host = uri.host().ok_or("has no host")?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http")
            if host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()) =>
        {
            Ok(())
        }
        Some("http") => Err("must be https (plain http only to a loopback address)".into()),
        _ => Err("must be an https URL".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_checked_when_on() {
        assert!(!PdsConfig::default().enabled);
        assert!(PdsConfig::default().validate().is_ok());
        let on = PdsConfig {
            enabled: true,
            key_id: "test-1".into(),
            ..PdsConfig::default()
        };
        assert!(on.validate().is_ok());
        let plain = PdsConfig {
            base_url: "http://pds.example/FHIR/R4".into(),
            ..on.clone()
        };
        assert_eq!(plain.validate().unwrap_err().field, "pds.base_url");
        let local = PdsConfig {
            base_url: "http://127.0.0.1:9/FHIR/R4".into(),
            ..on.clone()
        };
        assert!(local.validate().is_ok());
        let no_kid = PdsConfig {
            key_id: " ".into(),
            ..on.clone()
        };
        assert_eq!(no_kid.validate().unwrap_err().field, "pds.key_id");
        let slow = PdsConfig {
            timeout_ms: 0,
            ..on
        };
        assert_eq!(slow.validate().unwrap_err().field, "pds.timeout_ms");
    }
}
