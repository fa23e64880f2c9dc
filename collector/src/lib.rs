//! The phi-audit collector: verified ingest over gRPC with mutual TLS, storage, and the tools
//! around it (`phictl`).

pub mod api;
pub mod certs;
pub mod config;
pub mod export;
pub mod ingest;
pub mod retention;
pub mod rules;
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
