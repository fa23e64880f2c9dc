//! A real `phi-collector serve` process with development certificates, and agent-like gRPC
//! streams to it over mutual TLS.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use phi_proto::v1::{
    AgentMessage, Batch, CollectorMessage, Hello, agent_message, collector_message,
    ingest_client::IngestClient,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::db::Db;

/// A program of the workspace: from the environment variable `var`, else next to the
/// running executable (`target/<profile>/`, also when it runs from `target/<profile>/deps/`).
pub fn binary(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{var}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating phi-bench")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "{name} not found next to {} and {var} is not set: build it (cargo build --release -p \
         phi-collector) or set {var}",
        exe.display()
    )
}

/// Development certificates from `phictl certs init`.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn init(phictl: &Path, hosts: &[String]) -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("phi-bench-pki-")
            .tempdir()?;
        let mut cmd = Command::new(phictl);
        cmd.args(["certs", "init", "--dir"]).arg(dir.path());
        for h in hosts {
            cmd.args(["--host", h]);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", phictl.display()))?;
        if !out.status.success() {
            bail!(
                "phictl certs init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Pki { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running `phi-collector serve` (ingest only: the query API and metrics are off).
pub struct Collector {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    pub fn start(bin: &Path, pki: &Pki, db: &Db, max_batch: usize) -> anyhow::Result<Collector> {
        let dir = tempfile::Builder::new()
            .prefix("phi-bench-collector-")
            .tempdir()?;
        let log = dir.path().join("collector.log");
        let port = free_port()?;
        let (url, password) = db.split_password();
        let mut cmd = Command::new(bin);
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--api-listen", "off", "--metrics-listen", "off", "--db"])
            .arg(&url)
            .arg("--tls-cert")
            .arg(pki.path("collector.pem"))
            .arg("--tls-key")
            .arg(pki.path("collector.key"))
            .arg("--client-ca")
            .arg(pki.path("ca.pem"))
            .args(["--name", "phi-bench", "--log", "warn"]);
        if max_batch > 10_000 {
            cmd.arg("--max-batch").arg(max_batch.to_string());
            cmd.arg("--max-message-bytes")
                .arg((max_batch * 4096 + (1 << 20)).to_string());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut c = Collector {
            child: Some(child),
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(child) = c.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("phi-collector exited ({status}): {}", c.log());
            }
            if Instant::now() > deadline {
                bail!("phi-collector did not listen within 30 s: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it in order (SIGTERM) and waits: the store is closed afterwards.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait()?;
            if !status.success() {
                bail!("phi-collector ended with {status}: {}", self.log());
            }
        }
        Ok(())
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

/// A gRPC client with `host`'s certificate.
pub async fn client(pki: &Pki, port: u16, host: &str) -> anyhow::Result<IngestClient<Channel>> {
    let read =
        |name: &str| std::fs::read(pki.path(name)).with_context(|| format!("reading {name}"));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")?))
        .identity(tonic::transport::Identity::from_pem(
            read(&format!("{host}.pem"))?,
            read(&format!("{host}.key"))?,
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))?
        .tls_config(tls)?
        .connect()
        .await
        .context("connecting to the collector")?;
    Ok(IngestClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20))
}

/// Batches in flight on one stream (the agent's own send queue holds as many).
const IN_FLIGHT: usize = 4;

/// One host's stream, connected and welcomed, ready to send.
pub struct Stream {
    host: String,
    tx: tokio::sync::mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<CollectorMessage>,
}

impl Stream {
    /// Connects as `host`, sends the Hello and waits for the Welcome (the store must not
    /// hold the host's chain yet).
    pub async fn open(
        pki: &Pki,
        port: u16,
        host: &str,
        public_key: [u8; 32],
    ) -> anyhow::Result<Stream> {
        let mut client = client(pki, port, host).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(IN_FLIGHT);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                host_id: host.to_owned(),
                public_key: public_key.to_vec(),
                agent_version: concat!("phi-bench ", env!("CARGO_PKG_VERSION")).into(),
                boot_id: String::new(),
            })),
        })
        .await?;
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow::anyhow!("{host}: the collector refused the stream: {s}"))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(CollectorMessage {
                msg: Some(collector_message::Msg::Welcome(w)),
            })) if w.durable_seq == 0 => {}
            Ok(Some(CollectorMessage {
                msg: Some(collector_message::Msg::Welcome(w)),
            })) => bail!(
                "{host}: the collector already holds seq {}: the store is not fresh",
                w.durable_seq
            ),
            other => bail!("{host}: expected a Welcome, got {other:?}"),
        }
        Ok(Stream {
            host: host.to_owned(),
            tx,
            inbound,
        })
    }

    /// Sends `batches` (at most 4 queued, like the agent) and returns the
    /// instant the collector acknowledged the last record; then closes the stream in order.
    pub async fn send(self, batches: Vec<Batch>) -> anyhow::Result<Instant> {
        let Stream {
            host,
            tx,
            mut inbound,
        } = self;
        let last_seq = batches
            .iter()
            .flat_map(|b| b.records.last())
            .map(|r| r.seq)
            .max()
            .unwrap_or(0);
        let sender = tokio::spawn(async move {
            for b in batches {
                tx.send(AgentMessage {
                    msg: Some(agent_message::Msg::Batch(b)),
                })
                .await
                .context("the stream closed")?;
            }
            // Kept open until every acknowledgement is in.
            Ok::<_, anyhow::Error>(tx)
        });
        let acked = loop {
            match inbound.message().await {
                Ok(Some(CollectorMessage {
                    msg: Some(collector_message::Msg::Ack(a)),
                })) => {
                    if a.durable_seq >= last_seq {
                        break Instant::now();
                    }
                }
                Ok(other) => bail!("{host}: unexpected answer {other:?}"),
                Err(s) => bail!("{host}: {} ({:?})", s.message(), s.code()),
            }
        };
        // Ends the stream as an agent does at stop: by closing its side.
        drop(sender.await.context("sender task")??);
        while let Ok(Some(_)) = inbound.message().await {}
        Ok(acked)
    }
}
