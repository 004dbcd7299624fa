//! The `[mesh]` section: off by default; checked before a port is bound.
//! The mailbox password, the environment's shared key and the client key
//! live in files the config names: no secret is ever in the config text, a
//! log, an error or `Debug` output.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// How the gateway reaches MESH (API v2) and which mailbox is its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Push deliveries of MESH-reached organisations and read the inbox.
    pub enabled: bool,
    /// The MESH base URL, e.g. `https://msg.intspineservices.nhs.uk`
    /// (requests go to `{url}/messageexchange/...`).
    pub url: String,
    /// The gateway's own MESH mailbox id.
    pub mailbox: String,
    /// File holding the mailbox password.
    pub password_file: Option<PathBuf>,
    /// File holding the environment's shared key (the HMAC key of the
    /// `NHSMESH` authorisation header).
    pub shared_key_file: Option<PathBuf>,
    /// The gateway's MESH client certificate (PEM), for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key_file: Option<PathBuf>,
    /// CA bundle (PEM) to trust for the MESH server; default the system bundle.
    pub ca_file: Option<PathBuf>,
    /// How often the inbox is read and sent messages are tracked, ms: MESH
    /// asks for at most once every five minutes, the default (a new
    /// delivery for a MESH-reached organisation wakes the sender at once).
    pub poll_interval_ms: u64,
    /// One HTTP exchange (connect, send, answer), ms.
    pub timeout_ms: u64,
    /// Largest chunk of one message; larger documents go in several.
    pub chunk_bytes: u64,
    /// How long the gateway holds a delivery it is sending or waiting on,
    /// seconds (a lease as the recipient; at most `queue.max_lease_seconds`).
    pub lease_seconds: u32,
    /// First wait after a failed exchange, ms (doubles up to `max_backoff_ms`).
    pub retry_backoff_ms: u64,
    /// Longest wait between retries, ms.
    pub max_backoff_ms: u64,
    /// Most deliveries taken per organisation at a time, and inbox ids
    /// listed per page (at least MESH's 10); the inbox is read until empty.
    pub batch: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            mailbox: String::new(),
            password_file: None,
            shared_key_file: None,
            client_cert_file: None,
            client_key_file: None,
            ca_file: None,
            poll_interval_ms: 300_000,
            timeout_ms: 30_000,
            chunk_bytes: 20_000_000,
            lease_seconds: 3_600,
            retry_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            batch: 20,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("mesh.{field}"),
        reason: reason.into(),
    }
}

impl MeshConfig {
    /// Checks the section when enabled (a disabled section is not read).
    ///
    /// # Errors
    /// The first field that is missing or out of range.
    pub fn validate(&self, max_lease_seconds: u32) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        crate::pds::config::check_url(&self.url).map_err(|reason| bad("url", reason))?;
        if !super::is_mailbox_id(&self.mailbox) {
            return Err(bad(
                "mailbox",
                "required: the gateway's MESH mailbox id (letters and digits)",
            ));
        }
        // MESH's authorisation header names the mailbox in upper case; a
        // lower-case id is refused by MESH on every call.
        if self.mailbox.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(bad(
                "mailbox",
                "must be upper case, as MESH writes mailbox ids (X26ABC1)",
            ));
        }
        for (field, path) in [
            ("password_file", &self.password_file),
            ("shared_key_file", &self.shared_key_file),
        ] {
            if path.is_none() {
                return Err(bad(field, "required when mesh.enabled"));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(bad(
                "client_key_file",
                "client_cert_file and client_key_file go together",
            ));
        }
        if self.url.starts_with("https") && self.client_cert_file.is_none() {
            return Err(bad(
                "client_cert_file",
                "required for https: MESH wants mutual TLS",
            ));
        }
        let within = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, format!("must be between {lo} and {hi}")))
            }
        };
        within("poll_interval_ms", self.poll_interval_ms, 50, 3_600_000)?;
        within("timeout_ms", self.timeout_ms, 100, 600_000)?;
        within("chunk_bytes", self.chunk_bytes, 1_024, 100_000_000)?;
        within(
            "lease_seconds",
            self.lease_seconds.into(),
            1,
            max_lease_seconds.into(),
        )?;
        within("retry_backoff_ms", self.retry_backoff_ms, 10, 600_000)?;
        within(
            "max_backoff_ms",
            self.max_backoff_ms,
            self.retry_backoff_ms,
            3_600_000,
        )?;
        within("batch", self.batch.into(), 1, 500)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_checked_when_on() {
        assert!(!MeshConfig::default().enabled);
        assert!(MeshConfig::default().validate(3_600).is_ok());
        let on = MeshConfig {
            enabled: true,
            url: "https://mesh.example".into(),
            mailbox: "X26ABC1".into(),
            password_file: Some("p".into()),
            shared_key_file: Some("k".into()),
            client_cert_file: Some("c".into()),
            client_key_file: Some("ck".into()),
            ..MeshConfig::default()
        };
        assert!(on.validate(3_600).is_ok());
        let field = |c: MeshConfig| c.validate(3_600).unwrap_err().field;
        let plain = MeshConfig {
            url: "http://mesh.example".into(),
            ..on.clone()
        };
        assert_eq!(field(plain), "mesh.url");
        let no_mailbox = MeshConfig {
            mailbox: "x y".into(),
            ..on.clone()
        };
        assert_eq!(field(no_mailbox), "mesh.mailbox");
        let lower = MeshConfig {
            mailbox: "x26abc1".into(),
            ..on.clone()
        };
        assert_eq!(field(lower), "mesh.mailbox");
        let no_key = MeshConfig {
            shared_key_file: None,
            ..on.clone()
        };
        assert_eq!(field(no_key), "mesh.shared_key_file");
        let no_cert = MeshConfig {
            client_cert_file: None,
            client_key_file: None,
            ..on.clone()
        };
        assert_eq!(field(no_cert), "mesh.client_cert_file");
        let long_lease = MeshConfig {
            lease_seconds: 7_200,
            ..on.clone()
        };
        assert_eq!(field(long_lease), "mesh.lease_seconds");
        let tiny = MeshConfig {
            chunk_bytes: 10,
            ..on
        };
        assert_eq!(field(tiny), "mesh.chunk_bytes");
    }
}
