//! The phi-audit collector: verified ingest over gRPC with mutual TLS, storage, and the tools
//! around it (`phictl`).

pub mod certs;
pub mod ingest;
pub mod store;
pub mod tls;
pub mod verify;
