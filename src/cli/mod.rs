//! The command line's own code that tests and the binary share: the built-in
//! client and its verbs, operator tables, the demo, the benchmarks, the
//! health probe and how a summary reads at a terminal. `main.rs` parses the
//! arguments and calls these.

pub mod admin;
pub mod bench;
pub mod client;
pub mod continuity;
pub mod demo;
pub mod handover;
pub mod health;
pub mod mllp;
pub mod readable;
pub mod store_move;
