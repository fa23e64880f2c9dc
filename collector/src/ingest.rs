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
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    store::{
        Appended, HostState, Pool, Store, StoreError,
        group::{AFTER_REFUSAL, GroupCommit, Lane},
    },
    telemetry::CollectorMetrics,
    tls::certificate_names,
    verify::{Prepared, alert, prepare},
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
    /// Batches read but not yet answered, over all streams (see [`BATCHES_IN_HAND`]).
    in_hand: Arc<tokio::sync::Semaphore>,
    /// Turns true when the collector stops: every stream then ends in order, after the
    /// batches already read are stored and acknowledged.
    stop: Option<tokio::sync::watch::Receiver<bool>>,
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
            in_hand: Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_HAND)),
            stop: None,
        }
    }

    /// Ends every stream when `stop` turns true. Without it a stream that stays open (an
    /// agent with nothing to send) would hold up the server's graceful shutdown until the
    /// idle limit ends it.
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Announces every stored batch and alert on `wake`.
    pub fn with_wake(mut self, wake: crate::sinks::Wake) -> Self {
        self.wake = wake;
        self
    }
}

/// What an agent is told when the collector stops: it keeps what was not acknowledged and
/// sends it to whichever collector it reaches next.
const STOPPING: &str = "the collector is stopping; records not acknowledged are sent again \
                        when the agent reconnects";

/// Resolves once the collector stops (never, without a stop signal).
async fn stopping(stop: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(rx) = stop
        && rx.wait_for(|s| *s).await.is_ok()
    {
        return;
    }
    std::future::pending().await
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

    /// Checks `batch` against the limits and starts decoding and hashing it on the blocking
    /// pool, so that it is ready by the time the batches before it are stored.
    fn start(&self, batch: Batch, permit: OwnedSemaphorePermit) -> Ahead {
        let started = std::time::Instant::now();
        let limits = self.limits;
        let prepared = if batch.records.len() + batch.checkpoints.len() > limits.max_batch {
            Err(Status::resource_exhausted(format!(
                "a batch holds at most {} records and checkpoints",
                limits.max_batch
            )))
        } else if let Some(big) = batch
            .records
            .iter()
            .find(|r| r.body.len() > limits.max_record_bytes)
        {
            Err(Status::resource_exhausted(format!(
                "record {} is {} bytes; the limit is {}",
                big.seq,
                big.body.len(),
                limits.max_record_bytes
            )))
        } else {
            Ok(tokio::task::spawn_blocking(move || prepare(batch)))
        };
        Ahead::Batch {
            started,
            prepared,
            permit,
        }
    }

    /// Hands a batch started by [`IngestService::start`] to the store, in the stream's
    /// order. With group commit (SQLite) it returns as soon as the batch is queued, so that
    /// the next batch can queue behind it; PostgreSQL verifies each batch against the head the
    /// one before left, so it returns once the batch is stored.
    async fn submit(
        &self,
        lane: &Arc<Lane>,
        host_id: String,
        started: std::time::Instant,
        prepared: Result<tokio::task::JoinHandle<Prepared>, Status>,
        permit: OwnedSemaphorePermit,
    ) -> Stored {
        let batch = match prepared {
            Ok(decoding) => match decoding.await {
                Ok(batch) => batch,
                Err(e) => return Stored::Done(self.finish(&host_id, started, Err(internal(e)))),
            },
            Err(status) => return Stored::Done(self.finish(&host_id, started, Err(status))),
        };
        match &self.group {
            Some(group) => {
                let pending = group.submit(lane, host_id.clone(), batch);
                let (group, service) = (Arc::clone(group), self.clone());
                Stored::Pending(tokio::spawn(async move {
                    let _permit = permit;
                    let appended = group.wait(&service.pool, pending).await;
                    service.finish(&host_id, started, appended.map_err(store_status))
                }))
            }
            None => {
                let host = host_id.clone();
                let appended = self
                    .pool
                    .run(move |s| s.append_prepared(&host, batch))
                    .await
                    .map_err(store_status);
                Stored::Done(self.finish(&host_id, started, appended))
            }
        }
    }

    /// The answer to one batch; counts it and wakes the store's consumers.
    fn finish(
        &self,
        host_id: &str,
        started: std::time::Instant,
        appended: Result<Appended, Status>,
    ) -> Result<u64, Status> {
        let m = &self.metrics;
        let result = appended.and_then(|appended| {
            m.records.add(appended.records as u64);
            m.checkpoints.add(appended.checkpoints as u64);
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
                m.alert(&p.kind);
                tracing::error!(host = %host_id, kind = %p.kind, "tamper alert: {}", p.detail);
                return Err(Status::failed_precondition(format!(
                    "refused: {} (a tamper alert was stored)",
                    p.detail
                )));
            }
            // The decoded records of the batch are freed here, on this stream's task, not
            // on the writer's path.
            drop(appended.spent);
            Ok(appended.head.seq)
        });
        // Stored records or an alert (a refused batch may have stored both).
        self.wake.notify();
        m.ingest_micros.add(started.elapsed().as_micros() as u64);
        match &result {
            Ok(_) => m.batches.inc(),
            Err(_) => m.refused_batches.inc(),
        }
        result
    }
}

/// The status for a batch the store did not take.
fn store_status(e: StoreError) -> Status {
    match e {
        // The stream already ended with the refusal before it.
        StoreError::Invalid(m) if m == AFTER_REFUSAL => Status::aborted(m),
        e => internal(e),
    }
}

/// A batch handed to the store (see [`IngestService::submit`]).
enum Stored {
    Pending(tokio::task::JoinHandle<Result<u64, Status>>),
    Done(Result<u64, Status>),
}

/// Batches a stream hands to the store before the oldest of them is acknowledged (beyond
/// that one). One is enough for a batch to be queued whenever a commit ends.
const STORE_AHEAD: usize = 1;

/// Batches read from all streams and not yet answered: each stream reads, decodes and queues
/// a few batches ahead of the one being stored, and this bounds the memory that takes when
/// many agents send their backlogs at once (a batch of 512 records is about 1 MB decoded).
const BATCHES_IN_HAND: usize = 32;

/// Batches a stream decodes ahead of the one being stored. The agent sends without waiting
/// for acknowledgements: while one batch waits for its commit, the next is decoded and
/// hashed on another core.
const DECODE_AHEAD: usize = 2;

/// What the reader of a stream hands to its writer, in the order the agent sent it.
enum Ahead {
    /// A batch, decoding (or refused by the limits).
    Batch {
        started: std::time::Instant,
        prepared: Result<tokio::task::JoinHandle<Prepared>, Status>,
        /// Its place among [`BATCHES_IN_HAND`], given back once it is answered.
        permit: OwnedSemaphorePermit,
    },
    /// The stream failed: answered after everything before it.
    Fail(Status),
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
        let mut stop = self.stop.clone();
        let first = tokio::select! {
            () = stopping(&mut stop) => return Err(Status::unavailable(STOPPING)),
            first = tokio::time::timeout(limits.first_message, inbound.message()) => first,
        };
        let first = match first {
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
        let (ahead, mut ready) = mpsc::channel::<Ahead>(DECODE_AHEAD);
        let reader = self.clone();
        let reader_host = host_id.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    // The writer stopped (a refusal, or the agent went away).
                    () = ahead.closed() => break,
                    // Answered after the batches already read: they are stored and
                    // acknowledged first. A batch half read is dropped unacknowledged.
                    () = stopping(&mut stop) => {
                        tracing::info!(host = %reader_host, "ending the stream: the collector is stopping");
                        let _ = ahead.send(Ahead::Fail(Status::unavailable(STOPPING))).await;
                        break;
                    }
                    next = tokio::time::timeout(limits.idle, inbound.message()) => next,
                };
                let item = match next {
                    Err(_) => Ahead::Fail(Status::deadline_exceeded(format!(
                        "no message for {:?}",
                        limits.idle
                    ))),
                    Ok(Ok(None)) => break,
                    Ok(Err(status)) => {
                        tracing::warn!(host = %reader_host, "stream error: {}", status.message());
                        Ahead::Fail(status)
                    }
                    Ok(Ok(Some(m))) => match m.msg {
                        Some(agent_message::Msg::Batch(batch)) => {
                            // Acquired in each stream's order, and given back by batches that
                            // are stored without waiting for any: this cannot deadlock.
                            let permit = tokio::select! {
                                () = ahead.closed() => break,
                                permit = Arc::clone(&reader.in_hand).acquire_owned() => permit,
                            };
                            let Ok(permit) = permit else { break };
                            reader.start(batch, permit)
                        }
                        Some(agent_message::Msg::Hello(_)) => {
                            Ahead::Fail(Status::invalid_argument("Hello may only be sent once"))
                        }
                        None => Ahead::Fail(Status::invalid_argument("empty message")),
                    },
                };
                let last = matches!(item, Ahead::Fail(_));
                if ahead.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        // In the stream's order: the submitter hands each decoded batch to the store, the
        // acknowledger answers each once it is durable.
        let (stored_tx, mut stored_rx) = mpsc::channel::<Result<Stored, Status>>(STORE_AHEAD);
        let submitter_host = host_id.clone();
        tokio::spawn(async move {
            let lane = Arc::new(Lane::default());
            loop {
                let item = tokio::select! {
                    // The acknowledger stopped (a refusal, or the agent went away).
                    () = stored_tx.closed() => break,
                    item = ready.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                };
                let (next, last) = match item {
                    Ahead::Batch {
                        started,
                        prepared,
                        permit,
                    } => (
                        Ok(service
                            .submit(&lane, submitter_host.clone(), started, prepared, permit)
                            .await),
                        false,
                    ),
                    Ahead::Fail(status) => (Err(status), true),
                };
                if stored_tx.send(next).await.is_err() || last {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let _guard = guard;
            while let Some(next) = stored_rx.recv().await {
                let reply = match next {
                    Ok(Stored::Pending(task)) => task.await.unwrap_or_else(|e| Err(internal(e))),
                    Ok(Stored::Done(result)) => result,
                    Err(status) => Err(status),
                }
                .map(|seq| CollectorMessage {
                    msg: Some(collector_message::Msg::Ack(Ack { durable_seq: seq })),
                });
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
