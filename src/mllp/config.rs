//! The `[mllp]` section: off by default; checked before any port is bound.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The HL7 v2 over MLLP listener (docs/mllp.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MllpConfig {
    /// Serve MLLP.
    pub enabled: bool,
    /// Address of the listener (mutual TLS); port 0 picks a free port.
    pub listen: SocketAddr,
    /// Plaintext MLLP: no longer offered, refused when true (kept so an old
    /// configuration is refused by name).
    pub plain: bool,
    /// Refused when set (see `plain`).
    pub plain_sender_ods: Option<String>,
    /// Largest message (the bytes between the frame's start and end), bytes.
    pub max_message_bytes: u64,
    /// A connection must deliver its next whole message within this, ms,
    /// or is closed.
    pub idle_timeout_ms: u64,
    /// Open MLLP connections in total.
    pub max_connections: u32,
    /// Open MLLP connections one identity may hold.
    pub max_connections_per_identity: u32,
}

impl Default for MllpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 2575)),
            plain: false,
            plain_sender_ods: None,
            max_message_bytes: 1024 * 1024,
            idle_timeout_ms: 60_000,
            max_connections: 64,
            max_connections_per_identity: 8,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("mllp.{field}"),
        reason: reason.into(),
    }
}

impl MllpConfig {
    /// Checks the section when enabled (a disabled section is not read).
    /// `max_document_bytes` is the gateway's document limit (a message
    /// larger than it could never be accepted); `others` are the addresses
    /// the gateway's other listeners use.
    ///
    /// # Errors
    /// The first field that is missing, contradictory or out of range.
    pub fn validate(
        &self,
        max_document_bytes: usize,
        others: &[(&str, SocketAddr)],
    ) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        for (name, addr) in others {
            let same_ip = addr.ip() == self.listen.ip()
                || addr.ip().is_unspecified()
                || self.listen.ip().is_unspecified();
            if self.listen.port() != 0 && addr.port() == self.listen.port() && same_ip {
                return Err(bad("listen", format!("must not be the {name} address")));
            }
        }
        self.validate_plain()?;
        let within = |field: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, format!("must be between {lo} and {hi}")))
            }
        };
        within(
            "max_message_bytes",
            self.max_message_bytes,
            1024,
            max_document_bytes as u64,
        )
        .map_err(|e| ConfigError {
            reason: format!("{} (limits.max_document_bytes)", e.reason),
            ..e
        })?;
        within("idle_timeout_ms", self.idle_timeout_ms, 100, 3_600_000)?;
        within("max_connections", self.max_connections.into(), 1, 10_000)?;
        within(
            "max_connections_per_identity",
            self.max_connections_per_identity.into(),
            1,
            self.max_connections.into(),
        )?;
        Ok(())
    }

    /// MLLP is mutual TLS only: the two keys of the plaintext mode it once
    /// had are still read, so an old configuration is refused by name
    /// rather than as unknown.
    fn validate_plain(&self) -> Result<(), ConfigError> {
        if self.plain {
            return Err(bad(
                "plain",
                "plaintext MLLP is not offered: MLLP is mutual TLS only (give the engine its own client certificate, as on gRPC)",
            ));
        }
        if self.plain_sender_ods.is_some() {
            return Err(bad(
                "plain_sender_ods",
                "not offered: over TLS the client certificate names the sender",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(tweak: impl FnOnce(&mut MllpConfig)) -> Result<(), ConfigError> {
        let mut c = MllpConfig {
            enabled: true,
            ..MllpConfig::default()
        };
        tweak(&mut c);
        c.validate(
            4 * 1024 * 1024,
            &[("gRPC listener", "127.0.0.1:7443".parse().unwrap())],
        )
    }

    #[test]
    fn plaintext_is_refused_by_name() {
        assert!(enabled(|_| {}).is_ok());
        let field = |tweak: fn(&mut MllpConfig)| enabled(tweak).unwrap_err().field;
        // On loopback too, where a plaintext mode was once allowed.
        let err = enabled(|c| {
            c.plain = true;
            c.plain_sender_ods = Some("YP001".into());
            c.listen = "[::1]:2575".parse().unwrap();
        })
        .unwrap_err();
        assert_eq!(err.field, "mllp.plain");
        assert!(err.reason.contains("mutual TLS only"), "{err}");
        assert_eq!(
            field(|c| c.plain_sender_ods = Some("YP001".into())),
            "mllp.plain_sender_ods"
        );
    }

    #[test]
    fn limits_and_addresses_are_checked() {
        let field = |tweak: fn(&mut MllpConfig)| enabled(tweak).unwrap_err().field;
        assert_eq!(
            field(|c| c.max_message_bytes = 10),
            "mllp.max_message_bytes"
        );
        assert_eq!(
            field(|c| c.max_message_bytes = 5 * 1024 * 1024),
            "mllp.max_message_bytes"
        );
        assert_eq!(field(|c| c.idle_timeout_ms = 0), "mllp.idle_timeout_ms");
        assert_eq!(field(|c| c.max_connections = 0), "mllp.max_connections");
        assert_eq!(
            field(|c| c.max_connections_per_identity = 65),
            "mllp.max_connections_per_identity"
        );
        assert_eq!(
            field(|c| c.listen = "0.0.0.0:7443".parse().unwrap()),
            "mllp.listen"
        );
        // Off: not read.
        let off = MllpConfig {
            max_connections: 0,
            ..MllpConfig::default()
        };
        assert!(off.validate(1, &[]).is_ok());
    }
}
