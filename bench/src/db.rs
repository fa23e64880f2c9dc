//! The store a benchmark runs on: `sqlite:PATH`, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
//! (the password may also come from `PGPASSWORD`), or `postgres:temp`, a throwaway local
//! PostgreSQL cluster for the run (the integration tests' harness: needs root, installs the
//! Debian package `postgresql` when missing).
//!
//! Benchmarks need fresh stores, so they empty the one they are given, but only a store that
//! is empty or holds nothing but benchmark hosts (`bench-NNN`): a store with any other host,
//! or a database with tables but no phi-audit store, is refused untouched.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use phi_collector::store::{self, Store};

use crate::synth::is_bench_host;

enum Kind {
    Sqlite(PathBuf),
    Postgres,
}

pub struct Db {
    /// The URL as the store opens it (a PostgreSQL URL may carry the password).
    url: String,
    kind: Kind,
    /// Keeps a `postgres:temp` cluster running.
    cluster: Option<integration_tests::postgres::Postgres>,
}

impl Db {
    pub fn parse(url: &str) -> anyhow::Result<Db> {
        if url == "postgres:temp" {
            eprintln!("starting a temporary PostgreSQL cluster");
            let cluster = integration_tests::postgres::Postgres::start();
            let url = cluster.database("phi_bench");
            return Ok(Db {
                url,
                kind: Kind::Postgres,
                cluster: Some(cluster),
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Db {
                url: url.to_owned(),
                kind: Kind::Postgres,
                cluster: None,
            });
        }
        let Some(path) = url.strip_prefix("sqlite:").filter(|p| !p.is_empty()) else {
            bail!("--db {url:?}: use sqlite:PATH, postgres://USER@HOST:PORT/DB or postgres:temp");
        };
        Ok(Db {
            url: url.to_owned(),
            kind: Kind::Sqlite(PathBuf::from(path)),
            cluster: None,
        })
    }

    /// "sqlite" or "postgres".
    pub fn backend(&self) -> &'static str {
        match self.kind {
            Kind::Sqlite(_) => "sqlite",
            Kind::Postgres => "postgres",
        }
    }

    /// The URL to open (with any password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without credentials, for reports (`postgres:temp` for a throwaway cluster,
    /// whose port changes from run to run).
    pub fn shown(&self) -> String {
        if self.cluster.is_some() {
            "postgres:temp".to_owned()
        } else {
            store::display_url(&self.url)
        }
    }

    /// The URL without the password, and the password (for `PGPASSWORD` of a child process).
    pub fn split_password(&self) -> (String, Option<String>) {
        integration_tests::postgres::split_password(&self.url)
    }

    pub fn open(&self) -> anyhow::Result<Box<dyn Store>> {
        store::open(&self.url).with_context(|| format!("opening {}", self.shown()))
    }

    fn pg(&self) -> anyhow::Result<postgres::Client> {
        let mut config: postgres::Config = self.url.parse().context("PostgreSQL URL")?;
        if config.get_password().is_none()
            && let Ok(p) = std::env::var("PGPASSWORD")
        {
            config.password(p);
        }
        config
            .connect(postgres::NoTls)
            .with_context(|| format!("connecting to {}", self.shown()))
    }

    /// Fails unless the store is empty or holds only benchmark hosts.
    fn check_disposable(&self) -> anyhow::Result<()> {
        let hosts: Vec<String> = match &self.kind {
            Kind::Sqlite(path) => {
                if !path.exists() || std::fs::metadata(path)?.len() == 0 {
                    return Ok(());
                }
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .with_context(|| format!("opening {}", path.display()))?;
                let has_hosts: bool = conn
                    .query_row(
                        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'hosts'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .with_context(|| format!("{} is not a SQLite database", path.display()))?
                    > 0;
                let tables: i64 = conn.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                    [],
                    |r| r.get(0),
                )?;
                if !has_hosts && tables > 0 {
                    bail!(
                        "{} holds tables but is not a phi-audit store: refusing to overwrite it",
                        path.display()
                    );
                }
                if !has_hosts {
                    return Ok(());
                }
                let mut stmt = conn.prepare("SELECT host_id FROM hosts")?;
                stmt.query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            }
            Kind::Postgres => {
                let mut c = self.pg()?;
                let exists: bool = c
                    .query_one("SELECT to_regclass('public.hosts') IS NOT NULL", &[])?
                    .get(0);
                let tables: i64 = c
                    .query_one(
                        "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'",
                        &[],
                    )?
                    .get(0);
                if !exists && tables > 0 {
                    bail!(
                        "{} holds tables but is not a phi-audit store: refusing to empty it",
                        self.shown()
                    );
                }
                if !exists {
                    return Ok(());
                }
                c.query("SELECT host_id FROM hosts", &[])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            }
        };
        if let Some(other) = hosts.iter().find(|h| !is_bench_host(h)) {
            bail!(
                "{} holds host {other:?}, which no benchmark made: refusing to empty it (give \
                 the benchmark a store of its own)",
                self.shown()
            );
        }
        Ok(())
    }

    /// Empties the store (see the module doc for when it refuses).
    pub fn wipe(&self) -> anyhow::Result<()> {
        self.check_disposable()?;
        match &self.kind {
            Kind::Sqlite(path) => {
                for p in sqlite_files(path) {
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("removing {}", p.display()));
                        }
                    }
                }
            }
            Kind::Postgres => {
                let mut c = self.pg()?;
                let tables: Vec<String> = c
                    .query(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                        &[],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if !tables.is_empty() {
                    let list = tables
                        .iter()
                        .map(|t| format!("public.\"{}\"", t.replace('"', "\"\"")))
                        .collect::<Vec<_>>()
                        .join(", ");
                    c.batch_execute(&format!("DROP TABLE {list} CASCADE"))?;
                }
            }
        }
        Ok(())
    }

    /// Bytes the store occupies: the SQLite file and its write-ahead log; for PostgreSQL the
    /// tables with their indexes and TOAST data.
    pub fn size_bytes(&self) -> anyhow::Result<u64> {
        match &self.kind {
            Kind::Sqlite(path) => Ok(sqlite_files(path)
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()),
            Kind::Postgres => {
                let mut c = self.pg()?;
                let n: i64 = c
                    .query_one(
                        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = 'public' AND c.relkind = 'r'",
                        &[],
                    )?
                    .get(0);
                Ok(n as u64)
            }
        }
    }

    /// PostgreSQL: refreshes the planner's statistics (what autovacuum does after a large
    /// load). SQLite: nothing (the collector never runs ANALYZE, so neither does the bench).
    pub fn analyze(&self) -> anyhow::Result<()> {
        if let Kind::Postgres = self.kind {
            self.pg()?.batch_execute("ANALYZE")?;
        }
        Ok(())
    }

    /// The database engine's version.
    pub fn engine_version(&self) -> String {
        match &self.kind {
            Kind::Sqlite(_) => rusqlite::version().to_owned(),
            Kind::Postgres => self
                .pg()
                .and_then(|mut c| Ok(c.query_one("SHOW server_version", &[])?.get(0)))
                .unwrap_or_else(|e| format!("unknown ({e})")),
        }
    }

    /// The SQLite file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Sqlite(p) => Some(p),
            Kind::Postgres => None,
        }
    }
}

fn sqlite_files(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_owned()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        out.push(PathBuf::from(p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_empty_a_store_with_real_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("s.db").display());
        let db = Db::parse(&url).expect("parse");
        db.wipe().expect("a missing file is fine");
        let mut s = db.open().expect("open");
        s.pin_host("bench-001", &[1; 32]).expect("pin");
        drop(s);
        db.wipe().expect("benchmark hosts only");
        let mut s = db.open().expect("open");
        s.pin_host("db1", &[1; 32]).expect("pin");
        drop(s);
        let err = db.wipe().expect_err("refused");
        assert!(err.to_string().contains("db1"), "{err}");
        assert!(Db::parse("mysql://x").is_err());
    }
}
