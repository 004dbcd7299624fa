//! The HL7 v2 over MLLP edge: integration engines and hospital systems send
//! ADT A01 (admission), A02 (transfer), A03 (release) and A08 (a GP's
//! community summary) over a long-lived connection, one framed message at a
//! time, and get an HL7 ACK for each (docs/mllp.md).
//!
//! ```text
//!  sender ──mTLS (or plain on loopback)──▶ listener: identity, connection limits
//!            frame: 0x0B message 0x1C 0x0D, size-limited while reading
//!            answer: MSH read ─▶ handover::Gateway::submit (MSH-10 = message id)
//!                    ◀── receipt only once durable ──▶ ACK (AA / AE / AR + ERR)
//! ```
//!
//! # Invariants
//! - An AA is written only after the submit returned its receipt, that is
//!   after the store's durability barrier; a connection closed or a gateway
//!   killed before then leaves the sender without an AA, so it resends, and
//!   the control id makes the resend a duplicate answered AA again.
//! - A refusal never writes anything: AE/AR come from the use case's own
//!   checks, which refuse before the store (or the store's transaction is
//!   not made).
//! - Messages on one connection are answered in order, one at a time (MLLP
//!   is a synchronous protocol); connections are independent.
//! - Nothing from a message reaches a log, a metric label or an ERR text
//!   except the paths of the fields at fault.
//!
//! Files: `config` (the `[mllp]` section), `frame` (MLLP framing),
//! `answer` (one message to its ACK), `listener` (accept, identity, limits,
//! the per-connection loop).

mod answer;
mod config;
pub mod frame;
mod listener;

pub use answer::{Answer, answer};
pub use config::MllpConfig;
pub use listener::{Settings, Transport, spawn};
