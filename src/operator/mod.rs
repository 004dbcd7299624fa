//! What an operator on call sees: Prometheus metrics (and, later, queue
//! statistics and the dashboard).

pub mod metrics;
