//! A real `phi-collector` process with real TLS: certificates from `phictl certs init`, a
//! SQLite database the tests read directly, stop and restart.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::free_ports;
use phi_chain::seal::{Head, check_link, head_of};
use phi_proto::v1::{Record, SealedRecord};
use prost::Message as _;

fn bin(var: &str, what: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => {
            panic!("{var} is not set: run the privileged tests with `cargo xtask test` ({what})")
        }
    }
}

pub fn collector_bin() -> PathBuf {
    bin("PHI_COLLECTOR_BIN", "phi-collector")
}

pub fn phictl_bin() -> PathBuf {
    bin("PHICTL_BIN", "phictl")
}

/// Certificates for a collector and some hosts.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new(hosts: &[&str]) -> Pki {
        let dir = tempfile::tempdir().expect("pki dir");
        let mut cmd = Command::new(phictl_bin());
        cmd.args(["certs", "init", "--dir"]).arg(dir.path());
        for h in hosts {
            cmd.args(["--host", h]);
        }
        let out = cmd.output().expect("run phictl");
        assert!(
            out.status.success(),
            "phictl certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Agent arguments to stream as `host` with `cert_host`'s certificate.
    pub fn agent_args(&self, url: &str, host: &str, cert_host: &str) -> Vec<OsString> {
        vec![
            "--collector".into(),
            url.into(),
            "--tls-ca".into(),
            self.path("ca.pem").into(),
            "--tls-cert".into(),
            self.path(&format!("{cert_host}.pem")).into(),
            "--tls-key".into(),
            self.path(&format!("{cert_host}.key")).into(),
            "--host-id".into(),
            host.into(),
        ]
    }
}

/// A stored record as the tests see it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub sealed: SealedRecord,
    pub record: Record,
}

pub struct Collector {
    child: Option<Child>,
    extra: Vec<String>,
    pub port: u16,
    pub api_port: u16,
    /// Plain-HTTP health and metrics.
    pub metrics_port: u16,
    /// The store: `sqlite:PATH` or a PostgreSQL URL.
    pub db: String,
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Collector {
    pub fn start(pki: &Pki) -> Collector {
        Self::start_with(pki, &[])
    }

    /// Starts with extra `serve` arguments (limits).
    pub fn start_with(pki: &Pki, extra: &[&str]) -> Collector {
        Self::start_on(pki, None, extra)
    }

    /// Starts on the given store (`None`: a new SQLite file).
    pub fn start_on(pki: &Pki, db: Option<&str>, extra: &[&str]) -> Collector {
        let dir = tempfile::tempdir().expect("collector dir");
        let db = db.map_or_else(
            || format!("sqlite:{}", dir.path().join("collector.db").display()),
            str::to_owned,
        );
        let [port, api_port, metrics_port] = free_ports();
        let mut c = Collector {
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            port,
            api_port,
            metrics_port,
            db,
            dir,
            ca: pki.path("ca.pem"),
            cert: pki.path("collector.pem"),
            key: pki.path("collector.key"),
        };
        c.restart();
        c
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The query API (gRPC and HTTP/JSON).
    pub fn api_url(&self) -> String {
        format!("https://localhost:{}", self.api_port)
    }

    /// Starts the process (again) on the same port and database.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("collector.log"))
            .expect("log");
        let (db, password) = crate::postgres::split_password(&self.db);
        let mut cmd = Command::new(collector_bin());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        let child = cmd
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{}", self.api_port))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--db")
            .arg(&db)
            .arg("--tls-cert")
            .arg(&self.cert)
            .arg("--tls-key")
            .arg(&self.key)
            .arg("--client-ca")
            .arg(&self.ca)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start phi-collector");
        self.child = Some(child);
        crate::wait_listening(
            "the collector",
            &[self.port, self.api_port],
            Duration::from_secs(20),
            || self.log(),
        );
    }

    /// Stops the process (SIGTERM) and waits for it. A collector must stop promptly even
    /// with agents connected (it ends their streams): one still running a minute after
    /// SIGTERM fails the test.
    pub fn stop(&mut self) {
        const GRACE: Duration = Duration::from_secs(60);
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + GRACE;
            while child.try_wait().expect("wait for phi-collector").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "phi-collector was still running {GRACE:?} after SIGTERM; its log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("collector.log")).unwrap_or_default()
    }

    /// The store, opened directly (as phictl --db would).
    pub fn store(&self) -> Box<dyn phi_collector::store::Store> {
        phi_collector::store::open(&self.db).expect("open the collector's store")
    }

    /// Every stored record of `host`, in seq order.
    pub fn records(&self, host: &str) -> Vec<Stored> {
        let mut store = self.store();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let rows = store.chain(host, after, 10_000).expect("read the chain");
            let Some(last) = rows.last() else { break };
            after = last.seq;
            for row in rows {
                out.push(Stored {
                    record: Record::decode(row.body.as_slice()).expect("stored body decodes"),
                    sealed: SealedRecord {
                        seq: row.seq,
                        body: row.body,
                        hash: row.hash,
                    },
                });
            }
        }
        out
    }

    /// Tamper alerts: (kind, detail).
    pub fn alerts(&self) -> Vec<(String, String)> {
        self.store()
            .alerts(None)
            .expect("alerts")
            .into_iter()
            .map(|a| (a.alert.kind, a.alert.detail))
            .collect()
    }

    /// Checkpoints stored for `host` (count).
    pub fn checkpoints(&self, host: &str) -> usize {
        self.store()
            .checkpoints(host, 0, u64::MAX)
            .expect("checkpoints")
            .len()
    }

    /// Runs phictl on this collector's store directly (`--db`).
    pub fn phictl_db(&self, args: &[&str]) -> Phictl {
        let (db, password) = crate::postgres::split_password(&self.db);
        let mut cmd = Command::new(phictl_bin());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        Phictl::run(cmd.args(["--db", &db]).args(args))
    }

    /// Runs phictl against this collector's API with a token.
    pub fn phictl_api(&self, pki: &Pki, token: &str, args: &[&str]) -> Phictl {
        Phictl::run(
            Command::new(phictl_bin())
                .args(["--collector", &self.api_url(), "--ca"])
                .arg(pki.path("ca.pem"))
                .args(["--token", token])
                .args(args),
        )
    }

    /// A new principal with a token (made on the store directly, as an operator would).
    pub fn token_for(&self, name: &str, role: &str) -> String {
        let out = self.phictl_db(&["principals", "add", name, "--role", role, "--issue-token"]);
        assert!(out.ok(), "{}", out.text());
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("token (shown once; keep it secret): "))
            .expect("a token")
            .to_owned()
    }

    /// Replaces the extra `serve` arguments for the next (re)start.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Waits until `done` holds for the collector.
    pub fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Collector) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- collector log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the stored records of `host` satisfy `done`.
    pub fn wait_for(
        &self,
        host: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Stored]) -> bool,
    ) -> Vec<Stored> {
        let deadline = Instant::now() + timeout;
        loop {
            let recs = self.records(host);
            if done(&recs) {
                return recs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: {} records stored\n--- collector log ---\n{}",
                    recs.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The result of one phictl run.
#[derive(Debug)]
pub struct Phictl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Phictl {
    pub fn run(cmd: &mut Command) -> Phictl {
        let out = cmd.output().expect("run phictl");
        Phictl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// Everything it printed, for assertion messages.
    pub fn text(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Checks that `records` form one chain from seq 1: consecutive, every link verified.
pub fn verify_chain(records: &[Stored]) -> Result<(), String> {
    let mut head = Head::EMPTY;
    for s in records {
        check_link(head, &s.sealed).map_err(|e| e.to_string())?;
        head = head_of(&s.sealed);
    }
    Ok(())
}

/// The path of an open record, if it is one.
pub fn open_path(r: &Record) -> Option<&str> {
    match &r.event {
        Some(phi_proto::v1::record::Event::Open(o)) => Some(o.path.as_str()),
        _ => None,
    }
}

/// True for open records of `path`'s directory by process `pid`.
pub fn opened_by(r: &Record, dir: &Path, pid: u32) -> bool {
    open_path(r).is_some_and(|p| Path::new(p).starts_with(dir))
        && r.process.as_ref().is_some_and(|p| p.pid == pid)
}

/// A raw gRPC client with `host`'s certificate, for feeding the collector by hand.
pub async fn raw_client(
    pki: &Pki,
    collector: &Collector,
    host: &str,
) -> phi_proto::v1::ingest_client::IngestClient<tonic::transport::Channel> {
    let read = |name: &str| std::fs::read(pki.path(name)).expect("pem");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read(&format!("{host}.pem")),
            read(&format!("{host}.key")),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(collector.url())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the collector");
    phi_proto::v1::ingest_client::IngestClient::new(channel).max_encoding_message_size(64 << 20)
}
