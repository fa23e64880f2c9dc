//! Storage of verified chains: SQLite by default (one file, WAL).

pub mod sqlite;

use phi_chain::seal::Head;

/// What the store knows about one host's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    /// The Ed25519 key pinned at first contact.
    pub public_key: Vec<u8>,
    pub head: Head,
    /// The newest stored checkpoint (seq 0 and an empty signature before the first).
    pub checkpoint_seq: u64,
    pub checkpoint_sig: Vec<u8>,
}

/// A tamper alert: something that must never be accepted silently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub host_id: String,
    /// "chain-break", "fork", "checkpoint", "key-change".
    pub kind: String,
    /// The seq it concerns, if any.
    pub seq: Option<u64>,
    pub detail: String,
    /// The offending bytes (a sealed record or checkpoint), for the investigation.
    pub evidence: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database {path} has schema version {found}; this collector knows up to {known}")]
    Schema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("invalid database URL {0:?}: use sqlite:PATH")]
    Url(String),
}
