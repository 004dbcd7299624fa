//! Throughcare: a gRPC gateway that makes a patient's health record follow
//! them through the criminal justice system.
//!
//! # Layout
//! ```text
//!  caller ──mTLS──▶ tls (identity from the client certificate)
//!                    ▼
//!                  grpc (wire ⇄ domain, Status mapping; the only module that knows pb::*)
//!                    │ domain commands + Caller        ▲ domain results / handover::Error
//!                    ▼                                 │
//!                  handover (the use cases, protocol-free: Submit, Pull, Ack, Nack,
//!                    │       Track, Claim and the operator calls)
//!                    ▼
//!                  clinical (identifiers, summary)  journey (events, registry, routing:
//!                                                   recipients, views, urgency, deadlines)
//!                    ▼
//!                  store (one sled transaction per change + audit; group commit
//!                         behind a durability barrier before any answer)
//! ```
//! `uk_time` is where a day ends in England and how a time is shown to a
//! person (Europe/London; the wire and the store keep UTC).
//! `app` wires these together and serves until shutdown; `config` is parsed
//! and validated before any port is bound; `certs` makes the dev PKI;
//! `operator` is what the on-call operator sees (Prometheus metrics and the
//! dashboard page). `pds` asks the Personal Demographics Service, in a
//! background task, for the GP of a parked release or an admission that
//! names none. `mllp` is the second edge: HL7 v2 ADT messages over MLLP,
//! submitted through the same `handover` use cases and answered with an
//! HL7 ACK once durable; `mesh` is the MESH edge (deliveries pushed to
//! organisations reached through MESH, prisons' submits read from the
//! gateway's MESH inbox), over `https`, the outbound HTTPS client PDS shares.
//! `telemetry` exports traces over OTLP when asked (off by default), so a
//! handover can be followed from submit to ack. `cli` is the command line's
//! (the binary's verbs live there, `main.rs` only parses and dispatches):
//! the built-in client (`cli::client`, `cli::handover`), operator calls as
//! tables (`cli::admin`), one patient's whole journey (`cli::demo`), and the
//! benchmarks (`cli::bench`).

pub mod app;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod clinical;
pub mod config;
pub mod grpc;
pub mod handover;
pub mod https;
pub mod journey;
pub mod mesh;
pub mod mllp;
pub mod operator;
pub mod pds;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod uk_time;
