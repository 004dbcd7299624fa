//! The MESH edge (MESH API v2, the NHS store-and-forward mailbox service):
//! organisations the registry marks with a MESH mailbox receive their
//! deliveries as MESH messages from the gateway's own mailbox, and prisons
//! may submit through MESH (docs/mesh.md).
//!
//! # Layout
//! - [`config`]: the `[mesh]` section (off by default).
//! - [`auth`]: the `NHSMESH` authorisation header (HMAC-SHA256).
//! - [`client`]: send (chunked), track, inbox, retrieve, acknowledge, over
//!   mutual TLS ([`crate::https`]).
//! - [`outbound`]: takes deliveries through the application layer as the
//!   recipient's mailbox, sends them, and tracks them to DELIVERED or
//!   quarantine.
//! - [`inbound`]: reads the gateway's inbox and submits as the sending
//!   prison; refuses an invalid message back to its sender.
//!
//! # Invariants
//! - Nothing here touches the store's queue directly: deliveries are
//!   pulled, acked and nacked through `handover` as their mailbox.
//! - Before a send, the store records durably that it starts (with the
//!   local id); after, with MESH's message id. A restart asks MESH by local
//!   id before sending again; at worst it re-sends with the same local id
//!   (at-least-once, as for every consumer).
//! - An inbox message is acknowledged in MESH only after its submit is
//!   durable, or after its refusal report was accepted by MESH.
//! - The password, the shared key and the authorisation header are never
//!   logged; messages carry no patient data in logs, errors or reports.

pub mod auth;
pub mod client;
pub mod config;
pub mod inbound;
pub mod outbound;

use std::sync::Arc;
use std::time::Duration;

pub use client::MeshClient;
pub use config::MeshConfig;

use crate::clinical::JourneyEvent;
use crate::config::ConfigError;
use crate::https::HttpError;

/// The identity the MESH edge acts as where it is not a mailbox (audit).
pub const MESH_ACTOR: &str = "service:mesh";

/// The workflow id of the refusal reports the gateway sends back to a
/// sender whose message it could not accept (docs/mesh.md).
pub const REFUSAL_WORKFLOW: &str = "THROUGHCARE_REFUSAL";

/// The workflow id of a journey event's messages, both ways.
#[must_use]
pub fn workflow_id(event: JourneyEvent) -> &'static str {
    match event {
        JourneyEvent::Admission => "THROUGHCARE_ADMISSION",
        JourneyEvent::Transfer => "THROUGHCARE_TRANSFER",
        JourneyEvent::Release => "THROUGHCARE_RELEASE",
        JourneyEvent::CommunitySummary => "THROUGHCARE_COMMUNITY_SUMMARY",
    }
}

/// The journey event a workflow id names.
#[must_use]
pub fn event_of_workflow(workflow_id: &str) -> Option<JourneyEvent> {
    JourneyEvent::ALL
        .into_iter()
        .find(|e| workflow_id.eq_ignore_ascii_case(self::workflow_id(*e)))
}

pub use crate::journey::is_mesh_mailbox_id as is_mailbox_id;

/// Whether `id` can be a MESH message id (safe in a URL path).
#[must_use]
pub fn is_message_id(id: &str) -> bool {
    (1..=100).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why an exchange with MESH failed. Carries no message content.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The transport failed (time-out, no connection).
    #[error("MESH {0}")]
    Http(#[from] HttpError),
    /// MESH answered with an HTTP status it uses for a refusal or a fault,
    /// and how long it asked the client to wait (`Retry-After`, seconds).
    #[error("MESH answered HTTP {0}: {1}")]
    Status(u16, String, Option<u64>),
    /// The answer could not be read, or a request not built.
    #[error("MESH answer unusable: {0}")]
    Invalid(String),
    /// The application layer failed (store unavailable, shutting down).
    #[error("the gateway: {0}")]
    Gateway(String),
}

/// The longest `Retry-After` honoured: a larger one (or a mistaken one)
/// must not stop deliveries for days.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(3_600);

impl MeshError {
    /// Whether MESH asked this client to send less (429): the round stops
    /// and waits, whatever the handshake says, rather than sending the
    /// next message into the same limit.
    #[must_use]
    pub fn is_rate_limit(&self) -> bool {
        matches!(self, MeshError::Status(429, ..))
    }

    /// How long to wait after a failed round whose back-off is `backoff`:
    /// at least what MESH asked for (`Retry-After`, at most
    /// [`MAX_RETRY_AFTER`]).
    #[must_use]
    pub fn wait_after(&self, backoff: std::time::Duration) -> std::time::Duration {
        match self {
            MeshError::Status(_, _, Some(s)) => {
                backoff.max(std::time::Duration::from_secs(*s).min(MAX_RETRY_AFTER))
            }
            _ => backoff,
        }
    }

    /// Whether MESH (or the gateway) is failing as a whole, so the round
    /// stops and backs off; otherwise the failure is this message's, and
    /// the round goes on with the others (one bad message must not hold
    /// up the rest). Per-message calls come after the round's inbox list
    /// has shown MESH answering.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        match self {
            MeshError::Http(HttpError::TooLarge(_)) | MeshError::Invalid(_) => false,
            MeshError::Http(_) | MeshError::Gateway(_) => true,
            MeshError::Status(s, ..) => matches!(*s, 401 | 403 | 408 | 429 | 502 | 503 | 504),
        }
    }

    /// Whether trying again later may succeed (MESH down, slow, busy);
    /// otherwise MESH refused this message for good.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            MeshError::Http(HttpError::TooLarge(_)) => false,
            MeshError::Http(_) | MeshError::Gateway(_) | MeshError::Invalid(_) => true,
            // 401/403: our credentials or clock are wrong, not the message:
            // every message would fail alike, so wait for an operator.
            MeshError::Status(s, ..) => matches!(*s, 401 | 403 | 408 | 429) || *s >= 500,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("mesh.{field}"),
        reason: reason.into(),
    }
}

fn read(
    field: &str,
    path: Option<&std::path::Path>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ConfigError> {
    let path = path.ok_or_else(|| bad(field, "required when mesh.enabled"))?;
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| {
            bad(
                field,
                format!("cannot read {}: {}", path.display(), e.kind()),
            )
        })
}

fn secret_text(
    field: &str,
    path: Option<&std::path::Path>,
) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    let bytes = read(field, path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad(field, "not text"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(bad(field, "is empty"));
    }
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

/// The client `config` describes, its files read and checked (before any
/// port is bound); `None` when MESH is off.
///
/// # Errors
/// A field that is missing, unreadable or unusable, named (never its value).
pub fn client_from_config(
    config: &MeshConfig,
    max_document_bytes: usize,
) -> Result<Option<Arc<MeshClient>>, ConfigError> {
    if !config.enabled {
        return Ok(None);
    }
    let password = secret_text("password_file", config.password_file.as_deref())?;
    let shared_key = secret_text("shared_key_file", config.shared_key_file.as_deref())?;
    let credentials = auth::Credentials::new(&config.mailbox, &password, shared_key.as_bytes());
    let ca = match &config.ca_file {
        Some(p) => read("ca_file", Some(p))?,
        None => zeroize::Zeroizing::new(
            std::fs::read(crate::pds::config::SYSTEM_CA_BUNDLE).unwrap_or_default(),
        ),
    };
    let cert = match &config.client_cert_file {
        Some(p) => Some(read("client_cert_file", Some(p))?),
        None => None,
    };
    let key = match &config.client_key_file {
        Some(p) => Some(read("client_key_file", Some(p))?),
        None => None,
    };
    let identity = match (&cert, &key) {
        (Some(cert_pem), Some(key_pem)) => Some(crate::https::ClientIdentity { cert_pem, key_pem }),
        _ => None,
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let chunk = usize::try_from(config.chunk_bytes).unwrap_or(usize::MAX);
    let transport = crate::https::Transport::with_identity(
        &ca,
        identity,
        timeout,
        config.url.starts_with("https"),
    )
    .map_err(|reason| {
        let field = if reason.contains("client") {
            "client_cert_file"
        } else {
            "ca_file"
        };
        bad(field, reason)
    })?
    // The largest document the gateway accepts (a sender may put it in one
    // chunk), or one of our chunks, plus MESH's headers and JSON around it.
    .max_answer(chunk.max(max_document_bytes).saturating_add(64 * 1024));
    Ok(Some(Arc::new(
        MeshClient::new(credentials, transport, &config.url, chunk)
            .with_max_document(max_document_bytes),
    )))
}

/// Starts the MESH task (`app` calls this once the store is open); it runs
/// until `stop` turns true or the handle is aborted.
pub fn spawn(
    client: Arc<MeshClient>,
    config: &MeshConfig,
    gateway: Arc<crate::handover::Gateway>,
    metrics: Arc<crate::operator::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let edge = outbound::MeshEdge::new(client, gateway, metrics, outbound::Pacing::of(config));
    tokio::spawn(edge.run(stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 429 or 503 with `Retry-After` waits at least that long (at most an
    /// hour); the back-off alone was one second, doubling, so the inbox was
    /// listed again and every sent message tracked within seconds.
    #[test]
    fn a_failed_round_waits_as_long_as_mesh_asked() {
        use std::time::Duration;
        let second = Duration::from_secs(1);
        let busy = MeshError::Status(429, "slow down".into(), Some(120));
        assert_eq!(busy.wait_after(second), Duration::from_secs(120));
        assert!(busy.is_rate_limit() && busy.is_outage());
        let down = MeshError::Status(503, String::new(), Some(86_400 * 3));
        assert_eq!(down.wait_after(second), MAX_RETRY_AFTER);
        assert!(!down.is_rate_limit());
        let plain = MeshError::Status(503, String::new(), None);
        assert_eq!(plain.wait_after(second), second);
        let short = MeshError::Status(429, String::new(), Some(0));
        assert_eq!(short.wait_after(second), second);
    }

    #[test]
    fn workflow_ids_name_their_event_and_nothing_else() {
        for e in JourneyEvent::ALL {
            assert_eq!(event_of_workflow(workflow_id(e)), Some(e));
        }
        assert_eq!(event_of_workflow(REFUSAL_WORKFLOW), None);
        assert_eq!(event_of_workflow(""), None);
        assert!(is_mailbox_id("X26ABC1") && !is_mailbox_id("X26/../a") && !is_mailbox_id(""));
        assert!(is_message_id("20200601122152994285_D59900") && !is_message_id("a/b"));
    }
}
