//! Streaming the spool to the collector: gRPC over mutual TLS, at-least-once, acknowledged by
//! seq. The agent presents its certificate (which must name the host id) and checks the
//! collector's against the configured CA. On any failure it reconnects with backoff and
//! resumes after the collector's last durable seq.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use phi_chain::spool::{Durable, Entry, SpoolReader};
use phi_proto::v1::{
    AgentMessage, Batch, CollectorMessage, Hello, agent_message, collector_message,
    ingest_client::IngestClient,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::Collector;

/// Entries per batch.
const BATCH: usize = 512;
/// Largest message the agent accepts from the collector.
const MAX_MESSAGE: usize = 1 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the transport tells the rest of the agent.
#[derive(Debug)]
pub enum Report {
    /// The collector durably holds everything up to this seq.
    Acked(u64),
    /// A stream came up (true) or ended in an error (false).
    Connected(bool),
}

/// Everything a session needs.
#[derive(Clone)]
pub struct Stream {
    pub collector: Collector,
    pub host_id: String,
    pub boot_id: String,
    pub public_key: [u8; 32],
    pub spool_dir: PathBuf,
    pub durable: Arc<Mutex<Durable>>,
    /// Signalled when new records are durable.
    pub wake: Arc<Notify>,
    /// Becomes true when the agent stops: the stream is closed cleanly once everything in
    /// the spool has been sent, and the task ends.
    pub closing: watch::Receiver<bool>,
}

/// Starts the streaming task; reports come back on the returned channel.
pub fn spawn(stream: Stream) -> mpsc::UnboundedReceiver<Report> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut welcomed = false;
            match session(&stream, &tx, &mut welcomed).await {
                Ok(()) if *stream.closing.borrow() => break,
                Ok(()) => backoff = BACKOFF_MIN,
                Err(_) if *stream.closing.borrow() => break,
                Err(e) => {
                    // A stream that was up (a collector restarting, say) is retried from
                    // the shortest wait: only failures in a row lengthen it.
                    if welcomed {
                        backoff = BACKOFF_MIN;
                    }
                    let _ = tx.send(Report::Connected(false));
                    tracing::warn!(
                        collector = %stream.collector.url,
                        "stream to the collector ended: {e:#}; retrying in {backoff:?}"
                    );
                }
            }
            // A little jitter so a fleet does not reconnect in lockstep.
            let jitter = Duration::from_millis(u64::from(std::process::id() % 100));
            let mut closing = stream.closing.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = closing.wait_for(|c| *c) => break,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    rx
}

async fn connect(c: &Collector) -> anyhow::Result<IngestClient<tonic::transport::Channel>> {
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&c.ca)?))
        .identity(Identity::from_pem(read(&c.cert)?, read(&c.key)?))
        .domain_name(c.server_name.clone());
    let channel = Endpoint::from_shared(c.url.clone())
        .with_context(|| format!("invalid collector URL {}", c.url))?
        .tls_config(tls)
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", c.url))?;
    Ok(IngestClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

fn to_batch(entries: Vec<Entry>) -> Batch {
    let mut batch = Batch::default();
    for e in entries {
        match e {
            Entry::Record(r) => batch.records.push(r),
            Entry::Checkpoint(c) => batch.checkpoints.push(c),
        }
    }
    batch
}

/// One connection: Hello, Welcome, then batches out and acks in until something fails.
/// `welcomed` turns true once the collector has accepted the stream.
async fn session(
    s: &Stream,
    reports: &mpsc::UnboundedSender<Report>,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let mut client = connect(&s.collector).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: s.host_id.clone(),
            public_key: s.public_key.to_vec(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_id: s.boot_id.clone(),
        })),
    })
    .await?;
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|st| anyhow::anyhow!("collector refused the stream: {}", st.message()))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(CollectorMessage {
            msg: Some(collector_message::Msg::Welcome(w)),
        })) => w,
        Ok(other) => bail!("expected a Welcome, got {other:?}"),
        Err(st) => bail!("collector refused the stream: {}", st.message()),
    };
    let local = s.durable.lock().map(|d| d.seq).unwrap_or(0);
    if welcome.durable_seq > local {
        bail!(
            "the collector holds this host's chain up to seq {} but the local spool ends at {}: \
             the spool was lost or replaced; restore it, or give this host a new host id",
            welcome.durable_seq,
            local
        );
    }
    tracing::info!(
        collector = %s.collector.url,
        durable_seq = welcome.durable_seq,
        "streaming to the collector"
    );
    *welcomed = true;
    let _ = reports.send(Report::Connected(true));
    let _ = reports.send(Report::Acked(welcome.durable_seq));

    let mut reader = SpoolReader::open(
        s.spool_dir.clone(),
        Arc::clone(&s.durable),
        welcome.durable_seq,
    );
    let mut closing = s.closing.clone();
    let sender = async {
        // Owned here: dropping it ends the request stream, which is how the collector learns
        // that the agent is done.
        let tx = tx;
        loop {
            let entries = reader.next_batch(BATCH).context("reading the spool")?;
            if entries.is_empty() {
                if *closing.borrow_and_update() {
                    return Ok::<(), anyhow::Error>(());
                }
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = closing.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Batch(to_batch(entries))),
            })
            .await
            .context("the stream closed")?;
        }
    };
    let receiver = async {
        loop {
            match inbound.message().await {
                Ok(Some(CollectorMessage {
                    msg: Some(collector_message::Msg::Ack(a)),
                })) => {
                    let _ = reports.send(Report::Acked(a.durable_seq));
                }
                Ok(Some(other)) => bail!("unexpected message from the collector: {other:?}"),
                Ok(None) if *s.closing.borrow() => return Ok::<(), anyhow::Error>(()),
                Ok(None) => bail!("the collector closed the stream"),
                Err(st) => bail!("{} ({:?})", st.message(), st.code()),
            }
        }
    };
    tokio::try_join!(sender, receiver)?;
    Ok(())
}
