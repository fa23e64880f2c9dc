//! Verified ingest: one gRPC stream per agent connection. The client certificate must name
//! the host the stream is for; the host's key is pinned at first contact; every record must
//! continue the stored chain and every checkpoint must verify with the pinned key. Anything
//! else is stored as a tamper alert with its evidence and refused with a clear status. An
//! acknowledgement is sent only after the batch is durable.

use std::{sync::Arc, time::Duration};

use phi_proto::v1::{
    Ack, AgentMessage, Batch, CollectorMessage, Welcome, agent_message, collector_message,
    ingest_server::Ingest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    store::{HostState, Pool, Store, StoreError, group::GroupCommit},
    telemetry::CollectorMetrics,
    tls::certificate_names,
    verify::{alert, prepare},
};

/// Bounds on every inbound stream.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time from connect to the Hello.
    pub first_message: Duration,
    /// Longest silence between messages.
    pub idle: Duration,
    /// Records plus checkpoints in one batch.
    pub max_batch: usize,
    /// Largest encoded message (enforced by the gRPC layer).
    pub max_message_bytes: usize,
    /// Largest record body.
    pub max_record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_message: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_batch: 10_000,
            max_message_bytes: 8 << 20,
            max_record_bytes: 1 << 20,
        }
    }
}

/// The ingest service (cheap to clone: a handle on shared state).
#[derive(Clone)]
pub struct IngestService {
    pool: Arc<Pool>,
    limits: Limits,
    metrics: Arc<CollectorMetrics>,
    /// Tells the store's consumers (sinks, alert rules) that something was stored.
    wake: crate::sinks::Wake,
    /// SQLite (one writer): concurrent streams' batches are committed together. PostgreSQL
    /// takes each batch in a transaction of its own, so that streams of different hosts
    /// write in parallel and collectors sharing the store never wait on each other's groups.
    group: Option<Arc<GroupCommit>>,
}

impl IngestService {
    pub fn new(pool: Arc<Pool>, limits: Limits, metrics: Arc<CollectorMetrics>) -> Self {
        let group = (pool.backend() == "sqlite").then(|| Arc::new(GroupCommit::default()));
        IngestService {
            pool,
            limits,
            metrics,
            wake: crate::sinks::Wake::default(),
            group,
        }
    }

    /// Announces every stored batch and alert on `wake`.
    pub fn with_wake(mut self, wake: crate::sinks::Wake) -> Self {
        self.wake = wake;
        self
    }
}

/// Counts an open stream while it lives.
struct StreamGuard(Arc<CollectorMetrics>);

impl StreamGuard {
    fn new(m: &Arc<CollectorMetrics>) -> StreamGuard {
        m.streams.inc();
        m.streams_active.set(m.streams_active.get() + 1.0);
        StreamGuard(Arc::clone(m))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let g = &self.0.streams_active;
        g.set((g.get() - 1.0).max(0.0));
    }
}

fn valid_host_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!("storage failed: {e}");
    Status::unavailable("the collector cannot store right now; retry later")
}

impl IngestService {
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        // The closure's own refusals travel as a Status inside the store's Ok.
        self.pool
            .run(move |s| Ok(f(s)))
            .await
            .map_err(|e: StoreError| internal(e))?
    }

    /// Checks the Hello against the client certificate and the pinned key.
    async fn admit(
        &self,
        names: Vec<String>,
        hello: &phi_proto::v1::Hello,
    ) -> Result<HostState, Status> {
        let host_id = hello.host_id.clone();
        if !valid_host_id(&host_id) {
            return Err(Status::invalid_argument(format!(
                "host id {host_id:?} is not valid (letters, digits, '-', '.', '_')"
            )));
        }
        if !names.contains(&host_id) {
            return Err(Status::permission_denied(format!(
                "the client certificate is for {names:?}, but the stream is for host {host_id:?}"
            )));
        }
        if hello.public_key.len() != 32 {
            return Err(Status::invalid_argument(
                "the host public key must be 32 bytes",
            ));
        }
        let key = hello.public_key.clone();
        let version = hello.agent_version.clone();
        let metrics = Arc::clone(&self.metrics);
        let wake = self.wake.clone();
        self.with_store(move |s| match s.host(&host_id).map_err(internal)? {
            None => {
                tracing::info!(host = %host_id, "new host: pinning its key");
                let state = s.pin_host(&host_id, &key).map_err(internal)?;
                if state.public_key != key {
                    // Another collector pinned a different key a moment ago.
                    return Err(Status::permission_denied(format!(
                        "host {host_id:?} was just pinned with another key"
                    )));
                }
                s.seen(&host_id, &version).map_err(internal)?;
                Ok(state)
            }
            Some(state) if state.public_key == key => {
                s.seen(&host_id, &version).map_err(internal)?;
                Ok(state)
            }
            Some(_) => {
                metrics.alert("key-change");
                s.alert(&alert(
                    &host_id,
                    "key-change",
                    None,
                    "the host presented another checkpoint key than the pinned one".into(),
                    key,
                ))
                .map_err(internal)?;
                wake.notify();
                Err(Status::permission_denied(format!(
                    "host {host_id:?} presented another key than the one pinned at first \
                         contact; an alert was raised"
                )))
            }
        })
        .await
    }

    /// Verifies and stores one batch; returns the durable head.
    async fn ingest(&self, host_id: String, batch: Batch) -> Result<u64, Status> {
        let started = std::time::Instant::now();
        let result = self.ingest_batch(host_id, batch).await;
        // Stored records or an alert (a refused batch may have stored both).
        self.wake.notify();
        let m = &self.metrics;
        m.ingest_micros.add(started.elapsed().as_micros() as u64);
        match &result {
            Ok(_) => m.batches.inc(),
            Err(_) => m.refused_batches.inc(),
        }
        result
    }

    async fn ingest_batch(&self, host_id: String, batch: Batch) -> Result<u64, Status> {
        let limits = self.limits;
        let metrics = Arc::clone(&self.metrics);
        if batch.records.len() + batch.checkpoints.len() > limits.max_batch {
            return Err(Status::resource_exhausted(format!(
                "a batch holds at most {} records and checkpoints",
                limits.max_batch
            )));
        }
        if let Some(big) = batch
            .records
            .iter()
            .find(|r| r.body.len() > limits.max_record_bytes)
        {
            return Err(Status::resource_exhausted(format!(
                "record {} is {} bytes; the limit is {}",
                big.seq,
                big.body.len(),
                limits.max_record_bytes
            )));
        }
        // Decoding and hashing happen here, on this stream's own thread, while other
        // streams' batches are being written.
        let batch = tokio::task::spawn_blocking(move || prepare(batch))
            .await
            .map_err(internal)?;
        let appended = match &self.group {
            Some(group) => group.append(&self.pool, host_id.clone(), batch).await,
            None => {
                let host = host_id.clone();
                self.pool
                    .run(move |s| s.append_prepared(&host, batch))
                    .await
            }
        }
        .map_err(internal)?;
        metrics.records.add(appended.records as u64);
        metrics.checkpoints.add(appended.checkpoints as u64);
        if appended.records > 0 {
            tracing::debug!(
                host = %host_id,
                records = appended.records,
                checkpoints = appended.checkpoints,
                durable_seq = appended.head.seq,
                "stored"
            );
        }
        if let Some(p) = appended.problem {
            metrics.alert(&p.kind);
            tracing::error!(host = %host_id, kind = %p.kind, "tamper alert: {}", p.detail);
            return Err(Status::failed_precondition(format!(
                "refused: {} (a tamper alert was stored)",
                p.detail
            )));
        }
        Ok(appended.head.seq)
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let names = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| certificate_names(c.as_ref())))
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let mut inbound = request.into_inner();
        let limits = self.limits;
        let first = match tokio::time::timeout(limits.first_message, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {:?}",
                    limits.first_message
                )));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::invalid_argument("the stream ended before Hello")),
            Ok(Ok(Some(m))) => m,
        };
        let Some(agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        let state = self.admit(names, &hello).await?;
        let host_id = hello.host_id;
        let (tx, rx) = mpsc::channel(16);
        let welcome = CollectorMessage {
            msg: Some(collector_message::Msg::Welcome(Welcome {
                durable_seq: state.head.seq,
                head_hash: if state.head.seq == 0 {
                    Vec::new()
                } else {
                    state.head.hash.to_vec()
                },
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))?;
        tracing::info!(host = %host_id, durable_seq = state.head.seq, "agent connected");
        let service = self.clone();
        let guard = StreamGuard::new(&self.metrics);
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let msg = match tokio::time::timeout(limits.idle, inbound.message()).await {
                    Err(_) => {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no message for {:?}",
                                limits.idle
                            ))))
                            .await;
                        break;
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::warn!(host = %host_id, "stream error: {}", status.message());
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    Ok(Ok(Some(m))) => m,
                };
                let reply = match msg.msg {
                    Some(agent_message::Msg::Batch(batch)) => service
                        .ingest(host_id.clone(), batch)
                        .await
                        .map(|seq| CollectorMessage {
                            msg: Some(collector_message::Msg::Ack(Ack { durable_seq: seq })),
                        }),
                    Some(agent_message::Msg::Hello(_)) => {
                        Err(Status::invalid_argument("Hello may only be sent once"))
                    }
                    None => Err(Status::invalid_argument("empty message")),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            tracing::info!(host = %host_id, "agent stream ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
