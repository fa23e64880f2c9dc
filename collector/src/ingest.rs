//! Verified ingest: one gRPC stream per agent connection. The client certificate must name
//! the host the stream is for; the host's key is pinned at first contact; every record must
//! continue the stored chain and every checkpoint must verify with the pinned key. Anything
//! else is stored as a tamper alert with its evidence and refused with a clear status. An
//! acknowledgement is sent only after the batch is durable.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use phi_chain::{
    checkpoint,
    seal::{Head, check_link, head_of},
};
use phi_proto::v1::{
    Ack, AgentMessage, Batch, Checkpoint, CollectorMessage, Record, SealedRecord, Welcome,
    agent_message, collector_message, ingest_server::Ingest,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    store::{Alert, HostState, sqlite::SqliteStore},
    tls::certificate_names,
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
    store: Arc<Mutex<SqliteStore>>,
    limits: Limits,
}

impl IngestService {
    pub fn new(store: SqliteStore, limits: Limits) -> Self {
        IngestService {
            store: Arc::new(Mutex::new(store)),
            limits,
        }
    }
}

/// The outcome of checking one batch against a host's chain.
#[derive(Debug, Default)]
pub struct Verified {
    /// New records, in order, each continuing the one before.
    pub records: Vec<(SealedRecord, Record)>,
    pub checkpoints: Vec<Checkpoint>,
    pub head: Head,
    /// The first thing that must not be accepted, if any (everything before it is fine).
    pub problem: Option<Alert>,
}

fn alert(host_id: &str, kind: &str, seq: Option<u64>, detail: String, evidence: Vec<u8>) -> Alert {
    Alert {
        host_id: host_id.to_owned(),
        kind: kind.to_owned(),
        seq,
        detail,
        evidence,
    }
}

/// Checks a batch against the host's chain. `stored_hash` answers for records already
/// stored (duplicates must match them exactly).
pub fn verify_batch(
    host_id: &str,
    state: &HostState,
    batch: Batch,
    stored_hash: impl Fn(u64) -> Option<Vec<u8>>,
) -> Verified {
    let mut out = Verified {
        head: state.head,
        ..Default::default()
    };
    for sealed in batch.records {
        let seq = sealed.seq;
        if seq <= out.head.seq {
            let known = out
                .records
                .iter()
                .find(|(r, _)| r.seq == seq)
                .map(|(r, _)| r.hash.clone())
                .or_else(|| stored_hash(seq));
            if known.as_deref() != Some(sealed.hash.as_slice()) {
                out.problem = Some(alert(
                    host_id,
                    "fork",
                    Some(seq),
                    format!("seq {seq} is already stored with a different hash"),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
            continue;
        }
        match check_link(out.head, &sealed) {
            Ok(record) if record.host_id != host_id => {
                out.problem = Some(alert(
                    host_id,
                    "chain-break",
                    Some(seq),
                    format!("seq {seq} names host {:?}", record.host_id),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
            Ok(record) => {
                out.head = head_of(&sealed);
                out.records.push((sealed, record));
            }
            Err(e) => {
                out.problem = Some(alert(
                    host_id,
                    "chain-break",
                    Some(seq),
                    e.to_string(),
                    sealed.encode_to_vec(),
                ));
                return out;
            }
        }
    }
    let mut prev_seq = state.checkpoint_seq;
    let mut prev_sig = state.checkpoint_sig.clone();
    for cp in batch.checkpoints {
        if cp.seq <= prev_seq {
            continue;
        }
        let problem = if cp.host_id != host_id {
            Some(format!(
                "checkpoint at seq {} names host {:?}",
                cp.seq, cp.host_id
            ))
        } else if cp.seq > out.head.seq {
            Some(format!(
                "checkpoint at seq {} is ahead of the chain (seq {})",
                cp.seq, out.head.seq
            ))
        } else if let Err(e) = checkpoint::verify(&cp, &state.public_key, &prev_sig) {
            Some(e.to_string())
        } else {
            let at = out
                .records
                .iter()
                .find(|(r, _)| r.seq == cp.seq)
                .map(|(r, _)| r.hash.clone())
                .or_else(|| stored_hash(cp.seq));
            (at.as_deref() != Some(cp.head_hash.as_slice())).then(|| {
                format!(
                    "checkpoint at seq {} signs a head hash the chain does not have",
                    cp.seq
                )
            })
        };
        if let Some(detail) = problem {
            out.problem = Some(alert(
                host_id,
                "checkpoint",
                Some(cp.seq),
                detail,
                cp.encode_to_vec(),
            ));
            return out;
        }
        prev_seq = cp.seq;
        prev_sig.clone_from(&cp.signature);
        out.checkpoints.push(cp);
    }
    out
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
        f: impl FnOnce(&mut SqliteStore) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            let mut guard = store
                .lock()
                .map_err(|_| Status::internal("store lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
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
        self.with_store(move |s| match s.host(&host_id).map_err(internal)? {
            None => {
                tracing::info!(host = %host_id, "new host: pinning its key");
                s.pin_host(&host_id, &key).map_err(internal)
            }
            Some(state) if state.public_key == key => Ok(state),
            Some(_) => {
                s.alert(&alert(
                    &host_id,
                    "key-change",
                    None,
                    "the host presented another checkpoint key than the pinned one".into(),
                    key,
                ))
                .map_err(internal)?;
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
        let limits = self.limits;
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
        self.with_store(move |s| {
            let state = s
                .host(&host_id)
                .map_err(internal)?
                .ok_or_else(|| Status::internal("host vanished"))?;
            let verified = verify_batch(&host_id, &state, batch, |seq| {
                s.record_hash(&host_id, seq).ok().flatten()
            });
            let alerts: Vec<Alert> = verified.problem.iter().cloned().collect();
            s.commit(
                &host_id,
                &verified.records,
                &verified.checkpoints,
                verified.head,
                &alerts,
            )
            .map_err(internal)?;
            if !verified.records.is_empty() {
                tracing::debug!(
                    host = %host_id,
                    records = verified.records.len(),
                    checkpoints = verified.checkpoints.len(),
                    durable_seq = verified.head.seq,
                    "stored"
                );
            }
            if let Some(p) = verified.problem {
                tracing::error!(host = %host_id, kind = %p.kind, "tamper alert: {}", p.detail);
                return Err(Status::failed_precondition(format!(
                    "refused: {} (a tamper alert was stored)",
                    p.detail
                )));
            }
            Ok(verified.head.seq)
        })
        .await
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
        tokio::spawn(async move {
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

#[cfg(test)]
mod tests {
    use phi_chain::{checkpoint::HostKey, seal::Sealer};
    use phi_proto::v1::{Heartbeat, record::Event};

    use super::*;

    fn chain(n: u64, host: &str) -> (Vec<SealedRecord>, Sealer) {
        let mut sealer = Sealer::new(Head::EMPTY);
        let recs = (0..n)
            .map(|_| {
                sealer.seal(&mut Record {
                    host_id: host.into(),
                    event: Some(Event::Heartbeat(Heartbeat::default())),
                    ..Default::default()
                })
            })
            .collect();
        (recs, sealer)
    }

    fn state(key: &HostKey) -> HostState {
        HostState {
            public_key: key.public_key().to_vec(),
            head: Head::EMPTY,
            checkpoint_seq: 0,
            checkpoint_sig: Vec::new(),
        }
    }

    #[test]
    fn accepts_a_chain_with_its_checkpoint() {
        let key = HostKey::from_secret([1; 32]);
        let (recs, sealer) = chain(3, "h");
        let head = sealer.head();
        let cp = key.checkpoint(
            "h",
            "b",
            3,
            &head.hash,
            phi_proto::Timestamp::default(),
            &[],
        );
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![cp],
            },
            |_| None,
        );
        assert!(v.problem.is_none(), "{:?}", v.problem);
        assert_eq!(v.records.len(), 3);
        assert_eq!(v.checkpoints.len(), 1);
        assert_eq!(v.head, head);
    }

    #[test]
    fn names_breaks_forks_and_bad_checkpoints() {
        let key = HostKey::from_secret([1; 32]);
        let (mut recs, _) = chain(3, "h");
        recs.remove(1);
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![],
            },
            |_| None,
        );
        assert_eq!(v.records.len(), 1, "the valid prefix is kept");
        assert_eq!(
            v.problem.as_ref().map(|p| p.kind.as_str()),
            Some("chain-break")
        );

        let (recs, sealer) = chain(2, "h");
        let mut st = state(&key);
        st.head = sealer.head();
        let v = verify_batch(
            "h",
            &st,
            Batch {
                records: recs.clone(),
                checkpoints: vec![],
            },
            |seq| (seq == 1).then(|| vec![0; 32]),
        );
        assert_eq!(v.problem.as_ref().map(|p| p.kind.as_str()), Some("fork"));

        let other = HostKey::from_secret([2; 32]);
        let (recs, sealer) = chain(2, "h");
        let cp = other.checkpoint("h", "b", 2, &sealer.head().hash, Default::default(), &[]);
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![cp],
            },
            |_| None,
        );
        assert_eq!(
            v.problem.as_ref().map(|p| p.kind.as_str()),
            Some("checkpoint")
        );

        let (recs, _) = chain(1, "other-host");
        let v = verify_batch(
            "h",
            &state(&key),
            Batch {
                records: recs,
                checkpoints: vec![],
            },
            |_| None,
        );
        assert!(
            v.problem.is_some(),
            "a record naming another host is refused"
        );
    }
}
