//! Storage of verified chains and everything around them: SQLite by default (one file, WAL),
//! PostgreSQL when several collectors share one store.
//!
//! Both backends implement [`Store`]. A batch is decoded and hashed first, without a lock
//! ([`crate::verify::prepare`]); then one transaction locks the host's chain head, checks the
//! batch against it ([`crate::verify::verify_prepared`]) and stores the result, so two
//! collectors ingesting for the same host can never fork a chain. On SQLite the batches of
//! concurrent streams share that transaction ([`group`]).

pub mod block;
pub mod group;
pub mod index;
pub mod postgres;
pub mod query;
pub mod sqlite;

use phi_chain::seal::Head;
use phi_proto::v1::{AccessEntry, Batch, Checkpoint};

pub use self::index::session_key;
use crate::verify::Prepared;

/// What the store knows about one host's chain (what ingest needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostState {
    /// The Ed25519 key pinned at first contact.
    pub public_key: Vec<u8>,
    pub head: Head,
    /// The newest stored checkpoint (seq 0 and an empty signature before the first).
    pub checkpoint_seq: u64,
    pub checkpoint_sig: Vec<u8>,
}

/// A host as the query side shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub host_id: String,
    pub public_key: Vec<u8>,
    pub first_seen_ns: i64,
    pub last_seen_ns: i64,
    pub agent_version: String,
    pub head_seq: u64,
    pub head_hash: Vec<u8>,
    pub checkpoint_seq: u64,
    pub checkpoint_time_ns: i64,
    /// Records up to this seq were removed by retention (0: none).
    pub anchor_seq: u64,
    pub alerts: u64,
    pub hold: Option<Hold>,
    pub last_record_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub reason: String,
    pub set_by: String,
    pub since_ns: i64,
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

/// A stored alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAlert {
    pub id: u64,
    pub time_ns: i64,
    pub alert: Alert,
}

/// Where a host's chain stands, for the consumers that follow it (sinks, rules).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostHead {
    pub host_id: String,
    pub head_seq: u64,
    /// Records up to this seq were removed by retention (0: none).
    pub anchor_seq: u64,
    /// The last connection of its agent and the time of its newest record (ns).
    pub last_seen_ns: i64,
    pub last_record_ns: i64,
}

/// The outcome of appending a batch.
#[derive(Debug)]
pub struct Appended {
    /// The durable head after the batch (everything verified was stored).
    pub head: Head,
    pub records: usize,
    pub checkpoints: usize,
    /// The first part of the batch that was refused (stored as an alert).
    pub problem: Option<Alert>,
    /// The batch's decoded records, handed back so that the caller frees them after the
    /// write lock is let go (freeing a batch's decoded records costs about as much as
    /// writing its query columns).
    pub spent: Spent,
}

/// The decoded records of an appended batch (see [`Appended::spent`]).
#[derive(Default)]
pub struct Spent(pub(crate) Vec<crate::verify::Accepted>);

impl std::fmt::Debug for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spent({} records)", self.0.len())
    }
}

/// One stored record, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub host_id: String,
    pub seq: u64,
    pub hash: Vec<u8>,
    pub body: Vec<u8>,
    pub time_ns: i64,
    pub session: Option<String>,
}

/// Filters of a timeline (all optional, combined with AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub host: Option<String>,
    /// Inclusive lower and exclusive upper bound on the record time (ns since the epoch).
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    /// Login user, user name, or numeric uid.
    pub user: Option<String>,
    pub path_prefix: Option<String>,
    pub kinds: Vec<String>,
    pub session: Option<String>,
}

/// Where a page of a timeline ended: results continue strictly after it. Timelines are
/// ordered by (time, host, seq).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub time_ns: i64,
    pub host_id: String,
    pub seq: u64,
}

impl Row {
    pub fn cursor(&self) -> Cursor {
        Cursor {
            time_ns: self.time_ns,
            host_id: self.host_id.clone(),
            seq: self.seq,
        }
    }
}

/// A login session, aggregated at ingest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub session: String,
    pub host_id: String,
    pub boot_id: String,
    pub audit_session: u32,
    pub kind: String,
    pub user: String,
    pub source_address: String,
    pub source_port: u32,
    pub tty: String,
    pub login_ns: i64,
    pub first_ns: i64,
    pub last_ns: i64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub phi_accesses: u64,
    pub denied: u64,
    pub execs: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub host: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub user: Option<String>,
}

/// Someone allowed to query: by bearer token (stored as its SHA-256) or client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub cert_name: Option<String>,
    pub has_token: bool,
    pub disabled: bool,
    pub created_ns: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads and exports.
    Auditor,
    /// Also manages: legal holds, pruning, principals.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Role, StoreError> {
        match s {
            "auditor" => Ok(Role::Auditor),
            "admin" => Ok(Role::Admin),
            other => Err(StoreError::Invalid(format!(
                "unknown role {other:?}: use auditor or admin"
            ))),
        }
    }
}

/// The result of pruning one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneOutcome {
    pub host_id: String,
    /// Records through this seq are removed (0: nothing).
    pub through_seq: u64,
    pub records: u64,
    pub skipped: Option<String>,
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
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("database {path} has schema version {found}; this collector knows up to {known}")]
    Schema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("invalid database URL {0:?}: use sqlite:PATH or postgres://USER@HOST/DB")]
    Url(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        // The database's own message is the useful part ("relation ... does not exist").
        match e.as_db_error() {
            Some(db) => StoreError::Postgres(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Postgres(e.to_string()),
        }
    }
}

/// One connection to the store. Every method is one transaction.
pub trait Store: Send {
    /// "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    // --- ingest -------------------------------------------------------------------------

    fn host(&mut self, host_id: &str) -> Result<Option<HostState>, StoreError>;
    /// Pins a new host's key at first contact; returns the stored state (another collector
    /// may have pinned it first: then its state is returned).
    fn pin_host(&mut self, host_id: &str, public_key: &[u8]) -> Result<HostState, StoreError>;
    /// Notes a connection (agent version, time).
    fn seen(&mut self, host_id: &str, agent_version: &str) -> Result<(), StoreError>;
    /// Verifies `batch` against the stored head (locked for the transaction) and stores the
    /// valid prefix, its checkpoints, session aggregates and any alert, durably.
    fn append(&mut self, host_id: &str, batch: Batch) -> Result<Appended, StoreError> {
        self.append_prepared(host_id, crate::verify::prepare(batch))
    }
    /// [`Store::append`] of a batch already decoded and hashed ([`crate::verify::prepare`]):
    /// only the check against the head and the writes happen under the lock.
    fn append_prepared(&mut self, host_id: &str, batch: Prepared) -> Result<Appended, StoreError>;
    /// Appends several batches (of one or several hosts, in this order), each as
    /// [`Store::append_prepared`] would. When this returns Ok, all of them are durable; a
    /// backend may commit them in one transaction (SQLite: one sync of the WAL for all).
    fn append_group(
        &mut self,
        batches: Vec<(String, Prepared)>,
    ) -> Result<Vec<Appended>, StoreError> {
        batches
            .into_iter()
            .map(|(host_id, batch)| self.append_prepared(&host_id, batch))
            .collect()
    }
    fn alert(&mut self, alert: &Alert) -> Result<(), StoreError>;

    // --- reading ------------------------------------------------------------------------

    fn hosts(&mut self) -> Result<Vec<HostInfo>, StoreError>;
    fn host_info(&mut self, host_id: &str) -> Result<Option<HostInfo>, StoreError>;
    /// Records of one host in seq order, after `after_seq`.
    fn chain(
        &mut self,
        host_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError>;
    /// Checkpoints of one host with seq in `from..=to`, in seq order (raw bodies).
    fn checkpoints(
        &mut self,
        host_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The lowest and highest seq of `host_id`'s records with time in `since..until`.
    fn seq_range(
        &mut self,
        host_id: &str,
        since_ns: i64,
        until_ns: i64,
    ) -> Result<Option<(u64, u64)>, StoreError>;
    /// The nearest checkpoint seq below `seq` (`above = false`) or at or above it.
    fn checkpoint_near(
        &mut self,
        host_id: &str,
        seq: u64,
        above: bool,
    ) -> Result<Option<u64>, StoreError>;
    /// A page of a timeline, ordered by (time, host, seq).
    fn timeline(
        &mut self,
        filter: &Filter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError>;
    fn sessions(&mut self, filter: &SessionFilter) -> Result<Vec<Session>, StoreError>;
    fn session(&mut self, session: &str) -> Result<Option<Session>, StoreError>;
    fn alerts(&mut self, host_id: Option<&str>) -> Result<Vec<StoredAlert>, StoreError>;

    // --- consumers of the stored data (SIEM sinks, alert rules) -------------------------

    /// Every host's head, by host id.
    fn heads(&mut self) -> Result<Vec<HostHead>, StoreError>;
    /// Alerts with an id above `after_id`, in id order. Ids grow in commit order (PostgreSQL
    /// serializes alert inserts), so a consumer that remembers the last id it handled misses
    /// none.
    fn alerts_after(&mut self, after_id: u64, limit: usize)
    -> Result<Vec<StoredAlert>, StoreError>;
    /// The durable positions of one consumer: (stream, position). A stream is `host:<id>`
    /// (position: the last seq handled) or `alerts` (the last alert id handled).
    fn cursors(&mut self, consumer: &str) -> Result<Vec<(String, u64)>, StoreError>;
    /// Stores one position of a consumer (it only moves forward).
    fn set_cursor(&mut self, consumer: &str, stream: &str, position: u64)
    -> Result<(), StoreError>;

    // --- the access log -----------------------------------------------------------------

    /// Appends an entry to the access log's hash chain (its seq, prev_hash and hash are
    /// assigned here, under a lock on the log's head). Returns the sealed entry.
    fn log_access(&mut self, entry: AccessEntry) -> Result<AccessEntry, StoreError>;
    /// Entries after `after`, in order, with their stored bytes.
    fn access_log(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(AccessEntry, Vec<u8>)>, StoreError>;

    // --- principals ---------------------------------------------------------------------

    fn add_principal(
        &mut self,
        name: &str,
        role: Role,
        cert_name: Option<&str>,
        token_hash: Option<&[u8]>,
    ) -> Result<Principal, StoreError>;
    fn principals(&mut self) -> Result<Vec<Principal>, StoreError>;
    fn principal_by_token(&mut self, token_hash: &[u8]) -> Result<Option<Principal>, StoreError>;
    fn principal_by_cert(&mut self, names: &[String]) -> Result<Option<Principal>, StoreError>;
    fn disable_principal(&mut self, name: &str) -> Result<Option<Principal>, StoreError>;

    // --- retention ----------------------------------------------------------------------

    fn set_hold(&mut self, host_id: &str, hold: Option<&Hold>) -> Result<bool, StoreError>;
    /// Removes the records of `host_id` through the checkpoint at `anchor_seq`, which stays
    /// as the anchor of what remains; older checkpoints go with the records. Refused under a
    /// legal hold.
    fn prune(
        &mut self,
        host_id: &str,
        anchor_seq: u64,
        by: &str,
    ) -> Result<PruneOutcome, StoreError>;
    /// The newest checkpoint of `host_id` made before `cutoff_ns`: (seq, time).
    fn checkpoint_before(
        &mut self,
        host_id: &str,
        cutoff_ns: i64,
    ) -> Result<Option<(u64, i64)>, StoreError>;
    fn setting(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
}

/// Opens a store from its URL: `sqlite:PATH` (or a bare path) or `postgres://…`.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(postgres::PgStore::connect(url)?))
    } else {
        Ok(Box::new(sqlite::SqliteStore::open_url(url)?))
    }
}

/// Where a store lives, shown without credentials.
pub fn display_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(crate) fn head_from(seq: i64, hash: &[u8]) -> Head {
    let mut h = [0u8; 32];
    if hash.len() == 32 {
        h.copy_from_slice(hash);
    }
    Head {
        seq: seq as u64,
        hash: h,
    }
}

/// The decoded checkpoint's time in ns.
pub(crate) fn checkpoint_time_ns(cp: &Checkpoint) -> i64 {
    cp.time.as_ref().map_or(0, |t| {
        t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
    })
}

/// Seals an access-log entry after `prev` (seq, hash): returns the entry with seq, prev_hash
/// and hash set, and the canonical bytes that were hashed.
pub(crate) fn seal_access(
    mut entry: AccessEntry,
    prev_seq: u64,
    prev_hash: &[u8],
) -> (AccessEntry, Vec<u8>) {
    use prost::Message as _;
    entry.seq = prev_seq + 1;
    entry.prev_hash = if prev_hash.len() == 32 {
        prev_hash.to_vec()
    } else {
        phi_chain::seal::GENESIS.to_vec()
    };
    entry.hash.clear();
    let body = entry.encode_to_vec();
    entry.hash = phi_chain::seal::link_hash(&entry.prev_hash, &body).to_vec();
    (entry, body)
}

/// Upper bound for a prefix range scan: every string starting with `prefix` sorts below it.
pub(crate) fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

/// A small pool of store connections for async code: each operation runs on the blocking
/// thread pool with a connection of its own (SQLite in WAL mode and PostgreSQL both allow
/// readers alongside the writer).
pub struct Pool {
    url: String,
    idle: std::sync::Mutex<Vec<Box<dyn Store>>>,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    backend: &'static str,
}

impl Pool {
    /// Opens the first connection now (creating or migrating the schema, and failing early
    /// with a clear error) and up to `size` on demand.
    pub fn open(url: &str, size: usize) -> Result<std::sync::Arc<Pool>, StoreError> {
        let first = open(url)?;
        Ok(std::sync::Arc::new(Pool {
            url: url.to_owned(),
            backend: first.backend(),
            idle: std::sync::Mutex::new(vec![first]),
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(size.max(1))),
        }))
    }

    /// [`Pool::open`] from async code (the PostgreSQL client blocks while connecting).
    pub async fn open_async(url: &str, size: usize) -> Result<std::sync::Arc<Pool>, StoreError> {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || Pool::open(&url, size))
            .await
            .map_err(|e| StoreError::Invalid(format!("opening the store failed: {e}")))?
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Runs `f` with a connection on the blocking thread pool.
    pub async fn run<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = std::sync::Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Invalid("the store is closed".into()))?;
        let pool = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.run_blocking(f)
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("storage task failed: {e}")))?
    }

    /// Runs `f` with a connection on this thread.
    pub fn run_blocking<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut conn = match conn {
            Some(c) => c,
            None => open(&self.url)?,
        };
        let result = f(conn.as_mut());
        // A connection that failed at the database level is dropped; a new one replaces it
        // on demand (PostgreSQL restarts, network trouble).
        let broken = matches!(result, Err(StoreError::Postgres(_)));
        if !broken && let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        result
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The PostgreSQL client blocks while closing, which must not happen on an async
        // worker thread: close the connections on a thread of their own.
        let idle = self
            .idle
            .lock()
            .map(|mut i| std::mem::take(&mut *i))
            .unwrap_or_default();
        if idle.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        } else {
            drop(idle);
        }
    }
}
