//! What an operator on call sees: Prometheus metrics and a read-only
//! dashboard page, both on the loopback metrics listener.

pub mod continuity;
pub mod dashboard;
pub mod metrics;
pub mod trends;
