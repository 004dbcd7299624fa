//! Mutual TLS: the rustls server configuration, the accept loop that turns
//! TCP connections into authenticated ones, and the caller's identity taken
//! from its client certificate's SAN URI.
//!
//! There is no plaintext listener. Clients must present a certificate issued
//! by the configured CA (and not revoked, when a CRL is configured); a
//! certificate without a `urn:ods:` or `urn:operator:` SAN URI is dropped at
//! the handshake. Whether an ODS code is *registered* is decided per call.
//!
//! # Layout
//! - `identity`: the caller's identity from its certificate's SAN URI.
//! - `material`: the PEM files (CA, certificate, key, CRL) into a rustls
//!   server configuration.
//! - `verifier`: the client-certificate verifier that remembers what was
//!   presented, and whether the gateway's CA issued a certificate.
//! - `reload`: the configuration in force, reloaded when its files change.
//! - `conn`: an authenticated connection, counted per identity, cut when a
//!   reload revokes its certificate.
//! - `refusal`: connections refused before any call, and their tally.
//! - [`admission`]: who may start a handshake (fair under a flood).
//! - `accept`: the accept loop and its once-a-second housekeeping.
//! - `client`: the client's mutual-TLS channel.

mod accept;
pub mod admission;
mod client;
mod conn;
mod identity;
mod material;
mod refusal;
mod reload;
mod verifier;

pub use accept::{AcceptLimits, incoming};
pub use admission::AdmissionLimits;
pub use client::client_channel;
pub use conn::{ConnInfo, TlsConn};
pub use identity::{IdentityError, PeerIdentity, identity_from_cert, is_operator_name};
pub use material::{TlsError, TlsFiles, crl_next_update, expiry_timestamp, server_config};
pub use refusal::{Refusal, RefusalSink, address_actor};
pub use reload::ReloadableConfig;
