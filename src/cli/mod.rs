//! The command line's own code that tests and the binary share: the built-in
//! client's verbs and how a summary reads at a terminal.

pub mod handover;
pub mod health;
pub mod readable;
