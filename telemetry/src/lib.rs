//! Health, readiness and metrics for operators: `GET /healthz` (the process is alive and its
//! main loop turns), `GET /readyz` (it does its job: probes attached, store reachable, …) and
//! `GET /metrics` (Prometheus text format 0.0.4), served over plain HTTP on a local port.
//!
//! Metrics are registered once with fixed labels and updated through cheap atomic handles;
//! the standard `process_*` metrics are read from `/proc/self` at each scrape.

mod health;
mod metrics;
mod process;
mod server;

pub use health::Health;
pub use metrics::{Counter, Gauge, Registry};
pub use server::{parse_listen, serve};
