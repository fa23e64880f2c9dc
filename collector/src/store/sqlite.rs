//! The SQLite store: WAL, `synchronous=FULL` (an acknowledged batch survives power loss),
//! versioned migrations, one immediate transaction per batch or group of batches.

use std::path::Path;

use phi_chain::seal::Head;
use phi_proto::v1::{AccessEntry, Checkpoint};
use prost::Message as _;
use rusqlite::{
    Connection, OptionalExtension as _, Row as SqlRow, Transaction, TransactionBehavior, params,
    params_from_iter, types::Value,
};

use super::{
    Alert, Appended, Cursor, Filter, Hold, HostHead, HostInfo, HostState, Principal, PruneOutcome,
    Role, Row, Session, SessionFilter, Spent, Store, StoreError, StoredAlert,
    block::{self, Cutter, StoredRecord},
    checkpoint_time_ns, head_from,
    index::{self, SessionDeltas},
    now_ns,
    query::{self, Param},
    seal_access,
};
use crate::verify::{Prepared, verify_prepared};

/// A data migration, run in the same transaction as its schema step.
type DataMigration = fn(&Transaction<'_>) -> Result<(), StoreError>;

/// One schema step: SQL, then an optional data migration.
struct Migration {
    sql: &'static str,
    data: Option<DataMigration>,
}

/// Schema migrations, in order; the index + 1 is the version.
const MIGRATIONS: &[Migration] = &[
    // 1: chains, checkpoints, alerts.
    Migration {
        sql: "CREATE TABLE hosts (
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
        data: None,
    },
    // 2: query columns and indexes, login sessions, the access log, principals, retention.
    Migration {
        sql: "ALTER TABLE records ADD COLUMN uid INTEGER;
        ALTER TABLE records ADD COLUMN user_name TEXT;
        ALTER TABLE records ADD COLUMN login_user TEXT;
        ALTER TABLE records ADD COLUMN session TEXT;
        ALTER TABLE records ADD COLUMN path TEXT;
        ALTER TABLE hosts ADD COLUMN last_seen_ns INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE hosts ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
        ALTER TABLE hosts ADD COLUMN anchor_seq INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE hosts ADD COLUMN checkpoint_time_ns INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE hosts ADD COLUMN last_record_ns INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE checkpoints ADD COLUMN time_ns INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE sessions (
            session        TEXT PRIMARY KEY,
            host_id        TEXT NOT NULL,
            boot_id        TEXT NOT NULL,
            audit_session  INTEGER NOT NULL,
            kind           TEXT NOT NULL DEFAULT '',
            user_name      TEXT NOT NULL DEFAULT '',
            source_address TEXT NOT NULL DEFAULT '',
            source_port    INTEGER NOT NULL DEFAULT 0,
            tty            TEXT NOT NULL DEFAULT '',
            login_ns       INTEGER NOT NULL DEFAULT 0,
            first_ns       INTEGER NOT NULL,
            last_ns        INTEGER NOT NULL,
            first_seq      INTEGER NOT NULL,
            last_seq       INTEGER NOT NULL,
            records        INTEGER NOT NULL DEFAULT 0,
            phi_accesses   INTEGER NOT NULL DEFAULT 0,
            denied         INTEGER NOT NULL DEFAULT 0,
            execs          INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX sessions_host ON sessions (host_id, first_ns);
        CREATE TABLE access_log (
            seq       INTEGER PRIMARY KEY,
            time_ns   INTEGER NOT NULL,
            principal TEXT NOT NULL,
            action    TEXT NOT NULL,
            outcome   TEXT NOT NULL,
            body      BLOB NOT NULL,
            hash      BLOB NOT NULL
        );
        CREATE TABLE principals (
            name       TEXT PRIMARY KEY,
            role       TEXT NOT NULL,
            cert_name  TEXT UNIQUE,
            token_hash BLOB UNIQUE,
            disabled   INTEGER NOT NULL DEFAULT 0,
            created_ns INTEGER NOT NULL
        );
        CREATE TABLE holds (
            host_id  TEXT PRIMARY KEY,
            reason   TEXT NOT NULL,
            set_by   TEXT NOT NULL,
            since_ns INTEGER NOT NULL
        );
        CREATE TABLE prunes (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            host_id     TEXT NOT NULL,
            time_ns     INTEGER NOT NULL,
            through_seq INTEGER NOT NULL,
            records     INTEGER NOT NULL,
            pruned_by   TEXT NOT NULL
        );
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );",
        data: Some(backfill_v2),
    },
    // 3: indexes, after the backfill so that it does not maintain them row by row.
    Migration {
        sql: "CREATE INDEX records_time ON records (host_id, time_ns);
        CREATE INDEX records_all_time ON records (time_ns);
        CREATE INDEX records_session ON records (session, time_ns) WHERE session IS NOT NULL;
        CREATE INDEX records_path ON records (path, time_ns) WHERE path IS NOT NULL;
        CREATE INDEX records_login_user ON records (login_user, time_ns)
            WHERE login_user IS NOT NULL;",
        data: None,
    },
    // 4: positions of the consumers of the store (SIEM sinks, alert rules).
    Migration {
        sql: "CREATE TABLE consumer_cursors (
            consumer   TEXT NOT NULL,
            stream     TEXT NOT NULL,
            position   INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            PRIMARY KEY (consumer, stream)
        ) WITHOUT ROWID;",
        data: None,
    },
    // 5: the path index is cut into runs of consecutive arrivals ([`RUN_RECORDS`] records
    // each). Paths arrive in random order: one (path, time) B-tree takes every new record on
    // a different leaf, so a batch of 512 dirtied about 512 index pages, each written to the
    // WAL at commit and again at the checkpoint, more as the store grows. A run's part of the
    // index stays small, so a batch lands on a few hundred leaves at most, whatever the size
    // of the store. A path query seeks once per run whose time range meets its window
    // (`index_runs`). The records stored before this version form run 0.
    Migration {
        sql: "ALTER TABLE records ADD COLUMN run INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE index_runs (
            run     INTEGER PRIMARY KEY,
            records INTEGER NOT NULL,
            min_ns  INTEGER NOT NULL,
            max_ns  INTEGER NOT NULL
        );
        INSERT INTO index_runs (run, records, min_ns, max_ns)
            SELECT 0, COUNT(*), MIN(time_ns), MAX(time_ns) FROM records HAVING COUNT(*) > 0;
        DROP INDEX records_path;
        CREATE INDEX records_path ON records (run, path, time_ns) WHERE path IS NOT NULL;",
        data: None,
    },
    // 6: records are kept in blocks, one per accepted batch or part of one (see `block`): a row per record
    // and five secondary indexes made every record cost the single writer six B-tree inserts
    // and its bytes twice on disk. The records stored before this version are grouped into
    // blocks of up to `block::BLOCK_RECORDS` consecutive records of a host (`blocks_v6`), and the
    // row-per-record table and its path index runs go.
    Migration {
        sql: "CREATE TABLE blocks (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            host_id   TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq  INTEGER NOT NULL,
            min_ns    INTEGER NOT NULL,
            max_ns    INTEGER NOT NULL,
            records   INTEGER NOT NULL,
            data      BLOB NOT NULL
        );
        CREATE UNIQUE INDEX blocks_seq ON blocks (host_id, last_seq);
        CREATE INDEX blocks_time ON blocks (host_id, min_ns);
        CREATE INDEX blocks_all_time ON blocks (min_ns);
        CREATE TABLE block_keys (
            key   TEXT NOT NULL,
            block INTEGER NOT NULL,
            PRIMARY KEY (key, block)
        ) WITHOUT ROWID;
        CREATE INDEX block_keys_block ON block_keys (block);
        CREATE TABLE block_paths (
            block INTEGER PRIMARY KEY,
            bloom BLOB NOT NULL
        );
        CREATE TABLE block_span (max_span_ns INTEGER NOT NULL);
        INSERT INTO block_span (max_span_ns) VALUES (0);",
        data: Some(blocks_v6),
    },
];

/// The page size of a new store (bytes).
pub const PAGE_SIZE: i64 = 8192;

/// Version 6 moves the stored records into blocks and drops the row-per-record table.
fn blocks_v6(tx: &Transaction<'_>) -> Result<(), StoreError> {
    {
        let mut stmt = tx.prepare(
            "SELECT host_id, seq, hash, prev_hash, body, time_ns, kind, uid, user_name,
                login_user, session, path FROM records ORDER BY host_id, seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut host = String::new();
        let mut cut = Cutter::default();
        while let Some(r) = rows.next()? {
            let h: String = r.get(0)?;
            if h != host {
                if let Some(records) = cut.finish() {
                    insert_block(tx, &host, records)?;
                }
                host = h;
            }
            let full = cut.push(StoredRecord {
                seq: r.get::<_, i64>(1)? as u64,
                hash: r.get(2)?,
                prev_hash: r.get(3)?,
                body: r.get(4)?,
                time_ns: r.get(5)?,
                kind: r.get(6)?,
                uid: r.get(7)?,
                user: r.get(8)?,
                login_user: r.get(9)?,
                session: r.get(10)?,
                path: r.get(11)?,
            });
            if let Some(records) = full {
                insert_block(tx, &host, records)?;
            }
        }
        if let Some(records) = cut.finish() {
            insert_block(tx, &host, records)?;
        }
    }
    tx.execute_batch("DROP TABLE records; DROP TABLE index_runs;")?;
    Ok(())
}

/// Writes one block of `host_id`'s records (non-empty, consecutive) with its lookup entries.
fn insert_block(
    tx: &Transaction<'_>,
    host_id: &str,
    records: Vec<StoredRecord>,
) -> Result<(), StoreError> {
    let s = block::summarize(&records);
    block::encode_with(records, |data| {
        tx.prepare_cached(
            "INSERT INTO blocks (host_id, first_seq, last_seq, min_ns, max_ns, records, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            host_id,
            s.first_seq as i64,
            s.last_seq as i64,
            s.min_ns,
            s.max_ns,
            s.records as i64,
            data
        ])?;
        Ok(())
    })?;
    let id = tx.last_insert_rowid();
    let mut key = tx.prepare_cached("INSERT INTO block_keys (key, block) VALUES (?1, ?2)")?;
    for k in &s.keys {
        key.execute(params![k, id])?;
    }
    if let Some(bloom) = &s.paths {
        tx.prepare_cached("INSERT INTO block_paths (block, bloom) VALUES (?1, ?2)")?
            .execute(params![id, bloom])?;
    }
    tx.prepare_cached("UPDATE block_span SET max_span_ns = ?1 WHERE max_span_ns < ?1")?
        .execute([s.max_ns.saturating_sub(s.min_ns)])?;
    Ok(())
}

/// Deletes block `id` and its lookup entries.
fn delete_block(tx: &Transaction<'_>, id: i64) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM block_keys WHERE block = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM block_paths WHERE block = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM blocks WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Reads and decodes block `id`.
fn read_block(conn: &Connection, id: i64) -> Result<Vec<StoredRecord>, StoreError> {
    let data: Vec<u8> = conn
        .prepare_cached("SELECT data FROM blocks WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?;
    block::decode(id, &data)
}

/// Hashes of `host_id`'s stored records, for the check of a resent batch: its records lie
/// in the same few blocks, so each block is read and decoded once, not once per record.
struct StoredHashes<'a> {
    conn: &'a Connection,
    host_id: &'a str,
    /// The block read last (consecutive records).
    block: Vec<StoredRecord>,
}

impl StoredHashes<'_> {
    fn get(&mut self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let held = |b: &[StoredRecord]| {
            b.first().is_some_and(|f| f.seq <= seq) && b.last().is_some_and(|l| l.seq >= seq)
        };
        if !held(&self.block) {
            let id: Option<i64> = self
                .conn
                .prepare_cached(
                    "SELECT id FROM blocks WHERE host_id = ?1 AND last_seq >= ?2
                     AND first_seq <= ?2 ORDER BY last_seq LIMIT 1",
                )?
                .query_row(params![self.host_id, seq as i64], |r| r.get(0))
                .optional()?;
            self.block = match id {
                Some(id) => read_block(self.conn, id)?,
                None => Vec::new(),
            };
        }
        Ok(self
            .block
            .iter()
            .find(|r| r.seq == seq)
            .map(|r| r.hash.clone()))
    }
}

/// The widest time range of any block: a block that meets a window starting at `t` starts
/// at `t` minus this or later, which bounds the search of the time indexes.
fn max_span(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT max_span_ns FROM block_span")?
        .query_row([], |r| r.get(0))?)
}

/// Adds to `w` the conditions of the blocks (`b`) that may hold records of `[since, until)`.
fn blocks_in(
    conn: &Connection,
    w: &mut query::Where,
    since: Option<i64>,
    until: Option<i64>,
) -> Result<(), StoreError> {
    if let Some(s) = since {
        w.push(
            "b.min_ns >= ? AND b.max_ns >= ?",
            [Param::Int(s.saturating_sub(max_span(conn)?)), Param::Int(s)],
        );
    }
    if let Some(u) = until {
        w.push("b.min_ns < ?", [Param::Int(u)]);
    }
    Ok(())
}

/// Orders rows as timelines do: by (time, host, seq).
fn timeline_order(a: &Row, b: &Row) -> std::cmp::Ordering {
    (a.time_ns, &a.host_id, a.seq).cmp(&(b.time_ns, &b.host_id, b.seq))
}

/// One page of a timeline: the blocks that can hold its records, in the order of their
/// earliest record, are decoded one by one until no further block can hold a record that
/// sorts before the last of the page.
fn timeline_page(
    conn: &Connection,
    filter: &Filter,
    after: Option<&Cursor>,
    limit: usize,
) -> Result<Vec<Row>, StoreError> {
    let limit = limit.max(1);
    let since = query::page_since(filter, after);
    let mut w = query::Where::default();
    if let Some(h) = &filter.host {
        w.push("b.host_id = ?", [Param::Text(h.clone())]);
    }
    blocks_in(conn, &mut w, since, filter.until_ns)?;
    if let Some(u) = &filter.user {
        let mut keys = vec![
            block::key(block::KeyKind::LoginUser, u),
            block::key(block::KeyKind::User, u),
        ];
        if let Ok(uid) = u.parse::<i64>() {
            keys.push(block::key(block::KeyKind::Uid, &uid.to_string()));
        }
        let marks = vec!["?"; keys.len()].join(", ");
        w.push(
            &format!("b.id IN (SELECT block FROM block_keys WHERE key IN ({marks}))"),
            keys.into_iter().map(Param::Text),
        );
    }
    if let Some(s) = &filter.session {
        w.push(
            "b.id IN (SELECT block FROM block_keys WHERE key = ?)",
            [Param::Text(block::key(block::KeyKind::Session, s))],
        );
    }
    let paths = filter.path_prefix.is_some();
    let sql = format!(
        "SELECT b.id, b.host_id, b.min_ns{} FROM blocks b{} {} ORDER BY b.min_ns, b.id",
        if paths { ", p.bloom" } else { "" },
        if paths {
            " JOIN block_paths p ON p.block = b.id"
        } else {
            ""
        },
        w.sql()
    );
    let item = filter.path_prefix.as_deref().and_then(block::prefix_item);
    let mut candidates: Vec<(i64, String, i64)> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(values(w.params)))?;
        while let Some(r) = rows.next()? {
            if let Some(item) = item {
                let bloom: Vec<u8> = r.get(3)?;
                if !block::Bloom::may_hold(&bloom, item) {
                    continue;
                }
            }
            candidates.push((r.get(0)?, r.get(1)?, r.get(2)?));
        }
    }
    let mut page: Vec<Row> = Vec::new();
    for (id, host_id, min_ns) in candidates {
        if page.len() >= limit {
            page.select_nth_unstable_by(limit - 1, timeline_order);
            page.truncate(limit);
            let last = page.iter().map(|r| r.time_ns).max().unwrap_or(i64::MAX);
            if min_ns > last {
                break;
            }
        }
        for r in read_block(conn, id)? {
            if !block::matches(&r, filter, since) {
                continue;
            }
            if let Some(a) = after
                && (r.time_ns, host_id.as_str(), r.seq) <= (a.time_ns, a.host_id.as_str(), a.seq)
            {
                continue;
            }
            page.push(r.row(&host_id));
        }
    }
    page.sort_unstable_by(timeline_order);
    page.truncate(limit);
    Ok(page)
}

/// Version 2 derives the query columns and sessions of records stored by version 1.
fn backfill_v2(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut deltas = SessionDeltas::default();
    let rows: Vec<(String, i64, Vec<u8>)> = tx
        .prepare("SELECT host_id, seq, body FROM records")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = tx.prepare(
        "UPDATE records SET uid = ?3, user_name = ?4, login_user = ?5, session = ?6, path = ?7
         WHERE host_id = ?1 AND seq = ?2",
    )?;
    for (host, seq, body) in rows {
        let Ok(record) = phi_proto::v1::Record::decode(body.as_slice()) else {
            continue;
        };
        let c = index::columns(&record);
        update.execute(params![
            host,
            seq,
            c.uid,
            c.user,
            c.login_user,
            c.session,
            c.path
        ])?;
        deltas.add(seq as u64, &record, &c);
    }
    upsert_sessions(tx, &deltas)?;
    let cps: Vec<(String, i64, Vec<u8>)> = tx
        .prepare("SELECT host_id, seq, body FROM checkpoints")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (host, seq, body) in cps {
        if let Ok(cp) = Checkpoint::decode(body.as_slice()) {
            tx.execute(
                "UPDATE checkpoints SET time_ns = ?3 WHERE host_id = ?1 AND seq = ?2",
                params![host, seq, checkpoint_time_ns(&cp)],
            )?;
        }
    }
    Ok(())
}

pub struct SqliteStore {
    conn: Connection,
    path: String,
}

fn host_state(r: &SqlRow<'_>) -> rusqlite::Result<HostState> {
    Ok(HostState {
        public_key: r.get(0)?,
        head: head_from(r.get(1)?, &r.get::<_, Vec<u8>>(2)?),
        checkpoint_seq: r.get::<_, i64>(3)? as u64,
        checkpoint_sig: r.get(4)?,
    })
}

const HOST_STATE: &str = "SELECT public_key, head_seq, head_hash, checkpoint_seq, checkpoint_sig
    FROM hosts WHERE host_id = ?1";

const HOST_INFO: &str = "SELECT h.host_id, h.public_key, h.first_seen_ns, h.last_seen_ns,
    h.agent_version, h.head_seq, h.head_hash, h.checkpoint_seq, h.checkpoint_time_ns,
    h.anchor_seq, (SELECT COUNT(*) FROM alerts a WHERE a.host_id = h.host_id),
    d.reason, d.set_by, d.since_ns, h.last_record_ns
    FROM hosts h LEFT JOIN holds d ON d.host_id = h.host_id";

fn host_info(r: &SqlRow<'_>) -> rusqlite::Result<HostInfo> {
    let reason: Option<String> = r.get(11)?;
    Ok(HostInfo {
        host_id: r.get(0)?,
        public_key: r.get(1)?,
        first_seen_ns: r.get(2)?,
        last_seen_ns: r.get(3)?,
        agent_version: r.get(4)?,
        head_seq: r.get::<_, i64>(5)? as u64,
        head_hash: r.get(6)?,
        checkpoint_seq: r.get::<_, i64>(7)? as u64,
        checkpoint_time_ns: r.get(8)?,
        anchor_seq: r.get::<_, i64>(9)? as u64,
        alerts: r.get::<_, i64>(10)? as u64,
        hold: match reason {
            Some(reason) => Some(Hold {
                reason,
                set_by: r.get(12)?,
                since_ns: r.get(13)?,
            }),
            None => None,
        },
        last_record_ns: r.get(14)?,
    })
}

fn session(r: &SqlRow<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        session: r.get(0)?,
        host_id: r.get(1)?,
        boot_id: r.get(2)?,
        audit_session: r.get::<_, i64>(3)? as u32,
        kind: r.get(4)?,
        user: r.get(5)?,
        source_address: r.get(6)?,
        source_port: r.get::<_, i64>(7)? as u32,
        tty: r.get(8)?,
        login_ns: r.get(9)?,
        first_ns: r.get(10)?,
        last_ns: r.get(11)?,
        first_seq: r.get::<_, i64>(12)? as u64,
        last_seq: r.get::<_, i64>(13)? as u64,
        records: r.get::<_, i64>(14)? as u64,
        phi_accesses: r.get::<_, i64>(15)? as u64,
        denied: r.get::<_, i64>(16)? as u64,
        execs: r.get::<_, i64>(17)? as u64,
    })
}

fn principal(r: &SqlRow<'_>) -> rusqlite::Result<Principal> {
    let role: String = r.get(1)?;
    Ok(Principal {
        name: r.get(0)?,
        role: Role::parse(&role).unwrap_or(Role::Auditor),
        cert_name: r.get(2)?,
        has_token: r.get::<_, Option<Vec<u8>>>(3)?.is_some(),
        disabled: r.get::<_, i64>(4)? != 0,
        created_ns: r.get(5)?,
    })
}

const PRINCIPAL: &str =
    "SELECT name, role, cert_name, token_hash, disabled, created_ns FROM principals";

fn values(params: Vec<Param>) -> Vec<Value> {
    params
        .into_iter()
        .map(|p| match p {
            Param::Int(i) => Value::Integer(i),
            Param::Text(t) => Value::Text(t),
        })
        .collect()
}

fn upsert_sessions(tx: &Transaction<'_>, deltas: &SessionDeltas) -> Result<(), StoreError> {
    let mut up = tx.prepare_cached(
        "INSERT INTO sessions (session, host_id, boot_id, audit_session, kind, user_name,
            source_address, source_port, tty, login_ns, first_ns, last_ns, first_seq, last_seq,
            records, phi_accesses, denied, execs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
         ON CONFLICT (session) DO UPDATE SET
            kind = CASE WHEN kind = '' THEN excluded.kind ELSE kind END,
            user_name = CASE WHEN user_name = '' THEN excluded.user_name ELSE user_name END,
            source_address = CASE WHEN source_address = '' THEN excluded.source_address
                             ELSE source_address END,
            source_port = CASE WHEN source_port = 0 THEN excluded.source_port
                          ELSE source_port END,
            tty = CASE WHEN tty = '' THEN excluded.tty ELSE tty END,
            login_ns = CASE WHEN login_ns = 0 THEN excluded.login_ns ELSE login_ns END,
            first_ns = MIN(first_ns, excluded.first_ns),
            last_ns = MAX(last_ns, excluded.last_ns),
            first_seq = MIN(first_seq, excluded.first_seq),
            last_seq = MAX(last_seq, excluded.last_seq),
            records = records + excluded.records,
            phi_accesses = phi_accesses + excluded.phi_accesses,
            denied = denied + excluded.denied,
            execs = execs + excluded.execs",
    )?;
    for s in deltas.sessions.values() {
        up.execute(params![
            s.session,
            s.host_id,
            s.boot_id,
            i64::from(s.audit_session),
            s.kind,
            s.user,
            s.source_address,
            i64::from(s.source_port),
            s.tty,
            s.login_ns,
            s.first_ns,
            s.last_ns,
            s.first_seq as i64,
            s.last_seq as i64,
            s.records as i64,
            s.phi_accesses as i64,
            s.denied as i64,
            s.execs as i64,
        ])?;
    }
    Ok(())
}

fn stored_alert(r: &SqlRow<'_>) -> rusqlite::Result<StoredAlert> {
    Ok(StoredAlert {
        id: r.get::<_, i64>(0)? as u64,
        time_ns: r.get(1)?,
        alert: Alert {
            host_id: r.get(2)?,
            kind: r.get(3)?,
            seq: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
            detail: r.get(5)?,
            evidence: r.get(6)?,
        },
    })
}

fn insert_alert(tx: &Connection, a: &Alert) -> Result<(), StoreError> {
    tx.execute(
        "INSERT OR IGNORE INTO alerts (time_ns, host_id, kind, seq, detail, evidence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            now_ns(),
            a.host_id,
            a.kind,
            a.seq.map(|s| s as i64),
            a.detail,
            a.evidence,
        ],
    )?;
    Ok(())
}

/// Verifies one prepared batch against `host_id`'s head and writes it, inside `tx`: its
/// accepted records as one block.
fn append_in(tx: &Transaction<'_>, host_id: &str, batch: Prepared) -> Result<Appended, StoreError> {
    let state = tx
        .query_row(HOST_STATE, [host_id], host_state)
        .optional()?
        .ok_or_else(|| StoreError::Invalid(format!("host {host_id:?} is not pinned")))?;
    let mut stored = StoredHashes {
        conn: tx,
        host_id,
        block: Vec::new(),
    };
    let mut verified =
        verify_prepared(host_id, &state, batch, |seq| stored.get(seq).ok().flatten());
    {
        let mut deltas = SessionDeltas::default();
        let mut last_ns = 0;
        let mut cut = Cutter::default();
        for a in &mut verified.records {
            deltas.add(a.sealed.seq, &a.record, &a.columns);
            last_ns = last_ns.max(a.columns.time_ns);
            // Moved, not copied: the rest of the decoded record is freed by the caller.
            let full = cut.push(StoredRecord::new(
                a.sealed.seq,
                std::mem::take(&mut a.sealed.hash),
                std::mem::take(&mut a.record.prev_hash),
                std::mem::take(&mut a.sealed.body),
                std::mem::take(&mut a.columns),
            ));
            if let Some(records) = full {
                insert_block(tx, host_id, records)?;
            }
        }
        if let Some(records) = cut.finish() {
            insert_block(tx, host_id, records)?;
        }
        upsert_sessions(tx, &deltas)?;
        let mut cp = tx.prepare_cached(
            "INSERT OR IGNORE INTO checkpoints (host_id, seq, body, time_ns)
                 VALUES (?1, ?2, ?3, ?4)",
        )?;
        for c in &verified.checkpoints {
            cp.execute(params![
                host_id,
                c.seq as i64,
                c.encode_to_vec(),
                checkpoint_time_ns(c)
            ])?;
        }
        if let Some(last) = verified.checkpoints.last() {
            tx.execute(
                "UPDATE hosts SET checkpoint_seq = ?2, checkpoint_sig = ?3,
                        checkpoint_time_ns = ?4 WHERE host_id = ?1",
                params![
                    host_id,
                    last.seq as i64,
                    last.signature,
                    checkpoint_time_ns(last)
                ],
            )?;
        }
        tx.execute(
            "UPDATE hosts SET head_seq = ?2, head_hash = ?3,
                    last_record_ns = MAX(last_record_ns, ?4) WHERE host_id = ?1",
            params![
                host_id,
                verified.head.seq as i64,
                verified.head.hash.to_vec(),
                last_ns
            ],
        )?;
        if let Some(a) = &verified.problem {
            insert_alert(tx, a)?;
        }
    }
    Ok(Appended {
        head: verified.head,
        records: verified.records.len(),
        checkpoints: verified.checkpoints.len(),
        problem: verified.problem,
        spent: Spent(verified.records),
    })
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
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // A new store gets 8 KiB pages: a record row (about 800 bytes with its body) fills a
        // 4 KiB page after four, so appends split pages twice as often; ingest measured about
        // 10% faster with 8 KiB. An existing store keeps the page size it was created with.
        conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Each batch dirties index pages across its run of the path index and across the
        // session and user indexes: a cache that holds them saves reading them back at every
        // batch (64 MiB, grown on demand).
        conn.pragma_update(None, "cache_size", -65_536)?;
        // Copying the WAL into the database less often (every 64 MiB instead of 1,000 pages)
        // writes a page rewritten by many batches once. Durability does not depend on it:
        // with synchronous=FULL every commit syncs the WAL before it returns.
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        conn.pragma_update(None, "wal_autocheckpoint", (64 << 20) / page_size.max(512))?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let mut store = SqliteStore { conn, path: shown };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i64;
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version: i64 = tx.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version",
                [],
                |r| r.get(0),
            )?;
            if version > known {
                return Err(StoreError::Schema {
                    path: self.path.clone(),
                    found: version,
                    known,
                });
            }
            let Some(m) = MIGRATIONS.get(version as usize) else {
                return Ok(());
            };
            tx.execute_batch(m.sql)?;
            if let Some(data) = m.data {
                data(&tx)?;
            }
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [version + 1],
            )?;
            tx.commit()?;
        }
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?)
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn host(&mut self, host_id: &str) -> Result<Option<HostState>, StoreError> {
        Ok(self
            .conn
            .query_row(HOST_STATE, [host_id], host_state)
            .optional()?)
    }

    fn pin_host(&mut self, host_id: &str, public_key: &[u8]) -> Result<HostState, StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO hosts (host_id, public_key, first_seen_ns, head_hash)
             VALUES (?1, ?2, ?3, ?4)",
            params![host_id, public_key, now_ns(), Head::EMPTY.hash.to_vec()],
        )?;
        Ok(self.conn.query_row(HOST_STATE, [host_id], host_state)?)
    }

    fn seen(&mut self, host_id: &str, agent_version: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE hosts SET last_seen_ns = ?2, agent_version = ?3 WHERE host_id = ?1",
            params![host_id, now_ns(), agent_version],
        )?;
        Ok(())
    }

    fn append_prepared(&mut self, host_id: &str, batch: Prepared) -> Result<Appended, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let appended = append_in(&tx, host_id, batch)?;
        tx.commit()?;
        Ok(appended)
    }

    fn append_group(
        &mut self,
        batches: Vec<(String, Prepared)>,
    ) -> Result<Vec<Appended>, StoreError> {
        // One transaction, so one sync of the WAL, for all of them.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let appended = batches
            .into_iter()
            .map(|(host_id, batch)| append_in(&tx, &host_id, batch))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(appended)
    }

    fn alert(&mut self, alert: &Alert) -> Result<(), StoreError> {
        insert_alert(&self.conn, alert)
    }

    fn hosts(&mut self) -> Result<Vec<HostInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{HOST_INFO} ORDER BY h.host_id"))?;
        let rows = stmt.query_map([], host_info)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn host_info(&mut self, host_id: &str) -> Result<Option<HostInfo>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{HOST_INFO} WHERE h.host_id = ?1"),
                [host_id],
                host_info,
            )
            .optional()?)
    }

    fn chain(
        &mut self,
        host_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let limit = limit.max(1);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM blocks WHERE host_id = ?1 AND last_seq > ?2 ORDER BY last_seq",
        )?;
        let mut ids = stmt.query(params![host_id, after_seq as i64])?;
        let mut out = Vec::new();
        while out.len() < limit
            && let Some(r) = ids.next()?
        {
            let records = read_block(&self.conn, r.get(0)?)?;
            out.extend(
                records
                    .into_iter()
                    .filter(|r| r.seq > after_seq)
                    .take(limit - out.len())
                    .map(|r| r.row(host_id)),
            );
        }
        Ok(out)
    }

    fn checkpoints(
        &mut self,
        host_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, body FROM checkpoints WHERE host_id = ?1 AND seq >= ?2 AND seq <= ?3
             ORDER BY seq",
        )?;
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![host_id, from as i64, to], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn seq_range(
        &mut self,
        host_id: &str,
        since_ns: i64,
        until_ns: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut w = query::Where::default();
        w.push("b.host_id = ?", [Param::Text(host_id.to_owned())]);
        blocks_in(&tx, &mut w, Some(since_ns), Some(until_ns))?;
        let blocks: Vec<(i64, i64, i64, i64, i64)> = tx
            .prepare_cached(&format!(
                "SELECT b.id, b.first_seq, b.last_seq, b.min_ns, b.max_ns FROM blocks b {}",
                w.sql()
            ))?
            .query_map(params_from_iter(values(w.params)), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut range: Option<(u64, u64)> = None;
        let mut widen = |lo: u64, hi: u64| {
            range = Some(range.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
        };
        for (id, first, last, min_ns, max_ns) in blocks {
            if min_ns >= since_ns && max_ns < until_ns {
                widen(first as u64, last as u64);
                continue;
            }
            for r in read_block(&tx, id)? {
                if r.time_ns >= since_ns && r.time_ns < until_ns {
                    widen(r.seq, r.seq);
                }
            }
        }
        tx.commit()?;
        Ok(range)
    }

    fn checkpoint_near(
        &mut self,
        host_id: &str,
        seq: u64,
        above: bool,
    ) -> Result<Option<u64>, StoreError> {
        let sql = if above {
            "SELECT MIN(seq) FROM checkpoints WHERE host_id = ?1 AND seq >= ?2"
        } else {
            "SELECT MAX(seq) FROM checkpoints WHERE host_id = ?1 AND seq < ?2"
        };
        let found: Option<i64> = self
            .conn
            .query_row(sql, params![host_id, seq as i64], |r| r.get(0))?;
        Ok(found.map(|s| s as u64))
    }

    fn timeline(
        &mut self,
        filter: &Filter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        // One snapshot for the block list and the blocks: a prune between them would
        // otherwise take a listed block away.
        let tx = self.conn.unchecked_transaction()?;
        let page = timeline_page(&tx, filter, after, limit)?;
        tx.commit()?;
        Ok(page)
    }

    fn sessions(&mut self, filter: &SessionFilter) -> Result<Vec<Session>, StoreError> {
        let (sql, params) = query::sessions(filter);
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(values(params)), session)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn session(&mut self, key: &str) -> Result<Option<Session>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {} FROM sessions WHERE session = ?1",
                    query::SESSION_COLUMNS
                ),
                [key],
                session,
            )
            .optional()?)
    }

    fn alerts(&mut self, host_id: Option<&str>) -> Result<Vec<StoredAlert>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, time_ns, host_id, kind, seq, detail, evidence FROM alerts
             WHERE ?1 IS NULL OR host_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([host_id], stored_alert)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn heads(&mut self) -> Result<Vec<HostHead>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT host_id, head_seq, anchor_seq, last_seen_ns, last_record_ns FROM hosts
             ORDER BY host_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(HostHead {
                host_id: r.get(0)?,
                head_seq: r.get::<_, i64>(1)? as u64,
                anchor_seq: r.get::<_, i64>(2)? as u64,
                last_seen_ns: r.get(3)?,
                last_record_ns: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn alerts_after(
        &mut self,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, time_ns, host_id, kind, seq, detail, evidence FROM alerts
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_id as i64, limit.max(1) as i64], stored_alert)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn cursors(&mut self, consumer: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT stream, position FROM consumer_cursors WHERE consumer = ?1 ORDER BY stream",
        )?;
        let rows = stmt.query_map([consumer], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_cursor(
        &mut self,
        consumer: &str,
        stream: &str,
        position: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO consumer_cursors (consumer, stream, position, updated_ns)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (consumer, stream) DO UPDATE SET
                position = MAX(position, excluded.position), updated_ns = excluded.updated_ns",
            params![consumer, stream, position as i64, now_ns()],
        )?;
        Ok(())
    }

    fn log_access(&mut self, entry: AccessEntry) -> Result<AccessEntry, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (seq, hash): (i64, Vec<u8>) = tx
            .query_row(
                "SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, Vec::new()));
        let (sealed, body) = seal_access(entry, seq as u64, &hash);
        let time_ns = sealed.time.as_ref().map_or(0, |t| {
            t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
        });
        tx.execute(
            "INSERT INTO access_log (seq, time_ns, principal, action, outcome, body, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                sealed.seq as i64,
                time_ns,
                sealed.principal,
                sealed.action,
                sealed.outcome,
                body,
                sealed.hash
            ],
        )?;
        tx.commit()?;
        Ok(sealed)
    }

    fn access_log(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(AccessEntry, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, body, hash FROM access_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after as i64, limit.max(1) as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (seq, body, hash) = r?;
            let mut entry = AccessEntry::decode(body.as_slice()).unwrap_or_default();
            // The stored columns are what the chain is checked against.
            entry.seq = seq;
            entry.hash = hash;
            out.push((entry, body));
        }
        Ok(out)
    }

    fn add_principal(
        &mut self,
        name: &str,
        role: Role,
        cert_name: Option<&str>,
        token_hash: Option<&[u8]>,
    ) -> Result<Principal, StoreError> {
        let changed = self.conn.execute(
            "INSERT INTO principals (name, role, cert_name, token_hash, created_ns)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role,
                cert_name = COALESCE(excluded.cert_name, cert_name),
                token_hash = COALESCE(excluded.token_hash, token_hash), disabled = 0",
            params![name, role.as_str(), cert_name, token_hash, now_ns()],
        );
        match changed {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Invalid(format!(
                    "certificate name {:?} already belongs to another principal",
                    cert_name.unwrap_or_default()
                )));
            }
            other => other?,
        };
        Ok(self
            .conn
            .query_row(&format!("{PRINCIPAL} WHERE name = ?1"), [name], principal)?)
    }

    fn principals(&mut self) -> Result<Vec<Principal>, StoreError> {
        let mut stmt = self.conn.prepare(&format!("{PRINCIPAL} ORDER BY name"))?;
        let rows = stmt.query_map([], principal)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn principal_by_token(&mut self, token_hash: &[u8]) -> Result<Option<Principal>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{PRINCIPAL} WHERE token_hash = ?1"),
                [token_hash],
                principal,
            )
            .optional()?)
    }

    fn principal_by_cert(&mut self, names: &[String]) -> Result<Option<Principal>, StoreError> {
        for n in names {
            if let Some(p) = self
                .conn
                .query_row(&format!("{PRINCIPAL} WHERE cert_name = ?1"), [n], principal)
                .optional()?
            {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    fn disable_principal(&mut self, name: &str) -> Result<Option<Principal>, StoreError> {
        self.conn.execute(
            "UPDATE principals SET disabled = 1, token_hash = NULL WHERE name = ?1",
            [name],
        )?;
        Ok(self
            .conn
            .query_row(&format!("{PRINCIPAL} WHERE name = ?1"), [name], principal)
            .optional()?)
    }

    fn set_hold(&mut self, host_id: &str, hold: Option<&Hold>) -> Result<bool, StoreError> {
        let exists = self.host_info(host_id)?.is_some();
        if !exists {
            return Ok(false);
        }
        match hold {
            Some(h) => self.conn.execute(
                "INSERT INTO holds (host_id, reason, set_by, since_ns) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (host_id) DO UPDATE SET reason = excluded.reason,
                    set_by = excluded.set_by, since_ns = excluded.since_ns",
                params![host_id, h.reason, h.set_by, h.since_ns],
            )?,
            None => self
                .conn
                .execute("DELETE FROM holds WHERE host_id = ?1", [host_id])?,
        };
        Ok(true)
    }

    fn prune(
        &mut self,
        host_id: &str,
        anchor_seq: u64,
        by: &str,
    ) -> Result<PruneOutcome, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = PruneOutcome {
            host_id: host_id.to_owned(),
            through_seq: 0,
            records: 0,
            skipped: None,
        };
        let held: bool = tx
            .query_row("SELECT 1 FROM holds WHERE host_id = ?1", [host_id], |_| {
                Ok(true)
            })
            .optional()?
            .unwrap_or(false);
        if held {
            out.skipped = Some("legal hold".into());
            return Ok(out);
        }
        let current: i64 = tx.query_row(
            "SELECT anchor_seq FROM hosts WHERE host_id = ?1",
            [host_id],
            |r| r.get(0),
        )?;
        let anchor = anchor_seq as i64;
        let has_checkpoint: bool = tx
            .query_row(
                "SELECT 1 FROM checkpoints WHERE host_id = ?1 AND seq = ?2",
                params![host_id, anchor],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if anchor <= current || !has_checkpoint {
            out.skipped = Some("nothing older than the retention period".into());
            return Ok(out);
        }
        // Whole blocks go; the block that holds the anchor's successor is written again
        // without the records up to the anchor (a new block: blocks never change in place).
        let blocks: Vec<(i64, i64, i64)> = tx
            .prepare(
                "SELECT id, last_seq, records FROM blocks WHERE host_id = ?1 AND first_seq <= ?2
                 ORDER BY last_seq",
            )?
            .query_map(params![host_id, anchor], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut records = 0usize;
        for (id, last, count) in blocks {
            let kept: Vec<StoredRecord> = if last <= anchor {
                Vec::new()
            } else {
                read_block(&tx, id)?
                    .into_iter()
                    .filter(|r| r.seq as i64 > anchor)
                    .collect()
            };
            records += (count as usize).saturating_sub(kept.len());
            delete_block(&tx, id)?;
            if !kept.is_empty() {
                insert_block(&tx, host_id, kept)?;
            }
        }
        tx.execute(
            "DELETE FROM checkpoints WHERE host_id = ?1 AND seq < ?2",
            params![host_id, anchor],
        )?;
        tx.execute(
            "DELETE FROM sessions WHERE host_id = ?1 AND last_seq <= ?2",
            params![host_id, anchor],
        )?;
        tx.execute(
            "UPDATE hosts SET anchor_seq = ?2 WHERE host_id = ?1",
            params![host_id, anchor],
        )?;
        tx.execute(
            "INSERT INTO prunes (host_id, time_ns, through_seq, records, pruned_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![host_id, now_ns(), anchor, records as i64, by],
        )?;
        tx.commit()?;
        out.through_seq = anchor_seq;
        out.records = records as u64;
        Ok(out)
    }

    fn checkpoint_before(
        &mut self,
        host_id: &str,
        cutoff_ns: i64,
    ) -> Result<Option<(u64, i64)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT seq, time_ns FROM checkpoints WHERE host_id = ?1 AND time_ns < ?2
                 ORDER BY seq DESC LIMIT 1",
                params![host_id, cutoff_ns],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_urls_of_other_databases() {
        assert!(SqliteStore::open_url("postgres://x").is_err());
        assert!(SqliteStore::open_url("sqlite:").is_err());
    }

    #[test]
    fn migrates_a_version_1_database_and_derives_its_query_columns() {
        use phi_chain::seal::Sealer;
        use phi_proto::v1::{Identity, Open, Process, Record, record::Event};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v1.db");
        let mut sealer = Sealer::new(Head::EMPTY);
        let mut record = Record {
            host_id: "old".into(),
            boot_id: "b".into(),
            process: Some(Process {
                identity: Some(Identity {
                    user: "carol".into(),
                    login_user: "carol".into(),
                    audit_session: Some(3),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            event: Some(Event::Open(Open {
                path: "/srv/ehr/x".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let sealed = sealer.seal(&mut record);
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch(MIGRATIONS[0].sql).expect("v1 schema");
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version (version) VALUES (1);",
            )
            .expect("version");
            conn.execute(
                "INSERT INTO hosts (host_id, public_key, first_seen_ns, head_seq, head_hash)
                 VALUES ('old', x'00', 0, 1, ?1)",
                [sealed.hash.clone()],
            )
            .expect("host");
            conn.execute(
                "INSERT INTO records (host_id, seq, hash, prev_hash, body, time_ns, kind)
                 VALUES ('old', 1, ?1, ?2, ?3, 0, 'open')",
                params![sealed.hash, record.prev_hash, sealed.body],
            )
            .expect("record");
        }
        let mut s = SqliteStore::open(&path).expect("migrate");
        assert_eq!(
            s.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        let rows = s
            .timeline(
                &Filter {
                    user: Some("carol".into()),
                    path_prefix: Some("/srv/ehr/".into()),
                    ..Default::default()
                },
                None,
                10,
            )
            .expect("timeline");
        assert_eq!(rows.len(), 1, "the old record has its query columns");
        let block: (String, i64, i64, i64) = s
            .conn
            .query_row(
                "SELECT host_id, first_seq, last_seq, records FROM blocks",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("one block");
        assert_eq!(
            block,
            ("old".into(), 1, 1, 1),
            "the old record is in a block"
        );
        let tables: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('records', 'index_runs')",
                [],
                |r| r.get(0),
            )
            .expect("tables");
        assert_eq!(tables, 0, "the row-per-record table is gone");
        let chain = s.chain("old", 0, 10).expect("chain");
        assert_eq!(chain.len(), 1);
        assert_eq!(
            (chain[0].hash.clone(), chain[0].body.clone()),
            (sealed.hash, sealed.body)
        );
        let sessions = s.sessions(&SessionFilter::default()).expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].session, "old/b/3");
    }

    #[test]
    fn a_group_stores_each_batch_as_its_own_append_would() {
        use phi_chain::{checkpoint::HostKey, seal::Sealer};
        use phi_proto::v1::{Batch, Heartbeat, Record, record::Event};

        use crate::verify::prepare;

        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::open(&dir.path().join("g.db")).expect("open");
        let mut sealers = Vec::new();
        for host in ["a", "b"] {
            let key = HostKey::from_secret([host.as_bytes()[0]; 32]);
            s.pin_host(host, &key.public_key()).expect("pin");
            sealers.push(Sealer::new(Head::EMPTY));
        }
        let mut seal = |h: usize, n: usize| -> Vec<phi_proto::v1::SealedRecord> {
            let host = ["a", "b"][h];
            (0..n)
                .map(|_| {
                    sealers[h].seal(&mut Record {
                        host_id: host.into(),
                        event: Some(Event::Heartbeat(Heartbeat::default())),
                        ..Default::default()
                    })
                })
                .collect()
        };
        let batch = |records| {
            prepare(Batch {
                records,
                checkpoints: vec![],
            })
        };
        let a1 = seal(0, 3);
        let b1 = seal(1, 2);
        // Host a twice in one group: the second batch continues the first.
        let a2 = seal(0, 2);
        // Host b's next batch skips a record: refused, with the valid prefix kept.
        let mut b2 = seal(1, 3);
        b2.remove(1);
        let out = s
            .append_group(vec![
                ("a".into(), batch(a1)),
                ("b".into(), batch(b1)),
                ("a".into(), batch(a2)),
                ("b".into(), batch(b2)),
            ])
            .expect("group");
        let heads: Vec<u64> = out.iter().map(|o| o.head.seq).collect();
        assert_eq!(heads, [3, 2, 5, 3]);
        assert!(out[..3].iter().all(|o| o.problem.is_none()));
        assert_eq!(
            out[3].problem.as_ref().map(|p| (p.kind.as_str(), p.seq)),
            Some(("chain-break", Some(5)))
        );
        assert_eq!(s.host("a").expect("a").expect("pinned").head.seq, 5);
        assert_eq!(s.host("b").expect("b").expect("pinned").head.seq, 3);
        assert_eq!(s.chain("a", 0, 100).expect("chain").len(), 5);
        assert_eq!(s.alerts(Some("b")).expect("alerts").len(), 1);
        let report = crate::verify::verify_chain(&mut s, "a", &mut |_, _| {}).expect("verify");
        assert!(report.ok, "{:?}", report.problems);
    }

    #[test]
    fn blocks_answer_path_user_and_session_queries_page_by_page_and_prune_in_part() {
        use phi_chain::{checkpoint::HostKey, seal::Sealer};
        use phi_proto::{
            Timestamp,
            v1::{Batch, Identity, Open, Process, Record, record::Event},
        };

        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::open(&dir.path().join("blocks.db")).expect("open");
        let mut sealers = Vec::new();
        for host in ["a", "b"] {
            let key = HostKey::from_secret([host.as_bytes()[0]; 32]);
            s.pin_host(host, &key.public_key()).expect("pin");
            sealers.push(Sealer::new(Head::EMPTY));
        }
        // Record i of host h is at time 10 * i + h, opens /d<i % 3>/f<i> as user u<i % 2>
        // in audit session i % 4. Host b's batches arrive in reverse time order.
        let mut all = Vec::new();
        for round in 0..5 {
            for (h, host) in ["a", "b"].into_iter().enumerate() {
                let records = (0..3)
                    .map(|k| {
                        let i = round * 3 + if h == 0 { k } else { 2 - k };
                        let time_ns = 10 * i as i64 + h as i64;
                        let path = format!("/d{}/f{i}", i % 3);
                        all.push((time_ns, host.to_owned(), path.clone(), i));
                        sealers[h].seal(&mut Record {
                            host_id: host.into(),
                            boot_id: "b00710".into(),
                            time: Some(Timestamp {
                                seconds: 0,
                                nanos: time_ns as i32,
                            }),
                            process: Some(Process {
                                identity: Some(Identity {
                                    uid: 1000 + (i % 2) as u32,
                                    user: format!("u{}", i % 2),
                                    audit_session: Some((i % 4) as u32),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            event: Some(Event::Open(Open {
                                path,
                                ..Default::default()
                            })),
                            ..Default::default()
                        })
                    })
                    .collect();
                let out = s
                    .append(
                        host,
                        Batch {
                            records,
                            checkpoints: vec![],
                        },
                    )
                    .expect("append");
                assert!(out.problem.is_none(), "{:?}", out.problem);
            }
        }
        // One block per batch, each stating its range.
        let blocks: Vec<(String, i64, i64, i64, i64)> = s
            .conn
            .prepare("SELECT host_id, first_seq, last_seq, min_ns, max_ns FROM blocks ORDER BY id")
            .expect("blocks")
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .expect("blocks")
            .collect::<Result<_, _>>()
            .expect("blocks");
        assert_eq!(blocks.len(), 10);
        assert_eq!(blocks[0], ("a".into(), 1, 3, 0, 20));
        assert_eq!(blocks[3], ("b".into(), 4, 6, 31, 51));

        let check = |s: &mut SqliteStore, all: &[(i64, String, String, usize)], filter: Filter| {
            let mut want: Vec<(i64, String)> = all
                .iter()
                .filter(|(t, h, p, i)| {
                    filter
                        .path_prefix
                        .as_ref()
                        .is_none_or(|x| p.starts_with(x.as_str()))
                        && filter.since_ns.is_none_or(|v| *t >= v)
                        && filter.until_ns.is_none_or(|v| *t < v)
                        && filter.host.as_ref().is_none_or(|x| x == h)
                        && filter.user.as_ref().is_none_or(|u| {
                            *u == format!("u{}", i % 2) || *u == (1000 + i % 2).to_string()
                        })
                        && filter
                            .session
                            .as_ref()
                            .is_none_or(|x| *x == format!("{h}/b00710/{}", i % 4))
                })
                .map(|(t, h, _, _)| (*t, h.clone()))
                .collect();
            want.sort();
            let whole: Vec<(i64, String)> = s
                .timeline(&filter, None, 100)
                .expect("timeline")
                .into_iter()
                .map(|r| (r.time_ns, r.host_id))
                .collect();
            assert_eq!(whole, want, "{filter:?}");
            // Page by page, with the cursor of each page's last row.
            for size in [1, 2, 4] {
                let mut paged = Vec::new();
                let mut after: Option<Cursor> = None;
                loop {
                    let page = s.timeline(&filter, after.as_ref(), size).expect("page");
                    assert!(page.len() <= size);
                    let Some(last) = page.last() else { break };
                    after = Some(last.cursor());
                    paged.extend(page.into_iter().map(|r| (r.time_ns, r.host_id)));
                }
                assert_eq!(paged, want, "pages of {size}: {filter:?}");
            }
        };
        let path = |p: &str, since: Option<i64>, until: Option<i64>| Filter {
            path_prefix: Some(p.into()),
            since_ns: since,
            until_ns: until,
            ..Default::default()
        };
        for filter in [
            Filter::default(),
            path("/d1/", None, None),
            path("/d1/", Some(35), Some(95)),
            path("/d2/f1", Some(0), Some(200)),
            path("/", Some(51), Some(52)),
            path("/d0/", Some(200), None),
            path("/e/", None, None),
            Filter {
                user: Some("u1".into()),
                host: Some("b".into()),
                ..Default::default()
            },
            Filter {
                user: Some("1000".into()),
                since_ns: Some(40),
                ..Default::default()
            },
            Filter {
                session: Some("a/b00710/2".into()),
                ..Default::default()
            },
            Filter {
                session: Some("b/b00710/9".into()),
                ..Default::default()
            },
        ] {
            check(&mut s, &all, filter);
        }
        assert_eq!(s.seq_range("b", 31, 52).expect("range"), Some((4, 6)));
        assert_eq!(s.seq_range("a", 25, 70).expect("range"), Some((4, 7)));
        assert_eq!(s.seq_range("a", 1000, 2000).expect("range"), None);
        let chain = s.chain("b", 4, 4).expect("chain");
        assert_eq!(
            chain.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );

        // Pruning host a through 9 drops three whole blocks; host b through 5 drops one and
        // writes the block of 4..=6 again with 6 alone.
        for (host, seq) in [("a", 9u64), ("b", 5)] {
            s.conn
                .execute(
                    "INSERT INTO checkpoints (host_id, seq, body, time_ns) VALUES (?1, ?2, x'', 0)",
                    params![host, seq as i64],
                )
                .expect("checkpoint");
            let out = s.prune(host, seq, "test").expect("prune");
            assert_eq!(out.records, seq, "{:?}", out.skipped);
        }
        let firsts: Vec<(String, i64, i64)> = s
            .conn
            .prepare("SELECT host_id, first_seq, records FROM blocks ORDER BY host_id, first_seq")
            .expect("blocks")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("blocks")
            .collect::<Result<_, _>>()
            .expect("blocks");
        assert_eq!(
            firsts,
            [
                ("a".into(), 10, 3),
                ("a".into(), 13, 3),
                ("b".into(), 6, 1),
                ("b".into(), 7, 3),
                ("b".into(), 10, 3),
                ("b".into(), 13, 3)
            ]
        );
        let keys: i64 = s
            .conn
            .query_row(
                "SELECT COUNT(*) FROM block_keys WHERE block NOT IN (SELECT id FROM blocks)",
                [],
                |r| r.get(0),
            )
            .expect("keys");
        assert_eq!(keys, 0, "the lookup entries of dropped blocks go with them");
        // Host b's seqs 4, 5, 6 are its records i = 5, 4, 3 (reverse time order).
        all.retain(|(_, h, _, i)| {
            if h == "a" {
                *i >= 9
            } else {
                *i == 3 || *i >= 6
            }
        });
        let left: Vec<u64> = s
            .chain("b", 0, 100)
            .expect("chain")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, (6..=15).collect::<Vec<_>>());
        check(&mut s, &all, path("/d", None, None));

        // The time condition searches the time index.
        let plan: Vec<String> = s
            .conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT b.id FROM blocks b
                 WHERE b.host_id = ?1 AND b.min_ns >= ?2 AND b.max_ns >= ?3 AND b.min_ns < ?4
                 ORDER BY b.min_ns, b.id",
            )
            .expect("plan")
            .query_map(params!["a", 0, 0, 10], |r| r.get(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("plan");
        assert!(
            plan.iter()
                .any(|p| p.contains("INDEX blocks_time (host_id=? AND min_ns>? AND min_ns<?)")),
            "{plan:?}"
        );
    }

    #[test]
    fn a_large_batch_is_cut_into_blocks_of_at_most_block_records() {
        use phi_chain::{checkpoint::HostKey, seal::Sealer};
        use phi_proto::v1::{Batch, Heartbeat, Record, record::Event};

        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SqliteStore::open(&dir.path().join("cut.db")).expect("open");
        let key = HostKey::from_secret([7; 32]);
        s.pin_host("h", &key.public_key()).expect("pin");
        let mut sealer = Sealer::new(Head::EMPTY);
        let n = 2 * block::BLOCK_RECORDS + 76;
        let records: Vec<_> = (0..n)
            .map(|_| {
                sealer.seal(&mut Record {
                    host_id: "h".into(),
                    event: Some(Event::Heartbeat(Heartbeat::default())),
                    ..Default::default()
                })
            })
            .collect();
        let batch = |records: Vec<_>| Batch {
            records,
            checkpoints: vec![],
        };
        let out = s.append("h", batch(records.clone())).expect("append");
        assert_eq!((out.records, out.head.seq), (n, n as u64));
        // Sent again (an agent that lost the acknowledgement): every record is found, across
        // the three blocks, with its stored hash; nothing new, no alert.
        let again = s.append("h", batch(records.clone())).expect("resend");
        assert_eq!((again.records, again.head.seq), (0, n as u64));
        assert!(again.problem.is_none(), "{:?}", again.problem);
        let mut forged = records;
        forged[700].hash[0] ^= 1;
        let fork = s.append("h", batch(forged)).expect("forged resend");
        assert_eq!(
            fork.problem.as_ref().map(|p| (p.kind.as_str(), p.seq)),
            Some(("fork", Some(701)))
        );
        let sizes: Vec<(i64, i64, i64)> = s
            .conn
            .prepare("SELECT first_seq, last_seq, records FROM blocks ORDER BY first_seq")
            .expect("blocks")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("blocks")
            .collect::<Result<_, _>>()
            .expect("blocks");
        let b = block::BLOCK_RECORDS as i64;
        assert_eq!(
            sizes,
            [(1, b, b), (b + 1, 2 * b, b), (2 * b + 1, 2 * b + 76, 76)]
        );
        let seqs: Vec<u64> = s
            .chain("h", 0, n)
            .expect("chain")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
        let report = crate::verify::verify_chain(&mut s, "h", &mut |_, _| {}).expect("verify");
        assert!(report.ok, "{:?}", report.problems);
    }

    #[test]
    fn a_new_store_has_8_kib_pages_and_an_existing_one_keeps_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = SqliteStore::open(&dir.path().join("new.db")).expect("open");
        let size = |s: &SqliteStore| -> (i64, i64) {
            (
                s.conn
                    .query_row("PRAGMA page_size", [], |r| r.get(0))
                    .expect("page size"),
                s.conn
                    .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
                    .expect("autocheckpoint"),
            )
        };
        assert_eq!(size(&fresh), (PAGE_SIZE, (64 << 20) / PAGE_SIZE));
        let old = dir.path().join("old.db");
        {
            let conn = Connection::open(&old).expect("create");
            conn.execute_batch(
                "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);",
            )
            .expect("4 KiB store");
        }
        let mut s = SqliteStore::open(&old).expect("open the 4 KiB store");
        assert_eq!(size(&s), (4096, 16_384));
        assert_eq!(s.hosts().expect("hosts").len(), 0);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        let s = SqliteStore::open(&path).expect("open");
        assert_eq!(
            s.schema_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        s.conn
            .execute("INSERT INTO schema_version (version) VALUES (99)", [])
            .expect("bump");
        drop(s);
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
