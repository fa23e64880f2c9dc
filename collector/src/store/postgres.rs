//! The PostgreSQL store, for several collectors sharing one database. Chain heads live in
//! the `hosts` table and each batch locks its host's row (`SELECT … FOR UPDATE`) while it
//! is verified and stored, so any collector can continue any host and two collectors can
//! never fork a chain. The access log is serialized with a transaction-scoped advisory lock.

use phi_chain::seal::Head;
use phi_proto::v1::AccessEntry;
use postgres::{Client, GenericClient, NoTls, Row as PgRow, Transaction, types::ToSql};
use prost::Message as _;

use super::{
    Alert, Appended, Cursor, Filter, Hold, HostHead, HostInfo, HostState, Principal, PruneOutcome,
    Role, Row, Session, SessionFilter, Spent, Store, StoreError, StoredAlert, checkpoint_time_ns,
    head_from,
    index::SessionDeltas,
    now_ns,
    query::{self, Param, numbered},
    seal_access,
};
use crate::verify::{Prepared, verify_prepared};

/// Advisory lock ids (arbitrary, fixed): schema migrations and the access log's head.
const MIGRATION_LOCK: i64 = 0x7068_6961_0001;
const ACCESS_LOG_LOCK: i64 = 0x7068_6961_0002;
/// Serializes alert inserts so that alert ids grow in commit order: a consumer reading
/// "alerts after id N" can never miss one committed late with a lower id.
const ALERT_LOCK: i64 = 0x7068_6961_0003;

/// Schema migrations, in order; the index + 1 is the version.
const MIGRATIONS: &[&str] = &[
    // 1: everything of SQLite's version 3, in PostgreSQL types.
    r#"CREATE TABLE hosts (
        host_id            TEXT PRIMARY KEY,
        public_key         BYTEA NOT NULL,
        first_seen_ns      BIGINT NOT NULL,
        head_seq           BIGINT NOT NULL DEFAULT 0,
        head_hash          BYTEA NOT NULL,
        checkpoint_seq     BIGINT NOT NULL DEFAULT 0,
        checkpoint_sig     BYTEA NOT NULL DEFAULT '\x',
        last_seen_ns       BIGINT NOT NULL DEFAULT 0,
        agent_version      TEXT NOT NULL DEFAULT '',
        anchor_seq         BIGINT NOT NULL DEFAULT 0,
        checkpoint_time_ns BIGINT NOT NULL DEFAULT 0,
        last_record_ns     BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE records (
        host_id    TEXT NOT NULL,
        seq        BIGINT NOT NULL,
        hash       BYTEA NOT NULL,
        prev_hash  BYTEA NOT NULL,
        body       BYTEA NOT NULL,
        time_ns    BIGINT NOT NULL,
        kind       TEXT NOT NULL,
        uid        BIGINT,
        user_name  TEXT,
        login_user TEXT,
        session    TEXT,
        path       TEXT COLLATE "C",
        PRIMARY KEY (host_id, seq)
    );
    CREATE INDEX records_time ON records (host_id, time_ns);
    CREATE INDEX records_all_time ON records (time_ns);
    CREATE INDEX records_session ON records (session, time_ns) WHERE session IS NOT NULL;
    CREATE INDEX records_path ON records (path, time_ns) WHERE path IS NOT NULL;
    CREATE INDEX records_login_user ON records (login_user, time_ns) WHERE login_user IS NOT NULL;
    CREATE TABLE checkpoints (
        host_id TEXT NOT NULL,
        seq     BIGINT NOT NULL,
        body    BYTEA NOT NULL,
        time_ns BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (host_id, seq)
    );
    CREATE TABLE alerts (
        id       BIGSERIAL PRIMARY KEY,
        time_ns  BIGINT NOT NULL,
        host_id  TEXT NOT NULL,
        kind     TEXT NOT NULL,
        seq      BIGINT,
        detail   TEXT NOT NULL,
        evidence BYTEA NOT NULL
    );
    CREATE UNIQUE INDEX alerts_once ON alerts (host_id, kind, COALESCE(seq, -1), detail);
    CREATE TABLE sessions (
        session        TEXT PRIMARY KEY,
        host_id        TEXT NOT NULL,
        boot_id        TEXT NOT NULL,
        audit_session  BIGINT NOT NULL,
        kind           TEXT NOT NULL DEFAULT '',
        user_name      TEXT NOT NULL DEFAULT '',
        source_address TEXT NOT NULL DEFAULT '',
        source_port    BIGINT NOT NULL DEFAULT 0,
        tty            TEXT NOT NULL DEFAULT '',
        login_ns       BIGINT NOT NULL DEFAULT 0,
        first_ns       BIGINT NOT NULL,
        last_ns        BIGINT NOT NULL,
        first_seq      BIGINT NOT NULL,
        last_seq       BIGINT NOT NULL,
        records        BIGINT NOT NULL DEFAULT 0,
        phi_accesses   BIGINT NOT NULL DEFAULT 0,
        denied         BIGINT NOT NULL DEFAULT 0,
        execs          BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_host ON sessions (host_id, first_ns);
    CREATE TABLE access_log (
        seq       BIGINT PRIMARY KEY,
        time_ns   BIGINT NOT NULL,
        principal TEXT NOT NULL,
        action    TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        body      BYTEA NOT NULL,
        hash      BYTEA NOT NULL
    );
    CREATE TABLE principals (
        name       TEXT PRIMARY KEY,
        role       TEXT NOT NULL,
        cert_name  TEXT UNIQUE,
        token_hash BYTEA UNIQUE,
        disabled   BOOLEAN NOT NULL DEFAULT FALSE,
        created_ns BIGINT NOT NULL
    );
    CREATE TABLE holds (
        host_id  TEXT PRIMARY KEY,
        reason   TEXT NOT NULL,
        set_by   TEXT NOT NULL,
        since_ns BIGINT NOT NULL
    );
    CREATE TABLE prunes (
        id          BIGSERIAL PRIMARY KEY,
        host_id     TEXT NOT NULL,
        time_ns     BIGINT NOT NULL,
        through_seq BIGINT NOT NULL,
        records     BIGINT NOT NULL,
        pruned_by   TEXT NOT NULL
    );
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );"#,
    // 2: positions of the consumers of the store (SIEM sinks, alert rules).
    r#"CREATE TABLE consumer_cursors (
        consumer   TEXT NOT NULL,
        stream     TEXT NOT NULL,
        position   BIGINT NOT NULL,
        updated_ns BIGINT NOT NULL,
        PRIMARY KEY (consumer, stream)
    );"#,
];

pub struct PgStore {
    client: Client,
    shown: String,
}

fn stored_alert(r: &PgRow) -> StoredAlert {
    StoredAlert {
        id: r.get::<_, i64>(0) as u64,
        time_ns: r.get(1),
        alert: Alert {
            host_id: r.get(2),
            kind: r.get(3),
            seq: r.get::<_, Option<i64>>(4).map(|s| s as u64),
            detail: r.get(5),
            evidence: r.get(6),
        },
    }
}

fn host_state(r: &PgRow) -> HostState {
    HostState {
        public_key: r.get(0),
        head: head_from(r.get(1), r.get::<_, &[u8]>(2)),
        checkpoint_seq: r.get::<_, i64>(3) as u64,
        checkpoint_sig: r.get(4),
    }
}

const HOST_STATE: &str = "SELECT public_key, head_seq, head_hash, checkpoint_seq, checkpoint_sig
    FROM hosts WHERE host_id = $1";

const HOST_INFO: &str = "SELECT h.host_id, h.public_key, h.first_seen_ns, h.last_seen_ns,
    h.agent_version, h.head_seq, h.head_hash, h.checkpoint_seq, h.checkpoint_time_ns,
    h.anchor_seq, (SELECT COUNT(*) FROM alerts a WHERE a.host_id = h.host_id),
    d.reason, d.set_by, d.since_ns, h.last_record_ns
    FROM hosts h LEFT JOIN holds d ON d.host_id = h.host_id";

fn host_info(r: &PgRow) -> HostInfo {
    let reason: Option<String> = r.get(11);
    HostInfo {
        host_id: r.get(0),
        public_key: r.get(1),
        first_seen_ns: r.get(2),
        last_seen_ns: r.get(3),
        agent_version: r.get(4),
        head_seq: r.get::<_, i64>(5) as u64,
        head_hash: r.get(6),
        checkpoint_seq: r.get::<_, i64>(7) as u64,
        checkpoint_time_ns: r.get(8),
        anchor_seq: r.get::<_, i64>(9) as u64,
        alerts: r.get::<_, i64>(10) as u64,
        hold: reason.map(|reason| Hold {
            reason,
            set_by: r.get(12),
            since_ns: r.get(13),
        }),
        last_record_ns: r.get(14),
    }
}

fn row(r: &PgRow) -> Row {
    Row {
        host_id: r.get(0),
        seq: r.get::<_, i64>(1) as u64,
        hash: r.get(2),
        body: r.get(3),
        time_ns: r.get(4),
        session: r.get(5),
    }
}

fn session(r: &PgRow) -> Session {
    Session {
        session: r.get(0),
        host_id: r.get(1),
        boot_id: r.get(2),
        audit_session: r.get::<_, i64>(3) as u32,
        kind: r.get(4),
        user: r.get(5),
        source_address: r.get(6),
        source_port: r.get::<_, i64>(7) as u32,
        tty: r.get(8),
        login_ns: r.get(9),
        first_ns: r.get(10),
        last_ns: r.get(11),
        first_seq: r.get::<_, i64>(12) as u64,
        last_seq: r.get::<_, i64>(13) as u64,
        records: r.get::<_, i64>(14) as u64,
        phi_accesses: r.get::<_, i64>(15) as u64,
        denied: r.get::<_, i64>(16) as u64,
        execs: r.get::<_, i64>(17) as u64,
    }
}

const PRINCIPAL: &str =
    "SELECT name, role, cert_name, token_hash IS NOT NULL, disabled, created_ns FROM principals";

fn principal(r: &PgRow) -> Principal {
    let role: String = r.get(1);
    Principal {
        name: r.get(0),
        role: Role::parse(&role).unwrap_or(Role::Auditor),
        cert_name: r.get(2),
        has_token: r.get(3),
        disabled: r.get(4),
        created_ns: r.get(5),
    }
}

/// Owned parameter values, bound by reference.
fn boxed(params: Vec<Param>) -> Vec<Box<dyn ToSql + Sync>> {
    params
        .into_iter()
        .map(|p| -> Box<dyn ToSql + Sync> {
            match p {
                Param::Int(i) => Box::new(i),
                Param::Text(t) => Box::new(t),
            }
        })
        .collect()
}

fn refs(params: &[Box<dyn ToSql + Sync>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|b| b.as_ref()).collect()
}

fn upsert_sessions(tx: &mut Transaction<'_>, deltas: &SessionDeltas) -> Result<(), StoreError> {
    if deltas.sessions.is_empty() {
        return Ok(());
    }
    let up = tx.prepare(
        "INSERT INTO sessions (session, host_id, boot_id, audit_session, kind, user_name,
            source_address, source_port, tty, login_ns, first_ns, last_ns, first_seq, last_seq,
            records, phi_accesses, denied, execs)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
         ON CONFLICT (session) DO UPDATE SET
            kind = CASE WHEN sessions.kind = '' THEN excluded.kind ELSE sessions.kind END,
            user_name = CASE WHEN sessions.user_name = '' THEN excluded.user_name
                        ELSE sessions.user_name END,
            source_address = CASE WHEN sessions.source_address = ''
                             THEN excluded.source_address ELSE sessions.source_address END,
            source_port = CASE WHEN sessions.source_port = 0 THEN excluded.source_port
                          ELSE sessions.source_port END,
            tty = CASE WHEN sessions.tty = '' THEN excluded.tty ELSE sessions.tty END,
            login_ns = CASE WHEN sessions.login_ns = 0 THEN excluded.login_ns
                       ELSE sessions.login_ns END,
            first_ns = LEAST(sessions.first_ns, excluded.first_ns),
            last_ns = GREATEST(sessions.last_ns, excluded.last_ns),
            first_seq = LEAST(sessions.first_seq, excluded.first_seq),
            last_seq = GREATEST(sessions.last_seq, excluded.last_seq),
            records = sessions.records + excluded.records,
            phi_accesses = sessions.phi_accesses + excluded.phi_accesses,
            denied = sessions.denied + excluded.denied,
            execs = sessions.execs + excluded.execs",
    )?;
    for s in deltas.sessions.values() {
        tx.execute(
            &up,
            &[
                &s.session,
                &s.host_id,
                &s.boot_id,
                &i64::from(s.audit_session),
                &s.kind,
                &s.user,
                &s.source_address,
                &i64::from(s.source_port),
                &s.tty,
                &s.login_ns,
                &s.first_ns,
                &s.last_ns,
                &(s.first_seq as i64),
                &(s.last_seq as i64),
                &(s.records as i64),
                &(s.phi_accesses as i64),
                &(s.denied as i64),
                &(s.execs as i64),
            ],
        )?;
    }
    Ok(())
}

/// Inserts an alert; call it inside a transaction (the lock lasts until its end).
fn insert_alert(c: &mut impl GenericClient, a: &Alert) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&ALERT_LOCK])?;
    c.execute(
        "INSERT INTO alerts (time_ns, host_id, kind, seq, detail, evidence)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        &[
            &now_ns(),
            &a.host_id,
            &a.kind,
            &a.seq.map(|s| s as i64),
            &a.detail,
            &a.evidence,
        ],
    )?;
    Ok(())
}

impl PgStore {
    /// Connects to `postgres://…` and migrates the schema (one collector at a time).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = super::display_url(url);
        let mut config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Postgres(format!(
                "{shown} is not a PostgreSQL URL ({e}); the form is postgres://USER@HOST[:PORT]/DB"
            ))
        })?;
        // The password stays out of URLs and config files: PGPASSWORD as libpq does.
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        let client = config.connect(NoTls).map_err(|e| {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            let hint = if why.contains("password") {
                " (give the password in the environment variable PGPASSWORD)"
            } else {
                ""
            };
            StoreError::Postgres(format!("cannot connect to {shown}: {why}{hint}"))
        })?;
        let mut store = PgStore { client, shown };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
        let version: i64 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Schema {
                path: self.shown.clone(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&(i as i64 + 1)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The schema version of the database.
    pub fn schema_version(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client
            .query_one("SELECT MAX(version) FROM schema_version", &[])?
            .get(0))
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn host(&mut self, host_id: &str) -> Result<Option<HostState>, StoreError> {
        Ok(self
            .client
            .query_opt(HOST_STATE, &[&host_id])?
            .as_ref()
            .map(host_state))
    }

    fn pin_host(&mut self, host_id: &str, public_key: &[u8]) -> Result<HostState, StoreError> {
        self.client.execute(
            "INSERT INTO hosts (host_id, public_key, first_seen_ns, head_hash)
             VALUES ($1, $2, $3, $4) ON CONFLICT (host_id) DO NOTHING",
            &[
                &host_id,
                &public_key,
                &now_ns(),
                &Head::EMPTY.hash.as_slice(),
            ],
        )?;
        Ok(host_state(&self.client.query_one(HOST_STATE, &[&host_id])?))
    }

    fn seen(&mut self, host_id: &str, agent_version: &str) -> Result<(), StoreError> {
        self.client.execute(
            "UPDATE hosts SET last_seen_ns = $2, agent_version = $3 WHERE host_id = $1",
            &[&host_id, &now_ns(), &agent_version],
        )?;
        Ok(())
    }

    fn append_prepared(&mut self, host_id: &str, batch: Prepared) -> Result<Appended, StoreError> {
        let mut tx = self.client.transaction()?;
        // The row lock serializes every collector appending to this host.
        let state = tx
            .query_opt(&format!("{HOST_STATE} FOR UPDATE"), &[&host_id])?
            .as_ref()
            .map(host_state)
            .ok_or_else(|| StoreError::Invalid(format!("host {host_id:?} is not pinned")))?;
        let verified = {
            let hash = tx.prepare("SELECT hash FROM records WHERE host_id = $1 AND seq = $2")?;
            let mut failed = None;
            let v = verify_prepared(host_id, &state, batch, |seq| {
                match tx.query_opt(&hash, &[&host_id, &(seq as i64)]) {
                    Ok(r) => r.map(|r| r.get(0)),
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e.into());
            }
            v
        };
        // One statement per batch, the rows as arrays: one round trip instead of one per
        // record (which bounded ingest to a few thousand records per second).
        let n = verified.records.len();
        let mut seqs = Vec::with_capacity(n);
        let mut hashes = Vec::with_capacity(n);
        let mut prev_hashes = Vec::with_capacity(n);
        let mut bodies = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut uids = Vec::with_capacity(n);
        let mut users = Vec::with_capacity(n);
        let mut login_users = Vec::with_capacity(n);
        let mut sessions = Vec::with_capacity(n);
        let mut paths = Vec::with_capacity(n);
        let mut deltas = SessionDeltas::default();
        let mut last_ns = 0;
        for a in &verified.records {
            let c = &a.columns;
            deltas.add(a.sealed.seq, &a.record, c);
            last_ns = last_ns.max(c.time_ns);
            seqs.push(a.sealed.seq as i64);
            hashes.push(a.sealed.hash.as_slice());
            prev_hashes.push(a.record.prev_hash.as_slice());
            bodies.push(a.sealed.body.as_slice());
            times.push(c.time_ns);
            kinds.push(c.kind);
            uids.push(c.uid);
            users.push(c.user.as_deref());
            login_users.push(c.login_user.as_deref());
            sessions.push(c.session.as_deref());
            paths.push(c.path.as_deref());
        }
        if n > 0 {
            tx.execute(
                "INSERT INTO records (host_id, seq, hash, prev_hash, body, time_ns, kind, uid,
                    user_name, login_user, session, path)
                 SELECT $1::TEXT, * FROM unnest($2::BIGINT[], $3::BYTEA[], $4::BYTEA[], $5::BYTEA[],
                    $6::BIGINT[], $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::TEXT[], $11::TEXT[],
                    $12::TEXT[])",
                &[
                    &host_id,
                    &seqs,
                    &hashes,
                    &prev_hashes,
                    &bodies,
                    &times,
                    &kinds,
                    &uids,
                    &users,
                    &login_users,
                    &sessions,
                    &paths,
                ],
            )?;
        }
        upsert_sessions(&mut tx, &deltas)?;
        for c in &verified.checkpoints {
            tx.execute(
                "INSERT INTO checkpoints (host_id, seq, body, time_ns) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[
                    &host_id,
                    &(c.seq as i64),
                    &c.encode_to_vec(),
                    &checkpoint_time_ns(c),
                ],
            )?;
        }
        if let Some(last) = verified.checkpoints.last() {
            tx.execute(
                "UPDATE hosts SET checkpoint_seq = $2, checkpoint_sig = $3,
                    checkpoint_time_ns = $4 WHERE host_id = $1",
                &[
                    &host_id,
                    &(last.seq as i64),
                    &last.signature,
                    &checkpoint_time_ns(last),
                ],
            )?;
        }
        tx.execute(
            "UPDATE hosts SET head_seq = $2, head_hash = $3,
                last_record_ns = GREATEST(last_record_ns, $4) WHERE host_id = $1",
            &[
                &host_id,
                &(verified.head.seq as i64),
                &verified.head.hash.as_slice(),
                &last_ns,
            ],
        )?;
        if let Some(a) = &verified.problem {
            insert_alert(&mut tx, a)?;
        }
        tx.commit()?;
        Ok(Appended {
            head: verified.head,
            records: verified.records.len(),
            checkpoints: verified.checkpoints.len(),
            problem: verified.problem,
            spent: Spent(verified.records),
        })
    }

    fn alert(&mut self, alert: &Alert) -> Result<(), StoreError> {
        let mut tx = self.client.transaction()?;
        insert_alert(&mut tx, alert)?;
        tx.commit()?;
        Ok(())
    }

    fn hosts(&mut self) -> Result<Vec<HostInfo>, StoreError> {
        Ok(self
            .client
            .query(&format!("{HOST_INFO} ORDER BY h.host_id"), &[])?
            .iter()
            .map(host_info)
            .collect())
    }

    fn host_info(&mut self, host_id: &str) -> Result<Option<HostInfo>, StoreError> {
        Ok(self
            .client
            .query_opt(&format!("{HOST_INFO} WHERE h.host_id = $1"), &[&host_id])?
            .as_ref()
            .map(host_info))
    }

    fn chain(
        &mut self,
        host_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT host_id, seq, hash, body, time_ns, session FROM records
                 WHERE host_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&host_id, &(after_seq as i64), &(limit.max(1) as i64)],
            )?
            .iter()
            .map(row)
            .collect())
    }

    fn checkpoints(
        &mut self,
        host_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        Ok(self
            .client
            .query(
                "SELECT seq, body FROM checkpoints WHERE host_id = $1 AND seq >= $2 AND seq <= $3
                 ORDER BY seq",
                &[&host_id, &(from as i64), &to],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
    }

    fn seq_range(
        &mut self,
        host_id: &str,
        since_ns: i64,
        until_ns: i64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let r = self.client.query_one(
            "SELECT MIN(seq), MAX(seq) FROM records
             WHERE host_id = $1 AND time_ns >= $2 AND time_ns < $3",
            &[&host_id, &since_ns, &until_ns],
        )?;
        let (lo, hi): (Option<i64>, Option<i64>) = (r.get(0), r.get(1));
        Ok(lo.zip(hi).map(|(l, h)| (l as u64, h as u64)))
    }

    fn checkpoint_near(
        &mut self,
        host_id: &str,
        seq: u64,
        above: bool,
    ) -> Result<Option<u64>, StoreError> {
        let sql = if above {
            "SELECT MIN(seq) FROM checkpoints WHERE host_id = $1 AND seq >= $2"
        } else {
            "SELECT MAX(seq) FROM checkpoints WHERE host_id = $1 AND seq < $2"
        };
        let found: Option<i64> = self
            .client
            .query_one(sql, &[&host_id, &(seq as i64)])?
            .get(0);
        Ok(found.map(|s| s as u64))
    }

    fn timeline(
        &mut self,
        filter: &Filter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let (sql, params) = query::timeline(filter, after, limit);
        let params = boxed(params);
        Ok(self
            .client
            .query(&numbered(&sql), &refs(&params))?
            .iter()
            .map(row)
            .collect())
    }

    fn sessions(&mut self, filter: &SessionFilter) -> Result<Vec<Session>, StoreError> {
        let (sql, params) = query::sessions(filter);
        let params = boxed(params);
        Ok(self
            .client
            .query(&numbered(&sql), &refs(&params))?
            .iter()
            .map(session)
            .collect())
    }

    fn session(&mut self, key: &str) -> Result<Option<Session>, StoreError> {
        Ok(self
            .client
            .query_opt(
                &format!(
                    "SELECT {} FROM sessions WHERE session = $1",
                    query::SESSION_COLUMNS
                ),
                &[&key],
            )?
            .as_ref()
            .map(session))
    }

    fn alerts(&mut self, host_id: Option<&str>) -> Result<Vec<StoredAlert>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT id, time_ns, host_id, kind, seq, detail, evidence FROM alerts
                 WHERE $1::TEXT IS NULL OR host_id = $1 ORDER BY id",
                &[&host_id],
            )?
            .iter()
            .map(stored_alert)
            .collect())
    }

    fn heads(&mut self) -> Result<Vec<HostHead>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT host_id, head_seq, anchor_seq, last_seen_ns, last_record_ns FROM hosts
                 ORDER BY host_id",
                &[],
            )?
            .iter()
            .map(|r| HostHead {
                host_id: r.get(0),
                head_seq: r.get::<_, i64>(1) as u64,
                anchor_seq: r.get::<_, i64>(2) as u64,
                last_seen_ns: r.get(3),
                last_record_ns: r.get(4),
            })
            .collect())
    }

    fn alerts_after(
        &mut self,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT id, time_ns, host_id, kind, seq, detail, evidence FROM alerts
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&(after_id as i64), &(limit.max(1) as i64)],
            )?
            .iter()
            .map(stored_alert)
            .collect())
    }

    fn cursors(&mut self, consumer: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT stream, position FROM consumer_cursors WHERE consumer = $1
                 ORDER BY stream",
                &[&consumer],
            )?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn set_cursor(
        &mut self,
        consumer: &str,
        stream: &str,
        position: u64,
    ) -> Result<(), StoreError> {
        self.client.execute(
            "INSERT INTO consumer_cursors (consumer, stream, position, updated_ns)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, stream) DO UPDATE SET
                position = GREATEST(consumer_cursors.position, excluded.position),
                updated_ns = excluded.updated_ns",
            &[&consumer, &stream, &(position as i64), &now_ns()],
        )?;
        Ok(())
    }

    fn log_access(&mut self, entry: AccessEntry) -> Result<AccessEntry, StoreError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ACCESS_LOG_LOCK])?;
        let (seq, hash): (i64, Vec<u8>) = tx
            .query_opt(
                "SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1",
                &[],
            )?
            .map_or((0, Vec::new()), |r| (r.get(0), r.get(1)));
        let (sealed, body) = seal_access(entry, seq as u64, &hash);
        let time_ns = sealed.time.as_ref().map_or(0, |t| {
            t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
        });
        tx.execute(
            "INSERT INTO access_log (seq, time_ns, principal, action, outcome, body, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &(sealed.seq as i64),
                &time_ns,
                &sealed.principal,
                &sealed.action,
                &sealed.outcome,
                &body,
                &sealed.hash,
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
        Ok(self
            .client
            .query(
                "SELECT seq, body, hash FROM access_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&(after as i64), &(limit.max(1) as i64)],
            )?
            .iter()
            .map(|r| {
                let body: Vec<u8> = r.get(1);
                let mut entry = AccessEntry::decode(body.as_slice()).unwrap_or_default();
                entry.seq = r.get::<_, i64>(0) as u64;
                entry.hash = r.get(2);
                (entry, body)
            })
            .collect())
    }

    fn add_principal(
        &mut self,
        name: &str,
        role: Role,
        cert_name: Option<&str>,
        token_hash: Option<&[u8]>,
    ) -> Result<Principal, StoreError> {
        let result = self.client.execute(
            "INSERT INTO principals (name, role, cert_name, token_hash, created_ns)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role,
                cert_name = COALESCE(excluded.cert_name, principals.cert_name),
                token_hash = COALESCE(excluded.token_hash, principals.token_hash),
                disabled = FALSE",
            &[&name, &role.as_str(), &cert_name, &token_hash, &now_ns()],
        );
        if let Err(e) = &result
            && e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
        {
            return Err(StoreError::Invalid(format!(
                "certificate name {:?} already belongs to another principal",
                cert_name.unwrap_or_default()
            )));
        }
        result?;
        Ok(principal(&self.client.query_one(
            &format!("{PRINCIPAL} WHERE name = $1"),
            &[&name],
        )?))
    }

    fn principals(&mut self) -> Result<Vec<Principal>, StoreError> {
        Ok(self
            .client
            .query(&format!("{PRINCIPAL} ORDER BY name"), &[])?
            .iter()
            .map(principal)
            .collect())
    }

    fn principal_by_token(&mut self, token_hash: &[u8]) -> Result<Option<Principal>, StoreError> {
        Ok(self
            .client
            .query_opt(
                &format!("{PRINCIPAL} WHERE token_hash = $1"),
                &[&token_hash],
            )?
            .as_ref()
            .map(principal))
    }

    fn principal_by_cert(&mut self, names: &[String]) -> Result<Option<Principal>, StoreError> {
        for n in names {
            if let Some(r) = self
                .client
                .query_opt(&format!("{PRINCIPAL} WHERE cert_name = $1"), &[n])?
            {
                return Ok(Some(principal(&r)));
            }
        }
        Ok(None)
    }

    fn disable_principal(&mut self, name: &str) -> Result<Option<Principal>, StoreError> {
        self.client.execute(
            "UPDATE principals SET disabled = TRUE, token_hash = NULL WHERE name = $1",
            &[&name],
        )?;
        Ok(self
            .client
            .query_opt(&format!("{PRINCIPAL} WHERE name = $1"), &[&name])?
            .as_ref()
            .map(principal))
    }

    fn set_hold(&mut self, host_id: &str, hold: Option<&Hold>) -> Result<bool, StoreError> {
        if self.host_info(host_id)?.is_none() {
            return Ok(false);
        }
        match hold {
            Some(h) => self.client.execute(
                "INSERT INTO holds (host_id, reason, set_by, since_ns) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (host_id) DO UPDATE SET reason = excluded.reason,
                    set_by = excluded.set_by, since_ns = excluded.since_ns",
                &[&host_id, &h.reason, &h.set_by, &h.since_ns],
            )?,
            None => self
                .client
                .execute("DELETE FROM holds WHERE host_id = $1", &[&host_id])?,
        };
        Ok(true)
    }

    fn prune(
        &mut self,
        host_id: &str,
        anchor_seq: u64,
        by: &str,
    ) -> Result<PruneOutcome, StoreError> {
        let mut tx = self.client.transaction()?;
        let mut out = PruneOutcome {
            host_id: host_id.to_owned(),
            through_seq: 0,
            records: 0,
            skipped: None,
        };
        let current: i64 = tx
            .query_one(
                "SELECT anchor_seq FROM hosts WHERE host_id = $1 FOR UPDATE",
                &[&host_id],
            )?
            .get(0);
        if tx
            .query_opt("SELECT 1 FROM holds WHERE host_id = $1", &[&host_id])?
            .is_some()
        {
            out.skipped = Some("legal hold".into());
            return Ok(out);
        }
        let anchor = anchor_seq as i64;
        let has_checkpoint = tx
            .query_opt(
                "SELECT 1 FROM checkpoints WHERE host_id = $1 AND seq = $2",
                &[&host_id, &anchor],
            )?
            .is_some();
        if anchor <= current || !has_checkpoint {
            out.skipped = Some("nothing older than the retention period".into());
            return Ok(out);
        }
        let records = tx.execute(
            "DELETE FROM records WHERE host_id = $1 AND seq <= $2",
            &[&host_id, &anchor],
        )?;
        tx.execute(
            "DELETE FROM checkpoints WHERE host_id = $1 AND seq < $2",
            &[&host_id, &anchor],
        )?;
        tx.execute(
            "DELETE FROM sessions WHERE host_id = $1 AND last_seq <= $2",
            &[&host_id, &anchor],
        )?;
        tx.execute(
            "UPDATE hosts SET anchor_seq = $2 WHERE host_id = $1",
            &[&host_id, &anchor],
        )?;
        tx.execute(
            "INSERT INTO prunes (host_id, time_ns, through_seq, records, pruned_by)
             VALUES ($1, $2, $3, $4, $5)",
            &[&host_id, &now_ns(), &anchor, &(records as i64), &by],
        )?;
        tx.commit()?;
        out.through_seq = anchor_seq;
        out.records = records;
        Ok(out)
    }

    fn checkpoint_before(
        &mut self,
        host_id: &str,
        cutoff_ns: i64,
    ) -> Result<Option<(u64, i64)>, StoreError> {
        Ok(self
            .client
            .query_opt(
                "SELECT seq, time_ns FROM checkpoints WHERE host_id = $1 AND time_ns < $2
                 ORDER BY seq DESC LIMIT 1",
                &[&host_id, &cutoff_ns],
            )?
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .client
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])?
            .map(|r| r.get(0)))
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.client.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }
}
