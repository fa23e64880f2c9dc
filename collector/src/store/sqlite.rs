//! The SQLite store: WAL, `synchronous=FULL` (an acknowledged batch survives power loss),
//! versioned migrations, one transaction per batch.

use std::path::Path;

use phi_chain::seal::Head;
use phi_proto::v1::{Checkpoint, Record, SealedRecord};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::{Alert, HostState, StoreError};

/// Schema migrations, in order; the index + 1 is the version.
const MIGRATIONS: &[&str] = &[
    // 1: chains, checkpoints, alerts.
    "CREATE TABLE hosts (
        host_id        TEXT PRIMARY KEY,
        public_key     BLOB NOT NULL,
        first_seen_ns  INTEGER NOT NULL,
        head_seq       INTEGER NOT NULL DEFAULT 0,
        head_hash      BLOB NOT NULL,
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        checkpoint_sig BLOB NOT NULL DEFAULT x''
    );
    CREATE TABLE records (
        host_id   TEXT NOT NULL,
        seq       INTEGER NOT NULL,
        hash      BLOB NOT NULL,
        prev_hash BLOB NOT NULL,
        body      BLOB NOT NULL,
        time_ns   INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        PRIMARY KEY (host_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE checkpoints (
        host_id TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        body    BLOB NOT NULL,
        PRIMARY KEY (host_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE alerts (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ns  INTEGER NOT NULL,
        host_id  TEXT NOT NULL,
        kind     TEXT NOT NULL,
        seq      INTEGER,
        detail   TEXT NOT NULL,
        evidence BLOB NOT NULL,
        UNIQUE (host_id, kind, seq, detail)
    );",
];

pub struct SqliteStore {
    conn: Connection,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn time_ns(r: &Record) -> i64 {
    r.time.as_ref().map_or(0, |t| {
        t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
    })
}

fn head_from(seq: i64, hash: Vec<u8>) -> Head {
    let mut h = [0u8; 32];
    if hash.len() == 32 {
        h.copy_from_slice(&hash);
    }
    Head {
        seq: seq as u64,
        hash: h,
    }
}

impl SqliteStore {
    /// Opens `sqlite:PATH` (or a bare path), creating and migrating the schema.
    pub fn open_url(url: &str) -> Result<Self, StoreError> {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        if path.is_empty() || url.contains("://") {
            return Err(StoreError::Url(url.to_owned()));
        }
        Self::open(Path::new(path))
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let version: i64 = conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Schema {
                path: shown,
                found: version,
                known,
            });
        }
        let mut store = SqliteStore { conn };
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = store.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [i as i64 + 1],
            )?;
            tx.commit()?;
        }
        Ok(store)
    }

    pub fn host(&self, host_id: &str) -> Result<Option<HostState>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT public_key, head_seq, head_hash, checkpoint_seq, checkpoint_sig
                 FROM hosts WHERE host_id = ?1",
                [host_id],
                |r| {
                    Ok(HostState {
                        public_key: r.get(0)?,
                        head: head_from(r.get(1)?, r.get(2)?),
                        checkpoint_seq: r.get::<_, i64>(3)? as u64,
                        checkpoint_sig: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Pins a new host's key (first contact).
    pub fn pin_host(&self, host_id: &str, public_key: &[u8]) -> Result<HostState, StoreError> {
        self.conn.execute(
            "INSERT INTO hosts (host_id, public_key, first_seen_ns, head_hash)
             VALUES (?1, ?2, ?3, ?4)",
            params![host_id, public_key, now_ns(), Head::EMPTY.hash.to_vec()],
        )?;
        Ok(HostState {
            public_key: public_key.to_vec(),
            head: Head::EMPTY,
            checkpoint_seq: 0,
            checkpoint_sig: Vec::new(),
        })
    }

    /// The stored hash of record `seq`.
    pub fn record_hash(&self, host_id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT hash FROM records WHERE host_id = ?1 AND seq = ?2",
                params![host_id, seq as i64],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Stores verified records and checkpoints and the new head in one durable transaction.
    pub fn commit(
        &mut self,
        host_id: &str,
        records: &[(SealedRecord, Record)],
        checkpoints: &[Checkpoint],
        head: Head,
        alerts: &[Alert],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO records (host_id, seq, hash, prev_hash, body, time_ns, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (sealed, record) in records {
                insert.execute(params![
                    host_id,
                    sealed.seq as i64,
                    sealed.hash,
                    record.prev_hash,
                    sealed.body,
                    time_ns(record),
                    record.kind(),
                ])?;
            }
            let mut cp = tx.prepare_cached(
                "INSERT OR IGNORE INTO checkpoints (host_id, seq, body) VALUES (?1, ?2, ?3)",
            )?;
            for c in checkpoints {
                cp.execute(params![host_id, c.seq as i64, c.encode_to_vec()])?;
            }
            if let Some(last) = checkpoints.last() {
                tx.execute(
                    "UPDATE hosts SET checkpoint_seq = ?2, checkpoint_sig = ?3 WHERE host_id = ?1",
                    params![host_id, last.seq as i64, last.signature],
                )?;
            }
            tx.execute(
                "UPDATE hosts SET head_seq = ?2, head_hash = ?3 WHERE host_id = ?1",
                params![host_id, head.seq as i64, head.hash.to_vec()],
            )?;
            let mut alert = tx.prepare_cached(
                "INSERT OR IGNORE INTO alerts (time_ns, host_id, kind, seq, detail, evidence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for a in alerts {
                alert.execute(params![
                    now_ns(),
                    a.host_id,
                    a.kind,
                    a.seq.map(|s| s as i64),
                    a.detail,
                    a.evidence,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores an alert on its own.
    pub fn alert(&mut self, alert: &Alert) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO alerts (time_ns, host_id, kind, seq, detail, evidence)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                now_ns(),
                alert.host_id,
                alert.kind,
                alert.seq.map(|s| s as i64),
                alert.detail,
                alert.evidence,
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use phi_chain::seal::Sealer;
    use phi_proto::v1::{Heartbeat, record::Event};

    use super::*;

    #[test]
    fn migrates_pins_and_commits_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("c.db").display());
        let mut s = SqliteStore::open_url(&url).expect("open");
        assert!(s.host("h").expect("query").is_none());
        s.pin_host("h", &[1; 32]).expect("pin");
        let mut sealer = Sealer::new(Head::EMPTY);
        let mut r = Record {
            host_id: "h".into(),
            event: Some(Event::Heartbeat(Heartbeat::default())),
            ..Default::default()
        };
        let sealed = sealer.seal(&mut r);
        r.hash.clear();
        s.commit("h", &[(sealed.clone(), r)], &[], sealer.head(), &[])
            .expect("commit");
        drop(s);
        let s = SqliteStore::open_url(&url).expect("reopen");
        let host = s.host("h").expect("query").expect("host");
        assert_eq!(host.head, sealer.head());
        assert_eq!(
            s.record_hash("h", 1).expect("hash"),
            Some(sealed.hash.clone())
        );
        assert!(SqliteStore::open_url("postgres://x").is_err());
    }
}
