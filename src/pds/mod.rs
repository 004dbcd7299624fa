//! The Personal Demographics Service (PDS FHIR R4 API): finds the GP
//! practice of a parked release's patient and checks who the patient is.
//!
//! # Layout
//! - [`config`]: the `[pds]` section (off by default).
//! - [`auth`]: the signed JWT (RS512) and the bearer token it buys.
//! - [`http`]: one HTTP/1.1 exchange over rustls, bounded by a time-out.
//! - [`client`]: `GET Patient/{id}` with `X-Request-ID`, retries, back-off.
//! - [`patient`]: the few Patient fields read.
//! - [`breaker`]: the circuit breaker.
//! - [`decision`]: route, or keep parked with the reason.
//! - [`registration`]: what PDS found, for a view rendered now.
//! - [`lookup`]: the background task; the store records the finding and
//!   makes the automatic claim (`store::pds`).
//!
//! # Invariants
//! - No lookup runs on a submit's path; an outage only delays routing.
//! - A release routes automatically only when PDS's id is the NHS number
//!   asked for, its date of birth is the summary's, no death is recorded,
//!   the record is not restricted, and the practice is an active GP
//!   practice in the registry.
//! - A restricted record's practice is never read, stored or shown.
//! - Keys, JWTs and tokens are never logged; errors carry no patient data.

mod admission;
pub mod auth;
pub mod breaker;
pub mod client;
pub mod config;
pub mod decision;
pub mod http;
pub mod lookup;
pub mod patient;
pub mod registration;

use std::sync::Arc;
use std::time::Duration;

pub use breaker::{BreakerState, CircuitBreaker};
pub use client::PdsClient;
pub use config::PdsConfig;
pub use lookup::{Pacing, PdsLookups};

use crate::config::ConfigError;

/// Why a lookup gave no answer. Carries no patient data.
#[derive(Debug, thiserror::Error)]
pub enum PdsError {
    /// No answer within the time-out.
    #[error("PDS did not answer in time")]
    Timeout,
    /// No connection, or it broke.
    #[error("PDS unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint refused us, or signing failed.
    #[error("PDS authentication: {0}")]
    Auth(String),
    /// An HTTP status other than 200 or 404 (after retries where allowed).
    #[error("PDS answered HTTP {0}")]
    Status(u16),
    /// The answer could not be read.
    #[error("PDS answer unusable: {0}")]
    Invalid(String),
    /// A 400 or 404 that is not PDS's answer about the patient (no
    /// OperationOutcome, or a code about the request: a wrong base URL, a
    /// missing header, an application not onboarded). Every lookup fails
    /// alike, so it counts as an outage.
    #[error("PDS refused the request itself (HTTP {0}, {1}): check the [pds] settings")]
    Platform(u16, String),
}

impl PdsError {
    /// Whether PDS as a whole is failing (what the circuit breaker counts),
    /// rather than this one record (an answer that cannot be read, a
    /// status PDS gives for one patient): one bad record must not hold the
    /// breaker open for every other parked release.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        match self {
            PdsError::Timeout | PdsError::Unreachable(_) | PdsError::Auth(_) => true,
            PdsError::Status(s) => matches!(*s, 401 | 403 | 408 | 429) || *s >= 500,
            PdsError::Invalid(_) => false,
            PdsError::Platform(..) => true,
        }
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: format!("pds.{field}"),
        reason: reason.into(),
    }
}

fn read(field: &str, path: Option<&std::path::Path>) -> Result<Vec<u8>, ConfigError> {
    let path = path.ok_or_else(|| bad(field, "required when pds.enabled"))?;
    std::fs::read(path).map_err(|e| {
        bad(
            field,
            format!("cannot read {}: {}", path.display(), e.kind()),
        )
    })
}

/// The client `config` describes, its files read and checked (before any
/// port is bound); `None` when PDS is off.
///
/// # Errors
/// A field that is missing, unreadable or unusable, named (never its value).
pub fn client_from_config(config: &PdsConfig) -> Result<Option<Arc<PdsClient>>, ConfigError> {
    if !config.enabled {
        return Ok(None);
    }
    config.validate()?;
    let api_key = zeroize::Zeroizing::new(read("api_key_file", config.api_key_file.as_deref())?);
    let api_key = std::str::from_utf8(&api_key).map_err(|_| bad("api_key_file", "not text"))?;
    let private_key = zeroize::Zeroizing::new(read(
        "private_key_file",
        config.private_key_file.as_deref(),
    )?);
    let credentials =
        auth::Credentials::new(api_key, &private_key, &config.key_id, &config.token_url).map_err(
            |reason| {
                let field = if reason.contains("API key") {
                    "api_key_file"
                } else {
                    "private_key_file"
                };
                bad(field, reason)
            },
        )?;
    let ca = match &config.ca_file {
        Some(p) => read("ca_file", Some(p))?,
        None => std::fs::read(config::SYSTEM_CA_BUNDLE).unwrap_or_default(),
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let needs_tls = config.base_url.starts_with("https") || config.token_url.starts_with("https");
    let transport =
        http::Transport::new(&ca, timeout, needs_tls).map_err(|reason| bad("ca_file", reason))?;
    Ok(Some(Arc::new(PdsClient::new(
        credentials,
        transport,
        client::ClientSettings {
            base_url: config.base_url.clone(),
            end_user_organisation: config.end_user_organisation.clone(),
            max_retries: config.max_retries,
            retry_backoff: Duration::from_millis(config.retry_backoff_ms),
            requests_per_second: config.requests_per_second,
        },
    ))))
}

/// Starts the lookup task (`app` calls this once the store is open); it
/// runs until `stop` turns true or the handle is aborted.
pub fn spawn(
    client: Arc<PdsClient>,
    config: &PdsConfig,
    gateway: Arc<crate::grpc::Gateway>,
    metrics: Arc<crate::operator::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let breaker = CircuitBreaker::new(
        config.breaker_failures,
        i64::try_from(config.breaker_open_ms).unwrap_or(i64::MAX),
    );
    let lookups = PdsLookups {
        client,
        breaker: Arc::new(breaker),
        gateway,
        pacing: config.pacing(),
        metrics,
        failing: std::sync::Mutex::default(),
    };
    tokio::spawn(lookups.run(stop))
}

impl PdsConfig {
    /// When lookups happen, from the config.
    pub fn pacing(&self) -> Pacing {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1_000)).unwrap_or(i64::MAX);
        Pacing {
            poll: Duration::from_millis(self.poll_interval_ms),
            recheck_ms: ms(self.recheck_after_seconds),
            max_recheck_ms: ms(self.max_recheck_after_seconds),
            batch: self.batch as usize,
        }
    }
}
