//! A real PostgreSQL server for one test: a fresh cluster in a temporary directory, owned by
//! the `postgres` user, listening on a free loopback port, stopped when dropped. The Debian
//! package `postgresql` is installed when missing (`cargo xtask setup` installs it too).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn ensure_installed() -> PathBuf {
    if let Some(b) = bin_dir() {
        return b;
    }
    crate::apt_install(&["postgresql"]);
    bin_dir().expect("postgresql installed but no /usr/lib/postgresql/<major>/bin/initdb")
}

/// The superuser's password in every test cluster.
pub const PASSWORD: &str = "phi-test-secret";

pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

impl Postgres {
    /// Creates and starts a cluster on 127.0.0.1 that asks for a password over TCP
    /// (SCRAM-SHA-256; user `postgres`, password [`PASSWORD`]), as production servers do.
    pub fn start() -> Postgres {
        let bin = ensure_installed();
        let dir = tempfile::Builder::new()
            .prefix("phi-pg-")
            .tempdir()
            .expect("pg dir");
        crate::set_mode(dir.path(), 0o755);
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).expect("socket dir");
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path()));
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{PASSWORD}\n")).expect("password file");
        run(Command::new("chown").arg("postgres:postgres").arg(&pwfile));
        run(as_postgres(&bin, "initdb")
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data));
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let pg = Postgres {
            bin,
            data,
            port,
            _dir: dir,
        };
        run(as_postgres(&pg.bin, "pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .arg("-l")
            .arg(pg.data.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
                sock.display()
            ))
            .args(["-w", "-t", "60", "start"]));
        crate::wait_listening("PostgreSQL", &[port], Duration::from_secs(30), String::new);
        pg
    }

    /// Runs `sql` as the superuser on the `postgres` database.
    fn admin(&self, sql: &str) {
        let admin = self.url("postgres");
        let mut client =
            postgres::Client::connect(&admin, postgres::NoTls).expect("connect as postgres");
        client
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The URL of database `name` (with the password: see [`split_password`]).
    fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// A new, empty database; its URL (with the password: see [`split_password`]).
    pub fn database(&self, name: &str) -> String {
        self.admin(&format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// A copy of database `from` (which must have no connections) as `to`; its URL.
    pub fn copy_database(&self, from: &str, to: &str) -> String {
        self.admin(&format!("CREATE DATABASE \"{to}\" TEMPLATE \"{from}\""));
        self.url(to)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Splits `postgres://user:password@host/db` into the URL without the password and the
/// password, which child processes get as `PGPASSWORD` (the way operators keep it out of
/// command lines and config files).
pub fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return (url.to_owned(), None);
    };
    match userinfo.split_once(':') {
        Some((user, password)) => (
            format!("{scheme}://{user}@{host}"),
            Some(password.to_owned()),
        ),
        None => (url.to_owned(), None),
    }
}
